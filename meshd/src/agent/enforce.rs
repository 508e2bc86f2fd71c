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
use kube::api::{Api, DynamicObject};
use tracing::{info, info_span, warn};

use meshd_api::{ComponentStatus, EndpointSpec, Health};

use super::nodes::{NodeIds, OwnNode};
use super::policy::PolicyView;
use super::state::{Reader, Watched, Writer, any_change};
use super::watch::{Event, Watcher};
use super::{AgentError, NodesView, OwnView};

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

/// Every endpoint of the cluster by IPv4 address, from the CiliumEndpoints. Written by the
/// CiliumEndpoint watcher alone.
#[derive(Debug, Clone, Default)]
pub struct ClusterEndpoints {
    pub by_ip: BTreeMap<Ipv4Addr, RemoteEndpoint>,
    pub synced: bool,
}

/// Watches every CiliumEndpoint into the ipcache's source.
pub async fn watch_endpoints(
    client: kube::Client,
    out: Writer<ClusterEndpoints>,
) -> Result<(), AgentError> {
    let api: Api<DynamicObject> = Api::all_with(client, &super::identity::endpoint_resource());
    let mut watch = Watcher::new(api);
    type ByObject = BTreeMap<(String, String), Vec<(Ipv4Addr, RemoteEndpoint)>>;
    let mut objects: ByObject = BTreeMap::new();
    let mut fresh: Option<ByObject> = None;
    let mut synced = false;
    loop {
        let ev = watch.next_or_end("CiliumEndpoint", |_| ()).await?;
        let key = |o: &DynamicObject| {
            (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            )
        };
        match ev {
            Event::Init => fresh = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                fresh
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&o), cep_entries(&o));
                continue;
            }
            Event::InitDone => {
                objects = fresh.take().unwrap_or_default();
                synced = true;
            }
            Event::Apply(o) => {
                objects.insert(key(&o), cep_entries(&o));
            }
            Event::Delete(o) => {
                objects.remove(&key(&o));
            }
        }
        if synced {
            out.set(ClusterEndpoints {
                by_ip: objects.values().flatten().cloned().collect(),
                synced,
            });
        }
    }
}

/// One thing a datapath pass could not do (the rest was done; the next pass tries again).
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("endpoint {endpoint}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: datapath::DatapathError,
    },
    #[error("ipcache: {0}")]
    Ipcache(#[source] datapath::DatapathError),
}

/// What a datapath pass left undone.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Incomplete(pub Vec<EnforceError>);

pub struct Enforcer {
    pin_dir: PathBuf,
    mode: datapath::AttachMode,
    endpoints: BTreeMap<(String, String), EndpointDatapath>,
    events: Option<datapath::Events>,
    /// The shared ipcache, once a program instance has created (or an earlier run left) its pin.
    ipcache: Option<datapath::Ipcache>,
    /// Strict-mode drops are logged at most once a second, with their count.
    unencrypted_logged: Option<std::time::Instant>,
    unencrypted_since_log: u64,
}

/// Everything one datapath pass computes from: snapshots of the other concerns.
pub struct Inputs {
    pub own: OwnNode,
    pub nodes: Arc<NodesView>,
    pub cluster: Arc<ClusterEndpoints>,
    pub local: Arc<Vec<EndpointSpec>>,
    pub identities: Arc<BTreeMap<(String, String), u32>>,
    pub policy: Arc<PolicyView>,
}

