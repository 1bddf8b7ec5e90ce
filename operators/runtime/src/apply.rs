//! Server-side apply of child objects, owned by their parent, with no-op writes
//! skipped, objects created in one request, and children that are no longer desired
//! pruned.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
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

/// Drops what a cached child never needs: the field sets of our own entries and of
/// status writers (a quota's controller-manager entry), the bulk of managedFields.
/// [`edited_by_others`] reads only the other managers' entries outside status;
/// [`apply_over`] reads the live object before it folds a create entry.
pub fn trim_own_fields<K: Resource>(object: &mut K, field_manager: &str) {
    let creator = create_manager(field_manager);
    for entry in object.meta_mut().managed_fields.iter_mut().flatten() {
        let manager = entry.manager.as_deref();
        if manager == Some(field_manager)
            || manager == Some(creator.as_str())
            || entry.subresource.as_deref() == Some("status")
        {
            entry.fields_v1 = None;
        }
    }
}

fn has_create_entry<K: Resource>(object: &K, field_manager: &str) -> bool {
    let creator = create_manager(field_manager);
    object
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .any(|e| e.manager.as_deref() == Some(creator.as_str()) && e.operation.as_deref() == Some("Update"))
}

/// [`trim_own_fields`] as a watch-stream modifier.
pub fn own_fields_trimmer<K: Resource>(field_manager: &str) -> impl FnMut(&mut K) + Send + 'static {
    let field_manager = field_manager.to_string();
    move |object| trim_own_fields(object, &field_manager)
}

/// Whether a field manager other than `ours` owns a field that `desired` sets
/// (outside `metadata` and `status`): someone edited what we manage. Fields others
/// added beside ours (an extra quota limit) are not drift: a forced apply would not
/// remove them anyway, and treating them as drift would re-apply on every event.
/// Reading managedFields avoids comparing values the API server normalizes
/// (`1000m` is stored as `1`).
pub fn edited_by_others<K: Resource + Serialize>(desired: &K, observed: &K, ours: &[&str]) -> bool {
    let Ok(wanted) = serde_json::to_value(desired) else {
        return true;
    };
    observed.meta().managed_fields.iter().flatten().any(|entry| {
        let manager = entry.manager.as_deref().unwrap_or_default();
        let on_subresource = entry.subresource.as_deref().is_some_and(|s| !s.is_empty());
        if ours.contains(&manager) || on_subresource {
            return false;
        }
        entry
            .fields_v1
            .as_ref()
            .and_then(|f| f.0.as_object())
            .is_some_and(|fields| {
                fields
                    .iter()
                    .filter(|(k, _)| k.as_str() != "f:metadata" && k.as_str() != "f:status")
                    .any(|(k, sub)| touches(k, sub, &wanted))
            })
    })
}

/// Whether a field `desired` sets (outside `metadata` and `status`) is gone from
/// `observed`: someone removed it (a JSON patch `remove`, a quota limit deleted in
/// `kubectl edit`). A removed field belongs to no field manager any more, so
/// [`edited_by_others`] cannot see it. Only presence is checked (values are
/// [`edited_by_others`]'s business, as the API server normalizes them), and empty
/// objects and lists are not required: the API server may drop them.
pub fn lost_fields<K: Serialize>(desired: &K, observed: &K) -> bool {
    let (Ok(wanted), Ok(have)) = (serde_json::to_value(desired), serde_json::to_value(observed)) else {
        return true;
    };
    wanted.as_object().is_some_and(|fields| {
        fields
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind"))
            .any(|(k, v)| missing(v, have.get(k)))
    })
}

/// Whether `want` has a non-empty value that `have` lacks.
fn missing(want: &serde_json::Value, have: Option<&serde_json::Value>) -> bool {
    use serde_json::Value;
    match want {
        Value::Object(fields) => fields
            .iter()
            .any(|(k, v)| missing(v, have.and_then(|h| h.get(k)))),
        Value::Array(items) if items.is_empty() => false,
        Value::Null => false,
        _ => have.is_none_or(Value::is_null),
    }
}

