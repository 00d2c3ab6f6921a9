//! The native MarianMT against Hugging Face transformers on the tiny trained fixture
//! (`runtime/fixtures/make_translation_fixtures.py`): teacher-forced logits within 1e-4.

mod support;

use runtime::decode::beam::{Search, translate};
use runtime::models::marian::{DecoderCache, MarianModel};
use runtime::tasks::translation::tokenizer::MarianTokenizer;
use support::ids;
use tch::{Device, Kind, Tensor};

#[test]
fn teacher_forced_logits_match_transformers() {
    let (dir, reference) = support::fixture("marian");
    let model = MarianModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let source = ids(&reference["input_ids"][0]);
    let target = ids(&reference["decoder_input_ids"]);
    let logits = tch::no_grad(|| {
        let input = Tensor::from_slice(&source).unsqueeze(0);
        let encoded = model.encode(&input, &input.ones_like());
        let mut cache = DecoderCache::default();
        model.decode(
            &Tensor::from_slice(&target).unsqueeze(0),
            &encoded,
            &mut cache,
            true,
        )
    });
    let expected: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let delta = f64::try_from(
        (logits - Tensor::from_slice2(&expected).unsqueeze(0))
            .abs()
            .max(),
    )
    .unwrap();
    eprintln!("max |Δlogits| = {delta:e}");
    assert!(delta <= 1e-4, "max |Δlogits| = {delta:e}");
}

#[test]
fn the_spm_tokenizer_gives_transformers_ids_and_decodes_its_outputs() {
    let (dir, reference) = support::fixture("marian");
    let tokenizer = MarianTokenizer::load(&dir).unwrap();
    let inputs: Vec<String> = serde_json::from_value(reference["inputs"].clone()).unwrap();
    for (i, text) in inputs.iter().enumerate() {
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            ids(&reference["input_ids"][i]),
            "{text:?}"
        );
        assert_eq!(
            tokenizer.decode(&ids(&reference["greedy_ids"][i])),
            reference["greedy_text"][i].as_str().unwrap()
        );
    }
}

#[test]
fn greedy_and_beam_search_match_transformers_generate() {
    let (dir, reference) = support::fixture("marian");
    let model = MarianModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let sources: Vec<Vec<i64>> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    // The reference ids are without the start (pad) token, as the native search returns them.
    let expected = |key: &str| -> Vec<Vec<i64>> {
        reference[key].as_array().unwrap().iter().map(ids).collect()
    };
    let greedy = translate(
        &model,
        &sources,
        Search {
            beams: 1,
            max_length: 32,
        },
    );
    assert_eq!(
        greedy,
        expected("greedy_ids"),
        "greedy, the three sources in one batch"
    );
    let beam = translate(
        &model,
        &sources,
        Search {
            beams: 3,
            max_length: 32,
        },
    );
    assert_eq!(beam, expected("beam_ids"), "beam search, three beams");
    let alone = translate(
        &model,
        &sources[2..],
        Search {
            beams: 1,
            max_length: 32,
        },
    );
    assert_eq!(
        alone[0],
        expected("greedy_ids")[2],
        "a sequence's output does not depend on its batch"
    );
}
