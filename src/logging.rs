//! Log set-up: human-readable text on stdout, and rotating files (JSON or text) under
//! `[log] dir`. Every log line of the daemon goes through `tracing`.

use std::io::IsTerminal as _;

use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber, span};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation as AppenderRotation};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, Rotation};

mod batch;
mod json;
mod text;
pub use json::JsonLines;

/// How often a condition that lasts (a full disk failing every write, `accept` out of file
/// descriptors, the admin endpoint at its cap) is said: once a minute, not on every retry, so
/// that it neither buries the other lines nor fills the disk that may be what fails.
pub const SAY_LASTING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Says when a condition that repeats is to be logged: at once the first time, then at most
/// once per `every`, with how many times it went unsaid in between. Every "said once a
/// minute while it lasts" of the daemon goes through one of these.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    unsaid: u64,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            unsaid: 0,
        }
    }

    /// Notes one occurrence now: `Some(times unsaid since the last line)` when a line is due,
    /// `None` when this one goes unsaid.
    pub fn note(&mut self) -> Option<u64> {
        self.note_at(std::time::Instant::now())
    }

    /// [`Throttle::note`] at a given moment.
    pub fn note_at(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.unsaid += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unsaid))
            }
        }
    }

    /// The condition is over: when it comes back, it is said at once. Returns whether it
    /// had been said, so that its end is said too.
    pub fn reset(&mut self) -> bool {
        self.unsaid = 0;
        self.last.take().is_some()
    }
}

/// The log files' writer of this process, for [`flush_files`].
static FILE_WRITER: std::sync::Mutex<Option<batch::Batched>> = std::sync::Mutex::new(None);

/// Returns once every line logged so far is written to the log file (out of this process:
/// a kill -9 after this cannot lose it). Blocks while the writer writes; at once when there
/// is no log file. Called before an event is put on record, so that the record never holds
/// what the log lost: the sender's recorder before it commits delivery results, the inbox
/// after it logs a file's fate.
pub fn flush_files() {
    if let Some(w) = file_writer() {
        w.flush();
    }
}

/// Whether [`flush_files`] would have anything to wait for: async callers ask this first,
/// and take a blocking thread for the flush only then.
pub fn files_pending() -> bool {
    file_writer().is_some_and(|w| w.pending())
}

fn file_writer() -> Option<batch::Batched> {
    FILE_WRITER
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Keeps the background log writers alive; drop it last so buffered lines reach the file.
pub struct LogGuard {
    _file: Option<batch::BatchGuard>,
    _stdout: Option<WorkerGuard>,
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create log directory {dir}: {source}")]
    Dir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open rotating log in {dir}: {message}")]
    Appender {
        dir: std::path::PathBuf,
        message: String,
    },
}

/// The text formats' writer: each event's text ends in its one line break, and a line break,
/// carriage return or other control byte inside it (from a file name, an error message, a
/// dropped value) is written as an escape (`\n`, `\u{1}`), so that nobody can forge or split
/// log lines, or send a terminal control sequence, by naming a file. ESC stays when the
/// output has colours (`ansi`), which use it. (The JSON format escapes such bytes itself.)
#[derive(Clone)]
struct OneLine<M> {
    inner: M,
    ansi: bool,
}

impl<M> OneLine<M> {
    fn new(inner: M, ansi: bool) -> OneLine<M> {
        OneLine { inner, ansi }
    }
}

impl<'a, M: fmt::MakeWriter<'a>> fmt::MakeWriter<'a> for OneLine<M> {
    type Writer = OneLineWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter {
            inner: self.inner.make_writer(),
            ansi: self.ansi,
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        OneLineWriter {
            inner: self.inner.make_writer_for(meta),
            ansi: self.ansi,
        }
    }
}

struct OneLineWriter<W> {
    inner: W,
    ansi: bool,
}

impl<W: std::io::Write> std::io::Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        // C1 controls (U+0080..U+009F, which a terminal may read as commands: U+009B starts
        // an escape sequence) are two bytes in UTF-8, 0xC2 then 0x80..=0x9F.
        let c1 = |i: usize| {
            body[i] == 0xc2 && body.get(i + 1).is_some_and(|b| (0x80..=0x9f).contains(b))
        };
        let plain = |b: u8| b >= 0x20 && b != 0x7f || b == b'\t' || (b == 0x1b && self.ansi);
        if body.iter().all(|&b| plain(b)) && !(0..body.len()).any(c1) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        let mut i = 0;
        while i < body.len() {
            match body[i] {
                _ if c1(i) => {
                    out.extend_from_slice(format!("\\u{{{:x}}}", body[i + 1]).as_bytes());
                    i += 1;
                }
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b if plain(b) => out.push(b),
                b => out.extend_from_slice(format!("\\u{{{b:x}}}").as_bytes()),
            }
            i += 1;
        }
        out.extend_from_slice(&buf[body.len()..]);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `RUST_LOG` when it is set and usable, else the config's level. An empty `RUST_LOG` is
