//! Policies as users write them: every L3/L4 example of the article this project started from,
//! precise errors for malformed objects, and the verdicts compiled entries give.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::BTreeMap;

use policy::compile::reserved;
use policy::{
    CidrIdentities, Compiled, EndpointLabels, IdentityInfo, Policy, PolicyError, compile,
    parse_documents,
};

const TCP: u8 = 6;
const UDP: u8 = 17;

fn one(text: &str) -> Result<Policy, PolicyError> {
    let mut docs = parse_documents(text, "test.yaml");
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

fn article(name: &str) -> Policy {
    let path = format!("{}/tests/article/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    one(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn identity(id: u32, ns: &str, pairs: &[(&str, &str)]) -> IdentityInfo {
    let mut l = labels(pairs);
    l.insert("io.kubernetes.pod.namespace".into(), ns.into());
    IdentityInfo { id, labels: l }
}

fn endpoint(ns: &str, pairs: &[(&str, &str)]) -> EndpointLabels {
    EndpointLabels {
        namespace: ns.into(),
        labels: labels(pairs),
    }
}

fn compile_for(policies: &[Policy], ep: &EndpointLabels, ids: &[IdentityInfo]) -> Compiled {
    compile(policies, ep, ids, &CidrIdentities::for_policies(policies))
}

#[test]
fn every_article_example_validates_and_compiles() {
    let dir = format!("{}/tests/article", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let docs = parse_documents(
            &std::fs::read_to_string(&p).unwrap(),
            &p.display().to_string(),
        );
        for d in docs {
            let policy = d.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let ep = endpoint(
                policy.namespace.as_deref().unwrap_or("default"),
                &[("app", "x")],
            );
            compile_for(std::slice::from_ref(&policy), &ep, &[]);
            n += 1;
        }
    }
    assert_eq!(n, 10, "the article has ten policy examples");
}

#[test]
fn mtls_required_marks_the_entry_for_authentication() {
    let p = article("mtls-required");
    assert!(p.unsupported.is_empty(), "{:?}", p.unsupported);
    let ids = [
        identity(300, "secure-namespace", &[("app", "trusted-client")]),
        identity(301, "secure-namespace", &[("app", "other")]),
    ];
    let c = compile_for(
        &[p],
        &endpoint("secure-namespace", &[("app", "secure-service")]),
        &ids,
    );
    assert!(c.ingress_enforced && !c.egress_enforced);
    let v = c.lookup(300, false, TCP, 443).unwrap();
    assert_eq!((v.deny, v.auth_type), (false, 1 | 0x80));
    assert!(!c.allows(300, false, TCP, 444), "another port");
    assert!(!c.allows(301, false, TCP, 443), "another client");
    assert!(c.allows(301, true, UDP, 53), "egress is not enforced");
}

#[test]
fn kubernetes_network_policy_from_the_article() {
    let p = article("api-allow");
    let ids = [
        identity(300, "production", &[("role", "frontend")]),
        identity(301, "production", &[("app", "database")]),
        identity(302, "staging", &[("role", "frontend")]),
    ];
    let c = compile_for(
        &[p],
        &endpoint("production", &[("app", "api-server")]),
        &ids,
    );
    assert!(c.allows(300, false, TCP, 8080));
    assert!(!c.allows(300, false, UDP, 8080), "protocol defaults to TCP");
    assert!(
        !c.allows(302, false, TCP, 8080),
        "podSelector is scoped to the policy's namespace"
    );
    assert!(c.allows(301, true, TCP, 5432));
    assert!(!c.allows(300, true, TCP, 5432));
    let other = compile_for(
        &[article("api-allow")],
        &endpoint("production", &[("app", "web")]),
        &ids,
    );
    assert!(
        !other.ingress_enforced && other.allows(302, false, TCP, 1),
        "an endpoint no policy selects allows all"
    );
}

#[test]
fn entities_namespaces_and_clusterwide_rules() {
    let ids = [
        identity(300, "trusted-namespace", &[("role", "internal-service")]),
        identity(301, "other", &[("role", "internal-service")]),
    ];
    let c = compile_for(
        &[article("identity-based-policy")],
        &endpoint("default", &[("app", "backend")]),
        &ids,
    );
    assert!(
        c.allows(300, false, TCP, 1234),
        "names its namespace explicitly"
    );
    assert!(c.allows(301, false, TCP, 1234), "fromEntities: cluster");
    assert!(
        c.allows(reserved::HOST, false, TCP, 1) && c.allows(reserved::REMOTE_NODE, false, TCP, 1)
    );
    assert!(
        !c.allows(reserved::WORLD, false, TCP, 80),
        "world is not in the cluster"
    );

    // A clusterwide policy with `endpointSelector: {}` selects endpoints in every namespace.
    let c = compile_for(&[article("default-deny")], &endpoint("anything", &[]), &ids);
    assert!(c.ingress_enforced && c.egress_enforced);
    assert!(c.allows(301, true, UDP, 53) && !c.allows(reserved::WORLD, true, TCP, 443));
}

#[test]
fn l7_fqdn_and_service_rules_are_reported_and_never_widen_access() {
    let p = article("http-policy");
    assert!(
        p.unsupported
            .iter()
            .any(|u| u.field == "spec.ingress[0].toPorts[0].rules"),
        "{:?}",
        p.unsupported
    );
    assert_eq!(
        p.unsupported[0].object,
        "CiliumNetworkPolicy production/http-policy"
    );
    let ids = [identity(300, "production", &[("app", "frontend")])];
    let c = compile_for(&[p], &endpoint("production", &[("app", "web-api")]), &ids);
    assert!(c.ingress_enforced);
    assert!(
        !c.allows(300, false, TCP, 80),
        "an L7-restricted port is not opened at L4"
    );

    let p = article("dns-policy");
    let fields: Vec<&str> = p.unsupported.iter().map(|u| u.field.as_str()).collect();
    assert!(
        fields.contains(&"spec.egress[0].toPorts[0].rules")
            && fields.contains(&"spec.egress[1].toFQDNs"),
        "{fields:?}"
    );
    let c = compile_for(
        &[p],
        &endpoint("production", &[("app", "external-client")]),
        &[],
    );
    assert!(c.egress_enforced && !c.allows(reserved::WORLD, true, TCP, 443));

    let p = article("secure-api-policy");
    let ids = [identity(300, "production", &[("app", "database")])];
    let c = compile_for(
        &[p],
        &endpoint("production", &[("app", "api-server")]),
        &ids,
    );
    assert!(
        c.allows(300, true, TCP, 5432),
        "the supported egress rule still applies"
    );
}

#[test]
fn deny_wins_ports_ranges_protocols_and_cidrs() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mix, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8000", endPort: 8003, protocol: TCP}, {port: "53", protocol: ANY}]}]
  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8002", protocol: TCP}]}]
  egress:
  - toEntities: [all]
"#;
    let p = one(text).unwrap();
    let ids = [identity(300, "prod", &[("app", "client")])];
    let cidrs = CidrIdentities::for_policies(std::slice::from_ref(&p));
    let c = compile(&[p], &endpoint("prod", &[("app", "web")]), &ids, &cidrs);
    for port in [8000, 8001, 8003] {
        assert!(c.allows(300, false, TCP, port), "port {port} in the range");
    }
    assert!(!c.allows(300, false, TCP, 8002), "deny wins over allow");
    assert!(!c.allows(300, false, TCP, 8004));
    assert!(
        c.allows(300, false, UDP, 53) && c.allows(300, false, 132, 53),
        "ANY covers TCP, UDP, SCTP"
    );
    let ten = *cidrs
        .prefixes()
        .find(|(n, _)| n.to_string() == "10.0.0.0/8")
        .unwrap()
        .1;
    let svc = *cidrs
        .prefixes()
        .find(|(n, _)| n.to_string() == "10.96.0.0/12")
        .unwrap()
        .1;
    assert!(ten >= policy::compile::LOCAL_IDENTITY_BASE);
    assert!(c.allows(ten, false, TCP, 22));
    assert!(
        !c.allows(svc, false, TCP, 22),
        "the excepted prefix has an identity no rule names"
    );
    assert!(c.allows(reserved::WORLD, true, TCP, 1), "toEntities: all");
    let deny = c.entries.iter().find(|(_, v)| v.deny).unwrap().0;
    assert_eq!(
        (deny.identity, deny.proto, deny.dport, deny.prefix_len()),
        (300, TCP, 8002, 64)
    );
}

#[test]
fn cnp_peer_selectors_are_scoped_to_the_policy_namespace() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n";
    let ids = [identity(300, "a", &[]), identity(301, "b", &[])];
    let c = compile_for(&[one(text).unwrap()], &endpoint("a", &[]), &ids);
    assert!(c.allows(300, false, TCP, 1) && !c.allows(301, false, TCP, 1));
    let c = compile_for(&[one(text).unwrap()], &endpoint("b", &[]), &ids);
    assert!(
        !c.ingress_enforced,
        "a CNP selects endpoints of its own namespace only"
    );
}

