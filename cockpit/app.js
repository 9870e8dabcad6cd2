// The Module updates page: the node's instances with the updates available, the update form
// (Review when the service offers PlanUpdate), the jobs followed live, and per instance its
// history and Rollback (when the service offers it).

/* global cockpit */

import { client, manager, INSTANCE, MANAGER_PATH, errorKind, validationItems, jobNumber } from "./service.js";
import { _, el, format, word, time, shortDigest, ago } from "./dom.js";
import { Jobs } from "./jobs.js";
import { renderPlan } from "./plan.js";

const $ = id => document.getElementById(id);

const state = {
    features: [],
    updates: {},          // instance → ListUpdates line
    kept: {},             // instance → the previous image URL kept for Rollback
    selected: new Set(),
    readOnly: false,
};

const instances = client.proxies(INSTANCE, MANAGER_PATH);
let jobs = null;

function has(feature) {
    return state.features.includes(feature);
}

function sortedInstances() {
    return Object.values(instances).filter(p => p.valid)
            .sort((a, b) => a.Id.localeCompare(b.Id, undefined, { numeric: true }));
}

function selectedModule() {
    const first = sortedInstances().find(p => state.selected.has(p.Id));
    return first ? first.Module : null;
}

// --- notices and errors ---

function notice(text) {
    $("notice").hidden = !text;
    $("notice").textContent = text || "";
}

function showError(error, context) {
    const box = $("errors");
    const kind = errorKind(error);
    const items = validationItems(error);
    const parts = [el("p", { class: "mu-error-title" }, context)];
    if (kind === "ValidationFailed" && items) {
        parts.push(el("p", {}, _("The request was refused:")));
        parts.push(el("table", { class: "mu-table mu-validation" },
                      el("thead", {}, el("tr", {}, el("th", {}, _("Field")), el("th", {}, _("Value")), el("th", {}, _("Error")))),
                      el("tbody", {}, items.map(item =>
                          el("tr", { dataset: { field: item.field } },
                             el("td", {}, item.field),
                             el("td", {}, typeof item.value === "string" ? item.value : JSON.stringify(item.value)),
                             el("td", { class: "mu-validation-error" }, item.error,
                                item.current ? format(_(" (it runs $0)"), item.current) : ""))))));
    } else if (kind === "Busy" && items) {
        for (const item of items) {
            parts.push(el("p", { class: "mu-busy" },
                          format(_("$0 is being updated by job $1."), item.value, jobNumber(item.job)), " ",
                          el("button", { type: "button", class: "mu-button mu-follow", onclick: () => jobs.follow(item.job) },
                             format(_("Follow job $0"), jobNumber(item.job)))));
        }
    } else if (kind === "AccessDenied") {
        parts.push(el("p", {}, _("Not permitted: administrative access is needed to change modules."), " ", error.message));
    } else {
        parts.push(el("p", {}, format("$0: $1", kind || _("Error"), error.message || String(error))));
    }
    box.replaceChildren(...parts);
    box.dataset.kind = kind;
    box.hidden = false;
}

function clearError() {
    $("errors").hidden = true;
    $("errors").replaceChildren();
    delete $("errors").dataset.kind;
}

// --- the instances table ---

function lastUpdateCell(proxy) {
    let last = {};
    try {
        last = JSON.parse(proxy.LastUpdate || "{}");
    } catch (e) {
        last = {};
    }
    if (!last.status)
        return el("td", { class: "mu-last" }, el("span", { class: "mu-muted" }, _("never")));
    return el("td", { class: "mu-last" },
              el("span", { class: "mu-status-" + last.status }, word(last.status)), " ",
              el("span", { class: "mu-muted" }, time(last.finished_usec)));
}

function availableCell(proxy) {
    const line = state.updates[proxy.Id];
    if (!line)
        return el("td", { class: "mu-available" }, el("span", { class: "mu-muted" }, "…"));
    const parts = [];
    if (line.error)
        parts.push(el("span", { class: "mu-error", title: line.error }, _("registry unreachable")));
    if (line.newest)
        parts.push(el("span", { class: "mu-newest" }, line.newest));
    if (line.tag_moved)
        parts.push(el("span", { class: "mu-badge mu-moved", title: _("The registry serves another image under this tag than the one installed.") }, _("tag moved")));
    if (!parts.length)
        parts.push(el("span", { class: "mu-muted" }, _("up to date")));
    return el("td", { class: "mu-available" }, parts);
}

