//! The whole system on the cluster test bed, black box: `kubectl apply` a ModelDeployment of the
//! real all-MiniLM-L6-v2, one of a tiny chat model and an AccessToken; the operator makes runtime
//! pods, the node agent runs them, the real endpointslice controller publishes their addresses,
//! and the proxy (Kubernetes source) routes a client holding the token read with kubectl. Then
//! revocation answers 401 and deletion takes everything away.
//!
//! infergate is installed by its Helm chart: on the test bed by `e2e/cluster/up.sh` (the operator
//! and proxy pods run by the node agent), on kind by `e2e/kind.sh`. Everything is driven through
//! kubectl and HTTP, so the same steps run against both; only KUBECONFIG and PROXY_URL differ.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::objectstore::ObjectStore;
use e2e::{TestBed, eventually, minilm_dir};
use serde_json::{Value, json};

/// The test bed with infergate installed by its chart, its pods run by the node agent.
fn cluster() -> &'static TestBed {
    e2e::cluster_with_infergate!()
}

/// Each pod's container states, and on the test bed the end of each container's log (the node
/// agent serves no `kubectl logs`): what a person reads first when a model never gets Ready,
/// such as a library missing from the runtime image.
fn why_pods_are_not_ready(cluster: &TestBed, namespace: &str) -> String {
    let mut why = cluster.ok(&[
        "get",
        "pods",
        "-n",
        namespace,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}: {.status.containerStatuses[*].state}{\"\\n\"}{end}",
    ]);
    let pods = cluster.pod_logs.as_deref().into_iter();
    for entry in pods.flat_map(std::fs::read_dir).flatten().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{namespace}_"))
        {
            continue;
        }
        for log in std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if log.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(3).collect();
                why.push_str(&format!("{}:\n", log.path().display()));
                for line in tail.into_iter().rev() {
                    why.push_str(&format!("  {line}\n"));
                }
            }
        }
    }
    why
}

/// The `ModelFetched` condition of a ModelDeployment: reason and message.
fn model_fetched(cluster: &TestBed, namespace: &str, md: &str) -> (String, String) {
    let condition = cluster.ok(&[
        "get",
        "md",
        md,
        "-n",
        namespace,
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="ModelFetched")].reason}|{.status.conditions[?(@.type=="ModelFetched")].message}"#,
    ]);
    let (reason, message) = condition.split_once('|').unwrap_or_default();
    (reason.to_owned(), message.to_owned())
}

