//! The scripts' tests, with real processes.

#![allow(clippy::unwrap_used)]

use super::*;
use super::{comfd::*, plan::*, process::*};
use module_updater_dbus::types::ScriptStatus;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn base_env() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("PATH".to_string(), "/usr/bin:/bin".to_string()),
        ("AGENT_ID".to_string(), "module/test1".to_string()),
        ("WITH SPACE".to_string(), "a b=c".to_string()),
    ])
}

struct Ran {
    result: Result<ScriptOutcome, ScriptError>,
    outputs: Vec<ScriptOutput>,
    elapsed: Duration,
}

impl Ran {
    fn outcome(&self) -> &ScriptOutcome {
        self.result.as_ref().unwrap()
    }

    fn lines(&self) -> Vec<(u8, String)> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                ScriptOutput::Line { priority, text } => Some((*priority, text.clone())),
                ScriptOutput::Progress(_) => None,
            })
            .collect()
    }

    fn texts(&self) -> Vec<String> {
        self.lines().into_iter().map(|(_, t)| t).collect()
    }
}

const FAST: Limits = Limits {
    output_grace: Duration::from_millis(300),
    cancel_grace: Duration::from_millis(300),
};

async fn run_script(
    path: &Path,
    cwd: &Path,
    stdin: &[u8],
    timeout: Duration,
    cancel: &watch::Receiver<bool>,
    limits: Limits,
) -> Ran {
    let env = base_env();
    let script = ScriptRun {
        path,
        env: &env,
        cwd,
        stdin,
        timeout,
    };
    let outputs = Arc::new(Mutex::new(Vec::new()));
    let sink = outputs.clone();
    let mut on_output = move |o: ScriptOutput| sink.lock().unwrap().push(o);
    let started = Instant::now();
    let result = run_with(&script, cancel, &mut on_output, limits).await;
    let elapsed = started.elapsed();
    let outputs = outputs.lock().unwrap().clone();
    Ran {
        result,
        outputs,
        elapsed,
    }
}

/// Runs `body` with the default limits, a 10 s timeout and no cancel.
async fn run_body(dir: &Path, body: &str) -> Ran {
    let path = write_script(dir, "script", body);
    let (_tx, rx) = watch::channel(false);
    run_script(
        &path,
        dir,
        b"",
        Duration::from_secs(10),
        &rx,
        Limits::DEFAULT,
    )
    .await
}

fn pids_in(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Gone, or a zombie waiting for init: it no longer runs.
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

async fn assert_all_gone(pids: &[i32]) {
    assert!(!pids.is_empty());
    for _ in 0..100 {
        if pids.iter().all(|&p| is_gone(p)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let alive: Vec<_> = pids.iter().filter(|&&p| !is_gone(p)).collect();
    panic!("processes of the script's group still alive: {alive:?}");
}

#[test]
fn listing_is_byte_ordered_skips_non_executables_and_dotfiles() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["50b", "10a", "B", "a", "_x", "Z9"] {
        write_script(d, name, "true");
    }
    write_script(d, ".hidden", "true");
    std::fs::write(d.join("20readme"), "not a script").unwrap();
    std::fs::create_dir(d.join("30dir")).unwrap();
    symlink(d.join("10a"), d.join("40link")).unwrap();
    symlink(d.join("20readme"), d.join("41link-to-plain")).unwrap();
    symlink(d.join("missing"), d.join("42dangling")).unwrap();

    let listing = list_executables(d).unwrap();
    let names = |paths: &[PathBuf]| -> Vec<String> {
        paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&listing.runnable),
        ["10a", "40link", "50b", "B", "Z9", "_x", "a"]
    );
    assert_eq!(
        names(&listing.skipped),
        ["20readme", "30dir", "41link-to-plain", "42dangling"]
    );
    assert!(listing.runnable.iter().all(|p| p.starts_with(d)));
    let in_order: Vec<_> = listing
        .in_order()
        .into_iter()
        .map(|(p, run)| (p.file_name().unwrap().to_string_lossy().into_owned(), run))
        .collect();
    assert_eq!(in_order[0], ("10a".to_string(), true));
    assert_eq!(in_order[1], ("20readme".to_string(), false));
    assert_eq!(in_order.len(), 11);
}

#[test]
fn missing_dir_is_an_empty_listing() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        list_executables(&dir.path().join("update-module.d")).unwrap(),
        Listing::default()
    );
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    assert_eq!(list_executables(&file).unwrap(), Listing::default());
}

