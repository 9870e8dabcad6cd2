//! `PlanUpdate` on the job manager's side: the same admission as a job's, the new image read
//! from a download into the node's download area (kept for the job that follows, so that its
//! instances load it instead of downloading it again), and the space check both methods enforce.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::Jobs;
use super::admission::{SubmitError, node_refusals};
use crate::engine::image_stream::Source;
use crate::engine::instance_cache::Found;
use crate::engine::lock;
use crate::engine::shared_images::{self, SharedImages};
use crate::plan::tree::NewTree;
use crate::plan::{self, Action, Download, ImageFacts, InstancePlan, NodeDownload, Plan};
use crate::request::{self, ValidationError};

/// At most this many planned downloads are kept (the oldest goes first).
const PLANNED_KEPT: usize = 4;

/// A plan's download of one module URL, until a job takes it.
struct Planned {
    module_url: String,
    /// Taken by the first job that updates rootless instances to this URL.
    shared: Option<SharedImages>,
    facts: Arc<ImageFacts>,
    download: NodeDownload,
}

/// The plans' downloads in the node's download area.
#[derive(Default)]
pub struct PlannedDownloads(Mutex<VecDeque<Planned>>);

impl PlannedDownloads {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Planned>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What is known of `module_url` from a plan whose download a job has not taken yet.
    fn facts(&self, module_url: &str) -> Option<(Arc<ImageFacts>, NodeDownload)> {
        self.lock()
            .iter()
            .find(|p| p.module_url == module_url && p.shared.is_some())
            .map(|p| (Arc::clone(&p.facts), p.download.clone()))
    }

    /// The download of `module_url` for a job, once.
    pub fn take(&self, module_url: &str) -> Option<SharedImages> {
        self.lock()
            .iter_mut()
            .find(|p| p.module_url == module_url && p.shared.is_some())
            .and_then(|p| p.shared.take())
    }

    /// Keeps a new download; returns those to remove (replaced or beyond the limit).
    fn keep(&self, planned: Planned) -> Vec<SharedImages> {
        let mut kept = self.lock();
        let mut gone = Vec::new();
        kept.retain_mut(|p| {
            if p.module_url == planned.module_url {
                gone.extend(p.shared.take());
                false
            } else {
                true
            }
        });
        kept.push_back(planned);
        while kept.len() > PLANNED_KEPT {
            if let Some(mut old) = kept.pop_front() {
                gone.extend(old.shared.take());
            }
        }
        gone
    }
}

/// Whether `found` needs the image of the request (it is not installed already).
fn needs_image(request: &request::UpdateRequest, found: &Found) -> bool {
    found.environment.get("IMAGE_URL") != Some(request.module_url.as_str())
        || request.force
        || lock::interrupted(&found.instance.state_dir)
}

impl Jobs {
    /// What the update's cleanup will keep of `instance`, as the settings and its kept version
    /// say.
    fn cleanup_of(&self, instance: &crate::engine::instance::Instance) -> plan::Cleanup {
        if self.settings.keep_previous {
            plan::Cleanup::KeepPrevious {
                older: crate::engine::kept::environment_as_root(instance),
            }
        } else {
            plan::Cleanup::Ns8
        }
    }

    /// What the request would do, with no change to any instance. A request `UpdateModule`
    /// refuses outright (malformed, an instance that does not exist) is refused the same way;
    /// what the node's state refuses is said per instance, and in `refused` as `UpdateModule`
    /// would say it.
    pub async fn plan(
        self: &Arc<Self>,
        request: request::UpdateRequest,
    ) -> Result<Plan, SubmitError> {
        let targets = self.find_targets(&request)?;
        let refusals: Vec<Vec<ValidationError>> = targets
            .iter()
            .map(|found| node_refusals(&request, found))
            .collect();
        let wanted = targets
            .iter()
            .zip(&refusals)
            .any(|(found, refused)| refused.is_empty() && needs_image(&request, found));
        let (facts, download) = if wanted {
            self.image_facts(&request.module_url).await
        } else {
            (None, NodeDownload::default())
        };
        let busy = self.busy_instances(&request);
        let jobs = Arc::clone(self);
        let planned = tokio::task::spawn_blocking(move || {
            jobs.plan_instances(
                &request,
                &targets,
                refusals,
                busy,
                facts.as_deref(),
                download,
            )
        })
        .await
        .map_err(|e| SubmitError::Plan(e.to_string()))?;
        Ok(planned)
    }

