//! The imageroot of a new image against the installed tree: the entries the update installs,
//! the files it adds and changes, and the entries of the previous `.imageroot.lst` it removes
//! (as `engine/extract` would, without writing anything).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use serde::Serialize;
use sha2::Digest;

use crate::engine::extract::{LIST_FILE, Limits};
use crate::engine::unchanged::InstalledTree;

/// One entry of the new imageroot, below the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewEntry {
    Dir,
    File {
        size: u64,
        mode: u32,
        sha256: String,
    },
    Symlink {
        target: String,
    },
    /// A hard link to another entry (its path below the prefix).
    Link {
        target: String,
    },
}

/// The new imageroot: path below the prefix (no `./`, no trailing `/`) → entry.
#[derive(Debug, Default)]
pub struct NewTree {
    pub entries: BTreeMap<String, NewEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("cannot read the image filesystem: {0}")]
    Read(#[from] std::io::Error),
    #[error("imageroot \"{0}\" not found in the image (check the org.nethserver.imageroot label)")]
    NoPrefix(String),
    #[error("the imageroot has more than {0} entries (the update refuses it too)")]
    TooManyEntries(u64),
}

impl NewTree {
    /// Reads the `prefix` subtree of an image filesystem tar stream, skipping what the extractor
    /// skips (`.gitignore` anywhere, whiteouts).
    pub fn read<R: Read>(stream: R, prefix: &str) -> Result<NewTree, TreeError> {
        let mut archive = tar::Archive::new(stream);
        let mut tree = NewTree::default();
        let mut seen_prefix = false;
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(rel) = below(&raw, prefix) else {
                continue;
            };
            seen_prefix = true;
            if rel.is_empty()
                || rel
                    .split('/')
                    .any(|c| c == ".gitignore" || c.starts_with(".wh."))
            {
                continue;
            }
            let kind = entry.header().entry_type();
            let node = if kind.is_dir() {
                NewEntry::Dir
            } else if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                NewEntry::Symlink { target }
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                match below(&target, prefix) {
                    Some(target) => NewEntry::Link { target },
                    None => continue,
                }
            } else if kind.is_file() {
                let mode = entry.header().mode().unwrap_or(0o644);
                let mut hasher = sha2::Sha256::new();
                let mut buffer = vec![0u8; 64 * 1024];
                let mut size = 0u64;
                loop {
                    let n = entry.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    size += n as u64;
                    hasher.update(&buffer[..n]);
                }
                let sha256 = hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                NewEntry::File { size, mode, sha256 }
            } else {
                // Device nodes and FIFOs: the extraction refuses the image, the plan only lists.
                continue;
            };
            tree.entries.insert(rel, node);
            if tree.entries.len() as u64 > Limits::DEFAULT.max_entries {
                return Err(TreeError::TooManyEntries(Limits::DEFAULT.max_entries));
            }
        }
        if !seen_prefix {
            return Err(TreeError::NoPrefix(prefix.to_owned()));
        }
        Ok(tree)
    }

    /// The bytes of the regular files, what the install dir holds of the new imageroot.
    pub fn bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e {
                NewEntry::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// The `.imageroot.lst` lines the update writes.
    pub fn list_lines(&self) -> BTreeSet<String> {
        self.entries
            .iter()
            .map(|(path, node)| line(path, node))
            .collect()
    }

    /// The regular files directly in `dir` that carry an execute bit, in byte order of name
    /// (dotfiles left out, as a shell glob).
    pub fn executables_in(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{dir}/");
        self.entries
            .iter()
            .filter_map(|(path, node)| {
                let name = path.strip_prefix(&prefix)?;
                if name.contains('/') || name.starts_with('.') {
                    return None;
                }
                let mode = match node {
                    NewEntry::File { mode, .. } => *mode,
                    NewEntry::Link { target } => match self.entries.get(target) {
                        Some(NewEntry::File { mode, .. }) => *mode,
                        _ => 0,
                    },
                    _ => 0,
                };
                (mode & 0o111 != 0).then(|| name.to_owned())
            })
            .collect()
    }

    /// The content of the file at `path`, following a hard link.
    fn file(&self, path: &str) -> Option<(&str, u32)> {
        match self.entries.get(path)? {
            NewEntry::File { sha256, mode, .. } => Some((sha256, *mode)),
            NewEntry::Link { target } => self.file(target),
            _ => None,
        }
    }
}

