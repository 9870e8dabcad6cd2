//! The daemon's configuration: command-line flags, over the file
//! `/etc/module-updater/config.toml`, over built-in defaults, resolved into one [`Config`].
//!
//! Every setting the file may hold is described once in [`KEYS`] (name, accepted values, default,
//! meaning); the flags, the file check, the error messages and the man page all use it. A value
//! is checked the same way whether it comes from a flag or from the file, so a flag cannot start
//! the daemon with something the file would refuse.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser};
use serde::Deserialize;

mod keys;
use keys::*;
pub use keys::{KEYS, Key, MAX_PARALLEL, MAX_SECONDS, Rule};

/// The configuration file read when `--config` is not given. A missing one means defaults.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/module-updater/config.toml";
/// Why the configuration cannot be used. Each message names the file, the key, the value and
/// what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}{}: {source}", if *explicit { " (given with --config)" } else { "" })]
    Read {
        path: PathBuf,
        explicit: bool,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid TOML file: {detail}")]
    Syntax { path: PathBuf, detail: String },
    #[error(
        "unknown key {key} in {path} (line {line}): the keys are {}",
        KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
    )]
    UnknownKey {
        key: String,
        path: PathBuf,
        line: usize,
    },
    #[error("{key} = {value} in {path}: {requirement}")]
    BadValue {
        key: &'static str,
        value: String,
        path: PathBuf,
        requirement: String,
    },
}

/// The settings that both the file and the flags may give; `None` is "not given here".
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct Settings {
    /// Where rootless instances' homes are (a user's home is <DIR>/<id>) [default: /home].
    #[arg(long, value_name = "DIR", value_parser = home_base_flag)]
    pub home_base: Option<PathBuf>,
    /// Where rootful instances live (<DIR>/<id>, state in <DIR>/<id>/state) [default: /var/lib/nethserver].
    #[arg(long, value_name = "DIR", value_parser = rootful_base_flag)]
    pub rootful_base: Option<PathBuf>,
    /// The D-Bus address where the systemd manager of rootful instances answers [default: the system bus].
    #[arg(long, value_name = "ADDR", value_parser = system_manager_address_flag)]
    pub system_manager_address: Option<String>,
    /// Kill an update-module.d script after this many seconds [default: 1800].
    #[arg(long, value_name = "SECS", value_parser = script_timeout_flag)]
    pub script_timeout: Option<u64>,
    /// Update at most this many instances at once, over all jobs [default: 2 × CPUs].
    #[arg(long, value_name = "N", value_parser = max_parallel_flag)]
    pub max_parallel: Option<usize>,
    /// Run the workers (and their podman commands and scripts) at this niceness, 0 to 19 [default: 10].
    #[arg(long, value_name = "N", value_parser = worker_nice_flag)]
    pub worker_nice: Option<u64>,
    /// Keep a finished job on the bus this many seconds so late clients can read it [default: 300].
    #[arg(long, value_name = "SECS", value_parser = job_linger_flag)]
    pub job_linger: Option<u64>,
    /// Where job records and the job counter are kept [default: /var/lib/module-updater].
    #[arg(long, value_name = "DIR", value_parser = state_dir_flag)]
    pub state_dir: Option<PathBuf>,
    /// Exit after this many seconds with no job running and no bus traffic (for bus activation) [default: never].
    #[arg(long, value_name = "SECS", value_parser = idle_timeout_flag)]
    pub idle_timeout: Option<u64>,
    /// NS8's agent settings, for the cluster's Redis [default: /etc/nethserver/agent.env].
    #[arg(long, value_name = "FILE", value_parser = ns8_agent_env_flag)]
    pub ns8_agent_env: Option<PathBuf>,
    /// Give up on a registry that accepts no connection within this many seconds when checking for updates [default: 5].
    #[arg(long, value_name = "SECS", value_parser = registry_connect_timeout_flag)]
    pub registry_connect_timeout: Option<u64>,
    /// Give up on a registry query with no answer within this many seconds when checking for updates [default: 30].
    #[arg(long, value_name = "SECS", value_parser = registry_timeout_flag)]
    pub registry_timeout: Option<u64>,
    /// Wait at most this many seconds for an updated instance to pass the health gate [default: 120].
    #[arg(long, value_name = "SECS", value_parser = health_timeout_flag)]
    pub health_timeout: Option<u64>,
    /// Keep each instance's previous version for a rollback [default: true].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub keep_previous: Option<bool>,
    /// Roll an instance back when its update fails (module step or health gate) [default: false].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub rollback_on_failure: Option<bool>,
    /// MemoryMax= of each update's systemd scope, in bytes [default: no limit].
    #[arg(long, value_name = "BYTES", value_parser = update_memory_max_flag)]
    pub update_memory_max: Option<u64>,
    /// TasksMax= of each update's systemd scope [default: systemd's].
    #[arg(long, value_name = "N", value_parser = update_tasks_max_flag)]
    pub update_tasks_max: Option<u64>,
    /// Stop a download of images that takes longer than this many seconds [default: 1800].
    #[arg(long, value_name = "SECS", value_parser = pull_timeout_flag)]
    pub pull_timeout: Option<u64>,
}

