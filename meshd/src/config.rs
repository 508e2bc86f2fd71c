//! Agent configuration: flags, `MESHD_*` environment variables and a config file (YAML map) or
//! config directory (one file per option, as Cilium's ConfigMap mount), using Cilium's agent
//! option names where they exist. Precedence: flag > environment > file > default.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches as _, Parser};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {path} is not a YAML map of option names to values: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "the config file {path} sets {key:?}, which is not a meshd agent option (see `meshd agent --help`)"
    )]
    UnknownOption { path: PathBuf, key: String },
    #[error("invalid agent configuration: {0}")]
    Invalid(String),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?} is not a duration like 30s, 5m or 1h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// `meshd agent` options.
#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// Name of this node (its CiliumNode object).
    #[arg(long, env = "K8S_NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubeconfig to reach the API server; in-cluster configuration when unset.
    #[arg(long, env = "MESHD_K8S_KUBECONFIG_PATH")]
    pub k8s_kubeconfig_path: Option<PathBuf>,

    /// IPv4 address of this node on the underlay; autodetected when unset.
    #[arg(long, alias = "node-ip", env = "MESHD_IPV4_NODE")]
    pub ipv4_node: Option<Ipv4Addr>,

    /// This node's pod CIDR (published as the CiliumNode's spec.ipam.podCIDRs); when unset the
    /// CIDRs already on the CiliumNode (set by an operator) are used.
    #[arg(long, alias = "pod-cidr", env = "MESHD_IPV4_RANGE")]
    pub ipv4_range: Option<ipnet::Ipv4Net>,

    /// The cluster's pod range (Cilium's cluster-pool IPAM option; Helm
    /// `ipam.operator.clusterPoolIPv4PodCIDRList`): another node's pod CIDR outside it is
    /// refused. Unset: any range that overlaps nothing else.
    #[arg(long, env = "MESHD_CLUSTER_POOL_IPV4_CIDR")]
    pub cluster_pool_ipv4_cidr: Option<ipnet::Ipv4Net>,

    /// Where the agent keeps state that must survive restarts (keys, endpoints).
    #[arg(long, env = "MESHD_STATE_DIR", default_value = "/var/lib/meshd")]
    pub state_dir: PathBuf,

    /// The agent's local API socket.
    #[arg(long, env = "MESHD_SOCKET_PATH", default_value = meshd_api::DEFAULT_SOCKET)]
    pub socket_path: PathBuf,

    /// Encrypt traffic between nodes with WireGuard.
    #[arg(long, env = "MESHD_ENABLE_WIREGUARD", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub enable_wireguard: bool,

    /// Use userspace WireGuard where the kernel has no WireGuard module
    /// (Helm: encryption.wireguard.userspaceFallback).
    #[arg(long, env = "MESHD_ENABLE_WIREGUARD_USERSPACE_FALLBACK", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub enable_wireguard_userspace_fallback: bool,

    /// WireGuard persistent keepalive (Helm: encryption.wireguard.persistentKeepalive); 0s = off.
    #[arg(long, env = "MESHD_WIREGUARD_PERSISTENT_KEEPALIVE", value_parser = parse_duration)]
    pub wireguard_persistent_keepalive: Option<Duration>,

    /// Encrypt traffic between nodes with IPsec.
    #[arg(long, env = "MESHD_ENABLE_IPSEC", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub enable_ipsec: bool,

    /// Also encrypt node-to-node (not only pod) traffic.
    #[arg(long, env = "MESHD_ENABLE_NODE_ENCRYPTION", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub enable_node_encryption: bool,

    /// Encryption strict mode (Helm: encryption.strictMode.enabled): a local pod's packet to the
    /// strict CIDRs that would leave the node unencrypted is dropped in the eBPF datapath
    /// (reason 195, "Traffic is unencrypted"), a dead tunnel device or a stopped agent included.
    #[arg(long, env = "MESHD_ENABLE_ENCRYPTION_STRICT_MODE", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub enable_encryption_strict_mode: bool,

    /// The CIDRs strict mode covers, IPv4 and IPv6, comma-separated (Helm:
    /// encryption.strictMode.cidr). Unset: cluster-pool-ipv4-cidr when set, else every pod CIDR
    /// of the cluster (the CiliumNodes' and the own), kept up to date.
    #[arg(long, env = "MESHD_ENCRYPTION_STRICT_MODE_CIDR", default_value = "")]
    pub encryption_strict_mode_cidr: String,

    /// Let pods reach the addresses of other nodes (identity remote-node) unencrypted even inside
    /// the strict CIDRs (Helm: encryption.strictMode.allowRemoteNodeIdentities).
    #[arg(long, env = "MESHD_ENCRYPTION_STRICT_MODE_ALLOW_REMOTE_NODE_IDENTITIES", num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    pub encryption_strict_mode_allow_remote_node_identities: bool,

    /// Mutual authentication for policies with `authentication.mode: required`.
    #[arg(long, env = "MESHD_MESH_AUTH_ENABLED", num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    pub mesh_auth_enabled: bool,

    /// Port of the mutual-authentication (mTLS) listener.
    #[arg(
        long,
        env = "MESHD_MESH_AUTH_MUTUAL_LISTENER_PORT",
        default_value_t = 4250
    )]
    pub mesh_auth_mutual_listener_port: u16,

    /// Policy enforcement (Cilium's option): `default`/`always` enforce with eBPF, `never` does not.
    #[arg(long, env = "MESHD_ENABLE_POLICY", default_value = "default", value_parser = ["default", "always", "never"])]
    pub enable_policy: String,

    /// Where bpffs is mounted; meshd pins its maps under `<bpf-root>/meshd`.
    #[arg(long, env = "MESHD_BPF_ROOT", default_value = "/sys/fs/bpf")]
    pub bpf_root: PathBuf,

    /// How often routes are re-checked against the kernel even without changes.
    #[arg(long, env = "MESHD_ROUTE_SYNC_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub route_sync_interval: Duration,

    /// A YAML file mapping option names (as the flags, without `--`) to values.
    #[arg(long, env = "MESHD_CONFIG")]
    pub config: Option<PathBuf>,

    /// A directory with one file per option (Cilium's ConfigMap mount layout).
    #[arg(long, env = "MESHD_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
}

