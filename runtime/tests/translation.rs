//! `translation` over HTTP on the tiny trained Marian fixture: the seed's request shape, greedy
//! and beam search as transformers generates, and bad input named.

mod support;

use serde_json::{Value, json};
use support::{Runtime, fixture};

#[tokio::test]
async fn translate_answers_in_the_seeds_shape_as_transformers_translates() {
    let (dir, reference) = fixture("marian");
    let runtime = Runtime::start_task("translation", &dir, &[]).await;
    let inputs: Vec<String> = serde_json::from_value(reference["inputs"].clone()).unwrap();
    let (status, one) = runtime
        .post("/v1/translate", &json!({"text": inputs[0]}).to_string())
        .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        one["translation"], reference["beam_text"][0],
        "the model's default: 3 beams"
    );
    let (status, many) = runtime
        .post(
            "/v1/translate",
            &json!({"text": inputs, "num_beams": 1}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{many}");
    assert_eq!(many["translation"], reference["greedy_text"]);
    assert_eq!(many["translation"][0], "lo gatto vede un pesce");
    let info = runtime.get_json("/info").await;
    assert_eq!(info["task"], "translation");
}

#[tokio::test]
async fn bad_translation_requests_name_the_field() {
    let (dir, _) = fixture("marian");
    let runtime = Runtime::start_task("translation", &dir, &[]).await;
    let cases: [(Value, u16, &str); 6] = [
        (json!({"text": ""}), 400, "text[0]"),
        (json!({"text": []}), 400, "text"),
        (json!({"text": "a cat", "num_beams": 0}), 400, "num_beams"),
        (
            json!({"text": "a cat", "max_length": 100000}),
            400,
            "max_length",
        ),
        (json!({"text": vec!["a cat"; 64]}), 422, "text has 64 items"),
        (json!({"txt": "a cat"}), 400, "txt"),
    ];
    for (body, status, needle) in cases {
        let (got, answer) = runtime.post("/v1/translate", &body.to_string()).await;
        assert_eq!(got, status, "{body} → {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body} → {message}");
    }
}

#[tokio::test]
async fn concurrent_requests_are_translated_together_each_as_alone() {
    let (dir, reference) = fixture("marian");
    // Twelve at once on an idle model: none is refused, each waits far less than the maximum
    // queue time.
    let runtime = Runtime::start_task("translation", &dir, &[]).await;
    let inputs: Vec<String> = serde_json::from_value(reference["inputs"].clone()).unwrap();
    // Greedy and beam requests side by side: those that search alike share a batch.
    let requests = (0..12).map(|i| {
        let beams = if i % 2 == 0 { 1 } else { 3 };
        let body = json!({"text": inputs[i % 3], "num_beams": beams}).to_string();
        let runtime = &runtime;
        async move { (i, beams, runtime.post("/v1/translate", &body).await) }
    });
    for (i, beams, (status, answer)) in futures::future::join_all(requests).await {
        assert_eq!(status, 200, "{answer}");
        let key = if beams == 1 {
            "greedy_text"
        } else {
            "beam_text"
        };
        assert_eq!(answer["translation"], reference[key][i % 3], "request {i}");
    }
}
