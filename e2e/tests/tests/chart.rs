//! The helm chart against the real API server: lint and render, a server-side dry
//! run of every object, the values schema, no wildcard in its RBAC, and install onto
//! kwok nodes, upgrade and uninstall.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chassis_api::network::v1alpha1::NetworkProfile;
use chassis_e2e::{cluster, eventually, pipe, repo_root, run, unique};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

fn chart() -> String {
    repo_root().join("charts/chassis").display().to_string()
}

/// `helm template` of the chart as release `release`, with `args`.
fn render(release: &str, args: &[&str]) -> Result<String> {
    run(
        cluster().helm().args(["template", release, &chart()]).args(args),
        "helm template",
    )
}

/// Every YAML document of `rendered` as JSON.
fn documents(rendered: &str) -> Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(rendered) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

#[test]
fn the_charts_webhooks_are_the_ones_the_operator_registers_locally() -> Result<()> {
    // Two definitions of the same webhooks: the chart's (a Service) and the operator's
    // `--webhook-register` (a URL, used by e2e, `make run` and `make demo`). Everything
    // but the address must agree, or the chart ships what the tests never exercised.
    let docs = documents(&render("chassis", &[])?)?;
    let (mutating, validating) = chassis_tenancy::admission::configurations("https://127.0.0.1:9443", "ca");
    let ours = [
        serde_json::to_value(&mutating.webhooks)?,
        serde_json::to_value(&validating.webhooks)?,
    ];
    let paths = [
        chassis_tenancy::admission::MUTATE_PATH,
        chassis_tenancy::admission::VALIDATE_PATH,
    ];
    for ((kind, code), path) in ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
        .iter()
        .zip(ours)
        .zip(paths)
    {
        let chart = docs
            .iter()
            .find(|d| d["kind"] == *kind)
            .with_context(|| format!("no {kind} rendered"))?;
        let (mut chart_hooks, mut code_hooks) = (chart["webhooks"].clone(), code);
        let (Some(chart_list), Some(code_list)) = (chart_hooks.as_array_mut(), code_hooks.as_array_mut())
        else {
            bail!("{kind}: no webhooks list");
        };
        assert_eq!(chart_list.len(), code_list.len(), "{kind}");
        for (chart_hook, code_hook) in chart_list.iter_mut().zip(code_list.iter_mut()) {
            assert_eq!(
                chart_hook["clientConfig"]["service"]["path"],
                format!("/{path}"),
                "{kind}"
            );
            for hook in [&mut *chart_hook, &mut *code_hook] {
                if let Some(h) = hook.as_object_mut() {
                    h.remove("clientConfig");
                }
            }
        }
        assert_eq!(
            chart_hooks, code_hooks,
            "{kind}: the chart's and the operator's differ"
        );
    }
    Ok(())
}

#[test]
fn with_cert_manager_a_ca_of_the_charts_own_signs_the_webhook_certificate() -> Result<()> {
    // The caBundle is the serving Secret's ca.crt. Signed by a self-signed Issuer, the
    // serving certificate was its own ca.crt, and each renewal changed the caBundle
    // minutes before the pods served the new certificate: admission down meanwhile.
    let docs = documents(&render(
        "chassis",
        &["--set", "webhook.certManager.enabled=true"],
    )?)?;
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .with_context(|| format!("{kind} {name} missing"))
    };
    let serving = find("Certificate", "chassis-webhook-cert")?;
    assert_eq!(
        serving["spec"]["issuerRef"]["name"], "chassis-webhook-ca",
        "{serving}"
    );
    assert!(serving["spec"]["isCA"].is_null(), "{serving}");
    let ca_issuer = find("Issuer", "chassis-webhook-ca")?;
    assert_eq!(
        ca_issuer["spec"]["ca"]["secretName"], "chassis-webhook-ca",
        "{ca_issuer}"
    );
    let ca = find("Certificate", "chassis-webhook-ca")?;
    assert_eq!(ca["spec"]["isCA"], true, "{ca}");
    assert_eq!(ca["spec"]["secretName"], "chassis-webhook-ca", "{ca}");
    // Re-issued with the same key, the CA still verifies what it signed before.
    assert_eq!(ca["spec"]["privateKey"]["rotationPolicy"], "Never", "{ca}");
    assert_eq!(ca["spec"]["issuerRef"]["name"], "chassis-selfsigned", "{ca}");
    assert!(find("Issuer", "chassis-selfsigned")?["spec"]["selfSigned"].is_object());
    for kind in ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"] {
        let config = docs.iter().find(|d| d["kind"] == kind).context(kind)?;
        assert_eq!(
            config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "default/chassis-webhook-cert",
            "{config}"
        );
    }

    // An issuer of the platform's: the chart makes none of its own.
    let docs = documents(&render(
        "chassis",
        &[
            "--set",
            "webhook.certManager.enabled=true,webhook.certManager.issuerRef.name=platform-ca,webhook.certManager.issuerRef.kind=ClusterIssuer",
        ],
    )?)?;
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .filter_map(|d| Some((d["kind"].as_str()?, d["metadata"]["name"].as_str()?)))
        .filter(|(kind, _)| ["Certificate", "Issuer"].contains(kind))
        .collect();
    assert_eq!(kinds, [("Certificate", "chassis-webhook-cert")], "{kinds:?}");
    let serving = docs
        .iter()
        .find(|d| d["kind"] == "Certificate")
        .context("the serving Certificate")?;
    assert_eq!(serving["spec"]["issuerRef"]["name"], "platform-ca", "{serving}");
    assert_eq!(serving["spec"]["issuerRef"]["kind"], "ClusterIssuer", "{serving}");
    Ok(())
}

