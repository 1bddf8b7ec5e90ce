//! `tenancy.chassis.dev`: self-service projects.

pub mod v1alpha1;

/// The API group of this module's kinds.
pub const GROUP: &str = "tenancy.chassis.dev";

/// Label put on every object a Project owns, naming the Project.
pub const PROJECT_LABEL: &str = "tenancy.chassis.dev/project";

/// Annotation with the user who created a Project (written by admission).
pub const REQUESTER_ANNOTATION: &str = "tenancy.chassis.dev/requester";

/// Annotations carrying the Project's display name and description onto its namespace.
pub const DISPLAY_NAME_ANNOTATION: &str = "tenancy.chassis.dev/display-name";
pub const DESCRIPTION_ANNOTATION: &str = "tenancy.chassis.dev/description";

/// Condition types of a Project, one per part plus `Ready`.
pub mod condition {
    pub const NAMESPACE_READY: &str = "NamespaceReady";
    pub const RBAC_READY: &str = "RBACReady";
    pub const QUOTA_READY: &str = "QuotaReady";
    pub const NETWORK_READY: &str = "NetworkReady";
}

/// Reasons a Project reports in its conditions.
pub mod reason {
    pub const READY: &str = "Ready";
    pub const TEMPLATE_NOT_FOUND: &str = "TemplateNotFound";
    pub const NAMESPACE_CONFLICT: &str = "NamespaceConflict";
    pub const NAMESPACE_TERMINATING: &str = "NamespaceTerminating";
    pub const BOUND: &str = "Bound";
    pub const NO_MEMBERS: &str = "NoMembers";
    pub const APPLIED: &str = "Applied";
    pub const NO_QUOTA: &str = "NoQuota";
    pub const NO_NETWORK_PROFILES: &str = "NoNetworkProfiles";
    pub const NETWORK_PROFILES_PENDING: &str = "NetworkProfilesPending";
    pub const NETWORK_PROFILE_NOT_FOUND: &str = "NetworkProfileNotFound";
    /// The API server refused a child object (a RoleBinding to a role the operator
    /// may not bind, a quota it rejects); the message has its answer.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// A member binding names a ClusterRole that does not exist (the API server accepts
    /// such a RoleBinding; it grants nothing). The template says `RoleNotFound` too.
    pub const ROLE_NOT_FOUND: &str = "RoleNotFound";
}
