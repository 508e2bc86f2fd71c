//! The peer set an agent wants, derived from every other node's published key, and the UAPI
//! updates that turn the device's current peers into it. Only peers that differ are touched.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::key::PublicKey;
use crate::uapi::{DeviceInfo, PeerUpdate};

/// What one node claims: its key annotation and where to reach it.
#[derive(Debug, Clone)]
pub struct NodeClaim {
    pub node: String,
    /// Orders claims of the same key: the older node keeps it (creationTimestamp, then name).
    pub created: String,
    /// The annotation's value, if any.
    pub key: Option<String>,
    pub endpoint_ip: Option<IpAddr>,
    pub allowed_ips: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub node: String,
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet {
    pub peers: BTreeMap<PublicKey, DesiredPeer>,
    /// Node → why it gets no peer.
    pub refused: BTreeMap<String, String>,
}

/// Builds the peer set; a bad claim costs only that node its peer. When two nodes claim one
/// key, the node that already holds it in `previous` keeps it (as Cilium: first seen wins),
/// so annotating another node with a peer's key cannot take that peer over; otherwise the
/// older node wins.
pub fn desired(
    own_key: &PublicKey,
    claims: &[NodeClaim],
    port: u16,
    previous: &PeerSet,
) -> PeerSet {
    let mut set = PeerSet::default();
    let mut sorted: Vec<&NodeClaim> = claims.iter().collect();
    let incumbent = |c: &NodeClaim| {
        c.key
            .as_deref()
            .and_then(|k| PublicKey::parse_base64(k).ok())
            .and_then(|k| previous.peers.get(&k))
            .is_some_and(|p| p.node == c.node)
    };
    sorted.sort_by(|a, b| {
        (!incumbent(a), &a.created, &a.node).cmp(&(!incumbent(b), &b.created, &b.node))
    });
    let mut owner: BTreeMap<PublicKey, String> = BTreeMap::new();
    for c in sorted {
        let Some(raw) = &c.key else {
            set.refused.insert(
                c.node.clone(),
                "no WireGuard key published yet (network.cilium.io/wg-pub-key)".into(),
            );
            continue;
        };
        let key = match PublicKey::parse_base64(raw) {
            Ok(k) => k,
            Err(e) => {
                set.refused.insert(
                    c.node.clone(),
                    format!("annotation network.cilium.io/wg-pub-key: {e}"),
                );
                continue;
            }
        };
        if key == *own_key {
            set.refused.insert(
                c.node.clone(),
                "annotation network.cilium.io/wg-pub-key: claims this node's own key".into(),
            );
            continue;
        }
        if let Some(first) = owner.get(&key) {
            set.refused.insert(c.node.clone(), format!("annotation network.cilium.io/wg-pub-key: the key is already claimed by node {first}"));
            continue;
        }
        let Some(ip) = c.endpoint_ip else {
            set.refused
                .insert(c.node.clone(), "no InternalIP in spec.addresses".into());
            continue;
        };
        owner.insert(key, c.node.clone());
        let mut allowed = c.allowed_ips.clone();
        allowed.sort();
        allowed.dedup();
        set.peers.insert(
            key,
            DesiredPeer {
                node: c.node.clone(),
                endpoint: SocketAddr::new(ip, port),
                allowed_ips: allowed,
            },
        );
    }
    set
}

/// The updates that make `current` equal `desired`, leaving right peers alone. A node whose key
/// changed is a removal of the old key and an addition of the new one.
pub fn plan(current: &DeviceInfo, desired: &PeerSet, keepalive: Option<u16>) -> Vec<PeerUpdate> {
    let mut out = Vec::new();
    for p in &current.peers {
        if !desired.peers.contains_key(&p.public_key) {
            out.push(PeerUpdate {
                public_key: Some(p.public_key),
                remove: true,
                ..Default::default()
            });
        }
    }
    for (key, want) in &desired.peers {
        let have = current.peers.iter().find(|p| p.public_key == *key);
        let same = have.is_some_and(|h| {
            let mut ips = h.allowed_ips.clone();
            ips.sort();
            h.endpoint == Some(want.endpoint)
                && ips == want.allowed_ips
                && h.persistent_keepalive == keepalive.unwrap_or(0)
        });
        if same {
            continue;
        }
        out.push(PeerUpdate {
            public_key: Some(*key),
            remove: false,
            update_only: false,
            endpoint: Some(want.endpoint),
            persistent_keepalive: Some(keepalive.unwrap_or(0)),
            replace_allowed_ips: true,
            allowed_ips: want.allowed_ips.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::PrivateKey;
    use crate::uapi::PeerInfo;

    fn claim(node: &str, created: &str, key: Option<String>, ip: &str, cidr: &str) -> NodeClaim {
        NodeClaim {
            node: node.into(),
            created: created.into(),
            key,
            endpoint_ip: Some(ip.parse().unwrap()),
            allowed_ips: vec![cidr.parse().unwrap()],
        }
    }

    #[test]
    fn bad_claims_cost_only_their_node() {
        let own = PrivateKey::generate().public_key();
        let a = PrivateKey::generate().public_key();
        let claims = vec![
            claim(
                "node-2",
                "1",
                Some(a.to_base64()),
                "198.18.0.12",
                "198.19.2.0/24",
            ),
            claim(
                "node-3",
                "2",
                Some(a.to_base64()),
                "198.18.0.13",
                "198.19.3.0/24",
            ),
            claim(
                "node-4",
                "3",
                Some("garbage".into()),
                "198.18.0.14",
                "198.19.4.0/24",
            ),
            claim(
                "node-5",
                "4",
                Some(PublicKey([0; 32]).to_base64()),
                "198.18.0.15",
                "198.19.5.0/24",
            ),
            claim(
                "node-6",
                "5",
                Some(own.to_base64()),
                "198.18.0.16",
                "198.19.6.0/24",
            ),
            claim("node-7", "6", None, "198.18.0.17", "198.19.7.0/24"),
        ];
        let set = desired(&own, &claims, 51871, &PeerSet::default());
        assert_eq!(set.peers.len(), 1);
        assert_eq!(set.peers[&a].node, "node-2");
        assert_eq!(set.peers[&a].endpoint.to_string(), "198.18.0.12:51871");
        assert!(set.refused["node-3"].contains("already claimed by node node-2"));
        assert!(set.refused["node-4"].contains("not a WireGuard public key"));
        assert!(set.refused["node-5"].contains("all-zero"));
        assert!(set.refused["node-6"].contains("own key"));
        assert!(set.refused["node-7"].contains("no WireGuard key"));

        // The incumbent keeps its key even against an older claimant.
        let b = PrivateKey::generate().public_key();
        let first = desired(
            &own,
            &[claim(
                "node-3",
                "2",
                Some(b.to_base64()),
                "198.18.0.13",
                "198.19.3.0/24",
            )],
            51871,
            &PeerSet::default(),
        );
        let both = vec![
            claim(
                "node-2",
                "1",
                Some(b.to_base64()),
                "198.18.0.12",
                "198.19.2.0/24",
            ),
            claim(
                "node-3",
                "2",
                Some(b.to_base64()),
                "198.18.0.13",
                "198.19.3.0/24",
            ),
        ];
        let set = desired(&own, &both, 51871, &first);
        assert_eq!(set.peers[&b].node, "node-3");
        assert!(set.refused["node-2"].contains("already claimed by node node-3"));
    }

    #[test]
    fn plan_touches_only_changed_peers_and_replaces_changed_keys() {
        let own = PrivateKey::generate().public_key();
        let (a, b, b2) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let info = |k: PublicKey, ip: &str, cidr: &str| PeerInfo {
            public_key: k,
            endpoint: Some(format!("{ip}:51871").parse().unwrap()),
            allowed_ips: vec![cidr.parse().unwrap()],
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: 0,
        };
        let current = DeviceInfo {
            peers: vec![
                info(a, "198.18.0.12", "198.19.2.0/24"),
                info(b, "198.18.0.13", "198.19.3.0/24"),
            ],
            ..Default::default()
        };
        // node-3 rotated its key to b2.
        let claims = vec![
            claim(
                "node-2",
                "1",
                Some(a.to_base64()),
                "198.18.0.12",
                "198.19.2.0/24",
            ),
            claim(
                "node-3",
                "2",
                Some(b2.to_base64()),
                "198.18.0.13",
                "198.19.3.0/24",
            ),
        ];
        let updates = plan(
            &current,
            &desired(&own, &claims, 51871, &PeerSet::default()),
            None,
        );
        assert_eq!(updates.len(), 2, "{updates:?}");
        assert!(updates.iter().any(|u| u.public_key == Some(b) && u.remove));
        assert!(
            updates
                .iter()
                .any(|u| u.public_key == Some(b2) && !u.remove && u.replace_allowed_ips)
        );
        assert!(
            !updates.iter().any(|u| u.public_key == Some(a)),
            "node-2's peer must be left alone"
        );
    }
}
