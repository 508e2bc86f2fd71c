//! Offloads for the userspace device, as Tailscale did for wireguard-go: the TUN device hands
//! us TCP super-packets (TSO, with a virtio-net header) that we cut into MSS-sized segments
//! ourselves, and encrypted datagrams leave in one `sendmsg` with UDP GSO. Fewer, larger
//! operations is where the per-packet cost goes.

/// `struct virtio_net_hdr` (10 bytes) in front of every packet on a TUN opened with
/// IFF_VNET_HDR.
pub const VNET_HDR_LEN: usize = 10;
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let u16le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16le(2),
            gso_size: u16le(4),
            csum_start: u16le(6),
            csum_offset: u16le(8),
        })
    }
}

/// Ones'-complement sum of `data` added to `sum` (not folded).
pub fn sum16(data: &[u8], mut sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        sum += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

pub fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Finishes a partial checksum (NEEDS_CSUM): the field already holds the pseudo-header sum.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let at = start.checked_add(offset)?;
    if at + 2 > pkt.len() || start > pkt.len() {
        return None;
    }
    let c = fold(sum16(&pkt[start..], 0));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Some(())
}

fn pseudo_header_sum(pkt: &[u8], ipv6: bool, l4_len: usize) -> u64 {
    if ipv6 {
        sum16(&pkt[8..40], 0) + 6 + l4_len as u64
    } else {
        sum16(&pkt[12..20], 0) + 6 + l4_len as u64
    }
}

