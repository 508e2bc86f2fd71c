//! `meshd agent`: wires the node watcher, the own-node publisher, the route reconciler and the
//! local API together. Each loop is level-triggered: it recomputes what should be from the
//! caches and applies the difference, on every change and on a timer.

mod api;
pub mod endpoints;
pub mod enforce;
pub mod identity;
pub mod nodes;
pub mod policy;
pub mod routes;
pub mod wireguard;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use meshd_api::{ComponentStatus, Health, NodeStatus, Status};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use endpoints::EndpointStore;
use nodes::{NodeTable, OwnNode};
use routes::RouteManager;

pub struct AgentState {
    pub kubernetes: ComponentStatus,
    pub table: NodeTable,
    /// The node watcher has listed every CiliumNode at least once.
    pub synced: bool,
    pub published: bool,
    /// Per remote node: why its routes are not installed.
    pub route_errors: BTreeMap<String, String>,
    pub routes: routes::RouteSet,
    pub endpoints: EndpointStore,
    pub own: OwnNode,
    /// The own CiliumNode as last seen by the watcher.
    pub own_object: Option<DynamicObject>,
    pub wg: Option<WgView>,
    /// Local endpoint (namespace, name) → its security identity.
    pub identities: BTreeMap<(String, String), u32>,
    pub policy: policy::Repository,
    /// Every endpoint in the cluster by IPv4 address (from CiliumEndpoints).
    pub remote_endpoints: BTreeMap<Ipv4Addr, enforce::RemoteEndpoint>,
    /// Whether the eBPF datapath enforces the compiled entries.
    pub datapath: ComponentStatus,
    /// The watchers the datapath depends on that have listed everything at least once.
    pub datapath_sources: std::collections::BTreeSet<&'static str>,
}

/// What must have been listed before the datapath is touched: until then a restarted agent
/// leaves the pinned programs and maps of its previous run enforcing as they are (an empty
/// view would open or close everything for a moment).
pub const DATAPATH_SOURCES: [&str; 5] = [
    "CiliumNetworkPolicy",
    "CiliumClusterwideNetworkPolicy",
    "NetworkPolicy",
    "CiliumIdentity",
    "CiliumEndpoint",
];

impl AgentState {
    /// The datapath's sources not listed yet (the node list included).
    pub fn datapath_sources_missing(&self) -> Vec<&'static str> {
        let mut missing: Vec<&'static str> = DATAPATH_SOURCES
            .iter()
            .copied()
            .filter(|k| !self.datapath_sources.contains(k))
            .collect();
        if !self.synced {
            missing.push("CiliumNode");
        }
        missing
    }
}

/// What the WireGuard reconciler last saw and did.
pub struct WgView {
    pub backend: wireguard::Backend,
    pub public_key: String,
    pub node_encryption: bool,
    pub peers: wg::peers::PeerSet,
    pub device: wg::uapi::DeviceInfo,
}

impl WgView {
    fn status(&self) -> meshd_api::WireguardStatus {
        let now = std::time::SystemTime::now();
        let mut peers: Vec<meshd_api::WireguardPeer> = self
            .peers
            .peers
            .iter()
            .map(|(key, want)| {
                let have = self.device.peers.iter().find(|p| p.public_key == *key);
                let age = have
                    .and_then(|h| h.last_handshake)
                    .and_then(|t| now.duration_since(t).ok())
                    .map(|d| d.as_secs());
                let state = match age {
                    Some(a) if a <= 180 => "up".to_string(),
                    Some(_) => "stale: no handshake for 3 minutes".to_string(),
                    None => "waiting for handshake".to_string(),
                };
                meshd_api::WireguardPeer {
                    node: want.node.clone(),
                    public_key: Some(key.to_base64()),
                    endpoint: Some(want.endpoint.to_string()),
                    allowed_ips: want.allowed_ips.iter().map(ToString::to_string).collect(),
                    last_handshake_seconds: age,
                    transfer_rx: have.map_or(0, |h| h.rx_bytes),
                    transfer_tx: have.map_or(0, |h| h.tx_bytes),
                    state,
                }
            })
            .collect();
        peers.extend(
            self.peers
                .refused
                .iter()
                .map(|(node, why)| meshd_api::WireguardPeer {
                    node: node.clone(),
                    public_key: None,
                    endpoint: None,
                    allowed_ips: vec![],
                    last_handshake_seconds: None,
                    transfer_rx: 0,
                    transfer_tx: 0,
                    state: format!("refused: {why}"),
                }),
        );
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        meshd_api::WireguardStatus {
            backend: match self.backend {
                wireguard::Backend::Kernel => "kernel".into(),
                wireguard::Backend::Userspace => "userspace".into(),
            },
            interface: wg::INTERFACE.into(),
            public_key: self.public_key.clone(),
            listen_port: wg::LISTEN_PORT,
            node_encryption: self.node_encryption,
            peers,
        }
    }
}

