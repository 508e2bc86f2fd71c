//! WireGuard keys: the private key lives in `<state-dir>/cilium_wg0.key` (32 raw bytes, 0600,
//! generated if missing, as Cilium does), is zeroized on drop and never printed.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use zeroize::{Zeroize as _, Zeroizing};

pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the WireGuard key file {path} has {len} bytes, expected {KEY_LEN} raw bytes; delete it to have a new key generated"
    )]
    WrongSize { path: PathBuf, len: usize },
    #[error(
        "the WireGuard key file {path} has mode {mode:o}; it must be readable by its owner only: chmod 0600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} is not a WireGuard public key: expected 32 bytes in base64")]
    Unparsable(String),
    #[error("the all-zero public key is not a valid WireGuard key")]
    AllZero,
}

/// A Curve25519 private key. Zeroized on drop; `Debug` shows only the public half.
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    pub fn generate() -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }

    pub fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        let k = Self(x25519_dalek::StaticSecret::from(bytes));
        bytes.zeroize();
        k
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    pub fn secret(&self) -> &x25519_dalek::StaticSecret {
        &self.0
    }

    /// Hex, as the UAPI wants it; the caller must not log it.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_bytes()))
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(s.trim(), bytes.as_mut_slice()).ok()?;
        Some(Self::from_bytes(*bytes))
    }

    /// Loads the key file, or creates it (0600) with a fresh key if it does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        let io = |what, source| KeyError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Permissions {
                        path: path.to_path_buf(),
                        mode,
                    });
                }
                let bytes = Zeroizing::new(
                    std::fs::read(path).map_err(|e| io("reading the WireGuard key file", e))?,
                );
                let arr: [u8; KEY_LEN] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| KeyError::WrongSize {
                            path: path.to_path_buf(),
                            len: bytes.len(),
                        })?;
                Ok(Self::from_bytes(arr))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
                }
                let tmp = path.with_extension("key.tmp");
                let _ = std::fs::remove_file(&tmp);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| io("creating the WireGuard key file", e))?;
                f.write_all(key.0.as_bytes())
                    .map_err(|e| io("writing the WireGuard key file", e))?;
                f.sync_all()
                    .map_err(|e| io("writing the WireGuard key file", e))?;
                std::fs::rename(&tmp, path).map_err(|e| io("writing the WireGuard key file", e))?;
                Ok(key)
            }
            Err(e) => Err(io("reading the WireGuard key file", e)),
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public_key())
    }
}

/// A Curve25519 public key; displayed in base64 as on CiliumNode annotations and in `wg show`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// Parses the base64 form, refusing the all-zero key.
    pub fn parse_base64(s: &str) -> Result<Self, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| KeyError::Unparsable(s.to_string()))?;
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| KeyError::Unparsable(s.to_string()))?;
        if arr == [0; KEY_LEN] {
            return Err(KeyError::AllZero);
        }
        Ok(Self(arr))
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut arr = [0u8; KEY_LEN];
        hex::decode_to_slice(s.trim(), &mut arr).ok()?;
        Some(Self(arr))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_then_reloads_the_same_key_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cilium_wg0.key");
        let a = PrivateKey::load_or_generate(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&p).unwrap().len(), 32);
        let b = PrivateKey::load_or_generate(&p).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(
            !format!("{a:?}").contains(&*a.to_hex()),
            "Debug must not show the secret"
        );
    }

    #[test]
    fn refuses_wrong_size_and_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, [1u8; 31]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = PrivateKey::load_or_generate(&p).unwrap_err();
        assert!(
            e.to_string().contains("31 bytes") && e.to_string().contains("delete it"),
            "{e}"
        );
        std::fs::write(&p, [1u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PrivateKey::load_or_generate(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 0600"), "{e}");
    }

    #[test]
    fn public_key_parsing() {
        let k = PrivateKey::generate().public_key();
        assert_eq!(PublicKey::parse_base64(&k.to_base64()).unwrap(), k);
        assert!(matches!(
            PublicKey::parse_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(KeyError::AllZero)
        ));
        assert!(matches!(
            PublicKey::parse_base64("garbage"),
            Err(KeyError::Unparsable(_))
        ));
        assert!(matches!(
            PublicKey::parse_base64("AAAA"),
            Err(KeyError::Unparsable(_))
        ));
    }
}
