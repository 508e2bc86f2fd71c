//! WireGuard between nodes: only WireGuard on the underlay, `wg show` agrees, restarts keep
//! sessions, bad keys cost only their node, wireguard-go interoperates, TCP streams arrive intact.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshd_e2e::*;

#[test]
fn wireguard_encrypts_survives_restarts_and_refuses_bad_keys() {
    require_root();
    let backend = expected_wg_backend();
    let lab = Lab::up("t-wg", 3, 2, "wireguard");
    let status = lab_ok(&["status", "--name", &lab.0]);
    assert!(status.contains("30 of 30 pod pairs reachable"), "{status}");

    // Only WireGuard crosses the underlay.
    let cap = lab_ok(&["capture", "--name", &lab.0]);
    assert!(cap.contains("pod addresses in the clear:      0"), "{cap}");

    // A UAPI client that connects and sends nothing does not hold `wg show` up; one that sends
    // an endless line is cut off.
    if backend == "userspace" {
        let script = r#"
import socket, subprocess, time
path = "/var/run/wireguard/cilium_wg0.sock"
silent = socket.socket(socket.AF_UNIX); silent.connect(path)
t = time.time(); subprocess.run(["wg", "show", "cilium_wg0"], check=True, capture_output=True)
print("wg show took %.2f s" % (time.time() - t))
flood = socket.socket(socket.AF_UNIX); flood.connect(path); flood.settimeout(10)
try:
    flood.sendall(b"set=1\n" + b"x" * 100000)
    print("answer:", flood.recv(64))
except OSError as e:
    print("closed:", e)
"#;
        let out = sh_in(&lab, "node-1", &format!("python3 -c '{script}'"));
        let took: f64 = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("wg show took ")?
                    .strip_suffix(" s")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{out}"));
        assert!(took < 2.0, "wg show waited behind a silent client: {out}");
        assert!(
            out.contains("answer: b'errno=22") || out.contains("closed:"),
            "an endless line was not refused: {out}"
        );
    }

    // `wg show` in each node agrees with the other nodes' CiliumNode annotations.
    let keys: Vec<(String, String)> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| (n.to_string(), annotation(&lab, n)))
        .collect();
    for (node, _) in &keys {
        let mut want: Vec<String> = keys
            .iter()
            .filter(|(n, _)| n != node)
            .map(|(_, k)| k.clone())
            .collect();
        want.sort();
        assert_eq!(wg_peers(&lab, node), want, "peers of {node}");
    }
    assert_eq!(
        lab.kubectl(&[
            "get",
            "cn",
            "node-1",
            "-o",
            "jsonpath={.spec.encryption.key}"
        ]),
        "255"
    );
    // MTU = underlay MTU - 80, fwmark 0x1e00, port 51871, as Cilium sets them.
    let link = String::from_utf8_lossy(
        &lab.exec("node-1", &["ip", "link", "show", "cilium_wg0"])
            .stdout,
    )
    .into_owned();
    assert!(link.contains("mtu 1420"), "{link}");
    let show = String::from_utf8_lossy(&lab.exec("node-1", &["wg", "show", "cilium_wg0"]).stdout)
        .into_owned();
    assert!(
        show.contains("fwmark: 0x1e00") && show.contains("listening port: 51871"),
        "{show}"
    );

    // Cilium's lines first.
    let st = String::from_utf8_lossy(
        &lab.exec("node-1", &[meshd_path(), "encrypt", "status"])
            .stdout,
    )
    .into_owned();
    let want = format!(
        "Encryption: Wireguard                 \nInterface: cilium_wg0\n\tPublic key: {}\n\tNumber of peers: 2\n",
        keys[0].1
    );
    assert!(st.starts_with(&want), "{st:?}");
    assert!(st.contains(&format!("Backend: {backend}")), "{st}");
    assert_eq!(
        st.matches("state:          up").count(),
        2,
        "both peers have shaken hands after the pings:\n{st}"
    );
    let line =
        String::from_utf8_lossy(&lab.exec("node-1", &[meshd_path(), "status"]).stdout).into_owned();
    assert!(line.contains(&format!("Encryption:\tWireguard\t[NodeEncryption: Disabled, cilium_wg0 (Pubkey: {}, Port: 51871, Peers: 2)]", keys[0].1)), "{line}");

    // Restarting the agent while a ping runs every 10 ms loses nothing (the userspace device is
    // its own process, the kernel device is the kernel's).
    let pinger = Command::new(meshd_lab_path())
        .args([
            "exec",
            "--name",
            &lab.0,
            "pod-1a",
            "--",
            "ping",
            "-i",
            "0.01",
            "-c",
            "300",
            "-W",
            "1",
            "198.19.2.10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.agent_pid("node-2")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    lab_ok(&["agent", "--name", &lab.0, "start", "node-2"]);
    let out = String::from_utf8_lossy(&pinger.wait_with_output().unwrap().stdout).into_owned();
    assert!(
        out.contains("300 received"),
        "packets lost across the agent restart:\n{out}"
    );
    if backend == "userspace" {
        let log = std::fs::read_to_string(format!("{}/nodes/node-2/agent.log", lab.dir())).unwrap();
        assert!(
            log.contains("adopting the running userspace WireGuard device"),
            "{log}"
        );
    }

    // A lost key file: the restarted agent publishes a new key and traffic recovers.
    let old = annotation(&lab, "node-3");
    lab_ok(&["agent", "--name", &lab.0, "stop", "node-3"]);
    std::fs::remove_file(format!("{}/nodes/node-3/state/cilium_wg0.key", lab.dir())).unwrap();
    lab_ok(&["agent", "--name", &lab.0, "start", "node-3"]);
    let new = annotation(&lab, "node-3");
    assert_ne!(old, new);
    wait_for(
        "node-1 to use node-3's new key",
        Duration::from_secs(5),
        || wg_peers(&lab, "node-1").contains(&new),
    );
    wait_for(
        "pod-1a to reach pod-3a again",
        Duration::from_secs(5),
        || pings(&lab, "pod-1a", "198.19.3.10", 1),
    );
    let mode =
        std::fs::metadata(format!("{}/nodes/node-3/state/cilium_wg0.key", lab.dir())).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // Bad annotations (with node-2's agent stopped, so nobody repairs them) are refused for
    // node-2 only; node-3 keeps working.
    lab_ok(&["agent", "--name", &lab.0, "stop", "node-2"]);
    let key3 = annotation(&lab, "node-3");
    for (value, reason) in [
        ("garbage", "not a WireGuard public key"),
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "all-zero"),
        (key3.as_str(), "already claimed by node node-3"),
    ] {
        lab.kubectl(&[
            "annotate",
            "--overwrite",
            "cn",
            "node-2",
            &format!("network.cilium.io/wg-pub-key={value}"),
        ]);
        wait_for(
            &format!("node-1 to refuse node-2 ({reason})"),
            Duration::from_secs(8),
            || {
                let st = String::from_utf8_lossy(
                    &lab.exec("node-1", &[meshd_path(), "encrypt", "status"])
                        .stdout,
                )
                .into_owned();
                st.contains(reason) && st.contains("\tNumber of peers: 1\n")
            },
        );
        assert!(
            pings(&lab, "pod-1a", "198.19.3.10", 1),
            "node-3 must be unaffected"
        );
    }
    let log = std::fs::read_to_string(format!("{}/nodes/node-1/agent.log", lab.dir())).unwrap();
    assert!(
        log.contains("no WireGuard peer for this node") && log.contains("node-2"),
        "{log}"
    );
    // The agent puts its real key back.
    lab_ok(&["agent", "--name", &lab.0, "start", "node-2"]);
    wait_for(
        "pod-1a to reach pod-2a again",
        Duration::from_secs(8),
        || pings(&lab, "pod-1a", "198.19.2.10", 1),
    );

    // Churn: a joining node is a peer everywhere and reachable within 2 s (scaled under
    // emulation); a leaving node is removed everywhere.
    lab_ok(&[
        "node", "add", "--name", &lab.0, "--index", "4", "--pods", "1",
    ]);
    let key4 = annotation(&lab, "node-4");
    let start = Instant::now();
    wait_for(
        "node-4 to be a peer everywhere and reachable",
        Duration::from_secs(2),
        || {
            ["node-1", "node-2", "node-3"]
                .iter()
                .all(|n| wg_peers(&lab, n).contains(&key4))
                && lab
                    .exec("pod-1a", &["ping", "-c", "1", "-W", "1", "198.19.4.10"])
                    .status
                    .success()
        },
    );
    eprintln!(
        "node-4 joined: peers and connectivity after {:?}",
        start.elapsed()
    );
    lab_ok(&["node", "delete", "--name", &lab.0, "node-4"]);
    wait_for(
        "node-4's peer and routes to be removed everywhere",
        Duration::from_secs(5),
        || {
            ["node-1", "node-2", "node-3"].iter().all(|n| {
                !wg_peers(&lab, n).contains(&key4) && !lab.routes(n).contains("198.19.4.0/24")
            })
        },
    );
}

