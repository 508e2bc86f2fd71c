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
///
/// AllowedIPs change by adding and removing entries, never by replacing a live peer's list
/// (the kernel clears the list before it rebuilds it, and packets in that gap are dropped:
/// Cilium's GH-33159). New entries are added in place; an entry to remove is moved to a
/// throwaway peer, which is then removed (an allowed IP belongs to one peer, so adding it to
/// another takes it away) — what Cilium does since, and what works on every kernel and on
/// wireguard-go. Order: additions first, then the removals, then the peers that go.
pub fn plan(current: &DeviceInfo, desired: &PeerSet, keepalive: Option<u16>) -> Vec<PeerUpdate> {
    let keepalive = keepalive.unwrap_or(0);
    let mut out = Vec::new();
    let mut stale: Vec<IpNet> = Vec::new();
    let wanted: std::collections::BTreeSet<IpNet> = desired
        .peers
        .values()
        .flat_map(|p| p.allowed_ips.iter().map(IpNet::trunc))
        .collect();
    let by_key: std::collections::HashMap<&PublicKey, &crate::uapi::PeerInfo> =
        current.peers.iter().map(|p| (&p.public_key, p)).collect();
    for (key, want) in &desired.peers {
        let have = by_key.get(key).copied();
        let have_ips: Vec<IpNet> = have
            .map(|h| h.allowed_ips.iter().map(IpNet::trunc).collect())
            .unwrap_or_default();
        let added: Vec<IpNet> = want
            .allowed_ips
            .iter()
            .map(IpNet::trunc)
            .filter(|n| !have_ips.contains(n))
            .collect();
        let want_ips: Vec<IpNet> = want.allowed_ips.iter().map(IpNet::trunc).collect();
        // Entries to drop from this peer; one that another peer wants moves there by the
        // other peer's addition and must not be taken away again.
        stale.extend(
            have_ips
                .iter()
                .filter(|n| !want_ips.contains(n) && !wanted.contains(n)),
        );
        let same_rest = have.is_some_and(|h| {
            h.endpoint == Some(want.endpoint) && h.persistent_keepalive == keepalive
        });
        if same_rest && added.is_empty() {
            continue;
        }
        out.push(PeerUpdate {
            public_key: Some(*key),
            endpoint: Some(want.endpoint),
            persistent_keepalive: Some(keepalive),
            allowed_ips: added,
            ..Default::default()
        });
    }
    if !stale.is_empty() {
        let throwaway = crate::key::PrivateKey::generate().public_key();
        out.push(PeerUpdate {
            public_key: Some(throwaway),
            allowed_ips: stale,
            ..Default::default()
        });
        out.push(PeerUpdate {
            public_key: Some(throwaway),
            remove: true,
            ..Default::default()
        });
    }
    for p in &current.peers {
        if !desired.peers.contains_key(&p.public_key) {
            out.push(PeerUpdate {
                public_key: Some(p.public_key),
                remove: true,
                ..Default::default()
            });
        }
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
            preshared_key: None,
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
        assert!(updates.iter().any(|u| u.public_key == Some(b2)
            && !u.remove
            && !u.replace_allowed_ips
            && u.allowed_ips == vec!["198.19.3.0/24".parse::<IpNet>().unwrap()]));
        assert!(
            !updates.iter().any(|u| u.public_key == Some(a)),
            "node-2's peer must be left alone"
        );
    }

    #[test]
    fn allowed_ips_change_by_adding_and_moving_away_never_by_replacing() {
        let own = PrivateKey::generate().public_key();
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let ip = |s: &str| s.parse::<IpNet>().unwrap();
        let peer = |k, e: &str, ips: &[&str]| PeerInfo {
            public_key: k,
            endpoint: Some(format!("{e}:51871").parse().unwrap()),
            allowed_ips: ips.iter().map(|s| ip(s)).collect(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: 0,
            preshared_key: None,
        };
        // node-2 drops 198.19.2.0/24 for 198.19.4.0/24; node-3's 198.19.5.0/24 moves to node-2.
        let current = DeviceInfo {
            peers: vec![
                peer(a, "198.18.0.12", &["198.19.2.0/24", "198.19.9.0/24"]),
                peer(b, "198.18.0.13", &["198.19.3.0/24", "198.19.5.0/24"]),
            ],
            ..Default::default()
        };
        let mut c2 = claim(
            "node-2",
            "1",
            Some(a.to_base64()),
            "198.18.0.12",
            "198.19.4.0/24",
        );
        c2.allowed_ips
            .extend([ip("198.19.9.0/24"), ip("198.19.5.0/24")]);
        let c3 = claim(
            "node-3",
            "2",
            Some(b.to_base64()),
            "198.18.0.13",
            "198.19.3.0/24",
        );
        let updates = plan(
            &current,
            &desired(&own, &[c2, c3], 51871, &PeerSet::default()),
            None,
        );
        assert!(
            updates.iter().all(|u| !u.replace_allowed_ips),
            "{updates:?}"
        );
        let to_a = updates.iter().find(|u| u.public_key == Some(a)).unwrap();
        let mut added = to_a.allowed_ips.clone();
        added.sort();
        assert_eq!(added, vec![ip("198.19.4.0/24"), ip("198.19.5.0/24")]);
        assert!(
            !updates.iter().any(|u| u.public_key == Some(b)),
            "node-3 loses .5 by node-2's add"
        );
        // The stale entry goes to a throwaway peer, which is removed right after.
        let n = updates.len();
        assert_eq!(updates[n - 2].allowed_ips, vec![ip("198.19.2.0/24")]);
        assert_eq!(updates[n - 2].public_key, updates[n - 1].public_key);
        assert!(updates[n - 1].remove);
        // Nothing to change: nothing sent.
        let done = DeviceInfo {
            peers: vec![
                peer(
                    a,
                    "198.18.0.12",
                    &["198.19.4.0/24", "198.19.5.0/24", "198.19.9.0/24"],
                ),
                peer(b, "198.18.0.13", &["198.19.3.0/24"]),
            ],
            ..Default::default()
        };
        let mut c2 = claim(
            "node-2",
            "1",
            Some(a.to_base64()),
            "198.18.0.12",
            "198.19.4.0/24",
        );
        c2.allowed_ips
            .extend([ip("198.19.9.0/24"), ip("198.19.5.0/24")]);
        let c3 = claim(
            "node-3",
            "2",
            Some(b.to_base64()),
            "198.18.0.13",
            "198.19.3.0/24",
        );
        assert!(
            plan(
                &done,
                &desired(&own, &[c2, c3], 51871, &PeerSet::default()),
                None
            )
            .is_empty()
        );
    }
}
