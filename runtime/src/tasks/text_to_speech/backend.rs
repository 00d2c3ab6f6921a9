//! The model-thread half of `text-to-speech`: VITS, one text a pass.

use std::path::Path;

use tch::{Device, Kind};

use crate::error::BackendError;
use crate::executor::{Backend, Wanted, Work, one_at_a_time};
use crate::models::LoadError;
use crate::models::vits::{Synthesis, VitsModel};

/// One request for the model thread.
#[derive(Debug)]
pub struct Job {
    pub ids: Vec<i64>,
    pub synthesis: Synthesis,
    pub seed: Option<u64>,
}

/// One text at a time: a pass is one job.
impl Work for Job {}

/// The model thread's half.
#[derive(Debug)]
pub struct SpeechSynthesizer {
    model: VitsModel,
}

impl SpeechSynthesizer {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<SpeechSynthesizer, LoadError> {
        Ok(SpeechSynthesizer {
            model: VitsModel::load(dir, device, kind)?,
        })
    }

    fn run(&mut self, job: Job) -> Result<Vec<f32>, BackendError> {
        if let Some(seed) = job.seed {
            // One model thread: seeding here makes this request's noise alone reproducible.
            tch::manual_seed(seed as i64);
        }
        let waveform = self.model.synthesize(&job.ids, job.synthesis);
        Ok(Vec::<f32>::try_from(waveform.to_device(Device::Cpu))?)
    }
}

impl Backend for SpeechSynthesizer {
    type Job = Job;
    type Output = Vec<f32>;

    fn run_batch(
        &mut self,
        jobs: Vec<Job>,
        wanted: &Wanted<'_>,
    ) -> Vec<Result<Vec<f32>, BackendError>> {
        one_at_a_time(jobs, wanted, |job, _| self.run(job))
    }
}
