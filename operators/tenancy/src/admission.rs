//! Admission for Projects, the self-service half of tenancy:
//!
//! - mutating: records the requesting user in `tenancy.chassis.dev/requester`
//!   (set on create, restored on every update, so it cannot be forged or changed)
//!   and makes the requester the admin when `spec.admins` is empty;
//! - validating: refuses reserved names, names of existing namespaces that no
//!   Project owns, and requests over the template's `maxProjectsPerUser`.
//!
//! The decisions are pure functions of the request and looked-up facts; the
//! handlers only fetch those facts.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use chassis_api::tenancy::REQUESTER_ANNOTATION;
use chassis_api::tenancy::v1alpha1::{Project, ProjectTemplate};
use chassis_runtime::controller::{InitialSync, Synced};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use warp::Filter;

pub const MUTATE_PATH: &str = "mutate-projects";
pub const VALIDATE_PATH: &str = "validate-projects";
/// Name of both webhook configurations.
pub const CONFIGURATION_NAME: &str = "chassis-tenancy";

/// Names no Project may take: the built-in ones (`default`, `kube-*`, `chassis-*`)
/// and the platform's own (`--reserved-project-names`). A namespace that does not
/// exist yet, or not at the moment (`ingress-nginx` between an uninstall and an
/// install), could otherwise be taken by a project, and what the platform installs
/// there later would be in a developer's namespace.
#[derive(Debug, Clone, Default)]
pub struct ReservedNames {
    names: Vec<String>,
    prefixes: Vec<String>,
}

impl ReservedNames {
    /// From entries such as `ingress-nginx` (that name) and `openshift-*` (a prefix).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut reserved = Self::default();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (stem, prefix) = match entry.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (entry, false),
            };
            let label = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
            if stem.is_empty() || stem.len() > 63 || !stem.bytes().all(label) || stem.starts_with('-') {
                return Err(format!(
                    "reserved project name {entry:?}: a namespace name (lowercase letters, digits, '-') or a prefix of one ending in '*'"
                ));
            }
            if prefix {
                reserved.prefixes.push(stem.to_string());
            } else {
                reserved.names.push(stem.to_string());
            }
        }
        Ok(reserved)
    }

    /// Why a Project may not have this name, if it may not; needs no lookup.
    pub fn refusal(&self, name: &str) -> Option<String> {
        if name == "default" || name.starts_with("kube-") || name.starts_with("chassis-") {
            return Some(format!(
                "project name {name:?} is reserved: names \"default\", \"kube-*\" and \"chassis-*\" belong to the platform"
            ));
        }
        let by_name = self.names.iter().any(|n| n == name);
        let by_prefix = self.prefixes.iter().find(|p| name.starts_with(p.as_str()));
        if by_name || by_prefix.is_some() {
            let what = by_prefix.map_or_else(|| "this name".to_string(), |p| format!("names \"{p}*\""));
            return Some(format!(
                "project name {name:?} is reserved: the platform keeps {what} for its own namespaces"
            ));
        }
        None
    }
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn requester_of(object: Option<&DynamicObject>) -> Option<String> {
    object.and_then(|o| o.annotations().get(REQUESTER_ANNOTATION).cloned())
}

/// The JSON patch operations for a Project create or update.
pub fn mutation(request: &AdmissionRequest<DynamicObject>) -> Vec<Value> {
    let Some(object) = request.object.as_ref() else {
        return Vec::new();
    };
    let user = request.user_info.username.clone().unwrap_or_default();
    // On update the requester is whatever it was at creation, whatever the client sent.
    let wanted = match request.operation {
        Operation::Create => Some(user.clone()),
        Operation::Update => requester_of(request.old_object.as_ref()),
        _ => return Vec::new(),
    };
    let mut ops = Vec::new();
    let current = requester_of(Some(object));
    if current != wanted {
        let has_annotations = object.metadata.annotations.is_some();
        let pointer = format!("/metadata/annotations/{}", escape_pointer(REQUESTER_ANNOTATION));
        match (&wanted, has_annotations) {
            (Some(value), false) => ops.push(json!({
                "op": "add", "path": "/metadata/annotations", "value": { REQUESTER_ANNOTATION: value }
            })),
            (Some(value), true) => ops.push(json!({"op": "add", "path": pointer, "value": value})),
            (None, _) => ops.push(json!({"op": "remove", "path": pointer})),
        }
    }
    if matches!(request.operation, Operation::Create) && !user.is_empty() {
        let spec = object.data.get("spec");
        // Only a missing, null or empty list is filled in: anything else (a map where
        // the list belongs, a string) is left for the schema to refuse, not replaced.
        let admins_empty = match spec {
            None | Some(Value::Null) => true,
            Some(Value::Object(spec)) => match spec.get("admins") {
                None | Some(Value::Null) => true,
                Some(Value::Array(admins)) => admins.is_empty(),
                Some(_) => false,
            },
            Some(_) => false,
        };
        if admins_empty {
            let admin = json!([{"kind": "User", "name": user}]);
            if spec.is_some_and(Value::is_object) {
                ops.push(json!({"op": "add", "path": "/spec/admins", "value": admin}));
            } else {
                ops.push(json!({"op": "add", "path": "/spec", "value": {"admins": admin}}));
            }
        }
    }
    ops
}

/// Why a Project create must be refused because the mutating webhook did not run: its
/// requester annotation is not the requesting user. The two webhooks are separate
/// configurations: with the mutating one deleted, edited or not loaded yet, a create
/// would otherwise pass with the requester it brought. The platform's fault, not the
/// user's: refused as an error to retry (see [`platform_error`]).
pub fn unmutated(request: &AdmissionRequest<DynamicObject>) -> Option<String> {
    let user = request.user_info.username.as_deref().unwrap_or_default();
    let requester = requester_of(request.object.as_ref());
    (requester.as_deref() != Some(user)).then(|| {
        format!(
            "chassis' mutating admission webhook for Projects did not run (its MutatingWebhookConfiguration \
             missing, changed or not loaded yet): the annotation {REQUESTER_ANNOTATION} is not the requesting \
             user {user:?}; try again"
        )
    })
}

/// What the validating webhook looks up before it decides.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Facts {
    /// A namespace of the project's name exists and no Project controls it.
    pub foreign_namespace: bool,
    /// The template's `maxProjectsPerUser`, when the template exists and sets one.
    pub max_projects_per_user: Option<i32>,
    /// Projects the requesting user already has.
    pub user_projects: usize,
    /// Name of the template the project uses.
    pub template: String,
    /// The requester may `use` that template (a SubjectAccessReview said so).
    pub template_allowed: bool,
    /// The requester may create namespaces themselves (a cluster admin, a GitOps
    /// controller): the per-user limit is for self-service, as OpenShift's project
    /// request limit is. Asked only of a user at the limit.
    pub limit_exempt: bool,
}

/// The [`Granted`] key of "may create namespaces" (no template has a '/' in its name).
const CREATES_NAMESPACES: &str = "namespaces/create";

