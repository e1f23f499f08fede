//! File-system steps of the inbox that must be exactly right for crash safety: moves that
//! never overwrite, directory fsyncs, atomic report writes, names that fit `NAME_MAX`.

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A file name as pushdrop shows it (logs, reports, `status`, the store's record of committed
/// files): bytes that are not UTF-8 are written `\xNN`, as `ls -b` shows them, so that the
/// file can be found and two such names stay apart (`to_string_lossy` makes every one of
/// them U+FFFD).
pub fn show_name(name: &OsStr) -> std::borrow::Cow<'_, str> {
    let bytes = name.as_bytes();
    if let Ok(text) = std::str::from_utf8(bytes) {
        return std::borrow::Cow::Borrowed(text);
    }
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() + 16);
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Longest file name (bytes) on the file systems pushdrop runs on.
pub const NAME_MAX: usize = 255;

/// A file's or folder's (device, inode): whether a name still leads to the same one (a
/// database replaced under the daemon, an inbox folder made again, a log file rotated away).
pub fn identity(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), atomically where the
/// kernel and file system allow (`renameat2(RENAME_NOREPLACE)`): a file dropped twice under one
/// name must never overwrite the first copy in `processed/` or `rejected/`.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::CString;
        let f = CString::new(from.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let t = CString::new(to.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Not supported by this kernel or file system: fall back below.
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => {}
            _ => return Err(err),
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    std::fs::rename(from, to)
}

/// Moves a directory entry without overwriting, across file systems too (`pushdrop ingest` of a
/// file outside the inbox): a regular file is copied and synced, a symlink re-created (its
/// target is never read), then the original removed.
pub fn move_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match rename_noreplace(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        other => return other,
    }
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from)?;
        std::os::unix::fs::symlink(target, to)?;
    } else if meta.file_type().is_file() {
        // Copied under a hidden temporary name, then renamed: a full disk or a kill during
        // the copy leaves no cut-off file under the real name (only a `.pushdrop-*.tmp`,
        // which the retention sweep removes once it is an hour old).
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        let tmp = to.with_file_name(temp_name("mv"));
        let copied = (|| {
            let mut src = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags_nofollow()
                .open(from)?;
            let mut dst = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            io::copy(&mut src, &mut dst)?;
            dst.sync_all()?;
            rename_noreplace(&tmp, to)
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    } else {
        return Err(io::Error::other(
            "cannot move a special file across file systems",
        ));
    }
    std::fs::remove_file(from)
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
    }
}

/// Opens a file for reading without following a symlink and without blocking on a FIFO.
pub fn open_nofollow(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nofollow()
        .open(path)
}

/// Whether another process has `file` (opened read-only) open for writing, asked of the
/// kernel: Linux refuses a read lease (EAGAIN) while any process holds the file open for
/// writing. The lease is dropped at once. `None` where the kernel cannot tell: a file of
/// another owner when pushdrop lacks CAP_LEASE, a file system without leases (NFS, some
/// overlays), leases turned off (`fs.leases-enable = 0`).
///
/// Why: events and settling tell when a writer last *wrote* and *closed*, not whether another
/// writer still holds the file open (a file renamed in and written on through its old
/// descriptor, two appenders of which one closed). What such a writer wrote after the take
/// would go to the moved file and be lost.
pub fn open_for_writing_elsewhere(file: &std::fs::File) -> Option<bool> {
    use std::os::fd::AsRawFd;
    // A writer opening the file while the lease is held makes the kernel signal the lease's
    // holder with SIGIO, whose default action ends the process. Nothing else in pushdrop
    // uses SIGIO.
    static IGNORE_SIGIO: std::sync::Once = std::sync::Once::new();
    IGNORE_SIGIO.call_once(|| {
        // SAFETY: sets the disposition of one signal to "ignore"; no handler code runs.
        unsafe {
            libc::signal(libc::SIGIO, libc::SIG_IGN);
        }
    });
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns for the duration of the call.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Sets `path`'s modification time to now (not following a symlink). The kernel allows it to
/// the file's owner and to anyone who may write the file; elsewhere it fails, and the caller
/// goes on without it.
pub fn touch_mtime(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `create_dir_all`, whose error says what is wrong when something other than a folder
/// stands on the path (the OS only says "File exists" or "Not a directory").
pub fn make_dirs(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        if !matches!(
            e.kind(),
            io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory
        ) {
            return e;
        }
        match in_the_way(dir) {
            Some(b) => io::Error::new(
                e.kind(),
                format!("{} is in the way: it is not a folder", b.path.display()),
            ),
            None => e,
        }
    })
}

