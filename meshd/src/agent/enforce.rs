//! Puts the compiled policy into the kernel: one eBPF program instance per local endpoint
//! (attached to its host-side veth), its policy entries and settings, and the shared ipcache
//! (every CiliumEndpoint's address → identity, node addresses → host / remote-node, CIDR
//! prefixes → their local identities). Level-triggered; drop and AUTH_REQUIRED events are logged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datapath::{EndpointConfig, EndpointDatapath, IpcacheValue, PolicyKey, PolicyValue};
use futures::StreamExt as _;
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::{info, warn};

use super::Shared;

/// A remote endpoint as its CiliumEndpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub identity: u32,
    pub node_ip: Option<Ipv4Addr>,
}

fn cep_entries(o: &DynamicObject) -> Vec<(Ipv4Addr, RemoteEndpoint)> {
    let status = &o.data["status"];
    let Some(identity) = status["identity"]["id"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
    else {
        return vec![];
    };
    let node_ip = status["networking"]["node"]
        .as_str()
        .and_then(|s| s.parse().ok());
    status["networking"]["addressing"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["ipv4"].as_str()?.parse().ok())
        .map(|ip| (ip, RemoteEndpoint { identity, node_ip }))
        .collect()
}

/// Watches every CiliumEndpoint into the ipcache's source.
pub async fn watch_endpoints(client: kube::Client, shared: Arc<Shared>) {
    let api: Api<DynamicObject> = Api::all_with(client, &super::identity::endpoint_resource());
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    type ByObject = BTreeMap<(String, String), Vec<(Ipv4Addr, RemoteEndpoint)>>;
    let mut objects: ByObject = BTreeMap::new();
    let mut fresh: Option<ByObject> = None;
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        let key = |o: &DynamicObject| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        };
        match ev {
            watcher::Event::Init => fresh = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                fresh
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&o), cep_entries(&o));
            }
            watcher::Event::InitDone => {
                objects = fresh.take().unwrap_or_default();
                shared.lock().datapath_sources.insert("CiliumEndpoint");
            }
            watcher::Event::Apply(o) => {
                objects.insert(key(&o), cep_entries(&o));
            }
            watcher::Event::Delete(o) => {
                objects.remove(&key(&o));
            }
        }
        shared.lock().remote_endpoints = objects.values().flatten().cloned().collect();
        shared.policy_changed();
    }
}

pub struct Enforcer {
    pin_dir: PathBuf,
    endpoints: BTreeMap<(String, String), EndpointDatapath>,
    events: Option<datapath::Events>,
    /// The shared ipcache, once a program instance has created (or an earlier run left) its pin.
    ipcache: Option<datapath::Ipcache>,
    node_ids: NodeIds,
    /// Whether the node ids of an earlier run were read back from the pinned ipcache.
    node_ids_seeded: bool,
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

fn to_kernel(c: &policy::Compiled) -> Vec<(u32, PolicyKey, PolicyValue)> {
    c.entries
        .iter()
        .map(|(k, v)| {
            (
                k.prefix_len(),
                PolicyKey {
                    identity: k.identity,
                    egress: k.egress as u8,
                    proto: k.proto,
                    dport: k.dport.to_be(),
                },
                PolicyValue {
                    flags: if v.deny {
                        datapath::POLICY_FLAG_DENY
                    } else {
                        0
                    },
                    auth_type: v.auth_type,
                    ..Default::default()
                },
            )
        })
        .collect()
}

impl Enforcer {
    pub fn new(pin_dir: PathBuf) -> Self {
        Self {
            pin_dir,
            endpoints: BTreeMap::new(),
            events: None,
            ipcache: None,
            node_ids: NodeIds::default(),
            node_ids_seeded: false,
        }
    }

