//! meshd's eBPF datapath from user space: one program instance per endpoint (its own policy
//! map and settings) attached to the endpoint's host-side veth in both directions, sharing the
//! pinned ipcache, auth, conntrack and event maps (pinned under the given bpffs directory so
//! they outlive the agent).
//!
//! Programs attach with TCX links where the kernel has them (Linux 6.6), pinned so they outlive
//! the agent; elsewhere (Debian 12's 6.1, Ubuntu 22.04's 5.15, RHEL 9's 5.14) with a clsact qdisc
//! and one cls_bpf filter per direction at meshd's own priority and handle, which a restart
//! adopts by swapping the program in place. Either way there is one attachment per direction,
//! and no moment without a program.

use std::path::Path;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, RingBuf};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
pub use ebpf_common::{
    AuthKey, AuthValue, EVENT_AUTH_REQUIRED, EVENT_DROP, EndpointConfig, Event, IpcacheValue,
    METRICS_SLOTS, MetricValue, POLICY_FLAG_DENY, PolicyKey, PolicyValue, REASON_AUTH_REQUIRED,
    REASON_POLICY_DENIED, REASON_UNENCRYPTED, StrictConfig,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshd-tc"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF programs failed: {0}; is bpffs mounted at the pin directory and are we root?"
    )]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching to {interface}: {source}")]
    Attach {
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("creating the pin directory {path}: {source}; is bpffs mounted there?")]
    PinDir {
        path: String,
        source: std::io::Error,
    },
    #[error("pinning the {name} link: {message}")]
    Link { name: &'static str, message: String },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error(
        "the kernel is {found}; meshd's eBPF datapath needs {needed} ({feature}): upgrade the \
         kernel, or run the agent with enable-policy=never (no policy enforcement)"
    )]
    KernelTooOld {
        found: String,
        needed: &'static str,
        feature: &'static str,
    },
}

/// The oldest kernel the datapath works on at all: the programs report drops and
/// AUTH_REQUIRED through a BPF ring buffer (Linux 5.8).
pub const MIN_KERNEL: (u8, u8, &str, &str) = (5, 8, "Linux 5.8", "BPF ring buffers");

/// How programs attach to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (Linux 6.6), pinned beside the endpoint's maps.
    Tcx,
    /// A clsact qdisc and one direct-action cls_bpf filter per direction, at meshd's
    /// [`FILTER_PRIORITY`] and [`FILTER_HANDLE`] (what `tc filter show` lists).
    Netlink,
}

/// `tc filter show dev <veth> ingress|egress`: `pref 1 … handle 0x1 … direct-action`, as
/// Cilium's own filters.
pub const FILTER_PRIORITY: u16 = 1;
pub const FILTER_HANDLE: u32 = 1;

impl AttachMode {
    /// What this kernel offers: TCX from 6.6, the netlink filters before. Below the oldest
    /// kernel the datapath works on, an error that names the version and the missing feature.
    pub fn for_running_kernel() -> Result<Self, DatapathError> {
        let v = KernelVersion::current().map_err(|e| DatapathError::KernelTooOld {
            found: format!("unknown ({e})"),
            needed: MIN_KERNEL.2,
            feature: MIN_KERNEL.3,
        })?;
        Self::for_kernel(v)
    }

    pub fn for_kernel(v: KernelVersion) -> Result<Self, DatapathError> {
        let code = v.code();
        let at_least = |major: u32, minor: u32| code >= (major << 16) + (minor << 8);
        if !at_least(u32::from(MIN_KERNEL.0), u32::from(MIN_KERNEL.1)) {
            return Err(DatapathError::KernelTooOld {
                found: format!("Linux {v}"),
                needed: MIN_KERNEL.2,
                feature: MIN_KERNEL.3,
            });
        }
        Ok(if at_least(6, 6) {
            Self::Tcx
        } else {
            Self::Netlink
        })
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "tc clsact/cls_bpf",
        })
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Every entry of an LPM trie: (prefix length, key data, value).
fn lpm_entries<T: std::borrow::Borrow<MapData>, K: aya::Pod, V: aya::Pod>(
    trie: &LpmTrie<T, K, V>,
    name: &'static str,
) -> Result<Vec<(u32, K, V)>, DatapathError> {
    trie.iter()
        .map(|r| {
            r.map(|(k, v)| (k.prefix_len(), k.data(), v))
                .map_err(map_err(name))
        })
        .collect()
}

