//! The node's instances, kept in memory and checked against the file system on every call.
//!
//! Discovery from scratch costs a user lookup per home directory and a read and parse of every
//! environment file, paid by every `ListInstances`, `GetInstance` and `UpdateModule` (the
//! measurements are in docs/benchmarks.md). The cache keeps what it
//! found and, on every call, lists the two base directories again and `lstat`s each candidate's
//! environment file. A file is read and parsed again only when its identity changed (device,
//! inode, size, mtime and ctime to the nanosecond, owner, mode); users are looked up again only
//! when `/etc/passwd` or `/etc/nsswitch.conf` changed, or for a name not seen before. An answer
//! is therefore as fresh as a full discovery (an instance `add-module` just created, an
//! `IMAGE_URL` an update or NS8's agent just wrote, a removed user) for about one `lstat` per
//! instance.
//!
//! Why not inotify: the state files live below directories the instance users own and may
//! replace (`~/.config`, `~/.config/state`), so watches would be needed on every component of
//! every path, re-armed when a component is replaced, with a queue that can overflow and a window
//! between arming and reading; a stat per instance is a few microseconds and has none of that.
//!
//! Racy entries: file timestamps come from a coarse clock (one jiffy; a second on some file
//! systems), so a file rewritten in place with the same size within the same tick as our read
//! keeps its identity. As git does for its index, an entry whose ctime is within
//! [`RACY_MARGIN`] of the time it was read is not trusted: it is read again on every call until it
//! is older than that. The same holds for the user database files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nix::unistd::User;

use super::environment::{Environment, FileIdentity, read_owned};
use super::instance::{Bases, Instance, plausible_id};

/// How recent a file's ctime may be, relative to when it was read, for the read to be trusted
/// as long as the file's identity stays the same. Above the coarsest timestamp granularity of
/// the file systems a node may use (one second), with room for the coarse clock's lag.
pub const RACY_MARGIN: Duration = Duration::from_secs(2);

/// The files whose change may change what a user lookup answers.
const USER_DATABASE: [&str; 2] = ["/etc/passwd", "/etc/nsswitch.conf"];

/// An instance as the cache found it, with its environment file as read.
#[derive(Debug)]
pub struct Found {
    pub instance: Instance,
    pub environment: Environment,
}

/// What a user lookup tells about a name: its uid, gid and home.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UserEntry {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// A user lookup: `Ok(None)` when there is no such user, `Err` when the lookup itself failed
/// (not remembered: the next call asks again).
type Lookup = Box<dyn Fn(&str) -> Result<Option<UserEntry>, ()> + Send + Sync>;

/// The users' source: the files that, when changed, make every remembered lookup stale.
struct UserDatabase {
    files: Vec<PathBuf>,
    lookup: Lookup,
}

impl UserDatabase {
    fn system() -> UserDatabase {
        UserDatabase {
            files: USER_DATABASE.iter().map(PathBuf::from).collect(),
            lookup: Box::new(|name| {
                User::from_name(name)
                    .map(|user| {
                        user.map(|u| UserEntry {
                            uid: u.uid.as_raw(),
                            gid: u.gid.as_raw(),
                            home: u.dir,
                        })
                    })
                    .map_err(|_| ())
            }),
        }
    }
}

/// One candidate directory (a home, or a rootful instance dir) and what its environment file
/// made of it when last read.
struct Entry {
    /// `<state dir>/environment`.
    env_path: PathBuf,
    /// The uid and gid the entry was built for (rootless: the user's; rootful: 0).
    uid: u32,
    gid: u32,
    identity: FileIdentity,
    /// Read too soon after the file's last change to be trusted next time (see module docs).
    racy: bool,
    /// The instance, or `None` when the file does not make the directory one.
    found: Option<Arc<Found>>,
    /// The call that last saw the entry; entries not seen by a call are dropped.
    seen: u64,
}

#[derive(Default)]
struct Inner {
    /// Identity of the user database files when the remembered lookups were made, and whether
    /// that was too soon after one of them changed.
    user_database: Option<(Vec<Option<FileIdentity>>, bool)>,
    /// Name -> the rootless identity it resolves to (`None`: not a rootless instance's user),
    /// and the call that last needed it.
    users: HashMap<String, (Option<(u32, u32)>, u64)>,
    rootless: HashMap<String, Entry>,
    rootful: HashMap<String, Entry>,
    calls: u64,
    /// Environment files parsed and users looked up since creation (for tests).
    parses: u64,
    lookups: u64,
}

