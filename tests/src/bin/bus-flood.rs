//! A D-Bus client that calls `UpdateModule` as fast as it can, for the security tests' flood:
//! `bus-flood ADDRESS CONNECTIONS CALLS IN_FLIGHT REQUEST`. It opens CONNECTIONS connections to
//! the bus at ADDRESS, keeps IN_FLIGHT calls pending on each, and makes CALLS calls in all. It
//! prints one JSON object: `{"calls", "ok", "errors": {error name: count}, "elapsed_ms"}`.
//! Run it as a non-root user to see what the daemon does with a flood of unauthorised calls.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use zbus::DBusError;

struct Args {
    address: String,
    connections: usize,
    calls: usize,
    in_flight: usize,
    request: String,
}

fn parse_args() -> Option<Args> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [address, connections, calls, in_flight, request] = args.as_slice() else {
        return None;
    };
    Some(Args {
        address: address.clone(),
        connections: connections.parse().ok().filter(|n| *n > 0)?,
        calls: calls.parse().ok()?,
        in_flight: in_flight.parse().ok().filter(|n| *n > 0)?,
        request: request.clone(),
    })
}

/// The D-Bus error name of a failed call (or what went wrong locally).
fn error_name(err: &zbus::Error) -> String {
    match err {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(e) => e.name().to_string(),
        other => format!("local: {other}"),
    }
}

fn main() -> ExitCode {
    let Some(args) = parse_args() else {
        eprintln!("usage: bus-flood ADDRESS CONNECTIONS CALLS IN_FLIGHT REQUEST");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bus-flood: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(flood(args)) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bus-flood: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn flood(args: Args) -> zbus::Result<serde_json::Value> {
    let args = Arc::new(args);
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let connection = zbus::connection::Builder::address(args.address.as_str())
            .build()
            .await?;
        let proxy = module_updater_dbus::ModuleUpdaterProxy::new(&connection).await?;
        for _ in 0..args.in_flight {
            let (proxy, args, next, ok, errors) = (
                proxy.clone(),
                Arc::clone(&args),
                Arc::clone(&next),
                Arc::clone(&ok),
                Arc::clone(&errors),
            );
            tasks.spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < args.calls {
                    match proxy.update_module(&args.request).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(err) => {
                            let name = error_name(&err);
                            let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
                            *errors.entry(name).or_insert(0) += 1;
                        }
                    }
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(serde_json::json!({
        "calls": args.calls,
        "ok": ok.load(Ordering::SeqCst),
        "errors": errors,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }))
}
