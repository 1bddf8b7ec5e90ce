//! What the API server answered to our own writes, laid over the watch caches.
//!
//! A reconcile often runs again before the watch has delivered the object it just
//! wrote (a child's event wakes the parent while its siblings are still in flight).
//! Judged from the cache alone, those siblings look missing and would be written a
//! second time. The overlay keeps each write's response until the cache holds that
//! version or a newer one. When the cache is still behind after [`Overlay::ttl`] (an
//! overloaded API server can delay watch events by that much, or the object was
//! deleted before the cache saw it), neither copy is trusted: the caller reads the
//! API server ([`Source::Unconfirmed`]), which costs one read instead of a second
//! create that fails and an apply. This is the "expectations" idea of
//! kube-controller-manager, keyed by resourceVersion instead of counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Resource;
use tokio::time::Instant;

/// How long a write's response may stand in for a cache that has not caught up.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// How long a write is remembered at all (by its resourceVersion only, once its
/// object has expired), so that a cache lagging even longer is still noticed.
const REMEMBER: Duration = Duration::from_secs(300);

/// Which copy [`Overlay::observe`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The watch cache is current (or has nothing newer to compare with).
    Cache,
    /// Our own write is newer than the cache; the caller should look again after the
    /// TTL in case the cache never catches up (the object was deleted meanwhile).
    Written,
    /// Our write is older than the TTL and the cache still has not shown it: the
    /// returned cached copy is stale, so read the object from the API server.
    Unconfirmed,
}

struct Entry<K> {
    /// The response, while it may stand in for the cache (dropped after the TTL).
    object: Option<Arc<K>>,
    version: Option<String>,
    at: Instant,
}

pub struct Overlay<K> {
    ttl: Duration,
    written: Mutex<Written<K>>,
}

struct Written<K> {
    entries: HashMap<String, Entry<K>>,
    /// When expired objects were last dropped (on a write, at most once per TTL, so a
    /// burst of writes costs no repeated scans; the objects of the last TTL before
    /// writes stop stay until the next write or until they are observed).
    pruned_at: Instant,
}

impl<K> Default for Overlay<K> {
    fn default() -> Self {
        Self::with_ttl(DEFAULT_TTL)
    }
}

impl<K> Overlay<K> {
    fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            written: Mutex::new(Written {
                entries: HashMap::new(),
                pruned_at: Instant::now(),
            }),
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
        Self::with_ttl(ttl)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Remembers the API server's answer to a write of `key`; returns it shared.
    pub fn record(&self, key: &str, object: K) -> Arc<K> {
        let now = Instant::now();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(written.pruned_at) >= self.ttl {
            written.pruned_at = now;
            written
                .entries
                .retain(|_, e| now.saturating_duration_since(e.at) < REMEMBER);
            for entry in written.entries.values_mut() {
                if now.saturating_duration_since(entry.at) >= self.ttl {
                    entry.object = None;
                }
            }
        }
        let version = object.meta().resource_version.clone();
        let object = Arc::new(object);
        written.entries.insert(
            key.to_string(),
            Entry {
                object: Some(object.clone()),
                version,
                at: now,
            },
        );
        object
    }

    /// Settles a [`Source::Unconfirmed`] key: `read` fetches the object from the API
    /// server; trimmed, it is recorded so that it stands in for the lagging cache from
    /// now on, like a write (the next reconcile must not trust the stale cache again).
    pub async fn read_through<E>(
        &self,
        key: &str,
        read: impl std::future::Future<Output = Result<Option<K>, E>>,
        trim: impl FnOnce(&mut K),
    ) -> Result<Option<Arc<K>>, E> {
        let Some(mut live) = read.await? else {
            return Ok(None);
        };
        trim(&mut live);
        Ok(Some(self.record(key, live)))
    }

