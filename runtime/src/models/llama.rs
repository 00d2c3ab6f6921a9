//! The Llama family of decoders: Llama 2 and 3 (grouped-query attention, Llama 3 rope scaling),
//! Mistral (sliding-window attention) and Qwen2 (biases on q, k and v), tied or untied
//! embeddings.
//!
//! Reference: transformers v5.24.0, `models/llama/modeling_llama.py`,
//! `models/mistral/modeling_mistral.py`, `models/qwen2/modeling_qwen2.py` and
//! `modeling_rope_utils.py` (https://github.com/huggingface/transformers/tree/v5.24.0).
//! Weights are read by their checkpoint names.
//!
//! Keys and values live in a [`KvCache`] of fixed slots: each running sequence owns one slot of
//! `max_sequence_tokens` positions, so the memory for keys and values is allocated once and
//! bounded, and a decode step runs every sequence in one batch whatever their lengths.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::layers::{Embedding, Linear};
use super::weights::NamedWeights;
use super::{LoadError, read_json, weight_files};

/// Checkpoint tensors no Llama-family model reads: the rotary inverse frequencies that older
/// transformers versions saved in every layer (they are computed from the config).
const UNREAD: &str = "*.rotary_emb.inv_freq";
/// With tied embeddings, a copy of `model.embed_tokens.weight` that some checkpoints still
/// carry; the embeddings are the output projection.
const TIED_HEAD: &str = "lm_head.weight";

/// Rope parameters, from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
}

/// `config.json` of a Llama-family checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub sliding_window: Option<i64>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default = "default_activation")]
    pub hidden_act: String,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> i64 {
    4096
}
fn default_activation() -> String {
    "silu".to_owned()
}

impl LlamaConfig {
    pub fn load(dir: &Path) -> Result<LlamaConfig, LoadError> {
        let path = dir.join("config.json");
        let config: LlamaConfig = read_json(&path)?;
        config
            .validate()
            .map_err(|message| LoadError::Invalid { path, message })?;
        Ok(config)
    }

    fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 always has biases on q, k and v; Llama and Mistral when `attention_bias` says so.
    fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias.unwrap_or(false)
    }

    /// Keys a query may see, counting itself: Mistral's window; Qwen2's only when turned on.
    pub fn attention_window(&self) -> Option<i64> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            _ => None,
        }
    }

    fn rope(&self) -> RopeParameters {
        let mut rope = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        if rope.rope_theta.is_none() {
            rope.rope_theta = Some(self.rope_theta.unwrap_or(10_000.0));
        }
        rope
    }

    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(format!(
                "model_type {:?} is not a supported decoder; supported: llama, mistral, qwen2",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (silu only)",
                self.hidden_act
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err("num_attention_heads must be a multiple of num_key_value_heads".to_owned());
        }
        if self.model_type == "qwen2" && self.use_sliding_window == Some(true) {
            return Err(
                "Qwen2 sliding-window attention (use_sliding_window) is not supported".to_owned(),
            );
        }
        let rope = self.rope();
        match rope.rope_type.as_deref() {
            None | Some("default") | Some("linear") => {}
            Some("llama3")
                if rope.factor.is_some()
                    && rope.low_freq_factor.is_some()
                    && rope.high_freq_factor.is_some()
                    && rope.original_max_position_embeddings.is_some() => {}
            Some("llama3") => {
                return Err("llama3 rope scaling needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings".to_owned());
            }
            Some(other) => {
                return Err(format!(
                    "rope_type {other:?} is not supported; supported: default, linear, llama3"
                ));
            }
        }
        Ok(())
    }

    /// Inverse frequencies of the rotary embedding, computed in float32 as transformers does so
    /// that angles (and so logits) agree to the last bits.
    fn inverse_frequencies(&self, device: Device) -> Tensor {
        let rope = self.rope();
        let dim = self.head_dim();
        let base = rope.rope_theta.unwrap_or(10_000.0);
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / dim as f64;
        let inv_freq = Tensor::from(base)
            .to_kind(Kind::Float)
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        match rope.rope_type.as_deref() {
            Some("linear") => inv_freq / rope.factor.unwrap_or(1.0),
            Some("llama3") => {
                let factor = rope.factor.unwrap_or(1.0);
                let low = rope.low_freq_factor.unwrap_or(1.0);
                let high = rope.high_freq_factor.unwrap_or(4.0);
                let old_context = rope.original_max_position_embeddings.unwrap_or(8192.0);
                let low_freq_wavelen = old_context / low;
                let high_freq_wavelen = old_context / high;
                let wavelen = inv_freq.full_like(2.0 * std::f64::consts::PI) / &inv_freq;
                let scaled =
                    inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / factor));
                let smooth = (wavelen.full_like(old_context) / &wavelen - low) / (high - low);
                let smoothed =
                    (smooth.ones_like() - &smooth) * (&scaled / factor) + &smooth * &scaled;
                let medium = wavelen
                    .ge(high_freq_wavelen)
                    .logical_and(&wavelen.le(low_freq_wavelen));
                smoothed.where_self(&medium, &scaled)
            }
            _ => inv_freq,
        }
    }
}

