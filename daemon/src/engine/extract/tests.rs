//! The extraction's tests, over tar streams built member by member.

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
    let out =
        extract_imageroot(&v1()[..], &s.install(), "imageroot", &mut |n| calls.push(n)).unwrap();
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
        |e| matches!(e, ExtractError::Stream { .. }) && e.to_string().contains("end-of-archive"),
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
    let err = sync_installed(&s.install(), &outcome, &[&s.root.path().join("nope")]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
}
