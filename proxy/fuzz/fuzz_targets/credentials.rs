//! The credential headers (`Authorization` and the seed's `Bearer:`) from arbitrary bytes: a
//! presented token is non-empty and trimmed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::request::presented_token;

fuzz_target!(|data: &[u8]| {
    // Two header values separated by 0xFF, a byte that never appears in valid UTF-8.
    let mut fields = data.split(|&b| b == 0xff);
    let authorization = fields.next();
    let bearer = fields.next();
    if let Some(token) = presented_token(authorization, bearer) {
        assert!(!token.is_empty() && token.trim() == token);
    }
});
