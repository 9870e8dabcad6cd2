//! Faults during an update, on real components (docs/reliability.md names each test here): every
//! instance update runs in a transient scope of the system manager (the sandbox's root-run
//! manager), nothing it started outlives it, and the same request then completes. Processes are
//! killed at named failpoints (the `failpoints` build of the daemon), never after a sleep.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{DaemonOptions, Scenario, connect, follow, request, submit, subscribe};
use module_updater_dbus::ModuleUpdaterProxy;
use module_updater_tests::{Daemon, ImageSpec, Instance};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// An update script that records its start and end with its pid in `<faults>/scripts.log`, waits
/// on the fifo `<faults>/gate` while `<faults>/hold` exists, and leaves a daemonised child that
/// ignores SIGTERM while `<faults>/fork` exists.
fn recording_script(faults: &Path) -> String {
    format!(
        r#"#!/bin/sh
d={dir}
echo "start $$" >> $d/scripts.log
if [ -e $d/fork ]; then
  setsid sh -c 'trap "" TERM; exec sleep 100000' </dev/null >/dev/null 2>&1 &
  echo "child $!" >> $d/scripts.log
fi
if [ -e $d/hold ]; then read line < $d/gate; fi
echo "end $$" >> $d/scripts.log
"#,
        dir = faults.display()
    )
}

/// One rootless instance at 1.0 and a 2.0 with the recording script and a module step, in a
/// sandbox whose system manager is running (so the daemon has one); the daemon is started by
/// each test with its failpoints.
struct Faulty {
    s: Scenario,
    instance: Instance,
    v2: String,
    faults: PathBuf,
}

