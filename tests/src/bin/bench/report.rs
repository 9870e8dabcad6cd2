//! The results: per-point medians, the targets, a markdown table and a JSON file.

use std::path::Path;

use serde::Serialize;

use crate::measure::{self, Machine};
use crate::module::{self, Images};
use crate::{BenchError, Options, Run};

const MIB: f64 = 1024.0 * 1024.0;

/// The medians of one N.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub n: usize,
    pub runs: usize,
    /// (a) and (b) wall seconds, and the median of the runs' a/b.
    pub daemon_wall_s: f64,
    pub baseline_wall_s: f64,
    pub ratio: f64,
    /// (a): the daemon and all it ran (workers, podman, scripts); the daemon alone; its workers alone.
    pub daemon_cpu_tree_s: f64,
    pub daemon_cpu_own_s: f64,
    pub daemon_cpu_workers_s: f64,
    /// (b): every process of the N pipelines.
    pub baseline_cpu_s: f64,
    /// One instance's podman commands timed alone; the update scripts and the manager's Reload
    /// timed alone; the CPU of all of it.
    pub floor_podman_s: f64,
    pub floor_scripts_s: f64,
    pub floor_reload_s: f64,
    pub floor_cpu_s: f64,
    /// N = 1 only: (a) minus the podman floor, and minus the podman floor, the scripts and the
    /// Reload.
    pub overhead_wall_ms: Option<f64>,
    pub overhead_wall_without_scripts_ms: Option<f64>,
    /// N = 1 only: the podman floor / (b): the smallest a/b the daemon can reach while it runs
    /// these podman commands one after the other.
    pub floor_over_baseline: Option<f64>,
    /// (a)'s CPU per instance above the floor's CPU (podman and scripts).
    pub overhead_cpu_per_instance_ms: f64,
    pub rss_idle_mib: f64,
    pub rss_peak_mib: f64,
    pub worker_rss_peak_mib: f64,
    pub list_instances_calls: f64,
    pub list_instances_p50_ms: f64,
    pub list_instances_p99_ms: f64,
    pub list_instances_max_ms: f64,
    pub progress_signals: f64,
    pub progress_per_s: f64,
    pub progress_max_per_1s: f64,
    pub properties_changed_per_s: f64,
    pub properties_changed_max_per_1s: f64,
    pub daemon_registry_mib: f64,
    pub daemon_max_serves_per_blob: f64,
    pub baseline_registry_mib: f64,
    pub baseline_max_serves_per_blob: f64,
    pub daemon_registry_cpu_s: f64,
    pub baseline_registry_cpu_s: f64,
    pub daemon_bus_cpu_s: f64,
    /// Provisioning and the rest of a point, excluded from every number above.
    pub setup_users_s: f64,
    pub setup_install_s: f64,
    pub setup_images_s: f64,
    pub setup_teardown_s: f64,
    pub setup_point_total_s: f64,
    /// Every repeat of this N, setup included.
    pub all_repeats_s: f64,
    /// Node profile: what went down the uplink.
    pub uplink: Option<UplinkSummary>,
}

/// The node profile's medians of one N.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkSummary {
    /// One copy of what changed, and that ÷ the bandwidth.
    pub changed_mb: f64,
    pub download_floor_s: f64,
    pub daemon_down_mb: f64,
    pub baseline_down_mb: f64,
    /// (a)'s bytes down ÷ one copy.
    pub daemon_copies: f64,
    pub baseline_copies: f64,
    /// (a)'s and (b)'s wall time minus the download floor, and ÷ it.
    pub daemon_above_floor_s: f64,
    pub daemon_over_floor: f64,
    pub baseline_above_floor_s: f64,
    pub daemon_connections: f64,
    pub baseline_connections: f64,
}

