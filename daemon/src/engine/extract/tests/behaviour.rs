//! What the extraction does, as NS8's extract-image does it.

#![allow(clippy::unwrap_used)]

use super::*;

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