#[test]
fn malformed_policies_get_errors_naming_object_and_field() {
    let cnp = |spec: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bad, namespace: prod}}\nspec:\n{spec}"
        )
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (cnp("  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"70000\"}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].port", "not a port number"),
        (cnp("  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"90\", endPort: 80}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].endPort", "below port 90"),
        (cnp("  endpointSelector: {}\n  ingres: []\n"), "spec.ingres", "unknown field `ingres`"),
        (cnp("  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.0/33]\n"), "spec.egress[0].toCIDR[0]", "not a CIDR"),
        (cnp("  endpointSelector: {}\n  ingress:\n  - fromCIDRSet: [{cidr: 10.0.0.0/16, except: [10.1.0.0/24]}]\n"), "spec.ingress[0].fromCIDRSet[0].except[0]", "not inside"),
        (cnp("  ingress: [{}]\n"), "spec.endpointSelector", "Required value"),
        (cnp("  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TCPX}]}]\n"), "spec.ingress[0].toPorts[0].ports[0].protocol", "unknown variant"),
        (cnp("  endpointSelector: {matchExpressions: [{key: a, operator: Like}]}\n"), "spec.endpointSelector.matchExpressions[0].operator", "unknown variant"),
        (cnp("  endpointSelector: {}\n  ingress:\n  - fromEntities: [galaxy]\n"), "spec.ingress[0].fromEntities[0]", "unknown variant"),
        (cnp("  endpointSelector: {}\n  ingress:\n  - authentication: {mode: sometimes}\n"), "spec.ingress[0].authentication.mode", "unknown variant"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {namespace: prod}\nspec: {endpointSelector: {}}\n".into(), "metadata.name", "Required"),
        ("apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec: {endpointSelector: {}}\n".into(), "apiVersion", "cilium.io/v2"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\n".into(), "kind", "not a policy kind"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\n".into(), "spec", "Required"),
        ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n".into(), "spec.ingress[0].from[0]", "cannot be combined"),
        ("a: [unclosed".into(), "(document)", "not valid YAML"),
    ];
    for (text, field, needle) in cases {
        let e = one(&text).expect_err(&text);
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(needle), "{needle:?} not in {e}");
        assert!(e.to_string().starts_with(&e.object));
    }
    let e = one(&cnp(
        "  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"70000\"}]}]\n",
    ))
    .unwrap_err();
    assert_eq!(e.object, "CiliumNetworkPolicy prod/bad");
}

