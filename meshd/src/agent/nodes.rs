//! CiliumNode objects: the typed view this agent needs, the node table built by watching them,
//! and publishing this node's own object.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub fn cilium_node_resource() -> ApiResource {
    ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: "CiliumNode".into(),
        plural: "ciliumnodes".into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub ip: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamSpec {
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
}

/// The part of `spec` meshd reads; unknown fields are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiliumNodeSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    #[serde(default)]
    pub ipam: IpamSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootid: Option<String>,
}

/// A node as the rest of the agent sees it: validated addresses and CIDRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub internal_ip: Option<IpAddr>,
    pub pod_cidrs: Vec<ipnet::IpNet>,
    pub annotations: BTreeMap<String, String>,
    /// creationTimestamp, for ordering claims (older wins).
    pub created: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CiliumNode {node:?}: {field}: {message}")]
pub struct NodeError {
    pub node: String,
    pub field: String,
    pub message: String,
}

impl Node {
    /// Validates a CiliumNode; an error names the object and the field.
    pub fn from_object(obj: &DynamicObject) -> Result<Self, NodeError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let err = |field: &str, message: String| NodeError {
            node: name.clone(),
            field: field.into(),
            message,
        };
        let spec_value = obj
            .data
            .get("spec")
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        let spec: CiliumNodeSpec =
            serde_json::from_value(spec_value).map_err(|e| err("spec", e.to_string()))?;
        let mut addresses = Vec::new();
        let mut internal_ip = None;
        for (i, a) in spec.addresses.iter().enumerate() {
            let ip: IpAddr = a.ip.parse().map_err(|_| {
                err(
                    &format!("spec.addresses[{i}].ip"),
                    format!("{:?} is not an IP address", a.ip),
                )
            })?;
            if a.kind == "InternalIP"
                && (internal_ip.is_none()
                    || (ip.is_ipv4() && internal_ip.is_some_and(|x: IpAddr| x.is_ipv6())))
            {
                internal_ip = Some(ip);
            }
            addresses.push(ip);
        }
        let mut pod_cidrs = Vec::new();
        for (i, c) in spec.ipam.pod_cidrs.iter().enumerate() {
            let net: ipnet::IpNet = c.parse().map_err(|_| {
                err(
                    &format!("spec.ipam.podCIDRs[{i}]"),
                    format!("{c:?} is not a CIDR"),
                )
            })?;
            pod_cidrs.push(net.trunc());
        }
        Ok(Self {
            name,
            addresses,
            internal_ip,
            pod_cidrs,
            annotations: obj.metadata.annotations.clone().unwrap_or_default(),
            created: obj
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
        })
    }
}

/// All CiliumNodes this agent knows, by name, plus the ones it had to refuse.
#[derive(Debug, Default, Clone)]
pub struct NodeTable {
    pub nodes: BTreeMap<String, Node>,
    pub invalid: BTreeMap<String, NodeError>,
}

impl NodeTable {
    pub fn apply(&mut self, obj: &DynamicObject) {
        let name = obj.metadata.name.clone().unwrap_or_default();
        match Node::from_object(obj) {
            Ok(n) => {
                self.invalid.remove(&name);
                self.nodes.insert(name, n);
            }
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "ignoring an invalid CiliumNode");
                self.nodes.remove(&name);
                self.invalid.insert(name, e);
            }
        }
    }

    pub fn delete(&mut self, name: &str) {
        self.nodes.remove(name);
        self.invalid.remove(name);
    }
}

/// What this node publishes on its own CiliumNode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnNode {
    pub name: String,
    pub internal_ip: IpAddr,
    pub pod_cidrs: Vec<String>,
    pub boot_id: String,
    /// Published as `network.cilium.io/wg-pub-key` with `spec.encryption.key = 255`.
    pub wg_public_key: Option<String>,
}