    /// The plan of each instance, and what `UpdateModule` would refuse.
    fn plan_instances(
        &self,
        request: &request::UpdateRequest,
        targets: &[Arc<Found>],
        refusals: Vec<Vec<ValidationError>>,
        busy: Vec<ValidationError>,
        facts: Option<&ImageFacts>,
        download: NodeDownload,
    ) -> Plan {
        let mut instances = Vec::new();
        let mut node_refused = Vec::new();
        let mut space_refused = Vec::new();
        for (index, (found, refused)) in targets.iter().zip(refusals).enumerate() {
            let instance = &found.instance;
            let storage = plan::storage_dir(instance, &self.settings.rootful_podman_args);
            let mut item = if needs_image(request, found) {
                plan::plan_instance(
                    instance,
                    &found.environment,
                    &request.module_url,
                    facts.filter(|_| refused.is_empty()),
                    &storage,
                    &self.cleanup_of(instance),
                )
            } else {
                already_installed(found, &request.module_url)
            };
            let no_room = plan::space::refusals(index, &instance.id, &item.space);
            let held: Vec<ValidationError> = busy
                .iter()
                .filter(|b| b.value.as_str() == Some(instance.id.as_str()))
                .cloned()
                .collect();
            item.refused = refused
                .iter()
                .chain(&held)
                .chain(&no_room)
                .cloned()
                .collect();
            if !item.refused.is_empty() {
                item.action = Action::Refused;
            }
            node_refused.extend(refused);
            space_refused.extend(no_room);
            instances.push(item);
        }
        // UpdateModule's order: the node's checks, then busy instances, then free space.
        let refused = [node_refused, busy, space_refused]
            .into_iter()
            .find(|r| !r.is_empty())
            .unwrap_or_default();
        Plan {
            module_url: request.module_url.clone(),
            download,
            instances,
            refused,
        }
    }

