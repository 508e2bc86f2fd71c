//! WireGuard for meshd: keys, the UAPI protocol, the userspace device (boringtun's noise core
//! with our own I/O), and the peer set the agent derives from CiliumNodes.

pub mod key;
pub mod peers;
pub mod tun;
pub mod uapi;
pub mod userspace;

pub const INTERFACE: &str = "cilium_wg0";
pub const LISTEN_PORT: u16 = 51871;
pub const FWMARK: u32 = 0x1e00;
/// Underlay MTU minus this is the WireGuard device's MTU (Cilium's WireguardOverhead).
pub const OVERHEAD: u32 = 80;
