//! `text-to-speech` over HTTP on the tiny VITS fixture: the seed's `/v1/generate-speech` and its
//! schema (the seed's own body, `prompt` and `description`, included), OpenAI's
//! `/v1/audio/speech`, the endpoint root Hugging Face clients post to, seeds that reproduce a
//! waveform, and bad bodies answered with a 400 that names the field.

mod support;

use base64::Engine as _;
use serde_json::{Value, json};
use support::Runtime;

async fn start() -> Runtime {
    Runtime::start_task("text-to-speech", &support::fixture("vits").0, &[]).await
}

async fn post_raw(runtime: &Runtime, path: &str, body: &Value) -> (u16, String, Vec<u8>) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", runtime.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (
        status,
        content_type,
        response.bytes().await.unwrap().to_vec(),
    )
}

/// (sample rate, 16-bit samples) of a WAV file this runtime wrote.
fn read_wav(file: &[u8]) -> (u32, Vec<i16>) {
    assert_eq!(&file[0..4], b"RIFF");
    assert_eq!(&file[8..16], b"WAVEfmt ");
    let rate = u32::from_le_bytes(file[24..28].try_into().unwrap());
    let samples = file[44..]
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    (rate, samples)
}

#[tokio::test]
async fn the_schema_lists_the_fields_the_endpoint_takes() {
    let runtime = start().await;
    let schema = runtime.get_json("/v1/generate-speech/schema").await;
    let fields = schema.as_array().unwrap();
    let names: Vec<&str> = fields.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "text",
            "speaking_rate",
            "noise_scale",
            "noise_scale_duration",
            "seed",
            "description"
        ]
    );
    for field in fields {
        for key in ["label", "desc", "type", "required"] {
            assert!(!field[key].is_null(), "{key} missing from {field}");
        }
    }
    assert_eq!(fields[0]["required"], true);
    assert!(fields[1..].iter().all(|f| f["required"] == false));
    assert!(fields[0]["desc"].as_str().unwrap().contains("`prompt`"));
    let description = &fields[5];
    assert_eq!(description["type"], "string");
    let desc = description["desc"].as_str().unwrap();
    assert!(
        desc.contains("cannot change the voice") && desc.contains("one fixed voice"),
        "{desc}"
    );
}

#[tokio::test]
async fn the_seeds_body_prompt_and_description_gives_speech_in_the_one_voice() {
    let runtime = start().await;
    let speak = |body: Value| {
        let runtime = &runtime;
        async move {
            let (status, body) = runtime.post("/v1/generate-speech", &body.to_string()).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["sampling_rate"], 16000);
            let wav = base64::engine::general_purpose::STANDARD
                .decode(body["audio"].as_str().unwrap())
                .unwrap();
            read_wav(&wav).1
        }
    };
    // The seed's example, as written.
    let seed =
        speak(json!({"prompt": "Hi, can you help me?", "description": "A man with clear voice"}))
            .await;
    assert!(!seed.is_empty());
    // `prompt` is `text` by another name, and the description cannot change the voice.
    let text = speak(json!({"text": "Hi, can you help me?", "seed": 7})).await;
    let prompt = speak(json!({"prompt": "Hi, can you help me?", "seed": 7})).await;
    let described = speak(json!({"prompt": "Hi, can you help me?", "seed": 7,
                                 "description": "A female speaker with a slightly low-pitched voice"}))
    .await;
    assert_eq!(text, prompt);
    assert_eq!(text, described);
}

