//! The processes of local mode and the loop that keeps them in line with the files.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use crds::{ModelDeployment, Task, TokenRecord};
use kube::ResourceExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::keys::{self, InternalKeys};
use super::manifests::{self, Manifests, Problem};
use super::tokens::{Issued, NewToken};
use super::{UpOptions, write_atomically};

/// Longest a child gets between SIGTERM and SIGKILL when local mode stops.
const STOP_GRACE: Duration = Duration::from_secs(10);
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// How often a model that is still loading is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The proxy re-reads its file every 200 ms: "ready" is said once a runtime healthy now is
/// also routed, so a request sent on reading it is served.
const PROXY_RELOAD: Duration = Duration::from_millis(300);

/// Runs local mode until SIGINT or SIGTERM.
pub async fn up(options: UpOptions) -> anyhow::Result<()> {
    let mut current = manifests::load(&options.path).map_err(|problems| {
        report_problems(&problems);
        anyhow::anyhow!(
            "{} problem(s) in {}; nothing started",
            problems.len(),
            options.path.display()
        )
    })?;
    let logs = options.state_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut internal_keys = InternalKeys::open(&options.state_dir, SystemTime::now())?;
    let mut issued = Issued::open(&options.state_dir.join("tokens.json"))?;
    let config_path = options.state_dir.join("proxy.yaml");
    // For `infergate snippet -f`, whose code calls this proxy, and `infergate token list -f`,
    // which reads the tokens' usage from its metrics.
    write_atomically(
        &options
            .state_dir
            .join(crate::snippet_command::LOCAL_URL_FILE),
        format!("http://{}\n", options.listen).as_bytes(),
        0o644,
    )?;
    write_atomically(
        &options.state_dir.join(super::commands::METRICS_FILE),
        format!("{}\n", options.metrics_listen).as_bytes(),
        0o644,
    )?;

    let mut runtimes = BTreeMap::new();
    sync_runtimes(&mut runtimes, &current, &options, &logs);
    let (mut records, fresh) = issued.records(&current.tokens, &current.models)?;
    let mut written = write_proxy_config(&config_path, &options, &runtimes, &records)?;
    let mut proxy = Supervised::new(
        "proxy".to_owned(),
        options.proxy_bin.clone(),
        vec![
            "--config".to_owned(),
            config_path.display().to_string(),
            "--internal-signing-keys".to_owned(),
            keys::signing_path(&options.state_dir).display().to_string(),
        ],
        logs.join("proxy.log"),
        (options.listen.to_string(), "/readyz"),
    );
    proxy.start();
    println!(
        "infergate up: proxy on http://{} (metrics on {}), state in {}",
        options.listen,
        options.metrics_listen,
        options.state_dir.display()
    );
    announce(&fresh, &current, options.listen);

    let mut fingerprint = fingerprint(&options.path);
    let mut ticker = tokio::time::interval(options.poll);
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
        if let Some(kid) = internal_keys.tick(SystemTime::now())? {
            println!("internal signing key rotated: {kid} signs from now on");
        }
        let seen = fingerprint_changed(&options.path, &mut fingerprint);
        if seen {
            match manifests::load(&options.path) {
                Ok(next) => {
                    println!("files changed: applying");
                    current = next;
                    sync_runtimes(&mut runtimes, &current, &options, &logs);
                    let (next_records, fresh) = issued.records(&current.tokens, &current.models)?;
                    records = next_records;
                    announce(&fresh, &current, options.listen);
                }
                Err(problems) => {
                    report_problems(&problems);
                    println!("files changed but are invalid: still serving the last valid ones");
                }
            }
        }
        for runtime in runtimes.values_mut() {
            runtime.poll().await;
        }
        proxy.poll().await;
        if matches!(proxy.phase, Phase::Failed) {
            let children = runtimes.values_mut().map(|r| &mut r.process).collect();
            stop_all(children).await;
            anyhow::bail!("the proxy cannot start (see above); stopped every runtime");
        }
        let config = proxy_config(&options, &runtimes, &records);
        if config != written {
            write_atomically(&config_path, config.as_bytes(), 0o644)?;
            written = config;
        }
    }

    println!("stopping");
    let mut children: Vec<&mut Supervised> =
        runtimes.values_mut().map(|r| &mut r.process).collect();
    children.push(&mut proxy);
    stop_all(children).await;
    println!("stopped");
    Ok(())
}

