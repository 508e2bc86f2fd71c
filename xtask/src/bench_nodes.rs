//! `cargo xtask bench nodes`: how a node's join and leave reach an agent at cluster scale. A lab
//! with one agent (node-1, WireGuard, userspace device) gets 100, then 1,000, then 5,000
//! CiliumNodes (each with a WireGuard key, an InternalIP and a /30 pod CIDR). For each size it
//! measures, from outside the agent: the time from the last object being accepted to the agent
//! having every route and every peer; then one node deleted and one created, each timed until
//! its route and peer are gone (or there) on node-1; and the agent's RSS.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::bench_datapath::out;

const LAB: &str = "b-nodes";

fn kubectl(args: &[&str]) -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig")
        .arg(format!("/run/meshd-lab/{LAB}/admin.kubeconfig"))
        .args(args);
    c
}

/// Fake node `i` (from 0): InternalIP in 198.18.32.0/19, pod CIDR a /30 in 198.19.128.0/17,
/// a key from its index (any 32 bytes but zero are a valid public key).
fn fake_node(i: u32) -> (String, String, String, String) {
    let ip = format!("198.18.{}.{}", 32 + i / 250, 1 + i % 250);
    let n = i * 4;
    let cidr = format!("198.19.{}.{}/30", 128 + n / 256, n % 256);
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&(i + 1).to_be_bytes());
    key[31] = 0x5a;
    let key = base64_encode(&key);
    (format!("fake-{i:05}"), ip, cidr, key)
}

fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let v = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                s.push(T[((v >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn node_yaml(i: u32) -> String {
    let (name, ip, cidr, key) = fake_node(i);
    format!(
        "---\napiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: {name}\n  annotations:\n    network.cilium.io/wg-pub-key: \"{key}\"\nspec:\n  addresses:\n  - type: InternalIP\n    ip: {ip}\n  ipam:\n    podCIDRs: [{cidr}]\n  encryption:\n    key: 255\n"
    )
}

/// (routes to fake pod CIDRs into the device, WireGuard peers) on node-1.
fn counts(meshd: &Path) -> Result<(usize, usize)> {
    let lab = crate::lab_bin(meshd);
    let routes = out(Command::new(&lab).args([
        "exec",
        "--name",
        LAB,
        "node-1",
        "--",
        "ip",
        "-4",
        "route",
        "show",
        "proto",
        "193",
        "dev",
        "cilium_wg0",
    ]))?;
    let routes = routes
        .lines()
        .filter(|l| l.starts_with("198.19.") && l.contains("/30"))
        .count();
    let peers = out(Command::new(&lab).args([
        "exec",
        "--name",
        LAB,
        "node-1",
        "--",
        "wg",
        "show",
        "cilium_wg0",
        "peers",
    ]))?;
    Ok((routes, peers.lines().count()))
}

fn has_route(meshd: &Path, cidr: &str) -> Result<bool> {
    let r = out(Command::new(crate::lab_bin(meshd)).args([
        "exec",
        "--name",
        LAB,
        "node-1",
        "--",
        "ip",
        "-4",
        "route",
        "show",
        cidr,
        "dev",
        "cilium_wg0",
    ]))?;
    Ok(!r.trim().is_empty())
}

fn has_peer(meshd: &Path, key: &str) -> Result<bool> {
    let p = out(Command::new(crate::lab_bin(meshd)).args([
        "exec",
        "--name",
        LAB,
        "node-1",
        "--",
        "wg",
        "show",
        "cilium_wg0",
        "peers",
    ]))?;
    Ok(p.lines().any(|l| l.trim() == key))
}

fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if done()? {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_mb(meshd: &Path) -> Result<f64> {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!(
        "/run/meshd-lab/{LAB}/lab.json"
    ))?)?;
    let pid = state["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "node-1"))
        .and_then(|n| n["agent_pid"].as_i64())
        .context("node-1's agent pid")?;
    let _ = meshd;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

pub fn run(meshd: &Path) -> Result<()> {
    let lab = crate::lab_bin(meshd);
    let _ = Command::new(&lab).args(["down", "--name", LAB]).output();
    let result = (|| -> Result<()> {
        eprintln!("xtask bench nodes: lab {LAB}: one agent (node-1)");
        out(Command::new(&lab).args([
            "up",
            "--name",
            LAB,
            "--nodes",
            "1",
            "--pods-per-node",
            "0",
            "--encryption",
            "wireguard",
        ]))?;
        let dir = format!("/run/meshd-lab/{LAB}");
        println!(
            "\nCiliumNodes reaching node-1's agent (routes into cilium_wg0 and WireGuard peers), timed from outside"
        );
        println!(
            "{:>7} {:>14} {:>12} {:>12} {:>10}",
            "nodes", "join-all (s)", "leave (ms)", "join (ms)", "RSS (MB)"
        );
        let mut have = 0u32;
        for size in [100u32, 1_000, 5_000] {
            let f = format!("{dir}/nodes-{size}.yaml");
            std::fs::write(&f, (have..size).map(node_yaml).collect::<String>())?;
            out(&mut kubectl(&["create", "-f", &f]))?;
            let all = wait(
                &format!("{size} nodes on node-1"),
                Duration::from_secs(300),
                || {
                    let (r, p) = counts(meshd)?;
                    Ok(r == size as usize && p == size as usize)
                },
            )?;
            have = size;
            // One node leaves, one (new) joins.
            let (name, _, cidr, key) = fake_node(size / 2);
            out(&mut kubectl(&[
                "delete",
                "ciliumnode",
                &name,
                "--wait=false",
            ]))?;
            let leave = wait(
                &format!("{name} gone from node-1"),
                Duration::from_secs(60),
                || Ok(!has_route(meshd, &cidr)? && !has_peer(meshd, &key)?),
            )?;
            let f1 = format!("{dir}/node-back.yaml");
            std::fs::write(&f1, node_yaml(size / 2))?;
            out(&mut kubectl(&["create", "-f", &f1]))?;
            let join = wait(
                &format!("{name} back on node-1"),
                Duration::from_secs(60),
                || Ok(has_route(meshd, &cidr)? && has_peer(meshd, &key)?),
            )?;
            println!(
                "{:>7} {:>14.2} {:>12.0} {:>12.0} {:>10.1}",
                size,
                all.as_secs_f64(),
                leave.as_secs_f64() * 1e3,
                join.as_secs_f64() * 1e3,
                rss_mb(meshd)?
            );
        }
        let log =
            std::fs::read_to_string(format!("{dir}/nodes/node-1/agent.log")).unwrap_or_default();
        let failures = log.lines().filter(|l| l.contains("failed")).count();
        println!("agent log lines with \"failed\": {failures}");
        Ok(())
    })();
    let _ = Command::new(&lab).args(["down", "--name", LAB]).output();
    result
}
