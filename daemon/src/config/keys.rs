//! Every setting the configuration file may hold, described once: its name, the values it
//! accepts, its default and what it means.

use std::path::{Path, PathBuf};

/// The longest time any `*_timeout`/`job_linger` setting may have: seven days. A bound keeps
/// every later `now + duration` from overflowing, and nothing in an update takes longer.
pub const MAX_SECONDS: u64 = 7 * 24 * 3600;
/// The most instance updates `max_parallel` allows at once: each one is a worker process with
/// podman children, so more than this is a typo rather than a plan.
pub const MAX_PARALLEL: u64 = 1024;

/// What values a setting accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// An absolute path (the daemon and its workers run in `/`, so a relative one would be read
    /// relative to the root directory whatever the administrator meant).
    AbsolutePath,
    /// A D-Bus address such as `unix:path=/run/dbus/system_bus_socket`.
    Address,
    /// `true` or `false`.
    Boolean,
    /// A whole number from `min` to `max`; `unit` names what is counted ("seconds", "updates").
    Number {
        min: u64,
        max: u64,
        unit: &'static str,
    },
}

impl Rule {
    /// The accepted values, as a message says them after "must be".
    pub fn allowed(&self) -> String {
        match self {
            Rule::AbsolutePath => "an absolute path in quotes".to_owned(),
            Rule::Address => {
                "a D-Bus address in quotes, e.g. \"unix:path=/run/dbus/system_bus_socket\""
                    .to_owned()
            }
            Rule::Number { min, max, unit } => {
                format!("a whole number of {unit} from {min} to {max}")
            }
            Rule::Boolean => "true or false (without quotes)".to_owned(),
        }
    }

    /// Checks a number; the error says what is wrong after "must be".
    pub(super) fn check_number(&self, value: i64) -> Result<u64, String> {
        let Rule::Number { min, max, .. } = *self else {
            return Err(format!("must be {}", self.allowed()));
        };
        match u64::try_from(value) {
            Ok(n) if n < min => Err(format!("must be at least {min}")),
            Err(_) => Err(format!("must be at least {min}")),
            Ok(n) if n > max => Err(format!("must be at most {max}")),
            Ok(n) => Ok(n),
        }
    }

    /// Checks a path.
    pub(super) fn check_path(&self, value: &Path) -> Result<PathBuf, String> {
        if value.is_absolute() {
            Ok(value.to_path_buf())
        } else {
            Err("must be an absolute path (starting with /)".to_owned())
        }
    }

    /// Checks a D-Bus address.
    pub(super) fn check_address(&self, value: &str) -> Result<String, String> {
        match value.parse::<zbus::Address>() {
            Ok(_) => Ok(value.to_owned()),
            Err(err) => Err(format!(
                "must be a D-Bus address such as \"unix:path=/run/dbus/system_bus_socket\" ({err})"
            )),
        }
    }
}

/// One setting of the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The key in the file (the flag is the same with `-` for `_`).
    pub name: &'static str,
    pub rule: Rule,
    /// The built-in default as TOML, or `None` when unset means something of its own.
    pub default: Option<&'static str>,
    /// What unset means, when `default` is `None`.
    pub unset: &'static str,
    /// What the setting does.
    pub help: &'static str,
}

