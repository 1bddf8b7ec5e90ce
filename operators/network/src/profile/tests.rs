//! What a rendered profile means, checked with the NetworkPolicy evaluator, and
//! which namespaces a profile applies to.

use std::collections::BTreeMap;

use chassis_api::network::PROFILES_ANNOTATION;
use chassis_api::network::v1alpha1::{
    AllowedPeer, EgressDefault, Isolation, NetworkProfile, NetworkProfileSpec,
};
use chassis_netpol::eval::Evaluator;
use chassis_netpol::model::{Model, NamespaceModel, PodModel, PortModel, Protocol};
use chassis_netpol::policy::Policy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::render::{applies_to, policies};
use crate::selector::invalid as invalid_selector;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn profile(spec: NetworkProfileSpec) -> NetworkProfile {
    let mut p = NetworkProfile::new("restricted", spec);
    p.metadata.uid = Some("uid-1".into());
    p
}

fn pod(ip: &str, pod_labels: &[(&str, &str)]) -> PodModel {
    PodModel {
        labels: labels(pod_labels),
        ip: ip.parse().expect("test ip"),
        ports: vec![
            PortModel {
                port: 8080,
                protocol: Protocol::Tcp,
                name: Some("http".into()),
            },
            PortModel {
                port: 53,
                protocol: Protocol::Udp,
                name: Some("dns".into()),
            },
        ],
    }
}

fn cluster() -> Model {
    let ns = |l: &[(&str, &str)], pods: Vec<(&str, PodModel)>| NamespaceModel {
        labels: labels(l),
        pods: pods.into_iter().map(|(n, p)| (n.to_string(), p)).collect(),
    };
    Model {
        namespaces: BTreeMap::from([
            (
                "team-a".into(),
                ns(
                    &[("team", "a")],
                    vec![
                        ("web", pod("10.0.0.1", &[("app", "web")])),
                        ("db", pod("10.0.0.2", &[("app", "db")])),
                    ],
                ),
            ),
            (
                "team-b".into(),
                ns(
                    &[("team", "b")],
                    vec![("web", pod("10.0.1.1", &[("app", "web")]))],
                ),
            ),
            (
                "ingress".into(),
                ns(
                    &[("role", "ingress")],
                    vec![("nginx", pod("10.0.2.1", &[("app", "nginx")]))],
                ),
            ),
            (
                "kube-system".into(),
                ns(
                    &[],
                    vec![("coredns", pod("10.0.3.1", &[("k8s-app", "kube-dns")]))],
                ),
            ),
        ]),
    }
}

/// The policies `p` renders into `team-a`, parsed for the evaluator.
fn parsed_for_team_a(p: &NetworkProfile) -> Result<Vec<Policy>, String> {
    policies(p, "team-a")
        .iter()
        .map(|np| Policy::parse(np, "team-a"))
        .collect()
}

/// The ingress controller's namespace (`role: ingress`) as an `allowFrom` peer.
fn ingress_peer() -> AllowedPeer {
    AllowedPeer {
        name: "ingress".into(),
        namespace_selector: LabelSelector {
            match_labels: Some(labels(&[("role", "ingress")])),
            ..Default::default()
        },
        pod_selector: None,
        ports: None,
    }
}

#[test]
fn isolation_allow_from_and_egress_deny_mean_what_they_say() -> Result<(), String> {
    let p = profile(NetworkProfileSpec {
        isolation: Isolation::Namespace,
        allow_from: vec![ingress_peer()],
        egress: EgressDefault::Deny,
        ..NetworkProfileSpec::default()
    });
    let rendered = policies(&p, "team-a");
    let names: Vec<String> = rendered
        .iter()
        .filter_map(|np| np.metadata.name.clone())
        .collect();
    assert_eq!(
        names,
        [
            "profile.restricted.isolation",
            "profile.restricted.from-ingress",
            "profile.restricted.egress"
        ]
    );
    let parsed: Vec<Policy> = rendered
        .iter()
        .map(|np| Policy::parse(np, "team-a"))
        .collect::<Result<_, _>>()?;
    let model = cluster().with_namespace_name_labels();
    let eval = Evaluator::new(&model, &parsed);
    let at = |ns: &str, pod: &str| eval.find(ns, pod).ok_or(format!("{ns}/{pod}"));
    let tcp = |from, to| eval.allowed(from, to, 8080, Protocol::Tcp);
    let (a_web, a_db, b_web, nginx, dns) = (
        at("team-a", "web")?,
        at("team-a", "db")?,
        at("team-b", "web")?,
        at("ingress", "nginx")?,
        at("kube-system", "coredns")?,
    );
    assert!(tcp(a_web, a_db), "inside the namespace");
    assert!(!tcp(b_web, a_web), "another namespace is isolated out");
    assert!(tcp(nginx, a_web), "allowFrom peer gets in");
    assert!(!tcp(a_web, b_web), "egress Deny: no other namespace");
    assert!(eval.allowed(a_web, dns, 53, Protocol::Udp), "allowDNS");
    assert!(!tcp(a_web, dns), "DNS is port 53 only");
    assert!(tcp(b_web, nginx), "namespaces without the profile are untouched");
    Ok(())
}

