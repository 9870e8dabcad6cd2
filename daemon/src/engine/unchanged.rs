//! Files an update would rewrite with the bytes they already hold.
//!
//! Most files of a module are the same in two versions of it. Staging such a file costs a new inode, its data written again,
//! a rename and an fsync, for nothing; on a busy filesystem, allocating the inode alone costs
//! more than reading the file. So the extractor compares a small regular file of the image with
//! the one installed at its path and, when they are the same in every way the install would
//! set (contents, permission bits, owner, one link), keeps the installed one and only gives it
//! the image's mtime, as a rename of a fresh copy would have.
//!
//! The installed file is opened below the install dir without following any symbolic link
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): whatever the installed tree holds,
//! only a regular file of it is read, and nothing is written before the install phase. Where
//! `openat2` is missing (Linux before 5.6) every file is staged, as before.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Files larger than this are always staged: the comparison holds the image's copy in memory.
pub const MAX_COMPARED: u64 = 1 << 20;

/// The install dir, opened once to resolve paths below it.
pub struct InstalledTree {
    dir: OwnedFd,
}

impl InstalledTree {
    /// `None` when the dir cannot be opened (nothing is kept then).
    pub fn open(install_dir: &Path) -> Option<InstalledTree> {
        nix::fcntl::open(
            install_dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()
        .map(|dir| InstalledTree { dir })
    }

    /// The installed regular file at `path` (relative), if there is one reachable without a
    /// symbolic link; never blocks (a FIFO put there is opened non-blocking, then refused).
    fn regular_file(&self, path: &str) -> Option<(File, std::fs::Metadata)> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let file = File::from(nix::fcntl::openat2(&self.dir, path, how).ok()?);
        let meta = file.metadata().ok()?;
        meta.is_file().then_some((file, meta))
    }

    /// Whether the installed file at `path` is what staging `data` with `mode` would install:
    /// the same bytes, permission bits (`mode & 0o777`; an installed file with setuid, setgid or
    /// sticky bits differs), owner (the extracting user) and a single link (keeping a file
    /// with other names would keep them linked, which a fresh copy would not).
    pub fn holds(&self, path: &str, data: &[u8], mode: u32) -> bool {
        let Some((file, meta)) = self.regular_file(path) else {
            return false;
        };
        let same_meta = meta.len() == data.len() as u64
            && meta.mode() & 0o7777 == mode & 0o777
            && meta.uid() == nix::unistd::geteuid().as_raw()
            && meta.nlink() == 1;
        if !same_meta {
            return false;
        }
        let mut installed = Vec::with_capacity(data.len());
        // One byte more than expected tells a file that grew since the metadata was read.
        match (&file)
            .take(data.len() as u64 + 1)
            .read_to_end(&mut installed)
        {
            Ok(_) => installed == data,
            Err(_) => false,
        }
    }

    /// Sets the mtime of the installed file at `path` to `mtime` (seconds since the epoch), as
    /// installing a fresh copy would have. Resolved as [`InstalledTree::holds`] resolves it.
    pub fn touch(&self, path: &str, mtime: u64) -> io::Result<()> {
        let (file, _) = self
            .regular_file(path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no longer a regular file"))?;
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
    }
}

impl InstalledTree {
    /// The entry at `path` itself (a symbolic link is not followed, nor any on the way to it):
    /// its metadata, and a link's target. `None` when there is no such entry below the dir.
    pub fn entry(&self, path: &str) -> Option<(std::fs::Metadata, Option<std::ffi::OsString>)> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let fd = nix::fcntl::openat2(&self.dir, path, how).ok()?;
        let file = File::from(fd);
        let meta = file.metadata().ok()?;
        let target = meta
            .file_type()
            .is_symlink()
            .then(|| nix::fcntl::readlinkat(&file, "").ok())
            .flatten();
        Some((meta, target))
    }

    /// The bytes of the installed regular file at `path`, at most `max` of them (`None` when
    /// it is larger, or no such file).
    pub fn read(&self, path: &str, max: u64) -> Option<Vec<u8>> {
        let (file, _) = self.regular_file(path)?;
        let mut data = Vec::new();
        (&file).take(max + 1).read_to_end(&mut data).ok()?;
        (data.len() as u64 <= max).then_some(data)
    }

    /// The names in the directory at `path` (reached as [`InstalledTree::entry`] reaches it).
    pub fn children(&self, path: &str) -> Option<Vec<std::ffi::OsString>> {
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let fd = nix::fcntl::openat2(&self.dir, path, how).ok()?;
        let mut dir = nix::dir::Dir::from_fd(fd).ok()?;
        Some(
            dir.iter()
                .flatten()
                .map(|e| std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
                .filter(|name| name != "." && name != "..")
                .collect(),
        )
    }
}

impl InstalledTree {
    /// The SHA-256 (lowercase hex) and permission bits of the installed regular file at `path`,
    /// resolved as [`InstalledTree::holds`] resolves it; `None` when there is no such file.
    pub fn content(&self, path: &str) -> Option<(String, u32)> {
        use sha2::Digest;
        let (mut file, meta) = self.regular_file(path)?;
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buffer[..n]),
                Err(_) => return None,
            }
        }
        let hex = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some((hex, meta.mode() & 0o7777))
    }
}

