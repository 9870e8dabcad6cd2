//! Part 1 of the health gate: the instance's units, read over D-Bus from its systemd manager.
//! Those active before the update and those the instance has enabled must be active again;
//! `activating` (or a unit not yet started again) is waited for, `failed` is not.

use std::time::Duration;

use module_updater_dbus::types::UnitHealth;
use module_updater_systemd::manager::{self, ManagerProxy, UnitProxy};
use tokio::time::Instant;

use super::super::super::instance::Instance;

/// The unit types whose state says whether the module works; scopes, slices, mounts and
/// devices come and go with the containers themselves.
const CHECKED_TYPES: [&str; 5] = ["service", "socket", "timer", "path", "target"];

/// How often the units are read again while some are still settling.
const POLL: Duration = Duration::from_millis(500);

/// Why a unit is checked.
pub const WAS_ACTIVE: &str = "was-active";
pub const ENABLED: &str = "enabled";
/// A unit that was active before and that the update removed (its unit file is gone).
pub const REMOVED: &str = "removed";

/// Whether `unit` belongs to the instance: every unit of a rootless instance's own manager; on
/// the system manager, a rootful instance's units are those named after it (`<id>.service`,
/// `<id>-*.service`, `<id>@*.service`).
fn belongs(instance: &Instance, unit: &str) -> bool {
    if instance.rootless {
        return true;
    }
    unit.strip_prefix(instance.id.as_str())
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| matches!(c, '.' | '-' | '@'))
}

fn checked_type(unit: &str) -> bool {
    unit.rsplit_once('.')
        .is_some_and(|(_, kind)| CHECKED_TYPES.contains(&kind))
}

/// The instance's units active now (not the transient ones: podman's timers, `systemd-run`).
pub async fn active(
    connection: &zbus::Connection,
    instance: &Instance,
) -> Result<Vec<String>, String> {
    let manager = ManagerProxy::new(connection)
        .await
        .map_err(|e| format!("cannot reach the systemd manager: {e}"))?;
    let units = manager
        .list_units()
        .await
        .map_err(|e| format!("the systemd manager's ListUnits failed: {e}"))?;
    let mut active = Vec::new();
    for (name, _, _, active_state, _, _, path, ..) in units {
        if active_state != "active" || !checked_type(&name) || !belongs(instance, &name) {
            continue;
        }
        let transient = match UnitProxy::builder(connection).path(path).build().await {
            Ok(unit) => unit.transient().await.unwrap_or(false),
            Err(_) => false,
        };
        if !transient {
            active.push(name);
        }
    }
    active.sort();
    Ok(active)
}

/// The units the instance has enabled: on a rootless instance's manager, the unit files of its
/// home (`~/.config/systemd/user`); on the system manager, those named after a rootful instance.
/// Templates cannot be active and are left out.
pub async fn enabled(
    connection: &zbus::Connection,
    instance: &Instance,
) -> Result<Vec<String>, String> {
    let manager = ManagerProxy::new(connection)
        .await
        .map_err(|e| format!("cannot reach the systemd manager: {e}"))?;
    let files = manager
        .list_unit_files_by_patterns(&["enabled"], &[])
        .await
        .map_err(|e| format!("the systemd manager's ListUnitFilesByPatterns failed: {e}"))?;
    let mut enabled: Vec<String> = files
        .into_iter()
        .filter(|(path, _)| {
            !instance.rootless || path.starts_with(&*instance.home.to_string_lossy())
        })
        .filter_map(|(path, _)| {
            let name = std::path::Path::new(&path)
                .file_name()?
                .to_str()?
                .to_owned();
            Some(name)
        })
        .filter(|name| !name.contains("@.") && checked_type(name) && belongs(instance, name))
        .collect();
    enabled.sort();
    enabled.dedup();
    Ok(enabled)
}

/// Reads the `checked` units (name, why) until each is settled (active, failed, removed),
/// `deadline` passes or a cancel is asked for; the last reading of each.
pub async fn wait(
    connection: &zbus::Connection,
    checked: &[(String, &'static str)],
    deadline: Instant,
    cancel: &tokio::sync::watch::Receiver<bool>,
) -> Vec<UnitHealth> {
    loop {
        let mut report = Vec::with_capacity(checked.len());
        let mut settled = true;
        for (name, reason) in checked {
            let (health, done) = read(connection, name, reason).await;
            settled &= done;
            report.push(health);
        }
        if settled || *cancel.borrow() || Instant::now() + POLL > deadline {
            return report;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One unit's state, and whether it is settled.
async fn read(
    connection: &zbus::Connection,
    name: &str,
    reason: &'static str,
) -> (UnitHealth, bool) {
    let mut health = UnitHealth {
        unit: name.to_owned(),
        active_state: String::new(),
        sub_state: String::new(),
        result: String::new(),
        reason: reason.to_owned(),
        healthy: false,
    };
    let Ok(manager) = ManagerProxy::new(connection).await else {
        return (health, false);
    };
    let Ok(path) = manager.load_unit(name).await else {
        return (health, false);
    };
    let Ok(unit) = UnitProxy::builder(connection)
        .path(path.clone())
        .build()
        .await
    else {
        return (health, false);
    };
    let load_state = unit.load_state().await.unwrap_or_default();
    health.active_state = unit.active_state().await.unwrap_or_default();
    health.sub_state = unit.sub_state().await.unwrap_or_default();
    health.result = manager::unit_type_property(connection, &path, name, "Result")
        .await
        .unwrap_or_default();
    if load_state == "not-found" && reason == WAS_ACTIVE {
        health.reason = REMOVED.to_owned();
        health.healthy = true;
        return (health, true);
    }
    match health.active_state.as_str() {
        "active" => {
            health.healthy = true;
            (health, true)
        }
        "failed" => (health, true),
        "inactive" if reason == ENABLED && health.result == "success" => {
            // An enabled oneshot service that ran and ended is as it should be.
            let kind = manager::unit_type_property(connection, &path, name, "Type").await;
            let done = kind.as_deref() == Some("oneshot");
            health.healthy = done;
            (health, done)
        }
        _ => (health, false),
    }
}
