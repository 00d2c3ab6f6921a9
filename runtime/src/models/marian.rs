//! MarianMT, the encoder-decoder of the Helsinki-NLP opus-mt family: post-norm transformer
//! layers, sinusoidal positions (sines in the first half of each vector, cosines in the second),
//! embeddings shared by the encoder, the decoder and the output projection, scaled by
//! √d_model, and a `final_logits_bias`.
//!
//! Reference: transformers v5.24.0, `models/marian/modeling_marian.py`
//! (https://github.com/huggingface/transformers/tree/v5.24.0). Weights are read by their
//! checkpoint names.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::attention::Attention;
use super::layers::{Embedding, LayerNorm, Linear};
use super::weights::NamedWeights;
use super::{LoadError, read_json, weight_files};

/// Checkpoint tensors no Marian model reads: copies of `model.shared.weight` under the names it
/// is tied to (the config must share and tie them), which checkpoints saved before transformers
/// deduplicated tied weights carry, and the sinusoidal position tables, which are computed.
const UNREAD: [&str; 5] = [
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
    "model.encoder.embed_positions.weight",
    "model.decoder.embed_positions.weight",
];

/// `config.json` of a Marian checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct MarianConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub d_model: i64,
    pub encoder_layers: i64,
    pub decoder_layers: i64,
    pub encoder_attention_heads: i64,
    pub decoder_attention_heads: i64,
    pub encoder_ffn_dim: i64,
    pub decoder_ffn_dim: i64,
    pub max_position_embeddings: i64,
    pub pad_token_id: i64,
    pub eos_token_id: i64,
    pub decoder_start_token_id: i64,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_true")]
    pub share_encoder_decoder_embeddings: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default)]
    pub forced_eos_token_id: Option<i64>,
}

fn default_true() -> bool {
    true
}
fn default_activation() -> String {
    "swish".to_owned()
}

impl MarianConfig {
    pub fn load(dir: &Path) -> Result<MarianConfig, LoadError> {
        let path = dir.join("config.json");
        let config: MarianConfig = read_json(&path)?;
        config
            .validate()
            .map_err(|message| LoadError::Invalid { path, message })?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.model_type != "marian" {
            return Err(format!(
                "model_type {:?} is not supported for translation; supported: marian",
                self.model_type
            ));
        }
        if !self.share_encoder_decoder_embeddings {
            return Err("separate encoder and decoder vocabularies (share_encoder_decoder_embeddings: false) are not supported".to_owned());
        }
        if !self.tie_word_embeddings {
            return Err("an output projection apart from the embeddings (tie_word_embeddings: false) is not supported".to_owned());
        }
        if !matches!(
            self.activation_function.as_str(),
            "swish" | "silu" | "gelu" | "relu"
        ) {
            return Err(format!(
                "activation_function {:?} is not supported; supported: swish, gelu, relu",
                self.activation_function
            ));
        }
        Ok(())
    }

    fn activate(&self, x: &Tensor) -> Tensor {
        match self.activation_function.as_str() {
            "gelu" => x.gelu("none"),
            "relu" => x.relu(),
            _ => x.silu(),
        }
    }
}

/// Marian's sinusoidal table, computed in float64 as transformers does and stored in float32.
fn sinusoidal_positions(positions: i64, dim: i64) -> Tensor {
    let half = (dim + 1) / 2;
    let mut table = vec![0f32; (positions * dim) as usize];
    for pos in 0..positions {
        for j in 0..dim {
            let k = if j < half { j } else { j - half };
            let angle = pos as f64 / 10000f64.powf((2 * k) as f64 / dim as f64);
            table[(pos * dim + j) as usize] =
                if j < half { angle.sin() } else { angle.cos() } as f32;
        }
    }
    Tensor::from_slice(&table).view([positions, dim])
}

