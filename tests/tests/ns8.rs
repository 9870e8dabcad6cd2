//! Inside NS8's cluster: after an update the cluster's copy of the instance's environment (the
//! Redis hash `module/<id>/environment`) equals its file, written with the instance's own Redis
//! credentials; a Redis that is down costs a warning, never the update. Real `redis-server` with
//! NS8-style ACL users.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{PermissionsExt, chown};

use common::*;
use module_updater_tests::{ImageSpec, Instance, Sandbox};

/// Writes the instance's `state/agent.env` with its Redis credentials, owned by it, 0600, as
/// NS8's add-module does.
fn give_credentials(instance: &Instance, password: &str) {
    let path = instance.state_dir.join("agent.env");
    std::fs::write(
        &path,
        format!(
            "REDIS_USER=module/{}\nREDIS_PASSWORD={password}\n",
            instance.id
        ),
    )
    .unwrap();
    chown(&path, Some(instance.uid), Some(instance.gid)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_clusters_copy_of_the_environment_follows_each_update() {
    let mut sandbox = Sandbox::new().unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("clu", "1.0"))
        .unwrap();
    let v2 = sandbox
        .build_image(&ImageSpec::module("clu", "2.0"))
        .unwrap();
    let with = sandbox.add_rootless_instance("clu").unwrap();
    let without = sandbox.add_rootless_instance("clu").unwrap();
    for instance in [&with, &without] {
        sandbox.install(instance, &v1).unwrap();
    }
    let mut redis = sandbox.start_redis().unwrap();
    redis.add_module_user(&with.id, "s3cret").unwrap();
    redis.add_module_user(&without.id, "other").unwrap();
    give_credentials(&with, "s3cret");
    // What the cluster knew before: the old version and a key the file no longer has.
    let key = format!("module/{}/environment", with.id);
    redis
        .cli(&["HSET", &key, "IMAGE_URL", &v1, "STALE_KEY", "x"])
        .unwrap();
    let agent_env = sandbox.root().join("agent.env");
    std::fs::write(
        &agent_env,
        format!(
            "REDIS_ADDRESS={}\nREDIS_REPLICA_ADDRESS=127.0.0.1:6379\n",
            redis.address()
        ),
    )
    .unwrap();
    let flag = format!("--ns8-agent-env={}", agent_env.display());
    let _daemon = start_daemon(&sandbox, &[&flag]);
    let connection = connect(&sandbox).await;

    let run = run_job(&connection, &request(&v2, &[&with.id, &without.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    // Exactly the file, written in one transaction (the stale key is gone).
    assert_eq!(redis.hash(&key).unwrap(), with.read_env().unwrap());
    assert_eq!(redis.hash(&key).unwrap()["IMAGE_URL"], v2);
    assert!(
        run.instance(&with.id)["warnings"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{:#}",
        run.result
    );
    // An instance NS8 gave no credentials: its update completes, the result says why the
    // cluster's copy is stale and when it will be fixed.
    let warnings = run.instance(&without.id)["warnings"].to_string();
    assert!(
        warnings.contains(&format!("module/{}/environment", without.id))
            && warnings.contains("agent.env")
            && warnings.contains("next task"),
        "{warnings}"
    );
    assert!(
        redis
            .hash(&format!("module/{}/environment", without.id))
            .unwrap()
            .is_empty()
    );

    // Redis down after the update: the update completes, with a warning naming Redis.
    redis.stop();
    let run = run_job(&connection, &request(&v1, &[&with.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert_eq!(with.read_env().unwrap()["IMAGE_URL"], v1);
    let warnings = run.instance(&with.id)["warnings"].to_string();
    assert!(
        warnings.contains("was not refreshed") && warnings.contains(&redis.address()),
        "{warnings}"
    );
}

/// Not an NS8 node (no agent settings file): nothing is sent and nothing is said.
#[tokio::test(flavor = "multi_thread")]
async fn off_an_ns8_node_nothing_is_sent_or_said() {
    let mut sandbox = Sandbox::new().unwrap();
    let v1 = sandbox
        .build_image(&ImageSpec::module("solo", "1.0"))
        .unwrap();
    let v2 = sandbox
        .build_image(&ImageSpec::module("solo", "2.0"))
        .unwrap();
    let instance = sandbox.add_rootless_instance("solo").unwrap();
    sandbox.install(&instance, &v1).unwrap();
    give_credentials(&instance, "unused");
    let missing = sandbox.root().join("no-agent.env");
    let flag = format!("--ns8-agent-env={}", missing.display());
    let daemon = start_daemon(&sandbox, &[&flag]);
    let connection = connect(&sandbox).await;
    let run = run_job(&connection, &request(&v2, &[&instance.id], false)).await;
    assert_eq!(run.status, "completed", "{:#}", run.result);
    assert!(
        run.instance(&instance.id)["warnings"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{:#}",
        run.result
    );
    assert!(!daemon.log().contains("Redis"), "{}", daemon.log());
}
