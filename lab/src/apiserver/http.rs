//! HTTP routing: discovery, the REST verbs, watch streams and `kubectl`'s table format.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::ApiServer;
use super::resources::{self, ResourceId, ResourceType};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::Filter;

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: &ApiError) -> Response<Body> {
    respond(e.code, &e.to_status())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

/// What a request path addresses.
enum Target {
    Version,
    Health,
    ApiVersions,
    ApiGroupList,
    ApiGroup(String),
    ResourceList(String, String),
    OpenApiRoot,
    OpenApiGroupVersion(String, String),
    Collection {
        rid: ResourceId,
        ns: Option<String>,
    },
    Object {
        rid: ResourceId,
        ns: Option<String>,
        name: String,
    },
}

fn route(path: &str) -> Option<Target> {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Target::Version),
        ["healthz" | "readyz" | "livez"] => return Some(Target::Health),
        ["api"] => return Some(Target::ApiVersions),
        ["openapi", "v3"] => return Some(Target::OpenApiRoot),
        ["openapi", "v3", "api", v] => {
            return Some(Target::OpenApiGroupVersion(String::new(), v.to_string()));
        }
        ["openapi", "v3", "apis", g, v] => {
            return Some(Target::OpenApiGroupVersion(g.to_string(), v.to_string()));
        }
        ["apis"] => return Some(Target::ApiGroupList),
        ["apis", g] => return Some(Target::ApiGroup(g.to_string())),
        ["api", v] => return Some(Target::ResourceList(String::new(), v.to_string())),
        ["apis", g, v] => return Some(Target::ResourceList(g.to_string(), v.to_string())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| resources::find(group, version, plural);
    // `/status` addresses the same object: this server keeps no separate status subresource.
    let rest = match rest {
        [head @ .., "status"] if head.len() == 2 || head.len() == 4 => head,
        r => r,
    };
    match rest {
        ["namespaces", ns, plural] => Some(Target::Collection {
            rid: find(plural)?,
            ns: Some(ns.to_string()),
        }),
        ["namespaces", ns, plural, name] => Some(Target::Object {
            rid: find(plural)?,
            ns: Some(ns.to_string()),
            name: name.to_string(),
        }),
        [plural] => Some(Target::Collection {
            rid: find(plural)?,
            ns: None,
        }),
        [plural, name] => Some(Target::Object {
            rid: find(plural)?,
            ns: None,
            name: name.to_string(),
        }),
        _ => None,
    }
}

pub async fn handle(server: &ApiServer, req: Request<Incoming>) -> Response<Body> {
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| server.authorized(t.trim()));
    if !authorized {
        return error(&ApiError::unauthorized());
    }
    let path = req.uri().path().to_string();
    let Some(target) = route(&path) else {
        return error(&ApiError::not_found_path(&path));
    };
    match dispatch(server, req, target).await {
        Ok(r) => r,
        Err(e) => error(&e),
    }
}

async fn read_body(
    server: &ApiServer,
    req: Request<Incoming>,
) -> Result<(String, Bytes), ApiError> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let bytes = Limited::new(req.into_body(), server.max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::too_large(server.max_body)
            } else {
                ApiError::bad_request(format!("reading the request body failed: {e}"))
            }
        })?
        .to_bytes();
    Ok((ctype, bytes))
}

fn parse_object(ctype: &str, body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    match ctype {
        "application/yaml" | "application/x-yaml" | "text/yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        "application/json" | "" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        other => Err(ApiError::unsupported_media_type(format!(
            "the body's content type {other:?} is not supported: use application/json or application/yaml"
        ))),
    }
}

fn filter_from(q: &HashMap<String, String>, ns: Option<String>) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace: ns,
        labels: LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
        fields: FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?,
    })
}

fn refuse_dry_run(q: &HashMap<String, String>) -> Result<(), ApiError> {
    if q.get("dryRun").is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the lab API server; use client-side --dry-run",
        ));
    }
    Ok(())
}

