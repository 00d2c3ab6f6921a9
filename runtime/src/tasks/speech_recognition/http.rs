//! The HTTP half of `speech-recognition`: uploads read (multipart with explicit limits, or a raw
//! body), decoded and resampled on the blocking pool; transcripts as JSON, text or subtitles.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokio::sync::Semaphore;

use crate::audio::{AudioError, decode_to_16k};
use crate::decode::whisper::{DecodeOptions, SpeechTask, SpeechTokens};
use internal_token::usage::Unit;

use crate::error::ApiError;
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::server::Text;

use super::AudioLimits;
use super::backend::{Job, Transcript};
use super::form::read_form;

/// The HTTP half.
#[derive(Debug)]
pub struct SpeechRecognitionTask {
    pub executor: Executor<Job, Transcript>,
    pub tokenizer: Arc<Tokenizer>,
    pub tokens: Arc<SpeechTokens>,
    pub limits: AudioLimits,
    /// Uploads decoded at once: each holds its samples at the source rate while it decodes.
    pub decoding: Arc<Semaphore>,
    pub metrics: Metrics,
}

/// Counts a request whose handler was dropped (client gone, deadline passed) before it
/// finished, at whatever stage: decoding, queued, or on the model thread, which then stops.
struct AbandonedUnlessFinished<'a> {
    metrics: &'a Metrics,
    finished: bool,
}

impl Drop for AbandonedUnlessFinished<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.abandoned.inc();
        }
    }
}

pub fn routes() -> Router<Arc<SpeechRecognitionTask>> {
    Router::new()
        .route("/", post(root))
        .route("/v1/transcript", post(transcript))
        .route("/transcript", post(transcript))
        .route("/v1/audio/transcriptions", post(openai_transcriptions))
        .route("/v1/audio/translations", post(openai_translations))
}

/// How the OpenAI endpoints answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFormat {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

impl ResponseFormat {
    fn parse(value: Option<&str>) -> Result<ResponseFormat, ApiError> {
        Ok(match value.unwrap_or("json") {
            "json" => ResponseFormat::Json,
            "text" => ResponseFormat::Text,
            "verbose_json" => ResponseFormat::VerboseJson,
            "srt" => ResponseFormat::Srt,
            "vtt" => ResponseFormat::Vtt,
            other => {
                return Err(ApiError::InvalidField(format!(
                    "response_format: {other:?} is not one of json, text, verbose_json, srt, vtt"
                )));
            }
        })
    }

    fn needs_timestamps(self) -> bool {
        matches!(
            self,
            ResponseFormat::VerboseJson | ResponseFormat::Srt | ResponseFormat::Vtt
        )
    }
}

