//! The metrics seam: what operators watch, counted through a trait with a no-op default.
//!
//! Endpoints call a [`Metrics`] implementation at the few places where something countable
//! happens (a handshake starts, a datagram is dropped, a connection closes with its totals).
//! Every method has an empty default, so an implementation only writes what it exports.
//! [`AtomicMetrics`] is a ready-made one that keeps plain counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::app::ConnectionStats;

/// Why a received datagram was dropped without reaching a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The connection's inbound queue was full (in datagrams or in bytes): it is not keeping
    /// up, so the datagram is dropped as a congested network would, and QUIC's loss recovery
    /// resends it.
    QueueFull,
    /// No connection has this destination connection ID (and it was not a new Initial).
    UnknownConnection,
    /// The datagram is not a QUIC packet we could parse.
    ParseError,
    /// The backlog of connections not yet accepted by the application is full.
    BacklogFull,
    /// An Initial carried an address-validation token that is forged, expired or was
    /// issued to another address or for another connection ID.
    InvalidToken,
    /// A new Initial arrived while the listener had its maximum number of connections
    /// (`ServerConfigBuilder::max_connections`).
    ConnectionLimit,
    /// A new Initial arrived while the listener had its maximum number of handshakes in
    /// progress (`ServerConfigBuilder::max_handshakes_in_progress`), or its sender's address
    /// had (`max_handshakes_in_progress_per_address`).
    HandshakeLimit,
    /// A client's first Initial had a destination connection ID shorter than the 8 bytes
    /// RFC 9000 §7.2 requires.
    ShortConnectionId,
    /// A stateless reset or version negotiation was due, but the listener's budget for them
    /// (`ConfigBuilder::stateless_reply_rate`) was spent.
    RateLimited,
    /// The sender cannot be a QUIC peer: its port is 0 (no reply can go there), its address
    /// is no unicast one, or (on a server) its port is that of a UDP service seen in
    /// reflection attacks, or one that would answer our replies for ever (RFC 9308 §8.1).
    BlockedSource,
}

impl DropReason {
    /// How many reasons there are: the length of [`AtomicMetrics`]' counter array.
    const COUNT: usize = DropReason::BlockedSource as usize + 1;
}

/// Counts what operators watch. Every method defaults to doing nothing.
///
/// Implementations must be cheap and must not block: they are called from the packet path,
/// and the router calls [`datagram_dropped`](Metrics::datagram_dropped) while it holds its
/// socket's route table (which the other sockets of the address share).
pub trait Metrics: Send + Sync + 'static {
    /// A new connection started its handshake.
    fn handshake_started(&self) {}
    /// A handshake completed after `duration`.
    fn handshake_completed(&self, duration: Duration) {
        let _ = duration;
    }
    /// A handshake failed after `duration` (timeout, TLS failure, peer close).
    fn handshake_failed(&self, duration: Duration) {
        let _ = duration;
    }
    /// A connection was opened (counted when its task starts).
    fn connection_opened(&self) {}
    /// A connection closed; `stats` are its totals.
    fn connection_closed(&self, stats: &ConnectionStats) {
        let _ = stats;
    }
    /// A datagram was dropped before reaching a connection.
    fn datagram_dropped(&self, reason: DropReason) {
        let _ = reason;
    }
    /// A Retry packet was sent to validate a client's address.
    fn retry_sent(&self) {}
    /// A version negotiation packet was sent.
    fn version_negotiation_sent(&self) {}
    /// A stateless reset was sent for a packet of an unknown connection.
    fn stateless_reset_sent(&self) {}
}

/// Metrics that count nothing; the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopMetrics;

impl Metrics for NoopMetrics {}

/// Plain atomic counters for every [`Metrics`] event; read them with [`AtomicMetrics::snapshot`].
#[derive(Debug, Default)]
pub struct AtomicMetrics {
    handshakes_started: AtomicU64,
    handshakes_completed: AtomicU64,
    handshakes_failed: AtomicU64,
    handshake_micros_total: AtomicU64,
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
    dropped: [AtomicU64; DropReason::COUNT],
    retries_sent: AtomicU64,
    version_negotiations_sent: AtomicU64,
    stateless_resets_sent: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    packets_sent: AtomicU64,
    packets_received: AtomicU64,
    packets_lost: AtomicU64,
}

