//! The request pipeline. Every request, whatever its path:
//!
//! 1. loses every client-supplied identity header (and all `X-Forwarded-*` unless
//!    it comes from a trusted proxy CIDR);
//! 2. gets its path normalized ([`crate::path`]) for every decision made on it;
//! 3. goes to the proxy's own routes (`/oauth2/*`, `/ping`, `/ready`, served by
//!    warp), or to the upstream without a login when a skip-auth rule matches the
//!    normalized path (and with that path), or else needs a session (refreshed when
//!    due) that passes the authorization rules, and then goes upstream with identity
//!    headers: with its path as received when the upstream URL has no path (nothing
//!    was decided on it), else normalized, an ambiguous one refused (see [`Forward`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, COOKIE, HOST, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, OnceCell};
use warp::Filter;

use crate::bearer::{BearerVerifier, Refusal};
use crate::config::{Config, SameSite, SarClaim};
use crate::headers::{self, Identity as HeaderIdentity};
use crate::metrics::Metrics;
use crate::oidc::{Identity, LoginAttempt, Provider};
use crate::path;
use crate::redirect::RedirectPolicy;
use crate::session::{self, CookieOptions, OpenedSessions, Sealer, Session};
use crate::upstream::{ClientConnection, Upstream};
use prometheus_client::metrics::counter::Counter;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How long a login attempt (the CSRF cookie) stays valid.
const LOGIN_WINDOW: u64 = 15 * 60;
/// Browsers cap one cookie at 4096 bytes including its attributes.
const COOKIE_CHUNK: usize = 3800;

/// The last refresh of a session.
type RefreshSlot = Arc<Mutex<Option<LastRefresh>>>;

/// A refresh this request made or took over: whoever writes its cookies marks it
/// handed on ([`App::write_refreshed`]); an answer without them (a 403) leaves it kept.
struct Refreshed(RefreshSlot);

/// How long requests that still carry the old session take a refresh's result instead
/// of refreshing again (they were sent before its new cookie arrived).
const REFRESH_SHARED: u64 = 60;

struct LastRefresh {
    at: u64,
    /// The refreshed session, `None` if the refresh failed.
    session: Option<Arc<Session>>,
    /// The refresh token the issuer refused ([`crate::oidc::Error::GrantEnded`]), ending
    /// the session: a request carrying it ends too; one carrying a newer token (another
    /// replica refreshed the session) asks anew.
    refused: Option<String>,
    /// Until when a failed result stands in for the refresh (unix seconds): a refusal
    /// moments after the login ([`FRESH_LOGIN`]) holds until the session's tokens
    /// expire, other failures for [`REFRESH_RETRY`].
    failed_until: u64,
    /// A request has handed the refreshed session on (all its Set-Cookie headers).
    /// Until one has (its client went away meanwhile, it was answered 403, or only an
    /// ingress's first Set-Cookie would have reached the browser), the old cookie is
    /// all the browser holds and its refresh token may be used up (rotated): the result
    /// stays until its tokens expire.
    delivered: bool,
}

impl LastRefresh {
    /// Whether the slot is kept: while its result is taken, and a result never handed
    /// on for as long as the old cookie may come back (the next refresh starts from it).
    fn kept(&self, now: u64, cookie_lifetime: u64) -> bool {
        self.reusable(now) || (!self.delivered && self.session.is_some() && self.at + cookie_lifetime > now)
    }

    /// Whether a request carrying the old session takes this result.
    fn reusable(&self, now: u64) -> bool {
        match &self.session {
            Some(refreshed) => {
                self.at + REFRESH_SHARED > now || (!self.delivered && refreshed.expires_at > now)
            }
            None => self.failed_until > now,
        }
    }
}

/// How long a failed refresh is remembered: the requests of a session that keep
/// arriving meanwhile do not each ask the issuer again (and wait for its timeout when
/// it is down).
const REFRESH_RETRY: u64 = 10;

/// A refresh token refused this soon after the login does not end the session, which
/// is kept until its tokens expire instead (the refusal standing in for the refresh
/// until then): an issuer that answers `invalid_grant` to the refresh tokens it has just
/// issued (misconfigured) would otherwise send the user round the login on every visit,
/// when tokens shorter than the refresh window make the first request after the login
/// refresh.
const FRESH_LOGIN: u64 = 10;

pub struct App {
    pub config: Config,
    /// Shared with refreshes, which run as tasks of their own (see `App::refresh`).
    pub provider: OnceCell<Arc<Provider>>,
    /// Bearer-token verification, when issuers are configured (see [`crate::bearer`]);
    /// each issuer is discovered on its own ([`crate::discovery`]).
    pub bearer: Option<BearerVerifier>,
    /// The Kubernetes client for SubjectAccessReviews, when they are configured.
    pub kube: OnceCell<kube::Client>,
    /// Allowed SubjectAccessReviews per user and groups, reused for [`SAR_TTL`].
    sar_allowed: Mutex<HashMap<String, u64>>,
    /// When unusable route rules were last logged (unix s).
    route_warned: std::sync::atomic::AtomicU64,
    pub sealer: Sealer,
    /// Session cookies opened lately (see [`OpenedSessions`]).
    opened: OpenedSessions,
    pub redirects: RedirectPolicy,
    pub metrics: Metrics,
    /// The upstream's connector and each serving thread's idle connections.
    upstream: Arc<Upstream>,
    upstream_base: UpstreamBase,
    /// `state` values already redeemed, until their attempt would have expired.
    used_states: Mutex<UsedStates>,
    /// Sessions signed out, until every cookie of theirs has expired: a copied cookie dies too.
    revoked: Mutex<SignedOut>,
    /// One refresh at a time per session; waiters reuse its result.
    refreshing: Mutex<HashMap<SessionId, RefreshSlot>>,
}

/// Most redeemed `state` values remembered: anyone can start logins and send their
/// callbacks, so the set must not grow with them. Past it the oldest are forgotten
/// early; a replay of one of those still fails at the issuer, whose code is single-use
/// and bound to the login's PKCE verifier.
const USED_STATES_MAX: usize = 16 * 1024;

/// The `state` values of callbacks already served, in the order they were redeemed
/// (which is also the order they expire: each lives [`LOGIN_WINDOW`]), so pruning
/// takes from the front instead of scanning them all on every callback.
#[derive(Default)]
struct UsedStates {
    order: VecDeque<(u64, String)>,
    known: HashSet<String>,
}

impl UsedStates {
    /// Records `state` as redeemed at `now`; false if it already was (a replay).
    fn redeem(&mut self, state: &str, now: u64) -> bool {
        while let Some((expires, _)) = self.order.front()
            && (*expires <= now || self.order.len() >= USED_STATES_MAX)
        {
            if let Some((_, old)) = self.order.pop_front() {
                self.known.remove(&old);
            }
        }
        if !self.known.insert(state.to_string()) {
            return false;
        }
        self.order.push_back((now + LOGIN_WINDOW, state.to_string()));
        true
    }
}

thread_local! {
    static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as serving thread `index` (0 is the main thread), which
/// picks its idle upstream connections.
pub fn serving_thread(index: usize) {
    SERVING_THREAD.with(|t| t.set(index));
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed_unsync());
    *response.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, v);
    }
    response
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut m = message.into();
    m.push('\n');
    full(status, "text/plain; charset=utf-8", m)
}

fn redirect(to: &str) -> Response<Body> {
    let mut response = text(StatusCode::FOUND, format!("redirecting to {to}"));
    if let Ok(v) = HeaderValue::from_str(to) {
        response.headers_mut().insert(LOCATION, v);
    }
    response
}

/// The end of a login with `SameSite=Strict` session cookies: a page that moves on to
/// `to` by itself. The callback is reached by a navigation the issuer started, so a
/// redirect from it stays cross-site and the browser would not send the new Strict
/// cookie with it: the target would send the browser round the login forever. A
/// navigation this page starts is same-site.
fn same_site_hop(to: &str) -> Response<Body> {
    let escaped = html_escape(to);
    let mut page = full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><meta name=\"referrer\" content=\"no-referrer\"><meta http-equiv=\"refresh\" content=\"0;url={escaped}\"><title>Signed in</title><p><a href=\"{escaped}\">Continue</a></p>\n"
        ),
    );
    // The page's URL holds the authorization code: the next page must not get it as
    // its Referer (a redirect never sent one).
    page.headers_mut()
        .insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    page
}

/// `text` for an HTML attribute or element.
fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Whether the browser says another site started the request (`Sec-Fetch-Site`:
/// `cross-site`, or `same-site` for a sibling subdomain). Without the header (an old
/// browser, a script) nothing is known, and nothing is refused.
fn started_elsewhere(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site" || v.as_bytes() == b"same-site")
}

/// A sign-out another site's page asked for (a link, an `<img>`): a button that asks
/// again from this origin. Signing out would also end the login at the issuer, which
/// many issuers do without asking when given the ID token, and with it every other
/// application's session. Not to be framed: the button is the whole point.
fn confirm_sign_out(rd: Option<&str>) -> Response<Body> {
    let mut action = "/oauth2/sign_out".to_string();
    if let Some(rd) = rd {
        action.push_str("?rd=");
        action.extend(url::form_urlencoded::byte_serialize(rd.as_bytes()));
    }
    let mut page = full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><title>Sign out</title><form method=\"post\" action=\"{}\"><p>Another site asked to sign you out.</p><button type=\"submit\">Sign out</button></form>\n",
            html_escape(&action)
        ),
    );
    let headers = page.headers_mut();
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    page
}

/// A session's identity for revocation and single-flight refresh: the user, the
/// login time and the login's random number, which a refresh keeps, so signing out
/// also kills cookies copied before a refresh. Half a SHA-256, kept as bytes (a map
/// key, never shown).
type SessionId = [u8; 16];

fn session_id(session: &Session) -> SessionId {
    let digest = Sha256::digest(format!(
        "{}\n{}\n{}",
        session.user, session.created_at, session.login
    ));
    let mut id = SessionId::default();
    id.copy_from_slice(&digest[..16]);
    id
}

/// How long after sign-out a refresh that was already running may still seal a
/// cookie of the session.
const REFRESH_IN_FLIGHT: u64 = 60;

/// How many signed-out sessions one process remembers (16 bytes and an expiry each).
const MAX_SIGNED_OUT: usize = 65_536;

/// Sessions signed out in this process, by [`session_id`], each until the last of
/// its cookies has expired. That is counted from the sign-out, not from the login:
/// a refresh reseals the cookie with a new issue time, so a copy taken after a
/// refresh outlives the login time plus the cookie lifetime. A signed-out session
/// is never refreshed again (it does not open), so the sign-out time plus one
/// cookie lifetime (and a refresh that was in flight) covers every copy.
#[derive(Default)]
struct SignedOut {
    until: HashMap<SessionId, u64>,
    /// The same entries in the order they were signed out, which is the order they
    /// expire in (one cookie lifetime per process): pruning and the cap take from
    /// the front, with no scan under the lock every request takes.
    order: std::collections::VecDeque<(u64, SessionId)>,
}

impl SignedOut {
    /// Session `id` signed out at `now`; its cookies live `max_age` after their issue time.
    fn insert(&mut self, id: SessionId, now: u64, max_age: u64) {
        // A user scripting sign-in and sign-out would otherwise grow this for the whole
        // cookie lifetime; past the cap the oldest sign-out is forgotten (its cookie was
        // cleared from the browser that signed out; only a copy could come back).
        while let Some(&(until, oldest)) = self.order.front()
            && (until <= now || self.order.len() >= MAX_SIGNED_OUT)
        {
            self.order.pop_front();
            // A session signed out twice is listed twice; the later entry holds it.
            if self.until.get(&oldest) == Some(&until) {
                self.until.remove(&oldest);
            }
        }
        let until = now.saturating_add(max_age).saturating_add(REFRESH_IN_FLIGHT);
        self.until.insert(id, until);
        self.order.push_back((until, id));
    }

    fn contains(&self, id: &SessionId, now: u64) -> bool {
        self.until.get(id).is_some_and(|until| *until > now)
    }

    fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

/// Every `name=value` pair of every Cookie header, as bytes (`;`-separated, spaces
/// trimmed, empty pairs skipped). Bytes, not text: one application cookie with
/// non-ASCII bytes (set by page script, or by a sibling domain) must neither hide the
/// session cookie beside it nor be lost on the way upstream.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| split_at_semicolons(v.as_bytes()))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// `bytes.split(|b| *b == b';')`, found with memchr: a session cookie is kilobytes
/// long and the Cookie header is split twice on every request.
fn split_at_semicolons(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b';', bytes)
        .chain(std::iter::once(bytes.len()))
        .map(move |end| {
            let piece = bytes.get(start..end).unwrap_or_default();
            start = end + 1;
            piece
        })
}

/// The request's cookies, from every Cookie header, borrowed from the headers (read
/// on every request, so nothing is copied).
struct Jar<'a>(Vec<(&'a [u8], &'a [u8])>);

impl<'a> Jar<'a> {
    /// The value of cookie `name`; when a name repeats, the last one counts. Only a
    /// value that is text can be ours: one that is not is passed over.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .rev()
            .filter(|(k, _)| *k == name.as_bytes())
            .find_map(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The distinct cookie names (of pairs that are text).
    #[cfg(test)]
    fn names(&self) -> std::collections::HashSet<&'a str> {
        self.0
            .iter()
            .filter(|(_, v)| std::str::from_utf8(v).is_ok())
            .filter_map(|(k, _)| std::str::from_utf8(k).ok())
            .collect()
    }
}

fn cookies(headers: &HeaderMap) -> Jar<'_> {
    // Text only where it is needed (`get`): the other cookies are never read here.
    Jar(cookie_pairs(headers).filter_map(cookie_pair).collect())
}

/// How long an allowed SubjectAccessReview is reused (refusals are never reused).
const SAR_TTL: u64 = 30;
/// How long a SubjectAccessReview may take before the request is refused (the
/// client has no read timeout of its own; a hung API server must not hang users).
const SAR_TIMEOUT: Duration = Duration::from_secs(5);
/// Kubernetes' reserved prefix for users and groups.
const SYSTEM_PREFIX: &str = "system:";

