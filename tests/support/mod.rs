//! What every end-to-end test shares: the binaries under test, a [`Lab`] torn down on drop
//! (its logs kept when the test failed), waits scaled for emulation, traffic helpers (servers,
//! probes, pings, TCP and UDP from pods), and the requirements a test states (root, tools)
//! that fail the test, naming what is missing, rather than skip it.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The directory holding the workspace's binaries: this test binary lives in
/// `target/<profile>/deps/`, the binaries one level up.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test binary");
    let deps = exe.parent().expect("the test binary's directory");
    deps.parent().unwrap_or(deps).to_path_buf()
}

fn binary(name: &str) -> &'static str {
    static PATHS: OnceLock<std::sync::Mutex<BTreeMap<String, &'static str>>> = OnceLock::new();
    let mut paths = PATHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    paths.entry(name.to_string()).or_insert_with(|| {
        let env = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
        let path = std::env::var(&env)
            .map(PathBuf::from)
            .unwrap_or_else(|_| bin_dir().join(name));
        assert!(
            path.is_file(),
            "the end-to-end tests need the {name} binary at {} (run them with `cargo xtask test`, \
             which builds it, or `cargo build --workspace --bins` first, or set {env})",
            path.display()
        );
        Box::leak(path.display().to_string().into_boxed_str())
    })
}

/// The node binary `meshd`.
pub fn meshd_path() -> &'static str {
    binary("meshd")
}

/// The lab binary `meshd-lab`.
pub fn meshd_lab_path() -> &'static str {
    binary("meshd-lab")
}

/// Lab tests need root (network namespaces, mounts); without it the test fails and says so. A
/// test that could not run is never reported as a pass.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (it builds network namespaces and mounts): run `cargo xtask test` as root"
    );
}

/// A tool the test drives; missing, the test fails and names it.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs `{tool}`, which is not installed (`cargo xtask setup` installs it)"
    );
}

pub fn meshd(args: &[&str]) -> Output {
    Command::new(meshd_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running meshd")
}

/// `meshd-lab ARGS`.
pub fn meshd_lab(args: &[&str]) -> Output {
    Command::new(meshd_lab_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running meshd-lab")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `meshd ARGS`, which must succeed; its output.
pub fn ok(args: &[&str]) -> String {
    let out = meshd(args);
    let text = output_text(&out);
    assert!(out.status.success(), "meshd {args:?} failed:\n{text}");
    text
}

/// `meshd-lab ARGS`, which must succeed; its output.
pub fn lab_ok(args: &[&str]) -> String {
    let out = meshd_lab(args);
    let text = output_text(&out);
    assert!(out.status.success(), "meshd-lab {args:?} failed:\n{text}");
    text
}

/// Tears the lab down even when the test fails.
pub struct Lab(pub String);

impl Lab {
    pub fn up(name: &str, nodes: u8, pods: u8, encryption: &str) -> Self {
        require_root();
        require_tool("kubectl");
        let _ = meshd_lab(&["down", "--name", name]);
        lab_ok(&[
            "up",
            "--name",
            name,
            "--nodes",
            &nodes.to_string(),
            "--pods-per-node",
            &pods.to_string(),
            "--encryption",
            encryption,
        ]);
        Self(name.to_string())
    }

    /// Adds pod `name` with one label on `node`.
    pub fn pod(&self, node: &str, label: &str, name: &str) {
        lab_ok(&[
            "pod", "add", "--name", &self.0, "--node", node, "--label", label, name,
        ]);
    }

    pub fn exec(&self, target: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", "--name", &self.0, target, "--"];
        args.extend_from_slice(cmd);
        meshd_lab(&args)
    }

    pub fn dir(&self) -> String {
        format!("/run/meshd-lab/{}", self.0)
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(format!("{}/admin.kubeconfig", self.dir()))
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn routes(&self, node: &str) -> String {
        String::from_utf8_lossy(
            &self
                .exec(node, &["ip", "route", "show", "proto", "193"])
                .stdout,
        )
        .into_owned()
    }

    pub fn agent_pid(&self, node: &str) -> i32 {
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{}/lab.json", self.dir())).unwrap(),
        )
        .unwrap();
        state["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .unwrap()["agent_pid"]
            .as_i64()
            .unwrap() as i32
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the logs of a failed test for the post-mortem.
            let keep = format!(
                "{}/{}",
                std::env::var("MESHD_LAB_LOGS").unwrap_or_else(|_| format!(
                    "{}/tmp/lab-logs",
                    bin_dir().parent().unwrap_or(&bin_dir()).display()
                )),
                self.0
            );
            let _ = std::fs::remove_dir_all(&keep);
            let _ = Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "mkdir -p {keep} && cd {} && find . -name '*.log' -exec cp --parents {{}} {keep} \\;",
                        self.dir()
                    ),
                ])
                .status();
            eprintln!("lab logs kept in {keep}");
        }
        let _ = meshd_lab(&["down", "--name", &self.0]);
    }
}

