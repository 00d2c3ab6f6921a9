//! The request path, written on pingora-core's HTTP/1 sessions. One task per client
//! connection reads a request head, answers health checks, admits the request (route, token,
//! deadline, declared body size), sends it to an endpoint over a pooled connection, streams
//! the answer back and logs it, then reads the next head. Nothing is spawned and no channel is
//! crossed per request; the request's deadline is one timer, raced against every wait on the
//! client's body and on the runtime.
//!
//! pingora-proxy's `ProxyHttp` did this before. Its per-request machinery (a copy of the whole
//! request head, two channels and two select loops, cache and compression state, an idle-watch
//! task per pooled connection) cost more CPU than everything this proxy decides; see
//! `proxy/bench/run.sh`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use crds::TokenLimits;
use crds::names::REQUEST_TIMEOUT_HEADER;
use http::{HeaderName, Method, header};
use internal_token::usage::{self, Usage};
use internal_token::watch::Watched;
use internal_token::{Claims, Forwarded, Signer};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::protocols::Stream;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::http::v1::client::HttpSession as Upstream;
use pingora_core::protocols::http::v1::server::HttpSession as Downstream;
use pingora_core::server::ShutdownWatch;
use pingora_error::ErrorType;
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::time::{Instant, Sleep};

use crate::error::Rejection;
use crate::limits::{Admitted, Limits};
use crate::metrics::{Metrics, ModelSeries};
use crate::request::{parse_model_path, parse_request_timeout, presented_token};
use crate::snapshot::{InflightGuard, Model, pick_endpoint};
use crate::state::{RequestGuard, Shared};
use crate::upstream;

/// Time allowed to open a connection to a runtime, within the request's deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest silence of an upstream once connected (docs/architecture.md, limits: SSE idle).
const UPSTREAM_IDLE_READ: Duration = Duration::from_secs(300);
/// Request body bytes kept while they are sent, so that a request whose pooled connection
/// turns out to be closed by the runtime can be sent again on a new one. Larger bodies are
/// not kept, and such a request fails instead of being retried.
const REPLAY_LIMIT: usize = 64 * 1024;
/// The seed document's clients send the token in a header of this name.
const BEARER_HEADER: &str = "bearer";
const REQUEST_ID_HEADER: &str = "x-request-id";

/// Limits on what a client may send, whatever the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// Request line and headers together, in bytes.
    pub max_bytes: usize,
    /// Number of header fields.
    pub max_count: usize,
}

impl Default for HeaderLimits {
    fn default() -> Self {
        HeaderLimits {
            max_bytes: 64 * 1024,
            max_count: 100,
        }
    }
}

impl HeaderLimits {
    fn check(&self, request: &RequestHeader) -> Result<(), Rejection> {
        let count = request.headers.len();
        // The size as sent on the wire: request line, then `name: value\r\n` per field.
        let target = request.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + request.uri.scheme_str().map_or(0, |s| s.len() + 3)
            + request.uri.authority().map_or(0, |a| a.as_str().len());
        let line = request.method.as_str().len() + target + 11;
        let fields: usize = request
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if count > self.max_count || line + fields > self.max_bytes {
            return Err(Rejection::HeadersTooLarge {
                max_bytes: self.max_bytes,
                max_count: self.max_count,
            });
        }
        Ok(())
    }
}

/// The data plane: one instance serves every request.
#[derive(Debug)]
pub struct Gateway {
    pub shared: Arc<Shared>,
    pub metrics: Metrics,
    pub header_limits: HeaderLimits,
    /// Seconds an idle client connection is kept open between requests. pingora keeps HTTP/1.1
    /// connections forever by default, which lets idle clients pile up.
    pub keepalive_idle_secs: u64,
    /// Requests held for one model while it has no endpoint (it scales up from zero).
    pub max_held_per_model: usize,
    /// Signs the JWT each forwarded request carries to its runtime; `None` forwards unsigned.
    pub signer: Option<Arc<Watched<Signer>>>,
    /// Per-token limits.
    pub limits: Arc<Limits>,
}

