use std::process::ExitCode;

use clap::Parser;
use log::LevelFilter;
use module_updaterd::{Config, service};

fn main() -> ExitCode {
    // Worker mode: started by the daemon itself for one instance update (see engine::worker).
    if std::env::args().nth(1).as_deref() == Some(module_updaterd::engine::worker::WORKER_ARG) {
        return ExitCode::from(module_updaterd::engine::worker::worker_main() as u8);
    }
    let config = Config::parse();
    let level = if config.verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    if let Err(err) = module_updater_systemd::logging::init("module-updaterd", level) {
        eprintln!("<3>module-updaterd: {err}");
        return ExitCode::FAILURE;
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
