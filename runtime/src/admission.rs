//! Admission for the model threads: whether a request is taken or refused at once (429),
//! decided before any work is spent on it.
//!
//! Two rules:
//! - a count: at most `max_concurrent_requests` admitted at once (TEI's rule; it bounds memory);
//! - time (`QueueRule`): a request is refused only when it cannot be served in time, that is
//!   when its predicted wait before it starts is longer than `max_queue_time`, or when it is
//!   predicted to end after its deadline (the `OICM-Request-Timeout` the proxy forwards, or the
//!   runtime's default).
//!
//! Two cases are never refused, whatever the predictions say. A request that starts in the next
//! pass while the model is below capacity: room in the next batch for it beside everything
//! queued, and work arriving (over the last seconds) slower than full passes take it, or the
//! running pass about to end. A burst at an idle model is one, however long its pass; for text
//! generation, a free KV-cache slot. And a request predicted to wait less than `wait_floor`: a
//! wait no client minds. Under sustained overload a place in the next pass waits for a full
//! running one, and the next pass fills up before it starts: there the predicted wait decides,
//! which keeps accepted requests within the maximum queue time of their own time.
//!
//! Both bounds are absolute. A bound relative to a request's own time (refuse what would take
//! more than twice as long as alone) is scale-free: when that time is milliseconds, a queue of
//! three breaks it, and a burst of three requests at an idle model was refused, though each
//! client would gladly have waited the milliseconds.
//!
//! Predictions come from the measured cost of a pass, learnt as passes run, as
//! `fixed + per_unit × units` (units: padded tokens for encoders, jobs for the other tasks).
//! A prediction is a mean, which about half of outcomes exceed; before it meets a bound it is
//! stretched by the measured error of past predictions (`Misprediction`): on a steady machine
//! by almost nothing, on a noisy one by enough to cover nearly all outcomes.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::executor::{Room, Shape};

/// How recent passes weigh against older ones: each pass keeps this share of the weight of
/// those before it, so the estimate follows about the last 20 passes.
const DECAY: f64 = 0.95;

/// The limits admission enforces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionLimits {
    /// Requests admitted at once (queued or running); beyond it, 429.
    pub max_concurrent_requests: usize,
    /// The time rule; `None` leaves the count alone.
    pub queue: Option<QueueRule>,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_concurrent_requests: 512,
            queue: Some(QueueRule::default()),
        }
    }
}

/// How long a request may be predicted to wait, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueRule {
    /// The longest predicted wait before a request starts (stretched by the margin).
    pub max_queue_time: f64,
    /// Predicted waits up to this are never refused; at most `max_queue_time`.
    pub wait_floor: f64,
}

impl Default for QueueRule {
    /// The encoders' defaults (see `settings`).
    fn default() -> Self {
        QueueRule {
            max_queue_time: 1.0,
            wait_floor: 0.25,
        }
    }
}

/// What a backend's cost model predicts for a request arriving now, in seconds from now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// It starts in the next pass while the model keeps up: the next pass has room for it
    /// beside everything queued, and work arrives slower than full passes take it (or the
    /// model ends its running pass within the wait floor); text generation: a sequence slot is
    /// free. A burst at an idle model is taken whole however long its pass. Under sustained
    /// overload a place in the next pass waits for a full running one, and there the
    /// predicted wait decides.
    pub starts_next: bool,
    /// Until it starts.
    pub wait: f64,
    /// Until it is done, as far as it can be known (text generation: until its first token,
    /// since how many tokens follow is not known until it stops).
    pub done: f64,
    /// The factor predictions are stretched by before they meet a bound
    /// (`Misprediction::margin`).
    pub margin: f64,
}

/// Why a request was refused: which bound its forecast broke, by how much.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the model is saturated: this request would wait about {wait:.2} s beyond its own \
         time, more than the maximum queue time of {max_queue_time} s; retry in {} s",
        self.retry_after()
    )]
    QueueTime { wait: f64, max_queue_time: f64 },
    #[error(
        "the model is saturated: this request would need about {needs:.2} s, more than the \
         {left:.2} s left before its deadline; retry in {} s",
        self.retry_after()
    )]
    Deadline { needs: f64, left: f64 },
}

