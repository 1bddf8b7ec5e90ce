//! The NetworkProfile controller: renders each profile into NetworkPolicies in
//! every namespace it applies to ([`render::applies_to`]), reverts edits to them,
//! removes them from namespaces that stop matching, and reports the namespaces in
//! `status.matchedNamespaces`. The policies are owned by the profile, so the
//! garbage collector removes them all when the profile is deleted.
//!
//! ```text
//!  [ NetworkProfile ] ─────────────┐
//!  [ Namespace ] (labels, binding) ├─▶ reconcile(profile) ─▶ [ NetworkPolicy ]* per namespace
//!  [ NetworkPolicy ] (ours) ───────┘        (drift, deletion)
//! ```

pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chassis_api::conditions::READY;
use chassis_api::network::v1alpha1::{Isolation, NetworkProfile, NetworkProfileStatus};
use chassis_api::network::{PROFILE_LABEL, reason};
use chassis_runtime::Context;
use chassis_runtime::apply::controlled_by;
use chassis_runtime::conditions::{Desired, upsert};
use chassis_runtime::controller::{InitialSync, Running, Settings, Synced};
use chassis_runtime::metrics::Metrics;

use crate::write::{Written, write_owned};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

/// Name of this controller in `--controllers`, metrics and its field manager.
pub const NAME: &str = "networkprofile";

/// Policy writes one reconcile runs at once.
const WRITES_IN_FLIGHT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of profile {name}: {source}")]
    WriteStatus { name: String, source: kube::Error },
}

pub struct ProfileContext {
    pub base: Context,
    pub synced: Synced,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// NetworkPolicies carrying the profile label (ours).
    pub policies: Store<NetworkPolicy>,
}

/// Namespaces a selector never matches (binding by name still applies): a profile
/// with `namespaceSelector: {}` must not isolate the control plane's own namespaces.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The namespaces `profile` applies to, sorted; terminating ones are skipped
/// (nothing can be created in them).
pub fn matching_namespaces(
    profile: &NetworkProfile,
    namespaces: &[Arc<PartialObjectMeta<Namespace>>],
) -> Vec<String> {
    let empty = BTreeMap::new();
    let mut out: Vec<String> = namespaces
        .iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter(|ns| {
            render::applies_to(
                profile,
                ns.metadata.labels.as_ref().unwrap_or(&empty),
                ns.metadata.annotations.as_ref().unwrap_or(&empty),
            )
        })
        .map(|ns| ns.name_any())
        .collect();
    out.sort();
    out
}