impl Settings {
    /// Each setting of `self`, else of `lower`.
    pub fn over(self, lower: Settings) -> Settings {
        Settings {
            home_base: self.home_base.or(lower.home_base),
            rootful_base: self.rootful_base.or(lower.rootful_base),
            system_manager_address: self.system_manager_address.or(lower.system_manager_address),
            script_timeout: self.script_timeout.or(lower.script_timeout),
            max_parallel: self.max_parallel.or(lower.max_parallel),
            worker_nice: self.worker_nice.or(lower.worker_nice),
            job_linger: self.job_linger.or(lower.job_linger),
            state_dir: self.state_dir.or(lower.state_dir),
            idle_timeout: self.idle_timeout.or(lower.idle_timeout),
            ns8_agent_env: self.ns8_agent_env.or(lower.ns8_agent_env),
            registry_connect_timeout: self
                .registry_connect_timeout
                .or(lower.registry_connect_timeout),
            registry_timeout: self.registry_timeout.or(lower.registry_timeout),
            health_timeout: self.health_timeout.or(lower.health_timeout),
            keep_previous: self.keep_previous.or(lower.keep_previous),
            rollback_on_failure: self.rollback_on_failure.or(lower.rollback_on_failure),
            update_memory_max: self.update_memory_max.or(lower.update_memory_max),
            update_tasks_max: self.update_tasks_max.or(lower.update_tasks_max),
            pull_timeout: self.pull_timeout.or(lower.pull_timeout),
        }
    }
}

// Flag parsers: the same checks as the file, so that clap says e.g.
// "invalid value '0' for '--max-parallel <N>': must be at least 1".
fn number_flag(key: &Key, text: &str) -> Result<u64, String> {
    let value: i64 = text
        .trim()
        .parse()
        .map_err(|_| format!("must be {}", key.rule.allowed()))?;
    key.rule.check_number(value)
}
fn path_flag(key: &Key, text: &str) -> Result<PathBuf, String> {
    key.rule.check_path(Path::new(text))
}
fn home_base_flag(text: &str) -> Result<PathBuf, String> {
    path_flag(&HOME_BASE, text)
}
fn rootful_base_flag(text: &str) -> Result<PathBuf, String> {
    path_flag(&ROOTFUL_BASE, text)
}
fn state_dir_flag(text: &str) -> Result<PathBuf, String> {
    path_flag(&STATE_DIR, text)
}
fn ns8_agent_env_flag(text: &str) -> Result<PathBuf, String> {
    path_flag(&NS8_AGENT_ENV, text)
}
fn system_manager_address_flag(text: &str) -> Result<String, String> {
    SYSTEM_MANAGER_ADDRESS.rule.check_address(text)
}
fn script_timeout_flag(text: &str) -> Result<u64, String> {
    number_flag(&SCRIPT_TIMEOUT, text)
}
fn worker_nice_flag(text: &str) -> Result<u64, String> {
    number_flag(&WORKER_NICE, text)
}
fn job_linger_flag(text: &str) -> Result<u64, String> {
    number_flag(&JOB_LINGER, text)
}
fn idle_timeout_flag(text: &str) -> Result<u64, String> {
    number_flag(&IDLE_TIMEOUT, text)
}
fn registry_connect_timeout_flag(text: &str) -> Result<u64, String> {
    number_flag(&REGISTRY_CONNECT_TIMEOUT, text)
}
fn registry_timeout_flag(text: &str) -> Result<u64, String> {
    number_flag(&REGISTRY_TIMEOUT, text)
}
fn health_timeout_flag(text: &str) -> Result<u64, String> {
    number_flag(&HEALTH_TIMEOUT, text)
}
fn update_memory_max_flag(text: &str) -> Result<u64, String> {
    number_flag(&UPDATE_MEMORY_MAX, text)
}
fn pull_timeout_flag(text: &str) -> Result<u64, String> {
    number_flag(&PULL_TIMEOUT, text)
}
fn update_tasks_max_flag(text: &str) -> Result<u64, String> {
    number_flag(&UPDATE_TASKS_MAX, text)
}
fn max_parallel_flag(text: &str) -> Result<usize, String> {
    // At most MAX_PARALLEL, so it fits any usize.
    number_flag(&MAX_PARALLEL_KEY, text).map(|n| n as usize)
}