/// The cached instance list. Safe to share between threads; every call does blocking file
/// system work (run it in `spawn_blocking` from async code).
pub struct InstanceCache {
    bases: Bases,
    users: UserDatabase,
    margin: Duration,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for InstanceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceCache")
            .field("bases", &self.bases)
            .finish_non_exhaustive()
    }
}

impl InstanceCache {
    /// An empty cache of the instances below `bases`; the first call discovers them.
    pub fn new(bases: Bases) -> InstanceCache {
        InstanceCache::with(bases, UserDatabase::system(), RACY_MARGIN)
    }

    fn with(bases: Bases, users: UserDatabase, margin: Duration) -> InstanceCache {
        InstanceCache {
            bases,
            users,
            margin,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn bases(&self) -> &Bases {
        &self.bases
    }

    /// Every instance on the node, sorted by id, as a discovery from scratch would find them now.
    pub fn list(&self) -> Vec<Arc<Found>> {
        self.list_at(SystemTime::now())
    }

    /// The instance with this id, if there is one now.
    pub fn find(&self, id: &str) -> Option<Arc<Found>> {
        if !plausible_id(id) {
            return None;
        }
        self.list().into_iter().find(|f| f.instance.id == id)
    }

    /// Every instance on the node, sorted by id (see [`InstanceCache::list`]).
    pub fn instances(&self) -> Vec<Instance> {
        self.list().iter().map(|f| f.instance.clone()).collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            // A panic mid-refresh may have left the maps half updated: start over from scratch.
            Err(poisoned) => {
                let mut guard = poisoned.into_inner();
                *guard = Inner::default();
                guard
            }
        }
    }

    /// [`InstanceCache::list`] with `now` as the time of the call (tests move it on so that no
    /// file they just wrote counts as racy).
    fn list_at(&self, now: SystemTime) -> Vec<Arc<Found>> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.calls += 1;
        let call = inner.calls;
        self.check_user_database(inner, now);

        let mut found: Vec<Arc<Found>> = Vec::new();
        for name in dir_names(&self.bases.home) {
            let Some((uid, gid)) = self.rootless_user(inner, &name, call) else {
                continue;
            };
            let kind = Kind::Rootless { uid, gid };
            if let Some(instance) = self.entry(inner, kind, name, now, call) {
                found.push(instance);
            }
        }
        let rootless = found.len();
        for name in dir_names(&self.bases.rootful) {
            // A rootless instance wins over a rootful directory of the same name.
            if found[..rootless].iter().any(|f| f.instance.id == name) {
                continue;
            }
            if let Some(instance) = self.entry(inner, Kind::Rootful, name, now, call) {
                found.push(instance);
            }
        }
        inner.rootless.retain(|_, e| e.seen == call);
        inner.rootful.retain(|_, e| e.seen == call);
        inner.users.retain(|_, (_, seen)| *seen == call);
        found.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
        found
    }

    /// Forgets every remembered user lookup when the user database changed since they were made.
    fn check_user_database(&self, inner: &mut Inner, now: SystemTime) {
        let identities: Vec<Option<FileIdentity>> = self
            .users
            .files
            .iter()
            .map(|f| std::fs::metadata(f).ok().map(|m| FileIdentity::of(&m)))
            .collect();
        let unchanged = matches!(
            &inner.user_database,
            Some((known, false)) if *known == identities
        );
        if !unchanged {
            let racy = identities
                .iter()
                .flatten()
                .any(|i| i.racy(now, self.margin));
            inner.users.clear();
            inner.user_database = Some((identities, racy));
        }
    }

    /// The uid and gid of `name` if it is a user whose home is `<home base>/<name>` (not root).
    fn rootless_user(&self, inner: &mut Inner, name: &str, call: u64) -> Option<(u32, u32)> {
        if let Some((user, seen)) = inner.users.get_mut(name) {
            *seen = call;
            return *user;
        }
        inner.lookups += 1;
        // A failed lookup is not remembered: the next call asks again.
        let entry = (self.users.lookup)(name).ok()?;
        let user = entry
            .filter(|u| u.uid != 0 && u.home == self.bases.home.join(name))
            .map(|u| (u.uid, u.gid));
        inner.users.insert(name.to_owned(), (user, call));
        user
    }

