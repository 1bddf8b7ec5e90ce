//! Network isolation and egress against the real control plane: a NetworkProfile
//! follows namespace labels, reverts edits and leaves with its profile; a project
//! whose template names a profile becomes NetworkReady; EgressPolicies render into
//! NetworkPolicies that the evaluator reads back as exactly the ordered rules.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chassis_api::network::v1alpha1::{
    AllowedPeer, EgressAction, EgressDestination, EgressPolicy, EgressPolicySpec, EgressPort, EgressRule,
    Isolation, NetworkProfile, NetworkProfileSpec, PortProtocol,
};
use chassis_api::tenancy::v1alpha1::{Project, ProjectSpec, ProjectTemplate, ProjectTemplateSpec};
use chassis_e2e::{Operator, Rng, cluster, eventually, unique, wait_for_condition, wait_until_gone};
use chassis_netpol::eval::Evaluator;
use chassis_netpol::model::{Model, NamespaceModel, PodModel, PortModel, Protocol};
use chassis_netpol::policy::Policy;
use chassis_network::egress::render::decide;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(60);
const PROFILE_LABEL: &str = "network.chassis.dev/profile";

/// Names of the NetworkPolicies `profile` has in `ns`, sorted.
async fn profile_policies(ns: &str, profile: &str) -> Result<Vec<String>> {
    let api: Api<NetworkPolicy> = Api::namespaced(cluster().admin().await?, ns);
    let list = api
        .list(&ListParams::default().labels(&format!("{PROFILE_LABEL}={profile}")))
        .await?;
    let mut names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
    names.sort();
    Ok(names)
}

async fn wait_for_policies(ns: &str, profile: &str, want: &[String]) -> Result<()> {
    eventually(
        &format!("policies of {profile} in {ns} to be {want:?}"),
        TIMEOUT,
        || async { Ok((profile_policies(ns, profile).await? == want).then_some(())) },
    )
    .await
}

/// Checks that `answer` is a refusal whose message says `says`; `what` names the input.
fn refused_saying<T>(answer: Result<T, kube::Error>, what: &str, says: &str) -> Result<()> {
    match answer {
        Ok(_) => anyhow::bail!("{what} was accepted"),
        Err(err) => {
            ensure!(err.to_string().contains(says), "{what}: {err}");
            Ok(())
        }
    }
}

