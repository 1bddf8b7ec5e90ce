//! What the upstream can trust: this module owns the request and response headers
//! that carry identity, and the hop-by-hop headers that must not cross the proxy.
//!
//! The upstream believes `X-Forwarded-User` (and friends) because only the proxy
//! may set them. That holds only if every client-sent copy is removed first, in
//! every spelling an upstream might read as the same header: any letter case
//! (HTTP names are case-insensitive; [`http::HeaderMap`] already lowercases) and
//! `_` for `-` (CGI, PHP, Django, Rack and WSGI servers turn both into
//! `HTTP_X_FORWARDED_USER`, while `HeaderMap` keeps them apart).
//!
//! Order of operations on a request, so no client header can undo what the proxy
//! sets:
//!
//! 1. [`strip_hop_by_hop`]: the `Connection` header may name any header for
//!    removal (RFC 9110 7.6.1), e.g. `Connection: x-forwarded-user`. Done first,
//!    it can only remove client headers, never the identity the proxy sets later.
//! 2. [`strip_identity`]: remove every client-sent identity header.
//! 3. [`set_identity`]: set the proxy's own (it strips again itself, so a header
//!    the proxy does not set this time, e.g. no email claim, cannot leak through).
//!
//! Values are checked before they are set: a claim with a newline or other
//! control character, padding whitespace (an upstream trims `" admin"` to
//! `"admin"`), or a group containing the `,` separator (`"x,admins"` would read
//! as two groups) is refused, never passed on or silently mended.

use std::borrow::Cow;

use http::HeaderMap;
use http::header::{
    CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

/// Identity headers the proxy sets, in canonical form (lowercase, `-`):
/// `X-Forwarded-{User,Email,Groups,Preferred-Username,Access-Token}` and
/// oauth2-proxy's `X-Auth-Request-*` names. `Authorization` is deliberately not
/// here: it belongs to the client and may be meant for the upstream.
pub const IDENTITY_HEADERS: &[&str] = &[
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-auth-request-access-token",
];

/// Headers that frameworks and servers behind a proxy read as the request's original
/// URI, host or client address (nginx `X-Original-URI` and `X-Real-IP`, CDNs'
/// client-IP headers). Like `X-Forwarded-*`, only a trusted proxy may send them: from
/// anyone else a forged client address would pass the upstream's IP allow-lists.
pub const ROUTING_HEADERS: &[&str] = &[
    "x-original-uri",
    "x-original-host",
    "x-host",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "client-ip",
];

/// Headers that make Symfony, Zend and IIS URL Rewrite serve another path than the
/// request line's (`X-Original-URL`, `X-Rewrite-URL`). Removed from every request,
/// trusted proxies' included: the login and skip-auth decisions are made on the
/// request's path, and an ingress may pass a client's value through unchanged, so
/// `GET /public/x` with `X-Original-URL: /admin` would reach `/admin` without a login.
pub const PATH_OVERRIDE_HEADERS: &[&str] = &["x-original-url", "x-rewrite-url"];

/// Hop-by-hop headers (RFC 9110 7.6.1, RFC 9112, plus the non-standard
/// `Proxy-Connection` and h2c's `HTTP2-Settings`, which is connection-specific).
static HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("http2-settings"),
];

/// The name an upstream may read this header as: lowercase with `_` as `-`.
fn canonical(name: &HeaderName) -> std::borrow::Cow<'_, str> {
    // HeaderName is already lowercase; only the underscore needs folding (rarely:
    // most requests have none, and this runs for every header of every request).
    let name = name.as_str();
    if name.contains('_') {
        name.replace('_', "-").into()
    } else {
        name.into()
    }
}

