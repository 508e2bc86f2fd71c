//! The WireGuard backend (kernel module or userspace device): chooses the device, owns the key,
//! keeps the userspace device process running (adopting one that survived an agent restart),
//! sets the interface up with the right MTU, and reconciles one peer per other node from the
//! node table.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::TryStreamExt as _;
use futures::future::BoxFuture;
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::link::LinkAttribute;
use tracing::{Instrument as _, info, info_span, warn};
use wg::key::{PrivateKey, PublicKey};
use wg::peers::{NodeClaim, PeerSet};
use wg::uapi::{self, DeviceInfo, DeviceUpdate};

use super::{EncryptionBackend, EncryptionError, EncryptionReport, Mode, NodeState, Reach};
use crate::agent::nodes::{Node, NodeTable, Publication};
use crate::agent::routes::NextHop;
use crate::config::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error(
        "the kernel has no WireGuard module (modprobe wireguard failed) and \
         enable-wireguard-userspace-fallback is false; install the module or enable the userspace fallback \
         (Helm: encryption.wireguard.userspaceFallback=true)"
    )]
    NoKernelModule,
    #[error("the node's WireGuard key: {0}")]
    Key(#[from] wg::key::KeyError),
    #[error("the WireGuard device {interface}: {source}")]
    Device {
        interface: &'static str,
        #[source]
        source: wg::DeviceError,
    },
    #[error("creating the kernel WireGuard device: {0}")]
    Kernel(#[from] wg::kernel::KernelError),
    #[error("setting up {interface} over rtnetlink: {message}; the agent needs CAP_NET_ADMIN")]
    Link {
        interface: &'static str,
        message: String,
    },
    #[error("starting the userspace WireGuard device ({what}): {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the userspace WireGuard device did not come up; see {} ", log.display()
    )]
    NotUp { log: PathBuf },
}

fn device_err(source: wg::DeviceError) -> WireGuardError {
    WireGuardError::Device {
        interface: wg::INTERFACE,
        source,
    }
}

fn link_err(e: impl std::fmt::Display) -> WireGuardError {
    WireGuardError::Link {
        interface: wg::INTERFACE,
        message: e.to_string(),
    }
}

pub const ANNOTATION: &str = "network.cilium.io/wg-pub-key";
pub const LEGACY_ANNOTATION: &str = "io.cilium.network.wg-pub-key";
/// `spec.encryption.key` that marks WireGuard (Cilium's StaticEncryptKey).
pub const STATIC_ENCRYPT_KEY: u8 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Kernel,
    Userspace,
}

