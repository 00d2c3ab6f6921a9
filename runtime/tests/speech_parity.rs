//! The native Whisper against Hugging Face transformers on the tiny random fixture
//! (`runtime/fixtures/make_speech_fixtures.py`): log-mel features and teacher-forced logits
//! within 1e-4, and `generate`'s greedy ids, without and with timestamps, identical. Then the
//! audio front end: one signal encoded as WAV, FLAC, MP3 and Ogg at 8 to 48 kHz decodes to the
//! features of the same signal computed at 16 kHz.

mod support;

use std::path::Path;
use std::sync::Arc;

use runtime::audio::{TARGET_RATE, decode_to_16k};
use runtime::models::whisper::{DecoderCache, MelFeatures, WhisperModel};
use runtime::tasks::transcribe::decode::{
    DecodeOptions, SpeechTask, SpeechTokens, generate, prompt,
};
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
    let alive = Arc::new(());
    let generated = generate(
        &model,
        &tokens,
        &encoded,
        std::slice::from_ref(&start),
        &[timestamps],
        &[Arc::downgrade(&alive)],
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
