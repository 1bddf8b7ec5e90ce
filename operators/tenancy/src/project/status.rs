//! Project status: conditions per part and the overall `Ready`, written only on change.

use chassis_api::conditions::READY;
use chassis_api::tenancy::v1alpha1::{Project, ProjectStatus};
use chassis_api::tenancy::{condition, reason};
use chassis_runtime::conditions::{Desired, upsert};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::children::Parts;
use super::{Error, Invalid, build};

fn base(project: &Project) -> ProjectStatus {
    project.status.clone().unwrap_or_default()
}

/// Removes the per-part conditions: the parts were not reconciled this time, and a
/// `True` left from before would stand beside a failing namespace.
fn drop_part_conditions(status: &mut ProjectStatus) {
    status.conditions.retain(|c| {
        ![
            condition::RBAC_READY,
            condition::QUOTA_READY,
            condition::NETWORK_READY,
        ]
        .contains(&c.type_.as_str())
    });
}

/// Status for a project that failed validation: `Ready=False` with the reason. The
/// parts were not reconciled against this generation, so their conditions go rather
/// than stand there `True` with its observedGeneration.
pub fn invalid(project: &Project, invalid: &Invalid) -> ProjectStatus {
    let generation = project.metadata.generation;
    let now = Timestamp::now();
    let mut status = base(project);
    status.observed_generation = generation;
    drop_part_conditions(&mut status);
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

/// Status after the namespace and its children were reconciled; `refused`, the API
/// server's word when it refused the update of the (existing) namespace.
pub fn reconciled(
    project: &Project,
    namespace: &Namespace,
    parts: Option<&Parts>,
    refused: Option<String>,
) -> ProjectStatus {
    let generation = project.metadata.generation;
    let now = Timestamp::now();
    let name = namespace.name_any();
    let phase = namespace.status.as_ref().and_then(|s| s.phase.clone());
    let active =
        phase.as_deref().is_none_or(|p| p == "Active") && namespace.metadata.deletion_timestamp.is_none();

    let mut status = base(project);
    status.observed_generation = generation;
    status.namespace = Some(name.clone());
    let mut wanted = vec![if let Some(message) = refused {
        Desired::new(condition::NAMESPACE_READY, false, reason::APPLY_FAILED, message)
    } else if active {
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
    }];
    match parts {
        Some(parts) => wanted.extend(part_conditions(parts)),
        None => drop_part_conditions(&mut status),
    }
    // The quota's failure before RBAC's: new members wait for the quota and LimitRange,
    // so theirs is the cause to name.
    let order = [
        condition::NAMESPACE_READY,
        condition::QUOTA_READY,
        condition::RBAC_READY,
        condition::NETWORK_READY,
    ];
    let failing = order
        .iter()
        .find_map(|t| wanted.iter().find(|c| c.type_ == *t && !c.status));
    let ready = match failing {
        None => Desired::new(READY, true, reason::READY, "the project is ready to use"),
        Some(failing) => Desired::new(READY, false, failing.reason, failing.message.clone()),
    };
    for condition in wanted.into_iter().chain([ready]) {
        upsert(&mut status.conditions, condition, generation, now);
    }
    status
}

/// One condition per part: RBAC, quota and network.
pub fn part_conditions(parts: &Parts) -> Vec<Desired<'static>> {
    // A missing role first: the API server refuses a binding to it unless the operator
    // may `bind` it by name (then it accepts one that grants nothing), and its refusal
    // ("not found") would hide the cause.
    let rbac = if let Some(missing) = missing_roles_bound(parts) {
        Desired::new(condition::RBAC_READY, false, reason::ROLE_NOT_FOUND, missing)
    } else if let Some(why) = &parts.rbac_failure {
        Desired::new(condition::RBAC_READY, false, reason::APPLY_FAILED, why.clone())
    } else if parts.bindings.is_empty() {
        Desired::new(
            condition::RBAC_READY,
            true,
            reason::NO_MEMBERS,
            "no admins, editors or viewers are set",
        )
    } else {
        let bound: Vec<String> = parts
            .bindings
            .iter()
            .map(|(binding, role, n)| format!("{binding} -> ClusterRole {role} ({n} subjects)"))
            .collect();
        Desired::new(condition::RBAC_READY, true, reason::BOUND, bound.join("; "))
    };
    let quota = if let Some(why) = &parts.quota_failure {
        Desired::new(condition::QUOTA_READY, false, reason::APPLY_FAILED, why.clone())
    } else {
        match (parts.quota, parts.limits) {
            (false, false) => Desired::new(
                condition::QUOTA_READY,
                true,
                reason::NO_QUOTA,
                "the template sets no ResourceQuota or LimitRange",
            ),
            (quota, limits) => {
                let mut applied = Vec::new();
                if quota {
                    applied.push(format!("ResourceQuota {}", build::QUOTA_NAME));
                }
                if limits {
                    applied.push(format!("LimitRange {}", build::LIMITS_NAME));
                }
                Desired::new(
                    condition::QUOTA_READY,
                    true,
                    reason::APPLIED,
                    format!("{} in place", applied.join(" and ")),
                )
            }
        }
    };
    let network = network_condition(&parts.network_profiles);
    vec![rbac, quota, network]
}

