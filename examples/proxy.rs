//! Reverse proxies between HTTP/3 and HTTP/1.1, both ways, streaming bodies.
//!
//!     cargo run --example proxy
//!         a demo: an HTTP/1.1 backend (the route contract), an HTTP/3 front for it, and an
//!         HTTP/1.1 front that forwards to that HTTP/3 front; it sends 8 MiB each way
//!         through the whole chain and prints the hashes.
//!     cargo run --example proxy -- h3-front --listen ADDR --backend HOST:PORT [--cert PEM --key PEM]
//!         HTTP/3 on ADDR, forwarded to the HTTP/1.1 server at HOST:PORT.
//!     cargo run --example proxy -- h3-upstream --listen ADDR --upstream HOST:PORT [--ca PEM | --insecure]
//!         plain HTTP/1.1 and HTTP/2 on ADDR, forwarded over HTTP/3 to HOST:PORT.

mod support;

#[path = "support/routes.rs"]
mod routes;

#[path = "support/proxy.rs"]
mod proxy;

use std::net::SocketAddr;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::uri::Authority;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tower_quiche::quic::Listener;

/// Reverse proxies between HTTP/3 and HTTP/1.1, both ways, streaming bodies.
///
/// With no mode, a demo: an HTTP/1.1 backend, an HTTP/3 front for it, and an HTTP/1.1 front
/// that forwards to that HTTP/3 front; it sends 8 MiB each way through the whole chain.
#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP/3 on ADDR, forwarded to an HTTP/1.1 server
    #[command(args_override_self = true)]
    H3Front {
        #[command(flatten)]
        server: support::Server,
        /// The HTTP/1.1 backend
        #[arg(long, value_name = "HOST:PORT")]
        backend: Authority,
    },
    /// Plain HTTP/1.1 and HTTP/2 on ADDR, forwarded over HTTP/3
    #[command(args_override_self = true)]
    H3Upstream {
        /// TCP address to listen on
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The HTTP/3 upstream
        #[arg(long, value_name = "HOST:PORT")]
        upstream: Authority,
        #[command(flatten)]
        trust: support::Trust,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().mode {
        Some(Mode::H3Front { server, backend }) => {
            let front = h3_front(&server, backend.clone()).await;
            eprintln!("HTTP/3 on https://{front}/ -> HTTP/1.1 http://{backend}/");
            support::shutdown_signal().await;
        }
        Some(Mode::H3Upstream {
            listen,
            upstream,
            trust,
        }) => {
            let client = trust.h3_client().unwrap_or_else(|e| support::fail(&e.to_string()));
            let front = proxy::serve_plain_http(listen, proxy::http_to_http3(upstream.clone(), client)).await;
            eprintln!("HTTP/1.1 and HTTP/2 on http://{front}/ -> HTTP/3 https://{upstream}/");
            support::shutdown_signal().await;
        }
        None => demo().await,
    }
}

/// Starts the HTTP/3 front; returns its address.
async fn h3_front(server: &support::Server, backend: Authority) -> SocketAddr {
    let listener = Listener::bind(server.listen, server.config("h3"))
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let addr = listener.local_addr();
    tokio::spawn(tower_quiche::server::serve(listener, proxy::http3_to_http1(backend)).into_future());
    addr
}

async fn demo() {
    // backend (HTTP/1.1) <- HTTP/3 front <- HTTP/1.1 front <- this client
    let backend = proxy::serve_plain_http("127.0.0.1:0".parse().unwrap(), routes::router()).await;
    let server = support::Server {
        listen: "127.0.0.1:0".parse().unwrap(),
        identity: support::Identity::default(),
        no_retry: false,
    };
    let front = h3_front(&server, backend.to_string().parse().unwrap()).await;
    let ca = std::env::temp_dir()
        .join(format!("tower-quiche-dev-{}", std::process::id()))
        .join("ca.pem");
    let client = support::Trust::ca(ca)
        .h3_client()
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let upstream: Authority = format!("localhost:{}", front.port()).parse().unwrap();
    let edge = proxy::serve_plain_http("127.0.0.1:0".parse().unwrap(), proxy::http_to_http3(upstream, client)).await;
    println!("backend http://{backend} <- HTTP/3 front https://{front} <- HTTP/1.1 front http://{edge}");

    let http: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    let payload: Bytes = (0..8 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let request = http::Request::post(format!("http://{edge}/echo"))
        .body(Full::new(payload.clone()))
        .unwrap();
    let response = http
        .request(request)
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    println!(
        "POST /echo of {} bytes through both proxies: {} bytes back, sha256 {} (sent {})",
        payload.len(),
        echoed.len(),
        hex(&boring::sha::sha256(&echoed)),
        hex(&boring::sha::sha256(&payload))
    );
    let request = http::Request::get(format!("http://{edge}/bytes/8388608"))
        .body(Full::default())
        .unwrap();
    let response = http
        .request(request)
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    println!(
        "GET /bytes/8388608 through both proxies: {status}, {} bytes",
        body.len()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
