//! The operator process itself: metrics that move, readiness that waits for synced
//! caches, and leader election with fail-over.

use std::time::Duration;

use anyhow::{Context, Result};
use chassis_api::tenancy::v1alpha1::{Project, ProjectSpec, ProjectTemplate, ProjectTemplateSpec};
use chassis_e2e::{Operator, cluster, eventually, unique, wait_for_condition};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::Kubeconfig;

const RECONCILES: &str = "chassis_reconciles_total{controller=\"project\"}";

async fn make_project(client: &kube::Client) -> Result<(String, String)> {
    let tpl = unique("tpl");
    let templates: Api<ProjectTemplate> = Api::all(client.clone());
    templates
        .create(
            &PostParams::default(),
            &ProjectTemplate::new(&tpl, ProjectTemplateSpec::default()),
        )
        .await?;
    let name = unique("metrics");
    let projects: Api<Project> = Api::all(client.clone());
    let spec = ProjectSpec {
        template: tpl.clone(),
        ..Default::default()
    };
    projects
        .create(&PostParams::default(), &Project::new(&name, spec))
        .await?;
    Ok((name, tpl))
}

async fn cleanup(client: &kube::Client, project: &str, template: &str) -> Result<()> {
    Api::<Project>::all(client.clone())
        .delete(project, &DeleteParams::default())
        .await?;
    Api::<ProjectTemplate>::all(client.clone())
        .delete(template, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn metrics_count_reconciles_of_a_new_project() -> Result<()> {
    let op = Operator::shared();
    op.wait_for_http("/readyz", 200, Duration::from_secs(60)).await?;
    let client = cluster().admin().await?;
    let before = op.metric(RECONCILES).await?;

    let (name, tpl) = make_project(&client).await?;
    let projects: Api<Project> = Api::all(client.clone());
    wait_for_condition(
        &projects,
        &name,
        "Ready",
        "True",
        Duration::from_secs(60),
        Some(op),
    )
    .await?;

    let after = op.metric(RECONCILES).await?;
    assert!(
        after > before,
        "reconcile counter did not move: {before} -> {after}"
    );
    let (_, body) = op.get("/metrics").await?;
    assert!(
        body.contains("chassis_reconcile_duration_seconds_count{controller=\"project\"}"),
        "{body}"
    );
    let (status, _) = op.get("/healthz").await?;
    assert_eq!(status, 200);
    cleanup(&client, &name, &tpl).await
}

/// A kubeconfig for a fresh ServiceAccount with no permissions at all.
async fn service_account_kubeconfig(client: &kube::Client, name: &str) -> Result<std::path::PathBuf> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(name.into());
    sas.create(&PostParams::default(), &sa).await?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .context("token request has no status")?
        .token;
    let mut kc = Kubeconfig::read_from(cluster().kubeconfig())?;
    for auth in kc.auth_infos.iter_mut().filter_map(|a| a.auth_info.as_mut()) {
        auth.token = Some(token.clone().into());
    }
    let path = cluster().dir.join(format!("kubeconfig-{name}"));
    std::fs::write(&path, serde_norway::to_string(&kc)?)?;
    Ok(path)
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let owned = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    PolicyRule {
        api_groups: owned(groups),
        resources: owned(resources),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn readyz_is_503_until_the_caches_sync() -> Result<()> {
    let client = cluster().admin().await?;
    let name = unique("readyz");
    let kubeconfig = service_account_kubeconfig(&client, &name).await?;
    let op = Operator::start_with_kubeconfig(&name, &kubeconfig, &["--controllers", "project"])?;

    op.wait_for_http("/healthz", 200, Duration::from_secs(30)).await?;
    // Without permission to list projects the caches cannot sync.
    for _ in 0..10 {
        let (status, body) = op.get("/readyz").await?;
        assert_eq!(status, 503, "ready without synced caches: {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let roles: Api<ClusterRole> = Api::all(client.clone());
    let mut role = ClusterRole::default();
    role.metadata.name = Some(name.clone());
    role.rules = Some(vec![
        rule(
            &["tenancy.chassis.dev"],
            &["projects", "projecttemplates"],
            &["get", "list", "watch"],
        ),
        // Reads only: readiness needs synced caches, and this operator, once ready, would
        // otherwise write to the Projects of the tests running beside it.
        // NetworkReady reads the bound NetworkProfiles.
        rule(
            &["network.chassis.dev"],
            &["networkprofiles"],
            &["get", "list", "watch"],
        ),
        rule(&[""], &["namespaces"], &["get", "list", "watch"]),
        rule(
            &["rbac.authorization.k8s.io"],
            &["rolebindings"],
            &["get", "list", "watch"],
        ),
        rule(
            &[""],
            &["resourcequotas", "limitranges"],
            &["get", "list", "watch"],
        ),
    ]);
    roles.create(&PostParams::default(), &role).await?;
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    let binding = ClusterRoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.clone(),
            namespace: Some("default".into()),
            ..Default::default()
        }]),
    };
    bindings.create(&PostParams::default(), &binding).await?;

    // After RBAC is fixed, kube-runtime retries the failed lists with growing gaps
    // (seen: 7 to 90 s here); see the closing note of the foundation issue.
    let took = op.wait_for_http("/readyz", 200, Duration::from_secs(180)).await?;
    eprintln!("ready {took:?} after the permissions were granted");

    drop(op);
    bindings.delete(&name, &DeleteParams::default()).await?;
    roles.delete(&name, &DeleteParams::default()).await?;
    Api::<ServiceAccount>::namespaced(client, "default")
        .delete(&name, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_within_20s() -> Result<()> {
    let client = cluster().admin().await?;
    // The lease the chart's Role allows: the operators run with its permissions.
    let lease = unique("lease");
    let flags = [
        "--leader-elect",
        "--lease-name",
        "chassis-operator",
        "--lease-namespace",
        chassis_e2e::CHART_NAMESPACE,
    ];
    let first = Operator::start(&format!("{lease}-a"), &flags)?;
    first
        .wait_for_http("/readyz", 200, Duration::from_secs(60))
        .await?;
    let second = Operator::start(&format!("{lease}-b"), &flags)?;
    second
        .wait_for_http("/healthz", 200, Duration::from_secs(30))
        .await?;

    let (name, tpl) = make_project(&client).await?;
    let projects: Api<Project> = Api::all(client.clone());
    wait_for_condition(
        &projects,
        &name,
        "Ready",
        "True",
        Duration::from_secs(60),
        Some(&first),
    )
    .await?;

    assert!(
        first.metric(RECONCILES).await? > 0.0,
        "the leader reconciled nothing"
    );
    assert_eq!(
        second.metric(RECONCILES).await?,
        0.0,
        "the standby must not reconcile"
    );
    assert_eq!(second.get("/readyz").await?.0, 503, "the standby is not ready");
    assert_eq!(second.metric("chassis_leader").await?, 0.0);

    let mut first = first;
    first.kill()?;
    // The handover itself: the lease (10 s) runs out and the standby takes it.
    let killed = std::time::Instant::now();
    eventually(
        "the standby to take the lease",
        Duration::from_secs(20),
        || async { Ok((second.metric("chassis_leader").await? == 1.0).then_some(())) },
    )
    .await?;
    eprintln!(
        "standby took the lease {:?} after the leader was killed",
        killed.elapsed()
    );
    // Then it starts its controllers and syncs its caches, which a busy machine slows.
    let took = second
        .wait_for_http("/readyz", 200, Duration::from_secs(60))
        .await?;
    eprintln!("standby ready {took:?} later");

    // The new leader does the work now. Its count first settles (it reconciles every
    // existing project once it leads), then must move for a project made now (the
    // shared operator of this test binary reconciles it too, so Ready alone would not
    // show who did).
    let mut settled = second.metric(RECONCILES).await?;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = second.metric(RECONCILES).await?;
        if now == settled {
            break;
        }
        settled = now;
    }
    let (name2, tpl2) = make_project(&client).await?;
    wait_for_condition(
        &projects,
        &name2,
        "Ready",
        "True",
        Duration::from_secs(60),
        Some(&second),
    )
    .await?;
    eventually(
        "the new leader to reconcile the new project",
        Duration::from_secs(20),
        || async { Ok((second.metric(RECONCILES).await? > settled).then_some(())) },
    )
    .await?;

    drop(first);
    drop(second);
    cleanup(&client, &name, &tpl).await?;
    cleanup(&client, &name2, &tpl2).await
}

/// Chassis makes the create entry of a child its own once (so fields it stops setting
/// are removed), with the version it read as the precondition. When the object moved
/// on meanwhile (quota admission bumps a ResourceQuota on every pod), the API server
/// must answer 409, which is retried as a passing conflict, not 422, which the project
/// would show as the API server refusing its quota.
#[tokio::test]
async fn folding_the_create_entry_of_an_object_that_moved_on_is_a_conflict() -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};

    let client = cluster().admin().await?;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let name = unique("fold");
    let mut map = ConfigMap::default();
    map.metadata.name = Some(name.clone());
    map.data = Some([("a".to_string(), "1".to_string())].into());
    let created = maps.create(&PostParams::default(), &map).await?;
    let read_at = created.metadata.resource_version.clone().unwrap_or_default();
    let entries = created.metadata.managed_fields.clone().unwrap_or_default();
    let moved = serde_json::json!({"data": {"b": "2"}});
    maps.patch(&name, &PatchParams::default(), &Patch::Merge(&moved))
        .await?;

    let stale = chassis_runtime::apply::fold_patch(&read_at, &entries)?;
    let answer = maps
        .patch(&name, &PatchParams::default(), &Patch::Json::<()>(stale))
        .await;
    let outcome = match answer {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        other => Err(anyhow::anyhow!("expected 409 Conflict, got {other:?}")),
    };
    let now = maps
        .get(&name)
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let current = chassis_runtime::apply::fold_patch(&now, &entries)?;
    let folded = maps
        .patch(&name, &PatchParams::default(), &Patch::Json::<()>(current))
        .await;
    maps.delete(&name, &DeleteParams::default()).await?;
    outcome?;
    folded.context("the same patch at the current version")?;
    Ok(())
}
