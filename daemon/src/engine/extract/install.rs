//! Phase 2: the staged tree installed by `rename`, after checking for conflicts, and the
//! entries the image no longer ships removed.

use std::collections::HashSet;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::super::unchanged::InstalledTree;
use super::list::{OldList, list_line, parse_list_line};
use super::stage::{Node, Tree};
use super::{ExtractError, LIST_FILE};

/// What to do at one target path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
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

/// Decides the action for every staged entry, in list order, and refuses conflicts before
/// anything is touched.
pub(super) fn plan_install(
    tree: &Tree,
    install_dir: &Path,
) -> Result<Vec<(String, Action)>, ExtractError> {
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
pub(super) fn install(
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

/// Whether every ancestor of `path` is a real directory (no symlink), so removing `path` cannot
/// reach outside the tree it was installed in.
pub(super) fn ancestors_are_dirs(install_dir: &Path, path: &str) -> bool {
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
pub(super) fn remove_stale_entries(install_dir: &Path, old: &OldList, tree: &Tree) -> Vec<String> {
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
