//! Network policy for meshd: CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and
//! Kubernetes NetworkPolicy parsed and checked (errors name the object and the field), fields
//! meshd cannot enforce reported (and never allowed to widen access), and rules compiled to
//! per-endpoint policy-map entries by a pure function.

pub mod compile;
pub mod model;
mod normalize;
pub mod selector;

pub use compile::{
    CidrIdentities, Compiled, EndpointLabels, IdentityInfo, PolicyKey, PolicyValue, compile,
};
pub use normalize::{Kind, Peer, PeerRule, Policy, PortSpec, Subject, SubjectRule, Unsupported};

/// A policy object (or a field in it) that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct PolicyError {
    /// `CiliumNetworkPolicy production/api` or `<file> document 2` when unnamed.
    pub object: String,
    /// The field path, e.g. `spec.ingress[0].toPorts[0].ports[0].port`.
    pub field: String,
    pub message: String,
}

/// Parses every YAML document in `text` (`source` names the file in errors).
pub fn parse_documents(text: &str, source: &str) -> Vec<Result<Policy, PolicyError>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let object = format!("{source} document {}", i + 1);
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.push(Err(PolicyError {
                    object,
                    field: "(document)".into(),
                    message: format!("not valid YAML: {e}"),
                }));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        out.push(normalize::from_yaml(value, &object));
    }
    out
}

/// Checks one object as the API server returns it (JSON); `origin` names it in errors when it
/// has no name.
pub fn parse_object(value: serde_json::Value, origin: &str) -> Result<Policy, PolicyError> {
    let yaml = serde_yaml::to_value(value).map_err(|e| PolicyError {
        object: origin.into(),
        field: "(object)".into(),
        message: e.to_string(),
    })?;
    normalize::from_yaml(yaml, origin)
}

use serde::Deserialize as _;