/// all-MiniLM-L6-v2 from a bucket of a real S3 server: two replicas on the node, one
/// downloads while the other waits for it and takes the node cache's copy, and both serve.
/// Wrong keys and a missing bucket become conditions that say what to fix.
fn models_from_an_s3_bucket(cluster: &TestBed, namespace: &str, dir: &Path) {
    // Where pods reach this machine: 10.0.0.1, the test bed's address for the API server.
    let host = std::env::var("INFERGATE_TEST_STORE_HOST").unwrap_or_else(|_| "10.0.0.1".to_owned());
    let store = ObjectStore::start(dir, &host, "e2e-access", "e2e-secret-not-logged");
    store.put_model(
        "models",
        "team/minilm",
        Path::new(&minilm_dir()),
        &e2e::objectstore::MINILM_FILES,
    );
    for (secret, key) in [
        ("store-keys", "e2e-secret-not-logged"),
        ("wrong-keys", "not-the-key"),
    ] {
        cluster.ok(&[
            "create",
            "secret",
            "generic",
            secret,
            "-n",
            namespace,
            "--from-literal=AWS_ACCESS_KEY_ID=e2e-access",
            &format!("--from-literal=AWS_SECRET_ACCESS_KEY={key}"),
        ]);
    }
    let model = |name: &str, uri: &str, secret: &str, replicas: u32| {
        format!(
            "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {name}}}\nspec:\n  task: embedding\n  replicas: {replicas}\n  model:\n    uri: {uri}\n    endpoint: {}\n    pathStyle: true\n    credentialsSecret: {secret}\n---\n",
            store.endpoint
        )
    };
    let manifests = dir.join("s3-models.yaml");
    std::fs::write(
        &manifests,
        [
            model("minilm-s3", "s3://models/team/minilm", "store-keys", 2),
            model("wrong-keys", "s3://models/team/minilm", "wrong-keys", 1),
            model("no-bucket", "s3://no-such-bucket/minilm", "store-keys", 1),
        ]
        .concat(),
    )
    .unwrap();
    let started = Instant::now();
    cluster.ok(&["apply", "-n", namespace, "-f", manifests.to_str().unwrap()]);
    let waited = cluster.kubectl(
        &[
            "wait",
            "-n",
            namespace,
            "--for",
            "condition=Ready",
            "--timeout",
            "120s",
            "md/minilm-s3",
        ],
        None,
    );
    assert!(
        waited.status.success(),
        "the s3:// model did not become Ready: {}\n{:?}\n{}",
        String::from_utf8_lossy(&waited.stderr),
        model_fetched(cluster, namespace, "minilm-s3"),
        why_pods_are_not_ready(cluster, namespace)
    );
    let ready_after = started.elapsed();
    let (_, fetched) = eventually(
        "both replicas' fetches reported",
        Duration::from_secs(30),
        || {
            let (reason, message) = model_fetched(cluster, namespace, "minilm-s3");
            (message.matches("pod minilm-s3-").count() == 2).then_some((reason, message))
        },
    );
    assert!(
        fetched.contains(": Downloaded: s3://models/team/minilm: 10 files"),
        "{fetched}"
    );
    assert!(
        fetched.contains(": CacheHitAfterWait: ") || fetched.contains(": CacheHit: "),
        "the second replica used the node cache: {fetched}"
    );
    assert!(fetched.contains("checked against SHA256SUMS"), "{fetched}");
    eprintln!("s3:// model Ready after {ready_after:?} (2 replicas): {fetched}");

    let failure = |md: &str, reason: &str| {
        eventually(
            &format!("{md} reporting {reason}"),
            Duration::from_secs(60),
            || {
                let (seen, message) = model_fetched(cluster, namespace, md);
                (seen == reason).then_some(message)
            },
        )
    };
    let refused = failure("wrong-keys", "CredentialsRefused");
    assert!(
        refused.contains("SignatureDoesNotMatch") && refused.contains("Secret wrong-keys"),
        "{refused}"
    );
    assert!(!refused.contains("not-the-key"), "{refused}");
    let missing = failure("no-bucket", "ModelNotFound");
    assert!(
        missing.contains("s3://no-such-bucket/minilm") && missing.contains("NoSuchBucket"),
        "{missing}"
    );
    let degraded = cluster.ok(&[
        "get",
        "md",
        "wrong-keys",
        "-n",
        namespace,
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Degraded")].reason}"#,
    ]);
    assert_eq!(degraded, "CredentialsRefused");

    cluster.ok(&[
        "delete",
        "-n",
        namespace,
        "-f",
        manifests.to_str().unwrap(),
        "--wait=true",
        "--timeout=60s",
    ]);
    cluster.ok(&[
        "delete",
        "secret",
        "store-keys",
        "wrong-keys",
        "-n",
        namespace,
    ]);
}

/// What `kubectl get -o jsonpath` shows of a Secret's data, decoded.
fn base64_decode(text: &str) -> Vec<u8> {
    Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap()
        .stdout
}

