//! The Project controller: observe → validate → build → apply → status.

pub mod build;
pub mod children;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use chassis_api::MANAGED_BY;
use chassis_api::network::v1alpha1::NetworkProfile;
use chassis_api::tenancy::PROJECT_LABEL;
use chassis_api::tenancy::v1alpha1::{Project, ProjectTemplate};
use chassis_api::tenancy::{condition, reason};
use chassis_runtime::Context;
use chassis_runtime::apply::MANAGED_BY_LABEL;
use chassis_runtime::apply::{self, Claim};
use chassis_runtime::controller::{InitialSync, Running, Settings, Synced};
use chassis_runtime::metrics::Metrics;
use chassis_runtime::overlay::{Overlay, Progress};
use chassis_runtime::pace;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

/// Name of this controller in `--controllers`, metrics and its field manager.
pub const NAME: &str = "project";

/// How often a healthy project is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(600);

/// Failures of one reconcile, by step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying namespace {name}: {source}")]
    ApplyNamespace { name: String, source: kube::Error },
    #[error("applying {kind} {name}: {source}")]
    ApplyChild {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("writing status of project {name}: {source}")]
    WriteStatus { name: String, source: kube::Error },
    #[error(
        "RoleBinding {name} cannot change to ClusterRole {role}: the operator may not bind it ({why}), so the binding is left as it is; grant the operator \"bind\" on that ClusterRole (the chart's tenancy.bindableRoles)"
    )]
    NotBindable { name: String, role: String, why: String },
}

impl Error {
    /// Short label for the `kind` of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ApplyNamespace { .. } => "apply_namespace",
            Self::ApplyChild { .. } => "apply_child",
            Self::WriteStatus { .. } => "write_status",
            Self::NotBindable { .. } => "not_bindable",
        }
    }

    /// Whether the API server answered with a refusal the status should show (the
    /// object is invalid or forbidden, a webhook of the cluster's failed it), rather
    /// than failing in passing (a timeout, a conflict, throttling, an API server that
    /// is restarting or unreachable), which only the retry handles: a control-plane
    /// upgrade or a burst of 429s must not flip every project it touches to
    /// `Ready=False`.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::NotBindable { .. } => true,
            Self::ApplyChild {
                source: kube::Error::Api(answer),
                ..
            }
            | Self::ApplyNamespace {
                source: kube::Error::Api(answer),
                ..
            } => !matches!(answer.code, 408 | 409 | 429 | 503 | 504),
            _ => false,
        }
    }

    /// The error as a condition message: for a refused child, the API server's own
    /// sentence without the debug form of its answer that kube's message carries.
    pub fn for_status(&self) -> String {
        match self {
            Self::ApplyChild {
                kind,
                name,
                source: kube::Error::Api(answer),
            } => format!("{kind} {name}: {}", answer.message),
            Self::ApplyNamespace {
                name,
                source: kube::Error::Api(answer),
            } => format!("Namespace {name}: {}", answer.message),
            other => other.to_string(),
        }
    }
}

/// The stores the controller reads and the shared plumbing.
pub struct ProjectContext {
    pub base: Context,
    /// Every watch has listed once (see `Synced`).
    pub synced: Synced,
    pub projects: Store<Project>,
    pub templates: Store<ProjectTemplate>,
    pub namespaces: Store<Namespace>,
    pub children: children::ChildStores,
    /// Our writes the namespace and project caches may not show yet (see `overlay`).
    pub written_namespaces: Overlay<Namespace>,
    pub written_projects: Overlay<Project>,
    /// NetworkProfiles, for `NetworkReady`.
    pub profiles: Store<NetworkProfile>,
}

/// Per bound profile: whether its policies are in `namespace` (`None`: no such profile).
pub fn profile_states(
    profiles: &Store<NetworkProfile>,
    bound: &[String],
    namespace: &str,
) -> Vec<(String, Option<bool>)> {
    bound
        .iter()
        .map(|name| {
            let state = profiles
                .get(&ObjectRef::new(name))
                .map(|p| profile_lists(&p, namespace));
            (name.clone(), state)
        })
        .collect()
}

