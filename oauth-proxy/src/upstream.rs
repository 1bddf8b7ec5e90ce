//! The connections to the upstream. HTTP/1.1 carries one request at a time, so a
//! client connection keeps the upstream connection its last request went over and
//! sends its next request on it: no pool to look up, lock and hand back per request
//! (hyper-util's pool did that, plus a task per answer with a body to return the
//! connection once the body was read: about 5 % of the proxy's CPU per request).
//! When the client connection ends, its upstream connection, if ready for another
//! request, goes to its serving thread's idle stack, where the next client
//! connection on that thread finds it (clients that open a connection per request
//! do not open one upstream each time). Past [`MAX_KEPT`] client connections a
//! thread works as a pool instead, so that open client connections do not each hold
//! an upstream connection.

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

/// Most unused upstream connections one serving thread keeps: past it the one set
/// aside longest ago is closed.
const MAX_IDLE: usize = 256;

/// Most client connections of one serving thread that keep an upstream connection of
/// their own between requests. Past it, a client's upstream connection goes to the idle
/// stack once its answer is read, as from a pool: many clients that each keep a
/// connection open (browsers keep six) do not each hold one to the upstream too.
const MAX_KEPT: usize = 256;

/// An upstream connection and when it was last used.
type Idle = (Instant, SendRequest<Body>);

/// A serving thread's upstream connections not in use.
#[derive(Default)]
struct Spare {
    /// Set aside by clients that left (or were over [`MAX_KEPT`]), newest on top.
    idle: Vec<Idle>,
    /// How many client connections keep one of their own.
    kept: usize,
}

