//! Writing a rendered NetworkPolicy without ever taking over someone else's: a
//! policy the cache does not show is created (a create fails on an existing object,
//! where a forced apply would silently adopt it), and an existing one is only
//! applied over when its controller owner reference is ours.

use chassis_runtime::apply::{
    Claim, apply_over, claim, controlled_by, create_manager, edited_by_others, lost_fields, metadata_matches,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::Api;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Created,
    Applied,
    Unchanged,
    /// A policy of that name exists and belongs to someone else; left alone.
    Conflict(String),
}

/// Whether `have` already is `desired`: our hash and labels are on it, no other
/// field manager owns a field we set, and none we set was removed (a removed field
/// belongs to no manager, so only comparing the content shows it).
pub fn current(desired: &NetworkPolicy, have: &NetworkPolicy, field_manager: &str) -> bool {
    let creator = create_manager(field_manager);
    metadata_matches(desired, have)
        && !edited_by_others(desired, have, &[field_manager, creator.as_str()])
        && !lost_fields(desired, have)
}

/// Whether `have` is a policy of ours whose owner reference someone removed (a JSON
/// patch, a `kubectl replace` of a manifest without it): no controller owns it, it has
/// the labels we render, and it holds fields we wrote. Taken as a foreign conflict, it
/// was never repaired and, with no owner for the garbage collector, outlived the
/// profile or EgressPolicy. Taking it back writes only what we render.
fn ours_with_owner_cut(desired: &NetworkPolicy, have: &NetworkPolicy, field_manager: &str) -> bool {
    let creator = create_manager(field_manager);
    let uncontrolled = !have.owner_references().iter().any(|r| r.controller == Some(true));
    let labelled = desired
        .labels()
        .iter()
        .all(|(k, v)| have.labels().get(k) == Some(v));
    let written = have
        .managed_fields()
        .iter()
        .any(|e| matches!(e.manager.as_deref(), Some(m) if m == field_manager || m == creator));
    uncontrolled && labelled && written
}

fn conflict(have: &NetworkPolicy) -> Written {
    Written::Conflict(format!(
        "NetworkPolicy {}/{} exists and is not managed by this object; rename or remove it",
        have.namespace().unwrap_or_default(),
        have.name_any()
    ))
}

/// Creates, applies or leaves `desired`, given what the cache shows (`observed`).
pub async fn write_owned(
    api: &Api<NetworkPolicy>,
    desired: &NetworkPolicy,
    observed: Option<&NetworkPolicy>,
    owner_uid: &str,
    field_manager: &str,
) -> Result<Written, kube::Error> {
    let have = match observed {
        Some(have) => have.clone(),
        None => match claim(api, desired, owner_uid, field_manager).await? {
            Claim::Created(_) => return Ok(Written::Created),
            Claim::Foreign(have) => return Ok(conflict(&have)),
            Claim::Owned(have) => have,
        },
    };
    if !controlled_by(&have, owner_uid) && !ours_with_owner_cut(desired, &have, field_manager) {
        return Ok(conflict(&have));
    }
    if current(desired, &have, field_manager) {
        return Ok(Written::Unchanged);
    }
    apply_over(api, desired, Some(&have), field_manager).await?;
    Ok(Written::Applied)
}

#[cfg(test)]
mod tests {
    use chassis_api::network::v1alpha1::{NetworkProfile, NetworkProfileSpec};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};

    use super::{current, ours_with_owner_cut};
    use crate::profile::render::policies;

    #[test]
    fn a_policy_of_ours_whose_owner_was_cut_is_taken_back_and_a_foreign_one_is_not() {
        let profile = NetworkProfile::new("restricted", NetworkProfileSpec::default());
        let desired = policies(&profile, "team-a").remove(0);
        let mut cut = desired.clone();
        cut.metadata.owner_references = None;
        cut.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("chassis-networkprofile".into()),
            operation: Some("Apply".into()),
            ..Default::default()
        }]);
        assert!(ours_with_owner_cut(&desired, &cut, "chassis-networkprofile"));
        // Someone else's of the same name and labels (never written by us), or one that
        // another controller owns: left alone.
        let mut foreign = cut.clone();
        foreign.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl-client-side-apply".into()),
            operation: Some("Update".into()),
            ..Default::default()
        }]);
        assert!(!ours_with_owner_cut(&desired, &foreign, "chassis-networkprofile"));
        let mut owned = cut.clone();
        owned.metadata.owner_references = Some(vec![OwnerReference {
            controller: Some(true),
            uid: "someone-else".into(),
            ..Default::default()
        }]);
        assert!(!ours_with_owner_cut(&desired, &owned, "chassis-networkprofile"));
        let mut unlabelled = cut;
        unlabelled.metadata.labels = None;
        assert!(!ours_with_owner_cut(
            &desired,
            &unlabelled,
            "chassis-networkprofile"
        ));
    }

    #[test]
    fn a_field_removed_from_a_managed_policy_is_drift() {
        let profile = NetworkProfile::new("restricted", NetworkProfileSpec::default());
        let desired = policies(&profile, "team-a").remove(0);
        assert!(current(&desired, &desired.clone(), "chassis-networkprofile"));
        // `kubectl patch --type=json -p '[{"op":"remove","path":"/spec/ingress"}]'`:
        // the hash and labels stay, no manager owns the missing field.
        let mut edited = desired.clone();
        if let Some(spec) = edited.spec.as_mut() {
            spec.ingress = None;
        }
        assert!(
            !current(&desired, &edited, "chassis-networkprofile"),
            "a removed ingress list (deny-all) must be put back"
        );
    }
}
