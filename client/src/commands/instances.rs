//! The instance commands: `list`, `show` and `history`.

use std::collections::BTreeMap;

use module_updater_dbus::types::HistoryEntry;
use module_updater_dbus::{InstanceProxy, instance_path};
use serde_json::{Value, json};
use zbus::proxy::CacheProperties;

use super::{Ctx, out, out_json};
use crate::cli::JobRef;
use crate::clock::{Clock, usec_iso_utc};
use crate::error::{Call, ClientError, exit};
use crate::render;

pub(super) async fn list(ctx: &Ctx) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    let instances = manager
        .list_instances()
        .await
        .map_err(|e| ctx.call("ListInstances").error(e))?;
    let job_of = |path: &zbus::OwnedObjectPath| JobRef::from_path(path.as_str());
    if ctx.json {
        let items: Vec<Value> = instances
            .iter()
            .map(|(id, image, state, job)| {
                json!({
                    "id": id,
                    "image_url": image,
                    "state": state,
                    "job": job_of(job).map(|j| j.path()),
                })
            })
            .collect();
        out_json(&Value::Array(items));
    } else {
        let rows: Vec<Vec<String>> = instances
            .iter()
            .map(|(id, image, state, job)| {
                vec![
                    id.clone(),
                    image.clone(),
                    state.clone(),
                    job_of(job).map_or_else(|| "-".to_owned(), |j| j.to_string()),
                ]
            })
            .collect();
        out(&render::table(
            &["INSTANCE", "IMAGE", "STATE", "JOB"],
            &rows,
        ));
    }
    Ok(exit::SUCCESS)
}

pub(super) async fn show(ctx: &Ctx, instance: &str) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    let call = Call {
        bus: &ctx.bus_name,
        what: "GetInstance",
        job: None,
        instance: Some(instance),
    };
    let environment: BTreeMap<String, String> = manager
        .get_instance(instance)
        .await
        .map_err(|e| call.error(e))?
        .into_iter()
        .collect();
    let object = InstanceProxy::builder(&ctx.bus.connection)
        .path(instance_path(instance))
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(|e| call.error(e))?;
    let read = async {
        Ok::<_, zbus::Error>((
            object.state().await?,
            object.job().await?,
            object.module().await?,
            object.version().await?,
            object.last_update().await?,
        ))
    };
    // The instance object follows the node at the daemon's next refresh: a just-added instance
    // may not have one yet, and its environment is what counts.
    let (state, job, module, version, last_update) = read.await.unwrap_or_else(|_| {
        let url = environment.get("IMAGE_URL").cloned().unwrap_or_default();
        let (module, version) = module_updater_dbus::types::repository_and_tag(&url);
        let nothing = zbus::OwnedObjectPath::try_from("/").unwrap_or_default();
        let (module, version) = (module.to_owned(), version.to_owned());
        ("idle".to_owned(), nothing, module, version, "{}".to_owned())
    });
    let job = JobRef::from_path(job.as_str());
    let last: Option<HistoryEntry> = serde_json::from_str(&last_update).ok();
    let kept = environment.get("kept").cloned().unwrap_or_default();
    if ctx.json {
        let mut value = json!(environment);
        value["state"] = json!(state);
        value["job"] = json!(job.as_ref().map(JobRef::path));
        value["module"] = json!(module);
        value["version"] = json!(version);
        value["last_update"] = serde_json::from_str(&last_update).unwrap_or(json!({}));
        out_json(&value);
    } else {
        let mut text = format!(
            "Instance: {instance}\nModule:   {module}\nVersion:  {version}\nState:    {state}{}\n",
            job.map(|j| format!(" (job {j})")).unwrap_or_default()
        );
        if let Some(last) = &last {
            text.push_str(&format!(
                "Last update: {}\n",
                history_line(&ctx.clock, last)
            ));
        }
        if !kept.is_empty() {
            text.push_str(&format!("Kept for a rollback: {kept}\n"));
        }
        text.push('\n');
        // `state` and `kept` are GetInstance's, not the environment's: they are above.
        let rows: Vec<Vec<String>> = environment
            .into_iter()
            .filter(|(k, _)| k != "state" && k != "kept")
            .map(|(k, v)| vec![k, v])
            .collect();
        text.push_str(&render::table(&["KEY", "VALUE"], &rows));
        out(&text);
    }
    Ok(exit::SUCCESS)
}

/// One line about a finished update: when, job, status, from → to.
fn history_line(clock: &Clock, entry: &HistoryEntry) -> String {
    format!(
        "{} job {} {} {} → {}",
        clock.usec(entry.finished_usec),
        entry.job,
        entry.result.status.as_str(),
        entry.result.old_image_url.as_deref().unwrap_or("-"),
        entry.result.new_image_url.as_deref().unwrap_or("-"),
    )
}

