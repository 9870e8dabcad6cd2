//! Logging set-up: structured records to the journal when stderr is connected to it
//! (`JOURNAL_STREAM`), otherwise one line per record on stderr with a `<N>` priority prefix, which
//! journald and NS8's agent both understand.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::SystemdError;

/// The syslog priority of a log level (journal `PRIORITY=`).
pub fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Installs the process-wide logger. `identifier` is the syslog identifier in the journal.
pub fn init(identifier: &str, level: LevelFilter) -> Result<(), SystemdError> {
    if systemd_journal_logger::connected_to_journal() {
        systemd_journal_logger::JournalLog::new()
            .map_err(|e| SystemdError::Logger(e.to_string()))?
            .with_syslog_identifier(identifier.to_owned())
            .install()
            .map_err(|e| SystemdError::Logger(e.to_string()))?;
    } else {
        log::set_boxed_logger(Box::new(StderrLog { level }))
            .map_err(|e| SystemdError::Logger(e.to_string()))?;
    }
    log::set_max_level(level);
    Ok(())
}

/// `<N>message key=value...` lines on stderr.
struct StderrLog {
    level: LevelFilter,
}

struct Fields(String);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        self.0.push_str(&format!(" {key}={value}"));
        Ok(())
    }
}

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // zbus and friends are chatty at debug level; keep our own crates' records only below info.
        if record.level() > Level::Info && !record.target().starts_with("module_updater") {
            return;
        }
        let mut fields = Fields(String::new());
        let _ = record.key_values().visit(&mut fields);
        let line = format!(
            "<{}>{}{}\n",
            priority(record.level()),
            record.args(),
            fields.0
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
