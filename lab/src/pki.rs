//! The lab's certificate authority: one CA per lab, a serving certificate for the API server,
//! bearer tokens and kubeconfig files. Keys are written 0600.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating the lab certificates failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path} failed: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// PEM-encoded material for the API server and its clients.
pub struct ServingCerts {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ServingCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCerts")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A fresh CA and a serving certificate for `ips` (plus `localhost`).
pub fn generate(lab: &str, ips: &[IpAddr]) -> Result<ServingCerts, PkiError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("meshd lab {lab} CA"));
    ca.distinguished_name = dn;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "kubernetes".to_string()])?;
    leaf.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "meshd-lab-apiserver");
    leaf.distinguished_name = dn;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(ServingCerts {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    })
}

/// A random bearer token (128 bits, hex).
pub fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.display().to_string(),
        source,
    };
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(contents).map_err(err)
}

/// A kubeconfig for `user` against `server`, trusting the lab CA.
pub fn kubeconfig(lab: &str, server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {lab}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
users:\n- name: {user}\n  user:\n    token: {token}\n\
contexts:\n- name: {user}@{lab}\n  context:\n    cluster: {lab}\n    user: {user}\n\
current-context: {user}@{lab}\npreferences: {{}}\n"
    )
}
