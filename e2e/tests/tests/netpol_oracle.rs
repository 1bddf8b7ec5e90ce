//! The NetworkPolicy evaluator against an independent one: `cyclonus analyze
//! --mode probe` (built from Go modules by e2e/cluster/build.sh) must give the same
//! verdict as chassis-netpol for every pair and port of every case: the upstream
//! Kubernetes network-policy e2e cases transcribed in `fixtures/netpol/upstream`,
//! the disagreements kept in `fixtures/netpol/regressions`, and 500 seeded random
//! cases. A disagreement fails the test and is written to `regressions/` so it stays
//! a fixture; where cyclonus departs from the specification, that fixture's
//! `README` cites the rule and `expect.json` holds the specified verdicts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use chassis_e2e::{Rng, cluster, repo_root};
use chassis_netpol::eval::Evaluator;
use chassis_netpol::model::Model;
use chassis_netpol::probe::{Row, load_model, load_policies, probe};
use serde_json::{Value, json};

const CYCLONUS: &str = "cyclonus-v0.5.6";
const RANDOM_CASES: u64 = 500;

fn fixtures() -> PathBuf {
    repo_root().join("e2e/tests/fixtures/netpol")
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

/// The model: namespaces x, y, z (plus w sometimes) with pods a, b, c. Each port
/// number has one protocol across the model (cyclonus resolves a probe's port by
/// number alone), and port 81's name differs between pods so named ports matter.
fn random_model(rng: &mut Rng, ipv6: bool) -> Value {
    let mut namespaces = serde_json::Map::new();
    let count = if rng.chance(30) { 4 } else { 3 };
    for (n, ns) in ["x", "y", "z", "w"].iter().take(count).enumerate() {
        let mut labels = json!({ "ns": ns });
        if rng.chance(50) {
            labels["team"] = json!(rng.pick(&["red", "blue"]));
        }
        let mut pods = serde_json::Map::new();
        for (p, pod) in PODS.iter().enumerate() {
            let mut pod_labels = json!({ "pod": pod });
            if rng.chance(50) {
                pod_labels["app"] = json!(rng.pick(&["web", "db"]));
            }
            let mut ports = vec![json!({"port": 80, "protocol": "TCP", "name": "http"})];
            if rng.chance(70) {
                ports.push(json!({"port": 81, "protocol": "TCP", "name": rng.pick(&["metrics", "admin"])}));
            }
            if rng.chance(50) {
                ports.push(json!({"port": 53, "protocol": "UDP", "name": "dns"}));
            }
            if rng.chance(25) {
                ports.push(json!({"port": 82, "protocol": "SCTP", "name": "sctp"}));
            }
            let ip = if ipv6 {
                format!("fd00::{}:{}", n + 1, p + 1)
            } else {
                format!("10.0.{}.{}", n, p + 1)
            };
            pods.insert(
                pod.to_string(),
                json!({ "labels": pod_labels, "ip": ip, "ports": ports }),
            );
        }
        namespaces.insert(ns.to_string(), json!({ "labels": labels, "pods": pods }));
    }
    json!({ "namespaces": namespaces })
}

fn random_selector(rng: &mut Rng, key: &str, values: &[&str]) -> Value {
    match rng.below(6) {
        0 => json!({}),
        1 | 2 => json!({ "matchLabels": { key: rng.pick(values) } }),
        _ => {
            let key = if rng.chance(70) {
                key
            } else {
                rng.pick(&["app", "team"])
            };
            let op = *rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
            let mut expr = json!({ "key": key, "operator": op });
            if matches!(op, "In" | "NotIn") {
                let mut vals: Vec<&str> = values.to_vec();
                vals.extend(["web", "red"]);
                let n = 1 + rng.below(2);
                let chosen: Vec<&str> = (0..n).map(|_| *rng.pick(&vals)).collect();
                let mut chosen = chosen;
                chosen.sort();
                chosen.dedup();
                expr["values"] = json!(chosen);
            }
            json!({ "matchExpressions": [expr] })
        }
    }
}

fn random_ip_block(rng: &mut Rng, ipv6: bool) -> Value {
    if ipv6 {
        let (cidr, excepts): (&str, &[&str]) = *rng.pick(&[
            ("fd00::/16", &["fd00::1:0/112", "fd00::2:1/128"][..]),
            ("fd00::1:0/112", &["fd00::1:2/128"][..]),
            ("::/0", &["fd00::3:0/112"][..]),
        ]);
        let mut block = json!({ "cidr": cidr });
        if rng.chance(50) {
            block["except"] = json!([rng.pick(excepts)]);
        }
        return block;
    }
    let (cidr, excepts): (&str, &[&str]) = *rng.pick(&[
        ("10.0.0.0/16", &["10.0.1.0/24", "10.0.2.2/32", "10.0.0.0/30"][..]),
        ("10.0.1.0/24", &["10.0.1.2/32", "10.0.1.0/31"][..]),
        ("10.0.0.0/22", &["10.0.2.0/24"][..]),
        ("0.0.0.0/0", &["10.0.0.0/24", "10.0.3.0/24"][..]),
        ("10.0.2.3/32", &[][..]),
    ]);
    let mut block = json!({ "cidr": cidr });
    if !excepts.is_empty() && rng.chance(50) {
        block["except"] = json!([rng.pick(excepts)]);
    }
    block
}

fn random_peer(rng: &mut Rng, ipv6: bool) -> Value {
    match rng.below(5) {
        0 => json!({ "podSelector": random_selector(rng, "pod", &PODS) }),
        1 => json!({ "namespaceSelector": random_selector(rng, "ns", &NAMESPACES) }),
        2 | 3 => json!({
            "namespaceSelector": random_selector(rng, "ns", &NAMESPACES),
            "podSelector": random_selector(rng, "pod", &PODS),
        }),
        _ => json!({ "ipBlock": random_ip_block(rng, ipv6) }),
    }
}

fn random_port(rng: &mut Rng) -> Value {
    let mut port = serde_json::Map::new();
    if rng.chance(70) {
        port.insert("protocol".into(), json!(rng.pick(&["TCP", "TCP", "UDP", "SCTP"])));
    }
    match rng.below(5) {
        0 => {}
        1 => {
            port.insert(
                "port".into(),
                json!(rng.pick(&["http", "metrics", "admin", "dns", "sctp"])),
            );
        }
        2 => {
            let start = *rng.pick(&[50u16, 53, 79, 80, 81]);
            port.insert("port".into(), json!(start));
            port.insert("endPort".into(), json!(start + *rng.pick(&[0u16, 1, 2, 30])));
        }
        _ => {
            port.insert("port".into(), json!(rng.pick(&[80u16, 81, 53, 82, 8080])));
        }
    }
    Value::Object(port)
}

fn random_rules(rng: &mut Rng, peers_key: &str, ipv6: bool) -> Vec<Value> {
    (0..rng.below(4))
        .map(|_| {
            let mut rule = serde_json::Map::new();
            match rng.below(10) {
                0..=2 => {}
                3 => {
                    rule.insert(peers_key.into(), json!([]));
                }
                _ => {
                    let peers: Vec<Value> = (0..1 + rng.below(2)).map(|_| random_peer(rng, ipv6)).collect();
                    rule.insert(peers_key.into(), json!(peers));
                }
            }
            if rng.chance(60) {
                let ports: Vec<Value> = (0..1 + rng.below(2)).map(|_| random_port(rng)).collect();
                rule.insert("ports".into(), json!(ports));
            }
            Value::Object(rule)
        })
        .collect()
}

/// One policy as the API server stores it (cyclonus needs `policyTypes`), and the
/// same policy as a user may write it (`policyTypes` omitted where defaulting gives
/// the same), which is what chassis-netpol reads.
fn random_policy(rng: &mut Rng, index: usize, ipv6: bool) -> (Value, Value) {
    let ingress = random_rules(rng, "from", ipv6);
    let egress = random_rules(rng, "to", ipv6);
    let types: Vec<&str> = match rng.below(3) {
        0 => vec!["Ingress"],
        1 => vec!["Egress"],
        _ => vec!["Ingress", "Egress"],
    };
    let mut spec = json!({ "podSelector": random_selector(rng, "pod", &PODS) });
    if types.contains(&"Ingress") && (!ingress.is_empty() || rng.chance(50)) {
        spec["ingress"] = json!(ingress);
    }
    if types.contains(&"Egress") && (!egress.is_empty() || rng.chance(50)) {
        spec["egress"] = json!(egress);
    }
    let stored = {
        let mut s = spec.clone();
        s["policyTypes"] = json!(types);
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": { "name": format!("p{index}"), "namespace": rng.pick(&NAMESPACES) },
            "spec": s,
        })
    };
    // The API server's defaulting: Ingress always, Egress when egress rules exist.
    let has_egress_rules = spec
        .get("egress")
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty());
    let defaulted = if has_egress_rules {
        vec!["Ingress", "Egress"]
    } else {
        vec!["Ingress"]
    };
    let mut written = stored.clone();
    if defaulted == types
        && rng.chance(50)
        && let Some(spec) = written["spec"].as_object_mut()
    {
        spec.remove("policyTypes");
    }
    (stored, written)
}

