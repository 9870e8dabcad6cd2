//! Module instances laid out as NethServer 8 does (`ns8-update-module.md` §2), and installed as
//! its `add-module` would.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::{Gid, Group, Uid, User};

use crate::footprint::{self, UserRecord};
use crate::manager::{ManagerSpec, RunAs, UserManager};
use crate::{Result, Sandbox, SandboxError, UserSlot, cmd, image, set_mode};

/// A module instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The module id, e.g. `demoqxzk1`; for a rootless instance also its Unix user name.
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    /// The user's home (rootful: the install dir).
    pub home: PathBuf,
    /// `AGENT_INSTALL_DIR`: `~/.config`, or `<rootful base>/<id>`.
    pub install_dir: PathBuf,
    /// `AGENT_STATE_DIR`: `<install dir>/state`.
    pub state_dir: PathBuf,
    /// `XDG_RUNTIME_DIR` of its manager: `/run/user/UID` (rootful: the root-run manager's).
    pub runtime_dir: PathBuf,
    pub rootless: bool,
}

impl Instance {
    /// `<state dir>/environment`.
    pub fn env_file(&self) -> PathBuf {
        self.state_dir.join("environment")
    }

    /// The environment file as a map (NS8's format: `K=V` lines, the value is everything after
    /// the first `=`; empty lines and lines without `=` are skipped).
    pub fn read_env(&self) -> Result<BTreeMap<String, String>> {
        let path = self.env_file();
        let text =
            std::fs::read_to_string(&path).map_err(|e| SandboxError::io("read", &path, e))?;
        Ok(parse_env(&text))
    }

    /// `~/.config/systemd/user` (rootless) where the imageroot's units land.
    pub fn unit_dir(&self) -> PathBuf {
        self.install_dir.join("systemd/user")
    }

    /// The bus of the instance's manager.
    pub fn manager_bus_address(&self) -> String {
        format!("unix:path={}", self.runtime_dir.join("bus").display())
    }

    /// Writes `contents` at `relative` below the install dir (e.g. `systemd/user/x.service`),
    /// creating missing parent directories (0755); everything created belongs to the instance
    /// user, as if the user had written it.
    pub fn write_file(
        &self,
        relative: &str,
        contents: impl AsRef<[u8]>,
        mode: u32,
    ) -> Result<PathBuf> {
        let path = self.install_dir.join(relative);
        let Some(parent) = path.parent() else {
            return Err(SandboxError::InvalidSpec {
                detail: format!("{relative:?} has no parent"),
            });
        };
        let mut missing = Vec::new();
        let mut dir = parent;
        while !dir.exists() {
            missing.push(dir.to_path_buf());
            match dir.parent() {
                Some(up) => dir = up,
                None => break,
            }
        }
        for dir in missing.iter().rev() {
            owned_dir(dir, 0o755, self.uid, self.gid)?;
        }
        std::fs::write(&path, contents).map_err(|e| SandboxError::io("write", &path, e))?;
        set_mode(&path, mode)?;
        std::os::unix::fs::chown(&path, Some(self.uid), Some(self.gid))
            .map_err(|e| SandboxError::io("chown", &path, e))?;
        Ok(path)
    }
}

/// Parses NS8's environment format.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Writes the environment sorted by key, owned by the instance user, keeping the file's mode.
pub(crate) fn write_env(instance: &Instance, env: &BTreeMap<String, String>) -> Result<()> {
    let path = instance.env_file();
    let mode = std::fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let mut text = String::new();
    for (key, value) in env {
        text.push_str(key);
        text.push('=');
        text.push_str(value);
        text.push('\n');
    }
    let temporary = instance.state_dir.join(".environment.sandbox-tmp");
    std::fs::write(&temporary, text).map_err(|e| SandboxError::io("write", &temporary, e))?;
    set_mode(&temporary, mode)?;
    std::os::unix::fs::chown(&temporary, Some(instance.uid), Some(instance.gid))
        .map_err(|e| SandboxError::io("chown", &temporary, e))?;
    std::fs::rename(&temporary, &path).map_err(|e| SandboxError::io("rename into", &path, e))
}

