//! The HTTP half of `text-generation`: OpenAI's chat and completions (with SSE), TGI's
//! `/generate` and `/generate_stream`, tokenize routes; prompts rendered from chat templates.

use crate::error::{ApiError, BackendError};
use crate::generate::engine::{Engine, Event, FinishReason, StopRule, Submission};
use crate::generate::sampling::SamplingParams;
use crate::generate::sandbox::{RenderRequest, TemplateSandbox};
use crate::generate::template::{ChatTemplates, MAX_TEMPLATE_BYTES, Message, TemplateError};
use crate::generate::text::{IncrementalDecoder, StopStrings};
use crate::models::{LoadError, read_json};
use crate::server::{RequestDeadline, ValidJson};
use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokenizers::Tokenizer;
use tokio::sync::{Semaphore, mpsc};

/// Sampling defaults when a request sets none (docs/architecture.md, runtime contract).
#[derive(Debug, Clone, Copy)]
pub struct GenerationDefaults {
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        GenerationDefaults {
            temperature: 0.7,
            top_p: 0.9,
            max_new_tokens: 1024,
        }
    }
}

/// The HTTP half of text generation.
#[derive(Debug)]
pub struct GenerationTask {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub templates: Arc<ChatTemplates>,
    pub model_id: String,
    /// OpenAI's and TGI's `system_fingerprint` of every completion: see [`system_fingerprint`].
    pub system_fingerprint: String,
    /// Ids that end a sequence unless a request ignores EOS.
    pub eos_token_ids: Vec<i64>,
    pub defaults: GenerationDefaults,
    /// Renders of request-supplied templates at once: each may burn its whole fuel.
    pub template_renders: Arc<Semaphore>,
    /// Where request-supplied templates render (helper processes with a memory limit).
    pub sandbox: Arc<TemplateSandbox>,
}

/// The `system_fingerprint` of a loaded model, as OpenAI's and TGI's completions carry it (TGI's
/// OpenAPI document requires it): the runtime's version, the dtype, and a digest of what
/// else decides the outputs for a given request (the model's id, its `config.json`, the
/// device). Stable while one model stays loaded; it changes when any of these does, so a client
/// comparing seeded outputs can tell a changed backend.
pub fn system_fingerprint(model_id: &str, dtype: &str, device: &str, config: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for part in [
        model_id.as_bytes(),
        dtype.as_bytes(),
        device.as_bytes(),
        config,
    ] {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part);
    }
    let hex: String = digest.finalize()[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}-{dtype}-{hex}", env!("CARGO_PKG_VERSION"))
}

/// The EOS ids of a model: `generation_config.json` first (what `generate` uses), then
/// `config.json`; each a number or a list.
pub fn eos_token_ids(dir: &Path) -> Result<Vec<i64>, LoadError> {
    let from = |value: &serde_json::Value| -> Vec<i64> {
        match value {
            serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
            serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_i64()).collect(),
            _ => Vec::new(),
        }
    };
    let generation: serde_json::Value =
        read_json(&dir.join("generation_config.json")).unwrap_or_default();
    let ids = from(&generation["eos_token_id"]);
    if !ids.is_empty() {
        return Ok(ids);
    }
    let config: serde_json::Value = read_json(&dir.join("config.json"))?;
    Ok(from(&config["eos_token_id"]))
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping fields shared by every body shape (OpenAI names, TGI names, and the
/// extensions vLLM clients send: `top_k`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Knobs {
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub max_new_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub do_sample: Option<bool>,
    pub stop: Option<StopField>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub n: Option<u64>,
    pub logprobs: Option<serde_json::Value>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
}

/// TGI's `parameters`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct TgiParameters {
    #[serde(flatten)]
    pub knobs: Knobs,
    #[serde(default)]
    pub details: bool,
}

/// The body of `/v1/chat/completions`: OpenAI's, or TGI-style with `inputs`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Vec<Message>>,
    pub inputs: Option<String>,
    pub parameters: Option<TgiParameters>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    pub knobs: Knobs,
}

