//! A raw-QUIC echo client: sends data on several streams at once and checks the echo.
//!
//!     cargo run --release --example echo_client -- [--ca PEM | --insecure] [--streams N] [--bytes N] HOST:PORT
//!
//! Each of the `--streams` streams (default 1) carries `--bytes` bytes (default 64 MiB) and
//! is checked byte for byte; the client prints the echo throughput.

mod support;

use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use support::echo;
use tower_quiche::quic::Endpoint;

/// A raw-QUIC echo client (ALPN `echo`) that prints the echo throughput.
///
/// Each stream carries --bytes bytes at once with the others, checked byte for byte.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    #[command(flatten)]
    trust: support::Trust,
    /// Streams to echo on at once
    #[arg(long, value_name = "N", default_value_t = 1)]
    streams: usize,
    /// Bytes to send on each stream
    #[arg(long, value_name = "N", default_value_t = 64 * 1024 * 1024)]
    bytes: u64,
    /// The echo server
    #[arg(value_name = "HOST:PORT", default_value = "127.0.0.1:4433")]
    target: String,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let Args {
        trust,
        streams,
        bytes,
        target,
    } = Args::parse();
    let endpoint = Endpoint::client(trust.config(echo::ALPN)).unwrap_or_else(|e| support::fail(&e.to_string()));
    let (app, client) = echo::EchoClient::new();
    let started = Instant::now();
    let connection = endpoint
        .connect(&target, app)
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    eprintln!("connected to {} in {:?}", connection.peer_addr(), started.elapsed());
    // A 64 KiB pattern, repeated: the check is exact without keeping the echo.
    let pattern: Bytes = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>().into();
    let chunk = pattern.slice(..(bytes.min(pattern.len() as u64) as usize).max(1));
    let times = bytes.div_ceil(chunk.len() as u64).max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let client = client.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move { client.echo_repeated(chunk, times).await })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        match task.await.expect("echo task") {
            Ok(echoed) => total += echoed.bytes,
            Err(e) => support::fail(&format!("echo failed: {e}")),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "echoed {total} bytes on {streams} stream(s) in {secs:.3} s: {:.1} MiB/s each way",
        total as f64 / secs / (1024.0 * 1024.0)
    );
    connection.close(0, "done");
    connection.closed().await;
}
