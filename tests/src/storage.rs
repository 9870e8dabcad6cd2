//! How rootless instances' podman stores images. NS8 nodes keep them on overlay (Rocky's
//! `storage.conf` says so; Debian's podman recommends fuse-overlayfs), so the sandbox configures
//! each instance user as a node's podman is configured: `~/.config/containers/storage.conf`,
//! written before the user's first podman command. vfs stays available for tests that need it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{Result, SandboxError};

/// The storage driver of rootless instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RootlessStorage {
    /// Kernel-native rootless overlay (the default).
    Overlay,
    /// Overlay mounted by `fuse-overlayfs` (podman's `mount_program`).
    FuseOverlayfs,
    /// A full copy of every layer, nothing mounted.
    Vfs,
}

/// Where fuse-overlayfs is installed (Debian package `fuse-overlayfs`).
pub const FUSE_OVERLAYFS: &str = "/usr/bin/fuse-overlayfs";

impl RootlessStorage {
    /// The environment variable that chooses the default of a run: `overlay` (unset),
    /// `fuse-overlayfs` or `vfs`.
    pub const ENV_VAR: &'static str = "MODULE_UPDATER_TEST_STORAGE";

    /// Every choice, in the spelling [`RootlessStorage::parse`] takes.
    pub const NAMES: &'static str = "overlay, fuse-overlayfs, vfs";

    pub fn parse(text: &str) -> Option<RootlessStorage> {
        match text {
            "overlay" => Some(RootlessStorage::Overlay),
            "fuse-overlayfs" => Some(RootlessStorage::FuseOverlayfs),
            "vfs" => Some(RootlessStorage::Vfs),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RootlessStorage::Overlay => "overlay",
            RootlessStorage::FuseOverlayfs => "fuse-overlayfs",
            RootlessStorage::Vfs => "vfs",
        }
    }

    /// The default: [`RootlessStorage::ENV_VAR`] if set, overlay otherwise.
    pub fn from_env() -> Result<RootlessStorage> {
        match std::env::var(Self::ENV_VAR) {
            Err(_) => Ok(RootlessStorage::Overlay),
            Ok(text) if text.is_empty() => Ok(RootlessStorage::Overlay),
            Ok(text) => RootlessStorage::parse(&text).ok_or_else(|| SandboxError::InvalidSpec {
                detail: format!(
                    "{}={text:?}: expected one of {}",
                    Self::ENV_VAR,
                    Self::NAMES
                ),
            }),
        }
    }

    /// Fails loudly when what this choice needs is not installed.
    pub fn check_installed(self) -> Result<()> {
        if self == RootlessStorage::FuseOverlayfs && !Path::new(FUSE_OVERLAYFS).is_file() {
            return Err(SandboxError::MissingTools {
                tools: FUSE_OVERLAYFS.into(),
                packages: "fuse-overlayfs".into(),
            });
        }
        Ok(())
    }

    /// The user's `storage.conf` for this choice.
    pub fn storage_conf(self) -> String {
        let head =
            "# Written by the module-updater test sandbox, as a node's podman is configured.\n";
        match self {
            RootlessStorage::Overlay => format!("{head}[storage]\ndriver = \"overlay\"\n"),
            RootlessStorage::FuseOverlayfs => format!(
                "{head}[storage]\ndriver = \"overlay\"\n\n[storage.options.overlay]\n\
                 mount_program = \"{FUSE_OVERLAYFS}\"\n"
            ),
            RootlessStorage::Vfs => format!("{head}[storage]\ndriver = \"vfs\"\n"),
        }
    }
}

/// Writes `<config dir>/containers/storage.conf` for `storage`, owned by `uid:gid`; returns its
/// path.
pub(crate) fn configure(
    config_dir: &Path,
    storage: RootlessStorage,
    uid: u32,
    gid: u32,
) -> Result<PathBuf> {
    storage.check_installed()?;
    let dir = config_dir.join("containers");
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(SandboxError::io("create", &dir, e)),
    }
    let file = dir.join("storage.conf");
    std::fs::write(&file, storage.storage_conf())
        .map_err(|e| SandboxError::io("write", &file, e))?;
    for (path, mode) in [(&dir, 0o755), (&file, 0o644)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| SandboxError::io("chmod", path, e))?;
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| SandboxError::io("chown", path, e))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_conf_names_the_driver() {
        for storage in [
            RootlessStorage::Overlay,
            RootlessStorage::FuseOverlayfs,
            RootlessStorage::Vfs,
        ] {
            assert_eq!(RootlessStorage::parse(storage.name()), Some(storage));
            assert!(RootlessStorage::NAMES.contains(storage.name()));
        }
        assert_eq!(RootlessStorage::parse("btrfs"), None);
        assert!(
            RootlessStorage::Overlay
                .storage_conf()
                .contains("driver = \"overlay\"")
        );
        assert!(
            RootlessStorage::FuseOverlayfs
                .storage_conf()
                .contains("mount_program = \"/usr/bin/fuse-overlayfs\"")
        );
        assert!(
            RootlessStorage::Vfs
                .storage_conf()
                .contains("driver = \"vfs\"")
        );
    }
}
