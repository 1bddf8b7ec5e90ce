//! Start-up discovery, retried until it succeeds: the login issuer (until then
//! `/ready` answers 503) and, on its own, the bearer-token issuers (until then their
//! tokens get 503). An extra issuer that cannot be reached, a partner's identity
//! provider being down or a typo in `extra-jwt-issuers`, must not keep browser logins
//! from working.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::bearer::BearerVerifier;
use crate::oidc::{self, Provider};
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
    let _ = app.provider.set(provider);
    tracing::info!(issuer = %app.config.issuer_url, "issuer discovered");
}

/// Discovers the bearer-token issuers, if any are configured.
pub async fn bearer_issuers(app: Arc<App>) {
    if app.config.bearer_issuers.is_empty() {
        return;
    }
    let verifier = retry("bearer issuer discovery", || async {
        let http = oidc::http_client(&app.config.provider_cas).map_err(|e| e.to_string())?;
        BearerVerifier::discover(
            &app.config.bearer_issuers,
            http,
            app.config.bearer_clock_skew,
            app.config.groups_claim.clone(),
        )
        .await
    })
    .await;
    let _ = app.bearer.set(verifier);
    tracing::info!(
        issuers = app.config.bearer_issuers.len(),
        "bearer issuers discovered"
    );
}
