//! The pingora service. Its filters follow a request's life: `request_filter` authenticates,
//! authorises and fixes the deadline; `upstream_peer` picks an endpoint; the upstream filters
//! rewrite the path, strip the credential and forward the remaining time; the body filters
//! enforce the deadline and the body limit; `fail_to_proxy` writes every error; `logging`
//! records the outcome.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use crds::names::REQUEST_TIMEOUT_HEADER;
use http::header;
use internal_token::watch::Watched;
use internal_token::{Claims, Forwarded, Signer};
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::time::Instant;

use crate::error::Rejection;
use crate::metrics::Metrics;
use crate::request::{parse_model_path, parse_request_timeout, presented_token};
use crate::snapshot::{InflightGuard, Model, pick_endpoint};
use crate::state::{RequestGuard, Shared};
use crate::watchdog::Watchdog;

/// Time allowed to open a connection to a runtime, within the request's deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest silence of an upstream once connected (docs/architecture.md, limits: SSE idle).
const UPSTREAM_IDLE_READ: Duration = Duration::from_secs(300);
/// How long an idle pooled upstream connection is kept (docs/architecture.md, limits).
const UPSTREAM_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
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
    /// Signs the JWT each forwarded request carries to its runtime; `None` forwards unsigned.
    pub signer: Option<Arc<Watched<Signer>>>,
}

/// What a request carries from one filter to the next.
#[derive(Debug)]
pub struct RequestCtx {
    started: Instant,
    request_id: String,
    model: Option<Arc<Model>>,
    token_id: Option<String>,
    upstream_path: String,
    deadline: Instant,
    budget: Duration,
    tried: Vec<SocketAddr>,
    endpoint: Option<InflightGuard>,
    body_bytes: u64,
    sse: bool,
    /// The error written to the client, when the proxy answered itself.
    rejection: Option<Rejection>,
    watchdog: Option<Watchdog>,
    /// Whether the request counts in the `inflight` gauge.
    forwarding: bool,
    _in_progress: RequestGuard,
}

