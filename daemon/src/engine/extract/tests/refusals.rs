//! What the extraction refuses: the install dir stays byte-identical, nothing outside changes.

#![allow(clippy::unwrap_used)]

use super::*;

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
