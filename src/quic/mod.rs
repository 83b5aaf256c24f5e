//! The QUIC layer: endpoints, connections driven by tokio, and the [`Application`] seam for
//! protocols over QUIC.
//!
//! A server binds a [`Listener`] and starts each [`Incoming`] connection with an
//! [`Application`]; a client [`Endpoint`] connects and hands the connection to one. The
//! HTTP/3 server and client of this crate are two such applications; [`echo`] is a third,
//! small enough to read in one sitting.

mod app;
mod cid;
mod config;
mod driver;
pub mod echo;
mod endpoint;
mod limits;
mod metrics;
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
