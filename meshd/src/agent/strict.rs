//! Encryption strict mode (Cilium's `enable-encryption-strict-mode`): keeps the datapath's
//! strict maps equal to what the configuration and the cluster say — the strict prefixes (the
//! configured CIDRs, else the cluster's pod range, else every pod CIDR of the cluster), the
//! encryption device, and the interfaces of local endpoints. The programs do the rest: a local
//! pod's packet to a strict prefix that the kernel would not send into the encryption device is
//! dropped with reason 195. The maps are pinned, so this holds with the agent stopped too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshd_api::{ComponentStatus, EndpointSpec, Health};
use tracing::{info, warn};

use super::encryption::EncryptionBackend;
use super::nodes::NodeTable;
use super::state::{Reader, Writer, any_change};
use super::{AgentError, NodesView, RoutesView};

/// What the configuration says about strict mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    /// `encryption-strict-mode-cidr` (empty: derived from the cluster).
    pub cidrs: Vec<ipnet::IpNet>,
    /// `cluster-pool-ipv4-cidr`, the default when no CIDR is configured.
    pub cluster_pod_range: Option<ipnet::IpNet>,
    /// This node's pod CIDRs (part of the derived default).
    pub own_cidrs: Vec<ipnet::IpNet>,
    pub allow_remote_node: bool,
}

/// The strict prefixes: configured, else the cluster's pod range, else every valid pod CIDR
/// the table holds (refused claims are not in it) and the own.
pub fn prefixes(settings: &Settings, table: &NodeTable) -> Vec<ipnet::IpNet> {
    let mut out: BTreeSet<ipnet::IpNet> = if !settings.cidrs.is_empty() {
        settings.cidrs.iter().copied().collect()
    } else if let Some(range) = settings.cluster_pod_range {
        BTreeSet::from([range])
    } else {
        table
            .nodes
            .values()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .chain(settings.own_cidrs.iter().copied())
            .collect()
    };
    // A default route is never a strict prefix (the configuration refuses one too).
    out.retain(|c| c.prefix_len() > 0);
    out.into_iter().map(|c| c.trunc()).collect()
}

/// The strict CIDRs for status: all of a few, or how many and the first ones.
fn describe(shown: &[String]) -> String {
    if shown.len() <= 8 {
        shown.join(",")
    } else {
        format!("{} CIDRs ({}, …)", shown.len(), shown[..4].join(","))
    }
}

fn want(
    settings: &Settings,
    prefixes: &[ipnet::IpNet],
    encrypt_ifindex: Option<u32>,
    local: &[EndpointSpec],
) -> datapath::StrictWant {
    let mut w = datapath::StrictWant {
        config: datapath::StrictConfig {
            enabled: settings.enabled as u8,
            allow_remote_node: settings.allow_remote_node as u8,
            pad: 0,
            encrypt_ifindex: encrypt_ifindex.unwrap_or(0),
        },
        ..Default::default()
    };
    if !settings.enabled {
        return w;
    }
    for p in prefixes {
        match p {
            ipnet::IpNet::V4(v4) => {
                w.v4.insert((v4.network().octets(), u32::from(v4.prefix_len())));
            }
            ipnet::IpNet::V6(v6) => {
                w.v6.insert((v6.network().octets(), u32::from(v6.prefix_len())));
            }
        }
    }
    w.local_ifs = local
        .iter()
        .filter_map(|e| nix::net::if_::if_nametoindex(e.interface.as_str()).ok())
        .collect();
    w
}

