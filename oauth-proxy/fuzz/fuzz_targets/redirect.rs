//! Any redirect target: the answer is the target itself or `/`, and an accepted
//! relative target never starts like a protocol-relative one.
#![no_main]
use chassis_oauth_proxy::redirect::RedirectPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = RedirectPolicy::new(&["app.example.com".to_string(), ".corp.example:8443".to_string()])
    else {
        return;
    };
    let result = policy.validate(target);
    assert!(result == "/" || result == target);
    if result == target && target.starts_with('/') {
        let second = target.chars().nth(1);
        assert!(second != Some('/') && second != Some('\\'), "accepted {target:?}");
        assert!(
            !target.chars().any(|c| c.is_control() || c == '\\'),
            "accepted {target:?}"
        );
    }
});
