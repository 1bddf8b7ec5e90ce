//! `chassis-oauth-proxy`: reads the configuration, discovers the issuer (retrying
//! until it answers; `/ready` says 503 meanwhile), serves the proxy and, on its own
//! address, `/metrics`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chassis_oauth_proxy::bearer::BearerVerifier;
use chassis_oauth_proxy::config::{Config, Flags};
use chassis_oauth_proxy::oidc::{self, Provider};
use chassis_oauth_proxy::server::{self, App};
use clap::Parser;

async fn discover(app: Arc<App>) {
    let mut delay = Duration::from_millis(500);
    loop {
        match Provider::discover(&app.config).await {
            Ok(provider) => {
                if !app.config.bearer_issuers.is_empty() {
                    let bearer = match oidc::http_client(app.config.provider_ca_file.as_deref()) {
                        Ok(http) => {
                            BearerVerifier::discover(
                                &app.config.bearer_issuers,
                                http,
                                app.config.bearer_clock_skew,
                                app.config.groups_claim.clone(),
                            )
                            .await
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    match bearer {
                        Ok(b) => {
                            let _ = app.bearer.set(b);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?delay, "bearer issuer discovery failed");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(30));
                            continue;
                        }
                    }
                }
                let _ = app.provider.set(provider);
                tracing::info!(issuer = %app.config.issuer_url, "issuer discovered");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "issuer discovery failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The Kubernetes client for SubjectAccessReviews: the kubeconfig given, else the
/// in-cluster (or `KUBECONFIG`) configuration.
async fn kube_client(path: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match path {
        Some(p) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(p)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let app = App::new(config).map_err(anyhow::Error::msg)?;
    if app.config.sar.is_some() {
        let client = kube_client(app.config.kubeconfig.as_deref()).await?;
        let _ = app.kube.set(client);
    }
    let listener = tokio::net::TcpListener::bind(app.config.http_address).await?;
    let metrics_listener = tokio::net::TcpListener::bind(app.config.metrics_address).await?;
    tracing::info!(
        address = %listener.local_addr()?,
        metrics = %metrics_listener.local_addr()?,
        upstream = %app.config.upstream,
        "chassis-oauth-proxy listening"
    );
    tokio::spawn(discover(app.clone()));
    tokio::spawn(server::serve_metrics(app.clone(), metrics_listener));
    // SIGTERM is how Kubernetes stops a pod: as PID 1 without a handler the proxy would
    // ignore it and be killed only after the grace period.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    };
    server::serve(app, listener, shutdown).await;
    Ok(())
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        // Colour codes only for a terminal, never into files or log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chassis-oauth-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.config_test {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    // One thread needs no cross-thread wake-ups between the client's and the
    // upstream's connection tasks: the cheapest per request when cores are shared.
    let runtime = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chassis-oauth-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chassis-oauth-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
