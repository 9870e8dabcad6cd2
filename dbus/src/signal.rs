//! The job signals as one type, decoded once from the proxies' signal types, for every reader:
//! the client, the tests and the benchmark.

use zbus::Message;

use crate::proxy::{Finished, InstanceFinished, Progress};

/// A signal of a job object ([`crate::JOB_INTERFACE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSignal {
    Progress {
        instance: String,
        step: String,
        percent: u32,
    },
    Message {
        instance: String,
        priority: u32,
        text: String,
    },
    InstanceFinished {
        instance: String,
        status: String,
        exit_code: i32,
    },
    Finished {
        status: String,
        exit_code: i32,
    },
}

impl JobSignal {
    /// The job signal `message` carries; `None` for any other message or a body that does not
    /// match the signal's signature.
    pub fn decode(message: &Message) -> Option<JobSignal> {
        if let Some(signal) = Progress::from_message(message.clone()) {
            let args = signal.args().ok()?;
            return Some(JobSignal::Progress {
                instance: args.instance,
                step: args.step,
                percent: args.percent,
            });
        }
        if let Some(signal) = crate::proxy::Message::from_message(message.clone()) {
            let args = signal.args().ok()?;
            return Some(JobSignal::Message {
                instance: args.instance,
                priority: args.priority,
                text: args.text,
            });
        }
        if let Some(signal) = InstanceFinished::from_message(message.clone()) {
            let args = signal.args().ok()?;
            return Some(JobSignal::InstanceFinished {
                instance: args.instance,
                status: args.status,
                exit_code: args.exit_code,
            });
        }
        let signal = Finished::from_message(message.clone())?;
        let args = signal.args().ok()?;
        Some(JobSignal::Finished {
            status: args.status,
            exit_code: args.exit_code,
        })
    }

    /// The instance the signal is about; `None` for the job's `Finished`.
    pub fn instance(&self) -> Option<&str> {
        match self {
            JobSignal::Progress { instance, .. }
            | JobSignal::Message { instance, .. }
            | JobSignal::InstanceFinished { instance, .. } => Some(instance),
            JobSignal::Finished { .. } => None,
        }
    }
}
