//! The OpenID Connect relying party: discovery, the authorization-code flow with
//! PKCE (S256) and a nonce on every login, ID token verification, refresh, and
//! RP-initiated logout. The HTTP client never follows redirects (a redirect from
//! the token endpoint is an attack or a misconfiguration, not something to follow).
//! Keys come from the issuer's JWKS; a token signed with a key the cache does not
//! know triggers one refetch, at most every [`JWKS_REFETCH_INTERVAL`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreIdToken, CoreJsonWebKeySet, CoreProviderMetadata,
    CoreTokenResponse,
};
use openidconnect::{
    AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, HttpClientError, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, Scope, SignatureVerificationError, TokenResponse, reqwest,
};
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};
use url::Url;

use crate::config::Config;

/// Least time between two JWKS refetches caused by unknown key ids.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("discovery at {issuer} failed: {message}")]
    Discovery { issuer: String, message: String },
    #[error("the issuer has no token endpoint")]
    NoTokenEndpoint,
    #[error("the token request failed: {0}")]
    Token(String),
    /// The issuer answered the token request with an OAuth error (`invalid_grant`...):
    /// safe and useful to show, unlike a transport failure's details.
    #[error("the issuer refused the token request: {0}")]
    Refused(String),
    /// A refresh the issuer refused with `invalid_grant` (the grant revoked, expired or
    /// ended with the user's login there) or `invalid_client` (the client disabled):
    /// the issuer no longer vouches for the session, so it ends now.
    #[error("the issuer refused the refresh token: {0}")]
    GrantEnded(String),
    #[error("the token response has no ID token")]
    NoIdToken,
    #[error("the ID token is not valid: {0}")]
    IdToken(String),
    #[error("building the HTTP client: {0}")]
    Http(String),
}

/// What a login or refresh established about the user.
#[derive(Clone, PartialEq)]
pub struct Identity {
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub preferred_username: Option<String>,
    pub groups: Vec<String>,
    pub access_token: String,
    pub id_token: String,
    pub refresh_token: Option<String>,
    /// Unix seconds when the access token expires (from `expires_in`, else the ID token's `exp`).
    pub expires_at: u64,
}

/// The browser-side secrets of one login attempt, kept in the sealed CSRF cookie.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoginAttempt {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    /// Where to go after the login (validated again when used).
    pub redirect: String,
}

// Tokens, the nonce and the PKCE verifier are credentials: `Debug` (a log line, a
// test failure) shows who and where, never them.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("subject", &self.subject)
            .field("email", &self.email)
            .field("email_verified", &self.email_verified)
            .field("preferred_username", &self.preferred_username)
            .field("groups", &self.groups)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LoginAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginAttempt")
            .field("redirect", &self.redirect)
            .finish_non_exhaustive()
    }
}