/// Whether the managedFields entry `key: sub` (relative to `wanted`) names a field
/// that `wanted` sets.
fn touches(key: &str, sub: &serde_json::Value, wanted: &serde_json::Value) -> bool {
    let Some(name) = key.strip_prefix("f:") else {
        // `k:`/`v:`/`i:` entries address list items: we are inside a list we set.
        return key != ".";
    };
    let Some(value) = wanted.get(name) else {
        return false;
    };
    match (value.as_object(), sub.as_object()) {
        (Some(_), Some(children)) if children.keys().any(|k| k != ".") => {
            children.iter().any(|(k, s)| touches(k, s, value))
        }
        _ => true,
    }
}

/// What [`ensure`] did to one child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Already as desired: no request was made.
    Unchanged,
    Applied,
    Deleted,
    /// Not desired and not there.
    Absent,
}

/// Brings one child to its desired state: create it when it is missing, apply when it
/// differs in the metadata we set or was edited by someone else; delete it when it is no longer
/// desired (only if we control it); otherwise make no request at all. Returns the API
/// server's answer to an apply, for [`crate::overlay::Overlay`].
pub async fn ensure<K>(
    api: &Api<K>,
    name: &str,
    desired: Option<&K>,
    observed: Option<&K>,
    owner_uid: &str,
    field_manager: &str,
) -> Result<(Outcome, Option<K>), kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    match (desired, observed) {
        (None, None) => Ok((Outcome::Absent, None)),
        (None, Some(current)) => {
            let managed = current.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some("chassis");
            if !(managed && controlled_by(current, owner_uid)) {
                return Ok((Outcome::Absent, None));
            }
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => Ok((Outcome::Deleted, None)),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok((Outcome::Absent, None)),
                Err(err) => Err(err),
            }
        }
        (Some(want), Some(current))
            if metadata_matches(want, current)
                && !edited_by_others(want, current, &[field_manager, &create_manager(field_manager)])
                && !lost_fields(want, current) =>
        {
            Ok((Outcome::Unchanged, None))
        }
        // A missing child is created, not applied: a create is the cheapest write for
        // the API server (no merge to compute), exactly what a hand-written client does.
        // If it exists after all (the cache was behind), the apply below takes over.
        (Some(want), None) => {
            let params = PostParams {
                field_manager: Some(create_manager(field_manager)),
                ..Default::default()
            };
            match api.create(&params, want).await {
                Ok(created) => Ok((Outcome::Applied, Some(created))),
                Err(kube::Error::Api(status)) if status.code == 409 => apply(api, want, field_manager)
                    .await
                    .map(|applied| (Outcome::Applied, Some(applied))),
                Err(err) => Err(err),
            }
        }
        (Some(want), current) => {
            let why = match current {
                Some(c) if !metadata_matches(want, c) => "changed",
                Some(c) if lost_fields(want, c) => "a field we set was removed",
                _ => "edited by another field manager",
            };
            tracing::debug!(name, why, "applying");
            apply_over(api, want, current, field_manager)
                .await
                .map(|applied| (Outcome::Applied, Some(applied)))
        }
    }
}

/// What [`claim`] found.
#[derive(Debug)]
pub enum Claim<K> {
    /// We created it just now.
    Created(K),
    /// It existed and is already controlled by the owner (the cache was behind).
    Owned(K),
    /// It existed and belongs to someone else: leave it alone.
    Foreign(K),
}

/// Whether `child` is controlled by the owner with `owner_uid`.
pub fn controlled_by<K: Resource>(child: &K, owner_uid: &str) -> bool {
    child
        .owner_references()
        .iter()
        .any(|r| r.uid == owner_uid && r.controller == Some(true))
}

/// Field manager of the create request [`claim`] makes for `field_manager`.
pub fn create_manager(field_manager: &str) -> String {
    format!("{field_manager}-create")
}