/// An LPM trie pinned at `path`, opened without loading any program.
fn pinned_lpm<K: aya::Pod, V: aya::Pod>(
    path: &Path,
    name: &'static str,
) -> Result<LpmTrie<MapData, K, V>, DatapathError> {
    let data = MapData::from_pin(path).map_err(map_err(name))?;
    LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).map_err(map_err(name))
}

/// One endpoint's programs and maps; dropping it detaches them.
pub struct EndpointDatapath {
    ebpf: Ebpf,
    pub interface: String,
    ep_dir: std::path::PathBuf,
    /// The policy entries last written (None: unknown, read the kernel first).
    written: Option<PolicyEntries>,
    /// The settings in force; their `policy_revision` is bumped on every change of settings
    /// or entries, which makes the programs judge established flows again.
    config: EndpointConfig,
}

type PolicyEntries = std::collections::HashMap<(u32, PolicyKey), PolicyValue>;

/// What one [`EndpointDatapath::set_policy`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicySync {
    /// Entries in force afterwards.
    pub entries: usize,
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub took: std::time::Duration,
}

impl PolicySync {
    pub fn is_noop(&self) -> bool {
        self.added + self.changed + self.removed == 0
    }
}

/// Key and value sizes of the pinned maps, as this build's programs use them.
fn pinned_layouts(pin_dir: &Path, ep_dir: &Path) -> [(std::path::PathBuf, usize, usize); 5] {
    use core::mem::size_of;
    [
        (
            pin_dir.join("MESHD_IPCACHE"),
            4 + 4,
            size_of::<IpcacheValue>(),
        ),
        (
            pin_dir.join("MESHD_AUTH"),
            size_of::<AuthKey>(),
            size_of::<AuthValue>(),
        ),
        (
            pin_dir.join("MESHD_CT"),
            size_of::<ebpf_common::CtKey>(),
            size_of::<ebpf_common::CtValue>(),
        ),
        (
            ep_dir.join("POLICY"),
            4 + size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
        ),
        (ep_dir.join("CONFIG"), 4, size_of::<EndpointConfig>()),
    ]
}

