//! Test fixtures: a scriptable HTTP/1.1 upstream on port 0, and the real `infergate-proxy`
//! binary started on a config file written for the test.

#![allow(dead_code)] // each test binary uses a different part of the fixtures

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::{Token, TokenRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// Which of the upstream's accepted connections carried it, counting from 0.
    pub connection: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An upstream whose behaviour is chosen by the request path:
/// - `/sleep/<ms>`: answers `done` after the delay;
/// - `/sse/<count>/<interval_ms>`: an SSE stream of `count` events, one per interval;
/// - `/sse-then-silence`: one SSE event, then nothing for a minute;
/// - `/die-before-head`: closes the connection without answering;
/// - `/die-mid-body`: promises 1000 bytes, sends 10 and closes;
/// - `/sse-then-die`: one SSE event, then closes without ending the stream;
/// - `/usage`: a JSON answer with a usage report of 3 inputs in its head;
/// - `/generated`: a JSON answer reporting 100 prompt and 900 completion tokens;
/// - `/sse-usage/<count>`: `count` events, then the report of `count` completion tokens as
///   the stream's last comment, in two pieces;
/// - `/sse-lookalike`: an event, then a comment that starts like a report in one piece and is
///   none once its second piece arrives;
/// - `/garbage`: a line that is not HTTP, and the connection left open;
/// - `/once-per-connection`: answered on a new connection; on a kept-alive one the request is
///   read and the connection closed without an answer, as by a server whose keep-alive ended
///   just as the request arrived;
/// - anything else: 200 with a JSON echo of the target.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(stream, accepted, log.clone()));
                accepted += 1;
            }
        });
        Upstream { addr, seen }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_connection(mut stream: TcpStream, connection: usize, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buffer = Vec::new();
    for answered_before in 0usize.. {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_owned();
        let target = request_line.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
        buffer.drain(..head_end);
        let body_len = if chunked {
            match read_chunked(&mut stream, &mut buffer).await {
                Some(len) => len,
                None => return,
            }
        } else {
            let len: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            if !fill(&mut stream, &mut buffer, len).await {
                return;
            }
            buffer.drain(..len);
            len
        };
        let request = Seen {
            method,
            target: target.clone(),
            headers,
            body_len,
            connection,
        };
        seen.lock().unwrap().push(request.clone());
        match respond(&mut stream, &request, answered_before).await {
            Ok(Answered::KeepAlive) => {}
            Ok(Answered::Close) | Err(_) => return,
        }
    }
}

/// Reads until `buffer` holds at least `len` bytes; false when the connection ends first.
async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>, len: usize) -> bool {
    while buffer.len() < len {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// Consumes a chunked body from the front of `buffer`; its decoded length, or `None` when the
/// connection ends or the framing is broken.
async fn read_chunked(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    let mut total = 0;
    loop {
        let line_end = loop {
            if let Some(end) = buffer.windows(2).position(|w| w == b"\r\n") {
                break end;
            }
            if !fill(stream, buffer, buffer.len() + 1).await {
                return None;
            }
        };
        let size_text = String::from_utf8_lossy(&buffer[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if !fill(stream, buffer, line_end + 2 + size + 2).await {
            return None;
        }
        buffer.drain(..line_end + 2 + size + 2);
        total += size;
        if size == 0 {
            return Some(total);
        }
    }
}

/// Whether a connection may carry another request after an answer.
enum Answered {
    KeepAlive,
    Close,
}

async fn respond(
    stream: &mut TcpStream,
    request: &Seen,
    answered_before: usize,
) -> std::io::Result<Answered> {
    let path = request.target.split('?').next().unwrap_or_default();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["once-per-connection"] if answered_before > 0 => return Ok(Answered::Close),
        ["sleep", ms] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            write_fixed(stream, "text/plain", b"done").await?;
        }
        ["sse", count, interval] => {
            start_sse(stream).await?;
            let interval = Duration::from_millis(interval.parse().unwrap_or(100));
            for i in 0..count.parse::<u32>().unwrap_or(1) {
                write_chunk(stream, format!("data: {i}\n\n").as_bytes()).await?;
                tokio::time::sleep(interval).await;
            }
            stream.write_all(b"0\r\n\r\n").await?;
        }
        ["sse-then-silence"] => {
            start_sse(stream).await?;
            write_chunk(stream, b"data: first\n\n").await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
            stream.write_all(b"0\r\n\r\n").await?;
        }
        ["die-before-head"] => return Ok(Answered::Close),
        ["die-mid-body"] => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"partial\"")
                .await?;
            stream.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Ok(Answered::Close);
        }
        ["sse-then-die"] => {
            start_sse(stream).await?;
            write_chunk(stream, b"data: first\n\n").await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Ok(Answered::Close);
        }
        ["usage"] => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ninfergate-usage: inputs=3\r\ncontent-length: 2\r\n\r\n{}")
                .await?;
        }
        ["generated"] => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ninfergate-usage: prompt_tokens=100, completion_tokens=900\r\ncontent-length: 2\r\n\r\n{}")
                .await?;
        }
        ["sse-usage", count] => {
            start_sse(stream).await?;
            let count = count.parse::<u32>().unwrap_or(1);
            for i in 0..count {
                write_chunk(stream, format!("data: {i}\n\n").as_bytes()).await?;
            }
            write_chunk(stream, b": infergate-").await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let rest = format!("usage completion_tokens={count}\n\n");
            write_chunk(stream, rest.as_bytes()).await?;
            stream.write_all(b"0\r\n\r\n").await?;
        }
        ["sse-lookalike"] => {
            start_sse(stream).await?;
            write_chunk(stream, b"data: 0\n\n").await?;
            write_chunk(stream, b": infer").await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            write_chunk(stream, b"ring\n\n").await?;
            stream.write_all(b"0\r\n\r\n").await?;
        }
        ["garbage"] => {
            stream.write_all(b"this is not HTTP at all\r\n\r\n").await?;
            stream.flush().await?;
        }
        _ => {
            let echo = serde_json::json!({"method": request.method, "target": request.target, "body_len": request.body_len});
            write_fixed(stream, "application/json", echo.to_string().as_bytes()).await?;
        }
    }
    Ok(Answered::KeepAlive)
}

