//! What the API server answered to our own writes, laid over the watch caches.
//!
//! A reconcile often runs again before the watch has delivered the object it just
//! wrote (a child's event wakes the parent while its siblings are still in flight).
//! Judged from the cache alone, those siblings look missing and would be written a
//! second time. The overlay keeps each write's response until the cache holds that
//! version or a newer one; only when the cache stays behind for [`Overlay::ttl`] is it
//! trusted again. This is the "expectations" idea of kube-controller-manager, keyed
//! by resourceVersion instead of counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Resource;
use tokio::time::Instant;

/// How long a write's response may stand in for a cache that has not caught up.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Above this many entries, a write first drops expired ones.
const PRUNE_ABOVE: usize = 1024;

/// Which copy [`Overlay::observe`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The watch cache is current (or has nothing newer to compare with).
    Cache,
    /// Our own write is newer than the cache; the caller should look again after the
    /// TTL in case the cache never catches up (the object was deleted meanwhile).
    Written,
}

pub struct Overlay<K> {
    ttl: Duration,
    written: Mutex<HashMap<String, (Arc<K>, Instant)>>,
}

impl<K> Default for Overlay<K> {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            written: Mutex::new(HashMap::new()),
        }
    }
}

/// `a` is a later version than `b`. resourceVersions are opaque to clients, but every
/// Kubernetes storage backend in use issues increasing integers; anything else is
/// treated as "not later", which falls back to trusting the cache.
fn later(a: Option<&str>, b: Option<&str>) -> bool {
    match (
        a.and_then(|a| a.parse::<u64>().ok()),
        b.and_then(|b| b.parse::<u64>().ok()),
    ) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}

impl<K: Resource> Overlay<K> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            written: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Remembers the API server's answer to a write of `key`.
    pub fn record(&self, key: &str, object: K) {
        let now = Instant::now();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.len() > PRUNE_ABOVE {
            written.retain(|_, (_, at)| now.saturating_duration_since(*at) < self.ttl);
        }
        written.insert(key.to_string(), (Arc::new(object), now));
    }

    /// Drops what we remember of `key` (after deleting it).
    pub fn forget(&self, key: &str) {
        self.written.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// The newer of the cache's copy of `key` and our last write of it.
    pub fn observe(&self, key: &str, cached: Option<Arc<K>>) -> (Option<Arc<K>>, Source) {
        self.observe_at(key, cached, Instant::now())
    }

    fn observe_at(&self, key: &str, cached: Option<Arc<K>>, now: Instant) -> (Option<Arc<K>>, Source) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let Some((ours, at)) = written.get(key).cloned() else {
            return (cached, Source::Cache);
        };
        let fresh = now.saturating_duration_since(at) < self.ttl;
        let cache_behind = match &cached {
            Some(c) => later(
                ours.meta().resource_version.as_deref(),
                c.meta().resource_version.as_deref(),
            ),
            None => true,
        };
        if fresh && cache_behind {
            return (Some(ours), Source::Written);
        }
        written.remove(key);
        (cached, Source::Cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(rv: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("a".into());
        cm.metadata.resource_version = Some(rv.into());
        cm
    }

    fn rv(o: &Option<Arc<ConfigMap>>) -> Option<String> {
        o.as_ref().and_then(|c| c.metadata.resource_version.clone())
    }

    #[test]
    fn our_write_stands_in_until_the_cache_catches_up() {
        let overlay = Overlay::new(Duration::from_secs(10));
        let t0 = Instant::now();
        overlay.record("ns/a", cm("7"));
        // The cache has not seen it at all, then only an older version.
        let (seen, source) = overlay.observe_at("ns/a", None, t0);
        assert_eq!((rv(&seen), source), (Some("7".into()), Source::Written));
        let (seen, source) = overlay.observe_at("ns/a", Some(Arc::new(cm("5"))), t0);
        assert_eq!((rv(&seen), source), (Some("7".into()), Source::Written));
        // Caught up (or an even newer edit by someone else): the cache wins for good.
        let (seen, source) = overlay.observe_at("ns/a", Some(Arc::new(cm("9"))), t0);
        assert_eq!((rv(&seen), source), (Some("9".into()), Source::Cache));
        let (seen, _) = overlay.observe_at("ns/a", None, t0);
        assert_eq!(seen, None, "the entry is gone once the cache caught up");
    }

    #[test]
    fn a_cache_that_stays_behind_is_trusted_after_the_ttl() {
        let overlay = Overlay::new(Duration::from_secs(10));
        let t0 = Instant::now();
        overlay.record("ns/a", cm("7"));
        let (seen, source) = overlay.observe_at("ns/a", None, t0 + Duration::from_secs(11));
        assert_eq!(
            (seen, source),
            (None, Source::Cache),
            "deleted meanwhile: write it again"
        );
    }

    #[test]
    fn opaque_versions_fall_back_to_the_cache() {
        let overlay = Overlay::new(Duration::from_secs(10));
        overlay.record("ns/a", cm("x7"));
        let (seen, source) = overlay.observe_at("ns/a", Some(Arc::new(cm("x5"))), Instant::now());
        assert_eq!((rv(&seen), source), (Some("x5".into()), Source::Cache));
    }
}
