//! Builds a runtime for one task from its settings: loads the tokenizer, starts the model
//! thread and assembles the router.

use std::sync::Arc;

use tokio::sync::watch;

use crate::encoder::Encoder;
use crate::executor::{BatchLimits, Executor};
use crate::generate::engine::{Engine, EngineLimits};
use crate::generate::sandbox::{MAX_IDLE_HELPERS, TemplateSandbox};
use crate::generate::template::ChatTemplates;
use crate::metrics::Metrics;
use crate::models::bert::BertConfig;
use crate::models::llama::{LlamaConfig, LlamaModel};
use crate::models::pooling::Pooling;
use crate::models::{LoadError, read_json};
use crate::server::{Common, Info};
use crate::settings::{Settings, Task, kind_name};
use crate::tasks::classify::{ClassifierBackend, ClassifierTask, Labels};
use crate::tasks::embed::{EmbeddingBackend, EmbeddingTask};
use crate::tasks::generation::{GenerationTask, eos_token_ids};
use crate::tasks::tabular::{Signature, TabularModel, TabularTask};
use crate::tokenize::TextEncoder;

/// A runtime ready to serve: its router and the model thread's handle.
#[derive(Debug)]
pub struct Runtime {
    pub router: axum::Router,
    pub model_thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Runtime {
    /// Reads the model's configuration and tokenizer here (fast, and errors surface before the
    /// port opens) and loads the weights on the model thread (slow; `/health` says 503 meanwhile).
    pub fn build(settings: Settings, metrics: Metrics) -> Result<Runtime, LoadError> {
        let dir = settings.model_dir.clone();
        let model_id = settings.model_id.clone().unwrap_or_else(|| {
            dir.file_name()
                .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned())
        });
        // Text tasks read the tokenizer and the input limit here; tabular models have neither.
        let text = |dir: &std::path::Path| -> Result<(Arc<TextEncoder>, usize), LoadError> {
            let config: BertConfig = read_json(&dir.join("config.json"))?;
            let sentence_limit =
                read_json::<serde_json::Value>(&dir.join("sentence_bert_config.json"))
                    .ok()
                    .and_then(|c| c["max_seq_length"].as_u64());
            let model_limit = config.max_input_length() as u64;
            let max_length = sentence_limit.map_or(model_limit, |s| s.min(model_limit)) as usize;
            Ok((Arc::new(TextEncoder::load(dir, max_length)?), max_length))
        };
        let (ready_tx, ready) = watch::channel(false);
        let (device, kind, limits) = (settings.device, settings.kind, settings.batch);
        let info = |model_type: serde_json::Value, max_length: usize, limits: BatchLimits| Info {
            model_id: model_id.clone(),
            served_model_name: model_id.clone(),
            task: settings.task.to_string(),
            device: crate::device::device_name(device),
            model_dtype: kind_name(kind).to_owned(),
            model_type,
            max_concurrent_requests: limits.admission.max_concurrent_requests,
            max_input_length: max_length,
            max_batch_tokens: limits.max_batch_tokens,
            max_batch_requests: Some(limits.max_batch_requests),
            max_client_batch_size: settings.max_client_batch_size,
            auto_truncate: false,
            tokenization_workers: 1,
            version: env!("CARGO_PKG_VERSION"),
        };

        let (info, routes, model_thread) = match settings.task {
            Task::Embedding => {
                let (encoder, max_length) = text(&dir)?;
                let pooling = Pooling::from_model_dir(&dir)?.unwrap_or(Pooling::Mean);
                let load = move || {
                    EmbeddingBackend::load(&dir, device, kind, pooling)
                        .map(Encoder)
                        .map_err(|e| e.to_string())
                };
                let (executor, thread) = Executor::start(load, limits, metrics.clone(), ready_tx);
                let task = EmbeddingTask {
                    executor,
                    encoder,
                    model_id: model_id.clone(),
                    max_client_batch_size: settings.max_client_batch_size,
                };
                let info = info(
                    serde_json::json!({"embedding": {"pooling": pooling.name()}}),
                    max_length,
                    limits,
                );
                (
                    info,
                    crate::tasks::embed::routes().with_state(Arc::new(task)),
                    thread,
                )
            }
            Task::TextClassification | Task::Rerank => {
                let (encoder, max_length) = text(&dir)?;
                let labels = Labels::from_model_dir(&dir)?;
                let count = labels.names.len();
                let load = move || {
                    ClassifierBackend::load(&dir, device, kind, count)
                        .map(Encoder)
                        .map_err(|e| e.to_string())
                };
                let (executor, thread) = Executor::start(load, limits, metrics.clone(), ready_tx);
                let key = if settings.task == Task::Rerank {
                    "reranker"
                } else {
                    "classifier"
                };
                let id2label: serde_json::Map<String, serde_json::Value> = labels
                    .names
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i.to_string(), serde_json::json!(l)))
                    .collect();
                let info = info(
                    serde_json::json!({ key: {"id2label": id2label} }),
                    max_length,
                    limits,
                );
                let task = Arc::new(ClassifierTask {
                    executor,
                    encoder,
                    labels,
                    max_client_batch_size: settings.max_client_batch_size,
                });
                let routes = if settings.task == Task::Rerank {
                    crate::tasks::rerank::routes().with_state(task)
                } else {
                    crate::tasks::classify::routes().with_state(task)
                };
                (info, routes, thread)
            }
            Task::TextGeneration => {
                let config = LlamaConfig::load(&dir)?;
                let invalid = |message: String| LoadError::Invalid {
                    path: dir.clone(),
                    message,
                };
                let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                    .map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
                let templates = ChatTemplates::from_model_dir(&dir).map_err(invalid)?;
                let eos = eos_token_ids(&dir)?;
                let generation = settings.generation;
                let model_limit = config.max_position_embeddings as usize;
                let engine_limits = EngineLimits {
                    max_running_sequences: generation.max_running_sequences,
                    max_sequence_tokens: generation.max_sequence_tokens.min(model_limit),
                    max_concurrent_requests: limits.admission.max_concurrent_requests,
                    max_prefill_tokens: generation.max_prefill_tokens,
                    max_slowdown: limits.admission.max_slowdown,
                };
                let system_fingerprint = crate::tasks::generation::system_fingerprint(
                    &model_id,
                    kind_name(kind),
                    &crate::device::device_name(device),
                    &std::fs::read(dir.join("config.json")).unwrap_or_default(),
                );
                let load = move || LlamaModel::load(&dir, device, kind).map_err(|e| e.to_string());
                let (engine, thread) =
                    Engine::start(load, engine_limits, metrics.clone(), ready_tx);
                let info = info(
                    serde_json::json!({"text-generation": {
                        "architecture": config.model_type,
                        "max_running_sequences": engine_limits.max_running_sequences,
                        "max_sequence_tokens": engine_limits.max_sequence_tokens,
                        "chat_template": templates.has_model_template(),
                    }}),
                    engine_limits.max_sequence_tokens - 1,
                    limits,
                );
                let task = Arc::new(GenerationTask {
                    engine,
                    tokenizer: Arc::new(tokenizer),
                    templates: Arc::new(templates),
                    model_id: model_id.clone(),
                    system_fingerprint,
                    eos_token_ids: eos,
                    defaults: generation.defaults,
                    template_renders: Arc::new(tokio::sync::Semaphore::new(MAX_IDLE_HELPERS)),
                    sandbox: Arc::new(TemplateSandbox::new(
                        std::env::current_exe().map_err(|source| LoadError::Read {
                            path: "/proc/self/exe".into(),
                            source,
                        })?,
                        metrics.template_render_cpu.clone(),
                    )),
                });
                (
                    info,
                    crate::tasks::generation::routes().with_state(task),
                    thread,
                )
            }
            Task::Translation => {
                let config = crate::models::marian::MarianConfig::load(&dir)?;
                let tokenizer = Arc::new(crate::tasks::translate::MarianTokenizer::load(&dir)?);
                // Beams and the length limit from generation_config.json, as `generate` reads them.
                let generation: serde_json::Value =
                    read_json(&dir.join("generation_config.json")).unwrap_or_default();
                let default_beams =
                    generation["num_beams"].as_u64().unwrap_or(1).clamp(1, 8) as usize;
                let max_length = (generation["max_length"].as_u64().unwrap_or(512) as usize)
                    .min(config.max_position_embeddings as usize);
                let load = move || {
                    crate::tasks::translate::TranslationModel::load(&dir, device, kind)
                        .map_err(|e| e.to_string())
                };
                // Requests queued while a batch runs are translated together next.
                let limits = limits.per_row();
                let (executor, thread) = Executor::start(load, limits, metrics.clone(), ready_tx);
                let info = info(
                    serde_json::json!({"translation": {"num_beams": default_beams, "max_length": max_length}}),
                    max_length,
                    limits,
                );
                let task = Arc::new(crate::tasks::translate::TranslationTask {
                    executor,
                    tokenizer,
                    default_beams,
                    max_length,
                    max_client_batch_size: settings.max_client_batch_size,
                });
                (
                    info,
                    crate::tasks::translate::routes().with_state(task),
                    thread,
                )
            }
            Task::SpeechRecognition => {
                use crate::tasks::transcribe::{SpeechModel, SpeechRecognitionTask};
                let config = crate::models::whisper::WhisperConfig::load(&dir)?;
                let invalid = |message: String| LoadError::Invalid {
                    path: dir.clone(),
                    message,
                };
                let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                    .map_err(|e| invalid(format!("tokenizer.json: {e}")))?;
                let tokens = Arc::new(crate::tasks::transcribe::decode::SpeechTokens::load(
                    &dir, &tokenizer,
                )?);
                // Fails here, before the port opens, on a bad preprocessor_config.json.
                crate::models::whisper::MelFeatures::load(&dir)?;
                let model_tokens = tokens.clone();
                let load = move || {
                    SpeechModel::load(&dir, device, kind, model_tokens).map_err(|e| e.to_string())
                };
                // Requests queued while a batch runs are transcribed together next.
                let limits = limits.per_row();
                let (executor, thread) = Executor::start(load, limits, metrics.clone(), ready_tx);
                let info = info(
                    serde_json::json!({"speech-recognition": {
                        "architecture": config.model_type,
                        "languages": tokens.languages.iter().map(|(code, _)| code.clone()).collect::<Vec<_>>(),
                        "translates": tokens.translate.is_some(),
                        "max_audio_seconds": settings.audio.max_audio_seconds,
                        "max_audio_bytes": settings.audio.max_audio_bytes,
                    }}),
                    config.max_target_positions as usize,
                    limits,
                );
                let task = Arc::new(SpeechRecognitionTask {
                    executor,
                    tokenizer: Arc::new(tokenizer),
                    tokens,
                    limits: settings.audio,
                    decoding: Arc::new(tokio::sync::Semaphore::new(2)),
                    metrics: metrics.clone(),
                });
                (
                    info,
                    crate::tasks::transcribe::routes().with_state(task),
                    thread,
                )
            }
            Task::TextToSpeech => {
                use crate::tasks::synthesize::{
                    CharacterTokenizer, SpeechSynthesisTask, SpeechSynthesizer,
                };
                let config = crate::models::vits::VitsConfig::load(&dir)?;
                let tokenizer = Arc::new(CharacterTokenizer::load(&dir)?);
                let load =
                    move || SpeechSynthesizer::load(&dir, device, kind).map_err(|e| e.to_string());
                let limits = limits.one_at_a_time();
                let (executor, thread) = Executor::start(load, limits, metrics.clone(), ready_tx);
                let info = info(
                    serde_json::json!({"text-to-speech": {
                        "architecture": config.model_type,
                        "sampling_rate": config.sampling_rate,
                        "stochastic_durations": config.use_stochastic_duration_prediction,
                    }}),
                    crate::tasks::synthesize::MAX_TEXT_CHARS,
                    limits,
                );
                let task = Arc::new(SpeechSynthesisTask {
                    executor,
                    tokenizer,
                    sampling_rate: config.sampling_rate,
                    defaults: crate::models::vits::Synthesis {
                        speaking_rate: config.speaking_rate,
                        noise_scale: config.noise_scale,
                        noise_scale_duration: config.noise_scale_duration,
                    },
                });
                (
                    info,
                    crate::tasks::synthesize::routes().with_state(task),
                    thread,
                )
            }
            Task::TextToImage => {
                use crate::tasks::image::{ClipPrompts, ImageGenerator, ImageTask};
                let unet: crate::models::diffusion::unet::UNetConfig =
                    read_json(&dir.join("unet/config.json"))?;
                let vae: crate::models::diffusion::vae::VaeConfig =
                    read_json(&dir.join("vae/config.json"))?;
                let scheduler: crate::models::diffusion::scheduler::SchedulerConfig =
                    read_json(&dir.join("scheduler/scheduler_config.json"))?;
                let text: serde_json::Value = read_json(&dir.join("text_encoder/config.json"))?;
                let length = text["max_position_embeddings"].as_u64().unwrap_or(77) as usize;
                let prompts = Arc::new(ClipPrompts::load(&dir.join("tokenizer"), length)?);
                let scale = vae.scale_factor();
                let model_metrics = metrics.clone();
                let load = move || {
                    ImageGenerator::load(&dir, device, kind, model_metrics)
                        .map_err(|e| e.to_string())
                };
                let limits = limits.one_at_a_time();
                let (executor, thread) = Executor::start(load, limits, metrics.clone(), ready_tx);
                let default_size = unet.sample_size.unwrap_or(64) * scale;
                let info = info(
                    serde_json::json!({"text-to-image": {
                        "architecture": "stable-diffusion",
                        "scheduler": scheduler.class_name,
                        "default_size": default_size,
                        "refiner": false,
                    }}),
                    length,
                    limits,
                );
                let task = Arc::new(ImageTask {
                    executor,
                    prompts,
                    default_size,
                    size_multiple: scale.max(8),
                    default_sampler: scheduler.default_sampler(),
                });
                (info, crate::tasks::image::routes().with_state(task), thread)
            }
            Task::Tabular => {
                let signature = Arc::new(Signature::load(&dir)?);
                let dtype = signature.input.dtype;
                let load =
                    move || TabularModel::load(&dir, device, dtype).map_err(|e| e.to_string());
                let limits = limits.one_at_a_time();
                let (executor, thread) = Executor::start(load, limits, metrics.clone(), ready_tx);
                let info = info(
                    serde_json::json!({"tabular": {"inputs": signature.input_schema}}),
                    0,
                    limits,
                );
                let task = Arc::new(TabularTask {
                    executor,
                    signature,
                });
                (
                    info,
                    crate::tasks::tabular::routes().with_state(task),
                    thread,
                )
            }
        };
        let common = Common {
            info: Arc::new(info),
            ready,
            metrics,
        };
        Ok(Runtime {
            router: crate::server::router(common, routes),
            model_thread,
        })
    }
}