/// A map pinned by an older meshd whose layout differs from this build's would be reused by
/// the loader and then refused by the verifier: unpin it so a fresh one is created (programs
/// still attached keep their old map until they are swapped).
fn drop_incompatible_pins(pin_dir: &Path, ep_dir: &Path) {
    for (path, key, value) in pinned_layouts(pin_dir, ep_dir) {
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if (k, v) != (key, value) {
            tracing::warn!(
                map = %path.display(),
                pinned_key = k, pinned_value = v, key, value,
                "a pinned map has another layout (from an older meshd); replacing it"
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A TCX link, pinned beside the old one (from before a restart; both programs run meanwhile)
/// and renamed over it, which releases the old link: at every moment, a crash included, a
/// pinned program is attached.
fn attach_tcx(
    prog: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    dir: TcAttachType,
    ep_dir: &Path,
) -> Result<(), DatapathError> {
    let id = prog
        .attach_with_options(
            interface,
            dir,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| DatapathError::Attach {
            interface: interface.into(),
            source,
        })?;
    let link = prog
        .take_link(id)
        .map_err(|source| DatapathError::Program { name, source })?;
    let fd: aya::programs::links::FdLink =
        link.try_into()
            .map_err(|e: aya::programs::links::LinkError| DatapathError::Link {
                name,
                message: e.to_string(),
            })?;
    let pin = ep_dir.join(name);
    let next = ep_dir.join(format!("{name}_next")); // (bpffs names cannot hold a dot)
    let _ = std::fs::remove_file(&next);
    fd.pin(&next).map_err(|e| DatapathError::Link {
        name,
        message: e.to_string(),
    })?;
    std::fs::rename(&next, &pin).map_err(|e| DatapathError::Link {
        name,
        message: format!("replacing the pinned link {}: {e}", pin.display()),
    })?;
    Ok(())
}

/// meshd's filter on `interface` in direction `dir`, as a link aya can act on.
fn our_filter(interface: &str, dir: TcAttachType) -> std::io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(
        interface,
        dir,
        FILTER_PRIORITY,
        TcHandle::from(FILTER_HANDLE),
        None,
    )
}

/// The cls_bpf filter at meshd's priority and handle: its program is replaced in place when
/// it exists (an earlier run's, or an earlier try's), so there is never a second filter and
/// never a moment without one; created when it does not.
fn attach_filter(
    prog: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    dir: TcAttachType,
) -> Result<(), DatapathError> {
    let attach_err = |source| DatapathError::Attach {
        interface: interface.into(),
        source,
    };
    let replaced = our_filter(interface, dir)
        .ok()
        .and_then(|link| prog.attach_to_link(link).ok());
    let id = match replaced {
        Some(id) => id,
        None => prog
            .attach_with_options(
                interface,
                dir,
                TcAttachOptions::Netlink(NlOptions {
                    priority: FILTER_PRIORITY,
                    handle: TcHandle::from(FILTER_HANDLE),
                    classid: None,
                }),
            )
            .map_err(attach_err)?,
    };
    // The filter belongs to the interface, not to this process: taken out of the program so
    // that dropping it (the agent exiting) does not remove the filter.
    let link = prog
        .take_link(id)
        .map_err(|source| DatapathError::Program { name, source })?;
    std::mem::forget(link);
    Ok(())
}

/// Removes meshd's filters from `interface` (netlink mode; nothing to do for TCX, whose links
/// go with their pins).
pub fn remove_filters(interface: &str) {
    use aya::programs::links::Link as _;
    for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
        if let Ok(link) = our_filter(interface, dir) {
            // The interface may be gone already, and its filters with it.
            let _ = link.detach();
        }
    }
}

/// Where one endpoint's pins live: its policy and settings maps and its two program links.
pub fn endpoint_pin_dir(pin_dir: &Path, interface: &str) -> std::path::PathBuf {
    pin_dir.join("endpoints").join(interface)
}

impl EndpointDatapath {
    /// Loads an instance for the endpoint behind `interface` (its host-side veth) and attaches
    /// `from_endpoint` (TC ingress) and `to_endpoint` (TC egress). Maps and links are pinned, so
    /// enforcement goes on while the agent is down; a restarted agent reuses the pinned maps
    /// (entries included) and swaps in fresh programs before it lets the old links go, so there
    /// is no moment without a program.
    pub fn attach(
        interface: &str,
        pin_dir: &Path,
        config: EndpointConfig,
        mode: AttachMode,
    ) -> Result<Self, DatapathError> {
        let ep_dir = endpoint_pin_dir(pin_dir, interface);
        std::fs::create_dir_all(&ep_dir).map_err(|source| DatapathError::PinDir {
            path: ep_dir.display().to_string(),
            source,
        })?;
        drop_incompatible_pins(pin_dir, &ep_dir);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_pin_path("POLICY", ep_dir.join("POLICY"))
            .map_pin_path("CONFIG", ep_dir.join("CONFIG"))
            .load(OBJECT)?;
        if mode == AttachMode::Netlink {
            // An existing clsact qdisc is fine.
            let _ = tc::qdisc_add_clsact(interface);
        }
        for (name, dir) in [
            ("from_endpoint", TcAttachType::Ingress),
            ("to_endpoint", TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingMap(name))?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
            match mode {
                AttachMode::Tcx => attach_tcx(prog, name, interface, dir, &ep_dir)?,
                AttachMode::Netlink => attach_filter(prog, name, interface, dir)?,
            }
        }
        let mut dp = Self {
            ebpf,
            interface: interface.to_string(),
            ep_dir,
            written: None,
            config: EndpointConfig::default(),
        };
        // An adopted map keeps its settings and revision (flows stay valid if nothing changed).
        dp.config = dp.read_config()?;
        dp.set_config(config)?;
        Ok(dp)
    }

    fn read_config(&self) -> Result<EndpointConfig, DatapathError> {
        let map = self
            .ebpf
            .map("CONFIG")
            .ok_or(DatapathError::MissingMap("CONFIG"))?;
        let a: Array<&MapData, EndpointConfig> = Array::try_from(map).map_err(map_err("CONFIG"))?;
        a.get(&0, 0).map_err(map_err("CONFIG"))
    }

    /// The settings in force, with their policy revision.
    pub fn config(&self) -> EndpointConfig {
        self.config
    }

    /// Writes the endpoint's settings (its `policy_revision` is the loader's: bumped when
    /// anything changed).
    pub fn set_config(&mut self, config: EndpointConfig) -> Result<(), DatapathError> {
        let same = EndpointConfig {
            policy_revision: self.config.policy_revision,
            ..config
        } == self.config;
        if !same {
            self.bump(config)?;
        }
        Ok(())
    }

    fn bump(&mut self, config: EndpointConfig) -> Result<(), DatapathError> {
        let next = EndpointConfig {
            policy_revision: self.config.policy_revision.wrapping_add(1),
            ..config
        };
        let map = self
            .ebpf
            .map_mut("CONFIG")
            .ok_or(DatapathError::MissingMap("CONFIG"))?;
        let mut a: Array<&mut MapData, EndpointConfig> =
            Array::try_from(map).map_err(map_err("CONFIG"))?;
        a.set(0, next, 0).map_err(map_err("CONFIG"))?;
        self.config = next;
        Ok(())
    }

    /// Entries first, then settings, under one new revision when anything changed: what the
    /// agent calls on every pass.
    pub fn sync(
        &mut self,
        config: EndpointConfig,
        entries: &[(u32, PolicyKey, PolicyValue)],
    ) -> Result<PolicySync, DatapathError> {
        let sync = self.write_entries(entries)?;
        if sync.is_noop() {
            self.set_config(config)?;
        } else {
            self.bump(config)?;
        }
        Ok(sync)
    }

    /// Replaces the endpoint's policy entries with `entries` (prefix length, key, value):
    /// entries already right stay, stale ones are removed first (a change never widens access
    /// in between), then missing or changed ones are written. What the kernel holds is read
    /// once (after attach or adoption, or after a failed write) and remembered, so a pass with
    /// nothing to change makes no system call.
    pub fn set_policy(
        &mut self,
        entries: &[(u32, PolicyKey, PolicyValue)],
    ) -> Result<PolicySync, DatapathError> {
        let config = self.config;
        self.sync(config, entries)
    }

    fn write_entries(
        &mut self,
        entries: &[(u32, PolicyKey, PolicyValue)],
    ) -> Result<PolicySync, DatapathError> {
        let started = std::time::Instant::now();
        let current = match self.written.take() {
            Some(w) => w,
            None => self
                .policy()?
                .into_iter()
                .map(|(p, k, v)| ((p, k), v))
                .collect(),
        };
        let want: PolicyEntries = entries.iter().map(|(p, k, v)| ((*p, *k), *v)).collect();
        let map = self
            .ebpf
            .map_mut("POLICY")
            .ok_or(DatapathError::MissingMap("POLICY"))?;
        let mut trie: LpmTrie<&mut MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(map).map_err(map_err("POLICY"))?;
        let mut sync = PolicySync {
            entries: want.len(),
            ..PolicySync::default()
        };
        for (p, k) in current.keys().filter(|pk| !want.contains_key(*pk)) {
            trie.remove(&Key::new(*p, *k)).map_err(map_err("POLICY"))?;
            sync.removed += 1;
        }
        for ((p, k), v) in &want {
            match current.get(&(*p, *k)) {
                Some(old) if old == v => continue,
                Some(_) => sync.changed += 1,
                None => sync.added += 1,
            }
            trie.insert(&Key::new(*p, *k), *v, 0)
                .map_err(map_err("POLICY"))?;
        }
        // Only a complete pass is remembered; after an error the next one reads the kernel.
        self.written = Some(want);
        sync.took = started.elapsed();
        Ok(sync)
    }

    /// The endpoint's policy entries as the kernel has them.
    pub fn policy(&self) -> Result<Vec<(u32, PolicyKey, PolicyValue)>, DatapathError> {
        let map = self
            .ebpf
            .map("POLICY")
            .ok_or(DatapathError::MissingMap("POLICY"))?;
        let trie: LpmTrie<&MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(map).map_err(map_err("POLICY"))?;
        lpm_entries(&trie, "POLICY")
    }

    pub fn ipcache_upsert(
        &mut self,
        addr: [u8; 4],
        prefix: u32,
        value: IpcacheValue,
    ) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut("MESHD_IPCACHE")
            .ok_or(DatapathError::MissingMap("MESHD_IPCACHE"))?;
        let mut trie: LpmTrie<&mut MapData, [u8; 4], IpcacheValue> =
            LpmTrie::try_from(map).map_err(map_err("MESHD_IPCACHE"))?;
        trie.insert(&Key::new(prefix, addr), value, 0)
            .map_err(map_err("MESHD_IPCACHE"))
    }

    pub fn auth_upsert(&mut self, key: AuthKey, value: AuthValue) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut("MESHD_AUTH")
            .ok_or(DatapathError::MissingMap("MESHD_AUTH"))?;
        let mut h: HashMap<&mut MapData, AuthKey, AuthValue> =
            HashMap::try_from(map).map_err(map_err("MESHD_AUTH"))?;
        h.insert(key, value, 0).map_err(map_err("MESHD_AUTH"))
    }

    /// Takes the event ring buffer (once per process).
    pub fn events(&mut self) -> Result<Events, DatapathError> {
        let map = self
            .ebpf
            .take_map("MESHD_EVENTS")
            .ok_or(DatapathError::MissingMap("MESHD_EVENTS"))?;
        Ok(Events(
            RingBuf::try_from(map).map_err(map_err("MESHD_EVENTS"))?,
        ))
    }
}

