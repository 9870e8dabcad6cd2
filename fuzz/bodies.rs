//! The bodies of the fuzz targets: each takes any bytes and panics only when a property of the
//! parser is broken. Shared by the libFuzzer targets (`fuzz_targets/`, nightly) and the stable
//! corpus run (`daemon/tests/fuzz_corpus.rs`), which include this file with `#[path]`.

use module_updaterd::engine::environment::Environment;
use module_updaterd::request::{self, MAX_INSTANCES, MAX_REQUEST_BYTES};

/// `request::parse` on any text: no panic; an accepted request is within the limits, has unique
/// instance ids and keeps the text verbatim; a refusal names at least one field and renders as
/// NS8's validation array.
pub fn request_parse(data: &[u8]) {
    // A D-Bus string is valid UTF-8: the bus refuses anything else before the daemon sees it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match request::parse(text) {
        Ok(parsed) => {
            assert!(
                text.len() <= MAX_REQUEST_BYTES,
                "accepted an oversized request"
            );
            assert_eq!(parsed.raw, text, "the request must be forwarded verbatim");
            assert!(!parsed.module_url.is_empty());
            assert!(
                !parsed.module_url.starts_with('-'),
                "a module_url podman would read as an option: {:?}",
                parsed.module_url
            );
            assert!(
                !parsed
                    .module_url
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()),
                "whitespace or control characters in {:?}",
                parsed.module_url
            );
            assert!(!parsed.instances.is_empty() && parsed.instances.len() <= MAX_INSTANCES);
            let mut ids = parsed.instances.clone();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), parsed.instances.len(), "duplicate instance ids");
            for id in &parsed.instances {
                assert!(id.chars().count() >= 2 && id.ends_with(|c: char| c.is_ascii_digit()));
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refusal without a reason");
            for error in &errors {
                assert!(!error.field.is_empty());
                assert!(
                    error.error.starts_with(&error.parameter),
                    "{error:?}: the error kind is <parameter>_<kind>"
                );
            }
            let rendered = request::to_json(&errors);
            let array: serde_json::Value =
                serde_json::from_str(&rendered).expect("the validation array is JSON");
            assert_eq!(array.as_array().map(Vec::len), Some(errors.len()));
        }
    }
}

/// `Environment::parse` then `render` on any text: no panic; rendering is a fixed point (what
/// we write reads back the same and renders to the same bytes); no key a reader saw is lost,
/// and each keeps the value of its last line, as NS8's `read_envfile` does.
pub fn environment_round_trip(data: &[u8]) {
    // Environment::load reads the file as UTF-8 text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = Environment::parse(text);
    let rendered = env.render();
    let again = Environment::parse(&rendered);
    assert_eq!(again, env, "render then parse changed the environment");
    assert_eq!(again.render(), rendered, "render is not a fixed point");
    // What NS8's reader sees: every `K=V` line that is not empty or a comment, the last one of a
    // key winning.
    let mut expected = std::collections::BTreeMap::new();
    for line in text.split('\n') {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            expected.insert(key, value);
        }
    }
    let got: std::collections::BTreeMap<&str, &str> = env.iter().collect();
    assert_eq!(got, expected, "a key was lost, added or changed");
}
