//! Who may call what.
//!
//! The bus policy lets anyone reach `UpdateModule` and `Cancel`; this module
//! decides. The caller's uid and pid come from the bus ([`super::caller`]), never from the message
//! body. uid 0 is always allowed. Anyone else is asked about to polkit
//! (`org.freedesktop.PolicyKit1.Authority.CheckAuthorization`, subject `system-bus-name`) with the
//! request's details, so a rule can decide per module URL, instance or job. polkit may ask the
//! caller's authentication agent for a password only when the caller set the message flag
//! `ALLOW_INTERACTIVE_AUTHORIZATION`. The check is an ordinary async call: other callers are
//! served while polkit answers (or while an agent asks a password); a caller that leaves the bus
//! meanwhile is refused and polkit told to stop asking. No polkit on the bus, an error from
//! polkit, or no answer in time all mean "no": the daemon fails closed. Every decision is
//! logged with the journal fields `MODULE_UPDATER_CALLER_UID`, `MODULE_UPDATER_CALLER_PID`
//! and `MODULE_UPDATER_ACTION`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use futures_util::StreamExt;
use zbus::message::{Flags, Header};
use zbus::names::UniqueName;
use zbus::proxy::CacheProperties;
use zbus::{Connection, DBusError, Variant};

use super::{CallError, Caller};

/// `CheckAuthorization` flag `AllowUserInteraction`: polkit may ask the caller's authentication
/// agent (e.g. for an administrator's password) before answering.
const ALLOW_USER_INTERACTION: u32 = 1;

/// An authorisation that takes longer than this (someone left a password prompt open) is
/// refused, and polkit is told to drop the check (which closes the prompt).
pub use module_updater_dbus::POLKIT_TIMEOUT;

/// How many authorisation checks one uid may have pending at once. More are refused at once with
/// `org.freedesktop.DBus.Error.LimitsExceeded`, so that a flood of calls from one user cannot pile
/// up work in the daemon or in polkitd.
pub const MAX_PENDING_PER_UID: usize = 16;

/// The actions of `dbus/data/org.nethserver.moduleupdater.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `UpdateModule`; details `module_url` and `instances`.
    UpdateModule,
    /// `Cancel` of a job someone else started; details `job` and `instances`.
    Cancel,
    /// `Rollback` and `PruneKept`; detail `instance`.
    Rollback,
}

impl Action {
    /// The polkit action id.
    pub fn id(self) -> &'static str {
        match self {
            Action::UpdateModule => module_updater_dbus::ACTION_UPDATE_MODULE,
            Action::Cancel => module_updater_dbus::ACTION_CANCEL,
            Action::Rollback => module_updater_dbus::ACTION_ROLLBACK,
        }
    }

    /// What the action does, for messages.
    fn what(self) -> &'static str {
        match self {
            Action::UpdateModule => "update module instances",
            Action::Cancel => "cancel a job someone else started",
            Action::Rollback => "roll back a module instance or drop its previous version",
        }
    }
}

/// Whether the caller lets polkit interact: the message header flag
/// `ALLOW_INTERACTIVE_AUTHORIZATION` (0x4). busctl sets it with
/// `--allow-interactive-authorization=yes`, `gdbus call` with `--interactive`, module-updater on
/// a terminal.
pub fn interactive(header: &Header<'_>) -> bool {
    header
        .primary()
        .flags()
        .contains(Flags::ALLOW_INTERACTIVE_AUTH)
}

/// Why a non-root caller was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// The message has no sender (a peer-to-peer connection), so polkit has no subject.
    NoSender,
    /// Nobody owns polkit's name and it cannot be activated.
    PolkitAbsent,
    /// polkit answered with an error, or could not be asked.
    PolkitError(String),
    /// No answer within [`POLKIT_TIMEOUT`].
    TimedOut,
    /// An administrator's authentication is needed, and the caller did not allow interaction.
    NotInteractive,
    /// An administrator's authentication is needed, the caller allowed interaction, but no
    /// authentication agent is registered for its process or session.
    NoAgent,
    /// The agent's prompt was dismissed.
    Dismissed,
    /// The caller left the bus while polkit was asking (e.g. it gave up waiting, or was killed):
    /// nobody would learn that a job started.
    CallerLeft,
    /// polkit says no: its rules, or an authentication that failed.
    No { interactive: bool },
}