function renderInstances() {
    const module = selectedModule();
    const rows = sortedInstances().map(proxy => {
        const other = module !== null && proxy.Module !== module;
        return el("tr", { dataset: { instance: proxy.Id } },
                  el("td", {}, el("input", {
                      type: "checkbox",
                      class: "mu-select",
                      "aria-label": format(_("Select $0"), proxy.Id),
                      checked: state.selected.has(proxy.Id),
                      disabled: other || state.readOnly,
                      title: other ? _("Select instances of one module at a time.") : undefined,
                      onchange: event => {
                          if (event.target.checked)
                              state.selected.add(proxy.Id);
                          else
                              state.selected.delete(proxy.Id);
                          render();
                      },
                  })),
                  el("td", { class: "mu-id" }, proxy.Id),
                  el("td", { class: "mu-module" }, proxy.Module),
                  el("td", { class: "mu-version" }, proxy.Version),
                  el("td", { class: "mu-digest", title: proxy.ImageDigest }, shortDigest(proxy.ImageDigest)),
                  el("td", { class: "mu-state mu-status-" + proxy.State }, word(proxy.State),
                     proxy.Job && proxy.Job !== "/"
                         ? el("button", { type: "button", class: "mu-link", onclick: () => jobs.follow(proxy.Job) },
                              format(_("job $0"), jobNumber(proxy.Job)))
                         : null),
                  lastUpdateCell(proxy),
                  availableCell(proxy),
                  el("td", { class: "mu-actions" },
                     el("button", { type: "button", class: "mu-button mu-history-button", onclick: () => showHistory(proxy.Id) }, _("History")),
                     has("rollback") && state.kept[proxy.Id] && !state.readOnly
                         ? el("button", { type: "button", class: "mu-button mu-rollback-button", onclick: () => askRollback(proxy.Id) }, _("Rollback"))
                         : null));
    });
    document.querySelector("#instances tbody").replaceChildren(...rows);
    $("empty").hidden = rows.length > 0;
}

function renderForm() {
    const module = selectedModule();
    const count = state.selected.size;
    $("selection").textContent = count
        ? cockpit.format(cockpit.ngettext("$0 instance of $1 selected", "$0 instances of $1 selected", count), count, module)
        : _("Select the instances to update.");
    const versions = new Set();
    for (const proxy of sortedInstances()) {
        if (module && proxy.Module !== module)
            continue;
        const line = state.updates[proxy.Id];
        if (line && line.newest)
            versions.add(line.newest);
    }
    $("target-versions").replaceChildren(...[...versions].map(v => el("option", { value: v })));
    if (!$("target").value && versions.size === 1)
        $("target").value = [...versions][0];
    const disabled = state.readOnly || count === 0;
    $("update").disabled = disabled;
    $("review").disabled = disabled;
    $("review").hidden = !has("plan");
    $("force").disabled = state.readOnly;
    $("target").disabled = state.readOnly;
}

function renderChecked() {
    const lines = Object.values(state.updates);
    const oldest = lines.reduce((max, line) => Math.max(max, line.age_seconds || 0), 0);
    $("checked").textContent = lines.length ? format(_("Checked $0"), ago(oldest)) : "";
}

function render() {
    renderInstances();
    renderForm();
    renderChecked();
}

// --- updates available ---

function loadUpdates(refresh) {
    $("refresh").disabled = true;
    $("checked").textContent = refresh ? _("Checking the registries…") : $("checked").textContent;
    return (refresh ? manager.refreshUpdates() : manager.listUpdates())
            .then(answer => {
                state.updates = answer.instances || {};
                render();
            })
            .catch(error => showError(error, _("Could not check for updates")))
            .finally(() => { $("refresh").disabled = false });
}

// What Rollback would restore: the image of the previous version the service keeps (empty when
// nothing is kept).
function loadKept() {
    if (!has("rollback"))
        return;
    for (const proxy of sortedInstances()) {
        manager.getInstance(proxy.Id)
                .then(env => {
                    state.kept[proxy.Id] = env.kept || "";
                    render();
                })
                .catch(() => {});
    }
}

// --- update, review ---

function request() {
    const module = selectedModule();
    const target = $("target").value.trim();
    // A full image reference is taken as is; a tag goes with the selected module's repository.
    const url = target.includes("/") ? target : module + ":" + target;
    const body = { module_url: url, instances: [...state.selected] };
    if ($("force").checked)
        body.force = true;
    return body;
}

function update(event) {
    event.preventDefault();
    clearError();
    $("update").disabled = true;
    manager.updateModule(request())
            .then(path => {
                $("plan").hidden = true;
                state.selected.clear();
                jobs.follow(path);
            })
            .catch(error => showError(error, _("The update did not start")))
            .finally(render);
}

