//! The one set-up of the end-to-end tests: a sandbox, the images a test needs in its registry,
//! instances installed at one of them, and the daemon on the sandbox's bus.
//!
//! ```ignore
//! let s = Scenario::new()
//!     .module("demo", &["1.0", "2.0"])
//!     .rootless("demo", 2, "1.0")
//!     .daemon(&["--verbose"])
//!     .start()
//!     .await;
//! let run = s.update("2.0").await;
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use module_updater_tests::{Daemon, ImageSpec, Instance, Polkit, Sandbox};

use super::{JobRun, connect, daemon_args, module_image, request, run_job};

/// The images a scenario built, by the key each was given (a module's tag, or the key of
/// [`ScenarioBuilder::image`], [`ScenarioBuilder::blob`] and the like).
#[derive(Debug, Default, Clone)]
pub struct Images {
    urls: BTreeMap<String, String>,
    registry: String,
}

impl Images {
    /// The sandbox's registry (`127.0.0.1:<port>`), for the URL of an image never pushed.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The URL of the image built under `key`.
    pub fn url(&self, key: &str) -> String {
        match self.urls.get(key) {
            Some(url) => url.clone(),
            None => panic!(
                "the scenario built no image {key:?}; it has {:?}",
                self.urls.keys()
            ),
        }
    }
}

type PushFn = Box<dyn FnOnce(&Sandbox, &Images, &[Instance]) -> String>;
type TrapFn = Box<dyn Fn(&Sandbox, &Images, &[Instance]) -> String>;
type PrepareFn = Box<dyn FnOnce(&Sandbox, &Images, &[Instance])>;

struct InstanceSet {
    module: String,
    count: usize,
    rootful: bool,
    at: Option<String>,
}

/// How a daemon starts: its options on top of the sandbox's, the tools put first in its PATH,
/// its environment.
#[derive(Default)]
pub struct DaemonOptions {
    args: Vec<String>,
    trap: Vec<(String, TrapFn)>,
    env: Vec<(String, String)>,
}

impl DaemonOptions {
    pub fn new() -> DaemonOptions {
        DaemonOptions::default()
    }

    /// Extra daemon options, on top of the sandbox's and [`daemon_args`].
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// An executable `name` first in the daemon's PATH (hence its workers' and the scripts'): a
    /// stand-in for a tool we did not write, to record or steer how it is called. `script`
    /// writes its text from the scenario (for paths in the sandbox, image URLs, instance ids).
    /// The traps of a scenario's earlier daemon stay unless replaced by one of the same name.
    pub fn trap(
        mut self,
        name: &str,
        script: impl Fn(&Sandbox, &Images, &[Instance]) -> String + 'static,
    ) -> Self {
        self.trap.push((name.to_owned(), Box::new(script)));
        self
    }

    /// A variable of the daemon's environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// What a test sets up, built in this order: the instances' users, the images, the installs,
/// what `prepare` does, the daemon.
pub struct ScenarioBuilder {
    images: Vec<(String, PushFn)>,
    instances: Vec<InstanceSet>,
    prepare: Vec<PrepareFn>,
    daemon: DaemonOptions,
    start_daemon: bool,
    polkit: bool,
    system_manager: bool,
}

/// A started scenario.
pub struct Scenario {
    pub sandbox: Sandbox,
    pub images: Images,
    /// The instances, in the order they were asked for.
    pub instances: Vec<Instance>,
    pub daemon: Option<Daemon>,
    /// The sandbox's polkitd, when the builder asked for it.
    pub polkit: Option<Polkit>,
    /// How long the set-up took, for tests that report it.
    pub times: SetupTimes,
    bus: Option<zbus::Connection>,
    options: DaemonOptions,
}

/// How long each part of a scenario's set-up took.
#[derive(Debug, Clone, Copy)]
pub struct SetupTimes {
    /// The sandbox made and the instances' users and managers created, one after the other
    /// (the sandbox needs `&mut`).
    pub instances_added: Duration,
    /// The images built and pushed.
    pub images_built: Duration,
    /// The first version installed on every instance, on [`INSTALL_THREADS`] threads.
    pub installed: Duration,
}

/// How many instances are installed at once: installs take most of a large set-up's time.
pub const INSTALL_THREADS: usize = 4;

impl Scenario {
    /// A scenario with nothing in it yet; the daemon starts with no extra option unless told.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> ScenarioBuilder {
        ScenarioBuilder {
            images: Vec::new(),
            instances: Vec::new(),
            prepare: Vec::new(),
            daemon: DaemonOptions::default(),
            start_daemon: true,
            polkit: false,
            system_manager: false,
        }
    }
}

