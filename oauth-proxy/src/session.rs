//! The session sealed in cookies: this module owns the encrypted cookie format,
//! splitting it across several cookies, and the `Set-Cookie` text.
//!
//! The cookie is the only server-side state, so everything a forged or replayed
//! cookie could exploit is checked here on every request:
//!
//! * AES-256-GCM authenticated encryption: a flipped byte, a truncated value or
//!   another key fails to open. Each seal takes a fresh random 96-bit nonce.
//! * The cookie name and the issue time are associated data, so a value copied
//!   into another cookie name (say, from a CSRF cookie into the session cookie)
//!   fails, and the issue time cannot be rewritten.
//! * Expiry is enforced here from the sealed issue time, not just by the
//!   browser's `Max-Age`: a stolen or kept cookie stops working server-side.
//! * Key rotation: one current secret seals, previous ones still open.
//!
//! Sealed text is base64url (no padding) of
//! `version (1) | issued_at (u64 BE) | nonce (12) | ciphertext+tag`. The AES key
//! is SHA-256 of a label and the configured secret, so the same secret used for
//! something else elsewhere never yields this key.
//!
//! A sealed session with tokens easily passes the 4096-byte browser limit, hence
//! [`split`]/[`join`]. Note a sibling subdomain can set (toss) a cookie with our
//! name for the parent domain and plant a session of its own; a `__Host-` name
//! prevents that, and [`set_cookie`] enforces that prefix's rules.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

// ring's AES-GCM (assembly): RustCrypto's generic code at the shipped opt-level "s"
// spent about a tenth of the proxy's CPU per request opening a 1 KB session.
use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format version, first byte of every sealed value; bumped on any change.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 8 + NONCE_LEN;
/// Domain separation for the key derivation and the associated data.
const KEY_LABEL: &[u8] = b"chassis-oauth-proxy session cookie key v1\0";
const AAD_LABEL: &[u8] = b"chassis-oauth-proxy session v1\0";
/// Longest sealed text accepted, checked before any decoding work.
const MAX_SEALED_LEN: usize = 64 * 1024;
/// Most cookies [`join`] reads (`name`, `name_1`, ... `name_{MAX_CHUNKS-1}`).
pub const MAX_CHUNKS: usize = 16;
/// Browsers keep at most this many bytes of a cookie's name plus value.
const MAX_COOKIE_LEN: usize = 4096;

/// A random login number for [`Session::login`] (0 only if the system has no
/// randomness to give, which leaves sign-out as precise as the login second).
pub fn new_login() -> u64 {
    ring::rand::generate::<[u8; 8]>(&SystemRandom::new()).map_or(0, |r| u64::from_le_bytes(r.expose()))
}

/// A logged-in session, sealed into the cookie.
#[derive(Serialize, Deserialize, Clone, PartialEq, Default)]
pub struct Session {
    pub user: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub groups: Vec<String>,
    pub preferred_username: Option<String>,
    pub access_token: Option<String>,
    pub id_token: Option<String>,
    pub refresh_token: Option<String>,
    /// Access token expiry, unix seconds.
    pub expires_at: u64,
    /// When the user logged in, unix seconds.
    pub created_at: u64,
    /// A random number drawn at login and kept by refreshes: with the user and
    /// `created_at` it names the session for sign-out, so two logins of one user in the
    /// same second are two sessions. 0 in cookies sealed before it existed.
    #[serde(default)]
    pub login: u64,
    /// When its tokens were issued (the login or the last refresh), unix seconds:
    /// `cookie-refresh` counts from here. 0 in cookies sealed before it existed (then
    /// `created_at` counts).
    #[serde(default)]
    pub refreshed_at: u64,
    /// The identity headers built from the fields above, once (see [`Memo`]).
    #[serde(skip)]
    pub headers: Memo<crate::headers::IdentityValues>,
}

/// A value worked out from a session once and kept beside it, for the requests that
/// reuse the session (sessions are shared, read-only, from the cache of opened
/// cookies). Not part of the session: never sealed, equal whatever it holds, and
/// empty in a clone, since a clone is made to be changed.
pub struct Memo<T>(std::sync::OnceLock<T>);

impl<T> Memo<T> {
    pub fn get_or_init(&self, init: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(init)
    }
}

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Self(std::sync::OnceLock::new())
    }
}

impl<T> Clone for Memo<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> PartialEq for Memo<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

// Hand-written instead of derived so a logged session never carries tokens.
impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |t: &Option<String>| t.as_ref().map(|_| "<redacted>");
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("email", &self.email)
            .field("email_verified", &self.email_verified)
            .field("groups", &self.groups)
            .field("preferred_username", &self.preferred_username)
            .field("access_token", &redact(&self.access_token))
            .field("id_token", &redact(&self.id_token))
            .field("refresh_token", &redact(&self.refresh_token))
            .field("expires_at", &self.expires_at)
            .field("created_at", &self.created_at)
            .field("refreshed_at", &self.refreshed_at)
            .field("login", &self.login)
            .finish()
    }
}

