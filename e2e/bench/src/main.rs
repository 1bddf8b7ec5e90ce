//! chassis-bench owns the project benchmark of docs/BENCHMARKS.md: N Projects created
//! at once and reconciled by chassis-operator, against a "floor" client that creates
//! exactly the same child objects directly. Write counts come from the API server's
//! own `apiserver_request_total`, so they include every request, retries too.
//! `e2e/bench/projects.sh` gives each phase a fresh control plane and calls `report`.

mod metrics;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chassis_api::tenancy::REQUESTER_ANNOTATION;
use chassis_api::tenancy::v1alpha1::{
    Project, ProjectSpec, ProjectTemplate, ProjectTemplateSpec, Subject, SubjectKind,
};
use chassis_tenancy::project::build;
use clap::{Parser, Subcommand};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};

const LABEL: &str = "chassis.dev/bench";
const TEMPLATE: &str = "bench";

#[derive(Parser)]
#[command(about = "Chassis benchmarks against the local control plane")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Admin kubeconfig of the control plane.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Number of projects.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Requests the client keeps in flight (`projects.sh` gives the floor its fastest).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Where the phase writes its result (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Folder of the control plane's pid files, for CPU time per component.
    #[arg(long)]
    pids: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create every project's child objects directly: the floor.
    Floor(Common),
    /// Create only the Projects, with no operator and no webhooks: what the API server
    /// alone spends on the custom resources.
    ProjectsOnly(Common),
    /// Create the Projects and let chassis-operator make the children.
    Operator {
        #[command(flatten)]
        common: Common,
        /// The chassis-operator binary (a release build).
        #[arg(long)]
        operator: PathBuf,
        /// Folder for the operator's log.
        #[arg(long)]
        logs: PathBuf,
        /// Seconds to stay idle once every project is Ready.
        #[arg(long, default_value_t = 120)]
        idle: u64,
        /// Serve and register the admission webhooks (what users run); `false` shows
        /// their cost.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        webhooks: bool,
    },
    /// Write the two results into docs/BENCHMARKS.md.
    Report {
        /// One result per round (repeat the flag).
        #[arg(long, required = true)]
        floor: Vec<PathBuf>,
        /// One result per round (repeat the flag); the last one holds the idle window.
        #[arg(long, required = true)]
        operator: Vec<PathBuf>,
        #[arg(long)]
        projects_only: PathBuf,
        #[arg(long)]
        doc: PathBuf,
        /// The command that produced the results, for the record.
        #[arg(long)]
        command: String,
    },
}

/// What one phase measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub count: usize,
    pub concurrency: usize,
    /// From the first create until the last project is Ready (floor: created).
    pub millis: u128,
    /// Write requests the API server served during the phase, by resource and verb.
    pub writes: metrics::Counts,
    /// Single-object reads (GET) the API server served during the phase.
    #[serde(default)]
    pub reads: metrics::Counts,
    /// Watches the API server closed during the phase because their client fell
    /// behind (by resource); each makes its client watch again and lag meanwhile.
    /// The counter has no client label: the benchmark's own Project watch counts too
    /// (see `bench_watch_restarts`).
    #[serde(default)]
    pub closed_watches: metrics::Counts,
    /// Writes in the 10 s after the last project was Ready (operator phase): not part
    /// of the comparison with the floor, but counted for writes per child.
    #[serde(default)]
    pub settle_writes: metrics::Counts,
    /// Times the benchmark's own watch of the Projects failed or started over: its lag
    /// would stop the clock late.
    #[serde(default)]
    pub bench_watch_restarts: u64,
    /// Whether the admission webhooks were served (operator phase).
    #[serde(default)]
    pub webhooks: Option<bool>,
    /// Writes while idle (operator phase only).
    pub idle_writes: Option<metrics::Counts>,
    pub idle_seconds: Option<u64>,
    pub rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    /// Until the last create returned.
    pub created_millis: u128,
    /// CPU seconds each process used during the timed part.
    pub cpu_seconds: std::collections::BTreeMap<String, f64>,
}

