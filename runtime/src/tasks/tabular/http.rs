//! The HTTP half of `tabular`: `/v1/predict`, `/predict` and `/invocations`, with every request
//! checked against the model's signature before the model sees it, and `/v1/predict/schema`,
//! the signature itself, so a client can shape its rows before it sends one.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use internal_token::usage::Unit;

use crate::error::ApiError;
use crate::executor::Executor;
use crate::server::ValidJson;

use super::backend::Matrix;
use super::signature::{Signature, request_rows};

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
        .route("/v1/predict/schema", get(schema))
        .route("/predict/schema", get(schema))
}

/// The signature as MLflow writes it: `inputs` and `outputs`, lists of tensor specs.
#[derive(Debug, Serialize)]
struct SignatureBody {
    inputs: Value,
    outputs: Value,
}

async fn schema(State(task): State<Arc<TabularTask>>) -> Json<SignatureBody> {
    Json(SignatureBody {
        inputs: task.signature.input_schema.clone(),
        outputs: task.signature.output_schema.clone(),
    })
}

/// MLflow serving's answer: the model's output, and the signature it was checked against (as
/// the model's files have them).
#[derive(Debug, Serialize)]
struct Prediction {
    data: Value,
    meta: Meta,
}

#[derive(Debug, Serialize)]
struct Meta {
    input_schema: Value,
    output_schema: Value,
}

async fn predict(
    State(task): State<Arc<TabularTask>>,
    ValidJson(body): ValidJson<Value>,
) -> Result<Json<Prediction>, ApiError> {
    let matrix = task.signature.rows(&request_rows(body)?)?;
    let rows = matrix.rows;
    let data = task.executor.run(matrix).await?;
    crate::usage::record(Unit::Inputs, rows as f64);
    Ok(Json(Prediction {
        data,
        meta: Meta {
            input_schema: task.signature.input_schema.clone(),
            output_schema: task.signature.output_schema.clone(),
        },
    }))
}
