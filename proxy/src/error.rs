//! Every way the proxy refuses or fails a request, and the one table that maps each to its HTTP
//! status, `code` and error body (docs/architecture.md, proxy contract).

use std::time::Duration;

use bytes::Bytes;

use crate::request::TimeoutHeaderError;

/// A request the proxy answers itself instead of forwarding, or a forwarded request that failed.
/// Messages name models by id and never repeat any part of a token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("no route for this path; model APIs live under /models/<id>/proxy/")]
    RouteNotFound,
    #[error("missing credential: send `Authorization: Bearer <token>`")]
    MissingToken,
    #[error("the token is not valid")]
    InvalidToken,
    #[error("the token has expired")]
    TokenExpired,
    #[error("the token has been revoked")]
    TokenRevoked,
    #[error("the token may not call model {model:?}")]
    ModelNotAllowed { model: String },
    #[error("model {model:?} does not exist")]
    ModelNotFound { model: String },
    #[error(transparent)]
    InvalidTimeout(#[from] TimeoutHeaderError),
    #[error("the request states both Content-Length and Transfer-Encoding; send one")]
    ConflictingFraming,
    #[error("the request head is not valid HTTP/1.1")]
    MalformedRequest,
    #[error("CONNECT is not served; model APIs take POST and GET")]
    MethodNotAllowed,
    #[error("request headers exceed {max_count} fields or {max_bytes} bytes")]
    HeadersTooLarge { max_bytes: usize, max_count: usize },
    #[error("request body exceeds this model's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("model {model:?} has no ready endpoint; retry shortly")]
    NoReadyEndpoint { model: String },
    #[error(
        "model {model:?} is scaling up from zero and had no ready endpoint within the request's deadline of {}s; retry shortly",
        .budget.as_secs_f64()
    )]
    StartOutlasted { model: String, budget: Duration },
    #[error(
        "model {model:?} is scaling up from zero and already holds {limit} requests; retry shortly"
    )]
    HoldFull { model: String, limit: usize },
    #[error("the model's server could not be reached")]
    UpstreamUnavailable,
    #[error("the model's server failed to answer")]
    UpstreamFailed,
    #[error("the request did not complete within its deadline of {}s", .budget.as_secs_f64())]
    Timeout { budget: Duration },
    #[error(
        "the token is over its limit of {limit} ({enforced} enforced by this proxy); retry after {retry_after} s"
    )]
    LimitExceeded {
        limit: Limit,
        /// The figure enforced: the whole limit with a shared store, this replica's share
        /// without one.
        enforced: f64,
        retry_after: u32,
    },
    #[error("the token's limits cannot be checked now (their store is unreachable); retry shortly")]
    LimitsUnavailable,
}

/// Which of a token's limits a request is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    RequestsPerMinute,
    ConcurrentRequests,
    TokensPerMinute,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limit::RequestsPerMinute => "requests per minute",
            Limit::ConcurrentRequests => "concurrent requests",
            Limit::TokensPerMinute => "generation tokens per minute",
        })
    }
}

impl Rejection {
    /// HTTP status of the response.
    pub fn status(&self) -> u16 {
        match self {
            Rejection::RouteNotFound | Rejection::ModelNotFound { .. } => 404,
            Rejection::MissingToken
            | Rejection::InvalidToken
            | Rejection::TokenExpired
            | Rejection::TokenRevoked => 401,
            Rejection::ModelNotAllowed { .. } => 403,
            Rejection::InvalidTimeout(_)
            | Rejection::ConflictingFraming
            | Rejection::MalformedRequest => 400,
            Rejection::MethodNotAllowed => 405,
            Rejection::BodyTooLarge { .. } => 413,
            Rejection::HeadersTooLarge { .. } => 431,
            Rejection::NoReadyEndpoint { .. }
            | Rejection::StartOutlasted { .. }
            | Rejection::HoldFull { .. }
            | Rejection::UpstreamUnavailable
            | Rejection::LimitsUnavailable => 503,
            Rejection::LimitExceeded { .. } => 429,
            Rejection::UpstreamFailed => 502,
            Rejection::Timeout { .. } => 504,
        }
    }

