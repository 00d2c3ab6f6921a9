//! Whisper's decoding as transformers' `generate` runs it for one 30-second window (greedy, its
//! logits processors in its order), and the long-form loop over windows that seeks by the
//! timestamps the model predicts.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::models::whisper::{DecoderCache, Encoded, MelFeatures, WhisperModel};
use crate::models::{LoadError, read_json};

/// Whisper's special tokens and decoding rules, from `generation_config.json`, the model's
/// vocabulary size (`config.json`) and the tokenizer's vocabulary.
///
/// OpenAI's checkpoints put every special token after end of text and the timestamps after
/// `<|notimestamps|>`, so that "below end of text" means text; checkpoints made otherwise do
/// not (end of text can be token 0, with no timestamp tokens at all), so text is told from the
/// special tokens by name and by the tokenizer's own flags instead.
#[derive(Debug, Clone)]
pub struct SpeechTokens {
    pub end_of_text: i64,
    pub start_of_transcript: i64,
    pub start_of_previous: Option<i64>,
    pub no_speech: Option<i64>,
    pub no_timestamps: i64,
    /// The first timestamp token, `<|0.00|>`; each next one is 0.02 s later. At or past
    /// `vocab_size` when the model has no timestamp tokens.
    pub timestamp_begin: i64,
    /// Rows of the model's logits.
    pub vocab_size: i64,
    /// Ids that are never text, sorted: the tokenizer's special tokens and the ids above.
    pub special: Vec<i64>,
    pub transcribe: Option<i64>,
    pub translate: Option<i64>,
    /// Language codes (`en`) and their tokens; empty for English-only models.
    pub languages: Vec<(String, i64)>,
    pub suppress: Vec<i64>,
    pub begin_suppress: Vec<i64>,
    pub max_initial_timestamp_index: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct GenerationConfig {
    decoder_start_token_id: i64,
    eos_token_id: serde_json::Value,
    no_timestamps_token_id: i64,
    #[serde(default)]
    prev_sot_token_id: Option<i64>,
    #[serde(default)]
    is_multilingual: Option<bool>,
    #[serde(default)]
    lang_to_id: std::collections::BTreeMap<String, i64>,
    #[serde(default)]
    task_to_id: std::collections::BTreeMap<String, i64>,
    #[serde(default)]
    suppress_tokens: Vec<i64>,
    #[serde(default)]
    begin_suppress_tokens: Vec<i64>,
    #[serde(default)]
    max_initial_timestamp_index: Option<i64>,
}

/// What `SpeechTokens` reads of `config.json`.
#[derive(Debug, Deserialize)]
struct ModelConfig {
    vocab_size: i64,
}

impl SpeechTokens {
    pub fn load(dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<SpeechTokens, LoadError> {
        let path = dir.join("generation_config.json");
        let config: GenerationConfig = read_json(&path)?;
        let invalid = |message: &str| LoadError::Invalid {
            path: path.clone(),
            message: message.to_owned(),
        };
        let end_of_text = match &config.eos_token_id {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::Array(ids) => ids.first().and_then(serde_json::Value::as_i64),
            _ => None,
        }
        .ok_or_else(|| invalid("eos_token_id is missing"))?;
        let model_path = dir.join("config.json");
        let vocab_size = if model_path.exists() {
            read_json::<ModelConfig>(&model_path)?.vocab_size
        } else {
            i64::try_from(tokenizer.get_vocab_size(true)).unwrap_or(i64::MAX)
        };
        let languages: Vec<(String, i64)> = if config.is_multilingual.unwrap_or(true) {
            config
                .lang_to_id
                .iter()
                .map(|(token, &id)| {
                    let code = token.trim_start_matches("<|").trim_end_matches("|>");
                    (code.to_owned(), id)
                })
                .collect()
        } else {
            Vec::new()
        };
        let start_of_previous = config
            .prev_sot_token_id
            .or_else(|| tokenizer.token_to_id("<|startofprev|>").map(i64::from));
        let no_speech = ["<|nospeech|>", "<|nocaptions|>"]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t).map(i64::from));
        let transcribe = config.task_to_id.get("transcribe").copied();
        let translate = config.task_to_id.get("translate").copied();
        let mut special: Vec<i64> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| i64::from(id))
            .chain([
                end_of_text,
                config.decoder_start_token_id,
                config.no_timestamps_token_id,
            ])
            .chain(
                [start_of_previous, no_speech, transcribe, translate]
                    .into_iter()
                    .flatten(),
            )
            .chain(config.lang_to_id.values().copied())
            .collect();
        special.sort_unstable();
        special.dedup();
        Ok(SpeechTokens {
            end_of_text,
            start_of_transcript: config.decoder_start_token_id,
            start_of_previous,
            no_speech,
            no_timestamps: config.no_timestamps_token_id,
            timestamp_begin: config.no_timestamps_token_id + 1,
            vocab_size,
            special,
            transcribe,
            translate,
            languages,
            suppress: config.suppress_tokens,
            begin_suppress: config.begin_suppress_tokens,
            max_initial_timestamp_index: config.max_initial_timestamp_index,
        })
    }

    /// Whether the model can predict timestamps: whether it has ids past `<|notimestamps|>`.
    /// Without them transformers' timestamp rules forbid every token at the first step, and
    /// decoding ends at once; such a model is decoded without timestamps instead.
    pub fn has_timestamps(&self) -> bool {
        self.timestamp_begin < self.vocab_size
    }

    /// Whether `token` is text: not end of text, not another special token, not a timestamp.
    /// (For OpenAI's layout, exactly the ids below end of text.)
    pub fn is_text(&self, token: i64) -> bool {
        token != self.end_of_text
            && (0..self.timestamp_begin).contains(&token)
            && self.special.binary_search(&token).is_err()
    }

    pub fn multilingual(&self) -> bool {
        !self.languages.is_empty()
    }

    pub fn language_token(&self, code: &str) -> Option<i64> {
        self.languages
            .iter()
            .find(|(c, _)| c == code)
            .map(|(_, id)| *id)
    }

    pub fn language_code(&self, token: i64) -> Option<&str> {
        self.languages
            .iter()
            .find(|(_, id)| *id == token)
            .map(|(c, _)| c.as_str())
    }

    /// Seconds of a timestamp token.
    pub fn seconds(&self, token: i64) -> f64 {
        (token - self.timestamp_begin) as f64 * 0.02
    }
}

