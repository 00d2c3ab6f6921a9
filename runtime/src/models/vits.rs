//! VITS, the architecture of Meta's MMS-TTS models: a transformer text encoder with windowed
//! relative-position attention, a (stochastic) duration predictor, a normalising flow of
//! WaveNet coupling layers run in reverse, and a HiFi-GAN decoder to the waveform.
//!
//! Reference: transformers v5.24.0, `models/vits/modeling_vits.py`
//! (https://github.com/huggingface/transformers/tree/v5.24.0). Weights are read by their
//! checkpoint names; weight-normalised convolutions are folded (g · v / ‖v‖) at load, whichever
//! of the two names PyTorch gave their parts.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::layers::{LayerNorm, Linear};
use super::weights::NamedWeights;
use super::{LoadError, read_json, weight_files};

/// Checkpoint tensors that synthesis from text does not read: the posterior encoder and the
/// duration predictor's posterior flows (`post_*`) map recorded audio and durations to latents
/// for training; transformers' inference leaves them unused too.
const UNREAD: [&str; 2] = ["posterior_encoder.*", "duration_predictor.post_*"];

/// `config.json` of a VITS checkpoint (the fields inference uses).
#[derive(Debug, Clone, Deserialize)]
pub struct VitsConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub window_size: Option<i64>,
    pub ffn_dim: i64,
    pub ffn_kernel_size: i64,
    pub flow_size: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub use_stochastic_duration_prediction: bool,
    #[serde(default)]
    pub num_speakers: i64,
    #[serde(default)]
    pub speaker_embedding_size: i64,
    pub upsample_initial_channel: i64,
    pub upsample_rates: Vec<i64>,
    pub upsample_kernel_sizes: Vec<i64>,
    pub resblock_kernel_sizes: Vec<i64>,
    pub resblock_dilation_sizes: Vec<Vec<i64>>,
    pub leaky_relu_slope: f64,
    pub depth_separable_channels: i64,
    pub depth_separable_num_layers: i64,
    pub duration_predictor_flow_bins: i64,
    pub duration_predictor_tail_bound: f64,
    pub duration_predictor_kernel_size: i64,
    pub duration_predictor_num_flows: i64,
    pub duration_predictor_filter_channels: i64,
    pub prior_encoder_num_flows: i64,
    pub prior_encoder_num_wavenet_layers: i64,
    pub wavenet_kernel_size: i64,
    pub wavenet_dilation_rate: i64,
    pub speaking_rate: f64,
    pub noise_scale: f64,
    pub noise_scale_duration: f64,
    pub sampling_rate: u32,
}

fn default_act() -> String {
    "relu".to_owned()
}
fn default_eps() -> f64 {
    1e-5
}

impl VitsConfig {
    pub fn load(dir: &Path) -> Result<VitsConfig, LoadError> {
        let path = dir.join("config.json");
        let config: VitsConfig = read_json(&path)?;
        config
            .validate()
            .map_err(|message| LoadError::Invalid { path, message })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.model_type != "vits" {
            return Err(format!(
                "model_type {:?} is not supported for text to speech; supported: vits",
                self.model_type
            ));
        }
        if self.num_speakers > 1 || self.speaker_embedding_size != 0 {
            return Err("multi-speaker VITS models are not supported".to_owned());
        }
        if !matches!(self.hidden_act.as_str(), "relu" | "gelu") {
            return Err(format!(
                "hidden_act {:?} is not supported; supported: relu, gelu",
                self.hidden_act
            ));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err("hidden_size must be a multiple of num_attention_heads".to_owned());
        }
        if self.upsample_rates.len() != self.upsample_kernel_sizes.len()
            || self.resblock_kernel_sizes.len() != self.resblock_dilation_sizes.len()
        {
            return Err(
                "the decoder's upsampling or residual block lists differ in length".to_owned(),
            );
        }
        Ok(())
    }

    /// Waveform samples per spectrogram frame.
    pub fn hop(&self) -> i64 {
        self.upsample_rates.iter().product()
    }
}

