//! Admission for the model threads: a request is refused at once (429) rather than queued when
//! taking it would make it, or the requests already taken, wait too long.
//!
//! Two rules, both checked before any work is spent on the request:
//! - a count: at most `max_concurrent_requests` admitted at once (TEI's rule; it bounds memory);
//! - a predicted slowdown: a request is queued only when its predicted completion time, behind
//!   the pass running now and the work already queued, is at most `max_slowdown` times what it
//!   would take on an idle model thread, and when it makes no request already queued (which it
//!   would share a pass with) finish later than that request's own bound.
//!
//! A count alone cannot hold latency: on a CPU a batch costs about what its rows cost one after
//! another, so N requests admitted at once wait for about N-1 others, while on a GPU a batch of
//! 64 costs about what one does. The cost of a pass is therefore learnt as it runs, as
//! `fixed + per_unit × units` (units: padded tokens for encoders, jobs for the other tasks), and
//! the rule follows the hardware: on a GPU the fixed part dominates and requests keep joining
//! batches; on a CPU the queue stays about one request deep and the model thread stays busy.
//!
//! Predictions are means; a bound checked against the mean holds for about half of the
//! requests that reach it. Each pass is therefore also compared with its prediction, and the
//! predicted finish is stretched by the measured error (`Misprediction`) before it meets the
//! bound: on a steady machine by almost nothing, on a noisy one by enough to cover nearly all.
//!
//! The bound is looser early in a busy period. Requests arriving at random bunch up now and
//! then even when the model keeps up on average, and a model that keeps up drains such a
//! bunch soon; refusing it would shed traffic at half load. Once the model has been busy
//! without a break for several times a request's time alone, the queue is one it does not
//! drain, and the sustained bound holds (`BusyPeriod`).
//!
//! Passes of one size cannot tell the two parts apart, and uniform requests under this rule
//! make passes of one size. Until passes of different sizes have run, the whole cost is
//! charged per unit (the cautious guess, a CPU's), and now and then one request the rule would
//! refuse is let in to share a pass with a queued one: a probe. On a GPU the first probe shows
//! batches to be cheap and they grow from then on; on a CPU probes grow rarer (16 passes
//! apart, then 32, ... up to 4096), so they touch a negligible share of requests.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// How recent passes weigh against older ones: each pass keeps this share of the weight of
/// those before it, so the estimate follows about the last 20 passes.
const DECAY: f64 = 0.95;

/// A busy period counts as sustained load, not a burst, once it has lasted this many times the
/// arriving request's time alone.
const SUSTAINED_AFTER: f64 = 8.0;

/// The limits admission enforces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionLimits {
    /// Requests admitted at once (queued or running); beyond it, 429.
    pub max_concurrent_requests: usize,
    /// The largest predicted completion time over idle time a request is queued at; `None`
    /// turns the rule off.
    pub max_slowdown: Option<Slowdown>,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_concurrent_requests: 512,
            max_slowdown: Some(Slowdown::new(2.0)),
        }
    }
}

/// Predicted completion time over time on an idle model, at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slowdown {
    /// Once the model has been busy for `SUSTAINED_AFTER` times a request's time alone.
    pub sustained: f64,
    /// Earlier in a busy period.
    pub burst: f64,
}

impl Slowdown {
    /// `sustained`, with bursts allowed twice as much.
    pub const fn new(sustained: f64) -> Slowdown {
        Slowdown {
            sustained,
            burst: 2.0 * sustained,
        }
    }
}

/// When the model last started to work without a break: what tells a burst from load it does
/// not keep up with.
#[derive(Debug, Default)]
pub struct BusyPeriod {
    began: Option<Instant>,
    idle_since: Option<Instant>,
}

impl BusyPeriod {
    #[cfg(test)]
    pub fn since(began: Instant) -> BusyPeriod {
        BusyPeriod {
            began: Some(began),
            idle_since: None,
        }
    }

    /// The model ran out of work.
    pub fn went_idle(&mut self, now: Instant) {
        self.idle_since.get_or_insert(now);
    }

