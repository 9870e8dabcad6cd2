//! End-to-end tests of the health gate (and of what an unhealthy update keeps): real instance
//! users with their `systemd --user` managers, rootless podman with a real running container,
//! the loopback registry, the private bus; driven through zbus, busctl and the client.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use module_updater_tests::{ImageSpec, Instance, Sandbox};
use serde_json::Value;

/// Debian's statically linked busybox (package busybox-static): the one program of the tiny
/// images whose containers really run.
const BUSYBOX: &str = "/bin/busybox";

/// A unit that runs until stopped, as a module's service does.
const LONG_RUNNING: &str = "[Unit]\nDescription=app\n[Service]\nExecStart=/bin/sleep 3600\n";
/// A unit that fails as soon as it starts.
const FAILING: &str = "[Unit]\nDescription=app\n[Service]\nExecStart=/bin/false\n";
/// NS8 modules restart their services in an update script.
const RESTART: &str = "#!/bin/sh\nsystemctl --user restart app.service\nexit 0\n";

/// A module image with the unit `app.service` of `unit` text.
fn app_module(repo: &str, tag: &str, unit: &str) -> ImageSpec {
    ImageSpec::module(repo, tag)
        .file("systemd/user/app.service", unit, 0o644)
        .file("bin/version", format!("{tag}\n"), 0o755)
}

/// `request` with `health_timeout`.
fn request_with_timeout(url: &str, instances: &[&str], secs: u64) -> String {
    serde_json::json!({"module_url": url, "instances": instances, "health_timeout": secs})
        .to_string()
}

/// Starts a unit of the instance's manager and checks it is active.
fn start_unit(sandbox: &Sandbox, instance: &Instance, unit: &str) {
    let output = sandbox.systemctl_as(instance, &["start", unit]).unwrap();
    assert!(
        output.status.success(),
        "systemctl --user start {unit}: {}",
        text(&output.stderr)
    );
    assert_eq!(
        sandbox
            .unit_property(instance, unit, "ActiveState")
            .unwrap(),
        "s \"active\""
    );
}

/// Starts `app.service` of every instance before the daemon does anything.
fn start_apps(sandbox: &Sandbox, _: &Images, instances: &[Instance]) {
    for instance in instances {
        start_unit(sandbox, instance, "app.service");
    }
}

/// Builds `<registry>/<repo>:<tag>` from scratch holding busybox and a marker file (so that two
/// tags are two images), pushes it, and returns its URL.
fn busybox_image(sandbox: &Sandbox, repo: &str, tag: &str) -> String {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (apt-get install busybox-static, or cargo xtask test, which installs it)"
    );
    let context = sandbox.root().join(format!("busybox-{repo}-{tag}"));
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(BUSYBOX, context.join("busybox")).unwrap();
    std::fs::write(context.join("marker"), format!("{repo}:{tag}\n")).unwrap();
    std::fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY marker /marker\nCMD [\"/bin/busybox\", \"sleep\", \"3600\"]\n",
    )
    .unwrap();
    let url = format!("{}/{repo}:{tag}", sandbox.registry());
    let mut build = sandbox.builder_podman();
    build.args(["build", "--quiet", "--pull=never", "--tag", &url, "--file"]);
    build.arg(context.join("Containerfile")).arg(&context);
    let output = build.output().unwrap();
    assert!(
        output.status.success(),
        "build {url}: {}",
        text(&output.stderr)
    );
    let mut push = sandbox.builder_podman();
    push.args(["push", "--quiet", "--tls-verify=false", &url]);
    let output = push.output().unwrap();
    assert!(
        output.status.success(),
        "push {url}: {}",
        text(&output.stderr)
    );
    url
}

/// The units of a health report, by name.
fn unit_report<'a>(result: &'a Value, unit: &str) -> &'a Value {
    result["health"]["units"]
        .as_array()
        .unwrap_or_else(|| panic!("no units in the health report: {result:#}"))
        .iter()
        .find(|u| u["unit"] == unit)
        .unwrap_or_else(|| panic!("{unit} not in the health report: {result:#}"))
}

