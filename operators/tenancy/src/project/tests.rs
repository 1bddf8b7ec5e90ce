//! Builder and validation tests against fixtures; golden YAML under `testdata/`
//! (regenerate with `UPDATE_GOLDEN=1 cargo test -p chassis-tenancy`).

use std::sync::Arc;

use chassis_api::tenancy::v1alpha1::{
    PodSecurityLevel, Project, ProjectSpec, ProjectTemplate, ProjectTemplateSpec, Subject, SubjectKind,
};
use chassis_api::tenancy::{REQUESTER_ANNOTATION, reason};
use k8s_openapi::api::core::v1::{LimitRangeItem, LimitRangeSpec, Namespace, ResourceQuotaSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;

use super::children::Parts;
use super::{Observed, build, network_differs, status, validate};

fn project(name: &str) -> Project {
    let mut p = Project::new(
        name,
        ProjectSpec {
            display_name: Some("Team A".into()),
            description: Some("Payments backend".into()),
            template: "default".into(),
            ..Default::default()
        },
    );
    p.metadata.uid = Some("uid-1".into());
    p.metadata.generation = Some(3);
    p.metadata.annotations = Some([(REQUESTER_ANNOTATION.to_string(), "alice".to_string())].into());
    p
}

fn template() -> ProjectTemplate {
    ProjectTemplate::new(
        "default",
        ProjectTemplateSpec {
            labels: [("team".to_string(), "payments".to_string())].into(),
            annotations: [("cost-center".to_string(), "42".to_string())].into(),
            pod_security: PodSecurityLevel::Baseline,
            ..Default::default()
        },
    )
}

fn golden(file: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden file");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        actual,
        expected,
        "{} differs; rerun with UPDATE_GOLDEN=1 and review",
        path.display()
    );
}

#[test]
fn namespace_matches_golden() -> Result<(), serde_norway::Error> {
    let ns = build::namespace(&project("payments"), &template());
    golden("namespace.yaml", &serde_norway::to_string(&ns)?);
    Ok(())
}

#[test]
fn namespace_is_owned_by_the_project_and_carries_pod_security() {
    let ns = build::namespace(&project("payments"), &template());
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("baseline")
    );
    assert_eq!(labels.get("team").map(String::as_str), Some("payments"));
    let owner = ns.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.len(), 1);
    assert_eq!(owner[0].kind, "Project");
    assert_eq!(owner[0].uid, "uid-1");
    assert_eq!(owner[0].controller, Some(true));
}

#[test]
fn template_change_changes_the_applied_hash() {
    let p = project("payments");
    let a = build::namespace(&p, &template());
    let mut t = template();
    t.spec.pod_security = PodSecurityLevel::Restricted;
    let b = build::namespace(&p, &t);
    assert_ne!(
        a.metadata
            .annotations
            .as_ref()
            .and_then(|m| m.get(chassis_runtime::apply::APPLIED_HASH_ANNOTATION)),
        b.metadata
            .annotations
            .as_ref()
            .and_then(|m| m.get(chassis_runtime::apply::APPLIED_HASH_ANNOTATION)),
    );
}

#[test]
fn missing_template_is_reported_not_retried() {
    let observed = Observed {
        template: None,
        namespace: None,
    };
    let err = validate(&project("payments"), &observed).expect_err("must be invalid");
    assert_eq!(err.reason, reason::TEMPLATE_NOT_FOUND);
    assert!(err.message.contains("\"default\""), "{}", err.message);
    assert_eq!(err.retry_after, None);
}

