//! The EgressPolicy controller: renders the ordered rules ([`render::render`]) into
//! one NetworkPolicy `egresspolicy.<name>` beside the EgressPolicy, owned by it, and
//! reverts edits to it. It fails closed: invalid rules keep the last rendered
//! policy, or deny all egress of the selected pods when there is none yet, and say
//! which rule is wrong; rules that can never match are named in `Ready=False` while
//! the policy (which is still exact) is applied. A NetworkPolicy of that name that
//! belongs to someone else is never taken over.

pub mod render;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chassis_api::MANAGED_BY;
use chassis_api::conditions::READY;
use chassis_api::network::v1alpha1::EgressPolicy;
use chassis_api::network::{EGRESS_POLICY_LABEL, reason};
use chassis_runtime::Context;
use chassis_runtime::apply::{MANAGED_BY_LABEL, controller_owner_ref, stamp_hash};
use chassis_runtime::conditions::{Desired, upsert};
use chassis_runtime::controller::{InitialSync, Running, Settings, Synced};
use chassis_runtime::metrics::Metrics;

use crate::write::{Written, write_owned};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

/// Name of this controller in `--controllers`, metrics and its field manager.
pub const NAME: &str = "egresspolicy";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of EgressPolicy {namespace}/{name}: {source}")]
    WriteStatus {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

pub struct EgressContext {
    pub base: Context,
    pub synced: Synced,
    /// NetworkPolicies carrying the egress-policy label (ours).
    pub policies: Store<NetworkPolicy>,
}

/// `egresspolicy.<name>`: distinct from every NetworkProfile policy (`profile.*`).
pub fn policy_name(egress_policy: &str) -> String {
    format!("egresspolicy.{egress_policy}")
}

/// The NetworkPolicy rendered for `egress` from its rendered rules.
pub fn network_policy(egress: &EgressPolicy, rules: &render::Rendered) -> NetworkPolicy {
    let name = egress.name_any();
    let mut np = NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name(&name)),
            namespace: egress.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (EGRESS_POLICY_LABEL.to_string(), name),
            ])),
            owner_references: controller_owner_ref(egress).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(egress.spec.pod_selector.clone().unwrap_or_default()),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(rules.rules.clone()),
            ingress: None,
        }),
    };
    stamp_hash(&mut np);
    np
}

