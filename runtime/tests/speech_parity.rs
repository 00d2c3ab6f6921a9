//! The native Whisper against Hugging Face transformers on the tiny random fixture
//! (`runtime/fixtures/make_speech_fixtures.py`): log-mel features and teacher-forced logits
//! within 1e-4, and `generate`'s greedy ids, without and with timestamps, identical. Then the
//! audio front end: one signal encoded as WAV, FLAC, MP3 and Ogg at 8 to 48 kHz decodes to the
//! features of the same signal computed at 16 kHz. Last, `whisper-eos0`, a checkpoint whose end
//! of text is token 0 and that has no timestamp tokens: the same parity, and the transcripts over
//! HTTP in every response format equal to transformers' text and never empty.

mod support;

use std::path::Path;

use runtime::audio::{TARGET_RATE, decode_to_16k};
use runtime::decode::whisper::{DecodeOptions, SpeechTask, SpeechTokens, generate, prompt};
use runtime::models::whisper::{DecoderCache, MelFeatures, WhisperModel};
use support::ids;
use tch::{Device, Kind, Tensor};

fn reference_tensors(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

fn clip_features(dir: &Path) -> Tensor {
    let features = MelFeatures::load(dir).unwrap();
    let bytes = std::fs::read(dir.join("clip.wav")).unwrap();
    let (samples, _) = decode_to_16k(bytes.into(), 60).unwrap();
    features.compute(&samples)
}

#[test]
fn log_mel_features_match_whisper_feature_extractor() {
    let (dir, _) = support::fixture("whisper");
    let expected = &reference_tensors(&dir)["mel"];
    let mel = clip_features(&dir);
    assert_eq!(mel.size(), expected.size());
    let delta = max_abs_diff(&mel, expected);
    eprintln!("max |Δmel| = {delta:e}");
    assert!(delta <= 1e-4, "max |Δmel| = {delta:e}");
}

#[test]
fn teacher_forced_logits_match_transformers() {
    let (dir, reference) = support::fixture("whisper");
    let expected = &reference_tensors(&dir);
    let model = WhisperModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let logits = tch::no_grad(|| {
        let encoded = model.encode(&expected["mel"].unsqueeze(0));
        let prompt = Tensor::from_slice(&ids(&reference["prompt"])).unsqueeze(0);
        model.decode(&prompt, &encoded, &mut DecoderCache::default())
    });
    let delta = max_abs_diff(&logits.squeeze_dim(0), &expected["logits"]);
    eprintln!("max |Δlogits| = {delta:e}");
    assert!(delta <= 1e-4, "max |Δlogits| = {delta:e}");
}

fn greedy_matches(case: &str, timestamps: bool) {
    let (dir, reference) = support::fixture("whisper");
    let case = &reference[case];
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let tokens = SpeechTokens::load(&dir, &tokenizer).unwrap();
    let model = WhisperModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let language = tokens.language_token(case["language"].as_str().unwrap());
    let options = DecodeOptions {
        language,
        task: SpeechTask::Transcribe,
        timestamps,
        prompt: Vec::new(),
    };
    let start = prompt(&tokens, &options, 448);
    let expected = ids(&case["ids"]);
    assert_eq!(start, expected[..start.len()], "decoder prompt");
    let encoded = tch::no_grad(|| model.encode(&clip_features(&dir).unsqueeze(0)));
    let generated = generate(
        &model,
        &tokens,
        &encoded,
        std::slice::from_ref(&start),
        &[timestamps],
        &|_| true,
        case["max_new_tokens"].as_u64().unwrap() as usize,
    );
    let generated = generated[0].as_ref().unwrap();
    assert_eq!(generated.ids, expected[start.len()..]);
    assert_eq!(generated.logprobs.len(), generated.ids.len());
}

#[test]
fn greedy_ids_match_transformers_generate() {
    greedy_matches("greedy", false);
}

#[test]
fn greedy_ids_with_timestamp_rules_match_transformers_generate() {
    greedy_matches("timestamps", true);
}

/// The fixture's two tones, computed directly at `rate`.
fn two_tones(rate: u32) -> Vec<f32> {
    let (dir, _) = support::fixture("whisper");
    let signal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("../audio/signal.json")).unwrap()).unwrap();
    let tones: Vec<f64> = serde_json::from_value(signal["tones_hz"].clone()).unwrap();
    let amplitudes: Vec<f64> = serde_json::from_value(signal["amplitudes"].clone()).unwrap();
    let samples = (signal["seconds"].as_f64().unwrap() * f64::from(rate)) as usize;
    (0..samples)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            tones
                .iter()
                .zip(&amplitudes)
                .map(|(f, a)| a * (2.0 * std::f64::consts::PI * f * t).sin())
                .sum::<f64>() as f32
        })
        .collect()
}