/// Applies the JSON patch `ops` to the policy `name`.
async fn json_patch(policies: &Api<NetworkPolicy>, name: &str, ops: serde_json::Value) -> Result<()> {
    policies
        .patch(
            name,
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(ops)?),
        )
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_profile_follows_namespace_labels_reverts_edits_and_leaves_with_its_profile() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let profiles: Api<NetworkProfile> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let team = unique("team");
    let name = unique("isolate");
    let mut spec = NetworkProfileSpec {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "e2e.chassis.dev/team".to_string(),
                team.clone(),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    spec.egress = chassis_api::network::v1alpha1::EgressDefault::Deny;
    profiles
        .create(&PostParams::default(), &NetworkProfile::new(&name, spec))
        .await?;
    let expected = vec![
        format!("profile.{name}.egress"),
        format!("profile.{name}.isolation"),
    ];

    // A labelled namespace that appears gets the policies within seconds.
    let ns = unique("team-a");
    namespaces
        .create(
            &PostParams::default(),
            &chassis_e2e::namespace(&ns, &[("e2e.chassis.dev/team", &team)]),
        )
        .await?;
    let started = std::time::Instant::now();
    wait_for_policies(&ns, &name, &expected).await?;
    eprintln!("policies in the new namespace after {:?}", started.elapsed());
    let profile = eventually("matchedNamespaces to list the namespace", TIMEOUT, || async {
        let p = profiles.get(&name).await?;
        let listed = p
            .status
            .as_ref()
            .is_some_and(|s| s.matched_namespaces.contains(&ns));
        Ok(listed.then_some(p))
    })
    .await?;
    ensure!(
        chassis_e2e::condition(&profile, "Ready").is_some_and(|c| c.status == "True"),
        "profile Ready: {:?}",
        profile.status
    );

    // An edit to a managed policy is reverted.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let isolation = format!("profile.{name}.isolation");
    let widen = serde_json::json!({"spec": {"ingress": [{}]}});
    policies
        .patch(
            &isolation,
            &PatchParams {
                field_manager: Some("kubectl-edit".into()),
                ..Default::default()
            },
            &Patch::Merge(&widen),
        )
        .await?;
    // Waits until the isolation policy's ingress rules are the rendered ones again.
    let restored = |what: &'static str| {
        eventually(what, TIMEOUT, || async {
            let np = policies.get(&isolation).await?;
            let from = serde_json::to_value(np.spec.as_ref().and_then(|s| s.ingress.clone()))?;
            Ok((from == serde_json::json!([{"from": [{"podSelector": {}}]}])).then_some(()))
        })
    };
    restored("the edited policy to be restored")
        .await
        .with_context(|| op.log_tail(20))?;

    // A field removed from it (no manager owns a missing field): also restored.
    let remove = serde_json::json!([{"op": "remove", "path": "/spec/ingress"}]);
    json_patch(&policies, &isolation, remove).await?;
    restored("the removed ingress rules to be restored")
        .await
        .with_context(|| op.log_tail(20))?;

    // Its owner reference cut (then the garbage collector would never remove it) and
    // the rules widened in the same edit: taken back, not reported as someone else's.
    let cut = serde_json::json!([
        {"op": "remove", "path": "/metadata/ownerReferences"},
        {"op": "replace", "path": "/spec/ingress", "value": [{}]},
    ]);
    json_patch(&policies, &isolation, cut).await?;
    restored("the policy whose owner was cut to be restored")
        .await
        .with_context(|| op.log_tail(20))?;
    let owned = policies.get(&isolation).await?;
    ensure!(
        owned
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.kind == "NetworkProfile" && r.name == name && r.controller == Some(true)),
        "the owner reference is back: {:?}",
        owned.metadata.owner_references
    );

    // Deleting a managed policy: it comes back.
    policies.delete(&isolation, &DeleteParams::default()).await?;
    wait_for_policies(&ns, &name, &expected).await?;

    // Converged, an unrelated namespace change makes no write: the policies and the
    // profile keep their resourceVersions.
    let versions = || async {
        let mut v: Vec<String> = Vec::new();
        for p in &expected {
            v.push(
                policies
                    .get(p)
                    .await?
                    .metadata
                    .resource_version
                    .unwrap_or_default(),
            );
        }
        v.push(
            profiles
                .get(&name)
                .await?
                .metadata
                .resource_version
                .unwrap_or_default(),
        );
        Ok::<_, anyhow::Error>(v)
    };
    // Settled: nothing written for 5 s (a busy operator may still have a write queued).
    let before = eventually("the status to settle", TIMEOUT, || async {
        let a = versions().await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok((versions().await? == a).then_some(a))
    })
    .await?;
    let touch = serde_json::json!({"metadata": {"labels": {"e2e.chassis.dev/unrelated": "x"}}});
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        versions().await? == before,
        "an unrelated label change caused writes"
    );

    // Removing the label removes the policies and the namespace from the status.
    let unlabel = serde_json::json!({"metadata": {"labels": {"e2e.chassis.dev/team": null}}});
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&unlabel))
        .await?;
    wait_for_policies(&ns, &name, &[]).await?;
    eventually("matchedNamespaces to drop the namespace", TIMEOUT, || async {
        let p = profiles.get(&name).await?;
        Ok((!p.status.unwrap_or_default().matched_namespaces.contains(&ns)).then_some(()))
    })
    .await?;

    // Labelled again, then the profile is deleted: every policy goes.
    let other = unique("team-a");
    namespaces
        .create(
            &PostParams::default(),
            &chassis_e2e::namespace(&other, &[("e2e.chassis.dev/team", &team)]),
        )
        .await?;
    let relabel = serde_json::json!({"metadata": {"labels": {"e2e.chassis.dev/team": team}}});
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&relabel))
        .await?;
    wait_for_policies(&ns, &name, &expected).await?;
    wait_for_policies(&other, &name, &expected).await?;
    profiles.delete(&name, &DeleteParams::foreground()).await?;
    wait_for_policies(&ns, &name, &[]).await?;
    wait_for_policies(&other, &name, &[]).await?;
    for n in [&ns, &other] {
        namespaces.delete(n, &DeleteParams::default()).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_namespace_selector_that_could_match_nothing_by_mistake_is_refused() -> Result<()> {
    let client = cluster().admin().await?;
    let profiles: Api<NetworkProfile> = Api::all(client);
    let with = |operator: &str, values: Option<Vec<&str>>| {
        let mut p = NetworkProfile::new(&unique("sel"), NetworkProfileSpec::default());
        p.spec.namespace_selector = Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: operator.into(),
                values: values.map(|v| v.into_iter().map(String::from).collect()),
            }]),
            ..Default::default()
        });
        p
    };
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    // A misspelt operator, In without values, Exists with values.
    for bad in [
        with("notin", Some(vec!["prod"])),
        with("In", Some(vec![])),
        with("Exists", Some(vec!["x"])),
    ] {
        refused_saying(
            profiles.create(&dry_run, &bad).await,
            &format!("{:?}", bad.spec.namespace_selector),
            "needs the operator In or NotIn with values",
        )?;
    }
    for good in [with("NotIn", Some(vec!["prod"])), with("DoesNotExist", None)] {
        profiles.create(&dry_run, &good).await?;
    }
    // The same rule on an EgressPolicy's pods: a selector the API server refuses in a
    // NetworkPolicy left no policy at all, not even the deny-all fallback (which uses
    // it too), so egress stayed open. (An allowed peer's selectors go unchecked: the
    // API server's CEL budget cannot take the rule inside a list of 32, and a refused
    // allow rule lets less in, not more.)
    let in_without_values = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "app".into(),
            operator: "In".into(),
            values: None,
        }]),
        ..Default::default()
    };
    let egress = EgressPolicy::new(
        &unique("pods"),
        EgressPolicySpec {
            pod_selector: Some(in_without_values),
            ..Default::default()
        },
    );
    let egresses: Api<EgressPolicy> = Api::namespaced(cluster().admin().await?, "default");
    refused_saying(
        egresses.create(&dry_run, &egress).await,
        "an egress pod selector",
        "needs the operator In or NotIn with values",
    )?;
    Ok(())
}

