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
    let mut s = Scenario::new()
        .module("clu", &["1.0", "2.0"])
        .rootless("clu", 2, "1.0")
        .without_daemon()
        .start()
        .await;
    let mut redis = s.sandbox.start_redis().unwrap();
    let [with, without] = &s.instances[..] else {
        unreachable!()
    };
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));
    redis.add_module_user(&with.id, "s3cret").unwrap();
    redis.add_module_user(&without.id, "other").unwrap();
    give_credentials(with, "s3cret");
    // What the cluster knew before: the old version and a key the file no longer has.
    let key = format!("module/{}/environment", with.id);
    redis
        .cli(&["HSET", &key, "IMAGE_URL", &v1, "STALE_KEY", "x"])
        .unwrap();
    let agent_env = s.sandbox.root().join("agent.env");
    std::fs::write(
        &agent_env,
        format!(
            "REDIS_ADDRESS={}\nREDIS_REPLICA_ADDRESS=127.0.0.1:6379\n",
            redis.address()
        ),
    )
    .unwrap();
    let flag = format!("--ns8-agent-env={}", agent_env.display());
    s.restart_daemon_with(DaemonOptions::new().args(&[&flag]));
    let connection = s.bus();
    let [with, without] = &s.instances[..] else {
        unreachable!()
    };

    let run = run_job(connection, &request(&v2, &[&with.id, &without.id], false)).await;
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
    let back =
        serde_json::json!({"module_url": v1, "instances": [with.id], "allow_downgrade": true});
    let run = run_job(connection, &back.to_string()).await;
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
    let mut s = Scenario::new()
        .module("solo", &["1.0", "2.0"])
        .rootless("solo", 1, "1.0")
        .prepare(|_, _, instances| give_credentials(&instances[0], "unused"))
        .without_daemon()
        .start()
        .await;
    let missing = s.sandbox.root().join("no-agent.env");
    let flag = format!("--ns8-agent-env={}", missing.display());
    s.restart_daemon_with(DaemonOptions::new().args(&[&flag]));
    let (connection, daemon) = (s.bus(), s.daemon());
    let (instance, v2) = (&s.instances[0], s.url("2.0"));
    let run = run_job(connection, &request(&v2, &[&instance.id], false)).await;
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

/// A stand-in for a node's NS8 agent (`tests/src/bin/ns8-agent.rs`) serving `node/<n>` with the
/// node action this package ships, its client talking to `sandbox`'s bus.
struct NodeAgent {
    child: std::process::Child,
}

impl NodeAgent {
    fn start(sandbox: &Sandbox, node: &str, redis: &module_updater_tests::Redis) -> NodeAgent {
        let binary =
            module_updater_tests::find_binary("ns8-agent", "MODULE_UPDATER_NS8_AGENT").unwrap();
        let client = module_updater_tests::client_binary().unwrap();
        let state = sandbox.root().join(format!("node{node}-state"));
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("environment"), format!("NODE_ID={node}\n")).unwrap();
        let actions = concat!(env!("CARGO_MANIFEST_DIR"), "/../client/ns8");
        let child = std::process::Command::new(binary)
            .args([
                "--redis",
                &redis.address(),
                "--user",
                &format!("node/{node}"),
            ])
            .args([
                "--password",
                "node-secret",
                "--agent",
                &format!("node/{node}"),
            ])
            .args(["--state-dir", &state.display().to_string()])
            .args(["--actions-dir", actions])
            .env("DBUS_SYSTEM_BUS_ADDRESS", sandbox.bus_address())
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    client.parent().unwrap().display()
                ),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(sandbox.root().join(format!("node{node}.log"))).unwrap())
            .spawn()
            .unwrap();
        // Alive as NS8's clients see it: a connection named after the agent.
        let started = std::time::Instant::now();
        while !text(&redis.cli(&["CLIENT", "LIST"]).unwrap().stdout)
            .contains(&format!("name=node/{node}"))
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "node {node}'s agent never connected"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        NodeAgent { child }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `module-updater ns8 update` on the leader: (exit code, the combined result, stderr).
fn ns8_update(
    leader: &Sandbox,
    agent_env: &std::path::Path,
    credentials: &std::path::Path,
    request: &str,
) -> (i32, serde_json::Value, String) {
    let out = std::process::Command::new(module_updater_tests::client_binary().unwrap())
        .args(["ns8", "update", "--data", request])
        .arg(format!("--agent-env={}", agent_env.display()))
        .arg(format!("--credentials={}", credentials.display()))
        .env_remove("REDIS_USER")
        .env_remove("REDIS_PASSWORD")
        .output()
        .unwrap();
    let _ = leader;
    let stdout = text(&out.stdout);
    let result = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", text(&out.stderr)));
    (out.status.code().unwrap_or(-1), result, text(&out.stderr))
}

