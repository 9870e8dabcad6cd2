//! Free space: the filesystem a path is on (its mount point) and what it has available, and
//! the `instances_insufficient_space` refusal when an update needs more.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::request::ValidationError;

/// What an update needs on one filesystem, against what it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpaceNeed {
    /// The filesystem's mount point.
    pub filesystem: String,
    /// What the update writes there: `storage` (the instance's image storage), `install` (its
    /// install dir).
    pub purposes: Vec<String>,
    pub needed: u64,
    pub available: u64,
    pub enough: bool,
}

/// The mount point of the filesystem holding `path` (or its nearest existing ancestor), and the
/// bytes available there to an unprivileged user; `None` when nothing of it can be read.
pub fn filesystem_of(path: &Path) -> Option<(PathBuf, u64)> {
    let mut existing = path.to_path_buf();
    while std::fs::symlink_metadata(&existing).is_err() {
        existing = existing.parent()?.to_path_buf();
    }
    let dev = std::fs::metadata(&existing).ok()?.dev();
    let stat = nix::sys::statvfs::statvfs(&existing).ok()?;
    let available = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    let mut mount = existing.clone();
    while let Some(parent) = mount.parent() {
        match std::fs::metadata(parent) {
            Ok(meta) if meta.dev() == dev => mount = parent.to_path_buf(),
            _ => break,
        }
    }
    Some((mount, available))
}

/// The needs of one instance, summed per filesystem: `(purpose, path, bytes)` each.
pub fn needs(wants: &[(&str, &Path, u64)]) -> Vec<SpaceNeed> {
    let mut found: Vec<SpaceNeed> = Vec::new();
    for (purpose, path, bytes) in wants {
        let Some((mount, available)) = filesystem_of(path) else {
            continue;
        };
        let filesystem = mount.display().to_string();
        match found.iter_mut().find(|n| n.filesystem == filesystem) {
            Some(need) => {
                need.needed += bytes;
                need.purposes.push((*purpose).to_owned());
            }
            None => found.push(SpaceNeed {
                filesystem,
                purposes: vec![(*purpose).to_owned()],
                needed: *bytes,
                available,
                enough: true,
            }),
        }
    }
    for need in &mut found {
        need.enough = need.needed <= need.available;
    }
    found
}

/// `instances_insufficient_space` for the instance at `index` of the request, one per
/// filesystem without enough room.
pub fn refusals(index: usize, instance: &str, needs: &[SpaceNeed]) -> Vec<ValidationError> {
    needs
        .iter()
        .filter(|n| !n.enough)
        .map(|n| ValidationError {
            filesystem: Some(n.filesystem.clone()),
            needed: Some(n.needed),
            available: Some(n.available),
            ..ValidationError::new(
                &format!("instances.{index}"),
                serde_json::Value::from(instance),
                "insufficient_space",
            )
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn two_purposes_on_one_filesystem_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a/not/yet");
        let needs = needs(&[("storage", &a, 10), ("install", dir.path(), u64::MAX / 4)]);
        assert_eq!(needs.len(), 1);
        assert_eq!(needs[0].purposes, ["storage", "install"]);
        assert_eq!(needs[0].needed, 10 + u64::MAX / 4);
        assert!(!needs[0].enough);
        let refused = refusals(2, "demo1", &needs);
        assert_eq!(refused[0].error, "instances_insufficient_space");
        assert_eq!(refused[0].field, "instances.2");
        assert_eq!(refused[0].needed, Some(10 + u64::MAX / 4));
    }
}
