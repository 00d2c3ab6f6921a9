//! The proxy's path router on arbitrary paths: a path it routes names one model, sends an
//! upstream path without `..` segments, and begins with that model's prefix, so a token for one
//! model never reaches another through path tricks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::request::parse_model_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(route) = parse_model_path(path) {
        assert!(!route.model_id.is_empty() && !route.model_id.contains('/'));
        assert!(route.upstream_path.starts_with('/'));
        assert!(!route.upstream_path.split('/').any(|s| s == ".."));
        assert!(path.starts_with(&format!("/models/{}/proxy", route.model_id)));
    }
});