    /// The slowdown a request that takes `alone` seconds on an idle model may be queued at,
    /// arriving `now`. A rest shorter than the request's own time does not end a busy period:
    /// a client that hesitates is not a model catching up.
    pub fn allowed(&mut self, slowdown: Slowdown, alone: f64, now: Instant) -> f64 {
        let rested = self
            .idle_since
            .take()
            .map(|since| seconds_between(since, now));
        if self.began.is_none() || rested.is_some_and(|rested| rested >= alone) {
            self.began = Some(now);
        }
        match self.began {
            Some(began) if seconds_between(began, now) < SUSTAINED_AFTER * alone => slowdown.burst,
            _ => slowdown.sustained,
        }
    }
}

/// The bound one request is checked against: its latest finish, which predictions meet only
/// once stretched by the margin (see `Misprediction`). What an idle model would take is never
/// refused, however noisy its passes: the bound is at least the stretched time alone.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    now: Instant,
    limit: f64,
    margin: f64,
    pub latest: Instant,
}

impl Bound {
    /// For a request taking `alone` seconds on an idle model, arriving `now`, held to `limit`
    /// times that.
    pub fn new(now: Instant, alone: f64, limit: f64, margin: f64) -> Bound {
        Bound {
            now,
            limit,
            margin,
            latest: now + Duration::from_secs_f64(limit.max(margin) * alone),
        }
    }

    /// When something predicted to take `seconds` from now is taken to end.
    pub fn stretched(&self, seconds: f64) -> Instant {
        self.now + Duration::from_secs_f64(seconds * self.margin)
    }

    /// The refusal of a request that would finish at `finish`: arriving `finish - latest`
    /// later, it would fit if nothing else arrived meanwhile, so that is when to retry (whole
    /// seconds, as Retry-After has them: at least 1, at most a minute).
    pub fn refusal(&self, finish: Instant) -> ApiError {
        let late = seconds_between(self.latest, finish);
        ApiError::Saturated {
            limit: self.limit,
            retry_after: late.ceil().clamp(1.0, 60.0) as u32,
        }
    }
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
        if let Some(predicted) = self.predict(units, f64::INFINITY) {
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

    /// Whether recent passes differ enough in size to tell the fixed cost from the per-unit.
    fn has_spread(&self) -> bool {
        self.spread().is_some()
    }

    /// `(mean units, mean seconds, variance of units)` when the spread is enough for a fit.
    fn spread(&self) -> Option<(f64, f64, f64)> {
        if self.weight <= 0.0 {
            return None;
        }
        let mean_units = self.units / self.weight;
        let mean_seconds = self.seconds / self.weight;
        let variance = self.units_squared / self.weight - mean_units * mean_units;
        (variance > (0.05 * mean_units).powi(2)).then_some((mean_units, mean_seconds, variance))
    }

    /// `(fixed, per_unit)` seconds, or `None` before any pass has run.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        if self.weight <= 0.0 || self.units <= 0.0 {
            return None;
        }
        let Some((mean_units, mean_seconds, variance)) = self.spread() else {
            return Some((0.0, self.seconds / self.units));
        };
        let covariance = self.units_seconds / self.weight - mean_units * mean_seconds;
        let per_unit = (covariance / variance).max(0.0);
        let fixed = (mean_seconds - per_unit * mean_units).max(0.0);
        Some((fixed, per_unit))
    }

    /// Predicted seconds of passes covering `units`, at most `units_per_pass` each.
    pub fn predict(&self, units: f64, units_per_pass: f64) -> Option<f64> {
        let (fixed, per_unit) = self.coefficients()?;
        let passes = (units / units_per_pass.max(1.0)).ceil().max(1.0);
        Some(passes * fixed + per_unit * units)
    }
}

#[derive(Debug, Default)]
struct Load {
    cost: PassCost,
    /// Units admitted and not yet in a pass.
    queued: f64,
    /// When the running pass started, and how long it was predicted to take.
    running: Option<(Instant, f64)>,
    running_units: f64,
    /// The latest finish each queued request was admitted with, earliest first (the number
    /// tells requests with the same instant apart).
    promised: BTreeSet<(Instant, u64)>,
    busy: BusyPeriod,
    admitted_total: u64,
    passes: u64,
    probes: u32,
    next_probe_at: u64,
}

