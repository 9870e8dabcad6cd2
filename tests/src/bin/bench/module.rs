//! The benchmark's demo module: an imageroot of about 300 files / 2 MiB (unit files, action
//! steps, helpers, templates, a Python package, translations, data), generated deterministically,
//! and two extra images of incompressible data, one of which changes between 1.0 and 2.0. The
//! node profile adds the web UI bundle NS8 modules ship (`ui/`, 3 MiB, new in each version), so
//! that the imageroot is a few MiB as on a node.

use std::collections::BTreeMap;

use module_updater_tests::{ImageSpec, Result, Sandbox, cmd};

use crate::{BenchError, Profile};

/// Size of each extra image's payload.
pub const EXTRA_IMAGE_BYTES: u64 = 30 * 1024 * 1024;

/// The images of one sandbox.
#[derive(Debug, Clone)]
pub struct Images {
    pub v1: String,
    pub v2: String,
    /// The extra image that changes: `demo-db:1.0` then `demo-db:2.0`.
    pub db1: String,
    pub db2: String,
    /// The extra image both versions name: `demo-cache:1.0`.
    pub cache: String,
    /// Files and bytes of the 2.0 imageroot.
    pub files: usize,
    pub imageroot_bytes: u64,
}

/// Bytes of the node profile's UI bundle.
pub const UI_BYTES: usize = 3 * 1024 * 1024;

/// Builds and pushes the module's two versions and its extra images.
pub fn build(sandbox: &Sandbox, profile: Profile) -> Result<Images> {
    let db1 = sandbox.build_blob_image("demo-db", "1.0", EXTRA_IMAGE_BYTES, 11)?;
    let db2 = sandbox.build_blob_image("demo-db", "2.0", EXTRA_IMAGE_BYTES, 12)?;
    let cache = sandbox.build_blob_image("demo-cache", "1.0", EXTRA_IMAGE_BYTES, 21)?;
    let spec = |tag: &str, extras: &[String]| match profile {
        Profile::Loopback => module_spec(tag, extras),
        Profile::Node => with_ui(module_spec(tag, extras), tag),
    };
    let spec1 = spec("1.0", &[db1.clone(), cache.clone()]);
    let spec2 = spec("2.0", &[db2.clone(), cache.clone()]);
    let files = spec2.files.len();
    let imageroot_bytes = spec2
        .files
        .iter()
        .map(|f| match &f.kind {
            module_updater_tests::FileKind::File { contents, .. } => contents.len() as u64,
            _ => 0,
        })
        .sum();
    let v1 = sandbox.build_image(&spec1)?;
    let v2 = sandbox.build_image(&spec2)?;
    Ok(Images {
        v1,
        v2,
        db1,
        db2,
        cache,
        files,
        imageroot_bytes,
    })
}

/// `spec` with a web UI bundle of [`UI_BYTES`] that differs in each version (minified code:
/// it compresses about three times, as the word text here does).
pub fn with_ui(spec: ImageSpec, tag: &str) -> ImageSpec {
    let third = UI_BYTES / 3;
    spec.file(
        "ui/index.html",
        words(&format!("ui@{tag}"), 2000, ""),
        0o644,
    )
    .file(
        "ui/js/app.js",
        words(&format!("app@{tag}"), third, ""),
        0o644,
    )
    .file(
        "ui/js/vendor.js",
        words(&format!("vendor@{tag}"), 2 * third, ""),
        0o644,
    )
}

