//! Image names: NS8's `get_image_name_from_url` and `*_IMAGE` variable rule (reference §1.8), and
//! the validation of every reference before it reaches podman's command line.

/// Longest reference accepted by [`validate_reference`].
pub const MAX_REFERENCE_LEN: usize = 4096;

/// Errors of image name derivation and reference validation. Messages name the reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageNameError {
    #[error(
        "cannot derive an image name from {url:?}: it has no '/' (NS8 expects registry/path/name:tag)"
    )]
    NoSlash { url: String },
    #[error(
        "cannot derive an image name from {url:?}: its last component has no ':tag' nor '@digest'"
    )]
    NoTagOrDigest { url: String },
    #[error("empty image reference")]
    Empty,
    #[error("image reference of {len} bytes is longer than the limit of {MAX_REFERENCE_LEN}")]
    TooLong { len: usize },
    #[error("image reference {reference:?} starts with '-' and would be read as an option")]
    LeadingDash { reference: String },
    #[error("image reference {reference:?} contains the whitespace or control character {ch:?}")]
    InvalidChar { reference: String, ch: char },
    #[error(
        "{reference:?} is not an image reference ([host[:port]/]path[:tag][@algo:hex]): {reason}"
    )]
    Malformed {
        reference: String,
        reason: &'static str,
    },
}

/// The image name of a URL, exactly as NS8's `get_image_name_from_url`:
/// take the text after the last `/`, then the part before the first `:` or `@`.
///
/// `ghcr.io/nethserver/samba:v1.0.0` → `samba`; `alpine:3` and `ghcr.io/x/foo` are errors.
pub fn image_name_from_url(url: &str) -> Result<&str, ImageNameError> {
    let (_, last) = url
        .rsplit_once('/')
        .ok_or_else(|| ImageNameError::NoSlash {
            url: url.to_owned(),
        })?;
    // Python replaces the first '@' by ':' and splits at the first ':', so the name ends at
    // whichever of the two comes first.
    let end = last
        .find([':', '@'])
        .ok_or_else(|| ImageNameError::NoTagOrDigest {
            url: url.to_owned(),
        })?;
    Ok(&last[..end])
}

/// The environment variable NS8 stores an extra image's URL in: `-`, `.`, `+` and space become
/// `_`, the result is uppercased and suffixed with `_IMAGE`, and prefixed with `I` when it starts
/// with a digit (NS8 ee1c7ec0).
pub fn image_env_var(name: &str) -> String {
    let mut var: String = name
        .chars()
        .map(|c| match c {
            '-' | '.' | '+' | ' ' => '_',
            c => c,
        })
        .collect::<String>()
        .to_uppercase();
    var.push_str("_IMAGE");
    if var.starts_with(|c: char| c.is_ascii_digit()) {
        var.insert(0, 'I');
    }
    var
}

