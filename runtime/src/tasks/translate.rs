//! `translation`: `POST /v1/translate` over a MarianMT model, with greedy and beam search as
//! transformers' `generate` runs them for Marian (the pad token never generated, EOS forced at
//! the length limit).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::error::{ApiError, BackendError};
use crate::executor::{Backend, Executor, Shape, Wanted, Work};
use crate::models::marian::{DecoderCache, MarianModel};
use crate::models::{LoadError, read_json, sentencepiece};
use crate::server::ValidJson;

/// Marian's tokenization: SentencePiece pieces of the source model mapped through the shared
/// `vocab.json`, EOS appended; decoding joins target pieces.
#[derive(Debug)]
pub struct MarianTokenizer {
    source: Tokenizer,
    vocab: HashMap<String, i64>,
    pieces: HashMap<i64, String>,
    eos: i64,
    pad: i64,
    unk: i64,
}

impl MarianTokenizer {
    pub fn load(dir: &Path) -> Result<MarianTokenizer, LoadError> {
        let invalid = |message: String| LoadError::Invalid {
            path: dir.to_owned(),
            message,
        };
        let source =
            sentencepiece::load(&dir.join("source.spm")).map_err(|e| invalid(e.to_string()))?;
        let vocab: HashMap<String, i64> = read_json(&dir.join("vocab.json"))?;
        let id = |piece: &str| {
            vocab
                .get(piece)
                .copied()
                .ok_or_else(|| invalid(format!("vocab.json has no {piece}")))
        };
        let (eos, pad, unk) = (id("</s>")?, id("<pad>")?, id("<unk>")?);
        let pieces = vocab.iter().map(|(p, i)| (*i, p.clone())).collect();
        Ok(MarianTokenizer {
            source,
            vocab,
            pieces,
            eos,
            pad,
            unk,
        })
    }

    /// Ids of `text`, a leading `>>lang<<` (multi-target models) kept as its own token.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, ApiError> {
        let mut ids = Vec::new();
        let mut rest = text;
        if let Some(code) = text.strip_prefix(">>").and_then(|t| t.split_once("<<"))
            && let Some(&id) = self.vocab.get(&format!(">>{}<<", code.0))
        {
            ids.push(id);
            rest = code.1;
        }
        let encoding = self
            .source
            .encode(rest, false)
            .map_err(|e| ApiError::InvalidField(format!("text cannot be tokenized: {e}")))?;
        ids.extend(
            encoding
                .get_tokens()
                .iter()
                .map(|piece| self.vocab.get(piece).copied().unwrap_or(self.unk)),
        );
        ids.push(self.eos);
        Ok(ids)
    }

    /// Text of generated `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[i64]) -> String {
        let text: String = ids
            .iter()
            .filter(|&&id| id != self.eos && id != self.pad && id != self.unk)
            .filter_map(|id| self.pieces.get(id).map(String::as_str))
            .collect();
        text.replace('▁', " ").trim().to_owned()
    }

    /// The `>>lang<<` token of `target_lang`, when the vocabulary has one.
    pub fn language_token(&self, lang: &str) -> Option<String> {
        let token = format!(">>{lang}<<");
        self.vocab.contains_key(&token).then_some(token)
    }
}

/// How to search: beams (1 is greedy) and the longest output, counting the start token.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    pub beams: usize,
    pub max_length: usize,
}

/// Next-token log-probabilities as Marian's generation config shapes them: the pad token is
/// never chosen, and at the last position only EOS may be.
fn shaped_log_probs(
    logits: &Tensor,
    model: &MarianModel,
    length: usize,
    max_length: usize,
) -> Tensor {
    let mut scores = logits.log_softmax(-1, Kind::Float);
    let pad = model.config.pad_token_id;
    let _ = scores.narrow(1, pad, 1).fill_(f64::NEG_INFINITY);
    if length + 1 >= max_length {
        let eos = model
            .config
            .forced_eos_token_id
            .unwrap_or(model.config.eos_token_id);
        let _ = scores.fill_(f64::NEG_INFINITY);
        let _ = scores.narrow(1, eos, 1).fill_(0.0);
    }
    scores
}

