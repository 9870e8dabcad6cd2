//! `org.nethserver.ModuleUpdater` at `/org/nethserver/ModuleUpdater`.

use std::collections::HashMap;
use std::sync::Arc;

use module_updater_dbus::{Error, FEATURES};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectServer, OwnedObjectPath};

use super::CallError;
use super::authority::{self, Action};
use super::job::JobObject;
use crate::engine::kept;
use crate::jobs::{Jobs, SubmitError, job_path};
use crate::request;
use crate::updates::{Installed, UpdateCache};

pub struct Manager {
    pub jobs: Arc<Jobs>,
    pub updates: Arc<UpdateCache>,
}

fn no_such_instance(id: &str) -> Error {
    Error::NoSuchInstance(format!(
        "no module instance {id:?} on this node (see ListInstances)"
    ))
}

fn object_path(path: String) -> OwnedObjectPath {
    // Job paths are built from a number under a constant prefix: always valid.
    OwnedObjectPath::try_from(path)
        .unwrap_or_else(|_| OwnedObjectPath::from(zbus::ObjectPath::from_static_str_unchecked("/")))
}

#[zbus::interface(name = "org.nethserver.ModuleUpdater")]
impl Manager {
    /// Checks the update-module request and starts a job for it.
    #[zbus(out_args("job"))]
    async fn update_module(
        &self,
        request: &str,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, CallError> {
        let (parsed, caller) = self.authorized(request, &header, connection).await?;
        // The free space a kept plan of this image measured, before any job exists.
        let no_room = self.jobs.space_refusals(&parsed).await;
        if !no_room.is_empty() {
            // The node's checks and a busy instance are said first, as the plan orders them.
            self.jobs.admit(&parsed)?;
            let busy = self.jobs.busy_instances(&parsed);
            if !busy.is_empty() {
                return Err(SubmitError::Busy(busy).into());
            }
            return Err(SubmitError::Invalid(no_room).into());
        }
        let id = self.jobs.submit(parsed, caller.uid)?;
        Ok(self.publish(id, server).await)
    }

    /// What `UpdateModule` with the same request would do to each instance, as JSON, without
    /// changing any: the same checks and refusals, the download (kept in the node's download
    /// area for the update that follows), files, scripts, steps, images removed, free space.
    #[zbus(out_args("plan"))]
    async fn plan_update(
        &self,
        request: &str,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &Connection,
    ) -> Result<String, CallError> {
        let (parsed, _) = self.authorized(request, &header, connection).await?;
        let plan = self.jobs.plan(parsed).await?;
        serde_json::to_string(&plan)
            .map_err(|e| Error::Failed(format!("cannot encode the plan: {e}")).into())
    }

    /// Rolls an instance back to its kept previous version (no registry needed) in a job.
    #[zbus(out_args("job"))]
    async fn rollback(
        &self,
        instance: &str,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, CallError> {
        self.kept_job(
            request::Action::Rollback,
            instance,
            header,
            connection,
            server,
        )
        .await
    }

    /// Drops what is kept of an instance's previous version, and its images, in a job.
    #[zbus(out_args("job"))]
    async fn prune_kept(
        &self,
        instance: &str,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] connection: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<OwnedObjectPath, CallError> {
        self.kept_job(request::Action::Prune, instance, header, connection, server)
            .await
    }

    /// Every instance: (id, image URL, `idle`, `updating` or `recovering`, the job holding it or `/`).
    #[zbus(out_args("instances"))]
    async fn list_instances(&self) -> Vec<(String, String, String, OwnedObjectPath)> {
        let jobs = Arc::clone(&self.jobs);
        let found = tokio::task::spawn_blocking(move || jobs.instances().list())
            .await
            .unwrap_or_default();
        // The instance objects follow what this call saw.
        self.jobs.instances_touched();
        found
            .iter()
            .map(|f| {
                let id = &f.instance.id;
                let url = f.environment.get("IMAGE_URL").unwrap_or_default();
                let (state, job) = self.jobs.instance_state(id);
                let job = object_path(job.map_or_else(|| "/".to_owned(), job_path));
                (id.clone(), url.to_owned(), state.as_str().to_owned(), job)
            })
            .collect()
    }

    /// `MODULE_ID`, the image keys of the instance's environment, `rootless`, `uid`, `state`,
    /// and `kept`: the image of the previous version a rollback goes back to (empty: none).
    #[zbus(out_args("instance"))]
    async fn get_instance(&self, id: &str) -> Result<HashMap<String, String>, CallError> {
        let jobs = Arc::clone(&self.jobs);
        let owned = id.to_owned();
        let (found, kept) = tokio::task::spawn_blocking(move || {
            let found = jobs.instances().find(&owned)?;
            let kept = kept::environment_as_root(&found.instance)
                .and_then(|env| env.get("IMAGE_URL").map(str::to_owned))
                .unwrap_or_default();
            Some((found, kept))
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| no_such_instance(id))?;
        let mut info: HashMap<String, String> = found
            .environment
            .iter()
            .filter(|(k, _)| {
                *k == "MODULE_ID"
                    || k.starts_with("IMAGE_")
                    || k.starts_with("PREV_")
                    || k.ends_with("_IMAGE")
            })
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let instance = &found.instance;
        info.insert("MODULE_ID".into(), instance.id.clone());
        info.insert("rootless".into(), instance.rootless.to_string());
        info.insert("uid".into(), instance.uid.to_string());
        let (state, _) = self.jobs.instance_state(&instance.id);
        info.insert("state".into(), state.as_str().to_owned());
        info.insert("kept".into(), kept);
        Ok(info)
    }

    /// The instance's finished updates, newest first, as a JSON array (kept across restarts and
    /// after their jobs are gone). An instance that no longer exists still has its history.
    #[zbus(out_args("history"))]
    async fn get_history(&self, instance: &str) -> Result<String, CallError> {
        let jobs = Arc::clone(&self.jobs);
        let owned = instance.to_owned();
        let entries = tokio::task::spawn_blocking(move || {
            let history = jobs.history();
            if history.exists(&owned) || jobs.instances().find(&owned).is_some() {
                Some(history.read(&owned))
            } else {
                None
            }
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| no_such_instance(instance))?;
        serde_json::to_string(&entries).map_err(|e| {
            Error::Failed(format!("cannot encode the history of {instance}: {e}")).into()
        })
    }

    /// For each instance (all when `instances` is empty): what it runs, the newest version above
    /// it in its repository, whether its tag moved in the registry, or why its registry could not
    /// be asked; the registries' answers are kept and their age said (RefreshUpdates asks again).
    #[zbus(out_args("updates"))]
    async fn list_updates(&self, instances: Vec<String>) -> Result<String, CallError> {
        self.updates_of(instances, false).await
    }

    /// ListUpdates after asking the registries again.
    #[zbus(out_args("updates"))]
    async fn refresh_updates(&self, instances: Vec<String>) -> Result<String, CallError> {
        self.updates_of(instances, true).await
    }

    /// Running jobs and finished ones still lingering.
    #[zbus(out_args("jobs"))]
    async fn list_jobs(&self) -> Vec<OwnedObjectPath> {
        self.jobs().await
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// Optional capabilities, for clients to test instead of the version.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn features(&self) -> Vec<String> {
        FEATURES.iter().map(|f| (*f).to_owned()).collect()
    }

    #[zbus(property)]
    async fn jobs(&self) -> Vec<OwnedObjectPath> {
        self.jobs
            .ids()
            .into_iter()
            .map(|id| object_path(job_path(id)))
            .collect()
    }

    #[zbus(signal)]
    pub async fn job_new(
        emitter: &SignalEmitter<'_>,
        job: zbus::ObjectPath<'_>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn job_finished(
        emitter: &SignalEmitter<'_>,
        job: zbus::ObjectPath<'_>,
        status: &str,
        exit_code: i32,
    ) -> zbus::Result<()>;
}

impl Manager {
    /// The request of `UpdateModule` and `PlanUpdate`, parsed and authorised alike. Its shape is
    /// checked first (a pure function, nothing of the node is read): polkit rules get its module
    /// URL and instances as details.
    async fn authorized(
        &self,
        request: &str,
        header: &zbus::message::Header<'_>,
        connection: &Connection,
    ) -> Result<(request::UpdateRequest, super::Caller), CallError> {
        let caller = super::caller(connection, header).await?;
        let parsed = request::parse(request).map_err(SubmitError::Invalid)?;
        let instances = parsed.instances.join(" ");
        let details = [
            ("module_url", parsed.module_url.as_str()),
            ("instances", instances.as_str()),
        ];
        authority::authorize(
            connection,
            header,
            caller,
            Action::UpdateModule,
            &details,
            None,
        )
        .await?;
        Ok((parsed, caller))
    }

    /// A rollback or prune job of one instance: authorised, refused for an unknown instance,
    /// for a rollback of which nothing is kept, and for a busy instance.
    async fn kept_job(
        &self,
        action: request::Action,
        instance: &str,
        header: zbus::message::Header<'_>,
        connection: &Connection,
        server: &ObjectServer,
    ) -> Result<OwnedObjectPath, CallError> {
        let caller = super::caller(connection, &header).await?;
        authority::authorize(
            connection,
            &header,
            caller,
            Action::Rollback,
            &[("instance", instance)],
            None,
        )
        .await?;
        let jobs = Arc::clone(&self.jobs);
        let owned = instance.to_owned();
        let found = tokio::task::spawn_blocking(move || jobs.instances().find(&owned))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| no_such_instance(instance))?;
        if action == request::Action::Rollback && !kept::exists(&found.instance) {
            return Err(Error::NothingKept(format!(
                "nothing is kept of a previous version of {instance}: it was not updated since keep_previous was on, or its previous version was pruned or rolled back to already"
            ))
            .into());
        }
        let request = request::UpdateRequest::for_instance(action, instance);
        let id = self.jobs.submit(request, caller.uid)?;
        Ok(self.publish(id, server).await)
    }

    /// Serves the object of job `id`, just submitted, and has the pump announce it. The job
    /// exists and runs: from here on nothing may turn the call into an error, so a job object
    /// that cannot be announced (InterfacesAdded) is still served.
    async fn publish(&self, id: u64, server: &ObjectServer) -> OwnedObjectPath {
        let path = object_path(job_path(id));
        if let Err(err) = server
            .at(&path, JobObject::new(id, Arc::clone(&self.jobs)))
            .await
        {
            log::warn!(MODULE_UPDATER_JOB = id; "cannot announce job {id} on the bus: {err}");
        }
        self.jobs.announce(id);
        path
    }

    async fn updates_of(&self, wanted: Vec<String>, refresh: bool) -> Result<String, CallError> {
        let jobs = Arc::clone(&self.jobs);
        let found = tokio::task::spawn_blocking(move || jobs.instances().list())
            .await
            .unwrap_or_default();
        let unknown: Vec<&String> = wanted
            .iter()
            .filter(|id| !found.iter().any(|f| &f.instance.id == *id))
            .collect();
        if let Some(id) = unknown.first() {
            return Err(no_such_instance(id).into());
        }
        let installed: Vec<Installed> = found
            .iter()
            .filter(|f| wanted.is_empty() || wanted.contains(&f.instance.id))
            .map(|f| Installed {
                id: f.instance.id.clone(),
                url: f
                    .environment
                    .get("IMAGE_URL")
                    .unwrap_or_default()
                    .to_owned(),
                digest: f
                    .environment
                    .get("IMAGE_DIGEST")
                    .unwrap_or_default()
                    .to_owned(),
            })
            .collect();
        let checked = self.updates.check(&installed, refresh).await;
        Ok(serde_json::json!({ "instances": checked }).to_string())
    }
}
