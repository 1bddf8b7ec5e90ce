//! The one request path that both the proxy and the upstream see.
//!
//! The proxy decides with this path (the `skipAuthPaths` regexes, the upstream URL's
//! path) and forwards the same string upstream when a decision rests on it. If the two
//! read a path differently, a request can look public to the proxy and private to the
//! upstream: `/public/..%2Fadmin`, `/public;/../admin` (Tomcat drops `;` parameters),
//! `/public/%2e%2e/admin`. So [`normalize`] produces a canonical form and refuses every
//! path whose meaning depends on who decodes it (such a path is then never public):
//!
//! * dot-segments (`.`, `..`) are resolved and repeated slashes collapsed, so the
//!   regexes match the resource the upstream will serve; `..` above the root is an
//!   error;
//! * escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, every
//!   other escape is kept with uppercase hex, and other characters a browser may
//!   send raw (`|`, `[`, non-ASCII) are percent-encoded, so equivalent spellings
//!   become one string and `normalize(normalize(x)) == normalize(x)`;
//! * refused, raw or encoded: `\`, `;`, control characters (including NUL);
//!   encoded only: `/` (`%2F`), `?` (`%3F`), `#` (`%23`), `%` followed by two hex
//!   digits (`%252F`, double encoding); raw only: `?`, `#`, space; and dot-segments
//!   spelled with escapes (`%2E%2E`, `.%2e`), invalid escapes, and escapes that do
//!   not decode to UTF-8.
//!
//! An encoded space (`%20`) or any other reserved character stays encoded and is
//! accepted: it names one resource for everyone.

use thiserror::Error;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("the path is empty or does not start with '/'")]
    NotAbsolute,
    #[error(
        "the path contains '?' or '#'; only the path component, without query or fragment, can be normalized"
    )]
    QueryOrFragment,
    #[error("the path contains a control character (raw or percent-encoded)")]
    ControlCharacter,
    #[error("the path contains a raw space, which is not valid in a request target")]
    RawSpace,
    #[error("the path contains a backslash (raw or %5C), which some servers read as '/'")]
    Backslash,
    #[error(
        "the path contains an encoded slash (%2F), which some servers decode into a separator and others do not"
    )]
    EncodedSlash,
    #[error(
        "the path contains an encoded '?' or '#' (%3F or %23), which some servers decode into a delimiter"
    )]
    EncodedDelimiter,
    #[error("the path contains ';' (raw or %3B), which some servers read as the start of path parameters")]
    PathParameter,
    #[error(
        "the path contains a dot-segment spelled with escapes (like %2E%2E), which some servers resolve and others do not"
    )]
    EncodedDotSegment,
    #[error(
        "the path contains a double percent-encoding (%25 followed by two hex digits), which servers that decode twice read differently"
    )]
    DoubleEncoding,
    #[error("the path contains a '%' that is not followed by two hex digits")]
    InvalidPercentEncoding,
    #[error("the path's percent-escapes do not decode to UTF-8")]
    NotUtf8,
    #[error("the path uses \"..\" to climb above the root")]
    AboveRoot,
}

/// From the request-target's path component (no query; the caller splits it off, but be defensive: a '?' or '#' in the input is an error),
/// returns the canonical path: percent-decoded once for unreserved characters only, dot-segments ("." and "..") resolved, repeated slashes collapsed.
pub fn normalize(raw_path: &str) -> Result<String, PathError> {
    // Most paths are canonical already; the general walk below allocates per segment.
    if is_canonical_already(raw_path) {
        return Ok(raw_path.to_string());
    }
    normalize_segments(raw_path)
}