fn conv(
    w: &NamedWeights,
    prefix: &str,
    padding: i64,
    dilation: i64,
    groups: i64,
) -> Result<Conv, LoadError> {
    Ok(Conv {
        weight: w.conv_weight(prefix)?,
        bias: w.optional(&format!("{prefix}.bias")),
        padding,
        dilation,
        groups,
    })
}

/// A 1-D convolution (stride 1) with its padding and dilation.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: i64,
    dilation: i64,
    groups: i64,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Tensor {
        exact_conv1d(
            x,
            (&self.weight, self.bias.as_ref()),
            (1, self.padding, self.dilation),
            None,
            self.groups,
        )
    }
}

/// A 1-D convolution, transposed when `output_padding` is given, in full float32 on CUDA.
/// cuDNN's default TF32 (10-bit mantissas) put the waveform 1.6e-3 from transformers' on an
/// H200, against 1.6e-5 without it; a model this small does not need the speed.
fn exact_conv1d(
    x: &Tensor,
    (weight, bias): (&Tensor, Option<&Tensor>),
    (stride, padding, dilation): (i64, i64, i64),
    output_padding: Option<i64>,
    groups: i64,
) -> Tensor {
    x.internal_convolution(
        weight,
        bias,
        [stride],
        [padding],
        [dilation],
        output_padding.is_some(),
        [output_padding.unwrap_or(0)],
        groups,
        false,
        false,
        true,
        false,
    )
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    /// Relative position embeddings, with a `window_size`.
    rel_k: Option<Tensor>,
    rel_v: Option<Tensor>,
    heads: i64,
    window: i64,
}

impl Attention {
    /// The relative embeddings for `length` positions: [1, 2·length − 1, head_dim].
    fn relative(&self, embeddings: &Tensor, length: i64) -> Tensor {
        let pad = (length - (self.window + 1)).max(0);
        let padded = if pad > 0 {
            embeddings.constant_pad_nd([0, 0, pad, pad, 0, 0])
        } else {
            embeddings.shallow_clone()
        };
        let start = ((self.window + 1) - length).max(0);
        padded.narrow(1, start, 2 * length - 1)
    }

    /// [bh, L, 2L−1] relative logits → [bh, L, L] absolute, by the pad-and-reshape trick.
    fn relative_to_absolute(x: &Tensor) -> Tensor {
        let (bh, length, _) = x.size3().expect("3-D");
        let x = x
            .constant_pad_nd([0, 1, 0, 0, 0, 0])
            .view([bh, length * 2 * length]);
        let x = x.constant_pad_nd([0, length - 1, 0, 0]);
        x.view([bh, length + 1, 2 * length - 1])
            .narrow(1, 0, length)
            .narrow(2, length - 1, length)
    }

    /// [bh, L, L] absolute weights → [bh, L, 2L−1] relative.
    fn absolute_to_relative(x: &Tensor) -> Tensor {
        let (bh, length, _) = x.size3().expect("3-D");
        let x = x
            .constant_pad_nd([0, length - 1, 0, 0, 0, 0])
            .view([bh, length * (2 * length - 1)]);
        let x = x.constant_pad_nd([length, 0, 0, 0]);
        x.view([bh, length, 2 * length])
            .narrow(2, 1, 2 * length - 1)
    }

