//! Local mode reads the files one would `kubectl apply` and refuses what a cluster would refuse,
//! one problem per fault, each with its file and field.

use std::path::{Path, PathBuf};

use kube::ResourceExt;
use operator::local::manifests::{self, Problem};

struct Dir(PathBuf);

impl Dir {
    fn new(files: &[(&str, &str)]) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "infergate-local-manifests-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(dir.join("model")).unwrap();
        for (name, text) in files {
            let text = text.replace("MODEL_DIR", &dir.join("model").display().to_string());
            std::fs::write(dir.join(name), text).unwrap();
        }
        Dir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

const MODEL: &str = "apiVersion: infergate.dev/v1alpha1
kind: ModelDeployment
metadata: {name: minilm}
spec:
  task: embedding
  model: {uri: file://MODEL_DIR}
";

fn problems(files: &[(&str, &str)]) -> Vec<Problem> {
    let dir = Dir::new(files);
    manifests::load(dir.path()).expect_err("the files are invalid")
}

/// The one problem of `yaml` (placed after a valid model in its own file), as `field: message`.
fn sole_problem(yaml: &str) -> (String, String) {
    let found = problems(&[("a-model.yaml", MODEL), ("b-bad.yaml", yaml)]);
    assert_eq!(found.len(), 1, "{found:#?}");
    let problem = &found[0];
    assert!(
        problem.file.ends_with("b-bad.yaml") && problem.document == 1,
        "{problem}"
    );
    (
        problem.field.clone().unwrap_or_default(),
        problem.message.clone(),
    )
}

#[test]
fn valid_files_load_with_the_metadata_a_cluster_would_fill_in() {
    let token = "apiVersion: infergate.dev/v1alpha1
kind: AccessToken
metadata: {name: app}
spec: {models: [minilm], ttl: 720h}
";
    let dir = Dir::new(&[("models.yaml", &format!("{MODEL}---\n{token}"))]);
    let loaded = manifests::load(dir.path()).unwrap();
    assert_eq!(loaded.models.len(), 1);
    assert_eq!(loaded.tokens.len(), 1);
    let model = &loaded.models[0];
    assert_eq!(model.namespace().as_deref(), Some("default"));
    assert_eq!(
        model.model_version_id().as_deref(),
        Some("minilm"),
        "without modelVersionId a local model is served under its name"
    );
}

#[test]
fn each_fault_is_one_problem_naming_its_field() {
    let model = |spec: &str| {
        format!(
            "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: other}}\nspec:\n{spec}"
        )
    };
    let cases = [
        (
            model("  task: embedding\n  model: {uri: file://MODEL_DIR}\n  modelVersonId: x\n"),
            "spec.modelVersonId",
            "misspelt",
        ),
        (
            model("  task: summarise\n  model: {uri: file://MODEL_DIR}\n"),
            "spec.task",
            "must be one of",
        ),
        (
            model("  task: embedding\n  model: {uri: file://MODEL_DIR}\n  replicas: -1\n"),
            "spec.replicas",
            "at least 0",
        ),
        (
            model("  task: embedding\n  model: {uri: file:///no/such/dir}\n"),
            "spec.model.uri",
            "not a directory",
        ),
        (
            model("  task: embedding\n  model: {uri: 'pvc://models/minilm'}\n"),
            "spec.model.uri",
            "exists in a cluster only",
        ),
        (
            model(
                "  task: embedding\n  model: {uri: file://MODEL_DIR}\n  modelVersionId: minilm\n",
            ),
            "spec.modelVersionId",
            "already another model's id",
        ),
        (
            model(
                "  task: embedding\n  model: {uri: file://MODEL_DIR}\n  timeouts: {default: 60s, max: 30s}\n",
            ),
            "spec",
            "must not exceed",
        ),
        (
            "apiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {name: t}\nspec: {models: [minilm], ttl: 1h, expiresAt: '2030-01-01T00:00:00Z'}\n".to_owned(),
            "spec",
            "ttl",
        ),
        (
            "apiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {name: t}\nspec: {models: [minilm, llama]}\n".to_owned(),
            "spec.models[1]",
            "no ModelDeployment named llama",
        ),
        (
            "apiVersion: infergate.dev/v1\nkind: ModelDeployment\nmetadata: {name: x}\n".to_owned(),
            "apiVersion",
            "infergate.dev/v1alpha1",
        ),
        (
            "apiVersion: infergate.dev/v1alpha1\nkind: Deployment\nmetadata: {name: x}\n"
                .to_owned(),
            "kind",
            "expected ModelDeployment or AccessToken",
        ),
        (
            "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nspec: [unclosed\n"
                .to_owned(),
            "",
            "invalid YAML",
        ),
    ];
    for (yaml, field, message) in cases {
        let (found_field, found_message) = sole_problem(&yaml);
        assert_eq!(found_field, field, "{yaml}");
        assert!(
            found_message.contains(message),
            "{yaml}\n→ {found_message:?} does not say {message:?}"
        );
    }
}

#[test]
fn every_problem_of_every_file_is_reported_at_once() {
    let found = problems(&[
        (
            "one.yaml",
            "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: a}\nspec: {task: nope, model: {uri: file:///x}, replicas: -1}\n",
        ),
        (
            "two.yml",
            "apiVersion: infergate.dev/v1alpha1\nkind: Gadget\nmetadata: {name: b}\n",
        ),
        ("ignored.txt", "not yaml at all: ["),
    ]);
    let located: Vec<String> = found
        .iter()
        .map(|p| {
            format!(
                "{}:{}",
                p.file.file_name().unwrap().to_string_lossy(),
                p.field.clone().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        located,
        [
            "one.yaml:spec.replicas",
            "one.yaml:spec.task",
            "two.yml:kind"
        ]
    );
    let shown = found[0].to_string();
    assert!(
        shown.contains("one.yaml (document 1): spec.replicas: must be at least 0"),
        "{shown}"
    );
}

#[test]
fn a_directory_without_resources_is_a_problem_not_an_empty_deployment() {
    let found = problems(&[("empty.yaml", "# nothing here\n")]);
    assert_eq!(found.len(), 1);
    assert!(
        found[0]
            .message
            .contains("no ModelDeployment or AccessToken")
    );
}
