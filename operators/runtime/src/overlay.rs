//! What the API server answered to our own writes, laid over the watch caches.
//!
//! A reconcile often runs again before the watch has delivered the object it just
//! wrote (a child's event wakes the parent while its siblings are still in flight).
//! Judged from the cache alone, those siblings look missing and would be written a
//! second time. The overlay keeps each write's response until the watch of that kind
//! has delivered an event at or past the write's resourceVersion ([`Progress`]). From
//! then on the cache is exact: it holds our write, a later edit, or nothing because
//! the object was deleted (whose event woke the reconcile). Until then our copy stands
//! in, however long the watch lags, so a lagging watch costs no reads: the API server
//! delays watch events when it is overloaded, the worst time to read it. This is the
//! "expectations" idea of kube-controller-manager, keyed by resourceVersion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kube::Resource;
use kube::runtime::watcher;

/// Entries the overlay may hold before it drops those the watch has passed (an
/// entry normally goes when its object is next observed; this bounds the rest). The
/// bound then doubles past what is left, so a long lag costs no scan per write.
const PRUNE_ABOVE: usize = 1024;

/// The resourceVersion up to which one watch has delivered its events into its store.
///
/// Events of one watch arrive in resourceVersion order, so the highest version seen
/// so far is a point the store has passed. Objects of a list are handed on only once
/// the store holds the list (`InitialSync::reflect`), and their highest version is at
/// most the list's, so the point never runs ahead of the store.
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    /// A callback for `StreamExt::inspect` on a stream after `InitialSync::reflect`.
    pub fn observer<K: Resource, E>(&self) -> impl FnMut(&Result<watcher::Event<K>, E>) + Send + 'static {
        let seen = self.0.clone();
        move |event| {
            if let Ok(
                watcher::Event::Apply(object)
                | watcher::Event::Delete(object)
                | watcher::Event::InitApply(object),
            ) = event
                && let Some(version) = numeric(object.meta().resource_version.as_deref())
            {
                seen.fetch_max(version, Ordering::AcqRel);
            }
        }
    }

    /// The highest version delivered so far.
    fn seen(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// The watch had delivered `version` or something later when it stood at `seen`. An
/// opaque version is taken as passed: the cache is trusted then, as without an overlay.
fn passed(seen: u64, version: Option<&str>) -> bool {
    numeric(version).is_none_or(|v| seen >= v)
}

/// resourceVersions are opaque to clients, but every Kubernetes storage backend in use
/// issues increasing integers.
fn numeric(version: Option<&str>) -> Option<u64> {
    version.and_then(|v| v.parse().ok())
}

/// `a` is a later version than `b`; opaque versions are never later.
fn later(a: Option<&str>, b: Option<&str>) -> bool {
    match (numeric(a), numeric(b)) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}

/// Our writes of one kind, keyed by `namespace/name` (or `name`), over the cache fed by
/// the watch whose [`Progress`] it follows.
pub struct Overlay<K> {
    progress: Progress,
    written: Mutex<Written<K>>,
}

struct Written<K> {
    entries: HashMap<String, Arc<K>>,
    prune_above: usize,
}

impl<K: Resource> Overlay<K> {
    /// An overlay for a cache fed by the watch `progress` follows.
    pub fn new(progress: Progress) -> Self {
        Self {
            progress,
            written: Mutex::new(Written {
                entries: HashMap::new(),
                prune_above: PRUNE_ABOVE,
            }),
        }
    }

    /// Remembers the API server's answer to a write; returns it shared.
    pub fn record(&self, key: &str, object: K) -> Arc<K> {
        let object = Arc::new(object);
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.entries.len() >= written.prune_above {
            let seen = self.progress.seen();
            written
                .entries
                .retain(|_, o| !passed(seen, o.meta().resource_version.as_deref()));
            written.prune_above = (2 * written.entries.len()).max(PRUNE_ABOVE);
        }
        written.entries.insert(key.to_string(), object.clone());
        object
    }

    /// Forgets a write (the object was deleted by us, or is not wanted any more).
    pub fn forget(&self, key: &str) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .remove(key);
    }

    /// The copy to judge `key` by: our write while the watch has not reached it,
    /// otherwise the cache's copy, which `read` takes from the store (then the entry
    /// goes). The store is read here, after the watch's progress: a copy read earlier
    /// (the one kube-runtime hands to a reconcile) may predate events the progress
    /// already counts, and would be taken for the truth.
    pub fn observe(&self, key: &str, read: impl FnOnce() -> Option<Arc<K>>) -> Option<Arc<K>> {
        // The store holds every event up to `seen`, so a copy read after it is as new.
        let seen = self.progress.seen();
        let cached = read();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ours) = written.entries.get(key) else {
            return cached;
        };
        let version = ours.meta().resource_version.as_deref();
        let cache_behind = match &cached {
            Some(c) => later(version, c.meta().resource_version.as_deref()),
            None => true,
        };
        if cache_behind && !passed(seen, version) {
            return Some(ours.clone());
        }
        written.entries.remove(key);
        cached
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

    /// The cache's copy at version `rv`.
    fn cached(rv: &str) -> Option<Arc<ConfigMap>> {
        Some(Arc::new(cm(rv)))
    }

    /// An overlay over a watch that has delivered nothing yet.
    fn fresh() -> (Progress, Overlay<ConfigMap>) {
        let progress = Progress::default();
        (progress.clone(), Overlay::new(progress))
    }

    /// The watch delivered `event` (of any object of the kind).
    fn delivered(progress: &Progress, event: watcher::Event<ConfigMap>) {
        progress.observer::<ConfigMap, ()>()(&Ok(event));
    }

    #[test]
    fn our_write_stands_in_until_the_cache_catches_up() {
        let (progress, overlay) = fresh();
        overlay.record("ns/a", cm("7"));
        // The cache has not seen it at all, then only an older version.
        assert_eq!(rv(&overlay.observe("ns/a", || None)), Some("7".into()));
        assert_eq!(rv(&overlay.observe("ns/a", || cached("5"))), Some("7".into()));
        // Caught up (or an even newer edit by someone else): the cache wins for good.
        delivered(&progress, watcher::Event::Apply(cm("9")));
        assert_eq!(rv(&overlay.observe("ns/a", || cached("9"))), Some("9".into()));
        assert_eq!(
            overlay.observe("ns/a", || None),
            None,
            "the entry is gone once the cache caught up"
        );
    }

    #[test]
    fn a_lagging_watch_keeps_our_write_however_long_it_lags() {
        let (progress, overlay) = fresh();
        overlay.record("ns/a", cm("7"));
        // Events before our write change nothing, nor does time.
        delivered(&progress, watcher::Event::Apply(cm("6")));
        assert_eq!(rv(&overlay.observe("ns/a", || None)), Some("7".into()));
        assert_eq!(rv(&overlay.observe("ns/a", || cached("6"))), Some("7".into()));
    }

    #[test]
    fn once_the_watch_passed_our_write_a_missing_object_was_deleted() {
        let (progress, overlay) = fresh();
        overlay.record("ns/a", cm("7"));
        // The deletion of "a" (or of any later object) is an event past version 7.
        delivered(&progress, watcher::Event::Delete(cm("10")));
        assert_eq!(
            overlay.observe("ns/a", || None),
            None,
            "deleted: the cache is right"
        );
        // A list's objects count too, once they are handed on.
        let (progress, overlay) = fresh();
        overlay.record("ns/b", cm("8"));
        delivered(&progress, watcher::Event::InitApply(cm("8")));
        assert_eq!(rv(&overlay.observe("ns/b", || cached("8"))), Some("8".into()));
    }

    #[test]
    fn a_copy_read_before_the_watch_moved_on_is_not_taken_for_the_truth() {
        let (progress, overlay) = fresh();
        overlay.record("ns/a", cm("7"));
        // The store is read, then the event of our write arrives: the copy read is
        // older than what the progress now counts, so ours must still stand in.
        let seen = overlay.observe("ns/a", || {
            let read = cached("5");
            delivered(&progress, watcher::Event::Apply(cm("7")));
            read
        });
        assert_eq!(rv(&seen), Some("7".into()));
    }

    #[test]
    fn entries_the_watch_passed_are_dropped_when_many_pile_up() {
        let (progress, overlay) = fresh();
        for i in 0..PRUNE_ABOVE {
            overlay.record(&format!("ns/{i}"), cm(&(i + 1).to_string()));
        }
        delivered(&progress, watcher::Event::Apply(cm("100")));
        overlay.record("ns/last", cm("2000"));
        let held = |o: &Overlay<ConfigMap>| o.written.lock().unwrap_or_else(|e| e.into_inner()).entries.len();
        assert_eq!(
            held(&overlay),
            PRUNE_ABOVE - 100 + 1,
            "versions up to 100 were passed"
        );
        // Writes the watch has not passed survive every later scan.
        for i in 0..PRUNE_ABOVE {
            overlay.record(&format!("ns/more-{i}"), cm(&(3000 + i).to_string()));
        }
        assert_eq!(held(&overlay), 2 * PRUNE_ABOVE - 100 + 1);
    }

    #[test]
    fn opaque_versions_fall_back_to_the_cache() {
        let overlay = Overlay::new(Progress::default());
        overlay.record("ns/a", cm("x7"));
        assert_eq!(rv(&overlay.observe("ns/a", || cached("x5"))), Some("x5".into()));
        overlay.record("ns/b", cm("x7"));
        assert_eq!(overlay.observe("ns/b", || None), None);
    }
}
