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

/// One change of a batch ([`NodeTable::apply_batch`]).
pub enum TableChange<'a> {
    Apply(&'a DynamicObject),
    Delete(&'a str),
}

/// What this node itself holds, which no other node may claim.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LocalClaims {
    /// This node's name (its own CiliumNode is trusted, not checked).
    pub name: String,
    /// This node's addresses.
    pub addresses: Vec<IpAddr>,
    /// This node's configured pod CIDRs (those on its own CiliumNode count too).
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// The cluster's pod range (`cluster-pool-ipv4-cidr`): no node's pod CIDR may leave it.
    pub cluster_pod_range: Option<ipnet::IpNet>,
}

/// All CiliumNodes this agent knows, by name, plus the ones it had to refuse, each numbered
/// with its node id. A node's claims are checked against every other node's and against this
/// node, so that one CiliumNode cannot steer another node's traffic: a pod CIDR that overlaps
/// another node's (the node that claimed it first keeps it) or this node's, that contains a
/// node address, that is a default or half-default route or leaves the cluster's pod range is
/// refused for that node (its other CIDRs stand), and a node whose address another node already
/// uses is refused whole. Written by the node watcher alone; the backends, the datapath and the
/// auth manager read the same table.
#[derive(Debug, Default, Clone)]
pub struct NodeTable {
    /// Every node that parsed, with its pod CIDRs reduced to the accepted ones.
    pub nodes: BTreeMap<String, Node>,
    /// Nodes refused whole: unparsable, or claiming another node's address.
    pub invalid: BTreeMap<String, NodeError>,
    /// Per node, the pod CIDRs refused and why (the node's other claims stand).
    pub refused: BTreeMap<String, Vec<NodeError>>,
    /// Every node as its object says (before the claims are checked).
    claimed: BTreeMap<String, Node>,
    /// Objects that did not parse.
    unparsable: BTreeMap<String, NodeError>,
    local: LocalClaims,
    ids: NodeIds,
}

/// A prefix as a totally ordered key: (family, network, length).
type PrefixKey = (u8, u128, u8);

fn prefix_key(net: &ipnet::IpNet) -> PrefixKey {
    match net {
        ipnet::IpNet::V4(n) => (4, u128::from(u32::from(n.network())), n.prefix_len()),
        ipnet::IpNet::V6(n) => (6, u128::from(n.network()), n.prefix_len()),
    }
}

/// Accepted pod CIDRs, for overlap checks in O(log n) each.
#[derive(Default)]
struct Claimed {
    by_prefix: BTreeMap<PrefixKey, String>,
}

impl Claimed {
    /// Who holds a prefix that overlaps `net` (contains it or lies inside it), and which.
    fn overlap(&self, net: &ipnet::IpNet) -> Option<(&str, ipnet::IpNet)> {
        let (family, addr, len) = prefix_key(net);
        let bits: u8 = if family == 4 { 32 } else { 128 };
        let mask = |l: u8| -> u128 {
            if l == 0 {
                0
            } else {
                (u128::MAX << (128 - u32::from(l))) >> (128 - u32::from(bits))
            }
        };
        // One that contains it: the same network at any shorter (or equal) length.
        for l in 0..=len {
            let k = (family, addr & mask(l), l);
            if let Some(owner) = self.by_prefix.get(&k) {
                return Some((owner, key_net(k)));
            }
        }
        // One inside it: a network within its range.
        let last = addr | !mask(len) & mask(bits);
        self.by_prefix
            .range((family, addr, len)..=(family, last, u8::MAX))
            .next()
            .map(|(k, owner)| (owner.as_str(), key_net(*k)))
    }

    fn insert(&mut self, net: &ipnet::IpNet, owner: &str) {
        self.by_prefix.insert(prefix_key(net), owner.to_string());
    }
}

