//! The D-Bus layer: two interfaces and a pump that turns job events into signals. It only
//! translates; the job manager and the engine decide everything.

pub mod job;
pub mod manager;
pub mod pump;

use module_updater_dbus::Error;

use crate::jobs::{JobError, SubmitError};

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
            SubmitError::Persist { .. } => Error::Failed(err.to_string()),
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
