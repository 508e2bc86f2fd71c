//! meshd's TC programs on each endpoint's host-side veth: `from_endpoint` (TC ingress of the
//! veth = traffic the pod sends = its egress policy) and `to_endpoint` (TC egress of the veth =
//! traffic to the pod = its ingress policy). Verdicts: allow (and remember the flow), deny
//! (reason 133), or auth required without a live auth entry (AUTH_REQUIRED signal, reason 189).

#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(
    target_arch = "bpf",
    allow(unsafe_code, reason = "eBPF helpers and packet access are unsafe")
)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT};
    use aya_ebpf::helpers::bpf_ktime_get_ns;
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::lpm_trie::Key;
    use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, RingBuf};
    use aya_ebpf::programs::TcContext;
    use ebpf_common::*;

    const WORLD: u32 = 2;
    /// Idle time after which a remembered flow is evaluated against policy again.
    const CT_LIFETIME_NS: u64 = 60 * 1_000_000_000;
    const CT_REFRESH_NS: u64 = 1_000_000_000;

    #[map(name = "MESHD_IPCACHE")]
    static IPCACHE: LpmTrie<[u8; 4], IpcacheValue> = LpmTrie::pinned(65536, BPF_F_NO_PREALLOC);
    #[map(name = "MESHD_AUTH")]
    static AUTH: HashMap<AuthKey, AuthValue> = HashMap::pinned(524288, BPF_F_NO_PREALLOC);
    #[map(name = "MESHD_CT")]
    static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(65536, 0);
    #[map(name = "MESHD_EVENTS")]
    static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);
    /// Per endpoint (per loaded instance): its policy and settings.
    #[map(name = "POLICY")]
    static POLICY: LpmTrie<PolicyKey, PolicyValue> =
        LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);
    #[map(name = "CONFIG")]
    static CONFIG: Array<EndpointConfig> = Array::with_max_entries(1, 0);

    #[classifier]
    pub fn from_endpoint(ctx: TcContext) -> i32 {
        verdict(&ctx, true)
    }

    #[classifier]
    pub fn to_endpoint(ctx: TcContext) -> i32 {
        verdict(&ctx, false)
    }

    struct Packet {
        saddr: [u8; 4],
        daddr: [u8; 4],
        proto: u8,
        sport: u16,
        dport: u16,
        /// TCP flags (0 for other protocols).
        tcp_flags: u8,
    }

    const TCP_SYN: u8 = 0x02;
    const TCP_ACK: u8 = 0x10;

    impl Packet {
        /// A TCP packet that does not open a connection (anything but a bare SYN).
        fn tcp_midstream(&self) -> bool {
            self.proto == 6 && self.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
        }
    }

    /// Headers read straight from the packet (no helper call per field); a packet whose
    /// headers are not in the linear area goes through the helper-based reader.
    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Packet> {
        let (start, end) = (ctx.data(), ctx.data_end());
        // Ethernet (14) + the fixed IPv4 header (20).
        if start + 34 > end {
            return parse_slow(ctx);
        }
        // SAFETY: bounds checked against data_end just above (the verifier checks it too).
        let eth = unsafe { core::slice::from_raw_parts(start as *const u8, 34) };
        if eth[12] != 0x08 || eth[13] != 0x00 {
            return None;
        }
        let ihl = usize::from(eth[14] & 0x0f) * 4;
        let proto = eth[14 + 9];
        let saddr = [eth[26], eth[27], eth[28], eth[29]];
        let daddr = [eth[30], eth[31], eth[32], eth[33]];
        let (sport, dport, tcp_flags) = if proto == 6 || proto == 17 || proto == 132 {
            let l4 = start + 14 + ihl;
            // Ports, and for TCP the flags byte (offset 13).
            let need = if proto == 6 { 14 } else { 4 };
            if l4 + need > end {
                return parse_slow(ctx);
            }
            // SAFETY: bounds checked against data_end just above.
            let h = unsafe { core::slice::from_raw_parts(l4 as *const u8, need) };
            (
                u16::from_be_bytes([h[0], h[1]]),
                u16::from_be_bytes([h[2], h[3]]),
                if proto == 6 { h[13] } else { 0 },
            )
        } else {
            (0, 0, 0)
        };
        Some(Packet {
            saddr,
            daddr,
            proto,
            sport,
            dport,
            tcp_flags,
        })
    }

    /// Policy is IPv4-only for now: IPv6 in a direction a policy enforces is dropped (failing
    /// closed rather than letting it bypass the policy); ARP and the rest pass.
    #[inline(never)]
    fn not_ipv4(ctx: &TcContext, egress: bool) -> i32 {
        let ipv6 = ctx.load::<u16>(12).is_ok_and(|t| u16::from_be(t) == 0x86dd);
        let enforced = CONFIG.get(0).is_some_and(|c| {
            if egress {
                c.egress_enforced != 0
            } else {
                c.ingress_enforced != 0
            }
        });
        if ipv6 && enforced {
            TC_ACT_SHOT as i32
        } else {
            TC_ACT_OK as i32
        }
    }

    #[inline(never)]
    fn parse_slow(ctx: &TcContext) -> Option<Packet> {
        let ethertype: u16 = u16::from_be(ctx.load(12).ok()?);
        if ethertype != 0x0800 {
            return None;
        }
        let vihl: u8 = ctx.load(14).ok()?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        let proto: u8 = ctx.load(14 + 9).ok()?;
        let saddr: [u8; 4] = ctx.load(14 + 12).ok()?;
        let daddr: [u8; 4] = ctx.load(14 + 16).ok()?;
        let (sport, dport) = if proto == 6 || proto == 17 || proto == 132 {
            let s: u16 = ctx.load(14 + ihl).ok()?;
            let d: u16 = ctx.load(14 + ihl + 2).ok()?;
            (u16::from_be(s), u16::from_be(d))
        } else {
            (0, 0)
        };
        let tcp_flags: u8 = if proto == 6 {
            ctx.load(14 + ihl + 13).ok()?
        } else {
            0
        };
        Some(Packet {
            saddr,
            daddr,
            proto,
            sport,
            dport,
            tcp_flags,
        })
    }

    fn lookup(identity: u32, egress: bool, p: &Packet) -> Option<PolicyValue> {
        let key = Key::new(
            64,
            PolicyKey {
                identity,
                egress: egress as u8,
                proto: p.proto,
                dport: p.dport.to_be(),
            },
        );
        POLICY.get(&key).copied()
    }

    fn emit(
        kind: u8,
        reason: u8,
        egress: bool,
        p: &Packet,
        local: u32,
        remote: u32,
        auth: AuthKey,
    ) {
        if let Some(mut e) = EVENTS.reserve::<Event>(0) {
            let (src, dst) = if egress {
                (local, remote)
            } else {
                (remote, local)
            };
            e.write(Event {
                kind,
                reason,
                proto: p.proto,
                egress: egress as u8,
                signal_nr: if kind == EVENT_AUTH_REQUIRED {
                    SIGNAL_AUTH_REQUIRED
                } else {
                    0
                },
                src_identity: src,
                dst_identity: dst,
                saddr: p.saddr,
                daddr: p.daddr,
                dport: p.dport,
                pad: 0,
                auth,
            });
            e.submit(0);
        }
    }

    fn verdict(ctx: &TcContext, egress: bool) -> i32 {
        let Some(p) = parse(ctx) else {
            return not_ipv4(ctx, egress);
        };
        // Conntrack: replies and later packets of a flow this endpoint allowed pass without a
        // policy lookup, as long as the endpoint's policy has not changed since.
        // SAFETY: the context's __sk_buff is valid for the program's run; ifindex is readable.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let fwd = CtKey {
            saddr: p.saddr,
            daddr: p.daddr,
            sport: p.sport,
            dport: p.dport,
            proto: p.proto,
            pad: [0; 3],
            ifindex,
        };
        let rev = CtKey {
            saddr: p.daddr,
            daddr: p.saddr,
            sport: p.dport,
            dport: p.sport,
            proto: p.proto,
            pad: [0; 3],
            ifindex,
        };
        let now = unsafe { bpf_ktime_get_ns() };
        let Some(cfg) = CONFIG.get(0).copied() else {
            return TC_ACT_OK as i32;
        };
        // The packet's own direction first; its reverse only if that entry is missing (e.g.
        // evicted): then the packet is a reply if the reverse entry is a forward one.
        let mut stale = false;
        for (k, reverse) in [(&fwd, false), (&rev, true)] {
            let Some(entry) = CT.get_ptr_mut(k) else {
                continue;
            };
            // SAFETY: a pointer from a map lookup stays valid for this program run.
            let e = unsafe { &mut *entry };
            let idle = now.saturating_sub(e.seen_ns);
            if idle >= CT_LIFETIME_NS {
                // Idle too long: judged afresh.
                break;
            }
            let reply = (e.flags & CT_FLAG_REPLY != 0) != reverse;
            if !reply && e.revision != cfg.policy_revision {
                // A forward packet allowed under an older policy: judged again.
                stale = true;
                break;
            }
            // Refreshed at most once a second: no cache-line write per packet.
            if idle > CT_REFRESH_NS {
                e.seen_ns = now;
            }
            return TC_ACT_OK as i32;
        }
        let enforced = if egress {
            cfg.egress_enforced
        } else {
            cfg.ingress_enforced
        } != 0;
        let remote_ip = if egress { p.daddr } else { p.saddr };
        let (remote, node_id) = match IPCACHE.get(Key::new(32, remote_ip)) {
            Some(v) => (v.identity, v.node_id),
            None => (WORLD, 0),
        };
        // Both directions are remembered, so every later packet (replies included) finds its
        // entry with the first lookup.
        let allow = |_: &Packet| {
            let entry = |flags| CtValue {
                seen_ns: now,
                revision: cfg.policy_revision,
                flags,
            };
            let _ = CT.insert(&fwd, &entry(0), 0);
            let _ = CT.insert(&rev, &entry(CT_FLAG_REPLY), 0);
            TC_ACT_OK as i32
        };
        // A flow that the current policy no longer allows is forgotten where it is dropped.
        let forget = || {
            if stale {
                let _ = CT.remove(&fwd);
                let _ = CT.remove(&rev);
            }
        };
        if !enforced {
            // Passing through an unenforced direction remembers only flows it opens: a TCP
            // packet from the middle of a connection (say, the server's after its client was
            // cut off by a policy change) must not found a flow that would pass the client's
            // packets back in as "replies".
            if p.tcp_midstream() {
                return TC_ACT_OK as i32;
            }
            return allow(&p);
        }
        let specific = lookup(remote, egress, &p);
        let wildcard = lookup(0, egress, &p);
        let entry = match (specific, wildcard) {
            (_, Some(w)) if w.flags & POLICY_FLAG_DENY != 0 => Some(w),
            (Some(s), _) => Some(s),
            (None, w) => w,
        };
        // No entry, or a deny entry: Policy denied.
        let v = match entry {
            Some(v) if v.flags & POLICY_FLAG_DENY == 0 => v,
            _ => {
                emit(
                    EVENT_DROP,
                    REASON_POLICY_DENIED,
                    egress,
                    &p,
                    cfg.local_identity,
                    remote,
                    AuthKey::default(),
                );
                forget();
                return TC_ACT_SHOT as i32;
            }
        };
        let auth_type = v.auth_type & 0x7f;
        if auth_type != 0 {
            let key = AuthKey {
                local_identity: cfg.local_identity,
                remote_identity: remote,
                remote_node_id: node_id,
                auth_type,
                pad: 0,
            };
            let now_s = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
            let live = unsafe { AUTH.get(&key) }.is_some_and(|a| now_s < a.expiration);
            if !live {
                emit(
                    EVENT_AUTH_REQUIRED,
                    REASON_AUTH_REQUIRED,
                    egress,
                    &p,
                    cfg.local_identity,
                    remote,
                    key,
                );
                forget();
                return TC_ACT_SHOT as i32;
            }
        }
        allow(&p)
    }

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
