//! The decision: traffic from pod A to pod B on a port is allowed when A's egress
//! allows it and B's ingress allows it. A pod is isolated in a direction when some
//! policy of that type selects it; then some rule of such a policy must admit the
//! peer and the port. Peer sets are computed once per rule, so a probe over all
//! pairs costs a lookup per selecting policy and rule.

use std::collections::BTreeMap;

use crate::model::{Model, Pod, Protocol};
use crate::policy::{Namespaces, Peer, Policy, Port, PortNumber, Rule};

/// Why one direction allowed or refused the traffic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Direction {
    /// Policies that select the pod for this direction (empty: not isolated).
    pub selected_by: Vec<String>,
    /// Policies with a rule that admits the traffic.
    pub allowed_by: Vec<String>,
}

impl Direction {
    pub fn allowed(&self) -> bool {
        self.selected_by.is_empty() || !self.allowed_by.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub egress: Direction,
    pub ingress: Direction,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allowed() && self.ingress.allowed()
    }
}

/// A rule with its peers resolved to the pods of the model.
struct Compiled {
    /// `None`: every peer; else one flag per pod index.
    peers: Option<Vec<bool>>,
    ports: Option<Vec<Port>>,
}

pub struct Evaluator<'a> {
    pods: Vec<Pod<'a>>,
    policies: &'a [Policy],
    /// Per pod: indexes of policies selecting it for ingress / egress.
    ingress_of: Vec<Vec<usize>>,
    egress_of: Vec<Vec<usize>>,
    /// Per policy: its compiled ingress / egress rules.
    ingress_rules: Vec<Vec<Compiled>>,
    egress_rules: Vec<Vec<Compiled>>,
    index: BTreeMap<(&'a str, &'a str), usize>,
}

fn peer_matches(peer: &Peer, pod: &Pod<'_>) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            cidr.contains(&pod.pod.ip) && !except.iter().any(|e| e.contains(&pod.pod.ip))
        }
        Peer::Pods { namespaces, pods } => {
            let in_namespace = match namespaces {
                Namespaces::Own(ns) => ns == pod.namespace,
                Namespaces::Selected(selector) => selector.matches(pod.namespace_labels),
            };
            in_namespace && pods.as_ref().is_none_or(|s| s.matches(&pod.pod.labels))
        }
    }
}

fn compile(rule: &Rule, pods: &[Pod<'_>]) -> Compiled {
    Compiled {
        peers: rule.peers.as_ref().map(|peers| {
            pods.iter()
                .map(|pod| peers.iter().any(|p| peer_matches(p, pod)))
                .collect()
        }),
        ports: rule.ports.clone(),
    }
}

/// Whether `ports` admit `port`/`protocol` on `destination` (named ports are the
/// destination pod's container port names).
fn port_matches(ports: &Option<Vec<Port>>, port: u16, protocol: Protocol, destination: &Pod<'_>) -> bool {
    let Some(ports) = ports else {
        return true;
    };
    ports.iter().any(|p| {
        p.protocol == protocol
            && match &p.port {
                None => true,
                Some(PortNumber::Number(start)) => {
                    let end = p.end_port.unwrap_or(*start);
                    (*start..=end).contains(&port)
                }
                Some(PortNumber::Named(name)) => destination
                    .pod
                    .ports
                    .iter()
                    .any(|c| c.name.as_deref() == Some(name) && c.port == port && c.protocol == protocol),
            }
    })
}

impl<'a> Evaluator<'a> {
    pub fn new(model: &'a Model, policies: &'a [Policy]) -> Self {
        let pods = model.pods();
        let selects = |policy: &Policy, pod: &Pod<'_>| {
            policy.namespace == pod.namespace && policy.pod_selector.matches(&pod.pod.labels)
        };
        let of = |direction: fn(&Policy) -> bool| -> Vec<Vec<usize>> {
            pods.iter()
                .map(|pod| {
                    policies
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| direction(p) && selects(p, pod))
                        .map(|(i, _)| i)
                        .collect()
                })
                .collect()
        };
        let ingress_of = of(|p| p.affects_ingress);
        let egress_of = of(|p| p.affects_egress);
        let ingress_rules = policies
            .iter()
            .map(|p| p.ingress.iter().map(|r| compile(r, &pods)).collect())
            .collect();
        let egress_rules = policies
            .iter()
            .map(|p| p.egress.iter().map(|r| compile(r, &pods)).collect())
            .collect();
        let index = pods
            .iter()
            .enumerate()
            .map(|(i, p)| ((p.namespace, p.name), i))
            .collect();
        Self {
            pods,
            policies,
            ingress_of,
            egress_of,
            ingress_rules,
            egress_rules,
            index,
        }
    }

    pub fn pods(&self) -> &[Pod<'a>] {
        &self.pods
    }

    /// The pod index of `namespace/name`.
    pub fn find(&self, namespace: &str, name: &str) -> Option<usize> {
        self.index.get(&(namespace, name)).copied()
    }

    fn direction(
        &self,
        selecting: &[usize],
        rules: &[Vec<Compiled>],
        peer: usize,
        port: u16,
        protocol: Protocol,
        destination: usize,
    ) -> Direction {
        let allowed_by = selecting
            .iter()
            .filter(|&&pi| {
                rules[pi].iter().any(|rule| {
                    rule.peers.as_ref().is_none_or(|set| set[peer])
                        && port_matches(&rule.ports, port, protocol, &self.pods[destination])
                })
            })
            .map(|&pi| self.policies[pi].id())
            .collect();
        Direction {
            selected_by: selecting.iter().map(|&pi| self.policies[pi].id()).collect(),
            allowed_by,
        }
    }

    /// The full reasoning for traffic from pod index `from` to `to`.
    pub fn explain(&self, from: usize, to: usize, port: u16, protocol: Protocol) -> Verdict {
        Verdict {
            egress: self.direction(&self.egress_of[from], &self.egress_rules, to, port, protocol, to),
            ingress: self.direction(
                &self.ingress_of[to],
                &self.ingress_rules,
                from,
                port,
                protocol,
                to,
            ),
        }
    }

    /// Whether traffic from pod index `from` to `to` is allowed (no reasons kept).
    pub fn allowed(&self, from: usize, to: usize, port: u16, protocol: Protocol) -> bool {
        let admits = |selecting: &[usize], rules: &[Vec<Compiled>], peer: usize| {
            selecting.is_empty()
                || selecting.iter().any(|&pi| {
                    rules[pi].iter().any(|rule| {
                        rule.peers.as_ref().is_none_or(|set| set[peer])
                            && port_matches(&rule.ports, port, protocol, &self.pods[to])
                    })
                })
        };
        admits(&self.egress_of[from], &self.egress_rules, to)
            && admits(&self.ingress_of[to], &self.ingress_rules, from)
    }
}
