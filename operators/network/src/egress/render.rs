//! EgressPolicy → NetworkPolicy egress rules. The ordered rules (first match wins,
//! default deny) become allow-only rules: for each group of ports that the same rules
//! apply to, rule *i* allows `cidr_i` minus every earlier rule's CIDR, which is one
//! `ipBlock` with `except`. That union is exactly the set the ordered list allows.

use std::collections::BTreeMap;

use chassis_api::network::v1alpha1::{EgressAction, EgressPolicySpec, EgressPort, PortProtocol};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::ipset::IpSet;

const MAX_PORT: u32 = 65535;

/// Why the rules cannot be rendered as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// 1-based, as users count rules; 0 when the policy as a whole is at fault.
    pub rule: usize,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rule == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "rule {}: {}", self.rule, self.message)
        }
    }
}

/// The rendered egress rules plus the rules that can never match.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub rules: Vec<NetworkPolicyEgressRule>,
    /// Sentences naming each rule that earlier rules cover entirely.
    pub shadowed: Vec<String>,
    /// What the rendering could not express and denied instead.
    pub notes: Vec<String>,
}

impl Rendered {
    /// No egress rule at all: every egress of the selected pods is denied.
    pub fn deny_all() -> Self {
        Self {
            rules: Vec::new(),
            shadowed: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// Parses a rule's CIDR, refusing host bits so the rule means what it says.
pub fn parse_cidr(rule: usize, cidr: &str) -> Result<IpNet, RuleError> {
    let net: IpNet = cidr.parse().map_err(|_| RuleError {
        rule,
        message: format!("{cidr:?} is not a CIDR such as 10.0.0.0/8 or 2001:db8::/32"),
    })?;
    if net.trunc() != net {
        return Err(RuleError {
            rule,
            message: format!("{cidr} has host bits set; write {}", net.trunc()),
        });
    }
    Ok(net)
}

/// A contiguous port range of one protocol that every rule either fully covers or
/// does not touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Atom {
    protocol: PortProtocol,
    start: u32,
    end: u32,
}

fn port_range(port: &EgressPort) -> (PortProtocol, u32, u32) {
    let start = port.port.clamp(1, MAX_PORT as i32) as u32;
    let end = port
        .end_port
        .unwrap_or(port.port)
        .clamp(port.port, MAX_PORT as i32) as u32;
    (port.protocol, start, end)
}

/// Splits every protocol's port space at the boundaries of the rules' ports.
fn atoms(spec: &EgressPolicySpec) -> Vec<Atom> {
    let mut out = Vec::new();
    for protocol in PortProtocol::ALL {
        let mut cuts = vec![1, MAX_PORT + 1];
        for rule in &spec.rules {
            for port in rule.ports.iter().flatten() {
                let (p, start, end) = port_range(port);
                if p == protocol {
                    cuts.push(start);
                    cuts.push(end + 1);
                }
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        out.extend(cuts.windows(2).map(|w| Atom {
            protocol,
            start: w[0],
            end: w[1] - 1,
        }));
    }
    out
}

fn applies(rule_ports: &Option<Vec<EgressPort>>, atom: &Atom) -> bool {
    rule_ports.as_ref().is_none_or(|ports| {
        ports.iter().any(|port| {
            let (protocol, start, end) = port_range(port);
            protocol == atom.protocol && start <= atom.start && atom.end <= end
        })
    })
}

fn port_list(atoms: &[Atom]) -> Vec<NetworkPolicyPort> {
    // Adjacent atoms of one protocol merge into one range.
    let mut merged: Vec<Atom> = Vec::new();
    for atom in atoms {
        match merged.last_mut() {
            Some(last) if last.protocol == atom.protocol && last.end + 1 == atom.start => last.end = atom.end,
            _ => merged.push(*atom),
        }
    }
    merged
        .into_iter()
        .map(|a| NetworkPolicyPort {
            protocol: Some(a.protocol.as_str().to_string()),
            port: Some(IntOrString::Int(a.start as i32)),
            end_port: (a.end > a.start).then_some(a.end as i32),
        })
        .collect()
}

/// Most distinct port ranges (over all protocols) the rules may cut the ports into.
pub const MAX_PORT_RANGES: usize = 2048;

/// Largest rendered rule list accepted (its JSON size); etcd refuses objects
/// over 1.5 MiB, and a policy this large is a mistake anyway.
pub const MAX_RENDERED_BYTES: usize = 256 * 1024;

/// The `ipBlock`s allowing what the ordered `applicable` rules allow: rule *i*
/// (Allow) gives its CIDR minus every earlier applicable rule's CIDR. Also returns
/// that set, and marks the rules that match anything.
fn blocks(
    spec: &EgressPolicySpec,
    nets: &[IpNet],
    sets: &[IpSet],
    applicable: &[usize],
    ever_matches: &mut [bool],
) -> (Vec<NetworkPolicyPeer>, IpSet) {
    let mut earlier = IpSet::default();
    let mut allowed = IpSet::default();
    let mut out = Vec::new();
    for &i in applicable {
        let effective = sets[i].difference(&earlier);
        if !effective.is_empty() {
            ever_matches[i] = true;
            if spec.rules[i].action == EgressAction::Allow {
                let except: Vec<String> = sets[i]
                    .intersection(&earlier)
                    .to_cidrs()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                out.push(NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: nets[i].to_string(),
                        except: (!except.is_empty()).then_some(except),
                    }),
                    ..Default::default()
                });
                allowed = allowed.union(&effective);
            }
        }
        earlier = earlier.union(&sets[i]);
    }
    (out, allowed)
}

/// Renders the ordered rules. Errors name the first invalid rule.
///
/// TCP, UDP and SCTP are rendered exactly. Other protocols (ICMP) only match rules
/// without ports; NetworkPolicy cannot name them, only a rule without ports reaches
/// them, and such a rule also opens every port. So the set they may reach is
/// rendered as a port-less rule when that does not open more on any port, and
/// otherwise denied, which [`Rendered::notes`] says.
pub fn render(spec: &EgressPolicySpec) -> Result<Rendered, RuleError> {
    let nets: Vec<IpNet> = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| parse_cidr(i + 1, &r.to.cidr))
        .collect::<Result<_, _>>()?;
    for (i, rule) in spec.rules.iter().enumerate() {
        for port in rule.ports.iter().flatten() {
            if port.end_port.is_some_and(|end| end < port.port) {
                return Err(RuleError {
                    rule: i + 1,
                    message: format!(
                        "endPort {} is below port {}",
                        port.end_port.unwrap_or(0),
                        port.port
                    ),
                });
            }
        }
    }
    let sets: Vec<IpSet> = nets.iter().map(IpSet::from_net).collect();
    let all_atoms = atoms(spec);
    // Bounds the work (atoms x rules) and the output before doing either.
    if all_atoms.len() > MAX_PORT_RANGES {
        return Err(RuleError {
            rule: 0,
            message: format!(
                "the rules split the ports into {} ranges (limit {MAX_PORT_RANGES}): use fewer, wider port ranges",
                all_atoms.len()
            ),
        });
    }
    let mut ever_matches = vec![false; spec.rules.len()];

