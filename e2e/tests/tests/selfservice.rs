//! Self-service through admission against the real API server: a developer creates
//! a project with only a name and owns it; the requester cannot be forged; reserved
//! names, foreign namespaces and the per-user limit are refused with a clear message.

use std::time::Duration;

use anyhow::{Context, Result};
use chassis_api::tenancy::v1alpha1::{Project, ProjectSpec, ProjectTemplate, ProjectTemplateSpec};
use chassis_e2e::{Operator, cluster, eventually, unique, wait_for_condition};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

const REQUESTER: &str = "tenancy.chassis.dev/requester";

async fn default_template(admin: &Client) -> Result<()> {
    let templates: Api<ProjectTemplate> = Api::all(admin.clone());
    if templates.get_opt("default").await?.is_none() {
        let created = templates
            .create(
                &PostParams::default(),
                &ProjectTemplate::new("default", ProjectTemplateSpec::default()),
            )
            .await;
        if let Err(kube::Error::Api(s)) = &created
            && s.code != 409
        {
            created?;
        }
    }
    Ok(())
}

fn refusal(result: Result<Project, kube::Error>) -> String {
    match result {
        Ok(p) => panic!("the project {} was admitted", p.name_any()),
        Err(kube::Error::Api(status)) => status.message,
        Err(other) => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_developer_creates_a_project_with_only_a_name_and_owns_it() -> Result<()> {
    let op = Operator::shared();
    let admin = cluster().admin().await?;
    default_template(&admin).await?;
    let alice = cluster().user("alice").await?;
    let name = unique("alice");

    // Only a name, as `kubectl create -f` of a file with `metadata.name` alone: no
    // `spec` at all (the mutating webhook adds it, with alice as the admin).
    let bare: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "tenancy.chassis.dev/v1alpha1",
        "kind": "Project",
        "metadata": {"name": name},
    }))?;
    let mine: Api<DynamicObject> = Api::all_with(alice.clone(), &ApiResource::erase::<Project>(&()));
    let created: Project = mine.create(&PostParams::default(), &bare).await?.try_parse()?;
    assert_eq!(created.spec.template, "default");
    assert_eq!(
        created.annotations().get(REQUESTER).map(String::as_str),
        Some("alice")
    );
    assert_eq!(
        created.spec.admins.first().map(|s| s.name.as_str()),
        Some("alice")
    );

    let all: Api<Project> = Api::all(admin.clone());
    wait_for_condition(&all, &name, "Ready", "True", Duration::from_secs(60), Some(op)).await?;
    let ns = Api::<Namespace>::all(admin.clone()).get(&name).await?;
    assert_eq!(ns.annotations().get(REQUESTER).map(String::as_str), Some("alice"));

    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("hello".into());
    let in_project = Api::<ConfigMap>::namespaced(alice.clone(), &name);
    let params = PostParams::default();
    chassis_e2e::once_authorized(|| in_project.create(&params, &cm))
        .await
        .context("alice creates a ConfigMap in her project")?;
    let bob = cluster().user("bob").await?;
    let denied = Api::<ConfigMap>::namespaced(bob, &name).get("hello").await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "bob read it: {denied:?}"
    );

    all.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn the_requester_cannot_be_forged_or_changed() -> Result<()> {
    let admin = cluster().admin().await?;
    default_template(&admin).await?;
    let user = unique("dev");
    let dev = cluster().developer(&user).await?;
    let name = unique("forged");
    let mut forged = Project::new(&name, ProjectSpec::default());
    forged.metadata.annotations = Some([(REQUESTER.to_string(), "someone-else".to_string())].into());
    let created = Api::<Project>::all(dev)
        .create(&PostParams::default(), &forged)
        .await?;
    assert_eq!(
        created.annotations().get(REQUESTER),
        Some(&user),
        "the webhook overwrote the forged value"
    );

    // Even the cluster admin cannot rewrite it later.
    let all: Api<Project> = Api::all(admin);
    let change = serde_json::json!({"metadata": {"annotations": {REQUESTER: "mallory"}}});
    let patched = all
        .patch(&name, &PatchParams::default(), &Patch::Merge(&change))
        .await?;
    assert_eq!(patched.annotations().get(REQUESTER), Some(&user));
    all.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

/// `admins` written as a map (a common YAML slip) is refused by the schema with a
/// message, not replaced by the requester: bob must not silently lose his access.
#[tokio::test]
async fn admins_of_the_wrong_shape_are_refused_not_replaced() -> Result<()> {
    let admin = cluster().admin().await?;
    default_template(&admin).await?;
    let user = unique("dev");
    let dev = cluster().developer(&user).await?;
    let name = unique("shape");
    let slip: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "tenancy.chassis.dev/v1alpha1",
        "kind": "Project",
        "metadata": {"name": name},
        "spec": {"admins": {"kind": "User", "name": "bob"}},
    }))?;
    let projects: Api<DynamicObject> = Api::all_with(dev, &ApiResource::erase::<Project>(&()));
    match projects.create(&PostParams::default(), &slip).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("spec.admins"), "{}", status.message);
        }
        Ok(p) => panic!("admitted with admins {:?}", p.data["spec"]["admins"]),
        Err(other) => return Err(other.into()),
    }
    assert!(Api::<Project>::all(admin).get_opt(&name).await?.is_none());
    Ok(())
}

