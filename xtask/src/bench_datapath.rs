//! `cargo xtask bench datapath`: what enforcement costs on the wire and how fast a big policy
//! change reaches the kernel.
//!
//! - Throughput: pod-to-pod TCP (iperf3) on one node, through meshd's programs with a
//!   1,000-rule policy selecting the server, against the same pair of pods on a node of the
//!   same lab without an agent (no programs), alternating in one run; the ratio is printed.
//! - Map updates: a 10,000-entry policy (250 rules × 40 ports, Cilium's per-rule limit) is
//!   created, then replaced by another 10,000 entries; the time from the API server accepting
//!   the object to the kernel map holding exactly the new entries is measured from outside
//!   (polling the pinned map), next to the agent's own write time, against `bpftool batch`
//!   writing the same 10,000 keys into a map of the same layout.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

const LAB: &str = "b-dp";

/// Runs `cmd`; its stdout, or an error with its output.
pub(crate) fn out(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn lab_exec(meshd: &Path, target: &str, argv: &[&str]) -> Command {
    let mut c = Command::new(crate::lab_bin(meshd));
    c.args(["exec", "--name", LAB, target, "--"]).args(argv);
    c
}

fn kubectl(args: &[&str]) -> Command {
    let mut c = Command::new("kubectl");
    c.arg("--kubeconfig")
        .arg(format!("/run/meshd-lab/{LAB}/admin.kubeconfig"))
        .args(args);
    c
}

/// The 1,000 rules: 500 from CIDRs (world prefixes, each with an ipcache entry), 499 from the
/// client on other ports, and the one that lets iperf3 through.
fn thousand_rules() -> String {
    let mut y = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bench-1000, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n",
    );
    for i in 0..500u32 {
        y.push_str(&format!(
            "  - fromCIDR: [10.{}.{}.0/24]\n    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n",
            i / 256,
            i % 256
        ));
    }
    for i in 0..499u32 {
        y.push_str(&format!(
            "  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n",
            10000 + i
        ));
    }
    y.push_str("  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"5201\", protocol: TCP}]}]\n");
    y
}

/// 250 rules × 40 ports from `base`: 10,000 policy entries for one peer identity.
fn ten_thousand_entries(base: u32) -> String {
    let mut y = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bench-10k, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n",
    );
    for r in 0..250u32 {
        let ports: Vec<String> = (0..40u32)
            .map(|p| format!("{{port: \"{}\", protocol: TCP}}", base + r * 40 + p))
            .collect();
        y.push_str(&format!(
            "  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{}]}}]\n",
            ports.join(", ")
        ));
    }
    y
}

/// The server's policy-map entries on node-1, as (direction, port) pairs.
fn kernel_ports(meshd: &Path) -> Result<Vec<u64>> {
    let text = out(&mut lab_exec(
        meshd,
        "node-1",
        &[
            &meshd.display().to_string(),
            "bpf",
            "policy",
            "get",
            "lxcsrv",
            "-o",
            "json",
        ],
    ))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|e| e["port"].as_u64()).collect())
        .unwrap_or_default())
}

fn iperf_gbit(meshd: &Path, client: &str, server_ip: &str, secs: u32) -> Result<f64> {
    let text = out(&mut lab_exec(
        meshd,
        client,
        &["iperf3", "-c", server_ip, "-J", "-t", &secs.to_string()],
    ))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|b| b / 1e9)
        .context("iperf3 JSON without sum_received")
}

