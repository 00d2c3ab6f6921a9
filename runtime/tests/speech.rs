//! `speech-recognition` over HTTP on the tiny Whisper fixture: the seed's `/v1/transcript`,
//! OpenAI's transcription endpoints in every response format, the endpoint root Hugging Face
//! clients post to, long audio in windows, and every kind of bad upload answered with a 4xx
//! that names it.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::Runtime;

fn whisper_dir() -> std::path::PathBuf {
    support::fixture("whisper").0
}

fn clip() -> Vec<u8> {
    std::fs::read(whisper_dir().join("clip.wav")).unwrap()
}

fn audio_file(name: &str) -> Vec<u8> {
    std::fs::read(whisper_dir().join("../audio").join(name)).unwrap()
}

/// A 16-bit mono WAV of `seconds` of a quiet tone at 16 kHz.
fn wav(seconds: f64) -> Vec<u8> {
    let samples = (seconds * 16_000.0) as u32;
    let mut file = Vec::new();
    file.extend_from_slice(b"RIFF");
    file.extend_from_slice(&(36 + samples * 2).to_le_bytes());
    file.extend_from_slice(b"WAVEfmt ");
    file.extend_from_slice(&16u32.to_le_bytes());
    file.extend_from_slice(&[1, 0, 1, 0]);
    file.extend_from_slice(&16_000u32.to_le_bytes());
    file.extend_from_slice(&32_000u32.to_le_bytes());
    file.extend_from_slice(&[2, 0, 16, 0]);
    file.extend_from_slice(b"data");
    file.extend_from_slice(&(samples * 2).to_le_bytes());
    for i in 0..samples {
        let t = f64::from(i) / 16_000.0;
        let value = (3000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16;
        file.extend_from_slice(&value.to_le_bytes());
    }
    file
}

const BOUNDARY: &str = "infergate-test-boundary";

/// A multipart/form-data body of text fields and, when given, the audio as `file`.
fn form(fields: &[(&str, &str)], file: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    if let Some(file) = file {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"audio\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(file);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

struct Answer {
    status: u16,
    content_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The error message, which must name what is wrong.
    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

async fn post(
    runtime: &Runtime,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", runtime.url))
        .header("content-type", content_type)
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    Answer {
        status,
        content_type,
        text,
    }
}

async fn post_form(
    runtime: &Runtime,
    path: &str,
    fields: &[(&str, &str)],
    file: Option<&[u8]>,
) -> Answer {
    post(
        runtime,
        path,
        &format!("multipart/form-data; boundary={BOUNDARY}"),
        form(fields, file),
        &[],
    )
    .await
}

async fn start(extra: &[&str]) -> Runtime {
    Runtime::start_task("speech-recognition", &whisper_dir(), extra).await
}

#[tokio::test]
async fn the_seed_endpoint_transcribes_a_multipart_file_to_text() {
    let runtime = start(&[]).await;
    let answer = post_form(
        &runtime,
        "/v1/transcript",
        &[("language", "en")],
        Some(&clip()),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let text = answer.json()["text"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());
    // Deterministic: the same audio gives the same text, at any rate and format it arrives in.
    let again = post_form(
        &runtime,
        "/transcript",
        &[("language", "en")],
        Some(&clip()),
    )
    .await;
    assert_eq!(again.json()["text"], text);
    let info = runtime.get_json("/info").await;
    assert_eq!(info["task"], "speech-recognition");
    assert_eq!(
        info["model_type"]["speech-recognition"]["languages"],
        serde_json::json!(["de", "en", "fr"])
    );
}

#[tokio::test]
async fn openai_transcriptions_answer_in_every_response_format() {
    let runtime = start(&[]).await;
    let path = "/v1/audio/transcriptions";
    let json = post_form(&runtime, path, &[("model", "whisper-1")], Some(&clip())).await;
    assert_eq!(json.status, 200, "{}", json.text);
    assert!(json.json()["text"].is_string());

    let text = post_form(
        &runtime,
        path,
        &[("response_format", "text")],
        Some(&clip()),
    )
    .await;
    assert_eq!(text.status, 200);
    assert!(text.content_type.starts_with("text/plain"));
    assert_eq!(text.text.trim_end(), json.json()["text"].as_str().unwrap());

    let verbose = post_form(
        &runtime,
        path,
        &[
            ("response_format", "verbose_json"),
            ("language", "german"),
            ("timestamp_granularities[]", "segment"),
        ],
        Some(&clip()),
    )
    .await;
    assert_eq!(verbose.status, 200, "{}", verbose.text);
    let verbose = verbose.json();
    assert_eq!(verbose["task"], "transcribe");
    assert_eq!(verbose["language"], "german");
    assert_eq!(verbose["duration"], 2.5);
    let segments = verbose["segments"].as_array().unwrap();
    assert!(!segments.is_empty());
    for (i, segment) in segments.iter().enumerate() {
        assert_eq!(segment["id"], i);
        let (start, end) = (
            segment["start"].as_f64().unwrap(),
            segment["end"].as_f64().unwrap(),
        );
        assert!(0.0 <= start && start <= end && end <= 30.0, "{segment}");
        for field in [
            "seek",
            "tokens",
            "temperature",
            "avg_logprob",
            "compression_ratio",
            "no_speech_prob",
        ] {
            assert!(!segment[field].is_null(), "{field} missing from {segment}");
        }
    }
    let joined: String = segments
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined.trim(), verbose["text"].as_str().unwrap());

    let srt = post_form(&runtime, path, &[("response_format", "srt")], Some(&clip())).await;
    assert_eq!(srt.status, 200);
    assert!(srt.text.starts_with("1\n00:00:"), "{}", srt.text);
    assert!(srt.text.contains(" --> "));
    let vtt = post_form(&runtime, path, &[("response_format", "vtt")], Some(&clip())).await;
    assert!(vtt.text.starts_with("WEBVTT\n\n00:00:"), "{}", vtt.text);

    let translated = post_form(&runtime, "/v1/audio/translations", &[], Some(&clip())).await;
    assert_eq!(translated.status, 200, "{}", translated.text);
    assert!(translated.json()["text"].is_string());
}

#[tokio::test]
async fn the_endpoint_root_takes_raw_audio_or_base64_json_as_hugging_face_clients_send_it() {
    use base64::Engine as _;
    let runtime = start(&[]).await;
    let raw = post(&runtime, "/", "audio/wav", clip(), &[]).await;
    assert_eq!(raw.status, 200, "{}", raw.text);
    let text = raw.json()["text"].clone();
    assert!(text.is_string());
    let body = serde_json::json!({
        "inputs": base64::engine::general_purpose::STANDARD.encode(clip()),
        "parameters": {"return_timestamps": true},
    });
    let json = post(
        &runtime,
        "/",
        "application/json",
        body.to_string().into_bytes(),
        &[],
    )
    .await;
    assert_eq!(json.status, 200, "{}", json.text);
    let chunks = json.json()["chunks"].as_array().unwrap().clone();
    assert!(!chunks.is_empty());
    assert!(chunks[0]["timestamp"].as_array().unwrap().len() == 2);
}

#[tokio::test]
async fn audio_longer_than_one_window_is_transcribed_window_by_window() {
    let runtime = start(&[]).await;
    let answer = post_form(
        &runtime,
        "/v1/audio/transcriptions",
        &[("response_format", "verbose_json"), ("language", "en")],
        Some(&wav(65.0)),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let verbose = answer.json();
    assert_eq!(verbose["duration"], 65.0);
    let segments = verbose["segments"].as_array().unwrap();
    let seeks: Vec<i64> = segments
        .iter()
        .map(|s| s["seek"].as_i64().unwrap())
        .collect();
    assert!(seeks.windows(2).all(|w| w[0] <= w[1]), "{seeks:?}");
    assert!(
        *seeks.last().unwrap() >= 3000,
        "never left the first window: {seeks:?}"
    );
    let last_end = segments.last().unwrap()["end"].as_f64().unwrap();
    assert!(last_end > 30.0 && last_end <= 65.0 + 1e-9, "{last_end}");
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_each_gets_its_own_transcript() {
    // Six at once on an idle model: none is refused, each waits far less than the maximum
    // queue time.
    let runtime = start(&[]).await;
    let alone = |language: &'static str| {
        let runtime = &runtime;
        async move {
            post_form(
                runtime,
                "/v1/transcript",
                &[("language", language)],
                Some(&clip()),
            )
            .await
            .json()["text"]
                .clone()
        }
    };
    let (english, german) = (alone("en").await, alone("de").await);
    let runtime = &runtime;
    let together = futures::future::join_all(["en", "de", "en", "de", "en", "de"].map(
        |language| async move {
            let answer = post_form(
                runtime,
                "/v1/transcript",
                &[("language", language)],
                Some(&clip()),
            )
            .await;
            (language, answer)
        },
    ))
    .await;
    for (language, answer) in together {
        assert_eq!(answer.status, 200, "{}", answer.text);
        let expected = if language == "en" { &english } else { &german };
        assert_eq!(&answer.json()["text"], expected, "{language}");
    }
}

#[tokio::test]
async fn every_kind_of_bad_upload_is_a_4xx_that_names_the_problem() {
    let runtime = start(&["--max-audio-seconds", "10", "--max-audio-bytes", "400000"]).await;
    let path = "/v1/audio/transcriptions";
    let mp3 = audio_file("tones-44100.mp3");
    let mut zero_rate = wav(1.0);
    zero_rate[24..28].copy_from_slice(&0u32.to_le_bytes());
    let cases: Vec<(&str, Answer, u16, &str)> = vec![
        (
            "not audio",
            post_form(&runtime, path, &[], Some(b"{\"hello\": \"world\"}")).await,
            400,
            "not a supported audio file",
        ),
        (
            "zero sample rate",
            post_form(&runtime, path, &[], Some(&zero_rate)).await,
            400,
            "sample rate of 0 Hz",
        ),
        (
            "empty file",
            post_form(&runtime, path, &[], Some(b"")).await,
            400,
            "empty",
        ),
        (
            "truncated mp3",
            post_form(&runtime, path, &[], Some(&mp3[..mp3.len() / 2])).await,
            400,
            "truncated",
        ),
        (
            "over the duration limit",
            post_form(&runtime, path, &[], Some(&wav(12.0))).await,
            413,
            "longer than the limit of 10 s",
        ),
        (
            "over the upload limit",
            post_form(&runtime, path, &[], Some(&wav(13.0))).await,
            413,
            "file",
        ),
        (
            "missing file",
            post_form(&runtime, path, &[("model", "whisper-1")], None).await,
            400,
            "file",
        ),
        (
            "unknown field",
            post_form(&runtime, path, &[("colour", "blue")], Some(&clip())).await,
            400,
            "colour",
        ),
        (
            "unknown language",
            post_form(&runtime, path, &[("language", "xx")], Some(&clip())).await,
            400,
            "language",
        ),
        (
            "bad response format",
            post_form(
                &runtime,
                path,
                &[("response_format", "docx")],
                Some(&clip()),
            )
            .await,
            400,
            "response_format",
        ),
        (
            "sampling",
            post_form(&runtime, path, &[("temperature", "0.4")], Some(&clip())).await,
            400,
            "temperature",
        ),
        (
            "word timestamps",
            post_form(
                &runtime,
                path,
                &[("timestamp_granularities[]", "word")],
                Some(&clip()),
            )
            .await,
            400,
            "word",
        ),
        (
            "not multipart",
            post(&runtime, path, "application/json", b"{}".to_vec(), &[]).await,
            415,
            "multipart",
        ),
        (
            "raw root body not audio",
            post(&runtime, "/", "audio/wav", b"RIFF....WAVE".to_vec(), &[]).await,
            400,
            "inputs",
        ),
        (
            "root base64 not base64",
            post(
                &runtime,
                "/",
                "application/json",
                br#"{"inputs": "%%%"}"#.to_vec(),
                &[],
            )
            .await,
            400,
            "inputs",
        ),
    ];
    for (case, answer, status, needle) in cases {
        assert_eq!(answer.status, status, "{case}: {}", answer.text);
        assert!(
            answer.message().contains(needle),
            "{case}: {:?} does not say {needle:?}",
            answer.message()
        );
    }
    // The runtime is still serving.
    assert_eq!(
        post_form(&runtime, path, &[], Some(&clip())).await.status,
        200
    );
}

#[tokio::test]
async fn a_two_hour_recording_is_refused_at_the_duration_limit_without_decoding_it_all() {
    let runtime = start(&[]).await;
    let two_hours = std::fs::read(whisper_dir().join("silence-2h.flac")).unwrap();
    let started = Instant::now();
    let answer = post_form(&runtime, "/v1/audio/transcriptions", &[], Some(&two_hours)).await;
    assert_eq!(answer.status, 413, "{}", answer.text);
    assert!(
        answer.message().contains("longer than the limit of 600 s"),
        "{}",
        answer.message()
    );
    // Decoding stops at 600 s of the 7,200.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_request_past_its_deadline_stops_its_work_within_a_second() {
    let runtime = start(&["--max-audio-seconds", "1200"]).await;
    let started = Instant::now();
    let answer = post(
        &runtime,
        "/v1/transcript",
        &format!("multipart/form-data; boundary={BOUNDARY}"),
        form(&[("language", "en")], Some(&wav(600.0))),
        &[("OICM-Request-Timeout", "1")],
    )
    .await;
    assert_eq!(answer.status, 504, "{}", answer.text);
    // The model thread noticed and moved on: the next request is answered at once, and the
    // abandoned work is counted.
    let next = post_form(
        &runtime,
        "/v1/transcript",
        &[("language", "en")],
        Some(&clip()),
    )
    .await;
    assert_eq!(next.status, 200);
    let waited = started.elapsed();
    // Against one window's work, timed alone on the same machine now, so that the bound holds
    // under load: the 600 s upload is 20 windows; stopping within a second of the deadline
    // leaves at most the window in flight and the next request's own.
    let alone = Instant::now();
    let again = post_form(
        &runtime,
        "/v1/transcript",
        &[("language", "en")],
        Some(&clip()),
    )
    .await;
    assert_eq!(again.status, 200);
    let window = alone.elapsed();
    assert!(
        waited < Duration::from_secs(2) + window * 6,
        "the next request waited until {waited:?}; one window alone takes {window:?}"
    );
    let metrics = runtime.metrics().await;
    assert!(
        metrics.contains("infergate_runtime_abandoned_total 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("abandoned"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn sigterm_turns_readiness_off_at_once_and_finishes_the_work_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut runtime = start(&["--max-audio-seconds", "1200"]).await;
    // Written whole before the signal: a request still in the listener's backlog (not yet
    // accepted) is not in flight, and closing the listener resets it. Four minutes of audio
    // do not fit the socket buffers, so the write ends only once the runtime reads the body.
    let body = form(&[("language", "en")], Some(&wav(240.0)));
    let addr = runtime.url.trim_start_matches("http://").to_owned();
    let mut connection = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/transcript HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    connection.write_all(head.as_bytes()).await.unwrap();
    connection.write_all(&body).await.unwrap();
    let in_flight = tokio::spawn(async move {
        let mut response = Vec::new();
        connection
            .read_to_end(&mut response)
            .await
            .map(|_| response)
    });
    let signalled = Instant::now();
    let pid = runtime.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Readiness: /health stops answering 200 within a second (the port closes to new
    // connections), so no new request is routed here.
    loop {
        let ready = reqwest::get(format!("{}/health", runtime.url))
            .await
            .is_ok_and(|r| r.status() == 200);
        if !ready {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "still ready after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight was dropped");
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert_eq!(&head[..12], "HTTP/1.1 200", "{head}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert!(body["text"].is_string());
    let exit = runtime.child.wait().unwrap();
    assert!(exit.success(), "{exit}");
}
