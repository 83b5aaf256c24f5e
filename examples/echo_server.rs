//! A raw-QUIC echo server (ALPN `echo`): every bidirectional stream a client opens is echoed
//! back byte for byte, and finished when the client finishes its side.
//!
//! It is written on the async stream API ([`StreamConnection`]): each stream is a pair of
//! `AsyncWrite`/`AsyncRead` halves, copied into each other. `examples/support/echo.rs` has
//! the same server on the raw [`Application`](tower_quiche::quic::Application) seam.
//!
//!     cargo run --release --example echo_server -- --listen 127.0.0.1:4433 --cert cert.pem --key key.pem
//!
//! Without `--cert`/`--key` it generates a development certificate and prints where its CA
//! is. `--no-retry` turns off address validation.

mod support;

use clap::Parser;
use support::echo;
use tokio::io::AsyncWriteExt;
use tower_quiche::quic::{Incoming, Listener, StreamConnection};

/// A raw-QUIC echo server (ALPN `echo`).
///
/// Every bidirectional stream a client opens is echoed back byte for byte, and finished when
/// the client finishes its side.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    #[command(flatten)]
    server: support::Server,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut listener = Listener::bind(args.server.listen, args.server.config(echo::ALPN))
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    eprintln!("echo server listening on {} (ALPN echo)", listener.local_addr());
    loop {
        tokio::select! {
            incoming = listener.accept() => match incoming {
                Some(incoming) => {
                    tracing::info!(peer = %incoming.peer_addr(), "new connection");
                    tokio::spawn(serve(incoming));
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("echo server stopped");
}

/// Echoes every bidirectional stream of one connection until it closes.
async fn serve(incoming: Incoming) {
    let conn: StreamConnection = match incoming.accept_streams().await {
        Ok(conn) => conn,
        Err(e) => return tracing::info!(error = %e, "handshake failed"),
    };
    while let Some((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            // The echo, then FIN once the client finished; a reset stops the copy.
            tokio::io::copy(&mut recv, &mut send).await?;
            send.shutdown().await
        });
    }
}