fn summarise_uplink(runs: &[&Run]) -> Option<UplinkSummary> {
    if runs.iter().any(|r| r.uplink.is_none()) || runs.is_empty() {
        return None;
    }
    let m = |f: &dyn Fn(&crate::UplinkRun, &Run) -> f64| {
        med(runs, |r| {
            r.uplink.as_ref().map(|u| f(u, r)).unwrap_or(f64::NAN)
        })
    };
    const MB: f64 = 1e6;
    Some(UplinkSummary {
        changed_mb: m(&|u, _| u.changed_bytes as f64 / MB),
        download_floor_s: m(&|u, _| u.download_floor_s),
        daemon_down_mb: m(&|u, _| u.daemon_bytes_down as f64 / MB),
        baseline_down_mb: m(&|u, _| u.baseline_bytes_down as f64 / MB),
        daemon_copies: m(&|u, _| u.daemon_bytes_down as f64 / u.changed_bytes as f64),
        baseline_copies: m(&|u, _| u.baseline_bytes_down as f64 / u.changed_bytes as f64),
        daemon_above_floor_s: m(&|u, r| r.daemon.wall_s - u.download_floor_s),
        daemon_over_floor: m(&|u, r| r.daemon.wall_s / u.download_floor_s),
        baseline_above_floor_s: m(&|u, r| r.baseline.wall_s - u.download_floor_s),
        daemon_connections: m(&|u, _| u.daemon_connections as f64),
        baseline_connections: m(&|u, _| u.baseline_connections as f64),
    })
}

/// One target of the issue.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    /// `None` when the point it needs was not run (e.g. N = 50 with `--quick`).
    pub met: Option<bool>,
}

/// What the module looks like.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleInfo {
    pub imageroot_files: usize,
    pub imageroot_bytes: u64,
    pub extra_images: usize,
    pub extra_image_bytes: u64,
    pub v1: String,
    pub v2: String,
    /// The extra images of 1.0 and of 2.0 (the cache image is in both).
    pub extras_v1: Vec<String>,
    pub extras_v2: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub options: Options,
    pub module: ModuleInfo,
    pub list_instances_pause_ms: u128,
    pub total_s: f64,
    pub summaries: Vec<Summary>,
    pub targets: Vec<Target>,
    pub runs: Vec<Run>,
}

fn med(runs: &[&Run], f: impl Fn(&Run) -> f64) -> f64 {
    let values: Vec<f64> = runs.iter().map(|r| f(r)).collect();
    measure::median(&values).unwrap_or(f64::NAN)
}