/// An independent implementation on the other end: node-3 runs wireguard-go (Debian's), set up
/// by hand with `wg` from the CiliumNode annotations, and talks to meshd's backend (userspace
/// here, kernel in the VM).
#[test]
fn wireguard_interop_with_wireguard_go() {
    require_root();
    require_tool("wireguard-go");
    let lab = Lab::up("t-wgo", 2, 1, "wireguard");
    lab_ok(&[
        "node",
        "add",
        "--name",
        &lab.0,
        "--index",
        "3",
        "--pods",
        "1",
        "--no-agent",
    ]);

    // node-3: wireguard-go, configured with wg.
    let public = sh_in(
        &lab,
        "node-3",
        "export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1; wireguard-go cilium_wg0 && \
         umask 077 && wg genkey > /var/lib/meshd/wg.key && \
         wg set cilium_wg0 private-key /var/lib/meshd/wg.key listen-port 51871 && \
         ip link set cilium_wg0 mtu 1420 up && wg pubkey < /var/lib/meshd/wg.key",
    );
    let f = format!("{}/node-3.yaml", lab.dir());
    std::fs::write(
        &f,
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata:\n  name: node-3\n  annotations:\n    network.cilium.io/wg-pub-key: {public}\n\
             spec:\n  addresses:\n  - type: InternalIP\n    ip: 198.18.0.13\n  ipam:\n    podCIDRs: [198.19.3.0/24]\n  encryption:\n    key: 255\n"
        ),
    )
    .unwrap();
    lab.kubectl(&["apply", "-f", &f]);
    for (node, i) in [("node-1", 1), ("node-2", 2)] {
        let key = annotation(&lab, node);
        sh_in(
            &lab,
            "node-3",
            &format!(
                "wg set cilium_wg0 peer {key} endpoint 198.18.0.1{i}:51871 allowed-ips 198.19.{i}.0/24 && ip route add 198.19.{i}.0/24 dev cilium_wg0"
            ),
        );
    }

    // Traffic both ways, between meshd's nodes and wireguard-go's.
    wait_for("pod-1a to reach pod-3a", Duration::from_secs(10), || {
        pings(&lab, "pod-1a", "198.19.3.10", 1)
    });
    wait_for("pod-3a to reach pod-2a", Duration::from_secs(10), || {
        pings(&lab, "pod-3a", "198.19.2.10", 1)
    });
    let hs = sh_in(&lab, "node-3", "wg show cilium_wg0 latest-handshakes");
    assert_eq!(
        hs.lines().filter(|l| !l.ends_with("\t0")).count(),
        2,
        "handshakes on node-3:\n{hs}"
    );
    assert!(
        wg_peers(&lab, "node-1").contains(&public),
        "node-1 has wireguard-go's node as a peer"
    );
    let cap = lab_ok(&["capture", "--name", &lab.0]);
    assert!(cap.contains("pod addresses in the clear:      0"), "{cap}");

    // Preshared keys, set with `wg` on both ends (meshd's device on node-1, wireguard-go on
    // node-3): honoured, never accepted and ignored. A running session outlives a PSK change
    // (in the kernel, until the next handshake), so node-1's peer is re-created with the key
    // each time: the handshake that follows is the test.
    let psk = sh_in(&lab, "node-3", "wg genpsk");
    let other_psk = sh_in(&lab, "node-3", "wg genpsk");
    let key1 = annotation(&lab, "node-1");
    let set_psk = |node: &str, peer: &str, psk: &str, fresh: &str| {
        sh_in(
            &lab,
            node,
            &format!(
                "umask 077 && echo {psk} > /var/lib/meshd/psk && {fresh} wg set cilium_wg0 peer {peer} preshared-key /var/lib/meshd/psk && rm /var/lib/meshd/psk"
            ),
        );
    };
    let renew = format!(
        "wg set cilium_wg0 peer {public} remove && wg set cilium_wg0 peer {public} endpoint 198.18.0.13:51871 allowed-ips 198.19.3.0/24 &&"
    );
    set_psk("node-3", &key1, &psk, "");
    set_psk("node-1", &public, &psk, &renew);
    wait_for(
        "pod-1a to reach pod-3a with a preshared key",
        Duration::from_secs(20),
        || pings(&lab, "pod-1a", "198.19.3.10", 1),
    );
    // `wg` reads it back from meshd's device (it asks for secrets; the agent's polls do not).
    let shown = sh_in(&lab, "node-1", "wg show cilium_wg0 preshared-keys");
    assert!(
        shown
            .lines()
            .any(|l| l == format!("{}\t{}", public.trim(), psk.trim())),
        "{shown}"
    );
    // Mismatched keys: the handshake cannot complete, and no traffic passes.
    set_psk("node-1", &public, &other_psk, &renew);
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        assert!(
            !pings(&lab, "pod-1a", "198.19.3.10", 1),
            "traffic passed with mismatched preshared keys"
        );
    }
    // The same key again on both ends: back.
    set_psk("node-3", &key1, &other_psk, "");
    wait_for(
        "pod-1a to reach pod-3a with the new preshared key",
        scaled(Duration::from_secs(20)),
        || pings(&lab, "pod-1a", "198.19.3.10", 1),
    );
}