#[test]
fn merge_interleaves_module_steps_by_name() {
    let steps = merge_module_steps(
        &BUILTIN_STEPS,
        vec![
            PathBuf::from("/i/actions/update-module/80restart"),
            PathBuf::from("/i/actions/update-module/10backup"),
            PathBuf::from("/i/actions/update-module/50run_scriptdir-x"),
        ],
    );
    let names: Vec<_> = steps.iter().map(|s| s.name().into_owned()).collect();
    assert_eq!(
        names,
        [
            "05pullimages",
            "10backup",
            "50run_scriptdir",
            "50run_scriptdir-x",
            "80restart",
            "95cleanup_images"
        ]
    );
    assert_eq!(steps[0], PlannedStep::Builtin("05pullimages".to_string()));
    assert_eq!(
        steps[1],
        PlannedStep::Module(PathBuf::from("/i/actions/update-module/10backup"))
    );
}

#[test]
fn merge_module_file_replaces_builtin_of_same_name() {
    let steps = merge_module_steps(
        &BUILTIN_STEPS,
        vec![PathBuf::from("/i/actions/update-module/95cleanup_images")],
    );
    assert_eq!(
        steps,
        [
            PlannedStep::Builtin("05pullimages".to_string()),
            PlannedStep::Builtin("50run_scriptdir".to_string()),
            PlannedStep::Module(PathBuf::from("/i/actions/update-module/95cleanup_images")),
        ]
    );
    let only_builtin = merge_module_steps(&BUILTIN_STEPS, Vec::new());
    assert_eq!(only_builtin.len(), 3);
    // Byte order: uppercase before digits-after-letters, as Go's sort.Strings.
    let steps = merge_module_steps(&["05a"], vec![PathBuf::from("/x/A"), PathBuf::from("/x/0")]);
    let names: Vec<_> = steps.iter().map(|s| s.name().into_owned()).collect();
    assert_eq!(names, ["0", "05a", "A"]);
}

