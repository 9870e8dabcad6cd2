//! Available updates (`ListUpdates`): for each instance, the newest version tag of its image
//! repository above the one it runs, and whether its own tag moved in the registry (the
//! registry's digest for it differs from the installed one). Registries are asked with skopeo,
//! as root with the node's `registries.conf` and credentials (what podman uses), within the
//! configured timeouts; answers are kept with their time until asked again.

use std::collections::{BTreeMap, HashMap};
use std::net::ToSocketAddrs;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use module_updater_dbus::types::repository_and_tag;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::engine::command::Runner;
use crate::version::Version;

/// How long the registry may take: to accept a connection, and to answer a whole query.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub overall: Duration,
}

/// What an instance runs, as the check needs it.
#[derive(Debug, Clone)]
pub struct Installed {
    pub id: String,
    pub url: String,
    pub digest: String,
}

/// One instance's line of `ListUpdates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Available {
    pub image_url: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// The newest version above `tag` (pre-releases only when `tag` is one); `None` when there
    /// is none or the registry could not be asked.
    pub newest: Option<String>,
    pub newest_url: Option<String>,
    /// Whether the registry's manifest for `tag` is not the installed one; `None` when unknown.
    pub tag_moved: Option<bool>,
    pub registry_digest: Option<String>,
    /// When the registry answered (µs since the epoch) and how long ago, in seconds.
    pub checked_usec: u64,
    pub age_seconds: u64,
    /// Why the registry could not be asked, for this instance alone.
    pub error: Option<String>,
}

/// A registry's answer, kept with its time.
#[derive(Debug, Clone)]
struct Answer<T> {
    at: SystemTime,
    value: Result<T, String>,
}

/// The answers of the registries, by repository (tags) and by image URL (digest).
pub struct UpdateCache {
    timeouts: Timeouts,
    /// One check at a time: any local user may ask, and a flood of calls must not become a
    /// flood of skopeo processes (callers wait their turn, and then mostly find answers kept).
    checking: tokio::sync::Mutex<()>,
    tags: Mutex<HashMap<String, Answer<Vec<String>>>>,
    digests: Mutex<HashMap<String, Answer<String>>>,
}

fn usec(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl UpdateCache {
    pub fn new(timeouts: Timeouts) -> UpdateCache {
        UpdateCache {
            timeouts,
            checking: tokio::sync::Mutex::new(()),
            tags: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
        }
    }

    /// The check of every instance in `installed`; `refresh` asks the registries again even when
    /// an answer is kept.
    pub async fn check(
        &self,
        installed: &[Installed],
        refresh: bool,
    ) -> BTreeMap<String, Available> {
        let _turn = self.checking.lock().await;
        let timeouts = self.timeouts;
        let mut out = BTreeMap::new();
        for instance in installed {
            let (repository, tag) = repository_and_tag(&instance.url);
            let tags = self
                .answer(&self.tags, repository, refresh, || {
                    list_tags(repository, timeouts)
                })
                .await;
            let digest = self
                .answer(&self.digests, &instance.url, refresh, || {
                    registry_digest(&instance.url, timeouts)
                })
                .await;
            let checked = tags.at.min(digest.at);
            let newest = tags
                .value
                .as_ref()
                .ok()
                .and_then(|tags| newest_above(tag, tags));
            let error = match (&tags.value, &digest.value) {
                (Err(e), _) | (_, Err(e)) => Some(e.clone()),
                _ => None,
            };
            let registry_digest = digest.value.ok();
            out.insert(
                instance.id.clone(),
                Available {
                    image_url: instance.url.clone(),
                    repository: repository.to_owned(),
                    tag: tag.to_owned(),
                    digest: instance.digest.clone(),
                    newest_url: newest.as_ref().map(|n| format!("{repository}:{n}")),
                    newest,
                    tag_moved: registry_digest
                        .as_ref()
                        .filter(|_| !instance.digest.is_empty())
                        .map(|d| *d != instance.digest),
                    registry_digest,
                    checked_usec: usec(checked),
                    age_seconds: SystemTime::now()
                        .duration_since(checked)
                        .map_or(0, |d| d.as_secs()),
                    error,
                },
            );
        }
        out
    }

    async fn answer<T, F, Fut>(
        &self,
        kept: &Mutex<HashMap<String, Answer<T>>>,
        key: &str,
        refresh: bool,
        ask: F,
    ) -> Answer<T>
    where
        T: Clone,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        if !refresh && let Some(answer) = lock(kept).get(key) {
            return answer.clone();
        }
        let answer = Answer {
            at: SystemTime::now(),
            value: ask().await,
        };
        lock(kept).insert(key.to_owned(), answer.clone());
        answer
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The newest tag above `current` by semantic version; pre-releases only when `current` is one.
/// `None` when `current` is not a version or nothing is above it.
pub fn newest_above(current: &str, tags: &[String]) -> Option<String> {
    let now = Version::parse(current)?;
    tags.iter()
        .filter_map(|t| Version::parse(t).map(|v| (v, t)))
        .filter(|(v, _)| *v > now && (now.is_prerelease() || !v.is_prerelease()))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, t)| t.clone())
}

