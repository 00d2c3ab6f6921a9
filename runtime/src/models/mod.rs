//! Model architectures on tch, and loading them from a Hugging Face model directory. Every model
//! is assembled from the checkpoint's tensors by name ([`weights::NamedWeights`]) and refuses a
//! checkpoint that lacks a tensor it reads or has one it does not, but for the few names each
//! architecture lists as legitimately unread.

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
use tch::{Device, Kind, Tensor};

use bert::{BertConfig, BertModel};
use layers::Linear;
use weights::NamedWeights;

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
    /// `--internal-keys` cannot be read as a JWK set.
    #[error("the proxy's verifying keys: {0}")]
    InternalKeys(#[from] internal_token::watch::WatchError),
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

/// BERT-family tensors no encoder reads: `position_ids`, the buffer of positions 0..max that
/// older transformers versions saved (positions are computed).
const ENCODER_UNREAD: &str = "*embeddings.position_ids";

/// What an encoder loaded without a head leaves unread besides: it serves token states, so the
/// heads of the task the checkpoint was trained for are deliberately ignored — the pooler, BERT's
/// pretraining heads (`cls.`) and RoBERTa's masked-LM head (`lm_head.`), as bert-base-uncased
/// and roberta-base carry them.
const HEADLESS_UNREAD: [&str; 4] = [ENCODER_UNREAD, "*pooler.dense.*", "cls.*", "lm_head.*"];

/// RoBERTa's classification head reads the first token's state without a pooler, but
/// checkpoints fine-tuned with transformers 2.x (roberta-large-mnli) still carry the pooler that
/// `RobertaModel` had then; transformers ignores it too.
const ROBERTA_HEAD_UNREAD: [&str; 2] = [ENCODER_UNREAD, "*pooler.dense.*"];

/// A BERT-family encoder with its weights loaded, ready to run on `device`.
#[derive(Debug)]
pub struct LoadedEncoder {
    pub config: BertConfig,
    pub model: BertModel,
    /// The sequence-classification head, when loaded with one.
    pub head: Option<ClassifierHead>,
}

/// The head of `*ForSequenceClassification`, over the first token's hidden state.
#[derive(Debug)]
pub enum ClassifierHead {
    /// BERT: the pooler (dense + tanh), then `classifier`.
    Bert { pooler: Linear, classifier: Linear },
    /// RoBERTa and XLM-RoBERTa (`RobertaClassificationHead`): dense + tanh, then `out_proj`.
    Roberta { dense: Linear, out_proj: Linear },
}

impl ClassifierHead {
    /// The head of an encoder whose tensor names start with `prefix`.
    fn load(
        w: &NamedWeights,
        prefix: &str,
        cfg: &BertConfig,
        labels: i64,
    ) -> Result<ClassifierHead, LoadError> {
        let h = cfg.hidden_size;
        Ok(if cfg.is_roberta() {
            ClassifierHead::Roberta {
                dense: Linear::sized(w, "classifier.dense", [h, h], true)?,
                out_proj: Linear::sized(w, "classifier.out_proj", [labels, h], true)?,
            }
        } else {
            ClassifierHead::Bert {
                pooler: Linear::sized(w, &format!("{prefix}pooler.dense"), [h, h], true)?,
                classifier: Linear::sized(w, "classifier", [labels, h], true)?,
            }
        })
    }

    /// hidden: [batch, seq, hidden] → logits [batch, labels]
    pub fn forward(&self, hidden: &Tensor) -> Tensor {
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
    /// is found from the tensor names. Tensors the encoder does not read are refused, but for
    /// the pooler and pretraining heads a headless encoder ignores by design.
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
        let w = NamedWeights::load(&weight_files(dir)?, device, kind)?;
        let prefix = ["bert.", "roberta.", "model.", ""]
            .into_iter()
            .find(|prefix| w.has(&format!("{prefix}embeddings.word_embeddings.weight")))
            .unwrap_or_default();
        let model = BertModel::load(&w, prefix, &config)?;
        let head = labels
            .map(|labels| ClassifierHead::load(&w, prefix, &config, labels))
            .transpose()?;
        let unread: &[&str] = match &head {
            None => &HEADLESS_UNREAD,
            Some(ClassifierHead::Roberta { .. }) => &ROBERTA_HEAD_UNREAD,
            Some(ClassifierHead::Bert { .. }) => &[ENCODER_UNREAD],
        };
        w.finish(unread)?;
        Ok(LoadedEncoder {
            config,
            model,
            head,
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

#[cfg(test)]
mod tests {
    use super::*;
    use diffusion::clip::ClipTextModel;
    use serde_json::json;

    /// A model directory (config.json, model.safetensors) under the system's temporary
    /// directory, removed when dropped.
    struct ModelDir(PathBuf);

    impl ModelDir {
        fn new(name: &str, config: serde_json::Value, tensors: &[(String, Vec<i64>)]) -> ModelDir {
            let dir = std::env::temp_dir()
                .join(format!("infergate-models-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            let tensors: Vec<(&str, Tensor)> = tensors
                .iter()
                .map(|(name, shape)| {
                    (
                        name.as_str(),
                        Tensor::randn(shape, (Kind::Float, Device::Cpu)),
                    )
                })
                .collect();
            Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
            ModelDir(dir)
        }
    }

    impl Drop for ModelDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn linear(prefix: &str, [outputs, inputs]: [i64; 2]) -> [(String, Vec<i64>); 2] {
        [
            (format!("{prefix}.weight"), vec![outputs, inputs]),
            (format!("{prefix}.bias"), vec![outputs]),
        ]
    }

    fn norm(prefix: &str, dim: i64) -> [(String, Vec<i64>); 2] {
        [
            (format!("{prefix}.weight"), vec![dim]),
            (format!("{prefix}.bias"), vec![dim]),
        ]
    }

    fn bert_config(layers: i64) -> serde_json::Value {
        json!({
            "model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": layers,
            "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 16
        })
    }

    /// Every tensor of a BERT checkpoint with `layers` layers, and nothing else.
    fn bert_tensors(layers: i64) -> Vec<(String, Vec<i64>)> {
        let mut tensors = vec![
            ("embeddings.word_embeddings.weight".to_owned(), vec![10, 4]),
            (
                "embeddings.position_embeddings.weight".to_owned(),
                vec![16, 4],
            ),
            (
                "embeddings.token_type_embeddings.weight".to_owned(),
                vec![2, 4],
            ),
        ];
        tensors.extend(norm("embeddings.LayerNorm", 4));
        for i in 0..layers {
            let p = format!("encoder.layer.{i}");
            for name in ["query", "key", "value"] {
                tensors.extend(linear(&format!("{p}.attention.self.{name}"), [4, 4]));
            }
            tensors.extend(linear(&format!("{p}.attention.output.dense"), [4, 4]));
            tensors.extend(norm(&format!("{p}.attention.output.LayerNorm"), 4));
            tensors.extend(linear(&format!("{p}.intermediate.dense"), [8, 4]));
            tensors.extend(linear(&format!("{p}.output.dense"), [4, 8]));
            tensors.extend(norm(&format!("{p}.output.LayerNorm"), 4));
        }
        tensors
    }

    fn load_bert(
        name: &str,
        layers: i64,
        tensors: &[(String, Vec<i64>)],
    ) -> Result<LoadedEncoder, LoadError> {
        let dir = ModelDir::new(name, bert_config(layers), tensors);
        LoadedEncoder::load(&dir.0, Device::Cpu, Kind::Float)
    }

    /// Every tensor of a one-layer CLIP text encoder, whose linear layers read a bias only when
    /// the checkpoint has one.
    fn clip_tensors() -> Vec<(String, Vec<i64>)> {
        let mut tensors = vec![
            ("embeddings.token_embedding.weight".to_owned(), vec![10, 4]),
            (
                "embeddings.position_embedding.weight".to_owned(),
                vec![8, 4],
            ),
        ];
        let p = "encoder.layers.0";
        tensors.extend(norm(&format!("{p}.layer_norm1"), 4));
        for name in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            tensors.extend(linear(&format!("{p}.self_attn.{name}"), [4, 4]));
        }
        tensors.extend(norm(&format!("{p}.layer_norm2"), 4));
        tensors.extend(linear(&format!("{p}.mlp.fc1"), [8, 4]));
        tensors.extend(linear(&format!("{p}.mlp.fc2"), [4, 8]));
        tensors.extend(norm("final_layer_norm", 4));
        tensors
    }

    fn load_clip(name: &str, tensors: &[(String, Vec<i64>)]) -> Result<ClipTextModel, LoadError> {
        let config = json!({
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8
        });
        let dir = ModelDir::new(name, config, tensors);
        ClipTextModel::load(&dir.0, Device::Cpu, Kind::Float)
    }

    fn renamed(tensors: Vec<(String, Vec<i64>)>, from: &str, to: &str) -> Vec<(String, Vec<i64>)> {
        tensors
            .into_iter()
            .map(|(name, shape)| (if name == from { to.to_owned() } else { name }, shape))
            .collect()
    }

    #[test]
    fn a_complete_checkpoint_loads() {
        let encoder = load_bert("complete", 1, &bert_tensors(1)).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3]).unsqueeze(0);
        let hidden = encoder.forward(&ids, &ids.zeros_like(), &ids.ones_like());
        assert_eq!(hidden.size(), [1, 3, 4]);
        assert!(load_clip("complete-clip", &clip_tensors()).is_ok());
    }

    #[test]
    fn a_missing_weight_is_refused_naming_it_and_the_file() {
        let missing = "encoder.layer.0.output.dense.weight";
        let mut tensors = bert_tensors(1);
        tensors.retain(|(name, _)| name != missing);
        let error = load_bert("missing", 1, &tensors).unwrap_err().to_string();
        assert!(error.contains(missing), "{error}");
        assert!(error.contains("infergate-models-"), "{error}");
        assert!(error.contains("model.safetensors"), "{error}");
    }

    #[test]
    fn a_weight_whose_shape_differs_from_the_configs_is_refused_naming_it() {
        let tensors = bert_tensors(1)
            .into_iter()
            .map(|(name, shape)| match name.as_str() {
                "encoder.layer.0.intermediate.dense.weight" => (name, vec![6, 4]),
                _ => (name, shape),
            })
            .collect::<Vec<_>>();
        let error = load_bert("shape", 1, &tensors).unwrap_err().to_string();
        assert!(
            error.contains("encoder.layer.0.intermediate.dense.weight has shape [6, 4]"),
            "{error}"
        );
    }

    /// CLIP's linear layers read a bias only where the checkpoint has one: a bias under another
    /// name is left unread, and so refused rather than silently dropped.
    #[test]
    fn a_misnamed_bias_is_refused_naming_it() {
        let misnamed = "encoder.layers.0.self_attn.q_proj.b";
        let tensors = renamed(
            clip_tensors(),
            "encoder.layers.0.self_attn.q_proj.bias",
            misnamed,
        );
        let error = load_clip("misnamed", &tensors).unwrap_err().to_string();
        assert!(error.contains(misnamed), "{error}");
        assert!(error.contains("model.safetensors"), "{error}");
    }

    #[test]
    fn a_weight_the_model_does_not_read_is_refused_with_the_first_names_and_a_count() {
        // Two layers in the checkpoint, one in the config: the second layer's 16 tensors.
        let error = load_bert("extra-layer", 1, &bert_tensors(2))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("encoder.layer.1.attention.output.LayerNorm.bias"),
            "{error}"
        );
        assert!(error.contains("and 11 more"), "{error}");
    }

    #[test]
    fn what_an_architecture_leaves_unread_by_design_is_allowed_and_nothing_else() {
        let mut tensors = bert_tensors(1);
        tensors.push(("embeddings.position_ids".to_owned(), vec![1, 16]));
        tensors.extend(linear("pooler.dense", [4, 4]));
        tensors.push(("cls.predictions.bias".to_owned(), vec![10]));
        assert!(load_bert("headless", 1, &tensors).is_ok());

        // A classifier reads the pooler, but a pretraining head is another task's.
        tensors.extend(linear("classifier", [2, 4]));
        let dir = ModelDir::new("classifier", bert_config(1), &tensors);
        let error = LoadedEncoder::load_classifier(&dir.0, Device::Cpu, Kind::Float, 2)
            .unwrap_err()
            .to_string();
        assert!(error.contains("cls.predictions.bias"), "{error}");
        tensors.retain(|(name, _)| !name.starts_with("cls."));
        let dir = ModelDir::new("classifier-only", bert_config(1), &tensors);
        assert!(LoadedEncoder::load_classifier(&dir.0, Device::Cpu, Kind::Float, 2).is_ok());
    }
}
