//! `speech-recognition`: Whisper behind the seed's `POST /v1/transcript`, OpenAI's
//! `/v1/audio/transcriptions` and `/v1/audio/translations`, and the endpoint root Hugging Face
//! clients post raw audio to.
//!
//! The HTTP half reads the upload (multipart with explicit limits, or a raw body), decodes and
//! resamples it on the blocking pool, and hands 16 kHz samples to the model thread, which
//! transcribes every request queued meanwhile together, window by window.

pub mod backend;
pub mod form;
pub mod http;

use std::path::Path;
use std::sync::Arc;

use crate::decode::whisper::SpeechTokens;
use crate::executor::Executor;
use crate::models::LoadError;
use crate::models::whisper::{MelFeatures, WhisperConfig};
use crate::settings::Settings;
use crate::tasks::{Built, Context, ModelType};

/// Sizes an upload may have (docs/architecture.md, limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioLimits {
    pub max_audio_bytes: usize,
    pub max_audio_seconds: u64,
}

pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let config = WhisperConfig::load(dir)?;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
        LoadError::Invalid {
            path: dir.to_owned(),
            message: format!("tokenizer.json: {e}"),
        }
    })?;
    let tokens = Arc::new(SpeechTokens::load(dir, &tokenizer)?);
    // Fails here, before the port opens, on a bad preprocessor_config.json.
    MelFeatures::load(dir)?;
    let (device, kind) = (settings.device, settings.kind);
    let (model_dir, model_tokens) = (dir.to_owned(), tokens.clone());
    let load = move || backend::SpeechModel::load(&model_dir, device, kind, model_tokens);
    // Requests queued while a batch runs are transcribed together next, an upload a row.
    let limits = settings.batch.per_row();
    let metrics = context.metrics.clone();
    let (executor, model_thread) = Executor::start(load, limits, context.metrics, context.ready);
    let model_type = ModelType::SpeechRecognition {
        architecture: config.model_type.clone(),
        languages: tokens
            .languages
            .iter()
            .map(|(code, _)| code.clone())
            .collect(),
        translates: tokens.translate.is_some(),
        max_audio_seconds: settings.audio.max_audio_seconds,
        max_audio_bytes: settings.audio.max_audio_bytes,
    };
    let task = Arc::new(http::SpeechRecognitionTask {
        executor,
        tokenizer: Arc::new(tokenizer),
        tokens,
        limits: settings.audio,
        decoding: Arc::new(tokio::sync::Semaphore::new(2)),
        metrics,
    });
    Ok(Built {
        model_type,
        max_input_length: config.max_target_positions as usize,
        limits,
        routes: http::routes().with_state(task),
        model_thread,
    })
}