/// The user and groups a SubjectAccessReview names for `session`: the configured
/// claim and prefixes, as the API server's OIDC authenticator names the same people
/// (`--oidc-username-claim`, `--oidc-username-prefix`, `--oidc-groups-prefix`), so
/// the cluster's RoleBindings for them match.
fn review_subject(config: &Config, session: &Session) -> Result<(String, Vec<String>), String> {
    let claim = match config.sar_username_claim {
        SarClaim::Sub => Some(session.user.as_str()),
        SarClaim::Email => session.email.as_deref().filter(|_| session.email_verified),
        SarClaim::PreferredUsername => session.preferred_username.as_deref(),
    };
    let Some(claim) = claim.filter(|c| !c.is_empty()) else {
        let what = match config.sar_username_claim {
            SarClaim::Email => "verified email address",
            _ => "preferred_username",
        };
        return Err(format!(
            "{} has no {what}, which names users for the access review",
            session.user
        ));
    };
    let user = format!("{}{claim}", config.sar_username_prefix);
    // `system:` names belong to the cluster (`system:masters` passes every review);
    // an issuer's claims must not reach them, as the API server's own OIDC
    // authenticator refuses them.
    if user.starts_with(SYSTEM_PREFIX) {
        return Err(format!("{user} is a reserved Kubernetes user name"));
    }
    let mut groups: Vec<String> = session
        .groups
        .iter()
        .map(|g| format!("{}{g}", config.sar_groups_prefix))
        .filter(|g| !g.starts_with(SYSTEM_PREFIX))
        .collect();
    groups.push("system:authenticated".into());
    Ok((user, groups))
}

impl App {
    /// Whether to log unusable route rules now: at most once a minute per process.
    fn route_warning_due(&self, now: u64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.route_warned.load(Ordering::Relaxed);
        now >= last.saturating_add(60)
            && self
                .route_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Every authorization rule: groups, email domains, then Kubernetes RBAC.
    async fn authorized(&self, session: &Session) -> Option<Refused> {
        if let Some(why) = authorize(&self.config, session) {
            return Some(Refused::Forbidden(why));
        }
        let attrs = self.config.sar.as_ref()?;
        let (user, groups) = match review_subject(&self.config, session) {
            Ok(named) => named,
            Err(why) => return Some(Refused::Forbidden(why)),
        };
        let key = format!("{user}\n{}", groups.join(","));
        if self
            .sar_allowed
            .lock()
            .await
            .get(&key)
            .is_some_and(|until| *until > now())
        {
            return None;
        }
        // Boxed: the review's state (kube's client call) would otherwise enlarge every
        // request's future, which each connection keeps allocated (see `maybe_refresh`).
        Box::pin(self.review(user, groups, key, attrs)).await
    }

    /// Asks the API server whether `user` may do what `attrs` say; caches a yes.
    async fn review(
        &self,
        user: String,
        groups: Vec<String>,
        key: String,
        attrs: &k8s_openapi::api::authorization::v1::ResourceAttributes,
    ) -> Option<Refused> {
        let Some(client) = self.kube.get() else {
            return Some(Refused::Unavailable);
        };
        let review = k8s_openapi::api::authorization::v1::SubjectAccessReview {
            spec: k8s_openapi::api::authorization::v1::SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(groups),
                resource_attributes: Some(attrs.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: kube::Api<k8s_openapi::api::authorization::v1::SubjectAccessReview> =
            kube::Api::all(client.clone());
        let params = kube::api::PostParams::default();
        let asked = tokio::time::timeout(SAR_TIMEOUT, api.create(&params, &review));
        match asked
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into())))
        {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {
                let mut cache = self.sar_allowed.lock().await;
                let t = now();
                cache.retain(|_, until| *until > t);
                cache.insert(key, t + SAR_TTL);
                None
            }
            Ok(answer) => {
                let reason = answer.status.and_then(|s| s.reason).unwrap_or_default();
                Some(Refused::Forbidden(format!(
                    "RBAC does not allow {} to {} {}{}",
                    user,
                    attrs.verb.as_deref().unwrap_or_default(),
                    attrs.resource.as_deref().unwrap_or_default(),
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({reason})")
                    }
                )))
            }
            // The API server answered, refusing the review itself (the proxy may not
            // create SubjectAccessReviews, attributes it does not take): a setup fault
            // that retrying does not mend.
            Err(kube::Error::Api(status)) if status.code < 500 && status.code != 429 => {
                tracing::error!(code = status.code, message = %status.message, "the API server refused the SubjectAccessReview");
                Some(Refused::Broken(status.message))
            }
            Err(e) => {
                tracing::warn!(error = %e, "SubjectAccessReview failed");
                Some(Refused::Unavailable)
            }
        }
    }
}

/// Why a signed-in user is not let in.
#[derive(Debug, PartialEq)]
enum Refused {
    /// A rule refuses them: 403 (an ingress shows it as final).
    Forbidden(String),
    /// The access review could not be asked (the API server is down, slow or
    /// throttling): 503 with Retry-After, which clients retry and monitoring tells
    /// apart from RBAC's no.
    Unavailable,
    /// The API server refused the review itself: 500, the proxy's setup is at fault.
    Broken(String),
}

impl Refused {
    fn response(&self, metrics: &Metrics) -> Response<Body> {
        match self {
            Refused::Forbidden(why) => {
                metrics.refused("forbidden");
                text(StatusCode::FORBIDDEN, format!("forbidden: {why}"))
            }
            Refused::Unavailable => {
                metrics.refused("review_unavailable");
                let mut answer = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable: the access review could not be made (the Kubernetes API did not answer); try again",
                );
                answer
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
                answer
            }
            Refused::Broken(why) => {
                metrics.refused("review_refused");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "the API server refused the access review ({why}); the proxy's setup needs fixing"
                    ),
                )
            }
        }
    }
}

/// Why a signed-in user is refused, as a sentence; `None` lets them in.
pub fn authorize(config: &Config, identity: &Session) -> Option<String> {
    if !config.allowed_groups.is_empty() && !identity.groups.iter().any(|g| config.allowed_groups.contains(g))
    {
        return Some(format!("{} is in none of the allowed groups", identity.user));
    }
    if !config.email_domains.is_empty() {
        let Some(email) = identity.email.as_deref() else {
            return Some(format!("{} has no email address", identity.user));
        };
        if !identity.email_verified {
            return Some(format!("the email address of {} is not verified", identity.user));
        }
        if !email_domain_allowed(email, &config.email_domains) {
            return Some(format!("{email} is not in an allowed email domain"));
        }
    }
    None
}

/// The rules an ingress may add per route on `/oauth2/auth`, as with oauth2-proxy:
/// `allowed_groups`, `allowed_emails` and `allowed_email_domains` in the query, each
/// comma-separated and repeatable. Every rule given must pass (one proxy guards
/// ingresses with different audiences); ignoring them would let everyone in.
///
/// `None`: the rule is not given. A rule given with no entry (`allowed_groups=`, an
/// annotation templated from an empty value) lets nobody in rather than everyone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteRules {
    groups: Option<Vec<String>>,
    emails: Option<Vec<String>>,
    email_domains: Option<Vec<String>>,
    /// Why an entry cannot be used (a domain with an `@`, an email without one, a
    /// whole top-level domain): the route then lets nobody in, even those another
    /// entry names, and says so, as a bad `--email-domains` entry stops the proxy.
    invalid: Option<String>,
}

impl RouteRules {
    pub fn from_query(query: &str) -> Self {
        let mut rules = Self::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let list = match key.as_ref() {
                "allowed_groups" => &mut rules.groups,
                "allowed_emails" => &mut rules.emails,
                "allowed_email_domains" => &mut rules.email_domains,
                _ => continue,
            };
            // Trimmed, as `--email-domains` entries are: `a, b` is `a` and `b`.
            list.get_or_insert_with(Vec::new).extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(str::to_string),
            );
        }
        let bad_email = rules.emails.iter().flatten().find_map(|e| {
            if email_parts(e).is_none() {
                Some(format!("allowed_emails: {e:?} is not an email address"))
            } else if e.contains(char::is_whitespace) {
                // The usual way to get here: `alice+ops@corp.com` unescaped in a URL.
                Some(format!(
                    "allowed_emails: {e:?} has a space (a '+' in a URL's query is a space: write %2B)"
                ))
            } else {
                None
            }
        });
        rules.invalid = match bad_email {
            Some(why) => Some(why),
            None => rules
                .email_domains
                .iter()
                .flatten()
                .find_map(|d| crate::config::email_domain(d).err())
                .map(|e| format!("allowed_email_domains: {e}")),
        };
        rules
    }

    /// Why `identity` is refused on this route; `None` lets them in. Emails count only
    /// when verified, as for `--email-domains`.
    pub fn refuse(&self, identity: &Session) -> Option<String> {
        if let Some(why) = &self.invalid {
            return Some(format!("this route's rules cannot be met: {why}"));
        }
        if let Some(groups) = &self.groups
            && !identity.groups.iter().any(|g| groups.contains(g))
        {
            return Some(format!(
                "{} is in none of this route's allowed groups",
                identity.user
            ));
        }
        if self.emails.is_none() && self.email_domains.is_none() {
            return None;
        }
        let Some(email) = verified_email(identity) else {
            return Some(format!("{} has no verified email address", identity.user));
        };
        if let Some(emails) = &self.emails
            && !emails.iter().any(|e| e.eq_ignore_ascii_case(email))
        {
            return Some(format!("{email} is not among this route's allowed emails"));
        }
        if let Some(domains) = &self.email_domains
            && !email_domain_allowed(email, domains)
        {
            return Some(format!("{email} is not in this route's allowed email domains"));
        }
        None
    }
}

/// Exactly one `@`, a non-empty local part, and a domain equal (ignoring case) to
/// an allowed one; `*` allows every domain, and `.corp.com` or `*.corp.com` every
/// subdomain of corp.com but not corp.com itself (oauth2-proxy's forms).
/// `a@evil.com@corp.com` has two `@`s and is refused rather than guessed at.
pub fn email_domain_allowed(email: &str, domains: &[String]) -> bool {
    let Some((_, domain)) = email_parts(email) else {
        return false;
    };
    domains.iter().any(|d| {
        if d == "*" {
            return true;
        }
        match d.strip_prefix('*').unwrap_or(d).strip_prefix('.') {
            // `.corp.com`: a label of the email's own before the suffix.
            Some(parent) => domain
                .len()
                .checked_sub(parent.len() + 1)
                .filter(|&cut| cut > 0)
                .and_then(|cut| domain.get(cut..))
                .is_some_and(|suffix| suffix.starts_with('.') && suffix[1..].eq_ignore_ascii_case(parent)),
            None => d.eq_ignore_ascii_case(domain),
        }
    })
}

/// The local part and domain of an address with exactly one `@` and neither part empty.
fn email_parts(email: &str) -> Option<(&str, &str)> {
    let mut parts = email.split('@');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(local), Some(domain), None) if !local.is_empty() && !domain.is_empty() => Some((local, domain)),
        _ => None,
    }
}

/// The parts of the upstream URL every proxied request's URI starts with, parsed
/// once rather than per request.
struct UpstreamBase {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The URL's path without its trailing `/`: as with oauth2-proxy, only requests
    /// under it go upstream (the others get 404), their path unchanged.
    path: String,
    /// The Host header naming the upstream (port only when not the scheme's default),
    /// sent instead of the client's with `pass-host-header: false`.
    host: HeaderValue,
}

impl UpstreamBase {
    fn new(url: &url::Url) -> Result<Self, String> {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return Err(format!("upstream {url}: no host"));
        };
        Ok(Self {
            scheme: url.scheme().parse().map_err(|e| format!("upstream {url}: {e}"))?,
            authority: format!("{host}:{port}")
                .parse()
                .map_err(|e| format!("upstream {url}: {e}"))?,
            // Normalized as request paths are, so that the two compare.
            path: path::normalize(url.path())
                .map_err(|e| format!("upstream {url}: its path: {e}"))?
                .trim_end_matches('/')
                .to_string(),
            host: HeaderValue::from_str(&match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            })
            .map_err(|e| format!("upstream {url}: {e}"))?,
        })
    }

    /// Whether a request's normalized path is under the upstream URL's path (whole
    /// segments: `/app` covers `/app` and `/app/x`, not `/apple`).
    fn serves(&self, normalized: &str) -> bool {
        normalized
            .strip_prefix(self.path.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The upstream URI for a request's path (see [`Forward`]) and its query, in the
    /// origin form an HTTP/1.1 request line to a server (not a proxy) has.
    fn uri(path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let path_and_query = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        Uri::builder().path_and_query(path_and_query).build()
    }

    /// The scheme and authority connections go to.
    fn address(&self) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
    }
}