impl Faulty {
    fn new(repo: &str) -> Faulty {
        let repo2 = repo.to_owned();
        let s = Scenario::new()
            .system_manager()
            .module(repo, &["1.0"])
            .pushed("2.0", move |sandbox, _| {
                let faults = sandbox.root().join("faults");
                let spec = ImageSpec::module(&repo2, "2.0")
                    .file("bin/version", "2.0\n", 0o755)
                    .file("update-module.d/50record", recording_script(&faults), 0o755)
                    .file("actions/update-module/60step", "#!/bin/sh\nexit 0\n", 0o755);
                sandbox.build_image(&spec).unwrap()
            })
            .rootless(repo, 1, "1.0")
            .prepare(|sandbox, _, _| {
                let faults = sandbox.root().join("faults");
                std::fs::create_dir_all(&faults).unwrap();
                let mode = |bits| std::fs::Permissions::from_mode(bits);
                std::fs::set_permissions(&faults, mode(0o1777)).unwrap();
                let gate = faults.join("gate");
                nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::from_bits_truncate(0o666))
                    .unwrap();
                std::fs::set_permissions(&gate, mode(0o666)).unwrap();
            })
            .without_daemon()
            .build();
        let (instance, v2) = (s.instances[0].clone(), s.url("2.0"));
        let faults = s.sandbox.root().join("faults");
        Faulty {
            s,
            instance,
            v2,
            faults,
        }
    }

    /// The daemon, with the failpoints `points` (each fires once) and `strace -f` of every exec
    /// when `trace` is given.
    fn daemon(&self, points: &str) -> Daemon {
        let marks = self.faults.join("fired");
        std::fs::create_dir_all(&marks).unwrap();
        std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let marks = marks.display().to_string();
        let options = DaemonOptions::new()
            .env("MODULE_UPDATER_FAILPOINTS", points)
            .env("MODULE_UPDATER_FAILPOINT_DIR", &marks);
        common::start_daemon_with_options(&self.s.sandbox, options)
    }

    fn request(&self) -> String {
        request(&self.v2, &[&self.instance.id], false)
    }

    fn set(&self, flag: &str, on: bool) {
        let path = self.faults.join(flag);
        if on {
            std::fs::write(&path, "").unwrap();
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }

    fn script_log(&self) -> Vec<(String, i32)> {
        std::fs::read_to_string(self.faults.join("scripts.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (what, pid) = line.split_once(' ')?;
                Some((what.to_owned(), pid.parse().ok()?))
            })
            .collect()
    }

    /// Waits until the script logged `what` (`start`) `count` times.
    fn wait_script(&self, what: &str, count: usize) -> Vec<(String, i32)> {
        let deadline = Instant::now() + common::JOB_TIMEOUT;
        loop {
            let log = self.script_log();
            if log.iter().filter(|(w, _)| w == what).count() >= count {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the script never logged {what} {count} times: {log:?}"
            );
            std::thread::yield_now();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets a held script go on.
    fn open_gate(&self) {
        std::fs::write(self.faults.join("gate"), "go\n").unwrap();
    }

    /// `systemctl --user ARGS` against the system manager stand-in (a client we did not write).
    fn systemctl(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("systemctl")
            .env(
                "XDG_RUNTIME_DIR",
                self.s.sandbox.root().join("rootmgr").display().to_string(),
            )
            .arg("--user")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Restarts the bus of the system manager stand-in (its `dbus.service`) and waits until the
    /// manager owns its name on the new bus.
    fn restart_manager_bus(&self) {
        self.systemctl(&["restart", "dbus.service"]);
        let bus = format!(
            "--address=unix:path={}",
            self.s.sandbox.root().join("rootmgr/bus").display()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let owned = std::process::Command::new("busctl")
                .args([
                    bus.as_str(),
                    "call",
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "NameHasOwner",
                    "s",
                    "org.freedesktop.systemd1",
                ])
                .output()
                .unwrap();
            if common::text(&owned.stdout).trim() == "b true" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the manager never came back on its bus"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The update scopes the manager lists (name and description), any state.
    fn scopes(&self) -> Vec<String> {
        self.systemctl(&[
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            "--no-pager",
            "module-updater-job*",
        ])
        .lines()
        .filter(|line| line.contains(".scope"))
        .map(str::to_owned)
        .collect()
    }

    /// Whether the NS8 lock of the instance is free (`flock -n` of the file NS8's agent locks).
    fn lock_free(&self) -> bool {
        let lock = self.instance.state_dir.join(".update-module.lock");
        // flock(1) would create a missing file, as root: the instance could not lock it then.
        if !lock.exists() {
            return true;
        }
        std::process::Command::new("flock")
            .args(["-n", "-E", "75"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap()
            .success()
    }
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for us: it runs nothing (its parent has not reaped it yet).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The daemon's worker processes (its children started with `--worker`).
fn workers(daemon: &Daemon) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(daemon.pid()) && cmdline.windows(8).any(|w| w == b"--worker") {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_runs_in_a_scope_the_manager_lists_and_the_daemon_never_runs_systemctl() {
    let scenario = Faulty::new("relscope");
    let sandbox = &scenario.s.sandbox;
    // Every exec of the daemon and of all its descendants is traced.
    assert!(
        module_updater_tests::cmd::find_tool("strace").is_some(),
        "strace not found: apt-get install strace (`cargo xtask test` installs it)"
    );
    let trace = sandbox.root().join("exec.trace");
    let command = sandbox.daemon_command(&[]).unwrap();
    let daemon_args: Vec<std::ffi::OsString> = std::iter::once(command.get_program().to_owned())
        .chain(command.get_args().map(ToOwned::to_owned))
        .collect();
    let mut traced = std::process::Command::new("strace");
    traced
        .args(["-f", "-qq", "-e", "trace=execve", "-o"])
        .arg(&trace)
        .args(&daemon_args)
        .args(common::daemon_args(sandbox))
        .env_clear()
        .envs(command.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    let _daemon = sandbox.start_daemon_with(traced).unwrap();
    scenario.set("hold", true);
    let connection = connect(sandbox).await;
    let mut stream = subscribe(&connection).await;
    let path = submit(&connection, &scenario.request()).await.unwrap();
    let log = scenario.wait_script("start", 1);
    let script_pid = log[0].1;

    // The manager lists the scope, named after the job and the instance, described with both.
    let job = path.as_str().rsplit('/').next().unwrap().to_owned();
    let unit = format!("module-updater-job{job}-{}.scope", scenario.instance.id);
    let listed = scenario.scopes();
    assert!(
        listed.iter().any(|line| line.starts_with(&unit)
            && line.contains(&format!("job {job}"))
            && line.contains(&scenario.instance.id)),
        "{unit} not listed with its job and instance: {listed:?}"
    );
    let shown = scenario.systemctl(&["show", "-p", "Slice,CPUWeight,IOWeight,ActiveState", &unit]);
    for expected in [
        "Slice=module-updater.slice",
        "CPUWeight=20",
        "IOWeight=20",
        "ActiveState=active",
    ] {
        assert!(shown.lines().any(|l| l == expected), "{expected}: {shown}");
    }
    // The running script is in it.
    let cgroup = std::fs::read_to_string(format!("/proc/{script_pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("/module-updater.slice/{unit}")),
        "{cgroup}"
    );

    scenario.open_gate();
    let run = follow(&connection, &mut stream, path).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert!(
        scenario.scopes().is_empty(),
        "scope left: {:?}",
        scenario.scopes()
    );

    let trace = std::fs::read_to_string(&trace).unwrap();
    let execs: Vec<&str> = trace.lines().filter(|l| l.contains("execve(")).collect();
    assert!(
        execs.iter().any(|l| l.contains("podman")),
        "the trace saw no podman: the trace is broken\n{trace}"
    );
    let forbidden: Vec<&&str> = execs
        .iter()
        .filter(|l| l.contains("systemctl") || l.contains("systemd-run"))
        .collect();
    assert!(forbidden.is_empty(), "the daemon ran {forbidden:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_worker_during_a_script_leaves_nothing_and_the_rerun_completes() {
    let scenario = Faulty::new("relkill");
    let daemon = scenario.daemon("");
    scenario.set("hold", true);
    let connection = connect(&scenario.s.sandbox).await;
    let mut stream = subscribe(&connection).await;
    let path = submit(&connection, &scenario.request()).await.unwrap();
    let first = scenario.wait_script("start", 1)[0].1;
    let worker = workers(&daemon);
    assert_eq!(worker.len(), 1, "one worker expected: {worker:?}");
    assert!(!scenario.lock_free(), "the worker holds the NS8 lock");

    kill(Pid::from_raw(worker[0]), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let run = follow(&connection, &mut stream, path).await;
    // When the job says the instance is finished, nothing of it runs and the lock is free.
    assert!(!alive(first), "the script {first} outlived its worker");
    assert!(scenario.lock_free(), "the NS8 lock is still held");
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    assert!(
        killed.elapsed() <= Duration::from_secs(2),
        "took {:?}",
        killed.elapsed()
    );
    let result = run.instance(&scenario.instance.id);
    assert_eq!(result["status"], "failed", "{:#}", run.result);
    assert_eq!(result["error"]["step"], "run-scripts", "{:#}", run.result);

    // The same request completes, its script alone.
    scenario.set("hold", false);
    let rerun = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(rerun.status, "completed", "{:#}", rerun.result);
    let log = scenario.script_log();
    let second = log.iter().filter(|(w, _)| w == "start").nth(1).unwrap().1;
    assert_eq!(
        log,
        vec![
            ("start".to_owned(), first),
            ("start".to_owned(), second),
            ("end".to_owned(), second)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemonised_child_that_ignores_sigterm_is_gone_when_the_instance_is_finished() {
    let scenario = Faulty::new("relfork");
    let _daemon = scenario.daemon("");
    scenario.set("fork", true);
    let connection = connect(&scenario.s.sandbox).await;
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let log = scenario.script_log();
    let child = log.iter().find(|(w, _)| w == "child").unwrap().1;
    assert!(
        !alive(child),
        "the script's daemonised child {child} outlived the update"
    );
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    assert!(scenario.lock_free());
}

/// SIGKILL of the worker at the start of `step`: the job says where, nothing is left, the lock
/// is free, and the same request (the failpoint fired once) completes.
async fn worker_killed_at(repo: &str, step: &str) {
    let scenario = Faulty::new(repo);
    let _daemon = scenario.daemon(&format!("worker:kill@{step}"));
    let connection = connect(&scenario.s.sandbox).await;
    let run = common::run_job(&connection, &scenario.request()).await;
    let result = run.instance(&scenario.instance.id);
    assert_eq!(result["status"], "failed", "{:#}", run.result);
    assert_eq!(result["error"]["step"], step, "{:#}", run.result);
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    assert!(scenario.lock_free(), "the NS8 lock is held after the job");
    // What the instance looks like (docs/reliability.md): the marker from the lock on, the new
    // tree from the install on, the new environment from its rewrite on.
    let order = [
        "prepare",
        "pull-image",
        "extract",
        "reload",
        "update-environment",
        "run-scripts",
        "module-step",
        "health-gate",
        "cleanup-images",
    ];
    let at = order.iter().position(|s| *s == step).unwrap();
    let state = &scenario.instance.state_dir;
    assert_eq!(
        state.join(".module-updater.in-progress").exists(),
        at >= 1,
        "in-progress marker"
    );
    let version = std::fs::read_to_string(scenario.instance.install_dir.join("bin/version"))
        .unwrap_or_default();
    assert_eq!(
        version,
        if at >= 3 { "2.0\n" } else { "1.0\n" },
        "install tree"
    );
    let env = module_updater_tests::parse_env(
        &std::fs::read_to_string(state.join("environment")).unwrap(),
    );
    let url = env.get("IMAGE_URL").cloned().unwrap_or_default();
    assert_eq!(url.ends_with(":2.0"), at >= 5, "environment: {url}");
    let rerun = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(rerun.status, "completed", "{:#}", rerun.result);
    let log = scenario.script_log();
    let starts = log.iter().filter(|(w, _)| w == "start").count();
    let ends = log.iter().filter(|(w, _)| w == "end").count();
    assert_eq!(starts, ends, "a script was cut short: {log:?}");
    let version = scenario.instance.install_dir.join("bin/version");
    assert_eq!(std::fs::read_to_string(version).unwrap(), "2.0\n");
}

macro_rules! worker_kill_tests {
    ($($name:ident: $step:literal,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            worker_killed_at(&format!("wk{}", $step.replace('-', "")), $step).await;
        }
    )*};
}

worker_kill_tests! {
    sigkill_of_the_worker_at_prepare: "prepare",
    sigkill_of_the_worker_at_pull_image: "pull-image",
    sigkill_of_the_worker_at_extract: "extract",
    sigkill_of_the_worker_at_reload: "reload",
    sigkill_of_the_worker_at_update_environment: "update-environment",
    sigkill_of_the_worker_at_run_scripts: "run-scripts",
    sigkill_of_the_worker_at_module_step: "module-step",
    sigkill_of_the_worker_at_health_gate: "health-gate",
    sigkill_of_the_worker_at_cleanup_images: "cleanup-images",
}

/// SIGKILL of the daemon at the start of `step`: a new daemon takes the same request sent as
/// soon as it owns its name, waits for what the old one left, and completes it.
async fn daemon_killed_at(repo: &str, step: &str) {
    let scenario = Faulty::new(repo);
    let mut daemon = scenario.daemon(&format!("daemon:kill@{step}"));
    // Killed as the scripts start, the old update's script waits for the gate: the new daemon
    // must stop it. (Held at an earlier step, the daemon would never reach a later one.)
    scenario.set("hold", step == "run-scripts");
    let connection = connect(&scenario.s.sandbox).await;
    let old_job = submit(&connection, &scenario.request()).await.unwrap();
    let ended = daemon.wait(common::JOB_TIMEOUT).unwrap();
    assert!(ended.is_some(), "the daemon did not stop at {step}");
    scenario.set("hold", false);

    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    for (what, pid) in scenario.script_log() {
        assert!(!alive(pid), "{what} {pid} of the old update still runs");
    }
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    let instances = ModuleUpdaterProxy::new(&connection)
        .await
        .unwrap()
        .list_instances()
        .await
        .unwrap();
    let state = instances
        .iter()
        .find(|i| i.0 == scenario.instance.id)
        .map(|i| i.2.clone());
    assert_eq!(state.as_deref(), Some("idle"));
    // The old job, served again, says it was interrupted at that step.
    let old = module_updater_dbus::JobProxy::builder(&connection)
        .path(old_job)
        .build()
        .await
        .unwrap();
    assert_eq!(old.status().await.unwrap(), "aborted");
    let result: serde_json::Value = serde_json::from_str(&old.get_result().await.unwrap()).unwrap();
    assert_eq!(result["error"], "interrupted", "{result:#}");
    // A step change is queued for the disk, not waited for: a daemon killed the moment a step
    // starts may have recorded only an earlier one (several when they follow each other at once,
    // as the pull, the extra images' check and the extraction do), never a later one.
    let steps = common::UPDATE_STEPS;
    let at = steps.iter().position(|s| *s == step).unwrap();
    let recorded = result["instances"][&scenario.instance.id]["error"]["step"].clone();
    let recorded_at = steps.iter().position(|s| recorded == *s);
    assert!(
        recorded_at.is_some_and(|r| r <= at),
        "recorded at {recorded}, killed at {step}: {result:#}"
    );
}

macro_rules! daemon_kill_tests {
    ($($name:ident: $step:literal,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            daemon_killed_at(&format!("dk{}", $step.replace('-', "")), $step).await;
        }
    )*};
}

daemon_kill_tests! {
    sigkill_of_the_daemon_at_prepare: "prepare",
    sigkill_of_the_daemon_at_pull_image: "pull-image",
    sigkill_of_the_daemon_at_extract: "extract",
    sigkill_of_the_daemon_at_reload: "reload",
    sigkill_of_the_daemon_at_update_environment: "update-environment",
    sigkill_of_the_daemon_at_run_scripts: "run-scripts",
    sigkill_of_the_daemon_at_module_step: "module-step",
    sigkill_of_the_daemon_at_health_gate: "health-gate",
    sigkill_of_the_daemon_at_cleanup_images: "cleanup-images",
}

/// The pid in the instance user's podman pause file, if that process runs.
fn pause_process(instance: &Instance) -> Option<i32> {
    let file = instance.runtime_dir.join("libpod/tmp/pause.pid");
    let pid = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// The decision on rootless podman's pause process: one the user already had is left alone; one
/// the update's podman had to start is part of the update and stops with its scope (where podman
/// cannot move it to a scope of the user's own manager, as here); the user's next podman command
/// starts a new one and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_pause_process_is_kept_and_one_the_update_started_stops_with_it() {
    let scenario = Faulty::new("relpause");
    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let instance = &scenario.instance;

    // Installing ran podman as the user: a pause process of the user's is there already.
    let before = pause_process(instance).expect("the install left the user a pause process");
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert!(
        alive(before),
        "the user's own pause process {before} was stopped"
    );

    // Without one, the update's podman starts it inside the update's scope.
    kill(Pid::from_raw(before), Signal::SIGKILL).unwrap();
    let forced = request(&scenario.v2, &[&instance.id], true);
    scenario.set("hold", true);
    let mut stream = subscribe(&connection).await;
    let path = submit(&connection, &forced).await.unwrap();
    scenario.wait_script("start", 2);
    let started = pause_process(instance).expect("the update's podman started a pause process");
    let cgroup = std::fs::read_to_string(format!("/proc/{started}/cgroup")).unwrap();
    assert!(cgroup.contains("/module-updater.slice/"), "{cgroup}");
    scenario.open_gate();
    let run = follow(&connection, &mut stream, path).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert!(
        !alive(started),
        "the pause process {started} the update started outlived it"
    );
    assert!(common::has_image(
        &scenario.s.sandbox,
        instance,
        &scenario.v2
    ));
    assert!(
        pause_process(instance).is_some(),
        "the user's next podman command started no pause process"
    );
}

/// The processes in a unit's cgroup (unified hierarchy), as the manager names the cgroup.
fn unit_processes(scenario: &Faulty, unit: &str) -> Vec<i32> {
    let shown = scenario.systemctl(&["show", "-p", "ControlGroup", "--value", unit]);
    let group = shown.trim();
    assert!(!group.is_empty(), "{unit} has no cgroup");
    let unified = Path::new("/sys/fs/cgroup/unified");
    let root = if unified.join("cgroup.procs").exists() {
        unified
    } else {
        Path::new("/sys/fs/cgroup")
    };
    let procs = root
        .join(group.trim_start_matches('/'))
        .join("cgroup.procs");
    std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// The daemon dies at the module step, after a script left a daemonised child that ignores
/// SIGTERM: the scope outlives the daemon and its worker. The next daemon serves the instance as
/// `recovering` while it stops that scope, and the same request sent as soon as it owns its name
/// waits for that and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_daemon_stops_the_scope_a_dead_one_left_and_the_same_request_completes() {
    let scenario = Faulty::new("relrecover");
    let mut daemon = scenario.daemon("daemon:kill@module-step");
    scenario.set("fork", true);
    let connection = connect(&scenario.s.sandbox).await;
    let path = submit(&connection, &scenario.request()).await.unwrap();
    assert!(daemon.wait(common::JOB_TIMEOUT).unwrap().is_some());
    scenario.set("fork", false);
    let job = path.as_str().rsplit('/').next().unwrap().to_owned();
    let unit = format!("module-updater-job{job}-{}.scope", scenario.instance.id);
    let listed = scenario.scopes();
    assert!(
        listed.iter().any(|l| l.starts_with(&unit)),
        "{unit} did not outlive the daemon: {listed:?}\n{}",
        daemon.log()
    );
    let left = unit_processes(&scenario, &unit);
    let child = scenario
        .script_log()
        .iter()
        .find(|(w, _)| w == "child")
        .unwrap()
        .1;
    assert!(left.contains(&child), "{child} not in {unit}: {left:?}");

    let new_daemon = scenario.daemon("");
    // The child ignores SIGTERM: the scope takes its stop timeout (1 s) to empty.
    let listed = common::busctl(
        &scenario.s.sandbox,
        &[
            "call",
            module_updater_dbus::BUS_NAME,
            module_updater_dbus::OBJECT_PATH,
            module_updater_dbus::MANAGER_INTERFACE,
            "ListInstances",
        ],
    );
    let listed = common::text(&listed.stdout);
    assert!(
        listed.contains(&format!("\"{}\"", scenario.instance.id))
            && listed.contains("\"recovering\""),
        "{listed}"
    );
    let connection = connect(&scenario.s.sandbox).await;
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    for pid in left {
        assert!(!alive(pid), "{pid} of the old update still runs");
    }
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    assert!(
        new_daemon
            .log()
            .contains(&format!("stopping {unit}, left by a previous daemon")),
        "{}",
        new_daemon.log()
    );
    // The interrupted job says so.
    let old = common::busctl(
        &scenario.s.sandbox,
        &[
            "get-property",
            module_updater_dbus::BUS_NAME,
            path.as_str(),
            module_updater_dbus::JOB_INTERFACE,
            "Status",
        ],
    );
    assert_eq!(common::text(&old.stdout).trim(), "s \"aborted\"");
}

/// A loopback port where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The registry cannot be reached: the update fails at the pull, nothing changed, nothing is
/// left; the request with a reachable registry then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_fails_the_pull_and_changes_nothing() {
    let scenario = Faulty::new("relunreach");
    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let instance = &scenario.instance;
    let env_before = std::fs::read(instance.env_file()).unwrap();
    // The lock file NS8's agent also uses is created by the first update; the rest must not change.
    let tree = || {
        let mut tree = common::snapshot(&instance.install_dir);
        tree.retain(|k, _| !k.ends_with(".update-module.lock"));
        tree
    };
    let tree_before = tree();
    let unreachable = format!("127.0.0.1:{}/relunreach:2.0", closed_port());
    let run = common::run_job(&connection, &request(&unreachable, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "failed", "{:#}", run.result);
    assert_eq!(result["error"]["step"], "pull-image", "{:#}", run.result);
    let reason = result["error"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&unreachable), "{reason}");
    assert_eq!(std::fs::read(instance.env_file()).unwrap(), env_before);
    assert!(tree() == tree_before, "the install dir changed");
    assert!(
        !instance
            .state_dir
            .join(".module-updater.in-progress")
            .exists()
    );
    assert!(scenario.lock_free());
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
}

/// A registry that accepts connections and never answers: a cancel ends the update promptly
/// (well within the 10 s the worker gets between SIGTERM and SIGKILL), nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_never_answers_is_cancelled_promptly() {
    let scenario = Faulty::new("relsilent");
    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let instance = &scenario.instance;
    // Accepts every connection and keeps it open without a byte.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    let url = format!("127.0.0.1:{port}/relsilent:2.0");
    let mut stream = subscribe(&connection).await;
    let path = submit(&connection, &request(&url, &[&instance.id], false))
        .await
        .unwrap();
    // The pull has reached the registry.
    let deadline = Instant::now() + common::JOB_TIMEOUT;
    while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "podman never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job = module_updater_dbus::JobProxy::builder(&connection)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let asked = Instant::now();
    job.cancel().await.unwrap();
    let run = follow(&connection, &mut stream, path).await;
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the cancel took {:?}",
        asked.elapsed()
    );
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "cancelled", "{:#}", run.result);
    assert!(scenario.lock_free());
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
}

/// A registry that accepts connections and never answers, and nobody cancels: `pull_timeout`
/// ends the node's shared download, then each instance's own pull, which fails its step saying
/// so; nothing of the instances changed and nothing is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_never_answers_is_ended_by_the_pull_timeout() {
    let s = Scenario::new()
        .module("reltimeout", &["1.0"])
        .rootless("reltimeout", 2, "1.0")
        .daemon(&["--pull-timeout", "3"])
        .start()
        .await;
    let port = silent_registry();
    let url = format!("127.0.0.1:{port}/reltimeout:2.0");
    let started = Instant::now();
    let run = common::run_job(s.bus(), &request(&url, &s.ids(), false)).await;
    let took = started.elapsed();
    // Two timeouts one after the other (the shared download, then the pulls), plus the rest.
    assert!(took < Duration::from_secs(60), "the job took {took:?}");
    assert_eq!(run.status, "aborted", "{:#}", run.result);
    for instance in &s.instances {
        let result = run.instance(&instance.id);
        assert_eq!(result["status"], "failed", "{result:#}");
        assert_eq!(result["error"]["step"], "pull-image", "{result:#}");
        let reason = result["error"]["reason"].as_str().unwrap();
        assert!(
            reason.contains("did not finish within 3 s (pull_timeout)"),
            "{reason}"
        );
        let messages = run.messages_of(&instance.id);
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("the shared download failed")
                    && m.contains("did not finish within 3 s (pull_timeout)")),
            "{messages:#?}"
        );
        assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], s.url("1.0"));
        let version = std::fs::read_to_string(instance.install_dir.join("bin/version")).unwrap();
        assert_eq!(version, "1.0\n");
        let lock = instance.state_dir.join(".update-module.lock");
        let free = std::process::Command::new("flock")
            .args(["--nonblock", "--shared"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap();
        assert!(free.success(), "{} is still locked", lock.display());
    }
    assert_nothing_runs_for(port);
}

/// A port on loopback that accepts every connection and keeps it open without a byte.
fn silent_registry() -> u16 {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

/// No process (podman, skopeo) names the registry at `port` any more.
fn assert_nothing_runs_for(port: u16) {
    let left = std::process::Command::new("pgrep")
        .args(["-a", "-f", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "still running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// A plan (`PlanUpdate`) of an image whose registry accepts connections and never answers:
/// `pull_timeout` ends the plan's download as it ends a job's; the plan answers with the
/// download's error, nothing of the download is left (processes, files), the instance is as it
/// was, and the update planned from a working registry is planned in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_from_a_registry_that_never_answers_is_ended_by_the_pull_timeout() {
    let s = Scenario::new()
        .module("relplantimeout", &["1.0", "2.0"])
        .rootless("relplantimeout", 1, "1.0")
        .daemon(&["--pull-timeout", "3"])
        .start()
        .await;
    let port = silent_registry();
    let url = format!("127.0.0.1:{port}/relplantimeout:2.0");
    let instance = &s.instances[0];
    let proxy = ModuleUpdaterProxy::new(s.bus()).await.unwrap();
    let started = Instant::now();
    let plan = proxy
        .plan_update(&request(&url, &[&instance.id], false))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "the plan took {took:?}");
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let error = plan["download"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&url) && error.contains("did not finish within 3 s (pull_timeout)"),
        "{plan:#}"
    );
    assert_nothing_runs_for(port);
    let downloads = s.sandbox.daemon_state_dir().join("shared-images");
    let left: Vec<_> = std::fs::read_dir(&downloads)
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", downloads.display());
    assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], s.url("1.0"));

    let plan = proxy
        .plan_update(&request(&s.url("2.0"), &[&instance.id], false))
        .await
        .unwrap();
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert!(plan["download"]["error"].is_null(), "{plan:#}");
    assert!(plan["download"]["bytes"].as_u64().unwrap() > 0, "{plan:#}");
}

/// The bus of the system manager restarts between two updates (`systemctl --user restart
/// dbus.service` on the sandbox's system manager): the daemon's connection to it is gone, and the
/// next update connects again and runs in a scope, as the first did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_update_after_the_system_bus_restarted_is_contained_again() {
    let scenario = Faulty::new("relbus");
    let daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let instance = &scenario.instance;
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);

    scenario.restart_manager_bus();

    scenario.set("hold", true);
    let forced = request(&scenario.v2, &[&instance.id], true);
    let mut stream = subscribe(&connection).await;
    let path = submit(&connection, &forced).await.unwrap();
    let script = scenario.wait_script("start", 2).last().unwrap().1;
    let cgroup = std::fs::read_to_string(format!("/proc/{script}/cgroup")).unwrap();
    assert!(
        cgroup.contains("/module-updater.slice/module-updater-job"),
        "the update after the bus restart is not in a scope: {cgroup}\n{}",
        daemon.log()
    );
    scenario.open_gate();
    let run = follow(&connection, &mut stream, path).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    assert!(
        !daemon.log().contains("without a systemd scope"),
        "{}",
        daemon.log()
    );
}

/// The bus of the system manager restarts while an update's script runs: the update goes on,
/// the daemon stops its scope on a new connection, and nothing of the update is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_managers_bus_restarting_during_an_update_leaves_nothing_running() {
    let scenario = Faulty::new("relbusmid");
    let daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let instance = &scenario.instance;
    scenario.set("hold", true);
    let mut stream = subscribe(&connection).await;
    let path = submit(&connection, &scenario.request()).await.unwrap();
    let script = scenario.wait_script("start", 1)[0].1;

    scenario.restart_manager_bus();
    scenario.open_gate();
    let run = follow(&connection, &mut stream, path).await;
    let result = run.instance(&instance.id);
    assert_eq!(
        run.status,
        "completed",
        "{:#}\n{}",
        run.result,
        daemon.log()
    );
    assert!(!alive(script), "the script {script} still runs");
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    assert!(scenario.lock_free(), "the NS8 lock is still held");
    assert_eq!(
        instance.read_env().unwrap().get("IMAGE_URL"),
        Some(&scenario.v2)
    );
    assert!(
        !result["warnings"].to_string().contains("scope"),
        "{result:#}"
    );
}

/// The daemon's own bus restarts while an update's script runs: the update goes on to its end
/// without the bus (cancelling it would stop its scripts half-way), the daemon then exits with
/// a failure (systemd's `Restart=on-failure` starts it again), and the next daemon serves the
/// job's result and completes the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_bus_restarting_during_an_update_lets_it_finish_then_the_daemon_restarts() {
    let mut scenario = Faulty::new("relownbus");
    let mut daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    scenario.set("hold", true);
    let job = submit(&connection, &scenario.request()).await.unwrap();
    let script = scenario.wait_script("start", 1)[0].1;

    scenario.s.sandbox.restart_bus().unwrap();
    let log = daemon.log_path().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("the bus connection closed")
    {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(alive(script), "the bus restart stopped the update's script");
    assert!(
        daemon.is_running(),
        "the daemon left before its update ended"
    );
    scenario.open_gate();
    let ended = daemon.wait(common::JOB_TIMEOUT).unwrap();
    assert_eq!(
        ended.and_then(|status| status.code()),
        Some(1),
        "{}",
        daemon.log()
    );
    assert!(scenario.lock_free(), "the NS8 lock is still held");
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    let instance = &scenario.instance;
    assert_eq!(
        instance.read_env().unwrap().get("IMAGE_URL"),
        Some(&scenario.v2)
    );

    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    // The job's result, read with busctl from the new daemon.
    let shown = common::busctl(
        &scenario.s.sandbox,
        &[
            "--json=short",
            "call",
            module_updater_dbus::BUS_NAME,
            job.as_str(),
            module_updater_dbus::JOB_INTERFACE,
            "GetResult",
        ],
    );
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let result: serde_json::Value =
        serde_json::from_str(shown["data"][0].as_str().unwrap()).unwrap();
    assert_eq!(
        result["instances"][&instance.id]["status"], "completed",
        "{result:#}"
    );
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(
        run.instance(&instance.id)["status"],
        "already-installed",
        "{:#}",
        run.result
    );
}

/// The instance user's manager refuses `Reload` (systemd does when /run/systemd has less than
/// 4 MiB free): the update goes on as NS8's does, and its result warns with the manager's own
/// reason and how to reload once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_that_refuses_reload_leaves_a_warning_and_the_update_completes() {
    let mut scenario = Faulty::new("relreload");
    let instance = scenario.instance.clone();
    scenario
        .s
        .sandbox
        .restart_manager_short_of_run_space(&instance)
        .unwrap();
    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let run = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let result = run.instance(&instance.id);
    let warnings = result["warnings"].to_string();
    assert!(
        warnings.contains("daemon-reload failed")
            && warnings.contains("Refusing to reload")
            && warnings.contains(&format!(
                "systemctl --user daemon-reload` as {}",
                instance.id
            )),
        "{result:#}"
    );
    // Everything else of the update happened: files, environment, scripts, lock, marker.
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/version")).unwrap(),
        "2.0\n"
    );
    assert_eq!(
        instance.read_env().unwrap().get("IMAGE_URL"),
        Some(&scenario.v2)
    );
    assert_eq!(scenario.wait_script("end", 1).len(), 2);
    assert!(scenario.lock_free());
    assert!(
        !instance
            .state_dir
            .join(".module-updater.in-progress")
            .exists()
    );
    let again = common::run_job(&connection, &scenario.request()).await;
    assert_eq!(
        again.instance(&instance.id)["status"],
        "already-installed",
        "{:#}",
        again.result
    );
}

/// Unmounts a mount point when dropped (also when the test fails).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .status();
    }
}

