//! `pushdrop validate` and `pushdrop ingest`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::inbox::ingest::{Examined, display_name, examine_streaming};
use crate::inbox::parse::{RejectReason, Rejection};
use crate::inbox::report::ErrorReport;
use crate::inbox::{Candidate, FileOutcome, Ingestor};
use crate::store::Store;

/// Checks drop files without ingesting them: a one-line summary per good file, the
/// `.error.json` report (on stdout) per bad one; exit 1 if any is bad.
pub fn validate(config: &Path, files: &[PathBuf]) -> anyhow::Result<i32> {
    let cfg = super::load_config(config)?;
    let mut bad = 0;
    for f in files {
        let name = display_name(f);
        // The records are looked at as they are parsed, and none kept (a 61 MB file of a
        // million devices took 400 MB held whole).
        let mut repeated = RepeatedIds::default();
        let examined = examine_streaming(f, &cfg, &mut |records| repeated.add(&records));
        let rejection = match examined {
            Examined::Ready {
                file,
                devices,
                notifications,
                ..
            } => {
                repeated.add(&file.records);
                println!(
                    "{}: ok ({devices} device record{}, {notifications} notification{})",
                    f.display(),
                    plural(devices),
                    plural(notifications)
                );
                // Not a rejection (ingest skips the later one and keeps the file), but worth
                // knowing before the drop.
                for (index, id, first) in repeated.found {
                    println!(
                        "{}: note: record {index} repeats the id {id:?} of record {first}; ingest will skip it as a duplicate",
                        f.display()
                    );
                }
                continue;
            }
            Examined::Reject(r) => r,
            Examined::Ignored(why) => {
                let reason = if crate::inbox::is_drop_name(f.as_os_str()) {
                    RejectReason::NotRegular
                } else {
                    RejectReason::BadName
                };
                Rejection::file(reason, why)
            }
            Examined::Vanished => Rejection::file(RejectReason::Unreadable, "no such file"),
            Examined::Failed(why) | Examined::InProgress(why) => {
                Rejection::file(RejectReason::Unreadable, why)
            }
        };
        bad += 1;
        print!(
            "{}",
            ErrorReport::new(&name, rejection.reason, &rejection.problems).to_json()
        );
    }
    Ok(if bad > 0 { 1 } else { 0 })
}

/// The notifications of a file that repeat an earlier one's app and id, found as the
/// records go by in file order: (index, id, index of the first).
#[derive(Default)]
struct RepeatedIds {
    first: std::collections::HashMap<(String, String), usize>,
    next: usize,
    found: Vec<(usize, String, usize)>,
}

