//! chassis-runtime owns the plumbing every Chassis controller shares, so that each
//! area crate only holds its observe → validate → build → apply → status steps:
//!
//! ```text
//!  watch ─▶ reflector stores ─▶ reconcile(observe, validate, build) ─▶ apply ─▶ status
//!                 │                                       │               │
//!             health (/readyz)                 backoff, metrics, events   conditions
//! ```
//!
//! - [`client`]: the shared API client, over HTTP/2 like client-go;
//! - [`apply`]: server-side apply with one field manager per controller, a hash
//!   annotation that skips no-op writes, owner references and pruning;
//! - [`conditions`]: `metav1.Condition` upserts whose `lastTransitionTime` moves only
//!   when the status flips;
//! - [`backoff`]: per-object exponential backoff, reset on success;
//! - [`metrics`], [`health`]: Prometheus metrics, `/healthz`, `/readyz`, `/metrics`;
//! - [`overlay`]: our writes' responses over the watch caches, so a lagging cache
//!   never causes a second write;
//! - [`pace`]: token-bucket pacing of fan-out triggers (template rollouts);
//! - [`leader`]: leader election on a Lease (kube-lease-manager);
//! - [`telemetry`], [`shutdown`]: JSON logs with an env filter, SIGTERM handling.
//!
//! It knows no Chassis kind: area crates call it, never the other way round.

pub mod apply;
pub mod backoff;
pub mod client;
pub mod conditions;
pub mod context;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod overlay;
pub mod pace;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;
pub mod webhook_secret;

pub use context::Context;
pub mod controller;
