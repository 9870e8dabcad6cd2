//! The reload step: `Reload` of the instance's systemd manager over D-Bus (the user's manager
//! for a rootless instance, the system's for a rootful one).

use std::time::Duration;

use module_updater_dbus::types::Step;

use super::context::{Ctx, UpdateJob};

/// How long the manager may take to answer `Reload`.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(90);

/// Reloads the manager. A failure is a warning, as in NS8.
pub async fn reload(ctx: &mut Ctx<'_>) {
    ctx.begin(Step::Reload);
    let reloaded = match connect(ctx.job).await {
        Ok(connection) => {
            let reload = module_updater_systemd::manager::reload(&connection);
            match tokio::time::timeout(RELOAD_TIMEOUT, reload).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "the systemd manager did not answer Reload within {} s",
                    RELOAD_TIMEOUT.as_secs()
                )),
            }
        }
        Err(err) => Err(err),
    };
    if let Err(err) = reloaded {
        let instance = &ctx.job.instance;
        let how = if instance.rootless {
            format!("`systemctl --user daemon-reload` as {}", instance.id)
        } else {
            "`systemctl daemon-reload`".to_owned()
        };
        ctx.warning(format!(
            "systemd daemon-reload failed: {err}; the instance's units keep their previous definitions until its manager is reloaded ({how})"
        ));
    }
    ctx.end(Step::Reload);
}

/// Connects to the instance's systemd manager: the user's for a rootless instance, the system's
/// (or `system_manager_address`) for a rootful one.
pub async fn connect(job: &UpdateJob) -> Result<zbus::Connection, String> {
    let instance = &job.instance;
    let connection = match (&instance.runtime_dir, instance.rootless) {
        (Some(runtime_dir), true) => {
            let address = module_updater_systemd::manager::user_bus_address(runtime_dir);
            module_updater_systemd::manager::connect(&address).await
        }
        _ => {
            module_updater_systemd::manager::connect_system(job.system_manager_address.as_deref())
                .await
        }
    };
    connection.map_err(|e| e.to_string())
}