/// A command running `argv` as the instance's user with its clean environment.
pub(crate) fn command_as<S: AsRef<OsStr>>(instance: &Instance, argv: &[S]) -> Command {
    let env = [
        ("PATH", cmd::PATH.to_owned()),
        ("LANG", "C.UTF-8".to_owned()),
        ("HOME", instance.home.display().to_string()),
        ("USER", user_name(instance)),
        ("LOGNAME", user_name(instance)),
        (
            "XDG_RUNTIME_DIR",
            instance.runtime_dir.display().to_string(),
        ),
    ];
    let mut command;
    if instance.rootless {
        // runuser resets the environment itself; `env -i` makes it exactly ours.
        command = cmd::clean("runuser");
        command.args(["-u", &instance.id, "--", "env", "-i"]);
        command.args(env.iter().map(|(k, v)| format!("{k}={v}")));
        command.args(argv);
    } else {
        let mut words = argv.iter();
        command = Command::new(
            words
                .next()
                .map(|w| w.as_ref())
                .unwrap_or(OsStr::new("true")),
        );
        command.args(words);
        command.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    }
    command.current_dir(&instance.home);
    command
}

fn user_name(instance: &Instance) -> String {
    if instance.rootless {
        instance.id.clone()
    } else {
        "root".to_owned()
    }
}

/// Eight random bytes from the kernel.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Unthinkable on Linux; still unique enough for names within one process.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return (now as u64) ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(bytes)
}

/// A module id matching `^[a-z]+[0-9]+$`: the module name, four random letters (so that tests
/// running in parallel never collide) and the instance counter. At most 31 characters.
fn new_id(module: &str, counter: usize) -> Result<String> {
    if module.is_empty() || !module.chars().all(|c| c.is_ascii_lowercase()) {
        return Err(SandboxError::InvalidSpec {
            detail: format!(
                "module name {module:?} must be lowercase letters only (instance ids are \
                 `^[a-z]+[0-9]+$`)"
            ),
        });
    }
    let mut random = random_u64();
    let letters: String = (0..4)
        .map(|_| {
            let letter = char::from(b'a' + (random % 26) as u8);
            random /= 26;
            letter
        })
        .collect();
    let number = counter.to_string();
    let keep = 31usize
        .saturating_sub(letters.len() + number.len())
        .min(module.len());
    Ok(format!("{}{letters}{number}", &module[..keep]))
}

/// A uid (and gid) that no user or group has. Chosen at random above the regular users and
/// below the sub-uid ranges, so that a uid freed by one test is not handed straight to a
/// parallel one (which would confuse the leftover checks).
fn free_uid() -> Result<u32> {
    for _ in 0..1000 {
        let uid = 30_000 + u32::try_from(random_u64() % 29_000).unwrap_or(0);
        let user_free = matches!(User::from_uid(Uid::from_raw(uid)), Ok(None));
        let group_free = matches!(Group::from_gid(Gid::from_raw(uid)), Ok(None));
        if user_free && group_free {
            return Ok(uid);
        }
    }
    Err(SandboxError::InvalidSpec {
        detail: "no free uid between 30000 and 59000: remove stale test users (`userdel -r`)"
            .into(),
    })
}

