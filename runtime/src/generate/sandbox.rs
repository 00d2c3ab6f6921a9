//! Request-supplied chat templates render in helper processes, never in the runtime.
//!
//! Fuel bounds a template's instructions but not its memory: a few instructions can double a
//! string forty times (`namespace` doubling, recursive macros, `indent(3000000000)`), and an
//! allocation failure aborts the process that makes it. So a request's template runs in a child
//! (`infergate-runtime render-templates`) started under `prlimit` with 256 MiB of data: a bomb
//! kills only the child, the request gets 400, and the next render starts a new child. The
//! limit is on the data segment (`RLIMIT_DATA`: heap and private anonymous
//! mappings), not the address space, which the helper's mapped libraries (libtorch) alone
//! exceed. CPU is bounded per render, not per helper: the helper's on-CPU time (the scheduler's
//! nanosecond count) is watched while it renders, and one that overspends is killed. Helpers
//! announce themselves ready once loaded, so the dynamic loading of the binary's libraries is
//! not charged to the first render. The model's own template is trusted and renders in-process.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::template::{ChatTemplates, Message, TemplateError};

/// Heap of a helper (`RLIMIT_DATA`); a render of a real chat uses a few MiB.
pub const HELPER_DATA_BYTES: u64 = 256 * 1024 * 1024;
/// CPU one render may use: a bomb is refused within 50 ms of CPU with room for the watch's
/// overshoot. Real chat templates take a few milliseconds even in a debug build.
pub const RENDER_CPU_BUDGET: Duration = Duration::from_millis(30);
/// How often a rendering helper's CPU time is read: the overshoot past the budget.
const CPU_WATCH_INTERVAL: Duration = Duration::from_millis(2);
/// Longest wall-clock time of one render, for a helper starved of CPU rather than spending it.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest time a new helper may take to load.
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Helpers kept loaded between renders: as many as render at once.
pub const MAX_IDLE_HELPERS: usize = 2;
/// What a helper prints once it can render.
const READY_LINE: &str = "ready";

/// One render, as the helper reads it (a JSON line).
#[derive(Debug, Serialize, Deserialize)]
pub struct RenderRequest {
    pub template: String,
    pub messages: Vec<Message>,
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
}

/// The helper's answer (a JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RenderResponse {
    Rendered(String),
    Failed(TemplateError),
}

/// Helper processes, reused while they stay healthy.
#[derive(Debug)]
pub struct TemplateSandbox {
    program: PathBuf,
    idle: std::sync::Mutex<Vec<Helper>>,
    /// CPU seconds of each render, bombs included.
    render_cpu: prometheus::Histogram,
}