/// `prompt` of `/v1/completions`: a string, or a list of one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub knobs: Knobs,
}

/// TGI's `/generate` and `/generate_stream` body.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Option<TgiParameters>,
    #[serde(default)]
    pub stream: bool,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::InvalidField(message.into())
}

/// A validated request, ready to run.
struct Plan {
    prompt: Vec<i64>,
    sampling: SamplingParams,
    stop: StopRule,
    stop_strings: Vec<String>,
    deadline: Option<Instant>,
}

/// A seed for requests without one: distinct per request, not reproducible.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// The request's deadline, when it sent one (parsed once, by the deadline middleware).
type Deadline = Option<Extension<RequestDeadline>>;

fn instant(deadline: Deadline) -> Option<Instant> {
    deadline.map(|Extension(RequestDeadline(at))| at)
}

impl GenerationTask {
    fn plan(
        &self,
        prompt: Vec<i64>,
        knobs: Knobs,
        default_max_tokens: Option<usize>,
        deadline: Option<Instant>,
    ) -> Result<Plan, ApiError> {
        if knobs.n.is_some_and(|n| n != 1) {
            return Err(invalid("n: only 1 choice per request is supported"));
        }
        if knobs
            .logprobs
            .as_ref()
            .is_some_and(|l| !l.is_null() && l != &serde_json::Value::Bool(false))
        {
            return Err(invalid("logprobs: not supported"));
        }
        for (field, value) in [
            ("frequency_penalty", knobs.frequency_penalty),
            ("presence_penalty", knobs.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(invalid(format!(
                    "{field}: not supported; use repetition_penalty"
                )));
            }
        }
        let limit = self.engine.limits.max_sequence_tokens;
        if prompt.is_empty() {
            return Err(invalid("the prompt is empty"));
        }
        if prompt.len() >= limit {
            return Err(ApiError::InputTooLong {
                index: 0,
                tokens: prompt.len(),
                limit: limit - 1,
            });
        }
        let room = limit - prompt.len();
        let (field, asked) = [
            ("max_tokens", knobs.max_tokens),
            ("max_completion_tokens", knobs.max_completion_tokens),
            ("max_new_tokens", knobs.max_new_tokens),
        ]
        .into_iter()
        .find_map(|(field, value)| value.map(|v| (field, v)))
        .unzip();
        let max_new_tokens = match asked {
            Some(0) => {
                return Err(invalid(format!(
                    "{}: must be at least 1",
                    field.unwrap_or_default()
                )));
            }
            Some(n) if n as usize > room => {
                return Err(invalid(format!(
                    "{}: {n} new tokens after a prompt of {} exceed this model's limit of {limit} tokens; ask for at most {room}",
                    field.unwrap_or_default(),
                    prompt.len()
                )));
            }
            Some(n) => n as usize,
            None => default_max_tokens
                .unwrap_or(self.defaults.max_new_tokens)
                .min(room),
        };
        let temperature = match (knobs.do_sample, knobs.temperature) {
            (_, Some(t)) if !t.is_finite() || !(0.0..=100.0).contains(&t) => {
                return Err(invalid("temperature: must be between 0 and 100"));
            }
            (Some(false), _) => 0.0,
            (_, Some(t)) => t as f32,
            (_, None) => self.defaults.temperature,
        };
        let top_p = match knobs.top_p {
            Some(p) if !(p > 0.0 && p <= 1.0) => {
                return Err(invalid("top_p: must be in (0, 1]"));
            }
            Some(p) => p as f32,
            None => self.defaults.top_p,
        };
        let top_k = match knobs.top_k {
            Some(k) if k < 0 => return Err(invalid("top_k: must be 0 (off) or positive")),
            Some(k) => k as usize,
            None => 0,
        };
        let repetition_penalty = match knobs.repetition_penalty {
            Some(r) if !(r.is_finite() && r > 0.0) => {
                return Err(invalid("repetition_penalty: must be positive"));
            }
            Some(r) => r as f32,
            None => 1.0,
        };
        let stop_strings = knobs.stop.map(StopField::into_vec).unwrap_or_default();
        if stop_strings.len() > 16 || stop_strings.iter().any(|s| s.len() > 256) {
            return Err(invalid("stop: at most 16 strings of at most 256 bytes"));
        }
        let mut stop_token_ids = knobs.stop_token_ids.unwrap_or_default();
        if !knobs.ignore_eos.unwrap_or(false) {
            stop_token_ids.extend(&self.eos_token_ids);
        }
        Ok(Plan {
            prompt,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                repetition_penalty,
                seed: knobs.seed.unwrap_or_else(fresh_seed),
            },
            stop: StopRule {
                max_new_tokens,
                stop_token_ids,
            },
            stop_strings,
            deadline,
        })
    }

    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>, ApiError> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| invalid(format!("the prompt cannot be tokenized: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Renders a chat through the model's template or the request's, off the executor.
    async fn render_chat(
        &self,
        messages: Vec<Message>,
        add_generation_prompt: bool,
        request_template: Option<String>,
    ) -> Result<String, ApiError> {
        let templates = self.templates.clone();
        let rendered = match request_template {
            // A request's own template is untrusted code: it renders in the sandbox, and few
            // at once, since each may burn its whole fuel.
            Some(template) if template.len() > MAX_TEMPLATE_BYTES => {
                Err(TemplateError::TooLarge(template.len()))
            }
            Some(template) => {
                let _permit = self
                    .template_renders
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ApiError::ShuttingDown)?;
                let request = RenderRequest {
                    template,
                    messages,
                    add_generation_prompt,
                    bos_token: templates.bos_token().to_owned(),
                    eos_token: templates.eos_token().to_owned(),
                };
                self.sandbox.render(&request).await
            }
            None => tokio::task::spawn_blocking(move || {
                templates.render(&messages, add_generation_prompt, None)
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        };
        rendered.map_err(|e| match e {
            TemplateError::Missing => invalid(e.to_string()),
            other => ApiError::Template(other.to_string()),
        })
    }
}

/// Messages as templates expect them: `content` as text (OpenAI's list of text parts joined).
fn normalise_messages(messages: Vec<Message>) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(invalid("messages: at least one message is required"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, mut message)| {
            if !message.get("role").is_some_and(|r| r.is_string()) {
                return Err(invalid(format!("messages[{i}].role: a string is required")));
            }
            let content = match message.remove("content") {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(text)) => text,
                Some(serde_json::Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part["type"].as_str(), part["text"].as_str()) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(invalid(format!(
                                    "messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported"
                                )));
                            }
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(invalid(format!(
                        "messages[{i}].content: a string or a list of text parts is required"
                    )));
                }
            };
            message.insert("content".to_owned(), content.into());
            Ok(message)
        })
        .collect()
}