/// 2.0's unit fails to start after the module's restart script: the instance ends `unhealthy`
/// at the health gate with the unit named, the job is not `completed`, and 1.0's image, which
/// the stale-image cleanup would have removed, is still there.
#[tokio::test(flavor = "multi_thread")]
async fn a_unit_that_fails_to_start_makes_the_instance_unhealthy() {
    let s = Scenario::new()
        .image("1.0", app_module("failing", "1.0", LONG_RUNNING))
        .image(
            "2.0",
            app_module("failing", "2.0", FAILING).file("update-module.d/80restart", RESTART, 0o755),
        )
        .rootless("failing", 1, "1.0")
        .prepare(start_apps)
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));

    let run = run_job(connection, &request_with_timeout(&v2, &[&instance.id], 20)).await;
    let result = run.instance(&instance.id);
    assert_eq!(run.status, "aborted", "{:#}", run.result);
    assert_eq!(run.exit_code, 1);
    assert_eq!(result["status"], "unhealthy", "{result:#}");
    assert_eq!(result["exit_code"], 1);
    assert_eq!(result["error"]["step"], "health-gate", "{result:#}");
    let reason = result["error"]["reason"].as_str().unwrap();
    assert!(reason.contains("app.service"), "{reason}");
    assert_eq!(result["health"]["passed"], false);
    assert_eq!(result["health"]["timeout_secs"], 20);
    let app = unit_report(result, "app.service");
    assert_eq!(app["active_state"], "failed", "{app:#}");
    assert_eq!(app["result"], "exit-code", "{app:#}");
    assert_eq!(app["reason"], "was-active");
    assert_eq!(app["healthy"], false);
    // The failed unit is not waited for until the timeout.
    assert!(
        result["health"]["duration_ms"].as_u64().unwrap() < 15_000,
        "{result:#}"
    );
    // The update itself went through; what it replaced is kept.
    assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v2);
    assert_eq!(result["images_removed"], serde_json::json!([]));
    assert!(has_image(sandbox, instance, &v1), "1.0's image was removed");
    // The step is in the job's signals, and the instance's state says where it stopped.
    assert!(
        run.seen.iter().any(|s| matches!(
            s,
            module_updater_dbus::JobSignal::Progress { step, .. } if step == "health-gate"
        )),
        "{:#?}",
        run.seen
    );
    assert!(
        run.seen.iter().any(|s| matches!(
            s,
            module_updater_dbus::JobSignal::InstanceFinished { status, exit_code: 1, .. } if status == "unhealthy"
        )),
        "{:#?}",
        run.seen
    );
}

/// A unit the update enables (a new service of 2.0, enabled by its update script) must be
/// active after it too: one that fails to start makes the instance unhealthy, the unit named
/// with the reason `enabled`, though it was not running before the update.
#[tokio::test(flavor = "multi_thread")]
async fn a_unit_the_update_enables_that_fails_makes_the_instance_unhealthy() {
    const ENABLE: &str = "#!/bin/sh\nsystemctl --user enable --now worker.service\nexit 0\n";
    const WORKER: &str = "[Unit]\nDescription=worker\n[Service]\nExecStart=/bin/false\n\
                          [Install]\nWantedBy=default.target\n";
    let s = Scenario::new()
        .image("1.0", app_module("enables", "1.0", LONG_RUNNING))
        .image(
            "2.0",
            app_module("enables", "2.0", LONG_RUNNING)
                .file("systemd/user/worker.service", WORKER, 0o644)
                .file("update-module.d/70enable", ENABLE, 0o755),
        )
        .rootless("enables", 1, "1.0")
        .prepare(start_apps)
        .start()
        .await;
    let (connection, instance) = (s.bus(), &s.instances[0]);
    let run = run_job(
        connection,
        &request_with_timeout(&s.url("2.0"), &[&instance.id], 20),
    )
    .await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "unhealthy", "{result:#}");
    let worker = unit_report(result, "worker.service");
    assert_eq!(worker["reason"], "enabled", "{worker:#}");
    assert_eq!(worker["active_state"], "failed", "{worker:#}");
    assert_eq!(worker["healthy"], false);
    // The unit that ran before and runs still passes.
    let app = unit_report(result, "app.service");
    assert_eq!(app["healthy"], true, "{app:#}");
    let reason = result["error"]["reason"].as_str().unwrap();
    assert!(reason.contains("worker.service"), "{reason}");
}

