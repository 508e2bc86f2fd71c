//! WireGuard between nodes: chooses the backend, owns the key, keeps the userspace device
//! process running (adopting one that survived an agent restart), sets the interface up with
//! the right MTU, and reconciles peers from the node table.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::TryStreamExt as _;
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use tracing::{info, warn};
use wg::key::{PrivateKey, PublicKey};
use wg::peers::{NodeClaim, PeerSet};
use wg::uapi::{self, DeviceInfo, DeviceUpdate};

use super::nodes::NodeTable;
use crate::config::AgentConfig;

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
pub fn select_backend(kernel: bool, fallback: bool) -> Result<Backend> {
    match (kernel, fallback) {
        (true, _) => Ok(Backend::Kernel),
        (false, true) => Ok(Backend::Userspace),
        (false, false) => bail!(
            "the kernel has no WireGuard module (modprobe wireguard failed) and \
             enable-wireguard-userspace-fallback is false; install the module or enable the userspace fallback \
             (Helm: encryption.wireguard.userspaceFallback=true)"
        ),
    }
}

pub struct WireGuard {
    pub backend: Backend,
    pub public_key: PublicKey,
    pub ifindex: u32,
    pub node_encryption: bool,
    pub keepalive: Option<u16>,
    device: wg::Device,
}

async fn link_index_mtu(
    handle: &rtnetlink::Handle,
    name: Option<&str>,
    index: Option<u32>,
) -> Result<(u32, u32)> {
    let mut req = handle.link().get();
    if let Some(n) = name {
        req = req.match_name(n.to_string());
    }
    if let Some(i) = index {
        req = req.match_index(i);
    }
    let msg = req.execute().try_next().await?.context("no such link")?;
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

async fn underlay_mtu(handle: &rtnetlink::Handle, node_ip: Ipv4Addr) -> Result<u32> {
    let mut dump = handle.address().get().execute();
    while let Some(msg) = dump.try_next().await? {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == node_ip))
        {
            return Ok(link_index_mtu(handle, None, Some(msg.header.index))
                .await?
                .1);
        }
    }
    bail!("no interface has the node address {node_ip}")
}

impl WireGuard {
    pub async fn start(cfg: &AgentConfig, node_ip: Ipv4Addr) -> Result<Self> {
        let mut backend = select_backend(
            kernel_has_wireguard(),
            cfg.enable_wireguard_userspace_fallback,
        )?;
        let key =
            PrivateKey::load_or_generate(&cfg.state_dir.join(format!("{}.key", wg::INTERFACE)))?;
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
            Backend::Userspace => {
                let socket = uapi::socket_path(wg::INTERFACE);
                let dev = wg::Device::Userspace(socket.clone());
                if dev.get().await.is_ok() {
                    info!(
                        interface = wg::INTERFACE,
                        "adopting the running userspace WireGuard device"
                    );
                } else {
                    spawn_userspace_device(&cfg.state_dir)?;
                    wait_for_device(&dev).await?;
                }
                dev
            }
        };
        let current = device.get().await?;
        // Setting the key resets every session: only when it differs (a restart keeps it).
        let mut update = DeviceUpdate {
            fwmark: Some(wg::FWMARK),
            ..Default::default()
        };
        if backend == Backend::Kernel {
            update.listen_port = Some(wg::LISTEN_PORT);
        }
        if current.public_key != Some(public_key) {
            info!(public_key = %public_key, "installing the node's WireGuard key");
            update = update.with_private_key(&key);
        }
        device.set(update).await?;

        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let mtu = underlay_mtu(&handle, node_ip).await.unwrap_or(1500) - wg::OVERHEAD;
        let (ifindex, current_mtu) = link_index_mtu(&handle, Some(wg::INTERFACE), None).await?;
        if current_mtu != mtu {
            handle
                .link()
                .set(LinkUnspec::new_with_index(ifindex).mtu(mtu).build())
                .execute()
                .await?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(ifindex).up().build())
            .execute()
            .await?;
        task.abort();
        info!(?backend, interface = wg::INTERFACE, mtu, public_key = %public_key, "WireGuard ready");
        let keepalive = cfg
            .wireguard_persistent_keepalive
            .map(|d| d.as_secs().min(u16::MAX as u64) as u16)
            .filter(|k| *k > 0);
        Ok(Self {
            backend,
            public_key,
            ifindex,
            node_encryption: cfg.enable_node_encryption,
            keepalive,
            device,
        })
    }

    /// The device's current state (peers, handshakes, counters).
    pub async fn device_info(&self) -> Result<DeviceInfo> {
        Ok(self.device.get().await?)
    }

    /// Every other node's claim on a peer.
    pub fn claims(&self, table: &NodeTable, own: &str) -> Vec<NodeClaim> {
        table
            .nodes
            .values()
            .filter(|n| n.name != own)
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
    pub async fn reconcile(
        &self,
        claims: Vec<NodeClaim>,
        previous: &PeerSet,
    ) -> Result<(PeerSet, DeviceInfo)> {
        let current = self.device.get().await?;
        let previous = if previous.peers.is_empty() {
            incumbents_from_device(&current, &claims)
        } else {
            previous.clone()
        };
        let want = wg::peers::desired(&self.public_key, &claims, wg::LISTEN_PORT, &previous);
        for (node, why) in &want.refused {
            warn!(node = %node, reason = %why, "no WireGuard peer for this node");
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
                info!(peer = %k, node, remove = u.remove, "updating WireGuard peer");
            }
        }
        self.device
            .set(DeviceUpdate {
                peers: updates,
                ..Default::default()
            })
            .await?;
        Ok((want, self.device.get().await?))
    }
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

fn spawn_userspace_device(state_dir: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("locating the meshd binary")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join(format!("{}.log", wg::INTERFACE)))
        .context("opening the WireGuard device's log")?;
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
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: it outlives the agent, so an agent restart does not stop traffic.
        .process_group(0)
        .spawn()
        .context("starting the userspace WireGuard device")?;
    Ok(())
}

async fn wait_for_device(device: &wg::Device) -> Result<DeviceInfo> {
    for _ in 0..100 {
        if let Ok(d) = device.get().await {
            return Ok(d);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "the userspace WireGuard device did not come up; see {}.log in the state directory",
        wg::INTERFACE
    )
}
