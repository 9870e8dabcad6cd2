//! End-to-end tests of the `module-updater` client: the real binary against the real daemon on the
//! sandbox bus, judged by what a person or a script sees (exit codes, stdout, stderr, a terminal).

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use module_updater_tests::{ImageSpec, Instance, Sandbox, client_binary};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// How long any one client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

/// A finished client run.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    fn expect(self, code: i32) -> Out {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        self
    }

    /// Every error is one line on stderr.
    fn one_error_line(&self) -> &str {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one error line: {self:#?}");
        assert!(lines[0].starts_with("module-updater: "), "{self:#?}");
        lines[0]
    }
}

fn client(sandbox: &Sandbox) -> Command {
    sandbox
        .client()
        .expect("the module-updater binary (cargo build -p module-updater)")
}

fn run_with(mut command: Command, stdin: Option<&str>) -> Out {
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(CLIENT_TIMEOUT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("the client did not finish within {CLIENT_TIMEOUT:?}: {command:?}");
        }
    };
    Out {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn run(sandbox: &Sandbox, args: &[&str]) -> Out {
    let mut command = client(sandbox);
    command.args(args);
    run_with(command, None)
}

/// A client left running (a followed job, a monitor); its output goes to files we can read live.
struct Background {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    fn start(sandbox: &Sandbox, name: &str, args: &[&str]) -> Background {
        let stdout = sandbox.root().join(format!("{name}.stdout"));
        let stderr = sandbox.root().join(format!("{name}.stderr"));
        let mut command = client(sandbox);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        Background {
            child: command.spawn().unwrap(),
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn interrupt(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT).unwrap();
    }

    /// Waits until `what` holds, failing with the client's output after `timeout`.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Background) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !probe(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the client exited ({status}) before {what}: {}\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}: stdout {:?} stderr {:?}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the client did not exit within {timeout:?}: stdout {:?} stderr {:?}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Out {
            code: status.code().unwrap_or(-1),
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The job id in the first plain line, `2026-11-30T17:00:00Z job 7: app1`.
fn job_id_of(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|line| {
            let rest = line.split_once(" job ")?.1;
            rest.split_once(':')?.0.parse().ok()
        })
        .unwrap_or_else(|| panic!("no job line in {stderr:?}"))
}

/// `2026-11-30T17:00:00Z text` or, in a time zone, `2026-11-30T22:30:00+05:30 text`.
fn is_timestamped(line: &str) -> bool {
    let b = line.as_bytes();
    let date_time = line.len() > 21
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && line[..4].bytes().all(|c| c.is_ascii_digit());
    let zone = match b.get(19) {
        Some(b'Z') => b.get(20) == Some(&b' '),
        Some(b'+' | b'-') => b.get(22) == Some(&b':') && b.get(25) == Some(&b' '),
        _ => false,
    };
    date_time && zone
}

/// The repository of an image URL: `127.0.0.1:5000/app:1.0` → `127.0.0.1:5000/app`.
fn repository(url: &str) -> &str {
    url.rsplit_once(':').map_or(url, |(repo, _)| repo)
}

/// Candidates bash's completion shows for `words` (the last is the word being completed), through
/// the completion script the package installs, with the client found in PATH.
fn bash_completions(sandbox: &Sandbox, words: &[&str]) -> Out {
    let script = sandbox.root().join("completion.bash");
    let generated = run(sandbox, &["generate", "completions", "bash"]).expect(0);
    std::fs::write(&script, generated.stdout).unwrap();
    let bin_dir = client_binary().unwrap().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_TYPE=9\n\
         _clap_complete_module_updater module-updater '{}' '{}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let mut command = Command::new("bash");
    command.args(["-c", &program]).env("PATH", path);
    run_with(command, None)
}

/// The client on a pseudo-terminal (util-linux `script`), as a person runs it; what is typed
/// goes to its stdin, the screen to a file.
struct Terminal {
    child: Child,
    keyboard: std::process::ChildStdin,
    screen: PathBuf,
}

impl Terminal {
    fn start(sandbox: &Sandbox, name: &str, args: &[&str], env: &[(&str, &str)]) -> Terminal {
        let line = format!(
            "stty cols 160 rows 40; exec {} --address {} {}",
            client_binary().unwrap().display(),
            sandbox.bus_address(),
            args.join(" ")
        );
        let screen = sandbox.root().join(format!("{name}.screen"));
        let mut command = Command::new("script");
        command
            .args(["-qec", &line, "/dev/null"])
            .env("TERM", "xterm-256color")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(File::create(&screen).unwrap())
            .stderr(Stdio::null());
        let mut child = command
            .spawn()
            .expect("util-linux script runs the client on a terminal (apt-get install bsdutils)");
        let keyboard = child.stdin.take().unwrap();
        Terminal {
            child,
            keyboard,
            screen,
        }
    }

    /// What the terminal shows so far, escape sequences removed.
    fn screen(&self) -> String {
        screen_text(&std::fs::read_to_string(&self.screen).unwrap_or_default())
    }

    fn ctrl_c(&mut self) {
        self.keyboard.write_all(b"\x03").unwrap();
        self.keyboard.flush().unwrap();
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, probe: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !probe(&self.screen()) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the client exited ({status}) before {what}: {}",
                    self.screen()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}: {}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the client's end; `stdout` of the result is the screen.
    fn finish(mut self, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the client did not exit within {timeout:?}: {}",
                    self.screen()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Out {
            code: status.code().unwrap_or(-1),
            stdout: self.screen(),
            stderr: String::new(),
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether the instance user runs a process whose command line contains `pattern`.
fn user_runs(instance: &Instance, pattern: &str) -> bool {
    Command::new("pgrep")
        .args(["-u", &instance.id, "-f", pattern])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Module `app` at `tag` with an update script `script` (one that sleeps, say).
fn sleeping_image(tag: &str, script: &str) -> ImageSpec {
    ImageSpec::module("app", tag).file("update-module.d/50slow", script, 0o755)
}

#[test]
fn every_command_with_its_exit_code() {
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("app", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("app", "2.0").file(
                "update-module.d/20talk",
                "#!/bin/sh\necho \"hello from $MODULE_ID\"\n",
                0o755,
            ),
        )
        .image("slow", sleeping_image("3.0", "#!/bin/sh\nsleep 300\n"))
        .rootless("app", 1, "1.0")
        .build();
    // The test stops the daemon: it holds it.
    let daemon = s.daemon.take().unwrap();
    let (sandbox, a) = (&s.sandbox, &s.instances[0]);
    let [v1, v2, slow] = ["1.0", "2.0", "slow"].map(|key| s.url(key));
    let id = a.id.as_str();

    // version, and the hidden generators xtask uses.
    let out = run(sandbox, &["version"]).expect(0);
    assert!(
        out.stdout.starts_with(&format!(
            "module-updater {}\nmodule-updaterd ",
            env!("CARGO_PKG_VERSION")
        )),
        "{out:#?}"
    );
    let version = run(sandbox, &["version", "--json"]).expect(0).json();
    assert_eq!(version["client"], env!("CARGO_PKG_VERSION"));
    assert!(version["daemon"].is_string());
    let out = run(sandbox, &["generate", "completions", "bash"]).expect(0);
    assert!(out.stdout.contains("module-updater"));
    let out = run(sandbox, &["generate", "man"]).expect(0);
    assert!(out.stdout.contains(".TH module-updater"));

    // list and show, as tables and as JSON.
    let out = run(sandbox, &["list"]).expect(0);
    let lines: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["INSTANCE", "IMAGE", "STATE", "JOB"]);
    assert!(
        lines.contains(&vec![id, v1.as_str(), "idle", "-"]),
        "{out:#?}"
    );
    let list = run(sandbox, &["list", "--json"]).expect(0).json();
    assert_eq!(
        list,
        serde_json::json!([{"id": id, "image_url": v1, "state": "idle", "job": null}])
    );
    let out = run(sandbox, &["show", id]).expect(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["IMAGE_URL", v1.as_str()]),
        "{out:#?}"
    );
    let show = run(sandbox, &["show", "--json", id]).expect(0).json();
    assert_eq!(show["MODULE_ID"], id);
    assert_eq!(show["IMAGE_URL"], v1.as_str());
    let out = run(sandbox, &["show", "nosuch1"]).expect(4);
    assert!(
        out.one_error_line().contains("module-updater list"),
        "{out:#?}"
    );
    assert_eq!(
        run(sandbox, &["jobs", "--json"]).expect(0).json(),
        serde_json::json!([])
    );

    // Bad command lines and unreadable input: 64, never 2 (which means busy).
    run(sandbox, &["status", "bogus"]).expect(64);
    run(sandbox, &["frobnicate"]).expect(64);
    let out = run(
        sandbox,
        &[
            "run",
            "update-module",
            "--data",
            "@/nonexistent/request.json",
        ],
    )
    .expect(64);
    assert!(
        out.one_error_line().contains("/nonexistent/request.json"),
        "{out:#?}"
    );

    // Validation: NS8's array on stdout, exit 10.
    let bad = serde_json::json!({"module_url": v2, "instances": ["app"]}).to_string();
    let out = run(sandbox, &["run", "update-module", "--data", &bad]).expect(10);
    let array = out.json();
    assert_eq!(array[0]["field"], "instances.0");
    assert_eq!(array[0]["error"], "instances_pattern");
    assert!(
        out.one_error_line().contains("instances_pattern"),
        "{out:#?}"
    );

    // NS8's type check: refused before any job exists.
    let other = v1.replace("/app:", "/webtop:");
    assert_ne!(other, v1);
    let out = run(sandbox, &["update", &other, id]).expect(1);
    let expected = format!(
        "Module instance \"{id}\" is of type \"app\", cannot update it with an image of type \"webtop\" ({other})"
    );
    assert!(out.one_error_line().contains(&expected), "{out:#?}");
    assert_eq!(
        run(sandbox, &["jobs", "--json"]).expect(0).json(),
        serde_json::json!([])
    );

    // A real update from --data @FILE; not a terminal, so timestamped lines on stderr.
    let file = sandbox.root().join("request.json");
    std::fs::write(&file, request(&v2, &[id], false)).unwrap();
    let out = run(
        sandbox,
        &[
            "run",
            "update-module",
            "--data",
            &format!("@{}", file.display()),
        ],
    )
    .expect(0);
    let result = out.json();
    assert_eq!(result["status"], "completed");
    assert_eq!(result["instances"][id]["status"], "completed");
    assert_eq!(result["instances"][id]["old_image_url"], v1.as_str());
    assert_eq!(result["instances"][id]["new_image_url"], v2.as_str());
    assert!(out.stderr.lines().all(is_timestamped), "{}", out.stderr);
    let job = job_id_of(&out.stderr);
    // api-cli compatibility: stdout is the job's GetResult as busctl reads it, byte for byte,
    // with the one newline api-cli ends it with.
    let mut busctl = Command::new("busctl");
    busctl.args([
        &format!("--address={}", sandbox.bus_address()),
        "--json=short",
        "call",
        "org.nethserver.ModuleUpdater",
        &format!("/org/nethserver/ModuleUpdater/job/{job}"),
        "org.nethserver.ModuleUpdater.Job",
        "GetResult",
    ]);
    let reply = run_with(busctl, None).expect(0).json();
    assert_eq!(reply["type"], "s", "{reply}");
    let get_result = reply["data"][0].as_str().unwrap();
    assert_eq!(out.stdout, format!("{get_result}\n"));
    // Progress lines: `<time> <instance> <step> <percent>%` (the service coalesces them, so
    // which steps show depends on timing; the last one is 100%).
    let progress: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.ends_with('%') && l.split_whitespace().nth(1) == Some(id))
        .collect();
    assert!(
        progress.iter().all(|l| l.split_whitespace().count() == 4),
        "{}",
        out.stderr
    );
    assert!(
        progress.last().is_some_and(|l| l.ends_with(" 100%")),
        "{}",
        out.stderr
    );
    for needle in [
        format!(" {id} hello from {id}"),
        format!(" {id} completed (exit code 0)"),
        format!(" job {job} completed (exit code 0)"),
    ] {
        assert!(
            out.stderr.contains(&needle),
            "no {needle:?} in {}",
            out.stderr
        );
    }

    // --data - (stdin), with force: the same image again runs the update again.
    let mut command = client(sandbox);
    command.args(["run", "update-module", "--data", "-"]);
    let out = run_with(command, Some(&request(&v2, &[id], true))).expect(0);
    assert_eq!(out.json()["instances"][id]["status"], "completed");
    // `update` without --force on the current image; --quiet prints the result only.
    let out = run(sandbox, &["--quiet", "update", &v2, id]).expect(0);
    assert_eq!(out.stderr, "");
    assert_eq!(out.json()["instances"][id]["status"], "already-installed");

    // status, jobs and wait of a finished job.
    let out = run(sandbox, &["status", &job.to_string()]).expect(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Status:", "completed"]),
        "{out:#?}"
    );
    // Below the table, the instance's block: the tag change and where to see more.
    assert!(
        out.stdout.contains(&format!(
            "{id}  completed\n{}{} 1.0 → 2.0\n",
            " ".repeat(id.len() + 2),
            repository(&v1)
        )),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .contains(&format!("More: module-updater status {job} --json")),
        "{out:#?}"
    );
    let path = format!("/org/nethserver/ModuleUpdater/job/{job}");
    let status = run(sandbox, &["status", "--json", &path]).expect(0).json();
    assert_eq!(status["id"], job);
    // Times in JSON: ISO 8601 in UTC beside the microseconds.
    let started = status["started"].as_str().unwrap();
    assert!(
        is_timestamped(&format!("{started} x")) && started.ends_with('Z'),
        "{status}"
    );
    assert_eq!(status["status"], "completed");
    assert_eq!(status["exit_code"], 0);
    assert_eq!(status["instances"], serde_json::json!([id]));
    assert_eq!(status["result"], result);
    let jobs = run(sandbox, &["jobs", "--json"]).expect(0).json();
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == job && j["status"] == "completed"),
        "{jobs}"
    );
    let out = run(sandbox, &["jobs"]).expect(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&format!("{job} ")) && l.contains("completed")),
        "{out:#?}"
    );
    let out = run(sandbox, &["wait", &job.to_string()]).expect(0);
    assert_eq!(out.json(), result);
    let out = run(sandbox, &["status", "99999"]).expect(4);
    assert!(out.one_error_line().contains("no job 99999"), "{out:#?}");
    run(sandbox, &["wait", "99999"]).expect(4);
    // With --json the error is JSON on stdout too, the exit code unchanged.
    let out = run(sandbox, &["status", "99999", "--json"]).expect(4);
    let error = &out.json()["error"];
    assert_eq!(
        error["name"],
        "org.nethserver.ModuleUpdater.Error.NoSuchJob"
    );
    assert_eq!(error["exit_code"], 4);
    assert!(error["message"].as_str().unwrap().contains("no job 99999"));
    assert!(out.one_error_line().contains("no job 99999"), "{out:#?}");
    let out = run(sandbox, &["--json", "frobnicate"]).expect(64);
    assert_eq!(
        out.json()["error"]["name"],
        "org.nethserver.ModuleUpdater.Client.Error.Usage"
    );

    // Completion asks the service: instance ids for INSTANCE, job numbers for JOB.
    let address = sandbox.bus_address();
    let out = bash_completions(
        sandbox,
        &["module-updater", "--address", &address, "show", ""],
    )
    .expect(0);
    assert!(out.stdout.lines().any(|l| l == id), "{out:#?}");
    let out = bash_completions(
        sandbox,
        &["module-updater", "--address", &address, "wait", ""],
    )
    .expect(0);
    assert!(out.stdout.lines().any(|l| l == job.to_string()), "{out:#?}");
    let out =
        bash_completions(sandbox, &["module-updater", "--address", &address, "sta"]).expect(0);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["status"],
        "{out:#?}"
    );
    // fish shows each candidate's help: the instance's image and state.
    let mut command = client(sandbox);
    command.env("COMPLETE", "fish").args([
        "--",
        "module-updater",
        "--address",
        &address,
        "show",
        "",
    ]);
    let out = run_with(command, None).expect(0);
    assert!(
        out.stdout
            .lines()
            .any(|l| l == format!("{id}\t{v2} (idle)")),
        "{out:#?}"
    );

    // Busy: 2, with the array naming the job that holds the instance; then cancel it.
    let mut follower = Background::start(sandbox, "busy", &["update", &slow, id]);
    follower.wait_for(
        "the update to hold the instance",
        Duration::from_secs(60),
        |_| run(sandbox, &["list", "--json"]).json()[0]["state"] == "updating",
    );
    let holder = run(sandbox, &["list", "--json"]).json()[0]["job"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = run(sandbox, &["update", &slow, id]).expect(2);
    let array = out.json();
    assert_eq!(array[0]["error"], "action_already_running");
    let out = run(sandbox, &["update", "--json", &slow, id]).expect(2);
    let error = &out.json()["error"];
    assert_eq!(error["name"], "org.nethserver.ModuleUpdater.Error.Busy");
    assert_eq!(error["details"], array);
    assert_eq!(array[0]["job"], holder.as_str());
    let holder_id = holder.rsplit('/').next().unwrap();
    assert!(
        out.one_error_line()
            .contains(&format!("already being updated by job {holder_id}")),
        "{out:#?}"
    );
    follower.wait_for("the script to run", Duration::from_secs(60), |_| {
        user_runs(a, "sleep 300")
    });
    let out = run(sandbox, &["cancel", holder_id]).expect(0);
    assert!(
        out.stdout
            .contains(&format!("module-updater wait {holder_id}")),
        "{out:#?}"
    );
    let out = follower.finish(Duration::from_secs(60)).expect(1);
    let result = out.json();
    assert_eq!(result["status"], "aborted");
    assert_eq!(result["instances"][id]["status"], "cancelled");
    assert!(
        out.stderr.contains(&format!(" {id} cancelled")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .trim_end()
            .ends_with("the result on stdout names the failed instances and steps"),
        "{}",
        out.stderr
    );
    run(sandbox, &["cancel", "99999"]).expect(4);

    // The service gone: 3, for a missing bus as for a missing service.
    assert!(daemon.stop().unwrap().success());
    // Completion falls back to no candidates, at once and without an error.
    let started = Instant::now();
    let out = bash_completions(
        sandbox,
        &["module-updater", "--address", &address, "show", ""],
    )
    .expect(0);
    assert!(!out.stdout.lines().any(|l| l == id), "{out:#?}");
    assert_eq!(out.stderr, "");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let out = run(sandbox, &["list"]).expect(3);
    assert!(
        out.one_error_line().contains("cannot be reached"),
        "{out:#?}"
    );
    let mut command = Command::new(client_binary().unwrap());
    command.args(["--address", "unix:path=/nonexistent/bus", "jobs"]);
    let out = run_with(command, None).expect(3);
    assert!(
        out.one_error_line()
            .contains("cannot connect to the bus at unix:path=/nonexistent/bus"),
        "{out:#?}"
    );
}

#[test]
fn unixexec_transport_and_monitor() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("app", "1.0"))
        .rootless("app", 1, "1.0")
        .build();
    let (sandbox, a, v1) = (&s.sandbox, &s.instances[0], s.url("1.0"));
    let id = a.id.as_str();

    // What -H does, minus ssh: the bus reached through systemd-stdio-bridge's stdin/stdout, with
    // the address escaped as busctl expects it (`=` as %3d inside a value).
    let bridge = "/usr/bin/systemd-stdio-bridge";
    assert!(
        std::path::Path::new(bridge).is_file(),
        "{bridge} is missing: apt-get install systemd"
    );
    let address = format!(
        "unixexec:path={bridge},argv1=--bus-path%3d{}",
        sandbox.bus_address().replace('=', "%3d")
    );
    let mut command = Command::new(client_binary().unwrap());
    command.args(["--address", &address, "list", "--json"]);
    let list = run_with(command, None).expect(0).json();
    assert_eq!(list[0]["id"], id);

    // monitor --json: one object per line, every signal of a job, until Ctrl-C.
    let mut monitor = Background::start(sandbox, "monitor", &["monitor", "--json"]);
    monitor.wait_for("the monitor to subscribe", Duration::from_secs(30), |m| {
        m.stderr().contains("Monitoring")
    });
    // A job followed over the bridge too.
    let mut command = Command::new(client_binary().unwrap());
    command.args(["--address", &address, "update", "--force", &v1, id]);
    let out = run_with(command, None).expect(0);
    assert_eq!(out.json()["instances"][id]["status"], "completed");
    let job = job_id_of(&out.stderr);
    let path = format!("/org/nethserver/ModuleUpdater/job/{job}");
    monitor.wait_for("the Finished signal", Duration::from_secs(30), |m| {
        m.stdout().contains("\"Finished\"")
    });
    monitor.interrupt();
    let out = monitor.finish(Duration::from_secs(10)).expect(0);
    let signals: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let member = |m: &str| {
        signals
            .iter()
            .filter(|s| s["member"] == m)
            .collect::<Vec<_>>()
    };
    assert_eq!(member("JobNew")[0]["args"], serde_json::json!([path]));
    let progress = member("Progress");
    assert!(!progress.is_empty(), "{}", out.stdout);
    assert!(
        progress
            .iter()
            .all(|s| s["path"] == path.as_str() && s["args"][0] == id),
        "{}",
        out.stdout
    );
    assert_eq!(
        member("Finished")[0]["args"],
        serde_json::json!(["completed", 0])
    );
    assert_eq!(
        member("JobFinished")[0]["args"],
        serde_json::json!([path, "completed", 0])
    );
    assert!(
        member("PropertiesChanged")
            .iter()
            .any(|s| s["path"] == path.as_str() && s["args"][1]["Status"].is_string()),
        "{}",
        out.stdout
    );
    assert!(
        signals
            .iter()
            .all(|s| is_timestamped(&format!("{} x", s["time"].as_str().unwrap())))
    );
}

