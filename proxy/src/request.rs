//! What the proxy reads from a client's request before it decides anything: which model the
//! path names, which credential was presented and which deadline was asked for.

use std::time::Duration;

/// A request path of the form `/models/{id}/proxy/{rest}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPath<'a> {
    /// The model version id from the path.
    pub model_id: &'a str,
    /// The path the runtime receives: `/{rest}`, or `/` for the endpoint root.
    pub upstream_path: &'a str,
}

/// Splits `/models/{id}/proxy/{rest}` (without the query string). `None` for any other path,
/// for an id outside `[A-Za-z0-9._-]` and for `.`/`..` segments in the forwarded part, which
/// an upstream would resolve to somewhere outside the model's API: spelled plainly, with
/// percent-encoded dots, or between separators an upstream may decode (`%2f`, `\`, `%5c`).
pub fn parse_model_path(path: &str) -> Option<ModelPath<'_>> {
    let rest = path.strip_prefix("/models/")?;
    let (model_id, rest) = rest.split_once('/')?;
    let after_proxy = rest.strip_prefix("proxy")?;
    let upstream_path = match after_proxy {
        "" | "/" => "/",
        p if p.starts_with('/') => p,
        _ => return None,
    };
    if !is_model_id(model_id) || has_dot_segment(upstream_path) {
        return None;
    }
    Some(ModelPath {
        model_id,
        upstream_path,
    })
}

/// Whether `path` holds a `.` or `..` segment in any reading an upstream might apply: segments
/// split at `/`, `\` and their percent-encodings, with `%2e` read as a dot.
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut segment_dots = Some(0usize);
    let mut i = 0;
    while i <= bytes.len() {
        let (unit, width) = match bytes.get(i..i + 3) {
            Some([b'%', a, b]) => match (a.to_ascii_lowercase(), b.to_ascii_lowercase()) {
                (b'2', b'e') => (Unit::Dot, 3),
                (b'2', b'f') | (b'5', b'c') => (Unit::Separator, 3),
                _ => (Unit::Other, 1),
            },
            _ => match bytes.get(i) {
                None | Some(b'/' | b'\\') => (Unit::Separator, 1),
                Some(b'.') => (Unit::Dot, 1),
                Some(_) => (Unit::Other, 1),
            },
        };
        match unit {
            Unit::Separator => {
                if matches!(segment_dots, Some(1 | 2)) {
                    return true;
                }
                segment_dots = Some(0);
            }
            Unit::Dot => segment_dots = segment_dots.map(|dots| dots + 1),
            Unit::Other => segment_dots = None,
        }
        i += width;
    }
    false
}

/// What one step of a path reads as, for [`has_dot_segment`].
enum Unit {
    Separator,
    Dot,
    Other,
}

fn is_model_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// The presented credential: `Authorization: Bearer <token>`, or the `Bearer: <token>` header
/// that the seed document's clients send. `Authorization` wins when both are present.
pub fn presented_token<'a>(
    authorization: Option<&'a [u8]>,
    bearer: Option<&'a [u8]>,
) -> Option<&'a str> {
    let from_authorization = authorization.and_then(|value| {
        let value = std::str::from_utf8(value).ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let from_bearer = || {
        bearer
            .and_then(|value| std::str::from_utf8(value).ok())
            .map(str::trim)
    };
    from_authorization
        .or_else(from_bearer)
        .filter(|token| !token.is_empty())
}

/// Why an `OICM-Request-Timeout` value was refused (400 `invalid_timeout`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TimeoutHeaderError {
    #[error("OICM-Request-Timeout must be a positive number of seconds")]
    NotAPositiveNumber,
    #[error("OICM-Request-Timeout exceeds this model's maximum of {max_seconds} s")]
    AboveMaximum { max_seconds: f64 },
}

