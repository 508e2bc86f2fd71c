//! `cargo xtask bench wg`: pod-to-pod iperf3 across two lab nodes through meshd's userspace
//! WireGuard device, wireguard-go, boringtun-cli, gotatun-cli and no encryption, alternating in
//! one run, with the CPU seconds per GB of the tunnel processes.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, meshd_bin, sh};

/// CPU seconds used so far by the processes inside a lab namespace whose command line contains
/// `needle` (the userspace WireGuard devices).
fn cpu_seconds(netns: &str, needle: &str) -> f64 {
    let pids = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let tick = 100.0;
    pids.split_whitespace()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let rest = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .collect::<Vec<_>>();
            // fields after the command: state(0) ... utime(11) stime(12)
            Some((rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?) / tick)
        })
        .sum()
}

struct Sample {
    gbit: f64,
    bytes: f64,
    cpu: f64,
}

/// One tunnel implementation under test.
struct Contender {
    label: &'static str,
    lab: &'static str,
    /// `lab up --encryption …`.
    encryption: &'static str,
    /// For a foreign implementation: the command that starts it on interface `wgb`
    /// (daemonizing), and the name its processes carry.
    foreign: Option<(Vec<String>, &'static str)>,
    /// Which processes' CPU time counts.
    process: &'static str,
}

fn bench_tools() -> std::path::PathBuf {
    meshd_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("bench-tools"))
        .unwrap_or_default()
}