    /// Machine-readable `code` of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::RouteNotFound => "not_found",
            Rejection::MissingToken => "missing_token",
            Rejection::InvalidToken => "invalid_token",
            Rejection::TokenExpired => "token_expired",
            Rejection::TokenRevoked => "token_revoked",
            Rejection::ModelNotAllowed { .. } => "model_not_allowed",
            Rejection::ModelNotFound { .. } => "model_not_found",
            Rejection::InvalidTimeout(_) => "invalid_timeout",
            Rejection::ConflictingFraming => "conflicting_framing",
            Rejection::MalformedRequest => "malformed_request",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::BodyTooLarge { .. } => "body_too_large",
            Rejection::HeadersTooLarge { .. } => "headers_too_large",
            Rejection::NoReadyEndpoint { .. } => "no_ready_endpoint",
            Rejection::StartOutlasted { .. } | Rejection::HoldFull { .. } => "model_starting",
            Rejection::UpstreamUnavailable => "upstream_unavailable",
            Rejection::UpstreamFailed => "upstream_error",
            Rejection::Timeout { .. } => "timeout",
            Rejection::LimitExceeded { limit, .. } => match limit {
                Limit::RequestsPerMinute => "requests_per_minute_exceeded",
                Limit::ConcurrentRequests => "concurrent_requests_exceeded",
                Limit::TokensPerMinute => "tokens_per_minute_exceeded",
            },
            Rejection::LimitsUnavailable => "limits_unavailable",
        }
    }

    /// Reason phrase of the status line, for responses written below pingora.
    pub fn reason(&self) -> &'static str {
        http::StatusCode::from_u16(self.status())
            .ok()
            .and_then(|status| status.canonical_reason())
            .unwrap_or("Error")
    }

    /// Broad class of the error, the `type` of the error body.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            400 | 405 | 413 | 431 => "invalid_request_error",
            504 => "timeout_error",
            429 => "rate_limit_error",
            _ => "upstream_error",
        }
    }

    /// Whether the failure is an authentication failure, for `auth_failures_total{reason}`.
    pub fn is_auth_failure(&self) -> bool {
        matches!(self.status(), 401 | 403)
    }

    /// Seconds a client should wait before retrying, sent as `Retry-After`.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            // A runtime pod takes seconds to start: an earlier retry would be held again.
            Rejection::StartOutlasted { .. } | Rejection::HoldFull { .. } => Some(5),
            Rejection::LimitExceeded { retry_after, .. } => Some(*retry_after),
            _ => (self.status() == 503).then_some(1),
        }
    }

    /// `x-should-retry` for clients that retry on their own: a deadline is not worth another
    /// try of the same request.
    pub fn should_retry(&self) -> Option<bool> {
        matches!(self, Rejection::Timeout { .. }).then_some(false)
    }

    /// The JSON error body shared by the proxy and the runtimes.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {"message": self.to_string(), "type": self.error_type(), "code": self.code()}
        });
        Bytes::from(body.to_string())
    }

    /// The SSE event that ends a stream cut by the deadline, so a client sees why it ended.
    pub fn sse_event(&self) -> Bytes {
        let mut event = b"event: error\ndata: ".to_vec();
        event.extend_from_slice(&self.body());
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_of_the_contract_has_its_status_and_code() {
        let m = || "minilm".to_owned();
        let table = [
            (Rejection::MissingToken, 401, "missing_token"),
            (Rejection::InvalidToken, 401, "invalid_token"),
            (Rejection::TokenExpired, 401, "token_expired"),
            (Rejection::TokenRevoked, 401, "token_revoked"),
            (
                Rejection::ModelNotAllowed { model: m() },
                403,
                "model_not_allowed",
            ),
            (
                Rejection::ModelNotFound { model: m() },
                404,
                "model_not_found",
            ),
            (
                Rejection::NoReadyEndpoint { model: m() },
                503,
                "no_ready_endpoint",
            ),
            (
                Rejection::StartOutlasted {
                    model: m(),
                    budget: Duration::from_secs(2),
                },
                503,
                "model_starting",
            ),
            (
                Rejection::HoldFull {
                    model: m(),
                    limit: 1,
                },
                503,
                "model_starting",
            ),
            (
                Rejection::InvalidTimeout(TimeoutHeaderError::NotAPositiveNumber),
                400,
                "invalid_timeout",
            ),
            (
                Rejection::Timeout {
                    budget: Duration::from_secs(1),
                },
                504,
                "timeout",
            ),
            (Rejection::BodyTooLarge { limit: 1 }, 413, "body_too_large"),
            (
                Rejection::LimitExceeded {
                    limit: Limit::TokensPerMinute,
                    enforced: 1000.0,
                    retry_after: 3,
                },
                429,
                "tokens_per_minute_exceeded",
            ),
            (Rejection::LimitsUnavailable, 503, "limits_unavailable"),
            (Rejection::ConflictingFraming, 400, "conflicting_framing"),
            (Rejection::MalformedRequest, 400, "malformed_request"),
            (Rejection::MethodNotAllowed, 405, "method_not_allowed"),
            (
                Rejection::HeadersTooLarge {
                    max_bytes: 1,
                    max_count: 1,
                },
                431,
                "headers_too_large",
            ),
        ];
        for (rejection, status, code) in table {
            assert_eq!(
                (rejection.status(), rejection.code()),
                (status, code),
                "{rejection:?}"
            );
        }
    }

    #[test]
    fn error_bodies_have_the_shared_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&Rejection::TokenExpired.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "the token has expired", "type": "authentication_error", "code": "token_expired"
            }})
        );
    }

    #[test]
    fn only_unavailability_asks_the_client_to_retry() {
        assert_eq!(
            Rejection::NoReadyEndpoint { model: "m".into() }.retry_after(),
            Some(1)
        );
        assert_eq!(
            Rejection::StartOutlasted {
                model: "m".into(),
                budget: Duration::from_secs(1)
            }
            .retry_after(),
            Some(5),
            "a model starting from zero takes seconds"
        );
        assert_eq!(Rejection::InvalidToken.retry_after(), None);
    }

    #[test]
    fn the_deadline_sse_event_carries_the_error_body() {
        let event = Rejection::Timeout {
            budget: Duration::from_millis(1500),
        }
        .sse_event();
        let text = std::str::from_utf8(&event).unwrap();
        assert!(text.starts_with("event: error\ndata: {"), "{text}");
        assert!(text.ends_with("}\n\n"));
        assert!(text.contains(r#""code":"timeout""#));
        assert!(text.contains("1.5s"));
    }
}
