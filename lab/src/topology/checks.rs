//! Checks on a running lab: readiness waits, the pod connectivity matrix and the underlay
//! capture.

use std::fs;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::*;

/// Waits until every agent routes to (and, with WireGuard, has a peer for) every other node
/// that runs an agent: the lab is ready when this returns.
pub async fn wait_converged(lab: &LabState, timeout: Duration) -> Result<()> {
    let agents: Vec<&NodeState> = lab.nodes.iter().filter(|n| n.runs_agent).collect();
    let others = agents.len().saturating_sub(1);
    let deadline = Instant::now() + timeout;
    let mut waiting = String::new();
    while Instant::now() < deadline {
        waiting.clear();
        for n in &agents {
            let ready = match meshd_api::Client::new(lab.agent_socket(&n.name))
                .status()
                .await
            {
                Ok(s) => {
                    let routed = s
                        .nodes
                        .iter()
                        .filter(|x| x.routes.state == meshd_api::Health::Ok)
                        .count();
                    let peers = s.wireguard.as_ref().map_or(others, |w| {
                        w.peers
                            .iter()
                            .filter(|p| !p.state.starts_with("refused"))
                            .count()
                    });
                    routed >= others && peers >= others
                }
                Err(_) => false,
            };
            if !ready {
                waiting.push_str(&n.name);
                waiting.push(' ');
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the lab did not converge within {timeout:?}; still waiting for: {waiting}(see their agent logs)"
    )
}

/// Pings from the first pod of every node to the first pod of every other until all answer:
/// routes alone are not a working lab (with WireGuard, the first packet between two nodes waits
/// for a handshake, which a loaded machine may have to retry after 5 s).
pub fn wait_reachable(lab: &LabState, timeout: Duration) -> Result<()> {
    let firsts: Vec<&PodState> = lab.nodes.iter().filter_map(|n| n.pods.first()).collect();
    let deadline = Instant::now() + timeout;
    loop {
        let failing: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = firsts
                .iter()
                .flat_map(|a| firsts.iter().map(move |b| (*a, *b)))
                .filter(|(a, b)| a.name != b.name)
                .map(|(a, b)| {
                    s.spawn(move || {
                        let ok = lab
                            .exec(&a.name, &["ping", "-c", "1", "-W", "2", &b.ip.to_string()])
                            .is_ok_and(|o| o.status.success());
                        (!ok).then(|| format!("{} -> {}", a.name, b.name))
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok().flatten())
                .collect()
        });
        if failing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "pods cannot reach each other after {timeout:?}: {} (see `meshd-lab status` and the agent logs)",
                failing.join(", ")
            );
        }
    }
}

/// Waits until the agent answers on its socket and has published its CiliumNode.
pub async fn wait_agent_ready(lab: &LabState, node: &str, timeout: Duration) -> Result<()> {
    let client = meshd_api::Client::new(lab.agent_socket(node));
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match client.status().await {
            Ok(s) if s.kubernetes.state == meshd_api::Health::Ok => return Ok(()),
            Ok(s) => last = format!("kubernetes: {}", s.kubernetes.message),
            Err(e) => last = e.to_string(),
        }
        if let Some(pid) = lab.node(node)?.agent_pid
            && !process_alive(pid, &lab.dir())
        {
            let log = lab.node_dir(node).join("agent.log");
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the agent of {node} exited; the end of {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the agent of {node} is not ready after {timeout:?} ({last}); see {}",
        lab.node_dir(node).join("agent.log").display()
    )
}

/// The connectivity matrix: for each pod, which other pods it reaches with one ping.
pub fn connectivity(lab: &LabState) -> Vec<(String, String, bool)> {
    let pairs: Vec<(String, String, Ipv4Addr)> = lab
        .pods()
        .flat_map(|(_, a)| {
            lab.pods()
                .filter(move |(_, b)| b.name != a.name)
                .map(move |(_, b)| (a.name.clone(), b.name.clone(), b.ip))
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(a, b, ip)| {
                s.spawn(move || {
                    let ok = lab
                        .exec(
                            a,
                            &["ping", "-c", "3", "-i", "0.2", "-W", "2", &ip.to_string()],
                        )
                        .is_ok_and(|o| o.status.success());
                    (a.clone(), b.clone(), ok)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

/// What crossed the underlay (the hub bridge) during a capture.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CaptureSummary {
    pub ip_packets: usize,
    /// UDP 51871 between node addresses: WireGuard.
    pub wireguard: usize,
    /// Packets whose source or destination is a pod address: traffic in the clear.
    pub cleartext_pod: usize,
    pub other: usize,
}

/// Captures on the hub bridge while every pod pings one pod on another node, and sorts what
/// was seen.
pub fn capture_underlay(lab: &LabState, pings: u32) -> Result<CaptureSummary> {
    let prefix = lab.enter("hub")?;
    let tcpdump = Command::new(&prefix[0])
        .args(&prefix[1..])
        .args(["tcpdump", "-n", "-l", "-i", "br0", "ip"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tcpdump in the hub (cargo xtask setup installs it)")?;
    std::thread::sleep(Duration::from_millis(500));
    let pods: Vec<(&NodeState, &PodState)> = lab.pods().collect();
    std::thread::scope(|s| {
        for (n, p) in &pods {
            if let Some((_, target)) = pods.iter().find(|(m, _)| m.name != n.name) {
                let ip = target.ip.to_string();
                let name = p.name.clone();
                s.spawn(move || {
                    lab.exec(
                        &name,
                        &[
                            "ping",
                            "-c",
                            &pings.to_string(),
                            "-i",
                            "0.05",
                            "-W",
                            "1",
                            &ip,
                        ],
                    )
                });
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = tcpdump
        .wait_with_output()
        .context("reading tcpdump's output")?;
    Ok(summarize_capture(&String::from_utf8_lossy(&out.stdout)))
}

/// Sorts `tcpdump -n` lines.
pub fn summarize_capture(text: &str) -> CaptureSummary {
    let mut s = CaptureSummary::default();
    for line in text.lines().filter(|l| l.contains(" IP ")) {
        s.ip_packets += 1;
        if line.contains("198.19.") {
            s.cleartext_pod += 1;
        } else if line.contains(".51871 > ") && line.contains(": UDP") {
            s.wireguard += 1;
        } else {
            s.other += 1;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_lines_are_sorted_by_what_they_carry() {
        let text = "\
07:00:00.1 IP 198.18.0.11.51871 > 198.18.0.12.51871: UDP, length 128
07:00:00.2 IP 198.19.1.10 > 198.19.2.10: ICMP echo request, id 1, seq 1, length 64
07:00:00.3 IP 198.18.0.11.40000 > 198.18.0.1.6443: Flags [P.], length 100
07:00:00.4 ARP, Request who-has 198.18.0.13 tell 198.18.0.1, length 28
";
        assert_eq!(
            summarize_capture(text),
            CaptureSummary {
                ip_packets: 3,
                wireguard: 1,
                cleartext_pod: 1,
                other: 1
            }
        );
    }
}
