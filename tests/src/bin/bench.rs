//! `cargo xtask bench`: the daemon side by side with NS8's pipeline (`ns8-baseline`) on the same
//! work, for N = 1, 10 and 50 rootless instances, each point repeated and the median reported.
//!
//! Two profiles. `loopback` (the default, the CPU view): the registry on loopback, where bytes
//! are free, and rootless storage on vfs as in the earlier rounds. `node` (what an NS8 node
//! sees): the registry behind a shaped uplink the bench puts in front of it (50 Mbit/s shared by
//! every download, 20 ms to open a connection) and rootless storage on overlay; each point also
//! reports the bytes that went down the uplink and the download floor (one copy of what changed
//! ÷ bandwidth).
//!
//! For every point and repeat a fresh sandbox is stood up (bus, registry, the demo module's
//! images, 2N + 1 instances installed at 1.0, the release daemon); then, with provisioning
//! done and excluded from the timings (the uplink is shaped only during (a) and (b)):
//! - the floor: the podman commands of one instance's update, timed alone on the extra instance;
//! - (a) the daemon updates N instances to 2.0 in one `UpdateModule` job, followed over D-Bus,
//!   with a second connection calling `ListInstances` in a loop;
//! - (b) `ns8-baseline` updates the other N instances, all at once, each as its user.
//!
//! The order of (a) and (b) alternates between repeats. Everything is torn down after each point.
//!
//! Usage: `bench [--profile loopback|node] [--mbit 50] [--connect-ms 20] [--storage DRIVER]
//! [--quick] [--json FILE] [--sizes 1,10,50] [--repeats 3] [--daemon-arg ARG]...
//! [--keep-logs DIR] [--no-list-probe]`; `bench --compare-report DIR` prints the results of
//! `cargo xtask bench-compare`.

#[path = "bench/baseline.rs"]
mod baseline;
#[path = "bench/compare.rs"]
mod compare;
#[path = "bench/daemon_job.rs"]
mod daemon_job;
#[path = "bench/measure.rs"]
mod measure;
#[path = "bench/module.rs"]
mod module;
#[path = "bench/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use module_updater_tests::{Instance, RootlessStorage, Sandbox, SandboxError, UplinkSettings};
use serde::Serialize;

/// Threads installing instances at 1.0 (each install is a podman pull and an export).
const INSTALL_THREADS: usize = 4;

/// Everything that stops the benchmark. Each says what failed; the sandbox is torn down anyway.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("cannot {what}: {source}")]
    Dbus {
        what: String,
        #[source]
        source: zbus::Error,
    },
    #[error("cannot read /proc/{pid}: {source}")]
    Proc {
        pid: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Check(String),
}

impl BenchError {
    pub fn dbus(what: &str, source: zbus::Error) -> BenchError {
        BenchError::Dbus {
            what: what.to_owned(),
            source,
        }
    }

    pub fn proc(pid: &str, source: std::io::Error) -> BenchError {
        BenchError::Proc {
            pid: pid.to_owned(),
            source,
        }
    }