/// Creates `desired` for a child the cache says does not exist yet, in one request.
/// Server-side apply would silently merge into an object someone else created in the
/// meantime; a create fails instead, so a foreign object is never adopted.
///
/// A create records its fields under an `Update` entry of [`create_manager`], which a
/// later apply would not prune; [`apply_over`] turns that entry into ours first.
pub async fn claim<K>(
    api: &Api<K>,
    desired: &K,
    owner_uid: &str,
    field_manager: &str,
) -> Result<Claim<K>, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let params = PostParams {
        field_manager: Some(create_manager(field_manager)),
        ..Default::default()
    };
    match api.create(&params, desired).await {
        Ok(created) => Ok(Claim::Created(created)),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let name = desired.meta().name.clone().unwrap_or_default();
            let live = api.get(&name).await?;
            Ok(if controlled_by(&live, owner_uid) {
                Claim::Owned(live)
            } else {
                Claim::Foreign(live)
            })
        }
        Err(err) => Err(err),
    }
}

/// The managedFields of `observed` with the create entry of [`claim`] folded into
/// `field_manager`'s apply entry, or `None` when there is no create entry. This is
/// what `kubectl` does when it moves client-side-applied objects to server-side apply.
pub fn fold_create_entry<K: Resource>(observed: &K, field_manager: &str) -> Option<Vec<ManagedFieldsEntry>> {
    let creator = create_manager(field_manager);
    let entries = observed.meta().managed_fields.as_ref()?;
    let is_create = |e: &ManagedFieldsEntry| {
        e.manager.as_deref() == Some(creator.as_str()) && e.operation.as_deref() == Some("Update")
    };
    let created = entries.iter().find(|e| is_create(e))?;
    let mut folded: Vec<ManagedFieldsEntry> = entries.iter().filter(|e| !is_create(e)).cloned().collect();
    let ours = folded.iter_mut().find(|e| {
        e.manager.as_deref() == Some(field_manager)
            && e.operation.as_deref() == Some("Apply")
            && e.api_version == created.api_version
    });
    match ours {
        Some(entry) => {
            if let (Some(into), Some(from)) = (entry.fields_v1.as_mut(), created.fields_v1.as_ref()) {
                merge_fields(&mut into.0, &from.0);
            }
        }
        None => folded.push(ManagedFieldsEntry {
            manager: Some(field_manager.to_string()),
            operation: Some("Apply".into()),
            time: None,
            ..created.clone()
        }),
    }
    Some(folded)
}

fn merge_fields(into: &mut serde_json::Value, from: &serde_json::Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (key, value) in from {
            merge_fields(
                into.entry(key.clone()).or_insert_with(|| serde_json::json!({})),
                value,
            );
        }
    }
}

/// Applies `desired` over `observed`; when `observed` still carries the create entry
/// of [`claim`], that entry is first made ours (a read and a write, once per object
/// and only when it changes), so fields we stop setting are removed.
pub async fn apply_over<K>(
    api: &Api<K>,
    desired: &K,
    observed: Option<&K>,
    field_manager: &str,
) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    // The cached copy may be trimmed: fold from the live object's field sets.
    let name = desired.meta().name.clone().unwrap_or_default();
    let live = match observed {
        Some(current) if has_create_entry(current, field_manager) => api.get_opt(&name).await?,
        _ => None,
    };
    // Without a version the patch would be unconditional: no fold then.
    if let Some(current) = live.as_ref()
        && let Some(version) = current.meta().resource_version.as_deref()
        && let Some(folded) = fold_create_entry(current, field_manager)
    {
        let patch = fold_patch(version, &folded).map_err(kube::Error::SerdeError)?;
        api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await?;
    }
    apply(api, desired, field_manager).await
}

