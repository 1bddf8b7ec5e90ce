//! Server-side apply of child objects, owned by their parent, with no-op writes
//! skipped and children that are no longer desired pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// Annotation holding the hash of the spec Chassis last applied to a child. When it
/// matches the desired hash and nobody edited the fields we own, the apply is skipped:
/// an idle operator makes no writes.
pub const APPLIED_HASH_ANNOTATION: &str = "chassis.dev/applied-hash";

/// `app.kubernetes.io/managed-by` is set to this on every child, for pruning.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// The owner reference that makes `owner` the controller of a child, so the garbage
/// collector deletes the child with its owner.
pub fn controller_owner_ref<K>(owner: &K) -> Option<OwnerReference>
where
    K: Resource<DynamicType = ()>,
{
    owner.controller_owner_ref(&())
}

/// Hex SHA-256 of the JSON form of `value` (object keys are ordered by serde_json's map).
pub fn content_hash<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let digest = Sha256::digest(&json);
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Stamps the applied-hash annotation onto `desired` (computed without it) and returns it.
pub fn stamp_hash<K: Resource + Serialize>(desired: &mut K) -> String {
    desired
        .meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .remove(APPLIED_HASH_ANNOTATION);
    let hash = content_hash(desired);
    desired
        .meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(APPLIED_HASH_ANNOTATION.into(), hash.clone());
    hash
}

/// Whether `observed` already carries everything `desired` sets in its metadata
/// (labels, annotations including the hash, owner references). Spec drift is caught
/// by the hash only when the child kind has no spec; callers with specs compare those.
pub fn metadata_matches<K: Resource>(desired: &K, observed: &K) -> bool {
    let (d, o) = (desired.meta(), observed.meta());
    let subset = |want: &Option<BTreeMap<String, String>>, have: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners_present = d.owner_references.iter().flatten().all(|want| {
        o.owner_references
            .iter()
            .flatten()
            .any(|have| have.uid == want.uid && have.controller == want.controller)
    });
    subset(&d.labels, &o.labels) && subset(&d.annotations, &o.annotations) && owners_present
}

/// Server-side applies `desired` with `field_manager`, forcing ownership of the fields
/// it sets (the controller is the source of truth for them).
pub async fn apply<K>(api: &Api<K>, desired: &K, field_manager: &str) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(field_manager).force();
    api.patch(&name, &params, &Patch::Apply(desired)).await
}

/// Deletes the children in `observed` that are labelled as managed by Chassis, are
/// controlled by `owner_uid`, and whose names are not in `keep`. Returns what it deleted.
pub async fn prune<K>(
    api: &Api<K>,
    observed: impl IntoIterator<Item = K>,
    owner_uid: &str,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut deleted = Vec::new();
    for child in observed {
        let owned = child
            .owner_references()
            .iter()
            .any(|r| r.uid == owner_uid && r.controller == Some(true));
        let managed = child.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some("chassis");
        let name = child.name_any();
        if owned && managed && !keep.contains(&name) {
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => deleted.push(name),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    fn cm(labels: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("a".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn hash_ignores_its_own_annotation_and_changes_with_content() {
        let mut a = cm(&[("x", "1")]);
        let h1 = stamp_hash(&mut a);
        let h1_again = stamp_hash(&mut a);
        assert_eq!(
            h1, h1_again,
            "re-stamping must not feed the old hash into the new one"
        );
        let mut b = cm(&[("x", "2")]);
        assert_ne!(h1, stamp_hash(&mut b));
    }

    #[test]
    fn metadata_matches_is_a_subset_check() {
        let mut desired = cm(&[("x", "1")]);
        stamp_hash(&mut desired);
        let mut observed = desired.clone();
        observed
            .labels_mut()
            .insert("added-by-someone".into(), "y".into());
        assert!(
            metadata_matches(&desired, &observed),
            "extra labels are not drift"
        );
        observed.labels_mut().insert("x".into(), "changed".into());
        assert!(
            !metadata_matches(&desired, &observed),
            "an edited managed label is drift"
        );
        let mut stale = desired.clone();
        stale
            .annotations_mut()
            .insert(APPLIED_HASH_ANNOTATION.into(), "old".into());
        assert!(
            !metadata_matches(&desired, &stale),
            "a different applied hash means reapply"
        );
    }
}
