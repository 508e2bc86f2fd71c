//! `cargo xtask …`: everything that is not plain cargo. `setup` installs what is missing
//! (idempotently, saying what it does), `lab` runs the demo, `test` runs every test.

use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

mod bench_datapath;
mod bench_nodes;
mod bench_wg;
mod fuzz;
mod vm;

/// Debian packages the lab and the tests use.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip: namespaces, veths, routes"),
    ("iputils-ping", "ping: connectivity checks"),
    ("util-linux", "nsenter/unshare: entering lab nodes"),
    ("tcpdump", "captures on the lab underlay"),
    ("iperf3", "throughput benchmarks"),
    ("wireguard-tools", "wg: inspecting WireGuard devices"),
    ("kmod", "modprobe/modinfo: kernel feature checks"),
    (
        "bpftool",
        "inspecting meshd's pinned eBPF maps independently",
    ),
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

/// What the kernel-VM tests need: Debian's kernel (it has WireGuard and ESP; this machine's
/// kernel does not), QEMU with virtiofsd and qboot, busybox for poweroff.
const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "QEMU for the kernel-VM tests"),
    (
        "linux-image-6.12-rt-amd64",
        "a kernel with WireGuard, ESP and TCX for the VM",
    ),
    (
        "linux-image-amd64",
        "Debian 12's own 6.1 kernel (no TCX) for the VM",
    ),
    ("cpio", "the initramfs the 6.1 VM boots with"),
    ("busybox", "poweroff inside the VM"),
    (
        "wireguard-go",
        "an independent WireGuard peer for interop tests",
    ),
];