/// An update whose instance passes the gate ends `completed` as before, with the report: the
/// unit it restarted is active again, the readiness check passed on its third try, and the
/// stale-image cleanup ran once the gate passed. Submitted with busctl.
#[tokio::test(flavor = "multi_thread")]
async fn a_readiness_check_that_passes_after_a_few_tries() {
    // Fails twice, then passes: counts its tries in the state dir (its cwd).
    let check = "#!/bin/sh\nn=$(cat ready.tries 2>/dev/null || echo 0)\nn=$((n + 1))\necho $n > ready.tries\necho \"try $n\"\n[ \"$n\" -ge 3 ]\n";
    let s = Scenario::new()
        .image("1.0", app_module("ready", "1.0", LONG_RUNNING))
        .image(
            "2.0",
            app_module("ready", "2.0", LONG_RUNNING)
                .file("update-module.d/80restart", RESTART, 0o755)
                .file("health.d/10ready", check, 0o755),
        )
        .rootless("ready", 1, "1.0")
        .prepare(start_apps)
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));

    let mut stream = subscribe(connection).await;
    let submitted = busctl(
        sandbox,
        &[
            "call",
            module_updater_dbus::BUS_NAME,
            module_updater_dbus::OBJECT_PATH,
            module_updater_dbus::MANAGER_INTERFACE,
            "UpdateModule",
            "s",
            &request_with_timeout(&v2, &[&instance.id], 60),
        ],
    );
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    let path = text(&submitted.stdout)
        .trim()
        .trim_start_matches("o ")
        .trim_matches('"')
        .to_owned();
    let path = zbus::OwnedObjectPath::try_from(path).unwrap();
    let run = follow(connection, &mut stream, path).await;
    let result = run.instance(&instance.id);
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(result["status"], "completed", "{result:#}");
    assert_eq!(result["error"], Value::Null);
    let health = &result["health"];
    assert_eq!(health["passed"], true, "{health:#}");
    assert_eq!(health["readiness"]["passed"], true);
    assert_eq!(health["readiness"]["tries"], 3, "{health:#}");
    assert_eq!(health["readiness"]["checks"][0]["name"], "10ready");
    assert_eq!(
        std::fs::read_to_string(instance.state_dir.join("ready.tries"))
            .unwrap()
            .trim(),
        "3"
    );
    let app = unit_report(result, "app.service");
    assert_eq!(app["active_state"], "active", "{app:#}");
    assert_eq!(app["healthy"], true);
    assert_eq!(health["stale_containers"], serde_json::json!([]));
    // The cleanup ran after the gate, and kept 1.0's image: the previous version, for a
    // rollback (keep_previous, the default).
    assert_eq!(result["images_removed"], serde_json::json!([]));
    assert!(has_image(sandbox, instance, &v1));
    // The check's output reached the job's messages.
    assert!(
        run.messages_of(&instance.id).iter().any(|m| m == "try 3"),
        "{:?}",
        run.messages_of(&instance.id)
    );
}

