//! `cargo xtask …`: everything that is not plain cargo. `setup` installs what is missing
//! (idempotently, saying what it does), `lab` runs the demo, `test` runs every test.

use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

/// Debian packages the lab and the tests use.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip: namespaces, veths, routes"),
    ("iputils-ping", "ping: connectivity checks"),
    ("util-linux", "nsenter/unshare: entering lab nodes"),
    ("tcpdump", "captures on the lab underlay"),
    ("iperf3", "throughput benchmarks"),
    ("wireguard-tools", "wg: inspecting WireGuard devices"),
    ("kmod", "modprobe/modinfo: kernel feature checks"),
];

fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn setup() -> Result<()> {
    let missing: Vec<&(&str, &str)> = PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!(
            "xtask setup: all {} Debian packages present",
            PACKAGES.len()
        );
    } else {
        for (p, why) in &missing {
            eprintln!("xtask setup: installing {p} ({why})");
        }
        if !nix_is_root() {
            bail!("installing packages needs root: run `sudo cargo xtask setup`");
        }
        sh(Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|(p, _)| *p))
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if which("kubectl").is_none() {
        eprintln!(
            "xtask setup: kubectl is not installed; the kubectl compatibility tests need it (Debian: kubernetes-client)"
        );
    }
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn which(bin: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build() -> Result<()> {
    eprintln!("xtask: building meshd");
    sh(cargo().args(["build", "--workspace", "--bins"]))
}

fn meshd_bin() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("debug").join("meshd")
}

fn lab(args: &[String]) -> Result<()> {
    setup()?;
    build()?;
    let keep = args.iter().any(|a| a == "--keep");
    let meshd = meshd_bin();
    let name = "demo";
    // A previous demo that was kept or crashed.
    let _ = Command::new(&meshd)
        .args(["lab", "down", "--name", name])
        .status();
    eprintln!("xtask lab: bringing up a 3-node lab with 2 pods per node");
    sh(Command::new(&meshd).args([
        "lab",
        "up",
        "--name",
        name,
        "--nodes",
        "3",
        "--pods-per-node",
        "2",
    ]))?;
    let result = (|| -> Result<()> {
        sh(Command::new(&meshd).args(["lab", "status", "--name", name]))?;
        eprintln!(
            "\nxtask lab: the agent's view on node-1 (`meshd lab exec node-1 -- meshd status`):"
        );
        sh(Command::new(&meshd)
            .args(["lab", "exec", "--name", name, "node-1", "--"])
            .arg(&meshd)
            .arg("status"))?;
        for node in ["node-1", "node-2", "node-3"] {
            eprintln!("\nxtask lab: `meshd encrypt status` on {node}:");
            sh(Command::new(&meshd)
                .args(["lab", "exec", "--name", name, node, "--"])
                .arg(&meshd)
                .args(["encrypt", "status"]))?;
        }
        eprintln!(
            "\nxtask lab: `wg show` inside node-1 (the userspace device answers the WireGuard UAPI):"
        );
        sh(Command::new(&meshd)
            .args(["lab", "exec", "--name", name, "node-1", "--", "wg", "show"]))?;
        eprintln!("\nxtask lab: what crosses the underlay while pods talk across nodes:");
        sh(Command::new(&meshd).args(["lab", "capture", "--name", name]))?;
        Ok(())
    })();
    if keep {
        eprintln!(
            "\nxtask lab: left up (--keep). Try:\n  {} lab status --name {name}\n  kubectl --kubeconfig /run/meshd-lab/{name}/admin.kubeconfig get ciliumnodes -o wide\n  {} lab down --name {name}",
            meshd.display(),
            meshd.display()
        );
    } else {
        eprintln!("\nxtask lab: tearing down (use --keep to leave it up)");
        sh(Command::new(&meshd).args(["lab", "down", "--name", name]))?;
    }
    result
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    eprintln!("xtask test: running every test of the workspace (lab tests need root)");
    sh(cargo().args(["test", "--workspace"]).args(args))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("lab") => lab(&args[1..]),
        Some("test") => test(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <setup | lab [--keep] | test [cargo test args]>");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