#[test]
fn foreign_namespace_is_a_conflict() {
    let foreign = Namespace {
        metadata: ObjectMeta {
            name: Some("payments".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let observed = Observed {
        template: Some(Arc::new(template())),
        namespace: Some(Arc::new(foreign)),
    };
    let err = validate(&project("payments"), &observed).expect_err("must be invalid");
    assert_eq!(err.reason, reason::NAMESPACE_CONFLICT);
}

#[test]
fn own_namespace_is_fine() {
    let p = project("payments");
    let ours = build::namespace(&p, &template());
    let observed = Observed {
        template: Some(Arc::new(template())),
        namespace: Some(Arc::new(ours)),
    };
    assert!(validate(&p, &observed).is_ok());
}

/// A profile event wakes a project when its NetworkReady would change at all: a
/// profile created after the project said it does not exist, not yet in place, keeps
/// False but changes the reason, and the project must stop telling users to create it.
#[test]
fn a_profile_wakes_a_project_whose_network_condition_would_say_something_else() {
    let p = project("payments");
    let ns = build::namespace(&p, &template());
    let missing = vec![("strict".to_string(), None)];
    let parts = Parts {
        network_profiles: missing.clone(),
        ..Default::default()
    };
    let mut said = p.clone();
    said.status = Some(status::reconciled(&p, &ns, Some(&parts), None));
    assert!(!network_differs(Some(&said), &missing), "nothing new");
    assert!(
        network_differs(Some(&said), &[("strict".into(), Some(false))]),
        "created, not in place yet: False all the same, another reason"
    );
    assert!(network_differs(Some(&said), &[("strict".into(), Some(true))]));
    assert!(network_differs(Some(&p), &missing), "no condition yet");
    assert!(network_differs(None, &missing));
}

/// The update of an existing namespace refused: the children were still reconciled,
/// and their parts say so; the namespace's part and Ready carry the refusal.
#[test]
fn a_refused_namespace_update_shows_beside_the_children_it_did_not_hold_up() {
    let p = project("payments");
    let ns = build::namespace(&p, &template());
    let parts = Parts {
        bindings: vec![("chassis-project-admins".into(), "admin".into(), 1)],
        ..Default::default()
    };
    let refused = "applying Namespace payments: metadata.labels: Invalid value".to_string();
    let status = status::reconciled(&p, &ns, Some(&parts), Some(refused.clone()));
    let find = |t| chassis_runtime::conditions::find(&status.conditions, t).expect("set");
    let namespace = find("NamespaceReady");
    assert_eq!(
        (
            namespace.status.as_str(),
            namespace.reason.as_str(),
            namespace.message.as_str()
        ),
        ("False", reason::APPLY_FAILED, refused.as_str())
    );
    assert_eq!(find("RBACReady").status, "True");
    let ready = find("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reason::APPLY_FAILED)
    );
}

#[test]
fn a_refused_child_makes_its_part_and_the_project_not_ready_with_the_answer() {
    let p = project("payments");
    let ns = build::namespace(&p, &template());
    let parts = Parts {
        bindings: vec![("chassis-project-admins".into(), "monitoring-admin".into(), 1)],
        rbac_failure: Some("applying RoleBinding payments/chassis-project-admins: forbidden".into()),
        ..Default::default()
    };
    let status = status::reconciled(&p, &ns, Some(&parts), None);
    let rbac = chassis_runtime::conditions::find(&status.conditions, "RBACReady").expect("RBACReady is set");
    assert_eq!(
        (rbac.status.as_str(), rbac.reason.as_str()),
        ("False", reason::APPLY_FAILED)
    );
    assert!(rbac.message.contains("forbidden"), "{}", rbac.message);
    let ready = chassis_runtime::conditions::find(&status.conditions, "Ready").expect("Ready is set");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reason::APPLY_FAILED)
    );
    let quota =
        chassis_runtime::conditions::find(&status.conditions, "QuotaReady").expect("QuotaReady is set");
    assert_eq!(quota.status, "True", "the parts that worked say so");
}

#[test]
fn status_is_stable_when_nothing_changes() {
    let mut p = project("payments");
    let ns = build::namespace(&p, &template());
    let parts = Parts {
        bindings: vec![],
        quota: false,
        limits: false,
        ..Default::default()
    };
    let first = status::reconciled(&p, &ns, Some(&parts), None);
    assert!(chassis_runtime::conditions::is_true(&first.conditions, "Ready"));
    assert_eq!(first.observed_generation, Some(3));
    p.status = Some(first.clone());
    let second = status::reconciled(&p, &ns, Some(&parts), None);
    assert_eq!(
        first, second,
        "an unchanged project must not produce a status write"
    );
}

fn member(kind: SubjectKind, name: &str, namespace: Option<&str>) -> Subject {
    Subject {
        kind,
        name: name.into(),
        namespace: namespace.map(Into::into),
    }
}

fn template_with_quota() -> ProjectTemplate {
    let mut t = template();
    t.spec.roles.edit = "team-editor".into();
    t.spec.resource_quota = Some(ResourceQuotaSpec {
        hard: Some([("requests.cpu".to_string(), Quantity("4".into()))].into()),
        ..Default::default()
    });
    t.spec.limit_range = Some(LimitRangeSpec {
        limits: vec![LimitRangeItem {
            type_: "Container".into(),
            default: Some([("cpu".to_string(), Quantity("500m".into()))].into()),
            ..Default::default()
        }],
    });
    t
}

#[test]
fn children_match_golden() -> Result<(), serde_norway::Error> {
    let mut p = project("payments");
    p.spec.admins = vec![member(SubjectKind::User, "alice", None)];
    p.spec.editors = vec![
        member(SubjectKind::Group, "payments-devs", None),
        member(SubjectKind::ServiceAccount, "deployer", Some("ci")),
    ];
    let t = template_with_quota();
    let mut out = String::new();
    for (_, binding) in build::role_bindings(&p, &t) {
        if let Some(binding) = binding {
            out += &format!("---\n{}", serde_norway::to_string(&binding)?);
        }
    }
    if let Some(quota) = build::resource_quota(&p, &t) {
        out += &format!("---\n{}", serde_norway::to_string(&quota)?);
    }
    if let Some(limits) = build::limit_range(&p, &t) {
        out += &format!("---\n{}", serde_norway::to_string(&limits)?);
    }
    golden("children.yaml", &out);
    Ok(())
}

#[test]
fn empty_member_lists_get_no_binding() {
    let mut p = project("payments");
    p.spec.viewers = vec![member(SubjectKind::Group, "auditors", None)];
    let bindings = build::role_bindings(&p, &template());
    let present: Vec<_> = bindings
        .iter()
        .filter(|(_, b)| b.is_some())
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(present, vec![build::VIEWERS_BINDING]);
    assert_eq!(
        bindings.len(),
        3,
        "absent bindings are listed so stale ones are removed"
    );
}

#[test]
fn a_template_without_quota_makes_no_quota() {
    let p = project("payments");
    assert!(build::resource_quota(&p, &template()).is_none());
    assert!(build::limit_range(&p, &template()).is_none());
}

#[test]
fn bound_network_profiles_keep_the_project_from_ready_until_applied() {
    let p = project("payments");
    let ns = build::namespace(&p, &template());
    let parts = Parts {
        bindings: vec![],
        quota: false,
        limits: false,
        network_profiles: vec![("baseline".into(), Some(false))],
        ..Default::default()
    };
    let status = status::reconciled(&p, &ns, Some(&parts), None);
    let ready = chassis_runtime::conditions::find(&status.conditions, "Ready").expect("Ready is set");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, reason::NETWORK_PROFILES_PENDING);
    assert!(ready.message.contains("baseline"), "{}", ready.message);

    let missing = status::network_condition(&[("baseline".into(), Some(true)), ("strict".into(), None)]);
    assert_eq!(
        (missing.status, missing.reason),
        (false, reason::NETWORK_PROFILE_NOT_FOUND)
    );
    assert!(
        missing.message.contains("strict") && !missing.message.contains("baseline"),
        "{}",
        missing.message
    );
    let applied = status::network_condition(&[("baseline".into(), Some(true))]);
    assert_eq!((applied.status, applied.reason), (true, reason::APPLIED));

    let mut bound = template();
    bound.spec.network_profiles = vec!["baseline".into(), "strict".into()];
    let ns = build::namespace(&p, &bound);
    let annotation = ns
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("network.chassis.dev/profiles"));
    assert_eq!(
        annotation.map(String::as_str),
        Some("baseline,strict"),
        "the profile controller reads this"
    );
    for part in ["NamespaceReady", "RBACReady", "QuotaReady", "NetworkReady"] {
        assert!(
            chassis_runtime::conditions::find(&status.conditions, part).is_some(),
            "{part} missing"
        );
    }
}

