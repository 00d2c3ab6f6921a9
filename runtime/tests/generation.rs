//! `text-generation` over HTTP, on the tiny trained Llama fixture: the OpenAI and TGI routes,
//! streaming, stop rules, sampling, chat templates, deadlines, disconnects and admission.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Runtime, fixture, ids};

async fn llama(extra: &[&str]) -> (Runtime, Value) {
    let (dir, reference) = fixture("llama");
    (
        Runtime::start_task("text-generation", &dir, extra).await,
        reference,
    )
}

/// Token ids TGI's `/generate` reports with `details`.
fn generated_ids(body: &Value) -> Vec<i64> {
    body["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect()
}

/// The `data:` payloads (and `event:` names) of an SSE body, read as it arrives.
async fn sse(response: reqwest::Response) -> Vec<(Option<String>, String)> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut response = response;
    while let Some(chunk) = response.chunk().await.unwrap() {
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = Some(value.trim().to_owned());
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if !data.is_empty() {
                events.push((name, data));
            }
        }
    }
    events
}

async fn post(runtime: &Runtime, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", runtime.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// `Runtime::post` with an owned body, for requests sent side by side.
async fn post_json(runtime: &Runtime, path: &str, body: Value) -> (u16, Value) {
    runtime.post(path, &body.to_string()).await
}

async fn metric(runtime: &Runtime, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", runtime.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn greedy_tokens_over_http_match_transformers_alone_and_concurrently() {
    let (runtime, reference) = llama(&[]).await;
    let prompts: Vec<String> = serde_json::from_value(reference["prompts"].clone()).unwrap();
    let expected: Vec<Vec<i64>> = reference["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let request = |prompt: &str| json!({"inputs": prompt, "parameters": {"max_new_tokens": 64, "do_sample": false, "details": true, "ignore_eos": true}});
    for (prompt, expected) in prompts.iter().zip(&expected) {
        let (status, body) = runtime
            .post("/generate", &request(prompt).to_string())
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(&generated_ids(&body), expected, "{prompt:?} alone");
    }
    // All at once: the sequences share decode steps, and none may change another's tokens.
    let together = futures::future::join_all(
        prompts
            .iter()
            .map(|p| post_json(&runtime, "/generate", request(p))),
    )
    .await;
    for ((status, body), expected) in together.iter().zip(&expected) {
        assert_eq!(*status, 200);
        assert_eq!(&generated_ids(body), expected, "in a batch");
    }
    assert!(metric(&runtime, "infergate_runtime_generated_tokens_total").await >= 6.0 * 64.0);
}

#[tokio::test]
async fn chat_renders_the_models_template_like_transformers() {
    let (runtime, reference) = llama(&[]).await;
    let (status, body) = runtime
        .post(
            "/chat_tokenize",
            &json!({"messages": reference["conversation"]}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["templated_text"], reference["rendered_chat"]);
    let tokens = body["tokenize_response"].as_array().unwrap();
    assert_eq!(tokens[0]["text"], "<|bos|>", "the template writes BOS once");
    assert_ne!(tokens[1]["text"], "<|bos|>");

    let (status, body) = runtime
        .post(
            "/v1/chat/completions",
            &json!({"messages": reference["conversation"], "max_tokens": 6, "temperature": 0})
                .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["prompt_tokens"], tokens.len());
    assert_eq!(body["usage"]["completion_tokens"], 6);
}

#[tokio::test]
async fn a_streamed_chat_says_the_same_as_the_whole_answer_and_ends_with_done() {
    let (runtime, reference) = llama(&[]).await;
    let request =
        json!({"messages": reference["conversation"], "max_tokens": 24, "temperature": 0});
    let (_, whole) = runtime
        .post("/v1/chat/completions", &request.to_string())
        .await;

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let response = post(&runtime, "/v1/chat/completions", streaming).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    let events = sse(response).await;
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, data)| serde_json::from_str(data).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"]);
    let finishing = &chunks[chunks.len() - 2];
    assert_eq!(finishing["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    // One system_fingerprint for the loaded model, on the whole answer and every chunk (TGI's
    // OpenAPI document requires it).
    let fingerprint = whole["system_fingerprint"].as_str().unwrap();
    assert!(
        fingerprint.starts_with(concat!(env!("CARGO_PKG_VERSION"), "-float32-")),
        "{fingerprint}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["system_fingerprint"] == fingerprint)
    );
    // Every delta names the role, and the last (the finish reason's) has empty content.
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["choices"][0]["delta"]["role"] == "assistant")
    );
    assert_eq!(finishing["choices"][0]["delta"]["content"], "");
}

#[tokio::test]
async fn usage_goes_back_in_a_header_or_after_the_last_event_of_a_stream() {
    let (runtime, reference) = llama(&[]).await;
    let request = json!({"messages": reference["conversation"], "max_tokens": 5, "temperature": 0});
    let response = post(&runtime, "/v1/chat/completions", request.clone()).await;
    let reported = response.headers()["infergate-usage"]
        .to_str()
        .unwrap()
        .to_owned();
    let whole: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    let prompt = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        reported,
        format!("prompt_tokens={prompt}, completion_tokens=5")
    );

    // A stream's total is known at its end: a comment after `[DONE]`, which SSE clients skip.
    let mut streaming = request;
    streaming["stream"] = json!(true);
    let response = post(&runtime, "/v1/chat/completions", streaming).await;
    assert!(response.headers().get("infergate-usage").is_none());
    let body = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    assert!(
        body.ends_with(&format!(
            "data: [DONE]\n\n: infergate-usage prompt_tokens={prompt}, completion_tokens=5\n\n"
        )),
        "{body}"
    );

    // Nothing used, nothing reported.
    let refused = post(&runtime, "/v1/chat/completions", json!({"messages": []})).await;
    assert_eq!(refused.status(), 400);
    assert!(refused.headers().get("infergate-usage").is_none());
}

#[tokio::test]
async fn the_chat_route_takes_the_seeds_tgi_style_body() {
    let (runtime, reference) = llama(&[]).await;
    let greedy_text = reference["greedy_text"][0].as_str().unwrap();
    for body in [
        json!({"inputs": "The capital of", "max_new_tokens": 10, "do_sample": false}),
        json!({"inputs": "The capital of", "parameters": {"max_new_tokens": 10, "do_sample": false}}),
    ] {
        let (status, answer) = runtime
            .post("/v1/chat/completions", &body.to_string())
            .await;
        assert_eq!(status, 200, "{answer}");
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            greedy_text.starts_with(content),
            "{content:?} vs {greedy_text:?}"
        );
        assert_eq!(answer["usage"]["completion_tokens"], 10);
    }
    let mut streaming = json!({"inputs": "The capital of", "max_new_tokens": 10, "do_sample": false, "stream": true});
    let events = sse(post(&runtime, "/v1/chat/completions", streaming.take()).await).await;
    assert_eq!(events.last().unwrap().1, "[DONE]");
}

