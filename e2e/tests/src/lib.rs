//! The end-to-end harness: it starts (or reuses) the real local control plane from
//! `e2e/cluster`, installs the committed CRDs, runs the real `chassis-operator` binary
//! as a subprocess, and offers waits that fail with the object and the operator's
//! recent log lines.
//!
//! Only plain data lives in statics (paths, ports): every `#[tokio::test]` has its
//! own runtime, so each test builds its own `kube::Client`.

use std::fmt::Debug;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

/// Where the cluster keeps its state, kubeconfigs and logs.
pub fn state_dir() -> PathBuf {
    std::env::var_os("CHASSIS_E2E_DIR").map_or_else(|| repo_root().join("target/e2e"), PathBuf::from)
}

/// The started cluster: kubeconfig paths and the folder of its binaries.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
}

impl Cluster {
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Kubeconfig with a token of the chart's ServiceAccount: what every operator the
    /// tests start runs as, so the suite proves the chart's RBAC is enough.
    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig-operator")
    }

    pub fn kubeconfig_of(&self, user: &str) -> PathBuf {
        self.dir.join(format!("kubeconfig-{user}"))
    }

    /// A `kubectl` command against this cluster as cluster admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        cmd
    }

    /// A `helm` command against this cluster as cluster admin.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("helm"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        // Keep helm's caches and config out of the user's home.
        let home = self.dir.join("helm");
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// A client as cluster admin.
    pub async fn admin(&self) -> Result<Client> {
        client_from(&self.kubeconfig()).await
    }

    /// A client as `user` (`alice` or `bob`, both in group `developers`).
    pub async fn user(&self, user: &str) -> Result<Client> {
        client_from(&self.kubeconfig_of(user)).await
    }

    /// A client acting as any `user` in group `developers` (the admin impersonates
    /// them), so that per-user counts of parallel tests do not mix.
    pub async fn developer(&self, user: &str) -> Result<Client> {
        let kc = Kubeconfig::read_from(self.kubeconfig())?;
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(vec!["developers".to_string()]);
        Ok(Client::try_from(config)?)
    }
}

/// Builds a client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Runs `cmd` to completion; its stdout, or an error with its output.
pub fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_env(dir: &Path, key: &str) -> Result<String> {
    let env = std::fs::read_to_string(dir.join("env")).context("reading the cluster's env file")?;
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().trim_matches('"').to_string())
        .with_context(|| format!("{key} missing from the cluster's env file"))
}

fn start_cluster() -> Result<Cluster> {
    let root = repo_root();
    run(
        Command::new("bash")
            .arg(root.join("e2e/cluster/up.sh"))
            .stdout(Stdio::piped()),
        "e2e/cluster/up.sh",
    )?;
    let dir = state_dir();
    let cluster = Cluster {
        bin: PathBuf::from(read_env(&dir, "CHASSIS_BIN")?),
        dir,
    };
    // What is installed is what is committed: `make test` checks crds/ is current.
    run(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(root.join("crds")),
        "installing CRDs",
    )?;
    // Self-service as the demo sets it up: group `developers` may create projects.
    run(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(root.join("examples/rbac-self-provisioner.yaml")),
        "granting self-service to developers",
    )?;
    run(
        cluster
            .kubectl()
            .args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
            .arg(root.join("crds")),
        "waiting for CRDs",
    )?;
    chart_identity(&cluster)?;
    Ok(cluster)
}

/// Namespace and ServiceAccount the chart gives chassis-operator (release `chassis`).
pub const CHART_NAMESPACE: &str = "chassis-system";
pub const CHART_SERVICE_ACCOUNT: &str = "chassis-operator";

