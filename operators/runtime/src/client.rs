//! The API client every controller shares, speaking HTTP/2 to the API server.
//!
//! kube's default client offers only HTTP/1.1, so each request in flight holds its
//! own TLS connection: a burst of reconciles opens hundreds of them, costing the API
//! server a handshake each and the operator their buffers. client-go multiplexes
//! everything over one HTTP/2 connection; this does the same, keeping kube's layers
//! (base URI, retries of 429/503/504 as the API server asks, authentication with token
//! refresh, extra headers).

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::retry::RetryPolicy;
use kube::client::{Body, ConfigExt};
use kube::{Client, Config};
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// How long to wait for a TCP connection to the API server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flow-control windows of the HTTP/2 connection. Every watch and request shares the
/// connection window, and the API server may send only as much as the windows allow
/// before the operator reads it; when a burst of watch events fills a small window, the
/// API server's watch dispatcher waits, judges the watcher unresponsive and closes it,
/// and the operator's caches fall behind. hyper's adaptive window starts at 64 KiB and
/// grows only from its own ping measurements, which an operator started on a quiet
/// cluster takes seconds to make: 1000 projects at once had 144 watches closed, 83 of
/// them on namespaces and quotas; with these windows 17-42, on RoleBindings and Projects
/// only. Go's HTTP/2 client (client-go) uses 4 MiB per stream and 1 GiB per connection;
/// 16 MiB (hyper's adaptive ceiling) bounds what the operator buffers unread, and four
/// full unread streams would stall the others.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// A client for `config` that negotiates HTTP/2 (and falls back to HTTP/1.1).
pub fn from_config(config: Config) -> Result<Client, kube::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // Fixed windows; see STREAM_WINDOW.
        .http2_initial_stream_window_size(STREAM_WINDOW)
        .http2_initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Some(Duration::from_secs(30)))
        .http2_keep_alive_while_idle(true)
        .build::<_, Body>(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        // As kube's own client: a throttled or restarting API server is waited for
        // (with its Retry-After), not turned into reconcile errors.
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(Client::new(service, config.default_namespace))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::api::core::v1::Namespace;
    use warp::{Filter, Reply};

    use super::*;

    /// A throttled request (429, as the API server answers when its priority levels
    /// are full) is sent again after the Retry-After, not handed to the reconcile as
    /// an error.
    #[tokio::test]
    async fn a_throttled_request_is_retried_as_the_api_server_asks() -> Result<(), Box<dyn std::error::Error>>
    {
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        let api = warp::path!("api" / "v1" / "namespaces" / String).map(move |name: String| {
            if count.fetch_add(1, Ordering::SeqCst) == 0 {
                let busy = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":429,"reason":"TooManyRequests"}"#;
                let reply = warp::reply::with_status(busy.to_string(), warp::http::StatusCode::TOO_MANY_REQUESTS);
                return warp::reply::with_header(reply, "Retry-After", "0").into_response();
            }
            let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            warp::reply::json(&ns).into_response()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(warp::serve(api).incoming(listener).run());

        let client = from_config(Config::new(format!("http://{address}").parse()?))?;
        let ns = kube::Api::<Namespace>::all(client).get("team-a").await?;
        assert_eq!(ns.metadata.name.as_deref(), Some("team-a"));
        assert_eq!(asked.load(Ordering::SeqCst), 2, "one throttled answer, one retry");
        Ok(())
    }
}
