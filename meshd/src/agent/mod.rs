//! `meshd agent`: builds the agent's concerns and wires them together, as ztunnel's `app.rs`.
//! Each concern owns its state and is the only writer of it (see [`state`]): the node watcher
//! owns the node table, the publisher the own CiliumNode, the local API the local endpoints,
//! the identity reconciler the identities, each policy watcher its kind, the compiler the
//! compiled policy, the encryption/route reconciler the backend's view and the routes, the
//! enforcer the datapath. Every loop is level-triggered: it recomputes what should be from
//! snapshots and applies the difference, on every change and on a timer. A task that ends
//! ends the agent, with a non-zero status and the reason in the log.

mod api;
pub mod encryption;
pub mod endpoints;
pub mod enforce;
pub mod identity;
pub mod nodes;
pub mod policy;
pub mod routes;
pub mod state;
pub mod strict;
pub mod watch;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use kube::api::{Api, DynamicObject};
use meshd_api::{ComponentStatus, EndpointSpec, Health, NodeStatus, Status};
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::config::{AgentConfig, ConfigError};
use encryption::{EncryptionBackend, EncryptionError, NodeState};
use endpoints::{EndpointError, EndpointStore};
use nodes::{NodeTable, OwnNode};
use policy::{IdentitySource, PolicyKind, PolicySource, PolicyView};
use routes::{RouteError, RouteManager};
use state::{Reader, SourceGone, Watched, Writer, any_change};
use watch::{Event, Watcher};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("creating the state directory {path} (state-dir): {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no node-name given and the hostname is unreadable: {0}")]
    Hostname(#[source] nix::Error),
    #[error("the kubeconfig {path} (k8s-kubeconfig-path) is unusable: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no k8s-kubeconfig-path given and not running in a cluster: {0}")]
    InCluster(String),
    #[error("building the Kubernetes client: {0}")]
    KubeClient(String),
    #[error("opening a netlink socket failed: {0}; the agent needs CAP_NET_ADMIN")]
    Netlink(#[source] std::io::Error),
    #[error("finding the node's address: {0}; set ipv4-node")]
    NodeIp(String),
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error(transparent)]
    Endpoints(#[from] EndpointError),
    #[error(transparent)]
    Encryption(#[from] EncryptionError),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("watching {kind}: {source}; the agent cannot stay current without it")]
    Watch {
        kind: &'static str,
        #[source]
        source: watch::WatchError,
    },
    #[error(transparent)]
    SourceGone(#[from] SourceGone),
    #[error("the agent's {task} task ended unexpectedly")]
    TaskEnded { task: &'static str },
    #[error("the agent's {task} task failed: {source}")]
    TaskFailed {
        task: &'static str,
        #[source]
        source: Box<AgentError>,
    },
    #[error("the agent's {task} task panicked: {message}")]
    TaskPanicked { task: &'static str, message: String },
}

/// The node table and what the node watcher knows about the own object. Written by the node
/// watcher alone.
#[derive(Debug, Clone, Default)]
pub struct NodesView {
    pub table: NodeTable,
    /// Every CiliumNode was listed at least once.
    pub synced: bool,
    /// The own CiliumNode as last seen.
    pub own_object: Option<DynamicObject>,
    /// Why watching fails, while it does.
    pub error: Option<String>,
}

/// What this node publishes, and whether it is published. Written by the publisher alone.
#[derive(Debug, Clone)]
pub struct OwnView {
    pub own: OwnNode,
    pub published: bool,
    pub error: Option<String>,
}

/// meshd's routes as the kernel has them, and per node why its routes are not installed.
/// Written by the route reconciler alone.
#[derive(Debug, Clone, Default)]
pub struct RoutesView {
    pub installed: routes::RouteSet,
    pub errors: BTreeMap<String, String>,
}

/// Each other node's encryption state. Written by the encryption reconciler alone.
#[derive(Debug, Clone, Default)]
pub struct EncryptionView {
    pub nodes: BTreeMap<String, NodeState>,
    pub error: Option<String>,
}

/// Local endpoint (namespace, name) → its security identity. Written by the identity reconciler.
pub type Identities = BTreeMap<(String, String), u32>;

/// Local endpoints as the CNI plugin reported them, persisted in the state directory. Written
/// by the local API alone; the mutex only orders the API's own writes (file and snapshot), no
/// reader ever takes it.
pub struct LocalEndpoints {
    store: Mutex<EndpointStore>,
    out: Writer<Vec<EndpointSpec>>,
}

impl LocalEndpoints {
    fn new(store: EndpointStore) -> Self {
        let (out, _) = state::channel(store.list());
        Self {
            store: Mutex::new(store),
            out,
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, EndpointStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(&self, namespace: &str, name: &str, ep: EndpointSpec) -> Result<(), EndpointError> {
        let mut store = self.store();
        store.put(namespace, name, ep)?;
        self.out.set(store.list());
        Ok(())
    }

    pub fn delete(&self, namespace: &str, name: &str) -> Result<bool, EndpointError> {
        let mut store = self.store();
        let removed = store.delete(namespace, name)?;
        self.out.set(store.list());
        Ok(removed)
    }

    pub fn reader(&self) -> Reader<Vec<EndpointSpec>> {
        self.out.reader()
    }
}

/// What the local API reads: a reader of every concern, the backend for fresh status, and the
/// local endpoints it writes.
pub struct Shared {
    started: Instant,
    backend: Arc<dyn EncryptionBackend>,
    nodes: Reader<NodesView>,
    own: Reader<OwnView>,
    routes: Reader<RoutesView>,
    encryption: Reader<EncryptionView>,
    pub local: LocalEndpoints,
    identities: Reader<Identities>,
    policy: Reader<PolicyView>,
    datapath: Reader<ComponentStatus>,
    strict: Reader<ComponentStatus>,
    /// Datapath events for `meshd monitor`.
    pub monitor: tokio::sync::broadcast::Sender<meshd_api::MonitorEvent>,
}

impl Shared {
    pub fn policy_status(&self) -> meshd_api::PolicyStatus {
        let view = self.policy.peek();
        let identities = self.identities.peek();
        let datapath = self.datapath.peek();
        let objects = view
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
        let endpoints = view
            .compiled
            .iter()
            .map(|((ns, name), c)| meshd_api::EndpointPolicy {
                endpoint: format!("{ns}/{name}"),
                identity: identities.get(&(ns.clone(), name.clone())).copied(),
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
            enforcement: match datapath.state {
                Health::Ok => format!("enforced by the eBPF datapath ({})", datapath.message),
                _ => format!("NOT enforced: {}", datapath.message),
            },
            objects,
            endpoints,
        }
    }

    /// Local endpoints with the identities allocated for them.
    pub fn endpoints(&self) -> Vec<EndpointSpec> {
        let identities = self.identities.peek();
        self.local
            .reader()
            .peek()
            .iter()
            .cloned()
            .map(|mut e| {
                e.identity = identities
                    .get(&(e.namespace.clone(), e.name.clone()))
                    .copied();
                e
            })
            .collect()
    }

    /// Status with the encryption device read just now.
    pub async fn status(&self) -> Status {
        let report = self.backend.report().await;
        let nodes = self.nodes.peek();
        let own = self.own.peek();
        let routes = self.routes.peek();
        let encryption = self.encryption.peek();
        let kubernetes = if let Some(e) = nodes.error.as_ref().or(own.error.as_ref()) {
            ComponentStatus {
                state: Health::Failure,
                message: e.clone(),
            }
        } else if !nodes.synced {
            ComponentStatus {
                state: Health::Degraded,
                message: "listing CiliumNodes".into(),
            }
        } else if !own.published {
            ComponentStatus {
                state: Health::Degraded,
                message: "publishing the own CiliumNode".into(),
            }
        } else {
            ComponentStatus {
                state: Health::Ok,
                message: "Ok".into(),
            }
        };
        let node_status = nodes
            .table
            .others(&own.own.name)
            .map(|n| {
                let installed: Vec<_> = n
                    .pod_cidrs
                    .iter()
                    .filter(
                        |c| matches!(c, ipnet::IpNet::V4(v4) if routes.installed.contains_key(&(*v4, 0))),
                    )
                    .map(ToString::to_string)
                    .collect();
                let refused = nodes.table.refused.get(&n.name);
                let state = if let Some(e) = routes.errors.get(&n.name) {
                    ComponentStatus {
                        state: Health::Failure,
                        message: e.clone(),
                    }
                } else if let Some(refused) = refused {
                    ComponentStatus {
                        state: Health::Failure,
                        message: format!(
                            "refused: {}{}",
                            refused
                                .iter()
                                .map(|e| format!("{}: {}", e.field, e.message))
                                .collect::<Vec<_>>()
                                .join("; "),
                            if installed.is_empty() {
                                String::new()
                            } else {
                                format!(" (routed: {})", installed.join(","))
                            }
                        ),
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
                    routes: state,
                    encryption: encryption.nodes.get(&n.name).map(ToString::to_string),
                }
            })
            .chain(nodes.table.invalid.values().map(|e| NodeStatus {
                name: e.node.clone(),
                addresses: vec![],
                pod_cidrs: vec![],
                routes: ComponentStatus {
                    state: Health::Failure,
                    message: format!("invalid: {}: {}", e.field, e.message),
                },
                encryption: None,
            }))
            .collect();
        Status {
            node_name: own.own.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            kubernetes,
            node_addresses: vec![own.own.internal_ip],
            pod_cidrs: own.own.pod_cidrs.clone(),
            encryption: report.line,
            encryption_health: report.health,
            strict_mode: (*self.strict.peek()).clone(),
            datapath: (*self.datapath.peek()).clone(),
            wireguard: report.wireguard,
            nodes: node_status,
            endpoints: self.local.reader().peek().len(),
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }
}

async fn kube_client(cfg: &AgentConfig) -> Result<kube::Client, AgentError> {
    let config = match &cfg.k8s_kubeconfig_path {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).map_err(|e| AgentError::Kubeconfig {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| AgentError::Kubeconfig {
                    path: path.clone(),
                    message: e.to_string(),
                })?
        }
        None => kube::Config::incluster().map_err(|e| AgentError::InCluster(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| AgentError::KubeClient(e.to_string()))
}

/// The first global IPv4 address of a non-loopback interface.
async fn detect_node_ip() -> Result<Ipv4Addr, AgentError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(AgentError::Netlink)?;
    let task = tokio::spawn(conn);
    let mut dump = handle.address().get().execute();
    let mut found = None;
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(|e| AgentError::NodeIp(format!("listing addresses: {e}")))?
    {
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
    found.ok_or_else(|| AgentError::NodeIp("no IPv4 address found on this node".into()))
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The agent's tasks; the first to end, for whatever reason, ends the agent.
struct Tasks {
    set: tokio::task::JoinSet<Result<(), AgentError>>,
    names: BTreeMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn new() -> Self {
        Self {
            set: tokio::task::JoinSet::new(),
            names: BTreeMap::new(),
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), AgentError>> + Send + 'static,
    ) {
        let handle = self
            .set
            .spawn(task.instrument(info_span!("task", task = name)));
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end and says why, as an error: no task is meant to end.
    async fn first_ended(&mut self) -> AgentError {
        match self.set.join_next_with_id().await {
            Some(Ok((id, result))) => {
                let task = self.names.get(&id).copied().unwrap_or("unnamed");
                match result {
                    Ok(()) => AgentError::TaskEnded { task },
                    Err(e) => AgentError::TaskFailed {
                        task,
                        source: Box::new(e),
                    },
                }
            }
            Some(Err(e)) => {
                let task = self.names.get(&e.id()).copied().unwrap_or("unnamed");
                AgentError::TaskPanicked {
                    task,
                    message: e.to_string(),
                }
            }
            None => AgentError::TaskEnded { task: "every" },
        }
    }

    async fn shutdown(&mut self) {
        self.set.shutdown().await;
    }
}

pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    cfg.validate()?;
    let node_name = match &cfg.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .map_err(AgentError::Hostname)?
            .to_string_lossy()
            .into_owned(),
    };
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let ip = match cfg.ipv4_node {
        Some(ip) => ip,
        None => detect_node_ip().await?,
    };
    let client = kube_client(&cfg).await?;
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &nodes::cilium_node_resource());
    let routes = RouteManager::new()?;
    let local = LocalEndpoints::new(EndpointStore::load(&cfg.state_dir)?);
    // Refuse at start on a kernel the datapath cannot work with, naming what is missing.
    let attach_mode = if cfg.enable_policy == "never" {
        None
    } else {
        let mode = datapath::AttachMode::for_running_kernel()?;
        info!(%mode, "eBPF programs attach with {mode}");
        Some(mode)
    };
    let backend = encryption::start(&cfg, ip).await?;
    let pin_dir = cfg.bpf_root.join("meshd");
    let own = OwnNode {
        name: node_name.clone(),
        internal_ip: IpAddr::V4(ip),
        pod_cidrs: cfg.ipv4_range.iter().map(ToString::to_string).collect(),
        boot_id: boot_id(),
        encryption: backend.publication(),
    };
    info!(node = %node_name, %ip, pod_cidrs = ?own.pod_cidrs, encryption = ?backend.mode(), "meshd agent starting");

    // One writer per concern; the readers go to whoever needs them.
    let (nodes_w, nodes_r) = state::channel(NodesView {
        // The node ids of an earlier run, read back from the pinned ipcache.
        table: NodeTable::new(
            enforce::pinned_node_ids(&pin_dir),
            nodes::LocalClaims {
                name: node_name.clone(),
                addresses: vec![IpAddr::V4(ip)],
                pod_cidrs: cfg
                    .ipv4_range
                    .iter()
                    .map(|c| ipnet::IpNet::V4(*c))
                    .collect(),
                cluster_pod_range: cfg.cluster_pool_ipv4_cidr.map(ipnet::IpNet::V4),
            },
        ),
        ..Default::default()
    });
    let (own_w, own_r) = state::channel(OwnView {
        own,
        published: false,
        error: None,
    });
    let (routes_w, routes_r) = state::channel(RoutesView::default());
    let routes_for_strict = routes_r.clone();
    let (enc_w, enc_r) = state::channel(EncryptionView::default());
    let (ids_w, ids_r) = state::channel(Identities::new());
    let (policy_w, policy_r) = state::channel(PolicyView::default());
    let (datapath_w, datapath_r) = state::channel(ComponentStatus {
        state: Health::Disabled,
        message: "starting".into(),
    });
    let (strict_w, strict_r) = state::channel(ComponentStatus {
        state: Health::Disabled,
        message: "Disabled".into(),
    });
    let (idsrc_w, idsrc_r) = state::channel(IdentitySource::default());
    let (cluster_w, cluster_r) = state::channel(enforce::ClusterEndpoints::default());
    let local_r = local.reader();

    let shared = Arc::new(Shared {
        started: Instant::now(),
        backend: backend.clone(),
        nodes: nodes_r.clone(),
        own: own_r.clone(),
        routes: routes_r,
        encryption: enc_r,
        local,
        identities: ids_r.clone(),
        policy: policy_r.clone(),
        datapath: datapath_r,
        strict: strict_r,
        monitor: tokio::sync::broadcast::channel(1024).0,
    });

    let listener = api::bind(&cfg.socket_path).await?;
    let mut tasks = Tasks::new();
    tasks.spawn("local API", api::serve(listener, shared.clone()));
    tasks.spawn(
        "CiliumNode watcher",
        watch_nodes(api.clone(), node_name.clone(), nodes_w),
    );
    tasks.spawn(
        "CiliumNode publisher",
        publish_own_node(api.clone(), nodes_r.clone(), own_w),
    );
    tasks.spawn(
        "identity reconciler",
        reconcile_endpoints(
            client.clone(),
            own_r.clone(),
            nodes_r.clone(),
            local_r.clone(),
            ids_w,
        ),
    );
    let mut sources = Vec::new();
    for kind in [
        PolicyKind::CiliumNetworkPolicy,
        PolicyKind::CiliumClusterwideNetworkPolicy,
        PolicyKind::NetworkPolicy,
    ] {
        let (w, r) = state::channel(PolicySource::default());
        sources.push((kind, r));
        tasks.spawn(kind.kind(), policy::watch_policies(client.clone(), kind, w));
    }
    tasks.spawn(
        "CiliumIdentity watcher",
        policy::watch_identities(client.clone(), idsrc_w),
    );
    tasks.spawn(
        "policy compiler",
        policy::recompile_loop(sources, idsrc_r, local_r.clone(), policy_w),
    );
    let strict = strict::Settings {
        enabled: cfg.enable_encryption_strict_mode,
        cidrs: cfg.strict_mode_cidrs()?,
        cluster_pod_range: cfg.cluster_pool_ipv4_cidr.map(ipnet::IpNet::V4),
        own_cidrs: cfg
            .ipv4_range
            .iter()
            .map(|c| ipnet::IpNet::V4(*c))
            .collect(),
        allow_remote_node: cfg.encryption_strict_mode_allow_remote_node_identities,
    };
    if attach_mode.is_some() {
        tasks.spawn(
            "strict mode",
            strict::strict_loop(
                pin_dir.clone(),
                strict.clone(),
                backend.clone(),
                nodes_r.clone(),
                local_r.clone(),
                routes_for_strict,
                strict_w,
            ),
        );
    } else {
        drop(strict_w);
    }
    if let Some(mode) = attach_mode {
        tasks.spawn(
            "CiliumEndpoint watcher",
            enforce::watch_endpoints(client.clone(), cluster_w),
        );
        tasks.spawn(
            "datapath",
            enforce::enforce_loop(
                enforce::Enforcer::new(pin_dir, mode),
                enforce::Sources {
                    own: own_r.clone(),
                    nodes: nodes_r.clone(),
                    cluster: cluster_r,
                    local: local_r,
                    identities: ids_r,
                    policy: policy_r,
                },
                datapath_w,
                shared.monitor.clone(),
            ),
        );
    } else {
        datapath_w.set(ComponentStatus {
            state: Health::Disabled,
            message: "enable-policy=never".into(),
        });
        drop(cluster_w);
    }
    tasks.spawn(
        "encryption and routes",
        reconcile_encryption_and_routes(
            backend,
            routes,
            nodes_r,
            own_r,
            enc_w,
            routes_w,
            (cfg.route_sync_interval, strict),
        ),
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signals)?;
    let result = tokio::select! {
        _ = term.recv() => {
            info!("SIGTERM: stopping; routes stay in place");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            info!("interrupted: stopping; routes stay in place");
            Ok(())
        }
        e = tasks.first_ended() => {
            error!(error = %e, "an agent task ended; stopping the agent (routes stay in place)");
            Err(e)
        }
    };
    tasks.shutdown().await;
    let _ = std::fs::remove_file(&cfg.socket_path);
    result
}

/// What the CiliumNode watcher's pump hands the table keeper.
enum NodeWatch {
    Event(Box<Event>),
    /// A failure the watcher recovers from (for status).
    Error(String),
}

/// Watches CiliumNodes into the node table. The watcher runs as a pump into a channel, and the
/// table keeper takes everything that has arrived since its last pass, applies it with one
/// settling pass and publishes one snapshot: a join storm of thousands of nodes costs a few
/// passes, not one full pass (and table copy) per object.
async fn watch_nodes(
    api: Api<DynamicObject>,
    own_name: String,
    out: Writer<NodesView>,
) -> Result<(), AgentError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<NodeWatch>();
    let pump = async move {
        let mut watch = Watcher::new(api);
        loop {
            let ev = watch
                .next_or_end("CiliumNode", |e| {
                    let _ = tx.send(NodeWatch::Error(format!("watching CiliumNodes: {e}")));
                })
                .await?;
            if tx.send(NodeWatch::Event(Box::new(ev))).is_err() {
                return Ok::<(), AgentError>(());
            }
        }
    };
    let keeper = async move {
        let mut view: NodesView = (*out.current()).clone();
        let mut buffer: Option<Vec<DynamicObject>> = None;
        let is_own = |o: &DynamicObject| o.metadata.name.as_deref() == Some(own_name.as_str());
        while let Some(first) = rx.recv().await {
            // Let what follows arrive (the pump runs meanwhile): one pass per window, so a
            // storm of events is not a storm of passes that starves the API server's stream.
            tokio::time::sleep(state::COALESCE).await;
            let mut batch = vec![first];
            while batch.len() < 100_000
                && let Ok(m) = rx.try_recv()
            {
                batch.push(m);
            }
            let mut changed = false;
            let mut pending: Vec<Event> = Vec::new();
            let flush = |view: &mut NodesView, pending: &mut Vec<Event>| {
                if pending.is_empty() {
                    return;
                }
                let changes = pending.iter().filter_map(|m| match m {
                    Event::Apply(o) => Some(nodes::TableChange::Apply(o)),
                    Event::Delete(o) => Some(nodes::TableChange::Delete(
                        o.metadata.name.as_deref().unwrap_or_default(),
                    )),
                    _ => None,
                });
                view.table.apply_batch(changes);
                pending.clear();
            };
            for m in batch {
                let ev = match m {
                    NodeWatch::Error(message) => {
                        changed |= view.error.as_ref() != Some(&message);
                        view.error = Some(message);
                        continue;
                    }
                    NodeWatch::Event(ev) => *ev,
                };
                match ev {
                    Event::Init => buffer = Some(Vec::new()),
                    Event::InitApply(o) => buffer.get_or_insert_with(Vec::new).push(o),
                    Event::InitDone => {
                        flush(&mut view, &mut pending);
                        let objects = buffer.take().unwrap_or_default();
                        view.own_object = objects.iter().find(|o| is_own(o)).cloned();
                        view.table.replace_all(&objects);
                        view.synced = true;
                        view.error = None;
                        changed = true;
                    }
                    ev @ (Event::Apply(_) | Event::Delete(_)) => {
                        match &ev {
                            Event::Apply(o) if is_own(o) => view.own_object = Some(o.clone()),
                            Event::Delete(o) if is_own(o) => view.own_object = None,
                            _ => {}
                        }
                        view.error = None;
                        pending.push(ev);
                        changed = true;
                    }
                }
            }
            flush(&mut view, &mut pending);
            if changed {
                out.set(view.clone());
            }
        }
        Ok::<(), AgentError>(())
    };
    tokio::select! {
        r = pump => r,
        r = keeper => r,
    }
}

/// Keeps the own CiliumNode as this agent says it should be: on start, whenever the object
/// changes (someone edited or deleted it) and every minute.
async fn publish_own_node(
    api: Api<DynamicObject>,
    mut nodes: Reader<NodesView>,
    out: Writer<OwnView>,
) -> Result<(), AgentError> {
    let mut force = true;
    loop {
        let view = nodes.get();
        let mut own = out.current().own.clone();
        // Adopt pod CIDRs an operator assigned when none were configured.
        if own.pod_cidrs.is_empty()
            && let Some(n) = view.table.nodes.get(&own.name)
            && !n.pod_cidrs.is_empty()
        {
            own.pod_cidrs = n.pod_cidrs.iter().map(ToString::to_string).collect();
            info!(node = %own.name, pod_cidrs = ?own.pod_cidrs, "adopting the pod CIDRs assigned to this node");
        }
        let current = view.synced
            && view
                .own_object
                .as_ref()
                .is_some_and(|o| own.is_published_in(o));
        // Only talk to the API server when the cached object disagrees (or on the timer).
        if !current || force {
            force = false;
            match own.publish(&api).await {
                Ok(()) => {
                    if !out.current().published {
                        info!(node = %own.name, "CiliumNode published");
                    }
                    out.set(OwnView {
                        own,
                        published: true,
                        error: None,
                    });
                }
                Err(e) => {
                    warn!(node = %own.name, error = %e, "publishing the CiliumNode failed; retrying");
                    out.set(OwnView {
                        error: Some(format!("publishing CiliumNode {}: {e}", own.name)),
                        own,
                        published: false,
                    });
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        } else if out.current().own != own {
            out.update(|v| {
                v.own = own;
                true
            });
        }
        if !any_change(&mut [&mut nodes], Duration::from_secs(60)).await? {
            force = true;
        }
    }
}

/// Encryption first, then routes: a remote pod CIDR is routed into the tunnel only once the
/// backend knows where to send it.
async fn reconcile_encryption_and_routes(
    backend: Arc<dyn EncryptionBackend>,
    routes: RouteManager,
    mut nodes: Reader<NodesView>,
    mut own: Reader<OwnView>,
    enc_out: Writer<EncryptionView>,
    routes_out: Writer<RoutesView>,
    (every, strict): (Duration, strict::Settings),
) -> Result<(), AgentError> {
    let mut underlay: Option<(u32, Instant)> = None;
    loop {
        let view = nodes.get();
        let own_view = own.get();
        let own_name = own_view.own.name.clone();
        let node_ip = match own_view.own.internal_ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        // Before the first full list, an empty table would remove every peer and route: wait.
        if view.synced {
            match backend.reconcile(&view.table, &own_name).await {
                Ok(states) => enc_out.set(EncryptionView {
                    nodes: states,
                    error: None,
                }),
                Err(e) => {
                    warn!(error = %e, "encryption reconciliation failed; retrying");
                    enc_out.update(|v| {
                        v.error = Some(e.to_string());
                        true
                    });
                }
            }
            // The underlay's MTU changes rarely: read it again every route-sync interval.
            if underlay.is_none_or(|(_, at)| at.elapsed() >= every) {
                let mtu = match routes.underlay_mtu(node_ip).await {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "assuming an underlay MTU of 1500");
                        1500
                    }
                };
                underlay = Some((mtu, Instant::now()));
            }
            let underlay_mtu = underlay.map_or(1500, |(m, _)| m);
            // Strict mode's IPv4 CIDRs get a backstop too, unless the node's own address is in
            // one (its host traffic through the default route would be cut).
            let strict_backstops: Vec<ipnet::Ipv4Net> = if strict.enabled {
                strict::prefixes(&strict, &view.table)
                    .into_iter()
                    .filter_map(|c| match c {
                        ipnet::IpNet::V4(v4) if !v4.contains(&node_ip) => Some(v4),
                        _ => None,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let desired = routes::desired(
                &view.table,
                &own_name,
                backend.as_ref(),
                underlay_mtu,
                &strict_backstops,
            );
            match routes.reconcile(&desired).await {
                Ok((installed, failed)) => {
                    let mut errors = BTreeMap::new();
                    for e in &failed {
                        warn!(error = %e, "a route change failed; retrying");
                        let dst = match e {
                            RouteError::Add { dst, .. } | RouteError::Remove { dst, .. } => *dst,
                            _ => continue,
                        };
                        if let Some(node) = view.table.others(&own_name).find(|n| {
                            n.pod_cidrs
                                .iter()
                                .any(|c| matches!(c, ipnet::IpNet::V4(v4) if *v4 == dst))
                        }) {
                            errors.insert(node.name.clone(), e.to_string());
                        }
                    }
                    let retry = !failed.is_empty();
                    routes_out.set(RoutesView { installed, errors });
                    if retry {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "listing routes failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        // With encryption, every second: a tunnel device that died or was deleted is noticed and
        // brought back within one (its routes follow on the same pass), and handshake ages
        // and counters stay fresh.
        let tick = if backend.mode() == encryption::Mode::Disabled {
            every
        } else {
            every.min(Duration::from_secs(1))
        };
        any_change(&mut [&mut nodes, &mut own], tick).await?;
    }
}

/// Local endpoints → identities and CiliumEndpoint objects; this node's CiliumEndpoints that no
/// endpoint backs any more are removed (also those left from before a restart).
async fn reconcile_endpoints(
    client: kube::Client,
    mut own: Reader<OwnView>,
    mut nodes: Reader<NodesView>,
    mut local: Reader<Vec<EndpointSpec>>,
    out: Writer<Identities>,
) -> Result<(), AgentError> {
    let ids: Api<DynamicObject> = Api::all_with(client.clone(), &identity::identity_resource());
    let mut by_labels: BTreeMap<BTreeMap<String, String>, u32> = BTreeMap::new();
    loop {
        let eps = local.get();
        let own_view = own.get();
        let synced = nodes.get().synced;
        let (node, node_ip) = (
            own_view.own.name.clone(),
            own_view.own.internal_ip.to_string(),
        );
        let encrypt_key = own_view.own.encryption.encryption_key.unwrap_or(0);
        let mut ok = synced;
        if synced {
            let mut assigned = BTreeMap::new();
            for ep in eps.iter() {
                let endpoint = format!("{}/{}", ep.namespace, ep.name);
                let labels = identity::security_labels(ep);
                let id = match by_labels.get(&labels) {
                    Some(id) => *id,
                    None => match identity::allocate(&ids, &labels).await {
                        Ok(id) => {
                            by_labels.insert(labels.clone(), id);
                            id
                        }
                        Err(e) => {
                            warn!(%endpoint, error = %e, "no identity yet; retrying");
                            ok = false;
                            continue;
                        }
                    },
                };
                let cep = identity::cilium_endpoint(ep, id, &labels, &node, &node_ip, encrypt_key);
                if let Err(e) = identity::publish_endpoint(&client, &cep).await {
                    warn!(%endpoint, error = %e, "publishing the CiliumEndpoint failed; retrying");
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
            // New identities wake the policy compiler and the datapath.
            out.update(|v| {
                let changed = *v != assigned;
                *v = assigned;
                changed
            });
        }
        let retry = if ok {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(1)
        };
        let mut watched: [&mut dyn Watched; 2] = [&mut local, &mut nodes];
        // Node table changes matter only until the first list.
        if synced {
            any_change(&mut watched[..1], retry).await?;
        } else {
            any_change(&mut watched, retry).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_ends_the_agent_with_its_name() {
        let mut tasks = Tasks::new();
        tasks.spawn("forever", futures::future::pending());
        tasks.spawn("watcher", async {
            Err(AgentError::Watch {
                kind: "CiliumNode",
                source: watch::WatchError::Status {
                    code: 403,
                    reason: "Forbidden".into(),
                    message: "no".into(),
                },
            })
        });
        let e = tasks.first_ended().await;
        assert_eq!(
            e.to_string(),
            "the agent's watcher task failed: watching CiliumNode: the API server ended the watch: 403 Forbidden: no; the agent cannot stay current without it"
        );
        let mut tasks = Tasks::new();
        tasks.spawn("quiet", async { Ok(()) });
        assert!(matches!(
            tasks.first_ended().await,
            AgentError::TaskEnded { task: "quiet" }
        ));
        let mut tasks = Tasks::new();
        tasks.spawn("boom", async { panic!("boom") });
        assert!(matches!(
            tasks.first_ended().await,
            AgentError::TaskPanicked { task: "boom", .. }
        ));
    }
}
