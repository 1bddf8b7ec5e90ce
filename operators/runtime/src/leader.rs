//! Leader election on a `coordination.k8s.io` Lease with kube-lease-manager.
//! Only the holder runs controllers; losing the lease ends the process, so that a
//! restarted replica starts from clean caches (as controller-runtime does).
//!
//! kube-lease-manager retries a failed renewal without ever saying the lease may be
//! gone, so a leader cut off from the API server (or whose renewals stall behind its
//! own burst of writes) would go on reconciling while a standby takes the expired
//! lease. A watchdog ([`watchdog`]) reads the Lease itself and calls the lease lost
//! shortly before, by the last renewal it saw, anyone else could take it: client-go's
//! renew deadline.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Lease timing: a crashed leader is replaced within `duration` plus one poll.
pub const LEASE_DURATION_SECONDS: u64 = 10;
/// The leader renews this long before expiry, so every 5 s: the watchdog below then
/// has 4 s (minus its margin) to see each renewal before it would step down.
pub const LEASE_GRACE_SECONDS: u64 = 5;
/// How often the leader checks that the lease is still its own and fresh.
const WATCHDOG_EVERY: Duration = Duration::from_secs(1);
/// The leader stops this long before the lease, by its last renewal seen, expires.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(1);

/// A running election. Drop `leading` (via [`Election::release`]) to give the lease up.
pub struct Election {
    pub leading: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
    /// Set by the watchdog when the lease can no longer be counted on.
    expired: watch::Receiver<bool>,
    watchdog: JoinHandle<()>,
}

impl Election {
    /// Joins the election for Lease `namespace/name` as `identity`.
    pub async fn start(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
    ) -> Result<Self, LeaseManagerError> {
        let api = Api::<Lease>::namespaced(client.clone(), namespace);
        let manager = LeaseManagerBuilder::new(client, name)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(LEASE_DURATION_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
            .with_field_manager(format!("chassis-leader-{identity}"))
            .build()
            .await?;
        let (leading, task) = manager.watch().await;
        let (expire, expired) = watch::channel(false);
        let watchdog = tokio::spawn(watchdog(
            api,
            name.to_string(),
            identity.to_string(),
            leading.clone(),
            expire,
        ));
        Ok(Self {
            leading,
            task,
            expired,
            watchdog,
        })
    }

    /// Waits until this instance holds the lease.
    pub async fn acquired(&mut self) -> bool {
        self.leading.wait_for(|leading| *leading).await.is_ok()
    }

    /// Resolves when the lease, once held, is lost, or cannot be counted on any more
    /// (see [`watchdog`]).
    pub async fn lost(&mut self) {
        let (leading, expired) = (&mut self.leading, &mut self.expired);
        tokio::select! {
            _ = leading.wait_for(|leading| !*leading) => {}
            _ = expired.wait_for(|expired| *expired) => {}
        }
    }

    /// Releases the lease so a standby takes over at once, not after it expires.
    pub async fn release(self) {
        self.watchdog.abort();
        drop(self.leading);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("released the leader lease"),
            Ok(Err(err)) => tracing::warn!(error = %err, "could not release the leader lease"),
            Err(err) => tracing::warn!(error = %err, "leader election task failed"),
        }
    }
}

/// While `leading` says this instance leads, reads the Lease every [`WATCHDOG_EVERY`]
/// and sets `expire` (then returns) when another instance holds it, or when the last
/// renewal it saw is about to run out: reads that fail or stall do not extend it.
pub async fn watchdog(
    api: Api<Lease>,
    name: String,
    identity: String,
    leading: watch::Receiver<bool>,
    expire: watch::Sender<bool>,
) {
    let mut valid_until: Option<Instant> = None;
    let step_down = |why: &str| {
        tracing::warn!("{why}; stepping down");
        let _ = expire.send(true);
    };
    loop {
        // Wake in time for the deadline, not only at the next check.
        let next = Instant::now() + WATCHDOG_EVERY;
        tokio::time::sleep_until(valid_until.map_or(next, |until| until.min(next))).await;
        if !*leading.borrow() {
            valid_until = None;
            continue;
        }
        let asked = Instant::now();
        // Just acquired, at most one check ago.
        let until = *valid_until.get_or_insert(
            asked + Duration::from_secs(LEASE_DURATION_SECONDS) - WATCHDOG_EVERY - WATCHDOG_MARGIN,
        );
        // No renewal seen in time: by the last one seen, a standby may take the lease
        // within the margin.
        if asked >= until {
            step_down("the leader lease was not seen renewed in time");
            return;
        }
        // A read that stalls past the deadline counts as failed at the deadline.
        match tokio::time::timeout_at(until.min(asked + WATCHDOG_EVERY), api.get(&name)).await {
            Ok(Ok(lease)) => match held_for(&lease, &identity, SystemTime::now()) {
                Some(left) => valid_until = Some(asked + left.saturating_sub(WATCHDOG_MARGIN)),
                None => {
                    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                    step_down(&format!("the leader lease is held by {holder:?}"));
                    return;
                }
            },
            Ok(Err(err)) => tracing::warn!(error = %err, "could not read the leader lease"),
            Err(_) => tracing::warn!("reading the leader lease took too long"),
        }
        if valid_until.is_some_and(|until| Instant::now() >= until) {
            step_down("the leader lease was not seen renewed in time");
            return;
        }
    }
}

