//! HTTPS for admission webhooks: rustls on tokio, hyper connections, warp routes.
//!
//! The serving certificate comes from a folder (`tls.crt`, `tls.key`, as a Secret or
//! cert-manager mounts it), from a Secret the operator manages itself (see
//! `webhook_secret`), or is generated at start, with its own CA, for loopback
//! development; either way the caller gets the CA bundle to register. The
//! certificate can be replaced while serving, for renewal: a managed Secret is renewed
//! by the operator, a folder is read again when its files change ([`watch_dir`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
use tokio_util::task::TaskTracker;

/// How long a client may hold the webhook server's resources for one step: admission
/// is `failurePolicy: Fail`, so a slow client must not keep what it took. (There is
/// no cap on connections: a fixed one would let a few idle clients lock the API
/// server out; an idle HTTP/2 connection is not timed out yet.)
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client may take for the TLS handshake.
    pub handshake: Duration,
    /// How long a client may take to send an HTTP/1.1 request head.
    pub header: Duration,
    /// How long one request may take, its body included.
    pub request: Duration,
    /// How long requests in flight may take to finish at shutdown: past the API
    /// server's `timeoutSeconds` (5 s in the chart) nobody waits for the answer, and the
    /// pod's grace period (30 s, less the preStop pause) must hold the whole shutdown.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(10),
            // The API server gives up after the webhook's `timeoutSeconds` (at most
            // 30 s) anyway.
            request: Duration::from_secs(30),
            drain: Duration::from_secs(10),
        }
    }
}

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

/// Serves `routes` over TLS on `addr` until `shutdown` is cancelled; the returned
/// task ends once the requests in flight then have been answered.
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
    serve_with(addr, cert, routes, shutdown, Limits::default()).await
}

/// [`serve`] with other [`Limits`].
pub async fn serve_with<F>(
    addr: SocketAddr,
    cert: Arc<Reloadable>,
    routes: F,
    shutdown: CancellationToken,
    limits: Limits,
) -> Result<(SocketAddr, JoinHandle<()>), WebhookError>
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let acceptor = TlsAcceptor::from(Arc::new(server_config(cert)?));
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let service = tower::ServiceBuilder::new()
        .timeout(limits.request)
        .service(warp::service(routes));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let task = tokio::spawn(async move {
        let connections = TaskTracker::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
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
            let builder = builder.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                // A client that never finishes its handshake must not hold a task forever.
                let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
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
                let connection = builder.serve_connection(TokioIo::new(tls), hyper_service);
                tokio::pin!(connection);
                let ended = tokio::select! {
                    ended = connection.as_mut() => ended,
                    () = shutdown.cancelled() => {
                        // HTTP/2 GOAWAY (HTTP/1.1: close after the answer): requests in
                        // flight are answered, new ones go to another replica.
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(err) = ended {
                    tracing::debug!(%peer, error = %err, "webhook connection ended with an error");
                }
            });
        }
        // The listener is closed now. The API server keeps its HTTP/2 connection to this
        // pod after the endpoint is gone, so a request may be in flight on it: let those
        // finish before the process exits.
        drop(listener);
        connections.close();
        let deadline = limits.drain;
        if tokio::time::timeout(deadline, connections.wait()).await.is_err() {
            tracing::warn!(
                ?deadline,
                "webhook connections still open at shutdown; closing them"
            );
        }
    });
    Ok((local, task))
}

