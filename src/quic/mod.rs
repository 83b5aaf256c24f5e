//! The QUIC layer: endpoints, connections driven by tokio, and the [`Application`] seam for
//! protocols over QUIC.
//!
//! A server binds a [`Listener`] and starts each [`Incoming`] connection with an
//! [`Application`]; a client [`Endpoint`] connects and hands the connection to one. The
//! HTTP/3 server and client of this crate are two such applications; [`echo`] is a third,
//! small enough to read in one sitting.

pub mod echo;

pub use crate::config::{Config, ConfigBuilder, CongestionControl};
pub use crate::conn::{Application, Closed, ConnectionHandle, ConnectionStats};
pub use crate::endpoint::cid::{ConnectionIdGenerator, RandomConnectionIdGenerator};
pub use crate::endpoint::{Endpoint, Incoming, Listener};
pub use crate::metrics::{AtomicMetrics, DropReason, Metrics, MetricsSnapshot, NoopMetrics};
