//! Any cookie value: opening never panics, and nothing but a sealed session opens.
#![no_main]
use chassis_oauth_proxy::session::{Sealer, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    // A rotated-out key too, so every value is tried against two keys in turn.
    let previous = ["ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=".to_string()];
    let Ok(sealer) = Sealer::new("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", &previous) else {
        return;
    };
    let opened: Result<Session, String> = sealer.open("_chassis_oauth", value, 1_800_000_000, 3600);
    // Random bytes must never authenticate (a forgery would need the key).
    assert!(opened.is_err(), "opened a cookie nobody sealed: {value:?}");
});
