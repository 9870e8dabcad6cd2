//! Makes what the update scripts wrote in the instance's state dir durable before the
//! in-progress marker goes (`engine/update/`): once the marker is gone, a crash no longer
//! makes the next update run again, so a migration's output that was still only in the page
//! cache could be lost while the update counts as done.
//!
//! Only what changed since the update began is flushed, found by its modification time: files
//! and directories (a directory's mtime moves when an entry is created, renamed or removed in
//! it). A `syncfs` would wait for everything dirty on the filesystem, podman's layers included;
//! this is a walk of a small tree and a few fsyncs. The walk never
//! follows a symbolic link nor leaves the state dir's filesystem, and beyond
//! [`MAX_VISITED`] entries the filesystem is synced whole instead.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::extract::{sync_entry, sync_filesystem};

/// Entries visited at most before the walk gives up for a `syncfs`.
pub const MAX_VISITED: usize = 10_000;

/// Slack for filesystems whose timestamps are coarser than the clock.
const MTIME_SLACK: Duration = Duration::from_secs(2);

/// What [`flush_changed`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// These entries (files, then directories) were fsynced.
    Entries(Vec<PathBuf>),
    /// The tree was too large, or had an entry we may not open: the filesystem was synced.
    Filesystem,
}

/// fsyncs every file and directory under `dir` (included) modified at or after `since`.
pub fn flush_changed(dir: &Path, since: SystemTime) -> io::Result<Flushed> {
    flush_changed_within(dir, since, MAX_VISITED)
}

fn flush_changed_within(dir: &Path, since: SystemTime, max_visited: usize) -> io::Result<Flushed> {
    let since = since.checked_sub(MTIME_SLACK).unwrap_or(since);
    let root = std::fs::symlink_metadata(dir)?;
    let mut stack = vec![dir.to_owned()];
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut visited = 0;
    while let Some(path) = stack.pop() {
        visited += 1;
        if visited > max_visited {
            sync_filesystem(dir)?;
            return Ok(Flushed::Filesystem);
        }
        // Gone since it was listed: a script's temporary file.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != root.dev() {
            continue;
        }
        let changed = meta.modified().is_ok_and(|m| m >= since);
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
            if changed {
                dirs.push(path);
            }
        } else if meta.is_file() && changed {
            files.push(path);
        }
    }
    // Files first: a directory's new entry must not be durable before the data it names.
    for (path, is_dir) in files
        .iter()
        .map(|f| (f, false))
        .chain(dirs.iter().map(|d| (d, true)))
    {
        if !sync_entry(path, is_dir)? {
            sync_filesystem(dir)?;
            return Ok(Flushed::Filesystem);
        }
    }
    files.extend(dirs);
    Ok(Flushed::Entries(files))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set_mtime(path: &Path, when: SystemTime) {
        std::fs::File::open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn only_what_changed_since_the_start_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::create_dir(root.join("db")).unwrap();
        std::fs::write(root.join("environment"), "A=1\n").unwrap();
        std::fs::write(root.join("db/old"), "x").unwrap();
        for path in ["environment", "db/old", "db", ""] {
            set_mtime(&root.join(path), old);
        }
        let since = SystemTime::now();
        std::fs::write(root.join("db/migrated"), "y").unwrap();

        let Flushed::Entries(flushed) = flush_changed(root, since).unwrap() else {
            panic!("the filesystem was synced");
        };
        // The new file, then the directory it was created in.
        assert_eq!(flushed, vec![root.join("db/migrated"), root.join("db")]);
    }

    #[test]
    fn symbolic_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let since = SystemTime::now() - Duration::from_secs(60);
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let Flushed::Entries(flushed) = flush_changed(dir.path(), since).unwrap() else {
            panic!("the filesystem was synced");
        };
        assert_eq!(flushed, vec![dir.path().to_owned()], "{flushed:?}");
    }

    #[test]
    fn a_huge_tree_is_synced_whole() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..=10 {
            std::fs::write(dir.path().join(i.to_string()), "").unwrap();
        }
        let flushed = flush_changed_within(dir.path(), SystemTime::now(), 10).unwrap();
        assert_eq!(flushed, Flushed::Filesystem);
    }
}