pub struct Shared {
    started: Instant,
    state: Mutex<AgentState>,
    wake: Notify,
    /// Local endpoints changed.
    endpoints_changed: Notify,
    /// Policies, identities or endpoints changed: recompile.
    policy_changed: Notify,
    /// A recompilation finished: the datapath reconciles after it, never before.
    compiled: Notify,
    /// Read on each status request, so handshake ages and counters are current.
    wireguard: Option<Arc<wireguard::WireGuard>>,
    /// Datapath events for `meshd monitor`.
    pub monitor: tokio::sync::broadcast::Sender<meshd_api::MonitorEvent>,
}

impl Shared {
    /// Status with the WireGuard device read just now.
    pub async fn fresh_status(&self) -> Status {
        if let Some(w) = &self.wireguard
            && let Ok(device) = w.device_info().await
            && let Some(view) = self.lock().wg.as_mut()
        {
            view.device = device;
        }
        self.status()
    }

    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the reconcilers to run now.
    pub fn trigger(&self) {
        self.wake.notify_waiters();
    }

    /// Local endpoints were added or removed.
    pub fn endpoints_changed(&self) {
        self.endpoints_changed.notify_waiters();
        self.policy_changed();
        self.trigger();
    }

    pub fn policy_changed(&self) {
        self.policy_changed.notify_waiters();
    }

    pub fn policy_status(&self) -> meshd_api::PolicyStatus {
        let s = self.lock();
        let objects = s
            .policy
            .objects
            .iter()
            .map(|((kind, ns, name), e)| meshd_api::PolicyObjectStatus {
                object: if ns.is_empty() {
                    format!("{kind:?} {name}")
                } else {
                    format!("{kind:?} {ns}/{name}")
                },
                in_force: e.good.is_some(),
                error: e.error.as_ref().map(ToString::to_string),
                unsupported: e
                    .good
                    .iter()
                    .flat_map(|p| {
                        p.unsupported
                            .iter()
                            .map(|u| format!("{}: {}", u.field, u.reason))
                    })
                    .collect(),
            })
            .collect();
        let endpoints = s
            .policy
            .compiled
            .iter()
            .map(|((ns, name), c)| meshd_api::EndpointPolicy {
                endpoint: format!("{ns}/{name}"),
                identity: s.identities.get(&(ns.clone(), name.clone())).copied(),
                ingress_enforced: c.ingress_enforced,
                egress_enforced: c.egress_enforced,
                entries: c
                    .entries
                    .iter()
                    .map(|(k, v)| meshd_api::PolicyEntryView {
                        identity: k.identity,
                        direction: if k.egress {
                            "egress".into()
                        } else {
                            "ingress".into()
                        },
                        protocol: k.proto,
                        port: k.dport,
                        prefix_len: k.prefix_len(),
                        verdict: if v.deny {
                            "deny".into()
                        } else {
                            "allow".into()
                        },
                        auth_type: v.auth_type,
                    })
                    .collect(),
            })
            .collect();
        meshd_api::PolicyStatus {
            enforcement: match s.datapath.state {
                Health::Ok => format!("enforced by the eBPF datapath ({})", s.datapath.message),
                _ => format!("NOT enforced: {}", s.datapath.message),
            },
            objects,
            endpoints,
        }
    }

    /// Local endpoints with the identities allocated for them.
    pub fn endpoints(&self) -> Vec<meshd_api::EndpointSpec> {
        let s = self.lock();
        s.endpoints
            .list()
            .into_iter()
            .map(|mut e| {
                e.identity = s
                    .identities
                    .get(&(e.namespace.clone(), e.name.clone()))
                    .copied();
                e
            })
            .collect()
    }