/// A readiness check that never passes fails the gate once `health_timeout` is over, after
/// several tries; the check's failure is named.
#[tokio::test(flavor = "multi_thread")]
async fn a_readiness_check_that_never_passes() {
    let s = Scenario::new()
        .image("1.0", app_module("never", "1.0", LONG_RUNNING))
        .image(
            "2.0",
            app_module("never", "2.0", LONG_RUNNING).file(
                "health.d/10never",
                "#!/bin/sh\necho not yet\nexit 7\n",
                0o755,
            ),
        )
        .rootless("never", 1, "1.0")
        .start()
        .await;
    let (connection, instance) = (s.bus(), &s.instances[0]);
    let v2 = s.url("2.0");

    let started = std::time::Instant::now();
    let run = run_job(connection, &request_with_timeout(&v2, &[&instance.id], 4)).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "unhealthy", "{result:#}");
    assert_eq!(run.status, "aborted");
    let readiness = &result["health"]["readiness"];
    assert_eq!(readiness["passed"], false, "{result:#}");
    assert!(readiness["tries"].as_u64().unwrap() >= 2, "{readiness:#}");
    assert_eq!(readiness["checks"][0]["name"], "10never");
    assert_eq!(readiness["checks"][0]["exit_code"], 7);
    let reason = result["error"]["reason"].as_str().unwrap();
    assert!(reason.contains("readiness"), "{reason}");
    // Within the timeout (plus the update itself), not the default 120 s.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

/// 2.0 changes the module's extra image but ships no restart script while the instance's
/// container runs the old one: the gate reports the container on the replaced image, through
/// the client, which exits 1 and names it.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_left_on_the_replaced_image_is_reported() {
    let s = Scenario::new()
        .image_with("1.0", |images| {
            let busy1 = format!("{}/busy:1", images.registry());
            app_module("stale", "1.0", LONG_RUNNING).label("org.nethserver.images", busy1)
        })
        .image_with("2.0", |images| {
            let busy2 = format!("{}/busy:2", images.registry());
            app_module("stale", "2.0", LONG_RUNNING).label("org.nethserver.images", busy2)
        })
        // After a module image: the image builder's directories exist then.
        .pushed("busy1", |sandbox, _| busybox_image(sandbox, "busy", "1"))
        .pushed("busy2", |sandbox, _| busybox_image(sandbox, "busy", "2"))
        .rootless("stale", 1, "1.0")
        .without_daemon()
        .build();
    let (sandbox, instance) = (&s.sandbox, &s.instances[0]);
    let [busy1, v2] = ["busy1", "2.0"].map(|key| s.url(key));
    // runc, because crun refuses a machine with hybrid cgroups; limits the user may set.
    assert!(
        Path::new("/usr/sbin/runc").exists() || Path::new("/usr/bin/runc").exists(),
        "runc is missing: install Debian's runc (apt-get install runc, or cargo xtask test, which installs it)"
    );
    as_user(
        sandbox,
        instance,
        &[
            "podman",
            "--runtime",
            "runc",
            "run",
            "--detach",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--name",
            "busy",
            &busy1,
        ],
    );
    let running = as_user(
        sandbox,
        instance,
        &["podman", "ps", "--format", "{{.Names}} {{.Image}}"],
    );
    assert!(running.contains(&format!("busy {busy1}")), "{running}");
    let _daemon = start_daemon(sandbox, &[]);

    let data = request_with_timeout(&v2, &[&instance.id], 3);
    let output = sandbox
        .client()
        .unwrap()
        .args(["run", "update-module", "--data", &data])
        .output()
        .unwrap();
    // The container goes before any assertion can fail.
    let removed = sandbox
        .podman_as(instance, &["rm", "--force", "--time", "0", "busy"])
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let result = &result["instances"][instance.id.as_str()];
    assert_eq!(result["status"], "unhealthy", "{result:#}");
    let stale = &result["health"]["stale_containers"];
    assert_eq!(stale[0]["name"], "busy", "{result:#}");
    assert_eq!(stale[0]["replaced"], busy1.as_str());
    assert_eq!(stale[0]["image"], busy1.as_str());
    let reason = result["error"]["reason"].as_str().unwrap();
    assert!(reason.contains("busy"), "{reason}");
    // The old image is kept: the running container needs it.
    assert!(has_image(sandbox, instance, &busy1));
    assert!(removed.status.success(), "{}", text(&removed.stderr));
}

