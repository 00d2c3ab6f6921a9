//! Prometheus metrics of the proxy contract, served on their own port. Labels are bounded:
//! model ids and token record ids come from the configuration (never a token), codes and units
//! from fixed sets, never from request data.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::{Response, StatusCode};
use internal_token::usage::Usage;

use crate::limits::Limits;
use crate::state::Shared;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 100 µs (the proxy's own overhead) to 10 minutes (the longest deadline).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The proxy's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_ttfb: HistogramVec,
    pub inflight: IntGaugeVec,
    pub auth_failures: IntCounterVec,
    demand_seconds: CounterVec,
    held: IntGaugeVec,
    token_requests: IntCounterVec,
    token_usage: CounterVec,
    token_last_used: GaugeVec,
    /// One per model id, so that every snapshot's series of a model share its count.
    demands: Arc<Mutex<HashMap<String, Arc<Demand>>>>,
    /// Where the limits gauges are read from at each scrape.
    limits: Arc<OnceLock<LimitsGauges>>,
}

/// The gauges of how per-token limits are enforced, read at each scrape.
#[derive(Debug)]
struct LimitsGauges {
    shared: Arc<Shared>,
    limits: Arc<Limits>,
    peers: IntGauge,
    store_up: Option<IntGauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()),
                &["model"],
            )
            .expect("static metric definition")
        };
        let metrics = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "infergate_proxy_requests_total",
                    "Requests answered, by model and HTTP status.",
                ),
                &["model", "code"],
            )
            .expect("static metric definition"),
            request_duration: histogram(
                "infergate_proxy_request_duration_seconds",
                "Time from request headers to the end of the response.",
            ),
            upstream_ttfb: histogram(
                "infergate_proxy_upstream_ttfb_seconds",
                "Time from request headers to the runtime's response headers.",
            ),
            inflight: IntGaugeVec::new(
                Opts::new(
                    "infergate_proxy_inflight",
                    "Requests being forwarded to a model.",
                ),
                &["model"],
            )
            .expect("static metric definition"),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "infergate_proxy_auth_failures_total",
                    "Refused credentials, by reason.",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            demand_seconds: CounterVec::new(
                Opts::new(
                    "infergate_proxy_demand_seconds_total",
                    "Requests in progress for a model (held or forwarded), integrated over time: \
                     its rate is their average number, which the autoscaler reads.",
                ),
                &["model"],
            )
            .expect("static metric definition"),
            held: IntGaugeVec::new(
                Opts::new(
                    "infergate_proxy_held",
                    "Requests held for a model with no ready endpoint (scaling up from zero).",
                ),
                &["model"],
            )
            .expect("static metric definition"),
            token_requests: IntCounterVec::new(
                Opts::new(
                    "infergate_proxy_token_requests_total",
                    "Requests that presented a valid token, by token record id, model and \
                     status class (2xx, 4xx, 5xx).",
                ),
                &["token", "model", "class"],
            )
            .expect("static metric definition"),
            token_usage: CounterVec::new(
                Opts::new(
                    "infergate_proxy_token_usage_total",
                    "Work done for a token, by token record id, model and the task's unit as \
                     the runtime reported it: inputs, prompt_tokens, completion_tokens, \
                     audio_seconds_in, audio_seconds_out, images, steps.",
                ),
                &["token", "model", "unit"],
            )
            .expect("static metric definition"),
            token_last_used: GaugeVec::new(
                Opts::new(
                    "infergate_proxy_token_last_used_timestamp_seconds",
                    "When a request with the token last ended, in Unix seconds.",
                ),
                &["token"],
            )
            .expect("static metric definition"),
            demands: Arc::default(),
            limits: Arc::default(),
            registry,
        };
        for collector in [
            Box::new(metrics.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.upstream_ttfb.clone()),
            Box::new(metrics.inflight.clone()),
            Box::new(metrics.auth_failures.clone()),
            Box::new(metrics.demand_seconds.clone()),
            Box::new(metrics.held.clone()),
            Box::new(metrics.token_requests.clone()),
            Box::new(metrics.token_usage.clone()),
            Box::new(metrics.token_last_used.clone()),
        ] {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// The series of one model. A request uses these instead of looking its labels up: a
    /// lookup hashes the labels and takes a lock, several times per request.
    pub fn model_series(&self, model: &str) -> ModelSeries {
        ModelSeries {
            inflight: self.inflight.with_label_values(&[model]),
            request_duration: self.request_duration.with_label_values(&[model]),
            upstream_ttfb: self.upstream_ttfb.with_label_values(&[model]),
            answered_ok: self.requests.with_label_values(&[model, "200"]),
            demand: self
                .demands
                .lock()
                .expect("no panic holds this lock")
                .entry(model.to_owned())
                .or_insert_with(|| {
                    Arc::new(Demand::new(
                        self.demand_seconds.with_label_values(&[model]),
                        self.held.with_label_values(&[model]),
                    ))
                })
                .clone(),
        }
    }

    /// Reports how per-token limits are enforced: `infergate_proxy_limit_peers` (the replicas
    /// sharing them; each enforces 1/N without a store) and, with a store,
    /// `infergate_proxy_limits_store_up`. The operator reads both into AccessToken status.
    pub fn watch_limits(&self, shared: Arc<Shared>, limits: Arc<Limits>) {
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::new(name, help).expect("static metric definition");
            self.registry
                .register(Box::new(gauge.clone()))
                .expect("metric names are unique");
            gauge
        };
        let peers = gauge(
            "infergate_proxy_limit_peers",
            "Ready proxy replicas that share each token's limits (each enforces 1/N of them \
             without a shared store).",
        );
        let store_up = limits.store_up().map(|_| {
            gauge(
                "infergate_proxy_limits_store_up",
                "Whether the last call to the shared store of per-token limits reached it.",
            )
        });
        let _ = self.limits.set(LimitsGauges {
            shared,
            limits,
            peers,
            store_up,
        });
    }

    /// Accounts a request that presented token record `token`, ended with `status`.
    pub fn token_used(&self, token: &str, model: &str, status: u16, usage: Option<&Usage>) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.token_requests
            .with_label_values(&[token, model, class])
            .inc();
        for (unit, amount) in usage.into_iter().flat_map(Usage::iter) {
            self.token_usage
                .with_label_values(&[token, model, unit.as_str()])
                .inc_by(amount);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.token_last_used
            .with_label_values(&[token])
            .set(now.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let demands: Vec<Arc<Demand>> = self
            .demands
            .lock()
            .expect("no panic holds this lock")
            .values()
            .cloned()
            .collect();
        let now = Instant::now();
        for demand in demands {
            demand.settle(now);
        }
        if let Some(gauges) = self.limits.get() {
            let snapshot = gauges.shared.snapshot();
            gauges.peers.set(snapshot.peers as i64);
            if let (Some(gauge), Some(up)) = (&gauges.store_up, gauges.limits.store_up()) {
                gauge.set(i64::from(up));
            }
            // A token whose AccessToken is gone takes its series with it.
            let live: HashSet<&str> = snapshot.token_ids().collect();
            forget_tokens(&self.token_requests, &live);
            forget_tokens(&self.token_usage, &live);
            forget_tokens(&self.token_last_used, &live);
        }
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Removes the series of `vec` whose `token` label is not in `live`.
fn forget_tokens<T: MetricVecBuilder>(vec: &MetricVec<T>, live: &HashSet<&str>) {
    for family in prometheus::core::Collector::collect(vec) {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            if labels
                .get("token")
                .is_some_and(|token| !live.contains(token))
            {
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// One model's series, resolved once per model and snapshot (see [`Metrics::model_series`]).
pub struct ModelSeries {
    pub inflight: IntGauge,
    pub request_duration: Histogram,
    pub upstream_ttfb: Histogram,
    /// `requests_total{code="200"}`, the count nearly every request adds to.
    pub answered_ok: IntCounter,
    pub demand: Arc<Demand>,
}

/// The requests in progress for one model, held or forwarded, and their integral over time.
#[derive(Debug)]
pub struct Demand {
    integral: Mutex<Integral>,
    seconds: Counter,
    held: AtomicUsize,
    held_gauge: IntGauge,
}

#[derive(Debug)]
struct Integral {
    in_progress: u64,
    since: Instant,
}

impl Demand {
    fn new(seconds: Counter, held_gauge: IntGauge) -> Demand {
        Demand {
            integral: Mutex::new(Integral {
                in_progress: 0,
                since: Instant::now(),
            }),
            seconds,
            held: AtomicUsize::new(0),
            held_gauge,
        }
    }

    /// Adds the time since the last change, at the count that held meanwhile, to the counter,
    /// then applies `change`.
    fn change(&self, now: Instant, change: impl FnOnce(&mut u64)) {
        let mut integral = self.integral.lock().expect("no panic holds this lock");
        let elapsed = now.saturating_duration_since(integral.since).as_secs_f64();
        if integral.in_progress > 0 && elapsed > 0.0 {
            self.seconds.inc_by(integral.in_progress as f64 * elapsed);
        }
        integral.since = now;
        change(&mut integral.in_progress);
    }

    /// Brings the counter up to `now`, so a scrape sees requests still in progress.
    pub fn settle(&self, now: Instant) {
        self.change(now, |_| {});
    }

    /// Counts a request as in progress until the guard drops.
    pub fn begin(self: &Arc<Self>) -> DemandGuard {
        self.change(Instant::now(), |count| *count += 1);
        DemandGuard(self.clone())
    }

    /// Counts a held request, unless `limit` are held already.
    pub fn hold(self: &Arc<Self>, limit: usize) -> Option<HoldGuard> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < limit).then_some(held + 1)
            })
            .ok()?;
        self.held_gauge.inc();
        Some(HoldGuard(self.clone()))
    }
}

/// Keeps a request in its model's demand.
#[derive(Debug)]
pub struct DemandGuard(Arc<Demand>);

impl Drop for DemandGuard {
    fn drop(&mut self) {
        self.0
            .change(Instant::now(), |count| *count = count.saturating_sub(1));
    }
}

/// Keeps a request counted as held.
#[derive(Debug)]
pub struct HoldGuard(Arc<Demand>);

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
        self.0.held_gauge.dec();
    }
}

