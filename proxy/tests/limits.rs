//! Per-token limits as one limit across proxy replicas: three proxies serving one token, with
//! no store (each enforces a third) and with a real Redis (`redis-server`, installed by
//! scripts/setup.sh) counting for all three; the admitted rate under overload, concurrency,
//! generation tokens per minute, and a store that goes away.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crds::TokenLimits;
use support::{Proxy, TestModel, TestToken, Upstream, free_port};

/// A `redis-server` of this test, without persistence; killed when dropped.
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    async fn start() -> Redis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup.sh installs it)");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Redis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn limited(limits: TokenLimits) -> TestToken {
    let mut token = TestToken::new("limited", &["m"]);
    token.record.limits = Some(limits);
    token
}

async fn replicas(
    upstream: &Upstream,
    token: &TestToken,
    store: Option<&Redis>,
    count: usize,
) -> Vec<Proxy> {
    let mut args = Vec::new();
    if let Some(redis) = store {
        args = vec!["--limits-store", redis.url.as_str()];
    }
    let mut proxies = Vec::new();
    for _ in 0..count {
        let proxy = Proxy::start_replica(
            &[TestModel::new("m", &[upstream.addr])],
            &[token],
            &args,
            "info",
            count,
        )
        .await;
        if store.is_some() {
            // It connects in the background: counts go to the store from then on.
            until_metric(&proxy, "infergate_proxy_limits_store_up 1").await;
        }
        proxies.push(proxy);
    }
    proxies
}