pub fn kernel_has_wireguard() -> bool {
    Path::new("/sys/module/wireguard").exists()
        || std::process::Command::new("modprobe")
            .arg("wireguard")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Picks the backend the way the Helm values say: kernel if the module exists; userspace only
/// when `enable-wireguard-userspace-fallback` is set.
pub fn select_backend(kernel: bool, fallback: bool) -> Result<Backend, WireGuardError> {
    match (kernel, fallback) {
        (true, _) => Ok(Backend::Kernel),
        (false, true) => Ok(Backend::Userspace),
        (false, false) => Err(WireGuardError::NoKernelModule),
    }
}

pub struct WireGuard {
    pub backend: Backend,
    pub public_key: PublicKey,
    ifindex: AtomicU32,
    pub node_encryption: bool,
    pub keepalive: Option<u16>,
    device: wg::Device,
    key_path: PathBuf,
    state_dir: PathBuf,
    node_ip: Ipv4Addr,
    /// One rtnetlink connection for the device's checks (every second) and setup.
    netlink: rtnetlink::Handle,
    /// What the last reconciliation saw and did: written by `reconcile` alone (the backend's
    /// own state), read by `report`.
    last: Mutex<WgView>,
}

/// What the WireGuard reconciler last saw and did.
#[derive(Debug, Clone, Default)]
struct WgView {
    peers: PeerSet,
    device: DeviceInfo,
}

async fn link_index_mtu(
    handle: &rtnetlink::Handle,
    name: Option<&str>,
    index: Option<u32>,
) -> Result<(u32, u32), WireGuardError> {
    let mut req = handle.link().get();
    if let Some(n) = name {
        req = req.match_name(n.to_string());
    }
    if let Some(i) = index {
        req = req.match_index(i);
    }
    let msg = req
        .execute()
        .try_next()
        .await
        .map_err(link_err)?
        .ok_or_else(|| link_err("no such link"))?;
    let mtu = msg
        .attributes
        .iter()
        .find_map(|a| {
            if let LinkAttribute::Mtu(m) = a {
                Some(*m)
            } else {
                None
            }
        })
        .unwrap_or(1500);
    Ok((msg.header.index, mtu))
}

impl WireGuard {
    pub async fn start(cfg: &AgentConfig, node_ip: Ipv4Addr) -> Result<Self, WireGuardError> {
        let mut backend = select_backend(
            kernel_has_wireguard(),
            cfg.enable_wireguard_userspace_fallback,
        )?;
        let key_path = cfg.state_dir.join(format!("{}.key", wg::INTERFACE));
        let key = PrivateKey::load_or_generate(&key_path)?;
        let public_key = key.public_key();
        if backend == Backend::Kernel {
            let k = wg::kernel::KernelDevice::new(wg::INTERFACE);
            if let Err(e) = k.ensure_link().await {
                if !cfg.enable_wireguard_userspace_fallback {
                    return Err(e.into());
                }
                warn!(error = %e, "kernel WireGuard is unusable; using the userspace fallback");
                backend = Backend::Userspace;
            }
        }
        let device = match backend {
            Backend::Kernel => wg::Device::Kernel(wg::kernel::KernelDevice::new(wg::INTERFACE)),
            Backend::Userspace => wg::Device::Userspace(uapi::socket_path(wg::INTERFACE)),
        };
        let keepalive = cfg
            .wireguard_persistent_keepalive
            .map(|d| d.as_secs().min(u16::MAX as u64) as u16)
            .filter(|k| *k > 0);
        let (conn, netlink, _) = rtnetlink::new_connection().map_err(link_err)?;
        tokio::spawn(conn);
        let wg = Self {
            netlink,
            backend,
            public_key,
            ifindex: AtomicU32::new(0),
            node_encryption: cfg.enable_node_encryption,
            keepalive,
            device,
            last: Mutex::new(WgView::default()),
            key_path,
            state_dir: cfg.state_dir.clone(),
            node_ip,
        };
        wg.bring_up(&key).await?;
        Ok(wg)
    }

    /// Makes the device exist and carry the node's key, fwmark, port, MTU and up state: adopts
    /// a running one (a restart keeps its sessions: the key is only set when it differs), or
    /// creates it (the kernel link, or the userspace device's process).
    async fn bring_up(&self, key: &PrivateKey) -> Result<(), WireGuardError> {
        match &self.device {
            wg::Device::Kernel(k) => k.ensure_link().await?,
            wg::Device::Userspace(_) => {
                if self.device.get().await.is_ok() {
                    info!(
                        interface = wg::INTERFACE,
                        "adopting the running userspace WireGuard device"
                    );
                } else {
                    spawn_userspace_device(&self.state_dir)?;
                    wait_for_device(&self.device, &self.state_dir).await?;
                }
            }
        }
        let current = self.device.get().await.map_err(device_err)?;
        let mut update = DeviceUpdate {
            fwmark: Some(wg::FWMARK),
            ..Default::default()
        };
        if self.backend == Backend::Kernel {
            update.listen_port = Some(wg::LISTEN_PORT);
        }
        if current.public_key != Some(self.public_key) {
            info!(public_key = %self.public_key, "installing the node's WireGuard key");
            update = update.with_private_key(key);
        }
        self.device.set(update).await.map_err(device_err)?;

        let handle = &self.netlink;
        let mtu = route_mtu(
            crate::agent::routes::underlay_mtu(handle, self.node_ip)
                .await
                .unwrap_or(1500),
        );
        let (ifindex, current_mtu) = link_index_mtu(handle, Some(wg::INTERFACE), None).await?;
        if current_mtu != mtu {
            handle
                .link()
                .set(LinkUnspec::new_with_index(ifindex).mtu(mtu).build())
                .execute()
                .await
                .map_err(link_err)?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(ifindex).up().build())
            .execute()
            .await
            .map_err(link_err)?;
        self.ifindex.store(ifindex, Ordering::Relaxed);
        info!(backend = ?self.backend, interface = wg::INTERFACE, ifindex, mtu, public_key = %self.public_key, "WireGuard ready");
        Ok(())
    }

    /// The device's interface index (it changes when the device is brought back).
    pub fn ifindex(&self) -> u32 {
        self.ifindex.load(Ordering::Relaxed)
    }

    /// Brings the device back when it is gone (its link deleted, or its process dead), with
    /// the node's key; the peers follow on the same pass. Returns whether it had to.
    async fn ensure_up(&self) -> Result<bool, WireGuardError> {
        // Only a definite "no such device" counts: a netlink hiccup is not a dead device.
        let lookup = self
            .netlink
            .link()
            .get()
            .match_name(wg::INTERFACE.to_string())
            .execute()
            .try_next()
            .await;
        let link = match lookup {
            Ok(Some(_)) => Some(()),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == libc::ENODEV => None,
            Ok(None) => None,
            Err(e) => {
                warn!(interface = wg::INTERFACE, error = %e, "could not look the WireGuard device up");
                return Ok(false);
            }
        };
        // The interface is the authority: a userspace device whose process died takes its TUN
        // interface with it. (A slow UAPI answer alone never starts a second device.)
        if link.is_some() {
            return Ok(false);
        }
        warn!(
            interface = wg::INTERFACE,
            "the WireGuard device is gone; bringing it back with the node's key"
        );
        if let wg::Device::Userspace(_) = self.device {
            // A device process whose TUN was deleted stops by itself; give it a moment.
            for _ in 0..20 {
                if self.device.get().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let key = PrivateKey::load_or_generate(&self.key_path)?;
        if key.public_key() != self.public_key {
            warn!(
                "the key file changed under a running agent; the published key stays until a restart"
            );
        }
        self.bring_up(&key).await?;
        // A new device has no peers: plan them from scratch.
        *self.last() = WgView::default();
        Ok(true)
    }

    fn last(&self) -> std::sync::MutexGuard<'_, WgView> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every other node's claim on a peer.
    pub fn claims(&self, table: &NodeTable, own: &str) -> Vec<NodeClaim> {
        table
            .others(own)
            .map(|n| {
                let mut allowed: Vec<ipnet::IpNet> = n.pod_cidrs.clone();
                if self.node_encryption {
                    allowed.extend(n.addresses.iter().map(|ip| ipnet::IpNet::from(*ip)));
                }
                NodeClaim {
                    node: n.name.clone(),
                    created: n.created.clone(),
                    key: n
                        .annotations
                        .get(ANNOTATION)
                        .or_else(|| n.annotations.get(LEGACY_ANNOTATION))
                        .cloned(),
                    endpoint_ip: n.internal_ip,
                    allowed_ips: allowed,
                }
            })
            .collect()
    }

    /// Makes the device's peers match the table; returns the peer set and the device state.
    /// `previous` is the last peer set; right after a restart it is empty and the device's own
    /// peers tell which node held which key.
    async fn reconcile_peers(
        &self,
        claims: Vec<NodeClaim>,
        previous: &PeerSet,
    ) -> Result<(PeerSet, DeviceInfo), WireGuardError> {
        let current = self.device.get().await.map_err(device_err)?;
        let previous = if previous.peers.is_empty() {
            incumbents_from_device(&current, &claims)
        } else {
            previous.clone()
        };
        let want = wg::peers::desired(&self.public_key, &claims, wg::LISTEN_PORT, &previous);
        for (node, why) in &want.refused {
            warn!(%node, reason = %why, "no WireGuard peer for this node");
        }
        let updates = wg::peers::plan(&current, &want, self.keepalive);
        if updates.is_empty() {
            return Ok((want, current));
        }
        for u in &updates {
            if let Some(k) = u.public_key {
                let node = want
                    .peers
                    .get(&k)
                    .map(|p| p.node.as_str())
                    .unwrap_or("(gone)");
                info!(peer = %k, %node, remove = u.remove, "updating WireGuard peer");
            }
        }
        self.device
            .set(DeviceUpdate {
                peers: updates,
                ..Default::default()
            })
            .await
            .map_err(device_err)?;
        Ok((want, self.device.get().await.map_err(device_err)?))
    }
}

/// WireGuard's route MTU: the underlay's minus Cilium's WireguardOverhead.
fn route_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(wg::OVERHEAD)
}

/// A peer's state from its last handshake.
fn peer_state(last_handshake: Option<std::time::SystemTime>) -> (Option<u64>, String) {
    let age = last_handshake
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs());
    let state = match age {
        Some(a) if a <= 180 => "up".to_string(),
        Some(_) => "stale: no handshake for 3 minutes".to_string(),
        None => "waiting for handshake".to_string(),
    };
    (age, state)
}

/// One configured peer with what the device says of it.
struct PeerView<'a> {
    key: &'a PublicKey,
    want: &'a wg::peers::DesiredPeer,
    have: Option<&'a wg::uapi::PeerInfo>,
    /// Seconds since the last handshake.
    age: Option<u64>,
    state: String,
}