/// Seals and opens sessions with AES-256-GCM. The first key seals; all open.
pub struct Sealer {
    keys: Vec<LessSafeKey>,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// `secret`: 32 bytes as standard or URL-safe base64, with or without
    /// padding (surrounding whitespace, e.g. a file's trailing newline, is
    /// ignored). `previous`: older secrets in the same form, used to open only,
    /// so cookies sealed before a rotation keep working until they expire.
    pub fn new(secret: &str, previous: &[String]) -> Result<Self, String> {
        let mut keys = vec![derive_key(secret).map_err(|e| format!("cookie secret {e}"))?];
        for (i, old) in previous.iter().enumerate() {
            keys.push(derive_key(old).map_err(|e| format!("previous cookie secret #{} {e}", i + 1))?);
        }
        Ok(Self {
            keys,
            random: SystemRandom::new(),
        })
    }

    /// Serializes and encrypts `value` (a [`Session`], or any other state kept
    /// in a cookie such as a login attempt) under a fresh random nonce, binding
    /// `cookie_name` and the issue time `now` (unix s) as associated data.
    /// Returns base64url text without padding, which is cookie-safe.
    pub fn seal<T: Serialize + ?Sized>(
        &self,
        cookie_name: &str,
        value: &T,
        now: u64,
    ) -> Result<String, String> {
        let key = self.keys.first().ok_or("no cookie key")?;
        let plaintext =
            serde_json::to_vec(value).map_err(|e| format!("cookie value does not serialize: {e}"))?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| "no random bytes for the cookie nonce".to_string())?;
        let aad = associated_data(cookie_name, now);
        let mut ciphertext = plaintext;
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut ciphertext,
        )
        .map_err(|_| "cookie value does not encrypt".to_string())?;

        let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
        out.push(VERSION);
        out.extend_from_slice(&now.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a value sealed by [`Sealer::seal`] for `cookie_name` with any of
    /// the keys. Refuses (never panics) bad base64, truncated or tampered input,
    /// another key or cookie name, and a cookie whose issue time plus `max_age`
    /// seconds is before `now`. Since different cookie names never open each
    /// other's values, a value of one type is never read as another.
    pub fn open<T: DeserializeOwned>(
        &self,
        cookie_name: &str,
        sealed: &str,
        now: u64,
        max_age: u64,
    ) -> Result<T, String> {
        self.open_stamped(cookie_name, sealed, now, max_age)
            .map(|(value, _)| value)
    }

    /// [`Sealer::open`], also returning the sealed issue time (unix s).
    fn open_stamped<T: DeserializeOwned>(
        &self,
        cookie_name: &str,
        sealed: &str,
        now: u64,
        max_age: u64,
    ) -> Result<(T, u64), String> {
        if sealed.len() > MAX_SEALED_LEN {
            return Err("cookie too long".into());
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| "cookie is not base64url".to_string())?;
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err("cookie is truncated".into());
        }
        let (header, ciphertext) = bytes.split_at(HEADER_LEN);
        if header[0] != VERSION {
            return Err("cookie has an unknown format version".into());
        }
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&header[1..9]);
        let issued_at = u64::from_be_bytes(issued);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[9..HEADER_LEN]);
        let aad = associated_data(cookie_name, issued_at);

        // Each key gets a fresh copy: a failed open leaves the buffer undefined.
        let mut buffer = Vec::with_capacity(ciphertext.len());
        let plaintext = self
            .keys
            .iter()
            .find_map(|key| {
                buffer.clear();
                buffer.extend_from_slice(ciphertext);
                let opened = key
                    .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut buffer)
                    .ok()?;
                Some(opened.len())
            })
            .map(|len| &buffer[..len])
            .ok_or("cookie does not authenticate (tampered, another key or another cookie name)")?;
        // Checked after decryption: only now is issued_at known to be ours.
        if now > issued_at.saturating_add(max_age) {
            return Err("cookie expired".into());
        }
        let value = serde_json::from_slice(plaintext)
            .map_err(|_| "cookie does not hold the expected value".to_string())?;
        Ok((value, issued_at))
    }
}

/// How many opened sessions [`OpenedSessions`] keeps.
const OPENED_CAPACITY: usize = 512;
/// Bytes of the sealed text's end that index [`OpenedSessions`]: mostly the base64
/// of the GCM tag, different for every seal (each has a fresh random nonce).
const OPENED_KEY_LEN: usize = 24;

/// Sessions opened lately, by their sealed text. A browser sends the same cookie
/// with every request, and opening it (base64, AES-GCM, JSON with three tokens)
/// was about a tenth of the proxy's CPU per request. Only a value that opened is
/// kept; a hit needs the whole sealed text to be equal and is checked against the
/// expiry again. Bounded: when full, everything is dropped at once (no bookkeeping
/// per hit; a busy proxy refills it within its next requests). One cache belongs
/// to one [`Sealer`]: a hit does not ask the sealer again.
pub struct OpenedSessions {
    /// The one cookie name these sessions were sealed for.
    cookie_name: String,
    entries: std::sync::Mutex<HashMap<[u8; OPENED_KEY_LEN], Opened>>,
}

struct Opened {
    sealed: Box<str>,
    /// The sealed issue time (unix s), for the expiry check on a hit.
    issued_at: u64,
    session: Arc<Session>,
}