#[test]
fn every_format_and_rate_decodes_to_the_features_of_the_signal_at_16_khz() {
    let (dir, _) = support::fixture("whisper");
    let features = MelFeatures::load(&dir).unwrap();
    // The signal's one second is frames 0..100; the first and last two frames hold its abrupt
    // edges, where the resampler's filter and the codecs' framing smear it.
    let (first, frames) = (2, 96);
    let expected = features
        .compute(&two_tones(TARGET_RATE))
        .narrow(1, first, frames);
    let audio = dir.join("../audio");
    let mut files: Vec<_> = std::fs::read_dir(&audio)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 14);
    // Lossy codecs replace the silence between the tones' bands with their noise floor, so
    // their files are compared on the bands within 20 dB of the peak (0.5 in feature units:
    // log10 / 4); lossless ones on every band.
    let peak = f64::try_from(expected.max()).unwrap();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let lossy = name.ends_with(".mp3") || name.ends_with(".ogg");
        let (samples, seconds) = decode_to_16k(std::fs::read(&file).unwrap().into(), 60).unwrap();
        let slack = if lossy { 0.02 } else { 0.001 };
        assert!((seconds - 1.0).abs() <= slack, "{name}: {seconds} s");
        let mel = features.compute(&samples).narrow(1, first, frames);
        let (mel, expected) = if lossy {
            (mel.clamp_min(peak - 0.5), expected.clamp_min(peak - 0.5))
        } else {
            (mel, expected.shallow_clone())
        };
        let mean = f64::try_from((&mel - &expected).abs().mean(Kind::Double)).unwrap();
        let max = max_abs_diff(&mel, &expected);
        eprintln!("{name}: mean |Δmel| = {mean:.2e}, max = {max:.2e}");
        let (mean_limit, max_limit) = if lossy { (2e-3, 0.05) } else { (5e-4, 1e-2) };
        assert!(mean <= mean_limit, "{name}: mean |Δmel| = {mean:e}");
        assert!(max <= max_limit, "{name}: max |Δmel| = {max:e}");
    }
}

// `whisper-eos0`: a checkpoint whose end of text is token 0 (also its bos and pad), suppressed
// at the first step only by `begin_suppress_tokens: [0]`, with `suppress_tokens: []` and no
// timestamp tokens (`<|notimestamps|>` is the vocabulary's last id). Token 0 is the likeliest
// first token there, so a decoder that misses any of that answers "" — which must never pass as
// a transcript.

const EOS0: &str = "whisper-eos0";

/// The generated ids of a reference case: the prompt's four tokens and the final end of text
/// (token 0) removed.
fn eos0_generated(case: &serde_json::Value) -> Vec<i64> {
    let ids = ids(&case["ids"]);
    assert_eq!(
        ids.last(),
        Some(&0),
        "the reference does not end with end of text"
    );
    ids[4..ids.len() - 1].to_vec()
}

/// A transcript that has text: silence is not a transcript of the reference clip.
fn assert_transcript(what: &str, text: &str) {
    assert!(!text.trim().is_empty(), "{what}: empty transcript");
}

