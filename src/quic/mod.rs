//! The QUIC layer: endpoints, connections driven by tokio, and the [`Application`] seam for
//! protocols over QUIC.
//!
//! A server binds a [`Listener`] and starts each [`Incoming`] connection with an
//! [`Application`]; a client [`Endpoint`] connects and hands the connection to one. The
//! HTTP/3 server and client of this crate are two such applications; the echo protocol of
//! the examples (`examples/support/echo.rs`) is a third, small enough to read in one sitting.
//!
//! # What lives here
//!
//! The transport, and nothing of HTTP: this module never imports `h3`, `server` or
//! `client`. From the wire up:
//!
//! - `udp`: the UDP socket, batched IO (GSO/GRO) through quinn-udp; knows no QUIC.
//! - `routes`: one socket's route table (connection ID -> connection), the registration
//!   through which a connection holds its entries, and the bounded inbound queues.
//! - `cid`, `token`, `limits`: connection ID generation and stateless-reset keys, Retry
//!   tokens, the listener's connection, handshake and reply caps.
//! - `router`: the receive loop of one socket: dispatch by connection ID; version
//!   negotiation, Retry, stateless resets and new connections for unknown IDs.
//! - `driver`: one connection's task, the sole owner of its `quiche::Connection`. It gets
//!   what it needs (socket, registration, reset key, configuration) as one context value
//!   and knows no endpoint.
//! - `endpoint`: [`Listener`], [`Endpoint`] and [`Incoming`]: bind, accept, connect to an
//!   address. Connecting by name (resolution, Happy Eyeballs) is the client's business:
//!   [`Endpoint::connect`] is defined in `client`.
//! - `config`, [`tls`], `metrics`: [`Config`] by role, certificates and roots, the
//!   [`Metrics`] seam.
//! - `app`: the [`Application`] seam, [`ConnectionHandle`], [`Closed`],
//!   [`ConnectionStats`].
//!
//! Imports inside the module (module -> the modules it uses) form no cycle:
//!
//! ```text
//! endpoint -> app cid config driver limits router routes udp
//! driver   -> app cid config routes tls udp
//! router   -> cid config limits metrics routes token udp
//! routes   -> config limits
//! limits   -> config metrics
//! config   -> cid metrics tls
//! metrics  -> app
//! token    -> cid
//! app, cid, tls, udp -> (none)
//! ```

mod app;
mod cid;
mod config;
mod driver;
mod endpoint;
mod limits;
mod metrics;
mod notify;
mod router;
mod routes;
pub mod tls;
mod token;
mod udp;

pub use app::{Application, Closed, ConnectionHandle, ConnectionStats};
pub use cid::{ConnectionIdGenerator, RandomConnectionIdGenerator};
pub use config::{Config, ConfigBuilder, CongestionControl};
pub use endpoint::{Endpoint, Incoming, Listener};
pub use metrics::{AtomicMetrics, DropReason, Metrics, MetricsSnapshot, NoopMetrics};
pub(crate) use notify::ConnNotify;
