//! Projects against the real control plane: namespace, labels, ownership, garbage
//! collection, schema and CEL validation, and recovery from a missing template.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chassis_api::tenancy::v1alpha1::{
    PodSecurityLevel, Project, ProjectSpec, ProjectTemplate, ProjectTemplateSpec, Subject, SubjectKind,
};
use chassis_e2e::{Operator, cluster, unique, wait_for_condition, wait_until_gone};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, ResourceExt};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn template(name: &str, level: PodSecurityLevel) -> ProjectTemplate {
    ProjectTemplate::new(
        name,
        ProjectTemplateSpec {
            labels: [("team".to_string(), "payments".to_string())].into(),
            annotations: [("cost-center".to_string(), "42".to_string())].into(),
            pod_security: level,
            ..Default::default()
        },
    )
}

/// A new `baseline` template and a project (named `prefix-...`) made from it.
async fn baseline_project(
    templates: &Api<ProjectTemplate>,
    projects: &Api<Project>,
    prefix: &str,
) -> Result<(String, String)> {
    let tpl = unique("tpl");
    templates
        .create(
            &PostParams::default(),
            &template(&tpl, PodSecurityLevel::Baseline),
        )
        .await?;
    let name = unique(prefix);
    projects
        .create(&PostParams::default(), &project(&name, &tpl))
        .await?;
    Ok((tpl, name))
}

fn project(name: &str, template: &str) -> Project {
    Project::new(
        name,
        ProjectSpec {
            display_name: Some("Payments".into()),
            template: template.into(),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn project_gets_its_namespace_and_deleting_it_removes_the_namespace() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());

    let (tpl, name) = baseline_project(&templates, &projects, "payments").await?;

    let ready = wait_for_condition(&projects, &name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;
    let status = ready.status.clone().context("a Ready project has a status")?;
    assert_eq!(status.namespace.as_deref(), Some(name.as_str()));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "NamespaceReady" && c.status == "True"),
        "{status:?}"
    );
    assert_eq!(status.observed_generation, ready.metadata.generation);

    let ns = namespaces.get(&name).await?;
    let labels = ns.labels();
    assert_eq!(
        labels.get("team").map(String::as_str),
        Some("payments"),
        "template label"
    );
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            labels
                .get(&format!("pod-security.kubernetes.io/{mode}"))
                .map(String::as_str),
            Some("baseline"),
            "pod-security {mode} label"
        );
    }
    assert_eq!(
        ns.annotations().get("cost-center").map(String::as_str),
        Some("42")
    );
    assert_eq!(
        ns.annotations()
            .get("tenancy.chassis.dev/display-name")
            .map(String::as_str),
        Some("Payments")
    );
    let owner = ns
        .owner_references()
        .first()
        .cloned()
        .context("namespace has an owner")?;
    assert_eq!(
        (owner.kind.as_str(), Some(owner.uid.as_str())),
        ("Project", ready.uid().as_deref())
    );

    // The real garbage collector removes the namespace once its owner is gone.
    projects.delete(&name, &DeleteParams::default()).await?;
    wait_until_gone(&namespaces, &name, Duration::from_secs(150)).await?;
    templates.delete(&tpl, &DeleteParams::default()).await?;
    Ok(())
}

