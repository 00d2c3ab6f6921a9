//! Whisper: log-mel features as `WhisperFeatureExtractor` computes them, and the
//! encoder-decoder (two convolutions and sinusoidal-initialised learned positions before a
//! pre-norm transformer encoder; a pre-norm decoder with cross-attention, learned positions and
//! logits tied to the token embeddings). Every size from tiny to large-v3 (128 mel bins) is a
//! configuration of the same code.
//!
//! Reference: transformers v5.24.0, `models/whisper/modeling_whisper.py` and
//! `feature_extraction_whisper.py` (https://github.com/huggingface/transformers/tree/v5.24.0).
//! Weights are read by their checkpoint names; every tensor of a Whisper checkpoint is read.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::attention::Attention;
use super::layers::{Embedding, LayerNorm, Linear};
use super::weights::NamedWeights;
use super::{LoadError, read_json, weight_files};

/// `config.json` of a Whisper checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct WhisperConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub num_mel_bins: i64,
    pub d_model: i64,
    pub encoder_layers: i64,
    pub encoder_attention_heads: i64,
    pub decoder_layers: i64,
    pub decoder_attention_heads: i64,
    pub encoder_ffn_dim: i64,
    pub decoder_ffn_dim: i64,
    pub max_source_positions: i64,
    pub max_target_positions: i64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
}

fn default_activation() -> String {
    "gelu".to_owned()
}

impl WhisperConfig {
    pub fn load(dir: &Path) -> Result<WhisperConfig, LoadError> {
        let path = dir.join("config.json");
        let config: WhisperConfig = read_json(&path)?;
        config
            .validate()
            .map_err(|message| LoadError::Invalid { path, message })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.model_type != "whisper" {
            return Err(format!(
                "model_type {:?} is not supported for speech recognition; supported: whisper",
                self.model_type
            ));
        }
        if self.activation_function != "gelu" {
            return Err(format!(
                "activation_function {:?} is not supported; supported: gelu",
                self.activation_function
            ));
        }
        if self.d_model % self.encoder_attention_heads != 0
            || self.d_model % self.decoder_attention_heads != 0
        {
            return Err("d_model must be a multiple of the attention heads".to_owned());
        }
        Ok(())
    }

    /// Mel frames one window holds: the encoder halves them to its positions.
    pub fn window_frames(&self) -> i64 {
        2 * self.max_source_positions
    }
}

/// `preprocessor_config.json`: the feature extractor's sizes.
#[derive(Debug, Clone, Deserialize)]
pub struct FeatureConfig {
    pub feature_size: i64,
    pub sampling_rate: u32,
    pub hop_length: i64,
    pub n_fft: i64,
    pub n_samples: usize,
}

/// Log-mel spectrograms of 16 kHz audio windows, exactly as Whisper's feature extractor: a
/// periodic Hann window, centred frames with reflected edges, power spectrum, Slaney-normalised
/// mel filters up to 8 kHz, log10 floored 8 below the window's peak, then `(x + 4) / 4`.
#[derive(Debug)]
pub struct MelFeatures {
    pub config: FeatureConfig,
    /// [n_mels, n_fft / 2 + 1], float64.
    filters: Tensor,
    window: Tensor,
}

impl MelFeatures {
    pub fn load(dir: &Path) -> Result<MelFeatures, LoadError> {
        let config: FeatureConfig = read_json(&dir.join("preprocessor_config.json"))?;
        if config.sampling_rate != crate::audio::TARGET_RATE
            || config.n_fft < 16
            || config.hop_length < 1
        {
            return Err(LoadError::Invalid {
                path: dir.join("preprocessor_config.json"),
                message: "expected 16 kHz audio, n_fft ≥ 16 and hop_length ≥ 1".to_owned(),
            });
        }
        Ok(MelFeatures::new(config))
    }

    pub fn new(config: FeatureConfig) -> MelFeatures {
        let filters = mel_filters(
            config.n_fft,
            config.feature_size,
            f64::from(config.sampling_rate),
        );
        let window = Tensor::hann_window_periodic(config.n_fft, true, (Kind::Double, Device::Cpu));
        MelFeatures {
            config,
            filters,
            window,
        }
    }

