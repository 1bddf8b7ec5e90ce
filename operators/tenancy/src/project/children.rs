//! Step 4 for the namespaced children: RoleBindings, ResourceQuota and LimitRange,
//! each applied only when missing, changed or edited by someone else, and removed
//! when the project or its template no longer asks for it.

use std::sync::Arc;

use chassis_api::tenancy::v1alpha1::{Project, ProjectTemplate};
use chassis_runtime::apply::{self, Outcome};
use chassis_runtime::overlay::{Overlay, Source};
use k8s_openapi::api::core::v1::{LimitRange, ResourceQuota};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Error, build};

/// The state of each part of a project after its children were reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// Members bound: (binding name, ClusterRole, number of subjects).
    pub bindings: Vec<(String, String, usize)>,
    pub quota: bool,
    pub limits: bool,
    /// NetworkProfiles the template binds (not rendered until the network area lands).
    pub network_profiles: Vec<String>,
    /// Requests made (applies and deletes), for the write budget.
    pub writes: usize,
    /// Some child was judged from our own write because the cache lagged behind it.
    pub lagging: bool,
}

/// A watch cache of one child kind with our recent writes laid over it.
pub struct Cached<K: Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    pub written: Overlay<K>,
}

impl<K> Cached<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    pub fn new(store: Store<K>) -> Self {
        Self {
            store,
            written: Overlay::default(),
        }
    }

    fn get(&self, namespace: &str, name: &str) -> (Option<Arc<K>>, Source) {
        let cached = self.store.get(&ObjectRef::new(name).within(namespace));
        self.written.observe(&format!("{namespace}/{name}"), cached)
    }
}

async fn ensure_one<K>(
    client: &Client,
    cache: &Cached<K>,
    namespace: &str,
    name: &str,
    desired: Option<&K>,
    owner_uid: &str,
    field_manager: &str,
) -> Result<(Outcome, Source), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
        + 'static,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let (observed, source) = cache.get(namespace, name);
    let (outcome, applied) =
        apply::ensure(&api, name, desired, observed.as_deref(), owner_uid, field_manager)
            .await
            .map_err(|source| Error::ApplyChild {
                kind: K::kind(&()).into_owned(),
                name: format!("{namespace}/{name}"),
                source,
            })?;
    let key = format!("{namespace}/{name}");
    match applied {
        Some(mut object) => {
            apply::trim_own_fields(&mut object, field_manager);
            cache.written.record(&key, object);
        }
        None if outcome == Outcome::Deleted => cache.written.forget(&key),
        None => {}
    }
    Ok((outcome, source))
}

/// The caches of the children, read instead of the API server.
pub struct ChildStores {
    pub role_bindings: Cached<RoleBinding>,
    pub quotas: Cached<ResourceQuota>,
    pub limits: Cached<LimitRange>,
}

/// Reconciles every namespaced child of `project` inside its namespace.
pub async fn reconcile(
    client: &Client,
    stores: &ChildStores,
    project: &Project,
    template: &ProjectTemplate,
    field_manager: &str,
) -> Result<Parts, Error> {
    let namespace = project.name_any();
    let uid = project.uid().unwrap_or_default();
    let mut writes = 0;
    let mut lagging = false;
    let mut count = |(outcome, source): (Outcome, Source)| {
        if matches!(outcome, Outcome::Applied | Outcome::Deleted) {
            writes += 1;
        }
        lagging |= source == Source::Written;
    };

    let mut bindings = Vec::new();
    for (name, desired) in build::role_bindings(project, template) {
        // roleRef cannot change in place: a binding to another role is replaced.
        let (have, source) = stores.role_bindings.get(&namespace, name);
        if let (Some(want), Some(have)) = (&desired, have)
            && want.role_ref != have.role_ref
            && apply::controlled_by(have.as_ref(), &uid)
        {
            let api: Api<RoleBinding> = Api::namespaced(client.clone(), &namespace);
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => count((Outcome::Deleted, source)),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    return Err(Error::ApplyChild {
                        kind: "RoleBinding".into(),
                        name: format!("{namespace}/{name}"),
                        source,
                    });
                }
            }
            let api: Api<RoleBinding> = Api::namespaced(client.clone(), &namespace);
            let mut applied =
                apply::apply(&api, want, field_manager)
                    .await
                    .map_err(|source| Error::ApplyChild {
                        kind: "RoleBinding".into(),
                        name: format!("{namespace}/{name}"),
                        source,
                    })?;
            apply::trim_own_fields(&mut applied, field_manager);
            stores
                .role_bindings
                .written
                .record(&format!("{namespace}/{name}"), applied);
            count((Outcome::Applied, source));
        } else {
            let outcome = ensure_one(
                client,
                &stores.role_bindings,
                &namespace,
                name,
                desired.as_ref(),
                &uid,
                field_manager,
            )
            .await?;
            count(outcome);
        }
        if let Some(binding) = &desired {
            let subjects = binding.subjects.as_ref().map_or(0, Vec::len);
            bindings.push((name.to_string(), binding.role_ref.name.clone(), subjects));
        }
    }

    let quota = build::resource_quota(project, template);
    let outcome = ensure_one(
        client,
        &stores.quotas,
        &namespace,
        build::QUOTA_NAME,
        quota.as_ref(),
        &uid,
        field_manager,
    )
    .await?;
    count(outcome);

    let limits = build::limit_range(project, template);
    let outcome = ensure_one(
        client,
        &stores.limits,
        &namespace,
        build::LIMITS_NAME,
        limits.as_ref(),
        &uid,
        field_manager,
    )
    .await?;
    count(outcome);

    Ok(Parts {
        bindings,
        quota: quota.is_some(),
        limits: limits.is_some(),
        network_profiles: template.spec.network_profiles.clone(),
        writes,
        lagging,
    })
}