/// A filesystem full during an update: `dir` of the instance (what `place` names) moved onto a
/// tmpfs of its own with `room_kib` free beyond what it holds, and an image with a `big_mib`
/// MiB file. The update fails at `step` saying there is no space, the install tree, the NS8 lock
/// and the scopes are as before; with room again, the same request completes.
async fn full_filesystem(
    repo: &str,
    place: fn(&Instance) -> PathBuf,
    room_kib: u64,
    big_mib: usize,
    step: &str,
) {
    let scenario = Faulty::new(repo);
    let instance = &scenario.instance;
    let big = scenario
        .s
        .sandbox
        .build_image(
            &ImageSpec::module(repo, "3.0")
                .file("bin/version", "3.0\n", 0o755)
                .file("data/big", vec![7u8; big_mib * 1024 * 1024], 0o644),
        )
        .unwrap();
    let dir = place(instance);
    let saved = scenario.s.sandbox.root().join("full-copy");
    let run = |argv: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .unwrap();
        assert!(status.success(), "{argv:?}");
    };
    run(&[
        "cp".as_ref(),
        "-a".as_ref(),
        dir.as_os_str(),
        saved.as_os_str(),
    ]);
    let used: u64 = String::from_utf8_lossy(
        &std::process::Command::new("du")
            .args(["-sk"])
            .arg(&saved)
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .next()
    .and_then(|k| k.parse().ok())
    .unwrap();
    let options = format!(
        "size={}k,mode=0755,uid={},gid={}",
        used + room_kib,
        instance.uid,
        instance.gid
    );
    let mount = [
        "mount".as_ref(),
        "-t".as_ref(),
        "tmpfs".as_ref(),
        "-o".as_ref(),
        options.as_ref(),
        repo.as_ref(),
        dir.as_os_str(),
    ];
    run(&mount);
    let _mount = Mounted(dir.clone());
    let contents = format!("{}/.", saved.display());
    run(&[
        "cp".as_ref(),
        "-a".as_ref(),
        contents.as_ref(),
        dir.as_os_str(),
    ]);
    // The user's pause process goes, so that the user's next podman sees the mount.
    if let Some(pause) = pause_process(instance) {
        kill(Pid::from_raw(pause), Signal::SIGKILL).unwrap();
    }
    let tree = || {
        let mut tree = common::snapshot(&instance.install_dir);
        // Lock files (NS8's, the extraction's) are created by the first update that takes them.
        tree.retain(|k, _| !k.ends_with(".lock"));
        tree
    };
    let before = tree();

    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let full = request(&big, &[&instance.id], false);
    let job = common::run_job(&connection, &full).await;
    let result = job.instance(&instance.id);
    assert_eq!(result["status"], "failed", "{:#}", job.result);
    assert_eq!(result["error"]["step"], step, "{:#}", job.result);
    let reason = result["error"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.to_lowercase().contains("no space left on device"),
        "{reason}"
    );
    let after = tree();
    let changed: Vec<&String> = after
        .keys()
        .chain(before.keys())
        .filter(|k| after.get(*k) != before.get(*k))
        .collect();
    assert!(changed.is_empty(), "the install tree changed: {changed:?}");
    assert!(scenario.lock_free());
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());

    let grow = [
        "mount".as_ref(),
        "-o".as_ref(),
        "remount,size=512m".as_ref(),
        dir.as_os_str(),
    ];
    run(&grow);
    let job = common::run_job(&connection, &full).await;
    assert_eq!(job.status, "completed", "{:#}", job.result);
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/version")).unwrap(),
        "3.0\n"
    );
}

