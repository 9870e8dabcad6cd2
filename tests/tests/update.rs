//! End-to-end tests of the update engine through the daemon: real users, `systemd --user`,
//! rootless podman, a loopback registry, the private bus.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use module_updater_tests::{ImageSpec, Instance};

/// An update script that records what NS8 promises a script: its uid, cwd, environment, stdin.
const RECORDER: &str = "#!/bin/sh\nid -u > \"$AGENT_STATE_DIR/script.uid\"\npwd > script.cwd\nnice > script.nice\nenv | sort > script.env\ncat > script.stdin\necho set-progress 50 >&3\necho '<4>recorder says hello'\n";

/// A whole 1.0 → 2.0 update of a rootless instance, checked the way an administrator would.
#[tokio::test(flavor = "multi_thread")]
async fn rootless_update_from_1_to_2() {
    let s = Scenario::new()
        .blob("db1", "mariadb", "10.1", 4096, 1)
        .blob("db2", "mariadb", "10.2", 4096, 2)
        .blob("cache", "redis-cache", "7", 4096, 3)
        .blob("fauth", "2fauth", "5.2.0", 1024, 4)
        .image_with("1.0", |images| {
            module_image("demo", "1.0", &[images.url("db1"), images.url("cache")])
                .file("bin/only-in-1", "old\n", 0o755)
                .file(
                    "systemd/user/changed.service",
                    "[Service]\nExecStart=/bin/true\n",
                    0o644,
                )
        })
        .image_with("2.0", |images| {
            let extras = [images.url("db2"), images.url("cache"), images.url("fauth")];
            module_image("demo", "2.0", &extras)
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
                .file("update-module.d/.gitignore", "*\n", 0o644)
        })
        .rootless("demo", 1, "1.0")
        // A `systemctl` first in the daemon's PATH records any call: an update must make none.
        .trap("systemctl", |sandbox, _, _| {
            let calls = sandbox.root().join("systemctl-calls");
            format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", calls.display())
        })
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let registry = sandbox.registry();
    let [db1, db2, cache, fauth, v1, v2] =
        ["db1", "db2", "cache", "fauth", "1.0", "2.0"].map(|key| s.url(key));
    let before = instance.read_env().unwrap();
    assert_eq!(before["IMAGE_URL"], v1);
    assert!(instance.install_dir.join("bin/only-in-1").exists());
    let env_mode = std::fs::metadata(instance.env_file())
        .unwrap()
        .permissions();
    // The record is writable by everyone: the workers run as the instance user.
    let calls = sandbox.root().join("systemctl-calls");
    std::fs::write(&calls, "").unwrap();
    std::fs::set_permissions(&calls, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
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
            .unit_property(instance, "added.service", "LoadState")
            .unwrap(),
        "s \"loaded\""
    );
    assert_eq!(
        sandbox
            .unit_property(instance, "changed.service", "NeedDaemonReload")
            .unwrap(),
        "b false"
    );
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "",
        "systemctl was run"
    );

    // Scripts: as the user, in the state dir, at the workers' lower CPU priority (worker_nice,
    // default 10), with the new environment, the request on stdin.
    let state = &instance.state_dir;
    assert_eq!(
        std::fs::read_to_string(state.join("script.nice"))
            .unwrap()
            .trim(),
        "10"
    );
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

    // Cleanup: the previous module image and the replaced extra image are the kept previous
    // version's (keep_previous, the default: NS8's cleanup is tested with it off below), so
    // nothing is removed yet.
    let images = as_user(
        sandbox,
        instance,
        &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    for kept in [&v1, &db1, &v2, &db2, &cache, &fauth] {
        assert!(
            images.lines().any(|l| l == kept.as_str()),
            "{kept} missing: {images}"
        );
    }
    let removed = result["images_removed"].as_array().unwrap();
    assert_eq!(removed.len(), 0, "{removed:?}");
}

