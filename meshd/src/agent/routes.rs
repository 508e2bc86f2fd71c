//! Direct routes to other nodes' pod CIDRs over the underlay, reconciled level-triggered: routes
//! carry meshd's own protocol number, so only routes this agent made are ever changed, and
//! routes that are already right are left untouched (a restart does not flap them).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::nodes::NodeTable;

/// `proto 193` in `ip route`: the routes meshd owns.
pub const MESHD_ROUTE_PROTOCOL: u8 = 193;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket failed: {0}; the agent needs CAP_NET_ADMIN")]
    Socket(#[source] std::io::Error),
    #[error("listing routes failed: {0}")]
    List(#[source] rtnetlink::Error),
    #[error("installing the route to {dst} {hop} failed: {source}")]
    Add {
        dst: Ipv4Net,
        hop: NextHop,
        source: rtnetlink::Error,
    },
    #[error("removing the route to {dst} failed: {source}")]
    Remove {
        dst: Ipv4Net,
        source: rtnetlink::Error,
    },
}

/// Where a route sends traffic: directly to the node over the underlay, or into a device
/// (the WireGuard interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NextHop {
    Gateway(Ipv4Addr),
    Device(u32),
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gateway(g) => write!(f, "via {g}"),
            Self::Device(i) => write!(f, "dev #{i}"),
        }
    }
}

/// Destination → next hop.
pub type RouteSet = BTreeMap<Ipv4Net, NextHop>;

/// The routes this node should have: every other node's IPv4 pod CIDRs, via its InternalIP,
/// or into `device` (the encrypting interface) when one is given.
pub fn desired(table: &NodeTable, own_node: &str, device: Option<u32>) -> RouteSet {
    let mut out = RouteSet::new();
    for n in table.nodes.values().filter(|n| n.name != own_node) {
        let Some(IpAddr::V4(gw)) = n.internal_ip else {
            continue;
        };
        let hop = device.map_or(NextHop::Gateway(gw), NextHop::Device);
        for cidr in &n.pod_cidrs {
            if let ipnet::IpNet::V4(v4) = cidr {
                out.insert(*v4, hop);
            }
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add(Ipv4Net, NextHop),
    Replace(Ipv4Net, NextHop),
    Remove(Ipv4Net),
}

/// What to do to go from `installed` to `desired`; nothing for routes already right.
pub fn plan(installed: &RouteSet, desired: &RouteSet) -> Vec<Change> {
    let mut out = Vec::new();
    for (dst, gw) in desired {
        match installed.get(dst) {
            None => out.push(Change::Add(*dst, *gw)),
            Some(cur) if cur != gw => out.push(Change::Replace(*dst, *gw)),
            Some(_) => {}
        }
    }
    out.extend(
        installed
            .keys()
            .filter(|d| !desired.contains_key(d))
            .map(|d| Change::Remove(*d)),
    );
    out
}

pub struct RouteManager {
    handle: Handle,
}

fn route_message(dst: Ipv4Net, hop: Option<NextHop>) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .protocol(RouteProtocol::Other(MESHD_ROUTE_PROTOCOL));
    match hop {
        Some(NextHop::Gateway(gw)) => b = b.gateway(gw),
        Some(NextHop::Device(i)) => {
            b = b
                .output_interface(i)
                .scope(rtnetlink::packet_route::route::RouteScope::Link)
        }
        None => {}
    }
    b.build()
}

impl RouteManager {
    pub fn new() -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// meshd's routes as the kernel has them now.
    pub async fn installed(&self) -> Result<RouteSet, RouteError> {
        let mut out = RouteSet::new();
        let mut dump = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = dump.try_next().await.map_err(RouteError::List)? {
            if msg.header.protocol != RouteProtocol::Other(MESHD_ROUTE_PROTOCOL) {
                continue;
            }
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &msg.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let Some(net) =
                dst.and_then(|d| Ipv4Net::new(d, msg.header.destination_prefix_length).ok())
            else {
                continue;
            };
            let hop = match (gw, oif) {
                (Some(g), _) => NextHop::Gateway(g),
                (None, Some(i)) => NextHop::Device(i),
                // Ours but unusable: record it so that it gets replaced.
                (None, None) => NextHop::Gateway(Ipv4Addr::UNSPECIFIED),
            };
            out.insert(net, hop);
        }
        Ok(out)
    }

    /// Makes the kernel's meshd routes equal `desired`. Returns the changes made.
    pub async fn reconcile(&self, desired: &RouteSet) -> Result<Vec<Change>, RouteError> {
        let installed = self.installed().await?;
        let changes = plan(&installed, desired);
        for c in &changes {
            match *c {
                Change::Add(dst, hop) | Change::Replace(dst, hop) => {
                    self.handle
                        .route()
                        .add(route_message(dst, Some(hop)))
                        .replace()
                        .execute()
                        .await
                        .map_err(|source| RouteError::Add { dst, hop, source })?;
                    tracing::info!(%dst, %hop, "route installed");
                }
                Change::Remove(dst) => {
                    self.handle
                        .route()
                        .del(route_message(dst, None))
                        .execute()
                        .await
                        .map_err(|source| RouteError::Remove { dst, source })?;
                    tracing::info!(%dst, "route removed");
                }
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> NextHop {
        NextHop::Gateway(s.parse().unwrap())
    }

    #[test]
    fn plan_touches_only_what_differs() {
        let installed = RouteSet::from([
            (net("198.19.2.0/24"), ip("198.18.0.12")),
            (net("198.19.3.0/24"), ip("198.18.0.99")),
            (net("198.19.4.0/24"), ip("198.18.0.14")),
        ]);
        let desired = RouteSet::from([
            (net("198.19.2.0/24"), ip("198.18.0.12")),
            (net("198.19.3.0/24"), ip("198.18.0.13")),
            (net("198.19.5.0/24"), ip("198.18.0.15")),
        ]);
        assert_eq!(
            plan(&installed, &desired),
            vec![
                Change::Replace(net("198.19.3.0/24"), ip("198.18.0.13")),
                Change::Add(net("198.19.5.0/24"), ip("198.18.0.15")),
                Change::Remove(net("198.19.4.0/24")),
            ]
        );
        assert!(plan(&desired, &desired).is_empty());
    }
}
