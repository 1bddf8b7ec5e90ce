//! Project status: conditions per part and the overall `Ready`, written only on change.

use chassis_api::conditions::READY;
use chassis_api::tenancy::v1alpha1::{Project, ProjectStatus};
use chassis_api::tenancy::{condition, reason};
use chassis_runtime::conditions::{Desired, upsert};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::{Error, Invalid};

fn base(project: &Project) -> ProjectStatus {
    project.status.clone().unwrap_or_default()
}

/// Status for a project that failed validation: `Ready=False` with the reason.
pub fn invalid(project: &Project, invalid: &Invalid) -> ProjectStatus {
    let generation = project.metadata.generation;
    let now = Timestamp::now();
    let mut status = base(project);
    status.observed_generation = generation;
    let ns_part = Desired::new(
        condition::NAMESPACE_READY,
        false,
        invalid.reason,
        invalid.message.clone(),
    );
    upsert(&mut status.conditions, ns_part, generation, now);
    let ready = Desired::new(READY, false, invalid.reason, invalid.message.clone());
    upsert(&mut status.conditions, ready, generation, now);
    status
}

/// Status after the namespace was applied (or found up to date).
pub fn reconciled(project: &Project, namespace: &Namespace) -> ProjectStatus {
    let generation = project.metadata.generation;
    let now = Timestamp::now();
    let name = namespace.name_any();
    let phase = namespace.status.as_ref().and_then(|s| s.phase.clone());
    let active = phase.as_deref().is_none_or(|p| p == "Active");

    let mut status = base(project);
    status.observed_generation = generation;
    status.namespace = Some(name.clone());
    let ns_part = if active {
        Desired::new(
            condition::NAMESPACE_READY,
            true,
            reason::READY,
            format!("namespace {name} is active"),
        )
    } else {
        Desired::new(
            condition::NAMESPACE_READY,
            false,
            reason::NAMESPACE_TERMINATING,
            format!("namespace {name} is terminating"),
        )
    };
    let ready = if active {
        Desired::new(READY, true, reason::READY, "the project is ready to use")
    } else {
        Desired::new(READY, false, ns_part.reason, ns_part.message.clone())
    };
    upsert(&mut status.conditions, ns_part, generation, now);
    upsert(&mut status.conditions, ready, generation, now);
    status
}

/// Writes `status` unless it equals what the project already shows, so a status
/// write never triggers another write.
pub async fn write(api: &Api<Project>, project: &Project, status: ProjectStatus) -> Result<(), Error> {
    if project.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let name = project.name_any();
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::WriteStatus { name, source })
}
