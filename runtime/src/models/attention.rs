//! The multi-head attention of the encoder-decoder models (Marian, Whisper): projections by
//! their checkpoint names, keys and values computed once and reused (cross-attention, the
//! decoder's cache), scaled dot-product attention.

use tch::Tensor;

use super::LoadError;
use super::layers::Linear;
use super::weights::NamedWeights;

#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl Attention {
    /// `q_proj`, `k_proj`, `v_proj` and `out_proj` under `prefix`, laid out for few rows;
    /// Whisper's key projection has no bias (`key_bias` false).
    pub fn load(
        w: &NamedWeights,
        prefix: &str,
        dim: i64,
        heads: i64,
        key_bias: bool,
    ) -> Result<Attention, LoadError> {
        let linear = |name: &str, bias: bool| {
            Linear::sized(w, &format!("{prefix}.{name}"), [dim, dim], bias)
                .map(Linear::favour_few_rows)
        };
        Ok(Attention {
            q_proj: linear("q_proj", true)?,
            k_proj: linear("k_proj", key_bias)?,
            v_proj: linear("v_proj", true)?,
            out_proj: linear("out_proj", true)?,
            heads,
        })
    }

    /// [batch, seq, dim] → [batch, heads, seq, head_dim]
    fn split(&self, x: &Tensor) -> Tensor {
        let (batch, seq, dim) = x.size3().expect("hidden states are 3-D");
        x.view([batch, seq, self.heads, dim / self.heads])
            .transpose(1, 2)
    }

    /// Keys and values of `x`, split into heads.
    pub fn keys_values(&self, x: &Tensor) -> (Tensor, Tensor) {
        (
            self.split(&self.k_proj.forward(x)),
            self.split(&self.v_proj.forward(x)),
        )
    }

    /// Attention of `x`'s queries over `keys` and `values`, with an additive `mask`.
    pub fn attend(
        &self,
        x: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let (batch, seq, dim) = x.size3().expect("hidden states are 3-D");
        let q = self.split(&self.q_proj.forward(x));
        let context =
            Tensor::scaled_dot_product_attention(&q, keys, values, mask, 0.0, false, None, false)
                .transpose(1, 2)
                .reshape([batch, seq, dim]);
        self.out_proj.forward(&context)
    }
}
