// Small DOM and formatting helpers: elements built from data (never HTML strings, so no text
// from the bus is ever parsed as markup).

/* global cockpit */

export const _ = cockpit.gettext;

// `el("td", { class: "x", dataset: { instance: id } }, "text", child...)`.
export function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
        if (value === undefined || value === null || value === false)
            continue;
        if (key === "dataset")
            Object.assign(node.dataset, value);
        else if (key.startsWith("on"))
            node.addEventListener(key.slice(2), value);
        else if (key === "class")
            node.className = value;
        else if (value === true)
            node.setAttribute(key, "");
        else
            node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
        if (child === undefined || child === null || child === false)
            continue;
        node.append(child instanceof Node ? child : String(child));
    }
    return node;
}

// `format("$0 of $1", a, b)`: a translated template with its values, as cockpit.format does.
export function format(template, ...values) {
    return cockpit.format(template, values);
}

export function time(usec) {
    if (!usec)
        return "";
    return new Date(Number(usec) / 1000).toLocaleString();
}

export function bytes(count) {
    if (count === undefined || count === null)
        return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = Number(count);
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
        value /= 1024;
        unit += 1;
    }
    return (unit === 0 ? String(value) : value.toFixed(1)) + " " + units[unit];
}

export function shortDigest(digest) {
    if (!digest)
        return "";
    const hex = digest.includes(":") ? digest.split(":")[1] : digest;
    return hex.slice(0, 12);
}

export function ago(seconds) {
    if (seconds === undefined || seconds === null)
        return "";
    if (seconds < 60)
        return format(_("$0 s ago"), seconds);
    if (seconds < 3600)
        return format(_("$0 min ago"), Math.floor(seconds / 60));
    return format(_("$0 h ago"), Math.floor(seconds / 3600));
}

// Labels of the statuses and steps the API sends (docs/dbus-api.md), for translation.
const WORDS = {
    idle: _("idle"),
    updating: _("updating"),
    recovering: _("recovering"),
    pending: _("pending"),
    running: _("running"),
    completed: _("completed"),
    aborted: _("aborted"),
    "already-installed": _("already installed"),
    failed: _("failed"),
    cancelled: _("cancelled"),
    unhealthy: _("unhealthy"),
    prepare: _("prepare"),
    "pull-image": _("pull image"),
    "pull-extra-images": _("pull extra images"),
    extract: _("extract"),
    reload: _("reload"),
    "update-environment": _("update environment"),
    "run-scripts": _("run scripts"),
    "module-step": _("module step"),
    "health-gate": _("health gate"),
    "cleanup-images": _("clean up images"),
    update: _("update"),
    refused: _("refused"),
};

export function word(value) {
    return WORDS[value] || value;
}
