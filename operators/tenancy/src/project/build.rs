//! Pure builders: from a Project and its template to the child objects it should have.

use std::collections::BTreeMap;

use chassis_api::MANAGED_BY;
use chassis_api::network::PROFILES_ANNOTATION;
use chassis_api::tenancy::v1alpha1::{Project, ProjectTemplate};
use chassis_api::tenancy::v1alpha1::{Subject, SubjectKind};
use chassis_api::tenancy::{
    DESCRIPTION_ANNOTATION, DISPLAY_NAME_ANNOTATION, PROJECT_LABEL, REQUESTER_ANNOTATION,
};
use chassis_runtime::apply::{MANAGED_BY_LABEL, controller_owner_ref, stamp_hash};
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject as RbacSubject};
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

/// Label naming the template a project namespace was made from, for selectors.
pub const TEMPLATE_LABEL: &str = "tenancy.chassis.dev/template";

/// The project's namespace: the template's labels and annotations, the Pod Security
/// labels, the project's display name and description, owned by the project.
pub fn namespace(project: &Project, template: &ProjectTemplate) -> Namespace {
    let name = project.name_any();
    let level = template.spec.pod_security.as_str();

    let mut labels: BTreeMap<String, String> = template.spec.labels.clone();
    for mode in ["enforce", "audit", "warn"] {
        labels.insert(format!("pod-security.kubernetes.io/{mode}"), level.to_string());
    }
    labels.insert(PROJECT_LABEL.into(), name.clone());
    labels.insert(TEMPLATE_LABEL.into(), template.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());

    let mut annotations: BTreeMap<String, String> = template.spec.annotations.clone();
    if let Some(display) = &project.spec.display_name {
        annotations.insert(DISPLAY_NAME_ANNOTATION.into(), display.clone());
    }
    if let Some(description) = &project.spec.description {
        annotations.insert(DESCRIPTION_ANNOTATION.into(), description.clone());
    }
    if let Some(requester) = project.annotations().get(REQUESTER_ANNOTATION) {
        annotations.insert(REQUESTER_ANNOTATION.into(), requester.clone());
    }
    // The NetworkProfile controller applies the bound profiles to this namespace.
    if !template.spec.network_profiles.is_empty() {
        annotations.insert(
            PROFILES_ANNOTATION.into(),
            template.spec.network_profiles.join(","),
        );
    }

    let mut ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: controller_owner_ref(project).map(|r| vec![r]),
            ..Default::default()
        },
        ..Default::default()
    };
    stamp_hash(&mut ns);
    ns
}

/// RoleBinding names in a project namespace, one per kind of member.
pub const ADMINS_BINDING: &str = "chassis-project-admins";
pub const EDITORS_BINDING: &str = "chassis-project-editors";
pub const VIEWERS_BINDING: &str = "chassis-project-viewers";
/// Names of the ResourceQuota and LimitRange made from the template.
pub const QUOTA_NAME: &str = "chassis-project-quota";
pub const LIMITS_NAME: &str = "chassis-project-limits";

/// Metadata every namespaced child of a project carries: its name, the project
/// label, the managed-by label and the owner reference.
fn child_meta(project: &Project, name: &str) -> ObjectMeta {
    let project_name = project.name_any();
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(project_name.clone()),
        labels: Some(
            [
                (PROJECT_LABEL.to_string(), project_name),
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            ]
            .into(),
        ),
        owner_references: controller_owner_ref(project).map(|r| vec![r]),
        ..Default::default()
    }
}

fn stamped<K: Resource + serde::Serialize>(mut child: K) -> K {
    stamp_hash(&mut child);
    child
}

fn rbac_subject(subject: &Subject) -> RbacSubject {
    let (kind, api_group) = match subject.kind {
        SubjectKind::User => ("User", Some("rbac.authorization.k8s.io".to_string())),
        SubjectKind::Group => ("Group", Some("rbac.authorization.k8s.io".to_string())),
        SubjectKind::ServiceAccount => ("ServiceAccount", None),
    };
    RbacSubject {
        kind: kind.to_string(),
        name: subject.name.clone(),
        api_group,
        namespace: subject.namespace.clone(),
    }
}

