//! The object store: one resourceVersion counter for everything, an ordered event history for
//! watch resume (older versions answer `410 Gone`), and Kubernetes' metadata rules
//! (uid, generation, creationTimestamp, optimistic concurrency).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::resources::{self, ResourceId, ResourceType};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub resource: ResourceId,
    pub kind: EventType,
    pub object: Value,
    /// The object before a modification, so that filtered watches can turn a change that leaves
    /// (or enters) the selection into DELETED (or ADDED), as Kubernetes' watch cache does.
    pub old: Option<Value>,
}

/// What a watch wants to see.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// The event as this watcher must see it, or `None` when it does not concern it.
    pub fn view(&self, ev: &Event) -> Option<(EventType, Value)> {
        let now = self.matches(&ev.object);
        let before = ev.old.as_ref().is_some_and(|o| self.matches(o));
        match (ev.kind, before, now) {
            (EventType::Modified, true, false) => Some((EventType::Deleted, ev.object.clone())),
            (EventType::Modified, false, true) => Some((EventType::Added, ev.object.clone())),
            (EventType::Modified, false, false) => None,
            (_, _, true) => Some((ev.kind, ev.object.clone())),
            _ => None,
        }
    }
}

type Key = (ResourceId, String, String);

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Events up to and including this version are no longer in the history.
    compacted: u64,
}

pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
}

/// Where a watch starts: the backlog to replay, then the live stream.
pub struct WatchStart {
    pub backlog: Vec<(EventType, Value)>,
    pub live: broadcast::Receiver<Arc<Event>>,
    pub rv: u64,
}

