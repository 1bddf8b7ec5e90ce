//! The handle the manager gets from each area's controller constructor, and the
//! tracking of when a controller's watches have finished their initial list.
//!
//! `Store::wait_until_ready` is not used for readiness: kube-runtime 5 keeps one
//! waker per store, so when the Controller and another task both wait on the same
//! store, one of them may never be woken. Watching the `InitDone` event of each
//! stream instead is exact and has no such race.

use futures::future::BoxFuture;
use kube::runtime::watcher;
use tokio::sync::watch;

/// What the manager's flags set for every controller.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Identity of this replica, for Events.
    pub instance: Option<String>,
    /// Reconciles a controller runs at once; this bounds the operator's memory and its
    /// load on the API server during a burst.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            instance: None,
            concurrency: 32,
        }
    }
}

impl Settings {
    /// kube-runtime's controller configuration for these settings.
    pub fn controller_config(&self) -> kube::runtime::controller::Config {
        kube::runtime::controller::Config::default().concurrency(self.concurrency)
    }
}

/// A controller that has been wired but not yet driven.
pub struct Running {
    /// Name used in `--controllers`, metrics and logs.
    pub name: &'static str,
    /// Resolves once every watch the controller reads has finished its initial list.
    pub synced: BoxFuture<'static, ()>,
    /// Drives the controller until shutdown.
    pub run: BoxFuture<'static, ()>,
}

impl Running {
    /// Drives a kube-runtime controller's result stream (after `graceful_shutdown_on`
    /// and `run`) to its end. The error policy has already logged and counted each
    /// failed reconcile, so the stream's errors are only traced at debug here.
    pub fn drive<S, T, E>(name: &'static str, synced: BoxFuture<'static, ()>, results: S) -> Self
    where
        S: futures::Stream<Item = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        use futures::StreamExt;
        let run = results.for_each(move |result| async move {
            if let Err(err) = result {
                tracing::debug!(controller = name, error = %err, "controller event");
            }
        });
        Self {
            name,
            synced,
            run: Box::pin(run),
        }
    }
}

/// Collects one flag per watch stream; [`InitialSync::done`] resolves when all are set.
#[derive(Default)]
pub struct InitialSync {
    receivers: Vec<watch::Receiver<bool>>,
    all: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Whether every watch of a controller has listed once. kube-runtime starts
/// reconciling when the main store is ready, not the others: a reconcile that reads
/// another store checks this first, or it would take an empty store for the truth
/// (a missing template, children to create) after every restart.
#[derive(Clone, Debug, Default)]
pub struct Synced(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Synced {
    pub fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl InitialSync {
    /// A callback for `StreamExt::inspect` on a watcher stream (after `reflect`) that
    /// marks this stream synced at its first `InitDone`.
    pub fn track<K, E>(&mut self) -> impl FnMut(&Result<watcher::Event<K>, E>) + Send + 'static {
        let (tx, rx) = watch::channel(false);
        self.receivers.push(rx);
        move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                tx.send_replace(true);
            }
        }
    }

    /// A watch of `api` reflected into a new store, retried with [`WatchBackoff`] and
    /// tracked for readiness: the store and the stream of watch events to drive.
    pub fn reflect<K>(
        &mut self,
        api: kube::Api<K>,
        config: watcher::Config,
    ) -> (
        kube::runtime::reflector::Store<K>,
        impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    )
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        self.reflect_trimmed(api, config, |_: &mut K| {})
    }

    /// [`InitialSync::reflect`], with `trim` applied to each object before it is
    /// stored, to keep only what the controller reads (memory grows with the cluster).
    pub fn reflect_trimmed<K, F>(
        &mut self,
        api: kube::Api<K>,
        config: watcher::Config,
        trim: F,
    ) -> (
        kube::runtime::reflector::Store<K>,
        impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    )
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
        F: FnMut(&mut K) + Send + 'static,
    {
        use futures::StreamExt;
        use kube::runtime::WatchStreamExt;
        let (store, writer) = kube::runtime::reflector::store::<K>();
        let events = watcher(api, config)
            .backoff(WatchBackoff::default())
            .modify(trim)
            .reflect(writer);
        let stream = replay_after_init(events, store.clone()).inspect(self.track());
        (store, stream)
    }

    /// A flag that turns true when [`InitialSync::done`] resolves.
    pub fn flag(&self) -> Synced {
        Synced(self.all.clone())
    }

    /// Resolves when every tracked stream has synced.
    pub fn done(self) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            for mut rx in self.receivers {
                let _ = rx.wait_for(|synced| *synced).await;
            }
            self.all.store(true, std::sync::atomic::Ordering::Release);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use k8s_openapi::api::core::v1::ConfigMap;

    #[tokio::test]
    async fn done_waits_for_every_stream() {
        let mut sync = InitialSync::default();
        let mut a = sync.track::<ConfigMap, ()>();
        let mut b = sync.track::<ConfigMap, ()>();
        let flag = sync.flag();
        let mut done = sync.done();
        a(&Ok(watcher::Event::InitDone));
        assert!(
            (&mut done).now_or_never().is_none(),
            "one stream is still listing"
        );
        b(&Ok(watcher::Event::Init));
        assert!((&mut done).now_or_never().is_none(), "Init is not InitDone");
        b(&Ok(watcher::Event::InitDone));
        assert!(!flag.get());
        assert!(done.now_or_never().is_some());
        assert!(flag.get(), "the flag follows done()");
    }
}