async fn call(url: &str, token: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_to_answers_through_the_proxy_to_revocation_and_garbage_collection() {
    let cluster = cluster();
    let suffix = format!("{}", std::process::id());
    let namespace = cluster.watched_namespace();
    // The gateway namespace, where the token records live.
    let gateway = std::env::var("INFERGATE_TEST_GATEWAY_NAMESPACE")
        .unwrap_or_else(|_| "infergate-system".to_owned());
    let proxy_url = cluster.proxy();
    let log_dir = std::env::temp_dir().join(format!("infergate-e2e-{suffix}"));
    std::fs::create_dir_all(&log_dir).unwrap();

    // What a platform engineer applies: the shape of examples/k8s/, with this machine's paths.
    let manifests = log_dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let minilm = e2e::cluster_model("all-MiniLM-L6-v2", minilm_dir);
    let llama = e2e::cluster_model("chat", || e2e::fixture("llama"));
    let vits = e2e::cluster_model("speech", || e2e::fixture("vits"));
    std::fs::write(
        manifests.join("models.yaml"),
        format!(
            "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: minilm}}\nspec:\n  task: embedding\n  modelVersionId: minilm-{suffix}\n  model: {{uri: \"file://{}\"}}\n---\napiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: chat}}\nspec:\n  task: text-generation\n  modelVersionId: chat-{suffix}\n  model: {{uri: \"file://{}\"}}\n---\napiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: speech}}\nspec:\n  task: text-to-speech\n  modelVersionId: speech-{suffix}\n  model: {{uri: \"file://{}\"}}\n",
            minilm, llama, vits
        ),
    )
    .unwrap();
    std::fs::write(
        manifests.join("token.yaml"),
        "apiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {name: app}\nspec: {models: [minilm, chat, speech], secretName: app-credentials}\n",
    )
    .unwrap();
    cluster.ok(&["apply", "-n", &namespace, "-f", manifests.to_str().unwrap()]);
    let waited = cluster.kubectl(
        &[
            "wait",
            "-n",
            &namespace,
            "--for",
            "condition=Ready",
            "--timeout",
            "120s",
            "md/minilm",
            "md/chat",
            "md/speech",
        ],
        None,
    );
    assert!(
        waited.status.success(),
        "the models did not become Ready: {}\n{}",
        String::from_utf8_lossy(&waited.stderr),
        why_pods_are_not_ready(cluster, &namespace)
    );
    cluster.ok(&[
        "wait",
        "-n",
        &namespace,
        "--for",
        "jsonpath={.status.phase}=Active",
        "--timeout",
        "30s",
        "at/app",
    ]);
    let token = cluster.ok(&[
        "get",
        "secret",
        "app-credentials",
        "-n",
        &namespace,
        "-o",
        "jsonpath={.data.token}",
    ]);
    let token = String::from_utf8(base64_decode(&token)).unwrap();
    assert!(token.starts_with("igt_"));

    // The seed document's calls, through the proxy. The proxy learns of ready endpoints from
    // EndpointSlices, a moment after the ModelDeployment turns Ready.
    let embed_url = format!("{proxy_url}/models/minilm-{suffix}/proxy/v1/embed");
    let started = Instant::now();
    let (status, embeddings) = loop {
        let (status, body) = call(
            &embed_url,
            &token,
            json!({"inputs": "What is the capital of France?"}),
        )
        .await;
        if status == 200 || started.elapsed() > Duration::from_secs(30) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200, "{embeddings}");
    assert_eq!(
        embeddings[0].as_array().unwrap().len(),
        384,
        "all-MiniLM-L6-v2 embeds in 384 dimensions"
    );
    let (status, openai) = call(
        &format!("{proxy_url}/models/minilm-{suffix}/proxy/v1/embeddings"),
        &token,
        json!({"input": ["Paris", "Rome"], "model": "minilm"}),
    )
    .await;
    assert_eq!(status, 200, "{openai}");
    assert_eq!(openai["data"].as_array().unwrap().len(), 2);
    let (status, chat) = call(
        &format!("{proxy_url}/models/chat-{suffix}/proxy/v1/chat/completions"),
        &token,
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["usage"]["completion_tokens"], 8);
    // Streamed through the proxy: SSE chunks as the runtime sends them, then [DONE].
    let streamed = reqwest::Client::new()
        .post(format!("{proxy_url}/models/chat-{suffix}/proxy/v1/chat/completions"))
        .header("Authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, "temperature": 0, "stream": true}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert_eq!(streamed.headers()["content-type"], "text/event-stream");
    let body = streamed.text().await.unwrap();
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        text,
        chat["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // Text to speech, the seed's body: a base64 WAV.
    let (status, speech) = call(
        &format!("{proxy_url}/models/speech-{suffix}/proxy/v1/generate-speech"),
        &token,
        json!({"text": "hello from the cluster", "seed": 7}),
    )
    .await;
    assert_eq!(status, 200, "{speech}");
    assert!(
        speech["audio"].as_str().unwrap().starts_with("UklGR"),
        "a RIFF (WAV) file, base64: {speech}"
    );
    assert_eq!(speech["sampling_rate"], 16000);
    models_from_an_s3_bucket(cluster, &namespace, &log_dir);
    let pods = cluster.ok(&[
        "get",
        "pods",
        "-n",
        &namespace,
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ]);
    assert!(
        pods.split_whitespace().all(|ip| ip.starts_with("10.214.")),
        "{pods}"
    );

    // The side door is shut: a runtime pod's own address answers only what the proxy signed
    // for that model, whoever calls it. (The test bed has no network plugin to enforce the
    // NetworkPolicy the operator also writes; this is the JWT alone.)
    let minilm_ip = cluster.ok(&[
        "get",
        "pods",
        "-n",
        &namespace,
        "-l",
        "infergate.dev/model-deployment=minilm",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ]);
    let direct = format!("http://{minilm_ip}:8080/embed");
    let refused = |authorization: Option<String>| {
        let direct = direct.clone();
        async move {
            let mut request = reqwest::Client::new()
                .post(&direct)
                .header("content-type", "application/json")
                .body(json!({"inputs": "straight to the pod"}).to_string());
            if let Some(authorization) = authorization {
                request = request.header("Authorization", authorization);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
            (
                status,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
    };
    assert_eq!(refused(None).await, (401, "internal_token_missing".into()));
    assert_eq!(
        refused(Some(format!("Bearer {token}"))).await,
        (401, "internal_token_invalid".into()),
        "the client's own token is not the proxy's signature"
    );
    // JWTs made with the proxy's own key, read as an administrator can: one past its expiry,
    // one for another model, and one that is right.
    let signing = cluster.ok(&[
        "get",
        "secret",
        crds::names::SIGNING_KEYS_SECRET,
        "-n",
        &gateway,
        "-o",
        "jsonpath={.data.signing\\.json}",
    ]);
    let signing = base64_decode(&signing);
    let signed =
        |model: &str, signed_ago: Duration| Some(e2e::proxy_signed(&signing, model, signed_ago));
    let minilm_id = format!("minilm-{suffix}");
    assert_eq!(
        refused(signed(&minilm_id, Duration::from_secs(30))).await,
        (401, "internal_token_expired".into())
    );
    assert_eq!(
        refused(signed(&format!("chat-{suffix}"), Duration::ZERO)).await,
        (401, "internal_token_wrong_model".into())
    );
    assert_eq!(
        refused(signed(&minilm_id, Duration::ZERO)).await.0,
        200,
        "the proxy's signature, for this model"
    );

    // A rotation asked for with requests flowing through the proxy loses none: the new key is
    // published, starts signing, and the old one is retired.
    let published_keys = || -> Vec<String> {
        let jwks = cluster.ok(&[
            "get",
            "configmap",
            crds::names::VERIFYING_KEYS_CONFIG_MAP,
            "-n",
            &namespace,
            "-o",
            "jsonpath={.data.jwks\\.json}",
        ]);
        let jwks: Value = serde_json::from_str(&jwks).unwrap_or(Value::Null);
        jwks["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|key| key["kid"].as_str().map(str::to_owned))
            .collect()
    };
    let before = published_keys();
    assert_eq!(before.len(), 1, "{before:?}");
    let traffic = {
        let (url, token) = (embed_url.clone(), token.clone());
        e2e::Traffic::start(2, move || {
            let (url, token) = (url.clone(), token.clone());
            async move { call(&url, &token, json!({"inputs": "rotating"})).await.0 }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.ok(&[
        "annotate",
        "--overwrite",
        "secret",
        crds::names::SIGNING_KEYS_SECRET,
        "-n",
        &gateway,
        &format!("{}={suffix}", crds::names::ROTATE_ANNOTATION),
    ]);
    eventually("the new key published", Duration::from_secs(30), || {
        (published_keys().len() == 2).then_some(())
    });
    let after = eventually("the old key retired", Duration::from_secs(90), || {
        let keys = published_keys();
        (keys.len() == 1 && keys != before).then_some(keys)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let statuses = traffic.stop().await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let answered = statuses.len();
    assert!(answered > 20, "{answered} requests across the rotation");
    assert_ne!(after, before);

    // Revocation, as kubectl applies it, is enforced within a second.
    cluster.ok(&[
        "patch",
        "at",
        "app",
        "-n",
        &namespace,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"revoked":true}}"#,
    ]);
    let revoked_at = Instant::now();
    while call(&embed_url, &token, json!({"inputs": "x"})).await.0 != 401 {
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "the revoked token is still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "revocation took {:?}",
        revoked_at.elapsed()
    );

    // Deletion: the finalizer removes the record; the real garbage collector removes the
    // Deployments, their ReplicaSets and pods, and the node agent stops their processes.
    cluster.ok(&[
        "delete",
        "-n",
        &namespace,
        "-f",
        manifests.to_str().unwrap(),
        "--wait=true",
        "--timeout=60s",
    ]);
    eventually("every runtime object gone", Duration::from_secs(60), || {
        let left = cluster.ok(&[
            "get",
            "deployments,replicasets,pods,services,secrets,networkpolicies",
            "-n",
            &namespace,
            "-o",
            "name",
        ]);
        let records = cluster.ok(&[
            "get",
            "secrets",
            "-n",
            &gateway,
            "-l",
            "infergate.dev/token-record=true",
            "-o",
            "name",
        ]);
        (left
            .lines()
            .all(|l| l.is_empty() || l.starts_with("secret/default-token"))
            && records.trim().is_empty())
        .then_some(())
    });
    let (status, _) = call(&embed_url, &token, json!({"inputs": "x"})).await;
    assert_eq!(status, 401, "a deleted token stays refused");
    // Waited for: the next run creates the same namespace.
    cluster.ok(&["delete", "namespace", &namespace, "--timeout=120s"]);
    let _ = std::fs::remove_dir_all(log_dir);
}

/// An image from a registry this machine cannot reach: the pod waits, saying why.
#[test]
fn a_pod_whose_image_cannot_be_pulled_says_why_in_its_status() {
    let cluster = cluster();
    let namespace = format!("e2e-unpullable-{}", std::process::id());
    cluster.ok(&["create", "namespace", &namespace]);
    cluster.ok(&[
        "run",
        "web",
        "-n",
        &namespace,
        "--image",
        "nginx:1.27",
        "--restart",
        "Never",
    ]);
    let reason = eventually(
        "a waiting reason on the pod",
        Duration::from_secs(30),
        || {
            let reason = cluster.ok(&["get", "pod", "web", "-n", &namespace, "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason}/{.status.containerStatuses[0].state.waiting.message}"]);
            (reason.len() > 1).then_some(reason)
        },
    );
    assert!(
        reason.starts_with("ErrImagePull/") || reason.starts_with("ImagePullBackOff/"),
        "{reason}"
    );
    assert!(reason.contains("nginx:1.27"), "{reason}");
    assert_eq!(
        cluster.ok(&[
            "get",
            "pod",
            "web",
            "-n",
            &namespace,
            "-o",
            "jsonpath={.status.phase}"
        ]),
        "Pending"
    );
    cluster.ok(&[
        "delete",
        "namespace",
        &namespace,
        "--wait=true",
        "--timeout=60s",
    ]);
}
