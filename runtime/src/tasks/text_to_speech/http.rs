//! The HTTP half of `text-to-speech`: the seed's `/v1/generate-speech`, OpenAI's `/v1/audio/speech`
//! and the endpoint root; characters tokenized as VITS expects, waveforms as WAV.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use internal_token::usage::Unit;

use crate::error::ApiError;
use crate::executor::Executor;
use crate::models::vits::Synthesis;
use crate::models::{LoadError, read_json};
use crate::server::ValidJson;

use super::backend::Job;

/// Longest text one request may synthesise, in characters.
pub const MAX_TEXT_CHARS: usize = 2000;

/// Longest speaker description a request may send, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1000;

/// VitsTokenizer without a phonemizer: characters of the vocabulary, lower-cased unless the
/// vocabulary has them as they are, others dropped, and the blank (id 0) between every two.
#[derive(Debug)]
pub struct CharacterTokenizer {
    vocab: HashMap<String, i64>,
    add_blank: bool,
    normalize: bool,
}

#[derive(Debug, Deserialize)]
struct TokenizerConfig {
    #[serde(default = "yes")]
    add_blank: bool,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default)]
    phonemize: bool,
    #[serde(default)]
    is_uroman: bool,
}

fn yes() -> bool {
    true
}

impl CharacterTokenizer {
    pub fn load(dir: &Path) -> Result<CharacterTokenizer, LoadError> {
        let path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = read_json(&path)?;
        if config.phonemize || config.is_uroman {
            return Err(LoadError::Invalid {
                path,
                message:
                    "tokenizers that phonemize or romanize (phonemize, is_uroman) are not supported"
                        .to_owned(),
            });
        }
        Ok(CharacterTokenizer {
            vocab: read_json(&dir.join("vocab.json"))?,
            add_blank: config.add_blank,
            normalize: config.normalize,
        })
    }

    /// Token ids of `text`; empty when none of its characters are in the vocabulary.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut kept = String::new();
        for c in text.chars() {
            let as_is = c.to_string();
            if self.vocab.contains_key(&as_is) || !self.normalize {
                kept.push_str(&as_is);
            } else {
                kept.extend(c.to_lowercase());
            }
        }
        let kept: String = kept
            .chars()
            .filter(|c| self.vocab.contains_key(&c.to_string()))
            .collect();
        let ids: Vec<i64> = kept
            .trim()
            .chars()
            .map(|c| self.vocab[&c.to_string()])
            .collect();
        if !self.add_blank || ids.is_empty() {
            return ids;
        }
        let mut interspersed = vec![0; 2 * ids.len() + 1];
        for (i, id) in ids.into_iter().enumerate() {
            interspersed[2 * i + 1] = id;
        }
        interspersed
    }
}

/// The HTTP half.
#[derive(Debug)]
pub struct SpeechSynthesisTask {
    pub executor: Executor<Job, Vec<f32>>,
    pub tokenizer: Arc<CharacterTokenizer>,
    pub sampling_rate: u32,
    pub defaults: Synthesis,
}

pub fn routes() -> Router<Arc<SpeechSynthesisTask>> {
    Router::new()
        .route("/", post(root))
        .route("/v1/generate-speech", post(generate_speech))
        .route("/generate-speech", post(generate_speech))
        .route("/v1/generate-speech/schema", get(schema))
        .route("/generate-speech/schema", get(schema))
        .route("/v1/audio/speech", post(openai_speech))
}

/// The seed's request: the fields `/v1/generate-speech/schema` lists. The text is `text`, or
/// `prompt` as the seed's example (a Parler-TTS-style schema) names it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeechRequest {
    pub text: Option<String>,
    pub prompt: Option<String>,
    /// A speaker description, as Parler-TTS takes one. A VITS model has one fixed voice, so it
    /// is validated and cannot change the voice.
    pub description: Option<String>,
    pub speaking_rate: Option<f64>,
    pub noise_scale: Option<f64>,
    pub noise_scale_duration: Option<f64>,
    pub seed: Option<u64>,
}