fn install(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&(&str, &str)> = packages.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
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
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The eBPF toolchain: nightly's rust-src (for `-Z build-std=core`) and bpf-linker linked
/// against nightly's own libLLVM (plain `cargo install bpf-linker` wants an LLVM Debian lacks).
fn setup_ebpf() -> Result<()> {
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        });
    if !has_src {
        eprintln!("xtask setup: installing rust-src for the nightly toolchain (eBPF builds)");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if which("bpf-linker").is_some() {
        return Ok(());
    }
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()?;
    let sysroot = std::path::PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let version = Command::new("rustc").args(["+nightly", "-vV"]).output()?;
    let major = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("LLVM version: ")
                .map(|v| v.split('.').next().unwrap_or("").to_string())
        })
        .context("nightly rustc does not say its LLVM version")?;
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .context("nightly has no libLLVM.so")?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = std::path::Path::new(&home).join(".local/lib/bpf-linker-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let name = lib.file_name().context("libLLVM path")?.to_owned();
    std::fs::copy(&lib, prefix.join("lib").join(&name))?;
    let link = prefix.join("lib").join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&name, &link)?;
    eprintln!(
        "xtask setup: building bpf-linker against nightly's LLVM {major} (about 2 minutes, once)"
    );
    sh(cargo()
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn setup() -> Result<()> {
    install(PACKAGES)?;
    install(VM_PACKAGES)?;
    setup_ebpf()?;
    eprintln!(
        "xtask setup: all {} Debian packages present",
        PACKAGES.len() + VM_PACKAGES.len()
    );
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
    eprintln!("xtask: building meshd and meshd-lab");
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

/// `meshd-lab`, built beside `meshd`.
fn lab_bin(meshd: &std::path::Path) -> std::path::PathBuf {
    meshd.with_file_name("meshd-lab")
}

fn lab(args: &[String]) -> Result<()> {
    setup()?;
    build()?;
    let keep = args.iter().any(|a| a == "--keep");
    let meshd = meshd_bin();
    let name = "demo";
    // A previous demo that was kept or crashed.
    let _ = Command::new(crate::lab_bin(&meshd))
        .args(["down", "--name", name])
        .status();
    eprintln!("xtask lab: bringing up a 3-node lab with 2 pods per node");
    sh(Command::new(crate::lab_bin(&meshd)).args([
        "up",
        "--name",
        name,
        "--nodes",
        "3",
        "--pods-per-node",
        "2",
    ]))?;
    let result = (|| -> Result<()> {
        sh(Command::new(crate::lab_bin(&meshd)).args(["status", "--name", name]))?;
        eprintln!(
            "\nxtask lab: the agent's view on node-1 (`meshd-lab exec node-1 -- meshd status`):"
        );
        sh(Command::new(crate::lab_bin(&meshd))
            .args(["exec", "--name", name, "node-1", "--"])
            .arg(&meshd)
            .arg("status"))?;
        for node in ["node-1", "node-2", "node-3"] {
            eprintln!("\nxtask lab: `meshd encrypt status` on {node}:");
            sh(Command::new(crate::lab_bin(&meshd))
                .args(["exec", "--name", name, node, "--"])
                .arg(&meshd)
                .args(["encrypt", "status"]))?;
        }
        eprintln!(
            "\nxtask lab: `wg show` inside node-1 (the userspace device answers the WireGuard UAPI):"
        );
        sh(Command::new(crate::lab_bin(&meshd))
            .args(["exec", "--name", name, "node-1", "--", "wg", "show"]))?;
        eprintln!("\nxtask lab: what crosses the underlay while pods talk across nodes:");
        sh(Command::new(crate::lab_bin(&meshd)).args(["capture", "--name", name]))?;
        Ok(())
    })();
    if keep {
        eprintln!(
            "\nxtask lab: left up (--keep). Try:\n  {} status --name {name}\n  kubectl --kubeconfig /run/meshd-lab/{name}/admin.kubeconfig get ciliumnodes -o wide\n  {} down --name {name}",
            lab_bin(&meshd).display(),
            lab_bin(&meshd).display()
        );
    } else {
        eprintln!("\nxtask lab: tearing down (use --keep to leave it up)");
        sh(Command::new(crate::lab_bin(&meshd)).args(["down", "--name", name]))?;
    }
    result
}

/// What the tests need that `setup` cannot give: a test that could not run is a failure, so
/// say up front what is missing instead of failing test by test.
fn preflight() -> Result<()> {
    let mut missing = Vec::new();
    for tool in [
        "kubectl",
        "bpftool",
        "wireguard-go",
        "wg",
        "tcpdump",
        "iperf3",
        "python3",
        "qemu-system-x86_64",
    ] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}`"));
        }
    }
    if !std::path::Path::new("/sys/fs/bpf").exists() {
        missing.push("bpffs at /sys/fs/bpf".into());
    }
    if !missing.is_empty() {
        bail!(
            "the tests cannot all run here; missing: {} (no test is skipped, so this would fail)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    if !nix_is_root() {
        bail!(
            "the tests need root (the lab and datapath tests build network namespaces, mounts and \
             eBPF programs, and setup installs packages): run `cargo xtask test` as root; no test \
             is skipped, so without root they would fail"
        );
    }
    setup()?;
    preflight()?;
    // The end-to-end tests drive the built binaries (meshd, meshd-lab).
    build()?;
    eprintln!("xtask test: running every test of the workspace (lab tests need root)");
    sh(cargo().args(["test", "--workspace"]).args(args))?;
    eprintln!("xtask test: the kernel-backend tests, inside VMs running Debian's kernels");
    vm::vm_test(&[])
}

/// The path of an integration-test binary, built (not run) by cargo.
pub(crate) fn test_binary(package: &str, test: &str) -> Result<std::path::PathBuf> {
    let out = cargo()
        .args([
            "test",
            "-p",
            package,
            "--test",
            test,
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the {test} tests failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["name"] == test
            && v["profile"]["test"] == true
            && let Some(exe) = v["executable"].as_str()
        {
            return Ok(exe.into());
        }
    }
    bail!("cargo did not report the {test} test binary")
}

fn bench(args: &[String]) -> Result<()> {
    let flag = |name: &str, default: u32| -> u32 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let what = args.first().map(String::as_str);
    if !matches!(what, Some("wg" | "datapath" | "nodes")) {
        bail!(
            "usage: cargo xtask bench wg [--seconds N] [--baseline GIT-REV] | bench datapath [--seconds N] [--rounds N] | bench nodes"
        );
    }
    setup()?;
    eprintln!("xtask bench: building meshd (release)");
    sh(cargo().args(["build", "--release", "-p", "meshd", "-p", "lab"]))?;
    let meshd = meshd_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("release").join("meshd"))
        .context("target dir")?;
    if what == Some("nodes") {
        return bench_nodes::run(&meshd);
    }
    if what == Some("datapath") {
        return bench_datapath::run(&meshd, flag("--seconds", 5), flag("--rounds", 8));
    }
    let baseline = args
        .iter()
        .position(|a| a == "--baseline")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str);
    bench_wg::run(&meshd, flag("--seconds", 10), baseline)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("lab") => lab(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("vm-test") => vm::vm_test(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <setup | lab [--keep] | test [cargo test args] | vm-test [test filter] | bench wg|datapath|nodes [--seconds N] | fuzz [--seconds N] [target…]>"
            );
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
