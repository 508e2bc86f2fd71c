//! The agent's policy repository: every CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and
//! NetworkPolicy, checked as it arrives (a malformed update is reported and the last good
//! version stays in force), the identities they select from, and the compiled entries of each
//! local endpoint. This is what the eBPF datapath will enforce; until it exists nothing here
//! drops a packet, and status says so.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt as _;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use policy::{CidrIdentities, Compiled, EndpointLabels, IdentityInfo, Policy, PolicyError};
use serde::Serialize;
use tracing::{info, warn};

use super::Shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[expect(
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

#[derive(Debug, Default)]
pub struct Repository {
    pub objects: BTreeMap<PolicyRef, Entry>,
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// Per local endpoint (namespace, name): what its policy maps should hold.
    pub compiled: BTreeMap<(String, String), Compiled>,
    pub cidrs: CidrIdentities,
}

impl Repository {
    fn apply(&mut self, kind: PolicyKind, obj: &DynamicObject) {
        let ns = obj.metadata.namespace.clone().unwrap_or_default();
        let name = obj.metadata.name.clone().unwrap_or_default();
        let value = match serde_json::to_value(obj) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "a policy object could not be read");
                return;
            }
        };
        let origin = format!("{kind:?} {ns}/{name}");
        let entry = self.objects.entry((kind, ns, name)).or_insert(Entry {
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
                warn!(error = %e, kept_previous = entry.good.is_some(), "refusing a policy object; the last good version stays in force");
                entry.error = Some(e);
            }
        }
    }

    fn delete(&mut self, kind: PolicyKind, obj: &DynamicObject) {
        let key = (
            kind,
            obj.metadata.namespace.clone().unwrap_or_default(),
            obj.metadata.name.clone().unwrap_or_default(),
        );
        self.objects.remove(&key);
    }

    pub fn policies(&self) -> Vec<Policy> {
        self.objects
            .values()
            .filter_map(|e| e.good.clone())
            .collect()
    }

    /// Recompiles every local endpoint (pure: the same inputs give the same entries).
    pub fn recompile(&mut self, endpoints: &[(EndpointLabels, (String, String))]) {
        let policies = self.policies();
        let identities: Vec<IdentityInfo> = self.identities.values().cloned().collect();
        self.cidrs.update(&policies);
        self.compiled = endpoints
            .iter()
            .map(|(labels, key)| {
                (
                    key.clone(),
                    policy::compile(&policies, labels, &identities, &self.cidrs),
                )
            })
            .collect();
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

/// Watches one policy kind into the repository.
pub async fn watch_policies(client: kube::Client, kind: PolicyKind, shared: Arc<Shared>) {
    let api: Api<DynamicObject> = Api::all_with(client, &kind.resource());
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut fresh: Option<Vec<DynamicObject>> = None;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                warn!(?kind, error = %e, "watching policies failed; retrying");
                continue;
            }
        };
        {
            let mut s = shared.lock();
            match ev {
                watcher::Event::Init => fresh = Some(Vec::new()),
                watcher::Event::InitApply(o) => fresh.get_or_insert_with(Vec::new).push(o),
                watcher::Event::InitDone => {
                    s.policy.objects.retain(|(k, _, _), _| *k != kind);
                    for o in fresh.take().unwrap_or_default() {
                        s.policy.apply(kind, &o);
                    }
                    s.datapath_sources.insert(kind.kind());
                }
                watcher::Event::Apply(o) => {
                    info!(
                        ?kind,
                        name = o.metadata.name.as_deref().unwrap_or(""),
                        "policy changed"
                    );
                    s.policy.apply(kind, &o);
                }
                watcher::Event::Delete(o) => {
                    info!(
                        ?kind,
                        name = o.metadata.name.as_deref().unwrap_or(""),
                        "policy deleted"
                    );
                    s.policy.delete(kind, &o);
                }
            }
        }
        shared.policy_changed();
    }
}

/// Watches CiliumIdentities (the peers policies select).
pub async fn watch_identities(client: kube::Client, shared: Arc<Shared>) {
    let api: Api<DynamicObject> = Api::all_with(client, &super::identity::identity_resource());
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut fresh: Option<BTreeMap<u32, IdentityInfo>> = None;
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        {
            let mut s = shared.lock();
            match ev {
                watcher::Event::Init => fresh = Some(BTreeMap::new()),
                watcher::Event::InitApply(o) => {
                    if let Some(i) = identity_from(&o) {
                        fresh.get_or_insert_with(BTreeMap::new).insert(i.id, i);
                    }
                }
                watcher::Event::InitDone => {
                    s.policy.identities = fresh.take().unwrap_or_default();
                    s.datapath_sources.insert("CiliumIdentity");
                }
                watcher::Event::Apply(o) => {
                    if let Some(i) = identity_from(&o) {
                        s.policy.identities.insert(i.id, i);
                    }
                }
                watcher::Event::Delete(o) => {
                    if let Some(id) = o
                        .metadata
                        .name
                        .as_deref()
                        .and_then(|n| n.parse::<u32>().ok())
                    {
                        s.policy.identities.remove(&id);
                    }
                }
            }
        }
        shared.policy_changed();
    }
}

/// Recompiles the local endpoints' entries whenever policies, identities or endpoints change.
pub async fn recompile_loop(shared: Arc<Shared>) {
    loop {
        let wake = shared.policy_changed.notified();
        {
            let mut s = shared.lock();
            let eps: Vec<(EndpointLabels, (String, String))> = s
                .endpoints
                .list()
                .into_iter()
                .map(|e| {
                    (
                        EndpointLabels {
                            namespace: e.namespace.clone(),
                            labels: e.labels.clone(),
                        },
                        (e.namespace, e.name),
                    )
                })
                .collect();
            s.policy.recompile(&eps);
        }
        shared.compiled.notify_waiters();
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
    }
}
