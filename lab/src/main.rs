//! `meshd-lab`: bring a lab up and down, look at it, run commands inside it. A binary of its own
//! so that the node binary `meshd` links none of it (the lab API server, its CA, json-patch and
//! the root-only teardown of anything named `meshd-*`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use lab::topology::{self, LabState, UpOptions};

#[derive(Parser)]
#[command(
    name = "meshd-lab",
    version,
    about = "meshd's local lab: a cluster of nodes and pods in network namespaces, with a \
             Kubernetes-compatible API server (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Create a lab: hub, API server, nodes running `meshd agent`, pods.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value_t = 2)]
        pods_per_node: u8,
        /// Encryption between nodes: WireGuard (userspace where the kernel has no module) or none.
        #[arg(long, default_value = "wireguard", value_parser = ["wireguard", "none"])]
        encryption: String,
        /// Extra flags for every agent (e.g. `--agent-arg=--route-sync-interval=5s`).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Tear a lab down (processes, namespaces, mounts, state).
    Down {
        #[arg(long, default_value = "lab", conflicts_with = "all")]
        name: String,
        /// Every lab, including a crashed lab's leftovers.
        #[arg(long)]
        all: bool,
    },
    /// Nodes, agents, CiliumNodes and the pod connectivity matrix.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
        /// Skip the connectivity matrix.
        #[arg(long)]
        no_ping: bool,
    },
    /// Run a command inside a node (network + mount namespace), a pod, `hub` or `world` (a host
    /// outside the cluster at 198.18.1.10 and 198.18.1.20).
    Exec {
        #[arg(long, default_value = "lab")]
        name: String,
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Capture on the underlay while pods on different nodes ping each other, and say what
    /// crossed it (fails if pod traffic crossed in the clear with encryption on).
    Capture {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 5)]
        pings: u32,
    },
    /// Print the admin kubeconfig's path (for `kubectl --kubeconfig`).
    Kubeconfig {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Add or delete nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Add or delete pods.
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
    /// Stop, start or restart a node's agent.
    Agent {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(value_parser = ["stop", "start", "restart"])]
        action: String,
        node: String,
    },
    /// Internal: the lab API server process.
    #[command(hide = true)]
    Apiserver {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        netns: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum NodeCommand {
    Add {
        #[arg(long, default_value = "lab")]
        name: String,
        /// Node number (node-N); the next free one by default.
        #[arg(long)]
        index: Option<u8>,
        #[arg(long, default_value_t = 2)]
        pods: u8,
        /// Namespaces and pods only, no `meshd agent` (for a node set up by hand).
        #[arg(long)]
        no_agent: bool,
    },
    Delete {
        #[arg(long, default_value = "lab")]
        name: String,
        node: String,
    },
}

#[derive(Subcommand)]
pub enum PodCommand {
    Add {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// `key=value`, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        pod: String,
    },
    Delete {
        #[arg(long, default_value = "lab")]
        name: String,
        pod: String,
    },
}

/// The binaries a lab runs: `meshd` (agents; `MESHD_BIN` or the one beside this binary) and
/// this binary (the API server).
fn binaries() -> Result<topology::Binaries> {
    let lab = std::env::current_exe().context("locating the meshd-lab binary")?;
    let meshd = match std::env::var_os("MESHD_BIN") {
        Some(p) => PathBuf::from(p),
        None => lab.with_file_name("meshd"),
    };
    if !meshd.is_file() {
        bail!(
            "no meshd binary at {} (build it with `cargo build -p meshd`, or set MESHD_BIN)",
            meshd.display()
        );
    }
    Ok(topology::Binaries { meshd, lab })
}

fn need_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the lab creates network namespaces and mounts: run it as root");
    }
    Ok(())
}