pub fn routes() -> Router<Arc<GenerationTask>> {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/", post(compat_generate))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/tokenize", post(tokenize))
        .route("/chat_tokenize", post(chat_tokenize))
}

/// TGI's `SimpleToken`s of `text`: ids with their text and byte offsets.
fn simple_tokens(
    task: &GenerationTask,
    text: &str,
    add_special_tokens: bool,
) -> Result<serde_json::Value, ApiError> {
    let encoding = task
        .tokenizer
        .encode(text, add_special_tokens)
        .map_err(|e| invalid(format!("the text cannot be tokenized: {e}")))?;
    let tokens: Vec<serde_json::Value> = encoding
        .get_ids()
        .iter()
        .zip(encoding.get_offsets())
        .map(|(id, (start, stop))| {
            serde_json::json!({"id": id, "text": text.get(*start..*stop).unwrap_or_default(), "start": start, "stop": stop})
        })
        .collect();
    Ok(serde_json::Value::Array(tokens))
}

async fn tokenize(
    State(task): State<Arc<GenerationTask>>,
    ValidJson(request): ValidJson<GenerateRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(simple_tokens(&task, &request.inputs, true)?))
}

/// The chat as the model's (or the request's) template renders it, and its tokens: what
/// `/v1/chat/completions` would prefill.
async fn chat_tokenize(
    State(task): State<Arc<GenerationTask>>,
    ValidJson(request): ValidJson<ChatRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let messages = normalise_messages(
        request
            .messages
            .ok_or_else(|| invalid("messages: missing field"))?,
    )?;
    let rendered = task
        .render_chat(
            messages,
            request.add_generation_prompt.unwrap_or(true),
            request.chat_template,
        )
        .await?;
    Ok(Json(serde_json::json!({
        "templated_text": rendered,
        "tokenize_response": simple_tokens(&task, &rendered, false)?,
    })))
}

