//! infergate's CRDs on a real API server (the test bed of `e2e/cluster/`): every valid fixture
//! of `crds/tests/fixtures` is accepted at apply time and every invalid one refused by the
//! server, with the message of the rule it breaks.

use std::path::{Path, PathBuf};
use std::process::Output;

fn kubectl(args: &[&str]) -> Output {
    e2e::test_bed().kubectl(args, None)
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/tests/fixtures")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn ensure_namespace() {
    let created = kubectl(&["create", "namespace", "demo"]);
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(
        created.status.success() || stderr.contains("AlreadyExists"),
        "{stderr}"
    );
}

/// Server-side dry run: the API server runs the schema and CEL rules, nothing is stored.
fn apply(path: &Path) -> Output {
    kubectl(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()])
}

#[test]
fn the_api_server_accepts_every_valid_fixture() {
    ensure_namespace();
    for path in fixtures("valid") {
        let output = apply(&path);
        assert!(
            output.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_api_server_refuses_every_invalid_fixture_for_its_reason() {
    ensure_namespace();
    for path in fixtures("invalid") {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .expect("an `# expect:` line");
        let output = apply(&path);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{} was accepted", path.display());
        assert!(
            stderr.contains(expect),
            "{}: expected {expect:?} in {stderr}",
            path.display()
        );
    }
}

#[test]
fn model_version_id_cannot_change_once_set() {
    ensure_namespace();
    let manifest = |id: &str| {
        format!(
            "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: immutable-id, namespace: demo}}\n\
             spec: {{task: embedding, model: {{uri: 'file:///models/minilm'}}, modelVersionId: {id}}}\n"
        )
    };
    let dir = std::env::temp_dir().join(format!("infergate-crd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (first, second) = (dir.join("first.yaml"), dir.join("second.yaml"));
    std::fs::write(&first, manifest("minilm-v1")).unwrap();
    std::fs::write(&second, manifest("minilm-v2")).unwrap();
    let created = kubectl(&["apply", "-f", first.to_str().unwrap()]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let changed = kubectl(&["apply", "-f", second.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(
        !changed.status.success() && stderr.contains("modelVersionId is immutable"),
        "{stderr}"
    );
    kubectl(&["delete", "-f", first.to_str().unwrap(), "--wait=false"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn kubectl_get_shows_the_printer_columns_under_the_short_names() {
    ensure_namespace();
    let output = kubectl(&["get", "md,at", "--namespace", "demo"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = fixtures("valid")
        .into_iter()
        .find(|p| p.ends_with("token-ttl.yaml"))
        .unwrap();
    let created = kubectl(&["apply", "-f", path.to_str().unwrap()]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let listed = kubectl(&["get", "at", "chat-app", "--namespace", "demo"]);
    let header = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    for column in ["NAME", "PHASE", "MODELS", "EXPIRES", "AGE"] {
        assert!(header.contains(column), "{column} missing from {header:?}");
    }
    kubectl(&["delete", "-f", path.to_str().unwrap(), "--wait=false"]);
}

#[test]
fn the_kubernetes_and_local_examples_are_accepted_by_the_api_server() {
    ensure_namespace();
    // Local mode serves the same files one would `kubectl apply`: both sets must pass.
    for (dir, resources) in [("k8s", 3), ("local", 7)] {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(dir);
        let applied = kubectl(&[
            "apply",
            "--dry-run=server",
            "--namespace",
            "demo",
            "-f",
            examples.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&applied.stdout);
        assert!(
            applied.status.success(),
            "examples/{dir}: {stdout}{}",
            String::from_utf8_lossy(&applied.stderr)
        );
        assert_eq!(
            stdout.matches("(server dry run)").count(),
            resources,
            "examples/{dir}: {stdout}"
        );
    }
}