/// [`make_dirs`] for a folder drop files are moved into (`processed_dir`, `rejected_dir`),
/// which must be a real folder, not a symbolic link. Those folders sit in the inbox by
/// default, where whoever may drop files may also rename the folder away and put a link in
/// its place: moves through the link would put drop files (a forged receipt, say) wherever
/// the daemon may write, and retention would delete there. Checked before every move; a
/// link swapped in between the check and the rename is not caught.
pub fn make_destination(dir: &Path) -> io::Result<()> {
    make_dirs(dir)?;
    if is_symlink(dir) {
        return Err(io::Error::other(format!(
            "{} is a symbolic link, not a folder: drop files are moved only into a real folder (whoever may write the inbox could point a link anywhere); make it a folder, or set the key to the link's target",
            dir.display()
        )));
    }
    Ok(())
}

/// Whether `path` itself (not what it points to) is a symbolic link.
pub fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// What stands where a folder (or one above it) must be made.
pub struct Blocker<'a> {
    pub path: &'a Path,
    /// A symbolic link to nothing, rather than a file (or a link to one).
    pub dangling: bool,
}

/// The first of `dir` and the folders above it that exists and is not a folder: a file, or a
/// link to nothing (a link to a folder is a folder here). `None` when `dir` can be made.
pub fn in_the_way(dir: &Path) -> Option<Blocker<'_>> {
    dir.ancestors().find_map(|p| match std::fs::metadata(p) {
        Ok(m) => (!m.is_dir()).then_some(Blocker {
            path: p,
            dangling: false,
        }),
        Err(_) => std::fs::symlink_metadata(p)
            .is_ok_and(|m| m.file_type().is_symlink())
            .then_some(Blocker {
                path: p,
                dangling: true,
            }),
    })
}