    // Atoms with the same applicable rules allow the same addresses.
    let mut groups: BTreeMap<Vec<usize>, Vec<Atom>> = BTreeMap::new();
    for atom in &all_atoms {
        let applicable: Vec<usize> = (0..spec.rules.len())
            .filter(|&i| applies(&spec.rules[i].ports, atom))
            .collect();
        groups.entry(applicable).or_default().push(*atom);
    }
    let rendered_groups: Vec<(Vec<NetworkPolicyPeer>, IpSet, Vec<Atom>)> = groups
        .iter()
        .map(|(applicable, group_atoms)| {
            let (to, allowed) = blocks(spec, &nets, &sets, applicable, &mut ever_matches);
            (to, allowed, group_atoms.clone())
        })
        .collect();

    // Other protocols: only the port-less rules apply.
    let portless: Vec<usize> = (0..spec.rules.len())
        .filter(|&i| spec.rules[i].ports.is_none())
        .collect();
    let (other_to, other_allowed) = blocks(spec, &nets, &sets, &portless, &mut ever_matches);
    let mut notes = Vec::new();
    let portless_rule = if other_allowed.is_empty() {
        None
    } else if rendered_groups
        .iter()
        .all(|(_, allowed, _)| other_allowed.difference(allowed).is_empty())
    {
        Some(other_allowed.clone())
    } else {
        notes.push(
            "protocols other than TCP, UDP and SCTP (such as ICMP) are denied: allowing them where the \
             port-less rules say would also open ports that earlier port rules deny"
                .to_string(),
        );
        None
    };

