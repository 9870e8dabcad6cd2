//! How the Go programs an update runs (podman, skopeo) collect their garbage.
//!
//! Go's collector runs, by default, each time the heap doubles from 4 MiB: a podman process that
//! lives for half a second runs it several times while it starts, reclaiming little it would not
//! free by exiting, and a job of many instances is bound by that CPU. So the collector is off,
//! with a soft limit on the heap in its place (docs/benchmarks.md has the measurements).
//!
//! An admin who sets either variable in the daemon's environment (a drop-in's `Environment=`)
//! gets that instead: the workers are handed it too (`worker::worker_environment`).

/// The Go runtime's variables: set in the environment, they are passed on untouched.
pub const VARIABLES: [&str; 2] = ["GOGC", "GOMEMLIMIT"];

/// The heap limit podman and skopeo get with the collector off. Well above what they hold live
/// (tens of MiB); it bounds what a process of an unusual size could make the node hold.
pub const HEAP_LIMIT: &str = "128MiB";

/// The variables to give podman or skopeo: none when `is_set` says the environment already
/// has one of [`VARIABLES`].
pub fn settings(is_set: impl Fn(&str) -> bool) -> Vec<(&'static str, &'static str)> {
    if VARIABLES.iter().any(|name| is_set(name)) {
        return Vec::new();
    }
    vec![("GOGC", "off"), ("GOMEMLIMIT", HEAP_LIMIT)]
}

/// [`settings`] for this process's environment.
pub fn for_this_process() -> Vec<(&'static str, &'static str)> {
    settings(|name| std::env::var_os(name).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_is_off_with_a_limit_unless_the_environment_says_otherwise() {
        assert_eq!(
            settings(|_| false),
            vec![("GOGC", "off"), ("GOMEMLIMIT", "128MiB")]
        );
        assert!(settings(|name| name == "GOGC").is_empty());
        assert!(settings(|name| name == "GOMEMLIMIT").is_empty());
    }
}