/// The install filesystem fills up during the extraction (1 MiB free, a 4 MiB file): the update
/// fails at `extract` and the tree stays as it was; with room again, the same request completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_install_filesystem_fails_the_extraction_and_keeps_the_tree() {
    full_filesystem("relfull", |i| i.install_dir.clone(), 1024, 4, "extract").await;
}

/// The instance user's podman storage fills up during the pull (2 MiB free, an 8 MiB layer): the
/// update fails at `pull-image` and the tree stays as it was; with room again, the same request
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_storage_filesystem_fails_the_pull_and_keeps_the_tree() {
    full_filesystem(
        "relstore",
        |i| i.home.join(".local/share/containers"),
        2048,
        8,
        "pull-image",
    )
    .await;
}

/// A TCP proxy in front of the sandbox registry that closes every connection, and stops
/// listening, once `cut_after` bytes went down (`None`: never), declared plain-HTTP to podman
/// for as long as it lives.
struct Proxy {
    port: u16,
    conf: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepting: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(registry: &str, port: u16, cut_after: Option<usize>) -> Proxy {
        use std::io::{Read, Write};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let conf = Path::new(module_updater_tests::REGISTRIES_CONF_D)
            .join(format!("module-updater-test-proxy-{port}.conf"));
        std::fs::write(
            &conf,
            format!("[[registry]]\nlocation = \"127.0.0.1:{port}\"\ninsecure = true\n"),
        )
        .unwrap();
        let registry = registry.to_owned();
        let sent = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let accepting = std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let cut = cut_after.is_some_and(|cut| sent.load(Ordering::SeqCst) >= cut);
                if cut || stopping.load(Ordering::SeqCst) {
                    // Gone: this connection is dropped, later ones are refused.
                    break;
                }
                let Ok(upstream) = std::net::TcpStream::connect(&registry) else {
                    continue;
                };
                let (mut up_read, mut client_write) =
                    (upstream.try_clone().unwrap(), client.try_clone().unwrap());
                let (mut client_read, mut up_write) = (client, upstream);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_read, &mut up_write);
                });
                let counter = Arc::clone(&sent);
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 16384];
                    while let Ok(n) = up_read.read(&mut buffer) {
                        if n == 0 || client_write.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                        let total = counter.fetch_add(n, Ordering::SeqCst) + n;
                        if cut_after.is_some_and(|cut| total >= cut) {
                            break;
                        }
                    }
                    let _ = client_write.shutdown(std::net::Shutdown::Both);
                    let _ = up_read.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy {
            port,
            conf,
            stop,
            accepting: Some(accepting),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.conf);
        // Wakes the accept loop, which then closes the listener.
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.join();
        }
    }
}

