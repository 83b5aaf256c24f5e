//! Connections: the [`Application`] seam through which a protocol drives a QUIC connection,
//! the [`ConnectionHandle`] other tasks hold, and [`ConnectionStats`].
//!
//! Each connection runs in one task (the driver) that is the sole owner of its
//! `QuicheConnection`: no lock guards it. Each turn the driver takes in received datagrams,
//! fires quiche's timer, lets the application act, and flushes packets in GSO batches.

use super::bufs::QuicheConnection;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::watch;

use crate::error::Error;

/// A protocol over QUIC, driven by the connection's task.
///
/// The connection task calls [`process`](Self::process) on every turn of its loop once the
/// handshake is complete: after it has fed received packets to quiche and before it sends
/// packets. The application reads what is readable, writes what the streams can take, and
/// returns; whatever it wrote is sent at once, in batches.
///
/// Work that arrives from other tasks (a request to send, a handle dropped) must wake the
/// connection task: register `cx`'s waker with whatever those tasks signal through (a
/// channel's `poll_recv`, for instance), exactly as in [`Future::poll`]. After a turn that
/// received or sent anything, the task takes another, so `process` runs again and sees what
/// its previous call and the flush after it changed; an application that needs no such
/// turn says so with [`repeat_after_progress`](Self::repeat_after_progress).
///
/// Every method runs on the connection's task, so none may block.
pub trait Application: Send + 'static {
    /// Whether [`process`](Self::process) may run before the handshake completes, while a
    /// resumed connection is in 0-RTT ("early") data: on a server, to read requests the
    /// client sent in its first flight; on a client, to send some. Early data can be
    /// replayed by an attacker (RFC 8446 §8), so an application that says yes must act
    /// only on what is safe to repeat until `conn.is_established()` (RFC 8470). Defaults to
    /// `false`: the application starts once the handshake has completed, and early data
    /// waits for it.
    fn accepts_early_data(&self) -> bool {
        false
    }

    /// Called once, before the first [`process`](Self::process) in early data (only for an
    /// application that [accepts early data](Self::accepts_early_data), and only on a
    /// connection that is in it). [`on_established`](Self::on_established) follows when
    /// the handshake completes.
    fn on_early_data(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        let _ = conn;
        Ok(())
    }

    /// Called once, when the handshake has completed.
    fn on_established(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        let _ = conn;
        Ok(())
    }

    /// Lets the application act on the connection. An error closes the connection, with the
    /// error's [`code`](Error::code) as the application error code (or 0x1 when it has
    /// none).
    fn process(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), Error>;

    /// Whether, once the handshake has completed, a turn that received datagrams or sent
    /// packets is followed at once by another (default `true`), in which
    /// [`process`](Self::process) runs again.
    ///
    /// Return `false` when `process` leaves nothing for such a turn to find: it acts on all
    /// that the datagrams brought in the call that follows them, and when it returns with
    /// work left that nothing else will signal (a budget of its own spent, say), it wakes
    /// `cx`'s waker itself. A turn then happens only when something wakes the task (a
    /// datagram, quiche's timer, the application's own wakers), which saves one turn per
    /// exchange: about 3,000 instructions a request when 32 connections send one request
    /// each (callgrind). Room a stream lacks comes with the peer's acknowledgements, which
    /// arrive as datagrams: no wake is needed to wait for it. During the handshake turns
    /// always repeat while there is progress.
    fn repeat_after_progress(&self) -> bool {
        true
    }

    /// Called once when the connection closes: as soon as a CONNECTION_CLOSE is sent or
    /// received (not after the closing or draining period that follows, in which nothing
    /// more is sent or received), or when it ends without one (idle timeout, failed
    /// handshake). `error` says why, when it was not a clean close. Nothing can be sent any
    /// more, but what the peer sent before it closed can still be read from `conn`'s
    /// streams. Nothing else is called; the application is dropped when the connection's
    /// task ends (after that period).
    fn on_closed(&mut self, conn: &mut QuicheConnection, error: Option<&Error>) {
        let _ = (conn, error);
    }
}

