//! Configuration: command-line flags, `CHASSIS_OAUTH_PROXY_*` environment variables
//! and a YAML file (`--config`), in rising order of precedence file < environment <
//! flags. Every key has the same name everywhere (`--cookie-secret`,
//! `CHASSIS_OAUTH_PROXY_COOKIE_SECRET`, `cookie-secret:`). Unknown keys and invalid
//! values fail at start-up with a sentence naming the key; `--config-test` stops
//! there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use url::Url;

/// A secret from the flags, the file or a secret file: `Debug` never prints it, so a
/// configuration can be logged or shown in a test failure without leaking it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// The flags. Each is optional here so that the file can supply it; [`Config::load`]
/// applies defaults and checks that required keys are present. A boolean flag given
/// bare means true (`--pass-access-token`), as Go's flags do for oauth2-proxy users.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "chassis-oauth-proxy",
    version,
    about = "OIDC authenticating reverse proxy"
)]
pub struct Flags {
    /// YAML file with any of the keys below (flag names without the dashes).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check the configuration and exit (0 when valid).
    #[arg(long)]
    pub config_test: bool,

    /// Address to serve the proxy on [default: 0.0.0.0:4180].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_HTTP_ADDRESS")]
    pub http_address: Option<SocketAddr>,
    /// Address for /metrics, separate from the proxy [default: 0.0.0.0:9180].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// The upstream every authenticated request goes to (http:// or https:// URL).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_UPSTREAM")]
    pub upstream: Option<String>,
    /// PEM bundle of CAs to trust for an https:// upstream (in addition to the Mozilla roots).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// How long the upstream may take to connect and send its response headers; then
    /// the client gets 504 [default: 30s].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Option<String>,

    /// OpenID Connect issuer URL (discovery at <issuer>/.well-known/openid-configuration).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_OIDC_ISSUER_URL")]
    pub oidc_issuer_url: Option<String>,
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_CLIENT_ID")]
    pub client_id: Option<String>,
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<Secret>,
    /// File holding the client secret (instead of --client-secret).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,
    /// The exact callback URL registered with the issuer (…/oauth2/callback).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_REDIRECT_URL")]
    pub redirect_url: Option<String>,
    /// Scopes to request [default: openid email profile].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_SCOPE")]
    pub scope: Option<String>,
    /// PEM bundle of CAs to trust for the issuer (in addition to the Mozilla roots).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_PROVIDER_CA_FILE")]
    pub provider_ca_file: Option<PathBuf>,
    /// ID token claim holding the groups [default: groups].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_GROUPS_CLAIM")]
    pub groups_claim: Option<String>,

    /// 32 bytes, base64: the key sessions are sealed with.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_SECRET", hide_env_values = true)]
    pub cookie_secret: Option<Secret>,
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_SECRET_FILE")]
    pub cookie_secret_file: Option<PathBuf>,
    /// [default: _chassis_oauth]
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_NAME")]
    pub cookie_name: Option<String>,
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_DOMAIN")]
    pub cookie_domain: Option<String>,
    /// Send cookies only over HTTPS [default: true].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_SECURE", num_args = 0..=1, default_missing_value = "true")]
    pub cookie_secure: Option<bool>,
    /// lax, strict or none [default: lax].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_SAMESITE")]
    pub cookie_samesite: Option<String>,
    /// Session lifetime, e.g. 168h [default: 168h].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_EXPIRE")]
    pub cookie_expire: Option<String>,
    /// Refresh the tokens once they are older than this (and at the latest a minute
    /// before the access token expires); 0 disables [default: 0].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_COOKIE_REFRESH")]
    pub cookie_refresh: Option<String>,