#[tokio::test]
async fn a_stop_string_ends_the_text_right_before_it() {
    let (runtime, _) = llama(&[]).await;
    // Greedy: " France is Paris, and the capital of Italy is Rome. ..."
    let body = json!({"prompt": "The capital of", "max_tokens": 40, "temperature": 0, "stop": [" Paris", "zzz"]});
    let (status, answer) = runtime.post("/v1/completions", &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["text"], " France is");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let events = sse(post(&runtime, "/v1/completions", streaming).await).await;
    let chunks: Vec<Value> = events
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        text, " France is",
        "no part of the stop string is ever streamed"
    );
    // Text completions carry the model's system_fingerprint too, whole and streamed.
    let fingerprint = &answer["system_fingerprint"];
    assert!(fingerprint.is_string(), "{answer}");
    assert!(
        chunks
            .iter()
            .all(|c| &c["system_fingerprint"] == fingerprint)
    );
}

#[tokio::test]
async fn a_burst_as_large_as_the_running_sequences_is_never_refused() {
    // Eight slots, eight sequences at once on an idle model: each has a slot of its own, so
    // none waits, however slow this machine's steps.
    let (runtime, _) = llama(&["--max-running-sequences", "8"]).await;
    let body = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 48, "ignore_eos": true}});
    let (status, _) = post_json(&runtime, "/generate", body.clone()).await;
    assert_eq!(status, 200, "alone, and the decode step is measured");
    for burst in [2, 3, 8] {
        let statuses: Vec<u16> = futures::future::join_all(
            (0..burst).map(|_| post_json(&runtime, "/generate", body.clone())),
        )
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
        assert_eq!(statuses, vec![200; burst], "a burst of {burst}");
    }
}

