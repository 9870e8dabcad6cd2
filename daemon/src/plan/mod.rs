//! `PlanUpdate`: what an update-module request would do to each instance, computed from the new
//! image (read from the node's download area) and the instance as it is, without changing it.

pub mod space;
pub mod tree;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::engine::environment::Environment;
use crate::engine::imagename;
use crate::engine::instance::Instance;
use crate::engine::scripts::{BUILTIN_STEPS, PULL_STEP, SCRIPTS_STEP, merge_module_steps};
use crate::engine::update::{Generations, older_images, stale_images};
use crate::request::ValidationError;
use space::SpaceNeed;
use tree::{FileChanges, NewTree};

/// What the plan does for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Update,
    AlreadyInstalled,
    /// A check of the node refuses it (the reasons are in `refused`).
    Refused,
}

/// What the node learnt of the new image (downloaded once into its download area).
#[derive(Debug)]
pub struct ImageFacts {
    pub digest: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// What an instance's storage holds of it (uncompressed layers).
    pub storage_bytes: u64,
    pub tree: NewTree,
}

/// One image the node downloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Download {
    pub reference: String,
    pub bytes: u64,
}

/// The node's download, once for all its instances.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct NodeDownload {
    pub bytes: u64,
    pub images: Vec<Download>,
    /// Images left for each instance to pull, and why.
    pub pulled_by_instances: Vec<(String, String)>,
    /// Why the new image could not be read (the plan then has no files, scripts nor sizes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The plan of one instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstancePlan {
    pub instance: String,
    pub action: Action,
    /// Why it is refused, in NS8's validation-array form.
    pub refused: Vec<ValidationError>,
    pub old_url: Option<String>,
    pub old_digest: Option<String>,
    pub new_url: String,
    pub new_digest: Option<String>,
    /// What the instance's storage holds of the new image afterwards (0: it has it already).
    pub storage_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<FileChanges>,
    /// The steps of the `update-module` action, built-in and the module's, in order.
    pub steps: Vec<String>,
    /// The executables of `update-module.d/` the `50run_scriptdir` step runs, in order.
    pub scripts: Vec<String>,
    /// Every executable that runs, in order: the module's steps and the scripts.
    pub runs: Vec<String>,
    /// The images the cleanup removes from the instance's storage.
    pub images_removed: Vec<String>,
    /// Free space needed against what each filesystem has.
    pub space: Vec<SpaceNeed>,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub module_url: String,
    pub download: NodeDownload,
    pub instances: Vec<InstancePlan>,
    /// What `UpdateModule` would refuse the request with (empty: it would start a job).
    pub refused: Vec<ValidationError>,
}

/// Where an instance's images are stored: the user's default storage, or root's (or the
/// `--root` of the rootful podman options).
pub fn storage_dir(instance: &Instance, rootful_podman_args: &[String]) -> PathBuf {
    if instance.rootless {
        return instance.home.join(".local/share/containers/storage");
    }
    rootful_podman_args
        .iter()
        .position(|a| a == "--root")
        .and_then(|i| rootful_podman_args.get(i + 1))
        .map_or_else(
            || PathBuf::from("/var/lib/containers/storage"),
            PathBuf::from,
        )
}

/// What the update's stale-image cleanup will keep, which decides the plan's `images_removed`.
pub enum Cleanup {
    /// `keep_previous = false`: NS8's cleanup, every previous image the new environment no
    /// longer names.
    Ns8,
    /// The previous version is kept: only the images of the version kept before it go
    /// (`older`, none when nothing is kept yet).
    KeepPrevious { older: Option<Environment> },
}

