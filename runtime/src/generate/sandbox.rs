//! Request-supplied chat templates render in helper processes, never in the runtime.
//!
//! Fuel bounds a template's instructions but not its memory: a few instructions can double a
//! string forty times (`namespace` doubling, recursive macros, `indent(3000000000)`), and an
//! allocation failure aborts the process that makes it. So a request's template runs in a child
//! (`infergate-runtime render-templates`) started under `prlimit` with 256 MiB of data: a bomb
//! kills only the child, the request gets 400, and the next render starts a new child. The
//! limit is on the data segment (`RLIMIT_DATA`: heap and private anonymous
//! mappings), not the address space, which the helper's mapped libraries (libtorch) alone
//! exceed. The model's own template is trusted and renders in-process.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::template::{ChatTemplates, Message, TemplateError};

/// Heap of a helper (`RLIMIT_DATA`); a render of a real chat uses a few MiB.
pub const HELPER_DATA_BYTES: u64 = 256 * 1024 * 1024;
/// Longest wall-clock time of one render; fuel ends a honest one in well under a second.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(2);

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
}

#[derive(Debug)]
struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl TemplateSandbox {
    /// Helpers run `program render-templates` (this runtime's own binary).
    pub fn new(program: PathBuf) -> TemplateSandbox {
        TemplateSandbox {
            program,
            idle: std::sync::Mutex::default(),
        }
    }

    fn spawn(&self) -> Result<Helper, TemplateError> {
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
        let mut child = command.spawn().map_err(|e| {
            TemplateError::Render(format!("cannot start the template sandbox: {e}"))
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(TemplateError::Render(
                "the template sandbox has no pipes".to_owned(),
            ));
        };
        Ok(Helper {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    /// Renders `request` in a helper; a helper that dies or overruns is discarded and the
    /// render refused.
    pub async fn render(&self, request: &RenderRequest) -> Result<String, TemplateError> {
        let reused = self.idle.lock().expect("sandbox helpers").pop();
        let mut helper = match reused {
            Some(helper) => helper,
            None => self.spawn()?,
        };
        let mut line = serde_json::to_vec(request)
            .map_err(|e| TemplateError::Render(format!("cannot encode the render: {e}")))?;
        line.push(b'\n');
        let exchange = async {
            helper.stdin.write_all(&line).await?;
            helper.stdin.flush().await?;
            let mut answer = String::new();
            helper.stdout.read_line(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = match tokio::time::timeout(RENDER_TIMEOUT, exchange).await {
            Ok(Ok(answer)) if !answer.is_empty() => answer,
            Ok(_) => {
                let _ = helper.child.kill().await;
                return Err(TemplateError::ResourcesExhausted);
            }
            Err(_) => {
                let _ = helper.child.kill().await;
                return Err(TemplateError::OutOfTime(RENDER_TIMEOUT));
            }
        };
        let response: RenderResponse = serde_json::from_str(&answer)
            .map_err(|e| TemplateError::Render(format!("the template sandbox answered {e}")))?;
        self.idle.lock().expect("sandbox helpers").push(helper);
        match response {
            RenderResponse::Rendered(text) => Ok(text),
            RenderResponse::Failed(error) => Err(error),
        }
    }
}

/// The helper's side: renders JSON-line requests from stdin until it closes. Compiled templates
/// are cached here, by source, as in the runtime.
pub fn serve_renders() -> std::io::Result<()> {
    use std::io::{BufRead, Write};
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
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
