//! Admission for the continuous-batching scheduler: the time rule of `crate::admission`, with
//! its forecast made by replaying the schedule.
//!
//! A new sequence starts once a KV-cache slot is free for it and its prompt is prefilled. The
//! board is what the scheduler last published: each running sequence's steps left, the
//! sequences taken and not yet started, the time of a decode step by its rows (measured per
//! row count: flat on a GPU, about linear on a CPU), the cost of a prefill pass by prompt
//! tokens, and how long sequences turn out to be. A replay of the schedule with the new
//! sequence last predicts when its first token comes: that is both its wait and what its
//! deadline is checked against, since how many tokens follow is not known until it stops.
//!
//! A sequence is predicted to run to its `max_new_tokens`, or to the typical length of the
//! sequences that finished lately when that is shorter: most stop at a stop token long before
//! their limit, and counting each to its limit would predict slots freeing far later than they
//! do.

use std::collections::HashMap;
use std::time::Instant;

use crate::admission::{Forecast, Misprediction, PassCost, QueueRule, seconds_left};
use crate::error::ApiError;

/// A sequence as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Commitment {
    /// Decode steps until `max_new_tokens`.
    pub steps_left: usize,
    /// Prompt tokens still to prefill: none once it runs.
    pub prompt_tokens: usize,
}

/// What the scheduler last published (the running sequences), plus the sequences taken and not
/// yet started.
#[derive(Debug, Default)]
pub struct Board {
    pub step_times: StepTimes,
    pub prefill_cost: PassCost,
    pub lengths: Lengths,
    pub running: Vec<Commitment>,
    /// Taken, not yet started, by submission number.
    pub submitted: HashMap<u64, Commitment>,
    pub submissions: u64,
}

impl Board {
    /// Takes a sequence of `prompt_tokens` and `steps` (its `max_new_tokens`) arriving `now`
    /// with its `deadline`, when `rule` allows it (`None`: always), given `slots` KV-cache
    /// slots: its commitment and submission number, or `ApiError::Saturated`. Until a decode
    /// step and a prefill have been measured, every sequence is taken.
    pub fn admit(
        &mut self,
        prompt_tokens: usize,
        steps: usize,
        rule: Option<QueueRule>,
        slots: usize,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<(u64, Commitment), ApiError> {
        let mine = Commitment {
            steps_left: steps,
            prompt_tokens,
        };
        if let (Some(rule), Some(forecast)) = (rule, self.forecast(mine, slots)) {
            rule.judge(forecast, seconds_left(deadline, now))?;
        }
        Ok((self.take(mine), mine))
    }

    /// When `mine` would start and produce its first token, taken after every sequence already
    /// taken; `None` before a decode step and a prefill have been measured.
    fn forecast(&self, mine: Commitment, slots: usize) -> Option<Forecast> {
        self.step_times.predict(1)?;
        self.prefill_cost.coefficients()?;
        let costs = Costs {
            step: &self.step_times,
            prefill: &self.prefill_cost,
        };
        let mut sequences: Vec<Commitment> =
            self.taken().map(|c| self.lengths.expected(c)).collect();
        let starts_next = sequences.len() < slots;
        sequences.push(self.lengths.expected(mine));
        let first_token = replay(&sequences, slots, &costs).last().copied()?;
        let prefill = costs.prefill(mine.prompt_tokens);
        Some(Forecast {
            starts_next,
            wait: (first_token - prefill).max(0.0),
            done: first_token,
            margin: self.step_times.margin().max(self.prefill_cost.margin()),
        })
    }

    /// Lists `commitment` among those taken and not yet started; its submission number.
    pub fn take(&mut self, commitment: Commitment) -> u64 {
        self.submissions += 1;
        self.submitted.insert(self.submissions, commitment);
        self.submissions
    }

    /// Running first, then those not yet started, in the order they were taken.
    fn taken(&self) -> impl Iterator<Item = Commitment> + '_ {
        let mut submitted: Vec<(&u64, &Commitment)> = self.submitted.iter().collect();
        submitted.sort_unstable_by_key(|(number, _)| **number);
        self.running
            .iter()
            .copied()
            .chain(submitted.into_iter().map(|(_, c)| *c))
    }
}

/// How many tokens sequences generated before they stopped, lately: an exponentially
/// weighted mean over about the last 20.
#[derive(Debug, Default)]
pub struct Lengths {
    weight: f64,
    tokens: f64,
}

impl Lengths {
    /// A sequence stopped (a stop token or its length limit) after `generated` tokens.
    pub fn observe(&mut self, generated: usize) {
        self.weight = self.weight * 0.95 + 1.0;
        self.tokens = self.tokens * 0.95 + generated as f64;
    }

    /// `commitment` with its steps cut to the typical length, once one is known.
    fn expected(&self, commitment: Commitment) -> Commitment {
        if self.weight <= 0.0 {
            return commitment;
        }
        let typical = (self.tokens / self.weight).ceil() as usize;
        Commitment {
            steps_left: commitment.steps_left.min(typical.max(1)),
            ..commitment
        }
    }
}