/// The input fields of this model, in the seed's shape.
async fn schema(State(task): State<Arc<SpeechSynthesisTask>>) -> Json<serde_json::Value> {
    let d = task.defaults;
    Json(serde_json::json!([
        {"name": "text", "label": "Text", "desc": format!("What to say, at most {MAX_TEXT_CHARS} characters; characters outside the model's alphabet are skipped. Also accepted as `prompt`"), "type": "string", "required": true},
        {"name": "speaking_rate", "label": "Speaking rate", "desc": format!("Speed, from 0.1 to 10 (default {})", d.speaking_rate), "type": "number", "required": false},
        {"name": "noise_scale", "label": "Noise scale", "desc": format!("Variation of the voice, from 0 to 2 (default {})", d.noise_scale), "type": "number", "required": false},
        {"name": "noise_scale_duration", "label": "Duration noise scale", "desc": format!("Variation of the rhythm, from 0 to 2 (default {})", d.noise_scale_duration), "type": "number", "required": false},
        {"name": "seed", "label": "Seed", "desc": "Makes the noise, and so the waveform, reproducible", "type": "integer", "required": false},
        {"name": "description", "label": "Speaker Description", "desc": format!("Accepted (at most {MAX_DESCRIPTION_CHARS} characters) but cannot change the voice: this model has one fixed voice"), "type": "string", "required": false},
    ]))
}

impl SpeechRequest {
    /// The text to say and the name of the field it came in.
    fn take_text(&mut self) -> Result<(&'static str, String), ApiError> {
        match (self.text.take(), self.prompt.take()) {
            (Some(text), None) => Ok(("text", text)),
            (None, Some(prompt)) => Ok(("prompt", prompt)),
            (Some(_), Some(_)) => Err(ApiError::InvalidField(
                "prompt: send the text as `text` or as `prompt`, not both".to_owned(),
            )),
            (None, None) => Err(ApiError::InvalidField(
                "text: missing field (or send it as `prompt`)".to_owned(),
            )),
        }
    }
}

impl SpeechSynthesisTask {
    /// Synthesises `request`'s text, read from the field `field` (its name in error messages)
    /// when given, else from `text` or `prompt`.
    async fn synthesize(
        &self,
        field: Option<&'static str>,
        mut request: SpeechRequest,
    ) -> Result<Vec<f32>, ApiError> {
        let (named, text) = request.take_text()?;
        let field = field.unwrap_or(named);
        if let Some(description) = &request.description {
            let characters = description.chars().count();
            if characters > MAX_DESCRIPTION_CHARS {
                return Err(ApiError::InvalidField(format!(
                    "description: {characters} characters, more than the limit of {MAX_DESCRIPTION_CHARS}"
                )));
            }
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(ApiError::InvalidField(format!("{field}: empty")));
        }
        let characters = text.chars().count();
        if characters > MAX_TEXT_CHARS {
            return Err(ApiError::InvalidField(format!(
                "{field}: {characters} characters, more than the limit of {MAX_TEXT_CHARS}"
            )));
        }
        let ids = self.tokenizer.encode(text);
        if ids.is_empty() {
            return Err(ApiError::InvalidField(format!(
                "{field}: none of its characters are in this model's alphabet"
            )));
        }
        let within =
            |name: &str, value: Option<f64>, default: f64, range: std::ops::RangeInclusive<f64>| {
                let value = value.unwrap_or(default);
                if range.contains(&value) {
                    Ok(value)
                } else {
                    Err(ApiError::InvalidField(format!(
                        "{name}: must be between {} and {}",
                        range.start(),
                        range.end()
                    )))
                }
            };
        let synthesis = Synthesis {
            speaking_rate: within(
                "speaking_rate",
                request.speaking_rate,
                self.defaults.speaking_rate,
                0.1..=10.0,
            )?,
            noise_scale: within(
                "noise_scale",
                request.noise_scale,
                self.defaults.noise_scale,
                0.0..=2.0,
            )?,
            noise_scale_duration: within(
                "noise_scale_duration",
                request.noise_scale_duration,
                self.defaults.noise_scale_duration,
                0.0..=2.0,
            )?,
        };
        let samples = self
            .executor
            .run(Job {
                ids,
                synthesis,
                seed: request.seed,
            })
            .await?;
        crate::usage::record(
            Unit::AudioSecondsOut,
            samples.len() as f64 / f64::from(self.sampling_rate),
        );
        Ok(samples)
    }
}

/// 16-bit PCM mono WAV of `samples` (clipped to [−1, 1]).
pub fn wav(samples: &[f32], sampling_rate: u32) -> Vec<u8> {
    let data = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&sampling_rate.to_le_bytes());
    out.extend_from_slice(&(sampling_rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data.to_le_bytes());
    out.extend(pcm16(samples));
    out
}

fn pcm16(samples: &[f32]) -> impl Iterator<Item = u8> + '_ {
    samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes())
}

