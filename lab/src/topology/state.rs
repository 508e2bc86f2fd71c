//! The lab's state: what exists (nodes, pods, processes, binaries), where it lives, and
//! how to enter it. Saved as `lab.json` in the lab's directory.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use serde::{Deserialize, Serialize};

/// Where labs keep their state (tmpfs: a reboot leaves nothing behind).
pub const LABS_DIR: &str = "/run/meshd-lab";
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const API_PORT: u16 = 6443;
/// The hub's address towards the world network.
pub const WORLD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The lab's "world": one host outside the cluster (no node, no pod) with two addresses, for
/// CIDR and entity rules over real traffic. Nodes route 198.18.1.0/24 via the hub, and the hub
/// routes each node's pod CIDR back to it (a router on the underlay, without NAT).
pub const WORLD_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 1, 10), Ipv4Addr::new(198, 18, 1, 20)];
pub const WORLD_NET: &str = "198.18.1.0/24";
pub(super) const NETNS_PREFIX: &str = "meshd-";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    /// Host-side veth in the node's namespace.
    pub interface: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub index: u8,
    pub ip: Ipv4Addr,
    pub agent_pid: Option<i32>,
    pub pods: Vec<PodState>,
    /// Extra agent flags (e.g. the encryption mode).
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// False for a node set up by hand (e.g. a foreign WireGuard implementation for interop
    /// tests): it gets namespaces and pods but no `meshd agent`.
    #[serde(default = "yes")]
    pub runs_agent: bool,
}

pub(super) fn yes() -> bool {
    true
}

impl NodeState {
    pub fn pod_cidr(&self) -> String {
        format!("198.19.{}.0/24", self.index)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub apiserver_pid: Option<i32>,
    pub admin_port: u16,
    pub nodes: Vec<NodeState>,
    /// The `meshd` binary the lab's agents run.
    pub meshd: PathBuf,
    /// The `meshd-lab` binary that created the lab (it runs the API server).
    #[serde(default)]
    pub lab: PathBuf,
    /// Whether the world host exists (labs made before it was added have none).
    #[serde(default)]
    pub world: bool,
}

/// The binaries a lab runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `meshd`: the node agents.
    pub meshd: PathBuf,
    /// `meshd-lab`: the lab API server.
    pub lab: PathBuf,
}

/// Options for `lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub nodes: u8,
    pub pods_per_node: u8,
    pub agent_args: Vec<String>,
}

pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LABS_DIR).join(name)
}

pub(super) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!("lab name {name:?} is invalid: use 1-20 characters of a-z, 0-9 and '-'");
    }
    Ok(())
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("cannot run {cmd}: is it installed? (`cargo xtask setup` installs it)")
        })?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl LabState {
    pub fn dir(&self) -> PathBuf {
        lab_dir(&self.name)
    }

    pub fn load(name: &str) -> Result<Self> {
        let path = lab_dir(name).join("lab.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no lab named {name:?} is up (reading {})", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    pub fn save(&self) -> Result<()> {
        let path = self.dir().join("lab.json");
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn hub_netns(&self) -> String {
        format!("{NETNS_PREFIX}{}-hub", self.name)
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("{NETNS_PREFIX}{}-{node}", self.name)
    }

    pub fn world_netns(&self) -> String {
        format!("{NETNS_PREFIX}{}-world", self.name)
    }

    pub fn pod_netns(&self, pod: &str) -> String {
        format!("{NETNS_PREFIX}{}-pod-{pod}", self.name)
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir().join("nodes").join(node)
    }

    /// The persistent mount namespace of a node.
    pub fn node_mntns(&self, node: &str) -> PathBuf {
        self.dir().join("ns").join(format!("{node}.mnt"))
    }

    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("run").join("meshd.sock")
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir().join("admin.kubeconfig")
    }

    pub fn node(&self, name: &str) -> Result<&NodeState> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            format!(
                "lab {:?} has no node {name:?} (nodes: {})",
                self.name,
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    pub fn pods(&self) -> impl Iterator<Item = (&NodeState, &PodState)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
    }

    /// The command prefix that runs something inside a node (its network and mount namespace)
    /// or a pod (its network namespace).
    pub fn enter(&self, target: &str) -> Result<Vec<String>> {
        if target == "hub" || (target == "world" && self.world) {
            let netns = if target == "hub" {
                self.hub_netns()
            } else {
                self.world_netns()
            };
            return Ok(vec![
                "nsenter".into(),
                format!("--net=/run/netns/{netns}"),
                "--".into(),
            ]);
        }
        if let Ok(node) = self.node(target) {
            return Ok(vec![
                "nsenter".into(),
                format!("--net=/run/netns/{}", self.node_netns(&node.name)),
                format!("--mount={}", self.node_mntns(&node.name).display()),
                "--".into(),
            ]);
        }
        if self.pods().any(|(_, p)| p.name == target) {
            return Ok(vec![
                "nsenter".into(),
                format!("--net=/run/netns/{}", self.pod_netns(target)),
                "--".into(),
            ]);
        }
        bail!(
            "lab {:?} has no node or pod named {target:?} (see `meshd-lab status`)",
            self.name
        )
    }

    /// Runs `argv` inside a node or pod and returns its output.
    pub fn exec(&self, target: &str, argv: &[&str]) -> Result<std::process::Output> {
        let prefix = self.enter(target)?;
        Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {target}"))
    }
}
