//! The pieces of the proxy benchmark (`e2e/bench/proxy.sh`): a minimal upstream, a
//! scripted browser login that prints the session cookie a proxy set, and a
//! closed-loop load generator (N connections, each sending its next request when the
//! last one answered) that prints requests/s and latency percentiles as JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::cookie::CookieStore;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve `ok` on every path; on `/app` after waiting [`APP_WAIT`].
    Upstream {
        #[arg(long)]
        port: u16,
    },
    /// Sign in through `proxy` on the provider's form; print the Cookie header.
    Login {
        #[arg(long)]
        proxy: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        password: String,
    },
    /// Closed-loop load: `concurrency` connections for `seconds`.
    Load {
        #[arg(long)]
        url: String,
        #[arg(long)]
        cookie: Option<String>,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// How long `/app` waits before it answers: no CPU, like a database round trip.
const APP_WAIT: Duration = Duration::from_millis(2);

async fn upstream(port: u16) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    // `/app` stands for an application that waits on its database before it answers.
                    if req.uri().path() == "/app" {
                        tokio::time::sleep(APP_WAIT).await;
                    }
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn login(proxy: &str, user: &str, password: &str) -> Result<String> {
    let jar = Arc::new(reqwest::cookie::Jar::default());
    let browser = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .redirect(reqwest::redirect::Policy::limited(20))
        .build()?;
    let page = browser
        .get(format!("{proxy}/oauth2/start?rd=%2F"))
        .header("accept", "text/html")
        .send()
        .await?;
    ensure!(
        page.url().path().starts_with("/interaction/"),
        "expected the login form, got {}",
        page.url()
    );
    let form = page.url().clone();
    let done = browser
        .post(form)
        .form(&[("login", user), ("password", password)])
        .send()
        .await?;
    ensure!(
        done.url().as_str().starts_with(proxy),
        "the login ended on {}",
        done.url()
    );
    let url = proxy.parse()?;
    let cookies = jar.cookies(&url).context("the proxy set no cookie")?;
    Ok(cookies.to_str()?.to_string())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)] as f64 / 1000.0
}

/// This process's user + system CPU time in clock ticks (`/proc/self/stat` fields
/// 14 and 15), so the generator's own share of the shared cores is reported.
fn own_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

async fn load(
    url: &str,
    cookie: Option<&str>,
    concurrency: usize,
    seconds: u64,
) -> Result<serde_json::Value> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let uri: hyper::Uri = url.parse()?;
    // One warm-up request checks that the target answers 200 (a login page would not).
    let mut warm = hyper::Request::get(uri.clone());
    if let Some(c) = cookie {
        warm = warm.header("cookie", c);
    }
    let response = client.request(warm.body(Empty::new())?).await?;
    if response.status() != 200 {
        bail!("{url} answered {} to the warm-up request", response.status());
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let cpu_before = own_cpu_ticks();
    // Collected, so that every worker is spawned before the first is awaited.
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            let uri = uri.clone();
            let cookie = cookie.map(str::to_string);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let mut request = hyper::Request::get(uri.clone());
                    if let Some(c) = &cookie {
                        request = request.header("cookie", c);
                    }
                    let Ok(request) = request.body(Empty::new()) else {
                        break;
                    };
                    let sent = Instant::now();
                    match client.request(request).await {
                        Ok(response) if response.status() == 200 => {
                            let _ = response.into_body().collect().await;
                            latencies.push(sent.elapsed().as_micros() as u64);
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (latencies, e) = worker.await?;
        all.extend(latencies);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_ticks = own_cpu_ticks()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    all.sort_unstable();
    Ok(serde_json::json!({
        "cpu_ticks": cpu_ticks,
        "requests": all.len(),
        "errors": errors,
        "rps": all.len() as f64 / elapsed,
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
        "concurrency": concurrency,
        "seconds": seconds,
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Upstream { port } => upstream(port).await,
        Cmd::Login {
            proxy,
            user,
            password,
        } => {
            println!("{}", login(&proxy, &user, &password).await?);
            Ok(())
        }
        Cmd::Load {
            url,
            cookie,
            concurrency,
            seconds,
        } => {
            println!("{}", load(&url, cookie.as_deref(), concurrency, seconds).await?);
            Ok(())
        }
    }
}