/// Bytes no compressor shrinks (a simple generator: the test needs volume, not quality).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

/// The registry goes away in the middle of the download: the update fails at `pull-image` and
/// the tree stays as it was; with the registry back at the same address, the same request
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_gone_mid_download_fails_the_pull_and_the_same_request_completes_later() {
    let scenario = Faulty::new("relcut");
    let instance = &scenario.instance;
    scenario
        .s
        .sandbox
        .build_image(
            &ImageSpec::module("relcut", "3.0")
                .file("bin/version", "3.0\n", 0o755)
                .file("data/noise", noise(8 * 1024 * 1024, 3), 0o644),
        )
        .unwrap();
    let registry = scenario.s.sandbox.registry();
    let proxy = Proxy::start(&registry, 0, Some(1024 * 1024));
    let port = proxy.port;
    let url = format!("127.0.0.1:{port}/relcut:3.0");
    let tree = || {
        let mut tree = common::snapshot(&instance.install_dir);
        tree.retain(|k, _| !k.ends_with(".lock"));
        tree
    };
    let before = tree();
    let _daemon = scenario.daemon("");
    let connection = connect(&scenario.s.sandbox).await;
    let job = common::run_job(&connection, &request(&url, &[&instance.id], false)).await;
    let result = job.instance(&instance.id);
    assert_eq!(result["status"], "failed", "{:#}", job.result);
    assert_eq!(result["error"]["step"], "pull-image", "{:#}", job.result);
    assert!(tree() == before, "the install tree changed");
    assert!(scenario.lock_free());
    assert!(scenario.scopes().is_empty(), "{:?}", scenario.scopes());
    drop(proxy);

    let _back = Proxy::start(&registry, port, None);
    let job = common::run_job(&connection, &request(&url, &[&instance.id], false)).await;
    assert_eq!(job.status, "completed", "{:#}", job.result);
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/version")).unwrap(),
        "3.0\n"
    );
}

/// No systemd manager at the daemon's system manager address: the update still runs, without a
/// scope, and the daemon's log says so for the instance (the documented degradation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reachable_manager_an_update_runs_uncontained_with_a_warning() {
    let mut s = Scenario::new()
        .module("relnomgr", &["1.0", "2.0"])
        .rootless("relnomgr", 1, "1.0")
        .without_daemon()
        .start()
        .await;
    let nowhere = format!(
        "--system-manager-address=unix:path={}",
        s.sandbox.root().join("no-manager-here").display()
    );
    s.restart_daemon_with(DaemonOptions::new().args(&[&nowhere]));
    let (connection, daemon, instance) = (s.bus(), s.daemon(), &s.instances[0]);
    let v2 = s.url("2.0");
    let run = common::run_job(connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains(&instance.id)
            && l.contains("runs without a systemd scope")
            && l.contains("no-manager-here")),
        "{log}"
    );
}
