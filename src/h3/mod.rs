//! The HTTP/3 layer the server and the client share: field conversion and RFC 9114
//! validation ([`fields`]), the one per-stream state machine between a connection's task and
//! a request's handles ([`stream`]), streaming bodies ([`body`]), extensible priorities
//! ([`priority`]), error codes ([`codes`]), CONNECT tunnels ([`tunnel`]), HTTP datagrams
//! ([`datagram`]) and the capsule protocol ([`capsule`]).
//!
//! It sits on quiche's `h3` module and the QUIC layer's `Application` seam; it knows nothing
//! of servers, clients or services. Every rule about a stream (what ends it, what cancels it,
//! what wakes whom) lives in [`stream`], so the server and the client cannot drift apart.

// The error codes are public (`tower_quiche::codes`) whatever the features; the rest serves
// the server and the client.
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) mod body;
#[cfg(any(feature = "server", feature = "client"))]
pub mod capsule;
pub mod codes;
#[cfg(any(feature = "server", feature = "client"))]
pub mod datagram;
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) mod fields;
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) mod priority;
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) mod queue;
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) mod stream;
#[cfg(any(feature = "server", feature = "client"))]
pub mod tunnel;
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) mod varint;