/// The file as TOML gives it. Numbers are read as `i64` so that a negative or zero value reaches
/// our own check (and its message) instead of a serde type error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    home_base: Option<PathBuf>,
    rootful_base: Option<PathBuf>,
    max_parallel: Option<i64>,
    script_timeout: Option<i64>,
    worker_nice: Option<i64>,
    job_linger: Option<i64>,
    idle_timeout: Option<i64>,
    state_dir: Option<PathBuf>,
    system_manager_address: Option<String>,
    ns8_agent_env: Option<PathBuf>,
    registry_connect_timeout: Option<i64>,
    registry_timeout: Option<i64>,
    health_timeout: Option<i64>,
    keep_previous: Option<bool>,
    rollback_on_failure: Option<bool>,
    update_memory_max: Option<i64>,
    update_tasks_max: Option<i64>,
    pull_timeout: Option<i64>,
}

/// A value as the file writes it, for messages.
struct Shown<'a>(&'a dyn fmt::Debug);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug of a string or path is the quoted form TOML uses too.
        write!(f, "{:?}", self.0)
    }
}

impl RawFile {
    fn check(self, path: &Path) -> Result<Settings, ConfigError> {
        let bad = |key: &Key, value: &dyn fmt::Debug, requirement: String| ConfigError::BadValue {
            key: key.name,
            value: Shown(value).to_string(),
            path: path.to_path_buf(),
            requirement,
        };
        let number = |key: &Key, value: Option<i64>| -> Result<Option<u64>, ConfigError> {
            value
                .map(|v| key.rule.check_number(v).map_err(|r| bad(key, &v, r)))
                .transpose()
        };
        let dir = |key: &Key, value: Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
            value
                .map(|v| key.rule.check_path(&v).map_err(|r| bad(key, &v, r)))
                .transpose()
        };
        let address = self
            .system_manager_address
            .map(|v| {
                SYSTEM_MANAGER_ADDRESS
                    .rule
                    .check_address(&v)
                    .map_err(|r| bad(&SYSTEM_MANAGER_ADDRESS, &v, r))
            })
            .transpose()?;
        Ok(Settings {
            home_base: dir(&HOME_BASE, self.home_base)?,
            rootful_base: dir(&ROOTFUL_BASE, self.rootful_base)?,
            system_manager_address: address,
            script_timeout: number(&SCRIPT_TIMEOUT, self.script_timeout)?,
            max_parallel: number(&MAX_PARALLEL_KEY, self.max_parallel)?.map(|n| n as usize),
            worker_nice: number(&WORKER_NICE, self.worker_nice)?,
            job_linger: number(&JOB_LINGER, self.job_linger)?,
            state_dir: dir(&STATE_DIR, self.state_dir)?,
            idle_timeout: number(&IDLE_TIMEOUT, self.idle_timeout)?,
            ns8_agent_env: dir(&NS8_AGENT_ENV, self.ns8_agent_env)?,
            registry_connect_timeout: number(
                &REGISTRY_CONNECT_TIMEOUT,
                self.registry_connect_timeout,
            )?,
            registry_timeout: number(&REGISTRY_TIMEOUT, self.registry_timeout)?,
            health_timeout: number(&HEALTH_TIMEOUT, self.health_timeout)?,
            keep_previous: self.keep_previous,
            rollback_on_failure: self.rollback_on_failure,
            update_memory_max: number(&UPDATE_MEMORY_MAX, self.update_memory_max)?,
            update_tasks_max: number(&UPDATE_TASKS_MAX, self.update_tasks_max)?,
            pull_timeout: number(&PULL_TIMEOUT, self.pull_timeout)?,
        })
    }
}

