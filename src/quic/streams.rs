//! The async stream API: a [`StreamConnection`] whose streams are [`SendStream`]s
//! ([`AsyncWrite`]) and [`RecvStream`]s ([`AsyncRead`]), for a protocol over raw QUIC that
//! needs no more than byte streams.
//!
//! It is an [`Application`] like any other (`StreamsApp`, driven by the connection's task);
//! the user's tasks talk to it through shared state, as the HTTP/3 streams do:
//!
//! - **Per stream**, one [`Stream`] behind a mutex: the bytes that arrived and wait for the
//!   reader, the bytes the writer wrote and the connection has not handed to quiche yet, and
//!   the end of each direction. A poll takes the lock once, whatever the number of bytes.
//! - **Wake-ups.** A user task queues its stream in the connection's [`ConnNotify`] only when
//!   the connection task has something new to do (a write into an empty buffer, a reader
//!   freeing room the connection stopped for, a finish, a reset), and only once until the
//!   connection task has looked. The connection task wakes the reader or writer through the
//!   waker kept in the stream.
//! - **Bounded.** The connection reads a stream from quiche only while its receive buffer
//!   has room, so a slow reader leaves the bytes in quiche and QUIC flow control holds the
//!   peer back; `poll_write` waits while the send buffer is full. New streams the user has
//!   not accepted yet are not read at all: see [`StreamsApp::open_peer`] for why their
//!   number needs no bound of its own.
//! - **Close.** When the connection closes, what had fully arrived on a stream stays
//!   readable; anything else fails with the connection's error, and no call waits for ever.

use super::bufs::QuicheConnection;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Sleep;

use super::app::{Application, ConnectionHandle};
use super::config::Config;
use super::notify::{ConnNotify, Queued};
use super::stream_ids::{StreamIdMap, StreamIdSet};
use crate::error::{Code, Error, Kind};

/// The code a [`SendStream`] dropped before it finished resets its stream with
/// (RESET_STREAM), and a [`RecvStream`] dropped before its end stops its stream with
/// (STOP_SENDING).
const DROPPED_CODE: u64 = 0;

/// The most read from quiche into a receive buffer at once, so a large buffer is not
/// reserved whole for a few bytes.
const READ_CHUNK: usize = 64 * 1024;

/// quiche's default priority, given to the local streams it creates for us.
const DEFAULT_URGENCY: u8 = 127;

/// The two kinds of stream, as indexes into per-kind arrays.
const BIDI: usize = 0;
const UNI: usize = 1;

/// The kind of stream `id` is (RFC 9000 §2.1: the second bit).
fn kind_of(id: u64) -> usize {
    ((id >> 1) & 1) as usize
}

/// Whether stream `id` was opened by the endpoint that is (or is not) the server.
fn opened_by_server(id: u64) -> bool {
    id & 1 == 1
}

/// The ID of the `index`th stream of `kind` opened by the server or the client.
fn stream_id(index: u64, kind: usize, server: bool) -> u64 {
    index * 4 + (kind as u64) * 2 + u64::from(server)
}

fn closed_error() -> Error {
    Error::new(Kind::Closed).with_message("the connection closed")
}

