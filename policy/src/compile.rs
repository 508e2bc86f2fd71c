//! Compilation of the policies that select one endpoint into its policy-map entries: a pure
//! function of the policies, the endpoint's labels and the known identities.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::model::Entity;
use crate::normalize::{Peer, PeerRule, Policy, PortSpec};
use crate::selector::NAMESPACE_LABEL;

/// Reserved identities (CILIUM-CONTRACT.md).
pub mod reserved {
    pub const ANY: u32 = 0;
    pub const HOST: u32 = 1;
    pub const WORLD: u32 = 2;
    pub const UNMANAGED: u32 = 3;
    pub const HEALTH: u32 = 4;
    pub const INIT: u32 = 5;
    pub const REMOTE_NODE: u32 = 6;
    pub const KUBE_APISERVER: u32 = 7;
    pub const INGRESS: u32 = 8;
}

/// A security identity and the labels it stands for (namespace included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub id: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointLabels {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Node-local identities for CIDR selectors (Cilium's local identity scope, 1<<24 upward);
/// the datapath's ipcache maps each prefix to its identity.
///
/// Every prefix that any policy names gets an identity, and a CIDR selector stands for the
/// identities of all the prefixes inside it (minus its `except`s): the ipcache resolves an
/// address to its longest prefix, so `10.0.0.0/8` must also name the identity of a
/// `10.1.0.0/16` that another policy introduced. Identities stay stable while their prefix is
/// named; a prefix no longer named is forgotten and its number is never handed out again.
#[derive(Debug, Clone)]
pub struct CidrIdentities {
    map: BTreeMap<IpNet, u32>,
    next: u32,
}

pub const LOCAL_IDENTITY_BASE: u32 = 1 << 24;

impl Default for CidrIdentities {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            next: LOCAL_IDENTITY_BASE + 1,
        }
    }
}

impl CidrIdentities {
    /// Identities for the prefixes of `policies` (a fresh allocation).
    pub fn for_policies(policies: &[Policy]) -> Self {
        let mut c = Self::default();
        c.update(policies);
        c
    }

    /// Makes the set of prefixes exactly those `policies` name, keeping known identities.
    pub fn update(&mut self, policies: &[Policy]) {
        let mut named = BTreeSet::new();
        for p in policies {
            for rule in &p.rules {
                for dir in [&rule.ingress, &rule.egress] {
                    let rules = dir.allow.iter().flatten().chain(&dir.deny);
                    for peer in rules.flat_map(|r| &r.peers) {
                        if let Peer::Cidr { net, except } = peer {
                            named.insert(net.trunc());
                            named.extend(except.iter().map(IpNet::trunc));
                        }
                    }
                }
            }
        }
        self.map.retain(|net, _| named.contains(net));
        for net in named {
            if let std::collections::btree_map::Entry::Vacant(v) = self.map.entry(net) {
                v.insert(self.next);
                self.next += 1;
            }
        }
    }

    pub fn get(&self, net: &IpNet) -> Option<u32> {
        self.map.get(&net.trunc()).copied()
    }

    pub fn prefixes(&self) -> impl Iterator<Item = (&IpNet, &u32)> {
        self.map.iter()
    }

    /// The identities `net` (without `except`) selects: its own and every prefix inside it.
    fn within(&self, net: &IpNet, except: &[IpNet]) -> Vec<u32> {
        self.map
            .iter()
            .filter(|(p, _)| net.contains(*p) && !except.iter().any(|x| x.contains(*p)))
            .map(|(_, id)| *id)
            .collect()
    }
}

/// The contract's LPM key, before byte layout: `prefix_len()` is what the map stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub identity: u32,
    pub egress: bool,
    /// 0 = any protocol (and then any port).
    pub proto: u8,
    pub dport: u16,
    /// How many leading bits of `dport` count (0 = any port).
    pub port_prefix: u8,
}

impl PolicyKey {
    /// 32 identity bits + 8 direction bits, then 8 protocol bits and the port bits.
    pub fn prefix_len(&self) -> u32 {
        if self.proto == 0 {
            40
        } else {
            48 + u32::from(self.port_prefix)
        }
    }

