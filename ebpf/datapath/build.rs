//! Builds the eBPF programs (nightly, -Z build-std=core, bpf-linker) and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs the toolchain.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../programs");
    let root = root.to_str().ok_or("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "meshd-ebpf-programs",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    Ok(())
}
