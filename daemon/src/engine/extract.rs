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
//! interrupted update run again (`engine/update.rs`); that function's comment gives the ordering
//! argument.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tar::EntryType;

use super::unchanged::{self, InstalledTree, MAX_COMPARED};

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

/// Above this many regular files, [`sync_installed`] flushes whole filesystems instead of
/// each file (an fsync costs ~0.2 ms here, a `syncfs` costs what is dirty on the filesystem).
pub const SYNC_FILES_MAX: usize = 2000;

/// Makes what an extraction installed durable: the data of every regular file of `outcome`,
/// then every directory an entry was renamed into or removed from, and the install dir.
///
/// The extraction itself writes the staged files, renames them into place and writes the lists
/// without waiting for the disk, so a crash soon after it can leave renamed files empty or
/// missing under a list that describes them. That is safe because of the order the update
/// keeps: the in-progress marker is on disk before the extraction starts, and it is removed
/// only after this function has returned (`engine/update.rs`). Until then a crash leaves the
/// marker, and the next update of the instance runs again in full, replacing every entry
/// whatever state it is in.
///
/// Only the files the extraction wrote are flushed, not the filesystem: a `syncfs` waits for
/// everything dirty on it (podman's layers, other instances' files, anyone's writes) and makes
/// every concurrent fsync wait behind it; measured on the bench, ~250 ms against ~45 ms for the
/// ~300 files of its module. A tree of more than [`SYNC_FILES_MAX`] files is flushed with
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
pub(super) fn sync_entry(path: &Path, is_dir: bool) -> io::Result<bool> {
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
fn sync_filesystems(dir: &Path, others: &[&Path]) -> io::Result<()> {
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

// ---------------------------------------------------------------------------------------------
// Phase 1: staging

/// The tar crate wraps causes in errors whose message omits them ("failed to unpack `x`");
/// put the whole chain in the message so the user sees the real cause (ENOSPC, a failed export).
fn flatten(e: io::Error) -> io::Error {
    use std::error::Error as _;
    let mut source = e.source();
    if source.is_none() {
        return e;
    }
    let mut msg = e.to_string();
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    io::Error::new(e.kind(), msg)
}

/// One entry of the staged tree, keyed by its path below the imageroot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// `explicit` is false for parents the stream never listed (created, but not listed,
    /// as GNU tar lists only members).
    Dir {
        mode: u32,
        explicit: bool,
    },
    /// Regular files and hard links.
    File,
    /// A regular file the install dir already holds as the image has it: not staged, only its
    /// mtime is set at install (`engine/unchanged.rs`).
    Kept {
        mtime: u64,
    },
    Symlink(String),
}

type Tree = BTreeMap<String, Node>;

/// Reads a stream and remembers whether it ended with EOF, which tells a stream cut at a
/// header boundary (EOF) from a complete one (end-of-archive zero block).
struct EofReader<R> {
    inner: R,
    eof: bool,
}

impl<R: Read> Read for EofReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }
}

/// Where a member name falls relative to the imageroot.
enum Selected {
    Outside,
    Root,
    /// Below the imageroot, but never installed: a `.gitignore`, or a whiteout.
    Skipped,
    Below(String, usize),
}

struct Stager<'a> {
    staging: &'a Path,
    /// The install dir as it is, to keep files that would be rewritten unchanged.
    installed: Option<&'a InstalledTree>,
    prefix: &'a str,
    prefix_components: Vec<&'a str>,
    limits: &'a Limits,
    nodes: Tree,
    found: bool,
    kept: u64,
    bytes: u64,
}

impl<'a> Stager<'a> {
    fn new(
        staging: &'a Path,
        prefix: &'a str,
        limits: &'a Limits,
        installed: Option<&'a InstalledTree>,
    ) -> Self {
        Stager {
            staging,
            installed,
            prefix,
            prefix_components: prefix.split('/').collect(),
            limits,
            nodes: Tree::new(),
            found: false,
            kept: 0,
            bytes: 0,
        }
    }

