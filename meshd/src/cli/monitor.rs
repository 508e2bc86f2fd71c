//! `meshd monitor`: live datapath events from the agent.

use std::path::Path;

use anyhow::Result;

use super::proto_name;
use crate::Output;

/// `meshd monitor`: one line per event, in the shape of `cilium-dbg monitor`.
pub async fn monitor(socket: &Path, kind: Option<&str>, output: Output) -> Result<()> {
    eprintln!(
        "Listening for events on {} (Ctrl-C to stop)",
        socket.display()
    );
    let mut out = std::io::stdout();
    meshd_api::Client::new(socket)
        .monitor(|e| {
            if kind == Some("auth") && e.kind != "auth-required" {
                return true;
            }
            let proto = proto_name(e.proto).to_lowercase();
            let line = match output {
                Output::Json => serde_json::to_string(&e).unwrap_or_default(),
                Output::Table => format!(
                    "xx drop ({}) {}, identity {}->{}: {} -> {}:{} {proto}",
                    e.reason_text,
                    e.direction,
                    e.src_identity,
                    e.dst_identity,
                    e.src,
                    e.dst,
                    e.dport
                ),
            };
            use std::io::Write as _;
            writeln!(out, "{line}").is_ok() && out.flush().is_ok()
        })
        .await?;
    Ok(())
}
