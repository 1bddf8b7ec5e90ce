//! The ProjectTemplate controller: checks what the schema cannot (the member roles
//! name ClusterRoles that exist and that the operator may bind; the API server takes
//! the namespace, ResourceQuota and LimitRange made from it) and reports it as
//! `Ready` with `observedGeneration`.

use std::sync::Arc;
use std::time::Duration;

use chassis_api::conditions::READY;
use chassis_api::tenancy::v1alpha1::{ProjectTemplate, ProjectTemplateStatus};
use chassis_runtime::Context;
use chassis_runtime::conditions::{Desired, upsert};
use chassis_runtime::controller::{InitialSync, Running, Settings, Synced};
use chassis_runtime::metrics::Metrics;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::bind;

/// Name of this controller in `--controllers`, metrics and its field manager.
pub const NAME: &str = "projecttemplate";

pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    pub const ROLE_NOT_FOUND: &str = "RoleNotFound";
    pub const ROLE_NOT_BINDABLE: &str = "RoleNotBindable";
    pub const CHILD_REFUSED: &str = "ChildRefused";
}

/// Where the bind check's dry-run bindings go: a namespace every cluster has. The
/// operator may create RoleBindings in every namespace, so the answer there is the
/// answer in a project's namespace.
const CHECK_NAMESPACE: &str = "default";

/// How often a template whose roles cannot be bound looks again: granting the
/// operator `bind` changes RBAC, which nothing here watches.
const RECHECK_NOT_BINDABLE: Duration = Duration::from_secs(60);

/// What the checks found, in the order they run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    RoleNotFound(String),
    RoleNotBindable(String),
    /// The API server refuses the namespace, ResourceQuota or LimitRange a project
    /// would get (a quantity it cannot read, a default above the max, a label value).
    ChildRefused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of template {name}: {source}")]
    WriteStatus { name: String, source: kube::Error },
    #[error("checking whether the operator may bind ClusterRole {role} (template {name}): {source}")]
    BindCheck {
        name: String,
        role: String,
        source: kube::Error,
    },
    #[error("checking that the API server takes the children of template {name}: {source}")]
    ChildCheck { name: String, source: kube::Error },
}

pub struct TemplateContext {
    pub base: Context,
    /// Every watch has listed once (see `Synced`).
    pub synced: Synced,
    pub cluster_roles: Store<PartialObjectMeta<ClusterRole>>,
}

/// The validation step: every role the template binds must exist.
pub fn validate(template: &ProjectTemplate, role_exists: impl Fn(&str) -> bool) -> Result<(), String> {
    let missing: Vec<String> = roles(template)
        .into_iter()
        .filter(|(_, role)| !role_exists(role))
        .map(|(kind, role)| format!("roles.{kind}: {}", missing_role(role)))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// How a template's status names a ClusterRole that does not exist; projects look
/// for it to tell whether one of their bindings is affected.
pub fn missing_role(role: &str) -> String {
    format!("ClusterRole {role:?} does not exist")
}

/// The ClusterRoles its status says do not exist, as the sentence it gives (`None`
/// when the status is about an older generation: the template controller has not
/// judged the current spec yet).
pub fn roles_missing(template: &ProjectTemplate) -> Option<&str> {
    let status = template.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == READY)?;
    (ready.status == "False"
        && ready.reason == reason::ROLE_NOT_FOUND
        && status.observed_generation == template.metadata.generation)
        .then_some(ready.message.as_str())
}