/// The selectors cyclonus evaluates as the specification says that together match
/// what `selector` matches. cyclonus v0.5.6 refuses a `NotIn` requirement when the
/// label is absent, where Kubernetes matches it (apimachinery `labels.Requirement.Matches`:
/// "NotIn ... if the key is not present, the requirement is satisfied"; the
/// label-selector documentation says the same). So each `NotIn` becomes two
/// selectors: the label absent (`DoesNotExist`), or present and not in the values.
fn spec_equivalent_selectors(selector: &Value) -> Vec<Value> {
    let mut variants = vec![selector.clone()];
    let expressions = selector["matchExpressions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (i, expr) in expressions.iter().enumerate() {
        if expr["operator"] != "NotIn" {
            continue;
        }
        variants = variants
            .into_iter()
            .flat_map(|v| {
                let mut absent = v.clone();
                absent["matchExpressions"][i] = json!({ "key": expr["key"], "operator": "DoesNotExist" });
                [absent, v]
            })
            .collect();
    }
    variants
}

fn spec_equivalent_peers(peers: &Value) -> Value {
    let Some(peers) = peers.as_array() else {
        return peers.clone();
    };
    let mut out = Vec::new();
    for peer in peers {
        let namespaces = peer.get("namespaceSelector").map(spec_equivalent_selectors);
        let pods = peer.get("podSelector").map(spec_equivalent_selectors);
        if peer.get("ipBlock").is_some() {
            out.push(peer.clone());
            continue;
        }
        for ns in namespaces
            .clone()
            .map_or(vec![None], |v| v.into_iter().map(Some).collect())
        {
            for pod in pods
                .clone()
                .map_or(vec![None], |v| v.into_iter().map(Some).collect())
            {
                let mut p = serde_json::Map::new();
                if let Some(ns) = &ns {
                    p.insert("namespaceSelector".into(), ns.clone());
                }
                if let Some(pod) = pod {
                    p.insert("podSelector".into(), pod);
                }
                out.push(Value::Object(p));
            }
        }
    }
    Value::Array(out)
}

