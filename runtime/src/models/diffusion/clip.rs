//! CLIP's text transformer, as Stable Diffusion conditions on it: token and position
//! embeddings, pre-norm layers with causal self-attention, the final layer norm's output.
//!
//! Reference: transformers v5.24.0, `models/clip/modeling_clip.py`.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::models::layers::{Attention, LayerNorm, Linear};
use crate::models::weights::NamedWeights;
use crate::models::{LoadError, read_json};

/// `position_ids`, the buffer of positions 0..max that older transformers versions saved; the
/// positions are computed.
const UNREAD: [&str; 1] = ["*embeddings.position_ids"];

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".to_owned()
}

#[derive(Debug)]
struct Layer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    device: Device,
}

impl ClipTextModel {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<ClipTextModel, LoadError> {
        let config: ClipTextConfig = read_json(&dir.join("config.json"))?;
        if !matches!(config.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(LoadError::Invalid {
                path: dir.join("config.json"),
                message: format!(
                    "hidden_act {:?} is not supported; supported: quick_gelu, gelu",
                    config.hidden_act
                ),
            });
        }
        let w = NamedWeights::load(&super::weight_files(dir)?, device, kind)?;
        let eps = config.layer_norm_eps;
        // Checkpoints saved by transformers before v5 nest everything under `text_model.`.
        let root = if w.has("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("{root}encoder.layers.{i}");
                Ok(Layer {
                    layer_norm1: LayerNorm::load(&w, &format!("{p}.layer_norm1"), eps)?,
                    self_attn: Attention {
                        q: Linear::load(&w, &format!("{p}.self_attn.q_proj"))?,
                        k: Linear::load(&w, &format!("{p}.self_attn.k_proj"))?,
                        v: Linear::load(&w, &format!("{p}.self_attn.v_proj"))?,
                        out: Linear::load(&w, &format!("{p}.self_attn.out_proj"))?,
                        heads: config.num_attention_heads,
                    },
                    layer_norm2: LayerNorm::load(&w, &format!("{p}.layer_norm2"), eps)?,
                    fc1: Linear::load(&w, &format!("{p}.mlp.fc1"))?,
                    fc2: Linear::load(&w, &format!("{p}.mlp.fc2"))?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let model = ClipTextModel {
            token_embedding: w.get(&format!("{root}embeddings.token_embedding.weight"))?,
            position_embedding: w.get(&format!("{root}embeddings.position_embedding.weight"))?,
            final_layer_norm: LayerNorm::load(&w, &format!("{root}final_layer_norm"), eps)?,
            layers,
            config,
            device,
        };
        w.finish(&UNREAD)?;
        Ok(model)
    }

    /// ids [batch, tokens] → hidden states [batch, tokens, hidden].
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let (batch, tokens) = ids.size2().expect("2-D ids");
        let mut hidden = self
            .token_embedding
            .index_select(0, &ids.view([-1]))
            .view([batch, tokens, -1])
            + self.position_embedding.narrow(0, 0, tokens);
        let causal = Tensor::ones([tokens, tokens], (Kind::Bool, self.device)).tril(0);
        let mask = Tensor::zeros([tokens, tokens], (hidden.kind(), self.device))
            .masked_fill(&causal.logical_not(), f64::NEG_INFINITY);
        for layer in &self.layers {
            let h = layer.layer_norm1.forward(&hidden);
            hidden += layer.self_attn.forward(&h, None, Some(&mask));
            let h = layer.fc1.forward(&layer.layer_norm2.forward(&hidden));
            let h = if self.config.hidden_act == "gelu" {
                h.gelu("none")
            } else {
                &h * (&h * 1.702).sigmoid()
            };
            hidden += layer.fc2.forward(&h);
        }
        self.final_layer_norm.forward(&hidden)
    }
}
