//! The native Llama-family decoders against Hugging Face transformers on the tiny trained
//! fixtures (`runtime/fixtures/make_decoder_fixtures.py`): logits of every position of a prompt
//! within 1e-4, and the same 64 greedy tokens per prompt, one sequence at a time and with all
//! prompts decoded together in one batch.

mod support;

use runtime::models::llama::{LlamaModel, Logits, Placement};
use support::{fixture, ids};
use tch::{Device, Kind, Tensor};

fn argmax(logits: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap()
}

/// Greedy continuations of `prompts`, prefilled together into their own slots and then
/// decoded together, one token per sequence per step.
fn greedy_batch(model: &LlamaModel, prompts: &[Vec<i64>], steps: usize) -> Vec<Vec<i64>> {
    let mut cache = model.new_cache(prompts.len() as i64 + 1, 256);
    // One prefill for all prompts, right-padded to the longest (as the engine batches them);
    // slot 0 stays unused, so that slot numbers and batch rows differ.
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let padded: Vec<i64> = prompts
        .iter()
        .flat_map(|p| {
            p.iter()
                .copied()
                .chain(std::iter::repeat_n(0, longest - p.len()))
        })
        .collect();
    let placements: Vec<Placement> = (0..prompts.len())
        .map(|i| Placement {
            slot: i as i64 + 1,
            start: 0,
        })
        .collect();
    let last: Vec<i64> = prompts.iter().map(|p| p.len() as i64 - 1).collect();
    let logits = model.forward(
        &Tensor::from_slice(&padded).view([prompts.len() as i64, longest as i64]),
        &placements,
        &mut cache,
        Logits::At(&last),
    );
    let next = argmax(&logits);
    let mut generated: Vec<Vec<i64>> = next.iter().map(|&t| vec![t]).collect();
    for _ in 1..steps {
        let placements: Vec<Placement> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Placement {
                slot: i as i64 + 1,
                start: (p.len() + generated[i].len() - 1) as i64,
            })
            .collect();
        let last: Vec<i64> = generated.iter().map(|g| *g.last().unwrap()).collect();
        let logits = model.forward(
            &Tensor::from_slice(&last).unsqueeze(1),
            &placements,
            &mut cache,
            Logits::Last,
        );
        for (row, token) in argmax(&logits).into_iter().enumerate() {
            generated[row].push(token);
        }
    }
    generated
}

fn check(name: &str) {
    let (dir, reference) = fixture(name);
    let model = LlamaModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    tch::no_grad(|| {
        let prompt = ids(&reference["logits_prompt"]);
        let mut cache = model.new_cache(1, 64);
        let logits = model.forward(
            &Tensor::from_slice(&prompt).unsqueeze(0),
            &[Placement { slot: 0, start: 0 }],
            &mut cache,
            Logits::All,
        );
        let expected: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
        let expected = Tensor::from_slice2(&expected).unsqueeze(0);
        let delta = f64::try_from((logits - expected).abs().max()).unwrap();
        assert!(delta <= 1e-4, "{name}: max |Δlogits| = {delta:e}");
        eprintln!("{name}: max |Δlogits| = {delta:e}");

        let prompts: Vec<Vec<i64>> = reference["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let greedy: Vec<Vec<i64>> = reference["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        for (prompt, expected) in prompts.iter().zip(&greedy) {
            let alone = greedy_batch(&model, std::slice::from_ref(prompt), 64);
            assert_eq!(&alone[0], expected, "{name}: greedy tokens of one sequence");
        }
        assert_eq!(
            greedy_batch(&model, &prompts, 64),
            greedy,
            "{name}: greedy tokens in one batch"
        );
    });
}

#[test]
fn llama_with_grouped_query_attention_and_llama3_rope_scaling_matches_transformers() {
    check("llama");
}

#[test]
fn mistral_with_tied_embeddings_matches_transformers() {
    check("mistral");
}

#[test]
fn qwen2_with_qkv_biases_and_one_kv_head_matches_transformers() {
    check("qwen2");
}

#[test]
fn a_checkpoint_sharded_with_an_index_loads_the_same_weights() {
    let (dir, reference) = fixture("llama");
    let sharded =
        std::env::temp_dir().join(format!("infergate-sharded-llama-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&sharded);
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(dir.join("config.json"), sharded.join("config.json")).unwrap();
    // Two shards and the index transformers writes for them.
    let split = r#"
import json, sys
from safetensors.torch import load_file, save_file
source, out = sys.argv[1], sys.argv[2]
tensors = load_file(f"{source}/model.safetensors")
names = sorted(tensors)
halves = [names[: len(names) // 2], names[len(names) // 2 :]]
weight_map = {}
for i, part in enumerate(halves):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, f"{out}/{file}", metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{out}/model.safetensors.index.json", "w"))
"#;
    let status = std::process::Command::new("python")
        .args(["-c", split])
        .arg(&dir)
        .arg(&sharded)
        .status()
        .expect("python from the set-up virtualenv");
    assert!(status.success());
    let model = LlamaModel::load(&sharded, Device::Cpu, Kind::Float).unwrap();
    let prompt = ids(&reference["logits_prompt"]);
    let mut cache = model.new_cache(1, 64);
    let logits = tch::no_grad(|| {
        model.forward(
            &Tensor::from_slice(&prompt).unsqueeze(0),
            &[Placement { slot: 0, start: 0 }],
            &mut cache,
            Logits::All,
        )
    });
    let expected: Vec<Vec<f32>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let delta = f64::try_from(
        (logits - Tensor::from_slice2(&expected).unsqueeze(0))
            .abs()
            .max(),
    )
    .unwrap();
    assert!(delta <= 1e-4, "max |Δlogits| = {delta:e}");
    std::fs::remove_dir_all(sharded).unwrap();
}
