//! Write requests as the API server counts them (`apiserver_request_total`).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use kube::Client;

const WRITE_VERBS: [&str; 6] = ["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];

/// Counters keyed `"VERB resource[/subresource]"`, summed over groups, versions,
/// scopes and response codes.
pub type Writes = BTreeMap<String, u64>;

/// One scrape of the counters.
pub struct Snapshot(Writes);

impl Snapshot {
    /// What was counted between `earlier` and this scrape.
    pub fn since(&self, earlier: &Snapshot) -> Writes {
        self.0
            .iter()
            .filter_map(|(key, now)| {
                let delta = now.saturating_sub(earlier.0.get(key).copied().unwrap_or(0));
                (delta > 0).then(|| (key.clone(), delta))
            })
            .collect()
    }
}

pub async fn scrape(client: &Client) -> Result<Snapshot> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client
        .request_text(request)
        .await
        .context("reading the API server's /metrics")?;
    Ok(Snapshot(parse(&text)))
}

/// The write-verb samples of `apiserver_request_total` in a Prometheus text exposition.
pub fn parse(text: &str) -> Writes {
    let mut writes = Writes::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split("\",")
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let verb = label("verb");
        if !WRITE_VERBS.contains(&verb.as_str()) {
            continue;
        }
        let (resource, sub) = (label("resource"), label("subresource"));
        let key = if sub.is_empty() {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource}/{sub}")
        };
        // Counters are integers written as floats.
        let count = value.trim().parse::<f64>().unwrap_or(0.0).max(0.0) as u64;
        *writes.entry(key).or_default() += count;
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_write_verbs_by_resource_and_skips_reads() {
        let text = r#"# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="POST",version="v1"} 3
apiserver_request_total{code="409",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="POST",version="v1"} 1
apiserver_request_total{code="200",component="apiserver",dry_run="",group="tenancy.chassis.dev",resource="projects",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="namespaces",scope="cluster",subresource="",verb="LIST",version="v1"} 9
"#;
        let writes = parse(text);
        assert_eq!(writes.get("POST namespaces"), Some(&4));
        assert_eq!(writes.get("APPLY projects/status"), Some(&5));
        assert_eq!(writes.len(), 2, "{writes:?}");
        let later = Snapshot(parse(&text.replace("} 3", "} 10")));
        assert_eq!(later.since(&Snapshot(writes)).get("POST namespaces"), Some(&7));
    }
}
