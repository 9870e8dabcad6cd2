//! PlanUpdate end to end, with the sandbox's registry, users and podman: the plan says what the
//! update then does, changes nothing, leaves the image in the node's download area for the
//! update, refuses what UpdateModule refuses (and the same way), and checks free space.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use module_updater_dbus::{ACTION_UPDATE_MODULE, ModuleUpdaterProxy};
use module_updater_tests::{Instance, Sandbox};
use serde_json::Value;

/// PlanUpdate through the proxy: the plan's JSON.
async fn plan(connection: &zbus::Connection, request: &str) -> zbus::Result<Value> {
    let json = ModuleUpdaterProxy::new(connection)
        .await?
        .plan_update(request)
        .await?;
    Ok(serde_json::from_str(&json).unwrap())
}

/// The D-Bus error of a refused call: its name and message.
fn refusal<T: std::fmt::Debug>(reply: zbus::Result<T>) -> (String, String) {
    match reply {
        Err(zbus::Error::MethodError(name, message, _)) => {
            (name.to_string(), message.unwrap_or_default())
        }
        other => panic!("not a refusal: {other:?}"),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The images in an instance's storage (names), what a user lists with `podman images`.
fn images_of(sandbox: &Sandbox, instance: &Instance) -> String {
    as_user(
        sandbox,
        instance,
        &[
            "podman",
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}} {{.Id}}",
        ],
    )
}

/// A 1.0 → 2.0 module `planned` whose files, scripts, steps and extra images (`db1`, `db2`)
/// all change.
fn changing_module() -> ScenarioBuilder {
    Scenario::new()
        .blob("db1", "plandb", "1", 4096, 31)
        .blob("db2", "plandb", "2", 4096, 32)
        .image_with("1.0", |images| {
            module_image("planned", "1.0", &[images.url("db1")])
                .file("bin/only-in-1", "old\n", 0o755)
                .file("etc/same.conf", "same\n", 0o644)
                .file("etc/changed.conf", "one\n", 0o644)
        })
        .image_with("2.0", |images| {
            module_image("planned", "2.0", &[images.url("db2")])
                .file("etc/same.conf", "same\n", 0o644)
                .file("etc/changed.conf", "two\n", 0o644)
                .file("etc/added.conf", "new\n", 0o644)
                .file("update-module.d/10first", "#!/bin/sh\ntrue\n", 0o755)
                .file("update-module.d/20notexec", "#!/bin/sh\ntrue\n", 0o644)
                .file("update-module.d/30second", "#!/bin/sh\ntrue\n", 0o755)
                .file("actions/update-module/60after", "#!/bin/sh\ntrue\n", 0o755)
        })
}

