//! The webhook certificate the operator keeps in a Secret (the chart's default):
//! created once, shared by a second replica, its CA injected into the webhook
//! configurations, and the API server then trusts the webhook with it.

use std::time::Duration;

use anyhow::{Context, Result};
use chassis_api::tenancy::v1alpha1::{Project, ProjectSpec};
use chassis_e2e::{CHART_NAMESPACE, Operator, cluster, eventually, free_port, unique};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};

const REQUESTER: &str = "tenancy.chassis.dev/requester";

/// Webhook configurations like the chart's, but pointing at `url` and limited to
/// Projects labelled `label=value`, with no caBundle yet.
fn configurations(
    name: &str,
    url: &str,
    label: &str,
    value: &str,
) -> Result<(MutatingWebhookConfiguration, ValidatingWebhookConfiguration)> {
    let webhook = |path: &str, kind: &str| {
        serde_json::json!({
            "name": format!("{kind}.{name}.e2e.chassis.dev"),
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": format!("{url}/{path}")},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "objectSelector": {"matchLabels": {label: value}},
            "rules": [{"apiGroups": ["tenancy.chassis.dev"], "apiVersions": ["v1alpha1"],
                       "resources": ["projects"], "operations": ["CREATE", "UPDATE"], "scope": "Cluster"}],
        })
    };
    let mutating = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name}, "webhooks": [webhook("mutate-projects", "mutate")]
    }))?;
    let validating = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name}, "webhooks": [webhook("validate-projects", "validate")]
    }))?;
    Ok((mutating, validating))
}

fn bundle_of(config: &MutatingWebhookConfiguration) -> Option<Vec<u8>> {
    config
        .webhooks
        .as_ref()?
        .first()?
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| b.0.clone())
}

