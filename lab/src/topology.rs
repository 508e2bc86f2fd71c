//! The lab's cluster: a hub namespace (bridge + API server), one network and mount namespace
//! per node running a real `meshd agent`, one network namespace per pod. All addresses come from
//! 198.18.0.0/15; nothing is configured in the machine's own namespace.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use meshd_api::EndpointSpec;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::pki;

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
const NETNS_PREFIX: &str = "meshd-";

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

fn yes() -> bool {
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

fn check_name(name: &str) -> Result<()> {
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

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

fn ns_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )
    .map(drop)
}

/// The lab is IPv4-only: no router solicitations or DAD in captures.
fn quiet_ipv6(netns: &str) -> Result<()> {
    ns_sysctl(netns, "net.ipv6.conf.all.disable_ipv6", "1")?;
    ns_sysctl(netns, "net.ipv6.conf.default.disable_ipv6", "1")
}

/// Brings up a lab: namespaces, API server, agents, pods. On failure it tears down what it made.
pub async fn up(opts: &UpOptions, bins: &Binaries) -> Result<LabState> {
    check_name(&opts.name)?;
    if !(1..=50).contains(&opts.nodes) || opts.pods_per_node > 26 {
        bail!("a lab has 1-50 nodes and 0-26 pods per node");
    }
    if lab_dir(&opts.name).join("lab.json").exists() {
        bail!(
            "lab {:?} is already up; `meshd-lab down --name {}` first",
            opts.name,
            opts.name
        );
    }
    let dir = lab_dir(&opts.name);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut lab = LabState {
        name: opts.name.clone(),
        apiserver_pid: None,
        admin_port: 0,
        nodes: Vec::new(),
        meshd: bins.meshd.clone(),
        lab: bins.lab.clone(),
        world: false,
    };
    lab.save()?;
    let result = async {
        build_hub(&mut lab)?;
        build_world(&mut lab)?;
        for i in 1..=opts.nodes {
            info!(node = i, "adding node");
            add_node(&mut lab, i, opts.pods_per_node, Some(&opts.agent_args)).await?;
        }
        info!("waiting for every node to route to every other");
        wait_converged(&lab, Duration::from_secs(60)).await?;
        info!("waiting for a pod of every node to reach a pod of every other");
        wait_reachable(&lab, Duration::from_secs(60))?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        warn!(error = %e, "lab up failed; tearing down what was created");
        let _ = down(&opts.name);
        return Err(e);
    }
    Ok(lab)
}

