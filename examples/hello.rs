//! An axum app over HTTP/3.
//!
//!     cargo run --example hello
//!     cargo run --example hello -- --listen 127.0.0.1:4433 --cert cert.pem --key key.pem
//!
//! With no arguments it generates a development certificate, listens on 127.0.0.1:4433 and
//! prints how to reach it. It serves `/` and `/hello`.

mod support;

use axum::Router;
use axum::extract::Extension;
use axum::routing::get;
use tower_quiche::quic::{Config, Listener};
use tower_quiche::server::ConnectionInfo;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = support::Args::parse(&[]);
    let listen = args.parsed("--listen", "127.0.0.1:4433".parse().unwrap());
    let (cert, key) = support::server_identity(&args);
    let app = Router::new()
        .route(
            "/",
            get(|Extension(info): Extension<ConnectionInfo>| async move {
                format!(
                    "Hello from tower-quiche over {:?}; you are {}\n",
                    info.version, info.remote_addr
                )
            }),
        )
        .route("/hello", get(|| async { "hello world" }));
    let config = Config::builder()
        .alpn(["h3"])
        .cert_chain_pem_file(&cert)
        .private_key_pem_file(&key)
        .build()
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let listener = Listener::bind(listen, config)
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let addr = listener.local_addr();
    eprintln!("serving HTTP/3 on https://{addr}/ (UDP)");
    eprintln!(
        "try: cargo run --example client -- --ca {} https://localhost:{}/hello",
        cert.with_file_name("ca.pem").display(),
        addr.port()
    );
    tower_quiche::server::serve(listener, app)
        .with_graceful_shutdown(support::shutdown_signal())
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
}
