//! `network.chassis.dev/v1alpha1`: `NetworkProfile` and `EgressPolicy`.

use k8s_openapi::api::networking::v1::{NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A named, reusable set of network policies, rendered into native
/// `networking.k8s.io/v1` NetworkPolicies in every namespace it applies to.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "network.chassis.dev",
    version = "v1alpha1",
    kind = "NetworkProfile",
    doc = "NetworkProfile is a reusable set of network policies (isolation, allowed peers, DNS, default egress, raw policies) rendered into NetworkPolicies in every namespace it selects and in every project whose template names it.",
    plural = "networkprofiles",
    shortname = "nprof",
    category = "chassis",
    status = "NetworkProfileStatus",
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("a NetworkProfile name is a DNS label (at most 63 lowercase letters, digits and '-'): it is a label value and part of the rendered policies' names"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Isolation", type_ = "string", json_path = ".spec.isolation"),
    printcolumn(name = "Egress", type_ = "string", json_path = ".spec.egress"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.isolation == 'Namespace' || !has(self.allowFrom) || size(self.allowFrom) == 0")
    .message("allowFrom needs isolation: Namespace: it lets peers in past the isolation, and with None ingress is open to everyone"))]
pub struct NetworkProfileSpec {
    /// Namespaces the profile applies to, in addition to projects whose template
    /// names it. Omit to apply only to those projects; `{}` selects every namespace.
    // Operators checked here, keys and values by the controller (`InvalidSelector`):
    // inside a CRD the API server takes any selector, and one matching nothing would
    // leave namespaces unisolated while the profile reports Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn'] ? (has(e.values) && size(e.values) > 0) : (e.operator in ['Exists', 'DoesNotExist'] && (!has(e.values) || size(e.values) == 0)))")
        .message("each matchExpressions entry needs the operator In or NotIn with values, or Exists or DoesNotExist without values"))]
    pub namespace_selector: Option<LabelSelector>,

    /// `Namespace` denies ingress from other namespaces (pods still reach each other
    /// inside the namespace); `None` leaves ingress open.
    #[serde(default)]
    pub isolation: Isolation,

    /// Peers always allowed in past `isolation: Namespace`, such as ingress
    /// controllers and monitoring (refused with `isolation: None`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("self.all(a, self.exists_one(b, b.name == a.name))")
        .message("allowFrom names must be unique"))]
    pub allow_from: Vec<AllowedPeer>,

    /// With `egress: Deny`, also allow egress to the cluster DNS (pods labelled
    /// `k8s-app: kube-dns` in `kube-system`, port 53 UDP and TCP).
    #[serde(default = "default_true", rename = "allowDNS")]
    pub allow_dns: bool,

    /// Default for egress: `Allow` everything, or `Deny` everything except the
    /// namespace itself (and DNS with `allowDNS`). EgressPolicies open more.
    #[serde(default)]
    pub egress: EgressDefault,

    /// NetworkPolicy specs stamped as given into every matching namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = kube::core::Rule::new("self.all(a, self.exists_one(b, b.name == a.name))")
        .message("policies names must be unique"))]
    pub policies: Vec<StampedPolicy>,
}

impl Default for NetworkProfileSpec {
    fn default() -> Self {
        Self {
            namespace_selector: None,
            isolation: Isolation::default(),
            allow_from: Vec::new(),
            allow_dns: true,
            egress: EgressDefault::default(),
            policies: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Whether pods accept ingress from other namespaces.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    None,
    #[default]
    Namespace,
}

/// The default for egress traffic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EgressDefault {
    #[default]
    Allow,
    Deny,
}

/// A peer always allowed in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllowedPeer {
    /// Names the rendered policy (`profile.<profile>.from-<name>`).
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Namespaces the peer pods run in.
    pub namespace_selector: LabelSelector,
    /// Pods in those namespaces (all when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Ports the peer may reach (all when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

/// A raw NetworkPolicy spec, stamped as `profile.<profile>.<name>`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("!(self.name in ['isolation', 'egress']) && !self.name.startsWith('from-')")
    .message("policy names 'isolation', 'egress' and 'from-*' are the names of the policies the profile renders itself"))]
