//! Where a finished login may send the browser back to.
//!
//! The target comes from the client (the `rd` query parameter, the
//! `X-Auth-Request-Redirect` header) and rides through the OAuth `state`, so it is
//! attacker-controlled. An open redirect here turns a genuine login page into the
//! first hop of a phishing link, so this module owns the single yes/no decision and
//! the fallback (`/`) used on "no".
//!
//! A target is accepted in exactly two shapes:
//!
//! * a path on this host: `/` followed by anything but `/` or `\` (`/`, `/app?x=1`);
//! * an absolute `http://` or `https://` URL whose host and port are on the
//!   allow-list and which carries no userinfo.
//!
//! Everything else is refused: other schemes (`javascript:`, `data:`, `vbscript:`),
//! scheme-relative `//host`, `https:host` without slashes. The checks are stricter
//! than a browser needs on purpose: browsers drop tabs and newlines, treat `\` like
//! `/` and decode escapes per component, so any target whose meaning could differ
//! between this parser and a browser is refused instead of being interpreted:
//!
//! * only printable ASCII is accepted raw — no whitespace, no control characters, no
//!   `\`, no non-ASCII (real browsers send URLs percent-encoded; raw Unicode is how
//!   look-alike slashes and hosts get in);
//! * the target is percent-decoded layer by layer (up to [`MAX_DECODE_ROUNDS`]) and
//!   no layer may contain a control character or `\`;
//! * in no layer may the path have an empty, whitespace-only, `.` or `..` segment
//!   before the last one, so `/%2F%2Fevil.com`, `/%09/evil.com` and `/.//evil.com`
//!   cannot turn into `//evil.com` after someone decodes or normalizes them.
//!   An encoded space (`%20`) inside a segment is fine.
//!
//! # Allow-list entries
//!
//! * `example.com` — that host only (compared case-insensitively, ignoring one
//!   trailing dot).
//! * `.example.com` — `example.com` **and** every subdomain of it, like oauth2-proxy's
//!   `--whitelist-domain`; the match is on a label boundary, so `evilexample.com` does
//!   not match. A single-label wildcard such as `.com` is refused.
//! * No port — only the default port of the target's scheme (443 for https, 80 for
//!   http, written or not). `:8443` — only port 8443. `:*` — any port. This is
//!   stricter than "no port means any port": another port is often another service.
//! * IP addresses are accepted in canonical form only (`127.0.0.1`, `[::1]`), never
//!   with a leading dot.
//! * Internationalized names must be written in punycode (`xn--bcher-kva.de`); targets
//!   must use the same punycode, raw Unicode hosts are refused.

use std::borrow::Cow;
use std::net::Ipv4Addr;

use percent_encoding::percent_decode;
use url::{Host, Url};

/// Longest target accepted; a redirect travels in a cookie and in `state`, and a
/// longer one is more likely an attempt to smuggle something than a real page.
const MAX_TARGET_LEN: usize = 4096;

/// How many layers of percent-encoding are peeled when looking for hidden
/// characters; a target still changing after that is refused, since no real page
/// address is encoded four times.
const MAX_DECODE_ROUNDS: usize = 3;

/// Which ports an allow-list entry accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortRule {
    /// 443 for https, 80 for http.
    SchemeDefault,
    Exact(u16),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowedDomain {
    /// Lowercase, no trailing dot; IPv6 in brackets.
    host: String,
    /// Entry was written `.example.com`: the apex and every subdomain.
    subdomains: bool,
    port: PortRule,
}

impl AllowedDomain {
    fn matches(&self, target: &AbsoluteTarget<'_>) -> bool {
        let host_ok = target.host == self.host
            || (self.subdomains
                && target
                    .host
                    .strip_suffix(self.host.as_str())
                    .is_some_and(|prefix| prefix.ends_with('.')));
        let port_ok = match self.port {
            PortRule::SchemeDefault => target.port == target.default_port,
            PortRule::Exact(port) => target.port == port,
            PortRule::Any => true,
        };
        host_ok && port_ok
    }
}