/// Same URL, no force: nothing is pulled, extracted, written, run or removed.
#[tokio::test(flavor = "multi_thread")]
async fn same_url_is_a_true_no_op_unless_an_update_was_interrupted() {
    let s = Scenario::new()
        .image(
            "1.0",
            ImageSpec::module("noop", "1.0").file(
                "update-module.d/10mark",
                "#!/bin/sh\necho x >> marks\n",
                0o755,
            ),
        )
        .rootless("noop", 1, "1.0")
        .daemon(&["--verbose"])
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let (daemon, v1) = (s.daemon(), s.url("1.0"));
    // The lock file is created by taking the lock (NS8's agent does the same); it is not state.
    let snapshot = |dir: &std::path::Path| {
        let mut tree = common::snapshot(dir);
        tree.remove("state/.update-module.lock");
        tree
    };
    let before = snapshot(&instance.install_dir);

    let run = run_job(connection, &request(&v1, &[&instance.id], false)).await;
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

    // An interrupted update leaves the marker. A re-run that fails before it installs anything
    // keeps it (the instance is still as the interrupted update left it); the same URL then runs
    // in full, scripts included.
    let marker = instance.state_dir.join(".module-updater.in-progress");
    std::fs::write(&marker, "job=0\n").unwrap();
    let missing = format!("{}/noop:9.9", sandbox.registry());
    let run = run_job(connection, &request(&missing, &[&instance.id], false)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "failed",
        "{:#}",
        run.result
    );
    assert!(marker.exists(), "the interrupted update's marker is kept");
    let run = run_job(connection, &request(&v1, &[&instance.id], false)).await;
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
    let run = run_job(connection, &request(&v1, &[&instance.id], true)).await;
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
        sandbox,
        instance,
        &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(
        images.lines().any(|l| l == v1),
        "the current image is never removed: {images}"
    );
}

/// Without force a local image with exactly that name is used even if the registry's tag moved;
/// with force the module image is pulled again.
#[tokio::test(flavor = "multi_thread")]
async fn pull_missing_semantics_and_force() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("tagmove", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("tagmove", "2.0").file("bin/which", "first\n", 0o644),
        )
        .rootless("tagmove", 1, "1.0")
        .prepare(|sandbox, images, instances| {
            as_user(
                sandbox,
                &instances[0],
                &["podman", "pull", "-q", &images.url("2.0")],
            );
        })
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let v2 = s.url("2.0");
    let first_id = as_user(
        sandbox,
        instance,
        &["podman", "image", "inspect", "--format", "{{.Id}}", &v2],
    );
    // The tag moves in the registry.
    let moved = sandbox
        .build_image(&ImageSpec::module("tagmove", "2.0").file("bin/which", "second\n", 0o644))
        .unwrap();
    assert_eq!(moved, v2);

    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "completed",
        "{:#}",
        run.result
    );
    assert_eq!(instance.read_env().unwrap()["IMAGE_ID"], first_id.trim());
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/which")).unwrap(),
        "first\n"
    );

    let run = run_job(connection, &request(&v2, &[&instance.id], true)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "completed",
        "{:#}",
        run.result
    );
    assert_ne!(instance.read_env().unwrap()["IMAGE_ID"], first_id.trim());
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/which")).unwrap(),
        "second\n"
    );
}