/// Two nodes (two sandboxes: each its bus, daemon, instances and stand-in node agent) and one
/// Redis: the leader's `ns8 update` sends one task per node through Redis, follows them, and
/// prints one result; a validation error of a node arrives as NS8's validation-failed; a node
/// whose agent is down is reported for that node while the other completes.
#[tokio::test(flavor = "multi_thread")]
async fn ns8_update_runs_on_every_node_through_the_clusters_task_bus() {
    let mut one = Sandbox::new().unwrap();
    let mut two = Sandbox::new().unwrap();
    let v1 = one.build_image(&ImageSpec::module("fan", "1.0")).unwrap();
    let v2 = one.build_image(&ImageSpec::module("fan", "2.0")).unwrap();
    let a = one.add_rootless_instance("fan").unwrap();
    let b = two.add_rootless_instance("fan").unwrap();
    one.install(&a, &v1).unwrap();
    two.install(&b, &v1).unwrap();
    let redis = one.start_redis().unwrap();
    for node in ["1", "2"] {
        redis
            .add_user(&format!("node/{node}"), "node-secret", &["~*", "&*"])
            .unwrap();
    }
    redis
        .add_user("cluster", "cluster-secret", &["~*", "&*"])
        .unwrap();
    for (instance, password) in [(&a, "a-secret"), (&b, "b-secret")] {
        redis.add_module_user(&instance.id, password).unwrap();
        give_credentials(instance, password);
    }
    redis
        .cli(&["HSET", "cluster/module_node", &a.id, "1", &b.id, "2"])
        .unwrap();
    let agent_env = one.root().join("agent.env");
    std::fs::write(&agent_env, format!("REDIS_ADDRESS={}\n", redis.address())).unwrap();
    let credentials = one.root().join("cluster-agent.env");
    std::fs::write(
        &credentials,
        "REDIS_USER=cluster\nREDIS_PASSWORD=cluster-secret\n",
    )
    .unwrap();
    let flag = format!("--ns8-agent-env={}", agent_env.display());
    let _daemon_one = start_daemon(&one, &[&flag]);
    let _daemon_two = start_daemon(&two, &[&flag]);
    let _agent_one = NodeAgent::start(&one, "1", &redis);
    let mut agent_two = NodeAgent::start(&two, "2", &redis);

    let update = request(&v2, &[&a.id, &b.id], false);
    let (code, result, stderr) = ns8_update(&one, &agent_env, &credentials, &update);
    assert_eq!(code, 0, "{result:#}\n{stderr}");
    assert_eq!(result["status"], "completed");
    for (node, instance) in [("1", &a), ("2", &b)] {
        let part = &result["nodes"][node];
        assert_eq!(part["exit_code"], 0, "{result:#}");
        // The node's output is its daemon's job result, as `run update-module` prints it.
        assert_eq!(
            part["output"]["instances"][&instance.id]["status"], "completed",
            "{result:#}"
        );
        assert_eq!(instance.read_env().unwrap()["IMAGE_URL"], v2);
        // The cluster's copy of each instance's environment equals its file.
        assert_eq!(
            redis
                .hash(&format!("module/{}/environment", instance.id))
                .unwrap(),
            instance.read_env().unwrap()
        );
        // Each node's progress, as shown, only goes up.
        let shown: Vec<u64> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("node {node}: ")))
            .filter_map(|l| l.split('%').next()?.parse().ok())
            .collect();
        assert!(!shown.is_empty(), "{stderr}");
        assert!(
            shown.windows(2).all(|w| w[0] <= w[1]),
            "{shown:?}\n{stderr}"
        );
        assert_eq!(shown.last(), Some(&100), "{stderr}");
    }

    // A request a node's daemon refuses: NS8's validation-failed, with its array.
    let bad =
        serde_json::json!({"module_url": v2, "instances": [a.id], "force": "yes"}).to_string();
    let (code, result, stderr) = ns8_update(&one, &agent_env, &credentials, &bad);
    assert_eq!(code, 10, "{result:#}\n{stderr}");
    assert_eq!(result["status"], "validation-failed");
    assert_eq!(result["nodes"]["1"]["status"], "validation-failed");
    assert_eq!(
        result["nodes"]["1"]["output"][0]["error"], "force_invalid_type",
        "{result:#}"
    );

    // Node 2's agent is down: node 2 is reported, node 1 completes.
    agent_two.child.kill().unwrap();
    let _ = agent_two.child.wait();
    let back = serde_json::json!(
        {"module_url": v1, "instances": [a.id, b.id], "allow_downgrade": true}
    )
    .to_string();
    let (code, result, stderr) = ns8_update(&one, &agent_env, &credentials, &back);
    assert_eq!(code, 1, "{result:#}\n{stderr}");
    assert_eq!(result["nodes"]["1"]["status"], "completed", "{result:#}");
    assert_eq!(result["nodes"]["2"]["status"], "aborted", "{result:#}");
    assert!(
        result["nodes"]["2"]["error"]
            .as_str()
            .unwrap()
            .contains("agent of node 2 is not running"),
        "{result:#}"
    );
    assert_eq!(a.read_env().unwrap()["IMAGE_URL"], v1);
    assert_eq!(
        b.read_env().unwrap()["IMAGE_URL"],
        v2,
        "node 2 was left alone"
    );
}