/// Bulk TCP through the tunnel arrives byte for byte, both ways: the userspace device cuts
/// super-packets into segments and glues received segments back together, so this is what
/// proves that it does so correctly (checksums, sequence numbers, order).
#[test]
fn wireguard_carries_tcp_streams_intact() {
    require_root();
    let lab = Lab::up("t-tcp", 2, 1, "wireguard");
    let server = r#"
import hashlib, socket, sys
socket.setdefaulttimeout(30)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"#;
    let client = r#"
import hashlib, socket, sys
socket.setdefaulttimeout(30)
data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() * 64 for i in range(12000))
s = socket.create_connection((sys.argv[1], 7000)); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"#;
    for (from, to, to_ip) in [
        ("pod-1a", "pod-2a", "198.19.2.10"),
        ("pod-2a", "pod-1a", "198.19.1.10"),
    ] {
        let mut srv = Command::new(meshd_lab_path())
            .args(["exec", "--name", &lab.0, to, "--", "python3", "-c", server])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(srv.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        let sent = lab.exec(from, &["python3", "-c", client, to_ip]);
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        let mut got = String::new();
        std::io::BufRead::read_line(&mut out, &mut got).unwrap();
        let _ = srv.wait();
        let sent = String::from_utf8_lossy(&sent.stdout).trim().to_string();
        assert!(sent.starts_with("24576000 "), "{sent}");
        assert_eq!(
            got.trim(),
            sent,
            "{from} -> {to}: what arrived differs from what was sent"
        );
    }
    for node in ["node-1", "node-2"] {
        let stats =
            String::from_utf8_lossy(&lab.exec(node, &["nstat", "-az", "TcpInCsumErrors"]).stdout)
                .into_owned();
        assert!(
            !stats.lines().any(|l| l.starts_with("TcpInCsumErrors")
                && l.split_whitespace().nth(1).is_none_or(|v| v != "0")),
            "{stats}"
        );
    }
}