/// The registry's host and port of a repository (`docker.io` for a name without a host).
fn registry_address(repository: &str) -> (String, u16) {
    let first = repository.split('/').next().unwrap_or_default();
    let names_a_host = repository.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if !names_a_host {
        return ("registry-1.docker.io".to_owned(), 443);
    }
    let port = |text: Option<&str>| text.and_then(|p| p.parse::<u16>().ok()).unwrap_or(443);
    if let Some(rest) = first.strip_prefix('[')
        && let Some((address, tail)) = rest.split_once(']')
    {
        return (address.to_owned(), port(tail.strip_prefix(':')));
    }
    match first.rsplit_once(':') {
        Some((name, p)) => (name.to_owned(), port(Some(p))),
        None => (first.to_owned(), 443),
    }
}

/// Whether the registry accepts a connection within the connect timeout.
async fn reachable(repository: &str, timeouts: Timeouts) -> Result<(), String> {
    let (host, port) = registry_address(repository);
    let target = format!("{host} port {port}");
    let addresses: Vec<_> = tokio::task::spawn_blocking({
        let host = host.clone();
        move || {
            (host.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>())
        }
    })
    .await
    .map_err(|e| format!("cannot resolve {target}: {e}"))?
    .map_err(|e| format!("cannot resolve {target}: {e}"))?;
    let mut last = format!("{target} has no address");
    for address in addresses {
        match tokio::time::timeout(timeouts.connect, tokio::net::TcpStream::connect(address)).await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = format!("cannot connect to {target}: {e}"),
            Err(_) => {
                last = format!(
                    "{target} did not accept a connection within {} s (registry_connect_timeout)",
                    timeouts.connect.as_secs()
                )
            }
        }
    }
    Err(last)
}

/// `skopeo ARGS` (the engine's runner) within the overall timeout; its stdout.
async fn skopeo(args: &[&str], timeouts: Timeouts, what: &str) -> Result<Vec<u8>, String> {
    let runner = Runner::new("skopeo", Vec::new());
    tokio::time::timeout(timeouts.overall, runner.output(args))
        .await
        .map_err(|_| {
            format!(
                "{what}: no answer within {} s (registry_timeout)",
                timeouts.overall.as_secs()
            )
        })?
        .map_err(|e| format!("{what}: {e}"))
}

async fn list_tags(repository: &str, timeouts: Timeouts) -> Result<Vec<String>, String> {
    reachable(repository, timeouts).await?;
    #[derive(Deserialize)]
    struct Tags {
        #[serde(rename = "Tags", default)]
        tags: Vec<String>,
    }
    let source = format!("docker://{repository}");
    let what = format!("listing the tags of {repository}");
    let out = skopeo(&["list-tags", "--", &source], timeouts, &what).await?;
    serde_json::from_slice::<Tags>(&out)
        .map(|t| t.tags)
        .map_err(|e| format!("{what}: skopeo's answer is not understood: {e}"))
}

/// The registry's digest of the manifest `url` names (sha256 of its bytes, as podman records it).
async fn registry_digest(url: &str, timeouts: Timeouts) -> Result<String, String> {
    let (repository, _) = repository_and_tag(url);
    reachable(repository, timeouts).await?;
    let source = format!("docker://{url}");
    let what = format!("reading the manifest of {url}");
    let raw = skopeo(&["inspect", "--raw", "--", &source], timeouts, &what).await?;
    let hash = sha2::Sha256::digest(&raw);
    Ok(format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn the_newest_version_above_the_current_one() {
        let all = tags(&["1.0", "1.1", "2.0", "2.1-rc1", "latest", "0.9"]);
        assert_eq!(newest_above("1.0", &all).as_deref(), Some("2.0"));
        assert_eq!(newest_above("2.0", &all), None);
        assert_eq!(newest_above("2.0-rc1", &all).as_deref(), Some("2.1-rc1"));
        assert_eq!(newest_above("latest", &all), None);
    }

    #[test]
    fn registry_addresses() {
        assert_eq!(
            registry_address("ghcr.io/nethserver/mail"),
            ("ghcr.io".into(), 443)
        );
        assert_eq!(
            registry_address("127.0.0.1:5000/mail"),
            ("127.0.0.1".into(), 5000)
        );
        assert_eq!(registry_address("[::1]:5000/mail"), ("::1".into(), 5000));
        assert_eq!(
            registry_address("library/redis"),
            ("registry-1.docker.io".into(), 443)
        );
        assert_eq!(registry_address("localhost/x"), ("localhost".into(), 443));
        assert_eq!(registry_address("[::1]/x"), ("::1".into(), 443));
    }
}
