//! Local mode as the tests drive it: `infergate up -f DIR` on files a test writes, its console
//! read as a user would read it (tokens, readiness), stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `infergate up`; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct LocalMode {
    child: Option<Child>,
    /// The directory of the YAML files; the state lives in `dir/.infergate`.
    pub dir: PathBuf,
    /// The proxy, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The proxy's Prometheus metrics, `http://127.0.0.1:PORT/metrics`.
    pub metrics_url: String,
    console: Arc<Mutex<String>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl LocalMode {
    /// Writes `files` (name, YAML) into a fresh directory and runs `infergate up` on it.
    pub fn start(infergate: &Path, files: &[(&str, &str)]) -> LocalMode {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "infergate-local-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        for (name, yaml) in files {
            // A name may have directories: a credentials file under the state directory.
            if let Some(parent) = dir.join(name).parent() {
                std::fs::create_dir_all(parent).expect("a file's directory");
            }
            std::fs::write(dir.join(name), yaml).expect("writing a manifest");
        }
        let port = free_port();
        let metrics_port = free_port();
        let mut child = Command::new(infergate)
            .args(["up", "-f"])
            .arg(&dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--torch-threads", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", infergate.display()));
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = console.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut console = console.lock().unwrap_or_else(|e| e.into_inner());
                    console.push_str(&line);
                    console.push('\n');
                }
            });
        }
        LocalMode {
            child: Some(child),
            dir,
            url: format!("http://127.0.0.1:{port}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            console,
        }
    }

    /// Everything `infergate up` printed so far.
    pub fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the console shows `needle` `times` times; panics with the console if not.
    pub fn wait_for(&self, needle: &str, times: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.console().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "`infergate up` did not print {needle:?} ×{times} within {limit:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the proxy and every runtime of `model_ids` to be ready.
    pub fn wait_ready(&self, model_ids: &[&str], limit: Duration) {
        self.wait_for("proxy: ready", 1, limit);
        for id in model_ids {
            self.wait_for(&format!("{id}: ready"), 1, limit);
        }
    }

    /// The newest token printed for AccessToken `default/NAME`.
    pub fn token(&self, name: &str) -> String {
        let console = self.console();
        let heading = format!("AccessToken default/{name}: new token");
        let at = console
            .rfind(&heading)
            .unwrap_or_else(|| panic!("no token printed for {name}:\n{console}"));
        console[at..]
            .lines()
            .nth(1)
            .map(|line| line.trim().to_owned())
            .filter(|token| token.starts_with("igt_"))
            .unwrap_or_else(|| panic!("no token under {heading:?}:\n{console}"))
    }

    /// Replaces a manifest file, as a user editing it would.
    pub fn write(&self, name: &str, yaml: &str) {
        let staged = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&staged, yaml).expect("writing a manifest");
        std::fs::rename(&staged, self.dir.join(name)).expect("replacing a manifest");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, then the exit status (SIGKILL after `limit`).
    pub fn stop(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LocalMode {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
