//! The WireGuard cross-platform userspace API (the protocol `wg` speaks to
//! `/var/run/wireguard/<iface>.sock`): typed requests and answers, their text form, and a client.

use std::io::{Read, Write as _};
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
    #[error("a UAPI request exceeds {limit}: closing the connection")]
    TooLong { limit: &'static str },
}

/// Longest line a UAPI peer may send (the longest real one, a key, is under 80 bytes).
pub const MAX_LINE: usize = 4096;
/// Most lines in one request (a `set` for 10,000 peers with a few CIDRs each fits).
pub const MAX_LINES: usize = 1 << 20;

/// A WireGuard preshared key (32 bytes; all zero means none). Zeroized when dropped, never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

impl PresharedKey {
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut k = Zeroizing::new([0u8; 32]);
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(k))
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(64));
        for b in self.0.iter() {
            let _ = std::fmt::Write::write_fmt(&mut *s, format_args!("{b:02x}"));
        }
        s
    }

    /// All zero: "no preshared key" in the UAPI.
    pub fn is_none(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

/// Reads lines from a UAPI connection with bounds (line length, line count) into a buffer that
/// is zeroized when dropped (requests carry private and preshared keys).
pub struct LineReader<R> {
    inner: R,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Zeroizing::new(vec![0; 64 * 1024]),
            start: 0,
            end: 0,
        }
    }

    /// The next line without its newline; `None` at the end of the stream.
    pub fn next_line(&mut self) -> Result<Option<String>, UapiError> {
        loop {
            if let Some(i) = self.buf[self.start..self.end]
                .iter()
                .position(|b| *b == b'\n')
            {
                let line = &self.buf[self.start..self.start + i];
                if line.len() > MAX_LINE {
                    return Err(UapiError::TooLong {
                        limit: "the line length limit",
                    });
                }
                let text = std::str::from_utf8(line)
                    .map_err(|_| UapiError::Malformed {
                        line: "<not UTF-8>".into(),
                        reason: "expected text".into(),
                    })?
                    .to_string();
                self.start += i + 1;
                return Ok(Some(text));
            }
            if self.end - self.start > MAX_LINE {
                return Err(UapiError::TooLong {
                    limit: "the line length limit",
                });
            }
            // Move the partial line to the front, then read more behind it.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let n = self.inner.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return if self.end == 0 {
                    Ok(None)
                } else {
                    Err(UapiError::Malformed {
                        line: "<unterminated>".into(),
                        reason: "the connection ended inside a line".into(),
                    })
                };
            }
            self.end += n;
        }
    }

    /// The lines up to a blank line (or the end of the stream), zeroized when dropped.
    pub fn read_block(&mut self) -> Result<Zeroizing<Vec<String>>, UapiError> {
        let mut lines = Zeroizing::new(Vec::new());
        while let Some(line) = self.next_line()? {
            if line.is_empty() {
                break;
            }
            if lines.len() >= MAX_LINES {
                return Err(UapiError::TooLong {
                    limit: "the line count limit",
                });
            }
            lines.push(line);
        }
        Ok(lines)
    }
}

/// One peer's part of a `set` request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerUpdate {
    pub public_key: Option<PublicKey>,
    pub remove: bool,
    pub update_only: bool,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    /// `preshared_key=`: set (all zero: removed).
    pub preshared_key: Option<PresharedKey>,
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
            if let Some(k) = &p.preshared_key {
                s.push_str("preshared_key=");
                s.push_str(&k.to_hex());
                s.push('\n');
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
                ("preshared_key", Some(p)) => {
                    p.preshared_key = Some(
                        PresharedKey::from_hex(v).ok_or_else(|| bad("expected 64 hex digits"))?,
                    )
                }
                ("protocol_version", Some(_)) if v == "1" => {}
                ("protocol_version", Some(_)) => return Err(bad("only protocol version 1 exists")),
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
    /// Only in answers that include secrets (`wg showconf`), never in the agent's polls.
    pub preshared_key: Option<PresharedKey>,
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
        } else if let Some(k) = self.public_key {
            // meshd's extension for answers without secrets: the device's public key.
            s.push_str(&format!("meshd_public_key={}\n", k.to_hex()));
        }
        s.push_str(&format!("listen_port={}\n", self.listen_port));
        if self.fwmark != 0 {
            s.push_str(&format!("fwmark={}\n", self.fwmark));
        }
        for p in &self.peers {
            s.push_str(&format!("public_key={}\n", p.public_key.to_hex()));
            if let Some(k) = &p.preshared_key {
                s.push_str("preshared_key=");
                s.push_str(&k.to_hex());
                s.push('\n');
            }
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

    /// Parses the lines of an answer to `get=1`.
    pub fn parse_lines(lines: &[String]) -> Result<Self, UapiError> {
        Self::parse(lines)
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
                ("meshd_public_key", None) => d.public_key = PublicKey::from_hex(v),
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
                    preshared_key: None,
                }),
                ("preshared_key", Some(p)) => {
                    p.preshared_key = PresharedKey::from_hex(v).filter(|k| !k.is_none())
                }
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

    /// The device's state without its secrets: meshd's own device leaves the private and
    /// preshared keys out of the answer when asked (`meshd_omit_secrets=true`), so a status poll
    /// never moves them. A device that does not know the extension gets a plain `get=1`.
    pub fn get(&self) -> Result<DeviceInfo, UapiError> {
        match self.get_with(b"get=1\nmeshd_omit_secrets=true\n\n") {
            Err(UapiError::Errno(libc::EINVAL)) => self.get_with(b"get=1\n\n"),
            r => r,
        }
    }

    fn get_with(&self, request: &[u8]) -> Result<DeviceInfo, UapiError> {
        let mut s = self.connect()?;
        s.write_all(request)?;
        let lines = LineReader::new(s).read_block()?;
        DeviceInfo::parse(&lines)
    }

    pub fn set(&self, update: &DeviceUpdate) -> Result<(), UapiError> {
        let mut s = self.connect()?;
        s.write_all(update.to_text().as_bytes())?;
        let lines = LineReader::new(s).read_block()?;
        DeviceInfo::parse(&lines).map(drop)
    }
}