/// Whisper's language names, for requests that give a name and for `verbose_json`.
#[rustfmt::skip]
const LANGUAGE_NAMES: &[(&str, &str)] = &[
    ("en", "english"), ("zh", "chinese"), ("de", "german"), ("es", "spanish"),
    ("ru", "russian"), ("ko", "korean"), ("fr", "french"), ("ja", "japanese"),
    ("pt", "portuguese"), ("tr", "turkish"), ("pl", "polish"), ("ca", "catalan"),
    ("nl", "dutch"), ("ar", "arabic"), ("sv", "swedish"), ("it", "italian"),
    ("id", "indonesian"), ("hi", "hindi"), ("fi", "finnish"), ("vi", "vietnamese"),
    ("he", "hebrew"), ("uk", "ukrainian"), ("el", "greek"), ("ms", "malay"),
    ("cs", "czech"), ("ro", "romanian"), ("da", "danish"), ("hu", "hungarian"),
    ("ta", "tamil"), ("no", "norwegian"), ("th", "thai"), ("ur", "urdu"),
    ("hr", "croatian"), ("bg", "bulgarian"), ("lt", "lithuanian"), ("la", "latin"),
    ("mi", "maori"), ("ml", "malayalam"), ("cy", "welsh"), ("sk", "slovak"),
    ("te", "telugu"), ("fa", "persian"), ("lv", "latvian"), ("bn", "bengali"),
    ("sr", "serbian"), ("az", "azerbaijani"), ("sl", "slovenian"), ("kn", "kannada"),
    ("et", "estonian"), ("mk", "macedonian"), ("br", "breton"), ("eu", "basque"),
    ("is", "icelandic"), ("hy", "armenian"), ("ne", "nepali"), ("mn", "mongolian"),
    ("bs", "bosnian"), ("kk", "kazakh"), ("sq", "albanian"), ("sw", "swahili"),
    ("gl", "galician"), ("mr", "marathi"), ("pa", "punjabi"), ("si", "sinhala"),
    ("km", "khmer"), ("sn", "shona"), ("yo", "yoruba"), ("so", "somali"),
    ("af", "afrikaans"), ("oc", "occitan"), ("ka", "georgian"), ("be", "belarusian"),
    ("tg", "tajik"), ("sd", "sindhi"), ("gu", "gujarati"), ("am", "amharic"),
    ("yi", "yiddish"), ("lo", "lao"), ("uz", "uzbek"), ("fo", "faroese"),
    ("ht", "haitian creole"), ("ps", "pashto"), ("tk", "turkmen"), ("nn", "nynorsk"),
    ("mt", "maltese"), ("sa", "sanskrit"), ("lb", "luxembourgish"), ("my", "myanmar"),
    ("bo", "tibetan"), ("tl", "tagalog"), ("mg", "malagasy"), ("as", "assamese"),
    ("tt", "tatar"), ("haw", "hawaiian"), ("ln", "lingala"), ("ha", "hausa"),
    ("ba", "bashkir"), ("jw", "javanese"), ("su", "sundanese"), ("yue", "cantonese"),
];

/// What the endpoints read from a request besides the audio.
#[derive(Debug, Default)]
struct SpeechRequest<'a> {
    language: Option<&'a str>,
    task: Option<&'a str>,
    prompt: Option<&'a str>,
    timestamps: bool,
}