    /// Drops what we remember of `key` (after deleting it).
    pub fn forget(&self, key: &str) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .remove(key);
    }

    /// The newer of the cache's copy of `key` and our last write of it.
    pub fn observe(&self, key: &str, cached: Option<Arc<K>>) -> (Option<Arc<K>>, Source) {
        self.observe_at(key, cached, Instant::now())
    }

    fn observe_at(&self, key: &str, cached: Option<Arc<K>>, now: Instant) -> (Option<Arc<K>>, Source) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = written.entries.get(key) else {
            return (cached, Source::Cache);
        };
        let cache_behind = match &cached {
            Some(c) => later(entry.version.as_deref(), c.meta().resource_version.as_deref()),
            None => true,
        };
        let fresh = now.saturating_duration_since(entry.at) < self.ttl;
        match (&entry.object, fresh, cache_behind) {
            (Some(ours), true, true) => (Some(ours.clone()), Source::Written),
            (_, _, true) => {
                // Read once; the caller's live copy settles it.
                written.entries.remove(key);
                (cached, Source::Unconfirmed)
            }
            (_, _, false) => {
                written.entries.remove(key);
                (cached, Source::Cache)
            }
        }
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
    fn a_cache_still_behind_after_the_ttl_is_unconfirmed() {
        let overlay = Overlay::new(Duration::from_secs(10));
        let t0 = Instant::now();
        overlay.record("ns/a", cm("7"));
        // Deleted meanwhile, or a watch more than the TTL behind: neither copy is
        // trusted, the caller must read the API server (and it does so once).
        let (seen, source) = overlay.observe_at("ns/a", None, t0 + Duration::from_secs(11));
        assert_eq!((seen, source), (None, Source::Unconfirmed));
        let (_, source) = overlay.observe_at("ns/a", None, t0 + Duration::from_secs(12));
        assert_eq!(source, Source::Cache);
        overlay.record("ns/b", cm("9"));
        let (seen, source) =
            overlay.observe_at("ns/b", Some(Arc::new(cm("8"))), t0 + Duration::from_secs(11));
        assert_eq!((rv(&seen), source), (Some("8".into()), Source::Unconfirmed));
    }

    #[tokio::test]
    async fn a_live_copy_read_through_stands_in_for_the_lagging_cache() {
        let overlay = Overlay::new(Duration::from_secs(10));
        let t0 = Instant::now();
        overlay.record("ns/a", cm("7"));
        let stale = Some(Arc::new(cm("5")));
        let (_, source) = overlay.observe_at("ns/a", stale.clone(), t0 + Duration::from_secs(11));
        assert_eq!(source, Source::Unconfirmed);
        let live = overlay
            .read_through("ns/a", async { Ok::<_, ()>(Some(cm("8"))) }, |c| {
                c.metadata.labels = None;
            })
            .await;
        assert_eq!(live.map(|l| rv(&l)), Ok(Some("8".into())));
        // The cache is still at 5: the live copy, not the stale cache, is what counts.
        let (seen, source) = overlay.observe("ns/a", stale.clone());
        assert_eq!((rv(&seen), source), (Some("8".into()), Source::Written));
        // Gone on the server: nothing is recorded, so the write is settled.
        overlay.record("ns/b", cm("9"));
        let (_, source) = overlay.observe_at("ns/b", stale.clone(), t0 + Duration::from_secs(11));
        assert_eq!(source, Source::Unconfirmed);
        let gone = overlay
            .read_through("ns/b", async { Ok::<_, ()>(None) }, |_| {})
            .await;
        assert_eq!(gone, Ok(None));
        let (seen, source) = overlay.observe("ns/b", stale);
        assert_eq!((rv(&seen), source), (Some("5".into()), Source::Cache));
    }

    #[test]
    fn pruning_drops_expired_objects_but_keeps_their_versions() {
        let overlay = Overlay::new(Duration::from_millis(0));
        overlay.record("ns/0", cm("7"));
        overlay.record("ns/1", cm("8"));
        let objects = |o: &Overlay<ConfigMap>| {
            let written = o.written.lock().unwrap_or_else(|e| e.into_inner());
            written.entries.values().filter(|e| e.object.is_some()).count()
        };
        assert_eq!(objects(&overlay), 1, "the older object was dropped");
        // A cache that never showed the pruned write is still noticed.
        let (seen, source) = overlay.observe("ns/0", None);
        assert_eq!((seen, source), (None, Source::Unconfirmed));
    }

    #[test]
    fn opaque_versions_fall_back_to_the_cache() {
        let overlay = Overlay::new(Duration::from_secs(10));
        overlay.record("ns/a", cm("x7"));
        let (seen, source) = overlay.observe_at("ns/a", Some(Arc::new(cm("x5"))), Instant::now());
        assert_eq!((rv(&seen), source), (Some("x5".into()), Source::Cache));
    }
}