/// unset; one that would log nothing of pushdrop's (a typo) is set aside with a warning on
/// stderr rather than silence the daemon.
fn filter(level: &str) -> EnvFilter {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    if let Some(v) = from_env {
        match crate::config::log_filter_problem(&v) {
            None => {
                if let Ok(f) = EnvFilter::try_new(&v) {
                    return f;
                }
            }
            Some(why) => eprintln!("warning: RUST_LOG: {why}; using [log] level {level:?}"),
        }
    }
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logs to stderr only: `simulate`, and the one-shot commands whose log files cannot be
/// opened (stdout is their own output).
pub fn init_stderr(level: &str) {
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::registry()
        .with(console_layer(std::io::stderr, ansi))
        .with(filter(level))
        .try_init();
}

/// Which formatter writes the JSON log files. Both write the same lines; only the cost differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JsonFormatter {
    /// [`JsonLines`], the daemon's.
    #[default]
    JsonLines,
    /// tracing-subscriber's own JSON layer, the format `JsonLines` reproduces: the baseline of
    /// the `log_line` benchmark.
    TracingSubscriber,
}

/// A console's text layer (stdout or stderr): no target, colours only on a terminal, each
/// event on one line whatever its fields hold.
fn console_layer<S, W>(
    writer: W,
    ansi: bool,
) -> fmt::Layer<S, text::QuotedFields, fmt::format::Format, OneLine<W>>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + 'static,
{
    fmt::layer()
        .fmt_fields(text::QuotedFields)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(OneLine::new(writer, ansi))
}

/// Where a process's log lines go besides the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Console {
    /// The daemon: stdout is its log.
    Stdout,
    /// One-shot commands: stdout is their own output.
    Stderr,
    /// `demo`: stdout is its report, and its lines are in the files.
    Off,
}

/// Logs to stdout and, with `[log] dir` set, to rotating files there.
pub fn init(cfg: &LogConfig) -> Result<LogGuard, LogError> {
    init_with(cfg, Console::Stdout, JsonFormatter::JsonLines)
}

/// Logs to stderr and, with `[log] dir` set, to the rotating files: for one-shot commands
/// that change what the daemon holds (`ingest`, `retry`, `purge`). An operator following the
/// log sees their files and requeues beside the daemon's own lines (SPEC 4.4: every ingest
/// is a line in the rotating log). Where the files cannot be opened (a log folder this user
/// may not write), stderr alone, with a warning: the command's work matters more than its
/// log line.
pub fn init_one_shot(cfg: &LogConfig) -> Option<LogGuard> {
    match init_with(cfg, Console::Stderr, JsonFormatter::JsonLines) {
        Ok(guard) => Some(guard),
        Err(e) => {
            init_stderr(&cfg.level);
            tracing::warn!(event = "log_files_unavailable", error = %e, "this command's lines go to stderr only");
            None
        }
    }
}

/// As [`init`], with the given JSON formatter: lets the `log_line` benchmark compare both
/// through the daemon's own set-up.
pub fn init_with_json_formatter(
    cfg: &LogConfig,
    json: JsonFormatter,
) -> Result<LogGuard, LogError> {
    init_with(cfg, Console::Stdout, json)
}

/// Logs to the rotating files only (for `pushdrop demo`, whose stdout is its report).
pub fn init_files_only(cfg: &LogConfig) -> Result<LogGuard, LogError> {
    init_with(cfg, Console::Off, JsonFormatter::JsonLines)
}