#[tokio::test]
async fn generated_speech_is_a_wav_that_a_seed_reproduces() {
    let runtime = start().await;
    let speak = |body: Value| {
        let runtime = &runtime;
        async move {
            let (status, body) = runtime.post("/v1/generate-speech", &body.to_string()).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["sampling_rate"], 16000);
            let wav = base64::engine::general_purpose::STANDARD
                .decode(body["audio"].as_str().unwrap())
                .unwrap();
            read_wav(&wav)
        }
    };
    let (rate, first) = speak(json!({"text": "Hello world", "seed": 42})).await;
    assert_eq!(rate, 16000);
    assert!(!first.is_empty());
    let (_, again) = speak(json!({"text": "Hello world", "seed": 42})).await;
    assert_eq!(first, again, "the same seed gives the same waveform");
    let (_, other) = speak(json!({"text": "Hello world", "seed": 43})).await;
    assert_ne!(first, other, "another seed gives another waveform");
    let (_, slow) = speak(
        json!({"text": "Hello world", "seed": 42, "speaking_rate": 0.5, "noise_scale_duration": 0}),
    )
    .await;
    let (_, fast) = speak(
        json!({"text": "Hello world", "seed": 42, "speaking_rate": 2.0, "noise_scale_duration": 0}),
    )
    .await;
    assert!(slow.len() > fast.len(), "{} vs {}", slow.len(), fast.len());
}

#[tokio::test]
async fn openai_speech_and_the_endpoint_root_answer_raw_audio() {
    let runtime = start().await;
    let (status, content_type, wav) = post_raw(
        &runtime,
        "/v1/audio/speech",
        &json!({"model": "tts-1", "voice": "alloy", "input": "Hello world"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "audio/wav");
    let (_, samples) = read_wav(&wav);
    let (status, content_type, pcm) = post_raw(
        &runtime,
        "/v1/audio/speech",
        &json!({"model": "tts-1", "voice": "alloy", "input": "Hello world", "response_format": "pcm"}),
    )
    .await;
    assert_eq!((status, content_type.as_str()), (200, "audio/pcm"));
    // Unseeded, each request draws its own durations: only the framing can be compared.
    assert!(!samples.is_empty());
    assert!(!pcm.is_empty() && pcm.len() % 2 == 0, "{} bytes", pcm.len());
    let (status, content_type, wav) =
        post_raw(&runtime, "/", &json!({"inputs": "Hello world"})).await;
    assert_eq!((status, content_type.as_str()), (200, "audio/wav"));
    assert!(!read_wav(&wav).1.is_empty());
}

#[tokio::test]
async fn bodies_that_violate_the_schema_are_400s_that_name_the_field() {
    let runtime = start().await;
    let cases = [
        ("/v1/generate-speech", json!({"text": ""}), "text"),
        ("/v1/generate-speech", json!({"text": "日本語"}), "text"),
        (
            "/v1/generate-speech",
            json!({"text": "a".repeat(2001)}),
            "text",
        ),
        (
            "/v1/generate-speech",
            json!({"text": "hi", "speaking_rate": 0}),
            "speaking_rate",
        ),
        (
            "/v1/generate-speech",
            json!({"text": "hi", "noise_scale": 9}),
            "noise_scale",
        ),
        (
            "/v1/generate-speech",
            json!({"text": "hi", "seed": -1}),
            "seed",
        ),
        (
            "/v1/generate-speech",
            json!({"text": "hi", "voice": "x"}),
            "voice",
        ),
        ("/v1/generate-speech", json!({"speaking_rate": 1}), "text"),
        ("/v1/generate-speech", json!({"prompt": " "}), "prompt"),
        (
            "/v1/generate-speech",
            json!({"text": "hi", "prompt": "hi"}),
            "prompt",
        ),
        (
            "/v1/generate-speech",
            json!({"prompt": "hi", "description": 5}),
            "description",
        ),
        (
            "/v1/generate-speech",
            json!({"prompt": "hi", "description": "a".repeat(1001)}),
            "description",
        ),
        (
            "/v1/audio/speech",
            json!({"input": "hi", "response_format": "mp3"}),
            "response_format",
        ),
        (
            "/v1/audio/speech",
            json!({"input": "hi", "speed": 9}),
            "speed",
        ),
        (
            "/",
            json!({"inputs": "hi", "parameters": {"do_sample": true}}),
            "parameters.do_sample",
        ),
    ];
    for (path, body, field) in cases {
        let (status, answer) = runtime.post(path, &body.to_string()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{path} {body}: {message:?} does not name {field}"
        );
    }
    let (status, _) = runtime
        .post(
            "/v1/generate-speech",
            &json!({"text": "still here"}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
}