/// An instance updated alone makes the registry serve each blob of the changed images once: the
/// module image and its new extra image are pulled into the instance's storage, and the
/// imageroot is read from there. The instance ends with podman's digests, the new extra image's
/// key and the new files. A module image that cannot be pulled leaves the storage, the files and
/// the environment as they were; forced, every image is fetched again and the update completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_lone_instance_downloads_each_blob_once() {
    let s = Scenario::new()
        .module_with_changing_extra("lone", "lonedb", 1 << 20)
        .rootless("lone", 2, "1.0")
        .daemon(&["--keep-previous=false"])
        .start()
        .await;
    let (sandbox, connection, instances) = (&s.sandbox, s.bus(), &s.instances);
    let registry = sandbox.registry();
    let [db1, db2, v1, v2] = ["extra1", "extra2", "1.0", "2.0"].map(|key| s.url(key));
    let has_image = |instance: &Instance, reference: &str| has_image(sandbox, instance, reference);
    let images = |instance: &Instance| {
        as_user(
            sandbox,
            instance,
            &["podman", "image", "list", "--format", "{{.Id}} {{.Names}}"],
        )
    };
    let [fresh, broken] = &instances[..] else {
        unreachable!()
    };

    let offset = sandbox.registry_log_offset().unwrap();
    let run = run_job(connection, &request(&v2, &[&fresh.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    // The registry logs a request when it has answered it; the job has ended by now.
    let traffic = sandbox.registry_traffic_since(offset).unwrap();
    assert_eq!(
        traffic.max_serves_per_blob(),
        1,
        "a blob was served more than once: {traffic:?}"
    );
    // The module image's layer and configuration, the new extra image's layer and configuration.
    assert!(traffic.blob_downloads.len() >= 4, "{traffic:?}");
    assert!(traffic.blob_bytes >= 1 << 20, "{traffic:?}");
    assert_eq!(
        std::fs::read_to_string(fresh.install_dir.join("bin/version")).unwrap(),
        "2.0\n"
    );
    let env = fresh.read_env().unwrap();
    let inspected = as_user(
        sandbox,
        fresh,
        &[
            "podman",
            "image",
            "inspect",
            "--format",
            "{{.Id}} {{.Digest}}",
            &v2,
        ],
    );
    assert_eq!(
        format!("{} {}", env["IMAGE_ID"], env["IMAGE_DIGEST"]),
        inspected.trim()
    );
    assert_eq!(env["IMAGE_URL"], v2);
    assert_eq!(env["PREV_IMAGE_URL"], v1);
    assert_eq!(env["LONEDB_IMAGE"], db2);
    assert_eq!(env["PREV_LONEDB_IMAGE"], db1);
    assert!(has_image(fresh, &db2));
    assert!(!has_image(fresh, &db1), "the stale extra image is removed");

    // The module image cannot be pulled: the storage, files and environment are as before.
    let before = images(broken);
    let env_before = std::fs::read(broken.env_file()).unwrap();
    let missing = format!("{registry}/lone:9.9");
    let run = run_job(connection, &request(&missing, &[&broken.id], false)).await;
    let result = run.instance(&broken.id);
    assert_eq!(result["status"], "failed", "{result:#}");
    assert_eq!(result["error"]["step"], "pull-image", "{result:#}");
    assert_eq!(images(broken), before);
    assert_eq!(std::fs::read(broken.env_file()).unwrap(), env_before);
    assert_eq!(
        std::fs::read_to_string(broken.install_dir.join("bin/version")).unwrap(),
        "1.0\n"
    );
    let staging: Vec<_> = std::fs::read_dir(&broken.install_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".imageroot.staging"))
        .collect();
    assert!(staging.is_empty(), "{staging:?}");

    // Forced, every image is fetched again: the update completes with the same images.
    let identity = image_identity(sandbox, fresh, &[&v2, &db2]);
    let run = run_job(connection, &request(&v2, &[&fresh.id], true)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let messages = run.messages_of(&fresh.id);
    assert!(messages.contains(&format!("Pulling {v2}")), "{messages:#?}");
    assert_eq!(image_identity(sandbox, fresh, &[&v2, &db2]), identity);
    assert_eq!(fresh.read_env().unwrap()["LONEDB_IMAGE"], db2);
}

/// A module image of two layers (a file replaced and one added by the second) is installed as
/// its merged filesystem, read through a temporary container that is removed afterwards; one of
/// one layer, named by its digest, is read from `podman image save` and leaves no container
/// either.
#[tokio::test(flavor = "multi_thread")]
async fn a_module_image_of_two_layers_is_installed_merged() {
    let s = Scenario::new()
        .image(
            "1.0",
            ImageSpec::module("layers", "1.0").file("bin/tool", "1\n", 0o755),
        )
        .image(
            "2.0",
            ImageSpec::module("layers", "2.0")
                .file("bin/tool", "2 in the first layer\n", 0o755)
                .file("bin/kept", "first layer\n", 0o644)
                .second_layer_file("bin/tool", "2\n", 0o755)
                .second_layer_file("bin/added", "second layer\n", 0o644),
        )
        .image(
            "3.0",
            ImageSpec::module("layers", "3.0").file("bin/tool", "3\n", 0o755),
        )
        .rootless("layers", 1, "1.0")
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [v2, v3] = ["2.0", "3.0"].map(|key| s.url(key));
    let layers = |url: &str| {
        as_user(
            sandbox,
            instance,
            &[
                "podman",
                "image",
                "inspect",
                "--format",
                "{{len .RootFS.Layers}}",
                url,
            ],
        )
        .trim()
        .to_owned()
    };
    let read = |path: &str| std::fs::read_to_string(instance.install_dir.join(path)).unwrap();
    let containers = || as_user(sandbox, instance, &["podman", "ps", "--all", "--quiet"]);

    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(layers(&v2), "2");
    assert_eq!(read("bin/tool"), "2\n");
    assert_eq!(read("bin/kept"), "first layer\n");
    assert_eq!(read("bin/added"), "second layer\n");
    assert_eq!(containers(), "");

    // By digest, as an administrator may pin it: the image is present (pulled by tag), so
    // nothing is pulled, and it is read by that reference.
    as_user(sandbox, instance, &["podman", "pull", "--quiet", &v3]);
    let pinned = as_user(
        sandbox,
        instance,
        &[
            "podman",
            "image",
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            &v3,
        ],
    )
    .trim()
    .to_owned();
    assert!(pinned.contains("@sha256:"), "{pinned}");
    let run = run_job(connection, &request(&pinned, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], pinned);
    assert_eq!(layers(&pinned), "1");
    assert_eq!(read("bin/tool"), "3\n");
    assert!(!instance.install_dir.join("bin/added").exists());
    assert!(!instance.install_dir.join("bin/kept").exists());
    assert_eq!(containers(), "");
}

/// Images that try to escape the install dir are refused and change nothing; a custom imageroot
/// label extracts only its subtree; an existing `state/` keeps its mode.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_images_are_refused_and_labels_are_honoured() {
    let s = Scenario::new()
        .image(
            "1.0",
            ImageSpec::module("guarded", "1.0").file("bin/tool", "1\n", 0o755),
        )
        .image(
            "absolute",
            ImageSpec::module("guarded", "2.0-abs").symlink("bin/passwd", "/etc/passwd"),
        )
        .image(
            "escaping",
            ImageSpec::module("guarded", "2.0-rel").symlink("bin/up", "../../../../../../etc"),
        )
        .image(
            "subtree",
            ImageSpec::module("guarded", "3.0")
                .imageroot_dir("opt/app/root")
                .label("org.nethserver.imageroot", "/opt/app/root/")
                .file("bin/tool", "3\n", 0o755)
                .dir("state", 0o755)
                .file("state/shipped", "s\n", 0o644),
        )
        .rootless("guarded", 1, "1.0")
        .start()
        .await;
    let (connection, instance) = (s.bus(), &s.instances[0]);
    let [v1, absolute, escaping, subtree] =
        ["1.0", "absolute", "escaping", "subtree"].map(|key| s.url(key));
    let tree = |dir: &std::path::Path| {
        let mut tree = snapshot(dir);
        tree.retain(|k, _| !k.ends_with(".lock") && !k.starts_with(".imageroot.staging"));
        tree
    };
    let before = tree(&instance.home);

    for bad in [&absolute, &escaping] {
        let run = run_job(connection, &request(bad, &[&instance.id], false)).await;
        assert_eq!(run.status, "aborted");
        assert_eq!(run.exit_code, 1);
        let result = run.instance(&instance.id);
        assert_eq!(result["status"], "failed");
        assert_eq!(result["error"]["step"], "extract", "{result:#}");
        let mut after = tree(&instance.home);
        // Pulling the refused image is the only change: it is in the user's podman storage.
        after.retain(|k, _| !k.starts_with(".local/share/containers"));
        let mut expected = before.clone();
        expected.retain(|k, _| !k.starts_with(".local/share/containers"));
        assert_eq!(after, expected, "a refused image changed the instance");
        assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v1);
    }

    let run = run_job(connection, &request(&subtree, &[&instance.id], false)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "completed",
        "{:#}",
        run.result
    );
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/tool")).unwrap(),
        "3\n"
    );
    assert!(
        !instance.install_dir.join("opt").exists(),
        "only the subtree is installed"
    );
    assert_eq!(
        std::fs::read_to_string(instance.state_dir.join("shipped")).unwrap(),
        "s\n"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&instance.state_dir)
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "an existing state/ keeps its mode");
}

