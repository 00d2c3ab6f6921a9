//! The HTTP half of `text-classification`: `/v1/classify`, TEI's `/predict` and the endpoint
//! root.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::encoder::{EncoderFront, Sequence};
use crate::error::ApiError;
use crate::server::{OneOrMany, ValidJson};
use crate::tasks::{TruncationDirection, require_right_truncation};
use crate::tokenize::TextEncoder;

use super::backend::Labels;

/// The HTTP half of a classifier (text-classification or rerank).
#[derive(Debug, Clone)]
pub struct ClassifierTask {
    pub front: EncoderFront,
    pub labels: Labels,
}

impl ClassifierTask {
    /// Tokenizes inputs (texts or text pairs), runs them and returns one row of logits each.
    pub async fn logits(
        &self,
        field: &'static str,
        inputs: Vec<Pair>,
        truncate: bool,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let tokenize = move |tokenizer: &TextEncoder, i: usize, pair: &Pair| {
            pair.tokenize(tokenizer, i, truncate)
        };
        let (logits, _) = self.front.run(field, inputs, tokenize).await?;
        Ok(logits)
    }

    /// Every label with its score, best first.
    fn ranked(&self, logits: &[f32], raw: bool) -> Vec<LabelScore> {
        let mut ranked: Vec<LabelScore> = self
            .labels
            .scores(logits, raw)
            .into_iter()
            .zip(&self.labels.names)
            .map(|(score, label)| LabelScore {
                label: label.clone(),
                score,
            })
            .collect();
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
        ranked
    }
}

/// One text, or a pair of texts (a cross-encoder's query and passage).
#[derive(Debug, Clone)]
pub struct Pair(pub String, pub Option<String>);

impl Pair {
    fn tokenize(
        &self,
        tokenizer: &TextEncoder,
        index: usize,
        truncate: bool,
    ) -> Result<Sequence, ApiError> {
        match &self.1 {
            None => tokenizer.encode(index, &self.0, truncate),
            Some(second) => tokenizer.encode_pair(index, &self.0, second, truncate),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// `{inputs: str or [str]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub inputs: TextOrTexts,
    #[serde(default)]
    pub truncate: bool,
    #[serde(default)]
    pub raw_scores: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextOrTexts {
    One(String),
    Many(Vec<String>),
}

/// TEI's predict input: a text, a pair, or a list of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PredictInput {
    One(PredictSequence),
    Many(Vec<PredictSequence>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PredictSequence {
    Text(String),
    Pair((String, String)),
}

impl From<PredictSequence> for Pair {
    fn from(sequence: PredictSequence) -> Pair {
        match sequence {
            PredictSequence::Text(text) => Pair(text, None),
            PredictSequence::Pair((a, b)) => Pair(a, Some(b)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    pub inputs: PredictInput,
    #[serde(default)]
    pub truncate: bool,
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
}

/// What Hugging Face clients post to the endpoint root for text classification.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootClassifyRequest {
    pub inputs: TextOrTexts,
    #[serde(default)]
    pub parameters: RootClassifyParameters,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootClassifyParameters {
    /// `none` for raw logits; `softmax`/`sigmoid` must be what the model applies.
    pub function_to_apply: Option<String>,
    pub top_k: Option<usize>,
}

pub fn routes() -> Router<Arc<ClassifierTask>> {
    Router::new()
        .route("/", post(root))
        .route("/v1/classify", post(classify))
        .route("/classify", post(classify))
        .route("/predict", post(predict))
        .route("/v1/predict", post(predict))
}

/// One input's labels, best first.
#[derive(Debug, Serialize)]
struct Classification {
    classification: Vec<LabelScore>,
}

async fn classify(
    State(task): State<Arc<ClassifierTask>>,
    ValidJson(request): ValidJson<ClassifyRequest>,
) -> Result<Json<OneOrMany<Classification>>, ApiError> {
    let (texts, single) = match request.inputs {
        TextOrTexts::One(text) => (vec![text], true),
        TextOrTexts::Many(texts) => (texts, false),
    };
    let inputs = texts.into_iter().map(|t| Pair(t, None)).collect();
    let logits = task.logits("inputs", inputs, request.truncate).await?;
    let results = logits
        .iter()
        .map(|row| Classification {
            classification: task.ranked(row, request.raw_scores),
        })
        .collect();
    Ok(Json(OneOrMany::new(results, single)))
}

/// The endpoint root (Hugging Face's text-classification): one list of labels, best first, per
/// input, even for a single text.
async fn root(
    State(task): State<Arc<ClassifierTask>>,
    ValidJson(request): ValidJson<RootClassifyRequest>,
) -> Result<Json<Vec<Vec<LabelScore>>>, ApiError> {
    let own = if task.labels.multi_label || task.labels.names.len() == 1 {
        "sigmoid"
    } else {
        "softmax"
    };
    let raw_scores = match request.parameters.function_to_apply.as_deref() {
        None => false,
        Some("none") => true,
        Some(function) if function == own => false,
        Some(function) => {
            return Err(ApiError::InvalidField(format!(
                "parameters.function_to_apply: this model applies {own} (or none for raw scores), not {function}"
            )));
        }
    };
    let texts = match request.inputs {
        TextOrTexts::One(text) => vec![text],
        TextOrTexts::Many(texts) => texts,
    };
    let inputs = texts.into_iter().map(|t| Pair(t, None)).collect();
    let logits = task.logits("inputs", inputs, false).await?;
    let top_k = request.parameters.top_k.unwrap_or(usize::MAX);
    Ok(Json(
        logits
            .iter()
            .map(|row| {
                let mut ranked = task.ranked(row, raw_scores);
                ranked.truncate(top_k);
                ranked
            })
            .collect(),
    ))
}

async fn predict(
    State(task): State<Arc<ClassifierTask>>,
    ValidJson(request): ValidJson<PredictRequest>,
) -> Result<Json<OneOrMany<Vec<LabelScore>>>, ApiError> {
    require_right_truncation(request.truncation_direction)?;
    let (inputs, single): (Vec<Pair>, bool) = match request.inputs {
        PredictInput::One(sequence) => (vec![sequence.into()], true),
        PredictInput::Many(sequences) => (sequences.into_iter().map(Pair::from).collect(), false),
    };
    let logits = task.logits("inputs", inputs, request.truncate).await?;
    let results = logits
        .iter()
        .map(|row| task.ranked(row, request.raw_scores))
        .collect();
    Ok(Json(OneOrMany::new(results, single)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, multi_label: bool) -> Labels {
        Labels {
            names: (0..n).map(|i| format!("L{i}")).collect(),
            multi_label,
        }
    }

    #[test]
    fn single_label_scores_are_a_softmax() {
        let scores = labels(3, false).scores(&[1.0, 2.0, 3.0], false);
        assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((scores[2] - 0.665_240_9).abs() < 1e-6);
    }

    #[test]
    fn multi_label_and_single_output_scores_are_sigmoids() {
        assert_eq!(labels(2, true).scores(&[0.0, 0.0], false), vec![0.5, 0.5]);
        assert!((labels(1, false).scores(&[2.0], false)[0] - 0.880_797).abs() < 1e-6);
    }

    #[test]
    fn raw_scores_are_the_logits() {
        assert_eq!(labels(2, false).scores(&[-1.5, 4.0], true), vec![-1.5, 4.0]);
    }
}
