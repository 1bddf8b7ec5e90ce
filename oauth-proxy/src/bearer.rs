//! Bearer mode for API clients: `Authorization: Bearer <JWT>` is accepted without a
//! session when an allowed issuer signed it for an allowed audience. The checks, in
//! order: the header names an asymmetric algorithm from the allow-list (never
//! `none`, never HMAC: a public key must not become a shared secret); `iss` is a
//! configured issuer exactly; the key is that issuer's, by `kid` (unknown ids
//! refetch its JWKS at most every [`JWKS_REFETCH_INTERVAL`]) and of the algorithm's
//! family; the signature; `exp` (required), `nbf` and `iat` are JSON numbers and in
//! range with a bounded clock skew; `aud` holds the issuer's configured audience.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};

use crate::oidc::Identity;

/// Least time between two JWKS refetches of one issuer.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Largest clock skew a configuration may allow.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

/// Asymmetric algorithms only.
pub const ALLOWED_ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

pub struct Issuer {
    pub issuer: String,
    /// Every audience configured for this issuer (`issuer=aud` may repeat).
    pub audiences: Vec<String>,
    /// Set once discovery found it (with the first keys): until then the issuer's
    /// tokens wait, and other issuers' tokens do not.
    jwks_uri: tokio::sync::OnceCell<String>,
    keys: RwLock<JwkSet>,
    last_fetch: Mutex<Option<Instant>>,
}

/// Why a bearer token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The token is not valid (401): the text says why.
    Invalid(String),
    /// Its issuer has not been discovered yet (503: try again).
    Pending(String),
}

impl From<String> for Refusal {
    fn from(why: String) -> Self {
        Refusal::Invalid(why)
    }
}

impl From<&str> for Refusal {
    fn from(why: &str) -> Self {
        Refusal::Invalid(why.to_string())
    }
}

pub struct BearerVerifier {
    issuers: Vec<Arc<Issuer>>,
    http: openidconnect::reqwest::Client,
    skew: Duration,
    groups_claim: String,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Largest identity-provider document read (discovery, JWKS): real ones take a few
/// KiB, and a bigger answer must not fill the proxy's memory.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// GETs a JSON document from the identity provider: a success status and at most
/// [`MAX_DOCUMENT_BYTES`], read as it arrives.
pub(crate) async fn fetch_json(http: &openidconnect::reqwest::Client, url: &str) -> Result<Value, String> {
    let mut response = http.get(url).send().await.map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let too_large = || format!("{url}: the answer is too large (over {MAX_DOCUMENT_BYTES} bytes)");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
}

/// A NumericDate (RFC 7519, section 2) in seconds, if jsonwebtoken can read it too: it
/// skips the check of a value it cannot (`1e300`, `-5`), so such a value must refuse.
fn numeric_date(value: &Value) -> Option<u64> {
    let n = value.as_f64()?;
    (n.is_finite() && n >= 0.0 && n < u64::MAX as f64).then(|| n.round() as u64)
}

/// The claims of a JWT without verifying it (to pick the issuer); `None` if the
/// token is not three base64url parts with a JSON payload.
fn unverified_payload(token: &str) -> Option<serde_json::Map<String, Value>> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The keys of a JWK set that this verifier can use. Issuers publish keys of types
/// and algorithms it does not know (X25519 for encryption, ES512, post-quantum
/// keys); parsing the set as a whole would refuse all keys for one of those.
fn key_set(document: Value) -> Result<JwkSet, String> {
    let Some(Value::Array(entries)) = document.get("keys") else {
        return Err("not a JWK set: no \"keys\" array".into());
    };
    let keys: Vec<Jwk> = entries
        .iter()
        .filter_map(|entry| match serde_json::from_value::<Jwk>(entry.clone()) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::debug!(kid = ?entry.get("kid"), error = %e, "skipping a JWK of a type or algorithm not supported");
                None
            }
        })
        .collect();
    if keys.is_empty() && !entries.is_empty() {
        return Err(format!(
            "none of its {} keys is of a supported type",
            entries.len()
        ));
    }
    Ok(JwkSet { keys })
}

/// Whether a JWK may verify signatures made with `alg`: not an encryption key
/// (Keycloak publishes one beside its signing key), `key_ops` allowing verify when
/// given, and the key's own `alg` equal to the token's when given (RFC 8725, 3.1: one
/// key, one algorithm, so an RS256 key does not verify PS256).
fn signs_with(key: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::jwk::{KeyOperations, PublicKeyUse};
    let common = &key.common;
    !matches!(common.public_key_use, Some(PublicKeyUse::Encryption))
        && common
            .key_operations
            .as_ref()
            .is_none_or(|ops| ops.iter().any(|op| matches!(op, KeyOperations::Verify)))
        && common
            .key_algorithm
            .is_none_or(|own| own.to_string() == format!("{alg:?}"))
}

