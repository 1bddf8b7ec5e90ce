//! chassis-operator runs the enabled Chassis controllers in one process: it serves
//! `/healthz`, `/readyz` and `/metrics`, optionally waits for the leader lease, and
//! shuts down cleanly on SIGTERM. Controllers live in the area crates; this binary
//! only wires them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use chassis_runtime::controller::{Running, Settings};
use chassis_runtime::health::{self, Health};
use chassis_runtime::leader::Election;
use chassis_runtime::metrics::Metrics;
use chassis_runtime::webhook::{self, ServingCert};
use chassis_runtime::webhook_secret::{self, Inject, SecretCert};
use clap::{Parser, ValueEnum};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;

/// How long controllers may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Every controller this binary knows, in start order.
const ALL_CONTROLLERS: &[&str] = &[
    chassis_tenancy::project::NAME,
    chassis_tenancy::template::NAME,
    chassis_network::profile::NAME,
    chassis_network::egress::NAME,
];

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// The Chassis operator: runs the platform's controllers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Controllers to run, comma-separated (`all`, or any of: project, projecttemplate,
    /// networkprofile, egresspolicy).
    #[arg(
        long,
        env = "CHASSIS_CONTROLLERS",
        default_value = "all",
        value_delimiter = ','
    )]
    controllers: Vec<String>,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "CHASSIS_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,

    /// Reconciles each controller runs at once (1-256). Higher finishes a burst of
    /// changes sooner at the cost of memory and API server load.
    #[arg(long, env = "CHASSIS_CONCURRENCY", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,

    /// Run controllers only while holding the leader lease.
    #[arg(long, env = "CHASSIS_LEADER_ELECT")]
    leader_elect: bool,

    /// Namespace of the leader lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,

    /// Name of the leader lease.
    #[arg(long, default_value = "chassis-operator")]
    lease_name: String,

    /// Kubeconfig file; without it, $KUBECONFIG, ~/.kube/config or the in-cluster config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,

    /// Serve the Project admission webhooks over TLS on this address.
    #[arg(long, env = "CHASSIS_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,

    /// Folder with `tls.crt`, `tls.key` (and `ca.crt`) for the webhooks; without it a
    /// self-signed certificate is generated for the webhook address.
    #[arg(long, env = "CHASSIS_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,

    /// Keep the webhook certificate in this Secret (`NAMESPACE/NAME`): created on the
    /// first start, renewed under the same CA 30 days before it expires, shared by
    /// all replicas. Needs --webhook-host.
    #[arg(long, env = "CHASSIS_WEBHOOK_CERT_SECRET", conflicts_with = "webhook_cert_dir",
          requires = "webhook_host", value_parser = namespaced_name)]
    webhook_cert_secret: Option<(String, String)>,

    /// DNS name the webhook certificate is for (repeat for several), e.g. the Service
    /// `chassis-webhook.chassis-system.svc`.
    #[arg(long = "webhook-host", env = "CHASSIS_WEBHOOK_HOSTS", value_delimiter = ',')]
    webhook_host: Vec<String>,

    /// Set the webhook CA as `caBundle` in the Mutating- and
    /// ValidatingWebhookConfigurations of this name (repeat for several), as the chart
    /// installs them.
    #[arg(
        long = "webhook-inject-ca",
        env = "CHASSIS_WEBHOOK_INJECT_CA",
        value_delimiter = ','
    )]
    webhook_inject_ca: Vec<String>,

    /// Project names kept for the platform's own namespaces, besides `default`,
    /// `kube-*` and `chassis-*` (comma-separated; `openshift-*` is a prefix):
    /// namespaces that do not exist yet, or not at the moment, are otherwise free to
    /// take by a Project.
    #[arg(
        long = "reserved-project-names",
        env = "CHASSIS_RESERVED_PROJECT_NAMES",
        value_delimiter = ','
    )]
    reserved_project_names: Vec<String>,

    /// Register the webhook configurations with the API server, pointing at
    /// https://<webhook-addr> (for development outside a cluster; the helm chart
    /// registers them in a cluster).
    #[arg(long, requires = "webhook_addr")]
    webhook_register: bool,

    /// Log line format.
    #[arg(long, env = "CHASSIS_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

fn namespaced_name(value: &str) -> Result<(String, String), String> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("expected NAMESPACE/NAME, got {value:?}")),
    }
}

