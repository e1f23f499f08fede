//! Parsing and validating drop files: bytes in, validated [`Record`]s or a list of every
//! problem out.
//!
//! The fast path deserializes each record straight into a typed struct (unknown fields and
//! duplicate keys are rejected by serde itself) and only walks `payload` for duplicate keys,
//! because bulk `.jsonl` device files must go at well over 100,000 records a second. A record
//! that fails the fast path is read again field by field (the slow path), so that one report
//! names every bad field of it instead of only the first one serde tripped over.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::ControlFlow;

use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{AppConfig, Config, Environment};
use crate::model::{DeviceAction, DeviceRecord, NotificationRecord, PushType, Record, Target};

/// The two drop file formats, told apart by the file name's suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// One object, or an array of objects.
    Json,
    /// One object per line; blank lines allowed.
    Jsonl,
}

impl FileKind {
    /// The kind of a drop file name, or `None` for names pushdrop does not take.
    pub fn from_name(name: &str) -> Option<FileKind> {
        if name.ends_with(".jsonl") {
            Some(FileKind::Jsonl)
        } else if name.ends_with(".json") {
            Some(FileKind::Json)
        } else {
            None
        }
    }
}

/// Reports list at most this many problems; a file of 200,000 bad lines needs no 200,000-line
/// report to be fixed.
pub const MAX_PROBLEMS: usize = 1000;

/// Quoted file content in messages is cut to this many characters, so a report never carries
/// more than a short excerpt of what may be confidential data.
const EXCERPT_CHARS: usize = 40;

/// One thing wrong with a drop file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// 0-based index of the record in the file; `None` for problems of the file as a whole.
    pub record: Option<usize>,
    /// 1-based line: the record's line in a `.jsonl`, the field's (or record's) line in a
    /// `.json`.
    pub line: Option<usize>,
    /// Path of the field, such as `to.tokens[2]`; `None` when no single field is at fault.
    pub field: Option<String>,
    /// What is wrong, in plain words.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(r) = self.record {
            write!(f, "record {r}")?;
            sep = ", ";
        }
        if let Some(l) = self.line {
            write!(f, "{sep}line {l}")?;
            sep = ", ";
        }
        if let Some(field) = &self.field {
            write!(f, "{sep}field {field}")?;
            sep = ", ";
        }
        if !sep.is_empty() {
            f.write_str(": ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why a file was (or would be) rejected; the short code is the `reason` label of the
/// `files_rejected` metric and of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No records at all.
    Empty,
    /// Not valid UTF-8.
    NotUtf8,
    /// Not valid JSON / JSON lines.
    Parse,
    /// A `.json` that ends early: possibly still being written.
    Truncated,
    /// Valid JSON, but records that break the rules of SPEC §2.
    Invalid,
    /// Larger than `max_file_bytes`.
    Oversize,
    /// A symbolic link (never followed).
    Symlink,
    /// A FIFO, socket or device (never opened).
    NotRegular,
    /// The name does not end in `.json` or `.jsonl`.
    BadName,
    /// Could not be read at all (`pushdrop validate` of a missing file, an I/O error).
    Unreadable,
}

impl RejectReason {
    /// Every reason: each has its `files_rejected` series from the start, at 0.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::Empty,
        RejectReason::NotUtf8,
        RejectReason::Parse,
        RejectReason::Truncated,
        RejectReason::Invalid,
        RejectReason::Oversize,
        RejectReason::Symlink,
        RejectReason::NotRegular,
        RejectReason::BadName,
        RejectReason::Unreadable,
    ];

    /// The metric label / log code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::Parse => "parse",
            RejectReason::Truncated => "truncated",
            RejectReason::Invalid => "invalid",
            RejectReason::Oversize => "oversize",
            RejectReason::Symlink => "symlink",
            RejectReason::NotRegular => "not_regular",
            RejectReason::BadName => "bad_name",
            RejectReason::Unreadable => "unreadable",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Why a file cannot be accepted, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The kind of failure. [`RejectReason::Truncated`] means "maybe still being written": the
    /// watcher retries such a file until it has been unchanged for `settle_ms`.
    pub reason: RejectReason,
    /// At most [`MAX_PROBLEMS`] problems, then one that says how many more there were.
    pub problems: Vec<Problem>,
    /// The well-formed notification ids the file's records name, whether or not the records
    /// are valid (for the log line: a dropper may know its notifications by id, not by file).
    pub ids: NamedIds,
    /// Problems found beyond the listed ones (the last listed says how many).
    pub unlisted: usize,
}

/// How many problems a file has: those listed, and those beyond [`MAX_PROBLEMS`], of which
/// the list's last entry only says how many there are.
pub fn problem_count(listed: &[Problem], unlisted: usize) -> usize {
    if unlisted > 0 {
        listed.len() - 1 + unlisted
    } else {
        listed.len()
    }
}

/// The first [`crate::store::LOGGED_IDS`] well-formed notification ids of a file's records,
/// and how many there were in all; and the apps its records name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedIds {
    pub first: Vec<String>,
    pub total: usize,
    /// The distinct `app` values of the records, in order, at most [`LOGGED_APPS`] (an app
    /// name a config could hold: at most 64 bytes).
    pub apps: Vec<String>,
}

/// How many apps a rejection's log line names.
pub const LOGGED_APPS: usize = 5;

impl Rejection {
    /// A rejection with one problem of the file as a whole.
    pub fn file(reason: RejectReason, message: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            problems: vec![Problem {
                record: None,
                line: None,
                field: None,
                message: message.into(),
            }],
            ids: NamedIds::default(),
            unlisted: 0,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.first() {
            Some(p) if self.problems.len() > 1 => {
                let more = problem_count(&self.problems, self.unlisted) - 1;
                write!(f, "{p} (and {more} more problems)")
            }
            Some(p) => write!(f, "{p}"),
            None => f.write_str(self.reason.code()),
        }
    }
}

impl std::error::Error for Rejection {}

/// A file's validated records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedFile {
    pub records: Vec<Record>,
    pub devices: usize,
    pub notifications: usize,
}

/// Parses and validates a drop file's content against the configured apps.
pub fn parse_file(bytes: &[u8], kind: FileKind, cfg: &Config) -> Result<ParsedFile, Rejection> {
    parse_into(bytes, kind, cfg, None)
}

/// Records handed to [`parse_file_streaming`]'s sink at a time.
pub const STREAM_CHUNK: usize = 2000;

/// Records in the first chunk: the writer, which is slower than the parser, starts as soon
/// as a few records are known to be valid instead of after a whole chunk's parse.
pub const FIRST_STREAM_CHUNK: usize = 250;

/// As [`parse_file`], but while no problem has been found, hands the valid records to `sink`
/// in file order, [`STREAM_CHUNK`] at a time, as they are parsed (so that they can be
/// written while the rest is parsed). On `Ok`, the returned [`ParsedFile`] holds the records
/// not handed over yet (its counts cover the whole file); on `Err`, whatever the sink got
/// must be thrown away.
pub fn parse_file_streaming(
    bytes: &[u8],
    kind: FileKind,
    cfg: &Config,
    sink: &mut dyn FnMut(Vec<Record>),
) -> Result<ParsedFile, Rejection> {
    parse_into(bytes, kind, cfg, Some(sink))
}

fn parse_into<'t>(
    bytes: &'t [u8],
    kind: FileKind,
    cfg: &Config,
    sink: Option<&'t mut dyn FnMut(Vec<Record>)>,
) -> Result<ParsedFile, Rejection> {
    let ctx = Ctx::new(cfg);
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return Err(not_utf8(bytes, e)),
    };
    if is_json_blank(text) {
        return Err(Rejection::file(
            RejectReason::Empty,
            "empty file: it holds no records",
        ));
    }
    let mut acc = Acc::new(text, sink);
    match kind {
        FileKind::Json => parse_json(text, &ctx, &mut acc)?,
        FileKind::Jsonl => parse_jsonl(text, &ctx, &mut acc)?,
    }
    acc.finish()
}

/// The rejection of a file that is not UTF-8, `first` its first bad sequence: every bad
/// sequence is listed (up to [`MAX_PROBLEMS`]), so that a dropper fixes them all at once. A
/// file whose only fault is its end, cut inside a character, was cut off mid-write, like a
/// `.json` that ends early: it waits for `settle_ms` before it is rejected as truncated.
fn not_utf8(bytes: &[u8], first: std::str::Utf8Error) -> Rejection {
    // A UTF-16 file (what some Windows tools write by default) is one problem, said as
    // such, not one per byte that is no UTF-8 (a probe's report listed a thousand).
    if let Some(order) = [([0xFF, 0xFE], "FF FE"), ([0xFE, 0xFF], "FE FF")]
        .into_iter()
        .find_map(|(mark, name)| bytes.starts_with(&mark).then_some(name))
    {
        return Rejection::file(
            RejectReason::NotUtf8,
            format!(
                "the file is UTF-16, not UTF-8 (it starts with the byte-order mark {order}); drop files must be UTF-8: convert it (e.g. iconv -f UTF-16 -t UTF-8)"
            ),
        );
    }
    let mut problems = Vec::new();
    let mut more = 0usize;
    let (mut from, mut line, mut counted) = (0, 1, 0);
    let mut next = Some(first);
    while let Some(e) = next {
        let at = from + e.valid_up_to();
        line += bytes[counted..at].iter().filter(|&&b| b == b'\n').count();
        counted = at;
        let message = match e.error_len() {
            None if problems.is_empty() => {
                return Rejection {
                    reason: RejectReason::Truncated,
                    problems: vec![Problem {
                        record: None,
                        line: Some(line),
                        field: None,
                        message: format!(
                            "ends inside a UTF-8 character at byte offset {at} (line {line}): the file was cut off"
                        ),
                    }],
                    ids: NamedIds::default(),
                    unlisted: 0,
                };
            }
            None => format!("not UTF-8: ends inside a character at byte offset {at} (line {line})"),
            Some(_) => format!(
                "not UTF-8: invalid byte 0x{:02X} at byte offset {at} (line {line}); drop files must be UTF-8",
                bytes.get(at).copied().unwrap_or(0)
            ),
        };
        if problems.len() < MAX_PROBLEMS {
            problems.push(Problem {
                record: None,
                line: Some(line),
                field: None,
                message,
            });
        } else {
            more += 1;
        }
        next = e.error_len().and_then(|n| {
            from = at + n;
            std::str::from_utf8(&bytes[from..]).err()
        });
    }
    if more > 0 {
        problems.push(more_problems(more));
    }
    Rejection {
        reason: RejectReason::NotUtf8,
        problems,
        ids: NamedIds::default(),
        unlisted: more,
    }
}

/// Lookups the record checks need, prepared once per file.
struct Ctx<'c> {
    apps: &'c [AppConfig],
}

impl<'c> Ctx<'c> {
    fn new(cfg: &'c Config) -> Ctx<'c> {
        Ctx { apps: &cfg.apps }
    }

    fn app(&self, name: Option<&str>) -> Result<&'c AppConfig, String> {
        match name {
            Some(n) => self.apps.iter().find(|a| a.name == n).ok_or_else(|| {
                format!(
                    "unknown app \"{}\"; configured: {}",
                    excerpt(n),
                    self.app_names()
                )
            }),
            None if self.apps.len() == 1 => Ok(&self.apps[0]),
            None => Err(format!(
                "missing: {} apps are configured ({}), so every record must name one",
                self.apps.len(),
                self.app_names()
            )),
        }
    }

    fn app_names(&self) -> String {
        let names: Vec<String> = self
            .apps
            .iter()
            .map(|a| format!("\"{}\"", a.name))
            .collect();
        names.join(", ")
    }
}

/// Collects records and problems of one file.
struct Acc<'t> {
    text: &'t str,
    lines: Option<Vec<usize>>,
    parsed: ParsedFile,
    problems: Vec<Problem>,
    more_problems: usize,
    reason: RejectReason,
    /// Takes valid records early (see [`parse_file_streaming`]).
    sink: Option<&'t mut dyn FnMut(Vec<Record>)>,
    /// Records the sink gets next time ([`FIRST_STREAM_CHUNK`], then [`STREAM_CHUNK`]).
    chunk: usize,
    /// The notification ids named so far (for a rejection's log line).
    ids: NamedIds,
}

impl<'t> Acc<'t> {
    fn new(text: &'t str, sink: Option<&'t mut dyn FnMut(Vec<Record>)>) -> Acc<'t> {
        Acc {
            text,
            lines: None,
            parsed: ParsedFile::default(),
            problems: Vec::new(),
            more_problems: 0,
            reason: RejectReason::Invalid,
            sink,
            chunk: FIRST_STREAM_CHUNK,
            ids: NamedIds::default(),
        }
    }

    /// Remembers the id a notification record names, when it is a well-formed one (a bad id
    /// is a problem of its own, and may be anything).
    fn note_id(&mut self, raw: &RawRecord<'_>) {
        if let Some(app) = raw.app.as_deref()
            && app.len() <= 64
            && self.ids.apps.len() < LOGGED_APPS
            && !self.ids.apps.iter().any(|a| a == app)
        {
            self.ids.apps.push(app.to_owned());
        }
        if let (Some("notification"), Some(id)) = (raw.kind.as_deref(), raw.id.as_deref())
            && check_id(id).is_ok()
        {
            if self.ids.first.len() < crate::store::LOGGED_IDS {
                self.ids.first.push(id.to_owned());
            }
            self.ids.total += 1;
        }
    }

    /// 1-based line of a byte offset into the file text (index built on first use: only
    /// failing files pay for it).
    fn line_of_offset(&mut self, offset: usize) -> usize {
        let text = self.text;
        let lines = self.lines.get_or_insert_with(|| {
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect()
        });
        lines.partition_point(|&nl| nl < offset) + 1
    }

    /// Byte offset of a slice of the file text.
    fn offset_of(&self, s: &str) -> Option<usize> {
        let base = self.text.as_ptr() as usize;
        let p = s.as_ptr() as usize;
        (p >= base && p <= base + self.text.len()).then(|| p - base)
    }

    fn push(&mut self, reason: RejectReason, p: Problem) {
        if self.problems.is_empty() || reason_rank(reason) > reason_rank(self.reason) {
            self.reason = reason;
        }
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        } else {
            self.more_problems += 1;
        }
    }

    fn record(&mut self, r: Record) {
        match r {
            Record::Device(_) => self.parsed.devices += 1,
            Record::Notification(_) => self.parsed.notifications += 1,
        }
        self.parsed.records.push(r);
        if self.parsed.records.len() >= self.chunk
            && self.problems.is_empty()
            && let Some(sink) = self.sink.as_mut()
        {
            sink(std::mem::replace(
                &mut self.parsed.records,
                Vec::with_capacity(STREAM_CHUNK),
            ));
            self.chunk = STREAM_CHUNK;
        }
    }

    fn finish(mut self) -> Result<ParsedFile, Rejection> {
        if self.problems.is_empty() {
            return Ok(self.parsed);
        }
        if self.more_problems > 0 {
            self.problems.push(more_problems(self.more_problems));
        }
        Err(Rejection {
            reason: self.reason,
            problems: self.problems,
            ids: self.ids,
            unlisted: self.more_problems,
        })
    }
}