/// `raw` below `prefix`, without `./` and trailing `/`; `Some("")` for the prefix itself.
fn below(raw: &str, prefix: &str) -> Option<String> {
    let path = raw.trim_start_matches("./").trim_start_matches('/');
    let path = path.trim_end_matches('/');
    if path == prefix {
        return Some(String::new());
    }
    path.strip_prefix(prefix)?
        .strip_prefix('/')
        .map(str::to_owned)
}

/// An entry as `.imageroot.lst` lists it.
fn line(path: &str, node: &NewEntry) -> String {
    match node {
        NewEntry::Dir => format!("./{path}/"),
        _ => format!("./{path}"),
    }
}

/// What the update does to the install tree.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct FileChanges {
    /// How many entries the new `.imageroot.lst` lists (the update's `files_installed`).
    pub entries: usize,
    /// Files and links the install dir does not have yet.
    pub added: Vec<String>,
    /// Files and links the install dir has with other contents, permission bits or target.
    pub changed: Vec<String>,
    /// How many files and links stay as they are.
    pub unchanged: usize,
    /// Lines of the previous `.imageroot.lst` the update removes (its `files_removed`).
    pub removed: Vec<String>,
}

/// Compares the new tree with the tree installed in `install_dir` (read only, never through a
/// symbolic link of the installed tree: the daemon reads it as root, the instance's user owns it).
pub fn compare(new: &NewTree, install_dir: &Path) -> FileChanges {
    let installed = InstalledTree::open(install_dir);
    let mut changes = FileChanges {
        entries: new.entries.len(),
        ..FileChanges::default()
    };
    for (path, node) in &new.entries {
        let Some((meta, link)) = installed.as_ref().and_then(|t| t.entry(path)) else {
            if !matches!(node, NewEntry::Dir) {
                changes.added.push(path.clone());
            }
            continue;
        };
        let same = match node {
            NewEntry::Dir => continue,
            NewEntry::Symlink { target: wanted } => {
                meta.file_type().is_symlink()
                    && link.is_some_and(|t| t.as_encoded_bytes() == wanted.as_bytes())
            }
            NewEntry::File { .. } | NewEntry::Link { .. } => {
                let wanted = new.file(path);
                let have = installed.as_ref().and_then(|t| t.content(path));
                match (wanted, have) {
                    (Some((sha, mode)), Some((have_sha, have_mode))) => {
                        sha == have_sha && mode & 0o777 == have_mode
                    }
                    _ => false,
                }
            }
        };
        if same {
            changes.unchanged += 1;
        } else {
            changes.changed.push(path.clone());
        }
    }
    changes.removed = installed
        .as_ref()
        .map(|t| removed(new, t))
        .unwrap_or_default();
    changes
}