/// Sets up a foreign WireGuard implementation between node-1 and node-2 of `lab` (whose
/// agents are stopped, leaving their routes, which are then pointed into `wgb`).
fn setup_foreign(meshd: &std::path::Path, lab: &str, start: &[String]) -> Result<()> {
    let exec = |node: &str, script: &str| -> Result<String> {
        let out = Command::new(crate::lab_bin(meshd))
            .args(["exec", "--name", lab, node, "--", "sh", "-c", script])
            .output()?;
        if !out.status.success() {
            bail!(
                "{node} in {lab}: {script}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let mut keys = Vec::new();
    for node in ["node-1", "node-2"] {
        sh(Command::new(crate::lab_bin(meshd)).args(["agent", "--name", lab, "stop", node]))?;
        let cmd = start
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        keys.push(exec(
            node,
            &format!(
                "export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1; {cmd} >/var/lib/meshd/bench-tunnel.log 2>&1 && sleep 0.5 && \
                 umask 077 && wg genkey > /var/lib/meshd/bench.key && wg set wgb private-key /var/lib/meshd/bench.key listen-port 51900 && \
                 ip link set wgb mtu 1420 up && wg pubkey < /var/lib/meshd/bench.key"
            ),
        )?);
    }
    for (i, node) in ["node-1", "node-2"].iter().enumerate() {
        let j = 2 - i; // the other node's index
        exec(
            node,
            &format!(
                "wg set wgb peer {} endpoint 198.18.0.1{j}:51900 allowed-ips 198.19.{j}.0/24 && ip route replace 198.19.{j}.0/24 dev wgb",
                keys[1 - i]
            ),
        )?;
    }
    Ok(())
}

fn iperf(meshd: &std::path::Path, c: &Contender, streams: u32, secs: u32) -> Result<Sample> {
    let cpu = |n: &str| cpu_seconds(&format!("meshd-{}-{n}", c.lab), c.process);
    let before = cpu("node-1") + cpu("node-2");
    let out = Command::new(crate::lab_bin(meshd))
        .args([
            "exec",
            "--name",
            c.lab,
            "pod-1a",
            "--",
            "iperf3",
            "-c",
            "198.19.2.10",
            "-J",
        ])
        .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "iperf3 through {} failed: {}",
            c.label,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let cpu = cpu("node-1") + cpu("node-2") - before;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .context("iperf3 JSON without sum_received")?;
    let bytes = v
        .pointer("/end/sum_received/bytes")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    Ok(Sample {
        gbit: bps / 1e9,
        bytes,
        cpu,
    })
}

/// `cargo xtask bench wg`: pod-to-pod iperf3 across two lab nodes through meshd's userspace
/// WireGuard, wireguard-go, boringtun-cli, gotatun-cli and no encryption, alternating in one
/// run; prints Gbit/s, CPU-s per GB and the ratios.
pub fn run(meshd: &std::path::Path, secs: u32) -> Result<()> {
    let tools = bench_tools();
    for (krate, bin) in [
        ("gotatun-cli", "gotatun"),
        ("boringtun-cli", "boringtun-cli"),
    ] {
        if !tools.join("bin").join(bin).exists() {
            eprintln!("xtask bench: installing {krate} into {}", tools.display());
            sh(cargo().args(["install", "--root"]).arg(&tools).arg(krate))?;
        }
    }
    let tool = |b: &str| tools.join("bin").join(b).display().to_string();
    let contenders = vec![
        Contender {
            label: "no encryption",
            lab: "b-plain",
            encryption: "none",
            foreign: None,
            process: "-",
        },
        Contender {
            label: "meshd userspace",
            lab: "b-meshd",
            encryption: "wireguard",
            foreign: None,
            process: "wireguard-userspace",
        },
        Contender {
            label: "wireguard-go",
            lab: "b-wggo",
            encryption: "none",
            foreign: Some((vec!["wireguard-go".into(), "wgb".into()], "wireguard-go")),
            process: "wireguard-go",
        },
        Contender {
            label: "boringtun-cli",
            lab: "b-btun",
            encryption: "none",
            foreign: Some((
                vec![
                    tool("boringtun-cli"),
                    "--disable-drop-privileges".into(),
                    "wgb".into(),
                ],
                "boringtun",
            )),
            process: "boringtun",
        },
        Contender {
            label: "gotatun-cli",
            lab: "b-gota",
            encryption: "none",
            foreign: Some((
                vec![
                    tool("gotatun"),
                    "--disable-drop-privileges".into(),
                    "--log".into(),
                    "/var/lib/meshd/gotatun.log".into(),
                    "wgb".into(),
                ],
                "gotatun",
            )),
            process: "gotatun",
        },
    ];
    let teardown = || {
        for c in &contenders {
            let _ = Command::new(crate::lab_bin(meshd))
                .args(["down", "--name", c.lab])
                .output();
        }
    };
    teardown();
    let result = (|| -> Result<()> {
        for c in &contenders {
            eprintln!("xtask bench: lab {} for {}", c.lab, c.label);
            let out = Command::new(crate::lab_bin(meshd))
                .args([
                    "up",
                    "--name",
                    c.lab,
                    "--nodes",
                    "2",
                    "--pods-per-node",
                    "1",
                    "--encryption",
                    c.encryption,
                ])
                .output()?;
            if !out.status.success() {
                bail!("lab up {}: {}", c.lab, String::from_utf8_lossy(&out.stderr));
            }
            if let Some((start, _)) = &c.foreign {
                setup_foreign(meshd, c.lab, start)?;
            }
            sh(Command::new(crate::lab_bin(meshd)).args([
                "exec", "--name", c.lab, "pod-2a", "--", "iperf3", "-s", "-D",
            ]))?;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        println!("\npod-to-pod TCP, 2 lab nodes on this machine, {secs} s per run, alternating");
        println!(
            "{:<18} {:>8} {:>10} {:>14} {:>12} {:>14}",
            "tunnel", "streams", "Gbit/s", "CPU-s per GB", "vs plain", "vs gotatun-cli"
        );
        for streams in [1, 4] {
            let mut got: Vec<(f64, f64)> = Vec::new();
            for c in &contenders {
                let s = iperf(meshd, c, streams, secs)?;
                let per_gb = if s.bytes > 0.0 {
                    s.cpu / (s.bytes / 1e9)
                } else {
                    0.0
                };
                got.push((s.gbit, per_gb));
            }
            let plain = got[0].0;
            let gota = got[4].0;
            for (c, (gbit, per_gb)) in contenders.iter().zip(&got) {
                let cpu = if c.foreign.is_none() && c.encryption == "none" {
                    "-".to_string()
                } else {
                    format!("{per_gb:.1}")
                };
                println!(
                    "{:<18} {:>8} {:>10.2} {:>14} {:>12.3} {:>14.2}",
                    c.label,
                    streams,
                    gbit,
                    cpu,
                    gbit / plain,
                    gbit / gota
                );
            }
        }
        Ok(())
    })();
    teardown();
    result
}