    /// x: [1, L, hidden] → [1, L, hidden]
    fn forward(&self, x: &Tensor) -> Tensor {
        let (batch, length, dim) = x.size3().expect("3-D");
        let head_dim = dim / self.heads;
        let shape = |t: Tensor| {
            t.view([batch, length, self.heads, head_dim])
                .transpose(1, 2)
                .reshape([batch * self.heads, length, head_dim])
        };
        let q = shape(self.q.forward(x) * (head_dim as f64).powf(-0.5));
        let k = shape(self.k.forward(x));
        let v = shape(self.v.forward(x));
        let mut weights = q.bmm(&k.transpose(1, 2));
        if let Some(rel_k) = &self.rel_k {
            let relative = q.matmul(&self.relative(rel_k, length).transpose(-2, -1));
            weights += Self::relative_to_absolute(&relative);
        }
        let probs = weights.softmax(-1, weights.kind());
        let mut output = probs.bmm(&v);
        if let Some(rel_v) = &self.rel_v {
            output += Self::absolute_to_relative(&probs).matmul(&self.relative(rel_v, length));
        }
        let output = output
            .view([batch, self.heads, length, head_dim])
            .transpose(1, 2)
            .reshape([batch, length, dim]);
        self.out.forward(&output)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    attention: Attention,
    layer_norm: LayerNorm,
    conv_1: Conv,
    conv_2: Conv,
    final_layer_norm: LayerNorm,
}

/// The WaveNet of a coupling layer: gated dilated convolutions with residual and skip outputs.
#[derive(Debug)]
struct WaveNet {
    in_layers: Vec<Conv>,
    res_skip_layers: Vec<Conv>,
    hidden: i64,
}

impl WaveNet {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        let mut output = x.zeros_like();
        let last = self.in_layers.len() - 1;
        for (i, (input, res_skip)) in self.in_layers.iter().zip(&self.res_skip_layers).enumerate() {
            let h = input.forward(&x);
            let acts = h.narrow(1, 0, self.hidden).tanh()
                * h.narrow(1, self.hidden, self.hidden).sigmoid();
            let res_skip = res_skip.forward(&acts);
            if i < last {
                x = (x + res_skip.narrow(1, 0, self.hidden)) * mask;
                output += res_skip.narrow(1, self.hidden, self.hidden);
            } else {
                output += res_skip;
            }
        }
        output * mask
    }
}

#[derive(Debug)]
struct CouplingLayer {
    conv_pre: Conv,
    wavenet: WaveNet,
    conv_post: Conv,
    half: i64,
}

impl CouplingLayer {
    fn reverse(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let first = x.narrow(1, 0, self.half);
        let second = x.narrow(1, self.half, self.half);
        let h = self.conv_pre.forward(&first) * mask;
        let h = self.wavenet.forward(&h, mask);
        let mean = self.conv_post.forward(&h) * mask;
        Tensor::cat(&[first, (second - mean) * mask], 1)
    }
}

/// The dilated depth-separable convolutions of the stochastic duration predictor.
#[derive(Debug)]
struct DepthSeparable {
    dilated: Vec<Conv>,
    pointwise: Vec<Conv>,
    norms_1: Vec<LayerNorm>,
    norms_2: Vec<LayerNorm>,
}

impl DepthSeparable {
    fn forward(&self, x: &Tensor, mask: &Tensor, conditioning: Option<&Tensor>) -> Tensor {
        let mut x = match conditioning {
            Some(c) => x + c,
            None => x.shallow_clone(),
        };
        for i in 0..self.dilated.len() {
            let h = self.dilated[i].forward(&(&x * mask));
            let h = self.norms_1[i].forward_channels(&h).gelu("none");
            let h = self.pointwise[i].forward(&h);
            let h = self.norms_2[i].forward_channels(&h).gelu("none");
            x += h;
        }
        x * mask
    }
}

#[derive(Debug)]
struct ConvFlow {
    conv_pre: Conv,
    conv_dds: DepthSeparable,
    conv_proj: Conv,
    half: i64,
    bins: i64,
    filter_channels: i64,
    tail_bound: f64,
}

impl ConvFlow {
    fn reverse(&self, x: &Tensor, mask: &Tensor, conditioning: &Tensor) -> Tensor {
        let first = x.narrow(1, 0, self.half);
        let second = x.narrow(1, self.half, self.half);
        let h = self.conv_pre.forward(&first);
        let h = self.conv_dds.forward(&h, mask, Some(conditioning));
        let h = self.conv_proj.forward(&h) * mask;
        let (batch, channels, length) = first.size3().expect("3-D");
        let h = h
            .reshape([batch, channels, -1, length])
            .permute([0, 1, 3, 2]);
        let scale = (self.filter_channels as f64).sqrt();
        let widths = h.narrow(-1, 0, self.bins) / scale;
        let heights = h.narrow(-1, self.bins, self.bins) / scale;
        let derivatives = h.narrow(-1, 2 * self.bins, self.bins - 1);
        let second = spline_inverse(&second, &widths, &heights, &derivatives, self.tail_bound);
        Tensor::cat(&[first, second], 1) * mask
    }
}

