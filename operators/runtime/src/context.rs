//! What every controller's reconcile gets besides its own stores.

use std::time::Duration;

use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};

use crate::backoff::Backoff;
use crate::metrics::ControllerMetrics;

/// Client, field manager, metrics, events and backoff of one controller.
pub struct Context {
    pub client: Client,
    /// The server-side apply field manager of this controller (`chassis-<name>`).
    pub field_manager: String,
    pub metrics: ControllerMetrics,
    pub recorder: Recorder,
    pub backoff: Backoff,
}

impl Context {
    pub fn new(
        client: Client,
        controller: &str,
        metrics: ControllerMetrics,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: format!("chassis-{controller}"),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            field_manager: field_manager(controller),
            client,
            metrics,
            backoff: Backoff::default(),
        }
    }

    /// Error policy shared by every controller: count the error by kind and retry
    /// this object after its own exponential backoff.
    pub fn retry_after_error(&self, object_key: &str, error_kind: &str) -> Action {
        self.metrics.error(error_kind);
        Action::requeue(self.backoff.failed(object_key))
    }

    /// After a successful reconcile: forget past failures and resync after `every`.
    pub fn success(&self, object_key: &str, every: Duration) -> Action {
        self.backoff.succeeded(object_key);
        Action::requeue(every)
    }
}

/// The server-side-apply field manager of a controller.
pub fn field_manager(controller: &str) -> String {
    format!("chassis-{controller}")
}