/// The feed-forward block's two layers, laid out for few rows.
fn feed_forward(
    w: &NamedWeights,
    p: &str,
    dim: i64,
    inner: i64,
) -> Result<(Linear, Linear), LoadError> {
    let linear = |name: &str, shape| {
        Linear::sized(w, &format!("{p}.{name}"), shape, true).map(Linear::favour_few_rows)
    };
    Ok((linear("fc1", [inner, dim])?, linear("fc2", [dim, inner])?))
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(w: &NamedWeights, p: &str, cfg: &MarianConfig) -> Result<EncoderLayer, LoadError> {
        let dim = cfg.d_model;
        let norm = |name: &str| LayerNorm::sized(w, &format!("{p}.{name}"), dim, 1e-5);
        let heads = cfg.encoder_attention_heads;
        let (fc1, fc2) = feed_forward(w, p, dim, cfg.encoder_ffn_dim)?;
        Ok(EncoderLayer {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), dim, heads, true)?,
            self_attn_layer_norm: norm("self_attn_layer_norm")?,
            fc1,
            fc2,
            final_layer_norm: norm("final_layer_norm")?,
        })
    }
}

impl DecoderLayer {
    fn load(w: &NamedWeights, p: &str, cfg: &MarianConfig) -> Result<DecoderLayer, LoadError> {
        let dim = cfg.d_model;
        let norm = |name: &str| LayerNorm::sized(w, &format!("{p}.{name}"), dim, 1e-5);
        let heads = cfg.decoder_attention_heads;
        let (fc1, fc2) = feed_forward(w, p, dim, cfg.decoder_ffn_dim)?;
        Ok(DecoderLayer {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), dim, heads, true)?,
            self_attn_layer_norm: norm("self_attn_layer_norm")?,
            encoder_attn: Attention::load(w, &format!("{p}.encoder_attn"), dim, heads, true)?,
            encoder_attn_layer_norm: norm("encoder_attn_layer_norm")?,
            fc1,
            fc2,
            final_layer_norm: norm("final_layer_norm")?,
        })
    }
}

/// The encoder's output for a batch, and each decoder layer's keys and values of it.
#[derive(Debug)]
pub struct Encoded {
    /// [batch, 1, 1, source] additive mask of the source padding.
    mask: Tensor,
    cross: Vec<(Tensor, Tensor)>,
}

/// Keys and values of the decoded prefix, per decoder layer: [rows, heads, steps, head_dim].
#[derive(Debug, Default)]
pub struct DecoderCache {
    layers: Vec<(Tensor, Tensor)>,
    steps: i64,
}

impl Encoded {
    /// Keeps the rows `rows` (beam search reorders hypotheses between steps).
    pub fn select(&self, rows: &Tensor) -> Encoded {
        Encoded {
            mask: self.mask.index_select(0, rows),
            cross: self
                .cross
                .iter()
                .map(|(k, v)| (k.index_select(0, rows), v.index_select(0, rows)))
                .collect(),
        }
    }
}

impl DecoderCache {
    pub fn select(&self, rows: &Tensor) -> DecoderCache {
        DecoderCache {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| (k.index_select(0, rows), v.index_select(0, rows)))
                .collect(),
            steps: self.steps,
        }
    }
}

/// A Marian model with its weights loaded.
#[derive(Debug)]
pub struct MarianModel {
    pub config: MarianConfig,
    shared: Embedding,
    final_logits_bias: Tensor,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    positions: Tensor,
    embed_scale: f64,
    device: Device,
}

