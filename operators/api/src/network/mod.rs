//! `network.chassis.dev`: namespace isolation profiles and ordered egress rules.

pub mod v1alpha1;

/// The API group of this module's kinds.
pub const GROUP: &str = "network.chassis.dev";

/// Label on every NetworkPolicy a NetworkProfile renders, naming the profile.
pub const PROFILE_LABEL: &str = "network.chassis.dev/profile";

/// Label on every NetworkPolicy an EgressPolicy renders, naming the EgressPolicy.
pub const EGRESS_POLICY_LABEL: &str = "network.chassis.dev/egress-policy";

/// Annotation on a namespace listing the NetworkProfiles bound to it by name
/// (comma-separated). The project controller writes it from the template's
/// `networkProfiles`; the profile controller reads it beside `namespaceSelector`.
pub const PROFILES_ANNOTATION: &str = "network.chassis.dev/profiles";

/// Reasons the network kinds report in their `Ready` condition.
pub mod reason {
    pub const APPLIED: &str = "Applied";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const INVALID_RULE: &str = "InvalidRule";
    pub const RULE_SHADOWED: &str = "RuleShadowed";
    pub const CONFLICT: &str = "Conflict";
    pub const TOO_LARGE: &str = "TooLarge";
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
}
