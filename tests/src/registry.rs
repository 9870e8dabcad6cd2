//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port,
//! with temporary storage, declared plain-HTTP to podman the way an administrator would: a
//! `registries.conf.d` file (removed at teardown), so the product needs no special flag.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::process::{self, ProcessRecord};
use crate::{Result, SandboxError, cmd};

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
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log: {{level: warn, accesslog: {{disabled: true}}}}\n\
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
