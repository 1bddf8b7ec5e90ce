//! Per-object exponential backoff: kube-runtime requeues on error with whatever the
//! error policy says, so the policy counts failures per object and resets on success
//! (kube#1916). One failing object never slows the others.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Failure counts per object key (usually the UID).
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
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
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure of `key` and returns how long to wait before retrying it:
    /// `base * 2^(failures-1)`, capped at `max`.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        let exp = (*count - 1).min(20);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(key);
    }

    /// How many objects are currently backing off.
    pub fn len(&self) -> usize {
        self.failures.lock().map(|f| f.len()).unwrap_or(0)
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
}