impl Refusal {
    /// Arriving this much later, the request would fit if nothing else arrived meanwhile: whole
    /// seconds, as Retry-After has them, at least 1 and at most a minute.
    pub fn retry_after(&self) -> u32 {
        let late = match *self {
            Refusal::QueueTime {
                wait,
                max_queue_time,
            } => wait - max_queue_time,
            Refusal::Deadline { needs, left } => needs - left,
        };
        late.ceil().clamp(1.0, 60.0) as u32
    }
}

impl QueueRule {
    /// Takes or refuses the request `forecast` describes, which has `deadline_left` seconds
    /// left before its deadline.
    pub fn judge(&self, forecast: Forecast, deadline_left: Option<f64>) -> Result<(), Refusal> {
        if forecast.starts_next || forecast.wait <= self.wait_floor {
            return Ok(());
        }
        let wait = forecast.wait * forecast.margin;
        if wait > self.max_queue_time {
            return Err(Refusal::QueueTime {
                wait,
                max_queue_time: self.max_queue_time,
            });
        }
        let needs = forecast.done * forecast.margin;
        match deadline_left {
            Some(left) if needs > left => Err(Refusal::Deadline { needs, left }),
            _ => Ok(()),
        }
    }
}

/// Seconds from `now` to `deadline` (none once it passed).
pub fn seconds_left(deadline: Option<Instant>, now: Instant) -> Option<f64> {
    deadline.map(|deadline| seconds_between(now, deadline))
}

fn seconds_between(earlier: Instant, later: Instant) -> f64 {
    later.saturating_duration_since(earlier).as_secs_f64()
}

/// How far measured passes fall from their predictions: an exponentially weighted root mean
/// square of `measured / predicted - 1`. A bound checked against the mean prediction holds for
/// about half the requests that reach it; stretched by the margin, for nearly all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Misprediction {
    weight: f64,
    squared: f64,
}

impl Misprediction {
    pub fn observe(&mut self, predicted: f64, measured: f64) {
        if predicted > 0.0 {
            let error = measured / predicted - 1.0;
            self.weight = self.weight * DECAY + 1.0;
            self.squared = self.squared * DECAY + error * error;
        }
    }

    /// The factor that stretches a prediction over about 98 % of outcomes: 1 + 2 RMS errors
    /// (as if they were normal).
    pub fn margin(&self) -> f64 {
        if self.weight <= 0.0 {
            return 1.0;
        }
        1.0 + 2.0 * (self.squared / self.weight).sqrt()
    }
}

/// The cost of one forward pass as a function of its size, `fixed + per_unit × units`, fitted
/// by exponentially weighted least squares over recent passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassCost {
    weight: f64,
    units: f64,
    seconds: f64,
    units_squared: f64,
    units_seconds: f64,
    misprediction: Misprediction,
}

impl PassCost {
    pub fn observe(&mut self, units: f64, seconds: f64) {
        // Only the noise of a prediction the fit can make counts: a pass of a size never seen
        // before was a guess (see `coefficients`), and its error says nothing of the machine.
        if let Some(predicted) = self.predict(units)
            && (self.separates_parts() || self.is_the_size_seen(units))
        {
            self.misprediction.observe(predicted, seconds);
        }
        let keep = |sum: &mut f64, added: f64| *sum = *sum * DECAY + added;
        keep(&mut self.weight, 1.0);
        keep(&mut self.units, units);
        keep(&mut self.seconds, seconds);
        keep(&mut self.units_squared, units * units);
        keep(&mut self.units_seconds, units * seconds);
    }

    /// See `Misprediction::margin`.
    pub fn margin(&self) -> f64 {
        self.misprediction.margin()
    }

