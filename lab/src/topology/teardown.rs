//! Taking a lab apart: one node, or the whole lab (also a crashed lab's leftovers).

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tracing::warn;

use super::*;

/// Removes a node from the lab: its agent, pods, namespaces and its CiliumNode object (as the
/// operator does when a Kubernetes node is deleted).
pub async fn delete_node(lab: &mut LabState, node: &str) -> Result<()> {
    let pods: Vec<String> = lab
        .node(node)?
        .pods
        .iter()
        .map(|p| p.name.clone())
        .collect();
    stop_agent(lab, node)?;
    for p in pods {
        let pns = lab.pod_netns(&p);
        let _ = ip(&["netns", "del", &pns]);
    }
    let netns = lab.node_netns(node);
    kill_netns_processes(&netns);
    let _ = ip(&["netns", "del", &netns]);
    let mnt = lab.node_mntns(node);
    let _ = run("umount", &[&mnt.to_string_lossy()]);
    let _ = fs::remove_file(&mnt);
    let index = lab.node(node)?.index;
    let _ = ip(&["-n", &lab.hub_netns(), "link", "del", &format!("vn{index}")]);
    if lab.world {
        let _ = ip(&[
            "-n",
            &lab.hub_netns(),
            "route",
            "del",
            &format!("198.19.{index}.0/24"),
        ]);
    }
    lab.nodes.retain(|n| n.name != node);
    lab.save()?;
    let kubeconfig = lab.admin_kubeconfig();
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "delete",
            "ciliumnode",
            node,
            "--ignore-not-found",
            "--wait=false",
        ])
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "deleting the CiliumNode {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub(super) fn kill_netns_processes(netns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", netns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Tears a lab down completely: processes, namespaces, mounts, state. Works on a crashed lab's
/// leftovers too (it needs nothing but the lab's name).
pub fn down(name: &str) -> Result<()> {
    check_name(name)?;
    let dir = lab_dir(name);
    let state = LabState::load(name).ok();
    if let Some(lab) = &state {
        for n in &lab.nodes {
            if let Some(pid) = n.agent_pid {
                stop_process(pid, &dir, Duration::from_secs(5));
            }
        }
        if let Some(pid) = lab.apiserver_pid {
            stop_process(pid, &dir, Duration::from_secs(2));
        }
    }
    // Whatever else still runs in the lab's namespaces (a crashed lab, a `lab exec` left over).
    let prefix = format!("{NETNS_PREFIX}{name}-");
    let namespaces: Vec<String> = run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    for ns in &namespaces {
        kill_netns_processes(ns);
    }
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            warn!(netns = %ns, error = %e, "could not delete a namespace");
        }
    }
    // Mounts under the lab's directory, deepest first.
    let dir_s = dir.to_string_lossy().to_string();
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m == &dir_s || m.starts_with(&format!("{dir_s}/")))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    for m in &mounts {
        if let Err(e) = run("umount", &["-l", m]) {
            warn!(mount = %m, error = %e, "could not unmount");
        }
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Names of every lab that left anything behind (state directory or namespaces).
pub fn all_labs() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(LABS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    for l in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
        if let Some(rest) = l
            .split_whitespace()
            .next()
            .and_then(|n| n.strip_prefix(NETNS_PREFIX))
        {
            // meshd-<lab>-hub / meshd-<lab>-node-N / meshd-<lab>-pod-P
            for marker in ["-hub", "-node-", "-pod-"] {
                if let Some((lab, _)) = rest.split_once(marker) {
                    names.push(lab.to_string());
                    break;
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}
