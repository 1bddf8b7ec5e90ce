//! Any request path: normalizing never panics, and a normalized path is absolute,
//! has no dot segments or empty segments, and normalizes to itself.
#![no_main]
use chassis_oauth_proxy::path::normalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = normalize(raw) {
        assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
        assert!(!path.contains("//"), "{raw:?} -> {path:?}");
        assert!(
            path.split('/').all(|s| s != ".." && s != "."),
            "{raw:?} -> {path:?}"
        );
        assert_eq!(
            normalize(&path).as_deref(),
            Ok(path.as_str()),
            "not idempotent for {raw:?}"
        );
    }
});
