//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port,
//! with temporary storage, declared plain-HTTP to podman the way an administrator would: a
//! `registries.conf.d` file (removed at teardown), so the product needs no special flag.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::process::{self, ProcessRecord};
use crate::{Result, Sandbox, SandboxError, cmd};

/// Where podman reads drop-in registry settings (rootful and rootless alike).
pub const REGISTRIES_CONF_D: &str = "/etc/containers/registries.conf.d";

/// A running registry.
pub struct Registry {
    child: Child,
    pub record: ProcessRecord,
    pub port: u16,
    pub conf_file: PathBuf,
    pub log: PathBuf,
}

/// The `registries.conf.d` file for a loopback registry on `port`.
pub fn conf_file(port: u16) -> PathBuf {
    Path::new(REGISTRIES_CONF_D).join(format!("module-updater-test-{port}.conf"))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| SandboxError::io("bind a free port on", Path::new("127.0.0.1"), e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| SandboxError::io("read the port of", Path::new("127.0.0.1"), e))
}

/// `GET /v2/` answers 200 on a working, unauthenticated registry.
fn answers(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

impl Registry {
    /// Starts a registry storing under `dir`; a port taken in the meantime by someone else is
    /// retried with another one.
    pub fn start(dir: &Path, logs: &Path) -> Result<Registry> {
        let mut last_error = None;
        for attempt in 0..5 {
            match Registry::start_once(dir, logs, attempt) {
                Ok(registry) => return Ok(registry),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or(SandboxError::Timeout {
            what: "a registry to start".into(),
            secs: 0.0,
            detail: String::new(),
        }))
    }

    fn start_once(dir: &Path, logs: &Path, attempt: usize) -> Result<Registry> {
        let port = free_port()?;
        let storage = dir.join("registry-data");
        std::fs::create_dir_all(&storage).map_err(|e| SandboxError::io("create", &storage, e))?;
        let config = dir.join("registry.yml");
        // The packaged /etc/docker/registry/config.yml turns on htpasswd auth: write our own.
        // The access log (one line per request, in the log file) is what tells how many bytes
        // the registry served: see [`Sandbox::registry_traffic_since`].
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log: {{level: warn, accesslog: {{disabled: false}}}}\n\
                 storage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n\
                 http: {{addr: 127.0.0.1:{port}}}\n",
                storage.display()
            ),
        )
        .map_err(|e| SandboxError::io("write the registry configuration", &config, e))?;
        let log = logs.join(format!("registry-{attempt}.log"));
        let log_file =
            std::fs::File::create(&log).map_err(|e| SandboxError::io("create", &log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| SandboxError::io("dup", &log, e))?;
        if cmd::find_tool("docker-registry").is_none() {
            return Err(SandboxError::MissingTools {
                tools: "docker-registry".into(),
                packages: "docker-registry".into(),
            });
        }
        let mut command = cmd::clean("docker-registry");
        command
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        let child = command.spawn().map_err(|source| SandboxError::Spawn {
            command: cmd::describe(&command),
            source,
        })?;
        let record = ProcessRecord::new(format!("docker-registry on 127.0.0.1:{port}"), child.id());
        let mut registry = Registry {
            child,
            record,
            port,
            conf_file: conf_file(port),
            log,
        };
        let mut exited = None;
        let ready = cmd::poll(Duration::from_secs(10), || {
            if let Ok(Some(status)) = registry.child.try_wait() {
                exited = Some(status);
                return Ok(Some(false));
            }
            Ok(answers(port).then_some(true))
        })?;
        let log_text = std::fs::read(&registry.log)
            .map(|b| cmd::tail(&b))
            .unwrap_or_default();
        match (ready, exited) {
            (Some(true), _) => {}
            (_, Some(status)) => {
                return Err(SandboxError::Exited {
                    what: format!("docker-registry serve {}", config.display()),
                    status: status.to_string(),
                    log: log_text,
                });
            }
            _ => {
                return Err(SandboxError::Timeout {
                    what: format!("the registry on 127.0.0.1:{port} to answer GET /v2/"),
                    secs: 10.0,
                    detail: log_text,
                });
            }
        }
        std::fs::create_dir_all(REGISTRIES_CONF_D)
            .map_err(|e| SandboxError::io("create", Path::new(REGISTRIES_CONF_D), e))?;
        std::fs::write(
            &registry.conf_file,
            format!(
                "# Written by the module-updater test sandbox; removed when it is torn down.\n\
                 [[registry]]\nlocation = \"127.0.0.1:{port}\"\ninsecure = true\n"
            ),
        )
        .map_err(|e| SandboxError::io("write", &registry.conf_file, e))?;
        Ok(registry)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        process::terminate(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_file(&self.conf_file);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the registry served, counted from its access log (Apache combined format, one line per
/// request: `HOST - - [TIME] "GET /v2/... HTTP/1.1" STATUS BYTES "REFERER" "AGENT"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryTraffic {
    /// Requests answered (any method, any status).
    pub requests: u64,
    /// Response body bytes of all of them.
    pub bytes: u64,
    /// Successful blob downloads (`GET /v2/<name>/blobs/<digest>` answered 200 or 206): digest ->
    /// how many times it was served.
    pub blob_downloads: BTreeMap<String, u64>,
    /// Bytes of those blob downloads.
    pub blob_bytes: u64,
}

impl RegistryTraffic {
    /// The most times any one blob was served (0 when none was).
    pub fn max_serves_per_blob(&self) -> u64 {
        self.blob_downloads.values().copied().max().unwrap_or(0)
    }
}

/// Counts the requests of an access log (lines of anything else, e.g. the registry's own
/// warnings, are skipped).
pub fn parse_access_log(text: &str) -> RegistryTraffic {
    let mut traffic = RegistryTraffic::default();
    for line in text.lines() {
        let Some((method, uri, status, bytes)) = access_line(line) else {
            continue;
        };
        traffic.requests += 1;
        traffic.bytes += bytes;
        let is_blob = uri.starts_with("/v2/") && uri.contains("/blobs/");
        if method == "GET" && is_blob && (status == 200 || status == 206) {
            let digest = uri.rsplit('/').next().unwrap_or(uri);
            let digest = digest.split('?').next().unwrap_or(digest);
            *traffic.blob_downloads.entry(digest.to_owned()).or_default() += 1;
            traffic.blob_bytes += bytes;
        }
    }
    traffic
}

/// `(method, uri, status, bytes)` of one combined-format line; `-` bytes count as 0.
fn access_line(line: &str) -> Option<(&str, &str, u16, u64)> {
    // The timestamp is the only bracketed field; the request line is the first quoted one.
    let after_time = &line[line.find("] \"")? + 3..];
    let (request, rest) = after_time.split_once('"')?;
    let mut words = request.split(' ');
    let method = words.next()?;
    let uri = words.next()?;
    let mut fields = rest.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let bytes = match fields.next()? {
        "-" => 0,
        n => n.parse().ok()?,
    };
    Some((method, uri, status, bytes))
}

impl Sandbox {
    /// The registry's log file (its access log and its own messages).
    pub fn registry_log(&self) -> Option<PathBuf> {
        self.registry.as_ref().map(|r| r.log.clone())
    }

    /// The pid of the registry process.
    pub fn registry_pid(&self) -> Option<u32> {
        self.registry.as_ref().map(|r| r.child.id())
    }

    /// Where the registry's log ends now: pass it to [`Sandbox::registry_traffic_since`] to count
    /// what is served from here on.
    pub fn registry_log_offset(&self) -> Result<u64> {
        let Some(log) = self.registry_log() else {
            return Ok(0);
        };
        std::fs::metadata(&log)
            .map(|m| m.len())
            .map_err(|e| SandboxError::io("read the size of", &log, e))
    }

    /// What the registry served since `offset` of its log (requests still being answered are not
    /// logged yet: call it once the clients are done).
    pub fn registry_traffic_since(&self, offset: u64) -> Result<RegistryTraffic> {
        let Some(log) = self.registry_log() else {
            return Ok(RegistryTraffic::default());
        };
        let mut file = std::fs::File::open(&log).map_err(|e| SandboxError::io("open", &log, e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| SandboxError::io("seek in", &log, e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| SandboxError::io("read", &log, e))?;
        Ok(parse_access_log(&String::from_utf8_lossy(&bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_counts_bytes_and_blob_downloads() {
        let log = concat!(
            "time=\"2026-11-30T18:13:47Z\" level=warning msg=\"No HTTP secret provided\"\n",
            "127.0.0.1 - - [30/Nov/2026:18:13:49 +0000] \"GET /v2/ HTTP/1.1\" 200 2 \"\" \"curl/7.88.1\"\n",
            "127.0.0.1 - - [30/Nov/2026:18:13:49 +0000] \"HEAD /v2/demo/manifests/1.0 HTTP/1.1\" 200 0 \"\" \"podman\"\n",
            "127.0.0.1 - - [30/Nov/2026:18:13:49 +0000] \"GET /v2/demo/blobs/sha256:aa HTTP/1.1\" 200 1000 \"\" \"podman \\\"x\\\"\"\n",
            "127.0.0.1 - - [30/Nov/2026:18:13:50 +0000] \"GET /v2/demo/blobs/sha256:aa HTTP/1.1\" 200 1000 \"\" \"podman\"\n",
            "127.0.0.1 - - [30/Nov/2026:18:13:50 +0000] \"GET /v2/demo/blobs/sha256:bb HTTP/1.1\" 404 157 \"\" \"podman\"\n",
            "127.0.0.1 - - [30/Nov/2026:18:13:50 +0000] \"GET /v2/demo/blobs/sha256:cc HTTP/1.1\" 200 - \"\" \"podman\"\n",
        );
        let traffic = parse_access_log(log);
        assert_eq!(traffic.requests, 6);
        assert_eq!(traffic.bytes, 2 + 1000 + 1000 + 157);
        assert_eq!(traffic.blob_bytes, 2000);
        assert_eq!(
            traffic.blob_downloads,
            BTreeMap::from([("sha256:aa".to_owned(), 2), ("sha256:cc".to_owned(), 1)])
        );
        assert_eq!(traffic.max_serves_per_blob(), 2);
        assert_eq!(parse_access_log("").max_serves_per_blob(), 0);
    }
}
