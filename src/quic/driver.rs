//! The connection task ("driver"): the sole owner of one `quiche::Connection` (a [`QuicheConnection`]).
//!
//! It is a hand-written future rather than an `async fn` with `select!`, so that one poll
//! does a whole turn without intermediate futures: take in a close asked for by a handle and
//! received datagrams (bounded per turn), fire quiche's timer, let the application act, flush packets in GSO
//! batches. Another turn follows at once while datagrams are left over, and after a turn
//! with progress (unless the application says it needs none:
//! [`Application::repeat_after_progress`]); up to [`MAX_TURNS`] per poll, then it yields so
//! one busy connection cannot starve the others on its worker thread.
//!
//! What it needs from its endpoint — the socket, its registration in the socket's route
//! table, the reset key, the configuration with its metrics — arrives as one [`ConnContext`];
//! the driver knows nothing else of endpoints, so the endpoint can depend on it and not the
//! other way round.
//!
//! # Memory of an idle connection
//!
//! An idle connection is this task and what it owns, so everything here is sized for the
//! connection that waits, not for the one that is busy: the send buffer is per thread, the
//! inbound queue and the held packets hold no buffer while empty, a handle's close request
//! is one slot. Of the 42 KiB a server keeps per idle HTTP/3 connection
//! (`tests/idle_memory.rs`), about 32 KiB are quiche's own (the `Connection` struct alone is
//! 7.9 KiB, inline in this task) and 5 KiB BoringSSL's.
//!
//! # Where the CPU goes
//!
//! Profiles (`perf record`) of `bench_server` pinned to one core, with the load harness's
//! clients on the other (2026-11-27), in shares of the server's samples:
//!
//! - A 100 MiB download: quiche building packets 16 % (`send_single`) plus its recovery
//!   5 % and its copy of stream data into packets 2 %; AES-GCM 15–17 %; the kernel 17 %
//!   (the UDP send, in GSO batches of 42 packets per `sendmsg`, and the ACKs' receive). This driver and the HTTP/3 layer
//!   are under 3 %; body chunks reach quiche without a copy ([`QuicheConnection`]).
//! - A 100 MiB upload: AES-GCM 12 %, the kernel 25 % (mostly the receive), quiche's
//!   receive path (its reassembly buffer is a B-tree with an allocation per STREAM frame)
//!   about 15 %, malloc and free 8 %, the router and the inbound queue about 4 % besides
//!   the router's copy into its arena (part of the 6–7 % of `memmove`).
//!   One ACK leaves per driver turn (one `sendmsg` per 27 packets received).
//! - 32 connections with one request each at a time: one `sendmsg` per response (23 %:
//!   the kernel's send path, a third of it delivering the datagram over loopback), quiche's `recv` 13 % and
//!   packet building 10 %, quiche's HTTP/3 and QPACK 14 %, ours about 12 % spread over
//!   building the `http::Request`, polling the service and the response head, with no
//!   function above 3 % of its own.
//!
//! So most of the cost is quiche's per-packet work and the kernel's, which only batching
//! (done) or changes inside quiche reduce.

use super::bufs::QuicheConnection;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tokio::time::Sleep;
use tracing::Instrument;

use super::app::{Application, Closed, ConnectionHandle, ConnectionStats, HandleRequests, State};
use super::cid::{self, ResetKey};
use super::config::Config;
use super::routes::{InboundQueue, Registration};
use super::session::SessionSlot;
use super::tls;
use super::udp::Socket;
use crate::error::{self, Error};

/// Turns per poll before the task yields to its neighbours (hyper bounds its loop likewise).
const MAX_TURNS: usize = 16;

/// Datagrams fed to quiche per turn, so the application and the sender get their share
/// between bursts of input.
const MAX_DATAGRAMS_PER_TURN: usize = 64;

/// tokio's timers tick in milliseconds: a packet due within one tick is sent now.
const PACING_GRANULARITY: Duration = Duration::from_millis(1);

/// Most GSO segments in one send (the Linux limit).
const MAX_GSO_SEGMENTS: usize = 64;

/// Most bytes in one GSO send: the batch travels as one UDP datagram through the stack, so
/// it must fit the 16-bit UDP length (minus headers). A larger one fails with EMSGSIZE,
/// which quinn-udp drops silently, as it would an oversized MTU probe.
const MAX_GSO_BYTES: usize = 65_000;

/// The code an application's error closes its connection with: its own application code,
/// or 0x1 when it carries none or one from another space (a stream's reset code, say, means
/// something else in CONNECTION_CLOSE).
fn application_code(e: &Error) -> u64 {
    match e.code() {
        Some(crate::error::Code::Application(code)) => code,
        _ => 0x1,
    }
}

/// QUIC's transport error for a connection the server refuses (RFC 9000 §20.1).
const CONNECTION_REFUSED: u64 = 0x2;