#[test]
fn multi_document_files_and_unsupported_fail_closed_parts() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromRequires: [{matchLabels: {env: prod}}]\n---\n\
apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b}\nspec:\n  endpointSelector: {}\n  egressDeny:\n  - toFQDNs: [{matchName: example.com}]\n";
    let docs: Vec<Policy> = parse_documents(text, "t.yaml")
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(docs.len(), 2);
    let c = compile_for(
        &docs[..1],
        &endpoint("default", &[]),
        &[identity(300, "default", &[("env", "prod")])],
    );
    assert!(
        !c.allows(300, false, TCP, 1),
        "unsupported fromRequires denies instead of ignoring the requirement"
    );
    assert!(
        docs[1]
            .unsupported
            .iter()
            .any(|u| u.field == "spec.egressDeny[0].toFQDNs")
    );
    let c = compile_for(&docs[1..], &endpoint("default", &[]), &[]);
    assert!(
        !c.allows(reserved::WORLD, true, TCP, 443),
        "a deny rule that cannot be honoured exactly denies more"
    );
}

#[test]
fn a_syntax_error_ends_the_file_with_one_error() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec: {endpointSelector: {}}\n---\nspec:\n  x: 1\n  1. not yaml\n";
    let docs = parse_documents(text, "t.yaml");
    assert_eq!(docs.len(), 2);
    assert!(docs[0].is_ok());
    assert_eq!(docs[1].as_ref().unwrap_err().field, "(document)");
}

fn cidr_id(cidrs: &CidrIdentities, net: &str) -> u32 {
    cidrs
        .get(&net.parse().unwrap())
        .unwrap_or_else(|| panic!("{net} has no identity"))
}