    /// Whether a packet of this identity/direction/protocol/port hits this entry.
    pub fn covers(&self, identity: u32, egress: bool, proto: u8, port: u16) -> bool {
        let mask = if self.port_prefix == 0 {
            0
        } else {
            u16::MAX << (16 - self.port_prefix)
        };
        self.identity == identity
            && self.egress == egress
            && (self.proto == 0 || (self.proto == proto && (port & mask) == (self.dport & mask)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyValue {
    pub deny: bool,
    /// 0, or auth type | 0x80.
    pub auth_type: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Some policy selects the endpoint for ingress: what is not allowed is denied.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: BTreeMap<PolicyKey, PolicyValue>,
}

impl Compiled {
    /// The verdict the datapath reaches, step for step as the program does it: the
    /// longest-prefix entry for the peer's identity and the longest for any identity (0); a
    /// deny from the latter wins, else the former, else the latter. `None` = no entry (default
    /// deny when enforced). `compile` makes deny win whatever the prefix lengths.
    pub fn lookup(&self, identity: u32, egress: bool, proto: u8, port: u16) -> Option<PolicyValue> {
        let specific = self.longest(identity, egress, proto, port);
        let wildcard = self.longest(reserved::ANY, egress, proto, port);
        match (specific, wildcard) {
            (_, Some(w)) if w.deny => Some(w),
            (Some(s), _) => Some(s),
            (None, w) => w,
        }
    }

    /// The LPM trie's answer for one identity.
    fn longest(&self, identity: u32, egress: bool, proto: u8, port: u16) -> Option<PolicyValue> {
        let start = PolicyKey {
            identity,
            egress,
            proto: 0,
            dport: 0,
            port_prefix: 0,
        };
        self.entries
            .range(start..)
            .take_while(|(k, _)| k.identity == identity && k.egress == egress)
            .filter(|(k, _)| k.covers(identity, egress, proto, port))
            .max_by_key(|(k, _)| k.prefix_len())
            .map(|(_, v)| *v)
    }

    /// Whether traffic passes the policy (ignoring authentication).
    pub fn allows(&self, identity: u32, egress: bool, proto: u8, port: u16) -> bool {
        let enforced = if egress {
            self.egress_enforced
        } else {
            self.ingress_enforced
        };
        match self.lookup(identity, egress, proto, port) {
            Some(v) => !v.deny,
            None => !enforced,
        }
    }
}

/// Aligned power-of-two blocks covering `lo..=hi`: (first port, prefix bits).
fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let mut k = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((lo as u16, (16 - k) as u8));
        lo += 1 << k;
    }
    out
}

fn keys(ports: &[PortSpec], identity: u32, egress: bool) -> Vec<PolicyKey> {
    let mut out = Vec::new();
    for p in ports {
        let full = p.lo == 0 && p.hi == u16::MAX;
        if p.proto == 0 && full {
            out.push(PolicyKey {
                identity,
                egress,
                proto: 0,
                dport: 0,
                port_prefix: 0,
            });
            continue;
        }
        let protos: &[u8] = if p.proto == 0 {
            &[6, 17, 132]
        } else {
            std::slice::from_ref(&p.proto)
        };
        for &proto in protos {
            for (dport, port_prefix) in if full {
                vec![(0, 0)]
            } else {
                port_blocks(p.lo, p.hi)
            } {
                out.push(PolicyKey {
                    identity,
                    egress,
                    proto,
                    dport,
                    port_prefix,
                });
            }
        }
    }
    out
}

const CLUSTER_RESERVED: [u32; 6] = [
    reserved::HOST,
    reserved::REMOTE_NODE,
    reserved::HEALTH,
    reserved::INIT,
    reserved::KUBE_APISERVER,
    reserved::INGRESS,
];

fn resolve(peer: &Peer, identities: &[IdentityInfo], cidrs: &CidrIdentities) -> Vec<u32> {
    match peer {
        Peer::Any | Peer::Entity(Entity::All) => vec![reserved::ANY],
        Peer::Endpoints {
            selector,
            namespace,
        } => identities
            .iter()
            .filter(|i| {
                namespace
                    .as_ref()
                    .is_none_or(|ns| i.labels.get(NAMESPACE_LABEL) == Some(ns))
            })
            .filter(|i| selector.matches(&i.labels))
            .map(|i| i.id)
            .collect(),
        Peer::NamespacePods { namespaces, pods } => identities
            .iter()
            .filter(|i| namespaces.matches_namespace_labels(&i.labels))
            .filter(|i| pods.as_ref().is_none_or(|p| p.matches(&i.labels)))
            .map(|i| i.id)
            .collect(),
        Peer::Entity(e) => match e {
            // CIDR identities are part of the world (Cilium labels them reserved:world).
            Entity::World | Entity::WorldIpv4 | Entity::WorldIpv6 => {
                let all: IpNet = if matches!(e, Entity::WorldIpv6) {
                    IpNet::V6(Default::default())
                } else {
                    IpNet::V4(Default::default())
                };
                let mut ids = match e {
                    Entity::World => cidrs.prefixes().map(|(_, id)| *id).collect(),
                    _ => cidrs.within(&all, &[]),
                };
                ids.push(reserved::WORLD);
                ids
            }
            Entity::Host => vec![reserved::HOST],
            Entity::RemoteNode => vec![reserved::REMOTE_NODE],
            Entity::Health => vec![reserved::HEALTH],
            Entity::Init => vec![reserved::INIT],
            Entity::Unmanaged => vec![reserved::UNMANAGED],
            Entity::KubeApiserver => vec![reserved::KUBE_APISERVER],
            Entity::Ingress => vec![reserved::INGRESS],
            Entity::Cluster => CLUSTER_RESERVED
                .iter()
                .copied()
                .chain(identities.iter().map(|i| i.id))
                .collect(),
            Entity::All => vec![reserved::ANY],
        },
        Peer::Cidr { net, except } => {
            // Excepted prefixes have identities of their own (more specific in the ipcache)
            // that this selector leaves out; a prefix nobody registered selects nothing.
            let mut ids = cidrs.within(net, except);
            if net.prefix_len() == 0 {
                ids.push(reserved::WORLD);
            }
            ids
        }
    }
}

fn merge(entries: &mut BTreeMap<PolicyKey, PolicyValue>, key: PolicyKey, value: PolicyValue) {
    entries
        .entry(key)
        .and_modify(|v| {
            if value.deny || v.deny {
                *v = PolicyValue {
                    deny: true,
                    auth_type: 0,
                };
            } else {
                v.auth_type = v.auth_type.max(value.auth_type);
            }
        })
        .or_insert(value);
}

fn apply(
    entries: &mut BTreeMap<PolicyKey, PolicyValue>,
    rules: &[PeerRule],
    egress: bool,
    deny: bool,
    identities: &[IdentityInfo],
    cidrs: &CidrIdentities,
) {
    for r in rules {
        for peer in &r.peers {
            for id in resolve(peer, identities, cidrs) {
                for k in keys(&r.ports, id, egress) {
                    merge(
                        entries,
                        k,
                        PolicyValue {
                            deny,
                            auth_type: if deny { 0 } else { r.auth },
                        },
                    );
                }
            }
        }
    }
}

/// The entries for endpoint `ep` from every policy that selects it; `cidrs` must hold the
/// prefixes of `policies` ([`CidrIdentities::update`]).
pub fn compile(
    policies: &[Policy],
    ep: &EndpointLabels,
    identities: &[IdentityInfo],
    cidrs: &CidrIdentities,
) -> Compiled {
    let mut labels = ep.labels.clone();
    labels.insert(NAMESPACE_LABEL.into(), ep.namespace.clone());
    let mut out = Compiled::default();
    for p in policies {
        for rule in &p.rules {
            let selected = rule
                .subject
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == ep.namespace)
                && rule.subject.selector.matches(&labels);
            if !selected {
                continue;
            }
            for (dir, egress) in [(&rule.ingress, false), (&rule.egress, true)] {
                if let Some(allow) = &dir.allow {
                    if egress {
                        out.egress_enforced = true;
                    } else {
                        out.ingress_enforced = true;
                    }
                    apply(&mut out.entries, allow, egress, false, identities, cidrs);
                }
                apply(&mut out.entries, &dir.deny, egress, true, identities, cidrs);
            }
        }
    }
    deny_wins(&mut out.entries);
    out
}

/// The datapath takes the longest matching prefix, so an allow entry more specific than a
/// deny entry covering it (deny all ports from X, allow X on 8080) would win there: such allow
/// entries become deny entries, as Cilium's map state does.
fn deny_wins(entries: &mut BTreeMap<PolicyKey, PolicyValue>) {
    let denies: Vec<PolicyKey> = entries
        .iter()
        .filter(|(_, v)| v.deny)
        .map(|(k, _)| *k)
        .collect();
    for (k, v) in entries.iter_mut().filter(|(_, v)| !v.deny) {
        let covered = denies.iter().any(|d| {
            (d.identity == k.identity || d.identity == reserved::ANY)
                && d.prefix_len() <= k.prefix_len()
                && d.covers(d.identity, k.egress, k.proto, k.dport)
        });
        if covered {
            *v = PolicyValue {
                deny: true,
                auth_type: 0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(8000, 8003), vec![(8000, 14)]);
        assert_eq!(port_blocks(1, 6), vec![(1, 16), (2, 15), (4, 15), (6, 16)]);
        assert_eq!(port_blocks(0, u16::MAX), vec![(0, 0)]);
        let total: u32 = port_blocks(1000, 2047)
            .iter()
            .map(|(_, p)| 1u32 << (16 - p))
            .sum();
        assert_eq!(total, 1048);
    }

    #[test]
    fn prefix_lengths_follow_the_contract() {
        let any = PolicyKey {
            identity: 0,
            egress: false,
            proto: 0,
            dport: 0,
            port_prefix: 0,
        };
        assert_eq!(any.prefix_len(), 40);
        assert_eq!(PolicyKey { proto: 6, ..any }.prefix_len(), 48);
        assert_eq!(
            PolicyKey {
                proto: 6,
                dport: 80,
                port_prefix: 16,
                ..any
            }
            .prefix_len(),
            64
        );
    }
}