    /// `instances_insufficient_space` for `UpdateModule`, before any job exists, measured with
    /// what a plan learnt of the image (when a plan of this URL has its download kept).
    pub async fn space_refusals(
        self: &Arc<Self>,
        request: &request::UpdateRequest,
    ) -> Vec<ValidationError> {
        let Some((facts, _)) = self.planned.facts(&request.module_url) else {
            return Vec::new();
        };
        let Ok(targets) = self.find_targets(request) else {
            return Vec::new();
        };
        let (jobs, request) = (Arc::clone(self), request.clone());
        tokio::task::spawn_blocking(move || {
            targets
                .iter()
                .enumerate()
                .filter(|(_, found)| needs_image(&request, found))
                .flat_map(|(index, found)| {
                    let instance = &found.instance;
                    let storage = plan::storage_dir(instance, &jobs.settings.rootful_podman_args);
                    let item = plan::plan_instance(
                        instance,
                        &found.environment,
                        &request.module_url,
                        Some(&facts),
                        &storage,
                        &jobs.cleanup_of(instance),
                    );
                    plan::space::refusals(index, &instance.id, &item.space)
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// The new image's facts, from a kept plan's download or a new one.
    async fn image_facts(&self, module_url: &str) -> (Option<Arc<ImageFacts>>, NodeDownload) {
        if let Some((facts, download)) = self.planned.facts(module_url) {
            return (Some(facts), download);
        }
        let shared = match shared_images::download_for_plan(
            &self.settings.state_dir,
            module_url,
            self.settings.pull_timeout,
        )
        .await
        {
            Ok(shared) => shared,
            Err(err) => {
                let download = NodeDownload {
                    error: Some(format!("cannot download {module_url}: {err}")),
                    ..NodeDownload::default()
                };
                return (None, download);
            }
        };
        let mut download = NodeDownload {
            images: shared
                .archives
                .iter()
                .map(|(reference, archive)| Download {
                    reference: reference.clone(),
                    bytes: std::fs::metadata(archive).map_or(0, |m| m.len()),
                })
                .collect(),
            pulled_by_instances: shared.skipped.clone(),
            ..NodeDownload::default()
        };
        download.bytes = download.images.iter().map(|d| d.bytes).sum();
        match read_image(&shared, module_url).await {
            Ok(facts) => {
                let facts = Arc::new(facts);
                let gone = self.planned.keep(Planned {
                    module_url: module_url.to_owned(),
                    shared: Some(shared),
                    facts: Arc::clone(&facts),
                    download: download.clone(),
                });
                let _ =
                    tokio::task::spawn_blocking(move || gone.iter().for_each(SharedImages::remove))
                        .await;
                (Some(facts), download)
            }
            Err(err) => {
                download.error = Some(format!("cannot read {module_url}: {err}"));
                let _ = tokio::task::spawn_blocking(move || shared.remove()).await;
                (None, download)
            }
        }
    }
}

/// The plan of an instance that has the module URL already.
fn already_installed(found: &Found, module_url: &str) -> InstancePlan {
    let env = &found.environment;
    InstancePlan {
        instance: found.instance.id.clone(),
        action: Action::AlreadyInstalled,
        refused: Vec::new(),
        old_url: env.get("IMAGE_URL").map(str::to_owned),
        old_digest: env.get("IMAGE_DIGEST").map(str::to_owned),
        new_url: module_url.to_owned(),
        new_digest: env.get("IMAGE_DIGEST").map(str::to_owned),
        storage_bytes: 0,
        files: None,
        steps: Vec::new(),
        scripts: Vec::new(),
        runs: Vec::new(),
        images_removed: Vec::new(),
        space: Vec::new(),
    }
}

/// The module image as the download has it: its digest, labels, size in a storage and
/// imageroot (from the layer file, or the private storage's podman).
async fn read_image(shared: &SharedImages, module_url: &str) -> Result<ImageFacts, String> {
    let podman = shared
        .private
        .clone()
        .ok_or("the download has no storage")?;
    let info = match &shared.module {
        Some(module) => module.info.clone(),
        None => {
            // Left for the instances to pull: the plan pulls it into the private storage.
            podman
                .pull(&[module_url])
                .await
                .map_err(|e| e.to_string())?;
            podman
                .inspect(&[module_url])
                .await
                .map_err(|e| e.to_string())?
                .pop()
                .ok_or("podman returned nothing")?
        }
    };
    let size = podman
        .output(&[
            "image",
            "inspect",
            "--format",
            "{{.Size}}",
            "--",
            module_url,
        ])
        .await
        .map_err(|e| e.to_string())?;
    let storage_bytes = String::from_utf8_lossy(&size).trim().parse().unwrap_or(0);
    let label = info
        .labels
        .get("org.nethserver.imageroot")
        .map(String::as_str);
    let prefix = crate::engine::extract::imageroot_prefix(label).map_err(|e| e.to_string())?;
    let layer = shared.module.as_ref().and_then(|m| m.layer.clone());
    let source = match (layer, Source::saved_layer(module_url, &info)) {
        (Some(path), _) => Source::LayerFile { path },
        (None, Some(saved)) => saved,
        (None, None) => Source::Export {
            container: podman.create(module_url).await.map_err(|e| e.to_string())?,
        },
    };
    let tree = {
        let (source, podman) = (source.clone(), podman.clone());
        tokio::task::spawn_blocking(move || {
            let stream = source.open(&podman).map_err(|e| e.to_string())?;
            NewTree::read(stream, &prefix).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    };
    if let Source::Export { container } = &source {
        let _ = podman.remove_container(container).await;
    }
    Ok(ImageFacts {
        digest: info.digest,
        labels: info.labels,
        storage_bytes,
        tree: tree?,
    })
}
