//! The agent's policy concern: every CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and
//! NetworkPolicy, checked as it arrives (a malformed update is reported and the last good
//! version stays in force), the identities they select from, and the compiled entries of each
//! local endpoint, which the eBPF datapath (`enforce`) puts into the kernel. Each kind has its
//! own watcher and source; one loop compiles from their snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;

use meshd_api::EndpointSpec;

use kube::api::{Api, ApiResource, DynamicObject};
use policy::{CidrIdentities, Compiled, EndpointLabels, IdentityInfo, Policy, PolicyError};
use serde::Serialize;
use tracing::{info, warn};

use super::AgentError;
use super::state::{Reader, Watched, Writer, any_change};
use super::watch::{Event, Watcher};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[allow(
    clippy::enum_variant_names,
    reason = "these are the Kubernetes kinds' own names"
)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

impl PolicyKind {
    pub fn kind(self) -> &'static str {
        match self {
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Self::NetworkPolicy => "NetworkPolicy",
        }
    }

    pub fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Self::CiliumNetworkPolicy => (
                "cilium.io",
                "v2",
                "CiliumNetworkPolicy",
                "ciliumnetworkpolicies",
            ),
            Self::CiliumClusterwideNetworkPolicy => (
                "cilium.io",
                "v2",
                "CiliumClusterwideNetworkPolicy",
                "ciliumclusterwidenetworkpolicies",
            ),
            Self::NetworkPolicy => (
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
            ),
        };
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: kind.into(),
            plural: plural.into(),
        }
    }
}

pub type PolicyRef = (PolicyKind, String, String);

/// One policy object as the agent holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// What is in force: the latest good version.
    pub good: Option<Policy>,
    /// Why the latest version was refused, if it was.
    pub error: Option<PolicyError>,
}

/// One policy kind's objects, as its watcher last listed and watched them. Written by that
/// watcher alone.
#[derive(Debug, Clone, Default)]
pub struct PolicySource {
    pub objects: BTreeMap<(String, String), Entry>,
    /// Listed at least once.
    pub synced: bool,
}

impl PolicySource {
    fn apply(&mut self, kind: PolicyKind, obj: &DynamicObject) {
        let ns = obj.metadata.namespace.clone().unwrap_or_default();
        let name = obj.metadata.name.clone().unwrap_or_default();
        let origin = format!("{kind:?} {ns}/{name}");
        let value = match serde_json::to_value(obj) {
            Ok(v) => v,
            Err(e) => {
                warn!(object = %origin, error = %e, "a policy object could not be read");
                return;
            }
        };
        let entry = self.objects.entry((ns, name)).or_insert(Entry {
            good: None,
            error: None,
        });
        match policy::parse_object(value, &origin) {
            Ok(p) => {
                for u in &p.unsupported {
                    warn!(object = %u.object, field = %u.field, reason = %u.reason, "policy field not enforced");
                }
                entry.good = Some(p);
                entry.error = None;
            }
            Err(e) => {
                warn!(object = %origin, field = %e.field, error = %e, kept_previous = entry.good.is_some(), "refusing a policy object; the last good version stays in force");
                entry.error = Some(e);
            }
        }
    }

    fn delete(&mut self, obj: &DynamicObject) {
        self.objects.remove(&(
            obj.metadata.namespace.clone().unwrap_or_default(),
            obj.metadata.name.clone().unwrap_or_default(),
        ));
    }
}

/// CiliumIdentities (the peers policies select). Written by the identity watcher alone.
#[derive(Debug, Clone, Default)]
pub struct IdentitySource {
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub synced: bool,
}

/// What the policy concern hands the datapath: every object with its state, and what each
/// local endpoint's policy maps should hold. Written by the recompile loop alone.
#[derive(Debug, Clone, Default)]
pub struct PolicyView {
    pub objects: BTreeMap<PolicyRef, Entry>,
    /// Per local endpoint (namespace, name): what its policy maps should hold.
    pub compiled: BTreeMap<(String, String), Compiled>,
    pub cidrs: CidrIdentities,
    /// The sources not listed yet (nothing is enforced from a partial view).
    pub unsynced: Vec<&'static str>,
}

