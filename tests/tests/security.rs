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
use module_updater_dbus::{
    ACTION_CANCEL, ACTION_READ_INSTANCE, ACTION_UPDATE_MODULE, JobProxy, ModuleUpdaterProxy,
};
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
fn sleeper(sandbox: &Sandbox, repo: &str, tag: &str) -> String {
    sandbox
        .build_image(&ImageSpec::module(repo, tag).file(
            "update-module.d/50sleep",
            "#!/bin/sh\nsleep 300\n",
            0o755,
        ))
        .unwrap()
}

fn actions_file() -> PathBuf {
    Path::new(module_updater_tests::polkit::ACTIONS_DIR)
        .join(module_updater_dbus::POLKIT_ACTIONS_FILE)
}

#[tokio::test(flavor = "multi_thread")]
async fn polkit_decides_for_everyone_but_root() {
    let actions_before = std::fs::read(actions_file()).ok();
    let rules_before = std::fs::read_dir(module_updater_tests::polkit::RULES_DIR)
        .map(|d| d.count())
        .unwrap_or(0);
    let mut sandbox = Sandbox::new().unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("guard", "1.0"))
        .unwrap();
    let v2 = sleeper(&sandbox, "guard", "2.0");
    let target = sandbox.add_rootless_instance("guard").unwrap();
    sandbox.install(&target, &v1).unwrap();
    // Two plain non-root users (instances of another module, never updated here).
    let alice = sandbox.add_rootless_instance("alice").unwrap();
    let bob = sandbox.add_rootless_instance("bob").unwrap();
    let mut polkit = sandbox.start_polkitd().unwrap();
    let daemon = start_daemon(&sandbox, &[]);
    let connection = connect(&sandbox).await;
    let updater = ModuleUpdaterProxy::new(&connection).await.unwrap();
    let update = request(&v2, &[&target.id], false);

    // No rule: the shipped default (auth_admin_keep) refuses a caller with no authentication
    // agent, and the daemon answers AccessDenied.
    let message = assert_denied(
        &gdbus(
            &sandbox,
            Some(&alice),
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
    let message = assert_denied(
        &gdbus(
            &sandbox,
            Some(&alice),
            PATH,
            &manager("GetInstance"),
            &[&target.id],
        ),
        "GetInstance without a rule",
    );
    assert!(message.contains(ACTION_READ_INSTANCE), "{message}");
    // Whether an instance exists is not told either: same answer for a made-up id.
    assert_denied(
        &gdbus(
            &sandbox,
            Some(&alice),
            PATH,
            &manager("GetInstance"),
            &["nosuch9"],
        ),
        "GetInstance of an unknown id",
    );
    // The read-only surface stays open to everyone.
    let out = gdbus(&sandbox, Some(&alice), PATH, &manager("ListInstances"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&target.id));
    assert!(updater.list_jobs().await.unwrap().is_empty());

    // A rule grants update-module to the members of a group, for this instance and registry
    // only: rules can read the request's details.
    let group = polkit.add_group("mutest").unwrap();
    polkit.add_member(&group, &alice).unwrap();
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
    let alice_process = polkit.subject_process(&alice).unwrap();
    polkit
        .wait_for(ACTION_UPDATE_MODULE, &alice_process, &details, true)
        .unwrap();
    let bob_process = polkit.subject_process(&bob).unwrap();
    assert_eq!(
        polkit
            .check(ACTION_UPDATE_MODULE, bob_process.pid(), bob.uid, &details)
            .unwrap(),
        Decision::ChallengeRequired,
        "bob is not in {group}"
    );

    // Alice may now update that instance.
    let mut stream = subscribe(&connection).await;
    let out = gdbus(
        &sandbox,
        Some(&alice),
        PATH,
        &manager("UpdateModule"),
        &[&update],
    );
    let job = object_path(&out);
    let job_proxy = JobProxy::builder(&connection)
        .path(job.as_str())
        .build()
        .await
        .unwrap();
    assert_eq!(job_proxy.caller_uid().await.unwrap(), alice.uid);
    // Only that instance: the rule reads the details.
    assert_denied(
        &gdbus(
            &sandbox,
            Some(&alice),
            PATH,
            &manager("UpdateModule"),
            &[&request(&v2, &[&bob.id], false)],
        ),
        "UpdateModule of an instance the rule does not name",
    );
    // And only update-module: reading is another action.
    assert_denied(
        &gdbus(
            &sandbox,
            Some(&alice),
            PATH,
            &manager("GetInstance"),
            &[&target.id],
        ),
        "GetInstance with only update-module granted",
    );
    // Bob is not in the group: refused before the daemon looks at whether the instance is busy.
    assert_denied(
        &gdbus(
            &sandbox,
            Some(&bob),
            PATH,
            &manager("UpdateModule"),
            &[&update],
        ),
        "UpdateModule by a non-member",
    );

    // Cancel: bob may not cancel alice's job; alice may, without any rule.
    wait_for_process(&target, "sleep 300").await;
    let message = assert_denied(
        &gdbus(&sandbox, Some(&bob), &job, &job_method("Cancel"), &[]),
        "Cancel of another's job",
    );
    assert!(message.contains(ACTION_CANCEL), "{message}");
    let out = gdbus(&sandbox, Some(&alice), &job, &job_method("Cancel"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = follow(
        &connection,
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
    let out = gdbus(&sandbox, None, PATH, &manager("GetInstance"), &[&target.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forced = request(&v2, &[&target.id], true);
    let mut stream = subscribe(&connection).await;
    let alices = object_path(&gdbus(
        &sandbox,
        Some(&alice),
        PATH,
        &manager("UpdateModule"),
        &[&forced],
    ));
    wait_for_process(&target, "sleep 300").await;
    let out = gdbus(&sandbox, None, &alices, &job_method("Cancel"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = follow(
        &connection,
        &mut stream,
        zbus::OwnedObjectPath::try_from(alices).unwrap(),
    )
    .await;
    assert_eq!(run.instance(&target.id)["status"], "cancelled");
    let mut stream = subscribe(&connection).await;
    let roots = object_path(&gdbus(
        &sandbox,
        None,
        PATH,
        &manager("UpdateModule"),
        &[&forced],
    ));
    wait_for_process(&target, "sleep 300").await;
    assert_denied(
        &gdbus(&sandbox, Some(&alice), &roots, &job_method("Cancel"), &[]),
        "Cancel of root's job",
    );
    let out = gdbus(&sandbox, None, &roots, &job_method("Cancel"), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    follow(
        &connection,
        &mut stream,
        zbus::OwnedObjectPath::try_from(roots).unwrap(),
    )
    .await;

    // Every decision is in the log, with uid, pid and action.
    let log = daemon.log();
    for (uid, verdict, action, why) in [
        (alice.uid, "refused", ACTION_UPDATE_MODULE, "authentication"),
        (alice.uid, "refused", ACTION_READ_INSTANCE, "authentication"),
        (alice.uid, "allowed", ACTION_UPDATE_MODULE, "polkit"),
        (alice.uid, "allowed", ACTION_CANCEL, "its own job"),
        (bob.uid, "refused", ACTION_CANCEL, "authentication"),
        (alice.uid, "refused", ACTION_CANCEL, "authentication"),
        (0, "allowed", ACTION_CANCEL, "root"),
        (0, "allowed", ACTION_UPDATE_MODULE, "root"),
        (0, "allowed", ACTION_READ_INSTANCE, "root"),
    ] {
        let wanted = format!("{verdict} {action} for uid {uid} (pid ");
        let line = log
            .lines()
            .find(|l| l.contains(&wanted) && l.contains(why))
            .unwrap_or_else(|| panic!("no log line {wanted:?} ... {why:?} in:\n{log}"));
        assert!(
            line.contains(&format!("CALLER_UID={uid}"))
                && line.contains("CALLER_PID=")
                && line.contains(&format!("ACTION={action}")),
            "{line}"
        );
        let pid = line
            .split("CALLER_PID=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap();
        assert!(pid.parse::<u32>().is_ok(), "{line}");
    }

    // The machine is left as it was found.
    drop(alice_process);
    drop(bob_process);
    drop(daemon);
    drop(polkit);
    assert!(!rule_file.exists(), "{} is left", rule_file.display());
    assert_eq!(std::fs::read(actions_file()).ok(), actions_before);
    assert_eq!(
        std::fs::read_dir(module_updater_tests::polkit::RULES_DIR)
            .map(|d| d.count())
            .unwrap_or(0),
        rules_before
    );
    assert!(
        nix::unistd::Group::from_name(&group).unwrap().is_none(),
        "group {group} is left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_polkit_only_root_may_act() {
    let mut sandbox = Sandbox::new().unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("alone", "1.0"))
        .unwrap();
    let target = sandbox.add_rootless_instance("alone").unwrap();
    sandbox.install(&target, &v1).unwrap();
    let user = sandbox.add_rootless_instance("user").unwrap();
    let _daemon = start_daemon(&sandbox, &[]);
    let connection = connect(&sandbox).await;

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
    for (method, arg) in [
        ("UpdateModule", update.as_str()),
        ("GetInstance", target.id.as_str()),
    ] {
        let message = assert_denied(
            &gdbus(&sandbox, Some(&user), PATH, &manager(method), &[arg]),
            method,
        );
        assert!(message.contains("polkit"), "{method}: {message}");
        assert!(message.contains("not running"), "{method}: {message}");
    }

    // Root is not asked about: its job runs (already installed: done at once) and lingers.
    let run = run_job(&connection, &update).await;
    assert_eq!(run.status, "completed");
    assert_eq!(run.instance(&target.id)["status"], "already-installed");
    let out = gdbus(&sandbox, None, PATH, &manager("GetInstance"), &[&target.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Cancelling root's (finished) job is still an authorisation question for anyone else.
    assert_denied(
        &gdbus(
            &sandbox,
            Some(&user),
            run.path.as_str(),
            &job_method("Cancel"),
            &[],
        ),
        "Cancel of root's job",
    );
    // The read-only calls answer.
    let out = gdbus(
        &sandbox,
        Some(&user),
        run.path.as_str(),
        &job_method("GetResult"),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Instance ids shaped like paths: NS8's pattern (`^.+[0-9]+$`) lets them through, so they must
/// be harmless by construction: only compared with what discovery found, never joined into a path.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_refused_before_it_reaches_anything() {
    let mut sandbox = Sandbox::new().unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("input", "1.0"))
        .unwrap();
    let instance = sandbox.add_rootless_instance("input").unwrap();
    sandbox.install(&instance, &v1).unwrap();
    // Traps: what `<base>.join(id)` would find for the hostile ids, each looking like a valid
    // rootful instance. Were an id ever joined into a path, the daemon would accept the trap.
    let rootful = sandbox.rootful_base();
    let mut traps = Vec::new();
    for (id, dir) in [
        ("../x1", rootful.join("../x1")),
        ("a/b1", rootful.join("a/b1")),
        (".1", rootful.join(".1")),
        ("../home/../x1", rootful.join("../home/../x1")),
    ] {
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("environment"), format!("MODULE_ID={id}\n")).unwrap();
        traps.push(state.join("environment"));
    }
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
    let mut daemon = start_daemon(&sandbox, &[]);

    for id in [
        "../x1",
        "/etc1",
        "a/b1",
        ".1",
        "../home/../x1",
        "/tmp/../x1",
    ] {
        let (name, message) = refusal(&gdbus(
            &sandbox,
            None,
            PATH,
            &manager("UpdateModule"),
            &[&request(&v1, &[id], false)],
        ));
        assert_eq!(name, VALIDATION_FAILED, "{id}: {message}");
        let array: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(array[0]["error"], "instances_instance_not_found", "{id}");
        assert_eq!(array[0]["value"], id);
        let (name, _) = refusal(&gdbus(&sandbox, None, PATH, &manager("GetInstance"), &[id]));
        assert_eq!(
            name, "org.nethserver.ModuleUpdater.Error.NoSuchInstance",
            "{id}"
        );
    }
    assert!(!Path::new("/etc1").exists());
    assert_eq!(trap_snapshot(&traps), before, "a trap was written");
    let listing = text(&gdbus(&sandbox, None, PATH, &manager("ListInstances"), &[]).stdout);
    assert!(
        !listing.contains("x1") && !listing.contains("b1"),
        "{listing}"
    );

    // Image references podman could misread, or that are no references at all (sent with our
    // proxy: gdbus would interpret the escapes of a JSON string argument).
    let connection = connect(&sandbox).await;
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
    let mut sandbox = Sandbox::new().unwrap();
    let victim = sandbox.add_rootless_instance("victim").unwrap();
    let rootless = sandbox.add_rootless_instance("probe").unwrap();
    let rootful = sandbox.add_rootful_instance("probe").unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("probe", "1.0"))
        .unwrap();
    let victim_env = victim.env_file();
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
        home = victim.home.display(),
        env = victim_env.display(),
    );
    let v2 = sandbox
        .build_image(&ImageSpec::module("probe", "2.0").file(
            "update-module.d/10probe",
            probe,
            0o755,
        ))
        .unwrap();
    sandbox.install(&rootless, &v1).unwrap();
    sandbox.install(&rootful, &v1).unwrap();
    let victim_before = snapshot(&victim.home);
    let _daemon = start_daemon(&sandbox, &[]);
    let connection = connect(&sandbox).await;
    let run = run_job(
        &connection,
        &request(&v2, &[&rootless.id, &rootful.id], false),
    )
    .await;
    assert_eq!(run.status, "completed", "{:#}", run.result);

    let read = |instance: &Instance, name: &str| {
        std::fs::read_to_string(instance.state_dir.join(name))
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", instance.id))
    };
    // The rootless instance's script: its uid and group, no capability at all.
    assert_eq!(
        read(&rootless, "probe.uid").trim(),
        rootless.uid.to_string()
    );
    assert_eq!(
        read(&rootless, "probe.groups").trim(),
        rootless.gid.to_string(),
        "only the instance's own group"
    );
    let caps = read(&rootless, "probe.caps");
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
        read(&rootless, "probe.wrote")
    );
    assert!(!victim.home.join("pwned").exists());
    assert_eq!(snapshot(&victim.home), victim_before);
    // The rootful instance's script runs as root, as in NS8.
    assert_eq!(read(&rootful, "probe.uid").trim(), "0");

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
            &rootless,
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
    let mut sandbox = Sandbox::new().unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("flood", "1.0"))
        .unwrap();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let instance = sandbox.add_rootless_instance("flood").unwrap();
        sandbox.install(&instance, &v1).unwrap();
        instances.push(instance);
    }
    let flooder = sandbox.add_rootless_instance("flooder").unwrap();
    let all = instances.len() + 1;
    let _polkit = sandbox.start_polkitd().unwrap();
    let mut daemon = start_daemon(&sandbox, &[]);
    let connection = connect(&sandbox).await;
    let updater = ModuleUpdaterProxy::new(&connection).await.unwrap();
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
    let (summary, mut samples) = flood_round(&sandbox, &updater, &flooder, &update, 4, all).await;
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
    let (summary, mut samples) = flood_round(&sandbox, &updater, &flooder, &update, 16, all).await;
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
        .filter(|l| l.contains(&format!("CALLER_UID={}", flooder.uid)))
        .count();
    assert_eq!(refusals, 2000, "every refusal is logged");
}
