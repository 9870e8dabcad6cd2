//! The real-component sandbox of module-updater's end-to-end tests, demo and benchmark.
//!
//! A [`Sandbox`] stands up, as separate processes: a private `dbus-daemon` that includes the bus
//! policy the project ships, a loopback OCI registry (`docker-registry`), an image builder with
//! podman storage of its own, NS8-style module instances (rootless: a real Unix user with a real
//! `systemd --user` manager and rootless podman; rootful: directories under a temporary base,
//! served by a `systemd --user` manager running as root), the daemon, and clients pointed at it.
//! Rootless instances keep their images on overlay as NS8 nodes do ([`RootlessStorage`]); a
//! shaped uplink can be put in front of the registry ([`Sandbox::start_uplink`]).
//! Everything is torn down when the sandbox is dropped, also when a test panics; a sandbox whose
//! test process died without unwinding is cleaned up by the next sandbox created on the machine.
//!
//! The API is synchronous (it spawns processes and waits for them), so it works the same from
//! plain `#[test]`s, `#[tokio::test]`s and binaries. Everything needs root.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod bus;
mod cgroup;
pub mod cmd;
pub mod cockpit;
mod daemon;
mod footprint;
pub mod image;
mod instance;
mod manager;
pub mod polkit;
pub mod process;
mod redis;
mod registry;
mod storage;
mod uplink;

pub use cockpit::{Browser, Cockpit, CockpitWs};
pub use daemon::{Daemon, NotifySocket, client_binary, daemon_binary, find_binary};
pub use footprint::{Footprint, Leftovers, UserRecord, reap_stale};
pub use image::{FileKind, FileSpec, ImageSpec, image_env_var};
pub use instance::{InspectedImage, Instance, parse_env};
pub use manager::{ExtraManager, ensure_inaccessible_nodes};
pub use polkit::{Decision, Polkit, SubjectProcess, reap_stale_polkit};
pub use redis::Redis;
pub use registry::{REGISTRIES_CONF_D, RegistryTraffic, parse_access_log};
pub use storage::RootlessStorage;
pub use uplink::{Uplink, UplinkSettings};

use crate::process::ProcessRecord;

/// Everything that can go wrong while standing up or using the sandbox. Each message says what
/// failed and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "the test sandbox needs root (it creates users, cgroups and /etc/containers files): \
         run the tests as root, e.g. `sudo cargo xtask test`"
    )]
    NotRoot,
    #[error("{tools} not found: apt-get install {packages} (`cargo xtask test` installs it)")]
    MissingTools { tools: String, packages: String },
    #[error(
        "{name} binary not found (looked at {searched}): run `cargo build --workspace --bins` \
         (`cargo xtask test` does it) or set {env_var} to its path"
    )]
    MissingBinary {
        name: String,
        searched: String,
        env_var: String,
    },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}{}", if stdout.is_empty() { String::new() } else { format!("\nstdout: {stdout}") })]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
        stdout: String,
    },
    #[error("timed out after {secs:.1} s waiting for {what}: {detail}")]
    Timeout {
        what: String,
        secs: f64,
        detail: String,
    },
    #[error("{what} exited early ({status}); its log:\n{log}")]
    Exited {
        what: String,
        status: String,
        log: String,
    },
    #[error("cgroups: {detail}")]
    Cgroups { detail: String },
    #[error("invalid sandbox input: {detail}")]
    InvalidSpec { detail: String },
    #[error("unexpected output of `{command}`: {detail}")]
    Parse { command: String, detail: String },
}

