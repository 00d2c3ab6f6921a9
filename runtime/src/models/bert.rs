//! The BERT family of encoders: BERT and MiniLM, RoBERTa and XLM-RoBERTa (same blocks, RoBERTa
//! numbers positions after the padding index).
//!
//! Reference: transformers v5.24.0, `models/bert/modeling_bert.py` and
//! `models/roberta/modeling_roberta.py` (https://github.com/huggingface/transformers/tree/v5.24.0).
//! Weights are read by their checkpoint names, under the prefix a task model's checkpoint gives
//! the encoder (`bert.`, `roberta.`).

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::LoadError;
use super::layers::{Embedding, LayerNorm, Linear};
use super::weights::NamedWeights;

/// `config.json` of a BERT-family checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: i64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: i64,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_activation() -> Activation {
    Activation::Gelu
}
fn default_type_vocab_size() -> i64 {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_position_embedding_type() -> String {
    "absolute".to_owned()
}

/// The feed-forward activation, by its transformers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
        }
    }
}

impl BertConfig {
    /// RoBERTa and XLM-RoBERTa count positions from `pad_token_id + 1`.
    pub fn is_roberta(&self) -> bool {
        matches!(
            self.model_type.as_str(),
            "roberta" | "xlm-roberta" | "camembert"
        )
    }

    /// Longest input, in tokens, the position embeddings allow.
    pub fn max_input_length(&self) -> i64 {
        if self.is_roberta() {
            self.max_position_embeddings - self.pad_token_id - 1
        } else {
            self.max_position_embeddings
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported",
                self.position_embedding_type
            ));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err("hidden_size must be a multiple of num_attention_heads".to_owned());
        }
        Ok(())
    }
}

fn layer_norm(w: &NamedWeights, prefix: &str, cfg: &BertConfig) -> Result<LayerNorm, LoadError> {
    LayerNorm::sized(w, prefix, cfg.hidden_size, cfg.layer_norm_eps)
}

/// `BertEmbeddings`: word + position + token type, then LayerNorm.
#[derive(Debug)]
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
    roberta_padding_idx: Option<i64>,
}

impl Embeddings {
    fn load(w: &NamedWeights, p: &str, cfg: &BertConfig) -> Result<Embeddings, LoadError> {
        let table =
            |name: &str, rows| Embedding::sized(w, &format!("{p}.{name}"), rows, cfg.hidden_size);
        Ok(Embeddings {
            word: table("word_embeddings", cfg.vocab_size)?,
            position: table("position_embeddings", cfg.max_position_embeddings)?,
            token_type: table("token_type_embeddings", cfg.type_vocab_size)?,
            layer_norm: layer_norm(w, &format!("{p}.LayerNorm"), cfg)?,
            roberta_padding_idx: cfg.is_roberta().then_some(cfg.pad_token_id),
        })
    }

    /// input_ids, token_type_ids, attention_mask: [batch, seq] → [batch, seq, hidden]
    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Tensor {
        let (_, seq) = input_ids.size2().expect("input_ids is 2-D");
        let positions = match self.roberta_padding_idx {
            // Padding keeps position `padding_idx`; real tokens count up from `padding_idx + 1`.
            Some(padding_idx) => {
                attention_mask.cumsum(1, Kind::Int64) * attention_mask + padding_idx
            }
            None => Tensor::arange(seq, (Kind::Int64, input_ids.device())).unsqueeze(0),
        };
        let sum = self.word.forward(input_ids)
            + self.position.forward(&positions)
            + self.token_type.forward(token_type_ids);
        self.layer_norm.forward(&sum)
    }
}

/// `BertSelfAttention` + `BertSelfOutput`.
#[derive(Debug)]
struct Attention {
    /// Query, key and value stacked, for one matmul instead of three.
    qkv: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    heads: i64,
    head_dim: i64,
}

