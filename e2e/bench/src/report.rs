//! The markdown section of docs/BENCHMARKS.md for the project benchmark.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::Phase;
use crate::metrics::Counts;

const BEGIN: &str = "<!-- projects:begin -->";
const END: &str = "<!-- projects:end -->";
/// Child objects per project: namespace, three RoleBindings, ResourceQuota, LimitRange.
pub const CHILDREN_PER_PROJECT: u64 = 6;
const CHILD_RESOURCES: [&str; 4] = ["namespaces", "rolebindings", "resourcequotas", "limitranges"];

/// Writes of these classes count as the operator's: its own, and any the counters
/// cannot attribute (so the idle goal cannot pass on a write nobody claimed).
const UNATTRIBUTED: &str = "unattributed (counted as the operator's)";

/// Who makes a write, by its resource (the API server's counters have no user label;
/// the floor phase shows nothing else writes the child resources).
fn class(key: &str) -> &'static str {
    let resource = key.split_once(' ').map_or(key, |(_, r)| r);
    match resource {
        r if CHILD_RESOURCES.contains(&r) => "child objects",
        "projects/status" => "Project status (operator)",
        "projecttemplates/status" => "ProjectTemplate status (operator)",
        "networkpolicies" | "networkprofiles/status" | "egresspolicies/status" => "network (operator)",
        "subjectaccessreviews" => "admission SubjectAccessReviews (operator; not stored)",
        // The controller-manager's per-namespace work (the `default` ServiceAccount, the
        // root CA ConfigMap) and quota status.
        "configmaps" | "serviceaccounts" | "resourcequotas/status" => "control plane (controller-manager)",
        "leases" => "control plane and operator: Leases",
        "projects" | "projecttemplates" | "selfsubjectreviews" => "the benchmark client",
        // Any component may emit Events; the operator's among them.
        "events" => "Events (any component; counted as the operator's)",
        _ => UNATTRIBUTED,
    }
}

fn counts_as_operator(class: &str) -> bool {
    class == "child objects" || class.ends_with("(operator)") || class.ends_with("counted as the operator's)")
}

fn sum(writes: &Counts, wanted: impl Fn(&str) -> bool) -> u64 {
    writes
        .iter()
        .filter(|(k, _)| wanted(class(k)))
        .map(|(_, v)| v)
        .sum()
}

fn children(writes: &Counts) -> u64 {
    sum(writes, |c| c == "child objects")
}

/// Stored writes the operator makes (its children, status, network policies), with
/// Events and writes no known component makes.
fn operator_writes(writes: &Counts) -> u64 {
    sum(writes, counts_as_operator)
}

/// Writes to child objects per child, the settle window after the last Ready included
/// (a child written twice counts twice wherever the second write fell).
fn per_child(phase: &Phase) -> f64 {
    let written = children(&phase.writes) + children(&phase.settle_writes);
    written as f64 / (phase.count as u64 * CHILDREN_PER_PROJECT).max(1) as f64
}

fn table(writes: &Counts) -> String {
    let mut out = String::from("| requests | count | made by |\n| --- | --- | --- |\n");
    for (key, count) in writes {
        out.push_str(&format!("| `{key}` | {count} | {} |\n", class(key)));
    }
    out
}

fn machine() -> (usize, u64) {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024 / 1024);
    (cores, mem_gib)
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

fn cpu_table(floor: &Phase, projects_only: &Phase, ours: &Phase) -> String {
    let mut names: Vec<&String> = floor.cpu_seconds.keys().chain(ours.cpu_seconds.keys()).collect();
    names.sort();
    names.dedup();
    let mut out =
        String::from("| process | floor | Projects alone | operator phase |\n| --- | --- | --- | --- |\n");
    let cell = |p: &Phase, n: &String| {
        p.cpu_seconds
            .get(n)
            .map_or("-".to_string(), |v| format!("{v:.1}"))
    };
    for name in names {
        out.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            cell(floor, name),
            cell(projects_only, name),
            cell(ours, name)
        ));
    }
    out
}

