//! `module-updater ns8 update`: a cluster-wide update through NS8's own task bus. Run on the
//! leader, it finds each instance's node in the cluster's Redis (`cluster/module_node`), sends
//! one `update-module-instances` task per node the way NS8's task clients do (subscribe to the
//! task's progress channel, then LPUSH the task onto `node/<N>/tasks`), follows the nodes'
//! progress and reads each task's result keys (`task/node/<N>/<id>/{output,error,exit_code}`).
//! Each node's agent runs the action, whose step hands the request to that node's daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{ClientError, exit};

/// The node action the package installs on every NS8 node.
pub const NODE_ACTION: &str = "update-module-instances";
/// An agent is alive when its connection was used this recently (NS8's task clients' rule; the
/// agents BRPOP with a 5 s timeout).
const ALIVE_IDLE_SECS: u64 = 8;
/// A node whose agent publishes nothing for this long (it sends a heartbeat every 5 s) is lost.
const SILENCE: Duration = Duration::from_secs(60);

/// Where the cluster's Redis is and who we are there.
pub struct Access {
    pub agent_env: PathBuf,
    pub credentials: PathBuf,
}

/// One node's part of the update.
#[derive(Debug, Clone, PartialEq)]
struct NodeOutcome {
    status: String,
    exit_code: i32,
    output: Value,
    error: String,
}

fn local(what: impl Into<String>, reason: impl std::fmt::Display) -> ClientError {
    ClientError::Local {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// `KEY=VALUE` lines of an agent environment file (values may be quoted).
fn read_env(path: &Path) -> Result<BTreeMap<String, String>, ClientError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| local(format!("read {}", path.display()), e))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect())
}

fn connect(access: &Access) -> Result<redis::Client, ClientError> {
    let node = read_env(&access.agent_env)?;
    let address = node.get("REDIS_ADDRESS").ok_or_else(|| {
        local(
            "find the cluster's Redis",
            format!("{} has no REDIS_ADDRESS", access.agent_env.display()),
        )
    })?;
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| {
            local(
                "find the cluster's Redis",
                format!("REDIS_ADDRESS {address:?} is not HOST:PORT"),
            )
        })?;
    // The caller's own credentials (an NS8 action step has them) win over the cluster agent's.
    let from_file = read_env(&access.credentials).unwrap_or_default();
    let value = |key: &str| {
        std::env::var(key)
            .ok()
            .or_else(|| from_file.get(key).cloned())
    };
    let (Some(user), Some(password)) = (value("REDIS_USER"), value("REDIS_PASSWORD")) else {
        return Err(local(
            "log in to the cluster's Redis",
            format!(
                "no REDIS_USER/REDIS_PASSWORD in the environment or in {} (run this on the \
                 cluster's leader as root, or pass --credentials)",
                access.credentials.display()
            ),
        ));
    };
    let info =
        redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp(host, port))
            .map_err(|e| local("reach the cluster's Redis", e))?
            .set_redis_settings(
                redis::RedisConnectionInfo::default()
                    .set_username(user)
                    .set_password(password),
            );
    redis::Client::open(info).map_err(|e| local("reach the cluster's Redis", e))
}

fn redis_error(what: &str) -> impl Fn(redis::RedisError) -> ClientError + '_ {
    move |e| local(what, e)
}

