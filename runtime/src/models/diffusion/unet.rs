//! Stable Diffusion's denoiser, diffusers' `UNet2DConditionModel` for SD 1.x and 2.x
//! configurations: a sinusoidal timestep embedding, down blocks of ResNets (with
//! cross-attention transformers where the checkpoint has them), a middle block, and up blocks
//! that concatenate the down path's outputs. Which blocks have attention, shortcuts and
//! resamplers is read from the checkpoint's tensor names.
//!
//! Reference: diffusers v0.42.1, `models/unets/unet_2d_condition.py`, `unet_2d_blocks.py`,
//! `models/transformers/transformer_2d.py`, `models/attention.py`.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::models::layers::{
    Attention, Conv2d, GroupNorm, LayerNorm, Linear, ResnetBlock, Upsample,
};
use crate::models::weights::NamedWeights;
use crate::models::{LoadError, read_json};

/// One number for every block, or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(i64),
    Each(Vec<i64>),
}

impl PerBlock {
    fn get(&self, block: usize) -> i64 {
        match self {
            PerBlock::One(n) => *n,
            PerBlock::Each(list) => list[block.min(list.len() - 1)],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    /// diffusers reads this as the number of heads when `num_attention_heads` is unset.
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub sample_size: Option<i64>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
}

fn default_groups() -> i64 {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

impl UNetConfig {
    fn heads(&self, block: usize) -> i64 {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(block)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

/// Either projection of a `Transformer2DModel`: a 1×1 convolution (SD 1.x) or a linear layer
/// (SD 2.x).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

#[derive(Debug)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn load(
        w: &NamedWeights,
        prefix: &str,
        groups: i64,
        heads: i64,
    ) -> Result<SpatialTransformer, LoadError> {
        let projection = |name: &str| -> Result<Projection, LoadError> {
            let p = format!("{prefix}.{name}");
            Ok(if w.get(&format!("{p}.weight"))?.dim() == 4 {
                Projection::Conv(Conv2d::load(w, &p, 1)?)
            } else {
                Projection::Linear(Linear::load(w, &p)?)
            })
        };
        let mut blocks = Vec::new();
        while w.has(&format!(
            "{prefix}.transformer_blocks.{}.norm1.weight",
            blocks.len()
        )) {
            let p = format!("{prefix}.transformer_blocks.{}", blocks.len());
            blocks.push(TransformerBlock {
                norm1: LayerNorm::load(w, &format!("{p}.norm1"), 1e-5)?,
                attn1: Attention::load_diffusers(w, &format!("{p}.attn1"), heads)?,
                norm2: LayerNorm::load(w, &format!("{p}.norm2"), 1e-5)?,
                attn2: Attention::load_diffusers(w, &format!("{p}.attn2"), heads)?,
                norm3: LayerNorm::load(w, &format!("{p}.norm3"), 1e-5)?,
                ff_in: Linear::load(w, &format!("{p}.ff.net.0.proj"))?,
                ff_out: Linear::load(w, &format!("{p}.ff.net.2"))?,
            });
        }
        Ok(SpatialTransformer {
            norm: GroupNorm::load(w, &format!("{prefix}.norm"), groups, 1e-6)?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (batch, channels, height, width) = x.size4().expect("4-D");
        let to_tokens = |t: Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([batch, height * width, c])
        };
        let h = self.norm.forward(x);
        let mut h = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&h)),
            Projection::Linear(linear) => linear.forward(&to_tokens(h)),
        };
        for block in &self.blocks {
            h += block.attn1.forward(&block.norm1.forward(&h), None, None);
            h += block
                .attn2
                .forward(&block.norm2.forward(&h), Some(context), None);
            let projected = block.ff_in.forward(&block.norm3.forward(&h));
            let half = projected.size()[2] / 2;
            let geglu = projected.narrow(2, 0, half) * projected.narrow(2, half, half).gelu("none");
            h += block.ff_out.forward(&geglu);
        }
        let to_image = |t: Tensor| {
            let c = t.size()[2];
            t.reshape([batch, height, width, c]).permute([0, 3, 1, 2])
        };
        let h = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(h)),
            Projection::Linear(linear) => to_image(linear.forward(&h)),
        };
        debug_assert_eq!(h.size()[1], channels);
        h + x
    }
}

/// A down or up block: ResNets, each followed by a transformer when the block has attention,
/// then a resampler when it has one.
#[derive(Debug)]
struct Block {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Conv2d>,
    upsample: Option<Upsample>,
}

impl Block {
    fn load(
        w: &NamedWeights,
        prefix: &str,
        config: &UNetConfig,
        heads: i64,
    ) -> Result<Block, LoadError> {
        let (groups, eps) = (config.norm_num_groups, config.norm_eps);
        let mut block = Block {
            resnets: Vec::new(),
            attentions: Vec::new(),
            downsample: None,
            upsample: None,
        };
        while w.has(&format!(
            "{prefix}.resnets.{}.conv1.weight",
            block.resnets.len()
        )) {
            let i = block.resnets.len();
            block.resnets.push(ResnetBlock::load(
                w,
                &format!("{prefix}.resnets.{i}"),
                groups,
                eps,
            )?);
            if w.has(&format!("{prefix}.attentions.{i}.norm.weight")) {
                block.attentions.push(SpatialTransformer::load(
                    w,
                    &format!("{prefix}.attentions.{i}"),
                    groups,
                    heads,
                )?);
            }
        }
        if w.has(&format!("{prefix}.downsamplers.0.conv.weight")) {
            block.downsample = Some(Conv2d::load(
                w,
                &format!("{prefix}.downsamplers.0.conv"),
                2,
            )?);
        }
        if w.has(&format!("{prefix}.upsamplers.0.conv.weight")) {
            block.upsample = Some(Upsample::load(w, &format!("{prefix}.upsamplers.0"))?);
        }
        Ok(block)
    }

