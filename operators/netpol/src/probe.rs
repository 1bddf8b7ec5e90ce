//! The probe: every pod to every declared port of every pod, as JSON rows or a
//! human-readable matrix; and loading the inputs of the CLI.

use std::path::Path;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Serialize;

use crate::eval::Evaluator;
use crate::model::{Model, Protocol};
use crate::policy::Policy;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Results {
    pub results: Vec<Row>,
}

/// Every (from, to, port of `to`) of the model.
pub fn probe(evaluator: &Evaluator<'_>) -> Results {
    let pods = evaluator.pods();
    let mut results = Vec::new();
    for (from, source) in pods.iter().enumerate() {
        for (to, destination) in pods.iter().enumerate() {
            for port in &destination.pod.ports {
                results.push(Row {
                    from: source.id(),
                    to: destination.id(),
                    port: port.port,
                    protocol: port.protocol,
                    allowed: evaluator.allowed(from, to, port.port, port.protocol),
                });
            }
        }
    }
    Results { results }
}

/// One matrix per (port, protocol): rows are sources, columns destinations; `.` is
/// allowed, `X` refused, blank when the destination does not declare the port.
pub fn table(results: &Results) -> String {
    let mut ports: Vec<(u16, Protocol)> = results.results.iter().map(|r| (r.port, r.protocol)).collect();
    ports.sort();
    ports.dedup();
    let mut pods: Vec<&str> = results.results.iter().map(|r| r.from.as_str()).collect();
    pods.sort();
    pods.dedup();
    let width = pods.iter().map(|p| p.len()).max().unwrap_or(0);
    // One lookup per cell: a scan per cell is quadratic in the rows at 1000 pods.
    let verdicts: std::collections::HashMap<(&str, &str, u16, Protocol), bool> = results
        .results
        .iter()
        .map(|r| ((r.from.as_str(), r.to.as_str(), r.port, r.protocol), r.allowed))
        .collect();
    let mut out = String::new();
    for (port, protocol) in ports {
        out.push_str(&format!("{}/{port}\n{:width$}", protocol.as_str(), ""));
        for (i, _) in pods.iter().enumerate() {
            out.push_str(&format!(" {:>3}", i));
        }
        out.push('\n');
        for from in &pods {
            out.push_str(&format!("{from:width$}"));
            for to in &pods {
                let cell = verdicts
                    .get(&(*from, *to, port, protocol))
                    .map_or(" ", |allowed| if *allowed { "." } else { "X" });
                out.push_str(&format!(" {cell:>3}"));
            }
            out.push('\n');
        }
        out.push_str("columns: ");
        out.push_str(
            &pods
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{i}={p}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
        out.push_str("\n\n");
    }
    out
}

/// Every NetworkPolicy in the YAML or JSON files of `dir` (several documents per
/// file allowed; `kind: List` items too). Files of other kinds are an error.
pub fn load_policies(dir: &Path) -> Result<Vec<Policy>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the policy folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    let mut policies = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing {}", file.display()))?;
            collect(value, &file, &mut policies)?;
        }
    }
    Ok(policies)
}

fn collect(value: serde_json::Value, file: &Path, policies: &mut Vec<Policy>) -> Result<()> {
    match value["kind"].as_str() {
        None if value.is_null() => Ok(()),
        Some("List" | "NetworkPolicyList") => {
            for item in value["items"].as_array().into_iter().flatten() {
                collect(item.clone(), file, policies)?;
            }
            Ok(())
        }
        Some("NetworkPolicy") => {
            let policy: NetworkPolicy = serde_json::from_value(value)
                .with_context(|| format!("{}: not a valid NetworkPolicy", file.display()))?;
            policies.push(Policy::parse(&policy, "default").map_err(anyhow::Error::msg)?);
            Ok(())
        }
        other => bail!(
            "{}: expected NetworkPolicy documents, found kind {other:?}",
            file.display()
        ),
    }
}

pub fn load_model(path: &Path) -> Result<Model> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the model {}", path.display()))?;
    let model: Model =
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid model", path.display()))?;
    Ok(model.with_namespace_name_labels())
}
