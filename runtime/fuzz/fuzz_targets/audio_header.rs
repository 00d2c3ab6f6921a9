//! Audio uploads from arbitrary bytes: the WAV header check and the decoder (symphonia, WAV,
//! MP3, FLAC, Ogg) return samples or a named refusal; nothing allocates what a header merely
//! claims, and decoded audio never exceeds the duration limit. `decode` runs symphonia inside
//! `catch_unwind` and refuses a file it panics on; libFuzzer's panic hook would abort on those
//! caught panics too, so the hook is replaced: a panic that escapes still aborts the run.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use runtime::audio::{check_wav_header, decode};

fuzz_target!(|data: &[u8]| {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = check_wav_header(data);
    if let Ok((samples, rate)) = decode(Bytes::copy_from_slice(data), 2) {
        assert!(!samples.is_empty());
        assert!(samples.len() as u64 <= 2 * u64::from(rate));
    }
});