impl App {
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let sealer =
            Sealer::new(config.cookie_secret.expose(), &[]).map_err(|e| format!("cookie-secret: {e}"))?;
        let redirects =
            RedirectPolicy::new(&config.whitelist_domains).map_err(|e| format!("whitelist-domains: {e}"))?;
        let upstream_base = UpstreamBase::new(&config.upstream)?;
        let address = upstream_base
            .address()
            .map_err(|e| format!("upstream {}: {e}", config.upstream))?;
        let upstream = Arc::new(Upstream::new(&config, address, config.worker_threads)?);
        let opened = OpenedSessions::new(&config.cookie_name);
        let bearer = if config.bearer_issuers.is_empty() {
            None
        } else {
            let http = crate::oidc::http_client(&config.provider_cas).map_err(|e| e.to_string())?;
            Some(BearerVerifier::new(
                &config.bearer_issuers,
                http,
                config.bearer_clock_skew,
                config.groups_claim.clone(),
            )?)
        };
        let app = Self {
            config,
            provider: OnceCell::new(),
            bearer,
            kube: OnceCell::new(),
            sar_allowed: Mutex::new(HashMap::new()),
            route_warned: std::sync::atomic::AtomicU64::new(0),
            opened,
            sealer,
            redirects,
            metrics: Metrics::default(),
            upstream,
            upstream_base,
            used_states: Mutex::default(),
            revoked: Mutex::new(SignedOut::default()),
            refreshing: Mutex::new(HashMap::new()),
        };
        // A cookie the browser would refuse (a `__Host-` name with a domain, a domain
        // with a port) would fail every login: refuse it at start-up instead.
        for name in [app.config.cookie_name.clone(), app.csrf_cookie()] {
            session::set_cookie(&name, "x", &app.cookie_options(None))
                .map_err(|e| format!("cookie-name, cookie-domain, cookie-secure, cookie-samesite: {e}"))?;
        }
        Ok(Arc::new(app))
    }

    fn cookie_options(&self, max_age: Option<u64>) -> CookieOptions {
        CookieOptions {
            domain: self.config.cookie_domain.clone(),
            path: "/".into(),
            secure: self.config.cookie_secure,
            http_only: true,
            same_site: match self.config.cookie_samesite {
                SameSite::Lax => session::SameSite::Lax,
                SameSite::Strict => session::SameSite::Strict,
                SameSite::None => session::SameSite::None,
            },
            max_age,
        }
    }

    fn csrf_cookie(&self) -> String {
        format!("{}_csrf", self.config.cookie_name)
    }

    /// The session from the request's cookies, if valid and not signed out.
    async fn session(&self, headers: &HeaderMap) -> Option<Arc<Session>> {
        let jar = cookies(headers);
        let sealed = session::join(&self.config.cookie_name, |n| jar.get(n))?;
        let session = self
            .opened
            .open(&self.sealer, &sealed, now(), self.config.cookie_expire.as_secs())
            .ok()?;
        let revoked = self.revoked.lock().await;
        // The id costs a hash: skipped until anyone has signed out in this process.
        if !revoked.is_empty() && revoked.contains(&session_id(&session), now()) {
            return None;
        }
        drop(revoked);
        Some(session)
    }

    /// Set-Cookie values carrying `session`, and clearing any leftover chunks.
    fn session_cookies(&self, session: &Session, previous_chunks: usize) -> Result<Vec<String>, String> {
        let name = &self.config.cookie_name;
        let sealed = self.sealer.seal(name, session, now())?;
        let options = self.cookie_options(Some(self.config.cookie_expire.as_secs()));
        let chunks = session::split(name, &sealed, COOKIE_CHUNK);
        // `join` reads no more: a longer session would never open, a login loop.
        if chunks.len() > session::MAX_CHUNKS {
            return Err(format!(
                "the session is {} bytes sealed, more than {} cookies hold; ask the issuer for smaller tokens (fewer groups in them)",
                sealed.len(),
                session::MAX_CHUNKS
            ));
        }
        let mut out = chunks
            .iter()
            .map(|(n, v)| session::set_cookie(n, v, &options))
            .collect::<Result<Vec<_>, _>>()?;
        for i in chunks.len()..previous_chunks {
            out.push(session::clear_cookie(&format!("{name}_{i}"), &options));
        }
        Ok(out)
    }

    /// How many session chunks the request's cookies hold (one past the highest
    /// `name_<n>`). Writing a session of fewer chunks must clear the rest: `join` would
    /// glue a leftover chunk to the new ones, the session would not open, and the
    /// browser would go round the login forever.
    fn chunks_in(&self, headers: &HeaderMap) -> usize {
        let name = &self.config.cookie_name;
        let jar = cookies(headers);
        (1..session::MAX_CHUNKS)
            .rev()
            .find(|i| jar.contains_key(&format!("{name}_{i}")))
            .map_or(usize::from(jar.contains_key(name)), |i| i + 1)
    }

    /// The Set-Cookie headers of a new login: the session, and a clear of every chunk
    /// it does not use that the browser may still hold. With `SameSite=Strict` the
    /// callback is a navigation from the issuer's site, which carries none of the
    /// session cookies, so their number is unknown there: every index is cleared (a
    /// browser may set and clear Strict cookies from a cross-site navigation's answer).
    fn login_cookies(&self, session: &Session, headers: &HeaderMap) -> Result<Vec<String>, String> {
        let held = match self.config.cookie_samesite {
            SameSite::Strict => session::MAX_CHUNKS,
            _ => self.chunks_in(headers),
        };
        self.session_cookies(session, held)
    }

    /// Adds the Set-Cookie headers of a refreshed session to `response` and marks the
    /// refresh handed on. `one_header_passed`: only the first Set-Cookie may reach the
    /// browser (`/oauth2/auth`, whose answer an ingress passes on with nginx's
    /// `$upstream_http_set_cookie`, the first header only); a session that needs more
    /// (chunks, or clears of old ones) is then not written at all, since a new first
    /// chunk beside old ones opens nothing: the browser keeps its old cookies, and
    /// requests carrying them take this refresh's result (see [`LastRefresh::delivered`]).
    async fn write_refreshed(
        &self,
        response: &mut Response<Body>,
        session: &Arc<Session>,
        previous_chunks: usize,
        refreshed: Refreshed,
        one_header_passed: bool,
    ) {
        let set = match self.session_cookies(session, previous_chunks) {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "could not write the refreshed session");
                return;
            }
        };
        if one_header_passed && set.len() > 1 {
            return;
        }
        let mut written = 0;
        for c in &set {
            if let Ok(v) = HeaderValue::from_str(c) {
                response.headers_mut().append(SET_COOKIE, v);
                written += 1;
            }
        }
        if written == set.len() {
            let mut last = refreshed.0.lock().await;
            if let Some(last) = last.as_mut()
                && last.session.as_ref().is_some_and(|s| Arc::ptr_eq(s, session))
            {
                last.delivered = true;
            }
        }
    }

    fn clear_session_cookies(&self, headers: &HeaderMap) -> Vec<String> {
        let name = &self.config.cookie_name;
        let options = self.cookie_options(None);
        let jar = cookies(headers);
        let mut out = vec![session::clear_cookie(name, &options)];
        out.extend(
            (1..session::MAX_CHUNKS)
                .map(|i| format!("{name}_{i}"))
                .filter(|n| jar.contains_key(n))
                .map(|n| session::clear_cookie(&n, &options)),
        );
        out
    }

    /// Whether the session `sid` was signed out in this replica.
    async fn signed_out(&self, sid: &SessionId) -> bool {
        let revoked = self.revoked.lock().await;
        !revoked.is_empty() && revoked.contains(sid, now())
    }

    /// Refreshes `session` when its access token is about to expire; `Some(Refreshed)`
    /// when it did (its cookies are for [`App::write_refreshed`]). Concurrent requests
    /// of one session wait for the first one's refresh and reuse it. `None` when the
    /// issuer refused the refresh token (`invalid_grant`: the grant revoked, the user's
    /// login there ended; `invalid_client`), as in oauth2-proxy: the issuer no longer
    /// vouches for the user (except within [`FRESH_LOGIN`] of the login: kept until its
    /// tokens expire). Any other failure keeps the session until its tokens expire (then
    /// `None` too), so a short outage of the issuer signs nobody out.
    /// With refresh on, a session without a refresh token (the issuer gave none: no
    /// `offline_access`) cannot be renewed and ends with its tokens too, and a session
    /// signed out in this replica while its refresh ran ends at once.
    async fn maybe_refresh(&self, session: Arc<Session>) -> Option<(Arc<Session>, Option<Refreshed>)> {
        let Some(window) = self.config.cookie_refresh else {
            return Some((session, None));
        };
        if !refresh_due(&session, window.as_secs(), now()) {
            return Some((session, None));
        }
        // Boxed: the refresh's state (the token request) is about 4 KB, more than the
        // rest of a request's future; hyper keeps each connection's request future
        // allocated, so unboxed it cost every connection that much, refreshing or not.
        Box::pin(self.refresh(session)).await
    }

    /// Refreshes a session that is due, once for all requests that carry it at the time
    /// (single-flight); `None` when the session ends.
    async fn refresh(&self, session: Arc<Session>) -> Option<(Arc<Session>, Option<Refreshed>)> {
        let failed = |session: Arc<Session>| (session.expires_at > now()).then_some((session, None));
        if session.refresh_token.is_none() {
            return failed(session);
        }
        let Some(provider) = self.provider.get() else {
            return Some((session, None));
        };
        let sid = session_id(&session);
        let slot = {
            let mut map = self.refreshing.lock().await;
            let t = now();
            let lifetime = self.config.cookie_expire.as_secs();
            map.retain(|_, s| {
                Arc::strong_count(s) > 1
                    || s.try_lock()
                        .is_ok_and(|r| r.as_ref().is_some_and(|l| l.kept(t, lifetime)))
            });
            map.entry(sid).or_default().clone()
        };
        // Owned: the guard moves into the exchange's task below.
        let mut result = slot.clone().lock_owned().await;
        // Signed out since this request opened it: a refresh now would get a token the
        // sign-out, which looked for this slot before it was made, cannot revoke.
        if self.signed_out(&sid).await {
            return None;
        }
        if let Some(last) = result.as_ref().filter(|l| l.reusable(now())) {
            match (&last.session, &last.refused) {
                (Some(refreshed), _) => return Some((refreshed.clone(), Some(Refreshed(slot.clone())))),
                (None, None) => return failed(session),
                (None, Some(refused)) if session.refresh_token.as_ref() == Some(refused) => return None,
                // A newer token than the one refused: asked anew below.
                (None, Some(_)) => {}
            }
        }
        // A result never handed on whose tokens have expired too: the old cookie's
        // refresh token went into it (and may be used up), so the chain goes on from
        // the result's (behind an ingress that passes one Set-Cookie, a session over
        // several cookies lives on like this, in this replica).
        let session = match result.as_ref() {
            Some(LastRefresh {
                session: Some(kept),
                delivered: false,
                ..
            }) => kept.clone(),
            _ => session,
        };
        let Some(refresh_token) = session.refresh_token.clone() else {
            return failed(session);
        };
        let previous = Identity {
            subject: session.user.clone(),
            email: session.email.clone(),
            email_verified: session.email_verified,
            preferred_username: session.preferred_username.clone(),
            groups: session.groups.clone(),
            access_token: session.access_token.clone().unwrap_or_default(),
            id_token: session.id_token.clone().unwrap_or_default(),
            refresh_token: Some(refresh_token.clone()),
            expires_at: session.expires_at,
        };
        self.metrics.refreshes.inc();
        // A task of its own, holding the slot: a client that goes away mid-exchange drops
        // this request's future, and the issuer, which has taken the refresh token by
        // then (and may have rotated it, refusing it from now on), must still have its
        // answer stored for the session's next request.
        let (provider, created_at, login) = (provider.clone(), session.created_at, session.login);
        let keep_access_token = self.config.pass_access_token;
        let exchange = tokio::spawn(async move {
            let mut refreshed = provider
                .refresh(&refresh_token, &previous)
                .await
                .map(|identity| Arc::new(to_session(identity, created_at, login, keep_access_token)));
            let t = now();
            let mut failed_until = t + REFRESH_RETRY;
            if let Err(crate::oidc::Error::GrantEnded(why)) = &refreshed
                && t < created_at.saturating_add(FRESH_LOGIN)
            {
                tracing::warn!(error = %why, "the issuer refused a refresh token moments after the login: the session \
                    is kept until its tokens expire; does the issuer allow this client the refresh_token grant?");
                refreshed = Err(crate::oidc::Error::Refused(why.clone()));
                failed_until = failed_until.max(previous.expires_at);
            }
            let ended = matches!(refreshed, Err(crate::oidc::Error::GrantEnded(_)));
            *result = Some(LastRefresh {
                at: t,
                session: refreshed.as_ref().ok().cloned(),
                refused: ended.then_some(refresh_token),
                failed_until,
                delivered: false,
            });
            refreshed
        });
        match exchange.await {
            Ok(Ok(_)) if self.signed_out(&sid).await => {
                // Signed out during the exchange: the session stays ended, and its new
                // token is revoked here unless the sign-out took it from the slot first.
                let taken = slot.lock().await.as_mut().and_then(|l| l.session.take());
                if let (Some(token), Some(provider)) = (
                    taken.and_then(|s| s.refresh_token.clone()),
                    self.provider.get().cloned(),
                ) {
                    let counted = (
                        self.metrics.revocations.clone(),
                        self.metrics.revocation_failures.clone(),
                    );
                    tokio::spawn(
                        async move { revoke(&provider, (&counted.0, &counted.1), &token, None).await },
                    );
                }
                None
            }
            // This request goes on to answer with the new cookie, if it can.
            Ok(Ok(refreshed)) => Some((refreshed, Some(Refreshed(slot)))),
            Err(e) => {
                tracing::warn!(user = %session.user, error = %e, "the refresh task failed");
                failed(session)
            }
            Ok(Err(e @ crate::oidc::Error::GrantEnded(_))) => {
                tracing::info!(user = %session.user, error = %e, "the issuer refused the refresh token: the session ends");
                None
            }
            Ok(Err(e)) => {
                let kept = failed(session.clone());
                if kept.is_some() {
                    tracing::info!(user = %session.user, error = %e, "refresh failed; the session stays until its tokens expire");
                } else {
                    tracing::info!(user = %session.user, error = %e, "refresh failed and the session's tokens have expired: the session ends");
                }
                kept
            }
        }
    }
}

/// How long before the access token expires a session is refreshed at the latest
/// (when `cookie-refresh` is on).
const EXPIRY_MARGIN: u64 = 60;

/// Whether `session` is due for a refresh at `now` with a `cookie-refresh` of `window`
/// seconds: as with oauth2-proxy, once its tokens are older than the window; and also
/// shortly before the access token expires, so that a window longer than the tokens
/// live does not end the session. (Counting the window back from the expiry instead
/// made a window as long as the token lifetime, a common oauth2-proxy setting, due on
/// every request.)
fn refresh_due(session: &Session, window: u64, now: u64) -> bool {
    let issued = session.refreshed_at.max(session.created_at);
    now >= issued.saturating_add(window) || session.expires_at <= now + window.min(EXPIRY_MARGIN)
}

/// The session for `identity`. The access token is kept only when it is handed on
/// (`keep_access_token`): nothing else here uses it, and it is often the largest of the
/// tokens, so the cookies (which a browser sends with every request, and ingress-nginx
/// refuses above 8 KB a header by default) stay smaller.
fn to_session(identity: Identity, created_at: u64, login: u64, keep_access_token: bool) -> Session {
    Session {
        user: identity.subject,
        email: identity.email,
        email_verified: identity.email_verified,
        groups: identity.groups,
        preferred_username: identity.preferred_username,
        access_token: Some(identity.access_token).filter(|_| keep_access_token),
        id_token: Some(identity.id_token),
        refresh_token: identity.refresh_token,
        expires_at: identity.expires_at,
        created_at,
        login,
        refreshed_at: now(),
        headers: Default::default(),
    }
}

/// The email address to hand on: only a verified one. Anyone may type any address
/// at many issuers, and upstreams key accounts on the email header (oauth2-proxy
/// refuses such logins outright).
fn verified_email(session: &Session) -> Option<&str> {
    session.email.as_deref().filter(|_| session.email_verified)
}

/// The session's identity header values, built on its first request.
fn identity_values<'a>(app: &App, session: &'a Session) -> &'a headers::IdentityValues {
    let pass = app.config.pass_access_token;
    session
        .headers
        .get_or_init(|| headers::IdentityValues::new(&header_identity(session, pass), pass))
}