    pub fn io(what: &str, path: &Path, source: std::io::Error) -> BenchError {
        BenchError::Io {
            what: what.to_owned(),
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What the bench models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Profile {
    /// The registry on loopback, storage on vfs: what the machine's CPU does.
    Loopback,
    /// The registry behind a shaped uplink, storage on overlay: what an NS8 node sees.
    Node,
}

/// Command-line options.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub profile: Profile,
    /// The node profile's uplink.
    pub uplink: UplinkSettings,
    /// Rootless instances' storage (by default vfs for loopback, overlay for node).
    pub storage: RootlessStorage,
    pub sizes: Vec<usize>,
    pub repeats: usize,
    pub quick: bool,
    pub json: PathBuf,
    pub daemon_args: Vec<String>,
    /// Where to copy each point's sandbox logs before teardown.
    pub keep_logs: Option<PathBuf>,
    /// Whether `ListInstances` is called in a loop during (a) (off: to see what the probe costs).
    pub list_probe: bool,
}

const USAGE: &str = "usage: bench [--profile loopback|node] [--mbit M] [--connect-ms D] [--storage S]
       [--quick] [--json FILE] [--sizes 1,10,50] [--repeats 3] [--daemon-arg ARG]...
  --profile P    loopback (default): registry on loopback, vfs storage (the CPU view);
                 node: registry behind a shaped uplink, overlay storage (what a node sees)
  --mbit M       the node profile's uplink bandwidth, Mbit/s, shared by all downloads (default 50)
  --connect-ms D the node profile's time to open a connection, ms (default 20)
  --storage S    rootless instances' storage: overlay, fuse-overlayfs or vfs (default: the profile's)
  --quick        N = 1 and 10, one repeat (the regression check before touching the hot path)
  --json FILE    where to write the results (default: target/bench.json of the workspace)
  --sizes LIST   the numbers of instances, comma-separated
  --repeats K    runs per point (the median is reported)
  --daemon-arg A an extra option for module-updaterd, e.g. --daemon-arg=--max-parallel=4
  --keep-logs D  copy each point's sandbox logs (daemon, registry, ns8-baseline) to D/N<n>-<k>
  --no-list-probe  no ListInstances loop during (a) (to see what the probe itself costs)";

/// The workspace root (this crate is `tests/` in it).
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

fn parse_args(args: &[String]) -> Result<Options, BenchError> {
    let mut options = Options {
        profile: Profile::Loopback,
        uplink: UplinkSettings::default(),
        storage: RootlessStorage::Vfs,
        sizes: vec![1, 10, 50],
        repeats: 3,
        quick: false,
        json: workspace_root().join("target/bench.json"),
        daemon_args: Vec::new(),
        keep_logs: None,
        list_probe: true,
    };
    let mut sizes = None;
    let mut repeats = None;
    let mut storage = None;
    let mut iter = args.iter();
    let usage = |message: String| BenchError::Usage(format!("{message}\n{USAGE}"));
    while let Some(arg) = iter.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| iter.next().cloned())
                .ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match name {
            "--quick" => options.quick = true,
            "--no-list-probe" => options.list_probe = false,
            "--json" => options.json = PathBuf::from(value(name)?),
            "--daemon-arg" => options.daemon_args.push(value(name)?),
            "--keep-logs" => options.keep_logs = Some(PathBuf::from(value(name)?)),
            "--profile" => {
                options.profile = match value(name)?.as_str() {
                    "loopback" => Profile::Loopback,
                    "node" => Profile::Node,
                    other => {
                        return Err(usage(format!("--profile {other:?}: loopback or node")));
                    }
                }
            }
            "--mbit" => {
                let text = value(name)?;
                match text.parse::<f64>() {
                    Ok(m) if m.is_finite() && m > 0.0 => options.uplink.mbit_per_s = m,
                    _ => return Err(usage(format!("--mbit {text:?}: a positive number"))),
                }
            }
            "--connect-ms" => {
                let text = value(name)?;
                match text.parse::<u64>() {
                    Ok(ms) => options.uplink.connect_delay = Duration::from_millis(ms),
                    _ => return Err(usage(format!("--connect-ms {text:?}: milliseconds"))),
                }
            }
            "--storage" => {
                let text = value(name)?;
                match RootlessStorage::parse(&text) {
                    Some(driver) => storage = Some(driver),
                    None => {
                        return Err(usage(format!(
                            "--storage {text:?}: one of {}",
                            RootlessStorage::NAMES
                        )));
                    }
                }
            }
            "--sizes" => {
                let text = value(name)?;
                let parsed: Result<Vec<usize>, _> =
                    text.split(',').map(|s| s.trim().parse::<usize>()).collect();
                match parsed {
                    Ok(list) if !list.is_empty() && list.iter().all(|n| *n > 0) => {
                        sizes = Some(list)
                    }
                    _ => {
                        return Err(usage(format!(
                            "--sizes {text:?}: positive integers, e.g. 1,10,50"
                        )));
                    }
                }
            }
            "--repeats" => {
                let text = value(name)?;
                match text.parse::<usize>() {
                    Ok(k) if k > 0 => repeats = Some(k),
                    _ => return Err(usage(format!("--repeats {text:?}: a positive integer"))),
                }
            }
            "-h" | "--help" => return Err(BenchError::Usage(USAGE.to_owned())),
            other => return Err(usage(format!("unknown argument {other:?}"))),
        }
    }
    if options.quick {
        options.sizes = vec![1, 10];
        options.repeats = 1;
    }
    if let Some(list) = sizes {
        options.sizes = list;
    }
    if let Some(k) = repeats {
        options.repeats = k;
    }
    options.storage = storage.unwrap_or(match options.profile {
        Profile::Loopback => RootlessStorage::Vfs,
        Profile::Node => RootlessStorage::Overlay,
    });
    Ok(options)
}

