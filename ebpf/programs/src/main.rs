//! meshd's TC programs on each endpoint's host-side veth: `from_endpoint` (TC ingress of the
//! veth = traffic the pod sends = its egress policy) and `to_endpoint` (TC egress of the veth =
//! traffic to the pod = its ingress policy). Verdicts: allow (and remember the flow), deny
//! (reason 133), or auth required without a live auth entry (AUTH_REQUIRED signal, reason 189).
//! With encryption strict mode, `from_endpoint` first asks the kernel's FIB where a packet to a
//! strict prefix would go, and drops it (reason 195) unless that is the encryption device, a
//! local endpoint or local delivery: a dead tunnel device, a missing route or the agent being
//! down never lets pod traffic leave in the clear. Drops are counted per CPU.

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
    use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
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
    #[map(name = "MESHD_STRICT_CFG")]
    static STRICT_CFG: Array<StrictConfig> = Array::pinned(1, 0);
    #[map(name = "MESHD_STRICT4")]
    static STRICT4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(65536, BPF_F_NO_PREALLOC);
    #[map(name = "MESHD_STRICT6")]
    static STRICT6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(65536, BPF_F_NO_PREALLOC);
    /// Interfaces of local endpoints (host-side veths): traffic routed into one stays on the node.
    #[map(name = "MESHD_LOCAL_IFS")]
    static LOCAL_IFS: HashMap<u32, u8> = HashMap::pinned(65536, BPF_F_NO_PREALLOC);
    #[map(name = "MESHD_METRICS")]
    static METRICS: PerCpuArray<MetricValue> = PerCpuArray::pinned(METRICS_SLOTS, 0);

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

    const REMOTE_NODE: u32 = 6;
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;

    /// Counts a drop (per CPU: no shared cache line).
    #[inline(always)]
    fn count_drop(ctx: &TcContext, reason: u8, egress: bool) {
        if let Some(m) = METRICS.get_ptr_mut(metrics_slot(reason, egress)) {
            // SAFETY: a per-CPU slot of a map lookup, valid for this run, touched by this CPU only.
            let m = unsafe { &mut *m };
            m.count += 1;
            m.bytes += u64::from(ctx.len());
        }
    }

    /// Where the kernel would send a packet from this endpoint to `dst` (`family` AF_INET with
    /// the address in the first 4 bytes, or AF_INET6): whether it stays encrypted or on the
    /// node. Everything else (another device, no route, a blackhole or unreachable route)
    /// would leave in the clear or is refused anyway.
    #[inline(never)]
    fn leaves_encrypted(
        ctx: &TcContext,
        cfg: &StrictConfig,
        family: u8,
        src: &[u32; 4],
        dst: &[u32; 4],
    ) -> bool {
        use aya_ebpf::bindings::*;
        // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
        let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
        fib.family = family;
        // SAFETY: the context's __sk_buff is valid for the program's run.
        fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if family == AF_INET {
            fib.__bindgen_anon_3.ipv4_src = src[0];
            fib.__bindgen_anon_4.ipv4_dst = dst[0];
        } else {
            fib.__bindgen_anon_3.ipv6_src = *src;
            fib.__bindgen_anon_4.ipv6_dst = *dst;
        }
        // SAFETY: the helper reads and writes `fib`, a stack object of the size passed.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_fib_lookup(
                ctx.skb.skb as *mut _,
                &mut fib,
                core::mem::size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        };
        if rc < 0 {
            return false;
        }
        let rc = rc as u32;
        if rc == BPF_FIB_LKUP_RET_NOT_FWDED {
            // Delivered to this node itself.
            return true;
        }
        let routed = rc == BPF_FIB_LKUP_RET_SUCCESS
            || rc == BPF_FIB_LKUP_RET_NO_NEIGH
            || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED;
        if !routed {
            return false;
        }
        (cfg.encrypt_ifindex != 0 && fib.ifindex == cfg.encrypt_ifindex)
            // SAFETY: a map lookup by value.
            || unsafe { LOCAL_IFS.get(&fib.ifindex) }.is_some()
    }

    /// Strict mode for an IPv4 packet from the endpoint: `true` = drop it.
    #[inline(always)]
    fn strict_refuses_v4(ctx: &TcContext, p: &Packet) -> bool {
        let Some(cfg) = STRICT_CFG.get(0) else {
            return false;
        };
        if cfg.enabled == 0 || STRICT4.get(Key::new(32, p.daddr)).is_none() {
            return false;
        }
        if cfg.allow_remote_node != 0
            && IPCACHE
                .get(Key::new(32, p.daddr))
                .is_some_and(|v| v.identity == REMOTE_NODE)
        {
            return false;
        }
        let src = [u32::from_ne_bytes(p.saddr), 0, 0, 0];
        let dst = [u32::from_ne_bytes(p.daddr), 0, 0, 0];
        !leaves_encrypted(ctx, cfg, AF_INET, &src, &dst)
    }

    /// Strict mode for an IPv6 packet from the endpoint (Cilium's is IPv4 only): `true` = drop.
    #[inline(never)]
    fn strict_refuses_v6(ctx: &TcContext) -> bool {
        let Some(cfg) = STRICT_CFG.get(0) else {
            return false;
        };
        if cfg.enabled == 0 || !ctx.load::<u16>(12).is_ok_and(|t| u16::from_be(t) == 0x86dd) {
            return false;
        }
        // Ethernet (14), then the IPv6 header: source at 8, destination at 24.
        let (Ok(src), Ok(dst)) = (ctx.load::<[u8; 16]>(14 + 8), ctx.load::<[u8; 16]>(14 + 24))
        else {
            // Unreadable: judged as the worst case.
            return true;
        };
        if STRICT6.get(Key::new(128, dst)).is_none() {
            return false;
        }
        let words = |a: [u8; 16]| {
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ]
        };
        !leaves_encrypted(ctx, cfg, AF_INET6, &words(src), &words(dst))
    }

    fn unencrypted_drop(ctx: &TcContext, p: &Packet) -> i32 {
        count_drop(ctx, REASON_UNENCRYPTED, true);
        let local = CONFIG.get(0).map_or(0, |c| c.local_identity);
        let remote = IPCACHE
            .get(Key::new(32, p.daddr))
            .map_or(WORLD, |v| v.identity);
        emit(
            EVENT_DROP,
            REASON_UNENCRYPTED,
            true,
            p,
            local,
            remote,
            AuthKey::default(),
        );
        TC_ACT_SHOT as i32
    }

    fn verdict(ctx: &TcContext, egress: bool) -> i32 {
        let Some(p) = parse(ctx) else {
            if egress && strict_refuses_v6(ctx) {
                count_drop(ctx, REASON_UNENCRYPTED, true);
                let none = Packet {
                    saddr: [0; 4],
                    daddr: [0; 4],
                    proto: 0,
                    sport: 0,
                    dport: 0,
                    tcp_flags: 0,
                };
                let local = CONFIG.get(0).map_or(0, |c| c.local_identity);
                emit(
                    EVENT_DROP,
                    REASON_UNENCRYPTED,
                    true,
                    &none,
                    local,
                    WORLD,
                    AuthKey::default(),
                );
                return TC_ACT_SHOT as i32;
            }
            return not_ipv4(ctx, egress);
        };
        // Strict mode before anything else, established flows included: a flow allowed a
        // minute ago must not leave in the clear because the tunnel died since.
        if egress && strict_refuses_v4(ctx, &p) {
            return unencrypted_drop(ctx, &p);
        }
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
                count_drop(ctx, REASON_POLICY_DENIED, egress);
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
                count_drop(ctx, REASON_AUTH_REQUIRED, egress);
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
