//! The streaming half of `proxy/bench/run.sh`: many server-sent-event streams at once, as a
//! busy chat model produces them, through each proxy.
//!
//!   sse_bench upstream LISTEN EVENTS INTERVAL_MS
//!       answers every request with EVENTS events, INTERVAL_MS apart, each stamped with the
//!       wall-clock time it was written (chunked `text/event-stream`, as the runtimes send).
//!   sse_bench client URL STREAMS [HEADER: VALUE]
//!       opens STREAMS streams at once and reads each to its end; prints one `RESULT` line:
//!       streams completed, events, events/s, and the delay from an event's stamp to its
//!       arrival (p50, p99, max), all in microseconds.
//!
//! Raw sockets on both sides keep the tool's own cost small and fixed, whatever proxy sits
//! between.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_micros() as u64
}

async fn upstream(listen: String, events: u32, interval: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = serve_streams(stream, events, interval).await;
        });
    }
}

/// Answers each request on a kept-alive connection with one event stream.
async fn serve_streams(stream: TcpStream, events: u32, interval: Duration) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    loop {
        // The request: a GET head, no body.
        let mut line = String::new();
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
        }
        stream
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            .await?;
        let mut ticks = tokio::time::interval(interval);
        for _ in 0..events {
            ticks.tick().await;
            let event = format!("data: {}\n\n", micros_now());
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            stream.get_mut().write_all(chunk.as_bytes()).await?;
        }
        stream.get_mut().write_all(b"0\r\n\r\n").await?;
    }
}

/// What one stream saw.
#[derive(Default)]
struct Seen {
    complete: bool,
    delays_us: Vec<u64>,
}

async fn one_stream(host: String, path: String, header: Option<String>) -> std::io::Result<Seen> {
    let mut stream = TcpStream::connect(&host).await?;
    stream.set_nodelay(true)?;
    let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut seen = Seen::default();
    if !line.starts_with("HTTP/1.1 200") {
        return Ok(seen);
    }
    loop {
        line.clear();
        reader.read_line(&mut line).await?;
        if line == "\r\n" {
            break;
        }
    }
    // Chunks, each holding whole events as the upstream wrote them.
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(seen);
        }
        let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
        if size == 0 {
            seen.complete = true;
            return Ok(seen);
        }
        let mut chunk = vec![0u8; size + 2];
        reader.read_exact(&mut chunk).await?;
        let arrived = micros_now();
        for event in String::from_utf8_lossy(&chunk).split("\n\n") {
            if let Some(stamp) = event.trim().strip_prefix("data: ")
                && let Ok(stamp) = stamp.trim().parse::<u64>()
            {
                seen.delays_us.push(arrived.saturating_sub(stamp));
            }
        }
    }
}

async fn client(url: String, streams: usize, header: Option<String>) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| tokio::spawn(one_stream(host.to_owned(), path.to_owned(), header.clone())))
        .collect();
    let mut complete = 0;
    let mut delays = Vec::new();
    for task in tasks {
        if let Ok(Ok(seen)) = task.await {
            complete += usize::from(seen.complete);
            delays.extend(seen.delays_us);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    delays.sort_unstable();
    let at = |q: f64| {
        delays
            .get(((delays.len() as f64 * q) as usize).min(delays.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "RESULT streams={complete} events={} events_per_s={:.0} delay_p50_us={} delay_p99_us={} delay_max_us={}",
        delays.len(),
        delays.len() as f64 / elapsed,
        at(0.5),
        at(0.99),
        delays.last().copied().unwrap_or(0),
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: sse_bench upstream LISTEN EVENTS INTERVAL_MS | client URL STREAMS [HEADER]";
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["upstream", listen, events, interval] => {
            upstream(
                listen.to_string(),
                events.parse().expect(usage),
                Duration::from_millis(interval.parse().expect(usage)),
            )
            .await
        }
        ["client", url, streams, rest @ ..] => {
            client(
                url.to_string(),
                streams.parse().expect(usage),
                rest.first().map(|h| h.to_string()),
            )
            .await;
            Ok(())
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
