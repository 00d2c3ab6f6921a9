//! The HTTP server every task shares: health, info, model list, metrics, JSON errors, the
//! body limit and graceful shutdown; the task's own routes are merged in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use internal_token::watch::Watched;
use internal_token::{Claims, Verifier};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Largest JSON body accepted (docs/architecture.md, limits).
pub const MAX_JSON_BODY_BYTES: usize = 2 * 1024 * 1024;

/// `axum::Json` whose rejections are the runtime's JSON errors naming the field at fault.
#[derive(Debug)]
pub struct ValidJson<T>(pub T);

impl<T, S> FromRequest<S> for ValidJson<T>
where
    Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(ValidJson(value))
    }
}

/// What `/info` reports: TEI's fields, plus the task and the device.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub model_id: String,
    pub served_model_name: String,
    pub task: String,
    pub device: String,
    pub model_dtype: String,
    pub model_type: crate::tasks::ModelType,
    pub max_concurrent_requests: usize,
    /// Seconds; `None` when only the count limits admission.
    pub max_queue_time: Option<f64>,
    pub wait_floor: Option<f64>,
    pub default_timeout: f64,
    pub max_input_length: usize,
    pub max_batch_tokens: usize,
    pub max_batch_requests: Option<usize>,
    pub max_client_batch_size: usize,
    pub auto_truncate: bool,
    pub tokenization_workers: usize,
    pub version: &'static str,
}

/// State of the shared routes.
#[derive(Debug, Clone)]
pub struct Common {
    pub info: Arc<Info>,
    /// The proxy's verifying keys (`--internal-keys`); `None` answers unsigned requests.
    pub internal: Option<Arc<Watched<Verifier>>>,
    /// The deadline of a request that sends no `OICM-Request-Timeout`.
    pub default_timeout: Duration,
    pub ready: watch::Receiver<bool>,
    pub metrics: Metrics,
}

/// A response that mirrors its request: one item for one input, a list for a list.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// `items` as one item when the request sent one input (`single`), else as a list.
    pub fn new(mut items: Vec<T>, single: bool) -> OneOrMany<T> {
        if single && items.len() == 1 {
            OneOrMany::One(items.remove(0))
        } else {
            OneOrMany::Many(items)
        }
    }
}

/// `{"text": ...}`: the answer of the speech and translation routes Hugging Face clients read.
#[derive(Debug, Serialize)]
pub struct Text {
    pub text: String,
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
}

/// OpenAI's model list: this runtime's one model.
#[derive(Debug, Serialize)]
struct ModelList {
    object: &'static str,
    data: [ModelCard; 1],
}

#[derive(Debug, Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

async fn health(State(common): State<Common>) -> Response {
    if *common.ready.borrow() {
        (StatusCode::OK, Json(Health { status: "ok" })).into_response()
    } else {
        ApiError::Loading.into_response()
    }
}

async fn info(State(common): State<Common>) -> Json<Info> {
    Json((*common.info).clone())
}

async fn models(State(common): State<Common>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: [ModelCard {
            id: common.info.served_model_name.clone(),
            object: "model",
            created: 0,
            owned_by: "infergate",
        }],
    })
}

async fn metrics(State(common): State<Common>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        common.metrics.render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(request.uri().path().to_owned())
}

/// Task routes refuse work until the model has loaded.
async fn require_ready(State(common): State<Common>, request: Request, next: Next) -> Response {
    if *common.ready.borrow() {
        next.run(request).await
    } else {
        ApiError::Loading.into_response()
    }
}

/// The instant a request's `OICM-Request-Timeout` ends, as the deadline middleware parsed it.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub Instant);

/// Header carrying a request's deadline in seconds; the proxy forwards what is left of it.
const REQUEST_TIMEOUT_HEADER: &str = "oicm-request-timeout";

tokio::task_local! {
    /// The deadline of the request whose handler this task runs, for admission to judge.
    static DEADLINE: Instant;
}

/// The deadline of the request being handled, read where the work is queued (admission judges
/// whether it can end in time); `None` outside a request's handler.
pub fn request_deadline() -> Option<Instant> {
    DEADLINE.try_with(|deadline| *deadline).ok()
}

/// With `--internal-keys`, refuses (401) a request without a JWT the proxy signed for this
/// model, before any work; the verified claims go with the request.
async fn require_internal_token(
    State(common): State<Common>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(keys) = &common.internal else {
        return next.run(request).await;
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    match keys.current().verify(authorization) {
        Ok(claims) => {
            tracing::debug!(token_record = %claims.sub, request_id = %claims.rid, "signed by the proxy");
            request.extensions_mut().insert(Arc::new(claims));
            next.run(request).await
        }
        Err(refusal) => ApiError::from(refusal).into_response(),
    }
}

/// Ends a task request at its deadline with 504: the deadline the proxy signed, else the
/// `OICM-Request-Timeout` header (what is left of the client's), else the runtime's default.
/// Dropping the handler drops its place in the queue, so the model thread skips the work
/// instead of computing an answer nobody reads.
async fn enforce_deadline(State(common): State<Common>, request: Request, next: Next) -> Response {
    let signed = request.extensions().get::<Arc<Claims>>();
    let budget = match (signed, request.headers().get(REQUEST_TIMEOUT_HEADER)) {
        (Some(claims), _) => claims.remaining(SystemTime::now()),
        (None, None) => common.default_timeout,
        (None, Some(value)) => {
            let seconds = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0);
            let Some(seconds) = seconds else {
                return ApiError::InvalidTimeout.into_response();
            };
            // A day bounds what `Duration` must represent; no deadline the proxy forwards comes
            // close.
            Duration::from_secs_f64(seconds.min(86_400.0))
        }
    };
    let deadline = Instant::now() + budget;
    // Handlers whose work outlives their response (streams) read the deadline from here.
    let mut request = request;
    request.extensions_mut().insert(RequestDeadline(deadline));
    match tokio::time::timeout(budget, DEADLINE.scope(deadline, next.run(request))).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Counts and times every request by its route template (bounded) and status.
async fn record(State(common): State<Common>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    common
        .metrics
        .requests
        .with_label_values(&[endpoint.as_str(), response.status().as_str()])
        .inc();
    common
        .metrics
        .request_seconds
        .with_label_values(&[endpoint.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The whole router: health and metrics open to probes and scrapers; everything else behind the
/// proxy's signature (with `--internal-keys`), the task's routes also behind readiness; errors
/// as JSON.
pub fn router(common: Common, task_routes: Router) -> Router {
    let task_routes = task_routes
        .route_layer(middleware::from_fn(crate::usage::report))
        .route_layer(middleware::from_fn_with_state(
            common.clone(),
            enforce_deadline,
        ))
        .route_layer(middleware::from_fn_with_state(
            common.clone(),
            require_ready,
        ));
    let signed = Router::new()
        .route("/info", get(info))
        .route("/v1/models", get(models))
        .with_state(common.clone())
        .merge(task_routes)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            common.clone(),
            require_internal_token,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(common.clone())
        .merge(signed)
        .layer(middleware::from_fn_with_state(common, record))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
}

/// Serves until SIGTERM or Ctrl-C, then stops accepting and finishes the requests in progress.
pub async fn serve(listen: SocketAddr, app: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "infergate-runtime listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing requests in progress");
}

/// Seconds since the Unix epoch: the `created` of OpenAI-shaped responses.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