/// Keeps the strict maps right: on every change of the node table or the local endpoints, after
/// every route pass (a re-created encryption device has a new index, and its routes were just
/// moved into it), and every second.
pub async fn strict_loop(
    pin_dir: PathBuf,
    settings: Settings,
    backend: Arc<dyn EncryptionBackend>,
    mut nodes: Reader<NodesView>,
    mut local: Reader<Vec<EndpointSpec>>,
    mut routes: Reader<RoutesView>,
    out: Writer<ComponentStatus>,
) -> Result<(), AgentError> {
    let mut maps: Option<datapath::StrictMode> = None;
    loop {
        let view = nodes.get();
        let endpoints = local.get();
        routes.get();
        // Until every CiliumNode is listed, the derived prefixes would be too few.
        let ready =
            view.synced || !settings.cidrs.is_empty() || settings.cluster_pod_range.is_some();
        if ready || !settings.enabled {
            let prefixes = prefixes(&settings, &view.table);
            let device = backend.strict_device();
            let want = want(&settings, &prefixes, device, &endpoints);
            let result = match maps.as_mut() {
                Some(m) => m.sync(&want),
                None => datapath::StrictMode::open(&pin_dir).and_then(|mut m| {
                    let r = m.sync(&want);
                    maps = Some(m);
                    r
                }),
            };
            let status = match result {
                Ok(changed) => {
                    let shown: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
                    if changed && settings.enabled {
                        info!(
                            prefixes = shown.len(),
                            first = ?shown.iter().take(4).collect::<Vec<_>>(),
                            encrypt_ifindex = ?device,
                            local_endpoints = want.local_ifs.len(),
                            "strict mode updated"
                        );
                    }
                    if !settings.enabled {
                        ComponentStatus {
                            state: Health::Disabled,
                            message: "Disabled".into(),
                        }
                    } else if device.is_none() {
                        ComponentStatus {
                            state: Health::Failure,
                            message: format!(
                                "no encryption device: all traffic to {} is dropped",
                                describe(&shown)
                            ),
                        }
                    } else {
                        ComponentStatus {
                            state: Health::Ok,
                            message: format!(
                                "Enabled for {}{}",
                                describe(&shown),
                                if settings.allow_remote_node {
                                    " (remote-node identities allowed)"
                                } else {
                                    ""
                                }
                            ),
                        }
                    }
                }
                Err(e) if !settings.enabled => {
                    // Turning a previous run's strict mode off is best effort: with the maps
                    // unreachable there is nothing to turn off.
                    warn!(error = %e, "could not mark strict mode off in the datapath maps");
                    ComponentStatus {
                        state: Health::Disabled,
                        message: "Disabled".into(),
                    }
                }
                Err(e) => {
                    warn!(error = %e, "writing the strict-mode maps failed; retrying");
                    ComponentStatus {
                        state: Health::Failure,
                        message: format!("not in force: {e}"),
                    }
                }
            };
            out.update(|s| {
                let changed = *s != status;
                *s = status;
                changed
            });
        } else {
            out.update(|s| {
                let status = ComponentStatus {
                    state: Health::Degraded,
                    message: "listing CiliumNodes for the cluster's pod CIDRs".into(),
                };
                let changed = *s != status;
                *s = status;
                changed
            });
        }
        if !settings.enabled {
            // Written once (turning a previous run's strict mode off); nothing more to follow.
            return std::future::pending().await;
        }
        any_change(
            &mut [&mut nodes, &mut local, &mut routes],
            Duration::from_secs(1),
        )
        .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> ipnet::IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_come_from_the_configuration_then_the_cluster() {
        let table = NodeTable::default();
        let own = vec![net("198.19.1.0/24")];
        let mut s = Settings {
            enabled: true,
            cidrs: vec![net("198.19.0.0/16"), net("fd00:10::/48")],
            cluster_pod_range: Some(net("198.18.64.0/18")),
            own_cidrs: own.clone(),
            allow_remote_node: false,
        };
        assert_eq!(prefixes(&s, &table), s.cidrs);
        s.cidrs.clear();
        assert_eq!(prefixes(&s, &table), vec![net("198.18.64.0/18")]);
        s.cluster_pod_range = None;
        assert_eq!(prefixes(&s, &table), own);
    }
}
