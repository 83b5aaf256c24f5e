//! The QUIC layer: endpoints, connections driven by tokio, and two ways to run a protocol
//! over QUIC: the [`Application`] seam and the async stream API.
//!
//! A server binds a [`Listener`] and starts each [`Incoming`] connection with an
//! [`Application`]; a client [`Endpoint`] connects and hands the connection to one. The
//! application owns the raw `QuicheConnection` on the connection's task. The HTTP/3
//! server and client of this crate are two such applications; the echo protocol of the
//! examples (`examples/support/echo.rs`) is a third, small enough to read in one sitting.
//!
//! A protocol that needs only byte streams can skip the seam:
//! [`Incoming::accept_streams`] and `Endpoint::connect_streams` give a
//! [`StreamConnection`] whose streams are [`SendStream`]s (`AsyncWrite`) and
//! [`RecvStream`]s (`AsyncRead`), in the manner of quinn. A whole echo server's
//! connection:
//!
//! ```no_run
//! # async fn serve(incoming: tower_quiche::quic::Incoming) -> Result<(), tower_quiche::Error> {
//! use tokio::io::AsyncWriteExt;
//!
//! let conn = incoming.accept_streams().await?;
//! while let Some((mut send, mut recv)) = conn.accept_bi().await {
//!     tokio::spawn(async move {
//!         tokio::io::copy(&mut recv, &mut send).await?;
//!         send.shutdown().await
//!     });
//! }
//! # Ok(()) }
//! ```
//!
//! # What lives here
//!
//! The transport, and nothing of HTTP: this module never imports `h3`, `server` or
//! `client`. From the wire up:
//!
//! - `udp`: the UDP socket, batched IO (GSO/GRO) through quinn-udp; knows no QUIC.
//! - `routes`: the route table of one address's sockets (connection ID -> connection), the registration
//!   through which a connection holds its entries, and the bounded inbound queues.
//! - `cid`, `token`, `limits`: connection ID generation and stateless-reset keys, Retry
//!   tokens, the listener's connection, handshake and reply caps.
//! - `router`: the receive loop of one socket: dispatch by connection ID; version
//!   negotiation, Retry, stateless resets and new connections for unknown IDs.
//! - `driver`: one connection's task, the sole owner of its `QuicheConnection`. It gets
//!   what it needs (socket, registration, reset key, configuration) as one context value
//!   and knows no endpoint.
//! - `endpoint`: [`Listener`], [`Endpoint`] and [`Incoming`]: bind, accept, connect to an
//!   address. Connecting by name (resolution, Happy Eyeballs) is the client's business:
//!   [`Endpoint::connect`] is defined in `client`.
//! - `config`, [`tls`], `metrics`: [`ServerConfig`] and [`ClientConfig`] over a shared [`TransportConfig`], certificates and roots, the
//!   [`Metrics`] seam.
//! - `bufs`: [`QuicheConnection`], quiche's connection with `Bytes` stream buffers
//!   ([`BytesBufs`]), so body chunks are queued without a copy.
//! - `app`: the [`Application`] seam, [`ConnectionHandle`], [`Closed`],
//!   [`ConnectionStats`].
//! - `streams`: the async stream API, an [`Application`] of its own ([`StreamConnection`],
//!   [`SendStream`], [`RecvStream`]); `notify`: how tasks other than the connection's wake
//!   it for a stream (the HTTP/3 streams use it too); `stream_ids`: maps keyed by stream
//!   ID, with a cheap hash.
//!
//! Imports inside the module (module -> the modules it uses) form no cycle:
//!
//! ```text
//! endpoint -> app cid config driver limits router routes streams udp
//! streams  -> app bufs config notify stream_ids
//! driver   -> app bufs cid config routes tls udp
//! router   -> bufs cid config limits metrics routes token udp
//! routes   -> config limits
//! limits   -> config metrics
//! config   -> cid metrics tls
//! metrics  -> app
//! token    -> cid
//! app      -> bufs
//! bufs, cid, notify, stream_ids, tls, udp -> (none)
//! ```

mod app;
mod bufs;
mod cid;
mod config;
mod driver;
mod endpoint;
pub(crate) mod limits;
mod metrics;
mod notify;
mod router;
mod routes;
mod session;
mod stream_ids;
mod streams;
pub mod tls;
mod token;
mod udp;

pub use app::{Application, Closed, ConnectionHandle, ConnectionStats};
pub(crate) use app::{MAX_CODE, wire_code};
pub use bufs::{BytesBufs, QuicheConnection};
pub use cid::{ConnectionIdGenerator, RandomConnectionIdGenerator};
pub use config::{
    ClientConfig, ClientConfigBuilder, CongestionControl, RetryPolicy, ServerConfig, ServerConfigBuilder,
    TransportConfig,
};
#[cfg(feature = "__bench")]
pub(crate) use driver::bench::Flush as FlushBench;
pub use endpoint::{Endpoint, Incoming, Listener};
pub use metrics::{AtomicMetrics, DropReason, Metrics, MetricsSnapshot, NoopMetrics};
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) use notify::{ConnNotify, Queued};
pub(crate) use stream_ids::StreamIdMap;
#[cfg(feature = "client")]
pub(crate) use streams::new as new_streams;
pub use streams::{RecvStream, SendStream, StreamConnection};

/// `addr` with an IPv4-mapped IPv6 address (how a dual-stack socket reports an IPv4 peer)
/// as the IPv4 address it is: one client, one key, whichever socket it came through.
#[cfg(all(feature = "server", feature = "tcp"))]
pub(crate) fn canonical_addr(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    udp::Socket::canonical(addr)
}