impl OpenedSessions {
    /// A cache for sessions sealed for `cookie_name`.
    pub fn new(cookie_name: &str) -> Self {
        Self {
            cookie_name: cookie_name.to_string(),
            entries: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The session sealed in `sealed`, from this cache or opened by `sealer` (then
    /// kept). Same refusals as [`Sealer::open`].
    pub fn open(
        &self,
        sealer: &Sealer,
        sealed: &str,
        now: u64,
        max_age: u64,
    ) -> Result<Arc<Session>, String> {
        let key = opened_key(sealed);
        // A poisoned lock only means another request panicked while holding it;
        // the map itself is still a valid map.
        let hit = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries
                .get(&key)
                .filter(|o| *o.sealed == *sealed && now <= o.issued_at.saturating_add(max_age))
                .map(|o| o.session.clone())
        };
        if let Some(session) = hit {
            return Ok(session);
        }
        let (session, issued_at) = sealer.open_stamped::<Session>(&self.cookie_name, sealed, now, max_age)?;
        let session = Arc::new(session);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= OPENED_CAPACITY {
            entries.clear();
        }
        entries.insert(
            key,
            Opened {
                sealed: sealed.into(),
                issued_at,
                session: session.clone(),
            },
        );
        Ok(session)
    }

    /// Drops `session` if kept (sign-out, so its tokens do not stay in memory
    /// after it). A scan, but sign-outs are rare and the cache is small.
    pub fn forget(&self, session: &Arc<Session>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, o| !Arc::ptr_eq(&o.session, session));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn opened_key(sealed: &str) -> [u8; OPENED_KEY_LEN] {
    let tail = &sealed.as_bytes()[sealed.len().saturating_sub(OPENED_KEY_LEN)..];
    let mut key = [0u8; OPENED_KEY_LEN];
    key[..tail.len()].copy_from_slice(tail);
    key
}

/// Decodes a 32-byte secret from standard or URL-safe base64, padded or not,
/// and derives the AES key from it.
fn derive_key(secret: &str) -> Result<LessSafeKey, String> {
    let text = secret.trim();
    let lenient = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let decoded = GeneralPurpose::new(&alphabet::STANDARD, lenient)
        .decode(text)
        .or_else(|_| GeneralPurpose::new(&alphabet::URL_SAFE, lenient).decode(text));
    let raw = match decoded {
        Ok(raw) if raw.len() == 32 => raw,
        Ok(raw) => return Err(format!("must be 32 bytes of base64: got {} bytes", raw.len())),
        Err(_) => {
            return Err(format!(
                "must be 32 bytes of base64: got {} bytes that are not base64",
                text.len()
            ));
        }
    };
    let key = Sha256::new()
        .chain_update(KEY_LABEL)
        .chain_update(&raw)
        .finalize();
    UnboundKey::new(&AES_256_GCM, &key)
        .map(LessSafeKey::new)
        .map_err(|_| "key derivation gave a wrong key length".to_string())
}

/// Associated data: label, length-prefixed cookie name, issue time, so neither
/// the name nor the time can be swapped without failing authentication.
fn associated_data(cookie_name: &str, issued_at: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 16 + cookie_name.len());
    aad.extend_from_slice(AAD_LABEL);
    aad.push(VERSION);
    aad.extend_from_slice(&(cookie_name.len() as u64).to_be_bytes());
    aad.extend_from_slice(cookie_name.as_bytes());
    aad.extend_from_slice(&issued_at.to_be_bytes());
    aad
}

/// Splits a sealed value into cookies `name`, `name_1`, `name_2`, ..., each
/// value at most `chunk` bytes (3800 leaves room for the name and attributes
/// under the browser's 4096). A value that fits stays one cookie named `name`.
///
/// When a session shrinks, the browser still holds the old higher chunks and
/// [`join`] would append them: the caller must clear (see [`clear_cookie`])
/// every `name_N` it received beyond the new count.
pub fn split(name: &str, value: &str, chunk: usize) -> Vec<(String, String)> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut rest = value;
    loop {
        // Cut on a char boundary; sealed text is ASCII, so this is exact there.
        let mut end = rest.len().min(chunk);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end == 0 && !rest.is_empty() {
            // A char longer than `chunk`: take it whole rather than loop forever.
            end = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let (head, tail) = rest.split_at(end);
        let cookie_name = if out.is_empty() {
            name.to_string()
        } else {
            format!("{name}_{}", out.len())
        };
        out.push((cookie_name, head.to_string()));
        if tail.is_empty() {
            return out;
        }
        rest = tail;
    }
}

/// Joins what [`split`] made from the request's cookies, looked up by name with
/// `cookies`. None if `name` itself is missing; stops at the first missing
/// `name_N` and after `MAX_CHUNKS` (16) cookies.
pub fn join<'a>(name: &str, cookies: impl Fn(&str) -> Option<&'a str>) -> Option<Cow<'a, str>> {
    let mut value = Cow::Borrowed(cookies(name)?);
    // Sized for `name_15` up front: this runs on every request.
    let mut chunk = String::with_capacity(name.len() + 3);
    chunk.push_str(name);
    chunk.push('_');
    for i in 1..MAX_CHUNKS {
        chunk.truncate(name.len() + 1);
        let _ = write!(chunk, "{i}");
        match cookies(&chunk) {
            Some(part) => value.to_mut().push_str(part),
            None => break,
        }
    }
    Some(value)
}

/// The `SameSite` cookie attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// Attributes of the cookies the proxy sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieOptions {
    pub domain: Option<String>,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
    /// Seconds; None makes a browser-session cookie.
    pub max_age: Option<u64>,
}

impl Default for CookieOptions {
    fn default() -> Self {
        Self {
            domain: None,
            path: "/".into(),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            max_age: None,
        }
    }
}

