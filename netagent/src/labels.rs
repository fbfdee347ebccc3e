//! NIC labels and their limits (issue 11, item 7), checked when a request
//! is parsed ([`Labels::try_from`]), never in the store.
//!
//! The rules are Kubernetes' for label keys, and a byte budget per NIC so
//! that a listing page of NICs has a known largest size:
//!
//! * at most [`MAX_LABELS`] labels, and at most [`MAX_LABEL_BYTES`] bytes of
//!   keys and values in all;
//! * a key is `[prefix/]name`: the name 1 to [`MAX_LABEL_NAME`] characters of
//!   `[A-Za-z0-9-_.]`, starting and ending with a letter or digit; the
//!   optional prefix a DNS subdomain of at most [`MAX_LABEL_PREFIX`]
//!   characters (`io.nestless.hostlo`);
//! * a value is at most [`MAX_LABEL_VALUE`] bytes with no control character.
//!   (Kubernetes' label values stop at 63; the shim labels a NIC with its
//!   pod's name, which may be a 253-character DNS subdomain, and with Hostlo
//!   annotations such as `80/tcp,53/udp`, so values get 253 bytes of any
//!   printable text.)
//!
//! A refusal is `INVALID_ARGUMENT` on field `labels`, naming the key (cut,
//! [`Quoted`]) and the limit it breaks.

use std::collections::BTreeMap;

use crate::names::{Invalid, Quoted};

/// Most labels on one NIC.
pub const MAX_LABELS: usize = 64;
/// Most bytes of all keys and values of one NIC's labels.
pub const MAX_LABEL_BYTES: usize = 16 * 1024;
/// Longest name part of a key.
pub const MAX_LABEL_NAME: usize = 63;
/// Longest prefix of a key (a DNS subdomain).
pub const MAX_LABEL_PREFIX: usize = 253;
/// Longest value.
pub const MAX_LABEL_VALUE: usize = 253;

/// A NIC's labels from a request, checked (see the module).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// The labels.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = Invalid;

    /// Checks the labels (field `labels`).
    fn try_from(labels: BTreeMap<String, String>) -> Result<Labels, Invalid> {
        if labels.len() > MAX_LABELS {
            return Err(Invalid::new(
                "labels",
                format!("{} labels, at most {MAX_LABELS}", labels.len()),
            ));
        }
        let mut total = 0usize;
        for (k, v) in &labels {
            let refuse = |why: String| Invalid::new("labels", format!("key {}: {why}", Quoted(k)));
            check_key(k).map_err(refuse)?;
            if v.len() > MAX_LABEL_VALUE {
                return Err(refuse(format!(
                    "value of {} bytes, at most {MAX_LABEL_VALUE}",
                    v.len()
                )));
            }
            if v.chars().any(char::is_control) {
                return Err(refuse("value has a control character".into()));
            }
            total += k.len() + v.len();
            if total > MAX_LABEL_BYTES {
                return Err(refuse(format!(
                    "the labels up to it have more than {MAX_LABEL_BYTES} bytes of keys and values"
                )));
            }
        }
        Ok(Labels(labels))
    }
}

/// Whether `s` is 1 to `max` characters of `[A-Za-z0-9-_.]`, starting and
/// ending with a letter or digit (a key's name).
fn is_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

/// Whether `s` is a DNS subdomain of at most [`MAX_LABEL_PREFIX`]
/// characters: dot-separated lower-case labels of `[a-z0-9-]`, each
/// starting and ending with a letter or digit.
fn is_subdomain(s: &str) -> bool {
    s.len() <= MAX_LABEL_PREFIX
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// The largest labels a NIC may have (for tests and benchmarks):
/// [`MAX_LABELS`] labels, as many bytes as [`MAX_LABEL_BYTES`] allows.
pub fn maximal() -> BTreeMap<String, String> {
    (0..MAX_LABELS)
        .map(|i| {
            let key = format!("k{i:02}.example/{}", "n".repeat(MAX_LABEL_NAME - 3));
            let room = MAX_LABEL_BYTES / MAX_LABELS - key.len();
            (key, "v".repeat(room.min(MAX_LABEL_VALUE)))
        })
        .collect()
}

fn check_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if !is_subdomain(p) {
            return Err(format!(
                "the prefix is not a DNS subdomain of at most {MAX_LABEL_PREFIX} characters"
            ));
        }
    }
    if !is_name(name, MAX_LABEL_NAME) {
        return Err(format!(
            "the name is not 1 to {MAX_LABEL_NAME} characters of [A-Za-z0-9-_.] starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Result<Labels, Invalid> {
        Labels::try_from(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn kubernetes_keys_and_bounded_values_pass() {
        let pod = "p".repeat(253);
        for ok in [
            &[("k", "v")][..],
            &[
                ("io.nestless.hostlo/pod", "db"),
                ("io.nestless.hostlo/ports", "80/tcp,53/udp"),
            ],
            &[("io.kubernetes.cri.sandbox-name", pod.as_str())],
            &[("a_b.c-D9", "")],
        ] {
            assert!(labels(ok).is_ok(), "{ok:?}");
        }
        let max = Labels::try_from(maximal()).unwrap();
        let bytes: usize = max.as_map().iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(
            bytes <= MAX_LABEL_BYTES && bytes > MAX_LABEL_BYTES - MAX_LABELS,
            "{bytes}"
        );
    }

    #[test]
    fn each_limit_is_refused_naming_the_key_and_the_limit() {
        let long_name = "n".repeat(64);
        let long_prefix = format!("{}/n", "p".repeat(254));
        let long_value = "v".repeat(254);
        let huge = "k".repeat(1 << 20);
        let many: Vec<(String, String)> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let fat: Vec<(String, String)> = (0..MAX_LABELS)
            .map(|i| (format!("key{i:02}"), "v".repeat(MAX_LABEL_VALUE)))
            .collect();
        let fat: Vec<(&str, &str)> = fat.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for (pairs, want) in [
            (&many[..], "65 labels, at most 64"),
            (&[(long_name.as_str(), "v")][..], "1 to 63 characters"),
            (&[("", "v")][..], "1 to 63 characters"),
            (&[("-a", "v")][..], "starting and ending"),
            (&[("a b", "v")][..], "[A-Za-z0-9-_.]"),
            (&[("Upper.Case/n", "v")][..], "DNS subdomain"),
            (&[(long_prefix.as_str(), "v")][..], "at most 253 characters"),
            (
                &[("k", long_value.as_str())][..],
                "value of 254 bytes, at most 253",
            ),
            (&[("k", "a\nb")][..], "control character"),
            (&fat[..], "more than 16384 bytes"),
            (&[(huge.as_str(), "v")][..], "…(1048576 bytes)"),
        ] {
            let e = labels(pairs).unwrap_err();
            assert_eq!(e.field, "labels");
            assert!(e.reason.contains(want), "{} lacks {want:?}", e.reason);
            assert!(
                e.reason.len() < 400,
                "{} bytes: {}",
                e.reason.len(),
                e.reason
            );
        }
        let e = labels(&[(long_name.as_str(), "v")]).unwrap_err();
        assert!(
            e.reason.starts_with(&format!("key {:?}", long_name)),
            "{}",
            e.reason
        );
    }
}
