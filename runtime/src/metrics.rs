//! Prometheus metrics of the runtime. Labels are bounded: routes come from the router, statuses
//! are HTTP codes.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::admission::Refusal;
use crate::error::ApiError;

const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// The runtime's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub queue_seconds: Histogram,
    pub inference_seconds: Histogram,
    pub batch_sequences: Histogram,
    pub batch_tokens: Histogram,
    pub dropped: IntCounter,
    /// Requests refused by admission, by the rule that refused them (`Metrics::refused`).
    pub refused: IntCounterVec,
    /// Work stopped part-way because its client went away or its deadline passed.
    pub abandoned: IntCounter,
    /// Model passes that panicked (their requests got 500; the model thread went on).
    pub panics: IntCounter,
    /// Text generation: time to first token, time per output token, tokens in and out, and the
    /// scheduler's queues under the names endpoint pickers read.
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub running: IntGauge,
    pub waiting: IntGauge,
    /// CPU of each request-supplied chat template's render in the sandbox.
    pub template_render_cpu: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("static metric definition")
        };
        let metrics = Metrics {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(
                    "infergate_runtime_requests_total",
                    "Requests answered, by route and HTTP status.",
                ),
                &["endpoint", "status"],
            )
            .expect("static metric definition"),
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "infergate_runtime_request_duration_seconds",
                    "Time to answer a request.",
                )
                .buckets(SECONDS.to_vec()),
                &["endpoint"],
            )
            .expect("static metric definition"),
            queue_seconds: histogram(
                "infergate_runtime_queue_seconds",
                "Time a request waited for a batch.",
                SECONDS.to_vec(),
            ),
            inference_seconds: histogram(
                "infergate_runtime_inference_seconds",
                "Time of one forward pass.",
                SECONDS.to_vec(),
            ),
            batch_sequences: histogram(
                "infergate_runtime_batch_size",
                "Sequences in a forward pass.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            batch_tokens: histogram(
                "infergate_runtime_batch_tokens",
                "Padded tokens in a forward pass.",
                prometheus::exponential_buckets(16.0, 2.0, 12).expect("static buckets"),
            ),
            dropped: IntCounter::new(
                "infergate_runtime_dropped_total",
                "Requests dropped before batching because the client went away.",
            )
            .expect("static metric definition"),
            refused: IntCounterVec::new(
                Opts::new(
                    "infergate_runtime_refused_total",
                    "Requests refused at once (429) by admission: reason count (too many at once), \
                     queue_time (predicted wait past the maximum queue time) or deadline \
                     (predicted end past the request's deadline).",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            panics: IntCounter::new(
                "infergate_runtime_model_panics_total",
                "Model passes that panicked; their requests failed and the model thread went on.",
            )
            .expect("static metric definition"),
            abandoned: IntCounter::new(
                "infergate_runtime_abandoned_total",
                "Requests whose work stopped part-way because the client went away or the deadline passed.",
            )
            .expect("static metric definition"),
            time_to_first_token: histogram(
                "infergate_runtime_time_to_first_token_seconds",
                "Time from a generation request's arrival to its first token.",
                SECONDS.to_vec(),
            ),
            time_per_output_token: histogram(
                "infergate_runtime_time_per_output_token_seconds",
                "Time between consecutive generated tokens of a sequence.",
                SECONDS.to_vec(),
            ),
            prompt_tokens: IntCounter::new(
                "infergate_runtime_prompt_tokens_total",
                "Prompt tokens prefilled.",
            )
            .expect("static metric definition"),
            generated_tokens: IntCounter::new(
                "infergate_runtime_generated_tokens_total",
                "Tokens generated.",
            )
            .expect("static metric definition"),
            running: IntGauge::new(
                "infergate_runtime_num_requests_running",
                "Sequences in the running batch.",
            )
            .expect("static metric definition"),
            waiting: IntGauge::new(
                "infergate_runtime_num_requests_waiting",
                "Sequences admitted and waiting for a place in the running batch.",
            )
            .expect("static metric definition"),
            template_render_cpu: histogram(
                "infergate_runtime_chat_template_cpu_seconds",
                "CPU time of rendering a request's chat template in the sandbox, refused ones included.",
                vec![0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1],
            ),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.request_seconds.clone()),
            Box::new(metrics.queue_seconds.clone()),
            Box::new(metrics.refused.clone()),
            Box::new(metrics.inference_seconds.clone()),
            Box::new(metrics.batch_sequences.clone()),
            Box::new(metrics.batch_tokens.clone()),
            Box::new(metrics.dropped.clone()),
            Box::new(metrics.abandoned.clone()),
            Box::new(metrics.panics.clone()),
            Box::new(metrics.time_to_first_token.clone()),
            Box::new(metrics.time_per_output_token.clone()),
            Box::new(metrics.prompt_tokens.clone()),
            Box::new(metrics.generated_tokens.clone()),
            Box::new(metrics.running.clone()),
            Box::new(metrics.waiting.clone()),
            Box::new(metrics.template_render_cpu.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// Counts `error` when it is a refusal by admission.
    pub fn refused(&self, error: &ApiError) {
        let reason = match error {
            ApiError::Overloaded => "count",
            ApiError::Saturated(Refusal::QueueTime { .. }) => "queue_time",
            ApiError::Saturated(Refusal::Deadline { .. }) => "deadline",
            _ => return,
        };
        self.refused.with_label_values(&[reason]).inc();
    }

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
