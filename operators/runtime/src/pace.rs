//! Paced fan-out: one change that wakes many objects (a template edited under 1000
//! projects) is released at a steady rate, so a rollout never floods the API server.
//!
//! The source stream is drained eagerly into a queue and only the queue is paced:
//! the reflector behind the source keeps its store current during a long rollout.
//! An item already waiting in the queue is not queued again: a template edited five
//! times in a row wakes each of its projects once (the reconcile reads the current
//! template), and the queue never holds more than the distinct items.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

/// A token bucket: `burst` items at once, then `per_second`.
#[derive(Debug, Clone)]
pub struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: f64::from(per_second.max(1)),
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// How long to wait before the next item may go, taking its token.
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

/// Items of `fan_out(item)` for every item of `source`, released through `bucket`,
/// each at most once while it waits. `source` is polled as fast as it yields; its own
/// items are never emitted.
pub fn paced<S, T, F, I>(source: S, mut fan_out: F, bucket: Bucket) -> impl Stream<Item = I> + Send + 'static
where
    S: Stream<Item = T> + Send + 'static,
    F: FnMut(T) -> Vec<I> + Send + 'static,
    I: Hash + Eq + Clone + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded::<I>();
    let queued = Arc::new(Mutex::new(HashSet::<I>::new()));
    let waiting = queued.clone();
    let driver = source.filter_map(move |item| {
        let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
        for out in fan_out(item) {
            if waiting.insert(out.clone()) {
                // The receiver lives as long as the merged stream, so a send cannot
                // fail while anyone is listening.
                let _ = tx.unbounded_send(out);
            }
        }
        futures::future::ready(None)
    });
    let released = rx.scan(bucket, move |bucket, item| {
        let wait = bucket.take(Instant::now());
        let queued = queued.clone();
        async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            // Leaves the queue as it is released: a later change queues it again.
            queued.lock().unwrap_or_else(|p| p.into_inner()).remove(&item);
            Some(item)
        }
    });
    futures::stream::select(driver, released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_at_once_then_the_rate_holds() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10, 3);
        let waits: Vec<Duration> = (0..5).map(|_| bucket.take(start)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3], Duration::from_millis(100));
        assert_eq!(waits[4], Duration::from_millis(200));
        // A second later the bucket is full again, never fuller.
        let later = start + Duration::from_secs(10);
        let waits: Vec<Duration> = (0..4).map(|_| bucket.take(later)).collect();
        assert_eq!(&waits[..3], &[Duration::ZERO; 3]);
        assert_eq!(waits[3], Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn fan_out_is_released_at_the_rate_and_the_source_is_drained_first() {
        let source = futures::stream::iter(vec![0_usize, 1]);
        let drained = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = drained.clone();
        let stream = paced(
            source,
            move |n| {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (n * 5..n * 5 + 5).collect()
            },
            Bucket::new(5, 5),
        );
        let start = Instant::now();
        let out: Vec<usize> = stream.take(10).collect().await;
        assert_eq!(out.len(), 10);
        assert_eq!(drained.load(std::sync::atomic::Ordering::SeqCst), 2);
        // 5 at once, 5 more at 5 per second.
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_still_waiting_is_not_queued_twice_but_a_released_one_is() {
        // Three changes in a row, each waking the same ten items (a template edited
        // three times under ten projects); then, after the queue drained, a fourth.
        let (changes, source) = mpsc::unbounded::<usize>();
        let mut stream = Box::pin(paced(source, |n| (0..n).collect(), Bucket::new(5, 5)));
        for _ in 0..3 {
            changes.unbounded_send(10).expect("the stream is alive");
        }
        let mut first: Vec<usize> = Vec::new();
        for _ in 0..10 {
            first.push(stream.next().await.expect("an item"));
        }
        first.sort_unstable();
        assert_eq!(first, (0..10).collect::<Vec<_>>(), "each item once, none twice");
        let more = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
        assert!(more.is_err(), "no duplicates follow: {more:?}");
        changes.unbounded_send(2).expect("the stream is alive");
        let again: Vec<usize> = vec![
            stream.next().await.expect("an item"),
            stream.next().await.expect("an item"),
        ];
        assert_eq!(
            again,
            vec![0, 1],
            "released items are queued again by a new change"
        );
    }
}