/// `with_token`: copy the access token too (only when it is passed on).
fn header_identity(session: &Session, with_token: bool) -> HeaderIdentity {
    HeaderIdentity {
        user: session.user.clone(),
        email: verified_email(session).map(str::to_string),
        groups: session.groups.clone(),
        preferred_username: session.preferred_username.clone(),
        access_token: session.access_token.clone().filter(|_| with_token),
    }
}

const X_AUTH_REQUEST_REDIRECT: &str = "x-auth-request-redirect";
// Parsed once: a name given as text is copied into a new allocation on every insert
// (a clone of these copies nothing).
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Serves one request (see the module doc for the order of the steps).
pub async fn handle(app: Arc<App>, req: Request<Incoming>, client: Arc<ClientConnection>) -> Response<Body> {
    // A dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`, which no IPv4 range of
    // `trusted-proxy-cidrs` contains and no IPv4 allow-list upstream matches
    // (`client.remote` has them as IPv4). A range written in the mapped form still
    // matches: both forms are tried.
    let (peer, remote) = (client.peer, client.remote);
    let (mut parts, body) = req.into_parts();
    // CONNECT names an authority, not a path: the upstream would not see the path the
    // rules judged. Two Host lines (RFC 9112 3.2 requires a 400) let the upstream pick
    // another host than the one forwarded as X-Forwarded-Host.
    if parts.method == Method::CONNECT {
        app.metrics.refused("bad_request");
        let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "refused: CONNECT is not proxied");
        refused.headers_mut().insert(
            http::header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        return refused;
    }
    if parts.headers.get_all(HOST).iter().nth(1).is_some() {
        app.metrics.refused("bad_request");
        return text(StatusCode::BAD_REQUEST, "refused: more than one Host header");
    }
    let trusted = app
        .config
        .trusted_proxy_cidrs
        .iter()
        .any(|c| c.contains(&remote.ip()) || c.contains(&peer));
    // Where to go after the login, as an ingress asks (oauth2-proxy's nginx setup sets
    // it from `$request_uri`): only a wish, checked against the allow-list like `rd`,
    // so taken from any client, for our own routes only; never passed upstream.
    let wanted_redirect = parts.headers.remove(X_AUTH_REQUEST_REDIRECT);
    headers::strip_identity(&mut parts.headers, !trusted);
    if !trusted {
        parts.headers.remove("forwarded");
    }
    // A path that cannot be normalized is neither ours nor public.
    let normalized = path::normalize(parts.uri.path());
    if let Ok(normalized) = &normalized
        && (normalized.starts_with("/oauth2/") || normalized == "/ping" || normalized == "/ready")
    {
        // warp routes on the same normalized path the decision was made on.
        let pq = match parts.uri.query() {
            Some(q) => format!("{normalized}?{q}"),
            None => normalized.clone(),
        };
        if let Ok(uri) = Uri::builder().path_and_query(pq).build() {
            parts.uri = uri;
        }
        if let Some(wanted) = wanted_redirect {
            parts.headers.insert(X_AUTH_REQUEST_REDIRECT, wanted);
        }
        let mut response = own_routes(app, Request::from_parts(parts, body)).await;
        // Identities, sign-in redirects and auth answers are per user: never from a
        // shared cache (oauth2-proxy sets the same on its /oauth2/ routes).
        if normalized.starts_with("/oauth2/") {
            response
                .headers_mut()
                .insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        return response;
    }
    // A slice of the connection's read buffer: not held while the request goes upstream.
    drop(wanted_redirect);
    let forward = match &normalized {
        // Public with the path the rule matched: the upstream must serve that one.
        Ok(n) if app.config.skip_auth_paths.iter().any(|r| r.is_match(n)) => {
            return proxy(&app, parts, body, Forward::Normalized(n), &client, None).await;
        }
        _ if app.upstream_base.path.is_empty() => Forward::AsReceived,
        Ok(n) => Forward::Normalized(n),
        Err(e) => {
            app.metrics.refused("bad_path");
            return text(
                StatusCode::BAD_REQUEST,
                format!("refused: {e}; the upstream URL's path cannot be judged on it"),
            );
        }
    };

    let Some(session) = app.session(&parts.headers).await else {
        if let Some(token) = bearer_token(&parts.headers) {
            return bearer(&app, parts, body, forward, &client, &token).await;
        }
        app.metrics.refused("no_session");
        return unauthenticated(&parts);
    };
    let Some((session, refreshed)) = app.maybe_refresh(session).await else {
        app.metrics.refused("refresh_failed");
        return unauthenticated(&parts);
    };
    // Only a refreshed session is written back, over however many chunks it had.
    let previous_chunks = if refreshed.is_some() {
        app.chunks_in(&parts.headers)
    } else {
        0
    };
    if let Some(refused) = app.authorized(&session).await {
        return refused.response(&app.metrics);
    }
    let mut response = proxy(&app, parts, body, forward, &client, Some(session.as_ref())).await;
    if let Some(refreshed) = refreshed {
        app.write_refreshed(&mut response, &session, previous_chunks, refreshed, false)
            .await;
    }
    response
}

/// Removes our cookies (`name`, `name_<n>` chunks, `name_csrf`) from every Cookie
/// header, keeping the application's own cookies.
fn strip_own_cookies(headers: &mut HeaderMap, name: &str) {
    // Sized exactly, so that the Bytes the header takes over needs no second allocation.
    let (size, count) = cookie_pairs(headers)
        .filter(|pair| !is_own_cookie(cookie_name(pair), name))
        .fold((0, 0), |(size, count), pair| (size + pair.len(), count + 1));
    let mut kept: Vec<u8> = Vec::with_capacity(size + 2 * usize::saturating_sub(count, 1));
    for pair in cookie_pairs(headers) {
        if is_own_cookie(cookie_name(pair), name) {
            continue;
        }
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    headers.remove(COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(kept))
    {
        headers.insert(COOKIE, v);
    }
}

/// The name and value of a `name=value` pair, split at the first `=`.
fn cookie_pair(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = memchr::memchr(b'=', pair)?;
    Some((&pair[..eq], &pair[eq + 1..]))
}

/// The name of a `name=value` pair (all of it when it has no `=`).
fn cookie_name(pair: &[u8]) -> &[u8] {
    cookie_pair(pair).map_or(pair, |(name, _)| name)
}

/// Whether the cookie named `cookie` is one of the proxy's: the session (`name`), its
/// chunks (`name_1`, ...) or the login's CSRF cookie (`name_csrf`).
fn is_own_cookie(cookie: &[u8], name: &str) -> bool {
    let cookie = cookie.trim_ascii();
    let Some(rest) = cookie.strip_prefix(name.as_bytes()) else {
        return false;
    };
    // Exactly ours: `name`, `name_csrf`, `name_1` .. `name_15`. An application's
    // `session_id` beside a proxy cookie named `session` is the application's.
    match rest {
        b"" | b"_csrf" => true,
        [b'_', first @ b'1'..=b'9', more @ ..] if more.len() <= 1 && more.iter().all(u8::is_ascii_digit) => {
            let n = more
                .iter()
                .fold(usize::from(first - b'0'), |n, d| n * 10 + usize::from(d - b'0'));
            n < session::MAX_CHUNKS
        }
        _ => false,
    }
}

/// The name a browser will send a `Set-Cookie` back under. A cookie without a name
/// (`=x=y`, or no `=` at all) comes back as its value alone (`Cookie: x=y`, RFC 6265bis
/// 5.6 and 5.7), which a server reads as the cookie `x`: the upstream could plant one
/// of ours that way (cookie tossing).
fn returned_name(set_cookie: &[u8]) -> &[u8] {
    let pair = set_cookie.split(|b| *b == b';').next().unwrap_or_default();
    let (name, value) = match pair.iter().position(|b| *b == b'=') {
        Some(at) => (&pair[..at], &pair[at + 1..]),
        None => (&pair[..0], pair),
    };
    if name.trim_ascii().is_empty() {
        value.split(|b| *b == b'=').next().unwrap_or_default()
    } else {
        name
    }
}

/// Drops the upstream's `Set-Cookie` for the proxy's own cookie names: a stray chunk
/// would be joined into the session (which then fails to open: the user is signed
/// out), and the upstream must not set or clear the login's CSRF cookie.
fn strip_own_set_cookies(headers: &mut HeaderMap, name: &str) {
    if !headers.contains_key(SET_COOKIE) {
        return;
    }
    let all: Vec<HeaderValue> = headers.get_all(SET_COOKIE).iter().cloned().collect();
    headers.remove(SET_COOKIE);
    for value in all {
        // Bytes, not text: a value with non-ASCII bytes after the name must not slip by.
        let sent_as = returned_name(value.as_bytes());
        if is_own_cookie(sent_as, name) {
            let cookie = String::from_utf8_lossy(sent_as);
            tracing::warn!(cookie = %cookie.trim(), "dropped the upstream's Set-Cookie for one of the proxy's own cookies");
        } else {
            headers.append(SET_COOKIE, value);
        }
    }
}

/// The token of an `Authorization: Bearer` header.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// A request with a bearer token and no session: verified, authorized, proxied.
async fn bearer(
    app: &App,
    parts: http::request::Parts,
    body: Incoming,
    forward: Forward<'_>,
    client: &ClientConnection,
    token: &str,
) -> Response<Body> {
    match bearer_session(app, token).await {
        Ok(session) => proxy(app, parts, body, forward, client, Some(&session)).await,
        Err(refused) => refused,
    }
}

/// The session a bearer JWT stands for, verified and authorized; otherwise the
/// answer (401, 403, or 503 while its issuer is not discovered) that says why not.
async fn bearer_session(app: &App, token: &str) -> Result<Session, Response<Body>> {
    let Some(verifier) = app.bearer.as_ref() else {
        app.metrics.refused("bearer_disabled");
        return Err(text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: bearer tokens are not accepted here",
        ));
    };
    let identity = match verifier.verify(token).await {
        Ok(identity) => identity,
        Err(Refusal::Invalid(why)) => {
            app.metrics.refused("bearer_invalid");
            return Err(text(
                StatusCode::UNAUTHORIZED,
                format!("unauthorized: bearer token {why}"),
            ));
        }
        // Its issuer did not answer discovery yet (a partner's identity provider down):
        // worth trying again, unlike an invalid token.
        Err(Refusal::Pending(why)) => {
            app.metrics.refused("bearer_pending");
            let mut answer = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("service unavailable: {why}"),
            );
            answer
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("30"));
            return Err(answer);
        }
    };
    // Bearer sessions live for one request and are never signed out.
    let session = to_session(identity, now(), 0, app.config.pass_access_token);
    if let Some(refused) = app.authorized(&session).await {
        return Err(refused.response(&app.metrics));
    }
    Ok(session)
}

/// Browsers go to the login; API clients get 401.
fn unauthenticated(parts: &http::request::Parts) -> Response<Body> {
    let wants_html = parts
        .headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if wants_html && matches!(parts.method, Method::GET | Method::HEAD) {
        let rd = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let target: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("rd", rd)
            .finish();
        return redirect(&format!("/oauth2/start?{target}"));
    }
    text(StatusCode::UNAUTHORIZED, "unauthorized: sign in at /oauth2/start")
}

/// The path a request goes upstream with.
#[derive(Clone, Copy)]
enum Forward<'a> {
    /// The normalized path, which a decision rests on: a skip-auth rule matched it, or
    /// the upstream URL's path selects requests by it. Sending the path as received
    /// instead would let the upstream resolve `/admin//../public`, public to the rule,
    /// into `/admin/public`.
    Normalized(&'a str),
    /// The path as the client sent it, for an authenticated request to an upstream URL
    /// without a path: nothing is decided on it, and applications read their own
    /// spellings, as behind oauth2-proxy or nginx (`%2F` in RabbitMQ's and GitLab's API
    /// paths, Java's `;jsessionid=`, `//` inside imgproxy's URLs).
    AsReceived,
}