    /// One pass; returns a problem to report, if any.
    fn reconcile(&mut self, shared: &Shared) -> Result<(), String> {
        if !self.node_ids_seeded {
            // Node addresses (host, remote-node) carry the ids an earlier run gave them.
            if let Ok(entries) = datapath::read_ipcache(&self.pin_dir) {
                for (addr, prefix, v) in entries {
                    if prefix == 32 && (v.identity == 1 || v.identity == 6) {
                        self.node_ids.seed(Ipv4Addr::from(addr), v.node_id);
                    }
                }
            }
            self.node_ids_seeded = true;
        }
        let (eps, identities, compiled, desired_ipcache) = {
            let s = shared.lock();
            let mut cache: BTreeMap<(Ipv4Addr, u32), IpcacheValue> = BTreeMap::new();
            let node_ips: BTreeSet<Ipv4Addr> = s
                .table
                .nodes
                .values()
                .filter_map(|n| match n.internal_ip {
                    Some(std::net::IpAddr::V4(ip)) => Some(ip),
                    _ => None,
                })
                .collect();
            let node_ids = self.node_ids.update(&node_ips).clone();
            for (ip, id) in &node_ids {
                let identity = if std::net::IpAddr::V4(*ip) == s.own.internal_ip {
                    1
                } else {
                    6
                };
                cache.insert(
                    (*ip, 32),
                    IpcacheValue {
                        identity,
                        node_id: *id,
                        pad: 0,
                    },
                );
            }
            for (ip, r) in &s.remote_endpoints {
                let node_id = r
                    .node_ip
                    .and_then(|n| node_ids.get(&n).copied())
                    .unwrap_or(0);
                cache.insert(
                    (*ip, 32),
                    IpcacheValue {
                        identity: r.identity,
                        node_id,
                        pad: 0,
                    },
                );
            }
            for (net, id) in s.policy.cidrs.prefixes() {
                if let ipnet::IpNet::V4(v4) = net {
                    cache
                        .entry((v4.network(), u32::from(v4.prefix_len())))
                        .or_insert(IpcacheValue {
                            identity: *id,
                            node_id: 0,
                            pad: 0,
                        });
                }
            }
            (
                s.endpoints.list(),
                s.identities.clone(),
                s.policy.compiled.clone(),
                cache,
            )
        };
        let mut problems = Vec::new();
        let wanted: BTreeSet<(String, String)> = eps
            .iter()
            .map(|e| (e.namespace.clone(), e.name.clone()))
            .collect();
        let gone: Vec<(String, String)> = self
            .endpoints
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(dp) = self.endpoints.remove(&k) {
                info!(endpoint = %format!("{}/{}", k.0, k.1), interface = %dp.interface, "detaching programs");
                dp.remove();
            }
        }
        // Pins of endpoints deleted while the agent was down.
        let interfaces: BTreeSet<&str> = eps.iter().map(|e| e.interface.as_str()).collect();
        for iface in datapath::pinned_endpoints(&self.pin_dir) {
            if !interfaces.contains(iface.as_str()) {
                info!(interface = %iface, "removing the pins of an endpoint that is gone");
                datapath::remove_endpoint_pins(&self.pin_dir, &iface);
            }
        }
        for ep in &eps {
            let key = (ep.namespace.clone(), ep.name.clone());
            let name = format!("{}/{}", key.0, key.1);
            // Without its identity the endpoint cannot be named in anyone's policy yet.
            let Some(identity) = identities.get(&key).copied() else {
                continue;
            };
            let c = compiled.get(&key).cloned().unwrap_or_default();
            let cfg = EndpointConfig {
                local_identity: identity,
                ingress_enforced: c.ingress_enforced as u8,
                egress_enforced: c.egress_enforced as u8,
                pad: 0,
                policy_revision: 0,
            };
            if !self.endpoints.contains_key(&key) {
                match EndpointDatapath::attach(&ep.interface, &self.pin_dir, cfg) {
                    Ok(mut dp) => {
                        info!(endpoint = %name, interface = %ep.interface, identity, "programs attached");
                        if self.events.is_none() {
                            self.events = dp.events().ok();
                        }
                        self.endpoints.insert(key.clone(), dp);
                        // A new instance may have replaced the pinned ipcache (another
                        // layout): open it again.
                        self.ipcache = None;
                    }
                    Err(e) => {
                        problems.push(format!("{name}: {e}"));
                        continue;
                    }
                }
            }
            let Some(dp) = self.endpoints.get_mut(&key) else {
                continue;
            };
            match dp.sync(cfg, &to_kernel(&c)) {
                Ok(sync) if !sync.is_noop() => info!(
                    endpoint = %name, interface = %ep.interface, entries = sync.entries,
                    added = sync.added, changed = sync.changed, removed = sync.removed,
                    took_ms = (sync.took.as_secs_f64() * 1e4).round() / 10.0,
                    "policy map updated"
                ),
                Ok(_) => {}
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        // The ipcache outlives endpoints: it is kept right even when none is left (a deleted
        // pod's address goes), and stale entries of an earlier run are removed.
        if self.ipcache.is_none() && self.pin_dir.join("MESHD_IPCACHE").exists() {
            match datapath::Ipcache::open(&self.pin_dir) {
                Ok(c) => self.ipcache = Some(c),
                Err(e) => problems.push(format!("ipcache: {e}")),
            }
        }
        if let Some(cache) = self.ipcache.as_mut() {
            let want = desired_ipcache
                .iter()
                .map(|((ip, prefix), v)| ((ip.octets(), *prefix), *v))
                .collect();
            if let Err(e) = cache.sync(&want) {
                // The next pass opens it again and reads what the kernel holds.
                self.ipcache = None;
                problems.push(format!("ipcache: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    fn log_events(&mut self, shared: &Shared) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        while let Some(e) = events.next_event() {
            let (src, dst) = (Ipv4Addr::from(e.saddr), Ipv4Addr::from(e.daddr));
            let auth = e.kind == datapath::EVENT_AUTH_REQUIRED;
            if auth {
                info!(
                    local_identity = e.auth.local_identity, remote_identity = e.auth.remote_identity,
                    remote_node_id = e.auth.remote_node_id, auth_type = e.auth.auth_type, %src, %dst, dport = e.dport,
                    "AUTH_REQUIRED: dropped (reason 189, Authentication required)"
                );
            } else {
                info!(reason = e.reason, src_identity = e.src_identity, dst_identity = e.dst_identity, %src, %dst, dport = e.dport, proto = e.proto, "dropped (Policy denied)");
            }
            // Nobody listening is fine.
            let _ = shared.monitor.send(meshd_api::MonitorEvent {
                kind: if auth {
                    "auth-required".into()
                } else {
                    "drop".into()
                },
                reason: e.reason,
                reason_text: if auth {
                    "Authentication required".into()
                } else {
                    "Policy denied".into()
                },
                src_identity: e.src_identity,
                dst_identity: e.dst_identity,
                src: src.to_string(),
                dst: dst.to_string(),
                dport: e.dport,
                proto: e.proto,
                direction: if e.egress == 1 {
                    "egress".into()
                } else {
                    "ingress".into()
                },
                auth: auth.then_some((
                    e.auth.local_identity,
                    e.auth.remote_identity,
                    e.auth.remote_node_id,
                    e.auth.auth_type,
                )),
            });
        }
    }
}

pub async fn enforce_loop(mut enforcer: Enforcer, shared: Arc<Shared>) {
    loop {
        let wake = shared.compiled.notified();
        let waiting = {
            let mut s = shared.lock();
            let missing = s.datapath_sources_missing();
            if !missing.is_empty() {
                // Nothing is touched yet: what a previous run pinned keeps enforcing as it was.
                s.datapath = meshd_api::ComponentStatus {
                    state: meshd_api::Health::Degraded,
                    message: format!(
                        "waiting for the first list of {} (pinned programs keep enforcing)",
                        missing.join(", ")
                    ),
                };
            }
            !missing.is_empty()
        };
        if waiting {
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        let result = enforcer.reconcile(&shared);
        shared.lock().datapath = match &result {
            Ok(()) => meshd_api::ComponentStatus {
                state: meshd_api::Health::Ok,
                message: format!("{} endpoints enforced", enforcer.endpoints.len()),
            },
            Err(e) => {
                warn!(error = %e, "datapath reconciliation incomplete; retrying");
                meshd_api::ComponentStatus {
                    state: meshd_api::Health::Failure,
                    message: e.clone(),
                }
            }
        };
        let retry = if result.is_ok() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        };
        // Poll the event ring while waiting.
        let deadline = tokio::time::Instant::now() + retry;
        tokio::pin!(wake);
        loop {
            enforcer.log_events(&shared);
            tokio::select! {
                _ = &mut wake => break,
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