/// A `Set-Cookie` header value:
/// `name=value; Path=/; Domain=..; Max-Age=..; Secure; HttpOnly; SameSite=Lax`.
///
/// Refuses: a name that is not an RFC 6265 token; a value with characters
/// outside cookie-octet (no space, `"`, `,`, `;`, `\`, controls, non-ASCII; no
/// quoted values); a path or domain that could inject attributes; name plus
/// value over 4096 bytes (the browser would drop it silently);
/// `SameSite=None` without `Secure` (browsers reject it); and a `__Secure-` or
/// `__Host-` name without the attributes those prefixes require.
pub fn set_cookie(name: &str, value: &str, options: &CookieOptions) -> Result<String, String> {
    if !valid_name(name) {
        return Err(format!(
            "cookie name {name:?} has characters not allowed in a cookie name"
        ));
    }
    if !value.bytes().all(cookie_octet) {
        return Err(format!(
            "cookie {name} has a value with characters not allowed in a cookie"
        ));
    }
    if name.len() + value.len() > MAX_COOKIE_LEN {
        return Err(format!(
            "cookie {name} is {} bytes, over the browser limit of {MAX_COOKIE_LEN}: split it",
            name.len() + value.len()
        ));
    }
    if !valid_path(&options.path) {
        return Err(format!(
            "cookie path {:?} is not an absolute path without ';' or controls",
            options.path
        ));
    }
    if let Some(domain) = &options.domain
        && !valid_domain(domain)
    {
        return Err(format!("cookie domain {domain:?} is not a domain name"));
    }
    if options.same_site == SameSite::None && !options.secure {
        return Err("SameSite=None requires Secure (browsers reject it otherwise)".into());
    }
    let lower = name.to_ascii_lowercase();
    if (lower.starts_with("__secure-") || lower.starts_with("__host-")) && !options.secure {
        return Err(format!(
            "cookie {name}: the __Secure-/__Host- prefix requires Secure"
        ));
    }
    if lower.starts_with("__host-") && (options.domain.is_some() || options.path != "/") {
        return Err(format!(
            "cookie {name}: the __Host- prefix requires Path=/ and no Domain"
        ));
    }
    Ok(render(name, value, options))
}

/// A `Set-Cookie` value that deletes cookie `name` (empty value, `Max-Age=0`)
/// with the same path and domain, which is what identifies it to the browser.
/// Never fails: the options are the proxy's own, checked by [`set_cookie`]
/// when it set the cookie; characters not allowed are dropped here so a
/// misconfiguration can still never inject attributes.
pub fn clear_cookie(name: &str, options: &CookieOptions) -> String {
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii() && token_char(*c as u8))
        .collect();
    let path: String = options
        .path
        .chars()
        .filter(|c| c.is_ascii() && path_char(*c as u8))
        .collect();
    let domain = options
        .domain
        .as_ref()
        .map(|d| {
            d.chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
                .collect::<String>()
        })
        .filter(|d| !d.is_empty());
    let clearing = CookieOptions {
        domain,
        path: if path.starts_with('/') { path } else { "/".into() },
        max_age: Some(0),
        // SameSite=None without Secure would make the browser ignore the clear;
        // SameSite does not identify the cookie, so Lax clears it just the same.
        same_site: if options.same_site == SameSite::None && !options.secure {
            SameSite::Lax
        } else {
            options.same_site
        },
        ..options.clone()
    };
    render(&name, "", &clearing)
}

fn render(name: &str, value: &str, options: &CookieOptions) -> String {
    let mut out = format!("{name}={value}; Path={}", options.path);
    if let Some(domain) = &options.domain {
        out.push_str("; Domain=");
        out.push_str(domain);
    }
    if let Some(max_age) = options.max_age {
        out.push_str(&format!("; Max-Age={max_age}"));
    }
    if options.secure {
        out.push_str("; Secure");
    }
    if options.http_only {
        out.push_str("; HttpOnly");
    }
    out.push_str("; SameSite=");
    out.push_str(options.same_site.as_str());
    out
}

/// RFC 6265 cookie-octet: US-ASCII visible characters except `"` `,` `;` `\`.
fn cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// RFC 9110 tchar: the characters of a token, which RFC 6265 makes a cookie-name.
fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(token_char)
}

/// RFC 6265 path-value: any CHAR except controls and `;`.
fn path_char(b: u8) -> bool {
    (0x20..0x7F).contains(&b) && b != b';'
}

fn valid_path(path: &str) -> bool {
    path.starts_with('/') && path.bytes().all(path_char)
}