/// `history [INSTANCE]`: one instance's entries, or every instance's merged, newest first.
pub(super) async fn history(ctx: &Ctx, instance: Option<&str>) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    let ids: Vec<String> = match instance {
        Some(id) => vec![id.to_owned()],
        None => manager
            .list_instances()
            .await
            .map_err(|e| ctx.call("ListInstances").error(e))?
            .into_iter()
            .map(|(id, ..)| id)
            .collect(),
    };
    let mut entries: Vec<(String, HistoryEntry)> = Vec::new();
    for id in &ids {
        let call = Call {
            bus: &ctx.bus_name,
            what: "GetHistory",
            job: None,
            instance: Some(id),
        };
        let json = manager.get_history(id).await.map_err(|e| call.error(e))?;
        let parsed: Vec<HistoryEntry> =
            serde_json::from_str(&json).map_err(|e| ClientError::Service {
                what: "GetHistory".to_owned(),
                reason: format!("it returned a history that is not valid: {e}"),
            })?;
        entries.extend(parsed.into_iter().map(|e| (id.clone(), e)));
    }
    entries.sort_by_key(|(_, entry)| std::cmp::Reverse(entry.finished_usec));
    if ctx.json {
        let items: Vec<Value> = entries
            .iter()
            .map(|(id, entry)| {
                let mut value = json!(entry);
                value["instance"] = json!(id);
                value["started"] = json!(usec_iso_utc(entry.started_usec));
                value["finished"] = json!(usec_iso_utc(entry.finished_usec));
                value
            })
            .collect();
        out_json(&Value::Array(items));
        return Ok(exit::SUCCESS);
    }
    if entries.is_empty() {
        if !ctx.quiet {
            out("no updates recorded");
        }
        return Ok(exit::SUCCESS);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(id, entry)| {
            let (_, from) = module_updater_dbus::types::repository_and_tag(
                entry.result.old_image_url.as_deref().unwrap_or_default(),
            );
            let (_, to) = module_updater_dbus::types::repository_and_tag(
                entry.result.new_image_url.as_deref().unwrap_or_default(),
            );
            let mut notes = Vec::new();
            if let Some(error) = &entry.result.error {
                notes.push(format!("{}: {}", error.step, error.reason));
            }
            if !entry.result.warnings.is_empty() {
                notes.push(format!("{} warning(s)", entry.result.warnings.len()));
            }
            vec![
                ctx.clock.usec(entry.finished_usec),
                id.clone(),
                entry.job.to_string(),
                entry.result.status.as_str().to_owned(),
                format!("{} → {}", or_dash(from), or_dash(to)),
                notes.join("; "),
            ]
        })
        .collect();
    out(&render::table(
        &["FINISHED", "INSTANCE", "JOB", "STATUS", "VERSION", "NOTES"],
        &rows,
    ));
    Ok(exit::SUCCESS)
}

pub(super) fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// `check [INSTANCE...]`: ListUpdates (RefreshUpdates with `--refresh`) as a table, or its JSON.
pub(super) async fn check(
    ctx: &Ctx,
    instances: &[String],
    refresh: bool,
) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    let wanted: Vec<&str> = instances.iter().map(String::as_str).collect();
    let what = if refresh {
        "RefreshUpdates"
    } else {
        "ListUpdates"
    };
    let call = ctx.call(what);
    let text = if refresh {
        manager.refresh_updates(&wanted).await
    } else {
        manager.list_updates(&wanted).await
    }
    .map_err(|e| call.error(e))?;
    let answer: Value = serde_json::from_str(&text).map_err(|e| ClientError::Service {
        what: what.to_owned(),
        reason: format!("its answer is not valid JSON: {e}"),
    })?;
    let lines = answer["instances"].as_object().cloned().unwrap_or_default();
    let available = |line: &Value| !line["newest"].is_null() || line["tag_moved"] == json!(true);
    let any_update = lines.values().any(available);
    let all_failed = !lines.is_empty() && lines.values().all(|l| !l["error"].is_null());
    if ctx.json {
        out_json(&answer);
    } else {
        let rows: Vec<Vec<String>> = lines
            .iter()
            .map(|(id, line)| {
                let text = |key: &str| line[key].as_str().unwrap_or_default().to_owned();
                let moved = match line["tag_moved"].as_bool() {
                    Some(true) => "moved",
                    Some(false) => "-",
                    None => "?",
                };
                vec![
                    id.clone(),
                    text("repository"),
                    or_dash(&text("tag")).to_owned(),
                    or_dash(&text("newest")).to_owned(),
                    moved.to_owned(),
                    format!("{} s ago", line["age_seconds"].as_u64().unwrap_or(0)),
                    text("error"),
                ]
            })
            .collect();
        out(&render::table(
            &[
                "INSTANCE", "MODULE", "VERSION", "NEWEST", "TAG", "CHECKED", "ERROR",
            ],
            &rows,
        ));
    }
    Ok(if any_update {
        exit::UPDATES_AVAILABLE
    } else if all_failed {
        exit::FAILED
    } else {
        exit::SUCCESS
    })
}