/// Removes every header whose canonical name is one of [`IDENTITY_HEADERS`] or
/// [`PATH_OVERRIDE_HEADERS`] (so `x_forwarded_user`, `X-FORWARDED-USER`,
/// `x-forwarded_user` and all duplicates go). With `strip_all_forwarded`, also every header whose canonical
/// name starts with `x-forwarded-` or `x-auth-request-` (the caller then sets
/// `X-Forwarded-For`/`-Proto`/`-Host` itself) or is one of [`ROUTING_HEADERS`].
/// Returns how many header fields (values, counting duplicates) were removed.
pub fn strip_identity(headers: &mut HeaderMap, strip_all_forwarded: bool) -> usize {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let c = canonical(name);
            IDENTITY_HEADERS.contains(&c.as_ref())
                || PATH_OVERRIDE_HEADERS.contains(&c.as_ref())
                || (strip_all_forwarded
                    && (c.starts_with("x-forwarded-")
                        || c.starts_with("x-auth-request-")
                        || ROUTING_HEADERS.contains(&c.as_ref())))
        })
        .cloned()
        .collect();
    let mut removed = 0;
    for name in doomed {
        removed += headers.get_all(&name).iter().count();
        headers.remove(&name);
    }
    removed
}

/// Removes hop-by-hop headers and every header named by a `Connection` token
/// (RFC 9110 7.6.1). Call it before [`set_identity`]: a client's
/// `Connection: x-forwarded-user` then removes only the client's own header.
///
/// `keep_upgrade`: for a WebSocket upgrade, keep `Connection: upgrade` and
/// `Upgrade` and nothing else of the connection headers. Only `Upgrade: websocket`
/// is kept: forwarding e.g. `Upgrade: h2c` would let a client open an HTTP/2
/// connection straight to the upstream and send requests the proxy never sees
/// (h2c smuggling).
///
/// `TE` is removed too, including `TE: trailers`; a gRPC-over-HTTP/2 upstream
/// needs the caller to add that back.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let mut tokens: Vec<String> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        // A value that is not visible ASCII names no valid header anyway.
        let Ok(text) = value.to_str() else { continue };
        tokens.extend(
            text.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty()),
        );
    }
    let kept_upgrade = if keep_upgrade && tokens.iter().any(|t| t == "upgrade") {
        websocket_upgrade(headers)
    } else {
        None
    };

    for token in &tokens {
        // An invalid token cannot name a header in the map: nothing to remove.
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            headers.remove(&name);
        }
    }
    // One pass over the request's few names instead of a lookup per hop-by-hop name.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    for name in &present {
        headers.remove(name);
    }

    if let Some(value) = kept_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, value);
    }
}

/// The `Upgrade` value if it asks for exactly WebSocket, else None.
fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(UPGRADE).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?;
    text.trim()
        .eq_ignore_ascii_case("websocket")
        .then(|| value.clone())
}

/// Who the request is from, as the upstream will be told.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub preferred_username: Option<String>,
    pub access_token: Option<String>,
}

