//! Guards the request head of every downstream connection, below pingora's HTTP/1 parser.
//!
//! Two rules of the limits table (docs/architecture.md) cannot be kept once pingora's parser has
//! handed over the request head:
//! - a request head must arrive within the header-read timeout (10 s), counted from the accept
//!   of a new connection or from the first byte of a later request on a kept-alive one; pingora
//!   only bounds each single read (60 s), so a client trickling a byte at a time holds the
//!   connection forever;
//! - a request carrying both `Content-Length` and `Transfer-Encoding` gets 400 and the
//!   connection closes; pingora drops the length and reads the body as chunked before the
//!   gateway sees the request, so the ambiguity a smuggling attack relies on is invisible there.
//!
//! [`GuardedProxy`] wraps each accepted stream in a [`HeaderGuard`] that watches the bytes of
//! each request head as pingora reads them. The gateway's log step, which runs once per request,
//! re-arms the guard for the next request on the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::error::Rejection;

const HEAD_END: &[u8] = b"\r\n\r\n";

/// Wraps a pingora server app so every accepted connection is read through a [`HeaderGuard`].
pub struct GuardedProxy<A> {
    pub inner: Arc<A>,
    pub limits: HeadLimits,
}

impl<A> std::fmt::Debug for GuardedProxy<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedProxy")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What a request head may take: time to arrive, and bytes kept to inspect its fields.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub read_timeout: Duration,
    /// Heads longer than this are not inspected for framing (they are refused with 431 by the
    /// gateway anyway); the timeout still applies to them.
    pub max_bytes: usize,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for GuardedProxy<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let guarded: Stream = Box::new(HeaderGuard::new(stream, self.limits));
        self.inner.process_new(guarded, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Re-arms the guard under `stream` for the next request head of its connection.
pub fn expect_next_head(stream: Option<&Stream>) {
    if let Some(guard) = stream.and_then(|s| s.as_any().downcast_ref::<HeaderGuard>()) {
        guard.next_head.store(true, Ordering::Release);
    }
}

#[derive(Debug)]
enum Phase {
    /// Between requests of a kept-alive connection: pingora's idle timeout governs.
    Idle,
    /// Reading a request head, which must end by the deadline.
    Head,
    /// The head has been read; body bytes and responses pass untouched.
    Body,
    /// The head was refused: the 400 response is being written, then the read fails.
    Refusing { response: Vec<u8>, written: usize },
}

/// A downstream stream whose request heads are timed and inspected as they are read.
#[derive(Debug)]
pub struct HeaderGuard {
    inner: Stream,
    limits: HeadLimits,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    scanner: HeadScanner,
    next_head: AtomicBool,
}

impl HeaderGuard {
    fn new(inner: Stream, limits: HeadLimits) -> HeaderGuard {
        // A new connection owes its first head from the moment it was accepted.
        HeaderGuard {
            inner,
            limits,
            phase: Phase::Head,
            deadline: Box::pin(tokio::time::sleep(limits.read_timeout)),
            scanner: HeadScanner::default(),
            next_head: AtomicBool::new(false),
        }
    }

    /// Follows the head through the bytes just read; returns a refusal when it is complete and
    /// its framing is ambiguous.
    fn observe(&mut self, bytes: &[u8]) -> Option<Rejection> {
        if matches!(self.phase, Phase::Idle) && !bytes.is_empty() {
            self.phase = Phase::Head;
            self.deadline
                .as_mut()
                .reset(Instant::now() + self.limits.read_timeout);
        }
        if !matches!(self.phase, Phase::Head) {
            return None;
        }
        match self.scanner.feed(bytes, self.limits.max_bytes) {
            Scan::Incomplete => None,
            Scan::Complete(refusal) => {
                self.phase = Phase::Body;
                refusal
            }
        }
    }
}

/// Finds the end of a request head that arrives in pieces, and judges its framing.
#[derive(Debug, Default)]
struct HeadScanner {
    head: Vec<u8>,
    /// The head outgrew the limit: its start is gone and its fields are not inspected.
    overlong: bool,
}

#[derive(Debug, PartialEq)]
enum Scan {
    Incomplete,
    /// The head ended; a refusal when its framing is ambiguous.
    Complete(Option<Rejection>),
}

impl HeadScanner {
    fn feed(&mut self, bytes: &[u8], max_bytes: usize) -> Scan {
        let from = self.head.len().saturating_sub(HEAD_END.len() - 1);
        self.head.extend_from_slice(bytes);
        let Some(at) = self.head[from..]
            .windows(HEAD_END.len())
            .position(|w| w == HEAD_END)
        else {
            if self.head.len() > max_bytes {
                // Only the last bytes are kept, to find the end.
                self.overlong = true;
                self.head.drain(..self.head.len() - (HEAD_END.len() - 1));
            }
            return Scan::Incomplete;
        };
        let refusal = if self.overlong {
            None
        } else {
            framing_conflict(&self.head[..from + at])
        };
        *self = HeadScanner::default();
        Scan::Complete(refusal)
    }
}

/// A head that states both a length and a transfer coding: the two framings a smuggled
/// request plays against each other.
fn framing_conflict(head: &[u8]) -> Option<Rejection> {
    let mut length = false;
    let mut coding = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        length |= name.trim_ascii().eq_ignore_ascii_case(b"content-length");
        coding |= name.trim_ascii().eq_ignore_ascii_case(b"transfer-encoding");
    }
    (length && coding).then_some(Rejection::ConflictingFraming)
}