/// The distinct roles a template binds, each with the first of its member kinds.
fn roles(template: &ProjectTemplate) -> Vec<(&'static str, &str)> {
    let roles = &template.spec.roles;
    let mut all: Vec<(&'static str, &str)> = Vec::new();
    for (kind, role) in [
        ("admin", &roles.admin),
        ("edit", &roles.edit),
        ("view", &roles.view),
    ] {
        if !all.iter().any(|(_, seen)| *seen == role.as_str()) {
            all.push((kind, role.as_str()));
        }
    }
    all
}

/// Name of the dry-run objects (never stored; a fixed name keeps the API server's
/// sentence, which names the object, the same from one check to the next, so the
/// status is not rewritten on every check).
const CHECK_NAME: &str = "chassis-template-check";

/// Whether the API server takes the namespace, ResourceQuota and LimitRange a
/// project of `template` gets, asked with dry-run creates (nothing is stored; the
/// chart's admission policy on the operator's writes lets dry runs through). The
/// schema cannot check a quantity (`cpu: lots`) or that a LimitRange's default is
/// under its max: without this the template said Ready and every project made from
/// it failed. `Ok(Some(why))`: refused, with the API server's sentence.
async fn child_refusal(client: &Client, template: &ProjectTemplate) -> Result<Option<String>, kube::Error> {
    use crate::project::build;
    use chassis_api::tenancy::v1alpha1::{Project, ProjectSpec};
    use k8s_openapi::api::core::v1::{LimitRange, Namespace};

    let probe = Project::new(
        CHECK_NAME,
        ProjectSpec {
            template: template.name_any(),
            ..Default::default()
        },
    );
    let mut namespace = build::namespace(&probe, template);
    namespace.metadata.owner_references = None;
    let answer = Api::<Namespace>::all(client.clone())
        .create(&DRY_RUN, &namespace)
        .await;
    if let Some(why) = judged(template, "namespace (spec.labels, spec.annotations)", answer)? {
        return Ok(Some(why));
    }
    let quota = build::resource_quota(&probe, template);
    if let Some(why) =
        dry_run_in_default(client, template, "ResourceQuota (spec.resourceQuota)", quota).await?
    {
        return Ok(Some(why));
    }
    let limits: Option<LimitRange> = build::limit_range(&probe, template);
    dry_run_in_default(client, template, "LimitRange (spec.limitRange)", limits).await
}

const DRY_RUN: kube::api::PostParams = kube::api::PostParams {
    dry_run: true,
    field_manager: None,
};

/// A dry-run create of `object` (a project child, so made without an owner) in
/// [`CHECK_NAMESPACE`], judged as [`judged`] says.
async fn dry_run_in_default<K>(
    client: &Client,
    template: &ProjectTemplate,
    what: &str,
    object: Option<K>,
) -> Result<Option<String>, kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let Some(mut object) = object else {
        return Ok(None);
    };
    object.meta_mut().owner_references = None;
    object.meta_mut().namespace = Some(CHECK_NAMESPACE.into());
    let answer = Api::<K>::namespaced(client.clone(), CHECK_NAMESPACE)
        .create(&DRY_RUN, &object)
        .await;
    judged(template, what, answer)
}

/// A dry run's answer: `Some(why)` when the API server's own validation refuses the
/// object. A policy of the cluster (a webhook, an admission policy, a quota in
/// `default`) may refuse the probe for where it is made rather than what it is: then
/// the check says nothing, as before it existed, rather than fail a good template.
fn judged<K>(
    template: &ProjectTemplate,
    what: &str,
    answer: Result<K, kube::Error>,
) -> Result<Option<String>, kube::Error> {
    match answer {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status))
            if (status.code == 422 || status.code == 400)
                && !status.message.contains("admission webhook")
                && !status.message.contains("ValidatingAdmissionPolicy") =>
        {
            Ok(Some(format!(
                "projects made from it would fail: the API server refuses their {what}: {}",
                status.message
            )))
        }
        Err(kube::Error::Api(status)) => {
            tracing::warn!(template = %template.name_any(), code = status.code, message = %status.message,
                "a policy of the cluster refused the dry run of a project's {what}; not judged");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The sentence for the roles the API server would not let the operator bind.
pub fn not_bindable(refused: &[(&str, &str, String)]) -> String {
    let each: Vec<String> = refused
        .iter()
        .map(|(kind, role, why)| {
            format!("roles.{kind}: the operator may not bind ClusterRole {role:?} ({why})")
        })
        .collect();
    format!(
        "{}; projects using this template would get no such binding: grant the operator \"bind\" on the role (the chart's tenancy.bindableRoles)",
        each.join("; ")
    )
}

/// The status for a verdict.
pub fn status(template: &ProjectTemplate, verdict: &Verdict) -> ProjectTemplateStatus {
    let generation = template.metadata.generation;
    let mut status = template.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let ready = match verdict {
        Verdict::Accepted => Desired::new(READY, true, reason::ACCEPTED, "projects can use this template"),
        Verdict::RoleNotFound(why) => Desired::new(READY, false, reason::ROLE_NOT_FOUND, why.clone()),
        Verdict::RoleNotBindable(why) => Desired::new(READY, false, reason::ROLE_NOT_BINDABLE, why.clone()),
        Verdict::ChildRefused(why) => Desired::new(READY, false, reason::CHILD_REFUSED, why.clone()),
    };
    upsert(&mut status.conditions, ready, generation, Timestamp::now());
    status
}

async fn reconcile(template: Arc<ProjectTemplate>, ctx: Arc<TemplateContext>) -> Result<Action, Error> {
    if !ctx.synced.get() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let _timer = ctx.base.metrics.reconcile();
    let name = template.name_any();
    let found = validate(&template, |role| {
        ctx.cluster_roles.get(&ObjectRef::new(role)).is_some()
    });
    let verdict = match found {
        Err(why) => Verdict::RoleNotFound(why),
        Ok(()) => {
            let mut refused = Vec::new();
            for (kind, role) in roles(&template) {
                let answer = bind::refusal(&ctx.base.client, CHECK_NAMESPACE, role)
                    .await
                    .map_err(|source| Error::BindCheck {
                        name: name.clone(),
                        role: role.to_string(),
                        source,
                    })?;
                if let Some(why) = answer {
                    refused.push((kind, role, why));
                }
            }
            if !refused.is_empty() {
                Verdict::RoleNotBindable(not_bindable(&refused))
            } else {
                match child_refusal(&ctx.base.client, &template).await {
                    Ok(None) => Verdict::Accepted,
                    Ok(Some(why)) => Verdict::ChildRefused(why),
                    Err(source) => return Err(Error::ChildCheck { name, source }),
                }
            }
        }
    };
    let new = status(&template, &verdict);
    if template.status.as_ref() != Some(&new) {
        let api: Api<ProjectTemplate> = Api::all(ctx.base.client.clone());
        let patch = serde_json::json!({ "status": new });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::WriteStatus {
                name: name.clone(),
                source,
            })?;
    }
    // A missing role or a change of a role's rules is picked up by the ClusterRole
    // watch; a grant of "bind" only by looking again.
    let again = match verdict {
        Verdict::RoleNotBindable(_) => RECHECK_NOT_BINDABLE,
        _ => Duration::from_secs(600),
    };
    Ok(ctx.base.success(&name, again))
}