/// The patch that puts `folded` in place of the managed fields of the object read at
/// `version`. The version travels in the body, which makes it a precondition: an
/// object changed since (quota admission bumps a ResourceQuota on every pod) is
/// refused with 409 Conflict, retried like any conflict. A JSON patch `test` of the
/// version is refused with 422 instead, which reads as the API server refusing the
/// object itself.
pub fn fold_patch(
    version: &str,
    folded: &[ManagedFieldsEntry],
) -> Result<json_patch::Patch, serde_json::Error> {
    serde_json::from_value(serde_json::json!([
        {"op": "replace", "path": "/metadata/resourceVersion", "value": version},
        {"op": "replace", "path": "/metadata/managedFields", "value": folded},
    ]))
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

#[cfg(test)]
mod drift_tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceQuota;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn quota(hard: serde_json::Value, managers: Vec<(&str, serde_json::Value)>) -> ResourceQuota {
        let mut q: ResourceQuota =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "q"}, "spec": {"hard": hard}}))
                .unwrap_or_default();
        q.metadata.managed_fields = Some(
            managers
                .into_iter()
                .map(|(manager, fields)| ManagedFieldsEntry {
                    manager: Some(manager.into()),
                    operation: Some("Update".into()),
                    fields_v1: Some(FieldsV1(fields)),
                    ..Default::default()
                })
                .collect(),
        );
        q
    }

    #[test]
    fn an_edit_of_a_field_we_set_is_drift_but_an_added_field_is_not() {
        let desired = quota(serde_json::json!({"requests.cpu": "4"}), vec![]);
        let edited = quota(
            serde_json::json!({"requests.cpu": "400"}),
            vec![(
                "kubectl-edit",
                serde_json::json!({"f:spec": {"f:hard": {"f:requests.cpu": {}}}}),
            )],
        );
        assert!(edited_by_others(&desired, &edited, &["chassis-project"]));
        let added = quota(
            serde_json::json!({"requests.cpu": "4", "pods": "9"}),
            vec![(
                "kubectl-edit",
                serde_json::json!({"f:spec": {"f:hard": {"f:pods": {}}}}),
            )],
        );
        assert!(
            !edited_by_others(&desired, &added, &["chassis-project"]),
            "extra fields are not ours"
        );
        let status_only = quota(
            serde_json::json!({"requests.cpu": "4"}),
            vec![(
                "kube-controller-manager",
                serde_json::json!({"f:metadata": {"f:labels": {}}}),
            )],
        );
        assert!(!edited_by_others(&desired, &status_only, &["chassis-project"]));
        let ours = quota(
            serde_json::json!({"requests.cpu": "4"}),
            vec![(
                "chassis-project",
                serde_json::json!({"f:spec": {"f:hard": {"f:requests.cpu": {}}}}),
            )],
        );
        assert!(!edited_by_others(&desired, &ours, &["chassis-project"]));
    }

    #[test]
    fn a_removed_field_we_set_is_drift_but_an_extra_or_empty_one_is_not() {
        let desired = quota(serde_json::json!({"requests.cpu": "4", "pods": "20"}), vec![]);
        // Nobody owns a removed field, so only its absence tells.
        let removed = quota(serde_json::json!({"requests.cpu": "4"}), vec![]);
        assert!(lost_fields(&desired, &removed));
        let no_spec: ResourceQuota =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "q"}})).unwrap_or_default();
        assert!(lost_fields(&desired, &no_spec));
        let extra = quota(
            serde_json::json!({"requests.cpu": "4", "pods": "20", "secrets": "3"}),
            vec![],
        );
        assert!(!lost_fields(&desired, &extra));
        // Values are compared by ownership, not here (`1000m` is stored as `1`).
        let normalized = quota(serde_json::json!({"requests.cpu": "4000m", "pods": "20"}), vec![]);
        assert!(!lost_fields(&desired, &normalized));
        let empty = quota(serde_json::json!({}), vec![]);
        let none: ResourceQuota =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "q"}, "spec": {}}))
                .unwrap_or_default();
        assert!(
            !lost_fields(&empty, &none),
            "an empty map the server dropped is not drift"
        );
    }
}

#[cfg(test)]
mod claim_tests {
    //! Request-level tests: the exact calls `claim` makes against a scripted API server.
    use super::*;
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::Namespace;
    use kube::Client;
    use kube::client::Body;