/// Kills the sandbox's registry: what follows must not need it.
fn stop_registry(sandbox: &Sandbox) {
    let pid = sandbox.registry_pid().expect("the sandbox runs a registry");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped = module_updater_tests::cmd::poll(std::time::Duration::from_secs(10), || {
        Ok((!Path::new(&format!("/proc/{pid}/status")).exists() || zombie(pid)).then_some(()))
    })
    .unwrap();
    assert!(stopped.is_some(), "the registry (pid {pid}) did not stop");
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

/// A 1.0 and a 2.0 whose unit fails to start after its restart script, each with an extra image
/// of its own (`side1`, `side2`) and a file of its own; one instance at 1.0 with its unit active.
fn failing_upgrade(repo: &str) -> ScenarioBuilder {
    let (repo1, repo2) = (repo.to_owned(), repo.to_owned());
    Scenario::new()
        .blob("side1", "side", "1", 2048, 21)
        .blob("side2", "side", "2", 2048, 22)
        .image_with("1.0", move |images| {
            app_module(&repo1, "1.0", LONG_RUNNING)
                .file("bin/only-in-1", "one\n", 0o755)
                .label("org.nethserver.images", images.url("side1"))
        })
        .image_with("2.0", move |images| {
            app_module(&repo2, "2.0", FAILING)
                .file("bin/only-in-2", "two\n", 0o755)
                .file("update-module.d/80restart", RESTART, 0o755)
                .label("org.nethserver.images", images.url("side2"))
        })
        .rootless(repo, 1, "1.0")
        .prepare(start_apps)
}

/// The four URLs [`assert_back_at_1`] checks.
fn failing_upgrade_urls(s: &Scenario) -> [String; 4] {
    ["side1", "side2", "1.0", "2.0"].map(|key| s.url(key))
}

/// What a user checks after going back to 1.0: its files, its environment (the image keys and
/// their PREV_ naming 2.0's), its images, its unit active again.
fn assert_back_at_1(
    sandbox: &Sandbox,
    instance: &Instance,
    env1: &std::collections::BTreeMap<String, String>,
    [side1, side2, v1, v2]: &[String; 4],
) {
    let install = &instance.install_dir;
    assert_eq!(
        std::fs::read_to_string(install.join("bin/version")).unwrap(),
        "1.0\n"
    );
    assert!(install.join("bin/only-in-1").exists());
    assert!(!install.join("bin/only-in-2").exists());
    assert!(!install.join("update-module.d/80restart").exists());
    assert_eq!(
        std::fs::read_to_string(install.join("systemd/user/app.service")).unwrap(),
        LONG_RUNNING
    );
    let list = std::fs::read_to_string(install.join(".imageroot.lst")).unwrap();
    assert!(list.lines().any(|l| l == "./bin/only-in-1"), "{list}");
    assert!(!list.contains("only-in-2"), "{list}");
    let env = instance.read_env().unwrap();
    for key in [
        "IMAGE_URL",
        "IMAGE_ID",
        "IMAGE_DIGEST",
        "IMAGE_REOPODIGEST",
        "SIDE_IMAGE",
    ] {
        assert_eq!(env.get(key), env1.get(key), "{key}: {env:?}");
    }
    assert_eq!(env["PREV_IMAGE_URL"], *v2);
    assert_eq!(env["PREV_SIDE_IMAGE"], *side2);
    assert!(has_image(sandbox, instance, v1));
    assert!(has_image(sandbox, instance, side1));
    assert_eq!(
        sandbox
            .unit_property(instance, "app.service", "ActiveState")
            .unwrap(),
        "s \"active\""
    );
}

/// `Rollback` of `instance` called with busctl (a client we did not write).
fn busctl_rollback(sandbox: &Sandbox, instance: &str) -> std::process::Output {
    busctl(
        sandbox,
        &[
            "call",
            module_updater_dbus::BUS_NAME,
            module_updater_dbus::OBJECT_PATH,
            module_updater_dbus::MANAGER_INTERFACE,
            "Rollback",
            "s",
            instance,
        ],
    )
}

/// After an unhealthy 2.0, `Rollback` through busctl, with the registry stopped, brings back
/// 1.0's files, environment and images and its unit active again; the history records it; a
/// second rollback is refused: nothing is kept any more.
#[tokio::test(flavor = "multi_thread")]
async fn rollback_brings_back_the_previous_version_without_a_registry() {
    let s = failing_upgrade("back").start().await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let images = failing_upgrade_urls(&s);
    let [_, _, v1, v2] = &images;
    let env1 = instance.read_env().unwrap();
    let run = run_job(connection, &request_with_timeout(v2, &[&instance.id], 20)).await;
    assert_eq!(run.instance(&instance.id)["status"], "unhealthy");
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/version")).unwrap(),
        "2.0\n"
    );

    stop_registry(sandbox);
    let mut stream = subscribe(connection).await;
    let called = busctl_rollback(sandbox, &instance.id);
    assert!(called.status.success(), "{}", text(&called.stderr));
    let path = text(&called.stdout)
        .trim()
        .trim_start_matches("o ")
        .trim_matches('"')
        .to_owned();
    let run = follow(
        connection,
        &mut stream,
        zbus::OwnedObjectPath::try_from(path).unwrap(),
    )
    .await;
    let result = run.instance(&instance.id);
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(result["status"], "completed", "{result:#}");
    assert_eq!(result["old_image_url"], v2.as_str());
    assert_eq!(result["new_image_url"], v1.as_str());
    assert_eq!(result["health"]["passed"], true, "{result:#}");
    assert!(
        result["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("migrations) is not undone")),
        "{result:#}"
    );
    assert_back_at_1(sandbox, instance, &env1, &images);

    let history: Value = serde_json::from_str(
        &module_updater_dbus::ModuleUpdaterProxy::new(connection)
            .await
            .unwrap()
            .get_history(&instance.id)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(history[0]["action"], "rollback", "{history:#}");
    assert_eq!(history[0]["status"], "completed");
    assert_eq!(history[1]["action"], "update-module");
    assert_eq!(history[1]["status"], "unhealthy");

    // Nothing is kept any more: a clear refusal, no job.
    let again = busctl_rollback(sandbox, &instance.id);
    assert!(!again.status.success());
    let stderr = text(&again.stderr);
    assert!(stderr.contains("nothing is kept"), "{stderr}");
    let manager = module_updater_dbus::ModuleUpdaterProxy::new(connection)
        .await
        .unwrap();
    let refused = manager.rollback(&instance.id).await.unwrap_err();
    assert!(
        matches!(
            module_updater_dbus::Error::from(refused),
            module_updater_dbus::Error::NothingKept(_)
        ),
        "a second rollback is refused with NothingKept"
    );
}

/// `module-updater update --rollback-on-failure`: the unhealthy 2.0 is rolled back at once, the
/// result says so and why, and 1.0 runs again.
#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_update_is_rolled_back_automatically() {
    let s = failing_upgrade("auto").build();
    let (sandbox, instance) = (&s.sandbox, &s.instances[0]);
    let images = failing_upgrade_urls(&s);
    let [_, _, _, v2] = &images;
    let env1 = instance.read_env().unwrap();

    // The failed unit is not waited for: the default health_timeout does not slow this down.
    let output = sandbox
        .client()
        .unwrap()
        .args(["update", "--rollback-on-failure", v2, &instance.id])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let result = &result["instances"][instance.id.as_str()];
    assert_eq!(result["status"], "unhealthy", "{result:#}");
    assert_eq!(result["rolled_back"], true, "{result:#}");
    let why = result["rollback_reason"].as_str().unwrap();
    assert!(why.contains("app.service"), "{why}");
    assert_back_at_1(sandbox, instance, &env1, &images);
}

