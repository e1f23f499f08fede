//! Receipts: with `[receipts] dir` set, every notification whose deliveries are all final gets
//! `<dir>/<id>.json`, so a dropper that cannot read logs still learns what happened. Files are
//! written atomically (temporary name, fsync, rename), so a reader never sees half a receipt.
//!
//! The database says a notification finished before its receipt is written, so a crash in
//! between would lose the receipt: at start the daemon sweeps the notifications finished
//! within the retention window and writes the receipts that are missing
//! ([`Receipts::recover`]), and removes the temporary files a crash left behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::store::query::Reader;
use crate::store::{FinishedNotification, StoreError};

/// Finished notifications looked at per read of the start-up sweep.
const SWEEP_PAGE: usize = 500;

/// Why a receipt could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt store query failed: {0}")]
    Store(#[from] StoreError),
    #[error("cannot write receipt {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("receipt lock poisoned")]
    Poisoned,
}

/// Writes receipts from a read-only connection of its own.
pub struct Receipts {
    dir: PathBuf,
    max_sent_tokens: usize,
    reader: Mutex<Option<Reader>>,
    db: PathBuf,
    /// Set once the temporary files a previous process left were removed (how many). Every
    /// write waits for it, so the clean-up never removes a file this process is writing.
    swept_temp: OnceLock<usize>,
}

/// What [`Receipts::recover`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Finished notifications looked at (one `stat` of their receipt each).
    pub checked: usize,
    /// Receipts that were missing and are written now.
    pub written: usize,
    /// Whether the sweep was asked to stop before it was through.
    pub stopped: bool,
}

/// Whether `name` is one of the temporary files [`Receipts::write`] makes: `.<id>.json.tmp`,
/// `<id>` made of the characters a notification id may hold.
fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".json.tmp"))
        .is_some_and(|id| {
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
        })
}

impl Receipts {
    /// Receipts into `dir`, reading from the database at `db`.
    pub fn new(dir: &Path, db: &Path, max_sent_tokens: usize) -> Receipts {
        Receipts {
            dir: dir.to_path_buf(),
            max_sent_tokens,
            reader: Mutex::new(None),
            db: db.to_path_buf(),
            swept_temp: OnceLock::new(),
        }
    }

    /// Removes the temporary files (`.<id>.json.tmp`) that a process killed while writing
    /// receipts left behind, once per process; returns how many. They are in the folder, or
    /// in an app's folder inside it (a second app's receipt of the same id). Nothing else is
    /// touched. Blocking (reads the folders).
    pub fn remove_stale_temp_files(&self) -> usize {
        *self.swept_temp.get_or_init(|| {
            let mut removed = 0;
            for sub in remove_temp_files_in(&self.dir, &mut removed) {
                remove_temp_files_in(&sub, &mut removed);
            }
            removed
        })
    }

    /// Writes the missing receipts of the notifications that finished between `since_ms` and
    /// `until_ms`: one `stat` per finished notification, a write where there is no
    /// `<id>.json`. Calls `written` after each receipt it wrote. Stops early (between two
    /// receipts) once `stop` is set; the next start picks up the rest. Returns at the first
    /// store or write error (an unwritable folder fails every receipt alike). Blocking.
    pub fn recover(
        &self,
        since_ms: i64,
        until_ms: i64,
        stop: &AtomicBool,
        mut written: impl FnMut(&FinishedNotification, &Path),
    ) -> Result<Recovered, ReceiptError> {
        self.remove_stale_temp_files();
        let mut done = Recovered::default();
        let mut after: Option<(String, String)> = None;
        loop {
            let page = {
                let mut guard = self.reader.lock().map_err(|_| ReceiptError::Poisoned)?;
                if guard.is_none() {
                    *guard = Some(Reader::open(&self.db)?);
                }
                let Some(reader) = guard.as_ref() else {
                    return Ok(done);
                };
                let after = after.as_ref().map(|(a, i)| (a.as_str(), i.as_str()));
                reader.finished_between(since_ms, until_ms, after, SWEEP_PAGE)?
            };
            for f in &page {
                if stop.load(Ordering::Relaxed) {
                    done.stopped = true;
                    return Ok(done);
                }
                done.checked += 1;
                let path = self.path_for(&f.app, &f.ext_id);
                match std::fs::symlink_metadata(&path) {
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(ReceiptError::Io { path, source }),
                }
                if let Some(path) = self.write_data(f.notification_id, true)? {
                    done.written += 1;
                    written(f, &path);
                }
            }
            match page.last() {
                Some(last) if page.len() == SWEEP_PAGE => {
                    after = Some((last.app.clone(), last.ext_id.clone()))
                }
                _ => return Ok(done),
            }
        }
    }

