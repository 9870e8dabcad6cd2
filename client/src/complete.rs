//! Shell completion with candidates from the service, as systemctl completes unit names.
//!
//! The installed completion scripts are clap_complete's `CompleteEnv` registrations: on Tab the
//! shell runs `COMPLETE=<shell> module-updater -- <words>`, and this binary answers with the
//! subcommands and flags of [`crate::cli::Cli`] plus, for an INSTANCE or JOB argument, the ids the
//! service lists (on the bus the words name with --system/--user/--address). When the service
//! cannot be reached within [`SERVICE_WAIT`] there are simply no such candidates: no error, no
//! delay worth noticing. `-H` (ssh) is never contacted while completing.

use std::ffi::OsString;
use std::time::Duration;

use clap::CommandFactory;
use clap_complete::{ArgValueCandidates, CompleteEnv, CompletionCandidate};
use module_updater_dbus::{JobProxy, ModuleUpdaterProxy};
use zbus::proxy::CacheProperties;

use crate::cli::{BIN_NAME, BusArgs, COMPLETE_VAR, Cli, JobRef};

/// How long completion waits for the service in all.
pub const SERVICE_WAIT: Duration = Duration::from_millis(1500);

/// Answers a completion request (`COMPLETE=<shell>` in the environment) and exits; returns at
/// once on an ordinary run.
pub fn answer_completion_request() {
    CompleteEnv::with_factory(|| with_candidates(Cli::command()))
        .var(COMPLETE_VAR)
        .bin(BIN_NAME)
        .completer(BIN_NAME)
        .complete();
}

/// The command line with the service's candidates on every INSTANCE and JOB argument, in every
/// subcommand: completion's concern, so the command line's definition does not know of it.
fn with_candidates(mut command: clap::Command) -> clap::Command {
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for name in subcommands {
        command = command.mut_subcommand(name, with_candidates);
    }
    let args: Vec<(String, bool)> = command
        .get_arguments()
        .filter_map(|arg| {
            let names = arg.get_value_names()?;
            let id = arg.get_id().as_str().to_owned();
            if names.iter().any(|n| n == "INSTANCE") {
                Some((id, true))
            } else if names.iter().any(|n| n == "JOB") {
                Some((id, false))
            } else {
                None
            }
        })
        .collect();
    for (id, instance) in args {
        command = command.mut_arg(id, |arg| {
            arg.add(if instance {
                ArgValueCandidates::new(instance_candidates)
            } else {
                ArgValueCandidates::new(job_candidates)
            })
        });
    }
    command
}

/// The bus flags among the words being completed (`module-updater --user wait <Tab>`); `None`
/// for `-H`, whose ssh may prompt.
pub fn bus_of_words(words: &[OsString]) -> Option<BusArgs> {
    let mut args = BusArgs::default();
    let mut words = words.iter().filter_map(|w| w.to_str());
    while let Some(word) = words.next() {
        match word {
            "--system" => args.system = true,
            "--user" => args.user = true,
            "--address" => args.address = words.next().map(str::to_owned),
            "-H" | "--host" => return None,
            _ if word.starts_with("--address=") => {
                args.address = Some(word["--address=".len()..].to_owned());
            }
            _ if word.starts_with("--host=") || word.starts_with("-H") => return None,
            _ => {}
        }
    }
    Some(args)
}

/// Runs `query` against the service on the bus of this process's command line, within
/// [`SERVICE_WAIT`]; no candidates on any failure.
fn from_service<F, Fut>(query: F) -> Vec<CompletionCandidate>
where
    F: FnOnce(zbus::Connection) -> Fut,
    Fut: std::future::Future<Output = zbus::Result<Vec<CompletionCandidate>>>,
{
    let words: Vec<OsString> = std::env::args_os().collect();
    let Some(bus_args) = bus_of_words(&words) else {
        return Vec::new();
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    runtime.block_on(async {
        let work = async {
            // Never a password prompt on Tab.
            let bus = crate::bus::connect(&bus_args, SERVICE_WAIT, false)
                .await
                .ok()?;
            query(bus.connection).await.ok()
        };
        tokio::time::timeout(SERVICE_WAIT, work)
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    })
}

/// The instance ids, each with its image and state as help.
pub fn instance_candidates() -> Vec<CompletionCandidate> {
    from_service(|connection| async move {
        let manager = ModuleUpdaterProxy::new(&connection).await?;
        let instances = manager.list_instances().await?;
        Ok(instances
            .into_iter()
            .map(|(id, image, state, _job)| {
                CompletionCandidate::new(id).help(Some(format!("{image} ({state})").into()))
            })
            .collect())
    })
}

/// The job numbers, each with its status and instances as help.
pub fn job_candidates() -> Vec<CompletionCandidate> {
    from_service(|connection| async move {
        let manager = ModuleUpdaterProxy::new(&connection).await?;
        let mut candidates = Vec::new();
        for path in manager.list_jobs().await? {
            let Some(job) = JobRef::from_path(path.as_str()) else {
                continue;
            };
            let proxy = JobProxy::builder(&connection)
                .path(job.path())
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            // A job pruned meanwhile is still a fine candidate, without help.
            let help = match (proxy.status().await, proxy.instances().await) {
                (Ok(status), Ok(instances)) => Some(format!("{status}: {}", instances.join(" "))),
                _ => None,
            };
            candidates.push(CompletionCandidate::new(job.to_string()).help(help.map(Into::into)));
        }
        Ok(candidates)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<OsString> {
        text.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn the_bus_of_the_words() {
        let args = bus_of_words(&words("module-updater -- module-updater --user wait")).unwrap();
        assert!(args.user);
        let args = bus_of_words(&words("module-updater --address unix:path=/x/bus show")).unwrap();
        assert_eq!(args.address.as_deref(), Some("unix:path=/x/bus"));
        let args = bus_of_words(&words("module-updater --address=unix:path=/y show")).unwrap();
        assert_eq!(args.address.as_deref(), Some("unix:path=/y"));
        assert!(bus_of_words(&words("module-updater -H root@node1 wait")).is_none());
        assert!(bus_of_words(&words("module-updater -Hroot@node1 wait")).is_none());
        let args = bus_of_words(&words("module-updater wait")).unwrap();
        assert!(!args.user && args.address.is_none());
    }
}