/// The hosts a login may redirect to, besides paths on the proxy's own host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedirectPolicy {
    allowed: Vec<AllowedDomain>,
}

impl RedirectPolicy {
    /// `domains`: entries like `example.com` (that host), `.example.com` (the apex and
    /// any subdomain), each optionally followed by `:port` (only that port) or `:*`
    /// (any port); without a port only the scheme's default port is allowed. See the
    /// module documentation for the full rules.
    pub fn new(domains: &[String]) -> Result<Self, String> {
        let allowed = domains
            .iter()
            .map(|d| parse_entry(d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { allowed })
    }

    /// Returns the target to redirect to, or "/" when `target` is not allowed.
    pub fn validate(&self, target: &str) -> String {
        if self.is_allowed(target) {
            target.to_owned()
        } else {
            "/".to_owned()
        }
    }

    /// Whether `target` is a safe path on this host or an allowed absolute URL.
    pub fn is_allowed(&self, target: &str) -> bool {
        if target.is_empty() || target.len() > MAX_TARGET_LEN || !characters_are_safe(target) {
            return false;
        }
        if target.starts_with('/') {
            // A second '/' or '\' would make the browser read a host from it.
            return !matches!(target.as_bytes().get(1), Some(b'/' | b'\\')) && path_is_safe(path_of(target));
        }
        match parse_absolute(target) {
            Some(absolute) => {
                path_is_safe(absolute.path) && self.allowed.iter().any(|d| d.matches(&absolute))
            }
            None => false,
        }
    }
}

/// Parses one allow-list entry; the error is a sentence naming the entry.
fn parse_entry(entry: &str) -> Result<AllowedDomain, String> {
    let fail = |why: &str| format!("redirect allow-list entry {entry:?} {why}");
    let spec = entry.trim();
    if spec.is_empty() {
        return Err(fail("is empty"));
    }
    if spec.contains('/') || spec.contains('@') {
        return Err(fail("must be a host name with an optional port, not a URL"));
    }
    if spec.starts_with("*.") {
        return Err(fail(
            "uses '*.'; write \".example.com\" to allow a domain and its subdomains",
        ));
    }
    let (subdomains, spec) = match spec.strip_prefix('.') {
        Some(rest) => (true, rest),
        None => (false, spec),
    };
    let (host, port) = split_host_port(spec)
        .ok_or_else(|| fail("has more than one ':' (write IPv6 addresses in brackets)"))?;
    let port = match port {
        None => PortRule::SchemeDefault,
        Some("*") => PortRule::Any,
        Some(p) => {
            PortRule::Exact(parse_port(p).ok_or_else(|| fail("has a port that is not '*' or 1-65535"))?)
        }
    };
    if !host.is_ascii() {
        return Err(match Host::parse(host) {
            Ok(Host::Domain(ascii)) => fail(&format!("is not ASCII; write its punycode form {ascii:?}")),
            _ => fail("is not ASCII"),
        });
    }
    let lower = host.to_ascii_lowercase();
    let host = lower.strip_suffix('.').unwrap_or(&lower);

    if host.starts_with('[') {
        if subdomains {
            return Err(fail("puts a '.' before an IP address, which has no subdomains"));
        }
        // Store the form the URL parser produces, so comparisons are plain string equality.
        return match Host::parse(host) {
            Ok(parsed @ Host::Ipv6(_)) => Ok(AllowedDomain {
                host: parsed.to_string(),
                subdomains,
                port,
            }),
            _ => Err(fail("is not a valid IPv6 address")),
        };
    }
    if !host_is_well_formed(host) {
        return Err(fail(
            "is not a valid host name (letters, digits, '-', '_' and non-empty labels)",
        ));
    }
    if ends_in_a_number(host) {
        // The URL standard reads such a host as an IPv4 address; only accept the
        // canonical dotted quad, which is what a parsed target's host looks like.
        if subdomains {
            return Err(fail("puts a '.' before an IP address, which has no subdomains"));
        }
        if host.parse::<Ipv4Addr>().map(|ip| ip.to_string()).as_deref() != Ok(host) {
            return Err(fail("is not a canonical IPv4 address (like 10.0.0.1)"));
        }
    } else if subdomains && !host.contains('.') {
        return Err(fail("would allow every host under a top-level domain"));
    }
    Ok(AllowedDomain {
        host: host.to_owned(),
        subdomains,
        port,
    })
}

/// An absolute target, split by this module's own strict parser and confirmed by
/// the URL standard's parser.
#[derive(Debug)]
struct AbsoluteTarget<'a> {
    /// Lowercase, one trailing dot removed.
    host: String,
    /// Port the browser will connect to.
    port: u16,
    default_port: u16,
    /// Path component (may be empty), without query or fragment.
    path: &'a str,
}