/// A lock held by NS8's own agent makes the update fail as busy without changing anything; a
/// lock that cannot be taken for another reason says so.
#[tokio::test(flavor = "multi_thread")]
async fn the_instance_lock_excludes_ns8s_agent() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("locked", "1.0"))
        .image("2.0", ImageSpec::module("locked", "2.0"))
        .rootless("locked", 1, "1.0")
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let v2 = s.url("2.0");

    let lock = instance.state_dir.join(".update-module.lock");
    let mut holder = sandbox
        .command_as(instance, &["flock", lock.to_str().unwrap(), "sleep", "60"])
        .spawn()
        .unwrap();
    // Wait until the holder has the lock (it waits for it, so our probes cannot make it give up).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sandbox
        .run_as(instance, &["flock", "-n", lock.to_str().unwrap(), "true"])
        .unwrap()
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder never took the lock: {:?}",
            holder.try_wait()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let env_before = std::fs::read(instance.env_file()).unwrap();
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "failed");
    assert_eq!(result["error"]["step"], "prepare");
    assert!(
        result["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("action_already_running"),
        "{result:#}"
    );
    assert_eq!(std::fs::read(instance.env_file()).unwrap(), env_before);
    let _ = holder.kill();
    let _ = holder.wait();

    // A lock file the user cannot open is not "already running".
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&lock, "").unwrap();
    std::fs::set_permissions(&lock, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    let reason = run.instance(&instance.id)["error"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!reason.contains("action_already_running"), "{reason}");
    assert!(reason.contains("Permission denied"), "{reason}");
    std::fs::remove_file(&lock).unwrap();

    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(
        run.instance(&instance.id)["status"],
        "completed",
        "{:#}",
        run.result
    );
}

