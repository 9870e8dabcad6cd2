//! The commands: each talks to the service through the proxies of `module-updater-dbus` and
//! returns the process exit code (or the error that decides it).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use module_updater_dbus::{JobProxy, ModuleUpdaterProxy};
use serde_json::{Value, json};
use zbus::proxy::CacheProperties;

use crate::bus::{self, Bus};
use crate::cli::{Cli, Command, GenerateWhat, JobRef, Ns8Action, RunAction};
use crate::clock::{Clock, usec_iso_utc};
use crate::error::{Call, ClientError, exit};
use crate::follow::{
    Follower, Interrupt, OnInterrupt, Outcome, Subscription, follow_rules, owner_rule, service_rule,
};
mod instances;
mod plan;

use crate::render::{self, Mode, ViewOptions};
use crate::summary::{self, JobResult};
use instances::{check, history, list, or_dash, show};

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    if !text.ends_with('\n') {
        let _ = stdout.write_all(b"\n");
    }
    let _ = stdout.flush();
}

fn out_json(value: &Value) {
    out(&value.to_string());
}

struct Ctx {
    bus: Bus,
    bus_name: String,
    json: bool,
    quiet: bool,
    verbose: bool,
    clock: Clock,
}

/// How a followed job's end is printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The result JSON, as `GetResult` returned it.
    Json,
    /// The human summary.
    Summary,
}

impl Ctx {
    /// The summary for a person at a terminal; the JSON for --json, --quiet, pipes and files.
    fn ending(&self) -> Ending {
        if self.json || self.quiet || !std::io::stdout().is_terminal() {
            Ending::Json
        } else {
            Ending::Summary
        }
    }

    fn view_options(&self) -> ViewOptions {
        ViewOptions {
            mode: Mode::detect(self.quiet),
            verbose: self.verbose,
            clock: self.clock.clone(),
        }
    }

    fn call<'a>(&'a self, what: &'a str) -> Call<'a> {
        Call {
            bus: &self.bus_name,
            what,
            job: None,
            instance: None,
        }
    }

    async fn manager(&self) -> Result<ModuleUpdaterProxy<'static>, ClientError> {
        ModuleUpdaterProxy::new(&self.bus.connection)
            .await
            .map_err(|e| self.call("reaching the service").error(e))
    }

    async fn job(&self, job: &JobRef) -> Result<JobProxy<'static>, ClientError> {
        JobProxy::builder(&self.bus.connection)
            .path(job.path())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| self.job_call("reaching the job", job).error(e))
    }

    fn job_call<'a>(&'a self, what: &'a str, job: &JobRef) -> Call<'a> {
        Call {
            bus: &self.bus_name,
            what,
            job: Some(job.id()),
            instance: None,
        }
    }
}