/// Rollback of an instance that was never updated: refused with NothingKept, through the client
/// too (exit code 1, the reason said).
#[tokio::test(flavor = "multi_thread")]
async fn rollback_with_nothing_kept_is_refused() {
    let s = Scenario::new()
        .image("1.0", app_module("fresh", "1.0", LONG_RUNNING))
        .rootless("fresh", 1, "1.0")
        .start()
        .await;
    let (connection, instance) = (s.bus(), &s.instances[0]);
    let manager = module_updater_dbus::ModuleUpdaterProxy::new(connection)
        .await
        .unwrap();
    let refused = manager.rollback(&instance.id).await.unwrap_err();
    match module_updater_dbus::Error::from(refused) {
        module_updater_dbus::Error::NothingKept(message) => {
            assert!(message.contains(&instance.id), "{message}")
        }
        other => panic!("expected NothingKept, got {other:?}"),
    }
    let unknown = manager.rollback("nosuch9").await.unwrap_err();
    assert!(matches!(
        module_updater_dbus::Error::from(unknown),
        module_updater_dbus::Error::NoSuchInstance(_)
    ));
    assert!(manager.list_jobs().await.unwrap().is_empty(), "no job made");
}

/// `module-updater prune` drops the kept version and its images; `module-updater rollback`
/// then says nothing is kept (exit code 1) and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn prune_drops_what_is_kept_through_the_client() {
    let s = Scenario::new()
        .image("1.0", app_module("pruned", "1.0", LONG_RUNNING))
        .image("2.0", app_module("pruned", "2.0", LONG_RUNNING))
        .rootless("pruned", 1, "1.0")
        .build();
    let (sandbox, instance) = (&s.sandbox, &s.instances[0]);
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));
    let client = |args: &[&str]| sandbox.client().unwrap().args(args).output().unwrap();

    let updated = client(&["update", &v2, &instance.id]);
    assert_eq!(updated.status.code(), Some(0), "{}", text(&updated.stderr));
    assert!(has_image(sandbox, instance, &v1), "1.0 is kept");

    let pruned = client(&["prune", &instance.id]);
    assert_eq!(pruned.status.code(), Some(0), "{}", text(&pruned.stderr));
    let result: Value = serde_json::from_slice(&pruned.stdout).unwrap();
    let result = &result["instances"][instance.id.as_str()];
    assert_eq!(result["status"], "completed", "{result:#}");
    assert_eq!(result["images_removed"], serde_json::json!([v1.as_str()]));
    assert!(!has_image(sandbox, instance, &v1));
    assert!(has_image(sandbox, instance, &v2));

    let refused = client(&["rollback", &instance.id]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("nothing is kept"), "{stderr}");
    assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v2);
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/version")).unwrap(),
        "2.0\n"
    );
}