function review() {
    clearError();
    $("review").disabled = true;
    manager.planUpdate(request())
            .then(plan => renderPlan($("plan"), plan, () => { $("plan").hidden = true }))
            .catch(error => showError(error, _("The update cannot be reviewed")))
            .finally(render);
}

// --- history and rollback ---

function showHistory(id) {
    const box = $("history");
    box.hidden = false;
    box.dataset.instance = id;
    box.replaceChildren(el("h2", {}, format(_("History of $0"), id)), el("p", { class: "mu-muted" }, _("Loading…")));
    manager.history(id)
            .then(entries => {
                const rows = entries.map(entry =>
                    el("tr", { dataset: { job: String(entry.job) } },
                       el("td", {}, String(entry.job)),
                       el("td", {}, entry.action),
                       el("td", { class: "mu-status-" + entry.status }, word(entry.status)),
                       el("td", {}, entry.old_image_url || ""),
                       el("td", {}, entry.new_image_url || ""),
                       el("td", {}, time(entry.finished_usec)),
                       el("td", {}, entry.error ? format("$0: $1", entry.error.step, entry.error.reason) : (entry.warnings || []).join("; "))));
                box.replaceChildren(
                    el("div", { class: "mu-card-head" },
                       el("h2", {}, format(_("History of $0"), id)),
                       el("button", { type: "button", class: "mu-button", onclick: () => { box.hidden = true } }, _("Close"))),
                    rows.length
                        ? el("table", { class: "mu-table" },
                             el("thead", {}, el("tr", {}, [_("Job"), _("Action"), _("Result"), _("From"), _("To"), _("Finished"), _("Notes")].map(h => el("th", {}, h)))),
                             el("tbody", {}, rows))
                        : el("p", { class: "mu-muted" }, _("No update yet.")));
            })
            .catch(error => showError(error, format(_("Could not read the history of $0"), id)));
}

function askRollback(id) {
    const box = $("rollback");
    box.hidden = false;
    box.dataset.instance = id;
    box.replaceChildren(
        el("h2", {}, format(_("Roll back $0"), id)),
        el("p", {}, format(_("$0 goes back to $1: its previous files, environment and images."), id, state.kept[id])),
        el("p", { class: "mu-warning" }, _("Data changed by the update's scripts (migrations) is not undone.")),
        el("div", { class: "mu-buttons" },
           el("button", {
               type: "button",
               class: "mu-button mu-danger mu-confirm-rollback",
               onclick: () => {
                   box.hidden = true;
                   clearError();
                   manager.rollback(id)
                           .then(path => jobs.follow(path))
                           .catch(error => showError(error, format(_("Could not roll back $0"), id)));
               },
           }, _("Roll back")),
           el("button", { type: "button", class: "mu-button", onclick: () => { box.hidden = true } }, _("Cancel"))));
}

// --- read-only sessions ---

// A session without administrative access reads everything and changes nothing; the daemon
// would refuse its changes anyway (AccessDenied), the page says so before.
function watchSuperuser() {
    const superuser = cockpit.dbus(null, { bus: "internal" }).proxy("cockpit.Superuser", "/superuser");
    const apply = () => {
        state.readOnly = superuser.valid && superuser.Current === "none";
        notice(state.readOnly
            ? _("You have limited access: the instances and the jobs are shown, updating needs administrative access.")
            : "");
        render();
        if (jobs)
            jobs.render();
    };
    superuser.addEventListener("changed", apply);
    superuser.wait(apply);
}

// --- start ---

function start() {
    cockpit.translate();
    $("refresh").addEventListener("click", () => loadUpdates(true));
    $("update-form").addEventListener("submit", update);
    $("review").addEventListener("click", review);
    client.addEventListener("close", (event, options) =>
        notice(options.problem === "not-found"
            ? _("The module-updater service is not available on this system.")
            : format(_("Lost the connection to the module-updater service: $0"), cockpit.message(options))));
    instances.addEventListener("changed", render);
    instances.addEventListener("added", render);
    instances.addEventListener("removed", render);
    jobs = new Jobs($("jobs"), {
        readOnly: () => state.readOnly,
        onFinished: () => {
            loadUpdates(false);
            loadKept();
            const open = $("history").hidden ? null : $("history").dataset.instance;
            if (open)
                showHistory(open);
        },
    });
    watchSuperuser();
    manager.features()
            .then(features => { state.features = features })
            .catch(() => { state.features = [] })
            .finally(() => {
                document.body.dataset.features = state.features.join(" ");
                loadKept();
                render();
            });
    instances.wait(() => {
        render();
        loadUpdates(false).finally(() => { document.body.dataset.ready = "true" });
    });
}

start();
