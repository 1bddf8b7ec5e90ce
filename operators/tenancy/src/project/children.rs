//! Step 4 for the namespaced children: RoleBindings, ResourceQuota and LimitRange,
//! each applied only when missing, changed or edited by someone else, and removed
//! when the project or its template no longer asks for it.

use std::sync::Arc;

use chassis_api::tenancy::v1alpha1::{Project, ProjectTemplate};
use chassis_runtime::apply::{self, Outcome};
use chassis_runtime::overlay::{Overlay, Progress};
use k8s_openapi::api::core::v1::{LimitRange, ResourceQuota};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Error, build};
use crate::bind;

/// The state of each part of a project after its children were reconciled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parts {
    /// Members bound: (binding name, ClusterRole, number of subjects).
    pub bindings: Vec<(String, String, usize)>,
    pub quota: bool,
    pub limits: bool,
    /// NetworkProfiles the template binds, each with whether its policies are in
    /// place in the namespace (`None`: the profile does not exist). Filled in by the
    /// reconcile from the profile cache.
    pub network_profiles: Vec<(String, Option<bool>)>,
    /// Requests made (applies and deletes), for the write budget.
    pub writes: usize,
    /// Why a RoleBinding could not be put in place, when the API server refused it.
    pub rbac_failure: Option<String>,
    /// Why the ResourceQuota or LimitRange could not be put in place.
    pub quota_failure: Option<String>,
    /// The template's word that some of its ClusterRoles do not exist (a RoleBinding
    /// to a missing role is accepted and grants nothing). Filled in by the reconcile.
    pub roles_missing: Option<String>,
}

/// What a namespaced child kind needs to be observed and ensured.
pub trait Child:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
    + 'static
{
}

impl<K> Child for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
        + 'static
{
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
    /// The cache `store`, fed by the watch `progress` follows.
    pub fn new(store: Store<K>, progress: Progress) -> Self {
        Self {
            store,
            written: Overlay::new(progress),
        }
    }

    /// The cache's copy, or our last write while the watch has not delivered it.
    fn observe(&self, namespace: &str, name: &str) -> Option<Arc<K>>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    {
        self.written.observe(&format!("{namespace}/{name}"), || {
            self.store.get(&ObjectRef::new(name).within(namespace))
        })
    }
}

/// Where one project's children live and who writes them.
#[derive(Clone, Copy)]
struct Scope<'a> {
    client: &'a Client,
    /// The project's namespace.
    namespace: &'a str,
    /// The Project's uid: children it controls carry it as owner.
    owner_uid: &'a str,
    field_manager: &'a str,
}

/// [`ensure`](apply::ensure) for one child, given what [`Cached::observe`] saw of it.
async fn ensure_one<K>(
    at: Scope<'_>,
    cache: &Cached<K>,
    name: &str,
    observed: Option<Arc<K>>,
    desired: Option<&K>,
) -> Result<Outcome, Error>
where
    K: Child,
{
    let key = format!("{}/{name}", at.namespace);
    let api: Api<K> = Api::namespaced(at.client.clone(), at.namespace);
    let (outcome, applied) = apply::ensure(
        &api,
        name,
        desired,
        observed.as_deref(),
        at.owner_uid,
        at.field_manager,
    )
    .await
    .map_err(|source| Error::ApplyChild {
        kind: K::kind(&()).into_owned(),
        name: key.clone(),
        source,
    })?;
    match applied {
        Some(mut object) => {
            apply::trim_own_fields(&mut object, at.field_manager);
            cache.written.record(&key, object);
        }
        None if matches!(outcome, Outcome::Deleted | Outcome::Absent) => cache.written.forget(&key),
        None => {}
    }
    Ok(outcome)
}

/// [`ensure_one`] after [`Cached::observe`].
async fn ensure_cached<K>(
    at: Scope<'_>,
    cache: &Cached<K>,
    name: &str,
    desired: Option<&K>,
) -> Result<Outcome, Error>
where
    K: Child,
{
    let seen = cache.observe(at.namespace, name);
    ensure_one(at, cache, name, seen, desired).await
}

/// The caches of the children, read instead of the API server.
pub struct ChildStores {
    pub role_bindings: Cached<RoleBinding>,
    pub quotas: Cached<ResourceQuota>,
    pub limits: Cached<LimitRange>,
}