fn parse_absolute(target: &str) -> Option<AbsoluteTarget<'_>> {
    // The literal "//" is required: the URL standard also accepts "https:evil.com"
    // and "https:/evil.com" for special schemes.
    let (scheme, rest) = if has_prefix_ignore_case(target, "https://") {
        ("https", target.get("https://".len()..)?)
    } else if has_prefix_ignore_case(target, "http://") {
        ("http", target.get("http://".len()..)?)
    } else {
        return None;
    };
    let default_port = if scheme == "https" { 443 } else { 80 };

    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(authority_end);
    // '@' means userinfo, which makes "https://good.com@evil.com" go to evil.com;
    // '%' in a host is decoded by browsers ("evil%2Ecom"), so neither is accepted.
    if authority.is_empty() || authority.contains(['@', '%']) {
        return None;
    }
    let (raw_host, raw_port) = split_host_port(authority)?;
    let host = raw_host.to_ascii_lowercase();
    let port = match raw_port {
        None => default_port,
        Some(p) => parse_port(p)?,
    };
    let bare_host = host.strip_suffix('.').unwrap_or(&host);
    let well_formed = if bare_host.starts_with('[') {
        matches!(Host::parse(bare_host), Ok(Host::Ipv6(_)))
    } else {
        host_is_well_formed(bare_host)
    };
    if !well_formed {
        return None;
    }

    // Second opinion from the URL standard's parser (what browsers implement): if it
    // sees another scheme, host, port or any userinfo, the two parsers disagree and
    // the target is refused rather than trusted. This also rejects invalid punycode
    // and reads obfuscated IPv4 forms ("127.1", "0x7f.0.0.1") as a different host.
    let url = Url::parse(target).ok()?;
    if url.scheme() != scheme
        || !url.username().is_empty()
        || url.password().is_some()
        || url.host_str() != Some(host.as_str())
        || url.port_or_known_default() != Some(port)
    {
        return None;
    }
    Some(AbsoluteTarget {
        host: bare_host.to_owned(),
        port,
        default_port,
        path: path_of(after),
    })
}

/// Only printable ASCII other than `\` raw, and no control character or `\` in any
/// percent-decoded layer (`%0a`, `%250a`, `%5C`).
fn characters_are_safe(target: &str) -> bool {
    if !target.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
        return false;
    }
    let mut layer = Cow::Borrowed(target.as_bytes());
    for _ in 0..=MAX_DECODE_ROUNDS {
        let decoded: Vec<u8> = percent_decode(&layer).collect();
        if decoded == *layer {
            return true;
        }
        if decoded.iter().any(|&b| b.is_ascii_control() || b == b'\\') {
            return false;
        }
        layer = Cow::Owned(decoded);
    }
    false
}

/// No layer of the path (raw, then each percent-decoding) may contain an empty,
/// whitespace-only or dot segment except an empty last one (a trailing slash).
/// Such segments are what turn `/x/../`, `/%2F` or `/%09/` into `//host` after a
/// server or browser decodes or normalizes the path.
fn path_is_safe(path: &str) -> bool {
    let mut layer = path.as_bytes().to_vec();
    loop {
        if !segments_are_safe(&layer) {
            return false;
        }
        let decoded: Vec<u8> = percent_decode(&layer).collect();
        // Each decoding that changes anything makes the layer shorter, so this ends.
        if decoded == layer {
            return true;
        }
        layer = decoded;
    }
}

