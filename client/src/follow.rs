//! Following a job to its end: signals subscribed before the job exists, the end confirmed through
//! `Status`/`GetResult` (never by a signal alone, and polled every 2 s as a safety net), Ctrl-C to
//! cancel then to detach (or only to detach, for a job this client did not start), and a clean
//! exit when the service leaves the bus.

use std::num::NonZeroUsize;
use std::time::Duration;

use futures_util::StreamExt;
use module_updater_dbus::{BUS_NAME, JOB_INTERFACE, JOB_PATH_PREFIX, JobProxy, JobSignal};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zbus::proxy::CacheProperties;
use zbus::{Connection, MatchRule, Message, MessageStream, OwnedVariant, fdo};

use crate::bus::Bus;
use crate::cli::JobRef;
use crate::error::{Call, ClientError};
use crate::render::{View, ViewOptions};
use crate::summary::{JobResult, JobTimes};

/// How often the job's `Status` is read even when no signal came.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long a detach waits for a Cancel call still on its way.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages the connection may queue in zbus before our reader task moves them to its channel.
const MATCH_QUEUE: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

/// Signals of the `Job` interface on any job path (the path of a new job is unknown until
/// `UpdateModule` answers, and its first signals may come before that answer).
pub fn job_signals_rule() -> zbus::Result<MatchRule<'static>> {
    MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .interface(JOB_INTERFACE)
        .path_namespace(JOB_PATH_PREFIX)
        .build()
}

/// `PropertiesChanged` of the job objects (`Status`, `Progress`, `ExitCode`).
pub fn job_properties_rule() -> zbus::Result<MatchRule<'static>> {
    MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path_namespace(JOB_PATH_PREFIX)
        .arg(0, JOB_INTERFACE)
        .build()
}

/// `NameOwnerChanged` of the service's name: it arriving with an empty new owner means the service left.
pub fn owner_rule() -> zbus::Result<MatchRule<'static>> {
    MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.DBus")
        .path("/org/freedesktop/DBus")
        .interface("org.freedesktop.DBus")
        .member("NameOwnerChanged")
        .arg(0, BUS_NAME)
        .build()
}

/// Every signal the service sends (for `monitor`).
pub fn service_rule() -> zbus::Result<MatchRule<'static>> {
    MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(BUS_NAME)
        .build()
}

/// The rules a follower needs.
pub fn follow_rules() -> zbus::Result<Vec<MatchRule<'static>>> {
    Ok(vec![
        job_signals_rule()?,
        job_properties_rule()?,
        owner_rule()?,
    ])
}

/// Signals matched on the bus, in the order they arrived, moved by one task into an unbounded
/// channel.
///
/// One stream of every message of the connection (filtered here by the rules) rather than one
/// stream per rule: separate streams lose the order between, say, a `PropertiesChanged` and the
/// script `Message` sent before it. Draining at once matters too: zbus blocks its socket reader
/// when a queue is full, which would also hold back the reply of `UpdateModule`.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Message>,
    task: JoinHandle<()>,
}

impl Subscription {
    /// Adds the match rules on the bus; when this returns, nothing matching can be missed.
    pub async fn new(
        connection: &Connection,
        rules: Vec<MatchRule<'static>>,
    ) -> zbus::Result<Subscription> {
        // The stream exists before the rules reach the bus, so the first matching signal is in it.
        let mut stream = MessageStream::from(connection);
        stream.set_max_queued(MATCH_QUEUE);
        let (tx, rx) = mpsc::unbounded_channel();
        let filters = rules.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                // A message zbus could not parse is not one of ours; skip it.
                let Ok(msg) = item else { continue };
                let wanted = msg.message_type() == zbus::message::Type::Signal
                    && filters
                        .iter()
                        .any(|rule| rule.matches(&msg).unwrap_or(false));
                if wanted && tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let subscription = Subscription { rx, task };
        // On a bus, signals reach us only through match rules; a peer-to-peer link sends them all.
        if connection.is_bus() {
            let dbus = fdo::DBusProxy::new(connection).await?;
            for rule in rules {
                dbus.add_match_rule(rule).await?;
            }
        }
        Ok(subscription)
    }

    /// The next matched message; `None` once the connection is gone.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// A matched message already received, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Ctrl-C (SIGINT), counted. Installed before the job is started, so that a Ctrl-C during the
/// `UpdateModule` call cancels the job it creates instead of killing the client.
pub struct Interrupt {
    signal: Option<tokio::signal::unix::Signal>,
    count: u32,
}

impl Interrupt {
    pub fn install() -> Interrupt {
        // Without a handler (should not happen) Ctrl-C keeps its default: the client dies, the job goes on.
        let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        Interrupt { signal, count: 0 }
    }

