//! The runtime binary over HTTP, on the tiny BERT fixture: the shared routes, TEI's and
//! OpenAI's embedding routes, bad input, overload and shutdown.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Runtime, fixture, fixture_dir};

fn reference_embeddings() -> (Vec<String>, Vec<Vec<f32>>) {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap(),
    )
    .unwrap();
    let inputs = serde_json::from_value(reference["inputs"].clone()).unwrap();
    let embeddings: Vec<Vec<f32>> =
        serde_json::from_value(reference["embeddings"].clone()).unwrap();
    let normalized = embeddings
        .into_iter()
        .map(|v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect();
    (inputs, normalized)
}

fn assert_close(actual: &Value, expected: &[f32]) {
    let actual: Vec<f32> = serde_json::from_value(actual.clone()).unwrap();
    let delta = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f32::max);
    assert_eq!(actual.len(), expected.len());
    assert!(delta <= 1e-4, "max |Δ| {delta:e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_returns_the_reference_embeddings_normalised() {
    let runtime = Runtime::start(&[]).await;
    let (inputs, expected) = reference_embeddings();
    let (status, body) = runtime
        .post("/embed", &json!({"inputs": inputs}).to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    for (i, vector) in body.as_array().unwrap().iter().enumerate() {
        assert_close(vector, &expected[i]);
    }
    let (status, single) = runtime
        .post("/v1/embed", &json!({"inputs": inputs[2]}).to_string())
        .await;
    assert_eq!(status, 200);
    assert_close(&single[0], &expected[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embeddings_have_the_openai_shape() {
    let runtime = Runtime::start(&["--model-id", "tiny-bert"]).await;
    let (inputs, expected) = reference_embeddings();
    let (status, body) = runtime
        .post(
            "/v1/embeddings",
            &json!({"input": [inputs[0], inputs[1]], "model": "tiny-bert"}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "tiny-bert");
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(body["data"][1]["object"], "embedding");
    assert_close(&body["data"][1]["embedding"], &expected[1]);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let (_, encoded) = runtime
        .post(
            "/v1/embeddings",
            &json!({"input": inputs[0], "encoding_format": "base64"}).to_string(),
        )
        .await;
    assert_eq!(
        encoded["data"][0]["embedding"].as_str().unwrap().len(),
        (32 * 4usize).div_ceil(3) * 4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_routes_describe_the_model() {
    let runtime = Runtime::start(&["--model-id", "tiny-bert"]).await;
    let info = runtime.get_json("/info").await;
    assert_eq!(info["task"], "embedding");
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["model_dtype"], "float32");
    assert_eq!(info["max_input_length"], 64);
    assert_eq!(info["model_type"]["embedding"]["pooling"], "mean");
    assert_eq!(info["max_queue_time"], 1.0);
    assert_eq!(info["wait_floor"], 0.25);
    assert_eq!(info["default_timeout"], 120.0);
    let models = runtime.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "tiny-bert");
    runtime.post("/embed", r#"{"inputs":"hello"}"#).await;
    let metrics = runtime.metrics().await;
    assert!(
        metrics.contains(r#"infergate_runtime_requests_total{endpoint="/embed",status="200"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("infergate_runtime_batch_size_bucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_loads_registers_or_manages_models() {
    // TorchServe's management API ("ShellTorch") loaded a model from any URL it was sent. The
    // runtime loads one model from local files at start and has no such route by any name.
    let runtime = Runtime::start(&[]).await;
    let client = reqwest::Client::new();
    let paths = [
        "/models",
        "/models?url=http://attacker/model.mar",
        "/models/tiny",
        "/v1/models/tiny",
        "/v1/models/tiny/load",
        "/register",
        "/load",
        "/unload",
        "/reload",
        "/admin",
        "/config",
        "/shutdown",
        "/workflows",
        "/api/v1/models",
        "/v2/repository/models/tiny/load",
        "/v2/repository/index",
    ];
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in paths {
            let response = client
                .request(method.parse().unwrap(), format!("{}{path}", runtime.url))
                .body(r#"{"url": "http://attacker/model.safetensors"}"#)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            assert!(
                status == 404 || status == 405,
                "{method} {path} answered {status}"
            );
        }
    }
    let (status, _) = runtime
        .post("/embed", r#"{"inputs":"still the same model"}"#)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_4xx_naming_the_problem_and_the_server_keeps_serving() {
    let runtime = Runtime::start(&["--max-client-batch-size", "4"]).await;
    let long = "word ".repeat(200);
    let cases: Vec<(String, u16, &str)> = vec![
        ("not json".into(), 400, "invalid_json"),
        ("{\"inputs\": \"\u{0}".into(), 400, "invalid_json"),
        (r#"{"inputs": 42}"#.into(), 400, "invalid_field"),
        (r#"{"inputs": []}"#.into(), 400, "invalid_field"),
        (r#"{"input": "hi"}"#.into(), 400, "invalid_field"),
        (
            r#"{"inputs": "hi", "normalize": "yes"}"#.into(),
            400,
            "invalid_field",
        ),
        (
            r#"{"inputs": ["a", "b", "c", "d", "e"]}"#.into(),
            422,
            "too_many_inputs",
        ),
        (json!({"inputs": long}).to_string(), 413, "input_too_long"),
        (
            r#"{"inputs": [[1, 2, 99999]]}"#.into(),
            400,
            "invalid_field",
        ),
        (
            r#"{"inputs": "hi", "dimensions": 0}"#.into(),
            400,
            "invalid_field",
        ),
        (
            json!({"inputs": "x".repeat(3 * 1024 * 1024)}).to_string(),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (actual_status, response) = runtime.post("/embed", &body).await;
        let shown = &body[..body.len().min(60)];
        assert_eq!(
            (
                actual_status,
                response["error"]["code"].as_str().unwrap_or("")
            ),
            (status, code),
            "{shown}: {response}"
        );
        assert!(!response["error"]["message"].as_str().unwrap().is_empty());
    }
    let (_, named) = runtime
        .post("/embed", r#"{"inputs": "hi", "normalize": "yes"}"#)
        .await;
    assert!(
        named["error"]["message"]
            .as_str()
            .unwrap()
            .contains("normalize"),
        "{named}"
    );
    let invalid_utf8 = reqwest::Client::new()
        .post(format!("{}/embed", runtime.url))
        .header("content-type", "application/json")
        .body(vec![b'{', b'"', 0xff, 0xfe, b'"', b'}'])
        .send()
        .await
        .unwrap();
    assert_eq!(invalid_utf8.status(), 400);
    let (status, _) = runtime
        .post(
            "/embed",
            &json!({"inputs": long, "truncate": true}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "truncate: true cuts a long input");
    let (status, _) = runtime
        .post("/embed", r#"{"inputs": "still serving"}"#)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_admission_limit_requests_get_429_with_retry_after() {
    // The real MiniLM takes tens of milliseconds per request, so the requests overlap for sure.
    let runtime = Runtime::start_task(
        "embedding",
        &support::minilm_dir(),
        &["--max-concurrent-requests", "1"],
    )
    .await;
    let body = json!({"inputs": vec!["a long sentence to keep the model busy for a while"; 32]})
        .to_string();
    let responses = concurrent_embeds(&runtime, 24, &body, None).await;
    let mut statuses = std::collections::BTreeMap::new();
    for response in responses {
        let response = response.unwrap();
        if response.status() == 429 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        *statuses.entry(response.status().as_u16()).or_insert(0) += 1;
    }
    assert!(statuses.get(&429).is_some_and(|&n| n > 0), "{statuses:?}");
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200, 429],
        "{statuses:?}"
    );
}

/// The statuses of `count` requests of `body` sent at once, and the 429s' error messages, each
/// checked to carry Retry-After.
/// Three passes of `body`, one at a time, so that admission has measured what a pass costs.
async fn time_passes(runtime: &Runtime, body: &str) {
    for _ in 0..3 {
        let (status, _) = runtime.post("/embed", body).await;
        assert_eq!(status, 200, "the cost of a pass is measured");
    }
}

async fn burst(
    runtime: &Runtime,
    count: usize,
    body: &str,
    deadline: Option<&str>,
) -> (Vec<u16>, Vec<String>) {
    let (mut statuses, mut refusals) = (Vec::new(), Vec::new());
    for response in concurrent_embeds(runtime, count, body, deadline).await {
        let response = response.unwrap();
        let status = response.status().as_u16();
        statuses.push(status);
        if status == 429 {
            assert!(response.headers().contains_key("retry-after"));
            let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
            refusals.push(body["error"]["message"].as_str().unwrap().to_owned());
        }
    }
    (statuses, refusals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_fits_one_batch_is_never_refused_however_slow_the_machine() {
    let runtime = Runtime::start_task("embedding", &support::minilm_dir(), &[]).await;
    let body = json!({"inputs": "a sentence to keep the model busy for a while"}).to_string();
    time_passes(&runtime, &body).await;
    for count in [2, 3, 8, 32, 64] {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (statuses, _) = burst(&runtime, count, &body, None).await;
        assert_eq!(statuses, vec![200; count], "a burst of {count}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_would_wait_past_the_maximum_queue_time_is_refused_at_once() {
    // One request per pass, and a queue time of 50 ms: of 24 requests of 8 sentences at once,
    // those behind more than 50 ms of passes are refused.
    let runtime = Runtime::start_task(
        "embedding",
        &support::minilm_dir(),
        &[
            "--max-batch-requests",
            "8",
            "--max-queue-time",
            "0.05",
            "--wait-floor",
            "0.01",
        ],
    )
    .await;
    let body =
        json!({"inputs": vec!["a sentence to keep the model busy for a while"; 8]}).to_string();
    time_passes(&runtime, &body).await;
    let (statuses, refusals) = burst(&runtime, 24, &body, None).await;
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert!(!refusals.is_empty(), "{statuses:?}");
    let refused = refusals.len();
    for message in refusals {
        assert!(
            message.contains("more than the maximum queue time of 0.05 s"),
            "{message}"
        );
    }
    let metrics = runtime.metrics().await;
    assert!(
        metrics.contains(&format!(
            r#"infergate_runtime_refused_total{{reason="queue_time"}} {refused}"#
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_end_before_its_deadline_is_refused_at_once() {
    // A minute of queue time allowed; 16 requests of 32 sentences, 8 per pass, queue 64 passes.
    // A request behind them with 0.1 s left, as a request without OICM-Request-Timeout has
    // here, cannot make it: 429 at once, not 504 later.
    let runtime = Runtime::start_task(
        "embedding",
        &support::minilm_dir(),
        &[
            "--max-batch-requests",
            "8",
            "--max-queue-time",
            "60",
            "--wait-floor",
            "0.01",
            "--default-timeout",
            "0.1",
        ],
    )
    .await;
    let sentences =
        json!({"inputs": vec!["a sentence to keep the model busy for a while"; 32]}).to_string();
    for _ in 0..2 {
        let (statuses, _) = burst(&runtime, 1, &sentences, Some("60")).await;
        assert_eq!(statuses, [200], "the cost of a pass is measured");
    }
    let backlog = {
        let runtime_url = runtime.url.clone();
        let sentences = sentences.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let sends = (0..16).map(|_| {
                client
                    .post(format!("{runtime_url}/embed"))
                    .header("content-type", "application/json")
                    .header("oicm-request-timeout", "60")
                    .body(sentences.clone())
                    .send()
            });
            futures::future::join_all(sends).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let one = json!({"inputs": "in a hurry"}).to_string();
    let (statuses, refusals) = burst(&runtime, 1, &one, None).await;
    assert_eq!(statuses, [429]);
    assert!(
        refusals[0].contains("s left before its deadline"),
        "{}",
        refusals[0]
    );
    for answered in backlog.await.unwrap() {
        assert_eq!(answered.unwrap().status(), 200, "the backlog is served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_costs_no_tokenizing() {
    let runtime = Runtime::start_task(
        "embedding",
        &support::minilm_dir(),
        &["--max-concurrent-requests", "1"],
    )
    .await;
    // 32 texts of 8 000 characters: a 256 KB body that takes far longer to tokenize (whole,
    // before truncation) than to read.
    let heavy = json!({"inputs": vec!["tokens ".repeat(1150); 32], "truncate": true}).to_string();
    let client = reqwest::Client::new();
    let admitted = Instant::now();
    let busy = tokio::spawn(
        client
            .post(format!("{}/embed", runtime.url))
            .header("content-type", "application/json")
            .body(heavy.clone())
            .send(),
    );
    let mut slowest_refusal = Duration::ZERO;
    let mut refused = 0;
    tokio::time::sleep(Duration::from_millis(100)).await;
    while !busy.is_finished() {
        let started = Instant::now();
        let (status, _) = runtime.post("/embed", &heavy).await;
        if status == 429 {
            refused += 1;
            slowest_refusal = slowest_refusal.max(started.elapsed());
        }
    }
    assert_eq!(busy.await.unwrap().unwrap().status(), 200);
    let admitted_took = admitted.elapsed();
    assert!(refused > 0, "nothing was refused while the slot was taken");
    eprintln!(
        "{refused} refused, slowest {slowest_refusal:?}; the admitted one took {admitted_took:?}"
    );
    // Relative to the admitted request's own tokenizing and pass, so that the bound holds on a
    // loaded machine, where both slow down alike. Tokenizing before the refusal made each
    // refusal cost about what the admitted request took.
    assert!(
        slowest_refusal * 5 < admitted_took,
        "a refusal took {slowest_refusal:?}, the admitted request {admitted_took:?}"
    );
}

/// `count` copies of `body` posted to `/embed` at once, with an optional deadline header.
async fn concurrent_embeds(
    runtime: &Runtime,
    count: usize,
    body: &str,
    deadline: Option<&str>,
) -> Vec<reqwest::Result<reqwest::Response>> {
    let client = reqwest::Client::new();
    let handles: Vec<_> = (0..count)
        .map(|_| {
            let mut request = client
                .post(format!("{}/embed", runtime.url))
                .header("content-type", "application/json")
                .body(body.to_owned());
            if let Some(deadline) = deadline {
                request = request.header("oicm-request-timeout", deadline);
            }
            tokio::spawn(request.send())
        })
        .collect();
    let mut responses = Vec::new();
    for handle in handles {
        responses.push(handle.await.unwrap());
    }
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_progress() {
    // The real MiniLM, so that the queue holds seconds of work when the signal comes.
    let minilm = support::minilm_dir();
    let mut runtime = Runtime::start_task("embedding", &minilm, &[]).await;
    let sentence = "a long sentence about serving models behind tokens, repeated to fill the queue";
    let body = json!({"inputs": vec![sentence; 32]}).to_string();
    let client = reqwest::Client::new();
    let handles: Vec<_> = (0..24)
        .map(|_| {
            let request = client
                .post(format!("{}/embed", runtime.url))
                .header("content-type", "application/json")
                .body(body.clone());
            tokio::spawn(async move {
                let response = request.send().await;
                (response, Instant::now())
            })
        })
        .collect();
    // Long enough for every connection to be accepted and its request queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Command::new("kill")
        .arg("-TERM")
        .arg(runtime.child.id().to_string())
        .status()
        .unwrap();
    let signalled = Instant::now();
    let mut finished_after_signal = 0;
    for handle in handles {
        let (response, finished) = handle.await.unwrap();
        let response = response.expect("a queued request was dropped");
        assert_eq!(response.status(), 200);
        finished_after_signal += usize::from(finished > signalled);
    }
    assert!(
        finished_after_signal > 0,
        "no request was still queued at SIGTERM; the test proves nothing"
    );
    eprintln!("{finished_after_signal} of 24 requests finished after SIGTERM");
    let started = Instant::now();
    while runtime.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "runtime did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_returns_every_label_best_first() {
    let (dir, reference) = fixture("bert-classifier");
    let runtime = Runtime::start_task("text-classification", &dir, &[]).await;
    let (status, body) = runtime
        .post(
            "/v1/classify",
            &json!({"inputs": reference["inputs"][0]}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ranked = body["classification"].as_array().unwrap();
    assert_eq!(ranked.len(), 3);
    let scores: Vec<f64> = ranked
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    assert!(close(scores.iter().sum(), 1.0));
    let labels = ["negative", "neutral", "positive"];
    let expected: Vec<f64> = serde_json::from_value(reference["probabilities"][0].clone()).unwrap();
    for entry in ranked {
        let index = labels.iter().position(|l| entry["label"] == *l).unwrap();
        assert!(
            close(entry["score"].as_f64().unwrap(), expected[index]),
            "{entry}"
        );
    }

    let (status, many) = runtime
        .post(
            "/v1/classify",
            &json!({"inputs": reference["inputs"]}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(many.as_array().unwrap().len(), 4);
    let (status, predicted) = runtime
        .post(
            "/predict",
            &json!({"inputs": [["a question", "an answer"], "text"]}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{predicted}");
    assert_eq!(predicted.as_array().unwrap().len(), 2);
    assert_eq!(predicted[0].as_array().unwrap().len(), 3);
    let (status, error) = runtime.post("/v1/classify", r#"{"inputs": 5}"#).await;
    assert_eq!(
        (status, error["error"]["code"].as_str().unwrap()),
        (400, "invalid_field")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_orders_passages_by_relevance_with_their_original_index() {
    let (dir, reference) = fixture("xlm-roberta-reranker");
    let runtime = Runtime::start_task("rerank", &dir, &["--max-client-batch-size", "8"]).await;
    let query = reference["queries"][0].clone();
    let passages = reference["passages"].clone();
    let logits: Vec<f64> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let (status, body) = runtime
        .post(
            "/rerank",
            &json!({"query": query, "texts": passages, "return_text": true}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ranks = body.as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    let mut indexes: Vec<u64> = ranks.iter().map(|r| r["index"].as_u64().unwrap()).collect();
    for rank in ranks {
        let index = rank["index"].as_u64().unwrap() as usize;
        let sigmoid = 1.0 / (1.0 + (-logits[index]).exp());
        assert!(close(rank["score"].as_f64().unwrap(), sigmoid), "{rank}");
        assert_eq!(rank["text"], passages[index]);
    }
    let scores: Vec<f64> = ranks.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    indexes.sort();
    assert_eq!(indexes, [0, 1, 2]);

    let (_, raw) = runtime
        .post(
            "/v1/rerank",
            &json!({"query": query, "texts": [passages[1]], "raw_scores": true}).to_string(),
        )
        .await;
    assert!(close(raw[0]["score"].as_f64().unwrap(), logits[1]), "{raw}");
    assert!(raw[0].get("text").is_none());
    let too_many = json!({"query": "q", "texts": vec!["t"; 9]}).to_string();
    let (status, error) = runtime.post("/rerank", &too_many).await;
    assert_eq!(
        (status, error["error"]["code"].as_str().unwrap()),
        (422, "too_many_inputs")
    );
    let (status, _) = runtime
        .post("/rerank", r#"{"query": "q", "texts": []}"#)
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabular_predict_takes_every_mlflow_form_and_validates_the_signature() {
    let (dir, reference) = fixture("tabular-mlp");
    let runtime = Runtime::start_task("tabular", &dir, &[]).await;
    let rows = reference["rows"].clone();
    let expected: Vec<Vec<f64>> = serde_json::from_value(reference["predictions"].clone()).unwrap();
    let forms = [
        rows.clone(),
        json!({"inputs": rows}),
        json!({"instances": rows}),
        json!({"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": rows}}),
    ];
    for form in forms {
        let (status, body) = runtime.post("/v1/predict", &form.to_string()).await;
        assert_eq!(status, 200, "{form}: {body}");
        let data: Vec<Vec<f64>> = serde_json::from_value(body["data"].clone()).unwrap();
        for (row, want) in data.iter().zip(&expected) {
            assert!(
                row.iter().zip(want).all(|(a, b)| (a - b).abs() <= 1e-4),
                "{row:?} vs {want:?}"
            );
        }
        assert_eq!(
            body["meta"]["input_schema"][0]["tensor-spec"]["shape"],
            json!([-1, 4])
        );
        assert_eq!(
            body["meta"]["output_schema"][0]["tensor-spec"]["shape"],
            json!([-1, 2])
        );
    }
    let (status, single) = runtime.post("/v1/predict", &rows[1].to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(single["data"].as_array().unwrap().len(), 1);
    // The signature, for a client to shape its rows before sending one.
    let schema = runtime.get_json("/v1/predict/schema").await;
    assert_eq!(schema["inputs"], single["meta"]["input_schema"]);
    assert_eq!(schema["outputs"], single["meta"]["output_schema"]);

    let bad = [
        (
            json!([[1.0, 2.0, 3.0]]),
            400,
            "row 0 has 3 values; the signature expects 4",
        ),
        (json!([[1.0, 2.0, 3.0, "four"]]), 400, "row 0 column 3"),
        (json!({"inputs": []}), 400, "inputs is empty"),
        (json!({"rows": [[1, 2, 3, 4]]}), 400, "dataframe_split"),
        (json!("text"), 400, "expected"),
    ];
    for (body, status, message) in bad {
        let (actual, error) = runtime.post("/v1/predict", &body.to_string()).await;
        assert_eq!(actual, status, "{body}: {error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{body}: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarded_deadline_ends_a_request_with_504_and_a_bad_one_is_400() {
    let runtime = Runtime::start(&[]).await;
    let post = |timeout: &str| {
        reqwest::Client::new()
            .post(format!("{}/embed", runtime.url))
            .header("content-type", "application/json")
            .header("oicm-request-timeout", timeout)
            .body(json!({"inputs": vec!["a sentence to embed"; 32]}).to_string())
            .send()
    };
    let late = post("0.0001").await.unwrap();
    assert_eq!(late.status(), 504);
    let body: Value = serde_json::from_slice(&late.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    assert_eq!(post("30").await.unwrap().status(), 200);
    for bad in ["soon", "-1", "0", "NaN"] {
        assert_eq!(post(bad).await.unwrap().status(), 400, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_deadline_are_dropped_before_batching() {
    let runtime = Runtime::start_task("embedding", &support::minilm_dir(), &[]).await;
    let body = json!({"inputs": vec!["a sentence long enough to take the model some time"; 32]})
        .to_string();
    let mut statuses = std::collections::BTreeMap::new();
    for response in concurrent_embeds(&runtime, 16, &body, Some("0.3")).await {
        *statuses
            .entry(response.unwrap().status().as_u16())
            .or_insert(0) += 1;
    }
    assert!(
        statuses.keys().all(|s| [200, 504].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.get(&504).is_some_and(|&n| n > 0), "{statuses:?}");
    // The model thread notices a closed reply only when it next looks at the queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = runtime.metrics().await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("infergate_runtime_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "no queued request was dropped: {statuses:?}\n{metrics}"
    );
    eprintln!("{statuses:?}; dropped before batching: {dropped}");
}

#[test]
fn the_built_binary_finds_libtorch_without_the_environment() {
    // What a user does after `cargo build`: run it from a plain shell, no scripts/env.sh.
    let output = Command::new(env!("CARGO_BIN_EXE_infergate-runtime"))
        .arg("--help")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