/// `policy` as cyclonus needs it to follow the specification: one policy per
/// variant of its podSelector, and each peer split into its variants.
fn for_cyclonus(policy: &Value) -> Vec<Value> {
    let mut base = policy.clone();
    for (direction, peers) in [("ingress", "from"), ("egress", "to")] {
        if let Some(rules) = base["spec"].get_mut(direction).and_then(Value::as_array_mut) {
            for rule in rules {
                if let Some(list) = rule.get(peers) {
                    rule[peers] = spec_equivalent_peers(list);
                }
            }
        }
    }
    let name = policy["metadata"]["name"]
        .as_str()
        .unwrap_or("policy")
        .to_string();
    spec_equivalent_selectors(&policy["spec"]["podSelector"])
        .into_iter()
        .enumerate()
        .map(|(i, selector)| {
            let mut p = base.clone();
            p["spec"]["podSelector"] = selector;
            p["metadata"]["name"] = json!(format!("{name}-{i}"));
            p
        })
        .collect()
}

/// Writes a random case into `dir`: `model.json`, `policies/` (as written) and
/// `stored/` (as the API server stores them, rewritten by `for_cyclonus`).
fn write_random_case(seed: u64, dir: &Path) -> Result<()> {
    let mut rng = Rng(seed);
    let ipv6 = rng.chance(15);
    let model = random_model(&mut rng, ipv6);
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::create_dir_all(dir.join("stored"))?;
    std::fs::write(dir.join("model.json"), serde_json::to_string_pretty(&model)?)?;
    for i in 0..1 + rng.below(4) {
        let (stored, written) = random_policy(&mut rng, i, ipv6);
        for (j, variant) in for_cyclonus(&stored).iter().enumerate() {
            std::fs::write(
                dir.join(format!("stored/p{i}-{j}.yaml")),
                serde_json::to_string_pretty(variant)?,
            )?;
        }
        std::fs::write(
            dir.join(format!("policies/p{i}.yaml")),
            serde_json::to_string_pretty(&written)?,
        )?;
    }
    Ok(())
}