impl Refusal {
    /// Why, for the caller and the log.
    fn reason(&self) -> String {
        match self {
            Refusal::NoSender => {
                "the call has no sender, so polkit cannot identify the caller".to_owned()
            }
            Refusal::PolkitAbsent => {
                "polkit (org.freedesktop.PolicyKit1) is not running on this bus, so only root is allowed".to_owned()
            }
            Refusal::PolkitError(err) => format!("cannot ask polkit: {err}"),
            Refusal::TimedOut => format!(
                "polkit did not answer within {} s (was a password prompt left unanswered?)",
                POLKIT_TIMEOUT.as_secs()
            ),
            Refusal::NotInteractive => {
                "polkit requires an administrator's authentication, and the call did not allow interactive authorization (the D-Bus message flag ALLOW_INTERACTIVE_AUTHORIZATION, which module-updater sets on a terminal, busctl with --allow-interactive-authorization=yes, gdbus call with --interactive)".to_owned()
            }
            Refusal::NoAgent => {
                "polkit requires an administrator's authentication, and no authentication agent could ask for it: none is registered for the caller's process or session (module-updater on a terminal starts pkttyagent; other clients need an agent running, e.g. `pkttyagent --process PID`)".to_owned()
            }
            Refusal::Dismissed => "the authentication prompt was dismissed".to_owned(),
            Refusal::CallerLeft => {
                "the caller left the bus while polkit was asking for authentication, so the check was cancelled".to_owned()
            }
            Refusal::No { interactive: true } => {
                "polkit refused the action (the authentication failed, or its rules say no)"
                    .to_owned()
            }
            Refusal::No { interactive: false } => "polkit refused the action".to_owned(),
        }
    }

    /// What the caller can do about it.
    fn hint(&self, action: Action) -> String {
        match self {
            Refusal::PolkitAbsent => "start polkitd, or call as root".to_owned(),
            _ => format!(
                "to allow it, grant the polkit action {} to this user with a rule in /etc/polkit-1/rules.d/ (see polkit(8)), or call as root",
                action.id()
            ),
        }
    }
}

/// `(sa{sv})`: polkit's subject, here `("system-bus-name", {"name": <unique name>})`.
type Subject<'a> = (&'a str, HashMap<&'a str, Variant<'a>>);