    pub fn status(&self) -> Status {
        let s = self.lock();
        let kubernetes = match (&s.kubernetes.state, s.synced, s.published) {
            (Health::Ok, true, true) => s.kubernetes.clone(),
            (Health::Ok, false, _) => ComponentStatus {
                state: Health::Degraded,
                message: "listing CiliumNodes".into(),
            },
            (Health::Ok, true, false) => ComponentStatus {
                state: Health::Degraded,
                message: "publishing the own CiliumNode".into(),
            },
            _ => s.kubernetes.clone(),
        };
        let nodes = s
            .table
            .nodes
            .values()
            .filter(|n| n.name != s.own.name)
            .map(|n| {
                let installed: Vec<_> = n
                    .pod_cidrs
                    .iter()
                    .filter(|c| matches!(c, ipnet::IpNet::V4(v4) if s.routes.contains_key(v4)))
                    .map(ToString::to_string)
                    .collect();
                let routes = if let Some(e) = s.route_errors.get(&n.name) {
                    ComponentStatus {
                        state: Health::Failure,
                        message: e.clone(),
                    }
                } else if n.pod_cidrs.is_empty() || n.internal_ip.is_none() {
                    ComponentStatus {
                        state: Health::Disabled,
                        message: "no InternalIP or pod CIDRs published".into(),
                    }
                } else if installed.len() == n.pod_cidrs.len() {
                    ComponentStatus {
                        state: Health::Ok,
                        message: format!(
                            "{} via {}",
                            installed.join(","),
                            n.internal_ip.map(|i| i.to_string()).unwrap_or_default()
                        ),
                    }
                } else {
                    ComponentStatus {
                        state: Health::Degraded,
                        message: "routes pending".into(),
                    }
                };
                NodeStatus {
                    name: n.name.clone(),
                    addresses: n.addresses.clone(),
                    pod_cidrs: n.pod_cidrs.iter().map(ToString::to_string).collect(),
                    routes,
                }
            })
            .chain(s.table.invalid.values().map(|e| NodeStatus {
                name: e.node.clone(),
                addresses: vec![],
                pod_cidrs: vec![],
                routes: ComponentStatus {
                    state: Health::Failure,
                    message: format!("invalid: {}: {}", e.field, e.message),
                },
            }))
            .collect();
        let wireguard = s.wg.as_ref().map(WgView::status);
        let encryption = match &wireguard {
            // Cilium's `Encryption:` line, after its tab.
            Some(w) => format!(
                "Wireguard\t[NodeEncryption: {}, {} (Pubkey: {}, Port: {}, Peers: {})]",
                if w.node_encryption {
                    "Enabled"
                } else {
                    "Disabled"
                },
                w.interface,
                w.public_key,
                w.listen_port,
                s.wg.as_ref().map_or(0, |v| v.peers.peers.len()),
            ),
            None => "Disabled".into(),
        };
        Status {
            node_name: s.own.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            kubernetes,
            node_addresses: vec![s.own.internal_ip],
            pod_cidrs: s.own.pod_cidrs.clone(),
            encryption,
            wireguard,
            nodes,
            endpoints: s.endpoints.len(),
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }
}

async fn kube_client(cfg: &AgentConfig) -> Result<kube::Client> {
    let config = match &cfg.k8s_kubeconfig_path {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| {
                format!(
                    "reading the kubeconfig {} (k8s-kubeconfig-path)",
                    path.display()
                )
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("the kubeconfig {} is unusable", path.display()))?
        }
        None => kube::Config::incluster()
            .context("no k8s-kubeconfig-path given and not running in a cluster")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// The first global IPv4 address of a non-loopback interface.
async fn detect_node_ip() -> Result<Ipv4Addr> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(conn);
    let mut dump = handle.address().get().execute();
    let mut found = None;
    while let Some(msg) = dump.try_next().await.context("listing addresses")? {
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a
                && !ip.is_loopback()
                && !ip.is_link_local()
            {
                found = Some(*ip);
            }
        }
        if found.is_some() {
            break;
        }
    }
    task.abort();
    found.context("no IPv4 address found on this node; set ipv4-node")
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    cfg.validate()?;
    let node_name = match &cfg.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("no node-name given and the hostname is unreadable")?
            .to_string_lossy()
            .into_owned(),
    };
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "creating the state directory {} (state-dir)",
            cfg.state_dir.display()
        )
    })?;
    let ip = match cfg.ipv4_node {
        Some(ip) => ip,
        None => detect_node_ip().await?,
    };
    let client = kube_client(&cfg).await?;
    let api: Api<DynamicObject> = Api::all_with(client, &nodes::cilium_node_resource());
    let routes = RouteManager::new()?;
    let endpoints = EndpointStore::load(&cfg.state_dir)?;
    let wg = if cfg.enable_wireguard {
        Some(Arc::new(wireguard::WireGuard::start(&cfg, ip).await?))
    } else {
        None
    };
    let own = OwnNode {
        name: node_name.clone(),
        internal_ip: IpAddr::V4(ip),
        pod_cidrs: cfg.ipv4_range.iter().map(ToString::to_string).collect(),
        boot_id: boot_id(),
        wg_public_key: wg.as_ref().map(|w| w.public_key.to_base64()),
    };
    info!(node = %node_name, ip = %ip, pod_cidrs = ?own.pod_cidrs, "meshd agent starting");
    let shared = Arc::new(Shared {
        started: Instant::now(),
        state: Mutex::new(AgentState {
            kubernetes: ComponentStatus {
                state: Health::Degraded,
                message: "connecting".into(),
            },
            table: NodeTable::default(),
            synced: false,
            published: false,
            route_errors: BTreeMap::new(),
            routes: Default::default(),
            endpoints,
            own,
            own_object: None,
            wg: None,
            identities: BTreeMap::new(),
            policy: policy::Repository::default(),
            remote_endpoints: BTreeMap::new(),
            datapath: ComponentStatus {
                state: Health::Disabled,
                message: "starting".into(),
            },
            datapath_sources: Default::default(),
        }),
        wake: Notify::new(),
        endpoints_changed: Notify::new(),
        policy_changed: Notify::new(),
        compiled: Notify::new(),
        wireguard: wg.clone(),
        monitor: tokio::sync::broadcast::channel(1024).0,
    });

    let listener = api::bind(&cfg.socket_path).await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(api::serve(listener, shared.clone()));
    tasks.spawn(watch_nodes(api.clone(), shared.clone()));
    tasks.spawn(publish_own_node(api.clone(), shared.clone()));
    tasks.spawn(reconcile_endpoints(
        api.clone().into_client(),
        shared.clone(),
        wg.is_some(),
    ));
    for kind in [
        policy::PolicyKind::CiliumNetworkPolicy,
        policy::PolicyKind::CiliumClusterwideNetworkPolicy,
        policy::PolicyKind::NetworkPolicy,
    ] {
        tasks.spawn(policy::watch_policies(
            api.clone().into_client(),
            kind,
            shared.clone(),
        ));
    }
    tasks.spawn(policy::watch_identities(
        api.clone().into_client(),
        shared.clone(),
    ));
    tasks.spawn(policy::recompile_loop(shared.clone()));
    if cfg.enable_policy == "never" {
        shared.lock().datapath = ComponentStatus {
            state: Health::Disabled,
            message: "enable-policy=never".into(),
        };
    } else {
        tasks.spawn(enforce::watch_endpoints(
            api.clone().into_client(),
            shared.clone(),
        ));
        tasks.spawn(enforce::enforce_loop(
            enforce::Enforcer::new(cfg.bpf_root.join("meshd")),
            shared.clone(),
        ));
    }
    tasks.spawn(reconcile_datapath(
        routes,
        wg,
        shared.clone(),
        cfg.route_sync_interval,
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping; routes stay in place"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: stopping; routes stay in place"),
        Some(res) = tasks.join_next() => error!(?res, "a component stopped unexpectedly"),
    }
    tasks.shutdown().await;
    let _ = std::fs::remove_file(&cfg.socket_path);
    Ok(())
}

