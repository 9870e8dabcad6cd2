//! Staged, in-process extraction of a module image's imageroot into the install dir.
//!
//! NS8's `extract-image` (reference §1.6) pipes `podman export` into `tar -x` straight over the
//! live tree with no `pipefail`: a truncated stream or a missing imageroot deletes every old
//! file that was not re-extracted, and a crafted image can write anywhere tar can. Here the
//! whole stream is read and validated into a staging dir inside the install dir (same
//! filesystem) first; only a complete stream whose every member is acceptable is installed,
//! entry by entry with `rename`. NS8's bookkeeping is kept: `.imageroot.lst` (its exact format),
//! `.imageroot.lst~`, the removal of entries no longer shipped, `.gitignore` skipped, existing
//! directories keeping their mode and owner, and the `.extract-image.lock` helper lock.
//!
//! Durability: only the two list files are fsynced here (each written to a temporary file,
//! fsynced, renamed, then the directory fsynced). The installed files are flushed once
//! afterwards by the caller, with [`sync_installed`], before it removes the marker that makes an
//! interrupted update run again (`engine/update/`); that function's comment gives the ordering
//! argument.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::unchanged::InstalledTree;

mod install;
mod list;
mod stage;
mod sync;
#[cfg(test)]
mod tests;

use install::{install, plan_install, remove_stale_entries};
use list::{list_line, read_old_list, write_lists};
use stage::{Node, Stager, Tree};
pub(in crate::engine) use sync::sync_entry;
pub use sync::{SYNC_FILES_MAX, sync_filesystem, sync_installed};

/// The imageroot used when the `org.nethserver.imageroot` label is absent or empty.
pub const DEFAULT_PREFIX: &str = "imageroot";

/// NS8's extract-image lock, in the install dir.
pub const LOCK_FILE: &str = ".extract-image.lock";

/// The list of installed entries, in NS8's format.
pub const LIST_FILE: &str = ".imageroot.lst";

/// The previous list, kept as NS8 keeps it.
pub const LIST_BACKUP: &str = ".imageroot.lst~";

/// Prefix of the staging dir created in the install dir.
pub const STAGING_PREFIX: &str = ".imageroot.staging-";

/// Upper bounds on what an image may make us write. A stream beyond them is refused before
/// anything is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Members under the imageroot (directories, files and links).
    pub max_entries: u64,
    /// Components of a path below the imageroot.
    pub max_depth: usize,
    /// Sum of the sizes regular files declare (the logical size for sparse files).
    pub max_bytes: u64,
    /// Bytes accepted after the end-of-archive marker (read so the producer can finish).
    pub max_trailing: u64,
}