fn segments_are_safe(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        // An absolute URL may have no path at all ("https://example.com").
        return path.is_empty();
    };
    let segments: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
    let last = segments.len().saturating_sub(1);
    segments.iter().enumerate().all(|(i, segment)| {
        if segment.is_empty() {
            return i == last;
        }
        let trimmed = segment.trim_ascii();
        !(trimmed.is_empty() || trimmed == b"." || trimmed == b"..")
    })
}

/// The part of a relative reference before its query or fragment.
fn path_of(reference: &str) -> &str {
    let end = reference.find(['?', '#']).unwrap_or(reference.len());
    &reference[..end]
}

fn has_prefix_ignore_case(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// Splits `host[:port]` or `[v6][:port]`; `None` when the colons are ambiguous.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if authority.starts_with('[') {
        let close = authority.find(']')?;
        let (host, rest) = authority.split_at(close + 1);
        return match rest {
            "" => Some((host, None)),
            _ => rest.strip_prefix(':').map(|port| (host, Some(port))),
        };
    }
    match authority.split_once(':') {
        Some((_, port)) if port.contains(':') => None,
        Some((host, port)) => Some((host, Some(port))),
        None => Some((authority, None)),
    }
}

/// Decimal 1-65535, digits only (so no "+443" and no empty port).
fn parse_port(port: &str) -> Option<u16> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse::<u16>().ok().filter(|&p| p != 0)
}