/// `useradd` of a fresh user for instance `id`: retried on lock contention, serialised with
/// the other sandboxes of the machine.
fn useradd(module: &str, counter: usize, home_base: &Path) -> Result<(String, u32, u32)> {
    let mut attempt = 0u32;
    loop {
        let id = new_id(module, counter)?;
        let mut command = cmd::clean("useradd");
        let (output, uid) = {
            let _lock = footprint::lock("passwd.lock")?;
            if User::from_name(&id).ok().flatten().is_some() {
                continue;
            }
            let uid = free_uid()?;
            command.args(["-m", "-b"]).arg(home_base);
            command.args(["-s", "/usr/sbin/nologin", "-u", &uid.to_string(), "-U", &id]);
            (cmd::output(&mut command)?, uid)
        };
        if output.status.success() {
            let user = User::from_name(&id)
                .ok()
                .flatten()
                .ok_or_else(|| SandboxError::Parse {
                    command: cmd::describe(&command),
                    detail: format!("user {id} does not exist after useradd succeeded"),
                })?;
            return Ok((id, uid, user.gid.as_raw()));
        }
        attempt += 1;
        if !footprint::lock_contention(&output.stderr) || attempt >= 20 {
            return cmd::check(&command, output).map(|_| (id, uid, uid));
        }
        std::thread::sleep(std::time::Duration::from_millis(50 * u64::from(attempt)));
    }
}

/// Creates `path` (mode `mode`) owned by `uid:gid`.
fn owned_dir(path: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(SandboxError::io("create", path, e)),
    }
    set_mode(path, mode)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| SandboxError::io("chown", path, e))
}

/// What `podman image inspect` says about an installed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectedImage {
    pub id: String,
    pub digest: String,
    pub repo_digest: String,
    pub labels: BTreeMap<String, String>,
}

fn parse_inspect(command: &str, stdout: &[u8]) -> Result<InspectedImage> {
    let parse_error = |detail: String| SandboxError::Parse {
        command: command.to_owned(),
        detail,
    };
    let value: serde_json::Value =
        serde_json::from_slice(stdout).map_err(|e| parse_error(format!("not JSON: {e}")))?;
    let image = value
        .get(0)
        .ok_or_else(|| parse_error("an empty list".into()))?;
    let text = |key: &str| {
        image
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| parse_error(format!("no {key}")))
    };
    let repo_digest = image
        .get("RepoDigests")
        .and_then(|v| v.get(0))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            parse_error("no RepoDigests (was the image pulled from a registry?)".into())
        })?;
    let labels = image
        .get("Labels")
        .and_then(|v| v.as_object())
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Ok(InspectedImage {
        id: text("Id")?,
        digest: text("Digest")?,
        repo_digest,
        labels,
    })
}

/// Extracts the imageroot of an image into the install dir as NS8's `extract-image` does:
/// `podman create` + `podman export | tar -x` (as the instance user), `.imageroot.lst` with
/// `./`-prefixed entries, directories ending with `/`, `LC_ALL=C` sorted.
const EXTRACT_SCRIPT: &str = r#"set -euo pipefail
url=$1 imageroot=$2 strip=$3
shift 3
cid=$(podman "$@" create "$url")
trap 'podman "$@" rm -f "$cid" >/dev/null 2>&1' EXIT
podman "$@" export "$cid" \
  | tar --no-overwrite-dir --no-same-owner --exclude=.gitignore --strip-components="$strip" \
        -x -v -f - "$imageroot" \
  | sed -r "s#^$imageroot/#./#" | { grep -vx '\./' || true; } | LC_ALL=C sort > .imageroot.lst
"#;