/// Forwards to the upstream: hop-by-hop headers removed, X-Forwarded-* set by us,
/// the identity set last, the body streamed both ways; WebSocket upgrades spliced.
async fn proxy(
    app: &App,
    mut parts: http::request::Parts,
    body: Incoming,
    forward: Forward<'_>,
    client: &ClientConnection,
    session: Option<&Session>,
) -> Response<Body> {
    let upgrade = parts
        .headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let client_upgrade =
        upgrade.then(|| hyper::upgrade::on(Request::from_parts(parts.clone_without_body(), ())));
    let path = match forward {
        Forward::Normalized(n) if !app.upstream_base.serves(n) => {
            return text(StatusCode::NOT_FOUND, "not found: no upstream serves this path");
        }
        Forward::Normalized(n) => n,
        Forward::AsReceived => parts.uri.path(),
    };
    let uri = match UpstreamBase::uri(path, parts.uri.query()) {
        Ok(u) => u,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("refused: {e}")),
    };
    let host = parts.headers.get(HOST).cloned();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    // Every line a trusted proxy sent (HAProxy adds a line of its own rather than
    // appending to the client's), in order: keeping only the first would drop the real
    // client and keep what the client claimed. Untrusted clients' lines are gone already.
    let prior: Vec<&str> = parts
        .headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded_for = if prior.is_empty() {
        client.address_value.clone()
    } else {
        HeaderValue::from_str(&format!("{}, {}", prior.join(", "), client.remote.ip())).ok()
    };
    if let Some(v) = forwarded_for {
        parts.headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !parts.headers.contains_key(&X_FORWARDED_PROTO) {
        // The scheme users reach the proxy by, as its redirect URL says, not the one the
        // request came in with: behind a TLS-terminating ingress outside the trusted
        // CIDRs, "http" would send an app that enforces HTTPS (Rails' force_ssl,
        // Django's SECURE_SSL_REDIRECT) into a redirect loop.
        let public = if app.config.redirect_url.scheme() == "https" {
            "https"
        } else {
            "http"
        };
        parts
            .headers
            .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(public));
    }
    if let Some(h) = host
        && !parts.headers.contains_key(&X_FORWARDED_HOST)
    {
        parts.headers.insert(X_FORWARDED_HOST.clone(), h);
    }
    // The session (sealed tokens) and CSRF cookies stay with the proxy.
    strip_own_cookies(&mut parts.headers, &app.config.cookie_name);
    // What is left of the client's headers, copied off the connection's read buffer;
    // the values set below are the proxy's own already (shared, not copied).
    headers::own_values(&mut parts.headers);
    // An upstream behind name-based virtual hosting (another ingress, a PaaS, a CDN)
    // knows itself by its own name, not the public one (still in X-Forwarded-Host).
    // An HTTP/1.0 client may have sent none; HTTP/1.1 requires one.
    if !app.config.pass_host_header || !parts.headers.contains_key(HOST) {
        parts.headers.insert(HOST, app.upstream_base.host.clone());
    }
    if let Some(session) = session {
        // The upstream trusts these: set after every client variant was removed.
        if let Err(e) = identity_values(app, session).set_forwarded(&mut parts.headers) {
            return text(StatusCode::FORBIDDEN, format!("forbidden: {e}"));
        }
    }
    parts.uri = uri;
    let again = Replay::of(&parts, &body, upgrade);
    // The timeout runs from the end of the request body (an upload may take long) to
    // the response headers (a streamed answer or a WebSocket may then last), as Go's
    // ResponseHeaderTimeout does for oauth2-proxy. Without a body (most requests) it
    // starts now, and nothing needs to watch the body.
    let (request, body_sent) = if http_body::Body::is_end_stream(&body) {
        (Request::from_parts(parts, empty_body()), None)
    } else {
        let (sent, body_sent) = tokio::sync::oneshot::channel();
        let body = SignalsEnd::new(body.map_err(|e| Box::new(e) as BoxError), sent);
        (Request::from_parts(parts, body.boxed_unsync()), Some(body_sent))
    };
    let started = std::time::Instant::now();
    let pending = client.send(request);
    tokio::pin!(pending);
    let answered = match body_sent {
        None => tokio::time::timeout(app.config.upstream_timeout, &mut pending).await,
        Some(body_sent) => tokio::select! {
            biased;
            answer = &mut pending => Ok(answer),
            _ = body_sent => tokio::time::timeout(app.config.upstream_timeout, &mut pending).await,
        },
    };
    let answered = match (answered, again) {
        // A connection the upstream closed or reset before any byte of an answer: mostly
        // a kept-alive one whose idle timeout (shorter than ours) fired just as the
        // request went out, so the application never saw it. Sent once more on another
        // connection, as Go's transport does for oauth2-proxy. A fresh connection that
        // fails so is retried too (Go retries only reused ones), as nginx's
        // `proxy_next_upstream error` does.
        (Ok(Err(e)), Some(again)) if e.closed_before_answering() => {
            tracing::debug!(error = %e, "upstream closed the connection unanswered; sending again");
            // A request without a body started its timeout when it was sent.
            let deadline = tokio::time::Instant::from_std(started) + app.config.upstream_timeout;
            tokio::time::timeout_at(deadline, client.send(again.request())).await
        }
        (answered, _) => answered,
    };
    let mut response = match answered {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            // The chain says why (refused, TLS verification, ...); the top error does not.
            tracing::warn!(error = %e, "upstream request failed");
            app.metrics.refused("upstream_error");
            return text(StatusCode::BAD_GATEWAY, "the upstream is not reachable");
        }
        Err(_) => {
            tracing::warn!(timeout = ?app.config.upstream_timeout, "the upstream did not answer in time");
            app.metrics.refused("upstream_timeout");
            return text(StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time");
        }
    };
    app.metrics
        .upstream_seconds
        .observe(started.elapsed().as_secs_f64());
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match (client_upgrade.await, upstream_upgrade.await) {
                (Ok(client), Ok(upstream)) => {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream))
                            .await;
                }
                (c, u) => tracing::debug!(
                    client = c.is_ok(),
                    upstream = u.is_ok(),
                    "websocket upgrade failed"
                ),
            }
        });
    } else {
        headers::strip_hop_by_hop(response.headers_mut(), false);
    }
    strip_own_set_cookies(response.headers_mut(), &app.config.cookie_name);
    response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync())
}

/// A body with nothing in it (boxing it allocates nothing: it has no size).
fn empty_body() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// What it takes to send a request again: only for methods without side effects
/// (RFC 9110 9.2.2: GET, HEAD, OPTIONS, TRACE, as Go's transport) and without a body,
/// so nothing the client sent is held back or replayed.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    fn of(parts: &http::request::Parts, body: &Incoming, upgrade: bool) -> Option<Self> {
        let safe = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        (safe && !upgrade && http_body::Body::is_end_stream(body)).then(|| Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        })
    }

    fn request(self) -> Request<Body> {
        let mut request = Request::new(empty_body());
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        request
    }
}

/// A request body that says when it has all been sent: `sent` fires once its last
/// frame (or an error) has been read, or at once for a body that is empty.
struct SignalsEnd<B> {
    inner: B,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<B: http_body::Body> SignalsEnd<B> {
    fn new(inner: B, sent: tokio::sync::oneshot::Sender<()>) -> Self {
        let mut body = Self {
            inner,
            sent: Some(sent),
        };
        // The client never polls a body that is already at its end (a GET).
        if body.inner.is_end_stream() {
            body.signal();
        }
        body
    }

    fn signal(&mut self) {
        if let Some(sent) = self.sent.take() {
            let _ = sent.send(());
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for SignalsEnd<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            std::task::Poll::Ready(None | Some(Err(_))) => true,
            std::task::Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            std::task::Poll::Pending => false,
        };
        if ended {
            this.signal();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Only what `hyper::upgrade::on` needs from the request: its extensions.
trait CloneWithoutBody {
    fn clone_without_body(&mut self) -> http::request::Parts;
}

impl CloneWithoutBody for http::request::Parts {
    fn clone_without_body(&mut self) -> http::request::Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        // The pending upgrade lives in the extensions; moving them hands it over.
        parts.extensions = std::mem::take(&mut self.extensions);
        parts
    }
}

#[derive(Deserialize, Default)]
struct OAuthQuery {
    rd: Option<String>,
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Serialize)]
struct UserInfo<'a> {
    user: &'a str,
    email: Option<&'a str>,
    groups: &'a [String],
    #[serde(rename = "preferredUsername")]
    preferred_username: Option<&'a str>,
}

async fn own_routes(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let query = warp::query::<OAuthQuery>()
        .or(warp::any().map(OAuthQuery::default))
        .unify();
    let raw_query = warp::query::raw().or(warp::any().map(String::new)).unify();
    let routes = warp::path!("ping")
        .map(|| warp::reply::with_status(String::from("OK"), StatusCode::OK).into_response())
        .or(warp::path!("ready").and(with_app.clone()).map(|app: Arc<App>| {
            if app.provider.initialized() {
                warp::reply::with_status(String::from("OK"), StatusCode::OK).into_response()
            } else {
                warp::reply::with_status(
                    String::from("the issuer has not been discovered yet"),
                    StatusCode::SERVICE_UNAVAILABLE,
                )
                .into_response()
            }
        }))
        .unify()
        .or(warp::path("oauth2")
            .and(warp::path::param::<String>())
            .and(warp::path::end())
            .and(warp::method())
            .and(warp::header::headers_cloned())
            .and(query)
            .and(raw_query)
            .and(with_app)
            .then(
                |endpoint, method, headers, query, raw_query, app| -> RouteFuture {
                    // Boxed as `Send` here, where the compiler can prove it.
                    Box::pin(oauth2_route(endpoint, method, headers, query, raw_query, app))
                },
            ))
        .unify();
    let mut service = warp::service(routes);
    match tower_service::Service::call(&mut service, req).await {
        Ok(response) => response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
        Err(never) => match never {},
    }
}

use warp::Reply as _;

type RouteFuture = std::pin::Pin<Box<dyn std::future::Future<Output = warp::reply::Response> + Send>>;

async fn oauth2_route(
    endpoint: String,
    method: Method,
    headers: HeaderMap,
    query: OAuthQuery,
    raw_query: String,
    app: Arc<App>,
) -> warp::reply::Response {
    let response = match (endpoint.as_str(), method) {
        // `sign_in` as oauth2-proxy names it in its nginx setup (`error_page 401 =
        // /oauth2/sign_in`); there is no page of buttons here, so it starts the login.
        ("start" | "sign_in", Method::GET) => start(&app, &headers, query).await,
        ("callback", Method::GET) => callback(&app, &headers, query).await,
        ("sign_out", Method::GET | Method::POST) => sign_out(&app, &headers, query).await,
        ("userinfo", Method::GET) => userinfo(&app, &headers).await,
        // Any method, as oauth2-proxy: an Envoy ext_authz check forwards the original
        // request's method (a POST to the app is a POST here).
        ("auth", _) => auth(&app, &headers, &RouteRules::from_query(&raw_query)).await,
        (_, _) => text(StatusCode::NOT_FOUND, "not found"),
    };
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    warp::reply::Response::from_parts(parts, bytes.into())
}

async fn start(app: &App, headers: &HeaderMap, query: OAuthQuery) -> Response<Body> {
    let Some(provider) = app.provider.get() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the issuer has not been discovered yet",
        );
    };
    let wanted = query
        .rd
        .or_else(|| {
            headers
                .get(X_AUTH_REQUEST_REDIRECT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "/".into());
    let mut target = app.redirects.validate(&wanted);
    // The target travels sealed in the login cookie (at most 4096 bytes with its
    // attributes): a longer one lands on `/` rather than failing the login.
    if target.len() > MAX_LOGIN_TARGET {
        target = "/".into();
    }
    let (url, attempt) = provider.start(target).await;
    let sealed = match app.sealer.seal(&app.csrf_cookie(), &attempt, now()) {
        Ok(s) => s,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot start a login: {e}"),
            );
        }
    };
    let mut response = redirect(url.as_str());
    // The CSRF cookie must come back on the IdP's top-level redirect: Lax at most.
    let mut options = app.cookie_options(Some(LOGIN_WINDOW));
    if options.same_site == session::SameSite::Strict {
        options.same_site = session::SameSite::Lax;
    }
    match session::set_cookie(&app.csrf_cookie(), &sealed, &options) {
        Ok(c) => {
            if let Ok(v) = HeaderValue::from_str(&c) {
                response.headers_mut().append(SET_COOKIE, v);
            }
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot start a login: {e}"),
        ),
    }
}

/// The longest return target a login keeps: sealed (base64 of about 180 bytes plus
/// the target) it fits the CSRF cookie's 4096 bytes with room to spare.
const MAX_LOGIN_TARGET: usize = 2048;

/// Error codes of RFC 6749 4.1.2.1 and OpenID Connect Core 3.1.2.6.
const REGISTERED_ERRORS: [&str; 16] = [
    "invalid_request",
    "unauthorized_client",
    "access_denied",
    "unsupported_response_type",
    "invalid_scope",
    "server_error",
    "temporarily_unavailable",
    "interaction_required",
    "login_required",
    "account_selection_required",
    "consent_required",
    "invalid_request_uri",
    "invalid_request_object",
    "request_not_supported",
    "request_uri_not_supported",
    "registration_not_supported",
];

/// The issuer's `error` as the callback may show it. Anyone can send a browser to the
/// callback, so unless the request answers this browser's login only a registered
/// code is echoed (a free-form "code" is someone's sentence on the application's
/// origin); an issuer's own code in the browser's own login is shown when it keeps
/// to RFC 6749's charset (4.1.2.1: printable ASCII without `"` and `\`) and a code's
/// length.
fn shown_error_code(error: &str, answers_this_login: bool) -> &str {
    let registered = REGISTERED_ERRORS.contains(&error);
    let valid = (1..=64).contains(&error.len())
        && error
            .bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e));
    if registered || (answers_this_login && valid) {
        error
    } else {
        "(an error code that is not shown here)"
    }
}

async fn callback(app: &App, headers: &HeaderMap, query: OAuthQuery) -> Response<Body> {
    let Some(provider) = app.provider.get() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the issuer has not been discovered yet",
        );
    };
    if let Some(error) = query.error {
        app.metrics.refused("issuer_error");
        // RFC 6749 4.1.2.1: the issuer's own description, as text, and a way back in.
        // Only to the browser whose login the issuer answers (its CSRF cookie holds the
        // state): anyone can link to the callback, and a forged description would be
        // their sentence on the application's own origin.
        let answers_this_login = query.state.as_deref().is_some_and(|state| {
            cookies(headers)
                .get(&app.csrf_cookie())
                .and_then(|sealed| {
                    app.sealer
                        .open::<LoginAttempt>(&app.csrf_cookie(), sealed, now(), LOGIN_WINDOW)
                        .ok()
                })
                .is_some_and(|attempt| {
                    bool::from(subtle::ConstantTimeEq::ct_eq(
                        attempt.state.as_bytes(),
                        state.as_bytes(),
                    ))
                })
        });
        let described = query
            .error_description
            .filter(|d| answers_this_login && !d.is_empty())
            .map(|d| {
                format!(
                    " ({})",
                    d.chars()
                        .filter(|c| !c.is_control())
                        .take(300)
                        .collect::<String>()
                )
            })
            .unwrap_or_default();
        let error = shown_error_code(&error, answers_this_login);
        let status = match error {
            "temporarily_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "server_error" => StatusCode::BAD_GATEWAY,
            _ => StatusCode::FORBIDDEN,
        };
        return text(
            status,
            format!("the issuer refused the login: {error}{described}; sign in again at /oauth2/start"),
        );
    }
    let (Some(code), Some(state)) = (query.code, query.state) else {
        return text(StatusCode::BAD_REQUEST, "the callback needs code and state");
    };
    // A callback this browser cannot complete (a tab restored with an old login, the
    // back button to the issuer's page, another tab's login finished first) in a
    // browser already signed in goes on to the app: nothing of the callback is used.
    // Without a session it is refused, as a login CSRF would be.
    let refuse = |reason: &'static str, why: &'static str, to: &str| {
        let to = app.redirects.validate(to);
        async move {
            if app.session(headers).await.is_some() {
                return redirect(&to);
            }
            app.metrics.refused(reason);
            text(StatusCode::FORBIDDEN, why)
        }
    };
    let jar = cookies(headers);
    let Some(sealed) = jar.get(&app.csrf_cookie()) else {
        return refuse(
            "csrf",
            "forbidden: no login is in progress in this browser (CSRF cookie missing)",
            "/",
        )
        .await;
    };
    let attempt: LoginAttempt = match app.sealer.open(&app.csrf_cookie(), sealed, now(), LOGIN_WINDOW) {
        Ok(a) => a,
        Err(_) => {
            return refuse("csrf", "forbidden: the login attempt is invalid or expired", "/").await;
        }
    };
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        attempt.state.as_bytes(),
        state.as_bytes(),
    )) {
        return refuse(
            "csrf",
            "forbidden: state does not match this browser's login (CSRF)",
            &attempt.redirect,
        )
        .await;
    }
    {
        let mut used = app.used_states.lock().await;
        if !used.redeem(&state, now()) {
            drop(used);
            return refuse(
                "replay",
                "forbidden: this login callback was already used",
                &attempt.redirect,
            )
            .await;
        }
    }
    let identity = match provider.finish(code, &attempt).await {
        Ok(i) => i,
        Err(e) => {
            tracing::info!(error = %e, "login failed");
            app.metrics.refused("login_failed");
            // A failed token request names the issuer's internal address and the OS
            // error: that stays in the log. ID token checks say what was wrong.
            let why = match e {
                crate::oidc::Error::Token(_) => "the login could not be completed at the issuer".to_string(),
                other => other.to_string(),
            };
            return text(StatusCode::FORBIDDEN, format!("forbidden: {why}"));
        }
    };
    let session = to_session(
        identity,
        now(),
        session::new_login(),
        app.config.pass_access_token,
    );
    if let Some(refused) = app.authorized(&session).await {
        return refused.response(&app.metrics);
    }
    let target = app.redirects.validate(&attempt.redirect);
    let mut response = if app.config.cookie_samesite == SameSite::Strict {
        same_site_hop(&target)
    } else {
        redirect(&target)
    };
    // A new login replaces whatever session cookies the browser still holds, all chunks.
    let mut set = match app.login_cookies(&session, headers) {
        Ok(s) => s,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the session: {e}"),
            );
        }
    };
    set.push(session::clear_cookie(
        &app.csrf_cookie(),
        &app.cookie_options(None),
    ));
    for c in set {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(SET_COOKIE, v);
        }
    }
    app.metrics.logins.inc();
    response
}