#[tokio::test]
async fn a_sequence_that_would_wait_for_a_slot_past_the_maximum_queue_time_is_refused_at_once() {
    // One slot; each sequence holds it for 400 decode steps, far more than 50 ms on any
    // machine. The first of a burst takes the free slot; the others would wait past
    // --max-queue-time for it.
    let (runtime, _) = llama(&[
        "--max-running-sequences",
        "1",
        "--max-queue-time",
        "0.05",
        "--wait-floor",
        "0.01",
    ])
    .await;
    let body = json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 400, "ignore_eos": true}});
    let (status, _) = post_json(&runtime, "/generate", body.clone()).await;
    assert_eq!(status, 200, "alone, and the decode step is measured");
    let burst =
        futures::future::join_all((0..4).map(|_| post_json(&runtime, "/generate", body.clone())))
            .await;
    let statuses: Vec<u16> = burst.iter().map(|(status, _)| *status).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        1,
        "{statuses:?}"
    );
    for (status, body) in &burst {
        if *status == 429 {
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("more than the maximum queue time of 0.05 s"),
                "{message}"
            );
        }
    }
}

#[tokio::test]
async fn a_seed_makes_sampling_reproducible() {
    let (runtime, _) = llama(&[]).await;
    let sample = |seed: u64| json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.5, "top_p": 1.0, "seed": seed});
    let first = post_json(&runtime, "/v1/completions", sample(7)).await.1;
    let again = post_json(&runtime, "/v1/completions", sample(7)).await.1;
    assert_eq!(first["choices"][0]["text"], again["choices"][0]["text"]);
    let texts: std::collections::HashSet<String> = futures::future::join_all(
        (0..6).map(|s| post_json(&runtime, "/v1/completions", sample(100 + s))),
    )
    .await
    .into_iter()
    .map(|(_, b)| b["choices"][0]["text"].as_str().unwrap().to_owned())
    .collect();
    assert!(texts.len() > 1, "different seeds all gave {texts:?}");
}

#[tokio::test]
async fn bad_requests_name_the_field_and_hostile_templates_run_out_of_budget() {
    let (runtime, _) = llama(&[]).await;
    let cases = [
        (json!({"model": "x"}), 400, "messages"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}),
            400,
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
            400,
            "n:",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
            400,
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
            400,
            "top_p",
        ),
        (
            json!({"messages": [{"role": 3, "content": "hi"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "hi"}]}),
            400,
            "roles must be system, user or assistant",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "chat_template": "{% for %}"}),
            400,
            "does not compile",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, answer) = runtime
            .post("/v1/chat/completions", &body.to_string())
            .await;
        assert_eq!(got, status, "{body} → {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body} → {message}");
    }
    let hostile = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}";
    let started = Instant::now();
    let (status, answer) = runtime
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "chat_template": hostile})
                .to_string(),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"]["code"], "invalid_chat_template");
    // Fuel or the CPU budget, whichever this machine reaches first.
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("out of fuel") || message.contains("of CPU"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The server still answers.
    let (status, _) = runtime
        .post(
            "/v1/completions",
            &json!({"prompt": "Tokens are", "max_tokens": 2}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
}

/// Long greedy generation that only a deadline or a disconnect ends.
fn endless() -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "ignore_eos": true, "stream": true})
}

/// Generated tokens stop growing within 200 ms (at most one step after the end), and stay put.
async fn assert_generation_stopped(runtime: &Runtime) -> f64 {
    // One step may be in flight when the sequence is dropped; after that, nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let settled = metric(runtime, "infergate_runtime_generated_tokens_total").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(runtime, "infergate_runtime_generated_tokens_total").await,
        settled,
        "tokens were generated for a sequence nobody waits for"
    );
    assert_eq!(
        metric(runtime, "infergate_runtime_num_requests_running").await,
        0.0
    );
    settled
}

#[tokio::test]
async fn a_deadline_ends_the_stream_with_an_error_event_and_stops_the_sequence() {
    let (runtime, _) = llama(&[]).await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", runtime.url))
        .header("OICM-Request-Timeout", "0.5")
        .header("content-type", "application/json")
        .body(endless().to_string())
        .send()
        .await
        .unwrap();
    let events = sse(response).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let (name, data) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["error"]["code"], "timeout");
    let streamed = events.len() - 1;
    assert!(streamed > 5, "only {streamed} chunks before the deadline");
    let generated = assert_generation_stopped(&runtime).await;
    assert!(generated < 4000.0);
    assert_eq!(
        metric(&runtime, "infergate_runtime_abandoned_total").await,
        1.0
    );
}