/// The section; `per_child_rounds` are the writes per child of every round (the goal
/// holds only if it holds in each).
pub fn section(
    floor: &Phase,
    projects_only: &Phase,
    ours: &Phase,
    per_child_rounds: &[f64],
    command: &str,
) -> String {
    let (cores, mem) = machine();
    let n = ours.count as u64;
    let ratio = ours.millis as f64 / floor.millis.max(1) as f64;
    let worst_per_child = per_child_rounds.iter().copied().fold(per_child(ours), f64::max);
    let floor_per_child = per_child(floor);
    let idle = ours.idle_writes.clone().unwrap_or_default();
    let idle_ours = operator_writes(&idle);
    let peak_kib = ours.peak_rss_kib.unwrap_or(u64::MAX);
    let webhooks = match ours.webhooks {
        Some(false) => "admission webhooks **off**",
        _ => "admission webhooks on",
    };
    let mut s = format!(
        "{BEGIN}\n### Projects run of {} ({cores} cores, {mem} GiB)\n\n\
         Command: `{command}` (release build of chassis-operator, {webhooks}; \
         each phase on a fresh control plane; the floor client keeps {} requests in flight, \
         the operator phase's client {}). Counts \
         of the operator phase cover the same window as its time: from the first create \
         until the last project is Ready.\n\n\
         | measure | value | goal |\n| --- | --- | --- |\n",
        today(),
        floor.concurrency,
        ours.concurrency,
    );
    s.push_str(&format!(
        "| {n} Projects created at once until all Ready | {} ms | |\n",
        ours.millis
    ));
    s.push_str(&format!(
        "| floor: the same {} Projects and {} child objects created directly by one client | {} ms | |\n",
        floor.count,
        floor.count as u64 * CHILDREN_PER_PROJECT,
        floor.millis
    ));
    s.push_str(&format!(
        "| ratio operator / floor | {ratio:.2} | at most 1.5: {} |\n",
        verdict(ratio <= 1.5)
    ));
    let rounds: Vec<String> = per_child_rounds.iter().map(|v| format!("{v:.3}")).collect();
    s.push_str(&format!(
        "| operator writes to child objects, per child, the 10 s after the last Ready included (worst round; rounds {}) | {worst_per_child:.3} (floor {floor_per_child:.3}) | at most 1: {} |\n",
        rounds.join(", "),
        verdict(worst_per_child <= 1.0)
    ));
    s.push_str(&format!(
        "| operator writes of any kind during creation | {} ({:.2} per project) | |\n",
        operator_writes(&ours.writes),
        operator_writes(&ours.writes) as f64 / n as f64
    ));
    s.push_str(&format!(
        "| object reads (GET) during creation: operator phase / floor | {} / {} | |\n",
        by_resource(&ours.reads),
        by_resource(&floor.reads)
    ));
    s.push_str(&format!(
        "| watches the API server closed because their client fell behind (the operator's and the benchmark's own Project watch; no client label): operator phase / floor | {} / {} | |\n",
        by_resource(&ours.closed_watches),
        by_resource(&floor.closed_watches)
    ));
    s.push_str(&format!(
        "| restarts of the benchmark's own Project watch (its lag would stop the clock late) | {} | |\n",
        ours.bench_watch_restarts
    ));
    s.push_str(&format!(
        "| operator writes in {} idle seconds with all Ready | {idle_ours} | 0: {} |\n",
        ours.idle_seconds.unwrap_or(0),
        verdict(idle_ours == 0)
    ));
    s.push_str(&format!(
        "| chassis-operator peak RSS (RSS at the end) | {:.1} MiB ({:.1} MiB) | at most 64 MiB: {} |\n",
        ours.peak_rss_kib.unwrap_or(0) as f64 / 1024.0,
        ours.rss_kib.unwrap_or(0) as f64 / 1024.0,
        verdict(peak_kib <= 64 * 1024)
    ));
    s.push_str(&format!(
        "| time until the last create returned: operator phase (Projects) / floor | {} ms / {} ms | |\n",
        ours.created_millis, floor.created_millis
    ));
    s.push_str(&format!(
        "| the {} Projects alone (no operator, no webhooks, fresh control plane) | {} ms ({:.2} x the floor) | |\n\n",
        projects_only.count,
        projects_only.millis,
        projects_only.millis as f64 / floor.millis.max(1) as f64
    ));
    s.push_str("CPU seconds used during the timed part (2 cores: the control plane, the client and the operator share them):\n\n");
    s.push_str(&cpu_table(floor, projects_only, ours));
    s.push_str("\nWrite requests the API server counted while the operator created the projects:\n\n");
    s.push_str(&table(&ours.writes));
    s.push_str("\nIn the 10 s after the last project was Ready (before the idle window):\n\n");
    if ours.settle_writes.is_empty() {
        s.push_str("none at all.\n");
    } else {
        s.push_str(&table(&ours.settle_writes));
    }
    s.push_str("\nAnd during the floor phase:\n\n");
    s.push_str(&table(&floor.writes));
    s.push_str("\nAnd while the operator was idle:\n\n");
    if idle.is_empty() {
        s.push_str("none at all.\n");
    } else {
        s.push_str(&table(&idle));
    }
    s.push_str(END);
    s
}