impl RepeatedIds {
    fn add(&mut self, records: &[crate::model::Record]) {
        for r in records {
            let i = self.next;
            self.next += 1;
            if let crate::model::Record::Notification(n) = r
                && let Some(id) = n.id.as_deref()
            {
                match self.first.entry((n.app.clone(), id.to_string())) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        self.found.push((i, id.to_string(), *e.get()))
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(i);
                    }
                }
            }
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One-shot ingest through the watcher's own path: accepted files are committed and moved to
/// `processed_dir` (deleted with `keep_processed = false`), rejected ones moved to
/// `rejected_dir` with their report, wherever they were. Exit 1 if any file was not accepted.
pub fn ingest(config: &Path, files: &[PathBuf]) -> anyhow::Result<i32> {
    let cfg = Arc::new(super::load_config_for_files(config)?);
    let _log = crate::logging::init_one_shot(&cfg.log);
    let store = Store::open(&cfg.store.path, false)?;
    let ingestor = Ingestor::new(cfg, store);
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
        .collect();
    // A file named twice (or by two paths, or hard links) is taken once: its
    // second name would find it moved away, and log a second `ingested` line for it.
    let mut first_named: std::collections::HashMap<FileKey, usize> = Default::default();
    let again: Vec<Option<usize>> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| match first_named.entry(file_key(p)) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
                None
            }
        })
        .collect();
    let candidates = paths
        .iter()
        .zip(&again)
        .filter(|(p, again)| again.is_none() && !is_dotfile(p))
        .map(|(p, _)| Candidate {
            path: p.clone(),
            settled: true,
            waits_for_earlier: false,
        })
        .collect();
    let mut results = ingestor.process(candidates);
    let mut failed = 0;
    for ((given, path), again) in files.iter().zip(&paths).zip(&again) {
        if let Some(first) = again {
            say(format!(
                "{}: the same file as {}, taken once",
                given.display(),
                files[*first].display()
            ));
            continue;
        }
        if is_dotfile(path) {
            failed += 1;
            say(format!(
                "{}: not ingested: a dotfile, which the inbox ignores (writers stage files under dot names); rename it without the leading dot to take it",
                given.display()
            ));
            continue;
        }
        let Some(i) = results.iter().position(|r| &r.path == path) else {
            continue;
        };
        let r = results.swap_remove(i);
        let shown = given.display();
        match r.outcome {
            FileOutcome::Accepted(a) => {
                let dups = a.store.duplicates.len();
                let whither = match &a.moved_to {
                    Some(p) => format!(" -> {}", p.display()),
                    None => String::new(),
                };
                if let Some(e) = a.move_error {
                    failed += 1;
                    say(format!("{shown}: committed, but not moved: {e}"));
                } else if a.store.already_committed {
                    say(format!(
                        "{shown}: already committed earlier; moved{whither}"
                    ));
                } else {
                    say(format!(
                        "{shown}: accepted ({} device record{}, {} notification{} queued{}){whither}",
                        a.devices,
                        plural(a.devices),
                        a.store.notifications_queued,
                        plural(a.store.notifications_queued),
                        if dups > 0 {
                            format!(
                                ", {dups} duplicate{} skipped: {}",
                                plural(dups),
                                a.store.duplicate_names(usize::MAX).join(", ")
                            )
                        } else {
                            String::new()
                        }
                    ));
                }
            }
            FileOutcome::Rejected(rej) => {
                failed += 1;
                let whither = match (&rej.moved_to, &rej.report) {
                    (Some(m), Some(rp)) => {
                        format!(" -> {} (report {})", m.display(), rp.display())
                    }
                    _ => String::new(),
                };
                let count = rej.problem_count();
                say(format!(
                    "{shown}: rejected ({}, {count} problem{}){whither}",
                    rej.reason.code(),
                    plural(count)
                ));
                for p in &rej.problems {
                    say(format!("  {p}"));
                }
                if let Some(e) = rej.move_error {
                    say(format!("  (not moved: {e})"));
                }
            }
            FileOutcome::InProgress(why) | FileOutcome::Failed(why) => {
                failed += 1;
                say(format!("{shown}: not ingested: {why}"));
            }
            FileOutcome::Ignored(why) => {
                failed += 1;
                say(format!("{shown}: not ingested: {why}"));
            }
            FileOutcome::Vanished => {
                failed += 1;
                say(format!("{shown}: not ingested: no such file"));
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// A dotfile, which the inbox never takes, so `ingest` does not either: it would take a
/// dropper's file still being written under its staging name, and leave a processed copy no
/// retention removes.
fn is_dotfile(path: &Path) -> bool {
    path.file_name().is_some_and(crate::inbox::is_dotfile)
}

/// What tells files apart: device and inode where the file is there to ask, else its path.
#[derive(Debug, PartialEq, Eq, Hash)]
enum FileKey {
    Inode(u64, u64),
    Path(PathBuf),
}

fn file_key(path: &Path) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    // Not followed: a symlink is rejected as itself, its target untouched.
    match std::fs::symlink_metadata(path) {
        Ok(m) => FileKey::Inode(m.dev(), m.ino()),
        Err(_) => FileKey::Path(path.to_path_buf()),
    }
}

/// One line of `ingest`'s answer. Problems quote drop files, whose bytes a dropper chose:
/// control characters are written as escapes, as in `status` and `show`.
fn say(line: String) {
    println!("{}", super::safe(&line));
}