impl WgView {
    fn configured(&self) -> impl Iterator<Item = PeerView<'_>> {
        let by_key: std::collections::HashMap<&PublicKey, &wg::uapi::PeerInfo> = self
            .device
            .peers
            .iter()
            .map(|p| (&p.public_key, p))
            .collect();
        self.peers.peers.iter().map(move |(key, want)| {
            let have = by_key.get(key).copied();
            let (age, state) = peer_state(have.and_then(|h| h.last_handshake));
            PeerView {
                key,
                want,
                have,
                age,
                state,
            }
        })
    }

    fn node_states(&self) -> BTreeMap<String, NodeState> {
        let mut out: BTreeMap<String, NodeState> = self
            .configured()
            .map(|p| {
                let s = if p.age.is_some_and(|a| a <= 180) {
                    NodeState::Up
                } else {
                    NodeState::Pending(p.state)
                };
                (p.want.node.clone(), s)
            })
            .collect();
        for (node, why) in &self.peers.refused {
            out.insert(node.clone(), NodeState::Refused(why.clone()));
        }
        out
    }

    fn status(&self, wg: &WireGuard) -> meshd_api::WireguardStatus {
        let mut peers: Vec<meshd_api::WireguardPeer> = self
            .configured()
            .map(|p| meshd_api::WireguardPeer {
                node: p.want.node.clone(),
                public_key: Some(p.key.to_base64()),
                endpoint: Some(p.want.endpoint.to_string()),
                allowed_ips: p.want.allowed_ips.iter().map(ToString::to_string).collect(),
                last_handshake_seconds: p.age,
                transfer_rx: p.have.map_or(0, |h| h.rx_bytes),
                transfer_tx: p.have.map_or(0, |h| h.tx_bytes),
                state: p.state,
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
            backend: match wg.backend {
                Backend::Kernel => "kernel".into(),
                Backend::Userspace => "userspace".into(),
            },
            interface: wg::INTERFACE.into(),
            public_key: wg.public_key.to_base64(),
            listen_port: wg::LISTEN_PORT,
            node_encryption: wg.node_encryption,
            peers,
        }
    }
}