/// `Err(message)` when the Project must be refused (its name was judged before, by
/// [`ReservedNames`]).
pub fn decide(name: &str, user: &str, operation: &Operation, facts: &Facts) -> Result<(), String> {
    if !matches!(operation, Operation::Create) {
        return Ok(());
    }
    if !facts.template_allowed {
        return Err(format!(
            "user {user:?} may not use the ProjectTemplate {:?}; a platform admin grants it with the verb \"use\" on projecttemplates/{}",
            facts.template, facts.template
        ));
    }
    if facts.foreign_namespace {
        return Err(format!(
            "namespace {name:?} already exists and does not belong to a project; choose another name"
        ));
    }
    if let Some(max) = facts.max_projects_per_user
        && !facts.limit_exempt
        && at_limit(facts)
    {
        return Err(format!(
            "user {user:?} already has {} projects and the template {:?} allows {max} per user",
            facts.user_projects, facts.template
        ));
    }
    Ok(())
}

/// Whether the user has as many projects as the template allows, or more.
fn at_limit(facts: &Facts) -> bool {
    facts
        .max_projects_per_user
        .is_some_and(|max| facts.user_projects >= usize::try_from(max).unwrap_or(0))
}

fn controlled_by_a_project(owners: &[OwnerReference]) -> bool {
    owners.iter().any(|r| {
        r.controller == Some(true) && r.kind == "Project" && r.api_version.starts_with("tenancy.chassis.dev/")
    })
}

/// Asks the API server whether the requester may `use` the template, so a platform
/// team decides who gets which template (a `privileged` one, say) with plain RBAC.
async fn may_use_template(
    client: &Client,
    request: &AdmissionRequest<DynamicObject>,
    template: &str,
) -> Result<bool, kube::Error> {
    let attributes = ResourceAttributes {
        group: Some(ProjectTemplate::group(&()).into_owned()),
        resource: Some(ProjectTemplate::plural(&()).into_owned()),
        verb: Some("use".into()),
        name: Some(template.to_string()),
        ..Default::default()
    };
    may(client, request, attributes).await
}

/// Asks the API server whether the requester may do what `attributes` say.
async fn may(
    client: &Client,
    request: &AdmissionRequest<DynamicObject>,
    attributes: ResourceAttributes,
) -> Result<bool, kube::Error> {
    let info = &request.user_info;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: info.username.clone(),
            groups: info.groups.clone(),
            uid: info.uid.clone(),
            extra: info.extra.clone().map(|extra| extra.into_iter().collect()),
            resource_attributes: Some(attributes),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

async fn facts(
    client: &Client,
    caches: &Caches,
    admitted: &Mutex<Recent>,
    granted: &Granted,
    request: &AdmissionRequest<DynamicObject>,
) -> Result<Facts, kube::Error> {
    let user = request.user_info.username.clone().unwrap_or_default();
    let template = request
        .object
        .as_ref()
        .and_then(|o| o.data.get("spec"))
        .and_then(|s| s.get("template"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    // Read from the API server, not a cache: a namespace created a moment before the
    // Project must still be refused with a clear message.
    let foreign_namespace = Api::<Namespace>::all(client.clone())
        .get_opt(&request.name)
        .await?
        .is_some_and(|ns| !controlled_by_a_project(ns.owner_references()));
    // A template missing from the cache may just be new: ask the API server then.
    let found = match caches.template(&template) {
        Some(t) => Some(t),
        None => Api::<ProjectTemplate>::all(client.clone())
            .get_opt(&template)
            .await?
            .map(Arc::new),
    };
    let max = found.and_then(|t| t.spec.max_projects_per_user);
    let template_allowed = granted.allowed(request, &template, Instant::now()) || {
        let allowed = may_use_template(client, request, &template).await?;
        if allowed {
            granted.remember(request, &template, Instant::now());
        }
        allowed
    };
    let mut facts = Facts {
        template_allowed,
        foreign_namespace,
        max_projects_per_user: max,
        user_projects: 0,
        template,
        limit_exempt: false,
    };
    if max.is_none() {
        // Every project counts against a limit, whatever its template: one admitted here
        // is recorded too, so that a limited create right after counts it before the
        // watch has delivered it.
        if !request.dry_run
            && decide(&request.name, &user, &request.operation, &facts).is_ok()
            && !caches.project_exists(&request.name)
        {
            admitted.lock().await.record(&user, &request.name, Instant::now());
        }
        return Ok(facts);
    }
    // Until the cache has listed once, ask the API server, before the lock below: a
    // LIST of every Project under the one lock of all users would queue every limited
    // create behind it (past the API server's webhook timeout). What it cannot show
    // yet, projects admitted since, the lock's record of recent admissions adds.
    let listed = if caches.projects_listed() {
        None
    } else {
        Some(
            Api::<PartialObjectMeta<Project>>::all(client.clone())
                .list_metadata(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|p| requested_by(&p.metadata, &user))
                .map(ResourceExt::name_any)
                .collect(),
        )
    };
    // Limited creates are judged one at a time, and projects admitted moments ago count
    // even when the cache does not show them yet: two quick creates cannot both slip in.
    let mut exempt = None;
    loop {
        let mut recent = admitted.lock().await;
        let mut names = user_projects(
            &mut recent,
            &user,
            Instant::now(),
            |name, admitted| caches.project_seen_since(name, admitted),
            || caches.projects_of(&user).or_else(|| listed.clone()),
        );
        // A create of a name the user has already (a retry after a timeout) is not one
        // more: it gets the API server's AlreadyExists, not a refusal at the limit.
        names.remove(&request.name);
        facts.user_projects = names.len();
        if at_limit(&facts) && exempt.is_none() {
            // Asked with the lock let go (it is every user's), then counted again.
            drop(recent);
            exempt = Some(creates_namespaces(client, granted, request).await?);
            continue;
        }
        facts.limit_exempt = exempt.unwrap_or(false);
        let allowed = decide(&request.name, &user, &request.operation, &facts).is_ok();
        // A name already taken fails after admission (AlreadyExists): recorded, it would
        // count against the user's limit for RECENT_WINDOW without being a project.
        if allowed && !request.dry_run && !caches.project_exists(&request.name) {
            recent.record(&user, &request.name, Instant::now());
        }
        return Ok(facts);
    }
}

/// Whether the requester may create namespaces, which exempts them from the per-user
/// limit (a yes is reused for [`GRANT_TTL`]).
async fn creates_namespaces(
    client: &Client,
    granted: &Granted,
    request: &AdmissionRequest<DynamicObject>,
) -> Result<bool, kube::Error> {
    let now = Instant::now();
    if granted.allowed(request, CREATES_NAMESPACES, now) {
        return Ok(true);
    }
    let creates = ResourceAttributes {
        resource: Some("namespaces".into()),
        verb: Some("create".into()),
        ..Default::default()
    };
    let exempt = may(client, request, creates).await?;
    if exempt {
        granted.remember(request, CREATES_NAMESPACES, now);
    }
    Ok(exempt)
}

/// The projects `user` has, held against the limit: the record of recent admissions,
/// less those the watch has delivered since (`delivered`), and the cache (`read`),
/// read after that, so that every project the record drops is in what is read. Read
/// before (while this request waited for the lock, say), a project the watch
/// delivered meanwhile was in neither, and a burst of creates passed the limit.
fn user_projects(
    recent: &mut Recent,
    user: &str,
    now: Instant,
    delivered: impl Fn(&str, Instant) -> bool,
    read: impl FnOnce() -> Option<BTreeSet<String>>,
) -> BTreeSet<String> {
    let pending = recent.of(user, now, delivered);
    let mut names = read().unwrap_or_default();
    names.extend(pending);
    names
}

/// A live Project `user` requested.
fn requested_by(meta: &ObjectMeta, user: &str) -> bool {
    meta.deletion_timestamp.is_none()
        && meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(REQUESTER_ANNOTATION))
            .is_some_and(|r| r == user)
}

/// Watch caches of ProjectTemplates and of Projects (metadata only), so that admitting
/// a Project usually costs the API server no read: not for its template, and not a
/// LIST of every Project to count the requester's against `maxProjectsPerUser`. The
/// Project watch starts with the first limited create, so installs without a limit do
/// not pay for it. Until a cache has listed once, and for a template the cache does not
/// hold (it may be brand new), the webhook asks the API server.
#[derive(Clone)]
pub struct Caches {
    templates: Store<ProjectTemplate>,
    synced: Synced,
    projects: Arc<std::sync::OnceLock<Projects>>,
    client: Client,
    shutdown: CancellationToken,
}

/// Projects by their requester annotation and deletion mark.
struct Projects {
    store: Store<PartialObjectMeta<Project>>,
    synced: Synced,
    /// When the watch last delivered an event (made or changed, or deleted) per name,
    /// for [`Recent`]: kept for [`RECENT_WINDOW`].
    seen: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
}

/// Drives `stream` (after `InitialSync::reflect`) and `done` until `shutdown`.
fn drive<S: futures::Stream + Send + 'static>(
    stream: S,
    done: futures::future::BoxFuture<'static, ()>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let drive = futures::future::join(stream.for_each(|_| futures::future::ready(())), done);
        tokio::select! {
            _ = drive => {}
            () = shutdown.cancelled() => {}
        }
    });
}