impl ScenarioBuilder {
    /// A module image per tag, as [`module_image`] makes them (a unit and `bin/version`), keyed
    /// by the tag.
    pub fn module(mut self, repo: &str, tags: &[&str]) -> Self {
        for tag in tags {
            let (repo, tag) = (repo.to_owned(), (*tag).to_owned());
            self = self.image_with(&tag.clone(), move |_| module_image(&repo, &tag, &[]));
        }
        self
    }

    /// A module at 1.0 and 2.0 ([`module_image`]) whose one extra image changes between them:
    /// `<extra>:1` and `<extra>:2` of `size` incompressible bytes, keyed `extra1` and `extra2`.
    pub fn module_with_changing_extra(self, repo: &str, extra: &str, size: u64) -> Self {
        let (repo1, repo2) = (repo.to_owned(), repo.to_owned());
        self.blob("extra1", extra, "1", size, 11)
            .blob("extra2", extra, "2", size, 12)
            .image_with("1.0", move |images| {
                module_image(&repo1, "1.0", &[images.url("extra1")])
            })
            .image_with("2.0", move |images| {
                module_image(&repo2, "2.0", &[images.url("extra2")])
            })
    }

    /// The image `spec`, keyed `key`.
    pub fn image(self, key: &str, spec: ImageSpec) -> Self {
        self.image_with(key, move |_| spec)
    }

    /// An image whose description needs what was built before it (e.g. the URLs of its extra
    /// images for its `org.nethserver.images` label), keyed `key`.
    pub fn image_with(self, key: &str, spec: impl FnOnce(&Images) -> ImageSpec + 'static) -> Self {
        let key_owned = key.to_owned();
        self.pushed(key, move |sandbox, images| {
            let spec = spec(images);
            sandbox
                .build_image(&spec)
                .unwrap_or_else(|e| panic!("build the image {key_owned:?}: {e}"))
        })
    }

    /// A one-layer image `name:tag` of `size` incompressible bytes from `seed` (an extra image),
    /// keyed `key`.
    pub fn blob(self, key: &str, name: &str, tag: &str, size: u64, seed: u64) -> Self {
        let (name, tag) = (name.to_owned(), tag.to_owned());
        self.pushed(key, move |sandbox, _| {
            sandbox
                .build_blob_image(&name, &tag, size, seed)
                .unwrap_or_else(|e| panic!("build the image {name}:{tag}: {e}"))
        })
    }

    /// An image whose description needs the instances (their ids or paths), keyed `key`.
    /// Instances are added before any image is built, and installed after.
    pub fn image_for_instances(
        mut self,
        key: &str,
        spec: impl FnOnce(&Images, &[Instance]) -> ImageSpec + 'static,
    ) -> Self {
        let key_owned = key.to_owned();
        self.images.push((
            key.to_owned(),
            Box::new(move |sandbox, images, instances| {
                let spec = spec(images, instances);
                sandbox
                    .build_image(&spec)
                    .unwrap_or_else(|e| panic!("build the image {key_owned:?}: {e}"))
            }),
        ));
        self
    }

    /// An image put in the registry by `push`, which returns its URL, keyed `key`.
    pub fn pushed(
        mut self,
        key: &str,
        push: impl FnOnce(&Sandbox, &Images) -> String + 'static,
    ) -> Self {
        self.images.push((
            key.to_owned(),
            Box::new(move |sandbox, images, _| push(sandbox, images)),
        ));
        self
    }

    /// `count` rootless instances of `module`, installed at the image keyed `at`.
    pub fn rootless(self, module: &str, count: usize, at: &str) -> Self {
        self.instances(module, count, false, Some(at))
    }

    /// `count` rootful instances of `module`, installed at the image keyed `at`.
    pub fn rootful(self, module: &str, count: usize, at: &str) -> Self {
        self.instances(module, count, true, Some(at))
    }

    /// `count` rootless instances of `module` with nothing installed.
    pub fn bare(self, module: &str, count: usize) -> Self {
        self.instances(module, count, false, None)
    }

