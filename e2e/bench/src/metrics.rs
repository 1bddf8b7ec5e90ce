//! Requests as the API server counts them (`apiserver_request_total`), and the
//! watches it closed because their client fell behind
//! (`apiserver_terminated_watchers_total`).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use kube::Client;

const WRITE_VERBS: [&str; 6] = ["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];

/// Counters keyed `"VERB resource[/subresource]"` (closed watches: `"resource"`),
/// summed over groups, versions, scopes and response codes.
pub type Counts = BTreeMap<String, u64>;

/// One scrape of the counters.
#[derive(Default)]
pub struct Snapshot {
    writes: Counts,
    /// Single-object reads (GET; lists and watches are not counted).
    reads: Counts,
    /// Watches the API server closed as unresponsive: its buffer for the watcher
    /// filled up, so the client falls behind and has to watch again.
    closed_watches: Counts,
}

fn delta(now: &Counts, earlier: &Counts) -> Counts {
    now.iter()
        .filter_map(|(key, now)| {
            let delta = now.saturating_sub(earlier.get(key).copied().unwrap_or(0));
            (delta > 0).then(|| (key.clone(), delta))
        })
        .collect()
}

impl Snapshot {
    /// The writes counted between `earlier` and this scrape.
    pub fn writes_since(&self, earlier: &Snapshot) -> Counts {
        delta(&self.writes, &earlier.writes)
    }

    /// The single-object reads counted between `earlier` and this scrape.
    pub fn reads_since(&self, earlier: &Snapshot) -> Counts {
        delta(&self.reads, &earlier.reads)
    }

    /// The watches closed as unresponsive between `earlier` and this scrape.
    pub fn closed_watches_since(&self, earlier: &Snapshot) -> Counts {
        delta(&self.closed_watches, &earlier.closed_watches)
    }
}

pub async fn scrape(client: &Client) -> Result<Snapshot> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client
        .request_text(request)
        .await
        .context("reading the API server's /metrics")?;
    Ok(parse(&text))
}

/// The counters of interest in a Prometheus text exposition.
pub fn parse(text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for line in text.lines() {
        let (counters, rest) = if let Some(rest) = line.strip_prefix("apiserver_request_total{") {
            (None, rest)
        } else if let Some(rest) = line.strip_prefix("apiserver_terminated_watchers_total{") {
            (Some(&mut snapshot.closed_watches), rest)
        } else {
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
        // Counters are integers written as floats.
        let count = value.trim().parse::<f64>().unwrap_or(0.0).max(0.0) as u64;
        let (resource, sub) = (label("resource"), label("subresource"));
        let (counters, key) = match counters {
            Some(closed) => (closed, resource),
            None => {
                let verb = label("verb");
                let counters = if WRITE_VERBS.contains(&verb.as_str()) {
                    &mut snapshot.writes
                } else if verb == "GET" && !resource.is_empty() {
                    &mut snapshot.reads
                } else {
                    continue;
                };
                let key = if sub.is_empty() {
                    format!("{verb} {resource}")
                } else {
                    format!("{verb} {resource}/{sub}")
                };
                (counters, key)
            }
        };
        *counters.entry(key).or_default() += count;
    }
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="POST",version="v1"} 3
apiserver_request_total{code="409",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="POST",version="v1"} 1
apiserver_request_total{code="200",component="apiserver",dry_run="",group="tenancy.chassis.dev",resource="projects",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="namespaces",scope="cluster",subresource="",verb="LIST",version="v1"} 9
apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="GET",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="",scope="",subresource="/healthz",verb="GET",version=""} 6
# TYPE apiserver_terminated_watchers_total counter
apiserver_terminated_watchers_total{group="rbac.authorization.k8s.io",resource="rolebindings"} 4
"#;

    #[test]
    fn sums_write_verbs_by_resource_and_skips_reads() {
        let writes = parse(TEXT).writes;
        assert_eq!(writes.get("POST namespaces"), Some(&4));
        assert_eq!(writes.get("APPLY projects/status"), Some(&5));
        assert_eq!(writes.len(), 2, "{writes:?}");
        let later = parse(&TEXT.replace("} 3", "} 10"));
        assert_eq!(later.writes_since(&parse(TEXT)).get("POST namespaces"), Some(&7));
    }

    #[test]
    fn counts_object_reads_and_watches_closed_as_unresponsive() {
        let snapshot = parse(TEXT);
        // Lists and non-resource GETs (health checks) are not object reads.
        assert_eq!(
            snapshot.reads.into_iter().collect::<Vec<_>>(),
            [("GET namespaces".to_string(), 2)]
        );
        let later = parse(&TEXT.replace("} 4", "} 9"));
        assert_eq!(
            later.closed_watches_since(&parse(TEXT)).get("rolebindings"),
            Some(&5)
        );
        assert_eq!(later.reads_since(&parse(TEXT)).len(), 0);
    }
}