async fn run(cmd: LabCommand) -> Result<()> {
    match cmd {
        LabCommand::Up {
            name,
            nodes,
            pods_per_node,
            encryption,
            mut agent_args,
        } => {
            need_root()?;
            if encryption == "wireguard" {
                let mut defaults = vec![
                    "--enable-wireguard".to_string(),
                    "--enable-wireguard-userspace-fallback".to_string(),
                ];
                // Strict mode is on in the lab unless the agent arguments say otherwise.
                if !agent_args
                    .iter()
                    .any(|a| a.contains("encryption-strict-mode"))
                {
                    defaults.push("--enable-encryption-strict-mode".to_string());
                }
                agent_args.splice(0..0, defaults);
            }
            let lab = topology::up(
                &UpOptions {
                    name,
                    nodes,
                    pods_per_node,
                    agent_args,
                },
                &binaries()?,
            )
            .await?;
            println!(
                "lab {:?} is up: {} nodes, {} pods",
                lab.name,
                lab.nodes.len(),
                lab.pods().count()
            );
            println!(
                "kubectl --kubeconfig {} get ciliumnodes -o wide",
                lab.admin_kubeconfig().display()
            );
            Ok(())
        }
        LabCommand::Down { name, all } => {
            need_root()?;
            let names = if all {
                topology::all_labs()
            } else {
                vec![name]
            };
            for n in names {
                topology::down(&n)?;
                println!("lab {n:?} is down");
            }
            Ok(())
        }
        LabCommand::Status { name, no_ping } => status(&name, !no_ping),
        LabCommand::Exec {
            name,
            target,
            command,
        } => {
            use std::os::unix::process::CommandExt as _;
            let lab = LabState::load(&name)?;
            let prefix = lab.enter(&target)?;
            // Replaced by nsenter, which is replaced by the command: a signal to this process
            // reaches the command, and nothing is left behind when it is killed.
            let e = std::process::Command::new(&prefix[0])
                .args(&prefix[1..])
                .args(&command)
                .exec();
            Err(e).with_context(|| format!("running {command:?} in {target}"))
        }
        LabCommand::Capture { name, pings } => {
            need_root()?;
            let lab = LabState::load(&name)?;
            let c = topology::capture_underlay(&lab, pings)?;
            let encrypted = lab
                .nodes
                .iter()
                .any(|n| n.agent_args.iter().any(|a| a == "--enable-wireguard"));
            println!("Underlay capture (hub br0) during cross-node pod pings:");
            println!("  IP packets:                      {}", c.ip_packets);
            println!("  WireGuard (UDP 51871, node IPs): {}", c.wireguard);
            println!("  pod addresses in the clear:      {}", c.cleartext_pod);
            println!("  other:                           {}", c.other);
            if encrypted && (c.cleartext_pod > 0 || c.wireguard == 0) {
                bail!("pod traffic crossed the underlay unencrypted");
            }
            Ok(())
        }
        LabCommand::Kubeconfig { name } => {
            println!("{}", LabState::load(&name)?.admin_kubeconfig().display());
            Ok(())
        }
        LabCommand::Node { command } => match command {
            NodeCommand::Add {
                name,
                index,
                pods,
                no_agent,
            } => {
                need_root()?;
                let mut lab = LabState::load(&name)?;
                let index = index.unwrap_or_else(|| {
                    (1..=250)
                        .find(|i| !lab.nodes.iter().any(|n| n.index == *i))
                        .unwrap_or(250)
                });
                let args = lab
                    .nodes
                    .first()
                    .map(|n| n.agent_args.clone())
                    .unwrap_or_default();
                topology::add_node(
                    &mut lab,
                    index,
                    pods,
                    (!no_agent).then_some(args.as_slice()),
                )
                .await?;
                if !no_agent {
                    topology::wait_converged(&lab, std::time::Duration::from_secs(60)).await?;
                }
                println!("node-{index} added");
                Ok(())
            }
            NodeCommand::Delete { name, node } => {
                need_root()?;
                let mut lab = LabState::load(&name)?;
                topology::delete_node(&mut lab, &node).await?;
                println!("{node} deleted");
                Ok(())
            }
        },
        LabCommand::Pod { command } => match command {
            PodCommand::Add {
                name,
                node,
                namespace,
                labels,
                pod,
            } => {
                need_root()?;
                let mut lab = LabState::load(&name)?;
                let mut map = BTreeMap::new();
                for l in labels {
                    let (k, v) = l
                        .split_once('=')
                        .with_context(|| format!("label {l:?} is not key=value"))?;
                    map.insert(k.to_string(), v.to_string());
                }
                topology::add_pod(&mut lab, &node, &pod, &namespace, map).await?;
                println!("pod {pod} added on {node}");
                Ok(())
            }
            PodCommand::Delete { name, pod } => {
                need_root()?;
                let mut lab = LabState::load(&name)?;
                topology::delete_pod(&mut lab, &pod).await?;
                println!("pod {pod} deleted");
                Ok(())
            }
        },
        LabCommand::Agent { name, action, node } => {
            need_root()?;
            let mut lab = LabState::load(&name)?;
            if action != "start" {
                topology::stop_agent(&mut lab, &node)?;
            }
            if action != "stop" {
                topology::start_agent(&mut lab, &node)?;
                topology::wait_agent_ready(&lab, &node, std::time::Duration::from_secs(20)).await?;
            }
            println!("agent of {node}: {action} done");
            Ok(())
        }
        LabCommand::Apiserver { dir, netns } => apiserver(&dir, &netns).await,
    }
}

