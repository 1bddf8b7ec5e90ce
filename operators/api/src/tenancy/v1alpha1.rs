//! `tenancy.chassis.dev/v1alpha1`: `ProjectTemplate` and `Project`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LimitRangeSpec, ResourceQuotaSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What every project created from this template gets: namespace metadata, a pod
/// security level, quota, limits, network profiles and the roles its members are
/// bound to. Cluster-scoped; projects name it in `spec.template`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tenancy.chassis.dev",
    version = "v1alpha1",
    kind = "ProjectTemplate",
    doc = "ProjectTemplate says what every project made from it gets: namespace labels and annotations, Pod Security level, quota, limits, network profiles and member roles.",
    plural = "projecttemplates",
    shortname = "ptpl",
    category = "chassis",
    status = "ProjectTemplateStatus",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "PodSecurity", type_ = "string", json_path = ".spec.podSecurity"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProjectTemplateSpec {
    /// Labels copied onto every project namespace. Keys under
    /// `pod-security.kubernetes.io/` and `tenancy.chassis.dev/` are reserved, and so is
    /// `kubernetes.io/metadata.name`, which the API server sets to the namespace's name
    /// (a template value would be rewritten on every apply, a write each time).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(k, !k.startsWith('pod-security.kubernetes.io/') && !k.startsWith('tenancy.chassis.dev/') && k != 'kubernetes.io/metadata.name')"
    ).message("labels under pod-security.kubernetes.io/ and tenancy.chassis.dev/ are set by Chassis (use spec.podSecurity), and kubernetes.io/metadata.name by the API server"))]
    pub labels: BTreeMap<String, String>,

    /// Annotations copied onto every project namespace. Keys under
    /// `tenancy.chassis.dev/` and `network.chassis.dev/` are reserved: Chassis writes
    /// them (a profile bound through an annotation here would apply while the
    /// project's `NetworkReady` said no profile is bound).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(
        "self.all(k, !k.startsWith('tenancy.chassis.dev/') && !k.startsWith('network.chassis.dev/'))"
    ).message("annotations under tenancy.chassis.dev/ and network.chassis.dev/ are set by Chassis; bind profiles with networkProfiles"))]
    pub annotations: BTreeMap<String, String>,

    /// Pod Security Standard enforced in project namespaces, written as the
    /// `pod-security.kubernetes.io/{enforce,audit,warn}` labels.
    #[serde(default)]
    pub pod_security: PodSecurityLevel,

    /// ResourceQuota created in every project namespace (omit for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_quota: Option<ResourceQuotaSpec>,

    /// LimitRange created in every project namespace (omit for none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_range: Option<LimitRangeSpec>,

    /// Names of NetworkProfiles (network.chassis.dev) bound to every project (object
    /// names); each at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub network_profiles: Vec<String>,

    /// The ClusterRoles that project admins, editors and viewers are bound to.
    #[serde(default)]
    pub roles: ProjectRoles,

    /// How many projects one user may have in all (whatever their templates) when they
    /// create one with this template; unlimited when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_projects_per_user: Option<i32>,
}

/// A Pod Security Standard level: `restricted` (current hardening best practice),
/// `baseline` (prevents known privilege escalations) or `privileged` (unrestricted).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    #[default]
    Restricted,
    Baseline,
    Privileged,
}

impl PodSecurityLevel {
    /// The label value Kubernetes' Pod Security admission expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Restricted => "restricted",
            Self::Baseline => "baseline",
            Self::Privileged => "privileged",
        }
    }
}

/// ClusterRole names for each kind of project member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectRoles {
    /// ClusterRole bound to `spec.admins` in the project namespace.
    #[serde(default = "default_admin_role")]
    #[schemars(length(min = 1))]
    pub admin: String,
    /// ClusterRole bound to `spec.editors` in the project namespace.
    #[serde(default = "default_edit_role")]
    #[schemars(length(min = 1))]
    pub edit: String,
    /// ClusterRole bound to `spec.viewers` in the project namespace.
    #[serde(default = "default_view_role")]
    #[schemars(length(min = 1))]
    pub view: String,
}

impl Default for ProjectRoles {
    fn default() -> Self {
        Self {
            admin: default_admin_role(),
            edit: default_edit_role(),
            view: default_view_role(),
        }
    }
}