/// Runs the update over the cluster; prints the combined result JSON; the exit code as `run`.
pub fn update(request: &str, access: &Access) -> Result<u8, ClientError> {
    let parsed: Value = serde_json::from_str(request)
        .map_err(|e| local("read the request", format!("it is not JSON: {e}")))?;
    let instances: Vec<String> = parsed["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if instances.is_empty() {
        return Err(local(
            "read the request",
            "it names no instances: {\"module_url\": URL, \"instances\": [ID, ...]}",
        ));
    }
    let client = connect(access)?;
    let mut redis = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(redis_error("reach the cluster's Redis"))?;
    // Each instance's node, as the cluster keeps it.
    let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (index, instance) in instances.iter().enumerate() {
        let node: Option<String> = redis::cmd("HGET")
            .arg("cluster/module_node")
            .arg(instance)
            .query(&mut redis)
            .map_err(redis_error("read cluster/module_node"))?;
        match node {
            Some(node) => by_node.entry(node).or_default().push(instance.clone()),
            None => unknown.push(json!({
                "field": format!("instances.{index}"),
                "parameter": "instances",
                "value": instance,
                "error": "instances_instance_not_found",
            })),
        }
    }
    if !unknown.is_empty() {
        return Err(ClientError::Validation {
            array: Value::Array(unknown).to_string(),
            summary: "the cluster runs no such instance (see cluster/module_node)".to_owned(),
        });
    }
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut redis)
        .map_err(redis_error("list the agents connected to Redis"))?;
    let started = Instant::now();
    let outcomes: BTreeMap<String, NodeOutcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = by_node
            .iter()
            .map(|(node, ids)| {
                let mut data = parsed.clone();
                data["instances"] = json!(ids);
                let alive = agent_alive(&clients, node);
                let client = &client;
                let handle = scope.spawn(move || {
                    if !alive {
                        return NodeOutcome {
                            status: "aborted".into(),
                            exit_code: 1,
                            output: Value::Null,
                            error: format!(
                                "the agent of node {node} is not running (no Redis client named \
                                 node/{node} active in the last {ALIVE_IDLE_SECS} s): its \
                                 instances were not updated"
                            ),
                        };
                    }
                    run_on_node(client, node, &data).unwrap_or_else(|err| NodeOutcome {
                        status: "aborted".into(),
                        exit_code: 1,
                        output: Value::Null,
                        error: err.to_string(),
                    })
                });
                (node.clone(), handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(node, handle)| {
                let outcome = handle.join().unwrap_or_else(|_| NodeOutcome {
                    status: "aborted".into(),
                    exit_code: 1,
                    output: Value::Null,
                    error: "the client's thread for this node failed".into(),
                });
                (node, outcome)
            })
            .collect()
    });
    let validation = outcomes.values().any(|o| o.status == "validation-failed");
    let ok = outcomes.values().all(|o| o.exit_code == 0);
    let (status, code) = if ok {
        ("completed", exit::SUCCESS)
    } else if validation {
        ("validation-failed", exit::VALIDATION)
    } else {
        ("aborted", exit::FAILED)
    };
    let nodes: serde_json::Map<String, Value> = outcomes
        .iter()
        .map(|(node, o)| {
            (
                node.clone(),
                json!({"status": o.status, "exit_code": o.exit_code, "output": o.output,
                       "error": o.error}),
            )
        })
        .collect();
    let result = json!({"status": status, "exit_code": code, "nodes": nodes});
    println!("{result}");
    for (node, outcome) in &outcomes {
        eprintln!(
            "node {node}: {} (exit code {}){}",
            outcome.status,
            outcome.exit_code,
            if outcome.error.trim().is_empty() || outcome.exit_code == 0 {
                String::new()
            } else {
                format!(": {}", outcome.error.trim())
            }
        );
    }
    eprintln!("{status} in {:.1} s", started.elapsed().as_secs_f64());
    Ok(code)
}

/// Whether `CLIENT LIST` shows the node's agent connected and active.
fn agent_alive(clients: &str, node: &str) -> bool {
    let name = format!("name=node/{node}");
    clients.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.contains(&name.as_str())
            && fields
                .iter()
                .find_map(|f| f.strip_prefix("idle="))
                .and_then(|i| i.parse::<u64>().ok())
                .is_some_and(|idle| idle <= ALIVE_IDLE_SECS)
    })
}