fn init_with(cfg: &LogConfig, console: Console, json: JsonFormatter) -> Result<LogGuard, LogError> {
    let Some(dir) = &cfg.dir else {
        if console == Console::Stderr {
            init_stderr(&cfg.level);
        }
        if console == Console::Stdout {
            // No files: stdout is the daemon's log, every line of it.
            let ansi = std::io::stdout().is_terminal();
            let _ = tracing_subscriber::registry()
                .with(console_layer(std::io::stdout, ansi))
                .with(filter(&cfg.level))
                .try_init();
        }
        return Ok(LogGuard {
            _file: None,
            _stdout: None,
        });
    };
    // Run as root, the folders made go to the daemon's user (see `ownership`).
    crate::ownership::create_dir_all(dir).map_err(|source| LogError::Dir {
        dir: dir.clone(),
        source,
    })?;
    let appender = Reopening::new(dir, cfg.rotation)?;
    // Written by a background thread, a batch of lines per write (see `batch`). Never lossy:
    // every delivery outcome must reach the file, so a stalled disk slows the sender down
    // instead of dropping lines.
    let (writer, guard) =
        batch::batched(appender, "pushdrop-log").map_err(|e| LogError::Appender {
            dir: dir.clone(),
            message: format!("cannot start the log writer thread: {e}"),
        })?;
    *FILE_WRITER.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer.clone());
    let file_layer = match (cfg.format, json) {
        // One JSON object per line; see `json` for the format.
        (LogFormat::Json, JsonFormatter::JsonLines) => fmt::layer()
            .event_format(JsonLines::new())
            .with_writer(writer)
            .boxed(),
        (LogFormat::Json, JsonFormatter::TracingSubscriber) => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        (LogFormat::Text, _) => fmt::layer()
            .fmt_fields(text::QuotedFields)
            .with_ansi(false)
            .with_writer(OneLine::new(writer, false))
            .boxed(),
    };
    // stdout off the sending threads too (a line per delivery); colours only on a terminal.
    // Lossy: a stdout nobody reads must not stall the daemon; the files have every line.
    let (stdout_layer, stdout_guard) = if console == Console::Stdout {
        let ansi = std::io::stdout().is_terminal();
        let (w, g) = NonBlockingBuilder::default()
            .thread_name("pushdrop-stdout")
            .finish(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stdout(),
            ));
        (
            // The files have every delivery line; stdout keeps only the unusual ones.
            Some(WithoutDeliveryInfo(console_layer(w, ansi))),
            Some(g),
        )
    } else {
        (None, None)
    };
    // A one-shot command's few lines: written at once, in order with what it prints.
    let stderr_layer = (console == Console::Stderr)
        .then(|| console_layer(std::io::stderr, std::io::stderr().is_terminal()));
    let _ = tracing_subscriber::registry()
        .with(stdout_layer)
        .with(stderr_layer)
        .with(file_layer)
        .with(filter(&cfg.level))
        .try_init();
    // Old files are pruned here (once lines can say so) and by the daemon every few minutes
    // (`prune_logs`), not by the appender: it goes by creation time and may take the file it
    // writes.
    prune_logs(cfg);
    Ok(LogGuard {
        _file: Some(guard),
        _stdout: stdout_guard,
    })
}

/// Passes everything to the wrapped layer except the events of [`DELIVERY_TARGET`] at `info`
/// and below (sent deliveries, finished notifications): the stdout layer of a daemon with log
/// files.
///
/// Why not a per-layer filter (`with_filter(filter_fn(…))`): one layer that wants a callsite
/// and another that does not make its interest "sometimes", and then every one of those
/// events, the most frequent ones, is filtered again, with the thread-local bookkeeping of
/// per-layer filters. With this wrapper no layer has a filter of its own, the callsites stay
/// enabled once and for all, and skipping an event costs one comparison. The target has no
/// spans, so filtering events only is the same as filtering the layer.
///
/// [`DELIVERY_TARGET`]: crate::sender::DELIVERY_TARGET
struct WithoutDeliveryInfo<L>(L);

impl<S: Subscriber, L: Layer<S>> Layer<S> for WithoutDeliveryInfo<L> {
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() >= tracing::Level::INFO && meta.target() == crate::sender::DELIVERY_TARGET
        {
            return;
        }
        self.0.on_event(event, ctx);
    }

    // Everything else as the wrapped layer does it.
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.0.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }
    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.0.event_enabled(event, ctx)
    }
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }
    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(id, values, ctx);
    }
    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.0.on_follows_from(id, follows, ctx);
    }
    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }
    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }
    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx);
    }
    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }
}