async fn reconcile(profile: Arc<NetworkProfile>, ctx: Arc<ProfileContext>) -> Result<Action, Error> {
    if !ctx.synced.get() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if profile.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the owned policies.
        return Ok(Action::await_change());
    }
    let _timer = ctx.base.metrics.reconcile();
    let name = profile.name_any();
    let client = &ctx.base.client;
    let fm = ctx.base.field_manager.as_str();

    let namespaces = ctx.namespaces.state();
    // A selector Kubernetes would refuse selects nothing new (a bad key matches no
    // namespace, a bad `NotIn` value every one), and nothing is removed meanwhile.
    let invalid = profile
        .spec
        .namespace_selector
        .as_ref()
        .and_then(crate::selector::invalid);
    let matched = if invalid.is_some() {
        let mut by_name = profile.as_ref().clone();
        by_name.spec.namespace_selector = None;
        matching_namespaces(&by_name, &namespaces)
    } else {
        matching_namespaces(&profile, &namespaces)
    };
    // An `allowFrom` peer whose selector Kubernetes would refuse: its policy would be
    // refused on every write, so it is not written, and where the profile still applies
    // what it placed before stays. Peers are rendered only with namespace isolation.
    let bad_peers: Vec<(String, String)> = profile
        .spec
        .allow_from
        .iter()
        .enumerate()
        .filter(|_| profile.spec.isolation == Isolation::Namespace)
        .filter_map(|(i, peer)| {
            let why = crate::selector::invalid(&peer.namespace_selector)
                .map(|w| format!("namespaceSelector: {w}"))
                .or_else(|| {
                    let pods = peer.pod_selector.as_ref()?;
                    crate::selector::invalid(pods).map(|w| format!("podSelector: {w}"))
                })?;
            let policy = render::policy_name(&name, &format!("from-{}", peer.name));
            Some((policy, format!("allowFrom[{i}] ({}) {why}", peer.name)))
        })
        .collect();
    let frozen: BTreeSet<&str> = bad_peers.iter().map(|(policy, _)| policy.as_str()).collect();
    let desired: Vec<NetworkPolicy> = matched
        .iter()
        .flat_map(|ns| render::policies(&profile, ns))
        .filter(|p| !frozen.contains(p.name_any().as_str()))
        .collect();
    let uid = profile.metadata.uid.clone().unwrap_or_default();

    // Create what is missing, apply what differs; never touch a policy we do not own.
    // (namespace, why, whether someone else's policy holds the name)
    let failures: Vec<(String, String, bool)> = futures::stream::iter(desired.iter().cloned())
        .map(|want| {
            let client = client.clone();
            let fm = fm.to_string();
            let uid = uid.clone();
            let ns = want.namespace().unwrap_or_default();
            let observed = ctx.policies.get(&ObjectRef::new(&want.name_any()).within(&ns));
            async move {
                let api: Api<NetworkPolicy> = Api::namespaced(client, &ns);
                let name = want.name_any();
                match write_owned(&api, &want, observed.as_deref(), &uid, &fm).await {
                    Ok(Written::Conflict(why)) => Some((ns, why, true)),
                    Ok(_) => None,
                    Err(e) => Some((ns.clone(), format!("{ns}/{name}: {e}"), false)),
                }
            }
        })
        .buffer_unordered(WRITES_IN_FLIGHT)
        .filter_map(futures::future::ready)
        .collect()
        .await;

    // Remove ours that are no longer wanted (namespace stopped matching, entry
    // removed). Policies in a terminating namespace stay until the namespace goes:
    // its pods may still run and keep their isolation.
    let wanted: BTreeSet<(String, String)> = desired
        .iter()
        .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    let terminating: BTreeSet<String> = namespaces
        .iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_some())
        .map(|ns| ns.name_any())
        .collect();
    let extra: Vec<Arc<NetworkPolicy>> = ctx
        .policies
        .state()
        .into_iter()
        // While the selector is invalid, only where the profile is bound by name.
        .filter(|p| invalid.is_none() || matched.contains(&p.namespace().unwrap_or_default()))
        .filter(|p| p.labels().get(PROFILE_LABEL) == Some(&name) && controlled_by(p.as_ref(), &uid))
        .filter(|p| !terminating.contains(&p.namespace().unwrap_or_default()))
        .filter(|p| !wanted.contains(&(p.namespace().unwrap_or_default(), p.name_any())))
        // Frozen where the profile still applies; where it no longer does, removed with
        // the rest (kept alone, it would shut the namespace's pods off from each other).
        .filter(|p| {
            !(frozen.contains(p.name_any().as_str()) && matched.contains(&p.namespace().unwrap_or_default()))
        })
        .collect();
    let delete_failures: Vec<String> = futures::stream::iter(extra)
        .map(|p| {
            let client = client.clone();
            async move {
                let ns = p.namespace().unwrap_or_default();
                let api: Api<NetworkPolicy> = Api::namespaced(client, &ns);
                match api.delete(&p.name_any(), &DeleteParams::default()).await {
                    Ok(_) => None,
                    Err(kube::Error::Api(s)) if s.code == 404 => None,
                    Err(e) => Some(format!("removing {ns}/{}: {e}", p.name_any())),
                }
            }
        })
        .buffer_unordered(WRITES_IN_FLIGHT)
        .filter_map(futures::future::ready)
        .collect()
        .await;

    let failed: BTreeSet<&String> = failures.iter().map(|(ns, _, _)| ns).collect();
    let in_place: Vec<String> = matched
        .iter()
        .filter(|ns| !failed.contains(ns))
        .cloned()
        .collect();
    let (ready, in_place) = match &invalid {
        Some(why) => {
            // The policies the old selector placed stay (frozen until it is fixed):
            // they count as in place, as they are.
            let held: BTreeSet<String> = ctx
                .policies
                .state()
                .iter()
                .filter(|p| p.labels().get(PROFILE_LABEL) == Some(&name) && controlled_by(p.as_ref(), &uid))
                .map(|p| p.namespace().unwrap_or_default())
                .chain(in_place.iter().cloned())
                .collect();
            let mut message = format!(
                "namespaceSelector: {why}; until it is fixed it selects no namespace and the policies it placed \
                 stay as they are (namespaces bound by name are served: {})",
                in_place.len()
            );
            if let Some((_, peer)) = bad_peers.first() {
                message.push_str(&format!("; and {peer}"));
            }
            add_failures(&mut message, &failures, &delete_failures);
            let ready = Desired::new(READY, false, reason::INVALID_SELECTOR, message);
            (ready, held.into_iter().collect())
        }
        None => match bad_peers.first() {
            Some((_, first)) => {
                let mut message = format!(
                    "{first}; until it is fixed its policies stay as they are where they exist and are not \
                     written elsewhere (the others are in place in {} namespaces)",
                    in_place.len()
                );
                if bad_peers.len() > 1 {
                    message.push_str(&format!("; {} peers in all", bad_peers.len()));
                }
                add_failures(&mut message, &failures, &delete_failures);
                (
                    Desired::new(READY, false, reason::INVALID_SELECTOR, message),
                    in_place,
                )
            }
            None => (
                ready_condition(&failures, &delete_failures, in_place.len()),
                in_place,
            ),
        },
    };
    let generation = profile.metadata.generation;
    let mut status = profile.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.matched_namespaces = in_place;
    upsert(&mut status.conditions, ready, generation, Timestamp::now());
    if profile.status.as_ref() != Some(&status) {
        write_status(client, &name, &status).await?;
    }
    if !failures.is_empty() || !delete_failures.is_empty() {
        Ok(ctx.base.retry_after_error(&name, "apply_policy"))
    } else if invalid.is_some() || !bad_peers.is_empty() {
        // Namespaces still wake the profile; the selectors wait for an edit.
        ctx.base.backoff.succeeded(&name);
        Ok(Action::await_change())
    } else {
        Ok(ctx.base.success(&name, Duration::from_secs(600)))
    }
}