#[test]
fn the_chart_lints_strictly_and_every_object_passes_a_server_side_dry_run() -> Result<()> {
    run(
        cluster().helm().args(["lint", "--strict", &chart()]),
        "helm lint --strict",
    )?;
    // The optional parts render too (their CRDs, cert-manager's and
    // prometheus-operator's, are not installed here, so they are not dry-run).
    let optional = render(
        "chassis",
        &[
            "--set",
            "webhook.certManager.enabled=true",
            "--set",
            "metrics.serviceMonitor.enabled=true",
        ],
    )?;
    let kinds: Vec<String> = documents(&optional)?
        .iter()
        .filter_map(|d| d["kind"].as_str().map(str::to_string))
        .collect();
    for kind in ["Certificate", "Issuer", "ServiceMonitor"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing from {kinds:?}");
    }

    let namespace = unique("chart-dry");
    run(
        cluster().kubectl().args(["create", "namespace", &namespace]),
        "kubectl create namespace",
    )?;
    // The API server's Pod Security admission judges the operator's pod template: it
    // warns about a workload that the `restricted` level would refuse.
    run(
        cluster().kubectl().args([
            "label",
            "namespace",
            &namespace,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted",
        ]),
        "kubectl label namespace",
    )?;
    // Not the release name of the e2e operator, whose webhook configurations (with a
    // URL) exist already.
    let release = unique("dry");
    let rendered = render(
        &release,
        &[
            "-n",
            &namespace,
            "--set",
            "tenancy.defaultTemplate.create=true",
            "--set",
            "tenancy.selfProvisioner.groups={developers}",
        ],
    )?;
    let docs = documents(&rendered)?;
    let count = docs.len();
    assert!(count >= 14, "only {count} objects rendered");
    // Beyond the restricted level (checked below): nothing written to the image, and
    // no fixed user (OpenShift's restricted-v2 assigns one per namespace).
    let pod = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .map(|d| &d["spec"]["template"]["spec"])
        .context("no Deployment")?;
    for container in pod["containers"].as_array().context("containers")? {
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"], true,
            "{container}"
        );
    }
    assert!(pod["securityContext"]["runAsUser"].is_null(), "{pod}");
    let out = pipe(
        cluster()
            .kubectl()
            .args(["apply", "--dry-run=server", "--server-side", "--force-conflicts"])
            .args(["--field-manager", "chart-dry-run", "-n", &namespace, "-f", "-"]),
        &rendered,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the API server refused part of the chart:\n{stdout}\n{stderr}"
    );
    assert!(
        !stderr.contains("would violate PodSecurity"),
        "the operator's pods would not run in a restricted namespace:\n{stderr}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains("(server dry run)")).count(),
        count,
        "{stdout}"
    );
    run(
        cluster()
            .kubectl()
            .args(["delete", "namespace", &namespace, "--wait=false"]),
        "kubectl delete namespace",
    )?;
    Ok(())
}