/// Drop and AUTH_REQUIRED events from the datapath.
pub struct Events(RingBuf<MapData>);

impl Events {
    /// The next pending event, if any (non-blocking).
    pub fn next_event(&mut self) -> Option<Event> {
        let item = self.0.next()?;
        if item.len() < std::mem::size_of::<Event>() {
            return None;
        }
        let mut e = Event::default();
        // Event is plain old data: read it field by field rather than cast the bytes.
        let b = &item[..];
        e.kind = b[0];
        e.reason = b[1];
        e.proto = b[2];
        e.egress = b[3];
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        e.signal_nr = u32_at(4);
        e.src_identity = u32_at(8);
        e.dst_identity = u32_at(12);
        e.saddr.copy_from_slice(&b[16..20]);
        e.daddr.copy_from_slice(&b[20..24]);
        e.dport = u16_at(24);
        e.auth = AuthKey {
            local_identity: u32_at(28),
            remote_identity: u32_at(32),
            remote_node_id: u16_at(36),
            auth_type: b[38],
            pad: 0,
        };
        Some(e)
    }
}

/// Seconds of CLOCK_MONOTONIC, the clock the datapath compares auth expirations against
/// (`bpf_ktime_get_ns`).
pub fn monotonic_seconds() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| t.tv_sec() as u64)
}

