//! The deadline's own clock. pingora's `read_timeout` restarts on every read, so a stream that
//! keeps trickling never hits it, and the body filters only run when a chunk arrives, so a
//! silent upstream would outlive its deadline. The watchdog shuts the upstream socket down at
//! the deadline; pingora then sees the upstream end and `fail_to_proxy` answers 504 or ends the
//! stream.

use std::net::Shutdown;
use std::os::fd::{BorrowedFd, RawFd};

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Armed for one request on one upstream connection; dropping it disarms it.
#[derive(Debug)]
pub struct Watchdog {
    _disarm: oneshot::Sender<()>,
}

impl Watchdog {
    /// Arms a watchdog on the connection behind `fd`, which pingora holds for this request.
    pub fn arm(fd: RawFd, deadline: Instant) -> std::io::Result<Watchdog> {
        // The watchdog keeps its own descriptor of the socket, so a later reuse of the number
        // `fd` by another connection can never be shut down by mistake.
        #[allow(unsafe_code)]
        // SAFETY: pingora passes the descriptor of the upstream connection it is holding for
        // this request, so it is open for the whole call; it is only duplicated here.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
        let socket = std::net::TcpStream::from(socket);
        let (disarm, disarmed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    // Best effort: the connection may have closed on its own meanwhile.
                    let _ = socket.shutdown(Shutdown::Both);
                }
                _ = disarmed => {}
            }
        });
        Ok(Watchdog { _disarm: disarm })
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    use super::*;

    async fn connected_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn an_armed_watchdog_ends_a_silent_read_at_the_deadline() {
        let (mut client, _server) = connected_pair().await;
        let started = Instant::now();
        let _watchdog =
            Watchdog::arm(client.as_raw_fd(), started + Duration::from_millis(200)).unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .unwrap();
        assert_eq!(read.unwrap(), 0, "the socket reads as closed");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_disarmed_watchdog_leaves_the_connection_alone() {
        let (mut client, mut server) = connected_pair().await;
        drop(
            Watchdog::arm(
                client.as_raw_fd(),
                Instant::now() + Duration::from_millis(50),
            )
            .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        tokio::io::AsyncWriteExt::write_all(&mut server, b"ok")
            .await
            .unwrap();
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok");
    }
}