    /// `(fixed, per_unit)` seconds, or `None` before any pass has run. Passes of one size
    /// cannot tell the two parts apart; until passes of different sizes have run, a pass of
    /// any size is predicted to cost what the measured ones did. That guess errs towards
    /// taking work: charging the whole cost per unit (a CPU's case) made a burst of nine
    /// uploads, after single ones, look nine times as long as it ran, and the next request
    /// was refused on an idle model. A wrong guess here costs one slow pass at most: a queue
    /// makes the next pass bigger, and then the fit has two sizes.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        if self.weight <= 0.0 || self.units <= 0.0 {
            return None;
        }
        let mean_units = self.units / self.weight;
        let mean_seconds = self.seconds / self.weight;
        if !self.separates_parts() {
            return Some((mean_seconds, 0.0));
        }
        let variance = self.units_squared / self.weight - mean_units * mean_units;
        let covariance = self.units_seconds / self.weight - mean_units * mean_seconds;
        let per_unit = (covariance / variance).max(0.0);
        let fixed = (mean_seconds - per_unit * mean_units).max(0.0);
        Some((fixed, per_unit))
    }

    /// Whether the measured passes differ enough in size to tell the fixed cost from the
    /// cost per unit.
    fn separates_parts(&self) -> bool {
        if self.weight <= 0.0 {
            return false;
        }
        let mean_units = self.units / self.weight;
        let variance = self.units_squared / self.weight - mean_units * mean_units;
        variance > (0.05 * mean_units).powi(2)
    }

    /// Whether `units` is about the size of the passes measured so far.
    fn is_the_size_seen(&self, units: f64) -> bool {
        let mean_units = self.units / self.weight;
        (units - mean_units).abs() <= 0.05 * mean_units
    }

    /// Predicted seconds of one pass of `units`.
    pub fn predict(&self, units: f64) -> Option<f64> {
        let (fixed, per_unit) = self.coefficients()?;
        Some(fixed + per_unit * units)
    }
}

/// Rows and padded units of work.
#[derive(Debug, Clone, Copy, Default)]
struct Amount {
    rows: f64,
    units: f64,
}

impl From<Shape> for Amount {
    fn from(shape: Shape) -> Amount {
        Amount {
            rows: shape.rows as f64,
            units: shape.units() as f64,
        }
    }
}

/// The pass running now: when it started, its predicted seconds.
#[derive(Debug, Clone, Copy)]
struct Running {
    started: Instant,
    predicted: f64,
    units: f64,
}

/// Units arriving per second, an exponentially weighted average over a couple of seconds: a
/// burst barely moves it; sustained load sets it.
#[derive(Debug, Default, Clone, Copy)]
struct Arrivals {
    per_second: f64,
    last: Option<Instant>,
}

impl Arrivals {
    /// The averaging time.
    const WINDOW: f64 = 2.0;

    fn at(&self, now: Instant) -> f64 {
        self.last.map_or(0.0, |last| {
            self.per_second * (-seconds_between(last, now) / Self::WINDOW).exp()
        })
    }

    fn observe(&mut self, units: f64, now: Instant) {
        self.per_second = self.at(now) + units / Self::WINDOW;
        self.last = Some(now);
    }
}

#[derive(Debug, Default)]
struct Load {
    cost: PassCost,
    /// Admitted and not yet in a pass.
    queued: Amount,
    running: Option<Running>,
    /// Refused requests included: whether the model is below capacity.
    offered: Arrivals,
    /// What actually joins a pass that has not started yet.
    admitted: Arrivals,
}

/// The admission state one model thread shares with its HTTP handlers.
#[derive(Debug, Clone)]
pub struct Gate {
    slots: Arc<Semaphore>,
    load: Arc<Mutex<Load>>,
    limits: AdmissionLimits,
    /// What one pass holds.
    pass: Room,
}

/// A request's place among those admitted at once: taken before any work is spent on the
/// request (tokenizing included) and given back just before it is answered, so a client that
/// keeps the limit's number of requests in flight is never refused for its count.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
}

/// Work queued for the model thread; dropped when its pass starts or when the request is
/// dropped unrun, which takes it off the queue.
#[derive(Debug)]
pub struct Queued {
    load: Arc<Mutex<Load>>,
    amount: Amount,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut load = lock(&self.load);
        load.queued.rows = (load.queued.rows - self.amount.rows).max(0.0);
        load.queued.units = (load.queued.units - self.amount.units).max(0.0);
    }
}