    /// Only members of one of these groups get in (repeat or comma-separate).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_ALLOWED_GROUPS", value_delimiter = ',')]
    pub allowed_groups: Option<Vec<String>>,
    /// Only verified emails in these domains get in; `*` allows any.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_EMAIL_DOMAINS", value_delimiter = ',')]
    pub email_domains: Option<Vec<String>>,
    /// Domains a login may redirect back to: `example.com`, `.example.com`, with `:port`.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_WHITELIST_DOMAINS", value_delimiter = ',')]
    pub whitelist_domains: Option<Vec<String>>,
    /// Anchored regexes of paths served without authentication (matched on the normalized path).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_SKIP_AUTH_PATHS", value_delimiter = ',')]
    pub skip_auth_paths: Option<Vec<String>>,
    /// CIDRs of reverse proxies whose X-Forwarded-* headers are trusted (none by default).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_TRUSTED_PROXY_CIDRS", value_delimiter = ',')]
    pub trusted_proxy_cidrs: Option<Vec<String>>,
    /// Pass the client's Host header to the upstream; false sends the upstream URL's
    /// host (the public one stays in X-Forwarded-Host) [default: true].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_PASS_HOST_HEADER", num_args = 0..=1, default_missing_value = "true")]
    pub pass_host_header: Option<bool>,
    /// How long a client connection may sit idle between requests, and take to send a
    /// request's head (hyper counts both from the end of the previous response). Keep
    /// it above the idle timeout of the load balancer in front [default: 75s].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Send the access token upstream in X-Forwarded-Access-Token.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_PASS_ACCESS_TOKEN", num_args = 0..=1, default_missing_value = "true")]
    pub pass_access_token: Option<bool>,
    /// Sign-out also ends the session at the issuer (its end-session endpoint), when
    /// it has one [default: true].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_PROVIDER_SIGN_OUT", num_args = 0..=1, default_missing_value = "true")]
    pub provider_sign_out: Option<bool>,
    /// Serving threads, each with its own event loop and listening socket; 1 runs
    /// everything on one thread [default: the CPUs available].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Accept `Authorization: Bearer <JWT>` from the login issuer for this client id.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_SKIP_JWT_BEARER_TOKENS", num_args = 0..=1, default_missing_value = "true")]
    pub skip_jwt_bearer_tokens: Option<bool>,
    /// More issuers whose JWTs are accepted as bearer tokens: `issuer-url=audience`.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_EXTRA_JWT_ISSUERS", value_delimiter = ',')]
    pub extra_jwt_issuers: Option<Vec<String>>,
    /// Clock skew allowed on bearer tokens' exp/nbf/iat [default: 30s; at most 5m].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_BEARER_CLOCK_SKEW")]
    pub bearer_clock_skew: Option<String>,
    /// Kubernetes RBAC decides who gets in: a SubjectAccessReview with these resource
    /// attributes (JSON, e.g. {"namespace":"a","verb":"get","resource":"services","name":"web"})
    /// for the signed-in user and groups.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_SAR_RESOURCE_ATTRIBUTES")]
    pub sar_resource_attributes: Option<String>,
    /// The claim that names the user in SubjectAccessReviews: sub, email (verified
    /// only) or preferred_username [default: sub]; as the API server's --oidc-username-claim.
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_SAR_USERNAME_CLAIM")]
    pub sar_username_claim: Option<String>,
    /// Put before the user name in SubjectAccessReviews (the API server's
    /// --oidc-username-prefix, e.g. "oidc:") [default: none].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_SAR_USERNAME_PREFIX")]
    pub sar_username_prefix: Option<String>,
    /// Put before each group in SubjectAccessReviews (the API server's
    /// --oidc-groups-prefix) [default: none].
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_SAR_GROUPS_PREFIX")]
    pub sar_groups_prefix: Option<String>,
    /// Kubeconfig for SubjectAccessReviews (in-cluster configuration when unset).
    #[arg(long, env = "CHASSIS_OAUTH_PROXY_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// The YAML file: the same keys as the flags, unknown keys refused.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    pub http_address: Option<SocketAddr>,
    pub metrics_address: Option<SocketAddr>,
    pub upstream: Option<String>,
    pub upstream_ca_file: Option<PathBuf>,
    pub upstream_timeout: Option<String>,
    pub oidc_issuer_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    pub redirect_url: Option<String>,
    pub scope: Option<String>,
    pub provider_ca_file: Option<PathBuf>,
    pub groups_claim: Option<String>,
    pub cookie_secret: Option<Secret>,
    pub cookie_secret_file: Option<PathBuf>,
    pub cookie_name: Option<String>,
    pub cookie_domain: Option<String>,
    pub cookie_secure: Option<bool>,
    pub cookie_samesite: Option<String>,
    pub cookie_expire: Option<String>,
    pub cookie_refresh: Option<String>,
    pub allowed_groups: Option<Vec<String>>,
    pub email_domains: Option<Vec<String>>,
    pub whitelist_domains: Option<Vec<String>>,
    pub skip_auth_paths: Option<Vec<String>>,
    pub trusted_proxy_cidrs: Option<Vec<String>>,
    pub pass_access_token: Option<bool>,
    pub pass_host_header: Option<bool>,
    pub idle_timeout: Option<String>,
    pub provider_sign_out: Option<bool>,
    pub worker_threads: Option<usize>,
    pub skip_jwt_bearer_tokens: Option<bool>,
    pub extra_jwt_issuers: Option<Vec<String>>,
    pub bearer_clock_skew: Option<String>,
    pub sar_resource_attributes: Option<serde_json::Value>,
    pub sar_username_claim: Option<String>,
    pub sar_username_prefix: Option<String>,
    pub sar_groups_prefix: Option<String>,
    pub kubeconfig: Option<PathBuf>,
}

/// The claim that names the user in a SubjectAccessReview.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SarClaim {
    Sub,
    /// Only when `email_verified` (the API server's OIDC authenticator insists too).
    Email,
    PreferredUsername,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

/// The checked configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub upstream: Url,
    /// Trust anchors for an https:// upstream: the Mozilla roots plus `upstream-ca-file`,
    /// read and parsed at start-up so `--config-test` refuses what TLS would.
    pub upstream_roots: rustls::RootCertStore,
    /// Until the upstream's response headers (connecting included).
    pub upstream_timeout: Duration,
    /// The issuer identifier exactly as configured: discovery and the `iss` claim compare
    /// it as a string (OpenID Connect Discovery 4.3), so a trailing `/` (Auth0 has one)
    /// must neither be added nor removed.
    pub issuer_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_url: Url,
    pub scopes: Vec<String>,
    /// Extra CAs for the issuer (`provider-ca-file`), read at start-up like the upstream's.
    pub provider_cas: Vec<CertificateDer<'static>>,
    pub groups_claim: String,
    pub cookie_secret: Secret,
    pub cookie_name: String,
    pub cookie_domain: Option<String>,
    pub cookie_secure: bool,
    pub cookie_samesite: SameSite,
    pub cookie_expire: Duration,
    pub cookie_refresh: Option<Duration>,
    pub allowed_groups: Vec<String>,
    pub email_domains: Vec<String>,
    pub whitelist_domains: Vec<String>,
    pub skip_auth_paths: Vec<regex::Regex>,
    pub trusted_proxy_cidrs: Vec<IpNet>,
    pub pass_access_token: bool,
    pub pass_host_header: bool,
    /// Idle time allowed between a client's requests (and for a request head).
    pub idle_timeout: Duration,
    /// Sign-out sends the browser to the issuer's end-session endpoint too.
    pub provider_sign_out: bool,
    pub worker_threads: usize,
    /// `(issuer, audience)` pairs whose JWTs are accepted as bearer tokens.
    pub bearer_issuers: Vec<(String, String)>,
    pub bearer_clock_skew: Duration,
    /// SubjectAccessReview resource attributes every user must be allowed.
    pub sar: Option<k8s_openapi::api::authorization::v1::ResourceAttributes>,
    /// How the review names the user and groups: as the cluster's API server names the
    /// same people when they sign in with this issuer, so its RoleBindings match.
    pub sar_username_claim: SarClaim,
    pub sar_username_prefix: String,
    pub sar_groups_prefix: String,
    pub kubeconfig: Option<PathBuf>,
}