/// Whether `profile`'s status lists `namespace`, of whatever generation: after an edit
/// of the profile its previous policies stay in place until the new ones replace them,
/// so the namespace stays isolated meanwhile. Requiring the latest generation turned
/// every bound project `Ready=False` and back (two status writes each) on every edit.
fn profile_lists(profile: &NetworkProfile, namespace: &str) -> bool {
    profile.status.as_ref().is_some_and(|s| {
        s.matched_namespaces
            .binary_search_by(|n| n.as_str().cmp(namespace))
            .is_ok()
    })
}

/// What the reconcile saw for one project.
pub struct Observed {
    pub template: Option<Arc<ProjectTemplate>>,
    pub namespace: Option<Arc<Namespace>>,
}

/// Why a project cannot be reconciled as asked; reported, never retried in a loop.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
    /// Some causes clear by themselves (a namespace finishing termination).
    pub retry_after: Option<Duration>,
}

fn conflict(name: &str) -> Invalid {
    Invalid {
        reason: reason::NAMESPACE_CONFLICT,
        message: format!("namespace {name:?} already exists and does not belong to this project"),
        retry_after: None,
    }
}

/// Step 1: read the project's inputs from the stores.
fn observe(project: &Project, ctx: &ProjectContext) -> Observed {
    let name = project.name_any();
    let namespace = ctx
        .written_namespaces
        .observe(&name, || ctx.namespaces.get(&ObjectRef::new(&name)));
    Observed {
        template: ctx.templates.get(&ObjectRef::new(&project.spec.template)),
        namespace,
    }
}

/// Step 2: the checks the CRD schema cannot express.
pub fn validate(project: &Project, observed: &Observed) -> Result<Arc<ProjectTemplate>, Invalid> {
    let name = project.name_any();
    let Some(template) = observed.template.clone() else {
        return Err(Invalid {
            reason: reason::TEMPLATE_NOT_FOUND,
            message: format!(
                "ProjectTemplate {:?} does not exist; create it or set spec.template to an existing one",
                project.spec.template
            ),
            retry_after: None,
        });
    };
    if let Some(ns) = &observed.namespace {
        let uid = project.uid().unwrap_or_default();
        if !apply::controlled_by(ns.as_ref(), &uid) {
            let terminating = ns.metadata.deletion_timestamp.is_some();
            return Err(if terminating {
                Invalid {
                    reason: reason::NAMESPACE_TERMINATING,
                    message: format!(
                        "namespace {name:?} is still being deleted; it will be created again once it is gone"
                    ),
                    retry_after: Some(Duration::from_secs(5)),
                }
            } else {
                conflict(&name)
            });
        }
    }
    Ok(template)
}

