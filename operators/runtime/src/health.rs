//! `/healthz`, `/readyz` and `/metrics` on one HTTP listener.
//!
//! Ready means: every reflector store this process reads has synced and, when leader
//! election is on, this instance holds the lease. Healthy means the process serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use warp::Filter;
use warp::http::StatusCode;

use crate::metrics::Metrics;

/// Readiness inputs, flipped by the manager as stores sync and leadership changes.
#[derive(Debug)]
pub struct Health {
    synced: AtomicBool,
    leader: AtomicBool,
    leader_required: bool,
}

impl Health {
    pub fn new(leader_required: bool) -> Self {
        Self {
            synced: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            leader_required,
        }
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::SeqCst);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::SeqCst);
    }

    /// `Ok` when ready, otherwise the reason it is not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.leader_required && !self.leader.load(Ordering::SeqCst) {
            return Err("not the leader: waiting for the lease");
        }
        if !self.synced.load(Ordering::SeqCst) {
            return Err("caches not synced yet");
        }
        Ok(())
    }
}

/// Binds `addr` (failing with the bind error) and serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;

    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok");
    let ready_state = health.clone();
    let ready_metrics = metrics.clone();
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        let result = ready_state.readiness();
        ready_metrics.ready.set(i64::from(result.is_ok()));
        match result {
            Ok(()) => warp::reply::with_status("ok".to_string(), StatusCode::OK),
            Err(why) => warp::reply::with_status(why.to_string(), StatusCode::SERVICE_UNAVAILABLE),
        }
    });
    let metrics_route = warp::path!("metrics").and(warp::get()).map(move || {
        // Current at every scrape, not only after a probe hit /readyz.
        metrics.ready.set(i64::from(health.readiness().is_ok()));
        warp::reply::with_header(
            metrics.encode(),
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    });
    let routes = healthz.or(readyz).or(metrics_route);
    let server = warp::serve(routes).incoming(listener).graceful(shutdown);
    Ok((local, tokio::spawn(server.run())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_sync_and_lease_when_leader_election_is_on() {
        let h = Health::new(true);
        assert!(h.readiness().is_err());
        h.set_synced(true);
        assert_eq!(h.readiness(), Err("not the leader: waiting for the lease"));
        h.set_leader(true);
        assert_eq!(h.readiness(), Ok(()));
        let solo = Health::new(false);
        solo.set_synced(true);
        assert_eq!(
            solo.readiness(),
            Ok(()),
            "without leader election the lease is not needed"
        );
    }

    /// The body of `GET path` from the server at `addr`.
    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn the_ready_gauge_is_current_at_every_scrape() -> Result<(), Box<dyn std::error::Error>> {
        let health = Arc::new(Health::new(false));
        let (addr, _server) = serve(
            "127.0.0.1:0".parse()?,
            health.clone(),
            Arc::new(Metrics::default()),
            std::future::pending(),
        )
        .await?;
        assert!(get(addr, "/metrics").await?.contains("chassis_ready 0"));
        // No probe asked /readyz in between: the scrape alone must see the change.
        health.set_synced(true);
        let scraped = get(addr, "/metrics").await?;
        assert!(scraped.contains("chassis_ready 1"), "{scraped}");
        Ok(())
    }
}
