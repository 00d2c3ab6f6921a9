//! The CRD manifests as a cluster sees them: the committed YAML is what the types generate, it
//! passes `kubernetes-validate --strict`, and its rules accept every valid fixture and refuse
//! every invalid one for the documented reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use crds::{AccessToken, ModelDeployment};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// The `# key: value` header lines of an invalid fixture.
fn header(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let prefix = format!("# {key}: ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{} lacks a `{prefix}` line", path.display()))
        .to_owned()
}

/// Evaluates the CEL rules of the fixture's kind, as the API server would on create.
fn cel_errors(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).unwrap();
    let kind: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    match kind["kind"].as_str() {
        Some("ModelDeployment") => serde_yaml::from_str::<ModelDeployment>(&text)
            .unwrap()
            .validate_cel(),
        Some("AccessToken") => serde_yaml::from_str::<AccessToken>(&text)
            .unwrap()
            .validate_cel(),
        other => panic!("unexpected kind {other:?} in {}", path.display()),
    }
    .map_err(|e| e.to_string())
}

/// Runs a tool from the set-up virtualenv, failing with the fix when it is missing.
fn venv_tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()));
    assert!(
        found,
        "`{name}` is not on PATH: run scripts/setup.sh, then `. scripts/env.sh`"
    );
    Command::new(name)
}

#[test]
fn committed_manifests_match_the_types() {
    for (name, yaml) in crds::manifests::rendered() {
        for dir in crds::manifests::OUTPUT_DIRS {
            let path = workspace().join(dir).join(&name);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{} is stale: run `cargo run -p crds --bin crdgen`",
                path.display()
            );
        }
    }
}

#[test]
fn manifests_pass_kubernetes_validate_strict_on_the_oldest_and_newest_supported_versions() {
    let manifests: Vec<PathBuf> = crds::manifests::rendered()
        .into_iter()
        .map(|(name, _)| workspace().join("crds/manifests").join(name))
        .collect();
    for version in ["1.33.0", "1.37.0"] {
        let output = venv_tool("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", version])
            .args(&manifests)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "kubernetes-validate {version}:\n{report}"
        );
        assert_eq!(
            report.matches(" passed for resource ").count(),
            manifests.len(),
            "{report}"
        );
    }
}

#[test]
fn kubectl_get_shows_the_columns_a_person_needs_under_short_names() {
    let crds: Vec<CustomResourceDefinition> = crds::manifests::definitions();
    let columns = |crd: &CustomResourceDefinition| -> Vec<(String, String)> {
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
        version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.clone(), c.json_path.clone()))
            .collect()
    };
    let pairs = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };

    let md = crds
        .iter()
        .find(|c| c.spec.names.kind == "ModelDeployment")
        .unwrap();
    assert_eq!(
        md.spec.names.short_names.as_deref(),
        Some(&["md".to_owned()][..])
    );
    assert_eq!(
        columns(md),
        pairs(&[
            ("Task", ".spec.task"),
            ("Ready", ".status.readyReplicas"),
            ("Current", ".status.replicas"),
            ("Desired", ".spec.replicas"),
            ("Endpoint", ".status.endpoint"),
            ("Age", ".metadata.creationTimestamp"),
        ])
    );

    let at = crds
        .iter()
        .find(|c| c.spec.names.kind == "AccessToken")
        .unwrap();
    assert_eq!(
        at.spec.names.short_names.as_deref(),
        Some(&["at".to_owned()][..])
    );
    assert_eq!(
        columns(at),
        pairs(&[
            ("Phase", ".status.phase"),
            ("Models", ".spec.models"),
            ("Expires", ".status.expiresAt"),
            ("Age", ".metadata.creationTimestamp"),
        ])
    );
}

#[test]
fn valid_fixtures_pass_the_cel_rules() {
    for path in fixtures("valid") {
        assert_eq!(cel_errors(&path), Ok(()), "{}", path.display());
    }
}

#[test]
fn cel_rules_refuse_each_invalid_fixture_with_its_message() {
    let cel_cases: Vec<_> = fixtures("invalid")
        .into_iter()
        .filter(|p| header(p, "rejected-by") == "cel")
        .collect();
    assert!(cel_cases.len() >= 8);
    for path in cel_cases {
        let expected = header(&path, "expect");
        let error =
            cel_errors(&path).expect_err(&format!("{} passed the CEL rules", path.display()));
        assert!(
            error.contains(&expected),
            "{}: expected {expected:?} in {error:?}",
            path.display()
        );
    }
}

#[test]
fn structural_schema_accepts_valid_fixtures_and_refuses_invalid_ones_at_the_named_field() {
    let all: Vec<PathBuf> = fixtures("valid")
        .into_iter()
        .chain(fixtures("invalid"))
        .collect();
    let output = venv_tool("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schema_check.py"))
        .arg(workspace().join("crds/manifests"))
        .args(&all)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = String::from_utf8(output.stdout).unwrap();
    for path in all {
        let name = path.file_name().unwrap().to_str().unwrap();
        let refused = report
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('\t'))
            })
            .unwrap_or_else(|| panic!("no report for {name}:\n{report}"));
        let schema_case =
            path.parent().unwrap().ends_with("invalid") && header(&path, "rejected-by") == "schema";
        if schema_case {
            let field = header(&path, "expect");
            assert!(
                refused.split(',').any(|f| f == field),
                "{name}: expected {field} refused, got {refused:?}"
            );
        } else {
            assert_eq!(refused, "", "{name} should pass the structural schema");
        }
    }
}
