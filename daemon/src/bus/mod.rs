//! The D-Bus layer: the manager, job and instance interfaces (under an ObjectManager) and a pump
//! that turns job events into signals. It only translates; the job manager and the engine decide
//! everything.

pub mod authority;
pub mod instance;
pub mod job;
pub mod manager;
pub mod pump;

use module_updater_dbus::Error;
use zbus::DBusError;

use crate::jobs::{JobError, SubmitError};

/// What a method answers on failure: one of the service's own errors
/// (`org.nethserver.ModuleUpdater.Error.*`), or a refusal with a standard name
/// (`org.freedesktop.DBus.Error.AccessDenied`, `org.freedesktop.DBus.Error.LimitsExceeded`) that
/// every D-Bus client understands. The service's enum cannot carry the standard names: its
/// `ZBus` variant is always sent as `org.freedesktop.zbus.Error`.
#[derive(Debug)]
pub enum CallError {
    Service(Error),
    Refused(zbus::fdo::Error),
}

impl DBusError for CallError {
    fn create_reply(
        &self,
        call: &zbus::message::Header<'_>,
    ) -> zbus::Result<zbus::message::Message> {
        match self {
            CallError::Service(e) => e.create_reply(call),
            CallError::Refused(e) => e.create_reply(call),
        }
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        match self {
            CallError::Service(e) => e.name(),
            CallError::Refused(e) => e.name(),
        }
    }

    fn description(&self) -> Option<&str> {
        match self {
            CallError::Service(e) => e.description(),
            CallError::Refused(e) => e.description(),
        }
    }
}

impl From<Error> for CallError {
    fn from(err: Error) -> Self {
        CallError::Service(err)
    }
}

impl From<SubmitError> for CallError {
    fn from(err: SubmitError) -> Self {
        match err {
            // A limit of the daemon: the standard name every D-Bus client knows.
            SubmitError::TooManyRunning(_) | SubmitError::TooManyKnown(_) => {
                CallError::Refused(zbus::fdo::Error::LimitsExceeded(err.to_string()))
            }
            other => CallError::Service(other.into()),
        }
    }
}

impl From<JobError> for CallError {
    fn from(err: JobError) -> Self {
        CallError::Service(err.into())
    }
}

/// Caller credentials from the bus (never from the message body).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<u32>,
}

/// Asks the bus who sent `header`'s message.
pub async fn caller(
    connection: &zbus::Connection,
    header: &zbus::message::Header<'_>,
) -> Result<Caller, Error> {
    let sender = header.sender().ok_or_else(|| {
        Error::Failed("the call has no sender; cannot identify the caller".into())
    })?;
    let dbus = zbus::fdo::DBusProxy::new(connection).await.map_err(|e| {
        Error::Failed(format!(
            "cannot ask the bus for the caller's credentials: {e}"
        ))
    })?;
    let credentials = dbus
        .get_connection_credentials(sender.clone().into())
        .await
        .map_err(|e| Error::Failed(format!("cannot read the credentials of {sender}: {e}")))?;
    let uid = credentials
        .unix_user_id()
        .ok_or_else(|| Error::Failed(format!("the bus gave no uid for {sender}")))?;
    Ok(Caller {
        uid,
        pid: credentials.process_id(),
    })
}

/// The one place internal errors become D-Bus error names.
impl From<SubmitError> for Error {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::Invalid(_) => Error::ValidationFailed(err.to_string()),
            SubmitError::Busy(_) => Error::Busy(err.to_string()),
            SubmitError::ShuttingDown => Error::ShuttingDown(err.to_string()),
            SubmitError::Persist { .. }
            | SubmitError::Plan(_)
            | SubmitError::TooManyRunning(_)
            | SubmitError::TooManyKnown(_) => Error::Failed(err.to_string()),
        }
    }
}

impl From<JobError> for Error {
    fn from(err: JobError) -> Self {
        match err {
            JobError::NoSuchJob(_) => Error::NoSuchJob(err.to_string()),
        }
    }
}