/// Strips ANSI escape sequences and carriage returns: what the terminal shows, line by line.
fn screen_text(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            // A terminal's line end is \r\n; a lone \r redraws the line (the bars).
            '\r' if chars.peek() == Some(&'\n') => {}
            '\r' => out.push('\n'),
            c => out.push(c),
        }
    }
    out
}

#[test]
fn progress_bars_and_summary_on_a_terminal() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("app", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("app", "2.0").file(
                "update-module.d/20talk",
                "#!/bin/sh\necho \"hello from $MODULE_ID\"\nsleep 1\n",
                0o755,
            ),
        )
        .rootless("app", 2, "1.0")
        .build();
    let sandbox = &s.sandbox;
    let [a, b] = &s.instances[..] else {
        unreachable!()
    };
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));

    // In a time zone far from UTC, as a person's terminal may be.
    let args = ["update", &v2, &a.id, &b.id];
    let out = Terminal::start(sandbox, "update", &args, &[("TZ", "Asia/Kolkata")])
        .finish(CLIENT_TIMEOUT)
        .expect(0);
    let screen = out.stdout;
    // Bars: one per instance and the total, each with its step and percent.
    for id in [&a.id, &b.id] {
        assert!(
            screen
                .lines()
                .any(|l| l.starts_with(id.as_str()) && l.contains("[") && l.contains("%")),
            "no bar for {id} in {screen}"
        );
        assert!(
            screen.contains(&format!("{id} hello from {id}")),
            "script output not above the bars: {screen}"
        );
    }
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("job ") && l.contains("%")),
        "no total bar: {screen}"
    );
    let steps = UPDATE_STEPS;
    assert!(
        screen.lines().any(|l| l.starts_with(a.id.as_str())
            && l.contains('%')
            && steps.iter().any(|s| l.contains(s))),
        "no bar shows its step: {screen}"
    );
    assert!(screen.contains("====="), "no bar drawn: {screen}");
    // The environment keys written are debug lines: not shown without -v.
    assert!(!screen.contains(" environment IMAGE_URL="), "{screen}");
    // The summary, not the JSON: the job, its local start time, each instance's change, where
    // to see more.
    assert!(
        !screen.lines().any(|l| l.starts_with('{')),
        "JSON on a terminal: {screen}"
    );
    let summary: Vec<&str> = screen
        .lines()
        .skip_while(|l| !l.starts_with("Job "))
        .collect();
    let job = summary
        .first()
        .and_then(|l| l.strip_prefix("Job "))
        .and_then(|l| l.strip_suffix(" completed (exit code 0)"))
        .unwrap_or_else(|| panic!("no summary: {screen}"))
        .to_owned();
    assert!(
        summary[1].starts_with("  started ") && summary[1].contains(" IST, took "),
        "{screen}"
    );
    let change = format!("{} 1.0 → 2.0", repository(&v1));
    for id in [&a.id, &b.id] {
        let at = summary
            .iter()
            .position(|l| *l == format!("{id}  completed"))
            .unwrap_or_else(|| panic!("no block for {id}: {screen}"));
        assert_eq!(summary[at + 1].trim(), change, "{screen}");
    }
    assert!(
        summary.contains(&format!("More: module-updater status {job} --json").as_str()),
        "{screen}"
    );
    assert!(
        summary.contains(
            &format!("      journalctl -u module-updaterd MODULE_UPDATER_JOB={job}").as_str()
        ),
        "{screen}"
    );

    // -v shows the debug lines (the environment keys written); --utc the times in UTC.
    let args = ["-v", "--utc", "update", "--force", &v2, &a.id];
    let out = Terminal::start(sandbox, "verbose", &args, &[("TZ", "Asia/Kolkata")])
        .finish(CLIENT_TIMEOUT)
        .expect(0);
    let screen = out.stdout;
    let key_line = format!(
        "{} debug: Update module/{} environment IMAGE_URL={v2}",
        a.id, a.id
    );
    assert!(screen.contains(&key_line), "no {key_line:?} in {screen}");
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("  started ") && l.contains(" UTC, took ")),
        "{screen}"
    );
}