/// The bindings whose ClusterRole the template says does not exist, as a sentence.
fn missing_roles_bound(parts: &Parts) -> Option<String> {
    let said = parts.roles_missing.as_deref()?;
    let affected: Vec<String> = parts
        .bindings
        .iter()
        .filter(|(_, role, _)| said.contains(&crate::template::missing_role(role)))
        .map(|(binding, role, _)| format!("{binding} binds ClusterRole {role:?}, which does not exist"))
        .collect();
    (!affected.is_empty()).then(|| {
        format!(
            "{}: its members have none of its rights until the role is created",
            affected.join("; ")
        )
    })
}

/// Writes `status` unless it equals what the project already shows, so a status
/// write never triggers another write.
pub async fn write(
    api: &Api<Project>,
    project: &Project,
    status: ProjectStatus,
) -> Result<Option<Project>, Error> {
    if project.status.as_ref() == Some(&status) {
        return Ok(None);
    }
    let name = project.name_any();
    let patch = serde_json::json!({ "status": status });
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(written) => Ok(Some(written)),
        // Deleted while it was reconciled: nobody is left to read the status.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(source) => Err(Error::WriteStatus { name, source }),
    }
}

/// `NetworkReady` from the bound profiles: each exists and lists the namespace in
/// `status.matchedNamespaces`.
pub fn network_condition(profiles: &[(String, Option<bool>)]) -> Desired<'static> {
    if profiles.is_empty() {
        return Desired::new(
            condition::NETWORK_READY,
            true,
            reason::NO_NETWORK_PROFILES,
            "no NetworkProfile is bound by the template: traffic to and from this project is not restricted, except by profiles whose namespaceSelector matches it",
        );
    }
    let names = |want: Option<bool>| -> Vec<&str> {
        profiles
            .iter()
            .filter(|(_, s)| *s == want)
            .map(|(n, _)| n.as_str())
            .collect()
    };
    let (missing, pending, applied) = (names(None), names(Some(false)), names(Some(true)));
    if !missing.is_empty() {
        Desired::new(
            condition::NETWORK_READY,
            false,
            reason::NETWORK_PROFILE_NOT_FOUND,
            format!("NetworkProfile {} does not exist", missing.join(", ")),
        )
    } else if !pending.is_empty() {
        Desired::new(
            condition::NETWORK_READY,
            false,
            reason::NETWORK_PROFILES_PENDING,
            format!(
                "the policies of NetworkProfile {} are not in place yet",
                pending.join(", ")
            ),
        )
    } else {
        Desired::new(
            condition::NETWORK_READY,
            true,
            reason::APPLIED,
            format!("NetworkProfile {} in place", applied.join(", ")),
        )
    }
}
