//! Stable Diffusion (1.x and 2.x) from a diffusers repository: CLIP's tokenizer and text
//! encoder, the UNet, the VAE's decoder and a DDIM or Euler scheduler, with classifier-free
//! guidance, as `StableDiffusionPipeline` runs them.

pub mod clip;
pub mod scheduler;
pub mod unet;
pub mod vae;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use super::{LoadError, read_json};
use scheduler::{Sampler, Schedule, SchedulerConfig};

/// The weights of one part of a diffusers repository: its own safetensors name, or
/// transformers' for the text encoder, sharded or not.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    for stem in ["diffusion_pytorch_model", "model"] {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            let index: serde_json::Value = read_json(&index)?;
            let mut files: Vec<PathBuf> = index["weight_map"]
                .as_object()
                .into_iter()
                .flat_map(|map| map.values())
                .filter_map(|f| f.as_str().map(|f| dir.join(f)))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
        let single = dir.join(format!("{stem}.safetensors"));
        if single.exists() {
            return Ok(vec![single]);
        }
    }
    Err(LoadError::Read {
        path: dir.join("diffusion_pytorch_model.safetensors"),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no safetensors weights"),
    })
}

/// CLIP's tokenizer: `tokenizer/tokenizer.json` when the repository has one, else the same
/// pipeline (lower-cased, CLIP's word pattern, byte-level BPE with `</w>` word ends) built
/// around its `vocab.json` and `merges.txt`.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, LoadError> {
    let invalid = |message: String| LoadError::Invalid {
        path: dir.to_owned(),
        message,
    };
    let fast = dir.join("tokenizer.json");
    if fast.exists() {
        return Tokenizer::from_file(&fast).map_err(|e| invalid(format!("tokenizer.json: {e}")));
    }
    let vocab: serde_json::Map<String, serde_json::Value> = read_json(&dir.join("vocab.json"))?;
    let merges_path = dir.join("merges.txt");
    let merges: Vec<String> = std::fs::read_to_string(&merges_path)
        .map_err(|source| LoadError::Read {
            path: merges_path,
            source,
        })?
        .lines()
        .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let id = |token: &str| {
        vocab
            .get(token)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| invalid(format!("vocab.json has no {token}")))
    };
    let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let special = |content: &str, id: u64| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true})
    };
    let definition = serde_json::json!({
        "version": "1.0",
        "added_tokens": [special("<|startoftext|>", bos), special("<|endoftext|>", eos)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos],
            "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    definition
        .to_string()
        .parse::<Tokenizer>()
        .map_err(|e| invalid(format!("vocab.json and merges.txt: {e}")))
}

/// A loaded pipeline.
#[derive(Debug)]
pub struct StableDiffusion {
    pub text_encoder: clip::ClipTextModel,
    pub unet: unet::UNet,
    pub vae: vae::VaeDecoder,
    pub scheduler: SchedulerConfig,
    kind: Kind,
    device: Device,
}

/// What one image takes: prompt and negative prompt ids (padded to the encoder's length),
/// steps, guidance and the sampler.
#[derive(Debug, Clone)]
pub struct Denoise {
    pub prompt: Vec<i64>,
    pub negative: Vec<i64>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: Sampler,
}

impl StableDiffusion {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<StableDiffusion, LoadError> {
        let scheduler: SchedulerConfig = read_json(&dir.join("scheduler/scheduler_config.json"))?;
        scheduler.validate().map_err(|message| LoadError::Invalid {
            path: dir.join("scheduler/scheduler_config.json"),
            message,
        })?;
        Ok(StableDiffusion {
            text_encoder: clip::ClipTextModel::load(&dir.join("text_encoder"), device, kind)?,
            unet: unet::UNet::load(&dir.join("unet"), device, kind)?,
            vae: vae::VaeDecoder::load(&dir.join("vae"), device, kind)?,
            scheduler,
            kind,
            device,
        })
    }

    /// Runs the denoising loop from `latents` [1, 4, h, w] and decodes the result to an image
    /// [height, width, 3] (float32 in [0, 1]). `keep_going` is asked before every step; when it
    /// says no, the loop stops and `None` is returned.
    pub fn generate(
        &self,
        request: &Denoise,
        latents: &Tensor,
        keep_going: &dyn Fn() -> bool,
    ) -> Option<Tensor> {
        let _guard = tch::no_grad_guard();
        let encode = |ids: &[i64]| {
            self.text_encoder
                .forward(&Tensor::from_slice(ids).unsqueeze(0).to_device(self.device))
        };
        let guided = request.guidance_scale > 1.0;
        let context = if guided {
            Tensor::cat(&[encode(&request.negative), encode(&request.prompt)], 0)
        } else {
            encode(&request.prompt)
        };
        let schedule = Schedule::new(&self.scheduler, request.sampler, request.steps);
        let mut latents = latents.to_device(self.device).to_kind(self.kind)
            * schedule.init_noise_sigma(&self.scheduler);
        for (index, &timestep) in schedule.timesteps.iter().enumerate() {
            if !keep_going() {
                return None;
            }
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)
            } else {
                latents.shallow_clone()
            };
            let input = schedule.scale_model_input(&input, index);
            let output = self.unet.forward(&input, timestep, &context);
            let output = if guided {
                let unconditional = output.narrow(0, 0, 1);
                let conditional = output.narrow(0, 1, 1);
                &unconditional + (conditional - &unconditional) * request.guidance_scale
            } else {
                output
            };
            latents = schedule.step(&output, index, &latents);
        }
        if !keep_going() {
            return None;
        }
        Some(
            self.vae
                .decode(&latents)
                .squeeze_dim(0)
                .permute([1, 2, 0])
                .to_kind(Kind::Float),
        )
    }
}