/// cyclonus' probe file for our model, one probe per (port, protocol) in it.
fn cyclonus_probe(model: &Model) -> (Value, Vec<(u16, String)>) {
    let mut probes: Vec<(u16, String)> = Vec::new();
    let mut pods = Vec::new();
    let mut namespaces = serde_json::Map::new();
    for (ns, namespace) in &model.namespaces {
        let mut labels = namespace.labels.clone();
        labels.insert("kubernetes.io/metadata.name".into(), ns.clone());
        namespaces.insert(ns.clone(), json!(labels));
        for (name, pod) in &namespace.pods {
            let containers: Vec<Value> = pod
                .ports
                .iter()
                .map(|p| {
                    probes.push((p.port, p.protocol.as_str().to_string()));
                    json!({
                        "Name": format!("c{}", p.port), "Port": p.port,
                        "PortName": p.name.clone().unwrap_or_default(), "Protocol": p.protocol.as_str(),
                    })
                })
                .collect();
            pods.push(json!({
                "Namespace": ns, "Name": name, "Labels": pod.labels, "IP": pod.ip.to_string(),
                "Containers": containers,
            }));
        }
    }
    probes.sort();
    probes.dedup();
    let probe = json!({
        "Probes": probes.iter().map(|(port, proto)| json!({"Port": port, "Protocol": proto})).collect::<Vec<_>>(),
        "Resources": { "Namespaces": namespaces, "Pods": pods },
    });
    (probe, probes)
}