fn summarise(n: usize, runs: &[&Run]) -> Summary {
    let m = |f: &dyn Fn(&Run) -> f64| med(runs, f);
    let floor_total = |r: &Run| r.floor.podman_s + r.floor.scripts_s + r.floor.reload_s;
    let single = n == 1;
    Summary {
        n,
        runs: runs.len(),
        daemon_wall_s: m(&|r| r.daemon.wall_s),
        baseline_wall_s: m(&|r| r.baseline.wall_s),
        ratio: m(&|r| r.daemon.wall_s / r.baseline.wall_s),
        daemon_cpu_tree_s: m(&|r| r.daemon.cpu_tree_s),
        daemon_cpu_own_s: m(&|r| r.daemon.cpu_daemon_s),
        daemon_cpu_workers_s: m(&|r| r.daemon.workers.cpu_s),
        baseline_cpu_s: m(&|r| r.baseline.cpu_s),
        floor_podman_s: m(&|r| r.floor.podman_s),
        floor_scripts_s: m(&|r| r.floor.scripts_s),
        floor_reload_s: m(&|r| r.floor.reload_s),
        floor_cpu_s: m(&|r| r.floor.cpu_s),
        overhead_wall_ms: single.then(|| m(&|r| (r.daemon.wall_s - r.floor.podman_s) * 1000.0)),
        overhead_wall_without_scripts_ms: single
            .then(|| m(&|r| (r.daemon.wall_s - floor_total(r)) * 1000.0)),
        floor_over_baseline: single.then(|| m(&|r| r.floor.podman_s / r.baseline.wall_s)),
        overhead_cpu_per_instance_ms: m(&|r| {
            (r.daemon.cpu_tree_s / r.n as f64 - r.floor.cpu_s) * 1000.0
        }),
        rss_idle_mib: m(&|r| r.daemon_rss_idle_kib as f64 / 1024.0),
        rss_peak_mib: m(&|r| r.daemon.rss_peak_kib as f64 / 1024.0),
        worker_rss_peak_mib: m(&|r| r.daemon.workers.peak_rss_kib as f64 / 1024.0),
        list_instances_calls: m(&|r| r.daemon.list_instances.calls as f64),
        list_instances_p50_ms: m(&|r| r.daemon.list_instances.p50_ms),
        list_instances_p99_ms: m(&|r| r.daemon.list_instances.p99_ms),
        list_instances_max_ms: m(&|r| r.daemon.list_instances.max_ms),
        progress_signals: m(&|r| r.daemon.progress.count as f64),
        progress_per_s: m(&|r| r.daemon.progress.per_s),
        progress_max_per_1s: m(&|r| r.daemon.progress.max_per_1s as f64),
        properties_changed_per_s: m(&|r| r.daemon.properties_changed.per_s),
        properties_changed_max_per_1s: m(&|r| r.daemon.properties_changed.max_per_1s as f64),
        daemon_registry_mib: m(&|r| r.daemon_registry.bytes as f64 / MIB),
        daemon_max_serves_per_blob: m(&|r| r.daemon_registry.max_serves_per_blob as f64),
        baseline_registry_mib: m(&|r| r.baseline_registry.bytes as f64 / MIB),
        baseline_max_serves_per_blob: m(&|r| r.baseline_registry.max_serves_per_blob as f64),
        daemon_registry_cpu_s: m(&|r| r.daemon_registry_cpu_s),
        baseline_registry_cpu_s: m(&|r| r.baseline_registry_cpu_s),
        daemon_bus_cpu_s: m(&|r| r.daemon_bus_cpu_s),
        setup_users_s: m(&|r| r.setup.users_s),
        setup_install_s: m(&|r| r.setup.install_s),
        setup_images_s: m(&|r| r.setup.images_s),
        setup_teardown_s: m(&|r| r.setup.teardown_s),
        setup_point_total_s: m(&|r| r.setup.total_s),
        all_repeats_s: runs.iter().map(|r| r.setup.total_s).sum(),
        uplink: summarise_uplink(runs),
    }
}

fn at_most(
    name: &str,
    target: &str,
    summary: Option<&Summary>,
    value: impl Fn(&Summary) -> f64,
    limit: f64,
    unit: &str,
) -> Target {
    match summary {
        Some(s) => {
            let v = value(s);
            Target {
                name: name.to_owned(),
                target: target.to_owned(),
                measured: format!("{v:.2}{unit} (N={})", s.n),
                met: Some(v <= limit),
            }
        }
        None => Target {
            name: name.to_owned(),
            target: target.to_owned(),
            measured: "not measured (that N was not run)".to_owned(),
            met: None,
        },
    }
}

/// The node profile's targets (issue 18).
fn node_targets(summaries: &[Summary]) -> Vec<Target> {
    let at = |n: usize| summaries.iter().find(|s| s.n == n);
    let link =
        |s: &Summary, f: fn(&UplinkSummary) -> f64| s.uplink.as_ref().map(f).unwrap_or(f64::NAN);
    let mut out = Vec::new();
    for n in [1, 10] {
        out.push(at_most(
            &format!("each blob of the changed images served once per node, N={n}"),
            "1",
            at(n),
            |s| s.daemon_max_serves_per_blob,
            1.0,
            "",
        ));
        out.push(at_most(
            &format!("(a)'s bytes down the uplink ÷ one copy of what changed, N={n}"),
            "≤ 1.02",
            at(n),
            |s| link(s, |u| u.daemon_copies),
            1.02,
            "",
        ));
    }
    out.push(at_most(
        "(a)'s wall time minus the download floor, N=1",
        "≤ 0.3 s",
        at(1),
        |s| link(s, |u| u.daemon_above_floor_s),
        0.3,
        " s",
    ));
    out.push(at_most(
        "(a)'s wall time ÷ the download floor, N=10",
        "≤ 1.5",
        at(10),
        |s| link(s, |u| u.daemon_over_floor),
        1.5,
        "",
    ));
    out
}

