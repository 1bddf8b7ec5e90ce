//! The rendering against the ordered rules it comes from: for random rule lists and
//! addresses near every rule's edges, the NetworkPolicy evaluator (chassis-netpol)
//! must allow exactly what first-match-wins says.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chassis_api::network::v1alpha1::{
    EgressAction, EgressDestination, EgressPolicySpec, EgressPort, EgressRule, PortProtocol,
};
use chassis_netpol::eval::Evaluator;
use chassis_netpol::model::{Model, NamespaceModel, PodModel, PortModel, Protocol};
use chassis_netpol::policy::Policy;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::render::{RuleError, decide, render};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_cidr(rng: &mut Rng) -> String {
    const FIXED: [&str; 8] = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3/32",
        "0.0.0.0/0",
        "fd00::/8",
        "fd00:1::/32",
        "::/0",
    ];
    if rng.below(2) == 0 {
        return FIXED[rng.below(FIXED.len() as u64) as usize].to_string();
    }
    if rng.below(4) == 0 {
        let prefix = 8 + rng.below(121) as u8;
        let addr =
            std::net::Ipv6Addr::from(0xfd00u128 << 112 | (rng.next() as u128) << 64 | rng.next() as u128);
        return IpNet::new(IpAddr::V6(addr), prefix)
            .map(|n| n.trunc().to_string())
            .unwrap_or_default();
    }
    let prefix = 8 + rng.below(25) as u8;
    let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
    IpNet::new(IpAddr::V4(addr), prefix)
        .map(|n| n.trunc().to_string())
        .unwrap_or_default()
}

const PROTOCOLS: [PortProtocol; 3] = [PortProtocol::Tcp, PortProtocol::Udp, PortProtocol::Sctp];

fn random_spec(rng: &mut Rng) -> EgressPolicySpec {
    let rules = (0..1 + rng.below(8))
        .map(|_| EgressRule {
            action: if rng.below(2) == 0 {
                EgressAction::Allow
            } else {
                EgressAction::Deny
            },
            to: EgressDestination {
                cidr: random_cidr(rng),
            },
            ports: (rng.below(2) == 0).then(|| {
                (0..1 + rng.below(2))
                    .map(|_| {
                        let port = [53, 80, 443, 8000][rng.below(4) as usize];
                        EgressPort {
                            protocol: PROTOCOLS[rng.below(3) as usize],
                            port,
                            end_port: (rng.below(3) == 0).then_some(port + rng.below(100) as i32),
                        }
                    })
                    .collect()
            }),
        })
        .collect();
    EgressPolicySpec {
        pod_selector: None,
        rules,
    }
}

/// Addresses at and around the edges of every rule's CIDR, plus a few others.
fn probe_addresses(spec: &EgressPolicySpec, rng: &mut Rng) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for rule in &spec.rules {
        let Ok(net) = rule.to.cidr.parse::<IpNet>() else {
            continue;
        };
        let (first, last) = match (net.network(), net.broadcast()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
            _ => continue,
        };
        let v4 = net.network().is_ipv4();
        for value in [
            first.wrapping_sub(1),
            first,
            first + 1,
            last.wrapping_sub(1),
            last,
            last.wrapping_add(1),
        ] {
            let ip = if v4 {
                u32::try_from(value).ok().map(|v| IpAddr::V4(v.into()))
            } else {
                Some(IpAddr::V6(value.into()))
            };
            out.extend(ip);
        }
        out.push(if v4 {
            IpAddr::V4((0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff)).into())
        } else {
            IpAddr::V6((0xfd00u128 << 112 | rng.next() as u128).into())
        });
    }
    out.push("192.0.2.1".parse().expect("ip"));
    out.sort();
    out.dedup();
    out
}

fn protocol(p: PortProtocol) -> Protocol {
    match p {
        PortProtocol::Tcp => Protocol::Tcp,
        PortProtocol::Udp => Protocol::Udp,
        PortProtocol::Sctp => Protocol::Sctp,
    }
}