/// How often a replica re-reads the webhook certificate Secret to renew it in time;
/// changes others make to the Secret arrive through its watch.
const CERT_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// How soon a failed check of the certificate Secret (the API server busy) is repeated.
const CERT_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// How often the webhook certificate folder (`--webhook-cert-dir`, cert-manager's
/// Secret mounted) is read again; the kubelet updates a mounted Secret within about
/// a minute, so renewal reaches the server within two.
const CERT_DIR_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn selected_controllers(requested: &[String]) -> Result<Vec<&'static str>> {
    if requested.iter().any(|c| c == "all") {
        return Ok(ALL_CONTROLLERS.to_vec());
    }
    let mut selected = Vec::new();
    for name in requested {
        match ALL_CONTROLLERS.iter().find(|known| *known == name) {
            Some(known) => selected.push(*known),
            None => bail!(
                "unknown controller {name:?} in --controllers; known: all, {}",
                ALL_CONTROLLERS.join(", ")
            ),
        }
    }
    if selected.is_empty() {
        bail!("--controllers names no controller");
    }
    Ok(selected)
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("finding a cluster (kubeconfig or in-cluster)")?,
    };
    Ok(chassis_runtime::client::from_config(config)?)
}

fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .map_or_else(
            || format!("chassis-{}", std::process::id()),
            |h| format!("{h}-{}", std::process::id()),
        )
}

