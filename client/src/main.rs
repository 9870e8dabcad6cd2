//! module-updater: a busctl-style client of module-updaterd.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use module_updater_dbus::ModuleUpdaterProxy;

/// Exit code when the service cannot be reached.
const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug, Args)]
#[group(multiple = false)]
struct BusArgs {
    /// Talk to the service on the system bus (the default).
    #[arg(long, global = true)]
    system: bool,
    /// Talk to the service on the user's session bus.
    #[arg(long, global = true)]
    user: bool,
    /// Talk to the service on the bus at this D-Bus address.
    #[arg(long, value_name = "ADDR", global = true)]
    address: Option<String>,
}

/// module-updater: update NethServer 8 module instances through module-updaterd.
#[derive(Debug, Parser)]
#[command(name = "module-updater", version, about)]
struct Cli {
    #[command(flatten)]
    bus: BusArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the client's and the daemon's versions.
    Version,
}

#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("cannot connect to {bus}: {source} (is the bus running? try --address)")]
    Connect { bus: String, source: zbus::Error },
    #[error(
        "module-updaterd does not answer on {bus}: {source} (is it installed and allowed to start? see `systemctl status module-updaterd`)"
    )]
    Unreachable { bus: String, source: zbus::Error },
}

impl ClientError {
    fn exit_code(&self) -> u8 {
        match self {
            ClientError::Connect { .. } | ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
        }
    }
}

async fn connect(bus: &BusArgs) -> Result<(zbus::Connection, String), ClientError> {
    let (builder, name) = match (&bus.address, bus.user) {
        (Some(address), _) => (
            zbus::connection::Builder::address(address.as_str()),
            format!("the bus at {address}"),
        ),
        (None, true) => (
            zbus::connection::Builder::session(),
            "the session bus".to_owned(),
        ),
        (None, false) => (
            zbus::connection::Builder::system(),
            "the system bus".to_owned(),
        ),
    };
    let connection = builder
        .build()
        .await
        .map_err(|source| ClientError::Connect {
            bus: name.clone(),
            source,
        })?;
    Ok((connection, name))
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    let (connection, bus) = connect(&cli.bus).await?;
    match cli.command {
        Command::Version => {
            let unreachable = |source| ClientError::Unreachable {
                bus: bus.clone(),
                source,
            };
            let proxy = ModuleUpdaterProxy::new(&connection)
                .await
                .map_err(unreachable)?;
            let daemon = proxy.version().await.map_err(unreachable)?;
            println!("module-updater {}", env!("CARGO_PKG_VERSION"));
            println!("module-updaterd {daemon}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("module-updater: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("module-updater: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