pub struct Provider {
    client: RwLock<Arc<Client>>,
    http: IdpHttp,
    metadata: CoreProviderMetadata,
    client_id: String,
    client_secret: String,
    end_session: Option<Url>,
    revocation: Option<Url>,
    scopes: Vec<String>,
    groups_claim: String,
    last_refetch: Mutex<Option<Instant>>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The IdP HTTP client: no redirects, bounded time, the extra CAs of `provider-ca-file`.
pub fn http_client(extra_cas: &[CertificateDer<'static>]) -> Result<reqwest::Client, Error> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    for cert in extra_cas {
        let cert = reqwest::Certificate::from_der(cert).map_err(|e| Error::Http(e.to_string()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| Error::Http(e.to_string()))
}

/// The login issuer's HTTP client as the OIDC library calls it (discovery, the JWKS,
/// the token endpoint): each answer is read as it arrives and refused past
/// [`crate::bearer::MAX_DOCUMENT_BYTES`], as [`crate::bearer::fetch_json`] reads the
/// bearer issuers'. The library's own reqwest binding reads whatever comes within the
/// timeout: an issuer (or a man in the middle on an `http://` one) streaming an
/// endless answer would fill the memory.
pub struct IdpHttp(pub reqwest::Client);

type IdpAnswer<'c> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<openidconnect::HttpResponse, HttpClientError<reqwest::Error>>>
            + Send
            + Sync
            + 'c,
    >,
>;

impl<'c> openidconnect::AsyncHttpClient<'c> for IdpHttp {
    type Error = HttpClientError<reqwest::Error>;
    type Future = IdpAnswer<'c>;

    fn call(&'c self, request: openidconnect::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let limit = crate::bearer::MAX_DOCUMENT_BYTES;
            let too_large =
                || HttpClientError::Other(format!("the answer is too large (over {limit} bytes)"));
            let mut response = self
                .0
                .execute(request.try_into().map_err(Box::new)?)
                .await
                .map_err(Box::new)?;
            if response.content_length().is_some_and(|n| n > limit as u64) {
                return Err(too_large());
            }
            let mut builder = http::Response::builder()
                .status(response.status())
                .version(response.version());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(Box::new)? {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            builder.body(body).map_err(HttpClientError::Http)
        })
    }
}

impl Provider {
    /// Discovers the issuer and builds the client.
    pub async fn discover(config: &Config) -> Result<Self, Error> {
        let http = IdpHttp(http_client(&config.provider_cas)?);
        let issuer = IssuerUrl::new(config.issuer_url.clone()).map_err(|e| Error::Discovery {
            issuer: config.issuer_url.to_string(),
            message: e.to_string(),
        })?;
        let metadata = CoreProviderMetadata::discover_async(issuer.clone(), &http)
            .await
            .map_err(|e| Error::Discovery {
                issuer: issuer.to_string(),
                message: error_chain(&e),
            })?;
        let redirect =
            RedirectUrl::new(config.redirect_url.to_string()).map_err(|e| Error::Http(e.to_string()))?;
        let client = CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(config.client_id.clone()),
            Some(ClientSecret::new(config.client_secret.expose().to_string())),
        )
        .set_redirect_uri(redirect);
        let Endpoints {
            end_session,
            revocation,
        } = discover_endpoints(&http.0, &issuer).await?;
        Ok(Self {
            client: RwLock::new(Arc::new(client)),
            http,
            metadata,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.expose().to_string(),
            end_session,
            revocation,
            scopes: config.scopes.clone(),
            groups_claim: config.groups_claim.clone(),
            last_refetch: Mutex::new(None),
        })
    }

    /// The authorization URL for a new login, and the secrets to keep for the callback.
    pub async fn start(&self, redirect: String) -> (Url, LoginAttempt) {
        let client = self.client.read().await.clone();
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for scope in self.scopes.iter().filter(|s| s.as_str() != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        let attempt = LoginAttempt {
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
            redirect,
        };
        (url, attempt)
    }

    /// Exchanges the code (with the PKCE verifier) and verifies the ID token against
    /// the attempt's nonce.
    pub async fn finish(&self, code: String, attempt: &LoginAttempt) -> Result<Identity, Error> {
        let client = self.client.read().await.clone();
        let response: CoreTokenResponse = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|_| Error::NoTokenEndpoint)?
            .set_pkce_verifier(PkceCodeVerifier::new(attempt.pkce_verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| match &e {
                openidconnect::RequestTokenError::ServerResponse(answer) => {
                    Error::Refused(answer.to_string())
                }
                _ => Error::Token(error_chain(&e)),
            })?;
        let nonce = Nonce::new(attempt.nonce.clone());
        self.identity(&response, Some(&nonce), None).await
    }

    /// Uses the refresh token. The new ID token (if the issuer sends one) is verified
    /// without a nonce, as OIDC Core 12.2 says; without a new ID token the identity
    /// stays `previous`, with one its claims replace it (a claim it lacks is gone).
    pub async fn refresh(&self, refresh_token: &str, previous: &Identity) -> Result<Identity, Error> {
        let client = self.client.read().await.clone();
        let response: CoreTokenResponse = client
            .exchange_refresh_token(&RefreshToken::new(refresh_token.to_string()))
            .map_err(|_| Error::NoTokenEndpoint)?
            .request_async(&self.http)
            .await
            .map_err(|e| match &e {
                openidconnect::RequestTokenError::ServerResponse(answer) if ends_grant(answer.error()) => {
                    Error::GrantEnded(answer.to_string())
                }
                openidconnect::RequestTokenError::ServerResponse(answer) => {
                    Error::Refused(answer.to_string())
                }
                _ => Error::Token(error_chain(&e)),
            })?;
        self.identity(&response, None, Some(previous)).await
    }

    async fn identity(
        &self,
        response: &CoreTokenResponse,
        nonce: Option<&Nonce>,
        previous: Option<&Identity>,
    ) -> Result<Identity, Error> {
        let access_token = response.access_token().secret().clone();
        let refresh_token = response
            .refresh_token()
            .map(|t| t.secret().clone())
            .or_else(|| previous.and_then(|p| p.refresh_token.clone()));
        let Some(id_token) = response.id_token() else {
            // A refresh may omit the ID token; the identity stays what it was.
            let previous = previous.ok_or(Error::NoIdToken)?;
            return Ok(Identity {
                access_token,
                refresh_token,
                expires_at: response
                    .expires_in()
                    .map_or(previous.expires_at, |d| now() + d.as_secs()),
                ..previous.clone()
            });
        };
        let payload = self.verify(id_token, nonce).await?;
        let claim_str = |k: &str| payload.get(k).and_then(Value::as_str).map(str::to_string);
        let subject = claim_str("sub").ok_or_else(|| Error::IdToken("no sub claim".into()))?;
        if let Some(previous) = previous
            && previous.subject != subject
        {
            return Err(Error::IdToken(
                "the refreshed ID token names another subject".into(),
            ));
        }
        let groups = match payload.get(&self.groups_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        let exp = payload.get("exp").and_then(Value::as_u64).unwrap_or_else(now);
        Ok(Identity {
            subject,
            email: claim_str("email"),
            // Only a JSON `true` counts: "true" as a string is not a verified email.
            email_verified: payload.get("email_verified") == Some(&Value::Bool(true)),
            preferred_username: claim_str("preferred_username"),
            groups,
            access_token,
            id_token: id_token.to_string(),
            refresh_token,
            expires_at: response.expires_in().map_or(exp, |d| now() + d.as_secs()),
        })
    }

    /// Verifies signature, issuer, audience, expiry, nonce and `azp`; refetches the
    /// JWKS once when the key is unknown. Returns the payload's claims.
    async fn verify(
        &self,
        token: &CoreIdToken,
        nonce: Option<&Nonce>,
    ) -> Result<serde_json::Map<String, Value>, Error> {
        let check = |client: &Client| -> Result<(), ClaimsVerificationError> {
            let verifier = client.id_token_verifier();
            match nonce {
                Some(n) => token.claims(&verifier, n).map(|_| ()),
                None => token.claims(&verifier, |_: Option<&Nonce>| Ok(())).map(|_| ()),
            }
        };
        let client = self.client.read().await.clone();
        let result = match check(&client) {
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) => {
                if self.refetch_jwks().await {
                    let client = self.client.read().await.clone();
                    check(&client)
                } else {
                    Err(ClaimsVerificationError::SignatureVerification(
                        SignatureVerificationError::NoMatchingKey,
                    ))
                }
            }
            other => other,
        };
        result.map_err(|e| Error::IdToken(e.to_string()))?;
        // The signature is verified; read the claims the library does not model.
        let text = token.to_string();
        let payload = text
            .split('.')
            .nth(1)
            .and_then(|p| base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, p).ok())
            .and_then(|bytes| serde_json::from_slice::<serde_json::Map<String, Value>>(&bytes).ok())
            .ok_or_else(|| Error::IdToken("payload is not JSON".into()))?;
        // OIDC Core 3.1.3.7 (5): an azp, when present, must be this client.
        if let Some(azp) = payload.get("azp")
            && azp.as_str() != Some(self.client_id.as_str())
        {
            return Err(Error::IdToken(format!("azp {azp} is not this client")));
        }
        Ok(payload)
    }

    /// Refetches the JWKS unless that happened within [`JWKS_REFETCH_INTERVAL`].
    async fn refetch_jwks(&self) -> bool {
        let mut last = self.last_refetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < JWKS_REFETCH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        let jwks = match CoreJsonWebKeySet::fetch_async(self.metadata.jwks_uri(), &self.http).await {
            Ok(jwks) => jwks,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "refetching the issuer's JWKS failed");
                return false;
            }
        };
        let metadata = self.metadata.clone().set_jwks(jwks);
        let current = self.client.read().await.clone();
        let mut client = CoreClient::from_provider_metadata(
            metadata,
            current.client_id().clone(),
            Some(ClientSecret::new(self.client_secret.clone())),
        );
        if let Some(redirect) = current.redirect_uri() {
            client = client.set_redirect_uri(redirect.clone());
        }
        *self.client.write().await = Arc::new(client);
        true
    }

    /// The issuer's end-session endpoint (RP-initiated logout), when it advertises one.
    pub fn end_session_endpoint(&self) -> Option<&Url> {
        self.end_session.as_ref()
    }

    /// The issuer's revocation endpoint (RFC 7009), when it advertises one.
    pub fn revocation_endpoint(&self) -> Option<&Url> {
        self.revocation.as_ref()
    }

    /// Revokes `refresh_token` at the issuer's revocation endpoint (RFC 7009), with the
    /// client authentication of the token endpoint (HTTP Basic, each part
    /// form-encoded). `Ok(false)` when the issuer advertises no such endpoint. By hand:
    /// the library refuses a revocation endpoint that is not HTTPS, while the token
    /// endpoint of the same (loopback, development) issuer may be plain HTTP.
    pub async fn revoke_refresh_token(&self, refresh_token: &str) -> Result<bool, Error> {
        let Some(url) = &self.revocation else {
            return Ok(false);
        };
        let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let response = self
            .http
            .0
            .post(url.clone())
            .basic_auth(encode(&self.client_id), Some(encode(&self.client_secret)))
            .form(&[("token", refresh_token), ("token_type_hint", "refresh_token")])
            .send()
            .await
            .map_err(|e| Error::Http(error_chain(&e)))?;
        // RFC 7009: 200 also for a token that was already invalid; the body says nothing more.
        match response.status() {
            status if status.is_success() => Ok(true),
            status => Err(Error::Http(format!("the revocation endpoint answered {status}"))),
        }
    }
}