#[test]
fn summary_of_a_failed_instance_with_warnings() {
    // Every instance gets a failing script (a warning, NS8 semantics); the module's own step
    // fails for the second instance only (which fails it).
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("app", "1.0"))
        .image(
            "2.0",
            ImageSpec::module("app", "2.0")
                .file(
                    "update-module.d/30warn",
                    "#!/bin/sh\necho 'not quite'\nexit 3\n",
                    0o755,
                )
                .file(
                    "actions/update-module/60check",
                    "#!/bin/sh\nif [ -e disk-full ]; then echo 'disk full' >&2; exit 4; fi\n",
                    0o755,
                ),
        )
        .rootless("app", 2, "1.0")
        .prepare(|_, _, instances| {
            std::fs::write(instances[1].state_dir.join("disk-full"), "").unwrap();
        })
        .build();
    let sandbox = &s.sandbox;
    let [a, b] = &s.instances[..] else {
        unreachable!()
    };
    let [v1, v2] = ["1.0", "2.0"].map(|key| s.url(key));

    let args = ["update", &v2, &a.id, &b.id];
    let out = Terminal::start(sandbox, "failed", &args, &[])
        .finish(CLIENT_TIMEOUT)
        .expect(1);
    let screen = out.stdout;
    let summary: Vec<&str> = screen
        .lines()
        .skip_while(|l| !l.starts_with("Job "))
        .filter(|l| !l.is_empty())
        .collect();
    assert!(summary[0].ends_with("(exit code 1)"), "{screen}");
    // What went wrong comes first: the failed instance, then the one with warnings.
    let failed = summary
        .iter()
        .position(|l| l.starts_with(b.id.as_str()))
        .unwrap_or_else(|| panic!("{screen}"));
    let warned = summary
        .iter()
        .position(|l| l.starts_with(a.id.as_str()))
        .unwrap_or_else(|| panic!("{screen}"));
    assert!(failed < warned, "{screen}");
    let width = a.id.len().max(b.id.len());
    let pad = |id: &str| " ".repeat(width - id.len());
    assert_eq!(
        summary[failed],
        format!("{}{}  failed at module-step", b.id, pad(&b.id)),
        "{screen}"
    );
    let block = &summary[failed + 1..warned];
    assert!(
        block
            .iter()
            .any(|l| l.trim_start().starts_with("error: ") && l.contains("60check")),
        "{screen}"
    );
    assert!(
        block.iter().any(|l| l.trim()
            == "scripts: 2 of 2 did not succeed: 30warn (exit code 3), 60check (exit code 4)"),
        "{screen}"
    );
    assert_eq!(
        summary[warned],
        format!("{}{}  completed with 1 warning", a.id, pad(&a.id)),
        "{screen}"
    );
    assert_eq!(
        summary[warned + 1].trim(),
        format!("{} 1.0 → 2.0", repository(&v1)),
        "{screen}"
    );
    assert_eq!(
        summary[warned + 2].trim(),
        "scripts: 1 of 2 did not succeed: 30warn (exit code 3)",
        "{screen}"
    );
    // The last words: where to see more, and the error line on stderr.
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with("More: module-updater status ")),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("module-updater: job ") && l.contains("ended aborted")),
        "{screen}"
    );
}

