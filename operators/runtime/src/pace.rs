//! Paced fan-out: one change that wakes many objects (a template edited under 1000
//! projects) is released at a steady rate, so a rollout never floods the API server.
//!
//! The source stream is drained eagerly into a queue and only the queue is paced:
//! the reflector behind the source keeps its store current during a long rollout.

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

/// Items of `fan_out(item)` for every item of `source`, released through `bucket`.
/// `source` is polled as fast as it yields; its own items are never emitted.
pub fn paced<S, T, F, I>(source: S, mut fan_out: F, bucket: Bucket) -> impl Stream<Item = I> + Send + 'static
where
    S: Stream<Item = T> + Send + 'static,
    F: FnMut(T) -> Vec<I> + Send + 'static,
    I: Send + 'static,
{
    let (tx, rx) = mpsc::unbounded::<I>();
    let driver = source.filter_map(move |item| {
        for out in fan_out(item) {
            // The receiver lives as long as the merged stream, so a send cannot fail
            // while anyone is listening.
            let _ = tx.unbounded_send(out);
        }
        futures::future::ready(None)
    });
    let released = rx.scan(bucket, |bucket, item| {
        let wait = bucket.take(Instant::now());
        async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
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
        let source = futures::stream::iter(vec![5_usize, 5]);
        let drained = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = drained.clone();
        let stream = paced(
            source,
            move |n| {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (0..n).collect()
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
}