/// Lowercase ASCII labels of letters, digits, '-' and '_', none empty, at most 63
/// bytes each and 253 in total. Anything else (`%`, `*`, `..`) is not a host this
/// module is willing to reason about.
fn host_is_well_formed(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// The URL standard parses a host whose last label is a number (decimal or `0x` hex)
/// as an IPv4 address.
fn ends_in_a_number(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    let hex = last
        .strip_prefix("0x")
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    hex.is_some() || (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(domains: &[&str]) -> RedirectPolicy {
        let domains: Vec<String> = domains.iter().map(|d| (*d).to_owned()).collect();
        RedirectPolicy::new(&domains).expect("test policy is valid")
    }

    fn example() -> RedirectPolicy {
        policy(&["app.example.com", ".example.org"])
    }

    fn assert_refused(policy: &RedirectPolicy, targets: &[&str]) {
        for target in targets {
            assert!(!policy.is_allowed(target), "{target:?} must be refused");
            assert_eq!(policy.validate(target), "/", "{target:?} must fall back to /");
        }
    }

    fn assert_allowed(policy: &RedirectPolicy, targets: &[&str]) {
        for target in targets {
            assert!(policy.is_allowed(target), "{target:?} must be allowed");
            assert_eq!(policy.validate(target), *target);
        }
    }

    // --- allowed ---

    #[test]
    fn root_path_is_allowed() {
        assert_allowed(&RedirectPolicy::default(), &["/"]);
    }

    #[test]
    fn relative_path_with_query_and_fragment_is_allowed() {
        assert_allowed(
            &RedirectPolicy::default(),
            &[
                "/app",
                "/app/",
                "/app?x=1",
                "/app?x=1&y=2#top",
                "/a%20b/c",
                "/app?next=https%3A%2F%2Fx%2Fy",
            ],
        );
    }

    #[test]
    fn query_may_contain_slashes_and_dots() {
        assert_allowed(&RedirectPolicy::default(), &["/app?next=//x/../y", "/app#/../.."]);
    }

    #[test]
    fn exact_host_is_allowed() {
        assert_allowed(
            &example(),
            &[
                "https://app.example.com",
                "https://app.example.com/",
                "https://app.example.com/x?y=1#z",
            ],
        );
    }

    #[test]
    fn host_and_scheme_compare_case_insensitively() {
        assert_allowed(
            &example(),
            &["https://APP.Example.COM/x", "HTTPS://app.example.com/"],
        );
    }

    #[test]
    fn one_trailing_dot_on_the_host_is_ignored() {
        assert_allowed(&example(), &["https://app.example.com./x"]);
        assert_allowed(&policy(&["app.example.com."]), &["https://app.example.com/x"]);
    }

    #[test]
    fn wildcard_entry_allows_the_apex_and_subdomains() {
        assert_allowed(
            &example(),
            &[
                "https://example.org/",
                "https://a.example.org/",
                "https://a.b.example.org/",
            ],
        );
    }

    #[test]
    fn plain_http_on_its_default_port_is_allowed() {
        assert_allowed(
            &example(),
            &["http://app.example.com/", "http://app.example.com:80/"],
        );
    }

    #[test]
    fn explicit_default_port_is_allowed() {
        assert_allowed(&example(), &["https://app.example.com:443/"]);
    }

    #[test]
    fn exact_port_entry_allows_that_port() {
        assert_allowed(
            &policy(&["app.example.com:8443"]),
            &["https://app.example.com:8443/"],
        );
    }

    #[test]
    fn any_port_entry_allows_every_port() {
        assert_allowed(
            &policy(&["app.example.com:*"]),
            &[
                "https://app.example.com/",
                "https://app.example.com:8443/",
                "http://app.example.com:1/",
            ],
        );
    }

    #[test]
    fn punycode_host_matches_exactly() {
        let policy = policy(&["xn--bcher-kva.de"]);
        assert_allowed(&policy, &["https://xn--bcher-kva.de/"]);
        assert_refused(&policy, &["https://bücher.de/"]);
    }

    #[test]
    fn canonical_ip_literals_are_allowed() {
        let policy = policy(&["127.0.0.1:8080", "[::1]:*"]);
        assert_allowed(&policy, &["http://127.0.0.1:8080/", "http://[::1]:3000/"]);
    }

    #[test]
    fn empty_policy_allows_only_paths() {
        let policy = RedirectPolicy::default();
        assert_allowed(&policy, &["/app"]);
        assert_refused(&policy, &["https://app.example.com/"]);
    }

    // --- refused: relative-path tricks ---

    #[test]
    fn empty_target_is_refused() {
        assert_refused(&example(), &[""]);
    }

    #[test]
    fn protocol_relative_url_is_refused() {
        assert_refused(&example(), &["//evil.com", "//evil.com/x", "//app.example.com/"]);
    }

    #[test]
    fn slash_backslash_is_refused() {
        assert_refused(&example(), &["/\\evil.com", "/\\/evil.com"]);
    }

    #[test]
    fn backslash_anywhere_is_refused() {
        assert_refused(
            &example(),
            &["\\\\evil.com", "\\/evil.com", "/app\\x", "/app?x=\\"],
        );
    }

    #[test]
    fn raw_whitespace_between_slashes_is_refused() {
        assert_refused(
            &example(),
            &["/\t/evil.com", "/ /evil.com", "/\n/evil.com", "/\r/evil.com"],
        );
    }

    // CVE-2020-11053 (GHSA-j7px-6hwj-hpjg): percent-encoded whitespace between slashes.
    #[test]
    fn encoded_whitespace_between_slashes_is_refused() {
        assert_refused(
            &example(),
            &[
                "/%09/evil.com",
                "/%0a/evil.com",
                "/%0A/evil.com",
                "/%0b/evil.com",
                "/%0d/evil.com",
                "/%20/evil.com",
            ],
        );
    }

    // CVE-2020-4037 (GHSA-5m6c-jp6f-2vcv): a bypass of the CVE-2020-11053 fix.
    #[test]
    fn repeated_encoded_whitespace_between_slashes_is_refused() {
        assert_refused(
            &example(),
            &["/%09%09/evil.com", "/%20%09/evil.com", "/%20%20/evil.com"],
        );
    }

    #[test]
    fn encoded_slash_after_the_leading_slash_is_refused() {
        assert_refused(
            &example(),
            &["/%2F%2Fevil.com", "/%2f%2fevil.com", "/%2Fevil.com"],
        );
    }

    #[test]
    fn encoded_backslash_is_refused() {
        assert_refused(&example(), &["/%5Cevil.com", "/%5cevil.com", "/app%5Cx"]);
    }

    #[test]
    fn double_encoded_slash_is_refused() {
        assert_refused(
            &example(),
            &["/%252F%252Fevil.com", "/%25252F%25252Fevil.com", "/%255Cevil.com"],
        );
    }

    #[test]
    fn deeply_nested_encoding_is_refused() {
        assert_refused(&example(), &["/app?x=%2525252541"]);
    }

    #[test]
    fn control_character_anywhere_is_refused() {
        assert_refused(
            &example(),
            &[
                "/app?x=%00",
                "/app%0d%0aSet-Cookie:%20x=1",
                "/app\u{0}",
                "/app\u{7f}",
                "/app?x=%7f",
                "/app?x=%250a",
            ],
        );
    }

    #[test]
    fn raw_space_anywhere_is_refused() {
        assert_refused(
            &example(),
            &[" /app", "/app ", "/a b", "https://app.example.com /"],
        );
    }

    #[test]
    fn dot_segments_in_the_path_are_refused() {
        assert_refused(
            &example(),
            &[
                "/./evil.com",
                "/.//evil.com",
                "/../x",
                "/app/..",
                "/%2e%2e/x",
                "/%2E/%2Fevil.com",
                "/app//x",
            ],
        );
    }

    #[test]
    fn non_ascii_target_is_refused() {
        // U+FF0F FULLWIDTH SOLIDUS, U+2215 DIVISION SLASH, U+2028 LINE SEPARATOR.
        assert_refused(
            &example(),
            &[
                "/\u{ff0f}evil.com",
                "/\u{2215}evil.com",
                "/\u{2028}/evil.com",
                "/café",
            ],
        );
    }

    // --- refused: schemes ---

    #[test]
    fn javascript_scheme_is_refused() {
        assert_refused(
            &example(),
            &[
                "javascript:alert(1)",
                "JavaScript:alert(1)",
                "javascript://app.example.com/%0aalert(1)",
            ],
        );
    }

    #[test]
    fn data_scheme_is_refused() {
        assert_refused(
            &example(),
            &["data:text/html,<script>alert(1)</script>", "data:,x"],
        );
    }

    #[test]
    fn vbscript_scheme_is_refused() {
        assert_refused(&example(), &["vbscript:msgbox(1)"]);
    }

    #[test]
    fn other_schemes_are_refused() {
        assert_refused(
            &example(),
            &[
                "ftp://app.example.com/",
                "file:///etc/passwd",
                "ws://app.example.com/",
            ],
        );
    }

    #[test]
    fn scheme_without_double_slash_is_refused() {
        assert_refused(
            &example(),
            &[
                "https:evil.com",
                "https:/evil.com",
                "https:app.example.com",
                "http:/app.example.com/",
            ],
        );
    }

    #[test]
    fn host_relative_reference_is_refused() {
        assert_refused(
            &example(),
            &["evil.com", "app.example.com/x", "?x=1", "#x", ".", "./x"],
        );
    }

    // --- refused: absolute URL tricks ---

    #[test]
    fn unlisted_host_is_refused() {
        assert_refused(&example(), &["https://evil.com/", "https://example.com/"]);
    }

    #[test]
    fn userinfo_is_refused() {
        assert_refused(
            &example(),
            &[
                "https://app.example.com@evil.com/",
                "https://user:pw@app.example.com/",
                "https://@app.example.com/",
            ],
        );
    }

    #[test]
    fn backslash_before_at_sign_is_refused() {
        assert_refused(
            &example(),
            &[
                "https://evil.com\\@app.example.com/",
                "https://evil.com%5C@app.example.com/",
            ],
        );
    }

    // CVE-2021-21291 (GHSA-4mf2-f3wh-gvf2): ".example.com" matched "badexample.com".
    #[test]
    fn suffix_without_a_dot_boundary_is_refused() {
        assert_refused(
            &example(),
            &["https://evilexample.org/", "https://evil-example.org/"],
        );
    }

    #[test]
    fn allowed_domain_as_a_prefix_of_an_attacker_domain_is_refused() {
        assert_refused(
            &example(),
            &[
                "https://app.example.com.evil.com/",
                "https://example.org.evil.com/",
                "https://app.example.comevil.com/",
            ],
        );
    }

    #[test]
    fn exact_entry_does_not_allow_subdomains() {
        assert_refused(&example(), &["https://evil.app.example.com/"]);
    }

    #[test]
    fn wrong_port_is_refused() {
        assert_refused(
            &example(),
            &["https://app.example.com:8443/", "http://app.example.com:443/"],
        );
        assert_refused(
            &policy(&["app.example.com:8443"]),
            &["https://app.example.com/", "https://app.example.com:8444/"],
        );
    }

    #[test]
    fn malformed_port_is_refused() {
        assert_refused(
            &example(),
            &[
                "https://app.example.com:/",
                "https://app.example.com:+443/",
                "https://app.example.com:99999/",
                "https://app.example.com:0/",
                "https://app.example.com:443:443/",
            ],
        );
    }

    #[test]
    fn unicode_lookalike_host_is_refused() {
        // Cyrillic "е" and its punycode form, neither of which is the allowed host.
        assert_refused(
            &example(),
            &["https://app.еxample.com/", "https://app.xn--xample-2of.com/"],
        );
    }

    #[test]
    fn percent_encoded_host_is_refused() {
        assert_refused(
            &example(),
            &["https://app%2Eexample.com/", "https://%61pp.example.com/"],
        );
    }

    #[test]
    fn obfuscated_ip_address_is_refused() {
        let policy = policy(&["127.0.0.1"]);
        assert_allowed(&policy, &["http://127.0.0.1/"]);
        assert_refused(
            &policy,
            &[
                "http://127.1/",
                "http://0x7f.0.0.1/",
                "http://2130706433/",
                "http://0177.0.0.1/",
            ],
        );
    }

    #[test]
    fn extra_trailing_dots_are_refused() {
        assert_refused(
            &example(),
            &["https://app.example.com../", "https://.app.example.com/"],
        );
    }

    #[test]
    fn overlong_target_is_refused() {
        let long = format!("/{}", "a".repeat(MAX_TARGET_LEN));
        assert_refused(&example(), &[&long]);
    }

    #[test]
    fn validate_returns_the_target_or_root() {
        let policy = example();
        assert_eq!(policy.validate("/app?x=1"), "/app?x=1");
        assert_eq!(
            policy.validate("https://app.example.com/x"),
            "https://app.example.com/x"
        );
        assert_eq!(policy.validate("https://evil.com/x"), "/");
    }

    // --- allow-list entries ---

    #[test]
    fn bad_entries_are_rejected_with_a_sentence_naming_them() {
        for (entry, needle) in [
            ("", "is empty"),
            ("  ", "is empty"),
            (".", "not a valid host"),
            ("..example.com", "not a valid host"),
            ("https://example.com", "not a URL"),
            ("example.com/path", "not a URL"),
            ("user@example.com", "not a URL"),
            ("*.example.com", "\".example.com\""),
            (".com", "top-level domain"),
            ("example.com:99999", "port"),
            ("example.com:abc", "port"),
            ("example.com:", "port"),
            ("a:b:c", "more than one ':'"),
            ("exa mple.com", "not a valid host"),
            ("bücher.de", "xn--bcher-kva.de"),
            (".127.0.0.1", "IP address"),
            (".[::1]", "IP address"),
            ("127.1", "canonical IPv4"),
            ("[nope]", "IPv6"),
        ] {
            let err = RedirectPolicy::new(&[entry.to_owned()]).expect_err(entry);
            assert!(
                err.contains(&format!("{entry:?}")),
                "{err:?} should name {entry:?}"
            );
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn entries_are_trimmed_and_lowercased() {
        assert_allowed(&policy(&[" App.Example.COM "]), &["https://app.example.com/"]);
    }
}
