//! Autoscaling on the cluster test bed, black box: a text-generation ModelDeployment with
//! `autoscaling` (0 to 3 replicas, 2 requests in flight per replica) under a load that ramps
//! from nothing to enough for 3 replicas and back to nothing. The chart's operator reads the
//! chart's proxy pod, the node agent runs the runtime pods, and a client counts every answer.
//!
//! Reported (run with `--nocapture`): the cold start of the first request at zero replicas,
//! split into its stages; the replica count over time; the pods stopped while requests were in
//! flight. Asserted: every request answered 200 (nothing lost, no 5xx), the count reached 3 and
//! came back to 0, and no scale-down came within a stabilization window of the change before
//! it (no flapping).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::ModelDeployment;
use e2e::{TestBed, eventually};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

const NAME: &str = "ramp";
const CLIENTS: usize = 6;
/// The manifest's stabilization windows and idle time, in seconds.
const UP_WINDOW: u64 = 3;
const DOWN_WINDOW: u64 = 10;
const IDLE: u64 = 10;

fn cluster() -> &'static TestBed {
    e2e::cluster_with_infergate!()
}

async fn kube_client(bed: &TestBed) -> Client {
    let kubeconfig = Kubeconfig::read_from(&bed.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// When the test first saw each stage of one runtime pod.
#[derive(Debug, Default, Clone)]
struct PodStages {
    created: Option<Instant>,
    scheduled: Option<Instant>,
    running: Option<Instant>,
    ready: Option<Instant>,
    stopping: Option<Instant>,
}

fn condition(pod: &Pod, kind: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == kind && c.status == "True")
}

fn note(stage: &mut Option<Instant>, reached: bool, now: Instant) {
    if reached && stage.is_none() {
        *stage = Some(now);
    }
}

/// One request of the client: when it was sent, when answered, its status (0: no answer).
#[derive(Debug, Clone, Copy)]
struct Outcome {
    sent: Instant,
    answered: Instant,
    status: u16,
}

async fn chat(http: &reqwest::Client, url: &str, token: &str) -> Outcome {
    let sent = Instant::now();
    let body = json!({
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 16,
        "temperature": 0,
    });
    let status = match http
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("OICM-Request-Timeout", "120")
        .body(body.to_string())
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.bytes().await {
                Ok(body) if status == 200 => {
                    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if answer["usage"]["completion_tokens"] == 16 {
                        200
                    } else {
                        eprintln!("a 200 without its 16 tokens: {answer}");
                        0
                    }
                }
                Ok(body) => {
                    eprintln!("answered {status}: {}", String::from_utf8_lossy(&body));
                    status
                }
                Err(error) => {
                    eprintln!("the answer broke off: {error}");
                    0
                }
            }
        }
        Err(error) => {
            eprintln!("no answer: {error}");
            0
        }
    };
    Outcome {
        sent,
        answered: Instant::now(),
        status,
    }
}

