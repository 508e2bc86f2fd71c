//! `cargo xtask vm-test`: the lab tests that need kernel features this machine lacks, on
//! Debian's kernels under QEMU (software emulation): 6.12 (kernel WireGuard, TCX) and Debian 12's
//! own 6.1 (kernel WireGuard, no TCX: the datapath's clsact/cls_bpf filters). The VM's root is
//! this machine's / shared read-only over virtio-fs; 6.1 has virtio-fs as a module, so it boots
//! a small initramfs of ours that loads it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{build, meshd_bin, setup, test_binary};

/// A kernel the VM tests run on.
pub struct Kernel {
    pub name: &'static str,
    pub vmlinuz: PathBuf,
    pub initrd: Option<PathBuf>,
}

/// The newest /boot/vmlinuz-<version> whose version starts with `prefix` and, for `rt`,
/// ends with -rt-amd64 (else plain -amd64).
fn find_kernel(prefix: &str, rt: bool) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.starts_with(&format!("vmlinuz-{prefix}"))
                && n.ends_with("-amd64")
                && n.ends_with("-rt-amd64") == rt
        })
        .collect();
    found.sort();
    found.pop().with_context(|| {
        format!("no /boot/vmlinuz-{prefix}* kernel; `cargo xtask setup` installs it")
    })
}

fn version_of(vmlinuz: &Path) -> String {
    vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default()
}

/// The kernels of the matrix.
pub fn kernels() -> Result<Vec<Kernel>> {
    let k612 = find_kernel("6.12.", true)?;
    let k61 = find_kernel("6.1.", false)?;
    let initrd = initramfs(&version_of(&k61))?;
    Ok(vec![
        Kernel {
            name: "6.12",
            vmlinuz: k612,
            initrd: None,
        },
        Kernel {
            name: "6.1",
            vmlinuz: k61,
            initrd: Some(initrd),
        },
    ])
}

/// An initramfs that loads virtio-fs (and the console) for kernel `version`, mounts this
/// machine's / from it and hands over to the `init=` of the command line: busybox and the
/// modules, nothing else. Built once per kernel version under target/.
fn initramfs(version: &str) -> Result<PathBuf> {
    let target = meshd_bin()
        .parent()
        .and_then(|p| p.parent())
        .context("target dir")?
        .to_path_buf();
    let out = target.join(format!("vm-initramfs-{version}.cpio"));
    if out.exists() {
        return Ok(out);
    }
    let dir = target.join(format!("vm-initramfs-{version}"));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["bin", "proc", "sys", "dev", "newroot", "modules"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("busybox (cargo xtask setup)")?;
    // busybox's shared libraries, at the paths its loader expects.
    let ldd = Command::new("ldd").arg("/bin/busybox").output()?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dst = dir.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().context("library dir")?)?;
        std::fs::copy(lib, &dst).with_context(|| format!("copying {lib}"))?;
    }
    // The modules in load order, dependencies first.
    let mut order = Vec::new();
    for m in ["virtio_pci", "virtiofs", "virtio_console"] {
        let deps = Command::new("modprobe")
            .args(["--show-depends", "-S", version, m])
            .output()?;
        if !deps.status.success() {
            bail!(
                "modprobe --show-depends {m} for {version}: {}",
                String::from_utf8_lossy(&deps.stderr)
            );
        }
        for line in String::from_utf8_lossy(&deps.stdout).lines() {
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = path
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if !order.contains(&path) {
                    order.push(path);
                }
            }
        }
    }
    let mut loads = String::new();
    for (i, m) in order.iter().enumerate() {
        let name = format!(
            "{i:02}-{}",
            Path::new(m)
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        std::fs::copy(m, dir.join("modules").join(&name))
            .with_context(|| format!("copying {m}"))?;
        loads.push_str(&format!("insmod /modules/{name}\n"));
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         {loads}\
         mount -t virtiofs -o ro hostroot /newroot || {{ echo 'initramfs: no virtio-fs root'; poweroff -f; }}\n\
         real=$(sed -n 's/.*init=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
         umount /proc /sys; umount /dev\n\
         exec switch_root /newroot \"$real\"\n"
    );
    let init_path = dir.join("init");
    std::fs::write(&init_path, init)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755))?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio --quiet -o -H newc > {}.tmp && mv {}.tmp {}",
            dir.display(),
            out.display(),
            out.display(),
            out.display()
        ))
        .status()?;
    if !status.success() {
        bail!("building the initramfs for {version} failed");
    }
    Ok(out)
}

