//! The HTTP half of `embedding`: TEI's `/embed` and `/similarity`, OpenAI's `/v1/embeddings`,
//! and the endpoint root.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::encoder::{EncoderFront, Sequence};
use crate::error::ApiError;
use crate::server::ValidJson;
use crate::tasks::{TruncationDirection, require_right_truncation};
use crate::tokenize::TextEncoder;

/// The HTTP half: tokenizer and the executor in front of the model thread.
#[derive(Debug, Clone)]
pub struct EmbeddingTask {
    pub front: EncoderFront,
    pub model_id: String,
}

/// One input: text, or token ids a client tokenized itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum InputItem {
    Text(String),
    Ids(Vec<u32>),
}

/// `inputs` / `input`: one item or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Inputs {
    One(InputItem),
    Many(Vec<InputItem>),
}

impl InputItem {
    fn tokenize(
        &self,
        tokenizer: &TextEncoder,
        index: usize,
        truncate: bool,
    ) -> Result<Sequence, ApiError> {
        match self {
            InputItem::Text(text) => tokenizer.encode(index, text, truncate),
            InputItem::Ids(ids) => tokenizer.from_ids(index, ids, truncate),
        }
    }
}

impl Inputs {
    fn into_items(self) -> Vec<InputItem> {
        match self {
            Inputs::One(item) => vec![item],
            Inputs::Many(items) => items,
        }
    }
}

/// TEI's embed request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    pub inputs: Inputs,
    #[serde(default = "default_true")]
    pub normalize: bool,
    #[serde(default)]
    pub truncate: bool,
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
    #[serde(default)]
    pub dimensions: Option<usize>,
    #[serde(default)]
    pub prompt_name: Option<String>,
}

fn default_true() -> bool {
    true
}

/// OpenAI's embeddings request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiEmbeddingsRequest {
    pub input: Inputs,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    #[serde(default)]
    pub dimensions: Option<usize>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

#[derive(Debug, Serialize)]
struct OpenAiEmbeddingsResponse {
    object: &'static str,
    data: Vec<OpenAiEmbedding>,
    model: String,
    usage: Usage,
}

#[derive(Debug, Serialize)]
struct OpenAiEmbedding {
    object: &'static str,
    embedding: Embedding,
    index: usize,
}

/// A vector as `encoding_format` asks: numbers, or base64 of its little-endian f32 bytes.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// TEI's sentence-similarity request (also what Hugging Face clients post to the endpoint root).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimilarityRequest {
    pub inputs: SimilarityInputs,
    #[serde(default)]
    pub truncate: bool,
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
    #[serde(default)]
    pub prompt_name: Option<String>,
    /// Sent (empty) by huggingface_hub; nothing in it applies.
    #[serde(default)]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimilarityInputs {
    pub source_sentence: String,
    pub sentences: Vec<String>,
}

pub fn routes() -> Router<Arc<EmbeddingTask>> {
    Router::new()
        .route("/", post(root))
        .route("/embed", post(embed))
        .route("/v1/embed", post(embed))
        .route("/similarity", post(similarity))
        .route("/v1/similarity", post(similarity))
        .route("/v1/embeddings", post(openai_embeddings))
}

impl EmbeddingTask {
    /// Validates, tokenizes and embeds; returns the vectors and the number of tokens used.
    async fn run(
        &self,
        field: &'static str,
        inputs: Inputs,
        truncate: bool,
        dimensions: Option<usize>,
        normalize: bool,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        let tokenize = move |tokenizer: &TextEncoder, i: usize, item: &InputItem| {
            item.tokenize(tokenizer, i, truncate)
        };
        let (mut vectors, tokens) = self.front.run(field, inputs.into_items(), tokenize).await?;
        if let Some(dimensions) = dimensions {
            let width = vectors.first().map_or(0, Vec::len);
            if dimensions == 0 || dimensions > width {
                return Err(ApiError::InvalidField(format!(
                    "dimensions must be between 1 and {width}"
                )));
            }
            vectors.iter_mut().for_each(|v| v.truncate(dimensions));
        }
        if normalize {
            vectors.iter_mut().for_each(|v| l2_normalize(v));
        }
        Ok((vectors, tokens))
    }
}

fn l2_normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    vector.iter_mut().for_each(|x| *x /= norm);
}

