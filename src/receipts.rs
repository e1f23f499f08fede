//! Receipts: with `[receipts] dir` set, every notification whose deliveries are all final gets
//! `<dir>/<id>.json`, so a dropper that cannot read logs still learns what happened. Files are
//! written atomically (temporary name, fsync, rename), so a reader never sees half a receipt.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::store::StoreError;
use crate::store::query::Reader;

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
}

impl Receipts {
    /// Receipts into `dir`, reading from the database at `db`.
    pub fn new(dir: &Path, db: &Path, max_sent_tokens: usize) -> Receipts {
        Receipts {
            dir: dir.to_path_buf(),
            max_sent_tokens,
            reader: Mutex::new(None),
            db: db.to_path_buf(),
        }
    }

    /// Writes the receipt of a finished notification; returns its path (None if the
    /// notification is gone, e.g. purged). Blocking.
    pub fn write(&self, notification_id: i64) -> Result<Option<PathBuf>, ReceiptError> {
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
        drop(guard);
        let path = self.dir.join(format!("{}.json", data.id));
        let io = |source| ReceiptError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = self.dir.join(format!(".{}.json.tmp", data.id));
        let mut body = serde_json::to_vec_pretty(&data).map_err(|e| io(e.into()))?;
        body.push(b'\n');
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(Some(path))
    }
}
