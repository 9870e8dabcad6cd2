//! Durability of what an extraction installed: one flush afterwards, by the caller, before
//! the marker that makes an interrupted update run again is removed.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::ExtractOutcome;
use super::list::parse_list_line;

/// Above this many regular files, [`sync_installed`] flushes whole filesystems instead of each
/// file (an fsync costs per file, a `syncfs` costs what is dirty on the filesystem).
pub const SYNC_FILES_MAX: usize = 2000;

/// Makes what an extraction installed durable: the data of every regular file of `outcome`,
/// then every directory an entry was renamed into or removed from, and the install dir.
///
/// The extraction itself writes the staged files, renames them into place and writes the lists
/// without waiting for the disk, so a crash soon after it can leave renamed files empty or
/// missing under a list that describes them. That is safe because of the order the update
/// keeps: the in-progress marker is on disk before the extraction starts, and it is removed
/// only after this function has returned (`engine/update/`). Until then a crash leaves the
/// marker, and the next update of the instance runs again in full, replacing every entry
/// whatever state it is in.
///
/// Only the files the extraction wrote are flushed, not the filesystem: a `syncfs` waits for
/// everything dirty on it (podman's layers, other instances' files, anyone's writes) and makes
/// every concurrent fsync wait behind it. A tree of more than [`SYNC_FILES_MAX`] files is flushed with
/// [`sync_filesystem`] of the install dir's filesystem and of `extra_dirs`' (the state dir,
/// which may be another filesystem mounted below), and so is a tree with an entry its owner may
/// not open (a file of mode 0200, say: no descriptor to fsync it through).
pub fn sync_installed(
    install_dir: &Path,
    outcome: &ExtractOutcome,
    extra_dirs: &[&Path],
) -> io::Result<()> {
    // A kept file's data was not written (its directory entry was not touched either).
    let kept: HashSet<&str> = outcome.kept.iter().map(String::as_str).collect();
    let entries: Vec<(&str, bool)> = outcome
        .installed
        .iter()
        .filter(|l| !kept.contains(l.as_str()))
        .filter_map(|l| parse_list_line(l))
        .collect();
    if entries.iter().filter(|(_, is_dir)| !is_dir).count() > SYNC_FILES_MAX {
        return sync_filesystems(install_dir, extra_dirs);
    }
    let mut dirs: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
    dirs.insert(install_dir.to_owned());
    let removed = outcome.removed.iter().filter_map(|l| parse_list_line(l));
    for (path, _) in entries.iter().copied().chain(removed) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(install_dir.join(dir));
            parent = dir.parent();
        }
    }
    let mut unopenable = false;
    for (path, is_dir) in entries {
        let path = install_dir.join(path);
        if is_dir {
            dirs.insert(path);
        } else {
            unopenable |= !sync_entry(&path, false)?;
        }
    }
    for dir in &dirs {
        unopenable |= !sync_entry(dir, true)?;
    }
    if unopenable {
        return sync_filesystems(install_dir, extra_dirs);
    }
    Ok(())
}

/// fsyncs a regular file's data or a directory. What is gone, or is no longer what it was
/// (a script may have replaced it since), is skipped: symbolic links are never followed, and a
/// FIFO put in a file's place does not block. Returns false for an entry the permissions do not
/// let us open.
pub(in crate::engine) fn sync_entry(path: &Path, is_dir: bool) -> io::Result<bool> {
    let err = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        // Gone, or no longer what was installed: ELOOP is a symbolic link (a listed symlink,
        // or one put there since), ENOTDIR a file put in place of a parent directory.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ELOOP | nix::libc::ENOTDIR)
                ) =>
        {
            return Ok(true);
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(false),
        Err(e) => return Err(err(e)),
    };
    let kind = file.metadata().map_err(err)?.file_type();
    if is_dir && kind.is_dir() {
        file.sync_all().map_err(err)?;
    } else if !is_dir && kind.is_file() {
        file.sync_data().map_err(err)?;
    }
    Ok(true)
}

/// [`sync_filesystem`] of `dir`'s filesystem and of each of `others'` that is another one.
pub(super) fn sync_filesystems(dir: &Path, others: &[&Path]) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut done = vec![fs::metadata(dir)?.dev()];
    sync_filesystem(dir)?;
    for other in others {
        let dev = fs::metadata(other)?.dev();
        if !done.contains(&dev) {
            sync_filesystem(other)?;
            done.push(dev);
        }
    }
    Ok(())
}

/// Flushes every dirty page and inode of the filesystem holding `dir` (`syncfs`).
pub fn sync_filesystem(dir: &Path) -> io::Result<()> {
    let file = File::open(dir)?;
    nix::unistd::syncfs(&file).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("syncfs of {}: {e}", dir.display()),
        )
    })
}
