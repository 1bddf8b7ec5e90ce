//! A project's members, quota and limits against the real control plane: who may do
//! what in it, and that Chassis puts back what someone deletes or edits.

use std::time::Duration;

use anyhow::{Context, Result};
use chassis_api::tenancy::v1alpha1::{
    PodSecurityLevel, Project, ProjectSpec, ProjectTemplate, ProjectTemplateSpec, Subject, SubjectKind,
};
use chassis_e2e::{Operator, cluster, eventually, unique, wait_for_condition};
use k8s_openapi::api::core::v1::{ConfigMap, LimitRange, Namespace, ResourceQuota};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject as RbacSubject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(60);

fn quota_template(name: &str, cpu: &str) -> Result<ProjectTemplate> {
    let spec: ProjectTemplateSpec = serde_json::from_value(serde_json::json!({
        "podSecurity": "baseline",
        "resourceQuota": {"hard": {"requests.cpu": cpu, "pods": "20"}},
        "limitRange": {"limits": [{"type": "Container", "default": {"cpu": "500m"}}]},
    }))?;
    let mut t = ProjectTemplate::new(name, spec);
    t.spec.pod_security = PodSecurityLevel::Baseline;
    Ok(t)
}

fn owned_by_alice(name: &str, template: &str) -> Project {
    Project::new(
        name,
        ProjectSpec {
            template: template.into(),
            admins: vec![Subject {
                kind: SubjectKind::User,
                name: "alice".into(),
                namespace: None,
            }],
            ..Default::default()
        },
    )
}

fn hard_cpu(quota: &ResourceQuota) -> Option<String> {
    quota
        .spec
        .as_ref()?
        .hard
        .as_ref()?
        .get("requests.cpu")
        .map(|q| q.0.clone())
}

/// `kubectl patch --type=json`: the JSON patch `ops` under kubectl's field manager.
async fn kubectl_json_patch<K>(api: &Api<K>, name: &str, ops: serde_json::Value) -> Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    json_patch_as(api, name, ops, "kubectl-patch").await
}

/// A JSON patch made under the field manager name `manager`.
async fn json_patch_as<K>(api: &Api<K>, name: &str, ops: serde_json::Value, manager: &str) -> Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let ops: json_patch::Patch = serde_json::from_value(ops)?;
    let params = PatchParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    api.patch(name, &params, &Patch::<()>::Json(ops)).await?;
    Ok(())
}

/// The names of a binding's subjects, in order.
/// A RoleBinding `name` (in `namespace`, or the one it is created in) of the
/// ClusterRole `role` to the user `user`.
fn user_binding(name: &str, namespace: Option<&str>, role: &str, user: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![RbacSubject {
            kind: "User".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            name: user.into(),
            ..Default::default()
        }]),
    }
}

fn member_names(binding: &RoleBinding) -> Vec<String> {
    binding
        .subjects
        .iter()
        .flatten()
        .map(|s| s.name.clone())
        .collect()
}

struct Fixture {
    client: kube::Client,
    project: String,
    template: String,
}

async fn ready_project(cpu: &str) -> Result<Fixture> {
    let op = Operator::shared();
    let client = cluster().admin().await?;
    let template = unique("quota");
    Api::<ProjectTemplate>::all(client.clone())
        .create(&PostParams::default(), &quota_template(&template, cpu)?)
        .await?;
    let project = unique("team");
    let projects: Api<Project> = Api::all(client.clone());
    projects
        .create(&PostParams::default(), &owned_by_alice(&project, &template))
        .await?;
    let ready = wait_for_condition(&projects, &project, "Ready", "True", TIMEOUT, Some(op)).await?;
    for part in ["NamespaceReady", "RBACReady", "QuotaReady", "NetworkReady"] {
        let found = chassis_e2e::condition(&ready, part);
        assert_eq!(
            found.as_ref().map(|c| c.status.as_str()),
            Some("True"),
            "{part}: {found:?}"
        );
    }
    // The template binds no NetworkProfile, and the project says so plainly.
    let network = chassis_e2e::condition(&ready, "NetworkReady");
    assert!(
        network.as_ref().is_some_and(|c| c.reason == "NoNetworkProfiles"
            && c.message.contains("no NetworkProfile is bound")
            && c.message.contains("not restricted")),
        "{network:?}"
    );
    Ok(Fixture {
        client,
        project,
        template,
    })
}