/// One binding: `ensure`, except that a binding whose roleRef must change is
/// replaced (roleRef cannot change in place). Returns each request's outcome.
///
/// Replaced whoever made it: the binding names are Chassis' in the namespaces its
/// projects own, and a project admin's binding of that name to another role (made
/// before Chassis needed the name, or by `kubectl replace --force`; not in the cache,
/// which holds Chassis' labelled bindings only, so known by the apply's refusal) would
/// otherwise refuse every apply and keep the members the spec names out.
async fn binding(
    at: Scope<'_>,
    stores: &ChildStores,
    name: &str,
    desired: Option<&RoleBinding>,
) -> Result<Vec<Outcome>, Error> {
    let have = stores.role_bindings.observe(at.namespace, name);
    let replace = matches!((desired, &have), (Some(want), Some(have)) if want.role_ref != have.role_ref);
    let want = match desired {
        Some(want) if replace => want,
        Some(want) => match members(at, stores, name, want, have.clone()).await {
            Err(Error::ApplyChild {
                source: kube::Error::Api(s),
                ..
            }) if role_ref_differs(&s) => want,
            done => return done.map(|outcome| vec![outcome]),
        },
        None => {
            return Ok(vec![
                ensure_one(at, &stores.role_bindings, name, have, None).await?,
            ]);
        }
    };
    let key = format!("{}/{name}", at.namespace);
    let failed = |source| Error::ApplyChild {
        kind: "RoleBinding".into(),
        name: key.clone(),
        source,
    };
    // Deleting first and then failing the create (the API server refuses a binding to
    // a role the operator may not bind) would leave the members with no binding at all:
    // ask first.
    let role = &want.role_ref.name;
    if let Some(why) = bind::refusal(at.client, at.namespace, role)
        .await
        .map_err(&failed)?
    {
        // Members still follow the spec meanwhile, under the role they had: someone
        // removed from the project must not keep access until `bind` is granted.
        if let Some(observed) = have {
            let mut keep = want.clone();
            keep.role_ref = observed.role_ref.clone();
            apply::stamp_hash(&mut keep);
            members(at, stores, name, &keep, Some(observed)).await?;
        }
        return Err(Error::NotBindable {
            name: key.clone(),
            role: role.clone(),
            why,
        });
    }
    let api: Api<RoleBinding> = Api::namespaced(at.client.clone(), at.namespace);
    let mut outcomes = Vec::new();
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => outcomes.push(Outcome::Deleted),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(err) => return Err(failed(err)),
    }
    let mut applied = apply::apply(&api, want, at.field_manager).await.map_err(failed)?;
    apply::trim_own_fields(&mut applied, at.field_manager);
    stores.role_bindings.written.record(&key, applied);
    outcomes.push(Outcome::Applied);
    Ok(outcomes)
}

/// Whether the API server refused an apply because the binding it would change has
/// another roleRef (immutable; the message is RBAC validation's own wording).
fn role_ref_differs(status: &kube::core::Status) -> bool {
    status.code == 422 && status.message.contains("cannot change roleRef")
}

/// [`ensure_one`] for a binding whose roleRef stays, its members compared by value
/// too: RBAC keeps subjects as written, and an edit made under our field manager's
/// name (`kubectl patch --field-manager=...`) passes the managedFields check and
/// would leave the binding granting someone else.
async fn members(
    at: Scope<'_>,
    stores: &ChildStores,
    name: &str,
    want: &RoleBinding,
    have: Option<Arc<RoleBinding>>,
) -> Result<Outcome, Error> {
    let edited = have
        .as_deref()
        .is_some_and(|have| !same_subjects(want, have) && apply::controlled_by(have, at.owner_uid));
    if !edited {
        return ensure_one(at, &stores.role_bindings, name, have, Some(want)).await;
    }
    let api: Api<RoleBinding> = Api::namespaced(at.client.clone(), at.namespace);
    let key = format!("{}/{name}", at.namespace);
    let mut applied = apply::apply_over(&api, want, have.as_deref(), at.field_manager)
        .await
        .map_err(|source| Error::ApplyChild {
            kind: "RoleBinding".into(),
            name: key.clone(),
            source,
        })?;
    apply::trim_own_fields(&mut applied, at.field_manager);
    stores.role_bindings.written.record(&key, applied);
    Ok(Outcome::Applied)
}

