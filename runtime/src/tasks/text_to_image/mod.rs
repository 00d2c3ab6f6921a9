//! `text-to-image`: Stable Diffusion behind the seed's `/v1/generate-image`, OpenAI's
//! `/v1/images/generations`, and the endpoint root Hugging Face clients post prompts to.

pub mod backend;
pub mod http;

use std::path::Path;
use std::sync::Arc;

use crate::executor::Executor;
use crate::models::diffusion::scheduler::SchedulerConfig;
use crate::models::diffusion::unet::UNetConfig;
use crate::models::diffusion::vae::VaeConfig;
use crate::models::{LoadError, read_json};
use crate::settings::Settings;
use crate::tasks::{Built, Context, ModelType};

pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let unet: UNetConfig = read_json(&dir.join("unet/config.json"))?;
    let vae: VaeConfig = read_json(&dir.join("vae/config.json"))?;
    let scheduler: SchedulerConfig = read_json(&dir.join("scheduler/scheduler_config.json"))?;
    let text: serde_json::Value = read_json(&dir.join("text_encoder/config.json"))?;
    let length = text["max_position_embeddings"].as_u64().unwrap_or(77) as usize;
    let prompts = Arc::new(http::ClipPrompts::load(&dir.join("tokenizer"), length)?);
    let scale = vae.scale_factor();
    let (device, kind) = (settings.device, settings.kind);
    let (model_dir, model_metrics) = (dir.to_owned(), context.metrics.clone());
    let load = move || backend::ImageGenerator::load(&model_dir, device, kind, model_metrics);
    let limits = settings.batch.one_at_a_time();
    let (executor, model_thread) = Executor::start(load, limits, context.metrics, context.ready);
    let default_size = unet.sample_size.unwrap_or(64) * scale;
    let model_type = ModelType::TextToImage {
        architecture: "stable-diffusion",
        scheduler: scheduler.class_name.clone(),
        default_size,
        refiner: false,
    };
    let task = Arc::new(http::ImageTask {
        executor,
        prompts,
        default_size,
        size_multiple: scale.max(8),
        default_sampler: scheduler.default_sampler(),
    });
    Ok(Built {
        model_type,
        max_input_length: length,
        limits,
        routes: http::routes().with_state(task),
        model_thread,
    })
}