/// What a decode step and a prefill pass cost.
pub trait Cost {
    /// Seconds of a decode step of `rows` rows.
    fn step(&self, rows: usize) -> f64;
    /// Seconds of a prefill of `tokens` prompt tokens.
    fn prefill(&self, tokens: usize) -> f64;
}

/// Seconds of a decode step by its rows: for each row count, an exponentially weighted mean of
/// the steps measured with it. A fit over all row counts would blur the one-row time every
/// sequence's bound is made of.
#[derive(Debug, Default)]
pub struct StepTimes {
    by_rows: Vec<Option<f64>>,
    misprediction: Misprediction,
}

impl StepTimes {
    pub fn observe(&mut self, rows: usize, seconds: f64) {
        if let Some(predicted) = self.predict(rows) {
            self.misprediction.observe(predicted, seconds);
        }
        if rows >= self.by_rows.len() {
            self.by_rows.resize(rows + 1, None);
        }
        let mean = &mut self.by_rows[rows];
        *mean = Some(mean.map_or(seconds, |mean| 0.9 * mean + 0.1 * seconds));
    }

    /// See `Misprediction::margin`.
    pub fn margin(&self) -> f64 {
        self.misprediction.margin()
    }

    /// The measured time for `rows`; between measured row counts, a straight line; beyond the
    /// largest, the line through the two largest (never falling), or in proportion to rows
    /// with one measured; below the smallest, in proportion to rows. `None` before any step.
    pub fn predict(&self, rows: usize) -> Option<f64> {
        if let Some(&Some(seconds)) = self.by_rows.get(rows) {
            return Some(seconds);
        }
        let measured = |mut range: Box<dyn Iterator<Item = usize>>| {
            range.find_map(|r| self.by_rows.get(r).copied().flatten().map(|t| (r, t)))
        };
        let below = measured(Box::new((1..rows).rev()));
        let above = measured(Box::new(rows + 1..self.by_rows.len()));
        let line = |(a, ta): (usize, f64), (b, tb): (usize, f64)| {
            ta + (tb - ta) * (rows as f64 - a as f64) / (b as f64 - a as f64)
        };
        let per_row = |(r, t): (usize, f64)| t * rows as f64 / r as f64;
        Some(match (below, above) {
            (Some(low), Some(high)) => line(low, high),
            (None, Some(high)) => per_row(high),
            (Some(high), None) => match measured(Box::new((1..high.0).rev())) {
                Some(low) => line(low, high).max(high.1),
                None => per_row(high),
            },
            (None, None) => return None,
        })
    }
}

struct Costs<'a> {
    step: &'a StepTimes,
    prefill: &'a PassCost,
}

impl Cost for Costs<'_> {
    fn step(&self, rows: usize) -> f64 {
        self.step.predict(rows).unwrap_or(0.0)
    }

    fn prefill(&self, tokens: usize) -> f64 {
        self.prefill.predict(tokens as f64).unwrap_or(0.0)
    }
}