/// Transcribe in the spoken language, or translate into English.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeechTask {
    Transcribe,
    Translate,
}

impl SpeechTask {
    pub fn as_str(self) -> &'static str {
        match self {
            SpeechTask::Transcribe => "transcribe",
            SpeechTask::Translate => "translate",
        }
    }
}

/// What a request asks of the decoder.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// A language token; detected from the first window when `None` on a multilingual model.
    pub language: Option<i64>,
    pub task: SpeechTask,
    pub timestamps: bool,
    /// Text ids of a prompt (`<|startofprev|>` is added), as OpenAI's `prompt` field.
    pub prompt: Vec<i64>,
}

/// The decoder's start: previous text, start of transcript, language, task, and no-timestamps.
pub fn prompt(tokens: &SpeechTokens, options: &DecodeOptions, max_length: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    if let (Some(previous), false) = (tokens.start_of_previous, options.prompt.is_empty()) {
        // As Whisper does: at most half the decoder's context, the most recent part.
        let keep = options.prompt.len().min(max_length / 2 - 1);
        ids.push(previous);
        ids.extend_from_slice(&options.prompt[options.prompt.len() - keep..]);
    }
    ids.push(tokens.start_of_transcript);
    if tokens.multilingual() {
        if let Some(language) = options.language {
            ids.push(language);
        }
        let task = match options.task {
            SpeechTask::Transcribe => tokens.transcribe,
            SpeechTask::Translate => tokens.translate,
        };
        ids.extend(task);
    }
    if !options.timestamps || !tokens.has_timestamps() {
        ids.push(tokens.no_timestamps);
    }
    ids
}

