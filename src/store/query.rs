//! Read-only queries for `status`, `show`, `devices`, receipts and the admin endpoint. They
//! open their own connection, so they never wait behind the writer thread.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// A read-only connection to the database.
pub struct Reader {
    conn: Connection,
}

impl Reader {
    /// Opens the database read-only; it must exist.
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Reader { conn })
    }

    /// The underlying connection, for queries not wrapped here yet.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}