fn build_hub(lab: &mut LabState) -> Result<()> {
    let dir = lab.dir();
    let hub = lab.hub_netns();
    info!(netns = %hub, "creating the hub namespace and bridge");
    ip(&["netns", "add", &hub])?;
    quiet_ipv6(&hub)?;
    ip(&["-n", &hub, "link", "set", "lo", "up"])?;
    ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &hub,
        "addr",
        "add",
        &format!("{HUB_IP}/24"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", &hub, "link", "set", "br0", "up"])?;

    // The private mount point under which node mount namespaces are pinned.
    let ns_dir = dir.join("ns");
    fs::create_dir_all(&ns_dir)?;
    let ns_dir_s = ns_dir.to_string_lossy().to_string();
    run("mount", &["--bind", &ns_dir_s, &ns_dir_s])?;
    run("mount", &["--make-private", &ns_dir_s])?;

    info!("generating the lab CA, serving certificate and tokens");
    let certs = pki::generate(&lab.name, &[HUB_IP.into(), Ipv4Addr::LOCALHOST.into()])?;
    fs::write(dir.join("ca.pem"), &certs.ca_pem)?;
    fs::write(dir.join("apiserver.pem"), &certs.cert_pem)?;
    pki::write_private(&dir.join("apiserver-key.pem"), certs.key_pem.as_bytes())?;
    let admin_token = pki::token();
    pki::write_private(&dir.join("tokens"), format!("{admin_token}\n").as_bytes())?;
    pki::write_private(&dir.join("admin.token"), admin_token.as_bytes())?;

    info!("starting the lab API server");
    let log = fs::File::create(dir.join("apiserver.log"))?;
    let port_file = dir.join("apiserver.port");
    let child = Command::new(&lab.lab)
        .args(["apiserver", "--dir"])
        .arg(&dir)
        .arg("--netns")
        .arg(format!("/run/netns/{hub}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the lab API server")?;
    lab.apiserver_pid = Some(child.id() as i32);
    lab.save()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Ok(p) = fs::read_to_string(&port_file)
            && let Ok(p) = p.trim().parse::<u16>()
        {
            break p;
        }
        if Instant::now() > deadline {
            bail!(
                "the lab API server did not start; see {}",
                dir.join("apiserver.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    lab.admin_port = port;
    let kc = pki::kubeconfig(
        &lab.name,
        &format!("https://127.0.0.1:{port}"),
        &certs.ca_pem,
        "admin",
        &admin_token,
    );
    pki::write_private(&lab.admin_kubeconfig(), kc.as_bytes())?;
    lab.save()?;
    Ok(())
}

/// The world host behind the hub (see [`WORLD_IPS`]).
fn build_world(lab: &mut LabState) -> Result<()> {
    let (hub, world) = (lab.hub_netns(), lab.world_netns());
    info!(netns = %world, addresses = ?WORLD_IPS, "creating the world host");
    ip(&["netns", "add", &world])?;
    lab.world = true;
    lab.save()?;
    quiet_ipv6(&world)?;
    ip(&["-n", &world, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &hub, "link", "add", "vworld", "type", "veth", "peer", "name", "eth0", "netns",
        &world,
    ])?;
    ip(&[
        "-n",
        &hub,
        "addr",
        "add",
        &format!("{WORLD_GATEWAY}/24"),
        "dev",
        "vworld",
    ])?;
    ip(&["-n", &hub, "link", "set", "vworld", "up"])?;
    ns_sysctl(&hub, "net.ipv4.ip_forward", "1")?;
    for a in WORLD_IPS {
        ip(&[
            "-n",
            &world,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            "eth0",
        ])?;
    }
    ip(&["-n", &world, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &world,
        "route",
        "add",
        "default",
        "via",
        &WORLD_GATEWAY.to_string(),
    ])?;
    Ok(())
}

use std::os::unix::process::CommandExt as _;

/// Adds node `index` with its pods and starts its agent (`agent_args = None`: no agent).
pub async fn add_node(
    lab: &mut LabState,
    index: u8,
    pods: u8,
    agent_args: Option<&[String]>,
) -> Result<()> {
    let name = format!("node-{index}");
    if lab.nodes.iter().any(|n| n.index == index) {
        bail!("lab {:?} already has {name}", lab.name);
    }
    let node_ip = Ipv4Addr::new(198, 18, 0, 10 + index);
    let netns = lab.node_netns(&name);
    let hub = lab.hub_netns();
    info!(node = %name, ip = %node_ip, "creating node namespaces");
    ip(&["netns", "add", &netns])?;
    quiet_ipv6(&netns)?;
    lab.nodes.push(NodeState {
        name: name.clone(),
        index,
        ip: node_ip,
        agent_pid: None,
        pods: vec![],
        agent_args: agent_args.unwrap_or_default().to_vec(),
        runs_agent: agent_args.is_some(),
    });
    lab.save()?;
    ip(&["-n", &netns, "link", "set", "lo", "up"])?;
    let hub_side = format!("vn{index}");
    ip(&[
        "-n", &hub, "link", "add", &hub_side, "type", "veth", "peer", "name", "eth0", "netns",
        &netns,
    ])?;
    ip(&["-n", &hub, "link", "set", &hub_side, "master", "br0", "up"])?;
    ip(&[
        "-n",
        &netns,
        "addr",
        "add",
        &format!("{node_ip}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
    ns_sysctl(&netns, "net.ipv4.ip_forward", "1")?;
    if lab.world {
        // The world, and the way back from it to this node's pods (no route to other nodes'
        // pods goes through the hub: those are meshd's to install).
        let via = HUB_IP.to_string();
        ip(&["-n", &netns, "route", "add", WORLD_NET, "via", &via])?;
        let pod_cidr = lab.node(&name)?.pod_cidr();
        ip(&[
            "-n",
            &hub,
            "route",
            "add",
            &pod_cidr,
            "via",
            &node_ip.to_string(),
        ])?;
    }

    // The node's own mount namespace: private /var/run/meshd, /var/lib/meshd,
    // /var/run/wireguard, a sysfs of its network namespace and its own bpffs.
    let ndir = lab.node_dir(&name);
    for sub in ["run", "state"] {
        fs::create_dir_all(ndir.join(sub))?;
    }
    for d in ["/run/meshd", "/run/wireguard", "/var/lib/meshd"] {
        fs::create_dir_all(d).with_context(|| format!("creating the mount point {d}"))?;
    }
    let mnt = lab.node_mntns(&name);
    fs::write(&mnt, b"")?;
    let script = format!(
        "set -e; mount -t sysfs sysfs /sys; mount -t bpf bpf /sys/fs/bpf; \
         mount -t tmpfs -o mode=0755 tmpfs /run/wireguard; \
         mount --bind {run} /run/meshd; mount --bind {state} /var/lib/meshd",
        run = ndir.join("run").display(),
        state = ndir.join("state").display(),
    );
    run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{netns}"),
            "--",
            "unshare",
            &format!("--mount={}", mnt.display()),
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
    )
    .with_context(|| format!("creating the mount namespace of {name}"))?;

    let kubeconfig_path = ndir.join("kubeconfig");
    let token = pki::token();
    let dir = lab.dir();
    let mut tokens = fs::read_to_string(dir.join("tokens"))?;
    tokens.push_str(&token);
    tokens.push('\n');
    pki::write_private(&dir.join("tokens"), tokens.as_bytes())?;
    let ca = fs::read_to_string(dir.join("ca.pem"))?;
    let kc = pki::kubeconfig(
        &lab.name,
        &format!("https://{HUB_IP}:{API_PORT}"),
        &ca,
        &name,
        &token,
    );
    pki::write_private(&kubeconfig_path, kc.as_bytes())?;
    // The API server reads tokens on each start; tell the running one to reload.
    reload_apiserver(lab)?;

    if agent_args.is_some() {
        start_agent(lab, &name)?;
        wait_agent_ready(lab, &name, Duration::from_secs(20)).await?;
    }
    for j in 0..pods {
        let letter = (b'a' + j) as char;
        let pod = format!("pod-{index}{letter}");
        let labels = BTreeMap::from([
            ("app".to_string(), pod.clone()),
            ("lab.meshd.io/node".to_string(), name.clone()),
        ]);
        add_pod(lab, &name, &pod, "default", labels).await?;
    }
    Ok(())
}

fn reload_apiserver(lab: &LabState) -> Result<()> {
    if let Some(pid) = lab.apiserver_pid {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .context("asking the lab API server to reload its tokens")?;
        // The reload is synchronous in the server's signal task; give it a moment.
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

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

/// Creates a pod: its namespace, a veth into its node, addresses and routes, then registers it
/// with the node's agent, as a CNI plugin would.
pub async fn add_pod(
    lab: &mut LabState,
    node: &str,
    pod: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
) -> Result<()> {
    let n = lab.node(node)?.clone();
    if lab.pods().any(|(_, p)| p.name == pod) {
        bail!("lab {:?} already has a pod {pod:?}", lab.name);
    }
    let host = lab.pods().filter(|(nn, _)| nn.name == node).count() as u8;
    let pod_ip = Ipv4Addr::new(198, 19, n.index, 10 + host);
    let pns = lab.pod_netns(pod);
    let nns = lab.node_netns(node);
    let ifname = format!(
        "lxc{}",
        &pod.replace('-', "")[..pod.replace('-', "").len().min(12)]
    );
    info!(pod, node, ip = %pod_ip, "creating pod");
    ip(&["netns", "add", &pns])?;
    quiet_ipv6(&pns)?;
    if let Some(nn) = lab.nodes.iter_mut().find(|nn| nn.name == node) {
        nn.pods.push(PodState {
            name: pod.into(),
            namespace: namespace.into(),
            ip: pod_ip,
            labels: labels.clone(),
            interface: ifname.clone(),
        });
    }
    lab.save()?;
    ip(&["-n", &pns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &nns, "link", "add", &ifname, "type", "veth", "peer", "name", "eth0", "netns", &pns,
    ])?;
    ip(&["-n", &nns, "link", "set", &ifname, "up"])?;
    ns_sysctl(&nns, &format!("net.ipv4.conf.{ifname}.proxy_arp"), "1")?;
    // Answer the pod's ARP at once (the default delays proxy replies by up to 0.8 s, which a
    // pod's first connection would feel).
    ns_sysctl(&nns, &format!("net.ipv4.neigh.{ifname}.proxy_delay"), "0")?;
    ip(&[
        "-n",
        &pns,
        "addr",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &pns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &pns, "route", "add", "default", "dev", "eth0"])?;
    ip(&[
        "-n",
        &nns,
        "route",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        &ifname,
    ])?;
    let ep = EndpointSpec {
        name: pod.into(),
        namespace: namespace.into(),
        labels,
        interface: ifname,
        addresses: vec![pod_ip.into()],
        identity: None,
    };
    if n.runs_agent {
        meshd_api::Client::new(lab.agent_socket(node))
            .put_endpoint(&ep)
            .await
            .with_context(|| format!("registering pod {pod} with the agent of {node}"))?;
    }
    Ok(())
}

/// Deletes a pod: unregisters it from its agent and removes its namespace.
pub async fn delete_pod(lab: &mut LabState, pod: &str) -> Result<()> {
    let Some((node, p)) = lab
        .pods()
        .find(|(_, p)| p.name == pod)
        .map(|(n, p)| (n.name.clone(), p.clone()))
    else {
        bail!("lab {:?} has no pod {pod:?}", lab.name);
    };
    if let Err(e) = meshd_api::Client::new(lab.agent_socket(&node))
        .delete_endpoint(&p.namespace, pod)
        .await
    {
        warn!(pod, error = %e, "the agent did not acknowledge the pod's deletion");
    }
    let _ = ip(&["-n", &lab.node_netns(&node), "link", "del", &p.interface]);
    let _ = ip(&["netns", "del", &lab.pod_netns(pod)]);
    if let Some(n) = lab.nodes.iter_mut().find(|n| n.name == node) {
        n.pods.retain(|pp| pp.name != pod);
    }
    lab.save()
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

fn kill_netns_processes(netns: &str) {
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
