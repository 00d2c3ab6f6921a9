//! The TEI-shaped routes against TEI's own OpenAPI document, and the text-generation routes
//! against TGI's (copies in `tests/openapi/`, see its NOTICE), with
//! schemathesis generating valid and invalid requests: no input may produce a 5xx, and the
//! text-generation answers (chat and text completions, whole and streamed, TGI's `/generate`)
//! must match TGI's response schemas. A short deterministic slice for CI; raise
//! `INFERGATE_SCHEMATHESIS_EXAMPLES` for a longer run.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::{Runtime, fixture};

fn spec(name: &str) -> PathBuf {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/openapi")
        .join(name);
    assert!(
        spec.is_file(),
        "the OpenAPI document is expected at {}",
        spec.display()
    );
    spec
}

/// The document as schemathesis reads it, in a temporary copy (the document itself stays
/// unchanged). TGI's writes `exclusiveMinimum` as a number (JSON Schema 2019 style) inside an
/// OpenAPI 3.0 document, where it is a boolean next to `minimum`; schemathesis cannot generate
/// cases from such schemas, so each is rewritten to the 3.0 form. With `checked_responses`,
/// also what [`for_response_checks`] says.
fn for_schemathesis(task: &str, document: &Path, checked_responses: bool) -> PathBuf {
    fn fix(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(bound) = map
                    .get("exclusiveMinimum")
                    .filter(|b| b.is_number())
                    .cloned()
                {
                    map.insert("minimum".to_owned(), bound);
                    map.insert("exclusiveMinimum".to_owned(), true.into());
                }
                map.values_mut().for_each(fix);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(fix),
            _ => {}
        }
    }
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(document).unwrap()).unwrap();
    fix(&mut spec);
    if checked_responses {
        for_response_checks(&mut spec);
    }
    let copy = std::env::temp_dir().join(format!(
        "infergate-{}-{task}-{}",
        std::process::id(),
        document.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&copy, spec.to_string()).unwrap();
    copy
}

/// infergate's error body, one shape on every route of every part (the proxy's too): OpenAI's.
fn error_body() -> Value {
    json!({"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "code": {"type": "string"},
        },
    }}})
}

/// What TGI's document needs for its response schemas to be checked as TGI means them.
fn for_response_checks(spec: &mut Value) {
    // Errors: TGI's are `{error, error_type}`; infergate's have one shape everywhere, OpenAI's,
    // and error answers are checked against that instead.
    spec["components"]["schemas"]["ErrorResponse"] = error_body();
    // A text completion's stream says `finish_reason: null` until its last chunk, as OpenAI's
    // does and OpenAI's clients read it; TGI's document has a string there.
    spec["components"]["schemas"]["CompletionComplete"]["properties"]["finish_reason"]["nullable"] =
        json!(true);
    // Streams: under text/event-stream TGI gives the schema of each event's data (one JSON
    // chunk). OpenAPI 3.0 cannot say so, and schemathesis reads that schema as the event's own
    // (its `data`, `event` and `id` fields); each becomes an event whose data is that JSON, the
    // final `[DONE]`, or an error. (`enum`, not `const`: OpenAPI 3.0 has no `const`.)
    let json_data = |schema: Value| json!({"type": "string", "contentMediaType": "application/json", "contentSchema": schema});
    for operation in spec["paths"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .flat_map(|item| item.as_object_mut().unwrap().values_mut())
    {
        let Some(responses) = operation["responses"].as_object_mut() else {
            continue;
        };
        for response in responses.values_mut() {
            let stream = &mut response["content"]["text/event-stream"]["schema"];
            if !stream.is_null() {
                let data = json!({"anyOf": [
                    {"type": "string", "enum": ["[DONE]"]},
                    json_data(stream.take()),
                    json_data(error_body()),
                ]});
                *stream =
                    json!({"type": "object", "required": ["data"], "properties": {"data": data}});
            }
        }
    }
    // Requests that are answered: TGI's own examples for the OpenAI routes are not bodies it
    // takes either (`messages` is a string, `n` is 2), and fuzzed bodies seldom make a valid
    // chat, so these make sure that chat and text completions, whole and streamed, are answered
    // and their answers checked.
    let messages = json!([
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Describe gravity to a 6-year-old."},
    ]);
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 8}),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["What is Deep Learning?"], "max_tokens": 8}),
        ),
    ] {
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"] = json!({
            "whole": {"value": body},
            "streamed": {"value": streamed},
        });
    }
}

