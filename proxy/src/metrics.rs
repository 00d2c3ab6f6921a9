//! Prometheus metrics of the proxy contract, served on their own port. Labels are bounded:
//! model ids come from the configuration, codes from a fixed set, never from request data.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
            registry,
        };
        for collector in [
            Box::new(metrics.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.upstream_ttfb.clone()),
            Box::new(metrics.inflight.clone()),
            Box::new(metrics.auth_failures.clone()),
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
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
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

/// One model's series, resolved once per model and snapshot (see [`Metrics::model_series`]).
pub struct ModelSeries {
    pub inflight: IntGauge,
    pub request_duration: Histogram,
    pub upstream_ttfb: Histogram,
    /// `requests_total{code="200"}`, the count nearly every request adds to.
    pub answered_ok: IntCounter,
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