    fn run<R: Read>(
        mut self,
        stream: R,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Tree, ExtractError> {
        let stream_err = |source| ExtractError::Stream {
            source: flatten(source),
        };
        let mut reader = EofReader {
            inner: stream,
            eof: false,
        };
        let mut archive = tar::Archive::new(&mut reader);
        let mut seen = 0u64;
        for entry in archive.entries().map_err(stream_err)? {
            let mut entry = entry.map_err(stream_err)?;
            seen += 1;
            progress(seen);
            self.member(&mut entry)?;
        }
        if reader.eof {
            return Err(ExtractError::Truncated);
        }
        // Read what follows the end marker (padding to the record size), so the producer is not
        // cut off with EPIPE and a reader that reports the producer's exit status at EOF can.
        let mut rest = (&mut reader).take(self.limits.max_trailing.saturating_add(1));
        let trailing = io::copy(&mut rest, &mut io::sink()).map_err(stream_err)?;
        if trailing > self.limits.max_trailing {
            return Err(ExtractError::Stream {
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "more than {} bytes after the end-of-archive marker",
                        self.limits.max_trailing
                    ),
                ),
            });
        }
        if !self.found {
            return Err(ExtractError::PrefixNotFound {
                prefix: self.prefix.to_owned(),
            });
        }
        self.check_symlinks()?;
        Ok(self.nodes)
    }

    /// Classifies a member name: outside the imageroot (skipped), the imageroot itself,
    /// a `.gitignore` (skipped), or a path below it, validated.
    fn select(&self, raw: &[u8]) -> Result<Selected, ExtractError> {
        let absolute = raw.first() == Some(&b'/');
        let components: Vec<&[u8]> = raw
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .collect();
        let n = self.prefix_components.len();
        let under = components.len() >= n
            && components
                .iter()
                .zip(&self.prefix_components)
                .all(|(c, p)| *c == p.as_bytes());
        if !under {
            return Ok(Selected::Outside);
        }
        let refuse = |reason: &str| ExtractError::Refused {
            member: String::from_utf8_lossy(raw).into_owned(),
            reason: reason.to_owned(),
        };
        if absolute {
            return Err(refuse("absolute path"));
        }
        if components.iter().any(|c| *c == b"..") {
            return Err(refuse("'..' path component"));
        }
        if raw.contains(&b'\0') || raw.contains(&b'\n') {
            return Err(refuse("NUL or newline in the name"));
        }
        let below = &components[n..];
        if below.is_empty() {
            return Ok(Selected::Root);
        }
        // GNU tar's --exclude=.gitignore matches any component, and drops what is below it.
        if below.iter().any(|c| *c == b".gitignore") {
            return Ok(Selected::Skipped);
        }
        // `.wh.` names are reserved for whiteouts (OCI image layers): a layer read straight from
        // `podman image save` may carry them, an image's filesystem never has them (see
        // `engine/image_stream.rs`).
        if below.iter().any(|c| c.starts_with(b".wh.")) {
            return Ok(Selected::Skipped);
        }
        let mut path = String::new();
        for (i, c) in below.iter().enumerate() {
            let c = std::str::from_utf8(c).map_err(|_| refuse("the name is not valid UTF-8"))?;
            if i > 0 {
                path.push('/');
            }
            path.push_str(c);
        }
        Ok(Selected::Below(path, below.len()))
    }

    fn member<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            // Archive-wide metadata, no file.
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let member = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: &str| ExtractError::Refused {
            member: member.clone(),
            reason: reason.to_owned(),
        };
        let (path, depth) = match self.select(&raw)? {
            Selected::Outside => return Ok(()),
            Selected::Skipped => {
                self.found = true;
                return Ok(());
            }
            Selected::Root => {
                self.found = true;
                return if kind.is_dir() {
                    Ok(())
                } else {
                    Err(refuse("the imageroot itself is not a directory"))
                };
            }
            Selected::Below(path, depth) => (path, depth),
        };
        self.found = true;
        self.kept += 1;
        if self.kept > self.limits.max_entries {
            return Err(ExtractError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        if depth > self.limits.max_depth {
            return Err(ExtractError::TooDeep {
                member,
                limit: self.limits.max_depth,
            });
        }
        if depth == 1
            && (matches!(path.as_str(), LIST_FILE | LIST_BACKUP | LOCK_FILE)
                || path.starts_with(STAGING_PREFIX))
        {
            return Err(refuse(
                "it would replace the extractor's own bookkeeping file",
            ));
        }
        // Old tar writers mark directories only with a trailing '/'.
        let is_dir = kind.is_dir() || (kind == EntryType::Regular && raw.ends_with(b"/"));
        match kind {
            _ if is_dir => {
                let mode = entry.header().mode().unwrap_or(0o755) & 0o777;
                self.stage_dir(&member, &path, mode)
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.stage_file(&member, &path, entry)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = String::from_utf8(target)
                    .map_err(|_| refuse("the symlink target is not valid UTF-8"))?;
                self.stage_symlink(&member, &path, target)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.stage_hardlink(&member, &path, &target)
            }
            EntryType::Char | EntryType::Block => Err(refuse("device nodes are not allowed")),
            EntryType::Fifo => Err(refuse("FIFOs are not allowed")),
            other => Err(refuse(&format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            ))),
        }
    }

    fn staging_error(&self, path: &str, source: io::Error) -> ExtractError {
        ExtractError::Staging {
            path: path.to_owned(),
            staging: self.staging.to_owned(),
            source: flatten(source),
        }
    }

    /// Makes sure every ancestor of `path` is a staged directory, creating missing ones;
    /// refuses a member that would be written through a symlink or below a file.
    fn prepare_parents(&mut self, member: &str, path: &str) -> Result<(), ExtractError> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let ancestor = &path[..end + i];
            end += i + 1;
            match self.nodes.get(ancestor) {
                Some(Node::Dir { .. }) => {}
                Some(Node::Symlink(_)) => {
                    return Err(ExtractError::Refused {
                        member: member.to_owned(),
                        reason: format!("it would be written through the symlink {ancestor:?}"),
                    });
                }
                Some(Node::File | Node::Kept { .. }) => {
                    return Err(ExtractError::Refused {
                        member: member.to_owned(),
                        reason: format!("its parent {ancestor:?} is not a directory"),
                    });
                }
                None => {
                    self.mkdir(ancestor)?;
                    self.nodes.insert(
                        ancestor.to_owned(),
                        Node::Dir {
                            mode: 0o755,
                            explicit: false,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn mkdir(&self, path: &str) -> Result<(), ExtractError> {
        // 0700 while staging, so the extracting user can always fill it; the archive's mode is
        // applied when the directory is created in the install dir.
        DirBuilder::new()
            .mode(0o700)
            .create(self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))
    }

    /// Frees the staged slot of a duplicate member (the later member wins, as with tar).
    fn free_slot(&mut self, member: &str, path: &str) -> Result<(), ExtractError> {
        let staged = self.staging.join(path);
        match self.nodes.get(path) {
            None => Ok(()),
            Some(Node::Dir { .. }) => {
                let child = format!("{path}/");
                let has_children = self
                    .nodes
                    .range(child.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&child));
                if has_children {
                    return Err(ExtractError::Refused {
                        member: member.to_owned(),
                        reason: "it replaces a directory that has contents".to_owned(),
                    });
                }
                fs::remove_dir(&staged).map_err(|e| self.staging_error(path, e))?;
                self.nodes.remove(path);
                Ok(())
            }
            Some(Node::Kept { .. }) => {
                // Nothing was staged for it.
                self.nodes.remove(path);
                Ok(())
            }
            Some(_) => {
                fs::remove_file(&staged).map_err(|e| self.staging_error(path, e))?;
                self.nodes.remove(path);
                Ok(())
            }
        }
    }

    fn stage_dir(&mut self, member: &str, path: &str, mode: u32) -> Result<(), ExtractError> {
        self.prepare_parents(member, path)?;
        match self.nodes.get(path) {
            Some(Node::Dir { .. }) => {}
            Some(_) => {
                self.free_slot(member, path)?;
                self.mkdir(path)?;
            }
            None => self.mkdir(path)?,
        }
        self.nodes.insert(
            path.to_owned(),
            Node::Dir {
                mode,
                explicit: true,
            },
        );
        Ok(())
    }

    fn stage_file<R: Read>(
        &mut self,
        member: &str,
        path: &str,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ExtractError> {
        // The declared size (logical size for sparse files) counts before anything is written.
        self.bytes = self.bytes.saturating_add(entry.size());
        if self.bytes > self.limits.max_bytes {
            return Err(ExtractError::TooLarge {
                member: member.to_owned(),
                limit: self.limits.max_bytes,
            });
        }
        self.prepare_parents(member, path)?;
        self.free_slot(member, path)?;
        let plain = matches!(
            entry.header().entry_type(),
            EntryType::Regular | EntryType::Continuous
        );
        if let Some(installed) = self
            .installed
            .filter(|_| plain && entry.size() <= MAX_COMPARED)
        {
            return self.stage_or_keep(path, entry, installed);
        }
        // The tar crate writes the data (seeking over sparse holes) and applies mode & 0o777:
        // setuid, setgid and sticky bits are dropped, ownership is never set.
        entry.set_preserve_permissions(false);
        entry.set_preserve_mtime(true);
        entry.set_mask(0);
        entry
            .unpack(self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    /// A small regular file: read into memory, then kept when the install dir already holds it
    /// as is, else staged from memory as the tar crate would have staged it.
    fn stage_or_keep<R: Read>(
        &mut self,
        path: &str,
        entry: &mut tar::Entry<'_, R>,
        installed: &InstalledTree,
    ) -> Result<(), ExtractError> {
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644);
        let mtime = header.mtime().unwrap_or(0);
        let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
        entry
            .read_to_end(&mut data)
            .map_err(|source| ExtractError::Stream {
                source: flatten(source),
            })?;
        if installed.holds(path, &data, mode) {
            self.nodes.insert(path.to_owned(), Node::Kept { mtime });
            return Ok(());
        }
        unchanged::write_staged(&self.staging.join(path), &data, mode, mtime)
            .map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    fn stage_symlink(
        &mut self,
        member: &str,
        path: &str,
        target: String,
    ) -> Result<(), ExtractError> {
        let refuse = |reason: &str| ExtractError::Refused {
            member: member.to_owned(),
            reason: reason.to_owned(),
        };
        if target.is_empty() {
            return Err(refuse("the symlink target is empty"));
        }
        if target.starts_with('/') {
            return Err(refuse(&format!(
                "the symlink target {target:?} is absolute"
            )));
        }
        self.prepare_parents(member, path)?;
        self.free_slot(member, path)?;
        std::os::unix::fs::symlink(&target, self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))?;
        // Where it points is checked once the whole tree is known (check_symlinks).
        self.nodes.insert(path.to_owned(), Node::Symlink(target));
        Ok(())
    }

    fn stage_hardlink(
        &mut self,
        member: &str,
        path: &str,
        target: &[u8],
    ) -> Result<(), ExtractError> {
        let shown = String::from_utf8_lossy(target).into_owned();
        let refuse = |reason: String| ExtractError::Refused {
            member: member.to_owned(),
            reason,
        };
        let target = match self.select(target) {
            Ok(Selected::Below(t, _)) => t,
            Ok(Selected::Skipped | Selected::Root) => {
                return Err(refuse(format!(
                    "the hard link target {shown:?} is not a regular file extracted before it"
                )));
            }
            Ok(Selected::Outside) | Err(_) => {
                return Err(refuse(format!(
                    "the hard link target {shown:?} is outside the imageroot"
                )));
            }
        };
        if target == path {
            return Err(refuse("the hard link points to itself".to_owned()));
        }
        match self.nodes.get(&target) {
            Some(Node::File) => {}
            Some(Node::Kept { mtime }) => {
                // A link needs its target staged: stage a copy of the kept file.
                let mtime = *mtime;
                self.unkeep(&target, mtime)?;
            }
            _ => {
                return Err(refuse(format!(
                    "the hard link target {shown:?} is not a regular file extracted before it"
                )));
            }
        }
        self.prepare_parents(member, path)?;
        self.free_slot(member, path)?;
        fs::hard_link(self.staging.join(&target), self.staging.join(path))
            .map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    /// Stages a copy of the file kept at `path` (which the image has with those bytes).
    fn unkeep(&mut self, path: &str, mtime: u64) -> Result<(), ExtractError> {
        let staged = self.staging.join(path);
        let copied = self
            .installed
            .ok_or_else(|| io::Error::other("the install dir is not open"))
            .and_then(|installed| installed.copy_to(path, &staged, mtime));
        copied.map_err(|e| self.staging_error(path, e))?;
        self.nodes.insert(path.to_owned(), Node::File);
        Ok(())
    }

    /// Refuses symlinks that resolve outside the install dir, following the staged symlinks they
    /// pass through (a lexical check alone misses `s -> ..` followed by `t -> s/../..`).
    fn check_symlinks(&self) -> Result<(), ExtractError> {
        for (path, node) in &self.nodes {
            if let Node::Symlink(target) = node {
                resolve_inside(&self.nodes, path, target).map_err(|reason| {
                    ExtractError::Refused {
                        member: format!("{}/{path}", self.prefix),
                        reason: format!("the symlink target {target:?} {reason}"),
                    }
                })?;
            }
        }
        Ok(())
    }
}

/// Resolves `target` of the symlink at `link` (paths relative to the install dir), following
/// symlinks of the staged tree; fails if the walk leaves the install dir.
fn resolve_inside(nodes: &Tree, link: &str, target: &str) -> Result<(), &'static str> {
    const MAX_HOPS: usize = 40;
    let mut stack: Vec<&str> = link.split('/').collect();
    stack.pop();
    let mut queue: VecDeque<&str> = target.split('/').collect();
    let mut hops = 0;
    while let Some(component) = queue.pop_front() {
        match component {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err("resolves outside the install dir");
                }
            }
            name => {
                stack.push(name);
                if let Some(Node::Symlink(next)) = nodes.get(&stack.join("/")) {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err("has too many levels of symbolic links");
                    }
                    if next.starts_with('/') {
                        return Err("passes through an absolute symlink");
                    }
                    stack.pop();
                    for c in next.split('/').rev() {
                        queue.push_front(c);
                    }
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Phase 2: install

/// The previous `.imageroot.lst`: its bytes (for the backup) and its lines.
struct OldList {
    raw: Vec<u8>,
    lines: Vec<String>,
}

fn read_old_list(install_dir: &Path) -> Result<Option<OldList>, ExtractError> {
    let path = install_dir.join(LIST_FILE);
    match fs::read(&path) {
        Ok(raw) => {
            let lines = raw
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .filter_map(|l| std::str::from_utf8(l).ok().map(str::to_owned))
                .collect();
            Ok(Some(OldList { raw, lines }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ExtractError::Inspect { path, source }),
    }
}

/// What to do at one target path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// A directory is already there: keep it with its mode and owner (`--no-overwrite-dir`).
    KeepDir,
    CreateDir,
    /// A file or symlink is where a directory goes: remove it, then create the directory.
    ReplaceWithDir,
    /// Rename the staged file or symlink over whatever non-directory is there.
    Rename,
    /// An empty directory is where a file goes: remove it, then rename.
    RemoveDirThenRename,
    /// The file there is the image's already: set its mtime only.
    Keep,
}

fn list_line(path: &str, node: &Node) -> String {
    match node {
        Node::Dir { .. } => format!("./{path}/"),
        _ => format!("./{path}"),
    }
}

/// Decides the action for every staged entry, in list order, and refuses conflicts before
/// anything is touched.
fn plan_install(tree: &Tree, install_dir: &Path) -> Result<Vec<(String, Action)>, ExtractError> {
    let mut order: Vec<(String, &str)> = tree
        .iter()
        .map(|(path, node)| (list_line(path, node), path.as_str()))
        .collect();
    order.sort();
    // Directories that will be created: what is below them cannot exist yet (and must not be
    // looked up, the old path may be a symlink to anywhere).
    let mut fresh: HashSet<&str> = HashSet::new();
    let mut plan = Vec::with_capacity(order.len());
    for (_, path) in order {
        let target = install_dir.join(path);
        let parent_fresh = path
            .rsplit_once('/')
            .is_some_and(|(p, _)| fresh.contains(p));
        let existing = if parent_fresh {
            None
        } else {
            match fs::symlink_metadata(&target) {
                Ok(m) => Some(m.file_type().is_dir()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(ExtractError::Inspect {
                        path: target,
                        source,
                    });
                }
            }
        };
        let is_dir = matches!(tree.get(path), Some(Node::Dir { .. }));
        let kept = matches!(tree.get(path), Some(Node::Kept { .. }));
        let action = match (is_dir, existing) {
            (false, Some(false)) if kept => Action::Keep,
            _ if kept => {
                return Err(ExtractError::Conflict {
                    path: target,
                    reason: "a file found unchanged was removed or replaced while the image was read",
                });
            }
            (true, Some(true)) => Action::KeepDir,
            (true, Some(false)) => Action::ReplaceWithDir,
            (true, None) => Action::CreateDir,
            (false, Some(true)) => {
                let empty = fs::read_dir(&target)
                    .map_err(|source| ExtractError::Inspect {
                        path: target.clone(),
                        source,
                    })?
                    .next()
                    .is_none();
                if !empty {
                    return Err(ExtractError::Conflict {
                        path: target,
                        reason: "a non-empty directory is where the image has a file or symlink",
                    });
                }
                Action::RemoveDirThenRename
            }
            (false, _) => Action::Rename,
        };
        if matches!(action, Action::CreateDir | Action::ReplaceWithDir) {
            fresh.insert(path);
        }
        plan.push((path.to_owned(), action));
    }
    Ok(plan)
}

/// Applies the plan in list order (parents before children) and returns the new list lines.
fn install(
    tree: &Tree,
    plan: &[(String, Action)],
    staging: &Path,
    install_dir: &Path,
    installed: Option<&InstalledTree>,
) -> Result<Vec<String>, ExtractError> {
    let mut created: Vec<(PathBuf, u32)> = Vec::new();
    for (path, action) in plan {
        let target = install_dir.join(path);
        let err = |source| ExtractError::Install {
            path: target.clone(),
            source,
        };
        let mode = match tree.get(path) {
            Some(Node::Dir { mode, .. }) => *mode,
            _ => 0,
        };
        match action {
            Action::KeepDir => {}
            Action::Keep => {
                let mtime = match tree.get(path) {
                    Some(Node::Kept { mtime }) => *mtime,
                    _ => 0,
                };
                installed
                    .ok_or_else(|| io::Error::other("the install dir is not open"))
                    .and_then(|installed| installed.touch(path, mtime))
                    .map_err(err)?;
            }
            Action::CreateDir | Action::ReplaceWithDir => {
                if *action == Action::ReplaceWithDir {
                    match fs::remove_file(&target) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
                        _ => {}
                    }
                }
                // Owner-writable until everything below is in place; final mode set after.
                DirBuilder::new().mode(0o700).create(&target).map_err(err)?;
                created.push((target.clone(), mode));
            }
            Action::Rename | Action::RemoveDirThenRename => {
                if *action == Action::RemoveDirThenRename {
                    fs::remove_dir(&target).map_err(err)?;
                }
                fs::rename(staging.join(path), &target).map_err(err)?;
            }
        }
    }
    for (dir, mode) in created.iter().rev() {
        fs::set_permissions(dir, fs::Permissions::from_mode(*mode)).map_err(|source| {
            ExtractError::Install {
                path: dir.clone(),
                source,
            }
        })?;
    }
    let mut lines: Vec<String> = tree
        .iter()
        .filter(|(_, node)| {
            !matches!(
                node,
                Node::Dir {
                    explicit: false,
                    ..
                }
            )
        })
        .map(|(path, node)| list_line(path, node))
        .collect();
    // LC_ALL=C sort: byte order, which is String's order.
    lines.sort();
    Ok(lines)
}

/// Saves the previous list as `.imageroot.lst~` and writes the new one, each atomically.
fn write_lists(
    install_dir: &Path,
    old_raw: Option<&[u8]>,
    lines: &[String],
) -> Result<(), ExtractError> {
    if let Some(raw) = old_raw {
        write_atomically(install_dir, LIST_BACKUP, raw)?;
    }
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    write_atomically(install_dir, LIST_FILE, text.as_bytes())?;
    File::open(install_dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ExtractError::Install {
            path: install_dir.to_owned(),
            source,
        })
}

fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<(), ExtractError> {
    let path = dir.join(name);
    let err = |source| ExtractError::Install {
        path: path.clone(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{name}.tmp-"))
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    tmp.write_all(contents).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(&path).map_err(|e| err(e.error))?;
    Ok(())
}

/// A previous-list line turned into a path below the install dir, if it is well formed.
fn parse_list_line(line: &str) -> Option<(&str, bool)> {
    let rest = line.strip_prefix("./")?;
    let (path, is_dir) = match rest.strip_suffix('/') {
        Some(p) => (p, true),
        None => (rest, false),
    };
    let well_formed = !path.is_empty()
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    well_formed.then_some((path, is_dir))
}

/// Whether every ancestor of `path` is a real directory (no symlink), so removing `path` cannot
/// reach outside the tree it was installed in.
fn ancestors_are_dirs(install_dir: &Path, path: &str) -> bool {
    let mut end = 0;
    while let Some(i) = path[end..].find('/') {
        let ancestor = &path[..end + i];
        end += i + 1;
        match fs::symlink_metadata(install_dir.join(ancestor)) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Removes entries of the previous list that the new image does not ship: non-directories
/// first, then directories only when empty, deepest first. Failures are logged, not fatal:
/// the new tree is already installed.
fn remove_stale_entries(install_dir: &Path, old: &OldList, tree: &Tree) -> Vec<String> {
    let new_lines: HashSet<String> = tree
        .iter()
        .map(|(path, node)| list_line(path, node))
        .collect();
    let mut removed = Vec::new();
    let mut dirs: Vec<(&str, &str)> = Vec::new();
    for line in &old.lines {
        if new_lines.contains(line) {
            continue;
        }
        let Some((path, listed_as_dir)) = parse_list_line(line) else {
            log::warn!("ignoring malformed line {line:?} of the previous {LIST_FILE}");
            continue;
        };
        // Never remove what the new tree has at that path, whatever its type was before.
        if tree.contains_key(path) || !ancestors_are_dirs(install_dir, path) {
            continue;
        }
        let target = install_dir.join(path);
        let Ok(meta) = fs::symlink_metadata(&target) else {
            continue;
        };
        if meta.file_type().is_dir() {
            dirs.push((line, path));
        } else if !listed_as_dir {
            // A symlink (even to a directory) listed as a non-directory is removed as a link.
            match fs::remove_file(&target) {
                Ok(()) => removed.push(line.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot remove {}: {e}", target.display()),
            }
        }
    }
    for (line, path) in dirs.iter().rev() {
        // Fails (and is kept) when not empty, as NS8's `rmdir` with errors ignored.
        if fs::remove_dir(install_dir.join(path)).is_ok() {
            removed.push((*line).to_owned());
        }
    }
    removed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::{Builder, Header};

    // ----- archive construction ---------------------------------------------------------------

    /// Builds tar streams member by member, with raw names so malicious members can be written.
    struct Ar {
        b: Builder<Vec<u8>>,
    }

    impl Ar {
        fn new() -> Self {
            Ar {
                b: Builder::new(Vec::new()),
            }
        }

        fn header(name: &[u8], kind: EntryType, mode: u32, size: u64) -> Header {
            let mut h = Header::new_gnu();
            assert!(name.len() <= 100, "test names must fit the header");
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(1_700_000_000);
            h.set_uid(12345);
            h.set_gid(12345);
            h
        }

        fn raw(
            mut self,
            name: &[u8],
            kind: EntryType,
            mode: u32,
            link: &[u8],
            data: &[u8],
        ) -> Self {
            let mut h = Self::header(name, kind, mode, data.len() as u64);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_cksum();
            self.b.append(&h, data).unwrap();
            self
        }

        fn dir(self, name: &str, mode: u32) -> Self {
            self.raw(name.as_bytes(), EntryType::Directory, mode, b"", b"")
        }

        fn file(self, name: &str, mode: u32, data: &str) -> Self {
            self.raw(
                name.as_bytes(),
                EntryType::Regular,
                mode,
                b"",
                data.as_bytes(),
            )
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            self.raw(
                name.as_bytes(),
                EntryType::Symlink,
                0o777,
                target.as_bytes(),
                b"",
            )
        }

        fn hardlink(self, name: &str, target: &str) -> Self {
            self.raw(
                name.as_bytes(),
                EntryType::Link,
                0o644,
                target.as_bytes(),
                b"",
            )
        }

        /// A member whose name is given through a GNU long-name record (may hold any byte).
        fn long_named_file(mut self, name: &[u8], data: &str) -> Self {
            let mut h = Self::header(
                b"././@LongLink",
                EntryType::GNULongName,
                0o644,
                name.len() as u64,
            );
            h.set_cksum();
            self.b.append(&h, name).unwrap();
            self.file("placeholder", 0o644, data)
        }

        fn finish(self) -> Vec<u8> {
            self.b.into_inner().unwrap()
        }
    }

    /// The image of a typical module version 1 (member names as `podman export` writes them).
    fn v1() -> Vec<u8> {
        Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/actions/", 0o755)
            .dir("imageroot/actions/create-module/", 0o755)
            .file(
                "imageroot/actions/create-module/20x",
                0o755,
                "#!/bin/sh\necho create\n",
            )
            .dir("imageroot/actions/configure-module/", 0o755)
            .file(
                "imageroot/actions/configure-module/20configure",
                0o755,
                "#!/bin/sh\necho v1\n",
            )
            .dir("imageroot/bin/", 0o755)
            .dir("imageroot/bin/olddir/", 0o755)
            .file("imageroot/bin/olddir/tool", 0o755, "old tool\n")
            .dir("imageroot/update-module.d/", 0o755)
            .file("imageroot/update-module.d/30old", 0o755, "#!/bin/sh\n")
            .symlink(
                "imageroot/update-module.d/20x",
                "../actions/create-module/20x",
            )
            .dir("imageroot/systemd/", 0o755)
            .dir("imageroot/systemd/user/", 0o755)
            .file(
                "imageroot/systemd/user/foo.service",
                0o644,
                "[Service]\nExecStart=/bin/true\n",
            )
            .dir("ui/", 0o755)
            .file("ui/index.html", 0o644, "<html/>")
            .finish()
    }

    /// Version 2: `bin/olddir/` and `update-module.d/30old` are gone, 20configure changed.
    fn v2() -> Vec<u8> {
        Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/actions/", 0o755)
            .dir("imageroot/actions/create-module/", 0o755)
            .file(
                "imageroot/actions/create-module/20x",
                0o755,
                "#!/bin/sh\necho create\n",
            )
            .dir("imageroot/actions/configure-module/", 0o755)
            .file(
                "imageroot/actions/configure-module/20configure",
                0o755,
                "#!/bin/sh\necho v2\n",
            )
            .dir("imageroot/bin/", 0o755)
            .dir("imageroot/update-module.d/", 0o755)
            .symlink(
                "imageroot/update-module.d/20x",
                "../actions/create-module/20x",
            )
            .dir("imageroot/systemd/", 0o755)
            .dir("imageroot/systemd/user/", 0o755)
            .file(
                "imageroot/systemd/user/foo.service",
                0o644,
                "[Service]\nExecStart=/bin/false\n",
            )
            .finish()
    }

    const V1_LIST: &str = "./actions/
./actions/configure-module/
./actions/configure-module/20configure
./actions/create-module/
./actions/create-module/20x
./bin/
./bin/olddir/
./bin/olddir/tool
./systemd/
./systemd/user/
./systemd/user/foo.service
./update-module.d/
./update-module.d/20x
./update-module.d/30old
";

    // ----- sandbox helpers --------------------------------------------------------------------

    /// A temp root holding `install/` (the install dir) and `outside/` (must never change).
    struct Sandbox {
        root: tempfile::TempDir,
    }

    impl Sandbox {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            fs::create_dir(root.path().join("install")).unwrap();
            fs::create_dir(root.path().join("outside")).unwrap();
            fs::write(root.path().join("outside/secret"), "keep").unwrap();
            Sandbox { root }
        }

        /// A sandbox where version 1 is already installed.
        fn with_v1() -> Self {
            let s = Self::new();
            s.extract(&v1()).unwrap();
            s
        }

        fn install(&self) -> PathBuf {
            self.root.path().join("install")
        }

        fn extract(&self, tar: &[u8]) -> Result<ExtractOutcome, ExtractError> {
            self.extract_prefix(tar, DEFAULT_PREFIX)
        }

        fn extract_prefix(&self, tar: &[u8], prefix: &str) -> Result<ExtractOutcome, ExtractError> {
            extract_imageroot(tar, &self.install(), prefix, &mut |_| {})
        }

        fn extract_limited(
            &self,
            tar: &[u8],
            limits: Limits,
        ) -> Result<ExtractOutcome, ExtractError> {
            extract_imageroot_with_limits(
                tar,
                &self.install(),
                DEFAULT_PREFIX,
                &limits,
                &mut |_| {},
            )
        }

        /// Every path below the root with type, mode, and content or link target.
        fn snapshot(&self) -> BTreeMap<String, String> {
            fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
                for entry in fs::read_dir(dir).unwrap() {
                    let path = entry.unwrap().path();
                    let meta = fs::symlink_metadata(&path).unwrap();
                    let rel = path
                        .strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    let mode = meta.mode() & 0o7777;
                    let desc = if meta.file_type().is_symlink() {
                        format!("link {}", fs::read_link(&path).unwrap().display())
                    } else if meta.is_dir() {
                        walk(&path, base, out);
                        format!("dir {mode:o}")
                    } else {
                        format!("file {mode:o} {:?}", fs::read(&path).unwrap())
                    };
                    out.insert(rel, desc);
                }
            }
            let mut out = BTreeMap::new();
            walk(self.root.path(), self.root.path(), &mut out);
            out
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.install().join(rel)).unwrap()
        }

        fn mode(&self, rel: &str) -> u32 {
            fs::symlink_metadata(self.install().join(rel))
                .unwrap()
                .mode()
                & 0o7777
        }

        fn exists(&self, rel: &str) -> bool {
            fs::symlink_metadata(self.install().join(rel)).is_ok()
        }

        fn staging_dirs(&self) -> Vec<String> {
            fs::read_dir(self.install())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(STAGING_PREFIX))
                .collect()
        }

        /// Asserts that extracting `tar` fails and changes nothing anywhere in the sandbox.
        fn assert_refused(
            &self,
            tar: &[u8],
            check: impl Fn(&ExtractError) -> bool,
        ) -> ExtractError {
            self.assert_refused_with(check, |s| s.extract(tar))
        }

        fn assert_refused_with(
            &self,
            check: impl Fn(&ExtractError) -> bool,
            run: impl FnOnce(&Self) -> Result<ExtractOutcome, ExtractError>,
        ) -> ExtractError {
            let before = self.snapshot();
            let err = run(self).expect_err("the extraction must fail");
            assert!(check(&err), "unexpected error: {err}");
            assert_eq!(self.snapshot(), before, "the sandbox changed after: {err}");
            assert!(self.staging_dirs().is_empty());
            err
        }
    }

    fn refused_naming(member: &'static str) -> impl Fn(&ExtractError) -> bool {
        move |e| matches!(e, ExtractError::Refused { member: m, .. } if m == member)
    }

    // ----- prefix -----------------------------------------------------------------------------

    #[test]
    fn prefix_follows_ns8_sed() {
        assert_eq!(imageroot_prefix(None).unwrap(), "imageroot");
        assert_eq!(imageroot_prefix(Some("")).unwrap(), "imageroot");
        assert_eq!(imageroot_prefix(Some("/")).unwrap(), "imageroot");
        assert_eq!(imageroot_prefix(Some("//")).unwrap(), "imageroot");
        assert_eq!(imageroot_prefix(Some("imageroot/")).unwrap(), "imageroot");
        assert_eq!(
            imageroot_prefix(Some("/opt/app/root/")).unwrap(),
            "opt/app/root"
        );
        assert_eq!(imageroot_prefix(Some("backend")).unwrap(), "backend");
        for bad in [
            "../..", "..", "a//b", "./x", "a/./b", "x/..", "///x", "a\nb",
        ] {
            let err = imageroot_prefix(Some(bad)).unwrap_err();
            assert!(matches!(err, ExtractError::InvalidPrefix { .. }), "{bad:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    // ----- NS8 behaviour ----------------------------------------------------------------------

    #[test]
    fn first_extraction_writes_ns8_list_and_files() {
        let s = Sandbox::new();
        let mut calls = Vec::new();
        let out = extract_imageroot(&v1()[..], &s.install(), "imageroot", &mut |n| calls.push(n))
            .unwrap();
        assert_eq!(out.installed.join("\n") + "\n", V1_LIST);
        assert!(out.removed.is_empty());
        assert_eq!(s.read(LIST_FILE), V1_LIST);
        assert_eq!(s.mode(LIST_FILE), 0o644);
        assert!(!s.exists(LIST_BACKUP), "no previous list, no backup");
        assert_eq!(
            s.read("actions/configure-module/20configure"),
            "#!/bin/sh\necho v1\n"
        );
        assert_eq!(s.mode("actions/configure-module/20configure"), 0o755);
        assert_eq!(s.mode("systemd/user/foo.service"), 0o644);
        assert_eq!(s.mode("actions"), 0o755);
        assert!(!s.exists("ui") && !s.exists("index.html") && !s.exists("imageroot"));
        assert!(s.staging_dirs().is_empty());
        // Progress counts every stream member, in order.
        assert_eq!(calls, (1..=17).collect::<Vec<u64>>());
    }

    #[test]
    fn member_names_with_dot_slash_are_accepted() {
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("./", 0o755)
            .dir("./imageroot/", 0o755)
            .dir("./imageroot/actions/", 0o750)
            .file("./imageroot/actions/a", 0o700, "x")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(out.installed, ["./actions/", "./actions/a"]);
        assert_eq!(s.mode("actions"), 0o750);
        assert_eq!(s.mode("actions/a"), 0o700);
    }

    #[test]
    fn files_get_the_instance_users_ownership() {
        let s = Sandbox::new();
        s.extract(&v1()).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let meta = fs::metadata(s.install().join("systemd/user/foo.service")).unwrap();
        // The archive says uid 12345: never applied.
        assert_eq!(meta.uid(), me);
    }

    #[test]
    fn scenario_22_stale_entries_removed_nonempty_dir_kept() {
        let s = Sandbox::with_v1();
        // The admin left a file in bin/olddir/: the directory must stay.
        fs::write(s.install().join("bin/olddir/admin-note"), "mine").unwrap();
        let out = s.extract(&v2()).unwrap();
        assert!(!s.exists("update-module.d/30old"));
        assert!(!s.exists("bin/olddir/tool"));
        assert!(s.exists("bin/olddir/admin-note"));
        assert_eq!(s.read(LIST_BACKUP), V1_LIST);
        assert_eq!(
            out.removed,
            ["./bin/olddir/tool", "./update-module.d/30old"],
            "non-empty olddir is not reported as removed"
        );
        assert_eq!(
            s.read("actions/configure-module/20configure"),
            "#!/bin/sh\necho v2\n"
        );
        assert_eq!(s.read(LIST_FILE), out.installed.join("\n") + "\n");
    }

    #[test]
    fn scenario_22_empty_old_dir_is_removed() {
        let s = Sandbox::with_v1();
        let out = s.extract(&v2()).unwrap();
        assert!(!s.exists("bin/olddir"));
        assert!(s.exists("bin"));
        assert_eq!(
            out.removed,
            [
                "./bin/olddir/tool",
                "./update-module.d/30old",
                "./bin/olddir/"
            ]
        );
        assert_eq!(s.read(LIST_BACKUP), V1_LIST);
    }

    #[test]
    fn scenario_23_existing_state_dir_keeps_its_mode() {
        let s = Sandbox::new();
        fs::create_dir(s.install().join("state")).unwrap();
        fs::set_permissions(s.install().join("state"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(s.install().join("state/environment"), "MODULE_ID=x\n").unwrap();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/state/", 0o755)
            .file("imageroot/state/CACHEDIR.TAG", 0o644, "Signature")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(s.mode("state"), 0o700);
        assert_eq!(s.read("state/environment"), "MODULE_ID=x\n");
        assert_eq!(out.installed, ["./state/", "./state/CACHEDIR.TAG"]);
    }

    #[test]
    fn scenario_24_gitignore_is_neither_written_nor_listed() {
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/.gitignore", 0o644, "*.pyc")
            .dir("imageroot/pypkg/", 0o755)
            .file("imageroot/pypkg/.gitignore", 0o644, "x")
            .file("imageroot/pypkg/mod.py", 0o644, "pass")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(out.installed, ["./pypkg/", "./pypkg/mod.py"]);
        assert!(!s.exists(".gitignore") && !s.exists("pypkg/.gitignore"));
    }

    #[test]
    fn whiteouts_of_a_layer_are_neither_written_nor_listed() {
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/.wh.gone", 0o644, "")
            .dir("imageroot/d/", 0o755)
            .file("imageroot/d/.wh..wh..opq", 0o644, "")
            .file("imageroot/d/kept", 0o644, "x")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(out.installed, ["./d/", "./d/kept"]);
        assert!(!s.exists(".wh.gone") && !s.exists("d/.wh..wh..opq"));
    }

    #[test]
    fn scenario_25_label_subtree_only() {
        let s = Sandbox::new();
        let prefix = imageroot_prefix(Some("/opt/app/root/")).unwrap();
        let tar = Ar::new()
            .dir("opt/", 0o755)
            .dir("opt/app/", 0o755)
            .file("opt/app/other", 0o644, "no")
            .dir("opt/app/root/", 0o755)
            .dir("opt/app/root/bin/", 0o755)
            .file("opt/app/root/bin/x", 0o755, "yes")
            .file("opt/app/rootfile", 0o644, "no: shares only a name prefix")
            .dir("imageroot/", 0o755)
            .file("imageroot/y", 0o644, "no")
            .finish();
        let out = s.extract_prefix(&tar, &prefix).unwrap();
        assert_eq!(out.installed, ["./bin/", "./bin/x"]);
        assert_eq!(s.read("bin/x"), "yes");
        assert!(!s.exists("y") && !s.exists("other") && !s.exists("opt"));
    }

    #[test]
    fn list_is_byte_sorted_like_lc_all_c() {
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/a/", 0o755)
            .file("imageroot/a/x", 0o644, "")
            .file("imageroot/a-b", 0o644, "")
            .file("imageroot/a.txt", 0o644, "")
            .file("imageroot/B", 0o644, "")
            .file("imageroot/_u", 0o644, "")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(
            out.installed,
            ["./B", "./_u", "./a-b", "./a.txt", "./a/", "./a/x"]
        );
    }

    #[test]
    fn implicit_parents_are_created_but_not_listed() {
        let s = Sandbox::new();
        let tar = Ar::new().file("imageroot/a/b/file", 0o644, "deep").finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(out.installed, ["./a/b/file"]);
        assert_eq!(s.read("a/b/file"), "deep");
        assert_eq!(s.mode("a"), 0o755);
    }

    #[test]
    fn special_bits_dropped_and_modes_exact() {
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/tmp/", 0o1777)
            .dir("imageroot/ro/", 0o555)
            .file("imageroot/ro/f", 0o444, "r")
            .file("imageroot/suid", 0o4755, "s")
            .file("imageroot/sgid", 0o2750, "g")
            .file("imageroot/group-w", 0o664, "umask does not apply")
            .finish();
        s.extract(&tar).unwrap();
        assert_eq!(s.mode("tmp"), 0o777);
        assert_eq!(s.mode("ro"), 0o555);
        assert_eq!(s.mode("ro/f"), 0o444);
        assert_eq!(s.mode("suid"), 0o755);
        assert_eq!(s.mode("sgid"), 0o750);
        assert_eq!(s.mode("group-w"), 0o664);
    }

    #[test]
    fn symlinks_inside_the_tree_are_kept() {
        let s = Sandbox::with_v1();
        let link = s.install().join("update-module.d/20x");
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new("../actions/create-module/20x")
        );
        assert_eq!(
            fs::read_to_string(&link).unwrap(),
            "#!/bin/sh\necho create\n"
        );
        // Links that go up into the install dir (not only the imageroot) are fine, so are
        // dangling ones and links through links that stay inside.
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/a/", 0o755)
            .dir("imageroot/a/b/", 0o755)
            .symlink("imageroot/a/b/up", "..")
            .symlink("imageroot/a/b/via", "up/../x")
            .symlink("imageroot/state-link", "state/data")
            .symlink("imageroot/dot", "./a/./b")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert!(out.installed.contains(&"./a/b/via".to_owned()));
        assert_eq!(
            fs::read_link(s.install().join("state-link")).unwrap(),
            Path::new("state/data")
        );
    }

    #[test]
    fn hardlinks_inside_the_tree_work() {
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/bin/", 0o755)
            .file("imageroot/bin/tool", 0o755, "tool")
            .hardlink("imageroot/bin/alias", "imageroot/bin/tool")
            .hardlink("imageroot/alias2", "./imageroot/bin/tool")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(
            out.installed,
            ["./alias2", "./bin/", "./bin/alias", "./bin/tool"]
        );
        let a = fs::metadata(s.install().join("bin/tool")).unwrap();
        let b = fs::metadata(s.install().join("bin/alias")).unwrap();
        let c = fs::metadata(s.install().join("alias2")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.ino(), c.ino());
        assert_eq!(s.read("bin/alias"), "tool");
    }

    #[test]
    fn unchanged_files_are_kept_with_the_new_mtime_and_changed_ones_replaced() {
        let s = Sandbox::with_v1();
        let ino = |rel: &str| fs::metadata(s.install().join(rel)).unwrap().ino();
        let kept_before = ino("actions/create-module/20x");
        let changed_before = ino("systemd/user/foo.service");
        File::open(s.install().join("actions/create-module/20x"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH)
            .unwrap();
        let out = s.extract(&v2()).unwrap();
        assert_eq!(out.kept, ["./actions/create-module/20x"]);
        assert_eq!(ino("actions/create-module/20x"), kept_before);
        assert_ne!(ino("systemd/user/foo.service"), changed_before);
        let meta = fs::metadata(s.install().join("actions/create-module/20x")).unwrap();
        assert_eq!(meta.mtime(), 1_700_000_000, "the image's mtime");
        assert_eq!(
            s.read("systemd/user/foo.service"),
            "[Service]\nExecStart=/bin/false\n"
        );
        assert!(
            out.installed
                .contains(&"./actions/create-module/20x".to_owned())
        );
    }

    #[test]
    fn a_kept_file_differing_in_mode_or_replaced_by_a_symlink_is_installed_again() {
        let s = Sandbox::with_v1();
        let tool = s.install().join("actions/create-module/20x");
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o700)).unwrap();
        let out = s.extract(&v2()).unwrap();
        assert!(out.kept.is_empty(), "{:?}", out.kept);
        assert_eq!(s.mode("actions/create-module/20x"), 0o755);

        // The same bytes behind a symlink to a file outside: replaced by the image's file,
        // and the outside file is untouched.
        let s = Sandbox::with_v1();
        let tool = s.install().join("actions/create-module/20x");
        fs::write(
            s.root.path().join("outside/20x"),
            "#!/bin/sh\necho create\n",
        )
        .unwrap();
        fs::set_permissions(
            s.root.path().join("outside/20x"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::remove_file(&tool).unwrap();
        std::os::unix::fs::symlink(s.root.path().join("outside/20x"), &tool).unwrap();
        let out = s.extract(&v2()).unwrap();
        assert!(out.kept.is_empty(), "{:?}", out.kept);
        assert!(fs::symlink_metadata(&tool).unwrap().is_file());
        assert_eq!(
            fs::read_to_string(s.root.path().join("outside/20x")).unwrap(),
            "#!/bin/sh\necho create\n"
        );
    }

    #[test]
    fn a_hard_link_to_a_kept_file_and_a_duplicate_of_one_are_installed() {
        let s = Sandbox::new();
        let one = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/tool", 0o755, "tool")
            .file("imageroot/dup", 0o644, "first")
            .finish();
        s.extract(&one).unwrap();
        let two = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/tool", 0o755, "tool")
            .hardlink("imageroot/alias", "imageroot/tool")
            .file("imageroot/dup", 0o644, "first")
            .file("imageroot/dup", 0o644, "second")
            .finish();
        let out = s.extract(&two).unwrap();
        assert!(out.kept.is_empty(), "{:?}", out.kept);
        let a = fs::metadata(s.install().join("tool")).unwrap();
        let b = fs::metadata(s.install().join("alias")).unwrap();
        assert_eq!((a.ino(), a.mode() & 0o777), (b.ino(), 0o755));
        assert_eq!(s.read("alias"), "tool");
        assert_eq!(s.read("dup"), "second");
    }

    #[test]
    fn existing_entries_are_replaced() {
        let s = Sandbox::with_v1();
        let old_ino = fs::metadata(s.install().join("systemd/user/foo.service"))
            .unwrap()
            .ino();
        // A symlink where a file goes, a file where a directory goes, an empty directory where a
        // file goes, a symlink to elsewhere where a directory goes.
        std::os::unix::fs::symlink("../outside/secret", s.install().join("f1")).unwrap();
        fs::write(s.install().join("d1"), "file").unwrap();
        fs::create_dir(s.install().join("f2")).unwrap();
        std::os::unix::fs::symlink("../outside", s.install().join("d2")).unwrap();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/f1", 0o644, "one")
            .dir("imageroot/d1/", 0o755)
            .file("imageroot/d1/x", 0o644, "in d1")
            .file("imageroot/f2", 0o644, "two")
            .dir("imageroot/d2/", 0o755)
            .file("imageroot/d2/secret", 0o644, "not outside")
            .dir("imageroot/systemd/", 0o755)
            .dir("imageroot/systemd/user/", 0o755)
            .file("imageroot/systemd/user/foo.service", 0o644, "new")
            .finish();
        s.extract(&tar).unwrap();
        assert_eq!(s.read("f1"), "one");
        assert!(
            !fs::symlink_metadata(s.install().join("f1"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(s.read("d1/x"), "in d1");
        assert_eq!(s.read("f2"), "two");
        assert!(
            fs::symlink_metadata(s.install().join("d2"))
                .unwrap()
                .is_dir()
        );
        assert_eq!(s.read("d2/secret"), "not outside");
        assert_eq!(
            fs::read_to_string(s.root.path().join("outside/secret")).unwrap(),
            "keep"
        );
        let new_ino = fs::metadata(s.install().join("systemd/user/foo.service"))
            .unwrap()
            .ino();
        assert_ne!(
            old_ino, new_ino,
            "files are replaced by rename, not rewritten in place"
        );
        assert_eq!(s.read("systemd/user/foo.service"), "new");
    }

    #[test]
    fn duplicate_members_later_wins() {
        let s = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/a", 0o644, "first")
            .file("imageroot/a", 0o600, "second")
            .symlink("imageroot/b", "a")
            .file("imageroot/b", 0o644, "now a file")
            .dir("imageroot/d/", 0o700)
            .dir("imageroot/d/", 0o750)
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(out.installed, ["./a", "./b", "./d/"]);
        assert_eq!(s.read("a"), "second");
        assert_eq!(s.mode("a"), 0o600);
        assert_eq!(s.read("b"), "now a file");
        assert_eq!(s.mode("d"), 0o750);
    }

    #[test]
    fn old_symlink_to_dir_listed_as_file_is_removed_as_link() {
        let s = Sandbox::new();
        let tar1 = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/real/", 0o755)
            .file("imageroot/real/f", 0o644, "f")
            .symlink("imageroot/link", "real")
            .finish();
        s.extract(&tar1).unwrap();
        let tar2 = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/real/", 0o755)
            .file("imageroot/real/f", 0o644, "f")
            .finish();
        let out = s.extract(&tar2).unwrap();
        assert_eq!(out.removed, ["./link"]);
        assert!(!s.exists("link"));
        assert_eq!(s.read("real/f"), "f");
    }

    #[test]
    fn old_list_never_removes_through_symlinks_or_outside() {
        let s = Sandbox::new();
        fs::create_dir(s.install().join("lib64")).unwrap();
        fs::write(s.install().join("lib64/x.so"), "new").unwrap();
        // A hostile or stale previous list.
        fs::write(
            s.install().join(LIST_FILE),
            "./../outside/secret\n./lib/x.so\n/etc/passwd\nimageroot/old\n./a/../../outside/secret\n",
        )
        .unwrap();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .symlink("imageroot/lib", "lib64")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert!(out.removed.is_empty(), "{:?}", out.removed);
        assert_eq!(s.read("lib64/x.so"), "new");
        assert_eq!(
            fs::read_to_string(s.root.path().join("outside/secret")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn type_change_from_file_to_dir_keeps_the_new_dir() {
        let s = Sandbox::new();
        s.extract(&Ar::new().file("imageroot/x", 0o644, "f").finish())
            .unwrap();
        let out = s
            .extract(&Ar::new().dir("imageroot/x/", 0o755).finish())
            .unwrap();
        assert_eq!(out.installed, ["./x/"]);
        assert!(out.removed.is_empty());
        assert!(s.install().join("x").is_dir());
    }

    #[test]
    fn leftover_staging_dirs_are_cleaned() {
        let s = Sandbox::new();
        let stale = s.install().join(format!("{STAGING_PREFIX}dead"));
        fs::create_dir_all(stale.join("a/b")).unwrap();
        fs::write(stale.join("a/b/f"), "x").unwrap();
        s.extract(&v1()).unwrap();
        assert!(!stale.exists());
        assert!(s.staging_dirs().is_empty());
    }

    #[test]
    fn trailing_padding_after_end_marker_is_read() {
        let s = Sandbox::new();
        let mut tar = v1();
        tar.extend_from_slice(&[0u8; 8192]);
        s.extract(&tar).unwrap();
        let mut tar = v1();
        tar.extend_from_slice(&[0u8; 2048]);
        let limits = Limits {
            max_trailing: 1024,
            ..Limits::DEFAULT
        };
        let s = Sandbox::with_v1();
        s.assert_refused_with(
            |e| {
                matches!(e, ExtractError::Stream { .. }) && e.to_string().contains("end-of-archive")
            },
            |s| s.extract_limited(&tar, limits),
        );
    }

    #[test]
    fn sparse_two_gib_file_is_within_the_limit() {
        let src = tempfile::tempdir().unwrap();
        let big = src.path().join("big");
        let f = File::create(&big).unwrap();
        f.set_len(2 << 30).unwrap();
        drop(f);
        {
            use std::io::{Seek, SeekFrom};
            let mut f = OpenOptions::new().write(true).open(&big).unwrap();
            f.seek(SeekFrom::Start((2 << 30) - 4)).unwrap();
            f.write_all(b"end!").unwrap();
        }
        let mut b = Builder::new(Vec::new());
        b.sparse(true);
        b.append_path_with_name(&big, "imageroot/big").unwrap();
        let tar = b.into_inner().unwrap();
        assert!(
            tar.len() < 1 << 20,
            "the archive must hold only the data blocks"
        );
        let s = Sandbox::new();
        s.extract(&tar).unwrap();
        let meta = fs::metadata(s.install().join("big")).unwrap();
        assert_eq!(meta.len(), 2 << 30);
        // Written with holes by the tar crate, not 2 GiB of zeros.
        assert!(meta.blocks() * 512 < 1 << 30, "blocks: {}", meta.blocks());
        let mut f = File::open(s.install().join("big")).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::End(-4)).unwrap();
        let mut tail = String::new();
        f.read_to_string(&mut tail).unwrap();
        assert_eq!(tail, "end!");
    }

    #[test]
    fn default_limits() {
        assert_eq!(Limits::default().max_entries, 200_000);
        assert_eq!(Limits::default().max_depth, 128);
        assert_eq!(Limits::default().max_bytes, 4 * 1024 * 1024 * 1024);
    }

    // ----- refusals: install dir byte-identical, nothing outside ------------------------------

    #[test]
    fn refuses_absolute_paths() {
        let s = Sandbox::with_v1();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/fine", 0o644, "x")
            .file("/imageroot/etc/passwd", 0o644, "x")
            .finish();
        s.assert_refused(&tar, refused_naming("/imageroot/etc/passwd"));
    }

    #[test]
    fn refuses_dotdot() {
        for name in [
            "imageroot/../outside/secret",
            "imageroot/a/../../x",
            "./imageroot/..",
        ] {
            let s = Sandbox::with_v1();
            let tar = Ar::new()
                .dir("imageroot/", 0o755)
                .file(name, 0o644, "x")
                .finish();
            let err = s.assert_refused(&tar, |e| matches!(e, ExtractError::Refused { .. }));
            assert!(err.to_string().contains("'..'"), "{err}");
        }
    }

    #[test]
    fn refuses_absolute_symlinks() {
        let s = Sandbox::with_v1();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .symlink("imageroot/passwd", "/etc/passwd")
            .finish();
        let err = s.assert_refused(&tar, refused_naming("imageroot/passwd"));
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn refuses_symlinks_leaving_the_install_dir() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                Ar::new()
                    .symlink("imageroot/up", "../outside/secret")
                    .finish(),
                "imageroot/up",
            ),
            (
                Ar::new()
                    .dir("imageroot/a/", 0o755)
                    .symlink("imageroot/a/l", "../../x")
                    .finish(),
                "imageroot/a/l",
            ),
            (
                // Lexically inside (a/b/s/../../x = a/x), really outside: s -> .. is a.
                Ar::new()
                    .dir("imageroot/a/", 0o755)
                    .dir("imageroot/a/b/", 0o755)
                    .symlink("imageroot/a/b/t", "s/../../../x")
                    .symlink("imageroot/a/b/s", "..")
                    .finish(),
                "imageroot/a/b/t",
            ),
            (
                Ar::new()
                    .symlink("imageroot/l1", "l2")
                    .symlink("imageroot/l2", "l1")
                    .finish(),
                "imageroot/l1",
            ),
        ];
        for (tar, member) in cases {
            let s = Sandbox::with_v1();
            s.assert_refused(&tar, refused_naming(member));
        }
    }

    #[test]
    fn refuses_writes_through_symlinks() {
        let s = Sandbox::with_v1();
        // Even a symlink that stays inside: the member must not land somewhere else.
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/real/", 0o755)
            .symlink("imageroot/l", "real")
            .file("imageroot/l/x", 0o644, "through")
            .finish();
        let err = s.assert_refused(&tar, refused_naming("imageroot/l/x"));
        assert!(err.to_string().contains("through the symlink"), "{err}");
        // The classic escape: a link to outside, then a file below it.
        let s = Sandbox::with_v1();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .symlink("imageroot/esc", "../../outside")
            .file("imageroot/esc/secret", 0o644, "pwned")
            .finish();
        s.assert_refused(&tar, |e| matches!(e, ExtractError::Refused { .. }));
    }

    #[test]
    fn refuses_hardlinks_outside_or_forward() {
        for (tar, why) in [
            (
                Ar::new()
                    .dir("imageroot/", 0o755)
                    .hardlink("imageroot/h", "etc/passwd")
                    .finish(),
                "outside the imageroot",
            ),
            (
                Ar::new()
                    .dir("imageroot/", 0o755)
                    .hardlink("imageroot/h", "/etc/passwd")
                    .finish(),
                "outside the imageroot",
            ),
            (
                Ar::new()
                    .dir("imageroot/", 0o755)
                    .hardlink("imageroot/h", "imageroot/../x")
                    .finish(),
                "outside the imageroot",
            ),
            (
                Ar::new()
                    .dir("imageroot/", 0o755)
                    .hardlink("imageroot/h", "imageroot/later")
                    .file("imageroot/later", 0o644, "x")
                    .finish(),
                "extracted before",
            ),
            (
                Ar::new()
                    .dir("imageroot/", 0o755)
                    .dir("imageroot/d/", 0o755)
                    .hardlink("imageroot/h", "imageroot/d")
                    .finish(),
                "regular file",
            ),
        ] {
            let s = Sandbox::with_v1();
            let err = s.assert_refused(&tar, refused_naming("imageroot/h"));
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn refuses_devices_and_fifos() {
        for (kind, why) in [
            (EntryType::Char, "device"),
            (EntryType::Block, "device"),
            (EntryType::Fifo, "FIFO"),
        ] {
            let s = Sandbox::with_v1();
            let tar = Ar::new()
                .dir("imageroot/", 0o755)
                .raw(b"imageroot/dev", kind, 0o666, b"", b"")
                .finish();
            let err = s.assert_refused(&tar, refused_naming("imageroot/dev"));
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        for name in [&b"imageroot/a\nb"[..], b"imageroot/a\0b", b"imageroot/\xff"] {
            let s = Sandbox::with_v1();
            let tar = Ar::new()
                .dir("imageroot/", 0o755)
                .long_named_file(name, "x")
                .finish();
            s.assert_refused(&tar, |e| matches!(e, ExtractError::Refused { .. }));
        }
    }

    #[test]
    fn refuses_bookkeeping_names() {
        for name in [
            "imageroot/.imageroot.lst",
            "imageroot/.imageroot.lst~",
            "imageroot/.extract-image.lock",
            "imageroot/.imageroot.staging-x",
        ] {
            let s = Sandbox::with_v1();
            let tar = Ar::new()
                .dir("imageroot/", 0o755)
                .file(name, 0o644, "x")
                .finish();
            s.assert_refused(&tar, refused_naming(name));
        }
    }

    #[test]
    fn refuses_an_imageroot_that_is_not_a_directory() {
        let s = Sandbox::with_v1();
        let tar = Ar::new().symlink("imageroot", "/").finish();
        s.assert_refused(&tar, refused_naming("imageroot"));
    }

    #[test]
    fn refuses_a_missing_imageroot() {
        let s = Sandbox::with_v1();
        let err = s.assert_refused_with(
            |e| matches!(e, ExtractError::PrefixNotFound { .. }),
            |s| s.extract_prefix(&v1(), "opt/app/root"),
        );
        assert_eq!(
            err.to_string().split(';').next().unwrap(),
            "imageroot \"opt/app/root\" not found in the image"
        );
        let s = Sandbox::with_v1();
        let empty = Ar::new().finish();
        s.assert_refused(&empty, |e| matches!(e, ExtractError::PrefixNotFound { .. }));
    }

    #[test]
    fn refuses_over_limits() {
        let tar = v1();
        let s = Sandbox::with_v1();
        s.assert_refused_with(
            |e| matches!(e, ExtractError::TooManyEntries { limit: 10 }),
            |s| {
                s.extract_limited(
                    &tar,
                    Limits {
                        max_entries: 10,
                        ..Limits::DEFAULT
                    },
                )
            },
        );
        s.assert_refused_with(
            |e| matches!(e, ExtractError::TooDeep { limit: 2, member } if member == "imageroot/actions/create-module/20x"),
            |s| s.extract_limited(&tar, Limits { max_depth: 2, ..Limits::DEFAULT }),
        );
        s.assert_refused_with(
            |e| matches!(e, ExtractError::TooLarge { limit: 40, .. }),
            |s| {
                s.extract_limited(
                    &tar,
                    Limits {
                        max_bytes: 40,
                        ..Limits::DEFAULT
                    },
                )
            },
        );
        // Exactly at the limits is fine.
        let s2 = Sandbox::new();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .dir("imageroot/a/", 0o755)
            .file("imageroot/a/b", 0o644, "1234")
            .finish();
        s2.extract_limited(
            &tar,
            Limits {
                max_entries: 2,
                max_depth: 2,
                max_bytes: 4,
                ..Limits::DEFAULT
            },
        )
        .unwrap();
    }

    #[test]
    fn refuses_a_sparse_file_over_the_byte_limit_before_writing() {
        let src = tempfile::tempdir().unwrap();
        let big = src.path().join("big");
        File::create(&big).unwrap().set_len(5 << 30).unwrap();
        let mut b = Builder::new(Vec::new());
        b.append_path_with_name(&big, "imageroot/big").unwrap();
        let tar = b.into_inner().unwrap();
        let s = Sandbox::with_v1();
        s.assert_refused(
            &tar,
            |e| matches!(e, ExtractError::TooLarge { member, .. } if member == "imageroot/big"),
        );
    }

    #[test]
    fn refuses_truncated_streams() {
        let full = v2();
        // Find the offset of 20configure's data, then cut inside it, inside a header, and at a
        // header boundary (where a naive reader sees a clean end).
        let data_at = full
            .windows(b"echo v2".len())
            .position(|w| w == b"echo v2")
            .unwrap();
        let boundary = (data_at / 512 + 1) * 512;
        for cut in [
            data_at + 3,
            boundary,
            boundary + 100,
            full.len() - 1024 - 512,
            full.len() - 1024,
        ] {
            let s = Sandbox::with_v1();
            s.assert_refused(&full[..cut], |e| {
                matches!(
                    e,
                    ExtractError::Truncated
                        | ExtractError::Stream { .. }
                        | ExtractError::Staging { .. }
                )
            });
        }
        let s = Sandbox::with_v1();
        s.assert_refused(&[][..], |e| matches!(e, ExtractError::Truncated));
    }

    #[test]
    fn refuses_when_the_stream_fails() {
        struct Failing(Vec<u8>, usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.1 >= self.0.len() / 2 {
                    return Err(io::Error::other("podman export exited with status 125"));
                }
                let n = buf.len().min(self.0.len() / 2 - self.1).min(512);
                buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let s = Sandbox::with_v1();
        let err = s.assert_refused_with(
            |e| {
                matches!(
                    e,
                    ExtractError::Stream { .. } | ExtractError::Staging { .. }
                )
            },
            |s| extract_imageroot(Failing(v2(), 0), &s.install(), "imageroot", &mut |_| {}),
        );
        assert!(err.to_string().contains("125"), "{err}");
    }

    #[test]
    fn refuses_conflicts_before_touching_anything() {
        let s = Sandbox::with_v1();
        // Version 2 ships systemd/user as a file while the admin has files in that directory.
        fs::write(s.install().join("systemd/user/admin.service"), "x").unwrap();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .file("imageroot/aaa-first", 0o644, "would be installed first")
            .dir("imageroot/systemd/", 0o755)
            .file("imageroot/systemd/user", 0o644, "now a file")
            .finish();
        let err = s.assert_refused(&tar, |e| matches!(e, ExtractError::Conflict { .. }));
        assert!(err.to_string().contains("systemd/user"), "{err}");
    }

    #[test]
    fn refuses_when_another_extraction_holds_the_lock() {
        let s = Sandbox::with_v1();
        let held = Flock::lock(
            OpenOptions::new()
                .write(true)
                .open(s.install().join(LOCK_FILE))
                .unwrap(),
            FlockArg::LockExclusive,
        )
        .unwrap();
        let err = s.assert_refused(&v2(), |e| matches!(e, ExtractError::Busy { .. }));
        assert!(err.to_string().contains("another extraction"), "{err}");
        drop(held);
        s.extract(&v2()).unwrap();
    }

    #[test]
    fn refuses_a_missing_install_dir() {
        let s = Sandbox::new();
        let missing = s.root.path().join("nope");
        let err = extract_imageroot(&v1()[..], &missing, "imageroot", &mut |_| {}).unwrap_err();
        assert!(matches!(err, ExtractError::Lock { .. }), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn refuses_an_invalid_prefix_argument() {
        let s = Sandbox::with_v1();
        s.assert_refused_with(
            |e| matches!(e, ExtractError::InvalidPrefix { .. }),
            |s| s.extract_prefix(&v1(), "../outside"),
        );
    }

    #[test]
    fn refuses_unsupported_entry_types() {
        let s = Sandbox::with_v1();
        let tar = Ar::new()
            .dir("imageroot/", 0o755)
            .raw(b"imageroot/vol", EntryType::new(b'V'), 0o644, b"", b"")
            .finish();
        s.assert_refused(&tar, refused_naming("imageroot/vol"));
    }

    #[test]
    fn members_outside_the_imageroot_are_not_checked() {
        // podman export carries the whole image: odd members elsewhere are none of our business.
        let s = Sandbox::new();
        let tar = Ar::new()
            .raw(b"dev/null", EntryType::Char, 0o666, b"", b"")
            .symlink("etc/mtab", "/proc/self/mounts")
            .file("../x", 0o644, "x")
            .file("imageroot-other/f", 0o644, "x")
            .dir("imageroot/", 0o755)
            .file("imageroot/ok", 0o644, "ok")
            .finish();
        let out = s.extract(&tar).unwrap();
        assert_eq!(out.installed, ["./ok"]);
    }

    // ----- durability -------------------------------------------------------------------------

    #[test]
    fn sync_installed_skips_what_changed_since_and_never_blocks() {
        let s = Sandbox::with_v1();
        let out = s.extract(&v2()).unwrap();
        // A script may have replaced or removed installed entries before the flush runs: a
        // FIFO in a file's place (opening it for reading without O_NONBLOCK would hang), a
        // symbolic link to outside, a missing entry, a file in a directory's place.
        let configure = s.install().join("actions/configure-module/20configure");
        fs::remove_file(&configure).unwrap();
        nix::unistd::mkfifo(&configure, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let unit = s.install().join("systemd/user/foo.service");
        fs::remove_file(&unit).unwrap();
        std::os::unix::fs::symlink(s.root.path().join("outside/secret"), &unit).unwrap();
        fs::remove_dir_all(s.install().join("update-module.d")).unwrap();
        fs::remove_dir_all(s.install().join("actions/create-module")).unwrap();
        fs::write(s.install().join("actions/create-module"), "now a file").unwrap();
        sync_installed(&s.install(), &out, &[]).unwrap();
        // (No snapshot: reading the FIFO would block the test.)
        assert!(
            fs::symlink_metadata(&configure)
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert_eq!(
            fs::read_link(&unit).unwrap(),
            s.root.path().join("outside/secret")
        );
        assert_eq!(
            fs::read_to_string(s.root.path().join("outside/secret")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn sync_installed_of_a_large_tree_flushes_the_filesystems() {
        let s = Sandbox::with_v1();
        let outcome = ExtractOutcome {
            installed: (0..=SYNC_FILES_MAX).map(|i| format!("./f{i}")).collect(),
            removed: Vec::new(),
            kept: Vec::new(),
        };
        // None of these exist: only the syncfs path can succeed without looking at them.
        sync_installed(&s.install(), &outcome, &[s.root.path()]).unwrap();
        let err =
            sync_installed(&s.install(), &outcome, &[&s.root.path().join("nope")]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
