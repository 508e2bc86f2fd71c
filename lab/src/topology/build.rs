//! Building the lab: the hub (bridge, API server), the world host, nodes (network and mount
//! namespaces) and pods (the lab plays the CNI plugin).

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use meshd_api::EndpointSpec;
use tracing::{info, warn};

use super::*;
use crate::pki;

pub(super) fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

pub(super) fn ns_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
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
pub(super) fn quiet_ipv6(netns: &str) -> Result<()> {
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

pub(super) fn build_hub(lab: &mut LabState) -> Result<()> {
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
pub(super) fn build_world(lab: &mut LabState) -> Result<()> {
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

pub(super) fn reload_apiserver(lab: &LabState) -> Result<()> {
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
