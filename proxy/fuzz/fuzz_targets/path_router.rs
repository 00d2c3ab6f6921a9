//! The proxy's path router on arbitrary paths: a path it routes names one model, sends an
//! upstream path without `.`/`..` segments however an upstream decodes it, and begins with that
//! model's prefix, so a token for one model never reaches another through path tricks.
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
        // Read as an upstream that decodes dots and separators would read it.
        let decoded = route
            .upstream_path
            .to_ascii_lowercase()
            .replace("%2e", ".")
            .replace("%2f", "/")
            .replace("%5c", "/")
            .replace('\\', "/");
        assert!(!decoded.split('/').any(|s| s == "." || s == ".."), "{path}");
        assert!(path.starts_with(&format!("/models/{}/proxy", route.model_id)));
    }
});