/// Compiles every local endpoint (pure: the same inputs give the same entries).
pub fn compile(
    sources: &[(PolicyKind, Arc<PolicySource>)],
    identities: &IdentitySource,
    endpoints: &[EndpointSpec],
    previous_cidrs: &CidrIdentities,
) -> PolicyView {
    let mut objects = BTreeMap::new();
    let mut unsynced = Vec::new();
    for (kind, src) in sources {
        if !src.synced {
            unsynced.push(kind.kind());
        }
        for ((ns, name), e) in &src.objects {
            objects.insert((*kind, ns.clone(), name.clone()), e.clone());
        }
    }
    if !identities.synced {
        unsynced.push("CiliumIdentity");
    }
    let policies: Vec<Policy> = objects.values().filter_map(|e| e.good.clone()).collect();
    let ids: Vec<IdentityInfo> = identities.identities.values().cloned().collect();
    let mut cidrs = previous_cidrs.clone();
    cidrs.update(&policies);
    let compiled = endpoints
        .iter()
        .map(|e| {
            let labels = EndpointLabels {
                namespace: e.namespace.clone(),
                labels: e.labels.clone(),
            };
            (
                (e.namespace.clone(), e.name.clone()),
                policy::compile(&policies, &labels, &ids, &cidrs),
            )
        })
        .collect();
    PolicyView {
        objects,
        compiled,
        cidrs,
        unsynced,
    }
}

fn identity_from(obj: &DynamicObject) -> Option<IdentityInfo> {
    let id = obj.metadata.name.as_deref()?.parse::<u32>().ok()?;
    let labels: BTreeMap<String, String> =
        serde_json::from_value(obj.data.get("security-labels")?.clone()).ok()?;
    Some(IdentityInfo {
        id,
        labels: labels
            .into_iter()
            .map(|(k, v)| (policy::selector::plain_key(&k).to_string(), v))
            .collect(),
    })
}

/// Watches one policy kind into its source.
pub async fn watch_policies(
    client: kube::Client,
    kind: PolicyKind,
    out: Writer<PolicySource>,
) -> Result<(), AgentError> {
    let api: Api<DynamicObject> = Api::all_with(client, &kind.resource());
    let mut watch = Watcher::new(api);
    let mut fresh: Option<PolicySource> = None;
    loop {
        let ev = watch.next_or_end(kind.kind(), |_| ()).await?;
        match ev {
            Event::Init => fresh = Some(PolicySource::default()),
            Event::InitApply(o) => fresh
                .get_or_insert_with(PolicySource::default)
                .apply(kind, &o),
            Event::InitDone => {
                let mut src = fresh.take().unwrap_or_default();
                src.synced = true;
                out.set(src);
            }
            Event::Apply(o) => {
                info!(
                    kind = kind.kind(),
                    name = o.metadata.name.as_deref().unwrap_or(""),
                    "policy changed"
                );
                out.update(|s| {
                    s.apply(kind, &o);
                    true
                });
            }
            Event::Delete(o) => {
                info!(
                    kind = kind.kind(),
                    name = o.metadata.name.as_deref().unwrap_or(""),
                    "policy deleted"
                );
                out.update(|s| {
                    s.delete(&o);
                    true
                });
            }
        }
    }
}

/// Watches CiliumIdentities into their source.
pub async fn watch_identities(
    client: kube::Client,
    out: Writer<IdentitySource>,
) -> Result<(), AgentError> {
    let api: Api<DynamicObject> = Api::all_with(client, &super::identity::identity_resource());
    let mut watch = Watcher::new(api);
    let mut fresh: Option<BTreeMap<u32, IdentityInfo>> = None;
    loop {
        let ev = watch.next_or_end("CiliumIdentity", |_| ()).await?;
        match ev {
            Event::Init => fresh = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                if let Some(i) = identity_from(&o) {
                    fresh.get_or_insert_with(BTreeMap::new).insert(i.id, i);
                }
            }
            Event::InitDone => out.set(IdentitySource {
                identities: fresh.take().unwrap_or_default(),
                synced: true,
            }),
            Event::Apply(o) => {
                if let Some(i) = identity_from(&o) {
                    out.update(|s| s.identities.insert(i.id, i.clone()).as_ref() != Some(&i));
                }
            }
            Event::Delete(o) => {
                if let Some(id) = o
                    .metadata
                    .name
                    .as_deref()
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    out.update(|s| s.identities.remove(&id).is_some());
                }
            }
        }
    }
}

/// Recompiles the local endpoints' entries whenever policies, identities or endpoints change.
pub async fn recompile_loop(
    mut sources: Vec<(PolicyKind, Reader<PolicySource>)>,
    mut identities: Reader<IdentitySource>,
    mut endpoints: Reader<Vec<EndpointSpec>>,
    out: Writer<PolicyView>,
) -> Result<(), AgentError> {
    loop {
        let snapshot: Vec<(PolicyKind, Arc<PolicySource>)> =
            sources.iter_mut().map(|(k, r)| (*k, r.get())).collect();
        let ids = identities.get();
        let eps = endpoints.get();
        let previous = out.current();
        // Compiled with no lock held: the inputs are snapshots.
        let view = compile(&snapshot, &ids, &eps, &previous.cidrs);
        out.set(view);
        let mut watched: Vec<&mut dyn Watched> = vec![&mut identities, &mut endpoints];
        for (_, r) in sources.iter_mut() {
            watched.push(r);
        }
        any_change(&mut watched, std::time::Duration::from_secs(30)).await?;
    }
}