/// Gives the operators the tests start exactly the chart's permissions: the chart's
/// ServiceAccount, RBAC and the admission policy that keeps the operator's writes in
/// project namespaces are installed as `helm template` renders them, and a token
/// of that ServiceAccount goes into `kubeconfig-operator`. The webhook configurations
/// exist before the operator registers into them (the chart installs them; the
/// operator may only patch them).
fn chart_identity(cluster: &Cluster) -> Result<()> {
    let root = repo_root();
    let mut ns = cluster.kubectl();
    ns.args([
        "create",
        "namespace",
        CHART_NAMESPACE,
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    apply_stdin(cluster, &run(&mut ns, "rendering the chart namespace")?)?;
    let rbac = run(
        cluster
            .helm()
            .args(["template", "chassis"])
            .arg(root.join("charts/chassis"))
            .args(["-n", CHART_NAMESPACE])
            .args([
                "--show-only",
                "templates/serviceaccount.yaml",
                "--show-only",
                "templates/rbac.yaml",
                "--show-only",
                "templates/operator-scope.yaml",
            ]),
        "rendering the chart's RBAC",
    )?;
    apply_stdin(cluster, &rbac)?;
    for kind in ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"] {
        let empty = format!(
            "apiVersion: admissionregistration.k8s.io/v1\nkind: {kind}\nmetadata: {{name: chassis-tenancy}}\n"
        );
        let exists = cluster
            .kubectl()
            .args(["get", kind, "chassis-tenancy"])
            .output()?
            .status
            .success();
        if !exists {
            apply_stdin(cluster, &empty)?;
        }
    }
    let token = run(
        cluster.kubectl().args([
            "create",
            "token",
            CHART_SERVICE_ACCOUNT,
            "-n",
            CHART_NAMESPACE,
            "--duration=24h",
        ]),
        "creating a token of the chart's ServiceAccount",
    )?;
    let mut kubeconfig = Kubeconfig::read_from(cluster.kubeconfig())?;
    for named in kubeconfig.auth_infos.iter_mut() {
        named.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.trim().to_string().into()),
            ..Default::default()
        });
    }
    let yaml = serde_norway::to_string(&kubeconfig)?;
    let path = cluster.operator_kubeconfig();
    // It holds a token: readable by this user only, like up.sh's kubeconfigs.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An older file keeps its mode on open: set it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(yaml.as_bytes())?;
    Ok(())
}

fn apply_stdin(cluster: &Cluster, yaml: &str) -> Result<()> {
    let out = pipe(
        cluster
            .kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f", "-"]),
        yaml,
    )?;
    if !out.status.success() {
        bail!("kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Runs `cmd` with `input` on its stdin; its whole output, whatever the exit status.
pub fn pipe(cmd: &mut Command, input: &str) -> Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin of the child")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// The cluster, started or reused once per test binary, with the shared operator
/// running and its admission webhooks registered (they refuse Project writes while
/// no operator serves them).
pub fn cluster() -> &'static Cluster {
    let cluster = started_cluster();
    Operator::shared();
    cluster
}

fn started_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match start_cluster() {
        Ok(c) => c,
        Err(err) => panic!("the e2e cluster could not be started: {err:#}"),
    })
}

/// A name no other test (or earlier run) uses: `prefix-<pid>-<n>`, valid as a namespace.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos % 0xfff)
}

/// A Namespace named `name` with `labels`, to create.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Namespace {
    k8s_openapi::api::core::v1::Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running `chassis-operator` subprocess. It dies with the test process: it is
/// started under a shell that kills it when its stdin (held by us) closes.
pub struct Operator {
    pub name: String,
    pub metrics_addr: String,
    pub log: PathBuf,
    child: Child,
}

fn operator_binary() -> Result<PathBuf> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
    let bin = target.join("debug/chassis-operator");
    if !bin.exists() {
        bail!(
            "{} is missing; run `cargo build -p chassis-operator` (make e2e does)",
            bin.display()
        );
    }
    Ok(bin)
}

impl Operator {
    /// Starts the operator against the cluster with the chart's permissions, with
    /// `extra` flags.
    pub fn start(name: &str, extra: &[&str]) -> Result<Self> {
        let kubeconfig = started_cluster().operator_kubeconfig();
        Self::start_with_kubeconfig(name, &kubeconfig, extra)
    }