/// One running request, as the answer needs it.
struct Run {
    task: Arc<GenerationTask>,
    events: mpsc::UnboundedReceiver<Event>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    /// TGI streams one event per token, even while its text is held back.
    every_token: bool,
    pieces: VecDeque<Piece>,
    finished: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// A piece of the answer, in order: text pieces, then exactly one of the others.
#[derive(Debug)]
enum Piece {
    Text { text: String, token: Option<i64> },
    Done { finish_reason: Finish },
    Timeout,
    Failed(BackendError),
}

/// Why the answer ended, in the words of each API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    StopToken,
    StopString,
    Length,
}

impl Finish {
    fn openai(self) -> &'static str {
        match self {
            Finish::StopToken | Finish::StopString => "stop",
            Finish::Length => "length",
        }
    }

    fn tgi(self) -> &'static str {
        match self {
            Finish::StopToken => "eos_token",
            Finish::StopString => "stop_sequence",
            Finish::Length => "length",
        }
    }
}

impl Run {
    fn start(task: Arc<GenerationTask>, plan: Plan, every_token: bool) -> Result<Run, ApiError> {
        let prompt_tokens = plan.prompt.len();
        let events = task.engine.submit(Submission {
            prompt: plan.prompt,
            sampling: plan.sampling,
            stop: plan.stop,
            deadline: plan.deadline,
        })?;
        Ok(Run {
            task,
            events,
            decoder: IncrementalDecoder::default(),
            stops: StopStrings::new(plan.stop_strings),
            every_token,
            pieces: VecDeque::new(),
            finished: false,
            prompt_tokens,
            completion_tokens: 0,
        })
    }

