//! The command line, as clap definitions. Completions and the man page are generated from these
//! (see [`crate::generate`]), so every flag documented here is what the shells complete.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use module_updater_dbus::JOB_PATH_PREFIX;

/// The binary's name, in completions and man pages.
pub const BIN_NAME: &str = "module-updater";
/// The environment variable the completion registration scripts set (`COMPLETE=bash`).
pub const COMPLETE_VAR: &str = "COMPLETE";
/// NS8's agent settings on a node (`REDIS_ADDRESS`).
const NS8_AGENT_ENV: &str = "/etc/nethserver/agent.env";
/// The cluster agent's credentials on the leader.
const NS8_CLUSTER_CREDENTIALS: &str = "/var/lib/nethserver/cluster/state/agent.env";

/// Which bus to talk to. At most one; the system bus when none is given.
#[derive(Debug, Clone, Default, Args)]
#[group(multiple = false)]
pub struct BusArgs {
    /// Talk to the service on the system bus (the default).
    #[arg(long, global = true)]
    pub system: bool,
    /// Talk to the service on the user's session bus.
    #[arg(long, global = true)]
    pub user: bool,
    /// Talk to the service on the bus at this D-Bus address (unix:path=..., unixexec:...).
    #[arg(long, value_name = "ADDR", global = true)]
    pub address: Option<String>,
    /// Talk to the system bus of a remote host, through `ssh -xT [USER@]HOST systemd-stdio-bridge`
    /// (as `busctl -H`).
    #[arg(short = 'H', long, value_name = "[USER@]HOST", global = true)]
    pub host: Option<String>,
}

