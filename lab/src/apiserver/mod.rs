//! The lab API server: enough of the Kubernetes API, over HTTPS with bearer tokens, that the
//! `kube` crate and `kubectl` work against it unchanged. It is the lab's control plane, not a
//! product: one process, state in memory.

mod http;
pub mod resources;
pub mod selector;
pub mod status;
pub mod store;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

pub use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the lab API server's TLS material is unusable: {0}")]
    Tls(String),
    #[error("accepting connections failed: {0}")]
    Accept(#[from] std::io::Error),
}

pub struct Config {
    pub cert_pem: String,
    pub key_pem: String,
    pub tokens: HashSet<String>,
    /// Events kept for watch resume; older resourceVersions get 410 Gone.
    pub history: usize,
    pub bookmark_interval: Duration,
    /// Largest request body accepted (Kubernetes: 3 MiB).
    pub max_body: usize,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("tokens", &format_args!("<{} redacted>", self.tokens.len()))
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
}

pub struct ApiServer {
    pub store: Store,
    tokens: std::sync::RwLock<HashSet<String>>,
    bookmark_interval: Duration,
    max_body: usize,
    tls: TlsAcceptor,
}

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> Result<TlsAcceptor, ServeError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Tls(format!("certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ServeError::Tls(format!("key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

impl ApiServer {
    pub fn new(config: Config) -> Result<Arc<Self>, ServeError> {
        Ok(Arc::new(Self {
            store: Store::new(config.history),
            tokens: std::sync::RwLock::new(config.tokens),
            bookmark_interval: config.bookmark_interval,
            max_body: config.max_body,
            tls: tls_acceptor(&config.cert_pem, &config.key_pem)?,
        }))
    }

    pub fn authorized(&self, token: &str) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(token)
    }

    pub fn set_tokens(&self, tokens: HashSet<String>) {
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = tokens;
    }

    /// Serves HTTPS on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), ServeError> {
        loop {
            let (tcp, peer) = listener.accept().await?;
            let this = self.clone();
            tokio::spawn(async move {
                let tls = match this.tls.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(http::handle(&this, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await
                    && !e.is_incomplete_message()
                {
                    warn!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

pub use resources::RESOURCES;

/// Default settings for a lab's API server.
pub fn default_config(cert_pem: String, key_pem: String, tokens: HashSet<String>) -> Config {
    Config {
        cert_pem,
        key_pem,
        tokens,
        history: 10_000,
        bookmark_interval: Duration::from_secs(10),
        max_body: 3 * 1024 * 1024,
    }
}

/// Runs the server for a lab: TLS material and tokens come from `dir` (written by `lab up`).
/// `admin` was bound before the process moved into the hub namespace (so the host can reach it);
/// `node` is the address the nodes use.
pub async fn run_lab_server(
    dir: &std::path::Path,
    admin: std::net::TcpListener,
    node: Option<std::net::TcpListener>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = dir.to_path_buf();
    let read = move |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let read_tokens = {
        let read = read.clone();
        move || -> anyhow::Result<HashSet<String>> {
            Ok(read("tokens")?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect())
        }
    };
    let server = ApiServer::new(default_config(
        read("apiserver.pem")?,
        read("apiserver-key.pem")?,
        read_tokens()?,
    ))?;
    // `lab` adds a token per node and sends SIGHUP.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reloading = server.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match read_tokens() {
                Ok(t) => reloading.set_tokens(t),
                Err(e) => warn!(error = %e, "reloading tokens failed; keeping the old ones"),
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    for l in std::iter::once(admin).chain(node) {
        l.set_nonblocking(true)?;
        let l = TcpListener::from_std(l)?;
        tasks.spawn(server.clone().serve(l));
    }
    if let Some(res) = tasks.join_next().await {
        res??;
    }
    Ok(())
}

/// A server on 127.0.0.1 with a fresh CA and an admin kubeconfig in `dir`: what the
/// API-compatibility tests (and anything else that needs a control plane without a lab) use.
pub struct LocalServer {
    pub server: Arc<ApiServer>,
    pub kubeconfig: std::path::PathBuf,
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn spawn_local(dir: &std::path::Path, history: usize) -> anyhow::Result<LocalServer> {
    let certs = crate::pki::generate("local", &[std::net::Ipv4Addr::LOCALHOST.into()])?;
    let token = crate::pki::token();
    let mut config = default_config(
        certs.cert_pem.clone(),
        certs.key_pem.clone(),
        HashSet::from([token.clone()]),
    );
    config.history = history;
    config.bookmark_interval = Duration::from_secs(1);
    let server = ApiServer::new(config)?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    let kubeconfig = dir.join("admin.kubeconfig");
    let kc = crate::pki::kubeconfig(
        "local",
        &format!("https://127.0.0.1:{port}"),
        &certs.ca_pem,
        "admin",
        &token,
    );
    crate::pki::write_private(&kubeconfig, kc.as_bytes())?;
    let s = server.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = s.serve(listener).await {
            warn!(error = %e, "local API server stopped");
        }
    });
    Ok(LocalServer {
        server,
        kubeconfig,
        port,
        task,
    })
}