/// Why a direction of a stream failed, as its reader or writer sees it.
enum Failure {
    /// The peer reset the stream (RESET_STREAM) with this code.
    PeerReset(u64),
    /// The peer stopped the stream (STOP_SENDING) with this code.
    PeerStopped(u64),
    /// The connection closed (or quiche failed the stream) before this direction ended.
    Closed(Error),
    /// This side stopped or reset the stream itself; a read or write after that.
    Local(&'static str),
}

impl Failure {
    fn to_io(&self) -> io::Error {
        let (kind, error) = match self {
            Failure::PeerReset(code) => (
                io::ErrorKind::ConnectionReset,
                Error::new(Kind::Reset)
                    .with_code(Code::Stream(*code))
                    .with_message("the peer reset the stream"),
            ),
            Failure::PeerStopped(code) => (
                io::ErrorKind::BrokenPipe,
                Error::new(Kind::Reset)
                    .with_code(Code::Stream(*code))
                    .with_message("the peer stopped the stream (STOP_SENDING)"),
            ),
            Failure::Closed(error) => (io::ErrorKind::ConnectionAborted, error.duplicate()),
            Failure::Local(why) => (io::ErrorKind::NotConnected, Error::new(Kind::Closed).with_message(*why)),
        };
        io::Error::new(kind, error)
    }
}

/// What arrives on a stream, between quiche and the [`RecvStream`].
struct RecvHalf {
    buf: BytesMut,
    limit: usize,
    /// The peer's FIN has been read: `buf` holds the rest of the stream.
    fin: bool,
    failure: Option<Failure>,
    waker: Option<Waker>,
    /// quiche holds bytes the buffer had no room for.
    pending: bool,
    /// A [`RecvStream`] exists: until then the bytes wait in quiche.
    taken: bool,
    /// The reader stopped (or went away) with this code; nothing more is kept.
    stopped: Option<u64>,
    /// quiche needs nothing more from us for this direction (or it does not exist).
    settled: bool,
}

impl RecvHalf {
    fn fail(&mut self, failure: Failure) {
        self.failure.get_or_insert(failure);
        self.settled = true;
        self.pending = false;
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// What leaves on a stream, between the [`SendStream`] and quiche.
struct SendHalf {
    buf: BytesMut,
    limit: usize,
    /// The writer finished: a FIN follows what `buf` holds.
    fin: bool,
    /// The writer asks for a reset with this code.
    reset: Option<u64>,
    failure: Option<Failure>,
    waker: Option<Waker>,
    /// Nothing more goes to quiche: the FIN was handed over, or the direction was reset,
    /// stopped or closed (or does not exist).
    done: bool,
    /// When bytes last went to quiche (see [`bare_fin`]).
    handed: Option<Instant>,
}

impl SendHalf {
    fn fail(&mut self, failure: Failure) {
        self.failure.get_or_insert(failure);
        self.done = true;
        self.buf = BytesMut::new();
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

struct StreamState {
    recv: RecvHalf,
    send: SendHalf,
    /// Already in the connection's ready list.
    queued: bool,
}

impl Queued for StreamState {
    fn queued(&mut self) -> &mut bool {
        &mut self.queued
    }
}

/// One stream's shared state: the connection task on one side, a [`RecvStream`] and a
/// [`SendStream`] on the other.
struct Stream {
    id: u64,
    conn: Arc<ConnShared>,
    state: Mutex<StreamState>,
}

impl Stream {
    fn new(id: u64, conn: &Arc<ConnShared>, recv: bool, send: bool, local: bool) -> Arc<Stream> {
        let limits = conn.limits;
        Arc::new(Stream {
            id,
            conn: Arc::clone(conn),
            state: Mutex::new(StreamState {
                recv: RecvHalf {
                    buf: BytesMut::new(),
                    limit: limits.recv,
                    fin: false,
                    failure: None,
                    waker: None,
                    pending: false,
                    taken: local,
                    stopped: None,
                    settled: !recv,
                },
                send: SendHalf {
                    buf: BytesMut::new(),
                    limit: limits.send,
                    fin: false,
                    reset: None,
                    failure: None,
                    waker: None,
                    done: !send,
                    handed: None,
                },
                // A local stream is queued as it is opened.
                queued: local,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state; queues the stream for the connection task (once until it
    /// looks) if `f` says the connection has something to do.
    fn update<R>(&self, f: impl FnOnce(&mut StreamState) -> (R, bool)) -> R {
        self.conn.notify.update(&self.state, || self.id, f)
    }
}

/// The buffer limits of each stream.
#[derive(Debug, Clone, Copy)]
struct Limits {
    recv: usize,
    send: usize,
}

/// The connection-wide state the user's handles share with the connection task.
struct ConnShared {
    notify: ConnNotify,
    state: Mutex<ConnState>,
    /// Wakes `accept_*` when a stream arrives or the connection closes.
    accepted: Notify,
    /// Wakes `open_*` when the peer allows more streams or the connection closes.
    credit: Notify,
    /// Live [`StreamConnection`]s and stream halves: the connection closes when none is left.
    users: AtomicUsize,
    limits: Limits,
    server: bool,
}

struct ConnState {
    /// Streams the peer opened, per kind, not yet accepted.
    incoming: [VecDeque<Arc<Stream>>; 2],
    /// Local streams opened by the user, per kind.
    opened: [u64; 2],
    /// How many local streams of each kind the peer allows in all, as last seen.
    allowed: [u64; 2],
    /// Local streams opened that the connection task has not created in quiche yet.
    new_local: Vec<Arc<Stream>>,
    /// Why the connection closed, once it has.
    closed: Option<Error>,
}

impl ConnShared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_user(&self) {
        self.users.fetch_add(1, Ordering::Relaxed);
    }

    fn drop_user(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.wake();
        }
    }

    async fn accept(&self, kind: usize) -> Option<Arc<Stream>> {
        loop {
            let notified = self.accepted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(stream) = state.incoming[kind].pop_front() {
                    drop(state);
                    // The connection task reads it from now on.
                    stream.update(|s| {
                        s.recv.taken = true;
                        ((), !s.recv.settled)
                    });
                    return Some(stream);
                }
                if state.closed.is_some() {
                    return None;
                }
            }
            notified.await;
        }
    }

    async fn open(self: &Arc<Self>, kind: usize) -> Result<Arc<Stream>, Error> {
        loop {
            let notified = self.credit.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(error) = &state.closed {
                    return Err(error.duplicate());
                }
                if state.opened[kind] < state.allowed[kind] {
                    let id = stream_id(state.opened[kind], kind, self.server);
                    state.opened[kind] += 1;
                    let stream = Stream::new(id, self, kind == BIDI, true, true);
                    state.new_local.push(Arc::clone(&stream));
                    drop(state);
                    self.notify.notify(id);
                    return Ok(stream);
                }
            }
            notified.await;
        }
    }
}

/// The [`Application`] behind a [`StreamConnection`]: moves bytes between quiche and the
/// streams' buffers on the connection's task.
pub(crate) struct StreamsApp {
    shared: Arc<ConnShared>,
    streams: StreamIdMap<Arc<Stream>>,
    /// Streams with bytes quiche could not take: looked at again when quiche lists them
    /// writable.
    blocked: StreamIdSet,
    /// Streams whose FIN without data waits ([`bare_fin`]): looked at again every turn, and
    /// when the earliest of them is due.
    fins: StreamIdSet,
    fin_due: Option<Instant>,
    /// Wakes the connection task when the earliest FIN is due, or the linger gives up.
    timer: Pin<Box<Sleep>>,
    ready: Vec<u64>,
    /// Streams whose FIN went to quiche and which quiche may still hold, unacknowledged:
    /// once every handle is gone, the connection waits for them before it closes. Looked
    /// through, and the streams quiche forgot dropped, whenever it reaches `sent_check_at`,
    /// which is then twice what is left: it holds at most twice the streams quiche holds,
    /// plus a few, at a constant cost per stream.
    sent: StreamIdSet,
    sent_check_at: usize,
    /// The peer's STOP_SENDING frames so far (quiche's count): `sent` is looked through
    /// again when it moves.
    stops_seen: u64,
    /// Set once every handle is gone: see [`StreamsApp::start_linger`].
    linger: Option<Linger>,
    /// The connection's idle timeout: how long a linger waits without progress.
    idle_timeout: Duration,
    /// Per kind, the indexes of the peer's streams seen so far (they need not arrive in
    /// order).
    seen: [Seen; 2],
    /// Streams the peer opened this turn, for the accept queues.
    arrived: Vec<Arc<Stream>>,
    /// Local streams created in quiche, per kind.
    created: [u64; 2],
    /// What `open_*` was last told the peer allows, per kind.
    allowed: [u64; 2],
}

/// How many entries `StreamsApp::sent` holds before it is first looked through.
const SENT_CHECK_MIN: usize = 64;

/// What a connection nobody holds any more still has to deliver, and how long it may take.
struct Linger {
    /// When it gives up and closes anyway: an idle timeout after the last progress.
    deadline: Instant,
    /// What was left to deliver when last looked at: streams quiche holds, bytes and FINs
    /// not handed to quiche yet. quiche takes a stream's bytes only as its congestion
    /// window has room, so the bytes not handed yet shrink as the peer acknowledges:
    /// progress on a slow path shows here (`quic_streams::dropping_every_handle_delivers_a_finished_stream_slower_than_the_idle_timeout`).
    left: (usize, usize),
}

/// The indexes of the peer's streams of one kind seen so far: the lowest index not seen yet,
/// and the runs of seen indexes above it.
///
/// Its size is bounded by the peer's stream credit, not by the number of streams it opens:
/// quiche lets the peer use an index only below the MAX_STREAMS limit it granted, which is
/// the initial limit (`TransportConfig::max_concurrent_bidi_streams` or `_uni_streams`) plus
/// one per stream of the peer's that quiche has forgotten, and quiche forgets only streams
/// that were used. So every index seen is below that initial limit plus the number of
/// indexes used: fewer indexes than the initial limit are skipped below the highest one
/// seen, and the runs between those gaps are no more numerous than the gaps plus one.
#[derive(Debug, Default)]
struct Seen {
    /// Every index below this one was seen.
    next: u64,
    /// Runs `start..end` of seen indexes above `next`, keyed by `start`: none touches
    /// another or `next`.
    ahead: BTreeMap<u64, u64>,
}

impl Seen {
    /// Records `index`; false if it was seen already.
    fn insert(&mut self, index: u64) -> bool {
        if index < self.next {
            return false;
        }
        let before = self
            .ahead
            .range(..=index)
            .next_back()
            .map(|(&start, &end)| (start, end));
        let start = match before {
            Some((_, end)) if index < end => return false,
            // Extends the run that ends just below it.
            Some((start, end)) if end == index => start,
            _ => index,
        };
        // Joins the run that starts just above it.
        let end = self.ahead.remove(&(index + 1)).unwrap_or(index + 1);
        if start == self.next {
            self.ahead.remove(&start);
            self.next = end;
        } else {
            self.ahead.insert(start, end);
        }
        true
    }
}

/// A new connection's application and the state its [`StreamConnection`] shares with it.
pub(crate) fn new(config: &Config, server: bool) -> (StreamsApp, StreamConnectionParts) {
    let s = &config.inner.s;
    let shared = Arc::new(ConnShared {
        notify: ConnNotify::default(),
        state: Mutex::new(ConnState {
            incoming: [VecDeque::new(), VecDeque::new()],
            opened: [0; 2],
            allowed: [0; 2],
            new_local: Vec::new(),
            closed: None,
        }),
        accepted: Notify::new(),
        credit: Notify::new(),
        // The StreamConnection made from the parts.
        users: AtomicUsize::new(1),
        limits: Limits {
            recv: s.stream_recv_buffer,
            send: s.stream_send_buffer,
        },
        server,
    });
    let app = StreamsApp {
        shared: Arc::clone(&shared),
        streams: StreamIdMap::default(),
        blocked: StreamIdSet::default(),
        fins: StreamIdSet::default(),
        fin_due: None,
        timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        ready: Vec::new(),
        sent: StreamIdSet::default(),
        sent_check_at: SENT_CHECK_MIN,
        stops_seen: 0,
        linger: None,
        idle_timeout: s.idle_timeout,
        seen: [Seen::default(), Seen::default()],
        arrived: Vec::new(),
        created: [0; 2],
        allowed: [0; 2],
    };
    (app, StreamConnectionParts(shared))
}

/// What a [`StreamConnection`] is made of, besides its [`ConnectionHandle`].
pub(crate) struct StreamConnectionParts(Arc<ConnShared>);

impl StreamConnectionParts {
    pub(crate) fn with_handle(self, handle: ConnectionHandle) -> StreamConnection {
        StreamConnection { handle, shared: self.0 }
    }
}

impl StreamsApp {
    /// Takes in a stream of the peer's that quiche lists, if it is new; returns false for a
    /// stream we are done with.
    ///
    /// A new stream waits in its accept queue, unread, until the user accepts it. Its
    /// bytes stay in quiche, whose per-stream window bounds them, and the queue needs no
    /// bound of its own: quiche counts a stream against the limit of concurrent streams it
    /// grants the peer (`TransportConfig::max_concurrent_bidi_streams` and `_uni_streams`)
    /// until the stream is finished both ways, which an unaccepted stream never is. So the
    /// peer can open no more than that many before it must wait for MAX_STREAMS, and the
    /// queue holds at most that many entries, with no data.
    fn open_peer(&mut self, conn: &mut QuicheConnection, id: u64) -> bool {
        if opened_by_server(id) == self.shared.server {
            return false;
        }
        let kind = kind_of(id);
        if !self.seen[kind].insert(id >> 2) {
            return false;
        }
        if self.linger.is_some() {
            // Nobody will accept it: the caller stops it, and here its other direction is
            // reset.
            if kind == BIDI {
                let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, DROPPED_CODE);
            }
            return false;
        }
        let stream = Stream::new(id, &self.shared, true, kind == BIDI, false);
        self.streams.insert(id, Arc::clone(&stream));
        self.arrived.push(stream);
        true
    }

    /// Creates in quiche the local streams the user opened, so that quiche counts them
    /// against the peer's limit; they join `ready`.
    fn adopt_local(&mut self, conn: &mut QuicheConnection, ready: &mut Vec<u64>) {
        let new = std::mem::take(&mut self.shared.lock().new_local);
        for stream in new {
            let id = stream.id;
            // The user opened it within the peer's credit, so this fails only on a
            // connection that is going away.
            if let Err(e) = conn.stream_priority(id, DEFAULT_URGENCY, true) {
                let mut s = stream.lock();
                let error = || Error::new(Kind::Closed).with_message(format!("cannot open the stream: {e}"));
                s.recv.fail(Failure::Closed(error()));
                s.send.fail(Failure::Closed(error()));
                continue;
            }
            self.created[kind_of(id)] += 1;
            self.streams.insert(id, stream);
            ready.push(id);
        }
    }

    /// Tells `open_*` how many streams the peer allows now, when that changed.
    fn publish_credit(&mut self, conn: &QuicheConnection) {
        let allowed = [
            self.created[BIDI] + conn.peer_streams_left_bidi(),
            self.created[UNI] + conn.peer_streams_left_uni(),
        ];
        if self.allowed != allowed {
            self.allowed = allowed;
            self.shared.lock().allowed = allowed;
            self.shared.credit.notify_waiters();
        }
    }

    fn service(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(stream) = self.streams.get(&id) else {
            return;
        };
        let mut state = stream.lock();
        state.queued = false;
        if state.recv.taken
            && !state.send.done
            && let Err(quiche::Error::StreamStopped(code)) = conn.stream_capacity(id)
        {
            // The peer stopped our direction. Said before reading: once the peer's end is
            // read, quiche forgets a stream it counts complete both ways (a stopped
            // direction counts so), and no write would learn of the stop. Not before the
            // stream is accepted: there is no writer to tell yet, and a stream quiche
            // forgot while it waits in the accept queue would give the peer its credit
            // back (the queue's bound is that credit).
            state.send.fail(Failure::PeerStopped(code));
        }
        read_from(conn, id, &mut state.recv);
        let was_done = state.send.done;
        let wait = write_to(conn, id, &mut state.send);
        let w = &state.send;
        if !was_done && w.done && w.fin && w.reset.is_none() && w.failure.is_none() {
            self.sent.insert(id);
        }
        if matches!(wait, Wait::Quiche) {
            self.blocked.insert(id);
        } else {
            self.blocked.remove(&id);
        }
        match wait {
            Wait::Fin(until) => {
                self.fins.insert(id);
                self.fin_due = Some(self.fin_due.map_or(until, |due| due.min(until)));
            }
            _ => {
                self.fins.remove(&id);
            }
        }
        let settled = state.recv.settled && state.send.done;
        drop(state);
        if settled {
            self.streams.remove(&id);
        }
    }

    /// Forgets the streams of `sent` quiche forgot: it does once the peer acknowledged all
    /// their bytes and their FIN and, on a bidirectional stream, once the peer's direction
    /// ended too (or the peer stopped the stream).
    fn check_sent(&mut self, conn: &mut QuicheConnection) {
        self.sent.retain(|&id| conn.stream_capacity(id).is_ok());
        self.sent_check_at = SENT_CHECK_MIN.max(2 * self.sent.len());
    }

    /// Every handle is gone, so nothing will be read or written any more: stops what the
    /// peer sends on every stream (those nobody accepted too), resets their directions
    /// nobody finished (a dropped writer's stream is reset already), and lingers so that
    /// what was finished is still delivered.
    fn start_linger(&mut self, ready: &mut Vec<u64>) {
        let mut state = self.shared.lock();
        for queue in &mut state.incoming {
            queue.clear();
        }
        drop(state);
        for (&id, stream) in &self.streams {
            let mut s = stream.lock();
            let r = &mut s.recv;
            if !r.settled && r.stopped.is_none() {
                r.stopped = Some(DROPPED_CODE);
                r.buf = BytesMut::new();
            }
            let w = &mut s.send;
            if !w.done && !w.fin && w.reset.is_none() {
                w.reset = Some(DROPPED_CODE);
                w.buf = BytesMut::new();
            }
            ready.push(id);
        }
        self.linger = Some(Linger {
            deadline: Instant::now() + self.idle_timeout,
            left: (usize::MAX, usize::MAX),
        });
    }

    /// While lingering, whether the connection may close now: everything finished was
    /// delivered (see [`check_sent`](Self::check_sent)), or nothing moved for an idle
    /// timeout (a peer that acknowledges nothing lets the connection time out sooner; one
    /// that keeps it alive, ignoring our STOP_SENDING, is given up on here).
    fn lingered(&mut self, conn: &mut QuicheConnection) -> bool {
        self.check_sent(conn);
        let mut unsent = 0;
        let mut unfinished = self.shared.lock().new_local.len();
        for stream in self.streams.values() {
            let s = stream.lock();
            if !s.send.done {
                unfinished += 1;
                unsent += s.send.buf.len();
            }
        }
        let left = (self.sent.len() + unfinished, unsent);
        let Some(linger) = &mut self.linger else {
            return false;
        };
        if left == (0, 0) {
            return true;
        }
        let now = Instant::now();
        if left != linger.left {
            linger.left = left;
            linger.deadline = now + self.idle_timeout;
        }
        now >= linger.deadline
    }
}

/// Reads what quiche holds for the stream while its buffer has room; stops the stream if
/// its reader did.
fn read_from(conn: &mut QuicheConnection, id: u64, r: &mut RecvHalf) {
    if r.settled {
        return;
    }
    if let Some(code) = r.stopped {
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
        r.settled = true;
        r.pending = false;
        return;
    }
    if !r.taken {
        return;
    }
    let mut arrived = false;
    loop {
        let room = r.limit.saturating_sub(r.buf.len()).min(READ_CHUNK);
        if room == 0 {
            r.pending = true;
            break;
        }
        r.buf.reserve(room);
        match conn.stream_recv_buf(id, (&mut r.buf).limit(room)) {
            Ok((n, fin)) => {
                arrived |= n > 0;
                if fin {
                    r.fin = true;
                    r.settled = true;
                    r.pending = false;
                    arrived = true;
                    break;
                }
                if n == 0 {
                    r.pending = false;
                    break;
                }
            }
            Err(quiche::Error::Done) => {
                r.pending = false;
                break;
            }
            Err(quiche::Error::StreamReset(code)) => {
                r.fail(Failure::PeerReset(code));
                break;
            }
            Err(e) => {
                r.fail(Failure::Closed(
                    Error::new(Kind::Closed).with_message(format!("the stream failed: {e}")),
                ));
                break;
            }
        }
    }
    if arrived {
        r.wake();
    }
}

/// What a stream waits for before the connection writes to it again.
enum Wait {
    /// Nothing: all it had went to quiche.
    Nothing,
    /// Room in quiche (the stream is listed writable when there is).
    Quiche,
    /// The moment its FIN without data may go (see [`bare_fin`]).
    Fin(Instant),
}

/// Hands quiche what the writer wrote, as far as the stream takes it, and the FIN after
/// it; resets the stream if the writer asked to.
fn write_to(conn: &mut QuicheConnection, id: u64, w: &mut SendHalf) -> Wait {
    if w.done {
        return Wait::Nothing;
    }
    if let Some(code) = w.reset {
        // A stream the peer stopped is reset already (and this lets quiche collect it).
        if !matches!(conn.stream_capacity(id), Err(quiche::Error::StreamStopped(_))) {
            let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code);
        }
        w.done = true;
        w.buf = BytesMut::new();
        return Wait::Nothing;
    }
    if w.buf.is_empty() && !w.fin {
        return Wait::Nothing;
    }
    if w.buf.is_empty()
        && let Err(until) = bare_fin(conn, id, w.handed)
    {
        return Wait::Fin(until);
    }
    let len = w.buf.len();
    let wait = match conn.stream_send(id, &w.buf, w.fin) {
        Ok(n) => {
            w.buf.advance(n);
            if n > 0 {
                w.handed = Some(Instant::now());
            }
            if n == len && w.fin {
                w.done = true;
            }
            if n < len { Wait::Quiche } else { Wait::Nothing }
        }
        Err(quiche::Error::Done) if conn.stream_capacity(id).is_ok() => Wait::Quiche,
        Err(quiche::Error::Done) => {
            // quiche no longer has the stream (it would list it writable never again).
            w.fail(Failure::Closed(
                Error::new(Kind::Closed).with_message("the stream ended before its writer finished"),
            ));
            Wait::Nothing
        }
        Err(quiche::Error::StreamStopped(code)) => {
            w.fail(Failure::PeerStopped(code));
            Wait::Nothing
        }
        Err(e) => {
            w.fail(Failure::Closed(
                Error::new(Kind::Closed).with_message(format!("the stream failed: {e}")),
            ));
            Wait::Nothing
        }
    };
    if w.buf.len() < len || w.done {
        w.wake();
    }
    wait
}

/// Whether a FIN without data may go now; if not, until when it waits. When it may, the
/// stream is made the most urgent, so the FIN goes in the first packet quiche builds.
///
/// quiche (0.30) counts a stream's sending complete once its bytes are acknowledged up to
/// the final size, whether or not a frame with the FIN was acknowledged: a FIN queued
/// without data while the stream's last bytes are in flight is dropped with the stream
/// when their acknowledgement arrives before the FIN has left, or before a lost FIN is
/// sent again (quiche issue #2525), and the peer never sees the end. So a bare FIN waits
/// until the stream's last bytes have had time to be acknowledged: a smoothed RTT plus
/// four deviations plus the peer's `max_ack_delay`, since they went to quiche. (A last
/// byte lost and sent again late can still lose the FIN; only quiche can close that.) A
/// FIN that carries bytes is not affected: a writer that finishes before its last bytes
/// went to quiche never sends a bare FIN.
///
/// After that wait the FIN goes whatever the stream's flow-control credit (a FIN needs
/// none, and a peer may grant less than a packet) and whatever the congestion window
/// (quiche tells its room only mixed with flow control, in `stream_capacity`): the wait is
/// all that keeps it, and its end is a timer, so it always ends.
fn bare_fin(conn: &mut QuicheConnection, id: u64, handed: Option<Instant>) -> Result<(), Instant> {
    /// RFC 9000's default, for a peer whose transport parameters are not known.
    const DEFAULT_ACK_DELAY: Duration = Duration::from_millis(25);
    if let Some(handed) = handed
        && let Some(path) = conn.path_stats().find(|p| p.active)
    {
        let ack_delay = conn
            .peer_transport_params()
            .map_or(DEFAULT_ACK_DELAY, |p| Duration::from_millis(p.max_ack_delay));
        let acked_by = handed + path.rtt + 4 * path.rttvar + ack_delay;
        if acked_by > Instant::now() {
            return Err(acked_by);
        }
    }
    // Whatever stopped the stream, stream_send says it.
    let _ = conn.stream_priority(id, 0, false);
    Ok(())
}

impl Application for StreamsApp {
    fn on_established(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        self.publish_credit(conn);
        Ok(())
    }

    fn process(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), Error> {
        let mut ready = std::mem::take(&mut self.ready);
        self.shared.notify.take_ready(cx, &mut ready);
        if self.linger.is_none() && self.shared.users.load(Ordering::Acquire) == 0 {
            // Nobody holds the connection or any of its streams any more.
            self.start_linger(&mut ready);
        }
        if ready.iter().any(|id| !self.streams.contains_key(id)) {
            self.adopt_local(conn, &mut ready);
        }
        for id in conn.readable() {
            if self.streams.contains_key(&id) || self.open_peer(conn, id) {
                ready.push(id);
            } else {
                // A stream we are done with, or one of ours the peer may not send on: what
                // arrives is of no use to anyone (and reading it lets quiche forget it).
                let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, DROPPED_CODE);
                while conn.stream_discard(id, usize::MAX).is_ok() {}
            }
        }
        if !self.arrived.is_empty() {
            let mut state = self.shared.lock();
            for stream in self.arrived.drain(..) {
                state.incoming[kind_of(stream.id)].push_back(stream);
            }
            drop(state);
            self.shared.accepted.notify_waiters();
        }
        if !self.blocked.is_empty() {
            ready.extend(conn.writable().filter(|id| self.blocked.contains(id)));
        }
        // `stats()` sums over every stream quiche holds: read only when there is something
        // to look through.
        let stops = if self.sent.is_empty() {
            self.stops_seen
        } else {
            conn.stats().stopped_stream_count_remote
        };
        if stops != self.stops_seen {
            // A stream whose FIN went out and which the peer then stopped is forgotten by
            // quiche only when asked (its acknowledgements do not), and holds a stream of
            // the peer's credit until then: asked as soon as a stop arrives.
            self.stops_seen = stops;
            self.check_sent(conn);
        }
        ready.extend(self.fins.iter().copied());
        self.fin_due = None;
        ready.sort_unstable();
        ready.dedup();
        for &id in &ready {
            self.service(conn, id);
        }
        ready.clear();
        self.ready = ready;
        // Streams finished just now may have returned credit.
        self.publish_credit(conn);
        let mut due = self.fin_due;
        if self.linger.is_some() {
            if self.lingered(conn) {
                let _ = conn.close(true, 0, b"");
                return Ok(());
            }
            let deadline = self.linger.as_ref().map(|l| l.deadline);
            due = due.into_iter().chain(deadline).min();
        } else if self.sent.len() >= self.sent_check_at {
            self.check_sent(conn);
        }
        if let Some(due) = due {
            self.timer.as_mut().reset(due.into());
            if self.timer.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Ok(())
    }

    fn on_closed(&mut self, conn: &mut QuicheConnection, error: Option<&Error>) {
        let why = || error.map(Error::duplicate).unwrap_or_else(closed_error);
        let mut state = self.shared.lock();
        state.closed = Some(why());
        // Opened by the user, never created in quiche: nothing of them reached the peer.
        let unopened = std::mem::take(&mut state.new_local);
        drop(state);
        for (&id, stream) in &self.streams {
            let mut s = stream.lock();
            let r = &mut s.recv;
            if !r.settled && r.stopped.is_none() {
                // The peer may close as soon as its last bytes are acknowledged, before a
                // slow reader has read them: take in all that arrived, past the buffer's
                // limit. quiche held these bytes within the connection's flow-control
                // window, and they leave quiche with the connection.
                r.limit = usize::MAX;
                r.taken = true;
                read_from(conn, id, r);
            }
            close_stream(&mut s, why);
        }
        for stream in unopened {
            close_stream(&mut stream.lock(), why);
        }
        self.shared.accepted.notify_waiters();
        self.shared.credit.notify_waiters();
    }
}

/// Fails what the closed connection left unfinished of a stream; what fully arrived stays
/// readable.
fn close_stream(s: &mut StreamState, why: impl Fn() -> Error) {
    if !s.recv.fin {
        s.recv.fail(Failure::Closed(why()));
    }
    s.recv.settled = true;
    if !s.send.done {
        s.send.fail(Failure::Closed(why()));
    }
}

/// A QUIC connection whose streams are async byte streams: accept the peer's with
/// [`accept_bi`](Self::accept_bi) and [`accept_uni`](Self::accept_uni), open your own with
/// [`open_bi`](Self::open_bi) and [`open_uni`](Self::open_uni).
///
/// Get one from [`Incoming::accept_streams`](crate::quic::Incoming::accept_streams) on a
/// server, or `Endpoint::connect_streams` on a client. It is a [`ConnectionHandle`] with
/// streams: the handle's methods ([`close`](ConnectionHandle::close),
/// [`closed`](ConnectionHandle::closed), [`peer_addr`](ConnectionHandle::peer_addr), …) are
/// available on it through `Deref`. For the raw `QuicheConnection`, start the connection
/// with an [`Application`] of your own instead.
///
/// Cheap to clone. Once every clone and every stream of the connection is dropped, the
/// connection closes with application code 0 (a [`ConnectionHandle`] cloned from it does
/// not keep it open): streams nobody accepted are stopped and reset, and so is what a
/// dropped [`SendStream`] left unfinished, but what was finished is delivered first. The
/// connection closes once the peer has acknowledged all of it (and, on a bidirectional
/// stream, ended its own direction, which the STOP_SENDING it gets asks for), or once
/// nothing has moved for the idle timeout.
///
/// Each stream buffers at most what
/// [`TransportConfig::stream_buffers`](crate::quic::TransportConfig::stream_buffers) allows in
/// each direction; streams the peer opened and nobody accepted yet are not read at all, and
/// the peer can open no more of them than
/// [`max_concurrent_bidi_streams`](crate::quic::TransportConfig::max_concurrent_bidi_streams)
/// (and `_uni_streams`) allow.
///
/// ```no_run
/// use tokio::io::AsyncWriteExt;
/// use tower_quiche::quic::{Listener, ServerConfig};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = ServerConfig::builder()
///     .alpn(["echo"])
///     .cert_chain_pem_file("cert.pem")
///     .private_key_pem_file("key.pem")
///     .build()?;
/// let mut listener = Listener::bind("127.0.0.1:4433", config).await?;
/// while let Some(incoming) = listener.accept().await {
///     tokio::spawn(async move {
///         let conn = incoming.accept_streams().await?;
///         while let Some((mut send, mut recv)) = conn.accept_bi().await {
///             tokio::spawn(async move {
///                 tokio::io::copy(&mut recv, &mut send).await?;
///                 send.shutdown().await
///             });
///         }
///         Ok::<_, tower_quiche::Error>(())
///     });
/// }
/// # Ok(()) }
/// ```
pub struct StreamConnection {
    handle: ConnectionHandle,
    shared: Arc<ConnShared>,
}

impl fmt::Debug for StreamConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConnection")
            .field("trace_id", &self.handle.trace_id())
            .field("peer_addr", &self.handle.peer_addr())
            .finish_non_exhaustive()
    }
}

impl Clone for StreamConnection {
    fn clone(&self) -> Self {
        self.shared.add_user();
        StreamConnection {
            handle: self.handle.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for StreamConnection {
    fn drop(&mut self) {
        self.shared.drop_user();
    }
}

impl Deref for StreamConnection {
    type Target = ConnectionHandle;

    fn deref(&self) -> &ConnectionHandle {
        &self.handle
    }
}

impl StreamConnection {
    /// The connection's handle (also reachable through `Deref`).
    pub fn handle(&self) -> &ConnectionHandle {
        &self.handle
    }

    /// Waits for the next bidirectional stream the peer opens; `None` once the connection
    /// has closed (streams that arrived before the close are still handed out first).
    pub async fn accept_bi(&self) -> Option<(SendStream, RecvStream)> {
        let stream = self.shared.accept(BIDI).await?;
        Some((SendStream::new(Arc::clone(&stream)), RecvStream::new(stream)))
    }

    /// Waits for the next unidirectional stream the peer opens; `None` once the connection
    /// has closed (streams that arrived before the close are still handed out first).
    pub async fn accept_uni(&self) -> Option<RecvStream> {
        self.shared.accept(UNI).await.map(RecvStream::new)
    }

    /// Opens a bidirectional stream, waiting until the peer allows one more (its
    /// MAX_STREAMS credit); fails once the connection has closed.
    ///
    /// The peer learns of the stream when the first bytes (or the FIN) are sent.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), Error> {
        let stream = self.shared.open(BIDI).await?;
        Ok((SendStream::new(Arc::clone(&stream)), RecvStream::new(stream)))
    }

    /// Opens a unidirectional stream, waiting until the peer allows one more; fails once
    /// the connection has closed.
    pub async fn open_uni(&self) -> Result<SendStream, Error> {
        self.shared.open(UNI).await.map(SendStream::new)
    }
}

/// The receiving side of a QUIC stream: an [`AsyncRead`] that ends (reads 0 bytes) at the
/// peer's FIN.
///
/// Reads fail with an [`io::Error`] carrying a [`crate::Error`] (see
/// [`Error::from_io`](crate::Error::from_io)): of kind `ConnectionReset` when the peer reset
/// the stream (the error [`is_reset`](crate::Error::is_reset) and its
/// [`code`](crate::Error::code) is the peer's `Code::Stream`), `ConnectionAborted` when the
/// connection closed before the stream's end arrived, `NotConnected` after
/// [`stop`](Self::stop). Bytes that arrived before the close are read first.
///
/// Dropping it before its end stops the stream: the peer gets STOP_SENDING with code 0.
pub struct RecvStream {
    stream: Arc<Stream>,
}

impl fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvStream")
            .field("id", &self.stream.id)
            .finish_non_exhaustive()
    }
}

impl RecvStream {
    fn new(stream: Arc<Stream>) -> Self {
        stream.conn.add_user();
        RecvStream { stream }
    }

    /// The stream's ID.
    pub fn id(&self) -> u64 {
        self.stream.id
    }

    /// Bytes that arrived and wait to be read; never more than the receive buffer
    /// ([`TransportConfig::stream_buffers`](crate::quic::TransportConfig::stream_buffers)),
    /// except what is taken in as the connection closes.
    pub fn buffered(&self) -> usize {
        self.stream.lock().recv.buf.len()
    }

    /// Stops receiving: the peer gets STOP_SENDING with `code` (unless the stream had
    /// ended already), and what arrived but was not read is discarded. Later reads fail.
    /// A code above 2^62 − 1, the largest QUIC carries, is sent as that.
    ///
    /// Stopping (or dropping) a stream before its end has come costs, with quiche 0.30,
    /// what the peer's reset that answers it should free: quiche discards that reset with
    /// the rest, so it keeps the stream for the connection's life (cloudflare/quiche#1968).
    /// On a stream the peer opened, that is one of the peer's stream credits for good
    /// (always on a unidirectional stream; on a bidirectional one, when our side had ended
    /// and been acknowledged before the reset came); on one we opened, a few hundred
    /// bytes. A protocol that stops streams often should rather read them to their end,
    /// dropping what it does not want, or give the peer credit to spare
    /// ([`max_concurrent_uni_streams`](crate::quic::TransportConfig::max_concurrent_uni_streams)).
    pub fn stop(&mut self, code: u64) {
        self.stream.update(|s| {
            let r = &mut s.recv;
            if r.stopped.is_some() {
                return ((), false);
            }
            r.stopped = Some(super::app::wire_code(code));
            r.buf = BytesMut::new();
            r.failure.get_or_insert(Failure::Local("the stream was stopped"));
            ((), !r.settled)
        });
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.stream.update(|s| {
            let r = &mut s.recv;
            if r.stopped.is_none() && !r.buf.is_empty() {
                let n = r.buf.len().min(out.remaining());
                out.put_slice(&r.buf[..n]);
                r.buf.advance(n);
                // The connection stopped reading at the limit: once half the buffer is
                // free, it may fill it again (not one hop per small read).
                let wake = r.pending && r.buf.len() <= r.limit / 2;
                return (Poll::Ready(Ok(())), wake);
            }
            if let Some(failure) = &r.failure {
                return (Poll::Ready(Err(failure.to_io())), false);
            }
            if r.fin {
                return (Poll::Ready(Ok(())), false);
            }
            r.waker = Some(cx.waker().clone());
            (Poll::Pending, false)
        })
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        self.stream.update(|s| {
            let r = &mut s.recv;
            r.waker = None;
            if r.stopped.is_some() || r.fin {
                r.buf = BytesMut::new();
                return ((), false);
            }
            r.stopped = Some(DROPPED_CODE);
            r.buf = BytesMut::new();
            ((), !r.settled)
        });
        self.stream.conn.drop_user();
    }
}

/// The sending side of a QUIC stream: an [`AsyncWrite`] whose
/// [`poll_shutdown`](AsyncWrite::poll_shutdown) finishes the stream (FIN).
///
/// `poll_write` takes bytes while the send buffer
/// ([`TransportConfig::stream_buffers`](crate::quic::TransportConfig::stream_buffers)) has room
/// and waits while it is full; `poll_flush` waits until the connection has handed all of it
/// to QUIC, and `poll_shutdown` until the FIN has gone the same way (not until the peer
/// acknowledged it).
///
/// Writes fail with an [`io::Error`] carrying a [`crate::Error`] (see
/// [`Error::from_io`](crate::Error::from_io)): of kind `BrokenPipe` when the peer stopped
/// the stream (STOP_SENDING; the error [`is_reset`](crate::Error::is_reset) and its
/// [`code`](crate::Error::code) is the peer's `Code::Stream`), `ConnectionAborted` when the
/// connection closed, `NotConnected` after [`finish`](Self::finish) or
/// [`reset`](Self::reset).
///
/// Dropping it before it finished resets the stream with code 0 (RESET_STREAM); bytes
/// written before a finish are still delivered after the drop, also when every other
/// handle of the connection is gone (see [`StreamConnection`]).
///
/// A finish that comes after all written bytes went to QUIC sends a FIN without data; that
/// FIN waits until those bytes have had time to be acknowledged (about a round trip), to
/// work around quiche dropping such a FIN (quiche issue #2525).
pub struct SendStream {
    stream: Arc<Stream>,
}

impl fmt::Debug for SendStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendStream")
            .field("id", &self.stream.id)
            .finish_non_exhaustive()
    }
}

impl SendStream {
    fn new(stream: Arc<Stream>) -> Self {
        stream.conn.add_user();
        SendStream { stream }
    }