impl BearerVerifier {
    /// A verifier for each `(issuer, audience)` pair, none discovered yet (see
    /// [`BearerVerifier::discover`]).
    pub fn new(
        pairs: &[(String, String)],
        http: openidconnect::reqwest::Client,
        skew: Duration,
        groups_claim: String,
    ) -> Result<Self, String> {
        if skew > MAX_SKEW {
            return Err(format!(
                "bearer clock skew {skew:?} is over the limit of {MAX_SKEW:?}"
            ));
        }
        // One verifier per issuer, with all of its audiences: a token is matched by
        // `iss`, so a second pair for the same issuer must add an audience, not hide.
        let mut issuers: Vec<Issuer> = Vec::new();
        for (issuer, audience) in pairs {
            match issuers.iter_mut().find(|i| i.issuer == *issuer) {
                Some(known) if !known.audiences.contains(audience) => known.audiences.push(audience.clone()),
                Some(_) => {}
                None => issuers.push(Issuer {
                    issuer: issuer.clone(),
                    audiences: vec![audience.clone()],
                    jwks_uri: tokio::sync::OnceCell::new(),
                    keys: RwLock::new(JwkSet { keys: Vec::new() }),
                    last_fetch: Mutex::new(None),
                }),
            }
        }
        Ok(Self {
            issuers: issuers.into_iter().map(Arc::new).collect(),
            http,
            skew,
            groups_claim,
        })
    }

