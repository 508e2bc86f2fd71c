//! The programs in a real kernel: a pod namespace and a node namespace joined by a veth, the
//! programs on the node side, real TCP connections. Needs root; without it the test
//! fails and says so.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use datapath::*;

struct Netns {
    pod: String,
    node: String,
    bpffs: std::path::PathBuf,
    server: Option<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir(&self.bpffs);
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn connects(node_ns: &str, port: u16) -> bool {
    let script = format!(
        "import socket; socket.create_connection(('198.18.200.2', {port}), timeout=1).close()"
    );
    Command::new("ip")
        .args(["netns", "exec", node_ns, "python3", "-c", &script])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Connects to the echo port and then, every 100 ms, sends a byte and reports whether it came
/// back within 300 ms.
fn chat_script(port: u16) -> String {
    format!(
        "import socket, time\n\
s = socket.create_connection(('198.18.200.2', {port}), timeout=1); print('connected', flush=True)\n\
while True:\n    ok = False\n    try:\n        s.sendall(b'x'); end = time.time() + 0.3\n        while time.time() < end:\n            s.settimeout(max(end - time.time(), 0.01))\n            if b'x' in s.recv(64):\n                ok = True; break\n    except OSError:\n        pass\n    print('echo' if ok else 'timeout', flush=True); time.sleep(0.1)\n"
    )
}

/// A client on `port` that sends a byte every 100 ms and reports whether its echo came back
/// within 300 ms (one line each: `echo` or `timeout`, after `connected`).
struct Chat {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Chat {
    fn start(node_ns: &str, port: u16) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                node_ns,
                "python3",
                "-c",
                &chat_script(port),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        Self { child, lines }
    }

    fn next(&mut self) -> String {
        self.lines.next().unwrap().unwrap()
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain(events: &mut Events) -> Vec<Event> {
    std::thread::sleep(Duration::from_millis(100));
    std::iter::from_fn(|| events.next_event()).collect()
}

fn key(identity: u32, egress: bool, port: u16) -> (u32, PolicyKey, PolicyValue) {
    (
        64,
        PolicyKey {
            identity,
            egress: egress as u8,
            proto: 6,
            dport: port.to_be(),
        },
        PolicyValue::default(),
    )
}

/// `tc filter show dev lxctest <dir>` in the node namespace: one line per filter (the lines
/// with a handle; `tc` prints a header line per priority too).
fn filters(env: &Netns, dir: &str) -> Vec<String> {
    let out = Command::new("tc")
        .args(["-n", &env.node, "filter", "show", "dev", "lxctest", dir])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("filter") && (l.contains("handle") || l.contains(" fh ")))
        .map(str::to_string)
        .collect()
}

/// With TCX (this kernel's default where it has it).
#[test]
fn policy_auth_and_conntrack_in_the_kernel_with_tcx() {
    policy_auth_and_conntrack(AttachMode::Tcx);
}

/// With the clsact qdisc and cls_bpf filters of kernels before 6.6 (Debian 12, Ubuntu 22.04,
/// RHEL 9), which every kernel still offers.
#[test]
fn policy_auth_and_conntrack_in_the_kernel_with_tc_filters() {
    policy_auth_and_conntrack(AttachMode::Netlink);
}

#[test]
fn kernels_below_the_minimum_are_refused_by_name() {
    use aya::util::KernelVersion;
    let e = AttachMode::for_kernel(KernelVersion::new(5, 4, 0)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the kernel is Linux 5.4.0; meshd's eBPF datapath needs Linux 5.8 (BPF ring buffers): \
         upgrade the kernel, or run the agent with enable-policy=never (no policy enforcement)"
    );
    assert_eq!(
        AttachMode::for_kernel(KernelVersion::new(5, 15, 0)).unwrap(),
        AttachMode::Netlink
    );
    assert_eq!(
        AttachMode::for_kernel(KernelVersion::new(6, 1, 0)).unwrap(),
        AttachMode::Netlink
    );
    assert_eq!(
        AttachMode::for_kernel(KernelVersion::new(6, 6, 0)).unwrap(),
        AttachMode::Tcx
    );
}

fn policy_auth_and_conntrack(mode: AttachMode) {
    // A test that could not run is never a pass.
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the datapath test needs root (it loads eBPF programs into network namespaces): run it as root"
    );
    let id = format!(
        "{}{}",
        std::process::id(),
        if mode == AttachMode::Tcx { "x" } else { "n" }
    );
    let mut env = Netns {
        pod: format!("meshd-dp{id}-pod"),
        node: format!("meshd-dp{id}-node"),
        bpffs: std::path::PathBuf::from(format!("/run/meshd-dp{id}-bpf")),
        server: None,
    };
    std::fs::create_dir_all(&env.bpffs).unwrap();
    sh(&["mount", "-t", "bpf", "bpf", env.bpffs.to_str().unwrap()]);
    sh(&["ip", "netns", "add", &env.pod]);
    sh(&["ip", "netns", "add", &env.node]);
    sh(&[
        "ip", "-n", &env.node, "link", "add", "lxctest", "type", "veth", "peer", "name", "eth0",
        "netns", &env.pod,
    ]);
    sh(&[
        "ip",
        "-n",
        &env.node,
        "addr",
        "add",
        "198.18.200.1/24",
        "dev",
        "lxctest",
    ]);
    sh(&[
        "ip",
        "-n",
        &env.pod,
        "addr",
        "add",
        "198.18.200.2/24",
        "dev",
        "eth0",
    ]);
    for (ns, dev) in [
        (&env.node, "lxctest"),
        (&env.pod, "eth0"),
        (&env.node, "lo"),
        (&env.pod, "lo"),
    ] {
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    let server = "import socket, threading, time\n\
def serve(p):\n    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', p)); s.listen(16)\n    while True: s.accept()[0].close()\n\
def echo(c):\n    while True:\n        d = c.recv(64)\n        if not d: break\n        c.sendall(d)\n\
def beat(c):\n    while True:\n        c.sendall(b'h'); time.sleep(0.05)\n\
def echoes(p, heartbeat):\n    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', p)); s.listen(16)\n    while True:\n        c = s.accept()[0]; threading.Thread(target=echo, args=(c,), daemon=True).start()\n        if heartbeat: threading.Thread(target=beat, args=(c,), daemon=True).start()\n\
for p in (8080, 8081): threading.Thread(target=serve, args=(p,), daemon=True).start()\n\
threading.Thread(target=echoes, args=(8082, False), daemon=True).start()\n\
threading.Thread(target=echoes, args=(8083, True), daemon=True).start()\n\
threading.Event().wait()\n";
    env.server = Some(
        Command::new("ip")
            .args(["netns", "exec", &env.pod, "python3", "-c", server])
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        connects(&env.node, 8080),
        "the servers answer before any program is attached"
    );
    // IPv6 (which the policy does not cover yet) works before enforcement.
    for (ns, addr) in [(&env.pod, "fd00:200::2/64"), (&env.node, "fd00:200::1/64")] {
        let dev = if ns == &env.pod { "eth0" } else { "lxctest" };
        sh(&[
            "ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad",
        ]);
    }
    let ping6 = |ns: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "ping",
                "-6",
                "-c",
                "1",
                "-W",
                "1",
                "fd00:200::2",
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(ping6(&env.node), "IPv6 answers before any program");

    // Attach from inside the node namespace (this thread only).
    let f = std::fs::File::open(format!("/run/netns/{}", env.node)).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let cfg = EndpointConfig {
        local_identity: 300,
        ingress_enforced: 1,
        egress_enforced: 1,
        pad: 0,
        policy_revision: 0,
    };
    // A conntrack map left pinned by an older build with another key layout is replaced,
    // not reused (the verifier would refuse the programs).
    sh(&[
        "bpftool",
        "map",
        "create",
        env.bpffs.join("MESHD_CT").to_str().unwrap(),
        "type",
        "lru_hash",
        "key",
        "16",
        "value",
        "8",
        "entries",
        "16",
        "name",
        "MESHD_CT",
    ]);
    if mode == AttachMode::Netlink {
        // Someone else's filter on the same hook stays where it is.
        sh(&[
            "tc", "-n", &env.node, "qdisc", "add", "dev", "lxctest", "clsact",
        ]);
        sh(&[
            "tc", "-n", &env.node, "filter", "add", "dev", "lxctest", "ingress", "pref", "7",
            "u32", "match", "u32", "0", "0",
        ]);
    }
    let mut dp = EndpointDatapath::attach("lxctest", &env.bpffs, cfg, mode).unwrap();
    assert_eq!(
        aya::maps::MapInfo::from_pin(env.bpffs.join("MESHD_CT"))
            .unwrap()
            .key_size() as usize,
        std::mem::size_of::<ebpf_common::CtKey>()
    );
    let mut events = dp.events().unwrap();
    dp.ipcache_upsert(
        [198, 18, 200, 1],
        32,
        IpcacheValue {
            identity: 400,
            node_id: 7,
            pad: 0,
        },
    )
    .unwrap();
    for name in ["MESHD_IPCACHE", "MESHD_AUTH", "MESHD_CT", "MESHD_EVENTS"] {
        assert!(env.bpffs.join(name).exists(), "{name} is pinned");
    }

    // Enforced with no entries: dropped, reason 133, identities in the event.
    assert!(
        !ping6(&env.node),
        "IPv6 is dropped where a direction is enforced, not let past the policy"
    );
    assert!(!connects(&env.node, 8080));
    let ev = drain(&mut events);
    let dropped = ev
        .iter()
        .find(|e| e.kind == EVENT_DROP)
        .expect("a drop event");
    assert_eq!(
        (
            dropped.reason,
            dropped.src_identity,
            dropped.dst_identity,
            dropped.dport,
            dropped.egress
        ),
        (REASON_POLICY_DENIED, 400, 300, 8080, 0)
    );

    // Allowed by identity and port; the replies leave through the egress side (enforced, no
    // entries) because conntrack remembers the flow.
    dp.set_policy(&[key(400, false, 8080)]).unwrap();
    assert!(connects(&env.node, 8080));
    assert!(!connects(&env.node, 8081), "another port stays closed");

    // Auth required: dropped with 189 and an AUTH_REQUIRED signal naming the pair, until an
    // auth entry with a future expiration exists; after it expires, dropped again.
    let mut auth_entry = key(400, false, 8081);
    auth_entry.2.auth_type = 1 | 0x80;
    dp.set_policy(&[key(400, false, 8080), auth_entry]).unwrap();
    drain(&mut events);
    assert!(!connects(&env.node, 8081));
    let ev = drain(&mut events);
    let sig = ev
        .iter()
        .find(|e| e.kind == EVENT_AUTH_REQUIRED)
        .expect("an AUTH_REQUIRED signal");
    assert_eq!((sig.reason, sig.signal_nr), (REASON_AUTH_REQUIRED, 2));
    assert_eq!(
        sig.auth,
        AuthKey {
            local_identity: 300,
            remote_identity: 400,
            remote_node_id: 7,
            auth_type: 1,
            pad: 0
        }
    );
    dp.auth_upsert(
        sig.auth,
        AuthValue {
            expiration: monotonic_seconds() + 60,
        },
    )
    .unwrap();
    assert!(connects(&env.node, 8081), "passes with a live auth entry");
    dp.auth_upsert(
        sig.auth,
        AuthValue {
            expiration: monotonic_seconds().saturating_sub(1),
        },
    )
    .unwrap();
    assert!(!connects(&env.node, 8081), "dropped again after expiry");

    // Deny wins over allow.
    let mut deny = key(0, false, 8080);
    deny.2.flags = POLICY_FLAG_DENY;
    let sync = dp.set_policy(&[key(400, false, 8080), deny]).unwrap();
    assert_eq!(
        (sync.entries, sync.added, sync.changed, sync.removed),
        (2, 1, 0, 1),
        "the auth entry went, the deny came, the 8080 entry stayed"
    );
    assert!(!connects(&env.node, 8080));
    let kernel = dp.policy().unwrap();
    assert_eq!(
        kernel.len(),
        2,
        "set_policy replaced the entries: {kernel:?}"
    );
    assert!(
        dp.set_policy(&[key(400, false, 8080), deny])
            .unwrap()
            .is_noop(),
        "nothing to change"
    );

    // An established connection: a policy change that still allows it keeps it going; one
    // that no longer allows it cuts it (conntrack entries carry the policy revision).
    let before = dp.config().policy_revision;
    dp.set_policy(&[key(400, false, 8082)]).unwrap();
    assert_eq!(
        dp.config().policy_revision,
        before + 1,
        "a change bumps the revision"
    );
    let mut chat = Chat::start(&env.node, 8082);
    assert_eq!(chat.next(), "connected");
    assert_eq!(chat.next(), "echo", "the connection works");
    dp.set_policy(&[key(400, false, 8082), key(400, false, 9999)])
        .unwrap();
    for _ in 0..3 {
        assert_eq!(chat.next(), "echo", "still allowed: the connection goes on");
    }
    dp.set_policy(&[key(400, false, 9999)]).unwrap();
    let after: Vec<String> = (0..6).map(|_| chat.next()).collect();
    drop(chat);
    assert!(
        after.iter().skip(1).all(|l| l == "timeout"),
        "no longer allowed: the established connection is cut: {after:?}"
    );

    // The same with the endpoint's egress unenforced and a server that keeps talking: its
    // packets after the cut must not found a flow through which the client's packets would
    // come back in as "replies".
    dp.set_config(EndpointConfig {
        egress_enforced: 0,
        ..cfg
    })
    .unwrap();
    dp.set_policy(&[key(400, false, 8083)]).unwrap();
    let mut chat = Chat::start(&env.node, 8083);
    assert_eq!(chat.next(), "connected");
    assert_eq!(chat.next(), "echo");
    dp.set_policy(&[key(400, false, 9999)]).unwrap();
    let after: Vec<String> = (0..8).map(|_| chat.next()).collect();
    drop(chat);
    assert!(
        after.iter().skip(1).all(|l| l == "timeout"),
        "cut, although the server kept sending: {after:?}"
    );
    dp.set_config(cfg).unwrap();

    // A restarted agent adopts the pinned map: it reads what the kernel holds once and only
    // writes the difference.
    let revision = dp.config().policy_revision;
    drop(dp);
    if mode == AttachMode::Netlink {
        // The agent is gone; its filters are not (enforcement goes on), and a restart, or a
        // retry after a failed attach, swaps the program in place: exactly meshd's one filter
        // per direction, whatever happened before.
        for dir in ["ingress", "egress"] {
            assert_eq!(
                filters(&env, dir)
                    .iter()
                    .filter(|l| l.contains(" bpf "))
                    .count(),
                1
            );
        }
        for _ in 0..3 {
            drop(EndpointDatapath::attach("lxctest", &env.bpffs, cfg, mode).unwrap());
        }
        let ingress = filters(&env, "ingress");
        let ours: Vec<&String> = ingress.iter().filter(|l| l.contains(" bpf ")).collect();
        assert_eq!(ours.len(), 1, "{ingress:?}");
        assert!(
            ours[0].contains("pref 1 ")
                && ours[0].contains("handle 0x1 ")
                && ours[0].contains("direct-action"),
            "{ingress:?}"
        );
        assert!(
            ingress.iter().any(|l| l.contains("pref 7 u32")),
            "the foreign filter is kept: {ingress:?}"
        );
        assert_eq!(filters(&env, "egress").len(), 1);
        assert!(
            !connects(&env.node, 8080),
            "enforcing with the swapped programs (only 9999 allowed)"
        );
    }
    let mut dp = EndpointDatapath::attach("lxctest", &env.bpffs, cfg, mode).unwrap();
    assert_eq!(
        dp.config().policy_revision,
        revision,
        "adopted unchanged: established flows stay valid"
    );
    let mut deny_9999 = key(400, false, 9999);
    deny_9999.2.flags = POLICY_FLAG_DENY;
    let sync = dp.set_policy(&[deny_9999, key(400, false, 8080)]).unwrap();
    assert_eq!((sync.added, sync.changed, sync.removed), (1, 1, 0));
    assert!(connects(&env.node, 8080));
    if mode == AttachMode::Netlink {
        assert!(!connects(&env.node, 8081), "8081 is not allowed");
        dp.remove();
        assert!(
            filters(&env, "ingress")
                .iter()
                .all(|l| !l.contains(" bpf "))
        );
        assert!(filters(&env, "egress").is_empty());
        assert!(
            connects(&env.node, 8081),
            "open again once meshd's filters are gone"
        );
    }
}