impl MarianModel {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<MarianModel, LoadError> {
        let config = MarianConfig::load(dir)?;
        let w = NamedWeights::load(&weight_files(dir)?, device, kind)?;
        let (vocab, dim) = (config.vocab_size, config.d_model);
        let encoder = (0..config.encoder_layers)
            .map(|i| EncoderLayer::load(&w, &format!("model.encoder.layers.{i}"), &config))
            .collect::<Result<_, _>>()?;
        let decoder = (0..config.decoder_layers)
            .map(|i| DecoderLayer::load(&w, &format!("model.decoder.layers.{i}"), &config))
            .collect::<Result<_, _>>()?;
        let model = MarianModel {
            shared: Embedding::sized(&w, "model.shared", vocab, dim)?,
            final_logits_bias: w.get_sized("final_logits_bias", &[1, vocab])?,
            encoder,
            decoder,
            positions: sinusoidal_positions(config.max_position_embeddings, dim)
                .to_kind(kind)
                .to_device(device),
            embed_scale: if config.scale_embedding {
                (dim as f64).sqrt()
            } else {
                1.0
            },
            config,
            device,
        };
        w.finish(&UNREAD)?;
        Ok(model)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Encodes `ids` [batch, source] whose real tokens `attention` [batch, source] marks.
    pub fn encode(&self, ids: &Tensor, attention: &Tensor) -> Encoded {
        let source = ids.size()[1];
        let mut hidden =
            self.shared.forward(ids) * self.embed_scale + self.positions.narrow(0, 0, source);
        let mask = (attention.ones_like() - attention)
            .to_kind(hidden.kind())
            .view([attention.size()[0], 1, 1, source])
            * -1e9;
        for layer in &self.encoder {
            let (k, v) = layer.self_attn.keys_values(&hidden);
            let attended = layer.self_attn.attend(&hidden, &k, &v, Some(&mask));
            hidden = layer.self_attn_layer_norm.forward(&(hidden + attended));
            let ff = layer
                .fc2
                .forward(&self.config.activate(&layer.fc1.forward(&hidden)));
            hidden = layer.final_layer_norm.forward(&(hidden + ff));
        }
        let cross = self
            .decoder
            .iter()
            .map(|layer| layer.encoder_attn.keys_values(&hidden))
            .collect();
        Encoded { mask, cross }
    }

    /// Runs the decoder over `ids` [rows, new] continuing `cache` (its keys and values grow);
    /// returns float32 logits of the last new position [rows, vocab], or of every new position
    /// [rows, new, vocab] when `all_positions`.
    pub fn decode(
        &self,
        ids: &Tensor,
        encoded: &Encoded,
        cache: &mut DecoderCache,
        all_positions: bool,
    ) -> Tensor {
        let new = ids.size()[1];
        let start = cache.steps;
        let mut hidden =
            self.shared.forward(ids) * self.embed_scale + self.positions.narrow(0, start, new);
        // Causal within the new positions; every cached position is visible.
        let total = start + new;
        let key_positions = Tensor::arange(total, (Kind::Int64, self.device)).view([1, total]);
        let query_positions =
            (Tensor::arange(new, (Kind::Int64, self.device)) + start).view([new, 1]);
        let causal = Tensor::zeros([new, total], (hidden.kind(), self.device))
            .masked_fill(
                &key_positions.gt_tensor(&query_positions),
                f64::NEG_INFINITY,
            )
            .view([1, 1, new, total]);
        let mut layers = Vec::with_capacity(self.decoder.len());
        for (index, layer) in self.decoder.iter().enumerate() {
            let (k, v) = layer.self_attn.keys_values(&hidden);
            let (k, v) = match cache.layers.get(index) {
                Some((past_k, past_v)) => {
                    (Tensor::cat(&[past_k, &k], 2), Tensor::cat(&[past_v, &v], 2))
                }
                None => (k, v),
            };
            let attended = layer.self_attn.attend(&hidden, &k, &v, Some(&causal));
            layers.push((k, v));
            hidden = layer.self_attn_layer_norm.forward(&(hidden + attended));
            let (cross_k, cross_v) = &encoded.cross[index];
            let attended =
                layer
                    .encoder_attn
                    .attend(&hidden, cross_k, cross_v, Some(&encoded.mask));
            hidden = layer.encoder_attn_layer_norm.forward(&(hidden + attended));
            let ff = layer
                .fc2
                .forward(&self.config.activate(&layer.fc1.forward(&hidden)));
            hidden = layer.final_layer_norm.forward(&(hidden + ff));
        }
        cache.layers = layers;
        cache.steps = total;
        let hidden = if all_positions {
            hidden
        } else {
            hidden.narrow(1, new - 1, 1)
        };
        let logits = (hidden.linear::<&Tensor>(&self.shared.weight, None)
            + &self.final_logits_bias)
            .to_kind(Kind::Float);
        if all_positions {
            logits
        } else {
            logits.squeeze_dim(1)
        }
    }
}
