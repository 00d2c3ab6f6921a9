//! The proxy contract, end to end: the real binary between a real client and a scripted
//! upstream.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use internal_token::{Refusal, SigningKeys, Verifier};
use reqwest::StatusCode;
use support::{Proxy, TestModel, TestToken, Upstream};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_reaches_the_model_with_path_and_query_and_without_the_credential() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t1", &["minilm"]);
    let proxy = Proxy::start(&[TestModel::new("minilm", &[upstream.addr])], &[&token]).await;

    let response = client()
        .post(proxy.url("/models/minilm/proxy/v1/embed?pretty=1"))
        .header("authorization", token.bearer())
        .body(r#"{"inputs":"hi"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(request_id.len(), 32);

    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/v1/embed?pretty=1");
    assert_eq!(seen.body_len, 15);
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("x-request-id"), Some(request_id.as_str()));
    let remaining: f64 = seen
        .header("oicm-request-timeout")
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining > 119.0 && remaining <= 120.0, "{remaining}");
}

/// Signing keys in a file of their own directory, and their public halves as a runtime holds
/// them.
fn signing_keys(keys: &SigningKeys) -> (PathBuf, Vec<u8>) {
    let dir = std::env::temp_dir().join(format!(
        "infergate-proxy-keys-{}-{}",
        std::process::id(),
        support::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("signing.json");
    write_keys(&path, keys);
    (
        path,
        serde_json::to_vec(&keys.verifying_keys().unwrap()).unwrap(),
    )
}

/// Replaces the key file in one rename, as a mounted Secret's update does.
fn write_keys(path: &std::path::Path, keys: &SigningKeys) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, keys.to_json()).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_forwarded_request_carries_a_jwt_signed_for_its_model_and_token_record() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("record-7", &["minilm"]);
    let mut keys = SigningKeys::first(SystemTime::now() - Duration::from_secs(1)).unwrap();
    let (path, _) = signing_keys(&keys);
    let proxy = Proxy::start_with_args(
        &[TestModel::new("minilm", &[upstream.addr])],
        &[&token],
        &["--internal-signing-keys", path.to_str().unwrap()],
    )
    .await;
    let send = || async {
        let response = client()
            .post(proxy.url("/models/minilm/proxy/v1/embed"))
            .header("authorization", token.bearer())
            .header("oicm-request-timeout", "30")
            .body(r#"{"inputs":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let seen = upstream.requests().pop().unwrap();
        let authorization = seen.header("authorization").unwrap().to_owned();
        (request_id, authorization)
    };

    let (request_id, authorization) = send().await;
    assert!(!authorization.contains(token.secret()));
    let jwks = serde_json::to_vec(&keys.verifying_keys().unwrap()).unwrap();
    let claims = Verifier::parse(&jwks, "minilm")
        .unwrap()
        .verify(Some(authorization.as_bytes()))
        .unwrap();
    assert_eq!(claims.sub, "record-7");
    assert_eq!(claims.rid, request_id);
    let remaining = claims.remaining(SystemTime::now()).as_secs_f64();
    assert!(remaining > 25.0 && remaining <= 30.0, "{remaining}");
    assert_eq!(
        Verifier::parse(&jwks, "another-model")
            .unwrap()
            .verify(Some(authorization.as_bytes())),
        Err(Refusal::WrongModel("another-model".into()))
    );

    // A rotation whose new key signs at once: the proxy picks it up without a restart.
    keys.rotate(SystemTime::now() - Duration::from_secs(1), Duration::ZERO)
        .unwrap();
    write_keys(&path, &keys);
    let only_the_new_key = SigningKeys {
        keys: keys.keys[1..].to_vec(),
    };
    let jwks = serde_json::to_vec(&only_the_new_key.verifying_keys().unwrap()).unwrap();
    let new_key = Verifier::parse(&jwks, "minilm").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while new_key.verify(Some(send().await.1.as_bytes())).is_err() {
        assert!(Instant::now() < deadline, "the new key was never used");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_documents_bearer_header_works_and_is_stripped_and_the_root_is_forwarded() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t1", &["minilm"]);
    let proxy = Proxy::start(&[TestModel::new("minilm", &[upstream.addr])], &[&token]).await;
    let response = client()
        .post(proxy.url("/models/minilm/proxy"))
        .header("bearer", token.secret())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.requests().pop().unwrap();
    assert_eq!(seen.target, "/");
    assert_eq!(seen.header("bearer"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_status_and_code_and_never_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let valid = TestToken::new("valid", &["minilm", "ghost"]);
    let mut expired = TestToken::new("expired", &["minilm"]);
    expired.record.expires_at = Some("2020-01-01T00:00:00Z".parse().unwrap());
    let mut revoked = TestToken::new("revoked", &["minilm"]);
    revoked.record.revoked = true;
    let elsewhere = TestToken::new("elsewhere", &["other"]);
    let unknown = TestToken::new("unknown", &["minilm"]);
    let proxy = Proxy::start(
        &[
            TestModel::new("minilm", &[upstream.addr]),
            TestModel::new("idle", &[]),
        ],
        &[&valid, &expired, &revoked, &elsewhere],
    )
    .await;

    let call = |path: &str, auth: Option<String>, timeout: Option<&str>| {
        let mut request = client().post(proxy.url(path));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        if let Some(timeout) = timeout {
            request = request.header("oicm-request-timeout", timeout);
        }
        request.send()
    };
    let m = "/models/minilm/proxy/v1/embed";
    let cases = [
        (call(m, None, None).await.unwrap(), 401, "missing_token"),
        (
            call(m, Some("Bearer igt_short".into()), None)
                .await
                .unwrap(),
            401,
            "invalid_token",
        ),
        (
            call(m, Some(unknown.bearer()), None).await.unwrap(),
            401,
            "invalid_token",
        ),
        (
            call(m, Some(expired.bearer()), None).await.unwrap(),
            401,
            "token_expired",
        ),
        (
            call(m, Some(revoked.bearer()), None).await.unwrap(),
            401,
            "token_revoked",
        ),
        (
            call(m, Some(elsewhere.bearer()), None).await.unwrap(),
            403,
            "model_not_allowed",
        ),
        (
            call("/models/ghost/proxy/v1", Some(valid.bearer()), None)
                .await
                .unwrap(),
            404,
            "model_not_found",
        ),
        (
            call(m, Some(valid.bearer()), Some("soon")).await.unwrap(),
            400,
            "invalid_timeout",
        ),
        (
            call(m, Some(valid.bearer()), Some("601")).await.unwrap(),
            400,
            "invalid_timeout",
        ),
        (
            call("/v1/embed", Some(valid.bearer()), None).await.unwrap(),
            404,
            "not_found",
        ),
    ];
    for (response, status, code) in cases {
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(
            error_code(response).await,
            (StatusCode::from_u16(status).unwrap(), code.to_owned())
        );
    }
    assert!(
        upstream.requests().is_empty(),
        "a refused request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_ready_endpoints_answers_503_with_retry_after() {
    let token = TestToken::new("t", &["idle"]);
    let proxy = Proxy::start(&[TestModel::new("idle", &[])], &[&token]).await;
    let response = client()
        .post(proxy.url("/models/idle/proxy/v1/x"))
        .header("authorization", token.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        error_code(response).await,
        (StatusCode::SERVICE_UNAVAILABLE, "no_ready_endpoint".into())
    );
}

async fn metrics_page(proxy: &Proxy) -> String {
    client()
        .get(&proxy.metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the metrics line starting with `prefix`, once `accept` takes it.
async fn metric_when(proxy: &Proxy, prefix: &str, accept: impl Fn(f64) -> bool) -> f64 {
    let started = Instant::now();
    loop {
        let page = metrics_page(proxy).await;
        let value = page
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(value) = value.filter(|v| accept(*v)) {
            return value;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{prefix} never qualified in:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_scaling_from_zero_holds_requests_until_it_has_an_endpoint() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["cold"]);
    let cold =
        |endpoints: &[SocketAddr]| TestModel::new("cold", endpoints).with("holdWhenIdle: true");
    let proxy =
        Proxy::start_with_args(&[cold(&[])], &[&token], &["--max-held-per-model", "1"]).await;
    let url = proxy.url("/models/cold/proxy/v1/x");
    let call = |timeout: &str| {
        client()
            .post(&url)
            .header("authorization", token.bearer())
            .header("OICM-Request-Timeout", timeout)
            .body("{}")
            .send()
    };

    // No pod comes within the deadline: 503 at the deadline, never a hang.
    let started = Instant::now();
    let response = call("1").await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(
        error_code(response).await,
        (StatusCode::SERVICE_UNAVAILABLE, "model_starting".into())
    );

    let held = tokio::spawn(call("60"));
    metric_when(&proxy, "infergate_proxy_held{model=\"cold\"}", |held| {
        held == 1.0
    })
    .await;
    // The queue holds one: the next request is refused at once.
    let refused = call("60").await.unwrap();
    assert_eq!(
        error_code(refused).await,
        (StatusCode::SERVICE_UNAVAILABLE, "model_starting".into())
    );
    assert!(upstream.requests().is_empty());

    // A pod gets ready: the held request goes to it.
    proxy.write_config(&[cold(&[upstream.addr])], &[&token]);
    let response = held.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests().len(), 1);
    metric_when(&proxy, "infergate_proxy_held{model=\"cold\"}", |held| {
        held == 0.0
    })
    .await;
    // Demand counts held time: the first request alone was held for a second.
    let demand = metric_when(
        &proxy,
        "infergate_proxy_demand_seconds_total{model=\"cold\"}",
        |s| s > 0.0,
    )
    .await;
    assert!(demand >= 1.0, "{demand}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_gets_504_at_the_deadline_not_when_it_answers_and_no_retry() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["slow"]);
    let proxy = Proxy::start(&[TestModel::new("slow", &[upstream.addr])], &[&token]).await;
    let started = Instant::now();
    let response = client()
        .get(proxy.url("/models/slow/proxy/sleep/10000"))
        .header("authorization", token.bearer())
        .header("oicm-request-timeout", "1")
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(
        response
            .headers()
            .get("x-should-retry")
            .map(|v| v.as_bytes()),
        Some(&b"false"[..]),
        "SDKs that retry 5xx must not run a timed-out request again"
    );
    assert_eq!(
        error_code(response).await,
        (StatusCode::GATEWAY_TIMEOUT, "timeout".into())
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_default_deadline_applies_without_the_header() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["slow"]);
    let model =
        TestModel::new("slow", &[upstream.addr]).with("timeouts: {default: 800ms, max: 5s}");
    let proxy = Proxy::start(&[model], &[&token]).await;
    let started = Instant::now();
    let response = client()
        .get(proxy.url("/models/slow/proxy/sleep/10000"))
        .header("authorization", token.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_reach_the_client_as_they_are_produced() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["chat"]);
    let proxy = Proxy::start(&[TestModel::new("chat", &[upstream.addr])], &[&token]).await;
    let started = Instant::now();
    let mut response = client()
        .get(proxy.url("/models/chat/proxy/sse/10/200"))
        .header("authorization", token.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let first = response.chunk().await.unwrap().unwrap();
    let first_after = started.elapsed();
    assert_eq!(&first[..], b"data: 0\n\n");
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    let total = started.elapsed();
    // The upstream needs 2 s for ten events; the first must not wait for the last.
    assert!(
        first_after < Duration::from_millis(500),
        "first event after {first_after:?}"
    );
    assert!(
        total >= Duration::from_millis(1800),
        "stream took {total:?}"
    );
    assert_eq!(
        String::from_utf8(rest).unwrap().matches("data: ").count(),
        9
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_runtime_reports_is_counted_per_token_and_never_reaches_the_client() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["chat"]);
    let proxy = Proxy::start(&[TestModel::new("chat", &[upstream.addr])], &[&token]).await;
    let get = |path: &str| {
        client()
            .get(proxy.url(&format!("/models/chat/proxy{path}")))
            .header("authorization", token.bearer())
            .send()
    };
    let whole = get("/usage").await.unwrap();
    assert!(whole.headers().get("infergate-usage").is_none());
    assert_eq!(whole.text().await.unwrap(), "{}");
    let mut streamed = get("/sse-usage/3").await.unwrap();
    assert_eq!(
        read_stream(&mut streamed).await,
        "data: 0\n\ndata: 1\n\ndata: 2\n\n",
        "the report, split in two pieces, is held back whole"
    );
    // A comment that only starts like a report is the client's.
    let mut lookalike = get("/sse-lookalike").await.unwrap();
    assert_eq!(
        read_stream(&mut lookalike).await,
        "data: 0\n\n: inferring\n\n"
    );
    let refused = client()
        .get(proxy.url("/models/chat/proxy/usage"))
        .header("authorization", "Bearer igt_not-a-known-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let series = |name: &str, labels: &str| format!("infergate_proxy_{name}{{{labels}}}");
    metric_when(
        &proxy,
        &series(
            "token_requests_total",
            r#"class="2xx",model="chat",token="t""#,
        ),
        |v| v == 3.0,
    )
    .await;
    let units = [("inputs", 3.0), ("completion_tokens", 3.0)];
    for (unit, amount) in units {
        let value = metric_when(
            &proxy,
            &series(
                "token_usage_total",
                &format!(r#"model="chat",token="t",unit="{unit}""#),
            ),
            |_| true,
        )
        .await;
        assert_eq!(value, amount, "{unit}");
    }
    let last_used = metric_when(
        &proxy,
        &series("token_last_used_timestamp_seconds", r#"token="t""#),
        |_| true,
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now).contains(&last_used),
        "{last_used} vs {now}"
    );
    // Only known tokens have series: an unknown one is never a label, and a token taken out
    // of the configuration takes its series with it.
    assert!(!metrics_page(&proxy).await.contains("igt_"));
    proxy.write_config(&[TestModel::new("chat", &[upstream.addr])], &[]);
    let started = Instant::now();
    while metrics_page(&proxy).await.contains("token=\"t\"") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "series of a token that is gone"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a streamed body to its end; a connection cut before the end of the chunked encoding
/// fails the test, since the contract ends SSE streams cleanly.
async fn read_stream(response: &mut reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("the stream ended cleanly") {
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_outlives_its_deadline_ends_with_an_sse_error_event() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["chat"]);
    let proxy = Proxy::start(&[TestModel::new("chat", &[upstream.addr])], &[&token]).await;
    let started = Instant::now();
    let mut response = client()
        .get(proxy.url("/models/chat/proxy/sse/1000/100"))
        .header("authorization", token.bearer())
        .header("oicm-request-timeout", "1")
        .send()
        .await
        .unwrap();
    let body = read_stream(&mut response).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    assert!(body.starts_with("data: 0\n\n"));
    assert!(
        body.ends_with("\n\n") && body.contains("event: error\ndata: {"),
        "{body}"
    );
    assert!(body.contains(r#""code":"timeout""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_ended_at_the_deadline_too() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["chat"]);
    let proxy = Proxy::start(&[TestModel::new("chat", &[upstream.addr])], &[&token]).await;
    let started = Instant::now();
    let mut response = client()
        .get(proxy.url("/models/chat/proxy/sse-then-silence"))
        .header("authorization", token.bearer())
        .header("oicm-request-timeout", "1.5")
        .send()
        .await
        .unwrap();
    let body = read_stream(&mut response).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(
        body.starts_with("data: first\n\n") && body.contains("event: error"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_models_limit_is_refused_before_the_upstream_sees_it() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["small"]);
    let proxy = Proxy::start(
        &[TestModel::new("small", &[upstream.addr]).with("maxBodyBytes: 1000")],
        &[&token],
    )
    .await;
    let over = client()
        .post(proxy.url("/models/small/proxy/v1/x"))
        .header("authorization", token.bearer())
        .body(vec![b'a'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(over).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large".into())
    );
    assert!(upstream.requests().is_empty());
    let under = client()
        .post(proxy.url("/models/small/proxy/v1/x"))
        .header("authorization", token.bearer())
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(under.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_on_another_endpoint() {
    let upstream = Upstream::start().await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[dead, upstream.addr])], &[&token]).await;
    for _ in 0..20 {
        let response = client()
            .post(proxy.url("/models/m/proxy/v1/x"))
            .header("authorization", token.bearer())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(upstream.requests().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_into_a_connection_the_runtime_just_closed_goes_out_again_on_a_new_one() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    let client = client();
    let send = |body: Vec<u8>| {
        client
            .post(proxy.url("/models/m/proxy/once-per-connection"))
            .header("authorization", token.bearer())
            .body(body)
            .send()
    };
    for _ in 0..3 {
        assert_eq!(send(vec![b'x'; 1000]).await.unwrap().status(), 200);
    }
    // Each request after the first met a pooled connection that closed under it, and went
    // out again, body and all, on a new connection.
    let seen: Vec<(usize, usize)> = upstream
        .requests()
        .iter()
        .map(|r| (r.connection, r.body_len))
        .collect();
    assert_eq!(
        seen,
        [(0, 1000), (0, 1000), (1, 1000), (1, 1000), (2, 1000)]
    );

    // A body too large to keep while it is sent cannot go out twice: a 502, no second try.
    let response = send(vec![b'x'; 100_000]).await.unwrap();
    assert_eq!(
        error_code(response).await,
        (StatusCode::BAD_GATEWAY, "upstream_error".into())
    );
    assert_eq!(upstream.requests().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_connection_fields_stay_behind_and_an_upgrade_is_served_as_plain_http() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    let answer = raw_exchange(
        &proxy,
        &format!(
            "GET /models/m/proxy/v1/x HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\n\
             Connection: Upgrade, X-Hop, close\r\nUpgrade: websocket\r\nX-Hop: 1\r\nTE: trailers\r\n\
             Keep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n",
            token.bearer()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let seen = &upstream.requests()[0];
    for dropped in [
        "connection",
        "upgrade",
        "x-hop",
        "te",
        "keep-alive",
        "authorization",
    ] {
        assert_eq!(seen.header(dropped), None, "{dropped} reached the runtime");
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));

    let answer = raw_exchange(&proxy, "CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    assert!(answer.contains("method_not_allowed"), "{answer}");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_endpoint_is_503() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[dead])], &[&token]).await;
    let response = client()
        .post(proxy.url("/models/m/proxy/v1/x"))
        .header("authorization", token.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable".into()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_in_the_file_is_refused_within_a_second() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let models = [TestModel::new("m", &[upstream.addr])];
    let proxy = Proxy::start(&models, &[&token]).await;
    let call = || {
        client()
            .post(proxy.url("/models/m/proxy/v1/x"))
            .header("authorization", token.bearer())
            .send()
    };
    assert_eq!(call().await.unwrap().status(), 200);

    let mut revoked = token.clone();
    revoked.record.revoked = true;
    proxy.write_config(&models, &[&revoked]);
    let changed = Instant::now();
    loop {
        let response = call().await.unwrap();
        if response.status() == 401 {
            assert_eq!(error_code(response).await.1, "token_revoked");
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "still accepted {:?} after revocation",
            changed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("revocation took effect after {:?}", changed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_file_keeps_the_last_good_one() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    std::fs::write(
        &proxy.config,
        "models: [{id: m, endpoints: [not-an-address]}]",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let response = client()
        .post(proxy.url("/models/m/proxy/v1/x"))
        .header("authorization", token.bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(proxy.output().contains("keeping the last good one"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    assert_eq!(
        client()
            .get(proxy.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(proxy.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    client()
        .post(proxy.url("/models/m/proxy/v1/x"))
        .header("authorization", token.bearer())
        .send()
        .await
        .unwrap();
    client()
        .post(proxy.url("/models/m/proxy/v1/x"))
        .send()
        .await
        .unwrap();
    let metrics = metrics_page(&proxy).await;
    for line in [
        r#"infergate_proxy_requests_total{code="200",model="m"} 1"#,
        r#"infergate_proxy_auth_failures_total{reason="missing_token"} 1"#,
        r#"infergate_proxy_inflight{model="m"} 0"#,
        "infergate_proxy_request_duration_seconds_bucket",
        "infergate_proxy_upstream_ttfb_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_error_path_writes_the_token_to_logs_bodies_or_metrics() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("leaky", &["m"]);
    let keys = SigningKeys::first(SystemTime::now() - Duration::from_secs(1)).unwrap();
    let (keys_path, _) = signing_keys(&keys);
    // At TRACE, where the framework's own logs (pingora, hyper, kube) are on too; signing each
    // forward for the runtime.
    let proxy = Proxy::start_logged(
        &[
            TestModel::new("m", &[upstream.addr]),
            TestModel::new("idle", &[]),
        ],
        &[&token],
        &["--internal-signing-keys", keys_path.to_str().unwrap()],
        "trace",
    )
    .await;
    let secret = token.secret().to_owned();
    let mut bodies = String::new();
    // Where clients put tokens by mistake: the query string and the body. pingora's own debug
    // and trace lines print those; the proxy caps them at info.
    for (path, body) in [
        (
            format!("/models/m/proxy/v1/x?api_key={secret}"),
            String::new(),
        ),
        (
            "/models/m/proxy/v1/x".to_owned(),
            format!(r#"{{"api_key": "{secret}"}}"#),
        ),
    ] {
        // Forwarded as sent (the upstream echoes it back): only the logs are judged here.
        let response = client()
            .post(proxy.url(&path))
            .header("authorization", format!("Bearer {secret}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let paths = [
        "/models/m/proxy/v1/x",
        "/models/other/proxy/v1/x",
        "/models/idle/proxy/v1/x",
        "/elsewhere",
        "/models/m/proxy/sleep/5000",
    ];
    for path in paths {
        for header in ["authorization", "bearer"] {
            let value = if header == "authorization" {
                format!("Bearer {secret}")
            } else {
                secret.clone()
            };
            let typo = format!("{}x", &value[..value.len() - 1]);
            for value in [value.as_str(), typo.as_str()] {
                let response = client()
                    .post(proxy.url(path))
                    .header(header, value)
                    .header(
                        "oicm-request-timeout",
                        if path.contains("sleep") { "0.3" } else { "bad" },
                    )
                    .send()
                    .await
                    .unwrap();
                bodies.push_str(&response.text().await.unwrap());
            }
        }
    }
    let expired = proxy_token_expired(&token);
    proxy.write_config(&[TestModel::new("m", &[upstream.addr])], &[&expired]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    bodies.push_str(
        &client()
            .post(proxy.url("/models/m/proxy/v1/x"))
            .header("authorization", token.bearer())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    bodies.push_str(&metrics_page(&proxy).await);
    assert!(
        bodies.contains("token_expired"),
        "the expired path was exercised"
    );

    let logs = proxy.output();
    assert!(
        logs.contains("token=leaky"),
        "logs name the token by its id:\n{logs}"
    );
    for (what, text) in [("logs", &logs), ("responses and metrics", &bodies)] {
        let leaks = e2e::canary::token_leaks(&secret, text);
        assert!(leaks.is_empty(), "the token leaked into {what}: {leaks:?}");
    }
    // The JWTs it signed reached the runtime and nothing else.
    let jwts: Vec<String> = upstream
        .requests()
        .iter()
        .filter_map(|seen| {
            seen.header("authorization")?
                .strip_prefix("Bearer ")
                .map(str::to_owned)
        })
        .collect();
    assert!(jwts.len() >= 3, "{} forwarded requests signed", jwts.len());
    for jwt in &jwts {
        let leaks = e2e::canary::jwt_leaks(jwt, &logs);
        assert!(leaks.is_empty(), "a JWT leaked into the logs: {leaks:?}");
    }
}

fn proxy_token_expired(token: &TestToken) -> TestToken {
    let mut expired = token.clone();
    expired.record.expires_at = Some("2020-01-01T00:00:00Z".parse().unwrap());
    expired
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_accepted_requests_finish_then_exits() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let mut proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    let in_flight: Vec<_> = (0..5)
        .map(|_| {
            let request = client()
                .get(proxy.url("/models/m/proxy/sleep/1500"))
                .header("authorization", token.bearer());
            tokio::spawn(async move { request.send().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("TERM");
    for request in in_flight {
        let response = request
            .await
            .unwrap()
            .expect("an accepted request was dropped");
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "done");
    }
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the proxy did not exit after draining");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    let url = proxy.url("/models/m/proxy/v1/x");

    let mut many = client().post(&url).header("authorization", token.bearer());
    for i in 0..100 {
        many = many.header(format!("x-filler-{i}"), "1");
    }
    assert_eq!(
        error_code(many.send().await.unwrap()).await,
        (
            StatusCode::from_u16(431).unwrap(),
            "headers_too_large".into()
        )
    );

    let big = client()
        .post(&url)
        .header("authorization", token.bearer())
        .header("x-filler", "a".repeat(70 * 1024));
    assert_eq!(
        error_code(big.send().await.unwrap()).await.1,
        "headers_too_large"
    );

    let within = client()
        .post(&url)
        .header("authorization", token.bearer())
        .header("x-filler", "a".repeat(60 * 1024));
    assert_eq!(within.send().await.unwrap().status(), 200);
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_passes_whole_when_within_the_models_limit() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["audio"]);
    let model = TestModel::new("audio", &[upstream.addr]).with("maxBodyBytes: 67108864");
    let proxy = Proxy::start(&[model], &[&token]).await;
    let body = vec![b'x'; 40 * 1024 * 1024];
    let response = client()
        .post(proxy.url("/models/audio/proxy/v1/transcript"))
        .header("authorization", token.bearer())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.requests().pop().unwrap().body_len,
        40 * 1024 * 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_sse_stream_finish() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["chat"]);
    let mut proxy = Proxy::start(&[TestModel::new("chat", &[upstream.addr])], &[&token]).await;
    let mut response = client()
        .get(proxy.url("/models/chat/proxy/sse/8/200"))
        .header("authorization", token.bearer())
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: 0\n\n");
    proxy.signal("TERM");
    let rest = read_stream(&mut response).await;
    assert_eq!(rest.matches("data: ").count(), 7, "{rest}");
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the proxy did not exit after the stream");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_new_connections_are_served_until_clients_stop_coming_then_it_exits() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let mut proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    proxy.signal("TERM");
    let signalled = Instant::now();
    // A client still routed here (a load balancer has not yet seen readiness go false),
    // opening a new connection for every request for 1.5 s.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // The signal is handled asynchronously: a request that arrives with it may still be
    // answered as before. Readiness tells when the lame duck has begun.
    loop {
        let readiness = fresh.get(proxy.url("/readyz")).send().await;
        let readiness = readiness.expect("a connection made after SIGTERM was refused or reset");
        if readiness.text().await.unwrap() == r#"{"status":"draining"}"# {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "readiness never turned"
        );
    }
    let mut served = 0;
    while signalled.elapsed() < Duration::from_millis(1500) {
        let response = fresh
            .get(proxy.url("/models/m/proxy/sleep/20"))
            .header("authorization", token.bearer())
            .send()
            .await
            .expect("a connection made after SIGTERM was refused or reset");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["connection"], "close");
        served += 1;
    }
    let readiness = fresh.get(proxy.url("/readyz")).send().await.unwrap();
    assert_eq!(readiness.status(), 503);
    assert_eq!(readiness.text().await.unwrap(), r#"{"status":"draining"}"#);
    assert!(served > 10, "{served}");
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the proxy did not exit once clients stopped coming");
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "{:?}",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_200_requests_in_flight_fails_and_truncates_none() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let mut proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    // 150 unary requests that take 1.5 s and 50 streams of 8 events 200 ms apart.
    let unary: Vec<_> = (0..150)
        .map(|_| {
            let request = client()
                .get(proxy.url("/models/m/proxy/sleep/1500"))
                .header("authorization", token.bearer());
            tokio::spawn(async move {
                let response = request.send().await?;
                let status = response.status();
                Ok::<_, reqwest::Error>((status, response.text().await?))
            })
        })
        .collect();
    let streams: Vec<_> = (0..50)
        .map(|_| {
            let request = client()
                .get(proxy.url("/models/m/proxy/sse/8/200"))
                .header("authorization", token.bearer());
            tokio::spawn(async move {
                let mut response = request.send().await?;
                let status = response.status();
                Ok::<_, reqwest::Error>((status, read_stream(&mut response).await))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.signal("TERM");
    let (mut failed, mut truncated) = (0, 0);
    for request in unary {
        match request.await.unwrap() {
            Ok((status, body)) if status == 200 => truncated += usize::from(body != "done"),
            _ => failed += 1,
        }
    }
    for stream in streams {
        match stream.await.unwrap() {
            Ok((status, body)) if status == 200 => {
                truncated += usize::from(body.matches("data: ").count() != 8)
            }
            _ => failed += 1,
        }
    }
    assert_eq!(
        (failed, truncated),
        (0, 0),
        "of 200 requests in flight at SIGTERM"
    );
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the proxy did not exit after draining");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_connection_is_closed_after_the_keepalive_idle_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start_with_args(
        &[TestModel::new("m", &[upstream.addr])],
        &[&token],
        &["--keepalive-idle", "1"],
    )
    .await;
    let mut connection = connect(&proxy).await;
    let request = format!(
        "GET /models/m/proxy/v1/x HTTP/1.1\r\nHost: test\r\nAuthorization: {}\r\n\r\n",
        token.bearer()
    );
    connection.write_all(request.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 4096];
    let n = connection.read(&mut response).await.unwrap();
    assert!(String::from_utf8_lossy(&response[..n]).starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), connection.read(&mut response)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle connection was not closed: {closed:?}"
    );
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
}

/// Sends raw bytes on a fresh connection and returns everything the proxy answers until it
/// closes the connection (or 3 s pass).
async fn raw_exchange(proxy: &Proxy, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connection = connect(proxy).await;
    connection.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), connection.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_or_malformed_content_length_is_refused_and_never_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    let head = format!(
        "POST /models/m/proxy/v1/x HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\n",
        token.bearer()
    );
    for framing in [
        "Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        "Content-Length: -4\r\n\r\nabcd",
    ] {
        let answer = raw_exchange(&proxy, &format!("{head}{framing}")).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{framing:?} was answered {answer:?}"
        );
    }
    assert!(
        upstream.requests().is_empty(),
        "an ambiguous request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_gets_400_and_a_closed_connection() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    // A smuggling attempt: by Content-Length the body is "0\r\n\r", by chunked it is empty and
    // a second request follows. Neither reading may be served.
    let second = format!(
        "GET /models/m/proxy/smuggled HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\n\r\n",
        token.bearer()
    );
    let request = format!(
        "POST /models/m/proxy/v1/x HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{second}",
        token.bearer()
    );
    let answer = raw_exchange(&proxy, &request).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        answer.contains(r#""code":"conflicting_framing""#),
        "{answer}"
    );
    assert!(
        upstream.requests().is_empty(),
        "the request reached the upstream"
    );
    assert!(!proxy.output().contains(token.secret()));
}

async fn connect(proxy: &Proxy) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(proxy.url.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Writes `bytes` one at a time, `pause` apart, and returns how long after the first byte the
/// proxy closed the connection (None if it was still open when the bytes ran out).
async fn trickle(
    connection: &mut tokio::net::TcpStream,
    bytes: &[u8],
    pause: Duration,
) -> Option<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    for byte in bytes {
        if connection.write_all(&[*byte]).await.is_err() {
            return Some(started.elapsed());
        }
        let mut answer = [0u8; 256];
        match tokio::time::timeout(pause, connection.read(&mut answer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => panic!("the proxy answered a request head it never fully received"),
            Err(_) => {}
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_trickling_in_is_cut_off_at_the_header_read_timeout() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start_with_args(
        &[TestModel::new("m", &[upstream.addr])],
        &[&token],
        &["--header-read-timeout", "1"],
    )
    .await;
    // One byte every 200 ms: each read is quick, the head as a whole is not.
    let head = format!(
        "GET /models/m/proxy/v1/x HTTP/1.1\r\nHost: test\r\nAuthorization: {}\r\n\r\n",
        token.bearer()
    );
    let closed = trickle(
        &mut connect(&proxy).await,
        head.as_bytes(),
        Duration::from_millis(200),
    )
    .await
    .expect("the connection stayed open while the head trickled in");
    assert!(
        closed >= Duration::from_millis(800) && closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
    // A connection that sends nothing at all is closed on the same clock.
    let silent = trickle(&mut connect(&proxy).await, b"G", Duration::from_secs(4)).await;
    assert!(
        silent.is_some_and(|after| after < Duration::from_millis(2500)),
        "{silent:?}"
    );
    assert!(upstream.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timer_restarts_for_each_request_on_a_kept_alive_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start_with_args(
        &[TestModel::new("m", &[upstream.addr])],
        &[&token],
        &["--header-read-timeout", "1"],
    )
    .await;
    let mut connection = connect(&proxy).await;
    let request = format!(
        "GET /models/m/proxy/v1/x HTTP/1.1\r\nHost: test\r\nAuthorization: {}\r\n\r\n",
        token.bearer()
    );
    // Idle between requests longer than the header timeout: only the keep-alive idle time
    // (60 s) governs there, and each head arriving promptly is served.
    for _ in 0..3 {
        connection.write_all(request.as_bytes()).await.unwrap();
        let mut response = vec![0u8; 4096];
        let n = connection.read(&mut response).await.unwrap();
        assert!(
            String::from_utf8_lossy(&response[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&response[..n])
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(upstream.requests().len(), 3);
    // The fourth head trickles in: its own clock, started by its first byte, cuts it off.
    let closed = trickle(
        &mut connection,
        request.as_bytes(),
        Duration::from_millis(200),
    )
    .await
    .expect("a trickling head on a kept-alive connection was not cut off");
    assert!(
        closed >= Duration::from_millis(800) && closed < Duration::from_millis(2500),
        "closed after {closed:?}"
    );
}