/// The file's top-level keys with the spans of each key and value, for messages.
type SpannedTable = std::collections::BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>>;

/// Reads the settings of a configuration file's text; `path` is for messages.
pub fn parse_file(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    let syntax = |err: toml::de::Error| ConfigError::Syntax {
        path: path.to_path_buf(),
        detail: err.to_string(),
    };
    // Syntax first, so that every error below is about a key or a value.
    let table: SpannedTable = toml::from_str(text).map_err(syntax)?;
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    // Unknown keys (and sections, which are keys holding a table) by our own list.
    if let Some(unknown) = table
        .keys()
        .find(|key| !KEYS.iter().any(|k| k.name == key.get_ref().as_str()))
    {
        return Err(ConfigError::UnknownKey {
            key: unknown.get_ref().clone(),
            path: path.to_path_buf(),
            line: line_of(unknown.span().start),
        });
    }
    // A value of the wrong type: serde_path_to_error names the key, the span gives its text.
    let deserializer = toml::Deserializer::parse(text).map_err(syntax)?;
    let raw: RawFile = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let name = err.path().to_string();
        let Some(key) = KEYS.iter().find(|k| k.name == name) else {
            return syntax(err.into_inner());
        };
        let value = table
            .get(key.name)
            .and_then(|v| text.get(v.span()))
            .map_or_else(String::new, |v| v.trim().chars().take(80).collect());
        ConfigError::BadValue {
            key: key.name,
            value,
            path: path.to_path_buf(),
            requirement: format!("must be {}", key.rule.allowed()),
        }
    })?;
    raw.check(path)
}

/// Reads the configuration file: `explicit` is the `--config` path, if any. A missing default
/// file means "no settings"; a missing explicit one is an error.
pub fn load_file(explicit: Option<&Path>) -> Result<(Settings, Option<PathBuf>), ConfigError> {
    let path = explicit.unwrap_or(Path::new(DEFAULT_CONFIG_FILE));
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if explicit.is_none() && err.kind() == io::ErrorKind::NotFound => {
            return Ok((Settings::default(), None));
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                explicit: explicit.is_some(),
                source,
            });
        }
    };
    Ok((parse_file(&text, path)?, Some(path.to_path_buf())))
}

/// Which bus the daemon serves on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
#[group(multiple = false)]
pub struct BusArgs {
    /// Serve on the system bus (the default).
    #[arg(long)]
    pub system: bool,
    /// Serve on the session bus.
    #[arg(long)]
    pub session: bool,
    /// Serve on the bus at this D-Bus address (e.g. unix:path=/run/test/bus).
    #[arg(long, value_name = "ADDR")]
    pub address: Option<String>,
}

impl BusArgs {
    /// A builder for the chosen bus.
    pub fn builder(&self) -> zbus::connection::Builder<'static> {
        match (&self.address, self.session) {
            (Some(address), _) => zbus::connection::Builder::address(address.as_str()),
            (None, true) => zbus::connection::Builder::session(),
            (None, false) => zbus::connection::Builder::system(),
        }
    }

    /// How the bus is named in messages.
    pub fn describe(&self) -> String {
        match (&self.address, self.session) {
            (Some(address), _) => format!("the bus at {address}"),
            (None, true) => "the session bus".to_owned(),
            (None, false) => "the system bus".to_owned(),
        }
    }
}

/// module-updaterd: updates NethServer 8 module instances on behalf of D-Bus clients.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "module-updaterd",
    version,
    about,
    long_about = "module-updaterd: the D-Bus system service org.nethserver.ModuleUpdater, which \
                  updates NethServer 8 module instances on behalf of D-Bus clients such as \
                  module-updater(1). It is started by D-Bus activation through \
                  module-updaterd.service. Settings come from the flags, then from \
                  /etc/module-updater/config.toml (see FILES), then from built-in defaults."
)]
pub struct Cli {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Read settings from this TOML file instead of /etc/module-updater/config.toml (which may be
    /// missing; this one may not). Flags override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    /// An option for root podman when updating rootful instances, repeatable (e.g.
    /// `--rootful-podman-arg=--root=/srv/containers`): for nodes whose root storage is elsewhere,
    /// and for tests that must not touch the machine's storage.
    #[arg(
        long = "rootful-podman-arg",
        value_name = "ARG",
        allow_hyphen_values = true
    )]
    pub rootful_podman_args: Vec<String>,
    /// Log debug messages too.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print the man page module-updaterd(8) in roff and exit (used by packaging).
    #[arg(long, hide = true)]
    pub generate_man: bool,
}

