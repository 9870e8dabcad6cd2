//! The previous version of an instance, kept until the next update replaces it: the tree its
//! `.imageroot.lst` listed (hard links: the install replaces files by rename, so the links keep
//! the old contents), its environment file, and the units that were active before the update.
//! Its images stay in the instance's storage (the stale-image cleanup keeps one generation).
//!
//! It lives outside the install and state dirs (no backup of the state dir carries it), in
//! `<home>/.local/share/module-updater/previous/` (a rootful instance:
//! `<rootful base>/.module-updater-kept/<id>/previous/`); an update writes `previous.new/` first and
//! renames it over `previous/` once it has installed its tree, so a failed update before the
//! install leaves the kept version as it was.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::environment::Environment;
use super::extract::LIST_FILE;
use super::instance::Instance;

/// Below a rootless instance's home.
const BASE: &str = ".local/share/module-updater";
/// Beside the rootful instances' directories, one directory per instance: not in the install
/// dir, which is the rootful instance's directory itself.
const ROOTFUL_BASE: &str = ".module-updater-kept";
const CURRENT: &str = "previous";
const PENDING: &str = "previous.new";
/// Inside the kept dir: the tree, the environment file, the units active before.
const TREE: &str = "tree";
const ENVIRONMENT: &str = "environment";
const UNITS: &str = "active-units";

/// The directory holding an instance's kept versions, and the directories above it that an
/// update may have made (removed again when empty).
fn base(instance: &Instance) -> (PathBuf, Vec<PathBuf>) {
    if instance.rootless {
        let base = instance.home.join(BASE);
        let made = vec![
            base.clone(),
            instance.home.join(".local/share"),
            instance.home.join(".local"),
        ];
        (base, made)
    } else {
        let parent = instance
            .home
            .parent()
            .unwrap_or(&instance.home)
            .join(ROOTFUL_BASE);
        let base = parent.join(&instance.id);
        (base.clone(), vec![base, parent])
    }
}

/// Where an instance's previous version is kept.
pub fn dir(instance: &Instance) -> PathBuf {
    base(instance).0.join(CURRENT)
}

fn pending(instance: &Instance) -> PathBuf {
    base(instance).0.join(PENDING)
}

/// Removes the directories made for the kept versions that are empty.
fn remove_empty_bases(instance: &Instance) {
    for dir in base(instance).1 {
        if fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_none()) {
            let _ = fs::remove_dir(&dir);
        } else {
            break;
        }
    }
}

/// What is kept of the previous version.
#[derive(Debug)]
pub struct KeptVersion {
    pub environment: Environment,
    /// The units active before the update that replaced it.
    pub active_units: Vec<String>,
}

/// Whether something is kept (as seen from outside the instance: only an existence check).
pub fn exists(instance: &Instance) -> bool {
    dir(instance).join(ENVIRONMENT).exists()
}

/// The kept version, if any.
pub fn load(instance: &Instance) -> Option<KeptVersion> {
    let dir = dir(instance);
    let environment = Environment::load(&dir.join(ENVIRONMENT)).ok()?;
    if !dir.join(TREE).is_dir() {
        return None;
    }
    let active_units = fs::read_to_string(dir.join(UNITS))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    Some(KeptVersion {
        environment,
        active_units,
    })
}

/// The kept version's environment as root reads it (for a plan, for `GetInstance`): the file
/// only when it is the instance user's own regular file (never one a link points at).
pub fn environment_as_root(instance: &Instance) -> Option<Environment> {
    super::environment::read_owned(&dir(instance).join(ENVIRONMENT), instance.uid)?.environment
}

/// Saves the instance as it is now (its listed tree, its environment file, `active_units`) as
/// the pending kept version.
pub fn save(instance: &Instance, active_units: &[String]) -> io::Result<()> {
    let pending = pending(instance);
    remove_dir(&pending)?;
    let tree = pending.join(TREE);
    fs::create_dir_all(&tree)?;
    fs::set_permissions(&pending, fs::Permissions::from_mode(0o700))?;
    let install_dir = &instance.install_dir;
    for entry in listed(install_dir)? {
        copy_entry(install_dir, &tree, &entry)?;
    }
    let list = install_dir.join(LIST_FILE);
    if list.exists() {
        fs::copy(&list, tree.join(LIST_FILE))?;
    }
    fs::copy(
        instance.state_dir.join("environment"),
        pending.join(ENVIRONMENT),
    )?;
    let mut units = active_units.join("\n");
    units.push('\n');
    fs::write(pending.join(UNITS), units)?;
    Ok(())
}

