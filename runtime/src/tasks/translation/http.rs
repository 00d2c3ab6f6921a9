//! The HTTP half of `translation`: the seed's `/v1/translate` and the endpoint root.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::decode::beam::Search;
use internal_token::usage::Unit;

use crate::error::ApiError;
use crate::executor::Executor;
use crate::server::{OneOrMany, ValidJson};

use super::backend::Job;
use super::tokenizer::MarianTokenizer;

/// The HTTP half.
#[derive(Debug)]
pub struct TranslationTask {
    pub executor: Executor<Job, Vec<Vec<i64>>>,
    pub tokenizer: Arc<MarianTokenizer>,
    pub default_beams: usize,
    pub max_length: usize,
    pub max_client_batch_size: usize,
}

/// `text`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextField {
    One(String),
    Many(Vec<String>),
}

/// The seed's translation request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranslateRequest {
    pub text: TextField,
    #[serde(default)]
    pub source_lang: Option<String>,
    #[serde(default)]
    pub target_lang: Option<String>,
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub num_beams: Option<usize>,
}

pub fn routes() -> Router<Arc<TranslationTask>> {
    Router::new()
        .route("/", post(root))
        .route("/v1/translate", post(translate_route))
        .route("/translate", post(translate_route))
}

/// The seed's translation answer: one translation, or a list, as the request sent.
#[derive(Debug, Serialize)]
struct Translated {
    translation: OneOrMany<String>,
}

/// Hugging Face's translation answer, one per input.
#[derive(Debug, Serialize)]
struct TranslationText {
    translation_text: String,
}

async fn translate_route(
    State(task): State<Arc<TranslationTask>>,
    ValidJson(request): ValidJson<TranslateRequest>,
) -> Result<Json<Translated>, ApiError> {
    let (texts, one) = match request.text {
        TextField::One(text) => (vec![text], true),
        TextField::Many(texts) => (texts, false),
    };
    let translations = task
        .translate(
            "text",
            texts,
            request.target_lang.as_deref(),
            request.max_length,
            request.num_beams,
        )
        .await?;
    Ok(Json(Translated {
        translation: OneOrMany::new(translations, one),
    }))
}

/// What Hugging Face clients post to the endpoint root for translation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootTranslateRequest {
    pub inputs: TextField,
    #[serde(default)]
    pub parameters: RootTranslateParameters,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootTranslateParameters {
    pub src_lang: Option<String>,
    pub tgt_lang: Option<String>,
    /// Always done: decoding drops special tokens and SentencePiece's spacing marks.
    pub clean_up_tokenization_spaces: Option<bool>,
    /// Refused past the limit unless it says otherwise; only `do_not_truncate` is served.
    pub truncation: Option<String>,
    #[serde(default)]
    pub generate_parameters: RootGenerateParameters,
}

#[derive(Debug, Default, Deserialize)]
pub struct RootGenerateParameters {
    pub max_length: Option<usize>,
    pub num_beams: Option<usize>,
}

/// The endpoint root (Hugging Face's translation task): `[{translation_text}]`, one per input.
async fn root(
    State(task): State<Arc<TranslationTask>>,
    ValidJson(request): ValidJson<RootTranslateRequest>,
) -> Result<Json<Vec<TranslationText>>, ApiError> {
    let parameters = request.parameters;
    if let Some(truncation) = parameters.truncation.filter(|t| t != "do_not_truncate") {
        return Err(ApiError::InvalidField(format!(
            "parameters.truncation: only do_not_truncate is served, not {truncation}"
        )));
    }
    let texts = match request.inputs {
        TextField::One(text) => vec![text],
        TextField::Many(texts) => texts,
    };
    let translations = task
        .translate(
            "inputs",
            texts,
            parameters.tgt_lang.as_deref(),
            parameters.generate_parameters.max_length,
            parameters.generate_parameters.num_beams,
        )
        .await?;
    Ok(Json(
        translations
            .into_iter()
            .map(|translation_text| TranslationText { translation_text })
            .collect(),
    ))
}

impl TranslationTask {
    /// Validates and translates `texts` (the request's `field`), in order.
    async fn translate(
        &self,
        field: &'static str,
        texts: Vec<String>,
        target_lang: Option<&str>,
        max_length: Option<usize>,
        num_beams: Option<usize>,
    ) -> Result<Vec<String>, ApiError> {
        if texts.is_empty() {
            return Err(ApiError::InvalidField(format!(
                "{field}: at least one text is required"
            )));
        }
        if texts.len() > self.max_client_batch_size {
            return Err(ApiError::TooManyInputs {
                field,
                count: texts.len(),
                limit: self.max_client_batch_size,
            });
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(ApiError::InvalidField(format!("{field}[{i}]: empty")));
        }
        let beams = num_beams.unwrap_or(self.default_beams);
        if !(1..=8).contains(&beams) {
            return Err(ApiError::InvalidField(
                "num_beams: must be between 1 and 8".to_owned(),
            ));
        }
        let max_length = max_length.unwrap_or(self.max_length);
        if !(2..=self.max_length).contains(&max_length) {
            return Err(ApiError::InvalidField(format!(
                "max_length: must be between 2 and {}",
                self.max_length
            )));
        }
        let prefix = target_lang.and_then(|lang| self.tokenizer.language_token(lang));
        let mut sources = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let text = match &prefix {
                Some(token) => format!("{token} {text}"),
                None => text.clone(),
            };
            let ids = self.tokenizer.encode(&text)?;
            if ids.len() > self.max_length {
                return Err(ApiError::InputTooLong {
                    index: i,
                    tokens: ids.len(),
                    limit: self.max_length,
                });
            }
            sources.push(ids);
        }
        let outputs = self
            .executor
            .run(Job {
                sources,
                search: Search { beams, max_length },
            })
            .await?;
        crate::usage::record(Unit::Inputs, outputs.len() as f64);
        Ok(outputs
            .iter()
            .map(|ids| self.tokenizer.decode(ids))
            .collect())
    }
}
