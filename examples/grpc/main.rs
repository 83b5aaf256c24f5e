//! A tonic gRPC service served over HTTP/3, called over HTTP/3 by tonic's generated client
//! on top of tower-quiche's `Client`: unary, server streaming, client streaming, and an
//! error status (grpc-status travels in trailers).
//!
//!     cargo run --example grpc
//!
//! Runs the server and the client in one process and prints each call's result.

#[path = "../support/mod.rs"]
mod support;

mod service;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tower_quiche::quic::{Listener, ServerConfig};

/// A tonic gRPC service and its generated client, over HTTP/3, in one process.
///
/// It makes a unary call, a server-streaming call, a client-streaming call and one that
/// fails with a gRPC status, and prints each result.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    /// UDP address the server listens on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[command(flatten)]
    identity: support::Identity,
    /// CA certificates (PEM) the client trusts [default: the development CA, with no --cert]
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (cert, key) = support::server_identity(&args.identity);
    let config = ServerConfig::from_pem_files(&cert, &key).unwrap_or_else(|e| support::fail(&e.to_string()));
    let listener = Listener::bind(args.listen, config)
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let port = listener.local_addr().port();
    // A tonic server is a tower Service: served as is.
    tokio::spawn(tower_quiche::server::serve(listener, service::GreeterServer::new(service::MyGreeter)).into_future());

    let ca = args.ca.clone().unwrap_or_else(|| cert.with_file_name("ca.pem"));
    let client = support::Trust::ca(ca)
        .h3_client()
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let origin = format!("https://localhost:{port}").parse().expect("origin");
    match service::calls(client, origin).await {
        Ok(lines) => lines.iter().for_each(|line| println!("{line}")),
        Err(status) => support::fail(&format!("gRPC call failed: {status}")),
    }
}