/// Translations of `sources` (token ids, EOS-terminated), as generated ids without the start
/// token, one batch: greedy when `search.beams` is 1, else beam search.
pub fn translate(model: &MarianModel, sources: &[Vec<i64>], search: Search) -> Vec<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let longest = sources.iter().map(Vec::len).max().unwrap_or(0);
    let pad = model.config.pad_token_id;
    let eos = model.config.eos_token_id;
    let padded: Vec<i64> = sources
        .iter()
        .flat_map(|s| {
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, longest - s.len()))
        })
        .collect();
    let mask: Vec<i64> = sources
        .iter()
        .flat_map(|s| {
            std::iter::repeat_n(1, s.len()).chain(std::iter::repeat_n(0, longest - s.len()))
        })
        .collect();
    let shape = [sources.len() as i64, longest as i64];
    let ids = Tensor::from_slice(&padded).view(shape).to_device(device);
    let attention = Tensor::from_slice(&mask).view(shape).to_device(device);
    let encoded = model.encode(&ids, &attention);
    if search.beams <= 1 {
        return greedy(model, &encoded, sources.len(), search.max_length, eos);
    }
    // Every source's beams decode together: rows [source 0 beam 0, source 0 beam 1, ...].
    let rows: Vec<i64> = (0..sources.len() as i64)
        .flat_map(|s| std::iter::repeat_n(s, search.beams))
        .collect();
    beam(
        model,
        &encoded.select(&Tensor::from_slice(&rows).to_device(device)),
        sources.len(),
        search,
        eos,
    )
}

/// One source's beam search state.
struct Beams {
    sequences: Vec<Vec<i64>>,
    scores: Vec<f64>,
    finished: Vec<(f64, Vec<i64>)>,
    done: bool,
}

fn greedy(
    model: &MarianModel,
    encoded: &crate::models::marian::Encoded,
    rows: usize,
    max_length: usize,
    eos: i64,
) -> Vec<Vec<i64>> {
    let device = model.device();
    let start = model.config.decoder_start_token_id;
    let mut outputs = vec![Vec::new(); rows];
    let mut finished = vec![false; rows];
    let mut cache = DecoderCache::default();
    let mut last = vec![start; rows];
    for length in 1..max_length {
        let input = Tensor::from_slice(&last).to_device(device).unsqueeze(1);
        let logits = model.decode(&input, encoded, &mut cache, false);
        let scores = shaped_log_probs(&logits, model, length, max_length);
        let chosen =
            Vec::<i64>::try_from(scores.argmax(-1, false).to_device(Device::Cpu)).expect("ids");
        for (row, token) in chosen.into_iter().enumerate() {
            if finished[row] {
                last[row] = model.config.pad_token_id;
                continue;
            }
            outputs[row].push(token);
            last[row] = token;
            finished[row] = token == eos;
        }
        if finished.iter().all(|f| *f) {
            break;
        }
    }
    outputs
}