/// The last line of a report that lists [`MAX_PROBLEMS`] problems and found more.
fn more_problems(n: usize) -> Problem {
    Problem {
        record: None,
        line: None,
        field: None,
        message: format!("… and {n} more problems not listed (only the first {MAX_PROBLEMS} are)"),
    }
}

/// Which reason names a file with several kinds of problem: the most fundamental one.
fn reason_rank(r: RejectReason) -> u8 {
    match r {
        RejectReason::Invalid => 0,
        RejectReason::Parse => 1,
        RejectReason::Truncated => 2,
        _ => 3,
    }
}

fn parse_json<'t>(text: &'t str, ctx: &Ctx<'_>, acc: &mut Acc<'t>) -> Result<(), Rejection> {
    let first = text
        .trim_start_matches(JSON_WHITESPACE)
        .as_bytes()
        .first()
        .copied();
    // First the syntax of the whole file, the array's items counted but not kept (an array
    // of 20 million `{}` held as a list took 16 bytes an item, twice over while it grew): a
    // file that ends early is waited for before any record is looked at.
    let mut items = 0;
    let mut object: Option<&'t RawValue> = None;
    let mut de = serde_json::Deserializer::from_str(text);
    // Whether the array itself was read whole (an error after it is the file's, not a
    // record's).
    let mut array_done = false;
    let res = match first {
        Some(b'[') => de
            .deserialize_seq(EachItem(&mut |_, _| {
                items += 1;
                ControlFlow::Continue(())
            }))
            .and_then(|_| {
                array_done = true;
                de.end()
            }),
        Some(b'{') => <&RawValue>::deserialize(&mut de).and_then(|v| {
            object = Some(v);
            de.end()
        }),
        _ => {
            // `42` or `"x"` is JSON, only not a record: §2's rule, not the syntax, is broken.
            let json = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
            return Err(Rejection {
                reason: if json {
                    RejectReason::Invalid
                } else {
                    RejectReason::Parse
                },
                problems: vec![Problem {
                    record: None,
                    line: Some(1),
                    field: None,
                    message: format!(
                        "a .json file holds one JSON object or an array of objects{}",
                        invisible_hint(text)
                    ),
                }],
                ids: NamedIds::default(),
                unlisted: 0,
            });
        }
    };
    if let Err(e) = res {
        let (reason, what) = if e.classify() == serde_json::error::Category::Eof {
            (
                RejectReason::Truncated,
                "the file ends early (truncated JSON)",
            )
        } else {
            (RejectReason::Parse, "JSON syntax error")
        };
        return Err(Rejection {
            reason,
            problems: vec![Problem {
                // In the array (not after it), or in the file's one object (not after it).
                record: if first == Some(b'[') {
                    (!array_done).then_some(items)
                } else {
                    object.is_none().then_some(0)
                },
                line: Some(e.line()),
                field: None,
                message: format!(
                    "{what}: {} (line {}, column {}){}",
                    serde_message(&e),
                    e.line(),
                    e.column(),
                    invisible_hint(text)
                ),
            }],
            ids: NamedIds::default(),
            unlisted: 0,
        });
    }
    if let Some(v) = object {
        record(v.get(), 0, None, ctx, acc);
        return Ok(());
    }
    // Then the records, one item at a time. The syntax passed above, so this reads to the
    // end; were it to stop short, the file is refused, not taken in part.
    for_each_item(text, &mut |index, raw| {
        record(raw.get(), index, None, ctx, acc)
    })
    .map_err(|e| {
        Rejection::file(
            RejectReason::Parse,
            format!("JSON syntax error: {}", serde_message(&e)),
        )
    })
}

/// JSON's whitespace: space, tab, line feed, carriage return. Not Unicode's: a line of
/// no-break spaces is not a blank line but an error.
const JSON_WHITESPACE: [char; 4] = [' ', '\t', '\n', '\r'];

fn is_json_blank(text: &str) -> bool {
    text.trim_matches(JSON_WHITESPACE).is_empty()
}

fn parse_jsonl<'t>(text: &'t str, ctx: &Ctx<'_>, acc: &mut Acc<'t>) -> Result<(), Rejection> {
    let mut index = 0;
    let ends_with_newline = text.ends_with('\n');
    let mut lines = text.split('\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if is_json_blank(line) {
            continue;
        }
        let last_unterminated = lines.peek().is_none() && !ends_with_newline;
        record(line, index, Some((i + 1, last_unterminated)), ctx, acc);
        index += 1;
    }
    if index == 0 {
        return Err(Rejection::file(
            RejectReason::Empty,
            "empty file: it holds only blank lines",
        ));
    }
    Ok(())
}

/// Parses and checks one record; `jsonl` carries its line and whether it is the file's last
/// line without a newline (a syntax error there may just mean "still being written").
fn record<'t>(
    text: &'t str,
    index: usize,
    jsonl: Option<(usize, bool)>,
    ctx: &Ctx<'_>,
    acc: &mut Acc<'t>,
) {
    // Fast path: typed deserialization, then the semantic checks.
    let mut problems = Vec::new();
    if let Ok(ObjectOnly(mut raw)) = serde_json::from_str::<ObjectOnly<RawRecord<'t>>>(text) {
        raw.nulls = null_keys(text);
        acc.note_id(&raw);
        if let Some(r) = check(&raw, &HashSet::new(), ctx, &mut problems)
            && problems.is_empty()
        {
            acc.record(r);
            return;
        }
        if problems.is_empty() {
            // Unreachable by construction; never drop a record silently.
            problems.push(fp("type", "the record could not be validated"));
        }
    } else {
        problems.clear();
        // Slow path: field by field, every problem.
        match slow_path(text) {
            Ok((raw, bad, mut field_problems)) => {
                acc.note_id(&raw);
                problems.append(&mut field_problems);
                check(&raw, &bad, ctx, &mut problems);
            }
            Err(e) => {
                let eof = e.classify() == serde_json::error::Category::Eof;
                // Valid JSON, wrong shape: an array or a number where a record should be.
                let shape = e.classify() == serde_json::error::Category::Data
                    && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
                let reason = match jsonl {
                    Some((_, true)) if eof => RejectReason::Truncated,
                    // Valid JSON that is no object breaks §2's rules, like a bad field.
                    _ if shape => RejectReason::Invalid,
                    _ => RejectReason::Parse,
                };
                let line = match jsonl {
                    Some((l, _)) => l,
                    None => {
                        let start = acc.offset_of(text).unwrap_or(0);
                        acc.line_of_offset(start) + e.line() - 1
                    }
                };
                let message = if shape {
                    "a record must be a JSON object".to_string()
                } else if eof {
                    format!(
                        "the record ends early: {} (column {})",
                        serde_message(&e),
                        e.column()
                    )
                } else {
                    format!(
                        "JSON syntax error: {} (column {}){}",
                        serde_message(&e),
                        e.column(),
                        invisible_hint(text)
                    )
                };
                acc.push(
                    reason,
                    Problem {
                        record: Some(index),
                        line: Some(line),
                        field: None,
                        message,
                    },
                );
                return;
            }
        }
    }
    // Problems found: locate them (a `.jsonl` record is one line, but its fields still have
    // an order).
    let fields = entries(text).ok();
    let mut read = ReadValues::default();
    let start = acc.offset_of(text).unwrap_or(0);
    let record_line = match jsonl {
        Some((l, _)) => l,
        None => acc.line_of_offset(start),
    };
    let mut located: Vec<(usize, usize, FieldProblem)> = problems
        .into_iter()
        .map(|p| {
            let at = match (&fields, &p.field) {
                (Some(entries), Some(field)) => locate(entries, field, &mut read)
                    .and_then(|v| acc.offset_of(v.get()))
                    .unwrap_or(start),
                _ => start,
            };
            let line = match jsonl {
                Some(_) => record_line,
                None => acc.line_of_offset(at),
            };
            (line, at, p)
        })
        .collect();
    // In the order of the file, as a reader goes through it (the checks go field by field);
    // what belongs to no one field (a field left out) first.
    located.sort_by_key(|(line, at, _)| (*line, *at));
    for (line, _, p) in located {
        acc.push(
            RejectReason::Invalid,
            Problem {
                record: Some(index),
                line: Some(line),
                field: p.field,
                message: sanitize(&p.message),
            },
        );
        acc.more_problems += p.more;
    }
}

/// For a syntax error: characters a dropper cannot see in an editor, said by name.
fn invisible_hint(text: &str) -> &'static str {
    if text.contains('\u{feff}') {
        "; it holds a byte-order mark (U+FEFF), which is taken only as the file's very first \
         character (two of them, or one after a space, are not)"
    } else if text.contains('\0') {
        "; it holds a NUL byte"
    } else {
        ""
    }
}

/// A problem before it knows its record and line.
struct FieldProblem {
    field: Option<String>,
    message: String,
    /// Problems of the same record found after this one and not kept (see
    /// [`push_item_problem`]): counted, not listed.
    more: usize,
}

fn fp(field: impl Into<String>, message: impl Into<String>) -> FieldProblem {
    let field = field.into();
    FieldProblem {
        field: Some(short_path(&field).into_owned()),
        message: message.into(),
        more: 0,
    }
}

/// A problem of one item of a list (`to.tokens`, `to.users`), whose count only the file's
/// size bounds: a record keeps at most [`MAX_PROBLEMS`], as many as its file's report lists,
/// and counts the rest on the last one kept. (A `to.tokens` of four million non-strings made
/// four million problems, 1.2 GB, a probe's finding.)
fn push_item_problem(problems: &mut Vec<FieldProblem>, p: impl FnOnce() -> FieldProblem) {
    if problems.len() < MAX_PROBLEMS {
        problems.push(p());
    } else if let Some(last) = problems.last_mut() {
        last.more += 1;
    }
}

/// A field path with every key in it cut to an excerpt: a report never echoes a long piece
/// of the file, and a key is a piece of the file.
fn short_path(path: &str) -> Cow<'_, str> {
    if path.split('.').all(|k| k.chars().count() <= EXCERPT_CHARS) {
        return Cow::Borrowed(path);
    }
    Cow::Owned(path.split('.').map(excerpt).collect::<Vec<_>>().join("."))
}

/// A record as it appears in the file, every field optional; [`check`] turns it into a
/// [`Record`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    app: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    environment: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "object_only")]
    to: Option<RawTarget<'a>>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    push_type: Option<Cow<'a, str>>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    collapse_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    expiration: Option<TimeRaw<'a>>,
    #[serde(borrow, default)]
    send_at: Option<TimeRaw<'a>>,
    /// The keys given as `null`, which the fields above cannot tell from absent ones: a
    /// field of the other type of record is unknown however it is given ([`null_keys`]).
    #[serde(skip)]
    nulls: Vec<Cow<'a, str>>,
}

/// The keys of a record whose value is `null` (looked for only when the text holds `null`).
fn null_keys(text: &str) -> Vec<Cow<'_, str>> {
    if !text.contains("null") {
        return Vec::new();
    }
    entries(text)
        .map(|fields| {
            fields
                .into_iter()
                .filter(|(_, v)| v.get().trim() == "null")
                .map(|(k, _)| k)
                .collect()
        })
        .unwrap_or_default()
}

const DEVICE_FIELDS: &[&str] = &["type", "app", "token", "user", "environment", "action"];
const NOTIFICATION_FIELDS: &[&str] = &[
    "type",
    "id",
    "app",
    "to",
    "payload",
    "push_type",
    "priority",
    "topic",
    "collapse_id",
    "expiration",
    "send_at",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget<'a> {
    #[serde(borrow, default)]
    tokens: Option<Items<'a>>,
    #[serde(borrow, default)]
    users: Option<Items<'a>>,
    #[serde(default)]
    all: Option<bool>,
    /// The items of `tokens` (0) and `users` (1) that [`slow_target`] already reported (no
    /// strings, or strings [`check_target`] refuses) and left out of the list, as runs of
    /// indices in increasing order: a list of millions of bad items is one run, not millions
    /// of placeholders.
    #[serde(skip)]
    reported: [Vec<std::ops::Range<usize>>; 2],
    /// How many of `tokens`, `users` and `all` were given but could not be read (reported):
    /// given all the same.
    #[serde(skip)]
    unreadable: usize,
}

/// What a field that must be a JSON object is expected to look like, for the error message.
trait ObjectShape {
    const EXPECTING: &'static str;
}

impl ObjectShape for RawRecord<'_> {
    const EXPECTING: &'static str = "a JSON object";
}

impl ObjectShape for RawTarget<'_> {
    const EXPECTING: &'static str =
        "an object: {\"tokens\": [...]}, {\"users\": [...]} or {\"all\": true}";
}

/// A record, or its `to`, read from a JSON object only. serde's derived structs also take an
/// array and read its items by position, so `"to": [null, null, true]` would pass as a
/// broadcast: a typo must not.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de> + ObjectShape> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de> + ObjectShape> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(T::EXPECTING)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// `#[serde(deserialize_with)]` for an optional object-only field.
fn object_only<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + ObjectShape,
{
    Option::<ObjectOnly<T>>::deserialize(d).map(|o| o.map(|o| o.0))
}

