//! The byte layouts of meshd's eBPF maps and events (CILIUM-CONTRACT.md), shared by the
//! programs and user space. Every struct is `#[repr(C)]` with explicit padding.

#![no_std]
#![cfg_attr(
    feature = "user",
    allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")
)]

/// Policy map LPM data; the map key is `{u32 prefixlen; PolicyKey}` (12 bytes).
/// `prefixlen = 40 + (proto ? 8 : 0) + port bits`; identity 0 = any peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PolicyKey {
    pub identity: u32,
    pub egress: u8,
    pub proto: u8,
    /// Network byte order.
    pub dport: u16,
}

pub const POLICY_FLAG_DENY: u8 = 1;

/// `{be16 proxy_port; u8 flags (bit0 deny); u8 auth_type; u8 proxy_port_priority; u8; u16}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValue {
    pub proxy_port: u16,
    pub flags: u8,
    /// Auth type | 0x80 when set explicitly.
    pub auth_type: u8,
    pub proxy_port_priority: u8,
    pub pad0: u8,
    pub pad1: u16,
}

/// Auth map key (12 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct AuthKey {
    pub local_identity: u32,
    pub remote_identity: u32,
    pub remote_node_id: u16,
    pub auth_type: u8,
    pub pad: u8,
}

/// Expiration in seconds of CLOCK_MONOTONIC (what `bpf_ktime_get_ns` counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AuthValue {
    pub expiration: u64,
}

/// ipcache: IPv4 prefix (LPM data = the 4 address bytes) → identity and node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    pub node_id: u16,
    pub pad: u16,
}

/// Connection tracking key, as the packet travels (saddr/sport are the sender's), scoped to
/// the endpoint's interface: on one node, a flow the client's egress policy allowed must still
/// pass the server's ingress policy, so each endpoint remembers its own verdicts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct CtKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
    /// The endpoint's host-side veth.
    pub ifindex: u32,
}

/// A remembered flow, one entry per direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// Last time (CLOCK_MONOTONIC ns, refreshed at most once a second) a packet was seen.
    pub seen_ns: u64,
    /// The endpoint's policy revision when the flow was allowed: a forward packet seen under
    /// a newer revision is judged again, so revoking access cuts existing connections too.
    pub revision: u32,
    /// `CT_FLAG_REPLY`: this entry is the flow's reply direction (passes without policy).
    pub flags: u32,
}

pub const CT_FLAG_REPLY: u32 = 1;

/// Per program instance (endpoint) settings: ARRAY map with one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointConfig {
    pub local_identity: u32,
    pub ingress_enforced: u8,
    pub egress_enforced: u8,
    pub pad: u16,
    /// Bumped (by the loader) whenever the endpoint's policy or settings change.
    pub policy_revision: u32,
}

pub const EVENT_DROP: u8 = 1;
pub const EVENT_AUTH_REQUIRED: u8 = 2;
/// Cilium's signal number for AUTH_REQUIRED.
pub const SIGNAL_AUTH_REQUIRED: u32 = 2;
pub const REASON_POLICY_DENIED: u8 = 133;
pub const REASON_AUTH_REQUIRED: u8 = 189;
/// Cilium's DROP_UNENCRYPTED_TRAFFIC: strict mode refused a pod packet that would have left
/// the node unencrypted.
pub const REASON_UNENCRYPTED: u8 = 195;

/// Encryption strict mode (`MESHD_STRICT_CFG`, an ARRAY map with one entry, pinned): a local
/// pod's packet to a strict prefix (`MESHD_STRICT4` / `MESHD_STRICT6`) passes only if the
/// kernel's route for it goes into `encrypt_ifindex` or to a local endpoint's interface
/// (`MESHD_LOCAL_IFS`), or it is delivered locally; anything else is dropped with
/// [`REASON_UNENCRYPTED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StrictConfig {
    pub enabled: u8,
    /// `encryption-strict-mode-allow-remote-node-identities`: a destination the ipcache calls
    /// remote-node (identity 6) may be reached unencrypted.
    pub allow_remote_node: u8,
    pub pad: u16,
    /// The encryption device (`cilium_wg0`); 0: none, so nothing in the strict prefixes leaves.
    pub encrypt_ifindex: u32,
}

/// Per-CPU drop counters (`MESHD_METRICS`, a PERCPU_ARRAY): slot `reason * 2 + egress`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricValue {
    pub count: u64,
    pub bytes: u64,
}

pub const METRICS_SLOTS: u32 = 512;

pub const fn metrics_slot(reason: u8, egress: bool) -> u32 {
    reason as u32 * 2 + egress as u32
}

/// Ring-buffer event: a drop (reason, identities, addresses, port) or an AUTH_REQUIRED
/// signal (`signal_nr = 2` with the auth key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    pub kind: u8,
    pub reason: u8,
    pub proto: u8,
    pub egress: u8,
    pub signal_nr: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Host byte order.
    pub dport: u16,
    pub pad: u16,
    pub auth: AuthKey,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::AuthKey {}
    unsafe impl aya::Pod for super::AuthValue {}
    unsafe impl aya::Pod for super::IpcacheValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::EndpointConfig {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::StrictConfig {}
    unsafe impl aya::Pod for super::MetricValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_contract() {
        // policy key = 4 (prefixlen) + 8; value 8; auth key 12, value 8.
        assert_eq!(4 + size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(
            (
                offset_of!(PolicyValue, flags),
                offset_of!(PolicyValue, auth_type)
            ),
            (2, 3)
        );
        assert_eq!(size_of::<AuthKey>(), 12);
        assert_eq!(
            (
                offset_of!(AuthKey, remote_identity),
                offset_of!(AuthKey, remote_node_id),
                offset_of!(AuthKey, auth_type)
            ),
            (4, 8, 10)
        );
        assert_eq!(size_of::<AuthValue>(), 8);
        assert_eq!(size_of::<IpcacheValue>(), 8);
        assert_eq!(size_of::<CtKey>(), 20);
        assert_eq!(size_of::<EndpointConfig>(), 12);
        assert_eq!(size_of::<CtValue>(), 16);
        assert_eq!(size_of::<Event>(), 40);
        assert_eq!(size_of::<StrictConfig>(), 8);
        assert_eq!(size_of::<MetricValue>(), 16);
        assert_eq!(metrics_slot(195, true), 391);
        assert!(metrics_slot(255, true) < METRICS_SLOTS);
    }
}