fn build(
    name: &str,
    client: &Client,
    metrics: &Arc<Metrics>,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Running {
    match name {
        chassis_tenancy::project::NAME => {
            chassis_tenancy::project::controller(client.clone(), metrics, settings, shutdown.clone())
        }
        chassis_tenancy::template::NAME => {
            chassis_tenancy::template::controller(client.clone(), metrics, settings, shutdown.clone())
        }
        chassis_network::profile::NAME => {
            chassis_network::profile::controller(client.clone(), metrics, settings, shutdown.clone())
        }
        chassis_network::egress::NAME => {
            chassis_network::egress::controller(client.clone(), metrics, settings, shutdown.clone())
        }
        other => unreachable!("controller {other} was validated against ALL_CONTROLLERS"),
    }
}

/// Re-reads the certificate Secret when it changes and every hour: renews it when due
/// (or picks up another replica's renewal, or a new CA after it was deleted) and serves
/// the new certificate without a restart. A failed check is tried again soon.
async fn renew_certificate(
    secret: SecretCert,
    mut current: ServingCert,
    serving: std::sync::Arc<webhook::Reloadable>,
    ca: tokio::sync::watch::Sender<String>,
    shutdown: CancellationToken,
) {
    use futures::StreamExt as _;
    let mut changes = std::pin::pin!(secret.changes());
    let mut next_check = CERT_CHECK_EVERY;
    loop {
        tokio::select! {
            () = tokio::time::sleep(next_check) => {}
            Some(()) = changes.next() => {}
            () = shutdown.cancelled() => return,
        }
        let cert = match secret.ensure().await {
            Ok(cert) => cert,
            Err(err) => {
                next_check = CERT_RETRY_AFTER;
                tracing::warn!(error = %err, retry_in = ?next_check, "could not check the webhook certificate");
                continue;
            }
        };
        next_check = CERT_CHECK_EVERY;
        if cert.cert_pem != current.cert_pem {
            if let Err(err) = serving.replace(&cert) {
                tracing::warn!(error = %err, "the renewed webhook certificate is unusable");
                continue;
            }
            tracing::info!(not_after = ?cert.not_after, "serving the renewed webhook certificate");
        }
        // Only a new CA wakes `keep_ca_injected` to replace the configurations' bundle.
        ca.send_if_modified(|current| {
            let changed = *current != cert.ca_pem;
            if changed {
                current.clone_from(&cert.ca_pem);
            }
            changed
        });
        current = cert;
    }
}

async fn run(args: Args) -> Result<()> {
    let controllers = selected_controllers(&args.controllers)?;
    let reserved = chassis_tenancy::admission::ReservedNames::parse(&args.reserved_project_names)
        .map_err(|e| anyhow::anyhow!("--reserved-project-names: {e}"))?;
    let client = client(args.kubeconfig.as_ref()).await?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(args.leader_elect));
    let shutdown = CancellationToken::new();
    let instance = identity();

    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            chassis_runtime::shutdown::signal().await;
            shutdown.cancel();
        }
    });

    let (addr, server) = health::serve(
        args.metrics_addr,
        health.clone(),
        metrics.clone(),
        shutdown.clone().cancelled_owned(),
    )
    .await
    .with_context(|| format!("listening on --metrics-addr {}", args.metrics_addr))?;
    tracing::info!(%addr, controllers = ?controllers, leader_elect = args.leader_elect, "chassis-operator starting");

    // The webhook server, awaited before exit: it answers the requests in flight first.
    let mut webhook_server = None;
    if let Some(webhook_addr) = args.webhook_addr {
        let managed = args
            .webhook_cert_secret
            .as_ref()
            .map(|(ns, name)| SecretCert::new(client.clone(), ns, name, args.webhook_host.clone()));
        let cert = match (&args.webhook_cert_dir, &managed) {
            (Some(dir), _) => ServingCert::from_dir(dir)?,
            (None, Some(secret)) => secret.ensure().await.context("keeping the webhook certificate")?,
            (None, None) => {
                ServingCert::self_signed(&[webhook_addr.ip().to_string(), "localhost".to_string()])?
            }
        };
        let (ca, ca_changes) = tokio::sync::watch::channel(cert.ca_pem.clone());
        if !args.webhook_inject_ca.is_empty() {
            webhook_secret::inject_ca(&client, &args.webhook_inject_ca, &cert.ca_pem, Inject::Differing)
                .await
                .context("injecting the webhook CA into the webhook configurations")?;
            tokio::spawn(webhook_secret::keep_ca_injected(
                client.clone(),
                args.webhook_inject_ca.clone(),
                ca_changes,
                shutdown.clone(),
            ));
        }
        let serving = webhook::Reloadable::new(&cert)?;
        if let Some(dir) = &args.webhook_cert_dir {
            tokio::spawn(webhook::watch_dir(
                dir.clone(),
                cert.clone(),
                serving.clone(),
                CERT_DIR_CHECK_EVERY,
                shutdown.clone(),
            ));
        }
        if let Some(secret) = managed {
            tokio::spawn(renew_certificate(
                secret,
                cert.clone(),
                serving.clone(),
                ca,
                shutdown.clone(),
            ));
        }
        let caches = chassis_tenancy::admission::Caches::start(&client, shutdown.clone());
        let routes = chassis_tenancy::admission::routes(client.clone(), caches, reserved);
        let (local, handle) = webhook::serve(webhook_addr, serving, routes, shutdown.clone())
            .await
            .with_context(|| format!("serving webhooks on --webhook-addr {webhook_addr}"))?;
        webhook_server = Some(handle);
        tracing::info!(addr = %local, "serving admission webhooks");
        if args.webhook_register {
            chassis_tenancy::admission::register(&client, &format!("https://{local}"), &cert.ca_pem)
                .await
                .context("registering the admission webhooks")?;
            tracing::info!(url = %format!("https://{local}"), "registered admission webhooks");
        }
    }

    let mut election = None;
    if args.leader_elect {
        let mut e = Election::start(client.clone(), &args.lease_namespace, &args.lease_name, &instance)
            .await
            .with_context(|| {
                format!(
                    "joining leader election on lease {}/{}",
                    args.lease_namespace, args.lease_name
                )
            })?;
        tracing::info!(identity = %instance, "waiting for the leader lease");
        tokio::select! {
            acquired = e.acquired() => if !acquired { bail!("leader election stopped before the lease was acquired") },
            _ = shutdown.cancelled() => {
                e.release().await;
                let _ = futures::join!(server, drained(webhook_server));
                return Ok(());
            }
        }
        tracing::info!(identity = %instance, "acquired the leader lease");
        health.set_leader(true);
        metrics.leader.set(1);
        election = Some(e);
    }

    let settings = Settings {
        instance: Some(instance.clone()),
        concurrency: args.concurrency,
    };
    let running: Vec<Running> = controllers
        .iter()
        .map(|name| build(name, &client, &metrics, &settings, &shutdown))
        .collect();
    let (synced, runs): (Vec<_>, Vec<_>) = running.into_iter().map(|r| (r.synced, r.run)).unzip();
    tokio::spawn({
        let health = health.clone();
        async move {
            futures::future::join_all(synced).await;
            tracing::info!("caches synced; ready");
            health.set_synced(true);
        }
    });

    let controllers_done = futures::future::join_all(runs);
    let lost = async {
        match election.as_mut() {
            Some(e) => e.lost().await,
            None => futures::future::pending().await,
        }
    };
    // kube-runtime holds a controller whose store never synced (e.g. missing RBAC)
    // and it does not see the shutdown signal then: give controllers a grace period.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!("controllers did not stop within {SHUTDOWN_GRACE:?}; exiting anyway");
    };
    let outcome = tokio::select! {
        _ = controllers_done => Ok(()),
        _ = grace => Ok(()),
        _ = lost => {
            health.set_leader(false);
            Err(anyhow::anyhow!("lost the leader lease; exiting so a fresh instance can take over"))
        }
    };
    shutdown.cancel();
    if let Some(e) = election {
        e.release().await;
    }
    let _ = futures::join!(server, drained(webhook_server));
    outcome
}

/// Waits for the webhook server, if one runs, to answer what is in flight.
async fn drained(webhook: Option<tokio::task::JoinHandle<()>>) {
    if let Some(handle) = webhook {
        let _ = handle.await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    chassis_runtime::telemetry::init(matches!(args.log_format, LogFormat::Json));
    match run(args).await {
        Ok(()) => {
            tracing::info!("chassis-operator stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "chassis-operator failed");
            eprintln!("chassis-operator: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_flag_accepts_all_and_known_names_only() {
        assert_eq!(
            selected_controllers(&["all".into()]).ok(),
            Some(ALL_CONTROLLERS.to_vec())
        );
        assert_eq!(
            selected_controllers(&["project".into()]).ok(),
            Some(vec!["project"])
        );
        let err = selected_controllers(&["projcet".into()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown controller \"projcet\""), "{err}");
    }
}
