//! A stand-in for NS8's agent (a Go program whose dependencies are not packaged here), following
//! its documented task protocol so that the node action this project ships runs as on a node:
//! BRPOP `<agent>/tasks` (5 s timeout) on a connection named after the agent; for a task, the
//! action's steps from each actions directory (a later directory wins by name), sorted by name;
//! each step with stdin the task's data, fd 3 the command channel (`set-progress`,
//! `set-status validation-failed`, `set-weight`), the environment plus the state dir's
//! `environment` and `AGENT_COMFD=3`, `AGENT_TASK_ID`, `AGENT_TASK_ACTION`, `AGENT_TASK_USER`, cwd
//! the state dir, stdout to the output, stderr to the error; progress published on
//! `progress/<agent>/task/<id>` (at start, per command, per step end, every 5 s); at the end, in
//! one transaction, `<agent>/environment` mirrored from the state dir and
//! `task/<agent>/<id>/{output,error,exit_code}` (8 h), then the final status.
//!
//! Not done by the stand-in: the JSON schema check of `validate-input.json` (a pseudo-step of
//! weight 0 here), concurrency limits, `cancel-task`.
//!
//! Usage: `ns8-agent --redis HOST:PORT --user U --password P --agent node/1 --state-dir DIR
//! --actions-dir DIR [--actions-dir DIR ...]`. It runs until killed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Clone)]
struct Options {
    redis: String,
    user: String,
    password: String,
    agent: String,
    state_dir: PathBuf,
    actions_dirs: Vec<PathBuf>,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        found.entry(flag).or_default().push(value);
    }
    let one = |flag: &str| {
        found
            .get(flag)
            .and_then(|v| v.first().cloned())
            .ok_or(format!("{flag} is required"))
    };
    Ok(Options {
        redis: one("--redis")?,
        user: one("--user")?,
        password: one("--password")?,
        agent: one("--agent")?,
        state_dir: one("--state-dir")?.into(),
        actions_dirs: found
            .get("--actions-dir")
            .map(|v| v.iter().map(PathBuf::from).collect())
            .unwrap_or_default(),
    })
}

fn connect(o: &Options) -> redis::RedisResult<redis::Connection> {
    let (host, port) = o.redis.rsplit_once(':').unwrap_or((&o.redis, "6379"));
    let info = redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp(
        host.to_owned(),
        port.parse().unwrap_or(6379),
    ))?
    .set_redis_settings(
        redis::RedisConnectionInfo::default()
            .set_username(&o.user)
            .set_password(&o.password),
    );
    redis::Client::open(info)?.get_connection()
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(err) => {
            eprintln!("ns8-agent: {err}");
            std::process::exit(2);
        }
    };
    loop {
        if let Err(err) = serve(&o) {
            eprintln!("ns8-agent {}: {err}; reconnecting", o.agent);
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn serve(o: &Options) -> redis::RedisResult<()> {
    let mut tasks = connect(o)?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&o.agent)
        .query::<()>(&mut tasks)?;
    loop {
        let popped: Option<(String, String)> = redis::cmd("BRPOP")
            .arg(format!("{}/tasks", o.agent))
            .arg(5)
            .query(&mut tasks)?;
        if let Some((_, task)) = popped {
            let task: Value = serde_json::from_str(&task).unwrap_or(Value::Null);
            run_task(o, &task)?;
        }
    }
}

/// The task's progress as NS8 computes it: finished steps' weights plus the running step's
/// percent of its weight, over all weights.
struct Progress {
    weights: Vec<u64>,
    step: usize,
    percent: u64,
    status: String,
}

impl Progress {
    fn value(&self) -> u64 {
        let total: u64 = self.weights.iter().map(|w| 100 * w).sum();
        if total == 0 {
            return 0;
        }
        let done: u64 = self.weights[..self.step].iter().map(|w| 100 * w).sum();
        let current = self.weights.get(self.step).copied().unwrap_or(0);
        (done + self.percent * current) * 100 / total
    }
}

fn publish(o: &Options, id: &str, progress: &Mutex<Progress>) {
    let Ok(mut connection) = connect(o) else {
        return;
    };
    let (status, value) = {
        let p = progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (p.status.clone(), p.value())
    };
    let _ = redis::cmd("PUBLISH")
        .arg(format!("progress/{}/task/{id}", o.agent))
        .arg(json!({"status": status, "progress": value}).to_string())
        .query::<()>(&mut connection);
}

/// The action's steps: every non-directory entry of `<dir>/<action>/`, a later directory's file
/// replacing an earlier one of the same name, sorted by name.
fn steps(o: &Options, action: &str) -> Vec<(String, PathBuf)> {
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in &o.actions_dirs {
        let Ok(entries) = std::fs::read_dir(dir.join(action)) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| !t.is_dir())
                && let Ok(name) = entry.file_name().into_string()
            {
                found.insert(name, entry.path());
            }
        }
    }
    found.into_iter().collect()
}