/// Runs the parsed command line; the value is the exit code.
pub async fn run(cli: Cli) -> Result<u8, ClientError> {
    let Cli {
        bus: bus_args,
        timeout,
        no_ask_password,
        json,
        quiet,
        verbose,
        utc,
        command,
    } = cli;
    if let Command::Generate { what } = &command {
        return generate(what);
    }
    // Through the cluster's Redis, not the bus.
    if let Command::Ns8 {
        action:
            Ns8Action::Update {
                data,
                agent_env,
                credentials,
            },
    } = command
    {
        let request = data.read(std::io::stdin().lock())?;
        let access = crate::cluster::Access {
            agent_env,
            credentials,
        };
        return tokio::task::spawn_blocking(move || crate::cluster::update(&request, &access))
            .await
            .map_err(|e| ClientError::Local {
                what: "update over the cluster".to_owned(),
                reason: e.to_string(),
            })?;
    }
    if matches!(command, Command::Version) && !json {
        out(&format!("module-updater {}", env!("CARGO_PKG_VERSION")));
    }
    // As systemctl: polkit may prompt only when there is someone at a terminal to answer.
    let ask_password = !no_ask_password && std::io::stdin().is_terminal();
    let bus = bus::connect(&bus_args, Duration::from_secs_f64(timeout), ask_password).await?;
    let ctx = Ctx {
        bus_name: bus.describe(),
        bus,
        json,
        quiet,
        verbose,
        clock: Clock::new(utc),
    };
    match command {
        Command::Run {
            action: RunAction::UpdateModule { data, dry_run },
        } => {
            let request = data.read(std::io::stdin().lock())?;
            if dry_run {
                return plan::dry_run(&ctx, &request).await;
            }
            // api-cli compatibility: stdout is the result JSON, whatever it is connected to.
            start_and_follow(&ctx, &request, Ending::Json).await
        }
        Command::Update {
            module_url,
            instances,
            force,
            allow_downgrade,
            dry_run,
        } => {
            update(
                &ctx,
                &module_url,
                &instances,
                force,
                allow_downgrade,
                dry_run,
            )
            .await
        }
        Command::List => list(&ctx).await,
        Command::Show { instance } => show(&ctx, &instance).await,
        Command::Jobs => jobs(&ctx).await,
        Command::History { instance } => history(&ctx, instance.as_deref()).await,
        Command::Check { instances, refresh } => check(&ctx, &instances, refresh).await,
        Command::Status { job } => status(&ctx, &job).await,
        Command::Cancel { job } => cancel(&ctx, &job).await,
        Command::Wait { job } => wait(&ctx, &job).await,
        Command::Monitor => monitor(&ctx).await,
        Command::Version => version(&ctx).await,
        Command::Generate { .. } | Command::Ns8 { .. } => Ok(exit::SUCCESS),
    }
}

fn generate(what: &GenerateWhat) -> Result<u8, ClientError> {
    let mut buffer = Vec::new();
    let rendered = match what {
        GenerateWhat::Completions { shell } => crate::generate::completions(*shell, &mut buffer),
        GenerateWhat::Man { list: true, .. } => {
            for name in crate::generate::subcommand_names() {
                buffer.extend_from_slice(format!("{name}\n").as_bytes());
            }
            Ok(())
        }
        GenerateWhat::Man {
            subcommand: None, ..
        } => crate::generate::man(&mut buffer),
        GenerateWhat::Man {
            subcommand: Some(name),
            ..
        } => crate::generate::subcommand_man(name, &mut buffer).ok_or_else(|| {
            ClientError::Usage(format!(
                "no man page for {name:?}; the subcommands with one are: {}",
                crate::generate::subcommand_names().join(" ")
            ))
        })?,
    };
    rendered.map_err(|e| ClientError::Local {
        what: "render the man page or the completion script".to_owned(),
        reason: e.to_string(),
    })?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&buffer)
        .and_then(|()| stdout.flush())
        .map_err(|e| ClientError::Local {
            what: "write to stdout".to_owned(),
            reason: e.to_string(),
        })?;
    Ok(exit::SUCCESS)
}

/// Prints the result (JSON or summary) and turns the job's status into the exit code.
fn finish(ctx: &Ctx, job: &JobRef, outcome: Outcome, ending: Ending) -> Result<u8, ClientError> {
    match (ending, JobResult::parse(&outcome.result)) {
        (Ending::Summary, Some(result)) => out(&summary::job_summary(
            &outcome.times,
            &result,
            &outcome.instances,
            &ctx.clock,
        )),
        // A result this client cannot read is shown as it came.
        _ => out(outcome.result.trim_end()),
    }
    if outcome.succeeded() {
        Ok(exit::SUCCESS)
    } else {
        Err(ClientError::JobFailed {
            job: job.id(),
            status: outcome.status,
            exit_code: outcome.exit_code,
        })
    }
}