#[test]
fn a_child_wakes_its_project_under_the_projects_own_key() {
    let mut p = project("payments");
    p.spec.admins = vec![Subject {
        kind: SubjectKind::User,
        name: "alice".into(),
        namespace: None,
    }];
    let binding = build::role_bindings(&p, &template())
        .into_iter()
        .find_map(|(_, binding)| binding)
        .expect("an admins binding");
    assert_eq!(binding.metadata.namespace.as_deref(), Some("payments"));
    let mut cut = binding.clone();
    cut.metadata.owner_references = None;
    let woken = super::project_of_child(binding).expect("the project owns its child");
    assert_eq!(
        super::project_of_child(cut),
        Some(woken.clone()),
        "a child whose owner reference was cut still wakes its project"
    );
    // The key the project's own events use: without the child's namespace, so
    // kube-runtime never runs two reconciles of one project at once.
    assert_eq!(
        woken,
        kube::runtime::reflector::ObjectRef::<Project>::from_obj(&p)
    );
    assert_eq!(woken.namespace, None);
}

/// Children we created whose watch events have not arrived (an overloaded API server
/// delays watches by seconds): our writes stand in, so the project costs no request at
/// all however long the lag lasts; once each watch has passed them without showing
/// them (they were deleted meanwhile), they are created again.
#[tokio::test]
async fn children_the_watch_has_not_delivered_cost_no_requests_until_it_passes_them() -> Result<(), String> {
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::{LimitRange, ResourceQuota};
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use kube::client::Body;
    use kube::runtime::{reflector, watcher};

    use chassis_runtime::overlay::Progress;

    use super::children::{Cached, Child, ChildStores, reconcile};

    let mut p = project("payments");
    p.spec.admins = vec![member(SubjectKind::User, "alice", None)];
    p.spec.viewers = vec![member(SubjectKind::Group, "auditors", None)];
    let t = template_with_quota();
    let (rb, quota, limits) = (Progress::default(), Progress::default(), Progress::default());
    let stores = ChildStores {
        role_bindings: Cached::new(reflector::store().0, rb.clone()),
        quotas: Cached::new(reflector::store().0, quota.clone()),
        limits: Cached::new(reflector::store().0, limits.clone()),
    };
    // Written by us at version 5; the empty caches have not seen them.
    fn wrote<K: Child>(cache: &Cached<K>, mut object: K) -> usize {
        object.meta_mut().resource_version = Some("5".into());
        let name = object.meta().name.clone().unwrap_or_default();
        cache.written.record(&format!("payments/{name}"), object);
        1
    }
    let mut children = 0;
    for binding in build::role_bindings(&p, &t).into_iter().filter_map(|(_, b)| b) {
        children += wrote(&stores.role_bindings, binding);
    }
    let q = build::resource_quota(&p, &t).ok_or("the template has a quota")?;
    children += wrote(&stores.quotas, q);
    let l = build::limit_range(&p, &t).ok_or("the template has limits")?;
    children += wrote(&stores.limits, l);

    // Creates are answered with the object; anything else would be a mistake.
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            seen.push(format!("{} {}", request.method(), request.uri().path()));
            let post = request.method() == http::Method::POST;
            let body = request.into_body().collect_bytes().await.unwrap_or_default();
            let (status, body) = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(mut object) if post => {
                    object["metadata"]["resourceVersion"] = "9".into();
                    (201, object)
                }
                _ => (
                    500,
                    serde_json::json!({"kind": "Status", "code": 500, "message": "unexpected"}),
                ),
            };
            let body = serde_json::to_vec(&body).unwrap_or_default();
            if let Ok(response) = Response::builder().status(status).body(Body::from(body)) {
                send.send_response(response);
            }
        }
        seen
    });
    let client = kube::Client::new(service, "default");
    let lagging = match reconcile(&client, &stores, &p, &t, "chassis").await {
        (parts, None) => parts,
        (_, Some(e)) => return Err(e.to_string()),
    };
    // Each watch delivers an event past version 5 (another object's, or a deletion):
    // the caches are exact now, and they do not hold the children.
    fn passed<K: Child + Default>(progress: &Progress) {
        let mut later = K::default();
        later.meta_mut().resource_version = Some("8".into());
        progress.observer::<K, ()>()(&Ok(watcher::Event::Delete(later)));
    }
    passed::<RoleBinding>(&rb);
    passed::<ResourceQuota>(&quota);
    passed::<LimitRange>(&limits);
    let caught_up = match reconcile(&client, &stores, &p, &t, "chassis").await {
        (parts, None) => parts,
        (_, Some(e)) => return Err(e.to_string()),
    };
    drop(client);
    let seen = server.await.map_err(|e| e.to_string())?;
    assert_eq!(
        lagging.writes, 0,
        "nothing is written while the watch lags: {seen:?}"
    );
    assert_eq!(caught_up.writes, children, "{seen:?}");
    assert_eq!(
        seen.len(),
        children,
        "one create per child and no reads: {seen:?}"
    );
    assert!(seen.iter().all(|r| r.starts_with("POST ")), "{seen:?}");
    Ok(())
}