/// A daemon killed in the middle of a rollback (its files and environment already back, its
/// health gate waiting for a readiness check), then the same rollback run again by a new daemon:
/// it completes, and 1.0 is back as after an uninterrupted one.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_interrupted_by_a_killed_daemon_runs_again() {
    // 1.0's readiness check waits while the test holds it.
    let hold = "#!/bin/sh\ntouch holding\nwhile [ -e hold ]; do sleep 0.2; done\nexit 0\n";
    let mut s = Scenario::new()
        .image(
            "1.0",
            app_module("killed", "1.0", LONG_RUNNING).file("health.d/10hold", hold, 0o755),
        )
        .image(
            "2.0",
            app_module("killed", "2.0", FAILING).file("update-module.d/80restart", RESTART, 0o755),
        )
        .rootless("killed", 1, "1.0")
        .prepare(start_apps)
        .start()
        .await;
    // The test kills the daemon: it holds it.
    let mut daemon = s.daemon.take().unwrap();
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));
    let env1 = instance.read_env().unwrap();
    let run = run_job(connection, &request_with_timeout(&v2, &[&instance.id], 20)).await;
    assert_eq!(run.instance(&instance.id)["status"], "unhealthy");

    let state = &instance.state_dir;
    std::fs::write(state.join("hold"), "").unwrap();
    let manager = module_updater_dbus::ModuleUpdaterProxy::new(connection)
        .await
        .unwrap();
    manager.rollback(&instance.id).await.unwrap();
    let holding = module_updater_tests::cmd::poll(std::time::Duration::from_secs(90), || {
        Ok(state.join("holding").exists().then_some(()))
    })
    .unwrap();
    assert!(holding.is_some(), "the rollback never reached its gate");
    daemon.kill();
    std::fs::remove_file(state.join("hold")).unwrap();
    std::fs::remove_file(state.join("holding")).unwrap();
    // The killed daemon's worker ends its check and goes: the instance's lock is free then.
    let lock = state.join(".update-module.lock");
    let free = module_updater_tests::cmd::poll(std::time::Duration::from_secs(30), || {
        let probe = std::process::Command::new("flock")
            .args(["--nonblock", "--shared"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap();
        Ok(probe.success().then_some(()))
    })
    .unwrap();
    assert!(
        free.is_some(),
        "the killed daemon's worker still holds the lock"
    );

    let _daemon = start_daemon(sandbox, &[]);
    let connection = connect(sandbox).await;
    let mut stream = subscribe(&connection).await;
    let path = module_updater_dbus::ModuleUpdaterProxy::new(&connection)
        .await
        .unwrap()
        .rollback(&instance.id)
        .await
        .expect("what was kept is still there after the interrupted rollback");
    let run = follow(&connection, &mut stream, path).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "completed", "{result:#}");
    assert_eq!(result["health"]["readiness"]["passed"], true, "{result:#}");
    let env = instance.read_env().unwrap();
    for key in ["IMAGE_URL", "IMAGE_ID", "IMAGE_DIGEST"] {
        assert_eq!(env.get(key), env1.get(key), "{key}");
    }
    assert_eq!(env["PREV_IMAGE_URL"], v2);
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/version")).unwrap(),
        "1.0\n"
    );
    assert!(
        !instance
            .install_dir
            .join("update-module.d/80restart")
            .exists()
    );
    assert!(
        !state.join(".module-updater.in-progress").exists(),
        "the rollback run again ended what the interrupted one began"
    );
    assert_eq!(
        sandbox
            .unit_property(instance, "app.service", "ActiveState")
            .unwrap(),
        "s \"active\""
    );
    assert!(has_image(sandbox, instance, &v1));
}