#[tokio::test]
async fn a_selector_key_no_label_can_have_says_so_and_keeps_the_policies_in_place() -> Result<()> {
    // The schema cannot check matchLabels keys (CEL over a map's keys is past the API
    // server's cost budget): a typo such as a space in a key made the profile select
    // no namespace, remove its policies and still say Ready.
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let profiles: Api<NetworkProfile> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let team = unique("team");
    let name = unique("typo");
    let (good, typo) = ("e2e.chassis.dev/team", "e2e.chassis.dev/team name");
    let mut profile = NetworkProfile::new(&name, NetworkProfileSpec::default());
    profile.spec.isolation = Isolation::Namespace;
    profile.spec.namespace_selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([(good.to_string(), team.clone())])),
        ..Default::default()
    });
    profiles.create(&PostParams::default(), &profile).await?;
    // A namespace the profile's selector picks.
    let of_team = |ns: &str| chassis_e2e::namespace(ns, &[(good, team.as_str())]);
    let ns = unique("team-typo");
    namespaces.create(&PostParams::default(), &of_team(&ns)).await?;
    let expected = vec![format!("profile.{name}.isolation")];
    wait_for_policies(&ns, &name, &expected).await?;

    // One merge patch renames the key (two would pass through `{}`, every namespace).
    let rekey = |from: &str, to: &str| {
        Patch::Merge(serde_json::json!({
            "spec": {"namespaceSelector": {"matchLabels": {from: null, to: team.clone()}}}
        }))
    };
    profiles
        .patch(&name, &PatchParams::default(), &rekey(good, typo))
        .await?;
    // Ready=False, InvalidSelector, saying `says`; the profile as it was then.
    let invalid_selector = |says: String| {
        let (profiles, name) = (&profiles, &name);
        async move {
            let refused = wait_for_condition(profiles, name, "Ready", "False", TIMEOUT, Some(op)).await?;
            let ready = chassis_e2e::condition(&refused, "Ready").context("a Ready condition")?;
            ensure!(
                ready.reason == "InvalidSelector" && ready.message.contains(&says),
                "Ready: {ready:?}"
            );
            Ok::<_, anyhow::Error>(refused)
        }
    };
    let refused = invalid_selector(format!("matchLabels key {typo:?}")).await?;
    let listed = refused
        .status
        .as_ref()
        .map(|s| s.matched_namespaces.clone())
        .unwrap_or_default();
    ensure!(
        listed.contains(&ns),
        "matchedNamespaces still lists {ns}: {listed:?}"
    );
    // Nothing was taken away meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        profile_policies(&ns, &name).await? == expected,
        "the policies in place stay while the selector is invalid"
    );

    // Fixed: Ready again, the namespace still covered.
    profiles
        .patch(&name, &PatchParams::default(), &rekey(typo, good))
        .await?;
    wait_for_condition(&profiles, &name, "Ready", "True", TIMEOUT, Some(op)).await?;
    wait_for_policies(&ns, &name, &expected).await?;

    // An allowFrom peer's selector, rendered into a policy of its own: the API server
    // would refuse it on every write (ApplyFailed, retried forever). Its policy stays
    // where it is, no new namespace gets it, the rest is served.
    let peer = |pods: &str| {
        Patch::Merge(serde_json::json!({"spec": {"allowFrom": [{
            "name": "scrapers",
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {pods: "prometheus"}},
        }]}}))
    };
    let both = vec![
        format!("profile.{name}.from-scrapers"),
        format!("profile.{name}.isolation"),
    ];
    profiles
        .patch(&name, &PatchParams::default(), &peer("app"))
        .await?;
    wait_for_policies(&ns, &name, &both).await?;
    profiles
        .patch(&name, &PatchParams::default(), &peer("app name"))
        .await?;
    invalid_selector("allowFrom[0] (scrapers) podSelector: matchLabels key \"app name\"".into()).await?;
    let later = unique("team-typo");
    namespaces
        .create(&PostParams::default(), &of_team(&later))
        .await?;
    wait_for_policies(&later, &name, &expected).await?;
    ensure!(
        profile_policies(&ns, &name).await? == both,
        "the peer's policy in place stays while its selector is invalid"
    );
    // A namespace that leaves the profile meanwhile loses the frozen policy too: alone,
    // it would shut the namespace's pods off from each other.
    let leave = serde_json::json!({"metadata": {"labels": {good: null}}});
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&leave))
        .await?;
    wait_for_policies(&ns, &name, &[]).await?;
    profiles
        .patch(&name, &PatchParams::default(), &peer("app"))
        .await?;
    wait_for_condition(&profiles, &name, "Ready", "True", TIMEOUT, Some(op)).await?;
    wait_for_policies(&later, &name, &both).await?;
    profiles.delete(&name, &DeleteParams::default()).await?;
    for ns in [ns, later] {
        namespaces.delete(&ns, &DeleteParams::default()).await?;
    }
    Ok(())
}

