//! From the YAML models to one checked form for all three policy kinds. Every error names the
//! object and the field; everything meshd cannot enforce is recorded and made to allow nothing
//! (or, in a deny rule, to deny more), so access is never widened.

use ipnet::IpNet;

use crate::PolicyError;
use crate::model::{
    CidrRule, CiliumPolicyDoc, EgressRule, Entity, IngressRule, LabelSelector, NetworkPolicyDoc,
    NetworkPolicyPeer, NetworkPolicyPort, PolicyType, PortRule, PortValue, Protocol, Rule,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

/// Something in a policy that meshd does not enforce, and what it does instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub object: String,
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Any,
    /// Endpoints matching `selector`, within `namespace` when set.
    Endpoints {
        selector: LabelSelector,
        namespace: Option<String>,
    },
    /// NetworkPolicy: pods (all, or matching `pods`) in namespaces matching `namespaces`.
    NamespacePods {
        namespaces: LabelSelector,
        pods: Option<LabelSelector>,
    },
    Entity(Entity),
    Cidr {
        net: IpNet,
        except: Vec<IpNet>,
    },
}

/// `proto` 0 = any protocol; `lo..=hi` 0..=65535 = any port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortSpec {
    pub proto: u8,
    pub lo: u16,
    pub hi: u16,
}