/// Runs cyclonus on `stored/` and the model; returns `(from, to, port, protocol) →
/// allowed` for every cell it could evaluate.
fn run_cyclonus(dir: &Path, model: &Model) -> Result<BTreeMap<(String, String, u16, String), bool>> {
    let (probe_file, probes) = cyclonus_probe(model);
    let probe_path = dir.join("cyclonus-probe.json");
    std::fs::write(&probe_path, serde_json::to_string(&probe_file)?)?;
    let out = Command::new(cluster().bin.join(CYCLONUS))
        .args(["analyze", "--mode", "probe", "--policy-path"])
        .arg(dir.join("stored"))
        .arg("--probe-path")
        .arg(&probe_path)
        .output()
        .context("running cyclonus")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "cyclonus failed on {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let tables: Vec<&str> = stdout.split("Combined:").skip(1).collect();
    ensure!(
        tables.len() >= probes.len(),
        "cyclonus printed {} tables for {} probes",
        tables.len(),
        probes.len()
    );
    let mut cells = BTreeMap::new();
    for ((port, protocol), table) in probes.iter().zip(tables) {
        // The table runs from the first `+---` line to the first blank line.
        let rows: Vec<Vec<String>> = table
            .lines()
            .skip_while(|l| !l.starts_with('+'))
            .take_while(|l| !l.trim().is_empty())
            .filter(|l| l.starts_with('|'))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect();
        // The header names the destinations (upper-cased); map them back to pod ids.
        let header = rows
            .first()
            .with_context(|| format!("cyclonus printed no table: {table}"))?;
        let pods: Vec<&String> = rows.iter().skip(1).map(|r| &r[0]).collect();
        let columns: Vec<&String> = header
            .iter()
            .skip(1)
            .map(|h| {
                pods.iter()
                    .find(|p| p.eq_ignore_ascii_case(h))
                    .copied()
                    .with_context(|| format!("column {h} names no pod of the table"))
            })
            .collect::<Result<_>>()?;
        for row in rows.iter().skip(1) {
            for (i, cell) in row.iter().skip(1).enumerate() {
                let to = columns
                    .get(i)
                    .with_context(|| format!("cyclonus row wider than its header: {table}"))?;
                let allowed = match cell.as_str() {
                    "." => true,
                    "X" => false,
                    _ => continue, // port not declared by the destination (N, P)
                };
                cells.insert((row[0].clone(), (*to).clone(), *port, protocol.clone()), allowed);
            }
        }
    }
    Ok(cells)
}

fn run_ours(dir: &Path) -> Result<(Model, Vec<Row>)> {
    let model = load_model(&dir.join("model.json"))?;
    let policies = load_policies(&dir.join("policies"))?;
    let rows = probe(&Evaluator::new(&model, &policies)).results;
    Ok((model, rows))
}

