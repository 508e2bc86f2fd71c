//! The CLI as a user runs it, for commands that need no agent.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::process::Command;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

#[test]
fn policy_validate_reports_unsupported_fields_and_fails_on_invalid_objects() {
    let article = format!("{}/../policy/tests/article", env!("CARGO_MANIFEST_DIR"));
    let files: Vec<String> = std::fs::read_dir(&article)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let out = Command::new(MESHD)
        .args(["policy", "validate", "-o", "json"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.as_array().unwrap().len(), 10);
    let http = report
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["object"] == "CiliumNetworkPolicy production/http-policy")
        .unwrap();
    assert_eq!(
        http["unsupported"][0]["field"],
        "spec.ingress[0].toPorts[0].rules"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad, namespace: prod}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.0/40]\n").unwrap();
    let out = Command::new(MESHD)
        .args(["policy", "validate"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("INVALID  CiliumNetworkPolicy prod/bad: spec.egress[0].toCIDR[0]: \"10.0.0.0/40\" is not a CIDR"), "{text}");
}

#[test]
fn agent_refuses_options_it_cannot_honour() {
    for (flag, needle) in [
        ("--enable-ipsec", "enable-ipsec"),
        ("--enable-node-encryption", "enable-node-encryption"),
    ] {
        let out = Command::new(MESHD)
            .args([
                "agent",
                flag,
                "--node-name",
                "n",
                "--socket-path",
                "/nonexistent/x.sock",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && err.contains("not available"),
            "{err}"
        );
    }
}
