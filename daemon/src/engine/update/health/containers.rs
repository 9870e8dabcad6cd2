//! Part 2 of the health gate: no running container of the instance uses an image the update
//! replaced (a module whose new version forgot to restart a container, NethServer/dev#7865).

use std::collections::BTreeMap;

use module_updater_dbus::types::StaleContainer;

use super::super::super::podman::{Podman, RunningContainer};

/// The running containers that use one of the `replaced` references, by name or by image id
/// (an id that a `current` reference also names is the same image still in use: not stale).
pub async fn stale(
    podman: &Podman,
    replaced: &[String],
    current: &[String],
) -> Result<Vec<StaleContainer>, String> {
    if replaced.is_empty() {
        return Ok(Vec::new());
    }
    let images = podman.images_by_id().await.map_err(|e| e.to_string())?;
    let containers = podman
        .running_containers()
        .await
        .map_err(|e| e.to_string())?;
    Ok(find_stale(&containers, &images, replaced, current))
}

/// [`stale`] on what podman said.
fn find_stale(
    containers: &[RunningContainer],
    images: &BTreeMap<String, Vec<String>>,
    replaced: &[String],
    current: &[String],
) -> Vec<StaleContainer> {
    // Image id → the replaced reference it is.
    let mut replaced_ids: BTreeMap<&str, &str> = BTreeMap::new();
    for (id, names) in images {
        if names.iter().any(|n| current.contains(n)) {
            continue;
        }
        if let Some(reference) = names.iter().find(|n| replaced.contains(n)) {
            replaced_ids.insert(id, reference);
        }
    }
    containers
        .iter()
        .filter_map(|c| {
            let by_name = replaced.iter().find(|r| **r == c.image).map(String::as_str);
            let by_id = replaced_ids.get(c.image_id.as_str()).copied();
            by_name.or(by_id).map(|reference| StaleContainer {
                name: c.name.clone(),
                id: c.id.clone(),
                image: c.image.clone(),
                replaced: reference.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, image: &str, id: &str) -> RunningContainer {
        RunningContainer {
            id: format!("c-{name}"),
            name: name.to_owned(),
            image: image.to_owned(),
            image_id: id.to_owned(),
        }
    }

    #[test]
    fn a_container_on_a_replaced_image_is_found_by_name_or_id() {
        let images = BTreeMap::from([
            ("old".to_owned(), vec!["r/db:1".to_owned()]),
            ("new".to_owned(), vec!["r/db:2".to_owned()]),
            (
                "both".to_owned(),
                vec!["r/c:1".to_owned(), "r/c:2".to_owned()],
            ),
        ]);
        let replaced = ["r/db:1".to_owned(), "r/c:1".to_owned()];
        let current = ["r/db:2".to_owned(), "r/c:2".to_owned()];
        let containers = [
            container("by-name", "r/db:1", "old"),
            container("by-id", "old", "old"),
            container("fresh", "r/db:2", "new"),
            container("same-image", "r/c:2", "both"),
        ];
        let stale = find_stale(&containers, &images, &replaced, &current);
        let names: Vec<&str> = stale.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["by-name", "by-id"]);
        assert!(stale.iter().all(|s| s.replaced == "r/db:1"));
    }
}