/// Makes renames and creations in `dir` durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The process that made temporary file `name` of `kind` (see [`temp_name`]), if it is one.
pub fn temp_name_pid(name: &std::ffi::OsStr, kind: &str) -> Option<u32> {
    let rest = name
        .to_str()?
        .strip_prefix(".pushdrop-")?
        .strip_prefix(kind)?;
    let (pid, n) = rest
        .strip_prefix('-')?
        .strip_suffix(".tmp")?
        .split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether this process may access `path` as `mode` (`libc::W_OK`, …), asked with
/// `access(2)`, which opens nothing (see the store's `writable` for why that matters).
pub fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("the path holds a NUL byte"))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call; access() only reads it.
    if unsafe { libc::access(c.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A unique name for one of pushdrop's temporary files, `.pushdrop-<kind>-<pid>-<n>.tmp`
/// (hidden and `*.tmp`: the inbox's scan ignores it; the retention sweep removes it once it
/// is an hour old).
pub fn temp_name(kind: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        ".pushdrop-{kind}-{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `content` to `dir/name` atomically: a temporary dotfile, fsync, rename over.
pub fn write_atomic(dir: &Path, name: &OsStr, content: &[u8]) -> io::Result<PathBuf> {
    let tmp = dir.join(temp_name("new"));
    let dest = dir.join(name);
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    write_and_rename(&open, &tmp, &dest, content)?;
    Ok(dest)
}

/// Opens `tmp` with `open`, writes `content`, syncs it and renames it to `dest`: readers of
/// `dest` see the whole content or nothing. A temporary file this made is removed when a
/// later step fails (a full disk), so none is left to take an inode more.
pub fn write_and_rename(
    open: &std::fs::OpenOptions,
    tmp: &Path,
    dest: &Path,
    content: &[u8],
) -> io::Result<()> {
    let mut f = open.open(tmp)?;
    let written = f
        .write_all(content)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(tmp, dest));
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// `base + suffix`, shortened to fit [`NAME_MAX`] by cutting `base` and adding a short hash of
/// it (so two long names stay distinct).
pub fn fit_name(base: &OsStr, suffix: &str) -> OsString {
    let b = base.as_bytes();
    if b.len() + suffix.len() <= NAME_MAX {
        let mut out = base.to_os_string();
        out.push(suffix);
        return out;
    }
    let hash = hex::encode(&Sha256::digest(b)[..4]);
    let room = NAME_MAX - suffix.len() - hash.len() - 1;
    let mut cut = room.min(b.len());
    // Do not split a UTF-8 character.
    while cut > 0 && (b[cut] & 0b1100_0000) == 0b1000_0000 {
        cut -= 1;
    }
    let mut out = b[..cut].to_vec();
    out.push(b'~');
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(out)
}

/// The `n`-th name to try for `name` in a destination folder: the name itself, then
/// `stem~n.ext` (keeping `.json`/`.jsonl` last so the copy still reads as what it is).
pub fn nth_name(name: &OsStr, n: usize) -> OsString {
    if n == 0 {
        return fit_name(name, "");
    }
    let b = name.as_bytes();
    let (stem, ext) = match b.iter().rposition(|&c| c == b'.') {
        Some(i) if i > 0 => (&b[..i], &b[i..]),
        _ => (b, &b""[..]),
    };
    let suffix = format!("~{n}{}", String::from_utf8_lossy(ext));
    fit_name(OsStr::from_bytes(stem), &suffix)
}

/// The report name of a file moved to `rejected/` as `moved`.
pub fn report_name(moved: &OsStr) -> OsString {
    fit_name(moved, ".error.json")
}

#[cfg(test)]
mod tests {

    /// Names that are not UTF-8 are shown byte for byte, as `ls -b` does: two of them stay
    /// apart, where U+FFFD made them one.
    #[test]
    fn names_that_are_not_utf8_are_shown_with_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let show = |b: &[u8]| super::show_name(std::ffi::OsStr::from_bytes(b)).into_owned();
        assert_eq!(show(b"caf\xe9.json"), "caf\\xe9.json");
        assert_ne!(show(b"caf\xe9.json"), show(b"caf\xe8.json"));
        assert_eq!(show("café 🙂.json".as_bytes()), "café 🙂.json");
        assert_eq!(show(b"\xff\xfe.jsonl"), "\\xff\\xfe.jsonl");
    }

    #[test]
    fn a_file_in_the_way_of_a_folder_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("receipts"), "x").unwrap();
        let e = make_dirs(&d.path().join("receipts/app")).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("receipts is in the way: it is not a folder"),
            "{e}"
        );
        let e = make_dirs(&d.path().join("receipts")).unwrap_err();
        assert!(e.to_string().contains("is in the way"), "{e}");
        make_dirs(&d.path().join("a/b")).unwrap();
        make_dirs(&d.path().join("a/b")).unwrap();
    }
    use super::*;

    #[test]
    fn names_fit() {
        assert_eq!(nth_name(OsStr::new("a.json"), 0), "a.json");
        assert_eq!(nth_name(OsStr::new("a.json"), 2), "a~2.json");
        assert_eq!(nth_name(OsStr::new("a.b.jsonl"), 1), "a.b~1.jsonl");
        assert_eq!(report_name(OsStr::new("a.json")), "a.json.error.json");
        let long = "é".repeat(120) + ".json"; // 245 bytes
        let r = report_name(OsStr::new(&long));
        assert!(r.len() <= NAME_MAX);
        assert!(r.to_str().unwrap().ends_with(".error.json"));
        let n = nth_name(OsStr::new(&long), 3);
        assert!(n.len() <= NAME_MAX);
        assert!(n.to_str().unwrap().ends_with("~3.json"));
        assert_ne!(
            report_name(OsStr::new(&(long.clone() + "x"))),
            report_name(OsStr::new(&(long + "y")))
        );
    }

    /// Across file systems (here the temp folder and `/dev/shm`, where they differ) the file
    /// is copied under a temporary name and renamed: nothing but the whole file ever has
    /// the real name, and a name taken stops the move before any copy.
    #[test]
    fn a_move_to_another_file_system_shows_only_the_whole_file() {
        use std::os::unix::fs::MetadataExt;
        let src = tempfile::tempdir().unwrap();
        let Ok(dst) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm here: skipped");
            return;
        };
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        if dev(src.path()) == dev(dst.path()) {
            eprintln!("/dev/shm is on the temp folder's file system: skipped");
            return;
        }
        let from = src.path().join("a.jsonl");
        let body = "x".repeat(1 << 20);
        std::fs::write(&from, &body).unwrap();
        let taken = dst.path().join("taken.jsonl");
        std::fs::write(&taken, "other").unwrap();
        let e = move_noreplace(&from, &taken).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&taken).unwrap(), "other");
        let to = dst.path().join("a.jsonl");
        move_noreplace(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), body);
        assert!(!from.exists());
        let mut names: Vec<_> = std::fs::read_dir(dst.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["a.jsonl", "taken.jsonl"], "no temporary file left");
    }

    #[test]
    fn noreplace_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "2").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "2");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "1");
    }
}