/// The resolved configuration the service runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub bus: BusArgs,
    pub home_base: PathBuf,
    pub rootful_base: PathBuf,
    /// `None`: the system bus.
    pub system_manager_address: Option<String>,
    pub script_timeout: u64,
    pub pull_timeout: u64,
    /// `None`: see [`Config::parallelism`].
    pub max_parallel: Option<usize>,
    /// 0 to 19.
    pub worker_nice: u8,
    pub job_linger: u64,
    pub state_dir: PathBuf,
    /// `None`: never exit when idle.
    pub idle_timeout: Option<u64>,
    pub ns8_agent_env: PathBuf,
    pub registry_connect_timeout: u64,
    pub registry_timeout: u64,
    pub health_timeout: u64,
    pub keep_previous: bool,
    pub rollback_on_failure: bool,
    pub rootful_podman_args: Vec<String>,
    /// MemoryMax=/TasksMax= of each update's scope.
    pub scope_limits: crate::engine::scope::Limits,
    pub verbose: bool,
    /// The configuration file that was read, if any.
    pub config_file: Option<PathBuf>,
}

impl Config {
    /// Flags over the file's settings over the built-in defaults.
    pub fn resolve(cli: Cli, file: Settings, config_file: Option<PathBuf>) -> Config {
        let settings = cli.settings.over(file);
        Config {
            bus: cli.bus,
            home_base: settings.home_base.unwrap_or_else(|| "/home".into()),
            rootful_base: settings
                .rootful_base
                .unwrap_or_else(|| "/var/lib/nethserver".into()),
            system_manager_address: settings.system_manager_address,
            script_timeout: settings.script_timeout.unwrap_or(1800),
            pull_timeout: settings.pull_timeout.unwrap_or(1800),
            max_parallel: settings.max_parallel,
            // Checked to be at most 19.
            worker_nice: settings
                .worker_nice
                .map_or(10, |n| u8::try_from(n).unwrap_or(19)),
            job_linger: settings.job_linger.unwrap_or(300),
            state_dir: settings
                .state_dir
                .unwrap_or_else(|| "/var/lib/module-updater".into()),
            idle_timeout: settings.idle_timeout,
            ns8_agent_env: settings
                .ns8_agent_env
                .unwrap_or_else(|| crate::cluster::DEFAULT_AGENT_ENV.into()),
            registry_connect_timeout: settings.registry_connect_timeout.unwrap_or(5),
            registry_timeout: settings.registry_timeout.unwrap_or(30),
            health_timeout: settings.health_timeout.unwrap_or(120),
            keep_previous: settings.keep_previous.unwrap_or(true),
            rollback_on_failure: settings.rollback_on_failure.unwrap_or(false),
            rootful_podman_args: cli.rootful_podman_args,
            scope_limits: crate::engine::scope::Limits {
                memory_max: settings.update_memory_max,
                tasks_max: settings.update_tasks_max,
            },
            verbose: cli.verbose,
            config_file,
        }
    }

