//! Routes to other nodes' pod CIDRs, the way the encryption backend reaches each node (into the
//! tunnel device, or via the node's address), with the backend's route MTU. Reconciled
//! level-triggered: routes carry meshd's own protocol number, so only routes this agent made are
//! ever changed, and routes that are already right are left untouched (a restart does not flap
//! them).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::encryption::EncryptionBackend;
use super::nodes::NodeTable;

/// `proto 193` in `ip route`: the routes meshd owns.
pub const MESHD_ROUTE_PROTOCOL: u8 = 193;

/// `metric 1000000`: the backstop under each encrypted route (see [`desired`]).
pub const BACKSTOP_METRIC: u32 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket failed: {0}; the agent needs CAP_NET_ADMIN")]
    Socket(#[source] std::io::Error),
    #[error("listing routes failed: {0}")]
    List(#[source] rtnetlink::Error),
    #[error("installing the route to {dst} {route} failed: {source}")]
    Add {
        dst: Ipv4Net,
        route: Route,
        source: rtnetlink::Error,
    },
    #[error("finding the underlay's MTU (the interface with {ip}): {message}")]
    Underlay { ip: Ipv4Addr, message: String },
    #[error("removing the route to {dst} failed: {source}")]
    Remove {
        dst: Ipv4Net,
        source: rtnetlink::Error,
    },
}

/// Where a route sends traffic: directly to the node over the underlay, into a device (the
/// WireGuard interface), or nowhere (the backstop: the sender gets "unreachable").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NextHop {
    Gateway(Ipv4Addr),
    Device(u32),
    Unreachable,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gateway(g) => write!(f, "via {g}"),
            Self::Device(i) => write!(f, "dev #{i}"),
            Self::Unreachable => write!(f, "unreachable metric {BACKSTOP_METRIC}"),
        }
    }
}

/// One route: where it goes and, when the backend needs room for its headers, its MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub hop: NextHop,
    pub mtu: Option<u32>,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.mtu {
            Some(m) => write!(f, "{} mtu {m}", self.hop),
            None => write!(f, "{}", self.hop),
        }
    }
}

/// (destination, metric) → route: a destination may have its route and, underneath, a
/// backstop.
pub type RouteSet = BTreeMap<(Ipv4Net, u32), Route>;

/// The routes this node should have: every other node's IPv4 pod CIDRs, the way the
/// encryption backend reaches that node (via its InternalIP, or into the tunnel device), with
/// the backend's MTU for this underlay (none when it needs no room of its own). With encryption,
/// each also gets a backstop: an `unreachable` route of meshd's at a higher metric, so that when
/// the tunnel route is gone (the device died or was deleted) the traffic is refused instead of
/// falling through to the default route in the clear.
pub fn desired(
    table: &NodeTable,
    own_node: &str,
    backend: &dyn EncryptionBackend,
    underlay_mtu: u32,
    strict: &[Ipv4Net],
) -> RouteSet {
    let mtu = Some(backend.route_mtu(underlay_mtu)).filter(|m| *m < underlay_mtu);
    let backstop = backend.mode() != super::encryption::Mode::Disabled;
    let mut out = RouteSet::new();
    for n in table.others(own_node) {
        let Some(reach) = backend.reach(n) else {
            continue;
        };
        for cidr in &n.pod_cidrs {
            if let ipnet::IpNet::V4(v4) = cidr {
                out.insert(
                    (*v4, 0),
                    Route {
                        hop: reach.hop,
                        mtu,
                    },
                );
                if backstop {
                    out.insert(
                        (*v4, BACKSTOP_METRIC),
                        Route {
                            hop: NextHop::Unreachable,
                            mtu: None,
                        },
                    );
                }
            }
        }
    }
    // Strict mode's CIDRs get one too: what is not routed more specifically is refused.
    if backstop {
        for net in strict {
            out.insert(
                (*net, BACKSTOP_METRIC),
                Route {
                    hop: NextHop::Unreachable,
                    mtu: None,
                },
            );
        }
    }
    out
}

/// A destination and metric.
pub type RouteKey = (Ipv4Net, u32);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add(RouteKey, Route),
    Replace(RouteKey, Route),
    Remove(RouteKey, Route),
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
            .iter()
            .filter(|(d, _)| !desired.contains_key(d))
            .map(|(d, r)| Change::Remove(*d, *r)),
    );
    out
}

pub struct RouteManager {
    handle: Handle,
}