/// The plan's files, scripts, steps and removed images are what the update then does; the plan
/// changes nothing of the instance; the update after it downloads nothing from the registry.
#[tokio::test(flavor = "multi_thread")]
async fn the_plan_is_what_the_update_does_and_changes_nothing() {
    // NS8's cleanup (nothing kept): the plan names the previous images the update removes.
    let s = changing_module()
        .rootless("planned", 1, "1.0")
        .daemon(&["--keep-previous=false"])
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [db1, v1, v2] = ["db1", "1.0", "2.0"].map(|key| s.url(key));

    let tree_before = snapshot(&instance.install_dir);
    let images_before = images_of(sandbox, instance);
    let offset = sandbox.registry_log_offset().unwrap();
    let planned = plan(connection, &request(&v2, &[&instance.id], false))
        .await
        .unwrap();
    let traffic = sandbox.registry_traffic_since(offset).unwrap();
    assert!(
        !traffic.blob_downloads.is_empty(),
        "the plan downloaded nothing: {traffic:?}"
    );
    eprintln!("{planned:#}");

    // Nothing of the instance changed: its tree, its storage, and no job was made.
    assert_eq!(snapshot(&instance.install_dir), tree_before);
    assert_eq!(images_of(sandbox, instance), images_before);
    let manager = ModuleUpdaterProxy::new(connection).await.unwrap();
    assert!(manager.list_jobs().await.unwrap().is_empty());

    assert_eq!(planned["refused"], Value::Array(Vec::new()), "{planned:#}");
    assert!(
        planned["download"]["bytes"].as_u64().unwrap() > 0,
        "{planned:#}"
    );
    let item = &planned["instances"][0];
    assert_eq!(item["instance"], instance.id.as_str());
    assert_eq!(item["action"], "update");
    assert_eq!(item["old_url"], v1.as_str());
    assert_eq!(item["new_url"], v2.as_str());
    assert!(item["storage_bytes"].as_u64().unwrap() > 0);
    let files = &item["files"];
    // The module's unit and version file name the tag: they change too.
    assert_eq!(
        strings(&files["changed"]),
        [
            "bin/version",
            "etc/changed.conf",
            "systemd/user/demo.service"
        ]
    );
    let added: BTreeSet<String> = strings(&files["added"]).into_iter().collect();
    for path in [
        "etc/added.conf",
        "update-module.d/10first",
        "actions/update-module/60after",
    ] {
        assert!(added.contains(path), "{path} not in {added:?}");
    }
    assert_eq!(strings(&item["scripts"]), ["10first", "30second"]);
    assert_eq!(
        strings(&item["steps"]),
        [
            "05pullimages",
            "50run_scriptdir",
            "60after",
            "95cleanup_images"
        ]
    );
    assert!(strings(&item["images_removed"]).contains(&db1), "{item:#}");
    for space in item["space"].as_array().unwrap() {
        assert_eq!(space["enough"], true, "{space}");
        assert!(space["available"].as_u64().unwrap() > 0);
    }

    // The update after the plan: the registry serves no blob (the plan's download is loaded).
    let offset = sandbox.registry_log_offset().unwrap();
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let traffic = sandbox.registry_traffic_since(offset).unwrap();
    assert!(
        traffic.blob_downloads.is_empty(),
        "the update downloaded again after the plan: {traffic:?}"
    );
    let result = run.instance(&instance.id);
    assert_eq!(result["new_image_digest"], item["new_digest"]);
    assert_eq!(result["files_removed"], files["removed"], "{result:#}");
    assert!(strings(&files["removed"]).contains(&"./bin/only-in-1".to_owned()));
    assert_eq!(result["files_installed"], files["entries"]);
    let ran: Vec<String> = result["scripts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ran, strings(&item["runs"]));
    let mut removed = strings(&result["images_removed"]);
    let mut planned_removed = strings(&item["images_removed"]);
    removed.sort();
    planned_removed.sort();
    assert_eq!(removed, planned_removed);
    assert_eq!(
        removed.len(),
        2,
        "1.0's module and extra images: {removed:?}"
    );
    // The install tree after the update: added files there, the changed one changed.
    let after = snapshot(&instance.install_dir);
    for path in &added {
        assert!(after.contains_key(path.as_str()), "{path} not installed");
    }
    assert_eq!(after["etc/changed.conf"].1, b"two\n");
    assert_ne!(
        tree_before["etc/changed.conf"].1,
        after["etc/changed.conf"].1
    );
    assert!(!after.contains_key("bin/only-in-1"));
    // The download went with the job.
    let shared = sandbox.daemon_state_dir().join("shared-images");
    let left: Vec<_> = std::fs::read_dir(&shared)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", shared.display());

    // Planned again, the instance runs that image already.
    let again = plan(connection, &request(&v2, &[&instance.id], false))
        .await
        .unwrap();
    assert_eq!(
        again["instances"][0]["action"], "already-installed",
        "{again:#}"
    );
}

/// A rootful instance too: the plan reads its root storage's place, and its update loads the
/// plan's download instead of pulling (the registry serves no blob), ending as a pull would.
#[tokio::test(flavor = "multi_thread")]
async fn a_rootful_instance_updates_from_the_plans_download() {
    let s = changing_module().rootful("planned", 1, "1.0").start().await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let v2 = s.url("2.0");
    let planned = plan(connection, &request(&v2, &[&instance.id], false))
        .await
        .unwrap();
    let item = &planned["instances"][0];
    assert_eq!(item["action"], "update", "{planned:#}");
    assert_eq!(strings(&item["scripts"]), ["10first", "30second"]);
    let offset = sandbox.registry_log_offset().unwrap();
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let traffic = sandbox.registry_traffic_since(offset).unwrap();
    assert!(
        traffic.blob_downloads.is_empty(),
        "the update downloaded again after the plan: {traffic:?}"
    );
    let result = run.instance(&instance.id);
    assert_eq!(result["new_image_digest"], item["new_digest"]);
    assert_eq!(result["files_removed"], item["files"]["removed"]);
    // The previous version is kept (the default): its images stay, as the plan said.
    assert_eq!(strings(&item["images_removed"]), Vec::<String>::new());
    assert_eq!(result["images_removed"], item["images_removed"]);
    let env = instance.read_env().unwrap();
    assert_eq!(env["IMAGE_URL"], v2);
    assert_eq!(
        Some(env["IMAGE_DIGEST"].as_str()),
        item["new_digest"].as_str()
    );
}

/// Downgrade and another module's image are refused per instance in the plan, with the array
/// UpdateModule refuses the request with; allow_downgrade plans the update.
#[tokio::test(flavor = "multi_thread")]
async fn the_plan_refuses_a_downgrade_and_another_module_as_update_module_does() {
    let s = Scenario::new()
        .module("planver", &["1.0", "2.0"])
        .image("other", module_image("planother", "3.0", &[]))
        .rootless("planver", 1, "2.0")
        .start()
        .await;
    let (connection, instance) = (s.bus(), &s.instances[0]);
    let [v1, v2, other] = ["1.0", "2.0", "other"].map(|key| s.url(key));
    for (url, kind) in [
        (&v1, "module_url_downgrade"),
        (&other, "module_url_other_module"),
    ] {
        let body = request(url, &[&instance.id], false);
        let planned = plan(connection, &body).await.unwrap();
        let item = &planned["instances"][0];
        assert_eq!(item["action"], "refused", "{planned:#}");
        assert_eq!(item["refused"][0]["error"], kind, "{planned:#}");
        assert_eq!(item["refused"][0]["current"], v2.as_str());
        let (name, message) = refusal(submit(connection, &body).await);
        assert_eq!(name, "org.nethserver.ModuleUpdater.Error.ValidationFailed");
        let array: Value = serde_json::from_str(&message).unwrap();
        assert_eq!(array, planned["refused"], "{planned:#}");
    }
    let allowed = serde_json::json!(
        {"module_url": v1, "instances": [instance.id], "allow_downgrade": true}
    );
    let planned = plan(connection, &allowed.to_string()).await.unwrap();
    assert_eq!(planned["instances"][0]["action"], "update", "{planned:#}");
    assert_eq!(planned["refused"], Value::Array(Vec::new()));
    let manager = ModuleUpdaterProxy::new(connection).await.unwrap();
    assert!(
        manager.list_jobs().await.unwrap().is_empty(),
        "a job was created"
    );
}

/// An instance a running job holds: the plan refuses it with the array UpdateModule's `Busy`
/// carries (the job that holds it), and still plans the instance that is free.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_instance_is_refused_in_the_plan_as_update_module_refuses_it() {
    let s = Scenario::new()
        .module("planbusy", &["1.0"])
        .image(
            "2.0",
            module_image("planbusy", "2.0", &[]).file(
                "update-module.d/50sleep",
                "#!/bin/sh\nsleep 300\n",
                0o755,
            ),
        )
        .rootless("planbusy", 2, "1.0")
        .start()
        .await;
    let (connection, v2) = (s.bus(), s.url("2.0"));
    let [held, free] = &s.instances[..] else {
        unreachable!()
    };
    let job = submit(connection, &request(&v2, &[&held.id], false))
        .await
        .unwrap();

    let both = request(&v2, &[&held.id, &free.id], false);
    let planned = plan(connection, &both).await.unwrap();
    let (name, message) = refusal(submit(connection, &both).await);
    assert_eq!(name, "org.nethserver.ModuleUpdater.Error.Busy");
    let array: Value = serde_json::from_str(&message).unwrap();
    assert_eq!(array, planned["refused"], "{planned:#}");
    assert_eq!(array[0]["error"], "action_already_running");
    assert_eq!(array[0]["job"], job.as_str());
    assert_eq!(planned["instances"][0]["action"], "refused");
    assert_eq!(planned["instances"][1]["action"], "update", "{planned:#}");
    assert_eq!(strings(&planned["instances"][1]["scripts"]), ["50sleep"]);

    let proxy = module_updater_dbus::JobProxy::builder(connection)
        .path(job)
        .build()
        .await
        .unwrap();
    proxy.cancel().await.unwrap();
}