/// `expiration` / `send_at`: RFC 3339 text or whole UNIX seconds.
#[derive(Debug)]
enum TimeRaw<'a> {
    Secs(i64),
    Text(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for TimeRaw<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TimeRaw<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 date-time string or whole UNIX seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(TimeRaw::Secs(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(TimeRaw::Secs)
                    .map_err(|_| E::custom("UNIX seconds out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                // JSON's text (1e9, 1.5, -0, which serde_json reads as a float too) is gone
                // by now: say how it was read.
                Err(E::custom(format!(
                    "a number written with a fraction, an exponent or a minus zero, or too large (read as {v:?}): UNIX seconds are a JSON integer such as 1893456000"
                )))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TimeRaw::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TimeRaw::Text(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

/// Hands the items of a JSON array to a closure one at a time, with their index, holding
/// none of them: the one reading of the arrays whose length a drop file chooses (its
/// records, a target list, a list a problem is placed in). The closure may stop the reading
/// (`Break`), which leaves the array unfinished; the value is whether every item was handed
/// over.
struct EachItem<'e, 'a>(&'e mut dyn FnMut(usize, &'a RawValue) -> ControlFlow<()>);

impl<'a> Visitor<'a> for EachItem<'_, 'a> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }
    fn visit_seq<A: SeqAccess<'a>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut i = 0;
        while let Some(item) = seq.next_element::<&'a RawValue>()? {
            if (self.0)(i, item).is_break() {
                return Ok(false);
            }
            i += 1;
        }
        Ok(true)
    }
}

/// The value a field path names in a record (`to.tokens[1]`: the second token), followed as
/// deep as the record goes, so that a problem is reported on the line of the offending value
/// rather than of its top-level field. A key that appears twice names its last appearance,
/// where a duplicate is reported.
/// `read` keeps the objects and arrays already read, by where their text starts: a list of
/// 100,000 bad tokens is read once, not once per token.
fn locate<'t>(
    entries: &[(Cow<'t, str>, &'t RawValue)],
    path: &str,
    read: &mut ReadValues<'t>,
) -> Option<&'t RawValue> {
    // A long key is in the path as an excerpt (see `short_path`).
    let last = |entries: &[(Cow<'t, str>, &'t RawValue)], key: &str| {
        let matches = |k: &str| match key.strip_suffix('…') {
            Some(start) => k.starts_with(start) && k.chars().count() > EXCERPT_CHARS,
            None => k == key,
        };
        entries
            .iter()
            .rev()
            .find(|(k, _)| matches(k))
            .map(|(_, v)| *v)
    };
    let mut keys = path.split('.');
    let (top, top_index) = split_index(keys.next()?);
    let mut at = index_into(last(entries, top)?, top_index, read);
    for key in keys {
        let (key, index) = split_index(key);
        let object = read
            .objects
            .entry(at.get().as_ptr() as usize)
            .or_insert_with(|| entries_of(at).unwrap_or_default());
        let Some(next) = last(object, key) else {
            break;
        };
        at = index_into(next, index, read);
    }
    Some(at)
}

/// `tokens[1][2]` → (`tokens`, `[1][2]`).
fn split_index(key: &str) -> (&str, &str) {
    key.find('[').map_or((key, ""), |i| key.split_at(i))
}

/// Follows `[n]` steps into arrays as far as they go.
/// The objects' entries and the arrays' items [`locate`] has read, by where their text starts.
#[derive(Default)]
struct ReadValues<'t> {
    objects: HashMap<usize, Vec<(Cow<'t, str>, &'t RawValue)>>,
    /// The first items of each array read (as many as asked so far, about twice), and
    /// whether they are all of it: a list of millions whose first few items are located is
    /// not held whole.
    arrays: HashMap<usize, (Vec<&'t RawValue>, bool)>,
}

fn index_into<'t>(mut v: &'t RawValue, indexes: &str, read: &mut ReadValues<'t>) -> &'t RawValue {
    for n in indexes
        .split(['[', ']'])
        .filter(|s| !s.is_empty())
        .map_while(|s| s.parse::<usize>().ok())
    {
        let (items, whole) = read.arrays.entry(v.get().as_ptr() as usize).or_default();
        if n >= items.len() && !*whole {
            // Read again from the start, twice as far: the reading adds up to a few times
            // the furthest item asked for.
            let want = (n + 1).max(items.len() * 2).max(64);
            items.clear();
            *whole = first_items(v, items, want);
        }
        match items.get(n).copied() {
            Some(e) => v = e,
            None => break,
        }
    }
    v
}

/// Reads the first `want` items of `v` (when it is an array) into `out`; true when they
/// are all its items.
fn first_items<'t>(v: &'t RawValue, out: &mut Vec<&'t RawValue>, want: usize) -> bool {
    let mut de = serde_json::Deserializer::from_str(v.get());
    // Stopping short leaves the array unfinished, which serde reports as an error: what was
    // read is kept all the same.
    (&mut de)
        .deserialize_seq(EachItem(&mut |_, item| {
            out.push(item);
            if out.len() < want {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        }))
        .unwrap_or(false)
}

/// The entries of a value that is an object.
fn entries_of(v: &RawValue) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    v.get()
        .trim_start()
        .starts_with('{')
        .then(|| entries(v.get()).ok())?
}

/// A record's keys in file order, duplicates kept, values unparsed.
fn entries(text: &str) -> Result<Vec<(Cow<'_, str>, &RawValue)>, serde_json::Error> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(k) = map.next_key::<CowStr<'de>>()? {
                let v = map.next_value::<&'de RawValue>()?;
                out.push((k.0, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let out = de.deserialize_map(Entries)?;
    de.end()?;
    Ok(out)
}

/// The most items of one `to.tokens` or `to.users` list. A longer list would cost memory by
/// the item, whatever its size (a probe's 60 MB list of 15 million one-character users took
/// 1.7 GB); a notification for more devices is several notifications, or a broadcast to
/// registered devices.
pub const MAX_TARGET_ITEMS: usize = 1_000_000;

fn too_many_items(n: usize) -> String {
    format!(
        "lists {n} items; at most {MAX_TARGET_ITEMS} per notification: split it into several \
         notifications (each with its own id), or register the devices and send to \
         {{\"all\": true}}"
    )
}

/// A `to.tokens` or `to.users` list as the fast path reads it: past [`MAX_TARGET_ITEMS`]
/// items it stops with an error, at once, and the slow path says why (see
/// [`slow_target`]), instead of reading millions first.
#[derive(Debug, Default)]
struct Items<'a>(Vec<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Items<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Items<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(s) = seq.next_element::<CowStr<'de>>()? {
                    if out.len() == MAX_TARGET_ITEMS {
                        return Err(de::Error::custom("too many items"));
                    }
                    out.push(s.0);
                }
                Ok(Items(out))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// A string borrowed from the input when it has no escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Deserializes one field value, reporting the failing path below `key`.
fn field_value<'a, T: Deserialize<'a>>(
    key: &str,
    v: &'a RawValue,
    problems: &mut Vec<FieldProblem>,
) -> Option<T> {
    let mut de = serde_json::Deserializer::from_str(v.get());
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let inner = serde_message(e.inner());
            let base = if path == "." {
                key.to_string()
            } else if path.starts_with('[') {
                format!("{key}{path}")
            } else {
                format!("{key}.{path}")
            };
            problems.push(serde_problem(&base, &inner));
            None
        }
    }
}

/// [`field_value`] for an optional field: `null` is the field left out, as on the fast path.
fn optional<'a, T: Deserialize<'a>>(
    key: &str,
    v: &'a RawValue,
    problems: &mut Vec<FieldProblem>,
) -> Option<T> {
    if v.get().trim_matches(JSON_WHITESPACE) == "null" {
        return None;
    }
    field_value(key, v, problems)
}

/// Turns serde's wording into a problem, pulling the field name out of
/// "unknown field `x`" / "duplicate field `x`" messages.
fn serde_problem(base: &str, inner: &str) -> FieldProblem {
    let named = |prefix: &str| -> Option<String> {
        let rest = inner.strip_prefix(prefix)?;
        let end = rest.find('`')?;
        Some(rest[..end].to_string())
    };
    if let Some(name) = named("unknown field `") {
        return fp(
            join(base, &name),
            format!("unknown field \"{}\"", excerpt(&name)),
        );
    }
    if let Some(name) = named("duplicate field `") {
        return fp(
            join(base, &name),
            format!("duplicate key \"{}\"", excerpt(&name)),
        );
    }
    match plain_type_error(inner) {
        Some(said) => fp(base, said),
        // A broken `\u` escape is the string's text, not its type.
        None if inner.contains("escape") => fp(base, format!("cannot be read: {inner}")),
        None => fp(base, format!("wrong type: {inner}")),
    }
}

/// serde's "invalid type: integer `5`, expected a string" in plain words: "must be a
/// string, not the number 5". A number too large for a whole number (or written with a
/// fraction) reaches serde as a float, which it prints rewritten (`1e+20`): said so.
fn plain_type_error(inner: &str) -> Option<String> {
    let (got, want) = inner
        .strip_prefix("invalid type: ")?
        .rsplit_once(", expected ")?;
    let quoted = |prefix: &str| {
        got.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix('`'))
            .map(str::to_string)
    };
    let got = if let Some(n) = quoted("integer `") {
        format!("the number {n}")
    } else if let Some(n) = quoted("floating point `") {
        if want.contains("whole number") {
            format!(
                "a number with a fraction or an exponent, or too large for a whole one (read as {n})"
            )
        } else {
            format!("the number {n}")
        }
    } else if let Some(b) = quoted("boolean `") {
        b
    } else {
        match got {
            "map" => "an object".into(),
            "sequence" => "an array".into(),
            "unit value" => "null".into(),
            other if other.starts_with("string ") => format!("the {other}"),
            other => other.to_string(),
        }
    };
    // serde's names of JSON's kinds, in JSON's words.
    let want = match want {
        "a sequence" => "an array",
        "a map" => "an object",
        w => w,
    };
    Some(format!("must be {want}, not {got}"))
}

/// The path of field `name` under `base`; serde's path of an unknown or duplicate field
/// already ends with the field itself.
fn join(base: &str, name: &str) -> String {
    if base.is_empty() || base == "." {
        name.to_string()
    } else if base == name || base.ends_with(&format!(".{name}")) {
        base.to_string()
    } else {
        format!("{base}.{name}")
    }
}

/// The slow path: reads a record's fields one by one, so every bad field is reported, and
/// returns what could be read, the names of fields present but unreadable, and the problems.
#[allow(clippy::type_complexity)]
fn slow_path(
    text: &str,
) -> Result<(RawRecord<'_>, HashSet<String>, Vec<FieldProblem>), serde_json::Error> {
    let fields = entries(text)?;
    let mut raw = RawRecord::default();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut bad = HashSet::new();
    let mut problems = Vec::new();
    for (k, v) in &fields {
        let key: &str = k;
        if !seen.insert(key) {
            problems.push(fp(key, format!("duplicate key \"{}\"", excerpt(key))));
            bad.insert(key.to_string());
            continue;
        }
        let before = problems.len();
        if v.get().trim() == "null" {
            raw.nulls.push(k.clone());
        }
        let p = &mut problems;
        match key {
            "type" => raw.kind = optional(key, v, p),
            "app" => raw.app = optional(key, v, p),
            "token" => raw.token = optional(key, v, p),
            "user" => raw.user = optional(key, v, p),
            "environment" => raw.environment = optional(key, v, p),
            "action" => raw.action = optional(key, v, p),
            "id" => raw.id = optional(key, v, p),
            "to" => raw.to = slow_target(v, p),
            "payload" => raw.payload = optional(key, v, p),
            "push_type" => raw.push_type = optional(key, v, p),
            "priority" => raw.priority = optional(key, v, p),
            "topic" => raw.topic = optional(key, v, p),
            "collapse_id" => raw.collapse_id = optional(key, v, p),
            "expiration" => raw.expiration = optional(key, v, p),
            "send_at" => raw.send_at = optional(key, v, p),
            _ => {
                let mut msg = format!("unknown field \"{}\"", excerpt(key));
                if let Some(s) = suggestion(key, raw.kind.as_deref()) {
                    msg.push_str(&format!("; did you mean \"{s}\"?"));
                }
                problems.push(fp(key, msg));
            }
        }
        if problems.len() > before {
            bad.insert(key.to_string());
        }
    }
    Ok((raw, bad, problems))
}

/// `to` read key by key, as [`slow_path`] reads a record: every unknown or duplicate key is a
/// problem of its own, and so is every item of `tokens` or `users` that is no string, the
/// other items still checked by [`check_target`] (serde's reading stops at the first).
fn slow_target<'a>(v: &'a RawValue, problems: &mut Vec<FieldProblem>) -> Option<RawTarget<'a>> {
    let Some(fields) = entries_of(v) else {
        // Not an object (or `null`, the field left out): said as the fast path says it.
        return optional::<ObjectOnly<_>>("to", v, problems).map(|o| o.0);
    };
    let mut to = RawTarget::default();
    let mut seen = HashSet::new();
    for (k, v) in &fields {
        let key: &str = k;
        let path = format!("to.{key}");
        if !seen.insert(key) {
            problems.push(fp(path, format!("duplicate key \"{}\"", excerpt(key))));
            continue;
        }
        match key {
            "tokens" | "users" => {
                if !v.get().trim_start_matches(JSON_WHITESPACE).starts_with('[') {
                    // Not a list: said in serde's words, as on the fast path.
                    let _ = field_value::<Vec<&RawValue>>(&path, v, problems);
                    to.unreadable += 1;
                    continue;
                }
                let mut list = Vec::new();
                let reported = &mut to.reported[usize::from(key == "users")];
                let mut items = 0;
                // One item at a time: a list of millions is checked without being held twice.
                let read = for_each_item(v.get(), &mut |i, item| {
                    items = i + 1;
                    if i >= MAX_TARGET_ITEMS {
                        // Counted only: the list is refused whole below.
                        return;
                    }
                    // Anything but a string is a problem, worded by serde while the record
                    // keeps problems, then only counted (wording millions took seconds).
                    let read = if item.get().starts_with('"') || problems.len() < MAX_PROBLEMS {
                        let mut found = Vec::new();
                        let at = format!("{path}[{i}]");
                        let read = field_value::<Cow<'a, str>>(&at, item, &mut found);
                        for p in found {
                            push_item_problem(problems, || p);
                        }
                        read
                    } else {
                        push_item_problem(problems, || {
                            fp(format!("{path}[{i}]"), "must be a string")
                        });
                        None
                    };
                    // A string [`check_target`] would refuse is reported here and not kept
                    // either: a record on this path has problems, and a list of millions of
                    // bad items must not be held to be looked at again.
                    let read = read.filter(|s| {
                        let said = if key == "tokens" {
                            check_token(s).err()
                        } else {
                            user_item_problem(s)
                        };
                        said.map(|m| push_item_problem(problems, || fp(format!("{path}[{i}]"), m)))
                            .is_none()
                    });
                    match read {
                        Some(s) => list.push(s),
                        // Its index is kept, so the others' problems name theirs.
                        None => match reported.last_mut() {
                            Some(run) if run.end == i => run.end += 1,
                            _ => reported.push(i..i + 1),
                        },
                    }
                });
                if let Err(e) = read {
                    problems.push(serde_problem(&path, &serde_message(&e)));
                    to.unreadable += 1;
                    continue;
                }
                if items > MAX_TARGET_ITEMS {
                    problems.push(fp(path, too_many_items(items)));
                    to.unreadable += 1;
                    continue;
                }
                if key == "tokens" {
                    to.tokens = Some(Items(list));
                } else {
                    to.users = Some(Items(list));
                }
            }
            "all" => {
                to.all = field_value(&path, v, problems);
                to.unreadable += usize::from(to.all.is_none());
            }
            _ => {
                let mut msg = format!("unknown field \"{}\"", excerpt(key));
                let hint = match key.to_ascii_lowercase().replace('-', "_").as_str() {
                    "device_tokens" | "devices" => Some("tokens"),
                    "user_ids" => Some("users"),
                    "broadcast" => Some("all"),
                    _ => closest(key, ["tokens", "users", "all"].into_iter()),
                };
                if let Some(s) = hint {
                    msg.push_str(&format!("; did you mean \"{s}\"?"));
                }
                problems.push(fp(path, msg));
            }
        }
    }
    Some(to)
}