/// The message for a route; for a removal (`full: false`) only what identifies it: its
/// destination, metric, type and protocol.
/// The netlink message for a route: for adding it (`with_mtu`), or for deleting exactly that
/// route (the same type, scope, next hop and metric: the kernel deletes the first route that
/// matches what a delete names, and a device route has link scope, so a delete that left the
/// scope out matched nothing and a route into the tunnel device outlived its node).
fn route_message((dst, metric): RouteKey, route: Route, with_mtu: bool) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.addr(), dst.prefix_len())
        .protocol(RouteProtocol::Other(MESHD_ROUTE_PROTOCOL));
    if metric != 0 {
        b = b.priority(metric);
    }
    match route.hop {
        NextHop::Unreachable => b = b.kind(RouteType::Unreachable),
        NextHop::Gateway(gw) => b = b.gateway(gw),
        NextHop::Device(i) => {
            b = b
                .output_interface(i)
                .scope(rtnetlink::packet_route::route::RouteScope::Link)
        }
    }
    let mut msg = b.build();
    if let Some(mtu) = route.mtu.filter(|_| with_mtu) {
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    msg
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
            let mut mtu = None;
            let mut metric = 0;
            for a in &msg.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::Metrics(m) => {
                        mtu = m.iter().find_map(|m| match m {
                            RouteMetric::Mtu(v) => Some(*v),
                            _ => None,
                        })
                    }
                    _ => {}
                }
            }
            let Some(net) =
                dst.and_then(|d| Ipv4Net::new(d, msg.header.destination_prefix_length).ok())
            else {
                continue;
            };
            let hop = match (msg.header.kind, gw, oif) {
                (RouteType::Unreachable, _, _) => NextHop::Unreachable,
                (_, Some(g), _) => NextHop::Gateway(g),
                (_, None, Some(i)) => NextHop::Device(i),
                // Ours but unusable: record it so that it gets replaced.
                (_, None, None) => NextHop::Gateway(Ipv4Addr::UNSPECIFIED),
            };
            out.insert((net, metric), Route { hop, mtu });
        }
        Ok(out)
    }

    /// The MTU of the interface that holds the node's underlay address.
    pub async fn underlay_mtu(&self, node_ip: Ipv4Addr) -> Result<u32, RouteError> {
        underlay_mtu(&self.handle, node_ip).await
    }

    /// Makes the kernel's meshd routes equal `desired`. Every change is tried, whatever happens
    /// to the others: one that fails costs only its destination (and is retried on the next
    /// pass), and a removal that finds the route already gone counts as done. Returns meshd's
    /// routes as they are after the pass (what was listed, with the changes that took) and the
    /// changes that failed.
    pub async fn reconcile(
        &self,
        desired: &RouteSet,
    ) -> Result<(RouteSet, Vec<RouteError>), RouteError> {
        let mut installed = self.installed().await?;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let changes = plan(&installed, desired);
        for c in changes {
            match c {
                Change::Add(key, route) | Change::Replace(key, route) => {
                    let dst = key.0;
                    match self
                        .handle
                        .route()
                        .add(route_message(key, route, true))
                        .replace()
                        .execute()
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(%dst, %route, "route installed");
                            done.push(c);
                        }
                        Err(source) => failed.push(RouteError::Add { dst, route, source }),
                    }
                }
                Change::Remove(key, route) => {
                    let dst = key.0;
                    match self
                        .handle
                        .route()
                        .del(route_message(key, route, false))
                        .execute()
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(%dst, %route, "route removed");
                            done.push(c);
                        }
                        Err(e) if already_gone(&e) => done.push(c),
                        Err(source) => failed.push(RouteError::Remove { dst, source }),
                    }
                }
            }
        }
        for c in done {
            match c {
                Change::Add(key, route) | Change::Replace(key, route) => {
                    installed.insert(key, route);
                }
                Change::Remove(key, _) => {
                    installed.remove(&key);
                }
            }
        }
        Ok((installed, failed))
    }
}

/// The MTU of the interface that holds `node_ip` (the underlay), over `handle`.
pub async fn underlay_mtu(handle: &Handle, node_ip: Ipv4Addr) -> Result<u32, RouteError> {
    let err = |message: String| RouteError::Underlay {
        ip: node_ip,
        message,
    };
    let mut dump = handle.address().get().execute();
    let mut index = None;
    while let Some(msg) = dump.try_next().await.map_err(|e| err(e.to_string()))? {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == node_ip))
        {
            index = Some(msg.header.index);
        }
    }
    let index = index.ok_or_else(|| err("no interface has it".into()))?;
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err(format!("interface #{index} is gone")))?;
    Ok(link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500))
}

