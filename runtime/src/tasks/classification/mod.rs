//! `text-classification`: `/v1/classify` (every label, best first) and TEI's `/predict`, over a
//! `*ForSequenceClassification` checkpoint. The classifier backend also serves `rerank`.

pub mod backend;
pub mod http;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::encoder::{Encoder, EncoderFront};
use crate::executor::Executor;
use crate::models::LoadError;
use crate::settings::{Settings, Task};
use crate::tasks::{Built, Context, ModelType, text_encoder};

/// A classifier's task: text classification, or (`settings.task` rerank) a cross-encoder's.
pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let (encoder, max_length) = text_encoder(dir)?;
    let labels = backend::Labels::from_model_dir(dir)?;
    let count = labels.names.len();
    let (device, kind, limits) = (settings.device, settings.kind, settings.batch);
    let model_dir = dir.to_owned();
    let load =
        move || backend::ClassifierBackend::load(&model_dir, device, kind, count).map(Encoder);
    let (executor, model_thread) = Executor::start(load, limits, context.metrics, context.ready);
    let id2label: BTreeMap<String, String> = labels
        .names
        .iter()
        .enumerate()
        .map(|(i, label)| (i.to_string(), label.clone()))
        .collect();
    let task = Arc::new(http::ClassifierTask {
        front: EncoderFront {
            executor,
            tokenizer: encoder,
            max_client_batch_size: settings.max_client_batch_size,
        },
        labels,
    });
    let (model_type, routes) = if settings.task == Task::Rerank {
        (
            ModelType::Reranker { id2label },
            crate::tasks::rerank::http::routes().with_state(task),
        )
    } else {
        (
            ModelType::Classifier { id2label },
            http::routes().with_state(task),
        )
    };
    Ok(Built {
        model_type,
        max_input_length: max_length,
        limits,
        routes,
        model_thread,
    })
}