fn report_problems(problems: &[Problem]) {
    for problem in problems {
        eprintln!("error: {problem}");
    }
}

/// A model's runtime process, and the arguments it was started with (a change restarts it).
#[derive(Debug)]
struct ModelRuntime {
    id: String,
    task: Task,
    timeouts: crds::Timeouts,
    port: u16,
    process: Supervised,
    /// For a downloaded model, the download its runtime waits for.
    fetch: Option<Fetch>,
}

impl ModelRuntime {
    async fn poll(&mut self) {
        if let Some(fetch) = &mut self.fetch
            && !fetch.done
        {
            if fetch.poll(&self.id, &self.process.program) {
                self.process.start_afresh();
            }
            return;
        }
        self.process.poll().await;
    }

    fn endpoint(&self) -> Option<String> {
        matches!(self.process.phase, Phase::Healthy { .. } | Phase::Ready)
            .then(|| format!("127.0.0.1:{}", self.port))
    }
}

/// The download of a model that is not a directory of this machine: `infergate-runtime
/// download`, as a cluster's init container runs it, into the state directory through a cache
/// there. Credentials: the files of `STATE/secrets/NAME/` for `credentialsSecret: NAME` where
/// that directory exists, else this process's environment (AWS_ACCESS_KEY_ID, HF_TOKEN, ...).
fn fetch_args(md: &ModelDeployment, options: &UpOptions) -> Option<Vec<String>> {
    let manifests::Source::Download(uri) = manifests::source(md).ok()? else {
        return None;
    };
    let model = &md.spec.model;
    let mut args = vec![
        "download".to_owned(),
        "--source".to_owned(),
        uri,
        "--dest".to_owned(),
        manifests::model_dir(md, &options.state_dir)
            .display()
            .to_string(),
        "--cache".to_owned(),
        options.state_dir.join("model-cache").display().to_string(),
    ];
    for (flag, value) in [
        ("--sha256", &model.sha256),
        ("--endpoint", &model.endpoint),
        ("--region", &model.region),
        ("--credentials-secret", &model.credentials_secret),
    ] {
        if let Some(value) = value {
            args.extend([flag.to_owned(), value.clone()]);
        }
    }
    if model.path_style == Some(true) {
        args.push("--path-style".to_owned());
    }
    let secret = model
        .credentials_secret
        .as_ref()
        .map(|name| options.state_dir.join("secrets").join(name))
        .filter(|dir| dir.is_dir());
    if let Some(dir) = secret {
        args.extend(["--credentials-dir".to_owned(), dir.display().to_string()]);
    }
    Some(args)
}

/// A model's download, run to success (with back-off) before its runtime starts.
#[derive(Debug)]
struct Fetch {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    retry_at: Instant,
    delay: Duration,
    done: bool,
}

impl Fetch {
    fn new(args: Vec<String>, log: PathBuf) -> Fetch {
        Fetch {
            args,
            log,
            child: None,
            retry_at: Instant::now(),
            delay: FIRST_RESTART_DELAY,
            done: false,
        }
    }

    /// Whether the model's files are in place; starts the download, or reaps it, on the way.
    /// Its one-line outcome (what a cluster shows in ModelFetched) is printed either way.
    fn poll(&mut self, name: &str, program: &Path) -> bool {
        if let Some(child) = &mut self.child {
            let Ok(Some(status)) = child.try_wait() else {
                return false;
            };
            self.child = None;
            let outcome = last_line(&self.log).unwrap_or_else(|| status.to_string());
            if status.success() {
                println!("{name}: {outcome}");
                self.done = true;
                return true;
            }
            println!(
                "{name}: cannot fetch the model: {outcome}\n    retrying in {:?}; log: {}",
                self.delay,
                self.log.display()
            );
            self.retry_at = Instant::now() + self.delay;
            self.delay = (self.delay * 2).min(MAX_RESTART_DELAY);
            return false;
        }
        if Instant::now() < self.retry_at {
            return false;
        }
        match spawn_logged(program, &self.args, &self.log) {
            Ok(child) => self.child = Some(child),
            Err(e) => {
                println!("{name}: cannot start {}: {e}", program.display());
                self.retry_at = Instant::now() + MAX_RESTART_DELAY;
            }
        }
        false
    }
}