/// A poisoned lock only means a handler panicked mid-update of plain numbers; the numbers are
/// still usable estimates.
fn lock(load: &Mutex<Load>) -> MutexGuard<'_, Load> {
    load.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Gate {
    /// `pass`: what one pass holds (the batch limits), so that a queue longer than a pass is
    /// predicted as several.
    pub fn new(limits: AdmissionLimits, pass: Room) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            load: Arc::default(),
            limits,
            pass: Room {
                rows: pass.rows.max(1),
                units: pass.units.max(1),
            },
        }
    }

    /// Takes a slot, or refuses at once when all are taken.
    pub fn admit(&self) -> Result<Admission, ApiError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map(|slot| Admission { _slot: slot })
            .map_err(|_| ApiError::Overloaded)
    }

    /// Queues a job of `shape` arriving `now` with its `deadline` when the time rule allows
    /// it, or refuses it at once.
    pub fn queue(
        &self,
        shape: Shape,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<Queued, ApiError> {
        let amount = Amount::from(shape);
        let mut load = lock(&self.load);
        load.offered.observe(amount.units, now);
        if let (Some(rule), Some(forecast)) = (self.limits.queue, self.forecast(&load, amount, now))
        {
            rule.judge(forecast, seconds_left(deadline, now))?;
        }
        load.queued.rows += amount.rows;
        load.queued.units += amount.units;
        load.admitted.observe(amount.units, now);
        Ok(Queued {
            load: self.load.clone(),
            amount,
        })
    }

    /// When `amount` queued now would start and end: behind what is left of the running pass
    /// and, in the same pass or later ones, the work already queued. `None` while no pass has
    /// been measured.
    fn forecast(&self, load: &Load, amount: Amount, now: Instant) -> Option<Forecast> {
        let (fixed, per_unit) = load.cost.coefficients()?;
        let rows = load.queued.rows + amount.rows;
        let units = load.queued.units + amount.units;
        let passes = f64::max(
            (rows / self.pass.rows as f64).ceil(),
            (units / self.pass.units as f64).ceil(),
        )
        .max(1.0);
        let running_left = load.running.map_or(0.0, |running| {
            (running.predicted - seconds_between(running.started, now)).max(0.0)
        });
        // The passes before ours are full (that is why ours is not the next), and ours takes
        // what arrives until it starts, up to its room: under sustained load it runs full too,
        // though only part of it is queued now. At the mean row width queued.
        let full_pass = (units / rows * self.pass.rows as f64).min(self.pass.units as f64);
        let full_pass_seconds = fixed + per_unit * full_pass;
        let starts_in = running_left + (passes - 1.0) * full_pass_seconds;
        let joining = load.admitted.at(now) * starts_in;
        let units = (units + joining).min(passes * full_pass).max(units);
        let done = running_left + passes * fixed + per_unit * units;
        let alone = fixed + per_unit * amount.units;
        let below_capacity = load.offered.at(now) * full_pass_seconds <= full_pass;
        let about_idle = running_left <= self.limits.queue.map_or(0.0, |rule| rule.wait_floor);
        Some(Forecast {
            starts_next: passes <= 1.0 && (below_capacity || about_idle),
            wait: (done - alone).max(0.0),
            done,
            margin: load.cost.margin(),
        })
    }

    /// A pass of `units` started on the model thread at `now`.
    pub fn pass_started(&self, units: usize, now: Instant) {
        let mut load = lock(&self.load);
        let units = units as f64;
        let predicted = load.cost.predict(units).unwrap_or(0.0);
        load.running = Some(Running {
            started: now,
            predicted,
            units,
        });
    }

    /// The running pass ended at `now`: its time goes into the cost estimate.
    pub fn pass_ended(&self, now: Instant) {
        let mut load = lock(&self.load);
        if let Some(running) = load.running.take() {
            load.cost
                .observe(running.units, seconds_between(running.started, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The tests' clock: one fixed instant, which later ones are offsets from, so that no test
    /// depends on how fast the machine runs it.
    fn now() -> Instant {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *START.get_or_init(Instant::now)
    }

    fn after(seconds: f64) -> Instant {
        now() + Duration::from_secs_f64(seconds)
    }

    /// The cost fitted to `passes`, its predictions taken as exact (the fit of a few passes
    /// mispredicts the first ones wildly).
    fn fitted(passes: &[(f64, f64)]) -> PassCost {
        let mut cost = PassCost::default();
        for &(units, seconds) in passes {
            cost.observe(units, seconds);
        }
        cost.misprediction = Misprediction::default();
        cost
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    const RULE: QueueRule = QueueRule {
        max_queue_time: 1.0,
        wait_floor: 0.25,
    };

    fn forecast(wait: f64, done: f64) -> Forecast {
        Forecast {
            starts_next: false,
            wait,
            done,
            margin: 1.0,
        }
    }

    #[test]
    fn a_wait_under_the_floor_is_never_refused_whatever_the_deadline() {
        assert_eq!(RULE.judge(forecast(0.2, 0.3), Some(0.1)), Ok(()));
        assert!(RULE.judge(forecast(0.3, 0.4), Some(0.1)).is_err());
    }

    #[test]
    fn a_request_that_starts_in_the_next_pass_is_never_refused() {
        let next = Forecast {
            starts_next: true,
            ..forecast(5.0, 6.0)
        };
        assert_eq!(RULE.judge(next, Some(0.1)), Ok(()));
    }

    #[test]
    fn a_wait_longer_than_the_maximum_queue_time_is_refused_with_when_to_retry() {
        assert_eq!(RULE.judge(forecast(0.9, 1.0), None), Ok(()));
        let refusal = RULE.judge(forecast(3.5, 3.6), None).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::QueueTime {
                wait: 3.5,
                max_queue_time: 1.0
            }
        );
        assert_eq!(refusal.retry_after(), 3, "2.5 s later it would fit");
        assert_eq!(
            refusal.to_string(),
            "the model is saturated: this request would wait about 3.50 s beyond its own \
             time, more than the maximum queue time of 1 s; retry in 3 s"
        );
    }

    #[test]
    fn a_request_that_would_end_after_its_deadline_is_refused() {
        let refusal = RULE.judge(forecast(0.5, 2.0), Some(1.5)).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Deadline {
                needs: 2.0,
                left: 1.5
            }
        );
        assert_eq!(refusal.retry_after(), 1, "at least a second");
        assert_eq!(RULE.judge(forecast(0.5, 2.0), Some(2.5)), Ok(()));
    }

    #[test]
    fn predictions_are_stretched_by_their_measured_error_before_meeting_a_bound() {
        let noisy = Forecast {
            margin: 1.5,
            ..forecast(0.8, 0.9)
        };
        assert!(matches!(
            RULE.judge(noisy, None),
            Err(Refusal::QueueTime { wait, .. }) if close(wait, 1.2)
        ));
        // The floor judges the prediction itself: noise never refuses a short wait.
        let short = Forecast {
            margin: 10.0,
            ..forecast(0.2, 0.3)
        };
        assert_eq!(RULE.judge(short, Some(1.0)), Ok(()));
    }

    #[test]
    fn a_fixed_plus_linear_cost_is_recovered_from_passes_of_different_sizes() {
        let cost = fitted(&[(10.0, 0.012), (40.0, 0.018), (20.0, 0.014), (80.0, 0.026)]);
        let (fixed, per_unit) = cost.coefficients().unwrap();
        assert!(close(fixed, 0.010), "{fixed}");
        assert!(close(per_unit, 0.0002), "{per_unit}");
    }

    #[test]
    fn after_passes_of_one_size_a_pass_of_any_size_is_predicted_to_cost_the_same() {
        let cost = fitted(&[(1.0, 0.5), (1.0, 0.5)]);
        assert_eq!(cost.coefficients(), Some((0.5, 0.0)));
        assert_eq!(cost.predict(9.0), Some(0.5));
    }

    #[test]
    fn a_guess_at_an_unseen_size_does_not_count_as_noise() {
        let mut cost = PassCost::default();
        for _ in 0..8 {
            cost.observe(1.0, 0.5);
        }
        // Nine uploads in a pass, after single ones: 1.7 s where 0.5 s was guessed.
        cost.observe(9.0, 1.7);
        assert_eq!(
            cost.margin(),
            1.0,
            "the fit's ignorance, not the machine's noise"
        );
        // Now the fit has two sizes: its errors are the machine's.
        cost.observe(5.0, 2.0);
        assert!(cost.margin() > 1.0);
    }

    #[test]
    fn a_pass_of_the_size_seen_that_runs_long_counts_as_noise() {
        let mut cost = PassCost::default();
        cost.observe(1.0, 0.5);
        cost.observe(1.0, 1.0);
        assert!(close(cost.margin(), 3.0), "{}", cost.margin());
    }

    #[test]
    fn nothing_is_predicted_before_a_pass_has_run() {
        assert_eq!(PassCost::default().predict(10.0), None);
    }

    #[test]
    fn the_margin_covers_passes_that_run_long_now_and_then() {
        let mut misprediction = Misprediction::default();
        assert_eq!(misprediction.margin(), 1.0, "nothing measured: no margin");
        for measured in [0.009, 0.011, 0.009, 0.011] {
            misprediction.observe(0.010, measured);
        }
        // 10 % off each time: two RMS errors.
        assert!(
            close(misprediction.margin(), 1.2),
            "{}",
            misprediction.margin()
        );
    }

    /// A gate whose passes hold `rows` rows of up to 16384 units, with the time rule `RULE`,
    /// that has timed `passes`.
    fn measured_gate(rows: usize, passes: &[(f64, f64)]) -> Gate {
        let gate = Gate::new(
            AdmissionLimits {
                max_concurrent_requests: 512,
                queue: Some(RULE),
            },
            Room { rows, units: 16384 },
        );
        lock(&gate.load).cost = fitted(passes);
        gate
    }

    /// Work arriving until `until` at `offered` units a second, of which the model takes
    /// `admitted`: sustained load.
    fn sustained(gate: &Gate, offered: f64, admitted: f64, until: Instant) {
        let mut load = lock(&gate.load);
        load.offered = Arrivals {
            per_second: offered,
            last: Some(until),
        };
        load.admitted = Arrivals {
            per_second: admitted,
            last: Some(until),
        };
    }

    /// How many one-row requests of 64 units the gate queues in a row, arriving `now`.
    fn queued_in_a_row(gate: &Gate, deadline: Option<Instant>) -> usize {
        let queued: Vec<Queued> = (0..10_000)
            .map_while(|_| gate.queue(shape(1, 64), deadline, now()).ok())
            .collect();
        queued.len()
    }

    fn shape(rows: usize, width: usize) -> Shape {
        Shape { rows, width }
    }

    #[test]
    fn on_a_cpu_like_cost_requests_queue_up_to_the_maximum_queue_time() {
        // 12 ms per 64-unit request, one request per pass: the k-th waits (k - 1) × 12 ms.
        // Within 1 s: 84 of them.
        let gate = measured_gate(1, &[(64.0, 0.012), (128.0, 0.024)]);
        assert_eq!(queued_in_a_row(&gate, None), 84);
    }

    #[test]
    fn a_pass_that_starts_later_is_predicted_to_take_what_arrives_until_then() {
        // Four rows a pass, 10 ms per 64-unit row; the running pass ends in 100 ms.
        let gate = measured_gate(4, &[(64.0, 0.010), (128.0, 0.020)]);
        gate.pass_started(640, now());
        let forecast = |units_per_second: f64| {
            let mut load = lock(&gate.load);
            load.admitted = Arrivals {
                per_second: units_per_second,
                last: Some(now()),
            };
            gate.forecast(&load, shape(1, 64).into(), now()).unwrap()
        };
        // A row arrives every 100 ms: one joins before the pass starts, and the pass of two
        // rows ends 20 ms after it starts.
        let light = forecast(640.0);
        assert!(close(light.done, 0.120), "{light:?}");
        assert!(close(light.wait, 0.110), "{light:?}");
        // Ten times as fast: the pass fills, four rows, 40 ms.
        let heavy = forecast(6400.0);
        assert!(close(heavy.done, 0.140), "{heavy:?}");
    }

    #[test]
    fn the_passes_before_ours_are_full_and_ours_fills_while_they_run() {
        // Four rows a pass, 10 ms per 64-unit row. Behind four queued requests (the next pass),
        // a fifth starts the pass after, 40 ms from now; at a row per 10 ms the three rows it
        // has room for join it by then: it ends after two full passes, 80 ms.
        let gate = measured_gate(4, &[(64.0, 0.010), (128.0, 0.020)]);
        let _queued: Vec<Queued> = (0..4)
            .map(|_| gate.queue(shape(1, 64), None, now()).unwrap())
            .collect();
        let mut load = lock(&gate.load);
        load.admitted = Arrivals {
            per_second: 6400.0,
            last: Some(now()),
        };
        let fifth = gate.forecast(&load, shape(1, 64).into(), now()).unwrap();
        assert!(!fifth.starts_next);
        assert!(close(fifth.done, 0.080), "{fifth:?}");
        assert!(close(fifth.wait, 0.070), "{fifth:?}");
    }

    #[test]
    fn arrivals_are_averaged_over_a_couple_of_seconds() {
        let mut arrivals = Arrivals::default();
        assert_eq!(arrivals.at(now()), 0.0);
        for tick in 0..600 {
            arrivals.observe(64.0, after(f64::from(tick) * 0.01));
        }
        // 6400 units a second for six seconds: the average is close to it.
        let rate = arrivals.at(after(5.99));
        assert!((5800.0..=6700.0).contains(&rate), "{rate}");
        assert!(
            arrivals.at(after(16.0)) < 0.01 * rate,
            "it fades when arrivals stop"
        );
        let mut burst = Arrivals::default();
        for _ in 0..32 {
            burst.observe(64.0, now());
        }
        assert_eq!(burst.at(now()), 1024.0, "a burst counts over the window");
    }

    #[test]
    fn a_burst_that_fits_one_pass_is_taken_however_slow_the_pass() {
        // A pass of 64 rows costs 64 × 100 ms: 6.4 s, far beyond the maximum queue time. The
        // burst's first request runs alone (100 ms, within the wait floor); the rest fill the
        // next pass.
        let gate = measured_gate(64, &[(64.0, 0.100), (128.0, 0.200)]);
        gate.pass_started(64, now());
        assert_eq!(queued_in_a_row(&gate, None), 64);
    }

    #[test]
    fn clients_sending_again_behind_a_bigger_pass_than_any_measured_are_taken() {
        // Ten clients of a speech model, each sending its next upload once answered: their
        // uploads ran one at a time so far (0.5 s, then 1.5 s on a busy machine), then nine
        // at once; the ten send again while those nine run.
        let gate = Gate::new(
            AdmissionLimits {
                max_concurrent_requests: 512,
                queue: Some(QueueRule {
                    max_queue_time: 30.0,
                    wait_floor: 0.25,
                }),
            },
            Room {
                rows: 64,
                units: 64,
            },
        );
        {
            let mut load = lock(&gate.load);
            load.cost.observe(1.0, 0.5);
            load.cost.observe(1.0, 1.5);
        }
        gate.pass_started(9, now());
        sustained(&gate, 5.0, 5.0, now());
        let queued: Vec<Queued> = (0..10)
            .map_while(|_| gate.queue(Shape::ONE, None, now()).ok())
            .collect();
        assert_eq!(queued.len(), 10);
    }

    #[test]
    fn under_sustained_overload_a_place_in_the_next_pass_is_judged_by_its_wait() {
        // Twice the capacity offered (a full pass, 64 rows × 100 ms, every 6.4 s), as much as
        // it takes admitted. A request that fits the next pass still waits for the running
        // one, and more join its pass before it starts.
        let gate = measured_gate(64, &[(64.0, 0.100), (128.0, 0.200)]);
        gate.pass_started(64 * 64, now());
        sustained(&gate, 1280.0, 640.0, now());
        assert!(gate.queue(shape(1, 64), None, now()).is_err());
        sustained(&gate, 1280.0, 640.0, after(6.0));
        assert!(
            gate.queue(shape(1, 64), None, after(6.0)).is_ok(),
            "0.4 s left of the running pass, and 4 rows join in that time: a wait of 0.8 s"
        );
    }

    #[test]
    fn below_capacity_a_place_in_the_next_pass_is_taken_while_a_long_pass_runs() {
        // A full pass, 64 rows × 100 ms, takes 640 units a second; half that arrives.
        let gate = measured_gate(64, &[(64.0, 0.100), (128.0, 0.200)]);
        gate.pass_started(64 * 64, now());
        sustained(&gate, 320.0, 320.0, now());
        assert!(gate.queue(shape(1, 64), None, now()).is_ok());
    }

    #[test]
    fn on_a_gpu_like_cost_requests_keep_joining_batches() {
        // A pass costs 10 ms whatever its size, up to 64 rows: 1 s holds 100 passes.
        let gate = measured_gate(64, &[(64.0, 0.010), (4096.0, 0.0101)]);
        let queued = queued_in_a_row(&gate, None);
        assert!((6000..=6500).contains(&queued), "{queued}");
    }

    #[test]
    fn a_short_deadline_refuses_once_the_wait_passes_the_floor() {
        // 12 ms per request, one per pass, 0.5 s left: the floor (0.25 s) takes 21 requests
        // whatever their deadline; after it, each must end within 0.5 s, which 41 do.
        let gate = measured_gate(1, &[(64.0, 0.012), (128.0, 0.024)]);
        assert_eq!(queued_in_a_row(&gate, Some(after(0.5))), 41);
    }

    #[test]
    fn the_running_pass_counts_until_its_predicted_end() {
        let gate = measured_gate(1, &[(64.0, 0.100), (128.0, 0.200)]);
        // A pass predicted to take 2 s, under sustained overload.
        gate.pass_started(1280, now());
        sustained(&gate, 1280.0, 640.0, now());
        assert!(
            gate.queue(shape(1, 64), None, now()).is_err(),
            "a wait of 2 s"
        );
        sustained(&gate, 1280.0, 640.0, after(1.5));
        let _next = gate
            .queue(shape(1, 64), None, after(1.5))
            .expect("0.5 s left of the running pass: a wait of 0.5 s");
        assert!(
            gate.queue(shape(1, 64), None, after(1.5)).is_ok(),
            "behind the one queued: a wait of 0.6 s"
        );
    }

    #[test]
    fn a_refused_request_leaves_nothing_queued_and_a_dropped_one_takes_its_work_along() {
        let gate = measured_gate(1, &[(64.0, 0.120), (128.0, 0.240)]);
        let queued: Vec<Queued> = (0..20)
            .map_while(|_| gate.queue(shape(1, 64), None, now()).ok())
            .collect();
        assert_eq!(queued.len(), 9, "waits of 0 to 0.96 s");
        assert!(gate.queue(shape(1, 64), None, now()).is_err());
        assert_eq!(lock(&gate.load).queued.rows, 9.0);
        drop(queued);
        let _again = gate.queue(shape(1, 64), None, now()).unwrap();
        assert_eq!(lock(&gate.load).queued.rows, 1.0);
    }

    #[test]
    fn without_the_time_rule_only_the_count_refuses() {
        let gate = Gate::new(
            AdmissionLimits {
                max_concurrent_requests: 1,
                queue: None,
            },
            Room { rows: 1, units: 1 },
        );
        lock(&gate.load).cost = fitted(&[(1.0, 10.0)]);
        let _queued: Vec<Queued> = (0..100)
            .map(|_| gate.queue(Shape::ONE, None, now()).unwrap())
            .collect();
        let _slot = gate.admit().unwrap();
        assert!(gate.admit().is_err());
    }
}