/// One request, from its head to its log line.
#[derive(Debug)]
struct Request {
    started: Instant,
    id: String,
    model: Option<Arc<Model>>,
    token_id: Option<String>,
    token_limits: Option<TokenLimits>,
    upstream_path: String,
    deadline: Instant,
    budget: Duration,
    endpoint: Option<InflightGuard>,
    sse: bool,
    /// The error the request ended in, whether answered whole or ending a started response.
    rejection: Option<Rejection>,
    /// Whether the request counts in the `inflight` gauge.
    forwarding: bool,
    /// What the runtime reported the request used.
    usage: Option<Usage>,
    /// The request's place under its token's limits, until it ends.
    admitted: Option<Admitted>,
    _in_progress: RequestGuard,
}

impl Request {
    fn model_label(&self) -> &str {
        self.model.as_ref().map_or("-", |m| m.id.as_str())
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn timeout(&self) -> Rejection {
        Rejection::Timeout {
            budget: self.budget,
        }
    }
}

/// How forwarding ended when it did not end in a whole response.
#[derive(Debug)]
enum Failure {
    /// No response has started: the client gets this one, and the connection closes.
    Answer(Rejection),
    /// The response had started: an SSE stream ends with an error event, any other body is cut
    /// short, so that a truncated response never looks complete.
    Cut(Rejection),
    /// The client closed its connection or stopped reading.
    ClientGone,
}

/// A client's `X-Request-Id` when it is short printable ASCII, or a fresh one.
fn request_id(request: &RequestHeader) -> String {
    request
        .headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(new_request_id, str::to_owned)
}

/// A 32-hex-digit id: a random per-process prefix and a counter, unique without a system call
/// per request.
fn new_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // Request ids need uniqueness, not secrecy; without the OS generator the clock will do.
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            bytes = (nanos.as_nanos() as u64).to_be_bytes();
        }
        u64::from_be_bytes(bytes)
    });
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix:016x}{count:016x}")
}

/// `Bearer <JWT>` for the runtime: signed now for this request's model, token record, request
/// id and what is left of its deadline. Signed again on a retry to another endpoint.
fn internal_credential(signer: &Watched<Signer>, request: &Request) -> Option<String> {
    let (Some(model), Some(token_record_id)) = (&request.model, &request.token_id) else {
        return None;
    };
    let now = std::time::SystemTime::now();
    let claims = Claims::new(
        Forwarded {
            model_version_id: &model.id,
            token_record_id,
            request_id: &request.id,
            remaining: request.remaining(),
        },
        now,
    );
    match signer.current().sign(&claims, now) {
        Ok(jwt) => Some(format!("Bearer {jwt}")),
        Err(error) => {
            tracing::error!(%error, "signing the internal credential");
            None
        }
    }
}