/// The known field closest to a misspelt one, if it is close; or the field a common other
/// name (`expiry`, `ttl`) stands for.
fn suggestion(key: &str, kind: Option<&str>) -> Option<&'static str> {
    const OTHER_NAMES: &[(&str, &str)] = &[
        ("expiry", "expiration"),
        ("expires", "expiration"),
        ("expires_at", "expiration"),
        ("expire_at", "expiration"),
        ("ttl", "expiration"),
        ("apns_expiration", "expiration"),
        ("schedule", "send_at"),
        ("scheduled_at", "send_at"),
        ("deliver_at", "send_at"),
        ("tokens", "to"),
        ("target", "to"),
        ("aps", "payload"),
        ("device_token", "token"),
        ("devicetoken", "token"),
        ("user_id", "user"),
        ("userid", "user"),
        ("expiration_date", "expiration"),
        ("apns_collapse_id", "collapse_id"),
        ("collapse_key", "collapse_id"),
        ("apns_topic", "topic"),
        ("apns_push_type", "push_type"),
        ("apns_priority", "priority"),
        ("bundle_id", "app"),
    ];
    // `apns-expiration`, as the header is named, is `apns_expiration` here.
    let lower = key.to_ascii_lowercase().replace('-', "_");
    let field = match OTHER_NAMES.iter().find(|(k, _)| *k == lower) {
        Some((_, f)) => Some(*f),
        None => closest(
            key,
            DEVICE_FIELDS.iter().chain(NOTIFICATION_FIELDS).copied(),
        ),
    };
    // Only a field of the record's own type (when its `type` came first): a notification
    // names its devices in `to`, a device record has no `to`.
    match (kind, field) {
        (Some("notification"), Some(f)) if !NOTIFICATION_FIELDS.contains(&f) => {
            matches!(f, "token" | "user").then_some("to")
        }
        (Some("device"), Some(f)) if !DEVICE_FIELDS.contains(&f) => None,
        (_, f) => f,
    }
}

/// The one of `known` closest to `key`, if it is close (or `key` abbreviates it).
fn closest(key: &str, known: impl Iterator<Item = &'static str> + Clone) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    let key = key.to_ascii_lowercase();
    let known = || known.clone();
    // Close, for its length: "tokn" is "token", but "foo" is not "to".
    known()
        .map(|f| (distance(&key, f), f))
        .filter(|(d, _)| *d <= 2 && d * 2 <= key.chars().count())
        .min()
        .map(|(_, f)| f)
        // Abbreviations: "prio" for "priority", "env" for "environment".
        .or_else(|| known().find(|f| key.len() >= 3 && f.starts_with(key.as_str())))
}

/// The semantic checks of SPEC §2. `bad` names fields that were present but unreadable (no
/// "missing" complaint for them). Returns the record when no problem was found in it.
fn check(
    raw: &RawRecord<'_>,
    bad: &HashSet<String>,
    ctx: &Ctx<'_>,
    problems: &mut Vec<FieldProblem>,
) -> Option<Record> {
    let before = problems.len();
    let kind = match raw.kind.as_deref() {
        Some("device") => "device",
        Some("notification") => "notification",
        Some(other) => {
            problems.push(fp(
                "type",
                format!(
                    "must be \"device\" or \"notification\", not \"{}\"",
                    excerpt(other)
                ),
            ));
            return None;
        }
        None if bad.contains("type") => return None,
        None => {
            problems.push(fp(
                "type",
                "missing: every record needs \"type\": \"device\" or \"notification\"",
            ));
            return None;
        }
    };
    let app = match ctx.app(raw.app.as_deref()) {
        Ok(a) => Some(a),
        Err(msg) => {
            if !bad.contains("app") {
                problems.push(fp("app", msg));
            }
            None
        }
    };
    let record = if kind == "device" {
        check_device(raw, bad, app, problems)
    } else {
        check_notification(raw, bad, app, problems)
    };
    if problems.len() > before {
        None
    } else {
        record
    }
}

fn wrong_kind_fields(
    raw: &RawRecord<'_>,
    kind: &str,
    fields: &[&str],
    problems: &mut Vec<FieldProblem>,
) {
    let present = [
        ("token", raw.token.is_some()),
        ("user", raw.user.is_some()),
        ("environment", raw.environment.is_some()),
        ("action", raw.action.is_some()),
        ("id", raw.id.is_some()),
        ("to", raw.to.is_some()),
        ("payload", raw.payload.is_some()),
        ("push_type", raw.push_type.is_some()),
        ("priority", raw.priority.is_some()),
        ("topic", raw.topic.is_some()),
        ("collapse_id", raw.collapse_id.is_some()),
        ("expiration", raw.expiration.is_some()),
        ("send_at", raw.send_at.is_some()),
    ];
    for (name, is) in present {
        let is = is || raw.nulls.iter().any(|k| k == name);
        if is && !fields.contains(&name) {
            problems.push(fp(
                name,
                format!(
                    "unknown field \"{name}\" for a {kind} record (its fields: {})",
                    fields.join(", ")
                ),
            ));
        }
    }
}

fn check_device(
    raw: &RawRecord<'_>,
    bad: &HashSet<String>,
    app: Option<&AppConfig>,
    problems: &mut Vec<FieldProblem>,
) -> Option<Record> {
    wrong_kind_fields(raw, "device", DEVICE_FIELDS, problems);
    let token = match raw.token.as_deref() {
        Some(t) => match check_token(t) {
            Ok(t) => Some(t),
            Err(m) => {
                problems.push(fp("token", m));
                None
            }
        },
        None if bad.contains("token") => None,
        None => {
            problems.push(fp("token", "missing: a device record needs a token"));
            None
        }
    };
    let user = match raw.user.as_deref() {
        Some(u) => check_user(u).map_err(|m| problems.push(fp("user", m))).ok(),
        None => None,
    };
    let environment = match raw.environment.as_deref() {
        None => app.map(|a| a.environment),
        Some(e) => match Environment::parse(e) {
            Some(e) => Some(e),
            None => {
                problems.push(fp(
                    "environment",
                    format!(
                        "must be \"production\" or \"sandbox\", not \"{}\"",
                        excerpt(e)
                    ),
                ));
                None
            }
        },
    };
    let action = match raw.action.as_deref() {
        None | Some("register") => Some(DeviceAction::Register),
        Some("unregister") => Some(DeviceAction::Unregister),
        Some(a) => {
            problems.push(fp(
                "action",
                format!(
                    "must be \"register\" or \"unregister\", not \"{}\"",
                    excerpt(a)
                ),
            ));
            None
        }
    };
    Some(Record::Device(DeviceRecord {
        app: app?.name.clone(),
        token: token?,
        user: user.flatten(),
        environment: environment?,
        action: action?,
    }))
}

/// The longest user id (a device's `user`, and each of `to.users`).
const MAX_USER_BYTES: usize = 1024;

fn check_user(u: &str) -> Result<Option<String>, String> {
    if u.is_empty() {
        return Err("must not be empty (leave \"user\" out instead)".into());
    }
    match user_problem(u) {
        Some(said) => Err(said),
        None => Ok(Some(u.to_string())),
    }
}

/// What makes one of `to.users` unusable. No device can have it: a device's user is held to
/// the same rules.
fn user_item_problem(u: &str) -> Option<String> {
    if u.is_empty() {
        return Some("must not be empty".into());
    }
    user_problem(u)
}

/// What makes a non-empty user id unusable, the same for a device's `user` and each of
/// `to.users` (a target no device can have would reach nobody, in silence). A control
/// character (NUL, a newline, an escape) is refused: the id is the dropping system's key,
/// and `devices --user`, `show` and the logs must be able to name it.
fn user_problem(u: &str) -> Option<String> {
    if u.len() > MAX_USER_BYTES {
        return Some(format!(
            "is {} bytes long; at most {MAX_USER_BYTES}",
            u.len()
        ));
    }
    let (at, c) = u.char_indices().find(|(_, c)| c.is_control())?;
    Some(format!(
        "holds the control character U+{:04X} at byte {at}: a user id must be text that \
         a command line can name",
        u32::from(c)
    ))
}

/// A device token: even-length hex, 16–256 bytes; returned lowercase.
pub fn check_token(t: &str) -> Result<String, String> {
    if let Some((pos, c)) = t.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(format!(
            "is not hex: {:?} at position {pos} (a token is hex digits 0-9, a-f)",
            c
        ));
    }
    if !t.len().is_multiple_of(2) {
        return Err(format!(
            "has an odd number of hex digits ({}); each byte is two digits",
            t.len()
        ));
    }
    if !(32..=512).contains(&t.len()) {
        return Err(format!(
            "is {} bytes ({} hex digits); a device token is 16 to 256 bytes",
            t.len() / 2,
            t.len()
        ));
    }
    Ok(t.to_ascii_lowercase())
}

