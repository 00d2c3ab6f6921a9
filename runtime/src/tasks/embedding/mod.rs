//! `embedding`: TEI's `/embed` and OpenAI's `/v1/embeddings` over a BERT-family encoder with
//! sentence-transformers pooling.

pub mod backend;
pub mod http;

use std::path::Path;
use std::sync::Arc;

use crate::encoder::{Encoder, EncoderFront};
use crate::executor::Executor;
use crate::models::LoadError;
use crate::models::pooling::Pooling;
use crate::settings::Settings;
use crate::tasks::{Built, Context, ModelType, text_encoder};

pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let (encoder, max_length) = text_encoder(dir)?;
    let pooling = Pooling::from_model_dir(dir)?.unwrap_or(Pooling::Mean);
    let (device, kind, limits) = (settings.device, settings.kind, settings.batch);
    let dir = dir.to_owned();
    let load = move || backend::EmbeddingBackend::load(&dir, device, kind, pooling).map(Encoder);
    let (executor, model_thread) = Executor::start(load, limits, context.metrics, context.ready);
    let task = http::EmbeddingTask {
        front: EncoderFront {
            executor,
            tokenizer: encoder,
            max_client_batch_size: settings.max_client_batch_size,
        },
        model_id: context.model_id,
    };
    Ok(Built {
        model_type: ModelType::Embedding {
            pooling: pooling.name(),
        },
        max_input_length: max_length,
        limits,
        routes: http::routes().with_state(Arc::new(task)),
        model_thread,
    })
}