/// Malformed and hostile requests: PlanUpdate answers each with the very error UpdateModule
/// gives (name and validation array), through busctl as well.
#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_same_errors_from_plan_and_update() {
    let s = Scenario::new().bare("planbad", 1).start().await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let id = instance.id.as_str();
    let huge = format!(
        r#"{{"module_url":"r/m:1","instances":["{id}"],"pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let deep = format!(
        r#"{{"module_url":"r/m:1","instances":["{id}"],"x":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let bad: Vec<String> = vec![
        "{".into(),
        "[]".into(),
        "null".into(),
        r#"{"instances":["a1"]}"#.into(),
        format!(r#"{{"module_url":"","instances":["{id}"]}}"#),
        format!(r#"{{"module_url":"--privileged","instances":["{id}"]}}"#),
        format!(r#"{{"module_url":"a/b:1\n--rm","instances":["{id}"]}}"#),
        format!(r#"{{"module_url":"a b/c:1","instances":["{id}"]}}"#),
        r#"{"module_url":"r/m:1","instances":[]}"#.into(),
        r#"{"module_url":"r/m:1","instances":["../../etc1"]}"#.into(),
        r#"{"module_url":"r/m:1","instances":["nosuch1"]}"#.into(),
        format!(r#"{{"module_url":"r/m:1","instances":["{id}","{id}"]}}"#),
        format!(r#"{{"module_url":"r/m:1","instances":["{id}"],"force":"yes"}}"#),
        format!(r#"{{"module_url":"r/m:1","instances":["{id}"],"allow_downgrade":1}}"#),
        huge,
        deep,
    ];
    for body in &bad {
        let planned = refusal(plan(connection, body).await);
        let updated = refusal(submit(connection, body).await);
        assert_eq!(planned, updated, "{}", &body[..body.len().min(120)]);
        assert_eq!(
            planned.0, "org.nethserver.ModuleUpdater.Error.ValidationFailed",
            "{body:.120}"
        );
    }
    // busctl, a client we did not write: the same array for a bad request, a plan for a good one.
    let out = busctl(
        sandbox,
        &[
            "call",
            "org.nethserver.ModuleUpdater",
            "/org/nethserver/ModuleUpdater",
            "org.nethserver.ModuleUpdater",
            "PlanUpdate",
            "s",
            r#"{"module_url":"r/m:1","instances":["nosuch1"]}"#,
        ],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("instances_instance_not_found"), "{stderr}");
    let manager = ModuleUpdaterProxy::new(connection).await.unwrap();
    assert!(
        manager.list_jobs().await.unwrap().is_empty(),
        "a job was created"
    );
    let features = manager.features().await.unwrap();
    assert!(features.iter().any(|f| f == "plan"), "{features:?}");
}

/// The instance's storage on a small filesystem (a tmpfs mounted before its user's first podman
/// command): the plan says which filesystem lacks how many bytes, and UpdateModule refuses the
/// same way before any job exists. busctl and the client's --dry-run say it too.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_filesystem_refuses_the_update_and_the_plan_says_why() {
    // The instance is installed by the test, once its storage is on the small filesystem.
    let mut s = Scenario::new()
        .module("planspace", &["1.0"])
        .image(
            "2.0",
            module_image("planspace", "2.0", &[]).file(
                "share/big.bin",
                incompressible(6 << 20),
                0o644,
            ),
        )
        .bare("planspace", 1)
        .without_daemon()
        .start()
        .await;
    let instance = s.instances[0].clone();
    let storage = instance.home.join(".local/share/containers/storage");
    let _mount = Tmpfs::mount(&storage, 4 << 20, &instance);
    s.sandbox.install(&instance, &s.url("1.0")).unwrap();
    s.start_daemon();
    let (sandbox, connection, v2) = (&s.sandbox, s.bus(), s.url("2.0"));
    let body = request(&v2, &[&instance.id], false);

    let planned = plan(connection, &body).await.unwrap();
    let item = &planned["instances"][0];
    assert_eq!(item["action"], "refused", "{planned:#}");
    let refused = &item["refused"][0];
    assert_eq!(
        refused["error"], "instances_insufficient_space",
        "{planned:#}"
    );
    assert_eq!(refused["field"], "instances.0");
    assert_eq!(refused["value"], instance.id.as_str());
    assert_eq!(refused["filesystem"], storage.display().to_string());
    let (needed, available) = (
        refused["needed"].as_u64().unwrap(),
        refused["available"].as_u64().unwrap(),
    );
    assert!(needed >= 6 << 20 && available < needed, "{refused}");
    assert!(available <= 4 << 20, "{refused}");
    let (name, message) = refusal(submit(connection, &body).await);
    assert_eq!(name, "org.nethserver.ModuleUpdater.Error.ValidationFailed");
    let array: Value = serde_json::from_str(&message).unwrap();
    assert_eq!(array, planned["refused"]);
    let manager = ModuleUpdaterProxy::new(connection).await.unwrap();
    assert!(
        manager.list_jobs().await.unwrap().is_empty(),
        "a job was created"
    );

    // busctl gets the plan as a string.
    let out = busctl(
        sandbox,
        &[
            "--json=short",
            "call",
            "org.nethserver.ModuleUpdater",
            "/org/nethserver/ModuleUpdater",
            "org.nethserver.ModuleUpdater",
            "PlanUpdate",
            "s",
            &body,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let from_busctl: Value = serde_json::from_str(reply["data"][0].as_str().unwrap()).unwrap();
    assert_eq!(from_busctl["refused"], planned["refused"]);

    // The client's dry runs: text naming the filesystem and the bytes, exit code 10; the JSON.
    let out = sandbox
        .client()
        .unwrap()
        .args(["update", "--dry-run", &v2, &instance.id])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(10), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("{}: refused", instance.id)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "refused: instances_insufficient_space: {} needs",
            storage.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("({needed} bytes)")), "{stdout}");
    assert!(stdout.contains("share/big.bin"), "{stdout}");
    let out = sandbox
        .client()
        .unwrap()
        .args([
            "--json",
            "run",
            "update-module",
            "--dry-run",
            "--data",
            &body,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(10), "{}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["refused"], planned["refused"]);
    assert!(
        manager.list_jobs().await.unwrap().is_empty(),
        "a job was created"
    );
}

/// PlanUpdate is gated as UpdateModule is, with the same polkit action and details: a user
/// without a rule is refused, with the same message; a rule granting the update of one
/// instance lets that user plan that update, and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn polkit_gates_the_plan_as_the_update() {
    let mut s = Scenario::new()
        .module("plangate", &["1.0", "2.0"])
        .rootless("plangate", 2, "1.0")
        .bare("carol", 1)
        .polkit()
        .build();
    let mut polkit = s.polkit.take().unwrap();
    let sandbox = &s.sandbox;
    let [target, other, carol] = &s.instances[..] else {
        unreachable!()
    };
    let v2 = s.url("2.0");
    let call = |method: &str, body: &str| {
        let address = sandbox.bus_address();
        let method = format!("org.nethserver.ModuleUpdater.{method}");
        let argv = [
            "gdbus",
            "call",
            "--address",
            &address,
            "--dest",
            "org.nethserver.ModuleUpdater",
            "--object-path",
            "/org/nethserver/ModuleUpdater",
            "--method",
            &method,
            body,
        ];
        sandbox.run_as(carol, &argv).unwrap()
    };
    let body = request(&v2, &[&target.id], false);
    let planned = call("PlanUpdate", &body);
    let updated = call("UpdateModule", &body);
    assert!(!planned.status.success() && !updated.status.success());
    let denied = text(&planned.stderr);
    assert!(
        denied.contains("org.freedesktop.DBus.Error.AccessDenied")
            && denied.contains(ACTION_UPDATE_MODULE),
        "{denied}"
    );
    assert_eq!(denied, text(&updated.stderr));

    let group = polkit.add_group("plangate").unwrap();
    polkit.add_member(&group, carol).unwrap();
    let rule = format!(
        r#"polkit.addRule(function(action, subject) {{
    if (action.id == "{ACTION_UPDATE_MODULE}" && subject.isInGroup("{group}") &&
        action.lookup("instances") == "{id}") {{
        return polkit.Result.YES;
    }}
}});"#,
        id = target.id
    );
    polkit.add_rule("plan-gate", &rule).unwrap();
    let details = [
        ("module_url", v2.as_str()),
        ("instances", target.id.as_str()),
    ];
    let process = polkit.subject_process(carol).unwrap();
    polkit
        .wait_for(ACTION_UPDATE_MODULE, &process, &details, true)
        .unwrap();
    let planned = call("PlanUpdate", &body);
    assert!(planned.status.success(), "{}", text(&planned.stderr));
    assert!(
        text(&planned.stdout).contains("\"action\":\"update\""),
        "{}",
        text(&planned.stdout)
    );
    let elsewhere = call("PlanUpdate", &request(&v2, &[&other.id], false));
    assert!(
        text(&elsewhere.stderr).contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{}",
        text(&elsewhere.stderr)
    );
}

/// `len` bytes no compressor shrinks (xorshift), so that sizes in the registry and on disk agree.
fn incompressible(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A tmpfs of `size` bytes at `path`, owned by the instance's user, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: u64, instance: &Instance) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let options = format!(
            "size={size},mode=0700,uid={},gid={}",
            instance.uid, instance.gid
        );
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(path)
            .status()
            .expect("mount(8) from util-linux (apt-get install mount)");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            path.display()
        );
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .status();
    }
}
