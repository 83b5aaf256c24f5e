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

use tower_quiche::client::Client;
use tower_quiche::quic::{Config, Listener};

#[tokio::main]
async fn main() {
    let args = support::Args::parse(&[]);
    let listen = args.parsed("--listen", "127.0.0.1:0".parse().unwrap());
    let (cert, key) = support::server_identity(&args);
    let config = Config::builder()
        .alpn(["h3"])
        .cert_chain_pem_file(&cert)
        .private_key_pem_file(&key)
        .build()
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let listener = Listener::bind(listen, config)
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let port = listener.local_addr().port();
    // A tonic server is a tower Service: served as is.
    tokio::spawn(tower_quiche::server::serve(listener, service::GreeterServer::new(service::MyGreeter)).into_future());

    let mut client = Client::builder();
    client = match args.value("--ca") {
        Some(ca) => client.ca_pem_file(ca),
        None => client.ca_pem_file(cert.with_file_name("ca.pem")),
    };
    let client = client.build().unwrap_or_else(|e| support::fail(&e.to_string()));
    let origin = format!("https://localhost:{port}").parse().expect("origin");
    match service::calls(client, origin).await {
        Ok(lines) => lines.iter().for_each(|line| println!("{line}")),
        Err(status) => support::fail(&format!("gRPC call failed: {status}")),
    }
}