/// A binding whose role the template changed is replaced (roleRef cannot change in
/// place). When the operator may not bind the new role, the old binding must stay:
/// deleting it and then failing the create would leave the members with no access.
#[tokio::test]
async fn a_binding_is_not_deleted_for_a_role_the_operator_may_not_bind() -> Result<(), String> {
    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::{reflector, watcher};

    use chassis_runtime::overlay::Progress;

    use super::children::{Cached, ChildStores, reconcile};

    let mut p = project("payments");
    p.spec.admins = vec![member(SubjectKind::User, "alice", None)];
    let t = template();
    let mut bound = build::role_bindings(&p, &t)
        .into_iter()
        .find_map(|(_, b)| b)
        .ok_or("an admins binding")?;
    // As it was made under the template's previous admin role.
    bound.role_ref.name = "previous-admin".into();
    chassis_runtime::apply::stamp_hash(&mut bound);
    // Since then alice left the project and bob joined.
    p.spec.admins = vec![member(SubjectKind::User, "bob", None)];
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Apply(bound));
    let stores = ChildStores {
        role_bindings: Cached::new(reader, Progress::default()),
        quotas: Cached::new(reflector::store().0, Progress::default()),
        limits: Cached::new(reflector::store().0, Progress::default()),
    };

    for allowed in [false, true] {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let (method, path) = (request.method().clone(), request.uri().path().to_string());
                let request_query = request.uri().query().unwrap_or_default().to_string();
                let body = request.into_body().collect_bytes().await.unwrap_or_default();
                let mut object = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
                // Which subject, under which role.
                seen.push(format!(
                    "{method} {path} {} {}",
                    object["subjects"][0]["name"].as_str().unwrap_or("-"),
                    object["roleRef"]["name"].as_str().unwrap_or("-")
                ));
                let dry_run = request_query.contains("dryRun=All");
                let (status, answer) = if dry_run && allowed {
                    (201, object)
                } else if dry_run {
                    let refused = "user \"op\" is attempting to grant RBAC permissions not currently held";
                    (
                        403,
                        serde_json::json!({"kind": "Status", "code": 403, "reason": "Forbidden", "message": refused}),
                    )
                } else if method == http::Method::DELETE {
                    (200, serde_json::json!({"kind": "Status", "status": "Success"}))
                } else {
                    // The apply of the new binding: answered with what was sent.
                    object["metadata"]["resourceVersion"] = "9".into();
                    (200, object)
                };
                let answer = serde_json::to_vec(&answer).unwrap_or_default();
                if let Ok(response) = Response::builder().status(status).body(Body::from(answer)) {
                    send.send_response(response);
                }
            }
            seen
        });
        let client = kube::Client::new(service, "default");
        let (parts, error) = reconcile(&client, &stores, &p, &t, "chassis").await;
        drop(client);
        let seen = server.await.map_err(|e| e.to_string())?;
        let deleted = seen.iter().any(|r| r.starts_with("DELETE "));
        if allowed {
            assert!(error.is_none() && deleted, "{error:?} {seen:?}");
            assert_eq!(parts.rbac_failure, None);
        } else {
            assert!(!deleted, "the binding was deleted: {seen:?}");
            assert!(
                seen.iter()
                    .any(|r| r.starts_with("PATCH ") && r.ends_with(" bob previous-admin")),
                "the members follow the spec under the role they had: {seen:?}"
            );
            assert!(
                matches!(error, Some(super::Error::NotBindable { .. })),
                "{error:?}"
            );
            let why = parts.rbac_failure.unwrap_or_default();
            assert!(
                why.contains("may not bind") && why.contains("admin") && why.contains("not currently held"),
                "{why}"
            );
        }
    }
    Ok(())
}

