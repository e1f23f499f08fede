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

/// Which process holds the `flock` of `path`, from the kernel's list of locks
/// (`/proc/locks`), without touching the lock: `Some(Some(pid))`, `Some(None)` when nobody
/// holds it (or the file does not exist), `None` when this system cannot tell (no
/// `/proc/locks`). Taking the lock to find out would make a daemon starting at that moment
/// refuse to start.
pub fn holder(path: &Path) -> Option<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Some(None);
    };
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    Some(holder_in(&locks, meta.dev(), meta.ino()))
}

/// The pid of the `FLOCK` on the file (`dev`, `ino`) in the text of `/proc/locks`: lines
/// such as `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF` (the device as hexadecimal
/// major:minor); a waiter's line (`1: -> FLOCK …`) holds nothing.
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // Linux's encoding of a dev_t (as glibc's major() and minor()).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    locks.lines().find_map(|line| {
        let mut f = line.split_whitespace().skip(1);
        if f.next()? != "FLOCK" {
            return None;
        }
        let (_, _, pid, file) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let mut parts = file.split(':');
        let (maj, min, i) = (parts.next()?, parts.next()?, parts.next()?);
        let same = u64::from_str_radix(maj, 16).ok()? == major
            && u64::from_str_radix(min, 16).ok()? == minor
            && i.parse::<u64>().ok()? == ino;
        same.then(|| pid.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_lock_is_found_without_taking_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        assert_eq!(holder(&path), Some(None), "no file, no holder");
        let held = try_exclusive(&path).unwrap().expect("free at first");
        if std::path::Path::new("/proc/locks").exists() {
            assert_eq!(holder(&path), Some(Some(std::process::id())));
            drop(held);
            assert_eq!(holder(&path), Some(None));
            // Looking did not take it.
            assert!(try_exclusive(&path).unwrap().is_some());
        }
        let text = "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 4343 fd:01:1234 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 77 fd:01:99 0 EOF\n";
        let dev = (0xfd << 8) | 0x01;
        assert_eq!(holder_in(text, dev, 1234), Some(4242));
        assert_eq!(holder_in(text, dev, 99), None, "a POSIX lock is not ours");
        assert_eq!(holder_in(text, dev + 1, 1234), None, "another device");
    }

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
