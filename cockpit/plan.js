// The Review panel: what PlanUpdate says the update would do (docs/dbus-api.md "Plans").

import { _, el, format, word, bytes } from "./dom.js";

function list(title, items, className) {
    if (!items || !items.length)
        return null;
    return el("details", { class: className },
              el("summary", {}, format("$0 ($1)", title, items.length)),
              el("ul", {}, items.map(item => el("li", {}, item))));
}

function instancePlan(item) {
    const files = item.files || {};
    return el("div", { class: "mu-plan-instance", dataset: { instance: item.instance, action: item.action } },
              el("h3", {}, item.instance, " ", el("span", { class: "mu-badge mu-status-" + item.action }, word(item.action))),
              item.new_url ? el("p", {}, format(_("$0 → $1"), item.old_url || "", item.new_url)) : null,
              (item.refused || []).map(refusal =>
                  el("p", { class: "mu-error mu-refusal" }, refusal.error,
                     refusal.current ? format(_(" (it runs $0)"), refusal.current) : "",
                     refusal.needed ? format(_(": $0 needs $1, $2 available"), refusal.filesystem, bytes(refusal.needed), bytes(refusal.available)) : "")),
              item.storage_bytes !== undefined ? el("p", {}, format(_("Storage: $0"), bytes(item.storage_bytes))) : null,
              list(_("Files added"), files.added, "mu-files-added"),
              list(_("Files changed"), files.changed, "mu-files-changed"),
              list(_("Files removed"), files.removed, "mu-files-removed"),
              list(_("Scripts that run"), item.runs || item.scripts, "mu-scripts"),
              list(_("Images removed"), item.images_removed, "mu-images-removed"),
              (item.space || []).map(space =>
                  el("p", { class: space.enough ? "mu-space" : "mu-space mu-error" },
                     format(_("$0: needs $1, $2 available"), space.filesystem, bytes(space.needed), bytes(space.available)))));
}

export function renderPlan(box, plan, close) {
    const download = plan.download || {};
    const refused = plan.refused || [];
    box.replaceChildren(...[
        el("div", { class: "mu-card-head" },
           el("h2", {}, format(_("Review: $0"), plan.module_url)),
           el("button", { type: "button", class: "mu-button", onclick: close }, _("Close"))),
        refused.length
            ? el("p", { class: "mu-error mu-plan-refused" }, _("This update would be refused:"), " ",
                 refused.map(item => format("$0 ($1)", item.error, item.value)).join(", "))
            : el("p", { class: "mu-plan-ok" }, _("This update can start.")),
        download.error
            ? el("p", { class: "mu-error" }, format(_("The image could not be read: $0"), download.error))
            : el("p", {}, format(_("Download: $0"), bytes(download.bytes))),
        list(_("Images downloaded"), (download.images || []).map(image => format("$0 ($1)", image.reference, bytes(image.bytes))), "mu-download"),
        (plan.instances || []).map(instancePlan),
    ].flat().filter(Boolean));
    box.hidden = false;
}