    /// The stream's ID.
    pub fn id(&self) -> u64 {
        self.stream.id
    }

    /// Bytes written and not yet handed to QUIC; never more than the send buffer.
    pub fn buffered(&self) -> usize {
        self.stream.lock().send.buf.len()
    }

    /// Finishes the stream: a FIN follows what was written. Unlike
    /// [`shutdown`](tokio::io::AsyncWriteExt::shutdown) it does not wait.
    pub fn finish(&mut self) {
        self.stream.update(|s| {
            let w = &mut s.send;
            if w.fin || w.done || w.reset.is_some() {
                return ((), false);
            }
            w.fin = true;
            // With bytes still buffered the stream is queued or waits for quiche already.
            ((), w.buf.is_empty())
        });
    }

    /// Resets the stream with `code` (RESET_STREAM; above 2^62 − 1, the largest QUIC
    /// carries, it is sent as that): what was written and not yet sent is discarded, and
    /// later writes fail. No effect once the stream has ended (its FIN
    /// handed to QUIC, or the peer stopped it).
    pub fn reset(&mut self, code: u64) {
        self.stream.update(|s| {
            let w = &mut s.send;
            if w.done || w.reset.is_some() {
                return ((), false);
            }
            w.reset = Some(super::app::wire_code(code));
            w.buf = BytesMut::new();
            w.failure.get_or_insert(Failure::Local("the stream was reset"));
            ((), true)
        });
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.stream.update(|s| {
            let w = &mut s.send;
            if let Some(failure) = &w.failure {
                return (Poll::Ready(Err(failure.to_io())), false);
            }
            if w.fin || w.done {
                return (
                    Poll::Ready(Err(Failure::Local("the stream was finished").to_io())),
                    false,
                );
            }
            let room = w.limit.saturating_sub(w.buf.len());
            // An empty write completes at once, as on a socket, full buffer or not.
            if room == 0 && !data.is_empty() {
                w.waker = Some(cx.waker().clone());
                return (Poll::Pending, false);
            }
            let n = room.min(data.len());
            // Bytes in a non-empty buffer are queued already, or wait for quiche to list
            // the stream writable: only the first ones need the connection's attention.
            let wake = w.buf.is_empty() && n > 0;
            w.buf.extend_from_slice(&data[..n]);
            (Poll::Ready(Ok(n)), wake)
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.stream.lock();
        let w = &mut s.send;
        if let Some(failure) = &w.failure {
            return Poll::Ready(Err(failure.to_io()));
        }
        if w.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        w.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        let mut s = self.stream.lock();
        let w = &mut s.send;
        if let Some(failure) = &w.failure {
            return Poll::Ready(Err(failure.to_io()));
        }
        if w.done {
            return Poll::Ready(Ok(()));
        }
        w.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        self.stream.update(|s| {
            let w = &mut s.send;
            w.waker = None;
            if w.fin || w.done || w.reset.is_some() {
                return ((), false);
            }
            w.reset = Some(DROPPED_CODE);
            w.buf = BytesMut::new();
            ((), true)
        });
        self.stream.conn.drop_user();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Pipe, client_config, server_config};

    /// A stream whose FIN went out and which the peer stopped before acknowledging it is
    /// forgotten by quiche only when asked: the connection asks at once, so the peer gets
    /// its stream credit back (before, only once 64 such streams had piled up: with a
    /// limit of 4 streams, the peer ran out of them for good).
    #[tokio::test]
    async fn a_stream_stopped_after_its_fin_went_out_gives_its_credit_back() {
        let limit = |t: crate::quic::TransportConfig| t.max_concurrent_bidi_streams(4);
        let server = server_config("streams", limit);
        let mut pipe = Pipe::handshaken(&server, &client_config("streams", limit));
        let (mut app, _parts) = new(&server.config, true);
        app.on_established(&mut pipe.server).unwrap();
        // The client's request and end; the server reads them and answers with its own end.
        pipe.client.stream_send(0, b"hi", true).unwrap();
        pipe.flush();
        let mut buf = [0; 16];
        assert_eq!(pipe.server.stream_recv(0, &mut buf).unwrap(), (2, true));
        pipe.server.stream_send(0, b"yo", true).unwrap();
        app.sent.insert(0);
        // The client stops the stream before the answer reaches it (the answer's packets
        // wait), and the stop reaches the server.
        pipe.client.stream_shutdown(0, quiche::Shutdown::Read, 7).unwrap();
        let mut out = [0; 1500];
        let mut held = Vec::new();
        while let Ok((len, info)) = pipe.server.send(&mut out) {
            held.push((out[..len].to_vec(), info));
        }
        while let Ok((len, info)) = pipe.client.send(&mut out) {
            let _ = pipe.server.recv(
                &mut out[..len],
                quiche::RecvInfo {
                    from: info.from,
                    to: info.to,
                },
            );
        }
        for (mut packet, info) in held {
            let _ = pipe.client.recv(
                &mut packet,
                quiche::RecvInfo {
                    from: info.from,
                    to: info.to,
                },
            );
        }
        pipe.flush();
        // quiche holds it, listed writable (what a stop does), though both ways are done.
        assert!(pipe.server.writable().any(|id| id == 0), "the stopped stream is held");
        let waker = std::task::Waker::noop();
        app.process(&mut Context::from_waker(waker), &mut pipe.server).unwrap();
        assert!(
            !pipe.server.writable().any(|id| id == 0),
            "the stopped stream is forgotten"
        );
        assert!(app.sent.is_empty());
    }

    #[test]
    fn seen_indexes_are_told_apart_from_new_ones_in_any_order() {
        let mut seen = Seen::default();
        for index in [3, 1, 7, 2, 0, 5, 6, 4, 9] {
            assert!(seen.insert(index), "{index} is new");
        }
        for index in [0, 1, 2, 3, 4, 5, 6, 7, 9] {
            assert!(!seen.insert(index), "{index} was seen");
        }
        assert_eq!(seen.next, 8);
        assert_eq!(seen.ahead.iter().collect::<Vec<_>>(), [(&9, &10)]);
        assert!(seen.insert(8));
        assert_eq!((seen.next, seen.ahead.len()), (10, 0));
    }

    #[test]
    fn a_peer_that_skips_a_stream_costs_one_run_however_many_it_opens() {
        let mut seen = Seen::default();
        // Stream 0 never used; 1, 2, 3, … each opened (and finished) in turn.
        for index in 1..100_000 {
            assert!(seen.insert(index));
            assert_eq!(seen.ahead.len(), 1, "after {index}");
        }
        assert!(!seen.insert(50_000));
        assert!(seen.insert(0));
        assert_eq!((seen.next, seen.ahead.len()), (100_000, 0));
        // Runs that meet from both sides of a gap become one.
        for index in [100_010, 100_012, 100_011] {
            assert!(seen.insert(index));
        }
        assert_eq!(seen.ahead.iter().collect::<Vec<_>>(), [(&100_010, &100_013)]);
    }
}