impl EncryptionBackend for WireGuard {
    fn mode(&self) -> Mode {
        Mode::Wireguard
    }

    fn publication(&self) -> Publication {
        Publication {
            annotations: BTreeMap::from([(ANNOTATION.to_string(), self.public_key.to_base64())]),
            encryption_key: Some(STATIC_ENCRYPT_KEY),
        }
    }

    fn reconcile<'a>(
        &'a self,
        nodes: &'a NodeTable,
        own: &'a str,
    ) -> BoxFuture<'a, Result<BTreeMap<String, NodeState>, EncryptionError>> {
        let claims = self.claims(nodes, own);
        Box::pin(
            async move {
                // The device first: a deleted or dead one is brought back on this pass.
                self.ensure_up().await?;
                let previous = self.last().peers.clone();
                let (peers, device) = self.reconcile_peers(claims, &previous).await?;
                let view = WgView { peers, device };
                let states = view.node_states();
                *self.last() = view;
                Ok(states)
            }
            .instrument(info_span!("wireguard", interface = wg::INTERFACE)),
        )
    }

    /// Into the device: a node without a valid peer is unreachable rather than reached in the
    /// clear.
    fn reach(&self, node: &Node) -> Option<Reach> {
        node.internal_ipv4().map(|_| Reach {
            hop: NextHop::Device(self.ifindex()),
            mark: None,
        })
    }

    fn strict_device(&self) -> Option<u32> {
        Some(self.ifindex()).filter(|i| *i != 0)
    }

    fn route_mtu(&self, underlay_mtu: u32) -> u32 {
        route_mtu(underlay_mtu)
    }

    fn report(&self) -> BoxFuture<'_, EncryptionReport> {
        Box::pin(async move {
            // Handshake ages, counters and peers as the device has them now; a device that does
            // not answer has no peers up, whatever the last pass saw.
            let live = self.device.get().await;
            let mut view = self.last().clone();
            let health = match &live {
                Ok(device) => {
                    view.device = device.clone();
                    self.last().device = device.clone();
                    meshd_api::ComponentStatus {
                        state: meshd_api::Health::Ok,
                        message: format!("{} up", wg::INTERFACE),
                    }
                }
                Err(e) => {
                    view.device = DeviceInfo::default();
                    meshd_api::ComponentStatus {
                        state: meshd_api::Health::Failure,
                        message: format!(
                            "{} is down ({e}); the agent brings it back within a second, \
                             traffic to other nodes is refused meanwhile",
                            wg::INTERFACE
                        ),
                    }
                }
            };
            let mut status = view.status(self);
            if live.is_err() {
                for p in status.peers.iter_mut().filter(|p| p.public_key.is_some()) {
                    p.state = "down: the device is gone".into();
                }
            }
            EncryptionReport {
                mode: Mode::Wireguard,
                // Cilium's `Encryption:` line, after its tab.
                line: format!(
                    "Wireguard\t[NodeEncryption: {}, {} (Pubkey: {}, Port: {}, Peers: {})]",
                    if status.node_encryption {
                        "Enabled"
                    } else {
                        "Disabled"
                    },
                    status.interface,
                    status.public_key,
                    status.listen_port,
                    view.peers.peers.len(),
                ),
                health,
                wireguard: Some(status),
            }
        })
    }

    fn teardown(&self) -> BoxFuture<'_, Result<(), EncryptionError>> {
        Box::pin(async {
            remove_leftover_device().await;
            Ok(())
        })
    }
}