/// Subscribes, calls `UpdateModule`, follows the job it returns.
async fn start_and_follow(ctx: &Ctx, request: &str, ending: Ending) -> Result<u8, ClientError> {
    let mut interrupt = Interrupt::install();
    let rules = follow_rules().map_err(|e| ctx.call("building the match rules").error(e))?;
    // Before the call: the job's first signals (even its end) may come before the reply.
    let sub = Subscription::new(&ctx.bus.connection, rules)
        .await
        .map_err(|e| ctx.call("subscribing to the job signals").error(e))?;
    let manager = ctx.manager().await?;
    let body = (request,);
    let call =
        ctx.bus
            .call_gated::<_, zbus::OwnedObjectPath>(manager.inner(), "UpdateModule", &body);
    tokio::pin!(call);
    let reply = loop {
        tokio::select! {
            reply = &mut call => break reply,
            count = interrupt.recv() => if count >= 2 {
                return Err(ClientError::InterruptedEarly);
            },
        }
    };
    let path = reply.map_err(|e| ctx.call("UpdateModule").error(e))?;
    let job = JobRef::from_path(path.as_str()).ok_or_else(|| ClientError::Service {
        what: "UpdateModule".to_owned(),
        reason: format!("it returned {path}, which is not a job path"),
    })?;
    let outcome = Follower::new(&ctx.bus, job.clone())
        .await?
        .run(sub, ctx.view_options(), &mut interrupt, OnInterrupt::Cancel)
        .await?;
    finish(ctx, &job, outcome, ending)
}

async fn update(
    ctx: &Ctx,
    module_url: &str,
    instances: &[String],
    force: bool,
    allow_downgrade: bool,
    dry_run: bool,
) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    // NS8's update-module command refuses to put an image of another type on an instance. A
    // dry run leaves it to the service, whose plan says it per instance.
    for id in instances.iter().filter(|_| !dry_run) {
        let call = Call {
            bus: &ctx.bus_name,
            what: "GetInstance",
            job: None,
            instance: Some(id),
        };
        match manager.get_instance(id).await {
            Ok(environment) => {
                if let Some(current) = environment.get("IMAGE_URL")
                    && let Some((current_name, new_name)) =
                        crate::ns8::type_mismatch(current, module_url)
                {
                    return Err(ClientError::TypeMismatch {
                        instance: id.clone(),
                        current: current_name.to_owned(),
                        new: new_name.to_owned(),
                        url: module_url.to_owned(),
                    });
                }
            }
            // An unknown (or malformed) id is the service's to report, with NS8's validation array.
            Err(err) => match call.error(err) {
                ClientError::NoSuchInstance { .. } => {}
                other => return Err(other),
            },
        }
    }
    let mut request = json!({ "module_url": module_url, "instances": instances, "force": force });
    if allow_downgrade {
        request["allow_downgrade"] = json!(true);
    }
    if dry_run {
        return plan::dry_run(ctx, &request.to_string()).await;
    }
    start_and_follow(ctx, &request.to_string(), ctx.ending()).await
}

/// The properties of a job, read one by one from the service.
struct JobInfo {
    id: u64,
    path: String,
    action: String,
    status: String,
    progress: u32,
    exit_code: i32,
    instances: Vec<String>,
    caller_uid: u32,
    started_usec: u64,
    finished_usec: u64,
    request: String,
}

async fn job_info(proxy: &JobProxy<'static>, job: &JobRef) -> zbus::Result<JobInfo> {
    Ok(JobInfo {
        id: proxy.id().await?,
        path: job.path(),
        action: proxy.action().await?,
        status: proxy.status().await?,
        progress: proxy.progress().await?,
        exit_code: proxy.exit_code().await?,
        instances: proxy.instances().await?,
        caller_uid: proxy.caller_uid().await?,
        started_usec: proxy.started_usec().await?,
        finished_usec: proxy.finished_usec().await?,
        request: proxy.request().await?,
    })
}

impl JobInfo {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "path": self.path,
            "action": self.action,
            "status": self.status,
            "progress": self.progress,
            "exit_code": self.exit_code,
            "instances": self.instances,
            "caller_uid": self.caller_uid,
            "started_usec": self.started_usec,
            "finished_usec": self.finished_usec,
            "started": usec_iso_utc(self.started_usec),
            "finished": usec_iso_utc(self.finished_usec),
        })
    }

    fn exit_cell(&self) -> String {
        if self.finished_usec == 0 && self.exit_code < 0 {
            "-".to_owned()
        } else {
            self.exit_code.to_string()
        }
    }
}