async fn reconcile(project: Arc<Project>, ctx: Arc<ProjectContext>) -> Result<Action, Error> {
    if !ctx.synced.get() {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let _timer = ctx.base.metrics.reconcile();
    let name = project.name_any();
    let api: Api<Project> = Api::all(ctx.base.client.clone());
    // Our last status write, when the project cache has not delivered it yet. The
    // project is looked up again: the copy handed in may be older than the store.
    let Some(project) = ctx
        .written_projects
        .observe(&name, || ctx.projects.get(&ObjectRef::from_obj(project.as_ref())))
    else {
        return Ok(Action::await_change());
    };
    // A Project being deleted is left to the garbage collector. Reconciled, it would
    // make its namespace again when a foreground delete (`--cascade=foreground`, GitOps
    // prunes) removes the namespace before the Project.
    if project.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let key = project.uid().unwrap_or_else(|| name.clone());
    let ns_api: Api<Namespace> = Api::all(ctx.base.client.clone());
    let observed = observe(&project, &ctx);

    let template = match validate(&project, &observed) {
        Ok(template) => template,
        Err(invalid) => {
            let status = status::invalid(&project, &invalid);
            publish_if_changed(&ctx, &project, &status).await;
            write_status(&ctx, &api, &project, status).await?;
            ctx.base.backoff.succeeded(&key);
            return Ok(invalid
                .retry_after
                .map_or_else(Action::await_change, Action::requeue));
        }
    };

    // Step 3: build (pure); step 4: apply, skipped when the child already matches.
    let desired = build::namespace(&project, &template);
    let mut current = observed.namespace.as_deref().cloned();
    if current.is_none() {
        let claimed = match apply::claim(&ns_api, &desired, &key, &ctx.base.field_manager).await {
            Ok(claimed) => claimed,
            Err(source) => {
                let error = Error::ApplyNamespace {
                    name: name.clone(),
                    source,
                };
                return namespace_refused(&ctx, &api, &project, error).await;
            }
        };
        match claimed {
            // No Event for the creation: the status says it, and at scale one Event
            // per project costs as much as a child object.
            Claim::Created(ns) => {
                let mut trimmed = ns.clone();
                apply::trim_own_fields(&mut trimmed, &ctx.base.field_manager);
                ctx.written_namespaces.record(&name, trimmed);
                current = Some(ns);
            }
            Claim::Owned(ns) => current = Some(ns),
            Claim::Foreign(_) => {
                // The cache had not seen it yet; the namespace watch confirms it later.
                let invalid = conflict(&name);
                let status = status::invalid(&project, &invalid);
                publish_if_changed(&ctx, &project, &status).await;
                write_status(&ctx, &api, &project, status).await?;
                return Ok(Action::await_change());
            }
        }
    }
    // An update of our namespace that the API server refuses (a template label value
    // it does not take, a policy of the cluster) does not hold up the children: a
    // member removed from the project still loses access at once, and drift is still
    // repaired. The refusal shows in NamespaceReady and goes to the retry at the end.
    let mut namespace_error = None;
    let namespace = match current {
        Some(ns) if apply::metadata_matches(&desired, &ns) => ns,
        current => {
            match apply::apply_over(&ns_api, &desired, current.as_ref(), &ctx.base.field_manager).await {
                Ok(applied) => {
                    let mut trimmed = applied.clone();
                    apply::trim_own_fields(&mut trimmed, &ctx.base.field_manager);
                    ctx.written_namespaces.record(&name, trimmed);
                    applied
                }
                Err(source) => {
                    let error = Error::ApplyNamespace {
                        name: name.clone(),
                        source,
                    };
                    match current {
                        Some(ns) if error.is_refusal() => {
                            namespace_error = Some(error);
                            ns
                        }
                        _ => return namespace_refused(&ctx, &api, &project, error).await,
                    }
                }
            }
        }
    };

    // The namespaced children, once the namespace can hold them.
    let terminating = namespace.metadata.deletion_timestamp.is_some();
    let (parts, child_error) = if terminating {
        (None, None)
    } else {
        let (parts, error) = children::reconcile(
            &ctx.base.client,
            &ctx.children,
            &project,
            &template,
            &ctx.base.field_manager,
        )
        .await;
        (Some(parts), error)
    };

    // A failure in passing: retried, the status left as it was.
    let child_error = match child_error {
        Some(error) if !error.is_refusal() => return Err(error),
        refusal => refusal,
    };
    let parts = parts.map(|mut p| {
        p.roles_missing = crate::template::roles_missing(&template).map(str::to_string);
        p.network_profiles = profile_states(
            &ctx.profiles,
            &template.spec.network_profiles,
            &namespace.name_any(),
        );
        p
    });

    // Step 5: status, written only when it changes. A child the API server refused
    // shows in its part's condition (and Ready) before the error goes to the retry.
    let refused = namespace_error.as_ref().map(Error::for_status);
    let status = status::reconciled(&project, &namespace, parts.as_ref(), refused);
    if child_error.is_some() || namespace_error.is_some() {
        publish_if_changed(&ctx, &project, &status).await;
    }
    write_status(&ctx, &api, &project, status).await?;
    if let Some(error) = namespace_error.or(child_error) {
        return Err(error);
    }
    // A cache lagging behind our writes needs no requeue: the watch event that
    // catches it up (our object, or its deletion) wakes the project.
    Ok(ctx.base.success(&key, RESYNC))
}

/// A namespace write that failed: one the API server refused (a template label value
/// it does not take, a policy of the cluster) shows in the status, as a refused child
/// does; either way the error goes to the retry.
async fn namespace_refused(
    ctx: &ProjectContext,
    api: &Api<Project>,
    project: &Project,
    error: Error,
) -> Result<Action, Error> {
    if error.is_refusal() {
        let invalid = Invalid {
            reason: reason::APPLY_FAILED,
            message: error.for_status(),
            retry_after: None,
        };
        let status = status::invalid(project, &invalid);
        publish_if_changed(ctx, project, &status).await;
        write_status(ctx, api, project, status).await?;
    }
    Err(error)
}

async fn write_status(
    ctx: &ProjectContext,
    api: &Api<Project>,
    project: &Project,
    status: chassis_api::tenancy::v1alpha1::ProjectStatus,
) -> Result<(), Error> {
    if let Some(mut written) = status::write(api, project, status).await? {
        // As trimmed as the project cache's copies.
        written.metadata.managed_fields = None;
        ctx.written_projects.record(&project.name_any(), written);
    }
    Ok(())
}

fn error_policy(project: Arc<Project>, error: &Error, ctx: Arc<ProjectContext>) -> Action {
    tracing::warn!(project = %project.name_any(), error = %error, "reconcile failed");
    let key = project.uid().unwrap_or_else(|| project.name_any());
    ctx.base.retry_after_error(&key, error.metric_label())
}

/// Emits a Warning event when the Ready reason changes to a failure, so `kubectl
/// describe` shows it once rather than on every resync.
async fn publish_if_changed(
    ctx: &ProjectContext,
    project: &Project,
    new: &chassis_api::tenancy::v1alpha1::ProjectStatus,
) {
    let ready = |conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]| {
        chassis_runtime::conditions::find(conds, chassis_api::conditions::READY)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let before = project.status.as_ref().and_then(|s| ready(&s.conditions));
    let after = ready(&new.conditions);
    if before != after
        && let Some(c) = chassis_runtime::conditions::find(&new.conditions, chassis_api::conditions::READY)
    {
        let reason = c.reason.clone();
        publish(ctx, project, EventType::Warning, &reason, c.message.clone()).await;
    }
}

async fn publish(ctx: &ProjectContext, project: &Project, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.base.recorder.publish(&event, &project.object_ref(&())).await {
        tracing::debug!(error = %err, "could not publish event");
    }
}

/// The Project a managed child belongs to: the one its namespace is named after. Not
/// read from the owner reference: whoever may edit a child (a project admin may edit
/// RoleBindings) may cut that reference too, and the edit must still wake the project.
/// Not `owns_stream` either: it keeps the child's namespace in the owner's reference,
/// and for a cluster-scoped owner that names a second key for the same Project, which
/// kube-runtime then reconciles in parallel with the first (two writes per child).
fn project_of_child<K: Resource>(child: K) -> Option<ObjectRef<Project>> {
    child.meta().namespace.as_deref().map(ObjectRef::new)
}

/// Projects a template change wakes per second (and at once), so editing a template
/// under thousands of projects does not flood the API server.
pub const ROLLOUT_PER_SECOND: u32 = 50;

/// Which template events concern its projects: a new generation (a spec change), its
/// status starting or ceasing to say that a role does not exist (its other status
/// writes do not), or a deletion. Keyed by uid too: a template deleted and made again
/// while the watch was down starts again at generation 1. A template deleted while the
/// watch was down brings no delete: the list that follows lacks it, and its end wakes
/// its projects.
#[derive(Default)]
struct TemplateChanges {
    seen: std::collections::HashMap<String, TemplateSeen>,
    /// The names a list in progress has brought so far.
    listed: Option<std::collections::HashSet<String>>,
}

/// A template's uid, generation and missing-role sentence, as last seen.
type TemplateSeen = (Option<String>, Option<i64>, Option<String>);

impl TemplateChanges {
    /// The templates whose projects the event concerns.
    fn changed(&mut self, event: Result<watcher::Event<ProjectTemplate>, watcher::Error>) -> Vec<String> {
        let Ok(event) = event else {
            return Vec::new();
        };
        match event {
            watcher::Event::Apply(t) | watcher::Event::InitApply(t) => {
                let name = t.name_any();
                if let Some(listed) = self.listed.as_mut() {
                    listed.insert(name.clone());
                }
                let missing = crate::template::roles_missing(&t).map(str::to_string);
                let seen = (t.metadata.uid.clone(), t.metadata.generation, missing);
                let changed = self.seen.insert(name.clone(), seen.clone()).as_ref() != Some(&seen);
                if changed { vec![name] } else { Vec::new() }
            }
            watcher::Event::Delete(t) => {
                let name = t.name_any();
                self.seen.remove(&name);
                vec![name]
            }
            watcher::Event::Init => {
                self.listed = Some(Default::default());
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.listed.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .seen
                    .keys()
                    .filter(|n| !listed.contains(*n))
                    .cloned()
                    .collect();
                for name in &gone {
                    self.seen.remove(name);
                }
                gone
            }
        }
    }
}

/// Wires the Project controller: stores for projects, templates and namespaces, and
/// the triggers between them. Nothing runs until the returned futures are polled.
pub fn controller(
    client: Client,
    metrics: &Arc<Metrics>,
    settings: &Settings,
    shutdown: CancellationToken,
) -> Running {
    let wc = watcher::Config::default().any_semantic();
    let mut sync = InitialSync::default();

    // Stored objects are trimmed to what the reconcile reads: memory grows with the cluster.
    let fm = chassis_runtime::context::field_manager(NAME);
    let (projects, project_stream) = sync.reflect_trimmed(
        Api::<Project>::all(client.clone()),
        wc.clone(),
        |p: &mut Project| {
            p.metadata.managed_fields = None;
        },
    );

    // How far each watch has delivered, for the overlays of our writes.
    let (project_progress, namespace_progress) = (Progress::default(), Progress::default());
    let (rb_progress, quota_progress, limits_progress) =
        (Progress::default(), Progress::default(), Progress::default());
    let project_stream = project_stream
        .inspect(project_progress.observer())
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());

    let (templates, template_stream) = sync.reflect(Api::<ProjectTemplate>::all(client.clone()), wc.clone());

    let (namespaces, namespace_stream) = sync.reflect_trimmed(
        Api::<Namespace>::all(client.clone()),
        wc.clone(),
        apply::own_fields_trimmer(&fm),
    );
    let namespace_stream = namespace_stream
        .inspect(namespace_progress.observer())
        .touched_objects();

    // Children are watched by label, so the stores hold only what Chassis manages.
    let managed = watcher::Config::default()
        .any_semantic()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY},{PROJECT_LABEL}"));
    let (role_bindings, rb_stream) = sync.reflect_trimmed(
        Api::<RoleBinding>::all(client.clone()),
        managed.clone(),
        apply::own_fields_trimmer(&fm),
    );
    let rb_stream = rb_stream.inspect(rb_progress.observer()).touched_objects();
    let (quotas, quota_stream) = sync.reflect_trimmed(
        Api::<ResourceQuota>::all(client.clone()),
        managed.clone(),
        apply::own_fields_trimmer(&fm),
    );
    let quota_stream = quota_stream.inspect(quota_progress.observer()).touched_objects();
    let (limits, limits_stream) = sync.reflect_trimmed(
        Api::<LimitRange>::all(client.clone()),
        managed,
        apply::own_fields_trimmer(&fm),
    );
    let limits_stream = limits_stream
        .inspect(limits_progress.observer())
        .touched_objects();

    // Profiles, for NetworkReady; a profile wakes only the projects whose condition
    // it would change, so its status updates during a burst do not fan out.
    let (profiles, profile_stream) = sync.reflect(Api::<NetworkProfile>::all(client.clone()), wc.clone());
    let profile_stream = profile_stream.touched_objects();

    let ctx = Arc::new(ProjectContext {
        base: Context::new(client, NAME, metrics.controller(NAME), settings.instance.clone()),
        synced: sync.flag(),
        projects: projects.clone(),
        templates: templates.clone(),
        namespaces: namespaces.clone(),
        children: children::ChildStores {
            role_bindings: children::Cached::new(role_bindings, rb_progress),
            quotas: children::Cached::new(quotas, quota_progress),
            limits: children::Cached::new(limits, limits_progress),
        },
        written_namespaces: Overlay::new(namespace_progress),
        written_projects: Overlay::new(project_progress),
        profiles: profiles.clone(),
    });

    let project_index = projects.clone();
    let profile_projects = projects.clone();
    let profile_templates = templates.clone();
    let profile_store = profiles.clone();
    let project_names = projects.clone();
    let profile_ctx = ctx.clone();
    let mut changes = TemplateChanges::default();
    let rollout = pace::paced(
        template_stream,
        move |event| {
            let names = changes.changed(event);
            if names.is_empty() {
                return Vec::new();
            }
            project_index
                .state()
                .into_iter()
                .filter(|p| names.contains(&p.spec.template))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect()
        },
        pace::Bucket::new(ROLLOUT_PER_SECOND, ROLLOUT_PER_SECOND),
    );
    let results = Controller::for_stream(project_stream, projects)
        .with_config(settings.controller_config())
        // A template change reaches its projects at a steady pace (see `pace`).
        .reconcile_on(rollout)
        // A namespace wakes the project of the same name: drift on our namespace, and a
        // conflicting namespace going away.
        .watches_stream(namespace_stream, move |ns: Namespace| {
            let project = ObjectRef::<Project>::new(&ns.name_any());
            project_names.get(&project).map(|_| project)
        })
        // A child deleted or edited by someone wakes its project (drift repair).
        .watches_stream(rb_stream, project_of_child)
        .watches_stream(quota_stream, project_of_child)
        .watches_stream(limits_stream, project_of_child)
        .watches_stream(profile_stream, move |profile: NetworkProfile| {
            let name = profile.name_any();
            // A deleted profile arrives with its last status: judge it as gone.
            let gone = profile.metadata.deletion_timestamp.is_some()
                || profile_store.get(&ObjectRef::new(&name)).is_none();
            profile_projects
                .state()
                .into_iter()
                .filter(|p| {
                    let Some(template) = profile_templates
                        .get(&ObjectRef::new(&p.spec.template))
                        .filter(|t| t.spec.network_profiles.contains(&name))
                    else {
                        return false;
                    };
                    // The whole condition, not only True/False: a profile created
                    // after the project said it does not exist, but not yet in place,
                    // changes the reason and the message.
                    let namespace = p.name_any();
                    let mut states =
                        profile_states(&profile_store, &template.spec.network_profiles, &namespace);
                    for (bound, state) in &mut states {
                        if *bound == name {
                            *state = (!gone).then(|| profile_lists(&profile, &namespace));
                        }
                    }
                    // Judged by our last status write when the cache has not caught
                    // up with it: the cached copy could already agree with the profile
                    // while the written one does not, and then nothing would wake it.
                    let current = profile_ctx.written_projects.observe(&namespace, || {
                        profile_projects.get(&ObjectRef::from_obj(p.as_ref()))
                    });
                    network_differs(current.as_deref(), &states)
                })
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx);
    Running::drive(NAME, sync.done(), results)
}

#[cfg(test)]
mod tests;

/// Whether `profiles` (each bound profile: missing, pending or in place) would change
/// the project's `NetworkReady`: its status, reason or message.
fn network_differs(project: Option<&Project>, profiles: &[(String, Option<bool>)]) -> bool {
    let want = status::network_condition(profiles);
    let have = project
        .and_then(|p| p.status.as_ref())
        .and_then(|s| chassis_runtime::conditions::find(&s.conditions, condition::NETWORK_READY));
    have.is_none_or(|c| {
        (c.status == "True") != want.status || c.reason != want.reason || c.message != want.message
    })
}
