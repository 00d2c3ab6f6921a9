//! `OICM-Request-Timeout` from arbitrary bytes: an accepted deadline is positive and never
//! beyond the maximum.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use proxy::request::parse_request_timeout;

fuzz_target!(|data: &[u8]| {
    let max = Duration::from_secs(600);
    if let Ok(deadline) = parse_request_timeout(data, max) {
        assert!(!deadline.is_zero() && deadline <= max);
    }
});