fn check_notification(
    raw: &RawRecord<'_>,
    bad: &HashSet<String>,
    app: Option<&AppConfig>,
    problems: &mut Vec<FieldProblem>,
) -> Option<Record> {
    wrong_kind_fields(raw, "notification", NOTIFICATION_FIELDS, problems);
    let id = match raw.id.as_deref() {
        None => Some(None),
        Some(id) => match check_id(id) {
            Ok(()) => Some(Some(id.to_string())),
            Err(m) => {
                problems.push(fp("id", m));
                None
            }
        },
    };
    let target = match &raw.to {
        Some(to) => check_target(to, problems),
        None if bad.contains("to") => None,
        None => {
            problems.push(fp(
                "to",
                "missing: give {\"tokens\": [...]}, {\"users\": [...]} or {\"all\": true}",
            ));
            None
        }
    };
    let payload = match raw.payload {
        Some(p) => check_payload(p, problems),
        None if bad.contains("payload") => None,
        None => {
            problems.push(fp(
                "payload",
                "missing: a notification needs a payload object with an \"aps\" object",
            ));
            None
        }
    };
    let push_type = match raw.push_type.as_deref() {
        Some(s) => match PushType::parse(s) {
            Some(p) => Some(p),
            None => {
                let all: Vec<&str> = PushType::ALL.iter().map(|p| p.as_str()).collect();
                problems.push(fp(
                    "push_type",
                    format!(
                        "unknown push type \"{}\"; one of: {}",
                        excerpt(s),
                        all.join(", ")
                    ),
                ));
                None
            }
        },
        None => match &payload {
            Some(info) if info.content_available_only => Some(PushType::Background),
            Some(_) => Some(PushType::Alert),
            None => None,
        },
    };
    if let (Some(pt), Some(info)) = (push_type, &payload)
        && info.size > pt.max_payload_bytes()
    {
        problems.push(fp(
            "payload",
            format!(
                "is {} bytes; Apple's limit for {} pushes is {} bytes",
                info.size,
                pt,
                pt.max_payload_bytes()
            ),
        ));
    }
    let priority = match (raw.priority, push_type) {
        (Some(p), pt) => {
            if !matches!(p, 1 | 5 | 10) {
                problems.push(fp("priority", format!("must be 10, 5 or 1, not {p}")));
                None
            } else if let Some(pt) = pt.filter(|pt| !pt.allows_priority(p as u8)) {
                problems.push(fp(
                    "priority",
                    format!("{pt} pushes must use priority 5 or 1 (Apple rejects {p})"),
                ));
                None
            } else {
                Some(p as u8)
            }
        }
        (None, pt) => pt.map(PushType::default_priority),
    };
    let topic = match raw.topic.as_deref() {
        // The config's rule for a bundle id (printable ASCII, no spaces), and Apple's length.
        Some(t) if t.len() > 255 || !crate::config::is_bundle_id(t) => {
            let why = if t.len() > 255 {
                format!("is {} bytes long (at most 255)", t.len())
            } else if !header_safe(t) {
                NOT_HEADER_SAFE.to_string()
            } else {
                "is not a topic (a bundle id, without spaces)".to_string()
            };
            problems.push(fp("topic", format!("\"{}\" {why}", excerpt(t))));
            None
        }
        Some(t) => Some(t.to_string()),
        None => match (app, push_type) {
            (Some(a), Some(pt)) => Some(format!("{}{}", a.bundle_id, pt.topic_suffix())),
            _ => None,
        },
    };
    let collapse_id = match raw.collapse_id.as_deref() {
        Some(c) if c.is_empty() || c.len() > 64 => {
            problems.push(fp(
                "collapse_id",
                format!("is {} bytes; it must be 1 to 64 bytes", c.len()),
            ));
            None
        }
        Some(c) if !header_safe(c) => {
            problems.push(fp(
                "collapse_id",
                format!("\"{}\" {NOT_HEADER_SAFE}", excerpt(c)),
            ));
            None
        }
        Some(c) => Some(Some(c.to_string())),
        None => Some(None),
    };
    let expiration = match &raw.expiration {
        Some(t) => match parse_time(t) {
            Ok(ms) => Some(Some(ms.div_euclid(1000))),
            Err(m) => {
                problems.push(fp("expiration", m));
                None
            }
        },
        None => Some(None),
    };
    let send_at_ms = match &raw.send_at {
        Some(t) => match parse_time(t) {
            Ok(ms) => Some(Some(ms)),
            Err(m) => {
                problems.push(fp("send_at", m));
                None
            }
        },
        None => Some(None),
    };
    // An `expiration` at or before `send_at` is no error: the delivery ends `expired` when it
    // comes due, unsent, as SPEC 4.3 has it, and its receipt says so.
    let app = app?;
    Some(Record::Notification(NotificationRecord {
        app: app.name.clone(),
        id: id?,
        target: target?,
        payload: payload.filter(|p| p.sound)?.text,
        push_type: push_type?,
        priority: priority?,
        topic: topic?,
        collapse_id: collapse_id?,
        expiration: expiration?,
        send_at_ms: send_at_ms?,
        environment: app.environment,
    }))
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.chars().count() > 128 {
        return Err(format!(
            "must be 1 to 128 characters; it has {}",
            id.chars().count()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
    {
        return Err(format!(
            "contains {c:?}; only A-Z a-z 0-9 - _ . : @ are allowed (the id names a receipt file)"
        ));
    }
    Ok(())
}

/// Calls `each` with every item of a JSON array (`text`) and its index, one at a time: a list
/// of millions of items is checked without a `Vec` of them all (16 bytes an item, on top of
/// what is kept of them).
fn for_each_item<'a>(
    text: &'a str,
    each: &mut dyn FnMut(usize, &'a RawValue),
) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    (&mut de).deserialize_seq(EachItem(&mut |i, item| {
        each(i, item);
        ControlFlow::Continue(())
    }))?;
    de.end()
}

/// The string items of a list with their indices in the file's list, the non-strings
/// (`skipped`, runs in increasing order) left out of `items` and counted back in.
fn with_indices<'l, 'a>(
    items: &'l [Cow<'a, str>],
    skipped: &'l [std::ops::Range<usize>],
) -> impl Iterator<Item = (usize, &'l Cow<'a, str>)> {
    let mut runs = skipped.iter().peekable();
    let mut next = 0;
    items.iter().map(move |item| {
        while let Some(run) = runs.next_if(|r| r.start <= next) {
            next = next.max(run.end);
        }
        next += 1;
        (next - 1, item)
    })
}

fn check_target(to: &RawTarget<'_>, problems: &mut Vec<FieldProblem>) -> Option<Target> {
    let given = usize::from(to.tokens.is_some())
        + usize::from(to.users.is_some())
        + usize::from(to.all.is_some())
        + to.unreadable;
    let mut ok = given == 1 && to.unreadable == 0;
    if given != 1 {
        problems.push(fp(
            "to",
            if given == 0 {
                "names no target: give exactly one of \"tokens\", \"users\" or \"all\""
            } else {
                "names more than one target: give exactly one of \"tokens\", \"users\" or \"all\""
            },
        ));
    }
    // Each list given is checked, also beside another (every problem is reported).
    let mut tokens_out = Vec::new();
    if let Some(Items(tokens)) = &to.tokens {
        if tokens.is_empty() && to.reported[0].is_empty() {
            problems.push(fp("to.tokens", "is empty: name at least one token"));
            ok = false;
        }
        ok &= to.reported[0].is_empty();
        tokens_out.reserve(tokens.len());
        for (i, t) in with_indices(tokens, &to.reported[0]) {
            match check_token(t) {
                Ok(t) => tokens_out.push(t),
                Err(m) => {
                    push_item_problem(problems, || fp(format!("to.tokens[{i}]"), m));
                    ok = false;
                }
            }
        }
    }
    if let Some(Items(users)) = &to.users {
        if users.is_empty() && to.reported[1].is_empty() {
            problems.push(fp("to.users", "is empty: name at least one user"));
            ok = false;
        }
        ok &= to.reported[1].is_empty();
        for (i, u) in with_indices(users, &to.reported[1]) {
            if let Some(said) = user_item_problem(u) {
                push_item_problem(problems, || fp(format!("to.users[{i}]"), said));
                ok = false;
            }
        }
    }
    if to.all == Some(false) {
        problems.push(fp(
            "to.all",
            "must be true (to reach every device of the app)",
        ));
        ok = false;
    }
    if !ok {
        return None;
    }
    Some(match (&to.users, to.all) {
        (Some(Items(users)), _) => Target::Users(users.iter().map(|u| u.to_string()).collect()),
        (None, Some(_)) => Target::All,
        (None, None) => Target::Tokens(tokens_out),
    })
}

/// What the checks learned about a payload.
struct PayloadInfo {
    text: String,
    size: usize,
    content_available_only: bool,
    /// No problem was found in it (its size, checked against the push type's limit, aside):
    /// one without `aps` is still measured, so that its report says both.
    sound: bool,
}

fn check_payload(p: &RawValue, problems: &mut Vec<FieldProblem>) -> Option<PayloadInfo> {
    let text = p.get();
    let before = problems.len();
    let mut path = String::from("payload");
    let mut de = serde_json::Deserializer::from_str(text);
    let top = match (Walk {
        path: &mut path,
        problems,
    })
    .deserialize(&mut de)
    {
        Ok(top) => top,
        Err(e) => {
            // Said where the walk stopped (its path is left there); what it found before
            // does not count, as for any payload that cannot be read.
            problems.truncate(before);
            let field = excerpt(&path).into_owned();
            problems.push(fp(field, format!("cannot be read: {}", serde_message(&e))));
            return None;
        }
    };
    if top.kind != Kind::Object {
        problems.push(fp(
            "payload",
            "must be a JSON object with an \"aps\" object",
        ));
        return None;
    }
    let content_available_only = match top.aps {
        // Apple's background update is `"content-available": 1`; a 0 asks for none.
        Some((Kind::Object, only)) => only,
        Some(_) => {
            problems.push(fp("payload.aps", "must be a JSON object"));
            false
        }
        None => {
            problems.push(fp(
                "payload.aps",
                "missing: the payload must carry an \"aps\" object",
            ));
            false
        }
    };
    Some(PayloadInfo {
        text: text.to_string(),
        size: text.len(),
        content_available_only,
        sound: problems.len() == before,
    })
}

/// A JSON value's kind, as far as the payload checks care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Object,
    Array,
    /// The integer 1 (what `content-available` must be for a background push).
    One,
    Scalar,
}

/// What a [`Walk`] learned about a value.
struct Walked {
    kind: Kind,
    /// An object that is not empty and holds only `"content-available": 1` (a background
    /// update's `aps`).
    content_available_only: bool,
    /// An object's first `aps`: its kind, and whether it is a background update's.
    aps: Option<(Kind, bool)>,
}

impl Walked {
    fn of(kind: Kind) -> Walked {
        Walked {
            kind,
            content_available_only: false,
            aps: None,
        }
    }
}