/// Serves the certificate of `dir` anew whenever its files change, checking every
/// `every` until `shutdown`: cert-manager renews the Secret, the kubelet swaps the
/// mounted files, and the API server (its caBundle injected anew) trusts only the new
/// certificate once the key was rotated. A pair that does not load (caught between
/// two writes) is tried again at the next check; the old one stays meanwhile.
pub async fn watch_dir(
    dir: PathBuf,
    mut current: ServingCert,
    serving: Arc<Reloadable>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let read = match ServingCert::from_dir(&dir) {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!(error = %err, "could not read the webhook certificate again");
                continue;
            }
        };
        if read.cert_pem == current.cert_pem && read.key_pem == current.key_pem {
            continue;
        }
        match serving.replace(&read) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "serving the webhook certificate read anew");
                current = read;
            }
            Err(err) => tracing::warn!(error = %err, "the webhook certificate read anew is unusable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    /// A TLS connection to `addr` by a client trusting only `ca_pem`.
    async fn connect(ca_pem: &str, addr: SocketAddr) -> Option<Tls> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
            roots.add(cert).ok()?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").ok()?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
        tokio::time::timeout(Duration::from_secs(5), tls).await.ok()?.ok()
    }

    /// Whether the server ends `tls` within 5 s (reads to the end).
    async fn closed_by_the_server(tls: &mut Tls) -> bool {
        use tokio::io::AsyncReadExt;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn slow_clients_cannot_hold_a_connection() -> Result<(), Box<dyn std::error::Error>> {
        use tokio::io::AsyncWriteExt;
        let cert = ServingCert::self_signed(&["127.0.0.1".to_string()])?;
        let shutdown = CancellationToken::new();
        let routes = warp::Filter::map(warp::body::bytes(), |b: warp::hyper::body::Bytes| {
            format!("{}", b.len())
        });
        // Room for a debug build's handshake on busy cores; the slow clients below are
        // still closed well inside `closed_by_the_server`'s 5 s.
        let limits = Limits {
            handshake: Duration::from_secs(2),
            header: Duration::from_secs(2),
            request: Duration::from_secs(2),
            drain: Duration::from_secs(2),
        };
        let (addr, _) = serve_with(
            "127.0.0.1:0".parse()?,
            Reloadable::new(&cert)?,
            routes,
            shutdown.clone(),
            limits,
        )
        .await?;

        // A request head never finished.
        let mut slow_head = connect(&cert.ca_pem, addr).await.ok_or("connect")?;
        slow_head.write_all(b"POST / HTTP/1.1\r\nHost: a\r\n").await?;
        assert!(
            closed_by_the_server(&mut slow_head).await,
            "an unfinished head kept its connection"
        );
        // A body announced and never sent.
        let mut slow_body = connect(&cert.ca_pem, addr).await.ok_or("connect")?;
        slow_body
            .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123")
            .await?;
        assert!(
            closed_by_the_server(&mut slow_body).await,
            "an unfinished body kept its connection"
        );

        // A client that sends its request in time is served.
        let mut held = connect(&cert.ca_pem, addr).await.ok_or("connect")?;
        held.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await?;
        let mut answer = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut held, &mut answer).await?;
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        shutdown.cancel();
        Ok(())
    }

    #[tokio::test]
    async fn shutdown_answers_the_requests_in_flight_before_the_server_ends()
    -> Result<(), Box<dyn std::error::Error>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cert = ServingCert::self_signed(&["127.0.0.1".to_string()])?;
        let shutdown = CancellationToken::new();
        let routes = warp::Filter::then(warp::any(), || async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            "admitted"
        });
        let (addr, server) = serve(
            "127.0.0.1:0".parse()?,
            Reloadable::new(&cert)?,
            routes,
            shutdown.clone(),
        )
        .await?;
        let mut client = connect(&cert.ca_pem, addr).await.ok_or("connect")?;
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!server.is_finished(), "the server ended with a request in flight");
        assert!(
            connect(&cert.ca_pem, addr).await.is_none(),
            "new connections are refused"
        );
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await??;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("admitted"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(2), server).await??;
        Ok(())
    }

    /// Whether a client trusting only `ca_pem` completes a handshake with `addr`.
    async fn trusted_by(ca_pem: &str, addr: SocketAddr) -> bool {
        connect(ca_pem, addr).await.is_some()
    }

    fn write_dir(dir: &Path, cert: &ServingCert) -> std::io::Result<()> {
        std::fs::write(dir.join("tls.crt"), &cert.cert_pem)?;
        std::fs::write(dir.join("tls.key"), &cert.key_pem)?;
        std::fs::write(dir.join("ca.crt"), &cert.ca_pem)
    }

    #[tokio::test]
    async fn a_certificate_renewed_in_its_folder_is_served_without_a_restart()
    -> Result<(), Box<dyn std::error::Error>> {
        let hosts = ["127.0.0.1".to_string()];
        let (first, renewed) = (
            ServingCert::self_signed(&hosts)?,
            ServingCert::self_signed(&hosts)?,
        );
        let dir = std::env::temp_dir().join(format!("chassis-webhook-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        write_dir(&dir, &first)?;

        let loaded = ServingCert::from_dir(&dir)?;
        let serving = Reloadable::new(&loaded)?;
        let shutdown = CancellationToken::new();
        let routes = warp::Filter::map(warp::any(), || "ok");
        let (addr, _) = serve("127.0.0.1:0".parse()?, serving.clone(), routes, shutdown.clone()).await?;
        tokio::spawn(watch_dir(
            dir.clone(),
            loaded,
            serving,
            Duration::from_millis(20),
            shutdown.clone(),
        ));
        assert!(trusted_by(&first.ca_pem, addr).await);
        assert!(!trusted_by(&renewed.ca_pem, addr).await);

        write_dir(&dir, &renewed)?;
        let mut served = false;
        for _ in 0..250 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if trusted_by(&renewed.ca_pem, addr).await {
                served = true;
                break;
            }
        }
        let old_served = trusted_by(&first.ca_pem, addr).await;
        shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(served, "the renewed certificate was never served");
        assert!(!old_served, "the old certificate is still served");
        Ok(())
    }
}
