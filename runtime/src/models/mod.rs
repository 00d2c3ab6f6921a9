//! Model architectures on tch, and loading them from a Hugging Face model directory.

pub mod attention;
pub mod bert;
pub mod diffusion;
pub mod layers;
pub mod llama;
pub mod marian;
pub mod pooling;
pub mod sentencepiece;
pub mod vits;
pub mod weights;
pub mod whisper;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn};

use bert::{BertConfig, BertModel};

/// Why a model directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "model_type {0:?} is not supported for this task; supported: bert, roberta, xlm-roberta"
    )]
    UnsupportedArchitecture(String),
    #[error("loading weights: {0}")]
    Weights(#[from] tch::TchError),
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Invalid {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The `*.safetensors` files of a directory: the shards an index names, or the single file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let index: Index = read_json(&index)?;
        let files: BTreeSet<&String> = index.weight_map.values().collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(LoadError::Read {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors or model.safetensors.index.json",
        ),
    })
}

/// Tensor names of a safetensors file, read from its header without loading any tensor.
fn tensor_names(path: &Path) -> Result<Vec<String>, LoadError> {
    use std::io::Read;
    let invalid = |message: &str| LoadError::Invalid {
        path: path.to_owned(),
        message: message.to_owned(),
    };
    let mut file = std::fs::File::open(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
    let len = u64::from_le_bytes(len);
    if len > 100 * 1024 * 1024 {
        return Err(invalid("safetensors header over 100 MB"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|_| invalid("safetensors header is not a JSON object"))?;
    Ok(header
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "__metadata__")
        .collect())
}

/// Lays a weight of shape [out, in] out as the transpose of a contiguous [in, out] matrix,
/// keeping its shape. `linear` then multiplies by a contiguous right operand, which MKL does
/// up to 2× faster for the few rows of one request or one decoding step (1.0× from ~300 rows);
/// `runtime/bench/linear_layout.py` measures it. Call it last: a later `set_kind` or
/// `to_device` copies the weight back to the default layout.
pub fn favour_few_rows(weight: &mut Tensor) {
    tch::no_grad(|| {
        let relaid = weight.tr().contiguous().tr();
        weight.set_data(&relaid);
    });
}

/// Loads every variable of `vs` from the checkpoint's files; a variable the files lack is an
/// error naming it, never a silently random weight.
fn load_strict(vs: &mut nn::VarStore, files: &[PathBuf]) -> Result<(), LoadError> {
    let mut missing: Option<BTreeSet<String>> = None;
    for file in files {
        let still_missing: BTreeSet<String> = vs.load_partial(file)?.into_iter().collect();
        missing = Some(match missing {
            None => still_missing,
            Some(before) => before.intersection(&still_missing).cloned().collect(),
        });
    }
    match missing {
        Some(names) if !names.is_empty() => Err(LoadError::Invalid {
            path: files[0].clone(),
            message: format!(
                "weights missing from the checkpoint: {}",
                names.into_iter().collect::<Vec<_>>().join(", ")
            ),
        }),
        _ => Ok(()),
    }
}

/// A BERT-family encoder with its weights loaded, ready to run on `device`.
#[derive(Debug)]
pub struct LoadedEncoder {
    pub config: BertConfig,
    pub model: BertModel,
    /// The sequence-classification head, when loaded with one.
    pub head: Option<ClassifierHead>,
    /// Keeps the weights alive.
    _vs: nn::VarStore,
}

/// The head of `*ForSequenceClassification`, over the first token's hidden state.
#[derive(Debug)]
pub enum ClassifierHead {
    /// BERT: the pooler (dense + tanh), then `classifier`.
    Bert {
        pooler: nn::Linear,
        classifier: nn::Linear,
    },
    /// RoBERTa and XLM-RoBERTa (`RobertaClassificationHead`): dense + tanh, then `out_proj`.
    Roberta {
        dense: nn::Linear,
        out_proj: nn::Linear,
    },
}

impl ClassifierHead {
    fn new(root: &nn::Path, prefix: Option<&str>, cfg: &BertConfig, labels: i64) -> ClassifierHead {
        let h = cfg.hidden_size;
        if cfg.is_roberta() {
            let head = root / "classifier";
            ClassifierHead::Roberta {
                dense: nn::linear(&head / "dense", h, h, Default::default()),
                out_proj: nn::linear(&head / "out_proj", h, labels, Default::default()),
            }
        } else {
            let encoder = match prefix {
                Some(prefix) => root / prefix,
                None => root / "bert",
            };
            ClassifierHead::Bert {
                pooler: nn::linear(&encoder / "pooler" / "dense", h, h, Default::default()),
                classifier: nn::linear(root / "classifier", h, labels, Default::default()),
            }
        }
    }

    /// hidden: [batch, seq, hidden] → logits [batch, labels]
    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        use tch::nn::Module;
        let first = hidden.select(1, 0);
        match self {
            ClassifierHead::Bert { pooler, classifier } => {
                classifier.forward(&pooler.forward(&first).tanh())
            }
            ClassifierHead::Roberta { dense, out_proj } => {
                out_proj.forward(&dense.forward(&first).tanh())
            }
        }
    }
}

impl LoadedEncoder {
    /// Loads a BERT-family encoder from `dir`. Checkpoints saved from a task model
    /// (`BertForSequenceClassification`) prefix the encoder with `bert.` or `roberta.`; the prefix
    /// is found from the tensor names.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LoadedEncoder, LoadError> {
        LoadedEncoder::load_with_head(dir, device, kind, None)
    }

    /// Loads the encoder and a classification head with `labels` outputs.
    pub fn load_classifier(
        dir: &Path,
        device: Device,
        kind: Kind,
        labels: usize,
    ) -> Result<LoadedEncoder, LoadError> {
        LoadedEncoder::load_with_head(dir, device, kind, Some(labels as i64))
    }

    fn load_with_head(
        dir: &Path,
        device: Device,
        kind: Kind,
        labels: Option<i64>,
    ) -> Result<LoadedEncoder, LoadError> {
        // One read of config.json: its model_type decides before the BERT fields are required.
        let path = dir.join("config.json");
        let raw: serde_json::Value = read_json(&path)?;
        let model_type = raw["model_type"].as_str().unwrap_or_default().to_owned();
        if !matches!(
            model_type.as_str(),
            "bert" | "roberta" | "xlm-roberta" | "camembert"
        ) {
            return Err(LoadError::UnsupportedArchitecture(model_type));
        }
        let config: BertConfig = serde_json::from_value(raw).map_err(|e| LoadError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        config
            .validate()
            .map_err(|message| LoadError::Invalid { path, message })?;
        let files = weight_files(dir)?;
        let names = files
            .iter()
            .map(|f| tensor_names(f))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        let prefix = ["bert", "roberta", "model"].into_iter().find(|prefix| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("{prefix}.embeddings.")))
        });

        let mut vs = nn::VarStore::new(device);
        let mut model = match prefix {
            Some(prefix) => BertModel::new(&vs.root() / prefix, &config),
            None => BertModel::new(vs.root(), &config),
        };
        let head = labels.map(|labels| ClassifierHead::new(&vs.root(), prefix, &config, labels));
        load_strict(&mut vs, &files)?;
        vs.set_kind(kind);
        model.fuse();
        Ok(LoadedEncoder {
            config,
            model,
            head,
            _vs: vs,
        })
    }

    /// input_ids, token_type_ids, attention_mask: [batch, seq] → [batch, seq, hidden]
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Tensor {
        self.model
            .forward(input_ids, token_type_ids, attention_mask)
    }
}