    /// Frames of one window: `n_samples / hop_length`.
    pub fn frames(&self) -> i64 {
        self.config.n_samples as i64 / self.config.hop_length
    }

    /// Features of `samples`, zero-padded or cut to one window: [n_mels, frames], float32.
    pub fn compute(&self, samples: &[f32]) -> Tensor {
        let _guard = tch::no_grad_guard();
        let n = self.config.n_samples;
        let mut padded = vec![0f64; n];
        for (out, sample) in padded.iter_mut().zip(samples) {
            *out = f64::from(*sample);
        }
        // Centred frames: reflected edges of half a window, padded here because the centring
        // form of tch's `stft` cannot leave `align_to_window` unset.
        let half = self.config.n_fft / 2;
        let spectrum = Tensor::from_slice(&padded)
            .view([1, n as i64])
            .reflection_pad1d([half, half])
            .view([-1])
            .stft(
                self.config.n_fft,
                self.config.hop_length,
                self.config.n_fft,
                Some(&self.window),
                false,
                true,
                true,
                false,
            );
        let frames = spectrum.size()[1];
        let power = spectrum.narrow(1, 0, frames - 1).abs().square();
        let log_spec = self.filters.matmul(&power).clamp_min(1e-10).log10();
        let floor = log_spec.max().double_value(&[]) - 8.0;
        ((log_spec.clamp_min(floor) + 4.0) / 4.0).to_kind(Kind::Float)
    }
}

