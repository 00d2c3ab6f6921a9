//! The model-thread half of `speech-recognition`: Whisper, transcribing every request queued
//! meanwhile together, window by window.

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind};

use crate::decode::whisper::{DecodeOptions, LongForm, Segment, SpeechTokens};
use crate::error::BackendError;
use crate::executor::{Backend, Wanted, Work};
use crate::models::LoadError;
use crate::models::whisper::{MelFeatures, WhisperModel};

/// One request for the model thread.
#[derive(Debug)]
pub struct Job {
    pub samples: Vec<f32>,
    pub options: DecodeOptions,
}

/// Requests are batched by count: a pass transcribes up to `max_batch_requests` of them.
impl Work for Job {}

/// The model thread's answer: the language decoded in, and the segments.
#[derive(Debug)]
pub struct Transcript {
    pub language: Option<i64>,
    pub segments: Vec<Segment>,
}

/// The model thread's half.
#[derive(Debug)]
pub struct SpeechModel {
    model: WhisperModel,
    features: MelFeatures,
    tokens: Arc<SpeechTokens>,
}

impl SpeechModel {
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        tokens: Arc<SpeechTokens>,
    ) -> Result<SpeechModel, LoadError> {
        Ok(SpeechModel {
            model: WhisperModel::load(dir, device, kind)?,
            features: MelFeatures::load(dir)?,
            tokens,
        })
    }
}

impl Backend for SpeechModel {
    type Job = Job;
    type Output = Transcript;

    /// Transcribes the jobs queued together.
    fn run_batch(
        &mut self,
        jobs: Vec<Job>,
        wanted: &Wanted<'_>,
    ) -> Vec<Result<Transcript, BackendError>> {
        let mut long: Vec<LongForm> = jobs
            .into_iter()
            .map(|job| LongForm {
                samples: job.samples,
                options: job.options,
                seek: 0,
                segments: Vec::new(),
            })
            .collect();
        crate::decode::whisper::transcribe(
            &self.model,
            &self.features,
            &self.tokens,
            &mut long,
            &|index| wanted.still(index),
        );
        long.into_iter()
            .enumerate()
            .map(|(index, job)| {
                if !wanted.still(index) {
                    return Err(BackendError::Abandoned);
                }
                Ok(Transcript {
                    language: job.options.language,
                    segments: job.segments,
                })
            })
            .collect()
    }
}
