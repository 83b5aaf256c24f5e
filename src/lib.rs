//! # tower-quiche
//!
//! HTTP/3 for the tower ecosystem, on Cloudflare's [`quiche`] and [`tokio`].
//!
//! This release provides the QUIC layer everything else stands on ([`quic`]): UDP endpoints
//! with batched IO (GSO/GRO), routing by connection ID, one task per connection, Retry,
//! version negotiation and stateless resets, verified TLS by default, and the
//! [`Application`](quic::Application) seam through which a protocol drives a connection.
//!
//! ## Quick start: a raw-QUIC echo server
//!
//! ```no_run
//! use tower_quiche::quic::{Config, Listener, echo::{ALPN, EchoServer}};
//!
//! # async fn run() -> Result<(), tower_quiche::Error> {
//! let config = Config::builder()
//!     .alpn([ALPN])
//!     .cert_chain_pem_file("cert.pem")
//!     .private_key_pem_file("key.pem")
//!     .build()?;
//! let mut listener = Listener::bind("127.0.0.1:4433".parse().unwrap(), config).await?;
//! while let Some(incoming) = listener.accept().await {
//!     incoming.start(EchoServer::new());
//! }
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! - `gcongestion`: quiche's congestion control ported from Google's QUIC.
//! - `qlog`: a qlog trace per connection (see [`quic::ConfigBuilder::qlog_dir`]).
//!
//! TLS key logging (`SSLKEYLOGFILE`) needs no feature: see
//! [`quic::ConfigBuilder::keylog_from_env`].

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod alt_svc;
mod body;
pub mod client;
mod config;
mod conn;
mod endpoint;
mod error;
mod headers;
mod metrics;
pub mod quic;
pub mod server;
mod socket;
mod stream;
pub mod tls;

pub use body::RecvBody;
pub use error::{BoxError, Error};
pub use quiche;