impl Projects {
    fn start(client: &Client, shutdown: CancellationToken) -> Self {
        let mut sync = InitialSync::default();
        // Only the requester annotation and the deletion mark are read.
        let (store, stream) = sync.reflect_trimmed(
            Api::<PartialObjectMeta<Project>>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            |p: &mut PartialObjectMeta<Project>| {
                let meta = &mut p.metadata;
                meta.managed_fields = None;
                meta.labels = None;
                meta.owner_references = None;
                meta.finalizers = None;
                if let Some(annotations) = meta.annotations.as_mut() {
                    annotations.retain(|k, _| k == REQUESTER_ANNOTATION);
                }
            },
        );
        let synced = sync.flag();
        let seen: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
        let record = seen.clone();
        let stream = stream.inspect(move |event| {
            // Not a relist's objects: the store takes them only at its end, and a name
            // recorded as delivered must already be in what the store shows.
            let object = match event {
                Ok(watcher::Event::Apply(p) | watcher::Event::Delete(p)) => p,
                _ => return,
            };
            let now = Instant::now();
            let mut seen = record.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() >= 4096 {
                seen.retain(|_, at| now.saturating_duration_since(*at) < RECENT_WINDOW);
            }
            seen.insert(object.name_any(), now);
        });
        drive(stream, sync.done(), shutdown);
        Self { store, synced, seen }
    }

    /// Whether the watch delivered an event for `name` at or after `since`: the cache
    /// then counts the project (or knows it is gone).
    fn seen_since(&self, name: &str, since: Instant) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|at| *at >= since)
    }

    /// Whether a Project named `name` exists (whoever requested it), once listed.
    fn exists(&self, name: &str) -> bool {
        self.synced.get() && self.store.get(&ObjectRef::new(name)).is_some()
    }

    /// The live Projects `user` requested, once the cache has listed.
    fn of(&self, user: &str) -> Option<BTreeSet<String>> {
        self.synced.get().then(|| {
            self.store
                .state()
                .iter()
                .filter(|p| requested_by(&p.metadata, user))
                .map(|p| p.name_any())
                .collect()
        })
    }
}

impl Caches {
    /// Starts the template watch; the watches stop with `shutdown`.
    pub fn start(client: &Client, shutdown: CancellationToken) -> Self {
        let mut sync = InitialSync::default();
        let (templates, stream) = sync.reflect_trimmed(
            Api::<ProjectTemplate>::all(client.clone()),
            watcher::Config::default(),
            |t: &mut ProjectTemplate| t.metadata.managed_fields = None,
        );
        let synced = sync.flag();
        drive(stream, sync.done(), shutdown.clone());
        Self {
            templates,
            synced,
            projects: Arc::default(),
            client: client.clone(),
            shutdown,
        }
    }

    /// The live Projects `user` requested, once the Project cache has listed (it is
    /// started by the first call).
    fn projects_of(&self, user: &str) -> Option<BTreeSet<String>> {
        self.projects().of(user)
    }

    /// Whether the Project cache has listed once (it starts on first use).
    fn projects_listed(&self) -> bool {
        self.projects().synced.get()
    }

    fn projects(&self) -> &Projects {
        self.projects
            .get_or_init(|| Projects::start(&self.client, self.shutdown.clone()))
    }

    /// Whether the Project cache had word of `name` at or after `since`.
    fn project_seen_since(&self, name: &str, since: Instant) -> bool {
        self.projects.get().is_some_and(|p| p.seen_since(name, since))
    }

    /// Whether the Project cache holds a project named `name` (any requester): its
    /// create will fail with AlreadyExists.
    fn project_exists(&self, name: &str) -> bool {
        self.projects.get().is_some_and(|p| p.exists(name))
    }

    fn template(&self, name: &str) -> Option<Arc<ProjectTemplate>> {
        self.synced
            .get()
            .then(|| self.templates.get(&ObjectRef::new(name)))
            .flatten()
    }
}

/// How long a SubjectAccessReview that allowed a template is reused, like the API
/// server's own webhook authorizer cache. Refusals are never cached: a grant takes
/// effect at once.
const GRANT_TTL: Duration = Duration::from_secs(10);

/// Templates recently allowed, per requester identity.
#[derive(Debug, Default)]
pub struct Granted {
    allowed: std::sync::Mutex<HashMap<String, Instant>>,
}