/// Beam search for `sources` sources (their encodings repeated `beams` times each), as
/// transformers runs it with `length_penalty` 1 and `early_stopping` off: each step keeps a
/// source's best `beams` continuations that do not end; one ending among its best `beams`
/// candidates becomes a finished hypothesis scored by its sum of log-probabilities over the
/// tokens generated. A source is done when no running beam can beat the worst of `beams`
/// finished ones, or at the length limit. All sources decode in the same forward passes.
fn beam(
    model: &MarianModel,
    encoded: &crate::models::marian::Encoded,
    sources: usize,
    search: Search,
    eos: i64,
) -> Vec<Vec<i64>> {
    let device = model.device();
    let width = search.beams;
    let start = model.config.decoder_start_token_id;
    let mut cache = DecoderCache::default();
    // Only the first beam of each source is live at the start, so that its beams differ.
    let mut states: Vec<Beams> = (0..sources)
        .map(|_| Beams {
            sequences: vec![Vec::new(); width],
            scores: (0..width)
                .map(|b| if b == 0 { 0.0 } else { -1e9 })
                .collect(),
            finished: Vec::new(),
            done: false,
        })
        .collect();
    for length in 1..search.max_length {
        let last: Vec<i64> = states
            .iter()
            .flat_map(|state| state.sequences.iter().map(|s| *s.last().unwrap_or(&start)))
            .collect();
        let scores: Vec<f32> = states
            .iter()
            .flat_map(|state| state.scores.iter().map(|&s| s as f32))
            .collect();
        let input = Tensor::from_slice(&last).to_device(device).unsqueeze(1);
        let logits = model.decode(&input, encoded, &mut cache, false);
        let log_probs = shaped_log_probs(&logits, model, length, search.max_length);
        let totals = log_probs + Tensor::from_slice(&scores).to_device(device).unsqueeze(1);
        let vocab = totals.size()[1];
        let (top_scores, top_ids) =
            totals
                .view([sources as i64, -1])
                .topk(2 * width as i64, -1, true, true);
        let top_scores =
            Vec::<f32>::try_from(top_scores.reshape([-1]).to_device(Device::Cpu)).expect("scores");
        let top_ids =
            Vec::<i64>::try_from(top_ids.reshape([-1]).to_device(Device::Cpu)).expect("ids");
        let mut origins = Vec::with_capacity(sources * width);
        for (source, state) in states.iter_mut().enumerate() {
            let base = source * width;
            if state.done {
                origins.extend((0..width).map(|b| (base + b) as i64));
                continue;
            }
            let candidates = (0..2 * width).map(|rank| {
                let at = source * 2 * width + rank;
                let flat = top_ids[at];
                (
                    rank,
                    f64::from(top_scores[at]),
                    (flat / vocab) as usize,
                    flat % vocab,
                )
            });
            let mut next: Vec<(f64, usize, i64)> = Vec::with_capacity(width);
            for (rank, score, from, token) in candidates {
                if token == eos {
                    if rank < width {
                        let mut hypothesis = state.sequences[from].clone();
                        hypothesis.push(token);
                        // transformers normalises by the tokens generated, this one included.
                        state.finished.push((score / length as f64, hypothesis));
                    }
                } else {
                    next.push((score, from, token));
                }
                if next.len() == width {
                    break;
                }
            }
            state.finished.sort_by(|a, b| b.0.total_cmp(&a.0));
            state.finished.truncate(width);
            origins.extend(next.iter().map(|(_, from, _)| (base + from) as i64));
            state.sequences = next
                .iter()
                .map(|(_, from, token)| {
                    let mut s = state.sequences[*from].clone();
                    s.push(*token);
                    s
                })
                .collect();
            state.scores = next.iter().map(|(score, _, _)| *score).collect();
            if state.finished.len() == width {
                let best_running = state
                    .scores
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max)
                    / length as f64;
                let worst_finished = state.finished.last().map_or(f64::NEG_INFINITY, |f| f.0);
                state.done = best_running <= worst_finished;
            }
        }
        if states.iter().all(|s| s.done) {
            break;
        }
        cache = cache.select(&Tensor::from_slice(&origins).to_device(device));
    }
    states
        .into_iter()
        .map(|mut state| {
            if state.finished.is_empty() {
                let best = state
                    .scores
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                return state.sequences.swap_remove(best);
            }
            state.finished.swap_remove(0).1
        })
        .collect()
}

/// One request's sources (token ids) and how to search their translations.
#[derive(Debug, Clone)]
pub struct Job {
    pub sources: Vec<Vec<i64>>,
    pub search: Search,
}