#[tokio::test]
async fn allow_from_without_isolation_is_refused() -> Result<()> {
    let profiles: Api<NetworkProfile> = Api::all(cluster().admin().await?);
    let mut open = NetworkProfile::new(&unique("open"), NetworkProfileSpec::default());
    open.spec.isolation = Isolation::None;
    open.spec.allow_from = vec![AllowedPeer {
        name: "monitoring".into(),
        namespace_selector: LabelSelector::default(),
        pod_selector: None,
        ports: None,
    }];
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    refused_saying(
        profiles.create(&dry_run, &open).await,
        "allowFrom with isolation None",
        "allowFrom needs isolation: Namespace",
    )?;
    open.spec.isolation = Isolation::Namespace;
    profiles.create(&dry_run, &open).await?;
    Ok(())
}

#[tokio::test]
async fn a_project_whose_template_names_a_profile_becomes_network_ready() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let profiles: Api<NetworkProfile> = Api::all(client.clone());
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());
    let profile = unique("proj-net");
    let tpl = unique("tpl-net");
    templates
        .create(
            &PostParams::default(),
            &ProjectTemplate::new(
                &tpl,
                ProjectTemplateSpec {
                    network_profiles: vec![profile.clone()],
                    ..Default::default()
                },
            ),
        )
        .await?;
    let name = unique("netproj");
    projects
        .create(
            &PostParams::default(),
            &Project::new(
                &name,
                ProjectSpec {
                    template: tpl.clone(),
                    ..Default::default()
                },
            ),
        )
        .await?;

    // The profile does not exist yet: the project says so, and recovers by itself.
    let waiting = wait_for_condition(&projects, &name, "NetworkReady", "False", TIMEOUT, Some(op)).await?;
    let reason = chassis_e2e::condition(&waiting, "NetworkReady")
        .map(|c| c.reason)
        .unwrap_or_default();
    ensure!(reason == "NetworkProfileNotFound", "reason {reason}");
    profiles
        .create(
            &PostParams::default(),
            &NetworkProfile::new(&profile, NetworkProfileSpec::default()),
        )
        .await?;
    let ready = wait_for_condition(&projects, &name, "Ready", "True", TIMEOUT, Some(op)).await?;
    let network = chassis_e2e::condition(&ready, "NetworkReady").context("NetworkReady")?;
    ensure!(
        network.status == "True" && network.reason == "Applied",
        "{network:?}"
    );
    ensure!(
        profile_policies(&name, &profile).await? == vec![format!("profile.{profile}.isolation")],
        "the project namespace has the profile's policy"
    );

    // Editing the profile replaces its policies; the old ones isolate meanwhile, so
    // the project stays Ready throughout (it used to go False and back, every project
    // bound to the profile, on every edit).
    let since = chassis_e2e::condition(&ready, "Ready")
        .context("Ready")?
        .last_transition_time;
    // Transition times have whole seconds: a flip and back within the second of the
    // last one would not show.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let edited = profiles
        .patch(
            &profile,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"allowDNS": false}})),
        )
        .await?;
    eventually("the profile to catch up with its edit", TIMEOUT, || async {
        let now = profiles.get(&profile).await?;
        let seen = now.status.as_ref().and_then(|s| s.observed_generation);
        Ok((seen == edited.metadata.generation).then_some(()))
    })
    .await?;
    // Time for a wrongly woken project to write its status.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = projects.get(&name).await?;
    let still = chassis_e2e::condition(&after, "Ready").context("Ready")?;
    ensure!(
        still.status == "True" && still.last_transition_time == since,
        "Ready changed during the profile's edit: {still:?}"
    );

    projects.delete(&name, &DeleteParams::default()).await?;
    wait_until_gone(&projects, &name, TIMEOUT).await?;
    profiles.delete(&profile, &DeleteParams::default()).await?;
    templates.delete(&tpl, &DeleteParams::default()).await?;
    Ok(())
}

