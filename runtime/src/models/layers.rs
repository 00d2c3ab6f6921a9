//! The layers models are assembled from, each read from a checkpoint's named tensors: linear
//! layers, embeddings, layer and group norms, convolutions, and diffusers' attention and ResNet
//! blocks. Config-driven models (BERT, Llama, Marian, Whisper) use the `sized` constructors,
//! which check the shapes their arithmetic relies on; the others take shapes from the tensors.

use tch::Tensor;

use crate::models::LoadError;
use crate::models::weights::NamedWeights;

/// A 2-D convolution; its kernel size sets a "same" padding, `stride` 2 halves the image.
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn load(w: &NamedWeights, prefix: &str, stride: i64) -> Result<Conv2d, LoadError> {
        let weight = w.get(&format!("{prefix}.weight"))?;
        let padding = weight.size()[2] / 2;
        Ok(Conv2d {
            bias: w.optional(&format!("{prefix}.bias")),
            weight,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride],
            [self.padding],
            [1],
            1,
        )
    }

    /// Channels in and out.
    pub fn channels(&self) -> (i64, i64) {
        let size = self.weight.size();
        (size[1], size[0])
    }
}

#[derive(Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn load(
        w: &NamedWeights,
        prefix: &str,
        groups: i64,
        eps: f64,
    ) -> Result<GroupNorm, LoadError> {
        Ok(GroupNorm {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.get(&format!("{prefix}.bias"))?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            false,
        )
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &NamedWeights, prefix: &str, eps: f64) -> Result<LayerNorm, LoadError> {
        Ok(LayerNorm {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.get(&format!("{prefix}.bias"))?,
            eps,
        })
    }

    /// Over `dim` channels.
    pub fn sized(
        w: &NamedWeights,
        prefix: &str,
        dim: i64,
        eps: f64,
    ) -> Result<LayerNorm, LoadError> {
        Ok(LayerNorm {
            weight: w.get_sized(&format!("{prefix}.weight"), &[dim])?,
            bias: w.get_sized(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    /// Over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let channels = self.weight.size()[0];
        x.layer_norm(
            [channels],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            false,
        )
    }

    /// Over the channels of [batch, channels, time].
    pub fn forward_channels(&self, x: &Tensor) -> Tensor {
        self.forward(&x.transpose(1, -1)).transpose(1, -1)
    }
}

#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `prefix.weight`, and `prefix.bias` when the checkpoint has one.
    pub fn load(w: &NamedWeights, prefix: &str) -> Result<Linear, LoadError> {
        Ok(Linear {
            weight: w.get(&format!("{prefix}.weight"))?,
            bias: w.optional(&format!("{prefix}.bias")),
        })
    }

    /// From `inputs` to `outputs` features, with a bias when `bias` says so: the checkpoint must
    /// have exactly these, and a bias where the architecture has none is left unread (so it is
    /// refused as unexpected).
    pub fn sized(
        w: &NamedWeights,
        prefix: &str,
        [outputs, inputs]: [i64; 2],
        bias: bool,
    ) -> Result<Linear, LoadError> {
        Ok(Linear {
            weight: w.get_sized(&format!("{prefix}.weight"), &[outputs, inputs])?,
            bias: bias
                .then(|| w.get_sized(&format!("{prefix}.bias"), &[outputs]))
                .transpose()?,
        })
    }

    /// One layer computing the outputs of `parts` side by side: one matmul instead of several.
    /// Either all parts have a bias or none has.
    pub fn concat(parts: &[Linear]) -> Linear {
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias.as_ref()).collect();
        Linear {
            weight: Tensor::cat(&parts.iter().map(|p| &p.weight).collect::<Vec<_>>(), 0),
            bias: biases.map(|b| Tensor::cat(&b, 0)),
        }
    }

    /// Lays the weight [out, in] out as the transpose of a contiguous [in, out] matrix, keeping
    /// its shape: `linear` then multiplies by a contiguous right operand, which MKL does up to
    /// 2× faster for the few rows of one request or one decoding step (1.0× from ~300 rows);
    /// `runtime/bench/linear_layout.py` measures it. A later `to_kind` or `to_device` would copy
    /// the weight back to the default layout, so call it on the weight in its final place.
    pub fn favour_few_rows(self) -> Linear {
        Linear {
            weight: self.weight.tr().contiguous().tr(),
            bias: self.bias,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// A table of vectors looked up by id.
#[derive(Debug)]
pub struct Embedding {
    /// [rows, dim]; models whose output projection is tied to their embeddings use it too.
    pub weight: Tensor,
}

impl Embedding {
    pub fn sized(
        w: &NamedWeights,
        prefix: &str,
        rows: i64,
        dim: i64,
    ) -> Result<Embedding, LoadError> {
        Ok(Embedding {
            weight: w.get_sized(&format!("{prefix}.weight"), &[rows, dim])?,
        })
    }

    /// ids [..] → [.., dim]
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// Multi-head attention of queries `x` [batch, n, dim] over `context` [batch, m, dim'] (x
/// itself for self-attention), with the projections' names as the checkpoint gives them.
#[derive(Debug)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub heads: i64,
}

impl Attention {
    /// diffusers' names: `to_q`, `to_k`, `to_v`, `to_out.0`.
    pub fn load_diffusers(
        w: &NamedWeights,
        prefix: &str,
        heads: i64,
    ) -> Result<Attention, LoadError> {
        Ok(Attention {
            q: Linear::load(w, &format!("{prefix}.to_q"))?,
            k: Linear::load(w, &format!("{prefix}.to_k"))?,
            v: Linear::load(w, &format!("{prefix}.to_v"))?,
            out: Linear::load(w, &format!("{prefix}.to_out.0"))?,
            heads,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, mask: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(x);
        let (batch, n, _) = x.size3().expect("3-D");
        let split = |t: Tensor| {
            let (b, len, dim) = t.size3().expect("3-D");
            t.view([b, len, self.heads, dim / self.heads])
                .transpose(1, 2)
        };
        let q = split(self.q.forward(x));
        let k = split(self.k.forward(context));
        let v = split(self.v.forward(context));
        let attended =
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        let dim = attended.size()[1] * attended.size()[3];
        self.out
            .forward(&attended.transpose(1, 2).reshape([batch, n, dim]))
    }
}

/// A ResNet block of the UNet (with a timestep embedding) or of the VAE (without).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn load(
        w: &NamedWeights,
        prefix: &str,
        groups: i64,
        eps: f64,
    ) -> Result<ResnetBlock, LoadError> {
        let shortcut = format!("{prefix}.conv_shortcut");
        let time = format!("{prefix}.time_emb_proj");
        Ok(ResnetBlock {
            norm1: GroupNorm::load(w, &format!("{prefix}.norm1"), groups, eps)?,
            conv1: Conv2d::load(w, &format!("{prefix}.conv1"), 1)?,
            time_emb_proj: if w.has(&format!("{time}.weight")) {
                Some(Linear::load(w, &time)?)
            } else {
                None
            },
            norm2: GroupNorm::load(w, &format!("{prefix}.norm2"), groups, eps)?,
            conv2: Conv2d::load(w, &format!("{prefix}.conv2"), 1)?,
            conv_shortcut: if w.has(&format!("{shortcut}.weight")) {
                Some(Conv2d::load(w, &shortcut, 1)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, time: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(time)) = (&self.time_emb_proj, time) {
            h += proj.forward(&time.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x) + h,
            None => x + h,
        }
    }
}

/// Nearest-neighbour doubling, then a convolution.
#[derive(Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(w: &NamedWeights, prefix: &str) -> Result<Upsample, LoadError> {
        Ok(Upsample {
            conv: Conv2d::load(w, &format!("{prefix}.conv"), 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        self.forward_to(x, [size[2] * 2, size[3] * 2])
    }

    /// Nearest-neighbour resizing to `size` (height, width), then the convolution.
    pub fn forward_to(&self, x: &Tensor, size: [i64; 2]) -> Tensor {
        self.conv.forward(&x.upsample_nearest2d(size, None, None))
    }
}
