//! A node's uplink in front of the sandbox registry: a TCP proxy on loopback that, while shaped,
//! delays each new connection (the round trips of opening it) and sends the registry's answers
//! through one token bucket shared by every connection (the node's bandwidth). It counts the bytes
//! that went down. Unshaped, it only counts: provisioning goes through it at loopback speed so
//! that images keep one address.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{REGISTRIES_CONF_D, Result, Sandbox, SandboxError};

/// What the link looks like while shaped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UplinkSettings {
    /// Bandwidth down, shared by every connection, in Mbit/s.
    pub mbit_per_s: f64,
    /// How long opening a connection takes.
    pub connect_delay: Duration,
}

impl Default for UplinkSettings {
    fn default() -> UplinkSettings {
        UplinkSettings {
            mbit_per_s: 50.0,
            connect_delay: Duration::from_millis(20),
        }
    }
}

impl UplinkSettings {
    pub fn bytes_per_s(&self) -> f64 {
        self.mbit_per_s * 1_000_000.0 / 8.0
    }
}

/// The largest piece sent at once; at 50 Mbit/s it takes 2.6 ms.
const CHUNK: usize = 16 * 1024;
/// How much the bucket holds: what an idle link may send at once.
const BURST_BYTES: f64 = 64.0 * 1024.0;

/// State shared by the proxy's tasks and its handle.
struct Shared {
    settings: UplinkSettings,
    shaped: AtomicBool,
    bytes_down: AtomicU64,
    connections: AtomicU64,
    /// When the link is free again: each chunk going down books the time it takes after the one
    /// before it (first come, first served), so all connections share the bandwidth.
    free_at: Mutex<Instant>,
}

impl Shared {
    /// Waits until `bytes` may go down the link.
    async fn send_slot(&self, bytes: usize) {
        if !self.shaped.load(Ordering::Relaxed) {
            return;
        }
        let rate = self.settings.bytes_per_s();
        let done = {
            let Ok(mut free_at) = self.free_at.lock() else {
                return;
            };
            let now = Instant::now();
            let credit = Duration::from_secs_f64(BURST_BYTES / rate);
            let start = (*free_at).max(now.checked_sub(credit).unwrap_or(now));
            let done = start + Duration::from_secs_f64(bytes as f64 / rate);
            *free_at = done;
            done
        };
        tokio::time::sleep_until(done.into()).await;
    }
}

/// A running uplink. Stops when dropped.
pub struct Uplink {
    shared: Arc<Shared>,
    port: u16,
    conf_file: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Uplink {
    /// Starts the proxy in front of `upstream`, unshaped, on a thread of its own (the sandbox's
    /// API is synchronous).
    pub fn start(upstream: SocketAddr, settings: UplinkSettings) -> Result<Uplink> {
        if !(settings.mbit_per_s.is_finite() && settings.mbit_per_s > 0.0) {
            return Err(SandboxError::InvalidSpec {
                detail: format!(
                    "uplink bandwidth {} Mbit/s: give a positive number",
                    settings.mbit_per_s
                ),
            });
        }
        let localhost = Path::new("127.0.0.1");
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| SandboxError::io("bind a free port on", localhost, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| SandboxError::io("configure a socket on", localhost, e))?;
        let port = listener
            .local_addr()
            .map_err(|e| SandboxError::io("read the port of", localhost, e))?
            .port();
        let shared = Arc::new(Shared {
            settings,
            shaped: AtomicBool::new(false),
            bytes_down: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            free_at: Mutex::new(Instant::now()),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SandboxError::io("start a runtime for", localhost, e))?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel();
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("uplink-{port}"))
            .spawn(move || runtime.block_on(serve(listener, upstream, serving, stopped)))
            .map_err(|e| SandboxError::io("start a thread for", localhost, e))?;
        let conf_file =
            Path::new(REGISTRIES_CONF_D).join(format!("module-updater-test-uplink-{port}.conf"));
        let uplink = Uplink {
            shared,
            port,
            conf_file,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        std::fs::create_dir_all(REGISTRIES_CONF_D)
            .map_err(|e| SandboxError::io("create", Path::new(REGISTRIES_CONF_D), e))?;
        std::fs::write(
            &uplink.conf_file,
            format!(
                "# Written by the module-updater test sandbox; removed when it is torn down.\n\
                 [[registry]]\nlocation = \"{}\"\ninsecure = true\n",
                uplink.host()
            ),
        )
        .map_err(|e| SandboxError::io("write", &uplink.conf_file, e))?;
        Ok(uplink)
    }

    /// `127.0.0.1:PORT`: the registry as the node sees it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The `registries.conf.d` file declaring it plain HTTP.
    pub fn conf_file(&self) -> &Path {
        &self.conf_file
    }

    pub fn settings(&self) -> UplinkSettings {
        self.shared.settings
    }

    /// Shapes the link (bandwidth and connection delay) or lets everything through at once.
    pub fn set_shaped(&self, shaped: bool) {
        if let Ok(mut free_at) = self.shared.free_at.lock() {
            *free_at = Instant::now();
        }
        self.shared.shaped.store(shaped, Ordering::SeqCst);
    }

    /// Bytes sent down to clients since the start, shaped or not.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// Connections opened since the start.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops the proxy and removes its configuration file; returns what could not be removed.
    pub fn stop(mut self) -> Vec<String> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<String> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        match std::fs::remove_file(&self.conf_file) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                vec![format!("{}: {err}", self.conf_file.display())]
            }
            _ => Vec::new(),
        }
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn serve(
    listener: StdListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                shared.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay(client, upstream, shared.clone()));
            }
        }
    }
}