/// GitOps tools apply Projects server-side. The admin the webhook adds at creation
/// must not count as the applier's field: applying the same manifest (no `admins`)
/// again would then remove it and leave the project without an admin.
#[tokio::test]
async fn reapplying_a_manifest_without_admins_keeps_the_requester_as_admin() -> Result<()> {
    let admin = cluster().admin().await?;
    default_template(&admin).await?;
    let name = unique("applied");
    let manifest = serde_json::json!({
        "apiVersion": "tenancy.chassis.dev/v1alpha1",
        "kind": "Project",
        "metadata": {"name": name},
        "spec": {"template": "default"},
    });
    // The first apply creates it (the GitOps controller is the cluster admin here).
    let all: Api<Project> = Api::all(admin);
    let apply = PatchParams::apply("gitops").force();
    let created = all.patch(&name, &apply, &Patch::Apply(&manifest)).await?;
    let requester = created
        .annotations()
        .get(REQUESTER)
        .cloned()
        .context("the requester is recorded")?;
    for round in 1..=3 {
        let applied = all.patch(&name, &apply, &Patch::Apply(&manifest)).await?;
        let admins: Vec<&str> = applied.spec.admins.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(admins, [requester.as_str()], "after apply {round}");
    }
    all.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn while_the_webhook_is_down_only_requester_changes_wait_for_it() -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    let admin = cluster().admin().await?;
    default_template(&admin).await?;
    let name = unique("hook-down");
    let label = "e2e.chassis.dev/dead-webhook";
    let projects: Api<Project> = Api::all(admin.clone());
    let mut project = Project::new(&name, ProjectSpec::default());
    project.metadata.labels = Some([(label.to_string(), name.clone())].into());
    projects.create(&PostParams::default(), &project).await?;

    // Chassis' mutating webhook as the operator registers it, served by nobody and for
    // this project alone: as if the operator were down.
    let (mut dead, _) = chassis_tenancy::admission::configurations("https://127.0.0.1:1", "");
    // Named to sort first: mutating webhooks run in name order, and the live one
    // (`chassis-tenancy`) would undo the change before this one is asked.
    let hook_name = format!("a-{name}");
    dead.metadata.name = Some(hook_name.clone());
    for hook in dead.webhooks.iter_mut().flatten() {
        hook.object_selector = Some(LabelSelector {
            match_labels: Some([(label.to_string(), name.clone())].into()),
            ..Default::default()
        });
    }
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    hooks.create(&PostParams::default(), &dead).await?;
    let result = async {
        // The API server loads webhook configurations asynchronously: a requester change
        // fails once it uses this one.
        let forge = serde_json::json!({"metadata": {"annotations": {REQUESTER: "mallory"}}});
        let message = eventually(
            "the dead webhook to hold up a requester change",
            Duration::from_secs(30),
            || async {
                match projects
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&forge))
                    .await
                {
                    Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook") => {
                        Ok(Some(s.message))
                    }
                    _ => Ok(None),
                }
            },
        )
        .await?;
        anyhow::ensure!(
            message.contains("mutate.projects.tenancy.chassis.dev"),
            "{message}"
        );
        // Any other update goes through: the garbage collector's removal of a finalizer
        // from a Project being deleted, a label.
        let relabel = serde_json::json!({"metadata": {"labels": {"team": "payments"},
                                                       "finalizers": ["e2e.chassis.dev/held"]}});
        projects
            .patch(&name, &PatchParams::default(), &Patch::Merge(&relabel))
            .await?;
        let release = serde_json::json!({"metadata": {"finalizers": null}});
        let released = projects
            .patch(&name, &PatchParams::default(), &Patch::Merge(&release))
            .await?;
        anyhow::ensure!(
            released.finalizers().is_empty()
                && released.labels().get("team").is_some_and(|t| t == "payments")
        );
        Ok(())
    }
    .await;
    hooks.delete(&hook_name, &DeleteParams::default()).await?;
    projects.delete(&name, &DeleteParams::default()).await?;
    result
}