/// A task id as NS8's clients make them (a random UUID).
fn task_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut random, &mut bytes);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Sends the task to one node and follows it to its end.
fn run_on_node(
    client: &redis::Client,
    node: &str,
    data: &Value,
) -> Result<NodeOutcome, ClientError> {
    let id = task_id();
    let agent = format!("node/{node}");
    let channel = format!("progress/{agent}/task/{id}");
    let mut listener = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(redis_error("reach the cluster's Redis"))?;
    listener
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(redis_error("reach the cluster's Redis"))?;
    let mut pubsub = listener.as_pubsub();
    // Subscribed before the task exists: its first progress cannot be missed.
    pubsub
        .subscribe(&channel)
        .map_err(redis_error("subscribe to the node's progress"))?;
    let task = json!({
        "id": id, "action": NODE_ACTION, "data": data,
        "extra": {"title": format!("module-updater: update {}", data["instances"])},
        "parent": "", "user": "",
    });
    let mut sender = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(redis_error("reach the cluster's Redis"))?;
    redis::cmd("LPUSH")
        .arg(format!("{agent}/tasks"))
        .arg(task.to_string())
        .query::<()>(&mut sender)
        .map_err(redis_error("send the task"))?;
    let mut last_heard = Instant::now();
    let mut shown = None;
    loop {
        match pubsub.get_message() {
            Ok(message) => {
                last_heard = Instant::now();
                let payload: String = message.get_payload().unwrap_or_default();
                let progress: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
                let percent = progress["progress"].as_u64().unwrap_or(0);
                let status = progress["status"].as_str().unwrap_or("").to_owned();
                if shown != Some((percent, status.clone())) {
                    eprintln!("node {node}: {percent}% {status}");
                    shown = Some((percent, status.clone()));
                }
                if matches!(
                    status.as_str(),
                    "completed" | "aborted" | "validation-failed"
                ) {
                    break;
                }
            }
            Err(err) if err.is_timeout() => {
                if last_heard.elapsed() > SILENCE {
                    return Err(local(
                        format!("follow the task {id} on node {node}"),
                        format!("its agent published nothing for {} s", SILENCE.as_secs()),
                    ));
                }
            }
            Err(err) => return Err(local(format!("follow the task {id} on node {node}"), err)),
        }
    }
    let keys: Vec<String> = ["output", "error", "exit_code"]
        .iter()
        .map(|k| format!("task/{agent}/{id}/{k}"))
        .collect();
    // A status can be published before the result keys are written (the validation status,
    // set by a step): wait for the exit code, which the agent writes with the rest.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (output, error, exit_code) = loop {
        let values: (Option<String>, Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(&keys)
            .query(&mut sender)
            .map_err(redis_error("read the task's result"))?;
        if values.2.is_some() || Instant::now() >= deadline {
            break values;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let exit_code = exit_code
        .and_then(|c| c.trim().parse::<i32>().ok())
        .unwrap_or(1);
    let output_text = output.unwrap_or_default();
    let output = serde_json::from_str(&output_text).unwrap_or(Value::String(output_text));
    let status = match exit_code {
        0 => "completed",
        10 => "validation-failed",
        _ => "aborted",
    };
    Ok(NodeOutcome {
        status: status.to_owned(),
        exit_code,
        output,
        error: error.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_is_alive_when_recently_active() {
        let clients = "id=3 addr=127.0.0.1:1 name=node/1 age=60 idle=2 cmd=brpop\n\
                       id=4 addr=127.0.0.1:2 name=node/2 age=60 idle=30 cmd=brpop\n\
                       id=5 addr=127.0.0.1:3 name=node/11 age=6 idle=0 cmd=brpop\n";
        assert!(agent_alive(clients, "1"));
        assert!(!agent_alive(clients, "2"), "idle for 30 s");
        assert!(!agent_alive(clients, "3"), "not connected");
    }

    #[test]
    fn task_ids_are_uuids() {
        let id = task_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, task_id());
    }
}
