//! NetworkPolicies parsed into the evaluator's form, with every user error reported
//! with the policy's name (an invalid CIDR, protocol or selector operator).

use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::Protocol;

/// A label selector. An empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: BTreeMap<String, String>,
    expressions: Vec<Expression>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expression {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    pub fn parse(selector: &LabelSelector) -> Result<Self, String> {
        let mut expressions = Vec::new();
        for e in selector.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            expressions.push(match e.operator.as_str() {
                "In" => Expression::In(e.key.clone(), values),
                "NotIn" => Expression::NotIn(e.key.clone(), values),
                "Exists" => Expression::Exists(e.key.clone()),
                "DoesNotExist" => Expression::DoesNotExist(e.key.clone()),
                other => return Err(format!("unknown label selector operator {other:?}")),
            });
        }
        Ok(Self {
            labels: selector.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| match e {
                Expression::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                // NotIn matches a missing key too (Kubernetes label selector rules).
                Expression::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Expression::Exists(k) => labels.contains_key(k),
                Expression::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// Which namespaces a pod peer may be in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// The policy's own namespace (no namespaceSelector).
    Own(String),
    Selected(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` (all when `None`) in `namespaces`.
    Pods {
        namespaces: Namespaces,
        pods: Option<Selector>,
    },
    /// Addresses in `cidr` but in none of `except`.
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortNumber {
    Number(u16),
    Named(String),
}

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortNumber>,
    /// Inclusive end of a numeric range.
    pub end_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None`: every peer (the list was absent or empty).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port (the list was absent or empty).
    pub ports: Option<Vec<Port>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub affects_ingress: bool,
    pub affects_egress: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl Policy {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Parses `policy`; `default_namespace` is used when it names none.
    pub fn parse(policy: &NetworkPolicy, default_namespace: &str) -> Result<Self, String> {
        let namespace = policy
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_string());
        let name = policy.metadata.name.clone().unwrap_or_default();
        let fail = |msg: String| format!("NetworkPolicy {namespace}/{name}: {msg}");
        let spec = policy.spec.clone().unwrap_or_default();
        let types = spec.policy_types.clone();
        // Without policyTypes, every policy affects ingress and those with an egress
        // section affect egress too (API reference, NetworkPolicySpec.policyTypes).
        let (affects_ingress, affects_egress) = match &types {
            Some(types) => {
                for t in types {
                    if t != "Ingress" && t != "Egress" {
                        return Err(fail(format!("unknown policyType {t:?}")));
                    }
                }
                (
                    types.iter().any(|t| t == "Ingress"),
                    types.iter().any(|t| t == "Egress"),
                )
            }
            None => (true, spec.egress.is_some()),
        };
        let rules = |rules: Vec<RawRule>| {
            rules
                .into_iter()
                .map(|(peers, ports)| parse_rule(peers, ports, &namespace))
                .collect::<Result<Vec<_>, _>>()
        };
        let ingress = rules(
            spec.ingress
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.from, r.ports))
                .collect(),
        )
        .map_err(fail)?;
        let egress = rules(
            spec.egress
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.to, r.ports))
                .collect(),
        )
        .map_err(fail)?;
        Ok(Self {
            pod_selector: Selector::parse(&spec.pod_selector.unwrap_or_default()).map_err(fail)?,
            namespace,
            name,
            affects_ingress,
            affects_egress,
            ingress,
            egress,
        })
    }
}

/// A rule as the API has it: its peers (`from` or `to`) and ports.
type RawRule = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>);

fn parse_rule(
    peers: Option<Vec<NetworkPolicyPeer>>,
    ports: Option<Vec<NetworkPolicyPort>>,
    namespace: &str,
) -> Result<Rule, String> {
    let peers = match peers {
        Some(peers) if !peers.is_empty() => Some(
            peers
                .iter()
                .map(|p| parse_peer(p, namespace))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let ports = match ports {
        Some(ports) if !ports.is_empty() => {
            Some(ports.iter().map(parse_port).collect::<Result<Vec<_>, _>>()?)
        }
        _ => None,
    };
    Ok(Rule { peers, ports })
}

fn parse_peer(peer: &NetworkPolicyPeer, namespace: &str) -> Result<Peer, String> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err("a peer with ipBlock may not have selectors".into());
        }
        let cidr: IpNet = block
            .cidr
            .parse()
            .map_err(|_| format!("ipBlock.cidr {:?} is not a CIDR", block.cidr))?;
        let except = block
            .except
            .iter()
            .flatten()
            .map(|e| {
                e.parse::<IpNet>()
                    .map_err(|_| format!("ipBlock.except {e:?} is not a CIDR"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Peer::IpBlock {
            cidr: cidr.trunc(),
            except,
        });
    }
    let pods = peer.pod_selector.as_ref().map(Selector::parse).transpose()?;
    let namespaces = match &peer.namespace_selector {
        Some(selector) => Namespaces::Selected(Selector::parse(selector)?),
        None if pods.is_some() => Namespaces::Own(namespace.to_string()),
        None => return Err("a peer needs podSelector, namespaceSelector or ipBlock".into()),
    };
    Ok(Peer::Pods { namespaces, pods })
}

fn parse_port(port: &NetworkPolicyPort) -> Result<Port, String> {
    let protocol = Protocol::parse(port.protocol.as_deref()).ok_or_else(|| {
        format!(
            "unknown protocol {:?}",
            port.protocol.as_deref().unwrap_or_default()
        )
    })?;
    let number = match &port.port {
        None => None,
        Some(IntOrString::Int(n)) => Some(PortNumber::Number(
            u16::try_from(*n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("port {n} is out of range"))?,
        )),
        Some(IntOrString::String(name)) => Some(PortNumber::Named(name.clone())),
    };
    let end_port = match port.end_port {
        None => None,
        Some(end) => {
            let end = u16::try_from(end).map_err(|_| format!("endPort {end} is out of range"))?;
            match &number {
                Some(PortNumber::Number(start)) if end >= *start => Some(end),
                Some(PortNumber::Number(start)) => {
                    return Err(format!("endPort {end} is below port {start}"));
                }
                _ => return Err("endPort needs a numeric port".into()),
            }
        }
    };
    Ok(Port {
        protocol,
        port: number,
        end_port,
    })
}