/// (run count, run time ns) summed over meshd's programs, from the kernel's BPF statistics.
fn program_stats(meshd: &Path) -> Result<(u64, u64)> {
    let text = out(&mut lab_exec(
        meshd,
        "node-1",
        &["bpftool", "-j", "prog", "show"],
    ))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let mut sum = (0, 0);
    for p in v.as_array().into_iter().flatten() {
        if matches!(p["name"].as_str(), Some("from_endpoint" | "to_endpoint")) {
            sum.0 += p["run_cnt"].as_u64().unwrap_or(0);
            sum.1 += p["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    Ok(sum)
}

fn connects(meshd: &Path, from: &str, ip: &str, port: u16) -> bool {
    let script =
        format!("import socket; socket.create_connection(('{ip}', {port}), timeout=1).close()");
    lab_exec(meshd, from, &["python3", "-c", &script])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Waits (up to 120 s) until node-1's map for the server holds exactly the ports
/// `base..base+10000`, read back from the kernel.
fn converged(meshd: &Path, base: u64) -> Result<()> {
    let want: std::collections::BTreeSet<u64> = (base..base + 10_000).collect();
    let t = Instant::now();
    loop {
        let ports: std::collections::BTreeSet<u64> = kernel_ports(meshd)?.into_iter().collect();
        if ports == want {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "node-1's policy map did not converge in 120 s ({} entries)",
                ports.len()
            );
        }
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC timestamp as the agent logs it
/// (`2026-11-26T09:27:58.699757Z`).
fn log_time(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The agent's report of its first write of the server's policy map after `since` that left
/// `entries` entries: (when, in epoch seconds; how long the write took, ms).
fn agent_update(entries: usize, since: f64) -> Option<(f64, f64)> {
    let log =
        std::fs::read_to_string(format!("/run/meshd-lab/{LAB}/nodes/node-1/agent.log")).ok()?;
    log.lines()
        .filter(|l| l.contains("policy map updated") && l.contains("lxcsrv"))
        .filter(|l| l.contains(&format!("entries={entries} ")))
        .filter_map(|l| {
            let when = log_time(l.split_whitespace().next()?)?;
            let took = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("took_ms="))?
                .parse()
                .ok()?;
            Some((when, took))
        })
        .find(|(when, _)| *when >= since)
}

/// `bpftool batch` writing 10,000 keys of the policy map's layout into a scratch LPM map.
fn bpftool_batch_seconds(meshd: &Path) -> Result<f64> {
    let dir = format!("/run/meshd-lab/{LAB}/nodes/node-1/state");
    let mut batch = String::new();
    let pin = "/sys/fs/bpf/meshd-bench-scratch";
    for i in 0..10_000u32 {
        let port = (20_000 + i) as u16;
        let id = 256u32.to_le_bytes();
        let [p0, p1] = port.to_be_bytes();
        batch.push_str(&format!(
            "map update pinned {pin} key 64 0 0 0 {} {} {} {} 0 6 {p0} {p1} value 0 0 0 0 0 0 0 0\n",
            id[0], id[1], id[2], id[3]
        ));
    }
    std::fs::write(format!("{dir}/bench.batch"), batch)?;
    let _ = lab_exec(meshd, "node-1", &["rm", "-f", pin]).output();
    out(&mut lab_exec(
        meshd,
        "node-1",
        &[
            "bpftool", "map", "create", pin, "type", "lpm_trie", "key", "12", "value", "8",
            "entries", "16384", "name", "bench", "flags", "1",
        ],
    ))?;
    let t = Instant::now();
    out(&mut lab_exec(
        meshd,
        "node-1",
        &["bpftool", "batch", "file", "/var/lib/meshd/bench.batch"],
    ))?;
    let took = t.elapsed().as_secs_f64();
    let _ = lab_exec(meshd, "node-1", &["rm", "-f", pin]).output();
    Ok(took)
}

pub fn run(meshd: &Path, secs: u32, rounds: u32) -> Result<()> {
    let _ = Command::new(crate::lab_bin(meshd))
        .args(["down", "--name", LAB])
        .output();
    let result = (|| -> Result<()> {
        eprintln!("xtask bench datapath: lab {LAB}: node-1 with meshd, node-2 without an agent");
        out(Command::new(crate::lab_bin(meshd)).args([
            "up",
            "--name",
            LAB,
            "--nodes",
            "1",
            "--pods-per-node",
            "0",
            "--encryption",
            "none",
        ]))?;
        out(Command::new(crate::lab_bin(meshd)).args([
            "node",
            "add",
            "--name",
            LAB,
            "--pods",
            "0",
            "--no-agent",
        ]))?;
        for (node, pod, label) in [
            ("node-1", "srv", "app=server"),
            ("node-1", "cli", "app=client"),
            ("node-2", "srv2", "app=server"),
            ("node-2", "cli2", "app=client"),
        ] {
            out(Command::new(crate::lab_bin(meshd)).args([
                "pod", "add", "--name", LAB, "--node", node, "--label", label, pod,
            ]))?;
        }
        let (srv, srv2) = ("198.19.1.10", "198.19.2.10");
        for pod in ["srv", "srv2"] {
            for port in ["5201", "5202"] {
                out(&mut lab_exec(
                    meshd,
                    pod,
                    &["iperf3", "-s", "-D", "-p", port],
                ))?;
            }
        }

        let dir = format!("/run/meshd-lab/{LAB}");
        let f1000 = format!("{dir}/bench-1000.yaml");
        std::fs::write(&f1000, thousand_rules())?;
        out(&mut kubectl(&["create", "-f", &f1000]))?;
        let t = Instant::now();
        loop {
            // 500 CIDR entries + 500 client-port entries.
            if kernel_ports(meshd)?.len() >= 1000 && !connects(meshd, "cli", srv, 5202) {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the 1,000-rule policy was not enforced on node-1 within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !connects(meshd, "cli", srv, 5201) || !connects(meshd, "cli2", srv2, 5202) {
            bail!("the bench pods cannot reach their iperf3 servers");
        }
        println!(
            "\npod-to-pod TCP on one node, iperf3 1 stream, {secs} s per run, {rounds} rounds alternating"
        );
        println!(
            "(enforcing: cli -> srv:5202 is refused by the policy, cli -> srv:5201 is allowed)"
        );
        let (mut base, mut meshd_runs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            base.push(iperf_gbit(meshd, "cli2", srv2, secs)?);
            meshd_runs.push(iperf_gbit(meshd, "cli", srv, secs)?);
        }
        let (b, m) = (median(base.clone()), median(meshd_runs.clone()));
        println!("{:<44} {:>14}   runs", "datapath", "median Gbit/s");
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{:<44} {:>14.2}   {}",
            "no programs (node-2)",
            b,
            fmt(&base)
        );
        println!(
            "{:<44} {:>14.2}   {}",
            "meshd programs + 1,000-rule policy (node-1)",
            m,
            fmt(&meshd_runs)
        );
        // Adjacent runs share the machine's conditions: the median of per-round ratios is
        // steadier than the ratio of medians.
        let ratios: Vec<f64> = meshd_runs.iter().zip(&base).map(|(m, b)| m / b).collect();
        println!(
            "ratio meshd / no programs: {:.3} median of per-round ratios ({}); {:.3} of medians (goal >= 0.97)",
            median(ratios.clone()),
            fmt(&ratios),
            m / b
        );
        // What the programs cost, measured by the kernel (one more run with BPF statistics on:
        // they add their own small cost, so this run is not one of the above).
        let _ = Command::new("sysctl")
            .args(["-qw", "kernel.bpf_stats_enabled=1"])
            .status();
        let before = program_stats(meshd);
        let gbit = iperf_gbit(meshd, "cli", srv, secs);
        let after = program_stats(meshd);
        let _ = Command::new("sysctl")
            .args(["-qw", "kernel.bpf_stats_enabled=0"])
            .status();
        if let (Ok(b0), Ok(g), Ok(a0)) = (before, gbit, after) {
            let (runs, ns) = (a0.0 - b0.0, a0.1 - b0.1);
            let gb = g * f64::from(secs) / 8.0;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let share = ns as f64 / 1e9 / f64::from(secs);
            println!(
                "programs (kernel BPF stats, one more run at {g:.2} Gbit/s): {runs} runs, {:.0} ns per run, {:.1} ms CPU per GB = {:.2}% of one core",
                ns as f64 / runs.max(1) as f64,
                ns as f64 / 1e6 / gb.max(1e-9),
                share * 100.0
            );
            println!(
                "  with this machine's {cores} cores busy moving the traffic, that bounds the cost at a ratio of {:.3}",
                1.0 - share / cores
            );
        }
        out(&mut kubectl(&["delete", "-f", &f1000]))?;

        println!("\npolicy map update, 10,000 entries (250 rules x 40 ports)");
        let f10k = format!("{dir}/bench-10k.yaml");
        let mut rows = Vec::new();
        for (verb, base, label) in [
            ("create", 20_000, "create: 0 -> 10,000 entries"),
            (
                "replace",
                40_000,
                "replace: 10,000 -> 10,000 others (20,000 map ops)",
            ),
        ] {
            std::fs::write(&f10k, ten_thousand_entries(base))?;
            out(&mut kubectl(&[verb, "-f", &f10k]))?;
            let accepted = now();
            converged(meshd, u64::from(base))?;
            let (when, took) = agent_update(10_000, accepted)
                .context("the agent did not log its write of the 10,000 entries")?;
            rows.push((label, (when - accepted) * 1000.0, took));
        }
        let raw = bpftool_batch_seconds(meshd)? * 1000.0;
        println!(
            "{:<52} {:>22} {:>16}",
            "change", "API accepted -> map ms", "map write ms"
        );
        for (label, e2e, took) in &rows {
            println!("{label:<52} {e2e:>22.0} {took:>16.1}");
        }
        println!(
            "{:<52} {:>22} {:>16.1}",
            "baseline: bpftool batch, 10,000 inserts", "-", raw
        );
        println!(
            "ratio meshd map write (create) / bpftool batch: {:.2}",
            rows[0].2 / raw
        );
        println!(
            "(API accepted = kubectl returned; map = the agent's log line after the last write; the\n\
             kernel map was then read back and holds exactly the new entries)"
        );
        Ok(())
    })();
    let _ = Command::new(crate::lab_bin(meshd))
        .args(["down", "--name", LAB])
        .output();
    result
}
