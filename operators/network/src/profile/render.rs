//! NetworkProfile → the NetworkPolicies of one namespace, and which namespaces a
//! profile applies to. Pure: no client.
//!
//! | policy                  | when                  | what it does                                   |
//! |---------------------------|-----------------------|----------------------------------------------|
//! | `profile.<p>.isolation`   | `isolation: Namespace`| ingress only from pods of the same namespace |
//! | `profile.<p>.from-<name>` | each `allowFrom` (with `isolation: Namespace`) | ingress from that peer (and ports) |
//! | `profile.<p>.egress`      | `egress: Deny`        | egress only to the namespace (and DNS)       |
//! | `profile.<p>.<name>`      | each `policies` entry | the spec as given (`policyTypes` defaulted)  |

use std::collections::BTreeMap;

use chassis_api::MANAGED_BY;
use chassis_api::network::v1alpha1::{EgressDefault, Isolation, NetworkProfile};
use chassis_api::network::{PROFILE_LABEL, PROFILES_ANNOTATION};
use chassis_runtime::apply::{MANAGED_BY_LABEL, controller_owner_ref, stamp_hash};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

/// Whether `selector` matches `labels`, as Kubernetes evaluates label selectors
/// (`NotIn` and `DoesNotExist` match when the label is absent).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let plain = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    plain
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|e| requirement_matches(e, labels))
}

fn requirement_matches(req: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&req.key);
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        // The schema refuses other operators; an object stored before that rule
        // existed gets no namespace from such an entry.
        _ => false,
    }
}

/// The profiles a namespace binds by name (the project controller's annotation).
pub fn bound_profiles(annotations: &BTreeMap<String, String>) -> impl Iterator<Item = &str> {
    annotations
        .get(PROFILES_ANNOTATION)
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Whether `profile` applies to a namespace with these labels and annotations.
pub fn applies_to(
    profile: &NetworkProfile,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> bool {
    let name = profile.name_any();
    let namespace = labels.get("kubernetes.io/metadata.name").map(String::as_str);
    let system = namespace.is_some_and(|n| super::SYSTEM_NAMESPACES.contains(&n));
    bound_profiles(annotations).any(|p| p == name)
        || (!system
            && profile
                .spec
                .namespace_selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, labels)))
}

fn everything() -> LabelSelector {
    LabelSelector::default()
}

fn port(protocol: &str, number: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.into()),
        port: Some(IntOrString::Int(number)),
        end_port: None,
    }
}

fn policy(profile: &NetworkProfile, namespace: &str, suffix: &str, spec: NetworkPolicySpec) -> NetworkPolicy {
    let name = profile.name_any();
    let mut np = NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name(&name, suffix)),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (PROFILE_LABEL.to_string(), name.clone()),
            ])),
            owner_references: controller_owner_ref(profile).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(spec),
    };
    stamp_hash(&mut np);
    np
}

/// `profile.<profile>.<suffix>`: profile names have no dots and suffixes are unique
/// within a profile, so no two profiles (and no EgressPolicy) share a name.
pub fn policy_name(profile: &str, suffix: &str) -> String {
    format!("profile.{profile}.{suffix}")
}

/// The API server's defaulting of `policyTypes`, done here so the field is ours:
/// an edit to it is then drift and is reverted.
fn with_policy_types(mut spec: NetworkPolicySpec) -> NetworkPolicySpec {
    if spec.policy_types.as_ref().is_none_or(Vec::is_empty) {
        let mut types = vec!["Ingress".to_string()];
        if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
            types.push("Egress".into());
        }
        spec.policy_types = Some(types);
    }
    spec
}

/// The NetworkPolicies `profile` puts into `namespace`, each with its hash stamped.
pub fn policies(profile: &NetworkProfile, namespace: &str) -> Vec<NetworkPolicy> {
    let spec = &profile.spec;
    let mut out = Vec::new();
    if spec.isolation == Isolation::Namespace {
        out.push(policy(
            profile,
            namespace,
            "isolation",
            NetworkPolicySpec {
                pod_selector: Some(everything()),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(everything()),
                        ..Default::default()
                    }]),
                    ports: None,
                }]),
                egress: None,
            },
        ));
    }
    // Peers are let in past the isolation. The schema refuses `allowFrom` without it
    // (a policy for the peers would select every pod and shut out everyone else);
    // an object stored before that rule gets no such policy.
    let peers = if spec.isolation == Isolation::Namespace {
        spec.allow_from.as_slice()
    } else {
        &[]
    };
    for peer in peers {
        out.push(policy(
            profile,
            namespace,
            &format!("from-{}", peer.name),
            NetworkPolicySpec {
                pod_selector: Some(everything()),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(peer.namespace_selector.clone()),
                        pod_selector: peer.pod_selector.clone(),
                        ip_block: None,
                    }]),
                    ports: peer.ports.clone(),
                }]),
                egress: None,
            },
        ));
    }
    if spec.egress == EgressDefault::Deny {
        let mut rules = vec![NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(everything()),
                ..Default::default()
            }]),
            ports: None,
        }];
        if spec.allow_dns {
            rules.push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "kubernetes.io/metadata.name".to_string(),
                            "kube-system".to_string(),
                        )])),
                        ..Default::default()
                    }),
                    pod_selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([("k8s-app".to_string(), "kube-dns".to_string())])),
                        ..Default::default()
                    }),
                    ip_block: None,
                }]),
                ports: Some(vec![port("UDP", 53), port("TCP", 53)]),
            });
        }
        out.push(policy(
            profile,
            namespace,
            "egress",
            NetworkPolicySpec {
                pod_selector: Some(everything()),
                policy_types: Some(vec!["Egress".into()]),
                ingress: None,
                egress: Some(rules),
            },
        ));
    }
    for stamped in &spec.policies {
        out.push(policy(
            profile,
            namespace,
            &stamped.name,
            with_policy_types(stamped.spec.clone()),
        ));
    }
    out
}
