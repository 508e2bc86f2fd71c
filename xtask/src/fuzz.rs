//! `cargo xtask fuzz [--seconds N] [TARGET…]`: runs the cargo-fuzz targets in `fuzz/` (nightly,
//! libFuzzer), each for N seconds (default 60), one after another, on the corpora in
//! `fuzz/corpus/<target>/` (which grow with what the fuzzer finds interesting and are replayed by
//! the ordinary tests). A crash stops the run with the reproducer's path.

use std::process::Command;

use anyhow::{Result, bail};

use crate::{cargo, sh, which};

pub const TARGETS: [&str; 5] = ["uapi", "cilium_node", "key_file", "offload", "datagram"];
/// cargo-fuzz, pinned.
const CARGO_FUZZ: &str = "0.13.1";

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = 60u32;
    let mut targets: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--seconds needs a number"))?
            }
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("unknown fuzz target {other:?}; the targets are {TARGETS:?}"),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(ToString::to_string).collect();
    }
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ));
    if !installed {
        eprintln!("xtask fuzz: installing cargo-fuzz {CARGO_FUZZ}");
        sh(cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ]))?;
    }
    if which("cargo-fuzz").is_none() && !installed {
        bail!("cargo-fuzz is not on PATH after installing it (is ~/.cargo/bin on PATH?)");
    }
    let fuzz_dir = root().join("fuzz");
    for t in &targets {
        eprintln!("xtask fuzz: {t} for {seconds} s (corpus fuzz/corpus/{t})");
        sh(Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", "--fuzz-dir", "."])
            .arg(t)
            .arg(format!("corpus/{t}"))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-max_len=65536",
                "-rss_limit_mb=4096",
            ]))?;
    }
    Ok(())
}