/// The previous list's lines the extractor removes: entries the new tree no longer has that
/// are still there, directories only when nothing else stays in them; files first, then
/// directories deepest first (the extractor's order).
fn removed(new: &NewTree, installed: &InstalledTree) -> Vec<String> {
    // As large as the list of the most entries an extraction accepts, with long paths.
    let Some(raw) = installed.read(LIST_FILE, 64 << 20) else {
        return Vec::new();
    };
    let new_lines = new.list_lines();
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for line in raw.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        if new_lines.contains(line) {
            continue;
        }
        let Some(path) = line.strip_prefix("./") else {
            continue;
        };
        let (path, listed_as_dir) = match path.strip_suffix('/') {
            Some(dir) => (dir, true),
            None => (path, false),
        };
        if path.is_empty() || new.entries.contains_key(path) {
            continue;
        }
        let Some((meta, _)) = installed.entry(path) else {
            continue;
        };
        if meta.file_type().is_dir() {
            dirs.push((line.to_owned(), path.to_owned()));
        } else if !listed_as_dir {
            files.push(line.to_owned());
        }
    }
    let mut gone: BTreeSet<String> = files
        .iter()
        .filter_map(|l| l.strip_prefix("./").map(str::to_owned))
        .collect();
    let mut removed = files;
    for (line, path) in dirs.iter().rev() {
        let empty_after = installed.children(path).is_some_and(|names| {
            names.iter().all(|name| {
                let child = format!("{path}/{}", name.to_string_lossy());
                gone.contains(&child)
            })
        });
        if empty_after {
            gone.insert(path.clone());
            removed.push(line.clone());
        }
    }
    removed
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A tar stream of `(path, contents or None for a directory, mode)`.
    fn tar_of(members: &[(&str, Option<&str>, u32)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, contents, mode) in members {
            let mut header = tar::Header::new_gnu();
            header.set_mode(*mode);
            match contents {
                Some(data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    builder
                        .append_data(&mut header, path, data.as_bytes())
                        .unwrap();
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    builder.append_data(&mut header, path, &[][..]).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn the_new_tree_against_the_installed_one() {
        let stream = tar_of(&[
            ("imageroot/", None, 0o755),
            ("imageroot/same", Some("same\n"), 0o644),
            ("imageroot/changed", Some("two\n"), 0o644),
            ("imageroot/update-module.d/", None, 0o755),
            (
                "imageroot/update-module.d/10run",
                Some("#!/bin/sh\n"),
                0o755,
            ),
            (
                "imageroot/update-module.d/20notexec",
                Some("#!/bin/sh\n"),
                0o644,
            ),
            (
                "imageroot/update-module.d/.hidden",
                Some("#!/bin/sh\n"),
                0o755,
            ),
            ("imageroot/sub/.gitignore", Some("*\n"), 0o644),
            ("elsewhere/file", Some("not ours\n"), 0o644),
        ]);
        let tree = NewTree::read(stream.as_slice(), "imageroot").unwrap();
        assert_eq!(tree.executables_in("update-module.d"), ["10run"]);
        assert_eq!(tree.bytes(), 5 + 4 + 10 * 3);
        assert!(!tree.entries.contains_key("sub/.gitignore"));

        let install = tempfile::tempdir().unwrap();
        let dir = install.path();
        std::fs::write(dir.join("same"), "same\n").unwrap();
        std::fs::write(dir.join("changed"), "one\n").unwrap();
        std::fs::write(dir.join("old"), "old\n").unwrap();
        std::fs::create_dir(dir.join("olddir")).unwrap();
        std::fs::write(dir.join("olddir/f"), "f\n").unwrap();
        std::fs::create_dir(dir.join("keptdir")).unwrap();
        std::fs::write(dir.join("keptdir/mine"), "not listed\n").unwrap();
        std::fs::write(
            dir.join(LIST_FILE),
            "./same\n./changed\n./old\n./olddir/\n./olddir/f\n./keptdir/\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        for file in ["same", "changed"] {
            std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        let changes = compare(&tree, dir);
        assert_eq!(changes.changed, ["changed"]);
        assert_eq!(
            changes.added,
            [
                "update-module.d/.hidden",
                "update-module.d/10run",
                "update-module.d/20notexec"
            ]
        );
        assert_eq!(changes.unchanged, 1);
        assert_eq!(changes.entries, tree.entries.len());
        // A directory goes only when nothing else stays in it.
        assert_eq!(changes.removed, ["./old", "./olddir/f", "./olddir/"]);
        // Nothing was changed.
        assert!(dir.join("old").exists() && dir.join("olddir/f").exists());
    }

    #[test]
    fn nothing_is_read_through_a_symlink_of_the_installed_tree() {
        let stream = tar_of(&[
            ("imageroot/etc/", None, 0o755),
            ("imageroot/etc/secret", Some("same\n"), 0o644),
        ]);
        let tree = NewTree::read(stream.as_slice(), "imageroot").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "same\n").unwrap();
        std::fs::write(outside.path().join("listed"), "x\n").unwrap();
        let install = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), install.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("listed"),
            install.path().join(LIST_FILE),
        )
        .unwrap();
        let changes = compare(&tree, install.path());
        // Not "unchanged": the file behind the link was never read.
        assert_eq!(changes.added, ["etc/secret"]);
        assert_eq!(changes.unchanged, 0);
        assert!(changes.removed.is_empty());
    }

    #[test]
    fn an_image_without_the_imageroot_is_said_so() {
        let stream = tar_of(&[("other/", None, 0o755)]);
        let err = NewTree::read(stream.as_slice(), "imageroot").unwrap_err();
        assert!(err.to_string().contains("imageroot"), "{err}");
    }
}