/// A DNS name (an optional leading `.` aside): letters, digits and inner `-` per label.
pub(crate) fn valid_domain(domain: &str) -> bool {
    let domain = domain.strip_prefix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const NAME: &str = "_oauth2_proxy";
    const DAY: u64 = 86_400;
    const NOW: u64 = 1_700_000_000;

    fn secret(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    /// Sealed outside this code (Python's `cryptography` AESGCM, from the format in the
    /// module docs: key, associated data, fixed nonce), so a change of the format or of
    /// the AES-GCM implementation that would strand existing cookies fails here.
    const KNOWN_SEALED: &str = "AQAAAABlU_EAAQIDBAUGBwgJCgsMdkx5DPYQZS7FBWcHhcHTp-sd_HQ6UxaYjwaVe2ArdQF9qs-hN5Nn82r0H60RQKKIouev1LIameIoI_T4D97stmOVdY4EIt2-p4lB-1Beoe-A7utMPiyBpFJM1l3QKn-2-VgESDgLa1CgBb6bO4EVUiIKgu6JDrhSZr6FcvrOru2LRsSx-4PAbaEs3Nc9Fpd81hcHYIRMeCc6bI5ixHxT5FHJSonJk-xL2FuDRq4IYvd4oTPDI1nnDDbQ4Jkqt1hH1mdjJlA5IG2SoUa0VZJDHMKxNbmTqtOijlvg-rfr819KYYDErf-0145Im14w3kAK";

    #[test]
    fn a_cookie_sealed_by_another_implementation_of_the_format_opens() {
        let sealer = Sealer::new(&secret(7), &[]).expect("a valid secret");
        let session: Session = sealer
            .open(NAME, KNOWN_SEALED, NOW + 10, DAY)
            .expect("the known cookie opens");
        assert_eq!(
            (
                session.user.as_str(),
                session.groups.as_slice(),
                session.refresh_token.as_deref()
            ),
            ("alice", ["developers".to_string()].as_slice(), Some("rt"))
        );
        assert_eq!((session.created_at, session.expires_at), (NOW, NOW + 3600));
        assert!(
            sealer
                .open::<Session>("_other", KNOWN_SEALED, NOW + 10, DAY)
                .is_err()
        );
    }

    fn sealer() -> Sealer {
        Sealer::new(&secret(7), &[]).expect("valid secret")
    }

    fn session() -> Session {
        Session {
            user: "alice".into(),
            email: Some("alice@example.com".into()),
            email_verified: true,
            groups: vec!["dev".into(), "ops".into()],
            preferred_username: Some("alice".into()),
            access_token: Some("access".into()),
            id_token: Some("id".into()),
            refresh_token: Some("refresh".into()),
            expires_at: NOW + 300,
            created_at: NOW,
            login: 42,
            refreshed_at: 0,
            headers: Default::default(),
        }
    }

    fn raw(sealed: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(sealed).expect("base64url")
    }

    #[test]
    fn an_opened_session_is_kept_and_still_expires() {
        let s = sealer();
        let cache = OpenedSessions::new(NAME);
        let sealed = s.seal(NAME, &session(), NOW).expect("seals");
        let first = cache.open(&s, &sealed, NOW, DAY).expect("opens");
        let again = cache
            .open(&s, &sealed, NOW + 1, DAY)
            .expect("opens from the cache");
        assert!(Arc::ptr_eq(&first, &again), "the second open is a hit");
        assert_eq!(*again, session());
        assert_eq!(cache.len(), 1);
        // Expiry is checked on a hit too, exactly at the sealed issue time + max age.
        assert!(cache.open(&s, &sealed, NOW + DAY, DAY).is_ok());
        assert_eq!(
            cache.open(&s, &sealed, NOW + DAY + 1, DAY).err().as_deref(),
            Some("cookie expired")
        );
        // The caller's max age counts on a hit, not the one of the first open.
        assert!(cache.open(&s, &sealed, NOW + 61, 60).is_err());
        cache.forget(&again);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_tampered_cookie_with_a_kept_ones_ending_is_refused() {
        let s = sealer();
        let cache = OpenedSessions::new(NAME);
        let sealed = s.seal(NAME, &session(), NOW).expect("seals");
        cache.open(&s, &sealed, NOW, DAY).expect("opens");
        // Same last bytes (the cache's index), one byte flipped in the middle.
        let mut bytes = sealed.clone().into_bytes();
        let middle = bytes.len() / 2;
        bytes[middle] = if bytes[middle] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).expect("ASCII");
        assert!(cache.open(&s, &tampered, NOW, DAY).is_err());
        // Shorter than the index and empty values are refused, never matched.
        assert!(cache.open(&s, "abc", NOW, DAY).is_err());
        assert!(cache.open(&s, "", NOW, DAY).is_err());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn kept_sessions_open_only_under_their_own_cookie_name() {
        let s = sealer();
        let csrf = s.seal("_oauth2_proxy_csrf", &session(), NOW).expect("seals");
        let cache = OpenedSessions::new(NAME);
        assert!(cache.open(&s, &csrf, NOW, DAY).is_err());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_cache_of_opened_sessions_stays_bounded() {
        let s = sealer();
        let cache = OpenedSessions::new(NAME);
        for i in 0..=OPENED_CAPACITY as u64 {
            let sealed = s.seal(NAME, &session(), NOW + i).expect("seals");
            cache.open(&s, &sealed, NOW + i, DAY).expect("opens");
            assert!(cache.len() <= OPENED_CAPACITY);
        }
        assert_eq!(cache.len(), 1, "full, so dropped and refilled with the last one");
    }

    #[test]
    fn round_trip() {
        let s = sealer();
        let sealed = s.seal(NAME, &session(), NOW).expect("seals");
        assert!(sealed.bytes().all(cookie_octet));
        assert_eq!(
            s.open::<Session>(NAME, &sealed, NOW + 10, DAY).expect("opens"),
            session()
        );
    }

    #[test]
    fn round_trip_of_a_minimal_session() {
        let minimal = Session {
            user: "bob".into(),
            ..Default::default()
        };
        let s = sealer();
        let sealed = s.seal(NAME, &minimal, NOW).expect("seals");
        assert_eq!(
            s.open::<Session>(NAME, &sealed, NOW, DAY).expect("opens"),
            minimal
        );
    }

    #[test]
    fn each_seal_uses_a_fresh_nonce() {
        let s = sealer();
        let a = s.seal(NAME, &session(), NOW).expect("seals");
        let b = s.seal(NAME, &session(), NOW).expect("seals");
        assert_ne!(a, b);
        assert_ne!(raw(&a)[9..HEADER_LEN], raw(&b)[9..HEADER_LEN]);
    }

    #[test]
    fn tampered_cookie_is_refused() {
        let s = sealer();
        let bytes = raw(&s.seal(NAME, &session(), NOW).expect("seals"));
        // Every byte: version, issue time, nonce, ciphertext and tag.
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                let sealed = URL_SAFE_NO_PAD.encode(&bad);
                assert!(
                    s.open::<Session>(NAME, &sealed, NOW, DAY).is_err(),
                    "byte {i} flipped by {flip:#x}"
                );
            }
        }
        let mut extended = bytes.clone();
        extended.push(0);
        assert!(
            s.open::<Session>(NAME, &URL_SAFE_NO_PAD.encode(&extended), NOW, DAY)
                .is_err()
        );
    }

    #[test]
    fn issue_time_cannot_be_moved_forward() {
        let s = sealer();
        let mut bytes = raw(&s.seal(NAME, &session(), NOW).expect("seals"));
        bytes[1..9].copy_from_slice(&(NOW + 10 * DAY).to_be_bytes());
        let err = s
            .open::<Session>(NAME, &URL_SAFE_NO_PAD.encode(&bytes), NOW + 5 * DAY, DAY)
            .expect_err("refused");
        assert!(err.contains("authenticate"), "{err}");
    }

    #[test]
    fn cookie_sealed_with_another_key_is_refused() {
        let sealed = Sealer::new(&secret(9), &[])
            .expect("valid")
            .seal(NAME, &session(), NOW)
            .expect("seals");
        let err = sealer()
            .open::<Session>(NAME, &sealed, NOW, DAY)
            .expect_err("refused");
        assert!(err.contains("authenticate"), "{err}");
    }

    #[test]
    fn expired_cookie_is_refused_even_if_the_browser_sends_it() {
        let s = sealer();
        let sealed = s.seal(NAME, &session(), NOW).expect("seals");
        assert!(s.open::<Session>(NAME, &sealed, NOW + DAY, DAY).is_ok());
        let err = s
            .open::<Session>(NAME, &sealed, NOW + DAY + 1, DAY)
            .expect_err("expired");
        assert_eq!(err, "cookie expired");
        assert!(s.open::<Session>(NAME, &sealed, u64::MAX, DAY).is_err());
        // A huge max_age must not overflow into "expired long ago" or panic.
        assert!(s.open::<Session>(NAME, &sealed, NOW, u64::MAX).is_ok());
    }

    #[test]
    fn value_moved_to_another_cookie_name_is_refused() {
        let s = sealer();
        let sealed = s.seal("_oauth2_proxy_csrf", &session(), NOW).expect("seals");
        assert!(s.open::<Session>(NAME, &sealed, NOW, DAY).is_err());
        assert!(s.open::<Session>("_oauth2_proxy_csr", &sealed, NOW, DAY).is_err());
        assert!(s.open::<Session>("_oauth2_proxy_csrf", &sealed, NOW, DAY).is_ok());
    }

    #[test]
    fn truncated_cookie_is_refused() {
        let s = sealer();
        let sealed = s.seal(NAME, &session(), NOW).expect("seals");
        for len in 0..sealed.len() {
            assert!(
                s.open::<Session>(NAME, &sealed[..len], NOW, DAY).is_err(),
                "prefix of {len}"
            );
            assert!(
                s.open::<Session>(NAME, &sealed[len + 1..], NOW, DAY).is_err(),
                "suffix from {}",
                len + 1
            );
        }
    }

    #[test]
    fn bad_base64_and_garbage_are_refused_without_panic() {
        let s = sealer();
        for bad in ["", "!!!!", "a", "abc=", "AQ", "====", "é", "a b c"] {
            assert!(s.open::<Session>(NAME, bad, NOW, DAY).is_err(), "{bad:?}");
        }
        // Padded or standard-alphabet forms of a good cookie are not ours.
        let sealed = s.seal(NAME, &session(), NOW).expect("seals");
        let std = base64::engine::general_purpose::STANDARD.encode(raw(&sealed));
        if std != sealed {
            assert!(s.open::<Session>(NAME, &std, NOW, DAY).is_err());
        }
        assert!(
            s.open::<Session>(NAME, &"A".repeat(MAX_SEALED_LEN + 1), NOW, DAY)
                .is_err()
        );
        // Random bytes of every length up to a few headers: never a panic.
        for len in 0..200 {
            let noise: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            let mut with_version = noise.clone();
            if let Some(first) = with_version.first_mut() {
                *first = VERSION;
            }
            for bytes in [noise, with_version] {
                assert!(
                    s.open::<Session>(NAME, &URL_SAFE_NO_PAD.encode(&bytes), NOW, DAY)
                        .is_err()
                );
            }
        }
    }

    #[test]
    fn rotated_key_still_opens_old_cookies() {
        let old = secret(1);
        let new = secret(2);
        let before = Sealer::new(&old, &[]).expect("valid");
        let old_cookie = before.seal(NAME, &session(), NOW).expect("seals");

        let after = Sealer::new(&new, std::slice::from_ref(&old)).expect("valid");
        assert_eq!(
            after
                .open::<Session>(NAME, &old_cookie, NOW + 60, DAY)
                .expect("opens"),
            session()
        );
        // New cookies are sealed with the new key only.
        let new_cookie = after.seal(NAME, &session(), NOW).expect("seals");
        assert!(before.open::<Session>(NAME, &new_cookie, NOW, DAY).is_err());
        assert!(
            Sealer::new(&new, &[])
                .expect("valid")
                .open::<Session>(NAME, &new_cookie, NOW, DAY)
                .is_ok()
        );
        // Rotation does not bypass expiry.
        assert!(
            after
                .open::<Session>(NAME, &old_cookie, NOW + DAY + 1, DAY)
                .is_err()
        );
    }

    #[test]
    fn secret_forms_are_accepted() {
        let bytes = [0xfbu8; 32];
        let forms = [
            base64::engine::general_purpose::STANDARD.encode(bytes),
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes),
            base64::engine::general_purpose::URL_SAFE.encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
            format!("{}\n", base64::engine::general_purpose::STANDARD.encode(bytes)),
        ];
        let sealed = Sealer::new(&forms[0], &[])
            .expect("valid")
            .seal(NAME, &session(), NOW)
            .expect("seals");
        for form in &forms {
            let s = Sealer::new(form, &[]).unwrap_or_else(|e| panic!("{form:?}: {e}"));
            assert!(s.open::<Session>(NAME, &sealed, NOW, DAY).is_ok(), "{form:?}");
        }
    }

    #[test]
    fn wrong_secrets_are_refused_with_a_sentence() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let err = Sealer::new(&short, &[]).expect_err("refused");
        assert_eq!(err, "cookie secret must be 32 bytes of base64: got 16 bytes");

        // 32 raw characters are not 32 bytes of key material.
        let err = Sealer::new("abcdefghijklmnopqrstuvwxyz012345", &[]).expect_err("refused");
        assert_eq!(err, "cookie secret must be 32 bytes of base64: got 24 bytes");

        let err = Sealer::new("not base64 at all!", &[]).expect_err("refused");
        assert!(
            err.starts_with("cookie secret must be 32 bytes of base64: got 18 bytes"),
            "{err}"
        );
        assert!(Sealer::new("", &[]).is_err());

        let err = Sealer::new(&secret(1), &[secret(2), short]).expect_err("refused");
        assert!(
            err.starts_with("previous cookie secret #2 must be 32 bytes"),
            "{err}"
        );
    }

    #[test]
    fn large_session_splits_under_4096_bytes_and_joins_back() {
        let mut big = session();
        big.id_token = Some("i".repeat(5000));
        big.access_token = Some("a".repeat(3000));
        big.refresh_token = Some("r".repeat(1000));
        big.groups = (0..200).map(|i| format!("group-{i}")).collect();
        let s = sealer();
        let sealed = s.seal(NAME, &big, NOW).expect("seals");
        assert!(sealed.len() > 3 * 3800);

        let options = CookieOptions {
            domain: Some("example.com".into()),
            max_age: Some(DAY),
            ..Default::default()
        };
        let parts = split(NAME, &sealed, 3800);
        assert!(parts.len() >= 4);
        assert_eq!(parts[0].0, NAME);
        assert_eq!(parts[1].0, format!("{NAME}_1"));
        let mut jar = HashMap::new();
        for (name, value) in &parts {
            let header = set_cookie(name, value, &options).expect("valid cookie");
            assert!(header.len() < 4096, "{name}: {} bytes", header.len());
            jar.insert(name.clone(), value.clone());
        }
        let joined = join(NAME, |n| jar.get(n).map(String::as_str)).expect("present");
        assert_eq!(joined, sealed);
        assert_eq!(s.open::<Session>(NAME, &joined, NOW, DAY).expect("opens"), big);
    }

    #[test]
    fn small_value_stays_one_cookie() {
        assert_eq!(
            split(NAME, "abc", 3800),
            vec![(NAME.to_string(), "abc".to_string())]
        );
        assert_eq!(split(NAME, "", 3800), vec![(NAME.to_string(), String::new())]);
        assert_eq!(split(NAME, "abcd", 2).len(), 2);
        assert_eq!(split(NAME, "abcde", 2).len(), 3);
        // Zero or tiny chunks and multi-byte text still terminate and rejoin.
        let parts = split(NAME, "aé€", 0);
        assert_eq!(parts.iter().map(|(_, v)| v.as_str()).collect::<String>(), "aé€");
    }

    #[test]
    fn join_stops_at_the_first_gap() {
        let jar: HashMap<&str, &str> =
            [(NAME, "a"), ("_oauth2_proxy_1", "b"), ("_oauth2_proxy_3", "d")].into();
        assert_eq!(join(NAME, |n| jar.get(n).copied()).as_deref(), Some("ab"));
        let jar: HashMap<&str, &str> = [("_oauth2_proxy_1", "b")].into();
        assert_eq!(join(NAME, |n| jar.get(n).copied()), None);
    }

    #[test]
    fn join_reads_a_bounded_number_of_cookies() {
        let jar: HashMap<String, String> = (0..100)
            .map(|i| {
                (
                    if i == 0 {
                        NAME.to_string()
                    } else {
                        format!("{NAME}_{i}")
                    },
                    "x".into(),
                )
            })
            .collect();
        let joined = join(NAME, |n| jar.get(n).map(String::as_str)).expect("present");
        assert_eq!(joined.len(), MAX_CHUNKS);
    }

    #[test]
    fn set_cookie_renders_the_attributes() {
        let options = CookieOptions {
            max_age: Some(3600),
            ..Default::default()
        };
        assert_eq!(
            set_cookie(NAME, "v", &options).expect("valid"),
            "_oauth2_proxy=v; Path=/; Max-Age=3600; Secure; HttpOnly; SameSite=Lax"
        );
        let options = CookieOptions {
            domain: Some(".example.com".into()),
            path: "/app".into(),
            secure: false,
            http_only: false,
            same_site: SameSite::Strict,
            max_age: None,
        };
        assert_eq!(
            set_cookie(NAME, "v", &options).expect("valid"),
            "_oauth2_proxy=v; Path=/app; Domain=.example.com; SameSite=Strict"
        );
    }

    #[test]
    fn samesite_none_without_secure_is_refused() {
        let options = CookieOptions {
            secure: false,
            same_site: SameSite::None,
            ..Default::default()
        };
        assert!(set_cookie(NAME, "v", &options).is_err());
        let options = CookieOptions {
            same_site: SameSite::None,
            ..Default::default()
        };
        assert!(
            set_cookie(NAME, "v", &options)
                .expect("valid")
                .ends_with("; Secure; HttpOnly; SameSite=None")
        );
    }

    #[test]
    fn characters_outside_cookie_octet_are_refused() {
        let options = CookieOptions::default();
        for value in [
            "a;b",
            "a b",
            "a,b",
            "a\"b",
            "\"quoted\"",
            "a\\b",
            "a\r\nSet-Cookie: x=y",
            "é",
            "a\0",
        ] {
            assert!(set_cookie(NAME, value, &options).is_err(), "value {value:?}");
        }
        for name in ["", "a=b", "a b", "a;b", "a,b", "(a)", "a\nb", "é", "a/b"] {
            assert!(set_cookie(name, "v", &options).is_err(), "name {name:?}");
        }
        assert!(set_cookie(NAME, "", &options).is_ok());
    }

    #[test]
    fn attribute_injection_through_path_or_domain_is_refused() {
        let options = CookieOptions {
            path: "/; Domain=evil.com".into(),
            ..Default::default()
        };
        assert!(set_cookie(NAME, "v", &options).is_err());
        let options = CookieOptions {
            path: "app".into(),
            ..Default::default()
        };
        assert!(set_cookie(NAME, "v", &options).is_err());
        for domain in ["evil.com; SameSite=None", "", ".", "a..b", "-a.com", "a b.com"] {
            let options = CookieOptions {
                domain: Some(domain.into()),
                ..Default::default()
            };
            assert!(set_cookie(NAME, "v", &options).is_err(), "{domain:?}");
        }
    }

    #[test]
    fn oversized_cookie_is_refused() {
        let options = CookieOptions::default();
        assert!(set_cookie(NAME, &"a".repeat(4096), &options).is_err());
        assert!(set_cookie(NAME, &"a".repeat(4096 - NAME.len()), &options).is_ok());
    }

    #[test]
    fn cookie_prefixes_are_enforced() {
        let plain = CookieOptions {
            secure: false,
            ..Default::default()
        };
        assert!(set_cookie("__Secure-s", "v", &plain).is_err());
        assert!(set_cookie("__Host-s", "v", &plain).is_err());
        let with_domain = CookieOptions {
            domain: Some("example.com".into()),
            ..Default::default()
        };
        assert!(set_cookie("__Host-s", "v", &with_domain).is_err());
        assert!(set_cookie("__Secure-s", "v", &with_domain).is_ok());
        let sub_path = CookieOptions {
            path: "/app".into(),
            ..Default::default()
        };
        assert!(set_cookie("__Host-s", "v", &sub_path).is_err());
        assert!(set_cookie("__Host-s", "v", &CookieOptions::default()).is_ok());
    }

    #[test]
    fn clear_cookie_expires_it_at_the_same_path_and_domain() {
        let options = CookieOptions {
            domain: Some("example.com".into()),
            path: "/app".into(),
            max_age: Some(DAY),
            ..Default::default()
        };
        assert_eq!(
            clear_cookie(NAME, &options),
            "_oauth2_proxy=; Path=/app; Domain=example.com; Max-Age=0; Secure; HttpOnly; SameSite=Lax"
        );
        // A clear that the browser would reject is not a clear.
        let insecure_none = CookieOptions {
            secure: false,
            same_site: SameSite::None,
            ..Default::default()
        };
        assert_eq!(
            clear_cookie(NAME, &insecure_none),
            "_oauth2_proxy=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn clear_cookie_cannot_inject_attributes() {
        let options = CookieOptions {
            domain: Some("evil.com; SameSite=None".into()),
            path: "/; Max-Age=99999".into(),
            ..Default::default()
        };
        let header = clear_cookie("a;b=c", &options);
        let attributes: Vec<&str> = header
            .split("; ")
            .map(|a| a.split('=').next().unwrap_or(a))
            .collect();
        assert_eq!(
            attributes,
            [
                "abc", "Path", "Domain", "Max-Age", "Secure", "HttpOnly", "SameSite"
            ],
            "{header}"
        );
        assert!(header.contains("; Max-Age=0;"), "{header}");
    }

    #[test]
    fn debug_output_redacts_tokens() {
        let shown = format!("{:?}", session());
        for secret in ["\"access\"", "\"id\"", "\"refresh\""] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("alice"));
        assert!(!format!("{:?}", sealer()).is_empty());
    }
}
