//! `meshd bpf …`: the pinned eBPF maps read directly (as `cilium-dbg bpf`), no agent needed.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;

use crate::Output;

#[derive(Subcommand)]
pub enum BpfCommand {
    /// The auth map.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// An endpoint's policy map as the kernel has it.
    Policy {
        #[command(subcommand)]
        command: BpfPolicyCommand,
    },
    /// The ipcache: prefix → identity, node.
    Ipcache {
        #[command(subcommand)]
        command: BpfIpcacheCommand,
    },
    /// The datapath's drop counters (as `cilium-dbg bpf metrics list`).
    Metrics {
        #[command(subcommand)]
        command: BpfIpcacheCommand,
    },
}

/// Cilium's drop reason texts for the reasons meshd's datapath reports.
pub fn reason_text(reason: u8) -> &'static str {
    match reason {
        datapath::REASON_POLICY_DENIED => "Policy denied",
        datapath::REASON_AUTH_REQUIRED => "Authentication required",
        datapath::REASON_UNENCRYPTED => "Traffic is unencrypted",
        _ => "unknown",
    }
}

fn bpf_metrics(bpf_root: &Path, output: Output) -> Result<()> {
    let counts = datapath::read_drop_counts(&bpf_root.join("meshd"))?;
    let rows: Vec<serde_json::Value> = counts
        .iter()
        .map(|c| serde_json::json!({
            "reason": c.reason, "description": reason_text(c.reason),
            "direction": if c.egress { "EGRESS" } else { "INGRESS" }, "packets": c.count, "bytes": c.bytes,
        }))
        .collect();
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<28} {:<10} {:<10} BYTES",
            "REASON", "DIRECTION", "PACKETS"
        );
        for r in rows {
            println!(
                "{:<28} {:<10} {:<10} {}",
                r["description"].as_str().unwrap_or(""),
                r["direction"].as_str().unwrap_or(""),
                r["packets"].to_string(),
                r["bytes"]
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum BpfPolicyCommand {
    /// `meshd bpf policy get <host-side interface of the endpoint>`.
    Get {
        interface: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpf_root: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
pub enum BpfIpcacheCommand {
    List {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpf_root: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
pub enum AuthCommand {
    /// `SRC IDENTITY  DST IDENTITY  REMOTE NODE ID  AUTH TYPE  EXPIRATION`.
    List {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpf_root: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// DEBUG ONLY, BYPASSES MUTUAL AUTHENTICATION: writes an auth entry by hand, which lets
    /// the flows of an `authentication.mode: required` rule through as if the two nodes had
    /// completed the mTLS handshake. For tests and debugging, never for production.
    Add {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpf_root: PathBuf,
        #[arg(long)]
        local: u32,
        #[arg(long)]
        remote: u32,
        #[arg(long, default_value_t = 0)]
        remote_node_id: u16,
        #[arg(long, default_value_t = 1)]
        auth_type: u8,
        /// Seconds from now; 0 writes an already expired entry.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
    },
}

fn bpf_policy(interface: &str, bpf_root: &Path, output: Output) -> Result<()> {
    let entries = datapath::read_policy(&bpf_root.join("meshd"), interface)?;
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|(prefix, k, v)| serde_json::json!({
            "prefixlen": prefix, "identity": k.identity, "direction": if k.egress == 1 { "egress" } else { "ingress" },
            "protocol": k.proto, "port": u16::from_be(k.dport),
            "verdict": if v.flags & datapath::POLICY_FLAG_DENY != 0 { "deny" } else { "allow" }, "auth-type": v.auth_type,
        }))
        .collect();
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<10} {:<9} {:<6} {:<6} {:<7} {:<8} AUTH",
            "IDENTITY", "DIRECTION", "PROTO", "PORT", "PREFIX", "VERDICT"
        );
        for r in rows {
            println!(
                "{:<10} {:<9} {:<6} {:<6} {:<7} {:<8} {:#04x}",
                // (a JSON value's Display ignores the width)
                r["identity"].to_string(),
                r["direction"].as_str().unwrap_or(""),
                r["protocol"].to_string(),
                r["port"].to_string(),
                r["prefixlen"].to_string(),
                r["verdict"].as_str().unwrap_or(""),
                r["auth-type"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(())
}

fn bpf_ipcache(bpf_root: &Path, output: Output) -> Result<()> {
    let entries = datapath::read_ipcache(&bpf_root.join("meshd"))?;
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|(addr, prefix, v)| serde_json::json!({
            "prefix": format!("{}/{prefix}", std::net::Ipv4Addr::from(*addr)), "identity": v.identity, "node-id": v.node_id,
        }))
        .collect();
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<20} {:<10} NODE ID", "PREFIX", "IDENTITY");
        for r in rows {
            println!(
                "{:<20} {:<10} {}",
                r["prefix"].as_str().unwrap_or(""),
                r["identity"].to_string(),
                r["node-id"]
            );
        }
    }
    Ok(())
}

pub fn bpf(cmd: BpfCommand) -> Result<()> {
    let command = match cmd {
        BpfCommand::Auth { command } => command,
        BpfCommand::Policy {
            command:
                BpfPolicyCommand::Get {
                    interface,
                    bpf_root,
                    output,
                },
        } => return bpf_policy(&interface, &bpf_root, output),
        BpfCommand::Ipcache {
            command: BpfIpcacheCommand::List { bpf_root, output },
        } => return bpf_ipcache(&bpf_root, output),
        BpfCommand::Metrics {
            command: BpfIpcacheCommand::List { bpf_root, output },
        } => return bpf_metrics(&bpf_root, output),
    };
    match command {
        AuthCommand::List { bpf_root, output } => {
            let map = datapath::AuthMap::open(&bpf_root.join("meshd"))?;
            let now = datapath::monotonic_seconds();
            let rows: Vec<serde_json::Value> = map
                .list()
                .into_iter()
                .map(|(k, v)| serde_json::json!({
                    "src-identity": k.local_identity, "dst-identity": k.remote_identity, "remote-node-id": k.remote_node_id,
                    "auth-type": k.auth_type, "expiration": v.expiration, "expires-in-seconds": v.expiration as i64 - now as i64,
                }))
                .collect();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("SRC IDENTITY   DST IDENTITY   REMOTE NODE ID   AUTH TYPE   EXPIRATION");
                for r in rows {
                    let left = r["expires-in-seconds"].as_i64().unwrap_or(0);
                    let exp = if left > 0 {
                        format!("in {left}s")
                    } else {
                        format!("expired {}s ago", -left)
                    };
                    let t = if r["auth-type"] == 1 {
                        "spire".to_string()
                    } else {
                        r["auth-type"].to_string()
                    };
                    println!(
                        "{:<14} {:<14} {:<16} {:<11} {exp}",
                        r["src-identity"].to_string(),
                        r["dst-identity"].to_string(),
                        r["remote-node-id"].to_string(),
                        t
                    );
                }
            }
            Ok(())
        }
        AuthCommand::Add {
            bpf_root,
            local,
            remote,
            remote_node_id,
            auth_type,
            expires_in,
        } => {
            let mut map = datapath::AuthMap::open(&bpf_root.join("meshd"))?;
            let key = datapath::AuthKey {
                local_identity: local,
                remote_identity: remote,
                remote_node_id,
                auth_type,
                pad: 0,
            };
            let expiration = if expires_in == 0 {
                datapath::monotonic_seconds().saturating_sub(1)
            } else {
                datapath::monotonic_seconds() + expires_in
            };
            map.insert(key, datapath::AuthValue { expiration })?;
            println!(
                "auth entry {local} -> {remote} (node {remote_node_id}, type {auth_type}) written"
            );
            Ok(())
        }
    }
}