    /// Where the receipt of `app`'s notification `id` goes: `<dir>/<id>.json`, as the contract
    /// says, unless that file holds another app's receipt (ids are unique per app only); then
    /// `<dir>/<app>/<id>.json`, so that no app's receipt replaces another's.
    fn path_for(&self, app: &str, id: &str) -> PathBuf {
        let plain = self.dir.join(format!("{id}.json"));
        if receipt_app(&plain).is_some_and(|owner| owner != app) {
            self.dir.join(app_folder(app)).join(format!("{id}.json"))
        } else {
            plain
        }
    }

    /// Writes the receipt of a finished notification; returns its path (None if the
    /// notification is gone, e.g. purged). Blocking.
    pub fn write(&self, notification_id: i64) -> Result<Option<PathBuf>, ReceiptError> {
        self.write_data(notification_id, false)
    }

    /// Writes a receipt; with `only_finished`, not for a notification that is no longer
    /// finished (requeued by `pushdrop retry`: its receipt comes when it finishes again).
    fn write_data(
        &self,
        notification_id: i64,
        only_finished: bool,
    ) -> Result<Option<PathBuf>, ReceiptError> {
        self.remove_stale_temp_files();
        let mut guard = self.reader.lock().map_err(|_| ReceiptError::Poisoned)?;
        if guard.is_none() {
            *guard = Some(Reader::open(&self.db)?);
        }
        let Some(reader) = guard.as_ref() else {
            return Ok(None);
        };
        let Some(data) = reader.receipt(notification_id, self.max_sent_tokens)? else {
            return Ok(None);
        };
        if only_finished && !data.finished {
            return Ok(None);
        }
        drop(guard);
        let path = self.path_for(&data.app, &data.id);
        let io = |source| ReceiptError::Io {
            path: path.clone(),
            source,
        };
        let folder = path.parent().unwrap_or(&self.dir);
        crate::inbox::fsutil::make_dirs(folder).map_err(io)?;
        // Something other than a receipt where the receipt goes (a symlink, a FIFO, a
        // device) is left alone and said, as in the inbox: a rename would replace it.
        if let Ok(meta) = std::fs::symlink_metadata(&path)
            && !meta.is_file()
            && !meta.is_dir()
        {
            return Err(io(std::io::Error::other(
                "is not a regular file (a symlink, FIFO or device): not replaced; remove it",
            )));
        }
        let tmp = folder.join(format!(".{}.json.tmp", data.id));
        let mut body = serde_json::to_vec_pretty(&data).map_err(|e| io(e.into()))?;
        body.push(b'\n');
        // A new file, never through whatever is at the temporary name (a symlink planted
        // there would have the receipt written into its target): that is removed first.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let mut open = std::fs::OpenOptions::new();
        open.write(true).create_new(true);
        crate::inbox::fsutil::write_and_rename(&open, &tmp, &path, &body).map_err(io)?;
        Ok(Some(path))
    }
}

/// Removes the receipt writer's temporary files directly in `dir`, counting them into
/// `removed`; returns the folders found there (the apps' folders).
fn remove_temp_files_in(dir: &Path, removed: &mut usize) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(event = "receipt_error", dir = %dir.display(), error = %e, "cannot list a receipts folder to remove stale temporary files");
            return Vec::new();
        }
    };
    let mut folders = Vec::new();
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            folders.push(entry.path());
            continue;
        }
        let name = entry.file_name();
        if !kind.is_file() || !name.to_str().is_some_and(is_temp_name) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => *removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(event = "receipt_error", file = %entry.path().display(), error = %e, "cannot remove a stale temporary receipt file")
            }
        }
    }
    folders
}