/// Seconds from now until each sequence's first token, in the order given, when the first
/// `slots` run at once and the rest take slots as they free, in order. A sequence that takes a
/// slot stalls every running one for its prefill, which gives it its first token.
pub fn replay(sequences: &[Commitment], slots: usize, cost: &impl Cost) -> Vec<f64> {
    let slots = slots.max(1);
    let mut first_tokens = vec![0.0; sequences.len()];
    let mut left: Vec<usize> = sequences.iter().map(|c| c.steps_left).collect();
    let mut active: Vec<usize> = Vec::new();
    let mut next = 0;
    let mut now = 0.0;
    loop {
        while active.len() < slots && next < sequences.len() {
            now += match sequences[next].prompt_tokens {
                0 => 0.0,
                tokens => cost.prefill(tokens),
            };
            first_tokens[next] = now;
            active.push(next);
            next += 1;
        }
        if next == sequences.len() {
            return first_tokens;
        }
        let steps = active.iter().map(|&i| left[i]).min().unwrap_or(0);
        now += steps as f64 * cost.step(active.len());
        active.retain(|&i| {
            left[i] -= steps;
            left[i] > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::admission::Refusal;

    const RULE: Option<QueueRule> = Some(QueueRule {
        max_queue_time: 5.0,
        wait_floor: 0.25,
    });

    /// Decode steps as measured; a prefill of 10 prompt tokens costs 1 ms.
    fn board(steps: &[(usize, f64)]) -> Board {
        let mut board = Board::default();
        for &(rows, seconds) in steps {
            board.step_times.observe(rows, seconds);
        }
        board.prefill_cost.observe(10.0, 0.001);
        // Predictions exact: the first steps of a fit are mispredicted wildly.
        board.step_times.misprediction = Misprediction::default();
        board
    }

    fn running(steps_left: usize) -> Commitment {
        Commitment {
            steps_left,
            prompt_tokens: 0,
        }
    }

    struct PerRow;

    impl Cost for PerRow {
        fn step(&self, rows: usize) -> f64 {
            0.001 * rows as f64
        }

        fn prefill(&self, tokens: usize) -> f64 {
            0.0001 * tokens as f64
        }
    }

    #[test]
    fn a_replay_runs_the_first_slots_at_once_and_the_rest_as_slots_free() {
        let sequences = [(10, 0), (20, 0), (5, 30)].map(|(steps_left, prompt_tokens)| Commitment {
            steps_left,
            prompt_tokens,
        });
        let first_tokens = replay(&sequences, 2, &PerRow);
        // Rows 2 for 10 steps (20 ms) end the first; the third is prefilled (3 ms) in its slot.
        let expected = [0.0, 0.0, 0.023];
        for (first, expected) in first_tokens.iter().zip(expected) {
            assert!((first - expected).abs() < 1e-12, "{first_tokens:?}");
        }
    }

    #[test]
    fn step_times_are_measured_per_row_count_and_drawn_as_lines_between() {
        let mut times = StepTimes::default();
        assert_eq!(times.predict(1), None);
        times.observe(2, 0.020);
        assert_eq!(times.predict(1), Some(0.010), "below: per row");
        assert_eq!(times.predict(4), Some(0.040), "one measured: per row");
        times.observe(6, 0.024);
        assert_eq!(times.predict(2), Some(0.020));
        assert!((times.predict(4).unwrap() - 0.022).abs() < 1e-12, "between");
        assert!(
            (times.predict(10).unwrap() - 0.028).abs() < 1e-12,
            "beyond: the line"
        );
        times.observe(2, 0.030);
        assert!(
            (times.predict(2).unwrap() - 0.021).abs() < 1e-12,
            "a moving mean"
        );
    }

    #[test]
    fn a_sequence_with_a_free_slot_is_taken_however_slow_the_steps() {
        // CPU-like steps: each row adds 10 ms. Every one of 32 slots is taken.
        let mut board = board(&[(1, 0.010), (2, 0.020)]);
        let now = Instant::now();
        let taken = (0..32)
            .filter(|_| board.admit(10, 1000, RULE, 32, None, now).is_ok())
            .count();
        assert_eq!(taken, 32);
    }

    #[test]
    fn a_sequence_that_would_wait_for_a_slot_past_the_maximum_queue_time_is_refused() {
        let mut board = board(&[(1, 0.010), (8, 0.0101)]);
        let now = Instant::now();
        // One slot, taken for 780 more steps: a sequence would wait 7.8 s for it.
        board.running.push(running(780));
        // 2.8 s later it would wait 5 s: retry then.
        assert_eq!(
            board
                .admit(10, 100, RULE, 1, None, now)
                .unwrap_err()
                .to_string(),
            "the model is saturated: this request would wait about 7.80 s beyond its own \
             time, more than the maximum queue time of 5 s; retry in 3 s"
        );
        board.running[0] = running(300);
        assert!(board.admit(10, 100, RULE, 1, None, now).is_ok(), "3 s");
    }

    #[test]
    fn slots_are_predicted_to_free_at_the_typical_length_of_recent_sequences() {
        let mut board = board(&[(1, 0.010), (8, 0.0101)]);
        let now = Instant::now();
        // Allowed 1000 tokens, the running one would hold its slot 10 s; sequences lately
        // stopped after about 50, so it is expected to free in 0.5 s.
        board.running.push(running(1000));
        assert!(board.admit(10, 1000, RULE, 1, None, now).is_err());
        board.submitted.clear();
        for _ in 0..20 {
            board.lengths.observe(50);
        }
        assert!(board.admit(10, 1000, RULE, 1, None, now).is_ok());
    }

    #[test]
    fn a_sequence_that_could_not_start_before_its_deadline_is_refused() {
        let mut board = board(&[(1, 0.010), (8, 0.0101)]);
        let now = Instant::now();
        board.running.push(running(300));
        let deadline = |seconds| Some(now + Duration::from_secs_f64(seconds));
        assert!(matches!(
            board.admit(10, 100, RULE, 1, deadline(2.0), now),
            Err(ApiError::Saturated(Refusal::Deadline { .. }))
        ));
        assert!(board.admit(10, 100, RULE, 1, deadline(4.0), now).is_ok());
    }

    #[test]
    fn without_the_rule_or_a_measured_step_everything_is_taken() {
        let mut unmeasured = Board::default();
        unmeasured.running.push(running(100_000));
        assert!(
            unmeasured
                .admit(10, 100, RULE, 1, None, Instant::now())
                .is_ok()
        );
        let mut measured = board(&[(1, 0.010)]);
        measured.running.push(running(100_000));
        assert!(
            measured
                .admit(10, 100, None, 1, None, Instant::now())
                .is_ok()
        );
    }
}