/// Makes the pending version the kept one; returns the environment of the version it replaced
/// (whose images the cleanup may then remove).
pub fn promote(instance: &Instance) -> io::Result<Option<Environment>> {
    let older = load(instance).map(|k| k.environment);
    let current = dir(instance);
    remove_dir(&current)?;
    fs::rename(pending(instance), &current)?;
    Ok(older)
}

/// Drops the pending version (the update installed nothing), and the directory made for it
/// when nothing else is kept: a failed update leaves the home as it was.
pub fn discard_pending(instance: &Instance) -> io::Result<()> {
    remove_dir(&pending(instance))?;
    remove_empty_bases(instance);
    Ok(())
}

/// Drops everything kept; returns whether there was something.
pub fn remove(instance: &Instance) -> io::Result<bool> {
    let existed = dir(instance).exists() || pending(instance).exists();
    remove_dir(&dir(instance))?;
    remove_dir(&pending(instance))?;
    remove_empty_bases(instance);
    Ok(existed)
}

/// What restoring the tree did.
#[derive(Debug, Default)]
pub struct Restored {
    pub installed: usize,
    pub removed: Vec<String>,
}

/// Puts the kept tree back into the install dir: each kept entry replaces the current one by
/// rename (a file is never half written), then what the current tree lists and the kept one does
/// not is removed, then the kept list becomes `.imageroot.lst`. Run again after a crash, it does
/// the same: the kept version is only read.
pub fn restore_tree(instance: &Instance) -> io::Result<Restored> {
    let install_dir = &instance.install_dir;
    let tree = dir(instance).join(TREE);
    let kept = listed(&tree)?;
    let current = listed(install_dir)?;
    let mut restored = Restored::default();
    for entry in &kept {
        put_back(&tree, install_dir, entry)?;
        restored.installed += 1;
    }
    let kept_set: BTreeSet<&String> = kept.iter().collect();
    // Deepest first, so that a directory is empty when its turn comes.
    for entry in current.iter().rev() {
        if kept_set.contains(entry) {
            continue;
        }
        let path = install_dir.join(entry.trim_start_matches("./"));
        let gone = if entry.ends_with('/') {
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        match gone {
            Ok(()) => restored.removed.push(entry.clone()),
            // A directory that still holds what the instance made is left, as the extraction does.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) if entry.ends_with('/') => {}
            Err(e) => return Err(e),
        }
    }
    let list = tree.join(LIST_FILE);
    let target = install_dir.join(LIST_FILE);
    if list.exists() {
        let tmp = install_dir.join(format!("{LIST_FILE}.rollback"));
        fs::copy(&list, &tmp)?;
        fs::rename(&tmp, &target)?;
    }
    fs::File::open(install_dir)?.sync_all()?;
    Ok(restored)
}

/// The entries a tree's `.imageroot.lst` lists (`./a/`, `./a/b`), in its order (parents first).
fn listed(root: &Path) -> io::Result<Vec<String>> {
    match fs::read_to_string(root.join(LIST_FILE)) {
        Ok(text) => Ok(text
            .lines()
            .filter(|l| l.starts_with("./") && l.len() > 2 && !l.contains("/../"))
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Copies one listed entry of `from` into `to`: a directory is made with its mode, a file hard
/// linked (copied across file systems), a symbolic link made again.
fn copy_entry(from: &Path, to: &Path, entry: &str) -> io::Result<()> {
    let relative = entry.trim_start_matches("./").trim_end_matches('/');
    let (source, target) = (from.join(relative), to.join(relative));
    let meta = match fs::symlink_metadata(&source) {
        Ok(meta) => meta,
        // Listed but gone (removed by hand): nothing to keep.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    if meta.is_dir() {
        fs::create_dir_all(&target)?;
        fs::set_permissions(&target, meta.permissions())
    } else if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(&source)?, &target)
    } else {
        fs::hard_link(&source, &target).or_else(|_| fs::copy(&source, &target).map(drop))
    }
}

/// Puts one kept entry back at its place in `install_dir`, replacing what is there by rename.
fn put_back(tree: &Path, install_dir: &Path, entry: &str) -> io::Result<()> {
    let relative = entry.trim_start_matches("./").trim_end_matches('/');
    let (source, target) = (tree.join(relative), install_dir.join(relative));
    let meta = match fs::symlink_metadata(&source) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        match fs::symlink_metadata(&target) {
            Ok(existing) if existing.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&target)?;
                fs::create_dir(&target)?;
            }
            Err(_) => fs::create_dir_all(&target)?,
        }
        return fs::set_permissions(&target, meta.permissions());
    }
    let tmp = target.with_file_name(format!(
        ".{}.rollback",
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = fs::remove_file(&tmp);
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(&source)?, &tmp)?;
    } else {
        fs::hard_link(&source, &tmp).or_else(|_| fs::copy(&source, &tmp).map(drop))?;
    }
    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(&target)?;
    }
    fs::rename(&tmp, &target)
}

