//! The Cockpit page (`cockpit/`) in a real browser: Debian's cockpit-ws and bridge on the sandbox's
//! bus, headless Chromium, real instances updated by the real daemon. Each scenario leaves a
//! screenshot in `target/cockpit-screenshots/<name>.png`.
//!
//! A new scenario is a [`Page::open`] on a [`Scenario`] builder, then `wait`/`click`/`fill`
//! on what a user sees, then [`Page::shot`].

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{Scenario, ScenarioBuilder, module_image};
use module_updater_tests::Cockpit;
use serde_json::Value;

/// How long the page may take to show what a step changed (a job's end included).
const SHOWN: Duration = Duration::from_secs(120);

/// The page open on a started scenario. The browser and cockpit-ws go before the sandbox.
struct Page {
    cockpit: Cockpit,
    name: String,
    s: Scenario,
}

impl Page {
    /// Builds the scenario, starts cockpit-ws and Chromium on its bus and opens the page, once
    /// it has listed the instances and their updates.
    fn open(builder: ScenarioBuilder, name: &str) -> Page {
        Page::open_as(builder, name, false)
    }

    /// [`Page::open`]; with `unprivileged`, Cockpit's session is the first instance's user's
    /// (no administrative access) instead of root's.
    fn open_as(builder: ScenarioBuilder, name: &str, unprivileged: bool) -> Page {
        let mut s = builder.build();
        let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cockpit");
        let user = unprivileged.then(|| (s.instances[0].uid, s.instances[0].gid));
        let cockpit = s
            .sandbox
            .start_cockpit_as(&package, user)
            .expect("start cockpit-ws and chromium");
        let mut page = Page {
            cockpit,
            name: name.to_owned(),
            s,
        };
        let url = page.cockpit.page_url();
        page.cockpit
            .browser()
            .navigate(&url)
            .expect("open the page");
        page.wait_ready();
        page
    }

    fn wait_ready(&mut self) {
        self.wait(
            "the page listing the instances",
            "document.body.dataset.ready === 'true'",
        );
    }

    /// Waits until `expression` (JavaScript) is true; on timeout, a screenshot
    /// (`<name>-failed.png`) and a panic with what the page shows.
    fn wait(&mut self, what: &str, expression: &str) {
        if let Err(error) = self.cockpit.browser().wait_until(what, expression, SHOWN) {
            let shot = screenshot_path(&format!("{}-failed", self.name));
            let _ = self.cockpit.browser().screenshot(&shot);
            panic!("{error}\n(screenshot: {})", shot.display());
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        self.cockpit
            .browser()
            .eval(expression)
            .unwrap_or_else(|e| panic!("evaluate {expression}: {e}"))
    }

    /// The text of every element matching `selector`.
    fn texts(&mut self, selector: &str) -> Vec<String> {
        let value = self.eval(&format!(
            "[...document.querySelectorAll({selector:?})].map(e => e.textContent.trim())"
        ));
        serde_json::from_value(value).unwrap()
    }

    /// The text of the cell `class` in the instance's row.
    fn cell(&mut self, instance: &str, class: &str) -> String {
        let texts = self.texts(&format!(
            "#instances tr[data-instance='{instance}'] .{class}"
        ));
        assert_eq!(texts.len(), 1, "one {class} cell for {instance}");
        texts[0].clone()
    }

    fn click(&mut self, selector: &str) {
        let clicked = self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); if (!e || e.disabled) return false; e.click(); return true; }})()"
        ));
        assert_eq!(clicked, Value::Bool(true), "{selector} is there to click");
    }

    fn fill(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); e.value = {text:?}; e.dispatchEvent(new Event('input')); }})()"
        ));
    }

    /// Ticks the instances' checkboxes.
    fn select(&mut self, ids: &[&str]) {
        for id in ids {
            self.click(&format!("#instances tr[data-instance='{id}'] .mu-select"));
        }
    }

    /// The job card the page shows first (the newest job).
    fn job_number(&mut self) -> String {
        self.eval("document.querySelector('#jobs [data-job]').dataset.job")
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn shot(&mut self) {
        self.shot_as(&self.name.clone());
    }

    fn shot_as(&mut self, name: &str) {
        let path = screenshot_path(name);
        self.cockpit
            .browser()
            .screenshot(&path)
            .expect("take a screenshot");
        assert!(std::fs::metadata(&path).unwrap().len() > 1000, "{path:?}");
    }
}

