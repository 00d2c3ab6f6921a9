//! The native VITS against Hugging Face transformers on the tiny random fixtures
//! (`runtime/fixtures/make_tts_fixtures.py`): the character tokenizer's ids, and the waveform
//! within 1e-3 with both noise scales 0 and, seeded alike, with the model's own noise, for the
//! stochastic (MMS-TTS) and the plain duration predictor.

mod support;

use runtime::models::vits::{Synthesis, VitsModel};
use runtime::tasks::text_to_speech::http::CharacterTokenizer;
use support::ids;
use tch::{Device, Kind, Tensor};

/// libtorch's generator is global: tests that seed it take turns.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check(fixture: &str) {
    // Both syntheses draw from the generator (the noiseless one multiplies its draws by 0).
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, reference) = support::fixture(fixture);
    let tokenizer = CharacterTokenizer::load(&dir).unwrap();
    let expected_ids = ids(&reference["ids"]);
    assert_eq!(
        tokenizer.encode(reference["sentence"].as_str().unwrap()),
        expected_ids,
        "{fixture}: token ids"
    );
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let model = VitsModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let quiet = model.synthesize(
        &expected_ids,
        Synthesis {
            speaking_rate: 1.0,
            noise_scale: 0.0,
            noise_scale_duration: 0.0,
        },
    );
    let seeded = {
        tch::manual_seed(reference["seed"].as_i64().unwrap());
        model.synthesize(
            &expected_ids,
            Synthesis {
                speaking_rate: model.config.speaking_rate,
                noise_scale: model.config.noise_scale,
                noise_scale_duration: model.config.noise_scale_duration,
            },
        )
    };
    for (name, got) in [("quiet", quiet), ("seeded", seeded)] {
        let want = &expected[name];
        assert_eq!(got.size(), want.size(), "{fixture} {name}: waveform length");
        let delta = f64::try_from((&got - want).abs().max()).unwrap();
        eprintln!(
            "{fixture} {name}: {} samples, max |Δ| = {delta:e}",
            got.size()[0]
        );
        assert!(delta <= 1e-3, "{fixture} {name}: max |Δ| = {delta:e}");
    }
}

#[test]
fn mms_tts_style_vits_matches_transformers() {
    check("vits");
}

#[test]
fn vits_with_the_plain_duration_predictor_matches_transformers() {
    check("vits-plain");
}