    fn namespace(owner_uid: Option<&str>) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = Some("payments".into());
        ns.metadata.owner_references = owner_uid.map(|uid| {
            vec![OwnerReference {
                api_version: "tenancy.chassis.dev/v1alpha1".into(),
                kind: "Project".into(),
                name: "payments".into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            }]
        });
        ns
    }

    async fn respond(
        handle: &mut tower_test::mock::Handle<Request<Body>, Response<Body>>,
        method: &str,
        path: &str,
        status: u16,
        body: serde_json::Value,
    ) -> Result<(), String> {
        let (request, send) = handle.next_request().await.ok_or("no request was made")?;
        if request.method().as_str() != method || !request.uri().path().ends_with(path) {
            return Err(format!(
                "unexpected request {} {}",
                request.method(),
                request.uri()
            ));
        }
        let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let response = Response::builder()
            .status(status)
            .body(Body::from(bytes))
            .map_err(|e| e.to_string())?;
        send.send_response(response);
        Ok(())
    }

    fn already_exists() -> serde_json::Value {
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
            "message": "namespaces \"payments\" already exists", "code": 409
        })
    }

    #[tokio::test]
    async fn a_namespace_created_by_someone_else_is_never_adopted() -> Result<(), String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Namespace> = Api::all(Client::new(service, "default"));
        let server = tokio::spawn(async move {
            respond(&mut handle, "POST", "/api/v1/namespaces", 409, already_exists()).await?;
            let foreign = serde_json::to_value(namespace(None)).map_err(|e| e.to_string())?;
            respond(&mut handle, "GET", "/api/v1/namespaces/payments", 200, foreign).await?;
            // No PATCH may follow: the caller must leave the foreign namespace alone.
            Ok::<_, String>(handle)
        });
        let claimed = claim(&api, &namespace(Some("uid-1")), "uid-1", "chassis-project")
            .await
            .map_err(|e| e.to_string())?;
        assert!(matches!(claimed, Claim::Foreign(_)), "{claimed:?}");
        let mut handle = server.await.map_err(|e| e.to_string())??;
        drop(api);
        assert!(
            handle.next_request().await.is_none(),
            "claim made an extra request"
        );
        Ok(())
    }

    #[tokio::test]
    async fn our_own_namespace_seen_late_by_the_cache_is_kept() -> Result<(), String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Namespace> = Api::all(Client::new(service, "default"));
        let server = tokio::spawn(async move {
            respond(&mut handle, "POST", "/api/v1/namespaces", 409, already_exists()).await?;
            let ours = serde_json::to_value(namespace(Some("uid-1"))).map_err(|e| e.to_string())?;
            respond(&mut handle, "GET", "/api/v1/namespaces/payments", 200, ours).await
        });
        let claimed = claim(&api, &namespace(Some("uid-1")), "uid-1", "chassis-project")
            .await
            .map_err(|e| e.to_string())?;
        assert!(matches!(claimed, Claim::Owned(_)), "{claimed:?}");
        server.await.map_err(|e| e.to_string())?
    }

    #[tokio::test]
    async fn a_new_namespace_is_created_with_a_create_field_manager() -> Result<(), String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Namespace> = Api::all(Client::new(service, "default"));
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.ok_or("no request")?;
            let query = request.uri().query().unwrap_or_default().to_string();
            if request.method() != "POST" || !query.contains("fieldManager=chassis-project-create") {
                return Err(format!(
                    "unexpected request {} {}",
                    request.method(),
                    request.uri()
                ));
            }
            let body = serde_json::to_vec(&namespace(Some("uid-1"))).map_err(|e| e.to_string())?;
            let response = Response::builder()
                .status(201)
                .body(Body::from(body))
                .map_err(|e| e.to_string())?;
            send.send_response(response);
            Ok(())
        });
        let claimed = claim(&api, &namespace(Some("uid-1")), "uid-1", "chassis-project")
            .await
            .map_err(|e| e.to_string())?;
        assert!(matches!(claimed, Claim::Created(_)), "{claimed:?}");
        server.await.map_err(|e| e.to_string())?
    }
}