/// Appends the first write failures to an `InvalidSelector` message: the policies that
/// are written can still fail.
fn add_failures(message: &mut String, failures: &[(String, String, bool)], delete_failures: &[String]) {
    if let Some((_, first, _)) = failures.first() {
        message.push_str(&format!(
            "; {} policies could not be applied: {first}",
            failures.len()
        ));
    }
    if let Some(first) = delete_failures.first() {
        message.push_str(&format!(
            "; {} stale policies could not be removed: {first}",
            delete_failures.len()
        ));
    }
}

/// The merge patch for `status`. An empty list is skipped when serialized, so it is
/// set explicitly: the last namespace leaving must clear `matchedNamespaces`.
pub fn status_patch(status: &NetworkProfileStatus) -> serde_json::Value {
    let mut patch = serde_json::json!({ "status": status });
    patch["status"]["matchedNamespaces"] = serde_json::json!(status.matched_namespaces);
    patch
}

async fn write_status(client: &Client, name: &str, status: &NetworkProfileStatus) -> Result<(), Error> {
    let api: Api<NetworkProfile> = Api::all(client.clone());
    let patch = status_patch(status);
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::WriteStatus {
            name: name.to_string(),
            source,
        })
}

fn error_policy(profile: Arc<NetworkProfile>, error: &Error, ctx: Arc<ProfileContext>) -> Action {
    tracing::warn!(profile = %profile.name_any(), error = %error, "reconcile failed");
    let kind = match error {
        Error::WriteStatus { .. } => "write_status",
    };
    ctx.base.retry_after_error(&profile.name_any(), kind)
}