/// Refuses anything that is not plainly an image reference, before it is given to podman:
/// empty, over [`MAX_REFERENCE_LEN`] bytes, starting with `-`, containing whitespace or control
/// characters, or not of the shape `[host[:port]/]path[:tag][@algo:hex]` where the host is DNS
/// labels or a bracketed IPv6 address, path components are runs of `[a-z0-9]` joined by one `.`,
/// one or two `_`, or any number of `-` (the OCI distribution grammar), the tag is
/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` and the digest is `algo:hex` (sha256: 64 hex digits).
pub fn validate_reference(r: &str) -> Result<(), ImageNameError> {
    if r.is_empty() {
        return Err(ImageNameError::Empty);
    }
    if r.len() > MAX_REFERENCE_LEN {
        return Err(ImageNameError::TooLong { len: r.len() });
    }
    if r.starts_with('-') {
        return Err(ImageNameError::LeadingDash {
            reference: r.to_owned(),
        });
    }
    if let Some(ch) = r.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(ImageNameError::InvalidChar {
            reference: r.to_owned(),
            ch,
        });
    }
    let malformed = |reason| ImageNameError::Malformed {
        reference: r.to_owned(),
        reason,
    };

    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    // The tag separator is a ':' after the last '/'; a ':' before it belongs to host:port.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].find(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        check_tag(tag).map_err(malformed)?;
    }
    if name.is_empty() {
        return Err(malformed("the name is empty"));
    }
    let mut components = name.split('/');
    let first = components.next().unwrap_or_default();
    let rest: Vec<&str> = components.collect();
    // Docker's rule: the first component is a registry host when more follow and it looks like
    // a host (has a '.' or a port, or is localhost) or has uppercase (never valid in a path).
    let first_is_host = !rest.is_empty()
        && (first.contains(['.', ':'])
            || first == "localhost"
            || first.chars().any(|c| c.is_ascii_uppercase()));
    if first_is_host {
        // Like the reference grammar, a first component that is not a valid host may still be
        // a valid path component (`a_b.c/d`).
        if let Err(reason) = check_host(first) {
            check_path_component(first).map_err(|_| malformed(reason))?;
        }
    } else {
        check_path_component(first).map_err(malformed)?;
    }
    for component in rest {
        check_path_component(component).map_err(malformed)?;
    }
    if let Some(digest) = digest {
        check_digest(digest).map_err(malformed)?;
    }
    Ok(())
}

fn check_digest(digest: &str) -> Result<(), &'static str> {
    let (algo, hex) = digest
        .split_once(':')
        .ok_or("the digest after '@' must be algo:hex")?;
    let algo_ok = !algo.is_empty()
        && algo.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
    if !algo_ok {
        return Err("the digest algorithm must be lowercase letters and digits");
    }
    if !hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
        return Err("the digest must be lowercase hexadecimal");
    }
    match algo {
        "sha256" if hex.len() != 64 => Err("a sha256 digest has 64 hexadecimal digits"),
        "sha512" if hex.len() != 128 => Err("a sha512 digest has 128 hexadecimal digits"),
        _ if hex.len() < 32 => Err("a digest has at least 32 hexadecimal digits"),
        _ => Ok(()),
    }
}

fn check_tag(tag: &str) -> Result<(), &'static str> {
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok {
        return Err("the tag must start with a letter, digit or '_'");
    }
    if tag.len() > 128 {
        return Err("the tag is longer than 128 characters");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err("the tag may contain only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

fn check_host(host_port: &str) -> Result<(), &'static str> {
    // `[::1]:5000`: an IPv6 address in brackets, then the port.
    if let Some(rest) = host_port.strip_prefix('[') {
        let (address, after) = rest
            .split_once(']')
            .ok_or("an IPv6 registry host needs its closing ']'")?;
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("the registry host in brackets must be an IPv6 address");
        }
        return match after {
            "" => Ok(()),
            _ => check_port(
                after
                    .strip_prefix(':')
                    .ok_or("the registry port must follow ':'")?,
            ),
        };
    }
    let (host, port) = match host_port.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host_port, None),
    };
    if let Some(port) = port {
        check_port(port)?;
    }
    let labels_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !labels_ok {
        return Err("the registry host must be dot-separated labels of letters, digits and '-'");
    }
    Ok(())
}

fn check_port(port: &str) -> Result<(), &'static str> {
    if port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()) {
        return Err("the registry port must be 1 to 5 digits");
    }
    Ok(())
}

fn check_path_component(component: &str) -> Result<(), &'static str> {
    if component.is_empty() {
        return Err("a path component is empty");
    }
    if !component
        .chars()
        .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        return Err("path components may contain only lowercase letters, digits, '.', '_' and '-'");
    }
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !component.starts_with(alnum) || !component.ends_with(alnum) {
        return Err("a path component must start and end with a lowercase letter or digit");
    }
    // Between runs of letters and digits: one '.', one or two '_', or any number of '-'.
    let separators_ok = component
        .split(alnum)
        .filter(|sep| !sep.is_empty())
        .all(|sep| matches!(sep, "." | "_" | "__") || sep.chars().all(|c| c == '-'));
    if !separators_ok {
        return Err(
            "letters and digits in a path component are separated by one '.', one or two '_', or '-'s",
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// NS8's Python, transcribed literally, as the oracle for the property test.
    fn python_name(url: &str) -> Option<String> {
        let (_, last) = url.rsplit_once('/')?;
        let replaced = last.replacen('@', ":", 1);
        let (name, _) = replaced.split_once(':')?;
        Some(name.to_owned())
    }

    #[test]
    fn name_table_of_the_reference() {
        assert_eq!(
            image_name_from_url("ghcr.io/nethserver/samba:v1.0.0"),
            Ok("samba")
        );
        assert_eq!(
            image_name_from_url(&format!("ghcr.io/nethserver/dokuwiki@{SHA}")),
            Ok("dokuwiki")
        );
        assert_eq!(
            image_name_from_url(&format!("ghcr.io/x/foo:1.0@{SHA}")),
            Ok("foo")
        );
        assert_eq!(image_name_from_url("localhost:5000/foo:1"), Ok("foo"));
        assert_eq!(
            image_name_from_url("alpine:3"),
            Err(ImageNameError::NoSlash {
                url: "alpine:3".into()
            })
        );
        assert_eq!(
            image_name_from_url("ghcr.io/x/foo"),
            Err(ImageNameError::NoTagOrDigest {
                url: "ghcr.io/x/foo".into()
            })
        );
    }

    #[test]
    fn name_of_scenario_17_label() {
        let label = "docker.io/library/mysql:10.3-alpine quay.io/prometheus/node-exporter:v1.5.0 docker.io/2fauth/2fauth:5.2.0";
        let vars: Vec<String> = label
            .split_whitespace()
            .map(|u| image_env_var(image_name_from_url(u).unwrap()))
            .collect();
        assert_eq!(
            vars,
            ["MYSQL_IMAGE", "NODE_EXPORTER_IMAGE", "I2FAUTH_IMAGE"]
        );
    }

    #[test]
    fn name_errors_name_the_url_and_why() {
        let e = image_name_from_url("alpine:3").unwrap_err().to_string();
        assert!(e.contains("\"alpine:3\"") && e.contains("no '/'"), "{e}");
        let e = image_name_from_url("ghcr.io/x/foo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"ghcr.io/x/foo\"") && e.contains("tag"), "{e}");
    }

    #[test]
    fn name_edge_cases_match_python() {
        // '@' before ':' ends the name there; an empty name is what Python returns too.
        assert_eq!(image_name_from_url("a/b@c:d"), Ok("b"));
        assert_eq!(image_name_from_url("a/:x"), Ok(""));
        // The last '/' counts, even inside the tag part.
        assert_eq!(
            image_name_from_url("h/a:b/c"),
            Err(ImageNameError::NoTagOrDigest {
                url: "h/a:b/c".into()
            })
        );
    }

    #[test]
    fn env_var_table_of_the_reference() {
        assert_eq!(image_env_var("mysql"), "MYSQL_IMAGE");
        assert_eq!(image_env_var("node-exporter"), "NODE_EXPORTER_IMAGE");
        assert_eq!(image_env_var("2fauth"), "I2FAUTH_IMAGE");
        assert_eq!(image_env_var("redis.io-x+y"), "REDIS_IO_X_Y_IMAGE");
        assert_eq!(image_env_var("postgresql_ha"), "POSTGRESQL_HA_IMAGE");
        assert_eq!(image_env_var("a b"), "A_B_IMAGE");
        assert_eq!(image_env_var(""), "_IMAGE");
    }

    #[test]
    fn accepts_real_references() {
        for r in [
            "127.0.0.1:5000/ns/demo:1.0",
            "ghcr.io/nethserver/mail:1.2.3",
            "docker.io/library/mysql:10.3-alpine",
            "quay.io/prometheus/node-exporter:v1.5.0",
            "docker.io/2fauth/2fauth:5.2.0",
            "docker.io/jmalloc/echo-server:latest",
            "alpine",
            "alpine:3",
            "localhost/x",
            "localhost:5000/foo:1",
            "Registry.Example.COM/a/b:Tag_1",
            "ghcr.io/nethserver/postgresql_ha:16.1",
            "a.b/c__d/e-f:_x",
            "a_b.c/d:1",
            "a.b/c---d:1",
            "[::1]:5000/x:1",
            "[::1]/x:1",
            "[2001:db8::1]:443/ns/app:1.0",
        ] {
            assert_eq!(validate_reference(r), Ok(()), "{r}");
        }
        assert_eq!(validate_reference(&format!("localhost/x@{SHA}")), Ok(()));
        assert_eq!(
            validate_reference(&format!("ghcr.io/x/foo:1.0@{SHA}")),
            Ok(())
        );
    }

    #[test]
    fn refuses_non_references() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("-x", "starts with '-'"),
            ("--rm", "starts with '-'"),
            ("ghcr.io/x/a b:1", "whitespace"),
            ("ghcr.io/x/a:1\n", "control"),
            ("ghcr.io/x/a\t:1", "whitespace"),
            ("ghcr.io/X/a:1", "lowercase"),
            ("ghcr.io//a:1", "empty"),
            ("ghcr.io/x/:1", "empty"),
            ("ghcr.io/x/a:", "tag"),
            ("ghcr.io/x/a:.1", "tag"),
            ("ghcr.io/x/a:1:2", "tag"),
            ("ghcr.io/x/a@sha256:abc", "64"),
            ("ghcr.io/x/a@sha256", "algo:hex"),
            ("ghcr.io/x/a@SHA256:0123", "algorithm"),
            ("ghcr.io/x/a@sha256:XYZ", "hexadecimal"),
            ("ghcr.io:abc/x/a:1", "port"),
            ("gh_cr.io:5000/x/a:1", "host"),
            ("ghcr.io:/x/a:1", "port"),
            ("-ghcr.io/x/a:1", "'-'"),
            ("ghcr.io/x/-a:1", "start and end"),
            ("ghcr.io/x/a-:1", "start and end"),
            ("ghcr.io/x/../a:1", "start and end"),
            ("ghcr.io/x/a..b:1", "separated by"),
            ("ghcr.io/x/a._b:1", "separated by"),
            ("ghcr.io/x/a___b:1", "separated by"),
            ("ghcr.io/x/a-.b:1", "separated by"),
            ("[::1:5000/x:1", "closing ']'"),
            ("[::g]:5000/x:1", "IPv6"),
            ("[::1]5000/x:1", "follow ':'"),
            ("[::1]:/x:1", "port"),
            ("/x/a:1", "empty"),
            ("x/a/:1", "empty"),
            ("@sha256:00", "empty"),
        ];
        for (r, why) in cases {
            let err = validate_reference(r).expect_err(r);
            // The generic message quotes the grammar, so check the specific reason.
            let why_text = match &err {
                ImageNameError::Malformed { reason, .. } => reason.to_string(),
                other => other.to_string(),
            };
            assert!(why_text.contains(why), "{r:?}: {err}");
        }
        let tag = "a".repeat(129);
        assert!(validate_reference(&format!("x/a:{tag}")).is_err());
        assert_eq!(validate_reference(&format!("x/a:{}", &tag[..128])), Ok(()));
        let long = format!("x/{}:1", "a".repeat(MAX_REFERENCE_LEN));
        assert_eq!(
            validate_reference(&long),
            Err(ImageNameError::TooLong { len: long.len() })
        );
    }

    /// The OCI distribution grammar's verdict (oci-spec), the reference ours is compared with.
    fn reference_accepts(r: &str) -> bool {
        oci_spec::distribution::Reference::try_from(r).is_ok()
    }

    /// Names made of the grammar's pieces and of near misses: separators in every combination,
    /// hosts with and without ports, tags, digests of the right and wrong length.
    fn reference_like() -> impl Strategy<Value = String> {
        let component = "[a-z0-9][a-z0-9._-]{0,5}|[a-z0-9._-]{1,4}|[a-zA-Z0-9]{1,4}";
        let host = "([a-zA-Z0-9][a-zA-Z0-9.-]{0,8}|[a-z0-9_]{1,5}\\.[a-z]{2})(:[0-9]{1,5}|:)?/";
        let tag = "(:[A-Za-z0-9_.-]{0,6})?";
        let digest = "(@sha256:[0-9a-f]{64}|@sha256:[0-9a-f]{3}|@sha256:[0-9A-F]{64})?";
        (
            proptest::option::of(host),
            proptest::collection::vec(component, 1..4),
            tag,
            digest,
        )
            .prop_map(|(host, path, tag, digest)| {
                format!(
                    "{}{}{tag}{digest}",
                    host.unwrap_or_default(),
                    path.join("/")
                )
            })
    }

    #[test]
    fn reference_grammar_examples_agree() {
        // The cases that made this comparison: `a..b` was accepted, IPv6 hosts refused (oci-spec
        // predates IPv6 hosts, so those are checked in accepts_real_references).
        for r in ["ghcr.io/x/a..b:1", "a..b", "x/a._b", "x/a___b", "x/a-.b"] {
            assert!(!reference_accepts(r), "{r}");
            assert!(validate_reference(r).is_err(), "{r}");
        }
        for r in [
            "x/a.b",
            "x/a_b",
            "x/a__b",
            "x/a---b",
            "Host.Example:5000/a:T",
        ] {
            assert!(reference_accepts(r), "{r}");
            assert_eq!(validate_reference(r), Ok(()), "{r}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Ours and the reference grammar agree on every generated name. Ours is stricter on
        /// purpose only where the generator does not go: ports of more than 5 digits, digests
        /// other than lowercase sha256, names over 255 characters.
        #[test]
        fn agrees_with_the_reference_grammar(r in reference_like()) {
            let ours = validate_reference(&r);
            let reference = reference_accepts(&r);
            let uppercase_digest = r.contains("@sha256:") && r.chars().any(|c| c.is_ascii_uppercase())
                && r.rsplit('@').next().is_some_and(|d| d.chars().any(|c| c.is_ascii_uppercase()));
            if uppercase_digest {
                // Ours wants lowercase hex, as podman writes digests.
                prop_assert!(ours.is_err(), "{}", r);
            } else {
                prop_assert_eq!(ours.is_ok(), reference, "{} ours: {:?}", r, ours);
            }
        }
    }

    proptest! {
        #[test]
        fn validate_never_panics(r in any::<String>()) {
            let _ = validate_reference(&r);
        }

        #[test]
        fn validate_never_panics_on_reference_like_text(r in "[a-zA-Z0-9./:@_-]{0,60}") {
            let _ = validate_reference(&r);
        }

        #[test]
        fn leading_dash_is_always_refused(r in "-.*") {
            prop_assert!(validate_reference(&r).is_err());
        }

        #[test]
        fn generated_references_are_accepted(
            host in "(([a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\\.)+[a-z]{2,5}(:[0-9]{1,5})?/|\\[::1\\](:[0-9]{1,5})?/)?",
            path in "[a-z0-9]+(([._]|__|-+)[a-z0-9]+){0,3}(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+){0,3}){0,3}",
            tag in "(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,20})?",
            digest in "(@sha256:[0-9a-f]{64})?",
        ) {
            let r = format!("{host}{path}{tag}{digest}");
            prop_assert_eq!(validate_reference(&r), Ok(()), "{}", r);
        }

        #[test]
        fn name_matches_python(url in "[a-z0-9./:@-]{0,30}") {
            let ours = image_name_from_url(&url).ok().map(str::to_owned);
            prop_assert_eq!(ours, python_name(&url));
        }

        #[test]
        fn env_var_is_shell_like(name in "[a-z0-9][a-z0-9._+-]{0,20}") {
            let var = image_env_var(&name);
            prop_assert!(var.ends_with("_IMAGE"));
            prop_assert!(var.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'));
            prop_assert!(!var.starts_with(|c: char| c.is_ascii_digit()));
        }
    }
}