/// One source pod selected by the rendered policy and one destination pod per
/// address, each serving a few ports in every protocol.
fn model(addresses: &[IpAddr], ports: &[u16]) -> Model {
    let serving: Vec<PortModel> = PROTOCOLS
        .iter()
        .flat_map(|p| {
            ports.iter().map(|&port| PortModel {
                port,
                protocol: protocol(*p),
                name: None,
            })
        })
        .collect();
    let source = PodModel {
        labels: BTreeMap::new(),
        ip: "198.51.100.1".parse().expect("ip"),
        ports: Vec::new(),
    };
    let destinations = addresses
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let pod = PodModel {
                labels: BTreeMap::new(),
                ip: *ip,
                ports: serving.clone(),
            };
            (format!("d{i}"), pod)
        })
        .collect();
    Model {
        namespaces: BTreeMap::from([
            (
                "src".to_string(),
                NamespaceModel {
                    labels: BTreeMap::new(),
                    pods: BTreeMap::from([("p".to_string(), source)]),
                },
            ),
            (
                "dst".to_string(),
                NamespaceModel {
                    labels: BTreeMap::new(),
                    pods: destinations,
                },
            ),
        ]),
    }
}

#[test]
fn rendered_rules_allow_exactly_what_the_ordered_rules_say() -> Result<(), String> {
    let ports = [1u16, 52, 53, 54, 80, 443, 8000, 8050, 8099, 8100, 65535];
    let mut checked = 0;
    for seed in 0..300 {
        let mut rng = Rng(seed);
        let spec = random_spec(&mut rng);
        let rendered = render(&spec).map_err(|e| format!("seed {seed}: {e}"))?;
        let policy = NetworkPolicy {
            metadata: kube::api::ObjectMeta {
                name: Some("egress".into()),
                namespace: Some("src".into()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(rendered.rules.clone()),
                ingress: None,
            }),
        };
        let policies = vec![Policy::parse(&policy, "src").map_err(|e| format!("seed {seed}: {e}"))?];
        let addresses = probe_addresses(&spec, &mut rng);
        // Other protocols (ICMP): only the port-less rendered rule reaches them.
        let portless = rendered.rules.iter().find(|r| r.ports.is_none());
        for ip in &addresses {
            let rendered_allows = portless.is_some_and(|r| {
                r.to.iter()
                    .flatten()
                    .filter_map(|p| p.ip_block.as_ref())
                    .any(|b| {
                        let inside = |c: &str| c.parse::<IpNet>().is_ok_and(|n| n.contains(ip));
                        inside(&b.cidr) && !b.except.iter().flatten().any(|e| inside(e))
                    })
            });
            let rules_allow = super::render::decide_other(&spec, *ip);
            if rendered.notes.is_empty() {
                if rendered_allows != rules_allow {
                    return Err(format!(
                        "seed {seed}: {ip} other protocols: rules {rules_allow}, rendered {rendered_allows}"
                    ));
                }
            } else if rendered_allows {
                return Err(format!(
                    "seed {seed}: {ip} other protocols allowed although the note says denied"
                ));
            }
        }
        let model = model(&addresses, &ports);
        let evaluator = Evaluator::new(&model, &policies);
        let from = evaluator.find("src", "p").ok_or("source pod")?;
        for (i, ip) in addresses.iter().enumerate() {
            let to = evaluator.find("dst", &format!("d{i}")).ok_or("destination pod")?;
            for p in PROTOCOLS {
                for &port in &ports {
                    let want = decide(&spec, *ip, p, port);
                    let got = evaluator.allowed(from, to, port, protocol(p));
                    if want != got {
                        return Err(format!(
                            "seed {seed}: {ip} {}/{port}: rules say {want}, rendered policy says {got}\nrules: {:#?}\nrendered: {}",
                            p.as_str(),
                            spec.rules,
                            serde_json::to_string_pretty(&rendered.rules).unwrap_or_default()
                        ));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100_000, "{checked} verdicts");
    Ok(())
}

fn rule(action: EgressAction, cidr: &str, ports: Option<Vec<EgressPort>>) -> EgressRule {
    EgressRule {
        action,
        to: EgressDestination { cidr: cidr.into() },
        ports,
    }
}

#[test]
fn a_deny_before_an_allow_becomes_an_except() -> Result<(), RuleError> {
    let spec = EgressPolicySpec {
        pod_selector: None,
        rules: vec![
            rule(EgressAction::Deny, "10.1.0.0/16", None),
            rule(EgressAction::Allow, "10.0.0.0/8", None),
        ],
    };
    let rendered = render(&spec)?;
    assert_eq!(
        serde_json::to_value(&rendered.rules).unwrap_or_default(),
        serde_json::json!([{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}])
    );
    assert!(rendered.shadowed.is_empty());
    Ok(())
}

#[test]
fn port_scoped_rules_render_one_rule_per_port_group() -> Result<(), RuleError> {
    let https = EgressPort {
        protocol: PortProtocol::Tcp,
        port: 443,
        end_port: None,
    };
    let spec = EgressPolicySpec {
        pod_selector: None,
        rules: vec![
            rule(EgressAction::Allow, "0.0.0.0/0", Some(vec![https])),
            rule(EgressAction::Allow, "10.0.0.0/8", None),
        ],
    };
    let rendered = render(&spec)?;
    let json = serde_json::to_value(&rendered.rules).unwrap_or_default();
    // Every port and protocol (ICMP too): 10/8, as one port-less rule; 443/TCP: anywhere.
    assert_eq!(
        json,
        serde_json::json!([
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]},
        ])
    );
    assert!(rendered.notes.is_empty());
    Ok(())
}

#[test]
fn other_protocols_are_denied_when_a_port_rule_denies_what_a_portless_rule_allows() -> Result<(), RuleError> {
    let ssh = EgressPort {
        protocol: PortProtocol::Tcp,
        port: 22,
        end_port: None,
    };
    let spec = EgressPolicySpec {
        pod_selector: None,
        rules: vec![
            rule(EgressAction::Deny, "10.0.0.0/8", Some(vec![ssh])),
            rule(EgressAction::Allow, "0.0.0.0/0", None),
        ],
    };
    let rendered = render(&spec)?;
    // A port-less rule for 0/0 would reopen 22/TCP to 10/8; ICMP is denied instead and said so.
    assert!(
        rendered.rules.iter().all(|r| r.ports.is_some()),
        "{:?}",
        rendered.rules
    );
    assert_eq!(rendered.notes.len(), 1);
    assert!(
        super::render::decide_other(&spec, "8.8.8.8".parse().expect("ip")),
        "the rules would allow it"
    );

    let all_ports: Vec<EgressPort> = PROTOCOLS
        .iter()
        .map(|p| EgressPort {
            protocol: *p,
            port: 1,
            end_port: Some(65535),
        })
        .collect();
    let every_port = EgressPolicySpec {
        pod_selector: None,
        rules: vec![rule(EgressAction::Allow, "10.0.0.0/8", Some(all_ports))],
    };
    let rendered = render(&every_port)?;
    assert!(
        rendered.rules.iter().all(|r| r.ports.is_some()),
        "every TCP/UDP/SCTP port is still not ICMP: {:?}",
        rendered.rules
    );
    Ok(())
}

#[test]
fn shadowed_and_malformed_rules_are_named() {
    let spec = EgressPolicySpec {
        pod_selector: None,
        rules: vec![
            rule(EgressAction::Deny, "10.0.0.0/8", None),
            rule(EgressAction::Allow, "10.1.0.0/16", None),
        ],
    };
    let rendered = render(&spec).expect("valid rules");
    assert!(rendered.rules.is_empty(), "nothing is allowed");
    assert_eq!(rendered.shadowed.len(), 1);
    assert!(
        rendered.shadowed[0].starts_with("rule 2 (Allow 10.1.0.0/16) never matches"),
        "{:?}",
        rendered.shadowed
    );

    let bad = EgressPolicySpec {
        pod_selector: None,
        rules: vec![
            rule(EgressAction::Allow, "0.0.0.0/0", None),
            rule(EgressAction::Allow, "10.0.0.1/8", None),
        ],
    };
    let error = render(&bad).expect_err("host bits");
    assert_eq!(
        error.to_string(),
        "rule 2: 10.0.0.1/8 has host bits set; write 10.0.0.0/8"
    );
}