#[test]
fn a_cidr_selects_the_more_specific_prefixes_other_policies_introduce() {
    // The ipcache resolves 10.1.2.3 to the longest prefix any policy names (10.1.0.0/16,
    // from the second policy); the first policy's /8 must still allow it, and its `except`
    // must keep excluding what lies inside the excepted prefix.
    let wide = one("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: wide, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]\n").unwrap();
    let narrow = one("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: narrow, namespace: prod}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  egress:\n  - toCIDR: [10.1.0.0/16, 10.97.0.0/16]\n  - toEntities: [world]\n").unwrap();
    let policies = [wide, narrow];
    let cidrs = CidrIdentities::for_policies(&policies);
    let web = compile(&policies, &endpoint("prod", &[("app", "web")]), &[], &cidrs);
    let db = compile(&policies, &endpoint("prod", &[("app", "db")]), &[], &cidrs);
    let (ten, one_six, svc, inside_svc) = (
        cidr_id(&cidrs, "10.0.0.0/8"),
        cidr_id(&cidrs, "10.1.0.0/16"),
        cidr_id(&cidrs, "10.96.0.0/12"),
        cidr_id(&cidrs, "10.97.0.0/16"),
    );
    assert!(web.allows(ten, true, TCP, 443) && web.allows(one_six, true, TCP, 443));
    assert!(!web.allows(svc, true, TCP, 443), "the except");
    assert!(
        !web.allows(inside_svc, true, TCP, 443),
        "a prefix inside the except stays excluded"
    );
    assert!(!web.allows(reserved::WORLD, true, TCP, 443));
    for id in [reserved::WORLD, ten, one_six, svc, inside_svc] {
        assert!(
            db.allows(id, true, UDP, 53),
            "toEntities: world covers CIDR identity {id}"
        );
    }
}

#[test]
fn cidr_identities_are_stable_and_forgotten_when_no_policy_names_them() {
    let a = one("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a, namespace: prod}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [198.51.100.0/24]\n").unwrap();
    let b = one("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b, namespace: prod}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [203.0.113.0/24]\n").unwrap();
    let mut cidrs = CidrIdentities::default();
    cidrs.update(&[a.clone(), b.clone()]);
    let (ida, idb) = (
        cidr_id(&cidrs, "198.51.100.0/24"),
        cidr_id(&cidrs, "203.0.113.0/24"),
    );
    assert_ne!(ida, idb);
    cidrs.update(std::slice::from_ref(&b));
    assert_eq!(
        cidrs.prefixes().count(),
        1,
        "a's prefix is gone from the ipcache set"
    );
    assert_eq!(
        cidr_id(&cidrs, "203.0.113.0/24"),
        idb,
        "b keeps its identity"
    );
    cidrs.update(&[a, b]);
    let again = cidr_id(&cidrs, "198.51.100.0/24");
    assert!(
        again != ida && again != idb,
        "a forgotten number is not reused"
    );
}

#[test]
fn deny_wins_even_when_the_allow_entry_is_more_specific() {
    // The kernel takes the longest prefix: without care, "allow client on 8080" (64 bits)
    // would beat "deny client on every port" (40 bits) and "deny TCP 8000-8015" (60 bits).
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}, {port: \"8001\", protocol: TCP}, {port: \"9000\", protocol: TCP}]}]\n  - fromEndpoints: [{matchLabels: {app: other}}]\n    toPorts: [{ports: [{port: \"9000\", protocol: TCP}]}]\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8000\", endPort: 8015, protocol: TCP}]}]\n  - fromEntities: [all]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n";
    let ids = [
        identity(300, "prod", &[("app", "client")]),
        identity(301, "prod", &[("app", "other")]),
    ];
    let c = compile_for(&[one(text).unwrap()], &endpoint("prod", &[]), &ids);
    assert!(!c.allows(300, false, TCP, 8080), "denied for everyone");
    assert!(!c.allows(300, false, TCP, 8001), "inside the denied range");
    assert!(c.allows(300, false, TCP, 9000));
    assert!(c.allows(301, false, TCP, 9000));
    // What the kernel holds: the covered allow entries became deny entries.
    let k = |port| {
        c.entries
            .iter()
            .find(|(k, _)| k.identity == 300 && k.dport == port && k.port_prefix == 16)
            .map(|(_, v)| v.deny)
    };
    assert_eq!(
        (k(8080), k(8001), k(9000)),
        (Some(true), Some(true), Some(false))
    );
}
