//! The update-module request, checked the way NS8's cluster schema checks it, with errors in
//! NS8's validation-array form (`[{"field","parameter","value","error"}]`).

use serde::Serialize;
use serde_json::Value;

use crate::engine::imagename;

/// Requests larger than this are refused before parsing.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// More instances than this in one request are refused.
pub const MAX_INSTANCES: usize = 1000;

/// One item of NS8's validation array. `error` is `<parameter>_<kind>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationError {
    pub field: String,
    pub parameter: String,
    pub value: Value,
    pub error: String,
    /// The job that holds a busy instance (only with `action_already_running`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The instance a check of the node refused the request for, and what it runs now (only
    /// with `module_url_other_module` and `module_url_downgrade`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// With `instances_insufficient_space`: the filesystem (its mount point), and the bytes the
    /// update needs there against those available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available: Option<u64>,
}

impl ValidationError {
    /// An error at `field` (`instances.0`), whose parameter is the field's first component.
    pub fn new(field: &str, value: Value, kind: &str) -> Self {
        let parameter = field.split('.').next().unwrap_or(field).to_owned();
        ValidationError {
            field: field.to_owned(),
            error: format!("{parameter}_{kind}"),
            parameter,
            value,
            job: None,
            instance: None,
            current: None,
            filesystem: None,
            needed: None,
            available: None,
        }
    }
}

/// Renders a validation array as NS8 prints it.
pub fn to_json(errors: &[ValidationError]) -> String {
    serde_json::to_string(errors).unwrap_or_else(|_| "[]".to_owned())
}

/// A request that passed the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    pub module_url: String,
    pub instances: Vec<String>,
    pub force: bool,
    /// Whether an older version than the installed one may be put on an instance.
    pub allow_downgrade: bool,
    /// The JSON exactly as received (the scripts' stdin).
    pub raw: String,
}

/// Checks `raw` against the cluster schema of update-module (module_url: string, minLength 1,
/// required; instances: array of ≥1 strings of minLength 2 matching `^.+[0-9]+$`, required;
/// force: boolean; other keys allowed), plus our limits and duplicate instances.
pub fn parse(raw: &str) -> Result<UpdateRequest, Vec<ValidationError>> {
    let root = "(root)";
    if raw.len() > MAX_REQUEST_BYTES {
        return Err(vec![ValidationError::new(
            root,
            Value::from(raw.len()),
            "too_large",
        )]);
    }
    let value: Value = serde_json::from_str(raw).map_err(|e| {
        vec![ValidationError::new(
            root,
            Value::from(e.to_string()),
            "invalid_json",
        )]
    })?;
    let Value::Object(object) = &value else {
        return Err(vec![ValidationError::new(
            root,
            value.clone(),
            "invalid_type",
        )]);
    };
    let mut errors = Vec::new();

    let module_url = match object.get("module_url") {
        None => {
            errors.push(ValidationError::new("module_url", Value::Null, "required"));
            None
        }
        Some(Value::String(url)) if url.is_empty() => {
            errors.push(ValidationError::new(
                "module_url",
                Value::from(""),
                "string_gte",
            ));
            None
        }
        Some(Value::String(url)) if !plausible_reference(url) => {
            errors.push(ValidationError::new(
                "module_url",
                Value::from(url.as_str()),
                "pattern",
            ));
            None
        }
        Some(Value::String(url)) => Some(url.clone()),
        Some(other) => {
            errors.push(ValidationError::new(
                "module_url",
                other.clone(),
                "invalid_type",
            ));
            None
        }
    };

    let mut instances = Vec::new();
    match object.get("instances") {
        None => errors.push(ValidationError::new("instances", Value::Null, "required")),
        Some(Value::Array(items)) if items.is_empty() => {
            errors.push(ValidationError::new(
                "instances",
                Value::Array(Vec::new()),
                "array_min_items",
            ));
        }
        Some(Value::Array(items)) if items.len() > MAX_INSTANCES => {
            errors.push(ValidationError::new(
                "instances",
                Value::from(items.len()),
                "too_large",
            ));
        }
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                let field = format!("instances.{index}");
                match item {
                    Value::String(id) if id.chars().count() < 2 => {
                        errors.push(ValidationError::new(&field, item.clone(), "string_gte"));
                    }
                    Value::String(id) if !instance_pattern(id) => {
                        errors.push(ValidationError::new(&field, item.clone(), "pattern"));
                    }
                    Value::String(id) if instances.contains(id) => {
                        errors.push(ValidationError::new(
                            &field,
                            item.clone(),
                            "duplicate_instance",
                        ));
                    }
                    Value::String(id) => instances.push(id.clone()),
                    other => {
                        errors.push(ValidationError::new(&field, other.clone(), "invalid_type"))
                    }
                }
            }
        }
        Some(other) => errors.push(ValidationError::new(
            "instances",
            other.clone(),
            "invalid_type",
        )),
    }

    let mut flag = |key: &str| match object.get(key) {
        None => false,
        Some(Value::Bool(value)) => *value,
        Some(other) => {
            errors.push(ValidationError::new(key, other.clone(), "invalid_type"));
            false
        }
    };
    let force = flag("force");
    let allow_downgrade = flag("allow_downgrade");

    match (module_url, errors.is_empty()) {
        (Some(module_url), true) => Ok(UpdateRequest {
            module_url,
            instances,
            force,
            allow_downgrade,
            raw: raw.to_owned(),
        }),
        _ => Err(errors),
    }
}