/// SIGKILL of the worker in the middle of extraction leaves the tree and environment as they
/// were and the lock free; the same request then completes. A script that outlives its timeout
/// is killed with its children.
#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_and_script_timeout() {
    let big = vec![7u8; 160 * 1024 * 1024];
    let s = Scenario::new()
        .image(
            "1.0",
            ImageSpec::module("killed", "1.0").file("bin/tool", "1\n", 0o755),
        )
        .image(
            "2.0",
            ImageSpec::module("killed", "2.0")
                .file("bin/tool", "2\n", 0o755)
                .file("data/big", big, 0o644)
                .file(
                    "update-module.d/50hang",
                    "#!/bin/sh\nsleep 300 &\necho $! > \"$AGENT_STATE_DIR/bg.pid\"\nsleep 300\n",
                    0o755,
                ),
        )
        .rootless("killed", 1, "1.0")
        // Pre-pulled so the extraction starts at once.
        .prepare(|sandbox, images, instances| {
            as_user(
                sandbox,
                &instances[0],
                &["podman", "pull", "-q", &images.url("2.0")],
            );
        })
        .daemon(&["--script-timeout", "2"])
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let v2 = s.url("2.0");
    let tree = |dir: &std::path::Path| {
        let mut tree = snapshot(dir);
        tree.retain(|k, _| {
            !k.ends_with(".lock")
                && !k.contains(".imageroot.staging")
                && !k.contains(".module-updater")
        });
        tree
    };
    let before = tree(&instance.install_dir);
    let env_before = std::fs::read(instance.env_file()).unwrap();

    let mut stream = subscribe(connection).await;
    let path = submit(connection, &request(&v2, &[&instance.id], false))
        .await
        .unwrap();
    // Wait for the staging dir, then kill the worker (it runs as the instance user).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let staging = std::fs::read_dir(&instance.install_dir)
            .unwrap()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".imageroot.staging")
            });
        if staging {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "extraction never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let killed = std::process::Command::new("pkill")
        .args([
            "-KILL",
            "-u",
            &instance.id,
            "-f",
            "module-updaterd --worker",
        ])
        .status()
        .unwrap();
    assert!(killed.success(), "no worker to kill");
    let run = follow(connection, &mut stream, path).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "failed", "{result:#}");
    assert_eq!(result["error"]["step"], "extract", "{result:#}");
    assert_eq!(
        tree(&instance.install_dir),
        before,
        "the install dir changed"
    );
    assert_eq!(std::fs::read(instance.env_file()).unwrap(), env_before);
    // The killed worker's directory for podman's temporary files went with it.
    let scratch = format!("module-updater-{}-", instance.id);
    let left: Vec<String> = std::fs::read_dir("/var/tmp")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&scratch))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let lock = instance.state_dir.join(".update-module.lock");
    assert!(
        sandbox
            .run_as(instance, &["flock", "-n", lock.to_str().unwrap(), "true"])
            .unwrap()
            .status
            .success()
    );

    // The same request again: completes, the leftover staging dir is gone, the hung script is
    // killed after its timeout together with its background child.
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "completed", "{result:#}");
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/tool")).unwrap(),
        "2\n"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&instance.install_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".imageroot.staging"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let script = &result["scripts"][0];
    assert_eq!(script["name"], "50hang");
    assert_eq!(script["status"], "timeout");
    let bg: i32 = std::fs::read_to_string(instance.state_dir.join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Gone, or a zombie waiting for a reaper (this machine's PID 1 may not reap).
    let stat = std::fs::read_to_string(format!("/proc/{bg}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next()
        .unwrap_or("");
    assert!(
        stat.is_empty() || state == "Z",
        "the script's child survived: {stat}"
    );
}

/// A module's own `actions/update-module/` steps run merged by name; a failing one fails the
/// instance. A rootful instance is updated by root with its manager reloaded.
#[tokio::test(flavor = "multi_thread")]
async fn module_steps_and_a_rootful_instance() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("stepper", "1.0"))
        .image(
            "good",
            ImageSpec::module("stepper", "2.0")
                .file(
                    "update-module.d/10script",
                    "#!/bin/sh\necho script >> order\n",
                    0o755,
                )
                .file(
                    "actions/update-module/60check",
                    "#!/bin/sh\necho \"check $IMAGE_URL\" >> order\n",
                    0o755,
                ),
        )
        .image(
            "bad",
            ImageSpec::module("stepper", "2.1").file(
                "actions/update-module/60check",
                "#!/bin/sh\nexit 4\n",
                0o755,
            ),
        )
        .rootless("stepper", 1, "1.0")
        .rootful("stepper", 1, "1.0")
        .start()
        .await;
    let connection = s.bus();
    let [rootless, rootful] = &s.instances[..] else {
        unreachable!()
    };
    let [good, bad] = ["good", "bad"].map(|key| s.url(key));

    let run = run_job(
        connection,
        &request(&good, &[&rootless.id, &rootful.id], false),
    )
    .await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    for instance in [&rootless, &rootful] {
        let result = run.instance(&instance.id);
        assert_eq!(result["status"], "completed", "{result:#}");
        assert!(
            result["warnings"].as_array().unwrap().is_empty(),
            "{result:#}"
        );
        let order = std::fs::read_to_string(instance.state_dir.join("order")).unwrap();
        assert_eq!(order, format!("script\ncheck {good}\n"));
        assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], good);
    }
    let run = run_job(connection, &request(&bad, &[&rootless.id], false)).await;
    assert_eq!(run.status, "aborted");
    let result = run.instance(&rootless.id);
    assert_eq!(result["error"]["step"], "module-step", "{result:#}");
    assert!(
        result["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("60check")
    );
    assert!(
        result["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("exit code 4")
    );
}

/// A manager that cannot be reached for the reload is a warning, not a failure (NS8 ignores the
/// reload's outcome); an old image still used by a container is kept with a warning.
#[tokio::test(flavor = "multi_thread")]
async fn reload_failure_and_image_in_use_are_warnings() {
    let mut s = Scenario::new()
        .blob("side1", "sidecar", "1", 1024, 11)
        .blob("side2", "sidecar", "2", 1024, 12)
        .image_with("1.0", |images| {
            ImageSpec::module("warned", "1.0").label("org.nethserver.images", images.url("side1"))
        })
        .image_with("2.0", |images| {
            ImageSpec::module("warned", "2.0").label("org.nethserver.images", images.url("side2"))
        })
        .rootful("warned", 1, "1.0")
        // A container made from the old sidecar image keeps it in use.
        .prepare(|sandbox, images, instances| {
            let side1 = images.url("side1");
            let argv = ["create", "--name", "keeps-sidecar", &side1, "/none"];
            let created = sandbox.podman_as(&instances[0], &argv).unwrap();
            let stderr = String::from_utf8_lossy(&created.stderr);
            assert!(created.status.success(), "{stderr}");
        })
        .without_daemon()
        .start()
        .await;
    // The rootful instances' manager is one that no one answers for.
    let mut command = std::process::Command::new(module_updater_tests::daemon_binary().unwrap());
    let sandbox = &s.sandbox;
    command
        .arg("--config")
        .arg(sandbox.daemon_config().unwrap())
        .arg("--state-dir")
        .arg(sandbox.daemon_state_dir())
        .arg("--address")
        .arg(sandbox.bus_address())
        .arg("--home-base")
        .arg(sandbox.home_base())
        .arg("--rootful-base")
        .arg(sandbox.rootful_base())
        .args(["--system-manager-address", "unix:path=/nonexistent/bus"])
        .args(["--keep-previous", "false"])
        .args(daemon_args(sandbox));
    s.start_daemon_with(command);
    let (sandbox, connection, rootful) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [side1, side2, v1, v2] = ["side1", "side2", "1.0", "2.0"].map(|key| s.url(key));

    let run = run_job(connection, &request(&v2, &[&rootful.id], false)).await;
    let result = run.instance(&rootful.id);
    assert_eq!(result["status"], "completed", "{result:#}");
    let warnings: Vec<&str> = result["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains("daemon-reload failed")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("cannot remove image") && w.contains(&side1)),
        "{warnings:?}"
    );
    let images = sandbox
        .podman_as(rootful, &["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .unwrap();
    let images = String::from_utf8_lossy(&images.stdout).into_owned();
    assert!(
        images.lines().any(|l| l == side1),
        "an image in use is kept: {images}"
    );
    assert!(
        !images.lines().any(|l| l == v1),
        "the unused old module image is removed: {images}"
    );
    assert_eq!(rootful.read_env().unwrap()["SIDECAR_IMAGE"], side2);
}

/// The extra images are pulled while the imageroot is extracted, and the install waits for the
/// pull: a pull that fails leaves the instance exactly as it was and fails at pull-extra-images;
/// an extraction that fails while the pull succeeds fails at extract, with the pull completed.
#[tokio::test(flavor = "multi_thread")]
async fn extra_images_pulled_beside_the_extraction_fail_at_their_own_step() {
    let s = Scenario::new()
        .blob("side1", "overlap-side", "1", 4096, 21)
        .blob("side2", "overlap-side", "2", 4096, 22)
        .image_with("1.0", |images| {
            module_image("overlap", "1.0", &[images.url("side1")]).file("bin/tool", "1\n", 0o755)
        })
        .image_with("missing-extra", |images| {
            // Nothing was ever pushed under this name: its pull fails.
            let never_pushed = format!("{}/never-pushed:1", images.registry());
            let mut spec = module_image("overlap", "2.0-missing", &[never_pushed])
                .file("bin/tool", "2\n", 0o755);
            for i in 0..200 {
                spec = spec.file(format!("share/f{i}"), format!("{i}\n"), 0o644);
            }
            spec
        })
        .image_with("hostile", |images| {
            module_image("overlap", "2.0-hostile", &[images.url("side2")])
                .symlink("bin/up", "../../../../../../etc")
        })
        // A file its owner may not read cannot be flushed on its own: the flush falls back to
        // the whole filesystem, without a warning.
        .image_with("2.0", |images| {
            module_image("overlap", "2.0", &[images.url("side2")])
                .file("bin/tool", "2\n", 0o755)
                .file("bin/write-only", "w\n", 0o200)
        })
        .rootless("overlap", 1, "1.0")
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let [side2, missing_extra, hostile, v2] =
        ["side2", "missing-extra", "hostile", "2.0"].map(|key| s.url(key));
    let tree = |dir: &std::path::Path| {
        let mut tree = snapshot(dir);
        tree.retain(|k, _| {
            !k.ends_with(".lock")
                && !k.starts_with(".imageroot.staging")
                && !k.starts_with(".local/share/containers")
        });
        tree
    };
    let before = tree(&instance.home);
    let env_before = std::fs::read(instance.env_file()).unwrap();
    let marker = instance.state_dir.join(".module-updater.in-progress");

    let run = run_job(connection, &request(&missing_extra, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(run.status, "aborted");
    assert_eq!(result["status"], "failed", "{result:#}");
    assert_eq!(result["error"]["step"], "pull-extra-images", "{result:#}");
    assert!(
        result["error"]["reason"]
            .as_str()
            .unwrap()
            .contains("never-pushed"),
        "{result:#}"
    );
    assert_eq!(
        tree(&instance.home),
        before,
        "a failed pull of an extra image changed the instance"
    );
    assert_eq!(std::fs::read(instance.env_file()).unwrap(), env_before);
    assert!(
        !marker.exists(),
        "nothing changed, so no re-run is owed: the marker is gone"
    );

    let run = run_job(connection, &request(&hostile, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "failed", "{result:#}");
    assert_eq!(result["error"]["step"], "extract", "{result:#}");
    assert_eq!(
        tree(&instance.home),
        before,
        "a refused image changed the instance"
    );
    assert_eq!(std::fs::read(instance.env_file()).unwrap(), env_before);
    assert!(!marker.exists());
    // The pull beside the refused extraction was let finish, not cut off.
    let images = as_user(
        sandbox,
        instance,
        &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(images.lines().any(|l| l == side2), "{images}");
    // And no temporary container is left behind by either failure.
    let containers = as_user(
        sandbox,
        instance,
        &["podman", "ps", "-a", "--format", "{{.Names}}"],
    );
    assert!(containers.trim().is_empty(), "{containers}");

    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "completed", "{result:#}");
    assert_eq!(
        std::fs::read_to_string(instance.install_dir.join("bin/tool")).unwrap(),
        "2\n"
    );
    assert_eq!(instance.read_env().unwrap()["OVERLAP_SIDE_IMAGE"], side2);
    assert!(
        result["warnings"].as_array().unwrap().is_empty(),
        "{result:#}"
    );
    let write_only = std::fs::metadata(instance.install_dir.join("bin/write-only")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&write_only.permissions()) & 0o777,
        0o200
    );
    assert!(!marker.exists());
    let containers = as_user(
        sandbox,
        instance,
        &["podman", "ps", "-a", "--format", "{{.Names}}"],
    );
    assert!(containers.trim().is_empty(), "{containers}");
}

/// The stale images go in one `podman image rm`; when that fails as a whole, each image still
/// gets its own outcome: the removable one is removed (and reported so), the one in use and the
/// one that never existed are warnings naming them.
#[tokio::test(flavor = "multi_thread")]
async fn stale_images_are_removed_together_with_per_image_outcomes() {
    let s = Scenario::new()
        .blob("side1", "batch-side", "1", 1024, 31)
        .blob("side2", "batch-side", "2", 1024, 32)
        .image_with("1.0", |images| {
            module_image("batch", "1.0", &[images.url("side1")])
        })
        .image_with("2.0", |images| {
            module_image("batch", "2.0", &[images.url("side2")])
        })
        .rootless("batch", 1, "1.0")
        .prepare(|sandbox, images, instances| {
            let instance = &instances[0];
            // A container keeps the old extra image in use.
            let side1 = images.url("side1");
            let argv = ["podman", "create", "--name", "keeps-side", &side1, "/none"];
            as_user(sandbox, instance, &argv);
            // A previous image that is not in the storage (removed by hand, say).
            let registry = sandbox.registry();
            let mut env = instance.read_env().unwrap();
            env.insert("GHOST_IMAGE".into(), format!("{registry}/ghost:2"));
            env.insert("PREV_GHOST_IMAGE".into(), format!("{registry}/ghost:1"));
            sandbox.write_env(instance, &env).unwrap();
        })
        .daemon(&["--keep-previous=false"])
        .start()
        .await;
    let (sandbox, connection, instance) = (&s.sandbox, s.bus(), &s.instances[0]);
    let registry = sandbox.registry();
    let ghost = format!("{registry}/ghost:1");
    let [side1, side2, v1, v2] = ["side1", "side2", "1.0", "2.0"].map(|key| s.url(key));

    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
    let result = run.instance(&instance.id);
    assert_eq!(result["status"], "completed", "{result:#}");
    let removed = result["images_removed"].as_array().unwrap();
    assert_eq!(removed, &[serde_json::json!(v1)], "{result:#}");
    let warnings: Vec<&str> = result["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.iter().any(
            |w| w.starts_with(&format!("cannot remove image {side1}:")) && w.contains("in use")
        ),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with(&format!("cannot remove image {ghost}:"))
                && w.contains("image not known")),
        "{warnings:?}"
    );
    let images = as_user(
        sandbox,
        instance,
        &["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
    );
    assert!(!images.lines().any(|l| l == v1), "{images}");
    assert!(images.lines().any(|l| l == side1), "{images}");
    assert!(images.lines().any(|l| l == v2), "{images}");
    assert!(images.lines().any(|l| l == side2), "{images}");
}

/// podman's temporary files (what a pull stages, what `load` unpacks) go to a directory of the
/// update's own in /var/tmp, gone when the update ends; what a killed worker of the instance left
/// there is removed by its next update, and nothing of another instance's.
#[tokio::test(flavor = "multi_thread")]
async fn podmans_temporary_files_go_with_the_update() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scenario::new()
        .module_with_changing_extra("scratch", "scratchdb", 4096)
        .rootless("scratch", 2, "1.0")
        // A podman that notes its TMPDIR for every pull and load.
        .trap("podman", |sandbox, _, _| {
            format!(
                "#!/bin/sh\ncase \" $* \" in\n  *\" pull \"*|*\" load \"*) echo \"$TMPDIR\" >> {record} ;;\nesac\nexec /usr/bin/podman \"$@\"\n",
                record = sandbox.root().join("tmpdirs").display(),
            )
        })
        .prepare(|sandbox, _, _| {
            let record = sandbox.root().join("tmpdirs");
            std::fs::write(&record, "").unwrap();
            std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666)).unwrap();
        })
        .start()
        .await;
    let (sandbox, connection) = (&s.sandbox, s.bus());
    let [updated, other] = &s.instances[..] else {
        unreachable!()
    };
    let v2 = s.url("2.0");
    let record = sandbox.root().join("tmpdirs");
    // What a killed worker of each instance left: a directory with a blob in it.
    let left = |instance: &Instance| {
        let dir = format!("/var/tmp/module-updater-{}-tmp-Killed1", instance.id);
        as_user(sandbox, instance, &["mkdir", &dir]);
        as_user(sandbox, instance, &["touch", &format!("{dir}/blob")]);
        std::path::PathBuf::from(dir)
    };
    let (left_by_updated, left_by_other) = (left(updated), left(other));

    let run = run_job(connection, &request(&v2, &[&updated.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    let tmpdirs = std::fs::read_to_string(&record).unwrap();
    let tmpdirs: std::collections::BTreeSet<&str> = tmpdirs.lines().collect();
    let prefix = format!("/var/tmp/module-updater-{}-tmp-", updated.id);
    assert_eq!(
        tmpdirs.len(),
        1,
        "one directory for the update: {tmpdirs:?}"
    );
    let tmpdir = tmpdirs.first().unwrap();
    assert!(tmpdir.starts_with(&prefix), "{tmpdirs:?}");
    assert!(
        !std::path::Path::new(tmpdir).exists(),
        "{tmpdir} outlived its update"
    );
    assert!(!left_by_updated.exists(), "the stale directory is removed");
    assert!(
        left_by_other.join("blob").exists(),
        "another instance's directory is left alone"
    );
    std::fs::remove_dir_all(&left_by_other).unwrap();
}