/// The ingress rule of the chart's NetworkPolicy for the webhook port.
fn webhook_ingress(rendered: &str) -> Result<serde_json::Value> {
    let docs = documents(rendered)?;
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .context("the chart renders a NetworkPolicy")?;
    policy["spec"]["ingress"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["ports"][0]["port"] == "webhook"))
        .cloned()
        .context("an ingress rule for the webhook port")
}

/// The operator's `--reserved-project-names` as the chart renders it with `args`.
fn reserved_names(args: &[&str]) -> Result<Option<String>> {
    let flag = "--reserved-project-names=";
    Ok(render("chassis", args)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("- ").and_then(|a| a.strip_prefix(flag)))
        .map(str::to_string))
}

#[test]
fn names_added_to_the_reserved_ones_keep_the_defaults() -> Result<()> {
    let defaults = reserved_names(&[])?.context("reserved names by default")?;
    assert!(
        defaults.split(',').any(|n| n == "ingress-nginx") && defaults.contains("openshift-*"),
        "{defaults}"
    );
    let added = reserved_names(&["--set", "tenancy.extraReservedProjectNames={vault,team-*}"])?;
    assert_eq!(added, Some(format!("{defaults},vault,team-*")));
    assert_eq!(
        reserved_names(&["--set", "tenancy.reservedProjectNames=null"])?,
        None
    );
    Ok(())
}

#[test]
fn the_config_checksum_stays_a_string_when_its_digits_are_all_decimal() -> Result<()> {
    // The pod template's `checksum/config` is the first 16 hex digits of a hash of the
    // values. Unquoted, a hash that happened to be all decimal digits rendered as a YAML
    // number, and the install or upgrade failed ("expected string"): a CI run whose
    // values hashed so found it. With today's defaults this value hashes so.
    let docs = documents(&render(
        "chassis",
        &["--set", "tenancy.extraReservedProjectNames={r1997}"],
    )?)?;
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("the operator's Deployment")?;
    let checksum = &deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"];
    anyhow::ensure!(
        checksum.as_str().is_some_and(|c| c.len() == 16),
        "checksum/config must be a string: {checksum}"
    );
    Ok(())
}

#[test]
fn the_webhook_port_can_be_narrowed_to_where_the_api_server_calls_from() -> Result<()> {
    let open = webhook_ingress(&render("chassis", &[])?)?;
    assert!(open.get("from").is_none(), "open by default: {open}");
    let narrowed = webhook_ingress(&render(
        "chassis",
        &[
            "--set-json",
            r#"networkPolicy.webhookFrom=[{"ipBlock":{"cidr":"10.0.0.0/24"}}]"#,
        ],
    )?)?;
    assert_eq!(
        narrowed["from"],
        serde_json::json!([{"ipBlock": {"cidr": "10.0.0.0/24"}}]),
        "{narrowed}"
    );
    Ok(())
}

#[test]
fn the_values_schema_rejects_a_wrong_type_naming_the_key() -> Result<()> {
    for (set, key, want) in [
        ("replicas=two", "/replicas", "want integer"),
        ("webhook.port=80", "/webhook/port", "minimum"),
        ("tenancy.bindableRoles={*}", "/tenancy/bindableRoles/0", ""),
        ("operator.logFormat=xml", "/operator/logFormat", ""),
        (
            "network.baselineProfile.egress=Block",
            "/network/baselineProfile/egress",
            "",
        ),
        // The CRD's rule for a peer's name, refused at template time, not at apply.
        (
            "network.baselineProfile.allowFrom[0].name=Ingress_Nginx,network.baselineProfile.allowFrom[0].namespaceSelector.matchLabels.a=b",
            "/network/baselineProfile/allowFrom/0/name",
            "",
        ),
        (
            "tenancy.enabled=false,network.enabled=false",
            "every area is disabled",
            "",
        ),
        // Settings that would install without error and then defeat the design.
        (
            "tenancy.selfProvisioner.groups={system:authenticated}",
            "/tenancy/selfProvisioner/groups/0",
            "",
        ),
        (
            "tenancy.bindableRoles={admin,cluster-admin}",
            "/tenancy/bindableRoles/1",
            "",
        ),
        (
            "metrics.port=9443",
            "metrics.port and webhook.port must differ",
            "",
        ),
        // A budget keeping every replica blocks every node drain.
        (
            "podDisruptionBudget.minAvailable=100%",
            "/podDisruptionBudget/minAvailable",
            "",
        ),
        (
            "webhook.certManager.enabled=true,webhook.certManager.issuerRef.kind=ClusterIssuer",
            "/webhook/certManager/issuerRef",
            "",
        ),
    ] {
        let out = cluster()
            .helm()
            .args(["template", "chassis", &chart(), "--set", set])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            stderr.contains(key) && stderr.contains(want),
            "--set {set}: {stderr}"
        );
    }
    let out = cluster()
        .helm()
        .args(["template", "chassis", &chart(), "--set", "tenancy.typo=true"])
        .output()?;
    assert!(!out.status.success(), "an unknown key was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("typo"));
    Ok(())
}