/// Statistics of a connection and its active path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Smallest round-trip time seen.
    pub min_rtt: Option<Duration>,
    /// Congestion window, in bytes.
    pub cwnd: usize,
    /// Path MTU in use, in bytes.
    pub pmtu: usize,
    /// Bytes sent (including retransmissions).
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes lost.
    pub bytes_lost: u64,
    /// QUIC packets sent.
    pub packets_sent: usize,
    /// QUIC packets received.
    pub packets_received: usize,
    /// QUIC packets lost.
    pub packets_lost: usize,
    /// Packets retransmitted.
    pub packets_retransmitted: usize,
}

impl ConnectionStats {
    /// Reads the statistics of a quiche connection (what an [`Application`] has at hand).
    pub fn of(conn: &QuicheConnection) -> Self {
        let s = conn.stats();
        let mut stats = ConnectionStats {
            bytes_sent: s.sent_bytes,
            bytes_received: s.recv_bytes,
            bytes_lost: s.lost_bytes,
            packets_sent: s.sent,
            packets_received: s.recv,
            packets_lost: s.lost,
            packets_retransmitted: s.retrans,
            ..Default::default()
        };
        if let Some(path) = conn.path_stats().find(|p| p.active) {
            stats.rtt = path.rtt;
            stats.min_rtt = path.min_rtt;
            stats.cwnd = path.cwnd;
            stats.pmtu = path.pmtu;
        }
        stats
    }
}

/// Where a connection is in its life, as its handle sees it.
#[derive(Clone)]
pub(crate) enum State {
    Handshaking,
    /// A resumed client connection that can send 0-RTT data while its handshake goes on.
    EarlyData,
    Established,
    Closed(Arc<Closed>),
}

/// How a connection ended.
#[derive(Debug)]
pub struct Closed {
    pub(super) error: Option<Error>,
    pub(super) stats: ConnectionStats,
}

impl Closed {
    /// Why the connection closed, or `None` for a clean close (no error code, or the
    /// application protocol's "no error").
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// The connection's final statistics.
    pub fn stats(&self) -> &ConnectionStats {
        &self.stats
    }
}

/// What [`ConnectionHandle`]s ask of the connection's task: a close, and (a client's pool)
/// a deadline for the handshake.
///
/// Slots, not a channel: one close is all there can usefully be (the first asked for wins
/// until the task takes it), and a slot costs a few dozen bytes where a tokio channel
/// allocates its shared state and a first block of 32 slots (1.8 KiB) up front, held by
/// every connection for its whole life.
#[derive(Default)]
pub(crate) struct HandleRequests {
    asked: Mutex<Asked>,
    /// Something was asked since the task last looked: the task takes the lock only then,
    /// not on every turn.
    pending: AtomicBool,
    task: AtomicWaker,
}

/// What handles asked for since the task last looked.
#[derive(Default)]
pub(crate) struct Asked {
    /// The first close asked for.
    pub(crate) close: Option<(u64, Bytes)>,
    /// The handshake must complete by then (the earliest asked), or the connection fails
    /// as timed out.
    #[cfg(feature = "client")]
    pub(crate) handshake_deadline: Option<std::time::Instant>,
}

impl HandleRequests {
    fn ask(&self, f: impl FnOnce(&mut Asked)) {
        // `Asked` is consistent whatever a panicking holder did.
        f(&mut self.asked.lock().unwrap_or_else(|p| p.into_inner()));
        self.pending.store(true, Ordering::Release);
        self.task.wake();
    }

    fn ask_close(&self, code: u64, reason: Bytes) {
        self.ask(|asked| {
            asked.close.get_or_insert((code, reason));
        });
    }

    #[cfg(feature = "client")]
    fn limit_handshake(&self, deadline: std::time::Instant) {
        self.ask(|asked| {
            asked.handshake_deadline = Some(asked.handshake_deadline.map_or(deadline, |d| d.min(deadline)));
        });
    }