/// One window's decoding: the generated ids (end of text excluded), their log-probabilities,
/// and the probability the model gave to "no speech".
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub ids: Vec<i64>,
    pub logprobs: Vec<f32>,
    pub no_speech_prob: f32,
}

/// Applies transformers' Whisper logits processors, in `generate`'s order, to one row's scores:
/// tokens suppressed at the first step, tokens suppressed always, then (with timestamps) the
/// timestamp rules: timestamps come in pairs and never go back, the first token is a timestamp
/// no later than `max_initial_timestamp_index`, and a timestamp is forced when timestamps
/// together are likelier than any text token.
pub fn shape_scores(
    scores: &mut [f32],
    generated: &[i64],
    tokens: &SpeechTokens,
    timestamps: bool,
) {
    let vocab = scores.len();
    let forbid = |range: std::ops::Range<usize>, scores: &mut [f32]| {
        for s in &mut scores[range.start.min(vocab)..range.end.min(vocab)] {
            *s = f32::NEG_INFINITY;
        }
    };
    let forbid_token = |token: i64, scores: &mut [f32]| {
        if let Some(s) = usize::try_from(token).ok().and_then(|t| scores.get_mut(t)) {
            *s = f32::NEG_INFINITY;
        }
    };
    if generated.is_empty() {
        for &token in &tokens.begin_suppress {
            forbid_token(token, scores);
        }
    }
    for &token in &tokens.suppress {
        forbid_token(token, scores);
    }
    if !timestamps {
        return;
    }
    forbid_token(tokens.no_timestamps, scores);
    let begin = tokens.timestamp_begin as usize;
    let is_timestamp = |t: &i64| *t >= tokens.timestamp_begin;
    let last_was_timestamp = generated.last().is_some_and(is_timestamp);
    let penultimate_was_timestamp =
        generated.len() < 2 || is_timestamp(&generated[generated.len() - 2]);
    if last_was_timestamp {
        if penultimate_was_timestamp {
            forbid(begin..vocab, scores);
        } else {
            forbid(0..tokens.end_of_text as usize, scores);
        }
    }
    if let Some(&last) = generated.iter().rev().find(|t| is_timestamp(t)) {
        let timestamp_last = if last_was_timestamp && !penultimate_was_timestamp {
            last
        } else {
            last + 1
        };
        forbid(begin..timestamp_last as usize, scores);
    }
    if generated.is_empty() {
        forbid(0..begin, scores);
        if let Some(index) = tokens.max_initial_timestamp_index {
            forbid(begin + index as usize + 1..vocab, scores);
        }
    }
    let logprobs = log_softmax(scores);
    let timestamp_logprob = log_sum_exp(&logprobs[begin.min(vocab)..]);
    let max_text_logprob = logprobs[..begin.min(vocab)]
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if timestamp_logprob > max_text_logprob {
        forbid(0..begin, scores);
    }
}

fn log_softmax(scores: &[f32]) -> Vec<f64> {
    let total = log_sum_exp(&scores.iter().map(|&s| f64::from(s)).collect::<Vec<_>>());
    scores.iter().map(|&s| f64::from(s) - total).collect()
}

fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// The first index of the largest score, as `argmax` picks it.
fn argmax(scores: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as i64
}

/// An additive mask of `vocab` scores: -inf at `ids`, 0 elsewhere.
fn suppression_mask(ids: &[i64], vocab: usize, device: Device) -> Tensor {
    let ids: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|&id| (0..vocab as i64).contains(&id))
        .collect();
    Tensor::zeros([vocab as i64], (Kind::Float, device)).index_fill(
        0,
        &Tensor::from_slice(&ids).to_device(device),
        f64::NEG_INFINITY,
    )
}

/// Each row's next token and its log-probability without timestamp rules: the suppressions are
/// a mask, so the choice stays on the device and only two numbers per row come back.
fn choose_on_device(logits: &Tensor, mask: &Tensor) -> Vec<(i64, f32)> {
    let logprobs = (logits + mask).log_softmax(-1, Kind::Float);
    let best = logprobs.argmax(-1, true);
    let chosen = logprobs.gather(1, &best, false);
    let best = Vec::<i64>::try_from(best.squeeze_dim(1).to_device(Device::Cpu)).expect("ids");
    let chosen =
        Vec::<f32>::try_from(chosen.squeeze_dim(1).to_device(Device::Cpu)).expect("logprobs");
    best.into_iter().zip(chosen).collect()
}

