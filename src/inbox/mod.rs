//! The drop inbox (SPEC §1–2): watch a directory, parse and validate drop files, commit their
//! records to the store, move the files to `processed/` or `rejected/`.
//!
//! - [`parse`]: bytes → validated records, or every problem;
//! - [`ingest`]: one file (or many) → group commit → move; used by the watcher and
//!   `pushdrop ingest`;
//! - [`watch`]: the watcher thread (kernel events as hints, directory scans as the truth);
//! - [`report`]: the `<name>.error.json` report.

pub mod fsutil;
pub mod ingest;
pub mod parse;
pub mod report;
pub mod watch;

pub use ingest::{Candidate, FileOutcome, FileResult, Ingestor};
pub use watch::{InboxError, InboxHandle, check_not_taken, start};

/// The names (as the store records them) of the drop files in `dir` now, or `None` when
/// the folder cannot be read. The purge keeps the committed-file records of these (and all
/// of them on `None`).
pub fn drop_names(dir: &std::path::Path) -> Option<Vec<String>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.ok()?;
        if is_drop_name(&e.file_name()) {
            names.push(ingest::display_name(&e.path()));
        }
    }
    Some(names)
}

/// What waits in the inbox folder now, for `status`: the drop-named entries the daemon will
/// take (or reject: symlinks, FIFOs) and the age of the oldest; or why the folder cannot be
/// read.
pub fn waiting(dir: &std::path::Path) -> crate::store::query::InboxState {
    let mut state = crate::store::query::InboxState {
        dir: dir.display().to_string(),
        waiting_files: None,
        oldest_waiting_s: None,
        error: None,
        stuck_files: None,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            state.error = Some(e.to_string());
            return state;
        }
    };
    let now = std::time::SystemTime::now();
    let mut files = 0u64;
    let mut oldest = std::time::Duration::ZERO;
    for e in entries.flatten() {
        // The entry's type comes with the listing (no stat); a file's age needs one (of the
        // entry itself: a symlink's own time).
        if !is_drop_name(&e.file_name()) || e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        files += 1;
        if let Some(age) = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
        {
            oldest = oldest.max(age);
        }
    }
    state.waiting_files = Some(files);
    state.oldest_waiting_s = Some((oldest.as_secs_f64() * 10.0).round() / 10.0);
    state
}

/// Whether a directory entry's name is one the inbox takes: `*.json` or `*.jsonl`, not a
/// dotfile (writers stage files under dot names before renaming them in).
pub fn is_drop_name(name: &std::ffi::OsStr) -> bool {
    // Non-UTF-8 names still count when their suffix is right.
    !is_dotfile(name) && parse::FileKind::from_name(&name.to_string_lossy()).is_some()
}

/// A name the inbox never takes however it ends (SPEC 1: dotfiles are ignored): a
/// dropper's file still being written under its staging name.
pub fn is_dotfile(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn drop_names() {
        assert!(is_drop_name(OsStr::new("a.json")));
        assert!(is_drop_name(OsStr::new("a b é.jsonl")));
        assert!(!is_drop_name(OsStr::new(".a.json")));
        assert!(!is_drop_name(OsStr::new("a.json.tmp")));
        assert!(!is_drop_name(OsStr::new("a.txt")));
        assert!(!is_drop_name(OsStr::new("processed")));
    }
}