impl RequestCtx {
    fn model_label(&self) -> &str {
        self.model.as_ref().map_or("-", |m| m.id.as_str())
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A client's `X-Request-Id` when it is short printable ASCII, or a fresh one.
fn request_id(session: &Session) -> String {
    session
        .req_header()
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
fn internal_credential(signer: &Watched<Signer>, ctx: &RequestCtx) -> Result<String> {
    let (Some(model), Some(token_record_id)) = (&ctx.model, &ctx.token_id) else {
        return Error::e_explain(
            ErrorType::InternalError,
            "forwarding a request that no token authorized",
        );
    };
    let now = std::time::SystemTime::now();
    let claims = Claims::new(
        Forwarded {
            model_version_id: &model.id,
            token_record_id,
            request_id: &ctx.request_id,
            remaining: ctx.remaining(),
        },
        now,
    );
    let jwt = signer.current().sign(&claims, now).map_err(|e| {
        Error::because(
            ErrorType::InternalError,
            "signing the internal credential",
            e,
        )
    })?;
    Ok(format!("Bearer {jwt}"))
}

async fn write_rejection(
    session: &mut Session,
    rejection: &Rejection,
    request_id: &str,
) -> Result<()> {
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
        session,
        rejection.status(),
        rejection.body(),
        request_id,
        &headers,
    )
    .await
}

async fn write_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    headers: &[(&'static str, String)],
) -> Result<()> {
    let mut response = ResponseHeader::build(status, Some(5))?;
    response.insert_header(header::CONTENT_TYPE, "application/json")?;
    response.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    response.insert_header(REQUEST_ID_HEADER, request_id)?;
    for (name, value) in headers {
        response.insert_header(*name, value.as_str())?;
    }
    session
        .write_response_header(Box::new(response), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

impl Gateway {
    /// Answers the request with `rejection` and ends it (`Ok(true)` of `request_filter`).
    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        rejection: Rejection,
    ) -> Result<bool> {
        if rejection.is_auth_failure() {
            self.metrics
                .auth_failures
                .with_label_values(&[rejection.code()])
                .inc();
        }
        write_rejection(session, &rejection, &ctx.request_id).await?;
        ctx.rejection = Some(rejection);
        Ok(true)
    }

    /// The route, credential, deadline and body-size checks, in the contract's order.
    fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<(), Rejection> {
        let request = session.req_header();
        self.header_limits.check(request)?;
        let route = parse_model_path(request.uri.path()).ok_or(Rejection::RouteNotFound)?;
        let presented = presented_token(
            request
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            request.headers.get(BEARER_HEADER).map(|v| v.as_bytes()),
        );
        let snapshot = self.shared.snapshot();
        let (record, model) =
            snapshot.authorize(presented, route.model_id, jiff::Timestamp::now())?;
        ctx.token_id = Some(record.id.clone());
        ctx.model = Some(model.clone());

        ctx.budget = match request.headers.get(REQUEST_TIMEOUT_HEADER) {
            Some(value) => parse_request_timeout(value.as_bytes(), model.timeouts.max)?,
            None => model.timeouts.default,
        };
        ctx.deadline = ctx.started + ctx.budget;

        let declared_length = request
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > model.max_body_bytes) {
            return Err(Rejection::BodyTooLarge {
                limit: model.max_body_bytes,
            });
        }
        if model.endpoints.is_empty() {
            return Err(Rejection::NoReadyEndpoint {
                model: model.id.clone(),
            });
        }
        ctx.upstream_path = match request.uri.query() {
            Some(query) => format!("{}?{query}", route.upstream_path),
            None => route.upstream_path.to_owned(),
        };
        Ok(())
    }

    /// The error a failed exchange ends in, when no filter recorded one.
    fn classify(&self, error: &Error, ctx: &RequestCtx) -> Option<Rejection> {
        if Instant::now() >= ctx.deadline {
            return Some(Rejection::Timeout { budget: ctx.budget });
        }
        match (error.esource(), error.etype()) {
            (ErrorSource::Downstream, _) => None,
            (
                _,
                ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectNoRoute
                | ErrorType::ConnectError,
            ) => Some(Rejection::UpstreamUnavailable),
            _ => Some(Rejection::UpstreamFailed),
        }
    }
}

fn deadline_error() -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(504), "request deadline reached")
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        let started = Instant::now();
        RequestCtx {
            started,
            request_id: String::new(),
            model: None,
            token_id: None,
            upstream_path: String::new(),
            deadline: started + crds::RequestTimeouts::default().default,
            budget: crds::RequestTimeouts::default().default,
            tried: Vec::new(),
            endpoint: None,
            body_bytes: 0,
            sse: false,
            rejection: None,
            watchdog: None,
            forwarding: false,
            _in_progress: self.shared.track_request(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = request_id(session);
        if let Some(current) = session.get_keepalive() {
            // 0 is pingora's "forever"; a client's own shorter Keep-Alive timeout is kept.
            let bounded = if current == 0 {
                self.keepalive_idle_secs
            } else {
                current.min(self.keepalive_idle_secs)
            };
            session.set_keepalive(Some(bounded.max(1)));
        }
        if self.shared.is_draining() {
            // Shutting down: the client's next request goes to a new connection, which a
            // load balancer sends to another replica.
            session.set_keepalive(None);
        }
        match session.req_header().uri.path() {
            "/healthz" => {
                write_json(
                    session,
                    200,
                    Bytes::from_static(br#"{"status":"ok"}"#),
                    &ctx.request_id,
                    &[],
                )
                .await?;
                return Ok(true);
            }
            "/readyz" => {
                let (status, body): (u16, &'static [u8]) = if self.shared.is_ready() {
                    (200, br#"{"status":"ready"}"#)
                } else if self.shared.is_draining() {
                    (503, br#"{"status":"draining"}"#)
                } else {
                    (503, br#"{"status":"syncing"}"#)
                };
                write_json(
                    session,
                    status,
                    Bytes::from_static(body),
                    &ctx.request_id,
                    &[],
                )
                .await?;
                return Ok(true);
            }
            _ => {}
        }
        match self.admit(session, ctx) {
            Ok(()) => {
                self.metrics
                    .inflight
                    .with_label_values(&[ctx.model_label()])
                    .inc();
                ctx.forwarding = true;
                Ok(false)
            }
            Err(rejection) => self.reject(session, ctx, rejection).await,
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let limit = ctx.model.as_ref().map_or(u64::MAX, |m| m.max_body_bytes);
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_bytes > limit {
            // A chunked body has no declared length; it is cut here, before its end reaches
            // the runtime, so the runtime sees a broken request rather than a complete one.
            ctx.rejection = Some(Rejection::BodyTooLarge { limit });
            return Err(Error::explain(
                ErrorType::HTTPStatus(413),
                "request body over the limit",
            ));
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let model = ctx
            .model
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no model resolved"))?;
        let remaining = ctx.remaining();
        if remaining.is_zero() {
            ctx.rejection = Some(Rejection::Timeout { budget: ctx.budget });
            return Err(deadline_error());
        }
        let Some(endpoint) = pick_endpoint(&model.endpoints, &ctx.tried) else {
            ctx.rejection = Some(Rejection::UpstreamUnavailable);
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "every endpoint failed to connect",
            ));
        };
        ctx.tried.push(endpoint.addr);
        let mut peer = HttpPeer::new(endpoint.addr, false, String::new());
        peer.options.connection_timeout = Some(remaining.min(CONNECT_TIMEOUT));
        peer.options.read_timeout = Some(UPSTREAM_IDLE_READ);
        peer.options.idle_timeout = Some(UPSTREAM_KEEPALIVE_IDLE);
        ctx.endpoint = Some(InflightGuard::new(endpoint));
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the endpoint, so another one may take the request.
        ctx.endpoint = None;
        let untried_left = ctx
            .model
            .as_ref()
            .is_some_and(|m| m.endpoints.iter().any(|ep| !ctx.tried.contains(&ep.addr)));
        e.set_retry(untried_left && !ctx.remaining().is_zero());
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.watchdog = Some(Watchdog::arm(fd, ctx.deadline).map_err(|e| {
            Error::because(
                ErrorType::InternalError,
                "cannot arm the deadline watchdog",
                e,
            )
        })?);
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let uri = ctx
            .upstream_path
            .parse()
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "upstream path", e))?;
        upstream_request.set_uri(uri);
        upstream_request.remove_header(&header::AUTHORIZATION);
        upstream_request.remove_header(BEARER_HEADER);
        upstream_request.insert_header(
            REQUEST_TIMEOUT_HEADER,
            format!("{:.3}", ctx.remaining().as_secs_f64()),
        )?;
        upstream_request.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        if let Some(signer) = &self.signer {
            upstream_request
                .insert_header(header::AUTHORIZATION, internal_credential(signer, ctx)?)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.metrics
            .upstream_ttfb
            .with_label_values(&[ctx.model_label()])
            .observe(ctx.started.elapsed().as_secs_f64());
        ctx.sse = upstream_response
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
        if ctx.sse {
            upstream_response.insert_header("x-accel-buffering", "no")?;
        }
        upstream_response.insert_header(REQUEST_ID_HEADER, ctx.request_id.as_str())?;
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if end_of_stream {
            // Disarm before pingora returns the connection to its pool for another request.
            ctx.watchdog = None;
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if !end_of_stream && Instant::now() >= ctx.deadline {
            *body = None;
            ctx.rejection = Some(Rejection::Timeout { budget: ctx.budget });
            return Err(deadline_error());
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let rejection = ctx.rejection.take().or_else(|| self.classify(e, ctx));
        let Some(rejection) = rejection else {
            // The client went away: nobody to answer.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let written = if session.response_written().is_none() {
            // The connection closes after this answer (`can_reuse_downstream` below): saying
            // so keeps a client from sending its next request into a closing socket.
            session.set_keepalive(None);
            write_rejection(session, &rejection, &ctx.request_id).await
        } else if ctx.sse {
            // Mid-stream an SSE client gets an error event and a clean end of the stream;
            // any other body is cut, so that a truncated response never looks complete.
            session
                .write_response_body(Some(rejection.sse_event()), true)
                .await
        } else {
            Ok(())
        };
        if let Err(error) = written {
            tracing::debug!(request_id = %ctx.request_id, %error, "could not write the error response");
        }
        let error_code = rejection.status();
        ctx.rejection = Some(rejection);
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.watchdog = None;
        crate::header_guard::expect_next_head(session.as_downstream().stream());
        let status = match (&ctx.rejection, session.response_written()) {
            // A stream cut by the deadline went out as 200 but ended as a timeout.
            (Some(rejection), _) => rejection.status(),
            (None, Some(response)) => response.status.as_u16(),
            // Client closed before any response, in nginx's words.
            (None, None) => 499,
        };
        let model = ctx.model_label().to_owned();
        let elapsed = ctx.started.elapsed();
        self.metrics
            .requests
            .with_label_values(&[model.as_str(), &status.to_string()])
            .inc();
        if ctx.model.is_some() {
            self.metrics
                .request_duration
                .with_label_values(&[model.as_str()])
                .observe(elapsed.as_secs_f64());
        }
        if ctx.forwarding {
            self.metrics
                .inflight
                .with_label_values(&[model.as_str()])
                .dec();
        }
        let request = session.req_header();
        tracing::info!(
            request_id = %ctx.request_id,
            method = %request.method,
            model = %model,
            token = %ctx.token_id.as_deref().unwrap_or("-"),
            status,
            code = %ctx.rejection.as_ref().map_or("-", |r| r.code()),
            upstream = %ctx.endpoint.as_ref().map_or_else(|| "-".to_owned(), |e| e.endpoint().addr.to_string()),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
}