async fn write_fixed(
    stream: &mut TcpStream,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

async fn start_sse(stream: &mut TcpStream) -> std::io::Result<()> {
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    stream
        .write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    stream.write_all(data).await?;
    stream.write_all(b"\r\n").await?;
    stream.flush().await
}

/// A token and the record the proxy knows it by.
#[derive(Debug, Clone)]
pub struct TestToken {
    pub token: Token,
    pub record: TokenRecord,
}

impl TestToken {
    pub fn new(id: &str, models: &[&str]) -> TestToken {
        let token = Token::generate().unwrap();
        let record = TokenRecord {
            id: id.to_owned(),
            name: format!("test/{id}"),
            sha256: token.sha256_hex(),
            models: models.iter().map(|m| m.to_string()).collect(),
            expires_at: None,
            revoked: false,
            limits: None,
        };
        TestToken { token, record }
    }

    pub fn secret(&self) -> &str {
        self.token.expose_secret()
    }

    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.secret())
    }
}

/// A model entry of the proxy config.
#[derive(Debug, Clone)]
pub struct TestModel {
    pub id: String,
    pub endpoints: Vec<SocketAddr>,
    pub extra: String,
}

impl TestModel {
    pub fn new(id: &str, endpoints: &[SocketAddr]) -> TestModel {
        TestModel {
            id: id.to_owned(),
            endpoints: endpoints.to_vec(),
            extra: String::new(),
        }
    }

    /// Adds YAML fields to the entry, e.g. `maxBodyBytes: 100`.
    pub fn with(mut self, field: &str) -> TestModel {
        self.extra.push_str(&format!(", {field}"));
        self
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `infergate-proxy` binary, running on a config file of this test.
#[derive(Debug)]
pub struct Proxy {
    child: Child,
    pub url: String,
    pub metrics_url: String,
    pub config: PathBuf,
    listen: String,
    metrics: String,
    /// The `proxyReplicas` of its config: proxies sharing per-token limits.
    replicas: usize,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    pub async fn start(models: &[TestModel], tokens: &[&TestToken]) -> Proxy {
        Proxy::start_with_args(models, tokens, &[]).await
    }

    pub async fn start_with_args(
        models: &[TestModel],
        tokens: &[&TestToken],
        args: &[&str],
    ) -> Proxy {
        Proxy::start_logged(models, tokens, args, "debug").await
    }

    /// A proxy logging at `level` (`RUST_LOG`), its output captured.
    pub async fn start_logged(
        models: &[TestModel],
        tokens: &[&TestToken],
        args: &[&str],
        level: &str,
    ) -> Proxy {
        Proxy::start_replica(models, tokens, args, level, 1).await
    }

    /// One of `replicas` proxies serving the same tokens side by side (`proxyReplicas`).
    pub async fn start_replica(
        models: &[TestModel],
        tokens: &[&TestToken],
        args: &[&str],
        level: &str,
        replicas: usize,
    ) -> Proxy {
        let dir = std::env::temp_dir().join(format!(
            "infergate-proxy-test-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let config = dir.join("proxy.yaml");
        let mut proxy = Proxy {
            child: Command::new("true").spawn().unwrap(),
            url: format!("http://{listen}"),
            metrics_url: format!("http://{metrics}/metrics"),
            config,
            listen,
            metrics,
            replicas,
            output: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.write_config(models, tokens);
        let mut child = Command::new(env!("CARGO_BIN_EXE_infergate-proxy"))
            .arg("--config")
            .arg(&proxy.config)
            .args(args)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = proxy.output.clone();
            std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
        }
        proxy.child = child;
        proxy.wait_ready().await;
        proxy
    }

    /// Rewrites the config file in one rename, as a deployment tool would.
    pub fn write_config(&self, models: &[TestModel], tokens: &[&TestToken]) {
        let models: String = models
            .iter()
            .map(|m| {
                let endpoints: Vec<String> =
                    m.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
                format!(
                    "  - {{id: {}, endpoints: [{}]{}}}\n",
                    m.id,
                    endpoints.join(", "),
                    m.extra
                )
            })
            .collect();
        let tokens: Vec<&TokenRecord> = tokens.iter().map(|t| &t.record).collect();
        let text = format!(
            "listen: {}\nmetrics: {}\nthreads: 1\nproxyReplicas: {}\nmodels:\n{models}tokens: {}\n",
            self.listen,
            self.metrics,
            self.replicas,
            serde_json::to_string(&tokens).unwrap()
        );
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        let client = reqwest::Client::new();
        while started.elapsed() < Duration::from_secs(20) {
            let response = client.get(format!("{}/readyz", self.url)).send().await;
            if response.is_ok_and(|r| r.status() == 200) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("infergate-proxy exited with {status}:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("infergate-proxy not ready after 20 s:\n{}", self.output());
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