thread_local! {
    /// The GSO batch being assembled. Flushing never yields mid-way, so one buffer per
    /// worker thread serves every connection: an idle connection holds no send buffer.
    static SEND_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What a connection's task gets from its endpoint, in one value.
pub(crate) struct ConnContext {
    /// The socket it sends on (the router reads it).
    pub(crate) socket: Arc<Socket>,
    /// The endpoint's configuration, with its metrics and connection ID generator.
    pub(crate) config: Config,
    /// The key its stateless reset tokens derive from (the router answers with the same).
    pub(crate) reset_key: Arc<ResetKey>,
    /// Its entries in the socket's route table, and its slot in the listener's caps.
    pub(crate) registration: Registration,
    /// The datagrams the router routes to it.
    pub(crate) inbound: InboundQueue,
    /// When the connection began (its first packet, or the connect call).
    pub(crate) started: Instant,
    /// A client connecting to an IP address: the address the server's certificate must
    /// carry. No SNI names it (RFC 6066 §3 allows host names only), so the check is ours.
    pub(crate) server_ip: Option<IpAddr>,
    /// A client's session cache, its key for this server and the address connected to:
    /// sessions the server issues are stored there for the next connection to resume.
    pub(crate) sessions: Option<SessionSlot>,
}

/// The application of a connection: running, or (client connects) waiting to be handed over
/// once the handshake has completed.
pub(crate) enum AppSlot<A> {
    Running(A),
    /// Told of the close ([`Application::on_closed`]) while the task lingers in the closing
    /// or draining period; dropped with the task (a server's `serve` waits for that: the
    /// task holds the listener's socket).
    Closed(A),
    Waiting(oneshot::Receiver<A>),
    Gone,
    /// A server connection refused before it started (`Incoming::refuse`): once the
    /// client's first packets are read and the server's first flight has gone out, it
    /// closes with CONNECTION_REFUSED.
    Refused,
}

/// The application of a connection that never runs one ([`AppSlot::Refused`]).
pub(crate) struct NoApplication;

impl Application for NoApplication {
    fn process(&mut self, _cx: &mut Context<'_>, _conn: &mut QuicheConnection) -> Result<(), Error> {
        Ok(())
    }
}

/// Packets the socket could not take yet (full buffer), or that pacing holds back.
struct Held {
    data: Vec<u8>,
    to: SocketAddr,
    segment: Option<usize>,
    /// When pacing lets it go; `None` once that time has come, or when only the full socket
    /// holds it.
    release: Option<Instant>,
}

struct Driver<A> {
    conn: QuicheConnection,
    app: AppSlot<A>,
    app_started: bool,
    /// Whether the application ran in early data (its `on_early_data` was called).
    app_started_early: bool,
    rx: InboundQueue,
    requests: Arc<HandleRequests>,
    socket: Arc<Socket>,
    config: Config,
    reset_key: Arc<ResetKey>,
    registration: Registration,
    state: watch::Sender<State>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    handshake_deadline: Option<Instant>,
    /// What ended the connection, where quiche's own view does not say.
    seen_end: error::SeenEnd,
    established: bool,
    started: Instant,
    held: VecDeque<Held>,
    verify_error: Option<String>,
    /// The connection's local address: on a wildcard socket, the one its peer sent its
    /// first packet to (`router`).
    local: SocketAddr,
    /// The source address its packets ask for ([`Socket::source_for`]).
    source: Option<IpAddr>,
    server_ip: Option<IpAddr>,
    sessions: Option<SessionSlot>,
    /// The session last stored (its address and length in quiche's buffer): a new ticket
    /// replaces the buffer, so a change says there is one to store.
    session_stored: (usize, usize),
    /// The connection has ended and said so (`finish`): nothing is left to tell the peer.
    finished: bool,
}

// The driver never pins the application in place: it only calls `&mut` methods on it.
impl<A> Unpin for Driver<A> {}

/// Spawns the task of `conn`, which drives `app` once the handshake has completed.
pub(crate) fn spawn<A: Application>(conn: QuicheConnection, ctx: ConnContext, app: AppSlot<A>) -> ConnectionHandle {
    let (driver, handle) = Driver::new(conn, ctx, app);
    let span = tracing::debug_span!(
        "quic_conn",
        id = %handle.trace_id,
        peer = %handle.peer_addr,
        server = driver.conn.is_server()
    );
    tokio::spawn(driver.instrument(span));
    handle
}

impl<A> Driver<A> {
    fn new(mut conn: QuicheConnection, ctx: ConnContext, app: AppSlot<A>) -> (Self, ConnectionHandle) {
        let ConnContext {
            socket,
            config,
            reset_key,
            registration,
            inbound,
            started,
            server_ip,
            sessions,
        } = ctx;
        if let Some(writer) = config.keylog_writer() {
            conn.set_keylog(writer);
        }
        #[cfg(feature = "qlog")]
        if let Some(dir) = &config.inner.qlog_dir {
            let role = if conn.is_server() { "server" } else { "client" };
            let path = dir.join(format!("{}-{role}.sqlog", conn.trace_id()));
            match std::fs::File::create(&path) {
                Ok(file) => conn.set_qlog(
                    Box::new(std::io::BufWriter::new(file)),
                    "tower-quiche".to_string(),
                    format!("{role} connection {}", conn.trace_id()),
                ),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot create qlog file"),
            }
        }
        inbound.started();
        let (state_tx, state_rx) = watch::channel(State::Handshaking);
        let requests = Arc::<HandleRequests>::default();
        let peer_addr = Socket::canonical(
            conn.path_stats()
                .next()
                .map(|p| p.peer_addr)
                .unwrap_or(socket.local_addr()),
        );
        let handle = ConnectionHandle {
            state: state_rx,
            requests: Arc::clone(&requests),
            peer_addr,
            trace_id: conn.trace_id().into(),
        };
        config.inner.metrics.connection_opened();
        if !conn.is_server() {
            config.inner.metrics.handshake_started();
        }
        let handshake_deadline = Some(started + config.inner.s.handshake_timeout);
        let local = conn
            .path_stats()
            .next()
            .map(|p| p.local_addr)
            .unwrap_or(socket.local_addr());
        let source = socket.source_for(local);
        let driver = Driver {
            conn,
            app,
            app_started: false,
            app_started_early: false,
            rx: inbound,
            requests,
            socket,
            config,
            reset_key,
            registration,
            state: state_tx,
            timer: Box::pin(tokio::time::sleep_until(started.into())),
            armed: None,
            handshake_deadline,
            seen_end: error::SeenEnd::Unremarkable,
            established: false,
            started,
            held: VecDeque::new(),
            verify_error: None,
            local,
            source,
            server_ip,
            sessions,
            session_stored: (0, 0),
            finished: false,
        };
        (driver, handle)
    }
}

enum Turn {
    Busy,
    Idle,
    Closed,
}

/// A task dropped while its connection is open (its runtime shut down: the process is
/// exiting, say) tells the peer, as the kernel does for a TCP socket: without a
/// CONNECTION_CLOSE the peer keeps the connection, and whatever waits on it (a graceful
/// shutdown that waits for its responses to be delivered), until its idle timeout. Best
/// effort: a transport close with NO_ERROR (the application's own codes are its to choose
/// while it runs), or the close the connection already had, in at most a few packets sent
/// without waiting for room in the socket.
impl<A> Drop for Driver<A> {
    fn drop(&mut self) {
        // Not while unwinding: a panic inside quiche may have left the connection half
        // updated, and a second panic here would abort the process. Nor once the task has
        // ended the connection itself (a handshake that timed out ends silently).
        if std::thread::panicking() || self.finished || self.conn.is_closed() || self.conn.is_draining() {
            return;
        }
        if self.conn.local_error().is_none() {
            // A close asked for earlier (and perhaps not sent yet) keeps its code.
            let _ = self.conn.close(false, 0x0, b"");
        }
        // The first packets may be something else (a path probe on a path being
        // validated): a few tries. A connection whose congestion window is full has no room
        // for the close, and ends at the peer's idle timeout as before.
        let mut packet = vec![0u8; self.conn.max_send_udp_payload_size()];
        for _ in 0..4 {
            let Ok((len, info)) = self.conn.send(&mut packet) else {
                break;
            };
            let _ = self.socket.try_send(info.to, self.source, &packet[..len], None);
            if self.conn.is_draining() || self.conn.is_closed() {
                break;
            }
        }
    }
}

impl<A: Application> Future for Driver<A> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        for _ in 0..MAX_TURNS {
            match this.turn(cx) {
                Turn::Busy => continue,
                Turn::Closed => {
                    this.finish();
                    return Poll::Ready(());
                }
                Turn::Idle => {
                    if this.arm_timer(cx) {
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
        // Out of budget with work left: let the other tasks of this thread run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<A: Application> Driver<A> {
    fn turn(&mut self, cx: &mut Context<'_>) -> Turn {
        let mut busy = false;
        if let Some(asked) = self.requests.poll_take(cx) {
            if let Some((code, reason)) = asked.close {
                let _ = self.conn.close(true, code, &reason);
            }
            #[cfg(feature = "client")]
            if let Some(at) = asked.handshake_deadline
                && !self.established
            {
                self.handshake_deadline = Some(self.handshake_deadline.map_or(at, |d| d.min(at)));
            }
            busy = true;
        }
        let mut taken = 0;
        for _ in 0..MAX_DATAGRAMS_PER_TURN {
            let Poll::Ready(mut datagram) = self.rx.poll_recv(cx) else {
                break;
            };
            taken += 1;
            let info = quiche::RecvInfo {
                from: datagram.from,
                to: self.local,
            };
            // Certificates are verified during the handshake only: the thread-local costs
            // nothing per packet after it, nor on connections to names.
            let received = match self.server_ip.filter(|_| !self.established) {
                Some(ip) => tls::verifying_ip(Some(ip), || self.conn.recv(&mut datagram.data, info)),
                None => self.conn.recv(&mut datagram.data, info),
            };
            if let Err(e) = received {
                tracing::trace!(error = %e, "packet not accepted");
            }
            if !self.established
                && let Some(reason) = tls::take_verify_error()
            {
                self.verify_error = Some(reason);
            }
        }
        if taken > 0
            && self.conn.is_closed()
            && self.conn.local_error().is_none()
            && self.conn.peer_error().is_none()
            && !self.conn.is_timed_out()
        {
            // Closed by a packet without an error: quiche recognised a stateless reset (a
            // failed path, the only other such close, comes with a timeout, below).
            self.seen_end = error::SeenEnd::StatelessReset;
        }
        // More may be queued: the queue has not said it is empty, so it will not wake us.
        let more_queued = taken == MAX_DATAGRAMS_PER_TURN;
        busy |= taken > 0;
        let now = Instant::now();
        if self.conn.timeout_instant().is_some_and(|t| t <= now) {
            self.conn.on_timeout();
            busy = true;
        }
        if busy {
            // quiche queues an event for each path the peer opens or that fails validation
            // (what the datagrams and the timeout just did), kept until taken: a peer that
            // sends from ever-new ports would otherwise grow this queue without bound.
            while let Some(event) = self.conn.path_event_next() {
                tracing::trace!(?event, "path event");
            }
        }
        if self.conn.is_established() {
            // The handshake is over, its deadline with it (one that completed in this very
            // turn made it): past, the deadline would wake the task on every turn, say while
            // a connection refused after the handshake drains its close.
            self.handshake_deadline = None;
        } else if self.handshake_deadline.is_some_and(|d| d <= now) {
            self.seen_end = error::SeenEnd::HandshakeDeadline;
            return Turn::Closed;
        }
        let wrong_address = !self.established
            && self.conn.is_established()
            && self.server_ip.is_some_and(|ip| {
                self.config.verifies_server_name() && !tls::certificate_has_ip(self.conn.peer_cert(), ip)
            });
        if wrong_address {
            // The verify callback refuses such a certificate during the handshake; this
            // second look makes a connection to an address fail closed should it ever not.
            if self.verify_error.is_none() {
                self.verify_error =
                    Some("certificate verify failed: IP address mismatch (checked after the handshake)".into());
                // CRYPTO_ERROR with TLS alert 42, bad_certificate (RFC 9001 §4.8).
                let _ = self.conn.close(false, 0x100 + 42, b"");
            }
        } else if !self.established && self.conn.is_established() {
            self.established = true;
            self.registration.established();
            if let Some(token) = self.conn.peer_transport_params().and_then(|p| p.stateless_reset_token) {
                // A server's: its stateless resets find this connection (`router`).
                self.registration.add_reset_token(token);
            }
            self.config.inner.metrics.handshake_completed(self.started.elapsed());
            tracing::debug!(alpn = %String::from_utf8_lossy(self.conn.application_proto()), "handshake complete");
            self.state.send_replace(State::Established);
            self.issue_connection_ids();
        }
        self.poll_hand_over(cx);
        // The application runs once the handshake has completed, or earlier in 0-RTT data
        // if it accepts early data (see `run_app`).
        if !self.conn.is_draining()
            && !self.conn.is_closed()
            && let Err(e) = self.run_app(cx)
        {
            tracing::debug!(error = %e, "application closes the connection");
            let reason = e.to_string();
            let _ = self.conn.close(true, application_code(&e), reason.as_bytes());
        }
        let mut retired = false;
        while let Some(id) = self.conn.retired_scid_next() {
            self.registration.remove(&id);
            retired = true;
        }
        if retired {
            self.issue_connection_ids();
        }
        let mut sent = self.flush(cx);
        if matches!(self.app, AppSlot::Refused) {
            if self.conn.local_error().is_none() && taken > 0 {
                if sent == 0 {
                    // The client's packets answered nothing (undecryptable): nobody to tell.
                    return Turn::Closed;
                }
                // Only now: the close goes in the handshake's packet space, which the client
                // can read only with the server's first flight (closed before it, quiche
                // could not build the close).
                let _ = self.conn.close(false, CONNECTION_REFUSED, b"");
                sent = self.flush(cx);
            }
            // Once the close has gone the task ends, without the closing period: a refusal
            // keeps nothing (its route, its slots, the listener's socket) after the server
            // is gone. Until then (the first flight used up the 3x anti-amplification
            // budget, or the socket was full) it waits, at most to the handshake deadline.
            if self.conn.local_error().is_some() && sent > 0 && self.held.is_empty() {
                return Turn::Closed;
            }
        }
        self.after_flush();
        if self.conn.is_draining() && matches!(self.app, AppSlot::Running(_)) {
            let error = error::from_close(&self.conn, self.seen_end, self.verify_error.as_deref());
            self.close_app(error.as_ref());
        }
        if self.conn.is_closed() {
            Turn::Closed
        } else if more_queued || ((busy || sent > 0) && (!self.established || self.repeats_after_progress())) {
            // During the handshake, what one turn did can give the next something to do
            // that nothing wakes the task for (a client's first flight makes 0-RTT
            // possible, and its application starts in the turn after it): turns repeat
            // while there is progress. Once established, so they do for an application
            // that asks (`Application::repeat_after_progress`); for one that does not,
            // every source of work wakes the task (the inbound queue, a handle's request,
            // the application's own wakers, the socket, the timer).
            Turn::Busy
        } else {
            Turn::Idle
        }
    }

    /// Whether the application wants a turn after each turn with progress (see
    /// [`Application::repeat_after_progress`]); without one yet, turns repeat; once it
    /// has been told of the close, nothing is left to repeat for.
    fn repeats_after_progress(&self) -> bool {
        match &self.app {
            AppSlot::Running(app) => app.repeat_after_progress(),
            AppSlot::Closed(_) => false,
            _ => true,
        }
    }

    /// Takes the application of a client connection when its connect attempt hands it
    /// over; closes the connection at once, mid-handshake too, when the attempt was
    /// abandoned (it lost a Happy Eyeballs race, or its caller went away), instead of
    /// completing a handshake nobody will use.
    fn poll_hand_over(&mut self, cx: &mut Context<'_>) {
        let AppSlot::Waiting(rx) = &mut self.app else {
            return;
        };
        match Pin::new(rx).poll(cx) {
            Poll::Ready(Ok(app)) => self.app = AppSlot::Running(app),
            Poll::Ready(Err(_)) => {
                tracing::debug!(established = self.established, "connect attempt abandoned; closing");
                self.app = AppSlot::Gone;
                let _ = self.conn.close(true, 0, b"");
            }
            Poll::Pending => {}
        }
    }

    /// Lets the application act: once the handshake has completed or, for an application
    /// that accepts early data, while the connection is in 0-RTT. Otherwise 0-RTT data
    /// quiche holds waits for the handshake, by which time the client has proven it holds
    /// the session's keys, so a replayed first flight never reaches such an application
    /// (the "wait for the handshake" option of RFC 8470 §3).
    fn run_app(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        let AppSlot::Running(app) = &mut self.app else {
            return Ok(());
        };
        if self.established {
            if !self.app_started {
                self.app_started = true;
                app.on_established(&mut self.conn)?;
            }
        } else if self.conn.is_in_early_data() && app.accepts_early_data() {
            if !self.app_started_early {
                self.app_started_early = true;
                app.on_early_data(&mut self.conn)?;
            }
        } else {
            return Ok(());
        }
        app.process(cx, &mut self.conn)
    }

    /// After a flush: a client's first flight on a resumed session makes early data
    /// possible (its handle's waiters learn it), and a session ticket the server sent is
    /// stored for the next connection.
    fn after_flush(&mut self) {
        if self.conn.is_server() {
            return;
        }
        if !self.established && matches!(*self.state.borrow(), State::Handshaking) && self.conn.is_in_early_data() {
            tracing::debug!("resumed session: 0-RTT data can be sent");
            self.state.send_replace(State::EarlyData);
        }
        if let Some(slot) = &self.sessions
            && let Some(session) = self.conn.session()
        {
            let seen = (session.as_ptr() as usize, session.len());
            if seen != self.session_stored {
                self.session_stored = seen;
                slot.store(session);
            }
        }
    }

    /// Offers the peer as many spare connection IDs as it accepts, each routed to us before
    /// the NEW_CONNECTION_ID frame that announces it is sent.
    fn issue_connection_ids(&mut self) {
        let generator = Arc::clone(&self.config.inner.cid_generator);
        // The peer's limit bounds this; the cap keeps a silly limit from costing much.
        for _ in 0..8 {
            if self.conn.scids_left() == 0 {
                break;
            }
            let id = cid::new_id(&*generator);
            let token = self.reset_key.token(&id);
            if self.conn.new_scid(&id, token, false).is_err() {
                break;
            }
            self.registration.add(&id);
        }
    }

    /// Sends what quiche has to send; returns the number of packets it produced.
    fn flush(&mut self, cx: &mut Context<'_>) -> usize {
        if !drain_held(&self.socket, self.source, &mut self.held, cx) {
            return 0;
        }
        SEND_BUF.with_borrow_mut(|buf| self.flush_into(buf, cx))
    }

    fn flush_into(&mut self, buf: &mut Vec<u8>, cx: &mut Context<'_>) -> usize {
        let socket = &*self.socket;
        let source = self.source;
        let mtu = self.conn.max_send_udp_payload_size();
        let max_segments = socket
            .max_gso_segments()
            .clamp(1, MAX_GSO_SEGMENTS)
            .min((MAX_GSO_BYTES / mtu).max(1));
        if buf.len() < mtu * max_segments {
            buf.resize(mtu * max_segments, 0);
        }
        let pacing = self.config.inner.s.pacing;
        // One clock read per flush: a flush takes microseconds, the pacing granularity 1 ms.
        let due_by = Instant::now() + PACING_GRANULARITY;
        let (mut len, mut segment, mut count) = (0, 0, 0);
        let mut to = self.local;
        let mut packets = 0;
        loop {
            if count == max_segments {
                if !send_or_hold(socket, source, &mut self.held, &buf[..len], to, segment, count, cx) {
                    return packets;
                }
                (len, count) = (0, 0);
            }
            let (n, info) = match self.conn.send(&mut buf[len..len + mtu]) {
                Ok(sent) => sent,
                Err(quiche::Error::Done) => break,
                Err(e) => {
                    // quiche has closed the connection for a fatal error; its
                    // CONNECTION_CLOSE goes out on the next call.
                    tracing::debug!(error = %e, "send failed");
                    break;
                }
            };
            packets += 1;
            if pacing && info.at > due_by {
                // Send what is due, and hold this packet until its release time.
                if count > 0 {
                    send_or_hold(socket, source, &mut self.held, &buf[..len], to, segment, count, cx);
                }
                self.held.push_back(Held {
                    data: buf[len..len + n].to_vec(),
                    to: info.to,
                    segment: None,
                    release: Some(info.at),
                });
                return packets;
            }
            if count > 0 && (info.to != to || n > segment) {
                // It cannot join this GSO batch: send the batch, then start the next with it.
                if !send_or_hold(socket, source, &mut self.held, &buf[..len], to, segment, count, cx) {
                    self.held.push_back(Held {
                        data: buf[len..len + n].to_vec(),
                        to: info.to,
                        segment: None,
                        release: None,
                    });
                    return packets;
                }
                buf.copy_within(len..len + n, 0);
                (len, count) = (0, 0);
            }
            if count == 0 {
                (segment, to) = (n, info.to);
            }
            len += n;
            count += 1;
            if n < segment {
                // A short datagram can only end a GSO batch.
                if !send_or_hold(socket, source, &mut self.held, &buf[..len], to, segment, count, cx) {
                    return packets;
                }
                (len, count) = (0, 0);
            }
        }
        if count > 0 {
            send_or_hold(socket, source, &mut self.held, &buf[..len], to, segment, count, cx);
        }
        packets
    }

    /// Arms the timer for the earliest deadline; returns true if that deadline has passed.
    fn arm_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let release = self.held.front().and_then(|h| h.release);
        let deadline = [self.conn.timeout_instant(), self.handshake_deadline, release]
            .into_iter()
            .flatten()
            .min();
        let Some(deadline) = deadline else {
            self.armed = None;
            return false;
        };
        if self.armed != Some(deadline) {
            self.timer.as_mut().reset(deadline.into());
            self.armed = Some(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }

    /// Tells the application that the connection has closed: at the end, or as soon as the
    /// connection closes (its CONNECTION_CLOSE sent or received), not after the closing or
    /// draining period (three probe timeouts, RFC 9000 §10.2) in which nothing more can be
    /// sent or received. A client's pool then stops choosing the connection at once,
    /// requests waiting for it fail unsent (to go elsewhere), and a server's handlers stop
    /// working for answers that could not go out.
    fn close_app(&mut self, error: Option<&Error>) {
        if let AppSlot::Running(mut app) = std::mem::replace(&mut self.app, AppSlot::Gone) {
            app.on_closed(&mut self.conn, error);
            self.app = AppSlot::Closed(app);
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        let error = error::from_close(&self.conn, self.seen_end, self.verify_error.as_deref());
        let stats = ConnectionStats::of(&self.conn);
        let metrics = &self.config.inner.metrics;
        if !self.established {
            metrics.handshake_failed(self.started.elapsed());
            // The session it resumed, if any, was taken from the cache when it started: a
            // connection that never completed leaves nothing to forget (and must not drop
            // the fresh session another connection to the server stored meanwhile).
        }
        metrics.connection_closed(&stats);
        self.close_app(error.as_ref());
        tracing::debug!(
            error = error.as_ref().map(tracing::field::display),
            rtt_us = stats.rtt.as_micros() as u64,
            cwnd = stats.cwnd,
            bytes_sent = stats.bytes_sent,
            bytes_received = stats.bytes_received,
            packets_lost = stats.packets_lost,
            "connection closed"
        );
        self.registration.release();
        self.state
            .send_replace(State::Closed(Arc::new(Closed { error, stats })));
    }
}

/// Sends one datagram or GSO batch; if the socket buffer is full, keeps a copy to send when
/// it drains. Returns false when the data was held (stop producing more).
#[allow(clippy::too_many_arguments)]
fn send_or_hold(
    socket: &Socket,
    source: Option<IpAddr>,
    held: &mut VecDeque<Held>,
    data: &[u8],
    to: SocketAddr,
    segment: usize,
    count: usize,
    cx: &mut Context<'_>,
) -> bool {
    let segment = (count > 1).then_some(segment);
    match socket.try_send(to, source, data, segment) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            held.push_back(Held {
                data: data.to_vec(),
                to,
                segment,
                release: None,
            });
            socket.wake_when_writable(cx.waker());
            false
        }
        // Anything else is lost as a network would lose it; QUIC recovers.
        _ => true,
    }
}

/// Sends held packets in order. Returns true when nothing is held any more.
fn drain_held(socket: &Socket, source: Option<IpAddr>, held: &mut VecDeque<Held>, cx: &mut Context<'_>) -> bool {
    while let Some(front) = held.front_mut() {
        if let Some(at) = front.release {
            if at > Instant::now() + PACING_GRANULARITY {
                return false;
            }
            // Due: from now on it waits for room in the socket only. A release time left
            // behind would be a timer already expired, and `arm_timer` would have the task
            // poll itself again at once for as long as the buffer stays full.
            front.release = None;
        }
        match socket.try_send(front.to, source, &front.data, front.segment) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                socket.wake_when_writable(cx.waker());
                return false;
            }
            _ => {
                held.pop_front();
            }
        }
    }
    true
}

/// What a client connection's task needs, on a socket of its own and with a route table no
/// router reads: a test or a bench drives the task by hand.
#[cfg(any(test, feature = "__bench"))]
fn unrouted_context(client: super::ClientConfig) -> ConnContext {
    let socket = Socket::bind("127.0.0.1:0".parse().expect("literal address")).expect("a socket");
    let (registration, inbound) = Registration::with_queue(&Arc::default(), &client.config.inner.s);
    ConnContext {
        socket: Arc::new(socket),
        config: client.config,
        reset_key: Arc::new(ResetKey::random()),
        registration,
        inbound,
        started: Instant::now(),
        server_ip: None,
        sessions: None,
    }
}

/// The driver's flush, for the benches (`benches/`, through `crate::__bench`).
#[cfg(feature = "__bench")]
pub(crate) mod bench {
    use super::*;
    use crate::quic::ClientConfig;
    use crate::testing::{self, Pipe};

    /// An application that does nothing: the bench times the flush alone.
    struct Quiet;

    impl Application for Quiet {
        fn process(&mut self, _: &mut Context<'_>, _: &mut QuicheConnection) -> Result<(), Error> {
            Ok(())
        }
    }

    /// A client connection's task with up to `bytes` of stream data written and not yet sent,
    /// on a loopback socket whose packets go to a socket nobody reads.
    pub(crate) struct Flush {
        driver: Driver<Quiet>,
        _sink: std::net::UdpSocket,
    }

    impl Flush {
        /// Must be called inside a tokio runtime (the socket and the timer are tokio's).
        pub(crate) fn new(bytes: usize) -> Flush {
            let sink = std::net::UdpSocket::bind("127.0.0.1:0").expect("a sink socket");
            let server = testing::server_config("bench", |t| t);
            let ctx = unrouted_context(testing::client_config("bench", |t| t));
            let client_addr = ctx.socket.local_addr();
            let client = ClientConfig {
                config: ctx.config.clone(),
            };
            let mut pipe = Pipe::between(&server, &client, client_addr, sink.local_addr().expect("bound")).handshake();
            let data = vec![0x5a; bytes];
            // quiche takes what the stream's credit and its send buffer allow.
            let written = pipe.client.stream_send(0, &data, false).expect("stream credit");
            assert!(written > 0, "the stream takes some");
            let (driver, _handle) = Driver::new(pipe.client, ctx, AppSlot::Gone);
            Flush { driver, _sink: sink }
        }

        /// Flushes what quiche lets go now (a congestion window's worth, in GSO batches);
        /// returns the number of packets.
        pub(crate) fn flush(&mut self) -> usize {
            self.driver.flush(&mut Context::from_waker(std::task::Waker::noop()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::echo::EchoServer;
    use crate::testing::{self, Pipe, WakeCount};

    /// A packet that pacing held back is due, but the socket's buffer is full: the task must
    /// sleep until the socket has room, not wake itself for a release time already past.
    #[tokio::test]
    async fn a_due_packet_the_socket_refuses_waits_for_room_not_for_a_timer() {
        let server = testing::server_config("test", |b| b);
        let client = testing::client_config("test", |b| b);
        let pipe = Pipe::handshaken(&server, &client);
        let ctx = unrouted_context(client);
        ctx.socket.refuse_sends(1);
        let (mut driver, _handle) = Driver::new(pipe.client, ctx, AppSlot::<EchoServer>::Gone);
        driver.held.push_back(Held {
            data: vec![0; 1200],
            to: testing::SERVER_ADDR.parse().unwrap(),
            segment: None,
            release: Some(Instant::now() - Duration::from_secs(1)),
        });
        let wakes = Arc::<WakeCount>::default();
        let waker = wakes.waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut driver).poll(&mut cx).is_pending());
        assert_eq!(
            wakes.count(),
            0,
            "the task woke itself, so it would be polled again at once, and again, while the buffer stays full"
        );
        assert_eq!(driver.held.len(), 1, "the packet waits");
        // The task registered with the socket instead: the socket's readiness wakes it.
        // (tokio's reactor reports a new socket writable when it first looks at it, so this
        // half shows the registration, not that room came back.)
        driver.socket.refuse_sends(0);
        let woken = async {
            while wakes.count() == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .expect("the socket woke the task");
    }

    /// A connection's task lifts the first-flight bound its queue had while it waited in
    /// the listener's backlog (`routes::Receiver::until_started`): from its start, the
    /// full inbound bounds apply.
    #[tokio::test]
    async fn a_started_connection_queues_past_the_first_flight() {
        let server = testing::server_config("test", |b| b);
        let client = testing::client_config("test", |b| b);
        let pipe = Pipe::handshaken(&server, &client);
        let mut ctx = unrouted_context(client);
        ctx.inbound = ctx.inbound.until_started();
        let route = ctx.registration.route().clone();
        let (_driver, _handle) = Driver::new(pipe.client, ctx, AppSlot::<EchoServer>::Gone);
        let from: SocketAddr = testing::SERVER_ADDR.parse().unwrap();
        for i in 0..100 {
            let datagram = super::super::routes::Datagram {
                data: bytes::BytesMut::zeroed(100),
                from,
                arena: 0,
            };
            assert!(route.try_send(datagram).is_ok(), "datagram {i} refused");
        }
    }

    /// The application hears of a close as soon as the CONNECTION_CLOSE arrives or leaves,
    /// not after the draining or closing period (three probe timeouts) in which the task
    /// lingers, and once: a client pool must stop choosing the connection at once.
    #[tokio::test]
    async fn the_application_is_told_of_a_close_when_it_arrives_or_leaves_once() {
        /// Records each `on_closed` (whether the connection was closed for good then), and
        /// fails its `process` when asked to (closing the connection itself).
        struct Recorder {
            told: Arc<std::sync::Mutex<Vec<bool>>>,
            fail: Arc<std::sync::atomic::AtomicBool>,
        }

        impl Application for Recorder {
            fn process(&mut self, _: &mut Context<'_>, _: &mut QuicheConnection) -> Result<(), Error> {
                if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(Error::application(7, "asked to fail"));
                }
                Ok(())
            }

            fn on_closed(&mut self, conn: &mut QuicheConnection, _: Option<&Error>) {
                self.told.lock().unwrap().push(conn.is_closed());
            }
        }

        let server = testing::server_config("test", |b| b);
        for peer_closes in [true, false] {
            let client = testing::client_config("test", |b| b);
            let mut pipe = Pipe::handshaken(&server, &client);
            let told = Arc::<std::sync::Mutex<Vec<bool>>>::default();
            let fail = Arc::<std::sync::atomic::AtomicBool>::default();
            let ctx = unrouted_context(client);
            let app = Recorder {
                told: Arc::clone(&told),
                fail: Arc::clone(&fail),
            };
            let (mut driver, _handle) = Driver::new(pipe.client, ctx, AppSlot::Running(app));
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(Pin::new(&mut driver).poll(&mut cx).is_pending());
            assert!(told.lock().unwrap().is_empty(), "open");
            if peer_closes {
                pipe.server.close(true, 0x100, b"bye").unwrap();
                let mut packet = [0; 1500];
                let (len, info) = pipe.server.send(&mut packet).unwrap();
                let to = driver.local;
                driver
                    .conn
                    .recv(&mut packet[..len], quiche::RecvInfo { from: info.from, to })
                    .unwrap();
            } else {
                fail.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let lingers = Pin::new(&mut driver).poll(&mut cx).is_pending();
            // Told in this very poll; still open for good unless the poll came after the
            // whole period (about 80 ms here: a machine this loaded only loses the check).
            assert_eq!(told.lock().unwrap().len(), 1, "told (peer closes: {peer_closes})");
            if lingers {
                assert!(driver.conn.is_draining());
                assert_eq!(*told.lock().unwrap(), [false], "told while the task lingers");
                let ended = async {
                    while Pin::new(&mut driver).poll(&mut cx).is_pending() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), ended)
                    .await
                    .expect("the period ends");
            }
            assert_eq!(told.lock().unwrap().len(), 1, "told once (peer closes: {peer_closes})");
        }
    }

    /// A connect attempt that is abandoned mid-handshake (a Happy Eyeballs loser) closes
    /// its connection at once: it does not complete a handshake nobody will use.
    #[tokio::test]
    async fn an_abandoned_connect_attempt_closes_before_its_handshake_completes() {
        let server = testing::server_config("test", |b| b);
        let client = testing::client_config("test", |b| b);
        let pipe = Pipe::new(&server, &client);
        let ctx = unrouted_context(client);
        let (hand_over, waiting) = oneshot::channel::<EchoServer>();
        let (mut driver, _handle) = Driver::new(pipe.client, ctx, AppSlot::Waiting(waiting));
        let wakes = Arc::<WakeCount>::default();
        let waker = wakes.waker();
        let mut cx = Context::from_waker(&waker);
        let _ = Pin::new(&mut driver).poll(&mut cx);
        assert!(!driver.conn.is_established());
        assert!(driver.conn.local_error().is_none(), "still connecting");
        drop(hand_over);
        let _ = Pin::new(&mut driver).poll(&mut cx);
        assert!(!driver.conn.is_established());
        assert!(
            driver.conn.local_error().is_some(),
            "the abandoned attempt closes without waiting for its handshake"
        );
    }
}