    /// Starts the operator with the given kubeconfig (for RBAC-limited identities).
    pub fn start_with_kubeconfig(name: &str, kubeconfig: &Path, extra: &[&str]) -> Result<Self> {
        let bin = operator_binary()?;
        let logs = state_dir().join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("operator-{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#""$@" </dev/null & pid=$!; trap 'kill -TERM $pid' TERM; while read -r _; do :; done; kill -TERM $pid 2>/dev/null; wait $pid"#)
            .arg("sh")
            .arg(bin)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            // Port 0: the operator binds and logs the address, so no other process can
            // take a port picked in advance between the pick and the bind.
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info,chassis=debug")
            .stdin(Stdio::piped())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting chassis-operator")?;
        let mut op = Self {
            name: name.into(),
            metrics_addr: String::new(),
            log,
            child,
        };
        op.metrics_addr = op.logged_addr("chassis-operator starting", Duration::from_secs(60))?;
        Ok(op)
    }

    /// The `addr` field of the first JSON log line whose message is `message`.
    fn logged_addr(&self, message: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let addr = log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["message"] == message)
                .and_then(|l| l["addr"].as_str().map(str::to_string));
            if let Some(addr) = addr {
                return Ok(addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "operator {} never logged {message:?} with its address:\n{}",
            self.name,
            self.log_tail(30)
        )
    }

    /// The operator shared by the tests of one test binary; it serves and registers
    /// the admission webhooks.
    pub fn shared() -> &'static Operator {
        static SHARED: OnceLock<Operator> = OnceLock::new();
        SHARED.get_or_init(|| {
            let name = format!("shared-{}", std::process::id());
            let started = (|| {
                // Registered with the address it bound; platform names reserved as the
                // chart's values do (a name and a prefix).
                let op = Operator::start(
                    &name,
                    &[
                        "--webhook-addr",
                        "127.0.0.1:0",
                        "--webhook-register",
                        "--reserved-project-names",
                        "ingress-nginx,openshift-*",
                    ],
                )?;
                op.wait_for_log("registered admission webhooks", Duration::from_secs(60))?;
                wait_for_admission(Duration::from_secs(30))?;
                Ok::<_, anyhow::Error>(op)
            })();
            match started {
                Ok(op) => op,
                Err(err) => panic!("could not start the shared operator: {err:#}"),
            }
        })
    }

