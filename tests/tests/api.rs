//! End-to-end tests of the state a plugin binds to: the ObjectManager, instance objects, a job's
//! per-instance states and messages, and the update history — read with stock tools (gdbus,
//! busctl) as a Cockpit page or an applet would.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use module_updater_dbus::{InstanceProxy, JobProxy, ModuleUpdaterProxy, instance_path};
use module_updater_tests::{ImageSpec, Instance, Sandbox};
use serde_json::Value;
use zbus::proxy::CacheProperties;

const PATH: &str = "/org/nethserver/ModuleUpdater";

/// A 2.0 whose update script prints two lines, then waits until the test creates `gate` in the
/// instance's state dir (its working directory), then prints a third.
/// Module `api` at 1.0, and at 2.0 with a script that waits for [`open_gate`].
fn gated_module() -> ScenarioBuilder {
    Scenario::new()
        .image("1.0", ImageSpec::module("api", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("api", "2.0").file(
                "update-module.d/50gate",
                "#!/bin/sh\necho 'first line'\necho 'second line'\n\
                 while [ ! -e gate ]; do sleep 0.1; done\necho 'after the gate'\n",
                0o755,
            ),
        )
}

fn open_gate(instance: &Instance) {
    std::fs::write(instance.state_dir.join("gate"), "").unwrap();
}

/// `gdbus monitor` of the service, its output going to a file read by [`Monitor::seen`].
struct Monitor {
    child: Child,
    out: std::path::PathBuf,
}

impl Monitor {
    fn start(sandbox: &Sandbox, name: &str) -> Monitor {
        let out = sandbox.root().join(format!("{name}.monitor"));
        let child = Command::new("gdbus")
            .args(["monitor", "--address", &sandbox.bus_address()])
            .args(["--dest", module_updater_dbus::BUS_NAME])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // gdbus prints a first line once its match rules are in place.
        let started = Instant::now();
        while std::fs::read_to_string(&out).unwrap_or_default().is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "gdbus monitor never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Monitor { child, out }
    }

    fn seen(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until a line of the monitor contains every one of `parts`.
    async fn wait_for(&self, parts: &[&str], within: Duration) -> String {
        let started = Instant::now();
        loop {
            let seen = self.seen();
            if let Some(line) = seen.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return line.to_owned();
            }
            assert!(
                started.elapsed() < within,
                "no monitor line with {parts:?} within {within:?}:\n{seen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn job_proxy<'a>(connection: &'a zbus::Connection, path: &str) -> JobProxy<'a> {
    JobProxy::builder(connection)
        .path(path.to_owned())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .unwrap()
}

async fn instance_proxy<'a>(connection: &'a zbus::Connection, id: &str) -> InstanceProxy<'a> {
    InstanceProxy::builder(connection)
        .path(instance_path(id))
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .unwrap()
}

/// Polls `check` every 50 ms until it is true, at most `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What busctl prints for a property or a call with `--json=short`, parsed.
fn busctl_json(sandbox: &Sandbox, args: &[&str]) -> Value {
    let mut all = vec!["--json=short"];
    all.extend_from_slice(args);
    let out = busctl(sandbox, &all);
    assert!(
        out.status.success(),
        "busctl {args:?}: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A client that arrives in the middle of a two-instance job reads where each instance stands
/// and its log so far from the job object alone; the ObjectManager lists instances and the live
/// job and announces the job's arrival and departure; the instance objects follow the update;
/// the history survives a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_binds_to_instances_and_jobs_and_reads_the_history() {
    let mut s = gated_module()
        .rootless("api", 2, "1.0")
        .daemon(&["--job-linger", "3"])
        .start()
        .await;
    // The test restarts the daemon: it holds it.
    let daemon = s.daemon.take().unwrap();
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [a, b] = &s.instances[..] else {
        unreachable!()
    };
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));
    let monitor = Monitor::start(sandbox, "api");

    // Before any job: the instances are objects with their image.
    let manager = ModuleUpdaterProxy::new(connection).await.unwrap();
    let features = manager.features().await.unwrap();
    for feature in [
        "object-manager",
        "instance-objects",
        "instance-states",
        "history",
    ] {
        assert!(features.iter().any(|f| f == feature), "{features:?}");
    }
    let before = instance_proxy(connection, &a.id).await;
    assert_eq!(before.id().await.unwrap(), a.id);
    assert_eq!(before.version().await.unwrap(), "1.0");
    assert_eq!(before.image_url().await.unwrap(), v1);
    let (repository, _) = v1.rsplit_once(':').unwrap();
    assert_eq!(before.module().await.unwrap(), repository);
    assert!(before.image_digest().await.unwrap().starts_with("sha256:"));
    assert!(before.rootless().await.unwrap());
    assert_eq!(before.uid().await.unwrap(), a.uid);
    assert_eq!(before.state().await.unwrap(), "idle");
    assert_eq!(before.job().await.unwrap().as_str(), "/");
    assert_eq!(before.last_update().await.unwrap(), "{}");

    // The job is started by another client (busctl).
    let out = busctl(
        sandbox,
        &[
            "call",
            module_updater_dbus::BUS_NAME,
            PATH,
            module_updater_dbus::MANAGER_INTERFACE,
            "UpdateModule",
            "s",
            &request(&v2, &[&a.id, &b.id], false),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job_path = text(&out.stdout)
        .trim()
        .trim_start_matches("o ")
        .trim_matches('"')
        .to_owned();
    monitor
        .wait_for(
            &["InterfacesAdded", &format!("'{job_path}'")],
            Duration::from_secs(10),
        )
        .await;

    // A late client: both instances wait at the gate, having printed two lines.
    let job = job_proxy(connection, &job_path).await;
    eventually(
        "both instances at the gate",
        Duration::from_secs(120),
        || {
            let job = &job;
            let (a, b) = (&a.id, &b.id);
            async move {
                let mut ok = true;
                for id in [a, b] {
                    let messages = job.get_messages(id).await.unwrap();
                    ok &= messages.iter().any(|(_, _, t)| t.contains("second line"));
                }
                ok
            }
        },
    )
    .await;
    let states = busctl_json(
        sandbox,
        &[
            "get-property",
            module_updater_dbus::BUS_NAME,
            &job_path,
            module_updater_dbus::JOB_INTERFACE,
            "InstanceStates",
        ],
    );
    for id in [&a.id, &b.id] {
        let state = &states["data"][id.as_str()];
        assert_eq!(state[0], "running", "{states}");
        assert_eq!(state[1], "run-scripts", "{states}");
        let percent = state[2].as_u64().unwrap();
        assert!(percent > 0 && percent < 100, "{states}");
        assert_eq!(state[3], -1, "{states}");
        let messages = busctl_json(
            sandbox,
            &[
                "call",
                module_updater_dbus::BUS_NAME,
                &job_path,
                module_updater_dbus::JOB_INTERFACE,
                "GetMessages",
                "s",
                id,
            ],
        );
        let lines: Vec<&str> = messages["data"][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[2].as_str().unwrap())
            .collect();
        let first = lines.iter().position(|l| l.contains("first line")).unwrap();
        let second = lines
            .iter()
            .position(|l| l.contains("second line"))
            .unwrap();
        assert!(first < second, "{lines:?}");
        assert!(
            !lines.iter().any(|l| l.contains("after the gate")),
            "{lines:?}"
        );
        for message in messages["data"][0].as_array().unwrap() {
            assert!(
                message[0].as_u64().unwrap() > 1_600_000_000_000_000,
                "{message}"
            );
        }
    }
    let out = gdbus_call(
        sandbox,
        &job_path,
        "org.nethserver.ModuleUpdater.Job.GetMessages",
        &["nosuch1"],
    );
    let name = error_name(&out);
    assert_eq!(name, "org.nethserver.ModuleUpdater.Error.NoSuchInstance");

    // Our client shows the same from the job alone.
    let job_number: u64 = job_path.rsplit('/').next().unwrap().parse().unwrap();
    let status = client_json(sandbox, &["status", &job_number.to_string(), "--json"]);
    assert_eq!(
        status["instance_states"][&a.id]["status"], "running",
        "{status}"
    );
    assert_eq!(
        status["instance_states"][&a.id]["step"], "run-scripts",
        "{status}"
    );
    let table = client_text(sandbox, &["status", &job_number.to_string()]);
    assert!(
        table.lines().any(|l| l.split_whitespace().take(3).eq([
            b.id.as_str(),
            "running",
            "run-scripts"
        ])),
        "{table}"
    );

    // GetManagedObjects: both instances (updating, held by the job) and the live job, with all
    // their properties.
    let out = gdbus_call(
        sandbox,
        PATH,
        "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let objects = text(&out.stdout);
    for id in [&a.id, &b.id] {
        assert!(
            objects.contains(&format!("'{}'", instance_path(id))),
            "{objects}"
        );
    }
    assert!(objects.contains(&format!("'{job_path}'")), "{objects}");
    for property in [
        "'Id'",
        "'Module'",
        "'ImageUrl'",
        "'ImageDigest'",
        "'Version'",
        "'Rootless'",
        "'Uid'",
        "'State'",
        "'Job'",
        "'LastUpdate'",
        "'InstanceStates'",
        "'FinishedUsec'",
        "'Status'",
    ] {
        assert!(objects.contains(property), "{property} missing: {objects}");
    }
    assert!(objects.contains("'updating'"), "{objects}");
    let held = instance_proxy(connection, &b.id).await;
    assert_eq!(held.state().await.unwrap(), "updating");
    assert_eq!(held.job().await.unwrap().as_str(), job_path);

    // Through the gate: the job ends, its states and FinishedUsec are announced.
    open_gate(a);
    open_gate(b);
    eventually("the job's end", Duration::from_secs(120), || {
        let job = &job;
        async move { job.status().await.unwrap() == "completed" }
    })
    .await;
    let states = job.instance_states().await.unwrap();
    for id in [&a.id, &b.id] {
        let (status, step, percent, exit_code) = &states[id.as_str()];
        assert_eq!(
            (status.as_str(), step.as_str(), *percent, *exit_code),
            ("completed", "", 100, 0)
        );
    }
    let finished = job.finished_usec().await.unwrap();
    assert!(finished > 0);
    monitor
        .wait_for(
            &[
                "PropertiesChanged",
                &format!("{job_path}: "),
                "FinishedUsec",
            ],
            Duration::from_secs(5),
        )
        .await;
    // The instance objects follow: new version, idle, the update as LastUpdate.
    eventually(
        "the instance objects' new version",
        Duration::from_secs(10),
        || {
            let held = &held;
            async move {
                held.version().await.unwrap() == "2.0" && held.state().await.unwrap() == "idle"
            }
        },
    )
    .await;
    assert_eq!(held.job().await.unwrap().as_str(), "/");
    let last: Value = serde_json::from_str(&held.last_update().await.unwrap()).unwrap();
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["new_image_url"], v2.as_str(), "{last}");
    monitor
        .wait_for(
            &[
                "PropertiesChanged",
                &format!("{}: ", instance_path(&b.id)),
                "'2.0'",
            ],
            Duration::from_secs(5),
        )
        .await;
    // Lingering over, the job leaves with InterfacesRemoved.
    monitor
        .wait_for(
            &["InterfacesRemoved", &format!("'{job_path}'")],
            Duration::from_secs(15),
        )
        .await;

    // The history, after the job is gone and across a restart.
    let history_of = |id: &str| {
        let out = gdbus_call(
            sandbox,
            PATH,
            "org.nethserver.ModuleUpdater.GetHistory",
            &[id],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        // gdbus prints ('[...]',): the JSON is the string inside.
        let printed = text(&out.stdout);
        let json = printed
            .trim()
            .trim_start_matches("('")
            .trim_end_matches("',)")
            .to_owned();
        serde_json::from_str::<Value>(&json).unwrap_or_else(|e| panic!("{e}: {printed}"))
    };
    drop(daemon);
    let daemon = start_daemon(sandbox, &[]);
    for id in [&a.id, &b.id] {
        let history = history_of(id);
        let entries = history.as_array().unwrap();
        assert_eq!(entries.len(), 1, "{history}");
        let entry = &entries[0];
        assert_eq!(entry["job"], job_number, "{entry}");
        assert_eq!(entry["status"], "completed");
        assert_eq!(entry["exit_code"], 0);
        assert_eq!(entry["old_image_url"], v1.as_str());
        assert_eq!(entry["new_image_url"], v2.as_str());
        assert!(
            entry["new_image_digest"]
                .as_str()
                .unwrap()
                .starts_with("sha256:")
        );
        assert_eq!(entry["caller_uid"], 0);
        assert_eq!(entry["scripts"][0]["name"], "50gate", "{entry}");
        assert!(entry["finished_usec"].as_u64() >= entry["started_usec"].as_u64());
    }
    let again = instance_proxy(connection, &a.id).await;
    let last: Value = serde_json::from_str(&again.last_update().await.unwrap()).unwrap();
    assert_eq!(last["job"], job_number);
    // And through our client.
    let history = client_json(sandbox, &["history", &a.id, "--json"]);
    assert_eq!(history[0]["instance"], a.id.as_str(), "{history}");
    assert_eq!(history[0]["job"], job_number, "{history}");
    assert!(
        history[0]["finished"].as_str().unwrap().ends_with('Z'),
        "ISO 8601 in UTC: {history}"
    );
    let table = client_text(sandbox, &["history"]);
    for id in [&a.id, &b.id] {
        assert!(
            table.lines().any(|l| l.contains(id.as_str())
                && l.contains("completed")
                && l.contains("1.0 → 2.0")),
            "{table}"
        );
    }
    let show = client_json(sandbox, &["show", &b.id, "--json"]);
    assert_eq!(show["state"], "idle", "{show}");
    assert_eq!(show["version"], "2.0", "{show}");
    assert_eq!(show["IMAGE_URL"], v2.as_str(), "{show}");
    assert_eq!(show["last_update"]["job"], job_number, "{show}");
    drop(daemon);
}

/// Our client's stdout, which must succeed.
fn client_text(sandbox: &Sandbox, args: &[&str]) -> String {
    let out = sandbox.client().unwrap().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "module-updater {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn client_json(sandbox: &Sandbox, args: &[&str]) -> Value {
    let printed = client_text(sandbox, args);
    serde_json::from_str(&printed).unwrap_or_else(|e| panic!("{e}: {printed}"))
}

/// The D-Bus error name of a failed gdbus call ("GDBus.Error:NAME: message").
fn error_name(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "the call succeeded: {}",
        text(&out.stdout)
    );
    let stderr = text(&out.stderr);
    stderr
        .split("GDBus.Error:")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no error name in {stderr}"))
        .to_owned()
}

/// Journal fields carry the daemon's own prefix, so `journalctl MODULE_UPDATER_JOB=N` finds one
/// job's lines and never systemd's messages about its own job N.
#[tokio::test(flavor = "multi_thread")]
async fn journal_fields_are_namespaced() {
    let s = gated_module().rootless("api", 1, "1.0").start().await;
    let (connection, daemon, instance) = (s.bus(), s.daemon(), &s.instances[0]);
    let v1 = s.url("1.0");
    let run = run_job(connection, &request(&v1, &[&instance.id], true)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let log = daemon.log();
    let job_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("MODULE_UPDATER_JOB=1"))
        .collect();
    assert!(
        job_lines
            .iter()
            .any(|l| l.contains(&format!("MODULE_UPDATER_INSTANCE={}", instance.id))),
        "{log}"
    );
    assert!(job_lines.len() >= 2, "{log}");
    for line in log.lines() {
        for old in [" JOB_ID=", " MODULE_ID=", " CALLER_UID=", " STEP="] {
            assert!(!line.contains(old), "un-namespaced field {old} in {line}");
        }
    }
}

/// The Python example of docs/dbus-api.md, pasted as a plugin author would, runs against the
/// service and prints a job's states, its log and the history.
#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_of_the_docs_runs() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dbus-api.md"))
        .unwrap();
    let start = doc.find("```python\n").expect("a Python example") + "```python\n".len();
    let example = &doc[start..start + doc[start..].find("```").unwrap()];
    let s = gated_module().rootless("api", 1, "1.0").start().await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    open_gate(instance);
    let v2 = s.url("2.0");
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let script = example
        .replace("/org/nethserver/ModuleUpdater/job/12", run.path.as_str())
        .replace("\"mail1\"", &format!("\"{}\"", instance.id));
    // Debian's Python, where python3-jeepney is installed (not a Python of the user's PATH).
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .env("DBUS_SYSTEM_BUS_ADDRESS", sandbox.bus_address())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the example failed (python3-jeepney is installed by `cargo xtask test`): {}",
        text(&out.stderr)
    );
    let printed = text(&out.stdout);
    assert!(
        printed.contains(&format!("{} completed  100%", instance.id)),
        "{printed}"
    );
    assert!(printed.contains("after the gate"), "{printed}");
    assert!(printed.trim_end().ends_with("completed"), "{printed}");
}

/// The service itself refuses, before any job exists, an image of another module than an
/// instance runs and an older version than it runs (unless the request allows it), in NS8's
/// validation form naming the instance; tags that are not versions are never a downgrade.
#[tokio::test(flavor = "multi_thread")]
async fn another_module_and_a_downgrade_are_refused_before_any_job() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("chk", "1.0"))
        .image("2.0", ImageSpec::module("chk", "2.0"))
        .image("latest", ImageSpec::module("chk", "latest"))
        .image("other", ImageSpec::module("other", "9.0"))
        .rootless("chk", 1, "2.0")
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [v1, v2, latest, other] = ["1.0", "2.0", "latest", "other"].map(|key| s.url(key));
    let refusal = |request: &str| {
        let out = gdbus_call(
            sandbox,
            PATH,
            "org.nethserver.ModuleUpdater.UpdateModule",
            &[request],
        );
        let name = error_name(&out);
        let stderr = text(&out.stderr);
        let array = stderr[stderr.find('[').unwrap()..].trim().to_owned();
        (name, serde_json::from_str::<Value>(&array).unwrap())
    };
    for (url, kind) in [
        (&other, "module_url_other_module"),
        (&v1, "module_url_downgrade"),
    ] {
        let (name, array) = refusal(&request(url, &[&instance.id], false));
        assert_eq!(name, "org.nethserver.ModuleUpdater.Error.ValidationFailed");
        assert_eq!(array[0]["error"], kind, "{array}");
        assert_eq!(array[0]["field"], "module_url");
        assert_eq!(array[0]["value"], url.as_str());
        assert_eq!(array[0]["instance"], instance.id.as_str());
        assert_eq!(array[0]["current"], v2.as_str());
    }
    let manager = ModuleUpdaterProxy::new(connection).await.unwrap();
    assert!(
        manager.list_jobs().await.unwrap().is_empty(),
        "a job was created"
    );
    // Allowed when asked; a tag that is no version is never a downgrade, either way.
    let allowed = serde_json::json!(
        {"module_url": v1, "instances": [instance.id], "allow_downgrade": true}
    );
    let run = run_job(connection, &allowed.to_string()).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v1);
    let run = run_job(connection, &request(&latest, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let run = run_job(connection, &request(&v1, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    // Our client says the same for `update`, and --allow-downgrade lets it through.
    let out = sandbox
        .client()
        .unwrap()
        .args(["update", &v2, &instance.id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sandbox
        .client()
        .unwrap()
        .args(["update", &v1, &instance.id])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(10), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("downgrade"),
        "{}",
        text(&out.stderr)
    );
    let out = sandbox
        .client()
        .unwrap()
        .args(["update", "--allow-downgrade", &v1, &instance.id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v1);
}

/// ListUpdates asks the instances' registries: the newest version above each instance's (a
/// pre-release only for an instance on one), a tag pushed again with other content reported as
/// moved once the registries are asked again, and a registry that accepts connections but never
/// answers costs its instance an error within the timeout while the others answer.
#[tokio::test(flavor = "multi_thread")]
async fn updates_are_listed_from_the_registry_with_their_age() {
    const TAGS: [&str; 5] = ["1.0", "1.1", "2.0", "2.0-rc1", "2.1-rc1"];
    // A registry that accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("{}/upd:1.0", hole.local_addr().unwrap());
    let unreachable_url = hole_url.clone();
    let s = Scenario::new()
        .module("upd", &TAGS)
        .rootless("upd", 1, "1.0")
        .rootless("upd", 1, "2.0-rc1")
        .rootless("upd", 1, "1.1")
        .rootless("upd", 1, "1.0")
        .prepare(move |sandbox, _, instances| {
            let unreachable = &instances[3];
            let mut env = unreachable.read_env().unwrap();
            env.insert("IMAGE_URL".into(), unreachable_url);
            sandbox.write_env(unreachable, &env).unwrap();
        })
        .daemon(&["--registry-timeout", "3"])
        .start()
        .await;
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [on_release, on_prerelease, on_moved, unreachable] = &s.instances[..] else {
        unreachable!()
    };
    let urls: std::collections::BTreeMap<&str, String> =
        TAGS.iter().map(|tag| (*tag, s.url(tag))).collect();
    let manager = ModuleUpdaterProxy::new(connection).await.unwrap();

    let started = Instant::now();
    let updates: Value = serde_json::from_str(&manager.list_updates(&[]).await.unwrap()).unwrap();
    let took = started.elapsed();
    let line = |updates: &Value, instance: &Instance| updates["instances"][&instance.id].clone();
    assert_eq!(line(&updates, on_release)["newest"], "2.0", "{updates:#}");
    assert_eq!(
        line(&updates, on_release)["newest_url"],
        urls["2.0"].as_str()
    );
    assert_eq!(
        line(&updates, on_prerelease)["newest"],
        "2.1-rc1",
        "{updates:#}"
    );
    assert_eq!(line(&updates, on_moved)["newest"], "2.0");
    for instance in [&on_release, &on_prerelease, &on_moved] {
        assert_eq!(line(&updates, instance)["tag_moved"], false, "{updates:#}");
        assert!(line(&updates, instance)["error"].is_null(), "{updates:#}");
    }
    let error = line(&updates, unreachable)["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("no answer within 3 s"), "{error}");
    assert!(took < Duration::from_secs(20), "took {took:?}");

    // The tag is pushed again with other content: the kept answer says so only once asked
    // again, and says how old it is.
    sandbox
        .build_image(&ImageSpec::module("upd", "1.1").file("changed", "yes\n", 0o644))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let kept: Value =
        serde_json::from_str(&manager.list_updates(&[on_moved.id.as_str()]).await.unwrap())
            .unwrap();
    assert_eq!(line(&kept, on_moved)["tag_moved"], false);
    assert!(
        line(&kept, on_moved)["age_seconds"].as_u64().unwrap() >= 1,
        "{kept:#}"
    );
    let out = busctl(
        sandbox,
        &[
            "--json=short",
            "call",
            module_updater_dbus::BUS_NAME,
            PATH,
            module_updater_dbus::MANAGER_INTERFACE,
            "RefreshUpdates",
            "as",
            "1",
            &on_moved.id,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fresh: Value = serde_json::from_str(reply["data"][0].as_str().unwrap()).unwrap();
    assert_eq!(line(&fresh, on_moved)["tag_moved"], true, "{fresh:#}");
    assert_eq!(line(&fresh, on_moved)["age_seconds"], 0, "{fresh:#}");

    // Our client: a table, exit code 100 when an update is available.
    let out = sandbox
        .client()
        .unwrap()
        .args(["check", &on_moved.id, &on_release.id])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(100), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(on_moved.id.as_str()) && l.contains("moved")),
        "{table}"
    );
    let name = error_name(&gdbus_call(
        sandbox,
        PATH,
        "org.nethserver.ModuleUpdater.ListUpdates",
        &["['nosuch1']"],
    ));
    assert_eq!(name, "org.nethserver.ModuleUpdater.Error.NoSuchInstance");
    drop(hole);
}