/// Whether `normalize` would return `raw_path` unchanged, judged in one pass: it starts
/// with '/', has only characters kept raw (no '%'), no empty segment but a last one
/// (a trailing slash), and no dot-segment. A path this misses takes the general walk.
fn is_canonical_already(raw_path: &str) -> bool {
    let Some(rest) = raw_path.strip_prefix('/') else {
        return false;
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        let plain = segment.bytes().all(|b| is_unreserved(b) || is_safe_raw(b));
        if !plain || matches!(segment, "." | "..") || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

fn normalize_segments(raw_path: &str) -> Result<String, PathError> {
    let rest = raw_path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let raw_segments: Vec<&str> = rest.split('/').collect();
    let last = raw_segments.len().saturating_sub(1);

    let mut kept: Vec<String> = Vec::with_capacity(raw_segments.len());
    let mut trailing_slash = false;
    for (i, raw) in raw_segments.into_iter().enumerate() {
        // Every segment is checked, even ones a later ".." removes: a refused
        // character is refused wherever it appears.
        let segment = canonical_segment(raw)?;
        let is_last = i == last;
        match segment.text.as_str() {
            "." | ".." if segment.has_encoded_dot => return Err(PathError::EncodedDotSegment),
            // Empty (from "//" or a trailing "/") and "." name the current directory.
            "" | "." => trailing_slash = is_last,
            ".." => {
                kept.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = is_last;
            }
            _ => {
                kept.push(segment.text);
                trailing_slash = false;
            }
        }
    }

    let mut path = String::with_capacity(raw_path.len());
    for segment in &kept {
        path.push('/');
        path.push_str(segment);
    }
    // RFC 3986 keeps the slash after a final "." or ".." ("/a/b/.." is "/a/"), and
    // "/a/" and "/a" are different resources to many upstreams.
    if trailing_slash || kept.is_empty() {
        path.push('/');
    }
    Ok(path)
}

struct Segment {
    text: String,
    /// A '.' in `text` came from `%2E`, which matters only if `text` is a dot-segment.
    has_encoded_dot: bool,
}

/// Canonicalizes one segment (between slashes) and checks what it decodes to.
fn canonical_segment(raw: &str) -> Result<Segment, PathError> {
    let bytes = raw.as_bytes();
    let mut text = String::with_capacity(bytes.len());
    // The segment fully decoded, for the UTF-8 and control-character checks.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut has_encoded_dot = false;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        if byte == b'%' {
            let value = match (
                bytes.get(i + 1).and_then(hex_value),
                bytes.get(i + 2).and_then(hex_value),
            ) {
                (Some(high), Some(low)) => (high << 4) | low,
                _ => return Err(PathError::InvalidPercentEncoding),
            };
            match value {
                b'/' => return Err(PathError::EncodedSlash),
                b'\\' => return Err(PathError::Backslash),
                b'?' | b'#' => return Err(PathError::EncodedDelimiter),
                b';' => return Err(PathError::PathParameter),
                v if v.is_ascii_control() => return Err(PathError::ControlCharacter),
                v if is_unreserved(v) => {
                    has_encoded_dot |= v == b'.';
                    text.push(char::from(v));
                }
                v => push_escape(&mut text, v),
            }
            decoded.push(value);
            i += 3;
            continue;
        }
        match byte {
            b'?' | b'#' => return Err(PathError::QueryOrFragment),
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter),
            b' ' => return Err(PathError::RawSpace),
            b if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            b if is_unreserved(b) || is_safe_raw(b) => text.push(char::from(b)),
            // Characters browsers send raw but RFC 3986 wants encoded ('|', '[', '"',
            // non-ASCII bytes): encoding them changes nothing for an upstream that
            // decodes, and gives each resource a single spelling.
            b => push_escape(&mut text, b),
        }
        decoded.push(byte);
        i += 1;
    }

    let decoded = std::str::from_utf8(&decoded).map_err(|_| PathError::NotUtf8)?;
    // C1 controls (U+0080-U+009F) arrive as two-byte escapes and only show up here.
    if decoded.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter);
    }
    // Checked on the output, so "%25%32%46" (which canonicalizes to "%252F") is
    // caught too and a second normalize never fails where the first succeeded.
    if has_double_encoding(&text) {
        return Err(PathError::DoubleEncoding);
    }
    Ok(Segment {
        text,
        has_encoded_dot,
    })
}

/// RFC 3986 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~".
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// The rest of RFC 3986 `pchar` that is kept raw: sub-delims except ';', ':' and '@'.
fn is_safe_raw(byte: u8) -> bool {
    matches!(
        byte,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
    )
}

fn hex_value(digit: &u8) -> Option<u8> {
    char::from(*digit).to_digit(16).and_then(|v| u8::try_from(v).ok())
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0x0f)]));
}

