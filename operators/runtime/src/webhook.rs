//! HTTPS for admission webhooks: rustls on tokio, hyper connections, warp routes.
//!
//! The serving certificate comes from a folder (`tls.crt`, `tls.key`, as a Secret or
//! cert-manager mounts it) or is generated at start, with its own CA, for loopback
//! development; either way the caller gets the CA bundle to register.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
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
}

impl std::fmt::Debug for ServingCert {
    // The private key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").finish_non_exhaustive()
    }
}

impl ServingCert {
    /// A fresh CA and a leaf for `hosts` (DNS names or IP addresses), valid for a
    /// year from an hour ago (clock skew). The CA signs nothing but this leaf.
    pub fn self_signed(hosts: &[String]) -> Result<Self, WebhookError> {
        let now = time::OffsetDateTime::now_utc();
        let (not_before, not_after) = (now - time::Duration::hours(1), now + time::Duration::days(365));
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.not_before = not_before;
        ca_params.not_after = not_after;
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "chassis webhook CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut leaf_params = CertificateParams::new(hosts.to_vec())?;
        leaf_params.not_before = not_before;
        leaf_params.not_after = not_after;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "chassis-operator webhook");
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
        Ok(Self {
            cert_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            ca_pem: ca.pem(),
        })
    }

    /// `tls.crt` and `tls.key` from `dir`; the CA bundle is `ca.crt` when present,
    /// else the certificate itself.
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
        })
    }

    fn server_config(&self) -> Result<ServerConfig, WebhookError> {
        let certs =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Serves `routes` over TLS on `addr` until `shutdown` is cancelled.
pub async fn serve<F>(
    addr: SocketAddr,
    cert: &ServingCert,
    routes: F,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), WebhookError>
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let acceptor = TlsAcceptor::from(Arc::new(cert.server_config()?));
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
