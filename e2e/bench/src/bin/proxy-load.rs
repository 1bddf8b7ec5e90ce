//! The pieces of the proxy benchmark (`e2e/bench/proxy.sh`): a minimal upstream, a
//! scripted browser login that prints the session cookie a proxy set, and a load
//! generator that prints requests/s and latency percentiles as JSON: closed-loop (N
//! connections, each sending its next request when the last one answered) or, with
//! `--rate`, open-loop (requests sent on a fixed schedule whatever the answers do,
//! latency counted from the scheduled time, so a stall is not hidden).

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
    /// Closed-loop load: `concurrency` connections for `seconds`; with `rate`,
    /// open-loop: `rate` requests per second spread over up to `concurrency` connections.
    Load {
        #[arg(long)]
        url: String,
        #[arg(long)]
        cookie: Option<String>,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long)]
        rate: Option<u32>,
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
                    // A blocking thread's sleep, not tokio's: tokio's timer ticks by the
                    // millisecond, so its 2 ms took 3 or 4 ms depending on where in the tick a
                    // request arrived, and a proxy's 0.1 ms decided which (p99 +1 ms or not).
                    if req.uri().path() == "/app" {
                        let _ = tokio::task::spawn_blocking(|| std::thread::sleep(APP_WAIT)).await;
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

/// Sends one GET; true when it answered 200 and its body was read.
async fn get(client: &LoadClient, uri: &hyper::Uri, cookie: Option<&str>) -> bool {
    let mut request = hyper::Request::get(uri.clone());
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    let Ok(request) = request.body(Empty::new()) else {
        return false;
    };
    match client.request(request).await {
        Ok(response) if response.status() == 200 => response.into_body().collect().await.is_ok(),
        _ => false,
    }
}

type LoadClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// When each request of an open-loop run is due: `rate` per second from `start`. A
/// thread of its own hands each out at its time (a thread's sleep overshoots by tens
/// of microseconds, tokio's timer by up to a millisecond); the due time is what
/// latency counts from, so a late hand-out or a slow answer is never hidden.
fn schedule(start: Instant, rate: u32, seconds: u64) -> tokio::sync::mpsc::UnboundedReceiver<Instant> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let total = u64::from(rate) * seconds;
    let rate = u64::from(rate.max(1));
    std::thread::spawn(move || {
        for n in 0..total {
            // Exact for any rate (a gap of 1 s / rate would drift when it does not divide).
            let due = start + Duration::from_nanos(n * 1_000_000_000 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send(due).is_err() {
                return;
            }
        }
    });
    rx
}

async fn load(
    url: &str,
    cookie: Option<&str>,
    concurrency: usize,
    seconds: u64,
    rate: Option<u32>,
) -> Result<serde_json::Value> {
    let client: LoadClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let uri: hyper::Uri = url.parse()?;
    // One warm-up request checks that the target answers 200 (a login page would not).
    if !get(&client, &uri, cookie).await {
        bail!("{url} did not answer the warm-up request with 200");
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let cpu_before = own_cpu_ticks();
    let due = rate.map(|r| Arc::new(tokio::sync::Mutex::new(schedule(started, r, seconds))));
    // Collected, so that every worker is spawned before the first is awaited.
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            let uri = uri.clone();
            let cookie = cookie.map(str::to_string);
            let due = due.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                loop {
                    // Closed loop: now, until the deadline. Open loop: the next scheduled
                    // time, until the schedule is done (late requests still count).
                    let sent = match &due {
                        None if Instant::now() < deadline => Instant::now(),
                        None => break,
                        Some(due) => match due.lock().await.recv().await {
                            Some(at) => at,
                            None => break,
                        },
                    };
                    if get(&client, &uri, cookie.as_deref()).await {
                        latencies.push(sent.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
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
        "p999_ms": percentile(&all, 0.999),
        "concurrency": concurrency,
        "rate": rate,
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
            rate,
        } => {
            println!(
                "{}",
                load(&url, cookie.as_deref(), concurrency, seconds, rate).await?
            );
            Ok(())
        }
    }
}