#[zbus::proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority"
)]
trait Authority {
    /// `(is_authorized, is_challenge, details)`.
    fn check_authorization(
        &self,
        subject: &Subject<'_>,
        action_id: &str,
        details: &HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;

    /// Drops a pending check (and closes its agent's prompt).
    fn cancel_check_authorization(&self, cancellation_id: &str) -> zbus::Result<()>;
}

/// Lets the call through, or refuses it with `org.freedesktop.DBus.Error.AccessDenied` (or
/// `LimitsExceeded` when the caller has too many checks pending). `owner` is the uid that owns
/// the object acted on (a job's `CallerUid`): its owner needs no polkit.
pub async fn authorize(
    connection: &Connection,
    header: &Header<'_>,
    caller: Caller,
    action: Action,
    details: &[(&str, &str)],
    owner: Option<u32>,
) -> Result<(), CallError> {
    if caller.uid == 0 {
        allowed(caller, action, "root");
        return Ok(());
    }
    if owner == Some(caller.uid) {
        allowed(caller, action, "its own job");
        return Ok(());
    }
    let Some(_pending) = Pending::enter(caller.uid) else {
        let reason = format!(
            "uid {} already has {MAX_PENDING_PER_UID} authorisation checks pending; retry when they are answered",
            caller.uid
        );
        denied(caller, action, &reason);
        return Err(CallError::Refused(zbus::fdo::Error::LimitsExceeded(reason)));
    };
    match ask_polkit(connection, header, action, details).await {
        Ok(()) => {
            allowed(caller, action, "polkit");
            Ok(())
        }
        Err(refusal) => {
            let reason = refusal.reason();
            denied(caller, action, &reason);
            Err(CallError::Refused(zbus::fdo::Error::AccessDenied(format!(
                "uid {} may not {} ({}): {reason}; {}",
                caller.uid,
                action.what(),
                action.id(),
                refusal.hint(action)
            ))))
        }
    }
}

/// A cancellation id for `CheckAuthorization`, unique among this daemon's checks.
fn cancellation_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "module-updaterd-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `Ok` when polkit says yes; otherwise why not.
async fn ask_polkit(
    connection: &Connection,
    header: &Header<'_>,
    action: Action,
    details: &[(&str, &str)],
) -> Result<(), Refusal> {
    let sender = header.sender().ok_or(Refusal::NoSender)?;
    let subject: Subject<'_> = (
        "system-bus-name",
        HashMap::from([("name", Variant::from(sender.as_str()))]),
    );
    let details: HashMap<&str, &str> = details.iter().copied().collect();
    let authority = AuthorityProxy::builder(connection)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(|e| Refusal::PolkitError(format!("cannot reach polkit: {e}")))?;
    let interactive = interactive(header);
    let flags = if interactive {
        ALLOW_USER_INTERACTION
    } else {
        0
    };
    let cancellation = cancellation_id();
    let call = authority.check_authorization(&subject, action.id(), &details, flags, &cancellation);
    // An interactive check may take minutes; if the caller goes meanwhile, stop asking.
    let caller_left = async {
        if interactive {
            left_the_bus(connection, sender).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let answer = tokio::select! {
        answer = tokio::time::timeout(POLKIT_TIMEOUT, call) => answer.map_err(|_| Refusal::TimedOut),
        () = caller_left => Err(Refusal::CallerLeft),
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(refusal) => {
            // polkit keeps a check (and its agent's prompt) until told otherwise.
            if let Err(err) = authority.cancel_check_authorization(&cancellation).await {
                log::debug!("cannot cancel polkit check {cancellation}: {err}");
            }
            return Err(refusal);
        }
    };
    match answer {
        Ok((true, _, _)) => Ok(()),
        // A challenge left over means nobody was asked: with interaction allowed, polkit
        // found no agent; an agent that was asked ends in `(false, false)`.
        Ok((false, true, _)) if interactive => Err(Refusal::NoAgent),
        Ok((false, true, _)) => Err(Refusal::NotInteractive),
        Ok((false, false, details))
            if details
                .get("polkit.dismissed")
                .is_some_and(|v| v == "true" || v == "1") =>
        {
            Err(Refusal::Dismissed)
        }
        Ok((false, false, _)) => Err(Refusal::No { interactive }),
        Err(err) if polkit_absent(&err) => Err(Refusal::PolkitAbsent),
        Err(err) => Err(Refusal::PolkitError(err.to_string())),
    }
}

/// Returns once `name` (a unique name) has left the bus, at once if it already has; never when
/// the bus cannot be asked (the check then ends by polkit's answer or the timeout).
async fn left_the_bus(connection: &Connection, name: &UniqueName<'_>) {
    let watched = async {
        let dbus = zbus::fdo::DBusProxy::builder(connection)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .ok()?;
        // Subscribed before asking whether it is still there: a departure in between is seen.
        let mut changes = dbus
            .receive_name_owner_changed_with_args(&[(0, name.as_str())])
            .await
            .ok()?;
        if !dbus.name_has_owner(name.clone().into()).await.ok()? {
            return Some(());
        }
        while let Some(change) = changes.next().await {
            if change.args().is_ok_and(|args| args.new_owner().is_none()) {
                return Some(());
            }
        }
        None
    };
    if watched.await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// Whether a call failed because nobody owns polkit's name (and it cannot be activated).
fn polkit_absent(err: &zbus::Error) -> bool {
    let name = match err {
        zbus::Error::MethodError(name, _, _) => name.as_str().to_owned(),
        zbus::Error::FDO(e) => e.name().as_str().to_owned(),
        _ => return false,
    };
    matches!(
        name.as_str(),
        "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner"
    )
}

fn allowed(caller: Caller, action: Action, by: &str) {
    let pid = pid_text(caller);
    log::info!(
        MODULE_UPDATER_CALLER_UID = caller.uid, MODULE_UPDATER_CALLER_PID = pid.as_str(), MODULE_UPDATER_ACTION = action.id();
        "allowed {} for uid {} (pid {pid}): {by}",
        action.id(),
        caller.uid
    );
}

fn denied(caller: Caller, action: Action, reason: &str) {
    let pid = pid_text(caller);
    log::warn!(
        MODULE_UPDATER_CALLER_UID = caller.uid, MODULE_UPDATER_CALLER_PID = pid.as_str(), MODULE_UPDATER_ACTION = action.id();
        "refused {} for uid {} (pid {pid}): {reason}",
        action.id(),
        caller.uid
    );
}

fn pid_text(caller: Caller) -> String {
    caller
        .pid
        .map_or_else(|| "unknown".to_owned(), |pid| pid.to_string())
}

/// Checks pending per uid.
static PENDING: LazyLock<Mutex<HashMap<u32, usize>>> = LazyLock::new(Mutex::default);

/// One pending check of a uid; leaving it (also by a cancelled call) frees the slot.
struct Pending {
    uid: u32,
}

impl Pending {
    fn enter(uid: u32) -> Option<Pending> {
        let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
        let count = pending.entry(uid).or_insert(0);
        if *count >= MAX_PENDING_PER_UID {
            return None;
        }
        *count += 1;
        Some(Pending { uid })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = pending.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                pending.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn action_ids_are_the_shipped_ones() {
        let policy = std::fs::read_to_string(
            module_updater_dbus::data_dir().join(module_updater_dbus::POLKIT_ACTIONS_FILE),
        )
        .unwrap();
        for action in [Action::UpdateModule, Action::Cancel, Action::Rollback] {
            assert!(
                policy.contains(&format!("<action id=\"{}\">", action.id())),
                "{} is not in the shipped policy",
                action.id()
            );
        }
    }

    #[test]
    fn pending_checks_are_limited_per_uid_and_freed() {
        // A uid no other test uses.
        let uid = 4_000_000_001;
        let held: Vec<Pending> = (0..MAX_PENDING_PER_UID)
            .map(|_| Pending::enter(uid).unwrap())
            .collect();
        assert!(Pending::enter(uid).is_none(), "one more than the limit");
        assert!(
            Pending::enter(uid + 1).is_some(),
            "other uids are not affected"
        );
        drop(held);
        assert!(Pending::enter(uid).is_some(), "slots are freed");
        assert!(!PENDING.lock().unwrap().contains_key(&uid));
    }

    #[test]
    fn interaction_follows_the_message_flag() {
        let call = || zbus::Message::method_call("/org/nethserver/ModuleUpdater", "UpdateModule");
        let plain = call().build(&("{}",)).unwrap();
        assert!(!interactive(&plain.header()));
        let asking = call()
            .with_flags(Flags::ALLOW_INTERACTIVE_AUTH)
            .build(&("{}",))
            .unwrap();
        assert!(interactive(&asking.header()));
        let other = call().with_flags(Flags::NO_AUTO_START).build(&()).unwrap();
        assert!(!interactive(&other.header()));
    }

    #[test]
    fn refusals_say_why_and_what_to_grant() {
        let action = Action::UpdateModule;
        for refusal in [
            Refusal::NotInteractive,
            Refusal::NoAgent,
            Refusal::Dismissed,
            Refusal::CallerLeft,
            Refusal::TimedOut,
            Refusal::No { interactive: true },
        ] {
            let hint = refusal.hint(action);
            assert!(
                hint.contains("org.nethserver.moduleupdater.update-module")
                    && hint.contains("rule")
                    && hint.contains("root"),
                "{refusal:?}: {hint}"
            );
        }
        assert!(
            Refusal::NotInteractive
                .reason()
                .contains("interactive authorization")
        );
        assert!(
            Refusal::NoAgent
                .reason()
                .contains("no authentication agent")
        );
        assert!(Refusal::PolkitAbsent.hint(action).contains("start polkitd"));
        assert!(Refusal::TimedOut.reason().contains("120 s"));
    }

    #[test]
    fn cancellation_ids_are_unique() {
        assert_ne!(cancellation_id(), cancellation_id());
    }

    #[test]
    fn absent_polkit_is_recognised_by_error_name() {
        let unknown = zbus::Error::FDO(Box::new(zbus::fdo::Error::ServiceUnknown(
            "The name is not activatable".into(),
        )));
        assert!(polkit_absent(&unknown));
        let other = zbus::Error::FDO(Box::new(zbus::fdo::Error::Failed("x".into())));
        assert!(!polkit_absent(&other));
    }
}
