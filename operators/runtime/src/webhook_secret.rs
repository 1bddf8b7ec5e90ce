//! The webhook serving certificate, kept by the operator in a Secret: created on the
//! first start, renewed under the same CA [`RENEW_BEFORE`] it expires (so the API
//! server's `caBundle` never changes), shared by every replica, and its CA injected
//! into the webhook configurations the chart installs. cert-manager users mount its
//! Secret with `--webhook-cert-dir` instead.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Resource};

use crate::webhook::{RENEW_BEFORE, ServingCert, WebhookError};

/// Annotation listing the hosts the stored certificate is valid for.
pub const HOSTS_ANNOTATION: &str = "chassis.dev/webhook-hosts";
/// Annotation holding the stored certificate's expiry (RFC 3339).
pub const NOT_AFTER_ANNOTATION: &str = "chassis.dev/not-after";

#[derive(Debug, thiserror::Error)]
pub enum SecretCertError {
    #[error("reading or writing Secret {name}: {source}")]
    Api { name: String, source: kube::Error },
    #[error(transparent)]
    Certificate(#[from] WebhookError),
    #[error("Secret {0} kept changing while this replica tried to renew it")]
    Contended(String),
}

/// A Secret that holds the webhook certificate.
pub struct SecretCert {
    api: Api<Secret>,
    name: String,
    hosts: Vec<String>,
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The certificate stored in `secret`, if it is complete, names exactly `hosts` and is
/// not yet due for renewal at `now`.
pub fn usable(secret: &Secret, hosts: &[String], now: time::OffsetDateTime) -> Option<ServingCert> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let stored_hosts: Vec<String> = annotations
        .get(HOSTS_ANNOTATION)?
        .split(',')
        .map(str::to_string)
        .collect();
    let not_after = time::OffsetDateTime::parse(
        annotations.get(NOT_AFTER_ANNOTATION)?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    if stored_hosts != hosts || not_after - now < RENEW_BEFORE {
        return None;
    }
    Some(ServingCert {
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
        ca_pem: text(secret, "ca.crt")?,
        ca_key_pem: text(secret, "ca.key"),
        not_after: Some(not_after),
    })
}

impl SecretCert {
    pub fn new(client: Client, namespace: &str, name: &str, hosts: Vec<String>) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            hosts,
        }
    }

    /// A tick for each change to the Secret (deleted to rotate the certificate, renewed
    /// by another replica): the caller runs [`SecretCert::ensure`] at once instead of
    /// at its next periodic check, so replicas never serve different CAs for long.
    pub fn changes(&self) -> impl futures::Stream<Item = ()> + Send + 'static {
        changes_of(self.api.clone(), &self.name)
    }

    fn failed(&self, source: kube::Error) -> SecretCertError {
        SecretCertError::Api {
            name: self.name.clone(),
            source,
        }
    }

    fn secret(&self, cert: &ServingCert, resource_version: Option<String>) -> Secret {
        let mut data = BTreeMap::from([
            (
                "tls.crt".to_string(),
                ByteString(cert.cert_pem.clone().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                ByteString(cert.key_pem.clone().into_bytes()),
            ),
            ("ca.crt".to_string(), ByteString(cert.ca_pem.clone().into_bytes())),
        ]);
        if let Some(key) = &cert.ca_key_pem {
            data.insert("ca.key".into(), ByteString(key.clone().into_bytes()));
        }
        let not_after = cert
            .not_after
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version,
                annotations: Some(BTreeMap::from([
                    (HOSTS_ANNOTATION.to_string(), self.hosts.join(",")),
                    (NOT_AFTER_ANNOTATION.to_string(), not_after),
                ])),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "chassis".to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    /// The certificate to serve: the stored one while it is usable, otherwise a new
    /// one (under the stored CA when there is one) written with a resourceVersion
    /// precondition. Replicas that race read the winner's certificate.
    pub async fn ensure(&self) -> Result<ServingCert, SecretCertError> {
        for _ in 0..3 {
            let stored = self.api.get_opt(&self.name).await.map_err(|e| self.failed(e))?;
            let now = time::OffsetDateTime::now_utc();
            if let Some(cert) = stored.as_ref().and_then(|s| usable(s, &self.hosts, now)) {
                return Ok(cert);
            }
            let ca = stored
                .as_ref()
                .and_then(|s| Some((text(s, "ca.crt")?, text(s, "ca.key")?)));
            let cert = ServingCert::issue(&self.hosts, ca.as_ref().map(|(c, k)| (c.as_str(), k.as_str())))?;
            let written = match &stored {
                None => {
                    self.api
                        .create(&PostParams::default(), &self.secret(&cert, None))
                        .await
                }
                Some(old) => {
                    let secret = self.secret(&cert, old.meta().resource_version.clone());
                    self.api
                        .replace(&self.name, &PostParams::default(), &secret)
                        .await
                }
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %self.name, not_after = ?cert.not_after, "wrote a new webhook certificate");
                    return Ok(cert);
                }
                // Another replica wrote first: read its certificate.
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(err) => return Err(self.failed(err)),
            }
        }
        Err(SecretCertError::Contended(self.name.clone()))
    }
}