/// Whether a request field describes the client's connection rather than the request
/// (RFC 9110, section 7.6.1), or is one the proxy replaces. `Transfer-Encoding` stays: the
/// request body is sent upstream in the framing it arrived in. An `Upgrade` is never passed
/// on (no runtime speaks another protocol), so a request asking for one is served as plain
/// HTTP/1.1, as nginx serves it by default.
fn is_forwarded(name: &HeaderName, connection_options: Option<&[u8]>) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            | "authorization"
            | BEARER_HEADER
            | REQUEST_TIMEOUT_HEADER
            | REQUEST_ID_HEADER
    ) && !connection_options.is_some_and(|options| {
        options.split(|&b| b == b',').any(|option| {
            option
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
    })
}

/// The head sent to the runtime: the client's method and fields, minus its credential and its
/// connection's fields, on the model's own path, with the request id, what is left of the
/// deadline and the internal credential.
fn upstream_head(
    client: &RequestHeader,
    request: &Request,
    credential: Option<String>,
) -> Box<RequestHeader> {
    let connection_options = client
        .headers
        .get(header::CONNECTION)
        .map(|v| v.as_bytes())
        .filter(|v| !v.eq_ignore_ascii_case(b"keep-alive") && !v.eq_ignore_ascii_case(b"close"));
    let mut head = RequestHeader::build_no_case(
        client.method.clone(),
        request.upstream_path.as_bytes(),
        Some(client.headers.len() + 3),
    )
    .expect("the path was parsed from the client's request line");
    for (name, value) in &client.headers {
        if is_forwarded(name, connection_options) {
            head.append_header(name.clone(), value.clone())
                .expect("a field of the client's own request");
        }
    }
    let remaining = format!("{:.3}", request.remaining().as_secs_f64());
    head.insert_header(REQUEST_TIMEOUT_HEADER, remaining)
        .expect("a number is a valid field value");
    head.insert_header(REQUEST_ID_HEADER, request.id.as_str())
        .expect("request ids are printable ASCII");
    if let Some(credential) = credential {
        head.insert_header(header::AUTHORIZATION, credential)
            .expect("a JWT is a valid field value");
    }
    Box::new(head)
}

async fn write_rejection(
    downstream: &mut Downstream,
    rejection: &Rejection,
    request_id: &str,
) -> pingora_error::Result<()> {
    let mut headers = Vec::new();
    if let Some(seconds) = rejection.retry_after() {
        headers.push((header::RETRY_AFTER.as_str(), seconds.to_string()));
    }
    if rejection.should_retry() == Some(false) {
        // The OpenAI SDKs retry a 5xx twice unless told not to: a request that ran out of
        // its deadline would run (and be billed) three times.
        headers.push(("x-should-retry", "false".to_owned()));
    }
    write_json(
        downstream,
        rejection.status(),
        rejection.body(),
        request_id,
        &headers,
    )
    .await
}

async fn write_json(
    downstream: &mut Downstream,
    status: u16,
    body: Bytes,
    request_id: &str,
    headers: &[(&'static str, String)],
) -> pingora_error::Result<()> {
    let mut response = ResponseHeader::build_no_case(status, Some(3 + headers.len()))?;
    response.insert_header(header::CONTENT_TYPE, "application/json")?;
    response.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    response.insert_header(REQUEST_ID_HEADER, request_id)?;
    for (name, value) in headers {
        response.insert_header(*name, value.as_str())?;
    }
    downstream.write_response_header(Box::new(response)).await?;
    downstream.write_body(&body).await?;
    downstream.finish_body().await?;
    Ok(())
}

/// `work`'s result, or `None` when the request's deadline (a pinned timer kept for the whole
/// request) comes first. The deadline is polled first, so work that is always ready cannot
/// outrun it.
async fn before_deadline<T>(
    timer: &mut Pin<&mut Sleep>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        () = timer.as_mut() => None,
        done = work => Some(done),
    }
}

impl Gateway {
    fn series<'m>(&self, model: &'m Model) -> &'m ModelSeries {
        model
            .series
            .get_or_init(|| self.metrics.model_series(&model.id))
    }

    /// The route, credential, deadline and body-size checks, in the contract's order.
    fn admit(&self, client: &RequestHeader, request: &mut Request) -> Result<(), Rejection> {
        self.header_limits.check(client)?;
        let route = parse_model_path(client.uri.path()).ok_or(Rejection::RouteNotFound)?;
        let presented = presented_token(
            client
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            client.headers.get(BEARER_HEADER).map(|v| v.as_bytes()),
        );
        let snapshot = self.shared.snapshot();
        let (record, model) =
            snapshot.authorize(presented, route.model_id, jiff::Timestamp::now())?;
        request.token_id = Some(record.id.clone());
        request.token_limits = record.limits;
        request.model = Some(model.clone());

        request.budget = match client.headers.get(REQUEST_TIMEOUT_HEADER) {
            Some(value) => parse_request_timeout(value.as_bytes(), model.timeouts.max)?,
            None => model.timeouts.default,
        };
        request.deadline = request.started + request.budget;

        let declared_length = client
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > model.max_body_bytes) {
            return Err(Rejection::BodyTooLarge {
                limit: model.max_body_bytes,
            });
        }
        if model.endpoints.is_empty() && !model.hold_when_idle {
            return Err(Rejection::NoReadyEndpoint {
                model: model.id.clone(),
            });
        }
        request.upstream_path = match client.uri.query() {
            Some(query) => format!("{}?{query}", route.upstream_path),
            None => route.upstream_path.to_owned(),
        };
        Ok(())
    }

    /// Answers one request; returns whether its connection can carry another.
    async fn serve(&self, downstream: &mut Downstream) -> bool {
        let started = Instant::now();
        let defaults = crds::RequestTimeouts::default();
        let mut request = Request {
            started,
            id: request_id(downstream.req_header()),
            model: None,
            token_id: None,
            token_limits: None,
            upstream_path: String::new(),
            deadline: started + defaults.default,
            budget: defaults.default,
            endpoint: None,
            sse: false,
            rejection: None,
            forwarding: false,
            usage: None,
            admitted: None,
            _in_progress: self.shared.track_request(),
        };
        if let Some(current) = downstream.get_keepalive_timeout() {
            // 0 is pingora's "forever"; a client's own shorter Keep-Alive timeout is kept.
            let bounded = if current == 0 {
                self.keepalive_idle_secs
            } else {
                current.min(self.keepalive_idle_secs)
            };
            downstream.set_server_keepalive(Some(bounded.max(1)));
        }
        if self.shared.is_draining() {
            // Shutting down: the client's next request goes to a new connection, which a
            // load balancer sends to another replica.
            downstream.set_server_keepalive(None);
        }
        let reusable = self.answer(downstream, &mut request).await;
        if let Some(admitted) = request.admitted.take() {
            self.limits.finish(admitted, request.usage.as_ref()).await;
        }
        self.log(downstream, &request);
        reusable
    }

    async fn answer(&self, downstream: &mut Downstream, request: &mut Request) -> bool {
        let health: Option<(u16, &'static [u8])> = match downstream.req_header().uri.path() {
            "/healthz" => Some((200, br#"{"status":"ok"}"#)),
            "/readyz" if self.shared.is_ready() => Some((200, br#"{"status":"ready"}"#)),
            "/readyz" if self.shared.is_draining() => Some((503, br#"{"status":"draining"}"#)),
            "/readyz" => Some((503, br#"{"status":"syncing"}"#)),
            _ => None,
        };
        if let Some((status, body)) = health {
            return write_json(
                downstream,
                status,
                Bytes::from_static(body),
                &request.id,
                &[],
            )
            .await
            .is_ok();
        }
        let mut admitted = self.admit(downstream.req_header(), request);
        if admitted.is_ok() {
            admitted = self.within_limits(request).await;
        }
        // Held or forwarded, an admitted request is demand on its model until it is answered.
        let _demand = request
            .model
            .as_deref()
            .filter(|_| admitted.is_ok())
            .map(|model| self.series(model).demand.begin());
        if admitted.is_ok() {
            admitted = self.hold_until_ready(request).await;
        }
        if let Err(rejection) = admitted {
            if rejection.is_auth_failure() {
                self.metrics
                    .auth_failures
                    .with_label_values(&[rejection.code()])
                    .inc();
            }
            if !downstream.is_body_empty() {
                // Reading a refused body only to keep the connection is not worth it.
                downstream.set_server_keepalive(None);
            }
            let written = write_rejection(downstream, &rejection, &request.id).await;
            request.rejection = Some(rejection);
            return written.is_ok();
        }
        if let Some(model) = &request.model {
            self.series(model).inflight.inc();
        }
        request.forwarding = true;

        let failure = match self.forward(downstream, request).await {
            Ok(reusable) => return reusable,
            Err(failure) => failure,
        };
        match failure {
            Failure::Answer(rejection) => {
                // The connection closes after this answer: saying so keeps a client from
                // sending its next request into a closing socket.
                downstream.set_server_keepalive(None);
                if let Err(error) = write_rejection(downstream, &rejection, &request.id).await {
                    tracing::debug!(request_id = %request.id, %error, "could not write the error response");
                }
                request.rejection = Some(rejection);
            }
            Failure::Cut(rejection) => {
                if request.sse {
                    // A clean end of the stream after the event, so the client reads it.
                    let event = rejection.sse_event();
                    if downstream.write_body(&event).await.is_ok() {
                        let _ = downstream.finish_body().await;
                    }
                }
                request.rejection = Some(rejection);
            }
            Failure::ClientGone => {}
        }
        false
    }

    /// Takes the request's place under its token's limits (see `limits`).
    async fn within_limits(&self, request: &mut Request) -> Result<(), Rejection> {
        let (Some(token), Some(limits)) = (&request.token_id, request.token_limits) else {
            return Ok(());
        };
        let peers = self.shared.snapshot().peers;
        request.admitted = self
            .limits
            .admit(token, limits, peers, &request.id, request.budget)
            .await?;
        Ok(())
    }

    /// Holds a request for a model with no endpoint (an autoscaled model at zero replicas)
    /// until the model has one, in a bounded queue per model and within the request's
    /// deadline; the operator reads the held count and starts a pod.
    async fn hold_until_ready(&self, request: &mut Request) -> Result<(), Rejection> {
        let model = request
            .model
            .clone()
            .expect("an admitted request has a model");
        if !model.endpoints.is_empty() {
            return Ok(());
        }
        let _held = self
            .series(&model)
            .demand
            .hold(self.max_held_per_model)
            .ok_or_else(|| Rejection::HoldFull {
                model: model.id.clone(),
                limit: self.max_held_per_model,
            })?;
        // Subscribed before the snapshot is read: a publication in between is not missed.
        let mut publications = self.shared.publications();
        let deadline = tokio::time::sleep_until(request.deadline);
        tokio::pin!(deadline);
        loop {
            let snapshot = self.shared.snapshot();
            let current = snapshot
                .model(&model.id)
                .ok_or_else(|| Rejection::ModelNotFound {
                    model: model.id.clone(),
                })?;
            if !current.endpoints.is_empty() {
                request.model = Some(current.clone());
                return Ok(());
            }
            let published = tokio::select! {
                () = deadline.as_mut() => false,
                changed = publications.changed() => changed.is_ok(),
            };
            if !published {
                return Err(Rejection::StartOutlasted {
                    model: model.id.clone(),
                    budget: request.budget,
                });
            }
        }
    }

    /// Sends the admitted request to an endpoint of its model and streams the answer back.
    /// Returns whether the client connection can carry another request.
    async fn forward(
        &self,
        downstream: &mut Downstream,
        request: &mut Request,
    ) -> Result<bool, Failure> {
        let model = request
            .model
            .clone()
            .expect("an admitted request has a model");
        let timer = tokio::time::sleep_until(request.deadline);
        tokio::pin!(timer);
        if is_expect_continue(downstream.req_header()) {
            // The runtime never sees the `Expect`: the proxy asks for the body itself.
            downstream
                .write_continue_response()
                .await
                .map_err(|_| Failure::ClientGone)?;
        }

        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut body = BodyState::default();
        let mut pool_allowed = true;
        let (addr, mut up) = loop {
            let (addr, stream, pooled) = self
                .open(&model, request, &mut tried, pool_allowed, &mut timer)
                .await?;
            match self
                .send(downstream, request, &model, stream, &mut body, &mut timer)
                .await
            {
                Ok(up) => break (addr, up),
                Err(Sent::Failed(failure)) => return Err(failure),
                Err(Sent::Stale) if pooled && body.replayable() => {
                    // The runtime closed the pooled connection before it read the request:
                    // the same request goes out again, on a new connection.
                    pool_allowed = false;
                    tried.retain(|tried| *tried != addr);
                    request.endpoint = None;
                }
                Err(Sent::Stale) => return Err(Failure::Answer(Rejection::UpstreamFailed)),
            }
        };

        self.series(&model)
            .upstream_ttfb
            .observe(request.started.elapsed().as_secs_f64());
        let mut response = Box::new(up.resp_header().expect("a response head was read").clone());
        // The client's connection has its own persistence, which pingora writes.
        response.remove_header(&header::CONNECTION);
        response.remove_header("keep-alive");
        // The runtime's report is for the proxy alone.
        request.usage = response
            .remove_header(usage::HEADER)
            .and_then(|value| Usage::parse(value.to_str().ok()?));
        request.sse = response
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .get(..17)
                    .is_some_and(|v| v.eq_ignore_ascii_case("text/event-stream"))
            });
        if request.sse {
            let _ = response.insert_header("x-accel-buffering", "no");
        }
        let _ = response.insert_header(REQUEST_ID_HEADER, request.id.as_str());
        downstream
            .write_response_header(response)
            .await
            .map_err(|_| Failure::ClientGone)?;

        // A stream's usage comes last, as an SSE comment: held back from the client while read.
        let mut comment: Vec<u8> = Vec::new();
        loop {
            let Some(chunk) = before_deadline(&mut timer, up.read_body_ref()).await else {
                return Err(Failure::Cut(request.timeout()));
            };
            match chunk {
                // A read that ended on chunk framing yields nothing; written, an empty
                // chunk would end the client's chunked body.
                Ok(Some([])) => {}
                Ok(Some(bytes))
                    if request.sse && (!comment.is_empty() || may_open_usage(bytes)) =>
                {
                    comment.extend_from_slice(bytes);
                    if comment.len() > MAX_USAGE_COMMENT {
                        // Not a report: the client's after all.
                        downstream
                            .write_body(&std::mem::take(&mut comment))
                            .await
                            .map_err(|_| Failure::ClientGone)?;
                    }
                }
                Ok(Some(bytes)) => {
                    downstream
                        .write_body(bytes)
                        .await
                        .map_err(|_| Failure::ClientGone)?;
                }
                Ok(None) => {
                    if !comment.is_empty() {
                        request.usage = Usage::from_stream_comment(&comment);
                        if request.usage.is_none() {
                            downstream
                                .write_body(&comment)
                                .await
                                .map_err(|_| Failure::ClientGone)?;
                        }
                    }
                    break;
                }
                Err(_) if Instant::now() >= request.deadline => {
                    return Err(Failure::Cut(request.timeout()));
                }
                Err(_) => return Err(Failure::Cut(Rejection::UpstreamFailed)),
            }
        }
        downstream
            .finish_body()
            .await
            .map_err(|_| Failure::ClientGone)?;
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            upstream::put(addr, stream);
        }
        Ok(true)
    }

    /// A connection to an endpoint not yet tried: a pooled one when there is one, else a new
    /// one; when connecting fails, the next endpoint (nothing has reached the first).
    async fn open(
        &self,
        model: &Model,
        request: &mut Request,
        tried: &mut Vec<SocketAddr>,
        pool_allowed: bool,
        timer: &mut Pin<&mut Sleep>,
    ) -> Result<(SocketAddr, Stream, bool), Failure> {
        loop {
            let remaining = request.remaining();
            if remaining.is_zero() {
                return Err(Failure::Answer(request.timeout()));
            }
            let Some(endpoint) = pick_endpoint(&model.endpoints, tried) else {
                return Err(Failure::Answer(Rejection::UpstreamUnavailable));
            };
            let addr = endpoint.addr;
            tried.push(addr);
            request.endpoint = Some(InflightGuard::new(endpoint));
            if pool_allowed && let Some(stream) = upstream::take(addr) {
                return Ok((addr, stream, true));
            }
            let connecting =
                tokio::time::timeout(remaining.min(CONNECT_TIMEOUT), upstream::connect(addr));
            let Some(connected) = before_deadline(timer, connecting).await else {
                return Err(Failure::Answer(request.timeout()));
            };
            match connected {
                Ok(Ok(stream)) => return Ok((addr, stream, false)),
                Ok(Err(error)) => {
                    tracing::debug!(request_id = %request.id, %addr, %error, "connecting to the endpoint failed");
                }
                Err(_) => {
                    tracing::debug!(request_id = %request.id, %addr, "connecting to the endpoint timed out");
                }
            }
            request.endpoint = None;
        }
    }

    /// Writes the request (head, then body) on `stream` and reads the response head.
    async fn send(
        &self,
        downstream: &mut Downstream,
        request: &Request,
        model: &Model,
        stream: Stream,
        body: &mut BodyState,
        timer: &mut Pin<&mut Sleep>,
    ) -> Result<Upstream, Sent> {
        let mut up = Upstream::new(stream);
        up.read_timeout = Some(UPSTREAM_IDLE_READ);
        let credential = self
            .signer
            .as_ref()
            .and_then(|signer| internal_credential(signer, request));
        let head = upstream_head(downstream.req_header(), request, credential);
        let timed_out = || Sent::Failed(Failure::Answer(request.timeout()));
        let written = before_deadline(timer, up.write_request_header(head))
            .await
            .ok_or_else(timed_out)?;
        if written.is_err() {
            return Err(Sent::Stale);
        }
        for chunk in &body.kept {
            let written = before_deadline(timer, up.write_body(chunk))
                .await
                .ok_or_else(timed_out)?;
            if written.is_err() {
                return Err(Sent::Stale);
            }
        }
        let mut sending_failed = false;
        while !downstream.is_body_done() {
            let chunk = before_deadline(timer, downstream.read_body_bytes())
                .await
                .ok_or_else(timed_out)?;
            let Some(chunk) = chunk.map_err(|_| Sent::Failed(Failure::ClientGone))? else {
                break;
            };
            body.received += chunk.len() as u64;
            if body.received > model.max_body_bytes {
                // A chunked body has no declared length; it is cut here, before its end
                // reaches the runtime, so the runtime sees a broken request rather than a
                // complete one.
                return Err(Sent::Failed(Failure::Answer(Rejection::BodyTooLarge {
                    limit: model.max_body_bytes,
                })));
            }
            body.keep(&chunk);
            if sending_failed {
                continue;
            }
            let written = before_deadline(timer, up.write_body(&chunk))
                .await
                .ok_or_else(timed_out)?;
            // A runtime may answer before it has read the whole body (and close): the rest is
            // read from the client and dropped, and its answer read below.
            sending_failed = written.is_err();
        }
        if !sending_failed {
            // A failure to finish shows in the response read that follows.
            let _ = before_deadline(timer, up.finish_body())
                .await
                .ok_or_else(timed_out)?;
        }
        loop {
            let read = before_deadline(timer, up.read_response())
                .await
                .ok_or_else(timed_out)?;
            match read {
                Ok(_) => {}
                Err(error) if Instant::now() >= request.deadline => {
                    tracing::debug!(request_id = %request.id, %error, "the deadline ended the upstream read");
                    return Err(timed_out());
                }
                Err(error) if up.resp_header().is_none() && is_closed_before_answer(&error) => {
                    tracing::debug!(request_id = %request.id, %error, "the upstream closed the connection without answering");
                    return Err(Sent::Stale);
                }
                Err(error) => {
                    tracing::debug!(request_id = %request.id, %error, "the upstream's answer is not valid HTTP");
                    return Err(Sent::Failed(Failure::Answer(Rejection::UpstreamFailed)));
                }
            }
            match up.get_status().map(|s| s.as_u16()) {
                // No request asks for a protocol switch (`Upgrade` is not forwarded).
                Some(101) => return Err(Sent::Failed(Failure::Answer(Rejection::UpstreamFailed))),
                // An interim answer: the final one follows.
                Some(100..=199) => continue,
                _ => return Ok(up),
            }
        }
    }

    fn log(&self, downstream: &Downstream, request: &Request) {
        crate::header_guard::expect_next_head(Some(downstream.stream()));
        let status = match (&request.rejection, downstream.response_written()) {
            // A stream cut by the deadline went out as 200 but ended as a timeout.
            (Some(rejection), _) => rejection.status(),
            (None, Some(response)) => response.status.as_u16(),
            // Client closed before any response, in nginx's words.
            (None, None) => 499,
        };
        let model = request.model_label();
        let elapsed = request.started.elapsed();
        let series = request.model.as_deref().map(|m| self.series(m));
        match series {
            Some(series) if status == 200 => series.answered_ok.inc(),
            _ => self
                .metrics
                .requests
                .with_label_values(&[model, &status.to_string()])
                .inc(),
        }
        if let Some(series) = series {
            series.request_duration.observe(elapsed.as_secs_f64());
            if request.forwarding {
                series.inflight.dec();
            }
        }
        if let Some(token) = &request.token_id {
            self.metrics
                .token_used(token, model, status, request.usage.as_ref());
        }
        let client = downstream.req_header();
        tracing::info!(
            request_id = %request.id,
            method = %client.method,
            model = %model,
            token = %request.token_id.as_deref().unwrap_or("-"),
            status,
            code = %request.rejection.as_ref().map_or("-", |r| r.code()),
            upstream = %request.endpoint.as_ref().map_or_else(|| "-".to_owned(), |e| e.endpoint().addr.to_string()),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}

/// The request body as it is being sent.
#[derive(Debug, Default)]
struct BodyState {
    /// Bytes read from the client so far.
    received: u64,
    /// The chunks read so far, while they fit [`REPLAY_LIMIT`].
    kept: Vec<Bytes>,
}

impl BodyState {
    /// Keeps `chunk`, just counted in `received`, while the body fits the replay limit.
    fn keep(&mut self, chunk: &Bytes) {
        if self.replayable() {
            self.kept.push(chunk.clone());
        } else {
            self.kept.clear();
        }
    }

    /// Whether everything read so far can be sent again.
    fn replayable(&self) -> bool {
        self.received <= REPLAY_LIMIT as u64
    }
}

/// The longest usage comment a stream ends with; longer bytes after the marker are not one.
const MAX_USAGE_COMMENT: usize = 1024;

/// Whether a piece of a stream may be (the start of) the runtime's usage comment.
fn may_open_usage(piece: &[u8]) -> bool {
    piece.starts_with(usage::STREAM_MARKER) || usage::STREAM_MARKER.starts_with(piece)
}

/// Why a request did not get a response head from the connection it was sent on.
#[derive(Debug)]
enum Sent {
    /// The connection was closed under the request before any answer: the request may go out
    /// again on a new connection.
    Stale,
    Failed(Failure),
}

/// Whether an upstream error means the runtime closed the connection without answering.
fn is_closed_before_answer(error: &pingora_error::Error) -> bool {
    matches!(
        error.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

fn is_expect_continue(request: &RequestHeader) -> bool {
    request
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

#[async_trait]
impl HttpServerApp for Gateway {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // No TLS and no h2c on this listener: every session is HTTP/1.
        let ServerSession::H1(mut downstream) = session else {
            return None;
        };
        // A connection idle between requests when the proxy shuts down is not woken: the
        // process exits under it once no request is in progress (server.rs, `Drain`).
        match downstream.read_request().await {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(error) => {
                if error.etype() == &ErrorType::InvalidHTTPHeader {
                    // The error's context may quote the head, credential included: it is
                    // not written anywhere.
                    downstream.set_server_keepalive(None);
                    let _ =
                        write_rejection(&mut downstream, &Rejection::MalformedRequest, "-").await;
                }
                downstream.shutdown().await;
                return None;
            }
        }
        if downstream.req_header().method == Method::CONNECT {
            downstream.set_server_keepalive(None);
            let _ = write_rejection(&mut downstream, &Rejection::MethodNotAllowed, "-").await;
            return None;
        }
        if !self.serve(&mut downstream).await {
            return None;
        }
        let session = ServerSession::H1(downstream);
        let settings = HttpPersistentSettings::for_session(&session);
        session
            .finish()
            .await
            .ok()
            .flatten()
            .map(|stream| ReusedHttpStream::from_reusable_stream(stream, settings))
    }
}
