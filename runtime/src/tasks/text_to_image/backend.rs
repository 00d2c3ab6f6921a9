//! The model-thread half of `text-to-image`: the Stable Diffusion pipeline, one image a pass.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::error::BackendError;
use crate::executor::{Backend, Wanted, Work, one_at_a_time};
use crate::metrics::Metrics;
use crate::models::LoadError;
use crate::models::diffusion::{Denoise, StableDiffusion};

/// One image for the model thread.
#[derive(Debug)]
pub struct Job {
    pub denoise: Denoise,
    pub width: i64,
    pub height: i64,
    pub seed: u64,
}

/// One image at a time: a pass is one job.
impl Work for Job {}

/// An image: RGB bytes, row by row.
#[derive(Debug)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// The model thread's half.
#[derive(Debug)]
pub struct ImageGenerator {
    pipeline: StableDiffusion,
    metrics: Metrics,
}

impl ImageGenerator {
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        metrics: Metrics,
    ) -> Result<ImageGenerator, LoadError> {
        Ok(ImageGenerator {
            pipeline: StableDiffusion::load(dir, device, kind)?,
            metrics,
        })
    }

    fn run(&mut self, job: Job, wanted: &dyn Fn() -> bool) -> Result<Image, BackendError> {
        let scale = self.pipeline.vae.config.scale_factor();
        let channels = self.pipeline.unet.config.in_channels;
        // Drawn on the CPU from the seed, so a seed gives the same image on any device.
        tch::manual_seed(job.seed as i64);
        let latents = Tensor::randn(
            [1, channels, job.height / scale, job.width / scale],
            (Kind::Float, Device::Cpu),
        );
        let Some(image) = self.pipeline.generate(&job.denoise, &latents, wanted) else {
            self.metrics.abandoned.inc();
            return Err(BackendError::Abandoned);
        };
        let size = image.size();
        let rgb = Vec::<u8>::try_from(
            (image * 255.0)
                .round()
                .clamp(0.0, 255.0)
                .to_kind(Kind::Uint8)
                .to_device(Device::Cpu)
                .reshape([-1]),
        )?;
        Ok(Image {
            width: size[1] as u32,
            height: size[0] as u32,
            rgb,
        })
    }
}

impl Backend for ImageGenerator {
    type Job = Job;
    type Output = Image;

    fn run_batch(
        &mut self,
        jobs: Vec<Job>,
        wanted: &Wanted<'_>,
    ) -> Vec<Result<Image, BackendError>> {
        one_at_a_time(jobs, wanted, |job, still| self.run(job, still))
    }
}