#[tokio::test]
async fn the_per_user_limit_refuses_the_third_project_with_the_numbers() -> Result<()> {
    let admin = cluster().admin().await?;
    let tpl = limited_template(&admin, "limited").await?;
    let user = unique("dev");
    let projects: Api<Project> = Api::all(cluster().developer(&user).await?);
    let spec = ProjectSpec {
        template: tpl.clone(),
        ..Default::default()
    };
    // A template other than `default` needs the verb `use` on it.
    let message = refusal(
        projects
            .create(
                &PostParams::default(),
                &Project::new(&unique("early"), spec.clone()),
            )
            .await,
    );
    assert!(
        message.contains(&format!("may not use the ProjectTemplate \"{tpl}\"")),
        "{message}"
    );
    grant_use(&admin, &tpl, &user).await?;

    let mut names = Vec::new();
    for _ in 0..2 {
        let name = unique("mine");
        projects
            .create(&PostParams::default(), &Project::new(&name, spec.clone()))
            .await?;
        names.push(name);
    }
    let message = refusal(
        projects
            .create(
                &PostParams::default(),
                &Project::new(&unique("third"), spec.clone()),
            )
            .await,
    );
    assert!(
        message.contains(&format!(
            "user \"{user}\" already has 2 projects and the template \"{tpl}\" allows 2 per user"
        )),
        "{message}"
    );
    // A client retrying a create that went through (its answer lost) is told the name
    // exists, not that it is at the limit: a 403 would read as final.
    match projects
        .create(&PostParams::default(), &Project::new(&names[1], spec.clone()))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409, "{status:?}"),
        other => panic!("a second create of {} gave {other:?}", names[1]),
    }
    // The limit is for self-service: someone who may create namespaces anyway (the
    // cluster admin, a GitOps controller) is not held to it.
    let as_admin: Api<Project> = Api::all(admin.clone());
    for _ in 0..3 {
        let name = unique("platform");
        as_admin
            .create(&PostParams::default(), &Project::new(&name, spec.clone()))
            .await
            .with_context(|| format!("the cluster admin's project {name} past the limit"))?;
        names.push(name);
    }
    remove_limited(&admin, &tpl, &names).await
}