/// A Project being deleted whose namespace is already gone: a foreground delete
/// (`kubectl delete --cascade=foreground`) removes the namespace first, and another
/// finalizer on the Project (a GitOps tool's, here the test's) keeps the Project after
/// that. The operator must not make the namespace again for it.
#[tokio::test]
async fn a_project_being_deleted_does_not_get_its_namespace_back() -> Result<()> {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());

    let (tpl, name) = baseline_project(&templates, &projects, "foreground").await?;
    wait_for_condition(&projects, &name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;
    let hold = |finalizers: Vec<&str>| json!({"metadata": {"finalizers": finalizers}});
    projects
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(hold(vec!["chassis-e2e/hold"])),
        )
        .await?;
    let first = namespaces.get(&name).await?;
    let version = first.resource_version().context("a resourceVersion")?;
    // Every namespace of that name from now on, however briefly it lives.
    let watch = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut events = namespaces.watch(&watch, &version).await?.boxed();
    projects.delete(&name, &DeleteParams::foreground()).await?;
    wait_until_gone(&namespaces, &name, Duration::from_secs(150)).await?;
    // The Project is still there (held); the operator hears of the namespace's end.
    // Five quiet seconds end the watch; a watch that fails or ends early fails the test
    // (it would otherwise pass having seen nothing).
    let mut made_again = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.try_next()).await {
            Err(_quiet) => break,
            Ok(Ok(Some(WatchEvent::Added(ns)))) => made_again.push(ns.uid()),
            Ok(Ok(Some(WatchEvent::Error(e)))) => anyhow::bail!("the namespace watch failed: {e:?}"),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => anyhow::bail!("the namespace watch ended early"),
            Ok(Err(e)) => anyhow::bail!("the namespace watch failed: {e}"),
        }
    }
    ensure!(
        projects.get_opt(&name).await?.is_some(),
        "the Project should still be held by its finalizer"
    );
    // And no namespace of that name came after the quiet window either.
    ensure!(
        namespaces.get_opt(&name).await?.is_none(),
        "the namespace was made again after the watch"
    );
    projects
        .patch(&name, &PatchParams::default(), &Patch::Merge(hold(vec![])))
        .await?;
    wait_until_gone(&projects, &name, Duration::from_secs(60)).await?;
    ensure!(
        made_again.is_empty(),
        "the namespace was made again: {made_again:?}"
    );
    templates.delete(&tpl, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_child_the_api_server_refuses_is_reported_and_the_project_recovers_when_fixed() -> Result<()> {
    // A template the API server cannot turn into a valid child (a LimitRange whose
    // default exceeds its max): the project must say so, not sit silently half-made.
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());
    let tpl = unique("badlimits");
    let mut bad = template(&tpl, PodSecurityLevel::Baseline);
    bad.spec.limit_range = Some(serde_json::from_value(json!({
        "limits": [{"type": "Container", "default": {"cpu": "2"}, "max": {"cpu": "1"}}]
    }))?);
    templates.create(&PostParams::default(), &bad).await?;
    let name = unique("refused");
    projects
        .create(&PostParams::default(), &project(&name, &tpl))
        .await?;
    let failing =
        wait_for_condition(&projects, &name, "QuotaReady", "False", READY_TIMEOUT, Some(op)).await?;
    let quota = chassis_e2e::condition(&failing, "QuotaReady").context("QuotaReady condition")?;
    assert_eq!(quota.reason, "ApplyFailed");
    assert!(
        quota.message.contains("LimitRange")
            && quota.message.contains("max")
            && !quota.message.contains("Status {"),
        "the message names the child and the API server's reason, in a sentence: {}",
        quota.message
    );
    let ready = chassis_e2e::condition(&failing, "Ready").context("Ready condition")?;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ApplyFailed")
    );
    // The cause, not its consequence (members waiting for the limits).
    assert!(ready.message.contains("LimitRange"), "{}", ready.message);
    // The template says so itself, before anyone makes a project of it.
    template_refused(&templates, &tpl, "LimitRange", op).await?;

    let fixed = json!({"spec": {"limitRange": {"limits": [
        {"type": "Container", "default": {"cpu": "500m"}, "max": {"cpu": "1"}}
    ]}}});
    templates
        .patch(&tpl, &PatchParams::default(), &Patch::Merge(&fixed))
        .await?;
    wait_for_condition(&projects, &name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;
    wait_for_condition(&templates, &tpl, "Ready", "True", READY_TIMEOUT, Some(op)).await?;

    projects.delete(&name, &DeleteParams::default()).await?;
    templates.delete(&tpl, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn missing_template_is_reported_and_the_project_recovers_when_it_appears() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());

    let tpl = unique("later");
    let name = unique("waiting");
    projects
        .create(&PostParams::default(), &project(&name, &tpl))
        .await?;
    let waiting = wait_for_condition(&projects, &name, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let ready = chassis_e2e::condition(&waiting, "Ready").context("Ready condition")?;
    assert_eq!(ready.reason, "TemplateNotFound");
    assert!(ready.message.contains(&tpl), "{}", ready.message);

    templates
        .create(
            &PostParams::default(),
            &template(&tpl, PodSecurityLevel::Restricted),
        )
        .await?;
    wait_for_condition(&projects, &name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;

    projects.delete(&name, &DeleteParams::default()).await?;
    templates.delete(&tpl, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_foreign_namespace_is_never_taken_over() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let projects: Api<Project> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let templates: Api<ProjectTemplate> = Api::all(client.clone());

    // Admission refuses a project named after an existing namespace; the controller
    // must hold the line too when the namespace appears after admission. The project
    // waits for its template, the namespace is made meanwhile, then the template.
    let tpl = unique("tpl");
    let name = unique("taken");
    projects
        .create(&PostParams::default(), &project(&name, &tpl))
        .await?;
    wait_for_condition(&projects, &name, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.clone());
    namespaces.create(&PostParams::default(), &ns).await?;
    templates
        .create(
            &PostParams::default(),
            &template(&tpl, PodSecurityLevel::Restricted),
        )
        .await?;
    chassis_e2e::eventually(
        "the project to report NamespaceConflict",
        READY_TIMEOUT,
        || async {
            let p = projects.get(&name).await?;
            let reason = chassis_e2e::condition(&p, "Ready").map(|c| c.reason);
            Ok((reason.as_deref() == Some("NamespaceConflict")).then_some(()))
        },
    )
    .await
    .with_context(|| op.log_tail(20))?;
    let untouched = namespaces.get(&name).await?;
    assert!(
        untouched.owner_references().is_empty(),
        "the foreign namespace must keep no owner"
    );
    assert!(!untouched.labels().contains_key("tenancy.chassis.dev/project"));

    projects.delete(&name, &DeleteParams::default()).await?;
    namespaces.delete(&name, &DeleteParams::default()).await?;
    templates.delete(&tpl, &DeleteParams::default()).await?;
    Ok(())
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> String {
    match result {
        Ok(obj) => panic!("the API server accepted an invalid object: {obj:?}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message
        }
        Err(other) => panic!("expected a validation error, got {other}"),
    }
}

#[tokio::test]
async fn invalid_projects_are_rejected_by_the_api_server_with_readable_messages() -> Result<()> {
    let client = cluster().admin().await?;
    let projects: Api<Project> = Api::all(client.clone());

    // CEL rule on a subject.
    let mut sa_without_namespace = project(&unique("cel"), "default");
    sa_without_namespace.spec.admins = vec![Subject {
        kind: SubjectKind::ServiceAccount,
        name: "deployer".into(),
        namespace: None,
    }];
    let message = api_error(
        projects
            .create(&PostParams::default(), &sa_without_namespace)
            .await,
    );
    assert!(
        message.contains("namespace is required for a ServiceAccount subject"),
        "{message}"
    );

    // CEL rule on the name: a Project name must be usable as a namespace name.
    let message = api_error(
        projects
            .create(&PostParams::default(), &project("has.a.dot", "default"))
            .await,
    );
    assert!(
        message.contains("a Project name must be a valid namespace name"),
        "{message}"
    );

    // An unknown subject kind is refused by the schema's enum.
    let ar = ApiResource::erase::<Project>(&());
    let raw: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let robot = DynamicObject::new(&unique("robot"), &ar)
        .data(json!({"spec": {"admins": [{"kind": "Robot", "name": "r2d2"}]}}));
    let message = api_error(raw.create(&PostParams::default(), &robot).await);
    assert!(message.contains("Unsupported value: \"Robot\""), "{message}");

    // The template is fixed at creation (admission checked the right to use it).
    let fixed = unique("fixed");
    projects
        .create(&PostParams::default(), &project(&fixed, "default"))
        .await?;
    let switch = serde_json::json!({"spec": {"template": "privileged"}});
    let message = api_error(
        projects
            .patch(
                &fixed,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&switch),
            )
            .await,
    );
    assert!(
        message.contains("spec.template cannot change after creation"),
        "{message}"
    );
    projects.delete(&fixed, &DeleteParams::default()).await?;

    // Template keys Chassis or the API server sets, and a profile name the namespace
    // annotation would split: each refused with its own message.
    let templates: Api<ProjectTemplate> = Api::all(client);
    type Edit = Box<dyn Fn(&mut ProjectTemplateSpec)>;
    let label = |k: &str, v: &str| {
        let (k, v) = (k.to_string(), v.to_string());
        Box::new(move |t: &mut ProjectTemplateSpec| {
            t.labels.insert(k.clone(), v.clone());
        }) as Edit
    };
    let cases: [(Edit, &str); 4] = [
        (
            label("pod-security.kubernetes.io/enforce", "privileged"),
            "(use spec.podSecurity)",
        ),
        // The API server's own label: a template value would be rewritten on every apply.
        (
            label("kubernetes.io/metadata.name", "x"),
            "kubernetes.io/metadata.name by the API server",
        ),
        (
            Box::new(|t| {
                t.annotations
                    .insert("network.chassis.dev/profiles".into(), "restricted".into());
            }),
            "bind profiles with networkProfiles",
        ),
        (
            Box::new(|t| t.network_profiles = vec!["a,b".into()]),
            "networkProfiles[0] in body should match",
        ),
    ];
    for (edit, says) in cases {
        let mut bad = template(&unique("tpl"), PodSecurityLevel::Restricted);
        edit(&mut bad.spec);
        let message = api_error(templates.create(&PostParams::default(), &bad).await);
        assert!(message.contains(says), "{message}");
    }

    // The template is looked up by name: anything else is refused before admission.
    for bad in ["a b", "x/../../api", "Default"] {
        let message = api_error(
            projects
                .create(&PostParams::default(), &project(&unique("t"), bad))
                .await,
        );
        assert!(
            message.contains("spec.template in body should match"),
            "{bad}: {message}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_template_naming_a_missing_role_is_not_ready_until_the_role_exists() -> Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let roles: Api<ClusterRole> = Api::all(client.clone());

    let good = unique("tpl");
    templates
        .create(
            &PostParams::default(),
            &template(&good, PodSecurityLevel::Restricted),
        )
        .await?;
    wait_for_condition(&templates, &good, "Ready", "True", READY_TIMEOUT, Some(op)).await?;

    let role = unique("team-editor");
    let name = unique("tpl");
    let mut typo = template(&name, PodSecurityLevel::Restricted);
    typo.spec.roles.edit = role.clone();
    templates.create(&PostParams::default(), &typo).await?;
    let waiting = wait_for_condition(&templates, &name, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let ready = chassis_e2e::condition(&waiting, "Ready").context("Ready condition")?;
    assert_eq!(ready.reason, "RoleNotFound");
    assert!(
        ready
            .message
            .contains(&format!("roles.edit: ClusterRole {role:?} does not exist")),
        "{}",
        ready.message
    );

    // A project whose editors would be bound to it: the binding would grant nothing,
    // so the project is not Ready either, and says which binding and role.
    let projects: Api<Project> = Api::all(client.clone());
    let proj = unique("missing-role");
    let mut editors = project(&proj, &name);
    editors.spec.editors = vec![Subject {
        kind: SubjectKind::User,
        name: "bob".into(),
        namespace: None,
    }];
    projects.create(&PostParams::default(), &editors).await?;
    let stuck = wait_for_condition(&projects, &proj, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let rbac = chassis_e2e::condition(&stuck, "RBACReady").context("RBACReady")?;
    ensure!(
        rbac.reason == "RoleNotFound" && rbac.message.contains(&format!("binds ClusterRole {role:?}")),
        "{rbac:?}"
    );

    let mut cr = ClusterRole::default();
    cr.metadata.name = Some(role.clone());
    roles.create(&PostParams::default(), &cr).await?;
    wait_for_condition(&templates, &name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;
    // The template's word reaches the project without a change of its own.
    wait_for_condition(&projects, &proj, "Ready", "True", READY_TIMEOUT, Some(op)).await?;
    projects.delete(&proj, &DeleteParams::default()).await?;
    wait_until_gone(&projects, &proj, READY_TIMEOUT).await?;

    for t in [&good, &name] {
        templates.delete(t, &DeleteParams::default()).await?;
    }
    roles.delete(&role, &DeleteParams::default()).await?;
    Ok(())
}

/// Waits for template `tpl` to say `Ready=False` with `ChildRefused` naming `child`.
async fn template_refused(
    templates: &Api<ProjectTemplate>,
    tpl: &str,
    child: &str,
    op: &Operator,
) -> Result<()> {
    let refused = wait_for_condition(templates, tpl, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let ready = chassis_e2e::condition(&refused, "Ready").context("the template's Ready")?;
    ensure!(
        ready.reason == "ChildRefused" && ready.message.contains(child),
        "{ready:?}"
    );
    Ok(())
}

/// The template's label value mended: the project becomes Ready again; then both go.
async fn fix_the_label_then_clean_up(
    templates: &Api<ProjectTemplate>,
    projects: &Api<Project>,
    tpl: &str,
    name: &str,
    op: &Operator,
) -> Result<()> {
    chassis_e2e::update(templates, tpl, |t| {
        t.spec.labels.insert("team".into(), "payments".into());
    })
    .await?;
    wait_for_condition(projects, name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;
    projects.delete(name, &DeleteParams::default()).await?;
    templates.delete(tpl, &DeleteParams::default()).await?;
    Ok(())
}

/// A template whose namespace the API server refuses (a label value it does not take:
/// the CRD checks only label keys' prefixes) shows on the project, and the project
/// recovers once the template is fixed.
#[tokio::test]
async fn a_namespace_the_api_server_refuses_shows_in_the_status_until_the_template_is_fixed() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());
    let tpl = unique("tpl");
    let mut bad = template(&tpl, PodSecurityLevel::Baseline);
    bad.spec.labels.insert("team".into(), "two words".into());
    templates.create(&PostParams::default(), &bad).await?;
    let name = unique("refused-ns");
    projects
        .create(&PostParams::default(), &project(&name, &tpl))
        .await?;
    let refused = wait_for_condition(&projects, &name, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let ready = chassis_e2e::condition(&refused, "Ready").context("Ready")?;
    ensure!(
        ready.reason == "ApplyFailed" && ready.message.contains(&format!("Namespace {name}")),
        "{ready:?}"
    );
    template_refused(&templates, &tpl, "namespace", op).await?;
    fix_the_label_then_clean_up(&templates, &projects, &tpl, &name, op).await
}

/// While the API server refuses the update of a project's namespace (here a template
/// label value it does not take), the rest of the project is still kept: a member
/// removed from `spec.admins` loses the binding at once, not when the template is fixed.
#[tokio::test]
async fn a_refused_namespace_update_does_not_hold_up_a_member_removal() -> Result<()> {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());
    let (tpl, name) = baseline_project(&templates, &projects, "frozen-ns").await?;
    let user = |name: &str| Subject {
        kind: SubjectKind::User,
        name: name.into(),
        namespace: None,
    };
    chassis_e2e::update(&projects, &name, |p| {
        p.spec.admins = vec![user("alice"), user("bob")]
    })
    .await?;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &name);
    let admins = |want: &'static [&'static str]| {
        let bindings = bindings.clone();
        async move {
            let binding = bindings.get_opt("chassis-project-admins").await?;
            let names: Vec<String> = binding
                .and_then(|b| b.subjects)
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.name)
                .collect();
            anyhow::Ok((names == want).then_some(()))
        }
    };
    chassis_e2e::eventually("alice and bob are admins", READY_TIMEOUT, || {
        admins(&["alice", "bob"])
    })
    .await?;

    chassis_e2e::update(&templates, &tpl, |t| {
        t.spec.labels.insert("team".into(), "two words".into());
    })
    .await?;
    let refused = wait_for_condition(&projects, &name, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let namespace = chassis_e2e::condition(&refused, "NamespaceReady").context("NamespaceReady")?;
    ensure!(namespace.reason == "ApplyFailed", "{namespace:?}");

    chassis_e2e::update(&projects, &name, |p| p.spec.admins = vec![user("alice")]).await?;
    chassis_e2e::eventually("bob's admin binding is gone", Duration::from_secs(20), || {
        admins(&["alice"])
    })
    .await?;
    let still = projects.get(&name).await?;
    let ready = chassis_e2e::condition(&still, "Ready").context("Ready")?;
    ensure!(
        ready.status == "False" && ready.reason == "ApplyFailed",
        "the refusal still shows: {ready:?}"
    );

    fix_the_label_then_clean_up(&templates, &projects, &tpl, &name, op).await
}

/// The operator runs with the chart's RBAC, which lets it bind only
/// `tenancy.bindableRoles`, or a role whose every permission it holds itself (RBAC's
/// escalation check). The template says so before any project fails on it.
#[tokio::test]
async fn a_template_naming_a_role_the_operator_may_not_bind_is_not_ready() -> Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let roles: Api<ClusterRole> = Api::all(client.clone());

    // Not among bindableRoles, but the operator holds its only permission.
    let small = unique("reads-namespaces");
    let mut cr = ClusterRole::default();
    cr.metadata.name = Some(small.clone());
    cr.rules = Some(vec![PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["namespaces".into()]),
        verbs: vec!["get".into()],
        ..Default::default()
    }]);
    roles.create(&PostParams::default(), &cr).await?;

    let name = unique("tpl");
    let mut escalating = template(&name, PodSecurityLevel::Restricted);
    escalating.spec.roles.admin = "cluster-admin".into();
    escalating.spec.roles.view = small.clone();
    templates.create(&PostParams::default(), &escalating).await?;
    let waiting = wait_for_condition(&templates, &name, "Ready", "False", READY_TIMEOUT, Some(op)).await?;
    let ready = chassis_e2e::condition(&waiting, "Ready").context("Ready condition")?;
    assert_eq!(ready.reason, "RoleNotBindable");
    assert!(
        ready
            .message
            .starts_with("roles.admin: the operator may not bind ClusterRole \"cluster-admin\""),
        "{}",
        ready.message
    );
    assert!(!ready.message.contains(&small), "{}", ready.message);
    assert!(
        ready.message.contains("tenancy.bindableRoles"),
        "{}",
        ready.message
    );

    chassis_e2e::update(&templates, &name, |fixed| fixed.spec.roles.admin = "admin".into()).await?;
    wait_for_condition(&templates, &name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;

    templates.delete(&name, &DeleteParams::default()).await?;
    roles.delete(&small, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_template_change_reaches_the_namespace_and_removed_labels_go_away() -> Result<()> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    let projects: Api<Project> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());

    let (tpl, name) = baseline_project(&templates, &projects, "evolving").await?;
    wait_for_condition(&projects, &name, "Ready", "True", READY_TIMEOUT, Some(op)).await?;

    chassis_e2e::update(&templates, &tpl, |changed| {
        changed.spec.labels.clear();
        changed.spec.pod_security = PodSecurityLevel::Restricted;
    })
    .await?;

    let ns = chassis_e2e::eventually("the namespace to follow the template", READY_TIMEOUT, || async {
        let ns = namespaces.get(&name).await?;
        let labels = ns.labels();
        let done = !labels.contains_key("team")
            && labels
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str)
                == Some("restricted");
        Ok(done.then_some(ns))
    })
    .await
    .with_context(|| op.log_tail(20))?;
    assert_eq!(
        ns.labels().get("tenancy.chassis.dev/project").map(String::as_str),
        Some(name.as_str())
    );

    projects.delete(&name, &DeleteParams::default()).await?;
    templates.delete(&tpl, &DeleteParams::default()).await?;
    Ok(())
}