/// One connection: requests go up as they come, answers come down through the bucket.
async fn relay(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    if shared.shaped.load(Ordering::Relaxed) {
        tokio::time::sleep(shared.settings.connect_delay).await;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let down = async {
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let read = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            shared.send_slot(read).await;
            let Some(chunk) = buffer.get(..read) else {
                break;
            };
            if client_write.write_all(chunk).await.is_err() {
                break;
            }
            shared.bytes_down.fetch_add(read as u64, Ordering::Relaxed);
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}

impl Sandbox {
    /// Puts a shaped uplink in front of the registry (unshaped until
    /// [`Uplink::set_shaped`]); images built from now on are named by its address, so every pull
    /// of them goes through it. Returns its address.
    pub fn start_uplink(&mut self, settings: UplinkSettings) -> Result<String> {
        if self.uplink.is_some() {
            return Err(SandboxError::InvalidSpec {
                detail: "this sandbox already has an uplink".into(),
            });
        }
        let upstream: SocketAddr =
            self.builder
                .registry
                .parse()
                .map_err(|e| SandboxError::InvalidSpec {
                    detail: format!("registry address {:?}: {e}", self.builder.registry),
                })?;
        let uplink = Uplink::start(upstream, settings)?;
        self.footprint.uplink_conf = Some(uplink.conf_file().to_path_buf());
        self.save_footprint()?;
        let host = uplink.host();
        self.builder.registry = host.clone();
        self.uplink = Some(uplink);
        Ok(host)
    }

    /// The uplink, once started.
    pub fn uplink(&self) -> Option<&Uplink> {
        self.uplink.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A server that answers each connection with `size` bytes, behind an uplink.
    fn fixture(size: usize, settings: UplinkSettings) -> (Uplink, std::thread::JoinHandle<()>) {
        let server = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let upstream = server.local_addr().expect("address");
        let serving = std::thread::spawn(move || {
            for stream in server.incoming().take(2) {
                let Ok(mut stream) = stream else { return };
                let mut request = [0u8; 4];
                let _ = stream.read_exact(&mut request);
                let _ = stream.write_all(&vec![7u8; size]);
            }
        });
        (Uplink::start(upstream, settings).expect("uplink"), serving)
    }

    fn fetch(host: &str) -> usize {
        let mut stream = std::net::TcpStream::connect(host).expect("connect");
        stream.write_all(b"GET\n").expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).expect("read");
        answer.len()
    }

    // Needs no root: a loopback server and the proxy only. Writes a registries.conf.d file,
    // so it runs only where that directory is writable (the test machines run as root).
    #[test]
    fn shaped_link_takes_the_bandwidths_time_and_counts_bytes() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test writes {REGISTRIES_CONF_D}: run it as root");
        }
        let size = 1_000_000;
        let settings = UplinkSettings {
            mbit_per_s: 40.0,
            connect_delay: Duration::from_millis(50),
        };
        let (uplink, serving) = fixture(size, settings);
        let host = uplink.host();
        let started = Instant::now();
        assert_eq!(fetch(&host), size);
        let unshaped = started.elapsed();
        uplink.set_shaped(true);
        let started = Instant::now();
        assert_eq!(fetch(&host), size);
        let shaped = started.elapsed().as_secs_f64();
        // 1 MB at 5 MB/s is 0.2 s, plus the connection's 50 ms.
        assert!(
            (0.22..0.6).contains(&shaped),
            "shaped: {shaped:.3} s (unshaped {unshaped:?})"
        );
        assert_eq!(uplink.bytes_down(), 2 * size as u64);
        assert_eq!(uplink.connections(), 2);
        let conf = uplink.conf_file().to_path_buf();
        assert!(conf.exists());
        assert!(uplink.stop().is_empty());
        assert!(!conf.exists());
        let _ = serving.join();
    }
}