#[tokio::test]
async fn simultaneous_creates_cannot_exceed_the_per_user_limit() -> Result<()> {
    let admin = cluster().admin().await?;
    let tpl = limited_template(&admin, "burst").await?;
    let user = unique("dev");
    grant_use(&admin, &tpl, &user).await?;
    let projects: Api<Project> = Api::all(cluster().developer(&user).await?);
    let spec = ProjectSpec {
        template: tpl.clone(),
        ..Default::default()
    };
    let creates = (0..6).map(|_| {
        let (projects, project) = (projects.clone(), Project::new(&unique("race"), spec.clone()));
        async move { projects.create(&PostParams::default(), &project).await }
    });
    let results = futures::future::join_all(creates).await;
    let admitted: Vec<String> = results.iter().flatten().map(ResourceExt::name_any).collect();
    assert_eq!(
        admitted.len(),
        2,
        "six simultaneous creates against a limit of 2 admitted {admitted:?}; refusals: {:?}",
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
    remove_limited(&admin, &tpl, &admitted).await
}

/// A template allowing 2 projects per user, named `prefix-<unique>`.
async fn limited_template(admin: &Client, prefix: &str) -> Result<String> {
    let tpl = unique(prefix);
    let spec = ProjectTemplateSpec {
        max_projects_per_user: Some(2),
        ..Default::default()
    };
    Api::<ProjectTemplate>::all(admin.clone())
        .create(&PostParams::default(), &ProjectTemplate::new(&tpl, spec))
        .await?;
    Ok(tpl)
}

/// Deletes `projects`, the template and what `grant_use` made for it.
async fn remove_limited(admin: &Client, tpl: &str, projects: &[String]) -> Result<()> {
    let all: Api<Project> = Api::all(admin.clone());
    for name in projects {
        all.delete(name, &DeleteParams::default()).await?;
    }
    Api::<ProjectTemplate>::all(admin.clone())
        .delete(tpl, &DeleteParams::default())
        .await?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .delete(tpl, &DeleteParams::default())
        .await?;
    Api::<ClusterRole>::all(admin.clone())
        .delete(tpl, &DeleteParams::default())
        .await?;
    Ok(())
}

/// Lets `user` make projects from `template` (ClusterRole and binding named after it).
async fn grant_use(admin: &Client, template: &str, user: &str) -> Result<()> {
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": template},
        "rules": [{"apiGroups": ["tenancy.chassis.dev"], "resources": ["projecttemplates"],
                   "resourceNames": [template], "verbs": ["use"]}]
    }))?;
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": template},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": template},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    // The API server's authorizer sees a new binding through its own watch, a moment
    // later on a busy machine: wait until it does, as the webhook's review will ask.
    let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
        "spec": {"user": user, "resourceAttributes": {"group": "tenancy.chassis.dev",
                 "resource": "projecttemplates", "name": template, "verb": "use"}}
    }))?;
    let reviews: Api<SubjectAccessReview> = Api::all(admin.clone());
    eventually(
        "the new grant to reach the authorizer",
        Duration::from_secs(30),
        || {
            let (reviews, review) = (reviews.clone(), review.clone());
            async move {
                let answer = reviews.create(&PostParams::default(), &review).await?;
                Ok(answer.status.is_some_and(|s| s.allowed).then_some(()))
            }
        },
    )
    .await
}

#[tokio::test]
async fn reserved_names_and_unmanaged_namespaces_are_refused() -> Result<()> {
    let admin = cluster().admin().await?;
    default_template(&admin).await?;
    let projects: Api<Project> = Api::all(cluster().developer(&unique("dev")).await?);
    // Built in, and the platform's own (`--reserved-project-names`): a namespace that
    // does not exist (yet) is not free for a project to take.
    for reserved in [
        "kube-system",
        "default",
        "chassis-system",
        "ingress-nginx",
        "openshift-logging",
    ] {
        let message = refusal(
            projects
                .create(
                    &PostParams::default(),
                    &Project::new(reserved, ProjectSpec::default()),
                )
                .await,
        );
        assert!(message.contains("is reserved"), "{reserved}: {message}");
    }

    let legacy = unique("legacy");
    let mut ns = Namespace::default();
    ns.metadata.name = Some(legacy.clone());
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let message = refusal(
        projects
            .create(
                &PostParams::default(),
                &Project::new(&legacy, ProjectSpec::default()),
            )
            .await,
    );
    assert!(
        message.contains("already exists and does not belong to a project"),
        "{message}"
    );
    Api::<Namespace>::all(admin)
        .delete(&legacy, &DeleteParams::default())
        .await?;
    Ok(())
}