/// The seed's endpoint: `{audio: base64 WAV, sampling_rate}`.
async fn generate_speech(
    State(task): State<Arc<SpeechSynthesisTask>>,
    ValidJson(request): ValidJson<SpeechRequest>,
) -> Result<Json<Speech>, ApiError> {
    let samples = task.synthesize(None, request).await?;
    Ok(Json(Speech {
        audio: base64::engine::general_purpose::STANDARD.encode(wav(&samples, task.sampling_rate)),
        sampling_rate: task.sampling_rate,
    }))
}

/// The seed's answer: a base64 WAV and its sampling rate.
#[derive(Debug, Serialize)]
struct Speech {
    audio: String,
    sampling_rate: u32,
}

/// OpenAI's speech request; `model` and `voice` are accepted (the URL chose the model, which has
/// one voice).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiSpeechRequest {
    input: String,
    #[serde(default, rename = "model")]
    _model: Option<serde::de::IgnoredAny>,
    /// The model has one voice.
    #[serde(default, rename = "voice")]
    _voice: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    speed: Option<f64>,
    /// VITS takes no style instructions.
    #[serde(default, rename = "instructions")]
    _instructions: Option<serde::de::IgnoredAny>,
}

/// `/v1/audio/speech`: the raw audio, WAV or headerless 16-bit PCM.
async fn openai_speech(
    State(task): State<Arc<SpeechSynthesisTask>>,
    ValidJson(request): ValidJson<OpenAiSpeechRequest>,
) -> Result<Response, ApiError> {
    let format = request.response_format.as_deref().unwrap_or("wav");
    if !matches!(format, "wav" | "pcm") {
        return Err(ApiError::InvalidField(format!(
            "response_format: {format:?} is not served; use wav or pcm"
        )));
    }
    let speed = request.speed;
    if speed.is_some_and(|s| !(0.25..=4.0).contains(&s)) {
        return Err(ApiError::InvalidField(
            "speed: must be between 0.25 and 4".to_owned(),
        ));
    }
    let samples = task
        .synthesize(
            Some("input"),
            SpeechRequest {
                text: Some(request.input),
                speaking_rate: speed,
                ..SpeechRequest::default()
            },
        )
        .await?;
    Ok(if format == "pcm" {
        (
            [(header::CONTENT_TYPE, "audio/pcm")],
            pcm16(&samples).collect::<Vec<u8>>(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "audio/wav")],
            wav(&samples, task.sampling_rate),
        )
            .into_response()
    })
}

/// What Hugging Face clients post for text to speech.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootRequest {
    inputs: String,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The endpoint root (Hugging Face's text-to-speech task): raw `audio/wav`.
async fn root(
    State(task): State<Arc<SpeechSynthesisTask>>,
    ValidJson(request): ValidJson<RootRequest>,
) -> Result<Response, ApiError> {
    if let Some(name) = request.parameters.as_ref().and_then(|p| p.keys().next()) {
        return Err(ApiError::InvalidField(format!(
            "parameters.{name}: generation parameters are not served; send the seed's /v1/generate-speech for speaking_rate, noise scales and seed"
        )));
    }
    let samples = task
        .synthesize(
            Some("inputs"),
            SpeechRequest {
                text: Some(request.inputs),
                ..SpeechRequest::default()
            },
        )
        .await?;
    Ok((
        [(header::CONTENT_TYPE, "audio/wav")],
        wav(&samples, task.sampling_rate),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wav_header_describes_its_samples() {
        let file = wav(&[0.0, 1.0, -1.0, 2.0], 16_000);
        assert_eq!(file.len(), 44 + 8);
        assert_eq!(&file[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(file[24..28].try_into().unwrap()), 16_000);
        let samples: Vec<i16> = file[44..]
            .chunks(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(samples, [0, 32767, -32767, 32767]);
    }

    #[test]
    fn the_text_comes_as_text_or_as_prompt_but_not_both() {
        let body = |json: serde_json::Value| serde_json::from_value::<SpeechRequest>(json).unwrap();
        let mut seed = body(serde_json::json!({"prompt": "Hi", "description": "A man"}));
        assert_eq!(seed.take_text().unwrap(), ("prompt", "Hi".to_owned()));
        let mut text = body(serde_json::json!({"text": "Hi"}));
        assert_eq!(text.take_text().unwrap(), ("text", "Hi".to_owned()));
        let both = body(serde_json::json!({"text": "Hi", "prompt": "Hi"})).take_text();
        assert!(both.unwrap_err().to_string().starts_with("prompt: "));
        let neither = body(serde_json::json!({"seed": 1})).take_text();
        assert!(neither.unwrap_err().to_string().starts_with("text: "));
    }
}
