use std::process::ExitCode;

use clap::Parser;
use log::LevelFilter;
use module_updaterd::config::{Cli, man_page};
use module_updaterd::{Config, service};

fn main() -> ExitCode {
    // Worker mode: started by the daemon itself for one instance update (see engine::worker).
    if std::env::args().nth(1).as_deref() == Some(module_updaterd::engine::worker::WORKER_ARG) {
        return ExitCode::from(module_updaterd::engine::worker::worker_main() as u8);
    }
    // A bad flag: clap prints why and exits 2.
    let cli = Cli::parse();
    if cli.generate_man {
        let mut out = std::io::stdout().lock();
        return match man_page(&mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("module-updaterd: cannot write the man page: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let level = if cli.verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    if let Err(err) = module_updater_systemd::logging::init("module-updaterd", level) {
        eprintln!("<3>module-updaterd: {err}");
        return ExitCode::FAILURE;
    }
    // A bad configuration file stops start-up with exit status 1 and a message naming the key,
    // the value and what is allowed (in the journal when started by systemd).
    let config = match Config::load(cli) {
        Ok(config) => config,
        Err(err) => {
            log::error!("{err}");
            return ExitCode::FAILURE;
        }
    };
    match &config.config_file {
        Some(path) => log::info!("configuration from {}", path.display()),
        None => log::debug!(
            "no {}: built-in defaults and flags only",
            module_updaterd::config::DEFAULT_CONFIG_FILE
        ),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            log::error!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(service::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log::error!("{err}");
            ExitCode::FAILURE
        }
    }
}