fn error_policy(template: Arc<ProjectTemplate>, error: &Error, ctx: Arc<TemplateContext>) -> Action {
    tracing::warn!(template = %template.name_any(), error = %error, "reconcile failed");
    let kind = match error {
        Error::WriteStatus { .. } => "write_status",
        Error::BindCheck { .. } => "bind_check",
        Error::ChildCheck { .. } => "child_check",
    };
    ctx.base.retry_after_error(&template.name_any(), kind)
}

/// Wires the ProjectTemplate controller.
pub fn controller(
    client: Client,
    metrics: &Arc<Metrics>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> Running {
    let wc = watcher::Config::default().any_semantic();
    let mut sync = InitialSync::default();
    let (templates, template_stream) = sync.reflect(Api::<ProjectTemplate>::all(client.clone()), wc.clone());
    let template_stream = template_stream
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());

    // Only names matter, so ClusterRoles are watched as metadata.
    let (cluster_roles, role_stream) =
        sync.reflect(Api::<PartialObjectMeta<ClusterRole>>::all(client.clone()), wc);
    let role_stream = role_stream.touched_objects();

    let ctx = Arc::new(TemplateContext {
        base: Context::new(client, NAME, metrics.controller(NAME), settings.instance.clone()),
        synced: sync.flag(),
        cluster_roles,
    });
    let index = templates.clone();
    let results = Controller::for_stream(template_stream, templates)
        .with_config(settings.controller_config())
        .watches_stream(role_stream, move |role: PartialObjectMeta<ClusterRole>| {
            let name = role.name_any();
            index
                .state()
                .into_iter()
                .filter(|t| roles(t).iter().any(|(_, role)| *role == name))
                .map(|t| ObjectRef::from_obj(t.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx);
    Running::drive(NAME, sync.done(), results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chassis_api::tenancy::v1alpha1::ProjectTemplateSpec;

    #[test]
    fn names_every_missing_role() {
        let mut t = ProjectTemplate::new("t", ProjectTemplateSpec::default());
        t.spec.roles.edit = "editor-typo".into();
        let result = validate(&t, |r| ["admin", "edit", "view"].contains(&r));
        assert_eq!(
            result,
            Err("roles.edit: ClusterRole \"editor-typo\" does not exist".to_string())
        );
        let ready = status(&t, &Verdict::RoleNotFound(result.err().unwrap_or_default()));
        assert_eq!(ready.conditions[0].reason, reason::ROLE_NOT_FOUND);
        assert!(validate(&t, |_| true).is_ok());
    }

    #[test]
    fn each_role_is_checked_once_and_a_refusal_names_the_role_and_the_fix() {
        let mut t = ProjectTemplate::new("t", ProjectTemplateSpec::default());
        t.spec.roles.admin = "cluster-admin".into();
        t.spec.roles.edit = "cluster-admin".into();
        assert_eq!(roles(&t), vec![("admin", "cluster-admin"), ("view", "view")]);

        let why = not_bindable(&[("admin", "cluster-admin", "not currently held".into())]);
        assert!(
            why.starts_with(
                "roles.admin: the operator may not bind ClusterRole \"cluster-admin\" (not currently held)"
            ),
            "{why}"
        );
        assert!(why.contains("tenancy.bindableRoles"), "{why}");
        let ready = status(&t, &Verdict::RoleNotBindable(why));
        assert_eq!(ready.conditions[0].reason, reason::ROLE_NOT_BINDABLE);
        assert_eq!(ready.conditions[0].status, "False");
    }
}