async fn watch_nodes(api: Api<DynamicObject>, shared: Arc<Shared>) {
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut buffer: Option<NodeTable> = None;
    loop {
        match stream.next().await {
            Some(Ok(ev)) => {
                let mut s = shared.lock();
                let own_name = s.own.name.clone();
                let is_own =
                    |o: &DynamicObject| o.metadata.name.as_deref() == Some(own_name.as_str());
                match ev {
                    watcher::Event::Init => buffer = Some(NodeTable::default()),
                    watcher::Event::InitApply(o) => {
                        if is_own(&o) {
                            s.own_object = Some(o.clone());
                        }
                        buffer.get_or_insert_with(NodeTable::default).apply(&o);
                    }
                    watcher::Event::InitDone => {
                        let table = buffer.take().unwrap_or_default();
                        if !table.nodes.contains_key(&own_name)
                            && !table.invalid.contains_key(&own_name)
                        {
                            s.own_object = None;
                        }
                        s.table = table;
                        s.synced = true;
                        s.kubernetes = ComponentStatus {
                            state: Health::Ok,
                            message: "Ok".into(),
                        };
                    }
                    watcher::Event::Apply(o) => {
                        if is_own(&o) {
                            s.own_object = Some(o.clone());
                        }
                        s.table.apply(&o);
                    }
                    watcher::Event::Delete(o) => {
                        if is_own(&o) {
                            s.own_object = None;
                        }
                        s.table
                            .delete(o.metadata.name.as_deref().unwrap_or_default());
                    }
                }
                drop(s);
                shared.trigger();
            }
            Some(Err(e)) => {
                warn!(error = %e, "watching CiliumNodes failed; retrying");
                shared.lock().kubernetes = ComponentStatus {
                    state: Health::Failure,
                    message: format!("watching CiliumNodes: {e}"),
                };
            }
            None => return,
        }
    }
}