fn refusal_response(rejection: &Rejection) -> Vec<u8> {
    let body = rejection.body();
    let mut response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        rejection.status(),
        rejection.reason(),
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    response
}

impl AsyncRead for HeaderGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.next_head.swap(false, Ordering::Acquire) {
            this.phase = Phase::Idle;
        }
        if let Phase::Refusing { response, written } = &mut this.phase {
            while *written < response.len() {
                *written +=
                    ready!(Pin::new(&mut this.inner).poll_write(cx, &response[*written..]))?;
            }
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request with both Content-Length and Transfer-Encoding refused",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Some(rejection) = this.observe(&buf.filled()[before..]) {
                    tracing::warn!(
                        code = rejection.code(),
                        "refused a request head: {rejection}"
                    );
                    buf.set_filled(before);
                    this.phase = Phase::Refusing {
                        response: refusal_response(&rejection),
                        written: 0,
                    };
                    return self.poll_read(cx, buf);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if matches!(this.phase, Phase::Head) && this.deadline.as_mut().poll(cx).is_ready() {
                    tracing::info!(
                        timeout_s = this.limits.read_timeout.as_secs_f64(),
                        "closed a connection whose request head did not arrive in time"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not received within the header-read timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for HeaderGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for HeaderGuard {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeaderGuard {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderGuard {}

impl GetTimingDigest for HeaderGuard {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderGuard {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for HeaderGuard {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for HeaderGuard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_with_both_framings_is_a_conflict() {
        let head =
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked";
        assert_eq!(framing_conflict(head), Some(Rejection::ConflictingFraming));
        let spaced = b"POST /x HTTP/1.1\r\ncontent-length : 4\r\nTRANSFER-ENCODING:chunked";
        assert_eq!(
            framing_conflict(spaced),
            Some(Rejection::ConflictingFraming)
        );
    }

    #[test]
    fn one_framing_or_a_mention_in_a_value_is_not_a_conflict() {
        for head in [
            &b"POST /x HTTP/1.1\r\nContent-Length: 4"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked",
            b"POST /content-length HTTP/1.1\r\nX-Note: transfer-encoding\r\nContent-Length: 4",
        ] {
            assert_eq!(
                framing_conflict(head),
                None,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_head_is_judged_whole_however_it_is_split_across_reads() {
        let head =
            b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\nbody";
        let end = head.len() - b"body".len();
        for split in 1..head.len() {
            let mut scanner = HeadScanner::default();
            let first = scanner.feed(&head[..split], 1024);
            let second = scanner.feed(&head[split..], 1024);
            let (complete, pending) = if split >= end {
                (first, second)
            } else {
                (second, first)
            };
            assert_eq!(pending, Scan::Incomplete, "split at {split}");
            assert_eq!(
                complete,
                Scan::Complete(Some(Rejection::ConflictingFraming)),
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_overlong_head_still_ends_but_is_not_inspected() {
        let mut scanner = HeadScanner::default();
        let mut head =
            b"POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n".to_vec();
        head.extend(std::iter::repeat_n(b'a', 100));
        for piece in head.chunks(7) {
            assert_eq!(scanner.feed(piece, 64), Scan::Incomplete);
        }
        assert_eq!(scanner.feed(b"\r\n\r\n", 64), Scan::Complete(None));
        // The next head starts from a clean slate.
        assert_eq!(
            scanner.feed(b"GET / HTTP/1.1\r\n\r\n", 64),
            Scan::Complete(None)
        );
    }

    #[test]
    fn the_refusal_is_a_complete_http_response_that_closes() {
        let response = String::from_utf8(refusal_response(&Rejection::ConflictingFraming)).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        assert!(head.contains("connection: close"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(body.contains(r#""code":"conflicting_framing""#), "{body}");
    }
}