fn targets(summaries: &[Summary]) -> Vec<Target> {
    let at = |n: usize| summaries.iter().find(|s| s.n == n);
    let fifty = at(50);
    let mut out = vec![
        at_most("a/b at N=1", "≤ 0.5", at(1), |s| s.ratio, 0.5, ""),
        at_most("a/b at N=50", "≤ 0.4", fifty, |s| s.ratio, 0.4, ""),
        at_most(
            "overhead above the podman floor per instance (N=1, wall)",
            "≤ 50 ms",
            at(1),
            |s| s.overhead_wall_ms.unwrap_or(f64::NAN),
            50.0,
            " ms",
        ),
        at_most(
            "ListInstances p99 during the 50-instance job",
            "≤ 10 ms",
            fifty,
            |s| s.list_instances_p99_ms,
            10.0,
            " ms",
        ),
    ];
    let idle = summaries
        .iter()
        .max_by(|a, b| a.rss_idle_mib.total_cmp(&b.rss_idle_mib));
    out.push(at_most(
        "daemon idle RSS (largest of the points)",
        "≤ 15 MiB",
        idle,
        |s| s.rss_idle_mib,
        15.0,
        " MiB",
    ));
    out.push(at_most(
        "daemon peak RSS during the 50-instance job",
        "≤ 64 MiB",
        fifty,
        |s| s.rss_peak_mib,
        64.0,
        " MiB",
    ));
    let busiest = summaries
        .iter()
        .max_by(|a, b| a.progress_max_per_1s.total_cmp(&b.progress_max_per_1s));
    out.push(at_most(
        "Progress signals per second per job, whatever N (most in any 1 s window)",
        "≤ 5",
        busiest,
        |s| s.progress_max_per_1s,
        5.0,
        "",
    ));
    let bytes = match (at(1), at(10)) {
        (Some(one), Some(ten)) => {
            let factor = ten.daemon_registry_mib / one.daemon_registry_mib;
            Target {
                name: "one download per node: registry bytes at N=10 / at N=1".to_owned(),
                target: "≤ 1.2".to_owned(),
                measured: format!(
                    "{factor:.2} ({:.1} MiB / {:.1} MiB)",
                    ten.daemon_registry_mib, one.daemon_registry_mib
                ),
                met: Some(factor <= 1.2),
            }
        }
        _ => Target {
            name: "one download per node: registry bytes at N=10 / at N=1".to_owned(),
            target: "≤ 1.2".to_owned(),
            measured: "not measured (needs N=1 and N=10)".to_owned(),
            met: None,
        },
    };
    out.push(bytes);
    // The target is about several instances sharing one download; at N = 1 the one instance
    // pulls for itself (the table shows what it was served).
    let most_served = summaries.iter().filter(|s| s.n >= 2).max_by(|a, b| {
        a.daemon_max_serves_per_blob
            .total_cmp(&b.daemon_max_serves_per_blob)
    });
    out.push(at_most(
        "one download per node: times the registry served one blob in one job of N ≥ 2",
        "1",
        most_served,
        |s| s.daemon_max_serves_per_blob,
        1.0,
        "",
    ));
    out
}

