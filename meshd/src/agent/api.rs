//! The agent's local API on a unix socket: status for `meshd status`, endpoints for the CNI
//! plugin. JSON over HTTP/1.1.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use meshd_api::{EndpointSpec, ErrorBody};
use tokio::net::UnixListener;

use super::Shared;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another meshd agent is already serving {0}; stop it first")]
    InUse(String),
    #[error("binding the local API socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

type Body = BoxBody<Bytes, Infallible>;

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    json(status, &ErrorBody { error: msg.into() })
}

/// Binds the socket, refusing to steal it from a live agent; a stale socket is replaced.
pub async fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let shown = path.display().to_string();
    if path.exists() {
        // A live agent keeps accepting; one that is exiting (or gone) stops within moments.
        let mut alive = true;
        for _ in 0..10 {
            if tokio::net::UnixStream::connect(path).await.is_err() {
                alive = false;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        if alive {
            return Err(ApiError::InUse(shown));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ApiError::Bind {
            path: shown.clone(),
            source,
        })?;
    }
    let l = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: shown.clone(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        ApiError::Bind {
            path: shown,
            source,
        }
    })?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) -> Result<(), super::AgentError> {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accepting a local API connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// JSON lines of datapath events until the client goes away.
fn monitor(shared: &Shared) -> Response<Body> {
    let mut rx = shared.monitor.subscribe();
    let (mut tx, body) =
        futures::channel::mpsc::channel::<Result<hyper::body::Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        use futures::SinkExt as _;
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                    line.push(b'\n');
                    if tx
                        .send(Ok(hyper::body::Frame::data(Bytes::from(line))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    });
    let mut r = Response::new(StreamBody::new(body).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["v1", "status"]) => json(StatusCode::OK, &shared.status().await),
        (&Method::GET, ["v1", "endpoints"]) => json(StatusCode::OK, &shared.endpoints()),
        (&Method::GET, ["v1", "policy"]) => json(StatusCode::OK, &shared.policy_status()),
        (&Method::GET, ["v1", "monitor"]) => monitor(shared),
        (&Method::PUT, ["v1", "endpoints", ns, name]) => {
            let (ns, name) = (ns.to_string(), name.to_string());
            let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return err(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
            };
            let ep: EndpointSpec = match serde_json::from_slice(&body) {
                Ok(ep) => ep,
                Err(e) => {
                    return err(
                        StatusCode::BAD_REQUEST,
                        format!("endpoint {ns}/{name}: the body is not an endpoint: {e}"),
                    );
                }
            };
            let result = shared.local.put(&ns, &name, ep);
            match result {
                Ok(()) => {
                    tracing::info!(endpoint = %format!("{ns}/{name}"), "endpoint added");
                    json(StatusCode::OK, &serde_json::json!({}))
                }
                Err(e @ super::endpoints::EndpointError::Invalid { .. }) => {
                    err(StatusCode::BAD_REQUEST, e.to_string())
                }
                Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::DELETE, ["v1", "endpoints", ns, name]) => {
            let result = shared.local.delete(ns, name);
            match result {
                Ok(true) => {
                    tracing::info!(endpoint = %format!("{ns}/{name}"), "endpoint deleted");
                    json(StatusCode::OK, &serde_json::json!({}))
                }
                Ok(false) => err(
                    StatusCode::NOT_FOUND,
                    format!("endpoint {ns}/{name} is not known on this node"),
                ),
                Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (_, ["v1", ..]) => err(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} {path} is not supported", req.method()),
        ),
        _ => err(
            StatusCode::NOT_FOUND,
            format!("{path} is not part of the meshd API (try /v1/status)"),
        ),
    }
}