/// ESRCH / ENOENT: the route was not there (someone, or the kernel with its device, removed it).
fn already_gone(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if matches!(m.raw_code().abs(), libc::ESRCH | libc::ENOENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Route {
        Route {
            hop: NextHop::Gateway(s.parse().unwrap()),
            mtu: None,
        }
    }

    #[test]
    fn plan_touches_only_what_differs() {
        let installed = RouteSet::from([
            ((net("198.19.2.0/24"), 0), ip("198.18.0.12")),
            ((net("198.19.3.0/24"), 0), ip("198.18.0.99")),
            ((net("198.19.4.0/24"), 0), ip("198.18.0.14")),
        ]);
        let desired = RouteSet::from([
            ((net("198.19.2.0/24"), 0), ip("198.18.0.12")),
            ((net("198.19.3.0/24"), 0), ip("198.18.0.13")),
            ((net("198.19.5.0/24"), 0), ip("198.18.0.15")),
        ]);
        assert_eq!(
            plan(&installed, &desired),
            vec![
                Change::Replace((net("198.19.3.0/24"), 0), ip("198.18.0.13")),
                Change::Add((net("198.19.5.0/24"), 0), ip("198.18.0.15")),
                Change::Remove((net("198.19.4.0/24"), 0), ip("198.18.0.14")),
            ]
        );
        assert!(plan(&desired, &desired).is_empty());
    }

    #[test]
    fn encrypted_routes_have_a_backstop_underneath() {
        use crate::agent::encryption::{EncryptionBackend, disabled::Disabled};
        let mut t = NodeTable::default();
        let mut o =
            kube::api::DynamicObject::new("node-2", &crate::agent::nodes::cilium_node_resource());
        o.data = serde_json::json!({"spec": {
            "addresses": [{"type": "InternalIP", "ip": "198.18.0.12"}],
            "ipam": {"podCIDRs": ["198.19.2.0/24"]}}});
        t.apply(&o);
        let plain = desired(
            &t,
            "node-1",
            &Disabled as &dyn EncryptionBackend,
            1500,
            &[net("198.19.0.0/16")],
        );
        assert_eq!(plain.len(), 1, "no backstop without encryption: {plain:?}");
        struct Tunnel;
        impl EncryptionBackend for Tunnel {
            fn mode(&self) -> crate::agent::encryption::Mode {
                crate::agent::encryption::Mode::Wireguard
            }
            fn publication(&self) -> crate::agent::nodes::Publication {
                Default::default()
            }
            fn reconcile<'a>(
                &'a self,
                n: &'a NodeTable,
                o: &'a str,
            ) -> futures::future::BoxFuture<
                'a,
                Result<
                    BTreeMap<String, crate::agent::encryption::NodeState>,
                    crate::agent::encryption::EncryptionError,
                >,
            > {
                Disabled.reconcile(n, o)
            }
            fn reach(
                &self,
                _: &crate::agent::nodes::Node,
            ) -> Option<crate::agent::encryption::Reach> {
                Some(crate::agent::encryption::Reach {
                    hop: NextHop::Device(7),
                    mark: None,
                })
            }
            fn strict_device(&self) -> Option<u32> {
                Some(7)
            }
            fn route_mtu(&self, u: u32) -> u32 {
                u - 80
            }
            fn report(
                &self,
            ) -> futures::future::BoxFuture<'_, crate::agent::encryption::EncryptionReport>
            {
                Disabled.report()
            }
            fn teardown(
                &self,
            ) -> futures::future::BoxFuture<'_, Result<(), crate::agent::encryption::EncryptionError>>
            {
                Disabled.teardown()
            }
        }
        let tunnel = desired(&t, "node-1", &Tunnel, 1500, &[net("198.19.0.0/16")]);
        assert_eq!(
            tunnel[&(net("198.19.0.0/16"), BACKSTOP_METRIC)].hop,
            NextHop::Unreachable,
            "the strict CIDR has a backstop too"
        );
        assert_eq!(
            tunnel[&(net("198.19.2.0/24"), 0)],
            Route {
                hop: NextHop::Device(7),
                mtu: Some(1420)
            }
        );
        assert_eq!(
            tunnel[&(net("198.19.2.0/24"), BACKSTOP_METRIC)].hop,
            NextHop::Unreachable
        );
    }
}