/// Plans the update of one instance that needs the image (not already installed).
pub fn plan_instance(
    instance: &Instance,
    env: &Environment,
    module_url: &str,
    facts: Option<&ImageFacts>,
    storage: &Path,
    cleanup: &Cleanup,
) -> InstancePlan {
    let mut plan = InstancePlan {
        instance: instance.id.clone(),
        action: Action::Update,
        refused: Vec::new(),
        old_url: env.get("IMAGE_URL").map(str::to_owned),
        old_digest: env.get("IMAGE_DIGEST").map(str::to_owned),
        new_url: module_url.to_owned(),
        new_digest: None,
        storage_bytes: 0,
        files: None,
        steps: Vec::new(),
        scripts: Vec::new(),
        runs: Vec::new(),
        images_removed: Vec::new(),
        space: Vec::new(),
    };
    // The steps before the pull come from the installed tree, those after it from the new one.
    let before = installed_executables(&instance.install_dir.join("actions/update-module"));
    let first: Vec<String> = merge_module_steps(&BUILTIN_STEPS, before)
        .iter()
        .map(|s| s.name().into_owned())
        .filter(|n| n.as_str() <= PULL_STEP)
        .collect();
    let Some(facts) = facts else {
        plan.steps = first;
        return plan;
    };
    plan.new_digest = Some(facts.digest.clone());
    let files = tree::compare(&facts.tree, &instance.install_dir);
    let after: Vec<PathBuf> = facts
        .tree
        .executables_in("actions/update-module")
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let later: Vec<String> = merge_module_steps(&BUILTIN_STEPS, after)
        .iter()
        .map(|s| s.name().into_owned())
        .filter(|n| n.as_str() > PULL_STEP)
        .collect();
    plan.scripts = facts.tree.executables_in("update-module.d");
    plan.steps = first.into_iter().chain(later).collect();
    plan.runs = plan
        .steps
        .iter()
        .flat_map(|step| {
            if step == SCRIPTS_STEP {
                plan.scripts.clone()
            } else if BUILTIN_STEPS.contains(&step.as_str()) {
                Vec::new()
            } else {
                vec![step.clone()]
            }
        })
        .collect();
    let after = environment_after(env, module_url, facts);
    plan.images_removed = match cleanup {
        Cleanup::Ns8 => stale_images(&after),
        Cleanup::KeepPrevious { older } => older_images(
            &after,
            &Generations {
                kept: env,
                older: older.as_ref(),
            },
        ),
    };
    plan.storage_bytes = if plan.old_digest.as_deref() == Some(facts.digest.as_str()) {
        0
    } else {
        facts.storage_bytes
    };
    // The extraction stages every file it writes in the install dir before it replaces the
    // old one: the added and changed files' bytes are needed there at once.
    let staged: u64 = files
        .added
        .iter()
        .chain(&files.changed)
        .filter_map(|p| match facts.tree.entries.get(p) {
            Some(tree::NewEntry::File { size, .. }) => Some(*size),
            _ => None,
        })
        .sum();
    plan.space = space::needs(&[
        ("storage", storage, plan.storage_bytes),
        ("install", &instance.install_dir, staged),
    ]);
    plan.files = Some(files);
    plan
}

/// The executables of an installed directory, as the update lists them.
fn installed_executables(dir: &Path) -> Vec<PathBuf> {
    crate::engine::scripts::list_executables(dir)
        .map(|l| l.runnable)
        .unwrap_or_default()
}

/// The environment as the update leaves it: the image keys set, their previous values in
/// `PREV_` keys (`engine/update/environment.rs`).
fn environment_after(env: &Environment, module_url: &str, facts: &ImageFacts) -> Environment {
    let mut after = env.clone();
    let mut set = |key: &str, value: &str| {
        if let Some(old) = env.get(key) {
            let _ = after.set(format!("PREV_{key}"), old);
        } else {
            after.remove(&format!("PREV_{key}"));
        }
        let _ = after.set(key, value);
    };
    set("IMAGE_URL", module_url);
    set("IMAGE_DIGEST", &facts.digest);
    let label = facts
        .labels
        .get(crate::engine::skopeo::IMAGES_LABEL)
        .map_or("", String::as_str);
    for url in label.split_whitespace() {
        if let Ok(name) = imagename::image_name_from_url(url) {
            set(&imagename::image_env_var(name), url);
        }
    }
    after
}