/// module-updater: update NethServer 8 module instances through module-updaterd.
///
/// Output: `update` and `wait` follow the job (progress on stderr) and end with a short summary
/// when stdout is a terminal, with the result JSON when it is not or with --json. `run
/// update-module` always prints the result JSON, as NS8's api-cli does. `list`, `show`, `jobs` and
/// `status` print tables, JSON with --json. Times are in the local time zone (TZ), UTC with
/// --utc, ISO 8601 in UTC in JSON.
///
/// Errors: one line on stderr; with --json also `{"error": {"name": NAME, "message": TEXT,
/// "exit_code": N}}` on stdout, plus `"details"` holding NS8's validation array when the service
/// refused the request (`run update-module` prints that array alone, as api-cli does).
///
/// Ctrl-C: `update` and `run` cancel the job they started and follow it to its end (a second
/// Ctrl-C detaches); `wait` only detaches, the job goes on.
///
/// Completion: the installed bash, zsh and fish scripts ask this program for the candidates, which
/// adds the instance ids and job numbers the service lists (none when it is not running).
///
/// Exit codes: 0 success, 1 the update failed (or another error), 2 busy (an instance is already
/// being updated), 3 the service cannot be reached, 4 no such job or instance, 10 validation
/// failed, 64 bad command line or input, 130 interrupted (detached).
#[derive(Debug, Parser)]
#[command(name = "module-updater", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Seconds to wait for the reply of each D-Bus call (as busctl's --timeout); a call that may
    /// ask for a password waits at least 150 s, longer than the service waits for polkit.
    #[arg(long, value_name = "SECS", default_value_t = 25.0, global = true, value_parser = parse_timeout)]
    pub timeout: f64,
    /// Never ask for a password. By default, when stdin is a terminal, the calls that polkit
    /// authorises (update, run, cancel by a non-root user) let polkit ask for an
    /// administrator's password: the call carries the D-Bus flag ALLOW_INTERACTIVE_AUTHORIZATION,
    /// waits long enough for the prompt, and a text agent (pkttyagent) is started for the call
    /// when none runs for this process. With this flag such a call is refused at once instead
    /// (as systemctl's --no-ask-password).
    #[arg(long, global = true)]
    pub no_ask_password: bool,
    /// Print JSON instead of tables and summaries (one object per line for monitor), errors too.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only the result JSON when following a job; no progress, no summary.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// While following a job, show debug-level messages too (the environment keys written, ...).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Show times in UTC instead of the local time zone.
    #[arg(long, global = true)]
    pub utc: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an action with a JSON request, as NS8's `api-cli run`, and follow its job to the end.
    ///
    /// stdout is the job's result JSON, byte for byte as GetResult returns it, on a terminal too;
    /// a refused request prints NS8's validation array (exit code 10) or the busy array (2).
    /// Progress goes to stderr. Ctrl-C cancels the job, a second one detaches.
    Run {
        #[command(subcommand)]
        action: RunAction,
    },
    /// Update instances to MODULE_URL, as NS8's `update-module` command, and follow the job.
    ///
    /// Refuses an instance whose current image name differs from the new one. While the job runs,
    /// stderr shows a progress bar per instance, with script output and warnings above (debug
    /// lines such as the environment keys written only with -v). At the end, a summary on a
    /// terminal: failures first, each instance's image change, status, warnings, failed scripts
    /// and what was removed, and how to see more; the result JSON with --json or when stdout is
    /// not a terminal. Ctrl-C cancels the job, a second one detaches.
    Update {
        /// The new image, e.g. ghcr.io/nethserver/mail:1.7.1.
        #[arg(value_name = "MODULE_URL")]
        module_url: String,
        /// The instances to update, e.g. mail1.
        #[arg(value_name = "INSTANCE", required = true)]
        instances: Vec<String>,
        /// Update even if the instance already runs that image.
        #[arg(long)]
        force: bool,
        /// Allow an older version (by semantic version) than an instance runs; the service
        /// refuses a downgrade otherwise (module_url_downgrade).
        #[arg(long)]
        allow_downgrade: bool,
        /// Change nothing: print what the update would do (PlanUpdate): each instance's action,
        /// image and digest change, the files added, changed and removed, the steps and scripts
        /// that would run, the images the cleanup would remove and the free space needed. The
        /// new image may be downloaded once into the node's download area, where the update
        /// that follows finds it; for a large image on a slow link, give --timeout the seconds
        /// that download takes (a plan asked again finds it done). Exit code 10 when the update
        /// would be refused.
        #[arg(long)]
        dry_run: bool,
    },
    /// List the module instances: id, image, state and the job updating it.
    List,
    /// Show an instance: its state, the job updating it, its last update and the image keys
    /// of its environment.
    Show {
        #[arg(value_name = "INSTANCE")]
        instance: String,
    },
    /// List the running jobs and the finished ones still kept.
    Jobs,
    /// Check for updates: the newest version above what each instance runs, and whether its
    /// tag moved in the registry. Exit code 100 when an update is available (as dnf
    /// check-update), 0 when none, 1 when no registry could be asked.
    Check {
        #[arg(value_name = "INSTANCE")]
        instances: Vec<String>,
        /// Ask the registries again instead of using the service's kept answers.
        #[arg(long)]
        refresh: bool,
    },
    /// Show the update history of an instance, or of every instance, newest first.
    History {
        #[arg(value_name = "INSTANCE")]
        instance: Option<String>,
    },
    /// Show a job's state, where each of its instances stands, and its result once finished.
    ///
    /// A table of the job's properties (times in the local time zone, or UTC with --utc), each
    /// instance's status, step and progress, then for a finished job each instance's outcome,
    /// failures first. With --json: the properties, the per-instance states, the request and the
    /// result as one JSON object.
    Status {
        #[arg(value_name = "JOB")]
        job: JobRef,
    },
    /// Ask the service to cancel a job.
    Cancel {
        #[arg(value_name = "JOB")]
        job: JobRef,
    },
    /// Attach to a job and follow it to its end; Ctrl-C detaches, the job goes on.
    ///
    /// Shows the job as `update` does: progress on stderr, then the summary on a terminal or the
    /// result JSON (--json, or stdout not a terminal). The exit code is the job's (0 completed,
    /// 1 failed); 130 after Ctrl-C.
    Wait {
        #[arg(value_name = "JOB")]
        job: JobRef,
    },
    /// NS8 cluster commands, run on the cluster's leader.
    Ns8 {
        #[command(subcommand)]
        action: Ns8Action,
    },
    /// Print every signal of the service as it arrives (Ctrl-C to stop).
    Monitor,
    /// Print the client's and the daemon's versions.
    Version,
    /// Generate shell completions or the man page (used by `cargo xtask`).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: GenerateWhat,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunAction {
    /// NS8's update-module: `{"module_url": URL, "instances": [ID...], "force": BOOL}`.
    UpdateModule {
        /// The request JSON, forwarded unchanged; `-` reads it from stdin, `@FILE` from FILE.
        #[arg(long, value_name = "JSON|-|@FILE")]
        data: Data,
        /// Change nothing: print the plan of the request (PlanUpdate) instead of starting a
        /// job, as text, or its JSON with --json. Exit code 10 when the request would be refused.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Ns8Action {
    /// Update instances on every node of the cluster: one update-module-instances task per
    /// node, sent through the cluster's Redis as NS8 sends its own tasks; prints one combined
    /// result JSON (`{"status", "exit_code", "nodes": {N: {...}}}`) and exits as `run` does.
    Update {
        /// NS8's update-module request; `-` reads it from stdin, `@FILE` from FILE.
        #[arg(long, value_name = "JSON|-|@FILE")]
        data: Data,
        /// NS8's agent settings, for the cluster's Redis address (REDIS_ADDRESS).
        #[arg(long, value_name = "FILE", default_value = NS8_AGENT_ENV)]
        agent_env: PathBuf,
        /// The credentials to use (REDIS_USER, REDIS_PASSWORD), unless the environment has them.
        #[arg(long, value_name = "FILE", default_value = NS8_CLUSTER_CREDENTIALS)]
        credentials: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum GenerateWhat {
    /// Print the completion script of SHELL on stdout.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff) on stdout: module-updater(1), or module-updater-SUBCOMMAND(1).
    Man {
        #[arg(value_name = "SUBCOMMAND")]
        subcommand: Option<String>,
        /// Print the subcommands that have a page, one a line, instead.
        #[arg(long, conflicts_with = "subcommand")]
        list: bool,
    },
}

/// The shells completions are generated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

fn parse_timeout(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    // Zero or a negative value would make every call fail at once; an enormous one overflows Duration.
    if !(secs > 0.0 && secs <= 86_400.0 * 365.0) {
        return Err(format!(
            "{text:?} must be more than 0 and at most a year of seconds"
        ));
    }
    Ok(secs)
}

/// A job named on the command line: its id (`7`) or its object path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    id: u64,
}

impl JobRef {
    pub fn new(id: u64) -> JobRef {
        JobRef { id }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The job's object path, `/org/nethserver/ModuleUpdater/job/<id>`.
    pub fn path(&self) -> String {
        format!("{JOB_PATH_PREFIX}/{}", self.id)
    }

    /// The job of an object path, if it is a job path.
    pub fn from_path(path: &str) -> Option<JobRef> {
        let rest = path.strip_prefix(JOB_PATH_PREFIX)?.strip_prefix('/')?;
        parse_decimal(rest).map(JobRef::new)
    }
}

/// Plain decimal digits only: `+7`, ` 7` and `07`-style surprises are not job ids.
fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl FromStr for JobRef {
    type Err = String;

    fn from_str(text: &str) -> Result<JobRef, String> {
        if let Some(id) = parse_decimal(text) {
            return Ok(JobRef::new(id));
        }
        if text.starts_with('/') {
            return JobRef::from_path(text).ok_or_else(|| {
                format!("{text:?} is not a job path; expected {JOB_PATH_PREFIX}/<n>")
            });
        }
        Err(format!(
            "{text:?} is not a job; give its id (7) or its path ({JOB_PATH_PREFIX}/7), see `module-updater jobs`"
        ))
    }
}

impl fmt::Display for JobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id)
    }
}

