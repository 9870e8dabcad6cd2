//! Client-side proxies. Kept by hand in step with the daemon's interfaces; the introspection
//! snapshot test in `tests/` catches any drift.

use std::collections::HashMap;

use zbus::{OwnedObjectPath, proxy};

/// The manager object at [`crate::OBJECT_PATH`].
#[proxy(
    interface = "org.nethserver.ModuleUpdater",
    default_service = "org.nethserver.ModuleUpdater",
    default_path = "/org/nethserver/ModuleUpdater"
)]
pub trait ModuleUpdater {
    /// Checks NS8's update-module request and starts a job; returns its path.
    fn update_module(&self, request: &str) -> zbus::Result<OwnedObjectPath>;
    /// (id, image URL, `idle`/`updating`, job path or `/`) of every instance.
    fn list_instances(&self) -> zbus::Result<Vec<(String, String, String, OwnedObjectPath)>>;
    /// The instance's image keys, `MODULE_ID`, `rootless`, `uid`.
    fn get_instance(&self, id: &str) -> zbus::Result<HashMap<String, String>>;
    /// Running and lingering jobs.
    fn list_jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    /// The daemon's version (`CARGO_PKG_VERSION` of `module-updaterd`).
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    #[zbus(signal)]
    fn job_new(&self, job: OwnedObjectPath) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_finished(
        &self,
        job: OwnedObjectPath,
        status: String,
        exit_code: i32,
    ) -> zbus::Result<()>;
}

/// A job object at `/org/nethserver/ModuleUpdater/job/<n>`.
#[proxy(
    interface = "org.nethserver.ModuleUpdater.Job",
    default_service = "org.nethserver.ModuleUpdater"
)]
pub trait Job {
    fn cancel(&self) -> zbus::Result<()>;
    fn get_result(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn id(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn action(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn request(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn instances(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn exit_code(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn caller_uid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn started_usec(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn finished_usec(&self) -> zbus::Result<u64>;

    #[zbus(signal, name = "Progress")]
    fn progress_signal(&self, instance: String, step: String, percent: u32) -> zbus::Result<()>;
    #[zbus(signal)]
    fn message(&self, instance: String, priority: u32, text: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn instance_finished(
        &self,
        instance: String,
        status: String,
        exit_code: i32,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn finished(&self, status: String, exit_code: i32) -> zbus::Result<()>;
}
