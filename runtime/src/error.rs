//! Every error a client can get from the runtime, mapped in one place to its status, `type`
//! and `code`, in the error body shared with the proxy:
//! `{"error":{"message","type","code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// How a model pass failed. Backends return these; `ApiError` maps them to a status once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The device had no memory for the pass (a smaller load may fit: 503 with Retry-After).
    #[error("the device ran out of memory: {0}")]
    OutOfMemory(String),
    /// The pass panicked; the model thread caught it and goes on.
    #[error("the model panicked: {0}")]
    Panicked(String),
    /// libtorch refused an operation (a shape, a dtype, a device).
    #[error("a tensor operation failed: {0}")]
    Tensor(String),
    /// The model's output cannot be turned into an answer (a value out of range, a shape that
    /// does not match the input).
    #[error("the model's output is unusable: {0}")]
    Output(String),
    #[error("the model answered {got} of a pass's {expected} jobs")]
    WrongOutputCount { expected: usize, got: usize },
    /// Work stopped part-way because its client left or its deadline passed.
    #[error("abandoned: the client left or its deadline passed")]
    Abandoned,
}

impl BackendError {
    /// A panic's message, as the kind of failure it reports.
    pub fn from_panic(message: String) -> BackendError {
        if is_out_of_memory(&message) {
            BackendError::OutOfMemory(message)
        } else {
            BackendError::Panicked(message)
        }
    }
}

/// CUDA's and the CPU allocator's words for an allocation that failed.
fn is_out_of_memory(message: &str) -> bool {
    message.contains("out of memory") || message.contains("DefaultCPUAllocator: can't allocate")
}

impl From<tch::TchError> for BackendError {
    fn from(error: tch::TchError) -> Self {
        let message = error.to_string();
        if is_out_of_memory(&message) {
            BackendError::OutOfMemory(message)
        } else {
            BackendError::Tensor(message)
        }
    }
}

/// The error body the runtime and the proxy share, `{"error":{"code","message","type"}}`; a
/// stream's `event: error` carries the same.
#[derive(Debug, serde::Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Fields in alphabetical order: the order the body had when it was built as a JSON map.
#[derive(Debug, serde::Serialize)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl From<&ApiError> for ErrorBody {
    fn from(error: &ApiError) -> ErrorBody {
        let (kind, code) = error.kind_and_code();
        ErrorBody {
            error: ErrorDetail {
                code,
                message: error.to_string(),
                kind,
            },
        }
    }
}

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not UTF-8.
    #[error("{0}")]
    MalformedBody(String),
    /// The body is JSON but a field is wrong; the message names the field.
    #[error("{0}")]
    InvalidField(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Tabular input that does not fit the model's signature (shape or dtype).
    #[error("{0}")]
    SchemaMismatch(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{field}: exceeds the limit of {limit} bytes")]
    FieldTooLarge { field: String, limit: u64 },
    /// An upload that is not audio, or not whole; the message names the field.
    #[error("{0}")]
    InvalidAudio(String),
    #[error("{0}")]
    AudioTooLong(String),
    #[error(
        "input {index} has {tokens} tokens, more than this model's limit of {limit}; send `truncate: true` to cut it"
    )]
    InputTooLong {
        index: usize,
        tokens: usize,
        limit: usize,
    },
    #[error("{field} has {count} items, more than the limit of {limit}")]
    TooManyInputs {
        field: &'static str,
        count: usize,
        limit: usize,
    },
    /// A chat template that cannot render this chat (the model's or the request's).
    #[error("{0}")]
    Template(String),
    #[error("OICM-Request-Timeout must be a positive number of seconds")]
    InvalidTimeout,
    #[error("the request did not complete within its OICM-Request-Timeout deadline")]
    Timeout,
    #[error("the model is still loading")]
    Loading,
    #[error("too many requests in progress; retry shortly")]
    Overloaded,
    /// The time rule of admission: the request cannot be served in time.
    #[error(transparent)]
    Saturated(#[from] crate::admission::Refusal),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A model pass failed (see `BackendError`).
    #[error("inference failed: {0}")]
    Backend(#[from] BackendError),
    /// Work around the model failed (a blocking task died).
    #[error("internal error: {0}")]
    Internal(String),
    #[error("no route {0}")]
    NotFound(String),
    /// The request does not carry a JWT the proxy signed for this model (`--internal-keys`).
    #[error(transparent)]
    Unauthenticated(#[from] internal_token::Refusal),
}

impl ApiError {
    /// Status, `type` and `code` of each error.
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::MalformedBody(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
            ),
            ApiError::InvalidField(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_field",
            ),
            ApiError::SchemaMismatch(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "schema_mismatch",
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
            ),
            ApiError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
            ),
            ApiError::FieldTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "field_too_large",
            ),
            ApiError::InvalidAudio(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_audio",
            ),
            ApiError::AudioTooLong(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "audio_too_long",
            ),
            ApiError::InputTooLong { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "input_too_long",
            ),
            ApiError::TooManyInputs { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "too_many_inputs",
            ),
            ApiError::Template(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_chat_template",
            ),
            ApiError::InvalidTimeout => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_timeout",
            ),
            ApiError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", "timeout"),
            ApiError::Loading => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "model_loading",
            ),
            ApiError::Overloaded | ApiError::Saturated(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded_error",
                "overloaded",
            ),
            ApiError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "shutting_down",
            ),
            ApiError::Backend(BackendError::OutOfMemory(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "out_of_memory",
            ),
            ApiError::Backend(BackendError::Abandoned) => {
                (StatusCode::GATEWAY_TIMEOUT, "timeout_error", "timeout")
            }
            ApiError::Backend(BackendError::Panicked(_)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "model_panicked",
            ),
            ApiError::Backend(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "inference_failed",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found_error", "not_found"),
            ApiError::Unauthenticated(refusal) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                refusal.code(),
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// `type` and `code` of the error body (also used by the `event: error` of streams).
    pub fn kind_and_code(&self) -> (&'static str, &'static str) {
        let (_, kind, code) = self.parts();
        (kind, code)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, axum::Json(ErrorBody::from(&self))).into_response();
        let retry_after = match self {
            ApiError::Saturated(refusal) => Some(refusal.retry_after()),
            ApiError::Overloaded
            | ApiError::Loading
            | ApiError::ShuttingDown
            | ApiError::Backend(BackendError::OutOfMemory(_)) => Some(1),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="infergate-runtime""#),
            );
        }
        response
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as R;
        match rejection {
            // serde's message with the path of the field at fault, e.g. "inputs: invalid type".
            R::JsonDataError(e) => ApiError::InvalidField(e.body_text().replace(
                "Failed to deserialize the JSON body into the target type: ",
                "",
            )),
            R::JsonSyntaxError(e) => ApiError::MalformedBody(e.body_text()),
            R::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".to_owned(),
            ),
            R::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::BodyTooLarge {
                    limit: crate::server::MAX_JSON_BODY_BYTES,
                }
            }
            other => ApiError::MalformedBody(other.body_text()),
        }
    }
}
