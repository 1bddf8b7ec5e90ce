//! Label selectors as Kubernetes validates them. The CRD schemas check the operators of
//! a NetworkProfile's `namespaceSelector` and an EgressPolicy's `podSelector` (not those
//! of `allowFrom` peers), and nowhere the keys of `matchLabels` (CEL over a map's keys
//! is past the API server's cost budget) or keys and values: a key no label can have
//! makes a selector the operator evaluates match nothing without a word, and one
//! rendered into a NetworkPolicy makes the API server refuse it on every write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why `selector` is one Kubernetes would refuse, naming the first bad key, operator or
/// value (its validation of label selectors: qualified-name keys, the four operators
/// with or without values, label values).
pub fn invalid(selector: &LabelSelector) -> Option<String> {
    for (key, value) in selector.match_labels.iter().flatten() {
        if let Some(why) = invalid_label_key(key) {
            return Some(format!("matchLabels key {key:?} {why}"));
        }
        if let Some(why) = invalid_label_value(value) {
            return Some(format!("matchLabels value {value:?} of {key:?} {why}"));
        }
    }
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        if let Some(why) = invalid_label_key(&e.key) {
            return Some(format!("matchExpressions[{i}] key {:?} {why}", e.key));
        }
        let values = e.values.as_deref().unwrap_or_default();
        let operator = e.operator.as_str();
        match operator {
            "In" | "NotIn" if values.is_empty() => {
                return Some(format!(
                    "matchExpressions[{i}] operator {operator:?} needs values"
                ));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Some(format!(
                    "matchExpressions[{i}] operator {operator:?} takes no values"
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => {
                return Some(format!(
                    "matchExpressions[{i}] operator {operator:?} is not In, NotIn, Exists or DoesNotExist"
                ));
            }
        }
        for value in values {
            if let Some(why) = invalid_label_value(value) {
                return Some(format!("matchExpressions[{i}] value {value:?} {why}"));
            }
        }
    }
    None
}

/// A label name or value: at most 63 characters, alphanumerics with `-`, `_` and
/// `.` inside.
fn invalid_name_part(s: &str) -> Option<&'static str> {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if s.len() > 63 {
        Some("is longer than 63 characters")
    } else if !s.chars().all(inner)
        || !s.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !s.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        Some("must consist of letters, digits, '-', '_' or '.' and start and end with a letter or digit")
    } else {
        None
    }
}

fn invalid_label_key(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        // A DNS-1123 subdomain: 253 characters in all (no limit per label, as in
        // Kubernetes' IsDNS1123Subdomain), lowercase labels joined by dots.
        let label = |l: &str| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if prefix.len() > 253 || !prefix.split('.').all(label) {
            return Some(
                "has a prefix that is not a DNS subdomain (lowercase, at most 253 characters)".into(),
            );
        }
    }
    if name.is_empty() {
        return Some("has an empty name".into());
    }
    invalid_name_part(name).map(|why| format!("is not a label key: its name {why}"))
}

fn invalid_label_value(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    invalid_name_part(value).map(|why| format!("is not a label value: it {why}"))
}