/// A child the API server cannot take (422) shows in its part; one that failed in
/// passing (503 while the API server restarts) only goes to the retry, and is the
/// error returned, so the reconcile leaves the status alone rather than flipping a
/// healthy project to `Ready=False`. Members are not let in meanwhile: pods they made
/// before the LimitRange exists would never get its defaults.
#[tokio::test]
async fn a_passing_failure_is_retried_not_reported_but_a_refusal_is() -> Result<(), String> {
    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::reflector;

    use chassis_runtime::overlay::Progress;

    use super::children::{Cached, ChildStores, reconcile};

    let mut p = project("payments");
    p.spec.admins = vec![member(SubjectKind::User, "alice", None)];
    let t = template_with_quota();
    let stores = ChildStores {
        role_bindings: Cached::new(reflector::store().0, Progress::default()),
        quotas: Cached::new(reflector::store().0, Progress::default()),
        limits: Cached::new(reflector::store().0, Progress::default()),
    };
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_string();
            seen.push(format!("{} {path}", request.method()));
            let body = request.into_body().collect_bytes().await.unwrap_or_default();
            let object = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
            let failure = |code: u16, message: &str| serde_json::json!({"kind": "Status", "status": "Failure", "code": code, "message": message});
            let (code, answer) = if path.ends_with("/resourcequotas") {
                (
                    503,
                    failure(503, "the server is currently unable to handle the request"),
                )
            } else if path.ends_with("/limitranges") {
                (
                    422,
                    failure(
                        422,
                        "LimitRange \"chassis-limits\" is invalid: default must not exceed max",
                    ),
                )
            } else {
                (201, object)
            };
            let answer = serde_json::to_vec(&answer).unwrap_or_default();
            if let Ok(response) = Response::builder().status(code).body(Body::from(answer)) {
                send.send_response(response);
            }
        }
        seen
    });
    let client = kube::Client::new(service, "default");
    let (parts, error) = reconcile(&client, &stores, &p, &t, "chassis").await;
    drop(client);
    let seen = server.await.map_err(|e| e.to_string())?;
    let error = error.ok_or("the failures go to the retry")?;
    assert!(!error.is_refusal(), "the 503 is the error returned: {error}");
    let why = parts.quota_failure.unwrap_or_default();
    assert!(
        why.contains("must not exceed max"),
        "the 422 is the part's failure: {why}"
    );
    assert!(
        !seen.iter().any(|r| r.contains("/rolebindings")),
        "no member is let in before the limits are: {seen:?}"
    );
    let rbac = parts.rbac_failure.unwrap_or_default();
    assert!(rbac.contains("once the ResourceQuota and LimitRange"), "{rbac}");
    Ok(())
}