    /// Blocks until the operator log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(needle)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "operator {} never logged {needle:?}:\n{}",
            self.name,
            self.log_tail(30)
        )
    }

    /// The last `n` lines of the operator's log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// GET `path` on the metrics/health address: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://{}{path}", self.metrics_addr);
        let resp = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// Waits until `path` answers `status`, failing with the last answer and the log.
    pub async fn wait_for_http(&self, path: &str, status: u16, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < timeout {
            match self.get(path).await {
                Ok((s, _)) if s == status => return Ok(start.elapsed()),
                Ok((s, body)) => last = format!("{s}: {body}"),
                Err(err) => last = format!("{err:#}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "operator {} did not answer {status} on {path} within {timeout:?}; last: {last}\n--- operator log ---\n{}",
            self.name,
            self.log_tail(40)
        )
    }

    /// The value of an unlabelled-or-labelled sample in /metrics, 0 when absent.
    pub async fn metric(&self, sample: &str) -> Result<f64> {
        let (_, body) = self.get("/metrics").await?;
        Ok(body
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0))
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        let pid = self.operator_pid()?;
        run(
            Command::new("kill").args(["-KILL", &pid.to_string()]),
            "kill -KILL",
        )?;
        Ok(())
    }

    fn operator_pid(&self) -> Result<u32> {
        let out = run(
            Command::new("pgrep").args(["-P", &self.child.id().to_string()]),
            "finding the operator process",
        )?;
        out.split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .context("the operator process is not running")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Blocks until server-side dry-run creates show both webhooks at work (the requester
/// recorded, a reserved name refused): the API server picks up a new webhook
/// registration asynchronously, and until then it may still call the operator of an
/// earlier test binary, which is gone.
fn wait_for_admission(timeout: Duration) -> Result<()> {
    // A server dry run of a Project named `name`: whether it passed, and its output.
    let dry_run = |name: &str| -> Result<(bool, String, String)> {
        let mut child = started_cluster()
            .kubectl()
            .args(["create", "--dry-run=server", "-f", "-", "-o"])
            .arg("jsonpath={.metadata.annotations.tenancy\\.chassis\\.dev/requester}")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let manifest = format!(
                "apiVersion: tenancy.chassis.dev/v1alpha1\nkind: Project\nmetadata: {{name: {name}}}\n"
            );
            stdin.write_all(manifest.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    // The API server loads the two webhook configurations on its own schedule: the
    // mutating one has run when the requester comes back recorded, the validating one
    // when a reserved name is refused.
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        let (passed, requester, stderr) = dry_run("admission-probe")?;
        if passed && !requester.is_empty() {
            let (_, _, refusal) = dry_run("kube-admission-probe")?;
            if refusal.contains("is reserved") {
                return Ok(());
            }
            last = format!("a reserved name was not refused: {refusal}");
        } else {
            last = if passed {
                "a dry run passed without the requester recorded".to_string()
            } else {
                stderr
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("Project admission did not work within {timeout:?}: {last}")
}

/// The last `n` lines of a file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(file) = std::fs::File::open(path) else {
        return format!("({} not readable)", path.display());
    };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn conditions_of<K: Serialize>(obj: &K) -> Vec<Condition> {
    serde_json::to_value(obj)
        .ok()
        .and_then(|v| v.pointer("/status/conditions").cloned())
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default()
}

/// The condition of `type_` in `obj.status.conditions`, if any.
pub fn condition<K: Serialize>(obj: &K, type_: &str) -> Option<Condition> {
    conditions_of(obj).into_iter().find(|c| c.type_ == type_)
}

/// Waits until `name` has condition `type_` with `status` ("True"/"False"), and
/// returns the object. On timeout it fails with the object as YAML and the tail of
/// the operator log (when one is given).
pub async fn wait_for_condition<K>(
    api: &Api<K>,
    name: &str,
    type_: &str,
    status: &str,
    timeout: Duration,
    operator: Option<&Operator>,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let start = Instant::now();
    let mut last: Option<K> = None;
    while start.elapsed() < timeout {
        if let Some(obj) = api.get_opt(name).await? {
            if conditions_of(&obj)
                .iter()
                .any(|c| c.type_ == type_ && c.status == status)
            {
                return Ok(obj);
            }
            last = Some(obj);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dump = last
        .as_ref()
        .and_then(|o| serde_norway::to_string(o).ok())
        .unwrap_or_else(|| "(the object does not exist)".into());
    let log = operator
        .map(|o| o.log_tail(40))
        .unwrap_or_else(|| "(no operator)".into());
    bail!(
        "{name} did not get {type_}={status} within {timeout:?}.\n--- object ---\n{dump}\n--- operator log ---\n{log}"
    )
}

/// Waits until `name` no longer exists.
pub async fn wait_until_gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<Duration>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        match api.get_opt(name).await? {
            None => return Ok(start.elapsed()),
            Some(obj) => last = Some(obj),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dump = last
        .and_then(|o| serde_norway::to_string(&o).ok())
        .unwrap_or_default();
    bail!("{name} still exists after {timeout:?}:\n{dump}")
}

/// Waits until `check` returns `Some`, or fails with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    while start.elapsed() < timeout {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(err) => last_err = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match last_err {
        Some(err) => bail!("{what} did not happen within {timeout:?}; last error: {err:#}"),
        None => bail!("{what} did not happen within {timeout:?}"),
    }
}

/// Reads `name`, applies `edit` and writes it back, reading again when someone else
/// (a controller's status write) changed it in between (409 Conflict).
pub async fn update<K>(api: &kube::Api<K>, name: &str, mut edit: impl FnMut(&mut K)) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    for _ in 0..10 {
        let mut object = api.get(name).await?;
        edit(&mut object);
        match api
            .replace(name, &kube::api::PostParams::default(), &object)
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            other => return Ok(other?),
        }
    }
    bail!("{name} kept changing under ten updates in a row")
}

/// Runs `request` until the API server stops answering 403, for up to 30 s: a
/// RoleBinding the operator just created reaches the API server's authorizer through
/// its own watch, a moment later on a busy machine. Any other answer returns at once;
/// a member who is really refused still fails, with the last 403.
pub async fn once_authorized<T, F, Fut>(mut request: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    loop {
        match request().await {
            Err(kube::Error::Api(s)) if s.code == 403 && start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// A helper process (an OpenID provider, a proxy) that dies with the test binary:
/// it runs under a shell that stops it when our end of its stdin closes, so even a
/// test that panics leaves nothing behind.
pub struct Background {
    pub log: PathBuf,
    child: Child,
}

impl Background {
    /// Starts `program` with `args` and `envs`, output to `logs/<name>.log`.
    pub fn start(name: &str, program: &Path, args: &[String], envs: &[(&str, String)]) -> Result<Self> {
        let logs = state_dir().join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#""$@" </dev/null & pid=$!; trap 'kill -TERM $pid' TERM; while read -r _; do :; done; kill -TERM $pid 2>/dev/null; wait $pid"#)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self { log, child })
    }

    /// Waits until the log contains `needle`; returns that line.
    /// Sends SIGTERM (as Kubernetes does to stop a pod) and waits up to `timeout` for
    /// the process to exit; returns whether it did.
    pub fn terminate(&mut self, timeout: Duration) -> Result<bool> {
        run(
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]),
            "kill -TERM",
        )?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(false)
    }

    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(text) = std::fs::read_to_string(&self.log)
                && let Some(line) = text.lines().find(|l| l.contains(needle))
            {
                return Ok(line.to_string());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{} did not log {needle:?} within {timeout:?}:\n{}",
            self.log.display(),
            log_tail(&self.log, 30)
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper stop the process and wait for it.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// splitmix64: small, seeded and the same on every machine, so a failing seed names
/// a case that can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough below `n` (the modulo bias is irrelevant for test generation).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