const MIN_BIN: f64 = 1e-3;
const MIN_DERIVATIVE: f64 = 1e-3;

/// The inverse of the monotonic rational-quadratic spline on [−bound, bound] (identity outside
/// it), as `_unconstrained_rational_quadratic_spline(reverse=True)` computes it.
fn spline_inverse(
    inputs: &Tensor,
    unnormalized_widths: &Tensor,
    unnormalized_heights: &Tensor,
    unnormalized_derivatives: &Tensor,
    bound: f64,
) -> Tensor {
    let bins = unnormalized_widths.size()[unnormalized_widths.dim() - 1];
    let inside = inputs.ge(-bound).logical_and(&inputs.le(bound));
    let edge = (1.0 - MIN_DERIVATIVE).exp_m1().ln();
    let derivatives = unnormalized_derivatives.constant_pad_nd([1, 1]);
    let _ = derivatives.narrow(-1, 0, 1).fill_(edge);
    let _ = derivatives.narrow(-1, bins, 1).fill_(edge);
    let derivatives = derivatives.softplus() + MIN_DERIVATIVE;
    let knots = |unnormalized: &Tensor| {
        let sizes =
            unnormalized.softmax(-1, unnormalized.kind()) * (1.0 - MIN_BIN * bins as f64) + MIN_BIN;
        let cumulative =
            sizes.cumsum(-1, sizes.kind()).constant_pad_nd([1, 0]) * (2.0 * bound) - bound;
        let _ = cumulative.narrow(-1, 0, 1).fill_(-bound);
        let _ = cumulative.narrow(-1, bins, 1).fill_(bound);
        let sizes = cumulative.narrow(-1, 1, bins) - cumulative.narrow(-1, 0, bins);
        (cumulative, sizes)
    };
    let (cumwidths, widths) = knots(unnormalized_widths);
    let (cumheights, heights) = knots(unnormalized_heights);
    // Outside the interval the result is the input; compute there on a clamped copy.
    let x = inputs.clamp(-bound, bound);
    let locations = cumheights.copy();
    let _ = locations.narrow(-1, bins, 1).g_add_scalar_(1e-6);
    let index = (x
        .unsqueeze(-1)
        .ge_tensor(&locations)
        .sum_dim_intlist(-1, true, Kind::Int64)
        - 1)
    .clamp(0, bins - 1);
    let pick = |t: &Tensor| t.gather(-1, &index, false).squeeze_dim(-1);
    let input_cumwidths = pick(&cumwidths);
    let input_widths = pick(&widths);
    let input_cumheights = pick(&cumheights);
    let delta = &heights / &widths;
    let input_delta = pick(&delta);
    let input_derivatives = pick(&derivatives);
    let input_derivatives_next = pick(&derivatives.narrow(-1, 1, bins));
    let input_heights = pick(&heights);
    let intermediate1 = &input_derivatives + &input_derivatives_next - &input_delta * 2.0;
    let intermediate2 = &x - &input_cumheights;
    let intermediate3 = &intermediate2 * &intermediate1;
    let a = &input_heights * (&input_delta - &input_derivatives) + &intermediate3;
    let b = &input_heights * &input_derivatives - &intermediate3;
    let c = -(&input_delta) * &intermediate2;
    let discriminant = (b.square() - a * &c * 4.0).clamp_min(0.0);
    let root = (c * 2.0) / (-b - discriminant.sqrt());
    let outputs = root * input_widths + input_cumwidths;
    outputs.where_self(&inside, inputs)
}

/// The stochastic duration predictor's flows, run in reverse from noise.
#[derive(Debug)]
struct StochasticDurations {
    conv_pre: Conv,
    conv_dds: DepthSeparable,
    conv_proj: Conv,
    /// `translate`, `log_scale` of the element-wise affine flow.
    affine: (Tensor, Tensor),
    flows: Vec<ConvFlow>,
}

