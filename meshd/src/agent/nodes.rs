//! CiliumNode objects: the typed view this agent needs, the node table built by watching them
//! (with the one node numbering every concern shares), and publishing this node's own object.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
}

/// `spec.encryption`: the key index in use (255 for WireGuard, the SPI for IPsec).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<i64>,
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
    /// `spec.bootid`: changes when the node reboots (IPsec re-keys its states then).
    pub boot_id: Option<String>,
    /// `spec.encryption.key`: 255 for WireGuard, the current SPI for IPsec.
    pub encryption_key: Option<u8>,
    /// This agent's number for the node (ipcache, auth keys, XFRM marks); 0 until it has an
    /// InternalIPv4. See [`NodeIds`].
    pub node_id: u16,
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
        let encryption_key = match spec.encryption.as_ref().and_then(|e| e.key) {
            None => None,
            Some(k) => Some(u8::try_from(k).map_err(|_| {
                err(
                    "spec.encryption.key",
                    format!("{k} is not a key index (0-255)"),
                )
            })?),
        };
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
            boot_id: spec.bootid.filter(|b| !b.is_empty()),
            encryption_key,
            node_id: 0,
        })
    }

    /// The InternalIP, if it is IPv4 (what routes and the ipcache use today).
    pub fn internal_ipv4(&self) -> Option<Ipv4Addr> {
        match self.internal_ip {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        }
    }
}

/// All CiliumNodes this agent knows, by name, plus the ones it had to refuse, each numbered
/// with its node id. Written by the node watcher alone; the backends, the datapath and the auth
/// manager read the same table.
#[derive(Debug, Default, Clone)]
pub struct NodeTable {
    pub nodes: BTreeMap<String, Node>,
    pub invalid: BTreeMap<String, NodeError>,
    ids: NodeIds,
}

impl NodeTable {
    /// A table that starts from the ids an earlier run gave (read back from the datapath).
    pub fn with_ids(ids: NodeIds) -> Self {
        Self {
            ids,
            ..Default::default()
        }
    }

    pub fn apply(&mut self, obj: &DynamicObject) {
        self.insert(obj);
        self.renumber();
    }

    fn insert(&mut self, obj: &DynamicObject) {
        let name = obj.metadata.name.clone().unwrap_or_default();
        match Node::from_object(obj) {
            Ok(n) => {
                self.invalid.remove(&name);
                self.nodes.insert(name, n);
            }
            Err(e) => {
                tracing::warn!(node = %name, field = %e.field, error = %e, "ignoring an invalid CiliumNode");
                self.nodes.remove(&name);
                self.invalid.insert(name, e);
            }
        }
    }

    /// Replaces every node with `objects` (a full list), keeping the numbering.
    pub fn replace_all<'a>(&mut self, objects: impl IntoIterator<Item = &'a DynamicObject>) {
        self.nodes.clear();
        self.invalid.clear();
        for o in objects {
            self.insert(o);
        }
        self.renumber();
    }

    pub fn delete(&mut self, name: &str) {
        self.nodes.remove(name);
        self.invalid.remove(name);
        self.renumber();
    }

    fn renumber(&mut self) {
        let ips: BTreeSet<Ipv4Addr> = self
            .nodes
            .values()
            .filter_map(Node::internal_ipv4)
            .collect();
        let ids = self.ids.update(&ips).clone();
        for n in self.nodes.values_mut() {
            n.node_id = n
                .internal_ipv4()
                .and_then(|ip| ids.get(&ip).copied())
                .unwrap_or(0);
        }
    }

    /// Node id by node address (0: not a node).
    pub fn node_id(&self, ip: Ipv4Addr) -> u16 {
        self.ids.ids.get(&ip).copied().unwrap_or(0)
    }

    /// Every other node (valid ones).
    pub fn others<'a>(&'a self, own: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.values().filter(move |n| n.name != own)
    }
}

/// Node ids as the ipcache and the auth keys carry them: this agent's own numbering (as in
/// Cilium), given to a node when it appears and kept while it exists, across agent restarts too
/// (read back from the pinned ipcache). Numbers are not handed out again soon after a node
/// leaves, so an auth entry of a gone node cannot stand for a newcomer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIds {
    ids: BTreeMap<Ipv4Addr, u16>,
    /// The last number handed out.
    last: u16,
}

impl NodeIds {
    /// Takes over an id an earlier run gave `ip`.
    pub fn seed(&mut self, ip: Ipv4Addr, id: u16) {
        if id != 0 && !self.ids.values().any(|v| *v == id) {
            self.ids.entry(ip).or_insert(id);
            self.last = self.last.max(id);
        }
    }