#[test]
fn ctrl_c_cancels_then_a_second_ctrl_c_detaches() {
    let s = Scenario::new()
        .image("1.0", ImageSpec::module("app", "1.0"))
        .image("slow", sleeping_image("2.0", "#!/bin/sh\nsleep 300\n"))
        // Ignores SIGTERM (sleep inherits that), so cancelling takes the daemon's 10 s SIGKILL
        // grace.
        .image(
            "stubborn",
            sleeping_image("3.0", "#!/bin/sh\ntrap '' TERM\nsleep 301\n"),
        )
        .rootless("app", 1, "1.0")
        .build();
    let (sandbox, a) = (&s.sandbox, &s.instances[0]);
    let [slow, stubborn] = ["slow", "stubborn"].map(|key| s.url(key));
    let id = a.id.as_str();

    // First Ctrl-C: the job is cancelled and followed to its end.
    let mut follower = Background::start(sandbox, "cancel", &["update", &slow, id]);
    follower.wait_for("the script to run", Duration::from_secs(60), |_| {
        user_runs(a, "sleep 300")
    });
    follower.interrupt();
    let out = follower.finish(Duration::from_secs(60)).expect(1);
    let job = job_id_of(&out.stderr);
    assert!(
        out.stderr
            .contains(&format!(" job {job} cancelling (Ctrl-C again to detach")),
        "{}",
        out.stderr
    );
    let result = out.json();
    assert_eq!(result["status"], "aborted");
    assert_eq!(result["instances"][id]["status"], "cancelled");
    assert!(!user_runs(a, "sleep 300"));

    // Second Ctrl-C: detach at once, say how to re-attach; the job goes on.
    let mut follower = Background::start(sandbox, "detach", &["update", &stubborn, id]);
    follower.wait_for("the script to run", Duration::from_secs(60), |_| {
        user_runs(a, "sleep 301")
    });
    follower.interrupt();
    follower.wait_for("the cancel note", Duration::from_secs(10), |f| {
        f.stderr().contains(" cancelling (")
    });
    let detached_at = Instant::now();
    follower.interrupt();
    let out = follower.finish(Duration::from_secs(5)).expect(130);
    assert!(detached_at.elapsed() < Duration::from_secs(5));
    let job = job_id_of(&out.stderr);
    assert_eq!(out.stdout, "", "no result for a detached job");
    let last = out.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("module-updater: detached from job"),
        "{}",
        out.stderr
    );
    assert!(
        last.contains(&format!("module-updater wait {job}")),
        "{}",
        out.stderr
    );
    let status = run(sandbox, &["status", "--json", &job.to_string()])
        .expect(0)
        .json();
    assert_eq!(
        status["status"], "running",
        "the job goes on after a detach: {status}"
    );
    // `wait` did not start the job: Ctrl-C on its terminal only detaches, the job goes on.
    let mut waiter = Terminal::start(sandbox, "wait", &["wait", &job.to_string()], &[]);
    waiter.wait_for("the bars", Duration::from_secs(30), |screen| {
        screen.contains(&format!("job {job}"))
    });
    let detached_at = Instant::now();
    waiter.ctrl_c();
    let out = waiter.finish(Duration::from_secs(10)).expect(130);
    assert!(detached_at.elapsed() < Duration::from_secs(5));
    assert!(
        out.stdout
            .contains(&format!("module-updater: detached from job {job}")),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("cancelling"), "{}", out.stdout);
    let status = run(sandbox, &["status", "--json", &job.to_string()])
        .expect(0)
        .json();
    assert_eq!(
        status["status"], "running",
        "wait's Ctrl-C cancelled: {status}"
    );
    // Re-attached, the client follows it to its end (the script dies of SIGKILL after 10 s).
    let out = run(sandbox, &["wait", &job.to_string()]).expect(1);
    let result = out.json();
    assert_eq!(result["status"], "aborted");
    assert_eq!(result["instances"][id]["status"], "cancelled");
}