/// Removes an endpoint's pins: its programs detach and its maps are freed. Used for endpoints
/// that are gone (also ones deleted while the agent was down).
pub fn remove_endpoint_pins(pin_dir: &Path, interface: &str) {
    let dir = endpoint_pin_dir(pin_dir, interface);
    for name in ["from_endpoint", "to_endpoint", "POLICY", "CONFIG"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(&dir);
}

/// Interfaces that have pinned programs under `pin_dir`.
pub fn pinned_endpoints(pin_dir: &Path) -> Vec<String> {
    std::fs::read_dir(pin_dir.join("endpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

impl EndpointDatapath {
    /// Detaches and forgets this endpoint (pins removed).
    pub fn remove(self) {
        let pin_dir = self
            .ep_dir
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let interface = self.interface.clone();
        drop(self);
        remove_filters(&interface);
        if let Some(p) = pin_dir {
            remove_endpoint_pins(&p, &interface);
        }
    }
}

/// The pinned auth map, opened without loading any program (as `cilium-dbg bpf auth` does).
pub struct AuthMap(HashMap<MapData, AuthKey, AuthValue>);

impl AuthMap {
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = MapData::from_pin(pin_dir.join("MESHD_AUTH")).map_err(map_err("MESHD_AUTH"))?;
        let map = aya::maps::Map::HashMap(data);
        Ok(Self(HashMap::try_from(map).map_err(map_err("MESHD_AUTH"))?))
    }

    pub fn insert(&mut self, key: AuthKey, value: AuthValue) -> Result<(), DatapathError> {
        self.0.insert(key, value, 0).map_err(map_err("MESHD_AUTH"))
    }

    pub fn list(&self) -> Vec<(AuthKey, AuthValue)> {
        self.0.iter().filter_map(Result::ok).collect()
    }
}

/// The pinned ipcache, opened on its own (it outlives every endpoint) and kept equal to a
/// desired set: what the kernel holds is read once after opening, then only differences are
/// written.
pub struct Ipcache {
    trie: LpmTrie<MapData, [u8; 4], IpcacheValue>,
    written: Option<std::collections::BTreeMap<([u8; 4], u32), IpcacheValue>>,
}

impl Ipcache {
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let trie = pinned_lpm(&pin_dir.join("MESHD_IPCACHE"), "MESHD_IPCACHE")?;
        Ok(Self {
            trie,
            written: None,
        })
    }

    /// Makes the map hold exactly `want` ((address, prefix length) → value): new and changed
    /// entries first, then the ones no longer wanted. Returns (written, removed).
    pub fn sync(
        &mut self,
        want: &std::collections::BTreeMap<([u8; 4], u32), IpcacheValue>,
    ) -> Result<(usize, usize), DatapathError> {
        let current = match self.written.take() {
            Some(w) => w,
            None => lpm_entries(&self.trie, "MESHD_IPCACHE")?
                .into_iter()
                .map(|(prefix, addr, v)| ((addr, prefix), v))
                .collect(),
        };
        let mut counts = (0, 0);
        for ((addr, prefix), v) in want {
            if current.get(&(*addr, *prefix)) != Some(v) {
                self.trie
                    .insert(&Key::new(*prefix, *addr), *v, 0)
                    .map_err(map_err("MESHD_IPCACHE"))?;
                counts.0 += 1;
            }
        }
        for (addr, prefix) in current.keys().filter(|k| !want.contains_key(*k)) {
            match self.trie.remove(&Key::new(*prefix, *addr)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => counts.1 += 1,
                Err(e) => return Err(map_err("MESHD_IPCACHE")(e)),
            }
        }
        self.written = Some(want.clone());
        Ok(counts)
    }
}

/// An endpoint's pinned policy map, read without the agent (`meshd bpf policy get`).
pub fn read_policy(
    pin_dir: &Path,
    interface: &str,
) -> Result<Vec<(u32, PolicyKey, PolicyValue)>, DatapathError> {
    let path = endpoint_pin_dir(pin_dir, interface).join("POLICY");
    lpm_entries(&pinned_lpm(&path, "POLICY")?, "POLICY")
}

/// The pinned ipcache, read without the agent (`meshd bpf ipcache list`).
pub fn read_ipcache(pin_dir: &Path) -> Result<Vec<([u8; 4], u32, IpcacheValue)>, DatapathError> {
    let trie = pinned_lpm(&pin_dir.join("MESHD_IPCACHE"), "MESHD_IPCACHE")?;
    Ok(lpm_entries(&trie, "MESHD_IPCACHE")?
        .into_iter()
        .map(|(prefix, addr, v)| (addr, prefix, v))
        .collect())
}

/// The maps every endpoint's programs share, created (pinned under `pin_dir`) without
/// attaching anything when no endpoint has done so yet.
fn ensure_shared_maps(pin_dir: &Path, probe: &str) -> Result<(), DatapathError> {
    if pin_dir.join(probe).exists() {
        return Ok(());
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
        path: pin_dir.display().to_string(),
        source,
    })?;
    EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(OBJECT)?;
    Ok(())
}

/// What encryption strict mode should be in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StrictWant {
    pub config: StrictConfig,
    /// Strict prefixes: (network address, prefix length).
    pub v4: std::collections::BTreeSet<([u8; 4], u32)>,
    pub v6: std::collections::BTreeSet<([u8; 16], u32)>,
    /// Interface indexes of local endpoints.
    pub local_ifs: std::collections::BTreeSet<u32>,
}