/// Each row's next token under the timestamp rules, which depend on the row's own history.
fn choose_on_host(
    logits: &Tensor,
    outputs: &[Generated],
    tokens: &SpeechTokens,
    timestamps: &[bool],
    vocab: usize,
) -> Vec<(i64, f32)> {
    let scores = Vec::<f32>::try_from(logits.reshape([-1]).to_device(Device::Cpu)).expect("logits");
    outputs
        .iter()
        .enumerate()
        .map(|(row, output)| {
            let mut row_scores = scores[row * vocab..(row + 1) * vocab].to_vec();
            shape_scores(&mut row_scores, &output.ids, tokens, timestamps[row]);
            let token = argmax(&row_scores);
            (token, log_softmax(&row_scores)[token as usize] as f32)
        })
        .collect()
}

/// Greedy decoding of `prompts` (all the same length), one row of `encoded` each, for at most
/// `max_new_tokens` tokens. Rows no longer wanted (`wanted(row)` false: the client left) stop;
/// when all have, decoding ends and `None` is returned for them.
pub fn generate(
    model: &WhisperModel,
    tokens: &SpeechTokens,
    encoded: &Encoded,
    prompts: &[Vec<i64>],
    timestamps: &[bool],
    wanted: &dyn Fn(usize) -> bool,
    max_new_tokens: usize,
) -> Vec<Option<Generated>> {
    let _guard = tch::no_grad_guard();
    let rows = prompts.len();
    let device = model.device();
    let prompt_len = prompts.first().map_or(0, Vec::len);
    let flat: Vec<i64> = prompts.concat();
    let input = Tensor::from_slice(&flat)
        .view([rows as i64, prompt_len as i64])
        .to_device(device);
    let mut cache = DecoderCache::default();
    let logits = model.decode(&input, encoded, &mut cache);
    let mut outputs: Vec<Generated> = vec![Generated::default(); rows];
    if let Some(no_speech) = tokens.no_speech {
        let sot = prompts[0]
            .iter()
            .position(|&t| t == tokens.start_of_transcript)
            .unwrap_or(0) as i64;
        let probs = Vec::<f32>::try_from(
            logits
                .select(1, sot)
                .softmax(-1, Kind::Float)
                .select(1, no_speech)
                .to_device(Device::Cpu),
        )
        .expect("probabilities");
        for (output, p) in outputs.iter_mut().zip(probs) {
            output.no_speech_prob = p;
        }
    }
    let mut last_logits = logits.select(1, prompt_len as i64 - 1);
    let mut finished = vec![false; rows];
    let vocab = last_logits.size()[1] as usize;
    let later_mask = suppression_mask(&tokens.suppress, vocab, device);
    let first_mask = &later_mask + suppression_mask(&tokens.begin_suppress, vocab, device);
    for _ in 0..max_new_tokens {
        for (row, done) in finished.iter_mut().enumerate() {
            if !*done && !wanted(row) {
                *done = true;
            }
        }
        if finished.iter().all(|f| *f) {
            break;
        }
        let first_step = outputs.iter().all(|o| o.ids.is_empty());
        let chosen = if timestamps.iter().any(|&t| t) {
            choose_on_host(&last_logits, &outputs, tokens, timestamps, vocab)
        } else {
            let mask = if first_step { &first_mask } else { &later_mask };
            choose_on_device(&last_logits, mask)
        };
        let mut next = Vec::with_capacity(rows);
        for (row, (output, (token, logprob))) in outputs.iter_mut().zip(chosen).enumerate() {
            if finished[row] {
                next.push(tokens.end_of_text);
                continue;
            }
            next.push(token);
            if token == tokens.end_of_text {
                finished[row] = true;
                continue;
            }
            output.ids.push(token);
            output.logprobs.push(logprob);
        }
        if finished.iter().all(|f| *f) {
            break;
        }
        let input = Tensor::from_slice(&next)
            .view([rows as i64, 1])
            .to_device(device);
        last_logits = model.decode(&input, encoded, &mut cache).select(1, 0);
    }
    outputs
        .into_iter()
        .enumerate()
        .map(|(row, output)| wanted(row).then_some(output))
        .collect()
}