/// Which webhooks [`inject_ca`] sets the CA on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inject {
    /// Those without a `caBundle` (a configuration re-created or emptied).
    Missing,
    /// Those whose `caBundle` is not this CA (start-up, or this replica's CA changed).
    Differing,
}

impl Inject {
    /// Whether a webhook whose bundle is `current` gets `bundle`.
    fn applies_to(self, current: Option<&ByteString>, bundle: &ByteString) -> bool {
        match self {
            Inject::Missing => current.is_none_or(|ca| ca.0.is_empty()),
            Inject::Differing => current != Some(bundle),
        }
    }
}

/// Sets `caBundle` on the webhooks `which` selects of the Mutating- and
/// ValidatingWebhookConfigurations named `names` that exist (a strategic merge patch by
/// webhook name, so nothing else in them changes).
pub async fn inject_ca(
    client: &Client,
    names: &[String],
    ca_pem: &str,
    which: Inject,
) -> Result<(), kube::Error> {
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let stale = |webhooks: Vec<(&String, Option<&ByteString>)>| -> Vec<String> {
        webhooks
            .into_iter()
            .filter(|(_, ca)| which.applies_to(*ca, &bundle))
            .map(|(name, _)| name.clone())
            .collect()
    };
    for name in names {
        if let Some(config) = mutating.get_opt(name).await? {
            let webhooks = config.webhooks.iter().flatten();
            let stale = stale(
                webhooks
                    .map(|w| (&w.name, w.client_config.ca_bundle.as_ref()))
                    .collect(),
            );
            patch_bundles(&mutating, name, &stale, &bundle).await?;
        }
        if let Some(config) = validating.get_opt(name).await? {
            let webhooks = config.webhooks.iter().flatten();
            let stale = stale(
                webhooks
                    .map(|w| (&w.name, w.client_config.ca_bundle.as_ref()))
                    .collect(),
            );
            patch_bundles(&validating, name, &stale, &bundle).await?;
        }
    }
    Ok(())
}

/// Keeps the CA of `ca_pem` in the named configurations for as long as the operator
/// runs: sets it where a change left none (re-created by `helm upgrade --force` or a
/// GitOps tool's replace, or emptied by hand), and everywhere when this replica's CA
/// changes. Without this a configuration re-created after start-up would stay without
/// a CA, and with `failurePolicy: Fail` refuse every Project, until the hourly check.
/// A change alone never replaces another CA: two replicas that disagree for a moment
/// (one has not read a new Secret yet) would otherwise patch back and forth.
pub async fn keep_ca_injected(
    client: Client,
    names: Vec<String>,
    mut ca_pem: tokio::sync::watch::Receiver<String>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;

    // One watch per kind and name, by name (RBAC grants list and watch on these names).
    let streams = names.iter().flat_map(|name| {
        [
            changes_of(Api::<MutatingWebhookConfiguration>::all(client.clone()), name).boxed(),
            changes_of(Api::<ValidatingWebhookConfiguration>::all(client.clone()), name).boxed(),
        ]
    });
    let mut events = futures::stream::select_all(streams);
    // Without a renewing task (a fixed certificate) the CA never changes.
    let mut ca_may_change = true;
    loop {
        let which = tokio::select! {
            () = shutdown.cancelled() => return,
            changed = ca_pem.changed(), if ca_may_change => {
                ca_may_change = changed.is_ok();
                ca_may_change.then_some(Inject::Differing)
            }
            changed = events.next() => match changed {
                None => return,
                Some(()) => Some(Inject::Missing),
            },
        };
        let Some(which) = which else {
            continue;
        };
        let ca = ca_pem.borrow_and_update().clone();
        // Our own patch comes back as an event; it finds nothing missing then.
        if let Err(err) = inject_ca(&client, &names, &ca, which).await {
            tracing::warn!(error = %err, "could not inject the webhook CA; trying again at the next change");
        }
    }
}