/// Where `--data` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// The JSON text itself.
    Inline(String),
    /// `-`: standard input.
    Stdin,
    /// `@FILE`.
    File(PathBuf),
}

impl FromStr for Data {
    type Err = String;

    fn from_str(text: &str) -> Result<Data, String> {
        if text == "-" {
            Ok(Data::Stdin)
        } else if let Some(path) = text.strip_prefix('@') {
            if path.is_empty() {
                return Err("@ needs a file name: --data @FILE".to_owned());
            }
            Ok(Data::File(PathBuf::from(path)))
        } else {
            Ok(Data::Inline(text.to_owned()))
        }
    }
}

/// Why `--data` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read the request from stdin: {0}; pipe the JSON in or pass it as --data JSON")]
    Stdin(std::io::Error),
    #[error("cannot read the request from {path:?}: {source}; check the file name after --data @")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Data {
    /// The request text, unchanged (the service validates it). `stdin` is read only for `-`.
    pub fn read(&self, mut stdin: impl Read) -> Result<String, DataError> {
        match self {
            Data::Inline(text) => Ok(text.clone()),
            Data::Stdin => {
                let mut text = String::new();
                stdin.read_to_string(&mut text).map_err(DataError::Stdin)?;
                Ok(text)
            }
            Data::File(path) => std::fs::read_to_string(path).map_err(|source| DataError::File {
                path: path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn job_is_an_id_or_a_path() {
        assert_eq!("7".parse::<JobRef>(), Ok(JobRef::new(7)));
        assert_eq!(
            "/org/nethserver/ModuleUpdater/job/12".parse::<JobRef>(),
            Ok(JobRef::new(12))
        );
        assert_eq!(JobRef::new(7).path(), "/org/nethserver/ModuleUpdater/job/7");
        for bad in [
            "",
            "+7",
            "-1",
            "7a",
            "job7",
            "/org/nethserver/ModuleUpdater/job/",
            "/org/nethserver/ModuleUpdater/job/7/x",
            "/org/nethserver/ModuleUpdater/jobs/7",
            "/org/nethserver/ModuleUpdater",
            "99999999999999999999999",
        ] {
            assert!(bad.parse::<JobRef>().is_err(), "{bad:?} accepted");
        }
        let err = "mail1".parse::<JobRef>().unwrap_err();
        assert!(err.contains("module-updater jobs"), "{err}");
    }

    #[test]
    fn data_inline_stdin_and_file() {
        let json = r#"{"module_url":"ghcr.io/nethserver/mail:1.7.1","instances":["mail1"]}"#;
        assert_eq!(json.parse::<Data>(), Ok(Data::Inline(json.to_owned())));
        assert_eq!("-".parse::<Data>(), Ok(Data::Stdin));
        assert_eq!(
            "@/tmp/x.json".parse::<Data>(),
            Ok(Data::File("/tmp/x.json".into()))
        );
        assert!("@".parse::<Data>().is_err());

        // Inline text is forwarded unchanged, even when it is not JSON: the service judges it.
        let inline = Data::Inline("not json ".to_owned());
        assert_eq!(inline.read(&b"ignored"[..]).unwrap(), "not json ");
        assert_eq!(Data::Stdin.read(json.as_bytes()).unwrap(), json);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("request.json");
        std::fs::write(&file, format!("{json}\n")).unwrap();
        let data: Data = format!("@{}", file.display()).parse().unwrap();
        assert_eq!(data.read(&b""[..]).unwrap(), format!("{json}\n"));

        let missing = Data::File(dir.path().join("missing.json"));
        let err = missing.read(&b""[..]).unwrap_err().to_string();
        assert!(
            err.contains("missing.json") && err.contains("--data @"),
            "{err}"
        );
    }

    #[test]
    fn command_line_shapes() {
        let cli = Cli::try_parse_from([
            "module-updater",
            "run",
            "update-module",
            "--data",
            "@req.json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Run {
                action: RunAction::UpdateModule {
                    data: Data::File(_),
                    dry_run: false
                }
            }
        ));
        assert_eq!(cli.timeout, 25.0);

        let cli = Cli::try_parse_from([
            "module-updater",
            "update",
            "ghcr.io/nethserver/mail:1.7.1",
            "mail1",
            "mail2",
            "--force",
            "-H",
            "root@node1",
            "--timeout",
            "5",
        ])
        .unwrap();
        match cli.command {
            Command::Update {
                module_url,
                instances,
                force,
                ..
            } => {
                assert_eq!(module_url, "ghcr.io/nethserver/mail:1.7.1");
                assert_eq!(instances, ["mail1", "mail2"]);
                assert!(force);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cli.bus.host.as_deref(), Some("root@node1"));
        assert_eq!(cli.timeout, 5.0);

        // update needs at least one instance.
        assert!(Cli::try_parse_from(["module-updater", "update", "ghcr.io/x/mail:1"]).is_err());
        // The bus choices exclude each other.
        assert!(Cli::try_parse_from(["module-updater", "--user", "--system", "list"]).is_err());
        assert!(
            Cli::try_parse_from([
                "module-updater",
                "-H",
                "h",
                "--address",
                "unix:path=/x",
                "list"
            ])
            .is_err()
        );
        // --json and --quiet work after the subcommand too.
        let cli = Cli::try_parse_from(["module-updater", "monitor", "--json"]).unwrap();
        assert!(cli.json);
        assert!(Cli::try_parse_from(["module-updater", "--timeout", "0", "list"]).is_err());
        assert!(Cli::try_parse_from(["module-updater", "--timeout", "x", "list"]).is_err());
        assert!(Cli::try_parse_from(["module-updater", "wait", "mail1"]).is_err());
    }

    #[test]
    fn no_ask_password_anywhere_on_the_line() {
        let cli = Cli::try_parse_from(["module-updater", "show", "mail1"]).unwrap();
        assert!(!cli.no_ask_password);
        for line in [
            ["module-updater", "--no-ask-password", "cancel", "7"],
            ["module-updater", "cancel", "7", "--no-ask-password"],
        ] {
            assert!(Cli::try_parse_from(line).unwrap().no_ask_password);
        }
    }
}