/// A dead tunnel device never sends pod traffic in the clear, and comes back by itself. node-1
/// gets a default route via the hub, as every real node has one (and the hub routes every pod
/// CIDR to its node, so a packet that took it would arrive, unencrypted); then `cilium_wg0` is
/// deleted under a ping every 20 ms. The routes into the device go with it, and meshd's
/// backstop underneath (`unreachable … metric 1000000`) refuses the traffic: not one packet
/// with a pod address crosses the underlay. The agent notices within a second, brings the
/// device back with the node's key and peers, and the pings are answered again.
#[test]
fn a_dead_tunnel_device_leaks_nothing_and_comes_back() {
    require_root();
    let lab = Lab::up("t-leak", 2, 1, "wireguard");
    sh_in(&lab, "node-1", "ip route add default via 198.18.0.1");
    assert!(
        pings(&lab, "pod-1a", "198.19.2.10", 3),
        "through the tunnel first"
    );
    let routes = lab.routes("node-1");
    assert!(
        routes.contains("198.19.2.0/24 dev cilium_wg0")
            && routes.contains("unreachable 198.19.2.0/24")
            && routes.contains("metric 1000000"),
        "{routes}"
    );
    // Strict mode is on in the lab, over every pod CIDR; a healthy node's status exits 0.
    let st = lab.exec("node-1", &[meshd_path(), "status"]);
    let text = String::from_utf8_lossy(&st.stdout).into_owned();
    assert!(st.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("Strict mode:")
            && l.contains("Enabled for 198.19.1.0/24,198.19.2.0/24")),
        "{text}"
    );
    break_tunnel_and_watch_the_wire(&lab, "deleted", || {
        sh_in(&lab, "node-1", "ip link del cilium_wg0");
    });
    // The agent brought the device back with the node's key and its peers, and the tunnel
    // routes followed.
    let routes = lab.routes("node-1");
    assert!(
        routes.contains("198.19.2.0/24 dev cilium_wg0")
            && routes.contains("unreachable 198.19.2.0/24"),
        "{routes}"
    );
    let log = std::fs::read_to_string(format!("{}/nodes/node-1/agent.log", lab.dir())).unwrap();
    assert!(log.contains("the WireGuard device is gone"), "{log}");
    // The userspace device's process killed outright: its TUN interface goes with it, the
    // same backstop holds, and the agent starts a new process.
    if expected_wg_backend() == "userspace" {
        let pids = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "pids", &format!("meshd-{}-node-1", lab.0)])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        let pid: i32 = pids
            .split_whitespace()
            .find(|p| {
                // `meshd wireguard-userspace …` (the agent's own arguments mention the
                // userspace fallback too: match the subcommand, not a substring).
                std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                    c.split(|b| *b == 0).nth(1) == Some(b"wireguard-userspace".as_slice())
                })
            })
            .expect("node-1's userspace device process")
            .parse()
            .unwrap();
        break_tunnel_and_watch_the_wire(&lab, "killed", || {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        });
        assert!(
            lab.routes("node-1")
                .contains("198.19.2.0/24 dev cilium_wg0"),
            "tunnel route back after the process was killed"
        );
    }

    // Strict mode alone: the agent stopped, the device deleted and the backstop route removed
    // too, so the default route would carry pod traffic. The pinned programs still refuse it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.agent_pid("node-1")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let tcpdump = capture_pod_packets(&lab);
    let drops_before = unencrypted_drops(&lab, "node-1");
    sh_in(&lab, "node-1", "ip link del cilium_wg0");
    sh_in(
        &lab,
        "node-1",
        "ip route del unreachable 198.19.2.0/24 metric 1000000",
    );
    let routes = lab.routes("node-1");
    assert!(!routes.contains("198.19.2.0/24"), "{routes}");
    let out = lab.exec(
        "pod-1a",
        &["ping", "-c", "300", "-i", "0.01", "-W", "1", "198.19.2.10"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("bytes from 198.19.2.10"), "{text}");
    let lines = stop_capture(tcpdump);
    assert!(
        lines.trim().is_empty(),
        "with the agent stopped and the tunnel gone, pod traffic crossed the underlay in the clear:\n{lines}"
    );
    let dropped = unencrypted_drops(&lab, "node-1") - drops_before;
    assert!(
        dropped >= 300,
        "only {dropped} of 300 pings were counted as reason 195"
    );
    // The agent back: device, routes and traffic return.
    lab_ok(&["agent", "--name", &lab.0, "start", "node-1"]);
    wait_for(
        "traffic after the agent restart",
        scaled(Duration::from_secs(20)),
        || pings(&lab, "pod-1a", "198.19.2.10", 1),
    );
}