async fn embed(
    State(task): State<Arc<EmbeddingTask>>,
    ValidJson(request): ValidJson<EmbedRequest>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    if let Some(name) = request.prompt_name {
        return Err(ApiError::InvalidField(format!(
            "prompt_name: this model defines no prompt {name:?}"
        )));
    }
    require_right_truncation(request.truncation_direction)?;
    let (vectors, _) = task
        .run(
            "inputs",
            request.inputs,
            request.truncate,
            request.dimensions,
            request.normalize,
        )
        .await?;
    Ok(Json(vectors))
}

/// Cosine similarity of `source_sentence` with each of `sentences`, in their order.
async fn similarity(
    State(task): State<Arc<EmbeddingTask>>,
    ValidJson(request): ValidJson<SimilarityRequest>,
) -> Result<Json<Vec<f32>>, ApiError> {
    similar(&task, request).await.map(Json)
}

async fn similar(task: &EmbeddingTask, request: SimilarityRequest) -> Result<Vec<f32>, ApiError> {
    if let Some(name) = request.prompt_name {
        return Err(ApiError::InvalidField(format!(
            "prompt_name: this model defines no prompt {name:?}"
        )));
    }
    require_right_truncation(request.truncation_direction)?;
    if request.inputs.sentences.is_empty() {
        return Err(ApiError::InvalidField(
            "inputs.sentences must not be empty".to_owned(),
        ));
    }
    let texts = std::iter::once(request.inputs.source_sentence)
        .chain(request.inputs.sentences)
        .map(InputItem::Text)
        .collect();
    let (vectors, _) = task
        .run(
            "inputs.sentences",
            Inputs::Many(texts),
            request.truncate,
            None,
            true,
        )
        .await?;
    let (source, others) = vectors
        .split_first()
        .expect("the source sentence was embedded");
    Ok(others
        .iter()
        .map(|v| v.iter().zip(source).map(|(a, b)| a * b).sum())
        .collect())
}

/// The endpoint root, where Hugging Face clients post every non-chat call: TEI's `/embed`, or
/// its `/similarity` when `inputs` holds a source sentence and sentences.
async fn root(
    State(task): State<Arc<EmbeddingTask>>,
    ValidJson(body): ValidJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    let invalid = |e: serde_json::Error| ApiError::InvalidField(e.to_string());
    if body["inputs"].is_object() {
        let request: SimilarityRequest = serde_json::from_value(body).map_err(invalid)?;
        Ok(Json(similar(&task, request).await?).into_response())
    } else {
        let request: EmbedRequest = serde_json::from_value(body).map_err(invalid)?;
        Ok(embed(State(task), ValidJson(request))
            .await?
            .into_response())
    }
}

async fn openai_embeddings(
    State(task): State<Arc<EmbeddingTask>>,
    ValidJson(request): ValidJson<OpenAiEmbeddingsRequest>,
) -> Result<Json<OpenAiEmbeddingsResponse>, ApiError> {
    let (vectors, tokens) = task
        .run("input", request.input, false, request.dimensions, true)
        .await?;
    let base64 = request.encoding_format == Some(EncodingFormat::Base64);
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| OpenAiEmbedding {
            object: "embedding",
            embedding: if base64 {
                Embedding::Base64(base64_f32(&vector))
            } else {
                Embedding::Float(vector)
            },
            index,
        })
        .collect();
    let response = OpenAiEmbeddingsResponse {
        object: "list",
        data,
        model: request.model.unwrap_or_else(|| task.model_id.clone()),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    Ok(Json(response))
}

/// Little-endian f32 bytes in standard base64, as OpenAI's `encoding_format: base64` returns.
fn base64_f32(vector: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_encoding() {
        // 1.0f32 little-endian is 00 00 80 3f; b"\0\0\x80?" in base64 is "AACAPw==".
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 2.0]), "AACAPwAAAEA=");
    }

    #[test]
    fn normalised_vectors_have_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
    }

    #[test]
    fn inputs_accept_a_string_a_list_and_token_ids() {
        let one: Inputs = serde_json::from_str(r#""hi""#).unwrap();
        assert_eq!(one.into_items().len(), 1);
        let many: Inputs = serde_json::from_str(r#"["a", [1, 2]]"#).unwrap();
        assert!(matches!(
            many.into_items().as_slice(),
            [InputItem::Text(_), InputItem::Ids(_)]
        ));
        assert!(serde_json::from_str::<Inputs>("42").is_err());
    }
}