    /// Waits for the next Ctrl-C and returns how many came so far.
    pub async fn recv(&mut self) -> u32 {
        match &mut self.signal {
            Some(signal) => {
                signal.recv().await;
                self.count += 1;
                self.count
            }
            None => std::future::pending().await,
        }
    }

    pub fn count(&self) -> u32 {
        self.count
    }
}

/// What Ctrl-C does to a followed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// The client started the job: the first Ctrl-C cancels it, the second detaches.
    Cancel,
    /// The job is someone's else (`wait`): Ctrl-C detaches, the job goes on.
    Detach,
}

/// A job's end, confirmed by the service.
#[derive(Debug)]
pub struct Outcome {
    /// `GetResult`, as the service sent it.
    pub result: String,
    pub status: String,
    pub exit_code: i32,
    /// The job's id and times, for the summary.
    pub times: JobTimes,
    /// The job's instances in their order.
    pub instances: Vec<String>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.status == "completed"
    }
}

/// What one matched message means for the followed job.
#[derive(Debug, PartialEq)]
enum Event {
    Signal(JobSignal),
    Properties {
        status: Option<String>,
        progress: Option<u32>,
    },
    /// The service's name got a new owner; empty when it left the bus.
    OwnerChanged {
        new_owner: String,
    },
}

fn decode(msg: &Message, job_path: &str) -> Option<Event> {
    let header = msg.header();
    let member = header.member()?.as_str().to_owned();
    let interface = header.interface()?.as_str().to_owned();
    let path = header.path()?.as_str().to_owned();
    let body = msg.body();
    if interface == "org.freedesktop.DBus" && member == "NameOwnerChanged" {
        let (name, _old, new_owner): (String, String, String) = body.deserialize().ok()?;
        return (name == BUS_NAME).then_some(Event::OwnerChanged { new_owner });
    }
    if path != job_path {
        return None;
    }
    if let Some(signal) = JobSignal::decode(msg) {
        return Some(Event::Signal(signal));
    }
    match (interface.as_str(), member.as_str()) {
        ("org.freedesktop.DBus.Properties", "PropertiesChanged") => {
            let (iface, changed, _invalidated): (
                String,
                std::collections::HashMap<String, OwnedVariant>,
                Vec<String>,
            ) = body.deserialize().ok()?;
            if iface != JOB_INTERFACE {
                return None;
            }
            let status = changed
                .get("Status")
                .and_then(|v| v.downcast_ref::<String>().ok());
            let progress = changed
                .get("Progress")
                .and_then(|v| v.downcast_ref::<u32>().ok());
            Some(Event::Properties { status, progress })
        }
        _ => None,
    }
}

/// What a matched message asks of the follow loop.
enum Next {
    Continue,
    /// The job says it finished: confirm through `Status`/`GetResult`.
    Confirm,
    /// The service left the bus.
    OwnerLost,
}

/// Errors that say the service is no longer on the bus (as opposed to slow or refusing).
fn service_gone(err: &zbus::Error) -> bool {
    matches!(err, zbus::Error::FDO(e) if matches!(
        e.as_ref(),
        fdo::Error::ServiceUnknown(_) | fdo::Error::NameHasNoOwner(_) | fdo::Error::NoReply(_)
    ))
}

/// A terminal status: anything but `pending`/`running` (a newer service may add statuses).
fn is_terminal(status: &str) -> bool {
    !matches!(status, "pending" | "running")
}

/// Follows one job.
pub struct Follower<'a> {
    bus: &'a Bus,
    bus_name: String,
    job: JobRef,
    path: String,
    proxy: JobProxy<'static>,
}

impl<'a> Follower<'a> {
    pub async fn new(bus: &'a Bus, job: JobRef) -> Result<Follower<'a>, ClientError> {
        let bus_name = bus.describe();
        let path = job.path();
        let call = Call {
            bus: &bus_name,
            what: "reaching the job",
            job: Some(job.id()),
            instance: None,
        };
        // No property cache: every read asks the service, which is what confirming the end means.
        let proxy = JobProxy::builder(&bus.connection)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| call.error(e))?;
        Ok(Follower {
            bus,
            bus_name,
            job,
            path,
            proxy,
        })
    }

    fn error(&self, what: &str, err: zbus::Error) -> ClientError {
        if service_gone(&err) {
            return ClientError::ServiceLeft {
                bus: self.bus_name.clone(),
                job: self.job.id(),
            };
        }
        Call {
            bus: &self.bus_name,
            what,
            job: Some(self.job.id()),
            instance: None,
        }
        .error(err)
    }

