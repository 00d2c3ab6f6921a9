//! With `--internal-keys`, the runtime answers only requests that carry a JWT the proxy signed
//! for its model: a caller that reaches the pod's port directly gets 401 before any work.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use internal_token::{Claims, Forwarded, LEEWAY, LIFETIME, Signer, SigningKeys};
use serde_json::Value;
use support::Runtime;

const MODEL: &str = "tiny-bert-v1";

/// Keys whose first one signs already, and the runtime holding their public halves.
struct Signed {
    keys: SigningKeys,
    jwks: PathBuf,
    runtime: Runtime,
}

fn write_jwks(path: &Path, keys: &SigningKeys) {
    let partial = path.with_extension("partial");
    std::fs::write(
        &partial,
        serde_json::to_vec(&keys.verifying_keys().unwrap()).unwrap(),
    )
    .unwrap();
    std::fs::rename(&partial, path).unwrap();
}

async fn signed_runtime() -> Signed {
    let dir = std::env::temp_dir().join(format!(
        "infergate-runtime-keys-{}-{}",
        std::process::id(),
        support::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    let keys = SigningKeys::first(SystemTime::now() - Duration::from_secs(3600)).unwrap();
    write_jwks(&jwks, &keys);
    let runtime = Runtime::start(&[
        "--model-id",
        MODEL,
        "--internal-keys",
        jwks.to_str().unwrap(),
    ])
    .await;
    Signed {
        keys,
        jwks,
        runtime,
    }
}

/// A JWT for `model` signed at `signed_at` with `keys`, with 30 s left of its deadline.
fn jwt(keys: &SigningKeys, model: &str, signed_at: SystemTime) -> String {
    let claims = Claims::new(
        Forwarded {
            model_version_id: model,
            token_record_id: "record-1",
            request_id: "request-1",
            remaining: Duration::from_secs(30),
        },
        signed_at,
    );
    Signer::new(keys).unwrap().sign(&claims, signed_at).unwrap()
}

/// Status and error code of an embedding request carrying `authorization`.
async fn embed(runtime: &Runtime, authorization: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/embed", runtime.url))
        .header("content-type", "application/json")
        .body(r#"{"inputs":"hello"}"#);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if status == 401 {
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="infergate-runtime""#
        );
    }
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_proxy_signed_for_this_model_is_served() {
    let signed = signed_runtime().await;
    let bearer = format!("Bearer {}", jwt(&signed.keys, MODEL, SystemTime::now()));
    assert_eq!(
        embed(&signed.runtime, Some(&bearer)).await,
        (200, String::new())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_call_without_a_jwt_is_refused_before_any_work() {
    let signed = signed_runtime().await;
    assert_eq!(
        embed(&signed.runtime, None).await,
        (401, "internal_token_missing".into())
    );
    assert_eq!(
        embed(&signed.runtime, Some("Bearer igt_a_client_token")).await,
        (401, "internal_token_invalid".into())
    );
    let info = reqwest::get(format!("{}/info", signed.runtime.url))
        .await
        .unwrap();
    assert_eq!(
        info.status(),
        401,
        "the model's description is behind the JWT too"
    );
    let metrics = reqwest::get(format!("{}/metrics", signed.runtime.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"infergate_runtime_requests_total{endpoint="/embed",status="401"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("infergate_runtime_inference_seconds_count 0"),
        "no model pass ran: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_jwt_and_one_for_another_model_are_refused() {
    let signed = signed_runtime().await;
    let long_ago = SystemTime::now() - LIFETIME - LEEWAY - Duration::from_secs(5);
    let expired = format!("Bearer {}", jwt(&signed.keys, MODEL, long_ago));
    assert_eq!(
        embed(&signed.runtime, Some(&expired)).await,
        (401, "internal_token_expired".into())
    );
    let elsewhere = format!(
        "Bearer {}",
        jwt(&signed.keys, "another-model", SystemTime::now())
    );
    assert_eq!(
        embed(&signed.runtime, Some(&elsewhere)).await,
        (401, "internal_token_wrong_model".into())
    );
    let stranger = SigningKeys::first(SystemTime::UNIX_EPOCH).unwrap();
    let forged = format!("Bearer {}", jwt(&stranger, MODEL, SystemTime::now()));
    assert_eq!(
        embed(&signed.runtime, Some(&forged)).await,
        (401, "internal_token_unknown_key".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_stay_open_to_probes_and_scrapers() {
    let signed = signed_runtime().await;
    for path in ["/health", "/metrics"] {
        let response = reqwest::get(format!("{}{path}", signed.runtime.url))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_is_accepted_once_its_public_half_is_written_without_a_restart() {
    let mut signed = signed_runtime().await;
    let mut next = signed.keys.clone();
    next.rotate(SystemTime::now() - Duration::from_secs(1), Duration::ZERO)
        .unwrap();
    let only_new = SigningKeys {
        keys: next.keys[1..].to_vec(),
    };
    let bearer = format!("Bearer {}", jwt(&only_new, MODEL, SystemTime::now()));
    assert_eq!(
        embed(&signed.runtime, Some(&bearer)).await.0,
        401,
        "not published yet"
    );
    write_jwks(&signed.jwks, &next);
    signed.keys = next;
    let deadline = Instant::now() + Duration::from_secs(10);
    while embed(&signed.runtime, Some(&bearer)).await.0 != 200 {
        assert!(Instant::now() < deadline, "the new key was never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = format!(
        "Bearer {}",
        jwt(
            &SigningKeys {
                keys: signed.keys.keys[..1].to_vec()
            },
            MODEL,
            SystemTime::now()
        )
    );
    assert_eq!(
        embed(&signed.runtime, Some(&old)).await.0,
        200,
        "the old key verifies through the overlap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_comes_from_the_jwt_not_from_a_header_anyone_can_set() {
    let signed = signed_runtime().await;
    let now = SystemTime::now();
    let claims = Claims::new(
        Forwarded {
            model_version_id: MODEL,
            token_record_id: "record-1",
            request_id: "request-1",
            remaining: Duration::ZERO,
        },
        now,
    );
    let bearer = format!(
        "Bearer {}",
        Signer::new(&signed.keys)
            .unwrap()
            .sign(&claims, now)
            .unwrap()
    );
    let response = reqwest::Client::new()
        .post(format!("{}/embed", signed.runtime.url))
        .header("content-type", "application/json")
        .header("authorization", bearer)
        .header("oicm-request-timeout", "600")
        .body(r#"{"inputs":"hello"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504, "the signed deadline has passed");
}
