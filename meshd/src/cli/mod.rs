//! Command-line rendering of the agent's local API (`meshd status`, `meshd endpoint list`).

pub mod lab;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use meshd_api::{Health, Status};

use crate::Output;

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// List the endpoints on this node.
    List {
        #[arg(long, default_value = meshd_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn health(h: &Health) -> &'static str {
    match h {
        Health::Ok => "Ok",
        Health::Degraded => "Degraded",
        Health::Failure => "Failure",
        Health::Disabled => "Disabled",
    }
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// `cilium status`-style lines; `Encryption:` uses Cilium's exact tab-separated form.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let addrs: Vec<String> = s.node_addresses.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "Node:\t{} ({})", s.node_name, addrs.join(", "));
    let _ = writeln!(out, "Kubernetes:\t{}   {}", health(&s.kubernetes.state), s.kubernetes.message);
    let _ = writeln!(out, "Pod CIDRs:\t{}", if s.pod_cidrs.is_empty() { "<none>".into() } else { s.pod_cidrs.join(", ") });
    let _ = writeln!(out, "Encryption:\t{}", s.encryption);
    let ok = s.nodes.iter().filter(|n| n.routes.state == Health::Ok).count();
    let _ = writeln!(out, "Nodes:\t{} remote, routes Ok for {ok}", s.nodes.len());
    for n in &s.nodes {
        let _ = writeln!(out, "  {}\t{}\t{}", n.name, health(&n.routes.state), n.routes.message);
    }
    let _ = writeln!(out, "Endpoints:\t{}", s.endpoints);
    let _ = writeln!(out, "Uptime:\t{}", age(s.uptime_seconds));
    out
}

pub async fn status(socket: &Path, output: Output) -> Result<()> {
    let s = meshd_api::Client::new(socket).status().await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => print!("{}", render_status(&s)),
    }
    Ok(())
}

pub async fn endpoint(cmd: EndpointCommand) -> Result<()> {
    match cmd {
        EndpointCommand::List { socket, output } => {
            let eps = meshd_api::Client::new(socket).endpoints().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&eps)?),
                Output::Table => {
                    println!("{:<28} {:<12} {:<18} LABELS", "ENDPOINT", "INTERFACE", "IPv4");
                    for e in eps {
                        let ip = e.addresses.iter().find(|a| a.is_ipv4()).map(ToString::to_string).unwrap_or_default();
                        let labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        println!("{:<28} {:<12} {:<18} {}", format!("{}/{}", e.namespace, e.name), e.interface, ip, labels.join(","));
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_api::{ComponentStatus, NodeStatus};

    #[test]
    fn status_has_ciliums_encryption_line() {
        let s = Status {
            node_name: "node-1".into(),
            version: "0.1.0".into(),
            kubernetes: ComponentStatus { state: Health::Ok, message: "Ok".into() },
            node_addresses: vec!["198.18.0.11".parse().unwrap()],
            pod_cidrs: vec!["198.19.1.0/24".into()],
            encryption: "Disabled".into(),
            nodes: vec![NodeStatus {
                name: "node-2".into(),
                addresses: vec![],
                pod_cidrs: vec![],
                routes: ComponentStatus { state: Health::Ok, message: "198.19.2.0/24 via 198.18.0.12".into() },
            }],
            endpoints: 2,
            uptime_seconds: 61,
        };
        let out = render_status(&s);
        assert!(out.lines().any(|l| l == "Encryption:\tDisabled"), "{out}");
        assert!(out.contains("Nodes:\t1 remote, routes Ok for 1"), "{out}");
    }
}
