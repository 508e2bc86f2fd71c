//! Identities and policy: CiliumIdentity/CiliumEndpoint, policies compiled per endpoint, and the
//! eBPF datapath enforcing them over real traffic (selectors, CIDRs, the world, auth-required).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use meshd_e2e::*;

/// Endpoints get security identities the CRD way (same labels → same identity, on any node),
/// are published as CiliumEndpoints, and lose them when they go.
#[test]
fn identities_and_cilium_endpoints() {
    require_root();
    let lab = Lab::up("t-id", 2, 1, "none");
    lab.pod("node-1", "app=web", "web-1");
    lab.pod("node-2", "app=web", "web-2");
    let cep_identity =
        |name: &str| lab.kubectl(&["get", "cep", name, "-o", "jsonpath={.status.identity.id}"]);
    wait_for(
        "CiliumEndpoints for every pod",
        Duration::from_secs(5),
        || {
            let out = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(format!("{}/admin.kubeconfig", lab.dir()))
                .args(["get", "cep", "-o", "name"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count() == 4
        },
    );
    let (w1, w2, a) = (
        cep_identity("web-1"),
        cep_identity("web-2"),
        cep_identity("pod-1a"),
    );
    assert_eq!(w1, w2, "the same labels share one identity across nodes");
    assert_ne!(w1, a);
    assert!(w1.parse::<u32>().unwrap() >= 256 && a.parse::<u32>().unwrap() >= 256);
    let ids = lab.kubectl(&["get", "ciliumidentities", "-o", "name"]);
    assert_eq!(ids.lines().count(), 3, "{ids}");
    let labels = lab.kubectl(&[
        "get",
        "ciliumidentity",
        &w1,
        "-o",
        "jsonpath={.security-labels}",
    ]);
    assert!(
        labels.contains("k8s:app") && labels.contains("k8s:io.kubernetes.pod.namespace"),
        "{labels}"
    );
    let list = String::from_utf8_lossy(
        &lab.exec("node-1", &[meshd_path(), "endpoint", "list"])
            .stdout,
    )
    .into_owned();
    assert!(
        list.lines()
            .any(|l| l.starts_with("default/web-1") && l.contains(&w1)),
        "{list}"
    );

    // A restarted agent finds the identities again instead of allocating new ones.
    lab_ok(&["agent", "--name", &lab.0, "restart", "node-1"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lab.kubectl(&["get", "ciliumidentities", "-o", "name"])
            .lines()
            .count(),
        3
    );
    assert_eq!(cep_identity("web-1"), w1);

    // A deleted pod takes its CiliumEndpoint with it.
    lab_ok(&["pod", "delete", "--name", &lab.0, "web-1"]);
    wait_for(
        "web-1's CiliumEndpoint to go",
        Duration::from_secs(5),
        || !lab.kubectl(&["get", "cep", "-o", "name"]).contains("web-1"),
    );
    assert!(lab.kubectl(&["get", "cep", "-o", "name"]).contains("web-2"));
}

/// Policies applied with kubectl reach every agent and compile into the endpoint's entries
/// (auth-required marked 0x81); a malformed update is refused with the field named while the
/// last good version stays in force; deletion returns the endpoint to allow-all.
#[test]
fn policies_compile_per_endpoint_and_keep_the_last_good_version() {
    require_root();
    let lab = Lab::up("t-pol", 2, 0, "none");
    lab.pod("node-1", "app=web", "web-1");
    lab.pod("node-2", "app=client", "client-1");
    let policy = |port: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: web-auth, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    authentication: {{mode: required}}\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]\n"
        )
    };
    let f = format!("{}/p.yaml", lab.dir());
    std::fs::write(&f, policy("8080")).unwrap();
    lab.kubectl(&["apply", "-f", &f]);
    let get = || -> serde_json::Value {
        let out = lab.exec(
            "node-1",
            &[
                meshd_path(),
                "policy",
                "get",
                "--endpoint",
                "default/web-1",
                "-o",
                "json",
            ],
        );
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let client_id: u64 = {
        let mut id = 0;
        wait_for("client-1's identity", Duration::from_secs(5), || {
            id = lab
                .kubectl(&[
                    "get",
                    "cep",
                    "client-1",
                    "-o",
                    "jsonpath={.status.identity.id}",
                ])
                .parse()
                .unwrap_or(0);
            id != 0
        });
        id
    };
    wait_for(
        "node-1 to compile the policy",
        Duration::from_secs(5),
        || {
            let st = get();
            st["endpoints"][0]["ingressEnforced"] == true
                && st["endpoints"][0]["entries"]
                    .as_array()
                    .is_some_and(|e| !e.is_empty())
        },
    );
    let st = get();
    let entry = &st["endpoints"][0]["entries"][0];
    assert_eq!(entry["identity"], client_id);
    assert_eq!(
        (
            entry["protocol"].as_u64(),
            entry["port"].as_u64(),
            entry["prefixLen"].as_u64()
        ),
        (Some(6), Some(8080), Some(64))
    );
    assert_eq!(
        (entry["verdict"].as_str(), entry["authType"].as_u64()),
        (Some("allow"), Some(0x81))
    );
    wait_for("the datapath to enforce", Duration::from_secs(5), || {
        get()["enforcement"]
            .as_str()
            .is_some_and(|e| e.starts_with("enforced by the eBPF datapath"))
    });

    std::fs::write(&f, policy("99999")).unwrap();
    lab.kubectl(&["apply", "-f", &f]);
    wait_for(
        "node-1 to refuse the bad update",
        Duration::from_secs(5),
        || {
            get()["objects"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("spec.ingress[0].toPorts[0].ports[0].port"))
        },
    );
    assert_eq!(
        get()["endpoints"][0]["entries"][0]["port"],
        8080,
        "the last good version stays in force"
    );
    let log = std::fs::read_to_string(format!("{}/nodes/node-1/agent.log", lab.dir())).unwrap();
    assert!(
        log.contains("refusing a policy object") && log.contains("web-auth"),
        "{log}"
    );

    lab.kubectl(&["delete", "-f", &f]);
    wait_for(
        "the endpoint to go back to allow-all",
        Duration::from_secs(5),
        || get()["endpoints"][0]["ingressEnforced"] == false,
    );
}

/// CiliumNetworkPolicy enforced in the kernel between pods on different nodes: allowed by
/// labels and port, default deny for the rest, auth-required flows dropped (reason 189, an
/// AUTH_REQUIRED signal naming the pair) until an auth entry exists, and back to open when the
/// policy is deleted.
#[test]
fn policy_is_enforced_in_the_kernel_between_pods() {
    require_root();
    let lab = Lab::up("t-enf", 2, 0, "wireguard");
    lab.pod("node-1", "app=web", "web-1");
    lab.pod("node-2", "app=client", "client-1");
    lab.pod("node-2", "app=other", "other-1");
    let _servers = Servers::start(&lab, "web-1", &[8080, 8081], &[]);
    let web = "198.19.1.10";
    wait_for("the server in web-1", Duration::from_secs(5), || {
        tcp_connects(&lab, "other-1", web, 8080)
    });

    let f = format!("{}/p.yaml", lab.dir());
    std::fs::write(
        &f,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    authentication: {mode: required}\n    toPorts: [{ports: [{port: \"8081\", protocol: TCP}]}]\n",
    )
    .unwrap();
    lab.kubectl(&["apply", "-f", &f]);
    wait_for("the policy to take effect", Duration::from_secs(5), || {
        !tcp_connects(&lab, "other-1", web, 8080)
    });
    // The client's identity and address reach node-1's ipcache through its CiliumEndpoint.
    wait_for(
        "client-1 to be allowed by labels and port",
        Duration::from_secs(5),
        || tcp_connects(&lab, "client-1", web, 8080),
    );
    assert!(!tcp_connects(&lab, "other-1", web, 8081));

    // `meshd monitor --type drop` shows the drop live: reason, identities, addresses, port.
    let mut mon = Command::new(meshd_lab_path())
        .args([
            "exec",
            "--name",
            &lab.0,
            "node-1",
            "--",
            meshd_path(),
            "monitor",
            "--type",
            "drop",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = mon.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!tcp_connects(&lab, "other-1", web, 8080));
    // The first event for port 8080 (a late SYN retransmission of an earlier denied attempt
    // may come first).
    let (line, ev) = loop {
        let line = rx
            .recv_timeout(scaled(Duration::from_secs(5)))
            .expect("a drop event for port 8080 from meshd monitor");
        let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
        if ev["dport"] == 8080 {
            break (line, ev);
        }
    };
    let other_id = lab.kubectl(&[
        "get",
        "cep",
        "other-1",
        "-o",
        "jsonpath={.status.identity.id}",
    ]);
    let web_id_now = lab.kubectl(&[
        "get",
        "cep",
        "web-1",
        "-o",
        "jsonpath={.status.identity.id}",
    ]);
    assert_eq!(
        (
            ev["kind"].as_str(),
            ev["reason"].as_u64(),
            ev["dport"].as_u64()
        ),
        (Some("drop"), Some(133), Some(8080)),
        "{line}"
    );
    assert_eq!(
        (
            ev["src-identity"].to_string(),
            ev["dst-identity"].to_string()
        ),
        (other_id, web_id_now),
        "{line}"
    );
    assert_eq!(
        (ev["dst"].as_str(), ev["direction"].as_str()),
        (Some(web), Some("ingress")),
        "{line}"
    );
    let _ = mon.kill();
    let _ = mon.wait();

    // The kernel's map agrees with the compiled entries, and bpftool reads the contract's bytes.
    let kernel: serde_json::Value = serde_json::from_slice(
        &lab.exec(
            "node-1",
            &[
                meshd_path(),
                "bpf",
                "policy",
                "get",
                "lxcweb1",
                "-o",
                "json",
            ],
        )
        .stdout,
    )
    .unwrap();
    let compiled: serde_json::Value = serde_json::from_slice(
        &lab.exec(
            "node-1",
            &[
                meshd_path(),
                "policy",
                "get",
                "--endpoint",
                "default/web-1",
                "-o",
                "json",
            ],
        )
        .stdout,
    )
    .unwrap();
    let mut k: Vec<(u64, u64, u64, u64)> = kernel
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["identity"].as_u64().unwrap(),
                e["port"].as_u64().unwrap(),
                e["prefixlen"].as_u64().unwrap(),
                e["auth-type"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut c: Vec<(u64, u64, u64, u64)> = compiled["endpoints"][0]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["identity"].as_u64().unwrap(),
                e["port"].as_u64().unwrap(),
                e["prefixLen"].as_u64().unwrap(),
                e["authType"].as_u64().unwrap(),
            )
        })
        .collect();
    k.sort();
    c.sort();
    assert_eq!(k, c, "kernel map vs compiled entries");
    let dump = lab.exec(
        "node-1",
        &[
            "bpftool",
            "-j",
            "map",
            "dump",
            "pinned",
            "/sys/fs/bpf/meshd/endpoints/lxcweb1/POLICY",
        ],
    );
    assert!(
        dump.status.success(),
        "bpftool could not dump the endpoint's policy map (`cargo xtask setup` installs bpftool): {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    {
        let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
        let bytes = |v: &serde_json::Value| -> Vec<u8> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect()
        };
        let entry = dump.as_array().unwrap().iter().find(|e| {
            let key = bytes(&e["key"]);
            u16::from_be_bytes([key[10], key[11]]) == 8081
        });
        let entry = entry.expect("the 8081 entry in bpftool's dump");
        let (key, value) = (bytes(&entry["key"]), bytes(&entry["value"]));
        assert_eq!(key.len(), 12, "the contract's 12-byte key");
        assert_eq!(
            u32::from_le_bytes([key[0], key[1], key[2], key[3]]),
            64,
            "prefixlen"
        );
        assert_eq!(
            u32::from_le_bytes([key[4], key[5], key[6], key[7]]).to_string(),
            client_id_for_dump(&lab)
        );
        assert_eq!((key[8], key[9]), (0, 6), "ingress, TCP");
        assert_eq!(
            (value.len(), value[2], value[3]),
            (8, 0, 0x81),
            "flags, auth type 1|0x80"
        );
    }

    // Auth required: dropped and signalled until an auth entry exists.
    assert!(!tcp_connects(&lab, "client-1", web, 8081));
    let log_path = format!("{}/nodes/node-1/agent.log", lab.dir());
    let mut line = String::new();
    wait_for(
        "the AUTH_REQUIRED signal in node-1's log",
        Duration::from_secs(3),
        || {
            line = std::fs::read_to_string(&log_path)
                .unwrap()
                .lines()
                .rev()
                .find(|l| l.contains("AUTH_REQUIRED"))
                .unwrap_or("")
                .to_string();
            !line.is_empty()
        },
    );
    let field = |name: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or("")
            .to_string()
    };
    let web_id = lab.kubectl(&[
        "get",
        "cep",
        "web-1",
        "-o",
        "jsonpath={.status.identity.id}",
    ]);
    let client_id = lab.kubectl(&[
        "get",
        "cep",
        "client-1",
        "-o",
        "jsonpath={.status.identity.id}",
    ]);
    assert_eq!(
        (
            field("local_identity"),
            field("remote_identity"),
            field("auth_type")
        ),
        (web_id.clone(), client_id.clone(), "1".to_string()),
        "{line}"
    );
    let node_id = field("remote_node_id");
    // `meshd bpf auth add` on node-1 for (web, client, node) expiring in `secs` seconds.
    let auth_add = |secs: &str| {
        lab_ok(&[
            "exec",
            "--name",
            &lab.0,
            "node-1",
            "--",
            meshd_path(),
            "bpf",
            "auth",
            "add",
            "--local",
            &web_id,
            "--remote",
            &client_id,
            "--remote-node-id",
            &node_id,
            "--expires-in",
            secs,
        ])
    };
    auth_add("60");
    assert!(
        tcp_connects(&lab, "client-1", web, 8081),
        "passes once authenticated"
    );
    let list = String::from_utf8_lossy(
        &lab.exec("node-1", &[meshd_path(), "bpf", "auth", "list"])
            .stdout,
    )
    .into_owned();
    assert!(
        list.starts_with("SRC IDENTITY   DST IDENTITY   REMOTE NODE ID   AUTH TYPE   EXPIRATION")
            && list.contains("spire"),
        "{list}"
    );
    auth_add("0");
    assert!(
        !tcp_connects(&lab, "client-1", web, 8081),
        "dropped again after expiry"
    );

    // The datapath does not depend on the agent process: under continuous traffic (a new
    // connection every 20 ms from each client), node-1's agent is killed and restarted; every
    // allowed attempt connects and every denied one is refused throughout, and the restarted
    // agent adopts the pinned maps and links without a gap.
    let mut allowed = Probe::start(&lab, "client-1", web, 8080, None);
    let mut denied = Probe::start(&lab, "other-1", web, 8080, None);
    allowed.first(true, now(), scaled(Duration::from_secs(5)));
    denied.first(false, now(), scaled(Duration::from_secs(5)));
    let t0 = now();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.agent_pid("node-1")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(scaled(Duration::from_secs(1)));
    lab_ok(&["agent", "--name", &lab.0, "start", "node-1"]);
    std::thread::sleep(scaled(Duration::from_secs(1)));
    let t1 = now();
    let (a, d) = (allowed.between(t0, t1), denied.between(t0, t1));
    assert!(
        a.len() >= 20 && d.len() >= 5,
        "too few attempts: {} allowed, {} denied",
        a.len(),
        d.len()
    );
    assert!(
        a.iter().all(|ok| *ok),
        "allowed connections failed across the agent's kill and restart: {} of {}",
        a.iter().filter(|ok| !**ok).count(),
        a.len()
    );
    assert!(
        d.iter().all(|ok| !*ok),
        "denied connections got through across the agent's kill and restart: {} of {}",
        d.iter().filter(|ok| **ok).count(),
        d.len()
    );
    eprintln!(
        "across kill -9 and restart: {} allowed attempts all connected, {} denied all refused",
        a.len(),
        d.len()
    );
    let pins = String::from_utf8_lossy(
        &lab.exec("node-1", &["ls", "/sys/fs/bpf/meshd/endpoints/lxcweb1"])
            .stdout,
    )
    .into_owned();
    for name in ["POLICY", "CONFIG"] {
        assert!(pins.contains(name), "{name} pinned: {pins}");
    }
    // The programs as the kernel shows them: TCX links (pinned) where the kernel has TCX,
    // else exactly meshd's one cls_bpf filter per direction, the restart included.
    for dir in ["ingress", "egress"] {
        let filters = cls_bpf_filters(&lab, "node-1", "lxcweb1", dir);
        if kernel_has_tcx() {
            assert!(filters.is_empty(), "no tc filters with TCX: {filters:?}");
        } else {
            assert_eq!(filters.len(), 1, "one filter on {dir}: {filters:?}");
            assert!(
                filters[0].contains("pref 1 ") && filters[0].contains("handle 0x1 "),
                "{filters:?}"
            );
        }
    }
    for name in ["from_endpoint", "to_endpoint"] {
        assert_eq!(
            pins.contains(name),
            kernel_has_tcx(),
            "{name} link pinned exactly where TCX exists: {pins}"
        );
    }

    // Drops are reported with reason and identities.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("dropped (Policy denied)"),
        "no drop report in the log"
    );

    within_a_second(
        &lab,
        "delete",
        &f,
        &mut denied,
        true,
        "the policy's deletion",
    );

    // A deleted pod leaves nothing behind: no pinned programs or maps on its node, no ipcache
    // entry anywhere.
    drop((allowed, denied));
    lab_ok(&["pod", "delete", "--name", &lab.0, "web-1"]);
    let ipcache_has = |node: &str| {
        String::from_utf8_lossy(
            &lab.exec(node, &[meshd_path(), "bpf", "ipcache", "list"])
                .stdout,
        )
        .contains("198.19.1.10/32")
    };
    wait_for("web-1's traces to go", Duration::from_secs(5), || {
        !ipcache_has("node-1")
            && !ipcache_has("node-2")
            && !lab
                .exec(
                    "node-1",
                    &["test", "-e", "/sys/fs/bpf/meshd/endpoints/lxcweb1"],
                )
                .status
                .success()
    });
}

/// Selectors over real traffic: namespace scoping, a port range, UDP, and the host entity.
#[test]
fn policy_selectors_over_real_traffic() {
    require_root();
    let lab = Lab::up("t-sel", 2, 0, "none");
    // (`kubectl create namespace` speaks protobuf, which the lab API server does not; apply is JSON.)
    let ns = format!("{}/ns.yaml", lab.dir());
    std::fs::write(
        &ns,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n",
    )
    .unwrap();
    lab.kubectl(&["apply", "-f", &ns]);
    lab.pod("node-1", "app=web", "web-1");
    lab.pod("node-2", "app=client", "client-1");
    lab_ok(&[
        "pod",
        "add",
        "--name",
        &lab.0,
        "--node",
        "node-2",
        "--namespace",
        "prod",
        "--label",
        "app=client",
        "prodclient",
    ]);
    // Neighbours of web-1 on its own node: their egress programs allow everything, and web-1's
    // ingress policy must still judge them.
    lab.pod("node-1", "app=client", "localclient");
    lab.pod("node-1", "app=other", "localother");
    let _servers = Servers::start(&lab, "web-1", &[8080, 8081, 8082], &[9000]);
    let web = "198.19.1.10";
    wait_for("the servers in web-1", Duration::from_secs(5), || {
        tcp_connects(&lab, "prodclient", web, 8080) && tcp_connects(&lab, "localother", web, 8080)
    });
    let f = format!("{}/p.yaml", lab.dir());
    std::fs::write(
        &f,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8080\", endPort: 8081, protocol: TCP}, {port: \"9000\", protocol: UDP}]}]\n  - fromEntities: [host]\n",
    )
    .unwrap();
    lab.kubectl(&["apply", "-f", &f]);
    wait_for("the policy to take effect", Duration::from_secs(5), || {
        !tcp_connects(&lab, "prodclient", web, 8080)
    });
    wait_for("client-1 allowed", Duration::from_secs(5), || {
        tcp_connects(&lab, "client-1", web, 8080)
    });
    assert!(
        tcp_connects(&lab, "client-1", web, 8081),
        "inside the port range"
    );
    assert!(
        !tcp_connects(&lab, "client-1", web, 8082),
        "outside the port range"
    );
    assert!(udp_echoes(&lab, "client-1", web, 9000), "UDP 9000 allowed");
    assert!(
        tcp_connects(&lab, "localclient", web, 8080),
        "allowed from the same node"
    );
    assert!(
        !tcp_connects(&lab, "localother", web, 8080),
        "denied from the same node, although the sender's egress allows it"
    );
    assert!(
        !tcp_connects(&lab, "prodclient", web, 8081),
        "same labels in another namespace are not selected"
    );
    assert!(!udp_echoes(&lab, "prodclient", web, 9000));
    let host = lab.exec(
        "node-1",
        &[
            "python3",
            "-c",
            &format!("import socket; socket.create_connection(('{web}', 8082), timeout=1).close()"),
        ],
    );
    assert!(
        host.status.success(),
        "fromEntities: host lets the node itself in"
    );
}

/// CIDR rules and the world entity over real traffic to and from a host outside the cluster
/// (the lab's world: 198.18.1.10 and .20 behind the hub), each change timed: a policy change
/// or deletion takes effect within a second.
#[test]
fn cidr_rules_and_the_world_over_real_traffic() {
    require_root();
    let lab = Lab::up("t-cidr", 2, 0, "wireguard");
    lab.pod("node-1", "app=web", "web-1");
    lab.pod("node-2", "app=client", "client-1");
    lab.pod("node-2", "app=other", "other-1");
    let _world = Servers::start(&lab, "world", &[443], &[]);
    let _web = Servers::start(&lab, "web-1", &[8080], &[]);
    let web = "198.19.1.10";
    let (w10, w20) = ("198.18.1.10", "198.18.1.20");
    wait_for("the servers", Duration::from_secs(5), || {
        tcp_connects(&lab, "client-1", w10, 443) && tcp_connects(&lab, "other-1", web, 8080)
    });
    assert!(tcp_connects(&lab, "client-1", w20, 443));
    assert!(tcp_connects_from(&lab, "world", Some(w10), web, 8080));
    assert!(tcp_connects_from(&lab, "world", Some(w20), web, 8080));

    // Egress by CIDR with an except; a CIDR over the pod range does not select pods.
    let egress = format!("{}/egress.yaml", lab.dir());
    let write_egress = |peer: &str| {
        std::fs::write(
            &egress,
            format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: client-out, namespace: default}}\nspec:\n  endpointSelector: {{matchLabels: {{app: client}}}}\n  egress:\n  - {peer}\n    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n  - toCIDR: [198.19.0.0/16]\n"),
        )
        .unwrap();
    };
    write_egress("toCIDRSet: [{cidr: 198.18.1.0/24, except: [198.18.1.16/28]}]");
    let mut to_w20 = Probe::start(&lab, "client-1", w20, 443, None);
    within_a_second(
        &lab,
        "apply",
        &egress,
        &mut to_w20,
        false,
        "egress CIDR except",
    );
    assert!(tcp_connects(&lab, "client-1", w10, 443), "inside the CIDR");
    assert!(
        !tcp_connects(&lab, "client-1", web, 8080),
        "a CIDR rule does not select cluster endpoints"
    );

    // Ingress by CIDR, with a deny inside the allowed prefix (deny wins); its prefixes nest
    // inside the egress policy's /24, which still allows .10.
    let ingress = format!("{}/ingress.yaml", lab.dir());
    std::fs::write(
        &ingress,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-in, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromCIDR: [198.18.1.0/27]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n  ingressDeny:\n  - fromCIDR: [198.18.1.10/32]\n",
    )
    .unwrap();
    let mut from_w10 = Probe::start(&lab, "world", web, 8080, Some(w10));
    within_a_second(
        &lab,
        "apply",
        &ingress,
        &mut from_w10,
        false,
        "ingress CIDR",
    );
    assert!(
        tcp_connects_from(&lab, "world", Some(w20), web, 8080),
        "allowed by the /27"
    );
    assert!(
        !tcp_connects(&lab, "other-1", web, 8080),
        "pods are not in a world CIDR"
    );
    assert!(
        tcp_connects(&lab, "client-1", w10, 443),
        "the egress /24 also covers the /32 another policy introduced"
    );
    let ipcache = String::from_utf8_lossy(
        &lab.exec(
            "node-2",
            &[meshd_path(), "bpf", "ipcache", "list", "-o", "json"],
        )
        .stdout,
    )
    .into_owned();
    let ipcache: serde_json::Value = serde_json::from_str(&ipcache).unwrap();
    let mut cidrs: Vec<&str> = ipcache
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["identity"].as_u64().unwrap() > 1 << 24)
        .map(|e| e["prefix"].as_str().unwrap())
        .collect();
    cidrs.sort();
    assert_eq!(
        cidrs,
        [
            "198.18.1.0/24",
            "198.18.1.0/27",
            "198.18.1.10/32",
            "198.18.1.16/28",
            "198.19.0.0/16"
        ],
        "node-2's ipcache holds the CIDRs of every policy, as local identities"
    );

    // toEntities: world covers every CIDR identity, and still no pod.
    write_egress("toEntities: [world]");
    within_a_second(
        &lab,
        "apply",
        &egress,
        &mut to_w20,
        true,
        "egress to the world",
    );
    assert!(!tcp_connects(&lab, "client-1", web, 8080));

    within_a_second(
        &lab,
        "delete",
        &ingress,
        &mut from_w10,
        true,
        "ingress deletion",
    );
    assert!(tcp_connects(&lab, "other-1", web, 8080));
}
