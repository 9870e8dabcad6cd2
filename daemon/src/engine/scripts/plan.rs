//! What runs, in which order: the executables of a directory in byte order, and the module's
//! own steps merged by name with the built-in ones.

use nix::unistd::AccessFlags;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::ScriptError;

/// NS8's built-in step names, merged with the module's own steps by name.
pub const PULL_STEP: &str = "05pullimages";
pub const SCRIPTS_STEP: &str = "50run_scriptdir";
pub const CLEANUP_STEP: &str = "95cleanup_images";

/// The built-in steps of NS8's `update-module` action, in their order.
pub const BUILTIN_STEPS: [&str; 3] = [PULL_STEP, SCRIPTS_STEP, CLEANUP_STEP];

/// The entries of a script directory, each list in byte order of file name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Files we may execute (symlinks followed).
    pub runnable: Vec<PathBuf>,
    /// Everything else: non-executable files, directories, dangling symlinks. NS8 logs each as
    /// `<7>Skipping non-executable file PATH...`.
    pub skipped: Vec<PathBuf>,
}

impl Listing {
    /// All entries in byte order of file name, with `true` for runnable ones (to log the skipped
    /// ones where NS8's loop would).
    pub fn in_order(&self) -> Vec<(&Path, bool)> {
        let mut all: Vec<(&Path, bool)> = self
            .runnable
            .iter()
            .map(|p| (p.as_path(), true))
            .chain(self.skipped.iter().map(|p| (p.as_path(), false)))
            .collect();
        all.sort_by(|a, b| file_name_bytes(a.0).cmp(file_name_bytes(b.0)));
        all
    }
}

pub(super) fn file_name_bytes(path: &Path) -> &[u8] {
    path.file_name().unwrap_or(OsStr::new("")).as_bytes()
}

/// The entries of `dir` like NS8's `for script in dir/*` with `[[ -x ]]`: dotfiles left out, byte
/// order of name, split into runnable and skipped. A missing directory (or a file in its place) is
/// an empty listing: a module without `update-module.d` is normal.
pub fn list_executables(dir: &Path) -> Result<Listing, ScriptError> {
    let list_error = |source| ScriptError::List {
        dir: dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Listing::default());
        }
        Err(e) => return Err(list_error(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.map_err(list_error)?.file_name();
        // A shell glob does not match dotfiles.
        if name.as_bytes().first() != Some(&b'.') {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));

    let mut listing = Listing::default();
    for name in names {
        let path = dir.join(name);
        if is_runnable(&path) {
            listing.runnable.push(path);
        } else {
            listing.skipped.push(path);
        }
    }
    Ok(listing)
}

/// A regular file (symlinks followed) that exec would accept for our effective ids. `eaccess`
/// rather than `access`: exec checks the effective ids, and so does bash's `-x`.
pub(super) fn is_runnable(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => nix::unistd::eaccess(path, AccessFlags::X_OK).is_ok(),
        _ => false,
    }
}

/// One step of the merged `update-module` action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedStep {
    /// One of [`BUILTIN_STEPS`], run by the engine itself.
    Builtin(String),
    /// An executable shipped by the module in `<install>/actions/update-module/`.
    Module(PathBuf),
}

impl PlannedStep {
    /// The step name (`05pullimages`, or the module file's name).
    pub fn name(&self) -> Cow<'_, str> {
        match self {
            PlannedStep::Builtin(name) => Cow::Borrowed(name),
            PlannedStep::Module(path) => path
                .file_name()
                .unwrap_or(path.as_os_str())
                .to_string_lossy(),
        }
    }
}

/// NS8's step list of an action: the built-in steps and the module's executables, sorted together
/// by name in byte order (Go `sort.Strings`); a module file named like a built-in replaces it
/// (the later actions dir wins).
pub fn merge_module_steps(builtin: &[&str], module_steps: Vec<PathBuf>) -> Vec<PlannedStep> {
    let mut steps: BTreeMap<Vec<u8>, PlannedStep> = builtin
        .iter()
        .map(|name| {
            (
                name.as_bytes().to_vec(),
                PlannedStep::Builtin((*name).to_string()),
            )
        })
        .collect();
    for path in module_steps {
        let key = file_name_bytes(&path).to_vec();
        steps.insert(key, PlannedStep::Module(path));
    }
    steps.into_values().collect()
}