/// Slaney's mel scale: linear below 1 kHz, logarithmic above.
fn hz_to_mel(hz: f64) -> f64 {
    let (min_log_hz, min_log_mel, step) = (1000.0, 15.0, 27.0 / 6.4f64.ln());
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() * step
    } else {
        3.0 * hz / 200.0
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    let (min_log_hz, min_log_mel, step) = (1000.0, 15.0, 6.4f64.ln() / 27.0);
    if mel >= min_log_mel {
        min_log_hz * ((mel - min_log_mel) * step).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// Triangular filters between mel-spaced edges from 0 to 8 kHz, each scaled to unit area
/// (Slaney normalisation): [n_mels, n_fft / 2 + 1].
fn mel_filters(n_fft: i64, n_mels: i64, sampling_rate: f64) -> Tensor {
    let bins = (n_fft / 2 + 1) as usize;
    let fft_hz: Vec<f64> = (0..bins)
        .map(|i| i as f64 * (sampling_rate / 2.0) / (bins - 1) as f64)
        .collect();
    let (low, high) = (hz_to_mel(0.0), hz_to_mel(8000.0));
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(low + (high - low) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = vec![0f64; n_mels as usize * bins];
    for m in 0..n_mels as usize {
        let (left, centre, right) = (edges[m], edges[m + 1], edges[m + 2]);
        let norm = 2.0 / (right - left);
        for (i, &hz) in fft_hz.iter().enumerate() {
            let down = (hz - left) / (centre - left);
            let up = (right - hz) / (right - centre);
            weights[m * bins + i] = down.min(up).max(0.0) * norm;
        }
    }
    Tensor::from_slice(&weights).view([n_mels, bins as i64])
}

#[derive(Debug)]
struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl FeedForward {
    fn load(w: &NamedWeights, p: &str, dim: i64, hidden: i64) -> Result<FeedForward, LoadError> {
        let linear = |name: &str, shape| {
            Linear::sized(w, &format!("{p}.{name}"), shape, true).map(Linear::favour_few_rows)
        };
        Ok(FeedForward {
            fc1: linear("fc1", [hidden, dim])?,
            fc2: linear("fc2", [dim, hidden])?,
            final_layer_norm: layer_norm(w, &format!("{p}.final_layer_norm"), dim)?,
        })
    }

    /// The residual block: x + fc2(gelu(fc1(norm(x)))).
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.final_layer_norm.forward(x);
        x + self.fc2.forward(&self.fc1.forward(&h).gelu("none"))
    }
}

fn layer_norm(w: &NamedWeights, prefix: &str, dim: i64) -> Result<LayerNorm, LoadError> {
    LayerNorm::sized(w, prefix, dim, 1e-5)
}

/// One of the encoder's two convolutions over time: kernel 3, padding 1.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
}

impl Conv {
    fn load(
        w: &NamedWeights,
        prefix: &str,
        [outputs, inputs]: [i64; 2],
        stride: i64,
    ) -> Result<Conv, LoadError> {
        Ok(Conv {
            weight: w.get_sized(&format!("{prefix}.weight"), &[outputs, inputs, 3])?,
            bias: w.get_sized(&format!("{prefix}.bias"), &[outputs])?,
            stride,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv1d(&self.weight, Some(&self.bias), [self.stride], [1], [1], 1)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    feed_forward: FeedForward,
}

impl EncoderLayer {
    fn load(w: &NamedWeights, p: &str, cfg: &WhisperConfig) -> Result<EncoderLayer, LoadError> {
        let (dim, heads) = (cfg.d_model, cfg.encoder_attention_heads);
        Ok(EncoderLayer {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), dim, heads, false)?,
            self_attn_layer_norm: layer_norm(w, &format!("{p}.self_attn_layer_norm"), dim)?,
            feed_forward: FeedForward::load(w, p, dim, cfg.encoder_ffn_dim)?,
        })
    }
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    feed_forward: FeedForward,
}

impl DecoderLayer {
    fn load(w: &NamedWeights, p: &str, cfg: &WhisperConfig) -> Result<DecoderLayer, LoadError> {
        let (dim, heads) = (cfg.d_model, cfg.decoder_attention_heads);
        Ok(DecoderLayer {
            self_attn: Attention::load(w, &format!("{p}.self_attn"), dim, heads, false)?,
            self_attn_layer_norm: layer_norm(w, &format!("{p}.self_attn_layer_norm"), dim)?,
            encoder_attn: Attention::load(w, &format!("{p}.encoder_attn"), dim, heads, false)?,
            encoder_attn_layer_norm: layer_norm(w, &format!("{p}.encoder_attn_layer_norm"), dim)?,
            feed_forward: FeedForward::load(w, p, dim, cfg.decoder_ffn_dim)?,
        })
    }
}

/// Each decoder layer's keys and values of an encoded batch.
#[derive(Debug)]
pub struct Encoded {
    cross: Vec<(Tensor, Tensor)>,
}

impl Encoded {
    pub fn rows(&self) -> i64 {
        self.cross.first().map_or(0, |(k, _)| k.size()[0])
    }

    /// Keeps the rows `rows` of the batch.
    pub fn select(&self, rows: &Tensor) -> Encoded {
        Encoded {
            cross: self
                .cross
                .iter()
                .map(|(k, v)| (k.index_select(0, rows), v.index_select(0, rows)))
                .collect(),
        }
    }
}

/// Keys and values of the decoded prefix, per decoder layer: [rows, heads, steps, head_dim].
#[derive(Debug, Default)]
pub struct DecoderCache {
    layers: Vec<(Tensor, Tensor)>,
    steps: i64,
}

/// A Whisper model with its weights loaded.
#[derive(Debug)]
pub struct WhisperModel {
    pub config: WhisperConfig,
    conv1: Conv,
    conv2: Conv,
    encoder_positions: Tensor,
    encoder: Vec<EncoderLayer>,
    encoder_norm: LayerNorm,
    embed_tokens: Embedding,
    decoder_positions: Tensor,
    decoder: Vec<DecoderLayer>,
    decoder_norm: LayerNorm,
    /// The output projection: `proj_out` when the checkpoint has its own, else the embeddings.
    logits_weight: Tensor,
    kind: Kind,
    device: Device,
}

impl WhisperModel {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<WhisperModel, LoadError> {
        let config = WhisperConfig::load(dir)?;
        let w = NamedWeights::load(&weight_files(dir)?, device, kind)?;
        let dim = config.d_model;
        let encoder = (0..config.encoder_layers)
            .map(|i| EncoderLayer::load(&w, &format!("model.encoder.layers.{i}"), &config))
            .collect::<Result<_, _>>()?;
        let decoder = (0..config.decoder_layers)
            .map(|i| DecoderLayer::load(&w, &format!("model.decoder.layers.{i}"), &config))
            .collect::<Result<_, _>>()?;
        let embed_tokens =
            Embedding::sized(&w, "model.decoder.embed_tokens", config.vocab_size, dim)?;
        // `proj_out` is tied to the embeddings: only checkpoints saved untied carry it.
        let logits_weight = if w.has("proj_out.weight") {
            w.get_sized("proj_out.weight", &[config.vocab_size, dim])?
        } else {
            embed_tokens.weight.shallow_clone()
        };
        let model = WhisperModel {
            conv1: Conv::load(&w, "model.encoder.conv1", [dim, config.num_mel_bins], 1)?,
            conv2: Conv::load(&w, "model.encoder.conv2", [dim, dim], 2)?,
            encoder_positions: w.get_sized(
                "model.encoder.embed_positions.weight",
                &[config.max_source_positions, dim],
            )?,
            encoder,
            encoder_norm: layer_norm(&w, "model.encoder.layer_norm", dim)?,
            embed_tokens,
            decoder_positions: w.get_sized(
                "model.decoder.embed_positions.weight",
                &[config.max_target_positions, dim],
            )?,
            decoder,
            decoder_norm: layer_norm(&w, "model.decoder.layer_norm", dim)?,
            logits_weight,
            config,
            kind,
            device,
        };
        w.finish(&[])?;
        Ok(model)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Encodes mel features [batch, n_mels, frames] (any kind, any device) and computes each
    /// decoder layer's keys and values of the result.
    pub fn encode(&self, features: &Tensor) -> Encoded {
        let x = features.to_device(self.device).to_kind(self.kind);
        let x = self.conv1.forward(&x).gelu("none");
        let x = self.conv2.forward(&x).gelu("none");
        let mut hidden = x.transpose(1, 2) + &self.encoder_positions;
        for layer in &self.encoder {
            let h = layer.self_attn_layer_norm.forward(&hidden);
            let (k, v) = layer.self_attn.keys_values(&h);
            hidden += layer.self_attn.attend(&h, &k, &v, None);
            hidden = layer.feed_forward.forward(&hidden);
        }
        let hidden = self.encoder_norm.forward(&hidden);
        Encoded {
            cross: self
                .decoder
                .iter()
                .map(|layer| layer.encoder_attn.keys_values(&hidden))
                .collect(),
        }
    }

    /// Runs the decoder over `ids` [rows, new] continuing `cache`; returns float32 logits of
    /// every new position [rows, new, vocab].
    pub fn decode(&self, ids: &Tensor, encoded: &Encoded, cache: &mut DecoderCache) -> Tensor {
        let new = ids.size()[1];
        let start = cache.steps;
        let mut hidden =
            self.embed_tokens.forward(ids) + self.decoder_positions.narrow(0, start, new);
        let total = start + new;
        let causal = (new > 1).then(|| {
            let key_positions = Tensor::arange(total, (Kind::Int64, self.device)).view([1, total]);
            let query_positions =
                (Tensor::arange(new, (Kind::Int64, self.device)) + start).view([new, 1]);
            Tensor::zeros([new, total], (hidden.kind(), self.device))
                .masked_fill(
                    &key_positions.gt_tensor(&query_positions),
                    f64::NEG_INFINITY,
                )
                .view([1, 1, new, total])
        });
        let mut layers = Vec::with_capacity(self.decoder.len());
        for (index, layer) in self.decoder.iter().enumerate() {
            let h = layer.self_attn_layer_norm.forward(&hidden);
            let (k, v) = layer.self_attn.keys_values(&h);
            let (k, v) = match cache.layers.get(index) {
                Some((past_k, past_v)) => {
                    (Tensor::cat(&[past_k, &k], 2), Tensor::cat(&[past_v, &v], 2))
                }
                None => (k, v),
            };
            hidden += layer.self_attn.attend(&h, &k, &v, causal.as_ref());
            layers.push((k, v));
            let h = layer.encoder_attn_layer_norm.forward(&hidden);
            let (cross_k, cross_v) = &encoded.cross[index];
            hidden += layer.encoder_attn.attend(&h, cross_k, cross_v, None);
            hidden = layer.feed_forward.forward(&hidden);
        }
        cache.layers = layers;
        cache.steps = total;
        self.decoder_norm
            .forward(&hidden)
            .linear::<&Tensor>(&self.logits_weight, None)
            .to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mel_scale_is_slaneys() {
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        assert!((hz_to_mel(500.0) - 7.5).abs() < 1e-12);
        for hz in [0.0, 250.0, 999.0, 1000.0, 4321.0, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-9, "{hz}");
        }
    }
}
