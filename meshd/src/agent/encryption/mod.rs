//! Encryption between nodes behind one trait, so the agent's loop is the same for every
//! backend: WireGuard (kernel or userspace device), "disabled", and XFRM IPsec when it lands.
//! A backend says what to publish on the own CiliumNode, reconciles itself level-triggered from
//! the node table (each node's state, or why it was refused), says how to reach a node (into a
//! device, or via a gateway with marks), what MTU routes get, reports its status in the shape
//! of `cilium encrypt status`, and can tear itself down.

pub mod disabled;
pub mod wireguard;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::nodes::{Node, NodeTable, Publication};
use super::routes::NextHop;
use crate::config::AgentConfig;

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Up => f.write_str("up"),
            Self::Pending(why) => write!(f, "pending: {why}"),
            Self::Refused(why) => write!(f, "refused: {why}"),
            Self::Plain => f.write_str("plain"),
        }
    }
}

/// What `cilium encrypt status` calls the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    Disabled,
    Wireguard,
    /// (No backend yet: the XFRM IPsec backend lands in its own issue.)
    Ipsec,
}

/// How this node's traffic to one other node is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// Encrypted, and the other side answered (a WireGuard handshake, an IPsec SA in use).
    Up,
    /// Configured, waiting for the other side.
    Pending(String),
    /// Not configured, and why (a bad key, a duplicate key, no address): the node's traffic is
    /// not sent rather than sent in the clear.
    Refused(String),
    /// No encryption by configuration.
    Plain,
}

/// How to reach a node: where its pod CIDRs are routed, and the mark the datapath puts on its
/// traffic (XFRM selects its policies by mark; WireGuard needs none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    pub hop: NextHop,
    pub mark: Option<u32>,
}

/// What `meshd status` and `meshd encrypt status` show of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionReport {
    pub mode: Mode,
    /// The `Encryption:` line of `cilium status`, after its tab.
    pub line: String,
    /// Whether encryption works right now, read from the device.
    pub health: meshd_api::ComponentStatus,
    pub wireguard: Option<meshd_api::WireguardStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error(transparent)]
    WireGuard(#[from] wireguard::WireGuardError),
}

/// One way of encrypting traffic between nodes.
pub trait EncryptionBackend: Send + Sync {
    fn mode(&self) -> Mode;

    /// What goes on the own CiliumNode: annotations and `spec.encryption.key`.
    fn publication(&self) -> Publication;

    /// Makes the kernel (or the device) match the node table; returns each other node's state.
    /// Level-triggered: called on every change of the table and on a timer, touching only
    /// what differs.
    fn reconcile<'a>(
        &'a self,
        nodes: &'a NodeTable,
        own: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, NodeState>, EncryptionError>>;

    /// How to reach `node`, or `None` when it cannot be reached at all (no IPv4 InternalIP).
    fn reach(&self, node: &Node) -> Option<Reach>;

    /// The interface whose traffic is encrypted (strict mode lets pod traffic to the strict
    /// CIDRs go only there), if the backend has one now.
    fn strict_device(&self) -> Option<u32>;

    /// The MTU of pod traffic to other nodes, for an underlay of `underlay_mtu`.
    fn route_mtu(&self, underlay_mtu: u32) -> u32;

    /// The current status (device counters and handshake ages read now).
    fn report(&self) -> BoxFuture<'_, EncryptionReport>;

    /// Removes what the backend made (devices, states, policies): for switching backends
    /// and for cleaning a node up. SIGTERM never calls it (a restart keeps traffic flowing).
    #[allow(
        dead_code,
        reason = "its callers (backend switch at runtime, `meshd cleanup`) come with the IPsec and deploy issues"
    )]
    fn teardown(&self) -> BoxFuture<'_, Result<(), EncryptionError>>;
}

/// Routes straight to the node over the underlay.
pub fn gateway(node: &Node) -> Option<Reach> {
    node.internal_ipv4().map(|ip: Ipv4Addr| Reach {
        hop: NextHop::Gateway(ip),
        mark: None,
    })
}

/// The backend the configuration asks for, started (device created or adopted, key loaded).
pub async fn start(
    cfg: &AgentConfig,
    node_ip: Ipv4Addr,
) -> Result<Arc<dyn EncryptionBackend>, EncryptionError> {
    // (enable-ipsec is refused by the configuration's validation until its backend lands.)
    if cfg.enable_wireguard {
        Ok(Arc::new(wireguard::WireGuard::start(cfg, node_ip).await?))
    } else {
        let disabled = disabled::Disabled;
        // With encryption turned off, a WireGuard device an earlier run made is meshd's to
        // remove (its routes are replaced by direct ones in the same pass).
        wireguard::remove_leftover_device().await;
        Ok(Arc::new(disabled))
    }
}
