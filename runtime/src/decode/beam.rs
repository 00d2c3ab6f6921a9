//! Greedy and beam search for encoder-decoder translation, as transformers' `generate` runs
//! them for MarianMT.

use tch::{Device, Kind, Tensor};

use crate::models::marian::{DecoderCache, MarianModel};

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
