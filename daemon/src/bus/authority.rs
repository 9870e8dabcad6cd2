//! Who may call what.
//!
//! The bus policy lets anyone reach `UpdateModule` and `Cancel`; this module
//! decides. The caller's uid and pid come from the bus ([`super::caller`]), never from the message
//! body. uid 0 is always allowed. Anyone else is asked about to polkit
//! (`org.freedesktop.PolicyKit1.Authority.CheckAuthorization`, subject `system-bus-name`) with the
//! request's details, so a rule can decide per module URL, instance or job. The check is an
//! ordinary async call: other callers are served while polkit answers (or while an
//! authentication agent asks a password). No polkit on the bus, an error from polkit, or no
//! answer in time all mean "no": the daemon fails closed. Every decision is logged with the
//! journal fields `MODULE_UPDATER_CALLER_UID`, `MODULE_UPDATER_CALLER_PID` and
//! `MODULE_UPDATER_ACTION`.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use zbus::message::Header;
use zbus::proxy::CacheProperties;
use zbus::{Connection, DBusError, Variant};

use super::{CallError, Caller};

/// `CheckAuthorization` flag `AllowUserInteraction`: polkit may ask the caller's authentication
/// agent (e.g. for an administrator's password) before answering.
const ALLOW_USER_INTERACTION: u32 = 1;

/// An authorisation that takes longer than this (someone left a password prompt open) is refused.
pub const POLKIT_TIMEOUT: Duration = Duration::from_secs(120);

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
}

impl Action {
    /// The polkit action id.
    pub fn id(self) -> &'static str {
        match self {
            Action::UpdateModule => module_updater_dbus::ACTION_UPDATE_MODULE,
            Action::Cancel => module_updater_dbus::ACTION_CANCEL,
        }
    }

    /// What the action does, for messages.
    fn what(self) -> &'static str {
        match self {
            Action::UpdateModule => "update module instances",
            Action::Cancel => "cancel a job someone else started",
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
        Err(reason) => {
            denied(caller, action, &reason);
            Err(CallError::Refused(zbus::fdo::Error::AccessDenied(format!(
                "uid {} may not {} ({}): {reason}",
                caller.uid,
                action.what(),
                action.id()
            ))))
        }
    }
}

/// `Ok` when polkit says yes; otherwise why not, for the caller and the log.
async fn ask_polkit(
    connection: &Connection,
    header: &Header<'_>,
    action: Action,
    details: &[(&str, &str)],
) -> Result<(), String> {
    let sender = header
        .sender()
        .ok_or_else(|| "the call has no sender, so polkit cannot identify the caller".to_owned())?;
    let subject: Subject<'_> = (
        "system-bus-name",
        HashMap::from([("name", Variant::from(sender.as_str()))]),
    );
    let details: HashMap<&str, &str> = details.iter().copied().collect();
    let authority = AuthorityProxy::builder(connection)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(|e| format!("cannot reach polkit: {e}"))?;
    let call =
        authority.check_authorization(&subject, action.id(), &details, ALLOW_USER_INTERACTION, "");
    let answer = tokio::time::timeout(POLKIT_TIMEOUT, call)
        .await
        .map_err(|_| {
            format!(
                "polkit did not answer within {} s",
                POLKIT_TIMEOUT.as_secs()
            )
        })?;
    match answer {
        Ok((true, _, _)) => Ok(()),
        Ok((false, true, _)) => Err(
            "polkit requires an administrator's authentication, and none was given; call as root, or grant the action with a polkit rule (see docs/security.md)".into(),
        ),
        Ok((false, false, _)) => Err("polkit refused the action".into()),
        Err(err) if polkit_absent(&err) => Err(
            "polkit (org.freedesktop.PolicyKit1) is not running on this bus, so only root is allowed; start polkitd or call as root".into(),
        ),
        Err(err) => Err(format!("cannot ask polkit: {err}")),
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
        for action in [Action::UpdateModule, Action::Cancel] {
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
    fn absent_polkit_is_recognised_by_error_name() {
        let unknown = zbus::Error::FDO(Box::new(zbus::fdo::Error::ServiceUnknown(
            "The name is not activatable".into(),
        )));
        assert!(polkit_absent(&unknown));
        let other = zbus::Error::FDO(Box::new(zbus::fdo::Error::Failed("x".into())));
        assert!(!polkit_absent(&other));
    }
}
