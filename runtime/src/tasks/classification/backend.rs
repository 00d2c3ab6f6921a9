//! The model-thread half of a classifier (`text-classification` and `rerank`): the encoder, its
//! classification head and the labels it scores.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind};

use crate::encoder::{EncoderModel, PaddedBatch, tensor_rows};
use crate::error::BackendError;
use crate::models::{LoadError, LoadedEncoder, read_json};

/// Labels and scoring of a classifier, from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// Label names, by output index.
    pub names: Vec<String>,
    /// Independent labels (sigmoid each) rather than one class (softmax over all).
    pub multi_label: bool,
}

#[derive(Deserialize)]
struct ClassifierConfig {
    #[serde(default)]
    id2label: BTreeMap<String, String>,
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    problem_type: Option<String>,
}

impl Labels {
    pub fn from_model_dir(dir: &Path) -> Result<Labels, LoadError> {
        let path = dir.join("config.json");
        let config: ClassifierConfig = read_json(&path)?;
        let mut indexed: Vec<(usize, String)> = config
            .id2label
            .into_iter()
            .map(|(id, label)| id.parse::<usize>().map(|id| (id, label)))
            .collect::<Result<_, _>>()
            .map_err(|_| LoadError::Invalid {
                path: path.clone(),
                message: "id2label keys must be integers".to_owned(),
            })?;
        indexed.sort();
        let mut names: Vec<String> = indexed.into_iter().map(|(_, label)| label).collect();
        if names.is_empty() {
            names = (0..config.num_labels.unwrap_or(2))
                .map(|i| format!("LABEL_{i}"))
                .collect();
        }
        let multi_label = config.problem_type.as_deref() == Some("multi_label_classification");
        Ok(Labels { names, multi_label })
    }

    /// Scores of one row of logits: softmax, or sigmoid per label when multi-label or when the
    /// model has a single output (a cross-encoder's relevance). `raw` returns the logits.
    pub fn scores(&self, logits: &[f32], raw: bool) -> Vec<f32> {
        if raw {
            logits.to_vec()
        } else if self.multi_label || logits.len() == 1 {
            logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect()
        } else {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.into_iter().map(|e| e / sum).collect()
        }
    }
}

/// The model thread's half: encoder and classification head.
#[derive(Debug)]
pub struct ClassifierBackend {
    model: LoadedEncoder,
    device: Device,
}

impl ClassifierBackend {
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        labels: usize,
    ) -> Result<ClassifierBackend, LoadError> {
        Ok(ClassifierBackend {
            model: LoadedEncoder::load_classifier(dir, device, kind, labels)?,
            device,
        })
    }
}

impl EncoderModel for ClassifierBackend {
    fn forward(&mut self, batch: &PaddedBatch) -> Result<Vec<Vec<f32>>, BackendError> {
        let _guard = tch::no_grad_guard();
        let (ids, types, mask) = batch.tensors(self.device);
        let hidden = self.model.forward(&ids, &types, &mask);
        let head = self.model.head.as_ref().ok_or_else(|| {
            BackendError::Output("the classifier was loaded without its head".to_owned())
        })?;
        tensor_rows(&head.forward(&hidden))
    }

    fn pad_id(&self) -> i64 {
        self.model.config.pad_token_id
    }
}
