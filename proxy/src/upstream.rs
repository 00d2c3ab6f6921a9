//! Connections to the runtimes, kept open between requests in a pool per worker thread.
//!
//! Each pingora worker runs its own single-threaded runtime, so a request takes and returns
//! connections on one thread: the pool is a thread-local list per address, with no lock, no
//! task per idle connection and no system call on reuse beyond the one read that tells
//! whether the runtime closed the connection meanwhile. Idle connections older than the
//! keep-alive limit are dropped when met, and swept from the whole pool by a timer on the
//! worker's runtime while the pool holds any, so neither an endpoint that left the snapshot nor
//! a worker that gets no more requests keeps its sockets open past the limit.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::FutureExt;
use pingora_core::protocols::Stream;
use pingora_core::protocols::l4::stream::Stream as TcpConnection;
use tokio::io::AsyncReadExt;
// The runtime's clock, which tests can pause.
use tokio::time::Instant;

/// How long an idle connection is kept (docs/architecture.md, limits).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per endpoint and worker; more are closed on return.
const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// The shortest time between two sweeps of a worker's pool: under load, connections expire one
/// after another and one sweep a second closes them all.
const SWEEP_AT_MOST_EVERY: Duration = Duration::from_secs(1);

struct Idle {
    by_addr: HashMap<SocketAddr, Vec<(Stream, Instant)>>,
}

impl Idle {
    /// Closes the connections idle for the keep-alive limit; when the next one expires, if any
    /// are left.
    fn sweep(&mut self, now: Instant) -> Option<Instant> {
        self.by_addr.retain(|_, streams| {
            streams.retain(|(_, since)| now.duration_since(*since) < KEEPALIVE_IDLE);
            !streams.is_empty()
        });
        self.by_addr
            .values()
            .flatten()
            .map(|(_, since)| *since + KEEPALIVE_IDLE)
            .min()
    }
}

thread_local! {
    static IDLE: RefCell<Idle> = RefCell::new(Idle {
        by_addr: HashMap::new(),
    });
    /// Whether this worker's sweeper task is running.
    static SWEEPING: Cell<bool> = const { Cell::new(false) };
}

/// An idle connection to `addr` that is still open, if the pool holds one. The most recently
/// returned is taken first: it is the least likely to have been closed by the runtime.
pub fn take(addr: SocketAddr) -> Option<Stream> {
    loop {
        let (mut stream, since) =
            IDLE.with_borrow_mut(|idle| idle.by_addr.get_mut(&addr)?.pop())?;
        if since.elapsed() < KEEPALIVE_IDLE && still_open(&mut stream) {
            return Some(stream);
        }
    }
}

/// Returns a connection whose last exchange ended cleanly, for the next request to `addr`.
pub fn put(addr: SocketAddr, stream: Stream) {
    IDLE.with_borrow_mut(|idle| {
        let streams = idle.by_addr.entry(addr).or_default();
        if streams.len() < MAX_IDLE_PER_ENDPOINT {
            streams.push((stream, Instant::now()));
        }
    });
    if !SWEEPING.replace(true) {
        // A worker's runtime is single-threaded (no work stealing): the task runs on this
        // thread, so it sees this thread's pool. It ends when the pool is empty.
        tokio::spawn(async {
            loop {
                let now = Instant::now();
                let Some(next) = IDLE.with_borrow_mut(|idle| idle.sweep(now)) else {
                    SWEEPING.set(false);
                    return;
                };
                tokio::time::sleep_until(next.max(now + SWEEP_AT_MOST_EVERY)).await;
            }
        });
    }
}

/// Opens a new connection to `addr`.
pub async fn connect(addr: SocketAddr) -> std::io::Result<Stream> {
    let socket = tokio::net::TcpStream::connect(addr).await?;
    // Request heads and SSE events are small writes that must leave at once.
    socket.set_nodelay(true)?;
    Ok(Box::new(TcpConnection::from(socket)))
}

/// Whether an idle connection can carry another request: a read that does not block finds
/// neither the end of the stream (the runtime closed it) nor bytes no request asked for.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // `unconstrained`: the cooperative budget could make a ready read look pending.
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A connection opened by [`connect`], and the runtime's end of it.
    async fn connected() -> (SocketAddr, Stream, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (addr, client, server)
    }

    #[tokio::test]
    async fn a_returned_connection_is_taken_again_until_the_runtime_closes_it() {
        let (addr, client, mut server) = connected().await;

        put(addr, client);
        let client = take(addr).expect("an open connection is reused");
        assert!(take(addr).is_none(), "each connection is handed out once");

        put(addr, client);
        server.shutdown().await.unwrap();
        drop(server);
        // The close reaches the client's socket a moment later.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(take(addr).is_none(), "a closed connection is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_at_the_keepalive_limit_without_another_request() {
        let (addr, client, mut server) = connected().await;
        put(addr, client);
        tokio::time::sleep(KEEPALIVE_IDLE - Duration::from_millis(100)).await;
        assert!(
            IDLE.with_borrow(|idle| !idle.by_addr.is_empty()),
            "kept while young"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(IDLE.with_borrow(|idle| idle.by_addr.is_empty()));
        assert!(!SWEEPING.get(), "the sweeper ends with the pool");
        let mut byte = [0u8; 1];
        assert_eq!(
            server.read(&mut byte).await.unwrap(),
            0,
            "the runtime sees the close"
        );
    }

    #[tokio::test]
    async fn a_connection_with_unasked_bytes_is_not_reused() {
        let (addr, client, mut server) = connected().await;
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        put(addr, client);
        assert!(take(addr).is_none());
    }
}