/// A copy of [`AtomicMetrics`]' counters at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Handshakes started.
    pub handshakes_started: u64,
    /// Handshakes completed.
    pub handshakes_completed: u64,
    /// Handshakes failed.
    pub handshakes_failed: u64,
    /// Sum of completed handshakes' durations, in microseconds.
    pub handshake_micros_total: u64,
    /// Connections whose task started.
    pub connections_opened: u64,
    /// Connections closed.
    pub connections_closed: u64,
    /// Datagrams dropped because a connection's queue was full.
    pub dropped_queue_full: u64,
    /// Datagrams dropped for an unknown connection ID.
    pub dropped_unknown_connection: u64,
    /// Datagrams that did not parse as QUIC.
    pub dropped_parse_error: u64,
    /// Initials dropped because the accept backlog was full.
    pub dropped_backlog_full: u64,
    /// Initials dropped for an invalid address-validation token.
    pub dropped_invalid_token: u64,
    /// Initials dropped because the listener had its maximum number of connections.
    pub dropped_connection_limit: u64,
    /// Initials dropped because the listener had its maximum number of handshakes in progress.
    pub dropped_handshake_limit: u64,
    /// Initials dropped for a destination connection ID shorter than 8 bytes.
    pub dropped_short_connection_id: u64,
    /// Stateless resets and version negotiations not sent for lack of budget.
    pub dropped_rate_limited: u64,
    /// Datagrams from a sender that cannot be a QUIC peer (see [`DropReason::BlockedSource`]).
    pub dropped_blocked_source: u64,
    /// Retry packets sent.
    pub retries_sent: u64,
    /// Version negotiation packets sent.
    pub version_negotiations_sent: u64,
    /// Stateless resets sent.
    pub stateless_resets_sent: u64,
    /// Bytes sent by closed connections.
    pub bytes_sent: u64,
    /// Bytes received by closed connections.
    pub bytes_received: u64,
    /// Packets sent by closed connections.
    pub packets_sent: u64,
    /// Packets received by closed connections.
    pub packets_received: u64,
    /// Packets lost by closed connections.
    pub packets_lost: u64,
}

impl AtomicMetrics {
    /// New counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let d = |r: DropReason| self.dropped[r as usize].load(Relaxed);
        MetricsSnapshot {
            handshakes_started: self.handshakes_started.load(Relaxed),
            handshakes_completed: self.handshakes_completed.load(Relaxed),
            handshakes_failed: self.handshakes_failed.load(Relaxed),
            handshake_micros_total: self.handshake_micros_total.load(Relaxed),
            connections_opened: self.connections_opened.load(Relaxed),
            connections_closed: self.connections_closed.load(Relaxed),
            dropped_queue_full: d(DropReason::QueueFull),
            dropped_unknown_connection: d(DropReason::UnknownConnection),
            dropped_parse_error: d(DropReason::ParseError),
            dropped_backlog_full: d(DropReason::BacklogFull),
            dropped_invalid_token: d(DropReason::InvalidToken),
            dropped_connection_limit: d(DropReason::ConnectionLimit),
            dropped_handshake_limit: d(DropReason::HandshakeLimit),
            dropped_short_connection_id: d(DropReason::ShortConnectionId),
            dropped_rate_limited: d(DropReason::RateLimited),
            dropped_blocked_source: d(DropReason::BlockedSource),
            retries_sent: self.retries_sent.load(Relaxed),
            version_negotiations_sent: self.version_negotiations_sent.load(Relaxed),
            stateless_resets_sent: self.stateless_resets_sent.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            packets_sent: self.packets_sent.load(Relaxed),
            packets_received: self.packets_received.load(Relaxed),
            packets_lost: self.packets_lost.load(Relaxed),
        }
    }
}

impl Metrics for AtomicMetrics {
    fn handshake_started(&self) {
        self.handshakes_started.fetch_add(1, Relaxed);
    }
    fn handshake_completed(&self, duration: Duration) {
        self.handshakes_completed.fetch_add(1, Relaxed);
        self.handshake_micros_total
            .fetch_add(duration.as_micros() as u64, Relaxed);
    }
    fn handshake_failed(&self, _duration: Duration) {
        self.handshakes_failed.fetch_add(1, Relaxed);
    }
    fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Relaxed);
    }
    fn connection_closed(&self, stats: &ConnectionStats) {
        self.connections_closed.fetch_add(1, Relaxed);
        self.bytes_sent.fetch_add(stats.bytes_sent, Relaxed);
        self.bytes_received.fetch_add(stats.bytes_received, Relaxed);
        self.packets_sent.fetch_add(stats.packets_sent as u64, Relaxed);
        self.packets_received.fetch_add(stats.packets_received as u64, Relaxed);
        self.packets_lost.fetch_add(stats.packets_lost as u64, Relaxed);
    }
    fn datagram_dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }
    fn retry_sent(&self) {
        self.retries_sent.fetch_add(1, Relaxed);
    }
    fn version_negotiation_sent(&self) {
        self.version_negotiations_sent.fetch_add(1, Relaxed);
    }
    fn stateless_reset_sent(&self) {
        self.stateless_resets_sent.fetch_add(1, Relaxed);
    }
}

impl<M: Metrics + ?Sized> Metrics for std::sync::Arc<M> {
    fn handshake_started(&self) {
        (**self).handshake_started()
    }
    fn handshake_completed(&self, duration: Duration) {
        (**self).handshake_completed(duration)
    }
    fn handshake_failed(&self, duration: Duration) {
        (**self).handshake_failed(duration)
    }
    fn connection_opened(&self) {
        (**self).connection_opened()
    }
    fn connection_closed(&self, stats: &ConnectionStats) {
        (**self).connection_closed(stats)
    }
    fn datagram_dropped(&self, reason: DropReason) {
        (**self).datagram_dropped(reason)
    }
    fn retry_sent(&self) {
        (**self).retry_sent()
    }
    fn version_negotiation_sent(&self) {
        (**self).version_negotiation_sent()
    }
    fn stateless_reset_sent(&self) {
        (**self).stateless_reset_sent()
    }
}
