//! The kernel backend: `cilium_wg0` created over rtnetlink and configured over generic netlink
//! (the `wireguard` family), speaking the same typed requests as the UAPI so the agent's
//! reconciler does not care which backend runs.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};
use ipnet::IpNet;
use netlink_packet_core_09::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};

use crate::key::{PrivateKey, PublicKey};
use crate::uapi::{DeviceInfo, DeviceUpdate, PeerInfo};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "the kernel has no WireGuard support (creating a wireguard link failed: {0}); load the wireguard module or enable the userspace fallback"
    )]
    NoModule(String),
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("rtnetlink: {0}")]
    Link(#[from] rtnetlink::Error),
    #[error("generic netlink (wireguard family): {0}")]
    Genl(String),
    #[error("the kernel refused the WireGuard configuration: {0}")]
    Refused(std::io::Error),
}

pub struct KernelDevice {
    name: String,
}

fn genl(e: impl std::fmt::Display) -> KernelError {
    KernelError::Genl(e.to_string())
}

impl KernelDevice {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    /// Creates the interface unless it exists. Failing because the link type is unknown means
    /// the kernel has no WireGuard.
    pub async fn ensure_link(&self) -> Result<(), KernelError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(KernelError::Socket)?;
        let task = tokio::spawn(conn);
        let exists = handle
            .link()
            .get()
            .match_name(self.name.clone())
            .execute()
            .try_next()
            .await
            .is_ok();
        let result = if exists {
            Ok(())
        } else {
            handle
                .link()
                .add(rtnetlink::LinkWireguard::new(&self.name).build())
                .execute()
                .await
                .map_err(|e| KernelError::NoModule(e.to_string()))
        };
        task.abort();
        result
    }

    async fn request(
        &self,
        msg: WireguardMessage,
        flags: u16,
    ) -> Result<Vec<WireguardMessage>, KernelError> {
        let (conn, mut handle, _) = genetlink::new_connection().map_err(KernelError::Socket)?;
        let task = tokio::spawn(conn);
        let mut nl = NetlinkMessage::from(GenlMessage::from_payload(msg));
        nl.header.flags = flags;
        let result = async {
            let mut stream = handle.request(nl).await.map_err(genl)?.boxed();
            let mut out = Vec::new();
            while let Some(m) = stream.next().await {
                match m.map_err(genl)?.payload {
                    NetlinkPayload::InnerMessage(g) => out.push(g.payload),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(KernelError::Refused(e.to_io()));
                    }
                    _ => {}
                }
            }
            Ok(out)
        }
        .await;
        task.abort();
        result
    }

    pub async fn get(&self) -> Result<DeviceInfo, KernelError> {
        let msg = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.name.clone())],
        };
        let parts = self.request(msg, NLM_F_REQUEST | NLM_F_DUMP).await?;
        let mut info = DeviceInfo::default();
        // Large peer lists arrive split over several messages.
        for m in parts {
            for a in m.attributes {
                match a {
                    WireguardAttribute::PublicKey(k) => info.public_key = Some(PublicKey(k)),
                    WireguardAttribute::ListenPort(p) => info.listen_port = p,
                    WireguardAttribute::Fwmark(f) => info.fwmark = f,
                    WireguardAttribute::Peers(peers) => {
                        for p in peers {
                            merge_peer(&mut info, p);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(info)
    }

    pub async fn set(&self, u: &DeviceUpdate) -> Result<(), KernelError> {
        let mut attrs = vec![WireguardAttribute::IfName(self.name.clone())];
        if let Some(hex) = &u.private_key {
            let key = PrivateKey::from_hex(hex)
                .ok_or_else(|| KernelError::Genl("the private key is not 64 hex digits".into()))?;
            attrs.push(WireguardAttribute::PrivateKey(key.secret().to_bytes()));
        }
        if let Some(p) = u.listen_port {
            attrs.push(WireguardAttribute::ListenPort(p));
        }
        if let Some(m) = u.fwmark {
            attrs.push(WireguardAttribute::Fwmark(m));
        }
        if u.replace_peers {
            attrs.push(WireguardAttribute::Flags(
                WireguardDeviceFlags::ReplacePeers,
            ));
        }
        let peers: Vec<WireguardPeer> = u
            .peers
            .iter()
            .filter_map(|p| {
                let key = p.public_key?;
                let mut a = vec![WireguardPeerAttribute::PublicKey(key.0)];
                let mut flags = WireguardPeerFlags::empty();
                if p.remove {
                    flags |= WireguardPeerFlags::RemoveMe;
                }
                if p.update_only {
                    flags |= WireguardPeerFlags::UpdateOnly;
                }
                if p.replace_allowed_ips {
                    flags |= WireguardPeerFlags::ReplaceAllowedIps;
                }
                a.push(WireguardPeerAttribute::Flags(flags));
                if let Some(e) = p.endpoint {
                    a.push(WireguardPeerAttribute::Endpoint(e));
                }
                if let Some(k) = p.persistent_keepalive {
                    a.push(WireguardPeerAttribute::PersistentKeepalive(k));
                }
                if let Some(k) = &p.preshared_key {
                    a.push(WireguardPeerAttribute::PresharedKey(*k.0));
                }
                if !p.allowed_ips.is_empty() {
                    a.push(WireguardPeerAttribute::AllowedIps(
                        p.allowed_ips.iter().map(allowed_ip).collect(),
                    ));
                }
                Some(WireguardPeer(a))
            })
            .collect();
        if !peers.is_empty() {
            attrs.push(WireguardAttribute::Peers(peers));
        }
        let msg = WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: attrs,
        };
        self.request(msg, NLM_F_REQUEST | NLM_F_ACK).await.map(drop)
    }
}

fn allowed_ip(n: &IpNet) -> WireguardAllowedIp {
    let family = if n.addr().is_ipv4() {
        WireguardAddressFamily::Ipv4
    } else {
        WireguardAddressFamily::Ipv6
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(n.addr()),
        WireguardAllowedIpAttr::Cidr(n.prefix_len()),
    ])
}

fn merge_peer(info: &mut DeviceInfo, p: WireguardPeer) {
    let mut key = None;
    let mut endpoint: Option<SocketAddr> = None;
    let mut allowed = Vec::new();
    let mut hs = None;
    let (mut rx, mut tx, mut ka) = (0, 0, 0);
    for a in p.0 {
        match a {
            WireguardPeerAttribute::PublicKey(k) => key = Some(PublicKey(k)),
            WireguardPeerAttribute::Endpoint(e) => endpoint = Some(e),
            WireguardPeerAttribute::RxBytes(b) => rx = b,
            WireguardPeerAttribute::TxBytes(b) => tx = b,
            WireguardPeerAttribute::PersistentKeepalive(k) => ka = k,
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                hs = Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::new(
                            t.seconds as u64,
                            t.nano_seconds.clamp(0, 999_999_999) as u32,
                        ),
                );
            }
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let mut addr = None;
                    let mut cidr = None;
                    for x in ip.0 {
                        match x {
                            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                            _ => {}
                        }
                    }
                    if let (Some(a), Some(c)) = (addr, cidr)
                        && let Ok(n) = IpNet::new(a, c)
                    {
                        allowed.push(n);
                    }
                }
            }
            _ => {}
        }
    }
    let Some(key) = key else { return };
    // A peer split over two messages continues with the same key.
    if let Some(existing) = info.peers.iter_mut().find(|x| x.public_key == key) {
        existing.allowed_ips.extend(allowed);
        return;
    }
    info.peers.push(PeerInfo {
        public_key: key,
        endpoint,
        allowed_ips: allowed,
        last_handshake: hs,
        rx_bytes: rx,
        tx_bytes: tx,
        persistent_keepalive: ka,
        preshared_key: None,
    });
}