#[test]
fn command_parsing() {
    assert_eq!(
        command_output(b"set-progress 40"),
        Some(ScriptOutput::Progress(40))
    );
    assert_eq!(
        command_output(b"\"set-progress\" \"100\"\r"),
        Some(ScriptOutput::Progress(100))
    );
    assert_eq!(command_output(b""), None);
    for bad in [
        &b"set-progress 101"[..],
        b"set-progress -1",
        b"set-progress x",
        b"set-weight 50run_scriptdir 3",
        b"set-status validation-failed",
        b"hello",
        b"set-progress \"4",
    ] {
        match command_output(bad) {
            Some(ScriptOutput::Line { priority, text }) => {
                assert_eq!(priority, priority::DEBUG);
                assert!(text.contains(&*String::from_utf8_lossy(bad)), "{text}");
            }
            other => panic!("{other:?} for {bad:?}"),
        }
    }
    assert_eq!(
        parse_command(r#"a "b c" "d""e""#),
        Some(vec!["a".into(), "b c".into(), "d\"e".into()])
    );
    assert_eq!(parse_command(r#"a"b"#), None);
    assert_eq!(parse_command(r#""a"b"#), None);
}

#[test]
fn priority_prefix() {
    assert_eq!(split_priority(b"<4>warn"), (4, &b"warn"[..]));
    assert_eq!(split_priority(b"<0>"), (0, &b""[..]));
    assert_eq!(split_priority(b"<8>x"), (6, &b"<8>x"[..]));
    assert_eq!(split_priority(b" <3>x"), (6, &b" <3>x"[..]));
    assert_eq!(split_priority(b"<3x"), (6, &b"<3x"[..]));
}

#[tokio::test]
async fn env_is_exactly_the_given_one_plus_agent_comfd() {
    let dir = tempfile::tempdir().unwrap();
    // /proc/$$/environ is what the shell received, before it adds PWD and the like.
    let ran = run_body(dir.path(), r#"tr '\0' '\n' < /proc/$$/environ"#).await;
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    let got: BTreeMap<String, String> = ran
        .texts()
        .iter()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let mut expected = base_env();
    expected.insert("AGENT_COMFD".into(), "3".into());
    assert_eq!(got, expected);
}

#[tokio::test]
async fn runs_in_cwd_and_receives_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().join("state");
    std::fs::create_dir(&cwd).unwrap();
    let path = write_script(dir.path(), "s", "pwd; cat > stdin.copy");
    let (_tx, rx) = watch::channel(false);
    let request = br#"{"force":false,"module_url":"ghcr.io/x/y:1.0"}"#;
    let ran = run_script(&path, &cwd, request, Duration::from_secs(10), &rx, FAST).await;
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    assert_eq!(
        ran.texts(),
        [cwd.canonicalize().unwrap().to_string_lossy().into_owned()]
    );
    assert_eq!(std::fs::read(cwd.join("stdin.copy")).unwrap(), request);
}

#[tokio::test]
async fn symlinked_script_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = write_script(dir.path(), "real", "echo via $0");
    let d = dir.path().join("update-module.d");
    std::fs::create_dir(&d).unwrap();
    symlink(&target, d.join("10link")).unwrap();
    let listing = list_executables(&d).unwrap();
    assert_eq!(listing.runnable, [d.join("10link")]);
    let (_tx, rx) = watch::channel(false);
    let ran = run_script(
        &listing.runnable[0],
        dir.path(),
        b"",
        Duration::from_secs(10),
        &rx,
        FAST,
    )
    .await;
    assert_eq!(ran.outcome().name, "10link");
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    assert_eq!(ran.texts(), [format!("via {}", d.join("10link").display())]);
}

#[tokio::test]
async fn output_lines_and_priorities() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run_body(
        dir.path(),
        r#"echo '<4>warn'; echo plain; echo '<3>on stderr' >&2; printf '\377abc\n'; echo '<9>not a priority'; printf 'no newline'"#,
    )
    .await;
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    let mut lines = ran.lines();
    // stdout and stderr are read concurrently: only the order within a stream is fixed.
    let stderr_line = (3, "on stderr".to_string());
    assert!(lines.contains(&stderr_line), "{lines:?}");
    lines.retain(|l| *l != stderr_line);
    assert_eq!(
        lines,
        [
            (4, "warn".to_string()),
            (6, "plain".to_string()),
            (6, "\u{FFFD}abc".to_string()),
            (6, "<9>not a priority".to_string()),
            (6, "no newline".to_string()),
        ]
    );
}

#[tokio::test]
async fn long_lines_are_split() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run_body(
        dir.path(),
        "printf '<5>'; head -c 70000 /dev/zero | tr '\\0' a; echo; echo next",
    )
    .await;
    let lines = ran.lines();
    assert_eq!(
        lines.len(),
        3,
        "{:?}",
        lines.iter().map(|l| l.1.len()).collect::<Vec<_>>()
    );
    assert_eq!(lines[0].0, 5);
    assert_eq!(lines[0].1.len(), MAX_LINE - 3);
    assert_eq!(lines[1], (5, "a".repeat(70000 - (MAX_LINE - 3))));
    assert_eq!(lines[2], (6, "next".to_string()));
}

#[tokio::test]
async fn agent_comfd_progress_and_ignored_commands() {
    let dir = tempfile::tempdir().unwrap();
    let ran = run_body(
        dir.path(),
        "echo set-progress 40 >&3; echo 'frobnicate now' >&3; echo 'set-weight 50run_scriptdir 2' >&$AGENT_COMFD; echo set-progress 90 >&3",
    )
    .await;
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    let progress: Vec<_> = ran
        .outputs
        .iter()
        .filter_map(|o| match o {
            ScriptOutput::Progress(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [40, 90]);
    let lines = ran.lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|(p, _)| *p == priority::DEBUG));
    assert!(lines[0].1.contains("unknown") && lines[0].1.contains("frobnicate now"));
    assert!(lines[1].1.contains("set-weight"));
}

#[tokio::test]
async fn exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let failed = run_body(dir.path(), "echo before; exit 3").await;
    assert_eq!(failed.outcome().status, ScriptStatus::Failed);
    assert_eq!(failed.outcome().exit_code, Some(3));
    assert_eq!(failed.outcome().name, "script");
    assert_eq!(failed.texts(), ["before"]);

    let killed = run_body(dir.path(), "kill -9 $$").await;
    assert_eq!(killed.outcome().status, ScriptStatus::Failed);
    assert_eq!(killed.outcome().exit_code, Some(-1));

    let ok = run_body(dir.path(), "sleep 0.1").await;
    assert_eq!(ok.outcome().status, ScriptStatus::Ok);
    assert_eq!(ok.outcome().exit_code, Some(0));
    assert!(ok.outcome().duration_ms >= 100, "{:?}", ok.outcome());
}

#[tokio::test]
async fn spawn_failures_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"\x00\x01\x02 not a program").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_tx, rx) = watch::channel(false);
    let ran = run_script(&garbage, dir.path(), b"", Duration::from_secs(5), &rx, FAST).await;
    match ran.result {
        Err(ScriptError::Spawn { path, source }) => {
            assert_eq!(path, garbage);
            assert_eq!(source.raw_os_error(), Some(Errno::ENOEXEC as i32));
        }
        other => panic!("{other:?}"),
    }
    let vanished = dir.path().join("vanished");
    let ran = run_script(
        &vanished,
        dir.path(),
        b"",
        Duration::from_secs(5),
        &rx,
        FAST,
    )
    .await;
    assert!(
        matches!(&ran.result, Err(ScriptError::Spawn { source, .. }) if source.kind() == io::ErrorKind::NotFound),
        "{:?}",
        ran.result
    );
    assert!(ran.outputs.is_empty());
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_script(
        dir.path(),
        "hang",
        "sleep 1000 & echo $! > kids\n\
         sh -c 'sleep 1000 & echo $! >> kids; wait' & echo $! >> kids\n\
         while [ $(wc -l < kids) -lt 3 ]; do sleep 0.01; done\n\
         echo started\n\
         sleep 1000",
    );
    let (_tx, rx) = watch::channel(false);
    let ran = run_script(
        &path,
        dir.path(),
        b"",
        Duration::from_millis(800),
        &rx,
        FAST,
    )
    .await;
    let outcome = ran.outcome();
    assert_eq!(outcome.status, ScriptStatus::Timeout);
    assert_eq!(outcome.exit_code, None);
    assert!(outcome.duration_ms >= 800, "{outcome:?}");
    assert!(ran.elapsed < Duration::from_secs(3), "{:?}", ran.elapsed);
    assert_eq!(ran.texts(), ["started"]);
    let pids = pids_in(&dir.path().join("kids"));
    assert_eq!(pids.len(), 3);
    assert_all_gone(&pids).await;
}