fn read_environment(state_dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(state_dir.join("environment"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn run_task(o: &Options, task: &Value) -> redis::RedisResult<()> {
    let id = task["id"].as_str().unwrap_or("unknown").to_owned();
    let action = task["action"].as_str().unwrap_or("").to_owned();
    let data = task["data"].to_string();
    let steps = steps(o, &action);
    let weights = steps
        .iter()
        .map(|(name, _)| u64::from(!name.ends_with(".json")))
        .collect();
    let progress = Arc::new(Mutex::new(Progress {
        weights,
        step: 0,
        percent: 0,
        status: "pending".into(),
    }));
    publish(o, &id, &progress);
    let heartbeat = {
        let (o2, id2, p2) = (o.clone(), id.clone(), Arc::clone(&progress));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(5));
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    publish(&o2, &id2, &p2);
                }
            }
        });
        (stop, thread)
    };
    let mut output = Vec::new();
    let mut error = Vec::new();
    let mut exit_code = 0;
    let mut validation_failed = false;
    if steps.is_empty() {
        error.extend_from_slice(format!("action {action} not found\n").as_bytes());
        exit_code = 8;
    }
    for (index, (name, path)) in steps.iter().enumerate() {
        {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.step = index;
            p.percent = 0;
            p.status = if validation_failed {
                "validation-failed".into()
            } else {
                "running".into()
            };
        }
        if name.ends_with(".json") {
            continue;
        }
        publish(o, &id, &progress);
        let (code, out, err, failed) = run_step(o, &id, &action, path, &data, &progress);
        output.extend(out);
        error.extend(err);
        validation_failed |= failed;
        {
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.percent = 100;
        }
        publish(o, &id, &progress);
        match code {
            // A step that cannot start is skipped, as the agent does.
            None => continue,
            Some(0) if validation_failed => {
                exit_code = 10;
                break;
            }
            Some(0) => {}
            Some(code) => {
                exit_code = code;
                break;
            }
        }
    }
    heartbeat.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = heartbeat.1.join();
    let status = if validation_failed {
        "validation-failed"
    } else if exit_code == 0 {
        "completed"
    } else {
        "aborted"
    };
    let mut connection = connect(o)?;
    let environment = read_environment(&o.state_dir);
    let env_key = format!("{}/environment", o.agent);
    let prefix = format!("task/{}/{id}", o.agent);
    let mut transaction = redis::pipe();
    transaction.atomic().del(&env_key).ignore();
    if !environment.is_empty() {
        transaction.hset_multiple(&env_key, &environment).ignore();
    }
    transaction
        .set_ex(format!("{prefix}/output"), output, 28_800)
        .ignore()
        .set_ex(format!("{prefix}/error"), error, 28_800)
        .ignore()
        .set_ex(format!("{prefix}/exit_code"), exit_code, 28_800)
        .ignore();
    transaction.query::<()>(&mut connection)?;
    {
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        p.status = status.into();
        p.step = p.weights.len();
        p.percent = 0;
    }
    publish(o, &id, &progress);
    Ok(())
}

/// Runs one step; (exit code or None when it could not start, stdout, stderr, whether it set
/// the validation-failed status).
fn run_step(
    o: &Options,
    id: &str,
    action: &str,
    path: &Path,
    data: &str,
    progress: &Arc<Mutex<Progress>>,
) -> (Option<i32>, Vec<u8>, Vec<u8>, bool) {
    let Ok((reader, writer)) = nix::unistd::pipe() else {
        return (
            Some(1),
            Vec::new(),
            b"cannot make the command pipe\n".to_vec(),
            false,
        );
    };
    // fd 3 of the step is the pipe's write end: the shell moves it there, then runs the step.
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(format!(
            "exec 3>&{} {}>&-; exec \"$0\"",
            writer.as_raw_fd(),
            writer.as_raw_fd()
        ))
        .arg(path)
        .current_dir(&o.state_dir)
        .envs(read_environment(&o.state_dir))
        .env("AGENT_COMFD", "3")
        .env("AGENT_TASK_ID", id)
        .env("AGENT_TASK_ACTION", action)
        .env("AGENT_TASK_USER", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(_) => return (None, Vec::new(), Vec::new(), false),
    };
    drop(writer);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(data.as_bytes());
    }
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let commands = {
        let (o2, id2, p2, failed2) = (
            o.clone(),
            id.to_owned(),
            Arc::clone(progress),
            Arc::clone(&failed),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(std::fs::File::from(reader)).lines() {
                let Ok(line) = line else { break };
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["set-progress", n] => {
                        if let Ok(n) = n.parse::<u64>()
                            && n <= 100
                        {
                            p2.lock().unwrap_or_else(|e| e.into_inner()).percent = n;
                            publish(&o2, &id2, &p2);
                        }
                    }
                    ["set-status", "validation-failed"] => {
                        failed2.store(true, std::sync::atomic::Ordering::SeqCst);
                        p2.lock().unwrap_or_else(|e| e.into_inner()).status =
                            "validation-failed".into();
                    }
                    _ => eprintln!("ns8-agent: unknown command {line:?}"),
                }
            }
        })
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buffer);
        }
        buffer
    });
    let err_thread = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buffer);
        }
        buffer
    });
    let status = child.wait();
    let out = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    let _ = commands.join();
    let code = status.ok().map(|s| s.code().unwrap_or(-1));
    (
        code,
        out,
        err,
        failed.load(std::sync::atomic::Ordering::SeqCst),
    )
}
