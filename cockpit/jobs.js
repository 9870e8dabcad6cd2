// The jobs on the bus, followed live: one card per job with a progress bar, the step and the log
// of each instance, Cancel while it runs, each instance's result once it ends. A job found when
// the page opens (a reload, or one the CLI started) shows its states and its log so far
// (`InstanceStates`, `GetMessages`), then follows the signals like one started here.

import { client, job as jobApi, JOB, MANAGER_PATH, jobNumber } from "./service.js";
import { _, el, format, word, time } from "./dom.js";

const FINISHED = ["completed", "aborted"];

export class Jobs {
    constructor(container, { readOnly, onFinished }) {
        this.container = container;
        this.readOnly = readOnly;
        this.onFinished = onFinished;
        // path → { logs: {instance: [[usec, priority, text]]}, loaded: {instance: {texts, next}},
        //          loading: Set, early: [], result, error }
        this.state = new Map();
        this.followed = null;
        // "path instance" → whether the user opened or closed that log (kept across redraws).
        this.logOpen = new Map();
        this.proxies = client.proxies(JOB, MANAGER_PATH);
        this.proxies.addEventListener("added", (event, proxy) => this.track(proxy));
        this.proxies.addEventListener("changed", (event, proxy) => this.changed(proxy));
        this.proxies.addEventListener("removed", () => this.render());
        client.subscribe({ interface: JOB, member: "Message", path_namespace: MANAGER_PATH },
                         (path, iface, signal, [instance, priority, text]) =>
                             this.message(path, instance, priority, text));
        this.proxies.wait(() => {
            for (const proxy of Object.values(this.proxies))
                this.track(proxy);
            this.render();
        });
    }

    // Brings the job's card into view and marks it (Busy's "Follow job").
    follow(path) {
        this.followed = path;
        this.render();
        const card = this.container.querySelector(`[data-job="${jobNumber(path)}"]`);
        if (card)
            card.scrollIntoView({ block: "nearest" });
    }

    track(proxy) {
        const path = proxy.path;
        if (!proxy.valid || this.state.has(path))
            return;
        const early = (this.pendingMessages || []).filter(m => m.path === path);
        this.pendingMessages = (this.pendingMessages || []).filter(m => m.path !== path);
        const state = { logs: {}, loaded: {}, loading: new Set(), early, result: null, error: null };
        this.state.set(path, state);
        // The log so far: a job that began before the page opened has messages no signal will repeat.
        for (const instance of proxy.Instances || []) {
            state.loading.add(instance);
            jobApi.messages(path, instance)
                    .then(list => {
                        state.logs[instance] = list;
                        state.loaded[instance] = { texts: list.map(([, , text]) => text), next: 0 };
                        for (const m of state.early.filter(m => m.instance === instance))
                            this.append(state, m);
                    })
                    .catch(() => {
                        state.logs[instance] = state.early.filter(m => m.instance === instance)
                                .map(m => [m.usec, m.priority, m.text]);
                    })
                    .finally(() => {
                        state.loading.delete(instance);
                        this.render();
                    });
        }
        if (FINISHED.includes(proxy.Status))
            this.fetchResult(proxy, false);
        this.render();
    }

    changed(proxy) {
        this.track(proxy);
        const state = this.state.get(proxy.path);
        if (state && FINISHED.includes(proxy.Status) && !state.result && !state.fetching)
            this.fetchResult(proxy, true);
        this.render();
    }

    fetchResult(proxy, justFinished) {
        const state = this.state.get(proxy.path);
        state.fetching = true;
        jobApi.result(proxy.path)
                .then(result => { state.result = result })
                .catch(error => { state.error = error.message })
                .finally(() => {
                    this.render();
                    if (justFinished)
                        this.onFinished(proxy.path);
                });
    }

    message(path, instance, priority, text) {
        const state = this.state.get(path);
        const entry = { instance, priority, text, usec: Date.now() * 1000 };
        if (!state) {
            // A signal before the job's object was seen: kept for when it is.
            this.pendingMessages = (this.pendingMessages || []).concat([{ path, ...entry }]);
            return;
        }
        if (state.loading.has(instance) || !state.logs[instance]) {
            state.early.push(entry);
            return;
        }
        this.append(state, entry);
        this.render();
    }

    // Adds a signalled message to its instance's log unless the log read with GetMessages holds
    // it already: the daemon records a message before it signals it, so a signal may arrive
    // after a reply that included it. Signals come in the log's order, so each is looked for
    // after the last one found.
    append(state, { instance, priority, text, usec }) {
        const loaded = state.loaded[instance];
        if (loaded) {
            const at = loaded.texts.indexOf(text, loaded.next);
            if (at >= 0) {
                loaded.next = at + 1;
                return;
            }
            // A message the reply did not hold came after all it held: no more duplicates.
            loaded.next = loaded.texts.length;
        }
        state.logs[instance].push([usec, priority, text]);
    }