    /// The job's end, if it has ended: `Status`, then `GetResult`.
    async fn confirm(&self) -> Result<Option<Outcome>, ClientError> {
        let status = self
            .proxy
            .status()
            .await
            .map_err(|e| self.error("reading the job's Status", e))?;
        if !is_terminal(&status) {
            return Ok(None);
        }
        let result = self
            .proxy
            .get_result()
            .await
            .map_err(|e| self.error("GetResult", e))?;
        let parsed: Value = serde_json::from_str(&result).map_err(|e| ClientError::Service {
            what: "GetResult".to_owned(),
            reason: format!("the result is not JSON ({e})"),
        })?;
        let status = parsed
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or(&status)
            .to_owned();
        let exit_code = parsed
            .get("exit_code")
            .and_then(Value::as_i64)
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(if status == "completed" { 0 } else { 1 });
        // The times only decorate the summary; a job without them is still finished.
        let times = JobTimes {
            id: self.job.id(),
            started_usec: self.proxy.started_usec().await.unwrap_or(0),
            finished_usec: self.proxy.finished_usec().await.unwrap_or(0),
        };
        Ok(Some(Outcome {
            result,
            status,
            exit_code,
            times,
            instances: Vec::new(),
        }))
    }

    /// Follows the job to its end. `sub` must have been created with [`follow_rules`] before the
    /// job was started (or before this call, for a job that already runs).
    pub async fn run(
        self,
        mut sub: Subscription,
        options: ViewOptions,
        interrupt: &mut Interrupt,
        on_interrupt: OnInterrupt,
    ) -> Result<Outcome, ClientError> {
        let instances = self
            .proxy
            .instances()
            .await
            .map_err(|e| self.error("reading the job's Instances", e))?;
        let mut view = View::new(options, self.job.id(), &instances);
        let (note_tx, mut note_rx) = mpsc::unbounded_channel::<String>();
        let mut cancelling: Option<tokio::task::JoinHandle<()>> = None;
        // A Ctrl-C during the UpdateModule call cancels the job that call created.
        if interrupt.count() >= 1 && on_interrupt == OnInterrupt::Cancel {
            cancelling = Some(self.request_cancel(&note_tx));
        }
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let closed = self.bus.connection.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                msg = sub.recv() => {
                    let Some(msg) = msg else {
                        return Err(ClientError::ConnectionLost { bus: self.bus_name.clone(), job: self.job.id() });
                    };
                    let next = self.apply(&mut view, &msg);
                    report_progress(&view);
                    match next {
                        Next::Confirm => {
                            if let Some(outcome) = self.confirm().await? {
                                return Ok(self.done(view, &mut sub, outcome).await);
                            }
                        }
                        Next::OwnerLost => {
                            return Err(ClientError::ServiceLeft { bus: self.bus_name.clone(), job: self.job.id() });
                        }
                        Next::Continue => {}
                    }
                }
                _ = poll.tick() => {
                    if let Some(outcome) = self.confirm().await? {
                        return Ok(self.done(view, &mut sub, outcome).await);
                    }
                    if let Ok(progress) = self.proxy.progress().await {
                        view.job_progress(progress);
                        report_progress(&view);
                    }
                }
                count = interrupt.recv() => {
                    if count >= 2 || on_interrupt == OnInterrupt::Detach {
                        // Detaching leaves the job to the service, cancelled as asked: the
                        // Cancel call must have reached it before this process goes.
                        if let Some(call) = cancelling.take() {
                            let _ = tokio::time::timeout(CANCEL_TIMEOUT, call).await;
                        }
                        view.clear();
                        return Err(ClientError::Detached { job: self.job.id() });
                    }
                    if cancelling.is_none() {
                        cancelling = Some(self.request_cancel(&note_tx));
                    }
                }
                Some(note) = note_rx.recv() => view.note(&note),
                () = &mut closed => {
                    return Err(ClientError::ConnectionLost { bus: self.bus_name.clone(), job: self.job.id() });
                }
            }
        }
    }

    /// Calls `Cancel` in the background: the loop keeps showing the job while the service stops
    /// it. The note comes once the service has taken the request, so what it says is true.
    fn request_cancel(&self, notes: &mpsc::UnboundedSender<String>) -> tokio::task::JoinHandle<()> {
        let proxy = self.proxy.clone();
        let notes = notes.clone();
        tokio::spawn(async move {
            let note = match proxy.cancel().await {
                Ok(()) => "cancelling (Ctrl-C again to detach and leave it running)".to_owned(),
                Err(err) => format!("cannot cancel: {}", crate::error::describe_zbus(&err)),
            };
            let _ = notes.send(note);
        })
    }

    /// Shows one matched message; says whether it calls for confirming the end.
    fn apply(&self, view: &mut View, msg: &Message) -> Next {
        match decode(msg, &self.path) {
            Some(Event::Signal(JobSignal::Progress {
                instance,
                step,
                percent,
            })) => view.progress(&instance, &step, percent),
            Some(Event::Signal(JobSignal::Message {
                instance,
                priority,
                text,
            })) => view.message(&instance, priority, &text),
            Some(Event::Signal(JobSignal::InstanceFinished {
                instance,
                status,
                exit_code,
            })) => {
                view.instance_finished(&instance, &status, exit_code);
            }
            // The status alone is not the end: `Finished` (or the poll) leads to GetResult.
            Some(Event::Properties { progress, .. }) => {
                if let Some(progress) = progress {
                    view.job_progress(progress);
                }
            }
            Some(Event::Signal(JobSignal::Finished { .. })) => return Next::Confirm,
            Some(Event::OwnerChanged { new_owner }) if new_owner.is_empty() => {
                return Next::OwnerLost;
            }
            Some(Event::OwnerChanged { .. }) | None => {}
        }
        Next::Continue
    }

    /// Shows what already arrived (the last script lines may trail a poll's answer), then the end.
    async fn done(&self, mut view: View, sub: &mut Subscription, mut outcome: Outcome) -> Outcome {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        while let Some(msg) = sub.try_recv() {
            self.apply(&mut view, &msg);
        }
        match JobResult::parse(&outcome.result) {
            Some(result) => view.finish(&result),
            None => view.clear(),
        }
        outcome.instances = view.order().to_vec();
        if outcome.succeeded() {
            report_progress(&view);
            if let Some(channel) = crate::comfd::channel() {
                channel.progress(100);
            }
        }
        outcome
    }
}