impl Granted {
    fn key(request: &AdmissionRequest<DynamicObject>, template: &str) -> String {
        let info = &request.user_info;
        let mut groups = info.groups.clone().unwrap_or_default();
        groups.sort();
        let extra: BTreeSet<String> = info
            .extra
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", v.join(",")))
            .collect();
        serde_json::json!([info.username, info.uid, groups, extra, template]).to_string()
    }

    fn allowed(&self, request: &AdmissionRequest<DynamicObject>, template: &str, now: Instant) -> bool {
        let key = Self::key(request, template);
        let mut allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        allowed.retain(|_, at| now.saturating_duration_since(*at) < GRANT_TTL);
        allowed.contains_key(&key)
    }

    fn remember(&self, request: &AdmissionRequest<DynamicObject>, template: &str, now: Instant) {
        let key = Self::key(request, template);
        self.allowed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, now);
    }
}

/// How long an admitted project counts towards its user's limit at most while the
/// project watch has not delivered it: normally milliseconds (it is stored right after
/// admission and its watch event follows); longer only when the watch stalls, or when
/// the create failed after admission (then the user waits this long at their limit).
/// A fixed 30 s let a stalled watch admit one project over the limit after another.
const RECENT_WINDOW: Duration = Duration::from_secs(120);

/// Projects this webhook admitted that its watch has not delivered yet, per user. Each
/// replica knows only its own: the chart runs two that both serve admission, so a
/// burst of creates spread over them can pass the limit on each before their caches
/// show the other's (a known limit, in docs/projects.md).
#[derive(Debug, Default)]
pub struct Recent {
    admitted: HashMap<String, Vec<(String, Instant)>>,
    /// When the whole record was last cleared of entries older than the window.
    swept: Option<Instant>,
    /// When the record being full was last logged.
    full_warned: Option<Instant>,
}

impl Recent {
    fn prune(&mut self, now: Instant, delivered: &impl Fn(&str, Instant) -> bool) {
        self.admitted.retain(|_, names| {
            names.retain(|(name, at)| {
                now.saturating_duration_since(*at) < RECENT_WINDOW && !delivered(name, *at)
            });
            !names.is_empty()
        });
    }

    /// Names admitted for `user`, within the window, that the project watch has not
    /// delivered since (`delivered(name, admitted_at)`): once it has, the cache counts
    /// the project, or knows it was deleted again.
    pub fn of(&mut self, user: &str, now: Instant, delivered: impl Fn(&str, Instant) -> bool) -> Vec<String> {
        self.prune(now, &delivered);
        self.admitted
            .get(user)
            .map(|names| names.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    pub fn record(&mut self, user: &str, name: &str, now: Instant) {
        // Creates under templates without a limit are recorded too, and nothing may ask
        // for their user again: what is older than the window goes here as well.
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < RECENT_WINDOW;
        let full = self.admitted.len() >= MAX_RECENT_USERS && !self.admitted.contains_key(user);
        // At most once a second (unless full): many users within the window must not
        // make every create scan them all under the lock.
        if self.admitted.len() >= 1024
            && (full
                || self
                    .swept
                    .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)))
        {
            self.swept = Some(now);
            self.admitted.retain(|_, names| {
                names.retain(|(_, at)| fresh(at));
                !names.is_empty()
            });
        }
        // Still full of users admitted within the window: reviews from anything that can
        // reach the webhook (forged ones carry any user name) must not grow this without
        // bound. The user's create is admitted all the same; only the guard against a
        // burst outrunning the project watch is lost for it.
        if self.admitted.len() >= MAX_RECENT_USERS && !self.admitted.contains_key(user) {
            // Once a minute: a flood must not become one of log lines.
            if self
                .full_warned
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(60))
            {
                self.full_warned = Some(now);
                tracing::warn!(
                    users = self.admitted.len(),
                    "more users admitted within two minutes than recorded; is the webhook reachable by more than the API server?"
                );
            }
            return;
        }
        let names = self.admitted.entry(user.to_string()).or_default();
        names.retain(|(_, at)| fresh(at));
        names.push((name.to_string(), now));
    }
}

/// Users [`Recent`] holds at most: far more than a cluster's people create projects
/// within [`RECENT_WINDOW`]; a flood of forged reviews stops here.
const MAX_RECENT_USERS: usize = 16_384;

fn deny(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut denied = response.deny(message);
    denied.result.code = 403;
    denied.result.reason = "Forbidden".into();
    denied
}

async fn handle_mutate(review: AdmissionReview<DynamicObject>) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(err) => return AdmissionResponse::invalid(err.to_string()).into_review(),
    };
    let response = AdmissionResponse::from(&request);
    let ops = mutation(&request);
    if ops.is_empty() {
        return response.into_review();
    }
    let patch: Result<json_patch::Patch, _> = serde_json::from_value(Value::Array(ops));
    match patch
        .map_err(|e| e.to_string())
        .and_then(|p| response.clone().with_patch(p).map_err(|e| e.to_string()))
    {
        Ok(patched) => patched.into_review(),
        Err(err) => deny(
            response,
            format!("chassis could not build the admission patch: {err}"),
        )
        .into_review(),
    }
}

async fn handle_validate(
    client: Client,
    reserved: &ReservedNames,
    caches: Caches,
    admitted: Arc<Mutex<Recent>>,
    granted: Arc<Granted>,
    review: AdmissionReview<DynamicObject>,
) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(request) => request,
        Err(err) => return AdmissionResponse::invalid(err.to_string()).into_review(),
    };
    let response = AdmissionResponse::from(&request);
    if !matches!(request.operation, Operation::Create) {
        return response.into_review();
    }
    // Refused before any lookup: a name that can never pass gets its reason even while
    // the API server is too busy to answer the lookups.
    if let Some(refusal) = reserved.refusal(&request.name) {
        return deny(response, refusal).into_review();
    }
    if let Some(why) = unmutated(&request) {
        return platform_error(response, why).into_review();
    }
    let user = request.user_info.username.clone().unwrap_or_default();
    match facts(&client, &caches, &admitted, &granted, &request).await {
        Ok(facts) => match decide(&request.name, &user, &request.operation, &facts) {
            Ok(()) => response.into_review(),
            Err(message) => deny(response, message).into_review(),
        },
        Err(err) => {
            tracing::warn!(error = %err, project = %request.name, "admission lookup failed");
            lookup_failed(response, &err).into_review()
        }
    }
}

/// A lookup that failed (the API server busy, a timeout) refuses the create as an
/// internal error to retry, not as Forbidden: clients and GitOps tools take a 403 as
/// final. The API server's own message (it may name the operator's account) stays in
/// the operator's log.
fn lookup_failed(response: AdmissionResponse, err: &kube::Error) -> AdmissionResponse {
    let why = match err {
        kube::Error::Api(status) => format!("the API server answered {} {}", status.code, status.reason),
        other => other.to_string(),
    };
    platform_error(
        response,
        format!("chassis could not check the project, try again: {why}"),
    )
}

/// A refusal that is the platform's fault, to retry: `500 InternalError`.
fn platform_error(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut denied = response.deny(message);
    denied.result.code = 500;
    denied.result.reason = "InternalError".into();
    denied
}

