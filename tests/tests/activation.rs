//! D-Bus activation through systemd, for real: a root-run `systemd --user` manager whose user
//! bus carries the project's shipped activation file and bus policy, and which has the shipped
//! `module-updaterd.service` loaded (only `ExecStart=` points at the built daemon). A plain
//! `busctl` call on the name, with nothing started before, must start the daemon through
//! systemd and be answered.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use module_updater_tests::{ExtraManager, Sandbox, daemon_binary};

const NAME: &str = "org.nethserver.ModuleUpdater";
const PATH: &str = "/org/nethserver/ModuleUpdater";
const UNIT: &str = "module-updaterd.service";
/// The unit the project ships, as installed on a node.
const SHIPPED_UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../systemd/units/module-updaterd.service"
);
/// The unit properties the test looks at.
const PROPERTIES: &[&str] = &[
    "LoadState",
    "ActiveState",
    "SubState",
    "Type",
    "BusName",
    "StatusText",
    "MainPID",
    "ExecMainPID",
    "ExecMainCode",
    "ExecMainStatus",
    "Result",
    "NRestarts",
    "FragmentPath",
];
/// `CLD_EXITED`: the main process exited by itself (not killed by a signal).
const CLD_EXITED: &str = "1";

/// The shipped unit with only its `ExecStart=` line replaced.
fn unit_text(exec_start: &str) -> String {
    let shipped = std::fs::read_to_string(SHIPPED_UNIT).unwrap();
    let exec_lines = shipped
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .count();
    assert_eq!(
        exec_lines, 1,
        "the shipped unit has one ExecStart=:\n{shipped}"
    );
    let mut text: String = shipped
        .lines()
        .map(|line| {
            if line.starts_with("ExecStart=") {
                format!("ExecStart={exec_start}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text
}

fn busctl(manager: &ExtraManager, args: &[&str]) -> Output {
    let mut command = Command::new("busctl");
    command
        .env_clear()
        .env("PATH", module_updater_tests::cmd::PATH)
        .arg(format!("--address={}", manager.bus_address()))
        .args(args);
    module_updater_tests::cmd::output_timeout(&mut command, Duration::from_secs(40)).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// `Version` through busctl, with the time the call took.
fn get_version(manager: &ExtraManager) -> (Output, Duration) {
    let started = Instant::now();
    let output = busctl(manager, &["get-property", NAME, PATH, NAME, "Version"]);
    (output, started.elapsed())
}

fn show(manager: &ExtraManager) -> BTreeMap<String, String> {
    manager.show(UNIT, PROPERTIES).unwrap()
}

/// Polls the unit until `done` holds (at most 10 s); returns the last properties.
fn wait_for_unit(
    manager: &ExtraManager,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let properties = show(manager);
        if done(&properties) || Instant::now() > deadline {
            return properties;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The pid owning our name on the bus (asked of the bus driver).
fn name_owner_pid(manager: &ExtraManager) -> String {
    let out = busctl(
        manager,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionUnixProcessID",
            "s",
            NAME,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // "u 1234"
    text(&out.stdout).trim_start_matches("u ").to_owned()
}

/// Checks that the unit runs the built daemon as a `Type=notify` service that said READY=1 and
/// STATUS=idle, and that its main process owns the name; returns the main pid.
fn assert_active(manager: &ExtraManager, daemon: &Path) -> String {
    let properties = wait_for_unit(manager, |p| {
        p["ActiveState"] == "active" && p["StatusText"] == "idle"
    });
    let status = || manager.status_text(&[UNIT]);
    assert_eq!(properties["Type"], "notify", "{}", status());
    assert_eq!(properties["ActiveState"], "active", "{}", status());
    assert_eq!(properties["SubState"], "running", "{}", status());
    assert_eq!(properties["StatusText"], "idle", "{}", status());
    assert_eq!(properties["BusName"], NAME);
    assert_eq!(properties["NRestarts"], "0", "{}", status());
    let pid = properties["MainPID"].clone();
    assert_ne!(pid, "0", "{}", status());
    assert_eq!(
        name_owner_pid(manager),
        pid,
        "the unit's main process owns the name"
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        daemon.canonicalize().unwrap(),
        "the unit runs the built daemon"
    );
    // Started by the manager, in the unit's own cgroup (not forked by dbus-daemon).
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with("/app.slice/module-updaterd.service")),
        "{cgroup}"
    );
    pid
}

/// Holds a reference on the unit through the manager's bus API, so that systemd keeps its
/// properties (ExecMainStatus, ...) after it stops instead of garbage-collecting the unit.
async fn hold_unit(manager: &ExtraManager) -> zbus::Connection {
    let connection = zbus::connection::Builder::address(manager.bus_address().as_str())
        .build()
        .await
        .unwrap();
    let reply = connection
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "LoadUnit",
            &(UNIT,),
        )
        .await
        .unwrap();
    let path: zbus::OwnedObjectPath = reply.body().deserialize().unwrap();
    connection
        .call_method(
            Some("org.freedesktop.systemd1"),
            path.as_str(),
            Some("org.freedesktop.systemd1.Unit"),
            "Ref",
            &(),
        )
        .await
        .unwrap();
    connection
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busctl_call_starts_the_daemon_through_systemd() {
    let test_started = Instant::now();
    let daemon = daemon_binary().unwrap();
    let mut sandbox = Sandbox::new().unwrap();
    let footprint_dir = sandbox.root().to_path_buf();
    let manager = sandbox.prepare_extra_manager("activation").unwrap();
    let t = &manager.dir;

    // The bus: the shipped activation file, unchanged, and the shipped policy.
    let service_dir = t.join("bus-services");
    std::fs::create_dir_all(&service_dir).unwrap();
    let activation = module_updater_dbus::data_dir().join(module_updater_dbus::ACTIVATION_FILE);
    std::fs::copy(
        &activation,
        service_dir.join(module_updater_dbus::ACTIVATION_FILE),
    )
    .unwrap();
    let policy = module_updater_dbus::data_dir().join(module_updater_dbus::POLICY_FILE);
    manager
        .configure_activation_bus(&service_dir, &policy)
        .unwrap();

    // The unit: the shipped one, pointed at the built daemon on the manager's user bus (the
    // manager gives its units DBUS_SESSION_BUS_ADDRESS).
    for dir in ["home", "rootful"] {
        std::fs::create_dir_all(t.join(dir)).unwrap();
    }
    let exec_start = format!(
        "{} --session --config {} --state-dir {} --home-base {} --rootful-base {}",
        daemon.display(),
        sandbox.daemon_config().unwrap().display(),
        t.join("state").display(),
        t.join("home").display(),
        t.join("rootful").display(),
    );
    let unit_file = manager.write_unit(UNIT, &unit_text(&exec_start)).unwrap();
    sandbox.start_extra_manager(&manager).unwrap();
    let set_up = test_started.elapsed();

    // Loaded from our file, and nothing started it.
    let before = show(&manager);
    assert_eq!(before["LoadState"], "loaded", "{before:?}");
    assert_eq!(before["FragmentPath"], unit_file.display().to_string());
    assert_eq!(before["ActiveState"], "inactive", "{before:?}");
    let hold = hold_unit(&manager).await;

    // A plain busctl call on the name starts the daemon through systemd and is answered.
    let (out, first_call) = get_version(&manager);
    assert!(
        out.status.success(),
        "activation failed: {}\n{}",
        text(&out.stderr),
        manager.status_text(&["dbus.service", UNIT])
    );
    assert_eq!(
        text(&out.stdout),
        format!("s \"{}\"", env!("CARGO_PKG_VERSION"))
    );
    let first_pid = assert_active(&manager, &daemon);
    // A method call too, answered by the activated daemon (no instances under its bases).
    let out = busctl(&manager, &["call", NAME, PATH, NAME, "ListInstances"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a(ssso) 0");

    // `systemctl --user stop`: SIGTERM, and the daemon exits 0 by itself, promptly.
    let stop_started = Instant::now();
    let out = manager.systemctl(&["stop", UNIT]).unwrap();
    let stop_took = stop_started.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stopped = wait_for_unit(&manager, |p| p["ActiveState"] == "inactive");
    let status = manager.status_text(&[UNIT]);
    assert_eq!(stopped["ActiveState"], "inactive", "{status}");
    assert_eq!(stopped["ExecMainPID"], first_pid, "{stopped:?}");
    assert_eq!(stopped["ExecMainCode"], CLD_EXITED, "{stopped:?}\n{status}");
    assert_eq!(stopped["ExecMainStatus"], "0", "{stopped:?}\n{status}");
    assert_eq!(stopped["Result"], "success", "{stopped:?}\n{status}");
    assert!(
        stop_took < Duration::from_secs(10),
        "stopping an idle daemon took {stop_took:?}"
    );
    assert!(!Path::new(&format!("/proc/{first_pid}")).exists());

    // The next call activates it again.
    let (out, second_call) = get_version(&manager);
    assert!(
        out.status.success(),
        "second activation failed: {}\n{}",
        text(&out.stderr),
        manager.status_text(&["dbus.service", UNIT])
    );
    assert_eq!(
        text(&out.stdout),
        format!("s \"{}\"", env!("CARGO_PKG_VERSION"))
    );
    let second_pid = assert_active(&manager, &daemon);
    assert_ne!(second_pid, first_pid);

    // Teardown removes the manager, the daemon it runs, the cgroups and the directories.
    let footprint = sandbox.footprint();
    drop(hold);
    drop(sandbox);
    let leftovers = footprint.leftovers();
    assert!(leftovers.is_empty(), "{leftovers}");
    assert!(!Path::new(&format!("/proc/{second_pid}")).exists());
    assert!(!footprint_dir.exists());
    eprintln!(
        "activation timings: set-up {set_up:?}, first activation {first_call:?}, stop \
         {stop_took:?}, second activation {second_call:?}, total {:?}",
        test_started.elapsed()
    );
}
