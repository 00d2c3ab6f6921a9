//! The token workflow of the seed document from `kubectl infergate` on the cluster test bed:
//! create (the token shown once, its plaintext stored nowhere), call with the generated snippet,
//! list, rotate (both tokens valid during the grace period, the old one refused right after),
//! revoke. The `infergate`
//! binary runs as a kubectl plugin: a `kubectl-infergate` link on PATH, found by the real
//! kubectl.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e::{TestBed, built, minilm_dir};
use serde_json::{Value, json};

fn cluster() -> &'static TestBed {
    e2e::cluster_with_infergate!()
}

/// A folder holding `kubectl-infergate`, a link to the built `infergate`.
fn plugin_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infergate-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("kubectl-infergate");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(built("infergate"), &link).unwrap();
    dir
}

/// `kubectl infergate ARGS`, with the test bed as the current kube context.
fn plugin(cluster: &TestBed, dir: &Path, args: &[&str]) -> Output {
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(&cluster.kubectl)
        .arg("infergate")
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("PATH", path)
        .output()
        .unwrap()
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The status and error code of an embedding call with `token`.
async fn embed(url: &str, token: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(json!({"inputs": "Where is the token?"}).to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Calls until the answer is `want` (the proxy learns of a token change within a second).
async fn embed_until(url: &str, token: &str, want: (u16, &str)) {
    let started = Instant::now();
    loop {
        let (status, code) = embed(url, token).await;
        if (status, code.as_str()) == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still {status} {code:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The size of the embedding an embedding snippet printed: TEI's `[[f32]]` (Python's list
/// reads as JSON too), the openai clients' `N dimensions: ...` or huggingface_hub's
/// `shape (1, N): ...` line.
fn dimensions(printed: &str) -> Option<usize> {
    if let Some((count, _)) = printed.split_once(" dimensions") {
        return count.parse().ok();
    }
    if let Some(rest) = printed.strip_prefix("shape (1, ") {
        return rest.split_once(')')?.0.parse().ok();
    }
    let vectors: Vec<Vec<f64>> = serde_json::from_str(printed.trim()).ok()?;
    vectors.first().map(Vec::len)
}

fn condition(cluster: &TestBed, namespace: &str, token: &str, kind: &str) -> String {
    cluster.jsonpath(
        namespace,
        &format!("at/{token}"),
        &format!(r#"{{.status.conditions[?(@.type=="{kind}")].reason}}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_see_once_call_rotate_and_revoke_from_kubectl_infergate() {
    let cluster = cluster();
    let namespace = cluster.watched_namespace();
    let proxy_url = cluster.proxy();
    let minilm = e2e::cluster_model("all-MiniLM-L6-v2", minilm_dir);
    let llama = e2e::cluster_model("chat", || e2e::fixture("llama"));
    let id = format!("vault-{}", std::process::id());
    // What an earlier run may have left.
    for leftover in ["md/vault", "md/talk", "at/app", "at/kept", "at/limited"] {
        cluster.ok(&[
            "delete",
            "-n",
            &namespace,
            leftover,
            "--ignore-not-found",
            "--wait=true",
        ]);
    }
    cluster.ok(&[
        "delete",
        "at",
        "-n",
        &namespace,
        "-l",
        "infergate.dev/token-family=app",
        "--ignore-not-found",
    ]);
    // An embedding model, and a chat model whose snippets stream.
    let models = format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: vault}}\nspec:\n  task: embedding\n  modelVersionId: {id}\n  model: {{uri: \"file://{minilm}\"}}\n---\napiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: talk}}\nspec:\n  task: text-generation\n  model: {{uri: \"file://{llama}\"}}\n"
    );
    cluster.apply_in(&namespace, &models);
    cluster.ok(&[
        "wait",
        "-n",
        &namespace,
        "--for",
        "condition=Ready",
        "--timeout",
        "120s",
        "md/vault",
        "md/talk",
    ]);
    let url = format!("{proxy_url}/models/{id}/proxy/v1/embed");
    let dir = plugin_dir();
    let run = |args: &[&str]| plugin(cluster, &dir, args);

    // Create: printed once; only the digest reaches the cluster.
    let created = succeeded(&run(&[
        "token",
        "create",
        "app",
        "--models",
        "vault,talk",
        "--ttl",
        "30d",
        "-n",
        &namespace,
        "-o",
        "json",
    ]));
    let created: Value = serde_json::from_str(&created).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("igt_"), "{created}");
    assert_eq!(created["models"], json!(["vault", "talk"]));
    assert!(created["expiresAt"].as_str().is_some(), "{created}");
    let hash = cluster.jsonpath(&namespace, "at/app", "{.spec.tokenHash}");
    assert!(hash.starts_with("sha256:"), "{hash}");
    let secret = cluster.kubectl(&["get", "secret", "app", "-n", &namespace], None);
    assert!(!secret.status.success(), "no Secret holds the plaintext");
    embed_until(&url, &token, (200, "")).await;

    // Call with the generated code: as the operator published it, for the chart's in-cluster
    // proxy address, and run as printed for the address this test reaches the proxy at.
    let published = succeeded(&run(&["snippet", "vault", "-n", &namespace]));
    let config_map = cluster.jsonpath(&namespace, "md/vault", "{.status.snippetsConfigMap}");
    assert_eq!(config_map, "vault-snippets");
    let stored = cluster.jsonpath(
        &namespace,
        &format!("configmap/{config_map}"),
        r"{.data.python\.py}",
    );
    assert_eq!(published.trim_end(), stored.trim_end());
    assert!(
        published.contains(&format!(
            "http://infergate-proxy.infergate-system.svc/models/{id}/proxy/v1"
        )),
        "{published}"
    );
    let workdir = e2e::snippets::workdir("cluster");
    let call_with_snippet = |model: &str, language: &str, token: &str| {
        let code = succeeded(&run(&[
            "snippet", model, "--lang", language, "--url", &proxy_url, "-n", &namespace,
        ]));
        e2e::snippets::run(language, &code, token, &workdir)
    };
    // An embedding model and a chat model have a snippet in every language; the chat's
    // stream its answer (curl prints the raw events).
    for language in e2e::snippets::LANGUAGES {
        let answer = e2e::succeeded(language, &call_with_snippet("vault", language, &token));
        assert_eq!(dimensions(&answer), Some(384), "{language}: {answer}");
        let chat = e2e::succeeded(language, &call_with_snippet("talk", language, &token));
        match language {
            "curl" => assert!(
                chat.contains("data: [DONE]") && !chat.contains("infergate-usage"),
                "{chat}"
            ),
            _ => assert!(!chat.trim().is_empty(), "{language}: {chat:?}"),
        }
    }
    // Usage in the AccessToken's status (every 2 s on the test bed): 7 embeddings of one text
    // each (the first call and six snippets) and 6 chats.
    let usage = e2e::eventually(
        "the token's usage in its status",
        Duration::from_secs(30),
        || {
            let usage: Value =
                serde_json::from_str(&cluster.jsonpath(&namespace, "at/app", "{.status.usage}"))
                    .ok()?;
            (usage["requestsByClass"]["2xx"].as_f64() >= Some(13.0)).then_some(usage)
        },
    );
    assert_eq!(usage["units"]["inputs"].as_f64(), Some(7.0), "{usage}");
    assert_eq!(
        usage["requestsByClass"]["2xx"].as_f64(),
        Some(13.0),
        "{usage}"
    );
    let completion = usage["units"]["completion_tokens"]
        .as_f64()
        .unwrap_or_default();
    assert!((6.0..=6.0 * 200.0).contains(&completion), "{usage}");
    assert!(
        usage["units"]["prompt_tokens"].as_f64() > Some(6.0),
        "{usage}"
    );
    assert_eq!(
        usage["requests"], usage["requestsByClass"]["2xx"],
        "{usage}"
    );
    let last_used: jiff::Timestamp = usage["lastUsedAt"].as_str().unwrap().parse().unwrap();
    assert!(
        jiff::Timestamp::now().duration_since(last_used).as_secs() < 60,
        "{usage}"
    );

    let again = run(&[
        "token", "create", "app", "--models", "vault", "-n", &namespace,
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let missing = run(&["token", "create", "x", "-n", &namespace]);
    assert_eq!(missing.status.code(), Some(2), "clap: --models is required");

    // --keep-secret: the operator issues it into a Secret for workloads that mount it.
    let kept = succeeded(&run(&[
        "token",
        "create",
        "kept",
        "--models",
        "vault",
        "--keep-secret",
        "-n",
        &namespace,
        "-o",
        "env",
    ]));
    let kept_token = kept
        .lines()
        .find_map(|l| l.strip_prefix("INFERGATE_TOKEN="))
        .unwrap()
        .to_owned();
    let stored = cluster.ok(&[
        "get",
        "secret",
        "kept",
        "-n",
        &namespace,
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    assert_eq!(stored, kept_token);
    embed_until(&url, &kept_token, (200, "")).await;

    // Limits: 6 requests a minute (a burst of 1), one limit for all proxy replicas.
    let limited = succeeded(&run(&[
        "token",
        "create",
        "limited",
        "--models",
        "vault",
        "--requests-per-minute",
        "6",
        "-n",
        &namespace,
        "-o",
        "json",
    ]));
    let limited: Value = serde_json::from_str(&limited).unwrap();
    let limited_token = limited["token"].as_str().unwrap().to_owned();
    assert_eq!(
        cluster.jsonpath(&namespace, "at/limited", "{.spec.limits.requestsPerMinute}"),
        "6"
    );
    embed_until(&url, &limited_token, (200, "")).await;
    assert_eq!(
        embed(&url, &limited_token).await,
        (429, "requests_per_minute_exceeded".to_owned()),
        "the next one within 10 s"
    );
    let enforcement = e2e::eventually(
        "how the limits are enforced",
        Duration::from_secs(30),
        || {
            let status: Value = serde_json::from_str(&cluster.jsonpath(
                &namespace,
                "at/limited",
                "{.status.limits}",
            ))
            .ok()?;
            Some(status)
        },
    );
    // The test bed runs one proxy replica and no store: it enforces the whole limit.
    assert_eq!(enforcement["enforcement"], "PerReplica", "{enforcement}");
    let replicas = enforcement["replicas"].as_f64().unwrap();
    assert_eq!(
        enforcement["perReplica"]["requestsPerMinute"].as_f64(),
        Some(6.0 / replicas),
        "{enforcement}"
    );

    let listed = succeeded(&run(&["token", "list", "-n", &namespace]));
    let header = listed.lines().next().unwrap();
    assert!(header.starts_with("NAME") && header.contains("PHASE") && header.contains("ROTATION"));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("app ") && l.contains("Active") && l.contains("vault")),
        "{listed}"
    );
    assert!(!listed.contains(&token), "list never shows a token");

    // Rotate with a grace period: both tokens work until it ends, then only the new one.
    let rotated = run(&[
        "token", "rotate", "app", "--grace", "8s", "-n", &namespace, "-o", "env",
    ]);
    let successor_env = succeeded(&rotated);
    assert!(String::from_utf8_lossy(&rotated.stderr).contains("accesstoken/app stays valid until"));
    let value = |key: &str| {
        successor_env
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_owned()
    };
    let (new_token, successor) = (value("INFERGATE_TOKEN"), value("INFERGATE_TOKEN_NAME"));
    assert!(successor.starts_with("app-"), "{successor}");
    embed_until(&url, &new_token, (200, "")).await;
    let answer = e2e::succeeded("python", &call_with_snippet("vault", "python", &new_token));
    assert_eq!(dimensions(&answer), Some(384), "{answer}");
    assert_eq!(
        embed(&url, &token).await,
        (200, String::new()),
        "the old one during the grace"
    );
    assert_eq!(
        condition(cluster, &namespace, "app", "Rotated"),
        "ReplacedByRotation"
    );
    assert_eq!(
        condition(cluster, &namespace, &successor, "Rotated"),
        "ReplacesRotated"
    );
    let events = cluster.ok(&[
        "get",
        "events",
        "-n",
        &namespace,
        "--field-selector",
        "reason=ReplacedByRotation,involvedObject.name=app",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(
        events.contains(&format!("replaced by AccessToken {successor}")),
        "{events}"
    );
    let expires = cluster.jsonpath(&namespace, "at/app", "{.status.expiresAt}");
    let expires: jiff::Timestamp = expires.parse().unwrap();
    let left = expires.duration_since(jiff::Timestamp::now());
    assert!(
        left.as_secs() <= 8,
        "the old token ends with the grace: {left:?} left"
    );
    tokio::time::sleep(Duration::try_from(left).unwrap_or_default() + Duration::from_millis(200))
        .await;
    assert_eq!(embed(&url, &token).await, (401, "token_expired".to_owned()));
    assert_eq!(embed(&url, &new_token).await, (200, String::new()));

    // Revoke: refused within a second.
    let revoked = succeeded(&run(&["token", "revoke", &successor, "-n", &namespace]));
    assert!(revoked.contains("revoked"));
    embed_until(&url, &new_token, (401, "token_revoked")).await;
    let refused = call_with_snippet("vault", "python", &new_token);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let unknown = run(&["token", "revoke", "nothing-here", "-n", &namespace]);
    assert_eq!(unknown.status.code(), Some(1));

    cluster.ok(&[
        "delete",
        "-n",
        &namespace,
        "md/vault",
        "md/talk",
        "at/app",
        "at/kept",
        "at/limited",
        &format!("at/{successor}"),
        "--wait=true",
        "--timeout=60s",
    ]);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(workdir);
}