/// NS8's `^.+[0-9]+$`: at least one character, then at least one digit at the end.
fn instance_pattern(id: &str) -> bool {
    let trimmed = id.trim_end_matches(|c: char| c.is_ascii_digit());
    !trimmed.is_empty() && trimmed.len() < id.len() && !id.contains('\n')
}

/// Whether `url` is an image reference podman can take as a positional argument
/// ([`imagename::validate_reference`]): anything else (a leading `-`, whitespace, control
/// characters, not a `[host[:port]/]path[:tag][@digest]` at all) is refused here, before any job
/// exists, instead of failing in the worker.
fn plausible_reference(url: &str) -> bool {
    imagename::validate_reference(url).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn errors(raw: &str) -> Vec<String> {
        parse(raw)
            .unwrap_err()
            .into_iter()
            .map(|e| e.error)
            .collect()
    }

    #[test]
    fn a_valid_request_parses() {
        let raw = r#"{"module_url":"ghcr.io/nethserver/mail:1.2","instances":["mail1","mail2"],"force":true,"x":1}"#;
        let request = parse(raw).unwrap();
        assert_eq!(request.module_url, "ghcr.io/nethserver/mail:1.2");
        assert_eq!(request.instances, ["mail1", "mail2"]);
        assert!(request.force);
        assert_eq!(request.raw, raw);
    }

    #[test]
    fn ns8_error_kinds() {
        assert_eq!(
            errors(r#"{"instances":["mail1"]}"#),
            ["module_url_required"]
        );
        assert_eq!(errors(r#"{"module_url":"a/b:1"}"#), ["instances_required"]);
        assert_eq!(
            errors(r#"{"module_url":"a/b:1","instances":[]}"#),
            ["instances_array_min_items"]
        );
        assert_eq!(
            errors(r#"{"module_url":5,"instances":["a1"]}"#),
            ["module_url_invalid_type"]
        );
        assert_eq!(
            errors(r#"{"module_url":"","instances":["a1"]}"#),
            ["module_url_string_gte"]
        );
        assert_eq!(
            errors(r#"{"module_url":"a/b:1","instances":["1"]}"#),
            ["instances_string_gte"]
        );
        assert_eq!(
            errors(r#"{"module_url":"a/b:1","instances":["a1"],"force":"yes"}"#),
            ["force_invalid_type"]
        );
        assert_eq!(
            errors(r#"{"module_url":"a/b:1","instances":["a1","a1"]}"#),
            ["instances_duplicate_instance"]
        );
        assert_eq!(
            errors(r#"{"module_url":"a/b:1","instances":"a1"}"#),
            ["instances_invalid_type"]
        );
        assert_eq!(errors("{"), ["(root)_invalid_json"]);
        assert_eq!(errors("[]"), ["(root)_invalid_type"]);
        assert_eq!(
            errors(r#"{"module_url":"-x","instances":["a1"]}"#),
            ["module_url_pattern"]
        );
    }

    #[test]
    fn pattern_error_names_the_field_and_value() {
        let err = parse(r#"{"module_url":"a/b:1","instances":["mail"]}"#).unwrap_err();
        assert_eq!(
            to_json(&err),
            r#"[{"field":"instances.0","parameter":"instances","value":"mail","error":"instances_pattern"}]"#
        );
    }

    #[test]
    fn oversized_requests_are_refused_before_parsing() {
        let raw = format!(
            r#"{{"module_url":"a/b:1","instances":["a1"],"pad":"{}"}}"#,
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(errors(&raw), ["(root)_too_large"]);
        let many: Vec<String> = (0..=MAX_INSTANCES).map(|i| format!("\"m{i}\"")).collect();
        let raw = format!(
            r#"{{"module_url":"a/b:1","instances":[{}]}}"#,
            many.join(",")
        );
        assert_eq!(errors(&raw), ["instances_too_large"]);
    }

    #[test]
    fn path_like_instance_ids_pass_the_pattern_but_only_as_names() {
        // NS8's pattern lets these through; they are only ever compared with discovered ids
        // (engine::instance), so the request layer keeps them verbatim.
        for id in ["../x1", "/etc1", "a/b1", ".1"] {
            let raw = serde_json::json!({"module_url": "r/m:1", "instances": [id]}).to_string();
            assert_eq!(parse(&raw).unwrap().instances, [id]);
        }
    }

    #[test]
    fn references_podman_could_misread_are_refused() {
        for url in [
            "-x",
            "--privileged",
            "a b/c:1",
            "a/b:1 ",
            "a\tb/c:1",
            "a/b:1\n--rm",
            "a/b\u{7}:1",
            "a/b\u{0}:1",
            "a/b:1\u{85}",
            "::::",
            "UPPER/Case:1",
            "a/b:",
            "a/b@sha256:123",
            "a//b:1",
        ] {
            let raw = serde_json::json!({"module_url": url, "instances": ["a1"]}).to_string();
            assert_eq!(errors(&raw), ["module_url_pattern"], "{url:?}");
        }
        for url in [
            "ghcr.io/nethserver/mail:1.7.1",
            "127.0.0.1:5000/demo:2.0",
            "localhost/x/y:latest",
            "ghcr.io/nethserver/mail@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let raw = serde_json::json!({"module_url": url, "instances": ["a1"]}).to_string();
            assert!(parse(&raw).is_ok(), "{url:?}");
        }
    }

    #[test]
    fn nested_junk_is_refused_cheaply() {
        // Deeper than serde_json's recursion limit (128), within 64 KiB: not JSON for us.
        let deep = format!(
            r#"{{"module_url":"a/b:1","instances":["a1"],"x":{}{}}}"#,
            "[".repeat(20_000),
            "]".repeat(20_000)
        );
        assert!(deep.len() < MAX_REQUEST_BYTES);
        assert_eq!(errors(&deep), ["(root)_invalid_json"]);
        // Deeper and larger: refused before parsing.
        let huge = "[".repeat(MAX_REQUEST_BYTES + 1);
        assert_eq!(errors(&huge), ["(root)_too_large"]);
        // Nesting within the limit in an unknown key is kept as received.
        let fine = format!(
            r#"{{"module_url":"a/b:1","instances":["a1"],"x":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(parse(&fine).unwrap().raw, fine);
        // Deep nesting where an instance id is expected is a type error, not a crash.
        let nested_id = r#"{"module_url":"a/b:1","instances":[[[["a1"]]]]}"#;
        assert_eq!(errors(nested_id), ["instances_invalid_type"]);
    }

    /// Any JSON document, up to a few levels deep.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics(raw in ".{0,300}") {
            let _ = parse(&raw);
        }

        #[test]
        fn never_panics_on_any_json(value in json_value()) {
            let raw = value.to_string();
            match parse(&raw) {
                Ok(request) => prop_assert_eq!(request.raw, raw),
                // Every error names a field and an error kind.
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for e in errors {
                        prop_assert!(!e.field.is_empty() && e.error.starts_with(&e.parameter));
                    }
                }
            }
        }

        #[test]
        fn never_panics_on_requests_with_junk_fields(
            url in json_value(),
            instances in json_value(),
            force in json_value(),
        ) {
            let raw = serde_json::json!({"module_url": url, "instances": instances, "force": force})
                .to_string();
            let _ = parse(&raw);
        }

        #[test]
        fn valid_requests_round_trip_and_keep_unknown_keys(
            ids in proptest::collection::btree_set("[a-z]{1,8}[0-9]{1,3}", 1..20),
            force in any::<Option<bool>>(),
            extra in proptest::collection::btree_map("x_[a-z]{1,6}", json_value(), 0..4),
        ) {
            let ids: Vec<String> = ids.into_iter().collect();
            let mut object = serde_json::Map::new();
            object.insert("module_url".into(), Value::from("ghcr.io/nethserver/mail:1.2.3"));
            object.insert("instances".into(), Value::from(ids.clone()));
            if let Some(force) = force {
                object.insert("force".into(), Value::from(force));
            }
            for (k, v) in &extra {
                object.insert(k.clone(), v.clone());
            }
            let raw = Value::Object(object).to_string();
            let request = parse(&raw).unwrap();
            prop_assert_eq!(&request.module_url, "ghcr.io/nethserver/mail:1.2.3");
            prop_assert_eq!(&request.instances, &ids);
            prop_assert_eq!(request.force, force.unwrap_or(false));
            // The scripts get the request byte for byte as received: unknown keys included.
            prop_assert_eq!(&request.raw, &raw);
            let forwarded: Value = serde_json::from_str(&request.raw).unwrap();
            for k in extra.keys() {
                prop_assert!(forwarded.get(k).is_some(), "{} lost", k);
            }
        }

        #[test]
        fn instance_ids_round_trip(ids in proptest::collection::vec("[a-z]{1,8}[0-9]{1,3}", 1..20)) {
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            let raw = serde_json::json!({"module_url": "r/m:1", "instances": unique}).to_string();
            prop_assert_eq!(parse(&raw).unwrap().instances, unique);
        }
    }
}