impl Sandbox {
    /// A rootless instance of `module`: a real Unix user with home, install and state dirs, an
    /// environment file with `MODULE_ID`, and a running `systemd --user` (answering on its bus).
    pub fn add_rootless_instance(&mut self, module: &str) -> Result<Instance> {
        self.instances += 1;
        let home_base = self.home_base();
        let (id, uid, gid) = useradd(module, self.instances, &home_base)?;
        let home = home_base.join(&id);
        let runtime_dir = PathBuf::from(format!("/run/user/{uid}"));
        let record = UserRecord {
            name: id.clone(),
            uid,
            gid,
            home: home.clone(),
            runtime_dir: runtime_dir.clone(),
        };
        let cgroup_name = format!("module-updater-test-{id}");
        let cgroups: Vec<PathBuf> = crate::cgroup::hierarchies()?
            .iter()
            .map(|h| h.join(&cgroup_name))
            .collect();
        self.footprint.users.push(record.clone());
        self.footprint.cgroups.extend(cgroups);
        self.users.push(UserSlot {
            record,
            manager: None,
        });
        self.save_footprint()?;

        // NS8: `chmod 0700 ~<id>`; the install dir is ~/.config and the state dir inside it.
        set_mode(&home, 0o700)?;
        let install_dir = home.join(".config");
        let state_dir = install_dir.join("state");
        owned_dir(&install_dir, 0o755, uid, gid)?;
        owned_dir(&state_dir, 0o700, uid, gid)?;
        // Before the user's first podman command, which would settle on vfs otherwise.
        crate::storage::configure(&install_dir, self.rootless_storage, uid, gid)?;
        std::fs::create_dir_all("/run/user")
            .map_err(|e| SandboxError::io("create", Path::new("/run/user"), e))?;
        owned_dir(&runtime_dir, 0o700, uid, gid)?;
        let instance = Instance {
            id: id.clone(),
            uid,
            gid,
            home: home.clone(),
            install_dir,
            state_dir,
            runtime_dir: runtime_dir.clone(),
            rootless: true,
        };
        write_env(
            &instance,
            &BTreeMap::from([("MODULE_ID".to_owned(), id.clone())]),
        )?;

        let spec = self.user_manager_spec(&instance, cgroup_name, false);
        let probe = instance.clone();
        let manager = UserManager::start(spec, || systemd_owned(&probe, &["--user"]))?;
        self.footprint.processes.push(manager.record.clone());
        if let Some(slot) = self.users.last_mut() {
            slot.manager = Some(manager);
        }
        self.save_footprint()?;
        Ok(instance)
    }

    fn user_manager_spec(
        &self,
        instance: &Instance,
        cgroup_name: String,
        short_of_run_space: bool,
    ) -> ManagerSpec {
        let id = &instance.id;
        ManagerSpec {
            what: format!("systemd --user of {id}"),
            cgroup_name,
            user: Some(RunAs {
                uid: instance.uid,
                gid: instance.gid,
            }),
            env: vec![
                ("PATH".into(), cmd::PATH.into()),
                ("LANG".into(), "C.UTF-8".into()),
                ("HOME".into(), instance.home.display().to_string()),
                ("USER".into(), id.clone()),
                ("LOGNAME".into(), id.clone()),
                ("SHELL".into(), "/usr/sbin/nologin".into()),
                (
                    "XDG_RUNTIME_DIR".into(),
                    instance.runtime_dir.display().to_string(),
                ),
            ],
            runtime_dir: instance.runtime_dir.clone(),
            log: self.log_dir().join(format!("manager-{id}.log")),
            short_of_run_space,
        }
    }

