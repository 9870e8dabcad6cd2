// The module-updater D-Bus API as the page uses it: one connection, typed calls, and the
// errors decoded (ValidationFailed and Busy carry NS8's validation array as their message).

/* global cockpit */

export const BUS_NAME = "org.nethserver.ModuleUpdater";
export const MANAGER_PATH = "/org/nethserver/ModuleUpdater";
export const MANAGER = "org.nethserver.ModuleUpdater";
export const INSTANCE = "org.nethserver.ModuleUpdater.Instance";
export const JOB = "org.nethserver.ModuleUpdater.Job";
const ERROR_PREFIX = "org.nethserver.ModuleUpdater.Error.";

// `superuser: "try"`: updates run as root when the session has administrative access; reading
// works for everyone (the daemon's read model).
export const client = cockpit.dbus(BUS_NAME, { bus: "system", superuser: "try" });

function call(path, iface, method, signature, args) {
    return client.call(path, iface, method, args, { type: signature });
}

export const manager = {
    features: () =>
        call(MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get", "ss", [MANAGER, "Features"])
            .then(([variant]) => variant.v),
    updateModule: request =>
        call(MANAGER_PATH, MANAGER, "UpdateModule", "s", [JSON.stringify(request)]).then(([job]) => job),
    planUpdate: request =>
        call(MANAGER_PATH, MANAGER, "PlanUpdate", "s", [JSON.stringify(request)]).then(([plan]) => JSON.parse(plan)),
    rollback: instance => call(MANAGER_PATH, MANAGER, "Rollback", "s", [instance]).then(([job]) => job),
    listJobs: () => call(MANAGER_PATH, MANAGER, "ListJobs", "", []).then(([jobs]) => jobs),
    getInstance: id => call(MANAGER_PATH, MANAGER, "GetInstance", "s", [id]).then(([env]) => env),
    history: id => call(MANAGER_PATH, MANAGER, "GetHistory", "s", [id]).then(([text]) => JSON.parse(text)),
    listUpdates: () => call(MANAGER_PATH, MANAGER, "ListUpdates", "as", [[]]).then(([text]) => JSON.parse(text)),
    refreshUpdates: () =>
        call(MANAGER_PATH, MANAGER, "RefreshUpdates", "as", [[]]).then(([text]) => JSON.parse(text)),
};

export const job = {
    messages: (path, instance) => call(path, JOB, "GetMessages", "s", [instance]).then(([list]) => list),
    result: path => call(path, JOB, "GetResult", "", []).then(([text]) => JSON.parse(text)),
    cancel: path => call(path, JOB, "Cancel", "", []),
};

// The short name of a D-Bus error (`ValidationFailed`, `Busy`, `AccessDenied`...).
export function errorKind(error) {
    const name = error && error.name ? String(error.name) : "";
    if (name.startsWith(ERROR_PREFIX))
        return name.slice(ERROR_PREFIX.length);
    return name.split(".").pop();
}

// NS8's validation array carried by ValidationFailed and Busy, or null when the message is not one.
export function validationItems(error) {
    try {
        const items = JSON.parse(error.message);
        return Array.isArray(items) ? items : null;
    } catch (e) {
        return null;
    }
}

// The job's number from its object path.
export function jobNumber(path) {
    return String(path).split("/").pop();
}