#[serde(rename_all = "camelCase")]
pub struct StampedPolicy {
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    /// Name of the policy within the profile (a DNS label of at most 40 characters);
    /// the NetworkPolicy in each namespace is `profile.<profile>.<name>`.
    pub name: String,
    pub spec: NetworkPolicySpec,
}

/// Observed state of a NetworkProfile.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkProfileStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Namespaces whose policies are in place, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matched_namespaces: Vec<String>,
    /// `Ready` and its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Ordered egress rules for the selected pods of one namespace: the first rule
/// whose CIDR (and ports) match decides; traffic no rule matches is denied.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "network.chassis.dev",
    version = "v1alpha1",
    kind = "EgressPolicy",
    doc = "EgressPolicy is an ordered list of Allow/Deny CIDR rules for egress from the selected pods; first match wins, default deny. Rendered into an allow-only NetworkPolicy.",
    plural = "egresspolicies",
    shortname = "egp",
    category = "chassis",
    namespaced,
    status = "EgressPolicyStatus",
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63")
        .message("an EgressPolicy name is at most 63 characters: it is the value of the network.chassis.dev/egress-policy label on the NetworkPolicy it renders"),
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
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicySpec {
    /// Pods the rules apply to (every pod of the namespace when omitted).
    // Operators checked here, keys and values by the controller (`InvalidSelector`): a
    // selector the API server refuses in a NetworkPolicy leaves no policy, not even the
    // deny-all fallback (which uses it too), so egress open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn'] ? (has(e.values) && size(e.values) > 0) : (e.operator in ['Exists', 'DoesNotExist'] && (!has(e.values) || size(e.values) == 0)))")
        .message("each matchExpressions entry needs the operator In or NotIn with values, or Exists or DoesNotExist without values"))]
    pub pod_selector: Option<LabelSelector>,
    /// Ordered rules; the first match wins; no match is denied.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub rules: Vec<EgressRule>,
}

/// One ordered egress rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// `Allow` or `Deny` what the rule matches; the first matching rule decides.
    pub action: EgressAction,
    /// The destination the rule matches.
    pub to: EgressDestination,
    /// Ports the rule applies to (all ports of every protocol when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub ports: Option<Vec<EgressPort>>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressAction {
    Allow,
    Deny,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EgressDestination {
    /// An IPv4 or IPv6 CIDR without host bits, such as `10.0.0.0/8` or `2001:db8::/32`.
    #[schemars(length(min = 1, max = 43))]
    #[x_kube(validation = kube::core::Rule::new("isCIDR(self) && cidr(self) == cidr(self).masked()")
        .message("must be a CIDR without host bits, such as 10.0.0.0/8 or 2001:db8::/32"))]
    pub cidr: String,
}

/// A port or port range of one protocol.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("!has(self.endPort) || self.endPort >= self.port")
    .message("endPort must not be below port"))]
#[serde(rename_all = "camelCase")]
pub struct EgressPort {
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: PortProtocol,
    /// The port (1-65535), or the first of a range with `endPort`.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
}

#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub enum PortProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl PortProtocol {
    pub const ALL: [PortProtocol; 3] = [Self::Tcp, Self::Udp, Self::Sctp];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// Observed state of an EgressPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and its reason (a rule that cannot apply is named here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_defaults_isolate_and_allow_dns() -> Result<(), serde_json::Error> {
        let spec: NetworkProfileSpec = serde_json::from_str("{}")?;
        assert_eq!(spec, NetworkProfileSpec::default());
        assert_eq!(spec.isolation, Isolation::Namespace);
        assert!(spec.allow_dns);
        assert_eq!(spec.egress, EgressDefault::Allow);
        Ok(())
    }

    #[test]
    fn egress_rule_field_names_follow_the_contract() -> Result<(), serde_json::Error> {
        let rule: EgressRule = serde_json::from_value(serde_json::json!({
            "action": "Deny", "to": {"cidr": "10.0.0.0/8"}, "ports": [{"port": 443, "endPort": 444}]
        }))?;
        assert_eq!(rule.action, EgressAction::Deny);
        let ports = rule.ports.unwrap_or_default();
        assert_eq!(ports[0].protocol, PortProtocol::Tcp);
        assert_eq!(ports[0].end_port, Some(444));
        Ok(())
    }
}