impl OwnNode {
    fn spec_patch(&self) -> Value {
        let mut spec = json!({
            "addresses": [{"type": "InternalIP", "ip": self.internal_ip.to_string()}],
            "bootid": self.boot_id,
        });
        if !self.pod_cidrs.is_empty() {
            spec["ipam"] = json!({"podCIDRs": self.pod_cidrs});
        }
        if self.wg_public_key.is_some() {
            spec["encryption"] = json!({"key": super::wireguard::STATIC_ENCRYPT_KEY});
        }
        spec
    }

    fn annotations(&self) -> Value {
        match &self.wg_public_key {
            Some(k) => json!({"network.cilium.io/wg-pub-key": k}),
            None => json!({}),
        }
    }

    /// Whether the object already says what we would publish.
    pub fn is_published_in(&self, obj: &DynamicObject) -> bool {
        let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
        let want = self.spec_patch();
        let annotations = obj.metadata.annotations.clone().unwrap_or_default();
        let annotated = self.annotations().as_object().is_some_and(|a| {
            a.iter()
                .all(|(k, v)| annotations.get(k).map(String::as_str) == v.as_str())
        });
        annotated
            && want
                .as_object()
                .is_some_and(|w| w.iter().all(|(k, v)| spec.get(k) == Some(v)))
    }

    /// Creates the CiliumNode, or patches the fields this agent owns (leaving the rest alone).
    pub async fn publish(&self, api: &Api<DynamicObject>) -> Result<(), kube::Error> {
        match api.get_opt(&self.name).await? {
            Some(obj) if self.is_published_in(&obj) => Ok(()),
            Some(_) => {
                let patch = json!({"metadata": {"annotations": self.annotations()}, "spec": self.spec_patch()});
                api.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
            None => {
                let mut obj = DynamicObject::new(&self.name, &cilium_node_resource());
                obj.metadata.annotations = serde_json::from_value(self.annotations()).ok();
                obj.data = json!({"spec": self.spec_patch()});
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => Ok(()),
                    // Someone created it meanwhile: the next round patches it.
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(spec: Value) -> DynamicObject {
        let mut o = DynamicObject::new("node-2", &cilium_node_resource());
        o.data = json!({"spec": spec});
        o
    }

    #[test]
    fn parses_addresses_and_cidrs() {
        let n = Node::from_object(&obj(json!({
            "addresses": [{"type": "CiliumInternalIP", "ip": "10.0.0.1"}, {"type": "InternalIP", "ip": "198.18.0.12"}],
            "ipam": {"podCIDRs": ["198.19.2.0/24"]}
        })))
        .unwrap();
        assert_eq!(n.internal_ip, Some("198.18.0.12".parse().unwrap()));
        assert_eq!(n.pod_cidrs[0].to_string(), "198.19.2.0/24");
    }

    #[test]
    fn errors_name_the_node_and_field() {
        let e = Node::from_object(&obj(
            json!({"addresses": [{"type": "InternalIP", "ip": "bogus"}]}),
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CiliumNode \"node-2\": spec.addresses[0].ip: \"bogus\" is not an IP address"
        );
        let e =
            Node::from_object(&obj(json!({"ipam": {"podCIDRs": ["198.19.2.0/99"]}}))).unwrap_err();
        assert_eq!(e.field, "spec.ipam.podCIDRs[0]");
        let e = Node::from_object(&obj(json!({"addresses": "nope"}))).unwrap_err();
        assert_eq!(e.field, "spec");
    }

    #[test]
    fn table_replaces_invalid_with_valid() {
        let mut t = NodeTable::default();
        t.apply(&obj(json!({"ipam": {"podCIDRs": ["x"]}})));
        assert!(t.invalid.contains_key("node-2") && t.nodes.is_empty());
        t.apply(&obj(json!({"ipam": {"podCIDRs": ["198.19.2.0/24"]}})));
        assert!(t.invalid.is_empty() && t.nodes.contains_key("node-2"));
    }
}
