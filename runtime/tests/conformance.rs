//! The TEI-shaped routes against TEI's own OpenAPI document, and the text-generation routes
//! against TGI's (copies in `tests/openapi/`, see its NOTICE), with
//! schemathesis generating valid and invalid requests: no input may produce a 5xx. A short
//! deterministic slice for CI; raise `INFERGATE_SCHEMATHESIS_EXAMPLES` for a longer run.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// TGI's document writes `exclusiveMinimum` as a number (JSON Schema 2019 style) inside an
/// OpenAPI 3.0 document, where it is a boolean next to `minimum`; schemathesis cannot generate
/// cases from such schemas. Rewrites each to the 3.0 form in a temporary copy (the document
/// itself stays unchanged).
fn as_openapi_30(document: &Path) -> PathBuf {
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
    let copy = std::env::temp_dir().join(format!(
        "infergate-{}-{}",
        std::process::id(),
        document.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&copy, spec.to_string()).unwrap();
    copy
}

async fn no_server_errors(task: &str, fixture_name: &str, paths: &str) {
    let document = if task == "text-generation" {
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
        let document = document.to_owned();
        let url = runtime.url.clone();
        let paths = paths.to_owned();
        move || {
            Command::new("schemathesis")
                .arg("run")
                .arg(as_openapi_30(&spec(&document)))
                .args(["--url", &url, "--include-path-regex", &paths])
                .args([
                    "--checks",
                    "not_a_server_error",
                    "--max-examples",
                    &examples,
                    "--generation-deterministic",
                ])
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
        "schemathesis found server errors for {task}:\n{report}"
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
    no_server_errors(
        "embedding",
        "bert-mean",
        "^/(embed|v1/embeddings|health|info)$",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classification_routes_never_answer_5xx() {
    no_server_errors(
        "text-classification",
        "bert-classifier",
        "^/(predict|health|info)$",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerank_routes_never_answer_5xx() {
    no_server_errors("rerank", "xlm-roberta-reranker", "^/(rerank|health|info)$").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_generation_routes_never_answer_5xx() {
    no_server_errors(
        "text-generation",
        "llama",
        "^/(generate|generate_stream|v1/chat/completions|v1/completions|tokenize|chat_tokenize|health|info)$",
    )
    .await;
}
