//! The tasks a runtime process can serve. Each task's module has the same parts: `http` (routes,
//! request validation, wire types), `backend` (what runs on the model thread, driven by the
//! executor) and a `build` that reads the model's configuration and tokenizer, starts the model
//! thread and gives back what `/info` reports, the routes and the thread.

pub mod classification;
pub mod embedding;
pub mod rerank;
pub mod speech_recognition;
pub mod tabular;
pub mod text_generation;
pub mod text_to_image;
pub mod text_to_speech;
pub mod translation;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::executor::BatchLimits;
use crate::metrics::Metrics;
use crate::models::LoadError;
use crate::tokenize::TextEncoder;

/// What every task's `build` shares with the rest of the runtime.
#[derive(Debug)]
pub struct Context {
    /// The name `/info` and OpenAI's responses report.
    pub model_id: String,
    pub metrics: Metrics,
    /// Turned true by the model thread once it has loaded.
    pub ready: watch::Sender<bool>,
}

/// A task ready to serve.
#[derive(Debug)]
pub struct Built {
    pub model_type: ModelType,
    /// Tokens (or characters, for text to speech) of the longest input the task takes.
    pub max_input_length: usize,
    /// The batching and admission limits the model thread runs with.
    pub limits: BatchLimits,
    pub routes: axum::Router,
    pub model_thread: JoinHandle<Result<(), LoadError>>,
}

/// `/info`'s `model_type`: the task, with what a client needs to know of the model.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelType {
    Embedding {
        pooling: &'static str,
    },
    Classifier {
        id2label: BTreeMap<String, String>,
    },
    Reranker {
        id2label: BTreeMap<String, String>,
    },
    TextGeneration {
        architecture: String,
        max_running_sequences: usize,
        max_sequence_tokens: usize,
        chat_template: bool,
    },
    Translation {
        num_beams: usize,
        max_length: usize,
    },
    SpeechRecognition {
        architecture: String,
        languages: Vec<String>,
        translates: bool,
        max_audio_seconds: u64,
        max_audio_bytes: usize,
    },
    TextToSpeech {
        architecture: String,
        sampling_rate: u32,
        stochastic_durations: bool,
    },
    TextToImage {
        architecture: &'static str,
        scheduler: String,
        default_size: i64,
        refiner: bool,
    },
    Tabular {
        inputs: serde_json::Value,
    },
}

/// The tokenizer of a text encoder and its input limit: the model's, or sentence-transformers'
/// `max_seq_length` when lower.
pub fn text_encoder(dir: &std::path::Path) -> Result<(Arc<TextEncoder>, usize), LoadError> {
    use crate::models::read_json;
    let config: crate::models::bert::BertConfig = read_json(&dir.join("config.json"))?;
    let sentence_limit = read_json::<serde_json::Value>(&dir.join("sentence_bert_config.json"))
        .ok()
        .and_then(|c| c["max_seq_length"].as_u64());
    let model_limit = config.max_input_length() as u64;
    let max_length = sentence_limit.map_or(model_limit, |s| s.min(model_limit)) as usize;
    Ok((Arc::new(TextEncoder::load(dir, max_length)?), max_length))
}

/// TEI's `truncation_direction`. Inputs are cut at the end only.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum TruncationDirection {
    Right,
    Left,
}

/// Refuses `Left`, the one direction TEI defines that this runtime does not cut.
pub fn require_right_truncation(direction: Option<TruncationDirection>) -> Result<(), ApiError> {
    match direction {
        Some(TruncationDirection::Left) => Err(ApiError::InvalidField(
            "truncation_direction: only Right is supported".to_owned(),
        )),
        _ => Ok(()),
    }
}