impl Attention {
    fn load(w: &NamedWeights, p: &str, cfg: &BertConfig) -> Result<Attention, LoadError> {
        let h = cfg.hidden_size;
        let linear = |name: &str| Linear::sized(w, &format!("{p}.{name}"), [h, h], true);
        Ok(Attention {
            qkv: Linear::concat(&[
                linear("self.query")?,
                linear("self.key")?,
                linear("self.value")?,
            ])
            .favour_few_rows(),
            output: linear("output.dense")?.favour_few_rows(),
            layer_norm: layer_norm(w, &format!("{p}.output.LayerNorm"), cfg)?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// x: [batch, seq, hidden]; mask_bias: [batch, 1, 1, seq] (0 or a large negative number)
    fn forward(&self, x: &Tensor, mask_bias: &Tensor) -> Tensor {
        let (batch, seq, hidden) = x.size3().expect("hidden states are 3-D");
        let qkv = self.qkv.forward(x).chunk(3, -1);
        let split = |t: &Tensor| {
            t.reshape([batch, seq, self.heads, self.head_dim])
                .transpose(1, 2)
        };
        let context = Tensor::scaled_dot_product_attention(
            &split(&qkv[0]),
            &split(&qkv[1]),
            &split(&qkv[2]),
            Some(mask_bias),
            0.0,
            false,
            None,
            false,
        )
        .transpose(1, 2)
        .reshape([batch, seq, hidden]);
        self.layer_norm
            .forward(&(self.output.forward(&context) + x))
    }
}

/// `BertLayer`: attention, then the feed-forward block (`intermediate` and `output`).
#[derive(Debug)]
struct Layer {
    attention: Attention,
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    activation: Activation,
}

impl Layer {
    fn load(w: &NamedWeights, p: &str, cfg: &BertConfig) -> Result<Layer, LoadError> {
        let (h, inner) = (cfg.hidden_size, cfg.intermediate_size);
        let linear = |name: &str, shape| {
            Linear::sized(w, &format!("{p}.{name}"), shape, true).map(Linear::favour_few_rows)
        };
        Ok(Layer {
            attention: Attention::load(w, &format!("{p}.attention"), cfg)?,
            intermediate: linear("intermediate.dense", [inner, h])?,
            output: linear("output.dense", [h, inner])?,
            layer_norm: layer_norm(w, &format!("{p}.output.LayerNorm"), cfg)?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask_bias: &Tensor) -> Tensor {
        let attended = self.attention.forward(x, mask_bias);
        let expanded = self.activation.apply(&self.intermediate.forward(&attended));
        self.layer_norm
            .forward(&(self.output.forward(&expanded) + attended))
    }
}

/// `BertModel` without its pooler: token embeddings out of the last layer.
#[derive(Debug)]
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl BertModel {
    /// The encoder whose tensor names start with `prefix` (`bert.`, `roberta.` or nothing).
    pub fn load(w: &NamedWeights, prefix: &str, cfg: &BertConfig) -> Result<BertModel, LoadError> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(w, &format!("{prefix}encoder.layer.{i}"), cfg))
            .collect::<Result<_, _>>()?;
        Ok(BertModel {
            embeddings: Embeddings::load(w, &format!("{prefix}embeddings"), cfg)?,
            layers,
        })
    }

    /// input_ids, token_type_ids, attention_mask: [batch, seq] (Int64) → [batch, seq, hidden]
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Tensor {
        let hidden = self
            .embeddings
            .forward(input_ids, token_type_ids, attention_mask);
        let kind = hidden.kind();
        // Padding keys get the dtype's lowest value, as transformers does, so softmax ignores them.
        let lowest = match kind {
            Kind::Half => -65504.0,
            Kind::BFloat16 => -3.38e38,
            _ => f64::from(f32::MIN),
        };
        let mask = attention_mask.to_kind(kind);
        let mask_bias = (mask.ones_like() - mask).unsqueeze(1).unsqueeze(1) * lowest;
        self.layers
            .iter()
            .fold(hidden, |h, layer| layer.forward(&h, &mask_bias))
    }
}