/// NS8's pipeline as a script, next to the workspace: `<root>/../shared/bench/ns8-baseline`.
fn baseline_script() -> Result<PathBuf, BenchError> {
    let path = workspace_root().join("../shared/bench/ns8-baseline");
    if path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::Check(format!(
            "{} not found: the benchmark compares the daemon with NS8's pipeline, which it reads \
             from shared/bench/ns8-baseline beside the workspace directory; put it there",
            path.display()
        )))
    }
}

/// How long the parts of one point took (provisioning is excluded from every measurement).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Setup {
    pub instances: usize,
    pub sandbox_s: f64,
    pub images_s: f64,
    pub users_s: f64,
    pub install_s: f64,
    pub daemon_start_s: f64,
    pub floor_s: f64,
    pub teardown_s: f64,
    pub total_s: f64,
}

/// Registry traffic during a part.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Traffic {
    pub requests: u64,
    pub bytes: u64,
    pub blob_bytes: u64,
    pub blobs: usize,
    pub max_serves_per_blob: u64,
}

impl From<module_updater_tests::RegistryTraffic> for Traffic {
    fn from(t: module_updater_tests::RegistryTraffic) -> Traffic {
        Traffic {
            requests: t.requests,
            bytes: t.bytes,
            blob_bytes: t.blob_bytes,
            blobs: t.blob_downloads.len(),
            max_serves_per_blob: t.max_serves_per_blob(),
        }
    }
}

/// One repeat of one point.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    pub n: usize,
    pub repeat: usize,
    pub order: String,
    pub setup: Setup,
    pub floor: baseline::Floor,
    pub daemon: daemon_job::DaemonRun,
    pub daemon_rss_idle_kib: u64,
    pub daemon_registry: Traffic,
    pub daemon_registry_cpu_s: f64,
    pub daemon_bus_cpu_s: f64,
    pub baseline: baseline::BaselineRun,
    pub baseline_registry: Traffic,
    pub baseline_registry_cpu_s: f64,
    /// The node profile's uplink during (a) and (b).
    pub uplink: Option<UplinkRun>,
}

/// What went down the uplink (node profile).
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkRun {
    /// One copy of what changed from 1.0 to 2.0 (manifests, configs and layers 1.0 lacks).
    pub changed_bytes: u64,
    /// `changed_bytes` ÷ the bandwidth.
    pub download_floor_s: f64,
    pub daemon_bytes_down: u64,
    pub daemon_connections: u64,
    pub baseline_bytes_down: u64,
    pub baseline_connections: u64,
}

fn pid_of(sandbox: &Sandbox, what_prefix: &str) -> Option<u32> {
    sandbox
        .footprint()
        .processes
        .iter()
        .find(|p| p.what.starts_with(what_prefix))
        .and_then(|p| u32::try_from(p.pid).ok())
}

