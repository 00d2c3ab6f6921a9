//! The speech endpoints' multipart reader with its limits, on arbitrary bodies split into
//! arbitrary chunks: it reads a form or refuses the body with a client error; it never panics
//! and never accepts a file over the upload limit.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use runtime::tasks::speech_recognition::AudioLimits;
use runtime::tasks::speech_recognition::form::parse_form;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so that boundaries fall anywhere.
    let Some((&chunk, body)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let limits = AudioLimits {
        max_audio_bytes: 4096,
        max_audio_seconds: 10,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let parsed = runtime.block_on(parse_form(
        "multipart/form-data; boundary=X",
        futures::stream::iter(chunks),
        limits,
    ));
    match parsed {
        Ok(form) => assert!(form.file_len().is_none_or(|n| n <= limits.max_audio_bytes)),
        Err(error) => assert!(error.status().is_client_error(), "{error}"),
    }
});