    /// What was asked since the last look, if anything; otherwise the task (`cx`) is woken
    /// by the next ask.
    pub(crate) fn poll_take(&self, cx: &Context<'_>) -> Option<Asked> {
        // Registered before looking, so an ask in between is not missed.
        self.task.register(cx.waker());
        if !self.pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(std::mem::take(
            &mut *self.asked.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// A handle to a running connection: wait for its handshake or its end, or close it.
///
/// Cheap to clone. Dropping every handle does not close the connection: its
/// [`Application`] decides that.
#[derive(Clone)]
pub struct ConnectionHandle {
    pub(super) state: watch::Receiver<State>,
    pub(super) requests: Arc<HandleRequests>,
    pub(super) peer_addr: SocketAddr,
    pub(super) trace_id: Arc<str>,
}

impl fmt::Debug for ConnectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandle")
            .field("trace_id", &self.trace_id)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

impl ConnectionHandle {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// quiche's trace ID of the connection, as in logs and qlog files.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// Waits until the handshake has completed; fails with the reason it did not.
    pub async fn established(&self) -> Result<(), Error> {
        let mut state = self.state.clone();
        let result = state
            .wait_for(|s| !matches!(s, State::Handshaking | State::EarlyData))
            .await;
        Self::outcome(result.as_deref())
    }

    /// Waits until the handshake has completed or, with `early`, until the connection can
    /// send 0-RTT data (a resumed client connection), whichever comes first.
    pub(crate) async fn usable(&self, early: bool) -> Result<(), Error> {
        let mut state = self.state.clone();
        let result = state
            .wait_for(|s| match s {
                State::Handshaking => false,
                State::EarlyData => early,
                State::Established | State::Closed(_) => true,
            })
            .await;
        Self::outcome(result.as_deref())
    }

    fn outcome(state: Result<&State, &watch::error::RecvError>) -> Result<(), Error> {
        match state {
            Ok(State::Established | State::EarlyData) => Ok(()),
            Ok(State::Closed(closed)) => {
                Err(closed.error.as_ref().map(Error::duplicate).unwrap_or_else(|| {
                    Error::new(crate::error::Kind::Closed).with_message("closed during the handshake")
                }))
            }
            _ => Err(task_ended()),
        }
    }

    /// Waits until the connection has closed.
    pub async fn closed(&self) -> Arc<Closed> {
        let mut state = self.state.clone();
        let result = state.wait_for(|s| matches!(s, State::Closed(_))).await;
        match result.as_deref() {
            Ok(State::Closed(closed)) => Arc::clone(closed),
            _ => Arc::new(Closed {
                error: Some(task_ended()),
                stats: ConnectionStats::default(),
            }),
        }
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        matches!(*self.state.borrow(), State::Closed(_))
    }

    /// Fails the connection as timed out unless its handshake completes by `deadline` (a
    /// resumed connection is used before then, for 0-RTT data, and its caller's connect
    /// timeout must still hold).
    #[cfg(feature = "client")]
    pub(crate) fn limit_handshake(&self, deadline: std::time::Instant) {
        self.requests.limit_handshake(deadline);
    }

    /// Closes the connection with an application error code and reason, which the peer
    /// receives in CONNECTION_CLOSE. A code above 2^62 − 1, the largest QUIC carries, is
    /// sent as that.
    pub fn close(&self, code: u64, reason: impl Into<Bytes>) {
        self.requests.ask_close(wire_code(code), reason.into());
    }
}

/// The largest error code QUIC carries (a variable-length integer, RFC 9000 §16). quiche
/// panics encoding a larger one, in the connection's task (every stream of the connection
/// would go with it): each code an application hands the QUIC layer passes [`wire_code`].
pub(crate) const MAX_CODE: u64 = (1 << 62) - 1;

/// `code` as it is sent: one QUIC cannot carry goes as [`MAX_CODE`].
pub(crate) fn wire_code(code: u64) -> u64 {
    code.min(MAX_CODE)
}

/// What a handle reports when the connection's task is gone without saying how it ended.
fn task_ended() -> Error {
    Error::new(crate::error::Kind::Closed).with_message("the connection task ended")
}
