//! Files and folders a command run as root makes where the daemon's user must write them
//! later. An operator's `sudo pushdrop purge` on a deployment owned by the daemon's user may
//! be the first to make a period's log file, the log folder or the database; left root's,
//! the daemon (not root) could not write them: it would lose its log lines, or not start.
//! So, run as root, pushdrop gives what it made to the owner of the folder it is in, when
//! that owner is not root (a deployment owned by root needs nothing).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Whether this process runs as root: nothing to give away otherwise.
pub fn root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The (uid, gid) to give root's new files to: `folder`'s owner, when this process is root
/// and the folder is not root's.
fn new_owner(folder: &Path) -> Option<(u32, u32)> {
    if !root() {
        return None;
    }
    let m = std::fs::metadata(folder).ok()?;
    (m.uid() != 0).then_some((m.uid(), m.gid()))
}

/// Gives each of `paths` that root owns (regular files and folders, never a symlink's
/// target) to the owner of `folder`. Best effort: what fails shows at the daemon's start,
/// which names the file it cannot open.
pub fn give_to_owner_of(folder: &Path, paths: impl IntoIterator<Item = impl AsRef<Path>>) {
    let Some((uid, gid)) = new_owner(folder) else {
        return;
    };
    for p in paths {
        let p = p.as_ref();
        if let Ok(m) = p.symlink_metadata()
            && (m.is_file() || m.is_dir())
            && m.uid() == 0
        {
            let _ = std::os::unix::fs::lchown(p, Some(uid), Some(gid));
        }
    }
}

/// [`std::fs::create_dir_all`], then (run as root) the folders it made go to the owner of
/// the nearest folder that was already there.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    let existing = dir.ancestors().find(|a| a.exists()).map(Path::to_path_buf);
    std::fs::create_dir_all(dir)?;
    if let Some(existing) = existing {
        give_to_owner_of(
            &existing,
            dir.ancestors().take_while(|a| *a != existing.as_path()),
        );
    }
    Ok(())
}