#[test]
fn eos0_fixture_has_the_layout_and_a_non_empty_reference() {
    let (dir, reference) = support::fixture(EOS0);
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
    };
    let (config, generation) = (read("config.json"), read("generation_config.json"));
    for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
        assert_eq!(generation[key], 0, "{key}");
        assert_eq!(config[key], 0, "{key}");
    }
    assert_eq!(generation["begin_suppress_tokens"], serde_json::json!([0]));
    assert_eq!(generation["suppress_tokens"], serde_json::json!([]));
    let vocab = config["vocab_size"].as_i64().unwrap();
    assert_eq!(generation["no_timestamps_token_id"], vocab - 1);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.get_vocab_size(true) as i64, vocab);
    assert_eq!(tokenizer.token_to_id("<|0.00|>"), None);
    // Without `begin_suppress_tokens`, transformers would end the transcript at once.
    assert_eq!(reference["first_token_unsuppressed"], 0);
    for case in ["greedy", "detected"] {
        let case = &reference[case];
        let generated = eos0_generated(case);
        assert!(generated.len() >= 8, "{case}");
        let distinct: std::collections::BTreeSet<_> = generated.iter().collect();
        assert!(distinct.len() >= generated.len() / 2, "not varied: {case}");
        assert_transcript("reference", case["text"].as_str().unwrap());
        assert!(!ids(&case["text_ids"]).is_empty());
    }
    assert_ne!(reference["detected"]["detected"], "en");
    // transformers' timestamp rules forbid every token at the first step of a model without
    // timestamp tokens, so `return_timestamps=True` ends at once: the runtime decodes the
    // formats with timestamps without them there (one segment per window).
    let timed = ids(&reference["with_timestamp_rules"]["ids"]);
    assert_eq!(timed[3..], [0], "{timed:?}");
}

#[test]
fn eos0_teacher_forced_logits_match_transformers() {
    let (dir, reference) = support::fixture(EOS0);
    let expected = &reference_tensors(&dir)["logits"];
    let model = WhisperModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let clip = dir.join(reference["clip"].as_str().unwrap());
    let features = MelFeatures::load(&dir).unwrap();
    let (samples, _) = decode_to_16k(std::fs::read(clip).unwrap().into(), 60).unwrap();
    let logits = tch::no_grad(|| {
        let encoded = model.encode(&features.compute(&samples).unsqueeze(0));
        let prompt = Tensor::from_slice(&ids(&reference["prompt"])).unsqueeze(0);
        model.decode(&prompt, &encoded, &mut DecoderCache::default())
    });
    let delta = max_abs_diff(&logits.squeeze_dim(0), expected);
    eprintln!("whisper-eos0: max |Δlogits| = {delta:e}");
    assert!(delta <= 1e-4, "max |Δlogits| = {delta:e}");
}

/// `generate` as the server runs it (language given or detected, the decoder's whole length)
/// gives transformers' greedy ids, end of text at the same step.
fn eos0_greedy_matches(case: &str) {
    let (dir, reference) = support::fixture(EOS0);
    let case = &reference[case];
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let tokens = SpeechTokens::load(&dir, &tokenizer).unwrap();
    let model = WhisperModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let clip = dir.join(reference["clip"].as_str().unwrap());
    let features = MelFeatures::load(&dir).unwrap();
    let (samples, _) = decode_to_16k(std::fs::read(clip).unwrap().into(), 60).unwrap();
    let encoded = tch::no_grad(|| model.encode(&features.compute(&samples).unsqueeze(0)));
    let language = match case["language"].as_str() {
        Some(code) => tokens.language_token(code).unwrap(),
        None => runtime::decode::whisper::detect_language(&model, &tokens, &encoded)[0],
    };
    assert_eq!(
        tokens.language_code(language),
        case["detected"].as_str(),
        "language"
    );
    let options = DecodeOptions {
        language: Some(language),
        task: SpeechTask::Transcribe,
        timestamps: false,
        prompt: Vec::new(),
    };
    let start = prompt(&tokens, &options, 448);
    let expected = ids(&case["ids"]);
    assert_eq!(start, expected[..start.len()], "decoder prompt");
    let generated = generate(
        &model,
        &tokens,
        &encoded,
        std::slice::from_ref(&start),
        &[false],
        &|_| true,
        448 - start.len(),
    );
    let generated = generated[0].as_ref().unwrap();
    assert!(!generated.ids.is_empty(), "no tokens generated");
    assert_eq!(generated.ids, eos0_generated(case));
    assert_eq!(generated.logprobs.len(), generated.ids.len());
    eprintln!(
        "whisper-eos0 {}: {} of {} tokens identical",
        case["detected"],
        generated.ids.len(),
        eos0_generated(case).len()
    );
}

