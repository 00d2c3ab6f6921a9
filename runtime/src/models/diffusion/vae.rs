//! The decoder half of Stable Diffusion's `AutoencoderKL`: latents to an RGB image.
//!
//! Reference: diffusers v0.42.1, `models/autoencoders/autoencoder_kl.py` and `vae.py`.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::models::layers::{Attention, Conv2d, GroupNorm, Linear, ResnetBlock, Upsample};
use crate::models::weights::NamedWeights;
use crate::models::{LoadError, read_json};

/// The encoder half of the autoencoder (`encoder.`, `quant_conv.`), which maps images to
/// latents: text to image only decodes.
const UNREAD: [&str; 2] = ["encoder.*", "quant_conv.*"];

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

fn default_groups() -> i64 {
    32
}
fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// How many times smaller than the image its latents are.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The middle block's single-head attention over all pixels, with its own group norm and a
/// residual connection.
#[derive(Debug)]
struct PixelAttention {
    norm: GroupNorm,
    attention: Attention,
}

impl PixelAttention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let (batch, channels, height, width) = x.size4().expect("4-D");
        let tokens = self
            .norm
            .forward(x)
            .view([batch, channels, height * width])
            .transpose(1, 2);
        let attended = self.attention.forward(&tokens, None, None);
        attended
            .transpose(1, 2)
            .reshape([batch, channels, height, width])
            + x
    }
}

#[derive(Debug)]
pub struct VaeDecoder {
    pub config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (ResnetBlock, PixelAttention, ResnetBlock),
    up: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<VaeDecoder, LoadError> {
        let config: VaeConfig = read_json(&dir.join("config.json"))?;
        let w = NamedWeights::load(&super::weight_files(dir)?, device, kind)?;
        let groups = config.norm_num_groups;
        let eps = 1e-6;
        let resnet = |prefix: &str| ResnetBlock::load(&w, prefix, groups, eps);
        let mut up = Vec::new();
        while w.has(&format!(
            "decoder.up_blocks.{}.resnets.0.conv1.weight",
            up.len()
        )) {
            let p = format!("decoder.up_blocks.{}", up.len());
            let mut resnets = Vec::new();
            while w.has(&format!("{p}.resnets.{}.conv1.weight", resnets.len())) {
                resnets.push(resnet(&format!("{p}.resnets.{}", resnets.len()))?);
            }
            let upsample = if w.has(&format!("{p}.upsamplers.0.conv.weight")) {
                Some(Upsample::load(&w, &format!("{p}.upsamplers.0"))?)
            } else {
                None
            };
            up.push((resnets, upsample));
        }
        let attention = "decoder.mid_block.attentions.0";
        let decoder = VaeDecoder {
            post_quant_conv: if w.has("post_quant_conv.weight") {
                Some(Conv2d::load(&w, "post_quant_conv", 1)?)
            } else {
                None
            },
            conv_in: Conv2d::load(&w, "decoder.conv_in", 1)?,
            mid: (
                resnet("decoder.mid_block.resnets.0")?,
                PixelAttention {
                    norm: GroupNorm::load(&w, &format!("{attention}.group_norm"), groups, eps)?,
                    attention: if w.has(&format!("{attention}.query.weight")) {
                        // The names of checkpoints saved before diffusers 0.14.
                        Attention {
                            q: Linear::load(&w, &format!("{attention}.query"))?,
                            k: Linear::load(&w, &format!("{attention}.key"))?,
                            v: Linear::load(&w, &format!("{attention}.value"))?,
                            out: Linear::load(&w, &format!("{attention}.proj_attn"))?,
                            heads: 1,
                        }
                    } else {
                        Attention::load_diffusers(&w, attention, 1)?
                    },
                },
                resnet("decoder.mid_block.resnets.1")?,
            ),
            up,
            norm_out: GroupNorm::load(&w, "decoder.conv_norm_out", groups, eps)?,
            conv_out: Conv2d::load(&w, "decoder.conv_out", 1)?,
            config,
        };
        w.finish(&UNREAD)?;
        Ok(decoder)
    }

    /// Denoised latents [batch, 4, h, w] → images [batch, 3, h·s, w·s] in [0, 1].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let mut z = latents / self.config.scaling_factor;
        if let Some(shift) = self.config.shift_factor {
            z += shift;
        }
        if let Some(conv) = &self.post_quant_conv {
            z = conv.forward(&z);
        }
        let mut h = self.conv_in.forward(&z);
        h = self.mid.0.forward(&h, None);
        h = self.mid.1.forward(&h);
        h = self.mid.2.forward(&h, None);
        for (resnets, upsample) in &self.up {
            for resnet in resnets {
                h = resnet.forward(&h, None);
            }
            if let Some(upsample) = upsample {
                h = upsample.forward(&h);
            }
        }
        let image = self.conv_out.forward(&self.norm_out.forward(&h).silu());
        (image / 2.0 + 0.5).clamp(0.0, 1.0)
    }
}