    cancel(path) {
        jobApi.cancel(path).catch(error => {
            const state = this.state.get(path);
            if (state) {
                state.error = format(_("Cancel failed: $0"), error.message);
                this.render();
            }
        });
    }

    render() {
        if (this.scheduled)
            return;
        this.scheduled = true;
        window.requestAnimationFrame(() => {
            this.scheduled = false;
            this.draw();
        });
    }

    draw() {
        const proxies = Object.values(this.proxies)
                .filter(proxy => proxy.valid && this.state.has(proxy.path))
                .sort((a, b) => Number(b.Id) - Number(a.Id));
        const cards = proxies.map(proxy => this.card(proxy));
        this.container.replaceChildren(...cards);
        // A log shows its newest lines, as a terminal does.
        for (const log of this.container.querySelectorAll(".mu-log"))
            log.scrollTop = log.scrollHeight;
    }

    card(proxy) {
        const state = this.state.get(proxy.path);
        const number = jobNumber(proxy.path);
        const running = !FINISHED.includes(proxy.Status);
        const title = format(_("Job $0"), number);
        const head = el("div", { class: "mu-card-head" },
                        el("h2", {}, title),
                        el("span", { class: "mu-muted mu-action" }, proxy.Action),
                        el("span", { class: "mu-job-status mu-status-" + proxy.Status }, word(proxy.Status)),
                        el("span", { class: "mu-muted" }, format(_("$0 %"), proxy.Progress)),
                        el("span", { class: "mu-muted" }, time(proxy.StartedUsec)),
                        running && !this.readOnly()
                            ? el("button", { type: "button", class: "mu-button mu-danger mu-cancel", onclick: () => this.cancel(proxy.path) }, _("Cancel"))
                            : null);
        const states = proxy.InstanceStates || {};
        const rows = (proxy.Instances || []).map(instance =>
            this.instanceBlock(proxy.path, instance, states[instance], state, running));
        return el("article", {
            class: "mu-card mu-job" + (this.followed === proxy.path ? " mu-followed" : ""),
            dataset: { job: number, status: proxy.Status },
        }, head, rows, state.error ? el("p", { class: "mu-alert" }, state.error) : null);
    }

    instanceBlock(path, instance, [status, step, percent] = ["pending", "", 0], state, running) {
        const key = path + " " + instance;
        const open = this.logOpen.has(key) ? this.logOpen.get(key) : running;
        const ended = !["pending", "running"].includes(status);
        // An instance's progress ends at 100 whatever its status (docs/dbus-api.md).
        const shown = ended ? 100 : percent;
        const result = state.result && state.result.instances ? state.result.instances[instance] : null;
        const log = state.logs[instance];
        return el("div", { class: "mu-job-instance", dataset: { instance, status } },
                  el("div", { class: "mu-progress-line" },
                     el("strong", {}, instance),
                     el("progress", { max: "100", value: String(shown), "aria-label": format(_("Progress of $0"), instance) }),
                     el("span", { class: "mu-percent" }, format(_("$0 %"), shown)),
                     el("span", { class: "mu-step" }, step ? word(step) : ""),
                     el("span", { class: "mu-status mu-status-" + status }, word(status))),
                  result ? this.result(result) : null,
                  el("details", {
                      class: "mu-log-box",
                      open: open || undefined,
                      // Only the user's choice is kept: the toggle a new element fires is not one.
                      ontoggle: event => {
                          if (event.target.open !== open)
                              this.logOpen.set(key, event.target.open);
                      },
                  },
                     el("summary", {}, _("Log")),
                     el("pre", { class: "mu-log" },
                        log === undefined
                            ? _("Loading the log…")
                            : log.map(([, , text]) => text).join("\n"))));
    }

    result(result) {
        const parts = [];
        if (result.new_image_url)
            parts.push(el("p", {}, format(_("$0 → $1"), result.old_image_url || "", result.new_image_url)));
        if (result.error)
            parts.push(el("p", { class: "mu-error" },
                          format(_("Error in step $0: $1"), word(result.error.step || ""), result.error.reason || "")));
        for (const warning of result.warnings || [])
            parts.push(el("p", { class: "mu-warning" }, format(_("Warning: $0"), warning)));
        // The health gate's report (a service with the `health-gate` feature): what failed it.
        const health = result.health;
        if (health && !health.passed) {
            for (const unit of (health.units || []).filter(u => !u.healthy))
                parts.push(el("p", { class: "mu-error" }, format(_("Unit $0 is $1 ($2)"), unit.unit, unit.active_state, unit.result)));
            for (const container of health.stale_containers || [])
                parts.push(el("p", { class: "mu-error" }, format(_("Container $0 still runs $1"), container.name, container.image)));
            if (health.readiness && !health.readiness.passed)
                parts.push(el("p", { class: "mu-error" }, _("The module's readiness checks did not pass.")));
        }
        if (result.rolled_back)
            parts.push(el("p", { class: "mu-warning" }, _("Rolled back.")));
        return el("div", { class: "mu-result" }, parts);
    }
}