fn cpu_secs(pid: Option<u32>) -> f64 {
    pid.and_then(|p| measure::proc_cpu(&p.to_string()).ok())
        .map(|c| c.total_secs())
        .unwrap_or(0.0)
}

/// Users and managers one after the other (the sandbox needs `&mut` for that), then the
/// installs on a few threads. Returns the instances and both durations.
fn provision(
    sandbox: &mut Sandbox,
    count: usize,
    url: &str,
) -> Result<(Vec<Instance>, f64, f64), BenchError> {
    let started = Instant::now();
    let mut instances = Vec::with_capacity(count);
    for _ in 0..count {
        instances.push(sandbox.add_rootless_instance("demo")?);
    }
    let users_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let sandbox = &*sandbox;
    let errors: Vec<SandboxError> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..INSTALL_THREADS.min(count))
            .map(|_| {
                scope.spawn(|| {
                    let mut errors = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(instance) = instances.get(i) else {
                            break;
                        };
                        if let Err(err) = sandbox.install(instance, url) {
                            errors.push(err);
                            break;
                        }
                    }
                    errors
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    if let Some(err) = errors.into_iter().next() {
        return Err(err.into());
    }
    Ok((instances, users_s, started.elapsed().as_secs_f64()))
}

/// One point: a fresh sandbox, (a) and (b) on N instances each, torn down at the end.
fn run_point(
    runtime: &tokio::runtime::Runtime,
    options: &Options,
    script: &Path,
    n: usize,
    repeat: usize,
) -> Result<(Run, module::Images), BenchError> {
    let point_started = Instant::now();
    let mut run = Run {
        n,
        repeat,
        ..Run::default()
    };
    let started = Instant::now();
    let mut sandbox = Sandbox::new()?;
    // As a node's podman is configured, before any instance exists.
    sandbox.set_rootless_storage(options.storage)?;
    if options.profile == Profile::Node {
        sandbox.start_uplink(options.uplink)?;
    }
    run.setup.sandbox_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let images = module::build(&sandbox, options.profile)?;
    run.setup.images_s = started.elapsed().as_secs_f64();
    if sandbox.uplink().is_some() {
        let changed_bytes = module::changed_bytes(&images)?;
        run.uplink = Some(UplinkRun {
            changed_bytes,
            download_floor_s: changed_bytes as f64 / options.uplink.bytes_per_s(),
            ..UplinkRun::default()
        });
    }
    // The script may sit below a directory instance users cannot traverse.
    let script = sandbox.user_executable(script)?;

    run.setup.instances = 2 * n + 1;
    progress(&format!(
        "N={n} #{}: provisioning {} instances at 1.0",
        repeat + 1,
        2 * n + 1
    ));
    let (mut instances, users_s, install_s) = provision(&mut sandbox, 2 * n + 1, &images.v1)?;
    run.setup.users_s = users_s;
    run.setup.install_s = install_s;
    let floor_instance = instances.pop().ok_or_else(|| {
        BenchError::Check("provisioning returned no instance for the floor".into())
    })?;
    let baseline_set = instances.split_off(n);
    let daemon_set = instances;

    let started = Instant::now();
    // The sandbox gives the daemon its bus, bases, state dir and config.
    let mut args: Vec<String> = Vec::new();
    for arg in sandbox.rootful_podman_args() {
        args.push(format!("--rootful-podman-arg={arg}"));
    }
    args.extend(options.daemon_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = sandbox.start_daemon(&args)?;
    run.setup.daemon_start_s = started.elapsed().as_secs_f64();
    // Idle: started, name owned, nothing asked yet.
    std::thread::sleep(Duration::from_millis(500));
    run.daemon_rss_idle_kib = measure::status_kib(daemon.pid(), "VmRSS")
        .map_err(|e| BenchError::proc(&daemon.pid().to_string(), e))?;

    let started = Instant::now();
    run.floor = baseline::measure(&sandbox, &floor_instance, &images)?;
    run.setup.floor_s = started.elapsed().as_secs_f64();

    let registry_pid = pid_of(&sandbox, "docker-registry");
    let bus_pid = pid_of(&sandbox, "private dbus-daemon");
    let daemon_first = repeat.is_multiple_of(2);
    run.order = if daemon_first { "a-then-b" } else { "b-then-a" }.to_owned();
    for part in if daemon_first { [0, 1] } else { [1, 0] } {
        let offset = sandbox.registry_log_offset()?;
        let registry_cpu = cpu_secs(registry_pid);
        let link_before = sandbox
            .uplink()
            .map(|u| {
                u.set_shaped(true);
                (u.bytes_down(), u.connections())
            })
            .unwrap_or_default();
        if part == 0 {
            progress(&format!("N={n} #{}: (a) module-updaterd", repeat + 1));
            let bus_cpu = cpu_secs(bus_pid);
            let ids: Vec<String> = daemon_set.iter().map(|i| i.id.clone()).collect();
            let request =
                serde_json::json!({"module_url": images.v2, "instances": ids, "force": false})
                    .to_string();
            run.daemon = runtime
                .block_on(daemon_job::run(
                    &sandbox.bus_address(),
                    daemon.pid(),
                    &request,
                    &ids,
                    options.list_probe,
                ))
                .map_err(|e| with_log(e, &daemon))?;
            run.daemon_bus_cpu_s = cpu_secs(bus_pid) - bus_cpu;
            run.daemon_registry = sandbox.registry_traffic_since(offset)?.into();
            run.daemon_registry_cpu_s = cpu_secs(registry_pid) - registry_cpu;
        } else {
            progress(&format!("N={n} #{}: (b) ns8-baseline", repeat + 1));
            run.baseline = baseline::run(&sandbox, &baseline_set, &script, &images.v2)?;
            run.baseline_registry = sandbox.registry_traffic_since(offset)?.into();
            run.baseline_registry_cpu_s = cpu_secs(registry_pid) - registry_cpu;
        }
        if let (Some(uplink), Some(link)) = (sandbox.uplink(), run.uplink.as_mut()) {
            uplink.set_shaped(false);
            let bytes = uplink.bytes_down().saturating_sub(link_before.0);
            let connections = uplink.connections().saturating_sub(link_before.1);
            if part == 0 {
                (link.daemon_bytes_down, link.daemon_connections) = (bytes, connections);
            } else {
                (link.baseline_bytes_down, link.baseline_connections) = (bytes, connections);
            }
        }
    }

    if let Some(dir) = &options.keep_logs {
        let target = dir.join(format!("N{n}-{}", repeat + 1));
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io("create", dir, e))?;
        let mut copy = std::process::Command::new("cp");
        copy.arg("-a").arg(sandbox.log_dir()).arg(&target);
        module_updater_tests::cmd::run(&mut copy)?;
    }
    let started = Instant::now();
    let footprint = sandbox.footprint();
    drop(daemon);
    drop(sandbox);
    let leftovers = footprint.leftovers();
    run.setup.teardown_s = started.elapsed().as_secs_f64();
    run.setup.total_s = point_started.elapsed().as_secs_f64();
    if !leftovers.is_empty() {
        return Err(BenchError::Check(format!(
            "teardown left something behind: {leftovers}"
        )));
    }
    if let Some(link) = &run.uplink {
        progress(&format!(
            "N={n} #{}: uplink: a {:.1} MB, b {:.1} MB down; one copy of what changed {:.1} MB, \
             download floor {:.2} s",
            repeat + 1,
            link.daemon_bytes_down as f64 / 1e6,
            link.baseline_bytes_down as f64 / 1e6,
            link.changed_bytes as f64 / 1e6,
            link.download_floor_s
        ));
    }
    progress(&format!(
        "N={n} #{}: a {:.2} s, b {:.2} s (point took {:.0} s: users {:.0} s, installs {:.0} s, \
         teardown {:.0} s)",
        repeat + 1,
        run.daemon.wall_s,
        run.baseline.wall_s,
        run.setup.total_s,
        run.setup.users_s,
        run.setup.install_s,
        run.setup.teardown_s
    ));
    Ok((run, images))
}

/// A failed job's error, with the daemon's log tail to explain it.
fn with_log(err: BenchError, daemon: &module_updater_tests::Daemon) -> BenchError {
    match err {
        BenchError::Check(message) => BenchError::Check(format!(
            "{message}\nmodule-updaterd log (tail):\n{}",
            module_updater_tests::cmd::tail(daemon.log().as_bytes())
        )),
        other => other,
    }
}

fn progress(message: &str) {
    eprintln!("bench: {message}");
}

fn bench(options: &Options) -> Result<report::Report, BenchError> {
    let script = baseline_script()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| BenchError::io("start", Path::new("a tokio runtime"), e))?;
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut module = None;
    for &n in &options.sizes {
        for repeat in 0..options.repeats {
            let (run, images) = run_point(&runtime, options, &script, n, repeat)?;
            module.get_or_insert(images);
            runs.push(run);
        }
    }
    let images = module.ok_or_else(|| BenchError::Check("no point was run".into()))?;
    Ok(report::Report::new(
        options,
        &images,
        runs,
        started.elapsed().as_secs_f64(),
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, dir] = args.as_slice()
        && flag == "--compare-report"
    {
        return match compare::report(Path::new(dir)) {
            Ok(table) => {
                println!("{table}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("bench: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    let report = match bench(&options) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.markdown());
    match report.write_json(&options.json) {
        Ok(()) => {
            eprintln!("bench: results written to {}", options.json.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bench: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options() {
        let full = parse_args(&[]).expect("defaults");
        assert_eq!((full.sizes.clone(), full.repeats), (vec![1, 10, 50], 3));
        assert!(full.json.ends_with("target/bench.json"));
        let quick = parse_args(&args(&["--quick", "--json", "x.json"])).expect("quick");
        assert_eq!((quick.sizes.clone(), quick.repeats), (vec![1, 10], 1));
        assert_eq!(quick.json, PathBuf::from("x.json"));
        let custom = parse_args(&args(&[
            "--sizes=2,3",
            "--repeats",
            "2",
            "--daemon-arg=--max-parallel=8",
        ]))
        .expect("custom");
        assert_eq!((custom.sizes.clone(), custom.repeats), (vec![2, 3], 2));
        assert_eq!(custom.daemon_args, vec!["--max-parallel=8".to_owned()]);
        assert!(parse_args(&args(&["--sizes", "0"])).is_err());
        assert!(parse_args(&args(&["--nope"])).is_err());
        assert!(parse_args(&args(&["--json"])).is_err());
        assert_eq!(
            (full.profile, full.storage),
            (Profile::Loopback, RootlessStorage::Vfs)
        );
        let node = parse_args(&args(&[
            "--profile",
            "node",
            "--mbit=100",
            "--connect-ms",
            "5",
        ]))
        .expect("node");
        assert_eq!(
            (node.profile, node.storage),
            (Profile::Node, RootlessStorage::Overlay)
        );
        assert_eq!(node.uplink.mbit_per_s, 100.0);
        assert_eq!(node.uplink.connect_delay, Duration::from_millis(5));
        let fuse =
            parse_args(&args(&["--profile=node", "--storage=fuse-overlayfs"])).expect("fuse");
        assert_eq!(fuse.storage, RootlessStorage::FuseOverlayfs);
        assert!(parse_args(&args(&["--profile", "wan"])).is_err());
        assert!(parse_args(&args(&["--mbit", "0"])).is_err());
        assert!(parse_args(&args(&["--storage", "zfs"])).is_err());
    }
}
