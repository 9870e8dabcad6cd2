//! End-to-end tests of the update engine through the daemon: real users, `systemd --user`,
//! rootless podman, a loopback registry, the private bus.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use module_updater_tests::{ImageSpec, Sandbox};

/// An update script that records what NS8 promises a script: its uid, cwd, environment, stdin.
const RECORDER: &str = "#!/bin/sh\nid -u > \"$AGENT_STATE_DIR/script.uid\"\npwd > script.cwd\nenv | sort > script.env\ncat > script.stdin\necho set-progress 50 >&3\necho '<4>recorder says hello'\n";

/// A whole 1.0 → 2.0 update of a rootless instance, checked the way an administrator would.
#[tokio::test(flavor = "multi_thread")]
async fn rootless_update_from_1_to_2() {
    let mut sandbox = Sandbox::new().unwrap();
    let registry = sandbox.registry();
    let db1 = sandbox
        .build_blob_image("mariadb", "10.1", 4096, 1)
        .unwrap();
    let db2 = sandbox
        .build_blob_image("mariadb", "10.2", 4096, 2)
        .unwrap();
    let cache = sandbox
        .build_blob_image("redis-cache", "7", 4096, 3)
        .unwrap();
    let fauth = sandbox
        .build_blob_image("2fauth", "5.2.0", 1024, 4)
        .unwrap();
    let v1 = sandbox
        .build_image(
            &module_image(&sandbox, "demo", "1.0", &[db1.clone(), cache.clone()])
                .file("bin/only-in-1", "old\n", 0o755)
                .file(
                    "systemd/user/changed.service",
                    "[Service]\nExecStart=/bin/true\n",
                    0o644,
                ),
        )
        .unwrap();
    let v2 = sandbox
        .build_image(
            &module_image(
                &sandbox,
                "demo",
                "2.0",
                &[db2.clone(), cache.clone(), fauth.clone()],
            )
            .file(
                "systemd/user/added.service",
                "[Service]\nType=oneshot\nExecStart=/bin/true\n",
                0o644,
            )
            .file(
                "systemd/user/changed.service",
                "[Service]\nExecStart=/bin/false\n",
                0o644,
            )
            .file("update-module.d/10record", RECORDER, 0o755)
            .file(
                "update-module.d/20notexec",
                "#!/bin/sh\ntouch ran-20\n",
                0o644,
            )
            .file(
                "update-module.d/30fails",
                "#!/bin/sh\necho failing\nexit 3\n",
                0o755,
            )
            .file("update-module.d/.gitignore", "*\n", 0o644),
        )
        .unwrap();
    let instance = sandbox.add_rootless_instance("demo").unwrap();
    sandbox.install(&instance, &v1).unwrap();
    let before = instance.read_env().unwrap();
    assert_eq!(before["IMAGE_URL"], v1);
    assert!(instance.install_dir.join("bin/only-in-1").exists());
    let env_mode = std::fs::metadata(instance.env_file())
        .unwrap()
        .permissions();

    // A `systemctl` first in the daemon's PATH records any call: an update must make none.
    let trap = sandbox.root().join("trap");
    std::fs::create_dir_all(&trap).unwrap();
    let calls = sandbox.root().join("systemctl-calls");
    std::fs::write(
        trap.join("systemctl"),
        format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        trap.join("systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&trap, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        sandbox.root(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut command = sandbox.daemon_command(&[]).unwrap();
    command.args(daemon_args(&sandbox));
    command.env(
        "PATH",
        format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            trap.display()
        ),
    );
    let _daemon = sandbox.start_daemon_with(command).unwrap();

    let connection = connect(&sandbox).await;
    let run = run_job(&connection, &request(&v2, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(run.exit_code, 0);
    assert_eq!(result["status"], "completed", "{result:#}");
    assert_eq!(result["old_image_url"], v1.as_str());
    assert_eq!(result["new_image_url"], v2.as_str());

    // The environment: new image keys, PREV_* with the old values, extras named by NS8's rule.
    let env = instance.read_env().unwrap();
    assert_eq!(env["IMAGE_URL"], v2);
    assert_eq!(env["PREV_IMAGE_URL"], v1);
    assert_eq!(env["IMAGE_ID"].len(), 64, "{env:?}");
    assert!(env["IMAGE_DIGEST"].starts_with("sha256:"));
    assert!(env["IMAGE_REOPODIGEST"].starts_with(&format!("{registry}/demo@sha256:")));
    for key in ["IMAGE_ID", "IMAGE_DIGEST", "IMAGE_REOPODIGEST"] {
        assert_eq!(env[&format!("PREV_{key}")], before[key], "PREV_{key}");
    }
    assert_eq!(env["MARIADB_IMAGE"], db2);
    assert_eq!(env["PREV_MARIADB_IMAGE"], db1);
    assert_eq!(env["REDIS_CACHE_IMAGE"], cache);
    assert_eq!(env["PREV_REDIS_CACHE_IMAGE"], cache);
    assert_eq!(env["I2FAUTH_IMAGE"], fauth);
    assert!(
        !env.contains_key("PREV_I2FAUTH_IMAGE"),
        "no previous value: no PREV_ key, never `None`"
    );
    assert!(env.values().all(|v| v != "None"));
    let text = std::fs::read_to_string(instance.env_file()).unwrap();
    assert!(text.ends_with('\n'));
    let keys: Vec<&str> = text.lines().map(|l| l.split('=').next().unwrap()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "environment lines sorted by key");
    assert_eq!(
        std::fs::metadata(instance.env_file())
            .unwrap()
            .permissions(),
        env_mode
    );

    // The tree: new files in, stale ones out, .gitignore neither written nor listed.
    assert!(!instance.install_dir.join("bin/only-in-1").exists());
    assert!(
        instance
            .install_dir
            .join("systemd/user/added.service")
            .exists()
    );
    assert!(
        !instance
            .install_dir
            .join("update-module.d/.gitignore")
            .exists()
    );
    let list = std::fs::read_to_string(instance.install_dir.join(".imageroot.lst")).unwrap();
    assert!(
        list.lines().any(|l| l == "./update-module.d/10record"),
        "{list}"
    );
    assert!(list.lines().any(|l| l == "./systemd/user/"), "{list}");
    assert!(!list.contains(".gitignore"));
    let old_list = std::fs::read_to_string(instance.install_dir.join(".imageroot.lst~")).unwrap();
    assert!(old_list.lines().any(|l| l == "./bin/only-in-1"));
    assert!(
        result["files_removed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "./bin/only-in-1")
    );

    // The user's manager was reloaded over D-Bus: the new unit is loaded, the changed one fresh.
    assert_eq!(
        sandbox
            .unit_property(&instance, "added.service", "LoadState")
            .unwrap(),
        "s \"loaded\""
    );
    assert_eq!(
        sandbox
            .unit_property(&instance, "changed.service", "NeedDaemonReload")
            .unwrap(),
        "b false"
    );
    assert!(
        !calls.exists(),
        "systemctl was run: {}",
        std::fs::read_to_string(&calls).unwrap_or_default()
    );

    // Scripts: as the user, in the state dir, with the new environment, the request on stdin.
    let state = &instance.state_dir;
    assert_eq!(
        std::fs::read_to_string(state.join("script.uid"))
            .unwrap()
            .trim(),
        instance.uid.to_string()
    );
    assert_eq!(
        std::fs::read_to_string(state.join("script.cwd"))
            .unwrap()
            .trim(),
        state.display().to_string()
    );
    let script_env = std::fs::read_to_string(state.join("script.env")).unwrap();
    for line in [
        format!("IMAGE_URL={v2}"),
        format!("PREV_IMAGE_URL={v1}"),
        format!("MARIADB_IMAGE={db2}"),
        "AGENT_COMFD=3".to_owned(),
        format!("AGENT_ID=module/{}", instance.id),
        format!("AGENT_STATE_DIR={}", state.display()),
        format!("AGENT_INSTALL_DIR={}", instance.install_dir.display()),
    ] {
        assert!(
            script_env.lines().any(|l| l == line),
            "{line} missing in:\n{script_env}"
        );
    }
    let stdin: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("script.stdin")).unwrap())
            .unwrap();
    assert_eq!(stdin["module_url"], v2.as_str());
    assert!(
        !state.join("ran-20").exists(),
        "a non-executable script ran"
    );
    let scripts = result["scripts"].as_array().unwrap();
    let names: Vec<&str> = scripts
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["10record", "30fails"]);
    assert_eq!(scripts[0]["status"], "ok");
    assert_eq!(scripts[1]["status"], "failed");
    assert_eq!(scripts[1]["exit_code"], 3);
    assert!(
        result["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("30fails has failed"))
    );
    let messages = run.messages_of(&instance.id);
    assert!(
        messages.iter().any(|m| m == "recorder says hello"),
        "{messages:#?}"
    );
    assert!(messages.iter().any(|m| m == "failing"), "{messages:#?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("Skipping non-executable file") && m.contains("20notexec"))
    );

    // Progress: per instance, never decreasing, ending at 100.
    let progress = run.progress_of(&instance.id);
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(&100));

    // Cleanup: the previous module image and the replaced extra image are gone, the rest stay.
    let images = as_user(
        &sandbox,
        &instance,
        &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(!images.lines().any(|l| l == v1), "{images}");
    assert!(!images.lines().any(|l| l == db1), "{images}");
    for kept in [&v2, &db2, &cache, &fauth] {
        assert!(
            images.lines().any(|l| l == kept.as_str()),
            "{kept} missing: {images}"
        );
    }
    let removed = result["images_removed"].as_array().unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
}

/// Same URL, no force: nothing is pulled, extracted, written, run or removed.
#[tokio::test(flavor = "multi_thread")]
async fn same_url_is_a_true_no_op_unless_an_update_was_interrupted() {
    let mut sandbox = Sandbox::new().unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("noop", "1.0").file(
            "update-module.d/10mark",
            "#!/bin/sh\necho x >> marks\n",
            0o755,
        ))
        .unwrap();
    let instance = sandbox.add_rootless_instance("noop").unwrap();
    sandbox.install(&instance, &v1).unwrap();
    let daemon = start_daemon(&sandbox, &["--verbose"]);
    let connection = connect(&sandbox).await;
    // The lock file is created by taking the lock (NS8's agent does the same); it is not state.
    let snapshot = |dir: &std::path::Path| {
        let mut tree = common::snapshot(dir);
        tree.remove("state/.update-module.lock");
        tree
    };
    let before = snapshot(&instance.install_dir);

    let run = run_job(&connection, &request(&v1, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed");
    assert_eq!(run.instance(&instance.id)["status"], "already-installed");
    assert_eq!(
        snapshot(&instance.install_dir),
        before,
        "nothing may change"
    );
    assert!(
        !instance.state_dir.join("marks").exists(),
        "scripts must not run"
    );

    // An interrupted update leaves the marker: the same URL then runs in full, scripts included.
    std::fs::write(
        instance.state_dir.join(".module-updater.in-progress"),
        "job=0\n",
    )
    .unwrap();
    let run = run_job(&connection, &request(&v1, &[&instance.id], false)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "completed",
        "{:#} {}",
        run.result,
        daemon.log()
    );
    assert_eq!(
        std::fs::read_to_string(instance.state_dir.join("marks")).unwrap(),
        "x\n"
    );
    assert!(
        !instance
            .state_dir
            .join(".module-updater.in-progress")
            .exists()
    );
    let env = instance.read_env().unwrap();
    assert_eq!(
        env["PREV_IMAGE_URL"], v1,
        "a re-run over the same URL keeps PREV equal"
    );

    // Force with the same URL and no extra images: pulls again and completes (NS8 fails here).
    let run = run_job(&connection, &request(&v1, &[&instance.id], true)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "completed",
        "{:#}",
        run.result
    );
    assert_eq!(
        std::fs::read_to_string(instance.state_dir.join("marks")).unwrap(),
        "x\nx\n"
    );
    let images = as_user(
        &sandbox,
        &instance,
        &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(
        images.lines().any(|l| l == v1),
        "the current image is never removed: {images}"
    );
}