fn runtime_args(md: &ModelDeployment, options: &UpOptions, port: u16) -> Vec<String> {
    let dir = manifests::model_dir(md, &options.state_dir);
    let mut args =
        crate::desired::runtime_args(md, &dir.display().to_string(), &format!("127.0.0.1:{port}"));
    if let Some(threads) = options.torch_threads {
        args.extend(["--torch-threads".to_owned(), threads.to_string()]);
    }
    args.extend([
        "--internal-keys".to_owned(),
        keys::jwks_path(&options.state_dir).display().to_string(),
    ]);
    args
}

/// Starts runtimes of new models, restarts those whose spec changed, stops removed ones.
fn sync_runtimes(
    runtimes: &mut BTreeMap<String, ModelRuntime>,
    manifests: &Manifests,
    options: &UpOptions,
    logs: &Path,
) {
    let wanted: BTreeMap<String, &ModelDeployment> = manifests
        .models
        .iter()
        .map(|md| (md.model_version_id().unwrap_or_default(), md))
        .collect();
    runtimes.retain(|id, runtime| {
        let keep = wanted.contains_key(id);
        if !keep {
            println!("{id}: removed from the files; stopping its runtime");
            runtime.process.stop_now();
        }
        keep
    });
    for (id, md) in wanted {
        let timeouts = md.spec.timeouts.clone().unwrap_or_default();
        let fetch = fetch_args(md, options)
            .map(|args| Fetch::new(args, logs.join(format!("{id}.fetch.log"))));
        if let Some(running) = runtimes.get_mut(&id) {
            let args = runtime_args(md, options, running.port);
            running.timeouts = timeouts;
            let fetch_changed =
                running.fetch.as_ref().map(|f| &f.args) != fetch.as_ref().map(|f| &f.args);
            if running.process.args != args || fetch_changed {
                println!("{id}: spec changed; restarting its runtime");
                running.process.stop_now();
                running.task = md.spec.task;
                running.process.args = args;
                if fetch.is_none() {
                    running.process.start_afresh();
                }
                running.fetch = fetch;
            } else if matches!(running.process.phase, Phase::Failed) {
                // Its files may be what was fixed (the model directory, a rebuilt binary).
                println!("{id}: files changed; starting its runtime again");
                running.process.start_afresh();
            }
            continue;
        }
        let port = free_port();
        let mut process = Supervised::new(
            id.clone(),
            options.runtime_bin.clone(),
            runtime_args(md, options, port),
            logs.join(format!("{id}.log")),
            (format!("127.0.0.1:{port}"), "/health"),
        );
        if md.spec.autoscaling.is_some() {
            println!(
                "{id}: autoscaling is a cluster feature; local mode runs one runtime for {}",
                md.name_any()
            );
        }
        if fetch.is_some() {
            println!("{id}: fetching {} for {}", md.spec.model.uri, md.name_any());
        } else {
            process.start();
            println!(
                "{id}: starting {} runtime for {}",
                md.spec.task,
                md.name_any()
            );
        }
        runtimes.insert(
            id.clone(),
            ModelRuntime {
                id,
                task: md.spec.task,
                timeouts,
                port,
                process,
                fetch,
            },
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

#[derive(Debug)]
enum Phase {
    /// Started; waiting for its health endpoint.
    Starting {
        since: Instant,
        reported: Instant,
    },
    /// Healthy; said to be ready once the proxy has had time to route to it.
    Healthy {
        since: Instant,
        at: Instant,
    },
    Ready,
    /// Exited; started again at `at`.
    Waiting {
        at: Instant,
    },
    /// Could not start at all: not restarted until its spec or the files change, since the
    /// same binary, arguments and files would only fail the same way again.
    Failed,
}

/// A child process restarted with back-off when it exits after having been ready once; ready
/// once `/health` (runtimes) or `/readyz` (the proxy) answers 200. One that exits before it was
/// ever ready (a missing library, an unreadable model) is reported once and left stopped.
#[derive(Debug)]
struct Supervised {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// Address and path that answer 200 once the process is ready.
    health: (String, &'static str),
    child: Option<Child>,
    phase: Phase,
    delay: Duration,
    /// Whether it has answered its health check since it was last started on purpose (not
    /// by a restart after a crash).
    was_ready: bool,
}

impl Supervised {
    fn new(
        name: String,
        program: PathBuf,
        args: Vec<String>,
        log: PathBuf,
        health: (String, &'static str),
    ) -> Supervised {
        Supervised {
            name,
            program,
            args,
            log,
            health,
            child: None,
            phase: Phase::Waiting { at: Instant::now() },
            delay: FIRST_RESTART_DELAY,
            was_ready: false,
        }
    }

    /// Starts it on purpose (new, or its spec changed): an exit before it is ready is then a
    /// failure to start, not a crash.
    fn start_afresh(&mut self) {
        self.was_ready = false;
        self.delay = FIRST_RESTART_DELAY;
        self.start();
    }

    fn start(&mut self) {
        let spawned = spawn_logged(&self.program, &self.args, &self.log);
        let now = Instant::now();
        match spawned {
            Ok(child) => {
                self.child = Some(child);
                self.phase = Phase::Starting {
                    since: now,
                    reported: now,
                };
            }
            Err(e) => {
                println!(
                    "{}: cannot start {}: {e}; fix: build it (cargo build --release) or pass its path",
                    self.name,
                    self.program.display(),
                );
                self.phase = Phase::Failed;
            }
        }
    }

    async fn poll(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            if !self.was_ready {
                let reason = last_line(&self.log).unwrap_or_else(|| status.to_string());
                println!(
                    "{}: cannot start ({status}): {reason}\n    fix: {}\n    log: {}",
                    self.name,
                    fix_for(&reason),
                    self.log.display()
                );
                self.phase = Phase::Failed;
                return;
            }
            println!(
                "{}: exited ({status}); restarting in {:?} — log: {}",
                self.name,
                self.delay,
                self.log.display()
            );
            self.phase = Phase::Waiting {
                at: Instant::now() + self.delay,
            };
            self.delay = (self.delay * 2).min(MAX_RESTART_DELAY);
            return;
        }
        match self.phase {
            Phase::Waiting { at } if Instant::now() >= at => self.start(),
            Phase::Starting { since, reported } => {
                let ready = answers_200(&self.health.0, self.health.1).await;
                if ready {
                    self.phase = Phase::Healthy {
                        since,
                        at: Instant::now(),
                    };
                    self.was_ready = true;
                    self.delay = FIRST_RESTART_DELAY;
                } else if reported.elapsed() >= PROGRESS_EVERY {
                    println!(
                        "{}: loading… {:.0} s",
                        self.name,
                        since.elapsed().as_secs_f64()
                    );
                    self.phase = Phase::Starting {
                        since,
                        reported: Instant::now(),
                    };
                }
            }
            Phase::Healthy { since, at } if at.elapsed() >= PROXY_RELOAD => {
                println!(
                    "{}: ready in {:.1} s",
                    self.name,
                    since.elapsed().as_secs_f64()
                );
                self.phase = Phase::Ready;
            }
            _ => {}
        }
    }

    fn stop_now(&mut self) {
        if let Some(child) = &mut self.child {
            terminate(child);
        }
        self.child = None;
        self.phase = Phase::Waiting {
            at: Instant::now() + MAX_RESTART_DELAY,
        };
    }
}

/// Starts `program` with its output appended to `log` (nowhere when it cannot be opened), in
/// its own process group: Ctrl-C reaches local mode, which stops children in order.
fn spawn_logged(program: &Path, args: &[String], log: &Path) -> std::io::Result<Child> {
    let log = File::options().create(true).append(true).open(log);
    let (stdout, stderr) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
        Ok((out, err)) => (Stdio::from(out), Stdio::from(err)),
        Err(_) => (Stdio::null(), Stdio::null()),
    };
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// The last line a process wrote to its log: why it stopped, for a process that never started.
fn last_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let tail = &text[text.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail)
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .map(str::to_owned)
}

/// What to do about a process that could not start, from the reason it gave.
fn fix_for(reason: &str) -> &'static str {
    if reason.contains("error while loading shared libraries") {
        "the binary cannot find a library it was linked against (libtorch): rebuild it after \
         scripts/setup.sh, which records the library's place in the binary, or run \
         `. scripts/env.sh` before infergate up"
    } else if reason.contains("Address already in use") {
        "another process holds that address: stop it, or choose another with --listen / \
         --metrics-listen"
    } else {
        "correct what the line above names, then save the ModelDeployment's file again to \
         retry (or restart infergate up)"
    }
}

/// SIGTERM, the signal every infergate binary drains on.
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
}

async fn stop_all(children: Vec<&mut Supervised>) {
    let mut running: Vec<Child> = children
        .into_iter()
        .filter_map(|c| c.child.take())
        .collect();
    for child in &running {
        terminate(child);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    for child in &mut running {
        if tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

/// Whether `GET path` on `address` answers 200, within a short time.
async fn answers_200(address: &str, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(&head[9..12] == b"200")
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The proxy's file source: every model (endpoints only while its runtime is ready) and every
/// token record.
fn proxy_config(
    options: &UpOptions,
    runtimes: &BTreeMap<String, ModelRuntime>,
    records: &[TokenRecord],
) -> String {
    let models: Vec<serde_json::Value> = runtimes
        .values()
        .map(|runtime| {
            serde_json::json!({
                "id": runtime.id,
                "endpoints": runtime.endpoint().into_iter().collect::<Vec<_>>(),
                "timeouts": runtime.timeouts,
            })
        })
        .collect();
    let config = serde_json::json!({
        "listen": options.listen.to_string(),
        "metrics": options.metrics_listen.to_string(),
        "models": models,
        "tokens": records,
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

fn write_proxy_config(
    path: &Path,
    options: &UpOptions,
    runtimes: &BTreeMap<String, ModelRuntime>,
    records: &[TokenRecord],
) -> anyhow::Result<String> {
    let config = proxy_config(options, runtimes, records);
    write_atomically(path, config.as_bytes(), 0o644)?;
    Ok(config)
}

type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    manifests::files_of(path)
        .unwrap_or_default()
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(&file).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (file, modified, len)
        })
        .collect()
}

fn fingerprint_changed(path: &Path, last: &mut Fingerprint) -> bool {
    let now = fingerprint(path);
    let changed = now != *last;
    *last = now;
    changed
}

/// Prints each new token once, with a request per model it may call.
fn announce(fresh: &[NewToken], manifests: &Manifests, listen: SocketAddr) {
    for new in fresh {
        println!();
        println!(
            "AccessToken {}: new token (shown once; store it now):",
            new.access_token
        );
        println!("    {}", new.token.expose_secret());
        match new.record.expires_at {
            Some(at) => println!("    expires {at}"),
            None => println!("    never expires"),
        }
        for id in &new.record.models {
            let model = manifests
                .models
                .iter()
                .find(|m| m.model_version_id().as_deref() == Some(id));
            if let Some((path, body)) = model.and_then(sample_request) {
                println!(
                    "    curl -s http://{listen}/models/{id}/proxy{path} -H 'Authorization: Bearer {}' {body}",
                    new.token.expose_secret()
                );
            }
        }
        println!();
    }
}

/// A request that shows what `model` does: its path and curl's arguments for the body.
fn sample_request(model: &ModelDeployment) -> Option<(&'static str, String)> {
    let json = |body: &str| format!("-H 'Content-Type: application/json' -d '{body}'");
    let (path, body) = match model.spec.task {
        Task::Embedding => ("/v1/embeddings", r#"{"input": "infergate runs locally"}"#),
        Task::TextClassification => ("/v1/classify", r#"{"inputs": "What a lovely day"}"#),
        Task::Rerank => (
            "/v1/rerank",
            r#"{"query": "what is infergate?", "texts": ["a model gateway", "a garden gate"]}"#,
        ),
        Task::TextGeneration => (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}"#,
        ),
        Task::Translation => ("/v1/translate", r#"{"text": "Hello, world"}"#),
        Task::Tabular => return Some(("/v1/predict", json(&tabular_row(model)))),
        Task::SpeechRecognition => {
            return Some((
                "/v1/audio/transcriptions",
                "-F file=@recording.wav".to_owned(),
            ));
        }
        Task::TextToSpeech => ("/v1/generate-speech", r#"{"text": "Hello from infergate"}"#),
        Task::TextToImage => (
            "/v1/generate-image",
            r#"{"prompt": "a lighthouse at dusk", "num_inference_steps": 20}"#,
        ),
    };
    Some((path, json(body)))
}

/// A row of zeros as wide as the model's signature says its input is.
fn tabular_row(model: &ModelDeployment) -> String {
    // A downloaded model's files may not be there yet: the sample then has one column.
    let signature: Option<serde_json::Value> = match manifests::source(model) {
        Ok(manifests::Source::Dir(dir)) => Some(dir),
        _ => None,
    }
    .and_then(|dir| std::fs::read(dir.join("signature.json")).ok())
    .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let width = signature
        .as_ref()
        .and_then(|s| s["inputs"][0]["tensor-spec"]["shape"].get(1))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(1) as usize;
    serde_json::json!([vec![0.0; width]]).to_string()
}