/// The digests and sizes of what pulling `url` downloads: its manifest, config and layers.
fn blobs_of(url: &str) -> Result<BTreeMap<String, u64>, BenchError> {
    let mut inspect = cmd::clean("skopeo");
    inspect.args(["inspect", "--raw", "--tls-verify=false"]);
    inspect.arg(format!("docker://{url}"));
    let output = cmd::run(&mut inspect)?;
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| BenchError::Check(format!("manifest of {url}: {e}")))?;
    let mut blobs = BTreeMap::from([(format!("manifest of {url}"), output.stdout.len() as u64)]);
    let config = manifest.get("config").into_iter();
    let layers = manifest
        .get("layers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten();
    for blob in config.chain(layers) {
        let digest = blob.get("digest").and_then(|d| d.as_str());
        let size = blob.get("size").and_then(|s| s.as_u64());
        match (digest, size) {
            (Some(digest), Some(size)) => {
                blobs.insert(digest.to_owned(), size);
            }
            _ => {
                return Err(BenchError::Check(format!(
                    "manifest of {url}: a blob without digest or size"
                )));
            }
        }
    }
    Ok(blobs)
}

/// Bytes of one copy of what an instance at 1.0 downloads to reach 2.0: the manifests, configs
/// and layers of 2.0's images that 1.0's images do not have.
pub fn changed_bytes(images: &Images) -> Result<u64, BenchError> {
    let mut old = BTreeMap::new();
    for url in [&images.v1, &images.db1, &images.cache] {
        old.extend(blobs_of(url)?);
    }
    let mut new = BTreeMap::new();
    for url in [&images.v2, &images.db2, &images.cache] {
        new.extend(blobs_of(url)?);
    }
    Ok(new
        .iter()
        .filter(|(digest, _)| !old.contains_key(*digest))
        .map(|(_, size)| size)
        .sum())
}