/// The same subjects in the same order, an absent `apiGroup` or `namespace` equal to
/// an empty one (how the API server stores a ServiceAccount's).
fn same_subjects(want: &RoleBinding, have: &RoleBinding) -> bool {
    let key = |s: &k8s_openapi::api::rbac::v1::Subject| {
        (
            s.kind.clone(),
            s.api_group.clone().unwrap_or_default(),
            s.name.clone(),
            s.namespace.clone().unwrap_or_default(),
        )
    };
    let list = |b: &RoleBinding| b.subjects.iter().flatten().map(key).collect::<Vec<_>>();
    list(want) == list(have)
}

/// Reconciles every namespaced child of `project` inside its namespace: the
/// ResourceQuota and LimitRange first, then the RoleBindings, so that members never get
/// into a namespace whose limits are not in place (pods made meanwhile would escape the
/// LimitRange's defaults for good). Bindings that exist are kept up to date whatever
/// happens to the quota (a member removed loses access at once); missing ones wait for
/// it. Each child is tried even when another fails; the parts that failed say why in
/// [`Parts`], and the first error is returned for the retry.
pub async fn reconcile(
    client: &Client,
    stores: &ChildStores,
    project: &Project,
    template: &ProjectTemplate,
    field_manager: &str,
) -> (Parts, Option<Error>) {
    let namespace = project.name_any();
    let uid = project.uid().unwrap_or_default();
    let wanted_bindings = build::role_bindings(project, template);
    let quota = build::resource_quota(project, template);
    let limits = build::limit_range(project, template);

    let at = Scope {
        client,
        namespace: &namespace,
        owner_uid: &uid,
        field_manager,
    };
    let quota_done = ensure_cached(at, &stores.quotas, build::QUOTA_NAME, quota.as_ref());
    let limits_done = ensure_cached(at, &stores.limits, build::LIMITS_NAME, limits.as_ref());
    let (quota_result, limits_result) = futures::future::join(quota_done, limits_done).await;
    let limited = quota_result.is_ok() && limits_result.is_ok();
    let mut withheld = false;
    let bindings_done = futures::future::join_all(wanted_bindings.iter().filter_map(|(name, desired)| {
        let missing = desired.is_some() && stores.role_bindings.observe(at.namespace, name).is_none();
        if missing && !limited {
            withheld = true;
            return None;
        }
        Some(binding(at, stores, name, desired.as_ref()))
    }));
    let binding_results = bindings_done.await;

    // A refusal (the API server will not take the object) shows in its part; a
    // passing failure (throttling, an API server restart) only goes to the retry, and
    // is the error returned when there is one, so the status is then left alone.
    let (mut first_refusal, mut first_passing) = (None, None);
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut failed = |error: Error, why: &mut Option<String>| {
        if error.is_refusal() {
            why.get_or_insert_with(|| error.for_status());
            first_refusal.get_or_insert(error);
        } else {
            first_passing.get_or_insert(error);
        }
    };
    let (mut rbac_failure, mut quota_failure) = (None, None);
    for result in binding_results {
        match result {
            Ok(done) => outcomes.extend(done),
            Err(error) => failed(error, &mut rbac_failure),
        }
    }
    // The API server's own refusal first: it names what to fix.
    let withheld = withheld.then(|| {
        "members get access once the ResourceQuota and LimitRange are in place (see QuotaReady)".to_string()
    });
    let rbac_failure = rbac_failure
        .or(withheld)
        .or_else(|| build::members_left_out(project));
    for result in [quota_result, limits_result] {
        match result {
            Ok(done) => outcomes.push(done),
            Err(error) => failed(error, &mut quota_failure),
        }
    }
    let writes = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Applied | Outcome::Deleted))
        .count();
    let bindings = wanted_bindings
        .iter()
        .filter_map(|(name, desired)| {
            let binding = desired.as_ref()?;
            let subjects = binding.subjects.as_ref().map_or(0, Vec::len);
            Some((name.to_string(), binding.role_ref.name.clone(), subjects))
        })
        .collect();

    let parts = Parts {
        bindings,
        quota: quota.is_some(),
        limits: limits.is_some(),
        network_profiles: Vec::new(),
        writes,
        rbac_failure,
        quota_failure,
        roles_missing: None,
    };
    (parts, first_passing.or(first_refusal))
}
