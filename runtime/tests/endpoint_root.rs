//! `POST /`, where Hugging Face clients (`InferenceClient(model=URL)`, TGI's and TEI's own
//! compat routes) post every non-chat call: each task answers there in the shape those clients
//! parse, and the same as its named route.

mod support;

use serde_json::{Value, json};
use support::{Runtime, fixture};

async fn runtime(task: &str, fixture_name: &str) -> Runtime {
    Runtime::start_task(task, &fixture(fixture_name).0, &[]).await
}

async fn ok(runtime: &Runtime, path: &str, body: Value) -> Value {
    let (status, answer) = runtime.post(path, &body.to_string()).await;
    assert_eq!(status, 200, "{path} {body} → {answer}");
    answer
}

async fn refused(runtime: &Runtime, path: &str, body: Value, field: &str) {
    let (status, answer) = runtime.post(path, &body.to_string()).await;
    assert!(
        (400..500).contains(&status),
        "{path} {body} → {status} {answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(field), "{body} → {message}");
}

#[tokio::test]
async fn embedding_models_embed_and_compare_sentences_at_the_root() {
    let runtime = runtime("embedding", "bert-mean").await;
    let at_root = ok(&runtime, "/", json!({"inputs": "a red fox"})).await;
    assert_eq!(
        at_root,
        ok(&runtime, "/embed", json!({"inputs": "a red fox"})).await
    );

    let compare =
        json!({"inputs": {"source_sentence": "a red fox", "sentences": ["a red fox", "tax law"]}});
    let similarity = ok(&runtime, "/", compare.clone()).await;
    assert_eq!(similarity, ok(&runtime, "/similarity", compare).await);
    let scores: Vec<f64> = similarity
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect();
    assert!(
        (scores[0] - 1.0).abs() < 1e-5,
        "a sentence is itself: {scores:?}"
    );
    assert!(scores[1] < scores[0]);

    refused(
        &runtime,
        "/",
        json!({"inputs": {"source_sentence": "a", "sentences": []}}),
        "inputs.sentences",
    )
    .await;
    refused(
        &runtime,
        "/similarity",
        json!({"inputs": {"source_sentence": "a", "sentence": ["b"]}}),
        "sentence",
    )
    .await;
}

/// The same labels in the same order, with the same scores (as f32).
fn assert_same_labels(a: &Value, b: &Value) {
    let labels = |v: &Value| -> Vec<(String, f32)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["label"].as_str().unwrap().to_owned(),
                    l["score"].as_f64().unwrap() as f32,
                )
            })
            .collect()
    };
    assert_eq!(labels(a), labels(b));
}

#[tokio::test]
async fn classifiers_answer_one_ranked_list_per_input_at_the_root() {
    let runtime = runtime("text-classification", "bert-classifier").await;
    let one = ok(&runtime, "/", json!({"inputs": "great"})).await;
    let named = ok(&runtime, "/v1/classify", json!({"inputs": "great"})).await;
    assert_eq!(
        one.as_array().unwrap().len(),
        1,
        "a list per input, even for one"
    );
    assert_same_labels(&one[0], &named["classification"]);

    let two = ok(
        &runtime,
        "/",
        json!({"inputs": ["great", "awful"], "parameters": {"top_k": 1}}),
    )
    .await;
    assert_eq!(two.as_array().unwrap().len(), 2);
    assert_eq!(two[0].as_array().unwrap().len(), 1, "top_k: 1");

    let raw = ok(
        &runtime,
        "/",
        json!({"inputs": "great", "parameters": {"function_to_apply": "none"}}),
    )
    .await;
    let raw_named = ok(
        &runtime,
        "/predict",
        json!({"inputs": "great", "raw_scores": true}),
    )
    .await;
    assert_same_labels(&raw[0], &raw_named);
    refused(
        &runtime,
        "/",
        json!({"inputs": "great", "parameters": {"function_to_apply": "sigmoid"}}),
        "parameters.function_to_apply",
    )
    .await;
}

#[tokio::test]
async fn translators_answer_translation_text_at_the_root() {
    let runtime = runtime("translation", "marian").await;
    let (_, reference) = fixture("marian");
    let source = reference["inputs"][0].as_str().unwrap().to_owned();
    let at_root = ok(
        &runtime,
        "/",
        json!({"inputs": [source], "parameters": {"generate_parameters": {"num_beams": 2}}}),
    )
    .await;
    let named = ok(
        &runtime,
        "/v1/translate",
        json!({"text": [source], "num_beams": 2}),
    )
    .await;
    assert_eq!(
        at_root,
        json!([{"translation_text": named["translation"][0]}])
    );
    refused(
        &runtime,
        "/",
        json!({"inputs": "x", "parameters": {"truncation": "longest_first"}}),
        "parameters.truncation",
    )
    .await;
}

#[tokio::test]
async fn generators_and_rerankers_answer_at_the_root_as_on_their_named_routes() {
    let generator = runtime("text-generation", "llama").await;
    let body =
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 4, "do_sample": false}});
    // TGI's root answers a list of one, which its own client indexes.
    assert_eq!(
        ok(&generator, "/", body.clone()).await,
        json!([ok(&generator, "/generate", body).await])
    );
    let reranker = runtime("rerank", "xlm-roberta-reranker").await;
    let body = json!({"query": "fox", "texts": ["a red fox", "tax law"]});
    assert_eq!(
        ok(&reranker, "/", body.clone()).await,
        ok(&reranker, "/rerank", body).await
    );
}
