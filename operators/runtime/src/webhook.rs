//! HTTPS for admission webhooks: rustls on tokio, hyper connections, warp routes.
//!
//! The serving certificate comes from a folder (`tls.crt`, `tls.key`, as a Secret or
//! cert-manager mounts it), from a Secret the operator manages itself (see
//! `webhook_secret`), or is generated at start, with its own CA, for loopback
//! development; either way the caller gets the CA bundle to register. The
//! certificate can be replaced while serving, for renewal.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Errors setting up the webhook server.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("generating the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("reading the webhook certificate from {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing the webhook certificate: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("the webhook certificate is unusable: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening for webhooks: {0}")]
    Listen(#[from] std::io::Error),
}

/// A serving certificate and key (PEM) and the CA bundle clients trust it by.
#[derive(Clone)]
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// The CA's key, kept so the serving certificate can be renewed under the same CA
    /// (the API server's caBundle then never changes). `None` for certificates from a
    /// folder.
    pub ca_key_pem: Option<String>,
    /// When the serving certificate expires.
    pub not_after: Option<time::OffsetDateTime>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Lifetime of a generated serving certificate; renewed [`RENEW_BEFORE`] its end.
const LEAF_LIFETIME: time::Duration = time::Duration::days(365);
/// Lifetime of a generated CA.
const CA_LIFETIME: time::Duration = time::Duration::days(3650);
/// A certificate is renewed this long before it expires.
pub const RENEW_BEFORE: time::Duration = time::Duration::days(30);

/// The CA's parameters: the same every time, so a stored CA key signs new serving
/// certificates that verify against the stored CA certificate.
fn ca_params(not_after: time::OffsetDateTime) -> Result<CertificateParams, WebhookError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    ca_params.not_after = not_after;
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "chassis webhook CA");
    Ok(ca_params)
}

impl ServingCert {
    /// A new CA and a serving certificate for `hosts` (DNS names or IPs), for loopback
    /// development or a first install.
    pub fn self_signed(hosts: &[String]) -> Result<Self, WebhookError> {
        Self::issue(hosts, None)
    }

    /// A serving certificate for `hosts`, signed by `ca` (certificate and key PEM) when
    /// given, otherwise by a new CA.
    pub fn issue(hosts: &[String], ca: Option<(&str, &str)>) -> Result<Self, WebhookError> {
        let now = time::OffsetDateTime::now_utc();
        let (ca_pem, ca_key) = match ca {
            Some((pem, key)) => (pem.to_string(), KeyPair::from_pem(key)?),
            None => {
                let key = KeyPair::generate()?;
                let cert = ca_params(now + CA_LIFETIME)?.self_signed(&key)?;
                (cert.pem(), key)
            }
        };
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params(now + CA_LIFETIME)?, ca_key);

        let not_after = now + LEAF_LIFETIME;
        let mut leaf_params = CertificateParams::new(hosts.to_vec())?;
        leaf_params.not_before = now - time::Duration::hours(1);
        leaf_params.not_after = not_after;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "chassis-operator webhook");
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
        Ok(Self {
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            ca_pem,
            ca_key_pem: Some(ca_key_pem),
            not_after: Some(not_after),
        })
    }

    pub fn from_dir(dir: &Path) -> Result<Self, WebhookError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| WebhookError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let cert_pem = read("tls.crt")?;
        let key_pem = read("tls.key")?;
        let ca_pem = read("ca.crt").unwrap_or_else(|_| cert_pem.clone());
        Ok(Self {
            cert_pem,
            key_pem,
            ca_pem,
            ca_key_pem: None,
            not_after: None,
        })
    }

    fn certified_key(&self) -> Result<CertifiedKey, WebhookError> {
        let certs =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())?;
        let provider = rustls::crypto::ring::default_provider();
        Ok(CertifiedKey::from_der(certs, key, &provider)?)
    }
}

/// The certificate the server presents, replaceable while it runs (renewal).
#[derive(Debug)]
pub struct Reloadable(std::sync::RwLock<Arc<CertifiedKey>>);

impl Reloadable {
    pub fn new(cert: &ServingCert) -> Result<Arc<Self>, WebhookError> {
        Ok(Arc::new(Self(std::sync::RwLock::new(Arc::new(
            cert.certified_key()?,
        )))))
    }

    /// Serves `cert` to every new connection from now on.
    pub fn replace(&self, cert: &ServingCert) -> Result<(), WebhookError> {
        let key = Arc::new(cert.certified_key()?);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }
}

impl ResolvesServerCert for Reloadable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn server_config(cert: Arc<Reloadable>) -> Result<ServerConfig, WebhookError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `routes` over TLS on `addr` until `shutdown` is cancelled.
pub async fn serve<F>(
    addr: SocketAddr,
    cert: Arc<Reloadable>,
    routes: F,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), WebhookError>
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let acceptor = TlsAcceptor::from(Arc::new(server_config(cert)?));
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let service = warp::service(routes);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(err) => {
                        // e.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %err, "webhook accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let service = service.clone();
            tokio::spawn(async move {
                // A client that never finishes its handshake must not hold a task forever.
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
                let hyper_service = TowerToHyperService::new(service);
                if let Err(err) = Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), hyper_service)
                    .await
                {
                    tracing::debug!(%peer, error = %err, "webhook connection ended with an error");
                }
            });
        }
    });
    Ok((local, task))
}