impl SpeechRecognitionTask {
    fn language(&self, value: &str) -> Result<Option<i64>, ApiError> {
        let wanted = value.trim().to_lowercase();
        let code = LANGUAGE_NAMES
            .iter()
            .find(|(_, name)| *name == wanted)
            .map_or(wanted.as_str(), |(code, _)| code);
        if !self.tokens.multilingual() {
            return if code == "en" {
                Ok(None)
            } else {
                Err(ApiError::InvalidField(format!(
                    "language: this model transcribes English only, not {value:?}"
                )))
            };
        }
        match self.tokens.language_token(code) {
            Some(token) => Ok(Some(token)),
            None => Err(ApiError::InvalidField(format!(
                "language: {value:?} is not one of this model's languages: {}",
                self.tokens
                    .languages
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn options(&self, request: &SpeechRequest<'_>) -> Result<DecodeOptions, ApiError> {
        let language = match request.language.filter(|l| !l.trim().is_empty()) {
            Some(value) => self.language(value)?,
            None => None,
        };
        let task = match request.task.unwrap_or("transcribe") {
            "transcribe" => SpeechTask::Transcribe,
            "translate" if self.tokens.translate.is_some() => SpeechTask::Translate,
            "translate" => {
                return Err(ApiError::InvalidField(
                    "task: this model does not translate".to_owned(),
                ));
            }
            other => {
                return Err(ApiError::InvalidField(format!(
                    "task: {other:?} is not transcribe or translate"
                )));
            }
        };
        let prompt = match request.prompt.map(str::trim).filter(|p| !p.is_empty()) {
            Some(text) => self
                .tokenizer
                .encode(format!(" {text}"), false)
                .map_err(|e| ApiError::InvalidField(format!("prompt: {e}")))?
                .get_ids()
                .iter()
                .map(|&id| i64::from(id))
                .collect(),
            None => Vec::new(),
        };
        Ok(DecodeOptions {
            language,
            task,
            timestamps: request.timestamps,
            prompt,
        })
    }

    /// Decodes `audio` off the async threads and transcribes it.
    async fn run(
        &self,
        field: &'static str,
        audio: Bytes,
        options: DecodeOptions,
    ) -> Result<(Transcript, f64), ApiError> {
        let mut abandoned = AbandonedUnlessFinished {
            metrics: &self.metrics,
            finished: false,
        };
        let answer = self.decode_and_transcribe(field, audio, options).await;
        abandoned.finished = true;
        answer
    }

    async fn decode_and_transcribe(
        &self,
        field: &'static str,
        audio: Bytes,
        options: DecodeOptions,
    ) -> Result<(Transcript, f64), ApiError> {
        let decoding = self
            .decoding
            .acquire()
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        let max_seconds = self.limits.max_audio_seconds;
        let decoded = tokio::task::spawn_blocking(move || decode_to_16k(audio, max_seconds))
            .await
            .map_err(|_| ApiError::Internal("audio decoding failed".to_owned()))?;
        drop(decoding);
        let (samples, seconds) = decoded.map_err(|e| audio_error(field, e))?;
        // The model thread stops this request's work once this handler is dropped (client
        // gone, deadline passed).
        let transcript = self.executor.run(Job { samples, options }).await?;
        crate::usage::record(Unit::AudioSecondsIn, seconds);
        Ok((transcript, seconds))
    }

    fn text(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.tokenizer.decode(&ids, true).unwrap_or_default()
    }

    fn full_text(&self, transcript: &Transcript) -> String {
        transcript
            .segments
            .iter()
            .map(|s| self.text(&s.ids))
            .collect::<String>()
            .trim()
            .to_owned()
    }

    fn language_name(&self, transcript: &Transcript) -> String {
        let code = transcript
            .language
            .and_then(|t| self.tokens.language_code(t))
            .unwrap_or("en");
        LANGUAGE_NAMES
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(code, |(_, name)| name)
            .to_owned()
    }
}

fn audio_error(field: &str, error: AudioError) -> ApiError {
    match error {
        AudioError::TooLong { .. } => ApiError::AudioTooLong(format!("{field}: {error}")),
        other => ApiError::InvalidAudio(format!("{field}: {other}")),
    }
}

/// The seed's endpoint: multipart `file` → `{text}`.
async fn transcript(
    State(task): State<Arc<SpeechRecognitionTask>>,
    request: Request,
) -> Result<Json<Text>, ApiError> {
    let form = read_form(request, task.limits).await?;
    let file = form.file.clone().ok_or_else(|| {
        ApiError::InvalidField(
            "file: a multipart field `file` with the audio is required".to_owned(),
        )
    })?;
    let options = task.options(&SpeechRequest {
        language: form.get("language"),
        task: form.get("task"),
        prompt: form.get("prompt"),
        timestamps: false,
    })?;
    let (transcript, _) = task.run("file", file, options).await?;
    Ok(Json(Text {
        text: task.full_text(&transcript),
    }))
}

async fn openai_transcriptions(
    State(task): State<Arc<SpeechRecognitionTask>>,
    request: Request,
) -> Result<Response, ApiError> {
    openai(task, request, SpeechTask::Transcribe).await
}

async fn openai_translations(
    State(task): State<Arc<SpeechRecognitionTask>>,
    request: Request,
) -> Result<Response, ApiError> {
    openai(task, request, SpeechTask::Translate).await
}

/// OpenAI's transcription and translation endpoints; `model` is accepted and ignored (the URL
/// chose the model).
async fn openai(
    task: Arc<SpeechRecognitionTask>,
    request: Request,
    speech_task: SpeechTask,
) -> Result<Response, ApiError> {
    let form = read_form(request, task.limits).await?;
    let file = form.file.clone().ok_or_else(|| {
        ApiError::InvalidField(
            "file: a multipart field `file` with the audio is required".to_owned(),
        )
    })?;
    let format = ResponseFormat::parse(form.get("response_format"))?;
    if let Some(temperature) = form.get("temperature") {
        let value: f64 = temperature.trim().parse().map_err(|_| {
            ApiError::InvalidField(format!("temperature: {temperature:?} is not a number"))
        })?;
        if value != 0.0 {
            return Err(ApiError::InvalidField(
                "temperature: only 0 (greedy decoding) is served".to_owned(),
            ));
        }
    }
    for (name, value) in &form.fields {
        if name.starts_with("timestamp_granularities") && value != "segment" {
            return Err(ApiError::InvalidField(format!(
                "{name}: only segment timestamps are served, not {value:?}"
            )));
        }
    }
    if form.get("stream").is_some_and(|s| s == "true") {
        return Err(ApiError::InvalidField(
            "stream: transcriptions are answered whole, not streamed".to_owned(),
        ));
    }
    if form.get("task").is_some() {
        return Err(ApiError::InvalidField(
            "task: not a field of OpenAI's endpoints; the URL says transcribe or translate"
                .to_owned(),
        ));
    }
    let options = task.options(&SpeechRequest {
        language: form.get("language"),
        task: Some(speech_task.as_str()),
        prompt: form.get("prompt"),
        timestamps: format.needs_timestamps(),
    })?;
    let (transcript, seconds) = task.run("file", file, options).await?;
    let text = task.full_text(&transcript);
    Ok(match format {
        ResponseFormat::Json => Json(Text { text }).into_response(),
        ResponseFormat::Text => plain(format!("{text}\n"), "text/plain; charset=utf-8"),
        ResponseFormat::VerboseJson => {
            let segments = transcript
                .segments
                .iter()
                .enumerate()
                .map(|(id, s)| {
                    let text = task.text(&s.ids);
                    VerboseSegment {
                        id,
                        seek: s.seek,
                        start: round(s.start),
                        end: round(s.end),
                        compression_ratio: compression_ratio(&text),
                        text,
                        tokens: &s.ids,
                        temperature: 0.0,
                        avg_logprob: s.avg_logprob,
                        no_speech_prob: s.no_speech_prob,
                    }
                })
                .collect();
            Json(Verbose {
                task: speech_task.as_str(),
                language: task.language_name(&transcript),
                duration: round(seconds),
                text,
                segments,
            })
            .into_response()
        }
        ResponseFormat::Srt => plain(
            subtitles(&task, &transcript, SubtitleStyle::Srt),
            "application/x-subrip; charset=utf-8",
        ),
        ResponseFormat::Vtt => plain(
            subtitles(&task, &transcript, SubtitleStyle::Vtt),
            "text/vtt; charset=utf-8",
        ),
    })
}

fn plain(body: String, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn round(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// How well the text compresses: Whisper's measure of repetition loops (high is repetitive).
fn compression_ratio(text: &str) -> f64 {
    use std::io::Write;
    if text.is_empty() {
        return 0.0;
    }
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(text.as_bytes())
        .expect("writes to memory");
    let compressed = encoder.finish().expect("writes to memory");
    text.len() as f64 / compressed.len() as f64
}

#[derive(Debug, Clone, Copy)]
enum SubtitleStyle {
    Srt,
    Vtt,
}

fn subtitles(
    task: &SpeechRecognitionTask,
    transcript: &Transcript,
    style: SubtitleStyle,
) -> String {
    let stamp = |seconds: f64| {
        let millis = (seconds.max(0.0) * 1000.0).round() as u64;
        let (h, m, s, ms) = (
            millis / 3_600_000,
            millis / 60_000 % 60,
            millis / 1000 % 60,
            millis % 1000,
        );
        match style {
            SubtitleStyle::Srt => format!("{h:02}:{m:02}:{s:02},{ms:03}"),
            SubtitleStyle::Vtt => format!("{h:02}:{m:02}:{s:02}.{ms:03}"),
        }
    };
    let mut out = match style {
        SubtitleStyle::Srt => String::new(),
        SubtitleStyle::Vtt => "WEBVTT\n\n".to_owned(),
    };
    for (index, segment) in transcript.segments.iter().enumerate() {
        if let SubtitleStyle::Srt = style {
            out.push_str(&format!("{}\n", index + 1));
        }
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            stamp(segment.start),
            stamp(segment.end),
            task.text(&segment.ids).trim()
        ));
    }
    out
}

/// What Hugging Face clients post as JSON: the audio in base64 and the pipeline's parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootRequest {
    inputs: String,
    #[serde(default)]
    parameters: RootParameters,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootParameters {
    #[serde(default)]
    return_timestamps: bool,
    #[serde(default)]
    generate_kwargs: RootGenerateKwargs,
}

#[derive(Debug, Default, Deserialize)]
struct RootGenerateKwargs {
    language: Option<String>,
    task: Option<String>,
}

/// The endpoint root (Hugging Face's automatic-speech-recognition task): the raw audio as the
/// body, or JSON `{inputs: base64, parameters}` → `{text}`, with `chunks` when timestamps are
/// asked for.
/// OpenAI's `verbose_json` transcript.
#[derive(Debug, Serialize)]
struct Verbose<'a> {
    task: &'static str,
    language: String,
    duration: f64,
    text: String,
    segments: Vec<VerboseSegment<'a>>,
}

#[derive(Debug, Serialize)]
struct VerboseSegment<'a> {
    id: usize,
    seek: i64,
    start: f64,
    end: f64,
    text: String,
    tokens: &'a [i64],
    temperature: f64,
    avg_logprob: f64,
    compression_ratio: f64,
    no_speech_prob: f32,
}

/// Hugging Face's automatic-speech-recognition answer; `chunks` when timestamps were asked for.
#[derive(Debug, Serialize)]
struct RootTranscript {
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<Vec<Chunk>>,
}

#[derive(Debug, Serialize)]
struct Chunk {
    text: String,
    timestamp: [f64; 2],
}

async fn root(
    State(task): State<Arc<SpeechRecognitionTask>>,
    request: Request,
) -> Result<Json<RootTranscript>, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let limit = task.limits.max_audio_bytes * 4 / 3 + 64 * 1024;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| ApiError::BodyTooLarge { limit })?;
    let (audio, parameters) = if is_json {
        let request: RootRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::InvalidField(format!("body: {e}")))?;
        let audio = base64::engine::general_purpose::STANDARD
            .decode(request.inputs.trim())
            .map_err(|e| ApiError::InvalidField(format!("inputs: not base64 audio: {e}")))?;
        (Bytes::from(audio), request.parameters)
    } else {
        (body, RootParameters::default())
    };
    if audio.len() > task.limits.max_audio_bytes {
        return Err(ApiError::BodyTooLarge {
            limit: task.limits.max_audio_bytes,
        });
    }
    let options = task.options(&SpeechRequest {
        language: parameters.generate_kwargs.language.as_deref(),
        task: parameters.generate_kwargs.task.as_deref(),
        prompt: None,
        timestamps: parameters.return_timestamps,
    })?;
    let (transcript, _) = task.run("inputs", audio, options).await?;
    let text = task.full_text(&transcript);
    let chunks = parameters.return_timestamps.then(|| {
        transcript
            .segments
            .iter()
            .map(|s| Chunk {
                text: task.text(&s.ids),
                timestamp: [round(s.start), round(s.end)],
            })
            .collect()
    });
    Ok(Json(RootTranscript { text, chunks }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetitive_text_compresses_better_than_varied_text() {
        let looped = "thank you. ".repeat(20);
        assert!(compression_ratio(&looped) > 5.0);
        assert!(compression_ratio("The quick brown fox jumps over the lazy dog.") < 1.5);
    }

    #[test]
    fn every_language_code_has_one_name() {
        let mut codes: Vec<&str> = LANGUAGE_NAMES.iter().map(|(c, _)| *c).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), LANGUAGE_NAMES.len());
    }
}