async fn reconcile(egress: Arc<EgressPolicy>, ctx: Arc<EgressContext>) -> Result<Action, Error> {
    if !ctx.synced.get() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if egress.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let _timer = ctx.base.metrics.reconcile();
    let name = egress.name_any();
    let namespace = egress.namespace().unwrap_or_default();
    let key = format!("{namespace}/{name}");
    let policy_name = policy_name(&name);
    let observed = ctx.policies.get(&ObjectRef::new(&policy_name).within(&namespace));
    let uid = egress.metadata.uid.clone().unwrap_or_default();
    let fm = ctx.base.field_manager.as_str();
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.base.client.clone(), &namespace);
    // A pod selector the API server refuses in any NetworkPolicy (the deny-all
    // fallback's too): nothing can be written, so say why instead of retrying.
    let bad_selector = egress
        .spec
        .pod_selector
        .as_ref()
        .and_then(crate::selector::invalid);
    let (rendered, invalid) = match render::render(&egress.spec) {
        Ok(rendered) => (Some(rendered), None),
        Err(invalid) => (None, Some(invalid)),
    };
    // Fail closed: with nothing rendered yet, the selected pods get no egress at all.
    let to_write = match (&rendered, &observed) {
        _ if bad_selector.is_some() => None,
        (Some(rendered), _) => Some(network_policy(&egress, rendered)),
        (None, None) => Some(network_policy(&egress, &render::Rendered::deny_all())),
        (None, Some(_)) => None,
    };
    let written = match &to_write {
        Some(desired) => Some(write_owned(&api, desired, observed.as_deref(), &uid, fm).await),
        None => None,
    };
    let ready = match (written, invalid, rendered) {
        (Some(Err(e)), _, _) => Desired::new(
            READY,
            false,
            reason::APPLY_FAILED,
            format!("NetworkPolicy {policy_name} could not be written: {e}"),
        ),
        (Some(Ok(Written::Conflict(why))), _, _) => Desired::new(READY, false, reason::CONFLICT, why),
        (_, Some(invalid), _) => {
            // What is in force: a policy without egress rules (the fail-closed one
            // written for a new EgressPolicy) denies all egress.
            let denies_all = match &observed {
                None => true,
                Some(have) => have
                    .spec
                    .as_ref()
                    .and_then(|s| s.egress.as_ref())
                    .is_none_or(Vec::is_empty),
            };
            let kept = if denies_all {
                "all egress of the selected pods is denied until it is fixed"
            } else {
                "the NetworkPolicy rendered last is kept"
            };
            let why = if invalid.rule == 0 {
                reason::TOO_LARGE
            } else {
                reason::INVALID_RULE
            };
            Desired::new(READY, false, why, format!("{invalid}; {kept}"))
        }
        (_, None, Some(rendered)) if !rendered.shadowed.is_empty() => Desired::new(
            READY,
            false,
            reason::RULE_SHADOWED,
            format!(
                "{}; NetworkPolicy {policy_name} is applied",
                rendered.shadowed.join("; ")
            ),
        ),
        (_, None, Some(rendered)) => {
            let mut message = format!(
                "{} rules rendered into NetworkPolicy {policy_name} ({} egress rules)",
                egress.spec.rules.len(),
                rendered.rules.len()
            );
            for note in &rendered.notes {
                message.push_str("; ");
                message.push_str(note);
            }
            Desired::new(READY, true, reason::APPLIED, message)
        }
        (_, None, None) => Desired::new(READY, false, reason::APPLY_FAILED, "nothing was rendered"),
    };
    let ready = match &bad_selector {
        Some(why) => {
            let kept = if observed.is_some() {
                "the NetworkPolicy written before stays as it is"
            } else {
                "no NetworkPolicy can be written, so the pods' egress is not restricted"
            };
            Desired::new(
                READY,
                false,
                reason::INVALID_SELECTOR,
                format!("podSelector: {why}; {kept}"),
            )
        }
        None => ready,
    };
    let failed = ready.reason == reason::APPLY_FAILED;
    let generation = egress.metadata.generation;
    let mut status = egress.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    upsert(&mut status.conditions, ready, generation, Timestamp::now());
    if egress.status.as_ref() != Some(&status) {
        let api: Api<EgressPolicy> = Api::namespaced(ctx.base.client.clone(), &namespace);
        let patch = serde_json::json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::WriteStatus {
                namespace: namespace.clone(),
                name: name.clone(),
                source,
            })?;
    }
    if failed {
        return Ok(ctx.base.retry_after_error(&key, "apply_policy"));
    }
    if bad_selector.is_some() {
        ctx.base.backoff.succeeded(&key);
        return Ok(Action::await_change());
    }
    Ok(ctx.base.success(&key, Duration::from_secs(600)))
}

fn error_policy(egress: Arc<EgressPolicy>, error: &Error, ctx: Arc<EgressContext>) -> Action {
    tracing::warn!(egresspolicy = %egress.name_any(), namespace = ?egress.namespace(), error = %error, "reconcile failed");
    let kind = match error {
        Error::WriteStatus { .. } => "write_status",
    };
    let key = format!("{}/{}", egress.namespace().unwrap_or_default(), egress.name_any());
    ctx.base.retry_after_error(&key, kind)
}

/// Wires the EgressPolicy controller.
pub fn controller(
    client: Client,
    metrics: &Arc<Metrics>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> Running {
    let wc = watcher::Config::default().any_semantic();
    let mut sync = InitialSync::default();
    let (egresses, egress_stream) = sync.reflect(Api::<EgressPolicy>::all(client.clone()), wc.clone());
    let egress_stream = egress_stream
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let (policies, policy_stream) = sync.reflect(
        Api::<NetworkPolicy>::all(client.clone()),
        wc.labels(EGRESS_POLICY_LABEL),
    );
    let policy_stream = policy_stream.touched_objects();
    let ctx = Arc::new(EgressContext {
        base: Context::new(client, NAME, metrics.controller(NAME), settings.instance.clone()),
        synced: sync.flag(),
        policies,
    });
    let results = Controller::for_stream(egress_stream, egresses)
        .with_config(settings.controller_config())
        .watches_stream(policy_stream, |np: NetworkPolicy| {
            let namespace = np.namespace()?;
            np.labels()
                .get(EGRESS_POLICY_LABEL)
                .map(|name| ObjectRef::<EgressPolicy>::new(name).within(&namespace))
        })
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx);
    Running::drive(NAME, sync.done(), results)
}

#[cfg(test)]
mod tests;