impl SandboxError {
    pub(crate) fn io(what: &str, path: &Path, source: std::io::Error) -> SandboxError {
        SandboxError::Io {
            what: what.to_owned(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Results of the sandbox.
pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

/// A rootless instance's user and its manager.
struct UserSlot {
    record: UserRecord,
    manager: Option<manager::UserManager>,
}

/// A set of real components for one test. See the crate documentation.
pub struct Sandbox {
    // `Option` so that Drop can tear down in order and remove the directory last.
    root_dir: Option<tempfile::TempDir>,
    root: PathBuf,
    bus: Option<bus::BusDaemon>,
    registry: Option<registry::Registry>,
    builder: image::Builder,
    users: Vec<UserSlot>,
    root_manager: Option<manager::UserManager>,
    /// Root-run managers a test configured itself ([`Sandbox::start_extra_manager`]).
    extra_managers: Vec<manager::UserManager>,
    footprint: Footprint,
    /// Daemons started from this sandbox and not yet stopped (a [`Daemon`] removes itself).
    daemons: Arc<Mutex<Vec<ProcessRecord>>>,
    instances: usize,
    /// The storage driver of rootless instances added from now on.
    rootless_storage: RootlessStorage,
    /// The shaped link in front of the registry, once started ([`Sandbox::start_uplink`]).
    uplink: Option<Uplink>,
}

impl Sandbox {
    /// Stands up the bus and the registry in a fresh temporary directory.
    pub fn new() -> Result<Sandbox> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SandboxError::NotRoot);
        }
        cmd::require_tools()?;
        // Whatever a killed test process left behind goes first.
        footprint::reap_stale();

        let root_dir = tempfile::Builder::new()
            .prefix("mu-sandbox-")
            .tempdir_in("/tmp")
            .map_err(|e| {
                SandboxError::io("create a temporary directory in", Path::new("/tmp"), e)
            })?;
        let root = root_dir.path().to_path_buf();
        let rootless_storage = RootlessStorage::from_env()?;
        rootless_storage.check_installed()?;
        // Instance users and polkitd must traverse it to reach the bus socket and their homes.
        set_mode(&root, 0o755)?;
        let logs = root.join("logs");
        for dir in [&logs, &root.join("home"), &root.join("rootful")] {
            std::fs::create_dir(dir).map_err(|e| SandboxError::io("create", dir, e))?;
            set_mode(dir, 0o755)?;
        }
        let footprint = Footprint::new(&root);
        footprint.save()?;

        let mut sandbox = Sandbox {
            root_dir: Some(root_dir),
            root: root.clone(),
            bus: None,
            registry: None,
            builder: image::Builder::new(root.join("builder"), String::new()),
            users: Vec::new(),
            root_manager: None,
            extra_managers: Vec::new(),
            footprint,
            daemons: Arc::new(Mutex::new(Vec::new())),
            instances: 0,
            rootless_storage,
            uplink: None,
        };
        let bus = bus::BusDaemon::start(&root, &logs)?;
        sandbox.footprint.processes.push(bus.record.clone());
        sandbox.bus = Some(bus);
        sandbox.footprint.save()?;

        // Recorded as soon as it answers, with the registries.conf.d file it wrote.
        let registry = registry::Registry::start(&root, &logs)?;
        sandbox.footprint.processes.push(registry.record.clone());
        sandbox.footprint.registry_conf = Some(registry.conf_file.clone());
        sandbox.builder = image::Builder::new(root.join("builder"), registry.host());
        sandbox.registry = Some(registry);
        sandbox.footprint.save()?;
        Ok(sandbox)
    }

    /// Starts a Redis server for this sandbox (the cluster's leader Redis of an NS8 node),
    /// recorded so that a killed test's server is reaped like the sandbox's other processes.
    pub fn start_redis(&mut self) -> Result<Redis> {
        let redis = Redis::start(&self.log_dir())?;
        self.footprint.processes.push(redis.record.clone());
        self.footprint.save()?;
        Ok(redis)
    }

    /// The storage driver of the rootless instances added from now on (the default is
    /// overlay, or what [`RootlessStorage::ENV_VAR`] says).
    pub fn rootless_storage(&self) -> RootlessStorage {
        self.rootless_storage
    }

    /// Chooses the storage driver of the rootless instances added from now on, e.g. vfs for a
    /// test that needs nothing mounted. Fails when the driver's program is not installed.
    pub fn set_rootless_storage(&mut self, storage: RootlessStorage) -> Result<()> {
        storage.check_installed()?;
        self.rootless_storage = storage;
        Ok(())
    }

    /// The sandbox's temporary directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where log files of the sandbox's processes are written.
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The private bus: `unix:path=<root>/bus`.
    pub fn bus_address(&self) -> String {
        match &self.bus {
            Some(bus) => bus.address(),
            None => format!("unix:path={}", self.root.join("bus").display()),
        }
    }

    /// Stops the private bus and starts a new one at the same address, as a restart of the
    /// system bus does: every connection to the old one is lost.
    pub fn restart_bus(&mut self) -> Result<()> {
        if let Some(mut bus) = self.bus.take() {
            bus.stop();
            self.footprint.processes.retain(|p| p != &bus.record);
        }
        let socket = self.root.join("bus");
        if socket.exists() {
            std::fs::remove_file(&socket).map_err(|e| SandboxError::io("remove", &socket, e))?;
        }
        let logs = self.log_dir();
        let bus = bus::BusDaemon::start(&self.root, &logs)?;
        self.footprint.processes.push(bus.record.clone());
        self.bus = Some(bus);
        self.footprint.save()
    }

    /// The directory holding D-Bus activation files of the private bus.
    pub fn bus_service_dir(&self) -> PathBuf {
        self.root.join("bus-services")
    }

    /// The registry: `127.0.0.1:PORT`.
    pub fn registry(&self) -> String {
        self.builder.registry.clone()
    }

    /// Where rootless instances' homes are (`--home-base` of the daemon).
    pub fn home_base(&self) -> PathBuf {
        self.root.join("home")
    }

    /// Where rootful instances live (`--rootful-base` of the daemon).
    pub fn rootful_base(&self) -> PathBuf {
        self.root.join("rootful")
    }

    /// The bus of the root-run manager that serves rootful instances, once one was added
    /// (`--system-manager-address` of the daemon).
    pub fn root_manager_address(&self) -> Option<String> {
        self.root_manager.as_ref().map(|m| m.bus_address())
    }

    /// Where unit files for the root-run manager go (the stand-in for `/etc/systemd/system`).
    pub fn root_manager_unit_dir(&self) -> PathBuf {
        self.root.join("rootmgr-home/.config/systemd/user")
    }

    /// podman's global options for the storage rootful instances use: the stand-in for the
    /// machine's root storage, private to the sandbox. The daemon needs the same options to see
    /// the same images.
    pub fn rootful_podman_args(&self) -> Vec<String> {
        image::storage_args(&self.root.join("rootful-podman"))
    }

    /// `podman` on the image builder's private storage (the one images are built and pushed
    /// from; no instance sees it).
    pub fn builder_podman(&self) -> Command {
        self.builder.podman()
    }

    /// Builds a module image and pushes it to the sandbox registry; returns its URL
    /// `127.0.0.1:PORT/repo:tag`.
    pub fn build_image(&self, spec: &ImageSpec) -> Result<String> {
        self.builder.build_image(spec)
    }

    /// Pushes the image `source` again as `<repository>:<tag>` with its layers compressed by
    /// GNU gzip, as an image another build tool made.
    pub fn push_gzipped_elsewhere(
        &self,
        source: &str,
        repository: &str,
        tag: &str,
    ) -> Result<String> {
        self.builder.push_gzipped_elsewhere(source, repository, tag)
    }

    /// Builds and pushes a "service" image holding `/blob`: `size_bytes` of incompressible data
    /// derived from `seed`.
    pub fn build_blob_image(
        &self,
        repo: &str,
        tag: &str,
        size_bytes: u64,
        seed: u64,
    ) -> Result<String> {
        self.builder.build_blob_image(repo, tag, size_bytes, seed)
    }

    /// What this sandbox created, to check after it is dropped that nothing is left
    /// ([`Footprint::leftovers`]).
    pub fn footprint(&self) -> Footprint {
        let mut footprint = self.footprint.clone();
        if let Ok(daemons) = self.daemons.lock() {
            for record in daemons.iter() {
                if !footprint.processes.contains(record) {
                    footprint.processes.push(record.clone());
                }
            }
        }
        footprint
    }

    /// Runs `argv` as the instance's user (rootful: root) with a clean environment (`PATH`,
    /// `HOME`, `USER`, `XDG_RUNTIME_DIR` of the instance) in its home (rootful: install dir).
    /// The exit status is not checked.
    pub fn run_as<S: AsRef<std::ffi::OsStr>>(
        &self,
        instance: &Instance,
        argv: &[S],
    ) -> Result<Output> {
        let mut command = self.command_as(instance, argv);
        cmd::output(&mut command)
    }

    /// Gives a rootless instance's user a password (`chpasswd`), e.g. to type at a polkit
    /// prompt; it goes with the user when the sandbox deletes it.
    pub fn set_password(&self, instance: &Instance, password: &str) -> Result<()> {
        use std::io::Write;
        if !instance.rootless {
            return Err(SandboxError::InvalidSpec {
                detail: format!("{} is rootful: root's password stays as it is", instance.id),
            });
        }
        let mut command = cmd::clean("chpasswd");
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let _lock = footprint::lock("passwd.lock")?;
        let mut child = command.spawn().map_err(|source| SandboxError::Spawn {
            command: cmd::describe(&command),
            source,
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(format!("{}:{password}\n", instance.id).as_bytes())
                .map_err(|e| SandboxError::io("write to", Path::new("chpasswd"), e))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| SandboxError::io("wait for", Path::new("chpasswd"), e))?;
        cmd::check(&command, output).map(drop)
    }

    /// Like [`Sandbox::run_as`], but the command is returned to be configured and spawned.
    pub fn command_as<S: AsRef<std::ffi::OsStr>>(
        &self,
        instance: &Instance,
        argv: &[S],
    ) -> Command {
        instance::command_as(instance, argv)
    }

    /// `podman ARGS` as the instance's user (rootful: root, with [`Sandbox::rootful_podman_args`]).
    pub fn podman_as<S: AsRef<std::ffi::OsStr>>(
        &self,
        instance: &Instance,
        args: &[S],
    ) -> Result<Output> {
        let mut argv: Vec<std::ffi::OsString> = vec!["podman".into()];
        if !instance.rootless {
            argv.extend(self.rootful_podman_args().into_iter().map(Into::into));
        }
        argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self.run_as(instance, &argv)
    }

    /// `busctl --user ARGS` as the instance's user, on the bus of its manager (rootful: the
    /// root-run manager's bus), e.g. `get-property org.freedesktop.systemd1 PATH IFACE NAME`.
    pub fn user_busctl<S: AsRef<std::ffi::OsStr>>(
        &self,
        instance: &Instance,
        args: &[S],
    ) -> Result<Output> {
        let mut argv: Vec<std::ffi::OsString> = vec!["busctl".into()];
        if instance.rootless {
            argv.push("--user".into());
        } else {
            argv.push(
                format!(
                    "--address=unix:path={}",
                    instance.runtime_dir.join("bus").display()
                )
                .into(),
            );
        }
        argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self.run_as(instance, &argv)
    }

    /// `systemctl --user ARGS` as the instance's user (rootful: against the root-run manager).
    pub fn systemctl_as<S: AsRef<std::ffi::OsStr>>(
        &self,
        instance: &Instance,
        args: &[S],
    ) -> Result<Output> {
        let mut argv: Vec<std::ffi::OsString> = vec!["systemctl".into(), "--user".into()];
        argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self.run_as(instance, &argv)
    }

    /// A property of a unit of the instance's manager, as busctl prints it (e.g. `s "active"`).
    pub fn unit_property(&self, instance: &Instance, unit: &str, property: &str) -> Result<String> {
        let path = unit_object_path(unit);
        let mut argv = vec!["get-property", "org.freedesktop.systemd1"];
        argv.push(&path);
        argv.extend(["org.freedesktop.systemd1.Unit", property]);
        let output = self.user_busctl(instance, &argv)?;
        let mut command = Command::new("busctl");
        command.args(&argv);
        let output = cmd::check(&command, output)?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// `org.freedesktop.systemd1.Manager.Reload` of the instance's manager (what
    /// `systemctl --user daemon-reload` does); returns when the reload is complete.
    pub fn daemon_reload(&self, instance: &Instance) -> Result<()> {
        let argv = [
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "Reload",
        ];
        let output = self.user_busctl(instance, &argv)?;
        let mut command = Command::new("busctl");
        command.args(argv);
        cmd::check(&command, output).map(drop)
    }

    /// Writes the instance's environment file as NS8 does: sorted `K=V` lines, owned by the
    /// instance user, mode kept (0644 for a new file).
    pub fn write_env(&self, instance: &Instance, env: &BTreeMap<String, String>) -> Result<()> {
        instance::write_env(instance, env)
    }

    fn save_footprint(&self) -> Result<()> {
        self.footprint.save()
    }
}

/// The object path of a unit of a systemd manager (`hello.service` ->
/// `/org/freedesktop/systemd1/unit/hello_2eservice`).
pub fn unit_object_path(unit: &str) -> String {
    let mut path = String::from("/org/freedesktop/systemd1/unit/");
    for byte in unit.bytes() {
        if byte.is_ascii_alphanumeric() {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("_{byte:02x}"));
        }
    }
    path
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SandboxError::io("chmod", path, e))
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Reverse order of creation: daemons, managers and users, the root manager, the
        // registry and the bus, then files.
        if let Ok(mut daemons) = self.daemons.lock() {
            for record in daemons.drain(..) {
                process::terminate_foreign(&record, Duration::from_millis(0));
            }
        }
        let mut problems = Vec::new();
        // Extra managers first: the units they run may be clients of anything below.
        for mut manager in self.extra_managers.drain(..).rev() {
            problems.extend(
                manager
                    .stop()
                    .into_iter()
                    .map(|d| format!("cgroup {}", d.display())),
            );
        }
        for slot in self.users.iter_mut().rev() {
            if let Some(mut manager) = slot.manager.take() {
                problems.extend(
                    manager
                        .stop()
                        .into_iter()
                        .map(|d| format!("cgroup {}", d.display())),
                );
            }
            problems.extend(footprint::remove_user(&slot.record, true));
        }
        if let Some(mut manager) = self.root_manager.take() {
            problems.extend(
                manager
                    .stop()
                    .into_iter()
                    .map(|d| format!("cgroup {}", d.display())),
            );
        }
        if let Some(uplink) = self.uplink.take() {
            problems.extend(uplink.stop());
        }
        if let Some(mut registry) = self.registry.take() {
            registry.stop();
        }
        if let Some(mut bus) = self.bus.take() {
            bus.stop();
        }
        if let Some(dir) = self.root_dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(err) = dir.close() {
                // Files of podman's storage may be owned by sub-uids or read-only: root's
                // `rm -rf` removes them regardless.
                let mut rm = Command::new("rm");
                rm.arg("-rf").arg(&path);
                if cmd::run(&mut rm).is_err() {
                    problems.push(format!("{}: {err}", path.display()));
                }
            }
        }
        // Anything recorded but not covered above (e.g. a user whose manager never started).
        problems.extend(self.footprint.teardown());
        if !problems.is_empty() {
            eprintln!(
                "module-updater-tests: teardown left behind: {}",
                problems.join("; ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_object_paths_are_escaped_as_systemd_does() {
        assert_eq!(
            unit_object_path("hello.service"),
            "/org/freedesktop/systemd1/unit/hello_2eservice"
        );
        assert_eq!(
            unit_object_path("demo1-x@a.service"),
            "/org/freedesktop/systemd1/unit/demo1_2dx_40a_2eservice"
        );
    }

    #[test]
    fn environment_format_is_ns8s() {
        let env = parse_env("B=2\nA=x=y z\n\nnoequals\nC=\n");
        let expected: Vec<(&str, &str)> = vec![("A", "x=y z"), ("B", "2"), ("C", "")];
        assert_eq!(
            env.iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            expected
        );
    }

    #[test]
    fn sandbox_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Sandbox>();
        shareable::<Instance>();
    }
}
