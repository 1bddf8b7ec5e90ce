//! Per-object exponential backoff: kube-runtime requeues on error with whatever the
//! error policy says, so the policy counts failures per object and resets on success
//! (kube#1916). One failing object never slows the others.
//!
//! A count is forgotten on success, and also once its object has not failed for a
//! while: kube-runtime never reconciles a deleted object again, so the count of an
//! object deleted while failing would otherwise stay for the life of the process
//! (and a new object of the same name would inherit it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Failure counts per object key (usually the UID).
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<Failures>,
}

#[derive(Debug)]
struct Failures {
    /// The count and the time of the last failure, per key.
    by_key: HashMap<String, (u32, Instant)>,
    last_pruned: Instant,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(300))
    }
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: Mutex::new(Failures {
                by_key: HashMap::new(),
                last_pruned: Instant::now(),
            }),
        }
    }

    /// How long a count outlives its last failure. A failing object fails again at
    /// least every `max` (plus the reconcile's own time), so only the counts of
    /// objects that stopped failing without a success (deleted ones) are dropped;
    /// dropping a live one early would only restart its backoff.
    fn forget_after(&self) -> Duration {
        self.max.saturating_mul(2).saturating_add(Duration::from_secs(60))
    }

    /// Records a failure of `key` and returns how long to wait before retrying it:
    /// `base * 2^(failures-1)`, capped at `max`.
    pub fn failed(&self, key: &str) -> Duration {
        let now = Instant::now();
        let forget_after = self.forget_after();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // At most one scan per `max`: the map stays small and failing cheap.
        if now.duration_since(failures.last_pruned) >= self.max {
            failures.last_pruned = now;
            failures
                .by_key
                .retain(|_, (_, last)| now.duration_since(*last) < forget_after);
        }
        let (count, last) = failures.by_key.entry(key.to_string()).or_insert((0, now));
        if now.duration_since(*last) >= forget_after {
            *count = 0; // stale, not yet pruned
        }
        *count = count.saturating_add(1);
        *last = now;
        let exp = (*count - 1).min(20);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.by_key.remove(key);
    }

    /// How many objects have a failure count (stale ones until the next prune).
    pub fn len(&self) -> usize {
        self.failures.lock().map(|f| f.by_key.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_failure_caps_and_resets() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(b.failed("a"), Duration::from_secs(1));
        assert_eq!(b.failed("a"), Duration::from_secs(2));
        assert_eq!(b.failed("a"), Duration::from_secs(4));
        assert_eq!(b.failed("a"), Duration::from_secs(5));
        assert_eq!(
            b.failed("b"),
            Duration::from_secs(1),
            "objects back off independently"
        );
        b.succeeded("a");
        assert_eq!(b.failed("a"), Duration::from_secs(1), "success resets");
        for _ in 0..100 {
            b.failed("a");
        }
        assert_eq!(
            b.failed("a"),
            Duration::from_secs(5),
            "no overflow after many failures"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn counts_of_objects_that_stopped_failing_are_forgotten() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        for _ in 0..4 {
            b.failed("deleted-while-failing");
        }
        // A live failing object keeps failing within `max`; the deleted one never again.
        for _ in 0..14 {
            tokio::time::advance(Duration::from_secs(5)).await;
            b.failed("live");
        }
        assert_eq!(b.len(), 1, "only the live object's count is kept");
        assert_eq!(
            b.failed("live"),
            Duration::from_secs(5),
            "a live object's count is not forgotten while it keeps failing"
        );
        assert_eq!(
            b.failed("deleted-while-failing"),
            Duration::from_secs(1),
            "a new object of the same key starts from the base"
        );
    }
}
