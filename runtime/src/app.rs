//! Builds a runtime for one task from its settings: the task's `build` loads its configuration
//! and tokenizer and starts its model thread; the shared routes (`server`) wrap its routes.

use std::sync::Arc;

use internal_token::Verifier;
use internal_token::watch::Watched;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::models::LoadError;
use crate::server::{Common, Info};
use crate::settings::{Settings, Task, kind_name};
use crate::tasks::{self, Context};

/// A runtime ready to serve: its router and the model thread's handle.
#[derive(Debug)]
pub struct Runtime {
    pub router: axum::Router,
    pub model_thread: std::thread::JoinHandle<Result<(), LoadError>>,
}

impl Runtime {
    /// Reads the model's configuration and tokenizer here (fast, and errors surface before the
    /// port opens) and loads the weights on the model thread (slow; `/health` says 503 meanwhile).
    pub fn build(settings: Settings, metrics: Metrics) -> Result<Runtime, LoadError> {
        let dir = settings.model_dir.as_path();
        let model_id = settings.model_id.clone().unwrap_or_else(|| {
            dir.file_name()
                .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned())
        });
        let (ready_tx, ready) = watch::channel(false);
        let context = Context {
            model_id: model_id.clone(),
            metrics: metrics.clone(),
            ready: ready_tx,
        };
        let built = match settings.task {
            Task::Embedding => tasks::embedding::build(dir, &settings, context)?,
            Task::TextClassification | Task::Rerank => {
                tasks::classification::build(dir, &settings, context)?
            }
            Task::Tabular => tasks::tabular::build(dir, &settings, context)?,
            Task::TextGeneration => tasks::text_generation::build(dir, &settings, context)?,
            Task::Translation => tasks::translation::build(dir, &settings, context)?,
            Task::SpeechRecognition => tasks::speech_recognition::build(dir, &settings, context)?,
            Task::TextToSpeech => tasks::text_to_speech::build(dir, &settings, context)?,
            Task::TextToImage => tasks::text_to_image::build(dir, &settings, context)?,
        };
        let info = Info {
            served_model_name: model_id.clone(),
            model_id,
            task: settings.task.to_string(),
            device: crate::device::device_name(settings.device),
            model_dtype: kind_name(settings.kind).to_owned(),
            model_type: built.model_type,
            max_concurrent_requests: built.limits.admission.max_concurrent_requests,
            max_queue_time: built.limits.admission.queue.map(|rule| rule.max_queue_time),
            wait_floor: built.limits.admission.queue.map(|rule| rule.wait_floor),
            default_timeout: settings.default_timeout.as_secs_f64(),
            max_input_length: built.max_input_length,
            max_batch_tokens: built.limits.max_batch_tokens,
            max_batch_requests: Some(built.limits.max_batch_requests),
            max_client_batch_size: settings.max_client_batch_size,
            auto_truncate: false,
            tokenization_workers: 1,
            version: env!("CARGO_PKG_VERSION"),
        };
        let internal = match &settings.internal_keys {
            Some(path) => {
                let audience = info.model_id.clone();
                Some(Arc::new(Watched::start(path, move |jwks| {
                    Verifier::parse(jwks, &audience)
                })?))
            }
            None => {
                tracing::warn!(
                    "no --internal-keys: this runtime answers every request that reaches its port, \
                     not only those the proxy signed"
                );
                None
            }
        };
        let common = Common {
            info: Arc::new(info),
            internal,
            default_timeout: settings.default_timeout,
            ready,
            metrics,
        };
        Ok(Runtime {
            router: crate::server::router(common, built.routes),
            model_thread: built.model_thread,
        })
    }
}
