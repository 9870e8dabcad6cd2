//! The extraction's tests, over tar streams built member by member: the archive and sandbox
//! helpers here, NS8's behaviour in `behaviour.rs`, the refusals in `refusals.rs`.

#![allow(clippy::unwrap_used)]

use super::sync::*;
use super::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use tar::EntryType;
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

    fn raw(mut self, name: &[u8], kind: EntryType, mode: u32, link: &[u8], data: &[u8]) -> Self {
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

    fn extract_limited(&self, tar: &[u8], limits: Limits) -> Result<ExtractOutcome, ExtractError> {
        extract_imageroot_with_limits(tar, &self.install(), DEFAULT_PREFIX, &limits, &mut |_| {})
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
    fn assert_refused(&self, tar: &[u8], check: impl Fn(&ExtractError) -> bool) -> ExtractError {
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

mod behaviour;
mod refusals;
