//! The cluster model the evaluator reads: namespaces with labels, pods with labels,
//! an IP and named container ports. This is the `--model` file of `chassis-netpol`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Label Kubernetes sets on every namespace (1.22+), added when the model omits it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub namespaces: BTreeMap<String, NamespaceModel>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceModel {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pods: BTreeMap<String, PodModel>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodModel {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ip: IpAddr,
    #[serde(default)]
    pub ports: Vec<PortModel>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortModel {
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// One pod of the model, with its namespace's labels at hand.
#[derive(Debug, Clone, Copy)]
pub struct Pod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub pod: &'a PodModel,
}

impl Pod<'_> {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Model {
    /// Adds `kubernetes.io/metadata.name` to namespaces that lack it, as the API
    /// server does.
    pub fn with_namespace_name_labels(mut self) -> Self {
        for (name, ns) in &mut self.namespaces {
            ns.labels
                .entry(NAMESPACE_NAME_LABEL.to_string())
                .or_insert_with(|| name.clone());
        }
        self
    }

    /// Every pod, in namespace then name order.
    pub fn pods(&self) -> Vec<Pod<'_>> {
        self.namespaces
            .iter()
            .flat_map(|(ns_name, ns)| {
                ns.pods.iter().map(move |(name, pod)| Pod {
                    namespace: ns_name,
                    name,
                    namespace_labels: &ns.labels,
                    pod,
                })
            })
            .collect()
    }
}