/// schemathesis's checks: no 5xx on every route; with `checked_responses`, also answers that
/// match the document's response schemas, but for the routes where infergate's answer keeps
/// another shape on purpose.
fn checks(task: &str, checked_responses: bool) -> PathBuf {
    let mut config = String::from("[checks]\nenabled = false\nnot_a_server_error.enabled = true\n");
    if checked_responses {
        config.push_str("response_schema_conformance.enabled = true\n");
        // /v1/models keeps OpenAI's list shape ({"object": "list", "data": [...]}): clients need
        // it (OpenAI's, and the seed's, which read data[0].id); TGI documents one ModelInfo.
        config.push_str(
            "[[operations]]\ninclude-path = \"/v1/models\"\nchecks.response_schema_conformance.enabled = false\n",
        );
        // /info has one shape for every task (TEI's Info with the task), not TGI's Info.
        config.push_str(
            "[[operations]]\ninclude-path = \"/info\"\nchecks.response_schema_conformance.enabled = false\n",
        );
    }
    let path = std::env::temp_dir().join(format!(
        "infergate-{}-{task}-schemathesis.toml",
        std::process::id()
    ));
    std::fs::write(&path, config).unwrap();
    path
}

async fn run_schemathesis(task: &str, fixture_name: &str, paths: &str) {
    let text_generation = task == "text-generation";
    let document = if text_generation {
        "tgi-openapi.json"
    } else {
        "tei-openapi.json"
    };
    let (dir, _) = fixture(fixture_name);
    let runtime = Runtime::start_task(task, &dir, &[]).await;
    let examples =
        std::env::var("INFERGATE_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "60".to_owned());
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("schemathesis").is_file()));
    assert!(
        found,
        "schemathesis is not on PATH: run scripts/setup.sh, then `. scripts/env.sh`"
    );
    let output = tokio::task::spawn_blocking({
        let (task, document) = (task.to_owned(), document.to_owned());
        let url = runtime.url.clone();
        let paths = paths.to_owned();
        move || {
            Command::new("schemathesis")
                .arg("--config-file")
                .arg(checks(&task, text_generation))
                .arg("run")
                .arg(for_schemathesis(&task, &spec(&document), text_generation))
                .args(["--url", &url, "--include-path-regex", &paths])
                .args(["--max-examples", &examples, "--generation-deterministic"])
                .env("NO_COLOR", "1")
                // schemathesis keeps a cache of found crashes in its working directory; keep it
                // out of the source tree.
                .current_dir(std::env::temp_dir())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found server errors or answers that violate the schema for {task}:\n{report}"
    );
    let summary = report
        .lines()
        .find(|l| l.contains(" generated, "))
        .unwrap_or("no summary")
        .trim()
        .to_owned();
    eprintln!("{task}: {summary}");
    assert!(!summary.contains(" 0 generated"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_routes_never_answer_5xx() {
    run_schemathesis(
        "embedding",
        "bert-mean",
        "^/(embed|v1/embeddings|health|info)$",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_routes_never_answer_5xx() {
    run_schemathesis(
        "text-classification",
        "bert-classifier",
        "^/(predict|health|info)$",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_routes_never_answer_5xx() {
    run_schemathesis("rerank", "xlm-roberta-reranker", "^/(rerank|health|info)$").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_generation_routes_never_answer_5xx_and_answer_as_tgi_documents() {
    run_schemathesis(
        "text-generation",
        "llama",
        "^/(generate|generate_stream|v1/chat/completions|v1/completions|v1/models|tokenize|chat_tokenize|health|info)$",
    )
    .await;
}