    /// The configured issuers, each to [`BearerVerifier::discover`] on its own.
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.iter().map(|i| i.issuer.as_str())
    }

    /// Discovers `issuer`'s JWKS (once; later calls succeed at once).
    pub async fn discover(&self, issuer: &str) -> Result<(), String> {
        let Some(found) = self.issuers.iter().find(|i| i.issuer == issuer) else {
            return Err(format!("{issuer} is not a configured bearer issuer"));
        };
        if found.jwks_uri.initialized() {
            return Ok(());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc = fetch_json(&self.http, &url).await?;
        if doc.get("issuer").and_then(Value::as_str) != Some(issuer) {
            return Err(format!("{url} names another issuer than {issuer}"));
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{url} has no jwks_uri"))?
            .to_string();
        let keys =
            key_set(fetch_json(&self.http, &jwks_uri).await?).map_err(|e| format!("{jwks_uri}: {e}"))?;
        *found.keys.write().await = keys;
        *found.last_fetch.lock().await = Some(Instant::now());
        let _ = found.jwks_uri.set(jwks_uri);
        Ok(())
    }

    async fn refetch(&self, issuer: &Issuer) -> bool {
        let Some(jwks_uri) = issuer.jwks_uri.get() else {
            return false;
        };
        let mut last = issuer.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < JWKS_REFETCH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        match fetch_json(&self.http, jwks_uri).await.and_then(key_set) {
            Ok(keys) => {
                *issuer.keys.write().await = keys;
                true
            }
            Err(e) => {
                tracing::warn!(issuer = %issuer.issuer, error = %e, "refetching the JWKS failed");
                false
            }
        }
    }

    /// Verifies `token`; the error says why it is refused.
    pub async fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not allowed", header.alg).into());
        }
        let claims = unverified_payload(token).ok_or("not a JWT: the payload is not JSON")?;
        let iss = claims.get("iss").and_then(Value::as_str).ok_or("no iss claim")?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| format!("issuer {iss} is not allowed"))?;
        if !issuer.jwks_uri.initialized() {
            return Err(Refusal::Pending(format!(
                "the issuer {iss} has not been discovered yet"
            )));
        }
        // Readable numbers only: a string `exp` would be read as absent by lenient
        // parsers, and an `nbf` jsonwebtoken cannot read is not checked at all.
        for claim in ["exp", "nbf", "iat"] {
            if let Some(v) = claims.get(claim)
                && numeric_date(v).is_none()
            {
                return Err(format!("{claim} is not a number of seconds since 1970").into());
            }
        }
        if claims.get("exp").is_none() {
            return Err("no exp claim".into());
        }
        let kid = header.kid.as_deref();
        let mut key = self.key_for(issuer, kid, header.alg).await;
        if key.is_none() && self.refetch(issuer).await {
            key = self.key_for(issuer, kid, header.alg).await;
        }
        let key = key.ok_or_else(|| format!("no key of {iss} matches kid {kid:?} and {:?}", header.alg))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.skew.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&issuer.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let verified = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &validation)
            .map_err(|e| format!("refused: {e}"))?
            .claims;
        if let Some(iat) = verified.get("iat").and_then(numeric_date)
            && iat > now() + self.skew.as_secs()
        {
            return Err("issued in the future".into());
        }
        let s = |k: &str| verified.get(k).and_then(Value::as_str).map(str::to_string);
        let groups = match verified.get(&self.groups_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        Ok(Identity {
            subject: s("sub").ok_or("no sub claim")?,
            email: s("email"),
            email_verified: verified.get("email_verified") == Some(&Value::Bool(true)),
            preferred_username: s("preferred_username"),
            groups,
            access_token: token.to_string(),
            id_token: String::new(),
            refresh_token: None,
            expires_at: verified.get("exp").and_then(numeric_date).unwrap_or(0),
        })
    }

    /// The issuer's signing key with `kid` (or its only one without), if it fits `alg`.
    async fn key_for(&self, issuer: &Issuer, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let keys = issuer.keys.read().await;
        let candidates: Vec<_> = keys
            .keys
            .iter()
            .filter(|k| signs_with(k, alg))
            .filter(|k| match kid {
                Some(kid) => k.common.key_id.as_deref() == Some(kid),
                None => true,
            })
            .collect();
        let jwk = match (kid, candidates.as_slice()) {
            (Some(_), [one, ..]) | (None, [one]) => *one,
            _ => return None,
        };
        let family_fits = matches!(
            (&jwk.algorithm, alg),
            (
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_),
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_),
                Algorithm::ES256 | Algorithm::ES384
            )
        );
        if !family_fits {
            return None;
        }
        DecodingKey::from_jwk(jwk).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_token_that_is_not_three_parts_has_no_payload() {
        assert!(unverified_payload("a.b").is_none());
        assert!(unverified_payload("a.b.c.d").is_none());
        assert!(
            unverified_payload("e30.e30.").is_some(),
            "{{}} . {{}} . empty signature"
        );
    }

    #[test]
    fn keys_of_unsupported_types_are_skipped_not_fatal() {
        let rsa = json!({"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256", "n": "sXch", "e": "AQAB"});
        let set = json!({"keys": [
            {"kty": "OKP", "crv": "X25519", "kid": "enc", "use": "enc", "x": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"},
            {"kty": "EC", "crv": "P-521", "kid": "e5", "alg": "ES512", "x": "AA", "y": "AA"},
            {"kty": "AKP", "kid": "pq", "alg": "ML-DSA-44", "pub": "AA"},
            rsa,
        ]});
        // jsonwebtoken refuses the whole set for one key it does not know.
        assert!(serde_json::from_value::<JwkSet>(set.clone()).is_err());
        let keys = key_set(set).map(|s| s.keys).unwrap_or_default();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].common.key_id.as_deref(), Some("k1"));
        assert!(key_set(json!({"keys": [{"kty": "AKP"}]})).is_err());
        assert!(key_set(json!({"nokeys": []})).is_err());
    }

    /// A verifier of `https://idp.example.com` (discovered, with no keys) and of
    /// `https://partner.example.com` (not discovered).
    fn verifier() -> Result<BearerVerifier, String> {
        let http = crate::oidc::http_client(&[]).map_err(|e| e.to_string())?;
        let pairs = [
            ("https://idp.example.com".to_string(), "api".to_string()),
            ("https://partner.example.com".to_string(), "api".to_string()),
        ];
        let v = BearerVerifier::new(&pairs, http, Duration::from_secs(30), "groups".into())?;
        let _ = v.issuers[0].jwks_uri.set("https://idp.example.com/jwks".into());
        *v.issuers[0].last_fetch.try_lock().map_err(|e| e.to_string())? = Some(Instant::now());
        Ok(v)
    }

    fn refusal(answer: Result<Identity, Refusal>) -> String {
        match answer {
            Err(Refusal::Invalid(why)) => why,
            other => format!("not refused as invalid: {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn an_issuer_not_discovered_yet_holds_only_its_own_tokens() -> Result<(), String> {
        let v = verifier()?;
        let claims = |iss: &str| json!({"iss": iss, "aud": "api", "sub": "robot", "exp": 4_000_000_000u64});
        // The partner's issuer is down: its tokens wait (503), with the reason.
        let pending = v.verify(&token(&claims("https://partner.example.com"))).await;
        assert!(
            matches!(&pending, Err(Refusal::Pending(why)) if why.contains("partner.example.com")),
            "{pending:?}"
        );
        // The discovered issuer's tokens are judged (here: no key), and a token of an
        // issuer nobody configured is invalid (401), not pending.
        let judged = refusal(v.verify(&token(&claims("https://idp.example.com"))).await);
        assert!(judged.starts_with("no key of"), "{judged}");
        let foreign = refusal(v.verify(&token(&claims("https://evil.example.com"))).await);
        assert!(foreign.contains("is not allowed"), "{foreign}");
        Ok(())
    }

    /// An unsigned token: these checks come before the key lookup and the signature.
    fn token(claims: &Value) -> String {
        let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": "RS256", "kid": "k1"})),
            b64(claims)
        )
    }

    #[tokio::test]
    async fn times_jsonwebtoken_could_not_read_are_refused_not_skipped() -> Result<(), String> {
        let v = verifier()?;
        let base =
            json!({"iss": "https://idp.example.com", "aud": "api", "sub": "alice", "exp": 4_000_000_000u64});
        for (claim, value) in [
            ("nbf", json!(1e300)),
            ("iat", json!(1e300)),
            ("iat", json!(-5)),
            ("exp", json!(-1)),
            ("exp", json!("4000000000")),
        ] {
            let mut claims = base.clone();
            claims[claim] = value.clone();
            let err = refusal(v.verify(&token(&claims)).await);
            assert!(
                err.starts_with(&format!("{claim} is not a number")),
                "{claim}={value}: {err}"
            );
        }
        // Readable ones pass these checks and fail later, at the (missing) key.
        let mut claims = base.clone();
        claims["nbf"] = json!(1.7e9);
        let err = refusal(v.verify(&token(&claims)).await);
        assert!(err.starts_with("no key of"), "{err}");
        assert_eq!(numeric_date(&json!(1.5)), Some(2));
        assert_eq!(numeric_date(&json!(1_700_000_000u64)), Some(1_700_000_000));
        Ok(())
    }

    #[test]
    fn only_signing_keys_of_the_tokens_algorithm_verify() -> Result<(), serde_json::Error> {
        let key = |extra: Value| -> Result<Jwk, serde_json::Error> {
            let mut k = json!({"kty": "RSA", "n": "sXch", "e": "AQAB"});
            if let (Some(k), Some(extra)) = (k.as_object_mut(), extra.as_object()) {
                k.extend(extra.clone());
            }
            serde_json::from_value(k)
        };
        assert!(signs_with(&key(json!({}))?, Algorithm::RS256));
        assert!(signs_with(
            &key(json!({"use": "sig", "alg": "RS256"}))?,
            Algorithm::RS256
        ));
        assert!(signs_with(
            &key(json!({"key_ops": ["verify"]}))?,
            Algorithm::PS256
        ));
        // Keycloak's encryption key beside the signing key.
        assert!(!signs_with(
            &key(json!({"use": "enc", "alg": "RSA-OAEP"}))?,
            Algorithm::RS256
        ));
        assert!(!signs_with(&key(json!({"use": "enc"}))?, Algorithm::RS256));
        assert!(!signs_with(
            &key(json!({"key_ops": ["encrypt"]}))?,
            Algorithm::RS256
        ));
        // One key, one algorithm.
        assert!(!signs_with(&key(json!({"alg": "RS256"}))?, Algorithm::PS256));
        Ok(())
    }

    #[tokio::test]
    async fn an_oversized_document_from_the_issuer_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/jwks", listener.local_addr()?);
        tokio::spawn(async move {
            // Once with a Content-Length, once chunked without one; for each reader.
            for chunked in [false, true, false, true] {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let body = vec![b' '; MAX_DOCUMENT_BYTES + 1];
                let head = if chunked {
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                        .to_string()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    )
                };
                let _ = socket.write_all(head.as_bytes()).await;
                if chunked {
                    for part in body.chunks(64 * 1024) {
                        let _ = socket.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await;
                        let _ = socket.write_all(part).await;
                        let _ = socket.write_all(b"\r\n").await;
                    }
                    let _ = socket.write_all(b"0\r\n\r\n").await;
                } else {
                    let _ = socket.write_all(&body).await;
                }
            }
        });
        let http = crate::oidc::http_client(&[])?;
        for _ in 0..2 {
            let err = fetch_json(&http, &url).await.err().unwrap_or_default();
            assert!(err.contains("too large"), "{err}");
        }
        // The login issuer's discovery, JWKS and token answers, read by the OIDC library.
        let idp = crate::oidc::IdpHttp(http);
        for _ in 0..2 {
            let request = http::Request::get(url.as_str()).body(Vec::new())?;
            let answer = openidconnect::AsyncHttpClient::call(&idp, request).await;
            let err = answer.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("too large"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn hmac_and_none_are_not_allowed() {
        assert!(!ALLOWED_ALGORITHMS.contains(&Algorithm::HS256));
        assert!(!ALLOWED_ALGORITHMS.contains(&Algorithm::HS512));
    }
}
