//! D-Bus errors of the service. Each variant is sent as `org.nethserver.ModuleUpdater.Error.<Variant>`
//! and comes back as the same variant in a zbus client.

/// Every error the service puts on the wire. The daemon maps its internal errors to these in one place.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.nethserver.ModuleUpdater.Error")]
pub enum Error {
    /// Transport-level failure (never produced by the service logic itself).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The request was refused before any job existed; the message is NS8's validation array.
    ValidationFailed(String),
    /// An instance of the request is already being updated; the message is the
    /// `action_already_running` array naming the instance and the job that holds it.
    Busy(String),
    /// No module instance with that id.
    NoSuchInstance(String),
    /// No job with that id or path.
    NoSuchJob(String),
    /// `Rollback` of an instance of which nothing is kept.
    NothingKept(String),
    /// The daemon is shutting down and takes no new jobs.
    ShuttingDown(String),
    /// Anything else; the message names what failed.
    Failed(String),
}
