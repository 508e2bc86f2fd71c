//! The lab API server against real clients: the `kube` crate and `kubectl`, over HTTPS with
//! bearer tokens, as they would talk to a Kubernetes API server.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::process::Command;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use serde_json::json;

fn cn() -> ApiResource {
    ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: "CiliumNode".into(),
        plural: "ciliumnodes".into(),
    }
}

fn cnp() -> ApiResource {
    ApiResource {
        kind: "CiliumNetworkPolicy".into(),
        plural: "ciliumnetworkpolicies".into(),
        ..cn()
    }
}

async fn client(kubeconfig: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn node(name: &str, labels: serde_json::Value) -> DynamicObject {
    let mut o = DynamicObject::new(name, &cn());
    o.metadata.labels = serde_json::from_value(labels).unwrap();
    o.data = json!({"spec": {"addresses": [{"type": "InternalIP", "ip": "198.18.0.11"}]}});
    o
}

fn api_code(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_crud_conflicts_selectors_and_patches() {
    let dir = tempfile::tempdir().unwrap();
    let srv = lab::apiserver::spawn_local(dir.path(), 1000).await.unwrap();
    let api: Api<DynamicObject> = Api::all_with(client(&srv.kubeconfig).await, &cn());

    let created = api
        .create(
            &PostParams::default(),
            &node("node-1", json!({"role": "edge"})),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.creation_timestamp.is_some());
    api.create(
        &PostParams::default(),
        &node("node-2", json!({"role": "core"})),
    )
    .await
    .unwrap();

    let (code, reason, _) = api_code(
        api.create(&PostParams::default(), &node("node-1", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // Label and field selectors.
    let names = |l: kube::core::ObjectList<DynamicObject>| {
        l.items
            .into_iter()
            .map(|o| o.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("role=edge"))
                .await
                .unwrap()
        ),
        vec!["node-1"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("role notin (edge)"))
                .await
                .unwrap()
        ),
        vec!["node-2"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().fields("metadata.name=node-2"))
                .await
                .unwrap()
        ),
        vec!["node-2"]
    );

    // Optimistic concurrency: an update from a stale copy is refused and changes nothing.
    let mut fresh = api.get("node-1").await.unwrap();
    let mut stale = fresh.clone();
    fresh.data["spec"]["bootid"] = json!("a");
    let updated = api
        .replace("node-1", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_eq!(updated.metadata.generation, Some(2));
    stale.data["spec"]["bootid"] = json!("b");
    let (code, reason, msg) = api_code(
        api.replace("node-1", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"), "{msg}");
    assert_eq!(api.get("node-1").await.unwrap().data["spec"]["bootid"], "a");

    // Merge patch and JSON patch.
    let p = json!({"metadata": {"annotations": {"network.cilium.io/wg-pub-key": "k"}}});
    let o = api
        .patch("node-1", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .unwrap();
    assert_eq!(
        o.metadata.annotations.unwrap()["network.cilium.io/wg-pub-key"],
        "k"
    );
    assert_eq!(
        o.metadata.generation,
        Some(2),
        "metadata changes keep the generation"
    );
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/bootid", "value": "c"}]))
            .unwrap();
    let o = api
        .patch("node-1", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap();
    assert_eq!(o.data["spec"]["bootid"], "c");
    let bad: json_patch::Patch =
        serde_json::from_value(json!([{"op": "remove", "path": "/spec/nothere"}])).unwrap();
    let (code, _, _) = api_code(
        api.patch("node-1", &PatchParams::default(), &Patch::<()>::Json(bad))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);

    // Delete, then it is gone.
    api.delete("node-2", &DeleteParams::default())
        .await
        .unwrap();
    let (code, reason, msg) = api_code(api.get("node-2").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert!(
        msg.contains("ciliumnodes.cilium.io \"node-2\" not found"),
        "{msg}"
    );
}

#[tokio::test]
async fn kube_watch_resumes_and_reports_gone() {
    let dir = tempfile::tempdir().unwrap();
    let srv = lab::apiserver::spawn_local(dir.path(), 5).await.unwrap();
    let api: Api<DynamicObject> = Api::all_with(client(&srv.kubeconfig).await, &cn());
    let a = api
        .create(&PostParams::default(), &node("a", json!({})))
        .await
        .unwrap();
    let rv_a = a.metadata.resource_version.clone().unwrap();
    api.create(&PostParams::default(), &node("b", json!({})))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();

    // Resume after `a` was created: exactly what happened since, in order.
    let mut w = api
        .watch(&WatchParams::default().timeout(2), &rv_a)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while let Some(ev) = w.try_next().await.unwrap() {
        match ev {
            WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.metadata.name.unwrap())),
            WatchEvent::Deleted(o) => seen.push(format!("DELETED {}", o.metadata.name.unwrap())),
            WatchEvent::Modified(o) => seen.push(format!("MODIFIED {}", o.metadata.name.unwrap())),
            _ => {}
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, vec!["ADDED b", "DELETED a"]);

    // Bookmarks arrive when asked for.
    let mut w = api
        .watch(&WatchParams::default().timeout(3), &rv_a)
        .await
        .unwrap()
        .boxed();
    let mut bookmark = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(4), w.try_next())
        .await
        .map(|r| r.unwrap())
    {
        if matches!(ev, WatchEvent::Bookmark(_)) {
            bookmark = true;
            break;
        }
    }
    assert!(bookmark, "no BOOKMARK event within the watch");

    // Push `rv_a` out of the history: resuming from it is 410 Gone.
    for i in 0..6 {
        api.create(&PostParams::default(), &node(&format!("n{i}"), json!({})))
            .await
            .unwrap();
    }
    let mut w = api
        .watch(&WatchParams::default().timeout(2), &rv_a)
        .await
        .unwrap()
        .boxed();
    match w.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    // kube's watcher re-lists on 410 and ends up with the full state.
    let stream = kube::runtime::watcher(api.clone(), Default::default());
    let objs: Vec<_> = kube::runtime::WatchStreamExt::applied_objects(stream)
        .take(7)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(objs.len(), 7);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = lab::apiserver::spawn_local(dir.path(), 1000).await.unwrap();
    let client = client(&srv.kubeconfig).await;
    let rv_before = srv.server.store.current_rv();
    let post = |body: Vec<u8>, ctype: &str| {
        http::Request::builder()
            .method("POST")
            .uri("/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies")
            .header("content-type", ctype)
            .body(body)
            .unwrap()
    };
    let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
        (
            b"{not json".to_vec(),
            "application/json",
            400,
            "not valid JSON",
        ),
        (
            b"a: [unclosed".to_vec(),
            "application/yaml",
            400,
            "not valid YAML",
        ),
        (
            br#"{"kind":"Secret","metadata":{"name":"x"}}"#.to_vec(),
            "application/json",
            400,
            "does not match the resource",
        ),
        (
            br#"{"kind":"CiliumNetworkPolicy","metadata":{}}"#.to_vec(),
            "application/json",
            422,
            "metadata.name",
        ),
        (
            br#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"x","labels":{"a":1}}}"#.to_vec(),
            "application/json",
            422,
            "metadata.labels",
        ),
        (
            vec![b' '; 4 * 1024 * 1024],
            "application/json",
            413,
            "larger than",
        ),
    ];
    for (body, ctype, code, needle) in cases {
        let err = client.request_text(post(body, ctype)).await.unwrap_err();
        let (got, _, msg) = api_code(err);
        assert_eq!(got, code, "{msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    // YAML bodies are accepted.
    let yaml = b"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: from-yaml\nspec: {}\n".to_vec();
    client
        .request_text(post(yaml, "application/yaml"))
        .await
        .unwrap();
    assert_eq!(
        srv.server.store.current_rv(),
        rv_before + 1,
        "only the valid object was stored"
    );

    // A wrong token is 401.
    let kc = std::fs::read_to_string(&srv.kubeconfig).unwrap();
    let token = kc
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap();
    let bad = dir.path().join("bad.kubeconfig");
    std::fs::write(&bad, kc.replace(token, "wrong")).unwrap();
    let api: Api<DynamicObject> = Api::all_with(client_from(&bad).await, &cn());
    let (code, _, _) = api_code(api.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(code, 401);
}

async fn client_from(p: &std::path::Path) -> kube::Client {
    client(p).await
}

fn require_kubectl() {
    let ok = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success());
    // A test that could not run is never a pass.
    assert!(
        ok,
        "this test needs kubectl, which is not installed (`cargo xtask setup` says so)"
    );
}

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_works_unchanged() {
    require_kubectl();
    let dir = tempfile::tempdir().unwrap();
    let srv = lab::apiserver::spawn_local(dir.path(), 1000).await.unwrap();
    let kc = srv.kubeconfig.clone();
    let api: Api<DynamicObject> = Api::all_with(client(&kc).await, &cn());
    api.create(&PostParams::default(), &node("node-1", json!({})))
        .await
        .unwrap();

    let run = move |args: Vec<&'static str>| {
        let kc = kc.clone();
        tokio::task::spawn_blocking(move || kubectl(&kc, &args))
    };
    // Discovery, short names and the wide table.
    let (ok, out) = run(vec!["get", "cn", "-o", "wide"]).await.unwrap();
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap();
    for col in ["NAME", "INTERNALIP", "PODCIDRS", "AGE"] {
        assert!(header.contains(col), "{col} missing in {header:?}");
    }
    assert!(
        out.contains("node-1") && out.contains("198.18.0.11"),
        "{out}"
    );

    // Annotate, then the object carries it.
    let (ok, out) = run(vec![
        "annotate",
        "ciliumnode",
        "node-1",
        "network.cilium.io/wg-pub-key=abc",
    ])
    .await
    .unwrap();
    assert!(ok && out.contains("annotated"), "{out}");
    let o = api.get("node-1").await.unwrap();
    assert_eq!(
        o.metadata.annotations.unwrap()["network.cilium.io/wg-pub-key"],
        "abc"
    );

    // Watch sees a change made meanwhile.
    let watch = run(vec![
        "get",
        "ciliumnodes",
        "-w",
        "--request-timeout=4s",
        "-o",
        "json",
        "--output-watch-events",
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p = json!({"metadata": {"labels": {"changed": "yes"}}});
    api.patch("node-1", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .unwrap();
    let (_, out) = watch.await.unwrap();
    assert!(
        out.contains("\"type\":\"ADDED\"")
            && out.contains("\"type\":\"MODIFIED\"")
            && out.contains("\"changed\":\"yes\""),
        "{out}"
    );

    // apply (create, unchanged, configured) and delete of a CiliumNetworkPolicy.
    let f = dir.path().join("cnp.yaml");
    let policy = |port: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: allow-web\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:\n    - ports:\n      - port: \"{port}\"\n        protocol: TCP\n    authentication:\n      mode: required\n"
        )
    };
    std::fs::write(&f, policy("80")).unwrap();
    let fs_ = f.to_str().unwrap().to_string();
    let fstatic: &'static str = Box::leak(fs_.into_boxed_str());
    let (ok, out) = run(vec!["apply", "-f", fstatic]).await.unwrap();
    assert!(ok && out.contains("created"), "{out}");
    let (ok, out) = run(vec!["apply", "-f", fstatic]).await.unwrap();
    assert!(ok && out.contains("unchanged"), "{out}");
    std::fs::write(&f, policy("8080")).unwrap();
    let (ok, out) = run(vec!["apply", "-f", fstatic]).await.unwrap();
    assert!(ok && out.contains("configured"), "{out}");
    let cnps: Api<DynamicObject> =
        Api::namespaced_with(client(&srv.kubeconfig).await, "default", &cnp());
    let o = cnps.get("allow-web").await.unwrap();
    assert_eq!(
        o.data["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"],
        "8080"
    );
    assert_eq!(
        o.data["spec"]["ingress"][0]["authentication"]["mode"],
        "required"
    );
    assert_eq!(o.metadata.generation, Some(2));
    let (ok, out) = run(vec!["delete", "-f", fstatic]).await.unwrap();
    assert!(ok && out.contains("deleted"), "{out}");
    assert!(cnps.get_opt("allow-web").await.unwrap().is_none());

    // Errors come back as Kubernetes Status messages.
    let (ok, out) = run(vec!["get", "cn", "nope"]).await.unwrap();
    assert!(
        !ok && out.contains("NotFound") && out.contains("\"nope\" not found"),
        "{out}"
    );
    let (ok, out) = run(vec!["get", "cn", "-l", "role in (edge"]).await.unwrap();
    assert!(!ok && out.contains("unable to parse requirement"), "{out}");
}