impl std::fmt::Debug for ModelSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSeries").finish_non_exhaustive()
    }
}

/// Serves `GET /metrics` on the metrics port.
#[derive(Debug)]
pub struct MetricsApp(pub Metrics);

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = if session.req_header().uri.path() == "/metrics" {
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.0.render().into_bytes(),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain",
                b"metrics live at /metrics\n".to_vec(),
            )
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response parts")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn demand_integrates_the_requests_in_progress_over_time() {
        let metrics = Metrics::new();
        let demand = metrics.model_series("m").demand;
        let t0 = Instant::now();
        let at = |seconds: u64| t0 + Duration::from_secs(seconds);
        demand.change(at(0), |n| *n += 1);
        demand.change(at(2), |n| *n += 1);
        demand.settle(at(3));
        // One request for 2 s, then two for 1 s: on average 4/3 over 3 s.
        assert_eq!(demand.seconds.get(), 4.0);
        demand.change(at(4), |n| *n -= 2);
        demand.settle(at(10));
        assert_eq!(demand.seconds.get(), 6.0);
        // Every snapshot's series of a model share one count.
        assert!(Arc::ptr_eq(&demand, &metrics.model_series("m").demand));
    }

    #[test]
    fn held_requests_are_bounded_and_counted_until_released() {
        let metrics = Metrics::new();
        let demand = metrics.model_series("m").demand;
        let first = demand.hold(2).unwrap();
        let _second = demand.hold(2).unwrap();
        assert!(demand.hold(2).is_none(), "a third is over the limit");
        assert!(
            metrics
                .render()
                .contains("infergate_proxy_held{model=\"m\"} 2")
        );
        drop(first);
        assert!(demand.hold(2).is_some());
    }
}
