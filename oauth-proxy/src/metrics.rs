//! Prometheus metrics of the proxy, served on their own address so the proxied
//! upstream's namespace never exposes them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub reason: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub logins: Counter,
    pub refreshes: Counter,
    /// Refresh tokens revoked at the issuer on sign-out, and those it did not confirm.
    pub revocations: Counter,
    pub revocation_failures: Counter,
    /// Requests refused, by reason (no_session, forbidden, csrf, replay, bad_path, ...).
    pub refusals: Family<Outcome, Counter>,
    pub upstream_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("chassis_oauth_proxy");
        let logins = Counter::default();
        let refreshes = Counter::default();
        let revocations = Counter::default();
        let revocation_failures = Counter::default();
        let refusals = Family::<Outcome, Counter>::default();
        let upstream_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register("logins", "Completed logins", logins.clone());
        registry.register("refreshes", "Token refreshes started", refreshes.clone());
        registry.register(
            "revocations",
            "Refresh tokens revoked at the issuer on sign-out",
            revocations.clone(),
        );
        registry.register(
            "revocation_failures",
            "Refresh tokens whose revocation at the issuer failed on sign-out",
            revocation_failures.clone(),
        );
        registry.register("refusals", "Requests refused, by reason", refusals.clone());
        registry.register(
            "upstream_seconds",
            "Time to the upstream's response headers",
            upstream_seconds.clone(),
        );
        Self {
            registry,
            logins,
            refreshes,
            revocations,
            revocation_failures,
            refusals,
            upstream_seconds,
        }
    }
}

impl Metrics {
    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&Outcome {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