    /// Starts the rootless instance's `systemd --user` again, in a mount namespace where
    /// `/run/systemd` has too little room for systemd to reload: the manager then refuses
    /// `Reload`, as a real one does on a node whose /run is full.
    pub fn restart_manager_short_of_run_space(&mut self, instance: &Instance) -> Result<()> {
        let slot = self
            .users
            .iter_mut()
            .find(|slot| slot.record.name == instance.id)
            .ok_or_else(|| {
                SandboxError::io(
                    "find the manager of",
                    &instance.home,
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
            })?;
        let old = slot.manager.take();
        if let Some(mut old) = old {
            old.stop();
            self.footprint.processes.retain(|p| p != &old.record);
        }
        let spec = self.user_manager_spec(
            instance,
            format!("module-updater-test-{}", instance.id),
            true,
        );
        let probe = instance.clone();
        let manager = UserManager::start(spec, || systemd_owned(&probe, &["--user"]))?;
        self.footprint.processes.push(manager.record.clone());
        if let Some(slot) = self.users.iter_mut().find(|s| s.record.name == instance.id) {
            slot.manager = Some(manager);
        }
        self.save_footprint()
    }

    /// A rootful instance of `module`: `<rootful base>/<id>` and its `state/` (0700) owned by
    /// root, an environment file with `MODULE_ID`, served by the root-run manager (started on
    /// first use; see [`Sandbox::root_manager_address`]).
    pub fn add_rootful_instance(&mut self, module: &str) -> Result<Instance> {
        self.instances += 1;
        let id = new_id(module, self.instances)?;
        self.ensure_root_manager()?;
        let install_dir = self.rootful_base().join(&id);
        let state_dir = install_dir.join("state");
        owned_dir(&install_dir, 0o755, 0, 0)?;
        owned_dir(&state_dir, 0o700, 0, 0)?;
        let instance = Instance {
            id: id.clone(),
            uid: 0,
            gid: 0,
            home: install_dir.clone(),
            install_dir,
            state_dir,
            runtime_dir: self.root.join("rootmgr"),
            rootless: false,
        };
        write_env(&instance, &BTreeMap::from([("MODULE_ID".to_owned(), id)]))?;
        Ok(instance)
    }

    /// Starts the root-run `systemd --user` that stands in for the system manager, if it is not
    /// running yet: daemons started afterwards get it as `--system-manager-address` and put each
    /// update in a scope there. Without it (no rootful instance), a daemon runs updates uncontained.
    pub fn start_root_manager(&mut self) -> Result<()> {
        self.ensure_root_manager()
    }

    /// Starts the root-run `systemd --user` that stands in for the system manager.
    fn ensure_root_manager(&mut self) -> Result<()> {
        if self.root_manager.is_some() {
            return Ok(());
        }
        let runtime_dir = self.root.join("rootmgr");
        let home = self.root.join("rootmgr-home");
        let config = home.join(".config");
        for dir in [&runtime_dir, &home, &config.join("systemd/user")] {
            std::fs::create_dir_all(dir).map_err(|e| SandboxError::io("create", dir, e))?;
        }
        set_mode(&runtime_dir, 0o700)?;
        let name = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroup_name = format!("module-updater-test-{name}-rootmgr");
        self.footprint.cgroups.extend(
            crate::cgroup::hierarchies()?
                .iter()
                .map(|h| h.join(&cgroup_name)),
        );
        self.save_footprint()?;
        let spec = ManagerSpec {
            what: "root-run systemd --user (system manager stand-in)".into(),
            cgroup_name,
            user: None,
            env: vec![
                ("PATH".into(), cmd::PATH.into()),
                ("LANG".into(), "C.UTF-8".into()),
                ("HOME".into(), home.display().to_string()),
                ("USER".into(), "root".into()),
                ("LOGNAME".into(), "root".into()),
                ("XDG_CONFIG_HOME".into(), config.display().to_string()),
                ("XDG_RUNTIME_DIR".into(), runtime_dir.display().to_string()),
            ],
            runtime_dir: runtime_dir.clone(),
            log: self.log_dir().join("manager-root.log"),
            short_of_run_space: false,
        };
        let address = format!("--address=unix:path={}", runtime_dir.join("bus").display());
        let manager = UserManager::start(spec, || {
            let mut command = cmd::clean("busctl");
            command.arg(&address);
            name_has_owner(command, "org.freedesktop.systemd1")
        })?;
        self.footprint.processes.push(manager.record.clone());
        self.root_manager = Some(manager);
        self.save_footprint()
    }

    /// Installs `url` into the instance as NS8's `add-module` would: pull (with the extra images
    /// of `org.nethserver.images`) as the instance user, extract the imageroot into the install
    /// dir with `.imageroot.lst`, write the environment (`IMAGE_ID`, `IMAGE_URL`,
    /// `IMAGE_DIGEST`, `IMAGE_REOPODIGEST`, `MODULE_ID`, `<NAME>_IMAGE`), and reload the
    /// instance's manager.
    pub fn install(&self, instance: &Instance, url: &str) -> Result<()> {
        self.checked_podman(instance, &["pull", "--quiet", "--tls-verify=false", url])?;
        let inspect_args = ["image", "inspect", url];
        let output = self.checked_podman(instance, &inspect_args)?;
        let image = parse_inspect(&format!("podman image inspect {url}"), &output.stdout)?;
        let extra: Vec<String> = image
            .labels
            .get("org.nethserver.images")
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        for extra_url in &extra {
            self.checked_podman(
                instance,
                &["pull", "--quiet", "--tls-verify=false", extra_url],
            )?;
        }

        // NS8 strips one leading and one trailing `/` and defaults to `imageroot`.
        let label = image
            .labels
            .get("org.nethserver.imageroot")
            .map(String::as_str)
            .unwrap_or("");
        let label = label.strip_prefix('/').unwrap_or(label);
        let label = label.strip_suffix('/').unwrap_or(label);
        let imageroot = if label.is_empty() { "imageroot" } else { label };
        let strip = imageroot.split('/').count().to_string();
        let mut argv: Vec<String> = vec![
            "bash".into(),
            "-c".into(),
            EXTRACT_SCRIPT.into(),
            "extract-image".into(),
        ];
        argv.extend([url.to_owned(), imageroot.to_owned(), strip]);
        if !instance.rootless {
            argv.extend(self.rootful_podman_args());
        }
        let mut extract = self.command_as(instance, &argv);
        extract.current_dir(&instance.install_dir);
        let output = cmd::output(&mut extract)?;
        cmd::check(&extract, output)?;

        let mut env = instance.read_env()?;
        env.insert("IMAGE_ID".into(), image.id.clone());
        env.insert("IMAGE_URL".into(), url.to_owned());
        env.insert("IMAGE_DIGEST".into(), image.digest.clone());
        // Sic: NS8's spelling of the key.
        env.insert("IMAGE_REOPODIGEST".into(), image.repo_digest.clone());
        env.insert("MODULE_ID".into(), instance.id.clone());
        for extra_url in &extra {
            env.insert(image::image_env_var(extra_url)?, extra_url.clone());
        }
        write_env(instance, &env)?;
        self.daemon_reload(instance)
    }

    /// podman as the instance, failing on a non-zero exit.
    fn checked_podman(&self, instance: &Instance, args: &[&str]) -> Result<std::process::Output> {
        let output = self.podman_as(instance, args)?;
        let mut command = Command::new("podman");
        command.args(args);
        let user = if instance.rootless {
            instance.id.as_str()
        } else {
            "root"
        };
        cmd::check(&command, output).map_err(|err| match err {
            SandboxError::CommandFailed {
                command,
                status,
                stderr,
                stdout,
            } => SandboxError::CommandFailed {
                command: format!("{command} (as {user})"),
                status,
                stderr,
                stdout,
            },
            other => other,
        })
    }
}

/// `NameHasOwner(name)` through the given busctl command (address options already set).
fn name_has_owner(mut busctl: Command, name: &str) -> Result<bool> {
    busctl.args([
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
    ]);
    busctl.args(["NameHasOwner", "s", name]);
    let output = cmd::output_timeout(&mut busctl, std::time::Duration::from_secs(5))?;
    Ok(output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "b true")
}

/// Whether `org.freedesktop.systemd1` has an owner on the instance user's bus (asked as the
/// user: root is refused on another user's bus).
fn systemd_owned(instance: &Instance, busctl_args: &[&str]) -> Result<bool> {
    let mut argv = vec!["busctl"];
    argv.extend(busctl_args);
    argv.extend([
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
    ]);
    argv.extend(["NameHasOwner", "s", "org.freedesktop.systemd1"]);
    let mut command = command_as(instance, &argv);
    let output = cmd::output_timeout(&mut command, std::time::Duration::from_secs(5))?;
    Ok(output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "b true")
}