/// `--help` and `--version` print and exit, as everywhere else; other errors are returned.
fn clap_error(e: clap::Error) -> ConfigError {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    ConfigError::Invalid(
        e.to_string()
            .trim_start_matches("error: ")
            .trim_end()
            .to_string(),
    )
}

#[derive(Parser)]
#[command(name = "meshd agent", version)]
struct Standalone {
    #[command(flatten)]
    agent: AgentConfig,
}

fn file_options(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let map: std::collections::BTreeMap<String, serde_yaml::Value> = serde_yaml::from_str(&text)
        .map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
    map.into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Bool(b) => b.to_string(),
                serde_yaml::Value::Number(n) => n.to_string(),
                other => {
                    return Err(ConfigError::Parse {
                        path: path.into(),
                        message: format!("{k}: expected a scalar, got {other:?}"),
                    });
                }
            };
            Ok((k, v))
        })
        .collect()
}

fn dir_options(dir: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let rd = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
        path: dir.into(),
        source,
    })?;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // ConfigMap mounts carry `..data` symlinks and dot-files.
        if name.starts_with('.') || !e.path().is_file() {
            continue;
        }
        let v = std::fs::read_to_string(e.path()).map_err(|source| ConfigError::Read {
            path: e.path(),
            source,
        })?;
        out.push((name, v.trim().to_string()));
    }
    Ok(out)
}

