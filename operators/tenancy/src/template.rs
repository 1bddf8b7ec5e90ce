//! The ProjectTemplate controller: checks what the schema cannot (the member roles
//! name ClusterRoles that exist) and reports it as `Ready` with `observedGeneration`.

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

/// Name of this controller in `--controllers`, metrics and its field manager.
pub const NAME: &str = "projecttemplate";

pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    pub const ROLE_NOT_FOUND: &str = "RoleNotFound";
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of template {name}: {source}")]
    WriteStatus { name: String, source: kube::Error },
}

pub struct TemplateContext {
    pub base: Context,
    /// Every watch has listed once (see `Synced`).
    pub synced: Synced,
    pub cluster_roles: Store<PartialObjectMeta<ClusterRole>>,
}

/// The validation step: every role the template binds must exist.
pub fn validate(template: &ProjectTemplate, role_exists: impl Fn(&str) -> bool) -> Result<(), String> {
    let roles = &template.spec.roles;
    let missing: Vec<String> = [
        ("admin", &roles.admin),
        ("edit", &roles.edit),
        ("view", &roles.view),
    ]
    .into_iter()
    .filter(|(_, role)| !role_exists(role))
    .map(|(kind, role)| format!("roles.{kind}: ClusterRole {role:?} does not exist"))
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// The status for a validation result.
pub fn status(template: &ProjectTemplate, result: &Result<(), String>) -> ProjectTemplateStatus {
    let generation = template.metadata.generation;
    let mut status = template.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let ready = match result {
        Ok(()) => Desired::new(READY, true, reason::ACCEPTED, "projects can use this template"),
        Err(why) => Desired::new(READY, false, reason::ROLE_NOT_FOUND, why.clone()),
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
    let result = validate(&template, |role| {
        ctx.cluster_roles.get(&ObjectRef::new(role)).is_some()
    });
    let new = status(&template, &result);
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
    // A missing role is picked up by the ClusterRole watch, not by polling.
    Ok(ctx.base.success(&name, Duration::from_secs(600)))
}

fn error_policy(template: Arc<ProjectTemplate>, error: &Error, ctx: Arc<TemplateContext>) -> Action {
    tracing::warn!(template = %template.name_any(), error = %error, "reconcile failed");
    ctx.base.retry_after_error(&template.name_any(), "write_status")
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
    let (roles, role_stream) = sync.reflect(Api::<PartialObjectMeta<ClusterRole>>::all(client.clone()), wc);
    let role_stream = role_stream.touched_objects();

    let ctx = Arc::new(TemplateContext {
        base: Context::new(client, NAME, metrics.controller(NAME), settings.instance.clone()),
        synced: sync.flag(),
        cluster_roles: roles.clone(),
    });
    let index = templates.clone();
    let results = Controller::for_stream(template_stream, templates)
        .with_config(settings.controller_config())
        .watches_stream(role_stream, move |role: PartialObjectMeta<ClusterRole>| {
            let name = role.name_any();
            index
                .state()
                .into_iter()
                .filter(|t| [&t.spec.roles.admin, &t.spec.roles.edit, &t.spec.roles.view].contains(&&name))
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
        let ready = status(&t, &result);
        assert_eq!(ready.conditions[0].reason, reason::ROLE_NOT_FOUND);
        assert!(validate(&t, |_| true).is_ok());
    }
}