async fn dispatch(
    server: &ApiServer,
    req: Request<Incoming>,
    target: Target,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let q = query(&req);
    let table = wants_table(&req);
    match target {
        Target::Version => Ok(respond(
            200,
            &json!({
                "major": "1", "minor": "32", "gitVersion": "v1.32.0-meshd-lab", "gitCommit": "", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "rust", "compiler": "rustc", "platform": "linux/amd64"
            }),
        )),
        Target::Health => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            Ok(r)
        }
        Target::ApiVersions => Ok(respond(
            200,
            &json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]
            }),
        )),
        Target::ApiGroupList => {
            let groups: Vec<Value> = resources::groups()
                .into_iter()
                .map(|(g, v)| api_group(g, v))
                .collect();
            Ok(respond(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            ))
        }
        Target::ApiGroup(g) => match resources::groups().into_iter().find(|(name, _)| *name == g) {
            Some((g, v)) => Ok(respond(200, &api_group(g, v))),
            None => Err(ApiError::not_found_path(&format!("/apis/{g}"))),
        },
        Target::ResourceList(g, v) => {
            let list: Vec<Value> = resources::RESOURCES
                .iter()
                .filter(|r| r.group == g && r.version == v)
                .map(ResourceType::discovery)
                .collect();
            if list.is_empty() {
                return Err(ApiError::not_found_path(&format!("{g}/{v}")));
            }
            let gv = if g.is_empty() { v } else { format!("{g}/{v}") };
            Ok(respond(
                200,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
            ))
        }
        Target::OpenApiRoot => {
            let mut paths = serde_json::Map::new();
            paths.insert(
                "api/v1".into(),
                json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=1"}),
            );
            for (g, v) in resources::groups() {
                paths.insert(
                    format!("apis/{g}/{v}"),
                    json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/{v}?hash=1")}),
                );
            }
            Ok(respond(200, &json!({"paths": paths})))
        }
        Target::OpenApiGroupVersion(g, v) => openapi_document(&g, &v),
        Target::Collection { rid, ns } => {
            let rt = resources::get(rid);
            match method {
                Method::GET if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
                    watch(server, rid, filter_from(&q, ns)?, &q, table)
                }
                Method::GET => {
                    let (items, rv) = server.store.list(rid, &filter_from(&q, ns)?);
                    if table {
                        return Ok(respond(200, &to_table(rt, &items, rv, true)));
                    }
                    Ok(respond(
                        200,
                        &json!({
                            "kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
                            "metadata": {"resourceVersion": rv.to_string()}, "items": items
                        }),
                    ))
                }
                Method::POST => {
                    refuse_dry_run(&q)?;
                    let (ctype, body) = read_body(server, req).await?;
                    let obj = parse_object(&ctype, &body)?;
                    let created = server.store.create(rid, ns.as_deref(), obj)?;
                    Ok(respond(201, &created))
                }
                m => Err(ApiError::method_not_allowed(m.as_str())),
            }
        }
        Target::Object { rid, ns, name } => {
            let rt = resources::get(rid);
            let ns = ns.as_deref();
            match method {
                Method::GET => {
                    let obj = server.store.get(rid, ns, &name)?;
                    if table {
                        let rv = server.store.current_rv();
                        return Ok(respond(
                            200,
                            &to_table(rt, std::slice::from_ref(&obj), rv, true),
                        ));
                    }
                    Ok(respond(200, &obj))
                }
                Method::PUT => {
                    refuse_dry_run(&q)?;
                    let (ctype, body) = read_body(server, req).await?;
                    let obj = parse_object(&ctype, &body)?;
                    Ok(respond(200, &server.store.update(rid, ns, &name, obj)?))
                }
                Method::PATCH => {
                    refuse_dry_run(&q)?;
                    let (ctype, body) = read_body(server, req).await?;
                    let patched = server.store.patch(rid, ns, &name, |current| {
                        apply_patch(rt, &ctype, &body, current)
                    })?;
                    Ok(respond(200, &patched))
                }
                Method::DELETE => {
                    refuse_dry_run(&q)?;
                    let (_, body) = read_body(server, req).await?;
                    let precondition = if body.iter().all(u8::is_ascii_whitespace) {
                        None
                    } else {
                        let opts: Value = serde_json::from_slice(&body).map_err(|e| {
                            ApiError::bad_request(format!(
                                "the DeleteOptions body is not valid JSON: {e}"
                            ))
                        })?;
                        opts.pointer("/preconditions/resourceVersion")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    };
                    Ok(respond(
                        200,
                        &server
                            .store
                            .delete(rid, ns, &name, precondition.as_deref())?,
                    ))
                }
                m => Err(ApiError::method_not_allowed(m.as_str())),
            }
        }
    }
}