#[test]
fn egress_deny_without_allow_dns_keeps_cluster_dns_out_too() -> Result<(), String> {
    let p = profile(NetworkProfileSpec {
        egress: EgressDefault::Deny,
        allow_dns: false,
        ..NetworkProfileSpec::default()
    });
    let parsed = parsed_for_team_a(&p)?;
    let model = cluster().with_namespace_name_labels();
    let eval = Evaluator::new(&model, &parsed);
    let at = |ns: &str, pod: &str| eval.find(ns, pod).ok_or(format!("{ns}/{pod}"));
    let (a_web, a_db, dns) = (
        at("team-a", "web")?,
        at("team-a", "db")?,
        at("kube-system", "coredns")?,
    );
    assert!(!eval.allowed(a_web, dns, 53, Protocol::Udp), "allowDNS: false");
    assert!(
        eval.allowed(a_web, a_db, 8080, Protocol::Tcp),
        "its own namespace stays reachable"
    );
    Ok(())
}

#[test]
fn allow_from_without_isolation_leaves_ingress_open() -> Result<(), String> {
    let p = profile(NetworkProfileSpec {
        isolation: Isolation::None,
        allow_from: vec![ingress_peer()],
        ..NetworkProfileSpec::default()
    });
    let parsed = parsed_for_team_a(&p)?;
    let model = cluster().with_namespace_name_labels();
    let eval = Evaluator::new(&model, &parsed);
    let at = |ns: &str, pod: &str| eval.find(ns, pod).ok_or(format!("{ns}/{pod}"));
    let tcp = |from, to| eval.allowed(from, to, 8080, Protocol::Tcp);
    let (a_web, a_db, b_web, nginx) = (
        at("team-a", "web")?,
        at("team-a", "db")?,
        at("team-b", "web")?,
        at("ingress", "nginx")?,
    );
    assert!(tcp(a_web, a_db), "isolation None: the namespace's own pods");
    assert!(tcp(b_web, a_web), "isolation None: other namespaces");
    assert!(tcp(nginx, a_web), "and the peer");
    Ok(())
}

#[test]
fn egress_allow_renders_no_egress_policy_so_dns_is_not_isolated() {
    let p = profile(NetworkProfileSpec {
        isolation: Isolation::None,
        ..NetworkProfileSpec::default()
    });
    assert!(
        policies(&p, "team-a").is_empty(),
        "None + Allow + no peers is no policy at all"
    );
}

#[test]
fn rendered_policies_are_labelled_and_owned_by_the_profile() {
    let rendered = policies(&profile(NetworkProfileSpec::default()), "team-a");
    let np = &rendered[0];
    assert_eq!(np.metadata.namespace.as_deref(), Some("team-a"));
    assert_eq!(
        np.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("network.chassis.dev/profile"))
            .map(String::as_str),
        Some("restricted")
    );
    let owner = &np.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("NetworkProfile", "restricted", Some(true))
    );
}

#[test]
fn a_profile_applies_by_selector_or_by_project_binding() {
    let mut p = profile(NetworkProfileSpec::default());
    let none = BTreeMap::new();
    assert!(
        !applies_to(&p, &labels(&[("team", "a")]), &none),
        "no selector: only bound namespaces"
    );
    let bound = labels(&[(PROFILES_ANNOTATION, "other, restricted")]);
    assert!(applies_to(&p, &none, &bound));
    p.spec.namespace_selector = Some(LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "team".into(),
            operator: "NotIn".into(),
            values: Some(vec!["b".into()]),
        }]),
        ..Default::default()
    });
    assert!(applies_to(&p, &labels(&[("team", "a")]), &none));
    assert!(!applies_to(&p, &labels(&[("team", "b")]), &none));
    assert!(
        applies_to(&p, &none, &none),
        "NotIn matches a namespace without the label, as in Kubernetes"
    );
}

#[test]
fn the_status_patch_clears_matched_namespaces_when_none_is_left() {
    let patch = super::status_patch(&chassis_api::network::v1alpha1::NetworkProfileStatus::default());
    assert_eq!(patch["status"]["matchedNamespaces"], serde_json::json!([]));
}

#[test]
fn an_empty_selector_leaves_the_system_namespaces_alone() {
    let mut p = profile(NetworkProfileSpec::default());
    p.spec.namespace_selector = Some(LabelSelector::default());
    let none = BTreeMap::new();
    assert!(applies_to(
        &p,
        &labels(&[("kubernetes.io/metadata.name", "team-a")]),
        &none
    ));
    assert!(!applies_to(
        &p,
        &labels(&[("kubernetes.io/metadata.name", "kube-system")]),
        &none
    ));
    let bound = labels(&[(PROFILES_ANNOTATION, "restricted")]);
    assert!(
        applies_to(
            &p,
            &labels(&[("kubernetes.io/metadata.name", "kube-system")]),
            &bound
        ),
        "binding by name is explicit and still applies"
    );
}

