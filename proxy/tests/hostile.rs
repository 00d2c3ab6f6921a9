//! Hostile clients and broken upstreams, end to end: paths that try to leave their model, bodies
//! that try to become requests, upstreams that die or answer garbage.

mod support;

use std::time::Duration;

use support::{Proxy, TestModel, TestToken, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` on one connection and returns every byte the proxy answers until it closes
/// the connection or goes quiet for a second.
async fn exchange(proxy: &Proxy, request: &[u8]) -> String {
    let mut connection = tokio::net::TcpStream::connect(proxy.url.trim_start_matches("http://"))
        .await
        .unwrap();
    connection.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 65536];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_secs(1), connection.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_model_never_reaches_another_by_any_spelling_of_the_path() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let token = TestToken::new("t", &["a"]);
    let proxy = Proxy::start(
        &[
            TestModel::new("a", &[a.addr]),
            TestModel::new("b", &[b.addr]),
        ],
        &[&token],
    )
    .await;
    let targets = [
        "/models/b/proxy/v1/x",
        "/models/a/proxy/../../models/b/proxy/v1/x",
        "/models/a/../b/proxy/v1/x",
        "/models/./b/proxy/v1/x",
        "/models/a/proxy/%2e%2e/%2e%2e/models/b/proxy/v1/x",
        "/models/a/proxy/%2E%2E/%2E%2E/models/b/proxy/v1/x",
        "/models/a%2f..%2fb/proxy/v1/x",
        "/models/a/proxy/..%2f..%2fmodels%2fb%2fproxy%2fv1%2fx",
        "//models/b/proxy/v1/x",
        "/models//b/proxy/v1/x",
        "/models/b;a/proxy/v1/x",
        "/models/a;/../b/proxy/v1/x",
        "/models/a\\..\\b/proxy/v1/x",
        "/models/a/proxy/..\\..\\models\\b\\proxy\\v1\\x",
        "/Models/b/proxy/v1/x",
        "/MODELS/B/PROXY/v1/x",
        "/models/B/proxy/v1/x",
        "/models/%62/proxy/v1/x",
        "http://t/models/b/proxy/v1/x",
    ];
    for target in targets {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            token.bearer()
        );
        let answer = exchange(&proxy, request.as_bytes()).await;
        let status = status_of(&answer);
        assert!((400..500).contains(&status), "{target} → {answer}");
        assert!(
            b.requests().is_empty(),
            "{target} reached model b: {:?}",
            b.requests()
        );
    }
    // Whatever spelling, nothing climbed out of model a's API either.
    assert!(a.requests().is_empty(), "{:?}", a.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_after_an_early_refusal_is_never_read_as_the_next_request() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let other = TestToken::new("o", &["elsewhere"]);
    let proxy = Proxy::start(
        &[
            TestModel::new("m", &[upstream.addr]).with("maxBodyBytes: 64"),
            TestModel::new("elsewhere", &[upstream.addr]),
        ],
        &[&token, &other],
    )
    .await;
    // The body is a whole request with a valid token: a proxy that answers early and then
    // parses the unread body as the connection's next request would forward it.
    let smuggled = format!(
        "GET /models/m/proxy/smuggled HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\n\r\n",
        token.bearer()
    );
    let padded = format!("{smuggled}{}", " ".repeat(100));
    let refusals = [
        (
            401,
            "POST /models/m/proxy/v1/x",
            "Bearer igt_not_a_token".to_owned(),
        ),
        (403, "POST /models/m/proxy/v1/x", other.bearer()),
        (404, "POST /nowhere", token.bearer()),
        (413, "POST /models/m/proxy/v1/x", token.bearer()),
    ];
    for (status, line, auth) in &refusals {
        let status = *status;
        let body = if status == 413 { &padded } else { &smuggled };
        for framing in ["length", "chunked"] {
            let request = match framing {
                "length" => format!(
                    "{line} HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
                _ => format!(
                    "{line} HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                ),
            };
            let answer = exchange(&proxy, request.as_bytes()).await;
            assert_eq!(status_of(&answer), status, "{line} ({framing}) → {answer}");
            assert_eq!(
                answer.matches("HTTP/1.1 ").count(),
                1,
                "{line} ({framing}): the body was answered as a request: {answer}"
            );
        }
    }
    assert!(
        upstream.requests().is_empty(),
        "a body reached the upstream as a request: {:?}",
        upstream.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_dies_is_a_502_a_cut_body_or_an_sse_error_event() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    let get = |path: &str| {
        format!(
            "GET /models/m/proxy/{path} HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\n\r\n",
            token.bearer()
        )
    };

    let answer = exchange(&proxy, get("die-before-head").as_bytes()).await;
    assert_eq!(status_of(&answer), 502, "{answer}");
    assert!(answer.contains(r#""code":"upstream_error""#), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "the connection closes after a failed exchange and says so: {answer}"
    );

    // The head had gone out as 200: the body is cut short and the connection closed, so that
    // no client can take the partial body for a whole one.
    let answer = exchange(&proxy, get("die-mid-body").as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    assert!(body.len() < 1000, "{answer}");

    let answer = exchange(&proxy, get("sse-then-die").as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let first = answer.find("data: first").expect("the first event arrived");
    let error = answer
        .find("event: error\ndata: ")
        .expect("an error event followed");
    assert!(first < error, "{answer}");
    assert!(answer.contains(r#""code":"upstream_error""#), "{answer}");
    assert!(
        answer.ends_with("0\r\n\r\n"),
        "the stream did not end cleanly: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_upstream_answer_is_a_502_and_its_connection_is_not_reused() {
    let upstream = Upstream::start().await;
    let token = TestToken::new("t", &["m"]);
    let proxy = Proxy::start(&[TestModel::new("m", &[upstream.addr])], &[&token]).await;
    let client = reqwest::Client::new();
    let get = |path: &str| {
        client
            .get(proxy.url(&format!("/models/m/proxy/{path}")))
            .header("Authorization", token.bearer())
            .send()
    };
    assert_eq!(get("first").await.unwrap().status(), 200);
    let garbage = get("garbage").await.unwrap();
    assert_eq!(garbage.status(), 502);
    for _ in 0..3 {
        assert_eq!(get("after").await.unwrap().status(), 200);
    }
    let seen = upstream.requests();
    let broken = seen.iter().find(|s| s.target == "/garbage").unwrap();
    assert!(
        seen.iter()
            .filter(|s| s.target == "/after")
            .all(|s| s.connection != broken.connection),
        "a connection that answered garbage was used again: {seen:?}"
    );
}
