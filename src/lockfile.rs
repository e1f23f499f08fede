//! "One pushdrop process owns this": an advisory, whole-file lock (`flock`) on a lock file or
//! a folder, held as long as the process keeps the returned file open, and let go by the
//! kernel when the process ends however it ends (kill -9 included), so no stale lock outlives
//! a crash.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Opens (creating) `path` and takes its exclusive lock without waiting: `Ok(None)` when
/// another process holds it.
pub fn try_exclusive(path: &Path) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    lock(file)
}

/// Takes the exclusive lock of the folder `dir` itself without waiting (`Ok(None)` when
/// another process holds it): nothing is created in it. Some network filesystems lock only
/// files opened for writing, which a folder never is: they answer with an error.
pub fn try_exclusive_dir(dir: &Path) -> std::io::Result<Option<File>> {
    lock(File::open(dir)?)
}

fn lock(file: File) -> std::io::Result<Option<File>> {
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_refused_until_it_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = try_exclusive(&path).unwrap().expect("free at first");
        // flock locks belong to the open file: a second open in this process is a second
        // owner, as another process would be.
        assert!(try_exclusive(&path).unwrap().is_none());
        drop(held);
        assert!(try_exclusive(&path).unwrap().is_some());
    }

    #[test]
    fn a_folder_is_locked_without_a_file_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let held = try_exclusive_dir(dir.path())
            .unwrap()
            .expect("free at first");
        assert!(try_exclusive_dir(dir.path()).unwrap().is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        drop(held);
        assert!(try_exclusive_dir(dir.path()).unwrap().is_some());
    }
}
