//! Choosing the next token from a row of logits: greedy, or sampled with temperature, top-k,
//! top-p and a repetition penalty, from a seeded generator so that a request with a seed gets
//! the same tokens every time.

/// How one sequence picks its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the most likely tokens whose probabilities add up to this (1 keeps all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Transformers' repetition penalty: logits of tokens already in the sequence are divided by
    /// it when positive and multiplied when negative (1 turns it off).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether the choice needs nothing but the logits' argmax (so it can stay on the device).
    pub fn is_plain_argmax(&self) -> bool {
        self.is_greedy() && self.repetition_penalty == 1.0
    }
}

/// SplitMix64: a small, fast, well-distributed generator; one per sequence, seeded per request.
/// Not for secrets (tokens come from the OS CSPRNG in `crds`).
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The next token from `logits` (one row, float32) given the tokens so far.
pub fn sample(
    logits: &mut [f32],
    params: &SamplingParams,
    history: &[i64],
    rng: &mut SeededRng,
) -> i64 {
    if params.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &token in history {
            let Some(logit) = usize::try_from(token).ok().and_then(|t| logits.get_mut(t)) else {
                continue;
            };
            if seen.insert(token) {
                *logit = if *logit > 0.0 {
                    *logit / params.repetition_penalty
                } else {
                    *logit * params.repetition_penalty
                };
            }
        }
    }
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0 as i64
    };
    if params.is_greedy() {
        return argmax();
    }
    // Candidates by descending logit; ties keep the lower id first, as a stable sort does.
    let mut candidates: Vec<(usize, f32)> = logits
        .iter()
        .map(|&l| l / params.temperature)
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .collect();
    if candidates.is_empty() {
        return argmax();
    }
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    if params.top_k > 0 {
        candidates.truncate(params.top_k);
    }
    let max = candidates[0].1;
    let weights: Vec<f64> = candidates
        .iter()
        .map(|(_, l)| f64::from(l - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut keep = candidates.len();
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        for (i, w) in weights.iter().enumerate() {
            cumulative += w / total;
            if cumulative >= f64::from(params.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut target = rng.next_f64() * kept_total;
    for (i, w) in weights[..keep].iter().enumerate() {
        if target < *w {
            return candidates[i].0 as i64;
        }
        target -= w;
    }
    candidates[keep - 1].0 as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            repetition_penalty: 1.0,
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut logits = [0.1, 2.5, -1.0, 2.4];
        assert_eq!(
            sample(
                &mut logits,
                &SamplingParams::greedy(),
                &[],
                &mut SeededRng::new(1)
            ),
            1
        );
    }

    #[test]
    fn the_repetition_penalty_discourages_seen_tokens_both_signs() {
        let mut logits = [2.0, 1.5, -1.0];
        let mut p = SamplingParams::greedy();
        p.repetition_penalty = 2.0;
        assert_eq!(
            sample(&mut logits, &p, &[0, 0, 2], &mut SeededRng::new(1)),
            1
        );
        assert_eq!(
            logits,
            [1.0, 1.5, -2.0],
            "penalised once per distinct token"
        );
    }

    #[test]
    fn a_seed_reproduces_the_draws_and_top_k_one_is_greedy() {
        let logits = [0.5f32, 0.4, 0.3, 0.2, 0.1];
        let draws = |seed| {
            let mut rng = SeededRng::new(seed);
            (0..32)
                .map(|_| sample(&mut logits.clone(), &params(1.0, 1.0, 0), &[], &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        assert!(
            draws(42)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
        let mut rng = SeededRng::new(3);
        assert!(
            (0..32).all(|_| sample(&mut logits.clone(), &params(1.0, 1.0, 1), &[], &mut rng) == 0)
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities after softmax ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps two tokens.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = SeededRng::new(11);
        let seen: std::collections::HashSet<i64> = (0..400)
            .map(|_| sample(&mut logits.clone(), &params(1.0, 0.8, 0), &[], &mut rng))
            .collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
    }

    #[test]
    fn draws_follow_the_distribution() {
        let logits = [1.0f32.ln(), 3.0f32.ln()];
        let mut rng = SeededRng::new(5);
        let ones = (0..10_000)
            .filter(|_| sample(&mut logits.clone(), &params(1.0, 1.0, 0), &[], &mut rng) == 1)
            .count();
        assert!(
            (7_200..7_800).contains(&ones),
            "{ones} of 10000 draws were token 1, expected ~7500"
        );
    }
}