async fn sign_out(app: &App, headers: &HeaderMap, query: OAuthQuery) -> Response<Body> {
    if started_elsewhere(headers) {
        return confirm_sign_out(query.rd.as_deref());
    }
    let session = app.session(headers).await;
    if let Some(s) = &session {
        app.revoked
            .lock()
            .await
            .insert(session_id(s), now(), app.config.cookie_expire.as_secs());
        // Its tokens need not stay in memory either.
        app.opened.forget(s);
        revoke_refresh_tokens(app, s).await;
    }
    let target = app.redirects.validate(query.rd.as_deref().unwrap_or("/"));
    let end_session = app
        .provider
        .get()
        .and_then(|p| p.end_session_endpoint())
        .filter(|_| app.config.provider_sign_out);
    // Also without a session that opens here (its cookie expired, revoked, or never
    // sent): the issuer's login may outlive ours, and only the issuer can end it.
    // RP-Initiated Logout takes `client_id` alone; the issuer may then ask the user.
    let to = match end_session {
        Some(end) => {
            let mut url = end.clone();
            {
                let mut pairs = url.query_pairs_mut();
                if let Some(hint) = session.as_ref().and_then(|s| s.id_token.as_deref()) {
                    pairs.append_pair("id_token_hint", hint);
                }
                pairs.append_pair("client_id", &app.config.client_id);
                // Back to `rd` after the issuer's page. Only when one is asked for: the
                // issuer refuses a URI not registered for the client, and a plain
                // sign-out must not end on an error page.
                if query.rd.is_some()
                    && let Ok(back) = app.config.redirect_url.join(&target)
                {
                    pairs.append_pair("post_logout_redirect_uri", back.as_str());
                }
            }
            url.to_string()
        }
        None => target,
    };
    let mut response = redirect(&to);
    for c in app.clear_session_cookies(headers) {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(SET_COOKIE, v);
        }
    }
    response
}

/// How long a sign-out waits, all in all, for the issuer to revoke the session's
/// refresh tokens.
const REVOCATION_WAIT: Duration = Duration::from_secs(3);

/// Revokes the signed-out session's refresh tokens at the issuer (the cookie's, and a
/// newer one a refresh got and may not have handed on yet). The revocation list above
/// is this replica's alone: on the others a copied cookie opens until its tokens are
/// due for a refresh, which the issuer now refuses, so it ends with its access token.
async fn revoke_refresh_tokens(app: &App, session: &Session) {
    let Some(provider) = app.provider.get().filter(|p| p.revocation_endpoint().is_some()) else {
        return;
    };
    let deadline = tokio::time::Instant::now() + REVOCATION_WAIT;
    let counted = (&app.metrics.revocations, &app.metrics.revocation_failures);
    // The cookie's own first: a slow refresh below must not take its time.
    if let Some(token) = &session.refresh_token {
        revoke(provider, counted, token, Some(deadline)).await;
    }
    let slot = app.refreshing.lock().await.get(&session_id(session)).cloned();
    // A refresh still running holds its slot until the issuer answers: wait for its
    // session. Taken out of the slot: whichever of this and the refresh (see `refresh`)
    // takes it revokes its token, once.
    let newer = match slot {
        Some(slot) => tokio::time::timeout_at(deadline, slot.lock())
            .await
            .ok()
            .and_then(|mut last| last.as_mut().and_then(|l| l.session.take()))
            .and_then(|s| s.refresh_token.clone()),
        None => None,
    };
    if let Some(token) = newer.filter(|t| session.refresh_token.as_ref() != Some(t)) {
        revoke(provider, counted, &token, Some(deadline)).await;
    }
}

/// Revokes one refresh token, by `deadline` when given, and counts the outcome in
/// `counted` (revoked, failed).
async fn revoke(
    provider: &Provider,
    counted: (&Counter, &Counter),
    token: &str,
    deadline: Option<tokio::time::Instant>,
) {
    let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + REVOCATION_WAIT);
    match tokio::time::timeout_at(deadline, provider.revoke_refresh_token(token)).await {
        Ok(Ok(true)) => {
            counted.0.inc();
        }
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            counted.1.inc();
            tracing::warn!(error = %e, "the issuer did not revoke a signed-out session's refresh token");
        }
        Err(_) => {
            counted.1.inc();
            tracing::warn!(
                "the issuer did not answer the revocation of a signed-out session's refresh token in time"
            );
        }
    }
}

/// A cookie session for `/oauth2/userinfo` and `/oauth2/auth`: refreshed when due
/// (and whether it was), or the 401 of an ended session or the 403 of a refused user.
async fn still_allowed(
    app: &App,
    session: Arc<Session>,
) -> Result<(Arc<Session>, Option<Refreshed>), Response<Body>> {
    let Some((session, refreshed)) = app.maybe_refresh(session).await else {
        app.metrics.refused("refresh_failed");
        return Err(text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: the session has ended",
        ));
    };
    if let Some(refused) = app.authorized(&session).await {
        return Err(refused.response(&app.metrics));
    }
    Ok((session, refreshed))
}

async fn userinfo(app: &App, headers: &HeaderMap) -> Response<Body> {
    let Some(s) = app.session(headers).await else {
        return text(StatusCode::UNAUTHORIZED, "unauthorized");
    };
    // The same session rules as proxied routes: an ended session and a refused user
    // get no identity here either.
    let (s, refreshed) = match still_allowed(app, s).await {
        Ok(checked) => checked,
        Err(refused) => return refused,
    };
    let info = UserInfo {
        user: &s.user,
        email: verified_email(&s),
        groups: &s.groups,
        preferred_username: s.preferred_username.as_deref(),
    };
    let mut response = full(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(&info).unwrap_or_default(),
    );
    if let Some(refreshed) = refreshed {
        app.write_refreshed(&mut response, &s, app.chunks_in(headers), refreshed, false)
            .await;
    }
    response
}

/// For ingress `auth_request`: 202 with X-Auth-Request-* headers, or 401/403. A
/// session due for refresh is refreshed as on proxied requests (its new cookies in
/// Set-Cookie, for the ingress to pass on, as with oauth2-proxy), so the access
/// token handed on does not go stale and a refresh the issuer refuses ends it.
async fn auth(app: &App, headers: &HeaderMap, rules: &RouteRules) -> Response<Body> {
    let Some(s) = app.session(headers).await else {
        // API clients behind an ingress in auth_request mode, as on proxied routes.
        let Some(token) = bearer_token(headers) else {
            return text(StatusCode::UNAUTHORIZED, "unauthorized");
        };
        return match bearer_session(app, &token).await {
            Ok(session) => accepted(app, &session, rules),
            Err(refused) => refused,
        };
    };
    let (s, refreshed) = match still_allowed(app, s).await {
        Ok(checked) => checked,
        Err(refused) => return refused,
    };
    let mut response = accepted(app, &s, rules);
    if let Some(refreshed) = refreshed
        && response.status() == StatusCode::ACCEPTED
    {
        app.write_refreshed(&mut response, &s, app.chunks_in(headers), refreshed, true)
            .await;
    }
    response
}

/// `/oauth2/auth`'s 202 with the identity in `X-Auth-Request-*`.
fn accepted(app: &App, session: &Session, rules: &RouteRules) -> Response<Body> {
    // 403, not 401: an ingress sends a 401 to the login, which would loop.
    if let Some(why) = rules.refuse(session) {
        if rules.invalid.is_some() && app.route_warning_due(now()) {
            // The ingress's configuration, not the user: whoever runs it reads this log,
            // once a minute rather than once per request.
            tracing::warn!(%why, "an ingress asked /oauth2/auth with rules that let nobody in");
        }
        app.metrics.refused("route_rules");
        return text(StatusCode::FORBIDDEN, format!("forbidden: {why}"));
    }
    let mut response = text(StatusCode::ACCEPTED, "authenticated");
    if let Err(e) = identity_values(app, session).set_auth_request(response.headers_mut()) {
        return text(StatusCode::FORBIDDEN, format!("forbidden: {e}"));
    }
    response
}

/// Fails when something already listens on `address`: `SO_REUSEPORT` would otherwise
/// let a second proxy of the same user join the first one's port without a word, and
/// the kernel would split the connections between two configurations. A plain bind
/// (with `SO_REUSEADDR`, so a restart beside old TIME_WAIT connections still works)
/// fails on a port with a listener. Port 0 asks the kernel for any free port: no check.
pub fn port_is_free(address: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    if address.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into()).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {address}: {e} (another process listens there)"),
        )
    })
}

/// A listening socket with `SO_REUSEPORT`, so that each serving thread accepts on a
/// socket of its own and the kernel spreads new connections over them (as nginx's
/// `reuseport` and HAProxy's threads do). Linux lets only the same user join the group.
pub fn reuse_port_listener(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Serves the proxy until `shutdown` resolves, then drains (see [`DRAIN_TIMEOUT`]).
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let idle = app.config.idle_timeout;
    let thread = SERVING_THREAD.with(std::cell::Cell::get);
    let upstream = app.upstream.clone();
    // Stopped when serving stops, however it stops (the guard aborts it when dropped).
    let _closing = AbortOnDrop(tokio::spawn(async move {
        let mut every = tokio::time::interval(crate::upstream::IDLE_FOR / 3);
        loop {
            every.tick().await;
            upstream.close_stale(thread);
        }
    }));
    let connected = move |remote| {
        let app = app.clone();
        let client = Arc::new(ClientConnection::new(app.upstream.clone(), remote, thread));
        move |req| handle(app.clone(), req, client.clone())
    };
    accept(listener, shutdown, connected, idle, DRAIN_TIMEOUT).await;
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `GET /metrics` (OpenMetrics text) on the metrics address, for good.
pub async fn serve_metrics(app: Arc<App>, listener: tokio::net::TcpListener) {
    let handler = move |req: Request<Incoming>| {
        let response = if req.uri().path() != "/metrics" {
            text(StatusCode::NOT_FOUND, "not found")
        } else if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "use GET");
            refused
                .headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            refused
        } else {
            // prometheus-client writes the OpenMetrics text format.
            full(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                app.metrics.encode(),
            )
        };
        std::future::ready(response)
    };
    accept(
        listener,
        std::future::pending(),
        move |_| handler.clone(),
        HEADER_READ_TIMEOUT,
        DRAIN_TIMEOUT,
    )
    .await;
}

/// How long a client of `/metrics` may take to send a request's headers, and how long
/// a kept-alive connection may sit idle before its next request (the proxy's own port
/// uses `idle-timeout`): without it a client could hold connections (and their
/// buffers) open for good by sending nothing (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection's read buffer at most, so its request head too (larger heads get 431):
/// room for a session split over 16 cookies of 3800 bytes and the rest of a browser's
/// headers, and a third of hyper's default, which a client that sends a slow head
/// could make every connection hold.
pub const MAX_BUFFER: usize = 128 * 1024;