#[derive(Debug)]
struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl TemplateSandbox {
    /// Helpers run `program render-templates` (this runtime's own binary).
    pub fn new(program: PathBuf, render_cpu: prometheus::Histogram) -> TemplateSandbox {
        TemplateSandbox {
            program,
            idle: std::sync::Mutex::default(),
            render_cpu,
        }
    }

    async fn spawn(&self) -> Result<Helper, TemplateError> {
        let unavailable =
            |why: String| TemplateError::Render(format!("the template sandbox {why}"));
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--data={HELPER_DATA_BYTES}"))
            .arg("--core=0")
            .arg("--")
            .arg(&self.program)
            .arg("render-templates")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| unavailable(format!("cannot start: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(unavailable("has no pipes".to_owned()));
        };
        let mut helper = Helper {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        };
        let mut greeting = String::new();
        let started =
            tokio::time::timeout(HELPER_START_TIMEOUT, helper.stdout.read_line(&mut greeting))
                .await;
        if !matches!(started, Ok(Ok(_))) || greeting.trim_end() != READY_LINE {
            let _ = helper.child.kill().await;
            return Err(unavailable("did not start".to_owned()));
        }
        Ok(helper)
    }

    /// Starts a helper in the background to stand in for one that was killed, so the next
    /// honest render does not wait for a helper to load.
    fn replace_killed(self: &Arc<Self>) {
        let sandbox = self.clone();
        tokio::spawn(async move {
            if let Ok(helper) = sandbox.spawn().await {
                let mut idle = sandbox.idle.lock().expect("sandbox helpers");
                if idle.len() < MAX_IDLE_HELPERS {
                    idle.push(helper);
                }
            }
        });
    }

    /// Renders `request` in a helper; a helper that dies or overruns is discarded and the
    /// render refused.
    pub async fn render(
        self: &Arc<Self>,
        request: &RenderRequest,
    ) -> Result<String, TemplateError> {
        let reused = self.idle.lock().expect("sandbox helpers").pop();
        let mut helper = match reused {
            Some(helper) => helper,
            None => self.spawn().await?,
        };
        let mut line = serde_json::to_vec(request)
            .map_err(|e| TemplateError::Render(format!("cannot encode the render: {e}")))?;
        line.push(b'\n');
        let clock = helper.child.id().map(CpuClock::of);
        let spent = || clock.as_ref().map_or(Duration::ZERO, CpuClock::spent);
        let exchange = async {
            helper.stdin.write_all(&line).await?;
            helper.stdin.flush().await?;
            let mut answer = String::new();
            helper.stdout.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let overspent = async {
            let mut watch = tokio::time::interval(CPU_WATCH_INTERVAL);
            while spent() <= RENDER_CPU_BUDGET {
                watch.tick().await;
            }
        };
        let outcome = tokio::select! {
            answer = exchange => match answer {
                Ok(answer) if !answer.is_empty() => Ok(answer),
                _ => Err(TemplateError::ResourcesExhausted),
            },
            () = overspent => Err(TemplateError::OutOfCpu(RENDER_CPU_BUDGET)),
            () = tokio::time::sleep(RENDER_TIMEOUT) => Err(TemplateError::OutOfTime(RENDER_TIMEOUT)),
        };
        self.render_cpu.observe(spent().as_secs_f64());
        let answer = match outcome {
            Ok(answer) => answer,
            Err(error) => {
                let _ = helper.child.kill().await;
                self.replace_killed();
                return Err(error);
            }
        };
        let response: RenderResponse = serde_json::from_str(&answer)
            .map_err(|e| TemplateError::Render(format!("the template sandbox answered {e}")))?;
        let mut idle = self.idle.lock().expect("sandbox helpers");
        if idle.len() < MAX_IDLE_HELPERS {
            idle.push(helper);
        }
        drop(idle);
        match response {
            RenderResponse::Rendered(text) => Ok(text),
            RenderResponse::Failed(error) => Err(error),
        }
    }
}

/// On-CPU time of a process's main thread since the clock was made, from the scheduler's
/// nanosecond count (`/proc/<pid>/schedstat`); the last reading stands once the process is gone.
#[derive(Debug)]
struct CpuClock {
    path: PathBuf,
    start: u64,
    last: std::sync::atomic::AtomicU64,
}

impl CpuClock {
    fn of(pid: u32) -> CpuClock {
        let path = PathBuf::from(format!("/proc/{pid}/schedstat"));
        let start = Self::read(&path).unwrap_or(0);
        CpuClock {
            path,
            start,
            last: std::sync::atomic::AtomicU64::new(start),
        }
    }

    fn read(path: &std::path::Path) -> Option<u64> {
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    fn spent(&self) -> Duration {
        use std::sync::atomic::Ordering;
        if let Some(now) = Self::read(&self.path) {
            self.last.fetch_max(now, Ordering::Relaxed);
        }
        Duration::from_nanos(self.last.load(Ordering::Relaxed).saturating_sub(self.start))
    }
}

/// The helper's side: renders JSON-line requests from stdin until it closes. Compiled templates
/// are cached here, by source, as in the runtime.
pub fn serve_renders() -> std::io::Result<()> {
    use std::io::{BufRead, Write};
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{READY_LINE}")?;
    stdout.flush()?;
    let mut templates: Option<(String, String, ChatTemplates)> = None;
    for line in stdin.lines() {
        let line = line?;
        let response = match serde_json::from_str::<RenderRequest>(&line) {
            Err(e) => RenderResponse::Failed(TemplateError::Render(format!("bad request: {e}"))),
            Ok(request) => {
                let tokens = (request.bos_token.clone(), request.eos_token.clone());
                let same_tokens = templates
                    .as_ref()
                    .is_some_and(|(bos, eos, _)| (bos, eos) == (&tokens.0, &tokens.1));
                if !same_tokens {
                    let fresh = ChatTemplates::without_model(&tokens.0, &tokens.1);
                    templates = Some((tokens.0, tokens.1, fresh));
                }
                let (_, _, templates) = templates.as_ref().expect("set above");
                match templates.render(
                    &request.messages,
                    request.add_generation_prompt,
                    Some(&request.template),
                ) {
                    Ok(text) => RenderResponse::Rendered(text),
                    Err(error) => RenderResponse::Failed(error),
                }
            }
        };
        serde_json::to_writer(&mut stdout, &response)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
    Ok(())
}