/// What projects depend on outlives the release, and nothing the chart renders can
/// block a node drain.
#[test]
fn the_charts_own_template_and_profile_survive_uninstall_and_one_replica_has_no_budget() -> Result<()> {
    let rendered = render(
        "chassis",
        &[
            "--set",
            "tenancy.defaultTemplate.create=true",
            "--set",
            "network.baselineProfile.create=true",
        ],
    )?;
    let docs = documents(&rendered)?;
    for kind in ["ProjectTemplate", "NetworkProfile"] {
        let doc = docs
            .iter()
            .find(|d| d["kind"] == kind)
            .with_context(|| format!("no {kind} rendered"))?;
        assert_eq!(
            doc["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{kind}: {doc}"
        );
    }
    assert!(docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
    let single = documents(&render("chassis", &["--set", "replicas=1"])?)?;
    assert!(
        !single.iter().any(|d| d["kind"] == "PodDisruptionBudget"),
        "a budget of one available pod for one replica blocks every drain"
    );
    // A percentage is rounded up: 60 % of two replicas keeps both.
    for (percent, budget) in [("60%", false), ("50%", true)] {
        let docs = documents(&render(
            "chassis",
            &["--set", &format!("podDisruptionBudget.minAvailable={percent}")],
        )?)?;
        assert_eq!(
            docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"),
            budget,
            "minAvailable {percent} of 2 replicas"
        );
    }
    Ok(())
}

#[test]
fn the_chart_rbac_has_no_wildcard_and_binds_only_named_roles() -> Result<()> {
    let rendered = render("chassis", &[])?;
    let mut rules = 0;
    for doc in documents(&rendered)? {
        if !matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in doc["rules"].as_array().into_iter().flatten() {
            rules += 1;
            for field in [
                "apiGroups",
                "resources",
                "verbs",
                "resourceNames",
                "nonResourceURLs",
            ] {
                let values = rule[field].as_array().into_iter().flatten();
                for value in values {
                    assert_ne!(
                        value.as_str(),
                        Some("*"),
                        "wildcard in {}: {rule}",
                        doc["metadata"]["name"]
                    );
                }
            }
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            for powerful in ["bind", "escalate", "impersonate"] {
                if verbs.contains(&powerful) {
                    assert!(
                        rule["resourceNames"].is_array(),
                        "{powerful} without resourceNames: {rule}"
                    );
                }
            }
        }
    }
    assert!(rules >= 10, "only {rules} rules rendered");
    Ok(())
}

async fn operator_pods(client: &Client, namespace: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await?;
    Ok(list.items)
}

fn running_on_kwok(pods: &[Pod]) -> bool {
    pods.iter().all(|p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            && p.metadata.deletion_timestamp.is_none()
            && p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| n.starts_with("kwok-"))
    })
}

fn pod_hashes(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p.labels().get("pod-template-hash").cloned())
        .collect()
}