    fn layer(&self, i: usize, x: &Tensor, time: &Tensor, context: &Tensor) -> Tensor {
        let h = self.resnets[i].forward(x, Some(time));
        match self.attentions.get(i) {
            Some(attention) => attention.forward(&h, context),
            None => h,
        }
    }
}

#[derive(Debug)]
pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<Block>,
    mid_resnets: (ResnetBlock, ResnetBlock),
    mid_attention: SpatialTransformer,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    kind: Kind,
    device: Device,
}

impl UNet {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<UNet, LoadError> {
        let path = dir.join("config.json");
        let config: UNetConfig = read_json(&path)?;
        if config.addition_embed_type.is_some()
            || config.class_embed_type.is_some()
            || config.time_cond_proj_dim.is_some()
        {
            return Err(LoadError::Invalid {
                path,
                message: "UNets with added, class or guidance embeddings (SDXL and others) are not supported; supported: Stable Diffusion 1.x and 2.x".to_owned(),
            });
        }
        let w = NamedWeights::load(&super::weight_files(dir)?, device, kind)?;
        let blocks = config.block_out_channels.len();
        let down = (0..blocks)
            .map(|i| Block::load(&w, &format!("down_blocks.{i}"), &config, config.heads(i)))
            .collect::<Result<Vec<_>, LoadError>>()?;
        let up = (0..blocks)
            .map(|i| {
                Block::load(
                    &w,
                    &format!("up_blocks.{i}"),
                    &config,
                    config.heads(blocks - 1 - i),
                )
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let (groups, eps) = (config.norm_num_groups, config.norm_eps);
        let unet = UNet {
            conv_in: Conv2d::load(&w, "conv_in", 1)?,
            time_linear_1: Linear::load(&w, "time_embedding.linear_1")?,
            time_linear_2: Linear::load(&w, "time_embedding.linear_2")?,
            mid_resnets: (
                ResnetBlock::load(&w, "mid_block.resnets.0", groups, eps)?,
                ResnetBlock::load(&w, "mid_block.resnets.1", groups, eps)?,
            ),
            mid_attention: SpatialTransformer::load(
                &w,
                "mid_block.attentions.0",
                groups,
                config.heads(blocks - 1),
            )?,
            norm_out: GroupNorm::load(&w, "conv_norm_out", groups, eps)?,
            conv_out: Conv2d::load(&w, "conv_out", 1)?,
            down,
            up,
            config,
            kind,
            device,
        };
        w.finish(&[])?;
        Ok(unet)
    }

    /// The sinusoidal embedding of `timestep` (float32, as diffusers computes it).
    fn timestep_embedding(&self, timestep: f64, batch: i64) -> Tensor {
        let dim = self.conv_in.channels().1;
        let half = dim / 2;
        let exponent = Tensor::arange(half, (Kind::Float, self.device)) * (-(10_000f64.ln()))
            / (half as f64 - self.config.freq_shift);
        let angles = exponent.exp() * timestep;
        let (sin, cos) = (angles.sin(), angles.cos());
        let embedding = if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 0)
        } else {
            Tensor::cat(&[sin, cos], 0)
        };
        embedding
            .to_kind(self.kind)
            .unsqueeze(0)
            .expand([batch, dim], false)
    }

    /// Predicted noise (or v) for `sample` [batch, 4, h, w] at `timestep`, conditioned on
    /// `context` [batch, tokens, dim].
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Tensor {
        let batch = sample.size()[0];
        let time = self.time_linear_2.forward(
            &self
                .time_linear_1
                .forward(&self.timestep_embedding(timestep, batch))
                .silu(),
        );
        let mut h = self.conv_in.forward(sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down {
            for i in 0..block.resnets.len() {
                h = block.layer(i, &h, &time, context);
                skips.push(h.shallow_clone());
            }
            if let Some(downsample) = &block.downsample {
                h = downsample.forward(&h);
                skips.push(h.shallow_clone());
            }
        }
        h = self.mid_resnets.0.forward(&h, Some(&time));
        h = self.mid_attention.forward(&h, context);
        h = self.mid_resnets.1.forward(&h, Some(&time));
        for block in &self.up {
            for i in 0..block.resnets.len() {
                let skip = skips.pop().expect("a skip connection per up-block ResNet");
                h = block.layer(i, &Tensor::cat(&[&h, &skip], 1), &time, context);
            }
            if let Some(upsample) = &block.upsample {
                // To the size of the skip connection it meets next, as diffusers does, so that
                // latents of odd sizes come back to their size.
                let size = skips.last().map_or_else(
                    || {
                        let s = h.size();
                        [s[2] * 2, s[3] * 2]
                    },
                    |skip| {
                        let s = skip.size();
                        [s[2], s[3]]
                    },
                );
                h = upsample.forward_to(&h, size);
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h).silu())
    }
}
