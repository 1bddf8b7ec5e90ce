//! Start-up discovery, retried until it succeeds: the login issuer (until then
//! `/ready` answers 503) and, each on its own, the bearer-token issuers (until one is
//! discovered its tokens get 503). An extra issuer that cannot be reached, a partner's identity
//! provider being down or a typo in `extra-jwt-issuers`, must not keep browser logins
//! from working.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::oidc::Provider;
use crate::server::App;

/// First retry delay; doubled after each failure up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Calls `attempt` until it succeeds, backing off; each failure is logged as `what`.
async fn retry<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut delay = FIRST_DELAY;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?delay, "{what} failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_DELAY);
            }
        }
    }
}

/// Discovers the login issuer; the proxy is ready once it has.
pub async fn login_issuer(app: Arc<App>) {
    let provider = retry("issuer discovery", || async {
        Provider::discover(&app.config).await.map_err(|e| e.to_string())
    })
    .await;
    let _ = app.provider.set(Arc::new(provider));
    tracing::info!(issuer = %app.config.issuer_url, "issuer discovered");
}

/// Discovers each bearer-token issuer on its own: one that does not answer holds only
/// its own tokens (503), not those of the others.
pub async fn bearer_issuers(app: Arc<App>) {
    let Some(verifier) = app.bearer.as_ref() else {
        return;
    };
    let each = verifier.issuers().map(|issuer| {
        let issuer = issuer.to_string();
        async move {
            retry(&format!("discovery of bearer issuer {issuer}"), || {
                verifier.discover(&issuer)
            })
            .await;
            tracing::info!(%issuer, "bearer issuer discovered");
        }
    });
    futures::future::join_all(each).await;
    tracing::info!(
        issuers = app.config.bearer_issuers.len(),
        "bearer issuers discovered"
    );
}
