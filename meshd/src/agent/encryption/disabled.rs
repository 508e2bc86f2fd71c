//! No encryption: pod CIDRs are routed straight to each node's InternalIP over the underlay.

use std::collections::BTreeMap;

use futures::future::BoxFuture;

use super::{EncryptionBackend, EncryptionError, EncryptionReport, Mode, NodeState, Reach};
use crate::agent::nodes::{Node, NodeTable, Publication};

pub struct Disabled;

impl EncryptionBackend for Disabled {
    fn mode(&self) -> Mode {
        Mode::Disabled
    }

    fn publication(&self) -> Publication {
        Publication::default()
    }

    fn reconcile<'a>(
        &'a self,
        nodes: &'a NodeTable,
        own: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, NodeState>, EncryptionError>> {
        let states = nodes
            .others(own)
            .map(|n| (n.name.clone(), NodeState::Plain))
            .collect();
        Box::pin(async move { Ok(states) })
    }

    fn reach(&self, node: &Node) -> Option<Reach> {
        super::gateway(node)
    }

    fn strict_device(&self) -> Option<u32> {
        None
    }

    fn route_mtu(&self, underlay_mtu: u32) -> u32 {
        underlay_mtu
    }

    fn report(&self) -> BoxFuture<'_, EncryptionReport> {
        Box::pin(async {
            EncryptionReport {
                mode: Mode::Disabled,
                line: "Disabled".into(),
                health: meshd_api::ComponentStatus {
                    state: meshd_api::Health::Disabled,
                    message: "Disabled".into(),
                },
                wireguard: None,
            }
        })
    }

    fn teardown(&self) -> BoxFuture<'_, Result<(), EncryptionError>> {
        Box::pin(async { Ok(()) })
    }
}
