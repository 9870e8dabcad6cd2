//! Security end-to-end tests (docs/security.md): who may call (a real polkitd on the sandbox
//! bus, callers that are real non-root users), what bad input gets, what a module's code may
//! touch, and a flood of unauthorised calls. Calls are made with gdbus, a client we did not write,
//! run as the calling user.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use module_updater_dbus::{ACTION_CANCEL, ACTION_UPDATE_MODULE, JobProxy, ModuleUpdaterProxy};
use module_updater_tests::{Decision, ImageSpec, Instance, Sandbox};

const NAME: &str = "org.nethserver.ModuleUpdater";
const PATH: &str = "/org/nethserver/ModuleUpdater";
const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";
const VALIDATION_FAILED: &str = "org.nethserver.ModuleUpdater.Error.ValidationFailed";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `gdbus call` of a method of ours, as `who` (an instance's user) or as root (`None`).
fn gdbus(
    sandbox: &Sandbox,
    who: Option<&Instance>,
    path: &str,
    method: &str,
    args: &[&str],
) -> Output {
    let address = sandbox.bus_address();
    let mut argv = vec![
        "gdbus",
        "call",
        "--address",
        &address,
        "--dest",
        NAME,
        "--object-path",
        path,
        "--method",
        method,
    ];
    argv.extend(args);
    match who {
        Some(user) => sandbox.run_as(user, &argv).unwrap(),
        None => Command::new("gdbus").args(&argv[1..]).output().unwrap(),
    }
}

fn manager(method: &str) -> String {
    format!("org.nethserver.ModuleUpdater.{method}")
}

fn job_method(method: &str) -> String {
    format!("org.nethserver.ModuleUpdater.Job.{method}")
}

/// The D-Bus error name and message of a call that must have failed.
fn refusal(out: &Output) -> (String, String) {
    assert!(
        !out.status.success(),
        "the call succeeded: {}",
        text(&out.stdout)
    );
    let stderr = text(&out.stderr);
    // "Error: GDBus.Error:org.freedesktop.DBus.Error.AccessDenied: uid 1001 may not ..."
    let rest = stderr
        .split("GDBus.Error:")
        .nth(1)
        .unwrap_or_else(|| panic!("not a D-Bus error: {stderr}"));
    let (name, message) = rest.split_once(": ").unwrap_or((rest, ""));
    (name.trim().to_owned(), message.trim().to_owned())
}

fn assert_denied(out: &Output, what: &str) -> String {
    let (name, message) = refusal(out);
    assert_eq!(name, ACCESS_DENIED, "{what}: {message}");
    message
}

/// The object path gdbus printed for `(o)`: `(objectpath '/org/.../job/3',)`.
fn object_path(out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    stdout
        .split('\'')
        .nth(1)
        .unwrap_or_else(|| panic!("no object path in {stdout}"))
        .to_owned()
}

/// Waits until a script of `instance` runs `pattern` (e.g. a `sleep 300` update script).
async fn wait_for_process(instance: &Instance, pattern: &str) {
    let started = Instant::now();
    while !Command::new("pgrep")
        .args(["-u", &instance.id, "-f", pattern])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{pattern} never started as {}",
            instance.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A module image whose update script sleeps, so that its job can be cancelled.
/// Module `repo` at `tag` with an update script that sleeps for 5 minutes.
fn sleeper(repo: &str, tag: &str) -> ImageSpec {
    ImageSpec::module(repo, tag).file("update-module.d/50sleep", "#!/bin/sh\nsleep 300\n", 0o755)
}

#[tokio::test(flavor = "multi_thread")]
async fn polkit_decides_for_everyone_but_root() {
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("guard", "1.0"))
        .image("2.0", sleeper("guard", "2.0"))
        .rootless("guard", 1, "1.0")
        // Two plain non-root users (instances of another module, never updated here).
        .bare("alice", 1)
        .bare("bob", 1)
        .polkit()
        .start()
        .await;
    // The test stops the daemon and polkitd itself: it holds them.
    let (mut polkit, daemon) = (s.polkit.take().unwrap(), s.daemon.take().unwrap());
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [target, alice, bob] = &s.instances[..] else {
        unreachable!()
    };
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));
    let updater = ModuleUpdaterProxy::new(connection).await.unwrap();
    let update = request(&v2, &[&target.id], false);

    // No rule: the shipped default (auth_admin_keep) refuses a caller with no authentication
    // agent, and the daemon answers AccessDenied.
    let message = assert_denied(
        &gdbus(
            sandbox,
            Some(alice),
            PATH,
            &manager("UpdateModule"),
            &[&update],
        ),
        "UpdateModule without a rule",
    );
    assert!(
        message.contains("authentication") && message.contains(ACTION_UPDATE_MODULE),
        "{message}"
    );
    // Reading is open to every local user (docs/security.md, "The read model"): the same
    // instance through every read path, with no rule and no polkit question.
    let out = gdbus(sandbox, Some(alice), PATH, &manager("ListInstances"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&target.id));
    let out = gdbus(
        sandbox,
        Some(alice),
        PATH,
        &manager("GetInstance"),
        &[&target.id],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&v1), "{}", text(&out.stdout));
    let (name, _) = refusal(&gdbus(
        sandbox,
        Some(alice),
        PATH,
        &manager("GetInstance"),
        &["nosuch9"],
    ));
    assert_eq!(name, "org.nethserver.ModuleUpdater.Error.NoSuchInstance");
    let out = gdbus(
        sandbox,
        Some(alice),
        PATH,
        &manager("GetHistory"),
        &[&target.id],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = gdbus(
        sandbox,
        Some(alice),
        PATH,
        "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&v1), "{}", text(&out.stdout));
    assert!(updater.list_jobs().await.unwrap().is_empty());

    // A rule grants update-module to the members of a group, for this instance and registry
    // only: rules can read the request's details.
    let group = polkit.add_group("mutest").unwrap();
    polkit.add_member(&group, alice).unwrap();
    let registry = sandbox.registry();
    let rule = format!(
        r#"polkit.addRule(function(action, subject) {{
    if (action.id == "{ACTION_UPDATE_MODULE}" && subject.isInGroup("{group}") &&
        action.lookup("instances") == "{id}" &&
        action.lookup("module_url").indexOf("{registry}/") == 0) {{
        return polkit.Result.YES;
    }}
}});"#,
        id = target.id
    );
    let rule_file = polkit.add_rule("update-group", &rule).unwrap();
    let details = [
        ("module_url", v2.as_str()),
        ("instances", target.id.as_str()),
    ];
    let alice_process = polkit.subject_process(alice).unwrap();
    polkit
        .wait_for(ACTION_UPDATE_MODULE, &alice_process, &details, true)
        .unwrap();
    let bob_process = polkit.subject_process(bob).unwrap();
    assert_eq!(
        polkit
            .check(ACTION_UPDATE_MODULE, bob_process.pid(), bob.uid, &details)
            .unwrap(),
        Decision::ChallengeRequired,
        "bob is not in {group}"
    );

    // Alice may now update that instance.
    let mut stream = subscribe(connection).await;
    let out = gdbus(
        sandbox,
        Some(alice),
        PATH,
        &manager("UpdateModule"),
        &[&update],
    );
    let job = object_path(&out);
    let job_proxy = JobProxy::builder(connection)
        .path(job.as_str())
        .build()
        .await
        .unwrap();
    assert_eq!(job_proxy.caller_uid().await.unwrap(), alice.uid);
    // Only that instance: the rule reads the details.
    assert_denied(
        &gdbus(
            sandbox,
            Some(alice),
            PATH,
            &manager("UpdateModule"),
            &[&request(&v2, &[&bob.id], false)],
        ),
        "UpdateModule of an instance the rule does not name",
    );
    // A job's log so far is as open as its signals.
    let out = gdbus(
        sandbox,
        Some(bob),
        &job,
        &job_method("GetMessages"),
        &[&target.id],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Bob is not in the group: refused before the daemon looks at whether the instance is busy.
    assert_denied(
        &gdbus(
            sandbox,
            Some(bob),
            PATH,
            &manager("UpdateModule"),
            &[&update],
        ),
        "UpdateModule by a non-member",
    );

    // Cancel: bob may not cancel alice's job; alice may, without any rule.
    wait_for_process(target, "sleep 300").await;
    let message = assert_denied(
        &gdbus(sandbox, Some(bob), &job, &job_method("Cancel"), &[]),
        "Cancel of another's job",
    );
    assert!(message.contains(ACTION_CANCEL), "{message}");
    let out = gdbus(sandbox, Some(alice), &job, &job_method("Cancel"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = follow(
        connection,
        &mut stream,
        zbus::OwnedObjectPath::try_from(job.clone()).unwrap(),
    )
    .await;
    assert_eq!(run.status, "aborted");
    assert_eq!(
        run.instance(&target.id)["status"],
        "cancelled",
        "{:#}",
        run.result
    );

    // Root needs no polkit: it reads the instance, cancels alice's job, and its own job cannot
    // be cancelled by alice.
    let out = gdbus(sandbox, None, PATH, &manager("GetInstance"), &[&target.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forced = request(&v2, &[&target.id], true);
    let mut stream = subscribe(connection).await;
    let alices = object_path(&gdbus(
        sandbox,
        Some(alice),
        PATH,
        &manager("UpdateModule"),
        &[&forced],
    ));
    wait_for_process(target, "sleep 300").await;
    let out = gdbus(sandbox, None, &alices, &job_method("Cancel"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = follow(
        connection,
        &mut stream,
        zbus::OwnedObjectPath::try_from(alices).unwrap(),
    )
    .await;
    assert_eq!(run.instance(&target.id)["status"], "cancelled");
    let mut stream = subscribe(connection).await;
    let roots = object_path(&gdbus(
        sandbox,
        None,
        PATH,
        &manager("UpdateModule"),
        &[&forced],
    ));
    wait_for_process(target, "sleep 300").await;
    assert_denied(
        &gdbus(sandbox, Some(alice), &roots, &job_method("Cancel"), &[]),
        "Cancel of root's job",
    );
    let out = gdbus(sandbox, None, &roots, &job_method("Cancel"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    follow(
        connection,
        &mut stream,
        zbus::OwnedObjectPath::try_from(roots).unwrap(),
    )
    .await;

    // Every decision is in the log, with uid, pid and action.
    let log = daemon.log();
    for (uid, verdict, action, why) in [
        (alice.uid, "refused", ACTION_UPDATE_MODULE, "authentication"),
        (alice.uid, "allowed", ACTION_UPDATE_MODULE, "polkit"),
        (alice.uid, "allowed", ACTION_CANCEL, "its own job"),
        (bob.uid, "refused", ACTION_CANCEL, "authentication"),
        (alice.uid, "refused", ACTION_CANCEL, "authentication"),
        (0, "allowed", ACTION_CANCEL, "root"),
        (0, "allowed", ACTION_UPDATE_MODULE, "root"),
    ] {
        let wanted = format!("{verdict} {action} for uid {uid} (pid ");
        let line = log
            .lines()
            .find(|l| l.contains(&wanted) && l.contains(why))
            .unwrap_or_else(|| panic!("no log line {wanted:?} ... {why:?} in:\n{log}"));
        assert!(
            line.contains(&format!("MODULE_UPDATER_CALLER_UID={uid}"))
                && line.contains("MODULE_UPDATER_CALLER_PID=")
                && line.contains(&format!("MODULE_UPDATER_ACTION={action}")),
            "{line}"
        );
        let pid = line
            .split("MODULE_UPDATER_CALLER_PID=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap();
        assert!(pid.parse::<u32>().is_ok(), "{line}");
    }

    // The machine is left as it was found (checked under the machine-wide polkit lock).
    drop(alice_process);
    drop(bob_process);
    drop(daemon);
    let leftovers = polkit.stop();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!rule_file.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_polkit_only_root_may_act() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("alone", "1.0"))
        .rootless("alone", 1, "1.0")
        .bare("user", 1)
        .start()
        .await;
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [target, user] = &s.instances[..] else {
        unreachable!()
    };
    let v1 = s.url("1.0");

    // Nobody owns org.freedesktop.PolicyKit1 on this bus.
    let out = Command::new("busctl")
        .arg(format!("--address={}", sandbox.bus_address()))
        .args(["call", "org.freedesktop.DBus", "/org/freedesktop/DBus"])
        .args(["org.freedesktop.DBus", "NameHasOwner", "s"])
        .arg("org.freedesktop.PolicyKit1")
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "b false");

    let update = request(&v1, &[&target.id], false);
    let message = assert_denied(
        &gdbus(
            sandbox,
            Some(user),
            PATH,
            &manager("UpdateModule"),
            &[&update],
        ),
        "UpdateModule",
    );
    assert!(message.contains("polkit"), "{message}");
    assert!(message.contains("not running"), "{message}");
    // Reading asks nobody.
    let out = gdbus(
        sandbox,
        Some(user),
        PATH,
        &manager("GetInstance"),
        &[&target.id],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Root is not asked about: its job runs (already installed: done at once) and lingers.
    let run = run_job(connection, &update).await;
    assert_eq!(run.status, "completed");
    assert_eq!(run.instance(&target.id)["status"], "already-installed");
    let out = gdbus(sandbox, None, PATH, &manager("GetInstance"), &[&target.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Cancelling root's (finished) job is still an authorisation question for anyone else.
    assert_denied(
        &gdbus(
            sandbox,
            Some(user),
            run.path.as_str(),
            &job_method("Cancel"),
            &[],
        ),
        "Cancel of root's job",
    );
    // The read-only calls answer.
    let out = gdbus(
        sandbox,
        Some(user),
        run.path.as_str(),
        &job_method("GetResult"),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = gdbus(
        sandbox,
        Some(user),
        run.path.as_str(),
        "org.freedesktop.DBus.Properties.Get",
        &[module_updater_dbus::JOB_INTERFACE, "Status"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let address = sandbox.bus_address();
    let out = sandbox
        .run_as(
            user,
            &[
                "gdbus",
                "introspect",
                "--address",
                &address,
                "--dest",
                NAME,
                "--object-path",
                PATH,
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Anything else is stopped by the bus policy before the daemon sees it (deny by default).
    let message = assert_denied(
        &gdbus(
            sandbox,
            Some(user),
            run.path.as_str(),
            "org.freedesktop.DBus.Properties.Set",
            &[
                module_updater_dbus::JOB_INTERFACE,
                "Status",
                "<'completed'>",
            ],
        ),
        "Properties.Set",
    );
    assert!(message.contains("Rejected send message"), "{message}");
}

/// Instance ids shaped like paths: NS8's pattern (`^.+[0-9]+$`) lets them through, so they must
/// be harmless by construction: only compared with what discovery found, never joined into a path.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_refused_before_it_reaches_anything() {
    // Traps: what `<base>.join(id)` would find for the hostile ids, each looking like a valid
    // rootful instance. Were an id ever joined into a path, the daemon would accept the trap.
    fn traps(sandbox: &Sandbox) -> Vec<(&'static str, PathBuf)> {
        let rootful = sandbox.rootful_base();
        ["../x1", "a/b1", ".1", "../home/../x1"]
            .into_iter()
            .map(|id| (id, rootful.join(id).join("state/environment")))
            .collect()
    }
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("input", "1.0"))
        .rootless("input", 1, "1.0")
        .prepare(|sandbox, _, _| {
            for (id, env) in traps(sandbox) {
                std::fs::create_dir_all(env.parent().unwrap()).unwrap();
                std::fs::write(env, format!("MODULE_ID={id}\n")).unwrap();
            }
        })
        .without_daemon()
        .build();
    let traps: Vec<PathBuf> = traps(&s.sandbox).into_iter().map(|(_, env)| env).collect();
    let trap_snapshot = |traps: &[PathBuf]| -> Vec<(Vec<u8>, std::time::SystemTime)> {
        traps
            .iter()
            .map(|t| {
                (
                    std::fs::read(t).unwrap(),
                    std::fs::metadata(t).unwrap().modified().unwrap(),
                )
            })
            .collect()
    };
    let before = trap_snapshot(&traps);
    s.start_daemon();
    let mut daemon = s.daemon.take().unwrap();
    let (sandbox, instance, v1) = (&s.sandbox, &s.instances[0], s.url("1.0"));

    for id in [
        "../x1",
        "/etc1",
        "a/b1",
        ".1",
        "../home/../x1",
        "/tmp/../x1",
    ] {
        let (name, message) = refusal(&gdbus(
            sandbox,
            None,
            PATH,
            &manager("UpdateModule"),
            &[&request(&v1, &[id], false)],
        ));
        assert_eq!(name, VALIDATION_FAILED, "{id}: {message}");
        let array: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(array[0]["error"], "instances_instance_not_found", "{id}");
        assert_eq!(array[0]["value"], id);
        for method in ["GetInstance", "GetHistory"] {
            let (name, _) = refusal(&gdbus(sandbox, None, PATH, &manager(method), &[id]));
            assert_eq!(
                name, "org.nethserver.ModuleUpdater.Error.NoSuchInstance",
                "{method} {id}"
            );
        }
    }
    assert!(!Path::new("/etc1").exists());
    assert_eq!(trap_snapshot(&traps), before, "a trap was written");
    let listing = text(&gdbus(sandbox, None, PATH, &manager("ListInstances"), &[]).stdout);
    for id in ["../x1", "a/b1", ".1", "../home/../x1"] {
        assert!(!listing.contains(&format!("'{id}'")), "{listing}");
    }

    // Image references podman could misread, or that are no references at all (sent with our
    // proxy: gdbus would interpret the escapes of a JSON string argument).
    let connection = connect(sandbox).await;
    let updater = ModuleUpdaterProxy::new(&connection).await.unwrap();
    for url in [
        "-x",
        "--privileged",
        "--root=/",
        "a b/c:1",
        "a/b:1 --rm",
        "a\tb/c:1",
        "a/b:1\n--rm",
        "a/b\u{7}:1",
        "a/b:1\u{85}",
        "a/b:1\u{2028}",
        "::::",
        "/etc/shadow",
        "../../x:1",
        "UPPER/Case:1",
        "a/b@sha256:1234",
        "docker://a/b:1",
    ] {
        let err = updater
            .update_module(&request(url, &[&instance.id], false))
            .await
            .unwrap_err();
        let module_updater_dbus::Error::ValidationFailed(message) =
            module_updater_dbus::Error::from(err)
        else {
            panic!("{url:?}: not ValidationFailed");
        };
        let array: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(array[0]["error"], "module_url_pattern", "{url:?}: {array}");
        assert_eq!(array[0]["value"], url);
    }

    // Sizes and shapes refused before any work: over 64 KiB (here 1 MiB), over 1,000
    // instances, nesting deeper than the JSON parser's limit.
    let many: Vec<String> = (0..1001).map(|i| format!("m{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let deep = format!(
        r#"{{"module_url":"{v1}","instances":["{}"],"x":{}{}}}"#,
        instance.id,
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    let huge = format!(
        r#"{{"module_url":"{v1}","instances":["{}"],"pad":"{}"}}"#,
        instance.id,
        "x".repeat(1 << 20)
    );
    for (raw, kind) in [
        (request(&v1, &many, false), "instances_too_large"),
        (deep, "(root)_invalid_json"),
        (huge, "(root)_too_large"),
    ] {
        let started = Instant::now();
        let err = updater.update_module(&raw).await.unwrap_err();
        let elapsed = started.elapsed();
        let module_updater_dbus::Error::ValidationFailed(message) =
            module_updater_dbus::Error::from(err)
        else {
            panic!("{kind}: not ValidationFailed");
        };
        let array: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(array[0]["error"], kind, "{array}");
        eprintln!(
            "{kind}: {} bytes refused in {:.1} ms",
            raw.len(),
            elapsed.as_secs_f64() * 1000.0
        );
    }
    assert!(updater.list_jobs().await.unwrap().is_empty());
    assert!(daemon.is_running(), "{}", daemon.log());
}

/// What an update script may touch: it runs as the instance's user with no capabilities, cannot
/// write into another instance's home, and holds no descriptor of the daemon or the worker (no
/// bus connection, not the instance lock). Rootful instances run their scripts as root (NS8's
/// semantics), but inherit nothing either.
#[tokio::test(flavor = "multi_thread")]
async fn module_code_runs_unprivileged_and_inherits_nothing() {
    let mut s = Scenario::new()
        .bare("victim", 1)
        .rootless("probe", 1, "1.0")
        .rootful("probe", 1, "1.0")
        .image("1.0", ImageSpec::module("probe", "1.0"))
        .image_for_instances("2.0", |_, instances| {
            // `exec ls` last: the listing is of a process holding exactly what the script held.
            let probe = format!(
                "#!/bin/sh\n\
             out=\"$AGENT_STATE_DIR\"\n\
             id -u > \"$out/probe.uid\"\n\
             id -G > \"$out/probe.groups\"\n\
             grep -E '^Cap(Prm|Eff|Amb):' /proc/self/status > \"$out/probe.caps\"\n\
             # Rootful modules run as root, as in NS8: only a rootless one is confined.\n\
             if [ \"$(id -u)\" != 0 ]; then\n\
               if touch {home}/pwned 2>/dev/null; then echo home >> \"$out/probe.wrote\"; fi\n\
               if echo PWNED=1 2>/dev/null >> {env}; then echo env >> \"$out/probe.wrote\"; fi\n\
             fi\n\
             exec ls -l /proc/self/fd/ > \"$out/probe.fds\"\n",
                home = instances[0].home.display(),
                env = instances[0].env_file().display(),
            );
            ImageSpec::module("probe", "2.0").file("update-module.d/10probe", probe, 0o755)
        })
        .without_daemon()
        .start()
        .await;
    let victim_before = snapshot(&s.instances[0].home);
    s.start_daemon();
    let (sandbox, connection, v2) = (&s.sandbox, s.bus(), s.url("2.0"));
    let [victim, rootless, rootful] = &s.instances[..] else {
        unreachable!()
    };
    let run = run_job(
        connection,
        &request(&v2, &[&rootless.id, &rootful.id], false),
    )
    .await;
    assert_eq!(run.status, "completed", "{:#}", run.result);

    let read = |instance: &Instance, name: &str| {
        std::fs::read_to_string(instance.state_dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", instance.id))
    };
    // The rootless instance's script: its uid and group, no capability at all.
    assert_eq!(read(rootless, "probe.uid").trim(), rootless.uid.to_string());
    assert_eq!(
        read(rootless, "probe.groups").trim(),
        rootless.gid.to_string(),
        "only the instance's own group"
    );
    let caps = read(rootless, "probe.caps");
    for line in caps.lines() {
        let (name, value) = line.split_once(':').unwrap();
        assert_eq!(
            u64::from_str_radix(value.trim(), 16).unwrap(),
            0,
            "{name} of the script: {caps}"
        );
    }
    assert_eq!(caps.lines().count(), 3, "{caps}");
    assert!(
        !rootless.state_dir.join("probe.wrote").exists(),
        "the script wrote into another instance: {}",
        read(rootless, "probe.wrote")
    );
    assert!(!victim.home.join("pwned").exists());
    assert_eq!(snapshot(&victim.home), victim_before);
    // The rootful instance's script runs as root, as in NS8.
    assert_eq!(read(rootful, "probe.uid").trim(), "0");

    // Descriptors: 0-2 and the command channel 3 are pipes (1 is the listing file); the only
    // other one is ls's own directory handle. No socket (the daemon's or the worker's bus
    // connection), not the lock file.
    for instance in [&rootless, &rootful] {
        let listing = read(instance, "probe.fds");
        let fds: Vec<(u32, String)> = listing
            .lines()
            .filter_map(|line| {
                let (left, target) = line.split_once(" -> ")?;
                let fd = left.split_whitespace().last()?.parse().ok()?;
                Some((fd, target.to_owned()))
            })
            .collect();
        let what = format!("{}: {listing}", instance.id);
        for (fd, target) in &fds {
            assert!(!target.starts_with("socket:"), "{what}");
            assert!(!target.contains(".update-module.lock"), "{what}");
            assert!(!target.contains(".environment.lock"), "{what}");
            match fd {
                0 | 2 | 3 => assert!(target.starts_with("pipe:"), "fd {fd}: {what}"),
                1 => assert!(target.ends_with("probe.fds"), "{what}"),
                _ => assert!(target.starts_with("/proc/"), "fd {fd}: {what}"),
            }
        }
        assert!(fds.iter().filter(|(fd, _)| *fd > 3).count() <= 1, "{what}");
        assert_eq!(fds.iter().filter(|(fd, _)| *fd <= 3).count(), 4, "{what}");
    }

    // podman ran as the instance's user: the new image is in the user's own storage.
    let images = sandbox
        .podman_as(
            rootless,
            &["images", "--format", "{{.Repository}}:{{.Tag}}"],
        )
        .unwrap();
    assert!(
        text(&images.stdout).contains(&v2),
        "{}",
        text(&images.stdout)
    );
}

/// One ListInstances call as root: how long it took, and how many instances it listed.
async fn timed_list(updater: &ModuleUpdaterProxy<'_>) -> (Duration, usize) {
    let started = Instant::now();
    let listed = updater
        .list_instances()
        .await
        .unwrap_or_else(|e| panic!("ListInstances failed: {e}"));
    (started.elapsed(), listed.len())
}

/// `N calls, p50, p99, max` of latency samples.
fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    format!(
        "{} calls, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        at(0.50),
        at(0.99),
        at(1.0)
    )
}

/// Runs `bus-flood` as `flooder` (1,000 UpdateModule calls over 4 connections, `in_flight`
/// pending on each) while root calls ListInstances in a loop; returns the flood's summary and
/// the ListInstances latencies. Every ListInstances must answer with all `instances`.
async fn flood_round(
    sandbox: &Sandbox,
    updater: &ModuleUpdaterProxy<'_>,
    flooder: &Instance,
    request: &str,
    in_flight: usize,
    instances: usize,
) -> (serde_json::Value, Vec<Duration>) {
    let flood_bin = sandbox
        .user_executable(Path::new(env!("CARGO_BIN_EXE_bus-flood")))
        .unwrap();
    let address = sandbox.bus_address();
    let in_flight = in_flight.to_string();
    let mut flood = sandbox
        .command_as(
            flooder,
            &[
                flood_bin.to_str().unwrap(),
                &address,
                "4",
                "1000",
                &in_flight,
                request,
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut samples = Vec::new();
    let started = Instant::now();
    loop {
        let (elapsed, listed) = timed_list(updater).await;
        assert_eq!(listed, instances, "ListInstances during the flood");
        samples.push(elapsed);
        if flood.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "the flood did not end"
        );
    }
    let output = flood.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["ok"], 0, "a flood call was accepted: {summary}");
    let refused: u64 = summary["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(refused, 1000, "{summary}");
    (summary, samples)
}

/// A non-root client floods UpdateModule from several connections while root lists the
/// instances. The flood is refused at the authorisation layer (polkit's answer, or the per-uid
/// limit of pending checks), and every ListInstances answers. The latencies are printed
/// (docs/security.md records them), never asserted.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_unauthorised_calls_is_refused_while_root_is_served() {
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("flood", "1.0"))
        .rootless("flood", 3, "1.0")
        .bare("flooder", 1)
        .polkit()
        .start()
        .await;
    let mut daemon = s.daemon.take().unwrap();
    let (sandbox, connection, v1) = (&s.sandbox, s.bus(), s.url("1.0"));
    let (instances, flooder) = (&s.instances[..3], &s.instances[3]);
    let all = instances.len() + 1;
    let updater = ModuleUpdaterProxy::new(connection).await.unwrap();
    let update = request(&v1, &[&instances[0].id], true);

    let mut quiet = Vec::new();
    for _ in 0..200 {
        let (elapsed, listed) = timed_list(&updater).await;
        assert_eq!(listed, all);
        quiet.push(elapsed);
    }
    eprintln!("ListInstances without load: {}", percentiles(&mut quiet));

    // 16 calls pending at most (4 connections x 4): within the per-uid limit, so every call is
    // polkit's to answer, and polkit says no.
    let (summary, mut samples) = flood_round(sandbox, &updater, flooder, &update, 4, all).await;
    assert_eq!(
        summary["errors"],
        serde_json::json!({ACCESS_DENIED: 1000}),
        "{summary}"
    );
    eprintln!(
        "ListInstances during a flood answered by polkit ({summary}): {}",
        percentiles(&mut samples)
    );

    // 64 pending (4 x 16): over the limit, the excess is refused without asking polkit.
    let (summary, mut samples) = flood_round(sandbox, &updater, flooder, &update, 16, all).await;
    let errors = summary["errors"].as_object().unwrap();
    assert!(errors.contains_key(LIMITS_EXCEEDED), "{summary}");
    for name in errors.keys() {
        assert!(
            name == ACCESS_DENIED || name == LIMITS_EXCEEDED,
            "a flood call got {name}: {summary}"
        );
    }
    eprintln!(
        "ListInstances during a flood over the per-uid limit ({summary}): {}",
        percentiles(&mut samples)
    );

    assert!(updater.list_jobs().await.unwrap().is_empty());
    assert!(daemon.is_running(), "{}", daemon.log());
    let refusals = daemon
        .log()
        .lines()
        .filter(|l| l.contains(&format!("MODULE_UPDATER_CALLER_UID={}", flooder.uid)))
        .count();
    assert_eq!(refusals, 2000, "every refusal is logged");
}

/// A tar stream written by hand (GNU format), for layers that `podman build` and `podman import`
/// cannot make: podman applies a layer to its storage before it can push it.
#[derive(Default)]
struct HandTar {
    out: Vec<u8>,
}

impl HandTar {
    fn header(&mut self, name: &[u8], kind: u8, mode: u32, size: usize, link: &[u8], dev: u32) {
        // GNU long names: a `././@LongLink` member of type L (name) or K (link) first.
        if name.len() > 99 {
            let mut long = name.to_vec();
            long.push(0);
            self.header(b"././@LongLink", b'L', 0o644, long.len(), b"", 0);
            self.data(&long);
        }
        if link.len() > 99 {
            let mut long = link.to_vec();
            long.push(0);
            self.header(b"././@LongLink", b'K', 0o644, long.len(), b"", 0);
            self.data(&long);
        }
        let mut h = [0u8; 512];
        let field = |h: &mut [u8; 512], at: usize, len: usize, value: &[u8]| {
            let n = value.len().min(len);
            h[at..at + n].copy_from_slice(&value[..n]);
        };
        let octal = |h: &mut [u8; 512], at: usize, len: usize, value: u64| {
            let text = format!("{value:0width$o}\0", width = len - 1);
            h[at..at + len].copy_from_slice(text.as_bytes());
        };
        field(&mut h, 0, 100, name);
        octal(&mut h, 100, 8, u64::from(mode));
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, size as u64);
        octal(&mut h, 136, 12, 1_700_000_000);
        h[156] = kind;
        field(&mut h, 157, 100, link);
        field(&mut h, 257, 8, b"ustar  \0");
        field(&mut h, 265, 32, b"root");
        field(&mut h, 297, 32, b"root");
        octal(&mut h, 329, 8, u64::from(dev >> 8));
        octal(&mut h, 337, 8, u64::from(dev & 0xff));
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.out.extend_from_slice(&h);
    }

    fn data(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn dir(mut self, name: &str, mode: u32) -> Self {
        self.header(format!("{name}/").as_bytes(), b'5', mode, 0, b"", 0);
        self
    }

    fn file(mut self, name: &str, contents: &[u8], mode: u32) -> Self {
        self.header(name.as_bytes(), b'0', mode, contents.len(), b"", 0);
        self.data(contents);
        self
    }

    fn symlink(mut self, name: &str, target: &str) -> Self {
        self.header(name.as_bytes(), b'2', 0o777, 0, target.as_bytes(), 0);
        self
    }

    fn hardlink(mut self, name: &str, target: &str) -> Self {
        self.header(name.as_bytes(), b'1', 0o644, 0, target.as_bytes(), 0);
        self
    }

    /// A character (`b'3'`) or block (`b'4'`) device, `dev` = major << 8 | minor.
    fn device(mut self, name: &str, kind: u8, dev: u32) -> Self {
        self.header(name.as_bytes(), kind, 0o666, 0, b"", dev);
        self
    }

    fn fifo(mut self, name: &str) -> Self {
        self.header(name.as_bytes(), b'6', 0o644, 0, b"", 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend(std::iter::repeat_n(0u8, 1024));
        self.out
    }
}

/// `sha256:<hex>` of `data`, by coreutils' sha256sum.
fn sha256(data: &[u8], scratch: &Path) -> String {
    std::fs::write(scratch, data).unwrap();
    let out = Command::new("sha256sum").arg(scratch).output().unwrap();
    assert!(out.status.success());
    let hex = text(&out.stdout);
    format!("sha256:{}", hex.split_whitespace().next().unwrap())
}

/// One HTTP/1.1 request to the sandbox registry; returns the status code and the body.
fn http(registry: &str, method: &str, target: &str, kind: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(registry).unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {registry}\r\nContent-Type: {kind}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = text(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

/// Pushes a one-layer image made of `layer` (an uncompressed tar) with `labels` straight to the
/// sandbox registry (registry API v2, monolithic uploads); returns its URL.
fn push_raw_image(
    sandbox: &Sandbox,
    repo: &str,
    tag: &str,
    layer: &[u8],
    labels: &[(&str, &str)],
) -> String {
    let registry = sandbox.registry();
    let scratch = sandbox.root().join(format!("raw-{repo}-{tag}"));
    let layer_digest = sha256(layer, &scratch);
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    })
    .to_string();
    let config_digest = sha256(config.as_bytes(), &scratch);
    for (digest, body) in [(&layer_digest, layer), (&config_digest, config.as_bytes())] {
        // Start an upload, then PUT the whole blob to where the registry says.
        let (status, response) = http(
            &registry,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            "application/octet-stream",
            b"",
        );
        assert_eq!(status, 202, "blob upload: {response}");
        let location = response
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("location")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no Location in {response}"));
        let path = location
            .strip_prefix(&format!("http://{registry}"))
            .unwrap_or(&location);
        let separator = if path.contains('?') { '&' } else { '?' };
        let (status, response) = http(
            &registry,
            "PUT",
            &format!("{path}{separator}digest={digest}"),
            "application/octet-stream",
            body,
        );
        assert_eq!(status, 201, "blob upload: {response}");
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    })
    .to_string();
    let (status, response) = http(
        &registry,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    );
    assert_eq!(status, 201, "manifest upload: {response}");
    let _ = std::fs::remove_file(scratch);
    format!("{registry}/{repo}:{tag}")
}

/// A check of an install dir after an update that completed: why it is wrong, if it is.
type InstallCheck = Box<dyn Fn(&Path) -> Result<(), String>>;

/// A hostile image: its name, its one layer, its labels, and what must hold after it.
type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, String)>, Outcome);

/// What must hold after a hostile image was given to an instance.
enum Outcome {
    /// The update failed and nothing of the instance changed.
    Refused,
    /// The update may complete, and then this must hold of the install dir; or it fails and
    /// nothing of the instance changed.
    Neutralised(InstallCheck),
}

/// Every entry below `dir`, not following symlinks.
fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::FileType, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            }
            found.push((entry.path(), meta.file_type(), meta.permissions().mode()));
        }
    }
    found
}

/// The paths whose mode or contents differ between two trees.
fn changed(
    before: &std::collections::BTreeMap<String, (u32, Vec<u8>)>,
    after: &std::collections::BTreeMap<String, (u32, Vec<u8>)>,
) -> Vec<String> {
    let mut paths: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    paths.extend(after.keys().filter(|k| !before.contains_key(*k)).cloned());
    paths
}

/// `/etc` as a tree of modes and contents, without what parallel tests change: the user and
/// group databases with their backups and locks, registries.conf.d, polkit rules, and the
/// daemon's own configuration (which the packaging tests install).
fn etc_tree() -> std::collections::BTreeMap<String, (u32, Vec<u8>)> {
    let mut tree = snapshot(Path::new("/etc"));
    tree.retain(|path, _| {
        let top = path.split('/').next().unwrap_or_default();
        // shadow-utils writes `passwd-`, `passwd+`, `passwd.lock`, `passwd.<pid>`, `.pwd.lock`
        // and the like beside each database while another test adds a user.
        let database = [
            "passwd", "group", "shadow", "gshadow", "subuid", "subgid", ".pwd", "nshadow",
        ]
        .iter()
        .any(|name| top.starts_with(name));
        !database
            && top != "module-updater"
            && !path.starts_with("containers/registries.conf.d")
            && !path.starts_with("polkit-1/rules.d")
    });
    tree
}

fn install_tree(instance: &Instance) -> std::collections::BTreeMap<String, (u32, Vec<u8>)> {
    let mut tree = snapshot(&instance.home);
    tree.retain(|k, _| {
        !k.ends_with(".lock")
            && !k.contains(".imageroot.staging")
            && !k.contains(".local/share/containers")
            && !k.starts_with(".cache")
    });
    tree
}

/// Hand-made module images with hostile layers, each updated into a rootless and a rootful
/// instance at once: each is refused (by podman when it applies the layer, or by our extractor)
/// or neutralised; nothing outside the install dirs changes (`/etc`, a third instance's home,
/// the paths the images aim at), a refused update leaves the instance as it was, and the daemon
/// keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn malicious_images_are_refused_or_neutralised() {
    let mut s = Scenario::new()
        .image(
            "1.0",
            ImageSpec::module("evil", "1.0").file("bin/tool", "1\n", 0o755),
        )
        .rootless("evil", 1, "1.0")
        .rootful("evil", 1, "1.0")
        .rootless("bystander", 1, "1.0")
        .start()
        .await;
    let mut daemon = s.daemon.take().unwrap();
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [rootless, rootful, bystander] = &s.instances[..] else {
        unreachable!()
    };
    let updater = ModuleUpdaterProxy::new(connection).await.unwrap();

    let marker = format!(
        "mu-evil-{}",
        sandbox.root().file_name().unwrap().to_string_lossy()
    );
    let aims: Vec<PathBuf> = ["/tmp", "/etc", "/root"]
        .iter()
        .map(|d| Path::new(d).join(&marker))
        .collect();
    let etc_before = etc_tree();
    let shadow_before = std::fs::metadata("/etc/shadow").unwrap();
    let bystander_before = install_tree(bystander);
    let base = || {
        HandTar::default()
            .dir("imageroot", 0o755)
            .file("imageroot/bin/tool", b"2\n", 0o755)
    };
    let deep = (0..200).map(|_| "d").collect::<Vec<_>>().join("/");
    let up = "../".repeat(12);

    // Checks of an install dir after an update that completed.
    let no_special_bits = || -> InstallCheck {
        Box::new(
            |dir| match walk(dir).iter().find(|(_, _, mode)| mode & 0o7000 != 0) {
                Some((path, _, mode)) => Err(format!("{} has mode {mode:o}", path.display())),
                None => Ok(()),
            },
        )
    };
    let cases: Vec<Case> = vec![
        (
            "traversal",
            base()
                .file(&format!("imageroot/{up}tmp/{marker}"), b"x\n", 0o644)
                .finish(),
            vec![],
            // containers/storage cleans the path into the image's own /tmp when it stores the
            // layer, and then cannot give the layer back to `podman image save`.
            Outcome::Refused,
        ),
        (
            "absolute-symlink-then-write",
            base()
                .symlink("imageroot/etc", "/etc")
                .file(&format!("imageroot/etc/{marker}"), b"x\n", 0o644)
                .finish(),
            vec![],
            Outcome::Refused,
        ),
        (
            "hardlink-to-shadow",
            base().hardlink("imageroot/shadow", "/etc/shadow").finish(),
            vec![],
            Outcome::Refused,
        ),
        (
            "hardlink-up-to-shadow",
            base()
                .hardlink("imageroot/shadow", &format!("{up}etc/shadow"))
                .finish(),
            vec![],
            Outcome::Refused,
        ),
        (
            "device-nodes",
            base()
                .device("imageroot/null", b'3', (1 << 8) | 3)
                .device("imageroot/disk", b'4', 8 << 8)
                .finish(),
            vec![],
            // Rootless storage cannot make device nodes, root storage can; the layer either
            // gives back names them, and the extractor refuses them.
            Outcome::Refused,
        ),
        (
            "fifo",
            base().fifo("imageroot/fifo").finish(),
            vec![],
            Outcome::Refused,
        ),
        (
            "setuid",
            base()
                .file("imageroot/bin/suid", b"#!/bin/sh\n", 0o6755)
                .finish(),
            vec![],
            Outcome::Neutralised(no_special_bits()),
        ),
        (
            "200-levels",
            base()
                .file(&format!("imageroot/{deep}/f"), b"x\n", 0o644)
                .finish(),
            vec![],
            Outcome::Refused,
        ),
        (
            "imageroot-label-root",
            HandTar::default()
                .dir("etc", 0o755)
                .file(&format!("etc/{marker}"), b"x\n", 0o644)
                .finish(),
            vec![("org.nethserver.imageroot", "/".to_owned())],
            Outcome::Refused,
        ),
        (
            "imageroot-label-up",
            base().finish(),
            vec![("org.nethserver.imageroot", "../..".to_owned())],
            Outcome::Refused,
        ),
    ];

    for (n, (name, layer, labels, outcome)) in cases.into_iter().enumerate() {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = push_raw_image(sandbox, "evil", &format!("{n}-{name}"), &layer, &labels);
        let before: Vec<_> = [&rootless, &rootful]
            .iter()
            .map(|i| (install_tree(i), std::fs::read(i.env_file()).unwrap()))
            .collect();
        let run = run_job(
            connection,
            &request(&url, &[&rootless.id, &rootful.id], false),
        )
        .await;
        for (instance, (tree, env)) in [&rootless, &rootful].into_iter().zip(before) {
            let result = run.instance(&instance.id);
            let kind = if instance.rootless {
                "rootless"
            } else {
                "rootful"
            };
            eprintln!(
                "{name} ({kind}): {} at {}: {}",
                result["status"], result["error"]["step"], result["error"]["reason"]
            );
            match &outcome {
                Outcome::Refused => {
                    assert_eq!(result["status"], "failed", "{name} ({kind}): {result:#}");
                    assert_eq!(
                        std::fs::read(instance.env_file()).unwrap(),
                        env,
                        "{name} ({kind}) changed the environment"
                    );
                    assert_eq!(
                        install_tree(instance),
                        tree,
                        "{name} ({kind}) changed the instance"
                    );
                }
                Outcome::Neutralised(check) => {
                    if result["status"] == "completed" {
                        check(&instance.install_dir)
                            .unwrap_or_else(|e| panic!("{name} ({kind}): {e}"));
                    } else {
                        assert_eq!(result["status"], "failed", "{name} ({kind}): {result:#}");
                        assert_eq!(std::fs::read(instance.env_file()).unwrap(), env);
                        assert_eq!(install_tree(instance), tree);
                    }
                }
            }
        }
        for aim in &aims {
            assert!(!aim.exists(), "{name}: {} was created", aim.display());
        }
        let listed = updater.list_instances().await.unwrap();
        assert_eq!(listed.len(), 3, "{name}: the daemon stopped serving");
    }

    let etc_changes = changed(&etc_before, &etc_tree());
    assert!(etc_changes.is_empty(), "/etc changed: {etc_changes:?}");
    let shadow = std::fs::metadata("/etc/shadow").unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&shadow),
        std::os::unix::fs::MetadataExt::nlink(&shadow_before),
        "a hard link to /etc/shadow was made"
    );
    assert_eq!(install_tree(bystander), bystander_before);
    assert!(daemon.is_running(), "{}", daemon.log());
}

/// An image of 100,000 small files (within the extractor's limit of 200,000 entries) is installed
/// into a rootless and a rootful instance while the daemon keeps serving; nothing outside the
/// install dirs changes.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_of_100000_files_is_installed_within_the_limits() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("many", "1.0"))
        .rootless("many", 1, "1.0")
        .rootful("many", 1, "1.0")
        .start()
        .await;
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [rootless, rootful] = &s.instances[..] else {
        unreachable!()
    };
    let updater = ModuleUpdaterProxy::new(connection).await.unwrap();
    let layer = (0..100_000)
        .fold(
            HandTar::default()
                .dir("imageroot", 0o755)
                .dir("imageroot/many", 0o755),
            |tar, i| tar.file(&format!("imageroot/many/{i}"), b"", 0o644),
        )
        .finish();
    let url = push_raw_image(sandbox, "many", "2.0", &layer, &[]);
    let etc_before = etc_tree();

    let started = Instant::now();
    let mut stream = subscribe(connection).await;
    let path = submit(
        connection,
        &request(&url, &[&rootless.id, &rootful.id], false),
    )
    .await
    .unwrap();
    // The daemon answers while the workers pull, export and extract.
    let mut listed = 0usize;
    let job = JobProxy::builder(connection)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    while !matches!(
        job.status().await.unwrap().as_str(),
        "completed" | "aborted"
    ) {
        assert_eq!(updater.list_instances().await.unwrap().len(), 2);
        listed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = follow(connection, &mut stream, path).await;
    eprintln!(
        "100,000 files into two instances: {:.1} s ({listed} ListInstances answered meanwhile)",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(run.status, "completed", "{:#}", run.result);
    for instance in [&rootless, &rootful] {
        // The files and their directory.
        assert_eq!(run.instance(&instance.id)["files_installed"], 100_001);
        let count = std::fs::read_dir(instance.install_dir.join("many"))
            .unwrap()
            .count();
        assert_eq!(count, 100_000, "{}", instance.id);
    }
    let etc_changes = changed(&etc_before, &etc_tree());
    assert!(etc_changes.is_empty(), "/etc changed: {etc_changes:?}");
}