/// A tick for each change to the object `name` of `api` (watched by name): an update,
/// a delete, or the end of a (re)list, which may hide a delete and re-create. Watch
/// errors are logged and the watch retried with backoff.
fn changes_of<K>(api: Api<K>, name: &str) -> impl futures::Stream<Item = ()> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let (kind, name) = (K::kind(&K::DynamicType::default()).into_owned(), name.to_string());
    watcher(api, config).default_backoff().filter_map(move |event| {
        futures::future::ready(match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => Some(()),
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(error = %err, %kind, %name, "watch failed; retrying");
                None
            }
        })
    })
}

async fn patch_bundles<K>(
    api: &Api<K>,
    name: &str,
    webhooks: &[String],
    bundle: &ByteString,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if webhooks.is_empty() {
        return Ok(());
    }
    let entries: Vec<serde_json::Value> = webhooks
        .iter()
        .map(|w| serde_json::json!({"name": w, "clientConfig": {"caBundle": bundle}}))
        .collect();
    let patch = serde_json::json!({ "webhooks": entries });
    api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    tracing::info!(configuration = %name, webhooks = ?webhooks, "injected the webhook CA");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_change_fills_a_missing_bundle_but_never_replaces_another_ca() {
        let (ours, theirs) = (ByteString(b"ours".to_vec()), ByteString(b"theirs".to_vec()));
        let empty = ByteString(Vec::new());
        // A change seen on the watch: only what has no CA is filled in, so two replicas
        // that disagree about the CA for a moment do not patch back and forth.
        assert!(Inject::Missing.applies_to(None, &ours));
        assert!(Inject::Missing.applies_to(Some(&empty), &ours));
        assert!(!Inject::Missing.applies_to(Some(&theirs), &ours));
        // This replica's CA changed (or it starts): whatever differs is replaced.
        assert!(Inject::Differing.applies_to(Some(&theirs), &ours));
        assert!(Inject::Differing.applies_to(None, &ours));
        assert!(!Inject::Differing.applies_to(Some(&ours), &ours));
    }
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;

    fn stored(hosts: &[String], cert: &ServingCert) -> Secret {
        let store = SecretCert {
            api: Api::namespaced(
                Client::new(
                    tower_test::mock::pair::<
                        http::Request<kube::client::Body>,
                        http::Response<kube::client::Body>,
                    >()
                    .0,
                    "default",
                ),
                "chassis-system",
            ),
            name: "chassis-webhook-cert".into(),
            hosts: hosts.to_vec(),
        };
        store.secret(cert, None)
    }

    #[tokio::test]
    async fn a_stored_certificate_is_reused_until_renewal_is_due_or_the_hosts_change() -> Result<(), String> {
        let hosts = vec!["chassis-webhook.chassis-system.svc".to_string()];
        let cert = ServingCert::issue(&hosts, None).map_err(|e| e.to_string())?;
        let secret = stored(&hosts, &cert);
        let now = time::OffsetDateTime::now_utc();
        let reused = usable(&secret, &hosts, now).ok_or("a fresh certificate must be reused")?;
        assert_eq!(reused.cert_pem, cert.cert_pem);
        assert!(
            usable(&secret, &["other.svc".to_string()], now).is_none(),
            "other hosts"
        );
        let late = now + time::Duration::days(340);
        assert!(
            usable(&secret, &hosts, late).is_none(),
            "renewed 30 days before expiry"
        );
        Ok(())
    }

    #[test]
    fn a_renewed_certificate_keeps_the_ca() -> Result<(), String> {
        let hosts = vec!["chassis-webhook.chassis-system.svc".to_string()];
        let first = ServingCert::issue(&hosts, None).map_err(|e| e.to_string())?;
        let ca_key = first.ca_key_pem.clone().ok_or("the CA key is kept")?;
        let renewed =
            ServingCert::issue(&hosts, Some((&first.ca_pem, &ca_key))).map_err(|e| e.to_string())?;
        assert_eq!(renewed.ca_pem, first.ca_pem, "the caBundle must not change");
        assert_ne!(renewed.cert_pem, first.cert_pem);
        // The renewed certificate verifies against the original CA.
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls_pki_types::CertificateDer::pem_slice_iter(first.ca_pem.as_bytes()) {
            roots
                .add(ca.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(renewed.cert_pem.as_bytes())
            .next()
            .ok_or("a certificate")?
            .map_err(|e| e.to_string())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("chassis-webhook.chassis-system.svc")
            .map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls_pki_types::UnixTime::now())
            .map_err(|e| format!("renewed certificate does not verify against the CA: {e}"))?;
        Ok(())
    }
}