    fn instances(mut self, module: &str, count: usize, rootful: bool, at: Option<&str>) -> Self {
        self.instances.push(InstanceSet {
            module: module.to_owned(),
            count,
            rootful,
            at: at.map(str::to_owned),
        });
        self
    }

    /// Something to do once the instances are installed, before the daemon starts (an image
    /// pulled ahead, a container made, a file the daemon's tools will write to).
    pub fn prepare(mut self, step: impl FnOnce(&Sandbox, &Images, &[Instance]) + 'static) -> Self {
        self.prepare.push(Box::new(step));
        self
    }

    /// Extra daemon options ([`DaemonOptions::args`]).
    pub fn daemon(mut self, args: &[&str]) -> Self {
        self.daemon = self.daemon.args(args);
        self
    }

    /// A stand-in tool first in the daemon's PATH ([`DaemonOptions::trap`]).
    pub fn trap(
        mut self,
        name: &str,
        script: impl Fn(&Sandbox, &Images, &[Instance]) -> String + 'static,
    ) -> Self {
        self.daemon = self.daemon.trap(name, script);
        self
    }

    /// A variable of the daemon's environment.
    pub fn daemon_env(mut self, key: &str, value: &str) -> Self {
        self.daemon = self.daemon.env(key, value);
        self
    }

    /// A real polkitd on the sandbox's bus, started before the daemon ([`Scenario::polkit`]).
    pub fn polkit(mut self) -> Self {
        self.polkit = true;
        self
    }

    /// The sandbox's stand-in for the system manager from the start (a rootful instance starts
    /// it too), so that the daemon contains every update in a scope of its own.
    pub fn system_manager(mut self) -> Self {
        self.system_manager = true;
        self
    }

    /// Leaves the daemon stopped: the test starts it ([`Scenario::start_daemon`]).
    pub fn without_daemon(mut self) -> Self {
        self.start_daemon = false;
        self
    }

    /// [`ScenarioBuilder::build`], then a connection to the sandbox's bus ([`Scenario::bus`]).
    pub async fn start(self) -> Scenario {
        let mut scenario = self.build();
        scenario.bus = Some(connect(&scenario.sandbox).await);
        scenario
    }

    /// Builds and pushes the images, adds and installs the instances, runs the `prepare` steps
    /// and starts the daemon; for tests that talk to it with other clients only.
    pub fn build(self) -> Scenario {
        let started = Instant::now();
        let mut sandbox = Sandbox::new().expect("create the sandbox");
        if self.system_manager {
            sandbox
                .start_root_manager()
                .expect("start the system manager's stand-in");
        }
        let mut instances = Vec::new();
        let mut installs = Vec::new();
        for set in self.instances {
            for _ in 0..set.count {
                let instance = if set.rootful {
                    sandbox.add_rootful_instance(&set.module)
                } else {
                    sandbox.add_rootless_instance(&set.module)
                }
                .unwrap_or_else(|e| panic!("add an instance of {}: {e}", set.module));
                if let Some(at) = set.at.clone() {
                    installs.push((instances.len(), at));
                }
                instances.push(instance);
            }
        }
        let instances_added = started.elapsed();
        let started = Instant::now();
        let mut images = Images {
            urls: BTreeMap::new(),
            registry: sandbox.registry(),
        };
        for (key, push) in self.images {
            let url = push(&sandbox, &images, &instances);
            images.urls.insert(key, url);
        }
        let images_built = started.elapsed();
        let installs: Vec<(usize, String)> = installs
            .into_iter()
            .map(|(index, at)| (index, images.url(&at)))
            .collect();
        let started = Instant::now();
        install_all(&sandbox, &instances, &installs);
        let times = SetupTimes {
            images_built,
            instances_added,
            installed: started.elapsed(),
        };
        for step in self.prepare {
            step(&sandbox, &images, &instances);
        }
        let polkit = self
            .polkit
            .then(|| sandbox.start_polkitd().expect("start polkitd"));
        let mut scenario = Scenario {
            sandbox,
            images,
            instances,
            daemon: None,
            polkit,
            times,
            bus: None,
            options: self.daemon,
        };
        if self.start_daemon {
            scenario.start_daemon();
        }
        scenario
    }
}

impl Scenario {
    /// Starts the daemon as the builder described it.
    pub fn start_daemon(&mut self) -> &Daemon {
        let command = daemon_command(&self.sandbox, &self.images, &self.instances, &self.options);
        self.start_daemon_with(command)
    }

