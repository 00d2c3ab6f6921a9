//! `--source kubernetes` against a real API server (the test bed of `e2e/cluster/`): records,
//! ModelDeployments and EndpointSlices are watched, and a revocation made with `kubectl patch`
//! is enforced within a second.

mod support;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::TestBed;
use support::{TestToken, free_port};

/// `kubectl` that must succeed, and `kubectl apply -f -`, on the test bed.
trait Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output;
    fn apply(&self, manifest: &str);
}

impl Kubectl for TestBed {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let output = self.kubectl(args, stdin);
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn apply(&self, manifest: &str) {
        self.run(&["apply", "-f", "-"], Some(manifest));
    }
}

/// A test host of our own: a network namespace joined to this one by a veth pair, with an
/// HTTP server on its address. EndpointSlices may not name loopback addresses, so the model's
/// endpoint lives here, as a pod's would.
struct TestHost {
    namespace: String,
    address: String,
    server: Child,
}

impl TestHost {
    fn start(port: u16) -> TestHost {
        let id = std::process::id() % 10_000;
        let namespace = format!("igtest{id}");
        let (host_side, host_address, address) = (
            format!("igh{id}"),
            format!("10.213.{}.1", id % 250),
            format!("10.213.{}.2", id % 250),
        );
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("iproute2");
            assert!(status.success(), "ip {args:?}");
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &namespace]);
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{host_address}/30"),
            "dev",
            &host_side,
        ]);
        ip(&["link", "set", &host_side, "up"]);
        ip(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{address}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &namespace, "link", "set", "eth0", "up"]);
        ip(&["-n", &namespace, "link", "set", "lo", "up"]);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &namespace,
                "python3",
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                &address,
            ])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        TestHost {
            namespace,
            address,
            server,
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
    }
}

struct KubeProxy {
    child: Child,
    url: String,
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn record_secret(namespace: &str, token: &TestToken) -> String {
    let record = serde_json::to_string(&token.record).unwrap();
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("record-{}", token.record.id), "namespace": namespace,
                     "labels": {"infergate.dev/token-record": "true"}},
        "stringData": {"record.json": record}
    })
    .to_string()
}

fn endpoint_slice(namespace: &str, address: &str, port: u16, ready: bool) -> String {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "runtime-slice", "namespace": namespace, "labels": {"kubernetes.io/service-name": "runtime"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": ready}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    })
    .to_string()
}

async fn until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_source_routes_models_and_enforces_revocation_within_a_second() {
    let cluster = e2e::test_bed();
    // Ids are unique per run: the test bed outlives a test, and the older of two ModelDeployments
    // claiming one id keeps it.
    let namespace = format!("proxy-source-{}", std::process::id());
    let model = format!("kube-m-{}", std::process::id());
    cluster.run(&["create", "namespace", &namespace], None);
    let _cleanup = NamespaceGuard {
        cluster,
        namespace: namespace.clone(),
    };
    let port = free_port();
    let host = TestHost::start(port);
    let mut token = TestToken::new("kube-token", &[model.as_str()]);
    cluster.apply(&record_secret(&namespace, &token));
    cluster.apply(&format!(
        "apiVersion: infergate.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {{name: runtime, namespace: {namespace}}}\n\
         spec: {{task: embedding, modelVersionId: {model}, model: {{uri: 'file:///models/m'}}, timeouts: {{default: 5s}}}}\n"
    ));
    cluster.apply(&endpoint_slice(&namespace, &host.address, port, true));

    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_infergate-proxy"))
        .args([
            "--source",
            "kubernetes",
            "--namespace",
            &namespace,
            "--listen",
            &listen,
            "--threads",
            "1",
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let proxy = KubeProxy {
        child,
        url: format!("http://{listen}"),
    };
    let client = reqwest::Client::new();
    until(Duration::from_secs(20), async || {
        client
            .get(format!("{}/readyz", proxy.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let bearer = token.bearer();
    // The model's server (python's http.server in the test host) lists a directory at `/`.
    let call = || {
        client
            .get(format!("{}/models/{model}/proxy/", proxy.url))
            .header("authorization", &bearer)
            .send()
    };
    let routed = until(Duration::from_secs(5), async || {
        let response = call().await.unwrap();
        let status = response.status();
        if status != 200 {
            eprintln!("{status}: {}", response.text().await.unwrap());
        }
        status == 200
    })
    .await;
    eprintln!("routed to the test host after {routed:?}");

    // Revoke with kubectl, as a platform engineer (or the operator) would.
    token.record.revoked = true;
    let patch = serde_json::json!({"stringData": {"record.json": serde_json::to_string(&token.record).unwrap()}}).to_string();
    let secret = format!("record-{}", token.record.id);
    cluster.run(
        &[
            "patch",
            "secret",
            &secret,
            "--namespace",
            &namespace,
            "--type",
            "merge",
            "-p",
            &patch,
        ],
        None,
    );
    let took = until(Duration::from_secs(1), async || {
        call().await.unwrap().status() == 401
    })
    .await;
    eprintln!("revocation through the API server took effect after {took:?}");

    // An endpoint marked unready leaves the model without a ready endpoint.
    token.record.revoked = false;
    cluster.apply(&record_secret(&namespace, &token));
    until(Duration::from_secs(1), async || {
        call().await.unwrap().status() == 200
    })
    .await;
    cluster.apply(&endpoint_slice(&namespace, &host.address, port, false));
    until(Duration::from_secs(1), async || {
        call().await.unwrap().status() == 503
    })
    .await;

    // A deleted record is an unknown token.
    cluster.run(
        &["delete", "secret", &secret, "--namespace", &namespace],
        None,
    );
    until(Duration::from_secs(1), async || {
        call().await.unwrap().status() == 401
    })
    .await;
}

struct NamespaceGuard<'a> {
    cluster: &'a TestBed,
    namespace: String,
}

impl Drop for NamespaceGuard<'_> {
    fn drop(&mut self) {
        let _ = Command::new(&self.cluster.kubectl)
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .args(["delete", "namespace", &self.namespace, "--wait=false"])
            .output();
    }
}