async fn jobs(ctx: &Ctx) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    let paths = manager
        .list_jobs()
        .await
        .map_err(|e| ctx.call("ListJobs").error(e))?;
    let mut infos = Vec::new();
    for path in paths {
        let Some(job) = JobRef::from_path(path.as_str()) else {
            continue;
        };
        let proxy = ctx.job(&job).await?;
        match job_info(&proxy, &job).await {
            Ok(info) => infos.push(info),
            // A job whose linger time ended between ListJobs and now is simply gone.
            Err(err) => match ctx.job_call("reading the job", &job).error(err) {
                ClientError::NoSuchJob { .. } => {}
                other => return Err(other),
            },
        }
    }
    infos.sort_by_key(|info| info.id);
    if ctx.json {
        out_json(&Value::Array(infos.iter().map(JobInfo::to_json).collect()));
    } else {
        let rows: Vec<Vec<String>> = infos
            .iter()
            .map(|info| {
                vec![
                    info.id.to_string(),
                    info.status.clone(),
                    format!("{}%", info.progress),
                    info.exit_cell(),
                    ctx.clock.usec(info.started_usec),
                    info.instances.join(" "),
                ]
            })
            .collect();
        out(&render::table(
            &["JOB", "STATUS", "PROGRESS", "EXIT", "STARTED", "INSTANCES"],
            &rows,
        ));
    }
    Ok(exit::SUCCESS)
}

