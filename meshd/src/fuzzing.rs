//! Harnesses shared by the fuzz targets (`fuzz/`) and the tests that replay their corpora:
//! each takes arbitrary bytes, never panics on its own account, and asserts the invariants a
//! user relies on (a panic is a finding).

use std::net::IpAddr;

use kube::api::DynamicObject;

use crate::agent::nodes::{LocalClaims, NodeIds, NodeTable};

fn net(s: &str) -> ipnet::IpNet {
    s.parse()
        .unwrap_or_else(|_| ipnet::IpNet::V4(ipnet::Ipv4Net::default()))
}

/// CiliumNode objects (a JSON array) through the node table, as the agent's watcher feeds
/// them: whatever they claim, no accepted pod CIDR is a default or half-default route, leaves
/// the cluster's range, overlaps this node's own or another accepted node's, and no address is
/// used by two accepted nodes. Deleting objects keeps the same invariants.
pub fn cilium_nodes(data: &[u8]) {
    let Ok(objects) = serde_json::from_slice::<Vec<DynamicObject>>(data) else {
        return;
    };
    let local = LocalClaims {
        name: "node-1".into(),
        addresses: vec![IpAddr::from([198, 18, 0, 11])],
        pod_cidrs: vec![net("198.19.1.0/24")],
        cluster_pod_range: Some(net("198.19.0.0/16")),
    };
    let mut table = NodeTable::new(NodeIds::default(), local.clone());
    for o in &objects {
        table.apply(o);
        check(&table, &local);
    }
    for o in objects.iter().step_by(2) {
        if let Some(name) = &o.metadata.name {
            table.delete(name);
            check(&table, &local);
        }
    }
    table.replace_all(objects.iter().rev());
    check(&table, &local);
}

fn check(table: &NodeTable, local: &LocalClaims) {
    let range = local.cluster_pod_range.unwrap_or_default();
    let others: Vec<_> = table.others(&local.name).collect();
    for (i, n) in others.iter().enumerate() {
        for c in &n.pod_cidrs {
            assert!(
                c.prefix_len() > 1,
                "{}: accepted a (half-)default route {c}",
                n.name
            );
            assert!(
                range.contains(c),
                "{}: accepted {c} outside the cluster range",
                n.name
            );
            for own in &local.pod_cidrs {
                assert!(
                    !own.contains(c) && !c.contains(own),
                    "{}: accepted {c}, overlapping the local pod CIDR",
                    n.name
                );
            }
            for a in &local.addresses {
                assert!(
                    !c.contains(a),
                    "{}: accepted {c}, containing a node address",
                    n.name
                );
            }
            for m in &others[i + 1..] {
                for d in &m.pod_cidrs {
                    assert!(
                        !c.contains(d) && !d.contains(c),
                        "{} and {} both hold overlapping {c} and {d}",
                        n.name,
                        m.name
                    );
                }
            }
        }
        for a in &n.addresses {
            assert!(
                !local.addresses.contains(a),
                "{} uses this node's address {a}",
                n.name
            );
            for m in &others[i + 1..] {
                assert!(
                    !m.addresses.contains(a),
                    "{} and {} share the address {a}",
                    n.name,
                    m.name
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every input the fuzzers kept (`fuzz/corpus/cilium_node/`) runs as an ordinary test.
    #[test]
    fn replays_the_cilium_node_corpus() {
        wg::fuzzing::replay_corpus("cilium_node", super::cilium_nodes);
    }
}
