//! Nodes and routes: labs of real agents reach each other, survive agent restarts and node
//! churn, refuse a bad CiliumNode for that node only, and leave nothing behind.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshd_e2e::*;

#[test]
fn three_nodes_connect_survive_agent_restart_and_node_churn() {
    require_root();
    let lab = Lab::up("t-churn", 3, 2, "none");

    // Every pod reaches every other pod, on the same node and across nodes.
    let status = lab_ok(&["status", "--name", &lab.0]);
    assert!(status.contains("30 of 30 pod pairs reachable"), "{status}");
    let nodes = lab.kubectl(&[
        "get",
        "ciliumnodes",
        "-o",
        "custom-columns=NAME:.metadata.name,IP:.spec.addresses[0].ip,CIDR:.spec.ipam.podCIDRs[0]",
        "--no-headers",
    ]);
    assert_eq!(nodes.lines().count(), 3, "{nodes}");
    assert!(nodes.contains("198.19.2.0/24"), "{nodes}");
    let routes = lab.routes("node-1");
    assert!(
        routes.contains("198.19.2.0/24 via 198.18.0.12")
            && routes.contains("198.19.3.0/24 via 198.18.0.13"),
        "{routes}"
    );

    // The agent's own view.
    let st = String::from_utf8_lossy(
        &lab.exec("node-1", &[meshd_path(), "status", "-o", "json"])
            .stdout,
    )
    .into_owned();
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["kubernetes"]["state"], "ok");
    assert_eq!(st["endpoints"], 2);
    assert_eq!(st["nodes"].as_array().unwrap().len(), 2);

    // Kill node-2's agent hard while pod-1a pings pod-2a every 20 ms; restart it.
    let uid_before = lab.kubectl(&["get", "cn", "node-2", "-o", "jsonpath={.metadata.uid}"]);
    let pinger = Command::new(meshd_lab_path())
        .args([
            "exec",
            "--name",
            &lab.0,
            "pod-1a",
            "--",
            "ping",
            "-i",
            "0.02",
            "-c",
            "150",
            "-W",
            "1",
            "198.19.2.10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.agent_pid("node-2")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let log = format!("{}/nodes/node-2/agent.log", lab.dir());
    let log_len = std::fs::metadata(&log).unwrap().len() as usize;
    lab_ok(&["agent", "--name", &lab.0, "start", "node-2"]);
    let ping = pinger.wait_with_output().unwrap();
    let ping = String::from_utf8_lossy(&ping.stdout).into_owned();
    assert!(
        ping.contains("150 received"),
        "packets lost across the agent restart:\n{ping}"
    );
    // The restarted agent found its routes right and changed nothing; the object is the same.
    std::thread::sleep(Duration::from_millis(500));
    let after = std::fs::read_to_string(&log).unwrap()[log_len..].to_string();
    assert!(after.contains("meshd agent starting"), "{after}");
    assert!(
        !after.contains("route installed") && !after.contains("route removed"),
        "restart disturbed routes:\n{after}"
    );
    assert_eq!(
        lab.kubectl(&["get", "cn", "node-2", "-o", "jsonpath={.metadata.uid}"]),
        uid_before
    );
    assert!(
        lab.routes("node-2")
            .contains("198.19.1.0/24 via 198.18.0.11")
    );

    // A node that leaves is removed everywhere; one that joins is routed everywhere.
    lab_ok(&["node", "delete", "--name", &lab.0, "node-3"]);
    for n in ["node-1", "node-2"] {
        wait_for(
            &format!("{n} to drop the route to node-3"),
            Duration::from_secs(5),
            || !lab.routes(n).contains("198.19.3.0/24"),
        );
    }
    assert_eq!(
        lab.kubectl(&["get", "cn", "--no-headers", "-o", "name"])
            .lines()
            .count(),
        2
    );
    lab_ok(&[
        "node", "add", "--name", &lab.0, "--index", "4", "--pods", "1",
    ]);
    let start = Instant::now();
    for n in ["node-1", "node-2"] {
        wait_for(
            &format!("{n} to route to node-4"),
            Duration::from_secs(2),
            || lab.routes(n).contains("198.19.4.0/24 via 198.18.0.14"),
        );
    }
    eprintln!(
        "node-4 routed everywhere {:?} after it was up",
        start.elapsed()
    );
    let status = lab_ok(&["status", "--name", &lab.0]);
    assert!(status.contains("20 of 20 pod pairs reachable"), "{status}");

    let name = lab.0.clone();
    drop(lab);
    assert_gone(&name);
}

#[test]
fn a_crashed_lab_is_still_cleanable() {
    require_root();
    let lab = Lab::up("t-crash", 1, 1, "wireguard");
    // Crash everything and lose the lab's state file.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}/lab.json", lab.dir())).unwrap())
            .unwrap();
    for pid in [
        state["apiserver_pid"].as_i64().unwrap(),
        state["nodes"][0]["agent_pid"].as_i64().unwrap(),
    ] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::fs::remove_file(format!("{}/lab.json", lab.dir())).unwrap();
    // Leave a stray process inside a node.
    let _stray = Command::new(meshd_lab_path())
        .args(["exec", "--name", "t-crash", "hub", "--", "sleep", "300"])
        .spawn();
    let out = meshd_lab(&["down", "--name", "t-crash"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::mem::forget(lab);
    assert_gone("t-crash");
}

#[test]
fn bad_cilium_node_is_refused_for_that_node_only() {
    require_root();
    let lab = Lab::up("t-bad", 2, 1, "none");
    lab.kubectl(&["annotate", "cn", "node-2", "unrelated=1"]);
    // A bogus CiliumNode from someone else must not break the agents.
    let f = format!("{}/bogus.yaml", lab.dir());
    std::fs::write(&f, "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: bogus\nspec:\n  addresses:\n  - type: InternalIP\n    ip: not-an-ip\n").unwrap();
    lab.kubectl(&["apply", "-f", &f]);
    wait_for(
        "node-1 to report the bogus node",
        Duration::from_secs(5),
        || {
            let st = String::from_utf8_lossy(&lab.exec("node-1", &[meshd_path(), "status"]).stdout)
                .into_owned();
            st.contains("bogus") && st.contains("spec.addresses[0].ip")
        },
    );
    let st =
        String::from_utf8_lossy(&lab.exec("node-1", &[meshd_path(), "status"]).stdout).into_owned();
    assert!(st.contains("node-2\tOk"), "{st}");
    let status = lab_ok(&["status", "--name", &lab.0]);
    assert!(status.contains("2 of 2 pod pairs reachable"), "{status}");
    let log = std::fs::read_to_string(format!("{}/nodes/node-1/agent.log", lab.dir())).unwrap();
    assert!(
        log.contains("bogus") && log.contains("invalid CiliumNode"),
        "{log}"
    );
}

/// Whoever can write one CiliumNode cannot steer other nodes' traffic: node-2's object (its
/// agent stopped, so nobody puts it back) claims half the address space, node-1's own pod CIDR
/// and half of node-3's; no node routes any of it or lets it into node-2's AllowedIPs, status
/// names the node and each refused field, node-2's own range keeps working, and after the claim
/// is withdrawn nothing is left.
#[test]
fn forged_node_claims_cannot_steer_traffic() {
    require_root();
    let lab = Lab::up("t-claim", 3, 1, "wireguard");
    lab_ok(&["agent", "--name", &lab.0, "stop", "node-2"]);
    let forged = r#"{"spec":{"ipam":{"podCIDRs":["198.19.2.0/24","0.0.0.0/1","198.19.1.0/24","198.19.3.128/25"]}}}"#;
    lab.kubectl(&["patch", "cn", "node-2", "--type=merge", "-p", forged]);
    for node in ["node-1", "node-3"] {
        wait_for(
            &format!("{node} to refuse node-2's forged claims"),
            Duration::from_secs(5),
            || {
                String::from_utf8_lossy(&lab.exec(node, &[meshd_path(), "status"]).stdout)
                    .contains("spec.ipam.podCIDRs[1]")
            },
        );
        let st =
            String::from_utf8_lossy(&lab.exec(node, &[meshd_path(), "status"]).stdout).into_owned();
        assert!(
            st.contains("0.0.0.0/1 is a default or half-default route")
                && st.contains("spec.ipam.podCIDRs[3]: 198.19.3.128/25 overlaps"),
            "{node}: {st}"
        );
        let routes = lab.routes(node);
        for stolen in ["0.0.0.0/1", "198.19.3.128/25"] {
            assert!(!routes.contains(stolen), "{node} routes {stolen}: {routes}");
        }
        assert!(routes.contains("198.19.2.0/24"), "{node}: {routes}");
        let allowed = String::from_utf8_lossy(
            &lab.exec(node, &["wg", "show", "cilium_wg0", "allowed-ips"])
                .stdout,
        )
        .into_owned();
        // node-2's peer: its own range and nothing else.
        let peer = allowed
            .lines()
            .find(|l| l.contains("198.19.2.0/24"))
            .unwrap_or_else(|| panic!("{node} has no peer for node-2: {allowed}"));
        assert_eq!(
            peer.split_whitespace().skip(1).collect::<Vec<_>>(),
            ["198.19.2.0/24"],
            "{node}: {allowed}"
        );
        assert!(
            !allowed.contains("0.0.0.0/1") && !allowed.contains("198.19.3.128/25"),
            "{node}: {allowed}"
        );
    }
    let st =
        String::from_utf8_lossy(&lab.exec("node-1", &[meshd_path(), "status"]).stdout).into_owned();
    assert!(
        st.contains("198.19.1.0/24 overlaps this node's pod CIDR"),
        "{st}"
    );
    // node-1's and node-3's pods still reach each other, and node-2's pod is still reached.
    assert!(pings(&lab, "pod-1a", "198.19.3.10", 3), "pod-1a -> pod-3a");
    assert!(pings(&lab, "pod-3a", "198.19.1.10", 3), "pod-3a -> pod-1a");
    assert!(pings(&lab, "pod-1a", "198.19.2.10", 3), "pod-1a -> pod-2a");
    // Withdrawn: nothing refused, nothing forged left anywhere.
    let honest = r#"{"spec":{"ipam":{"podCIDRs":["198.19.2.0/24"]}}}"#;
    lab.kubectl(&["patch", "cn", "node-2", "--type=merge", "-p", honest]);
    wait_for(
        "node-1 to accept node-2 again",
        Duration::from_secs(5),
        || {
            let st = String::from_utf8_lossy(&lab.exec("node-1", &[meshd_path(), "status"]).stdout)
                .into_owned();
            !st.contains("refused") && st.contains("node-2\tOk")
        },
    );
    for node in ["node-1", "node-3"] {
        let routes = lab.routes(node);
        assert!(
            !routes.contains("0.0.0.0/1") && !routes.contains("198.19.3.128/25"),
            "{node}: {routes}"
        );
    }
}