/// Binds the admin listener on the host's loopback, then the nodes' listener inside the hub
/// namespace, and serves both.
async fn apiserver(dir: &std::path::Path, netns: &std::path::Path) -> Result<()> {
    let admin =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding the admin listener")?;
    let port = admin.local_addr()?.port();
    let netns = netns.to_path_buf();
    // setns only moves the calling thread: bind in a thread of its own.
    let node = std::thread::spawn(move || -> Result<std::net::TcpListener> {
        let f =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the hub namespace")?;
        std::net::TcpListener::bind((topology::HUB_IP, topology::API_PORT))
            .context("binding the nodes' listener")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the binding thread panicked"))??;
    std::fs::write(dir.join("apiserver.port"), port.to_string())?;
    tracing::info!(
        port,
        "lab API server listening on 127.0.0.1 and {}:{}",
        topology::HUB_IP,
        topology::API_PORT
    );
    lab::apiserver::run_lab_server(dir, admin, Some(node)).await
}

fn status(name: &str, ping: bool) -> Result<()> {
    let lab = LabState::load(name)?;
    let dir = lab.dir();
    println!("Lab {:?} ({})", lab.name, dir.display());
    let api_alive = lab
        .apiserver_pid
        .is_some_and(|p| topology::process_alive(p, &dir));
    println!(
        "API server: {} (https://127.0.0.1:{}, kubeconfig {})",
        if api_alive { "running" } else { "DOWN" },
        lab.admin_port,
        lab.admin_kubeconfig().display()
    );
    if lab.world {
        println!(
            "World: {} (outside the cluster, via the hub; `meshd-lab exec world -- …`)",
            topology::WORLD_IPS.map(|a| a.to_string()).join(", ")
        );
    }
    println!();
    println!(
        "{:<10} {:<14} {:<16} {:<8} {:<8} PODS",
        "NODE", "IP", "POD CIDR", "AGENT", "PID"
    );
    for n in &lab.nodes {
        let alive = n
            .agent_pid
            .is_some_and(|p| topology::process_alive(p, &dir));
        let pods: Vec<String> = n
            .pods
            .iter()
            .map(|p| format!("{} ({})", p.name, p.ip))
            .collect();
        println!(
            "{:<10} {:<14} {:<16} {:<8} {:<8} {}",
            n.name,
            n.ip.to_string(),
            n.pod_cidr(),
            if alive { "running" } else { "DOWN" },
            n.agent_pid.map(|p| p.to_string()).unwrap_or("-".into()),
            pods.join(", ")
        );
    }
    println!();
    println!("CiliumNodes (kubectl get ciliumnodes -o wide):");
    match std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(lab.admin_kubeconfig())
        .args(["get", "ciliumnodes", "-o", "wide"])
        .output()
    {
        Ok(o) => print!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("  (kubectl not runnable: {e})"),
    }
    if ping {
        let results = topology::connectivity(&lab);
        let pods: Vec<&str> = lab.pods().map(|(_, p)| p.name.as_str()).collect();
        println!();
        println!("Pod connectivity (row pings column; ✔ reached, ✘ not):");
        print!("{:<10}", "");
        for p in &pods {
            print!("{p:<9}");
        }
        println!();
        for a in &pods {
            print!("{a:<10}");
            for b in &pods {
                let cell = if a == b {
                    "-"
                } else if results.iter().any(|(x, y, ok)| x == a && y == b && *ok) {
                    "✔"
                } else {
                    "✘"
                };
                print!("{cell:<9}");
            }
            println!();
        }
        let failed = results.iter().filter(|(_, _, ok)| !ok).count();
        println!(
            "{} of {} pod pairs reachable",
            results.len() - failed,
            results.len()
        );
        if failed > 0 {
            bail!("{failed} pod pairs cannot reach each other");
        }
    }
    Ok(())
}

/// `meshd-lab … | head` ends quietly, as Unix tools do; the API server keeps Rust's ignored
/// SIGPIPE.
#[allow(unsafe_code, reason = "restoring a signal's default disposition")]
fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_DFL installs no handler, so no code runs in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, LabCommand::Apiserver { .. }) {
        default_sigpipe();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd-lab: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
