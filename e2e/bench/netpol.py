#!/usr/bin/env python3
"""`chassis-netpol probe` against `cyclonus analyze --mode probe` on the same input,
in the same run: N namespaces x 10 pods x P policies, every pair of pods on two
ports (80 and 443/TCP). Three sizes, three alternating rounds each, medians
reported; writes the `netpol` section of docs/BENCHMARKS.md.

Usage: e2e/bench/netpol.py --netpol target/release/chassis-netpol --cyclonus PATH
"""

import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

SIZES = [(25, 50), (50, 100), (100, 200)]  # (namespaces, policies); 10 pods each
PODS = 10
ROUNDS = 3
APPS = ["web", "api", "db", "cache", "worker"]
TEAMS = [f"t{i}" for i in range(10)]


def generate(folder, namespaces, policies, seed):
    rng = random.Random(seed)
    model = {"namespaces": {}}
    cyclonus_pods, cyclonus_ns = [], {}
    for n in range(namespaces):
        ns = f"ns{n}"
        labels = {"team": rng.choice(TEAMS), "env": rng.choice(["prod", "dev"])}
        pods = {}
        for p in range(PODS):
            pod_labels = {"app": APPS[p % len(APPS)], "tier": rng.choice(["front", "back"])}
            ip = f"10.{n // 250}.{n % 250}.{p + 1}"
            pods[f"p{p}"] = {
                "labels": pod_labels,
                "ip": ip,
                "ports": [
                    {"port": 80, "protocol": "TCP", "name": "http"},
                    {"port": 443, "protocol": "TCP", "name": "https"},
                ],
            }
            cyclonus_pods.append({
                "Namespace": ns, "Name": f"p{p}", "Labels": pod_labels, "IP": ip,
                "Containers": [
                    {"Name": "http", "Port": 80, "PortName": "http", "Protocol": "TCP"},
                    {"Name": "https", "Port": 443, "PortName": "https", "Protocol": "TCP"},
                ],
            })
        model["namespaces"][ns] = {"labels": labels, "pods": pods}
        cyclonus_ns[ns] = dict(labels, **{"kubernetes.io/metadata.name": ns})

    os.makedirs(os.path.join(folder, "policies"))
    for i in range(policies):
        ns = f"ns{rng.randrange(namespaces)}"
        spec = {"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}, "policyTypes": ["Ingress"]}
        peer = rng.choice([
            {"namespaceSelector": {"matchLabels": {"team": rng.choice(TEAMS)}}},
            {"podSelector": {"matchLabels": {"tier": "front"}}},
            {"namespaceSelector": {"matchLabels": {"env": "prod"}},
             "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}},
            {"ipBlock": {"cidr": "10.0.0.0/16", "except": [f"10.0.{rng.randrange(100)}.0/24"]}},
        ])
        spec["ingress"] = [{"from": [peer], "ports": [{"port": rng.choice([80, 443, "https"]), "protocol": "TCP"}]}]
        if rng.random() < 0.3:
            spec["policyTypes"].append("Egress")
            spec["egress"] = [{"to": [{"namespaceSelector": {"matchLabels": {"team": rng.choice(TEAMS)}}}]}]
        policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                  "metadata": {"name": f"np{i}", "namespace": ns}, "spec": spec}
        with open(os.path.join(folder, "policies", f"np{i}.yaml"), "w") as f:
            json.dump(policy, f)
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(model, f)
    probe = {"Probes": [{"Protocol": "TCP", "Port": 80}, {"Protocol": "TCP", "Port": 443}],
             "Resources": {"Namespaces": cyclonus_ns, "Pods": cyclonus_pods}}
    with open(os.path.join(folder, "cyclonus-probe.json"), "w") as f:
        json.dump(probe, f)


def timed(cmd):
    """Wall seconds and peak RSS (MiB) of one run, output discarded."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M"] + cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{out.stderr[-2000:]}")
    wall, rss = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss) / 1024


def machine():
    cores = os.cpu_count()
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 1024 / 1024
    return f"{cores} cores, {mem:.0f} GiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--netpol", required=True)
    ap.add_argument("--cyclonus", required=True)
    ap.add_argument("--doc", default="docs/BENCHMARKS.md")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for namespaces, policies in SIZES:
            folder = os.path.join(tmp, f"n{namespaces}")
            generate(folder, namespaces, policies, seed=namespaces)
            ours = [os.path.abspath(args.netpol), "probe", "--policies", f"{folder}/policies",
                    "--model", f"{folder}/model.json"]
            theirs = [os.path.abspath(args.cyclonus), "analyze", "--mode", "probe",
                      "--policy-path", f"{folder}/policies", "--probe-path", f"{folder}/cyclonus-probe.json"]
            times = {"ours": [], "theirs": []}
            for _ in range(ROUNDS):
                for key, cmd in (("ours", ours), ("theirs", theirs)):
                    times[key].append(timed(cmd))
            pods = namespaces * PODS
            verdicts = pods * pods * 2
            ours_s = statistics.median(t for t, _ in times["ours"])
            theirs_s = statistics.median(t for t, _ in times["theirs"])
            rows.append({
                "namespaces": namespaces, "pods": pods, "policies": policies, "verdicts": verdicts,
                "ours_s": ours_s, "theirs_s": theirs_s,
                "ours_rss": max(r for _, r in times["ours"]), "theirs_rss": max(r for _, r in times["theirs"]),
            })
            print(json.dumps(rows[-1]), flush=True)

    lines = [
        "<!-- netpol:begin -->",
        f"### NetworkPolicy evaluator run of {datetime.date.today()} ({machine()})",
        "",
        "Command: `make bench-netpol` (`e2e/bench/netpol.py`). Each size: 10 pods per namespace serving 80 and",
        "443/TCP, random ingress (and some egress) policies over namespace, pod, expression and ipBlock peers;",
        "every pod to every pod on both ports. Both tools read the same policy files and model and print the",
        f"whole truth table (chassis-netpol as JSON, cyclonus as its tables) to /dev/null; median of {ROUNDS}",
        "alternating rounds, peak RSS the largest of the rounds.",
        "",
        "| namespaces x pods | policies | verdicts | chassis-netpol | cyclonus v0.5.6 | speed-up | ns per verdict (ours) | RSS ours / cyclonus |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['namespaces']} x {PODS} | {r['policies']} | {r['verdicts']:,} | {r['ours_s']:.2f} s | "
            f"{r['theirs_s']:.2f} s | **{r['theirs_s'] / max(r['ours_s'], 0.01):.1f}x** | "
            f"{r['ours_s'] * 1e9 / r['verdicts']:.0f} | {r['ours_rss']:.0f} / {r['theirs_rss']:.0f} MiB |"
        )
    lines += ["<!-- netpol:end -->"]
    section = "\n".join(lines)
    with open(args.doc) as f:
        doc = f.read()
    if "<!-- netpol:begin -->" in doc:
        doc = re.sub(r"<!-- netpol:begin -->.*<!-- netpol:end -->", lambda _: section, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n## NetworkPolicy evaluator (issue 4)\n\n" + section + "\n"
    with open(args.doc, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