/// A minimal OpenAPI v3 document for one group/version: every kind's PATCH operation declares
/// the `fieldValidation` parameter, which is how `kubectl apply` learns that this server
/// validates on its side (otherwise it insists on downloading a full schema first). Schemas
/// preserve unknown fields: the lab server stores what it is given.
fn openapi_document(g: &str, v: &str) -> Result<Response<Body>, ApiError> {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for rt in resources::RESOURCES
        .iter()
        .filter(|r| r.group == g && r.version == v)
    {
        let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
        let prefix = if g.is_empty() {
            format!("/api/{v}")
        } else {
            format!("/apis/{g}/{v}")
        };
        let path = if rt.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", rt.plural)
        } else {
            format!("{prefix}/{}/{{name}}", rt.plural)
        };
        let param = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        paths.insert(
            path,
            json!({"patch": {
                "x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "patch",
                "parameters": [param], "responses": {"200": {"description": "OK"}}
            }}),
        );
        let name = format!(
            "{}.{}.{}",
            if g.is_empty() { "io.k8s.api.core" } else { g },
            v,
            rt.kind
        );
        schemas.insert(
            name,
            json!({
                "type": "object", "x-kubernetes-preserve-unknown-fields": true,
                "x-kubernetes-group-version-kind": [gvk]
            }),
        );
    }
    if paths.is_empty() {
        return Err(ApiError::not_found_path(&format!("/openapi/v3/{g}/{v}")));
    }
    Ok(respond(
        200,
        &json!({
            "openapi": "3.0.0", "info": {"title": "meshd lab API server", "version": v},
            "paths": paths, "components": {"schemas": schemas}
        }),
    ))
}

fn api_group(g: &str, v: &str) -> Value {
    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv], "preferredVersion": gv})
}

fn apply_patch(
    rt: &ResourceType,
    ctype: &str,
    body: &[u8],
    current: &Value,
) -> Result<Value, ApiError> {
    let parse = || -> Result<Value, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))
    };
    match ctype {
        "application/merge-patch+json" => {
            let mut out = current.clone();
            json_patch::merge(&mut out, &parse()?);
            Ok(out)
        }
        // Kubernetes serves strategic merge for built-in types only; for the maps that
        // `kubectl annotate/label` touch, a merge patch has the same effect.
        "application/strategic-merge-patch+json" if !rt.custom => {
            let mut out = current.clone();
            json_patch::merge(&mut out, &parse()?);
            Ok(out)
        }
        "application/json-patch+json" => {
            let p: json_patch::Patch = serde_json::from_value(parse()?).map_err(|e| {
                ApiError::bad_request(format!("the body is not a JSON patch (RFC 6902): {e}"))
            })?;
            let mut out = current.clone();
            json_patch::patch(&mut out, &p).map_err(|e| {
                ApiError::invalid(
                    rt,
                    current["metadata"]["name"].as_str().unwrap_or(""),
                    "patch",
                    e,
                )
            })?;
            Ok(out)
        }
        other => Err(ApiError::unsupported_media_type(format!(
            "the patch type {other:?} is not supported for {}: use a JSON merge patch (application/merge-patch+json) or a JSON patch (application/json-patch+json)",
            rt.qualified()
        ))),
    }
}