#[test]
fn eos0_greedy_ids_match_transformers_generate_in_english() {
    eos0_greedy_matches("greedy");
}

#[test]
fn eos0_greedy_ids_match_transformers_generate_in_the_detected_language() {
    eos0_greedy_matches("detected");
}

const BOUNDARY: &str = "infergate-parity-boundary";

/// A multipart/form-data body of text fields and the audio as `file`.
fn form(fields: &[(&str, &str)], file: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// Posts `body` and returns the status and the body's text.
async fn post(url: String, content_type: &str, body: Vec<u8>) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn eos0_transcripts_over_http_match_transformers_in_every_response_format() {
    let (dir, reference) = support::fixture(EOS0);
    let clip = std::fs::read(dir.join(reference["clip"].as_str().unwrap())).unwrap();
    let runtime = support::Runtime::start_task("speech-recognition", &dir, &[]).await;
    let multipart = format!("multipart/form-data; boundary={BOUNDARY}");
    let openai = |fields: Vec<(&'static str, &'static str)>| {
        let (url, clip, multipart) = (
            format!("{}/v1/audio/transcriptions", runtime.url),
            clip.clone(),
            multipart.clone(),
        );
        async move {
            let (status, body) = post(url, &multipart, form(&fields, &clip)).await;
            assert_eq!(status, 200, "{fields:?}: {body}");
            body
        }
    };
    for (case, language, name) in [
        ("greedy", Some("en"), "english"),
        ("detected", None, "german"),
    ] {
        let case = &reference[case];
        let expected = case["text"].as_str().unwrap();
        let language: Vec<(&str, &str)> = language.map(|l| ("language", l)).into_iter().collect();
        let with = |format: &'static str| {
            let mut fields = language.clone();
            fields.push(("response_format", format));
            fields
        };

        let json: serde_json::Value = serde_json::from_str(&openai(with("json")).await).unwrap();
        let text = json["text"].as_str().unwrap();
        assert_transcript("json", text);
        assert_eq!(text, expected.trim(), "json, {name}");

        let text = openai(with("text")).await;
        assert_transcript("text", &text);
        assert_eq!(text, format!("{}\n", expected.trim()), "text, {name}");

        let verbose: serde_json::Value =
            serde_json::from_str(&openai(with("verbose_json")).await).unwrap();
        assert_transcript("verbose_json", verbose["text"].as_str().unwrap());
        assert_eq!(verbose["text"], expected.trim(), "verbose_json, {name}");
        assert_eq!(verbose["language"], name);
        let segments = verbose["segments"].as_array().unwrap();
        let tokens: Vec<i64> = segments.iter().flat_map(|s| ids(&s["tokens"])).collect();
        assert!(!tokens.is_empty(), "verbose_json, {name}: no tokens");
        assert_eq!(
            tokens,
            ids(&case["text_ids"]),
            "verbose_json tokens, {name}"
        );
        let segment_text: String = segments
            .iter()
            .map(|s| s["text"].as_str().unwrap())
            .collect();
        assert_eq!(segment_text, expected, "verbose_json segments, {name}");
        // No timestamp tokens: one segment spans the clip.
        assert_eq!(segments.len(), 1, "{segments:?}");
        assert_eq!(
            (segments[0]["start"].as_f64(), segments[0]["end"].as_f64()),
            (Some(0.0), Some(2.5))
        );

        for format in ["srt", "vtt"] {
            let subtitles = openai(with(format)).await;
            assert!(
                subtitles.contains(&format!(
                    "00:00:02{}500\n{}\n",
                    if format == "srt" { ',' } else { '.' },
                    expected.trim()
                )),
                "{format}, {name}: {subtitles}"
            );
        }
    }
    // The seed's endpoint and the endpoint root, in the detected language.
    let expected = reference["detected"]["text"].as_str().unwrap().trim();
    let (status, body) = post(
        format!("{}/v1/transcript", runtime.url),
        &multipart,
        form(&[], &clip),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["text"],
        expected
    );
    let (status, body) = post(format!("{}/", runtime.url), "audio/wav", clip.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["text"],
        expected
    );
}