/// A pass holds up to `max_batch_requests` texts, each a row.
impl Work for Job {
    fn shape(&self) -> Shape {
        Shape {
            rows: self.sources.len(),
            width: 1,
        }
    }
}

/// The model thread's half.
#[derive(Debug)]
pub struct TranslationModel {
    model: MarianModel,
}

impl TranslationModel {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<TranslationModel, LoadError> {
        Ok(TranslationModel {
            model: MarianModel::load(dir, device, kind)?,
        })
    }
}

impl Backend for TranslationModel {
    type Job = Job;
    type Output = Vec<Vec<i64>>;

    /// Translates the jobs queued together: jobs that search alike run as one batch.
    fn run_batch(
        &mut self,
        jobs: Vec<Job>,
        wanted: &Wanted<'_>,
    ) -> Vec<Result<Vec<Vec<i64>>, BackendError>> {
        let mut answers: Vec<Option<Result<Vec<Vec<i64>>, BackendError>>> =
            jobs.iter().map(|_| None).collect();
        let mut groups: Vec<(Search, Vec<usize>)> = Vec::new();
        for (index, Job { search, .. }) in jobs.iter().enumerate() {
            match groups
                .iter_mut()
                .find(|(s, _)| s.beams == search.beams && s.max_length == search.max_length)
            {
                Some((_, members)) => members.push(index),
                None => groups.push((*search, vec![index])),
            }
        }
        for (search, members) in groups {
            // A group whose clients all left is not translated.
            let members: Vec<usize> = members.into_iter().filter(|&i| wanted.still(i)).collect();
            let sources: Vec<Vec<i64>> = members
                .iter()
                .flat_map(|&i| jobs[i].sources.clone())
                .collect();
            let mut outputs = translate(&self.model, &sources, search).into_iter();
            for &i in &members {
                answers[i] = Some(Ok(outputs.by_ref().take(jobs[i].sources.len()).collect()));
            }
        }
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or(Err(BackendError::Abandoned)))
            .collect()
    }
}

/// The HTTP half.
#[derive(Debug)]
pub struct TranslationTask {
    pub executor: Executor<Job, Vec<Vec<i64>>>,
    pub tokenizer: Arc<MarianTokenizer>,
    pub default_beams: usize,
    pub max_length: usize,
    pub max_client_batch_size: usize,
}

/// `text`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextField {
    One(String),
    Many(Vec<String>),
}

/// The seed's translation request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranslateRequest {
    pub text: TextField,
    #[serde(default)]
    pub source_lang: Option<String>,
    #[serde(default)]
    pub target_lang: Option<String>,
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub num_beams: Option<usize>,
}

pub fn routes() -> Router<Arc<TranslationTask>> {
    Router::new()
        .route("/", post(root))
        .route("/v1/translate", post(translate_route))
        .route("/translate", post(translate_route))
}

async fn translate_route(
    State(task): State<Arc<TranslationTask>>,
    ValidJson(request): ValidJson<TranslateRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (texts, one) = match request.text {
        TextField::One(text) => (vec![text], true),
        TextField::Many(texts) => (texts, false),
    };
    let translations = task
        .translate(
            "text",
            texts,
            request.target_lang.as_deref(),
            request.max_length,
            request.num_beams,
        )
        .await?;
    Ok(Json(if one {
        serde_json::json!({"translation": translations[0]})
    } else {
        serde_json::json!({"translation": translations})
    }))
}

/// What Hugging Face clients post to the endpoint root for translation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootTranslateRequest {
    pub inputs: TextField,
    #[serde(default)]
    pub parameters: RootTranslateParameters,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootTranslateParameters {
    pub src_lang: Option<String>,
    pub tgt_lang: Option<String>,
    /// Always done: decoding drops special tokens and SentencePiece's spacing marks.
    pub clean_up_tokenization_spaces: Option<bool>,
    /// Refused past the limit unless it says otherwise; only `do_not_truncate` is served.
    pub truncation: Option<String>,
    #[serde(default)]
    pub generate_parameters: RootGenerateParameters,
}

