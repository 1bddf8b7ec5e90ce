//! Pure builders: from a Project and its template to the child objects it should have.

use std::collections::BTreeMap;

use chassis_api::MANAGED_BY;
use chassis_api::tenancy::v1alpha1::{Project, ProjectTemplate};
use chassis_api::tenancy::{
    DESCRIPTION_ANNOTATION, DISPLAY_NAME_ANNOTATION, PROJECT_LABEL, REQUESTER_ANNOTATION,
};
use chassis_runtime::apply::{MANAGED_BY_LABEL, controller_owner_ref, stamp_hash};
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::ObjectMeta;

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

/// The first write for a new project namespace: only its name and owner, so that
/// creating it fails if the namespace already exists (see `apply::claim`).
pub fn namespace_skeleton(project: &Project) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(project.name_any()),
            owner_references: controller_owner_ref(project).map(|r| vec![r]),
            ..Default::default()
        },
        ..Default::default()
    }
}
