//! The worker's large temporary files in /var/tmp: podman's own (an archive `podman load`
//! unpacks, the blobs a pull stages before it commits them), in a directory of the update's own.
//!
//! podman and skopeo clean up after themselves when they end, not when they are killed: a
//! cancelled job kills the worker's process group, and what a killed `podman load` unpacked (the
//! size of the image) would stay in /var/tmp, per instance. With every such file in a directory
//! named after the instance, the update removes its directories when it ends, the daemon removes
//! those of a killed worker once it is gone, and the instance's next update removes what is left
//! when the daemon itself was killed.
//!
//! /var/tmp rather than the user's runtime dir: it is on disk, where podman stages its own
//! downloads, and a large image must not fill the memory the user's services write their
//! runtime files to.

use std::fs;
use std::io;
use std::path::Path;

/// Where the directories go: podman's own default for large temporary files.
pub const PARENT: &str = "/var/tmp";

/// The start of the name of a directory for `instance`; the rest is tempfile's random suffix
/// (letters and digits).
fn prefix(instance: &str) -> String {
    format!("module-updater-{instance}-tmp-")
}

/// Whether `name` is a directory name [`make`] gives for `instance`. Instance ids may contain
/// dashes, so the suffix must be the random one: `mail1`'s prefix is a prefix of names of an
/// instance `mail1-tmp-2` too.
fn is_of(name: &str, instance: &str) -> bool {
    name.strip_prefix(&prefix(instance))
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// A new directory for `instance` in `parent` (0700, the caller's), removed when the
/// returned value is dropped.
pub fn make(parent: &Path, instance: &str) -> io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    // tempfile's default is the umask's (0755 with the usual one): others could read the files.
    tempfile::Builder::new()
        .prefix(&prefix(instance))
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
}

/// Removes the directories of `instance` in `parent` that `uid` (the instance's worker's uid)
/// owns, when no worker of the instance runs: the daemon once a worker is gone (one killed by a
/// cancel's SIGKILL cannot clean up after itself), and a worker at the start of an update (it
/// holds the instance lock), for what a killed daemon's workers left. Both may run as root: what
/// another user made under such a name is left alone.
pub fn remove_left_by(parent: &Path, instance: &str, uid: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !is_of(&entry.file_name().to_string_lossy(), instance) {
            continue;
        }
        // Not followed: a link is removed as a link, by `remove_dir_all` too.
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if meta.uid() == uid
            && let Err(e) = fs::remove_dir_all(entry.path())
        {
            log::warn!("cannot remove {}: {e}", entry.path().display());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn what_a_killed_worker_left_is_removed_and_nothing_else() {
        let parent = tempfile::tempdir().unwrap();
        // What a killed worker leaves is a directory not removed on drop.
        let left = |instance: &str| make(parent.path(), instance).unwrap().keep();
        let dir = left("mail1");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/blob"), "x").unwrap();
        // Other instances' (one whose id starts like mail1's), podman's own, a bare prefix.
        left("mail12");
        left("mail1-tmp-2");
        fs::create_dir(parent.path().join("podman-pull-1")).unwrap();
        fs::write(parent.path().join("module-updater-mail1-tmp-"), "").unwrap();
        remove_left_by(parent.path(), "mail1", nix::unistd::geteuid().as_raw());
        let mut left: Vec<_> = fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left.len(), 4, "{left:?}");
        assert_eq!(left[0], "module-updater-mail1-tmp-");
        assert!(
            left[1].starts_with("module-updater-mail1-tmp-2-tmp-"),
            "{left:?}"
        );
        assert!(
            left[2].starts_with("module-updater-mail12-tmp-"),
            "{left:?}"
        );
        assert_eq!(left[3], "podman-pull-1");
    }

    #[test]
    fn the_daemon_removes_only_what_the_instance_user_owns() {
        use std::os::unix::fs::MetadataExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = make(parent.path(), "mail1").unwrap().keep();
        let me = fs::metadata(&dir).unwrap().uid();
        remove_left_by(parent.path(), "mail1", me + 1);
        assert!(dir.exists(), "another owner's directory is left alone");
        remove_left_by(parent.path(), "mail1", me);
        assert!(!dir.exists());
    }

    #[test]
    fn a_directory_is_private_and_goes_when_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = make(parent.path(), "mail1").unwrap();
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
    }
}
