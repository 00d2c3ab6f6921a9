//! `translation`: `POST /v1/translate` over a MarianMT model, with greedy and beam search as
//! transformers' `generate` runs them for Marian (the pad token never generated, EOS forced at
//! the length limit).

pub mod backend;
pub mod http;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;

use crate::executor::Executor;
use crate::models::marian::MarianConfig;
use crate::models::{LoadError, read_json};
use crate::settings::Settings;
use crate::tasks::{Built, Context, ModelType};

pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let config = MarianConfig::load(dir)?;
    let tokenizer = Arc::new(tokenizer::MarianTokenizer::load(dir)?);
    // Beams and the length limit from generation_config.json, as `generate` reads them.
    let generation: serde_json::Value =
        read_json(&dir.join("generation_config.json")).unwrap_or_default();
    let default_beams = generation["num_beams"].as_u64().unwrap_or(1).clamp(1, 8) as usize;
    let max_length = (generation["max_length"].as_u64().unwrap_or(512) as usize)
        .min(config.max_position_embeddings as usize);
    let (device, kind) = (settings.device, settings.kind);
    let model_dir = dir.to_owned();
    let load = move || backend::TranslationModel::load(&model_dir, device, kind);
    // Requests queued while a batch runs are translated together next, a text a row.
    let limits = settings.batch.per_row();
    let (executor, model_thread) = Executor::start(load, limits, context.metrics, context.ready);
    let task = Arc::new(http::TranslationTask {
        executor,
        tokenizer,
        default_beams,
        max_length,
        max_client_batch_size: settings.max_client_batch_size,
    });
    Ok(Built {
        model_type: ModelType::Translation {
            num_beams: default_beams,
            max_length,
        },
        max_input_length: max_length,
        limits,
        routes: http::routes().with_state(task),
        model_thread,
    })
}
