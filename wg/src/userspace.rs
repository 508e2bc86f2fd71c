//! The userspace WireGuard device: boringtun's sans-IO noise core (`Tunn`) driven by our own
//! I/O loop over a TUN device and a UDP socket, configured through the WireGuard UAPI socket so
//! that `wg show`/`wg set` work as with the kernel. It runs as its own process, so the agent can
//! restart without interrupting traffic.
//!
//! Threads: TUN → UDP (encrypt), UDP → TUN (decrypt), timers, UAPI. Each peer's `Tunn` sits
//! behind its own mutex, so the two directions run on separate cores.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;
use tracing::{debug, error, info, warn};

use crate::key::{PrivateKey, PublicKey};
use crate::offload::{
    Coalescer, GsoBatch, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VNET_HDR_LEN, VnetHdr, complete_checksum,
    segment_tcp,
};
use crate::uapi::{self, DeviceInfo, DeviceUpdate, PeerInfo, PresharedKey, Request};
use std::os::fd::AsRawFd as _;

const MAX_PACKET: usize = 65_535;
/// Handshake messages per second the device answers with Diffie-Hellman work before it asks
/// senders for a cookie (mac2) first, as boringtun's device and the WireGuard paper do.
const HANDSHAKES_PER_SECOND: u64 = 100;
/// UAPI clients served at once, and how long one may take (a client that connects and sends
/// nothing cannot hold `wg show` up).
const UAPI_CLIENTS: usize = 16;
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "creating the TUN device {name}: {source}; is /dev/net/tun available and are we CAP_NET_ADMIN?"
    )]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("binding UDP port {port}: {source}")]
    Udp { port: u16, source: std::io::Error },
    #[error("serving the UAPI socket {path}: {source}")]
    Uapi {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Peer {
    public_key: PublicKey,
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    allowed_ips: RwLock<Vec<IpNet>>,
    keepalive: u16,
    /// All zero: none.
    preshared: PresharedKey,
}

impl Peer {
    fn allows(&self, ip: IpAddr) -> bool {
        self.allowed_ips
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|n| n.contains(&ip))
    }
}

#[derive(Default)]
struct State {
    private: Option<PrivateKey>,
    fwmark: u32,
    peers: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Which peer holds each allowed IP (an allowed IP belongs to one peer).
    owners: HashMap<IpNet, PublicKey>,
    /// Prefix lengths present in `owners`, per family.
    lens_v4: std::collections::BTreeSet<u8>,
    lens_v6: std::collections::BTreeSet<u8>,
    next_index: u32,
}

impl State {
    /// Longest-prefix match over every peer's AllowedIPs: one hash lookup per prefix length in
    /// use (a cluster has a few), whatever the number of peers.
    fn route(&self, dst: IpAddr) -> Option<Arc<Peer>> {
        let lens = match dst {
            IpAddr::V4(_) => &self.lens_v4,
            IpAddr::V6(_) => &self.lens_v6,
        };
        lens.iter().rev().find_map(|len| {
            let net = IpNet::new(dst, *len).ok()?.trunc();
            self.peers.get(self.owners.get(&net)?).cloned()
        })
    }

    /// The prefix lengths in use, after the allowed IPs changed.
    fn index_prefix_lengths(&mut self) {
        self.lens_v4.clear();
        self.lens_v6.clear();
        for n in self.owners.keys() {
            match n {
                IpNet::V4(_) => self.lens_v4.insert(n.prefix_len()),
                IpNet::V6(_) => self.lens_v6.insert(n.prefix_len()),
            };
        }
    }
}

pub struct Device {
    name: String,
    /// mac1/cookie checks for every handshake message, shared by every peer's `Tunn`; made
    /// with the private key (mac1 is keyed by the public key).
    limiter: RwLock<Option<Arc<RateLimiter>>>,
    uapi_clients: AtomicUsize,
    listen_port: u16,
    state: RwLock<State>,
    udp: UdpSocket,
    tun: crate::tun::Tun,
    /// UDP GSO works (cleared on the first refusal).
    gso: AtomicBool,
    stop: AtomicBool,
}

pub struct Options {
    pub interface: String,
    /// TUN TSO + UDP GSO/GRO (the fast path); off for debugging or old kernels.
    pub offload: bool,
    pub listen_port: u16,
    pub uapi_socket: PathBuf,
}

