//! Condition types and reasons shared by controllers and the tests that read them.

/// The summary condition every Chassis kind reports.
pub const READY: &str = "Ready";

/// `metav1.Condition` status values.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";