impl Inputs {
    /// The datapath's sources not listed yet.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = self.policy.unsynced.clone();
        if !self.cluster.synced {
            missing.push("CiliumEndpoint");
        }
        if !self.nodes.synced {
            missing.push("CiliumNode");
        }
        missing
    }

    /// The ipcache as it should be: node addresses (host, remote-node) with their node ids,
    /// every CiliumEndpoint's address, and the CIDR prefixes policies use.
    fn ipcache(&self) -> BTreeMap<(Ipv4Addr, u32), IpcacheValue> {
        let table = &self.nodes.table;
        let mut cache: BTreeMap<(Ipv4Addr, u32), IpcacheValue> = BTreeMap::new();
        for n in table.nodes.values() {
            let Some(ip) = n.internal_ipv4() else {
                continue;
            };
            let identity = if std::net::IpAddr::V4(ip) == self.own.internal_ip {
                IDENTITY_HOST
            } else {
                IDENTITY_REMOTE_NODE
            };
            cache.insert(
                (ip, 32),
                IpcacheValue {
                    identity,
                    node_id: n.node_id,
                    pad: 0,
                },
            );
        }
        for (ip, r) in &self.cluster.by_ip {
            let node_id = r.node_ip.map_or(0, |n| table.node_id(n));
            cache.insert(
                (*ip, 32),
                IpcacheValue {
                    identity: r.identity,
                    node_id,
                    pad: 0,
                },
            );
        }
        for (net, id) in self.policy.cidrs.prefixes() {
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
        cache
    }
}

/// Cilium's reserved identities for this host and for other nodes.
const IDENTITY_HOST: u32 = 1;
const IDENTITY_REMOTE_NODE: u32 = 6;

