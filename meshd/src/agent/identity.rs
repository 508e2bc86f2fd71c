//! Security identities, allocated the Cilium CRD way: an endpoint's security-relevant labels
//! map to a CiliumIdentity (found by its labels, else created with the lowest free id ≥ 256,
//! retrying when another node took that id first), and each local endpoint is published as a
//! CiliumEndpoint that every agent can read.

use std::collections::BTreeMap;

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use meshd_api::EndpointSpec;
use serde_json::{Value, json};

pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// The first identity a cluster endpoint can get; below are the reserved ones.
pub const MIN_CLUSTER_IDENTITY: u32 = 256;
/// CiliumEndpoints this node publishes carry this label, so it can find (and clean up) its own.
pub const NODE_LABEL: &str = "meshd.io/node";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn identity_resource() -> ApiResource {
    resource("CiliumIdentity", "ciliumidentities")
}

pub fn endpoint_resource() -> ApiResource {
    resource("CiliumEndpoint", "ciliumendpoints")
}

/// `k8s:`-sourced security labels, namespace included, as Cilium writes them.
pub fn security_labels(ep: &EndpointSpec) -> BTreeMap<String, String> {
    ep.labels
        .iter()
        .map(|(k, v)| (format!("k8s:{k}"), v.clone()))
        .chain(std::iter::once((
            format!("k8s:{NAMESPACE_LABEL}"),
            ep.namespace.clone(),
        )))
        .collect()
}

fn labels_of(obj: &DynamicObject) -> Option<BTreeMap<String, String>> {
    serde_json::from_value(obj.data.get("security-labels")?.clone()).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("talking to the API server about CiliumIdentities: {0}")]
    Kube(#[from] kube::Error),
    #[error("no free identity after {0} attempts (other agents keep taking them); will retry")]
    Exhausted(usize),
}

/// Finds the identity for `labels`, or allocates one.
pub async fn allocate(
    api: &Api<DynamicObject>,
    labels: &BTreeMap<String, String>,
) -> Result<u32, IdentityError> {
    const ATTEMPTS: usize = 8;
    for _ in 0..ATTEMPTS {
        let list = api.list(&ListParams::default()).await?;
        let mut taken = std::collections::BTreeSet::new();
        let mut found: Option<u32> = None;
        for o in &list.items {
            let Some(id) = o
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            taken.insert(id);
            if labels_of(o).as_ref() == Some(labels) {
                // Two agents may have raced for the same labels: the lowest id wins everywhere.
                found = Some(found.map_or(id, |f| f.min(id)));
            }
        }
        if let Some(id) = found {
            return Ok(id);
        }
        let id = (MIN_CLUSTER_IDENTITY..)
            .find(|i| !taken.contains(i))
            .unwrap_or(MIN_CLUSTER_IDENTITY);
        let mut obj = DynamicObject::new(&id.to_string(), &identity_resource());
        obj.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.trim_start_matches("k8s:").to_string(), v.clone()))
                .collect(),
        );
        obj.data = json!({"security-labels": labels});
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {
                tracing::info!(identity = id, ?labels, "allocated a security identity");
                return Ok(id);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(IdentityError::Exhausted(ATTEMPTS))
}

/// The CiliumEndpoint object of a local endpoint.
pub fn cilium_endpoint(
    ep: &EndpointSpec,
    identity: u32,
    labels: &BTreeMap<String, String>,
    node: &str,
    node_ip: &str,
    encrypt_key: u8,
) -> DynamicObject {
    let mut obj = DynamicObject::new(&ep.name, &endpoint_resource()).within(&ep.namespace);
    obj.metadata.labels = Some(BTreeMap::from([(NODE_LABEL.to_string(), node.to_string())]));
    let addressing: Vec<Value> = ep
        .addresses
        .iter()
        .map(|a| {
            if a.is_ipv4() {
                json!({"ipv4": a.to_string()})
            } else {
                json!({"ipv6": a.to_string()})
            }
        })
        .collect();
    obj.data = json!({
        "status": {
            "identity": {"id": identity, "labels": labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()},
            "networking": {"addressing": addressing, "node": node_ip},
            "encryption": {"key": encrypt_key},
            "state": "ready",
        }
    });
    obj
}

/// Creates or updates a CiliumEndpoint (only when it differs).
pub async fn publish_endpoint(
    client: &kube::Client,
    obj: &DynamicObject,
) -> Result<(), kube::Error> {
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &endpoint_resource());
    match api.get_opt(&name).await? {
        Some(cur)
            if cur.data.get("status") == obj.data.get("status")
                && cur.metadata.labels == obj.metadata.labels =>
        {
            Ok(())
        }
        Some(_) => {
            let patch =
                json!({"metadata": {"labels": obj.metadata.labels}, "status": obj.data["status"]});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        None => match api.create(&PostParams::default(), obj).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// Deletes this node's CiliumEndpoints that no local endpoint backs any more.
pub async fn remove_stale_endpoints(
    client: &kube::Client,
    node: &str,
    keep: &[(String, String)],
) -> Result<usize, kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &endpoint_resource());
    let mine = api
        .list(&ListParams::default().labels(&format!("{NODE_LABEL}={node}")))
        .await?;
    let mut removed = 0;
    for o in mine.items {
        let key = (
            o.metadata.namespace.clone().unwrap_or_default(),
            o.metadata.name.clone().unwrap_or_default(),
        );
        if keep.contains(&key) {
            continue;
        }
        let nsapi: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &key.0, &endpoint_resource());
        match nsapi.delete(&key.1, &DeleteParams::default()).await {
            Ok(_) => removed += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
        tracing::info!(endpoint = %format!("{}/{}", key.0, key.1), "CiliumEndpoint removed");
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_labels_carry_the_namespace_and_source() {
        let ep = EndpointSpec {
            name: "web-1".into(),
            namespace: "prod".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            interface: "lxc1".into(),
            addresses: vec!["198.19.1.10".parse().unwrap()],
            identity: None,
        };
        let l = security_labels(&ep);
        assert_eq!(l.get("k8s:app").map(String::as_str), Some("web"));
        assert_eq!(
            l.get("k8s:io.kubernetes.pod.namespace").map(String::as_str),
            Some("prod")
        );
        let cep = cilium_endpoint(&ep, 300, &l, "node-1", "198.18.0.11", 255);
        assert_eq!(cep.data["status"]["identity"]["id"], 300);
        assert_eq!(
            cep.data["status"]["networking"]["addressing"][0]["ipv4"],
            "198.19.1.10"
        );
        assert_eq!(cep.metadata.namespace.as_deref(), Some("prod"));
    }
}
