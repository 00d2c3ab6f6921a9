//! Pooling of token embeddings into one vector per input, as configured by sentence-transformers
//! (`modules.json` → the Pooling module's `config.json`).

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::{LoadError, read_json};

/// How token embeddings become a sentence embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first token's embedding (`[CLS]`, `<s>`).
    Cls,
    /// The mean over real (unpadded) tokens.
    Mean,
    /// The last real token's embedding (decoder-style embedders).
    LastToken,
}

#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

impl Pooling {
    /// The pooling of a sentence-transformers directory; `None` when it has no Pooling module.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Pooling>, LoadError> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(None);
        }
        let modules: Vec<Module> = read_json(&modules_path)?;
        let Some(module) = modules.iter().find(|m| m.kind.ends_with("models.Pooling")) else {
            return Ok(None);
        };
        let config_path = dir.join(&module.path).join("config.json");
        let config: PoolingConfig = read_json(&config_path)?;
        let unsupported = |mode: &str| LoadError::Invalid {
            path: config_path.clone(),
            message: format!("{mode} pooling is not supported"),
        };
        if config.pooling_mode_max_tokens {
            return Err(unsupported("max"));
        }
        if config.pooling_mode_mean_sqrt_len_tokens {
            return Err(unsupported("mean_sqrt_len"));
        }
        let chosen = [
            (config.pooling_mode_cls_token, Pooling::Cls),
            (config.pooling_mode_mean_tokens, Pooling::Mean),
            (config.pooling_mode_lasttoken, Pooling::LastToken),
        ];
        let mut modes = chosen.iter().filter(|(on, _)| *on).map(|(_, mode)| *mode);
        match (modes.next(), modes.next()) {
            (Some(mode), None) => Ok(Some(mode)),
            _ => Err(LoadError::Invalid {
                path: config_path,
                message: "exactly one pooling mode must be set".to_owned(),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
            Pooling::LastToken => "last_token",
        }
    }

    /// hidden: [batch, seq, hidden]; attention_mask: [batch, seq] with 1 for real tokens, right
    /// padded → [batch, hidden]
    pub fn apply(self, hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
        match self {
            Pooling::Cls => hidden.select(1, 0),
            Pooling::Mean => {
                let mask = attention_mask.to_kind(hidden.kind()).unsqueeze(-1);
                let summed = (hidden * &mask).sum_dim_intlist(1, false, hidden.kind());
                summed
                    / mask
                        .sum_dim_intlist(1, false, hidden.kind())
                        .clamp_min(1e-9)
            }
            Pooling::LastToken => {
                let (batch, _, width) = hidden.size3().expect("hidden states are 3-D");
                let last = attention_mask.sum_dim_intlist(1, false, Kind::Int64) - 1;
                hidden
                    .gather(
                        1,
                        &last.view([batch, 1, 1]).expand([batch, 1, width], false),
                        false,
                    )
                    .squeeze_dim(1)
            }
        }
    }
}