fn secs(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_ramps_a_model_from_zero_to_three_replicas_and_back_without_losing_a_request() {
    let cluster = cluster();
    let namespace = cluster.watched_namespace();
    let proxy_url = cluster.proxy();
    let chat_model = e2e::cluster_model("chat", || e2e::fixture("llama"));
    let id = format!("{NAME}-{}", std::process::id());
    // Applied at zero replicas: the first request finds no pod.
    let manifests = format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: {NAME}}}\nspec:\n  task: text-generation\n  modelVersionId: {id}\n  model: {{uri: \"file://{chat_model}\"}}\n  replicas: 0\n  resources: {{cpu: 500m}}\n  autoscaling:\n    minReplicas: 0\n    maxReplicas: 3\n    inFlightPerReplica: 2\n    scaleUpStabilizationSeconds: {UP_WINDOW}\n    scaleDownStabilizationSeconds: {DOWN_WINDOW}\n    scaleToZeroAfterSeconds: {IDLE}\n---\napiVersion: infergate.dev/v1alpha1\nkind: AccessToken\nmetadata: {{name: {NAME}-app}}\nspec: {{models: [{NAME}], secretName: {NAME}-credentials}}\n"
    );
    cluster.kubectl(
        &[
            "delete",
            "-n",
            &namespace,
            "md",
            NAME,
            "--ignore-not-found",
            "--wait=true",
        ],
        None,
    );
    let no_pods_left = || {
        let out = cluster.ok(&[
            "get",
            "pods",
            "-n",
            &namespace,
            "-l",
            &format!("infergate.dev/model-deployment={NAME}"),
            "-o",
            "name",
        ]);
        out.trim().is_empty().then_some(())
    };
    // The pods of an earlier run, stopping by garbage collection.
    eventually(
        "no runtime pod of an earlier run",
        Duration::from_secs(90),
        no_pods_left,
    );
    cluster.apply_in(&namespace, &manifests);
    cluster.ok(&[
        "wait",
        "-n",
        &namespace,
        "--for",
        "jsonpath={.status.phase}=Active",
        "--timeout",
        "60s",
        &format!("at/{NAME}-app"),
    ]);
    let token = cluster.ok(&[
        "get",
        "secret",
        &format!("{NAME}-credentials"),
        "-n",
        &namespace,
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    assert!(token.starts_with("igt_"));
    // Ready at zero replicas: the proxy holds requests for it.
    cluster.ok(&[
        "wait",
        "-n",
        &namespace,
        "--for",
        "condition=Ready",
        "--timeout",
        "60s",
        &format!("md/{NAME}"),
    ]);
    let md = format!("md/{NAME}");
    let reason = cluster.jsonpath(
        &namespace,
        &md,
        r#"{.status.conditions[?(@.type=="Ready")].reason}"#,
    );
    assert_eq!(reason, "ScaledToZero");
    let uid = cluster.jsonpath(&namespace, &md, "{.metadata.uid}");

    // What the cluster does, as the test sees it happen.
    let client = kube_client(cluster).await;
    let started = Instant::now();
    let pods: Arc<Mutex<BTreeMap<String, PodStages>>> = Arc::default();
    let replicas: Arc<Mutex<Vec<(Instant, i32)>>> = Arc::default();
    let watch_pods = {
        let pods = pods.clone();
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let selector = format!("infergate.dev/model-deployment={NAME}");
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default().labels(&selector)).boxed();
            while let Some(event) = events.next().await {
                let now = Instant::now();
                let (pod, gone) = match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => (pod, false),
                    Ok(watcher::Event::Delete(pod)) => (pod, true),
                    _ => continue,
                };
                let mut pods = pods.lock().unwrap();
                let stages = pods.entry(pod.name_any()).or_default();
                note(&mut stages.created, true, now);
                note(&mut stages.scheduled, condition(&pod, "PodScheduled"), now);
                let running = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                    });
                note(&mut stages.running, running, now);
                note(&mut stages.ready, condition(&pod, "Ready"), now);
                note(
                    &mut stages.stopping,
                    gone || pod.metadata.deletion_timestamp.is_some(),
                    now,
                );
            }
        })
    };
    let watch_replicas = {
        let replicas = replicas.clone();
        let api: Api<ModelDeployment> = Api::namespaced(client.clone(), &namespace);
        tokio::spawn(async move {
            let mut events = watcher(
                api,
                watcher::Config::default().fields(&format!("metadata.name={NAME}")),
            )
            .boxed();
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(md) | watcher::Event::InitApply(md)) = event {
                    let mut replicas = replicas.lock().unwrap();
                    if replicas.last().map(|(_, r)| *r) != Some(md.spec.replicas) {
                        replicas.push((Instant::now(), md.spec.replicas));
                    }
                }
            }
        })
    };
    let current = |replicas: &Arc<Mutex<Vec<(Instant, i32)>>>| {
        replicas.lock().unwrap().last().map(|(_, r)| *r)
    };
    let wait_for_replicas = |want: i32, limit: Duration| {
        let replicas = replicas.clone();
        async move {
            let deadline = Instant::now() + limit;
            while current(&replicas) != Some(want) {
                assert!(
                    Instant::now() < deadline,
                    "never reached {want} replicas: {:?}",
                    replicas.lock().unwrap()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for_replicas(0, Duration::from_secs(10)).await;

    // The first request, at zero replicas: held by the proxy while a pod starts.
    let url = format!("{proxy_url}/models/{id}/proxy/v1/chat/completions");
    let http = reqwest::Client::new();
    let first = chat(&http, &url, &token).await;
    assert_eq!(first.status, 200, "the request that found zero replicas");

    // The ramp: clients that each keep one request in flight, from 1 to 6 and back to 0.
    let active = Arc::new(AtomicUsize::new(0));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (active, outcomes, http, url, token) = (
                active.clone(),
                outcomes.clone(),
                http.clone(),
                url.clone(),
                token.clone(),
            );
            tokio::spawn(async move {
                loop {
                    match active.load(Ordering::Acquire) {
                        usize::MAX => return,
                        count if n < count => {
                            let outcome = chat(&http, &url, &token).await;
                            outcomes.lock().unwrap().push(outcome);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();
    let set_clients = |count: usize| active.store(count, Ordering::Release);
    set_clients(2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    set_clients(4);
    wait_for_replicas(2, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    set_clients(CLIENTS);
    wait_for_replicas(3, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = pods
            .lock()
            .unwrap()
            .values()
            .filter(|p| p.ready.is_some() && p.stopping.is_none())
            .count();
        if ready == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "3 pods never got ready: {:?}",
            pods.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Down to 2 clients: 2 of the 3 pods stop while requests are in flight.
    set_clients(2);
    wait_for_replicas(1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    set_clients(0);
    let quiet = Instant::now();
    wait_for_replicas(0, Duration::from_secs(90)).await;
    let at_zero = Instant::now();
    eventually(
        "every runtime pod gone",
        Duration::from_secs(90),
        no_pods_left,
    );
    active.store(usize::MAX, Ordering::Release);
    for client in clients {
        client.await.unwrap();
    }
    watch_pods.abort();
    watch_replicas.abort();

    // The report.
    let outcomes = outcomes.lock().unwrap().clone();
    let pods = pods.lock().unwrap().clone();
    let replicas = replicas.lock().unwrap().clone();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    let first_pod = pods
        .values()
        .filter(|p| p.created.is_some_and(|c| c >= first.sent))
        .min_by_key(|p| p.created)
        .cloned()
        .unwrap_or_default();
    let scaled_up = replicas
        .iter()
        .find(|(at, r)| *r > 0 && *at >= first.sent)
        .map(|(at, _)| *at);
    let stage = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
        (Some(from), Some(to)) => format!("{:.2} s", secs(from, to)),
        _ => "unseen".to_owned(),
    };
    eprintln!("autoscaling ramp report");
    eprintln!(
        "  cold start, first request at zero replicas to its answer: {:.2} s",
        secs(first.sent, first.answered)
    );
    eprintln!(
        "    request held → replicas set to 1 (autoscaler): {}",
        stage(Some(first.sent), scaled_up)
    );
    eprintln!(
        "    replicas set → pod created (controllers): {}",
        stage(scaled_up, first_pod.created)
    );
    eprintln!(
        "    pod created → scheduled: {}",
        stage(first_pod.created, first_pod.scheduled)
    );
    eprintln!(
        "    scheduled → container running (image, start): {}",
        stage(first_pod.scheduled, first_pod.running)
    );
    eprintln!(
        "    running → ready (weights loaded, /health): {}",
        stage(first_pod.running, first_pod.ready)
    );
    eprintln!(
        "    ready → answered (endpoint published, request sent, 16 tokens): {}",
        stage(first_pod.ready, Some(first.answered))
    );
    eprintln!("  replicas over time (s since the watch began):");
    for (at, count) in &replicas {
        eprintln!("    {:6.1}  {count}", secs(started, *at));
    }
    eprintln!(
        "  requests: {} answered 200, {} other (5xx, errors, cut streams)",
        outcomes.len() + 1 - failed.len(),
        failed.len()
    );
    let mut cut_risk = 0;
    for (name, stages) in &pods {
        let Some(stopping) = stages.stopping else {
            continue;
        };
        let in_flight = outcomes
            .iter()
            .filter(|o| o.sent <= stopping && o.answered > stopping)
            .count();
        if in_flight > 0 {
            cut_risk += 1;
        }
        eprintln!(
            "  pod {name} began stopping at {:.1} s with {in_flight} client request(s) in flight",
            secs(started, stopping)
        );
    }
    eprintln!(
        "  pods stopped while requests were in flight: {cut_risk}; requests cut: {}",
        failed.len()
    );
    eprintln!(
        "  last request → zero replicas: {:.1} s (idle {IDLE} s, down window {DOWN_WINDOW} s)",
        secs(quiet, at_zero)
    );

    assert!(failed.is_empty(), "requests not answered 200: {failed:?}");
    let counts: Vec<i32> = replicas.iter().map(|(_, r)| *r).collect();
    assert_eq!(counts.iter().max(), Some(&3), "{counts:?}");
    assert_eq!(counts.last(), Some(&0), "{counts:?}");
    assert!(counts.contains(&1), "{counts:?}");
    // No flapping: a scale-down comes at least a down window after the change before it
    // (within a second: the watch sees changes a moment apart from when they were made).
    for pair in replicas.windows(2) {
        let [(before, from), (at, to)] = [pair[0], pair[1]];
        if to < from {
            assert!(
                secs(before, at) >= (DOWN_WINDOW - 1) as f64,
                "scaled down {from} → {to} {:.1} s after the change before: {replicas:?}",
                secs(before, at)
            );
        }
    }
    // What a person reads: the decision in the status, each change as an Event, the columns.
    let message = cluster.jsonpath(&namespace, &md, "{.status.autoscaling.message}");
    assert!(
        message.starts_with("scaled 1 → 0: no request for"),
        "{message}"
    );
    let events = cluster.ok(&[
        "get",
        "events",
        "-n",
        &namespace,
        "--field-selector",
        &format!("involvedObject.uid={uid},reason=Scaled"),
        "-o",
        "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
    ]);
    eprintln!("  Events (reason Scaled):\n{events}");
    assert_eq!(events.lines().count(), replicas.len() - 1, "{events}");
    assert!(
        events.contains("scaled 0 → 1: 1 request(s) held"),
        "{events}"
    );
    let columns = cluster.ok(&["get", "md", NAME, "-n", &namespace]);
    eprintln!("  kubectl get md:\n{columns}");
    assert!(
        columns
            .lines()
            .next()
            .unwrap()
            .contains("CURRENT   DESIRED"),
        "{columns}"
    );
    assert!(
        pods.values().all(|p| p.stopping.is_some()),
        "every runtime pod stopped at zero: {pods:?}"
    );

    cluster.ok(&[
        "delete",
        "-n",
        &namespace,
        &format!("md/{NAME}"),
        &format!("at/{NAME}-app"),
        "--wait=true",
        "--timeout=60s",
    ]);
}