/// Reads a payload once, as it is deserialized, reporting every key found twice in one
/// object, at any depth, by its path (serde_json's own `Value` silently keeps only the last).
/// Nothing of the payload is kept but the keys of the objects it is inside: a tree of it
/// took some 25 times the payload's size (4 million `{}` in an array: 290 MB for a 12 MB
/// file, a probe's finding). `path` is the value's own, extended for each key and element and
/// restored after, so a path is only spelled out for a problem; when the read fails, it is
/// left at the value that failed.
struct Walk<'w> {
    path: &'w mut String,
    problems: &'w mut Vec<FieldProblem>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = Walked;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Walked, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = Walked;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Walked, E> {
        Ok(Walked::of(Kind::Scalar))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Walked, E> {
        Ok(Walked::of(if v == 1 { Kind::One } else { Kind::Scalar }))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Walked, E> {
        Ok(Walked::of(if v == 1 { Kind::One } else { Kind::Scalar }))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Walked, E> {
        Ok(Walked::of(Kind::Scalar))
    }
    fn visit_str<E>(self, _: &str) -> Result<Walked, E> {
        Ok(Walked::of(Kind::Scalar))
    }
    fn visit_unit<E>(self) -> Result<Walked, E> {
        Ok(Walked::of(Kind::Scalar))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Walked, A::Error> {
        use std::fmt::Write as _;
        let len = self.path.len();
        for i in 0.. {
            // Writing to a String cannot fail.
            let _ = write!(self.path, "[{i}]");
            let item = seq.next_element_seed(Walk {
                path: &mut *self.path,
                problems: &mut *self.problems,
            })?;
            self.path.truncate(len);
            if item.is_none() {
                break;
            }
        }
        Ok(Walked::of(Kind::Array))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Walked, A::Error> {
        // Payload objects have a handful of keys: comparing each with those before it beats
        // building a set, up to a size.
        let mut keys: Vec<String> = Vec::new();
        let mut seen: Option<HashSet<String>> = None;
        let (mut any, mut only_content_available, mut aps) = (false, true, None);
        let len = self.path.len();
        while let Some(k) = map.next_key::<String>()? {
            let dup = match &mut seen {
                Some(seen) => !seen.insert(k.clone()),
                None => {
                    let dup = keys.contains(&k);
                    keys.push(k.clone());
                    if keys.len() > 16 {
                        seen = Some(keys.drain(..).collect());
                    }
                    dup
                }
            };
            self.path.push('.');
            self.path.push_str(&k);
            if dup {
                self.problems.push(fp(
                    excerpt(self.path).into_owned(),
                    format!("duplicate key \"{}\"", excerpt(&k)),
                ));
            }
            let v = map.next_value_seed(Walk {
                path: &mut *self.path,
                problems: &mut *self.problems,
            })?;
            self.path.truncate(len);
            any = true;
            only_content_available &= k == "content-available" && v.kind == Kind::One;
            if k == "aps" && aps.is_none() {
                aps = Some((v.kind, v.content_available_only));
            }
        }
        Ok(Walked {
            kind: Kind::Object,
            content_available_only: any && only_content_available,
            aps,
        })
    }
}

/// Whether `s` can go out as an HTTP header value as it is (`apns-topic`,
/// `apns-collapse-id`): printable ASCII. Checked at ingest, so that a record that could
/// never be sent is refused with its file rather than failing at each send.
fn header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

const NOT_HEADER_SAFE: &str =
    "holds a character an HTTP header cannot carry (only printable ASCII goes to APNs)";

/// Whether a time string is a number (UNIX seconds written as a string): `"1893456000"`,
/// `"+1893456000"`, `"1893456000.5"`.
fn looks_like_seconds(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
    !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && !fraction.is_empty()
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

/// Milliseconds since the epoch of an RFC 3339 string or UNIX seconds.
fn parse_time(t: &TimeRaw<'_>) -> Result<i64, String> {
    // Year 9999: anything later is a unit mix-up (milliseconds given as seconds).
    const MAX_SECS: i64 = 253_402_300_799;
    match t {
        TimeRaw::Secs(s) if (0..=MAX_SECS).contains(s) => Ok(s * 1000),
        TimeRaw::Secs(s) => Err(format!(
            "{s} is not a plausible UNIX time in seconds (0 to {MAX_SECS}); milliseconds given by mistake?"
        )),
        TimeRaw::Text(s) if looks_like_seconds(s) => {
            // What would pass: whole seconds, a JSON integer (no `+`, no fraction).
            let digits = s.strip_prefix('+').unwrap_or(s);
            let whole = digits.split('.').next().unwrap_or(digits);
            Err(format!(
                "\"{}\" is UNIX seconds in a string: give whole seconds as a JSON integer ({}), or an RFC 3339 date-time",
                excerpt(s),
                excerpt(whole)
            ))
        }
        TimeRaw::Text(s) => {
            let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|e| {
                    format!(
                        "\"{}\" is not an RFC 3339 date-time such as 2026-11-27T18:00:00Z ({e})",
                        excerpt(s)
                    )
                })?;
            let ms = (dt.unix_timestamp_nanos() / 1_000_000) as i64;
            if ms < 0 {
                return Err(format!("\"{}\" is before 1970", excerpt(s)));
            }
            Ok(ms)
        }
    }
}

/// serde_json's message without its " at line X column Y" tail (we say where ourselves), with
/// Rust's type names and parser terms put in a dropper's words.
fn serde_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let s = match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => &s,
    };
    const PLAIN: &[(&str, &str)] = &[
        ("expected i64", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected f64", "expected a number"),
        (
            "expected struct RawTarget",
            "expected an object: {\"tokens\": [...]}, {\"users\": [...]} or {\"all\": true}",
        ),
        (
            "recursion limit exceeded",
            "nested too deeply (more than 128 levels of arrays and objects)",
        ),
        (
            "unexpected end of hex escape",
            "a \\u escape is cut short or is half a surrogate pair",
        ),
        (
            "lone leading surrogate in hex escape",
            "a \\u escape is half a surrogate pair",
        ),
    ];
    let mut out = s.to_string();
    for (from, to) in PLAIN {
        if out.contains(from) {
            out = out.replace(from, to);
        }
    }
    out
}

/// At most [`EXCERPT_CHARS`] characters of file content.
pub fn excerpt(s: &str) -> Cow<'_, str> {
    if s.chars().count() <= EXCERPT_CHARS {
        Cow::Borrowed(s)
    } else {
        let cut: String = s.chars().take(EXCERPT_CHARS - 1).collect();
        Cow::Owned(format!("{cut}…"))
    }
}

/// Shortens quoted parts of a message (serde quotes offending values whole) and the message
/// itself, so no report carries a long piece of the file.
fn sanitize(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(300));
    let mut rest = msg;
    while let Some(start) = rest.find(['"', '`']) {
        let q = rest[start..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=start]);
        let after = &rest[start + 1..];
        match after.find(q) {
            Some(end) => {
                out.push_str(&excerpt(&after[..end]));
                out.push(q);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&excerpt(after));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    if out.chars().count() > 300 {
        let cut: String = out.chars().take(299).collect();
        return format!("{cut}…");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "5f1c0a6ee1ed7c1a7bd1a92b3fd10f3a5c7a5b7f1e7c42cd4c04e6f3aa22d9e9";

    fn cfg(apps: &[(&str, &str)]) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.p8");
        std::fs::write(&key, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut text = "[inbox]\ndir = \"in\"\n".to_string();
        for (name, bundle) in apps {
            text.push_str(&format!(
                "[[apps]]\nname = \"{name}\"\nbundle_id = \"{bundle}\"\ntoken = {{ key_file = \"{}\", key_id = \"ABC123DEFG\", team_id = \"DEF123GHIJ\" }}\n",
                key.display()
            ));
        }
        Config::from_toml(&text, &dir.path().join("c.toml"), dir.path())
            .unwrap()
            .0
    }

    fn one() -> Config {
        cfg(&[("buxheti", "info.buxheti.shkoder")])
    }

    fn parse(text: &str, kind: FileKind) -> Result<ParsedFile, Rejection> {
        parse_file(text.as_bytes(), kind, &one())
    }

    fn notif(extra: &str) -> String {
        format!(
            r#"{{"type":"notification","to":{{"all":true}},"payload":{{"aps":{{"alert":"hi"}}}}{extra}}}"#
        )
    }

    /// The streaming parse hands over a small first chunk, then full ones, in file order while
    /// the file is clean, keeps the rest for the caller, and stops handing over at the first
    /// problem (the caller must then throw away what it got: the file is rejected whole).
    #[test]
    fn streaming_hands_over_clean_chunks_in_order() {
        let n = FIRST_STREAM_CHUNK + 2 * STREAM_CHUNK + 500;
        let lines: Vec<String> = (0..n).map(|i| notif(&format!(r#","id":"n{i}""#))).collect();
        let mut got: Vec<Vec<Record>> = Vec::new();
        let text = lines.join("\n") + "\n";
        let p = parse_file_streaming(text.as_bytes(), FileKind::Jsonl, &one(), &mut |c| {
            got.push(c)
        })
        .unwrap();
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            [FIRST_STREAM_CHUNK, STREAM_CHUNK, STREAM_CHUNK]
        );
        assert_eq!(p.records.len(), 500);
        assert_eq!(p.notifications, n);
        let ids: Vec<String> = got
            .iter()
            .flatten()
            .chain(&p.records)
            .map(|r| match r {
                Record::Notification(n) => n.id.clone().unwrap_or_default(),
                Record::Device(_) => String::new(),
            })
            .collect();
        assert_eq!(ids, (0..n).map(|i| format!("n{i}")).collect::<Vec<_>>());

        let mut bad = lines.clone();
        bad[FIRST_STREAM_CHUNK + STREAM_CHUNK + 10] = notif(r#","priority":7"#);
        let text = bad.join("\n") + "\n";
        let mut got = 0;
        let r = parse_file_streaming(text.as_bytes(), FileKind::Jsonl, &one(), &mut |c| {
            got += c.len()
        })
        .unwrap_err();
        assert_eq!(
            got,
            FIRST_STREAM_CHUNK + STREAM_CHUNK,
            "nothing after the problem is handed over"
        );
        assert_eq!(r.problems.len(), 1, "{r}");
        assert_eq!(
            r.problems[0].line,
            Some(FIRST_STREAM_CHUNK + STREAM_CHUNK + 11)
        );
    }

    #[test]
    fn device_defaults_and_lowercase_token() {
        let line = format!(
            r#"{{"type":"device","token":"{}","user":"alice"}}"#,
            TOKEN.to_uppercase()
        );
        let p = parse(&line, FileKind::Jsonl).unwrap();
        assert_eq!(p.devices, 1);
        let Record::Device(d) = &p.records[0] else {
            panic!()
        };
        assert_eq!(d.token, TOKEN);
        assert_eq!(d.app, "buxheti");
        assert_eq!(d.environment, Environment::Production);
        assert_eq!(d.action, DeviceAction::Register);
        assert_eq!(d.user.as_deref(), Some("alice"));
    }

    #[test]
    fn notification_defaults() {
        let p = parse(&notif(""), FileKind::Json).unwrap();
        let Record::Notification(n) = &p.records[0] else {
            panic!()
        };
        assert_eq!(n.push_type, PushType::Alert);
        assert_eq!(n.priority, 10);
        assert_eq!(n.topic, "info.buxheti.shkoder");
        assert_eq!(n.payload, r#"{"aps":{"alert":"hi"}}"#);
        assert_eq!(n.target, Target::All);

        let bg = r#"{"type":"notification","to":{"users":["a"]},"payload":{"aps":{"content-available":1}}}"#;
        let p = parse(bg, FileKind::Json).unwrap();
        let Record::Notification(n) = &p.records[0] else {
            panic!()
        };
        assert_eq!(n.push_type, PushType::Background);
        assert_eq!(n.priority, 5);
        // `content-available: 0` asks for no background update: an alert push by default.
        let p = parse(&bg.replace(":1}", ":0}"), FileKind::Json).unwrap();
        let Record::Notification(n) = &p.records[0] else {
            panic!()
        };
        assert_eq!((n.push_type, n.priority), (PushType::Alert, 10));

        let voip = notif(
            r#","push_type":"voip","send_at":"2030-01-01T00:00:00Z","expiration":1900000000"#,
        );
        let p = parse(&voip, FileKind::Json).unwrap();
        let Record::Notification(n) = &p.records[0] else {
            panic!()
        };
        assert_eq!(n.topic, "info.buxheti.shkoder.voip");
        assert_eq!(n.send_at_ms, Some(1_893_456_000_000));
        assert_eq!(n.expiration, Some(1_900_000_000));
    }

    #[test]
    fn bom_and_arrays_and_blank_lines() {
        let text = format!("\u{FEFF}[{},\n{}]", notif(""), notif(""));
        assert_eq!(parse(&text, FileKind::Json).unwrap().notifications, 2);
        let text = format!("\n{}\r\n\n  \n{}\n", notif(""), notif(""));
        assert_eq!(parse(&text, FileKind::Jsonl).unwrap().notifications, 2);
    }

    fn problems(text: &str, kind: FileKind) -> Rejection {
        parse(text, kind).unwrap_err()
    }

    /// The messages of a rejection's problems, in order.
    fn messages(r: &Rejection) -> Vec<&str> {
        r.problems.iter().map(|p| p.message.as_str()).collect()
    }

    /// The fields of a rejection's problems, in order.
    fn fields(r: &Rejection) -> Vec<Option<&str>> {
        r.problems.iter().map(|p| p.field.as_deref()).collect()
    }

    /// A user id with a control character is refused, as a device's `user` and in
    /// `to.users` alike; a broken `\u` escape in a string field says so, not "wrong type".
    #[test]
    fn user_ids_with_control_characters_and_broken_escapes_are_said_plainly() {
        let r = problems(
            &format!(
                "{}\n{}\n{}",
                format_args!(r#"{{"type":"device","token":"{TOKEN}","user":"a\u0000b"}}"#),
                r#"{"type":"notification","to":{"users":["ok","x\ny"]},"payload":{"aps":{"alert":"hi"}}}"#,
                format_args!(r#"{{"type":"device","token":"{TOKEN}","user":"al\ud800ice"}}"#),
            ),
            FileKind::Jsonl,
        );
        assert_eq!(
            fields(&r),
            [Some("user"), Some("to.users[1]"), Some("user")],
            "{:?}",
            r.problems
        );
        let said = messages(&r);
        assert!(
            said[0].starts_with("holds the control character U+0000 at byte 1"),
            "{said:?}"
        );
        assert!(
            said[1].starts_with("holds the control character U+000A at byte 1"),
            "{said:?}"
        );
        assert!(
            said[2].starts_with("cannot be read: a \\u escape"),
            "{said:?}"
        );
        // Text beyond ASCII is no control character.
        let ok = format!(r#"{{"type":"device","token":"{TOKEN}","user":"Zoë 🙂"}}"#);
        assert!(parse(&ok, FileKind::Json).is_ok());
    }

    #[test]
    fn null_is_a_field_left_out_when_other_fields_are_wrong_too() {
        let r = problems(
            &format!(r#"{{"type":"device","token":"{TOKEN}","user":null,"enviroment":"sandbox"}}"#),
            FileKind::Json,
        );
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(r.problems[0].field.as_deref(), Some("enviroment"));
        let r = problems(
            &notif(r#","id":null,"send_at":null,"expiration":null,"topic":null,"priority":"10""#),
            FileKind::Json,
        );
        let fields = fields(&r);
        assert_eq!(fields, [Some("priority")], "{:?}", r.problems);
    }

    /// A field of the other type of record is unknown even as `null` (a probe's finding: a
    /// device record with `"payload": null, "to": null` passed), on the fast path (the record
    /// otherwise right) and the slow one (another field wrong too).
    #[test]
    fn a_field_of_the_other_type_of_record_is_unknown_even_when_null() {
        for extra in ["", r#","enviroment":"sandbox""#] {
            let r = problems(
                &format!(
                    r#"{{"type":"device","token":"{TOKEN}","payload":null,"to":null{extra}}}"#
                ),
                FileKind::Json,
            );
            let said = messages(&r);
            assert!(
                said.iter()
                    .any(|m| m.starts_with("unknown field \"payload\" for a device record"))
                    && said
                        .iter()
                        .any(|m| m.starts_with("unknown field \"to\" for a device record")),
                "{said:?}"
            );
        }
        let r = problems(&notif(r#","token":null,"user":null"#), FileKind::Json);
        let fields = fields(&r);
        assert_eq!(fields, [Some("token"), Some("user")], "{:?}", r.problems);
        // A string that says null is no null.
        assert!(parse(&notif(r#","collapse_id":"null""#), FileKind::Json).is_ok());
    }

    /// Every problem of a `to` and of a payload is listed, not only the first that serde's
    /// reading of the whole object stopped at (a probe's finding: an unknown key of `to` hid
    /// a bad token, a number in `tokens` hid the items after it, no `aps` hid the size).
    #[test]
    fn every_problem_of_a_target_or_a_payload_is_listed() {
        let to_fields = |to: &str| -> Vec<String> {
            let text = format!(
                r#"{{"type":"notification","to":{to},"payload":{{"aps":{{"alert":"hi"}}}}}}"#
            );
            let r = problems(&text, FileKind::Json);
            fields(&r)
                .into_iter()
                .map(|f| f.unwrap().to_string())
                .collect()
        };
        assert_eq!(
            to_fields(r#"{"tokens":["zz"],"x":1}"#),
            ["to.tokens[0]", "to.x"]
        );
        assert_eq!(to_fields(r#"{"x":1,"y":2,"all":true}"#), ["to.x", "to.y"]);
        // Runs of non-strings between strings: every later item still named by its own index.
        assert_eq!(
            to_fields(&format!(
                r#"{{"tokens": [1, 2, "zz", {{}}, "{TOKEN}", [3], null, "z", "{TOKEN}", 4],"x":1}}"#
            )),
            [
                "to.tokens[0]",
                "to.tokens[1]",
                "to.tokens[2]",
                "to.tokens[3]",
                "to.tokens[5]",
                "to.tokens[6]",
                "to.tokens[7]",
                "to.tokens[9]",
                "to.x"
            ]
        );
        // A list of nothing but non-strings is not "empty".
        assert_eq!(
            to_fields(r#"{"users":[1,2]}"#),
            ["to.users[0]", "to.users[1]"]
        );
        assert_eq!(
            to_fields(r#"{"tokens":[5,"zz",null]}"#),
            ["to.tokens[0]", "to.tokens[1]", "to.tokens[2]"]
        );
        let long = "u".repeat(2000);
        assert_eq!(
            to_fields(&format!(r#"{{"users":[5,6,"{long}"]}}"#)),
            ["to.users[0]", "to.users[1]", "to.users[2]"]
        );
        // Beside another target too (a probe's finding: only the other's type errors were).
        assert_eq!(
            to_fields(r#"{"tokens":["zz"],"users":[5]}"#),
            ["to", "to.tokens[0]", "to.users[0]"]
        );
        assert_eq!(
            to_fields(r#"{"tokens":["ab"],"x":1,"all":true}"#),
            ["to", "to.tokens[0]", "to.x"]
        );
        assert_eq!(to_fields(r#"{"x":1}"#), ["to", "to.x"]);
        assert_eq!(to_fields(r#"{"all":true,"all":true}"#), ["to.all"]);
        assert_eq!(to_fields(r#"{"all":"yes"}"#), ["to.all"]);
        assert_eq!(to_fields(r#"[true]"#), ["to"]);
        // What each says.
        let text = format!(
            r#"{{"type":"notification","to":{{"tokens":[5,"{TOKEN}"],"devices":1}},"payload":{{"aps":{{}}}}}}"#
        );
        let r = problems(&text, FileKind::Json);
        assert_eq!(
            messages(&r),
            [
                "must be a string, not the number 5",
                "unknown field \"devices\"; did you mean \"tokens\"?"
            ]
        );
        // A payload without `aps`, too big as well.
        let big = "x".repeat(5000);
        let text =
            format!(r#"{{"type":"notification","to":{{"all":true}},"payload":{{"x":"{big}"}}}}"#);
        let r = problems(&text, FileKind::Json);
        let said = messages(&r);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].starts_with("missing: the payload must carry"),
            "{said:?}"
        );
        assert!(
            said[1].contains("Apple's limit for alert pushes is 4096"),
            "{said:?}"
        );
    }

    #[test]
    fn a_records_problems_are_listed_in_the_order_of_its_lines() {
        let text = "[{\"type\": \"notification\",\n \"app\": \"nope\", \"to\": {\"all\": true},\n \"payload\": {\"aps\": {}}, \"prio\": 5}]";
        let r = problems(text, FileKind::Json);
        let got: Vec<_> = r
            .problems
            .iter()
            .map(|p| (p.line, p.field.as_deref()))
            .collect();
        assert_eq!(got, [(Some(2), Some("app")), (Some(3), Some("prio"))]);
        // On one line too (a `.jsonl` record, a one-line `.json`): in the order of its
        // fields, not of the checks (a probe's finding: the unknown field came first).
        let line = r#"{"type":"notification","app":"nope","to":{"all":true},"payload":{"aps":{}},"prio":5}"#;
        for kind in [FileKind::Json, FileKind::Jsonl] {
            let r = problems(line, kind);
            let got = fields(&r);
            assert_eq!(got, [Some("app"), Some("prio")], "{kind:?}");
        }
    }

    #[test]
    fn unix_seconds_in_a_string_or_with_a_fraction_are_told_how_to_write_them() {
        // The suggested form is one that passes: whole seconds, no sign, no fraction.
        for bad in [
            r#""1893456000""#,
            r#""1893456000.5""#,
            r#""+1893456000""#,
            r#""+1893456000.5""#,
        ] {
            let r = problems(&notif(&format!(r#","send_at":{bad}"#)), FileKind::Json);
            assert!(
                r.problems[0]
                    .message
                    .contains("give whole seconds as a JSON integer (1893456000)"),
                "{:?}",
                r.problems
            );
        }
        for bad in ["1893456000.5", "1893456000.0", "99999999999999999999"] {
            let r = problems(&notif(&format!(r#","expiration":{bad}"#)), FileKind::Json);
            assert!(
                r.problems[0].message.contains("a JSON integer"),
                "{:?}",
                r.problems
            );
        }
        let r = problems(&notif(r#","expiration":1893456000.0"#), FileKind::Json);
        assert!(
            r.problems[0].message.contains("(read as 1893456000.0)"),
            "{:?}",
            r.problems
        );
        // `-0` is read as a float too, like 0.0: refused as they are, and said so.
        let r = problems(&notif(r#","expiration":-0"#), FileKind::Json);
        assert!(
            r.problems[0].message.contains("a minus zero"),
            "{:?}",
            r.problems
        );
        // The file's own text is gone by then: the message says what made it a decimal.
        let r = problems(&notif(r#","expiration":1e9"#), FileKind::Json);
        assert!(
            r.problems[0]
                .message
                .contains("written with a fraction, an exponent"),
            "{:?}",
            r.problems
        );
        let r = problems(
            &notif(&format!(r#","topic":"{}""#, "a".repeat(300))),
            FileKind::Json,
        );
        assert!(
            r.problems[0].message.contains("300 bytes long"),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn a_rejection_names_the_well_formed_notification_ids_of_the_file() {
        let text = [
            notif(r#","id":"first""#),
            notif(r#","id":"second","priority":7"#),
            // A bad id is a problem of its own, not a name for the log.
            notif(r#","id":"bad/id""#),
            r#"{"type":"device","token":"00ff00ff00ff00ff00ff00ff00ff00ff","id":"dev"}"#.into(),
            r#"{"type":"notification","id":"third","to":{"all":true},"payload":{"aps":{}},"extra":1}"#
                .into(),
        ]
        .join("\n");
        let r = problems(&text, FileKind::Jsonl);
        assert_eq!(r.ids.first, ["first", "second", "third"]);
        assert_eq!(r.ids.total, 3);
        assert!(r.ids.apps.is_empty(), "no record names an app");
        let two_apps = [
            notif(r#","app":"a","priority":7"#),
            notif(r#","app":"b""#),
            notif(r#","app":"a""#),
        ]
        .join("\n");
        assert_eq!(problems(&two_apps, FileKind::Jsonl).ids.apps, ["a", "b"]);
        let many: String = (0..30)
            .map(|i| notif(&format!(r#","id":"n{i}","priority":7"#)) + "\n")
            .collect();
        let r = problems(&many, FileKind::Jsonl);
        assert_eq!(r.ids.first.len(), crate::store::LOGGED_IDS);
        assert_eq!(r.ids.total, 30);
    }

    #[test]
    fn every_field_problem_of_a_record_is_reported() {
        let text = format!(
            "{}\n{}\n",
            notif(""),
            r#"{"type":"device","token":"xyz","tokn":"a","priority":"high","user":""}"#
        );
        let r = problems(&text, FileKind::Jsonl);
        assert_eq!(r.reason, RejectReason::Invalid);
        let fields: Vec<_> = r
            .problems
            .iter()
            .map(|p| p.field.clone().unwrap())
            .collect();
        assert!(fields.contains(&"tokn".to_string()), "{r:?}");
        assert!(fields.contains(&"priority".to_string()), "{r:?}");
        assert!(fields.contains(&"token".to_string()), "{r:?}");
        assert!(fields.contains(&"user".to_string()), "{r:?}");
        assert!(
            r.problems
                .iter()
                .all(|p| p.record == Some(1) && p.line == Some(2))
        );
        let tokn = r
            .problems
            .iter()
            .find(|p| p.field.as_deref() == Some("tokn"))
            .unwrap();
        assert!(tokn.message.contains("did you mean \"token\""), "{tokn:?}");
    }

    #[test]
    fn messages_name_no_internal_types_and_suggest_only_near_fields() {
        let r = problems(
            r#"{"type":"notification","to":"all","payload":{"aps":{}}}"#,
            FileKind::Json,
        );
        let to = r.problems.iter().find(|p| p.field.as_deref() == Some("to"));
        let to = to.expect("a problem with `to`");
        assert!(to.message.contains(r#"{"all": true}"#), "{to:?}");
        assert!(!to.message.contains("Raw"), "{to:?}");
        let r = problems(
            r#"{"type":"device","token":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","foo":1}"#,
            FileKind::Json,
        );
        let foo = r
            .problems
            .iter()
            .find(|p| p.field.as_deref() == Some("foo"));
        let foo = foo.expect("a problem with `foo`");
        assert!(!foo.message.contains("did you mean"), "{foo:?}");
        // Inside `to`, and for other names of a field.
        let r = problems(
            &format!(
                r#"{{"type":"notification","to":{{"token":["{TOKEN}"]}},"expiry":0,"payload":{{"aps":{{}}}}}}"#
            ),
            FileKind::Json,
        );
        let said: Vec<_> = r
            .problems
            .iter()
            .map(|p| (p.field.as_deref(), p.message.as_str()))
            .collect();
        assert!(
            said.contains(&(
                Some("to.token"),
                "unknown field \"token\"; did you mean \"tokens\"?"
            )),
            "{said:?}"
        );
        assert!(
            said.contains(&(
                Some("expiry"),
                "unknown field \"expiry\"; did you mean \"expiration\"?"
            )),
            "{said:?}"
        );
        let r = problems(
            &format!(
                r#"{{"type":"notification","to":{{"device_tokens":["{TOKEN}"]}},"apns-expiration":0,"payload":{{"aps":{{}}}}}}"#
            ),
            FileKind::Json,
        );
        let said = messages(&r);
        assert!(
            said.iter().any(|m| m.ends_with("did you mean \"tokens\"?")),
            "{said:?}"
        );
        assert!(
            said.iter()
                .any(|m| m.ends_with("did you mean \"expiration\"?")),
            "{said:?}"
        );
        let r = problems(
            r#"{"type":"notification","to":{"tokens":"x"},"payload":{"aps":{}}}"#,
            FileKind::Json,
        );
        assert_eq!(
            r.problems[0].message, "must be an array, not the string \"x\"",
            "{r:?}"
        );
        // A notification's devices are in `to`: no hint of a device record's field.
        let r = problems(
            &format!(
                r#"{{"type":"notification","device_token":"{TOKEN}","payload":{{"aps":{{}}}}}}"#
            ),
            FileKind::Json,
        );
        let said = messages(&r);
        assert!(
            said.contains(&"unknown field \"device_token\"; did you mean \"to\"?"),
            "{said:?}"
        );
    }

    #[test]
    fn duplicate_keys_anywhere() {
        let r = problems(
            r#"{"type":"device","type":"device","token":"aa"}"#,
            FileKind::Json,
        );
        assert!(
            r.problems
                .iter()
                .any(|p| p.field.as_deref() == Some("type") && p.message.contains("duplicate")),
            "{r:?}"
        );
        let r = problems(
            r#"{"type":"notification","to":{"all":true},"payload":{"aps":{"alert":"a","alert":"b"}}}"#,
            FileKind::Json,
        );
        assert_eq!(
            r.problems[0].field.as_deref(),
            Some("payload.aps.alert"),
            "{r:?}"
        );
        let r = problems(
            r#"{"type":"notification","to":{"users":["a"],"users":["b"]},"payload":{"aps":{}}}"#,
            FileKind::Json,
        );
        assert_eq!(r.problems[0].field.as_deref(), Some("to.users"), "{r:?}");
        // In an array's element, and in an object too big for the pairwise comparison: each
        // named by its whole path, and a clean sibling before it not at all.
        let keys: Vec<String> = (0..20).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let r = problems(
            &format!(
                r#"{{"type":"notification","to":{{"all":true}},"payload":{{"aps":{{}},
                "list":[{{"x":1}},{{"x":1,"x":2}}],"big":{{{},"k3":0}}}}}}"#,
                keys.join(",")
            ),
            FileKind::Json,
        );
        let fields = fields(&r);
        assert_eq!(
            fields,
            [Some("payload.list[1].x"), Some("payload.big.k3")],
            "{r:?}"
        );
    }

    #[test]
    fn token_rules() {
        assert!(check_token(&"ab".repeat(16)).is_ok());
        assert!(check_token(&"ab".repeat(256)).is_ok());
        assert!(check_token(&"ab".repeat(15)).is_err());
        assert!(check_token(&"ab".repeat(257)).is_err());
        assert!(check_token(&"a".repeat(33)).is_err());
        assert!(check_token(&format!("{}g", "a".repeat(31))).is_err());
        let text = format!(
            r#"{{"type":"notification","to":{{"tokens":["{TOKEN}","00","{TOKEN}"]}},"payload":{{"aps":{{}}}}}}"#
        );
        let r = problems(&text, FileKind::Json);
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].field.as_deref(), Some("to.tokens[1]"));
    }

    #[test]
    fn payload_limits() {
        let big = |n: usize| {
            // {"aps":{"alert":"xxx"}} is 20 bytes + n.
            let x = "x".repeat(n - 20);
            format!(r#"{{"aps":{{"alert":"{x}"}}}}"#)
        };
        assert_eq!(big(4096).len(), 4096);
        let rec = |payload: String, pt: &str| {
            format!(
                r#"{{"type":"notification","to":{{"all":true}},"push_type":"{pt}","payload":{payload}}}"#
            )
        };
        assert!(parse(&rec(big(4096), "alert"), FileKind::Json).is_ok());
        let r = problems(&rec(big(4097), "alert"), FileKind::Json);
        assert!(r.problems[0].message.contains("4097"), "{r:?}");
        assert!(parse(&rec(big(4097), "voip"), FileKind::Json).is_ok());
        assert!(parse(&rec(big(5120), "voip"), FileKind::Json).is_ok());
        assert!(parse(&rec(big(5121), "voip"), FileKind::Json).is_err());
        // The rejection quotes no more than an excerpt.
        let r = problems(
            &rec(format!("\"{}\"", "s".repeat(500)), "alert"),
            FileKind::Json,
        );
        assert!(r.problems.iter().all(|p| p.message.len() < 200), "{r:?}");
    }

    #[test]
    fn target_rules() {
        let rec =
            |to: &str| format!(r#"{{"type":"notification","to":{to},"payload":{{"aps":{{}}}}}}"#);
        for bad in [
            r#"{"all":true,"users":["a"]}"#,
            r#"{}"#,
            r#"{"all":false}"#,
            r#"{"users":[]}"#,
            r#"{"tokens":[]}"#,
            r#"{"everyone":true}"#,
            &format!(r#"{{"users":["{}"]}}"#, "u".repeat(1025)),
        ] {
            let r = problems(&rec(bad), FileKind::Json);
            assert!(
                r.problems[0].field.as_deref().unwrap().starts_with("to"),
                "{bad}: {r:?}"
            );
        }
    }

    /// serde's derived structs read an array by position; here that would turn a typo into
    /// a broadcast.
    #[test]
    fn an_array_is_not_a_record_nor_a_target() {
        let rec =
            |to: &str| format!(r#"{{"type":"notification","to":{to},"payload":{{"aps":{{}}}}}}"#);
        for bad in [r#"[null,null,true]"#, &format!(r#"[["{TOKEN}"]]"#)] {
            for kind in [FileKind::Json, FileKind::Jsonl] {
                let r = problems(&rec(bad), kind);
                assert_eq!(r.problems.len(), 1, "{bad}: {r:?}");
                assert_eq!(r.problems[0].field.as_deref(), Some("to"), "{bad}: {r:?}");
                assert!(
                    r.problems[0]
                        .message
                        .starts_with("must be an object: {\"tokens\""),
                    "{bad}: {r:?}"
                );
                assert!(r.problems[0].message.ends_with(", not an array"), "{r:?}");
            }
        }
        let line = format!(r#"["device","buxheti","{TOKEN}"]"#);
        let r = parse_file(
            line.as_bytes(),
            FileKind::Jsonl,
            &cfg(&[("buxheti", "com.b")]),
        )
        .unwrap_err();
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(
            r.problems[0].message.contains("must be a JSON object"),
            "{r:?}"
        );
    }

    #[test]
    fn priority_and_push_type_rules() {
        let r = problems(
            &notif(r#","push_type":"background","priority":10"#),
            FileKind::Json,
        );
        assert_eq!(r.problems[0].field.as_deref(), Some("priority"));
        let r = problems(&notif(r#","priority":7"#), FileKind::Json);
        assert_eq!(r.problems[0].field.as_deref(), Some("priority"));
        let r = problems(&notif(r#","push_type":"loud""#), FileKind::Json);
        assert_eq!(r.problems[0].field.as_deref(), Some("push_type"));
        let r = problems(&notif(r#","collapse_id":"""#), FileKind::Json);
        assert_eq!(r.problems[0].field.as_deref(), Some("collapse_id"));
        // What APNs could never be sent as a header is refused at ingest, not at each send.
        for bad in [
            r#","collapse_id":"c\u001b]0;x""#,
            r#","collapse_id":"café""#,
            r#","topic":"a.b\u0007""#,
        ] {
            let r = problems(&notif(bad), FileKind::Json);
            assert!(
                r.problems[0].message.contains("HTTP header"),
                "{bad}: {:?}",
                r.problems
            );
        }
        let r = problems(&notif(r#","id":"a/b""#), FileKind::Json);
        assert_eq!(r.problems[0].field.as_deref(), Some("id"));
        let r = problems(&notif(r#","send_at":"tomorrow""#), FileKind::Json);
        assert_eq!(r.problems[0].field.as_deref(), Some("send_at"));
        let r = problems(&notif(r#","expiration":1.5"#), FileKind::Json);
        assert_eq!(r.problems[0].field.as_deref(), Some("expiration"));
        let r = problems(&notif(r#","token":"aa""#), FileKind::Json);
        assert_eq!(r.problems[0].field.as_deref(), Some("token"));
    }

    #[test]
    fn apps_must_be_named_when_several() {
        let c = cfg(&[("a", "com.a"), ("b", "com.b")]);
        let line = format!(r#"{{"type":"device","token":"{TOKEN}"}}"#);
        let r = parse_file(line.as_bytes(), FileKind::Jsonl, &c).unwrap_err();
        assert_eq!(r.problems[0].field.as_deref(), Some("app"));
        let line = format!(r#"{{"type":"device","app":"c","token":"{TOKEN}"}}"#);
        let r = parse_file(line.as_bytes(), FileKind::Jsonl, &c).unwrap_err();
        assert!(r.problems[0].message.contains("unknown app"));
        let line = format!(r#"{{"type":"device","app":"b","token":"{TOKEN}"}}"#);
        assert!(parse_file(line.as_bytes(), FileKind::Jsonl, &c).is_ok());
    }

    /// A value the payload cannot hold is named by its path and found on its own line.
    #[test]
    fn a_bad_value_deep_in_a_payload_is_named_where_it_is() {
        for (bad, msg) in [
            (r#""bad \ud800 here""#, "surrogate"),
            ("1e999", "out of range"),
        ] {
            let text = format!(
                "{{\n  \"type\": \"notification\",\n  \"to\": {{\"all\": true}},\n  \"payload\": {{\n    \"aps\": {{\n      \"alert\": {{\n        \"title\": \"t\",\n        \"body\": {bad}\n      }}\n    }}\n  }}\n}}\n"
            );
            let r = problems(&text, FileKind::Json);
            assert_eq!(r.problems.len(), 1, "{r:?}");
            assert_eq!(
                r.problems[0].field.as_deref(),
                Some("payload.aps.alert.body"),
                "{r:?}"
            );
            assert_eq!(r.problems[0].line, Some(8), "{r:?}");
            assert!(r.problems[0].message.contains(msg), "{r:?}");
        }
    }

    /// A list of more than a million users or tokens is refused whole, said once; a million
    /// is taken.
    #[test]
    fn a_target_list_longer_than_the_cap_is_refused_whole() {
        let list = |n: usize| vec!["\"u\""; n].join(",");
        let record = |n: usize| {
            format!(
                r#"{{"type":"notification","to":{{"users":[{}]}},"payload":{{"aps":{{"alert":"hi"}}}}}}"#,
                list(n)
            )
        };
        let ok = parse(&record(MAX_TARGET_ITEMS), FileKind::Json).unwrap();
        assert_eq!(ok.notifications, 1);
        let r = problems(&record(MAX_TARGET_ITEMS + 1), FileKind::Json);
        assert_eq!(fields(&r), [Some("to.users")], "{:?}", r.problems);
        assert!(
            messages(&r)[0].starts_with("lists 1000001 items; at most 1000000 per notification"),
            "{:?}",
            r.problems
        );
    }

    /// Items of a long list are found on their own lines, far into the list too (the list
    /// is read only as far as the items asked for, and again further when asked further).
    #[test]
    fn bad_items_of_a_long_list_are_found_on_their_lines() {
        let bad = [3, 70, 200, 1500];
        let items: Vec<String> = (0..2000)
            .map(|i| match bad.contains(&i) {
                true => "    \"zz\"".to_string(),
                false => format!("    \"{TOKEN}\""),
            })
            .collect();
        let text = format!(
            "{{\"type\": \"notification\", \"to\": {{\"tokens\": [\n{}\n]}},\n\"payload\": {{\"aps\": {{\"alert\": \"hi\"}}}}}}\n",
            items.join(",\n")
        );
        let r = problems(&text, FileKind::Json);
        let found: Vec<_> = r
            .problems
            .iter()
            .map(|p| (p.field.clone().unwrap(), p.line))
            .collect();
        let want: Vec<_> = bad
            .iter()
            .map(|i| (format!("to.tokens[{i}]"), Some(i + 2)))
            .collect();
        assert_eq!(found, want);
    }

    #[test]
    fn file_level_failures() {
        // Characters an editor does not show are named: a second byte-order mark, a stray
        // one in a later line, a NUL.
        let n = notif("");
        for (bytes, kind) in [
            (format!("\u{feff}\u{feff}{n}"), FileKind::Json),
            (format!("{n}\n\u{feff}{n}\n"), FileKind::Jsonl),
        ] {
            let r = parse_file(bytes.as_bytes(), kind, &one()).unwrap_err();
            assert!(r.problems[0].message.contains("byte-order mark"), "{r:?}");
        }
        let r = problems(&format!("{n}\0\n"), FileKind::Jsonl);
        assert!(r.problems[0].message.contains("NUL byte"), "{r:?}");
        let r = problems(&format!("[{n},\u{feff}{n}]"), FileKind::Json);
        assert!(r.problems[0].message.contains("byte-order mark"), "{r:?}");
        // JSON's whitespace only: a line of no-break spaces is no blank line.
        let r = problems(&format!("{n}\n\u{a0}\u{a0}\n"), FileKind::Jsonl);
        assert_eq!(r.problems[0].line, Some(2), "{r:?}");
        assert_eq!(
            problems("\u{a0}\n", FileKind::Jsonl).reason,
            RejectReason::Parse
        );
        assert_eq!(problems("", FileKind::Json).reason, RejectReason::Empty);
        assert_eq!(
            problems(" \n\n", FileKind::Jsonl).reason,
            RejectReason::Empty
        );
        let r = parse_file(b"{\"type\":\n\xff}", FileKind::Json, &one()).unwrap_err();
        assert_eq!(r.reason, RejectReason::NotUtf8);
        assert_eq!(r.problems[0].line, Some(2));
        // Every bad sequence is listed, a cut-off end among others too.
        let r = parse_file(
            b"{}\ncaf\xe9\nna\xefve \xff\xfe\n\xc3",
            FileKind::Jsonl,
            &one(),
        )
        .unwrap_err();
        assert_eq!(r.reason, RejectReason::NotUtf8);
        let lines: Vec<_> = r.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 3, 3, 3, 4].map(Some), "{:?}", r.problems);
        assert!(
            r.problems[1].message.contains("0xEF at byte offset 10"),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems[4].message.contains("ends inside a character"),
            "{:?}",
            r.problems
        );
        // UTF-16 (with its byte-order mark, either order): one problem that says so.
        for mark in [[0xFFu8, 0xFE], [0xFE, 0xFF]] {
            let mut text = mark.to_vec();
            for c in "{\"type\":\"device\"}".encode_utf16() {
                let b = if mark[0] == 0xFF {
                    c.to_le_bytes()
                } else {
                    c.to_be_bytes()
                };
                text.extend(b);
            }
            let r = parse_file(&text, FileKind::Json, &one()).unwrap_err();
            assert_eq!(r.reason, RejectReason::NotUtf8);
            assert_eq!(r.problems.len(), 1, "{r:?}");
            assert!(r.problems[0].message.contains("is UTF-16"), "{r:?}");
        }
        // Cut off inside a character: still being written, not a wrong encoding.
        for kind in [FileKind::Json, FileKind::Jsonl] {
            let r = parse_file(b"{\"type\":\"caf\xc3", kind, &one()).unwrap_err();
            assert_eq!(r.reason, RejectReason::Truncated, "{kind:?}");
        }
        let r = problems(&notif("")[..30], FileKind::Json);
        assert_eq!(r.reason, RejectReason::Truncated);
        assert_eq!(r.problems[0].record, Some(0), "the file's one record");
        let r = problems(&format!("{} x", notif("")), FileKind::Json);
        assert_eq!(r.problems[0].record, None, "after the record: the file's");
        let r = problems(
            &format!("[{},{}", notif(""), &notif("")[..20]),
            FileKind::Json,
        );
        assert_eq!(r.reason, RejectReason::Truncated);
        assert_eq!(r.problems[0].record, Some(1));
        let r = problems(&format!("[{}] x", notif("")), FileKind::Json);
        assert_eq!(r.reason, RejectReason::Parse);
        // JSON, but no object: a broken rule of §2 (invalid), not a syntax error (parse).
        let r = problems("42", FileKind::Json);
        assert_eq!(r.reason, RejectReason::Invalid);
        assert_eq!(problems("4 2", FileKind::Json).reason, RejectReason::Parse);
        let r = problems(
            &format!("[{},null,[{}]]", notif(""), notif("")),
            FileKind::Json,
        );
        assert_eq!(r.reason, RejectReason::Invalid);
        let records: Vec<_> = r.problems.iter().map(|p| p.record).collect();
        assert_eq!(records, [Some(1), Some(2)], "{r:?}");
        assert!(
            r.problems[0].message.contains("must be a JSON object"),
            "{r:?}"
        );
        // A .jsonl whose last line is cut off (no newline) may still be being written.
        let r = problems(
            &format!("{}\n{}", notif(""), &notif("")[..20]),
            FileKind::Jsonl,
        );
        assert_eq!(r.reason, RejectReason::Truncated);
        assert_eq!(r.problems[0].line, Some(2));
        let r = problems(&format!("{}\n[1]\n", notif("")), FileKind::Jsonl);
        assert_eq!(r.reason, RejectReason::Invalid);
        assert_eq!(r.problems[0].record, Some(1));
        let r = problems(&format!("{}\n[1\n", notif("")), FileKind::Jsonl);
        assert_eq!(r.reason, RejectReason::Parse);
    }

    #[test]
    fn json_lines_point_at_the_field() {
        let text = format!(
            "[\n  {},\n  {{\n    \"type\": \"device\",\n    \"token\": \"nothex\"\n  }}\n]\n",
            notif("")
        );
        let r = problems(&text, FileKind::Json);
        assert_eq!(r.problems[0].record, Some(1));
        assert_eq!(r.problems[0].line, Some(5), "{r:?}");
        assert_eq!(r.problems[0].field.as_deref(), Some("token"));
    }

    #[test]
    fn problem_count_is_capped() {
        let text = "{\"type\":\"device\"}\n".repeat(MAX_PROBLEMS + 5);
        let r = problems(&text, FileKind::Jsonl);
        assert_eq!(r.problems.len(), MAX_PROBLEMS + 1);
        assert!(r.problems.last().unwrap().message.contains("5 more"));
        // Counted in full where a count is said (the log line, `ingest`, `validate`).
        assert_eq!(r.unlisted, 5);
        assert_eq!(problem_count(&r.problems, r.unlisted), MAX_PROBLEMS + 5);
        assert!(
            r.to_string()
                .ends_with(&format!("(and {} more problems)", MAX_PROBLEMS + 4)),
            "{r}"
        );
        let few = problems("{\"type\":\"device\"}\n", FileKind::Jsonl);
        assert_eq!(problem_count(&few.problems, few.unlisted), 1);
    }

    /// One record whose lists hold more bad items than a report lists keeps only those, and
    /// counts the rest (a probe's 1.2 GB of problems for one `to.tokens`): every item that
    /// is no string, every bad token, every bad user.
    #[test]
    fn one_records_item_problems_are_kept_up_to_the_cap_and_counted_beyond() {
        let n = MAX_PROBLEMS + 7;
        let lists = [
            format!("\"tokens\":[{}]", vec!["{}"; n].join(",")),
            format!("\"tokens\":[{}]", vec!["\"x\""; n].join(",")),
            format!("\"users\":[{}]", vec!["\"\""; n].join(",")),
            // Both kinds in one list, the strings first.
            format!(
                "\"tokens\":[{},{}]",
                ["\"x\""; 10].join(","),
                vec!["1"; n - 10].join(",")
            ),
        ];
        for list in lists {
            let text = format!(
                "{{\"type\":\"notification\",\"to\":{{{list}}},\"payload\":{{\"aps\":{{}}}}}}"
            );
            let r = problems(&text, FileKind::Json);
            assert_eq!(r.problems.len(), MAX_PROBLEMS + 1, "{list:.40}");
            assert_eq!(problem_count(&r.problems, r.unlisted), n, "{list:.40}");
            assert!(r.problems[0].field.as_deref().unwrap().ends_with("[0]"));
        }
    }

    /// Field paths name the field once, keys in them are excerpts, and in a `.json` file the
    /// line is the offending value's, however deep it sits.
    #[test]
    fn nested_problems_are_named_once_shortly_and_on_their_own_line() {
        let text = format!(
            r#"[
  {{
    "type": "notification",
    "to": {{
      "users": ["a"],
      "bogus": 1
    }},
    "payload": {{
      "aps": {{"alert": "hi"}},
      "custom": {{
        "k": 1,
        "k": 2
      }}
    }}
  }},
  {{
    "type": "notification",
    "to": {{
      "tokens": [
        "{TOKEN}",
        "xyz"
      ]
    }},
    "payload": {{"aps": {{}}}},
    "{long}": 1
  }}
]"#,
            long = "Q".repeat(5000)
        );
        let r = problems(&text, FileKind::Json);
        let got: Vec<(Option<usize>, Option<usize>, String)> = r
            .problems
            .iter()
            .map(|p| (p.record, p.line, p.field.clone().unwrap_or_default()))
            .collect();
        let cut = format!("{}…", "Q".repeat(EXCERPT_CHARS - 1));
        assert_eq!(
            got,
            vec![
                (Some(0), Some(6), "to.bogus".to_string()),
                (Some(0), Some(12), "payload.custom.k".to_string()),
                // In the order of the lines.
                (Some(1), Some(21), "to.tokens[1]".to_string()),
                (Some(1), Some(25), cut),
            ],
            "{:?}",
            r.problems
        );
        let report =
            serde_json::to_string(&r.problems.iter().map(|p| &p.message).collect::<Vec<_>>())
                .unwrap();
        assert!(!report.contains(&"Q".repeat(100)), "{report}");
    }

    /// Text after a complete array is the file's problem, not a record's.
    #[test]
    fn trailing_text_after_the_array_names_no_record() {
        let r = problems(&format!("[{}] x", notif("")), FileKind::Json);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(r.problems[0].record, None, "{:?}", r.problems);
        assert!(
            r.problems[0].message.contains("trailing"),
            "{:?}",
            r.problems
        );
        // Inside the array, the record it broke in is named.
        let r = problems(&format!("[{}, {{\"type\" 1}}]", notif("")), FileKind::Json);
        assert_eq!(r.problems[0].record, Some(1), "{:?}", r.problems);
    }

    /// Messages speak a dropper's language, not Rust's or the parser's.
    #[test]
    fn messages_avoid_rust_type_names_and_parser_terms() {
        let deep = format!(
            r#"{{"type":"notification","to":{{"all":true}},"payload":{{"aps":{{}},"x":{}{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let text = format!("{}\n{deep}\n", notif(r#","priority":"x""#));
        let r = problems(&text, FileKind::Jsonl);
        let messages = messages(&r);
        assert_eq!(
            messages[0], "must be a whole number, not the string \"x\"",
            "{messages:?}"
        );
        assert!(messages[1].contains("nested too deeply"), "{messages:?}");
        // serde's "invalid type: integer `5`, expected a string", said plainly.
        let r = problems(
            &notif("").replace(r#""type":"notification""#, r#""type":5"#),
            FileKind::Json,
        );
        assert_eq!(
            r.problems[0].message, "must be a string, not the number 5",
            "{r:?}"
        );
        // A whole number too large for one reaches serde as a float, printed rewritten.
        let r = problems(
            &notif(r#","priority":100000000000000000000"#),
            FileKind::Json,
        );
        assert!(
            r.problems[0].message.starts_with("must be a whole number, not a number with a fraction or an exponent, or too large for a whole one (read as 1e+20)"),
            "{r:?}"
        );
        assert!(
            !messages
                .iter()
                .any(|m| m.contains("i64") || m.contains("recursion")),
            "{messages:?}"
        );
    }
}
