//! Command-line configuration of the daemon.

use std::path::PathBuf;

use clap::{Args, Parser};

/// Which bus the daemon serves on.
#[derive(Debug, Clone, Args)]
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
#[command(name = "module-updaterd", version, about)]
pub struct Config {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Where rootless instances' homes are (a user's home is <DIR>/<id>).
    #[arg(long, value_name = "DIR", default_value = "/home")]
    pub home_base: PathBuf,
    /// Where rootful instances live (<DIR>/<id>, state in <DIR>/<id>/state).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/nethserver")]
    pub rootful_base: PathBuf,
    /// The D-Bus address where the systemd manager of rootful instances answers (default: the system bus).
    #[arg(long, value_name = "ADDR")]
    pub system_manager_address: Option<String>,
    /// Kill an update-module.d script after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub script_timeout: u64,
    /// Update at most this many instances at once, over all jobs (default: 2 × CPUs).
    #[arg(long, value_name = "N")]
    pub max_parallel: Option<usize>,
    /// Keep a finished job on the bus this many seconds so late clients can read it.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub job_linger: u64,
    /// Where job records and the job counter are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/module-updater")]
    pub state_dir: PathBuf,
    /// Exit after this many seconds with no job running and no bus traffic (for bus activation).
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
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
}

impl Config {
    /// How many instance updates may run at once.
    pub fn parallelism(&self) -> usize {
        self.max_parallel
            .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}
