//! The specification's rules, one test each, on a small model:
//! namespace x (team=a): a (app=web, 10.0.0.1, http=80, 81), b (app=db, 10.0.0.2,
//! http=80, dns=53/UDP); namespace y (team=b): c (app=web, 10.0.1.1, 80).

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::eval::Evaluator;
use crate::model::{Model, Protocol};
use crate::policy::Policy;

fn model() -> Model {
    let json = serde_json::json!({"namespaces": {
        "x": {"labels": {"team": "a"}, "pods": {
            "a": {"labels": {"app": "web"}, "ip": "10.0.0.1",
                  "ports": [{"port": 80, "protocol": "TCP", "name": "http"}, {"port": 81, "protocol": "TCP"}]},
            "b": {"labels": {"app": "db"}, "ip": "10.0.0.2",
                  "ports": [{"port": 80, "protocol": "TCP", "name": "http"}, {"port": 53, "protocol": "UDP", "name": "dns"}]}}},
        "y": {"labels": {"team": "b"}, "pods": {
            "c": {"labels": {"app": "web"}, "ip": "10.0.1.1", "ports": [{"port": 80, "protocol": "TCP"}]}}}
    }});
    serde_json::from_value::<Model>(json)
        .map(Model::with_namespace_name_labels)
        .unwrap_or_default()
}

fn policies(yaml: &str) -> Vec<Policy> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| {
            let policy: NetworkPolicy = serde::Deserialize::deserialize(doc).expect("a NetworkPolicy");
            Policy::parse(&policy, "default").expect("a valid policy")
        })
        .collect()
}

/// Allowed?, for `from` and `to` as `ns/pod`.
fn check(yaml: &str, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
    let model = model();
    let policies = policies(yaml);
    let ev = Evaluator::new(&model, &policies);
    let find = |id: &str| {
        let (ns, name) = id.split_once('/').expect("ns/pod");
        ev.find(ns, name).expect("a pod of the model")
    };
    let (a, b) = (find(from), find(to));
    let allowed = ev.allowed(a, b, port, protocol);
    assert_eq!(
        allowed,
        ev.explain(a, b, port, protocol).allowed(),
        "explain must agree"
    );
    allowed
}

const TCP: Protocol = Protocol::Tcp;

#[test]
fn without_policies_everything_is_allowed() {
    assert!(check("", "x/a", "y/c", 80, TCP));
}

#[test]
fn an_empty_pod_selector_isolates_every_pod_of_its_namespace_only() {
    let deny = "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n";
    assert!(!check(deny, "y/c", "x/a", 80, TCP));
    assert!(!check(deny, "x/b", "x/a", 80, TCP), "same namespace too");
    assert!(
        check(deny, "x/a", "y/c", 80, TCP),
        "another namespace is not isolated"
    );
}

#[test]
fn without_policy_types_an_egress_section_makes_the_policy_affect_egress() {
    let ingress_only = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n";
    assert!(
        check(ingress_only, "x/a", "y/c", 80, TCP),
        "no egress section: egress not isolated"
    );
    let with_egress = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, egress: []}\n";
    assert!(
        !check(with_egress, "x/a", "y/c", 80, TCP),
        "an empty egress list denies all egress"
    );
    let egress_type = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, policyTypes: [Egress]}\n";
    assert!(!check(egress_type, "x/a", "y/c", 80, TCP));
    assert!(
        check(egress_type, "y/c", "x/a", 80, TCP),
        "Egress only: ingress not isolated"
    );
}

#[test]
fn both_directions_must_allow() {
    let yaml = "metadata: {name: out, namespace: x}\nspec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress]}\n---\nmetadata: {name: in, namespace: y}\nspec: {podSelector: {}, ingress: [{}]}\n";
    assert!(
        !check(yaml, "x/a", "y/c", 80, TCP),
        "ingress allows but egress does not"
    );
    assert!(
        check(yaml, "x/b", "y/c", 80, TCP),
        "x/b is not selected by the egress policy"
    );
}

#[test]
fn an_absent_namespace_selector_means_the_policy_namespace_and_an_empty_one_all() {
    let own = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}\n";
    assert!(check(own, "x/a", "x/b", 80, TCP));
    assert!(
        !check(own, "y/c", "x/b", 80, TCP),
        "web pods of other namespaces are not peers"
    );
    let all = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}, namespaceSelector: {}}]}]}\n";
    assert!(check(all, "y/c", "x/b", 80, TCP));
    let team_b = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]}\n";
    assert!(check(team_b, "y/c", "x/b", 80, TCP));
    assert!(!check(team_b, "x/a", "x/b", 80, TCP));
    let by_name = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}\n";
    assert!(
        check(by_name, "y/c", "x/b", 80, TCP),
        "namespaces carry their name label"
    );
}

#[test]
fn empty_peer_and_port_lists_match_everything() {
    let yaml =
        "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [], ports: []}]}\n";
    assert!(check(yaml, "y/c", "x/a", 81, TCP));
    assert!(check(yaml, "y/c", "x/b", 53, Protocol::Udp));
}

#[test]
fn ip_blocks_match_pod_addresses_minus_their_exceptions() {
    let yaml = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]}]}\n";
    assert!(check(yaml, "x/a", "x/b", 80, TCP));
    assert!(!check(yaml, "y/c", "x/b", 80, TCP), "10.0.1.1 is excepted");
}

#[test]
fn named_ports_are_the_destination_pods_port_names() {
    let yaml =
        "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{ports: [{port: http}]}]}\n";
    assert!(check(yaml, "y/c", "x/a", 80, TCP));
    assert!(!check(yaml, "y/c", "x/a", 81, TCP));
    let egress = "metadata: {name: p, namespace: y}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: dns, protocol: UDP}]}]}\n";
    assert!(
        check(egress, "y/c", "x/b", 53, Protocol::Udp),
        "x/b names 53/UDP dns"
    );
    assert!(!check(egress, "y/c", "x/a", 80, TCP));
}

#[test]
fn end_port_makes_an_inclusive_range_and_protocols_must_match() {
    let yaml = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 81}]}]}\n";
    assert!(check(yaml, "y/c", "x/a", 81, TCP));
    assert!(
        !check(yaml, "y/c", "x/b", 53, Protocol::Udp),
        "the rule is TCP by default"
    );
}

#[test]
fn not_in_and_does_not_exist_match_pods_without_the_label() {
    let yaml = "metadata: {name: p, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [front]}, {key: owner, operator: DoesNotExist}]}, namespaceSelector: {}}]}]}\n";
    assert!(check(yaml, "y/c", "x/a", 80, TCP));
}

#[test]
fn invalid_policies_are_refused_with_their_name() {
    let cases = [
        (
            "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.300/8}}]}]}",
            "is not a CIDR",
        ),
        (
            "spec: {podSelector: {}, ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
            "unknown protocol",
        ),
        (
            "spec: {podSelector: {}, ingress: [{ports: [{port: http, endPort: 90}]}]}",
            "endPort needs a numeric port",
        ),
        (
            "spec: {podSelector: {matchExpressions: [{key: a, operator: Near}]}}",
            "unknown label selector operator",
        ),
    ];
    for (spec, want) in cases {
        let yaml = format!("metadata: {{name: bad, namespace: x}}\n{spec}\n");
        let policy: NetworkPolicy = serde_norway::from_str(&yaml).expect("parses as a NetworkPolicy");
        let err = Policy::parse(&policy, "default").expect_err(want);
        assert!(err.contains("x/bad") && err.contains(want), "{err}");
    }
}