fn remove_dir(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn instance(root: &Path) -> Instance {
        let home = root.join("home");
        let install_dir = home.join(".config");
        let state_dir = install_dir.join("state");
        fs::create_dir_all(&state_dir).unwrap();
        Instance {
            id: "demo1".into(),
            rootless: true,
            uid: 0,
            gid: 0,
            home,
            install_dir,
            state_dir,
            runtime_dir: None,
        }
    }

    fn write(root: &Path, files: &[(&str, &str)], list: &str) {
        for (path, text) in files {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        fs::write(root.join(LIST_FILE), list).unwrap();
    }

    #[test]
    fn the_kept_tree_comes_back_and_the_new_entries_go() {
        let root = tempfile::tempdir().unwrap();
        let instance = instance(root.path());
        let install = &instance.install_dir;
        write(
            install,
            &[("bin/a", "a1"), ("bin/only1", "x")],
            "./bin/\n./bin/a\n./bin/only1\n",
        );
        fs::write(instance.state_dir.join("environment"), "IMAGE_URL=r/d:1\n").unwrap();
        save(&instance, &["app.service".into()]).unwrap();
        assert!(promote(&instance).unwrap().is_none());
        // The update: a replaced by rename, only1 removed, only2 added.
        fs::write(install.join("bin/.a.new"), "a2").unwrap();
        fs::rename(install.join("bin/.a.new"), install.join("bin/a")).unwrap();
        fs::remove_file(install.join("bin/only1")).unwrap();
        write(
            install,
            &[("bin/only2", "y")],
            "./bin/\n./bin/a\n./bin/only2\n",
        );
        fs::write(instance.state_dir.join("environment"), "IMAGE_URL=r/d:2\n").unwrap();

        let kept = load(&instance).unwrap();
        assert_eq!(kept.environment.get("IMAGE_URL"), Some("r/d:1"));
        assert_eq!(kept.active_units, ["app.service"]);
        let restored = restore_tree(&instance).unwrap();
        assert_eq!(fs::read_to_string(install.join("bin/a")).unwrap(), "a1");
        assert_eq!(fs::read_to_string(install.join("bin/only1")).unwrap(), "x");
        assert!(!install.join("bin/only2").exists());
        assert_eq!(restored.removed, ["./bin/only2"]);
        assert_eq!(
            fs::read_to_string(install.join(LIST_FILE)).unwrap(),
            "./bin/\n./bin/a\n./bin/only1\n"
        );
        // Again, as after a crash: the same tree.
        restore_tree(&instance).unwrap();
        assert_eq!(fs::read_to_string(install.join("bin/a")).unwrap(), "a1");
        assert!(remove(&instance).unwrap());
        assert!(load(&instance).is_none());
        assert!(!remove(&instance).unwrap());
    }
}