/// How long requests in flight may take to finish once shutdown begins (SIGTERM),
/// within the 30 s Kubernetes grants a pod by default before it kills it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Accepts connections until `shutdown` resolves and answers each request with the
/// handler `connected` makes for its connection (from the peer's address). HTTP/1.1
/// only (WebSocket upgrades included), like oauth2-proxy, which offers HTTP/2 only
/// over TLS; ingress controllers speak HTTP/1.1 to their backends
/// unless told otherwise.
///
/// Then it drains, as Go's `http.Server.Shutdown` (oauth2-proxy) does: the socket is
/// closed so new connections are refused, idle connections are closed, and each
/// request in flight gets its answer (with `Connection: close`) before its connection
/// closes; after `drain_timeout` the rest are dropped. Upgraded connections
/// (WebSockets) are not waited for.
async fn accept<C, H, F>(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    connected: C,
    header_read_timeout: Duration,
    drain_timeout: Duration,
) where
    C: Fn(SocketAddr) -> H,
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    tokio::pin!(shutdown);
    let (drain, draining) = tokio::sync::watch::channel(false);
    // Every connection task holds a sender: `recv` returns `None` once all have ended.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let handler = connected(remote);
        let (open, mut draining) = (open.clone(), draining.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            // hyper enforces the header timeout only when it has a timer.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(MAX_BUFFER)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = async {
                    // The guard `wait_for` returns must not live across the await below.
                    let _ = draining.wait_for(|d| *d).await;
                } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(open);
        });
    }
    drop(listener);
    drop(open);
    let _ = drain.send(true);
    if tokio::time::timeout(drain_timeout, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?drain_timeout,
            "requests still in flight when the drain timeout ended; closing them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts `accept` with a handler that answers after `delay`; returns the address,
    /// the trigger of the shutdown and the server's task.
    async fn slow_server(
        delay: Duration,
        drain_timeout: Duration,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = move |_| {
            move |_req: Request<Incoming>| async move {
                tokio::time::sleep(delay).await;
                text(StatusCode::OK, "answered")
            }
        };
        let shutdown = async move {
            let _ = stopped.await;
        };
        let server = tokio::spawn(accept(
            listener,
            shutdown,
            handler,
            HEADER_READ_TIMEOUT,
            drain_timeout,
        ));
        (address, stop, server)
    }

    async fn send_get(address: SocketAddr) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
            .await
            .expect("send");
        stream
    }

    #[tokio::test]
    async fn shutdown_answers_the_requests_in_flight_and_refuses_new_connections() {
        use tokio::io::AsyncReadExt;
        let (address, stop, server) = slow_server(Duration::from_millis(500), DRAIN_TIMEOUT).await;
        let mut in_flight = send_get(address).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), in_flight.read_to_string(&mut answer))
            .await
            .expect("the connection closes after its answer")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.trim_end().ends_with("answered"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server ends once its connections are closed")
            .expect("server task");
        assert!(
            tokio::net::TcpStream::connect(address).await.is_err(),
            "a draining server accepts no new connection"
        );
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_requests_still_running_after_the_drain_timeout() {
        let (address, stop, server) =
            slow_server(Duration::from_secs(3600), Duration::from_millis(300)).await;
        let _stuck = send_get(address).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the drain ends at its timeout")
            .expect("server task");
    }

    #[test]
    fn a_port_another_process_listens_on_is_refused_before_sharing_it() {
        let other = reuse_port_listener("127.0.0.1:0".parse().expect("address")).expect("a listener");
        let address = other.local_addr().expect("address");
        let err = port_is_free(address).expect_err("the port has a listener");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&address.to_string()), "{err}");
        port_is_free("127.0.0.1:0".parse().expect("address")).expect("any port");
    }

    #[tokio::test]
    async fn serving_threads_share_the_port_and_each_gets_connections() {
        let first = reuse_port_listener("127.0.0.1:0".parse().expect("address")).expect("first socket");
        let address = first.local_addr().expect("address");
        let second = reuse_port_listener(address).expect("a second socket on the same port");
        let listeners = [first, second].map(|l| tokio::net::TcpListener::from_std(l).expect("listener"));
        let mut clients = Vec::new();
        for _ in 0..32 {
            clients.push(tokio::net::TcpStream::connect(address).await.expect("connect"));
        }
        let mut accepted = [0; 2];
        for (count, listener) in accepted.iter_mut().zip(&listeners) {
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await {
                *count += 1;
            }
        }
        assert_eq!(
            accepted.iter().sum::<usize>(),
            32,
            "every connection is accepted once"
        );
        assert!(
            accepted.iter().all(|&n| n > 0),
            "the kernel spreads connections over both: {accepted:?}"
        );
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let handler = |_| |_| std::future::ready(text(StatusCode::OK, "ok"));
        tokio::spawn(accept(
            listener,
            std::future::pending(),
            handler,
            Duration::from_millis(200),
            DRAIN_TIMEOUT,
        ));
        let mut slow = tokio::net::TcpStream::connect(address).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .expect("write");
        // The server gives up on the unfinished head: it answers 408 or just closes.
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the connection was still open after 5 s");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
        // A client that sends its request in time is served.
        let mut quick = tokio::net::TcpStream::connect(address).await.expect("connect");
        quick
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        quick.read_to_end(&mut answer).await.expect("read");
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn the_upstream_cannot_set_or_clear_our_cookies() {
        let mut headers = HeaderMap::new();
        for cookie in [
            "_chassis_oauth_1=junk; Path=/",
            "_chassis_oauth=; Max-Age=0",
            "_chassis_oauth_csrf=x",
            "app=1; HttpOnly",
            "_chassis_oauthx=kept",
            // Nameless: the browser sends the value back alone, as our cookie.
            "=_chassis_oauth_1=junk; Path=/",
            " = _chassis_oauth=someone-elses-session",
            "_chassis_oauth_csrf",
            "=app=2",
        ] {
            headers.append(SET_COOKIE, HeaderValue::from_static(cookie));
        }
        // Not valid UTF-8 after the name: still one of ours.
        headers.append(
            SET_COOKIE,
            HeaderValue::from_bytes(b"_chassis_oauth_2=\xe9").expect("a header value"),
        );
        strip_own_set_cookies(&mut headers, "_chassis_oauth");
        let kept: Vec<&str> = headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(kept, ["app=1; HttpOnly", "_chassis_oauthx=kept", "=app=2"]);
    }

    #[test]
    fn our_cookies_never_reach_the_upstream() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("app=1; _chassis_oauth=sealed; _chassis_oauth_1=more"),
        );
        h.append(
            COOKIE,
            HeaderValue::from_static("_chassis_oauth_csrf=x; theme=dark; _chassis_oauthy=keep"),
        );
        strip_own_cookies(&mut h, "_chassis_oauth");
        let all: Vec<_> = h.get_all(COOKIE).iter().filter_map(|v| v.to_str().ok()).collect();
        assert_eq!(all, ["app=1; theme=dark; _chassis_oauthy=keep"]);
        let mut not_ascii = HeaderMap::new();
        let value = HeaderValue::from_bytes("app=\u{e9}; _chassis_oauth=sealed".as_bytes());
        not_ascii.append(COOKIE, value.expect("UTF-8 is a valid value"));
        not_ascii.append(
            COOKIE,
            HeaderValue::from_bytes(b"raw=\xff; _chassis_oauth_1=more").expect("obs-text is a valid value"),
        );
        strip_own_cookies(&mut not_ascii, "_chassis_oauth");
        assert_eq!(
            not_ascii.get(COOKIE).map(HeaderValue::as_bytes),
            Some(&b"app=\xc3\xa9; raw=\xff"[..]),
            "the application's cookies pass unchanged, whatever their bytes"
        );
        let mut only_ours = HeaderMap::new();
        only_ours.insert(COOKIE, HeaderValue::from_static("_chassis_oauth=sealed"));
        strip_own_cookies(&mut only_ours, "_chassis_oauth");
        assert!(only_ours.get(COOKIE).is_none());
    }

    #[tokio::test]
    async fn the_strict_hop_page_escapes_its_target() {
        let page = same_site_hop("/a?x=1&y=\"><script>");
        let body = page
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("content=\"0;url=/a?x=1&amp;y=&quot;&gt;&lt;script&gt;\""),
            "{body}"
        );
        assert!(!body.contains("<script>"), "{body}");
    }

    #[test]
    fn only_the_proxys_exact_cookie_names_are_its_own() {
        for own in ["session", "session_csrf", "session_1", "session_9", "session_15"] {
            assert!(is_own_cookie(own.as_bytes(), "session"), "{own}");
        }
        // An application's cookies that merely start with the proxy's cookie name.
        for app in [
            "session_id",
            "session_16",
            "session_01",
            "session_+1",
            "session_",
            "sessions",
            "session_1x",
            "session_csrf2",
        ] {
            assert!(!is_own_cookie(app.as_bytes(), "session"), "{app}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("session=s; session_id=42; session_2=t"),
        );
        strip_own_cookies(&mut h, "session");
        assert_eq!(h.get(COOKIE), Some(&HeaderValue::from_static("session_id=42")));
    }

    #[test]
    fn the_upstream_host_header_leaves_out_the_default_port() -> Result<(), String> {
        for (url, host) in [
            ("https://app.example.com/", "app.example.com"),
            ("http://app.example.com:80", "app.example.com"),
            ("http://up:8080/base/", "up:8080"),
        ] {
            let url = url::Url::parse(url).map_err(|e| e.to_string())?;
            assert_eq!(UpstreamBase::new(&url)?.host, host);
        }
        Ok(())
    }

    #[test]
    fn cookies_are_read_from_every_header_and_the_last_of_a_name_counts() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; s=first"));
        h.append(COOKIE, HeaderValue::from_static(" s=second ;b=2"));
        h.append(
            COOKIE,
            HeaderValue::from_bytes(b"raw=\xff; c=3").expect("obs-text is a valid value"),
        );
        let jar = cookies(&h);
        // A pair that is not text is skipped, not the header it came in.
        assert_eq!(
            (jar.get("s"), jar.get("a"), jar.get("b"), jar.get("c")),
            (Some("second"), Some("1"), Some("2"), Some("3"))
        );
        assert!(!jar.contains_key("raw"));
        assert_eq!(jar.names().len(), 4);
    }

    #[test]
    fn redeemed_states_are_single_use_expire_and_stay_bounded_under_a_flood() {
        let mut used = UsedStates::default();
        assert!(used.redeem("s1", 100));
        assert!(!used.redeem("s1", 101), "a replay is refused");
        assert!(!used.redeem("s1", 100 + LOGIN_WINDOW - 1));
        assert!(
            used.redeem("s1", 100 + LOGIN_WINDOW),
            "forgotten once its login expired"
        );
        // Callbacks anyone can send: memory stays bounded and recent states still count.
        for i in 0..USED_STATES_MAX + 100 {
            used.redeem(&format!("flood-{i}"), 200);
        }
        assert!(used.order.len() <= USED_STATES_MAX && used.known.len() == used.order.len());
        assert!(!used.redeem(&format!("flood-{}", USED_STATES_MAX + 99), 201));
    }

    #[test]
    fn an_email_with_two_at_signs_is_refused_by_a_domain_rule() {
        let corp = vec!["corp.com".to_string()];
        assert!(email_domain_allowed("alice@corp.com", &corp));
        assert!(
            email_domain_allowed("alice@CORP.com", &corp),
            "domains compare without case"
        );
        assert!(!email_domain_allowed("a@evil.com@corp.com", &corp));
        assert!(!email_domain_allowed("alice@evilcorp.com", &corp));
        assert!(
            !email_domain_allowed("alice@sub.corp.com", &corp),
            "exact domain only"
        );
        assert!(!email_domain_allowed("@corp.com", &corp));
        assert!(!email_domain_allowed("alice", &corp));
        assert!(email_domain_allowed("bob@anything.org", &["*".to_string()]));
    }

    #[test]
    fn a_leading_dot_or_star_dot_allows_subdomains_only() {
        for rule in [".corp.com", "*.corp.com"] {
            let rule = vec![rule.to_string()];
            assert!(email_domain_allowed("alice@eu.corp.com", &rule), "{rule:?}");
            assert!(email_domain_allowed("alice@a.b.CORP.com", &rule), "{rule:?}");
            for refused in [
                "alice@corp.com",
                "alice@evilcorp.com",
                "alice@.corp.com",
                "alice@corp.com.evil.org",
                "a@evil.com@eu.corp.com",
            ] {
                assert!(!email_domain_allowed(refused, &rule), "{refused} by {rule:?}");
            }
        }
    }

    #[test]
    fn the_upstream_path_selects_requests_and_is_not_prepended() {
        // As with oauth2-proxy: `--upstream http://grafana:3000/grafana/` serves
        // `/grafana/...` as it is (Grafana under a sub-path), not `/grafana/grafana/...`.
        let cases = [
            ("http://up", "/a", None, Some("http://up:80/a")),
            ("http://up/", "/a", Some("x=1"), Some("http://up:80/a?x=1")),
            (
                "https://up/base/",
                "/base/a/b",
                None,
                Some("https://up:443/base/a/b"),
            ),
            (
                "http://up:8080/base",
                "/base",
                Some("q"),
                Some("http://up:8080/base?q"),
            ),
            ("http://up/base/", "/a/b", None, None),
            ("http://up/base", "/basement", None, None),
            // Compared as normalized, like the request's path.
            (
                "http://up/%7euser/",
                "/~user/x",
                None,
                Some("http://up:80/~user/x"),
            ),
            (
                "http://[::1]:8080/?ignored=1",
                "/a",
                None,
                Some("http://[::1]:8080/a"),
            ),
        ];
        for (upstream, path, query, want) in cases {
            let url = url::Url::parse(upstream).expect("a valid URL");
            let base = UpstreamBase::new(&url).expect("has a host");
            // Connections go to the address; the request line carries the origin form.
            let address = base.address().expect("a valid address").to_string();
            let got = base.serves(path).then(|| {
                let origin = UpstreamBase::uri(path, query).expect("a valid URI").to_string();
                format!("{}{origin}", address.trim_end_matches('/'))
            });
            assert_eq!(got.as_deref(), want, "{upstream} + {path} {query:?}");
        }
    }

    #[test]
    fn a_cookie_refreshed_before_sign_out_stays_dead_until_it_expires() {
        const DAY: u64 = 86_400;
        // Logged in at 0, refreshed at 1000 (that cookie is valid until 1000 + DAY),
        // copied, then signed out at 2000.
        let (alice, bob, carol) = ([1; 16], [2; 16], [3; 16]);
        let mut out = SignedOut::default();
        out.insert(alice, 2000, DAY);
        assert!(out.contains(&alice, 1000 + DAY));
        // Someone else signing out later prunes what has expired, not this one.
        out.insert(bob, 1000 + DAY - 1, DAY);
        assert!(out.contains(&alice, 1000 + DAY));
        assert!(!out.contains(&alice, 2000 + DAY + REFRESH_IN_FLIGHT));
        assert!(!out.contains(&carol, 2000));
    }

    #[test]
    fn a_refresh_never_handed_on_is_kept_to_refresh_on_from_until_the_cookie_expires() {
        const WEEK: u64 = 7 * 86_400;
        // Its tokens expired at 10; refreshed at 100; the old cookie lives a week.
        let refreshed = Arc::new(identity("alice", "alice@corp.example", true, &[]));
        let kept = LastRefresh {
            at: 100,
            session: Some(refreshed),
            refused: None,
            failed_until: 0,
            delivered: false,
        };
        assert!(!kept.reusable(3600), "not taken as it is: its tokens expired");
        assert!(kept.kept(3600, WEEK), "but kept: the next refresh starts from it");
        assert!(!kept.kept(100 + WEEK, WEEK), "until the old cookie has expired");
        let handed_on = LastRefresh {
            delivered: true,
            ..kept
        };
        assert!(
            !handed_on.kept(3600, WEEK),
            "the browser holds it: nothing to keep"
        );
    }

    #[test]
    fn sign_outs_stay_bounded_under_a_flood() {
        let mut out = SignedOut::default();
        for i in 0..MAX_SIGNED_OUT as u64 + 100 {
            let mut id = SessionId::default();
            id[..8].copy_from_slice(&i.to_be_bytes());
            out.insert(id, 1000 + i, 86_400);
        }
        assert_eq!(out.until.len(), MAX_SIGNED_OUT);
        let newest = (MAX_SIGNED_OUT as u64 + 99).to_be_bytes();
        let mut id = SessionId::default();
        id[..8].copy_from_slice(&newest);
        assert!(out.contains(&id, 2000), "the latest sign-out is kept");
    }

    /// A session without tokens: what the authorization rules look at.
    fn identity(user: &str, email: &str, verified: bool, groups: &[&str]) -> Session {
        Session {
            user: user.into(),
            email: Some(email.into()),
            email_verified: verified,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            preferred_username: None,
            access_token: None,
            id_token: None,
            refresh_token: None,
            expires_at: 10,
            created_at: 5,
            login: 1,
            refreshed_at: 0,
            headers: Default::default(),
        }
    }

    #[test]
    fn the_access_review_names_people_as_the_api_servers_oidc_authenticator_does() -> Result<(), String> {
        let config = |claim: Option<&str>, user_prefix: Option<&str>, groups_prefix: Option<&str>| {
            let flags = crate::config::Flags {
                sar_username_claim: claim.map(str::to_string),
                sar_username_prefix: user_prefix.map(str::to_string),
                sar_groups_prefix: groups_prefix.map(str::to_string),
                ..crate::config::minimal_flags()
            };
            crate::config::Config::merge(&flags, Default::default())
        };
        let mut alice = identity("1234", "alice@corp.com", true, &["developers", "system:masters"]);
        alice.preferred_username = Some("alice".into());
        let named = |c: &Config, s: &Session| review_subject(c, s);

        let (user, groups) = named(&config(None, None, None)?, &alice)?;
        assert_eq!(user, "1234", "sub by default");
        assert_eq!(
            groups,
            ["developers", "system:authenticated"],
            "system: groups dropped"
        );

        let (user, groups) = named(&config(Some("email"), Some("oidc:"), Some("oidc:"))?, &alice)?;
        assert_eq!(user, "oidc:alice@corp.com");
        assert_eq!(
            groups,
            ["oidc:developers", "oidc:system:masters", "system:authenticated"],
            "prefixed groups are the issuer's own, not the cluster's"
        );
        let (user, _) = named(&config(Some("preferred_username"), None, None)?, &alice)?;
        assert_eq!(user, "alice");

        alice.email_verified = false;
        let why = named(&config(Some("email"), None, None)?, &alice)
            .err()
            .unwrap_or_default();
        assert!(why.contains("no verified email address"), "{why}");
        let reserved = identity("system:admin", "x@corp.com", true, &[]);
        let why = named(&config(None, None, None)?, &reserved)
            .err()
            .unwrap_or_default();
        assert!(why.contains("reserved Kubernetes user name"), "{why}");
        assert!(named(&config(None, Some("oidc:"), None)?, &reserved).is_ok());
        // `-` is no prefix, as for the API server.
        let (user, _) = named(&config(None, Some("-"), None)?, &alice)?;
        assert_eq!(user, "1234");
        Ok(())
    }

    #[test]
    fn route_rules_on_the_auth_endpoint_each_must_pass() {
        let user = |email: &str, verified: bool, groups: &[&str]| identity("alice", email, verified, groups);
        let alice = user("alice@example.com", true, &["developers"]);
        assert_eq!(RouteRules::from_query("rd=/x&other=1"), RouteRules::default());
        assert_eq!(RouteRules::default().refuse(&alice), None, "no rules, no refusal");
        let rules = RouteRules::from_query("allowed_groups=admins,&allowed_groups=%20developers");
        assert_eq!(
            rules.groups.as_deref(),
            Some(&["admins".to_string(), "developers".to_string()][..]),
            "repeated, comma-separated and trimmed"
        );
        assert_eq!(rules.refuse(&alice), None, "any one group");
        let admins = RouteRules::from_query("allowed_groups=admins");
        assert!(admins.refuse(&alice).is_some_and(|w| w.contains("groups")));
        // Given but empty (an annotation templated from an empty value): nobody, not
        // everybody.
        for empty in ["allowed_groups=", "allowed_emails=%20", "allowed_email_domains=,"] {
            assert!(RouteRules::from_query(empty).refuse(&alice).is_some(), "{empty}");
        }
        // Both rules given: both must pass.
        let both = RouteRules::from_query("allowed_groups=developers&allowed_email_domains=corp.example");
        assert!(both.refuse(&alice).is_some_and(|w| w.contains("domains")));
        let emails = RouteRules::from_query("allowed_emails=Alice%40Example.com,bob%40example.com");
        assert_eq!(emails.refuse(&alice), None);
        let unverified = user("alice@example.com", false, &["developers"]);
        assert!(emails.refuse(&unverified).is_some_and(|w| w.contains("verified")));
        let tricky = user("a@evil.com@example.com", true, &[]);
        let domain = RouteRules::from_query("allowed_email_domains=example.com");
        assert_eq!(domain.refuse(&alice), None);
        assert!(
            domain.refuse(&tricky).is_some(),
            "two @ are refused, not guessed at"
        );
        // An entry that cannot be used says so (it refused in silence before), and the
        // route lets nobody in, even those another entry names.
        for (query, named) in [
            (
                "allowed_email_domains=%40example.com",
                "\"@example.com\" is not a domain",
            ),
            (
                "allowed_email_domains=example.com,*.com",
                "\"*.com\" would let in every address under a top-level domain",
            ),
            (
                "allowed_email_domains=.com",
                "every address under a top-level domain",
            ),
            ("allowed_emails=alice", "\"alice\" is not an email address"),
            (
                "allowed_emails=alice%40example.com,%40example.com",
                "\"@example.com\"",
            ),
            ("allowed_emails=alice+ops%40example.com", "write %2B"),
        ] {
            let why = RouteRules::from_query(query).refuse(&alice);
            assert!(
                why.as_deref()
                    .is_some_and(|w| w.contains("cannot be met") && w.contains(named)),
                "{query}: {why:?}"
            );
        }
        let subdomains = RouteRules::from_query("allowed_email_domains=.example.com,*.corp.example,*");
        assert_eq!(subdomains.invalid, None);
    }

    #[test]
    fn the_session_id_survives_a_refresh_so_sign_out_kills_copies() {
        let mut s = Session {
            user: "alice".into(),
            email: None,
            email_verified: false,
            groups: vec![],
            preferred_username: None,
            access_token: Some("a1".into()),
            id_token: Some("i1".into()),
            refresh_token: None,
            expires_at: 10,
            created_at: 5,
            login: 77,
            refreshed_at: 0,
            headers: Default::default(),
        };
        let before = session_id(&s);
        s.access_token = Some("a2".into());
        s.id_token = Some("i2".into());
        s.expires_at = 20;
        assert_eq!(session_id(&s), before);
        // Another login of the same user in the same second is another session.
        s.login = 78;
        assert_ne!(session_id(&s), before);
        assert_ne!(session::new_login(), session::new_login());
    }

    /// An App from the smallest valid configuration.
    fn minimal_app() -> Result<Arc<App>, String> {
        App::new(crate::config::Config::merge(
            &crate::config::minimal_flags(),
            Default::default(),
        )?)
    }

    /// With `SameSite=Strict` the callback, a navigation from the issuer's site, brings
    /// only the Lax CSRF cookie: chunks of an older, longer session must be cleared all
    /// the same, or they are glued to the new session and the browser loops on the login.
    #[test]
    fn a_login_clears_chunks_the_callback_could_not_see() -> Result<(), String> {
        let clears = |samesite: &str, cookie: &'static str| -> Result<Vec<String>, String> {
            let flags = crate::config::Flags {
                cookie_samesite: Some(samesite.into()),
                ..crate::config::minimal_flags()
            };
            let app = App::new(crate::config::Config::merge(&flags, Default::default())?)?;
            let mut headers = HeaderMap::new();
            headers.insert(COOKIE, HeaderValue::from_static(cookie));
            let set = app.login_cookies(&identity("alice", "alice@corp.example", true, &[]), &headers)?;
            Ok(set
                .into_iter()
                .filter(|c| c.contains("Max-Age=0"))
                .filter_map(|c| c.split('=').next().map(str::to_string))
                .collect())
        };
        let strict = clears("strict", "_chassis_oauth_csrf=x")?;
        for i in 1..session::MAX_CHUNKS {
            assert!(
                strict.contains(&format!("_chassis_oauth_{i}")),
                "chunk {i}: {strict:?}"
            );
        }
        assert!(
            !strict.contains(&"_chassis_oauth".to_string()),
            "the session itself is set: {strict:?}"
        );
        // Lax cookies come with the callback: exactly the leftovers are cleared.
        assert_eq!(
            clears("lax", "_chassis_oauth=a; _chassis_oauth_1=b; _chassis_oauth_2=c")?,
            vec!["_chassis_oauth_1".to_string(), "_chassis_oauth_2".to_string()]
        );
        assert!(clears("lax", "_chassis_oauth_csrf=x")?.is_empty());
        Ok(())
    }

    #[test]
    fn only_a_registered_error_code_is_shown_to_a_link_from_elsewhere() {
        for ours in [false, true] {
            assert_eq!(shown_error_code("access_denied", ours), "access_denied");
            assert_eq!(shown_error_code("login_required", ours), "login_required");
            for forged in [
                "access_denied\nCall +1-555-0100",
                "say \"hi\"",
                "",
                &"x".repeat(65),
            ] {
                assert_eq!(
                    shown_error_code(forged, ours),
                    "(an error code that is not shown here)",
                    "{forged:?}"
                );
            }
        }
        // One line of someone's text in the charset: only in the browser's own login.
        let sentence = "Your account is locked, call +1-555-0100";
        assert_eq!(
            shown_error_code(sentence, false),
            "(an error code that is not shown here)"
        );
        assert_eq!(shown_error_code("vendor_specific", true), "vendor_specific");
    }

    #[test]
    fn unusable_route_rules_are_logged_once_a_minute_not_per_request() -> Result<(), String> {
        let app = minimal_app()?;
        assert!(app.route_warning_due(1_000));
        assert!(!app.route_warning_due(1_001));
        assert!(!app.route_warning_due(1_059));
        assert!(app.route_warning_due(1_060));
        Ok(())
    }

    /// A session builds its identity headers once; a changed copy (a refresh with new
    /// groups, say) must carry its own, never the headers of the session it came from.
    #[test]
    fn identity_headers_are_built_once_per_session_and_never_for_a_changed_copy() -> Result<(), String> {
        let app = minimal_app()?;
        let forwarded = |session: &Session| {
            let mut h = HeaderMap::new();
            identity_values(&app, session).set_forwarded(&mut h).map(|()| h)
        };
        let before = identity("alice", "alice@corp.example", true, &["developers"]);
        let first = forwarded(&before)?;
        assert_eq!(
            first.get("x-forwarded-groups").map(HeaderValue::as_bytes),
            Some(&b"developers"[..])
        );
        assert!(
            std::ptr::eq(identity_values(&app, &before), identity_values(&app, &before)),
            "built once, then reused"
        );
        let mut after = before.clone();
        after.groups = vec!["admins".into()];
        after.user = "alice2".into();
        let second = forwarded(&after)?;
        assert_eq!(
            second.get("x-forwarded-groups").map(HeaderValue::as_bytes),
            Some(&b"admins"[..])
        );
        assert_eq!(
            second.get("x-forwarded-user").map(HeaderValue::as_bytes),
            Some(&b"alice2"[..])
        );
        assert_eq!(
            before,
            before.clone(),
            "what a session has built is not part of its value"
        );
        let mut bad = identity("alice", "alice@corp.example", true, &["a,b"]);
        assert!(forwarded(&bad).is_err_and(|e| e.contains("X-Forwarded-Groups")));
        bad = bad.clone();
        bad.groups = vec!["ok".into()];
        assert!(
            forwarded(&bad).is_ok(),
            "a refused value is not remembered for a mended copy"
        );
        Ok(())
    }

    #[tokio::test]
    async fn with_refresh_on_a_session_without_a_refresh_token_ends_with_its_tokens() -> Result<(), String> {
        let flags = crate::config::Flags {
            cookie_refresh: Some("1m".into()),
            ..crate::config::minimal_flags()
        };
        let app = App::new(crate::config::Config::merge(&flags, Default::default())?)?;
        let session = |expires_at: u64| {
            Arc::new(Session {
                user: "alice".into(),
                email: None,
                email_verified: false,
                groups: vec![],
                preferred_username: None,
                access_token: Some("at".into()),
                id_token: None,
                refresh_token: None,
                expires_at,
                created_at: 1,
                login: 1,
                refreshed_at: 0,
                headers: Default::default(),
            })
        };
        assert!(
            app.maybe_refresh(session(now() - 10)).await.is_none(),
            "expired tokens and nothing to renew them with: the session ends"
        );
        assert!(
            app.maybe_refresh(session(now() + 30)).await.is_some(),
            "due but not yet expired: kept until the tokens expire"
        );
        assert!(app.maybe_refresh(session(now() + 3600)).await.is_some());
        Ok(())
    }

    #[test]
    fn a_refresh_is_due_by_the_age_of_the_tokens_or_just_before_they_expire() {
        const HOUR: u64 = 3600;
        let mut s = identity("alice", "alice@example.com", true, &[]);
        s.created_at = 1000;
        s.refreshed_at = 10_000;
        s.expires_at = 10_000 + HOUR;
        // oauth2-proxy's `cookie-refresh: 1h` with tokens that live an hour: not due
        // right after the refresh (it was on every request when counted from the expiry).
        assert!(!refresh_due(&s, HOUR, 10_001));
        assert!(!refresh_due(&s, HOUR, 10_000 + HOUR - 61));
        assert!(
            refresh_due(&s, HOUR, 10_000 + HOUR - 60),
            "a minute before expiry"
        );
        // A short window: by age.
        assert!(!refresh_due(&s, 600, 10_599));
        assert!(refresh_due(&s, 600, 10_600));
        // A window longer than the token lifetime still refreshes before the expiry.
        assert!(refresh_due(&s, 2 * HOUR, 10_000 + HOUR - 30));
        // Cookies sealed before `refreshed_at` existed count from the login.
        s.refreshed_at = 0;
        assert!(refresh_due(&s, 600, 1600));
    }

    #[test]
    fn an_unverified_email_is_never_handed_on() {
        let mut s = identity("mallory", "admin@corp.example", false, &["developers"]);
        assert_eq!(header_identity(&s, false).email, None);
        assert_eq!(verified_email(&s), None);
        s.email_verified = true;
        assert_eq!(
            header_identity(&s, false).email.as_deref(),
            Some("admin@corp.example")
        );
    }
}
