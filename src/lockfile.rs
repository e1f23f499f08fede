//! "One pushdrop process owns this": an advisory, whole-file lock (`flock`) on a lock file or
//! a folder, held as long as the process keeps the returned file open, and let go by the
//! kernel when the process ends however it ends (kill -9 included), so no stale lock outlives
//! a crash.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Opens (creating) `path` and takes its exclusive lock: `Ok(None)` when another process
/// holds it. Tried again for a moment before giving up, so that [`holder`]'s brief shared
/// lock (a `status` asking) never makes a daemon refuse to start.
pub fn try_exclusive(path: &Path) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    for _ in 0..10 {
        if flock_now(&file, libc::LOCK_EX)? {
            return Ok(Some(file));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(None)
}

/// Takes the exclusive lock of the folder `dir` itself without waiting (`Ok(None)` when
/// another process holds it): nothing is created in it. Some network filesystems lock only
/// files opened for writing, which a folder never is: they answer with an error.
pub fn try_exclusive_dir(dir: &Path) -> std::io::Result<Option<File>> {
    let file = File::open(dir)?;
    Ok(flock_now(&file, libc::LOCK_EX)?.then_some(file))
}

/// `flock(op)` without waiting: false when another process holds a conflicting lock.
fn flock_now(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether a lock is held, and by which process when the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Held; the pid unless its holder is out of sight (another PID namespace: a sidecar's
    /// container).
    By(Option<u32>),
    Free,
}

/// Who holds the `flock` of `path`: the kernel's list of locks (`/proc/locks`) names the
/// process. A holder that list does not show (one in another PID namespace) is found by
/// asking for a shared lock without waiting, let go at once (a daemon starting at that very
/// moment retries its own for a while: see [`try_exclusive`]). `None` when this system
/// cannot tell (the file cannot be opened to ask).
pub fn holder(path: &Path) -> Option<Held> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Some(Held::Free);
    };
    if let Some(pid) = std::fs::read_to_string("/proc/locks")
        .ok()
        .and_then(|locks| holder_in(&locks, meta.dev(), meta.ino()))
    {
        return Some(Held::By(Some(pid)));
    }
    let file = File::open(path).ok()?;
    // Closing the file lets a shared lock taken here go at once.
    match flock_now(&file, libc::LOCK_SH).ok()? {
        true => Some(Held::Free),
        false => Some(Held::By(None)),
    }
}

/// The pid of the process holding `path`'s lock, when one does and this system can see it
/// (for a refusal to name it).
pub fn holder_pid(path: &Path) -> Option<u32> {
    match holder(path)? {
        Held::By(pid) => pid,
        Held::Free => None,
    }
}

/// " (pid N)" for a refusal that names a lock's holder, or nothing when it is out of sight.
pub fn pid_text(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
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
        assert_eq!(holder(&path), Some(Held::Free), "no file, no holder");
        let held = try_exclusive(&path).unwrap().expect("free at first");
        let seen = holder(&path);
        if std::path::Path::new("/proc/locks").exists() {
            assert_eq!(seen, Some(Held::By(Some(std::process::id()))));
        } else {
            assert_eq!(seen, Some(Held::By(None)));
        }
        drop(held);
        assert_eq!(holder(&path), Some(Held::Free));
        // Looking did not keep it.
        assert!(try_exclusive(&path).unwrap().is_some());
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