/// `5s`, `3m12s`, `4h`, `2d` — the shape of Kubernetes' `HumanDuration`.
pub fn human_age(created: &str) -> String {
    let Ok(t) =
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
    else {
        return "<unknown>".into();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn to_table(rt: &ResourceType, items: &[Value], rv: u64, with_columns: bool) -> Value {
    let mut cols = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name of the object", "priority": 0}),
    ];
    cols.extend(rt.columns.iter().map(|c| json!({"name": c.name, "type": "string", "format": "", "description": "", "priority": c.priority})));
    cols.push(json!({"name": "Age", "type": "string", "format": "", "description": "Time since creation", "priority": 0}));
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            cells.extend(rt.columns.iter().map(|c| Value::String((c.cell)(o))));
            cells.push(human_age(o["metadata"]["creationTimestamp"].as_str().unwrap_or("")).into());
            json!({"cells": cells, "object": o})
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": if with_columns { Value::Array(cols) } else { Value::Array(vec![]) },
        "rows": rows,
    })
}

fn watch(
    server: &ApiServer,
    rid: ResourceId,
    filter: Filter,
    q: &HashMap<String, String>,
    table: bool,
) -> Result<Response<Body>, ApiError> {
    let rt = resources::get(rid);
    let since = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion {v:?} is not a resource version this server issued"
            ))
        })?),
    };
    let bookmarks = matches!(
        q.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmark_every = server.bookmark_interval;
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let render = move |kind: &str, obj: &Value, first: bool| -> Bytes {
        let object = if table && kind != "ERROR" && kind != "BOOKMARK" {
            let rv = obj["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            to_table(rt, std::slice::from_ref(obj), rv, first)
        } else {
            obj.clone()
        };
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        Bytes::from(line)
    };
    match server.store.watch(rid, &filter, since) {
        Err(e) if e.code == 410 => {
            // As the real API server does: an ERROR event in a 200 stream.
            let line = render("ERROR", &e.to_status(), true);
            let mut tx = tx;
            let _ = tx.try_send(Ok(Frame::data(line)));
        }
        Err(e) => return Err(e),
        Ok(start) => {
            let mut tx = tx;
            tokio::spawn(async move {
                use futures::SinkExt as _;
                let mut first = true;
                for (kind, obj) in &start.backlog {
                    if tx
                        .send(Ok(Frame::data(render(kind.as_str(), obj, first))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    first = false;
                }
                let deadline = tokio::time::Instant::now() + timeout;
                let mut live = start.live;
                let mut last_rv = start.rv;
                let mut tick = tokio::time::interval(bookmark_every);
                tick.tick().await;
                loop {
                    let line = tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => return,
                        _ = tick.tick(), if bookmarks => {
                            let obj = json!({"kind": rt.kind, "apiVersion": rt.api_version(),
                                "metadata": {"resourceVersion": last_rv.to_string()}});
                            render("BOOKMARK", &obj, false)
                        }
                        ev = live.recv() => match ev {
                            Ok(ev) => {
                                last_rv = last_rv.max(ev.rv);
                                if ev.resource != rid || ev.rv <= start.rv {
                                    continue;
                                }
                                match filter.view(&ev) {
                                    Some((kind, obj)) => render(kind.as_str(), &obj, std::mem::take(&mut first)),
                                    None => continue,
                                }
                            }
                            // A watcher that fell behind is cut off; it resumes from its last version.
                            Err(RecvError::Lagged(_) | RecvError::Closed) => return,
                        },
                    };
                    if tx.send(Ok(Frame::data(line))).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    let mut r = Response::new(StreamBody::new(rx).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("app%3Dweb%2Ctier+in+%28a%29"),
            "app=web,tier in (a)"
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn routes() {
        assert!(
            matches!(route("/api/v1/namespaces/default"), Some(Target::Object { name, ns: None, .. }) if name == "default")
        );
        assert!(
            matches!(route("/api/v1/namespaces/default/secrets"), Some(Target::Collection { ns: Some(n), .. }) if n == "default")
        );
        assert!(
            matches!(route("/apis/cilium.io/v2/ciliumnodes/n1/status"), Some(Target::Object { name, .. }) if name == "n1")
        );
        assert!(
            matches!(route("/apis/cilium.io/v2"), Some(Target::ResourceList(g, v)) if g == "cilium.io" && v == "v2")
        );
        assert!(route("/apis/cilium.io/v2/pods").is_none());
    }
}