/// Takes the events after `reflect` into `store`: holds back a list's `InitApply`
/// events and, once its `InitDone` has put them in the store, replays the store instead.
///
/// kube-runtime's Controller looks each triggered object up in the store, but the
/// reflector fills the store only at `InitDone`. When a watch is lost and listed again
/// (`410 Gone` after the API server closed a slow watch, or a restart of the API
/// server), an object created meanwhile was looked up in the old store, not found, and
/// dropped without a retry: 1000 projects at once left some of them never reconciled.
///
/// An object deleted while the watch was down is simply missing from the new list, and
/// the reflector drops it without an event; it is handed on as a `Delete` (its last
/// known state) once the list is in, so what it woke when deleted (an owner, the
/// projects of a template) is woken now instead of at the next resync.
fn replay_after_init<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    store: kube::runtime::reflector::Store<K>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    use futures::StreamExt;
    use futures::future::Either;
    use kube::runtime::reflector::ObjectRef;
    // What the store held when the list began (the reflector swaps it only at InitDone).
    let mut before = Vec::new();
    events.flat_map(move |event| match event {
        Ok(watcher::Event::Init) => {
            before = store.state();
            Either::Left(futures::stream::iter(Some(Ok(watcher::Event::Init))))
        }
        Ok(watcher::Event::InitApply(_)) => Either::Left(futures::stream::iter(None)),
        Ok(watcher::Event::InitDone) => {
            let gone = std::mem::take(&mut before)
                .into_iter()
                .filter(|old| store.get(&ObjectRef::from_obj(old)).is_none())
                .map(|old| Ok(watcher::Event::Delete(K::clone(&old))));
            let replay: Vec<_> = gone
                .chain(
                    store
                        .state()
                        .into_iter()
                        .map(|object| Ok(watcher::Event::InitApply(K::clone(&object)))),
                )
                .chain(std::iter::once(Ok(watcher::Event::InitDone)))
                .collect();
            Either::Right(futures::stream::iter(replay))
        }
        other => Either::Left(futures::stream::iter(Some(other))),
    })
}

#[cfg(test)]
mod replay_tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::ResourceExt;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::reflector::{self, ObjectRef};
    use watcher::Event;

    fn map(name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm
    }

    #[tokio::test]
    async fn an_object_created_while_the_watch_was_down_reaches_the_controller_after_the_store_has_it() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let events = [
            Event::Init,
            Event::InitApply(map("a")),
            Event::InitDone,
            // The watch is lost; "b" is created meanwhile; the relist returns both.
            Event::Init,
            Event::InitApply(map("a")),
            Event::InitApply(map("b")),
            Event::InitDone,
            Event::Apply(map("c")),
        ];
        let events = futures::stream::iter(events.map(Ok)).reflect(writer);
        let stream = replay_after_init(events, store.clone());
        let mut stream = std::pin::pin!(stream);
        let mut lists = vec![Vec::new()];
        while let Some(Ok(event)) = stream.next().await {
            match event {
                Event::InitApply(o) | Event::Apply(o) => {
                    assert!(
                        store.get(&ObjectRef::from_obj(&o)).is_some(),
                        "{} was handed on before the store held it",
                        o.name_any()
                    );
                    if let Some(list) = lists.last_mut() {
                        list.push(o.name_any());
                    }
                }
                Event::InitDone => lists.push(Vec::new()),
                _ => {}
            }
        }
        for list in &mut lists {
            list.sort();
        }
        assert_eq!(lists, [vec!["a"], vec!["a", "b"], vec!["c"]]);
    }

    #[tokio::test]
    async fn an_object_deleted_while_the_watch_was_down_is_handed_on_as_deleted() {
        let (store, writer) = reflector::store::<ConfigMap>();
        let events = [
            Event::Init,
            Event::InitApply(map("a")),
            Event::InitApply(map("b")),
            Event::InitDone,
            // The watch is lost; "a" is deleted meanwhile: the relist has only "b".
            Event::Init,
            Event::InitApply(map("b")),
            Event::InitDone,
        ];
        let events = futures::stream::iter(events.map(Ok)).reflect(writer);
        let stream = replay_after_init(events, store.clone());
        let deleted: Vec<String> = stream
            .filter_map(|event| async move {
                match event {
                    Ok(Event::Delete(o)) => Some(o.name_any()),
                    _ => None,
                }
            })
            .collect()
            .await;
        assert_eq!(deleted, ["a"], "only what vanished, once");
        assert!(store.get(&ObjectRef::new("a")).is_none());
    }
}

/// Backoff for watch streams: 500 ms doubling to at most 5 s, reset once a watch
/// works again. kube-runtime's default goes to 30 s, which makes an operator whose
/// RBAC was just fixed wait long before it lists again.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const MIN: std::time::Duration = std::time::Duration::from_millis(500);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let current = self.next;
        self.next = (current * 2).min(Self::MAX);
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;
    use kube::runtime::utils::Backoff;
    use std::time::Duration;

    #[test]
    fn doubles_to_five_seconds_and_resets() {
        let mut b = WatchBackoff::default();
        let first: Vec<_> = (&mut b).take(6).collect();
        assert_eq!(
            first,
            [500, 1000, 2000, 4000, 5000, 5000]
                .map(Duration::from_millis)
                .to_vec()
        );
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(500)));
    }
}
