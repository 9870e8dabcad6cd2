//! Version tags of module images, compared as semantic versions: `1.7.1`, `2.0` (a missing patch
//! counts as 0), `2.1.0-rc.1` (a pre-release sorts before its release). A tag that is not a
//! version (`latest`, `main`, a lone number such as `0-rc`) is never older or newer than
//! anything.

use std::cmp::Ordering;

/// A tag read as a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    numbers: [u64; 3],
    pre: Vec<String>,
}

impl Version {
    /// `None` for a tag that is not `MAJOR.MINOR[.PATCH][-PRE][+BUILD]` (an optional leading `v`
    /// is allowed).
    pub fn parse(tag: &str) -> Option<Version> {
        let tag = tag.strip_prefix('v').unwrap_or(tag);
        let tag = tag.split_once('+').map_or(tag, |(v, _)| v);
        let (core, pre) = match tag.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (tag, None),
        };
        let parts: Vec<&str> = core.split('.').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return None;
        }
        let mut numbers = [0u64; 3];
        for (slot, part) in numbers.iter_mut().zip(&parts) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *slot = part.parse().ok()?;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(pre) if !pre.is_empty() && pre.split('.').all(|p| !p.is_empty()) => {
                pre.split('.').map(str::to_owned).collect()
            }
            Some(_) => return None,
        };
        Some(Version { numbers, pre })
    }

    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.numbers.cmp(&other.numbers).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => compare_pre(&self.pre, &other.pre),
            }
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Pre-release identifiers as semver orders them: numbers numerically and below words, words
/// in ASCII order, a shorter list first when equal so far.
fn compare_pre(a: &[String], b: &[String]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let order = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// Whether going from tag `current` to tag `new` is a downgrade (both must be versions).
pub fn is_downgrade(current: &str, new: &str) -> bool {
    match (Version::parse(current), Version::parse(new)) {
        (Some(current), Some(new)) => new < current,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_as_semver() {
        let ordered = [
            "0.9",
            "1.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0",
            "1.0.1",
            "v1.2",
            "1.10.0",
            "2.1-rc1",
            "2.1",
        ];
        for pair in ordered.windows(2) {
            let (a, b) = (Version::parse(pair[0]), Version::parse(pair[1]));
            assert!(a < b, "{} < {}", pair[0], pair[1]);
        }
        assert_eq!(Version::parse("1.0"), Version::parse("1.0.0"));
    }

    #[test]
    fn tags_that_are_not_versions_are_never_a_downgrade() {
        for tag in [
            "latest", "main", "1.2.3.4", "1..2", "1.x", "", "1.0-", "1.0-a..b",
        ] {
            assert_eq!(Version::parse(tag), None, "{tag}");
            assert!(!is_downgrade(tag, "1.0"));
            assert!(!is_downgrade("9.0", tag));
        }
        assert!(is_downgrade("2.0", "1.9.9"));
        assert!(is_downgrade("2.0", "2.0-rc1"));
        assert!(!is_downgrade("2.0-rc1", "2.0"));
        assert!(!is_downgrade("2.0", "2.0.0"));
    }
}
