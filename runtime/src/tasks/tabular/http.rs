//! The HTTP half of `tabular`: `/v1/predict`, `/predict` and `/invocations`, with every request
//! checked against the model's signature before the model sees it.

use super::backend::Matrix;
use super::signature::{Signature, request_rows};
use crate::error::ApiError;
use crate::executor::Executor;
use crate::server::ValidJson;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;

/// The HTTP half.
#[derive(Debug, Clone)]
pub struct TabularTask {
    pub executor: Executor<Matrix, Value>,
    pub signature: Arc<Signature>,
}

pub fn routes() -> Router<Arc<TabularTask>> {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/predict", post(predict))
        .route("/invocations", post(predict))
}

async fn predict(
    State(task): State<Arc<TabularTask>>,
    ValidJson(body): ValidJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let matrix = task.signature.rows(&request_rows(body)?)?;
    let data = task.executor.run(matrix).await?;
    Ok(Json(json!({
        "data": data,
        "meta": {"input_schema": task.signature.input_schema, "output_schema": task.signature.output_schema}
    })))
}