    /// Reads the file `cli` names (or the default one) and resolves.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let (file, path) = load_file(cli.config.as_deref())?;
        Ok(Config::resolve(cli, file, path))
    }

    /// How many instance updates may run at once.
    pub fn parallelism(&self) -> usize {
        self.max_parallel
            .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

/// Writes the man page `module-updaterd(8)` in roff: the clap definition plus a FILES section
/// describing every configuration key.
pub fn man_page(out: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command())
        .section("8")
        .manual("System Manager's Manual");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    // The sections clap_mangen does not know, escaped by the roff crate it writes with.
    use roff::{Roff, bold, italic, roman};
    let mut page = Roff::new();
    page.control("SH", ["FILES"])
        .control("TP", [] as [&str; 0])
        .text([italic(DEFAULT_CONFIG_FILE)])
        .text([roman(
            "TOML settings, each overridden by the flag of the same name (with - for _). An \
             unknown key or a bad value stops start-up with exit status 1. Keys:",
        )]);
    for key in KEYS {
        let default = key.default.unwrap_or(key.unset);
        page.control("TP", [] as [&str; 0])
            .text([bold(key.name), roman(format!(" (default: {default})"))])
            .text([roman(format!(
                "{} Must be {}.",
                key.help,
                key.rule.allowed()
            ))]);
    }
    page.control("SH", ["ENVIRONMENT"])
        .control("TP", [] as [&str; 0])
        .text([bold("GOGC"), roman(", "), bold("GOMEMLIMIT")])
        .text([roman(format!(
            "For podman and skopeo, which are Go programs. When neither is set, they get GOGC=off \
             and GOMEMLIMIT={}: Go's garbage collector runs only as a process's heap nears that \
             size. When either is set, podman, skopeo and the update workers get the daemon's \
             values.",
            crate::engine::go_runtime::HEAP_LIMIT
        ))])
        .control("SH", ["SEE ALSO"])
        .text([
            roman("module-updater(1), systemctl(1), busctl(1), "),
            italic("/usr/lib/systemd/system/module-updaterd.service"),
        ]);
    page.to_writer(out)?;
    man.render_version_section(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/module-updater/config.toml";

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["module-updaterd"];
        argv.extend(args);
        Cli::try_parse_from(argv).unwrap()
    }

    fn error(text: &str) -> String {
        parse_file(text, Path::new(FILE)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_without_file_or_flags() {
        let config = Config::resolve(cli(&[]), Settings::default(), None);
        assert_eq!(config.home_base, Path::new("/home"));
        assert_eq!(config.rootful_base, Path::new("/var/lib/nethserver"));
        assert_eq!(config.state_dir, Path::new("/var/lib/module-updater"));
        assert_eq!(config.script_timeout, 1800);
        assert_eq!(config.job_linger, 300);
        assert_eq!(config.max_parallel, None);
        assert_eq!(config.idle_timeout, None);
        assert_eq!(config.system_manager_address, None);
        assert!(config.parallelism() >= 2);
        assert_eq!(config.bus.describe(), "the system bus");
    }

    #[test]
    fn every_key_of_the_file_is_read() {
        let file = parse_file(
            r#"
home_base = "/srv/home"
rootful_base = "/srv/rootful"
max_parallel = 3
script_timeout = 60
job_linger = 0
idle_timeout = 30
state_dir = "/srv/state"
system_manager_address = "unix:path=/run/other/bus"
"#,
            Path::new(FILE),
        )
        .unwrap();
        let config = Config::resolve(cli(&[]), file, Some(FILE.into()));
        assert_eq!(config.home_base, Path::new("/srv/home"));
        assert_eq!(config.rootful_base, Path::new("/srv/rootful"));
        assert_eq!(config.max_parallel, Some(3));
        assert_eq!(config.parallelism(), 3);
        assert_eq!(config.script_timeout, 60);
        assert_eq!(config.job_linger, 0);
        assert_eq!(config.idle_timeout, Some(30));
        assert_eq!(config.state_dir, Path::new("/srv/state"));
        assert_eq!(
            config.system_manager_address.as_deref(),
            Some("unix:path=/run/other/bus")
        );
        assert_eq!(config.config_file.as_deref(), Some(Path::new(FILE)));
    }

    #[test]
    fn flags_override_the_file_key_by_key() {
        let file = parse_file(
            "home_base = \"/srv/home\"\nmax_parallel = 3\nscript_timeout = 60\nidle_timeout = 30\n",
            Path::new(FILE),
        )
        .unwrap();
        let config = Config::resolve(
            cli(&[
                "--max-parallel",
                "7",
                "--script-timeout=5",
                "--state-dir",
                "/tmp/s",
                "--session",
                "-v",
                "--rootful-podman-arg=--root=/x",
            ]),
            file,
            None,
        );
        // From the flags.
        assert_eq!(config.max_parallel, Some(7));
        assert_eq!(config.script_timeout, 5);
        assert_eq!(config.state_dir, Path::new("/tmp/s"));
        assert!(config.verbose);
        assert_eq!(config.rootful_podman_args, vec!["--root=/x".to_owned()]);
        assert_eq!(config.bus.describe(), "the session bus");
        // From the file, where no flag says otherwise.
        assert_eq!(config.home_base, Path::new("/srv/home"));
        assert_eq!(config.idle_timeout, Some(30));
        // Defaults for the rest.
        assert_eq!(config.job_linger, 300);
        assert_eq!(config.rootful_base, Path::new("/var/lib/nethserver"));
    }

    #[test]
    fn comments_and_an_empty_file_are_fine() {
        assert_eq!(
            parse_file("# nothing here\n\n", Path::new(FILE)).unwrap(),
            Settings::default()
        );
    }

    #[test]
    fn number_errors_name_key_value_and_the_limit() {
        assert_eq!(
            error("max_parallel = 0\n"),
            "max_parallel = 0 in /etc/module-updater/config.toml: must be at least 1"
        );
        assert_eq!(
            error("max_parallel = -2\n"),
            "max_parallel = -2 in /etc/module-updater/config.toml: must be at least 1"
        );
        assert_eq!(
            error("max_parallel = 5000\n"),
            "max_parallel = 5000 in /etc/module-updater/config.toml: must be at most 1024"
        );
        assert_eq!(
            error("script_timeout = 0\n"),
            "script_timeout = 0 in /etc/module-updater/config.toml: must be at least 1"
        );
        assert_eq!(
            error("script_timeout = 604801\n"),
            "script_timeout = 604801 in /etc/module-updater/config.toml: must be at most 604800"
        );
        assert_eq!(
            error("job_linger = -1\n"),
            "job_linger = -1 in /etc/module-updater/config.toml: must be at least 0"
        );
        assert_eq!(
            error("idle_timeout = 0\n"),
            "idle_timeout = 0 in /etc/module-updater/config.toml: must be at least 1"
        );
    }

    #[test]
    fn type_errors_name_key_value_and_what_is_allowed() {
        assert_eq!(
            error("max_parallel = \"two\"\n"),
            "max_parallel = \"two\" in /etc/module-updater/config.toml: must be a whole number \
             of instance updates from 1 to 1024"
        );
        assert_eq!(
            error("# seconds\nscript_timeout = 1.5\n"),
            "script_timeout = 1.5 in /etc/module-updater/config.toml: must be a whole number of \
             seconds from 1 to 604800"
        );
        assert_eq!(
            error("home_base = 42\n"),
            "home_base = 42 in /etc/module-updater/config.toml: must be an absolute path in quotes"
        );
        assert_eq!(
            error("system_manager_address = [\"a\"]\n"),
            "system_manager_address = [\"a\"] in /etc/module-updater/config.toml: must be a D-Bus \
             address in quotes, e.g. \"unix:path=/run/dbus/system_bus_socket\""
        );
    }

    #[test]
    fn path_and_address_errors() {
        assert_eq!(
            error("home_base = \"home\"\n"),
            "home_base = \"home\" in /etc/module-updater/config.toml: must be an absolute path \
             (starting with /)"
        );
        assert_eq!(
            error("rootful_base = \"\"\n"),
            "rootful_base = \"\" in /etc/module-updater/config.toml: must be an absolute path \
             (starting with /)"
        );
        assert_eq!(
            error("state_dir = \"var/lib/x\"\n"),
            "state_dir = \"var/lib/x\" in /etc/module-updater/config.toml: must be an absolute \
             path (starting with /)"
        );
        let message = error("system_manager_address = \"/run/dbus/system_bus_socket\"\n");
        assert!(
            message.starts_with(
                "system_manager_address = \"/run/dbus/system_bus_socket\" in \
                 /etc/module-updater/config.toml: must be a D-Bus address such as \
                 \"unix:path=/run/dbus/system_bus_socket\" ("
            ),
            "{message}"
        );
    }

    #[test]
    fn switches_are_true_or_false() {
        assert_eq!(
            error("keep_previous = \"yes\"\n"),
            "keep_previous = \"yes\" in /etc/module-updater/config.toml: must be true or false (without quotes)"
        );
        let file = parse_file(
            "keep_previous = false\nrollback_on_failure = true\n",
            Path::new("/etc/module-updater/config.toml"),
        )
        .unwrap();
        assert_eq!(file.keep_previous, Some(false));
        assert_eq!(file.rollback_on_failure, Some(true));
    }

    #[test]
    fn unknown_keys_and_sections_are_refused_with_the_list_of_keys() {
        let all = "the keys are home_base, rootful_base, max_parallel, script_timeout, worker_nice, \
                   job_linger, idle_timeout, state_dir, system_manager_address, ns8_agent_env, \
                   registry_connect_timeout, registry_timeout, health_timeout, keep_previous, \
                   rollback_on_failure, update_memory_max, update_tasks_max, pull_timeout";
        assert_eq!(
            error("home_base = \"/home\"\nmax_paralel = 2\n"),
            format!("unknown key max_paralel in /etc/module-updater/config.toml (line 2): {all}")
        );
        assert_eq!(
            error("[daemon]\nmax_parallel = 2\n"),
            format!("unknown key daemon in /etc/module-updater/config.toml (line 1): {all}")
        );
    }

    #[test]
    fn syntax_errors_say_the_file_is_not_toml() {
        let message = error("max_parallel = \n");
        assert!(
            message.starts_with("/etc/module-updater/config.toml is not a valid TOML file: "),
            "{message}"
        );
        let message = error("max_parallel = 1\nmax_parallel = 2\n");
        assert!(message.contains("not a valid TOML file"), "{message}");
        assert!(message.contains("duplicate key"), "{message}");
    }

    #[test]
    fn flags_are_checked_like_the_file() {
        let refused = |args: &[&str]| {
            let mut argv = vec!["module-updaterd"];
            argv.extend(args);
            Cli::try_parse_from(argv).unwrap_err().to_string()
        };
        let message = refused(&["--max-parallel", "0"]);
        assert!(
            message.contains("invalid value '0' for '--max-parallel <N>': must be at least 1"),
            "{message}"
        );
        let message = refused(&["--script-timeout", "soon"]);
        assert!(
            message.contains("must be a whole number of seconds from 1 to 604800"),
            "{message}"
        );
        let message = refused(&["--home-base", "home"]);
        assert!(
            message.contains("must be an absolute path (starting with /)"),
            "{message}"
        );
        let message = refused(&["--system-manager-address", "nonsense"]);
        assert!(message.contains("must be a D-Bus address"), "{message}");
        let message = refused(&["--frobnicate"]);
        assert!(message.contains("--frobnicate"), "{message}");
    }

    #[test]
    fn a_missing_default_file_is_fine_but_a_missing_explicit_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let err = load_file(Some(&missing)).unwrap_err();
        assert!(matches!(err, ConfigError::Read { explicit: true, .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read the configuration file {} (given with --config): No such file or \
                 directory (os error 2)",
                missing.display()
            )
        );
        let present = dir.path().join("config.toml");
        std::fs::write(&present, "job_linger = 5\n").unwrap();
        let (settings, path) = load_file(Some(&present)).unwrap();
        assert_eq!(settings.job_linger, Some(5));
        assert_eq!(path.as_deref(), Some(present.as_path()));
        let config = Config::load(cli(&["--config", present.to_str().unwrap()])).unwrap();
        assert_eq!(config.job_linger, 5);
    }

    /// The shipped default file: every key, commented out, with the built-in default. Removing
    /// the `# ` of every setting line gives exactly the built-in defaults.
    #[test]
    fn the_shipped_default_file_documents_every_key_with_its_default() {
        let text = std::fs::read_to_string(default_file()).unwrap();
        assert_eq!(
            parse_file(&text, Path::new(FILE)).unwrap(),
            Settings::default(),
            "every setting of the default file is commented out"
        );
        for key in KEYS {
            let line = match key.default {
                Some(default) => format!("# {} = {default}", key.name),
                None => format!("# {} = ", key.name),
            };
            assert!(
                text.lines().any(|l| l.starts_with(&line)),
                "{} lacks a line starting {line:?}",
                default_file().display()
            );
        }
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                KEYS.iter()
                    .any(|k| k.default.is_some() && l.starts_with(&format!("{} = ", k.name)))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let settings = parse_file(&uncommented, Path::new(FILE)).unwrap();
        assert_eq!(
            Config::resolve(cli(&[]), settings, None),
            Config::resolve(cli(&[]), Settings::default(), None)
        );
    }

    fn default_file() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/config.toml")
    }

    #[test]
    fn man_page_documents_flags_and_every_key() {
        let mut out = Vec::new();
        man_page(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(".TH module-updaterd 8"), "{text}");
        assert!(text.contains("\\-\\-max\\-parallel"), "{text}");
        assert!(text.contains("\\-\\-config"), "{text}");
        assert!(text.contains("\\fBGOMEMLIMIT\\fR"), "{text}");
        assert!(
            !text.contains("generate\\-man"),
            "hidden flag shown:\n{text}"
        );
        for key in KEYS {
            assert!(
                text.contains(&format!("\\fB{}\\fR (default: ", key.name)),
                "{} missing",
                key.name
            );
        }
    }
}