/// Removes `cilium_wg0` if it exists (a kernel device, or the TUN device of a userspace one,
/// whose process then ends).
pub async fn remove_leftover_device() {
    let Ok((conn, handle, _)) = rtnetlink::new_connection() else {
        return;
    };
    let task = tokio::spawn(conn);
    if let Ok((index, _)) = link_index_mtu(&handle, Some(wg::INTERFACE), None).await {
        match handle.link().del(index).execute().await {
            Ok(()) => info!(
                interface = wg::INTERFACE,
                "encryption is off: removed the WireGuard device an earlier run left"
            ),
            Err(e) => {
                warn!(interface = wg::INTERFACE, error = %e, "removing the WireGuard device an earlier run left failed")
            }
        }
    }
    task.abort();
}

/// Which node holds each key on the device now: the claimant of that key whose address is the
/// peer's configured endpoint.
fn incumbents_from_device(device: &DeviceInfo, claims: &[NodeClaim]) -> PeerSet {
    let mut set = PeerSet::default();
    for p in &device.peers {
        let holder = claims.iter().find(|c| {
            c.key
                .as_deref()
                .and_then(|k| PublicKey::parse_base64(k).ok())
                == Some(p.public_key)
                && p.endpoint.map(|e| e.ip()) == c.endpoint_ip
        });
        if let (Some(c), Some(endpoint)) = (holder, p.endpoint) {
            set.peers.insert(
                p.public_key,
                wg::peers::DesiredPeer {
                    node: c.node.clone(),
                    endpoint,
                    allowed_ips: p.allowed_ips.clone(),
                },
            );
        }
    }
    set
}

fn spawn_userspace_device(state_dir: &Path) -> Result<(), WireGuardError> {
    use std::os::unix::process::CommandExt as _;
    let spawn = |what| move |source| WireGuardError::Spawn { what, source };
    let exe = std::env::current_exe().map_err(spawn("locating the meshd binary"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join(format!("{}.log", wg::INTERFACE)))
        .map_err(spawn("opening the device's log"))?;
    info!(
        interface = wg::INTERFACE,
        "starting the userspace WireGuard device"
    );
    std::process::Command::new(exe)
        .args([
            "wireguard-userspace",
            "--interface",
            wg::INTERFACE,
            "--listen-port",
            &wg::LISTEN_PORT.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(spawn("opening the device's log"))?)
        .stderr(log)
        // Its own process group: it outlives the agent, so an agent restart does not stop traffic.
        .process_group(0)
        .spawn()
        .map_err(spawn("running meshd wireguard-userspace"))?;
    Ok(())
}

async fn wait_for_device(
    device: &wg::Device,
    state_dir: &Path,
) -> Result<DeviceInfo, WireGuardError> {
    for _ in 0..100 {
        if let Ok(d) = device.get().await {
            return Ok(d);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(WireGuardError::NotUp {
        log: state_dir.join(format!("{}.log", wg::INTERFACE)),
    })
}