/// The warp routes of both webhooks.
pub fn routes(
    client: Client,
    caches: Caches,
    reserved: ReservedNames,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone {
    let client = Arc::new(client);
    let reserved = Arc::new(reserved);
    let admitted = Arc::new(Mutex::new(Recent::default()));
    let granted = Arc::new(Granted::default());
    let mutate = warp::path(MUTATE_PATH)
        .and(warp::post())
        .and(warp::body::content_length_limit(3 * 1024 * 1024))
        .and(warp::body::json())
        .then(|review| async move { warp::reply::json(&handle_mutate(review).await) });
    let validate = warp::path(VALIDATE_PATH)
        .and(warp::post())
        .and(warp::body::content_length_limit(3 * 1024 * 1024))
        .and(warp::body::json())
        .then(move |review| {
            let client = client.as_ref().clone();
            let (caches, admitted, granted) = (caches.clone(), admitted.clone(), granted.clone());
            let reserved = reserved.clone();
            async move {
                let answer = handle_validate(client, &reserved, caches, admitted, granted, review).await;
                warp::reply::json(&answer)
            }
        });
    mutate.or(validate)
}

/// Project admission rules for `operations`: mutation needs CREATE and UPDATE (the
/// requester annotation is restored on updates), validation only judges creates.
fn rules(operations: &[&str]) -> Vec<RuleWithOperations> {
    vec![RuleWithOperations {
        api_groups: Some(vec![Project::group(&()).into_owned()]),
        api_versions: Some(vec![Project::version(&()).into_owned()]),
        resources: Some(vec![Project::plural(&()).into_owned()]),
        operations: Some(operations.iter().map(|o| o.to_string()).collect()),
        scope: Some("Cluster".into()),
    }]
}

/// When the mutating webhook is asked: on every create, and on an update only when the
/// requester annotation differs from the stored one (the one change it undoes). Other
/// updates never wait on it, so while the operator is down the garbage collector can
/// still drop its finalizers from a Project being deleted, and labels can change.
/// `set:` tells an empty value from a missing annotation.
pub fn mutation_conditions() -> Vec<MatchCondition> {
    let requester = |object: &str| {
        format!(
            "(has({object}.metadata.annotations) && '{REQUESTER_ANNOTATION}' in {object}.metadata.annotations \
             ? 'set:' + {object}.metadata.annotations['{REQUESTER_ANNOTATION}'] : 'unset')"
        )
    };
    vec![MatchCondition {
        name: "create-or-requester-changed".into(),
        expression: format!(
            "request.operation != 'UPDATE' || {} != {}",
            requester("object"),
            requester("oldObject")
        ),
    }]
}

fn client_config(base_url: &str, path: &str, ca_pem: &str) -> WebhookClientConfig {
    WebhookClientConfig {
        url: Some(format!("{}/{path}", base_url.trim_end_matches('/'))),
        ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
        service: None,
    }
}

/// The webhook configurations pointing at `base_url` (used for local development,
/// where the operator runs outside the cluster; the helm chart wires a Service).
pub fn configurations(
    base_url: &str,
    ca_pem: &str,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let meta = ObjectMeta {
        name: Some(CONFIGURATION_NAME.into()),
        labels: Some([("app.kubernetes.io/managed-by".to_string(), "chassis".to_string())].into()),
        ..Default::default()
    };
    let mutating = MutatingWebhookConfiguration {
        metadata: meta.clone(),
        webhooks: Some(vec![MutatingWebhook {
            name: "mutate.projects.tenancy.chassis.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: client_config(base_url, MUTATE_PATH, ca_pem),
            failure_policy: Some("Fail".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(5),
            rules: Some(rules(&["CREATE", "UPDATE"])),
            match_conditions: Some(mutation_conditions()),
            reinvocation_policy: Some("IfNeeded".into()),
            ..Default::default()
        }]),
    };
    let validating = ValidatingWebhookConfiguration {
        metadata: meta,
        webhooks: Some(vec![ValidatingWebhook {
            name: "validate.projects.tenancy.chassis.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: client_config(base_url, VALIDATE_PATH, ca_pem),
            failure_policy: Some("Fail".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(5),
            rules: Some(rules(&["CREATE"])),
            ..Default::default()
        }]),
    };
    (mutating, validating)
}

/// Applies both configurations (server-side apply, field manager `chassis-webhook`).
pub async fn register(client: &Client, base_url: &str, ca_pem: &str) -> Result<(), kube::Error> {
    let (mutating, validating) = configurations(base_url, ca_pem);
    let params = PatchParams::apply("chassis-webhook").force();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(CONFIGURATION_NAME, &params, &Patch::Apply(&mutating))
        .await?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(CONFIGURATION_NAME, &params, &Patch::Apply(&validating))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An AdmissionReview of a Project named `payments`, as the API server sends it.
    fn review(operation: &str, user: &str, object: Value, old: Option<Value>) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "1",
                "kind": {"group": "tenancy.chassis.dev", "version": "v1alpha1", "kind": "Project"},
                "resource": {"group": "tenancy.chassis.dev", "version": "v1alpha1", "resource": "projects"},
                "name": "payments",
                "operation": operation,
                "userInfo": {"username": user, "groups": ["developers"]},
                "object": object,
                "oldObject": old,
            }
        })
    }

    fn request(
        operation: &str,
        user: &str,
        object: Value,
        old: Option<Value>,
    ) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_value(review(operation, user, object, old)).expect("valid review");
        review.try_into().expect("has a request")
    }

    fn project(annotations: Value, spec: Value) -> Value {
        json!({"apiVersion": "tenancy.chassis.dev/v1alpha1", "kind": "Project",
               "metadata": {"name": "payments", "annotations": annotations}, "spec": spec})
    }

    /// Caches for `client` holding `templates` (name, spec), listed; the Project cache
    /// listed (empty) or not yet, as `projects_listed` says. Its watch delivers nothing.
    async fn caches(client: &Client, templates: &[(&str, Value)], projects_listed: bool) -> Caches {
        use kube::runtime::reflector;

        let (store, mut writer) = reflector::store::<ProjectTemplate>();
        for (name, spec) in templates {
            let template: ProjectTemplate = serde_json::from_value(json!({
                "apiVersion": "tenancy.chassis.dev/v1alpha1", "kind": "ProjectTemplate",
                "metadata": {"name": name}, "spec": spec
            }))
            .expect("a valid template");
            writer.apply_watcher_event(&watcher::Event::Apply(template));
        }
        let sync = InitialSync::default();
        let synced = sync.flag();
        sync.done().await;
        let (project_store, _) = reflector::store::<PartialObjectMeta<Project>>();
        let project_sync = InitialSync::default();
        let cache = Projects {
            store: project_store,
            synced: project_sync.flag(),
            seen: Arc::default(),
        };
        if projects_listed {
            project_sync.done().await;
        }
        let projects = Arc::new(std::sync::OnceLock::new());
        assert!(projects.set(cache).is_ok());
        Caches {
            templates: store,
            synced,
            projects,
            client: client.clone(),
            shutdown: CancellationToken::new(),
        }
    }

    /// The API server's answer to a read of something that does not exist.
    fn not_found() -> http::Response<kube::client::Body> {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404});
        http::Response::builder()
            .status(404)
            .body(kube::client::Body::from(
                serde_json::to_vec(&status).expect("json"),
            ))
            .expect("a response")
    }

    #[test]
    fn create_records_the_requester_and_makes_them_admin() {
        let ops = mutation(&request("CREATE", "alice", project(json!(null), json!({})), None));
        assert_eq!(
            ops,
            vec![
                json!({"op": "add", "path": "/metadata/annotations",
                       "value": {"tenancy.chassis.dev/requester": "alice"}}),
                json!({"op": "add", "path": "/spec/admins", "value": [{"kind": "User", "name": "alice"}]}),
            ]
        );
    }

    #[test]
    fn admins_of_the_wrong_shape_are_left_for_the_schema_to_refuse() {
        for spec in [
            json!({"admins": {"kind": "User", "name": "bob"}}),
            json!({"admins": "bob"}),
            json!([]),
        ] {
            let ops = mutation(&request(
                "CREATE",
                "alice",
                project(json!(null), spec.clone()),
                None,
            ));
            assert_eq!(
                ops,
                vec![json!({"op": "add", "path": "/metadata/annotations",
                            "value": {"tenancy.chassis.dev/requester": "alice"}})],
                "spec {spec} must reach the schema unchanged"
            );
        }
        for spec in [json!(null), json!({"admins": null}), json!({"admins": []})] {
            let ops = mutation(&request(
                "CREATE",
                "alice",
                project(json!(null), spec.clone()),
                None,
            ));
            assert_eq!(ops.len(), 2, "spec {spec}: the requester becomes the admin");
        }
    }

    #[test]
    fn a_forged_requester_on_create_is_overwritten() {
        let forged = project(
            json!({"tenancy.chassis.dev/requester": "admin"}),
            json!({"admins": [{"kind": "Group", "name": "x"}]}),
        );
        let ops = mutation(&request("CREATE", "alice", forged, None));
        assert_eq!(
            ops,
            vec![
                json!({"op": "add", "path": "/metadata/annotations/tenancy.chassis.dev~1requester", "value": "alice"})
            ],
            "explicit admins are kept"
        );
    }

    #[test]
    fn an_update_cannot_change_or_drop_the_requester() {
        let old = project(json!({"tenancy.chassis.dev/requester": "alice"}), json!({}));
        let changed = project(json!({"tenancy.chassis.dev/requester": "mallory"}), json!({}));
        let ops = mutation(&request("UPDATE", "alice", changed, Some(old.clone())));
        assert_eq!(
            ops,
            vec![
                json!({"op": "add", "path": "/metadata/annotations/tenancy.chassis.dev~1requester", "value": "alice"})
            ]
        );
        let dropped = project(json!({"other": "x"}), json!({}));
        let ops = mutation(&request("UPDATE", "alice", dropped, Some(old.clone())));
        assert_eq!(
            ops,
            vec![
                json!({"op": "add", "path": "/metadata/annotations/tenancy.chassis.dev~1requester", "value": "alice"})
            ]
        );
        let unchanged = mutation(&request("UPDATE", "bob", old.clone(), Some(old)));
        assert!(unchanged.is_empty(), "{unchanged:?}");
    }

    #[test]
    fn an_allowed_template_is_reused_briefly_and_only_for_the_same_identity() {
        let project = serde_json::json!({"metadata": {"name": "p"}});
        let alice = request("CREATE", "alice", project.clone(), None);
        let bob = request("CREATE", "bob", project, None);
        let granted = Granted::default();
        let t0 = Instant::now();
        assert!(
            !granted.allowed(&alice, "default", t0),
            "nothing is allowed before a review"
        );
        granted.remember(&alice, "default", t0);
        assert!(granted.allowed(&alice, "default", t0 + Duration::from_secs(9)));
        assert!(!granted.allowed(&alice, "privileged", t0), "per template");
        assert!(!granted.allowed(&bob, "default", t0), "per user");
        assert!(!granted.allowed(&alice, "default", t0 + GRANT_TTL), "expires");
    }

    #[test]
    fn the_record_of_recent_users_is_bounded() {
        let mut recent = Recent::default();
        let t0 = Instant::now();
        for user in 0..MAX_RECENT_USERS + 10 {
            recent.record(&format!("forged-{user}"), "p", t0);
        }
        assert_eq!(recent.admitted.len(), MAX_RECENT_USERS);
        // A user already recorded still is; once the window has passed, room is made.
        recent.record("forged-0", "q", t0);
        assert_eq!(recent.admitted["forged-0"].len(), 2);
        recent.record("alice", "p", t0 + RECENT_WINDOW);
        assert_eq!(recent.admitted.len(), 1);
    }

    #[test]
    fn the_record_forgets_what_is_older_than_the_window_without_being_asked() {
        let mut recent = Recent::default();
        let t0 = Instant::now();
        recent.record("alice", "old", t0);
        recent.record("alice", "new", t0 + RECENT_WINDOW);
        assert_eq!(recent.admitted["alice"].len(), 1);
        assert_eq!(recent.admitted["alice"][0].0, "new");
        // Past 1024 users, the others' expired entries go too.
        for user in 0..1024 {
            recent.record(&format!("user-{user}"), "p", t0);
        }
        recent.record("bob", "p", t0 + RECENT_WINDOW + Duration::from_secs(1));
        assert_eq!(
            recent.admitted.keys().filter(|u| u.starts_with("user-")).count(),
            0
        );
    }

    #[test]
    fn recently_admitted_projects_count_until_the_watch_delivers_them() {
        let start = Instant::now();
        let never = |_: &str, _: Instant| false;
        let mut recent = Recent::default();
        recent.record("alice", "one", start);
        recent.record("alice", "two", start + Duration::from_secs(20));
        recent.record("bob", "x", start);
        // A watch that stalls: they keep counting long after the moment it normally takes.
        assert_eq!(
            recent.of("alice", start + Duration::from_secs(100), never),
            vec!["one", "two"]
        );
        // Once the watch has delivered one since its admission (made, or made and
        // deleted again), the cache counts it, or knows it is gone.
        let delivered_one = |n: &str, admitted: Instant| n == "one" && admitted == start;
        assert_eq!(
            recent.of("alice", start + Duration::from_secs(101), delivered_one),
            vec!["two"]
        );
        assert_eq!(
            recent.of("alice", start + Duration::from_secs(102), never),
            vec!["two"]
        );
        // A create that failed after admission is never delivered: it stops counting at last.
        assert!(recent.of("bob", start + RECENT_WINDOW, never).is_empty());
        assert!(recent.of("carol", start, never).is_empty());
    }

    /// The race CI caught (three of six simultaneous creates admitted against a limit
    /// of 2): a create read the cache, waited for the lock, and meanwhile the watch
    /// delivered the two admitted before it; the record then dropped them as delivered
    /// and the stale read did not have them. The cache is now read after the record
    /// has dropped what the watch delivered.
    #[test]
    fn a_project_the_watch_delivers_while_a_create_waits_is_still_counted() {
        let start = Instant::now();
        let mut recent = Recent::default();
        recent.record("alice", "one", start);
        recent.record("alice", "two", start);
        // The watch delivers both (the cache shows them from then on) while the next
        // create waits for the lock; `delivered` is asked only under the lock.
        let watch_delivered = std::cell::Cell::new(false);
        let delivered = |_: &str, _: Instant| {
            watch_delivered.set(true);
            true
        };
        let cache = || {
            Some(if watch_delivered.get() {
                BTreeSet::from(["one".to_string(), "two".to_string()])
            } else {
                BTreeSet::new()
            })
        };
        let counted = user_projects(
            &mut recent,
            "alice",
            start + Duration::from_secs(1),
            delivered,
            cache,
        );
        assert_eq!(counted.len(), 2, "{counted:?}");
        // Not counted twice when both the cache and the record hold a project.
        let mut recent = Recent::default();
        recent.record("alice", "one", start);
        let both = user_projects(
            &mut recent,
            "alice",
            start,
            |_, _| false,
            || Some(BTreeSet::from(["one".to_string()])),
        );
        assert_eq!(both.len(), 1);
    }

    #[tokio::test]
    async fn the_per_user_count_comes_from_the_cache_of_live_projects() {
        use kube::core::PartialObjectMetaExt;
        use kube::runtime::reflector;

        let (store, mut writer) = reflector::store::<PartialObjectMeta<Project>>();
        let sync = InitialSync::default();
        let projects = Projects {
            store,
            synced: sync.flag(),
            seen: Arc::default(),
        };
        let cached = |name: &str, requester: Option<&str>, deleting: bool| {
            ObjectMeta {
                name: Some(name.into()),
                annotations: requester.map(|r| [(REQUESTER_ANNOTATION.to_string(), r.to_string())].into()),
                deletion_timestamp: deleting.then_some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                )),
                ..Default::default()
            }
            .into_response_partial::<Project>()
        };
        for project in [
            cached("a1", Some("alice"), false),
            cached("a2", Some("alice"), true),
            cached("b1", Some("bob"), false),
            cached("none", None, false),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(project));
        }
        assert_eq!(
            projects.of("alice"),
            None,
            "before the first list the API server is asked"
        );
        sync.done().await;
        // A create of a taken name fails after admission: it must not be recorded.
        assert!(projects.exists("b1") && !projects.exists("free"));
        assert_eq!(
            projects.of("alice"),
            Some(BTreeSet::from(["a1".to_string()])),
            "a project being deleted no longer counts"
        );
        assert_eq!(projects.of("carol"), Some(BTreeSet::new()));
    }

    /// The validating webhook's answer to `review` when every lookup fails (the API
    /// server unreachable): what it refuses before any lookup shows.
    async fn validate_offline(
        reserved: &ReservedNames,
        review: AdmissionReview<DynamicObject>,
    ) -> AdmissionResponse {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        drop(handle); // every request fails
        let client = Client::new(service, "default");
        let caches = caches(&client, &[], false).await;
        let answer = handle_validate(client, reserved, caches, Arc::default(), Arc::default(), review).await;
        answer.response.expect("a response")
    }

    /// Only a create whose requester annotation is the requesting user passes: one the
    /// mutating webhook never saw keeps what the client sent (or nothing), and the
    /// validating webhook refuses it before any lookup, as an error to retry.
    #[tokio::test]
    async fn a_create_the_mutating_webhook_never_saw_is_refused() {
        let create = |annotations: Value| request("CREATE", "alice", project(annotations, json!({})), None);
        assert_eq!(unmutated(&create(json!({REQUESTER_ANNOTATION: "alice"}))), None);
        for unseen in [json!(null), json!({}), json!({REQUESTER_ANNOTATION: "mallory"})] {
            let said = unmutated(&create(unseen.clone())).unwrap_or_default();
            assert!(
                said.contains("\"alice\"") && said.contains("did not run"),
                "{unseen}: {said}"
            );
        }
        // An anonymous create is recorded with the empty name, as the mutation does.
        let anonymous = request(
            "CREATE",
            "",
            project(json!({REQUESTER_ANNOTATION: ""}), json!({})),
            None,
        );
        assert_eq!(unmutated(&anonymous), None);

        let forged = review(
            "CREATE",
            "alice",
            project(json!({REQUESTER_ANNOTATION: "mallory"}), json!({})),
            None,
        );
        let forged = serde_json::from_value(forged).expect("valid review");
        let response = validate_offline(&ReservedNames::default(), forged).await;
        assert!(!response.allowed);
        // The platform's fault: an error clients retry, not a final Forbidden.
        assert_eq!(response.result.code, 500, "{}", response.result.message);
        assert_eq!(response.result.reason, "InternalError");
        assert!(
            response.result.message.contains("did not run"),
            "{}",
            response.result.message
        );
    }

    /// A reserved name is refused with its reason even when no lookup can be answered
    /// (the API server overloaded): not with "could not check, try again".
    #[tokio::test]
    async fn a_reserved_name_is_refused_before_any_lookup() {
        let mut review = review("CREATE", "alice", project(json!(null), json!({})), None);
        review["request"]["name"] = json!("kube-tools");
        review["request"]["object"]["metadata"]["name"] = json!("kube-tools");
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(review).expect("valid review");
        let reserved = ReservedNames::parse(&["ingress-nginx".into(), "openshift-*".into()]).expect("valid");
        for name in ["kube-tools", "ingress-nginx", "openshift-monitoring"] {
            let mut review = review.clone();
            review.request.as_mut().expect("a request").name = name.into();
            let response = validate_offline(&reserved, review).await;
            assert!(!response.allowed);
            assert_eq!(response.result.code, 403);
            assert!(
                response.result.message.contains("is reserved"),
                "{}",
                response.result.message
            );
        }
    }

    #[test]
    fn reserved_names_are_names_or_prefixes_of_namespace_names() {
        let reserved =
            ReservedNames::parse(&[" argocd ".into(), "openshift-*".into(), String::new()]).expect("valid");
        for name in [
            "default",
            "kube-system",
            "kube-anything",
            "chassis-system",
            "argocd",
            "openshift-ingress",
        ] {
            assert!(reserved.refusal(name).is_some(), "{name}");
        }
        for name in ["argocd-apps", "openshif", "team-a"] {
            assert_eq!(reserved.refusal(name), None, "{name}");
        }
        let said = reserved.refusal("openshift-x").unwrap_or_default();
        assert!(said.contains("names \"openshift-*\""), "{said}");
        for bad in ["*", "Ingress", "a/b", "-x", "a*b"] {
            let err = ReservedNames::parse(&[bad.into()]).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    /// A project made from a template without a limit counts against a limited one at
    /// once (before the watch delivers it), and a create of a name the user already has
    /// is not counted as one more (it gets AlreadyExists, not "at the limit").
    #[tokio::test]
    async fn every_admitted_project_counts_and_a_retried_name_is_not_one_more() {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        // Every lookup (the namespace of the project's name) finds nothing, and alice
        // may not create namespaces (asked once she is at the limit).
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                if request.uri().path().ends_with("/subjectaccessreviews") {
                    let review = json!({"apiVersion": "authorization.k8s.io/v1",
                        "kind": "SubjectAccessReview", "spec": {}, "status": {"allowed": false}});
                    let body = kube::client::Body::from(serde_json::to_vec(&review).expect("json"));
                    respond.send_response(http::Response::builder().body(body).expect("a response"));
                } else {
                    respond.send_response(not_found());
                }
            }
        });
        let templates = [
            ("sandbox", json!({})),
            ("default", json!({"maxProjectsPerUser": 2})),
        ];
        let caches = caches(&client, &templates, true).await;
        let admitted = Mutex::new(Recent::default());
        let granted = Granted::default();
        let create = |name: &str, template: &str| {
            let mut r = request(
                "CREATE",
                "alice",
                project(json!(null), json!({"template": template})),
                None,
            );
            r.name = name.to_string();
            granted.remember(&r, template, Instant::now());
            r
        };

        let sandbox = create("sandbox-one", "sandbox");
        let facts_of = |r| facts(&client, &caches, &admitted, &granted, r);
        assert_eq!(
            facts_of(&sandbox).await.expect("facts").max_projects_per_user,
            None
        );
        let first = create("payments", "default");
        let counted = facts_of(&first).await.expect("facts");
        assert_eq!(
            counted.user_projects, 1,
            "the project under the unlimited template counts before the watch delivers it"
        );
        assert!(decide("payments", "alice", &Operation::Create, &counted).is_ok());
        // The same name again (a client that timed out and retries): still 1, not 2.
        let again = create("payments", "default");
        let retried = facts_of(&again).await.expect("facts");
        assert_eq!(retried.user_projects, 1);
        // A third distinct project is the one over the limit.
        let billing = create("billing", "default");
        let third = facts_of(&billing).await.expect("facts");
        assert_eq!(third.user_projects, 2);
        assert!(decide("billing", "alice", &Operation::Create, &third).is_err());
    }

    /// Before the Project cache has listed, each limited create LISTs the Projects; the
    /// lock that serialises the decisions must not be held across that LIST, or every
    /// create queues behind the one before it (past the API server's webhook timeout).
    #[tokio::test]
    async fn limited_creates_do_not_wait_for_each_others_project_list() {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let caches = caches(&client, &[("default", json!({"maxProjectsPerUser": 5}))], false).await;
        let admitted = Mutex::new(Recent::default());
        let granted = Granted::default();
        let alice = request("CREATE", "alice", project(json!(null), json!({})), None);
        let bob = request("CREATE", "bob", project(json!(null), json!({})), None);
        for r in [&alice, &bob] {
            granted.remember(r, "default", Instant::now());
        }

        // The mock ends with the server: a request it never answers fails, not hangs.
        let server = async move {
            let mut lists = Vec::new();
            while lists.len() < 2 {
                let Ok(Some((request, respond))) =
                    tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
                else {
                    return lists.len();
                };
                if request.uri().path().ends_with("/projects") {
                    lists.push(respond); // answered once both arrived
                } else {
                    respond.send_response(not_found());
                }
            }
            for respond in lists.drain(..) {
                let empty = json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                                   "metadata": {"resourceVersion": "1"}, "items": []});
                respond.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&empty).expect("json")))
                        .expect("a response"),
                );
            }
            2
        };
        let (lists_in_flight, a, b) = tokio::join!(
            server,
            facts(&client, &caches, &admitted, &granted, &alice),
            facts(&client, &caches, &admitted, &granted, &bob),
        );
        assert_eq!(
            lists_in_flight, 2,
            "both LISTs were sent before either was answered"
        );
        for facts in [a.expect("alice's facts"), b.expect("bob's facts")] {
            assert_eq!(facts.max_projects_per_user, Some(5));
            assert_eq!(facts.user_projects, 0);
        }
    }

    #[test]
    fn a_failed_lookup_is_an_internal_error_to_retry_not_forbidden() {
        let alice = request("CREATE", "alice", project(json!(null), json!({})), None);
        let busy = kube::Error::Api(
            kube::core::Status::failure(
                "User \"system:serviceaccount:chassis-system:chassis-operator\" is throttled",
                "TooManyRequests",
            )
            .with_code(429)
            .boxed(),
        );
        let answer = lookup_failed(AdmissionResponse::from(&alice), &busy);
        assert!(!answer.allowed);
        assert_eq!(
            (answer.result.code, answer.result.reason.as_str()),
            (500, "InternalError")
        );
        assert!(
            answer.result.message.contains("try again"),
            "{}",
            answer.result.message
        );
        assert!(
            answer.result.message.contains("429 TooManyRequests"),
            "{}",
            answer.result.message
        );
        assert!(
            !answer.result.message.contains("serviceaccount"),
            "{}",
            answer.result.message
        );
    }

    #[test]
    fn foreign_names_and_the_per_user_limit_are_refused() {
        let create = Operation::Create;
        let none = Facts {
            template_allowed: true,
            ..Default::default()
        };
        let foreign = Facts {
            foreign_namespace: true,
            ..none.clone()
        };
        assert!(decide("legacy", "alice", &create, &foreign).is_err());
        let at_limit = Facts {
            max_projects_per_user: Some(2),
            user_projects: 2,
            template: "default".into(),
            ..none.clone()
        };
        let err = decide("third", "alice", &create, &at_limit).expect_err("over the limit");
        assert_eq!(
            err,
            "user \"alice\" already has 2 projects and the template \"default\" allows 2 per user"
        );
        let below = Facts {
            user_projects: 1,
            ..at_limit.clone()
        };
        assert!(decide("second", "alice", &create, &below).is_ok());
        let creates_namespaces = Facts {
            limit_exempt: true,
            ..at_limit.clone()
        };
        assert!(
            decide("third", "argocd", &create, &creates_namespaces).is_ok(),
            "the limit is for self-service"
        );
        assert!(
            decide("default", "alice", &Operation::Update, &at_limit).is_ok(),
            "updates are not re-judged"
        );
        let not_granted = Facts {
            template: "privileged".into(),
            ..Default::default()
        };
        let err = decide("mine", "alice", &create, &not_granted).expect_err("template not granted");
        assert!(
            err.contains("may not use the ProjectTemplate \"privileged\""),
            "{err}"
        );
    }
}
