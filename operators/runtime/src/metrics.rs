//! Prometheus metrics every controller reports: reconciles, errors by kind and a
//! duration histogram, labelled by controller; plus leader and readiness gauges.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    kind: String,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s: a reconcile is a handful of API calls.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The process-wide registry and metric families.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub leader: Gauge,
    pub ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("chassis");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let leader = Gauge::default();
        let ready = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciliations started, per controller",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, per controller and error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconciliation took, per controller",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 when this instance holds the leader lease",
            leader.clone(),
        );
        registry.register("ready", "1 when this instance reports ready", ready.clone());
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader,
            ready,
        }
    }
}

impl Metrics {
    /// The handle one controller records with.
    pub fn controller(self: &Arc<Self>, name: &str) -> ControllerMetrics {
        ControllerMetrics {
            metrics: self.clone(),
            labels: ControllerLabels {
                controller: name.to_string(),
            },
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Metrics of one controller.
#[derive(Clone)]
pub struct ControllerMetrics {
    metrics: Arc<Metrics>,
    labels: ControllerLabels,
}

impl ControllerMetrics {
    /// Counts a reconcile and times it until the guard drops.
    pub fn reconcile(&self) -> ReconcileTimer {
        self.metrics.reconciles.get_or_create(&self.labels).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.metrics.duration.get_or_create(&self.labels).clone(),
        }
    }

    /// Counts a failed reconcile by error kind (a short, stable label).
    pub fn error(&self, kind: &str) {
        let labels = ErrorLabels {
            controller: self.labels.controller.clone(),
            kind: kind.to_string(),
        };
        self.metrics.errors.get_or_create(&labels).inc();
    }
}

/// Observes the elapsed time of a reconcile when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_are_labelled_by_controller() {
        let metrics = Arc::new(Metrics::default());
        let project = metrics.controller("project");
        drop(project.reconcile());
        drop(project.reconcile());
        project.error("apply");
        let text = metrics.encode();
        assert!(
            text.contains("chassis_reconciles_total{controller=\"project\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("chassis_reconcile_errors_total{controller=\"project\",kind=\"apply\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chassis_reconcile_duration_seconds_count{controller=\"project\"} 2"),
            "{text}"
        );
    }
}