impl StochasticDurations {
    fn log_durations(&self, hidden: &Tensor, mask: &Tensor, noise_scale: f64) -> Tensor {
        let x = self.conv_pre.forward(hidden);
        let x = self.conv_dds.forward(&x, mask, None);
        let conditioning = self.conv_proj.forward(&x) * mask;
        let (batch, _, length) = hidden.size3().expect("3-D");
        let mut latents =
            Tensor::randn([batch, 2, length], (hidden.kind(), hidden.device())) * noise_scale;
        // transformers reverses the flows and drops the first convolutional one ("a useless
        // vflow"), keeping the element-wise affine flow last.
        for flow in self.flows.iter().skip(1).rev() {
            latents = flow.reverse(&latents.flip([1]), mask, &conditioning);
        }
        let latents = latents.flip([1]);
        let (translate, log_scale) = &self.affine;
        let latents = (latents - translate) * (-log_scale).exp() * mask;
        latents.narrow(1, 0, 1)
    }
}

/// The plain (deterministic) duration predictor.
#[derive(Debug)]
struct Durations {
    conv_1: Conv,
    norm_1: LayerNorm,
    conv_2: Conv,
    norm_2: LayerNorm,
    proj: Conv,
}

impl Durations {
    fn log_durations(&self, hidden: &Tensor, mask: &Tensor) -> Tensor {
        let x = self.conv_1.forward(&(hidden * mask)).relu();
        let x = self.norm_1.forward_channels(&x);
        let x = self.conv_2.forward(&(x * mask)).relu();
        let x = self.norm_2.forward_channels(&x);
        self.proj.forward(&(x * mask)) * mask
    }
}

#[derive(Debug)]
enum DurationPredictor {
    Stochastic(StochasticDurations),
    Plain(Durations),
}

#[derive(Debug)]
struct ResBlock {
    convs1: Vec<Conv>,
    convs2: Vec<Conv>,
}

#[derive(Debug)]
struct HifiGan {
    conv_pre: Conv,
    /// Transposed convolutions: weight, bias, stride, padding.
    upsamplers: Vec<(Tensor, Option<Tensor>, i64, i64)>,
    resblocks: Vec<ResBlock>,
    conv_post: Conv,
    slope: f64,
}

impl HifiGan {
    fn forward(&self, spectrogram: &Tensor) -> Tensor {
        let leaky = |x: &Tensor, slope: f64| x.maximum(&(x * slope));
        let mut h = self.conv_pre.forward(spectrogram);
        let kernels = self.resblocks.len() / self.upsamplers.len();
        for (i, (weight, bias, stride, padding)) in self.upsamplers.iter().enumerate() {
            h = exact_conv1d(
                &leaky(&h, self.slope),
                (weight, bias.as_ref()),
                (*stride, *padding, 1),
                Some(0),
                1,
            );
            let mut sum: Option<Tensor> = None;
            for block in &self.resblocks[i * kernels..(i + 1) * kernels] {
                let mut x = h.shallow_clone();
                for (conv1, conv2) in block.convs1.iter().zip(&block.convs2) {
                    let y =
                        conv2.forward(&leaky(&conv1.forward(&leaky(&x, self.slope)), self.slope));
                    x = y + x;
                }
                sum = Some(match sum {
                    Some(s) => s + x,
                    None => x,
                });
            }
            h = sum.expect("at least one residual block") / kernels as f64;
        }
        // The last activation uses PyTorch's default slope, as the reference does.
        self.conv_post.forward(&leaky(&h, 0.01)).tanh()
    }
}

/// How a waveform is drawn: the noise scales and the speaking rate.
#[derive(Debug, Clone, Copy)]
pub struct Synthesis {
    pub speaking_rate: f64,
    pub noise_scale: f64,
    pub noise_scale_duration: f64,
}

