//! `meshd encrypt status`: Cilium's `encrypt status` lines, then meshd's extras.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::Output;
use meshd_api::Status;
use std::fmt::Write as _;

#[derive(Subcommand)]
pub enum EncryptCommand {
    /// Cilium's `encrypt status` lines, then meshd's per-peer details.
    Status {
        #[arg(long, default_value = meshd_api::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// `cilium-dbg encrypt status`, byte for byte (Go's `%-26s` padding included), then meshd's
/// extras.
pub fn render_encrypt_status(s: &Status) -> String {
    let mut out = String::new();
    let Some(w) = &s.wireguard else {
        let _ = writeln!(out, "Encryption: {:<26}", "Disabled");
        return out;
    };
    let configured = w
        .peers
        .iter()
        .filter(|p| !p.state.starts_with("refused"))
        .count();
    let _ = writeln!(out, "Encryption: {:<26}", "Wireguard");
    let _ = writeln!(out, "Interface: {}", w.interface);
    let _ = writeln!(out, "\tPublic key: {}", w.public_key);
    let _ = writeln!(out, "\tNumber of peers: {configured}");
    let _ = writeln!(out);
    let _ = writeln!(out, "Backend: {}", w.backend);
    let _ = writeln!(out, "Listen port: {}", w.listen_port);
    let _ = writeln!(
        out,
        "Node encryption: {}",
        if w.node_encryption {
            "Enabled"
        } else {
            "Disabled"
        }
    );
    let _ = writeln!(out, "Peers:");
    for p in &w.peers {
        let hs = p
            .last_handshake_seconds
            .map_or("never".to_string(), |a| format!("{a}s ago"));
        let _ = writeln!(out, "  {}:", p.node);
        if let Some(k) = &p.public_key {
            let _ = writeln!(out, "    public key:     {k}");
        }
        if let Some(e) = &p.endpoint {
            let _ = writeln!(out, "    endpoint:       {e}");
            let _ = writeln!(out, "    allowed ips:    {}", p.allowed_ips.join(", "));
            let _ = writeln!(out, "    last handshake: {hs}");
            let _ = writeln!(
                out,
                "    transfer:       {} B received, {} B sent",
                p.transfer_rx, p.transfer_tx
            );
        }
        let _ = writeln!(out, "    state:          {}", p.state);
    }
    out
}

/// Cilium's JSON shape plus meshd's extras.
pub fn encrypt_status_json(s: &Status) -> serde_json::Value {
    match &s.wireguard {
        None => serde_json::json!({"mode": "Disabled"}),
        Some(w) => {
            let configured = w
                .peers
                .iter()
                .filter(|p| !p.state.starts_with("refused"))
                .count();
            serde_json::json!({
                "mode": "Wireguard",
                "wireguard": {
                    "node-encryption": if w.node_encryption { "Enabled" } else { "Disabled" },
                    "interfaces": [{
                        "name": w.interface,
                        "public-key": w.public_key,
                        "listen-port": w.listen_port,
                        "peer-count": configured,
                        "peers": w.peers,
                    }],
                },
                "meshd": {"backend": w.backend},
            })
        }
    }
}

pub async fn encrypt(cmd: EncryptCommand) -> Result<()> {
    match cmd {
        EncryptCommand::Status { socket, output } => {
            let s = meshd_api::Client::new(socket).status().await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&encrypt_status_json(&s))?
                ),
                Output::Table => print!("{}", render_encrypt_status(&s)),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::testing::sample;

    #[test]
    fn encrypt_status_matches_ciliums_format_strings() {
        let mut s = sample();
        s.wireguard = Some(meshd_api::WireguardStatus {
            backend: "userspace".into(),
            interface: "cilium_wg0".into(),
            public_key: "PUB=".into(),
            listen_port: 51871,
            node_encryption: false,
            peers: vec![
                meshd_api::WireguardPeer {
                    node: "node-2".into(),
                    public_key: Some("K2=".into()),
                    endpoint: Some("198.18.0.12:51871".into()),
                    allowed_ips: vec!["198.19.2.0/24".into()],
                    last_handshake_seconds: Some(3),
                    transfer_rx: 10,
                    transfer_tx: 20,
                    state: "up".into(),
                },
                meshd_api::WireguardPeer {
                    node: "node-3".into(),
                    public_key: None,
                    endpoint: None,
                    allowed_ips: vec![],
                    last_handshake_seconds: None,
                    transfer_rx: 0,
                    transfer_tx: 0,
                    state: "refused: bad key".into(),
                },
            ],
        });
        let out = render_encrypt_status(&s);
        // "Encryption: %-26s\n", "Interface: %s\n", "\tPublic key: %s\n", "\tNumber of peers: %d\n"
        assert!(out.starts_with("Encryption: Wireguard                 \nInterface: cilium_wg0\n\tPublic key: PUB=\n\tNumber of peers: 1\n"), "{out:?}");
        assert!(out.contains("state:          refused: bad key"), "{out}");
        let j = encrypt_status_json(&s);
        assert_eq!(j["mode"], "Wireguard");
        assert_eq!(j["wireguard"]["interfaces"][0]["peer-count"], 1);
        assert_eq!(j["wireguard"]["interfaces"][0]["public-key"], "PUB=");
    }
}