/// The language token each row's audio is most likely in: the model's first prediction after
/// the start of transcript, among language tokens.
pub fn detect_language(model: &WhisperModel, tokens: &SpeechTokens, encoded: &Encoded) -> Vec<i64> {
    let _guard = tch::no_grad_guard();
    let rows = encoded.rows();
    let input = Tensor::full(
        [rows, 1],
        tokens.start_of_transcript,
        (Kind::Int64, model.device()),
    );
    let logits = model
        .decode(&input, encoded, &mut DecoderCache::default())
        .select(1, 0);
    let ids: Vec<i64> = tokens.languages.iter().map(|(_, id)| *id).collect();
    let candidates = logits.index_select(1, &Tensor::from_slice(&ids).to_device(model.device()));
    let best = Vec::<i64>::try_from(candidates.argmax(-1, false).to_device(Device::Cpu))
        .expect("language indices");
    best.into_iter().map(|i| ids[i as usize]).collect()
}

/// A piece of transcript with its time span in the audio.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The window's start, in mel frames (10 ms each), as OpenAI's `seek`.
    pub seek: i64,
    pub start: f64,
    pub end: f64,
    /// Text ids, timestamps excluded.
    pub ids: Vec<i64>,
    pub avg_logprob: f64,
    pub no_speech_prob: f32,
}

/// Splits one window's output into segments at its timestamp pairs, as transformers does, and
/// returns them with the number of mel frames to advance: the whole window, or up to the last
/// complete segment when the window ends in the middle of one.
pub fn split_segments(
    tokens: &SpeechTokens,
    output: &Generated,
    seek: i64,
    window_frames: i64,
) -> (Vec<Segment>, i64) {
    let ids = &output.ids;
    let offset = seek as f64 * 0.01;
    // A window's timestamps can run past the audio in its last, partial window.
    let limit = offset + window_frames as f64 * 0.01;
    let is_ts: Vec<bool> = ids.iter().map(|&t| t >= tokens.timestamp_begin).collect();
    let segment = |slice: std::ops::Range<usize>, start: f64, end: f64| {
        let text: Vec<i64> = ids[slice.clone()]
            .iter()
            .copied()
            .filter(|&t| tokens.is_text(t))
            .collect();
        let logprobs = &output.logprobs[slice];
        Segment {
            seek,
            start: start.min(limit),
            end: end.min(limit),
            ids: text,
            avg_logprob: logprobs.iter().map(|&l| f64::from(l)).sum::<f64>()
                / logprobs.len().max(1) as f64,
            no_speech_prob: output.no_speech_prob,
        }
    };
    let single_timestamp_ending = is_ts.ends_with(&[false, true]);
    let pair_ends: Vec<usize> = (0..is_ts.len().saturating_sub(1))
        .filter(|&i| is_ts[i] && is_ts[i + 1])
        .map(|i| i + 1)
        .collect();
    if pair_ends.is_empty() {
        // One segment: the window, or up to its last timestamp when it has one.
        let end = ids
            .iter()
            .rev()
            .find(|&&t| t > tokens.timestamp_begin)
            .map_or(window_frames as f64 * 0.01, |&t| tokens.seconds(t));
        return (
            vec![segment(0..ids.len(), offset, offset + end)],
            window_frames,
        );
    }
    let mut slices = pair_ends;
    if single_timestamp_ending {
        slices.push(ids.len());
    }
    let mut segments = Vec::new();
    let mut last = 0;
    for &end in &slices {
        let piece = &ids[last..end];
        let start_ts = piece
            .first()
            .copied()
            .filter(|&t| t >= tokens.timestamp_begin);
        let end_ts = piece
            .iter()
            .rev()
            .find(|&&t| t >= tokens.timestamp_begin)
            .copied();
        if let (Some(start_ts), Some(end_ts)) = (start_ts, end_ts) {
            segments.push(segment(
                last..end,
                offset + tokens.seconds(start_ts),
                offset + tokens.seconds(end_ts),
            ));
        }
        last = end;
    }
    let advance = if single_timestamp_ending {
        window_frames
    } else {
        // The window ends inside a segment: resume at its start, the last pair's timestamp.
        let resume = ids[last - 1];
        (2 * (resume - tokens.timestamp_begin)).clamp(1, window_frames)
    };
    (segments, advance)
}