fn screenshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/cockpit-screenshots")
        .join(format!("{name}.png"))
}

/// Module `demo` at 1.0 and 2.0, `count` rootless instances at `at`.
fn demo(count: usize, at: &str) -> ScenarioBuilder {
    Scenario::new()
        .module("demo", &["1.0", "2.0"])
        .rootless("demo", count, at)
}

/// Module `demo` at 1.0, and a 2.0 whose update script prints two lines then waits for a file
/// `gate` in the instance's state dir ([`open_gate`]); `count` instances at 1.0.
fn gated(count: usize) -> ScenarioBuilder {
    Scenario::new()
        .image_with("1.0", |_| module_image("demo", "1.0", &[]))
        .image_with("2.0", |_| {
            module_image("demo", "2.0", &[]).file(
                "update-module.d/50gate",
                "#!/bin/sh\necho 'first line'\necho 'second line'\n\
                 while [ ! -e gate ]; do sleep 0.1; done\necho 'after the gate'\n",
                0o755,
            )
        })
        .rootless("demo", count, "1.0")
}

fn open_gate(s: &Scenario) {
    for instance in &s.instances {
        std::fs::write(instance.state_dir.join("gate"), "").unwrap();
    }
}

/// `module-updater update URL IDS...` in the background, as an administrator in a terminal.
fn cli_update(s: &Scenario, key: &str) -> Child {
    s.sandbox
        .client()
        .expect("the module-updater binary (cargo build -p module-updater)")
        .arg("update")
        .arg(s.url(key))
        .args(s.ids())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    for _ in 0..1200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the CLI did not end");
}