/// One dot-free part of a DNS name: lowercase letters, digits and '-' between
/// letters or digits.
fn dns_part(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// Why the API server would refuse `subject` in a RoleBinding, if it would. It
/// checks ServiceAccount names (DNS subdomains); a namespace that is no DNS label
/// cannot hold the ServiceAccount. Such a subject is left out of its binding, and
/// the status says so: refused whole, the binding would keep its old members, a
/// member just removed among them. (The schema cannot check it: a CEL rule on every
/// subject of unbounded lists is over the API server's cost budget.)
pub fn unbindable(subject: &Subject) -> Option<String> {
    if subject.kind != SubjectKind::ServiceAccount {
        return None;
    }
    let namespace = subject.namespace.as_deref().unwrap_or_default();
    // A DNS subdomain as Kubernetes checks it: 253 characters in all, no limit per part.
    let name_ok = subject.name.len() <= 253 && subject.name.split('.').all(dns_part);
    let namespace_ok = namespace.len() <= 63 && dns_part(namespace);
    (!name_ok || !namespace_ok).then(|| {
        format!(
            "ServiceAccount {namespace:?}/{:?} is left out: a ServiceAccount name is lowercase letters, digits, '-' and '.', in a namespace of lowercase letters, digits and '-'",
            subject.name
        )
    })
}

/// Why members are left out of the project's bindings, if any are ([`unbindable`]).
pub fn members_left_out(project: &Project) -> Option<String> {
    let spec = &project.spec;
    [
        ("admins", &spec.admins),
        ("editors", &spec.editors),
        ("viewers", &spec.viewers),
    ]
    .into_iter()
    .find_map(|(list, subjects)| {
        subjects
            .iter()
            .find_map(unbindable)
            .map(|why| format!("spec.{list}: {why}"))
    })
}

/// The project's RoleBindings by name: `Some` for each member list that has
/// subjects the API server takes, `None` for an empty one (so a binding left from
/// before is removed).
pub fn role_bindings(
    project: &Project,
    template: &ProjectTemplate,
) -> Vec<(&'static str, Option<RoleBinding>)> {
    let roles = &template.spec.roles;
    [
        (ADMINS_BINDING, &project.spec.admins, &roles.admin),
        (EDITORS_BINDING, &project.spec.editors, &roles.edit),
        (VIEWERS_BINDING, &project.spec.viewers, &roles.view),
    ]
    .into_iter()
    .map(|(name, subjects, role)| {
        let subjects: Vec<&Subject> = subjects.iter().filter(|s| unbindable(s).is_none()).collect();
        let binding = (!subjects.is_empty()).then(|| {
            stamped(RoleBinding {
                metadata: child_meta(project, name),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: role.clone(),
                },
                subjects: Some(subjects.iter().map(|s| rbac_subject(s)).collect()),
            })
        });
        (name, binding)
    })
    .collect()
}

/// The template's ResourceQuota for the project, if the template sets one.
pub fn resource_quota(project: &Project, template: &ProjectTemplate) -> Option<ResourceQuota> {
    template.spec.resource_quota.as_ref().map(|spec| {
        stamped(ResourceQuota {
            metadata: child_meta(project, QUOTA_NAME),
            spec: Some(spec.clone()),
            status: None,
        })
    })
}

/// The template's LimitRange for the project, if the template sets one.
pub fn limit_range(project: &Project, template: &ProjectTemplate) -> Option<LimitRange> {
    template.spec.limit_range.as_ref().map(|spec| {
        stamped(LimitRange {
            metadata: child_meta(project, LIMITS_NAME),
            spec: Some(spec.clone()),
        })
    })
}
