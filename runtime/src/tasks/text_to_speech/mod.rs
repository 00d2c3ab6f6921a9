//! `text-to-speech`: VITS (MMS-TTS) behind the seed's `/v1/generate-speech` and its schema,
//! OpenAI's `/v1/audio/speech`, and the endpoint root Hugging Face clients post text to.

pub mod backend;
pub mod http;

use std::path::Path;
use std::sync::Arc;

use crate::executor::Executor;
use crate::models::LoadError;
use crate::models::vits::{Synthesis, VitsConfig};
use crate::settings::Settings;
use crate::tasks::{Built, Context, ModelType};

pub fn build(dir: &Path, settings: &Settings, context: Context) -> Result<Built, LoadError> {
    let config = VitsConfig::load(dir)?;
    let tokenizer = Arc::new(http::CharacterTokenizer::load(dir)?);
    let (device, kind) = (settings.device, settings.kind);
    let model_dir = dir.to_owned();
    let load = move || backend::SpeechSynthesizer::load(&model_dir, device, kind);
    let limits = settings.batch.one_at_a_time();
    let (executor, model_thread) = Executor::start(load, limits, context.metrics, context.ready);
    let task = Arc::new(http::SpeechSynthesisTask {
        executor,
        tokenizer,
        sampling_rate: config.sampling_rate,
        defaults: Synthesis {
            speaking_rate: config.speaking_rate,
            noise_scale: config.noise_scale,
            noise_scale_duration: config.noise_scale_duration,
        },
    });
    Ok(Built {
        model_type: ModelType::TextToSpeech {
            architecture: config.model_type.clone(),
            sampling_rate: config.sampling_rate,
            stochastic_durations: config.use_stochastic_duration_prediction,
        },
        max_input_length: http::MAX_TEXT_CHARS,
        limits,
        routes: http::routes().with_state(task),
        model_thread,
    })
}