/// Parses `1h30m`, `90s`, `168h`, `0` into a duration; the error names the key.
pub fn parse_duration(key: &str, text: &str) -> Result<Duration, String> {
    let bad = || format!("{key}: {text:?} is not a duration such as 30s, 15m, 1h30m or 168h");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0u64;
    let mut number = String::new();
    let mut seen_unit = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let seconds = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(seconds)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        seen_unit = true;
    }
    if !number.is_empty() || !seen_unit {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// A secret given inline or as a file (`<key>-file`). The flags and the environment
/// give the pair as one: when they give either half, the config file's pair is not
/// read, as any other key of theirs wins over the file's.
fn secret(
    key: &str,
    upper: (Option<Secret>, Option<PathBuf>),
    lower: (Option<Secret>, Option<PathBuf>),
) -> Result<Secret, String> {
    let pair = if upper.0.is_some() || upper.1.is_some() {
        upper
    } else {
        lower
    };
    match pair {
        (Some(_), Some(_)) => Err(format!("{key} and {key}-file are both set; use one")),
        (Some(s), None) => Ok(s),
        (None, Some(f)) => read_secret(&format!("{key}-file"), &f),
        (None, None) => Err(format!("{key} (or {key}-file) is required")),
    }
}

/// Whether a cookie with `Domain=domain` may be set by `host` (RFC 6265 5.1.3: the
/// host is the domain or ends in `.domain`; a leading `.` is ignored).
fn domain_covers(domain: &str, host: &str) -> bool {
    let domain = domain.trim_start_matches('.').to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    !domain.is_empty()
        && (host == domain
            || host
                .strip_suffix(domain.as_str())
                .is_some_and(|rest| rest.ends_with('.')))
}

fn read_secret(key: &str, file: &Path) -> Result<Secret, String> {
    std::fs::read_to_string(file)
        .map(|s| Secret(s.trim().to_string()))
        .map_err(|e| format!("{key}: cannot read {}: {e}", file.display()))
}

/// Every certificate of a PEM bundle; a missing file, or one without a certificate
/// (DER, a key), is an error naming the key, not "no extra CA".
fn pem_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let what = |e: &dyn std::fmt::Display| format!("{key}: {}: {e}", path.display());
    let pem = std::fs::read(path).map_err(|e| what(&e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| what(&e))?;
    if certs.is_empty() {
        return Err(what(&"holds no PEM certificate"));
    }
    Ok(certs)
}

/// The Mozilla roots plus every certificate of a PEM bundle.
fn trust_anchors(key: &str, path: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let Some(path) = path else {
        return Ok(roots);
    };
    for cert in pem_certificates(key, path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn url(key: &str, text: &str, schemes: &[&str]) -> Result<Url, String> {
    let parsed = Url::parse(text).map_err(|e| format!("{key}: {text:?} is not a URL: {e}"))?;
    if !schemes.contains(&parsed.scheme()) {
        return Err(format!("{key}: {text:?} must be a {} URL", schemes.join(" or ")));
    }
    if parsed.host_str().is_none() {
        return Err(format!("{key}: {text:?} has no host"));
    }
    Ok(parsed)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The upstream base: credentials in it would be dropped when requests are built (and
/// printed in the start-up log), a query or fragment would be dropped too.
fn upstream_url(text: &str) -> Result<Url, String> {
    let parsed = url("upstream", text, &["http", "https"])?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("upstream: must not hold a user name or password".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("upstream: {text:?} must not have a query or fragment"));
    }
    Ok(parsed)
}

/// Flags win over the file (the environment arrives through the flags, via clap).
macro_rules! pick {
    ($flags:expr, $file:expr, $field:ident) => {
        $flags.$field.clone().or_else(|| $file.$field.take())
    };
}

/// `text` (or `default`) as a duration that must be more than 0; errors name `key`.
fn positive_duration(key: &str, text: Option<String>, default: &str) -> Result<Duration, String> {
    match parse_duration(key, text.as_deref().unwrap_or(default))? {
        d if d.is_zero() => Err(format!("{key}: must be more than 0")),
        d => Ok(d),
    }
}

/// A list value with its entries trimmed (`a, b` in an environment variable is two
/// entries, not `a` and ` b`); an empty entry is refused, as it matches nothing.
fn list(key: &str, values: Option<Vec<String>>) -> Result<Vec<String>, String> {
    values
        .unwrap_or_default()
        .iter()
        .map(|v| match v.trim() {
            "" => Err(format!("{key}: an entry is empty (a stray comma?)")),
            t => Ok(t.to_string()),
        })
        .collect()
}

/// `*`, a domain, or `.domain` / `*.domain` for its subdomains; anything else (an
/// `@`, a wildcard inside) would match no email at all. The error says why, without
/// naming the setting (`--email-domains`, or a route's `allowed_email_domains`).
pub(crate) fn email_domain(text: &str) -> Result<(), String> {
    let name = text
        .strip_prefix("*.")
        .or_else(|| text.strip_prefix('.'))
        .unwrap_or(text);
    let subdomains = name.len() < text.len();
    if text == "*" {
        return Ok(());
    }
    if !crate::session::valid_domain(name) || name.starts_with('.') {
        return Err(format!(
            "{text:?} is not a domain (corp.com; .corp.com or *.corp.com for its subdomains; * for any)"
        ));
    }
    // `.com` would let in every address under a top-level domain.
    if subdomains && !name.contains('.') {
        return Err(format!(
            "{text:?} would let in every address under a top-level domain; name the organisation's domain (.corp.com)"
        ));
    }
    Ok(())
}

/// The prefix of every environment variable the proxy reads.
const ENV_PREFIX: &str = "CHASSIS_OAUTH_PROXY_";

/// Refuses a `CHASSIS_OAUTH_PROXY_*` variable that is no setting: a typo such as
/// `..._ALLOWED_GROUP` would otherwise be ignored and the proxy start with a wider
/// rule than intended. The variables kubelet derives from a Service named
/// `chassis-oauth-proxy` (`..._SERVICE_HOST`, `..._PORT_4180_TCP`, ...) are not ours
/// and are left alone.
pub fn check_environment<I>(vars: I) -> Result<(), String>
where
    I: IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
{
    use clap::CommandFactory;
    let command = Flags::command();
    let known: Vec<&str> = command
        .get_arguments()
        .filter_map(|a| a.get_env()?.to_str())
        .collect();
    for (name, _) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if service_link(rest) || known.contains(&name) {
            continue;
        }
        let closest = known
            .iter()
            .map(|k| (strsim::levenshtein(k, name), k))
            .min()
            .filter(|(distance, _)| *distance <= 3)
            .map(|(_, k)| format!(" (did you mean {k}?)"))
            .unwrap_or_default();
        return Err(format!(
            "environment: {name} is not a setting of chassis-oauth-proxy{closest}"
        ));
    }
    Ok(())
}

/// Whether `rest` (a variable's name after [`ENV_PREFIX`]) has the shape of what
/// kubelet derives from a Service whose name starts with `chassis-oauth-proxy`
/// (`chassis-oauth-proxy-grafana` gives `..._GRAFANA_SERVICE_HOST`,
/// `..._GRAFANA_PORT_4180_TCP_ADDR`, ...): such a variable appears in every pod of
/// the namespace when anyone creates such a Service, and must not stop the proxy.
/// No setting of ours has a `SERVICE` or `PORT` word.
fn service_link(rest: &str) -> bool {
    let words: Vec<&str> = rest.split('_').collect();
    let service = words
        .windows(2)
        .any(|w| w[0] == "SERVICE" && (w[1] == "HOST" || w[1] == "PORT"));
    let port = words.last() == Some(&"PORT")
        || words.windows(3).any(|w| {
            w[0] == "PORT"
                && !w[1].is_empty()
                && w[1].bytes().all(|b| b.is_ascii_digit())
                && matches!(w[2], "TCP" | "UDP" | "SCTP")
        });
    service || port
}

/// The keys of Kubernetes' ResourceAttributes. k8s-openapi skips unknown keys, so a
/// typo (`resourceName`, `subResource`) would silently widen the check.
const SAR_KEYS: [&str; 9] = [
    "namespace",
    "verb",
    "group",
    "version",
    "resource",
    "subresource",
    "name",
    "fieldSelector",
    "labelSelector",
];

impl Config {
    /// Reads the file named by `--config` (if any) and merges it under the flags.
    pub fn load(flags: &Flags) -> Result<Self, String> {
        let file = match &flags.config {
            None => File::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("config: cannot read {}: {e}", path.display()))?;
                serde_saphyr::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?
            }
        };
        Self::merge(flags, file)
    }

    pub fn merge(flags: &Flags, mut file: File) -> Result<Self, String> {
        // An empty value is no value: `--client-id ""` would fail only at the issuer.
        let required = |key: &str, v: Option<String>| {
            v.filter(|v| !v.trim().is_empty())
                .ok_or_else(|| format!("{key} is required"))
        };
        let client_secret = secret(
            "client-secret",
            (flags.client_secret.clone(), flags.client_secret_file.clone()),
            (file.client_secret.take(), file.client_secret_file.take()),
        )?;
        let cookie_secret = secret(
            "cookie-secret",
            (flags.cookie_secret.clone(), flags.cookie_secret_file.clone()),
            (file.cookie_secret.take(), file.cookie_secret_file.take()),
        )?;
        let samesite = match pick!(flags, file, cookie_samesite).as_deref().unwrap_or("lax") {
            "lax" | "Lax" => SameSite::Lax,
            "strict" | "Strict" => SameSite::Strict,
            "none" | "None" => SameSite::None,
            other => return Err(format!("cookie-samesite: {other:?} must be lax, strict or none")),
        };
        let cookie_secure = pick!(flags, file, cookie_secure).unwrap_or(true);
        if samesite == SameSite::None && !cookie_secure {
            return Err(
                "cookie-samesite: none requires cookie-secure: true (browsers refuse it otherwise)".into(),
            );
        }
        let cookie_expire = positive_duration("cookie-expire", pick!(flags, file, cookie_expire), "168h")?;
        let refresh = parse_duration(
            "cookie-refresh",
            pick!(flags, file, cookie_refresh).as_deref().unwrap_or("0"),
        )?;
        let skip_auth_paths = list("skip-auth-paths", pick!(flags, file, skip_auth_paths))?
            .iter()
            .map(|p| {
                // Anchored whatever the user wrote: a rule never matches a mere substring.
                let anchored = format!("^(?:{})$", p.trim_start_matches('^').trim_end_matches('$'));
                regex::Regex::new(&anchored).map_err(|e| {
                    format!(
                        "skip-auth-paths: {p:?} is not a valid regex: {e} (the flag and the environment variable split on commas: a regex with a comma, such as a{{1,3}}, goes in the config file's list)"
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let trusted_proxy_cidrs = list("trusted-proxy-cidrs", pick!(flags, file, trusted_proxy_cidrs))?
            .iter()
            .map(|c| {
                c.parse::<IpNet>()
                    .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("trusted-proxy-cidrs: {c:?} is not a CIDR or an IP address"))
            })
            .collect::<Result<_, _>>()?;
        let cookie_name = pick!(flags, file, cookie_name).unwrap_or_else(|| "_chassis_oauth".into());
        if cookie_name.is_empty()
            || !cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(format!(
                "cookie-name: {cookie_name:?} may only hold letters, digits, '_', '-' and '.'"
            ));
        }
        let issuer = required("oidc-issuer-url", pick!(flags, file, oidc_issuer_url))?;
        let redirect = required("redirect-url", pick!(flags, file, redirect_url))?;
        let redirect_url = url("redirect-url", &redirect, &["http", "https"])?;
        if redirect_url.path() != "/oauth2/callback" {
            return Err(format!(
                "redirect-url: {redirect:?} must end in /oauth2/callback, the path the proxy serves"
            ));
        }
        // Browsers keep a Secure cookie from an http:// page only on localhost: the CSRF
        // cookie would be dropped and every login refused at the callback.
        if redirect_url.scheme() == "http" && cookie_secure && !is_loopback(&redirect_url) {
            return Err(format!(
                "redirect-url: {redirect:?} is http://, so browsers drop the Secure login cookies; use https:// or set cookie-secure: false"
            ));
        }
        let cookie_domain = pick!(flags, file, cookie_domain);
        // A value that is no domain name at all gets the cookie library's message later.
        if let Some(domain) = &cookie_domain
            && domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            && let Some(host) = redirect_url.host_str()
            && !domain_covers(domain, host)
        {
            return Err(format!(
                "cookie-domain: {domain:?} does not cover {host}, the redirect-url's host: browsers would refuse the cookies the login sets there and every login would start again"
            ));
        }
        let upstream = required("upstream", pick!(flags, file, upstream))?;
        let scopes: Vec<String> = pick!(flags, file, scope)
            .unwrap_or_else(|| "openid email profile".into())
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !scopes.iter().any(|s| s == "openid") {
            return Err("scope: must include openid".into());
        }
        let client_id = required("client-id", pick!(flags, file, client_id))?;
        let mut bearer_issuers = Vec::new();
        let skip_jwt = pick!(flags, file, skip_jwt_bearer_tokens);
        if skip_jwt == Some(true) {
            bearer_issuers.push((issuer.clone(), client_id.clone()));
        }
        let extra = list("extra-jwt-issuers", pick!(flags, file, extra_jwt_issuers))?;
        // oauth2-proxy ignores the list unless the flag is on: a configuration carried
        // over from it without the flag must not start taking these issuers' tokens.
        if skip_jwt != Some(true) && !extra.is_empty() {
            return Err("extra-jwt-issuers: bearer tokens are taken only with skip-jwt-bearer-tokens: true (oauth2-proxy ignores this list without it); set it, or remove the list".into());
        }
        for pair in extra {
            let (iss, aud) = pair
                .rsplit_once('=')
                .filter(|(i, a)| !i.is_empty() && !a.is_empty())
                .ok_or_else(|| format!("extra-jwt-issuers: {pair:?} must be issuer-url=audience"))?;
            url("extra-jwt-issuers", iss, &["http", "https"])?;
            bearer_issuers.push((iss.to_string(), aud.to_string()));
        }
        let bearer_clock_skew = parse_duration(
            "bearer-clock-skew",
            pick!(flags, file, bearer_clock_skew).as_deref().unwrap_or("30s"),
        )?;
        if bearer_clock_skew > Duration::from_secs(300) {
            return Err("bearer-clock-skew: at most 5m".into());
        }
        let sar_text = flags
            .sar_resource_attributes
            .as_ref()
            .map(|t| serde_json::from_str::<serde_json::Value>(t).map_err(|e| e.to_string()))
            .or_else(|| file.sar_resource_attributes.take().map(Ok))
            .transpose()
            .map_err(|e| format!("sar-resource-attributes: not JSON: {e}"))?;
        let sar = sar_text
            .map(|v| {
                let Some(keys) = v.as_object() else {
                    return Err("sar-resource-attributes: must be a JSON object".to_string());
                };
                if let Some(unknown) = keys.keys().find(|k| !SAR_KEYS.contains(&k.as_str())) {
                    return Err(format!(
                        "sar-resource-attributes: unknown key {unknown:?} (known: {})",
                        SAR_KEYS.join(", ")
                    ));
                }
                let attrs: k8s_openapi::api::authorization::v1::ResourceAttributes =
                    serde_json::from_value(v).map_err(|e| format!("sar-resource-attributes: {e}"))?;
                if attrs.verb.as_deref().is_none_or(str::is_empty) {
                    return Err("sar-resource-attributes: verb is required".to_string());
                }
                if attrs.resource.as_deref().is_none_or(str::is_empty) {
                    return Err("sar-resource-attributes: resource is required".to_string());
                }
                Ok(attrs)
            })
            .transpose()?;
        let config = Self {
            http_address: pick!(flags, file, http_address).unwrap_or_else(|| ([0, 0, 0, 0], 4180).into()),
            metrics_address: pick!(flags, file, metrics_address)
                .unwrap_or_else(|| ([0, 0, 0, 0], 9180).into()),
            upstream: upstream_url(&upstream)?,
            upstream_roots: trust_anchors(
                "upstream-ca-file",
                pick!(flags, file, upstream_ca_file).as_deref(),
            )?,
            upstream_timeout: positive_duration(
                "upstream-timeout",
                pick!(flags, file, upstream_timeout),
                "30s",
            )?,
            issuer_url: {
                url("oidc-issuer-url", &issuer, &["http", "https"])?;
                issuer.clone()
            },
            client_id,
            client_secret,
            redirect_url,
            scopes,
            provider_cas: match pick!(flags, file, provider_ca_file) {
                Some(path) => pem_certificates("provider-ca-file", &path)?,
                None => Vec::new(),
            },
            groups_claim: pick!(flags, file, groups_claim).unwrap_or_else(|| "groups".into()),
            cookie_secret,
            cookie_name,
            cookie_domain,
            cookie_secure,
            cookie_samesite: samesite,
            cookie_expire,
            cookie_refresh: (!refresh.is_zero()).then_some(refresh),
            allowed_groups: list("allowed-groups", pick!(flags, file, allowed_groups))?,
            email_domains: {
                let domains = list("email-domains", pick!(flags, file, email_domains))?;
                domains
                    .iter()
                    .try_for_each(|d| email_domain(d).map_err(|e| format!("email-domains: {e}")))?;
                domains
            },
            whitelist_domains: list("whitelist-domains", pick!(flags, file, whitelist_domains))?,
            skip_auth_paths,
            trusted_proxy_cidrs,
            pass_access_token: pick!(flags, file, pass_access_token).unwrap_or(false),
            pass_host_header: pick!(flags, file, pass_host_header).unwrap_or(true),
            // Above the 60 s that AWS load balancers and ingress-nginx's upstream
            // keep-alive default to: the side in front must close an idle connection
            // first, or a request it sends as this side closes gets a 502.
            idle_timeout: positive_duration("idle-timeout", pick!(flags, file, idle_timeout), "75s")?,
            provider_sign_out: pick!(flags, file, provider_sign_out).unwrap_or(true),
            worker_threads: match pick!(flags, file, worker_threads) {
                Some(0) => return Err("worker-threads: must be at least 1".into()),
                Some(n) if n > 1024 => return Err(format!("worker-threads: {n} is more than 1024")),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, usize::from),
            },
            bearer_issuers,
            bearer_clock_skew,
            sar,
            sar_username_claim: match pick!(flags, file, sar_username_claim).as_deref() {
                None | Some("sub") => SarClaim::Sub,
                Some("email") => SarClaim::Email,
                Some("preferred_username") => SarClaim::PreferredUsername,
                Some(other) => {
                    return Err(format!(
                        "sar-username-claim: {other:?} must be sub, email or preferred_username"
                    ));
                }
            },
            // `-` means none, as in the API server's --oidc-username-prefix.
            sar_username_prefix: pick!(flags, file, sar_username_prefix)
                .filter(|p| p != "-")
                .unwrap_or_default(),
            sar_groups_prefix: pick!(flags, file, sar_groups_prefix).unwrap_or_default(),
            kubeconfig: pick!(flags, file, kubeconfig),
        };
        if config.http_address == config.metrics_address {
            return Err("metrics-address: must differ from http-address".into());
        }
        // Without a rule every account the issuer can sign in gets through (any Google
        // or GitHub user, with a public issuer). oauth2-proxy refuses that too.
        if config.allowed_groups.is_empty() && config.email_domains.is_empty() && config.sar.is_none() {
            return Err("allowed-groups, email-domains, sar-resource-attributes: none is set, so every account the issuer signs in would get through; set one (email-domains: \"*\" lets in every verified email address on purpose)".into());
        }
        Ok(config)
    }
}

/// The fewest flags a valid configuration needs (tests of this crate build on them).
#[cfg(test)]
pub(crate) fn minimal_flags() -> Flags {
    Flags {
        upstream: Some("http://127.0.0.1:8080".into()),
        oidc_issuer_url: Some("https://idp.example.com".into()),
        client_id: Some("app".into()),
        client_secret: Some("s3cret".into()),
        redirect_url: Some("https://app.example.com/oauth2/callback".into()),
        cookie_secret: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
        email_domains: Some(vec!["example.com".into()]),
        ..Flags::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Flags {
        minimal_flags()
    }

    #[test]
    fn extra_jwt_issuers_without_bearer_tokens_turned_on_stop_the_start() -> Result<(), String> {
        let mut flags = minimal();
        flags.extra_jwt_issuers = Some(vec!["https://partner.example.com=api".into()]);
        for off in [None, Some(false)] {
            flags.skip_jwt_bearer_tokens = off;
            let err = Config::merge(&flags, File::default()).expect_err("listed, not on");
            assert!(
                err.starts_with("extra-jwt-issuers: bearer tokens are taken only with"),
                "{err}"
            );
        }
        flags.skip_jwt_bearer_tokens = Some(true);
        assert_eq!(Config::merge(&flags, File::default())?.bearer_issuers.len(), 2);
        Ok(())
    }

    #[test]
    fn a_cookie_domain_the_login_host_cannot_set_or_an_empty_client_id_stops_the_start() {
        // The redirect URL's host is app.example.com.
        for covering in ["example.com", ".example.com", "APP.example.com"] {
            let mut flags = minimal();
            flags.cookie_domain = Some(covering.into());
            assert!(Config::merge(&flags, File::default()).is_ok(), "{covering}");
        }
        for other in [
            "corp.com",
            "pp.example.com",
            "ample.com",
            "sub.app.example.com",
            ".",
        ] {
            let mut flags = minimal();
            flags.cookie_domain = Some(other.into());
            let err = Config::merge(&flags, File::default()).expect_err(other);
            assert!(
                err.starts_with("cookie-domain:") && err.contains("app.example.com"),
                "{err}"
            );
        }
        let mut flags = minimal();
        flags.client_id = Some(" ".into());
        let err = Config::merge(&flags, File::default()).expect_err("empty client id");
        assert_eq!(err, "client-id is required");
    }

    #[test]
    fn a_proxy_without_any_authorization_rule_does_not_start() -> Result<(), String> {
        let mut flags = minimal();
        flags.email_domains = None;
        let err = Config::merge(&flags, File::default()).err().unwrap_or_default();
        assert!(
            err.contains("every account the issuer signs in would get through")
                && err.contains("email-domains"),
            "{err}"
        );
        // Any one rule will do, from any source.
        flags.allowed_groups = Some(vec!["developers".into()]);
        Config::merge(&flags, File::default())?;
        flags.allowed_groups = None;
        Config::merge(&flags, file("email-domains: ['*']\n")?)?;
        Config::merge(
            &flags,
            file("sar-resource-attributes: {verb: get, resource: services}\n")?,
        )?;
        Ok(())
    }

    fn file(yaml: &str) -> Result<File, String> {
        serde_saphyr::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_secure() -> Result<(), String> {
        let c = Config::merge(&minimal(), File::default())?;
        assert!(c.cookie_secure);
        assert_eq!(c.cookie_samesite, SameSite::Lax);
        assert_eq!(c.cookie_expire, Duration::from_secs(168 * 3600));
        assert!(
            c.trusted_proxy_cidrs.is_empty(),
            "no client is trusted with X-Forwarded-* by default"
        );
        assert!(!c.pass_access_token);
        assert!(c.pass_host_header);
        assert!(
            c.idle_timeout > Duration::from_secs(60),
            "idle connections outlive a load balancer's 60 s idle timeout"
        );
        Ok(())
    }

    #[test]
    fn issuers_are_kept_exactly_as_configured() -> Result<(), String> {
        // Discovery and the `iss` claim compare the issuer as a string: Auth0's ends in `/`.
        let mut flags = minimal();
        flags.oidc_issuer_url = Some("https://tenant.example.com/".into());
        flags.skip_jwt_bearer_tokens = Some(true);
        flags.extra_jwt_issuers = Some(vec!["https://other.example.com/=api".into()]);
        let c = Config::merge(&flags, File::default())?;
        assert_eq!(c.issuer_url, "https://tenant.example.com/");
        assert_eq!(
            c.bearer_issuers,
            [
                ("https://tenant.example.com/".to_string(), "app".to_string()),
                ("https://other.example.com/".to_string(), "api".to_string()),
            ]
        );
        flags.oidc_issuer_url = Some("https://idp.example.com/realms/corp".into());
        let c = Config::merge(&flags, File::default())?;
        assert_eq!(c.issuer_url, "https://idp.example.com/realms/corp");
        Ok(())
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named() {
        let err = file("cookie-secre: x\n").err().unwrap_or_default();
        assert!(err.contains("unknown field `cookie-secre`"), "{err}");
    }

    #[test]
    fn http_redirect_urls_need_insecure_cookies_except_on_loopback() -> Result<(), String> {
        for loopback in [
            "http://127.0.0.1:4180/oauth2/callback",
            "http://localhost:4180/oauth2/callback",
            "http://[::1]:4180/oauth2/callback",
        ] {
            let mut flags = minimal();
            flags.redirect_url = Some(loopback.into());
            Config::merge(&flags, File::default()).map_err(|e| format!("{loopback}: {e}"))?;
        }
        let mut flags = minimal();
        flags.redirect_url = Some("http://app.internal/oauth2/callback".into());
        flags.cookie_secure = Some(false);
        Config::merge(&flags, File::default())?;
        Ok(())
    }

    #[test]
    fn the_configuration_debug_output_holds_no_secret() -> Result<(), String> {
        let mut flags = minimal();
        flags.client_secret = Some("client-s3cret-value".into());
        let secret = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
        flags.cookie_secret = Some(secret.into());
        let config = Config::merge(&flags, File::default())?;
        for shown in [format!("{config:?}"), format!("{flags:?}")] {
            assert!(
                !shown.contains("client-s3cret-value") && !shown.contains(secret),
                "{shown}"
            );
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        assert_eq!(config.client_secret.expose(), "client-s3cret-value");
        Ok(())
    }

    #[test]
    fn invalid_values_name_their_key() {
        type Edit = Box<dyn Fn(&mut Flags)>;
        let not_pem = std::env::temp_dir().join(format!("chassis-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "not a certificate\n").expect("writing the test's not-PEM file");
        let (upstream_not_pem, also_not_pem) = (not_pem.clone(), not_pem.clone());
        let cases: [(&str, Edit); 32] = [
            ("worker-threads", Box::new(|f| f.worker_threads = Some(0))),
            (
                "upstream-ca-file",
                Box::new(move |f| f.upstream_ca_file = Some(upstream_not_pem.clone())),
            ),
            (
                "upstream-ca-file",
                Box::new(|f| f.upstream_ca_file = Some("/nonexistent/ca.pem".into())),
            ),
            // The issuer's CA file is read at start-up too, not at the first discovery.
            (
                "provider-ca-file",
                Box::new(move |f| f.provider_ca_file = Some(also_not_pem.clone())),
            ),
            (
                "provider-ca-file",
                Box::new(|f| f.provider_ca_file = Some("/nonexistent/ca.pem".into())),
            ),
            // Browsers drop Secure cookies on http:// pages (but on localhost).
            (
                "redirect-url",
                Box::new(|f| f.redirect_url = Some("http://app.example.com/oauth2/callback".into())),
            ),
            (
                "upstream",
                Box::new(|f| f.upstream = Some("http://user:pw@127.0.0.1:8080".into())),
            ),
            (
                "upstream",
                Box::new(|f| f.upstream = Some("http://127.0.0.1:8080/?x=1".into())),
            ),
            (
                "upstream",
                Box::new(|f| f.upstream = Some("http://127.0.0.1:8080/#top".into())),
            ),
            (
                "extra-jwt-issuers",
                Box::new(|f| f.extra_jwt_issuers = Some(vec!["https://idp=".into()])),
            ),
            (
                "upstream-timeout",
                Box::new(|f| f.upstream_timeout = Some("0".into())),
            ),
            (
                "upstream-timeout",
                Box::new(|f| f.upstream_timeout = Some("soon".into())),
            ),
            ("cookie-expire", Box::new(|f| f.cookie_expire = Some("7d".into()))),
            (
                "skip-auth-paths",
                Box::new(|f| f.skip_auth_paths = Some(vec!["/health(".into()])),
            ),
            (
                "trusted-proxy-cidrs",
                Box::new(|f| f.trusted_proxy_cidrs = Some(vec!["10.0.0.0/33".into()])),
            ),
            (
                "redirect-url",
                Box::new(|f| f.redirect_url = Some("https://app.example.com/callback".into())),
            ),
            (
                "cookie-samesite",
                Box::new(|f| f.cookie_samesite = Some("sometimes".into())),
            ),
            ("upstream", Box::new(|f| f.upstream = Some("ftp://x".into()))),
            (
                "sar-resource-attributes",
                Box::new(|f| f.sar_resource_attributes = Some("{verb: get".into())),
            ),
            (
                "sar-resource-attributes",
                Box::new(|f| f.sar_resource_attributes = Some(r#"{"verb":"get"}"#.into())),
            ),
            (
                "extra-jwt-issuers",
                Box::new(|f| f.extra_jwt_issuers = Some(vec!["https://idp".into()])),
            ),
            (
                "bearer-clock-skew",
                Box::new(|f| f.bearer_clock_skew = Some("1h".into())),
            ),
            // openshift/oauth-proxy's spelling, and a typo: both would be dropped by
            // k8s-openapi and the check become a plain `get services`.
            (
                "sar-resource-attributes",
                Box::new(|f| {
                    f.sar_resource_attributes =
                        Some(r#"{"verb":"get","resource":"services","resourceName":"web"}"#.into())
                }),
            ),
            (
                "sar-resource-attributes",
                Box::new(|f| {
                    f.sar_resource_attributes =
                        Some(r#"{"verb":"get","resource":"services","subResource":"proxy"}"#.into())
                }),
            ),
            (
                "sar-resource-attributes",
                Box::new(|f| f.sar_resource_attributes = Some(r#"["get"]"#.into())),
            ),
            (
                "email-domains",
                Box::new(|f| f.email_domains = Some(vec!["@corp.com".into()])),
            ),
            (
                "email-domains",
                Box::new(|f| f.email_domains = Some(vec!["corp.*".into()])),
            ),
            (
                "email-domains",
                Box::new(|f| f.email_domains = Some(vec!["*.com".into()])),
            ),
            (
                "email-domains",
                Box::new(|f| f.email_domains = Some(vec!["corp.com".into(), "".into()])),
            ),
            (
                "allowed-groups",
                Box::new(|f| f.allowed_groups = Some(vec!["admins".into(), " ".into()])),
            ),
            (
                "sar-username-claim",
                Box::new(|f| f.sar_username_claim = Some("upn".into())),
            ),
            ("idle-timeout", Box::new(|f| f.idle_timeout = Some("0".into()))),
        ];
        for (key, edit) in cases {
            let mut flags = minimal();
            edit(&mut flags);
            let err = Config::merge(&flags, File::default()).err().unwrap_or_default();
            assert!(err.starts_with(key), "{key}: {err}");
        }
        let err = {
            let mut flags = minimal();
            flags.provider_ca_file = Some(not_pem.clone());
            Config::merge(&flags, File::default()).err().unwrap_or_default()
        };
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let _ = std::fs::remove_file(&not_pem);
        let mut flags = minimal();
        flags.client_secret = None;
        let err = Config::merge(&flags, File::default()).err().unwrap_or_default();
        assert_eq!(err, "client-secret (or client-secret-file) is required");
    }

    #[test]
    fn a_bare_boolean_flag_means_true_and_a_valued_one_its_value() -> Result<(), String> {
        let base = [
            "chassis-oauth-proxy",
            "--upstream",
            "http://127.0.0.1:8080",
            "--cookie-secure",
            "false",
            "--pass-access-token",
            "--skip-jwt-bearer-tokens",
        ];
        let flags = Flags::try_parse_from(base).map_err(|e| e.to_string())?;
        assert_eq!(flags.cookie_secure, Some(false));
        assert_eq!(flags.pass_access_token, Some(true));
        assert_eq!(flags.skip_jwt_bearer_tokens, Some(true));
        assert_eq!(flags.provider_sign_out, None);
        let flags = Flags::try_parse_from(["chassis-oauth-proxy", "--provider-sign-out=false"])
            .map_err(|e| e.to_string())?;
        assert_eq!(flags.provider_sign_out, Some(false));
        Ok(())
    }

    #[test]
    fn list_entries_are_trimmed_and_subdomain_rules_accepted() -> Result<(), String> {
        let mut flags = minimal();
        // What `CHASSIS_OAUTH_PROXY_EMAIL_DOMAINS="corp.com, .partner.com"` gives.
        flags.email_domains = Some(vec![
            "corp.com".into(),
            " .partner.com".into(),
            "*.eu.corp.com".into(),
        ]);
        flags.allowed_groups = Some(vec![" admins ".into()]);
        let c = Config::merge(&flags, File::default())?;
        assert_eq!(c.email_domains, ["corp.com", ".partner.com", "*.eu.corp.com"]);
        assert_eq!(c.allowed_groups, ["admins"]);
        Ok(())
    }

    #[test]
    fn an_unknown_environment_variable_of_ours_is_named() {
        let var = |name: &str| (std::ffi::OsString::from(name), std::ffi::OsString::from("x"));
        let err = check_environment([var("CHASSIS_OAUTH_PROXY_ALLOWED_GROUP")])
            .err()
            .unwrap_or_default();
        assert_eq!(
            err,
            "environment: CHASSIS_OAUTH_PROXY_ALLOWED_GROUP is not a setting of chassis-oauth-proxy (did you mean CHASSIS_OAUTH_PROXY_ALLOWED_GROUPS?)"
        );
        let err = check_environment([var("CHASSIS_OAUTH_PROXY_NONSENSE_XYZ")])
            .err()
            .unwrap_or_default();
        assert_eq!(
            err,
            "environment: CHASSIS_OAUTH_PROXY_NONSENSE_XYZ is not a setting of chassis-oauth-proxy"
        );
        // Ours, other programs', and what kubelet derives from a Service named
        // chassis-oauth-proxy.
        let fine = [
            "CHASSIS_OAUTH_PROXY_ALLOWED_GROUPS",
            "CHASSIS_OAUTH_PROXY_CONFIG",
            "OAUTH2_PROXY_EMAIL_DOMAINS",
            "PATH",
            "CHASSIS_OAUTH_PROXY_SERVICE_HOST",
            "CHASSIS_OAUTH_PROXY_SERVICE_PORT_HTTP",
            "CHASSIS_OAUTH_PROXY_PORT",
            "CHASSIS_OAUTH_PROXY_PORT_4180_TCP_ADDR",
            // ... and from Services named chassis-oauth-proxy-grafana and -metrics.
            "CHASSIS_OAUTH_PROXY_GRAFANA_SERVICE_HOST",
            "CHASSIS_OAUTH_PROXY_GRAFANA_SERVICE_PORT_HTTP",
            "CHASSIS_OAUTH_PROXY_GRAFANA_PORT",
            "CHASSIS_OAUTH_PROXY_GRAFANA_PORT_4180_TCP_PROTO",
            "CHASSIS_OAUTH_PROXY_METRICS_PORT_9180_UDP",
        ];
        assert_eq!(check_environment(fine.map(var)), Ok(()));
    }

    #[test]
    fn a_secret_file_from_the_environment_wins_over_an_inline_secret_in_the_file() -> Result<(), String> {
        let path = std::env::temp_dir().join(format!("chassis-client-secret-{}", std::process::id()));
        std::fs::write(&path, "from-the-mounted-file\n").map_err(|e| e.to_string())?;
        let mut flags = minimal();
        flags.client_secret = None;
        flags.client_secret_file = Some(path.clone());
        let merged = Config::merge(&flags, file("client-secret: from-the-config-file\n")?);
        let _ = std::fs::remove_file(&path);
        assert_eq!(merged?.client_secret.expose(), "from-the-mounted-file");
        // Both halves from one source stay an error.
        flags.client_secret = Some("inline".into());
        let err = Config::merge(&flags, File::default()).err().unwrap_or_default();
        assert_eq!(err, "client-secret and client-secret-file are both set; use one");
        Ok(())
    }

    #[test]
    fn flags_win_over_the_file() -> Result<(), String> {
        let mut flags = minimal();
        flags.cookie_name = Some("_from_flag".into());
        flags.email_domains = None;
        let c = Config::merge(
            &flags,
            file("cookie-name: _from_file\nemail-domains: [corp.example]\n")?,
        )?;
        assert_eq!(c.cookie_name, "_from_flag");
        assert_eq!(c.email_domains, ["corp.example"]);
        Ok(())
    }

    #[test]
    fn skip_auth_paths_are_anchored() -> Result<(), String> {
        let mut flags = minimal();
        flags.skip_auth_paths = Some(vec!["/healthz".into(), "^/public/.*".into()]);
        let c = Config::merge(&flags, File::default())?;
        assert!(c.skip_auth_paths[0].is_match("/healthz"));
        assert!(
            !c.skip_auth_paths[0].is_match("/admin/healthz"),
            "no substring matches"
        );
        assert!(!c.skip_auth_paths[0].is_match("/healthz/../admin"));
        assert!(c.skip_auth_paths[1].is_match("/public/app.js"));
        Ok(())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("k", "1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("k", "90s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("k", "90").is_err());
        assert!(parse_duration("k", "h").is_err());
        assert!(parse_duration("k", "99999999999999999999h").is_err());
    }
}
