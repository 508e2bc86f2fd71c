//! `meshd status`: the agent's view in `cilium status` lines.

use std::path::Path;

use anyhow::Result;

use super::{age, health};
use crate::Output;
#[cfg(test)]
use meshd_api::ComponentStatus;
use meshd_api::{Health, Status};
use std::fmt::Write as _;

/// `cilium status`-style lines; `Encryption:` uses Cilium's exact tab-separated form.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let addrs: Vec<String> = s.node_addresses.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "Node:\t{} ({})", s.node_name, addrs.join(", "));
    let _ = writeln!(
        out,
        "Kubernetes:\t{}   {}",
        health(&s.kubernetes.state),
        s.kubernetes.message
    );
    let _ = writeln!(
        out,
        "Pod CIDRs:\t{}",
        if s.pod_cidrs.is_empty() {
            "<none>".into()
        } else {
            s.pod_cidrs.join(", ")
        }
    );
    let _ = writeln!(out, "Encryption:\t{}", s.encryption);
    if s.encryption_health.state == Health::Failure {
        let _ = writeln!(
            out,
            "  \t{}\t{}",
            health(&s.encryption_health.state),
            s.encryption_health.message
        );
    }
    let _ = writeln!(
        out,
        "Strict mode:\t{}",
        if s.strict_mode.state == Health::Disabled {
            s.strict_mode.message.clone()
        } else {
            format!(
                "{}   {}",
                health(&s.strict_mode.state),
                s.strict_mode.message
            )
        }
    );
    let _ = writeln!(
        out,
        "Datapath:\t{}   {}",
        health(&s.datapath.state),
        s.datapath.message
    );
    let ok = s
        .nodes
        .iter()
        .filter(|n| n.routes.state == Health::Ok)
        .count();
    let _ = writeln!(out, "Nodes:\t{} remote, routes Ok for {ok}", s.nodes.len());
    for n in &s.nodes {
        let _ = writeln!(
            out,
            "  {}\t{}\t{}",
            n.name,
            health(&n.routes.state),
            n.routes.message
        );
    }
    let _ = writeln!(out, "Endpoints:\t{}", s.endpoints);
    let _ = writeln!(out, "Uptime:\t{}", age(s.uptime_seconds));
    let failures = s.failures();
    if !failures.is_empty() {
        let _ = writeln!(out, "Unhealthy:\t{}", failures.join("; "));
    }
    out
}

pub async fn status(socket: &Path, output: Output) -> Result<()> {
    let s = meshd_api::Client::new(socket).status().await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        Output::Table => print!("{}", render_status(&s)),
    }
    let failures = s.failures();
    if !failures.is_empty() {
        // As `cilium status` does for a failing component: the node is not healthy.
        anyhow::bail!("the node is unhealthy: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_down_device_makes_the_node_unhealthy() {
        let mut s = sample();
        s.encryption_health = ComponentStatus {
            state: Health::Failure,
            message: "cilium_wg0 is down".into(),
        };
        let out = render_status(&s);
        assert!(
            out.contains("Unhealthy:\tEncryption: cilium_wg0 is down"),
            "{out}"
        );
        assert_eq!(s.failures().len(), 1);
    }

    use super::*;
    use crate::cli::encrypt::render_encrypt_status;
    use crate::cli::testing::sample;

    #[test]
    fn status_has_ciliums_encryption_line() {
        let s = sample();
        let out = render_status(&s);
        assert!(out.lines().any(|l| l == "Encryption:\tDisabled"), "{out}");
        assert!(out.contains("Nodes:\t1 remote, routes Ok for 1"), "{out}");
        assert!(out.contains("Strict mode:\tDisabled"), "{out}");
        assert!(!out.contains("Unhealthy"), "{out}");
        assert_eq!(
            render_encrypt_status(&s),
            "Encryption: Disabled                  \n"
        );
    }
}
