//! `tabular`: a TorchScript `model.pt` with an MLflow tensor-spec `signature.json`, served on
//! `/v1/predict`. Requests are validated against the signature (shape and dtype) before the
//! model sees them.

pub mod backend;
pub mod http;
pub mod signature;

use std::path::Path;
use std::sync::Arc;

use crate::executor::Executor;
use crate::models::LoadError;
use crate::settings::Settings;
use crate::tasks::{Built, Context, ModelType};

pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let signature = Arc::new(signature::Signature::load(dir)?);
    let (device, dtype) = (settings.device, signature.input.dtype);
    let model_dir = dir.to_owned();
    let load = move || backend::TabularModel::load(&model_dir, device, dtype);
    let limits = settings.batch.one_at_a_time();
    let (executor, model_thread) = Executor::start(load, limits, context.metrics, context.ready);
    let model_type = ModelType::Tabular {
        inputs: signature.input_schema.clone(),
    };
    let task = Arc::new(http::TabularTask {
        executor,
        signature,
    });
    Ok(Built {
        model_type,
        max_input_length: 0,
        limits,
        routes: http::routes().with_state(task),
        model_thread,
    })
}