fn key_net((family, addr, len): PrefixKey) -> ipnet::IpNet {
    let ip = if family == 4 {
        IpAddr::V4(Ipv4Addr::from(addr as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(addr))
    };
    ipnet::IpNet::new(ip, len).unwrap_or_else(|_| ipnet::IpNet::from(ip))
}

impl NodeTable {
    /// A table that starts from the ids an earlier run gave (read back from the datapath) and
    /// checks claims against `local`.
    pub fn new(ids: NodeIds, local: LocalClaims) -> Self {
        Self {
            ids,
            local,
            ..Default::default()
        }
    }

    pub fn apply(&mut self, obj: &DynamicObject) {
        self.insert(obj);
        self.settle();
    }

    fn insert(&mut self, obj: &DynamicObject) {
        let name = obj.metadata.name.clone().unwrap_or_default();
        match Node::from_object(obj) {
            Ok(n) => {
                self.unparsable.remove(&name);
                self.claimed.insert(name, n);
            }
            Err(e) => {
                if self.unparsable.get(&name) != Some(&e) {
                    tracing::warn!(node = %name, field = %e.field, error = %e, "ignoring an invalid CiliumNode");
                }
                self.claimed.remove(&name);
                self.unparsable.insert(name, e);
            }
        }
    }

    /// Replaces every node with `objects` (a full list), keeping the numbering.
    pub fn replace_all<'a>(&mut self, objects: impl IntoIterator<Item = &'a DynamicObject>) {
        let before = std::mem::take(&mut self.unparsable);
        self.claimed.clear();
        for o in objects {
            let name = o.metadata.name.clone().unwrap_or_default();
            match Node::from_object(o) {
                Ok(n) => {
                    self.claimed.insert(name, n);
                }
                Err(e) => {
                    if before.get(&name) != Some(&e) {
                        tracing::warn!(node = %name, field = %e.field, error = %e, "ignoring an invalid CiliumNode");
                    }
                    self.unparsable.insert(name, e);
                }
            }
        }
        self.settle();
    }

    pub fn delete(&mut self, name: &str) {
        self.claimed.remove(name);
        self.unparsable.remove(name);
        self.settle();
    }

    /// Many changes at once (what a watcher delivered since the last pass), with one settling
    /// pass at the end: at 5,000 nodes a join storm costs one O(n log n) pass per batch, not
    /// per object.
    pub fn apply_batch<'a>(&mut self, changes: impl IntoIterator<Item = TableChange<'a>>) {
        for c in changes {
            match c {
                TableChange::Apply(o) => self.insert(o),
                TableChange::Delete(name) => {
                    self.claimed.remove(name);
                    self.unparsable.remove(name);
                }
            }
        }
        self.settle();
    }

    /// Checks every claim again (level-triggered: a withdrawn or freed claim takes effect on
    /// the next change), then numbers the nodes.
    fn settle(&mut self) {
        let local = &self.local;
        let own = self.claimed.get(&local.name);
        let mut held = Claimed::default();
        for net in local
            .pod_cidrs
            .iter()
            .chain(own.iter().flat_map(|n| n.pod_cidrs.iter()))
        {
            held.insert(&net.trunc(), &local.name);
        }
        // Addresses: this node's first, then every node's in claim order.
        let mut addresses: BTreeMap<IpAddr, String> = local
            .addresses
            .iter()
            .chain(own.iter().flat_map(|n| n.addresses.iter()))
            .map(|ip| (*ip, local.name.clone()))
            .collect();
        let mut order: Vec<&Node> = self
            .claimed
            .values()
            .filter(|n| n.name != local.name)
            .collect();
        order.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        let mut nodes = BTreeMap::new();
        let mut invalid = self.unparsable.clone();
        let mut refused: BTreeMap<String, Vec<NodeError>> = BTreeMap::new();
        let err = |node: &str, field: String, message: String| NodeError {
            node: node.to_string(),
            field,
            message,
        };
        // Addresses first, in claim order: a node using an address that is taken is refused
        // whole (its routes and peer would point at another node).
        let mut standing = Vec::new();
        for n in order {
            if let Some((i, ip, holder)) = n
                .addresses
                .iter()
                .enumerate()
                .find_map(|(i, ip)| addresses.get(ip).map(|h| (i, ip, h)))
            {
                invalid.insert(
                    n.name.clone(),
                    err(
                        &n.name,
                        format!("spec.addresses[{i}].ip"),
                        format!("{ip} is the address of {holder}, which claimed it first"),
                    ),
                );
                continue;
            }
            for ip in &n.addresses {
                addresses.insert(*ip, n.name.clone());
            }
            standing.push(n);
        }
        // Then pod CIDRs, against every address and every CIDR held so far: first the claims
        // that stood on the last pass (an incumbent keeps what it holds, even against an older
        // node patched to claim it), then the new ones, each round in claim order.
        let previous: BTreeSet<(&str, &ipnet::IpNet)> = self
            .nodes
            .values()
            .flat_map(|n| n.pod_cidrs.iter().map(|c| (n.name.as_str(), c)))
            .collect();
        let mut verdicts: BTreeMap<&str, BTreeMap<usize, Option<String>>> = BTreeMap::new();
        for incumbents in [true, false] {
            for n in &standing {
                for (i, net) in n.pod_cidrs.iter().enumerate() {
                    if previous.contains(&(n.name.as_str(), net)) != incumbents {
                        continue;
                    }
                    let why = if net.prefix_len() <= 1 {
                        Some(format!("{net} is a default or half-default route"))
                    } else if let Some(range) = local.cluster_pod_range
                        && !range.contains(net)
                    {
                        Some(format!(
                            "{net} is outside the cluster's pod range {range} (cluster-pool-ipv4-cidr)"
                        ))
                    } else if let Some((owner, other)) = held.overlap(net) {
                        Some(if owner == local.name {
                            format!("{net} overlaps this node's pod CIDR {other}")
                        } else {
                            format!(
                                "{net} overlaps {owner}'s pod CIDR {other} ({owner} claimed it first)"
                            )
                        })
                    } else {
                        addresses
                            .range(net.network()..=net.broadcast())
                            .next()
                            .map(|(ip, holder)| format!("{net} contains {holder}'s address {ip}"))
                    };
                    if why.is_none() {
                        held.insert(net, &n.name);
                    }
                    verdicts.entry(n.name.as_str()).or_default().insert(i, why);
                }
            }
        }
        for n in &standing {
            let mut accepted = (*n).clone();
            accepted.pod_cidrs.clear();
            for (i, why) in verdicts.remove(n.name.as_str()).unwrap_or_default() {
                match why {
                    Some(message) => refused.entry(n.name.clone()).or_default().push(err(
                        &n.name,
                        format!("spec.ipam.podCIDRs[{i}]"),
                        message,
                    )),
                    None => accepted.pod_cidrs.push(n.pod_cidrs[i]),
                }
            }
            nodes.insert(n.name.clone(), accepted);
        }
        if let Some(own) = own {
            nodes.insert(own.name.clone(), own.clone());
        }
        for (name, errors) in &refused {
            if self.refused.get(name) != Some(errors) {
                for e in errors {
                    tracing::warn!(node = %name, field = %e.field, reason = %e.message, "refusing a CiliumNode claim");
                }
            }
        }
        for (name, e) in &invalid {
            if !self.unparsable.contains_key(name) && self.invalid.get(name) != Some(e) {
                tracing::warn!(node = %name, field = %e.field, reason = %e.message, "refusing a CiliumNode");
            }
        }
        self.nodes = nodes;
        self.invalid = invalid;
        self.refused = refused;
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

    fn node(name: &str, created: &str, ip: &str, cidrs: &[&str]) -> DynamicObject {
        let mut o = obj(json!({
            "addresses": [{"type": "InternalIP", "ip": ip}],
            "ipam": {"podCIDRs": cidrs},
        }));
        o.metadata.name = Some(name.into());
        o.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            created.parse().unwrap(),
        ));
        o
    }

    fn cidrs(t: &NodeTable, n: &str) -> Vec<String> {
        t.nodes[n]
            .pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn forged_claims_cannot_steer_traffic_and_cost_only_their_node() {
        let local = LocalClaims {
            name: "node-1".into(),
            addresses: vec!["198.18.0.11".parse().unwrap()],
            pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
            cluster_pod_range: None,
        };
        let mut t = NodeTable::new(NodeIds::default(), local.clone());
        let n3 = node(
            "node-3",
            "2026-01-01T00:00:00Z",
            "198.18.0.13",
            &["198.19.3.0/24"],
        );
        let forged = node(
            "node-2",
            "2026-01-02T00:00:00Z",
            "198.18.0.12",
            &[
                "198.19.2.0/24",
                "0.0.0.0/1",
                "198.19.1.0/24",
                "198.19.3.128/25",
                "198.18.0.0/24",
            ],
        );
        t.replace_all([&n3, &forged]);
        assert_eq!(
            cidrs(&t, "node-2"),
            ["198.19.2.0/24"],
            "only its own range stands"
        );
        assert_eq!(
            cidrs(&t, "node-3"),
            ["198.19.3.0/24"],
            "the first claimant keeps it"
        );
        let why: Vec<String> = t.refused["node-2"]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            why,
            [
                "CiliumNode \"node-2\": spec.ipam.podCIDRs[1]: 0.0.0.0/1 is a default or half-default route",
                "CiliumNode \"node-2\": spec.ipam.podCIDRs[2]: 198.19.1.0/24 overlaps this node's pod CIDR 198.19.1.0/24",
                "CiliumNode \"node-2\": spec.ipam.podCIDRs[3]: 198.19.3.128/25 overlaps node-3's pod CIDR 198.19.3.0/24 (node-3 claimed it first)",
                "CiliumNode \"node-2\": spec.ipam.podCIDRs[4]: 198.18.0.0/24 contains node-1's address 198.18.0.11",
            ]
        );
        // A wider CIDR over an earlier node's is refused too, and a later node's claim inside
        // node-2's accepted range as well.
        let wide = node(
            "node-4",
            "2026-01-03T00:00:00Z",
            "198.18.0.14",
            &["198.19.0.0/16"],
        );
        t.apply(&wide);
        assert!(cidrs(&t, "node-4").is_empty());
        // An older node patched to claim a range others hold gets none of it: incumbents keep
        // what they hold.
        let old = node(
            "node-0",
            "2025-01-01T00:00:00Z",
            "198.18.0.10",
            &["198.19.0.0/20"],
        );
        t.apply(&old);
        assert!(
            cidrs(&t, "node-0").is_empty(),
            "{:?}",
            t.refused.get("node-0")
        );
        assert_eq!(cidrs(&t, "node-3"), ["198.19.3.0/24"]);
        // Withdrawn: the next pass takes only what the object says now.
        let honest = node(
            "node-2",
            "2026-01-02T00:00:00Z",
            "198.18.0.12",
            &["198.19.2.0/24"],
        );
        t.apply(&honest);
        assert!(!t.refused.contains_key("node-2"));
        // Another node's address: refused whole, naming the field.
        let thief = node(
            "node-5",
            "2026-01-04T00:00:00Z",
            "198.18.0.13",
            &["198.19.5.0/24"],
        );
        t.apply(&thief);
        assert!(!t.nodes.contains_key("node-5"));
        assert_eq!(
            t.invalid["node-5"].to_string(),
            "CiliumNode \"node-5\": spec.addresses[0].ip: 198.18.0.13 is the address of node-3, which claimed it first"
        );
        // When the holder leaves, the next claimant gets it.
        t.delete("node-3");
        assert_eq!(cidrs(&t, "node-5"), ["198.19.5.0/24"]);
        // The cluster's pod range, when configured, bounds every claim.
        let mut t = NodeTable::new(
            NodeIds::default(),
            LocalClaims {
                cluster_pod_range: Some("198.19.0.0/16".parse().unwrap()),
                ..local
            },
        );
        let out = node(
            "node-6",
            "2026-01-05T00:00:00Z",
            "198.18.0.16",
            &["10.0.0.0/24", "198.19.6.0/24"],
        );
        t.apply(&out);
        assert_eq!(cidrs(&t, "node-6"), ["198.19.6.0/24"]);
        assert!(
            t.refused["node-6"][0]
                .message
                .contains("outside the cluster's pod range")
        );
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