/// Encryption strict mode's pinned maps, kept equal to a [`StrictWant`]. Changes are ordered
/// so that nothing is briefly open: new prefixes and interfaces first, then the settings,
/// then what is no longer wanted.
pub struct StrictMode {
    config: Array<MapData, StrictConfig>,
    v4: LpmTrie<MapData, [u8; 4], u8>,
    v6: LpmTrie<MapData, [u8; 16], u8>,
    local_ifs: HashMap<MapData, u32, u8>,
    written: Option<StrictWant>,
}

fn pinned(pin_dir: &Path, name: &'static str) -> Result<aya::maps::MapData, DatapathError> {
    MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))
}

impl StrictMode {
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        ensure_shared_maps(pin_dir, "MESHD_STRICT_CFG")?;
        Ok(Self {
            config: Array::try_from(aya::maps::Map::Array(pinned(pin_dir, "MESHD_STRICT_CFG")?))
                .map_err(map_err("MESHD_STRICT_CFG"))?,
            v4: pinned_lpm(&pin_dir.join("MESHD_STRICT4"), "MESHD_STRICT4")?,
            v6: pinned_lpm(&pin_dir.join("MESHD_STRICT6"), "MESHD_STRICT6")?,
            local_ifs: HashMap::try_from(aya::maps::Map::HashMap(pinned(
                pin_dir,
                "MESHD_LOCAL_IFS",
            )?))
            .map_err(map_err("MESHD_LOCAL_IFS"))?,
            written: None,
        })
    }

    fn read(&self) -> Result<StrictWant, DatapathError> {
        Ok(StrictWant {
            config: self
                .config
                .get(&0, 0)
                .map_err(map_err("MESHD_STRICT_CFG"))?,
            v4: lpm_entries(&self.v4, "MESHD_STRICT4")?
                .into_iter()
                .map(|(p, a, _)| (a, p))
                .collect(),
            v6: lpm_entries(&self.v6, "MESHD_STRICT6")?
                .into_iter()
                .map(|(p, a, _)| (a, p))
                .collect(),
            local_ifs: self
                .local_ifs
                .keys()
                .collect::<Result<_, _>>()
                .map_err(map_err("MESHD_LOCAL_IFS"))?,
        })
    }

    /// Makes the kernel hold `want`; returns whether anything was written.
    pub fn sync(&mut self, want: &StrictWant) -> Result<bool, DatapathError> {
        let have = match self.written.take() {
            Some(w) => w,
            None => self.read()?,
        };
        if &have == want {
            self.written = Some(have);
            return Ok(false);
        }
        for (a, p) in want.v4.difference(&have.v4) {
            self.v4
                .insert(&Key::new(*p, *a), 1, 0)
                .map_err(map_err("MESHD_STRICT4"))?;
        }
        for (a, p) in want.v6.difference(&have.v6) {
            self.v6
                .insert(&Key::new(*p, *a), 1, 0)
                .map_err(map_err("MESHD_STRICT6"))?;
        }
        for i in want.local_ifs.difference(&have.local_ifs) {
            self.local_ifs
                .insert(i, 1, 0)
                .map_err(map_err("MESHD_LOCAL_IFS"))?;
        }
        if want.config != have.config {
            self.config
                .set(0, want.config, 0)
                .map_err(map_err("MESHD_STRICT_CFG"))?;
        }
        let gone = |r: Result<(), aya::maps::MapError>, name| match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(name)(e)),
        };
        for (a, p) in have.v4.difference(&want.v4) {
            gone(self.v4.remove(&Key::new(*p, *a)), "MESHD_STRICT4")?;
        }
        for (a, p) in have.v6.difference(&want.v6) {
            gone(self.v6.remove(&Key::new(*p, *a)), "MESHD_STRICT6")?;
        }
        for i in have.local_ifs.difference(&want.local_ifs) {
            gone(self.local_ifs.remove(i), "MESHD_LOCAL_IFS")?;
        }
        self.written = Some(want.clone());
        Ok(true)
    }
}

/// One drop counter: packets and bytes summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropCount {
    pub reason: u8,
    pub egress: bool,
    pub count: u64,
    pub bytes: u64,
}

/// The datapath's drop counters (non-zero ones), read from the pinned per-CPU map.
pub fn read_drop_counts(pin_dir: &Path) -> Result<Vec<DropCount>, DatapathError> {
    let path = pin_dir.join("MESHD_METRICS");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let data = MapData::from_pin(&path).map_err(map_err("MESHD_METRICS"))?;
    let map: aya::maps::PerCpuArray<MapData, MetricValue> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(map_err("MESHD_METRICS"))?;
    let mut out = Vec::new();
    for slot in 0..METRICS_SLOTS {
        let values = map.get(&slot, 0).map_err(map_err("MESHD_METRICS"))?;
        let (count, bytes) = values
            .iter()
            .fold((0, 0), |(c, b), v| (c + v.count, b + v.bytes));
        if count > 0 {
            out.push(DropCount {
                reason: (slot / 2) as u8,
                egress: slot % 2 == 1,
                count,
                bytes,
            });
        }
    }
    Ok(out)
}