/// Keeps the own CiliumNode as this agent says it should be: on start, whenever the object
/// changes (someone edited or deleted it) and every minute.
async fn publish_own_node(api: Api<DynamicObject>, shared: Arc<Shared>) {
    let mut force = true;
    loop {
        let wake = shared.wake.notified();
        let (own, current) = {
            let s = shared.lock();
            let current = s.synced
                && s.own_object
                    .as_ref()
                    .is_some_and(|o| s.own.is_published_in(o));
            (s.own.clone(), current)
        };
        // Only talk to the API server when the cached object disagrees (or on the timer).
        if current && !force {
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(Duration::from_secs(60)) => force = true,
            }
            continue;
        }
        force = false;
        match own.publish(&api).await {
            Ok(()) => {
                let mut s = shared.lock();
                if !s.published {
                    info!(node = %own.name, "CiliumNode published");
                }
                s.published = true;
                // Adopt pod CIDRs an operator assigned when none were configured.
                if s.own.pod_cidrs.is_empty()
                    && let Some(n) = s.table.nodes.get(&own.name)
                {
                    s.own.pod_cidrs = n.pod_cidrs.iter().map(ToString::to_string).collect();
                }
            }
            Err(e) => {
                warn!(node = %own.name, error = %e, "publishing the CiliumNode failed; retrying");
                {
                    let mut s = shared.lock();
                    s.published = false;
                    s.kubernetes = ComponentStatus {
                        state: Health::Failure,
                        message: format!("publishing CiliumNode {}: {e}", own.name),
                    };
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => force = true,
        }
    }
}

/// Peers first, then routes: a remote pod CIDR is routed into the WireGuard device only once
/// the device knows where to send it.
async fn reconcile_datapath(
    routes: RouteManager,
    wg: Option<Arc<wireguard::WireGuard>>,
    shared: Arc<Shared>,
    every: Duration,
) {
    loop {
        let wake = shared.wake.notified();
        let (desired, synced, claims, previous) = {
            let s = shared.lock();
            let device = wg.as_ref().map(|w| w.ifindex);
            let previous = s.wg.as_ref().map(|v| v.peers.clone()).unwrap_or_default();
            (
                routes::desired(&s.table, &s.own.name, device),
                s.synced,
                wg.as_ref().map(|w| w.claims(&s.table, &s.own.name)),
                previous,
            )
        };
        if let (Some(w), Some(claims), true) = (&wg, claims, synced) {
            match w.reconcile(claims, &previous).await {
                Ok((peers, device)) => {
                    shared.lock().wg = Some(WgView {
                        backend: w.backend,
                        public_key: w.public_key.to_base64(),
                        node_encryption: w.node_encryption,
                        peers,
                        device,
                    });
                }
                Err(e) => warn!(error = %e, "WireGuard peer reconciliation failed; retrying"),
            }
        }
        // Before the first full list, an empty table would remove every route: wait.
        if synced {
            match routes.reconcile(&desired).await {
                Ok(_) => {
                    let installed = routes.installed().await.unwrap_or_default();
                    let mut s = shared.lock();
                    s.routes = installed;
                    s.route_errors.clear();
                }
                Err(e) => {
                    warn!(error = %e, "route reconciliation failed; retrying");
                    {
                        let mut s = shared.lock();
                        let gw_to_node: BTreeMap<IpAddr, String> = s
                            .table
                            .nodes
                            .values()
                            .filter_map(|n| n.internal_ip.map(|ip| (ip, n.name.clone())))
                            .collect();
                        if let routes::RouteError::Add {
                            hop: routes::NextHop::Gateway(gateway),
                            ..
                        } = &e
                            && let Some(n) = gw_to_node.get(&IpAddr::V4(*gateway))
                        {
                            s.route_errors.insert(n.clone(), e.to_string());
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        // With WireGuard, refresh handshake ages and counters for status more often.
        let tick = if wg.is_some() {
            every.min(Duration::from_secs(5))
        } else {
            every
        };
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Local endpoints → identities and CiliumEndpoint objects; this node's CiliumEndpoints that no
/// endpoint backs any more are removed (also those left from before a restart).
async fn reconcile_endpoints(client: kube::Client, shared: Arc<Shared>, encrypted: bool) {
    let ids: Api<DynamicObject> = Api::all_with(client.clone(), &identity::identity_resource());
    let mut by_labels: BTreeMap<BTreeMap<String, String>, u32> = BTreeMap::new();
    loop {
        let wake = shared.endpoints_changed.notified();
        let (eps, node, node_ip, synced) = {
            let s = shared.lock();
            (
                s.endpoints.list(),
                s.own.name.clone(),
                s.own.internal_ip.to_string(),
                s.synced,
            )
        };
        let mut ok = synced;
        if synced {
            let mut assigned = BTreeMap::new();
            for ep in &eps {
                let labels = identity::security_labels(ep);
                let id = match by_labels.get(&labels) {
                    Some(id) => *id,
                    None => match identity::allocate(&ids, &labels).await {
                        Ok(id) => {
                            by_labels.insert(labels.clone(), id);
                            id
                        }
                        Err(e) => {
                            warn!(endpoint = %format!("{}/{}", ep.namespace, ep.name), error = %e, "no identity yet; retrying");
                            ok = false;
                            continue;
                        }
                    },
                };
                let cep = identity::cilium_endpoint(
                    ep,
                    id,
                    &labels,
                    &node,
                    &node_ip,
                    if encrypted {
                        wireguard::STATIC_ENCRYPT_KEY
                    } else {
                        0
                    },
                );
                if let Err(e) = identity::publish_endpoint(&client, &cep).await {
                    warn!(endpoint = %format!("{}/{}", ep.namespace, ep.name), error = %e, "publishing the CiliumEndpoint failed; retrying");
                    ok = false;
                }
                assigned.insert((ep.namespace.clone(), ep.name.clone()), id);
            }
            let keep: Vec<(String, String)> = eps
                .iter()
                .map(|e| (e.namespace.clone(), e.name.clone()))
                .collect();
            if let Err(e) = identity::remove_stale_endpoints(&client, &node, &keep).await {
                warn!(error = %e, "removing stale CiliumEndpoints failed; retrying");
                ok = false;
            }
            let changed = {
                let mut s = shared.lock();
                let changed = s.identities != assigned;
                s.identities = assigned;
                changed
            };
            if changed {
                // New identities: the datapath can attach and policies may select them.
                shared.policy_changed();
            }
        }
        let retry = if ok {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(retry) => {}
        }
    }
}