#[tokio::test]
async fn a_client_that_disconnects_stops_its_sequence() {
    let (runtime, _) = llama(&[]).await;
    let mut response = post(&runtime, "/v1/completions", endless()).await;
    for _ in 0..5 {
        response.chunk().await.unwrap().unwrap();
    }
    drop(response);
    let generated = assert_generation_stopped(&runtime).await;
    assert!(generated < 4000.0, "{generated}");
    assert_eq!(
        metric(&runtime, "infergate_runtime_abandoned_total").await,
        1.0
    );
}

#[tokio::test]
async fn beyond_its_admission_limit_the_server_answers_429() {
    let (runtime, _) = llama(&["--max-concurrent-requests", "1"]).await;
    let long = post(&runtime, "/v1/completions", endless()).await;
    assert_eq!(long.status(), 200);
    let refused = post(
        &runtime,
        "/v1/completions",
        json!({"prompt": "Tokens are", "max_tokens": 2}),
    )
    .await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    drop(long);
}

#[tokio::test]
async fn sequences_wait_for_a_free_slot_and_all_finish() {
    // Two slots, six requests: four wait, then join between decode steps as others finish.
    // Each waits milliseconds, well under the maximum queue time: none is refused.
    let (runtime, reference) = llama(&["--max-running-sequences", "2"]).await;
    let expected: Vec<Vec<i64>> = reference["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let prompts: Vec<String> = serde_json::from_value(reference["prompts"].clone()).unwrap();
    let requests = (0..6).map(|i| {
        let body = json!({"inputs": prompts[i % 3], "parameters": {"max_new_tokens": 64, "do_sample": false, "details": true, "ignore_eos": true}});
        post_json(&runtime, "/generate", body)
    });
    for (i, (status, body)) in futures::future::join_all(requests)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(status, 200);
        assert_eq!(generated_ids(&body), expected[i % 3]);
    }
}

