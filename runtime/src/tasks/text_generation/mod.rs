//! `text-generation`: OpenAI's `/v1/chat/completions` and `/v1/completions`, streamed (SSE) or
//! not, and TGI's `/generate` and `/generate_stream`, over the continuous-batching engine.
//!
//! The chat route also takes the TGI-style body the seed's clients send,
//! `{"inputs", "max_new_tokens", "do_sample", "stream"}` (also with those under `parameters`):
//! `inputs` is the prompt as is (no chat template, as TGI's `/generate`), and the answer has the
//! chat completion format, streamed or not.

pub mod backend;
pub mod http;
pub mod plan;
pub mod run;
pub mod stream;
pub mod wire;

use std::path::Path;
use std::sync::Arc;

use crate::generate::engine::{Engine, EngineLimits};
use crate::generate::sandbox::{MAX_IDLE_HELPERS, TemplateSandbox};
use crate::generate::template::ChatTemplates;
use crate::models::LoadError;
use crate::models::llama::{LlamaConfig, LlamaModel};
use crate::settings::{Settings, kind_name};
use crate::tasks::{Built, Context, ModelType};

pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let config = LlamaConfig::load(dir)?;
    let invalid = |message: String| LoadError::Invalid {
        path: dir.to_owned(),
        message,
    };
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
    let templates = ChatTemplates::from_model_dir(dir).map_err(invalid)?;
    let eos = plan::eos_token_ids(dir)?;
    let (generation, limits) = (settings.generation, settings.batch);
    let model_limit = config.max_position_embeddings as usize;
    let engine_limits = EngineLimits {
        max_running_sequences: generation.max_running_sequences,
        max_sequence_tokens: generation.max_sequence_tokens.min(model_limit),
        max_concurrent_requests: limits.admission.max_concurrent_requests,
        max_prefill_tokens: generation.max_prefill_tokens,
        queue: limits.admission.queue,
    };
    let (device, kind) = (settings.device, settings.kind);
    let system_fingerprint = wire::system_fingerprint(
        &context.model_id,
        kind_name(kind),
        &crate::device::device_name(device),
        &std::fs::read(dir.join("config.json")).unwrap_or_default(),
    );
    let sandbox = TemplateSandbox::new(
        std::env::current_exe().map_err(|source| LoadError::Read {
            path: "/proc/self/exe".into(),
            source,
        })?,
        context.metrics.template_render_cpu.clone(),
    );
    let model_dir = dir.to_owned();
    let load = move || LlamaModel::load(&model_dir, device, kind);
    let (engine, model_thread) = Engine::start(load, engine_limits, context.metrics, context.ready);
    let model_type = ModelType::TextGeneration {
        architecture: config.model_type.clone(),
        max_running_sequences: engine_limits.max_running_sequences,
        max_sequence_tokens: engine_limits.max_sequence_tokens,
        chat_template: templates.has_model_template(),
    };
    let task = Arc::new(http::GenerationTask {
        engine,
        tokenizer: Arc::new(tokenizer),
        templates: Arc::new(templates),
        model_id: context.model_id,
        system_fingerprint,
        eos_token_ids: eos,
        defaults: generation.defaults,
        template_renders: Arc::new(tokio::sync::Semaphore::new(MAX_IDLE_HELPERS)),
        sandbox: Arc::new(sandbox),
    });
    Ok(Built {
        model_type,
        max_input_length: engine_limits.max_sequence_tokens - 1,
        limits,
        routes: http::routes().with_state(task),
        model_thread,
    })
}
