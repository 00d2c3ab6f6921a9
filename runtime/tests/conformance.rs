//! The TEI-shaped routes against TEI's own OpenAPI document (`../shared/specs`), with
//! schemathesis generating valid and invalid requests: no input may produce a 5xx. A short
//! deterministic slice for CI; raise `INFERGATE_SCHEMATHESIS_EXAMPLES` for a longer run.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{Runtime, fixture};

fn tei_spec() -> PathBuf {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/specs/tei-openapi.json");
    assert!(
        spec.is_file(),
        "TEI's OpenAPI document is expected at {}",
        spec.display()
    );
    spec
}

async fn no_server_errors(task: &str, fixture_name: &str, paths: &str) {
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
        let url = runtime.url.clone();
        let paths = paths.to_owned();
        move || {
            Command::new("schemathesis")
                .arg("run")
                .arg(tei_spec())
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