/// Waits until the proxy's metrics show `line`. Its metrics listener is a service of its own,
/// which may start answering a moment after the proxy's `/readyz`: until then, no page.
async fn until_metric(proxy: &Proxy, line: &str) {
    let started = Instant::now();
    loop {
        let page = match reqwest::get(&proxy.metrics_url).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if page.lines().any(|l| l == line) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no {line:?} in\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests answered 200 per second while `clients` per proxy keep asking as fast as they
/// get answers, counted over `measured` after `warm_up` (which spends the burst).
async fn admitted_rate(
    proxies: &[Proxy],
    token: &TestToken,
    clients: usize,
    warm_up: Duration,
    measured: Duration,
) -> f64 {
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for proxy in proxies {
        for _ in 0..clients {
            let (counting, stop, admitted) = (counting.clone(), stop.clone(), admitted.clone());
            let url = proxy.url("/models/m/proxy/ok");
            let bearer = token.bearer();
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = client
                        .get(&url)
                        .header("authorization", &bearer)
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    assert!(matches!(status, 200 | 429), "{status}");
                    if status == 200 && counting.load(Ordering::Relaxed) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    tokio::time::sleep(warm_up).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(measured).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    admitted.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

fn assert_within_5_percent(rate: f64, limit_per_second: f64, what: &str) {
    let error = (rate - limit_per_second).abs() / limit_per_second;
    assert!(
        error <= 0.05,
        "{what}: admitted {rate:.2}/s for a limit of {limit_per_second}/s ({:.1} % off)",
        error * 100.0
    );
    eprintln!(
        "{what}: admitted {rate:.2}/s for a limit of {limit_per_second}/s ({:+.2} %)",
        (rate / limit_per_second - 1.0) * 100.0
    );
}

const RATE_LIMIT: TokenLimits = TokenLimits {
    // 30 a second for all replicas together.
    requests_per_minute: Some(1800),
    concurrent_requests: None,
    tokens_per_minute: None,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_without_a_store_admit_one_limit_in_total() {
    let upstream = Upstream::start().await;
    let token = limited(RATE_LIMIT);
    let proxies = replicas(&upstream, &token, None, 3).await;
    let rate = admitted_rate(
        &proxies,
        &token,
        3,
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await;
    assert_within_5_percent(rate, 30.0, "3 replicas, each its share");
    // What a refusal says: the code of the limit, when to come back, this replica's share. The
    // bucket refills while idle, so requests go out until one is over (its burst is 10 and it
    // refills 10 a second: far fewer than 100 sent back to back).
    let client = reqwest::Client::new();
    let mut refused = None;
    for _ in 0..100 {
        let response = client
            .get(proxies[0].url("/models/m/proxy/ok"))
            .header("authorization", token.bearer())
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
    }
    let refused = refused.expect("a refusal within 100 requests");
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "requests_per_minute_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(600 enforced by this proxy)"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_a_shared_store_admit_one_limit_in_total() {
    let redis = Redis::start().await;
    let upstream = Upstream::start().await;
    let token = limited(RATE_LIMIT);
    let proxies = replicas(&upstream, &token, Some(&redis), 3).await;
    let rate = admitted_rate(
        &proxies,
        &token,
        3,
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await;
    assert_within_5_percent(rate, 30.0, "3 replicas, one store");
    // With the store, one replica alone gets the whole limit: the count is global.
    let rate = admitted_rate(
        &proxies[..1],
        &token,
        6,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .await;
    assert_within_5_percent(rate, 30.0, "1 of 3 replicas, one store");
}

/// Sends `count` requests that each take two seconds upstream at once, spread over `proxies`;
/// their statuses.
async fn at_once(proxies: &[Proxy], token: &TestToken, count: usize) -> Vec<u16> {
    let requests = (0..count).map(|i| {
        let url = proxies[i % proxies.len()].url("/models/m/proxy/sleep/2000");
        let bearer = token.bearer();
        async move {
            reqwest::Client::new()
                .get(url)
                .header("authorization", bearer)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    futures::future::join_all(requests).await
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_one_limit_across_replicas_with_and_without_a_store() {
    let upstream = Upstream::start().await;
    let token = limited(TokenLimits {
        concurrent_requests: Some(6),
        ..TokenLimits::default()
    });
    // No store: 2 at a time on each of 3 replicas.
    let proxies = replicas(&upstream, &token, None, 3).await;
    let statuses = at_once(&proxies, &token, 12).await;
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (6, 6),
        "{statuses:?}"
    );
    let statuses = at_once(&proxies[..1], &token, 4).await;
    assert_eq!(
        count(&statuses, 200),
        2,
        "one replica, its share: {statuses:?}"
    );
    drop(proxies);

    // A store: 6 at a time however they spread, and the slots come back at the end.
    let redis = Redis::start().await;
    let proxies = replicas(&upstream, &token, Some(&redis), 3).await;
    let statuses = at_once(&proxies[..1], &token, 9).await;
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 429)),
        (6, 3),
        "{statuses:?}"
    );
    let statuses = at_once(&proxies, &token, 12).await;
    assert_eq!(count(&statuses, 200), 6, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_tokens_are_charged_when_the_answer_ends_and_the_debt_is_waited_out() {
    let upstream = Upstream::start().await;
    // 6000 a minute: 100 a second. One answer of 1000 tokens is 10 s of it.
    let token = limited(TokenLimits {
        tokens_per_minute: Some(6000),
        ..TokenLimits::default()
    });
    let redis = Redis::start().await;
    for store in [None, Some(&redis)] {
        let proxies = replicas(&upstream, &token, store, 1).await;
        let get = || {
            reqwest::Client::new()
                .get(proxies[0].url("/models/m/proxy/generated"))
                .header("authorization", token.bearer())
                .send()
        };
        assert_eq!(get().await.unwrap().status(), 200);
        let refused = get().await.unwrap();
        assert_eq!(refused.status(), 429, "store: {}", store.is_some());
        let retry_after: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((9..=10).contains(&retry_after), "{retry_after}");
        let body: serde_json::Value =
            serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "tokens_per_minute_exceeded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_away_is_reported_and_the_failure_policy_applies() {
    let mut redis = Redis::start().await;
    let upstream = Upstream::start().await;
    let token = limited(TokenLimits {
        requests_per_minute: Some(60_000),
        ..TokenLimits::default()
    });
    let url = redis.url.clone();
    let closed = Proxy::start_with_args(
        &[TestModel::new("m", &[upstream.addr])],
        &[&token],
        &["--limits-store", &url, "--limits-store-failure", "closed"],
    )
    .await;
    let get = || {
        reqwest::Client::new()
            .get(closed.url("/models/m/proxy/ok"))
            .header("authorization", token.bearer())
            .send()
    };
    until_metric(&closed, "infergate_proxy_limits_store_up 1").await;
    assert_eq!(get().await.unwrap().status(), 200);

    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let refused = get().await.unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "limits_unavailable");
    until_metric(&closed, "infergate_proxy_limits_store_up 0").await;
}
