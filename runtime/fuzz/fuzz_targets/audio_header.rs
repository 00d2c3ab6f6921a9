//! Audio uploads from arbitrary bytes: the WAV header check and the decoder (symphonia, WAV,
//! MP3, FLAC, Ogg) return samples or a named refusal; nothing panics or allocates what a header
//! merely claims, and decoded audio never exceeds the duration limit.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use runtime::audio::{check_wav_header, decode};

fuzz_target!(|data: &[u8]| {
    let _ = check_wav_header(data);
    if let Ok((samples, rate)) = decode(Bytes::copy_from_slice(data), 2) {
        assert!(!samples.is_empty());
        assert!(samples.len() as u64 <= 2 * u64::from(rate));
    }
});