/// Polls `f` until it holds; the deadline is stretched under emulation (see [`scaled`]).
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Nothing of the lab remains: namespaces, processes, mounts, state.
pub fn assert_gone(name: &str) {
    let dir = format!("/run/meshd-lab/{name}");
    let netns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !netns.contains(&format!("meshd-{name}-")),
        "namespaces left: {netns}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir), "mounts left under {dir}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left");
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(
                !(cmd.contains(&dir) && cmd.contains("meshd")),
                "process left: {cmd}"
            );
        }
    }
}

pub fn wg_peers(lab: &Lab, node: &str) -> Vec<String> {
    let out = lab.exec(node, &["wg", "show", "cilium_wg0", "peers"]);
    assert!(
        out.status.success(),
        "wg show in {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

pub fn annotation(lab: &Lab, node: &str) -> String {
    lab.kubectl(&[
        "get",
        "cn",
        node,
        "-o",
        r"jsonpath={.metadata.annotations.network\.cilium\.io/wg-pub-key}",
    ])
}

pub fn pings(lab: &Lab, from: &str, to: &str, count: u32) -> bool {
    lab.exec(
        from,
        &["ping", "-c", &count.to_string(), "-i", "0.1", "-W", "1", to],
    )
    .status
    .success()
}

/// The backend the agents should pick here: kernel where the module loads.
pub fn expected_wg_backend() -> &'static str {
    let kernel = std::path::Path::new("/sys/module/wireguard").exists()
        || Command::new("modprobe")
            .arg("wireguard")
            .output()
            .is_ok_and(|o| o.status.success());
    let backend = if kernel { "kernel" } else { "userspace" };
    if let Ok(want) = std::env::var("MESHD_EXPECT_WG_BACKEND") {
        assert_eq!(
            backend, want,
            "this kernel does not offer the backend the test run expects"
        );
    }
    backend
}

/// Deadlines stretched by MESHD_TEST_TIME_SCALE (the kernel-VM runs under software emulation).
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

pub fn time_scale() -> u32 {
    std::env::var("MESHD_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

pub fn sh_in(lab: &Lab, target: &str, script: &str) -> String {
    let out = lab.exec(target, &["sh", "-c", script]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "in {target}: {script}\n{text}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// TCP servers that accept and close, and UDP echo servers, in a pod; stopped on drop.
pub struct Servers(std::process::Child);

impl Servers {
    pub fn start(lab: &Lab, pod: &str, tcp: &[u16], udp: &[u16]) -> Self {
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let script = format!(
            "import socket, threading\n\
def tcp(p):\n    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', p)); s.listen(16)\n    while True: s.accept()[0].close()\n\
def udp(p):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', p))\n    while True:\n        d, a = s.recvfrom(64); s.sendto(d, a)\n\
for p in ({},): threading.Thread(target=tcp, args=(p,), daemon=True).start()\n\
for p in ({}): threading.Thread(target=udp, args=(p,), daemon=True).start()\n\
threading.Event().wait()\n",
            list(tcp),
            if udp.is_empty() {
                "()".to_string()
            } else {
                format!("({},)", list(udp))
            },
        );
        Self(
            Command::new(meshd_lab_path())
                .args([
                    "exec", "--name", &lab.0, pod, "--", "python3", "-c", &script,
                ])
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// New TCP connections from `pod` to ip:port, one every 20 ms (200 ms timeout), each reported
/// as (wall-clock start in seconds, connected): continuous traffic, and the time a policy
/// change shows up in it.
pub struct Probe {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<(f64, bool)>,
    seen: Vec<(f64, bool)>,
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

impl Probe {
    pub fn start(lab: &Lab, pod: &str, ip: &str, port: u16, source: Option<&str>) -> Self {
        let source = source_address(source);
        let timeout = 0.2 * f64::from(time_scale());
        let script = format!(
            "import socket, time\n\
while True:\n    t = time.time()\n    try:\n        socket.create_connection(('{ip}', {port}), timeout={timeout}, source_address={source}).close(); ok = 1\n    except OSError:\n        ok = 0\n    print(f'{{t:.3f}} {{ok}}', flush=True)\n    time.sleep(0.02)\n"
        );
        let mut child = Command::new(meshd_lab_path())
            .args([
                "exec", "--name", &lab.0, pod, "--", "python3", "-c", &script,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                let mut w = line.split_whitespace();
                let (Some(t), Some(ok)) = (w.next(), w.next()) else {
                    continue;
                };
                if tx.send((t.parse().unwrap_or(0.0), ok == "1")).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            rx,
            seen: vec![],
        }
    }

    pub fn collect(&mut self) {
        self.seen.extend(self.rx.try_iter());
    }

    /// Attempts that started within [from, to].
    pub fn between(&mut self, from: f64, to: f64) -> Vec<bool> {
        self.collect();
        self.seen
            .iter()
            .filter(|(t, _)| (from..=to).contains(t))
            .map(|(_, ok)| *ok)
            .collect()
    }

    /// Seconds from `since` to the start of the first attempt after it with outcome `want`.
    pub fn first(&mut self, want: bool, since: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            self.collect();
            if let Some((t, _)) = self.seen.iter().find(|(t, ok)| *t >= since && *ok == want) {
                return t - since;
            }
            assert!(
                Instant::now() < deadline,
                "no attempt {} within {timeout:?}",
                if want { "connected" } else { "was refused" }
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies (or deletes) a policy file and asserts that `probe` sees the effect within a
/// second of the API server accepting the change.
pub fn within_a_second(
    lab: &Lab,
    verb: &str,
    file: &str,
    probe: &mut Probe,
    want: bool,
    what: &str,
) {
    lab.kubectl(&[verb, "-f", file]);
    let since = now();
    let took = probe.first(want, since, scaled(Duration::from_secs(5)));
    eprintln!("{what}: took effect in {:.0} ms", took * 1000.0);
    assert!(
        took < scaled(Duration::from_secs(1)).as_secs_f64(),
        "{what}: took {took:.3} s, more than a second"
    );
}

pub fn tcp_connects(lab: &Lab, from: &str, ip: &str, port: u16) -> bool {
    tcp_connects_from(lab, from, None, ip, port)
}

pub fn client_id_for_dump(lab: &Lab) -> String {
    lab.kubectl(&[
        "get",
        "cep",
        "client-1",
        "-o",
        "jsonpath={.status.identity.id}",
    ])
}

pub fn udp_echoes(lab: &Lab, from: &str, ip: &str, port: u16) -> bool {
    let script = format!(
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); s.sendto(b'hi', ('{ip}', {port})); assert s.recv(16) == b'hi'"
    );
    lab.exec(from, &["python3", "-c", &script]).status.success()
}

/// Python's `source_address` argument for an optional local address.
pub fn source_address(source: Option<&str>) -> String {
    source.map_or("None".to_string(), |s| format!("('{s}', 0)"))
}

/// A TCP connection from `from` (from the address `source`, if given) to ip:port.
pub fn tcp_connects_from(lab: &Lab, from: &str, source: Option<&str>, ip: &str, port: u16) -> bool {
    let source = source_address(source);
    let script = format!(
        "import socket; socket.create_connection(('{ip}', {port}), timeout={}, source_address={source}).close()",
        time_scale()
    );
    lab.exec(from, &["python3", "-c", &script]).status.success()
}

/// Whether the running kernel has TCX (Linux 6.6), which the datapath then attaches with.
pub fn kernel_has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

/// The cls_bpf filters on `dev` (`ingress` or `egress`) inside `node`, one line each.
pub fn cls_bpf_filters(lab: &Lab, node: &str, dev: &str, dir: &str) -> Vec<String> {
    let out = lab.exec(node, &["tc", "filter", "show", "dev", dev, dir]);
    assert!(
        out.status.success(),
        "tc filter show in {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains("handle"))
        .map(str::to_string)
        .collect()
}