pub(super) const HOME_BASE: Key = Key {
    name: "home_base",
    rule: Rule::AbsolutePath,
    default: Some("\"/home\""),
    unset: "",
    help: "Where rootless instances' homes are: the home of instance <id> is <home_base>/<id>.",
};
pub(super) const ROOTFUL_BASE: Key = Key {
    name: "rootful_base",
    rule: Rule::AbsolutePath,
    default: Some("\"/var/lib/nethserver\""),
    unset: "",
    help: "Where rootful instances live: <rootful_base>/<id>, state in <rootful_base>/<id>/state.",
};
pub(super) const MAX_PARALLEL_KEY: Key = Key {
    name: "max_parallel",
    rule: Rule::Number {
        min: 1,
        max: MAX_PARALLEL,
        unit: "instance updates",
    },
    default: None,
    unset: "twice the number of CPUs",
    help: "Update at most this many instances at once, over all jobs.",
};
pub(super) const SCRIPT_TIMEOUT: Key = Key {
    name: "script_timeout",
    rule: Rule::Number {
        min: 1,
        max: MAX_SECONDS,
        unit: "seconds",
    },
    default: Some("1800"),
    unset: "",
    help: "Kill an update-module.d script that runs longer than this many seconds.",
};
pub(super) const JOB_LINGER: Key = Key {
    name: "job_linger",
    rule: Rule::Number {
        min: 0,
        max: MAX_SECONDS,
        unit: "seconds",
    },
    default: Some("300"),
    unset: "",
    help: "Keep a finished job on the bus this many seconds, so that late clients can read its result.",
};
pub(super) const IDLE_TIMEOUT: Key = Key {
    name: "idle_timeout",
    rule: Rule::Number {
        min: 1,
        max: MAX_SECONDS,
        unit: "seconds",
    },
    default: None,
    unset: "never exit",
    help: "Exit after this many seconds with no job running and no bus traffic; D-Bus activation starts the daemon again on the next call.",
};
pub(super) const WORKER_NICE: Key = Key {
    name: "worker_nice",
    rule: Rule::Number {
        min: 0,
        max: 19,
        unit: "nice levels",
    },
    default: Some("10"),
    unset: "",
    help: "Run the update workers, and the podman commands and scripts they start, at this niceness, so that an update yields the CPU to the node's services and to the daemon's own answers; 0 runs them at the daemon's priority.",
};
pub(super) const STATE_DIR: Key = Key {
    name: "state_dir",
    rule: Rule::AbsolutePath,
    default: Some("\"/var/lib/module-updater\""),
    unset: "",
    help: "Where job records and the job counter are kept (not below /usr, /boot or /efi, which the unit mounts read-only).",
};
pub(super) const SYSTEM_MANAGER_ADDRESS: Key = Key {
    name: "system_manager_address",
    rule: Rule::Address,
    default: None,
    unset: "the system bus",
    help: "The D-Bus address where the systemd manager of rootful instances answers; each instance update also runs in a transient scope of this manager.",
};
pub(super) const NS8_AGENT_ENV: Key = Key {
    name: "ns8_agent_env",
    rule: Rule::AbsolutePath,
    default: Some("\"/etc/nethserver/agent.env\""),
    unset: "",
    help: "NS8's agent settings (REDIS_ADDRESS): after each update the daemon refreshes the instance's environment hash in the cluster's Redis there; a node without this file is not an NS8 node and nothing is sent.",
};
pub(super) const REGISTRY_CONNECT_TIMEOUT: Key = Key {
    name: "registry_connect_timeout",
    rule: Rule::Number {
        min: 1,
        max: 600,
        unit: "seconds",
    },
    default: Some("5"),
    unset: "",
    help: "When checking for updates (ListUpdates), give up on a registry that does not accept a connection within this many seconds.",
};
pub(super) const REGISTRY_TIMEOUT: Key = Key {
    name: "registry_timeout",
    rule: Rule::Number {
        min: 1,
        max: 3600,
        unit: "seconds",
    },
    default: Some("30"),
    unset: "",
    help: "When checking for updates (ListUpdates), give up on a registry query that has no answer within this many seconds.",
};
pub(super) const HEALTH_TIMEOUT: Key = Key {
    name: "health_timeout",
    rule: Rule::Number {
        min: 1,
        max: 3600,
        unit: "seconds",
    },
    default: Some("120"),
    unset: "",
    help: "After an update's scripts, wait at most this many seconds for the instance to pass the health gate (its units active, no container on a replaced image, its health.d checks passing); a request's health_timeout overrides it.",
};
pub(super) const KEEP_PREVIOUS: Key = Key {
    name: "keep_previous",
    rule: Rule::Boolean,
    default: Some("true"),
    unset: "",
    help: "Keep each instance's previous version (the files and environment an update replaced, and its images) until the next update, for a rollback; false drops what is kept at each update, and the stale-image cleanup removes the previous images as NS8 does.",
};
pub(super) const ROLLBACK_ON_FAILURE: Key = Key {
    name: "rollback_on_failure",
    rule: Rule::Boolean,
    default: Some("false"),
    unset: "",
    help: "Roll an instance back to its kept previous version when its update fails at a module step or the health gate; a request's rollback_on_failure overrides it.",
};

// module-updater scopes (issue 19): limits of each update's systemd scope.
pub(super) const UPDATE_MEMORY_MAX: Key = Key {
    name: "update_memory_max",
    rule: Rule::Number {
        min: 1048576,
        max: 1 << 50,
        unit: "bytes",
    },
    default: None,
    unset: "no limit",
    help: "MemoryMax= of each instance update's systemd scope: the update (podman, scripts and their children) is killed by the kernel when it uses more memory than this.",
};
pub(super) const UPDATE_TASKS_MAX: Key = Key {
    name: "update_tasks_max",
    rule: Rule::Number {
        min: 16,
        max: 1048576,
        unit: "processes and threads",
    },
    default: None,
    unset: "systemd's default",
    help: "TasksMax= of each instance update's systemd scope: at most this many processes and threads at once.",
};

pub(super) const PULL_TIMEOUT: Key = Key {
    name: "pull_timeout",
    rule: Rule::Number {
        min: 1,
        max: MAX_SECONDS,
        unit: "seconds",
    },
    default: Some("1800"),
    unset: "",
    help: "Stop a download of images (a pull, the node's shared download) that takes longer than this many seconds.",
};

/// Every key the configuration file may hold, in the order the default file lists them.
pub const KEYS: &[Key] = &[
    HOME_BASE,
    ROOTFUL_BASE,
    MAX_PARALLEL_KEY,
    SCRIPT_TIMEOUT,
    WORKER_NICE,
    JOB_LINGER,
    IDLE_TIMEOUT,
    STATE_DIR,
    SYSTEM_MANAGER_ADDRESS,
    NS8_AGENT_ENV,
    REGISTRY_CONNECT_TIMEOUT,
    REGISTRY_TIMEOUT,
    HEALTH_TIMEOUT,
    KEEP_PREVIOUS,
    ROLLBACK_ON_FAILURE,
    UPDATE_MEMORY_MAX,
    UPDATE_TASKS_MAX,
    PULL_TIMEOUT,
];
