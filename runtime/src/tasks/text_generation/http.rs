//! The routes of `text-generation` and their handlers: OpenAI's chat and completions, TGI's
//! `/generate` and `/generate_stream` (and the endpoint root), and the tokenize routes.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use tokenizers::Tokenizer;
use tokio::sync::Semaphore;

use super::plan::{
    ChatPrompt, Plan, Rules, chat_prompt, completion_prompt, fresh_seed, invalid,
    normalise_messages, tgi_knobs,
};
use super::run::{Run, token};
use super::stream::{OpenAiStream, TgiStream};
use super::wire::{ChatTokenizeResponse, GenerateDetails, GenerateResponse, Head, SimpleToken};
use crate::error::ApiError;
use crate::generate::engine::{Engine, Submission};
use crate::generate::sandbox::{RenderRequest, TemplateSandbox};
use crate::generate::template::{ChatTemplates, MAX_TEMPLATE_BYTES, Message, TemplateError};
use crate::server::{RequestDeadline, ValidJson};

// The settings and the request-types fuzz target name these here, where they used to live.
pub use super::plan::GenerationDefaults;
pub use super::wire::{ChatRequest, CompletionRequest, GenerateRequest};

/// The HTTP half of text generation.
#[derive(Debug)]
pub struct GenerationTask {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub templates: Arc<ChatTemplates>,
    pub model_id: String,
    /// OpenAI's and TGI's `system_fingerprint` of every completion: see
    /// [`super::wire::system_fingerprint`].
    pub system_fingerprint: String,
    /// Ids that end a sequence unless a request ignores EOS.
    pub eos_token_ids: Vec<i64>,
    pub defaults: GenerationDefaults,
    /// Renders of request-supplied templates at once: each may burn its whole fuel.
    pub template_renders: Arc<Semaphore>,
    /// Where request-supplied templates render (helper processes with a memory limit).
    pub sandbox: Arc<TemplateSandbox>,
}

/// The request's deadline, when it sent one (parsed once, by the deadline middleware).
type Deadline = Option<Extension<RequestDeadline>>;

fn instant(deadline: Deadline) -> Option<std::time::Instant> {
    deadline.map(|Extension(RequestDeadline(at))| at)
}

impl GenerationTask {
    fn rules(&self) -> Rules<'_> {
        Rules {
            max_sequence_tokens: self.engine.limits.max_sequence_tokens,
            defaults: self.defaults,
            eos_token_ids: &self.eos_token_ids,
        }
    }

    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>, ApiError> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| invalid(format!("the prompt cannot be tokenized: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// TGI's `SimpleToken`s of `text`: ids with their text and byte offsets.
    fn simple_tokens(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<SimpleToken>, ApiError> {
        let encoding = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| invalid(format!("the text cannot be tokenized: {e}")))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, stop))| SimpleToken {
                id,
                start,
                stop,
                text: text.get(start..stop).unwrap_or_default().to_owned(),
            })
            .collect())
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

    /// Submits `plan` to the engine. `every_token`: TGI's answers have one piece per token.
    fn run(&self, plan: Plan, every_token: bool) -> Result<Run, ApiError> {
        let prompt_tokens = plan.prompt.len();
        let events = self.engine.submit(Submission {
            prompt: plan.prompt,
            sampling: plan.sampling,
            stop: plan.stop,
            deadline: plan.deadline,
        })?;
        Ok(Run::new(
            events,
            self.tokenizer.clone(),
            plan.stop_strings,
            every_token,
            prompt_tokens,
        ))
    }
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

async fn tokenize(
    State(task): State<Arc<GenerationTask>>,
    ValidJson(request): ValidJson<GenerateRequest>,
) -> Result<Json<Vec<SimpleToken>>, ApiError> {
    Ok(Json(task.simple_tokens(&request.inputs, true)?))
}

/// The chat as the model's (or the request's) template renders it, and its tokens: what
/// `/v1/chat/completions` would prefill.
async fn chat_tokenize(
    State(task): State<Arc<GenerationTask>>,
    ValidJson(request): ValidJson<ChatRequest>,
) -> Result<Json<ChatTokenizeResponse>, ApiError> {
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
    let tokens = task.simple_tokens(&rendered, false)?;
    Ok(Json(ChatTokenizeResponse {
        templated_text: rendered,
        tokenize_response: tokens,
    }))
}