    /// Starts the daemon from a command the test made (see `Sandbox::daemon_command`).
    pub fn start_daemon_with(&mut self, command: std::process::Command) -> &Daemon {
        assert!(self.daemon.is_none(), "the daemon already runs");
        let daemon = self
            .sandbox
            .start_daemon_with(command)
            .expect("start module-updaterd");
        self.daemon.insert(daemon)
    }

    /// Stops the daemon if one runs (SIGTERM, waits for it) and starts one with `options`.
    pub fn restart_daemon_with(&mut self, options: DaemonOptions) -> &Daemon {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().expect("stop the daemon");
        }
        self.options = options;
        self.start_daemon()
    }

    /// Adds `count` rootless instances of `module` installed at the image keyed `at`; returns
    /// their indexes in [`Scenario::instances`].
    pub fn add_rootless(&mut self, module: &str, count: usize, at: &str) -> std::ops::Range<usize> {
        let first = self.instances.len();
        let url = self.url(at);
        let mut installs = Vec::new();
        for _ in 0..count {
            let instance = self
                .sandbox
                .add_rootless_instance(module)
                .unwrap_or_else(|e| panic!("add an instance of {module}: {e}"));
            installs.push((self.instances.len(), url.clone()));
            self.instances.push(instance);
        }
        install_all(&self.sandbox, &self.instances, &installs);
        first..self.instances.len()
    }

    /// The daemon, which the test started.
    pub fn daemon(&self) -> &Daemon {
        self.daemon
            .as_ref()
            .expect("the scenario's daemon was not started")
    }

    /// A connection to the sandbox's bus (made by [`ScenarioBuilder::start`]).
    pub fn bus(&self) -> &zbus::Connection {
        self.bus
            .as_ref()
            .expect("the scenario was built without a bus connection: use start()")
    }

    /// The URL of the image keyed `key`.
    pub fn url(&self, key: &str) -> String {
        self.images.url(key)
    }

    /// The ids of every instance.
    pub fn ids(&self) -> Vec<&str> {
        self.instances.iter().map(|i| i.id.as_str()).collect()
    }

    /// Updates every instance to the image keyed `key` (no force) and follows the job.
    pub async fn update(&self, key: &str) -> JobRun {
        self.run(&request(&self.url(key), &self.ids(), false)).await
    }

    /// Sends the update-module `request` and follows the job to its end.
    pub async fn run(&self, request: &str) -> JobRun {
        run_job(self.bus(), request).await
    }

    /// `busctl --address=<sandbox bus> ARGS`.
    pub fn busctl(&self, args: &[&str]) -> std::process::Output {
        super::busctl(&self.sandbox, args)
    }
}

/// Installs `url` on `instances[i]` for each `(i, url)`, on [`INSTALL_THREADS`] threads.
fn install_all(sandbox: &Sandbox, instances: &[Instance], installs: &[(usize, String)]) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..INSTALL_THREADS.min(installs.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some((index, url)) = installs.get(i) else {
                        break;
                    };
                    let instance = &instances[*index];
                    sandbox
                        .install(instance, url)
                        .unwrap_or_else(|e| panic!("install {url} on {}: {e}", instance.id));
                }
            });
        }
    });
}

/// The daemon's command on the sandbox's bus as `options` say.
pub fn daemon_command(
    sandbox: &Sandbox,
    images: &Images,
    instances: &[Instance],
    options: &DaemonOptions,
) -> std::process::Command {
    use std::os::unix::fs::PermissionsExt;
    let mut command = sandbox.daemon_command(&[]).expect("the daemon's command");
    command.args(daemon_args(sandbox));
    command.args(&options.args);
    if !options.trap.is_empty() {
        let trap = sandbox.root().join("trap");
        std::fs::create_dir_all(&trap).expect("create the trap directory");
        for (name, script) in &options.trap {
            let path = trap.join(name);
            std::fs::write(&path, script(sandbox, images, instances)).expect("write a trap");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .expect("make a trap executable");
        }
        // Instance users run the workers' tools: they must reach the directory.
        for dir in [trap.as_path(), sandbox.root()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .expect("open the trap directory");
        }
        command.env(
            "PATH",
            format!(
                "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                trap.display()
            ),
        );
    }
    command.envs(options.env.iter().map(|(k, v)| (k, v)));
    command
}