    /// The next piece: text as soon as it is safe to show, then the ending.
    async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(piece) = self.pieces.pop_front() {
                return Some(piece);
            }
            if self.finished {
                return None;
            }
            let tokenizer = self.task.tokenizer.clone();
            let Some(event) = self.events.recv().await else {
                self.finished = true;
                self.pieces.push_back(Piece::Failed(BackendError::Output(
                    "the model thread stopped".to_owned(),
                )));
                continue;
            };
            match event {
                Event::Token(token) => {
                    self.completion_tokens += 1;
                    let delta = self.decoder.push(&tokenizer, token);
                    let released = self.stops.push(&delta);
                    if !released.text.is_empty() || self.every_token {
                        self.pieces.push_back(Piece::Text {
                            text: released.text,
                            token: Some(token),
                        });
                    }
                    if released.stopped {
                        // Closing the receiver stops the sequence before the next step.
                        self.events.close();
                        self.finished = true;
                        self.pieces.push_back(Piece::Done {
                            finish_reason: Finish::StopString,
                        });
                    }
                }
                Event::Finished { reason, .. } => {
                    self.finished = true;
                    let tail = self.decoder.finish(&tokenizer);
                    let released = self.stops.push(&tail);
                    let mut rest = released.text;
                    if !released.stopped {
                        rest.push_str(&self.stops.finish());
                    }
                    if !rest.is_empty() {
                        self.pieces.push_back(Piece::Text {
                            text: rest,
                            token: None,
                        });
                    }
                    self.pieces.push_back(match (reason, released.stopped) {
                        (_, true) => Piece::Done {
                            finish_reason: Finish::StopString,
                        },
                        (FinishReason::Deadline, _) => Piece::Timeout,
                        (FinishReason::StopToken, _) => Piece::Done {
                            finish_reason: Finish::StopToken,
                        },
                        (FinishReason::Length, _) => Piece::Done {
                            finish_reason: Finish::Length,
                        },
                    });
                }
                Event::Failed(message) => {
                    self.finished = true;
                    self.pieces.push_back(Piece::Failed(message));
                }
            }
        }
    }

    /// The whole answer: its text, its tokens and why it ended.
    async fn collect(mut self) -> Result<(String, Vec<(i64, String)>, Finish, Run), ApiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(piece) = self.next().await {
            match piece {
                Piece::Text { text: t, token } => {
                    if let Some(token) = token {
                        tokens.push((token, t.clone()));
                    }
                    text.push_str(&t);
                }
                Piece::Done { finish_reason } => return Ok((text, tokens, finish_reason, self)),
                Piece::Timeout => return Err(ApiError::Timeout),
                Piece::Failed(error) => return Err(ApiError::Backend(error)),
            }
        }
        Err(ApiError::Backend(BackendError::Output(
            "the answer ended without a reason".to_owned(),
        )))
    }

    fn usage(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

fn completion_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fresh_seed())
}

/// An SSE response with the headers that keep proxies from buffering it.
fn sse_response<S>(stream: S) -> Response
where
    S: Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn data(value: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// The `event: error` that ends a stream that cannot finish normally.
fn error_event(error: &ApiError) -> SseEvent {
    let (kind, code) = error.kind_and_code();
    SseEvent::default().event("error").data(
        serde_json::json!({"error": {"message": error.to_string(), "type": kind, "code": code}})
            .to_string(),
    )
}

/// What one OpenAI stream sends, in order.
struct OpenAiStream {
    run: Run,
    id: String,
    created: u64,
    model: String,
    chat: bool,
    include_usage: bool,
    state: StreamState,
    /// A TGI-style body on the chat route: its chunks also carry TGI's fields (`token`, and
    /// `generated_text` + `details` on the last), so TGI and OpenAI clients both parse them.
    tgi: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Opening,
    Streaming,
    Usage,
    Done,
    Closed,
}

impl OpenAiStream {
    fn chunk(&self, text: Option<&str>, finish_reason: Option<&str>) -> serde_json::Value {
        let choice = if self.chat {
            // Every delta names the role and has content (empty in the first and the last), as
            // TGI's do and its document requires; OpenAI's clients read either form.
            let delta =
                serde_json::json!({"role": "assistant", "content": text.unwrap_or_default()});
            serde_json::json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
        } else {
            serde_json::json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": finish_reason})
        };
        serde_json::json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.run.task.system_fingerprint,
            "choices": [choice],
        })
    }

    async fn next(&mut self) -> Option<SseEvent> {
        match self.state {
            StreamState::Opening => {
                let opening = self.chat.then(|| data(&self.chunk(None, None)));
                self.state = StreamState::Streaming;
                if opening.is_some() {
                    return opening;
                }
                Box::pin(self.next()).await
            }
            StreamState::Streaming => match self.run.next().await {
                Some(Piece::Text { text, token }) => {
                    let mut chunk = self.chunk(Some(&text), None);
                    if let Some(generated) = &mut self.tgi {
                        generated.push_str(&text);
                        chunk["token"] = match token {
                            Some(id) => token_json(&self.run.task, id, &text),
                            None => {
                                serde_json::json!({"id": null, "text": text, "logprob": null, "special": false})
                            }
                        };
                        chunk["generated_text"] = serde_json::Value::Null;
                        chunk["details"] = serde_json::Value::Null;
                    }
                    Some(data(&chunk))
                }
                Some(Piece::Done { finish_reason }) => {
                    self.state = if self.include_usage {
                        StreamState::Usage
                    } else {
                        StreamState::Done
                    };
                    let mut chunk = self.chunk(None, Some(finish_reason.openai()));
                    if let Some(generated) = &self.tgi {
                        chunk["generated_text"] = serde_json::json!(generated);
                        chunk["details"] = serde_json::json!({
                            "finish_reason": finish_reason.tgi(),
                            "generated_tokens": self.run.completion_tokens,
                            "seed": null,
                        });
                    }
                    Some(data(&chunk))
                }
                Some(Piece::Timeout) => {
                    self.state = StreamState::Closed;
                    Some(error_event(&ApiError::Timeout))
                }
                Some(Piece::Failed(error)) => {
                    self.state = StreamState::Closed;
                    Some(error_event(&ApiError::Backend(error)))
                }
                None => None,
            },
            StreamState::Usage => {
                self.state = StreamState::Done;
                let mut chunk = self.chunk(None, None);
                chunk["choices"] = serde_json::json!([]);
                chunk["usage"] = self.run.usage();
                Some(data(&chunk))
            }
            StreamState::Done => {
                self.state = StreamState::Closed;
                Some(SseEvent::default().data("[DONE]"))
            }
            StreamState::Closed => None,
        }
    }
}