/// User plus system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds of the control plane's processes (and `extra`), by name.
fn cpu_snapshot(pids: &Path, extra: &[(&str, u32)]) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        let pid = std::fs::read_to_string(pids.join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(seconds) = pid.and_then(cpu_seconds) {
            out.insert(name.to_string(), seconds);
        }
    }
    for (name, pid) in extra {
        if let Some(seconds) = cpu_seconds(*pid) {
            out.insert((*name).to_string(), seconds);
        }
    }
    out.insert(
        "chassis-bench (client)".into(),
        cpu_seconds(std::process::id()).unwrap_or(0.0),
    );
    out
}

fn cpu_delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Floor(common) => {
            let phase = floor(&common).await?;
            write(&common.out, &phase)
        }
        Cmd::ProjectsOnly(common) => {
            let phase = projects_only(&common).await?;
            write(&common.out, &phase)
        }
        Cmd::Operator {
            common,
            operator,
            logs,
            idle,
            webhooks,
        } => {
            let phase = with_operator(&common, &operator, &logs, idle, webhooks).await?;
            write(&common.out, &phase)
        }
        Cmd::Report {
            floor,
            operator,
            projects_only,
            doc,
            command,
        } => report::write(
            &floor.iter().map(|p| read(p)).collect::<Result<Vec<_>>>()?,
            &read(&projects_only)?,
            &operator.iter().map(|p| read(p)).collect::<Result<Vec<_>>>()?,
            &doc,
            &command,
        ),
    }
}

fn write(path: &Path, phase: &Phase) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(phase)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn read(path: &Path) -> Result<Phase> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// The template every bench project uses: all six children (namespace, three
/// RoleBindings, quota, limits).
fn template() -> Result<ProjectTemplate> {
    let spec: ProjectTemplateSpec = serde_json::from_value(serde_json::json!({
        "podSecurity": "baseline",
        "labels": {"chassis.dev/tier": "bench"},
        "resourceQuota": {"hard": {"pods": "20", "requests.cpu": "4", "requests.memory": "8Gi"}},
        "limitRange": {"limits": [{"type": "Container",
            "default": {"cpu": "500m", "memory": "512Mi"},
            "defaultRequest": {"cpu": "100m", "memory": "128Mi"}}]}
    }))?;
    Ok(ProjectTemplate::new(TEMPLATE, spec))
}

fn project(i: usize) -> Project {
    let subject = |kind, name: &str| Subject {
        kind,
        name: name.into(),
        namespace: None,
    };
    let mut project = Project::new(
        &format!("bench-{i:05}"),
        ProjectSpec {
            template: TEMPLATE.into(),
            admins: vec![subject(SubjectKind::User, "alice")],
            editors: vec![subject(SubjectKind::Group, "team-a")],
            viewers: vec![subject(SubjectKind::Group, "auditors")],
            ..Default::default()
        },
    );
    project.labels_mut().insert(LABEL.into(), "projects".into());
    project
}

/// Creates a child as the operator does: a POST under the operator's create manager,
/// so the stored object (managedFields included) is the same.
async fn post<K>(api: Api<K>, object: K) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PostParams {
        field_manager: Some(chassis_runtime::apply::create_manager(
            &chassis_runtime::context::field_manager(chassis_tenancy::project::NAME),
        )),
        ..Default::default()
    };
    api.create(&params, &object)
        .await
        .with_context(|| format!("creating {} {}", K::kind(&()), object.name_any()))?;
    Ok(())
}

/// The user name the API server gives this client: what the admission webhook records
/// as requester in the operator phase.
async fn whoami(client: &Client) -> Result<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("asking the API server who the benchmark client is")?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .context("the SelfSubjectReview names no user")
}

