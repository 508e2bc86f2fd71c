//! The resource types the lab API server serves, with the discovery data and table columns that
//! `kubectl get` shows for them (the same columns as Cilium's CRDs, plus meshd's `-o wide` ones).

use serde_json::{Value, json};

/// One printer column: its header, priority (1 = only with `-o wide`) and how to read the cell.
pub struct Column {
    pub name: &'static str,
    pub priority: u8,
    pub cell: fn(&Value) -> String,
}

pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Custom resources refuse unconditional updates and strategic-merge patches, as
    /// Kubernetes does for CRD-backed types.
    pub custom: bool,
    pub columns: &'static [Column],
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `ciliumnodes.cilium.io` or `namespaces`, as Kubernetes names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn discovery(&self) -> Value {
        json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
            "categories": if self.group == "cilium.io" { vec!["cilium"] } else { vec![] },
        })
    }
}

fn s(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return "<none>".into(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".into(),
        other => other.to_string(),
    }
}

fn node_address(v: &Value, kind: &str) -> String {
    v.pointer("/spec/addresses")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|a| a.get("type").and_then(Value::as_str) == Some(kind))
        })
        .and_then(|a| a.get("ip").and_then(Value::as_str))
        .unwrap_or("<none>")
        .to_string()
}

fn joined(v: &Value, pointer: &str) -> String {
    match v.pointer(pointer).and_then(Value::as_array) {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        _ => "<none>".into(),
    }
}

fn annotation(v: &Value, key: &str) -> String {
    v.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
        .unwrap_or("<none>")
        .to_string()
}

const CILIUM_NODE_COLUMNS: &[Column] = &[
    Column {
        name: "CiliumInternalIP",
        priority: 0,
        cell: |v| node_address(v, "CiliumInternalIP"),
    },
    Column {
        name: "InternalIP",
        priority: 0,
        cell: |v| node_address(v, "InternalIP"),
    },
    Column {
        name: "PodCIDRs",
        priority: 1,
        cell: |v| joined(v, "/spec/ipam/podCIDRs"),
    },
    Column {
        name: "EncryptKey",
        priority: 1,
        cell: |v| s(v, &["spec", "encryption", "key"]),
    },
    Column {
        name: "WireGuardPubKey",
        priority: 1,
        cell: |v| annotation(v, "network.cilium.io/wg-pub-key"),
    },
];

const CILIUM_ENDPOINT_COLUMNS: &[Column] = &[
    Column {
        name: "Security Identity",
        priority: 0,
        cell: |v| s(v, &["status", "identity", "id"]),
    },
    Column {
        name: "Endpoint State",
        priority: 0,
        cell: |v| s(v, &["status", "state"]),
    },
    Column {
        name: "IPv4",
        priority: 0,
        cell: |v| {
            v.pointer("/status/networking/addressing/0/ipv4")
                .and_then(Value::as_str)
                .unwrap_or("<none>")
                .to_string()
        },
    },
    Column {
        name: "Node",
        priority: 1,
        cell: |v| s(v, &["status", "networking", "node"]),
    },
];

const CILIUM_IDENTITY_COLUMNS: &[Column] = &[Column {
    name: "Namespace",
    priority: 0,
    cell: |v| s(v, &["security-labels", "k8s:io.kubernetes.pod.namespace"]),
}];

const NAMESPACE_COLUMNS: &[Column] = &[Column {
    name: "Status",
    priority: 0,
    cell: |v| s(v, &["status", "phase"]),
}];

const SECRET_COLUMNS: &[Column] = &[
    Column {
        name: "Type",
        priority: 0,
        cell: |v| s(v, &["type"]),
    },
    Column {
        name: "Data",
        priority: 0,
        cell: |v| {
            v.get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                .to_string()
        },
    },
];

const NETWORK_POLICY_COLUMNS: &[Column] = &[Column {
    name: "Pod-Selector",
    priority: 0,
    cell: |v| match v
        .pointer("/spec/podSelector/matchLabels")
        .and_then(Value::as_object)
    {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        _ => "<none>".into(),
    },
}];

pub static RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        namespaced: false,
        short_names: &["ns"],
        custom: false,
        columns: NAMESPACE_COLUMNS,
    },
    ResourceType {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        singular: "secret",
        namespaced: true,
        short_names: &[],
        custom: false,
        columns: SECRET_COLUMNS,
    },
    ResourceType {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        singular: "networkpolicy",
        namespaced: true,
        short_names: &["netpol"],
        custom: false,
        columns: NETWORK_POLICY_COLUMNS,
    },
    ResourceType {
        group: "cilium.io",
        version: "v2",
        kind: "CiliumNode",
        plural: "ciliumnodes",
        singular: "ciliumnode",
        namespaced: false,
        short_names: &["cn", "ciliumn"],
        custom: true,
        columns: CILIUM_NODE_COLUMNS,
    },
    ResourceType {
        group: "cilium.io",
        version: "v2",
        kind: "CiliumIdentity",
        plural: "ciliumidentities",
        singular: "ciliumidentity",
        namespaced: false,
        short_names: &["ciliumid"],
        custom: true,
        columns: CILIUM_IDENTITY_COLUMNS,
    },
    ResourceType {
        group: "cilium.io",
        version: "v2",
        kind: "CiliumEndpoint",
        plural: "ciliumendpoints",
        singular: "ciliumendpoint",
        namespaced: true,
        short_names: &["cep", "ciliumep"],
        custom: true,
        columns: CILIUM_ENDPOINT_COLUMNS,
    },
    ResourceType {
        group: "cilium.io",
        version: "v2",
        kind: "CiliumNetworkPolicy",
        plural: "ciliumnetworkpolicies",
        singular: "ciliumnetworkpolicy",
        namespaced: true,
        short_names: &["cnp", "ciliumnp"],
        custom: true,
        columns: &[],
    },
    ResourceType {
        group: "cilium.io",
        version: "v2",
        kind: "CiliumClusterwideNetworkPolicy",
        plural: "ciliumclusterwidenetworkpolicies",
        singular: "ciliumclusterwidenetworkpolicy",
        namespaced: false,
        short_names: &["ccnp"],
        custom: true,
        columns: &[],
    },
];

/// Index into [`RESOURCES`]; the store keys objects by it.
pub type ResourceId = usize;

pub fn find(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn get(id: ResourceId) -> &'static ResourceType {
    &RESOURCES[id]
}

/// Groups in discovery order, each with its one version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}