/// The update scripts both versions ship (only the version comment differs): cheap, as most
/// real ones are, but each a real process that reads the environment or talks to the manager.
fn update_scripts(tag: &str) -> [(&'static str, String); 3] {
    [
        (
            "update-module.d/10announce",
            format!(
                "#!/bin/sh\n# demo {tag}: say what changes\necho \"<6>updating $MODULE_ID from ${{PREV_IMAGE_URL##*:}} to ${{IMAGE_URL##*:}}\"\n"
            ),
        ),
        (
            "update-module.d/20migrate",
            format!(
                "#!/bin/sh\n# demo {tag}: record the migration in the state dir (the cwd)\necho \"migrated to ${{IMAGE_URL##*:}}\" > .demo-migrated\n"
            ),
        ),
        (
            "update-module.d/80restart",
            format!(
                "#!/bin/sh\n# demo {tag}: restart the service if it runs\nsystemctl --user try-restart demo.service 2>/dev/null || :\n"
            ),
        ),
    ]
}

const UNITS: [&str; 7] = [
    "demo.service",
    "demo-db.service",
    "demo-cache.service",
    "demo-worker@.service",
    "demo-backup.service",
    "demo-backup.timer",
    "demo.target",
];

const ACTIONS: [&str; 24] = [
    "create-module",
    "configure-module",
    "get-configuration",
    "destroy-module",
    "restore-module",
    "clone-module",
    "transfer-state",
    "import-module",
    "get-status",
    "list-backups",
    "run-backup",
    "set-backup",
    "get-name",
    "set-name",
    "get-defaults",
    "set-defaults",
    "list-users",
    "add-user",
    "remove-user",
    "alter-user",
    "get-domains",
    "set-domains",
    "get-certificates",
    "set-certificates",
];

/// The module image `demo:<tag>` naming `extras` in `org.nethserver.images`. 2.0 changes every
/// unit, some modules and templates, drops three helpers and adds three.
pub fn module_spec(tag: &str, extras: &[String]) -> ImageSpec {
    let v2 = tag != "1.0";
    let mut spec = ImageSpec::module("demo", tag).label("org.nethserver.images", extras.join(" "));
    for unit in UNITS {
        let text = format!(
            "[Unit]\nDescription=Demo module {tag}: {unit}\nPartOf=demo.target\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n\n[Install]\nWantedBy=default.target\n"
        );
        spec = spec.file(format!("systemd/user/{unit}"), text, 0o644);
    }
    for (path, text) in update_scripts(tag) {
        spec = spec.executable(path, text);
    }
    for (i, action) in ACTIONS.iter().enumerate() {
        for step in ["10validate", "50configure", "80apply"] {
            let path = format!("actions/{action}/{step}");
            let body = words(&path, 1200 + 100 * (i % 5), "# ");
            spec = spec.executable(path, format!("#!/bin/bash\nset -e\n{body}exit 0\n"));
        }
        let path = format!("actions/{action}/validate-input.json");
        let schema = format!(
            "{{\"$schema\": \"http://json-schema.org/draft-07/schema#\", \"title\": \"{action}\", \"description\": \"{}\"}}\n",
            words(&path, 600, "").replace('\n', " ")
        );
        spec = spec.file(path, schema, 0o644);
    }
    // Helpers: 2.0 drops the last three of 1.0 and adds three of its own.
    let helpers: Vec<String> = if v2 {
        (0..21)
            .map(|i| format!("helper{i:02}"))
            .chain((0..3).map(|i| format!("newhelper{i}")))
            .collect()
    } else {
        (0..24).map(|i| format!("helper{i:02}")).collect()
    };
    for name in helpers {
        let path = format!("bin/{name}");
        let body = words(&path, 2000, "# ");
        spec = spec.executable(path, format!("#!/bin/sh\n{body}echo {name}\n"));
    }
    for i in 0..60 {
        let path = format!("templates/conf{i:02}.j2");
        let seed = if v2 && i % 10 == 0 {
            format!("{path}@{tag}")
        } else {
            path.clone()
        };
        spec = spec.file(path, words(&seed, 6000, "# "), 0o644);
    }
    for i in 0..80 {
        let path = format!("pypkg/demo/mod{i:02}.py");
        let seed = if v2 && i % 5 == 0 {
            format!("{path}@{tag}")
        } else {
            path.clone()
        };
        spec = spec.file(path, words(&seed, 5000, "# "), 0o644);
    }
    for i in 0..24 {
        let path = format!("etc/locale/lang{i:02}.json");
        spec = spec.file(path.clone(), words(&path, 8000, ""), 0o644);
    }
    for i in 0..6 {
        let path = format!("data/table{i}.csv");
        spec = spec.file(path.clone(), words(&path, 140_000, ""), 0o644);
    }
    spec
}

/// About `bytes` of text derived from `seed` (the same seed gives the same text): lines of
/// words behind `prefix`, compressible as real files are.
fn words(seed: &str, bytes: usize, prefix: &str) -> String {
    const VOCABULARY: [&str; 32] = [
        "module",
        "instance",
        "update",
        "image",
        "config",
        "service",
        "backup",
        "restore",
        "value",
        "state",
        "environment",
        "podman",
        "systemd",
        "reload",
        "user",
        "domain",
        "port",
        "volume",
        "secret",
        "token",
        "record",
        "table",
        "index",
        "cluster",
        "node",
        "agent",
        "event",
        "signal",
        "script",
        "path",
        "file",
        "label",
    ];
    // FNV-1a of the seed, then SplitMix64.
    let mut state = seed.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut text = String::with_capacity(bytes + 80);
    while text.len() < bytes {
        text.push_str(prefix);
        let count = 6 + next() % 8;
        for k in 0..count {
            if k > 0 {
                text.push(' ');
            }
            let word = VOCABULARY[usize::try_from(next() % 32).unwrap_or(0)];
            text.push_str(word);
            if next() % 7 == 0 {
                text.push_str(&(next() % 1000).to_string());
            }
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_has_about_300_files_and_2_mib() {
        for tag in ["1.0", "2.0"] {
            let spec = module_spec(tag, &[]);
            assert_eq!(spec.files.len(), 300, "{tag}");
            let bytes: usize = spec
                .files
                .iter()
                .map(|f| match &f.kind {
                    module_updater_tests::FileKind::File { contents, .. } => contents.len(),
                    _ => 0,
                })
                .sum();
            assert!((1_800_000..2_400_000).contains(&bytes), "{tag}: {bytes}");
        }
        assert_eq!(words("x", 500, "# "), words("x", 500, "# "));
        assert_ne!(words("x", 500, "# "), words("y", 500, "# "));
    }
}
