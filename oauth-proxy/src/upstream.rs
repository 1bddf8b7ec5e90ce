//! The connections to the upstream. HTTP/1.1 carries one request at a time, so a
//! client connection keeps the upstream connection its last request went over and
//! sends its next request on it: no pool to look up, lock and hand back per request
//! (hyper-util's pool did that, plus a task per answer with a body to return the
//! connection once the body was read: about a tenth of the proxy's CPU per request).
//! When the client connection ends, its upstream connection, if ready for another
//! request, goes to its serving thread's idle stack, where the next client
//! connection on that thread finds it (clients that open a connection per request
//! do not open one upstream each time).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

use crate::config::Config;
use crate::server::{Body, BoxError};

/// How long an upstream connection may wait unused on an idle stack, as Go's
/// transport (oauth2-proxy's) keeps idle connections.
pub const IDLE_FOR: Duration = Duration::from_secs(90);

/// Most unused upstream connections one serving thread keeps: past it a connection
/// whose client left is closed.
const MAX_IDLE: usize = 256;

/// An upstream connection with nothing to do, and since when.
type Idle = (Instant, SendRequest<Body>);

/// How the proxy reaches its one upstream.
pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// The scheme and authority the connector connects to.
    address: Uri,
    /// One idle stack per serving thread (see [`crate::server::serving_thread`]): a
    /// connection's task runs on the thread that opened it, so a connection handed to
    /// another thread would wake the first for every exchange.
    idle: Vec<Mutex<Vec<Idle>>>,
}

/// Why a request did not get an answer from the upstream.
#[derive(Debug)]
pub enum Error {
    /// No connection: refused, unreachable, TLS verification failed.
    Connect(BoxError),
    /// The exchange on a connection failed.
    Http(hyper::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connecting: {}", crate::oidc::error_chain(e.as_ref())),
            Error::Http(e) => f.write_str(&crate::oidc::error_chain(e)),
        }
    }
}

impl Error {
    /// Whether the upstream closed (or reset) an established connection before any byte
    /// of an answer: what an idle timeout racing the request looks like. Connecting
    /// failures and answers cut off midway are not this.
    pub fn closed_before_answering(&self) -> bool {
        let Error::Http(e) = self else { return false };
        if e.is_incomplete_message() {
            return true;
        }
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                );
            }
            source = cause.source();
        }
        false
    }
}

/// A poisoned lock only means a request panicked while holding it; what it guards
/// (an optional connection, a list of them) is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Upstream {
    /// The connector for `config`'s upstream: plain HTTP, or TLS verified against the
    /// Mozilla roots plus `upstream-ca-file` (never unverified). HTTP/1.1 only, so
    /// WebSocket upgrades pass through unchanged. An idle stack for each of `threads`
    /// serving threads.
    pub fn new(config: &Config, address: Uri, threads: usize) -> Result<Self, String> {
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("upstream TLS: {e}"))?
                .with_root_certificates(config.upstream_roots.clone())
                .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        // A dead address that drops packets would otherwise hold the request for the
        // kernel's connect timeout (about two minutes).
        http.set_connect_timeout(Some(config.upstream_timeout.min(Duration::from_secs(10))));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            connector,
            address,
            idle: (0..threads.max(1)).map(|_| Mutex::default()).collect(),
        })
    }

    fn idle_of(&self, thread: usize) -> &Mutex<Vec<Idle>> {
        &self.idle[thread % self.idle.len()]
    }

    /// Closes the idle connections of `thread` unused for [`IDLE_FOR`]; the serving
    /// thread calls it now and then, so that they close without traffic too.
    pub fn close_stale(&self, thread: usize) {
        Self::drop_stale(&mut lock(self.idle_of(thread)), Instant::now());
    }

    fn drop_stale(idle: &mut Vec<Idle>, now: Instant) {
        // The oldest are at the bottom: once one is stale, all below it are too.
        match idle
            .iter()
            .position(|(since, _)| now.duration_since(*since) < IDLE_FOR)
        {
            Some(fresh) => drop(idle.drain(..fresh)),
            None => idle.clear(),
        }
    }

    /// The most recently used idle connection of `thread` that is still open.
    fn take_idle(&self, thread: usize) -> Option<SendRequest<Body>> {
        let mut idle = lock(self.idle_of(thread));
        Self::drop_stale(&mut idle, Instant::now());
        while let Some((_, sender)) = idle.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, thread: usize, sender: SendRequest<Body>) {
        let mut idle = lock(self.idle_of(thread));
        if idle.len() < MAX_IDLE {
            idle.push((Instant::now(), sender));
        }
    }

    /// A new connection, its task spawned on the calling thread. hyper's limit of 100
    /// header fields per response stays (more is a 502): a higher one makes hyper
    /// allocate its parse arrays on the heap for every response.
    async fn connect(&self) -> Result<SendRequest<Body>, Error> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(Error::Connect)?;
        let io = connector
            .call(self.address.clone())
            .await
            .map_err(Error::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(Error::Http)?;
        tokio::spawn(async move {
            // WebSockets take over the connection once the upstream agrees (101).
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %crate::oidc::error_chain(&e), "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// What one client connection keeps between its requests.
pub struct ClientConnection {
    /// The peer as accepted: on a dual-stack listener an IPv4 peer is `::ffff:a.b.c.d`.
    pub peer: IpAddr,
    /// The peer with such an address made IPv4 again, which IPv4 ranges and upstream
    /// allow-lists match.
    pub remote: SocketAddr,
    /// `remote`'s address as a header value (X-Forwarded-For), formatted once.
    pub address_value: Option<HeaderValue>,
    upstream: Arc<Upstream>,
    thread: usize,
    /// The upstream connection the last request went over.
    sender: Mutex<Option<SendRequest<Body>>>,
}

impl ClientConnection {
    /// A client connection from `remote`, accepted on serving thread `thread`.
    pub fn new(upstream: Arc<Upstream>, remote: SocketAddr, thread: usize) -> Self {
        let peer = remote.ip();
        let remote = SocketAddr::new(peer.to_canonical(), remote.port());
        Self {
            peer,
            remote,
            address_value: HeaderValue::from_str(&remote.ip().to_string()).ok(),
            upstream,
            thread,
            sender: Mutex::new(None),
        }
    }

    /// Sends `request` (its URI in origin form) upstream: on this client's upstream
    /// connection when it is ready for it, else on an idle one of this thread, else on
    /// a new one. A request that a kept connection could not even take (it had closed
    /// meanwhile) goes out once more on another: nothing of it was sent.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, Error> {
        loop {
            let kept = lock(&self.sender).take().filter(SendRequest::is_ready);
            let (mut sender, reused) = match kept.or_else(|| self.upstream.take_idle(self.thread)) {
                Some(sender) => (sender, true),
                None => (self.upstream.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // An upgraded connection belongs to the WebSocket from now on.
                    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                        *lock(&self.sender) = Some(sender);
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(Error::Http(e.into_error())),
                },
            }
        }
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        let sender = lock(&self.sender).take();
        // One still busy (the client left in the middle of an answer) is closed.
        if let Some(sender) = sender.filter(SendRequest::is_ready) {
            self.upstream.put_idle(self.thread, sender);
        }
    }
}