#[cfg(test)]
mod fold_tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
    use serde_json::json;

    fn entry(manager: &str, operation: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            api_version: Some("v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    fn with_entries(entries: Vec<ManagedFieldsEntry>) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.managed_fields = Some(entries);
        ns
    }

    #[test]
    fn the_create_entry_becomes_our_apply_entry_and_others_stay() {
        let ns = with_entries(vec![
            entry(
                "chassis-project-create",
                "Update",
                json!({"f:metadata": {"f:labels": {"f:a": {}, "f:c": {}}}}),
            ),
            entry(
                "kubectl-edit",
                "Update",
                json!({"f:metadata": {"f:labels": {"f:x": {}}}}),
            ),
        ]);
        let folded = fold_create_entry(&ns, "chassis-project").unwrap_or_default();
        assert_eq!(folded.len(), 2, "{folded:?}");
        assert_eq!(folded[0].manager.as_deref(), Some("kubectl-edit"));
        assert_eq!(folded[1].manager.as_deref(), Some("chassis-project"));
        assert_eq!(folded[1].operation.as_deref(), Some("Apply"));
        assert_eq!(
            folded[1].fields_v1.as_ref().map(|f| f.0.clone()),
            Some(json!({"f:metadata": {"f:labels": {"f:a": {}, "f:c": {}}}}))
        );
    }

    #[test]
    fn the_create_entry_merges_into_an_existing_apply_entry() {
        let ns = with_entries(vec![
            entry(
                "chassis-project",
                "Apply",
                json!({"f:metadata": {"f:labels": {"f:a": {}}}}),
            ),
            entry(
                "chassis-project-create",
                "Update",
                json!({"f:metadata": {"f:annotations": {"f:h": {}}}}),
            ),
        ]);
        let folded = fold_create_entry(&ns, "chassis-project").unwrap_or_default();
        assert_eq!(folded.len(), 1, "{folded:?}");
        assert_eq!(
            folded[0].fields_v1.as_ref().map(|f| f.0.clone()),
            Some(json!({"f:metadata": {"f:labels": {"f:a": {}}, "f:annotations": {"f:h": {}}}}))
        );
    }

    #[test]
    fn nothing_to_fold_without_a_create_entry() {
        let ns = with_entries(vec![entry(
            "chassis-project",
            "Apply",
            json!({"f:metadata": {"f:labels": {"f:a": {}}}}),
        )]);
        assert!(fold_create_entry(&ns, "chassis-project").is_none());
        assert!(fold_create_entry(&Namespace::default(), "chassis-project").is_none());
    }
}

#[cfg(test)]
mod ensure_tests {
    use super::*;
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Client;
    use kube::client::Body;