#[test]
fn the_list_shows_each_instance_and_check_again_asks_the_registry() {
    let mut page = Page::open(demo(2, "1.0"), "list");
    let ids: Vec<String> = page.s.ids().iter().map(|s| (*s).to_owned()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(page.texts("#instances tbody .mu-id"), sorted);
    for id in &ids {
        assert!(page.cell(id, "mu-module").ends_with("/demo"));
        assert_eq!(page.cell(id, "mu-version"), "1.0");
        let digest = page.cell(id, "mu-digest");
        assert!(
            digest.len() == 12 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "short digest: {digest:?}"
        );
        assert!(page.cell(id, "mu-state").starts_with("idle"));
        assert_eq!(page.cell(id, "mu-last"), "never");
        assert_eq!(page.cell(id, "mu-available"), "2.0");
    }
    assert!(page.texts("#checked")[0].starts_with("Checked"));
    page.shot();

    // A 3.0 appears and 1.0 is pushed again with other content: only "Check again" sees them.
    let sandbox = &page.s.sandbox;
    sandbox
        .build_image(&module_image("demo", "3.0", &[]))
        .unwrap();
    sandbox
        .build_image(&module_image("demo", "1.0", &[]).file("bin/extra", "moved\n", 0o755))
        .unwrap();
    page.click("#refresh");
    page.wait(
        "3.0 and the moved tag after Check again",
        "[...document.querySelectorAll('#instances tbody .mu-available')]\
         .every(c => c.querySelector('.mu-newest')?.textContent === '3.0' && c.querySelector('.mu-moved'))",
    );
    assert_eq!(page.texts(".mu-moved"), vec!["tag moved"; 2]);
    page.shot_as("check-again");
}

#[test]
fn two_instances_updated_to_2_0_show_every_step_to_100_percent_and_the_new_version() {
    let mut page = Page::open(demo(2, "1.0"), "update");
    let ids: Vec<String> = page.s.ids().iter().map(|s| (*s).to_owned()).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    page.select(&refs);
    assert_eq!(
        page.texts("#selection"),
        vec![format!(
            "2 instances of {}/demo selected",
            page.s.images.registry()
        )]
    );
    page.fill("#target", "2.0");
    page.click("#update");
    page.wait(
        "the job completed",
        "document.querySelector('#jobs [data-job]')?.dataset.status === 'completed'",
    );
    page.wait(
        "both instances at 2.0 in the list",
        "[...document.querySelectorAll('#instances tbody .mu-version')].every(c => c.textContent === '2.0')",
    );
    assert_eq!(
        page.texts("#jobs .mu-job-instance .mu-percent"),
        vec!["100 %"; 2]
    );
    assert_eq!(
        page.texts("#jobs .mu-job-instance .mu-status"),
        vec!["completed"; 2]
    );
    let bars = page.eval("[...document.querySelectorAll('#jobs progress')].map(p => p.value)");
    assert_eq!(bars, serde_json::json!([100, 100]));
    page.wait(
        "both instances' results",
        "document.querySelectorAll('#jobs .mu-result').length === 2",
    );
    let results = page.texts("#jobs .mu-result");
    for (id, result) in ids.iter().zip(&results) {
        assert!(result.contains(&page.s.url("2.0")), "{id}: {result}");
    }
    page.wait(
        "no update left to offer",
        "[...document.querySelectorAll('#instances tbody .mu-available')].every(c => c.textContent === 'up to date')",
    );
    page.wait(
        "the last update of both instances",
        "[...document.querySelectorAll('#instances tbody .mu-last')].every(c => c.textContent.startsWith('completed'))",
    );
    page.click(&format!(
        "#instances tr[data-instance='{}'] .mu-history-button",
        ids[0]
    ));
    page.wait(
        "the history",
        "document.querySelectorAll('#history tbody tr').length === 1",
    );
    assert!(page.texts("#history tbody tr")[0].contains("completed"));
    page.shot();
}

#[test]
fn a_refused_request_is_shown_field_by_field() {
    let mut page = Page::open(demo(1, "2.0"), "validation");
    let id = page.s.ids()[0].to_owned();
    page.select(&[&id]);
    page.fill("#target", "1.0");
    page.click("#update");
    page.wait(
        "the validation error",
        "document.querySelector('#errors').dataset.kind === 'ValidationFailed'",
    );
    let row = page.texts("#errors tr[data-field='module_url']");
    assert_eq!(row.len(), 1, "one refused field: {row:?}");
    assert!(row[0].contains("module_url_downgrade"), "{row:?}");
    assert!(row[0].contains("it runs"), "{row:?}");
    assert!(page.texts("#jobs [data-job]").is_empty(), "no job started");
    assert_eq!(page.cell(&id, "mu-version"), "2.0");
    page.shot();
}

#[test]
fn a_busy_instance_names_its_job_which_the_page_follows_and_cancels() {
    let mut page = Page::open(gated(1), "busy");
    let id = page.s.ids()[0].to_owned();
    let cli = cli_update(&page.s, "2.0");
    page.wait(
        "the CLI's job waiting at its gate",
        "document.querySelector('#jobs .mu-log')?.textContent.includes('second line')",
    );
    let job = page.job_number();
    page.select(&[&id]);
    page.fill("#target", "2.0");
    page.click("#update");
    page.wait(
        "the Busy error",
        "document.querySelector('#errors').dataset.kind === 'Busy'",
    );
    assert_eq!(
        page.texts("#errors .mu-busy"),
        vec![format!(
            "{id} is being updated by job {job}. Follow job {job}"
        )]
    );
    page.click("#errors .mu-follow");
    page.wait(
        "the job marked as followed",
        &format!(
            "document.querySelector('#jobs [data-job=\"{job}\"]').classList.contains('mu-followed')"
        ),
    );
    page.shot();

    page.click(&format!("#jobs [data-job='{job}'] .mu-cancel"));
    page.wait(
        "the job aborted",
        &format!(
            "document.querySelector('#jobs [data-job=\"{job}\"]').dataset.status === 'aborted'"
        ),
    );
    page.wait(
        "the instance cancelled",
        "document.querySelector('#jobs .mu-job-instance').dataset.status === 'cancelled'",
    );
    assert!(
        !wait_exit(cli).success(),
        "the CLI reports the cancelled job"
    );
    page.wait(
        "the instance idle at 1.0",
        &format!("document.querySelector(\"#instances tr[data-instance='{id}'] .mu-state\").textContent === 'idle'"),
    );
    // The cancel stopped the update script: a warning naming it in the instance's result, which
    // the page fetches (GetResult) once the job has ended.
    page.wait(
        "the instance's result",
        "document.querySelector('#jobs .mu-result')?.textContent.includes('50gate')",
    );
    let result = page.texts("#jobs .mu-result");
    assert!(
        result.len() == 1 && result[0].contains("Warning: ") && result[0].contains("50gate"),
        "{result:?}"
    );
    page.wait(
        "the last update cancelled",
        "document.querySelector('#instances tbody .mu-last').textContent.startsWith('cancelled')",
    );
    page.shot_as("cancel");
}

#[test]
fn a_job_started_by_the_cli_appears_live_and_a_reload_shows_its_progress_and_log_so_far() {
    let mut page = Page::open(gated(2), "cli-job");
    let cli = cli_update(&page.s, "2.0");
    // The log comes by Message signals, the step by coalesced PropertiesChanged: wait for both.
    page.wait(
        "the CLI's job with both instances at their gate",
        "[...document.querySelectorAll('#jobs .mu-job-instance')].length === 2 && \
         [...document.querySelectorAll('#jobs .mu-log')].every(l => l.textContent.includes('second line')) && \
         [...document.querySelectorAll('#jobs .mu-step')].every(s => s.textContent === 'run scripts')",
    );
    assert_eq!(
        page.texts("#jobs .mu-job-instance .mu-status"),
        vec!["running"; 2]
    );
    let percents = page.texts("#jobs .mu-job-instance .mu-percent");
    let logs = page.texts("#jobs .mu-log");
    page.shot();

    page.cockpit.browser().reload().expect("reload the page");
    page.wait_ready();
    page.wait(
        "the log so far after the reload",
        "[...document.querySelectorAll('#jobs .mu-log')].length === 2 && \
         [...document.querySelectorAll('#jobs .mu-log')].every(l => l.textContent.endsWith('first line\\nsecond line'))",
    );
    // The log read back with GetMessages is the one the signals had shown, line for line.
    assert_eq!(page.texts("#jobs .mu-log"), logs);
    assert_eq!(
        page.texts("#jobs .mu-job-instance .mu-step"),
        vec!["run scripts"; 2]
    );
    assert_eq!(page.texts("#jobs .mu-job-instance .mu-percent"), percents);
    for id in page
        .s
        .ids()
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
    {
        assert!(page.cell(&id, "mu-state").starts_with("updating"));
    }
    page.shot_as("reload");

    open_gate(&page.s);
    page.wait(
        "the job completed, the log's last line shown",
        "document.querySelector('#jobs [data-job]').dataset.status === 'completed' && \
         [...document.querySelectorAll('#jobs .mu-log')].every(l => l.textContent.includes('second line\\nafter the gate'))",
    );
    assert!(wait_exit(cli).success());
    page.wait(
        "both instances at 2.0",
        "[...document.querySelectorAll('#instances tbody .mu-version')].every(c => c.textContent === '2.0')",
    );
    page.shot_as("cli-job-done");
}

#[test]
fn a_user_without_administrative_access_gets_a_read_only_view() {
    let mut page = Page::open_as(demo(2, "1.0"), "read-only", true);
    page.wait(
        "the limited-access notice",
        "!document.querySelector('#notice').hidden",
    );
    assert!(page.texts("#notice")[0].contains("administrative access"));
    // Everything is shown; nothing can be changed.
    let ids: Vec<String> = page.s.ids().iter().map(|s| (*s).to_owned()).collect();
    for id in &ids {
        assert_eq!(page.cell(id, "mu-version"), "1.0");
        assert_eq!(page.cell(id, "mu-available"), "2.0");
    }
    let disabled = page.eval(
        "[...document.querySelectorAll('.mu-select, #update, #target')].every(e => e.disabled)",
    );
    assert_eq!(disabled, Value::Bool(true));
    page.click(&format!(
        "#instances tr[data-instance='{}'] .mu-history-button",
        ids[0]
    ));
    page.wait(
        "the history, readable by everyone",
        "document.querySelector('#history').textContent.includes('No update yet.')",
    );
    page.shot();
}

#[test]
fn review_shows_what_the_update_would_do_and_changes_nothing() {
    let mut page = Page::open(demo(2, "1.0"), "review");
    page.wait(
        "the Review button (the service has PlanUpdate)",
        "!document.querySelector('#review').hidden",
    );
    let ids: Vec<String> = page.s.ids().iter().map(|s| (*s).to_owned()).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    page.select(&refs);
    page.fill("#target", "2.0");
    page.click("#review");
    page.wait(
        "the plan of both instances",
        "document.querySelectorAll('#plan .mu-plan-instance[data-action=\"update\"]').length === 2",
    );
    assert_eq!(
        page.texts("#plan .mu-plan-ok"),
        vec!["This update can start."]
    );
    let plan = page.texts("#plan .mu-plan-instance");
    for (id, text) in ids.iter().zip(&plan) {
        assert!(text.starts_with(id.as_str()), "{plan:?}");
        assert!(text.contains(&page.s.url("2.0")), "{text}");
        assert!(
            text.contains("bin/version"),
            "the changed file listed: {text}"
        );
    }
    assert!(page.texts("#plan .mu-download")[0].contains(&page.s.url("2.0")));
    // A review starts nothing.
    assert!(page.texts("#jobs [data-job]").is_empty());
    for id in &ids {
        assert_eq!(page.cell(id, "mu-version"), "1.0");
    }
    page.shot();
}

/// After an update, the page offers Rollback for the version the update kept; it warns that data
/// migrations are not undone, and the rollback takes the instance back to 1.0 (on disk too) and
/// leaves nothing more to roll back to.
#[test]
fn rollback_takes_an_instance_back_to_the_version_its_update_kept() {
    let mut page = Page::open(demo(1, "1.0"), "rollback");
    let id = page.s.ids()[0].to_owned();
    let button = format!("#instances tr[data-instance='{id}'] .mu-rollback-button");
    assert!(
        page.texts(&button).is_empty(),
        "nothing is kept before an update"
    );
    page.select(&[&id]);
    page.fill("#target", "2.0");
    page.click("#update");
    page.wait(
        "the update completed",
        "document.querySelector('#jobs [data-job]')?.dataset.status === 'completed'",
    );
    page.wait(
        "Rollback offered",
        &format!("document.querySelector({button:?}) !== null"),
    );
    page.click(&button);
    page.wait(
        "the rollback's confirmation",
        "document.getElementById('rollback').hidden === false",
    );
    let asked = page.texts("#rollback").join(" ");
    assert!(asked.contains(&page.s.url("1.0")), "{asked}");
    assert!(asked.contains("not undone"), "{asked}");
    page.shot_as("rollback-confirm");
    page.click("#rollback .mu-confirm-rollback");
    page.wait(
        "the instance back at 1.0 in the list",
        "[...document.querySelectorAll('#instances tbody .mu-version')].every(c => c.textContent === '1.0')",
    );
    page.wait(
        "both jobs completed",
        "[...document.querySelectorAll('#jobs [data-job]')].filter(j => j.dataset.status === 'completed').length === 2",
    );
    page.wait(
        "nothing left to roll back to",
        &format!("document.querySelector({button:?}) === null"),
    );
    let version = page.s.instances[0].install_dir.join("bin/version");
    assert_eq!(std::fs::read_to_string(version).unwrap(), "1.0\n");
    page.shot();
}