#[test]
fn the_service_killed_while_a_job_is_followed() {
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("app", "1.0"))
        .image("slow", sleeping_image("2.0", "#!/bin/sh\nsleep 302\n"))
        .rootless("app", 1, "1.0")
        .build();
    let mut daemon = s.daemon.take().unwrap();
    let (sandbox, a, slow) = (&s.sandbox, &s.instances[0], s.url("slow"));
    let id = a.id.as_str();

    let mut follower = Background::start(sandbox, "killed", &["update", &slow, id]);
    follower.wait_for("the script to run", Duration::from_secs(60), |_| {
        user_runs(a, "sleep 302")
    });
    let job = job_id_of(&follower.stderr());
    daemon.kill();
    let killed_at = Instant::now();
    let out = follower.finish(Duration::from_secs(15)).expect(3);
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "the client took {:?} to notice",
        killed_at.elapsed()
    );
    assert_eq!(out.stdout, "");
    let last = out.stderr.lines().last().unwrap();
    assert!(last.contains("left the bus"), "{}", out.stderr);
    assert!(
        last.contains("will be reported interrupted when the service returns"),
        "{}",
        out.stderr
    );

    // Back, the service reports the job interrupted, and `wait` says it failed.
    let _daemon = start_daemon(sandbox, &[]);
    let status = run(sandbox, &["status", "--json", &job.to_string()])
        .expect(0)
        .json();
    assert_eq!(status["status"], "aborted");
    assert_eq!(status["result"]["error"], "interrupted");
    let out = run(sandbox, &["wait", &job.to_string()]).expect(1);
    assert_eq!(out.json()["error"], "interrupted");
    assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
}

