//! The `chassis-netpol` command line: probe output format, the table, explain, and
//! errors that name their cause.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn netpol(args: &[&str]) -> std::process::Output {
    let fixtures = fixtures();
    Command::new(env!("CARGO_BIN_EXE_chassis-netpol"))
        .args(args)
        .current_dir(&fixtures)
        .output()
        .expect("chassis-netpol runs")
}

/// `sub` on the fixture policies and model, then `extra`.
fn on_fixtures(sub: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![sub, "--policies", "policies", "--model", "model.json"];
    args.extend_from_slice(extra);
    netpol(&args)
}

#[test]
fn probe_prints_every_pair_on_every_declared_port_as_json() {
    let out = on_fixtures("probe", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = json["results"].as_array().expect("results");
    assert_eq!(rows.len(), 9, "3 sources x 3 destinations x 1 port each");
    let row = |from: &str, to: &str| {
        rows.iter()
            .find(|r| r["from"] == from && r["to"] == to)
            .cloned()
            .expect("the pair is probed")
    };
    assert_eq!(
        row("x/a", "x/b"),
        serde_json::json!({"from": "x/a", "to": "x/b", "port": 5432, "protocol": "TCP", "allowed": true})
    );
    assert_eq!(row("y/c", "x/b")["allowed"], false);
    assert_eq!(row("y/c", "x/a")["allowed"], true, "x/a is not isolated");
}

#[test]
fn the_table_and_explain_say_the_same() {
    let out = on_fixtures("probe", &["--format", "table"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("TCP/5432") && table.contains("columns: 0=x/a 1=x/b 2=y/c"),
        "{table}"
    );
    let out = on_fixtures("explain", &["--from", "y/c", "--to", "x/b", "--port", "5432"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("selected by x/db-from-web and no rule of them admits"),
        "{text}"
    );
    assert!(text.ends_with("y/c -> x/b TCP/5432: refused\n"), "{text}");
}

#[test]
fn bad_input_fails_with_a_sentence() {
    let out = netpol(&["probe", "--policies", "missing", "--model", "model.json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading the policy folder missing"));
    let out = on_fixtures("explain", &["--from", "x/zz", "--to", "x/b", "--port", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("the model has no pod x/zz"));
}
