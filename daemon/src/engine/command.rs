//! The one way podman and skopeo are run: global options first, stdin closed, Go's collector
//! settings (`go_runtime.rs`), an optional `TMPDIR`, the process killed when its future is
//! dropped (a cancel), and a failure that names the command and ends with its stderr's tail.

use std::path::PathBuf;
use std::process::{Output, Stdio};

use tokio::process::Command;

/// How many of the last non-empty stderr lines an error quotes.
pub const TAIL_LINES: usize = 5;

/// Why a command did not give its output.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {source} (is {program} installed? apt-get install {program})")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} {command}` failed ({status}): {stderr}")]
    Failed {
        program: &'static str,
        command: String,
        status: String,
        /// The tail of its stderr ([`tail`]).
        stderr: String,
    },
}

impl CommandError {
    /// Whether the program could not be found (not installed).
    pub fn is_not_found(&self) -> bool {
        matches!(self, CommandError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A program (podman or skopeo) with the options every call of it takes.
#[derive(Debug, Clone)]
pub struct Runner {
    program: &'static str,
    /// Options placed before the subcommand.
    global: Vec<String>,
    /// `TMPDIR` for the program's large temporary files; `None`: its default, /var/tmp.
    tmpdir: Option<PathBuf>,
}

impl Runner {
    pub fn new(program: &'static str, global: Vec<String>) -> Self {
        Runner {
            program,
            global,
            tmpdir: None,
        }
    }

    /// The same runner, the program's temporary files in `dir`.
    pub fn with_tmpdir(self, dir: PathBuf) -> Self {
        Runner {
            tmpdir: Some(dir),
            ..self
        }
    }

    /// `<program> <global> <args>`, as a blocking (std) command, for a reader that is synchronous.
    pub fn std_command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(self.program);
        command.args(&self.global).args(args).stdin(Stdio::null());
        command.envs(super::go_runtime::for_this_process());
        if let Some(dir) = &self.tmpdir {
            command.env("TMPDIR", dir);
        }
        command
    }

    /// Runs `<program> <global> <args>` to its end and returns its whole output, whatever its
    /// exit status. Dropping the future kills the process.
    pub async fn run(&self, args: &[&str]) -> Result<Output, CommandError> {
        let mut command = Command::from(self.std_command(args));
        command
            .kill_on_drop(true)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|source| self.spawn_error(source))
    }

    /// Runs `<program> <global> <args>` and returns its stdout, or its failure.
    pub async fn output(&self, args: &[&str]) -> Result<Vec<u8>, CommandError> {
        let output = self.run(args).await?;
        if output.status.success() {
            Ok(output.stdout)
        } else {
            Err(self.failure(args, &output.status.to_string(), &output.stderr))
        }
    }

    /// The error of a process that could not be started.
    pub fn spawn_error(&self, source: std::io::Error) -> CommandError {
        CommandError::Spawn {
            program: self.program,
            source,
        }
    }

    /// The error of `args` that ended with `status` and wrote `stderr`.
    fn failure(&self, args: &[&str], status: &str, stderr: &[u8]) -> CommandError {
        CommandError::Failed {
            program: self.program,
            command: args.join(" "),
            status: status.to_owned(),
            stderr: tail(stderr),
        }
    }
}

/// The last non-empty lines of a command's stderr, joined by ` | `, for error messages.
pub fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    lines[start..].join(" | ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\n\nb\nc\nd\ne\nf\n"), "b | c | d | e | f");
    }

    #[tokio::test]
    async fn a_failure_names_the_command_and_quotes_stderr() {
        let sh = Runner::new("sh", Vec::new());
        let err = sh
            .output(&["-c", "echo one >&2; echo two >&2; exit 3"])
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("`sh -c echo one"), "{text}");
        assert!(text.ends_with("(exit status: 3): one | two"), "{text}");
        let missing = Runner::new("module-updater-no-such-tool", Vec::new());
        let err = missing.output(&["x"]).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(
            err.to_string()
                .contains("apt-get install module-updater-no-such-tool")
        );
    }

    #[tokio::test]
    async fn the_go_settings_and_tmpdir_reach_the_program() {
        let sh = Runner::new("sh", Vec::new()).with_tmpdir("/tmp/x".into());
        let out = sh
            .output(&["-c", "echo \"$GOGC $GOMEMLIMIT $TMPDIR\""])
            .await
            .unwrap();
        let go: Vec<&str> = super::super::go_runtime::for_this_process()
            .iter()
            .map(|(_, value)| *value)
            .collect();
        let expected = match &go[..] {
            [gogc, limit] => format!("{gogc} {limit} /tmp/x\n"),
            // The environment of the test sets its own: passed on untouched.
            _ => return,
        };
        assert_eq!(String::from_utf8_lossy(&out), expected);
    }
}
