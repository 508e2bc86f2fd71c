//! The node-local API of a meshd agent: JSON over HTTP on a unix socket
//! (`/var/run/meshd/meshd.sock`). The CLI reads status from it; the CNI plugin (in the lab,
//! the lab itself) registers endpoints with it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub const DEFAULT_SOCKET: &str = "/var/run/meshd/meshd.sock";

/// A workload on this node, as the CNI plugin reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The host-side interface of the endpoint's veth.
    pub interface: String,
    pub addresses: Vec<IpAddr>,
    /// Its security identity, as the agent allocated it (ignored when the CNI plugin adds an
    /// endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Ok,
    Degraded,
    Failure,
    Disabled,
}

/// One component's state with a human message, as `cilium status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub state: Health,
    pub message: String,
}

/// Another node as this agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<String>,
    /// Whether the routes to its pod CIDRs are installed, and if not why.
    pub routes: ComponentStatus,
    /// How traffic to it is carried: `up`, `pending: …`, `refused: …` or `plain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

/// One WireGuard peer (or a node refused one), for `meshd encrypt status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WireguardPeer {
    pub node: String,
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the last handshake, if there was one.
    pub last_handshake_seconds: Option<u64>,
    pub transfer_rx: u64,
    pub transfer_tx: u64,
    /// `up`, `waiting for handshake`, or `refused: <why>`.
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WireguardStatus {
    /// `kernel` or `userspace`.
    pub backend: String,
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    pub node_encryption: bool,
    /// Configured peers (those that were refused are listed with their reason, not counted).
    pub peers: Vec<WireguardPeer>,
}

fn unknown() -> ComponentStatus {
    ComponentStatus {
        state: Health::Disabled,
        message: "not reported by this agent".into(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node_name: String,
    pub version: String,
    pub kubernetes: ComponentStatus,
    pub node_addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<String>,
    /// The `Encryption:` line's content after the tab, e.g. `Disabled`.
    pub encryption: String,
    /// Whether encryption works right now (the device is there and answers).
    #[serde(default = "unknown")]
    pub encryption_health: ComponentStatus,
    /// Encryption strict mode.
    #[serde(default = "unknown")]
    pub strict_mode: ComponentStatus,
    /// The eBPF datapath (policy enforcement).
    #[serde(default = "unknown")]
    pub datapath: ComponentStatus,
    #[serde(default)]
    pub wireguard: Option<WireguardStatus>,
    pub nodes: Vec<NodeStatus>,
    pub endpoints: usize,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the meshd agent at {path}: {source}; is `meshd agent` running on this node?"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the meshd agent at {path} failed: {message}")]
    Http { path: PathBuf, message: String },
    #[error("the meshd agent refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the meshd agent's answer could not be read: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Error body of the local API.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
        }
    }

    /// Connects to the agent's socket and sends one request.
    async fn send(
        &self,
        method: Method,
        uri: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let http = |message: String| ClientError::Http {
            path: self.path.clone(),
            message,
        };
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "meshd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| http(e.to_string()))?;
        send.send_request(req)
            .await
            .map_err(|e| http(e.to_string()))
    }

    async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let http = |message: String| ClientError::Http {
            path: self.path.clone(),
            message,
        };
        let resp = self.send(method, uri, body.unwrap_or_default()).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes)
    }

    async fn get<T: DeserializeOwned>(&self, uri: &str) -> Result<T, ClientError> {
        Ok(serde_json::from_slice(
            &self.request(Method::GET, uri, None).await?,
        )?)
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.get("/v1/status").await
    }

    pub async fn endpoints(&self) -> Result<Vec<EndpointSpec>, ClientError> {
        self.get("/v1/endpoints").await
    }

    pub async fn put_endpoint(&self, ep: &EndpointSpec) -> Result<(), ClientError> {
        let uri = format!("/v1/endpoints/{}/{}", ep.namespace, ep.name);
        self.request(Method::PUT, &uri, Some(serde_json::to_vec(ep)?))
            .await
            .map(drop)
    }

    pub async fn delete_endpoint(&self, namespace: &str, name: &str) -> Result<(), ClientError> {
        self.request(
            Method::DELETE,
            &format!("/v1/endpoints/{namespace}/{name}"),
            None,
        )
        .await
        .map(drop)
    }
}

/// A policy object as the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyObjectStatus {
    /// `CiliumNetworkPolicy prod/web`.
    pub object: String,
    /// A version of it is in force (the latest, or the last good one).
    pub in_force: bool,
    /// Why the latest version was refused.
    pub error: Option<String>,
    /// `field: reason` for each part meshd does not enforce.
    pub unsupported: Vec<String>,
}

/// One policy-map entry (CILIUM-CONTRACT.md key and value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyEntryView {
    pub identity: u32,
    /// `ingress` or `egress`.
    pub direction: String,
    /// 0 = any.
    pub protocol: u8,
    pub port: u16,
    pub prefix_len: u32,
    /// `allow` or `deny`.
    pub verdict: String,
    /// The auth byte (type | 0x80 when set explicitly).
    pub auth_type: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPolicy {
    pub endpoint: String,
    pub identity: Option<u32>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: Vec<PolicyEntryView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Whether the datapath enforces these entries, and if not why.
    pub enforcement: String,
    pub objects: Vec<PolicyObjectStatus>,
    pub endpoints: Vec<EndpointPolicy>,
}

impl Client {
    pub async fn policy(&self) -> Result<PolicyStatus, ClientError> {
        self.get("/v1/policy").await
    }
}

/// One datapath event, as `meshd monitor` streams them (JSON lines on `/v1/monitor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MonitorEvent {
    /// `drop` or `auth-required` (which is also a drop, reason 189).
    pub kind: String,
    pub reason: u8,
    pub reason_text: String,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src: String,
    pub dst: String,
    pub dport: u16,
    pub proto: u8,
    /// The policy direction of the endpoint: `ingress` or `egress`.
    pub direction: String,
    /// For auth-required: (local identity, remote identity, remote node id, auth type).
    pub auth: Option<(u32, u32, u16, u8)>,
}

impl Client {
    /// Streams monitor events to `on_event` until it returns false or the agent goes away.
    pub async fn monitor(
        &self,
        mut on_event: impl FnMut(MonitorEvent) -> bool,
    ) -> Result<(), ClientError> {
        use hyper::body::Body as _;
        let http = |message: String| ClientError::Http {
            path: self.path.clone(),
            message,
        };
        let resp = self.send(Method::GET, "/v1/monitor", Vec::new()).await?;
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        while !body.is_end_stream() {
            let Some(frame) = body.frame().await else {
                break;
            };
            let frame = frame.map_err(|e| http(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                pending.extend_from_slice(&data);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    if let Ok(ev) = serde_json::from_slice::<MonitorEvent>(&line)
                        && !on_event(ev)
                    {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

impl Status {
    /// What makes this node unhealthy (`meshd status` exits non-zero): the API server
    /// unreachable, encryption or strict mode or the datapath failing. Refused or unreachable
    /// other nodes are shown but are theirs, not this node's.
    pub fn failures(&self) -> Vec<String> {
        [
            ("Kubernetes", &self.kubernetes),
            ("Encryption", &self.encryption_health),
            ("Strict mode", &self.strict_mode),
            ("Datapath", &self.datapath),
        ]
        .into_iter()
        .filter(|(_, c)| c.state == Health::Failure)
        .map(|(name, c)| format!("{name}: {}", c.message))
        .collect()
    }
}