    fn child(name: &str, owner: &str, managed: bool) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("payments".into());
        cm.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "tenancy.chassis.dev/v1alpha1".into(),
            kind: "Project".into(),
            name: "payments".into(),
            uid: owner.into(),
            controller: Some(true),
            ..Default::default()
        }]);
        if managed {
            cm.metadata.labels = Some([(MANAGED_BY_LABEL.to_string(), "chassis".to_string())].into());
        }
        cm
    }

    /// Answers the next request if it has `method`, a path ending in `path` and a query
    /// containing `query`.
    async fn expect(
        handle: &mut tower_test::mock::Handle<Request<Body>, Response<Body>>,
        (method, path, query): (&str, &str, &str),
        status: u16,
        body: serde_json::Value,
    ) -> Result<(), String> {
        let (request, send) = handle.next_request().await.ok_or("no request")?;
        let uri = request.uri().clone();
        if request.method() != method
            || !uri.path().ends_with(path)
            || !uri.query().unwrap_or_default().contains(query)
        {
            return Err(format!("unexpected request {} {uri}", request.method()));
        }
        let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(bytes))
                .map_err(|e| e.to_string())?,
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_missing_child_is_created_in_one_request() -> Result<(), String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<ConfigMap> = Api::namespaced(Client::new(service, "default"), "payments");
        let created = serde_json::to_value(child("new", "uid-1", true)).map_err(|e| e.to_string())?;
        let server = tokio::spawn(async move {
            let post = (
                "POST",
                "/namespaces/payments/configmaps",
                "fieldManager=chassis-project-create",
            );
            expect(&mut handle, post, 201, created).await?;
            Ok::<_, String>(handle)
        });
        let want = child("new", "uid-1", true);
        let (outcome, written) = ensure(&api, "new", Some(&want), None, "uid-1", "chassis-project")
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(outcome, Outcome::Applied);
        assert!(
            written.is_some(),
            "the created object is returned for the overlay"
        );
        let mut handle = server.await.map_err(|e| e.to_string())??;
        drop(api);
        assert!(handle.next_request().await.is_none(), "one request only");
        Ok(())
    }

    #[tokio::test]
    async fn a_child_the_cache_missed_is_applied_after_the_create_conflicts() -> Result<(), String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<ConfigMap> = Api::namespaced(Client::new(service, "default"), "payments");
        let live = serde_json::to_value(child("late", "uid-1", true)).map_err(|e| e.to_string())?;
        let server = tokio::spawn(async move {
            let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "AlreadyExists", "code": 409});
            expect(&mut handle, ("POST", "/configmaps", ""), 409, conflict).await?;
            // Forced server-side apply under the controller's own manager.
            let apply = (
                "PATCH",
                "/configmaps/late",
                "force=true&fieldManager=chassis-project",
            );
            expect(&mut handle, apply, 200, live).await
        });
        let want = child("late", "uid-1", true);
        let result = ensure(&api, "late", Some(&want), None, "uid-1", "chassis-project").await;
        server.await.map_err(|e| e.to_string())??;
        let (outcome, _) = result.map_err(|e| e.to_string())?;
        assert_eq!(outcome, Outcome::Applied);
        Ok(())
    }

    #[tokio::test]
    async fn deletes_only_owned_managed_children_that_are_no_longer_desired() -> Result<(), String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<ConfigMap> = Api::namespaced(Client::new(service, "default"), "payments");
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.ok_or("no request")?;
            if request.method() != "DELETE" || !request.uri().path().ends_with("/configmaps/stale") {
                return Err(format!(
                    "unexpected request {} {}",
                    request.method(),
                    request.uri()
                ));
            }
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
            let body = serde_json::to_vec(&status).map_err(|e| e.to_string())?;
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(body))
                    .map_err(|e| e.to_string())?,
            );
            Ok(handle)
        });
        // Nothing but "kept" is desired; only the stale child that is ours goes.
        let mut kept = child("kept", "uid-1", true);
        stamp_hash(&mut kept);
        let mut outcomes = Vec::new();
        outcomes.push(ensure(&api, "kept", Some(&kept), Some(&kept), "uid-1", "chassis-project").await);
        for (name, owner, managed) in [
            ("stale", "uid-1", true),
            ("someone-elses", "uid-2", true),
            ("hand-made", "uid-1", false),
        ] {
            let observed = child(name, owner, managed);
            outcomes.push(ensure(&api, name, None, Some(&observed), "uid-1", "chassis-project").await);
        }
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|r| r.map(|(outcome, _)| outcome))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let deleted: Vec<&str> = ["kept", "stale", "someone-elses", "hand-made"]
            .into_iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == Outcome::Deleted)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(deleted, vec!["stale"]);
        assert_eq!(
            outcomes[0],
            Outcome::Unchanged,
            "a child as desired gets no request"
        );
        let mut handle = server.await.map_err(|e| e.to_string())??;
        drop(api);
        assert!(
            handle.next_request().await.is_none(),
            "ensure deleted more than the stale child"
        );
        Ok(())
    }
}
