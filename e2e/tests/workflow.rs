//! `.github/workflows/ci.yaml` cannot run here; its structure is checked instead: it runs the
//! README's test command and the kind job, on the events and versions the project uses, and
//! every script it names exists.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn workflow() -> Value {
    let text = std::fs::read_to_string(repo().join(".github/workflows/ci.yaml")).unwrap();
    serde_yaml::from_str(&text).expect("the workflow is YAML")
}

fn steps<'a>(workflow: &'a Value, job: &str) -> &'a Vec<Value> {
    workflow["jobs"][job]["steps"]
        .as_sequence()
        .unwrap_or_else(|| panic!("job {job} has no steps"))
}

fn runs(workflow: &Value, job: &str) -> Vec<String> {
    steps(workflow, job)
        .iter()
        .filter_map(|s| s["run"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_test_job_runs_the_readme_test_command_through_the_ci_entry_point() {
    let workflow = workflow();
    assert!(runs(&workflow, "test").contains(&"bash .ci/run".to_owned()));
    let entry = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(entry.contains("bash scripts/test.sh"));
    assert!(
        readme.contains("scripts/test.sh"),
        "the README names the test command"
    );
    assert_eq!(
        workflow["jobs"]["test"]["container"].as_str(),
        Some("rust:1.95-bookworm"),
        "Debian 12 with the project's Rust"
    );
}

#[test]
fn the_kind_job_follows_the_tests_and_runs_the_kind_script() {
    let workflow = workflow();
    assert_eq!(workflow["jobs"]["kind"]["needs"].as_str(), Some("test"));
    let kind = runs(&workflow, "kind");
    assert!(kind.contains(&"bash e2e/kind.sh".to_owned()), "{kind:?}");
    assert!(
        kind.contains(&"bash scripts/setup.sh".to_owned()),
        "{kind:?}"
    );
    let uses: Vec<&str> = steps(&workflow, "kind")
        .iter()
        .filter_map(|s| s["uses"].as_str())
        .collect();
    assert!(uses.iter().any(|u| u.starts_with("helm/kind-action@")));
}

#[test]
fn it_runs_on_pushes_to_main_and_on_pull_requests() {
    let workflow = workflow();
    // YAML 1.1 reads a bare `on` key as the boolean true.
    let on = workflow
        .get("on")
        .or_else(|| workflow.get(Value::Bool(true)))
        .expect("triggers");
    assert_eq!(on["push"]["branches"][0].as_str(), Some("main"));
    assert!(on.get("pull_request").is_some());
}

#[test]
fn every_action_is_pinned_and_every_script_it_runs_exists() {
    let workflow = workflow();
    for (job, _) in workflow["jobs"].as_mapping().unwrap() {
        let job = job.as_str().unwrap();
        assert!(
            workflow["jobs"][job]["timeout-minutes"].as_u64() <= Some(90),
            "{job} is bounded by CI's limit"
        );
        for step in steps(&workflow, job) {
            if let Some(action) = step["uses"].as_str() {
                let (_, version) = action.split_once('@').expect("a version");
                assert!(!version.is_empty() && version != "main", "{action}");
            }
            for word in step["run"].as_str().unwrap_or_default().split_whitespace() {
                if word.ends_with(".sh") || word.starts_with(".ci/") {
                    assert!(
                        repo().join(word).is_file(),
                        "{job} runs {word}, which is missing"
                    );
                }
            }
        }
    }
}
