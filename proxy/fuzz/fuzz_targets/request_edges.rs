//! Fuzzes what the proxy reads from untrusted bytes before any check: the path, the deadline
//! header and the credential headers. Beyond "never panics", it asserts the properties the
//! rest of the proxy relies on.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxy::request::{parse_model_path, parse_request_timeout, presented_token};

fuzz_target!(|data: &[u8]| {
    // Four fields separated by 0xFF, a byte that never appears in valid UTF-8.
    let mut fields = data.split(|&b| b == 0xff);
    let path = fields.next().unwrap_or_default();
    let timeout = fields.next().unwrap_or_default();
    let authorization = fields.next();
    let bearer = fields.next();

    if let Ok(path) = std::str::from_utf8(path) {
        if let Some(route) = parse_model_path(path) {
            assert!(!route.model_id.is_empty() && !route.model_id.contains('/'));
            assert!(route.upstream_path.starts_with('/'));
            assert!(!route.upstream_path.split('/').any(|s| s == ".."));
            assert!(path.starts_with(&format!("/models/{}/proxy", route.model_id)));
        }
    }

    let max = Duration::from_secs(600);
    if let Ok(deadline) = parse_request_timeout(timeout, max) {
        assert!(!deadline.is_zero() && deadline <= max);
    }

    if let Some(token) = presented_token(authorization, bearer) {
        assert!(!token.is_empty() && token.trim() == token);
    }
});