impl InstalledTree {
    /// Copies the installed file at `path` to a new staged file `to` with its permission bits
    /// and `mtime` (for a hard link whose target was kept). Only a file that could have been
    /// kept is copied, one of at most [`MAX_COMPARED`] bytes (read into memory); a larger one
    /// is an error, never a truncated copy.
    pub fn copy_to(&self, path: &str, to: &Path, mtime: u64) -> io::Result<()> {
        let (mut file, meta) = self
            .regular_file(path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no longer a regular file"))?;
        let mut data = Vec::new();
        (&mut file).take(MAX_COMPARED + 1).read_to_end(&mut data)?;
        if data.len() as u64 > MAX_COMPARED {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("larger than {MAX_COMPARED} bytes: it cannot be a kept file"),
            ));
        }
        write_staged(to, &data, meta.mode(), mtime)
    }
}

/// Writes `data` as a new staged file with `mode & 0o777` and `mtime`, as the tar crate's
/// unpack does for a member the extractor read into memory.
pub fn write_staged(path: &Path, data: &[u8], mode: u32, mtime: u64) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, InstalledTree) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let file = dir.path().join("bin/tool");
        std::fs::write(&file, "same\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let tree = InstalledTree::open(dir.path()).unwrap();
        (dir, tree)
    }

    #[test]
    fn the_same_bytes_mode_and_owner_are_held() {
        let (_dir, tree) = tree();
        assert!(tree.holds("bin/tool", b"same\n", 0o755));
        // The permission bits the install would give: special bits of the image are dropped.
        assert!(tree.holds("bin/tool", b"same\n", 0o4755));
    }

    #[test]
    fn other_bytes_size_or_mode_are_not() {
        let (_dir, tree) = tree();
        assert!(!tree.holds("bin/tool", b"SAME\n", 0o755));
        assert!(!tree.holds("bin/tool", b"same\n\n", 0o755));
        assert!(!tree.holds("bin/tool", b"same\n", 0o644));
        assert!(!tree.holds("bin/missing", b"same\n", 0o755));
    }

    #[test]
    fn an_installed_file_with_special_bits_or_another_name_is_not() {
        let (dir, tree) = tree();
        let file = dir.path().join("bin/tool");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4755)).unwrap();
        assert!(!tree.holds("bin/tool", b"same\n", 0o755));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::hard_link(&file, dir.path().join("other")).unwrap();
        assert!(!tree.holds("bin/tool", b"same\n", 0o755));
    }

    #[test]
    fn nothing_is_read_through_a_symlink_or_outside_the_tree() {
        let (dir, tree) = tree();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "same\n").unwrap();
        std::fs::set_permissions(
            outside.path().join("secret"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("file")).unwrap();
        assert!(!tree.holds("link/secret", b"same\n", 0o755));
        assert!(!tree.holds("file", b"same\n", 0o755));
        let up = format!(
            "../{}/secret",
            outside.path().file_name().unwrap().to_string_lossy()
        );
        assert!(!tree.holds(&up, b"same\n", 0o755));
    }

    #[test]
    fn a_fifo_in_place_of_a_file_is_not_waited_for() {
        let (dir, tree) = tree();
        nix::unistd::mkfifo(
            &dir.path().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert!(!tree.holds("fifo", b"", 0o644));
    }

    #[test]
    fn copy_to_stages_the_installed_bytes() {
        let (dir, tree) = tree();
        let to = dir.path().join("copy");
        tree.copy_to("bin/tool", &to, 1_600_000_000).unwrap();
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"same\n");
        assert_eq!((meta.mode() & 0o777, meta.mtime()), (0o755, 1_600_000_000));
    }

    #[test]
    fn copy_to_refuses_a_file_larger_than_a_kept_one() {
        let (dir, tree) = tree();
        let big = vec![b'x'; MAX_COMPARED as usize + 1];
        std::fs::write(dir.path().join("bin/big"), &big).unwrap();
        let to = dir.path().join("copy");
        let err = tree.copy_to("bin/big", &to, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge, "{err}");
        assert!(!to.exists(), "no truncated copy");
    }

    #[test]
    fn touch_sets_the_mtime_and_write_staged_the_whole_file() {
        let (dir, tree) = tree();
        tree.touch("bin/tool", 1_700_000_000).unwrap();
        let meta = std::fs::metadata(dir.path().join("bin/tool")).unwrap();
        assert_eq!(meta.mtime(), 1_700_000_000);
        let staged = dir.path().join("staged");
        write_staged(&staged, b"data", 0o4750, 1_600_000_000).unwrap();
        let meta = std::fs::metadata(&staged).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o750, 1_600_000_000));
        assert_eq!(std::fs::read(&staged).unwrap(), b"data");
        assert!(
            write_staged(&staged, b"x", 0o644, 0).is_err(),
            "never over a file"
        );
    }
}
