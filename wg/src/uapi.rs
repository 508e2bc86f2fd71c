//! The WireGuard cross-platform userspace API (the protocol `wg` speaks to
//! `/var/run/wireguard/<iface>.sock`): typed requests and answers, their text form, and a client.

use std::io::{BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::key::{PrivateKey, PublicKey};

pub const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("cannot reach the WireGuard device at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the WireGuard device: {0}")]
    Io(#[from] std::io::Error),
    #[error("the WireGuard device refused the configuration (errno {0})")]
    Errno(i32),
    #[error("malformed UAPI line {line:?}: {reason}")]
    Malformed { line: String, reason: String },
}

/// One peer's part of a `set` request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerUpdate {
    pub public_key: Option<PublicKey>,
    pub remove: bool,
    pub update_only: bool,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

/// A `set` request. The private key is kept zeroized.
#[derive(Default)]
pub struct DeviceUpdate {
    pub private_key: Option<Zeroizing<String>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

impl std::fmt::Debug for DeviceUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceUpdate")
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("listen_port", &self.listen_port)
            .field("fwmark", &self.fwmark)
            .field("replace_peers", &self.replace_peers)
            .field("peers", &self.peers)
            .finish()
    }
}

impl DeviceUpdate {
    pub fn with_private_key(mut self, key: &PrivateKey) -> Self {
        self.private_key = Some(key.to_hex());
        self
    }

    /// The request text (`set=1` … blank line).
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::from("set=1\n"));
        if let Some(k) = &self.private_key {
            s.push_str("private_key=");
            s.push_str(k);
            s.push('\n');
        }
        if let Some(p) = self.listen_port {
            s.push_str(&format!("listen_port={p}\n"));
        }
        if let Some(m) = self.fwmark {
            s.push_str(&format!("fwmark={m}\n"));
        }
        if self.replace_peers {
            s.push_str("replace_peers=true\n");
        }
        for p in &self.peers {
            let Some(k) = p.public_key else { continue };
            s.push_str(&format!("public_key={}\n", k.to_hex()));
            if p.remove {
                s.push_str("remove=true\n");
                continue;
            }
            if p.update_only {
                s.push_str("update_only=true\n");
            }
            if let Some(e) = p.endpoint {
                s.push_str(&format!("endpoint={e}\n"));
            }
            if let Some(k) = p.persistent_keepalive {
                s.push_str(&format!("persistent_keepalive_interval={k}\n"));
            }
            if p.replace_allowed_ips {
                s.push_str("replace_allowed_ips=true\n");
            }
            for a in &p.allowed_ips {
                s.push_str(&format!("allowed_ip={a}\n"));
            }
        }
        s.push('\n');
        s
    }

    /// Parses the lines of a `set` request (after `set=1`), as a device receives them.
    pub fn parse(lines: &[String]) -> Result<Self, UapiError> {
        let mut u = DeviceUpdate::default();
        for line in lines {
            let bad = |reason: &str| UapiError::Malformed {
                line: redact(line),
                reason: reason.into(),
            };
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            let truth = || match v {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(bad("expected true or false")),
            };
            match (k, u.peers.last_mut()) {
                ("private_key", None) => {
                    PrivateKey::from_hex(v).ok_or_else(|| bad("expected 64 hex digits"))?;
                    u.private_key = Some(Zeroizing::new(v.to_string()));
                }
                ("listen_port", None) => {
                    u.listen_port = Some(v.parse().map_err(|_| bad("expected a port"))?)
                }
                ("fwmark", None) => {
                    u.fwmark = Some(v.parse().map_err(|_| bad("expected a number"))?)
                }
                ("replace_peers", None) => u.replace_peers = truth()?,
                ("public_key", _) => {
                    let key =
                        PublicKey::from_hex(v).ok_or_else(|| bad("expected 64 hex digits"))?;
                    u.peers.push(PeerUpdate {
                        public_key: Some(key),
                        ..Default::default()
                    });
                }
                ("remove", Some(p)) => p.remove = truth()?,
                ("update_only", Some(p)) => p.update_only = truth()?,
                ("endpoint", Some(p)) => {
                    p.endpoint = Some(v.parse().map_err(|_| bad("expected ip:port"))?)
                }
                ("persistent_keepalive_interval", Some(p)) => {
                    p.persistent_keepalive = Some(v.parse().map_err(|_| bad("expected seconds"))?)
                }
                ("replace_allowed_ips", Some(p)) => p.replace_allowed_ips = truth()?,
                ("allowed_ip", Some(p)) => p
                    .allowed_ips
                    .push(v.parse().map_err(|_| bad("expected a CIDR"))?),
                ("preshared_key" | "protocol_version", Some(_)) => {}
                _ => return Err(bad("unknown or misplaced key")),
            }
        }
        Ok(u)
    }
}

fn redact(line: &str) -> String {
    if line.starts_with("private_key=") || line.starts_with("preshared_key=") {
        "<secret>=<redacted>".into()
    } else {
        line.to_string()
    }
}

/// What `get=1` returns about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: u16,
}

/// What `get=1` returns about the device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerInfo>,
}