#[test]
fn a_template_wakes_its_projects_on_a_new_generation_or_a_new_uid_only() {
    use kube::runtime::watcher::Event;

    let at = |uid: &str, generation: i64| {
        let mut t = template();
        t.metadata.uid = Some(uid.into());
        t.metadata.generation = Some(generation);
        Ok(Event::Apply(t))
    };
    let mut changes = super::TemplateChanges::default();
    assert_eq!(changes.changed(at("u1", 1)), ["default"]);
    assert!(
        changes.changed(at("u1", 1)).is_empty(),
        "a status write: same generation"
    );
    assert_eq!(changes.changed(at("u1", 2)), ["default"]);
    // Deleted and made again while the watch was down: the delete was never seen, and
    // the new template is at generation 2 again (or 1); its uid tells.
    assert_eq!(changes.changed(at("u2", 2)), ["default"]);
}

#[test]
fn a_service_account_name_the_api_server_refuses_is_left_out_and_the_rest_still_bound() {
    // A typo in one ServiceAccount name made the API server refuse the whole binding,
    // and the binding kept its old members, dave among them, though he was removed.
    let mut p = project("payments");
    p.spec.editors = vec![
        member(SubjectKind::User, "carol", None),
        member(SubjectKind::ServiceAccount, "Deploy_Bot", Some("ci")),
        member(SubjectKind::ServiceAccount, "deploy-bot", Some("ci")),
    ];
    let bindings = build::role_bindings(&p, &template());
    let editors = bindings
        .iter()
        .find(|(name, _)| *name == build::EDITORS_BINDING)
        .and_then(|(_, b)| b.as_ref())
        .expect("an editors binding");
    let names: Vec<&str> = editors
        .subjects
        .iter()
        .flatten()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["carol", "deploy-bot"]);
    let why = build::members_left_out(&p).unwrap_or_default();
    assert!(
        why.contains("spec.editors") && why.contains("Deploy_Bot"),
        "{why}"
    );
    let long = "a".repeat(70);
    for (name, namespace) in [("a.b-c", "ci"), ("x", "team-1"), (long.as_str(), "ci")] {
        let ok = member(SubjectKind::ServiceAccount, name, Some(namespace));
        assert_eq!(build::unbindable(&ok), None, "{name} in {namespace}");
    }
    for (name, namespace) in [("bot", "Team"), ("-bot", "ci"), ("bot.", "ci"), ("bot", "a.b")] {
        let bad = member(SubjectKind::ServiceAccount, name, Some(namespace));
        assert!(build::unbindable(&bad).is_some(), "{name} in {namespace}");
    }
    // Users and groups are whatever the authenticator says: not judged.
    assert_eq!(
        build::unbindable(&member(SubjectKind::User, "Jane Doe", None)),
        None
    );
}