fn has_double_encoding(text: &str) -> bool {
    text.as_bytes()
        .windows(5)
        .any(|w| w.starts_with(b"%25") && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        normalize(raw).unwrap_or_else(|e| panic!("{raw:?} should normalize: {e}"))
    }

    fn refused(raws: &[&str], expected: PathError) {
        for raw in raws {
            assert_eq!(normalize(raw), Err(expected.clone()), "{raw:?}");
        }
    }

    /// The shortcut for paths that are canonical already must agree with the general
    /// walk on every input: all strings up to five characters long over an alphabet
    /// of separators, dots, escapes and characters of every class.
    #[test]
    fn the_shortcut_agrees_with_the_general_walk() {
        let alphabet = ['/', '.', 'a', '%', '2', 'E', ';', '|', ':', ' ', '~'];
        let mut inputs = vec![String::new()];
        let mut checked = 0;
        for _ in 0..5 {
            let mut longer = Vec::with_capacity(inputs.len() * alphabet.len());
            for prefix in &inputs {
                for c in alphabet {
                    let path = format!("{prefix}{c}");
                    if is_canonical_already(&path) {
                        assert_eq!(
                            normalize_segments(&path).as_deref(),
                            Ok(path.as_str()),
                            "{path:?}"
                        );
                        checked += 1;
                    }
                    longer.push(path);
                }
            }
            inputs = longer;
        }
        assert!(checked > 100, "only {checked} inputs took the shortcut");
        for path in [
            "/", "/a/", "/a/b", "//", "/a//b", "/.", "/a/..", "/...", "/a/./b", "/%41", "/a|b",
        ] {
            assert_eq!(normalize(path), normalize_segments(path), "{path:?}");
        }
    }

    // --- canonical forms ---

    #[test]
    fn root_and_plain_paths_are_unchanged() {
        for path in [
            "/",
            "/app",
            "/app/",
            "/a/b/c",
            "/a-b_c.d~e",
            "/a:b@c!$&'()*+,=",
            "/a%20b",
            "/100%25",
        ] {
            assert_eq!(ok(path), path);
        }
    }

    #[test]
    fn dot_dot_after_a_public_prefix_resolves_before_matching() {
        assert_eq!(ok("/public/../admin"), "/admin");
        assert_eq!(ok("/public/x/../../admin/"), "/admin/");
    }

    #[test]
    fn single_dot_segments_are_removed() {
        assert_eq!(ok("/./public/./x"), "/public/x");
        assert_eq!(ok("/a/."), "/a/");
    }

    #[test]
    fn trailing_dot_dot_keeps_the_directory_slash() {
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/.."), "/");
    }

    #[test]
    fn repeated_slashes_are_collapsed() {
        assert_eq!(ok("//admin"), "/admin");
        assert_eq!(ok("/public//..//admin"), "/admin");
        assert_eq!(ok("/a///b//"), "/a/b/");
        assert_eq!(ok("///"), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded() {
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/%41%5a%30%2D%2E%5F%7E"), "/AZ0-._~");
        assert_eq!(ok("/file%2Etxt"), "/file.txt");
    }

    #[test]
    fn encoded_unreserved_prefix_matches_the_plain_prefix() {
        // A skip-auth regex for "^/public/" must see the same string either way.
        assert_eq!(ok("/%70ublic/x"), ok("/public/x"));
    }

    #[test]
    fn other_escapes_keep_uppercase_hex() {
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(ok("/a%2bb%3a%40"), "/a%2Bb%3A%40");
        assert_eq!(ok("/a%20b"), "/a%20b");
    }

    #[test]
    fn raw_characters_outside_pchar_are_percent_encoded() {
        assert_eq!(ok("/a|b[c]^{d}\"`<>"), "/a%7Cb%5Bc%5D%5E%7Bd%7D%22%60%3C%3E");
        assert_eq!(ok("/café"), "/caf%C3%A9");
    }

    // --- refused ---

    #[test]
    fn empty_or_relative_path_is_refused() {
        refused(&["", "admin", "*", "./admin", "%2Fadmin"], PathError::NotAbsolute);
    }

    #[test]
    fn raw_query_or_fragment_is_refused() {
        refused(
            &["/admin?x=1", "/admin#x", "/?", "/#"],
            PathError::QueryOrFragment,
        );
    }

    #[test]
    fn encoded_slash_is_refused() {
        refused(
            &["/public/..%2Fadmin", "/public%2F..%2Fadmin", "/a%2fb", "/%2F"],
            PathError::EncodedSlash,
        );
    }

    #[test]
    fn encoded_backslash_is_refused() {
        refused(&["/public/..%5Cadmin", "/a%5cb"], PathError::Backslash);
    }

    #[test]
    fn raw_backslash_is_refused() {
        refused(&["/public/..\\admin", "/\\", "/a\\b"], PathError::Backslash);
    }

    #[test]
    fn encoded_question_mark_is_refused() {
        refused(&["/admin%3F.css", "/admin%3f"], PathError::EncodedDelimiter);
    }

    #[test]
    fn encoded_hash_is_refused() {
        refused(&["/admin%23.css", "/admin%23"], PathError::EncodedDelimiter);
    }

    #[test]
    fn encoded_dot_dot_segment_is_refused() {
        refused(
            &[
                "/public/%2E%2E/admin",
                "/public/.%2e/admin",
                "/public/%2e./admin",
                "/a/%2E%2E",
            ],
            PathError::EncodedDotSegment,
        );
    }

    #[test]
    fn encoded_single_dot_segment_is_refused() {
        refused(&["/public/%2E/admin", "/a/%2e"], PathError::EncodedDotSegment);
    }

    #[test]
    fn semicolon_path_parameter_is_refused() {
        refused(
            &["/public;/../admin", "/admin;jsessionid=x", "/..;/admin", "/;"],
            PathError::PathParameter,
        );
    }

    #[test]
    fn encoded_semicolon_is_refused() {
        refused(&["/public%3B/../admin", "/admin%3bx"], PathError::PathParameter);
    }

    #[test]
    fn nul_is_refused() {
        refused(&["/admin\0.css", "/admin%00.css"], PathError::ControlCharacter);
    }

    #[test]
    fn control_characters_are_refused() {
        refused(
            &[
                "/a\tb", "/a\nb", "/a\rb", "/a\u{7f}", "/a%09b", "/a%0ab", "/a%0Db", "/a%7F", "/a%C2%85",
                "/a\u{85}",
            ],
            PathError::ControlCharacter,
        );
    }

    #[test]
    fn raw_space_is_refused() {
        refused(&["/a b", "/admin "], PathError::RawSpace);
    }

    #[test]
    fn invalid_percent_encoding_is_refused() {
        refused(
            &["/a%zz", "/a%", "/a%4", "/a%4g", "/%%41"],
            PathError::InvalidPercentEncoding,
        );
    }

    #[test]
    fn non_utf8_after_decoding_is_refused() {
        // "%C0%AE" is an overlong encoding of '.', a classic traversal spelling.
        refused(
            &["/a%FF", "/a%C3", "/a%C0%AE%C0%AE/admin", "/%ED%A0%80"],
            PathError::NotUtf8,
        );
    }

    #[test]
    fn double_encoding_is_refused() {
        refused(
            &["/public/%252E%252E/admin", "/a%252Fb", "/a%2541"],
            PathError::DoubleEncoding,
        );
    }

    #[test]
    fn double_encoding_assembled_from_decoded_escapes_is_refused() {
        refused(&["/a%25%32%46b", "/a%25%34%31"], PathError::DoubleEncoding);
    }

    #[test]
    fn dot_dot_above_the_root_is_refused() {
        refused(
            &["/..", "/../admin", "/a/../..", "/a/../../admin"],
            PathError::AboveRoot,
        );
    }

    #[test]
    fn refused_characters_are_refused_even_in_removed_segments() {
        assert_eq!(normalize("/a%2Fb/../c"), Err(PathError::EncodedSlash));
    }

    #[test]
    fn errors_read_as_sentences() {
        assert_eq!(
            PathError::EncodedSlash.to_string(),
            "the path contains an encoded slash (%2F), which some servers decode into a separator and others do not"
        );
    }

    #[test]
    fn normalize_is_idempotent() {
        for raw in [
            "/",
            "///",
            "/app",
            "/app/",
            "/public/../admin",
            "/a/./b/../c//d/",
            "/%61%62%63",
            "/caf%c3%a9",
            "/café",
            "/a|b[c]",
            "/a%20b",
            "/100%25",
            "/%25zz",
            "/a%2Bb",
            "/...",
            "/..%2E",
            "/a:b@c",
            "/a/b/..",
        ] {
            let once = ok(raw);
            assert_eq!(
                normalize(&once),
                Ok(once.clone()),
                "normalize({raw:?}) = {once:?} is not stable"
            );
        }
    }
}
