//! Each task request's usage, reported to the proxy (`internal_token::usage`): handlers record
//! units into the meter of the request they serve, and the middleware writes what the meter
//! holds into the `infergate-usage` header, or, for a stream, into a comment after its last
//! event, once the stream has ended.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use internal_token::usage::{HEADER, Unit, Usage};

/// The usage of one request so far; shared with the work that outlives its handler (a stream).
#[derive(Debug, Default)]
pub struct Meter(Mutex<Usage>);

impl Meter {
    pub fn add(&self, unit: Unit, amount: f64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(unit, amount);
    }

    fn usage(&self) -> Usage {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

tokio::task_local! {
    static METER: Arc<Meter>;
}

/// Adds to the usage of the request whose handler this task runs (nothing outside one).
pub fn record(unit: Unit, amount: f64) {
    let _ = METER.try_with(|meter| meter.add(unit, amount));
}

/// The meter of the request being handled, for work that goes on after the handler returns.
pub fn current() -> Option<Arc<Meter>> {
    METER.try_with(Arc::clone).ok()
}

/// Reports the usage of a task request: a header on an answer sent whole; a last comment on an
/// event stream, written after its last event, when the stream's total is known.
pub async fn report(request: Request, next: Next) -> Response {
    let meter = Arc::new(Meter::default());
    let mut response = METER.scope(meter.clone(), next.run(request)).await;
    let streamed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streamed {
        let (parts, body) = response.into_parts();
        // Polled only once the events are over; nothing when nothing was used.
        let comment = futures::stream::once(async move {
            let usage = meter.usage();
            (!usage.is_empty()).then(|| Ok(Bytes::from(usage.stream_comment())))
        })
        .filter_map(std::future::ready);
        let body = body.into_data_stream().chain(comment);
        return Response::from_parts(parts, Body::from_stream(body));
    }
    let usage = meter.usage();
    if !usage.is_empty()
        && let Ok(value) = HeaderValue::from_str(&usage.to_string())
    {
        response.headers_mut().insert(HEADER, value);
    }
    response
}
