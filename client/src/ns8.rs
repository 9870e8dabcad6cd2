//! NS8's `update-module` command rules that the client applies before calling the service.

/// The image *name* of an image URL, as NS8's `update-module` command computes it: the last path
/// component, up to the first `:` (tag) or `@` (digest).
///
/// `ghcr.io/nethserver/mail:1.7.1` → `mail`; `ghcr.io/nethserver/mail@sha256:…` → `mail`;
/// `127.0.0.1:5000/mail:1` → `mail` (the registry port is not in the last component).
pub fn image_name(url: &str) -> &str {
    let last = url.rsplit('/').next().unwrap_or(url);
    let end = last.find([':', '@']).unwrap_or(last.len());
    &last[..end]
}

/// The NS8 check of one instance: `Some((current_name, new_name))` when the instance's current
/// image is of another type than the new URL.
pub fn type_mismatch<'a>(current_url: &'a str, new_url: &'a str) -> Option<(&'a str, &'a str)> {
    let current = image_name(current_url);
    let new = image_name(new_url);
    (current != new).then_some((current, new))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn image_name_is_the_last_component_before_tag_or_digest() {
        assert_eq!(image_name("ghcr.io/nethserver/mail:1.7.1"), "mail");
        assert_eq!(
            image_name("ghcr.io/nethserver/mail@sha256:0123abcd"),
            "mail"
        );
        assert_eq!(
            image_name("ghcr.io/nethserver/mail:1.7.1@sha256:0123"),
            "mail"
        );
        assert_eq!(image_name("127.0.0.1:5000/nethserver/mail:1"), "mail");
        assert_eq!(image_name("127.0.0.1:5000/mail"), "mail");
        assert_eq!(image_name("mail:1"), "mail");
        assert_eq!(image_name("ghcr.io/nethserver/"), "");
    }

    #[test]
    fn same_name_other_registry_or_tag_is_allowed() {
        assert_eq!(
            type_mismatch(
                "ghcr.io/nethserver/mail:1.7.0",
                "ghcr.io/nethserver/mail:1.7.1"
            ),
            None
        );
        assert_eq!(
            type_mismatch(
                "ghcr.io/nethserver/mail:1.7.0",
                "127.0.0.1:5000/test/mail:dev"
            ),
            None
        );
        assert_eq!(
            type_mismatch(
                "ghcr.io/nethserver/mail:1.7.0",
                "ghcr.io/nethserver/webtop:1.0.0"
            ),
            Some(("mail", "webtop"))
        );
        // A prefix is not the same name.
        assert_eq!(
            type_mismatch("ghcr.io/nethserver/mail:1", "ghcr.io/nethserver/mail2:1"),
            Some(("mail", "mail2"))
        );
    }
}