/// Wires the NetworkProfile controller.
pub fn controller(
    client: Client,
    metrics: &Arc<Metrics>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> Running {
    let wc = watcher::Config::default().any_semantic();
    let mut sync = InitialSync::default();
    let (profiles, profile_stream) = sync.reflect(Api::<NetworkProfile>::all(client.clone()), wc.clone());
    let profile_stream = profile_stream
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());

    // Labels and annotations are all a namespace contributes, so metadata suffices,
    // without field managers and owners (they were most of a cached namespace: with
    // 1000 project namespaces, 8 MiB of the operator's memory).
    let (namespaces, namespace_stream) = sync.reflect_trimmed(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        wc.clone(),
        |ns: &mut PartialObjectMeta<Namespace>| {
            ns.metadata.managed_fields = None;
            ns.metadata.owner_references = None;
        },
    );
    let namespace_stream = namespace_stream.touched_objects().predicate_filter(
        |ns: &PartialObjectMeta<Namespace>| {
            Some(crate::hash_of(&(
                &ns.metadata.labels,
                &ns.metadata.annotations,
                ns.metadata.deletion_timestamp.is_some(),
            )))
        },
        Default::default(),
    );

    let (policies, policy_stream) = sync.reflect(
        Api::<NetworkPolicy>::all(client.clone()),
        wc.clone().labels(PROFILE_LABEL),
    );
    let policy_stream = policy_stream.touched_objects();

    let ctx = Arc::new(ProfileContext {
        base: Context::new(client, NAME, metrics.controller(NAME), settings.instance.clone()),
        synced: sync.flag(),
        namespaces,
        policies,
    });
    let all_profiles = profiles.clone();
    let results = Controller::for_stream(profile_stream, profiles)
        .with_config(settings.controller_config())
        // A namespace change can start or stop any profile matching; profiles are few.
        .watches_stream(namespace_stream, move |_ns| {
            all_profiles
                .state()
                .into_iter()
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(policy_stream, |np: NetworkPolicy| {
            np.labels()
                .get(PROFILE_LABEL)
                .map(|p| ObjectRef::<NetworkProfile>::new(p))
        })
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx);
    Running::drive(NAME, sync.done(), results)
}

/// `Ready` from what the writes gave: `failures` are (namespace, why, whether
/// someone else's policy holds the name), `delete_failures` stale policies left.
fn ready_condition(
    failures: &[(String, String, bool)],
    delete_failures: &[String],
    in_place: usize,
) -> Desired<'static> {
    if let Some(first) = delete_failures.first() {
        return Desired::new(
            READY,
            false,
            reason::APPLY_FAILED,
            format!(
                "{} stale policies could not be removed: {first}",
                delete_failures.len()
            ),
        );
    }
    if failures.is_empty() {
        return Desired::new(
            READY,
            true,
            reason::APPLIED,
            format!("policies in place in {in_place} namespaces"),
        );
    }
    let shown: Vec<&str> = failures.iter().take(3).map(|(_, m, _)| m.as_str()).collect();
    // Only names taken by others: the fix is theirs to rename or remove, not a retry.
    let why = if failures.iter().all(|(_, _, conflict)| *conflict) {
        reason::CONFLICT
    } else {
        reason::APPLY_FAILED
    };
    Desired::new(
        READY,
        false,
        why,
        format!(
            "{} policies could not be applied: {}",
            failures.len(),
            shown.join("; ")
        ),
    )
}

#[cfg(test)]
mod tests;