/// Reads one request from a UAPI connection: `get` or `set` with its lines.
pub enum Request {
    /// `get=1`; `secrets: false` when the client asked to leave the keys out.
    Get {
        secrets: bool,
    },
    Set(Zeroizing<Vec<String>>),
}

pub fn read_request(r: &mut LineReader<impl Read>) -> Result<Option<Request>, UapiError> {
    let lines = r.read_block()?;
    match lines.split_first() {
        None => Ok(None),
        Some((first, rest)) if first == "get=1" => match rest {
            [] => Ok(Some(Request::Get { secrets: true })),
            [o] if o == "meshd_omit_secrets=true" => Ok(Some(Request::Get { secrets: false })),
            [other, ..] => Err(UapiError::Malformed {
                line: redact(other),
                reason: "a get request has no further lines".into(),
            }),
        },
        Some((first, rest)) if first == "set=1" => {
            Ok(Some(Request::Set(Zeroizing::new(rest.to_vec()))))
        }
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
    fn requests_are_bounded_and_gets_can_leave_secrets_out() {
        let read = |bytes: &[u8]| read_request(&mut LineReader::new(bytes));
        assert!(matches!(
            read(b"get=1\n\n"),
            Ok(Some(Request::Get { secrets: true }))
        ));
        assert!(matches!(
            read(b"get=1\nmeshd_omit_secrets=true\n\n"),
            Ok(Some(Request::Get { secrets: false }))
        ));
        assert!(read(b"get=1\nprivate_key=00\n\n").is_err());
        let long = [b"set=1\n".as_slice(), &[b'x'; MAX_LINE + 1], b"\n\n"].concat();
        assert!(matches!(read(&long), Err(UapiError::TooLong { .. })));
        let endless = [b"set=1\n".as_slice(), &vec![b'x'; 200_000]].concat();
        assert!(matches!(read(&endless), Err(UapiError::TooLong { .. })));
        assert!(matches!(
            read(b"set=1\nlisten_port=1"),
            Err(UapiError::Malformed { .. })
        ));
        // An answer without secrets still names the device's key.
        let key = PrivateKey::generate();
        let info = DeviceInfo {
            public_key: Some(key.public_key()),
            listen_port: 51871,
            ..Default::default()
        };
        let text = info.to_text(None);
        assert!(!text.contains("private_key"), "{}", *text);
        let lines = LineReader::new(text.as_bytes()).read_block().unwrap();
        assert_eq!(
            DeviceInfo::parse(&lines).unwrap().public_key,
            Some(key.public_key())
        );
    }

    #[test]
    fn preshared_keys_parse_and_never_print() {
        let peer = PrivateKey::generate().public_key();
        let hex = "11".repeat(32);
        let u = DeviceUpdate::parse(&[
            format!("public_key={}", peer.to_hex()),
            format!("preshared_key={hex}"),
        ])
        .unwrap();
        let psk = u.peers[0].preshared_key.clone().unwrap();
        assert_eq!(*psk.to_hex(), hex);
        assert!(!format!("{u:?}").contains(&hex));
        assert!(u.to_text().contains(&format!("preshared_key={hex}")));
        assert!(PresharedKey::from_hex(&"00".repeat(32)).unwrap().is_none());
        let e = DeviceUpdate::parse(&[
            format!("public_key={}", peer.to_hex()),
            "preshared_key=zz".into(),
        ])
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("<redacted>") && !e.to_string().contains("zz"),
            "{e}"
        );
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