fn random_rules(rng: &mut Rng) -> Vec<EgressRule> {
    const CIDRS: [&str; 10] = [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3/32",
        "10.128.0.0/9",
        "0.0.0.0/0",
        "192.168.0.0/16",
        "fd00::/8",
        "fd00:1::/32",
        "fd00:1::5/128",
    ];
    (0..2 + rng.below(6))
        .map(|_| EgressRule {
            action: if rng.below(2) == 0 {
                EgressAction::Allow
            } else {
                EgressAction::Deny
            },
            to: EgressDestination {
                cidr: rng.pick(&CIDRS).to_string(),
            },
            ports: (rng.below(3) == 0).then(|| {
                vec![EgressPort {
                    protocol: if rng.below(2) == 0 {
                        PortProtocol::Tcp
                    } else {
                        PortProtocol::Udp
                    },
                    port: *rng.pick(&[53, 443]),
                    end_port: None,
                }]
            }),
        })
        .collect()
}

fn addresses() -> Vec<IpAddr> {
    [
        "10.0.0.1",
        "10.1.0.0",
        "10.1.2.2",
        "10.1.2.3",
        "10.1.2.4",
        "10.1.255.255",
        "10.127.255.255",
        "10.128.0.0",
        "10.255.255.255",
        "11.0.0.0",
        "192.168.1.1",
        "8.8.8.8",
        "fd00::1",
        "fd00:1::5",
        "fd00:1::6",
        "fe80::1",
    ]
    .iter()
    .filter_map(|a| a.parse().ok())
    .collect()
}

