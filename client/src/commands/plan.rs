//! `update --dry-run` and `run update-module --dry-run`: PlanUpdate's plan, as text or as the
//! JSON the service returned.

use serde_json::Value;

use super::{Ctx, out};
use crate::error::{ClientError, exit};

/// Asks the service for the plan of `request` and prints it. Exit code 0 when `UpdateModule`
/// would start a job, 10 (as a refused request) when it would refuse it.
pub async fn dry_run(ctx: &Ctx, request: &str) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    let body = (request,);
    let plan: String = ctx
        .bus
        .call_gated(manager.inner(), "PlanUpdate", &body)
        .await
        .map_err(|e| ctx.call("PlanUpdate").error(e))?;
    let parsed: Option<Value> = serde_json::from_str(&plan).ok();
    match &parsed {
        Some(value) if !ctx.json => out(&render(value)),
        _ => out(plan.trim_end()),
    }
    let refused = parsed
        .as_ref()
        .and_then(|p| p["refused"].as_array())
        .is_some_and(|r| !r.is_empty());
    Ok(if refused {
        exit::VALIDATION
    } else {
        exit::SUCCESS
    })
}

/// Bytes for people: 1.5 MiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// A list on one line, `-` when empty.
fn listed(value: &Value) -> String {
    let items = strings(value);
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(" ")
    }
}

/// The plan as text: the node's download, then each instance.
pub fn render(plan: &Value) -> String {
    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n');
    };
    let url = plan["module_url"].as_str().unwrap_or("?");
    line(format!("Plan for {url} (nothing was changed)"));
    let download = &plan["download"];
    if let Some(error) = download["error"].as_str() {
        line(format!("Download: {error}"));
    } else if let Some(images) = download["images"].as_array().filter(|i| !i.is_empty()) {
        line(format!(
            "Download, once for the node: {}",
            bytes(download["bytes"].as_u64().unwrap_or(0))
        ));
        for image in images {
            line(format!(
                "  {}  {}",
                image["reference"].as_str().unwrap_or("?"),
                bytes(image["bytes"].as_u64().unwrap_or(0))
            ));
        }
    } else {
        line("Download: nothing".to_owned());
    }
    for instance in plan["instances"].as_array().into_iter().flatten() {
        line(String::new());
        let id = instance["instance"].as_str().unwrap_or("?");
        let action = instance["action"].as_str().unwrap_or("?");
        line(format!("{id}: {action}"));
        for refusal in instance["refused"].as_array().into_iter().flatten() {
            let error = refusal["error"].as_str().unwrap_or("?");
            let detail = match (
                refusal["filesystem"].as_str(),
                refusal["needed"].as_u64(),
                refusal["available"].as_u64(),
            ) {
                (Some(fs), Some(needed), Some(available)) => format!(
                    ": {fs} needs {} ({needed} bytes), has {} ({available} bytes)",
                    bytes(needed),
                    bytes(available)
                ),
                _ => refusal["current"]
                    .as_str()
                    .map(|c| format!(": runs {c}"))
                    .unwrap_or_default(),
            };
            line(format!("  refused: {error}{detail}"));
        }
        let or_dash = |v: &Value| v.as_str().unwrap_or("-").to_owned();
        line(format!(
            "  image:   {} -> {}",
            or_dash(&instance["old_url"]),
            or_dash(&instance["new_url"])
        ));
        line(format!(
            "  digest:  {} -> {}",
            or_dash(&instance["old_digest"]),
            or_dash(&instance["new_digest"])
        ));
        if action == "already-installed" {
            continue;
        }
        line(format!(
            "  storage: {}",
            bytes(instance["storage_bytes"].as_u64().unwrap_or(0))
        ));
        let files = &instance["files"];
        if files.is_object() {
            line(format!(
                "  files:   {} added, {} changed, {} unchanged, {} removed",
                strings(&files["added"]).len(),
                strings(&files["changed"]).len(),
                files["unchanged"].as_u64().unwrap_or(0),
                strings(&files["removed"]).len()
            ));
            for (sign, key) in [("+", "added"), ("~", "changed"), ("-", "removed")] {
                for path in strings(&files[key]) {
                    line(format!("    {sign} {path}"));
                }
            }
        }
        line(format!("  steps:   {}", listed(&instance["steps"])));
        line(format!("  scripts: {}", listed(&instance["scripts"])));
        line(format!(
            "  cleanup: {}",
            listed(&instance["images_removed"])
        ));
        for space in instance["space"].as_array().into_iter().flatten() {
            let enough = space["enough"].as_bool().unwrap_or(false);
            line(format!(
                "  space:   {} ({}) needs {}, has {}{}",
                space["filesystem"].as_str().unwrap_or("?"),
                listed(&space["purposes"]),
                bytes(space["needed"].as_u64().unwrap_or(0)),
                bytes(space["available"].as_u64().unwrap_or(0)),
                if enough { "" } else { "  NOT ENOUGH" }
            ));
        }
    }
    if plan["refused"].as_array().is_some_and(|r| !r.is_empty()) {
        line(String::new());
        line("UpdateModule would refuse this request (exit code 10).".to_owned());
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_reads_as_text() {
        let plan = serde_json::json!({
            "module_url": "r/demo:2.0",
            "download": {"bytes": 2048, "images": [{"reference": "r/demo:2.0", "bytes": 2048}]},
            "instances": [{
                "instance": "demo1", "action": "refused",
                "refused": [{"error": "instances_insufficient_space", "filesystem": "/srv",
                             "needed": 3_145_728, "available": 1024}],
                "old_url": "r/demo:1.0", "new_url": "r/demo:2.0",
                "files": {"added": ["a"], "changed": [], "unchanged": 2, "removed": ["./b"]},
                "steps": ["05pullimages"], "scripts": ["10x"], "images_removed": [],
                "space": [{"filesystem": "/srv", "purposes": ["install"], "needed": 3_145_728,
                           "available": 1024, "enough": false}]
            }],
            "refused": [{"error": "instances_insufficient_space"}]
        });
        let text = render(&plan);
        assert!(
            text.contains("Download, once for the node: 2.0 KiB"),
            "{text}"
        );
        assert!(text.contains("demo1: refused"), "{text}");
        assert!(
            text.contains("refused: instances_insufficient_space: /srv needs 3.0 MiB"),
            "{text}"
        );
        assert!(text.contains("    + a\n    - ./b"), "{text}");
        assert!(text.contains("cleanup: -"), "{text}");
        assert!(text.contains("NOT ENOUGH"), "{text}");
        assert!(text.contains("would refuse"), "{text}");
    }
}
