//! Any cookie value: opening never panics, and nothing but a sealed session opens,
//! neither directly nor through the cache of opened sessions.
#![no_main]
use std::sync::OnceLock;

use chassis_oauth_proxy::session::{OpenedSessions, Sealer, Session};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "_chassis_oauth";
const NOW: u64 = 1_800_000_000;
const MAX_AGE: u64 = 3600;

/// The sealer (with a rotated-out key too, so every value is tried against two keys
/// in turn), and a cache that already holds one real session and its sealed text.
fn kept() -> &'static (Sealer, OpenedSessions, String) {
    static KEPT: OnceLock<(Sealer, OpenedSessions, String)> = OnceLock::new();
    KEPT.get_or_init(|| {
        let previous = ["ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=".to_string()];
        let sealer = Sealer::new("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", &previous)
            .expect("the fixed secrets are valid");
        let session = Session {
            user: "alice".into(),
            expires_at: NOW + MAX_AGE,
            created_at: NOW,
            ..Default::default()
        };
        let sealed = sealer.seal(NAME, &session, NOW).expect("seals");
        let cache = OpenedSessions::new(NAME);
        cache.open(&sealer, &sealed, NOW, MAX_AGE).expect("opens");
        (sealer, cache, sealed)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let (sealer, cache, sealed) = kept();
    let opened: Result<Session, String> = sealer.open(NAME, value, NOW, MAX_AGE);
    let cached = cache.open(sealer, value, NOW, MAX_AGE);
    if value == sealed {
        // libFuzzer learns compared bytes, so it may find the kept cookie's text:
        // that one opens, both ways, to the kept session.
        assert!(opened.is_ok() && cached.is_ok(), "the kept session did not open");
    } else {
        // Random bytes must never authenticate (a forgery would need the key).
        assert!(opened.is_err(), "opened a cookie nobody sealed: {value:?}");
        assert!(cached.is_err(), "the cache opened a cookie nobody sealed: {value:?}");
    }
});
