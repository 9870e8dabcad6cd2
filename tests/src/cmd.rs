//! Running external programs: clean environments, captured output, errors that say what ran and
//! what it printed, and timeouts so a hung tool fails a test instead of hanging it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{Result, SandboxError};

/// The `PATH` given to every command the sandbox runs: the ambient one of a test runner may point
/// at toolchains or wrappers that have nothing to do with the machine under test.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The tools the sandbox runs, with the Debian package that provides each.
pub const TOOLS: &[(&str, &str)] = &[
    ("podman", "podman"),
    ("skopeo", "skopeo"),
    ("gzip", "gzip"),
    ("sha256sum", "coreutils"),
    ("newuidmap", "uidmap"),
    ("docker-registry", "docker-registry"),
    ("dbus-daemon", "dbus"),
    ("busctl", "systemd"),
    ("/usr/lib/systemd/systemd", "systemd"),
    ("/usr/lib/systemd/user/dbus.socket", "dbus-user-session"),
    ("useradd", "passwd"),
    ("userdel", "passwd"),
    ("runuser", "util-linux"),
    ("setpriv", "util-linux"),
    ("setsid", "util-linux"),
    ("tar", "tar"),
    ("bash", "bash"),
];

/// Finds `tool` (a name looked up in [`PATH`], or an absolute path).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let candidate = Path::new(tool);
    if candidate.is_absolute() {
        return candidate.exists().then(|| candidate.to_path_buf());
    }
    PATH.split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.is_file())
}

/// Fails loudly, naming the package to install, when one of [`TOOLS`] is missing.
pub fn require_tools() -> Result<()> {
    let missing: Vec<(&str, &str)> = TOOLS
        .iter()
        .copied()
        .filter(|(tool, _)| find_tool(tool).is_none())
        .collect();
    match missing.first() {
        None => Ok(()),
        Some(_) => {
            let mut packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
            packages.dedup();
            Err(SandboxError::MissingTools {
                tools: missing
                    .iter()
                    .map(|(tool, _)| *tool)
                    .collect::<Vec<_>>()
                    .join(", "),
                packages: packages.join(" "),
            })
        }
    }
}

/// A command with an empty environment except `PATH` and `LANG`.
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env_clear().env("PATH", PATH).env("LANG", "C.UTF-8");
    command
}

/// The command line as a person would type it (for error messages).
pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            format!("'{}'", arg.replace('\'', r"'\''"))
        } else {
            arg.into_owned()
        }
    }));
    words.join(" ")
}

/// The last lines of a program's output: enough to see why it failed, not a whole log.
pub fn tail(bytes: &[u8]) -> String {
    const MAX: usize = 4000;
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut start = text.len() - MAX;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// Runs `command` to completion and returns its output, whatever its exit status.
pub fn output(command: &mut Command) -> Result<Output> {
    output_timeout(command, Duration::from_secs(120))
}

/// Runs `command` and fails unless it exits 0.
pub fn run(command: &mut Command) -> Result<Output> {
    let output = output(command)?;
    check(command, output)
}

/// Turns a non-zero exit into an error that quotes the command and its stderr.
pub fn check(command: &Command, output: Output) -> Result<Output> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(SandboxError::CommandFailed {
            command: describe(command),
            status: output.status,
            stderr: tail(&output.stderr),
            stdout: tail(&output.stdout),
        })
    }
}

/// Runs `command` with captured stdout and stderr; kills it (and fails) after `timeout`.
pub fn output_timeout(command: &mut Command, timeout: Duration) -> Result<Output> {
    let described = describe(command);
    if command
        .get_program()
        .to_str()
        .is_some_and(|p| !p.contains('/'))
    {
        let program = command.get_program().to_string_lossy().into_owned();
        if find_tool(&program).is_none() {
            return Err(SandboxError::MissingTools {
                tools: program.clone(),
                packages: package_of(&program).to_owned(),
            });
        }
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SandboxError::Spawn {
            command: described.clone(),
            source,
        })?;
    // Both pipes are drained on threads so that a chatty program never blocks on a full pipe.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let status = match wait_deadline(&mut child, timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SandboxError::Timeout {
                what: format!("`{described}` to finish"),
                secs: timeout.as_secs_f64(),
                detail: "the command was killed".to_owned(),
            });
        }
        Err(source) => {
            return Err(SandboxError::Spawn {
                command: described,
                source,
            });
        }
    };
    let collect = |handle: Option<std::thread::JoinHandle<Vec<u8>>>| {
        handle.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn drain(mut source: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = source.read_to_end(&mut buffer);
        buffer
    })
}

/// Waits for `child` until `timeout`; `None` when it is still running then.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The Debian package providing `tool`, for install hints.
pub fn package_of(tool: &str) -> &'static str {
    TOOLS
        .iter()
        .find(|(name, _)| *name == tool)
        .map(|(_, package)| *package)
        .unwrap_or(match tool {
            "gdbus" => "libglib2.0-bin",
            "sh" => "dash",
            _ => "the package that provides it",
        })
}

/// Polls `probe` until it returns `Some`, at most until `timeout`. No blind sleeps: the probe is
/// retried quickly at first, then every 25 ms.
pub fn poll<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = probe()? {
            return Ok(Some(value));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}