async fn status(ctx: &Ctx, job: &JobRef) -> Result<u8, ClientError> {
    let proxy = ctx.job(job).await?;
    let info = job_info(&proxy, job)
        .await
        .map_err(|e| ctx.job_call("reading the job", job).error(e))?;
    let finished = !matches!(info.status.as_str(), "pending" | "running");
    let result_text = if finished {
        Some(
            proxy
                .get_result()
                .await
                .map_err(|e| ctx.job_call("GetResult", job).error(e))?,
        )
    } else {
        None
    };
    let states = proxy
        .instance_states()
        .await
        .map_err(|e| ctx.job_call("reading the job", job).error(e))?;
    if ctx.json {
        let mut value = info.to_json();
        value["instance_states"] = states
            .iter()
            .map(|(id, (status, step, percent, exit_code))| {
                let state = json!({
                    "status": status, "step": step, "percent": percent, "exit_code": exit_code,
                });
                (id.clone(), state)
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        value["request"] = Value::String(info.request.clone());
        value["result"] = result_text.as_deref().map_or(Value::Null, |text| {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        });
        out_json(&value);
        return Ok(exit::SUCCESS);
    }
    let rows = vec![
        vec!["Job:".to_owned(), format!("{} ({})", info.id, info.path)],
        vec!["Action:".to_owned(), info.action.clone()],
        vec!["Instances:".to_owned(), info.instances.join(" ")],
        vec!["Status:".to_owned(), info.status.clone()],
        vec!["Progress:".to_owned(), format!("{}%", info.progress)],
        vec!["Exit code:".to_owned(), info.exit_cell()],
        vec!["Caller UID:".to_owned(), info.caller_uid.to_string()],
        vec!["Started:".to_owned(), ctx.clock.usec(info.started_usec)],
        vec!["Finished:".to_owned(), ctx.clock.usec(info.finished_usec)],
        vec!["Request:".to_owned(), info.request.clone()],
    ];
    // The table helper prints a header line; the first row serves as none here.
    let text = render::table(&["", ""], &rows);
    let mut text: String = text.lines().skip(1).map(|l| format!("{l}\n")).collect();
    let rows: Vec<Vec<String>> = info
        .instances
        .iter()
        .filter_map(|id| states.get(id).map(|state| (id, state)))
        .map(|(id, (status, step, percent, exit_code))| {
            let exit = if *exit_code < 0 && matches!(status.as_str(), "pending" | "running") {
                "-".to_owned()
            } else {
                exit_code.to_string()
            };
            vec![
                id.clone(),
                status.clone(),
                or_dash(step).to_owned(),
                format!("{percent}%"),
                exit,
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&render::table(
        &["INSTANCE", "STATUS", "STEP", "PROGRESS", "EXIT"],
        &rows,
    ));
    match result_text.as_deref().map(|t| (t, JobResult::parse(t))) {
        Some((_, Some(result))) => {
            text.push('\n');
            text.push_str(&summary::instances_and_more(
                info.id,
                &result,
                &info.instances,
            ));
        }
        Some((raw, None)) => {
            text.push_str(&format!("Result:     {}\n", raw.trim_end()));
        }
        None => {}
    }
    out(&text);
    Ok(exit::SUCCESS)
}

async fn cancel(ctx: &Ctx, job: &JobRef) -> Result<u8, ClientError> {
    let proxy = ctx.job(job).await?;
    ctx.bus
        .call_gated::<_, ()>(proxy.inner(), "Cancel", &())
        .await
        .map_err(|e| ctx.job_call("Cancel", job).error(e))?;
    if ctx.json {
        out_json(&json!({ "job": job.path(), "cancel": "requested" }));
    } else if !ctx.quiet {
        out(&format!(
            "cancel requested for job {job}; follow it with `module-updater wait {job}`"
        ));
    }
    Ok(exit::SUCCESS)
}

async fn wait(ctx: &Ctx, job: &JobRef) -> Result<u8, ClientError> {
    let mut interrupt = Interrupt::install();
    let rules = follow_rules().map_err(|e| ctx.call("building the match rules").error(e))?;
    let sub = Subscription::new(&ctx.bus.connection, rules)
        .await
        .map_err(|e| ctx.call("subscribing to the job signals").error(e))?;
    let outcome = Follower::new(&ctx.bus, job.clone())
        .await?
        .run(sub, ctx.view_options(), &mut interrupt, OnInterrupt::Detach)
        .await?;
    finish(ctx, job, outcome, ctx.ending())
}

async fn monitor(ctx: &Ctx) -> Result<u8, ClientError> {
    let mut interrupt = Interrupt::install();
    let rules = vec![
        service_rule().map_err(|e| ctx.call("building the match rules").error(e))?,
        owner_rule().map_err(|e| ctx.call("building the match rules").error(e))?,
    ];
    let mut sub = Subscription::new(&ctx.bus.connection, rules)
        .await
        .map_err(|e| ctx.call("subscribing to the service's signals").error(e))?;
    if !ctx.quiet {
        eprintln!(
            "Monitoring {} on {} (Ctrl-C to stop)",
            module_updater_dbus::BUS_NAME,
            ctx.bus_name
        );
    }
    loop {
        tokio::select! {
            msg = sub.recv() => match msg {
                Some(msg) => {
                    if from_the_service(&msg) {
                        out(&render::monitor_line(&msg, ctx.json, &ctx.clock));
                    }
                }
                None => {
                    return Err(ClientError::Unreachable {
                        bus: ctx.bus_name.clone(),
                        reason: "the connection to the bus was lost".to_owned(),
                    });
                }
            },
            // Ctrl-C is how a monitor normally ends.
            _ = interrupt.recv() => return Ok(exit::SUCCESS),
        }
    }
}

/// The bus driver's own signals to us (NameAcquired, NameLost) pass the client-side check of a
/// rule whose sender is a well-known name; only NameOwnerChanged of the service is wanted.
fn from_the_service(msg: &zbus::Message) -> bool {
    let header = msg.header();
    let from_bus = header
        .sender()
        .is_some_and(|s| s.as_str() == "org.freedesktop.DBus");
    !from_bus
        || header
            .member()
            .is_some_and(|m| m.as_str() == "NameOwnerChanged")
}

async fn version(ctx: &Ctx) -> Result<u8, ClientError> {
    let manager = ctx.manager().await?;
    let daemon = manager
        .version()
        .await
        .map_err(|e| ctx.call("reading Version").error(e))?;
    if ctx.json {
        out_json(&json!({ "client": env!("CARGO_PKG_VERSION"), "daemon": daemon }));
    } else {
        out(&format!("module-updaterd {daemon}"));
    }
    Ok(exit::SUCCESS)
}
