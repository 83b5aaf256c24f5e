//! # tower-quiche
//!
//! HTTP/3 for the tower ecosystem, on Cloudflare's [`quiche`] and [`tokio`].
//!
//! - [`server`]: serve any `tower::Service` (an axum `Router`, a `ServiceBuilder` stack, a
//!   tonic server) over HTTP/3 with [`server::serve`], and beside it over HTTP/1.1 and
//!   HTTP/2 with `Alt-Svc` ([`server::serve_with_tcp`]).
//! - [`client`]: an HTTP client that is itself a `tower::Service`, with a pool: HTTP/3,
//!   and with the `tcp` feature HTTP/1.1 and HTTP/2 too, finding an origin's HTTP/3 through
//!   `Alt-Svc` and falling back to TCP when the QUIC path is blocked.
//! - [`quic`]: the layer underneath — UDP endpoints with batched IO (GSO/GRO), routing by
//!   connection ID, one task per connection, Retry, version negotiation, stateless resets,
//!   verified TLS by default, the [`Application`](quic::Application) seam through which
//!   a protocol drives a connection, and async streams over it
//!   ([`StreamConnection`](quic::StreamConnection)).
//!
//! ## Quick start: axum over HTTP/3
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use tower_quiche::quic::{Listener, ServerConfig};
//!
//! # async fn run() -> Result<(), tower_quiche::Error> {
//! let app = Router::new().route("/", get(|| async { "hello over HTTP/3" }));
//! let config = ServerConfig::from_pem_files("cert.pem", "key.pem")?;
//! let listener = Listener::bind("127.0.0.1:4433", config).await?;
//! tower_quiche::server::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! ## Quick start: a protocol of your own over QUIC
//!
//! A server starts each connection with an [`Application`](quic::Application), the seam the
//! HTTP/3 server and client use too. This one answers every stream with `hello` and closes
//! it; `examples/support/echo.rs` is a fuller one (an echo protocol, server and client).
//!
//! ```no_run
//! use std::task::Context;
//! use tower_quiche::quic::{Application, Listener, QuicheConnection, ServerConfig};
//!
//! struct Hello;
//!
//! impl Application for Hello {
//!     fn process(&mut self, _: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
//!         let mut buf = [0; 1024];
//!         for stream in conn.readable() {
//!             while let Ok((_, fin)) = conn.stream_recv(stream, &mut buf) {
//!                 if fin {
//!                     let _ = conn.stream_send(stream, b"hello", true);
//!                 }
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), tower_quiche::Error> {
//! let config = ServerConfig::builder()
//!     .alpn(["hello"])
//!     .cert_chain_pem_file("cert.pem")
//!     .private_key_pem_file("key.pem")
//!     .build()?;
//! let mut listener = Listener::bind("127.0.0.1:4433", config).await?;
//! while let Some(incoming) = listener.accept().await {
//!     incoming.start(Hello);
//! }
//! # Ok(()) }
//! ```
//!
//! The same protocol on the async stream API, where each stream is a pair of `AsyncWrite`
//! and `AsyncRead` halves and the connection task is out of sight:
//!
//! ```no_run
//! use tokio::io::AsyncWriteExt;
//! # async fn run(mut listener: tower_quiche::quic::Listener) -> Result<(), tower_quiche::Error> {
//! while let Some(incoming) = listener.accept().await {
//!     tokio::spawn(async move {
//!         let conn = incoming.accept_streams().await?;
//!         while let Some((mut send, mut recv)) = conn.accept_bi().await {
//!             tokio::spawn(async move {
//!                 tokio::io::copy(&mut recv, &mut tokio::io::sink()).await?;
//!                 send.write_all(b"hello").await?;
//!                 send.shutdown().await
//!             });
//!         }
//!         Ok::<_, tower_quiche::Error>(())
//!     });
//! }
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! - `server` (default): the HTTP/3 server ([`server`], [`alt_svc`]).
//! - `client` (default): the HTTP/3 client ([`client`]). A client-only build
//!   (`default-features = false, features = ["client"]`) compiles no server and no hyper,
//!   and speaks HTTP/3 only.
//! - `tcp` (default): HTTP/1.1 and HTTP/2 over TLS beside HTTP/3 (hyper, hyper-util,
//!   tokio-boring), for whichever roles are on: with `server`,
//!   `server::serve_with_tcp` serves both with `Alt-Svc`; with `client`, the client
//!   starts over TCP, moves to HTTP/3 when `Alt-Svc` advertises it, and falls back to TCP
//!   when HTTP/3 is broken (`client::Builder::tcp_only` and `http3_prior_knowledge` fix
//!   one side). `tcp` no longer turns on `server` by itself.
//! - `dev-certs`: development certificates, `tls::self_signed`, `tls::DevCa` and
//!   `tls::GeneratedCert`.
//! - `json` (implies `client`): JSON helpers on the client (serde).
//! - `gzip` (default), `brotli`, `zstd` (each implies `client`): the client decodes
//!   responses in that content coding (`client::Builder::gzip`, `brotli`, `zstd`).
//! - `qlog`: a qlog trace per connection (`quic::TransportConfig::qlog_dir`).
//! - `gcongestion`: quiche's congestion control ported from Google's QUIC.
//! - `rpk`: raw public keys (RFC 7250) instead of certificates, through boring.
//!
//! The [`quic`] layer is always built.
//!
//! TLS key logging (`SSLKEYLOGFILE`) needs no feature: see
//! [`quic::TransportConfig::keylog_from_env`].

#![deny(missing_docs)]
// One foreign call (in `quic::tls`: BoringSSL's SSL_set_shed_handshake_config, which the
// `boring` crate does not wrap) is allowed where it is made; nothing else may be unsafe.
#![deny(unsafe_code)]

#[cfg(feature = "__bench")]
#[doc(hidden)]
pub mod __bench;
#[cfg(feature = "server")]
pub mod alt_svc;
#[cfg(feature = "client")]
pub mod client;
mod error;
mod h3;
pub mod quic;
#[cfg(feature = "server")]
pub mod server;
#[cfg(any(test, feature = "__bench"))]
mod testing;
#[cfg(feature = "axum")]
pub mod ws;
// The examples' echo protocol, which the unit tests borrow, names the crate `tower_quiche`.
#[cfg(test)]
extern crate self as tower_quiche;

pub use error::{BoxError, Code, Error};
#[cfg(any(feature = "server", feature = "client"))]
pub use h3::body::{RecvBody, ResetStream};
pub use h3::codes;
#[cfg(any(feature = "server", feature = "client"))]
pub use h3::tunnel;
#[cfg(any(feature = "server", feature = "client"))]
pub use h3::{capsule, datagram};
pub use quic::tls;
pub use quiche;

/// The longest timeout the crate keeps: what a builder is given beyond it (`Duration::MAX`,
/// say, for "never") becomes this. Thirty years mean never, and a deadline `now + timeout`
/// stays within what `Instant` can hold, where adding `Duration::MAX` panics. tokio's own
/// timers cap their deadlines the same way.
pub(crate) fn at_most_never(timeout: std::time::Duration) -> std::time::Duration {
    const NEVER: std::time::Duration = std::time::Duration::from_secs(30 * 365 * 24 * 3600);
    timeout.min(NEVER)
}
