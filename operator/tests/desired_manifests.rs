//! Every kind of runtime object the operator generates is a valid Kubernetes object: checked
//! with `kubernetes-validate --strict` and by the API server of the cluster test bed
//! (`kubectl apply --dry-run=server`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crds::{ModelDeployment, ModelDeploymentSpec};
use operator::desired::{
    NetworkAccess, Peer, RuntimeDefaults, runtime_deployment, runtime_network_policy,
    runtime_service,
};
use operator::internal_keys::verifying_keys_config_map;

fn deployment(name: &str, spec: serde_json::Value) -> ModelDeployment {
    let spec: ModelDeploymentSpec = serde_json::from_value(spec).unwrap();
    let mut md = ModelDeployment::new(name, spec);
    md.metadata.namespace = Some("demo".into());
    md.metadata.uid = Some("4c5e1e0a-8b53-4f7e-9d64-3f3a1c2b9d10".into());
    md
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One generated Deployment, Service and NetworkPolicy per case of the table, and the public
/// keys' ConfigMap, as YAML files.
fn generated(dir: &Path) -> Vec<PathBuf> {
    let cases = [
        (
            "embedding-file",
            serde_json::json!({"task": "embedding", "model": {"uri": "file:///models/minilm"}}),
        ),
        (
            "chat-pvc-gpu",
            serde_json::json!({
                "task": "text-generation", "model": {"uri": "pvc://models/llama-3.2-1b"}, "replicas": 2,
                "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"}, "nodeSelector": {"gpu": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "timeouts": {"default": "120s", "max": "10m"}
            }),
        ),
        (
            "rerank-custom",
            serde_json::json!({
                "task": "rerank", "model": {"uri": "pvc://models"},
                "runtime": {"container": {"image": "ghcr.io/huggingface/text-embeddings-inference:cpu-1.9",
                            "args": ["--model-id", "/model"], "env": [{"name": "RUST_LOG", "value": "info"}], "port": 80}}
            }),
        ),
        (
            "embedding-https",
            serde_json::json!({"task": "embedding", "model": {"uri": "https://models.example.com/minilm.tar.gz",
                               "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}}),
        ),
        (
            "tabular-image",
            serde_json::json!({"task": "tabular", "model": {"uri": "file:///models/mlp"}, "runtime": {"image": "registry.example.com/runtime:dev"}}),
        ),
    ];
    let access = NetworkAccess {
        proxy: Peer {
            namespace_labels: labels(&[("kubernetes.io/metadata.name", "infergate-system")]),
            pod_labels: labels(&[("app.kubernetes.io/name", "infergate-proxy")]),
        },
        scraper: Some(Peer {
            namespace_labels: labels(&[("kubernetes.io/metadata.name", "monitoring")]),
            pod_labels: labels(&[("app.kubernetes.io/name", "prometheus")]),
        }),
    };
    let defaults = RuntimeDefaults {
        image: "infergate/runtime:0.1.0".into(),
        access: access.clone(),
        ..RuntimeDefaults::default()
    };
    let keys = internal_token::SigningKeys::first(std::time::SystemTime::now()).unwrap();
    let jwks = serde_json::to_string(&keys.verifying_keys().unwrap()).unwrap();
    let config_map = dir.join("internal-keys-configmap.yaml");
    std::fs::write(
        &config_map,
        format!(
            "apiVersion: v1\nkind: ConfigMap\n{}",
            serde_yaml::to_string(&verifying_keys_config_map("demo", &jwks)).unwrap()
        ),
    )
    .unwrap();
    let mut files = vec![config_map];
    for (name, spec) in cases {
        let md = deployment(name, spec);
        for (kind, yaml) in [
            (
                "deployment",
                serde_yaml::to_string(&runtime_deployment(&md, &defaults).unwrap()).unwrap(),
            ),
            (
                "service",
                serde_yaml::to_string(&runtime_service(&md).unwrap()).unwrap(),
            ),
            (
                "networkpolicy",
                serde_yaml::to_string(&runtime_network_policy(&md, &access).unwrap()).unwrap(),
            ),
        ] {
            let path = dir.join(format!("{name}-{kind}.yaml"));
            let typed = match kind {
                "deployment" => format!("apiVersion: apps/v1\nkind: Deployment\n{yaml}"),
                "networkpolicy" => {
                    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n{yaml}")
                }
                _ => format!("apiVersion: v1\nkind: Service\n{yaml}"),
            };
            std::fs::write(&path, typed).unwrap();
            files.push(path);
        }
    }
    files
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infergate-desired-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The RBAC files the chart reuses: five objects each.
fn rbac_files() -> (Vec<PathBuf>, usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/infergate/rbac");
    (
        vec![dir.join("operator.yaml"), dir.join("proxy.yaml")],
        5 + 5,
    )
}

#[test]
fn generated_objects_and_rbac_pass_kubernetes_validate_strict() {
    let dir = temp_dir("validate");
    let mut files = generated(&dir);
    let objects = files.len() + rbac_files().1;
    files.extend(rbac_files().0);
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .args(&files)
        .output()
        .expect("kubernetes-validate from the set-up virtualenv (. scripts/env.sh)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    assert_eq!(
        report.matches(" passed for resource ").count(),
        objects,
        "{report}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_api_server_accepts_the_generated_objects() {
    let bed = e2e::test_bed();
    let kubectl = |args: &[&str]| bed.kubectl(args, None);
    let created = kubectl(&["create", "namespace", "demo"]);
    assert!(
        created.status.success()
            || String::from_utf8_lossy(&created.stderr).contains("AlreadyExists")
    );
    let dir = temp_dir("apply");
    for file in generated(&dir) {
        let applied = kubectl(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()]);
        assert!(
            applied.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn token_new_prints_a_token_and_its_digest_once() {
    let output = Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["token", "new"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .unwrap()
        .trim();
    let digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tokenHash:"))
        .unwrap()
        .trim();
    let parsed = crds::Token::parse(token).unwrap();
    assert_eq!(digest, format!("sha256:{}", parsed.sha256_hex()));
}