/// The deadline a client asked for with `OICM-Request-Timeout: <seconds>`; fractional seconds
/// are allowed, anything above `max` is refused rather than silently capped.
pub fn parse_request_timeout(value: &[u8], max: Duration) -> Result<Duration, TimeoutHeaderError> {
    let text = std::str::from_utf8(value)
        .map_err(|_| TimeoutHeaderError::NotAPositiveNumber)?
        .trim();
    // `f64::from_str` also takes "inf", "NaN" and "1e3"; a deadline is plain digits.
    let plain_decimal = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().filter(|&b| b == b'.').count() <= 1
        && text.bytes().any(|b| b.is_ascii_digit());
    let seconds: f64 = match text.parse() {
        Ok(s) if plain_decimal && s > 0.0 => s,
        _ => return Err(TimeoutHeaderError::NotAPositiveNumber),
    };
    if seconds > max.as_secs_f64() {
        return Err(TimeoutHeaderError::AboveMaximum {
            max_seconds: max.as_secs_f64(),
        });
    }
    // Positive, yet below a nanosecond: a deadline that has passed on arrival.
    match Duration::from_secs_f64(seconds) {
        deadline if deadline.is_zero() => Err(TimeoutHeaderError::NotAPositiveNumber),
        deadline => Ok(deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths_forward_the_rest_of_the_path() {
        let parsed = parse_model_path("/models/minilm/proxy/v1/embed").unwrap();
        assert_eq!(
            parsed,
            ModelPath {
                model_id: "minilm",
                upstream_path: "/v1/embed"
            }
        );
    }

    #[test]
    fn the_proxy_root_forwards_to_the_upstream_root() {
        for path in ["/models/m-1/proxy", "/models/m-1/proxy/"] {
            assert_eq!(
                parse_model_path(path),
                Some(ModelPath {
                    model_id: "m-1",
                    upstream_path: "/"
                }),
                "{path}"
            );
        }
    }

    #[test]
    fn other_paths_name_no_model() {
        let not_model_paths = [
            "/",
            "/models",
            "/models/",
            "/models/minilm",
            "/models/minilm/",
            "/models/minilm/proxyv1/embed",
            "/models//proxy/v1",
            "/models/-bad/proxy/v1",
            "/models/a%2Fb/proxy/v1",
            "/models/minilm/proxy/../../admin",
            "/models/minilm/proxy/v1/./embed",
            "/models/minilm/proxy/%2e%2e/%2E%2E/models/other/proxy/v1",
            "/models/minilm/proxy/.%2e/admin",
            "/models/minilm/proxy/..%2f..%2fadmin",
            "/models/minilm/proxy/..%5Cadmin",
            "/models/minilm/proxy/..\\..\\admin",
            "/models/minilm/proxy/v1/..",
            "/healthz",
        ];
        for path in not_model_paths {
            assert_eq!(parse_model_path(path), None, "{path}");
        }
    }

    #[test]
    fn dots_and_encoded_slashes_inside_a_segment_are_forwarded() {
        for path in [
            "/v1/models/org%2Fname",
            "/v1/files/report.v2..json",
            "/v1/...",
            "/v1/%2e%2e%2e",
            "/v1/a.b/c",
        ] {
            let full = format!("/models/minilm/proxy{path}");
            assert_eq!(
                parse_model_path(&full).map(|p| p.upstream_path),
                Some(path),
                "{full}"
            );
        }
    }

    #[test]
    fn authorization_bearer_is_read_case_insensitively() {
        assert_eq!(
            presented_token(Some(b"Bearer igt_abc"), None),
            Some("igt_abc")
        );
        assert_eq!(
            presented_token(Some(b"bearer  igt_abc "), None),
            Some("igt_abc")
        );
        assert_eq!(presented_token(Some(b"Basic dXNlcjpwdw=="), None), None);
    }

    #[test]
    fn the_seed_documents_bearer_header_is_accepted_and_authorization_wins() {
        assert_eq!(presented_token(None, Some(b" igt_seed")), Some("igt_seed"));
        assert_eq!(
            presented_token(Some(b"Bearer igt_auth"), Some(b"igt_seed")),
            Some("igt_auth")
        );
        assert_eq!(
            presented_token(Some(b"Basic x"), Some(b"igt_seed")),
            Some("igt_seed")
        );
    }

    #[test]
    fn empty_or_non_utf8_credentials_count_as_missing() {
        assert_eq!(presented_token(None, None), None);
        assert_eq!(presented_token(Some(b"Bearer "), Some(b"")), None);
        assert_eq!(presented_token(Some(b"Bearer \xff\xfe"), None), None);
    }

    #[test]
    fn timeout_header_takes_whole_and_fractional_seconds_up_to_the_maximum() {
        let max = Duration::from_secs(600);
        assert_eq!(
            parse_request_timeout(b"30", max),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(
            parse_request_timeout(b" 0.25 ", max),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(parse_request_timeout(b"600", max), Ok(max));
    }

    #[test]
    fn timeout_header_refuses_anything_but_a_positive_decimal() {
        let max = Duration::from_secs(600);
        for bad in [
            "",
            "0",
            "0.0",
            "-5",
            "1e3",
            "inf",
            "NaN",
            "10s",
            "1.2.3",
            ".",
            "\u{ff}",
            // Positive but under a nanosecond (found by the timeout_header fuzz target).
            ".0000000000000000000000000000373309811",
        ] {
            assert_eq!(
                parse_request_timeout(bad.as_bytes(), max),
                Err(TimeoutHeaderError::NotAPositiveNumber),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn timeout_header_above_the_models_maximum_is_refused() {
        assert_eq!(
            parse_request_timeout(b"601", Duration::from_secs(600)),
            Err(TimeoutHeaderError::AboveMaximum { max_seconds: 600.0 })
        );
    }
}
