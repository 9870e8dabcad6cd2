//! NS8's `state/environment` file: `KEY=VALUE` lines, no quoting, no escaping (reference §2.3).
//!
//! Reading follows Python's `read_envfile` (the agent's reader): empty lines, `#` comments and lines
//! without `=` are skipped, the value is everything after the first `=`, and a later duplicate wins.
//! Writing follows `mset_env` since ns8-core PR #1095: the whole file, sorted by key, rewritten
//! atomically under `flock` on the sibling `.environment.lock`, so our writes and the agent's
//! writes exclude each other. One deliberate difference: a patch value of `None` removes the key
//! instead of writing the literal string `None` (NS8 bug, reference §3 item 3).

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Name of the environment file inside the state dir.
pub const ENVIRONMENT_FILE: &str = "environment";
/// Name of the lock file NS8's agent library locks around every environment write.
pub const LOCK_FILE: &str = ".environment.lock";
/// Prefix of the temporary file written next to the environment file (same as NS8's).
pub const TEMP_PREFIX: &str = ".environment.tmp-";
/// Mode of a newly created environment file. The agent units `chmod 644 environment` at every
/// start (NethServer/dev#7915), so 0644 is what every reader expects.
const DEFAULT_MODE: u32 = 0o644;

/// Errors of reading or writing the environment file.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("cannot read environment file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot lock {}: {source}; check that the state dir exists and is writable by the instance user",
        path.display()
    )]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot write environment file {}: {source}; the previous file is left unchanged",
        path.display()
    )]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "invalid environment key {key:?}: {reason}; keys must be non-empty and contain no '=', newline or NUL"
    )]
    InvalidKey { key: String, reason: &'static str },
    #[error(
        "invalid value for environment key {key}: {reason}; values must be one line without NUL"
    )]
    InvalidValue { key: String, reason: &'static str },
}

