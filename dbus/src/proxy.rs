//! Client-side proxies. Kept by hand in step with the daemon's interfaces; the introspection snapshot
//! test in `tests/` catches any drift.

use zbus::proxy;

/// The manager object at [`crate::OBJECT_PATH`].
#[proxy(
    interface = "org.nethserver.ModuleUpdater",
    default_service = "org.nethserver.ModuleUpdater",
    default_path = "/org/nethserver/ModuleUpdater"
)]
pub trait ModuleUpdater {
    /// The daemon's version (`CARGO_PKG_VERSION` of `module-updaterd`).
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}