/// Boots Debian's kernel under QEMU (software emulation) with this machine's / as a read-only
/// virtiofs root and a writable 9p scratch folder, runs `script` as root, streams its output,
/// and returns its exit code.
fn run_vm(kernel: &Kernel, script: &str) -> Result<i32> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    let init = root.join("vm").join("guest-init.sh");
    let target = meshd_bin()
        .parent()
        .and_then(|p| p.parent())
        .context("target dir")?
        .to_path_buf();
    let scratch = target.join(format!("vm-{}-{}", kernel.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    std::fs::write(scratch.join("cmd.sh"), script)?;
    let sock = scratch.join("vfsd.sock");
    let mut vfsd = Command::new("/usr/lib/qemu/virtiofsd")
        .arg(format!("--socket-path={}", sock.display()))
        .args([
            "-o",
            "source=/",
            "-o",
            "cache=always",
            "-o",
            "sandbox=chroot",
            "-o",
            "log_level=warn",
        ])
        .stdout(std::fs::File::create(scratch.join("virtiofsd.log"))?)
        .stderr(std::fs::File::create(scratch.join("virtiofsd.err"))?)
        .spawn()
        .context("starting virtiofsd (qemu-system-common)")?;
    for _ in 0..50 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let append = format!(
        "console=ttyS0 rootfstype=virtiofs root=hostroot ro init={} panic=-1 oops=panic loglevel=4 KLAB_SCRATCH={} KLAB_CMD={}/cmd.sh KLAB_CWD={}",
        init.display(),
        scratch.display(),
        scratch.display(),
        root.parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    );
    let status = Command::new("timeout")
        .arg(std::env::var("MESHD_VM_TIMEOUT").unwrap_or_else(|_| "1200".into()))
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2G",
        ])
        .args([
            "-machine",
            "q35",
            "-bios",
            "qboot.rom",
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
        ])
        .args([
            "-serial",
            &format!("file:{}", scratch.join("console.log").display()),
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=2G,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .args([
            "-chardev",
            &format!("socket,id=vfs,path={}", sock.display()),
        ])
        .args(["-device", "vhost-user-fs-pci,chardev=vfs,tag=hostroot"])
        .args([
            "-virtfs",
            &format!(
                "local,path={},mount_tag=scratch,security_model=none,id=scratch",
                scratch.display()
            ),
        ])
        .args([
            "-device",
            "virtio-serial-pci",
            "-chardev",
            "stdio,id=out,signal=off",
            "-device",
            "virtconsole,chardev=out",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .args(
            kernel
                .initrd
                .iter()
                .flat_map(|i| [std::ffi::OsStr::new("-initrd"), i.as_os_str()]),
        )
        .args(["-append", &append])
        .stdin(std::process::Stdio::null())
        .status()
        .context("starting qemu-system-x86_64")?;
    let _ = vfsd.kill();
    let _ = vfsd.wait();
    let rc = std::fs::read_to_string(scratch.join("exit_code"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match rc {
        Some(0) => {
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(0)
        }
        Some(rc) => {
            eprintln!(
                "xtask vm-test: the VM's output and kept lab logs are in {}",
                scratch.display()
            );
            Ok(rc)
        }
        None => bail!(
            "the VM gave no result (qemu: {status}); see {}",
            scratch.join("console.log").display()
        ),
    }
}

/// `cargo xtask vm-test [--kernel 6.1|6.12] [filter…]`: lab tests on Debian's kernels, where
/// the kernel WireGuard backend is selected: by default the WireGuard tests (interop with
/// wireguard-go included) and the eBPF policy tests (over kernel WireGuard there), on 6.12 (TCX)
/// and on Debian 12's 6.1 (clsact/cls_bpf filters).
pub fn vm_test(args: &[String]) -> Result<()> {
    setup()?;
    build()?;
    let mut only = None;
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--kernel" {
            only = Some(it.next().context("--kernel needs 6.1 or 6.12")?.clone());
        } else {
            filters.push(a.clone());
        }
    }
    // The VM sees this machine's / read-only: mount points the lab needs must exist here.
    std::fs::create_dir_all("/var/lib/meshd")?;
    // The end-to-end test binaries and the tests of each that need a kernel backend.
    let suites: [(&str, &[&str]); 2] = [("wireguard", &[]), ("policy", &["policy", "cidr"])];
    let mut script = String::from(
        "export CI=true MESHD_EXPECT_WG_BACKEND=kernel MESHD_TEST_TIME_SCALE=5 RUST_BACKTRACE=1 MESHD_LAB_LOGS=\"$KLAB_SCRATCH/lab-logs\"\nmodprobe wireguard || exit 90\nmodprobe tun || exit 91\necho \"vm: kernel $(uname -r)\"\n",
    );
    for (suite, default_filters) in suites {
        let bin = test_binary("meshd-e2e", suite)?;
        let f: Vec<&str> = if filters.is_empty() {
            default_filters.to_vec()
        } else {
            filters.iter().map(String::as_str).collect()
        };
        script.push_str(&format!(
            "{} {} --test-threads=1 --nocapture || exit $?\n",
            bin.display(),
            f.join(" ")
        ));
    }
    let mut failed = Vec::new();
    for kernel in kernels()? {
        if only.as_deref().is_some_and(|k| k != kernel.name) {
            continue;
        }
        eprintln!(
            "xtask vm-test: booting {} under QEMU (software emulation) to run the lab tests",
            kernel.vmlinuz.display()
        );
        let rc = run_vm(&kernel, &script)?;
        if rc != 0 {
            eprintln!(
                "xtask vm-test: the tests on {} failed (exit {rc})",
                kernel.name
            );
            failed.push(kernel.name);
        }
    }
    if !failed.is_empty() {
        bail!("the kernel-VM tests failed on {}", failed.join(", "));
    }
    Ok(())
}