/// Captures on the underlay (hub bridge) while `break_it` takes node-1's tunnel down and pod-1a
/// pings pod-2a every 20 ms for 3 s (longer under emulation): asserts that no packet with the
/// pod's address crossed in the clear and that the pings are answered again.
/// The datapath's reason-195 drop counter on `node` (`meshd bpf metrics list`).
fn unencrypted_drops(lab: &Lab, node: &str) -> u64 {
    let out = lab.exec(
        node,
        &[meshd_path(), "bpf", "metrics", "list", "-o", "json"],
    );
    assert!(
        out.status.success(),
        "meshd bpf metrics list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .filter(|r| r["reason"] == 195)
        .map(|r| r["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// tcpdump on the hub bridge for packets with pod-2a's address; `stop_capture` returns them.
fn capture_pod_packets(lab: &Lab) -> std::process::Child {
    let tcpdump = Command::new(meshd_lab_path())
        .args(["exec", "--name", &lab.0, "hub", "--"])
        .args([
            "tcpdump",
            "-n",
            "-l",
            "-i",
            "br0",
            "ip",
            "and",
            "host",
            "198.19.2.10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    tcpdump
}

fn stop_capture(tcpdump: std::process::Child) -> String {
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let seen = tcpdump.wait_with_output().unwrap();
    String::from_utf8_lossy(&seen.stdout).into_owned()
}

fn break_tunnel_and_watch_the_wire(lab: &Lab, how: &str, break_it: impl FnOnce()) {
    let tcpdump = capture_pod_packets(lab);
    let drops_before = unencrypted_drops(lab, "node-1");
    break_it();
    // A ping every 10 ms, 1,000 of them (more under emulation, where everything is slower).
    let count = (1000 * time_scale()).to_string();
    let out = lab.exec(
        "pod-1a",
        &["ping", "-c", &count, "-i", "0.01", "-W", "1", "198.19.2.10"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let replies: Vec<u32> = text
        .lines()
        .filter(|l| l.contains("bytes from 198.19.2.10"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    let first = *replies.first().unwrap_or_else(|| {
        panic!("traffic did not resume within {count} pings after the device was {how}: {text}")
    });
    let resumed_ms = first * 10;
    eprintln!("traffic resumed at ping {first} (about {resumed_ms} ms after the device was {how})");
    assert!(
        resumed_ms <= 2000 * time_scale(),
        "traffic took {resumed_ms} ms to resume after the device was {how} (at most 2 s)"
    );
    let dropped = unencrypted_drops(lab, "node-1") - drops_before;
    eprintln!("strict mode dropped {dropped} packets (reason 195) meanwhile");
    // Pings lost before the first answer were refused by strict mode, each one counted.
    let lost = u64::from(first.saturating_sub(1));
    assert!(
        dropped >= lost.saturating_sub(2),
        "while the device was {how}, {lost} pings went unanswered but only {dropped} drops were \
         counted as reason 195 (Traffic is unencrypted)"
    );
    let lines = stop_capture(tcpdump);
    assert!(
        lines.trim().is_empty(),
        "pod traffic crossed the underlay in the clear after the device was {how}:\n{lines}"
    );
}