/// The node ids an earlier run gave node addresses, read back from the pinned ipcache, so that
/// a restarted agent keeps the numbering (auth entries carry it).
pub fn pinned_node_ids(pin_dir: &std::path::Path) -> NodeIds {
    let mut ids = NodeIds::default();
    if let Ok(entries) = datapath::read_ipcache(pin_dir) {
        for (addr, prefix, v) in entries {
            if prefix == 32 && (v.identity == IDENTITY_HOST || v.identity == IDENTITY_REMOTE_NODE) {
                ids.seed(Ipv4Addr::from(addr), v.node_id);
            }
        }
    }
    ids
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
    pub fn new(pin_dir: PathBuf, mode: datapath::AttachMode) -> Self {
        Self {
            pin_dir,
            mode,
            endpoints: BTreeMap::new(),
            events: None,
            ipcache: None,
            unencrypted_logged: None,
            unencrypted_since_log: 0,
        }
    }

    /// One pass from snapshots (no lock is held); returns a problem to report, if any.
    fn reconcile(&mut self, inputs: &Inputs) -> Result<(), Incomplete> {
        let desired_ipcache = inputs.ipcache();
        let eps = &inputs.local;
        let identities = &inputs.identities;
        let compiled = &inputs.policy.compiled;
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
                datapath::remove_filters(&iface);
                datapath::remove_endpoint_pins(&self.pin_dir, &iface);
            }
        }
        for ep in eps.iter() {
            let key = (ep.namespace.clone(), ep.name.clone());
            let name = format!("{}/{}", key.0, key.1);
            let _span =
                info_span!("endpoint", endpoint = %name, interface = %ep.interface).entered();
            // Without its identity the endpoint cannot be named in anyone's policy yet.
            let Some(identity) = identities.get(&key).copied() else {
                continue;
            };
            // Its entries from a compilation that knew it, never a default: an endpoint added
            // after the last compilation waits for the next (it follows within milliseconds).
            let Some(c) = compiled.get(&key).cloned() else {
                continue;
            };
            let cfg = EndpointConfig {
                local_identity: identity,
                ingress_enforced: c.ingress_enforced as u8,
                egress_enforced: c.egress_enforced as u8,
                pad: 0,
                policy_revision: 0,
            };
            if !self.endpoints.contains_key(&key) {
                match EndpointDatapath::attach(&ep.interface, &self.pin_dir, cfg, self.mode) {
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
                        problems.push(EnforceError::Endpoint {
                            endpoint: name.clone(),
                            source: e,
                        });
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
                Err(e) => problems.push(EnforceError::Endpoint {
                    endpoint: name.clone(),
                    source: e,
                }),
            }
        }
        // The ipcache outlives endpoints: it is kept right even when none is left (a deleted
        // pod's address goes), and stale entries of an earlier run are removed.
        if self.ipcache.is_none() && self.pin_dir.join("MESHD_IPCACHE").exists() {
            match datapath::Ipcache::open(&self.pin_dir) {
                Ok(c) => self.ipcache = Some(c),
                Err(e) => problems.push(EnforceError::Ipcache(e)),
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
                problems.push(EnforceError::Ipcache(e));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Incomplete(problems))
        }
    }

    fn log_events(&mut self, monitor: &tokio::sync::broadcast::Sender<meshd_api::MonitorEvent>) {
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
            } else if e.reason == datapath::REASON_UNENCRYPTED {
                // A dead tunnel can drop hundreds a second: one line a second at most.
                self.unencrypted_since_log += 1;
                if self
                    .unencrypted_logged
                    .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1))
                {
                    warn!(reason = e.reason, drops = self.unencrypted_since_log, src_identity = e.src_identity, %src, %dst, "strict mode dropped traffic that would have left the node unencrypted (reason 195, Traffic is unencrypted)");
                    self.unencrypted_logged = Some(std::time::Instant::now());
                    self.unencrypted_since_log = 0;
                }
            } else {
                info!(reason = e.reason, src_identity = e.src_identity, dst_identity = e.dst_identity, %src, %dst, dport = e.dport, proto = e.proto, "dropped (Policy denied)");
            }
            // Nobody listening is fine.
            let _ = monitor.send(meshd_api::MonitorEvent {
                kind: if auth {
                    "auth-required".into()
                } else {
                    "drop".into()
                },
                reason: e.reason,
                reason_text: crate::cli::bpf::reason_text(e.reason).into(),
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

/// What the enforcer reads, each a reader of the concern that owns it.
pub struct Sources {
    pub own: Reader<OwnView>,
    pub nodes: Reader<NodesView>,
    pub cluster: Reader<ClusterEndpoints>,
    pub local: Reader<Vec<EndpointSpec>>,
    pub identities: Reader<BTreeMap<(String, String), u32>>,
    pub policy: Reader<PolicyView>,
}

impl Sources {
    fn snapshot(&mut self) -> Inputs {
        Inputs {
            own: self.own.get().own.clone(),
            nodes: self.nodes.get(),
            cluster: self.cluster.get(),
            local: self.local.get(),
            identities: self.identities.get(),
            policy: self.policy.get(),
        }
    }
}

pub async fn enforce_loop(
    mut enforcer: Enforcer,
    mut sources: Sources,
    status: Writer<ComponentStatus>,
    monitor: tokio::sync::broadcast::Sender<meshd_api::MonitorEvent>,
) -> Result<(), AgentError> {
    loop {
        let inputs = sources.snapshot();
        let missing = inputs.missing();
        let retry = if !missing.is_empty() {
            // Nothing is touched yet: what a previous run pinned keeps enforcing as it was.
            status.set(ComponentStatus {
                state: Health::Degraded,
                message: format!(
                    "waiting for the first list of {} (pinned programs keep enforcing)",
                    missing.join(", ")
                ),
            });
            Duration::from_millis(500)
        } else {
            let result = enforcer.reconcile(&inputs);
            status.set(match &result {
                Ok(()) => ComponentStatus {
                    state: Health::Ok,
                    message: format!(
                        "{} endpoints enforced, attached with {}",
                        enforcer.endpoints.len(),
                        enforcer.mode
                    ),
                },
                Err(e) => {
                    warn!(error = %e, "datapath reconciliation incomplete; retrying");
                    ComponentStatus {
                        state: Health::Failure,
                        message: e.to_string(),
                    }
                }
            });
            if result.is_ok() {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(2)
            }
        };
        // Poll the event ring while waiting for a change or the timer.
        let deadline = tokio::time::Instant::now() + retry;
        loop {
            enforcer.log_events(&monitor);
            let changed = {
                let Sources {
                    own,
                    nodes,
                    cluster,
                    local,
                    identities,
                    policy,
                } = &mut sources;
                let mut watched: [&mut dyn Watched; 6] =
                    [own, nodes, cluster, local, identities, policy];
                any_change(&mut watched, Duration::from_millis(200)).await?
            };
            if changed || tokio::time::Instant::now() >= deadline {
                break;
            }
        }
    }
}
