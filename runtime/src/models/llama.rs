//! The Llama family of decoders: Llama 2 and 3 (grouped-query attention, Llama 3 rope scaling),
//! Mistral (sliding-window attention) and Qwen2 (biases on q, k and v), tied or untied
//! embeddings.
//!
//! Reference: transformers v5.24.0, `models/llama/modeling_llama.py`,
//! `models/mistral/modeling_mistral.py`, `models/qwen2/modeling_qwen2.py` and
//! `modeling_rope_utils.py` (https://github.com/huggingface/transformers/tree/v5.24.0).
//! Parameter paths equal the checkpoint's, so safetensors load without a mapping table.
//!
//! Keys and values live in a [`KvCache`] of fixed slots: each running sequence owns one slot of
//! `max_sequence_tokens` positions, so the memory for keys and values is allocated once and
//! bounded, and a decode step runs every sequence in one batch whatever their lengths.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn, nn::Module};

use super::{LoadError, load_strict, read_json, weight_files};

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
    fn new(p: nn::Path, size: i64, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: p.ones("weight", &[size]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

fn linear(p: nn::Path, inputs: i64, outputs: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        inputs,
        outputs,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// q, k and v as one matrix (and bias), made after loading: one matmul instead of three.
    fused: Option<(Tensor, Option<Tensor>)>,
}

impl Attention {
    fn new(p: nn::Path, cfg: &LlamaConfig) -> Attention {
        let (heads, kv_heads, head_dim) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let bias = cfg.qkv_bias();
        Attention {
            q_proj: linear(&p / "q_proj", cfg.hidden_size, heads * head_dim, bias),
            k_proj: linear(&p / "k_proj", cfg.hidden_size, kv_heads * head_dim, bias),
            v_proj: linear(&p / "v_proj", cfg.hidden_size, kv_heads * head_dim, bias),
            o_proj: linear(
                &p / "o_proj",
                heads * head_dim,
                cfg.hidden_size,
                cfg.attention_bias.unwrap_or(false),
            ),
            heads,
            kv_heads,
            head_dim,
            fused: None,
        }
    }

    fn fuse(&mut self) {
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        let mut weight = Tensor::cat(&parts.map(|l| &l.ws), 0);
        super::favour_few_rows(&mut weight);
        super::favour_few_rows(&mut self.o_proj.ws);
        let bias = self.q_proj.bs.is_some().then(|| {
            Tensor::cat(
                &parts.map(|l| l.bs.as_ref().expect("all three have biases")),
                0,
            )
        });
        self.fused = Some((weight, bias));
    }

    /// q, k, v of `x` [batch, seq, hidden] as [batch, heads, seq, head_dim].
    fn project(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (batch, seq, _) = x.size3().expect("hidden states are 3-D");
        let (q, k, v) = match &self.fused {
            Some((weight, bias)) => {
                let qkv = x.linear(weight, bias.as_ref());
                let q_width = self.heads * self.head_dim;
                let kv_width = self.kv_heads * self.head_dim;
                let parts = qkv.split_with_sizes([q_width, kv_width, kv_width], -1);
                (
                    parts[0].shallow_clone(),
                    parts[1].shallow_clone(),
                    parts[2].shallow_clone(),
                )
            }
            None => (
                self.q_proj.forward(x),
                self.k_proj.forward(x),
                self.v_proj.forward(x),
            ),
        };
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

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
    /// gate and up as one matrix, made after loading.
    fused: Option<Tensor>,
}

impl Mlp {
    fn new(p: nn::Path, cfg: &LlamaConfig) -> Mlp {
        Mlp {
            gate_proj: linear(
                &p / "gate_proj",
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.mlp_bias,
            ),
            up_proj: linear(
                &p / "up_proj",
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.mlp_bias,
            ),
            down_proj: linear(
                &p / "down_proj",
                cfg.intermediate_size,
                cfg.hidden_size,
                cfg.mlp_bias,
            ),
            fused: None,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (gate, up) = match &self.fused {
            Some(weight) => {
                let both = x.linear::<&Tensor>(weight, None).chunk(2, -1);
                (both[0].shallow_clone(), both[1].shallow_clone())
            }
            None => (self.gate_proj.forward(x), self.up_proj.forward(x)),
        };
        self.down_proj.forward(&(gate.silu() * up))
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
    embed_tokens: nn::Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Option<nn::Linear>,
    inv_freq: Tensor,
    device: Device,
    kind: Kind,
    _vs: nn::VarStore,
}

impl LlamaModel {
    /// Loads the checkpoint in `dir` (single file or shards) in `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LlamaModel, LoadError> {
        let config = LlamaConfig::load(dir)?;
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let model = &root / "model";
        let embed_tokens = nn::embedding(
            &model / "embed_tokens",
            config.vocab_size,
            config.hidden_size,
            Default::default(),
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = &model / "layers" / i;
                Layer {
                    input_layernorm: RmsNorm::new(
                        &p / "input_layernorm",
                        config.hidden_size,
                        config.rms_norm_eps,
                    ),
                    self_attn: Attention::new(&p / "self_attn", &config),
                    post_attention_layernorm: RmsNorm::new(
                        &p / "post_attention_layernorm",
                        config.hidden_size,
                        config.rms_norm_eps,
                    ),
                    mlp: Mlp::new(&p / "mlp", &config),
                }
            })
            .collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            linear(
                &root / "lm_head",
                config.hidden_size,
                config.vocab_size,
                false,
            )
        });
        load_strict(&mut vs, &weight_files(dir)?)?;
        vs.set_kind(kind);
        vs.freeze();
        let inv_freq = config.inverse_frequencies(device);
        let mut model = LlamaModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            device,
            kind,
            _vs: vs,
        };
        tch::no_grad(|| {
            for layer in &mut model.layers {
                layer.self_attn.fuse();
                let mlp = &mut layer.mlp;
                if model.config.mlp_bias {
                    super::favour_few_rows(&mut mlp.gate_proj.ws);
                    super::favour_few_rows(&mut mlp.up_proj.ws);
                } else {
                    let mut fused = Tensor::cat(&[&mlp.gate_proj.ws, &mlp.up_proj.ws], 0);
                    super::favour_few_rows(&mut fused);
                    mlp.fused = Some(fused);
                }
                super::favour_few_rows(&mut mlp.down_proj.ws);
            }
        });
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
            None => hidden.linear::<&Tensor>(&self.embed_tokens.ws, None),
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