    let mut rules = Vec::new();
    if portless_rule.is_some() {
        rules.push(NetworkPolicyEgressRule {
            to: Some(other_to),
            ports: None,
        });
    }
    // Groups allowing the same blocks share one rule; a group the port-less rule
    // already covers exactly needs none.
    let mut by_blocks: Vec<(Vec<NetworkPolicyPeer>, Vec<Atom>)> = Vec::new();
    for (to, allowed, group_atoms) in rendered_groups {
        if allowed.is_empty() || portless_rule.as_ref() == Some(&allowed) {
            continue;
        }
        match by_blocks.iter_mut().find(|(t, _)| *t == to) {
            Some((_, atoms)) => atoms.extend(group_atoms),
            None => by_blocks.push((to, group_atoms)),
        }
    }
    for (to, mut group_atoms) in by_blocks {
        group_atoms.sort();
        rules.push(NetworkPolicyEgressRule {
            to: Some(to),
            ports: Some(port_list(&group_atoms)),
        });
    }
    let size = serde_json::to_vec(&rules).map_or(usize::MAX, |v| v.len());
    if size > MAX_RENDERED_BYTES {
        return Err(RuleError {
            rule: 0,
            message: format!(
                "the rendered NetworkPolicy would hold {} KiB of rules (limit {} KiB): use fewer port-specific rules",
                size / 1024,
                MAX_RENDERED_BYTES / 1024
            ),
        });
    }
    let shadowed = ever_matches
        .iter()
        .enumerate()
        .filter(|(_, m)| !**m)
        .map(|(i, _)| {
            let r = &spec.rules[i];
            format!(
                "rule {} ({:?} {}) never matches: earlier rules cover all of its addresses",
                i + 1,
                r.action,
                r.to.cidr
            )
        })
        .collect();
    Ok(Rendered {
        rules,
        shadowed,
        notes,
    })
}

/// What the ordered rules say for a protocol other than TCP, UDP and SCTP: only
/// rules without ports can match it.
pub fn decide_other(spec: &EgressPolicySpec, ip: std::net::IpAddr) -> bool {
    for rule in spec.rules.iter().filter(|r| r.ports.is_none()) {
        if rule.to.cidr.parse::<IpNet>().is_ok_and(|net| net.contains(&ip)) {
            return rule.action == EgressAction::Allow;
        }
    }
    false
}

/// What the ordered rules say for one destination: the reference the rendering is
/// tested against.
pub fn decide(spec: &EgressPolicySpec, ip: std::net::IpAddr, protocol: PortProtocol, port: u16) -> bool {
    for rule in &spec.rules {
        let Ok(net) = rule.to.cidr.parse::<IpNet>() else {
            continue;
        };
        let port_ok = rule.ports.as_ref().is_none_or(|ports| {
            ports.iter().any(|p| {
                let (proto, start, end) = port_range(p);
                proto == protocol && start <= u32::from(port) && u32::from(port) <= end
            })
        });
        if net.contains(&ip) && port_ok {
            return rule.action == EgressAction::Allow;
        }
    }
    false
}