impl AgentConfig {
    /// Parses `argv` (starting with the subcommand name) with file options merged underneath.
    pub fn parse_with_files(argv: Vec<OsString>) -> Result<Self, ConfigError> {
        let cmd = Standalone::command().no_binary_name(false);
        let matches = cmd
            .clone()
            .try_get_matches_from(&argv)
            .map_err(clap_error)?;
        let first = Standalone::from_arg_matches(&matches)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut file_opts = Vec::new();
        if let Some(p) = &first.agent.config {
            file_opts.extend(file_options(p)?.into_iter().map(|(k, v)| (p.clone(), k, v)));
        }
        if let Some(d) = &first.agent.config_dir {
            file_opts.extend(dir_options(d)?.into_iter().map(|(k, v)| (d.clone(), k, v)));
        }
        if file_opts.is_empty() {
            return Ok(first.agent);
        }
        let mut argv = argv;
        for (path, key, value) in file_opts {
            let Some(arg) = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()))
            else {
                return Err(ConfigError::UnknownOption { path, key });
            };
            let id = arg.get_id().as_str();
            if matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            argv.push(format!("--{key}={value}").into());
        }
        let matches = cmd.try_get_matches_from(&argv).map_err(clap_error)?;
        Ok(Standalone::from_arg_matches(&matches)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?
            .agent)
    }

    /// Refuses combinations this build cannot honour, rather than running without them.
    /// `encryption-strict-mode-cidr` parsed: empty (the default) or CIDRs separated by commas.
    pub fn strict_mode_cidrs(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.encryption_strict_mode_cidr
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse::<ipnet::IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        ConfigError::Invalid(format!(
                            "encryption-strict-mode-cidr: {c:?} is not a CIDR like 10.0.0.0/8 or fd00::/8"
                        ))
                    })
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enable_wireguard && self.enable_ipsec {
            return Err(ConfigError::Invalid(
                "enable-wireguard and enable-ipsec are mutually exclusive".into(),
            ));
        }
        if self.enable_ipsec {
            return Err(ConfigError::Invalid(
                "IPsec (enable-ipsec) is not available in this build of meshd yet; use enable-wireguard".into(),
            ));
        }
        if self.enable_node_encryption {
            // AllowedIPs would carry node IPs, but host traffic is not yet routed into the
            // tunnel (that needs fwmark policy routing); claiming it would be a lie.
            return Err(ConfigError::Invalid(
                "node encryption (enable-node-encryption) is not available in this build of meshd yet; only pod traffic is encrypted"
                    .into(),
            ));
        }
        let strict_cidrs = self.strict_mode_cidrs()?;
        if self.enable_encryption_strict_mode {
            if !self.enable_wireguard && !self.enable_ipsec {
                return Err(ConfigError::Invalid(
                    "enable-encryption-strict-mode needs encryption: set enable-wireguard \
                     (Helm: encryption.enabled=true, encryption.type=wireguard)"
                        .into(),
                ));
            }
            if self.enable_policy == "never" {
                return Err(ConfigError::Invalid(
                    "enable-encryption-strict-mode is enforced by the eBPF datapath, which \
                     enable-policy=never turns off: use enable-policy=default or always"
                        .into(),
                ));
            }
            if let Some(c) = strict_cidrs.iter().find(|c| c.prefix_len() == 0) {
                return Err(ConfigError::Invalid(format!(
                    "encryption-strict-mode-cidr {c} covers every address: pods could reach \
                     nothing outside the cluster; give the cluster's pod range"
                )));
            }
        }
        if self.route_sync_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "route-sync-interval must be at least 1s".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(extra: &[&str]) -> Vec<OsString> {
        std::iter::once("agent")
            .chain(extra.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn strict_mode_options_are_checked() {
        let parse = |extra: &[&str]| {
            AgentConfig::parse_with_files(argv(extra)).and_then(|c| c.validate().map(|()| c))
        };
        let c = parse(&[
            "--enable-wireguard",
            "--enable-encryption-strict-mode",
            "--encryption-strict-mode-cidr",
            "198.19.0.0/16, fd00:10::1/48",
        ])
        .unwrap();
        assert_eq!(
            c.strict_mode_cidrs().unwrap(),
            vec![
                "198.19.0.0/16".parse::<ipnet::IpNet>().unwrap(),
                "fd00:10::/48".parse().unwrap()
            ]
        );
        let err = |extra: &[&str]| {
            parse(extra)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(&["--enable-encryption-strict-mode"]).contains("needs encryption"));
        assert!(
            err(&[
                "--enable-wireguard",
                "--enable-encryption-strict-mode",
                "--enable-policy",
                "never"
            ])
            .contains("enable-policy=never")
        );
        assert!(
            err(&[
                "--enable-wireguard",
                "--enable-encryption-strict-mode",
                "--encryption-strict-mode-cidr",
                "10.0.0/8"
            ])
            .contains("\"10.0.0/8\" is not a CIDR")
        );
        assert!(
            err(&[
                "--enable-wireguard",
                "--enable-encryption-strict-mode",
                "--encryption-strict-mode-cidr",
                "0.0.0.0/0"
            ])
            .contains("covers every address")
        );
    }

    #[test]
    fn file_values_apply_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "node-name: from-file\nipv4-range: 198.19.9.0/24\nroute-sync-interval: 5s\n",
        )
        .unwrap();
        let c = AgentConfig::parse_with_files(argv(&[
            "--config",
            f.to_str().unwrap(),
            "--node-name",
            "from-flag",
        ]))
        .unwrap();
        assert_eq!(c.node_name.as_deref(), Some("from-flag"));
        assert_eq!(c.ipv4_range.unwrap().to_string(), "198.19.9.0/24");
        assert_eq!(c.route_sync_interval, Duration::from_secs(5));
    }

    #[test]
    fn config_dir_and_unknown_options() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("enable-node-encryption"), "true\n").unwrap();
        let c =
            AgentConfig::parse_with_files(argv(&["--config-dir", dir.path().to_str().unwrap()]))
                .unwrap();
        assert!(c.enable_node_encryption);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("enable-node-encryption"), "{e}");
        std::fs::write(dir.path().join("no-such-option"), "1").unwrap();
        let e =
            AgentConfig::parse_with_files(argv(&["--config-dir", dir.path().to_str().unwrap()]))
                .unwrap_err();
        assert!(e.to_string().contains("no-such-option"), "{e}");
    }

    #[test]
    fn bad_values_name_the_option() {
        let e =
            AgentConfig::parse_with_files(argv(&["--route-sync-interval", "soon"])).unwrap_err();
        assert!(e.to_string().contains("route-sync-interval"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "- not a map").unwrap();
        let e =
            AgentConfig::parse_with_files(argv(&["--config", f.to_str().unwrap()])).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