#[tokio::test]
async fn install_upgrade_and_uninstall_on_kwok_nodes_keep_the_charts_profile() -> Result<()> {
    let admin = cluster().admin().await?;
    let release = unique("rel");
    let namespace = unique("chart");
    // Release-scoped names, and admission limited to Projects labelled for this
    // release, so parallel tests never meet this installation's (fake) pods.
    let selector = format!("webhook.objectSelector.matchLabels.chassis-e2e={release}");
    // The chart's own baseline profile, under a name of this release's (no template
    // names it, so it applies nowhere): uninstall must keep it, templates name it.
    let profile = unique("kept-baseline");
    let baseline = format!("network.baselineProfile.create=true,network.baselineProfile.name={profile}");
    let install = |cmd: &mut Command| {
        cmd.args([&release, &chart(), "-n", &namespace])
            .args([
                "--set",
                "tenancy.selfProvisioner.create=false",
                "--set",
                &selector,
                "--set",
                &baseline,
            ])
            .args(["--wait", "--timeout", "120s"]);
    };
    let mut cmd = cluster().helm();
    cmd.args(["install", "--create-namespace"]);
    install(&mut cmd);
    run(&mut cmd, "helm install")?;

    let pods = eventually(
        "2 operator pods Running on kwok nodes",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            let namespace = namespace.clone();
            async move {
                let pods = operator_pods(&admin, &namespace).await?;
                Ok((pods.len() == 2 && running_on_kwok(&pods)).then_some(pods))
            }
        },
    )
    .await?;
    let before = pod_hashes(&pods);

    let mut cmd = cluster().helm();
    cmd.args([
        "upgrade",
        "--reset-then-reuse-values",
        "--set",
        "operator.logLevel=debug",
    ]);
    install(&mut cmd);
    run(&mut cmd, "helm upgrade")?;
    eventually("the upgrade rolls the pods", Duration::from_secs(90), || {
        let (admin, namespace, before) = (admin.clone(), namespace.clone(), before.clone());
        async move {
            let pods = operator_pods(&admin, &namespace).await?;
            let rolled = pods.len() == 2
                && running_on_kwok(&pods)
                && pod_hashes(&pods).iter().all(|h| !before.contains(h));
            Ok(rolled.then_some(()))
        }
    })
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &namespace);
    let deployment = deployments.get(&format!("{release}-chassis-operator")).await?;
    let args = deployment
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        args.iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug"))
    );

    let profiles: Api<NetworkProfile> = Api::all(admin.clone());
    assert!(
        profiles.get_opt(&profile).await?.is_some(),
        "the release did not create its baseline profile"
    );
    run(
        cluster()
            .helm()
            .args(["uninstall", &release, "-n", &namespace, "--wait"]),
        "helm uninstall",
    )?;
    // Templates name the profile; deleting it with the release would open their
    // projects' namespaces (helm.sh/resource-policy: keep).
    let kept = profiles.get_opt(&profile).await?;
    let _ = profiles.delete(&profile, &Default::default()).await;
    assert!(
        kept.is_some(),
        "uninstall removed the chart's baseline NetworkProfile"
    );
    let webhook = format!("{release}-chassis-tenancy");
    assert!(
        Api::<MutatingWebhookConfiguration>::all(admin.clone())
            .get_opt(&webhook)
            .await?
            .is_none(),
        "uninstall left the webhook configuration behind"
    );
    if deployments
        .get_opt(&format!("{release}-chassis-operator"))
        .await?
        .is_some()
    {
        bail!("uninstall left the Deployment behind");
    }
    Api::<Namespace>::all(admin)
        .delete(&namespace, &Default::default())
        .await?;
    Ok(())
}

#[test]
fn the_commands_in_the_install_notes_run_as_pasted() -> Result<()> {
    // The notes show commands to paste; a heredoc whose end marker is indented never
    // ends, and bash would swallow the commands after it. Run them with a `kubectl`
    // that records each call and what it was given.
    let out = run(
        cluster().helm().args([
            "install",
            "notes",
            &chart(),
            "--dry-run=client",
            "--set",
            "tenancy.defaultTemplate.create=false",
        ]),
        "helm install --dry-run",
    )?;
    let notes = out
        .split_once("NOTES:\n")
        .map(|(_, n)| n)
        .context("no NOTES in the output")?;
    // From the first pasted command to the prose after the last one.
    let commands: String = notes
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("kubectl apply"))
        .take_while(|l| !l.starts_with("To let developers"))
        .map(|l| format!("{l}\n"))
        .collect();
    let script = format!("kubectl() {{ echo \"CALL $*\"; if [ \"$2\" = '-f' ]; then cat; fi; }}\n{commands}");
    let mut bash = Command::new("bash");
    bash.args(["-c", &script]);
    let recorded = run(&mut bash, "the notes' commands")?;
    let calls: Vec<&str> = recorded.lines().filter(|l| l.starts_with("CALL ")).collect();
    anyhow::ensure!(
        calls == ["CALL apply -f -", "CALL create -f -", "CALL get projects"],
        "{recorded}"
    );
    anyhow::ensure!(
        recorded.contains("kind: ProjectTemplate") && recorded.contains("kind: Project\n"),
        "{recorded}"
    );
    Ok(())
}