/// `text` quoted for `sh`.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Any program on a pseudo-terminal (util-linux `script`), e.g. the client as another user in a
/// mount namespace, read through a pipe and typed into, as a person at the terminal would.
struct TypedTerminal {
    child: Child,
    keys: Option<std::process::ChildStdin>,
    output: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    errors: PathBuf,
}

impl TypedTerminal {
    /// Runs `command`, a `script -qec ... /dev/null` command line (possibly wrapped).
    fn start(mut command: Command, errors: PathBuf) -> TypedTerminal {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&errors).unwrap());
        let mut child = command.spawn().unwrap();
        let keys = child.stdin.take();
        let mut stdout = child.stdout.take().unwrap();
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&output);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        });
        TypedTerminal {
            child,
            keys,
            output,
            errors,
        }
    }

    /// What the terminal shows so far.
    fn screen(&self) -> String {
        screen_text(&String::from_utf8_lossy(&self.output.lock().unwrap()))
    }

    fn describe(&self) -> String {
        format!(
            "screen:\n{}\nscript's stderr: {}",
            self.screen(),
            std::fs::read_to_string(&self.errors).unwrap_or_default()
        )
    }

    /// Waits until the screen shows `text`.
    fn wait_for(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.screen().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "exited ({status}) before showing {text:?}: {}",
                    self.describe()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {timeout:?}: {}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `line` and Enter.
    fn type_line(&mut self, line: &str) {
        let keys = self.keys.as_mut().unwrap();
        let typed = keys
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| keys.flush());
        if let Err(err) = typed {
            panic!("cannot type ({err}): {}", self.describe());
        }
    }

    /// Waits for the program to end: its exit code and the screen.
    fn finish(mut self, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread drains what is left.
                std::thread::sleep(Duration::from_millis(200));
                return (status.code().unwrap_or(-1), self.screen());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("did not end within {timeout:?}: {}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TypedTerminal {
    fn drop(&mut self) {
        drop(self.keys.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `busctl call` of UpdateModule as `who`, with or without the interactive-authorization flag:
/// (success, stderr, how long it took).
fn busctl_update(
    sandbox: &Sandbox,
    who: &Instance,
    request: &str,
    interactive: bool,
) -> (bool, String, Duration) {
    let address = format!("--address={}", sandbox.bus_address());
    let flag = format!(
        "--allow-interactive-authorization={}",
        if interactive { "yes" } else { "no" }
    );
    let argv = [
        "busctl",
        address.as_str(),
        flag.as_str(),
        "call",
        "org.nethserver.ModuleUpdater",
        "/org/nethserver/ModuleUpdater",
        "org.nethserver.ModuleUpdater",
        "UpdateModule",
        "s",
        request,
    ];
    let started = Instant::now();
    let out = sandbox.run_as(who, &argv).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn polkit_asks_for_a_password_on_a_terminal_only() {
    use module_updater_dbus::ACTION_UPDATE_MODULE;
    // A non-root user with a password, who is also the administrator polkit asks for.
    let mut s = Scenario::new()
        .image("1.0", ImageSpec::module("app", "1.0"))
        .image("2.0", ImageSpec::module("app", "2.0"))
        .rootless("app", 1, "1.0")
        .bare("caller", 1)
        .without_daemon()
        .build();
    let mut polkit = s.sandbox.start_polkitd().unwrap();
    let (sandbox, target, caller, v2) =
        (&s.sandbox, &s.instances[0], &s.instances[1], s.url("2.0"));
    let password = "Correct-horse-7";
    sandbox.set_password(caller, password).unwrap();
    // update-module needs an administrator's password (auth_admin, nothing kept between calls),
    // and the administrator is the caller. Another action is granted outright: an answer pkcheck
    // can see, so the test knows when polkitd has loaded the file (cancel is granted outright
    // for that).
    let rules = format!(
        r#"polkit.addRule(function(action, subject) {{
    if (subject.user == "{user}") {{
        if (action.id == "{ACTION_UPDATE_MODULE}") return polkit.Result.AUTH_ADMIN;
        if (action.id == "{probe}") return polkit.Result.YES;
    }}
}});
polkit.addAdminRule(function(action, subject) {{
    if (subject.user == "{user}") return ["unix-user:{user}"];
}});"#,
        user = caller.id,
        probe = module_updater_dbus::ACTION_CANCEL,
    );
    let rule_file = polkit.add_rule("password-prompt", &rules).unwrap();
    let probe = polkit.subject_process(caller).unwrap();
    polkit
        .wait_for(
            module_updater_dbus::ACTION_CANCEL,
            &probe,
            &[
                ("job", "/org/nethserver/ModuleUpdater/job/0"),
                ("instances", target.id.as_str()),
            ],
            true,
        )
        .unwrap();
    drop(probe);
    let daemon = start_daemon(sandbox, &[]);
    let update = request(&v2, &[&target.id], false);

    // The reason the daemon logged for its latest refusal of the caller (busctl prints only
    // "Access denied" for AccessDenied, whatever the message).
    let refused = format!(
        "refused {ACTION_UPDATE_MODULE} for uid {} (pid ",
        caller.uid
    );
    let last_refusal = || {
        let log = daemon.log();
        let line = log
            .lines()
            .rfind(|l| l.contains(&refused))
            .map(str::to_owned);
        (log.matches(&refused).count(), line.unwrap_or_default())
    };

    // busctl without the flag: refused at once, and why.
    let (ok, stderr, took) = busctl_update(sandbox, caller, &update, false);
    assert!(!ok, "a non-interactive call was let through");
    assert!(stderr.contains("Access denied"), "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let (count, line) = last_refusal();
    assert_eq!(count, 1, "{line}");
    assert!(
        line.contains("did not allow interactive authorization"),
        "{line}"
    );
    // With the flag, polkit is asked interactively: it answers that no agent could ask (busctl
    // starts none), which it says only when interaction was allowed.
    let (ok, _, _) = busctl_update(sandbox, caller, &update, true);
    assert!(!ok);
    let (count, line) = last_refusal();
    assert_eq!(count, 2, "{line}");
    assert!(line.contains("no authentication agent could ask"), "{line}");
    // gdbus shows the whole message: why, and what to grant.
    let address = sandbox.bus_address();
    let out = sandbox
        .run_as(
            caller,
            &[
                "gdbus",
                "call",
                "--address",
                &address,
                "--dest",
                "org.nethserver.ModuleUpdater",
                "--object-path",
                "/org/nethserver/ModuleUpdater",
                "--method",
                "org.nethserver.ModuleUpdater.UpdateModule",
                &update,
            ],
        )
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("org.freedesktop.DBus.Error.AccessDenied")
            && stderr.contains("did not allow interactive authorization")
            && stderr.contains(&format!("grant the polkit action {ACTION_UPDATE_MODULE}"))
            && stderr.contains("rules.d")
            && stderr.contains("or call as root"),
        "{stderr}"
    );

    // The client as the caller, on a terminal, where polkit's password helper reaches polkitd.
    let client = sandbox.user_executable(&client_binary().unwrap()).unwrap();
    // `argv` as the caller on a terminal (the client when `argv` starts with an option).
    let mut terminal = |name: &str, argv: &[&str]| {
        let env: Vec<String> = [
            (
                "PATH",
                "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_owned(),
            ),
            ("HOME", caller.home.display().to_string()),
            ("USER", caller.id.clone()),
            ("LOGNAME", caller.id.clone()),
            ("LANG", "C.UTF-8".to_owned()),
            ("TERM", "xterm-256color".to_owned()),
        ]
        .iter()
        .map(|(k, v)| sh_quote(&format!("{k}={v}")))
        .collect();
        let mut line = format!(
            "stty cols 200 rows 50; exec setpriv --reuid={} --regid={} --init-groups env -i {}",
            caller.uid,
            caller.gid,
            env.join(" "),
        );
        let mut argv = argv.to_vec();
        let client = client.display().to_string();
        let address = sandbox.bus_address();
        if argv
            .first()
            .is_some_and(|a| a.starts_with('-') || *a == "run")
        {
            argv.splice(0..0, [client.as_str(), "--address", address.as_str()]);
        }
        for arg in argv {
            line.push(' ');
            line.push_str(&sh_quote(arg));
        }
        let command = polkit
            .on_system_bus(&["script", "-qec", &line, "/dev/null"])
            .unwrap();
        TypedTerminal::start(command, sandbox.root().join(format!("{name}.stderr")))
    };
    let run_update = ["run", "update-module", "--data", update.as_str()];

    // --no-ask-password: refused at once, no prompt.
    let started = Instant::now();
    let mut args = vec!["--no-ask-password"];
    args.extend(run_update);
    let (code, screen) = terminal("no-ask", &args).finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{screen}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!screen.contains("Password:"), "{screen}");
    assert!(
        screen.contains("access denied")
            && screen.contains("did not allow interactive authorization"),
        "{screen}"
    );

    // A wrong password: pkttyagent's prompt, then AccessDenied naming the action to grant.
    let mut prompt = terminal("wrong", &run_update);
    prompt.wait_for("Password:", Duration::from_secs(60));
    // pkttyagent turns echo off (discarding typed-ahead input) just after printing the prompt.
    std::thread::sleep(Duration::from_millis(500));
    prompt.type_line("not-the-password");
    let (code, screen) = prompt.finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{screen}");
    assert!(
        !screen.contains("not-the-password"),
        "the password was echoed: {screen}"
    );
    let error = screen
        .lines()
        .find(|l| l.starts_with("module-updater: access denied"))
        .unwrap_or_else(|| panic!("no AccessDenied line: {screen}"));
    assert!(
        error.contains("authentication failed")
            && error.contains(ACTION_UPDATE_MODULE)
            && error.contains("rules.d")
            && error.contains("root"),
        "{error}"
    );

    // A caller that leaves while polkit asks (here killed; busctl also leaves when its own 25 s
    // timeout ends): the daemon cancels the check and starts no job. busctl waits for the prompt
    // with an agent registered for its process (the shell's pid, which busctl keeps by exec).
    let busctl = format!(
        "pkttyagent --process $$ & sleep 2; exec busctl --address={} --allow-interactive-authorization=yes call org.nethserver.ModuleUpdater /org/nethserver/ModuleUpdater org.nethserver.ModuleUpdater UpdateModule s {}",
        sandbox.bus_address(),
        sh_quote(&update)
    );
    let mut prompt = terminal("caller-left", &["sh", "-c", &busctl]);
    prompt.wait_for("Password:", Duration::from_secs(60));
    let busctl_pid = Command::new("pgrep")
        .args(["-u", &caller.id, "-x", "busctl"])
        .output()
        .unwrap();
    let busctl_pid: i32 = String::from_utf8_lossy(&busctl_pid.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no busctl running: {}", prompt.describe()));
    let (before, _) = last_refusal();
    kill(Pid::from_raw(busctl_pid), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (count, line) = last_refusal();
        if count > before {
            assert!(line.contains("the caller left the bus"), "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(prompt);
    let jobs = run(sandbox, &["--json", "jobs"]).expect(0).json();
    assert_eq!(
        jobs,
        serde_json::json!([]),
        "a job started for a caller that left"
    );
    // That agent was busctl's, not the client's: it goes with the terminal, or here.
    let _ = Command::new("pkill")
        .args(["-u", &caller.id, "-x", "pkttyagent"])
        .status();

    // The right password, typed after longer than --timeout: a call that may prompt waits for
    // the daemon's answer all the same, and the job starts and completes.
    let mut args = vec!["--timeout", "3"];
    args.extend(run_update);
    let mut prompt = terminal("right", &args);
    prompt.wait_for("Password:", Duration::from_secs(60));
    let screen = prompt.screen();
    assert!(
        screen.contains(&format!("AUTHENTICATING FOR {ACTION_UPDATE_MODULE}"))
            && screen.contains(&format!("Authenticating as: {}", caller.id)),
        "{screen}"
    );
    std::thread::sleep(Duration::from_secs(5));
    prompt.type_line(password);
    let (code, screen) = prompt.finish(CLIENT_TIMEOUT);
    assert_eq!(code, 0, "{screen}");
    assert!(
        !screen.contains(password),
        "the password was echoed: {screen}"
    );
    let result: Value = screen
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no result: {screen}"));
    assert_eq!(result["status"], "completed", "{screen}");
    assert_eq!(target.read_env().unwrap()["IMAGE_URL"], v2);
    // Only that job ran, started by the caller; the refused calls started none.
    let jobs = run(sandbox, &["--json", "jobs"]).expect(0).json();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["caller_uid"], caller.uid);
    // No agent is left behind.
    assert!(!user_runs(caller, "pkttyagent"));
    let log = daemon.log();
    assert!(
        log.contains(&format!(
            "allowed {ACTION_UPDATE_MODULE} for uid {} (pid ",
            caller.uid
        )),
        "{log}"
    );

    drop(daemon);
    let leftovers = polkit.stop();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!rule_file.exists());
}