/// A request's audio, decoded window by window.
#[derive(Debug)]
pub struct LongForm {
    pub samples: Vec<f32>,
    pub options: DecodeOptions,
    /// Where the next window starts, in mel frames.
    pub seek: i64,
    pub segments: Vec<Segment>,
}

impl LongForm {
    pub fn total_frames(&self, hop: usize) -> i64 {
        self.samples.len().div_ceil(hop) as i64
    }

    fn done(&self, hop: usize) -> bool {
        self.seek >= self.total_frames(hop)
    }
}

/// Transcribes every job's audio together: each round encodes the next window of every job
/// still going as one batch and decodes those whose prompts are the same length together.
/// A job no longer wanted (`wanted(index)` false: its client left) stops where it is.
pub fn transcribe(
    model: &WhisperModel,
    features: &MelFeatures,
    tokens: &SpeechTokens,
    jobs: &mut [LongForm],
    wanted: &dyn Fn(usize) -> bool,
) {
    let hop = features.config.hop_length as usize;
    let window_frames = features.frames();
    let max_length = model.config.max_target_positions as usize;
    // A model without timestamp tokens transcribes a request that asks for timestamps as one
    // that does not: one segment per window.
    for job in jobs.iter_mut() {
        job.options.timestamps &= tokens.has_timestamps();
    }
    loop {
        let active: Vec<usize> = (0..jobs.len())
            .filter(|&i| !jobs[i].done(hop) && wanted(i))
            .collect();
        if active.is_empty() {
            return;
        }
        let mels: Vec<Tensor> = active
            .iter()
            .map(|&i| {
                let start = jobs[i].seek as usize * hop;
                features.compute(&jobs[i].samples[start.min(jobs[i].samples.len())..])
            })
            .collect();
        let encoded = model.encode(&Tensor::stack(&mels, 0));
        let undetected: Vec<usize> = (0..active.len())
            .filter(|&r| tokens.multilingual() && jobs[active[r]].options.language.is_none())
            .collect();
        if !undetected.is_empty() {
            let rows =
                Tensor::from_slice(&undetected.iter().map(|&r| r as i64).collect::<Vec<_>>())
                    .to_device(model.device());
            let detected = detect_language(model, tokens, &encoded.select(&rows));
            for (&r, language) in undetected.iter().zip(detected) {
                jobs[active[r]].options.language = Some(language);
            }
        }
        let prompts: Vec<Vec<i64>> = active
            .iter()
            .map(|&i| prompt(tokens, &jobs[i].options, max_length))
            .collect();
        let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        lengths.sort_unstable();
        lengths.dedup();
        for length in lengths {
            let rows: Vec<usize> = (0..active.len())
                .filter(|&r| prompts[r].len() == length)
                .collect();
            let index = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>())
                .to_device(model.device());
            let group_prompts: Vec<Vec<i64>> = rows.iter().map(|&r| prompts[r].clone()).collect();
            let timestamps: Vec<bool> = rows
                .iter()
                .map(|&r| jobs[active[r]].options.timestamps)
                .collect();
            let outputs = generate(
                model,
                tokens,
                &encoded.select(&index),
                &group_prompts,
                &timestamps,
                &|row| wanted(active[rows[row]]),
                max_length.saturating_sub(length),
            );
            for (&r, output) in rows.iter().zip(outputs) {
                let job = &mut jobs[active[r]];
                let Some(output) = output else { continue };
                let remaining = job.total_frames(hop) - job.seek;
                let frames = remaining.min(window_frames);
                let (segments, advance) = if job.options.timestamps {
                    split_segments(tokens, &output, job.seek, frames)
                } else {
                    let offset = job.seek as f64 * 0.01;
                    let segment = Segment {
                        seek: job.seek,
                        start: offset,
                        end: offset + frames as f64 * 0.01,
                        avg_logprob: output.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>()
                            / output.logprobs.len().max(1) as f64,
                        ids: output
                            .ids
                            .into_iter()
                            .filter(|&t| tokens.is_text(t))
                            .collect(),
                        no_speech_prob: output.no_speech_prob,
                    };
                    (vec![segment], frames)
                };
                job.segments.extend(segments);
                job.seek += advance.max(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenAI's layout (text, end of text, the other special tokens, `<|notimestamps|>`, then
    /// the timestamps) or, with `eos0`, end of text at 0, the other special tokens after the
    /// text and `<|notimestamps|>` last, with no timestamps.
    fn tokens(eos0: bool) -> SpeechTokens {
        let (end_of_text, first_special, vocab_size) = if eos0 {
            (0, 100, 107)
        } else {
            (100, 101, 1608)
        };
        let special: Vec<i64> = std::iter::once(end_of_text)
            .chain(first_special..first_special + 7)
            .collect();
        SpeechTokens {
            end_of_text,
            start_of_transcript: first_special,
            start_of_previous: Some(first_special + 5),
            no_speech: Some(first_special + 5),
            no_timestamps: first_special + 6,
            timestamp_begin: first_special + 7,
            vocab_size,
            special,
            transcribe: Some(first_special + 3),
            translate: Some(first_special + 4),
            languages: vec![
                ("en".to_owned(), first_special + 1),
                ("de".to_owned(), first_special + 2),
            ],
            suppress: Vec::new(),
            begin_suppress: vec![end_of_text],
            max_initial_timestamp_index: Some(50),
        }
    }

    #[test]
    fn text_tokens_are_told_from_special_ones_whatever_the_layout() {
        let openai = tokens(false);
        assert!(openai.has_timestamps());
        for token in [0, 1, 50, 99] {
            assert!(openai.is_text(token), "{token}");
        }
        for token in [100, 101, 104, 107, 108, 1607] {
            assert!(!openai.is_text(token), "{token}");
        }
        // OpenAI's rule, below end of text, is the same there.
        assert!((0..1608).all(|t| openai.is_text(t) == (t < openai.end_of_text)));

        let eos0 = tokens(true);
        assert!(!eos0.has_timestamps());
        assert!(!eos0.is_text(0));
        for token in [1, 50, 99] {
            assert!(eos0.is_text(token), "{token}");
        }
        for token in 100..108 {
            assert!(!eos0.is_text(token), "{token}");
        }
    }

    #[test]
    fn a_model_without_timestamp_tokens_is_prompted_without_timestamps() {
        let options = |tokens: &SpeechTokens| DecodeOptions {
            language: tokens.language_token("en"),
            task: SpeechTask::Transcribe,
            timestamps: true,
            prompt: Vec::new(),
        };
        let openai = tokens(false);
        assert_eq!(prompt(&openai, &options(&openai), 448), [101, 102, 104]);
        let eos0 = tokens(true);
        assert_eq!(prompt(&eos0, &options(&eos0), 448), [100, 101, 103, 106]);
    }

    #[test]
    fn a_window_without_timestamps_keeps_its_text_when_end_of_text_is_token_0() {
        let eos0 = tokens(true);
        let output = Generated {
            ids: vec![7, 101, 9, 105, 3],
            logprobs: vec![-0.5; 5],
            no_speech_prob: 0.0,
        };
        let (segments, advance) = split_segments(&eos0, &output, 0, 250);
        assert_eq!(advance, 250);
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].ids, [7, 9, 3]);
        assert_eq!((segments[0].start, segments[0].end), (0.0, 2.5));
    }
}