#[test]
fn a_template_deleted_while_the_watch_was_down_wakes_its_projects_when_the_list_ends() {
    use kube::runtime::watcher::Event;

    let named = |name: &str| {
        let mut t = template();
        t.metadata.name = Some(name.into());
        t.metadata.uid = Some(format!("uid-{name}"));
        t.metadata.generation = Some(1);
        t
    };
    let mut changes = super::TemplateChanges::default();
    assert_eq!(changes.changed(Ok(Event::Apply(named("default")))), ["default"]);
    assert_eq!(changes.changed(Ok(Event::Apply(named("small")))), ["small"]);
    // The watch was closed; `small` was deleted meanwhile. The list brings `default`
    // unchanged and not `small`: no delete event ever comes for it.
    assert!(changes.changed(Ok(Event::Init)).is_empty());
    assert!(changes.changed(Ok(Event::InitApply(named("default")))).is_empty());
    assert_eq!(changes.changed(Ok(Event::InitDone)), ["small"]);
    // Made again later: its projects wake again.
    assert_eq!(changes.changed(Ok(Event::Apply(named("small")))), ["small"]);
}

#[test]
fn an_invalid_or_terminating_project_keeps_no_part_conditions_from_before() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    let mut p = project("payments");
    p.metadata.generation = Some(2);
    let was_true = |type_: &str| Condition {
        type_: type_.into(),
        status: "True".into(),
        reason: "Applied".into(),
        message: String::new(),
        observed_generation: Some(1),
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ),
    };
    p.status = Some(chassis_api::tenancy::v1alpha1::ProjectStatus {
        conditions: vec![
            was_true("RBACReady"),
            was_true("QuotaReady"),
            was_true("NetworkReady"),
        ],
        ..Default::default()
    });
    let missing = super::Invalid {
        reason: "TemplateNotFound",
        message: "no template".into(),
        retry_after: None,
    };
    let status = super::status::invalid(&p, &missing);
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["NamespaceReady", "Ready"], "{types:?}");
    // Nor one whose namespace is terminating (its parts are not reconciled any more).
    let mut ns = Namespace::default();
    ns.metadata.name = Some("payments".into());
    ns.status = Some(k8s_openapi::api::core::v1::NamespaceStatus {
        phase: Some("Terminating".into()),
        ..Default::default()
    });
    let status = super::status::reconciled(&p, &ns, None, None);
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["NamespaceReady", "Ready"], "{types:?}");
}

#[test]
fn a_profile_being_edited_still_counts_where_its_policies_were_in_place() {
    use chassis_api::network::v1alpha1::{NetworkProfile, NetworkProfileSpec, NetworkProfileStatus};
    use kube::runtime::{reflector, watcher};

    let mut profile = NetworkProfile::new("baseline", NetworkProfileSpec::default());
    // Edited (generation 2); the network controller has not caught up yet.
    profile.metadata.generation = Some(2);
    profile.status = Some(NetworkProfileStatus {
        observed_generation: Some(1),
        matched_namespaces: vec!["billing".into(), "payments".into()],
        ..Default::default()
    });
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Apply(profile));
    let bound = ["baseline".to_string(), "strict".to_string()];
    assert_eq!(
        super::profile_states(&reader, &bound, "payments"),
        [("baseline".to_string(), Some(true)), ("strict".to_string(), None)],
        "the previous generation's policies isolate the namespace until replaced"
    );
    assert_eq!(
        super::profile_states(&reader, &bound[..1], "orders"),
        [("baseline".to_string(), Some(false))],
        "a namespace the profile never listed is still pending"
    );
}