impl Fixture {
    async fn cleanup(self) -> Result<()> {
        Api::<Project>::all(self.client.clone())
            .delete(&self.project, &DeleteParams::default())
            .await?;
        Api::<ProjectTemplate>::all(self.client)
            .delete(&self.template, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

/// Asserts that alice was refused `what` with 403.
fn forbidden<T: std::fmt::Debug>(what: &str, answer: Result<T, kube::Error>) {
    assert!(
        matches!(&answer, Err(kube::Error::Api(s)) if s.code == 403),
        "alice must not {what}: {answer:?}"
    );
}

#[tokio::test]
async fn members_get_their_roles_and_nobody_else_gets_in() -> Result<()> {
    let f = ready_project("4").await?;
    let alice = cluster().user("alice").await?;
    let bob = cluster().user("bob").await?;

    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("settings".into());
    let in_project = Api::<ConfigMap>::namespaced(alice.clone(), &f.project);
    let params = PostParams::default();
    chassis_e2e::once_authorized(|| in_project.create(&params, &cm))
        .await
        .context("alice, the project admin, creates a ConfigMap")?;

    let denied = Api::<ConfigMap>::namespaced(bob, &f.project)
        .list(&Default::default())
        .await;
    assert!(
        matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403),
        "bob must not read alice's project: {denied:?}"
    );

    // Admins manage content, not the limits the platform set. The objects exist (a 403
    // for an object that is not there would prove nothing about the limits).
    Api::<ResourceQuota>::namespaced(f.client.clone(), &f.project)
        .get("chassis-project-quota")
        .await?;
    Api::<LimitRange>::namespaced(f.client.clone(), &f.project)
        .get("chassis-project-limits")
        .await?;
    let raise = serde_json::json!({"spec": {"hard": {"requests.cpu": "400"}}});
    let quotas: Api<ResourceQuota> = Api::namespaced(alice.clone(), &f.project);
    let params = PatchParams::default();
    forbidden(
        "raise her quota",
        quotas
            .patch("chassis-project-quota", &params, &Patch::Merge(&raise))
            .await,
    );
    forbidden(
        "delete her quota",
        quotas
            .delete("chassis-project-quota", &DeleteParams::default())
            .await,
    );
    let wider = serde_json::json!({"spec": {"limits": [{"type": "Container", "default": {"cpu": "64"}}]}});
    forbidden(
        "widen her LimitRange",
        Api::<LimitRange>::namespaced(alice.clone(), &f.project)
            .patch("chassis-project-limits", &params, &Patch::Merge(&wider))
            .await,
    );
    let other = serde_json::json!({"spec": {"template": "default"}});
    forbidden(
        "switch her project's template",
        Api::<Project>::all(alice)
            .patch(&f.project, &params, &Patch::Merge(&other))
            .await,
    );

    // bob joins as editor, then is replaced by a ServiceAccount whose name has a typo,
    // which the API server refuses in a RoleBinding: refused whole, the binding kept bob.
    let projects: Api<Project> = Api::all(f.client.clone());
    let bob_reads = Api::<ConfigMap>::namespaced(cluster().user("bob").await?, &f.project);
    let editors = |list: serde_json::Value| serde_json::json!({"spec": {"editors": list}});
    projects
        .patch(
            &f.project,
            &params,
            &Patch::Merge(&editors(serde_json::json!([{"kind": "User", "name": "bob"}]))),
        )
        .await?;
    let all = kube::api::ListParams::default();
    chassis_e2e::once_authorized(|| bob_reads.list(&all))
        .await
        .context("bob, an editor now, reads the project")?;
    let typo = serde_json::json!([{"kind": "ServiceAccount", "name": "Deploy_Bot", "namespace": "ci"}]);
    projects
        .patch(&f.project, &params, &Patch::Merge(&editors(typo)))
        .await?;
    eventually("bob to lose access", Duration::from_secs(20), || async {
        let answer = bob_reads.list(&all).await;
        Ok(matches!(&answer, Err(kube::Error::Api(s)) if s.code == 403).then_some(()))
    })
    .await?;
    let said = wait_for_condition(&projects, &f.project, "RBACReady", "False", TIMEOUT, None).await?;
    let rbac = chassis_e2e::condition(&said, "RBACReady");
    assert!(
        rbac.as_ref()
            .is_some_and(|c| c.message.contains("Deploy_Bot") && c.message.contains("left out")),
        "{rbac:?}"
    );
    f.cleanup().await
}

#[tokio::test]
async fn deleted_or_edited_children_are_put_back() -> Result<()> {
    let f = ready_project("4").await?;
    let bindings: Api<RoleBinding> = Api::namespaced(f.client.clone(), &f.project);
    let quotas: Api<ResourceQuota> = Api::namespaced(f.client.clone(), &f.project);
    let limits: Api<LimitRange> = Api::namespaced(f.client.clone(), &f.project);
    limits.get("chassis-project-limits").await?;

    let old_uid = bindings.get("chassis-project-admins").await?.metadata.uid;
    bindings
        .delete("chassis-project-admins", &DeleteParams::default())
        .await?;
    eventually(
        "the admins RoleBinding to come back",
        Duration::from_secs(20),
        || async {
            let back = bindings.get_opt("chassis-project-admins").await?;
            Ok(back.filter(|b| b.metadata.uid != old_uid).map(|_| ()))
        },
    )
    .await?;

    quotas
        .delete("chassis-project-quota", &DeleteParams::default())
        .await?;
    eventually("the quota to come back", Duration::from_secs(20), || async {
        Ok(quotas.get_opt("chassis-project-quota").await?.map(|_| ()))
    })
    .await?;

    // An edit by someone else (here the cluster admin with kubectl's manager name).
    let edit = serde_json::json!({"spec": {"hard": {"requests.cpu": "400"}}});
    quotas
        .patch(
            "chassis-project-quota",
            &PatchParams {
                field_manager: Some("kubectl-edit".into()),
                ..Default::default()
            },
            &Patch::Merge(&edit),
        )
        .await?;
    eventually(
        "the edited quota to be reverted",
        Duration::from_secs(20),
        || async {
            let quota = quotas.get("chassis-project-quota").await?;
            Ok((hard_cpu(&quota).as_deref() == Some("4")).then_some(()))
        },
    )
    .await?;

    // A limit removed outright: no field manager owns a removed field any more.
    let remove = serde_json::json!([{"op": "remove", "path": "/spec/hard/pods"}]);
    kubectl_json_patch(&quotas, "chassis-project-quota", remove).await?;
    eventually(
        "the removed quota limit to come back",
        Duration::from_secs(20),
        || async {
            let quota = quotas.get("chassis-project-quota").await?;
            let pods = quota
                .spec
                .and_then(|s| s.hard)
                .and_then(|h| h.get("pods").cloned());
            Ok(pods.map(|_| ()))
        },
    )
    .await?;

    // A member with `admin` in the namespace may edit RoleBindings: cutting the owner
    // reference while changing the subjects must not hide the edit from Chassis.
    let hijack = serde_json::json!([
        {"op": "remove", "path": "/metadata/ownerReferences"},
        {"op": "replace", "path": "/subjects", "value": [
            {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "mallory"}]},
    ]);
    kubectl_json_patch(&bindings, "chassis-project-admins", hijack).await?;
    eventually(
        "the admins RoleBinding to be restored with its owner",
        Duration::from_secs(20),
        || async {
            let binding = bindings.get("chassis-project-admins").await?;
            let names = member_names(&binding);
            let owned = binding
                .metadata
                .owner_references
                .is_some_and(|o| o.iter().any(|r| r.kind == "Project" && r.name == f.project));
            Ok((names == ["alice"] && owned).then_some(()))
        },
    )
    .await?;

    // The same member added under Chassis' own field manager name, which the
    // managedFields check trusts: the members are compared by value as well.
    let spoofed = serde_json::json!([
        {"op": "add", "path": "/subjects/-", "value":
            {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "mallory"}},
    ]);
    json_patch_as(&bindings, "chassis-project-admins", spoofed, "chassis-project").await?;
    eventually(
        "the member added under our manager's name to be removed",
        Duration::from_secs(20),
        || async {
            let binding = bindings.get("chassis-project-admins").await?;
            let names = member_names(&binding);
            Ok((names == ["alice"]).then_some(()))
        },
    )
    .await?;

    // alice takes the editors' binding name while the project has no editors, bound to
    // another role (roleRef cannot change in place); then the project names an editor.
    let squat = user_binding("chassis-project-editors", None, "view", "dave");
    let alice = cluster().user("alice").await?;
    Api::<RoleBinding>::namespaced(alice, &f.project)
        .create(&PostParams::default(), &squat)
        .await?;
    let carol = serde_json::json!({"spec": {"editors": [{"kind": "User", "name": "carol"}]}});
    Api::<Project>::all(f.client.clone())
        .patch(&f.project, &PatchParams::default(), &Patch::Merge(&carol))
        .await?;
    eventually(
        "the editors' binding to be Chassis' again, carol with edit",
        Duration::from_secs(20),
        || async {
            let binding = bindings.get("chassis-project-editors").await?;
            let ok = binding.role_ref.name == "edit" && member_names(&binding) == ["carol"];
            Ok(ok.then_some(()))
        },
    )
    .await?;
    f.cleanup().await
}

#[tokio::test]
async fn a_bigger_quota_in_the_template_reaches_every_project() -> Result<()> {
    let f = ready_project("2").await?;
    let projects: Api<Project> = Api::all(f.client.clone());
    let second = unique("team");
    projects
        .create(&PostParams::default(), &owned_by_alice(&second, &f.template))
        .await?;
    wait_for_condition(
        &projects,
        &second,
        "Ready",
        "True",
        TIMEOUT,
        Some(Operator::shared()),
    )
    .await?;

    let templates: Api<ProjectTemplate> = Api::all(f.client.clone());
    chassis_e2e::update(&templates, &f.template, |t| {
        if let Some(q) = t.spec.resource_quota.as_mut() {
            q.hard
                .get_or_insert_with(Default::default)
                .insert("requests.cpu".into(), Quantity("8".into()));
        }
    })
    .await?;

    for ns in [&f.project, &second] {
        let quotas: Api<ResourceQuota> = Api::namespaced(f.client.clone(), ns);
        eventually(
            &format!("the new quota in {ns}"),
            Duration::from_secs(30),
            || async {
                let quota = quotas.get("chassis-project-quota").await?;
                Ok((hard_cpu(&quota).as_deref() == Some("8")).then_some(()))
            },
        )
        .await?;
    }
    projects.delete(&second, &DeleteParams::default()).await?;
    f.cleanup().await
}

/// The chart's ValidatingAdmissionPolicy (`templates/operator-scope.yaml`, installed by
/// the e2e setup as the chart renders it): the operator's own token, which RBAC lets
/// create RoleBindings anywhere, may write them (and quotas, limits, namespaces) only in
/// namespaces that Projects own.
#[tokio::test]
async fn a_stolen_operator_token_cannot_bind_admin_or_take_namespaces_outside_projects() -> Result<()> {
    let fixture = ready_project("2").await?;
    let admin = fixture.client.clone();
    let stolen = chassis_e2e::client_from(&cluster().operator_kubeconfig()).await?;
    let foreign = unique("foreign");
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(&PostParams::default(), &chassis_e2e::namespace(&foreign, &[]))
        .await?;
    let grant = |namespace: &str| user_binding("mallory-admin", Some(namespace), "admin", "mallory");
    let refused = |what: &str, answer: Result<_, kube::Error>, says: &str| match answer {
        Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains(says) => {}
        other => panic!("the operator's token may {what}: {other:?}"),
    };

    for namespace in [foreign.as_str(), "kube-system", "default"] {
        let bindings: Api<RoleBinding> = Api::namespaced(stolen.clone(), namespace);
        let answer = bindings.create(&PostParams::default(), &grant(namespace)).await;
        refused(
            &format!("bind admin in {namespace}"),
            answer.map(|_| ()),
            "in namespaces of Projects",
        );
        let quotas: Api<ResourceQuota> = Api::namespaced(stolen.clone(), namespace);
        let quota = ResourceQuota {
            metadata: ObjectMeta {
                name: Some("squeeze".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        refused(
            &format!("create a quota in {namespace}"),
            quotas.create(&PostParams::default(), &quota).await.map(|_| ()),
            "in namespaces of Projects",
        );
    }

    // Taking a namespace over by naming a Project as its controller would hand it to
    // the garbage collector once that Project is absent.
    // The label too, so that only the check of the namespace as it was refuses it.
    let adopt = serde_json::json!({"metadata": {
        "labels": {"tenancy.chassis.dev/project": foreign},
        "ownerReferences": [{
            "apiVersion": "tenancy.chassis.dev/v1alpha1", "kind": "Project", "name": foreign,
            "uid": "00000000-0000-0000-0000-000000000000", "controller": true,
        }],
    }});
    let answer = Api::<Namespace>::all(stolen.clone())
        .patch(&foreign, &PatchParams::default(), &Patch::Merge(&adopt))
        .await;
    refused(
        "adopt a namespace",
        answer.map(|_| ()),
        "may only create or change a namespace that the Project of the same name controls",
    );
    let answer = Api::<Namespace>::all(stolen.clone())
        .create(
            &PostParams::default(),
            &chassis_e2e::namespace(&unique("loose"), &[]),
        )
        .await;
    refused(
        "create an unowned namespace",
        answer.map(|_| ()),
        "may only create or change a namespace",
    );

    // What it is for still works: a dry run anywhere (the template's bind check runs
    // in `default`) and a binding inside the project's namespace.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Api::<RoleBinding>::namespaced(stolen.clone(), "default")
        .create(&dry, &grant("default"))
        .await
        .context("a dry-run binding in default")?;
    let inside: Api<RoleBinding> = Api::namespaced(stolen.clone(), &fixture.project);
    inside
        .create(&PostParams::default(), &grant(&fixture.project))
        .await
        .context("a binding in the project's namespace")?;
    inside
        .delete("mallory-admin", &DeleteParams::default())
        .await
        .context("deleting it again")?;

    namespaces.delete(&foreign, &DeleteParams::default()).await?;
    fixture.cleanup().await
}
