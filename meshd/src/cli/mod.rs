//! The CLI, one module per command group (as cilium-dbg's `cmd/`): each renders what the
//! agent's local API (or, for `bpf`, the pinned maps) says.

pub mod bpf;
pub mod encrypt;
pub mod endpoint;
pub mod monitor;
pub mod policy;
pub mod status;

use meshd_api::Health;

/// A protocol number as policy output shows it.
pub(crate) fn proto_name(p: u8) -> String {
    match p {
        0 => "ANY".into(),
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        p => p.to_string(),
    }
}

pub(crate) fn health(h: &Health) -> &'static str {
    match h {
        Health::Ok => "Ok",
        Health::Degraded => "Degraded",
        Health::Failure => "Failure",
        Health::Disabled => "Disabled",
    }
}

pub(crate) fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use meshd_api::{ComponentStatus, Health, NodeStatus, Status};

    pub fn sample() -> Status {
        Status {
            node_name: "node-1".into(),
            version: "0.1.0".into(),
            kubernetes: ComponentStatus {
                state: Health::Ok,
                message: "Ok".into(),
            },
            node_addresses: vec!["198.18.0.11".parse().unwrap()],
            pod_cidrs: vec!["198.19.1.0/24".into()],
            encryption: "Disabled".into(),
            encryption_health: ComponentStatus {
                state: Health::Disabled,
                message: "Disabled".into(),
            },
            strict_mode: ComponentStatus {
                state: Health::Disabled,
                message: "Disabled".into(),
            },
            datapath: ComponentStatus {
                state: Health::Ok,
                message: "tcx".into(),
            },
            wireguard: None,
            nodes: vec![NodeStatus {
                name: "node-2".into(),
                addresses: vec![],
                pod_cidrs: vec![],
                routes: ComponentStatus {
                    state: Health::Ok,
                    message: "198.19.2.0/24 via 198.18.0.12".into(),
                },
                encryption: None,
            }],
            endpoints: 2,
            uptime_seconds: 61,
        }
    }
}