/// `LlamaRMSNorm`: normalised in float32, scaled in the weights' type.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &NamedWeights, prefix: &str, cfg: &LlamaConfig) -> Result<RmsNorm, LoadError> {
        Ok(RmsNorm {
            weight: w.get_sized(&format!("{prefix}.weight"), &[cfg.hidden_size])?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

#[derive(Debug)]
struct Attention {
    /// q, k and v as one layer: one matmul instead of three.
    qkv: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn load(w: &NamedWeights, p: &str, cfg: &LlamaConfig) -> Result<Attention, LoadError> {
        let (heads, kv_heads, head_dim) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let linear =
            |name: &str, shape, bias| Linear::sized(w, &format!("{p}.{name}"), shape, bias);
        let (hidden, bias) = (cfg.hidden_size, cfg.qkv_bias());
        Ok(Attention {
            qkv: Linear::concat(&[
                linear("q_proj", [heads * head_dim, hidden], bias)?,
                linear("k_proj", [kv_heads * head_dim, hidden], bias)?,
                linear("v_proj", [kv_heads * head_dim, hidden], bias)?,
            ])
            .favour_few_rows(),
            o_proj: linear(
                "o_proj",
                [hidden, heads * head_dim],
                cfg.attention_bias.unwrap_or(false),
            )?
            .favour_few_rows(),
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// q, k, v of `x` [batch, seq, hidden] as [batch, heads, seq, head_dim].
    fn project(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (batch, seq, _) = x.size3().expect("hidden states are 3-D");
        let q_width = self.heads * self.head_dim;
        let kv_width = self.kv_heads * self.head_dim;
        let qkv = self
            .qkv
            .forward(x)
            .split_with_sizes([q_width, kv_width, kv_width], -1);
        let (q, k, v) = (
            qkv[0].shallow_clone(),
            qkv[1].shallow_clone(),
            qkv[2].shallow_clone(),
        );
        let split = |t: Tensor, heads: i64| {
            t.reshape([batch, seq, heads, self.head_dim])
                .transpose(1, 2)
        };
        (
            split(q, self.heads),
            split(k, self.kv_heads),
            split(v, self.kv_heads),
        )
    }
}

/// `rotate_half` rotary embedding; cos and sin are [batch, 1, seq, head_dim].
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    let rotated = Tensor::cat(&[x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// The gated feed-forward block: down(silu(gate(x)) · up(x)).
#[derive(Debug)]
struct Mlp {
    /// gate and up as one layer: one matmul instead of two.
    gate_up: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &NamedWeights, p: &str, cfg: &LlamaConfig) -> Result<Mlp, LoadError> {
        let (hidden, inner) = (cfg.hidden_size, cfg.intermediate_size);
        let linear =
            |name: &str, shape| Linear::sized(w, &format!("{p}.{name}"), shape, cfg.mlp_bias);
        Ok(Mlp {
            gate_up: Linear::concat(&[
                linear("gate_proj", [inner, hidden])?,
                linear("up_proj", [inner, hidden])?,
            ])
            .favour_few_rows(),
            down_proj: linear("down_proj", [hidden, inner])?.favour_few_rows(),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let both = self.gate_up.forward(x).chunk(2, -1);
        self.down_proj.forward(&(both[0].silu() * &both[1]))
    }
}

#[derive(Debug)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// Keys and values of every running sequence: per layer, [slots, kv_heads, positions, head_dim].
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    pub slots: i64,
    pub positions: i64,
}

impl KvCache {
    pub fn bytes_per_token(cfg: &LlamaConfig, kind: Kind) -> i64 {
        2 * cfg.num_hidden_layers
            * cfg.kv_heads()
            * cfg.head_dim()
            * kind.elt_size_in_bytes() as i64
    }
}

/// Where each row of a forward pass writes and reads: its cache slot and first position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub slot: i64,
    pub start: i64,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    /// Every position: [rows, seq, vocab].
    All,
    /// The last position of each row: [rows, vocab].
    Last,
    /// Position `at[i]` of row `i` (the last real token of a padded row): [rows, vocab].
    At(&'a [i64]),
}

/// A Llama-family causal language model with its weights loaded.
#[derive(Debug)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// The output projection, unless tied to the embeddings.
    lm_head: Option<Linear>,
    inv_freq: Tensor,
    device: Device,
    kind: Kind,
}

impl LlamaModel {
    /// Loads the checkpoint in `dir` (single file or shards) in `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LlamaModel, LoadError> {
        let config = LlamaConfig::load(dir)?;
        let w = NamedWeights::load(&weight_files(dir)?, device, kind)?;
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    input_layernorm: RmsNorm::load(&w, &format!("{p}.input_layernorm"), &config)?,
                    self_attn: Attention::load(&w, &format!("{p}.self_attn"), &config)?,
                    post_attention_layernorm: RmsNorm::load(
                        &w,
                        &format!("{p}.post_attention_layernorm"),
                        &config,
                    )?,
                    mlp: Mlp::load(&w, &format!("{p}.mlp"), &config)?,
                })
            })
            .collect::<Result<_, LoadError>>()?;
        let model = LlamaModel {
            embed_tokens: Embedding::sized(&w, "model.embed_tokens", vocab, hidden)?,
            layers,
            norm: RmsNorm::load(&w, "model.norm", &config)?,
            lm_head: (!config.tie_word_embeddings)
                .then(|| Linear::sized(&w, "lm_head", [vocab, hidden], false))
                .transpose()?,
            inv_freq: config.inverse_frequencies(device),
            config,
            device,
            kind,
        };
        let unread: &[&str] = if model.config.tie_word_embeddings {
            &[UNREAD, TIED_HEAD]
        } else {
            &[UNREAD]
        };
        w.finish(unread)?;
        Ok(model)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// A cache of `slots` sequences of up to `positions` tokens each.
    pub fn new_cache(&self, slots: i64, positions: i64) -> KvCache {
        let shape = [
            slots,
            self.config.kv_heads(),
            positions,
            self.config.head_dim(),
        ];
        let make = || {
            (0..self.config.num_hidden_layers)
                .map(|_| Tensor::zeros(shape, (self.kind, self.device)))
                .collect()
        };
        KvCache {
            keys: make(),
            values: make(),
            slots,
            positions,
        }
    }

    /// Runs `tokens` [rows, seq] through the model: row `i` continues the sequence in cache slot
    /// `placements[i].slot` from position `placements[i].start` (rows of a prefill have one
    /// sequence each; a decode step has one token per row). Keys and values are written to the
    /// cache; each row attends to its own slot's positions up to itself. Returns float32 logits
    /// of the positions `logits` asks for.
    ///
    /// Rows of a prefill may be right-padded to a common length: the padding's keys and values
    /// land in positions of the slot that the sequence's next token overwrites before any query
    /// can see them.
    pub fn forward(
        &self,
        tokens: &Tensor,
        placements: &[Placement],
        cache: &mut KvCache,
        logits: Logits<'_>,
    ) -> Tensor {
        let (rows, seq) = tokens.size2().expect("tokens are [rows, seq]");
        let device = self.device;
        let starts = Tensor::from_slice(&placements.iter().map(|p| p.start).collect::<Vec<_>>())
            .to_device(device);
        let slots = Tensor::from_slice(&placements.iter().map(|p| p.slot).collect::<Vec<_>>())
            .to_device(device);
        // Absolute positions of every token: [rows, seq].
        let positions =
            starts.unsqueeze(1) + Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0);
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let angles = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let (cos, sin) = (
            angles.cos().to_kind(self.kind),
            angles.sin().to_kind(self.kind),
        );

        // Keys visible to the rows: positions [0, span) of their slots.
        let span = placements
            .iter()
            .map(|p| p.start + seq)
            .max()
            .unwrap_or(seq);
        let key_positions = Tensor::arange(span, (Kind::Int64, device)).view([1, 1, 1, span]);
        let query_positions = positions.view([rows, 1, seq, 1]);
        let mut visible = key_positions.le_tensor(&query_positions);
        if let Some(window) = self.config.attention_window() {
            visible = visible.logical_and(&key_positions.gt_tensor(&(&query_positions - window)));
        }
        let mask = Tensor::zeros([rows, 1, seq, span], (self.kind, device))
            .masked_fill(&visible.logical_not(), f64::NEG_INFINITY);
        // Cache coordinates of the new tokens: [rows * seq] slots and positions.
        let write_slots = slots.unsqueeze(1).expand([rows, seq], false).reshape([-1]);
        let write_positions = positions.reshape([-1]);

        let mut hidden = self.embed_tokens.forward(tokens);
        for (index, layer) in self.layers.iter().enumerate() {
            let attention = &layer.self_attn;
            let normed = layer.input_layernorm.forward(&hidden);
            let (q, k, v) = attention.project(&normed);
            let q = apply_rope(&q, &cos, &sin);
            let k = apply_rope(&k, &cos, &sin);
            // [rows, kv_heads, seq, dim] → [rows * seq, kv_heads, dim], the shape of
            // cache[slots, :, positions].
            let flat = |t: &Tensor| {
                t.permute([0, 2, 1, 3]).reshape([
                    rows * seq,
                    attention.kv_heads,
                    attention.head_dim,
                ])
            };
            let indices = [
                Some(write_slots.shallow_clone()),
                None,
                Some(write_positions.shallow_clone()),
            ];
            let _ = cache.keys[index].index_put_(&indices, &flat(&k), false);
            let _ = cache.values[index].index_put_(&indices, &flat(&v), false);
            // Narrow before gathering: only the visible positions are copied.
            let keys = cache.keys[index].narrow(2, 0, span).index_select(0, &slots);
            let values = cache.values[index]
                .narrow(2, 0, span)
                .index_select(0, &slots);
            let context = Tensor::scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                Some(&mask),
                0.0,
                false,
                None,
                attention.kv_heads != attention.heads,
            )
            .transpose(1, 2)
            .reshape([rows, seq, attention.heads * attention.head_dim]);
            hidden += attention.o_proj.forward(&context);
            let normed = layer.post_attention_layernorm.forward(&hidden);
            hidden = &hidden + layer.mlp.forward(&normed);
        }
        // Only the positions asked for go through the norm and the (vocabulary-wide) head.
        let hidden = match logits {
            Logits::All => hidden,
            Logits::Last => hidden.narrow(1, seq - 1, 1),
            Logits::At(positions) => {
                let width = hidden.size()[2];
                let index = Tensor::from_slice(positions)
                    .to_device(device)
                    .view([rows, 1, 1])
                    .expand([rows, 1, width], false);
                hidden.gather(1, &index, false)
            }
        };
        let hidden = self.norm.forward(&hidden);
        let output = match &self.lm_head {
            Some(head) => head.forward(&hidden),
            None => hidden.linear::<&Tensor>(&self.embed_tokens.weight, None),
        }
        .to_kind(Kind::Float);
        match logits {
            Logits::All => output,
            Logits::Last | Logits::At(_) => output.squeeze_dim(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Result<(), String> {
        let mut value = serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2
        });
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value::<LlamaConfig>(value)
            .unwrap()
            .validate()
    }

    #[test]
    fn unsupported_checkpoints_are_refused_by_name() {
        assert!(config(serde_json::json!({})).is_ok());
        assert!(
            config(serde_json::json!({"model_type": "gpt2"}))
                .unwrap_err()
                .contains("supported: llama, mistral, qwen2")
        );
        assert!(
            config(serde_json::json!({"hidden_act": "gelu"}))
                .unwrap_err()
                .contains("silu")
        );
        assert!(
            config(serde_json::json!({"num_key_value_heads": 3}))
                .unwrap_err()
                .contains("multiple")
        );
        assert!(
            config(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
                .unwrap_err()
                .contains("yarn")
        );
        assert!(
            config(serde_json::json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}))
                .unwrap_err()
                .contains("low_freq_factor")
        );
        assert!(
            config(serde_json::json!({"model_type": "qwen2", "use_sliding_window": true}))
                .unwrap_err()
                .contains("sliding")
        );
    }

    #[test]
    fn legacy_rope_fields_are_read_like_rope_parameters() {
        let legacy: LlamaConfig = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0}
        }))
        .unwrap();
        let rope = legacy.rope();
        assert_eq!(rope.rope_theta, Some(500000.0));
        assert_eq!(rope.rope_type.as_deref(), Some("linear"));
    }
}