fn openai_stream(stream: OpenAiStream) -> Response {
    sse_response(futures::stream::unfold(stream, |mut stream| async move {
        let event = stream.next().await?;
        Some((Ok(event), stream))
    }))
}

async fn chat(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let tgi_style = request.inputs.is_some();
    let (prompt, knobs) = match (request.messages, request.inputs) {
        (Some(messages), None) => {
            let messages = normalise_messages(messages)?;
            let rendered = task
                .render_chat(
                    messages,
                    request.add_generation_prompt.unwrap_or(true),
                    request.chat_template,
                )
                .await?;
            // The template writes the special tokens itself (as transformers tokenizes a
            // rendered chat: without adding any).
            (task.tokenize(&rendered, false)?, request.knobs)
        }
        (None, Some(inputs)) => {
            let mut knobs = request.knobs;
            if let Some(parameters) = request.parameters {
                knobs = merge(parameters.knobs, knobs);
            }
            (task.tokenize(&inputs, true)?, knobs)
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "send either messages (OpenAI) or inputs (TGI), not both",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "messages: missing field (or send TGI-style inputs)",
            ));
        }
    };
    let plan = task.plan(prompt, knobs, None, instant(deadline))?;
    let include_usage = request.stream_options.unwrap_or_default().include_usage;
    answer_openai(&task, plan, true, request.stream, include_usage, tgi_style).await
}

/// Runs `plan` and answers in OpenAI's shape: a chat or a text completion, streamed or whole.
async fn answer_openai(
    task: &Arc<GenerationTask>,
    plan: Plan,
    chat: bool,
    stream: bool,
    include_usage: bool,
    tgi_style: bool,
) -> Result<Response, ApiError> {
    let run = Run::start(task.clone(), plan, false)?;
    let id = completion_id(if chat { "chatcmpl" } else { "cmpl" });
    let created = crate::server::unix_now();
    if stream {
        return Ok(openai_stream(OpenAiStream {
            run,
            id,
            created,
            model: task.model_id.clone(),
            chat,
            include_usage,
            state: StreamState::Opening,
            tgi: tgi_style.then(String::new),
        }));
    }
    let (text, _, finish, run) = run.collect().await?;
    let (object, choice) = if chat {
        (
            "chat.completion",
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish.openai()}),
        )
    } else {
        (
            "text_completion",
            serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish.openai()}),
        )
    };
    Ok(Json(serde_json::json!({
        "id": id,
        "object": object,
        "created": created,
        "model": task.model_id,
        "system_fingerprint": task.system_fingerprint,
        "choices": [choice],
        "usage": run.usage(),
    }))
    .into_response())
}