/// Verdicts the specification gives where cyclonus departs from it: `expect.json`
/// is `[{"from","to","port","protocol","allowed"}]`.
fn expectations(dir: &Path) -> Result<BTreeMap<(String, String, u16, String), bool>> {
    let path = dir.join("expect.json");
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    rows.iter()
        .map(|r| {
            let s = |k: &str| {
                r[k].as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{k} in {}", path.display()))
            };
            let port = r["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .context("port")?;
            Ok((
                (s("from")?, s("to")?, port, s("protocol")?),
                r["allowed"].as_bool().context("allowed")?,
            ))
        })
        .collect()
}

/// Compares both on one case folder; returns the disagreements as sentences.
fn compare(dir: &Path) -> Result<Vec<String>> {
    let (model, ours) = run_ours(dir)?;
    let theirs = run_cyclonus(dir, &model)?;
    let expected = expectations(dir)?;
    let mut problems = Vec::new();
    for row in &ours {
        let key = (
            row.from.clone(),
            row.to.clone(),
            row.port,
            row.protocol.as_str().to_string(),
        );
        let reference = expected.get(&key).or(theirs.get(&key));
        match reference {
            Some(&allowed) if allowed == row.allowed => {}
            Some(&allowed) => problems.push(format!(
                "{} -> {} {}/{}: chassis-netpol says {}, {} says {}",
                row.from,
                row.to,
                row.protocol.as_str(),
                row.port,
                row.allowed,
                if expected.contains_key(&key) {
                    "the specification"
                } else {
                    "cyclonus"
                },
                allowed
            )),
            None => problems.push(format!(
                "{} -> {} {}/{}: cyclonus gave no verdict",
                row.from,
                row.to,
                row.protocol.as_str(),
                row.port
            )),
        }
    }
    if theirs.len() != ours.len() {
        problems.push(format!(
            "cyclonus evaluated {} cells, chassis-netpol {}",
            theirs.len(),
            ours.len()
        ));
    }
    Ok(problems)
}

/// Case folders under `fixtures/netpol/<group>`; upstream cases share the model of
/// the upstream suite and keep only their policies, so `stored/` is the policies.
fn fixture_cases(group: &str) -> Result<Vec<PathBuf>> {
    let root = fixtures().join(group);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    Ok(cases)
}

/// Copies a fixture into a scratch folder laid out like a random case.
fn stage_fixture(case: &Path, scratch: &Path) -> Result<PathBuf> {
    let dir = scratch.join(case.file_name().context("case name")?);
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::create_dir_all(dir.join("stored"))?;
    let model = if case.join("model.json").exists() {
        case.join("model.json")
    } else {
        fixtures().join("upstream-model.json")
    };
    std::fs::copy(model, dir.join("model.json"))?;
    let stored = if case.join("stored").exists() {
        case.join("stored")
    } else {
        case.join("policies")
    };
    for (from, to) in [(case.join("policies"), "policies"), (stored, "stored")] {
        for entry in std::fs::read_dir(&from).with_context(|| format!("reading {}", from.display()))? {
            let entry = entry?;
            std::fs::copy(entry.path(), dir.join(to).join(entry.file_name()))?;
        }
    }
    if case.join("expect.json").exists() {
        std::fs::copy(case.join("expect.json"), dir.join("expect.json"))?;
    }
    Ok(dir)
}

/// A fresh folder per test (tests of one binary run in parallel).
fn scratch(test: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("chassis-netpol-oracle-{}/{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The random test writes new disagreements where the kept-fixture test reads.
static FIXTURES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check_fixtures(group: &str, minimum: usize) -> Result<()> {
    let _guard = FIXTURES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let scratch = scratch(group)?;
    let cases = fixture_cases(group)?;
    ensure!(
        cases.len() >= minimum,
        "expected at least {minimum} cases in fixtures/netpol/{group}"
    );
    let mut failures = Vec::new();
    for case in &cases {
        let dir = stage_fixture(case, &scratch)?;
        let problems = compare(&dir)?;
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", case.display(), problems.join("\n  ")));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} cases disagree:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

#[test]
fn upstream_network_policy_cases_agree_with_cyclonus() -> Result<()> {
    check_fixtures("upstream", 20)
}

#[test]
fn kept_disagreements_stay_fixed() -> Result<()> {
    check_fixtures("regressions", 0)
}

#[test]
fn random_cases_agree_with_cyclonus() -> Result<()> {
    let _guard = FIXTURES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let scratch = scratch("random")?;
    let mut failures = Vec::new();
    let mut cells = 0usize;
    for seed in 0..RANDOM_CASES {
        let dir = scratch.join(format!("seed-{seed}"));
        write_random_case(seed, &dir)?;
        let problems = compare(&dir)?;
        cells += run_ours(&dir)?.1.len();
        if !problems.is_empty() {
            // Keep it as a fixture, so the disagreement is fixed once and stays fixed.
            let kept = fixtures().join("regressions").join(format!("seed-{seed}"));
            std::fs::create_dir_all(&kept)?;
            for part in ["policies", "stored"] {
                std::fs::create_dir_all(kept.join(part))?;
                for entry in std::fs::read_dir(dir.join(part))? {
                    let entry = entry?;
                    std::fs::copy(entry.path(), kept.join(part).join(entry.file_name()))?;
                }
            }
            std::fs::copy(dir.join("model.json"), kept.join("model.json"))?;
            failures.push(format!(
                "seed {seed} (kept in {}):\n  {}",
                kept.display(),
                problems.join("\n  ")
            ));
        }
    }
    eprintln!("{RANDOM_CASES} random cases, {cells} verdicts compared");
    if !failures.is_empty() {
        bail!(
            "{} of {RANDOM_CASES} random cases disagree:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