impl Report {
    pub fn new(options: &Options, images: &Images, runs: Vec<Run>, total_s: f64) -> Report {
        let summaries: Vec<Summary> = options
            .sizes
            .iter()
            .map(|&n| {
                let of_n: Vec<&Run> = runs.iter().filter(|r| r.n == n).collect();
                summarise(n, &of_n)
            })
            .collect();
        Report {
            machine: measure::machine(),
            options: options.clone(),
            module: ModuleInfo {
                imageroot_files: images.files,
                imageroot_bytes: images.imageroot_bytes,
                extra_images: 2,
                extra_image_bytes: module::EXTRA_IMAGE_BYTES,
                v1: images.v1.clone(),
                v2: images.v2.clone(),
                extras_v1: vec![images.db1.clone(), images.cache.clone()],
                extras_v2: vec![images.db2.clone(), images.cache.clone()],
            },
            list_instances_pause_ms: crate::daemon_job::LIST_PAUSE.as_millis(),
            total_s,
            targets: match options.profile {
                crate::Profile::Loopback => targets(&summaries),
                crate::Profile::Node => node_targets(&summaries),
            },
            summaries,
            runs,
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| BenchError::io("create", dir, e))?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| BenchError::Check(format!("cannot serialise the results: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|e| BenchError::io("write", path, e))
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        out.push_str(&format!(
            "Machine: {} CPUs ({}), {} MiB RAM, kernel {}, {}\n",
            m.nproc, m.cpu_model, m.mem_total_mib, m.kernel, m.podman
        ));
        let o = &self.options;
        match o.profile {
            crate::Profile::Loopback => out.push_str(&format!(
                "Profile: loopback (registry on loopback), rootless storage {}\n",
                o.storage.name()
            )),
            crate::Profile::Node => out.push_str(&format!(
                "Profile: node (registry behind a {} Mbit/s uplink, {} ms to open a connection), \
                 rootless storage {}\n",
                o.uplink.mbit_per_s,
                o.uplink.connect_delay.as_millis(),
                o.storage.name()
            )),
        }
        out.push_str(&format!(
            "Module: {} files / {:.2} MiB of imageroot, 2 extra images of {:.0} MiB (one changes); \
             median of {} run(s) per point; bench took {:.0} s\n\n",
            self.module.imageroot_files,
            self.module.imageroot_bytes as f64 / MIB,
            self.module.extra_image_bytes as f64 / MIB,
            self.options.repeats,
            self.total_s
        ));
        let s = &self.summaries;
        let mut header = String::from("| |");
        let mut rule = String::from("|---|");
        for summary in s {
            header.push_str(&format!(" N={} |", summary.n));
            rule.push_str("---:|");
        }
        out.push_str(&header);
        out.push('\n');
        out.push_str(&rule);
        out.push('\n');
        let mut row = |label: &str, cell: &dyn Fn(&Summary) -> String| {
            out.push_str(&format!("| {label} |"));
            for summary in s {
                out.push_str(&format!(" {} |", cell(summary)));
            }
            out.push('\n');
        };
        row("(a) daemon, wall s", &|x| format!("{:.2}", x.daemon_wall_s));
        row("(b) ns8-baseline, wall s", &|x| {
            format!("{:.2}", x.baseline_wall_s)
        });
        row("a/b", &|x| format!("{:.2}", x.ratio));
        let link = |x: &Summary, f: &dyn Fn(&UplinkSummary) -> String| {
            x.uplink.as_ref().map(f).unwrap_or_else(|| "–".to_owned())
        };
        if s.iter().any(|x| x.uplink.is_some()) {
            row("one copy of what changed, MB; download floor s", &|x| {
                link(x, &|u| {
                    format!("{:.1}; {:.2}", u.changed_mb, u.download_floor_s)
                })
            });
            row("bytes down the uplink (a) / (b), MB", &|x| {
                link(x, &|u| {
                    format!("{:.1} / {:.1}", u.daemon_down_mb, u.baseline_down_mb)
                })
            });
            row("copies of what changed (a) / (b)", &|x| {
                link(x, &|u| {
                    format!("{:.3} / {:.2}", u.daemon_copies, u.baseline_copies)
                })
            });
            row("wall minus the download floor (a) / (b), s", &|x| {
                link(x, &|u| {
                    format!(
                        "{:.2} / {:.2}",
                        u.daemon_above_floor_s, u.baseline_above_floor_s
                    )
                })
            });
            row("(a) wall ÷ download floor", &|x| {
                link(x, &|u| format!("{:.2}", u.daemon_over_floor))
            });
            row("connections opened (a) / (b)", &|x| {
                link(x, &|u| {
                    format!(
                        "{:.0} / {:.0}",
                        u.daemon_connections, u.baseline_connections
                    )
                })
            });
        }
        row(
            "podman floor / b (the least a/b with these podman commands)",
            &|x| {
                x.floor_over_baseline
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "–".to_owned())
            },
        );
        row("(a) CPU s: daemon + workers + podman + scripts", &|x| {
            format!("{:.2}", x.daemon_cpu_tree_s)
        });
        row("(a) CPU s: daemon / workers (own)", &|x| {
            format!("{:.2} / {:.2}", x.daemon_cpu_own_s, x.daemon_cpu_workers_s)
        });
        row("(b) CPU s: all processes", &|x| {
            format!("{:.2}", x.baseline_cpu_s)
        });
        row(
            "podman floor, one instance, s (+ scripts s, + Reload s)",
            &|x| {
                format!(
                    "{:.3} (+{:.3}, +{:.3})",
                    x.floor_podman_s, x.floor_scripts_s, x.floor_reload_s
                )
            },
        );
        row(
            "overhead above the podman floor, wall ms (above podman + scripts + Reload)",
            &|x| match (x.overhead_wall_ms, x.overhead_wall_without_scripts_ms) {
                (Some(a), Some(b)) => format!("{a:.0} ({b:.0})"),
                _ => "–".to_owned(),
            },
        );
        row("overhead above the floor, CPU ms per instance", &|x| {
            format!("{:.0}", x.overhead_cpu_per_instance_ms)
        });
        row("daemon RSS idle / peak in job, MiB", &|x| {
            format!("{:.1} / {:.1}", x.rss_idle_mib, x.rss_peak_mib)
        });
        row("worker peak RSS, MiB", &|x| {
            format!("{:.1}", x.worker_rss_peak_mib)
        });
        row("ListInstances p50 / p99 ms (calls)", &|x| {
            format!(
                "{:.1} / {:.1} ({:.0})",
                x.list_instances_p50_ms, x.list_instances_p99_ms, x.list_instances_calls
            )
        });
        row("Progress signals: per s / most in 1 s (total)", &|x| {
            format!(
                "{:.1} / {:.0} ({:.0})",
                x.progress_per_s, x.progress_max_per_1s, x.progress_signals
            )
        });
        row("PropertiesChanged: per s / most in 1 s", &|x| {
            format!(
                "{:.1} / {:.0}",
                x.properties_changed_per_s, x.properties_changed_max_per_1s
            )
        });
        row("registry MiB served (a) / (b)", &|x| {
            format!(
                "{:.1} / {:.1}",
                x.daemon_registry_mib, x.baseline_registry_mib
            )
        });
        row("most serves of one blob (a) / (b)", &|x| {
            format!(
                "{:.0} / {:.0}",
                x.daemon_max_serves_per_blob, x.baseline_max_serves_per_blob
            )
        });
        row("registry CPU s (a) / (b); bus CPU s (a)", &|x| {
            format!(
                "{:.2} / {:.2}; {:.2}",
                x.daemon_registry_cpu_s, x.baseline_registry_cpu_s, x.daemon_bus_cpu_s
            )
        });
        row(
            "setup (excluded): users s / installs s / teardown s",
            &|x| {
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    x.setup_users_s, x.setup_install_s, x.setup_teardown_s
                )
            },
        );
        row("one point in all, s (all repeats of this N, s)", &|x| {
            format!("{:.0} ({:.0})", x.setup_point_total_s, x.all_repeats_s)
        });
        out.push_str("\n| target | goal | measured | met |\n|---|---|---|---|\n");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {met} |\n",
                t.name, t.target, t.measured
            ));
        }
        out
    }
}