// Hand-written so a logged Identity never carries the bearer token.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("email", &self.email)
            .field("groups", &self.groups)
            .field("preferred_username", &self.preferred_username)
            .field("access_token", &self.access_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Sets the `X-Forwarded-*` identity request headers for the upstream. Strips
/// every client-sent identity header first (see [`strip_identity`]) so a header
/// the proxy does not set now cannot come from the client; still call it after
/// [`strip_hop_by_hop`]. Groups are joined with `,`; the access token is set only
/// with `pass_access_token`. Empty optional values are not set.
///
/// A value that is not a safe header value (control characters, newlines,
/// leading/trailing whitespace; an empty user; a group that is empty or contains
/// `,`) is not set, and the result is `Err` naming the header(s). The caller
/// should then refuse the request rather than forward it half-identified.
/// Non-ASCII text (UTF-8) is passed as is.
pub fn set_identity(
    headers: &mut HeaderMap,
    identity: &Identity,
    pass_access_token: bool,
) -> Result<(), String> {
    IdentityValues::new(identity, pass_access_token).set_forwarded(headers)
}

/// Sets the `X-Auth-Request-*` response headers that `/oauth2/auth` answers an
/// nginx `auth_request` (or Traefik forwardAuth) with; same rules as
/// [`set_identity`].
pub fn set_auth_request_response(
    headers: &mut HeaderMap,
    identity: &Identity,
    pass_access_token: bool,
) -> Result<(), String> {
    IdentityValues::new(identity, pass_access_token).set_auth_request(headers)
}

/// An identity's header values, checked and built once: a session keeps its own
/// (`Session::headers`), so the requests it makes copy no claim and build no value
/// (a clone of a built value shares its bytes). Same rules as [`set_identity`].
/// No `Debug`: the values may hold the access token.
#[derive(Clone)]
pub struct IdentityValues {
    /// User, Email, Groups, Preferred-Username, Access-Token (as in [`Names`]).
    values: [Option<HeaderValue>; 5],
    /// The indexes of the values refused as unsafe, named in the error.
    refused: Vec<usize>,
}

impl IdentityValues {
    pub fn new(identity: &Identity, pass_access_token: bool) -> Self {
        let mut refused = Vec::new();
        // Empty optional claims are simply absent; the user is always set.
        fn present(v: &Option<String>) -> Option<Cow<'_, str>> {
            v.as_deref().filter(|v| !v.is_empty()).map(Cow::Borrowed)
        }
        let groups = if identity.groups.is_empty() {
            None
        } else if identity.groups.iter().all(|g| safe_value(g) && !g.contains(',')) {
            Some(Cow::Owned(identity.groups.join(",")))
        } else {
            // Refused whole: dropping one group would change what the set means.
            refused.push(GROUPS);
            None
        };
        let texts = [
            Some(Cow::Borrowed(identity.user.as_str())),
            present(&identity.email),
            groups,
            present(&identity.preferred_username),
            present(&identity.access_token).filter(|_| pass_access_token),
        ];
        let mut values: [Option<HeaderValue>; 5] = Default::default();
        for (i, text) in texts.into_iter().enumerate() {
            let Some(text) = text else { continue };
            match checked_value(&text) {
                Some(value) => values[i] = Some(value),
                None => refused.push(i),
            }
        }
        Self { values, refused }
    }

    /// As [`set_identity`], from the values built already.
    pub fn set_forwarded(&self, headers: &mut HeaderMap) -> Result<(), String> {
        self.set(headers, &FORWARDED)
    }

    /// As [`set_auth_request_response`], from the values built already.
    pub fn set_auth_request(&self, headers: &mut HeaderMap) -> Result<(), String> {
        self.set(headers, &AUTH_REQUEST)
    }

    fn set(&self, headers: &mut HeaderMap, names: &Names) -> Result<(), String> {
        strip_identity(headers, false);
        for (i, value) in self.values.iter().enumerate() {
            if let Some(value) = value {
                headers.insert(names.parsed[i].clone(), value.clone());
            }
        }
        if self.refused.is_empty() {
            return Ok(());
        }
        let named: Vec<&str> = self.refused.iter().map(|i| names.display[*i]).collect();
        // The one refusal an administrator fixes at the issuer, so it says how.
        let groups = if self.refused.contains(&GROUPS) {
            " (a group name has a comma, which would split it in the comma-separated header, or a character headers cannot carry: have the issuer send names without them, an LDAP group's CN rather than its DN)"
        } else {
            ""
        };
        Err(format!(
            "not set, value not allowed in a header: {}{groups}",
            named.join(", ")
        ))
    }
}

