//! `meshd policy validate|get`: policies checked offline, and what the agent enforces.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;

use super::proto_name;
use crate::Output;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// The agent's policies (in force, refused, unsupported parts) and each local endpoint's
    /// entries (the contract's policy-map key and value).
    Get {
        #[arg(long, default_value = meshd_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Only this endpoint (`namespace/name`).
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Check policy files offline (no agent needed): parse, compile, report errors and the
    /// fields meshd does not enforce. Exits 1 if any object is invalid.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

pub async fn policy_get(socket: &Path, endpoint: Option<&str>, output: Output) -> Result<()> {
    let mut st = meshd_api::Client::new(socket).policy().await?;
    if let Some(ep) = endpoint {
        st.endpoints.retain(|e| e.endpoint == ep);
        if st.endpoints.is_empty() {
            anyhow::bail!("no local endpoint {ep} (see `meshd endpoint list`)");
        }
    }
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!("Enforcement: {}", st.enforcement);
    println!("Policies:");
    for o in &st.objects {
        let state = match (&o.error, o.in_force) {
            (None, _) => "ok".to_string(),
            (Some(e), true) => format!("REFUSED (the previous version stays in force): {e}"),
            (Some(e), false) => format!("REFUSED: {e}"),
        };
        println!("  {}  {state}", o.object);
        for u in &o.unsupported {
            println!("      unsupported {u}");
        }
    }
    for e in &st.endpoints {
        let id = e.identity.map_or("pending".to_string(), |i| i.to_string());
        let dir = |on: bool| if on { "default deny" } else { "allow all" };
        println!(
            "\nEndpoint {} (identity {id}): ingress {}, egress {}",
            e.endpoint,
            dir(e.ingress_enforced),
            dir(e.egress_enforced)
        );
        if e.entries.is_empty() {
            continue;
        }
        println!(
            "  {:<10} {:<9} {:<6} {:<6} {:<7} {:<8} AUTH",
            "IDENTITY", "DIRECTION", "PROTO", "PORT", "PREFIX", "VERDICT"
        );
        for x in &e.entries {
            let proto = proto_name(x.protocol);
            let port = if x.protocol == 0 || x.prefix_len <= 48 {
                "ANY".to_string()
            } else {
                x.port.to_string()
            };
            println!(
                "  {:<10} {:<9} {:<6} {:<6} {:<7} {:<8} {:#04x}",
                x.identity, x.direction, proto, port, x.prefix_len, x.verdict, x.auth_type
            );
        }
    }
    Ok(())
}

pub async fn policy(cmd: PolicyCommand) -> Result<()> {
    let (files, output) = match cmd {
        PolicyCommand::Get {
            socket,
            endpoint,
            output,
        } => return policy_get(&socket, endpoint.as_deref(), output).await,
        PolicyCommand::Validate { files, output } => (files, output),
    };
    let mut report = Vec::new();
    let mut failed = 0;
    for f in &files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                failed += 1;
                report.push(serde_json::json!({"file": f, "error": format!("cannot read {}: {e}", f.display())}));
                continue;
            }
        };
        for doc in policy::parse_documents(&text, &f.display().to_string()) {
            match doc {
                Ok(p) => {
                    // Compile for an endpoint each rule selects, to exercise the whole path.
                    let entries: usize = p
                        .rules
                        .iter()
                        .map(|r| {
                            let ep = policy::EndpointLabels {
                                namespace: r
                                    .subject
                                    .namespace
                                    .clone()
                                    .unwrap_or_else(|| "default".into()),
                                labels: r.subject.selector.match_labels.clone(),
                            };
                            policy::compile(
                                std::slice::from_ref(&p),
                                &ep,
                                &[],
                                &policy::CidrIdentities::for_policies(std::slice::from_ref(&p)),
                            )
                            .entries
                            .len()
                        })
                        .sum();
                    report.push(serde_json::json!({
                        "file": f, "object": p.object(), "valid": true, "rules": p.rules.len(), "entries": entries,
                        "unsupported": p.unsupported.iter().map(|u| serde_json::json!({"field": u.field, "reason": u.reason})).collect::<Vec<_>>(),
                    }));
                }
                Err(e) => {
                    failed += 1;
                    report.push(serde_json::json!({"file": f, "object": e.object, "valid": false, "field": e.field, "error": e.message}));
                }
            }
        }
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => {
            for r in &report {
                let object = r["object"].as_str().unwrap_or("");
                if r["valid"] == true {
                    println!("valid    {object} ({} rules)", r["rules"]);
                    for u in r["unsupported"].as_array().into_iter().flatten() {
                        println!(
                            "         unsupported {}: {}",
                            u["field"].as_str().unwrap_or(""),
                            u["reason"].as_str().unwrap_or("")
                        );
                    }
                } else if let Some(field) = r["field"].as_str() {
                    println!(
                        "INVALID  {object}: {field}: {}",
                        r["error"].as_str().unwrap_or("")
                    );
                } else {
                    println!("INVALID  {}", r["error"].as_str().unwrap_or(""));
                }
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} invalid policy object(s)");
    }
    Ok(())
}
