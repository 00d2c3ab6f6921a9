//! Admission by predicted slowdown for the continuous-batching scheduler (the encoders' rule,
//! `crate::admission`, applied to sequences that hold a slot for many steps).
//!
//! A sequence's time alone is its prefill plus `max_new_tokens` decode steps of one row. Under
//! load it waits for a slot, every step is slower by the rows decoded with it, and every
//! sequence that starts meanwhile stalls the batch for its prefill. The board is what the
//! scheduler last published: each running sequence's steps left, the waiting ones, the time of
//! a decode step by its rows (measured per row count: flat on a GPU, about linear on a CPU)
//! and the cost of a prefill pass by prompt tokens. A new sequence is taken when a
//! replay of the schedule with it finishes it within `max_slowdown` times its time alone, and
//! delays no sequence already taken past its own bound.
//!
//! Steps left are counted to `max_new_tokens`; a sequence that meets a stop token leaves
//! earlier, so the prediction errs towards refusing.

use std::collections::HashMap;
use std::time::Instant;

use crate::admission::{Bound, BusyPeriod, Misprediction, PassCost, Slowdown};
use crate::error::ApiError;

/// A sequence as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Commitment {
    /// Decode steps until `max_new_tokens`.
    pub steps_left: usize,
    /// Prompt tokens still to prefill: none once it runs.
    pub prompt_tokens: usize,
    /// The latest finish it was admitted with; `None` when admitted without a prediction.
    pub promise: Option<Instant>,
}

/// What the scheduler last published (the running sequences), plus the sequences taken and not
/// yet started.
#[derive(Debug, Default)]
pub struct Board {
    pub step_times: StepTimes,
    pub prefill_cost: PassCost,
    pub running: Vec<Commitment>,
    /// Taken, not yet started, by submission number.
    pub submitted: HashMap<u64, Commitment>,
    pub submissions: u64,
    pub busy: BusyPeriod,
}

impl Board {
    /// Takes a sequence of `prompt_tokens` and `steps` (its `max_new_tokens`) when the rule
    /// allows it: its commitment and submission number, or `ApiError::Saturated`. Until a decode step and a prefill have been measured, every sequence is taken,
    /// without a promise.
    pub fn admit(
        &mut self,
        prompt_tokens: usize,
        steps: usize,
        slowdown: Slowdown,
        slots: usize,
        now: Instant,
    ) -> Result<(u64, Commitment), ApiError> {
        let mine = Commitment {
            steps_left: steps,
            prompt_tokens,
            promise: None,
        };
        let promise = match (self.step_times.predict(1), self.prefill_cost.coefficients()) {
            (Some(_), Some(_)) => {
                let costs = Costs {
                    step: &self.step_times,
                    prefill: &self.prefill_cost,
                };
                let alone = replay(&[mine], 1, &costs)[0];
                let limit = self.busy.allowed(slowdown, alone, now);
                let bound = Bound::new(now, alone, limit, self.step_times.margin());
                let taken: Vec<Commitment> = self.taken().collect();
                let without = replay(&taken, slots, &costs);
                let mut with = taken.clone();
                with.push(mine);
                let finishes = replay(&with, slots, &costs);
                let mine = bound.stretched(finishes.last().copied().unwrap_or(0.0));
                let delays_another = taken.iter().zip(&finishes).zip(&without).any(
                    |((commitment, &finish), &before)| {
                        commitment.promise.is_some_and(|promise| {
                            bound.stretched(finish) > promise.max(bound.stretched(before))
                        })
                    },
                );
                if mine > bound.latest || delays_another {
                    return Err(bound.refusal(mine));
                }
                Some(bound.latest)
            }
            _ => None,
        };
        let commitment = Commitment { promise, ..mine };
        Ok((self.take(commitment), commitment))
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
        self.prefill
            .predict(tokens as f64, f64::INFINITY)
            .unwrap_or(0.0)
    }
}