async fn chat(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let stream = request.stream;
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let (prompt, knobs) = chat_prompt(request)?;
    let tgi_style = matches!(prompt, ChatPrompt::Inputs(_));
    let prompt = match prompt {
        ChatPrompt::Messages {
            messages,
            add_generation_prompt,
            chat_template,
        } => {
            let rendered = task
                .render_chat(messages, add_generation_prompt, chat_template)
                .await?;
            // The template writes the special tokens itself (as transformers tokenizes a
            // rendered chat: without adding any).
            task.tokenize(&rendered, false)?
        }
        ChatPrompt::Inputs(inputs) => task.tokenize(&inputs, true)?,
    };
    let plan = task.rules().plan(prompt, knobs, None, instant(deadline))?;
    answer_openai(&task, plan, true, stream, include_usage, tgi_style).await
}

async fn completions(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompt = completion_prompt(request.prompt, request.echo)?;
    // OpenAI's default for completions is 16 tokens.
    let plan = task.rules().plan(
        task.tokenize(&prompt, true)?,
        request.knobs,
        Some(16),
        instant(deadline),
    )?;
    let include_usage = request
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    answer_openai(&task, plan, false, request.stream, include_usage, false).await
}

/// Runs `plan` and answers in OpenAI's shape: a chat or a text completion, streamed or whole.
async fn answer_openai(
    task: &GenerationTask,
    plan: Plan,
    chat: bool,
    stream: bool,
    include_usage: bool,
    tgi_style: bool,
) -> Result<Response, ApiError> {
    let run = task.run(plan, false)?;
    let head = Head {
        id: format!(
            "{}-{:016x}",
            if chat { "chatcmpl" } else { "cmpl" },
            fresh_seed()
        ),
        created: crate::server::unix_now(),
        model: task.model_id.clone(),
        system_fingerprint: task.system_fingerprint.clone(),
    };
    if stream {
        return Ok(OpenAiStream::new(run, head, chat, include_usage, tgi_style).into_response());
    }
    let answer = run.collect().await?;
    let completion = head.completion(chat, answer.text, answer.finish.openai(), answer.usage);
    Ok(Json(completion).into_response())
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
    Ok(Json([generated(&task, deadline, request).await?]).into_response())
}

async fn generate(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    if request.stream {
        return generate_stream(State(task), deadline, ValidJson(request)).await;
    }
    Ok(Json(generated(&task, deadline, request).await?).into_response())
}

/// `/generate`'s body: the text, and the details when asked for.
async fn generated(
    task: &GenerationTask,
    deadline: Deadline,
    request: GenerateRequest,
) -> Result<GenerateResponse, ApiError> {
    let (knobs, details) = tgi_knobs(request.parameters);
    let seed = knobs.seed;
    let prompt = task.tokenize(&request.inputs, true)?;
    let plan = task.rules().plan(prompt, knobs, None, instant(deadline))?;
    let answer = task.run(plan, true)?.collect().await?;
    Ok(GenerateResponse {
        details: details.then(|| GenerateDetails {
            finish_reason: answer.finish.tgi(),
            generated_tokens: answer.usage.completion_tokens,
            prefill: [],
            seed,
            tokens: answer
                .tokens
                .into_iter()
                .map(|(id, text)| token(&task.tokenizer, Some(id), text))
                .collect(),
        }),
        generated_text: answer.text,
    })
}

async fn generate_stream(
    State(task): State<Arc<GenerationTask>>,
    deadline: Deadline,
    ValidJson(request): ValidJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    let (knobs, _) = tgi_knobs(request.parameters);
    let seed = knobs.seed;
    let prompt = task.tokenize(&request.inputs, true)?;
    let plan = task.rules().plan(prompt, knobs, None, instant(deadline))?;
    Ok(TgiStream::new(task.run(plan, true)?, seed).into_response())
}
