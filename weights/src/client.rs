//! The HTTP client under `object_store` and the Hub's API: hyper on rustls with ring and the
//! system's roots, the stack the workspace already builds (for kube and the https downloads).
//!
//! `object_store`'s own client is reqwest, whose TLS is aws-lc or no provider at all; with
//! Cargo's feature unification, the latter would have turned every reqwest client of the
//! workspace's tests into one that panics without a process-wide provider. Its `HttpService`
//! trait is the seam for exactly this. What reqwest did that matters here is done below:
//! redirects (the Hub sends large files on to a CDN) without the token when they leave the
//! host, and a limit on a response that stops sending.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, LOCATION};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector as StoreConnector, HttpError, HttpErrorKind, HttpRequest,
    HttpRequestBody, HttpResponse, HttpResponseBody, HttpService,
};

/// Redirects followed (hubs and object stores answer with one to a signed URL).
const MAX_REDIRECTS: usize = 10;

/// How long a response may send nothing before it counts as broken (and is retried or
/// resumed).
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// An HTTP client, with a bearer token for its first host.
#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, HttpRequestBody>,
    bearer: Option<HeaderValue>,
}

impl Http {
    pub fn new(bearer: Option<&str>) -> std::io::Result<Http> {
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        connector.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let bearer = bearer
            .map(|token| {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| std::io::Error::other("the token is not a valid header value"))?;
                value.set_sensitive(true);
                Ok::<_, std::io::Error>(value)
            })
            .transpose()?;
        Ok(Http {
            client: Client::builder(TokioExecutor::new()).build(https),
            bearer,
        })
    }

    /// Sends `request`, following redirects of GET and HEAD; the token goes to the first host
    /// only.
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        let first_origin = origin(&parts.uri);
        let mut uri = parts.uri.clone();
        let mut body = Some(body);
        for _ in 0..=MAX_REDIRECTS {
            let mut request = Request::builder()
                .method(parts.method.clone())
                .uri(uri.clone());
            for (name, value) in &parts.headers {
                request = request.header(name, value);
            }
            if let Some(bearer) = &self.bearer
                && origin(&uri) == first_origin
            {
                request = request.header(AUTHORIZATION, bearer);
            }
            let request = request
                .body(body.take().unwrap_or_else(HttpRequestBody::empty))
                .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
            let response = self.client.request(request).await.map_err(|e| {
                let kind = if e.is_connect() {
                    HttpErrorKind::Connect
                } else {
                    HttpErrorKind::Request
                };
                HttpError::new(kind, e)
            })?;
            let redirect = response.status().is_redirection()
                && matches!(parts.method, Method::GET | Method::HEAD)
                && response.headers().contains_key(LOCATION);
            if !redirect {
                let (parts, body) = response.into_parts();
                let body = HttpResponseBody::new(Idle::new(body));
                return Ok(HttpResponse::from_parts(parts, body));
            }
            let location = response.headers()[LOCATION]
                .to_str()
                .map_err(|e| HttpError::new(HttpErrorKind::Decode, e))?;
            uri = resolve(&uri, location)
                .parse()
                .map_err(|e| HttpError::new(HttpErrorKind::Decode, e))?;
        }
        Err(HttpError::new(
            HttpErrorKind::Request,
            std::io::Error::other(format!("more than {MAX_REDIRECTS} redirects")),
        ))
    }

    /// GET `url`: status, headers and the whole body.
    pub async fn get(&self, url: &str) -> Result<(u16, http::HeaderMap, Bytes), HttpError> {
        let request = Request::get(url)
            .body(HttpRequestBody::empty())
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        let response = self.send(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status.as_u16(), parts.headers, body))
    }
}

#[async_trait::async_trait]
impl HttpService for Http {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.send(request).await
    }
}

/// Hands `object_store` this client.
#[derive(Debug)]
pub struct Connector(pub Http);

impl StoreConnector for Connector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

fn origin(uri: &Uri) -> (Option<String>, Option<String>, Option<u16>) {
    (
        uri.scheme_str().map(str::to_owned),
        uri.host().map(str::to_owned),
        uri.port_u16(),
    )
}

/// The absolute URL a `Location` header points to from `base`.
pub(crate) fn resolve(base: &Uri, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let origin = format!(
        "{}://{}",
        base.scheme_str().unwrap_or("https"),
        base.authority().map(|a| a.as_str()).unwrap_or_default()
    );
    if location.starts_with('/') {
        return format!("{origin}{location}");
    }
    let directory = base.path().rsplit_once('/').map_or("", |(dir, _)| dir);
    format!("{origin}{directory}/{location}")
}

/// A response body that fails once it has sent nothing for [`IDLE_LIMIT`]: a stalled
/// connection becomes an error the download resumes from, not a hang.
struct Idle {
    inner: Incoming,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(inner: Incoming) -> Idle {
        Idle {
            inner,
            timer: Box::pin(tokio::time::sleep(IDLE_LIMIT)),
        }
    }
}

impl Body for Idle {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            let deadline = tokio::time::Instant::now() + IDLE_LIMIT;
            self.timer.as_mut().reset(deadline);
            return Poll::Ready(
                frame.map(|f| f.map_err(|e| HttpError::new(HttpErrorKind::Interrupted, e))),
            );
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::new(
                HttpErrorKind::Timeout,
                std::io::Error::other(format!("no data for {} s", IDLE_LIMIT.as_secs())),
            )))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_absolute_rooted_and_relative_locations() {
        let base: Uri = "https://hub.example.com/org/model/resolve/main/m.tar"
            .parse()
            .unwrap();
        assert_eq!(
            resolve(&base, "https://cdn.example.net/x?sig=1"),
            "https://cdn.example.net/x?sig=1"
        );
        assert_eq!(
            resolve(&base, "/api/m.tar"),
            "https://hub.example.com/api/m.tar"
        );
        assert_eq!(
            resolve(&base, "v2.tar"),
            "https://hub.example.com/org/model/resolve/main/v2.tar"
        );
    }

    #[test]
    fn the_token_stays_with_its_host() {
        let hub: Uri = "https://huggingface.co/org/m/resolve/abc/model.safetensors"
            .parse()
            .unwrap();
        let cdn: Uri = "https://cdn-lfs.hf.co/repos/x?sig=1".parse().unwrap();
        let other_port: Uri = "https://huggingface.co:8443/org".parse().unwrap();
        assert_eq!(
            origin(&hub),
            origin(&"https://huggingface.co/api".parse().unwrap())
        );
        assert_ne!(origin(&hub), origin(&cdn));
        assert_ne!(origin(&hub), origin(&other_port));
    }
}
