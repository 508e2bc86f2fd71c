//! The lab's processes: starting and stopping agents, and telling a live lab process from
//! a recycled pid.

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tracing::info;

use super::*;

/// Starts (or restarts) the agent of `node` inside its namespaces.
pub fn start_agent(lab: &mut LabState, node: &str) -> Result<()> {
    let n = lab.node(node)?.clone();
    if let Some(pid) = n.agent_pid
        && process_alive(pid, &lab.dir())
    {
        bail!("the agent of {node} is already running (pid {pid})");
    }
    let ndir = lab.node_dir(node);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ndir.join("agent.log"))?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.node_netns(node)))
        .arg(format!("--mount={}", lab.node_mntns(node).display()))
        .arg("--")
        .arg(&lab.meshd)
        .args(["agent", "--node-name", node, "--k8s-kubeconfig-path"])
        .arg(ndir.join("kubeconfig"))
        .args([
            "--node-ip",
            &n.ip.to_string(),
            "--pod-cidr",
            &n.pod_cidr(),
            "--state-dir",
            "/var/lib/meshd",
        ])
        .args(&n.agent_args)
        .env(
            "RUST_LOG",
            std::env::var("MESHD_LAB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting the agent of {node}"))?;
    let pid = child.id() as i32;
    if let Some(n) = lab.nodes.iter_mut().find(|n| n.name == node) {
        n.agent_pid = Some(pid);
    }
    lab.save()?;
    info!(node, pid, "agent started");
    Ok(())
}

/// Whether `pid` is alive and is a process of this lab (its command line names the lab's
/// directory or runs in its namespaces), so a recycled pid is never signalled.
pub fn process_alive(pid: i32, lab_dir: &Path) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // state is the field after the parenthesised command name
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    if zombie {
        // Reap it if it is our child; otherwise it is gone for our purposes.
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        return false;
    }
    // Our own child may not have exec'd yet (its command line is still ours): it is ours.
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok());
    if ppid == Some(std::process::id()) {
        return true;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = lab_dir.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn stop_process(pid: i32, lab_dir: &Path, grace: Duration) -> bool {
    use nix::sys::signal::{Signal, kill};
    let p = nix::unistd::Pid::from_raw(pid);
    if !process_alive(pid, lab_dir) {
        return false;
    }
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !process_alive(pid, lab_dir) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(p, Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(50));
    let _ = process_alive(pid, lab_dir);
    true
}

/// Stops a node's agent (SIGTERM; the datapath it set up stays).
pub fn stop_agent(lab: &mut LabState, node: &str) -> Result<()> {
    let dir = lab.dir();
    if let Some(n) = lab.nodes.iter_mut().find(|n| n.name == node) {
        if let Some(pid) = n.agent_pid.take() {
            stop_process(pid, &dir, Duration::from_secs(5));
        }
    } else {
        bail!("lab {:?} has no node {node:?}", lab.name);
    }
    lab.save()
}