impl Limits {
    /// The limits of [`extract_imageroot`].
    pub const DEFAULT: Limits = Limits {
        max_entries: 200_000,
        max_depth: 128,
        max_bytes: 4 << 30,
        max_trailing: 64 << 20,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// What an extraction changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractOutcome {
    /// The new `.imageroot.lst` lines (`./`-prefixed, directories ending with `/`, byte-sorted).
    pub installed: Vec<String>,
    /// Lines of the previous list whose entries were removed because the image no longer ships them.
    pub removed: Vec<String>,
    /// Lines of `installed` whose file was already there with the same bytes and was kept
    /// (see `engine/unchanged.rs`): nothing of it was written but its mtime.
    pub kept: Vec<String>,
}

/// Errors of an extraction. Unless the message says otherwise, nothing in the install dir was
/// changed (except that `.extract-image.lock` is created if it was missing, as NS8 does).
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("invalid org.nethserver.imageroot {label:?}: {reason}")]
    InvalidPrefix { label: String, reason: &'static str },
    #[error(
        "another extraction is running in this install dir ({} is locked); retry when it has finished",
        path.display()
    )]
    Busy { path: PathBuf },
    #[error("cannot lock {}: {source}; check that the install dir exists and is writable", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the image filesystem stream: {source}; nothing was installed")]
    Stream {
        #[source]
        source: io::Error,
    },
    #[error(
        "the image filesystem stream ended without the end-of-archive marker (truncated export?); nothing was installed"
    )]
    Truncated,
    #[error("refusing image member {member:?}: {reason}; nothing was installed")]
    Refused { member: String, reason: String },
    #[error("the imageroot has more than {limit} entries; nothing was installed")]
    TooManyEntries { limit: u64 },
    #[error("image member {member:?} is more than {limit} directories deep; nothing was installed")]
    TooDeep { member: String, limit: usize },
    #[error(
        "the imageroot files exceed {limit} bytes (at member {member:?}); nothing was installed"
    )]
    TooLarge { member: String, limit: u64 },
    #[error(
        "imageroot \"{prefix}\" not found in the image; nothing was installed (check the org.nethserver.imageroot label)"
    )]
    PrefixNotFound { prefix: String },
    #[error(
        "cannot create a staging dir in {}: {source}; check free space and permissions",
        dir.display()
    )]
    CreateStaging {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot stage {path:?} in {}: {source}; nothing was installed", staging.display())]
    Staging {
        path: String,
        staging: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install {}: {reason}; nothing was installed", path.display())]
    Conflict { path: PathBuf, reason: &'static str },
    #[error("cannot inspect {}: {source}; nothing was installed", path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "installing {} failed: {source}; the install dir may be partly updated, run the update again",
        path.display()
    )]
    Install {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The imageroot path inside the image for a `org.nethserver.imageroot` label value.
///
/// As NS8's `sed -r 's#(^/|/$)##g'`: one leading and one trailing `/` are stripped; empty (or
/// absent, or `/`) means `imageroot`, so the whole image filesystem is never extracted.
/// `..`, `.` and empty components are refused.
pub fn imageroot_prefix(label: Option<&str>) -> Result<String, ExtractError> {
    let raw = label.unwrap_or("");
    let stripped = raw.strip_prefix('/').unwrap_or(raw);
    let stripped = stripped.strip_suffix('/').unwrap_or(stripped);
    if stripped.is_empty() {
        return Ok(DEFAULT_PREFIX.to_owned());
    }
    check_prefix(stripped).map_err(|reason| ExtractError::InvalidPrefix {
        label: raw.to_owned(),
        reason,
    })?;
    Ok(stripped.to_owned())
}

fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("it is empty");
    }
    if prefix.contains(['\0', '\n']) {
        return Err("it contains NUL or a newline");
    }
    for component in prefix.split('/') {
        match component {
            "" => return Err("it has an empty path component"),
            "." => return Err("it has a '.' path component"),
            ".." => return Err("it has a '..' path component"),
            _ => {}
        }
    }
    Ok(())
}

/// Extracts the `prefix` subtree of an image filesystem tar stream into `install_dir` with the
/// default [`Limits`]. `progress` gets the number of stream members read so far.
///
/// [`stage`], then [`Staged::install`]: the install dir changes only after the whole stream was
/// read and accepted.
pub fn extract_imageroot<R: Read>(
    stream: R,
    install_dir: &Path,
    prefix: &str,
    progress: &mut dyn FnMut(u64),
) -> Result<ExtractOutcome, ExtractError> {
    extract_imageroot_with_limits(stream, install_dir, prefix, &Limits::DEFAULT, progress)
}

/// [`extract_imageroot`] with explicit limits.
pub fn extract_imageroot_with_limits<R: Read>(
    stream: R,
    install_dir: &Path,
    prefix: &str,
    limits: &Limits,
    progress: &mut dyn FnMut(u64),
) -> Result<ExtractOutcome, ExtractError> {
    stage(stream, install_dir, prefix, limits, progress)?.install()
}