/// The app a receipt file names, read from its first KiB only: a receipt names its id, then
/// its app, at its top, and the rest (every failed token) may be long; the start-up sweep
/// asks this of every receipt in the retention window.
fn receipt_app(path: &Path) -> Option<String> {
    use std::io::Read;
    const KEY: &str = "\"app\":";
    let mut head = Vec::with_capacity(1024);
    // Not through a symlink, not blocking on a FIFO: only a regular file is a receipt.
    let file = crate::inbox::fsutil::open_nofollow(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    file.take(1024).read_to_end(&mut head).ok()?;
    let head = String::from_utf8_lossy(&head);
    // An id holds no `"`, so the first `"app":` is the key.
    let value = head[head.find(KEY)? + KEY.len()..].trim_start();
    serde_json::Deserializer::from_str(value)
        .into_iter::<String>()
        .next()?
        .ok()
}

/// An app's name as a folder name: bytes other than ASCII letters, digits, `-`, `_` and
/// (not first) `.` are written `%XX`, so no name reaches outside the receipts folder.
fn app_folder(app: &str) -> String {
    let mut out = String::with_capacity(app.len());
    for (i, b) in app.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Receipts, app_folder, is_temp_name};

    /// Ids are unique per app only: a receipt never replaces another app's of the same id.
    #[test]
    fn a_second_apps_receipt_of_the_same_id_goes_into_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let r = super::Receipts::new(dir.path(), &dir.path().join("none.db"), 10);
        std::fs::write(
            dir.path().join("same.json"),
            r#"{"id": "same", "app": "alpha", "counts": {}}"#,
        )
        .unwrap();
        assert_eq!(r.path_for("alpha", "same"), dir.path().join("same.json"));
        assert_eq!(
            r.path_for("beta", "same"),
            dir.path().join("beta").join("same.json")
        );
        assert_eq!(r.path_for("beta", "fresh"), dir.path().join("fresh.json"));
    }

    #[test]
    fn an_app_name_never_leaves_the_receipts_folder() {
        assert_eq!(app_folder("buxheti"), "buxheti");
        assert_eq!(app_folder("info.buxheti"), "info.buxheti");
        assert_eq!(app_folder(".."), "%2E.");
        assert_eq!(app_folder("a/b"), "a%2Fb");
    }

    /// The start-up sweep takes temp files from the receipts folder and the apps' folders in
    /// it, nothing deeper, and leaves receipts alone.
    #[test]
    fn stale_temp_files_go_from_the_folder_and_the_apps_folders_only() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("a1");
        let deeper = app.join("deeper");
        std::fs::create_dir_all(&deeper).unwrap();
        for p in [
            dir.path().join(".x.json.tmp"),
            app.join(".y.json.tmp"),
            deeper.join(".z.json.tmp"),
            dir.path().join("x.json"),
            app.join("y.json"),
        ] {
            std::fs::write(p, "{}").unwrap();
        }
        let r = Receipts::new(dir.path(), &dir.path().join("none.db"), 10);
        assert_eq!(r.remove_stale_temp_files(), 2);
        assert!(!dir.path().join(".x.json.tmp").exists());
        assert!(!app.join(".y.json.tmp").exists());
        // Not a folder the writer makes; and receipts stay.
        assert!(deeper.join(".z.json.tmp").exists());
        assert!(dir.path().join("x.json").exists() && app.join("y.json").exists());
    }

    /// Only the temporary names receipts are written under count as stale temp files.
    #[test]
    fn temp_names_are_only_the_receipt_writers_own() {
        for name in [
            ".a.json.tmp",
            ".budget-2026:11@x_y.json.tmp",
            "..json.tmp.json.tmp",
        ] {
            assert!(is_temp_name(name), "{name}");
        }
        for name in [
            "a.json",
            ".a.json",
            "a.json.tmp",
            ".json.tmp",
            ".a b.json.tmp",
            ".a/b.json.tmp",
            ".a.tmp",
            ".ä.json.tmp",
        ] {
            assert!(!is_temp_name(name), "{name}");
        }
    }
}