#[tokio::test]
async fn egress_policies_render_into_exactly_what_their_ordered_rules_say() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let ns = unique("egress");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &chassis_e2e::namespace(&ns, &[]))
        .await?;
    let egresses: Api<EgressPolicy> = Api::namespaced(client.clone(), &ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let ports: [(u16, PortProtocol); 4] = [
        (53, PortProtocol::Udp),
        (53, PortProtocol::Tcp),
        (443, PortProtocol::Tcp),
        (8080, PortProtocol::Tcp),
    ];
    let mut verdicts = 0;
    for seed in 0..12u64 {
        let mut rng = Rng(seed);
        let spec = EgressPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_string(), format!("s{seed}"))])),
                ..Default::default()
            }),
            rules: random_rules(&mut rng),
        };
        let name = format!("seed-{seed}");
        egresses
            .create(&PostParams::default(), &EgressPolicy::new(&name, spec.clone()))
            .await?;
        // The policy as the API server stores it (defaults filled in) is what a CNI reads.
        let stored = eventually(&format!("NetworkPolicy egresspolicy.{name}"), TIMEOUT, || async {
            Ok(policies.get_opt(&format!("egresspolicy.{name}")).await?)
        })
        .await
        .with_context(|| op.log_tail(20))?;
        let parsed = Policy::parse(&stored, &ns).map_err(anyhow::Error::msg)?;

        // One source pod the policy selects, one destination pod per address.
        let serving: Vec<PortModel> = ports
            .iter()
            .map(|(port, p)| PortModel {
                port: *port,
                protocol: if *p == PortProtocol::Udp {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                name: None,
            })
            .collect();
        let destinations = addresses()
            .into_iter()
            .enumerate()
            .map(|(i, ip)| {
                let pod = PodModel {
                    labels: BTreeMap::new(),
                    ip,
                    ports: serving.clone(),
                };
                (format!("d{i}"), pod)
            })
            .collect();
        let source = PodModel {
            labels: BTreeMap::from([("app".to_string(), format!("s{seed}"))]),
            ip: "198.51.100.7".parse()?,
            ports: Vec::new(),
        };
        let model = Model {
            namespaces: BTreeMap::from([
                (
                    ns.clone(),
                    NamespaceModel {
                        labels: BTreeMap::new(),
                        pods: BTreeMap::from([("src".to_string(), source)]),
                    },
                ),
                (
                    "elsewhere".to_string(),
                    NamespaceModel {
                        labels: BTreeMap::new(),
                        pods: destinations,
                    },
                ),
            ]),
        };
        let parsed = vec![parsed];
        let evaluator = Evaluator::new(&model, &parsed);
        let from = evaluator.find(&ns, "src").context("source")?;
        for (i, ip) in addresses().into_iter().enumerate() {
            let to = evaluator
                .find("elsewhere", &format!("d{i}"))
                .context("destination")?;
            for (port, protocol) in ports {
                let want = decide(&spec, ip, protocol, port);
                let proto = if protocol == PortProtocol::Udp {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                if evaluator.allowed(from, to, port, proto) != want {
                    bail!(
                        "seed {seed}: {ip} {}/{port}: the rules say {want}, the stored NetworkPolicy does not\nrules: {:?}\npolicy: {}",
                        protocol.as_str(),
                        spec.rules,
                        serde_json::to_string(&stored.spec)?
                    );
                }
                verdicts += 1;
            }
        }
    }
    eprintln!("{verdicts} verdicts agree");

    // The schema refuses a non-CIDR and a CIDR with host bits outright.
    for (name, cidr) in [("not-a-cidr", "example.com"), ("host-bits", "10.0.0.1/8")] {
        let mut bad = EgressPolicy::new(name, EgressPolicySpec::default());
        bad.spec.rules.push(EgressRule {
            action: EgressAction::Allow,
            to: EgressDestination { cidr: cidr.into() },
            ports: None,
        });
        let err = egresses
            .create(&PostParams::default(), &bad)
            .await
            .err()
            .with_context(|| format!("{cidr} is refused"))?;
        ensure!(
            err.to_string().contains("must be a CIDR without host bits"),
            "{err}"
        );
    }

    // Rules the controller cannot render fail closed: the selected pods get no egress.
    let ports: Vec<EgressPort> = (0..32)
        .map(|i| EgressPort {
            protocol: PortProtocol::Tcp,
            port: 1000 + i * 3,
            end_port: None,
        })
        .collect();
    let too_many = EgressPolicySpec {
        pod_selector: None,
        rules: (0..80)
            .map(|r| EgressRule {
                action: EgressAction::Allow,
                to: EgressDestination {
                    cidr: "10.0.0.0/8".into(),
                },
                ports: Some(
                    ports
                        .iter()
                        .map(|p| EgressPort {
                            port: p.port + r * 100,
                            ..p.clone()
                        })
                        .collect(),
                ),
            })
            .collect(),
    };
    egresses
        .create(
            &PostParams::default(),
            &EgressPolicy::new("too-many-ports", too_many),
        )
        .await?;
    let refused =
        wait_for_condition(&egresses, "too-many-ports", "Ready", "False", TIMEOUT, Some(op)).await?;
    let ready = chassis_e2e::condition(&refused, "Ready").context("Ready")?;
    ensure!(ready.reason == "TooLarge", "{ready:?}");
    ensure!(
        ready
            .message
            .contains("all egress of the selected pods is denied"),
        "{}",
        ready.message
    );
    let deny_all = policies.get("egresspolicy.too-many-ports").await?;
    let spec = deny_all.spec.context("spec")?;
    ensure!(
        spec.policy_types == Some(vec!["Egress".to_string()]) && spec.egress.unwrap_or_default().is_empty(),
        "fail closed: egress denied"
    );

    // A pod selector key no label can have: no NetworkPolicy can carry it (the API
    // server refused the write, and the status said only that, retried forever). The
    // status now names the key and says what that leaves.
    let mut bad_pods = EgressPolicy::new("bad-pods", EgressPolicySpec::default());
    bad_pods.spec.pod_selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([("app name".to_string(), "web".to_string())])),
        ..Default::default()
    });
    egresses.create(&PostParams::default(), &bad_pods).await?;
    let refused = wait_for_condition(&egresses, "bad-pods", "Ready", "False", TIMEOUT, Some(op)).await?;
    let ready = chassis_e2e::condition(&refused, "Ready").context("Ready")?;
    ensure!(
        ready.reason == "InvalidSelector"
            && ready
                .message
                .contains("podSelector: matchLabels key \"app name\"")
            && ready.message.contains("egress is not restricted"),
        "{ready:?}"
    );

    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await?;
    Ok(())
}