impl Device {
    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self, secrets: bool) -> DeviceInfo {
        let st = self.state();
        let now = SystemTime::now();
        DeviceInfo {
            public_key: st.private.as_ref().map(PrivateKey::public_key),
            listen_port: self.listen_port,
            fwmark: st.fwmark,
            peers: st
                .peers
                .values()
                .map(|p| {
                    let (since, tx, rx, _, _) =
                        p.tunn.lock().unwrap_or_else(|e| e.into_inner()).stats();
                    PeerInfo {
                        public_key: p.public_key,
                        endpoint: *p.endpoint.read().unwrap_or_else(|e| e.into_inner()),
                        allowed_ips: p
                            .allowed_ips
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone(),
                        last_handshake: since.and_then(|d| now.checked_sub(d)),
                        rx_bytes: rx as u64,
                        tx_bytes: tx as u64,
                        persistent_keepalive: p.keepalive,
                        preshared_key: (secrets && !p.preshared.is_none())
                            .then(|| p.preshared.clone()),
                    }
                })
                .collect(),
        }
    }

    fn apply(&self, u: DeviceUpdate) -> Result<(), i32> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if let Some(port) = u.listen_port
            && port != self.listen_port
        {
            warn!(
                port,
                bound = self.listen_port,
                "the listen port is fixed when the device starts"
            );
            return Err(libc::EINVAL);
        }
        if let Some(mark) = u.fwmark {
            if let Err(e) =
                nix::sys::socket::setsockopt(&self.udp, nix::sys::socket::sockopt::Mark, &mark)
            {
                warn!(error = %e, "setting the fwmark failed");
                return Err(libc::EPERM);
            }
            st.fwmark = mark;
        }
        // The same key again changes nothing (as in the kernel): sessions stay up.
        if let Some(hex) = u.private_key.as_ref().filter(|hex| {
            PrivateKey::from_hex(hex).map(|k| k.public_key())
                != st.private.as_ref().map(PrivateKey::public_key)
        }) {
            let key = PrivateKey::from_hex(hex).ok_or(libc::EINVAL)?;
            let public = x25519_dalek::PublicKey::from(key.secret());
            let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND));
            for p in st.peers.values() {
                p.tunn
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_static_private(key.secret().clone(), public, Some(limiter.clone()));
            }
            *self.limiter.write().unwrap_or_else(|e| e.into_inner()) = Some(limiter);
            st.private = Some(key);
        }
        if u.replace_peers {
            st.peers.clear();
            st.by_index.clear();
            st.owners.clear();
        }
        let limiter = self
            .limiter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for pu in u.peers {
            let Some(pk) = pu.public_key else { continue };
            if pu.remove {
                if let Some(p) = st.peers.remove(&pk) {
                    st.by_index.remove(&p.index);
                    for n in p
                        .allowed_ips
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                    {
                        st.owners.remove(n);
                    }
                }
                continue;
            }
            let existing = st.peers.get(&pk).cloned();
            if existing.is_none() && pu.update_only {
                continue;
            }
            // A new peer, or one whose preshared key changes: a fresh noise state (a new
            // handshake follows); otherwise the peer is updated in place.
            let psk_changes = pu
                .preshared_key
                .as_ref()
                .is_some_and(|k| existing.as_ref().is_none_or(|p| p.preshared != *k));
            let peer = match existing {
                Some(p) if !psk_changes => p,
                old => {
                    let Some(private) = st.private.as_ref().map(|k| k.secret().clone()) else {
                        warn!("a peer was added before the private key; set private_key first");
                        st.index_prefix_lengths();
                        return Err(libc::EINVAL);
                    };
                    let preshared = pu
                        .preshared_key
                        .clone()
                        .or_else(|| old.as_ref().map(|p| p.preshared.clone()))
                        .unwrap_or_else(|| PresharedKey(zeroize::Zeroizing::new([0; 32])));
                    let index = match &old {
                        Some(p) => p.index,
                        None => {
                            st.next_index = (st.next_index + 1) & 0x00ff_ffff;
                            st.next_index
                        }
                    };
                    let keepalive = pu
                        .persistent_keepalive
                        .or(old.as_ref().map(|p| p.keepalive))
                        .unwrap_or(0);
                    let tunn = Tunn::new(
                        private,
                        x25519_dalek::PublicKey::from(pk.0),
                        (!preshared.is_none()).then(|| *preshared.0),
                        Some(keepalive).filter(|k| *k > 0),
                        index,
                        limiter.clone(),
                    );
                    let p =
                        Arc::new(Peer {
                            public_key: pk,
                            index,
                            tunn: Mutex::new(tunn),
                            endpoint: RwLock::new(old.as_ref().and_then(|p| {
                                *p.endpoint.read().unwrap_or_else(|e| e.into_inner())
                            })),
                            allowed_ips: RwLock::new(
                                old.as_ref()
                                    .map(|p| {
                                        p.allowed_ips
                                            .read()
                                            .unwrap_or_else(|e| e.into_inner())
                                            .clone()
                                    })
                                    .unwrap_or_default(),
                            ),
                            keepalive,
                            preshared,
                        });
                    st.peers.insert(pk, p.clone());
                    st.by_index.insert(index, p.clone());
                    if old.is_some() {
                        info!(peer = %pk, "peer's preshared key changed");
                    } else {
                        info!(peer = %pk, "peer added");
                    }
                    p
                }
            };
            if let Some(e) = pu.endpoint {
                *peer.endpoint.write().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
            let added: Vec<IpNet> = pu.allowed_ips.iter().map(IpNet::trunc).collect();
            if pu.replace_allowed_ips {
                let old: Vec<IpNet> = peer
                    .allowed_ips
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                for n in old {
                    st.owners.remove(&n);
                }
                peer.allowed_ips
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            }
            // An allowed IP belongs to one peer: adding it here takes it from the peer that had
            // it (as the kernel does; meshd removes an allowed IP by moving it to a throwaway
            // peer and removing that, never by replacing a live peer's list).
            for a in added {
                if let Some(prev) = st.owners.insert(a, pk)
                    && prev != pk
                    && let Some(other) = st.peers.get(&prev)
                {
                    other
                        .allowed_ips
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|n| *n != a);
                }
                let mut allowed = peer.allowed_ips.write().unwrap_or_else(|e| e.into_inner());
                if !allowed.contains(&a) {
                    allowed.push(a);
                }
            }
        }
        st.index_prefix_lengths();
        Ok(())
    }

    fn send(&self, data: &[u8], to: SocketAddr) {
        if let Err(e) = self.udp.send_to(data, to) {
            debug!(%to, error = %e, "sending to a peer failed");
        }
    }

    /// Sends a batch of equal-size datagrams with one `sendmsg` (UDP GSO), or one by one where
    /// the kernel refuses GSO.
    fn flush(&self, batch: &mut GsoBatch, to: SocketAddr) {
        use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
        if batch.count == 0 {
            return;
        }
        if batch.count == 1 || !self.gso.load(Ordering::Relaxed) {
            for chunk in batch.buf.chunks(batch.segment.max(1)) {
                self.send(chunk, to);
            }
            batch.clear();
            return;
        }
        let seg = batch.segment as u16;
        let iov = [std::io::IoSlice::new(&batch.buf)];
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        let addr = SockaddrStorage::from(to);
        if let Err(e) = sendmsg(
            self.udp.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&addr),
        ) {
            if matches!(
                e,
                nix::errno::Errno::EIO | nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP
            ) {
                warn!(error = %e, "UDP GSO refused; sending datagrams one by one from now on");
                self.gso.store(false, Ordering::Relaxed);
                for chunk in batch.buf.chunks(batch.segment.max(1)) {
                    self.send(chunk, to);
                }
            } else {
                debug!(%to, error = %e, "sending to a peer failed");
            }
        }
        batch.clear();
    }

    /// TUN → peer: encrypt what the kernel routes into the device. With offloads a read is a
    /// TCP super-packet: it is cut into segments here, encrypted one by one, and sent as one
    /// GSO batch.
    fn tun_loop(&self) {
        let hdr = if self.tun.vnet_hdr { VNET_HDR_LEN } else { 0 };
        let mut buf = vec![0u8; MAX_PACKET + hdr];
        let mut out = vec![0u8; MAX_PACKET + 148];
        let mut segs: Vec<u8> = Vec::with_capacity(2 * MAX_PACKET);
        let mut lens: Vec<usize> = Vec::with_capacity(64);
        let mut batch = GsoBatch::default();
        let mut tun = &self.tun.file;
        while !self.stop.load(Ordering::Relaxed) {
            let n = match tun.read(&mut buf) {
                Ok(n) if n > hdr => n,
                Ok(_) => continue,
                // The interface was deleted: this device is dead. Stop the process (never half
                // working) so that the agent brings a fresh one up.
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    error!(error = %e, "the TUN device is gone; stopping the userspace WireGuard device");
                    self.stop.store(true, Ordering::Relaxed);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::this(),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "reading from the TUN device failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            segs.clear();
            lens.clear();
            let vnet = if hdr > 0 {
                VnetHdr::parse(&buf[..hdr])
            } else {
                None
            };
            let pkt = &mut buf[hdr..n];
            match vnet {
                Some(v)
                    if v.gso_type == VIRTIO_NET_HDR_GSO_TCPV4
                        || v.gso_type == VIRTIO_NET_HDR_GSO_TCPV6 =>
                {
                    if segment_tcp(pkt, usize::from(v.gso_size), &mut segs, &mut lens).is_none() {
                        continue;
                    }
                }
                Some(v) if v.gso_type != VIRTIO_NET_HDR_GSO_NONE => continue,
                Some(v) => {
                    if v.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
                        && complete_checksum(
                            pkt,
                            usize::from(v.csum_start),
                            usize::from(v.csum_offset),
                        )
                        .is_none()
                    {
                        continue;
                    }
                    segs.extend_from_slice(pkt);
                    lens.push(pkt.len());
                }
                None => {
                    segs.extend_from_slice(pkt);
                    lens.push(pkt.len());
                }
            }
            // The segments of one read share a destination.
            let Some(dst) = Tunn::dst_address(&segs[..lens[0]]) else {
                continue;
            };
            let Some(peer) = self.state().route(dst) else {
                continue;
            };
            let Some(endpoint) = *peer.endpoint.read().unwrap_or_else(|e| e.into_inner()) else {
                continue;
            };
            let mut tunn = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            let mut at = 0;
            for len in &lens {
                if let TunnResult::WriteToNetwork(d) =
                    tunn.encapsulate(&segs[at..at + len], &mut out)
                {
                    if !batch.fits(d.len()) {
                        self.flush(&mut batch, endpoint);
                    }
                    batch.push(d);
                }
                at += len;
            }
            drop(tunn);
            self.flush(&mut batch, endpoint);
        }
    }

    /// Receives datagrams; with UDP GRO one read holds several of equal size.
    fn recv_batch(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, usize)> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(i32);
        let msg = recvmsg::<SockaddrStorage>(
            self.udp.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )?;
        let n = msg.bytes;
        let mut seg = n;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::UdpGroSegments(s) = c {
                    seg = usize::try_from(s).unwrap_or(n).max(1);
                }
            }
        }
        let src = msg
            .address
            .and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                    .or_else(|| {
                        a.as_sockaddr_in6()
                            .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                    })
            })
            .ok_or_else(|| std::io::Error::other("a datagram without a source address"))?;
        Ok((n, src, seg))
    }

    /// UDP → TUN: authenticate, decrypt, check the source against the peer's AllowedIPs; with
    /// offloads, consecutive segments of one TCP flow are written as one super-packet.
    fn udp_loop(&self) {
        let hdr = if self.tun.vnet_hdr { VNET_HDR_LEN } else { 0 };
        let mut buf = vec![0u8; MAX_PACKET];
        let mut out = vec![0u8; MAX_PACKET + hdr];
        let mut run = Coalescer::default();
        let mut tun = &self.tun.file;
        while !self.stop.load(Ordering::Relaxed) {
            let (n, src, seg) = match self.recv_batch(&mut buf) {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "receiving failed");
                    continue;
                }
            };
            for datagram in buf[..n].chunks(seg) {
                let Some(len) = self.handle_datagram(datagram, src, &mut out, hdr) else {
                    continue;
                };
                if hdr == 0 {
                    let _ = tun.write(&out[..len]);
                    continue;
                }
                let pkt = &out[hdr..hdr + len];
                if run.try_append(pkt) {
                    continue;
                }
                if !run.is_empty() {
                    let _ = tun.write(run.finish());
                }
                if !run.start(pkt) {
                    out[..hdr].fill(0);
                    let _ = tun.write(&out[..hdr + len]);
                }
            }
            if !run.is_empty() {
                let _ = tun.write(run.finish());
            }
        }
    }

    /// Handles one datagram: answers handshakes, and returns the length of a decrypted packet
    /// (at `out[hdr..]`) that may enter the tunnel interface.
    fn handle_datagram(
        &self,
        datagram: &[u8],
        src: SocketAddr,
        out: &mut [u8],
        hdr: usize,
    ) -> Option<usize> {
        // mac1 first (and, under load, a cookie) for every handshake message, before any
        // Diffie-Hellman: a flood of initiations costs a keyed hash each, not a curve operation.
        let limiter = self
            .limiter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let packet = match limiter.verify_packet(Some(src.ip()), datagram, &mut out[hdr..]) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.send(cookie, src);
                return None;
            }
            Err(_) => return None,
        };
        let peer = match packet {
            Packet::HandshakeInit(p) => {
                // The initiator's identity costs a DH: done without holding the device lock.
                let private = self.state().private.as_ref()?.secret().clone();
                let public = x25519_dalek::PublicKey::from(&private);
                let half = parse_handshake_anon(&private, &public, &p).ok()?;
                self.state()
                    .peers
                    .get(&PublicKey(half.peer_static_public))
                    .cloned()
            }
            Packet::HandshakeResponse(p) => {
                self.state().by_index.get(&(p.receiver_idx >> 8)).cloned()
            }
            Packet::PacketCookieReply(p) => {
                self.state().by_index.get(&(p.receiver_idx >> 8)).cloned()
            }
            Packet::PacketData(p) => self.state().by_index.get(&(p.receiver_idx >> 8)).cloned(),
        }?;
        let mut tunn = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
        let rest = &mut out[hdr..];
        let to_tunnel = match tunn.decapsulate(Some(src.ip()), datagram, rest) {
            TunnResult::WriteToNetwork(d) => {
                self.send(d, src);
                // Flush packets that waited for the handshake.
                while let TunnResult::WriteToNetwork(d) = tunn.decapsulate(None, &[], rest) {
                    self.send(d, src);
                }
                None
            }
            TunnResult::WriteToTunnelV4(d, addr) => Some((d.len(), IpAddr::V4(addr))),
            TunnResult::WriteToTunnelV6(d, addr) => Some((d.len(), IpAddr::V6(addr))),
            TunnResult::Err(e) => {
                debug!(peer = %peer.public_key, error = ?e, "packet refused");
                return None;
            }
            TunnResult::Done => None,
        };
        drop(tunn);
        *peer.endpoint.write().unwrap_or_else(|e| e.into_inner()) = Some(src);
        let (len, addr) = to_tunnel?;
        if !peer.allows(addr) {
            debug!(peer = %peer.public_key, %addr, "dropped: source not in AllowedIPs");
            return None;
        }
        Some(len)
    }

    fn timer_loop(&self) {
        let mut out = vec![0u8; MAX_PACKET];
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            // (Resets at most once a second by itself.)
            if let Some(l) = self
                .limiter
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                l.reset_count();
            }
            let peers: Vec<Arc<Peer>> = self.state().peers.values().cloned().collect();
            for p in peers {
                let Some(endpoint) = *p.endpoint.read().unwrap_or_else(|e| e.into_inner()) else {
                    continue;
                };
                let mut tunn = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
                if let TunnResult::WriteToNetwork(d) = tunn.update_timers(&mut out) {
                    self.send(d, endpoint);
                }
            }
        }
    }

    /// Serves UAPI clients, each on its own thread (at most [`UAPI_CLIENTS`] at once), with a
    /// timeout per read and write and bounded lines, so one slow or silent client never holds
    /// up another.
    fn uapi_loop(self: &Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            if self.uapi_clients.fetch_add(1, Ordering::SeqCst) >= UAPI_CLIENTS {
                self.uapi_clients.fetch_sub(1, Ordering::SeqCst);
                warn!(
                    limit = UAPI_CLIENTS,
                    "too many UAPI clients at once; refusing one"
                );
                continue;
            }
            let d = self.clone();
            let spawned = std::thread::Builder::new()
                .name("wg-uapi".into())
                .spawn(move || {
                    d.serve_uapi_client(conn);
                    d.uapi_clients.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                self.uapi_clients.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn serve_uapi_client(&self, mut conn: std::os::unix::net::UnixStream) {
        let timeouts = conn
            .set_read_timeout(Some(UAPI_TIMEOUT))
            .and_then(|()| conn.set_write_timeout(Some(UAPI_TIMEOUT)));
        let Ok(read_half) = timeouts.and_then(|()| conn.try_clone()) else {
            return;
        };
        let mut reader = uapi::LineReader::new(read_half);
        loop {
            let answer = match uapi::read_request(&mut reader) {
                Ok(None) => break,
                Ok(Some(Request::Get { secrets })) => {
                    let key = secrets
                        .then(|| {
                            self.state()
                                .private
                                .as_ref()
                                .map(|k| PrivateKey::from_bytes(k.secret().to_bytes()))
                        })
                        .flatten();
                    self.info(secrets).to_text(key.as_ref())
                }
                Ok(Some(Request::Set(lines))) => {
                    let errno = match DeviceUpdate::parse(&lines) {
                        Ok(u) => match self.apply(u) {
                            Ok(()) => 0,
                            Err(e) => e,
                        },
                        Err(e) => {
                            warn!(error = %e, "refused a UAPI request");
                            libc::EINVAL
                        }
                    };
                    zeroize::Zeroizing::new(format!("errno={errno}\n\n"))
                }
                Err(uapi::UapiError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    debug!("a UAPI client sent nothing for {UAPI_TIMEOUT:?}; closing it");
                    break;
                }
                Err(e @ uapi::UapiError::TooLong { .. }) => {
                    warn!(error = %e, "refused a UAPI request");
                    let _ = conn.write_all(format!("errno={}\n\n", libc::EINVAL).as_bytes());
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "refused a UAPI request");
                    zeroize::Zeroizing::new(format!("errno={}\n\n", libc::EINVAL))
                }
            };
            if conn.write_all(answer.as_bytes()).is_err() {
                break;
            }
        }
    }
}

/// Creates the device and serves it until SIGTERM/SIGINT.
pub fn run(opts: Options) -> Result<(), DeviceError> {
    let tun =
        crate::tun::open(&opts.interface, opts.offload).map_err(|source| DeviceError::Tun {
            name: opts.interface.clone(),
            source,
        })?;
    let udp =
        UdpSocket::bind(("0.0.0.0", opts.listen_port)).map_err(|source| DeviceError::Udp {
            port: opts.listen_port,
            source,
        })?;
    // Bursts of GSO batches overrun the default buffers (drops show as UdpRcvbufErrors).
    {
        use nix::sys::socket::{setsockopt, sockopt};
        const SOCKET_BUFFER: usize = 8 << 20;
        if setsockopt(&udp, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = setsockopt(&udp, sockopt::RcvBuf, &SOCKET_BUFFER);
        }
        if setsockopt(&udp, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = setsockopt(&udp, sockopt::SndBuf, &SOCKET_BUFFER);
        }
    }
    if opts.offload
        && let Err(e) =
            nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::UdpGroSegment, &true)
    {
        warn!(error = %e, "UDP GRO unavailable; datagrams arrive one by one");
    }
    let uapi_err = |source| DeviceError::Uapi {
        path: opts.uapi_socket.clone(),
        source,
    };
    if let Some(dir) = opts.uapi_socket.parent() {
        std::fs::create_dir_all(dir).map_err(uapi_err)?;
    }
    let _ = std::fs::remove_file(&opts.uapi_socket);
    let listener = UnixListener::bind(&opts.uapi_socket).map_err(uapi_err)?;
    std::fs::set_permissions(&opts.uapi_socket, std::fs::Permissions::from_mode(0o600))
        .map_err(uapi_err)?;
    let dev = Arc::new(Device {
        name: opts.interface.clone(),
        limiter: RwLock::new(None),
        uapi_clients: AtomicUsize::new(0),
        listen_port: opts.listen_port,
        state: RwLock::new(State::default()),
        udp,
        tun,
        gso: AtomicBool::new(opts.offload),
        stop: AtomicBool::new(false),
    });
    info!(interface = %dev.name, port = opts.listen_port, socket = %opts.uapi_socket.display(), "userspace WireGuard device up");
    // Block the stop signals before any thread starts, so every thread inherits the mask and
    // the signal is taken only by the wait below.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    let _ = signals.thread_block();
    // A worker that panics takes the whole device down (its TUN interface goes with the
    // process), for the agent to start a new one: never a device left half-working.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        error!(%info, "a userspace WireGuard thread panicked; stopping the device");
        default_hook(info);
        std::process::exit(70);
    }));
    let spawn = |name: &str, f: fn(&Device)| {
        let d = dev.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&d))
    };
    let threads = [
        spawn("wg-tun", Device::tun_loop),
        spawn("wg-udp", Device::udp_loop),
        spawn("wg-timers", Device::timer_loop),
    ];
    if let Some(e) = threads.iter().find_map(|t| t.as_ref().err()) {
        return Err(DeviceError::Tun {
            name: opts.interface.clone(),
            source: std::io::Error::other(e.to_string()),
        });
    }
    {
        let d = dev.clone();
        std::thread::spawn(move || d.uapi_loop(listener));
    }
    let sig = signals.wait();
    info!(?sig, "stopping the userspace WireGuard device");
    dev.stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&opts.uapi_socket);
    Ok(())
}