    /// The instance the candidate `name` of `kind` is now, from the cache when its environment
    /// file is the one read last time.
    fn entry(
        &self,
        inner: &mut Inner,
        kind: Kind,
        name: String,
        now: SystemTime,
        call: u64,
    ) -> Option<Arc<Found>> {
        let (uid, gid) = kind.owner();
        let map = match kind {
            Kind::Rootless { .. } => &mut inner.rootless,
            Kind::Rootful => &mut inner.rootful,
        };
        if let Some(entry) = map.get_mut(&name)
            && entry.uid == uid
            && entry.gid == gid
            && !entry.racy
        {
            // lstat, as the read opens without following a final symlink.
            match std::fs::symlink_metadata(&entry.env_path) {
                Ok(meta) if FileIdentity::of(&meta) == entry.identity => {
                    entry.seen = call;
                    return entry.found.clone();
                }
                Ok(_) => {}
                // Gone (or unreachable): not an instance now; the entry is dropped at the end.
                Err(_) => return None,
            }
        }

        let (home, install_dir) = match kind {
            Kind::Rootless { .. } => {
                let home = self.bases.home.join(&name);
                let install_dir = home.join(".config");
                (home, install_dir)
            }
            Kind::Rootful => {
                let install_dir = self.bases.rootful.join(&name);
                (install_dir.clone(), install_dir)
            }
        };
        let state_dir = install_dir.join("state");
        let env_path = state_dir.join("environment");
        let Some(read) = read_owned(&env_path, uid) else {
            map.remove(&name);
            return None;
        };
        let found = read.environment.and_then(|environment| {
            inner.parses += 1;
            (environment.get("MODULE_ID") == Some(name.as_str())).then(|| {
                Arc::new(Found {
                    instance: Instance {
                        rootless: matches!(kind, Kind::Rootless { .. }),
                        uid,
                        gid,
                        runtime_dir: match kind {
                            Kind::Rootless { .. } => {
                                Some(PathBuf::from(format!("/run/user/{uid}")))
                            }
                            Kind::Rootful => None,
                        },
                        home,
                        install_dir,
                        state_dir,
                        id: name.clone(),
                    },
                    environment,
                })
            })
        });
        let racy = read.identity.racy(now, self.margin);
        let map = match kind {
            Kind::Rootless { .. } => &mut inner.rootless,
            Kind::Rootful => &mut inner.rootful,
        };
        map.insert(
            name,
            Entry {
                env_path,
                uid,
                gid,
                identity: read.identity,
                racy,
                found: found.clone(),
                seen: call,
            },
        );
        found
    }

    /// How many environment files were parsed and users looked up so far.
    #[cfg(test)]
    fn counts(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.parses, inner.lookups)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Rootless { uid: u32, gid: u32 },
    Rootful,
}

impl Kind {
    /// Who must own the environment file, and the identity the instance's work runs under.
    fn owner(self) -> (u32, u32) {
        match self {
            Kind::Rootless { uid, gid } => (uid, gid),
            Kind::Rootful => (0, 0),
        }
    }
}