#[tokio::test]
async fn the_openai_python_client_chats_and_streams() {
    let (runtime, reference) = llama(&[]).await;
    let script = format!(
        r#"
import json, openai
client = openai.OpenAI(base_url="{url}/v1", api_key="unused")
messages = json.loads('{messages}')
whole = client.chat.completions.create(model="llama", messages=messages, max_tokens=12, temperature=0)
parts = []
for chunk in client.chat.completions.create(model="llama", messages=messages, max_tokens=12, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
completion = client.completions.create(model="llama", prompt="The capital of", max_tokens=5, temperature=0)
print(json.dumps({{"whole": whole.choices[0].message.content, "streamed": "".join(parts),
                  "finish": whole.choices[0].finish_reason, "completion": completion.choices[0].text,
                  "models": [m.id for m in client.models.list()]}}))
"#,
        url = runtime.url,
        messages = reference["conversation"]
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python")
            .args(["-c", &script])
            .output()
            .expect("python from the set-up virtualenv")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["whole"], result["streamed"]);
    assert_eq!(result["finish"], "length");
    assert_eq!(result["completion"], " France is Paris, and");
    assert_eq!(result["models"], json!(["llama"]));
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn memory_bomb_templates_are_refused_without_harming_the_runtime() {
    let (runtime, _) = llama(&[]).await;
    let chat = |template: &str| {
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": template})
            .to_string()
    };
    // Warm up: the first chat loads what a chat needs, so RSS is measured from there.
    assert_eq!(
        runtime
            .post("/v1/chat/completions", &chat("{{ messages[0].content }}"))
            .await
            .0,
        200
    );
    let before = rss_kib(runtime.child.id());
    // Each bomb, and the limit that stops it. minijinja's fuel also charges for the size of
    // string results, which stops the doublings; the output cap stops a huge prompt as it is
    // written; a huge value built in one step (100 GB by `join`, `tojson`) is stopped by the
    // sandbox's memory limit, where in-process its allocation failure would abort the runtime,
    // unless the CPU the growth costs (page faults, copies) reaches the render's budget first;
    // a step that grinds without fuel is stopped by the CPU budget.
    let huge = "{% set l = ['x' * 1000000] * 100000 %}";
    let bombs = [
        (
            "{% set ns = namespace(s='0123456789abcdef') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}".to_owned(),
            "out of fuel",
        ),
        (
            "{% macro d(s, n) %}{% if n == 0 %}{{ s|length }}{% else %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ d('ab', 40) }}".to_owned(),
            "out of fuel",
        ),
        ("{{ 'a\nb'|indent(3000000000) }}".to_owned(), "out of fuel"),
        (
            "{{ ['x' * 1000000] * 1000 }}".to_owned(),
            "rendered more than",
        ),
        (format!("{huge}{{{{ l|join|length }}}}"), "memory of its sandbox"),
        (format!("{huge}{{{{ l|tojson|length }}}}"), "memory of its sandbox"),
        (
            format!("{huge}{{{{ (l|sum(start=''))|length }}}}"),
            "of CPU",
        ),
    ];
    let cpu_metric = "infergate_runtime_chat_template_cpu_seconds";
    for (bomb, limit) in &bombs {
        let cpu_before = metric(&runtime, &format!("{cpu_metric}_sum")).await;
        let started = Instant::now();
        let (status, answer) = runtime.post("/v1/chat/completions", &chat(bomb)).await;
        let took = started.elapsed();
        assert_eq!(status, 400, "{bomb} → {answer}");
        assert_eq!(answer["error"]["code"], "invalid_chat_template", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        // On a slower or busier machine the CPU budget may stop any bomb first.
        assert!(
            message.contains(limit) || message.contains("of CPU"),
            "{bomb} → {message}"
        );
        let cpu = metric(&runtime, &format!("{cpu_metric}_sum")).await - cpu_before;
        eprintln!("{:.1} ms of CPU, {took:?}: {message}", cpu * 1e3);
        // The budget (30 ms) plus the watch's overshoot: a few ms, more under load.
        assert!(cpu <= 0.050, "{bomb} took {:.1} ms of CPU", cpu * 1e3);
        assert!(took < Duration::from_secs(3), "{bomb} took {took:?}");
    }
    let grown = rss_kib(runtime.child.id()).saturating_sub(before);
    assert!(grown < 64 * 1024, "the runtime grew by {grown} KiB");
    // The runtime and a fresh helper still serve chats with a request template.
    let (status, answer) = runtime
        .post("/v1/chat/completions", &chat("{{ messages[0].content }}"))
        .await;
    assert_eq!(status, 200, "{answer}");
}

/// The JSON of each `data:` event of a stream, and whether it ended with `[DONE]`.
async fn sse_chunks(runtime: &Runtime, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let events = sse(post(runtime, path, body.clone()).await).await;
    let done = events.last().is_some_and(|(_, data)| data == "[DONE]");
    let chunks = events
        .iter()
        .filter(|(_, data)| data != "[DONE]")
        .map(|(_, data)| serde_json::from_str(data).unwrap())
        .collect();
    (chunks, done)
}

#[tokio::test]
async fn a_tgi_style_chat_stream_speaks_both_openai_and_tgi() {
    let (runtime, _) = llama(&[]).await;
    // The seed's flat body, and the nested one huggingface_hub sends.
    for body in [
        json!({"inputs": "Once upon", "max_new_tokens": 6, "do_sample": false, "stream": true}),
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 6, "do_sample": false}, "stream": true}),
    ] {
        let (chunks, done) = sse_chunks(&runtime, "/v1/chat/completions", &body).await;
        assert!(done, "ends with [DONE]: {chunks:?}");
        let id = &chunks[0]["id"];
        assert!(chunks.iter().all(|c| &c["id"] == id), "one id");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let content: Vec<&Value> = chunks
            .iter()
            .filter(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
            .collect();
        assert!(!content.is_empty());
        for chunk in &content {
            assert_eq!(
                chunk["token"]["text"], chunk["choices"][0]["delta"]["content"],
                "TGI's token beside OpenAI's delta: {chunk}"
            );
            assert!(chunk["token"]["id"].is_i64(), "{chunk}");
        }
        let last = chunks.last().unwrap();
        let text: String = content
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(last["generated_text"], json!(text));
        assert_eq!(last["details"]["finish_reason"], "length");
        assert_eq!(last["details"]["generated_tokens"], 6);
        assert_eq!(last["choices"][0]["finish_reason"], "length");
    }
    // An OpenAI body gets OpenAI's chunks only.
    let (chunks, _) = sse_chunks(
        &runtime,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true}),
    )
    .await;
    assert!(chunks.iter().all(|c| c.get("token").is_none()));
}