/// The names one family of identity headers is set under, as displayed in errors
/// and as parsed once (these are set on every proxied request).
struct Names {
    display: [&'static str; 5],
    parsed: [HeaderName; 5],
}

/// Where Groups is in [`Names`] (the one value that is joined, so checked as a whole).
const GROUPS: usize = 2;

/// User, Email, Groups, Preferred-Username, Access-Token.
static FORWARDED: Names = Names {
    display: [
        "X-Forwarded-User",
        "X-Forwarded-Email",
        "X-Forwarded-Groups",
        "X-Forwarded-Preferred-Username",
        "X-Forwarded-Access-Token",
    ],
    parsed: [
        HeaderName::from_static("x-forwarded-user"),
        HeaderName::from_static("x-forwarded-email"),
        HeaderName::from_static("x-forwarded-groups"),
        HeaderName::from_static("x-forwarded-preferred-username"),
        HeaderName::from_static("x-forwarded-access-token"),
    ],
};

static AUTH_REQUEST: Names = Names {
    display: [
        "X-Auth-Request-User",
        "X-Auth-Request-Email",
        "X-Auth-Request-Groups",
        "X-Auth-Request-Preferred-Username",
        "X-Auth-Request-Access-Token",
    ],
    parsed: [
        HeaderName::from_static("x-auth-request-user"),
        HeaderName::from_static("x-auth-request-email"),
        HeaderName::from_static("x-auth-request-groups"),
        HeaderName::from_static("x-auth-request-preferred-username"),
        HeaderName::from_static("x-auth-request-access-token"),
    ],
};

/// Whether `value` is safe to hand to an upstream as one header value: not
/// empty, no control characters (CR/LF would split headers, NUL truncates in C
/// parsers), no leading/trailing whitespace (parsers trim it, so `" admin"`
/// would read as `"admin"`).
fn safe_value(value: &str) -> bool {
    !value.is_empty()
        && !value.chars().any(char::is_control)
        && !value.starts_with(char::is_whitespace)
        && !value.ends_with(char::is_whitespace)
}

fn checked_value(value: &str) -> Option<HeaderValue> {
    if !safe_value(value) {
        return None;
    }
    // from_bytes (not from_str) so UTF-8 names pass; it still refuses controls.
    HeaderValue::from_bytes(value.as_bytes()).ok()
}

/// Moves every value into one buffer of the request's own. hyper's values are slices
/// of the connection's read buffer (8 KiB or more), and hyper takes a new buffer for
/// the connection's next read as soon as it has handed the request over: kept, the
/// values would pin the old one too for as long as the request is in flight upstream.
/// Copied, they take their own size (usually under 1 KiB) and the old buffer is freed.
/// A value that would not validate again (it did when parsed) keeps its original bytes.
pub fn own_values(headers: &mut HeaderMap) {
    let total: usize = headers.values().map(HeaderValue::len).sum();
    let mut copy = bytes::BytesMut::with_capacity(total);
    for value in headers.values() {
        copy.extend_from_slice(value.as_bytes());
    }
    let mut rest = copy.freeze();
    for value in headers.values_mut() {
        let after = rest.split_off(value.len());
        let own = std::mem::replace(&mut rest, after);
        if let Ok(mut fresh) = HeaderValue::from_maybe_shared(own) {
            fresh.set_sensitive(value.is_sensitive());
            *value = fresh;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> HeaderName {
        HeaderName::from_bytes(n.as_bytes()).expect("valid header name")
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(name(n), HeaderValue::from_str(v).expect("valid header value"));
        }
        h
    }

    #[test]
    fn owned_values_release_the_read_buffer_and_keep_every_value() {
        // As hyper parses a request: every value a slice of the connection's buffer.
        let mut raw = b"a.example\0secret-token\0first\0second\0\0caf\xc3\xa9".to_vec();
        raw.resize(8192, 0);
        let buffer = bytes::Bytes::from(raw);
        let slice = |from: usize, to: usize| {
            HeaderValue::from_maybe_shared(buffer.slice(from..to)).expect("valid value")
        };
        let mut headers = HeaderMap::new();
        headers.insert(name("host"), slice(0, 9));
        let mut token = slice(10, 22);
        token.set_sensitive(true);
        headers.insert(name("authorization"), token);
        headers.append(name("x-dup"), slice(23, 28));
        headers.append(name("x-dup"), slice(29, 35));
        headers.insert(name("x-empty"), slice(36, 36));
        headers.insert(name("x-utf8"), slice(37, 42));
        let before: Vec<(String, Vec<u8>, bool)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect();
        assert!(!buffer.is_unique(), "the values hold the buffer before");

        own_values(&mut headers);

        let after: Vec<(String, Vec<u8>, bool)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect();
        assert_eq!(after, before, "same names, values, order and sensitivity");
        assert!(buffer.is_unique(), "no value holds the read buffer any more");
    }

    #[test]
    fn path_override_headers_are_removed_even_from_trusted_proxies() {
        let mut h = map(&[
            ("x-original-url", "/admin"),
            ("x_rewrite_url", "/admin"),
            ("x-real-ip", "10.0.0.1"),
        ]);
        strip_identity(&mut h, false);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-real-ip"],
            "a trusted proxy's client address stays; path overrides never pass"
        );
    }

    #[test]
    fn identity_header_names_are_parsed_as_displayed_and_all_stripped() {
        for names in [&FORWARDED, &AUTH_REQUEST] {
            for (display, parsed) in names.display.iter().zip(&names.parsed) {
                assert_eq!(parsed.as_str(), display.to_ascii_lowercase());
                assert!(
                    IDENTITY_HEADERS.contains(&parsed.as_str()),
                    "{display} is not stripped"
                );
            }
            assert!(names.display[GROUPS].ends_with("-Groups"));
        }
    }

    fn alice() -> Identity {
        Identity {
            user: "alice".into(),
            email: Some("alice@example.com".into()),
            groups: vec!["dev".into(), "ops".into()],
            preferred_username: Some("alice".into()),
            access_token: Some("tok".into()),
        }
    }

    fn get<'a>(h: &'a HeaderMap, n: &str) -> Option<&'a str> {
        h.get(n).map(|v| v.to_str().expect("ascii"))
    }

    #[test]
    fn underscore_variant_is_stripped() {
        let mut h = map(&[("x_forwarded_user", "admin"), ("x-forwarded_email", "admin@corp")]);
        assert_eq!(strip_identity(&mut h, false), 2);
        assert!(h.is_empty());
    }

    #[test]
    fn uppercase_variant_is_stripped() {
        let mut h = map(&[("X-FORWARDED-USER", "admin"), ("X_Auth_Request_Groups", "admins")]);
        assert_eq!(strip_identity(&mut h, false), 2);
        assert!(h.is_empty());
    }

    #[test]
    fn duplicate_headers_are_all_stripped() {
        let mut h = map(&[
            ("x-forwarded-user", "admin"),
            ("x-forwarded-user", "root"),
            ("x_forwarded_user", "admin"),
            ("X-Forwarded-Groups", "admins"),
            ("x-forwarded-groups", "root"),
        ]);
        assert_eq!(strip_identity(&mut h, false), 5);
        assert!(h.is_empty());
    }

    #[test]
    fn every_identity_header_is_stripped() {
        for n in IDENTITY_HEADERS {
            let mut h = map(&[(n, "x"), (&n.replace('-', "_"), "y"), (&n.to_uppercase(), "z")]);
            assert_eq!(strip_identity(&mut h, false), 3, "{n}");
            assert!(h.is_empty(), "{n}");
        }
    }

    #[test]
    fn authorization_and_other_headers_are_kept() {
        let mut h = map(&[
            ("authorization", "Bearer t"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-username", "not ours"),
            ("x-forwarded-user", "admin"),
        ]);
        assert_eq!(strip_identity(&mut h, false), 1);
        assert_eq!(get(&h, "authorization"), Some("Bearer t"));
        assert_eq!(get(&h, "x-forwarded-for"), Some("10.0.0.1"));
        assert_eq!(get(&h, "x-forwarded-username"), Some("not ours"));
    }

    #[test]
    fn strip_all_forwarded_removes_every_forwarded_variant() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("X_Forwarded_Host", "evil"),
            ("x-auth-request-redirect", "https://evil"),
            ("x-forwarded-user", "admin"),
            ("forwarded", "for=1.2.3.4"),
            ("accept", "*/*"),
        ]);
        assert_eq!(strip_identity(&mut h, true), 4);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("accept") && h.contains_key("forwarded"));
    }

    #[test]
    fn path_host_and_client_address_overrides_are_stripped_from_untrusted_clients() {
        let sent = [
            ("X-Original-URL", "/admin"),
            ("x_rewrite_url", "/admin"),
            ("X-Original-URI", "/admin"),
            ("X-Original-Host", "admin.internal"),
            ("X-Host", "admin.internal"),
            ("X-Real-IP", "10.0.0.1"),
            ("True-Client-IP", "10.0.0.1"),
            ("X-Client-IP", "10.0.0.1"),
            ("X-Cluster-Client-IP", "10.0.0.1"),
            ("Client-IP", "10.0.0.1"),
            ("accept", "*/*"),
        ];
        let mut untrusted = map(&sent);
        assert_eq!(strip_identity(&mut untrusted, true), 10);
        assert_eq!(untrusted.len(), 1, "{untrusted:?}");
        // A trusted proxy in front may set them, except the two path overrides.
        let mut trusted = map(&sent);
        assert_eq!(strip_identity(&mut trusted, false), 2);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn connection_listed_headers_are_removed() {
        let mut h = map(&[
            ("connection", "close, X-Forwarded-User"),
            ("connection", " x-custom ,,"),
            ("x-forwarded-user", "spoofed"),
            ("x-custom", "1"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn connection_cannot_remove_the_identity_the_proxy_sets() {
        // The documented order: hop-by-hop first, then identity.
        let mut h = map(&[
            (
                "connection",
                "x-forwarded-user, x-forwarded-groups, x_forwarded_email",
            ),
            ("x_forwarded_user", "admin"),
        ]);
        strip_hop_by_hop(&mut h, false);
        strip_identity(&mut h, false);
        set_identity(&mut h, &alice(), false).expect("valid identity");
        assert_eq!(get(&h, "x-forwarded-user"), Some("alice"));
        assert_eq!(get(&h, "x-forwarded-groups"), Some("dev,ops"));
        assert_eq!(get(&h, "x-forwarded-email"), Some("alice@example.com"));
        assert!(!h.contains_key("x_forwarded_user"));
    }

    #[test]
    fn websocket_upgrade_is_kept_when_asked() {
        let mut h = map(&[
            ("connection", "Upgrade, keep-alive, x-secret"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(get(&h, "connection"), Some("upgrade"));
        assert_eq!(get(&h, "upgrade"), Some("websocket"));
        assert!(h.contains_key("sec-websocket-key"));
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn upgrade_is_dropped_unless_asked_or_announced() {
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
        // Upgrade without the Connection token is not an upgrade request.
        let mut h = map(&[("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.is_empty());
    }

    #[test]
    fn h2c_upgrade_is_not_kept() {
        for upgrade in ["h2c", "websocket, h2c", "h2c, websocket"] {
            let mut h = map(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ]);
            strip_hop_by_hop(&mut h, true);
            assert!(h.is_empty(), "{upgrade}");
        }
        let mut h = map(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert!(h.is_empty());
    }

    #[test]
    fn set_identity_sets_the_forwarded_headers() {
        let mut h = HeaderMap::new();
        set_identity(&mut h, &alice(), true).expect("valid identity");
        assert_eq!(get(&h, "x-forwarded-user"), Some("alice"));
        assert_eq!(get(&h, "x-forwarded-email"), Some("alice@example.com"));
        assert_eq!(get(&h, "x-forwarded-groups"), Some("dev,ops"));
        assert_eq!(get(&h, "x-forwarded-preferred-username"), Some("alice"));
        assert_eq!(get(&h, "x-forwarded-access-token"), Some("tok"));
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn access_token_only_when_passed() {
        let mut h = map(&[("x_forwarded_access_token", "client-chosen")]);
        set_identity(&mut h, &alice(), false).expect("valid identity");
        assert!(!h.contains_key("x-forwarded-access-token"));
        assert!(!h.contains_key("x_forwarded_access_token"));
    }

    #[test]
    fn client_header_for_a_missing_claim_does_not_survive() {
        let mut h = map(&[
            ("x-forwarded-email", "admin@corp"),
            ("x_forwarded_groups", "admins"),
            ("x-forwarded-user", "admin"),
        ]);
        let bob = Identity {
            user: "bob".into(),
            email: None,
            groups: vec![],
            preferred_username: Some(String::new()),
            access_token: None,
        };
        set_identity(&mut h, &bob, true).expect("valid identity");
        assert_eq!(h.len(), 1);
        assert_eq!(get(&h, "x-forwarded-user"), Some("bob"));
    }

    #[test]
    fn newline_in_a_claim_is_not_set() {
        let mut id = alice();
        id.email = Some("a@example.com\r\nX-Forwarded-Groups: admins".into());
        let mut h = HeaderMap::new();
        let err = set_identity(&mut h, &id, false).expect_err("newline refused");
        assert!(err.contains("X-Forwarded-Email"), "{err}");
        assert!(!h.contains_key("x-forwarded-email"));
        assert_eq!(get(&h, "x-forwarded-groups"), Some("dev,ops"));
        assert_eq!(get(&h, "x-forwarded-user"), Some("alice"));
    }

    #[test]
    fn control_characters_in_claims_are_not_set() {
        for bad in [
            "ali\0ce",
            "ali\nce",
            "ali\rce",
            "ali\tce",
            "ali\u{7f}ce",
            "ali\u{85}ce",
        ] {
            let mut id = alice();
            id.user = bad.into();
            let mut h = HeaderMap::new();
            let err = set_identity(&mut h, &id, false).expect_err("control refused");
            assert!(err.contains("X-Forwarded-User"), "{err}");
            assert!(!h.contains_key("x-forwarded-user"), "{bad:?}");
        }
    }

    #[test]
    fn padded_claim_is_not_set() {
        let mut id = alice();
        id.preferred_username = Some(" admin".into());
        id.user = "admin ".into();
        let mut h = HeaderMap::new();
        let err = set_identity(&mut h, &id, false).expect_err("padding refused");
        assert!(
            err.contains("X-Forwarded-User") && err.contains("X-Forwarded-Preferred-Username"),
            "{err}"
        );
        assert!(!h.contains_key("x-forwarded-user"));
        assert!(!h.contains_key("x-forwarded-preferred-username"));
    }

    #[test]
    fn comma_in_a_group_is_not_set() {
        for groups in [vec!["dev", "x,admins"], vec!["dev", ""], vec![" admins"]] {
            let mut id = alice();
            id.groups = groups.iter().map(|g| g.to_string()).collect();
            let mut h = HeaderMap::new();
            let err = set_identity(&mut h, &id, false).expect_err("bad group refused");
            assert!(err.contains("X-Forwarded-Groups"), "{err}");
            assert!(err.contains("CN rather than its DN"), "says how to fix it: {err}");
            assert!(!h.contains_key("x-forwarded-groups"), "{groups:?}");
        }
    }

    #[test]
    fn empty_user_is_refused() {
        let mut id = alice();
        id.user = String::new();
        let mut h = map(&[("x-forwarded-user", "admin")]);
        let err = set_identity(&mut h, &id, false).expect_err("empty user refused");
        assert!(err.contains("X-Forwarded-User"), "{err}");
        assert!(!h.contains_key("x-forwarded-user"));
    }

    #[test]
    fn non_ascii_claims_pass_as_utf8() {
        let mut id = alice();
        id.preferred_username = Some("José Müller".into());
        let mut h = HeaderMap::new();
        set_identity(&mut h, &id, false).expect("utf-8 allowed");
        let v = h.get("x-forwarded-preferred-username").expect("set");
        assert_eq!(v.as_bytes(), "José Müller".as_bytes());
    }

    #[test]
    fn auth_request_response_headers() {
        let mut h = map(&[("X_Auth_Request_User", "admin")]);
        set_auth_request_response(&mut h, &alice(), true).expect("valid identity");
        assert_eq!(get(&h, "x-auth-request-user"), Some("alice"));
        assert_eq!(get(&h, "x-auth-request-email"), Some("alice@example.com"));
        assert_eq!(get(&h, "x-auth-request-groups"), Some("dev,ops"));
        assert_eq!(get(&h, "x-auth-request-preferred-username"), Some("alice"));
        assert_eq!(get(&h, "x-auth-request-access-token"), Some("tok"));
        assert_eq!(h.len(), 5);

        let mut h = HeaderMap::new();
        set_auth_request_response(&mut h, &alice(), false).expect("valid identity");
        assert!(!h.contains_key("x-auth-request-access-token"));
        let mut id = alice();
        id.email = Some("x\ny".into());
        let err = set_auth_request_response(&mut h, &id, false).expect_err("newline refused");
        assert!(err.contains("X-Auth-Request-Email"), "{err}");
    }

    #[test]
    fn debug_does_not_print_the_access_token() {
        let shown = format!("{:?}", alice());
        assert!(!shown.contains("tok\""), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