/// How the proxy reaches its one upstream.
pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// The scheme and authority the connector connects to.
    address: Uri,
    /// One per serving thread (see [`crate::server::serving_thread`]): a connection's
    /// task runs on the thread that opened it, so a connection handed to another thread
    /// would wake the first for every exchange.
    spare: Vec<Mutex<Spare>>,
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
            spare: (0..threads.max(1)).map(|_| Mutex::default()).collect(),
        })
    }

    fn spare_of(&self, thread: usize) -> MutexGuard<'_, Spare> {
        lock(&self.spare[thread % self.spare.len()])
    }

    /// Closes the idle connections of `thread` unused for [`IDLE_FOR`] or closed by
    /// the upstream; the serving thread calls it now and then, so that they close
    /// without traffic too.
    pub fn close_stale(&self, thread: usize) {
        Self::drop_unusable(&mut self.spare_of(thread).idle, Instant::now());
    }

    fn drop_unusable(idle: &mut Vec<Idle>, now: Instant) {
        idle.retain(|(used, sender)| usable(*used, sender, now));
    }

    /// The idle connection of `thread` set aside last that is still usable.
    fn take_idle(&self, thread: usize, now: Instant) -> Option<SendRequest<Body>> {
        let mut spare = self.spare_of(thread);
        while let Some((used, sender)) = spare.idle.pop() {
            if usable(used, &sender, now) {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, thread: usize, used: Instant, sender: SendRequest<Body>) {
        let mut spare = self.spare_of(thread);
        // Only when full: this runs for every answer of a client past MAX_KEPT.
        if spare.idle.len() >= MAX_IDLE {
            Self::drop_unusable(&mut spare.idle, Instant::now());
            if spare.idle.len() >= MAX_IDLE {
                spare.idle.remove(0);
            }
        }
        spare.idle.push((used, sender));
    }

    /// Whether one more client connection of `thread` may keep its upstream
    /// connection; if so it counts until [`Upstream::release`].
    fn keep(&self, thread: usize) -> bool {
        let mut spare = self.spare_of(thread);
        let room = spare.kept < MAX_KEPT;
        spare.kept += usize::from(room);
        room
    }

    fn release(&self, thread: usize) {
        let mut spare = self.spare_of(thread);
        debug_assert!(
            spare.kept > 0,
            "a client connection released a count it did not hold"
        );
        spare.kept = spare.kept.saturating_sub(1);
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
    kept: Mutex<Kept>,
}

/// A client connection's own upstream connection.
#[derive(Default)]
struct Kept {
    /// The upstream connection the last request went over, and when.
    sender: Option<Idle>,
    /// Whether this client counts among its thread's [`MAX_KEPT`] (from its first
    /// answer until it goes).
    counted: bool,
}

/// Whether a connection whose last request started at `used` may carry one at `now`:
/// ready for it, and used within [`IDLE_FOR`] (one unused for longer may have been
/// dropped by a firewall or load balancer on the way without a word, and a request on
/// it would wait for the upstream timeout).
fn usable(used: Instant, sender: &SendRequest<Body>, now: Instant) -> bool {
    now.duration_since(used) < IDLE_FOR && sender.is_ready()
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
            kept: Mutex::default(),
        }
    }

    /// Sends `request` (its URI in origin form) upstream: on this client's upstream
    /// connection when it is ready for it, else on an idle one of this thread, else on
    /// a new one. A request that a kept connection could not even take (it had closed
    /// meanwhile) goes out once more on another: nothing of it was sent.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, Error> {
        loop {
            let now = Instant::now();
            let kept = lock(&self.kept).sender.take();
            // One not ready yet (an early answer to an upload still being sent) is closed.
            let kept = kept
                .filter(|(used, sender)| usable(*used, sender, now))
                .map(|(_, sender)| sender);
            let (mut sender, reused) = match kept.or_else(|| self.upstream.take_idle(self.thread, now)) {
                Some(sender) => (sender, true),
                // Boxed: connecting (TLS state, handshake) is rare but large, and inline it
                // would enlarge every request's future, which hyper moves into place per
                // request and each client connection keeps allocated (9.6 KB against 4.8).
                None => (Box::pin(self.upstream.connect()).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // An upgraded connection belongs to the WebSocket from now on.
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        return Ok(response);
                    }
                    let mut kept = lock(&self.kept);
                    if !kept.counted {
                        kept.counted = self.upstream.keep(self.thread);
                    }
                    if kept.counted {
                        kept.sender = Some((now, sender));
                    } else {
                        // Back to the idle stack once the answer has been read.
                        let (upstream, thread) = (self.upstream.clone(), self.thread);
                        tokio::spawn(async move {
                            if sender.ready().await.is_ok() {
                                upstream.put_idle(thread, Instant::now(), sender);
                            }
                        });
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
        let kept = std::mem::take(&mut *lock(&self.kept));
        if kept.counted {
            self.upstream.release(self.thread);
        }
        // One still busy (the client left in the middle of an answer) is closed.
        if let Some((used, sender)) = kept.sender
            && sender.is_ready()
        {
            self.upstream.put_idle(self.thread, used, sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{File, minimal_flags};
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    fn upstream() -> Result<Upstream, String> {
        let config = Config::merge(&minimal_flags(), File::default())?;
        Upstream::new(&config, Uri::from_static("http://127.0.0.1:8080"), 1)
    }

    /// A ready connection to an in-memory upstream that names itself `name` in every
    /// answer, and the handle that ends the upstream's side.
    async fn connection(
        name: &'static str,
    ) -> Result<(SendRequest<Body>, tokio::task::JoinHandle<()>), BoxError> {
        let (client, server) = tokio::io::duplex(4096);
        let serving = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_| async move {
                Response::builder()
                    .header("x-upstream", name)
                    .body(Empty::<Bytes>::new())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await?;
        tokio::spawn(connection);
        sender.ready().await?;
        Ok((sender, serving))
    }

    /// Which upstream `sender` reaches.
    async fn reaches(mut sender: SendRequest<Body>) -> Result<String, BoxError> {
        let request = Request::get("/").body(Empty::new().map_err(|e| match e {}).boxed_unsync())?;
        let response = sender.send_request(request).await?;
        Ok(response
            .headers()
            .get("x-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string())
    }

    fn ago(now: Instant, seconds: u64) -> Instant {
        now.checked_sub(Duration::from_secs(seconds)).unwrap_or(now)
    }

    #[tokio::test]
    async fn the_last_idle_connection_set_aside_is_taken_first_and_none_unused_for_ninety_seconds()
    -> Result<(), BoxError> {
        let upstream = upstream()?;
        let now = Instant::now();
        let (stale, _a) = connection("stale").await?;
        let (earlier, _b) = connection("earlier").await?;
        let (last, _c) = connection("last").await?;
        upstream.put_idle(0, ago(now, 91), stale);
        upstream.put_idle(0, ago(now, 20), earlier);
        upstream.put_idle(0, ago(now, 30), last);
        // The one set aside last first: the others may go stale and close meanwhile.
        for expected in ["last", "earlier"] {
            let taken = upstream.take_idle(0, now).ok_or("no idle connection")?;
            assert_eq!(reaches(taken).await?, expected);
        }
        // Past IDLE_FOR a firewall on the way may have dropped it without a word.
        assert!(
            upstream.take_idle(0, now).is_none(),
            "a connection unused for 91 s was taken"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_taken() -> Result<(), BoxError> {
        let upstream = upstream()?;
        let (sender, serving) = connection("closed").await?;
        let (open, _b) = connection("open").await?;
        upstream.put_idle(0, Instant::now(), open);
        upstream.put_idle(0, Instant::now(), sender);
        serving.abort();
        // The client side sees the end of the stream within a few turns of the runtime.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let taken = upstream
            .take_idle(0, Instant::now())
            .ok_or("no idle connection")?;
        assert_eq!(reaches(taken).await?, "open");
        Ok(())
    }

    #[tokio::test]
    async fn a_full_idle_stack_closes_the_connection_set_aside_longest_ago() -> Result<(), BoxError> {
        let upstream = upstream()?;
        let now = Instant::now();
        let mut serving = Vec::new();
        for i in 0..=MAX_IDLE {
            let (sender, task) = connection(if i == 0 { "first" } else { "later" }).await?;
            serving.push(task);
            upstream.put_idle(0, now, sender);
        }
        assert_eq!(upstream.spare_of(0).idle.len(), MAX_IDLE);
        while let Some(sender) = upstream.take_idle(0, now) {
            assert_eq!(reaches(sender).await?, "later");
        }
        Ok(())
    }

    #[test]
    fn past_the_cap_client_connections_keep_none_until_one_is_released() -> Result<(), String> {
        let upstream = upstream()?;
        assert!((0..MAX_KEPT).all(|_| upstream.keep(0)));
        assert!(
            !upstream.keep(0),
            "one more than MAX_KEPT kept its own connection"
        );
        upstream.release(0);
        assert!(
            upstream.keep(0),
            "a released count was not given to the next client"
        );
        Ok(())
    }
}