/// A VITS model with its weights loaded.
#[derive(Debug)]
pub struct VitsModel {
    pub config: VitsConfig,
    embed_tokens: Tensor,
    layers: Vec<EncoderLayer>,
    project: Conv,
    durations: DurationPredictor,
    flows: Vec<CouplingLayer>,
    decoder: HifiGan,
    device: Device,
    kind: Kind,
}

impl VitsModel {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<VitsModel, LoadError> {
        let config = VitsConfig::load(dir)?;
        let w = NamedWeights::load(&weight_files(dir)?, device, kind)?;
        let eps = config.layer_norm_eps;
        let hidden = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("text_encoder.encoder.layers.{i}");
                let ffn_pad = (config.ffn_kernel_size - 1) / 2;
                let relative = |name: &str| {
                    config
                        .window_size
                        .map(|_| w.get(&format!("{p}.attention.{name}")))
                        .transpose()
                };
                Ok(EncoderLayer {
                    attention: Attention {
                        q: Linear::load(&w, &format!("{p}.attention.q_proj"))?,
                        k: Linear::load(&w, &format!("{p}.attention.k_proj"))?,
                        v: Linear::load(&w, &format!("{p}.attention.v_proj"))?,
                        out: Linear::load(&w, &format!("{p}.attention.out_proj"))?,
                        rel_k: relative("emb_rel_k")?,
                        rel_v: relative("emb_rel_v")?,
                        heads: config.num_attention_heads,
                        window: config.window_size.unwrap_or(0),
                    },
                    layer_norm: LayerNorm::load(&w, &format!("{p}.layer_norm"), eps)?,
                    conv_1: conv(&w, &format!("{p}.feed_forward.conv_1"), ffn_pad, 1, 1)?,
                    conv_2: conv(&w, &format!("{p}.feed_forward.conv_2"), ffn_pad, 1, 1)?,
                    final_layer_norm: LayerNorm::load(&w, &format!("{p}.final_layer_norm"), eps)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let depth_separable = |p: &str| -> Result<DepthSeparable, LoadError> {
            let k = config.duration_predictor_kernel_size;
            let mut dds = DepthSeparable {
                dilated: Vec::new(),
                pointwise: Vec::new(),
                norms_1: Vec::new(),
                norms_2: Vec::new(),
            };
            for i in 0..config.depth_separable_num_layers {
                let dilation = k.pow(i as u32);
                dds.dilated.push(conv(
                    &w,
                    &format!("{p}.convs_dilated.{i}"),
                    (k * dilation - dilation) / 2,
                    dilation,
                    hidden,
                )?);
                dds.pointwise
                    .push(conv(&w, &format!("{p}.convs_pointwise.{i}"), 0, 1, 1)?);
                dds.norms_1
                    .push(LayerNorm::load(&w, &format!("{p}.norms_1.{i}"), 1e-5)?);
                dds.norms_2
                    .push(LayerNorm::load(&w, &format!("{p}.norms_2.{i}"), 1e-5)?);
            }
            Ok(dds)
        };
        let durations = if config.use_stochastic_duration_prediction {
            let p = "duration_predictor";
            let flows = (1..=config.duration_predictor_num_flows)
                .map(|i| {
                    Ok(ConvFlow {
                        conv_pre: conv(&w, &format!("{p}.flows.{i}.conv_pre"), 0, 1, 1)?,
                        conv_dds: depth_separable(&format!("{p}.flows.{i}.conv_dds"))?,
                        conv_proj: conv(&w, &format!("{p}.flows.{i}.conv_proj"), 0, 1, 1)?,
                        half: config.depth_separable_channels / 2,
                        bins: config.duration_predictor_flow_bins,
                        filter_channels: hidden,
                        tail_bound: config.duration_predictor_tail_bound,
                    })
                })
                .collect::<Result<Vec<_>, LoadError>>()?;
            DurationPredictor::Stochastic(StochasticDurations {
                conv_pre: conv(&w, &format!("{p}.conv_pre"), 0, 1, 1)?,
                conv_dds: depth_separable(&format!("{p}.conv_dds"))?,
                conv_proj: conv(&w, &format!("{p}.conv_proj"), 0, 1, 1)?,
                affine: (
                    w.get(&format!("{p}.flows.0.translate"))?,
                    w.get(&format!("{p}.flows.0.log_scale"))?,
                ),
                flows,
            })
        } else {
            let p = "duration_predictor";
            let k = config.duration_predictor_kernel_size;
            DurationPredictor::Plain(Durations {
                conv_1: conv(&w, &format!("{p}.conv_1"), k / 2, 1, 1)?,
                norm_1: LayerNorm::load(&w, &format!("{p}.norm_1"), eps)?,
                conv_2: conv(&w, &format!("{p}.conv_2"), k / 2, 1, 1)?,
                norm_2: LayerNorm::load(&w, &format!("{p}.norm_2"), eps)?,
                proj: conv(&w, &format!("{p}.proj"), 0, 1, 1)?,
            })
        };
        let flows = (0..config.prior_encoder_num_flows)
            .map(|i| {
                let p = format!("flow.flows.{i}");
                let k = config.wavenet_kernel_size;
                let wavenet = WaveNet {
                    in_layers: (0..config.prior_encoder_num_wavenet_layers)
                        .map(|j| {
                            let dilation = config.wavenet_dilation_rate.pow(j as u32);
                            conv(
                                &w,
                                &format!("{p}.wavenet.in_layers.{j}"),
                                (k * dilation - dilation) / 2,
                                dilation,
                                1,
                            )
                        })
                        .collect::<Result<_, _>>()?,
                    res_skip_layers: (0..config.prior_encoder_num_wavenet_layers)
                        .map(|j| conv(&w, &format!("{p}.wavenet.res_skip_layers.{j}"), 0, 1, 1))
                        .collect::<Result<_, _>>()?,
                    hidden,
                };
                Ok(CouplingLayer {
                    conv_pre: conv(&w, &format!("{p}.conv_pre"), 0, 1, 1)?,
                    wavenet,
                    conv_post: conv(&w, &format!("{p}.conv_post"), 0, 1, 1)?,
                    half: config.flow_size / 2,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let upsamplers = config
            .upsample_rates
            .iter()
            .zip(&config.upsample_kernel_sizes)
            .enumerate()
            .map(|(i, (&rate, &kernel))| {
                let p = format!("decoder.upsampler.{i}");
                Ok((
                    w.conv_weight(&p)?,
                    w.optional(&format!("{p}.bias")),
                    rate,
                    (kernel - rate) / 2,
                ))
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let mut resblocks = Vec::new();
        for i in 0..config.upsample_rates.len() {
            for (j, (&kernel, dilations)) in config
                .resblock_kernel_sizes
                .iter()
                .zip(&config.resblock_dilation_sizes)
                .enumerate()
            {
                let p = format!(
                    "decoder.resblocks.{}",
                    i * config.resblock_kernel_sizes.len() + j
                );
                resblocks.push(ResBlock {
                    convs1: dilations
                        .iter()
                        .enumerate()
                        .map(|(d, &dilation)| {
                            conv(
                                &w,
                                &format!("{p}.convs1.{d}"),
                                (kernel * dilation - dilation) / 2,
                                dilation,
                                1,
                            )
                        })
                        .collect::<Result<_, _>>()?,
                    convs2: (0..dilations.len())
                        .map(|d| conv(&w, &format!("{p}.convs2.{d}"), (kernel - 1) / 2, 1, 1))
                        .collect::<Result<_, _>>()?,
                });
            }
        }
        let decoder = HifiGan {
            conv_pre: conv(&w, "decoder.conv_pre", 3, 1, 1)?,
            upsamplers,
            resblocks,
            conv_post: conv(&w, "decoder.conv_post", 3, 1, 1)?,
            slope: config.leaky_relu_slope,
        };
        let model = VitsModel {
            embed_tokens: w.get("text_encoder.embed_tokens.weight")?,
            layers,
            project: conv(&w, "text_encoder.project", 0, 1, 1)?,
            durations,
            flows,
            decoder,
            config,
            device,
            kind,
        };
        w.finish(&UNREAD)?;
        Ok(model)
    }

    /// The waveform of `ids` (one text), float32 samples in [−1, 1] at `sampling_rate`.
    pub fn synthesize(&self, ids: &[i64], synthesis: Synthesis) -> Tensor {
        let _guard = tch::no_grad_guard();
        let length = ids.len() as i64;
        let ids = Tensor::from_slice(ids)
            .view([1, length])
            .to_device(self.device);
        let hidden_size = self.config.hidden_size;
        let mut hidden =
            self.embed_tokens
                .index_select(0, &ids.view([-1]))
                .view([1, length, hidden_size])
                * (hidden_size as f64).sqrt();
        let ffn_pad_right = self.config.ffn_kernel_size / 2 - (self.config.ffn_kernel_size - 1) / 2;
        for layer in &self.layers {
            let attended = layer.attention.forward(&hidden);
            hidden = layer.layer_norm.forward(&(hidden + attended));
            // The feed-forward convolutions pad (k−1)/2 left and k/2 right.
            let x = hidden.transpose(1, 2);
            let x = if ffn_pad_right > 0 {
                x.constant_pad_nd([0, ffn_pad_right])
            } else {
                x
            };
            let x = layer.conv_1.forward(&x);
            let x = if self.config.hidden_act == "gelu" {
                x.gelu("none")
            } else {
                x.relu()
            };
            let x = if ffn_pad_right > 0 {
                x.constant_pad_nd([0, ffn_pad_right])
            } else {
                x
            };
            let x = layer.conv_2.forward(&x).transpose(1, 2);
            hidden = layer.final_layer_norm.forward(&(hidden + x));
        }
        let hidden = hidden.transpose(1, 2);
        let mask = Tensor::ones([1, 1, length], (self.kind, self.device));
        let stats = self.project.forward(&hidden);
        let flow = self.config.flow_size;
        let means = stats.narrow(1, 0, flow);
        let log_variances = stats.narrow(1, flow, flow);
        let log_durations = match &self.durations {
            DurationPredictor::Stochastic(sdp) => {
                sdp.log_durations(&hidden, &mask, synthesis.noise_scale_duration)
            }
            DurationPredictor::Plain(dp) => dp.log_durations(&hidden, &mask),
        };
        let durations = (log_durations.exp() * (1.0 / synthesis.speaking_rate)).ceil();
        let durations = Vec::<f32>::try_from(
            durations
                .view([-1])
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        )
        .expect("durations");
        // Each token's prior repeated for its frames (the monotonic alignment path).
        let repeats: Vec<i64> = durations.iter().map(|&d| d.max(0.0) as i64).collect();
        let frames: i64 = repeats.iter().sum::<i64>().max(1);
        let index: Vec<i64> = repeats
            .iter()
            .enumerate()
            .flat_map(|(token, &n)| std::iter::repeat_n(token as i64, n as usize))
            .collect();
        let (means, log_variances) = if index.is_empty() {
            let zeros = Tensor::zeros([1, flow, 1], (self.kind, self.device));
            (zeros.shallow_clone(), zeros)
        } else {
            let index = Tensor::from_slice(&index).to_device(self.device);
            (
                means.index_select(2, &index),
                log_variances.index_select(2, &index),
            )
        };
        // Drawn into a transposed tensor, as transformers' `randn_like` fills its transposed
        // prior (libtorch draws strided tensors in another order), so that a seed gives the
        // same waveform on both.
        let mut noise = Tensor::empty([1, frames, flow], (self.kind, self.device)).transpose(1, 2);
        let _ = noise.normal_(0.0, 1.0);
        let noise = noise * log_variances.exp() * synthesis.noise_scale;
        let mut latents = means + noise;
        let frame_mask = Tensor::ones([1, 1, frames], (self.kind, self.device));
        for coupling in self.flows.iter().rev() {
            latents = coupling.reverse(&latents.flip([1]), &frame_mask);
        }
        self.decoder
            .forward(&latents)
            .view([-1])
            .to_kind(Kind::Float)
    }
}
