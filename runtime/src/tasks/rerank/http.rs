//! The HTTP half of `rerank`: TEI's `/rerank` over the classifier backend.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::server::ValidJson;
use crate::tasks::classification::http::{ClassifierTask, Pair};
use crate::tasks::{TruncationDirection, require_right_truncation};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankRequest {
    pub query: String,
    pub texts: Vec<String>,
    #[serde(default)]
    pub truncate: bool,
    #[serde(default)]
    pub raw_scores: bool,
    #[serde(default)]
    pub return_text: bool,
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Rank {
    pub index: usize,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

pub fn routes() -> Router<Arc<ClassifierTask>> {
    Router::new()
        .route("/", post(rerank))
        .route("/rerank", post(rerank))
        .route("/v1/rerank", post(rerank))
}

async fn rerank(
    State(task): State<Arc<ClassifierTask>>,
    ValidJson(request): ValidJson<RerankRequest>,
) -> Result<Json<Vec<Rank>>, ApiError> {
    require_right_truncation(request.truncation_direction)?;
    if task.labels.names.len() != 1 {
        return Err(ApiError::InvalidField(format!(
            "this model has {} labels; rerank needs a cross-encoder with one",
            task.labels.names.len()
        )));
    }
    let pairs = request
        .texts
        .iter()
        .map(|text| Pair(request.query.clone(), Some(text.clone())))
        .collect();
    let logits = task.logits("texts", pairs, request.truncate).await?;
    let mut ranks: Vec<Rank> = logits
        .iter()
        .zip(request.texts)
        .enumerate()
        .map(|(index, (row, text))| Rank {
            index,
            score: task.labels.scores(row, request.raw_scores)[0],
            text: request.return_text.then_some(text),
        })
        .collect();
    ranks.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(Json(ranks))
}