/// Knobs from both places a TGI-style body may put them; top-level ones win.
fn merge(nested: Knobs, top: Knobs) -> Knobs {
    Knobs {
        max_tokens: top.max_tokens.or(nested.max_tokens),
        max_completion_tokens: top.max_completion_tokens.or(nested.max_completion_tokens),
        max_new_tokens: top.max_new_tokens.or(nested.max_new_tokens),
        temperature: top.temperature.or(nested.temperature),
        top_p: top.top_p.or(nested.top_p),
        top_k: top.top_k.or(nested.top_k),
        repetition_penalty: top.repetition_penalty.or(nested.repetition_penalty),
        seed: top.seed.or(nested.seed),
        do_sample: top.do_sample.or(nested.do_sample),
        stop: top.stop.or(nested.stop),
        ignore_eos: top.ignore_eos.or(nested.ignore_eos),
        stop_token_ids: top.stop_token_ids.or(nested.stop_token_ids),
        n: top.n.or(nested.n),
        logprobs: top.logprobs.or(nested.logprobs),
        frequency_penalty: top.frequency_penalty.or(nested.frequency_penalty),
        presence_penalty: top.presence_penalty.or(nested.presence_penalty),
    }
}

async fn completions(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompt = match request.prompt {
        PromptField::One(prompt) => prompt,
        PromptField::Many(mut prompts) if prompts.len() == 1 => prompts.remove(0),
        PromptField::Many(_) => return Err(invalid("prompt: one prompt per request is supported")),
    };
    if request.echo {
        return Err(invalid("echo: not supported"));
    }
    // OpenAI's default for completions is 16 tokens.
    let plan = task.plan(
        task.tokenize(&prompt, true)?,
        request.knobs,
        Some(16),
        instant(deadline),
    )?;
    let include_usage = request.stream_options.unwrap_or_default().include_usage;
    answer_openai(&task, plan, false, request.stream, include_usage, false).await
}

fn tgi_plan(
    task: &GenerationTask,
    request: GenerateRequest,
    deadline: Option<Instant>,
) -> Result<(Plan, bool, Option<u64>), ApiError> {
    let parameters = request.parameters.unwrap_or_default();
    let seed = parameters.knobs.seed;
    // TGI samples only with do_sample (or a temperature, top_k or top_p that implies it).
    let mut knobs = parameters.knobs;
    if knobs.do_sample.is_none() {
        let implied = knobs.temperature.is_some() || knobs.top_k.is_some() || knobs.top_p.is_some();
        knobs.do_sample = Some(implied);
    }
    let plan = task.plan(task.tokenize(&request.inputs, true)?, knobs, None, deadline)?;
    Ok((plan, parameters.details, seed))
}

fn token_json(task: &GenerationTask, id: i64, text: &str) -> serde_json::Value {
    let special = task
        .tokenizer
        .id_to_token(u32::try_from(id).unwrap_or(u32::MAX))
        .is_some_and(|t| task.tokenizer.get_added_vocabulary().is_special_token(&t));
    serde_json::json!({"id": id, "text": text, "logprob": null, "special": special})
}

/// TGI's endpoint root: a stream when asked, else `/generate`'s answer in a list of one, as
/// TGI's own `text-generation` client reads it (`huggingface_hub` takes either).
async fn compat_generate(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    if request.stream {
        return generate_stream(State(task), deadline, ValidJson(request)).await;
    }
    Ok(Json([generated(task, deadline, request).await?]).into_response())
}

async fn generate(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    if request.stream {
        return generate_stream(State(task), deadline, ValidJson(request)).await;
    }
    Ok(Json(generated(task, deadline, request).await?).into_response())
}