#[tokio::test]
async fn cancel_terminates_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_script(
        dir.path(),
        "hang",
        "sleep 1000 & echo $! > kids\necho started\nsleep 1000",
    );
    let (tx, rx) = watch::channel(false);
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
        tx
    });
    let ran = run_script(
        &path,
        dir.path(),
        b"",
        Duration::from_secs(30),
        &rx,
        Limits::DEFAULT,
    )
    .await;
    let _tx = canceller.await.unwrap();
    assert_eq!(ran.outcome().status, ScriptStatus::Cancelled);
    assert_eq!(ran.outcome().exit_code, None);
    // SIGTERM was enough: no wait for the 10 s SIGKILL.
    assert!(ran.elapsed < Duration::from_secs(3), "{:?}", ran.elapsed);
    assert_eq!(ran.texts(), ["started"]);
    assert_all_gone(&pids_in(&dir.path().join("kids"))).await;
}

#[tokio::test]
async fn cancel_kills_a_group_that_ignores_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_script(
        dir.path(),
        "stubborn",
        "trap '' TERM\nsleep 1000 & echo $! > kids\necho started\nsleep 1000",
    );
    let (tx, rx) = watch::channel(false);
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
        tx
    });
    let ran = run_script(&path, dir.path(), b"", Duration::from_secs(30), &rx, FAST).await;
    let _tx = canceller.await.unwrap();
    assert_eq!(ran.outcome().status, ScriptStatus::Cancelled);
    assert!(
        ran.elapsed >= Duration::from_millis(600),
        "{:?}",
        ran.elapsed
    );
    assert!(ran.elapsed < Duration::from_secs(3), "{:?}", ran.elapsed);
    assert_all_gone(&pids_in(&dir.path().join("kids"))).await;
}