#[test]
fn raw_policies_get_the_api_servers_policy_types_so_edits_to_them_are_drift() {
    let mut p = profile(NetworkProfileSpec {
        isolation: Isolation::None,
        ..NetworkProfileSpec::default()
    });
    p.spec.policies = vec![chassis_api::network::v1alpha1::StampedPolicy {
        name: "deny-ingress".into(),
        spec: k8s_openapi::api::networking::v1::NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            ..Default::default()
        },
    }];
    let rendered = policies(&p, "team-a");
    assert_eq!(
        rendered[0].metadata.name.as_deref(),
        Some("profile.restricted.deny-ingress")
    );
    let spec = rendered[0].spec.as_ref().expect("spec");
    assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
}

#[test]
fn ready_says_conflict_only_when_every_failure_is_a_name_held_by_others() {
    use chassis_api::network::reason;
    let taken = |ns: &str| {
        (
            ns.to_string(),
            format!("{ns}/profile.p.isolation is not ours"),
            true,
        )
    };
    let refused = (
        "c".to_string(),
        "c/profile.p.isolation: forbidden".to_string(),
        false,
    );
    let ok = super::ready_condition(&[], &[], 3);
    assert!(ok.status && ok.reason == reason::APPLIED, "{}", ok.message);
    let conflict = super::ready_condition(&[taken("a"), taken("b")], &[], 1);
    assert!(!conflict.status);
    assert_eq!(conflict.reason, reason::CONFLICT);
    let mixed = super::ready_condition(&[taken("a"), refused], &[], 1);
    assert_eq!(mixed.reason, reason::APPLY_FAILED, "a refusal is retried");
    let stale = super::ready_condition(&[taken("a")], &["x/profile.p.old: forbidden".into()], 1);
    assert_eq!(stale.reason, reason::APPLY_FAILED);
    assert!(stale.message.contains("stale policies"), "{}", stale.message);
}

#[test]
fn selectors_kubernetes_would_refuse_are_named_not_silently_empty() {
    let with_labels = |pairs: &[(&str, &str)]| LabelSelector {
        match_labels: Some(labels(pairs)),
        ..Default::default()
    };
    let with_expression = |key: &str, operator: &str, values: &[&str]| LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }]),
        ..Default::default()
    };
    for fine in [
        with_labels(&[("team", "a")]),
        with_labels(&[("example.com/team", "a-b_c.d")]),
        with_labels(&[("team", "")]),
        with_labels(&[("kubernetes.io/metadata.name", "x")]),
        // A subdomain label over 63 characters: Kubernetes limits only the whole prefix.
        with_labels(&[(format!("{}.example.com/team", "a".repeat(64)).as_str(), "x")]),
        with_expression("tier", "NotIn", &["gold", "Silver-1"]),
        with_expression("tier", "DoesNotExist", &[]),
        LabelSelector::default(),
    ] {
        assert_eq!(invalid_selector(&fine), None, "{fine:?}");
    }
    let long = "a".repeat(64);
    for (bad, says) in [
        (
            with_labels(&[("team name", "a")]),
            "matchLabels key \"team name\"",
        ),
        (
            with_labels(&[("Example.com/team", "a")]),
            "prefix that is not a DNS subdomain",
        ),
        (with_labels(&[("example.com/", "a")]), "empty name"),
        (
            with_labels(&[("-team", "a")]),
            "start and end with a letter or digit",
        ),
        (with_labels(&[(long.as_str(), "a")]), "longer than 63"),
        (
            with_labels(&[("team", "a b")]),
            "matchLabels value \"a b\" of \"team\"",
        ),
        (with_labels(&[("team", long.as_str())]), "longer than 63"),
        (
            with_expression("tier", "NotIn", &["gold", "no/slash"]),
            "matchExpressions[0] value \"no/slash\"",
        ),
        (
            with_expression("a/b/c", "Exists", &[]),
            "matchExpressions[0] key \"a/b/c\"",
        ),
        // Operators: the schema checks them in the profile's namespaceSelector and an
        // EgressPolicy's podSelector, an allowFrom peer's only here.
        (
            with_expression("tier", "Equals", &["gold"]),
            "operator \"Equals\" is not In, NotIn, Exists or DoesNotExist",
        ),
        (with_expression("tier", "In", &[]), "operator \"In\" needs values"),
        (
            with_expression("tier", "Exists", &["gold"]),
            "operator \"Exists\" takes no values",
        ),
    ] {
        let why = invalid_selector(&bad).unwrap_or_default();
        assert!(why.contains(says), "{bad:?}: {why:?} should say {says:?}");
    }
}
