//! `chassis-oauth-proxy`: reads the configuration, discovers the issuers (see
//! [`discovery`]), serves the proxy and, on its own address, `/metrics`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use chassis_oauth_proxy::config::{self, Config, Flags};
use chassis_oauth_proxy::discovery;
use chassis_oauth_proxy::server::{self, App};
use clap::Parser;

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

/// Serving threads after the main one: each runs a single-thread runtime that accepts on
/// its own socket, so a request and its upstream exchange stay on one thread.
fn start_serving_threads(
    app: &Arc<App>,
    address: SocketAddr,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for index in 1..app.config.worker_threads {
        let listener = server::reuse_port_listener(address)?;
        let (app, mut stop) = (app.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("serve-{index}"))
            .spawn(move || {
                server::serving_thread(index);
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, thread = index, "cannot start a serving thread's runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let stopped = async move {
                                let _ = stop.wait_for(|stopped| *stopped).await;
                            };
                            server::serve(app, listener, stopped).await;
                        }
                        Err(e) => tracing::error!(error = %e, thread = index, "cannot listen"),
                    }
                });
            })?;
        threads.push(thread);
    }
    Ok(threads)
}

async fn run(app: Arc<App>) -> anyhow::Result<()> {
    if app.config.sar.is_some() {
        let client = kube_client(app.config.kubeconfig.as_deref()).await?;
        let _ = app.kube.set(client);
    }
    let listener = if app.config.worker_threads > 1 {
        server::port_is_free(app.config.http_address)?;
        tokio::net::TcpListener::from_std(server::reuse_port_listener(app.config.http_address)?)?
    } else {
        tokio::net::TcpListener::bind(app.config.http_address).await?
    };
    let address = listener.local_addr()?;
    let metrics_listener = tokio::net::TcpListener::bind(app.config.metrics_address).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let threads = start_serving_threads(&app, address, &stopped)?;
    tracing::info!(
        %address,
        metrics = %metrics_listener.local_addr()?,
        upstream = %app.config.upstream,
        threads = app.config.worker_threads,
        "chassis-oauth-proxy listening"
    );
    tokio::spawn(discovery::login_issuer(app.clone()));
    tokio::spawn(discovery::bearer_issuers(app.clone()));
    tokio::spawn(server::serve_metrics(app.clone(), metrics_listener));
    // SIGTERM is how Kubernetes stops a pod: as PID 1 without a handler the proxy would
    // ignore it and be killed only after the grace period.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down: draining requests in flight");
        // Every serving thread drains at once, each its own connections.
        let _ = stop.send(true);
    };
    server::serve(app, listener, shutdown).await;
    // Joined off this thread's runtime: it keeps running the tasks other threads still
    // use while they drain (the Kubernetes client's worker, /metrics).
    let _ = tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
    .await;
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
    // The whole configuration is checked here, the cookie secret and the redirect
    // allow-list included, so `--config-test` and a start fail alike (exit 2).
    let app = match config::check_environment(std::env::vars_os())
        .and_then(|()| Config::load(&flags))
        .and_then(App::new)
    {
        Ok(app) => app,
        Err(e) => {
            eprintln!("chassis-oauth-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.config_test {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    // The main thread serves too; `start_serving_threads` adds the others. Single-thread
    // runtimes, one per thread: a request's downstream and upstream connection tasks
    // never wake each other across threads (a work-stealing runtime cost about a fifth
    // more CPU per request on shared cores).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chassis-oauth-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(app)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chassis-oauth-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
