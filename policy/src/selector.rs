//! Label selectors against endpoint/identity labels. Cilium writes label keys with an optional
//! source prefix (`k8s:app`, `any:app`); both forms match the plain key.

use std::collections::BTreeMap;

use crate::model::{LabelSelector, Operator};

pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Identity labels that carry the namespace's own labels (as Cilium adds them).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

pub fn plain_key(k: &str) -> &str {
    for prefix in ["k8s:", "any:", "container:", "reserved:"] {
        if let Some(rest) = k.strip_prefix(prefix) {
            return rest;
        }
    }
    k
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether the selector names the namespace itself (then a CNP does not scope it).
    pub fn names_namespace(&self) -> bool {
        self.match_labels
            .keys()
            .any(|k| plain_key(k) == NAMESPACE_LABEL)
            || self
                .match_expressions
                .iter()
                .any(|r| plain_key(&r.key) == NAMESPACE_LABEL)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let get = |k: &str| labels.get(plain_key(k)).map(String::as_str);
        self.match_labels
            .iter()
            .all(|(k, v)| get(k) == Some(v.as_str()))
            && self.match_expressions.iter().all(|r| match r.operator {
                Operator::In => get(&r.key).is_some_and(|v| r.values.iter().any(|x| x == v)),
                Operator::NotIn => get(&r.key).is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Operator::Exists => get(&r.key).is_some(),
                Operator::DoesNotExist => get(&r.key).is_none(),
            })
    }

    /// Matches the namespace's labels as carried on identities.
    pub fn matches_namespace_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        let ns: BTreeMap<String, String> = labels
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(NAMESPACE_LABELS_PREFIX)
                    .map(|k| (k.to_string(), v.clone()))
            })
            .chain(
                labels
                    .get(NAMESPACE_LABEL)
                    .map(|n| ("kubernetes.io/metadata.name".to_string(), n.clone())),
            )
            .collect();
        self.matches(&ns)
    }
}