    /// Keeps exactly `nodes`: known ones keep their id, new ones get the next free number.
    pub fn update(&mut self, nodes: &BTreeSet<Ipv4Addr>) -> &BTreeMap<Ipv4Addr, u16> {
        self.ids.retain(|ip, _| nodes.contains(ip));
        for ip in nodes {
            if self.ids.contains_key(ip) {
                continue;
            }
            let used: BTreeSet<u16> = self.ids.values().copied().collect();
            // After the last one handed out, wrapping around (0 means "no node").
            let next = (1..=u16::MAX)
                .map(|k| {
                    ((u32::from(self.last) + u32::from(k) - 1) % u32::from(u16::MAX) + 1) as u16
                })
                .find(|id| !used.contains(id));
            if let Some(id) = next {
                self.ids.insert(*ip, id);
                self.last = id;
            }
        }
        &self.ids
    }
}

/// What the encryption backend publishes on the own CiliumNode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publication {
    /// e.g. `network.cilium.io/wg-pub-key`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.encryption.key` (255 for WireGuard, the current SPI for IPsec).
    pub encryption_key: Option<u8>,
}

/// What this node publishes on its own CiliumNode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnNode {
    pub name: String,
    pub internal_ip: IpAddr,
    pub pod_cidrs: Vec<String>,
    pub boot_id: String,
    pub encryption: Publication,
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
        if let Some(key) = self.encryption.encryption_key {
            spec["encryption"] = json!({ "key": key });
        }
        spec
    }

    fn annotations(&self) -> Value {
        json!(self.encryption.annotations)
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

    fn ips(last: &[u8]) -> BTreeSet<Ipv4Addr> {
        last.iter().map(|i| Ipv4Addr::new(198, 18, 0, *i)).collect()
    }

    #[test]
    fn node_ids_are_stable_and_not_reused_soon() {
        let mut n = NodeIds::default();
        let first = n.update(&ips(&[12, 13])).clone();
        assert_eq!(first.values().copied().collect::<Vec<_>>(), [1, 2]);
        // A node whose address sorts first joins: nobody is renumbered.
        let second = n.update(&ips(&[11, 12, 13])).clone();
        assert_eq!(second[&Ipv4Addr::new(198, 18, 0, 12)], 1);
        assert_eq!(second[&Ipv4Addr::new(198, 18, 0, 13)], 2);
        assert_eq!(second[&Ipv4Addr::new(198, 18, 0, 11)], 3);
        // A node leaves and another joins: the newcomer does not get the gone node's number.
        let third = n.update(&ips(&[11, 13, 14])).clone();
        assert_eq!(third[&Ipv4Addr::new(198, 18, 0, 14)], 4);
        assert!(!third.values().any(|v| *v == 1));
    }

    #[test]
    fn node_ids_are_taken_over_from_an_earlier_run_and_wrap() {
        let mut n = NodeIds::default();
        n.seed(Ipv4Addr::new(198, 18, 0, 12), 7);
        n.seed(Ipv4Addr::new(198, 18, 0, 13), 7); // a duplicate is ignored
        let ids = n.update(&ips(&[12, 13])).clone();
        assert_eq!(ids[&Ipv4Addr::new(198, 18, 0, 12)], 7);
        assert_eq!(ids[&Ipv4Addr::new(198, 18, 0, 13)], 8);
        let mut n = NodeIds::default();
        n.seed(Ipv4Addr::new(198, 18, 0, 12), u16::MAX);
        let ids = n.update(&ips(&[12, 13])).clone();
        assert_eq!(
            ids[&Ipv4Addr::new(198, 18, 0, 13)],
            1,
            "wraps past 65535, skipping 0"
        );
    }

    #[test]
    fn the_table_carries_boot_ids_keys_and_node_ids_across_relists() {
        let mut o = obj(json!({
            "addresses": [{"type": "InternalIP", "ip": "198.18.0.12"}],
            "bootid": "b-1", "encryption": {"key": 7}
        }));
        o.metadata.name = Some("node-2".into());
        let mut t = NodeTable::default();
        t.apply(&o);
        let n = &t.nodes["node-2"];
        assert_eq!(
            (n.boot_id.as_deref(), n.encryption_key, n.node_id),
            (Some("b-1"), Some(7), 1)
        );
        let mut o3 = obj(json!({"addresses": [{"type": "InternalIP", "ip": "198.18.0.11"}]}));
        o3.metadata.name = Some("node-1".into());
        t.replace_all([&o3, &o]);
        assert_eq!(t.nodes["node-2"].node_id, 1, "a relist keeps the numbering");
        assert_eq!(t.nodes["node-1"].node_id, 2);
        let e = Node::from_object(&obj(json!({"encryption": {"key": 300}}))).unwrap_err();
        assert_eq!(e.field, "spec.encryption.key");
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