/// `total (key n, ...)`, largest first: one cell for a handful of counters.
fn by_resource(counts: &Counts) -> String {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return "0".into();
    }
    let mut parts: Vec<(&String, &u64)> = counts.iter().collect();
    parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = parts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("{total} ({})", parts.join(", "))
}

/// The round with the median time (the lower middle one for an even count).
fn median(rounds: &[Phase]) -> Option<&Phase> {
    let mut sorted: Vec<&Phase> = rounds.iter().collect();
    sorted.sort_by_key(|p| p.millis);
    sorted.get(rounds.len().saturating_sub(1) / 2).copied()
}

fn times(rounds: &[Phase]) -> String {
    rounds
        .iter()
        .map(|p| format!("{} ms", p.millis))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The ratio round by round: floor and operator phases alternate, so a round's pair
/// saw the same machine.
fn ratio_rows(floors: &[Phase], rounds: &[Phase]) -> String {
    let per_round: Vec<String> = rounds
        .iter()
        .zip(floors)
        .map(|(o, f)| format!("{:.2}", o.millis as f64 / f.millis.max(1) as f64))
        .collect();
    format!("| ratio round by round | {} | |\n", per_round.join(", "))
}

pub fn write(
    floors: &[Phase],
    projects_only: &Phase,
    rounds: &[Phase],
    doc: &Path,
    command: &str,
) -> Result<()> {
    let (Some(floor), Some(median_round), Some(last)) = (median(floors), median(rounds), rounds.last())
    else {
        anyhow::bail!("the report needs at least one floor and one operator result");
    };
    // Times and writes from the median round; the idle window from the last round;
    // memory as the highest peak of all rounds.
    let mut ours = median_round.clone();
    ours.idle_writes = last.idle_writes.clone();
    ours.idle_seconds = last.idle_seconds;
    ours.peak_rss_kib = rounds.iter().filter_map(|p| p.peak_rss_kib).max();
    ours.rss_kib = last.rss_kib;
    let per_child_rounds: Vec<f64> = rounds.iter().map(per_child).collect();
    let mut section = section(floor, projects_only, &ours, &per_child_rounds, command);
    let rounds_row = format!(
        "| rounds (median used): operator {} / floor {} | | |\n",
        times(rounds),
        times(floors)
    );
    if let Some(at) = section.find("| floor: the same") {
        section.insert_str(at, &rounds_row);
    }
    if let Some(at) = section.find("| operator writes to child objects") {
        section.insert_str(at, &ratio_rows(floors, rounds));
    }
    let text = std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{section}{}", &text[..a], &text[b + END.len()..]),
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(doc, new).with_context(|| format!("writing {}", doc.display()))?;
    println!("{section}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> Counts {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn writes_nobody_is_known_to_make_count_against_the_operator() {
        // The idle goal must not pass on a write the table cannot attribute.
        let idle = counts(&[
            ("PUT configmaps", 5),
            ("PUT leases", 4),
            ("PATCH networkpolicies", 1),
            ("PUT projecttemplates/status", 1),
            ("POST widgets", 1),
            ("POST events", 1),
        ]);
        assert_eq!(operator_writes(&idle), 4);
        assert_eq!(class("POST widgets"), UNATTRIBUTED);
        assert_eq!(
            operator_writes(&counts(&[("PUT configmaps", 5), ("PUT leases", 4)])),
            0
        );
    }

    #[test]
    fn a_child_written_again_after_ready_counts_per_child() {
        let phase = |writes, settle| crate::Phase {
            count: 1,
            concurrency: 1,
            millis: 1,
            writes,
            reads: Counts::new(),
            closed_watches: Counts::new(),
            settle_writes: settle,
            bench_watch_restarts: 0,
            webhooks: Some(true),
            idle_writes: None,
            idle_seconds: None,
            rss_kib: None,
            peak_rss_kib: None,
            created_millis: 1,
            cpu_seconds: Default::default(),
        };
        let once = counts(&[
            ("POST namespaces", 1),
            ("POST rolebindings", 3),
            ("POST resourcequotas", 1),
            ("POST limitranges", 1),
        ]);
        assert_eq!(per_child(&phase(once.clone(), Counts::new())), 1.0);
        let again = counts(&[("PATCH rolebindings", 3)]);
        assert_eq!(per_child(&phase(once, again)), 1.5);
    }

    #[test]
    fn a_cell_gives_the_total_and_the_largest_counts_first() {
        let counts: Counts = [
            ("GET rolebindings", 6),
            ("GET namespaces", 9),
            ("GET limitranges", 2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(
            by_resource(&counts),
            "17 (GET namespaces 9, GET rolebindings 6, GET limitranges 2)"
        );
        assert_eq!(by_resource(&Counts::new()), "0");
    }
}