fn open_appender(
    dir: &std::path::Path,
    rotation: Rotation,
) -> Result<RollingFileAppender, LogError> {
    let rotation = match rotation {
        Rotation::Hourly => AppenderRotation::HOURLY,
        Rotation::Daily => AppenderRotation::DAILY,
        Rotation::Never => AppenderRotation::NEVER,
    };
    let appender = RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix("pushdrop")
        .filename_suffix("log")
        .build(dir)
        .map_err(|e| LogError::Appender {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        })?;
    give_to_folder_owner(dir);
    Ok(appender)
}

/// Run as root, gives the log files root owns in `dir` to the folder's owner (see
/// [`crate::ownership`]): the appender may just have made this period's file.
fn give_to_folder_owner(dir: &std::path::Path) {
    if !crate::ownership::root() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let logs = entries.flatten().map(|e| e.path()).filter(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pushdrop") && n.ends_with("log"))
    });
    crate::ownership::give_to_owner_of(dir, logs);
}

/// How often the log writer looks whether its file is still there.
const REOPEN_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The rolling appender, opened again when its file is gone: the appender keeps writing to
/// the file it has open, so a log folder removed or renamed (or the file moved away by a
/// rotation tool) would swallow every line from then on, unseen. At most [`REOPEN_CHECK`]
/// after that, a new file (and folder) takes the lines.
struct Reopening {
    appender: RollingFileAppender,
    dir: std::path::PathBuf,
    rotation: Rotation,
    checked: std::time::Instant,
    failing: bool,
    /// The file the appender writes, as (name, device, inode) when last seen: a file of that
    /// name that is another file (a rotation tool renamed ours away and made a new one,
    /// logrotate's `create`) is not ours, however present.
    writing: Option<(String, u64, u64)>,
}

impl Reopening {
    fn new(dir: &std::path::Path, rotation: Rotation) -> Result<Reopening, LogError> {
        let appender = open_appender(dir, rotation)?;
        let name = current_log_name(rotation, time::OffsetDateTime::now_utc());
        Ok(Reopening {
            appender,
            writing: file_ident(&dir.join(&name)).map(|(dev, ino)| (name, dev, ino)),
            dir: dir.to_path_buf(),
            rotation,
            checked: std::time::Instant::now(),
            failing: false,
        })
    }

    fn check(&mut self) {
        let name = current_log_name(self.rotation, time::OffsetDateTime::now_utc());
        let path = self.dir.join(&name);
        match (file_ident(&path), &self.writing) {
            // Ours, still under its name.
            (Some(now), Some((n, dev, ino))) if *n == name && now == (*dev, *ino) => return,
            // A new period's file: the appender opens it by name at its first write in the
            // period, whoever made it.
            (Some((dev, ino)), Some((n, _, _))) if *n != name => {
                self.writing = Some((name, dev, ino));
                return;
            }
            // Gone, or another file under our name: open the name again.
            _ => {}
        }
        // Also the first write of a new period (the appender makes its file then): opening
        // it again then does no harm.
        let _ = std::fs::create_dir_all(&self.dir);
        match open_appender(&self.dir, self.rotation) {
            Ok(a) => {
                self.appender = a;
                self.writing = file_ident(&path).map(|(dev, ino)| (name, dev, ino));
                self.failing = false;
            }
            // No log line can say so (this is the log): stderr, once per failing spell.
            Err(e) if !self.failing => {
                self.failing = true;
                eprintln!("pushdrop: the log file {name} is gone and {e}");
            }
            Err(_) => {}
        }
    }
}

impl std::io::Write for Reopening {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.checked.elapsed() >= REOPEN_CHECK {
            self.checked = std::time::Instant::now();
            self.check();
        }
        self.appender.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.appender.flush()
    }
}

/// A file's (device, inode), or `None` when there is none.
fn file_ident(path: &std::path::Path) -> Option<(u64, u64)> {
    crate::inbox::fsutil::identity(path).ok()
}

/// The name of the file tracing-appender writes at `now` (UTC, as it names them).
fn current_log_name(rotation: Rotation, now: time::OffsetDateTime) -> String {
    let d = now.date();
    let day = format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day());
    match rotation {
        Rotation::Never => "pushdrop.log".into(),
        Rotation::Daily => format!("pushdrop.{day}.log"),
        Rotation::Hourly => format!("pushdrop.{day}-{:02}.log", now.hour()),
    }
}