/// The floor: every Project and its children, built by the operator's own builders
/// (owner references included), created directly by this client: the Project, its
/// namespace, then its five children, `concurrency` projects in flight. No operator
/// runs and no webhooks are registered.
async fn floor(common: &Common) -> Result<Phase> {
    let client = client(&common.kubeconfig).await?;
    let template = template()?;
    let requester = whoami(&client).await?;
    let work = futures::stream::iter(0..common.count)
        .map(|i| {
            let (client, template, requester) = (client.clone(), &template, &requester);
            async move {
                let mut project = project(i);
                project
                    .annotations_mut()
                    .insert(REQUESTER_ANNOTATION.into(), requester.clone());
                let project = Api::<Project>::all(client.clone())
                    .create(&PostParams::default(), &project)
                    .await
                    .with_context(|| format!("creating project {}", project.name_any()))?;
                let ns = project.name_any();
                post(
                    Api::<Namespace>::all(client.clone()),
                    build::namespace(&project, template),
                )
                .await?;
                for (_, binding) in build::role_bindings(&project, template) {
                    if let Some(binding) = binding {
                        post(Api::<RoleBinding>::namespaced(client.clone(), &ns), binding).await?;
                    }
                }
                if let Some(quota) = build::resource_quota(&project, template) {
                    post(Api::<ResourceQuota>::namespaced(client.clone(), &ns), quota).await?;
                }
                if let Some(limits) = build::limit_range(&project, template) {
                    post(Api::<LimitRange>::namespaced(client.clone(), &ns), limits).await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(common.concurrency)
        .try_collect::<()>();
    timed(common, &client, work).await
}

/// Runs `work` and measures it: time, the API server's write counters, CPU seconds.
async fn timed(common: &Common, client: &Client, work: impl Future<Output = Result<()>>) -> Result<Phase> {
    let before = metrics::scrape(client).await?;
    let cpu_before = cpu_snapshot(&common.pids, &[]);
    let start = Instant::now();
    work.await?;
    let millis = start.elapsed().as_millis();
    let cpu = cpu_delta(&cpu_before, &cpu_snapshot(&common.pids, &[]));
    let after = metrics::scrape(client).await?;
    Ok(Phase {
        count: common.count,
        concurrency: common.concurrency,
        millis,
        writes: after.writes_since(&before),
        reads: after.reads_since(&before),
        closed_watches: after.closed_watches_since(&before),
        settle_writes: Default::default(),
        bench_watch_restarts: 0,
        webhooks: None,
        idle_writes: None,
        idle_seconds: None,
        rss_kib: None,
        peak_rss_kib: None,
        created_millis: millis,
        cpu_seconds: cpu,
    })
}

async fn create_projects(projects: &Api<Project>, common: &Common) -> Result<()> {
    futures::stream::iter(0..common.count)
        .map(|i| {
            let projects = projects.clone();
            async move {
                projects
                    .create(&PostParams::default(), &project(i))
                    .await
                    .with_context(|| format!("creating project bench-{i:05}"))
            }
        })
        .buffer_unordered(common.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

async fn projects_only(common: &Common) -> Result<Phase> {
    let client = client(&common.kubeconfig).await?;
    let projects = Api::all(client.clone());
    timed(common, &client, create_projects(&projects, common)).await
}

/// The operator subprocess, killed when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

async fn start_operator(binary: &Path, common: &Common, logs: &Path, webhooks: bool) -> Result<Operator> {
    std::fs::create_dir_all(logs)?;
    let log = std::fs::File::create(logs.join("bench-operator.log"))?;
    let metrics_port = free_port()?;
    let webhook = format!("127.0.0.1:{}", free_port()?);
    let mut command = Command::new(binary);
    command.arg("--kubeconfig").arg(&common.kubeconfig).args([
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--log-format",
        "json",
    ]);
    if webhooks {
        command.args(["--webhook-addr", &webhook, "--webhook-register"]);
    }
    let child = command
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let operator = Operator(child);
    let ready = format!("http://127.0.0.1:{metrics_port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .is_ok();
        if up && http_ok(metrics_port).await {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "chassis-operator did not become ready at {ready} within 60 s; see its log in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(operator)
}

/// `GET /readyz` answered 200 (plain HTTP/1.0, no client library needed).
async fn http_ok(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
}

/// Waits until admission answers: a server-side dry-run create passes with the requester
/// recorded.
async fn wait_for_admission(client: &Client) -> Result<()> {
    let api: Api<Project> = Api::all(client.clone());
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // The API server loads the two webhook configurations on its own schedule: the
    // mutating one has run once the dry run comes back with the requester recorded.
    loop {
        let answer = api.create(&params, &project(0)).await;
        let mutated = answer
            .as_ref()
            .is_ok_and(|p| p.annotations().contains_key(REQUESTER_ANNOTATION));
        if mutated {
            return Ok(());
        }
        if Instant::now() > deadline {
            return match answer {
                Err(err) => Err(err).context("Project admission did not answer within 60 s"),
                Ok(_) => bail!("Project admission did not record the requester within 60 s"),
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is_ready(project: &Project) -> bool {
    project.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == chassis_api::conditions::READY && c.status == "True")
    })
}

async fn with_operator(
    common: &Common,
    binary: &Path,
    logs: &Path,
    idle: u64,
    webhooks: bool,
) -> Result<Phase> {
    let client = client(&common.kubeconfig).await?;
    Api::<ProjectTemplate>::all(client.clone())
        .patch(
            TEMPLATE,
            &PatchParams::apply("chassis-bench"),
            &Patch::Apply(template()?),
        )
        .await
        .context("applying the bench ProjectTemplate")?;
    let mut operator = start_operator(binary, common, logs, webhooks).await?;
    if webhooks {
        wait_for_admission(&client).await?;
    }

    let projects: Api<Project> = Api::all(client.clone());
    let ready = Arc::new(AtomicUsize::new(0));
    let watch = {
        let (ready, count) = (ready.clone(), common.count);
        let config = watcher::Config::default().labels(&format!("{LABEL}=projects"));
        let stream = watcher(projects.clone(), config);
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut stream = std::pin::pin!(stream);
            // The first list is the start; any later one, or an error, is a restart.
            let (mut inits, mut errors) = (0u64, 0u64);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => inits += 1,
                    Err(_) => errors += 1,
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) if is_ready(&p) => {
                        seen.insert(p.name_any());
                        ready.store(seen.len(), Ordering::SeqCst);
                        if seen.len() == count {
                            return (Instant::now(), inits.saturating_sub(1) + errors);
                        }
                    }
                    Ok(_) => {}
                }
            }
            (Instant::now(), inits.saturating_sub(1) + errors)
        })
    };

    let pid = operator.0.id();
    let before = metrics::scrape(&client).await?;
    let cpu_before = cpu_snapshot(&common.pids, &[("chassis-operator", pid)]);
    let start = Instant::now();
    create_projects(&projects, common).await?;
    let created_millis = start.elapsed().as_millis();
    let (done, bench_watch_restarts) = tokio::time::timeout(Duration::from_secs(900), watch)
        .await
        .with_context(|| {
            format!(
                "only {} of {} projects were Ready after 15 minutes",
                ready.load(Ordering::SeqCst),
                common.count
            )
        })??;
    let millis = done.duration_since(start).as_millis();
    let cpu = cpu_delta(
        &cpu_before,
        &cpu_snapshot(&common.pids, &[("chassis-operator", pid)]),
    );
    // Counted up to the same moment as the time and the CPU seconds (and as the floor's),
    // so rates and the comparison with the floor cover one window.
    let at_ready = metrics::scrape(&client).await?;

    // Let trailing writes (the last status patches, events) land before the idle window.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let settled = metrics::scrape(&client).await?;
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let idle_end = metrics::scrape(&client).await?;
    // A dead operator writes nothing and holds no memory: that must not read as "idle"
    // and "small".
    if let Some(exit) = operator.0.try_wait()? {
        bail!(
            "chassis-operator exited ({exit}) before the end of the phase; see {}",
            logs.join("bench-operator.log").display()
        );
    }
    let (rss_kib, peak_rss_kib) = (status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM"));
    if peak_rss_kib.is_none() {
        bail!("could not read chassis-operator's memory from /proc/{pid}/status");
    }
    Ok(Phase {
        count: common.count,
        concurrency: common.concurrency,
        millis,
        writes: at_ready.writes_since(&before),
        reads: at_ready.reads_since(&before),
        closed_watches: at_ready.closed_watches_since(&before),
        settle_writes: settled.writes_since(&at_ready),
        bench_watch_restarts,
        webhooks: Some(webhooks),
        idle_writes: Some(idle_end.writes_since(&settled)),
        idle_seconds: Some(idle),
        rss_kib,
        peak_rss_kib,
        created_millis,
        cpu_seconds: cpu,
    })
}