fn default_admin_role() -> String {
    "admin".into()
}
fn default_edit_role() -> String {
    "edit".into()
}
fn default_view_role() -> String {
    "view".into()
}

/// Observed state of a ProjectTemplate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectTemplateStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and its reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A self-service project: a namespace with its members, quota and network policy,
/// made from a ProjectTemplate. Cluster-scoped; the namespace has the project's name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tenancy.chassis.dev",
    version = "v1alpha1",
    kind = "Project",
    doc = "Project is a self-service namespace for an application team, made from a ProjectTemplate; the namespace has the project's name.",
    plural = "projects",
    shortname = "proj",
    category = "chassis",
    status = "ProjectStatus",
    validation = kube::core::Rule::new(
        "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')"
    ).message("a Project name must be a valid namespace name: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Template", type_ = "string", json_path = ".spec.template"),
    printcolumn(name = "Display Name", type_ = "string", json_path = ".spec.displayName", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// Human-friendly name shown in tools; copied to the namespace annotation
    /// `tenancy.chassis.dev/display-name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,

    /// What the project is for; copied to the namespace annotation
    /// `tenancy.chassis.dev/description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub description: Option<String>,

    /// Name of the ProjectTemplate this project is made from (an object name, a DNS
    /// subdomain). Fixed at creation: admission checks that the requester may use it.
    #[serde(default = "default_template")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf")
        .message("spec.template cannot change after creation; create a new project instead"))]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"))]
    pub template: String,

    /// Subjects bound to the template's admin role in the project namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<Subject>,

    /// Subjects bound to the template's edit role in the project namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub editors: Vec<Subject>,

    /// Subjects bound to the template's view role in the project namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub viewers: Vec<Subject>,
}

fn default_template() -> String {
    "default".into()
}

impl Default for ProjectSpec {
    /// The same defaults the API server applies: template `default`, no members.
    fn default() -> Self {
        Self {
            display_name: None,
            description: None,
            template: default_template(),
            admins: Vec::new(),
            editors: Vec::new(),
            viewers: Vec::new(),
        }
    }
}

/// An RBAC subject: a user, a group or a ServiceAccount.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new(
    "self.kind == 'ServiceAccount' ? has(self.__namespace__) : !has(self.__namespace__)"
).message("namespace is required for a ServiceAccount subject and not allowed for a User or Group"))]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Kind of subject: `User`, `Group` or `ServiceAccount`.
    pub kind: SubjectKind,
    /// Name of the user, group or ServiceAccount.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the ServiceAccount (only for `kind: ServiceAccount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The kinds of RBAC subject a project member can be: `User` and `Group` as named
/// by the cluster's authenticator, or a `ServiceAccount`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectKind {
    User,
    Group,
    ServiceAccount,
}

/// Observed state of a Project.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The project's namespace, once it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `Ready`, plus `NamespaceReady`, `RBACReady`, `QuotaReady` and `NetworkReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::crd::CustomResourceExt;

    #[test]
    fn project_defaults_to_the_default_template() -> Result<(), serde_json::Error> {
        let spec: ProjectSpec = serde_json::from_str("{}")?;
        assert_eq!(spec, ProjectSpec::default(), "Rust and serde defaults agree");
        assert_eq!(spec.template, "default");
        assert!(spec.admins.is_empty());
        Ok(())
    }

    #[test]
    fn template_defaults_are_restricted_and_standard_roles() -> Result<(), serde_json::Error> {
        let spec: ProjectTemplateSpec = serde_json::from_str("{}")?;
        assert_eq!(spec.pod_security, PodSecurityLevel::Restricted);
        assert_eq!(spec.roles, ProjectRoles::default());
        assert_eq!(spec.roles.admin, "admin");
        Ok(())
    }

    #[test]
    fn the_project_crd_explains_a_service_account_subject_without_namespace() -> Result<(), serde_json::Error>
    {
        // Category, short name, columns and descriptions: `every_kind_is_listed_like_the_others_and_every_field_is_described`
        // in the crate root checks them for every kind.
        let project = serde_json::to_string(&Project::crd())?;
        assert!(project.contains("namespace is required for a ServiceAccount subject"));
        Ok(())
    }
}