/// `/generate`'s body: the text, and the details when asked for.
async fn generated(
    task: Arc<GenerationTask>,
    deadline: Deadline,
    request: GenerateRequest,
) -> Result<serde_json::Value, ApiError> {
    let (plan, details, seed) = tgi_plan(&task, request, instant(deadline))?;
    let run = Run::start(task.clone(), plan, true)?;
    let (text, tokens, finish, run) = run.collect().await?;
    let mut body = serde_json::json!({"generated_text": text});
    if details {
        body["details"] = serde_json::json!({
            "finish_reason": finish.tgi(),
            "generated_tokens": run.completion_tokens,
            "seed": seed,
            "prefill": [],
            "tokens": tokens.iter().map(|(id, text)| token_json(&task, *id, text)).collect::<Vec<_>>(),
        });
    }
    Ok(body)
}

async fn generate_stream(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    let (plan, _, seed) = tgi_plan(&task, request, instant(deadline))?;
    let run = Run::start(task.clone(), plan, true)?;
    struct TgiStream {
        run: Run,
        task: Arc<GenerationTask>,
        index: usize,
        text: String,
        last: Option<(i64, String)>,
        seed: Option<u64>,
        closed: bool,
    }
    let state = TgiStream {
        run,
        task,
        index: 0,
        text: String::new(),
        last: None,
        seed,
        closed: false,
    };
    // Each token goes out one event late, so that the last token's event can carry the whole
    // text and the details, as TGI's does.
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.closed {
                return None;
            }
            let event = match s.run.next().await {
                Some(Piece::Text { text, token }) => {
                    s.text.push_str(&text);
                    let previous = match token {
                        Some(id) => s.last.replace((id, text)),
                        None => {
                            if let Some(last) = s.last.as_mut() {
                                last.1.push_str(&text);
                            }
                            None
                        }
                    };
                    let Some((id, text)) = previous else { continue };
                    s.index += 1;
                    data(&serde_json::json!({
                        "index": s.index, "token": token_json(&s.task, id, &text),
                        "generated_text": null, "details": null,
                    }))
                }
                Some(Piece::Done { finish_reason }) => {
                    s.closed = true;
                    let (id, text) = s.last.take().unwrap_or((0, String::new()));
                    s.index += 1;
                    data(&serde_json::json!({
                        "index": s.index,
                        "token": token_json(&s.task, id, &text),
                        "generated_text": s.text,
                        "details": {
                            "finish_reason": finish_reason.tgi(),
                            "generated_tokens": s.run.completion_tokens,
                            "input_length": s.run.prompt_tokens,
                            "seed": s.seed,
                        },
                    }))
                }
                Some(Piece::Timeout) => {
                    s.closed = true;
                    error_event(&ApiError::Timeout)
                }
                Some(Piece::Failed(error)) => {
                    s.closed = true;
                    error_event(&ApiError::Backend(error))
                }
                None => return None,
            };
            return Some((Ok::<_, Infallible>(event), s));
        }
    });
    Ok(sse_response(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_fingerprint_names_the_version_and_dtype_and_follows_the_model() {
        let config = br#"{"model_type": "llama"}"#;
        let fingerprint = system_fingerprint("llama", "float16", "cuda:0", config);
        assert_eq!(
            fingerprint,
            system_fingerprint("llama", "float16", "cuda:0", config),
            "stable for one model"
        );
        let (version, rest) = fingerprint.split_once('-').unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        let (dtype, digest) = rest.rsplit_once('-').unwrap();
        assert_eq!(dtype, "float16");
        assert_eq!(digest.len(), 10);
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
        for other in [
            system_fingerprint("mistral", "float16", "cuda:0", config),
            system_fingerprint("llama", "float32", "cuda:0", config),
            system_fingerprint("llama", "float16", "cpu", config),
            system_fingerprint("llama", "float16", "cuda:0", br#"{"model_type": "qwen2"}"#),
        ] {
            assert_ne!(other, fingerprint);
        }
    }
}