/// The names below `base` that may be instance ids (any other entry cannot be one).
fn dir_names(base: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| plausible_id(name))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, chown};

    /// A node in a temp dir: a home base, a rootful base and a passwd-like file
    /// (`name:uid:gid:home` lines) that the cache's user lookup reads.
    struct Node {
        dir: tempfile::TempDir,
    }

    impl Node {
        fn new() -> Node {
            let node = Node {
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::create_dir(node.home()).unwrap();
            std::fs::create_dir(node.rootful()).unwrap();
            std::fs::write(node.passwd(), "").unwrap();
            node
        }

        fn home(&self) -> PathBuf {
            self.dir.path().join("home")
        }

        fn rootful(&self) -> PathBuf {
            self.dir.path().join("rootful")
        }

        fn passwd(&self) -> PathBuf {
            self.dir.path().join("passwd")
        }

        fn bases(&self) -> Bases {
            Bases {
                home: self.home(),
                rootful: self.rootful(),
            }
        }

        fn users(&self) -> UserDatabase {
            let passwd = self.passwd();
            UserDatabase {
                files: vec![passwd.clone()],
                lookup: Box::new(move |name| {
                    let text = std::fs::read_to_string(&passwd).map_err(|_| ())?;
                    Ok(text.lines().find_map(|line| {
                        let f: Vec<&str> = line.split(':').collect();
                        (f[0] == name).then(|| UserEntry {
                            uid: f[1].parse().unwrap(),
                            gid: f[2].parse().unwrap(),
                            home: PathBuf::from(f[3]),
                        })
                    }))
                }),
            }
        }

        fn cache(&self, margin: Duration) -> InstanceCache {
            InstanceCache::with(self.bases(), self.users(), margin)
        }

        /// Adds a user whose home is `<home>/<name>`, as useradd would (a new passwd file).
        fn add_user(&self, name: &str, uid: u32) {
            let mut text = std::fs::read_to_string(self.passwd()).unwrap();
            text.push_str(&format!(
                "{name}:{uid}:{uid}:{}\n",
                self.home().join(name).display()
            ));
            replace(&self.passwd(), &text);
        }

        fn remove_user(&self, name: &str) {
            let text: String = std::fs::read_to_string(self.passwd())
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with(&format!("{name}:")))
                .map(|l| format!("{l}\n"))
                .collect();
            replace(&self.passwd(), &text);
        }

        /// A rootless instance: user, home and an environment file owned by the user.
        fn rootless(&self, name: &str, uid: u32, env: &str) -> PathBuf {
            self.add_user(name, uid);
            let state = self.home().join(name).join(".config/state");
            std::fs::create_dir_all(&state).unwrap();
            let file = state.join("environment");
            std::fs::write(&file, env).unwrap();
            chown(&file, Some(uid), Some(uid)).unwrap();
            file
        }

        fn rootful_instance(&self, name: &str, env: &str) -> PathBuf {
            let state = self.rootful().join(name).join("state");
            std::fs::create_dir_all(&state).unwrap();
            let file = state.join("environment");
            std::fs::write(&file, env).unwrap();
            file
        }
    }

    /// Replaces a file by a rename, as NS8's agent and useradd do (a new inode).
    fn replace(path: &Path, text: &str) {
        let meta = std::fs::metadata(path).ok();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        if let Some(meta) = meta {
            chown(&tmp, Some(meta.uid()), Some(meta.gid())).unwrap();
        }
        std::fs::rename(&tmp, path).unwrap();
    }

    /// Far enough ahead that nothing these tests wrote counts as racy.
    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    fn ids(found: &[Arc<Found>]) -> Vec<&str> {
        found.iter().map(|f| f.instance.id.as_str()).collect()
    }

    fn image_urls(found: &[Arc<Found>]) -> BTreeMap<String, String> {
        found
            .iter()
            .map(|f| {
                let url = f.environment.get("IMAGE_URL").unwrap_or_default();
                (f.instance.id.clone(), url.to_owned())
            })
            .collect()
    }

    /// Discovery from scratch as it was before the cache (the reference the cache must agree
    /// with), with the same user lookup.
    fn reference(node: &Node) -> Vec<Instance> {
        let users = node.users();
        let bases = node.bases();
        let read = |path: &Path, uid: u32| -> Option<Environment> {
            let meta = std::fs::symlink_metadata(path).ok()?;
            if !meta.is_file()
                || meta.uid() != uid
                || meta.len() > super::super::environment::MAX_ENVIRONMENT_SIZE
            {
                return None;
            }
            Some(Environment::parse(&std::fs::read_to_string(path).ok()?))
        };
        let mut found: Vec<Instance> = Vec::new();
        for name in dir_names(&bases.home) {
            let Some(user) = (users.lookup)(&name).unwrap() else {
                continue;
            };
            let home = bases.home.join(&name);
            if user.home != home || user.uid == 0 {
                continue;
            }
            let state_dir = home.join(".config/state");
            let Some(env) = read(&state_dir.join("environment"), user.uid) else {
                continue;
            };
            if env.get("MODULE_ID") == Some(name.as_str()) {
                found.push(Instance {
                    id: name.clone(),
                    rootless: true,
                    uid: user.uid,
                    gid: user.gid,
                    runtime_dir: Some(PathBuf::from(format!("/run/user/{}", user.uid))),
                    install_dir: home.join(".config"),
                    home,
                    state_dir,
                });
            }
        }
        for name in dir_names(&bases.rootful) {
            if found.iter().any(|i| i.id == name) {
                continue;
            }
            let install_dir = bases.rootful.join(&name);
            let state_dir = install_dir.join("state");
            let Some(env) = read(&state_dir.join("environment"), 0) else {
                continue;
            };
            if env.get("MODULE_ID") == Some(name.as_str()) {
                found.push(Instance {
                    id: name.clone(),
                    rootless: false,
                    uid: 0,
                    gid: 0,
                    home: install_dir.clone(),
                    install_dir,
                    state_dir,
                    runtime_dir: None,
                });
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    fn instances(found: &[Arc<Found>]) -> Vec<Instance> {
        found.iter().map(|f| f.instance.clone()).collect()
    }

    #[test]
    fn finds_what_discovery_from_scratch_finds() {
        let node = Node::new();
        node.rootless(
            "mail1",
            2001,
            "MODULE_ID=mail1\nIMAGE_URL=ghcr.io/x/mail:1\n",
        );
        node.rootless("web2", 2002, "IMAGE_URL=ghcr.io/x/web:1\nMODULE_ID=web2\n");
        node.rootful_instance("crowdsec1", "MODULE_ID=crowdsec1\n");
        // A rootful dir named like a rootless instance: the rootless one wins.
        node.rootful_instance("mail1", "MODULE_ID=mail1\n");
        // Not instances: wrong MODULE_ID; a user whose home is elsewhere; a home without a user;
        // a file owned by someone else; a symlinked environment; a FIFO; a name that is no id.
        node.rootless("wrong3", 2003, "MODULE_ID=other3\n");
        let mut text = std::fs::read_to_string(node.passwd()).unwrap();
        text.push_str("away4:2004:2004:/elsewhere/away4\nroot0:0:0:");
        text.push_str(&format!("{}\n", node.home().join("root0").display()));
        replace(&node.passwd(), &text);
        for name in ["away4", "root0"] {
            let state = node.home().join(name).join(".config/state");
            std::fs::create_dir_all(&state).unwrap();
            std::fs::write(state.join("environment"), format!("MODULE_ID={name}\n")).unwrap();
        }
        std::fs::create_dir_all(node.home().join("nouser5/.config/state")).unwrap();
        std::fs::write(
            node.home().join("nouser5/.config/state/environment"),
            "MODULE_ID=nouser5\n",
        )
        .unwrap();
        let foreign = node.rootless("foreign6", 2006, "MODULE_ID=foreign6\n");
        chown(&foreign, Some(2999), None).unwrap();
        let target = node.dir.path().join("target");
        std::fs::write(&target, "MODULE_ID=evil7\n").unwrap();
        let state = node.rootful().join("evil7/state");
        std::fs::create_dir_all(&state).unwrap();
        std::os::unix::fs::symlink(&target, state.join("environment")).unwrap();
        let state = node.rootful().join("fifo8/state");
        std::fs::create_dir_all(&state).unwrap();
        nix::unistd::mkfifo(
            &state.join("environment"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        node.rootful_instance("Upper9", "MODULE_ID=Upper9\n");

        let cache = node.cache(RACY_MARGIN);
        let first = cache.list();
        assert_eq!(ids(&first), ["crowdsec1", "mail1", "web2"]);
        assert_eq!(instances(&first), reference(&node));
        let mail = &first[1].instance;
        assert!(mail.rootless);
        assert_eq!((mail.uid, mail.gid), (2001, 2001));
        assert_eq!(mail.state_dir, node.home().join("mail1/.config/state"));
        assert_eq!(mail.runtime_dir, Some(PathBuf::from("/run/user/2001")));
        assert!(!first[0].instance.rootless);
        assert_eq!(first[0].instance.runtime_dir, None);
        // The second answer, from the cache, is the same.
        assert_eq!(instances(&cache.list_at(later())), reference(&node));
        assert_eq!(
            cache.instances(),
            reference(&node),
            "instances() is list()'s instances"
        );
        assert!(cache.find("../mail1").is_none());
        assert!(cache.find("wrong3").is_none());
        assert_eq!(cache.find("web2").unwrap().instance.uid, 2002);
    }

    #[test]
    fn unchanged_instances_are_not_read_again() {
        let node = Node::new();
        for n in 1..=20 {
            node.rootless(&format!("app{n}"), 3000 + n, &format!("MODULE_ID=app{n}\n"));
        }
        node.rootful_instance("sys1", "MODULE_ID=sys1\n");
        let cache = node.cache(RACY_MARGIN);
        assert_eq!(cache.list_at(later()).len(), 21);
        assert_eq!(cache.counts(), (21, 20));
        for _ in 0..5 {
            assert_eq!(cache.list_at(later()).len(), 21);
            assert!(cache.find("app7").is_some());
        }
        assert_eq!(
            cache.counts(),
            (21, 20),
            "nothing changed: no parse, no user lookup"
        );
    }

    #[test]
    fn a_new_instance_appears_and_only_it_is_read() {
        let node = Node::new();
        node.rootless("app1", 3001, "MODULE_ID=app1\n");
        node.rootful_instance("sys1", "MODULE_ID=sys1\n");
        let cache = node.cache(RACY_MARGIN);
        assert_eq!(ids(&cache.list_at(later())), ["app1", "sys1"]);
        assert_eq!(cache.counts(), (2, 1));

        // add-module: a user (passwd changes), then its home and environment.
        node.rootless("app2", 3002, "MODULE_ID=app2\nIMAGE_URL=x/app:1\n");
        node.rootful_instance("sys2", "MODULE_ID=sys2\n");
        let now = cache.list_at(later());
        assert_eq!(ids(&now), ["app1", "app2", "sys1", "sys2"]);
        assert_eq!(image_urls(&now)["app2"], "x/app:1");
        // Only the new files were parsed; passwd changed, so both users were looked up again.
        assert_eq!(cache.counts(), (4, 3));
        assert_eq!(instances(&now), reference(&node));
    }

    #[test]
    fn a_changed_environment_is_seen_at_once() {
        let node = Node::new();
        let file = node.rootless("app1", 3001, "MODULE_ID=app1\nIMAGE_URL=x/app:1.0\n");
        let other = node.rootful_instance("sys1", "MODULE_ID=sys1\nIMAGE_URL=x/sys:1.0\n");
        let cache = node.cache(RACY_MARGIN);
        assert_eq!(image_urls(&cache.list())["app1"], "x/app:1.0");

        // Rewritten in place, same size, right after the read (same inode, maybe the same
        // timestamp tick): the racy guard makes the next call read it again.
        std::fs::write(&file, "MODULE_ID=app1\nIMAGE_URL=x/app:2.0\n").unwrap();
        assert_eq!(image_urls(&cache.list())["app1"], "x/app:2.0");
        // Replaced by a rename, as NS8's agent writes it.
        replace(&other, "MODULE_ID=sys1\nIMAGE_URL=x/sys:2.0\n");
        assert_eq!(image_urls(&cache.list())["sys1"], "x/sys:2.0");
        // The MODULE_ID no longer matching: not an instance any more.
        replace(&other, "MODULE_ID=sys9\n");
        assert_eq!(ids(&cache.list()), ["app1"]);
        // Handed to another owner: not this user's instance.
        chown(&file, Some(4000), None).unwrap();
        assert!(cache.list().is_empty());
        chown(&file, Some(3001), None).unwrap();
        assert_eq!(ids(&cache.list()), ["app1"]);
        // A symlink put in place of the file is not followed.
        let target = node.dir.path().join("target");
        std::fs::write(&target, "MODULE_ID=app1\n").unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&target, &file).unwrap();
        assert!(cache.list().is_empty());
    }

    #[test]
    fn a_change_after_the_racy_window_is_seen_by_its_identity() {
        let node = Node::new();
        let file = node.rootful_instance("sys1", "MODULE_ID=sys1\nIMAGE_URL=x/sys:1.0\n");
        let cache = node.cache(RACY_MARGIN);
        assert_eq!(cache.list_at(later()).len(), 1);
        assert_eq!(cache.list_at(later()).len(), 1);
        assert_eq!(cache.counts().0, 1);
        // A longer value: the size differs.
        std::fs::write(&file, "MODULE_ID=sys1\nIMAGE_URL=x/sys:1.0.1\n").unwrap();
        assert_eq!(image_urls(&cache.list_at(later()))["sys1"], "x/sys:1.0.1");
        assert_eq!(cache.counts().0, 2);
    }

    #[test]
    fn removed_instances_disappear() {
        let node = Node::new();
        node.rootless("app1", 3001, "MODULE_ID=app1\n");
        node.rootless("app2", 3002, "MODULE_ID=app2\n");
        node.rootful_instance("sys1", "MODULE_ID=sys1\n");
        node.rootful_instance("sys2", "MODULE_ID=sys2\n");
        let cache = node.cache(RACY_MARGIN);
        assert_eq!(cache.list_at(later()).len(), 4);

        // remove-module: userdel -r (the user and the home go), and a rootful dir removed.
        node.remove_user("app1");
        std::fs::remove_dir_all(node.home().join("app1")).unwrap();
        std::fs::remove_dir_all(node.rootful().join("sys1")).unwrap();
        assert_eq!(ids(&cache.list_at(later())), ["app2", "sys2"]);
        // A user removed while its home stays: no longer an instance either.
        node.remove_user("app2");
        assert_eq!(ids(&cache.list_at(later())), ["sys2"]);
        // Only the environment file removed.
        std::fs::remove_file(node.rootful().join("sys2/state/environment")).unwrap();
        assert!(cache.list_at(later()).is_empty());
        assert!(cache.find("sys2").is_none());
        let inner = cache.lock();
        assert!(inner.rootless.is_empty() && inner.rootful.is_empty());
        assert!(
            !inner.users.contains_key("app1"),
            "the lookup of a name gone is dropped"
        );
    }

    #[test]
    fn a_user_changed_in_passwd_is_seen() {
        let node = Node::new();
        node.rootless("app1", 3001, "MODULE_ID=app1\n");
        let cache = node.cache(RACY_MARGIN);
        assert_eq!(cache.list_at(later())[0].instance.uid, 3001);
        // The user now has another uid (and owns the file under it).
        node.remove_user("app1");
        node.add_user("app1", 3101);
        chown(
            node.home().join("app1/.config/state/environment"),
            Some(3101),
            None,
        )
        .unwrap();
        let now = cache.list_at(later());
        assert_eq!((now[0].instance.uid, now[0].instance.gid), (3101, 3101));
        assert_eq!(instances(&now), reference(&node));
    }

    #[test]
    fn recently_changed_files_are_read_again_until_old_enough() {
        let node = Node::new();
        node.rootful_instance("sys1", "MODULE_ID=sys1\n");
        let cache = node.cache(RACY_MARGIN);
        cache.list();
        cache.list();
        assert_eq!(cache.counts().0, 2, "just written: not trusted yet");
        cache.list_at(later());
        cache.list_at(later());
        assert_eq!(cache.counts().0, 3, "old enough: trusted");
    }

    #[test]
    fn concurrent_calls_agree() {
        let node = Node::new();
        for n in 1..=10 {
            node.rootless(&format!("app{n}"), 3000 + n, &format!("MODULE_ID=app{n}\n"));
        }
        let cache = Arc::new(node.cache(RACY_MARGIN));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    (0..50).map(|_| cache.list().len()).collect::<Vec<usize>>()
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap().iter().all(|n| *n == 10));
        }
    }

    #[test]
    fn rootful_instances_are_found_by_their_environment() {
        let base = tempfile::tempdir().unwrap();
        let state = base.path().join("crowdsec1/state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            state.join("environment"),
            "MODULE_ID=crowdsec1\nIMAGE_URL=x/y:1\n",
        )
        .unwrap();
        let other = base.path().join("wrong2/state");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("environment"), "MODULE_ID=else2\n").unwrap();
        let bases = Bases {
            home: base.path().join("nohome"),
            rootful: base.path().to_path_buf(),
        };
        let all = InstanceCache::new(bases.clone()).instances();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "crowdsec1");
        assert!(!all[0].rootless);
        let cache = InstanceCache::new(bases);
        assert!(cache.find("../crowdsec1").is_none());
        assert!(cache.find("wrong2").is_none());
    }

    #[test]
    fn a_symlinked_environment_is_not_read() {
        let base = tempfile::tempdir().unwrap();
        let state = base.path().join("evil1/state");
        std::fs::create_dir_all(&state).unwrap();
        let target = base.path().join("target");
        std::fs::write(&target, "MODULE_ID=evil1\n").unwrap();
        std::os::unix::fs::symlink(&target, state.join("environment")).unwrap();
        let bases = Bases {
            home: base.path().join("nohome"),
            rootful: base.path().to_path_buf(),
        };
        assert!(InstanceCache::new(bases).instances().is_empty());
    }
}