#[test]
fn a_binding_to_a_role_the_template_says_is_missing_keeps_the_project_from_ready() {
    use crate::template::{self, Verdict};
    use kube::runtime::watcher::Event;

    let mut t = template();
    t.metadata.uid = Some("u1".into());
    t.metadata.generation = Some(1);
    t.spec.roles.admin = "team-admin".into();
    let missing = template::validate(&t, |role| role != "team-admin").expect_err("team-admin is missing");
    let judged = |verdict: &Verdict| {
        let mut judged = t.clone();
        judged.status = Some(template::status(&t, verdict));
        judged
    };
    let broken = judged(&Verdict::RoleNotFound(missing));
    let p = project("payments");
    let ns = build::namespace(&p, &broken);
    let parts = |roles_missing: Option<&str>, bindings: &[(&str, &str)]| Parts {
        bindings: bindings
            .iter()
            .map(|(b, r)| (b.to_string(), r.to_string(), 1))
            .collect(),
        roles_missing: roles_missing.map(str::to_string),
        ..Default::default()
    };
    let said = template::roles_missing(&broken);
    let status = status::reconciled(
        &p,
        &ns,
        Some(&parts(
            said,
            &[
                ("chassis-project-admins", "team-admin"),
                ("chassis-project-viewers", "view"),
            ],
        )),
        None,
    );
    let rbac = chassis_runtime::conditions::find(&status.conditions, "RBACReady").expect("RBACReady");
    assert_eq!(
        (rbac.status.as_str(), rbac.reason.as_str()),
        ("False", reason::ROLE_NOT_FOUND)
    );
    assert!(
        rbac.message.contains("chassis-project-admins") && !rbac.message.contains("viewers"),
        "{}",
        rbac.message
    );
    let ready = chassis_runtime::conditions::find(&status.conditions, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    // A project whose members use none of the missing roles is not affected.
    let viewers_only = status::reconciled(
        &p,
        &ns,
        Some(&parts(said, &[("chassis-project-viewers", "view")])),
        None,
    );
    let rbac = chassis_runtime::conditions::find(&viewers_only.conditions, "RBACReady").expect("RBACReady");
    assert_eq!(rbac.status, "True");
    // A status about an older generation is not taken for the current spec.
    let mut edited = broken.clone();
    edited.metadata.generation = Some(2);
    assert_eq!(template::roles_missing(&edited), None);

    // The template's word changing wakes its projects; its other status writes do not.
    let mut changes = super::TemplateChanges::default();
    assert!(!changes.changed(Ok(Event::Apply(t.clone()))).is_empty());
    assert!(
        changes
            .changed(Ok(Event::Apply(judged(&Verdict::Accepted))))
            .is_empty()
    );
    assert!(!changes.changed(Ok(Event::Apply(broken.clone()))).is_empty());
    assert!(changes.changed(Ok(Event::Apply(broken))).is_empty());
    assert!(
        !changes
            .changed(Ok(Event::Apply(judged(&Verdict::Accepted))))
            .is_empty(),
        "the role was created"
    );
}

/// A project deleted while it was reconciled: its status write answers 404, which is
/// the end of the story, not a failure to log and retry.
#[tokio::test]
async fn a_status_write_for_a_project_deleted_meanwhile_is_not_an_error() -> Result<(), String> {
    use http::{Request, Response};
    use kube::client::Body;

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let code = if request.uri().path().ends_with("/projects/gone/status") {
                404
            } else {
                500
            };
            let answer = serde_json::json!({"kind": "Status", "status": "Failure", "code": code, "reason": "NotFound", "message": "projects.tenancy.chassis.dev \"gone\" not found"});
            let answer = serde_json::to_vec(&answer).unwrap_or_default();
            if let Ok(response) = Response::builder().status(code).body(Body::from(answer)) {
                send.send_response(response);
            }
        }
    });
    let api: kube::Api<Project> = kube::Api::all(kube::Client::new(service, "default"));
    let status = chassis_api::tenancy::v1alpha1::ProjectStatus::default();
    let written = super::status::write(&api, &project("gone"), status)
        .await
        .map_err(|e| e.to_string())?;
    assert!(written.is_none(), "{written:?}");
    Ok(())
}