/// How much longer `lease` stays `identity`'s by its last renewal (zero when that has
/// run out), at wall-clock time `now`; `None` when another identity holds it.
fn held_for(lease: &Lease, identity: &str, now: SystemTime) -> Option<Duration> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(LEASE_DURATION_SECONDS);
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref());
    let Some(renewed) = renewed else {
        return Some(Duration::ZERO);
    };
    let renewed = SystemTime::from(renewed.0);
    let expires = renewed + Duration::from_secs(duration);
    Some(expires.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use kube::client::Body;

    fn lease(holder: &str, renewed: SystemTime) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(10),
                renew_time: k8s_openapi::jiff::Timestamp::try_from(renewed)
                    .ok()
                    .map(MicroTime),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_held_until_its_last_renewal_runs_out() {
        let now = SystemTime::now();
        let left = held_for(&lease("me", now - Duration::from_secs(4)), "me", now);
        assert!(
            left.is_some_and(|l| l > Duration::from_secs(5) && l <= Duration::from_secs(6)),
            "{left:?}"
        );
        let stale = held_for(&lease("me", now - Duration::from_secs(30)), "me", now);
        assert_eq!(stale, Some(Duration::ZERO));
        assert_eq!(held_for(&lease("other", now), "me", now), None);
    }

    /// A simulated API server for the watchdog's reads: the lease is renewed every
    /// `LEASE_DURATION - LEASE_GRACE` seconds (each renewal visible `renewal_latency`
    /// after its renewTime), reads answer after `read_latency`, and from `stall_at`
    /// on renewals stop and reads fail. Wall-clock renewTimes are made from the paused
    /// test clock, so the lease ages as the test's time passes.
    fn simulated(
        start: Instant,
        renewal_latency: Duration,
        read_latency: Duration,
        stall_at: Option<Duration>,
    ) -> Api<Lease> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let every = Duration::from_secs(LEASE_DURATION_SECONDS - LEASE_GRACE_SECONDS);
            while let Some((_request, send)) = handle.next_request().await {
                tokio::spawn(async move {
                    tokio::time::sleep(read_latency).await;
                    let now = start.elapsed();
                    let (code, body) = if stall_at.is_some_and(|at| now >= at) {
                        (
                            503,
                            br#"{"kind":"Status","code":503,"message":"unavailable"}"#.to_vec(),
                        )
                    } else {
                        // The last renewal whose write has completed by now.
                        let visible = now.saturating_sub(renewal_latency);
                        let renewed = every * (visible.as_millis() / every.as_millis()) as u32;
                        let age = now.saturating_sub(renewed);
                        let lease = lease("me", SystemTime::now() - age);
                        (200, serde_json::to_vec(&lease).unwrap_or_default())
                    };
                    if let Ok(response) = Response::builder().status(code).body(Body::from(body)) {
                        send.send_response(response);
                    }
                });
            }
        });
        Api::<Lease>::namespaced(Client::new(service, "default"), "default")
    }

    /// Runs the watchdog of a leader against `api` for at most `limit`; the time it
    /// stepped down, if it did.
    async fn stepped_down_after(api: Api<Lease>, start: Instant, limit: Duration) -> Option<Duration> {
        let (_lead, leading) = watch::channel(true);
        let (expire, mut expired) = watch::channel(false);
        tokio::spawn(watchdog(api, "lease".into(), "me".into(), leading, expire));
        tokio::time::timeout(limit, expired.wait_for(|e| *e))
            .await
            .ok()?
            .ok()?;
        Some(start.elapsed())
    }

    /// Renewals every 5 s, seen late (a slow API server: 300 ms to write a renewal,
    /// 200 ms to answer a read): the watchdog must never step down a healthy leader.
    #[tokio::test(start_paused = true)]
    async fn a_healthy_leader_is_never_stepped_down() {
        for (renewal, read) in [(10, 1), (300, 200), (700, 250)] {
            let start = Instant::now();
            let api = simulated(
                start,
                Duration::from_millis(renewal),
                Duration::from_millis(read),
                None,
            );
            let down = stepped_down_after(api, start, Duration::from_secs(1800)).await;
            assert_eq!(down, None, "renewal {renewal} ms, read {read} ms");
        }
    }

    /// From 22 s on the API server cannot be reached: the leader must step down before
    /// the lease, by its last renewal (20 s), expires (30 s), and not long before.
    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_see_its_lease_renewed_steps_down_before_it_expires() {
        let start = Instant::now();
        let api = simulated(
            start,
            Duration::from_millis(50),
            Duration::from_millis(5),
            Some(Duration::from_secs(22)),
        );
        let down = stepped_down_after(api, start, Duration::from_secs(120)).await;
        assert!(
            down.is_some_and(|d| d >= Duration::from_secs(27) && d < Duration::from_secs(30)),
            "{down:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_steps_down_when_another_instance_holds_the_lease() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((_request, send)) = handle.next_request().await {
                let body = serde_json::to_vec(&lease("other", SystemTime::now())).unwrap_or_default();
                if let Ok(response) = Response::builder().status(200).body(Body::from(body)) {
                    send.send_response(response);
                }
            }
        });
        let api = Api::<Lease>::namespaced(Client::new(service, "default"), "default");
        let (_lead, leading) = watch::channel(true);
        let (expire, mut expired) = watch::channel(false);
        tokio::spawn(watchdog(api, "lease".into(), "me".into(), leading, expire));
        let stepped_down = tokio::time::timeout(Duration::from_secs(5), expired.wait_for(|e| *e)).await;
        assert!(
            stepped_down.is_ok(),
            "the leader kept leading a lease it does not hold"
        );
    }
}