/// Endpoints of the discovery document the library's core types do not model.
struct Endpoints {
    end_session: Option<Url>,
    revocation: Option<Url>,
}

/// `end_session_endpoint` and `revocation_endpoint` from the discovery document. A
/// failed read fails the discovery, to be tried again: a proxy that went on without
/// them would sign users out of the proxy but not of the issuer.
async fn discover_endpoints(http: &reqwest::Client, issuer: &IssuerUrl) -> Result<Endpoints, Error> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.as_str().trim_end_matches('/')
    );
    let doc = crate::bearer::fetch_json(http, &url)
        .await
        .map_err(|message| Error::Discovery {
            issuer: issuer.to_string(),
            message,
        })?;
    // An `https` issuer's endpoints must be `https` too: the revocation request
    // carries the client secret and a refresh token, the end-session URL an ID token.
    let secure = issuer.url().scheme() == "https";
    let endpoint = |key: &str| {
        let url = doc
            .get(key)
            .and_then(Value::as_str)
            .and_then(|u| Url::parse(u).ok())?;
        if secure && url.scheme() != "https" {
            tracing::warn!(%url, "ignoring the issuer's {key}: not https, unlike the issuer");
            return None;
        }
        Some(url)
    };
    Ok(Endpoints {
        end_session: endpoint("end_session_endpoint"),
        revocation: endpoint("revocation_endpoint"),
    })
}

/// Whether a token endpoint's refusal of a refresh ends the session: the OAuth errors
/// (RFC 6749 5.2) that say the grant or the client is no longer good, as oauth2-proxy
/// decides (its fix for issue 1945). Other refusals (`invalid_request`,
/// `invalid_scope`...) and failures to reach the issuer keep the session until its
/// tokens expire: an outage of the issuer signs nobody out.
fn ends_grant(code: &openidconnect::core::CoreErrorResponseType) -> bool {
    use openidconnect::core::CoreErrorResponseType as Code;
    matches!(code, Code::InvalidGrant | Code::InvalidClient)
}

/// An error with its sources, for logs and messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use openidconnect::core::CoreErrorResponseType as Code;

    #[test]
    fn only_a_dead_grant_or_client_ends_the_session() {
        assert!(ends_grant(&Code::InvalidGrant) && ends_grant(&Code::InvalidClient));
        for kept in [
            Code::InvalidRequest,
            Code::InvalidScope,
            Code::UnauthorizedClient,
            Code::UnsupportedGrantType,
            Code::Extension("temporarily_unavailable".into()),
        ] {
            assert!(!ends_grant(&kept), "{kept:?}");
        }
    }
}
