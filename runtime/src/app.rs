//! Builds a runtime for one task from its settings: loads the tokenizer, starts the model
//! thread and assembles the router.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tch::{Device, Kind};
use tokio::sync::watch;

use crate::batching::{BatchLimits, Batcher};
use crate::metrics::Metrics;
use crate::models::bert::BertConfig;
use crate::models::pooling::Pooling;
use crate::models::{LoadError, read_json};
use crate::server::{Common, Info};
use crate::tasks::embed::{EmbeddingBackend, EmbeddingTask};
use crate::tokenize::TextEncoder;

/// Tasks this runtime serves natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Embedding,
}

impl std::str::FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedding" => Ok(Task::Embedding),
            other => Err(format!(
                "task {other:?} is not served by this runtime build; it serves: embedding"
            )),
        }
    }
}

/// Everything needed to start a runtime.
#[derive(Debug, Clone)]
pub struct Settings {
    pub task: Task,
    pub model_dir: PathBuf,
    pub listen: SocketAddr,
    pub model_id: Option<String>,
    pub limits: BatchLimits,
    pub max_client_batch_size: usize,
    pub device: Device,
    pub kind: Kind,
}

/// A runtime ready to serve: its router and the model thread's handle.
#[derive(Debug)]
pub struct Runtime {
    pub router: axum::Router,
    pub model_thread: std::thread::JoinHandle<Result<(), String>>,
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        _ => "float32",
    }
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
        let config: BertConfig = read_json(&dir.join("config.json"))?;
        let sentence_limit = read_json::<serde_json::Value>(&dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|c| c["max_seq_length"].as_u64());
        let max_length = sentence_limit.map_or(config.max_input_length() as u64, |s| {
            s.min(config.max_input_length() as u64)
        }) as usize;
        let encoder = Arc::new(TextEncoder::load(&dir, max_length)?);
        let pooling = Pooling::from_model_dir(&dir)?.unwrap_or(Pooling::Mean);

        let (ready_tx, ready) = watch::channel(false);
        let (device, kind) = (settings.device, settings.kind);
        let (batcher, model_thread) = Batcher::start(
            move || EmbeddingBackend::load(&dir, device, kind, pooling).map_err(|e| e.to_string()),
            settings.limits,
            metrics.clone(),
            ready_tx,
        );
        let info = Info {
            model_id: model_id.clone(),
            served_model_name: model_id.clone(),
            task: "embedding",
            device: crate::device::device_name(device),
            model_dtype: kind_name(kind).to_owned(),
            model_type: serde_json::json!({"embedding": {"pooling": pooling.name()}}),
            max_concurrent_requests: settings.limits.max_concurrent_requests,
            max_input_length: max_length,
            max_batch_tokens: settings.limits.max_batch_tokens,
            max_batch_requests: Some(settings.limits.max_batch_sequences),
            max_client_batch_size: settings.max_client_batch_size,
            auto_truncate: false,
            tokenization_workers: 1,
            version: env!("CARGO_PKG_VERSION"),
        };
        let common = Common {
            info: Arc::new(info),
            ready,
            metrics,
        };
        let task = Arc::new(EmbeddingTask {
            batcher,
            encoder,
            model_id,
            max_client_batch_size: settings.max_client_batch_size,
        });
        let routes = crate::tasks::embed::routes().with_state(task);
        Ok(Runtime {
            router: crate::server::router(common, routes),
            model_thread,
        })
    }
}