#[derive(Debug, Default, Deserialize)]
pub struct RootGenerateParameters {
    pub max_length: Option<usize>,
    pub num_beams: Option<usize>,
}

/// The endpoint root (Hugging Face's translation task): `[{translation_text}]`, one per input.
async fn root(
    State(task): State<Arc<TranslationTask>>,
    ValidJson(request): ValidJson<RootTranslateRequest>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let parameters = request.parameters;
    if let Some(truncation) = parameters.truncation.filter(|t| t != "do_not_truncate") {
        return Err(ApiError::InvalidField(format!(
            "parameters.truncation: only do_not_truncate is served, not {truncation}"
        )));
    }
    let texts = match request.inputs {
        TextField::One(text) => vec![text],
        TextField::Many(texts) => texts,
    };
    let translations = task
        .translate(
            "inputs",
            texts,
            parameters.tgt_lang.as_deref(),
            parameters.generate_parameters.max_length,
            parameters.generate_parameters.num_beams,
        )
        .await?;
    Ok(Json(
        translations
            .into_iter()
            .map(|text| serde_json::json!({"translation_text": text}))
            .collect(),
    ))
}

impl TranslationTask {
    /// Validates and translates `texts` (the request's `field`), in order.
    async fn translate(
        &self,
        field: &'static str,
        texts: Vec<String>,
        target_lang: Option<&str>,
        max_length: Option<usize>,
        num_beams: Option<usize>,
    ) -> Result<Vec<String>, ApiError> {
        if texts.is_empty() {
            return Err(ApiError::InvalidField(format!(
                "{field}: at least one text is required"
            )));
        }
        if texts.len() > self.max_client_batch_size {
            return Err(ApiError::TooManyInputs {
                field,
                count: texts.len(),
                limit: self.max_client_batch_size,
            });
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(ApiError::InvalidField(format!("{field}[{i}]: empty")));
        }
        let beams = num_beams.unwrap_or(self.default_beams);
        if !(1..=8).contains(&beams) {
            return Err(ApiError::InvalidField(
                "num_beams: must be between 1 and 8".to_owned(),
            ));
        }
        let max_length = max_length.unwrap_or(self.max_length);
        if !(2..=self.max_length).contains(&max_length) {
            return Err(ApiError::InvalidField(format!(
                "max_length: must be between 2 and {}",
                self.max_length
            )));
        }
        let prefix = target_lang.and_then(|lang| self.tokenizer.language_token(lang));
        let mut sources = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let text = match &prefix {
                Some(token) => format!("{token} {text}"),
                None => text.clone(),
            };
            let ids = self.tokenizer.encode(&text)?;
            if ids.len() > self.max_length {
                return Err(ApiError::InputTooLong {
                    index: i,
                    tokens: ids.len(),
                    limit: self.max_length,
                });
            }
            sources.push(ids);
        }
        let outputs = self
            .executor
            .run(Job {
                sources,
                search: Search { beams, max_length },
            })
            .await?;
        Ok(outputs
            .iter()
            .map(|ids| self.tokenizer.decode(ids))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_language_token_leads_the_source_ids() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/marian");
        let mut tokenizer = MarianTokenizer::load(&dir).unwrap();
        let id = tokenizer.vocab.len() as i64;
        tokenizer.vocab.insert(">>fra<<".to_owned(), id);
        assert_eq!(tokenizer.language_token("fra").as_deref(), Some(">>fra<<"));
        assert_eq!(tokenizer.language_token("deu"), None);
        let plain = tokenizer.encode("the cat").unwrap();
        let prefixed = tokenizer.encode(">>fra<< the cat").unwrap();
        assert_eq!(prefixed[0], id);
        assert_eq!(&prefixed[1..], &plain[..]);
    }
}