impl PortSpec {
    pub const ALL: PortSpec = PortSpec {
        proto: 0,
        lo: 0,
        hi: u16::MAX,
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRule {
    /// Empty: the rule allows (or denies) nothing.
    pub peers: Vec<Peer>,
    /// Empty: nothing; `[PortSpec::ALL]`: every port.
    pub ports: Vec<PortSpec>,
    /// Policy-map auth byte (0, or type | 0x80).
    pub auth: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub selector: LabelSelector,
    /// CiliumNetworkPolicy and NetworkPolicy select only in their namespace.
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Direction {
    /// Some: the rule enforces this direction (default deny) with these allow rules.
    pub allow: Option<Vec<PeerRule>>,
    pub deny: Vec<PeerRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRule {
    pub subject: Subject,
    pub ingress: Direction,
    pub egress: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub kind: Kind,
    pub name: String,
    pub namespace: Option<String>,
    pub rules: Vec<SubjectRule>,
    pub unsupported: Vec<Unsupported>,
}

impl Policy {
    pub fn object(&self) -> String {
        object_name(self.kind, self.namespace.as_deref(), &self.name)
    }
}

fn object_name(kind: Kind, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{kind:?} {ns}/{name}"),
        None => format!("{kind:?} {name}"),
    }
}

struct Ctx {
    kind: Kind,
    object: String,
    namespace: Option<String>,
    unsupported: Vec<Unsupported>,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn unsupported(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.unsupported.push(Unsupported {
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// Peer selectors of a CiliumNetworkPolicy are scoped to its namespace unless they name one.
    fn scope(&self, sel: &LabelSelector) -> Option<String> {
        match self.kind {
            Kind::CiliumClusterwideNetworkPolicy => None,
            _ if sel.names_namespace() => None,
            _ => self.namespace.clone(),
        }
    }
}

fn parse_net(ctx: &Ctx, field: &str, s: &str) -> Result<IpNet, PolicyError> {
    let net: IpNet = s
        .parse()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| ctx.err(field, format!("{s:?} is not a CIDR (e.g. 10.0.0.0/8)")))?;
    Ok(net.trunc())
}

fn cidr_peer(ctx: &mut Ctx, field: &str, rule: &CidrRule) -> Result<Option<Peer>, PolicyError> {
    if rule.cidr_group_ref.is_some() || rule.cidr_group_selector.is_some() {
        ctx.unsupported(
            format!("{field}.cidrGroupRef"),
            "CIDR groups are not supported; this entry selects nothing",
        );
        return Ok(None);
    }
    let Some(cidr) = &rule.cidr else {
        return Err(ctx.err(format!("{field}.cidr"), "Required value"));
    };
    let net = parse_net(ctx, &format!("{field}.cidr"), cidr)?;
    let mut except = Vec::new();
    for (i, e) in rule.except.iter().enumerate() {
        let f = format!("{field}.except[{i}]");
        let x = parse_net(ctx, &f, e)?;
        if !net.contains(&x) {
            return Err(ctx.err(f, format!("{x} is not inside {net}")));
        }
        except.push(x);
    }
    Ok(Some(Peer::Cidr { net, except }))
}

fn port_number(ctx: &mut Ctx, field: &str, v: &PortValue) -> Result<Option<u16>, PolicyError> {
    let n = match v {
        PortValue::Number(n) => *n,
        PortValue::Text(s) => match s.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                ctx.unsupported(
                    field,
                    format!("named port {s:?} is not supported; this port selects nothing"),
                );
                return Ok(None);
            }
        },
    };
    u16::try_from(n)
        .map(Some)
        .map_err(|_| ctx.err(field, format!("{n} is not a port number (0-65535)")))
}

fn port_spec(
    ctx: &mut Ctx,
    field: &str,
    port: Option<&PortValue>,
    end: Option<u32>,
    proto: Protocol,
) -> Result<Option<PortSpec>, PolicyError> {
    let lo = match port {
        None => 0,
        Some(v) => match port_number(ctx, &format!("{field}.port"), v)? {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let hi = match end {
        None if lo == 0 => u16::MAX,
        None => lo,
        Some(e) => {
            let e = u16::try_from(e).map_err(|_| {
                ctx.err(
                    format!("{field}.endPort"),
                    format!("{e} is not a port number"),
                )
            })?;
            if e < lo {
                return Err(ctx.err(
                    format!("{field}.endPort"),
                    format!("{e} is below port {lo}"),
                ));
            }
            e
        }
    };
    Ok(Some(PortSpec {
        proto: proto.number(),
        lo,
        hi,
    }))
}

/// The ports of a rule: every port when `toPorts` is absent; nothing when every port rule
/// was unusable.
fn ports(
    ctx: &mut Ctx,
    field: &str,
    to_ports: Option<&Vec<PortRule>>,
) -> Result<Vec<PortSpec>, PolicyError> {
    let Some(rules) = to_ports else {
        return Ok(vec![PortSpec::ALL]);
    };
    let mut out = Vec::new();
    for (i, pr) in rules.iter().enumerate() {
        let f = format!("{field}.toPorts[{i}]");
        let l7 = [
            ("rules", pr.rules.is_some()),
            ("listener", pr.listener.is_some()),
            ("serverNames", pr.server_names.is_some()),
            ("originatingTLS", pr.originating_tls.is_some()),
            ("terminatingTLS", pr.terminating_tls.is_some()),
        ];
        if let Some((name, _)) = l7.iter().find(|(_, set)| *set) {
            ctx.unsupported(format!("{f}.{name}"), "L7 policy is not enforced by meshd; this port rule allows nothing (never more than the L7 rule would)");
            continue;
        }
        if pr.ports.is_empty() {
            out.push(PortSpec::ALL);
        }
        for (j, p) in pr.ports.iter().enumerate() {
            if let Some(spec) = port_spec(
                ctx,
                &format!("{f}.ports[{j}]"),
                p.port.as_ref(),
                p.end_port,
                p.protocol.unwrap_or(Protocol::Any),
            )? {
                out.push(spec);
            }
        }
    }
    Ok(out)
}

fn auth(rule_auth: Option<&crate::model::Authentication>) -> u8 {
    rule_auth.map_or(0, |a| {
        if a.mode == crate::model::AuthMode::Disabled {
            0
        } else {
            a.mode.map_byte()
        }
    })
}

/// Common part of ingress and egress rules.
struct PeerFields<'a> {
    endpoints: Option<&'a Vec<LabelSelector>>,
    entities: Option<&'a Vec<Entity>>,
    cidr: Option<&'a Vec<String>>,
    cidr_set: Option<&'a Vec<CidrRule>>,
    names: (&'static str, &'static str, &'static str, &'static str),
    /// Peer fields meshd cannot enforce that were set, by name.
    unsupported: Vec<&'static str>,
}

fn peers(ctx: &mut Ctx, field: &str, p: PeerFields<'_>) -> Result<Vec<Peer>, PolicyError> {
    let mut out = Vec::new();
    let mut any_field = false;
    if let Some(sels) = p.endpoints {
        any_field = true;
        for s in sels {
            out.push(Peer::Endpoints {
                selector: s.clone(),
                namespace: ctx.scope(s),
            });
        }
    }
    if let Some(ents) = p.entities {
        any_field = true;
        out.extend(ents.iter().map(|e| Peer::Entity(*e)));
    }
    if let Some(cidrs) = p.cidr {
        any_field = true;
        for (i, c) in cidrs.iter().enumerate() {
            let net = parse_net(ctx, &format!("{field}.{}[{i}]", p.names.2), c)?;
            out.push(Peer::Cidr {
                net,
                except: vec![],
            });
        }
    }
    if let Some(set) = p.cidr_set {
        any_field = true;
        for (i, c) in set.iter().enumerate() {
            if let Some(peer) = cidr_peer(ctx, &format!("{field}.{}[{i}]", p.names.3), c)? {
                out.push(peer);
            }
        }
    }
    for name in &p.unsupported {
        any_field = true;
        ctx.unsupported(
            format!("{field}.{name}"),
            format!("{name} is not supported; it selects no peers"),
        );
    }
    if !any_field {
        out.push(Peer::Any);
    }
    Ok(out)
}

fn ingress_rule(
    ctx: &mut Ctx,
    field: &str,
    r: &IngressRule,
    fail_closed: &mut bool,
) -> Result<PeerRule, PolicyError> {
    let mut unsupported = Vec::new();
    for (name, set) in [
        ("fromGroups", r.from_groups.is_some()),
        ("fromNodes", r.from_nodes.is_some()),
    ] {
        if set {
            unsupported.push(name);
        }
    }
    if r.from_requires.is_some() {
        ctx.unsupported(format!("{field}.fromRequires"), "fromRequires is not supported; ingress of the selected endpoints is denied entirely instead");
        *fail_closed = true;
    }
    let mut ports = ports(ctx, field, r.to_ports.as_ref())?;
    if r.icmps.is_some() {
        ctx.unsupported(
            format!("{field}.icmps"),
            "ICMP rules are not supported; this rule allows nothing",
        );
        ports.clear();
    }
    let peers = peers(
        ctx,
        field,
        PeerFields {
            endpoints: r.from_endpoints.as_ref(),
            entities: r.from_entities.as_ref(),
            cidr: r.from_cidr.as_ref(),
            cidr_set: r.from_cidr_set.as_ref(),
            names: ("fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet"),
            unsupported,
        },
    )?;
    Ok(PeerRule {
        peers,
        ports,
        auth: auth(r.authentication.as_ref()),
    })
}

fn egress_rule(
    ctx: &mut Ctx,
    field: &str,
    r: &EgressRule,
    fail_closed: &mut bool,
) -> Result<PeerRule, PolicyError> {
    let mut unsupported = Vec::new();
    for (name, set) in [
        ("toFQDNs", r.to_fqdns.is_some()),
        ("toServices", r.to_services.is_some()),
        ("toGroups", r.to_groups.is_some()),
        ("toNodes", r.to_nodes.is_some()),
    ] {
        if set {
            unsupported.push(name);
        }
    }
    if r.to_requires.is_some() {
        ctx.unsupported(format!("{field}.toRequires"), "toRequires is not supported; egress of the selected endpoints is denied entirely instead");
        *fail_closed = true;
    }
    let mut ports = ports(ctx, field, r.to_ports.as_ref())?;
    if r.icmps.is_some() {
        ctx.unsupported(
            format!("{field}.icmps"),
            "ICMP rules are not supported; this rule allows nothing",
        );
        ports.clear();
    }
    let peers = peers(
        ctx,
        field,
        PeerFields {
            endpoints: r.to_endpoints.as_ref(),
            entities: r.to_entities.as_ref(),
            cidr: r.to_cidr.as_ref(),
            cidr_set: r.to_cidr_set.as_ref(),
            names: ("toEndpoints", "toEntities", "toCIDR", "toCIDRSet"),
            unsupported,
        },
    )?;
    Ok(PeerRule {
        peers,
        ports,
        auth: auth(r.authentication.as_ref()),
    })
}

/// A deny rule that lost a part meshd cannot enforce denies more instead: every peer on its
/// ports (or every port).
fn widen_deny(mut r: PeerRule, lost: bool) -> PeerRule {
    if lost {
        r.peers = vec![Peer::Any];
        if r.ports.is_empty() {
            r.ports = vec![PortSpec::ALL];
        }
    }
    r
}

fn cilium_rule(
    ctx: &mut Ctx,
    field: &str,
    rule: &Rule,
) -> Result<Option<SubjectRule>, PolicyError> {
    if rule.node_selector.is_some() {
        ctx.unsupported(
            format!("{field}.nodeSelector"),
            "host policies (nodeSelector) are not supported; this rule is ignored",
        );
        return Ok(None);
    }
    let Some(selector) = rule.endpoint_selector.clone() else {
        return Err(ctx.err(
            format!("{field}.endpointSelector"),
            "Required value: a rule needs an endpointSelector",
        ));
    };
    let namespace = match ctx.kind {
        Kind::CiliumClusterwideNetworkPolicy => None,
        _ => ctx.namespace.clone(),
    };
    let mut out = SubjectRule {
        subject: Subject {
            selector,
            namespace,
        },
        ingress: Direction::default(),
        egress: Direction::default(),
    };
    let mut closed_in = false;
    let mut closed_out = false;
    if let Some(rs) = &rule.ingress {
        let mut v = Vec::new();
        for (i, r) in rs.iter().enumerate() {
            v.push(ingress_rule(
                ctx,
                &format!("{field}.ingress[{i}]"),
                r,
                &mut closed_in,
            )?);
        }
        out.ingress.allow = Some(v);
    }
    if let Some(rs) = &rule.ingress_deny {
        for (i, r) in rs.iter().enumerate() {
            let before = ctx.unsupported.len();
            let pr = ingress_rule(ctx, &format!("{field}.ingressDeny[{i}]"), r, &mut closed_in)?;
            out.ingress
                .deny
                .push(widen_deny(pr, ctx.unsupported.len() > before));
        }
        out.ingress.allow.get_or_insert_with(Vec::new);
    }
    if let Some(rs) = &rule.egress {
        let mut v = Vec::new();
        for (i, r) in rs.iter().enumerate() {
            v.push(egress_rule(
                ctx,
                &format!("{field}.egress[{i}]"),
                r,
                &mut closed_out,
            )?);
        }
        out.egress.allow = Some(v);
    }
    if let Some(rs) = &rule.egress_deny {
        for (i, r) in rs.iter().enumerate() {
            let before = ctx.unsupported.len();
            let pr = egress_rule(ctx, &format!("{field}.egressDeny[{i}]"), r, &mut closed_out)?;
            out.egress
                .deny
                .push(widen_deny(pr, ctx.unsupported.len() > before));
        }
        out.egress.allow.get_or_insert_with(Vec::new);
    }
    if closed_in {
        out.ingress = Direction {
            allow: Some(vec![]),
            deny: vec![PeerRule {
                peers: vec![Peer::Any],
                ports: vec![PortSpec::ALL],
                auth: 0,
            }],
        };
    }
    if closed_out {
        out.egress = Direction {
            allow: Some(vec![]),
            deny: vec![PeerRule {
                peers: vec![Peer::Any],
                ports: vec![PortSpec::ALL],
                auth: 0,
            }],
        };
    }
    Ok(Some(out))
}

fn knp_peer(ctx: &mut Ctx, field: &str, p: &NetworkPolicyPeer) -> Result<Peer, PolicyError> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, Some(b)) => {
            let rule = CidrRule {
                cidr: Some(b.cidr.clone()),
                except: b.except.clone(),
                cidr_group_ref: None,
                cidr_group_selector: None,
            };
            cidr_peer(ctx, &format!("{field}.ipBlock"), &rule)?
                .ok_or_else(|| ctx.err(field, "ipBlock is empty"))
        }
        (Some(pods), None, None) => Ok(Peer::Endpoints {
            selector: pods.clone(),
            namespace: ctx.namespace.clone(),
        }),
        (pods, Some(ns), None) => Ok(Peer::NamespacePods {
            namespaces: ns.clone(),
            pods: pods.clone(),
        }),
        (None, None, None) => Err(ctx.err(
            field,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        _ => Err(ctx.err(
            field,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
    }
}

fn knp_ports(
    ctx: &mut Ctx,
    field: &str,
    ports: &[NetworkPolicyPort],
) -> Result<Vec<PortSpec>, PolicyError> {
    if ports.is_empty() {
        return Ok(vec![PortSpec::ALL]);
    }
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let proto = p.protocol.unwrap_or(Protocol::Tcp);
        if proto == Protocol::Any {
            return Err(ctx.err(
                format!("{field}.ports[{i}].protocol"),
                "Unsupported value: \"ANY\": supported values: \"TCP\", \"UDP\", \"SCTP\"",
            ));
        }
        if let Some(s) = port_spec(
            ctx,
            &format!("{field}.ports[{i}]"),
            p.port.as_ref(),
            p.end_port,
            proto,
        )? {
            out.push(s);
        }
    }
    Ok(out)
}

fn network_policy(ctx: &mut Ctx, doc: &NetworkPolicyDoc) -> Result<Vec<SubjectRule>, PolicyError> {
    let spec = &doc.spec;
    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec![PolicyType::Ingress];
        if spec.egress.is_some() {
            t.push(PolicyType::Egress);
        }
        t
    });
    let mut rule = SubjectRule {
        subject: Subject {
            selector: spec.pod_selector.clone(),
            namespace: ctx.namespace.clone(),
        },
        ingress: Direction::default(),
        egress: Direction::default(),
    };
    if types.contains(&PolicyType::Ingress) {
        let mut v = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let f = format!("spec.ingress[{i}]");
            let peers = if r.from.is_empty() {
                vec![Peer::Any]
            } else {
                r.from
                    .iter()
                    .enumerate()
                    .map(|(j, p)| knp_peer(ctx, &format!("{f}.from[{j}]"), p))
                    .collect::<Result<_, _>>()?
            };
            v.push(PeerRule {
                peers,
                ports: knp_ports(ctx, &f, &r.ports)?,
                auth: 0,
            });
        }
        rule.ingress.allow = Some(v);
    }
    if types.contains(&PolicyType::Egress) {
        let mut v = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let f = format!("spec.egress[{i}]");
            let peers = if r.to.is_empty() {
                vec![Peer::Any]
            } else {
                r.to.iter()
                    .enumerate()
                    .map(|(j, p)| knp_peer(ctx, &format!("{f}.to[{j}]"), p))
                    .collect::<Result<_, _>>()?
            };
            v.push(PeerRule {
                peers,
                ports: knp_ports(ctx, &f, &r.ports)?,
                auth: 0,
            });
        }
        rule.egress.allow = Some(v);
    }
    Ok(vec![rule])
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    object: &str,
) -> Result<T, PolicyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        PolicyError {
            object: object.to_string(),
            field: if path == "." { "(object)".into() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

/// One YAML document to a checked policy.
pub(crate) fn from_yaml(value: serde_yaml::Value, doc_name: &str) -> Result<Policy, PolicyError> {
    let kind_str = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string();
    let ns = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .map(str::to_string);
    let kind = match kind_str.as_str() {
        "CiliumNetworkPolicy" => Kind::CiliumNetworkPolicy,
        "CiliumClusterwideNetworkPolicy" => Kind::CiliumClusterwideNetworkPolicy,
        "NetworkPolicy" => Kind::NetworkPolicy,
        "" => {
            return Err(PolicyError {
                object: doc_name.into(),
                field: "kind".into(),
                message: "Required value".into(),
            });
        }
        other => {
            return Err(PolicyError {
                object: doc_name.into(),
                field: "kind".into(),
                message: format!(
                    "{other:?} is not a policy kind (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)"
                ),
            });
        }
    };
    let namespace = match kind {
        Kind::CiliumClusterwideNetworkPolicy => None,
        _ => Some(ns.unwrap_or_else(|| "default".into())),
    };
    let object = if name.is_empty() {
        doc_name.to_string()
    } else {
        object_name(kind, namespace.as_deref(), &name)
    };
    let mut ctx = Ctx {
        kind,
        object: object.clone(),
        namespace: namespace.clone(),
        unsupported: Vec::new(),
    };
    if name.is_empty() {
        return Err(ctx.err("metadata.name", "Required value"));
    }
    let rules = match kind {
        Kind::NetworkPolicy => {
            let doc: NetworkPolicyDoc = typed(value, &object)?;
            if doc.api_version != "networking.k8s.io/v1" {
                return Err(ctx.err(
                    "apiVersion",
                    format!("{:?}: expected networking.k8s.io/v1", doc.api_version),
                ));
            }
            network_policy(&mut ctx, &doc)?
        }
        _ => {
            let doc: CiliumPolicyDoc = typed(value, &object)?;
            if doc.api_version != "cilium.io/v2" {
                return Err(ctx.err(
                    "apiVersion",
                    format!("{:?}: expected cilium.io/v2", doc.api_version),
                ));
            }
            let mut specs: Vec<(String, &Rule)> = Vec::new();
            if let Some(s) = &doc.spec {
                specs.push(("spec".into(), s));
            }
            for (i, s) in doc.specs.iter().flatten().enumerate() {
                specs.push((format!("specs[{i}]"), s));
            }
            if specs.is_empty() {
                return Err(ctx.err("spec", "Required value: spec or specs"));
            }
            let mut out = Vec::new();
            for (field, rule) in specs {
                if let Some(r) = cilium_rule(&mut ctx, &field, rule)? {
                    out.push(r);
                }
            }
            out
        }
    };
    Ok(Policy {
        kind,
        name,
        namespace,
        rules,
        unsupported: ctx.unsupported,
    })
}