/// The content of an environment file, sorted by key.
///
/// `BTreeMap<String, _>` orders keys by bytes, which equals Python's `sorted()` on the ASCII keys
/// NS8 uses, so [`Environment::render`] produces the same file as `mset_env`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the file text like NS8's `read_envfile`. Never fails: malformed lines are skipped,
    /// as the agent skips them (it only warns).
    pub fn parse(text: &str) -> Environment {
        let mut vars = BTreeMap::new();
        for line in text.split('\n') {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((key, value)) = line.split_once('=') {
                vars.insert(key.to_owned(), value.to_owned());
            }
        }
        Environment { vars }
    }

    /// The file text: `K=V\n` per key in key order; an empty environment is an empty string.
    pub fn render(&self) -> String {
        let len = self.vars.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let mut out = String::with_capacity(len);
        for (key, value) in &self.vars {
            out.push_str(key);
            out.push('=');
            out.push_str(value);
            out.push('\n');
        }
        out
    }

    /// Reads and parses an environment file.
    pub fn load(path: &Path) -> Result<Environment, EnvError> {
        let text = fs::read_to_string(path).map_err(|source| EnvError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Environment::parse(&text))
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// Sets `key` to `value` and returns the previous value. Refuses what the line format cannot
    /// hold: a key with `=`, a newline or NUL (or empty, or starting with `#`, which a reader
    /// would skip), a value with a newline or NUL.
    pub fn set(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Option<String>, EnvError> {
        let key = key.into();
        let value = value.into();
        check_key(&key)?;
        check_value(&key, &value)?;
        Ok(self.vars.insert(key, value))
    }

    /// Removes `key` and returns its value, if it was set.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.vars.remove(key)
    }

    /// The variables in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether there are no variables.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Applies a patch: `Some` sets the key, `None` removes it. Validates every entry first, so
    /// an invalid patch leaves `self` unchanged.
    pub fn apply(&mut self, patch: &[(String, Option<String>)]) -> Result<(), EnvError> {
        for (key, value) in patch {
            check_key(key)?;
            if let Some(value) = value {
                check_value(key, value)?;
            }
        }
        for (key, value) in patch {
            match value {
                Some(value) => {
                    self.vars.insert(key.clone(), value.clone());
                }
                None => {
                    self.vars.remove(key);
                }
            }
        }
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), EnvError> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.contains('=') {
        "contains '='"
    } else if key.contains('\n') {
        "contains a newline"
    } else if key.contains('\0') {
        "contains NUL"
    } else if key.starts_with('#') {
        "starts with '#', so readers would skip the line"
    } else {
        return Ok(());
    };
    Err(EnvError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

fn check_value(key: &str, value: &str) -> Result<(), EnvError> {
    let reason = if value.contains('\n') {
        "contains a newline"
    } else if value.contains('\0') {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(EnvError::InvalidValue {
        key: key.to_owned(),
        reason,
    })
}

/// Patches `<state_dir>/environment` the way NS8's `mset_env` does, and returns the new content.
///
/// Under a blocking `flock(LOCK_EX)` on `<state_dir>/.environment.lock` (the lock NS8's agent
/// takes, so concurrent agent writes cannot be lost), the file is re-read, the patch applied
/// (`Some` sets, `None` removes; unknown keys are kept), and the result written to a temporary
/// file in the same dir with the existing file's mode (0644 for a new file), fsynced, renamed over
/// the file, and the dir fsynced. On any error the old file is untouched and the temporary file
/// is removed.
pub fn update_file(
    state_dir: &Path,
    patch: &[(String, Option<String>)],
) -> Result<Environment, EnvError> {
    let lock_path = state_dir.join(LOCK_FILE);
    let _lock = lock_exclusive(&lock_path)?;

    let path = state_dir.join(ENVIRONMENT_FILE);
    let (mut env, mode) = match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)
                .map_err(|source| EnvError::Read {
                    path: path.clone(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o7777;
            (Environment::parse(&text), mode)
        }
        // The agent library creates the file when it is missing; so do we.
        Err(e) if e.kind() == io::ErrorKind::NotFound => (Environment::new(), DEFAULT_MODE),
        Err(source) => return Err(EnvError::Read { path, source }),
    };
    env.apply(patch)?;
    write_atomically(state_dir, &path, env.render().as_bytes(), mode)?;
    Ok(env)
}

/// Opens (creating 0644 if needed) and locks `path`, waiting for the holder. The fd is
/// close-on-exec (std opens every file with `O_CLOEXEC`), so no child inherits the lock.
fn lock_exclusive(path: &Path) -> Result<Flock<File>, EnvError> {
    let lock_err = |source: io::Error| EnvError::Lock {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map_err(lock_err)?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(lock) => return Ok(lock),
            // A signal interrupted the wait: wait again.
            Err((f, Errno::EINTR)) => file = f,
            Err((_, errno)) => return Err(lock_err(io::Error::from(errno))),
        }
    }
}

/// Writes `contents` to `path` through a temporary sibling and a rename, with fsyncs, so a reader
/// sees either the old or the new file and a crash never leaves a truncated one.
fn write_atomically(dir: &Path, path: &Path, contents: &[u8], mode: u32) -> Result<(), EnvError> {
    let write_err = |source: io::Error| EnvError::Write {
        path: path.to_owned(),
        source,
    };
    // NamedTempFile removes the file when dropped on an error path.
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(write_err)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write_err)?;
    tmp.write_all(contents).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(path).map_err(|e| write_err(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The file as the daemon reads it: owned by the instance's user, never through a link.

/// The largest environment file that is read (a bigger one is not an instance's).
pub(super) const MAX_ENVIRONMENT_SIZE: u64 = 1 << 20;

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime: (i64, i64),
    pub(super) ctime: (i64, i64),
    pub(super) uid: u32,
    pub(super) mode: u32,
}

impl FileIdentity {
    pub fn of(meta: &Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            uid: meta.uid(),
            mode: meta.mode(),
        }
    }

    /// Whether a change of the file could still go unseen by its identity: its ctime is within
    /// `margin` of `read_at` (or after it, when the clock was set back).
    pub fn racy(&self, read_at: SystemTime, margin: Duration) -> bool {
        let ctime = i128::from(self.ctime.0) * 1_000_000_000 + i128::from(self.ctime.1);
        let read = read_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        ctime + margin.as_nanos() as i128 > read
    }
}

/// An environment file as read: its identity when opened, and its contents when it is a regular
/// file owned by the expected user and not too big.
pub struct EnvironmentRead {
    pub identity: FileIdentity,
    pub environment: Option<Environment>,
}

/// Opens the environment file without following a final symlink (a user cannot point the
/// daemon at another file) and without blocking on a FIFO, and reads it when it is a regular
/// file owned by `uid`. `None` when it cannot be opened or read.
pub fn read_owned(path: &Path, uid: u32) -> Option<EnvironmentRead> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    // The identity is taken before reading: a change during the read changes it after.
    let meta = file.metadata().ok()?;
    let identity = FileIdentity::of(&meta);
    if !meta.is_file() || meta.uid() != uid || meta.len() > MAX_ENVIRONMENT_SIZE {
        return Some(EnvironmentRead {
            identity,
            environment: None,
        });
    }
    let mut text = String::new();
    io::Read::read_to_string(&mut file, &mut text).ok()?;
    Some(EnvironmentRead {
        identity,
        environment: Some(Environment::parse(&text)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn patch(items: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TEMP_PREFIX))
            .collect()
    }

    #[test]
    fn parse_follows_read_envfile() {
        let text = "B=2\n\n# comment=ignored\nnoequals\nA=1\nURL=a=b c\nEMPTY=\nA=3\n";
        let env = Environment::parse(text);
        assert_eq!(env.get("A"), Some("3"), "last duplicate wins");
        assert_eq!(env.get("B"), Some("2"));
        assert_eq!(
            env.get("URL"),
            Some("a=b c"),
            "value is everything after the first '='"
        );
        assert_eq!(env.get("EMPTY"), Some(""));
        assert_eq!(env.get("noequals"), None);
        assert_eq!(env.get("# comment"), None);
        assert_eq!(env.len(), 4);
    }

    #[test]
    fn parse_keeps_carriage_returns_like_python() {
        // Python strips only '\n'; a CRLF file keeps the '\r' in the value.
        let env = Environment::parse("A=1\r\n");
        assert_eq!(env.get("A"), Some("1\r"));
    }

    #[test]
    fn render_is_sorted_with_trailing_newline() {
        let env = Environment::parse("NODE_ID=1\nIMAGE_URL=x\nMODULE_ID=m1\n");
        assert_eq!(env.render(), "IMAGE_URL=x\nMODULE_ID=m1\nNODE_ID=1\n");
        assert_eq!(Environment::new().render(), "");
    }

    #[test]
    fn render_sorts_like_python_sorted() {
        // Python sorts by code point: '_' (0x5f) after uppercase letters, digits before them.
        let env = Environment::parse("I_B=1\nI2=1\nIA=1\nI_=1\n");
        let keys: Vec<&str> = env.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["I2", "IA", "I_", "I_B"]);
    }

    #[test]
    fn set_get_remove() {
        let mut env = Environment::new();
        assert!(env.is_empty());
        assert_eq!(env.set("A", "1").unwrap(), None);
        assert_eq!(env.set("A", "2").unwrap(), Some("1".into()));
        assert_eq!(env.get("A"), Some("2"));
        assert_eq!(env.remove("A"), Some("2".into()));
        assert_eq!(env.remove("A"), None);
        assert!(env.is_empty());
    }

    #[test]
    fn set_refuses_what_the_format_cannot_hold() {
        let mut env = Environment::new();
        for key in ["", "A=B", "A\nB", "#A", "A\0"] {
            let err = env.set(key, "v").unwrap_err();
            assert!(matches!(err, EnvError::InvalidKey { .. }), "{key:?}: {err}");
        }
        for value in ["a\nb", "a\0"] {
            let err = env.set("K", value).unwrap_err();
            assert!(err.to_string().contains("K"), "{err}");
            assert!(matches!(err, EnvError::InvalidValue { .. }));
        }
        assert!(env.is_empty());
    }

    #[test]
    fn load_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("environment");
        let err = Environment::load(&missing).unwrap_err();
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );
        fs::write(&missing, "A=1\n").unwrap();
        assert_eq!(Environment::load(&missing).unwrap().get("A"), Some("1"));
    }

    #[test]
    fn update_file_patches_sorted_and_keeps_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ENVIRONMENT_FILE);
        // add-module writes in insertion order, unsorted.
        fs::write(
            &path,
            "IMAGE_ID=old\nIMAGE_URL=ghcr.io/x/a:1\nMODULE_ID=a1\nPREV_FOO_IMAGE=None\nCUSTOM=keep me\n",
        )
        .unwrap();
        let env = update_file(
            dir.path(),
            &patch(&[
                ("IMAGE_URL", Some("ghcr.io/x/a:2")),
                ("PREV_IMAGE_URL", Some("ghcr.io/x/a:1")),
                ("PREV_FOO_IMAGE", None),
                ("NEVER_SET", None),
            ]),
        )
        .unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "CUSTOM=keep me\nIMAGE_ID=old\nIMAGE_URL=ghcr.io/x/a:2\nMODULE_ID=a1\nPREV_IMAGE_URL=ghcr.io/x/a:1\n"
        );
        assert_eq!(env, Environment::parse(&text));
        assert!(!text.contains("None"));
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn update_file_keeps_the_mode() {
        for mode in [0o600, 0o640, 0o644] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(ENVIRONMENT_FILE);
            fs::write(&path, "A=1\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            update_file(dir.path(), &patch(&[("B", Some("2"))])).unwrap();
            assert_eq!(mode_of(&path), mode);
            assert_eq!(fs::read_to_string(&path).unwrap(), "A=1\nB=2\n");
        }
    }

    #[test]
    fn update_file_creates_missing_file_and_lock_0644() {
        let dir = tempfile::tempdir().unwrap();
        let env = update_file(dir.path(), &patch(&[("A", Some("1"))])).unwrap();
        assert_eq!(env.get("A"), Some("1"));
        let path = dir.path().join(ENVIRONMENT_FILE);
        assert_eq!(fs::read_to_string(&path).unwrap(), "A=1\n");
        assert_eq!(mode_of(&path), 0o644);
        let lock = dir.path().join(LOCK_FILE);
        assert!(lock.is_file());
        // The open applies the umask to 0644: never wider.
        assert_eq!(mode_of(&lock) & !0o644, 0);
    }

    #[test]
    fn update_file_removing_the_last_key_writes_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ENVIRONMENT_FILE);
        fs::write(&path, "A=1\n").unwrap();
        let env = update_file(dir.path(), &patch(&[("A", None)])).unwrap();
        assert!(env.is_empty());
        assert_eq!(fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn update_file_rejects_invalid_patch_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ENVIRONMENT_FILE);
        fs::write(&path, "Z=1\nA=2\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let ino = fs::metadata(&path).unwrap();
        for bad in [
            patch(&[("OK", Some("1")), ("BAD", Some("two\nlines"))]),
            patch(&[("OK", Some("1")), ("A=B", Some("x"))]),
            patch(&[("", None)]),
        ] {
            let err = update_file(dir.path(), &bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    EnvError::InvalidKey { .. } | EnvError::InvalidValue { .. }
                ),
                "{err}"
            );
        }
        // Untouched: same bytes (unsorted as it was), same inode, same mode, no temp files.
        assert_eq!(fs::read_to_string(&path).unwrap(), "Z=1\nA=2\n");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino.ino());
        assert_eq!(mode_of(&path), 0o600);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn update_file_on_unreadable_environment_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails, nothing is replaced.
        fs::create_dir(dir.path().join(ENVIRONMENT_FILE)).unwrap();
        let err = update_file(dir.path(), &patch(&[("A", Some("1"))])).unwrap_err();
        assert!(matches!(err, EnvError::Read { .. }), "{err}");
        assert!(dir.path().join(ENVIRONMENT_FILE).is_dir());
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn update_file_in_missing_dir_reports_lock_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = update_file(&missing, &patch(&[("A", Some("1"))])).unwrap_err();
        assert!(matches!(err, EnvError::Lock { .. }), "{err}");
        assert!(err.to_string().contains(".environment.lock"), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn update_file_waits_for_the_agent_lock() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ENVIRONMENT_FILE), "A=1\n").unwrap();
        // Hold the lock the way NS8's agent does (a separate open file description).
        let held = Flock::lock(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.path().join(LOCK_FILE))
                .unwrap(),
            FlockArg::LockExclusive,
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let state = dir.path().to_owned();
        let worker = std::thread::spawn(move || {
            let r = update_file(&state, &[("B".into(), Some("2".into()))]);
            tx.send(()).unwrap();
            r
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "update_file must block while the lock is held"
        );
        // While blocked, the agent writes a key: it must not be lost (update re-reads under lock).
        fs::write(dir.path().join(ENVIRONMENT_FILE), "A=1\nAGENT=x\n").unwrap();
        drop(held);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        worker.join().unwrap().unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(ENVIRONMENT_FILE)).unwrap(),
            "A=1\nAGENT=x\nB=2\n"
        );
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let state = dir.path().to_owned();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        update_file(&state, &[(format!("K{t}_{i}"), Some(format!("{t}.{i}")))])
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let env = Environment::load(&dir.path().join(ENVIRONMENT_FILE)).unwrap();
        assert_eq!(env.len(), 80);
        assert_eq!(env.get("K7_9"), Some("7.9"));
        assert!(leftovers(dir.path()).is_empty());
    }

    proptest! {
        #[test]
        fn parse_render_roundtrip(
            vars in prop::collection::btree_map("[A-Z_][A-Z0-9_]{0,20}", "[^\n]{0,40}", 0..20)
        ) {
            let mut env = Environment::new();
            for (k, v) in &vars {
                if v.contains('\0') { continue; }
                env.set(k.clone(), v.clone()).unwrap();
            }
            let text = env.render();
            prop_assert!(text.is_empty() || text.ends_with('\n'));
            prop_assert_eq!(Environment::parse(&text), env);
        }

        #[test]
        fn parse_never_panics(text in any::<String>()) {
            let env = Environment::parse(&text);
            // Whatever was parsed renders to something that parses the same again.
            prop_assert_eq!(Environment::parse(&env.render()), env);
        }

        /// A patch of image keys (what an update writes) changes those keys only: every other
        /// key of the file, known to us or not, keeps its value.
        #[test]
        fn a_patch_loses_no_unknown_key(
            vars in prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_.-]{0,16}", "[^\n\x00]{0,40}", 0..24),
            patch in prop::collection::vec(
                ("(IMAGE_[A-Z]{1,6}|PREV_[A-Z_]{1,8}|[A-Z]{1,6}_IMAGE)", prop::option::of("[^\n\x00]{0,40}")),
                0..8,
            ),
        ) {
            let mut env = Environment::new();
            for (k, v) in &vars {
                env.set(k.clone(), v.clone()).unwrap();
            }
            let before = env.clone();
            env.apply(&patch).unwrap();
            for (key, value) in before.iter() {
                if !patch.iter().any(|(k, _)| k == key) {
                    prop_assert_eq!(env.get(key), Some(value), "{} was lost", key);
                }
            }
            for (key, _) in &patch {
                let last = patch.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref());
                prop_assert_eq!(env.get(key), last);
            }
            prop_assert_eq!(Environment::parse(&env.render()), env);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The same through the file: whatever lines the file had (unknown keys, comments,
        /// junk), every key a reader saw before is still there after `update_file`.
        #[test]
        fn update_file_loses_no_unknown_key(
            lines in prop::collection::vec("[^\n]{0,40}", 0..24),
            patch in prop::collection::vec(
                ("(IMAGE_[A-Z]{1,6}|PREV_[A-Z_]{1,8})", prop::option::of("[^\n\x00]{0,40}")),
                0..4,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(ENVIRONMENT_FILE);
            let text = lines.join("\n");
            fs::write(&path, &text).unwrap();
            let before = Environment::parse(&text);
            let after = update_file(dir.path(), &patch).unwrap();
            prop_assert_eq!(&Environment::load(&path).unwrap(), &after);
            for (key, value) in before.iter() {
                if !patch.iter().any(|(k, _)| k == key) {
                    prop_assert_eq!(after.get(key), Some(value), "{} was lost", key);
                }
            }
            prop_assert!(leftovers(dir.path()).is_empty());
        }
    }

    #[test]
    fn racy_means_a_ctime_within_the_margin_of_the_read() {
        let identity = |sec: i64, nsec: i64| FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (sec, nsec),
            ctime: (sec, nsec),
            uid: 0,
            mode: 0o100644,
        };
        let at = |sec: u64| UNIX_EPOCH + Duration::from_secs(sec);
        let margin = Duration::from_secs(2);
        assert!(identity(100, 0).racy(at(101), margin));
        assert!(identity(100, 0).racy(at(100), margin));
        assert!(
            identity(100, 0).racy(at(50), margin),
            "a ctime in the future"
        );
        assert!(identity(99, 999_999_999).racy(at(101), margin));
        assert!(!identity(99, 0).racy(at(101), margin));
        assert!(!identity(-5, 0).racy(at(101), margin));
    }
}