/// An imageroot read and validated into a staging dir of the install dir, not installed yet.
/// Holds the install dir's lock; dropped, it removes the staging dir and changes nothing.
pub struct Staged {
    _lock: Flock<File>,
    install_dir: PathBuf,
    staging: tempfile::TempDir,
    installed_tree: Option<InstalledTree>,
    tree: Tree,
}

/// Phase 1: reads the whole stream into a staging dir inside `install_dir` and validates it.
/// Any error removes the staging dir: the install dir is as before.
pub fn stage<R: Read>(
    stream: R,
    install_dir: &Path,
    prefix: &str,
    limits: &Limits,
    progress: &mut dyn FnMut(u64),
) -> Result<Staged, ExtractError> {
    check_prefix(prefix).map_err(|reason| ExtractError::InvalidPrefix {
        label: prefix.to_owned(),
        reason,
    })?;
    let lock = lock_install_dir(install_dir)?;
    remove_stale_staging(install_dir);
    // TempDir removes the staging tree on every early return.
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(install_dir)
        .map_err(|source| ExtractError::CreateStaging {
            dir: install_dir.to_owned(),
            source,
        })?;
    let installed_tree = InstalledTree::open(install_dir);
    let tree = Stager::new(staging.path(), prefix, limits, installed_tree.as_ref())
        .run(stream, progress)?;
    Ok(Staged {
        _lock: lock,
        install_dir: install_dir.to_owned(),
        staging,
        installed_tree,
        tree,
    })
}

impl Staged {
    /// Phase 2: checks for conflicts, installs by `rename`, writes `.imageroot.lst` (the
    /// previous one saved as `.imageroot.lst~`) and removes entries of the previous list the
    /// image no longer ships.
    pub fn install(self) -> Result<ExtractOutcome, ExtractError> {
        let Staged {
            _lock,
            install_dir,
            staging,
            installed_tree,
            tree,
        } = self;
        let install_dir = install_dir.as_path();
        // No flush between staging, installing and listing: see `sync_installed` for why the
        // caller's one flush afterwards is enough.
        let old_list = read_old_list(install_dir)?;
        let plan = plan_install(&tree, install_dir)?;
        let installed = install(
            &tree,
            &plan,
            staging.path(),
            install_dir,
            installed_tree.as_ref(),
        )?;
        let kept = tree
            .iter()
            .filter(|(_, node)| matches!(node, Node::Kept { .. }))
            .map(|(path, node)| list_line(path, node))
            .collect();
        write_lists(
            install_dir,
            old_list.as_ref().map(|l| l.raw.as_slice()),
            &installed,
        )?;
        let removed = match &old_list {
            Some(old) => remove_stale_entries(install_dir, old, &tree),
            None => Vec::new(),
        };
        if let Err(e) = staging.close() {
            log::warn!(
                "cannot remove the staging dir in {}: {e}",
                install_dir.display()
            );
        }
        Ok(ExtractOutcome {
            installed,
            removed,
            kept,
        })
    }
}

fn lock_install_dir(install_dir: &Path) -> Result<Flock<File>, ExtractError> {
    let path = install_dir.join(LOCK_FILE);
    // std opens with O_CLOEXEC: no child of the worker inherits the lock.
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(|source| ExtractError::Lock {
            path: path.clone(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => Err(ExtractError::Busy { path }),
        Err((_, errno)) => Err(ExtractError::Lock {
            path,
            source: io::Error::from(errno),
        }),
    }
}

/// Removes staging dirs left by an extraction that was killed. Safe under the lock: no other
/// extraction of this install dir is running.
fn remove_stale_staging(install_dir: &Path) {
    let Ok(entries) = fs::read_dir(install_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_staging = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(STAGING_PREFIX));
        if is_staging && entry.file_type().is_ok_and(|t| t.is_dir()) {
            log::info!("removing stale staging dir {}", entry.path().display());
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                log::warn!(
                    "cannot remove stale staging dir {}: {e}",
                    entry.path().display()
                );
            }
        }
    }
}