/// Passes between probes: 16 after the first, doubling up to 4096.
fn probe_interval(probes: u32) -> u64 {
    16 << probes.min(8)
}

/// The admission state one model thread shares with its HTTP handlers.
#[derive(Debug, Clone)]
pub struct Gate {
    slots: Arc<Semaphore>,
    load: Arc<Mutex<Load>>,
    limits: AdmissionLimits,
    units_per_pass: f64,
}

/// A request's place among those admitted at once: taken before any work is spent on the
/// request (tokenizing included) and given back just before it is answered, so a client that
/// keeps the limit's number of requests in flight is never refused for its count.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
}

/// Units queued for the model thread; dropped when their pass starts or when the request is
/// dropped unrun, which takes them off the queue.
#[derive(Debug)]
pub struct Queued {
    load: Arc<Mutex<Load>>,
    units: f64,
    promise: Option<(Instant, u64)>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut load = lock(&self.load);
        load.queued = (load.queued - self.units).max(0.0);
        if let Some(promise) = self.promise {
            load.promised.remove(&promise);
        }
    }
}

/// A poisoned lock only means a handler panicked mid-update of plain numbers; the numbers are
/// still usable estimates.
fn lock(load: &Mutex<Load>) -> MutexGuard<'_, Load> {
    load.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Gate {
    /// `units_per_pass`: the most units one pass takes (the batch limit), so that a queue
    /// longer than a pass is predicted as several.
    pub fn new(limits: AdmissionLimits, units_per_pass: usize) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            load: Arc::default(),
            limits,
            units_per_pass: units_per_pass.max(1) as f64,
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

    /// Queues `units` of work arriving `now` when the slowdown rule allows it, or refuses at
    /// once.
    pub fn queue(&self, units: usize, now: Instant) -> Result<Queued, ApiError> {
        let units = units as f64;
        let mut load = lock(&self.load);
        let promise = match (self.limits.max_slowdown, self.predict(&load, units, now)) {
            (Some(slowdown), Some((alone, finish))) => {
                let limit = load.busy.allowed(slowdown, alone, now);
                let bound = Bound::new(now, alone, limit, load.cost.margin());
                let finish = bound.stretched(finish);
                let earliest_promise = load.promised.first().map(|&(at, _)| at);
                if finish > bound.latest || earliest_promise.is_some_and(|at| finish > at) {
                    if !self.may_probe(&load, units) {
                        return Err(bound.refusal(finish));
                    }
                    load.next_probe_at = load.passes + probe_interval(load.probes);
                    load.probes += 1;
                    None
                } else {
                    load.admitted_total += 1;
                    let promise = (bound.latest, load.admitted_total);
                    load.promised.insert(promise);
                    Some(promise)
                }
            }
            _ => None,
        };
        load.queued += units;
        Ok(Queued {
            load: self.load.clone(),
            units,
            promise,
        })
    }

    /// Whether a request the rule refuses may go in as a probe: the cost has no fit yet, the
    /// probe is due, and it would share the next pass with a queued request.
    fn may_probe(&self, load: &Load, units: f64) -> bool {
        !load.cost.has_spread()
            && load.passes >= load.next_probe_at
            && load.queued > 0.0
            && load.queued + units <= self.units_per_pass
    }

    /// Seconds `units` take on an idle model thread, and seconds until they would be done if
    /// queued now; `None` while nothing has been measured.
    fn predict(&self, load: &Load, units: f64, now: Instant) -> Option<(f64, f64)> {
        let alone = load.cost.predict(units, self.units_per_pass)?;
        let running_left = load.running.map_or(0.0, |(started, predicted)| {
            (predicted - seconds_between(started, now)).max(0.0)
        });
        let finish = running_left
            + load
                .cost
                .predict(load.queued + units, self.units_per_pass)?;
        Some((alone, finish))
    }

    /// A pass of `units` started on the model thread at `now`.
    pub fn pass_started(&self, units: usize, now: Instant) {
        let mut load = lock(&self.load);
        let predicted = load
            .cost
            .predict(units as f64, self.units_per_pass)
            .unwrap_or(0.0);
        load.running = Some((now, predicted));
        load.running_units = units as f64;
    }

    /// The running pass ended at `now`: its time goes into the cost estimate.
    pub fn pass_ended(&self, now: Instant) {
        let mut load = lock(&self.load);
        let Some((started, _)) = load.running.take() else {
            return;
        };
        let units = std::mem::take(&mut load.running_units);
        load.passes += 1;
        load.cost.observe(units, seconds_between(started, now));
        if load.queued <= 0.0 {
            load.busy.went_idle(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' clock: one fixed instant, which later ones are offsets from, so that no test
    /// depends on how fast the machine runs it.
    fn now() -> Instant {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        // An hour ahead, so that instants a minute earlier exist on a freshly booted machine.
        *START.get_or_init(|| Instant::now() + Duration::from_secs(3600))
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

    #[test]
    fn a_fixed_plus_linear_cost_is_recovered_from_passes_of_different_sizes() {
        let cost = fitted(&[(10.0, 0.012), (40.0, 0.018), (20.0, 0.014), (80.0, 0.026)]);
        let (fixed, per_unit) = cost.coefficients().unwrap();
        assert!(close(fixed, 0.010), "{fixed}");
        assert!(close(per_unit, 0.0002), "{per_unit}");
    }

    #[test]
    fn passes_of_one_size_are_charged_per_unit() {
        let cost = fitted(&[(32.0, 0.008), (32.0, 0.008)]);
        let (fixed, per_unit) = cost.coefficients().unwrap();
        assert_eq!(fixed, 0.0);
        assert!(close(per_unit, 0.008 / 32.0));
    }

    #[test]
    fn nothing_is_predicted_before_a_pass_has_run() {
        assert_eq!(PassCost::default().predict(10.0, 100.0), None);
    }

    #[test]
    fn a_queue_longer_than_a_pass_is_predicted_as_several_passes() {
        let cost = fitted(&[(10.0, 0.012), (40.0, 0.018), (20.0, 0.014), (80.0, 0.026)]);
        let one = cost.predict(100.0, 100.0).unwrap();
        let three = cost.predict(300.0, 100.0).unwrap();
        assert!(close(three - 3.0 * one, 0.0), "{one} {three}");
    }

    /// A gate that has timed `passes` and has been busy for a minute: the sustained bound holds.
    fn measured_gate(max_slowdown: f64, passes: &[(f64, f64)]) -> Gate {
        let gate = Gate::new(
            AdmissionLimits {
                max_concurrent_requests: 512,
                max_slowdown: Some(Slowdown::new(max_slowdown)),
            },
            16384,
        );
        let mut load = lock(&gate.load);
        load.cost = fitted(passes);
        load.busy = BusyPeriod::since(seconds_ago(60.0));
        // Probes have their own test.
        load.next_probe_at = u64::MAX;
        drop(load);
        gate
    }

    fn seconds_ago(seconds: f64) -> Instant {
        now() - Duration::from_secs_f64(seconds)
    }

    /// A pass of 10 ms per 64 units is running with 5 ms left, on a model busy since `began`.
    fn gate_busy_since(began: Instant) -> Gate {
        let gate = measured_gate(2.0, &[(64.0, 0.010), (128.0, 0.020)]);
        let mut load = lock(&gate.load);
        load.busy = BusyPeriod::since(began);
        load.running = Some((now(), 0.005));
        drop(load);
        gate
    }

    /// How many requests of 64 units the gate queues in a row.
    fn queued_in_a_row(gate: &Gate) -> usize {
        let queued: Vec<Queued> = (0..10).map_while(|_| gate.queue(64, now()).ok()).collect();
        queued.len()
    }

    #[test]
    fn early_in_a_busy_period_requests_queue_to_the_burst_bound() {
        // They would finish in 15, 25, 35 and 45 ms: within 4x their 10 ms, three; within 2x,
        // one.
        assert_eq!(queued_in_a_row(&gate_busy_since(seconds_ago(0.010))), 3);
        assert_eq!(queued_in_a_row(&gate_busy_since(seconds_ago(60.0))), 1);
    }

    #[test]
    fn a_busy_period_is_sustained_load_after_eight_times_a_request() {
        assert_eq!(queued_in_a_row(&gate_busy_since(seconds_ago(0.079))), 3);
        assert_eq!(queued_in_a_row(&gate_busy_since(seconds_ago(0.081))), 1);
    }

    #[test]
    fn a_model_that_rested_longer_than_a_request_starts_a_new_busy_period() {
        // 1 ms a pass plus 9 ms per 64 units; nothing running. Requests in a row would finish
        // in 10, 19, 28, 37 and 46 ms: four within the burst bound, two within the sustained.
        let rested = |seconds: f64| {
            let gate = measured_gate(2.0, &[(64.0, 0.010), (128.0, 0.019)]);
            lock(&gate.load).busy.went_idle(seconds_ago(seconds));
            queued_in_a_row(&gate)
        };
        assert_eq!(rested(1.0), 4);
        assert_eq!(
            rested(0.005),
            2,
            "a 5 ms rest: still the minute-long busy period"
        );
    }

    #[test]
    fn a_rest_shorter_than_a_request_does_not_end_a_busy_period() {
        let mut busy = BusyPeriod::default();
        let slowdown = Slowdown::new(2.0);
        let start = now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(busy.allowed(slowdown, 0.010, at(0)), 4.0, "a fresh start");
        busy.went_idle(at(85));
        assert_eq!(
            busy.allowed(slowdown, 0.010, at(90)),
            2.0,
            "a 5 ms rest: busy for 90 ms"
        );
        busy.went_idle(at(100));
        assert_eq!(busy.allowed(slowdown, 0.010, at(110)), 4.0, "rested 10 ms");
    }

    #[test]
    fn on_a_cpu_like_cost_one_request_waits_behind_the_running_pass() {
        // Cost proportional to tokens: waiting for a running pass of its own size doubles a
        // request's time; a second one queued would triple the last one's.
        let gate = measured_gate(2.0, &[(64.0, 0.010), (128.0, 0.020)]);
        lock(&gate.load).running = Some((now(), 0.010));
        let first = gate.queue(64, now()).unwrap();
        assert_eq!(
            gate.queue(64, now()).unwrap_err().to_string(),
            "the model is saturated: queuing this request would make it, or one already \
             queued, take more than 2.0x its time on an idle model; retry in 1 s"
        );
        drop(first);
        assert!(
            gate.queue(64, now()).is_ok(),
            "units leave the queue with their guard"
        );
    }

    #[test]
    fn a_request_that_would_delay_a_queued_one_past_its_bound_is_refused() {
        // 100 ms per 64 units. The first request waits behind a pass with 60 ms left: done in
        // 160 ms, within its 200 ms. A second of 128 units would be done in 360 ms, within its
        // own 400 ms, but it shares the first's pass and would make the first take 360 ms.
        let gate = measured_gate(2.0, &[(64.0, 0.100), (128.0, 0.200)]);
        lock(&gate.load).running = Some((now(), 0.060));
        let first = gate.queue(64, now()).unwrap();
        assert!(gate.queue(128, now()).is_err());
        drop(first);
        assert!(
            gate.queue(128, now()).is_ok(),
            "alone behind the pass, it is within its bound"
        );
    }

    /// The default limits without a burst bound: the probe tests' passes take microseconds,
    /// which would make their busy periods bursts or not depending on the machine.
    fn without_bursts() -> AdmissionLimits {
        AdmissionLimits {
            max_slowdown: Some(Slowdown {
                sustained: 2.0,
                burst: 2.0,
            }),
            ..AdmissionLimits::default()
        }
    }

    #[test]
    fn a_refused_request_is_let_in_now_and_then_to_learn_what_a_bigger_pass_costs() {
        let gate = Gate::new(without_bursts(), 16384);
        let mut sizes = Vec::new();
        for pass in 0..2000 {
            // Uniform passes of 10 ms: a running one, one request queued, and one more arriving.
            let start = after(0.010 * f64::from(pass));
            let queued = gate.queue(64, start).unwrap();
            gate.pass_started(64, start);
            let probe = gate.queue(64, start).ok();
            gate.pass_ended(start + Duration::from_millis(10));
            if probe.is_some() {
                sizes.push(pass);
            }
            drop((queued, probe));
        }
        // Nothing is refused before the first pass is timed; then a probe at once, then 16
        // passes later, then 32, ..., as long as no pass of another size ran (this test never
        // runs the bigger pass a probe would make).
        assert_eq!(sizes, [0, 1, 17, 49, 113, 241, 497, 1009], "{sizes:?}");
    }

    #[test]
    fn no_probe_once_passes_of_different_sizes_have_run() {
        let gate = Gate::new(without_bursts(), 16384);
        lock(&gate.load).cost = fitted(&[(64.0, 0.010), (128.0, 0.020)]);
        let mut probes = 0;
        for pass in 0..100 {
            let start = after(0.010 * f64::from(pass));
            let queued = gate.queue(64, start).unwrap();
            gate.pass_started(64, start);
            probes += usize::from(gate.queue(64, start).is_ok());
            gate.pass_ended(start + Duration::from_millis(10));
            drop(queued);
            // Keep the spread: every other pass is a double one.
            lock(&gate.load).cost.observe(128.0, 0.020);
        }
        assert_eq!(probes, 0);
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

    #[test]
    fn a_request_is_refused_when_its_stretched_prediction_breaks_the_bound() {
        // 10 ms per 64 units; passes run 15 % over their predictions, a margin of 1.3. Behind
        // a pass with 5 ms left a request is predicted done in 15 ms, 19.5 stretched: within
        // 2x. With 8 ms left, 18 ms is within 2x but 23.4 stretched is not.
        let queued_behind = |left: f64, misprediction: Option<(f64, f64)>| {
            let gate = measured_gate(2.0, &[(64.0, 0.010), (128.0, 0.020)]);
            let mut load = lock(&gate.load);
            load.running = Some((now(), left));
            if let Some((predicted, measured)) = misprediction {
                load.cost.misprediction.observe(predicted, measured);
            }
            drop(load);
            gate.queue(64, now()).is_ok()
        };
        let noisy = Some((0.010, 0.0115));
        assert!(queued_behind(0.005, noisy));
        assert!(!queued_behind(0.008, noisy));
        assert!(queued_behind(0.008, None), "exact predictions");
    }

    #[test]
    fn an_idle_model_takes_a_request_however_noisy_its_passes() {
        let gate = measured_gate(2.0, &[(64.0, 0.010), (128.0, 0.020)]);
        lock(&gate.load).cost.misprediction.observe(0.010, 0.030);
        assert!(lock(&gate.load).cost.margin() > 2.0);
        assert!(gate.queue(64, now()).is_ok());
    }

    #[test]
    fn on_a_gpu_like_cost_requests_keep_joining_the_batch() {
        // A pass costs 10 ms whatever its size, up to the batch limit.
        let gate = measured_gate(2.0, &[(64.0, 0.010), (4096.0, 0.0101)]);
        let queued: Vec<Queued> = (0..60).map(|_| gate.queue(64, now()).unwrap()).collect();
        assert_eq!(queued.len(), 60);
    }

    #[test]
    fn the_running_pass_counts_until_its_predicted_end() {
        let gate = measured_gate(2.0, &[(64.0, 0.100), (128.0, 0.200)]);
        gate.pass_started(128, now());
        // 200 ms left of the running pass + 100 ms of my own against 100 ms alone.
        assert!(gate.queue(64, now()).is_err());
        gate.pass_ended(after(0.200));
        assert!(
            gate.queue(64, after(0.200)).is_ok(),
            "nothing runs or waits once it ended"
        );
    }

    #[test]
    fn without_a_slowdown_limit_only_the_count_refuses() {
        let gate = Gate::new(
            AdmissionLimits {
                max_concurrent_requests: 1,
                max_slowdown: None,
            },
            16384,
        );
        lock(&gate.load).cost = fitted(&[(64.0, 0.010)]);
        let _queued: Vec<Queued> = (0..100).map(|_| gate.queue(64, now()).unwrap()).collect();
        let _slot = gate.admit().unwrap();
        assert!(gate.admit().is_err());
    }
}