/// Seconds from now until each sequence finishes, in the order given, when the first `slots`
/// run at once and the rest take slots as they free, in order. A sequence that takes a slot
/// stalls every running one for its prefill.
pub fn replay(sequences: &[Commitment], slots: usize, cost: &impl Cost) -> Vec<f64> {
    let slots = slots.max(1);
    let mut finishes = vec![0.0; sequences.len()];
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
            active.push(next);
            next += 1;
        }
        if active.is_empty() {
            return finishes;
        }
        let steps = active.iter().map(|&i| left[i]).min().unwrap_or(0);
        now += steps as f64 * cost.step(active.len());
        active.retain(|&i| {
            left[i] -= steps;
            if left[i] == 0 {
                finishes[i] = now;
            }
            left[i] > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SLOWDOWN: Slowdown = Slowdown::new(2.0);

    /// Decode steps as measured; a prefill of 10 prompt tokens costs 1 ms; busy for a minute,
    /// so that the sustained bound holds.
    fn board(steps: &[(usize, f64)]) -> Board {
        let mut board = Board {
            busy: BusyPeriod::since(Instant::now() - Duration::from_secs(60)),
            ..Board::default()
        };
        for &(rows, seconds) in steps {
            board.step_times.observe(rows, seconds);
        }
        board.prefill_cost.observe(10.0, 0.001);
        // Predictions exact: the first steps of a fit are mispredicted wildly.
        board.step_times.misprediction = Misprediction::default();
        board
    }

    fn running(steps_left: usize, promise_in: f64, now: Instant) -> Commitment {
        Commitment {
            steps_left,
            prompt_tokens: 0,
            promise: Some(now + Duration::from_secs_f64(promise_in)),
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
            promise: None,
        });
        let finishes = replay(&sequences, 2, &PerRow);
        // Rows 2 for 10 steps (20 ms): the first ends; the third is prefilled (3 ms) and joins,
        // 5 steps of 2 rows (10 ms) end it; the second's last 5 steps run alone (5 ms).
        let expected = [0.020, 0.038, 0.033];
        for (finish, expected) in finishes.iter().zip(expected) {
            assert!((finish - expected).abs() < 1e-12, "{finishes:?}");
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
    fn on_a_gpu_like_step_new_sequences_join_the_batch() {
        // A step costs 10 ms whatever its rows.
        let mut board = board(&[(1, 0.010), (32, 0.0101)]);
        let now = Instant::now();
        let taken = (0..30)
            .filter(|_| board.admit(10, 100, SLOWDOWN, 32, now).is_ok())
            .count();
        assert_eq!(taken, 30);
    }

    #[test]
    fn on_a_cpu_like_step_a_sequence_that_would_double_another_is_refused() {
        // Steps cost in proportion to rows: a second sequence doubles the first's steps.
        let mut board = board(&[(1, 0.010), (2, 0.020)]);
        let now = Instant::now();
        // Running with 100 steps left, promised to finish within 1.5 s (1 s alone).
        board.running.push(running(100, 1.5, now));
        assert!(board.admit(10, 100, SLOWDOWN, 32, now).is_err());
        // One with a loose promise leaves room for a short sequence: 10 steps at 2 rows.
        board.running[0] = running(100, 10.0, now);
        assert!(board.admit(10, 10, SLOWDOWN, 32, now).is_ok());
    }

    #[test]
    fn noisy_steps_stretch_the_prediction_the_bound_is_checked_against() {
        let mut board = board(&[(1, 0.010), (2, 0.020)]);
        let now = Instant::now();
        // 10 steps beside a running sequence: 201 ms against 101 ms alone, within 2x...
        board.running.push(running(100, 10.0, now));
        assert!(board.admit(10, 10, SLOWDOWN, 32, now).is_ok());
        board.submitted.clear();
        // ...but not once steps have run 15 % over their predictions (a margin of 1.3).
        board.step_times.misprediction.observe(0.010, 0.0115);
        assert!(board.admit(10, 10, SLOWDOWN, 32, now).is_err());
    }

    #[test]
    fn a_sequence_that_would_wait_too_long_for_a_slot_is_refused() {
        let mut board = board(&[(1, 0.010), (8, 0.0101)]);
        let now = Instant::now();
        // One slot, taken for 500 more steps: a 100-step sequence would wait 5 s for 1 s of
        // its own work.
        board.running.push(running(500, 60.0, now));
        // It would fit 4 s later (the running one then 1 s from its end): retry then.
        assert_eq!(
            board
                .admit(10, 100, SLOWDOWN, 1, now)
                .unwrap_err()
                .to_string(),
            "the model is saturated: queuing this request would make it, or one already \
             queued, take more than 2.0x its time on an idle model; retry in 4 s"
        );
        // With a free slot it runs at once.
        assert!(board.admit(10, 100, SLOWDOWN, 2, now).is_ok());
    }

    #[test]
    fn early_in_a_busy_period_a_sequence_may_wait_to_the_burst_bound() {
        let mut board = board(&[(1, 0.010), (8, 0.0101)]);
        let now = Instant::now();
        // One slot with 150 steps left: a 100-step sequence would finish in 2.5 s against 1 s
        // alone. Busy for a minute, that is sustained load; busy for a second, a burst.
        board.running.push(running(150, 60.0, now));
        assert!(matches!(
            board.admit(10, 100, SLOWDOWN, 1, now),
            Err(ApiError::Saturated { limit: 2.0, .. })
        ));
        board.busy = BusyPeriod::since(now - Duration::from_secs(1));
        assert!(board.admit(10, 100, SLOWDOWN, 1, now).is_ok());
    }

    #[test]
    fn without_a_measured_step_everything_is_taken_without_a_promise() {
        let mut board = Board::default();
        let (_, commitment) = board.admit(10, 100, SLOWDOWN, 1, Instant::now()).unwrap();
        assert_eq!(commitment.promise, None);
        assert!(board.admit(10, 100, SLOWDOWN, 1, Instant::now()).is_ok());
    }
}