#[tokio::test]
async fn the_operator_keeps_its_certificate_in_a_secret_and_injects_the_ca() -> Result<()> {
    let admin = cluster().admin().await?;
    let id = unique("cert");
    let addr = format!("127.0.0.1:{}", free_port()?);
    let (mutating, validating) = configurations(&id, &format!("https://{addr}"), "chassis-e2e-cert", &id)?;
    let mutating_api: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let validating_api: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    mutating_api.create(&PostParams::default(), &mutating).await?;
    validating_api.create(&PostParams::default(), &validating).await?;

    // Admin credentials: the chart's Role names its own Secret and configurations only.
    let secret_flag = format!("{CHART_NAMESPACE}/{id}");
    let flags = |addr: &str| -> Vec<String> {
        [
            "--controllers",
            "projecttemplate",
            "--webhook-addr",
            addr,
            "--webhook-cert-secret",
            &secret_flag,
            "--webhook-host",
            "127.0.0.1",
            "--webhook-inject-ca",
            &id,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let start = |name: String, addr: &str| {
        let owned = flags(addr);
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        Operator::start_with_kubeconfig(&name, &cluster().kubeconfig(), &args)
    };
    let first = start(format!("{id}-a"), &addr)?;
    first.wait_for_log("serving admission webhooks", Duration::from_secs(60))?;

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), CHART_NAMESPACE);
    let secret = secrets.get(&id).await?;
    let ca = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .map(|b| b.0.clone())
        .context("the Secret holds ca.crt")?;
    assert_eq!(
        secret
            .annotations()
            .get("chassis.dev/webhook-hosts")
            .map(String::as_str),
        Some("127.0.0.1")
    );
    let injected = mutating_api.get(&id).await?;
    assert_eq!(
        bundle_of(&injected),
        Some(ca.clone()),
        "caBundle is the Secret's CA"
    );

    // The API server trusts the webhook with that CA: a labelled Project is admitted
    // and mutated through it (failurePolicy Fail would refuse it otherwise).
    let projects: Api<Project> = Api::all(admin.clone());
    let mut project = Project::new(&unique("certp"), ProjectSpec::default());
    project.labels_mut().insert("chassis-e2e-cert".into(), id.clone());
    // The API server reloads webhook configurations through its own watch: until it
    // has the injected caBundle, its calls fail verification ("failed calling webhook").
    let started = std::time::Instant::now();
    let created = loop {
        match projects.create(&PostParams::default(), &project).await {
            Err(kube::Error::Api(s))
                if s.message.contains("failed calling webhook")
                    && started.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other.context("a Project admitted through the injected CA")?,
        }
    };
    assert!(created.annotations().contains_key(REQUESTER));

    // A second replica serves the same certificate: the Secret is not rewritten, and a
    // client trusting only the injected CA is served by it.
    let version = secret.metadata.resource_version.clone();
    let second_addr = format!("127.0.0.1:{}", free_port()?);
    let second = start(format!("{id}-b"), &second_addr)?;
    second.wait_for_log("serving admission webhooks", Duration::from_secs(60))?;
    let again = secrets.get(&id).await?;
    assert_eq!(
        again.metadata.resource_version, version,
        "the second replica rewrote the Secret"
    );
    let trusting_the_ca = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .build()?;
    let answer = trusting_the_ca
        .post(format!("https://{second_addr}/validate-projects"))
        .body("{}")
        .send()
        .await
        .context("the second replica's certificate verified against the Secret's CA")?;
    assert!(answer.status().as_u16() < 500, "{}", answer.status());

    // A configuration that loses its caBundle (re-created by `helm upgrade --force`, a
    // GitOps replace) gets it back without waiting for the hourly check.
    let drop_bundle = serde_json::json!([{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}]);
    mutating_api
        .patch(
            &id,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Json::<()>(serde_json::from_value(drop_bundle)?),
        )
        .await?;
    eventually("the caBundle set again", Duration::from_secs(20), || {
        let (api, id, ca) = (mutating_api.clone(), id.clone(), ca.clone());
        async move { Ok((bundle_of(&api.get(&id).await?) == Some(ca)).then_some(())) }
    })
    .await?;

    // Deleting the Secret rotates the certificate: a replica makes a new CA at once
    // (not at its hourly check), the other serves the same, and the configurations
    // trust it.
    secrets.delete(&id, &DeleteParams::default()).await?;
    let new_ca = eventually("a new CA in a new Secret", Duration::from_secs(20), || {
        let (secrets, id, old) = (secrets.clone(), id.clone(), ca.clone());
        async move {
            let stored = secrets.get_opt(&id).await?;
            let ca = stored.and_then(|s| s.data?.get("ca.crt").map(|b| b.0.clone()));
            Ok(ca.filter(|ca| *ca != old))
        }
    })
    .await?;
    eventually(
        "the configurations trust the new CA",
        Duration::from_secs(20),
        || {
            let (api, id, ca) = (mutating_api.clone(), id.clone(), new_ca.clone());
            async move { Ok((bundle_of(&api.get(&id).await?) == Some(ca)).then_some(())) }
        },
    )
    .await?;
    let trusting_the_new_ca = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&new_ca)?)
        .build()?;
    for replica in [&addr, &second_addr] {
        eventually(
            "both replicas serve the new certificate",
            Duration::from_secs(20),
            || {
                let (client, url) = (
                    trusting_the_new_ca.clone(),
                    format!("https://{replica}/validate-projects"),
                );
                async move { Ok(client.post(url).body("{}").send().await.is_ok().then_some(())) }
            },
        )
        .await?;
    }

    // Stopped first: they would make the Secret again after the cleanup deletes it.
    drop(first);
    drop(second);
    cleanup(&admin, &id, &created.name_any()).await
}

async fn cleanup(admin: &Client, id: &str, project: &str) -> Result<()> {
    Api::<Project>::all(admin.clone())
        .delete(project, &DeleteParams::default())
        .await?;
    Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .delete(id, &DeleteParams::default())
        .await?;
    Api::<ValidatingWebhookConfiguration>::all(admin.clone())
        .delete(id, &DeleteParams::default())
        .await?;
    Api::<Secret>::namespaced(admin.clone(), CHART_NAMESPACE)
        .delete(id, &DeleteParams::default())
        .await?;
    eventually(
        "the test's webhook configuration is gone",
        Duration::from_secs(10),
        || async {
            let gone = Api::<MutatingWebhookConfiguration>::all(admin.clone())
                .get_opt(id)
                .await?
                .is_none();
            Ok(gone.then_some(()))
        },
    )
    .await
}