#[tokio::test]
async fn cancelled_before_start_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_script(dir.path(), "s", "touch ran");
    let (_tx, rx) = watch::channel(true);
    let ran = run_script(&path, dir.path(), b"", Duration::from_secs(5), &rx, FAST).await;
    assert_eq!(ran.outcome().status, ScriptStatus::Cancelled);
    assert!(!dir.path().join("ran").exists());
}

#[tokio::test]
async fn background_process_holding_stdout_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_script(
        dir.path(),
        "daemonize",
        "sleep 1000 & echo $! > bg\necho done",
    );
    let (_tx, rx) = watch::channel(false);
    let ran = run_script(&path, dir.path(), b"", Duration::from_secs(30), &rx, FAST).await;
    let bg = pids_in(&dir.path().join("bg"));
    // The background process is not ours to kill after a normal exit (NS8 leaves it too).
    let still_running = !is_gone(bg[0]);
    for pid in &bg {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    assert!(still_running);
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    assert!(ran.elapsed < Duration::from_secs(2), "{:?}", ran.elapsed);
    let lines = ran.lines();
    assert_eq!(lines[0], (6, "done".to_string()));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1].0, priority::WARNING);
    assert!(lines[1].1.contains("background process"), "{}", lines[1].1);
}

#[tokio::test]
async fn large_stdin_not_read_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let big = vec![b'x'; 1024 * 1024];
    let (_tx, rx) = watch::channel(false);
    let ignore = write_script(dir.path(), "ignore", "echo ignored");
    let ran = run_script(&ignore, dir.path(), &big, Duration::from_secs(5), &rx, FAST).await;
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    assert_eq!(ran.texts(), ["ignored"]);
    assert!(ran.elapsed < Duration::from_secs(2), "{:?}", ran.elapsed);

    let read = write_script(dir.path(), "read", "cat > copy");
    let ran = run_script(&read, dir.path(), &big, Duration::from_secs(5), &rx, FAST).await;
    assert_eq!(ran.outcome().status, ScriptStatus::Ok);
    assert_eq!(std::fs::read(dir.path().join("copy")).unwrap(), big);
}

#[tokio::test]
async fn only_stdio_and_agent_comfd_reach_the_script() {
    let dir = tempfile::tempdir().unwrap();
    // Descriptors of ours (CLOEXEC) and inherited strays (no CLOEXEC) both stay out.
    let _ours = std::fs::File::open("/dev/null").unwrap();
    let stray: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    fcntl(&stray, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    // `ls` itself opens one descriptor (4) for the listing.
    let ran = run_body(dir.path(), "exec ls /proc/self/fd").await;
    let mut fds: Vec<i32> = ran.texts().iter().map(|t| t.parse().unwrap()).collect();
    fds.sort();
    assert_eq!(fds, [0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn dropping_the_run_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_script(
        dir.path(),
        "hang",
        "sleep 1000 & echo $! > kids\necho $$ >> kids\nsleep 1000",
    );
    let (_tx, rx) = watch::channel(false);
    let kids = dir.path().join("kids");
    let dropped = tokio::time::timeout(
        Duration::from_millis(500),
        run_script(&path, dir.path(), b"", Duration::from_secs(30), &rx, FAST),
    )
    .await;
    assert!(dropped.is_err());
    assert_all_gone(&pids_in(&kids)).await;
}

#[test]
fn run_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let env = BTreeMap::new();
    let script = ScriptRun {
        path: Path::new("/bin/true"),
        env: &env,
        cwd: Path::new("/"),
        stdin: b"",
        timeout: Duration::from_secs(1),
    };
    let (_tx, rx) = watch::channel(false);
    let mut on_output = |_: ScriptOutput| {};
    let future = run(&script, &rx, &mut on_output);
    assert_send(&future);
}
