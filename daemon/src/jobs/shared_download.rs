//! The shared download: when several rootless instances of a job need the new image, the daemon
//! downloads it once for the node before their workers start (`engine/shared_images.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::watch;

use super::Jobs;
use crate::engine::events::{Event, priority};
use crate::engine::instance::Instance;
use crate::engine::lock;
use crate::engine::shared_images::{self, SharedImages};
use crate::request;

impl Jobs {
    /// One download per node: when two or more rootless instances of the job need the images,
    /// the daemon downloads them once and hands the workers archives to load (see
    /// `engine/shared_images.rs`). Anything that goes wrong here only means the instances pull
    /// for themselves, as they would have anyway.
    pub(super) async fn download_once(
        self: Arc<Self>,
        id: u64,
        request: &request::UpdateRequest,
        targets: &[Instance],
        cancel: &watch::Receiver<bool>,
    ) -> SharedImages {
        // A plan of this URL downloaded it already: every instance loads it, even a lone one.
        if !request.force
            && !*cancel.borrow()
            && let Some(mut planned) = self.planned.take(&request.module_url)
        {
            log::info!(MODULE_UPDATER_JOB = id; "job {id}: the instances load {} as a plan downloaded it", request.module_url);
            planned.from_plan = true;
            return planned;
        }
        let candidates: HashSet<String> = targets
            .iter()
            .filter(|i| i.rootless)
            .map(|i| i.id.clone())
            .collect();
        let (url, force) = (request.module_url.clone(), request.force);
        let jobs = Arc::clone(&self);
        // The instances that need the new images, and the values their environments all share:
        // an extra image named there by every one of them is in every storage already (NS8
        // records each extra image it pulled, and cleanup never removes a named one).
        let (needing, shared_values): (Vec<String>, HashSet<String>) =
            tokio::task::spawn_blocking(move || {
                let mut needing = Vec::new();
                let mut common: Option<HashSet<String>> = None;
                // The environments as the instance cache holds them (checked on disk by it).
                for found in jobs.instances.list() {
                    if !candidates.contains(&found.instance.id) {
                        continue;
                    }
                    let env = &found.environment;
                    let current = env.get("IMAGE_URL") == Some(url.as_str());
                    if force || lock::interrupted(&found.instance.state_dir) || !current {
                        let values: HashSet<String> =
                            env.iter().map(|(_, v)| v.to_owned()).collect();
                        common = Some(match common {
                            None => values,
                            Some(c) => c.intersection(&values).cloned().collect(),
                        });
                        needing.push(found.instance.id.clone());
                    }
                }
                // With force every image is fetched again, as each instance would.
                let common = if force {
                    HashSet::new()
                } else {
                    common.unwrap_or_default()
                };
                (needing, common)
            })
            .await
            .unwrap_or_default();
        let cancelled_already = *cancel.borrow();
        if needing.len() < 2 || cancelled_already {
            return SharedImages::default();
        }
        // Said to each instance as its own messages are: journalled under its MODULE_UPDATER_INSTANCE too.
        let say = |priority: u8, text: &str| {
            for instance in &needing {
                let text = text.to_owned();
                self.instance_event(id, instance, Event::Message { priority, text });
            }
        };
        say(
            priority::INFO,
            &format!(
                "Downloading {} and its extra images once for the {} instances of job {id}",
                request.module_url,
                needing.len()
            ),
        );
        let mut cancelled = cancel.clone();
        let download = shared_images::download(
            &self.settings.state_dir,
            id,
            &request.module_url,
            &shared_values,
            self.settings.pull_timeout,
        );
        let outcome = tokio::select! {
            outcome = download => outcome,
            () = async {
                // A closed channel means nobody can cancel any more: wait for the download.
                if cancelled.wait_for(|c| *c).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => {
                let state_dir = self.settings.state_dir.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    shared_images::remove_job(&state_dir, id);
                })
                .await;
                return SharedImages::default();
            }
        };
        match outcome {
            Ok(shared) => {
                for (reference, why) in &shared.skipped {
                    say(
                        priority::INFO,
                        &format!("{reference} is pulled by each instance: {why}"),
                    );
                }
                log::info!(MODULE_UPDATER_JOB = id; "job {id}: downloaded once for {} instances: {}", needing.len(), shared.archives.keys().cloned().collect::<Vec<_>>().join(" "));
                shared
            }
            Err(err) => {
                say(
                    priority::WARNING,
                    &format!("the shared download failed ({err}): each instance pulls for itself"),
                );
                SharedImages::default()
            }
        }
    }
}