pub const MAX_NAME_LEN: usize = 253;

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn valid_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn desired_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn rv_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (events, _) = broadcast::channel(4096);
        let store = Self {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: history_limit.max(1),
                compacted: 1,
            }),
            events,
        };
        let ns = resources::find("", "v1", "namespaces").unwrap_or_default();
        for name in ["default", "kube-system"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            // Cannot fail: the names are valid and the store is empty.
            let _ = store.create(ns, None, obj);
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write is a single
        // insert/remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    fn emit(
        &self,
        inner: &mut Inner,
        resource: ResourceId,
        kind: EventType,
        object: Value,
        old: Option<Value>,
    ) {
        let ev = Arc::new(Event {
            rv: inner.rv,
            resource,
            kind,
            object,
            old,
        });
        inner.history.push_back(ev.clone());
        while inner.history.len() > inner.history_limit {
            if let Some(e) = inner.history.pop_front() {
                inner.compacted = e.rv;
            }
        }
        // No receivers is fine.
        let _ = self.events.send(ev);
    }

    fn check_namespace(
        &self,
        inner: &Inner,
        rt: &ResourceType,
        ns: Option<&str>,
    ) -> Result<(), ApiError> {
        match (rt.namespaced, ns) {
            (true, None) => Err(ApiError::bad_request(format!(
                "{} is namespaced: use a namespace in the request path",
                rt.qualified()
            ))),
            (false, Some(_)) => Err(ApiError::not_found_path(&format!(
                "{} is cluster-scoped",
                rt.qualified()
            ))),
            (true, Some(ns)) => {
                let ns_id = resources::find("", "v1", "namespaces").unwrap_or_default();
                if inner
                    .objects
                    .contains_key(&(ns_id, String::new(), ns.to_string()))
                {
                    Ok(())
                } else {
                    Err(ApiError::not_found(resources::get(ns_id), ns))
                }
            }
            (false, None) => Ok(()),
        }
    }

    /// Checks the parts of an incoming object every verb shares; fills in kind/apiVersion.
    fn validate(rt: &ResourceType, ns: Option<&str>, obj: &mut Value) -> Result<(), ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request(format!(
                "the body of a {} must be a JSON or YAML object",
                rt.kind
            )));
        };
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match map.get("kind").and_then(Value::as_str) {
            Some(k) if k == rt.kind => {}
            None => {
                map.insert("kind".into(), rt.kind.into());
            }
            Some(k) => {
                return Err(ApiError::bad_request(format!(
                    "the kind of the object ({k}) does not match the resource {} (kind {})",
                    rt.qualified(),
                    rt.kind
                )));
            }
        }
        match map.get("apiVersion").and_then(Value::as_str) {
            Some(v) if v == rt.api_version() => {}
            None => {
                map.insert("apiVersion".into(), rt.api_version().into());
            }
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the apiVersion of the object ({v}) does not match the request ({})",
                    rt.api_version()
                )));
            }
        }
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::invalid(
                rt,
                &name,
                "metadata",
                "must be an object",
            ));
        };
        match (meta.get("namespace").and_then(Value::as_str), ns) {
            (Some(got), Some(want)) if !got.is_empty() && got != want => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({got}) does not match the namespace sent on the request ({want})"
                )));
            }
            (_, Some(want)) => {
                meta.insert("namespace".into(), want.into());
            }
            (Some(_), None) => {
                meta.remove("namespace");
            }
            (None, None) => {}
        }
        for field in ["labels", "annotations"] {
            if let Some(v) = meta.get(field) {
                let ok = v.is_null()
                    || v.as_object()
                        .is_some_and(|m| m.values().all(Value::is_string));
                if !ok {
                    return Err(ApiError::invalid(
                        rt,
                        &name,
                        &format!("metadata.{field}"),
                        "must be a map of string keys to string values",
                    ));
                }
            }
        }
        if rt.kind == "Secret" {
            Self::normalize_secret(rt, &name, map)?;
        }
        Ok(())
    }

    fn normalize_secret(
        rt: &ResourceType,
        name: &str,
        map: &mut serde_json::Map<String, Value>,
    ) -> Result<(), ApiError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        if let Some(Value::Object(sd)) = map.remove("stringData") {
            let data = map.entry("data").or_insert_with(|| json!({}));
            for (k, v) in sd {
                let s = v.as_str().ok_or_else(|| {
                    ApiError::invalid(rt, name, &format!("stringData[{k}]"), "must be a string")
                })?;
                data[k] = b64.encode(s).into();
            }
        }
        if let Some(data) = map.get("data").and_then(Value::as_object) {
            for (k, v) in data {
                let ok = v.as_str().is_some_and(|s| b64.decode(s).is_ok());
                if !ok {
                    return Err(ApiError::invalid(
                        rt,
                        name,
                        &format!("data[{k}]"),
                        "must be a base64-encoded string",
                    ));
                }
            }
        }
        map.entry("type").or_insert_with(|| "Opaque".into());
        Ok(())
    }

    pub fn get(&self, rid: ResourceId, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let rt = resources::get(rid);
        let inner = self.lock();
        if rt.namespaced != ns.is_some() {
            self.check_namespace(&inner, rt, ns)?;
        }
        inner
            .objects
            .get(&(rid, ns.unwrap_or("").to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// All objects of a type (in one namespace or all), filtered, with the list's resourceVersion.
    pub fn list(&self, rid: ResourceId, filter: &Filter) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .range((rid, String::new(), String::new())..)
            .take_while(|((r, _, _), _)| *r == rid)
            .filter(|(_, o)| filter.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, inner.rv)
    }

    pub fn create(
        &self,
        rid: ResourceId,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let rt = resources::get(rid);
        Self::validate(rt, ns, &mut obj)?;
        let mut inner = self.lock();
        self.check_namespace(&inner, rt, ns)?;
        let mut name = name_of(&obj).to_string();
        if name.is_empty()
            && let Some(prefix) = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
        {
            let suffix: String = uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .chars()
                .take(5)
                .collect();
            name = format!("{prefix}{suffix}");
        }
        if name.is_empty() {
            return Err(ApiError::invalid(
                rt,
                "",
                "metadata.name",
                "Required value: name or generateName is required",
            ));
        }
        if !valid_dns_subdomain(&name) {
            return Err(ApiError::invalid(
                rt,
                &name,
                "metadata.name",
                format!(
                    "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        if rv_of(&obj).is_some() {
            return Err(ApiError::invalid(
                rt,
                &name,
                "metadata.resourceVersion",
                "must be empty on create",
            ));
        }
        let key = (rid, ns.unwrap_or("").to_string(), name.clone());
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        inner.rv += 1;
        let meta = &mut obj["metadata"];
        meta["name"] = name.into();
        meta["uid"] = uuid::Uuid::new_v4().to_string().into();
        meta["resourceVersion"] = inner.rv.to_string().into();
        meta["generation"] = 1.into();
        meta["creationTimestamp"] = now_rfc3339().into();
        if rt.kind == "Namespace" {
            obj["status"] = json!({"phase": "Active"});
        }
        inner.objects.insert(key, obj.clone());
        self.emit(&mut inner, rid, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// PUT: replaces the object; a stale `metadata.resourceVersion` is a 409 Conflict.
    pub fn update(
        &self,
        rid: ResourceId,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let rt = resources::get(rid);
        Self::validate(rt, ns, &mut obj)?;
        if name_of(&obj) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&obj)
            )));
        }
        let mut inner = self.lock();
        self.check_namespace(&inner, rt, ns)?;
        let key = (rid, ns.unwrap_or("").to_string(), name.to_string());
        let Some(old) = inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(rt, name));
        };
        match rv_of(&obj) {
            None if rt.custom => {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                ));
            }
            Some(rv) if Some(rv) != rv_of(&old) => return Err(ApiError::conflict(rt, name)),
            _ => {}
        }
        for field in ["uid", "creationTimestamp"] {
            let given = obj
                .pointer(&format!("/metadata/{field}"))
                .filter(|v| !v.is_null());
            let had = old.pointer(&format!("/metadata/{field}"));
            if given.is_some() && given != had {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    &format!("metadata.{field}"),
                    "field is immutable",
                ));
            }
        }
        if obj == old {
            return Ok(old);
        }
        let unchanged_spec = desired_part(&obj) == desired_part(&old);
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        inner.rv += 1;
        let meta = &mut obj["metadata"];
        meta["uid"] = old["metadata"]["uid"].clone();
        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        meta["resourceVersion"] = inner.rv.to_string().into();
        meta["generation"] = (if unchanged_spec {
            generation
        } else {
            generation + 1
        })
        .into();
        if rt.kind == "Namespace" && obj.get("status").is_none() {
            obj["status"] = old["status"].clone();
        }
        // Re-running an update that changed nothing (apart from the version we just set)
        // must not produce an event; compare without the version.
        let mut cmp = obj.clone();
        cmp["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if cmp == old {
            inner.rv -= 1;
            return Ok(old);
        }
        inner.objects.insert(key, obj.clone());
        self.emit(&mut inner, rid, EventType::Modified, obj.clone(), Some(old));
        Ok(obj)
    }

    /// Applies `patch_fn` to the current object and stores the result as an update. A
    /// resourceVersion in the patch is a precondition; none means "the latest".
    pub fn patch(
        &self,
        rid: ResourceId,
        ns: Option<&str>,
        name: &str,
        patch_fn: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let current = self.get(rid, ns, name)?;
        let mut patched = patch_fn(&current)?;
        if !patched.is_object() {
            return Err(ApiError::bad_request("the patch must leave a JSON object"));
        }
        if name_of(&patched) != name {
            return Err(ApiError::invalid(
                resources::get(rid),
                name,
                "metadata.name",
                "field is immutable",
            ));
        }
        if rv_of(&patched).is_none() {
            patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        }
        self.update(rid, ns, name, patched)
    }

    pub fn delete(
        &self,
        rid: ResourceId,
        ns: Option<&str>,
        name: &str,
        precondition_rv: Option<&str>,
    ) -> Result<Value, ApiError> {
        let rt = resources::get(rid);
        let mut inner = self.lock();
        self.check_namespace(&inner, rt, ns)?;
        let key = (rid, ns.unwrap_or("").to_string(), name.to_string());
        let Some(old) = inner.objects.get(&key) else {
            return Err(ApiError::not_found(rt, name));
        };
        if let Some(rv) = precondition_rv
            && Some(rv) != rv_of(old)
        {
            return Err(ApiError::conflict(rt, name));
        }
        let Some(mut obj) = inner.objects.remove(&key) else {
            return Err(ApiError::not_found(rt, name));
        };
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = inner.rv.to_string().into();
        self.emit(&mut inner, rid, EventType::Deleted, obj.clone(), None);
        if rt.kind == "Namespace" {
            // A namespace takes its objects with it.
            let contained: Vec<Key> = inner
                .objects
                .keys()
                .filter(|(_, n, _)| n == name)
                .cloned()
                .collect();
            for k in contained {
                if let Some(mut o) = inner.objects.remove(&k) {
                    inner.rv += 1;
                    o["metadata"]["resourceVersion"] = inner.rv.to_string().into();
                    self.emit(&mut inner, k.0, EventType::Deleted, o, None);
                }
            }
        }
        Ok(obj)
    }

    /// Starts a watch. `since = None` (or "0") replays the current state as ADDED events first;
    /// `Some(rv)` replays the history after `rv`, or fails with 410 if it was compacted.
    pub fn watch(
        &self,
        rid: ResourceId,
        filter: &Filter,
        since: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let inner = self.lock();
        let live = self.events.subscribe();
        let backlog = match since {
            None | Some(0) => inner
                .objects
                .range((rid, String::new(), String::new())..)
                .take_while(|((r, _, _), _)| *r == rid)
                .filter(|(_, o)| filter.matches(o))
                .map(|(_, o)| (EventType::Added, o.clone()))
                .collect(),
            Some(rv) if rv < inner.compacted => {
                return Err(ApiError::gone(format!(
                    "too old resource version: {rv} ({})",
                    inner.compacted + 1
                )));
            }
            Some(rv) => inner
                .history
                .iter()
                .filter(|e| e.rv > rv && e.resource == rid)
                .filter_map(|e| filter.view(e))
                .collect(),
        };
        Ok(WatchStart {
            backlog,
            live,
            rv: inner.rv,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cn() -> ResourceId {
        resources::find("cilium.io", "v2", "ciliumnodes").expect("ciliumnodes")
    }
    fn cnp() -> ResourceId {
        resources::find("cilium.io", "v2", "ciliumnetworkpolicies").expect("cnp")
    }
    fn node(name: &str) -> Value {
        json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": name}, "spec": {"bootid": "x"}})
    }

    #[test]
    fn create_sets_metadata_and_refuses_duplicates() {
        let s = Store::new(100);
        let o = s.create(cn(), None, node("n1")).unwrap();
        assert_eq!(o["metadata"]["generation"], 1);
        assert!(o["metadata"]["uid"].as_str().unwrap().len() >= 32);
        assert!(
            o["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        let e = s.create(cn(), None, node("n1")).unwrap_err();
        assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
    }

    #[test]
    fn update_conflicts_on_stale_version_and_bumps_generation_on_spec_change() {
        let s = Store::new(100);
        let o = s.create(cn(), None, node("n1")).unwrap();
        let mut a = o.clone();
        a["metadata"]["annotations"] = json!({"k": "v"});
        let a = s.update(cn(), None, "n1", a).unwrap();
        assert_eq!(
            a["metadata"]["generation"], 1,
            "metadata changes keep the generation"
        );
        let mut stale = o.clone();
        stale["spec"]["bootid"] = "y".into();
        let e = s.update(cn(), None, "n1", stale).unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        let mut fresh = a.clone();
        fresh["spec"]["bootid"] = "y".into();
        let b = s.update(cn(), None, "n1", fresh).unwrap();
        assert_eq!(b["metadata"]["generation"], 2);
        let mut no_rv = b.clone();
        no_rv["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        assert_eq!(s.update(cn(), None, "n1", no_rv).unwrap_err().code, 422);
    }

    #[test]
    fn invalid_objects_change_nothing() {
        let s = Store::new(100);
        let before = s.current_rv();
        let e = s
            .create(cn(), None, json!({"kind": "CiliumNode", "metadata": {}}))
            .unwrap_err();
        assert_eq!(e.code, 422);
        assert!(e.message.contains("metadata.name"), "{}", e.message);
        let e = s
            .create(
                cn(),
                None,
                json!({"kind": "Secret", "metadata": {"name": "a"}}),
            )
            .unwrap_err();
        assert_eq!(e.code, 400);
        assert!(e.message.contains("Secret"), "{}", e.message);
        let e = s
            .create(cnp(), Some("nope"), json!({"metadata": {"name": "a"}}))
            .unwrap_err();
        assert_eq!(e.code, 404);
        let e = s
            .create(cn(), None, json!({"metadata": {"name": "Bad_Name"}}))
            .unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(s.current_rv(), before);
    }

    #[test]
    fn watch_resumes_from_a_version_and_reports_compaction() {
        let s = Store::new(3);
        let a = s.create(cn(), None, node("a")).unwrap();
        let rv_a: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        s.create(cn(), None, node("b")).unwrap();
        s.delete(cn(), None, "a", None).unwrap();
        let w = s.watch(cn(), &Filter::default(), Some(rv_a)).unwrap();
        let kinds: Vec<_> = w
            .backlog
            .iter()
            .map(|(k, o)| (k.as_str(), name_of(o).to_string()))
            .collect();
        assert_eq!(kinds, vec![("ADDED", "b".into()), ("DELETED", "a".into())]);
        for n in ["c", "d", "e"] {
            s.create(cn(), None, node(n)).unwrap();
        }
        let e = s.watch(cn(), &Filter::default(), Some(rv_a)).err().unwrap();
        assert_eq!(e.code, 410);
    }

    #[test]
    fn filtered_watch_sees_objects_leave_the_selection() {
        let s = Store::new(100);
        let mut o = node("a");
        o["metadata"]["labels"] = json!({"role": "x"});
        let o = s.create(cn(), None, o).unwrap();
        let rv: u64 = o["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut changed = o.clone();
        changed["metadata"]["labels"] = json!({"role": "y"});
        s.update(cn(), None, "a", changed).unwrap();
        let filter = Filter {
            labels: LabelSelector::parse("role=x").unwrap(),
            ..Default::default()
        };
        let w = s.watch(cn(), &filter, Some(rv)).unwrap();
        assert_eq!(w.backlog.len(), 1);
        assert_eq!(w.backlog[0].0, EventType::Deleted);
    }
}
