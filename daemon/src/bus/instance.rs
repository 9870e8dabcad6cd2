//! `org.nethserver.ModuleUpdater.Instance` at `/org/nethserver/ModuleUpdater/instance/<label>`,
//! one object per module instance on the node, and [`Instances`], which keeps the published set
//! in step with the node: objects come and go (InterfacesAdded/Removed through the
//! ObjectManager) and changed properties are announced with PropertiesChanged.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use module_updater_dbus::types::{InstanceState, repository_and_tag};
use module_updater_dbus::{INSTANCE_INTERFACE, instance_path};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, Variant};

use crate::jobs::{Jobs, job_path};

/// How often the published instances are compared with the node even when the daemon did
/// nothing (an instance added or an environment changed by someone else shows within this).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// What an instance object shows; compared as a whole to find what changed.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    id: String,
    module: String,
    image_url: String,
    image_digest: String,
    version: String,
    rootless: bool,
    uid: u32,
    state: InstanceState,
    job: OwnedObjectPath,
    last_update: String,
}

impl InstanceView {
    /// The properties as (name, value), in introspection order.
    fn properties(&self) -> Vec<(&'static str, Variant<'_>)> {
        vec![
            ("Id", Variant::from(self.id.as_str())),
            ("Module", Variant::from(self.module.as_str())),
            ("ImageUrl", Variant::from(self.image_url.as_str())),
            ("ImageDigest", Variant::from(self.image_digest.as_str())),
            ("Version", Variant::from(self.version.as_str())),
            ("Rootless", Variant::from(self.rootless)),
            ("Uid", Variant::from(self.uid)),
            ("State", Variant::from(self.state.as_str())),
            ("Job", Variant::from(self.job.as_ref())),
            ("LastUpdate", Variant::from(self.last_update.as_str())),
        ]
    }
}

/// The views of every instance on the node now (blocking file reads: call off the runtime).
fn views(jobs: &Jobs) -> BTreeMap<String, InstanceView> {
    jobs.instances()
        .list()
        .iter()
        .map(|found| {
            let instance = &found.instance;
            let url = found.environment.get("IMAGE_URL").unwrap_or_default();
            let (repository, tag) = repository_and_tag(url);
            let (state, job) = jobs.instance_state(&instance.id);
            let job = path(job.map_or_else(|| "/".to_owned(), job_path));
            let last_update = jobs
                .history()
                .latest(&instance.id)
                .and_then(|entry| serde_json::to_string(&entry).ok())
                .unwrap_or_else(|| "{}".to_owned());
            let view = InstanceView {
                id: instance.id.clone(),
                module: repository.to_owned(),
                image_url: url.to_owned(),
                image_digest: found
                    .environment
                    .get("IMAGE_DIGEST")
                    .unwrap_or_default()
                    .to_owned(),
                version: tag.to_owned(),
                rootless: instance.rootless,
                uid: instance.uid,
                state,
                job,
                last_update,
            };
            (instance.id.clone(), view)
        })
        .collect()
}

fn path(text: String) -> OwnedObjectPath {
    // Built from constants and escaped labels: always valid.
    OwnedObjectPath::try_from(text)
        .unwrap_or_else(|_| OwnedObjectPath::from(zbus::ObjectPath::from_static_str_unchecked("/")))
}

/// The published instance objects.
#[derive(Default)]
pub struct Instances {
    published: BTreeMap<String, InstanceView>,
}

impl Instances {
    /// Compares the node's instances with the published objects: adds, removes and updates
    /// objects, announcing each change. Failures are logged; the next refresh tries again.
    pub async fn refresh(&mut self, connection: &Connection, jobs: &Arc<Jobs>) {
        let reader = Arc::clone(jobs);
        let Ok(now) = tokio::task::spawn_blocking(move || views(&reader)).await else {
            return;
        };
        let server = connection.object_server();
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Err(err) = server
                .remove::<InstanceObject, _>(instance_path(&id).as_str())
                .await
            {
                log::warn!("cannot remove the object of instance {id}: {err}");
            }
            self.published.remove(&id);
        }
        for (id, view) in now {
            let object = instance_path(&id);
            match self.published.get(&id) {
                None => {
                    // `at` fails after adding the object when InterfacesAdded cannot be sent.
                    if let Err(err) = server
                        .at(object.as_str(), InstanceObject { view: view.clone() })
                        .await
                    {
                        log::warn!("cannot announce the object of instance {id}: {err}");
                    }
                }
                Some(before) if *before != view => {
                    if let Err(err) = update(connection, &object, before, &view).await {
                        log::warn!("cannot update the object of instance {id}: {err}");
                    }
                }
                Some(_) => continue,
            }
            self.published.insert(id, view);
        }
    }
}

/// Puts `view` into the object at `object` and sends PropertiesChanged with what differs from
/// `before`.
async fn update(
    connection: &Connection,
    object: &str,
    before: &InstanceView,
    view: &InstanceView,
) -> zbus::Result<()> {
    let iface = connection
        .object_server()
        .interface::<_, InstanceObject>(object)
        .await?;
    iface.get_mut().await.view = view.clone();
    let old: HashMap<&str, Variant<'_>> = before.properties().into_iter().collect();
    let changed: HashMap<&str, Variant<'_>> = view
        .properties()
        .into_iter()
        .filter(|(name, value)| old.get(name) != Some(value))
        .collect();
    let emitter = SignalEmitter::new(connection, object)?;
    let interface = zbus::names::InterfaceName::try_from(INSTANCE_INTERFACE)?;
    let invalidated: &[&str] = &[];
    zbus::fdo::Properties::properties_changed(&emitter, interface, changed, invalidated.into())
        .await
}

pub struct InstanceObject {
    view: InstanceView,
}

#[zbus::interface(name = "org.nethserver.ModuleUpdater.Instance")]
impl InstanceObject {
    #[zbus(property(emits_changed_signal = "const"))]
    async fn id(&self) -> String {
        self.view.id.clone()
    }

    #[zbus(property)]
    async fn module(&self) -> String {
        self.view.module.clone()
    }

    #[zbus(property)]
    async fn image_url(&self) -> String {
        self.view.image_url.clone()
    }

    #[zbus(property)]
    async fn image_digest(&self) -> String {
        self.view.image_digest.clone()
    }

    #[zbus(property)]
    async fn version(&self) -> String {
        self.view.version.clone()
    }

    #[zbus(property)]
    async fn rootless(&self) -> bool {
        self.view.rootless
    }

    #[zbus(property)]
    async fn uid(&self) -> u32 {
        self.view.uid
    }

    #[zbus(property)]
    async fn state(&self) -> String {
        self.view.state.as_str().to_owned()
    }

    #[zbus(property)]
    async fn job(&self) -> OwnedObjectPath {
        self.view.job.clone()
    }

    #[zbus(property)]
    async fn last_update(&self) -> String {
        self.view.last_update.clone()
    }
}