/// A caller other than root needs the polkit action `org.nethserver.moduleupdater.rollback` for
/// `Rollback` and `PruneKept`: the bus lets the call through to the daemon, which asks polkit
/// (not running here) and refuses, naming the action; nothing is done.
#[tokio::test(flavor = "multi_thread")]
async fn rollback_and_prune_need_the_rollback_action() {
    let s = Scenario::new()
        .image("1.0", app_module("guarded", "1.0", LONG_RUNNING))
        .rootless("guarded", 1, "1.0")
        .bare("caller", 1)
        .build();
    let sandbox = &s.sandbox;
    let [target, user] = &s.instances[..] else {
        unreachable!()
    };
    let bus = sandbox.bus_address();
    for method in ["Rollback", "PruneKept"] {
        let member = format!("{}.{method}", module_updater_dbus::MANAGER_INTERFACE);
        let out = sandbox
            .run_as(
                user,
                &[
                    "gdbus",
                    "call",
                    "--address",
                    &bus,
                    "--dest",
                    module_updater_dbus::BUS_NAME,
                    "--object-path",
                    module_updater_dbus::OBJECT_PATH,
                    "--method",
                    &member,
                    &target.id,
                ],
            )
            .unwrap();
        assert!(!out.status.success(), "{method} was allowed");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("org.freedesktop.DBus.Error.AccessDenied"),
            "{method}: {stderr}"
        );
        assert!(
            stderr.contains(module_updater_dbus::ACTION_ROLLBACK),
            "{method}: {stderr}"
        );
    }
    let connection = connect(sandbox).await;
    let manager = module_updater_dbus::ModuleUpdaterProxy::new(&connection)
        .await
        .unwrap();
    assert!(manager.list_jobs().await.unwrap().is_empty(), "no job made");
}
