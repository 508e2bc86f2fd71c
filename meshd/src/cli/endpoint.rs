//! `meshd endpoint list`: local endpoints with their identities.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

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

pub async fn endpoint(cmd: EndpointCommand) -> Result<()> {
    match cmd {
        EndpointCommand::List { socket, output } => {
            let eps = meshd_api::Client::new(socket).endpoints().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&eps)?),
                Output::Table => {
                    println!(
                        "{:<28} {:<10} {:<12} {:<18} LABELS",
                        "ENDPOINT", "IDENTITY", "INTERFACE", "IPv4"
                    );
                    for e in eps {
                        let ip = e
                            .addresses
                            .iter()
                            .find(|a| a.is_ipv4())
                            .map(ToString::to_string)
                            .unwrap_or_default();
                        let labels: Vec<String> =
                            e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        let id = e.identity.map_or("pending".to_string(), |i| i.to_string());
                        println!(
                            "{:<28} {:<10} {:<12} {:<18} {}",
                            format!("{}/{}", e.namespace, e.name),
                            id,
                            e.interface,
                            ip,
                            labels.join(",")
                        );
                    }
                }
            }
            Ok(())
        }
    }
}
