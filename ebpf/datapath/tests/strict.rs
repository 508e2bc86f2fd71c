//! Encryption strict mode in a real kernel: a pod namespace, a node namespace with an
//! "encryption device" (a veth into a sink namespace) and an uplink veth to a wire namespace that receives
//! whatever would have left the node in the clear. The program asks the kernel's FIB where each
//! packet goes; the test moves routes and watches the wire. Needs root; without it the test
//! fails and says so.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use datapath::*;

struct Env {
    pod: String,
    node: String,
    wire: String,
    sink: String,
    bpffs: std::path::PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.node, &self.wire, &self.sink] {
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

fn ip(ns: &str, args: &str) {
    let mut v = vec!["ip", "-n", ns];
    v.extend(args.split_whitespace());
    sh(&v);
}

/// Sends `n` UDP datagrams from the pod to `dst` while the wire namespace listens on it;
/// returns how many arrived there (that is: left the node in the clear).
fn leaked(env: &Env, dst: &str, n: usize) -> usize {
    let family = if dst.contains(':') {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let recv = format!(
        "import socket\ns = socket.socket(socket.{family}, socket.SOCK_DGRAM); s.bind(('{dst}', 9)); s.settimeout(1.5)\nprint('ready', flush=True)\nn = 0\ntry:\n    while True: s.recv(64); n += 1\nexcept OSError: pass\nprint(n)\n"
    );
    let mut r = Command::new("ip")
        .args(["netns", "exec", &env.wire, "python3", "-c", &recv])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(r.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let send = format!(
        "import socket, time\ns = socket.socket(socket.{family}, socket.SOCK_DGRAM)\nfor i in range({n}):\n    try: s.sendto(b'x', ('{dst}', 9))\n    except OSError: pass\n    time.sleep(0.01)\n"
    );
    sh(&["ip", "netns", "exec", &env.pod, "python3", "-c", &send]);
    let count = lines.next().unwrap().unwrap().parse().unwrap();
    r.wait().unwrap();
    count
}

fn unencrypted_drops(env: &Env) -> u64 {
    read_drop_counts(&env.bpffs)
        .unwrap()
        .iter()
        .filter(|d| d.reason == REASON_UNENCRYPTED && d.egress)
        .map(|d| d.count)
        .sum()
}

fn ifindex(ns: &str, dev: &str) -> u32 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            &format!("/sys/class/net/{dev}/ifindex"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn strict_mode_lets_nothing_leave_in_the_clear() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the strict-mode test needs root (it loads eBPF programs into network namespaces): run it as root"
    );
    let id = std::process::id();
    let env = Env {
        pod: format!("meshd-st{id}-pod"),
        node: format!("meshd-st{id}-node"),
        wire: format!("meshd-st{id}-wire"),
        sink: format!("meshd-st{id}-sink"),
        bpffs: std::path::PathBuf::from(format!("/run/meshd-st{id}-bpf")),
    };
    std::fs::create_dir_all(&env.bpffs).unwrap();
    sh(&["mount", "-t", "bpf", "bpf", env.bpffs.to_str().unwrap()]);
    for ns in [&env.pod, &env.node, &env.wire, &env.sink] {
        sh(&["ip", "netns", "add", ns]);
        ip(ns, "link set lo up");
    }
    ip(
        &env.node,
        &format!(
            "link add lxctest type veth peer name eth0 netns {}",
            env.pod
        ),
    );
    ip(
        &env.node,
        &format!(
            "link add uplink type veth peer name eth0 netns {}",
            env.wire
        ),
    );
    // The "encryption device": a veth into a namespace that swallows what it gets.
    ip(
        &env.node,
        &format!("link add enc0 type veth peer name eth0 netns {}", env.sink),
    );
    for (ns, dev) in [
        (&env.node, "lxctest"),
        (&env.node, "uplink"),
        (&env.node, "enc0"),
        (&env.pod, "eth0"),
        (&env.wire, "eth0"),
    ] {
        ip(ns, &format!("link set {dev} up"));
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        &env.node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    ip(&env.node, "addr add 198.18.200.1/24 dev lxctest");
    ip(&env.pod, "addr add 198.18.200.2/24 dev eth0");
    ip(&env.pod, "route add default via 198.18.200.1");
    ip(&env.node, "addr add 198.18.201.1/24 dev uplink");
    ip(&env.wire, "addr add 198.18.201.2/24 dev eth0");
    // The wire answers for the remote pod addresses, so a leak is received and counted.
    ip(&env.wire, "addr add 198.18.210.5/32 dev eth0");
    ip(&env.wire, "addr add 198.18.211.7/32 dev eth0");
    ip(&env.wire, "route add default via 198.18.201.1");
    ip(&env.node, "route add default via 198.18.201.2");
    ip(&env.node, "route add 198.18.210.0/24 dev enc0");
    for (ns, dev, addr) in [
        (&env.node, "lxctest", "fd00:200::1/64"),
        (&env.pod, "eth0", "fd00:200::2/64"),
        (&env.node, "uplink", "fd00:201::1/64"),
        (&env.wire, "eth0", "fd00:201::2/64"),
        (&env.wire, "eth0", "fd00:210::5/128"),
    ] {
        ip(ns, &format!("-6 addr add {addr} dev {dev} nodad"));
    }
    ip(&env.pod, "-6 route add default via fd00:200::1");
    ip(&env.wire, "-6 route add default via fd00:201::1");
    ip(&env.node, "-6 route add default via fd00:201::2");
    ip(&env.node, "-6 route add fd00:210::/64 dev enc0");

    // Negative control first: with nothing attached, the wire sees what leaves in the clear.
    assert_eq!(leaked(&env, "198.18.210.5", 5), 0, "routed into the device");
    ip(&env.node, "route del 198.18.210.0/24 dev enc0");
    assert_eq!(
        leaked(&env, "198.18.210.5", 5),
        5,
        "the test sees a leak when there is one"
    );
    ip(&env.node, "route add 198.18.210.0/24 dev enc0");

    let f = std::fs::File::open(format!("/run/netns/{}", env.node)).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let mut strict = StrictMode::open(&env.bpffs).unwrap();
    let lxc = ifindex(&env.node, "lxctest");
    let enc = ifindex(&env.node, "enc0");
    let want = |enabled: bool, allow_remote_node: bool| StrictWant {
        config: StrictConfig {
            enabled: enabled as u8,
            allow_remote_node: allow_remote_node as u8,
            pad: 0,
            encrypt_ifindex: enc,
        },
        v4: BTreeSet::from([([198, 18, 208, 0], 20)]),
        v6: BTreeSet::from([(
            [0xfd, 0, 0x02, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            32,
        )]),
        local_ifs: BTreeSet::from([lxc]),
    };
    assert!(strict.sync(&want(true, false)).unwrap());
    assert!(
        !strict.sync(&want(true, false)).unwrap(),
        "a second pass writes nothing"
    );
    let _dp = EndpointDatapath::attach(
        "lxctest",
        &env.bpffs,
        EndpointConfig {
            local_identity: 300,
            ..EndpointConfig::default()
        },
        AttachMode::for_running_kernel().unwrap(),
    )
    .unwrap();

    // Into the encryption device: passes; to the node itself and outside the strict range too.
    assert_eq!(unencrypted_drops(&env), 0);
    assert_eq!(leaked(&env, "198.18.210.5", 5), 0);
    assert_eq!(
        unencrypted_drops(&env),
        0,
        "routed into the device: not dropped"
    );
    assert_eq!(
        leaked(&env, "198.18.201.2", 5),
        5,
        "outside the strict range: unaffected"
    );
    sh(&[
        "ip",
        "netns",
        "exec",
        &env.pod,
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        "198.18.200.1",
    ]);

    // The device's route gone (the device died): the default route would carry it. Dropped.
    ip(&env.node, "route del 198.18.210.0/24 dev enc0");
    assert_eq!(
        leaked(&env, "198.18.210.5", 20),
        0,
        "no cleartext with the route gone"
    );
    assert_eq!(
        unencrypted_drops(&env),
        20,
        "each one counted as reason 195"
    );
    // An unreachable route: refused by the kernel anyway, counted by the datapath.
    ip(
        &env.node,
        "route add unreachable 198.18.210.0/24 metric 1000000",
    );
    assert_eq!(leaked(&env, "198.18.210.5", 5), 0);
    assert_eq!(unencrypted_drops(&env), 25);

    // allow-remote-node-identities: a remote node's address may be reached unencrypted.
    let mut ipcache = Ipcache::open(&env.bpffs).unwrap();
    ipcache
        .sync(&std::collections::BTreeMap::from([(
            ([198, 18, 211, 7], 32),
            IpcacheValue {
                identity: 6,
                node_id: 1,
                pad: 0,
            },
        )]))
        .unwrap();
    assert_eq!(
        leaked(&env, "198.18.211.7", 5),
        0,
        "a remote node in the strict range: dropped"
    );
    strict.sync(&want(true, true)).unwrap();
    assert_eq!(
        leaked(&env, "198.18.211.7", 5),
        5,
        "allowed as a remote-node identity"
    );
    assert_eq!(
        leaked(&env, "198.18.210.5", 5),
        0,
        "a pod address still is not"
    );

    // IPv6 the same way.
    assert_eq!(leaked(&env, "fd00:210::5", 5), 0, "IPv6 into the device");
    let before = unencrypted_drops(&env);
    ip(&env.node, "-6 route del fd00:210::/64 dev enc0");
    assert_eq!(
        leaked(&env, "fd00:210::5", 10),
        0,
        "no IPv6 cleartext with the route gone"
    );
    assert_eq!(unencrypted_drops(&env), before + 10);

    // Strict mode off: the same packet leaks (the drops above were the program's).
    strict.sync(&want(false, false)).unwrap();
    assert_eq!(leaked(&env, "fd00:210::5", 3), 3);
    ip(
        &env.node,
        "route del unreachable 198.18.210.0/24 metric 1000000",
    );
    assert_eq!(leaked(&env, "198.18.210.5", 3), 3);
}