/// The job's percent to NS8's agent, when the client runs as one of its action steps.
fn report_progress(view: &View) {
    if let Some(channel) = crate::comfd::channel() {
        channel.progress(view.percent());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn signal<B>(path: &str, interface: &str, member: &str, body: &B) -> Message
    where
        B: serde::Serialize + zbus::wire::DynamicType,
    {
        Message::signal(path, interface, member)
            .build(body)
            .unwrap()
    }

    #[test]
    fn decodes_only_the_followed_job() {
        let job = "/org/nethserver/ModuleUpdater/job/7";
        let msg = signal(job, JOB_INTERFACE, "Progress", &("mail1", "extract", 60u32));
        assert_eq!(
            decode(&msg, job),
            Some(Event::Signal(JobSignal::Progress {
                instance: "mail1".into(),
                step: "extract".into(),
                percent: 60
            }))
        );
        assert_eq!(decode(&msg, "/org/nethserver/ModuleUpdater/job/8"), None);
        let msg = signal(job, JOB_INTERFACE, "Finished", &("completed", 0i32));
        assert_eq!(
            decode(&msg, job),
            Some(Event::Signal(JobSignal::Finished {
                status: "completed".into(),
                exit_code: 0
            }))
        );
        let msg = signal(
            job,
            JOB_INTERFACE,
            "InstanceFinished",
            &("mail1", "failed", 1i32),
        );
        assert_eq!(
            decode(&msg, job),
            Some(Event::Signal(JobSignal::InstanceFinished {
                instance: "mail1".into(),
                status: "failed".into(),
                exit_code: 1
            }))
        );
    }

    #[test]
    fn decodes_owner_changes_and_properties() {
        let msg = signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
            &(BUS_NAME, ":1.5", ""),
        );
        assert_eq!(
            decode(&msg, "/org/nethserver/ModuleUpdater/job/1"),
            Some(Event::OwnerChanged {
                new_owner: String::new()
            })
        );
        let job = "/org/nethserver/ModuleUpdater/job/1";
        let mut changed = std::collections::HashMap::new();
        changed.insert("Status", zbus::wire::Variant::from("completed"));
        changed.insert("Progress", zbus::wire::Variant::from(100u32));
        let msg = signal(
            job,
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
            &(JOB_INTERFACE, changed, Vec::<String>::new()),
        );
        assert_eq!(
            decode(&msg, job),
            Some(Event::Properties {
                status: Some("completed".into()),
                progress: Some(100)
            })
        );
    }

    #[test]
    fn rules_are_valid() {
        follow_rules().unwrap();
        service_rule().unwrap();
        assert!(is_terminal("completed") && is_terminal("aborted") && !is_terminal("running"));
    }
}