/// Whether a log file's name carries the appender's date (`pushdrop.<year>…`).
fn is_dated(name: &str) -> bool {
    name.strip_prefix("pushdrop.")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Keeps the newest `[log] keep_files` log files (at least 2), the one being written
/// included: every `pushdrop*log` file in `[log] dir` counts, and the oldest go first by the
/// date in their names (a file copied or restored in later is not thereby new). The file of
/// the current period is never deleted. Called at start and every few minutes by the daemon,
/// so after a rotation the folder holds one file more for a few minutes at most.
///
/// Why not tracing-appender's own `max_log_files`: it goes by creation time, so a file
/// restored into the folder after the current one was made made the current one the
/// "oldest", deleted with the lines already in it.
pub fn prune_logs(cfg: &LogConfig) {
    let Some(dir) = cfg.dir.as_deref() else {
        return;
    };
    let current = current_log_name(cfg.rotation, time::OffsetDateTime::now_utc());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut others: Vec<String> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == current
            || !name.starts_with("pushdrop")
            || !name.ends_with("log")
            || !e.file_type().is_ok_and(|t| t.is_file())
        {
            continue;
        }
        others.push(name.to_string());
    }
    // The current file counts when it is there. An idle daemon may have written nothing
    // in this period yet: then the newest other file is the one "being written" (its last
    // lines are the latest there are), and keep_files of the others stay.
    // What is in effect: `keep_files` below 2 keeps 2 (and the removal lines say so).
    let keep = cfg.keep_files.max(2);
    let room = keep - usize::from(dir.join(&current).exists());
    if others.len() > room {
        // By date: `pushdrop.2026-11-30.log` < `pushdrop.2026-12-01-07.log`. A name without
        // a date (`pushdrop.log`, left by `rotation = "never"`, or a copy's) is older than
        // every dated one: it goes first, or it would hold a place for good.
        others.sort_by(|a, b| (is_dated(a), a).cmp(&(is_dated(b), b)));
        let excess = others.len() - room;
        for name in others.into_iter().take(excess) {
            // Should this fail, the next prune tries again.
            if std::fs::remove_file(dir.join(&name)).is_ok() {
                tracing::info!(
                    event = "log_file_removed",
                    file = name.as_str(),
                    keep_files = keep,
                    "old log file removed (keep_files)"
                );
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    use tracing::{error, info, warn};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;
    use crate::sender::DELIVERY_TARGET;

    #[test]
    fn a_lasting_condition_is_said_once_a_minute_with_what_went_unsaid() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = super::Throttle::new(Duration::from_secs(60));
        assert_eq!(t.note_at(at(0)), Some(0));
        for ms in (100..60_000).step_by(100) {
            assert_eq!(t.note_at(at(ms)), None, "{ms} ms");
        }
        assert_eq!(t.note_at(at(60_000)), Some(599));
        assert_eq!(t.note_at(at(60_001)), None);
        assert_eq!(t.note_at(at(200_000)), Some(1));
        // Over, then back: said at once, with nothing unsaid carried over.
        assert_eq!(t.note_at(at(200_001)), None);
        assert!(t.reset());
        assert!(!t.reset(), "nothing to end twice");
        assert_eq!(t.note_at(at(200_002)), Some(0));
    }

    #[test]
    fn the_current_periods_file_is_named_as_the_appender_names_it() {
        let t = time::macros::datetime!(2026-12-01 07:05 UTC);
        assert_eq!(
            current_log_name(Rotation::Daily, t),
            "pushdrop.2026-12-01.log"
        );
        assert_eq!(
            current_log_name(Rotation::Hourly, t),
            "pushdrop.2026-12-01-07.log"
        );
        assert_eq!(current_log_name(Rotation::Never, t), "pushdrop.log");
    }

    /// A log folder removed under the daemon: the next write after the check interval goes
    /// to a new folder and file, not into the removed file.
    #[test]
    fn a_removed_log_folder_is_made_again_and_written() {
        use std::io::Write as _;
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("log");
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = Reopening::new(&dir, Rotation::Never).unwrap();
        w.write_all(b"before\n").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // The interval is up.
        w.checked = std::time::Instant::now() - REOPEN_CHECK * 2;
        w.write_all(b"after\n").unwrap();
        w.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("pushdrop.log")).unwrap(),
            "after\n"
        );
        // Within the interval nothing is looked at.
        std::fs::remove_dir_all(&dir).unwrap();
        w.write_all(b"unseen\n").unwrap();
        assert!(!dir.exists());
    }

    /// logrotate's `create`: the file renamed away and a new, empty one made under its name.
    /// The lines go to the new one (they went on into the renamed file, for good).
    #[test]
    fn a_log_file_renamed_away_and_made_anew_is_written_anew() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut w = Reopening::new(dir.path(), Rotation::Never).unwrap();
        w.write_all(b"before\n").unwrap();
        let log = dir.path().join("pushdrop.log");
        std::fs::rename(&log, dir.path().join("pushdrop.log.1")).unwrap();
        std::fs::File::create(&log).unwrap();
        w.checked = std::time::Instant::now() - REOPEN_CHECK * 2;
        w.write_all(b"after\n").unwrap();
        w.checked = std::time::Instant::now() - REOPEN_CHECK * 2;
        w.write_all(b"later\n").unwrap();
        w.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "after\nlater\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pushdrop.log.1")).unwrap(),
            "before\n"
        );
    }

    /// Files restored into the log folder after today's was made: today's is the oldest by
    /// creation time, and the start-up prune kept deleting the lines already written to it.
    #[test]
    fn the_prune_goes_by_the_dates_in_the_names_and_never_takes_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let today = current_log_name(Rotation::Daily, time::OffsetDateTime::now_utc());
        std::fs::write(dir.path().join(&today), "earlier lines\n").unwrap();
        for (i, old) in [
            "pushdrop.2020-01-03.log",
            "pushdrop.2020-01-02.log",
            "pushdrop.2019-12-31.log",
            "pushdrop.2020-01-01.log",
        ]
        .iter()
        .enumerate()
        {
            std::thread::sleep(std::time::Duration::from_millis(20 * (i as u64 + 1)));
            std::fs::write(dir.path().join(old), "restored\n").unwrap();
        }
        std::fs::write(dir.path().join("other.txt"), "not a log").unwrap();
        // Left by `rotation = "never"`: undated, so older than every dated file.
        std::fs::write(dir.path().join("pushdrop.log"), "never rotated\n").unwrap();
        let cfg = LogConfig {
            dir: Some(dir.path().to_path_buf()),
            keep_files: 3,
            ..LogConfig::default()
        };
        drop(init_files_only(&cfg).unwrap());
        let names = names_in(dir.path());
        // keep_files 3: today's and the two newest others by the dates in their names
        // (2020-01-01 was restored last: the newest by creation time).
        assert_eq!(
            names,
            [
                "other.txt",
                "pushdrop.2020-01-02.log",
                "pushdrop.2020-01-03.log",
                today.as_str()
            ]
        );
        let text = std::fs::read_to_string(dir.path().join(&today)).unwrap();
        assert!(text.starts_with("earlier lines\n"), "{text}");
    }

    /// The names in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// An idle hour writes no file: the files kept are still `keep_files`, the newest of
    /// them standing for the one being written.
    #[test]
    fn a_period_without_a_file_yet_keeps_keep_files_of_the_others() {
        let dir = tempfile::tempdir().unwrap();
        for h in ["14", "15", "16"] {
            std::fs::write(
                dir.path().join(format!("pushdrop.2020-01-01-{h}.log")),
                "x\n",
            )
            .unwrap();
        }
        // `keep_files = 0` keeps 2, and its line says the 2 in effect (a probe's finding: it
        // said 0).
        let cfg = LogConfig {
            dir: Some(dir.path().to_path_buf()),
            rotation: Rotation::Hourly,
            keep_files: 0,
            ..LogConfig::default()
        };
        let sink = Sink::default();
        let subscriber = tracing_subscriber::registry().with(
            fmt::layer()
                .with_ansi(false)
                .with_writer(OneLine::new(sink.clone(), false)),
        );
        tracing::subscriber::with_default(subscriber, || prune_logs(&cfg));
        let said = sink.lines();
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(said[0].contains("keep_files=2"), "{said:#?}");
        let names = names_in(dir.path());
        assert_eq!(
            names,
            ["pushdrop.2020-01-01-15.log", "pushdrop.2020-01-01-16.log"]
        );
        // Once the current period has its file, it is one of the two.
        let now = current_log_name(Rotation::Hourly, time::OffsetDateTime::now_utc());
        std::fs::write(dir.path().join(&now), "y\n").unwrap();
        prune_logs(&cfg);
        let names = names_in(dir.path());
        assert_eq!(names, ["pushdrop.2020-01-01-16.log".to_string(), now]);
    }

    /// The README promises an `event` on every line operators see (info and above): a line
    /// without one cannot be selected by `jq 'select(.event == …)'`. Checked on the source,
    /// since most of these lines need a failing network or disk to be written.
    #[test]
    fn every_info_warn_and_error_line_names_its_event() {
        fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    rust_files(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        rust_files(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut missing = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for m in ["info!(", "warn!(", "error!("] {
                for (at, _) in code.match_indices(m) {
                    if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                        continue;
                    }
                    let rest = &code[at + m.len()..];
                    let mut depth = 1;
                    let end = rest
                        .char_indices()
                        .find(|&(_, c)| {
                            match c {
                                '(' => depth += 1,
                                ')' => depth -= 1,
                                _ => {}
                            }
                            depth == 0
                        })
                        .map_or(rest.len(), |(i, _)| i);
                    if !rest[..end].contains("event") {
                        let line = code[..at].lines().count();
                        missing.push(format!("{}:{line}", f.display()));
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "log lines without an event: {missing:?}"
        );
    }

    /// Collects what a layer writes.
    #[derive(Clone, Default)]
    pub(crate) struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Sink {
        pub(crate) fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap().clone();
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
            text.lines().map(str::to_owned).collect()
        }
    }

    impl io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    /// Text lines stay one line each, whatever a field holds: a file name with a line break
    /// or a control byte cannot forge or split log lines.
    #[test]
    fn text_lines_escape_line_breaks_and_control_bytes() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::registry().with(
            fmt::layer()
                .with_ansi(false)
                .with_writer(OneLine::new(sink.clone(), false)),
        );
        tracing::subscriber::with_default(subscriber, || {
            let name = "new\nline \u{1}\u{1b}[31m.json";
            warn!(event = "rejected", file = %name, report = %format!("dir/{name}.error.json"), "rejected");
            info!(event = "plain", file = "a.json", "nothing to escape\there");
            warn!(event = "rejected", file = %"c1\u{9b}2J.json", "rejected");
        });
        let mut lines = sink.lines();
        // A C1 control (U+009B starts a terminal escape sequence) is escaped too.
        let c1 = lines.pop().unwrap_or_default();
        assert!(c1.contains(r"file=c1\u{9b}2J.json"), "{c1}");
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].contains(r"file=new\nline \u{1}\u{1b}[31m.json"),
            "{lines:#?}"
        );
        assert!(lines[0].contains(r"report=dir/new\nline"), "{lines:#?}");
        assert!(lines[1].contains("nothing to escape\there"), "{lines:#?}");
    }

    /// The layering of `init_with` with a log dir: the files get every line, stdout all but the
    /// delivery `info` lines (and still the delivery warnings and errors).
    #[test]
    fn stdout_skips_delivery_info_lines_only() {
        let (stdout, files) = (Sink::default(), Sink::default());
        let subscriber = tracing_subscriber::registry()
            .with(Some(WithoutDeliveryInfo(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(false)
                    .with_writer(stdout.clone()),
            )))
            .with(
                fmt::layer()
                    .event_format(JsonLines::new())
                    .with_writer(files.clone())
                    .boxed(),
            )
            .with(EnvFilter::new("info"));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..2 {
                info!(target: DELIVERY_TARGET, event = "delivery", status = "sent", "delivered");
                warn!(target: DELIVERY_TARGET, event = "delivery", status = "retry", "will retry");
                error!(target: DELIVERY_TARGET, event = "delivery", status = "failed", "failed");
                info!(target: DELIVERY_TARGET, event = "notification_finished", "all deliveries final");
                info!(event = "ingested", "ingested");
                info!(target: "pushdrop::delivery_other", "another target");
                tracing::debug!(target: DELIVERY_TARGET, "below the level");
            }
        });
        let count = |lines: &[String], of: &[&str]| {
            lines
                .iter()
                .filter(|l| of.iter().any(|m| l.contains(m)))
                .count()
        };
        let stdout = stdout.lines();
        assert_eq!(stdout.len(), 8, "{stdout:#?}");
        let unusual = ["will retry", "failed", "ingested", "another target"];
        assert_eq!(count(&stdout, &unusual), 8, "{stdout:#?}");
        let files = files.lines();
        assert_eq!(files.len(), 12, "{files:#?}");
        let routine = ["\"delivered\"", "all deliveries final"];
        assert_eq!(count(&files, &routine), 4, "{files:#?}");
        assert_eq!(count(&files, &unusual), 8, "{files:#?}");
    }
}
