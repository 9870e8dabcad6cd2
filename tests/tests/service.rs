//! End-to-end tests of the D-Bus service, driven mostly by clients we did not write (busctl,
//! gdbus) so they prove the wire contract, not only our proxy.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use module_updater_tests::{ImageSpec, Instance, Sandbox};

const NAME: &str = "org.nethserver.ModuleUpdater";
const PATH: &str = "/org/nethserver/ModuleUpdater";

/// Whether `user` runs a process whose command line matches `pattern` (`pgrep -f`).
fn runs(user: &str, pattern: &str) -> bool {
    Command::new("pgrep")
        .args(["-u", user, "-f", pattern])
        .output()
        .unwrap()
        .status
        .success()
}

/// Waits (a minute at most) until `user` runs `pattern`, then cancels the job with busctl and
/// follows it to its end.
async fn cancel_once_running(
    sandbox: &Sandbox,
    connection: &zbus::Connection,
    stream: &mut zbus::MessageStream,
    path: zbus::OwnedObjectPath,
    user: &str,
    pattern: &str,
) -> JobRun {
    let started = Instant::now();
    while !runs(user, pattern) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`{pattern}` never ran as {user}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = busctl(
        sandbox,
        &[
            "call",
            NAME,
            path.as_str(),
            "org.nethserver.ModuleUpdater.Job",
            "Cancel",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    follow(connection, stream, path).await
}

/// `busctl call ... UpdateModule s <request>`.
fn update_module_with_busctl(sandbox: &Sandbox, request: &str) -> std::process::Output {
    busctl(
        sandbox,
        &["call", NAME, PATH, NAME, "UpdateModule", "s", request],
    )
}

/// The error name and the validation array of a refused request, as gdbus reports them.
fn refused(sandbox: &Sandbox, request: &str) -> (String, serde_json::Value) {
    let out = gdbus_call(
        sandbox,
        PATH,
        "org.nethserver.ModuleUpdater.UpdateModule",
        &[request],
    );
    assert!(!out.status.success(), "accepted: {request}");
    let stderr = text(&out.stderr);
    // "GDBus.Error:org.nethserver.ModuleUpdater.Error.ValidationFailed: [...]"
    let rest = stderr
        .split("GDBus.Error:")
        .nth(1)
        .unwrap_or_else(|| panic!("{stderr}"));
    let (name, message) = rest.split_once(": ").unwrap();
    (
        name.to_owned(),
        serde_json::from_str(message.trim()).unwrap_or_else(|e| panic!("{e}: {message}")),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn validation_errors_busy_and_instance_queries() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("valid", "1.0"))
        .image(
            "slow",
            ImageSpec::module("valid", "2.0").file(
                "update-module.d/50slow",
                "#!/bin/sh\nsleep 5\n",
                0o755,
            ),
        )
        .rootless("valid", 1, "1.0")
        .build();
    let (sandbox, instance) = (&s.sandbox, &s.instances[0]);
    let [v1, slow] = ["1.0", "slow"].map(|key| s.url(key));
    let id = instance.id.as_str();

    let cases: Vec<(String, &str, &str, &str)> = vec![
        (
            format!(r#"{{"instances":["{id}"]}}"#),
            "module_url",
            "module_url",
            "module_url_required",
        ),
        (
            format!(r#"{{"module_url":"{v1}"}}"#),
            "instances",
            "instances",
            "instances_required",
        ),
        (
            format!(r#"{{"module_url":"{v1}","instances":[]}}"#),
            "instances",
            "instances",
            "instances_array_min_items",
        ),
        (
            format!(r#"{{"module_url":"{v1}","instances":["mail"]}}"#),
            "instances.0",
            "instances",
            "instances_pattern",
        ),
        (
            format!(r#"{{"module_url":5,"instances":["{id}"]}}"#),
            "module_url",
            "module_url",
            "module_url_invalid_type",
        ),
        (
            format!(r#"{{"module_url":"","instances":["{id}"]}}"#),
            "module_url",
            "module_url",
            "module_url_string_gte",
        ),
        (
            format!(r#"{{"module_url":"{v1}","instances":["x"]}}"#),
            "instances.0",
            "instances",
            "instances_string_gte",
        ),
        (
            format!(r#"{{"module_url":"{v1}","instances":["{id}","{id}"]}}"#),
            "instances.1",
            "instances",
            "instances_duplicate_instance",
        ),
        (
            format!(r#"{{"module_url":"{v1}","instances":["nosuch9"]}}"#),
            "instances.0",
            "instances",
            "instances_instance_not_found",
        ),
        (
            format!(r#"{{"module_url":"{v1}","instances":["../x1"]}}"#),
            "instances.0",
            "instances",
            "instances_instance_not_found",
        ),
        (
            format!(r#"{{"module_url":"--privileged","instances":["{id}"]}}"#),
            "module_url",
            "module_url",
            "module_url_pattern",
        ),
        (
            "{not json".to_owned(),
            "(root)",
            "(root)",
            "(root)_invalid_json",
        ),
        (
            format!(
                r#"{{"module_url":"{v1}","instances":["{id}"],"pad":"{}"}}"#,
                "x".repeat(70_000)
            ),
            "(root)",
            "(root)",
            "(root)_too_large",
        ),
    ];
    for (request, field, parameter, error) in &cases {
        let (name, array) = refused(sandbox, request);
        assert_eq!(
            name, "org.nethserver.ModuleUpdater.Error.ValidationFailed",
            "{request}"
        );
        let item = &array[0];
        assert_eq!(item["field"], *field, "{request}: {array}");
        assert_eq!(item["parameter"], *parameter, "{request}: {array}");
        assert_eq!(item["error"], *error, "{request}: {array}");
    }
    // No job exists after all those refusals.
    let out = busctl(sandbox, &["call", NAME, PATH, NAME, "ListJobs"]);
    assert_eq!(text(&out.stdout).trim(), "ao 0");

    // Instances as busctl sees them.
    let out = busctl(sandbox, &["call", NAME, PATH, NAME, "ListInstances"]);
    let listing = text(&out.stdout);
    assert!(listing.starts_with("a(ssso) 1 "), "{listing}");
    assert!(
        listing.contains(&format!("\"{id}\" \"{v1}\" \"idle\" \"/\"")),
        "{listing}"
    );
    let out = busctl(
        sandbox,
        &[
            "--json=short",
            "call",
            NAME,
            PATH,
            NAME,
            "GetInstance",
            "s",
            id,
        ],
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["data"][0]["MODULE_ID"], id);
    assert_eq!(info["data"][0]["IMAGE_URL"], v1.as_str());
    assert_eq!(info["data"][0]["rootless"], "true");
    assert_eq!(info["data"][0]["uid"], instance.uid.to_string());
    let out = gdbus_call(
        sandbox,
        PATH,
        "org.nethserver.ModuleUpdater.GetInstance",
        &["nosuch1"],
    );
    assert!(
        text(&out.stderr).contains("org.nethserver.ModuleUpdater.Error.NoSuchInstance"),
        "{}",
        text(&out.stderr)
    );

    // Busy: a second request for an instance in a running job names the job that holds it.
    let out = update_module_with_busctl(sandbox, &request(&slow, &[id], false));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job = text(&out.stdout)
        .trim()
        .trim_start_matches("o ")
        .trim_matches('"')
        .to_owned();
    assert!(
        job.starts_with("/org/nethserver/ModuleUpdater/job/"),
        "{job}"
    );
    let (name, array) = refused(sandbox, &request(&slow, &[id], false));
    assert_eq!(name, "org.nethserver.ModuleUpdater.Error.Busy");
    assert_eq!(array[0]["error"], "action_already_running");
    assert_eq!(array[0]["value"], id);
    assert_eq!(array[0]["job"], job.as_str());
    let listing = text(&busctl(sandbox, &["call", NAME, PATH, NAME, "ListInstances"]).stdout);
    assert!(
        listing.contains(&format!("\"updating\" \"{job}\"")),
        "{listing}"
    );
    // Properties of the job through busctl.
    let out = busctl(
        sandbox,
        &[
            "get-property",
            NAME,
            &job,
            "org.nethserver.ModuleUpdater.Job",
            "Action",
            "Instances",
            "CallerUid",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        format!("s \"update-module\"\nas 1 \"{id}\"\nu 0\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_instance_job_with_one_failure_then_restart_and_cancel() {
    let picky = "#!/bin/sh\n[ -e \"$AGENT_STATE_DIR/fail-me\" ] && exit 7\nexit 0\n";
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("pair", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("pair", "2.0")
                .file(
                    "update-module.d/20talk",
                    "#!/bin/sh\necho \"hello from $MODULE_ID\"\n",
                    0o755,
                )
                .file("actions/update-module/70picky", picky, 0o755),
        )
        .image(
            "3.0",
            ImageSpec::module("pair", "3.0").file(
                "update-module.d/50sleep",
                "#!/bin/sh\nsleep 300\n",
                0o755,
            ),
        )
        .rootless("pair", 2, "1.0")
        .prepare(|_, _, instances| {
            std::fs::write(instances[1].state_dir.join("fail-me"), "").unwrap();
        })
        .start()
        .await;
    let daemon = s.daemon.take().unwrap();
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [a, b] = &s.instances[..] else {
        unreachable!()
    };
    let [v2, v3] = ["2.0", "3.0"].map(|key| s.url(key));

    // JobFinished reaches a client that subscribed before calling.
    let manager = module_updater_dbus::ModuleUpdaterProxy::new(connection)
        .await
        .unwrap();
    let mut finished =
        futures_util::StreamExt::boxed(manager.receive_job_finished().await.unwrap());
    let run = run_job(connection, &request(&v2, &[&a.id, &b.id], false)).await;
    assert_eq!(run.status, "aborted");
    assert_eq!(run.exit_code, 1);
    assert_eq!(run.instance(&a.id)["status"], "completed");
    let failed = run.instance(&b.id);
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["step"], "module-step");
    assert!(
        failed["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("exit code 7"),
        "{failed:#}"
    );
    assert!(
        run.messages_of(&a.id)
            .contains(&format!("hello from {}", a.id))
    );
    for id in [&a.id, &b.id] {
        let p = run.progress_of(id);
        assert!(p.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
        assert_eq!(p.last(), Some(&100), "{id}: {p:?}");
    }
    let signal = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::StreamExt::next(&mut finished),
    )
    .await
    .unwrap()
    .unwrap();
    let args = signal.args().unwrap();
    assert_eq!(args.job().as_str(), run.path.as_str());
    assert_eq!(args.status(), "aborted");

    // The result is still there after the end, through busctl, and after a restart.
    let job = run.path.as_str().to_owned();
    let result_via_busctl = |sandbox: &Sandbox| {
        let out = busctl(
            sandbox,
            &[
                "--json=short",
                "call",
                NAME,
                &job,
                "org.nethserver.ModuleUpdater.Job",
                "GetResult",
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_str::<serde_json::Value>(reply["data"][0].as_str().unwrap()).unwrap()
    };
    assert_eq!(result_via_busctl(sandbox), run.result);
    assert!(daemon.stop().unwrap().success());
    let daemon = start_daemon(sandbox, &[]);
    assert_eq!(
        result_via_busctl(sandbox),
        run.result,
        "the result survives a restart"
    );

    // Cancel a job whose script sleeps: the instance ends cancelled, the script is gone.
    std::fs::remove_file(b.state_dir.join("fail-me")).unwrap();
    let connection = connect(sandbox).await;
    let mut stream = subscribe(&connection).await;
    let path = submit(&connection, &request(&v3, &[&a.id], false))
        .await
        .unwrap();
    let next_id: u64 = path.as_str().rsplit('/').next().unwrap().parse().unwrap();
    let old_id: u64 = job.rsplit('/').next().unwrap().parse().unwrap();
    assert!(next_id > old_id, "job ids are never reused across restarts");
    let run =
        cancel_once_running(sandbox, &connection, &mut stream, path, &a.id, "sleep 300").await;
    assert_eq!(run.status, "aborted");
    assert_eq!(
        run.instance(&a.id)["status"],
        "cancelled",
        "{:#}",
        run.result
    );
    assert!(!runs(&a.id, "sleep 300"), "the cancelled script still runs");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_mid_job_reports_it_interrupted_and_the_rerun_completes() {
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("crash", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("crash", "2.0")
                .file(
                    "update-module.d/40count",
                    "#!/bin/sh\necho run >> runs\n",
                    0o755,
                )
                .file(
                    "update-module.d/50wait",
                    "#!/bin/sh\n[ -e done-waiting ] || sleep 300\n",
                    0o755,
                ),
        )
        .rootless("crash", 1, "1.0")
        .start()
        .await;
    let mut daemon = s.daemon.take().unwrap();
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let v2 = s.url("2.0");
    let path = submit(connection, &request(&v2, &[&instance.id], false))
        .await
        .unwrap();
    let started = Instant::now();
    while !instance.state_dir.join("runs").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the scripts never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.kill();
    // The worker dies with the daemon (and its script with it).
    let started = Instant::now();
    while Command::new("pgrep")
        .args(["-u", &instance.id, "-f", "module-updaterd --worker"])
        .status()
        .unwrap()
        .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the worker outlived the daemon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(instance.state_dir.join("done-waiting"), "").unwrap();

    let _daemon = start_daemon(sandbox, &[]);
    let connection = connect(sandbox).await;
    let job = module_updater_dbus::JobProxy::builder(&connection)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(job.status().await.unwrap(), "aborted");
    assert_eq!(job.exit_code().await.unwrap(), 1);
    let result: serde_json::Value = serde_json::from_str(&job.get_result().await.unwrap()).unwrap();
    assert_eq!(result["error"], "interrupted");
    assert_eq!(result["instances"][&instance.id]["status"], "failed");
    let listing = text(&busctl(sandbox, &["call", NAME, PATH, NAME, "ListInstances"]).stdout);
    assert!(
        listing.contains("\"idle\""),
        "the instance is free: {listing}"
    );

    // The same request again completes, scripts included, although IMAGE_URL is already 2.0.
    let run = run_job(&connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "completed",
        "{:#}",
        run.result
    );
    assert_eq!(
        std::fs::read_to_string(instance.state_dir.join("runs")).unwrap(),
        "run\nrun\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_job_and_idle_exit() {
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("term", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("term", "2.0").file(
                "update-module.d/50sleep",
                "#!/bin/sh\nsleep 300\n",
                0o755,
            ),
        )
        .rootless("term", 1, "1.0")
        .start()
        .await;
    let daemon = s.daemon.take().unwrap();
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let v2 = s.url("2.0");
    let path = submit(connection, &request(&v2, &[&instance.id], false))
        .await
        .unwrap();
    let started = Instant::now();
    while !Command::new("pgrep")
        .args(["-u", &instance.id, "-f", "sleep 300"])
        .status()
        .unwrap()
        .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the script never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = daemon.stop().unwrap();
    assert!(
        status.success(),
        "SIGTERM during a job must exit 0: {status}"
    );
    assert!(
        !Command::new("pgrep")
            .args(["-u", &instance.id, "-f", "sleep 300"])
            .status()
            .unwrap()
            .success()
    );

    // The job was cancelled and recorded; a new daemon serves its result.
    let mut idle = start_daemon(sandbox, &["--idle-timeout", "2"]);
    let connection = connect(sandbox).await;
    let job = module_updater_dbus::JobProxy::builder(&connection)
        .path(path)
        .build()
        .await
        .unwrap();
    assert_eq!(job.status().await.unwrap(), "aborted");
    let result: serde_json::Value = serde_json::from_str(&job.get_result().await.unwrap()).unwrap();
    assert_eq!(
        result["instances"][&instance.id]["status"], "cancelled",
        "{result:#}"
    );
    drop(connection);
    // With nothing to do and nobody calling, it exits by itself.
    let status = idle.wait(Duration::from_secs(20)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "the idle daemon did not exit 0: {status:?}"
    );
}

/// Every interface of the contract (Manager, Job, Instance) is compared with its committed
/// snapshot, so any change of names, signatures or annotations fails here first.
#[tokio::test(flavor = "multi_thread")]
async fn the_introspection_matches_the_committed_contract() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("shape", "1.0"))
        .rootless("shape", 1, "1.0")
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let v1 = s.url("1.0");
    let run = run_job(connection, &request(&v1, &[&instance.id], false)).await;
    let instance_path = module_updater_dbus::instance_path(&instance.id);
    let mut changed = Vec::new();
    for (path, interface, file) in [
        (PATH, "org.nethserver.ModuleUpdater", "manager.xml"),
        (
            run.path.as_str(),
            "org.nethserver.ModuleUpdater.Job",
            "job.xml",
        ),
        (
            instance_path.as_str(),
            "org.nethserver.ModuleUpdater.Instance",
            "instance.xml",
        ),
    ] {
        let out = busctl(sandbox, &["introspect", "--xml-interface", NAME, path]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let xml = text(&out.stdout);
        let actual = extract_interface(&xml, interface);
        let snapshots = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/snapshots");
        let expected = std::fs::read_to_string(format!("{snapshots}/{file}")).unwrap_or_default();
        if actual.trim() != expected.trim() {
            let new = format!("{snapshots}/{file}.new");
            std::fs::write(&new, format!("{}\n", actual.trim())).unwrap();
            changed.push(format!("{interface} (now in {new})"));
        }
    }
    assert!(
        changed.is_empty(),
        "the contract changed: {changed:?}; update docs/dbus-api.md, dbus/src/proxy.rs and the \
         snapshots"
    );
    // The ObjectManager is on the manager's object.
    let out = busctl(sandbox, &["introspect", "--xml-interface", NAME, PATH]);
    assert!(
        text(&out.stdout).contains("<interface name=\"org.freedesktop.DBus.ObjectManager\">"),
        "{}",
        text(&out.stdout)
    );
}

/// The `<interface name="NAME">...</interface>` element of an introspection document.
fn extract_interface(xml: &str, name: &str) -> String {
    let start = xml
        .find(&format!("<interface name=\"{name}\">"))
        .unwrap_or_else(|| panic!("{name} not in {xml}"));
    let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
    xml[start..end].to_owned()
}

/// The daemon answers instance queries from memory (issue 7): an instance added while it runs
/// and an `IMAGE_URL` rewritten behind its back (in place, same size, right after a call; or by
/// a rename, as NS8's agent writes) show in the very next `ListInstances` and `GetInstance`.
#[tokio::test(flavor = "multi_thread")]
async fn instance_queries_see_new_instances_and_changed_environments_at_once() {
    let env_text = |registry: &str, id: &str, tag: &str| {
        format!("IMAGE_URL={registry}/fresh:{tag}\nMODULE_ID={id}\n")
    };
    let mut s = Scenario::new()
        .bare("fresh", 1)
        // Written in place: the file keeps its inode and its owner, the instance user.
        .prepare(move |sandbox, _, instances| {
            let first = &instances[0];
            let text = env_text(&sandbox.registry(), &first.id, "1.0");
            std::fs::write(first.env_file(), text).unwrap();
        })
        .start()
        .await;
    let (first, connection) = (s.instances[0].clone(), s.bus().clone());
    let sandbox = &mut s.sandbox;
    let registry = sandbox.registry();
    let url_of = |tag: &str| format!("{registry}/fresh:{tag}");
    let env_text = |id: &str, tag: &str| env_text(&registry, id, tag);
    let manager = module_updater_dbus::ModuleUpdaterProxy::new(&connection)
        .await
        .unwrap();
    let listing = |listing: Vec<(String, String, String, zbus::OwnedObjectPath)>| {
        listing
            .into_iter()
            .map(|(id, url, state, job)| (id, url, state, job.as_str().to_owned()))
            .collect::<Vec<_>>()
    };
    let idle = |id: &str, url: String| (id.to_owned(), url, "idle".to_owned(), "/".to_owned());
    assert_eq!(
        listing(manager.list_instances().await.unwrap()),
        [idle(&first.id, url_of("1.0"))]
    );
    // Asked again, unchanged: the same answer.
    assert_eq!(
        listing(manager.list_instances().await.unwrap()),
        [idle(&first.id, url_of("1.0"))]
    );

    // Same size, same inode, right after the call: only the contents differ.
    std::fs::write(first.env_file(), env_text(&first.id, "2.0")).unwrap();
    // A new instance while the daemon runs (a new user in /etc/passwd, its home, its file).
    let second = sandbox.add_rootless_instance("fresh").unwrap();
    let mut expected = vec![
        idle(&first.id, url_of("2.0")),
        idle(&second.id, String::new()),
    ];
    expected.sort();
    assert_eq!(listing(manager.list_instances().await.unwrap()), expected);
    let info = manager.get_instance(&second.id).await.unwrap();
    assert_eq!(info["MODULE_ID"], second.id);
    assert_eq!(info["rootless"], "true");
    assert_eq!(info["uid"], second.uid.to_string());

    // Replaced by a rename, as NS8's agent writes it; seen by GetInstance and ListInstances.
    let temporary = second.state_dir.join(".environment.new");
    std::fs::write(&temporary, env_text(&second.id, "3.0")).unwrap();
    std::os::unix::fs::chown(&temporary, Some(second.uid), Some(second.gid)).unwrap();
    std::fs::rename(&temporary, second.env_file()).unwrap();
    let info = manager.get_instance(&second.id).await.unwrap();
    assert_eq!(info["IMAGE_URL"], url_of("3.0"));
    let out = busctl(sandbox, &["call", NAME, PATH, NAME, "ListInstances"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let busctl_listing = text(&out.stdout);
    assert!(busctl_listing.starts_with("a(ssso) 2 "), "{busctl_listing}");
    for (id, tag) in [(&first.id, "2.0"), (&second.id, "3.0")] {
        assert!(
            busctl_listing.contains(&format!("\"{id}\" \"{}\" \"idle\" \"/\"", url_of(tag))),
            "{busctl_listing}"
        );
    }

    // An environment file gone: no longer an instance, for every query and for UpdateModule.
    std::fs::remove_file(first.env_file()).unwrap();
    assert_eq!(
        listing(manager.list_instances().await.unwrap()),
        [idle(&second.id, url_of("3.0"))]
    );
    let out = gdbus_call(
        sandbox,
        PATH,
        "org.nethserver.ModuleUpdater.GetInstance",
        &[&first.id],
    );
    assert!(
        text(&out.stderr).contains("org.nethserver.ModuleUpdater.Error.NoSuchInstance"),
        "{}",
        text(&out.stderr)
    );
    let (name, array) = refused(sandbox, &request(&url_of("2.0"), &[&first.id], false));
    assert_eq!(name, "org.nethserver.ModuleUpdater.Error.ValidationFailed");
    assert_eq!(array[0]["error"], "instances_instance_not_found");
}

/// At most 1024 jobs are on the bus at once, running or lingering: with that many finished jobs
/// still lingering (recovered from their records), the next `UpdateModule` is refused with
/// `org.freedesktop.DBus.Error.LimitsExceeded` naming the limit and the way out, and no job is
/// created.
#[tokio::test(flavor = "multi_thread")]
async fn the_known_jobs_limit_refuses_a_new_job_before_it_exists() {
    use module_updaterd::jobs::{JobRecord, JobStatus, MAX_KNOWN_JOBS};
    // As many finished jobs as the daemon keeps, recorded by an earlier daemon.
    fn write_finished_jobs(sandbox: &Sandbox, images: &Images, instances: &[Instance]) {
        let (v1, instance) = (images.url("1.0"), &instances[0]);
        let jobs = sandbox.daemon_state_dir().join("jobs");
        std::fs::create_dir_all(&jobs).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        for id in 1..=MAX_KNOWN_JOBS as u64 {
            let record = JobRecord {
                id,
                action: "update-module".into(),
                request: request(&v1, &[&instance.id], false),
                instances: vec![instance.id.clone()],
                status: JobStatus::Completed,
                progress: 100,
                exit_code: 0,
                caller_uid: 0,
                started_usec: now,
                finished_usec: now,
                steps: Default::default(),
                results: Default::default(),
                error: None,
            };
            std::fs::write(
                jobs.join(format!("{id}.json")),
                serde_json::to_vec(&record).unwrap(),
            )
            .unwrap();
        }
    }
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("limits", "1.0"))
        .rootless("limits", 1, "1.0")
        .prepare(write_finished_jobs)
        .daemon(&["--job-linger", "3600"])
        .build();
    let (sandbox, instance, v1) = (&s.sandbox, &s.instances[0], s.url("1.0"));
    let jobs = sandbox.daemon_state_dir().join("jobs");

    let out = update_module_with_busctl(sandbox, &request(&v1, &[&instance.id], false));
    assert!(!out.status.success(), "accepted: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("too many jobs: 1024 are on the bus") && stderr.contains("--job-linger"),
        "{stderr}"
    );
    let out = gdbus_call(
        sandbox,
        PATH,
        "org.nethserver.ModuleUpdater.UpdateModule",
        &[&request(&v1, &[&instance.id], false)],
    );
    assert!(
        text(&out.stderr).contains("org.freedesktop.DBus.Error.LimitsExceeded"),
        "{}",
        text(&out.stderr)
    );
    let listed = text(&busctl(sandbox, &["call", NAME, PATH, NAME, "ListJobs"]).stdout);
    assert!(listed.starts_with("ao 1024 "), "{listed}");
    assert!(!jobs.join("1025.json").exists(), "a job record was written");
}

/// A cancel while podman pulls the module image: podman is stopped with the worker, and the
/// instance ends `cancelled` (not `failed` with podman's error), unchanged, with no re-run owed.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_during_the_pull_ends_the_instance_cancelled_and_unchanged() {
    let s = Scenario::new()
        .module("slowpull", &["1.0", "2.0"])
        .rootless("slowpull", 1, "1.0")
        // A podman whose pull of 2.0 takes five minutes.
        .trap("podman", |_, _, _| {
            "#!/bin/sh\ncase \" $* \" in *\" pull \"*/slowpull:2.0*) sleep 301 ;; esac\nexec /usr/bin/podman \"$@\"\n"
                .to_owned()
        })
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));
    let mut stream = subscribe(connection).await;
    let path = submit(connection, &request(&v2, &[&instance.id], false))
        .await
        .unwrap();
    let run = cancel_once_running(
        sandbox,
        connection,
        &mut stream,
        path,
        &instance.id,
        "sleep 301",
    )
    .await;
    assert_eq!(run.status, "aborted", "{:#}", run.result);
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "cancelled", "{result:#}");
    assert!(result["error"].is_null(), "{result:#}");
    assert!(
        result["warnings"].as_array().unwrap().iter().any(|w| w
            .as_str()
            .unwrap()
            .starts_with("cancelled during pull-image")),
        "{result:#}"
    );
    assert!(!runs(&instance.id, "sleep 301"), "the pull still runs");
    assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v1);
    assert!(
        !instance
            .state_dir
            .join(".module-updater.in-progress")
            .exists(),
        "nothing changed, yet a re-run is owed"
    );
}

/// A job cancelled while the daemon downloads the images once for its instances: the copy
/// stops (skopeo is killed), nothing of the download is left, no instance was touched, and the
/// next job downloads again.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_during_the_shared_download_stops_it_and_leaves_nothing() {
    let s = Scenario::new()
        .module("slowcopy", &["1.0", "2.0"])
        .rootless("slowcopy", 2, "1.0")
        // A skopeo whose copy takes five minutes while `slow` exists (the daemon kills the
        // process it started: this one is it).
        .trap("skopeo", |sandbox, _, _| {
            format!(
                "#!/bin/sh\ncase \" $* \" in *\" copy \"*) [ -f {} ] && exec sleep 302 ;; esac\nexec /usr/bin/skopeo \"$@\"\n",
                sandbox.root().join("trap/slow").display()
            )
        })
        .start()
        .await;
    let (sandbox, connection, instances) = (&s.sandbox, s.bus(), s.instances.clone());
    let (ids, [v1, v2]) = (s.ids(), ["1.0", "2.0"].map(|key| s.url(key)));
    let slow = sandbox.root().join("trap/slow");
    std::fs::write(&slow, "").unwrap();
    let mut stream = subscribe(connection).await;
    let path = submit(connection, &request(&v2, &ids, false))
        .await
        .unwrap();
    let run =
        cancel_once_running(sandbox, connection, &mut stream, path, "root", "sleep 302").await;
    assert_eq!(run.status, "aborted", "{:#}", run.result);
    for instance in &instances {
        assert_eq!(
            run.instance(&instance.id)["status"],
            "cancelled",
            "{:#}",
            run.result
        );
        assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v1);
    }
    assert!(!runs("root", "sleep 302"), "the copy still runs");
    let shared = sandbox.daemon_state_dir().join("shared-images");
    let left: Vec<_> = std::fs::read_dir(&shared)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", shared.display());

    // The next job downloads again, with the real skopeo.
    std::fs::remove_file(&slow).unwrap();
    let run = run_job(connection, &request(&v2, &ids, false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    for instance in &instances {
        let loaded = format!("Loading {v2} (downloaded once for the node)");
        let messages = run.messages_of(&instance.id);
        assert!(messages.contains(&loaded), "{}: {messages:#?}", instance.id);
        assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v2);
    }
}
