//! Local endpoints (pods on this node) as the CNI plugin reported them, persisted in the state
//! directory so that a restarted agent knows them without the CNI plugin calling again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meshd_api::EndpointSpec;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint {namespace}/{name}: {field}: {message}")]
    Invalid {
        namespace: String,
        name: String,
        field: &'static str,
        message: String,
    },
    #[error("reading {path}: {source}")]
    Load {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({source}); move it away to start with no endpoints")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("saving {path}: {source}")]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct EndpointStore {
    path: PathBuf,
    endpoints: BTreeMap<(String, String), EndpointSpec>,
}

impl EndpointStore {
    pub fn load(state_dir: &Path) -> Result<Self, EndpointError> {
        let path = state_dir.join("endpoints.json");
        let endpoints = match std::fs::read(&path) {
            Ok(bytes) => {
                let list: Vec<EndpointSpec> =
                    serde_json::from_slice(&bytes).map_err(|source| EndpointError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                list.into_iter()
                    .map(|e| ((e.namespace.clone(), e.name.clone()), e))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(EndpointError::Load { path, source }),
        };
        Ok(Self { path, endpoints })
    }

    fn save(&self) -> Result<(), EndpointError> {
        let err = |source| EndpointError::Save {
            path: self.path.clone(),
            source,
        };
        let list: Vec<&EndpointSpec> = self.endpoints.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)
    }

    pub fn list(&self) -> Vec<EndpointSpec> {
        self.endpoints.values().cloned().collect()
    }

    /// Adds or replaces an endpoint after checking it names itself consistently.
    pub fn put(
        &mut self,
        namespace: &str,
        name: &str,
        ep: EndpointSpec,
    ) -> Result<(), EndpointError> {
        // Identities are the agent's to allocate, whatever the caller sent.
        let mut ep = ep;
        ep.identity = None;
        let invalid = |field, message: String| EndpointError::Invalid {
            namespace: namespace.into(),
            name: name.into(),
            field,
            message,
        };
        if ep.namespace != namespace || ep.name != name {
            return Err(invalid(
                "name",
                format!(
                    "the body names {}/{}, the path {namespace}/{name}",
                    ep.namespace, ep.name
                ),
            ));
        }
        if ep.interface.is_empty() || ep.interface.len() > 15 {
            return Err(invalid(
                "interface",
                format!("{:?} is not an interface name", ep.interface),
            ));
        }
        if ep.addresses.is_empty() {
            return Err(invalid(
                "addresses",
                "at least one address is required".into(),
            ));
        }
        let key = (namespace.to_string(), name.to_string());
        let previous = self.endpoints.insert(key.clone(), ep);
        if let Err(e) = self.save() {
            // Keep memory and disk in agreement.
            match previous {
                Some(p) => self.endpoints.insert(key, p),
                None => self.endpoints.remove(&key),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes an endpoint; `false` if it was not known.
    pub fn delete(&mut self, namespace: &str, name: &str) -> Result<bool, EndpointError> {
        let key = (namespace.to_string(), name.to_string());
        let Some(old) = self.endpoints.remove(&key) else {
            return Ok(false);
        };
        if let Err(e) = self.save() {
            self.endpoints.insert(key, old);
            return Err(e);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            namespace: "default".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            interface: "lxc1".into(),
            addresses: vec!["198.19.1.10".parse().unwrap()],
            identity: None,
        }
    }

    #[test]
    fn survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EndpointStore::load(dir.path()).unwrap();
        s.put("default", "a", ep("a")).unwrap();
        s.put("default", "b", ep("b")).unwrap();
        assert!(s.delete("default", "a").unwrap());
        assert!(!s.delete("default", "a").unwrap());
        let s = EndpointStore::load(dir.path()).unwrap();
        assert_eq!(s.list(), vec![ep("b")]);
    }

    #[test]
    fn refuses_inconsistent_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EndpointStore::load(dir.path()).unwrap();
        let e = s.put("default", "other", ep("a")).unwrap_err();
        assert!(
            e.to_string().starts_with("endpoint default/other: name:"),
            "{e}"
        );
        let mut bad = ep("a");
        bad.addresses.clear();
        assert!(
            s.put("default", "a", bad)
                .unwrap_err()
                .to_string()
                .contains("addresses")
        );
        assert!(s.list().is_empty());
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("endpoints.json"), b"{nope").unwrap();
        let e = EndpointStore::load(dir.path()).err().unwrap();
        assert!(e.to_string().contains("move it away"), "{e}");
    }
}