/// Cuts a TCP super-packet into segments of at most `mss` payload bytes, each with its own
/// IP and TCP headers and correct checksums, appended to `out`; their lengths go to `lens`.
/// Returns `None` (and appends nothing) for anything that is not plain IPv4/IPv6 TCP.
pub fn segment_tcp(pkt: &[u8], mss: usize, out: &mut Vec<u8>, lens: &mut Vec<usize>) -> Option<()> {
    let version = pkt.first()? >> 4;
    let (ip_len, ipv6) = match version {
        4 => (usize::from(pkt[0] & 0x0f) * 4, false),
        6 => (40, true),
        _ => return None,
    };
    if pkt.len() < ip_len + 20 || mss == 0 {
        return None;
    }
    let proto = if ipv6 { pkt[6] } else { pkt[9] };
    if proto != 6 {
        return None;
    }
    let tcp_len = usize::from(pkt[ip_len + 12] >> 4) * 4;
    let hdr_len = ip_len + tcp_len;
    if tcp_len < 20 || pkt.len() < hdr_len {
        return None;
    }
    let payload = &pkt[hdr_len..];
    let seq0 = u32::from_be_bytes([
        pkt[ip_len + 4],
        pkt[ip_len + 5],
        pkt[ip_len + 6],
        pkt[ip_len + 7],
    ]);
    let id0 = if ipv6 {
        0
    } else {
        u16::from_be_bytes([pkt[4], pkt[5]])
    };
    let flags0 = pkt[ip_len + 13];
    let count = payload.len().div_ceil(mss).max(1);
    for i in 0..count {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let start = out.len();
        out.extend_from_slice(&pkt[..hdr_len]);
        out.extend_from_slice(chunk);
        let seg = &mut out[start..];
        let total = hdr_len + chunk.len();
        if ipv6 {
            seg[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = fold(sum16(&seg[..ip_len], 0));
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ip_len;
        seg[t + 4..t + 8].copy_from_slice(&seq0.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut flags = flags0;
        if i + 1 < count {
            flags &= !(0x01 | 0x08); // FIN, PSH only on the last segment
        }
        if i > 0 {
            flags &= !0x80; // CWR only on the first
        }
        seg[t + 13] = flags;
        seg[t + 16..t + 18].copy_from_slice(&[0, 0]);
        let l4 = total - ip_len;
        let c = fold(sum16(&seg[t..total], pseudo_header_sum(seg, ipv6, l4)));
        seg[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        lens.push(total);
    }
    Some(())
}

/// Datagrams to one destination gathered for a single `sendmsg` with UDP_SEGMENT: all of one
/// size, except possibly a shorter last one.
#[derive(Default)]
pub struct GsoBatch {
    pub buf: Vec<u8>,
    pub segment: usize,
    pub count: usize,
    closed: bool,
}

/// Linux accepts at most 64 segments and a 64 KiB payload per UDP GSO send.
pub const MAX_GSO_SEGMENTS: usize = 64;
pub const MAX_GSO_BYTES: usize = 65_000;

impl GsoBatch {
    /// Whether `len` more bytes can join this batch.
    pub fn fits(&self, len: usize) -> bool {
        self.count == 0
            || (!self.closed
                && len <= self.segment
                && self.count < MAX_GSO_SEGMENTS
                && self.buf.len() + len <= MAX_GSO_BYTES)
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.count == 0 {
            self.segment = data.len();
        } else if data.len() < self.segment {
            self.closed = true;
        }
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
        self.segment = 0;
        self.closed = false;
    }
}

/// Receive-side coalescing (GRO towards the TUN device): consecutive segments of one TCP flow
/// become one super-packet with a virtio-net header, so the kernel routes and delivers them
/// once instead of once per segment.
#[derive(Default)]
pub struct Coalescer {
    /// virtio-net header room + the first packet + the payloads appended to it.
    buf: Vec<u8>,
    ip_len: usize,
    tcp_len: usize,
    ipv6: bool,
    mss: usize,
    count: usize,
    next_seq: u32,
    /// No more segments may join (a short or PSH segment ended the run).
    closed: bool,
}

fn tcp_eligible(pkt: &[u8]) -> Option<(usize, usize, bool)> {
    let (ip_len, ipv6) = match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 && pkt[9] == 6 => {
            // Fragments never coalesce.
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff;
            if frag != 0 {
                return None;
            }
            (usize::from(pkt[0] & 0x0f) * 4, false)
        }
        6 if pkt.len() >= 40 && pkt[6] == 6 => (40, true),
        _ => return None,
    };
    if pkt.len() < ip_len + 20 {
        return None;
    }
    let tcp_len = usize::from(pkt[ip_len + 12] >> 4) * 4;
    let flags = pkt[ip_len + 13];
    // SYN, RST, FIN, URG (and CWR/ECE, which must stay on their own segment) pass alone.
    if tcp_len < 20
        || pkt.len() <= ip_len + tcp_len
        || flags & (0x02 | 0x04 | 0x01 | 0x20 | 0x40 | 0x80) != 0
    {
        return None;
    }
    Some((ip_len, tcp_len, ipv6))
}

fn seq(pkt: &[u8], ip_len: usize) -> u32 {
    u32::from_be_bytes([
        pkt[ip_len + 4],
        pkt[ip_len + 5],
        pkt[ip_len + 6],
        pkt[ip_len + 7],
    ])
}

impl Coalescer {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn first(&self) -> &[u8] {
        &self.buf[VNET_HDR_LEN..]
    }

    /// Adds `pkt` if it continues the current run; `false` means: flush, then `start` it.
    pub fn try_append(&mut self, pkt: &[u8]) -> bool {
        if self.count == 0 || self.closed {
            return false;
        }
        let Some((ip_len, tcp_len, ipv6)) = tcp_eligible(pkt) else {
            return false;
        };
        let first = self.first();
        if ip_len != self.ip_len || tcp_len != self.tcp_len || ipv6 != self.ipv6 {
            return false;
        }
        let payload = pkt.len() - ip_len - tcp_len;
        let same_addrs = if ipv6 {
            first[8..40] == pkt[8..40]
        } else {
            first[12..20] == pkt[12..20] && first[1] == pkt[1] && first[8] == pkt[8]
        };
        let t = ip_len;
        let same_tcp = first[t..t + 4] == pkt[t..t + 4]          // ports
            && first[t + 8..t + 12] == pkt[t + 8..t + 12]        // ack
            && first[t + 14..t + 16] == pkt[t + 14..t + 16]      // window
            && first[t + 20..t + tcp_len] == pkt[t + 20..t + tcp_len] // options
            && (first[t + 13] & !0x08) == (pkt[t + 13] & !0x08);
        let total = self.buf.len() - VNET_HDR_LEN + payload;
        if !same_addrs
            || !same_tcp
            || seq(pkt, ip_len) != self.next_seq
            || payload > self.mss
            || total > 65_535
        {
            return false;
        }
        self.buf.extend_from_slice(&pkt[ip_len + tcp_len..]);
        self.count += 1;
        self.next_seq = self.next_seq.wrapping_add(payload as u32);
        if payload < self.mss || pkt[t + 13] & 0x08 != 0 {
            self.closed = true;
            // The run takes the closing segment's PSH.
            let b = &mut self.buf[VNET_HDR_LEN..];
            b[t + 13] |= pkt[t + 13] & 0x08;
        }
        true
    }

    /// Starts a run with `pkt`; returns `false` if it can never coalesce (write it alone).
    pub fn start(&mut self, pkt: &[u8]) -> bool {
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        let Some((ip_len, tcp_len, ipv6)) = tcp_eligible(pkt) else {
            return false;
        };
        self.buf.resize(VNET_HDR_LEN, 0);
        self.buf.extend_from_slice(pkt);
        self.ip_len = ip_len;
        self.tcp_len = tcp_len;
        self.ipv6 = ipv6;
        self.mss = pkt.len() - ip_len - tcp_len;
        self.next_seq = seq(pkt, ip_len).wrapping_add(self.mss as u32);
        self.count = 1;
        // PSH: deliver now, nothing joins.
        self.closed = pkt[ip_len + 13] & 0x08 != 0;
        true
    }

    /// Finishes the run and returns the bytes to write to the TUN device (virtio-net header
    /// included); the coalescer is empty afterwards.
    pub fn finish(&mut self) -> &[u8] {
        let count = std::mem::take(&mut self.count);
        if count <= 1 {
            self.buf[..VNET_HDR_LEN].fill(0);
            return &self.buf;
        }
        let (ip_len, tcp_len, ipv6, mss) = (self.ip_len, self.tcp_len, self.ipv6, self.mss);
        let pkt = &mut self.buf[VNET_HDR_LEN..];
        let total = pkt.len();
        if ipv6 {
            pkt[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            pkt[10..12].copy_from_slice(&[0, 0]);
            let c = fold(sum16(&pkt[..ip_len], 0));
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
        }
        // CHECKSUM_PARTIAL: the field holds the (uncomplemented) pseudo-header sum.
        let seed = !fold(pseudo_header_sum(pkt, ipv6, total - ip_len));
        pkt[ip_len + 16..ip_len + 18].copy_from_slice(&seed.to_be_bytes());
        let hdr = &mut self.buf[..VNET_HDR_LEN];
        hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        hdr[1] = if ipv6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        };
        hdr[2..4].copy_from_slice(&((ip_len + tcp_len) as u16).to_le_bytes());
        hdr[4..6].copy_from_slice(&(mss as u16).to_le_bytes());
        hdr[6..8].copy_from_slice(&(ip_len as u16).to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/TCP packet with `payload` bytes and a given sequence number.
    fn tcp4(payload: usize, seq: u32, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&100u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 19, 1, 10]);
        p[16..20].copy_from_slice(&[198, 19, 2, 10]);
        p[20..22].copy_from_slice(&5201u16.to_be_bytes());
        p[22..24].copy_from_slice(&40000u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        p
    }

    /// A checksum over data that includes its own correct checksum folds to zero.
    fn verifies(seg: &[u8]) -> bool {
        let ip_ok = fold(sum16(&seg[..20], 0)) == 0;
        let l4 = seg.len() - 20;
        let tcp_ok = fold(sum16(&seg[20..], pseudo_header_sum(seg, false, l4))) == 0;
        ip_ok && tcp_ok
    }

    #[test]
    fn segments_carry_their_own_headers_and_checksums() {
        let pkt = tcp4(3000, 1000, 0x18 | 0x01); // PSH|ACK|FIN
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        segment_tcp(&pkt, 1400, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![1440, 1440, 240]);
        let mut at = 0;
        let mut payload = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            let seg = &out[at..at + len];
            assert!(verifies(seg), "segment {i} has a bad checksum");
            assert_eq!(u16::from_be_bytes([seg[2], seg[3]]) as usize, *len);
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 100 + i as u16);
            assert_eq!(
                u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]),
                1000 + 1400 * i as u32
            );
            let last = i == lens.len() - 1;
            assert_eq!(
                seg[33] & 0x09 != 0,
                last,
                "FIN/PSH only on the last segment"
            );
            payload.extend_from_slice(&seg[40..]);
            at += len;
        }
        assert_eq!(
            payload,
            pkt[40..],
            "the payload survives intact and in order"
        );
    }

    #[test]
    fn non_tcp_is_refused_and_partial_checksums_complete() {
        let mut udp = tcp4(10, 0, 0);
        udp[9] = 17;
        assert!(segment_tcp(&udp, 1400, &mut Vec::new(), &mut Vec::new()).is_none());
        // A NEEDS_CSUM packet: TCP checksum field seeded with the pseudo-header sum.
        let mut p = tcp4(500, 7, 0x10);
        let ph = pseudo_header_sum(&p, false, p.len() - 20);
        let folded = !fold(ph);
        p[36..38].copy_from_slice(&folded.to_be_bytes());
        let ipc = fold(sum16(&p[..20], 0));
        p[10..12].copy_from_slice(&ipc.to_be_bytes());
        complete_checksum(&mut p, 20, 16).unwrap();
        assert!(verifies(&p));
    }

    #[test]
    fn coalescing_undoes_segmentation() {
        let pkt = tcp4(5000, 77, 0x18); // PSH|ACK
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        segment_tcp(&pkt, 1400, &mut out, &mut lens).unwrap();
        let mut c = Coalescer::default();
        let mut at = 0;
        for (i, len) in lens.iter().enumerate() {
            let seg = &out[at..at + len];
            if i == 0 {
                assert!(c.start(seg));
            } else {
                assert!(c.try_append(seg), "segment {i} continues the run");
            }
            at += len;
        }
        let written = c.finish().to_vec();
        let v = VnetHdr::parse(&written).unwrap();
        assert_eq!(
            (
                v.gso_type,
                v.gso_size,
                v.hdr_len,
                v.csum_start,
                v.csum_offset
            ),
            (VIRTIO_NET_HDR_GSO_TCPV4, 1400, 40, 20, 16)
        );
        let body = &written[VNET_HDR_LEN..];
        assert_eq!(body.len(), pkt.len());
        assert_eq!(&body[40..], &pkt[40..], "payload back in one piece");
        assert_eq!(body[33] & 0x08, 0x08, "PSH of the last segment kept");
        assert!(fold(sum16(&body[..20], 0)) == 0, "IPv4 header checksum");
        // The kernel completes a partial checksum from the seed: that must give a valid sum.
        let mut done = body.to_vec();
        complete_checksum(&mut done, 20, 16).unwrap();
        assert_eq!(
            fold(sum16(
                &done[20..],
                pseudo_header_sum(&done, false, done.len() - 20)
            )),
            0
        );
    }

    #[test]
    fn runs_break_on_gaps_other_flows_and_control_flags() {
        let a = tcp4(1400, 1000, 0x10);
        let mut c = Coalescer::default();
        assert!(c.start(&a));
        assert!(!c.try_append(&tcp4(1400, 5000, 0x10)), "a sequence gap");
        let mut other = tcp4(1400, 2400, 0x10);
        other[22..24].copy_from_slice(&1u16.to_be_bytes());
        assert!(!c.try_append(&other), "another flow");
        assert!(!c.try_append(&tcp4(1400, 2400, 0x11)), "FIN");
        assert!(
            c.try_append(&tcp4(700, 2400, 0x10)),
            "a short segment ends the run"
        );
        assert!(
            !c.try_append(&tcp4(1400, 3100, 0x10)),
            "nothing after a short segment"
        );
        assert!(
            !Coalescer::default().start(&tcp4(10, 1, 0x02)),
            "SYN never coalesces"
        );
        let single = tcp4(100, 1, 0x10);
        let mut c = Coalescer::default();
        assert!(c.start(&single));
        assert_eq!(
            c.finish()[..VNET_HDR_LEN],
            [0; VNET_HDR_LEN],
            "one packet goes out plain"
        );
    }

    #[test]
    fn gso_batches_take_equal_sizes_then_one_shorter() {
        let mut b = GsoBatch::default();
        assert!(b.fits(100));
        b.push(&[0; 100]);
        assert!(b.fits(100));
        b.push(&[0; 100]);
        assert!(!b.fits(120), "a larger datagram cannot join");
        assert!(b.fits(40));
        b.push(&[0; 40]);
        assert!(!b.fits(40), "nothing after the shorter last one");
        assert_eq!((b.count, b.segment, b.buf.len()), (3, 100, 240));
    }
}
