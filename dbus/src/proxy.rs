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
    /// The instance's update history, a JSON array of [`crate::types::HistoryEntry`], newest first.
    fn get_history(&self, instance: &str) -> zbus::Result<String>;
    /// `{"instances": {id: {...}}}`: what each instance runs and the newest version above it.
    fn list_updates(&self, instances: &[&str]) -> zbus::Result<String>;
    /// ListUpdates after asking the registries again.
    fn refresh_updates(&self, instances: &[&str]) -> zbus::Result<String>;
    /// What UpdateModule with the same request would do, as JSON, without changing anything.
    fn plan_update(&self, request: &str) -> zbus::Result<String>;

    /// The daemon's version (`CARGO_PKG_VERSION` of `module-updaterd`).
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// Optional capabilities ([`crate::FEATURES`]).
    #[zbus(property)]
    fn features(&self) -> zbus::Result<Vec<String>>;

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
    /// The last messages (time µs, priority, text) of one instance in this job, oldest first.
    fn get_messages(&self, instance: &str) -> zbus::Result<Vec<(u64, u32, String)>>;

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
    /// Per instance: (status, step, percent, exit code).
    #[zbus(property)]
    fn instance_states(&self) -> zbus::Result<HashMap<String, (String, String, u32, i32)>>;

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

/// An instance object at `/org/nethserver/ModuleUpdater/instance/<escaped id>`
/// ([`crate::instance_path`]).
#[proxy(
    interface = "org.nethserver.ModuleUpdater.Instance",
    default_service = "org.nethserver.ModuleUpdater"
)]
pub trait Instance {
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    /// The image repository, e.g. `ghcr.io/nethserver/mail`.
    #[zbus(property)]
    fn module(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn image_url(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn image_digest(&self) -> zbus::Result<String>;
    /// The tag of the image URL, e.g. `1.7.1`.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn rootless(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn uid(&self) -> zbus::Result<u32>;
    /// `idle`, `updating` or `recovering`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// The job updating it, `/` when none.
    #[zbus(property)]
    fn job(&self) -> zbus::Result<OwnedObjectPath>;
    /// The newest history entry as JSON, `{}` when none.
    #[zbus(property)]
    fn last_update(&self) -> zbus::Result<String>;
}