impl DeviceInfo {
    /// The answer text, without the private key (`wg show` does not need it to list peers;
    /// `wg showconf` does, and gets it only when `with_private` is set).
    pub fn to_text(&self, private: Option<&PrivateKey>) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::new());
        if let Some(k) = private {
            s.push_str("private_key=");
            s.push_str(&k.to_hex());
            s.push('\n');
        }
        s.push_str(&format!("listen_port={}\n", self.listen_port));
        if self.fwmark != 0 {
            s.push_str(&format!("fwmark={}\n", self.fwmark));
        }
        for p in &self.peers {
            s.push_str(&format!("public_key={}\n", p.public_key.to_hex()));
            if let Some(e) = p.endpoint {
                s.push_str(&format!("endpoint={e}\n"));
            }
            let (sec, nsec) = p
                .last_handshake
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
            s.push_str(&format!(
                "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\n"
            ));
            s.push_str(&format!(
                "tx_bytes={}\nrx_bytes={}\n",
                p.tx_bytes, p.rx_bytes
            ));
            s.push_str(&format!(
                "persistent_keepalive_interval={}\n",
                p.persistent_keepalive
            ));
            for a in &p.allowed_ips {
                s.push_str(&format!("allowed_ip={a}\n"));
            }
            s.push_str("protocol_version=1\n");
        }
        s.push_str("errno=0\n\n");
        s
    }

    fn parse(lines: &[String]) -> Result<Self, UapiError> {
        let mut d = DeviceInfo::default();
        for line in lines {
            let bad = |reason: &str| UapiError::Malformed {
                line: redact(line),
                reason: reason.into(),
            };
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match (k, d.peers.last_mut()) {
                ("private_key", None) => {
                    d.public_key = PrivateKey::from_hex(v).map(|k| k.public_key())
                }
                ("listen_port", None) => d.listen_port = v.parse().map_err(|_| bad("port"))?,
                ("fwmark", None) => d.fwmark = v.parse().map_err(|_| bad("fwmark"))?,
                ("public_key", _) => d.peers.push(PeerInfo {
                    public_key: PublicKey::from_hex(v).ok_or_else(|| bad("key"))?,
                    endpoint: None,
                    allowed_ips: vec![],
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    persistent_keepalive: 0,
                }),
                ("endpoint", Some(p)) => p.endpoint = v.parse().ok(),
                ("allowed_ip", Some(p)) => p.allowed_ips.push(v.parse().map_err(|_| bad("CIDR"))?),
                ("last_handshake_time_sec", Some(p)) => {
                    let s: u64 = v.parse().map_err(|_| bad("seconds"))?;
                    p.last_handshake =
                        (s > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
                }
                ("rx_bytes", Some(p)) => p.rx_bytes = v.parse().map_err(|_| bad("bytes"))?,
                ("tx_bytes", Some(p)) => p.tx_bytes = v.parse().map_err(|_| bad("bytes"))?,
                ("persistent_keepalive_interval", Some(p)) => {
                    p.persistent_keepalive = v.parse().map_err(|_| bad("seconds"))?
                }
                ("errno", _) => {
                    let n: i32 = v.parse().map_err(|_| bad("errno"))?;
                    if n != 0 {
                        return Err(UapiError::Errno(n));
                    }
                }
                _ => {}
            }
        }
        Ok(d)
    }
}

/// A client for one device's UAPI socket.
pub struct Client {
    path: PathBuf,
}

fn read_block(r: &mut impl std::io::BufRead) -> Result<Vec<String>, UapiError> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches('\n').to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    Ok(lines)
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn connect(&self) -> Result<UnixStream, UapiError> {
        let s = UnixStream::connect(&self.path).map_err(|source| UapiError::Connect {
            path: self.path.clone(),
            source,
        })?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    }

    pub fn get(&self) -> Result<DeviceInfo, UapiError> {
        let mut s = self.connect()?;
        s.write_all(b"get=1\n\n")?;
        let lines = read_block(&mut BufReader::new(s))?;
        DeviceInfo::parse(&lines)
    }

    pub fn set(&self, update: &DeviceUpdate) -> Result<(), UapiError> {
        let mut s = self.connect()?;
        s.write_all(update.to_text().as_bytes())?;
        let lines = read_block(&mut BufReader::new(s))?;
        DeviceInfo::parse(&lines).map(drop)
    }
}

/// Reads one request from a UAPI connection: `get` or `set` with its lines.
pub enum Request {
    Get,
    Set(Vec<String>),
}

pub fn read_request(r: &mut impl std::io::BufRead) -> Result<Option<Request>, UapiError> {
    let lines = read_block(r)?;
    match lines.split_first() {
        None => Ok(None),
        Some((first, _)) if first == "get=1" => Ok(Some(Request::Get)),
        Some((first, rest)) if first == "set=1" => Ok(Some(Request::Set(rest.to_vec()))),
        Some((first, _)) => Err(UapiError::Malformed {
            line: redact(first),
            reason: "expected get=1 or set=1".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trips_through_text() {
        let key = PrivateKey::generate();
        let peer = PrivateKey::generate().public_key();
        let u = DeviceUpdate {
            listen_port: Some(51871),
            fwmark: Some(0x1e00),
            peers: vec![PeerUpdate {
                public_key: Some(peer),
                endpoint: Some("198.18.0.12:51871".parse().unwrap()),
                replace_allowed_ips: true,
                allowed_ips: vec!["198.19.2.0/24".parse().unwrap()],
                ..Default::default()
            }],
            ..Default::default()
        }
        .with_private_key(&key);
        let text = u.to_text();
        assert!(!format!("{u:?}").contains(&*key.to_hex()));
        let lines: Vec<String> = text
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let back = DeviceUpdate::parse(&lines).unwrap();
        assert_eq!(back.peers, u.peers);
        assert_eq!(back.listen_port, Some(51871));
        assert_eq!(back.fwmark, Some(0x1e00));
    }

    #[test]
    fn malformed_lines_are_named_and_secrets_redacted() {
        let e = DeviceUpdate::parse(&["private_key=zz".into()])
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("<redacted>") && !e.to_string().contains("zz"),
            "{e}"
        );
        let e = DeviceUpdate::parse(&["allowed_ip=1.2.3.0/24".into()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("misplaced"), "{e}");
    }
}
