//! The one per-stream state machine of an HTTP/3 request stream, shared by the connection's
//! task and the handles of one request: the reader of the incoming body
//! ([`RecvBody`](super::body::RecvBody)) and the producer of the outgoing message (the
//! server's handler, or the client's request-body pump).
//!
//! The state is private; every change goes through a method here, so each rule exists once
//! for the server and the client alike:
//!
//! - **Incoming body.** The connection task reads from quiche only while the buffer has
//!   room ([`StreamShared::read_from`]), so a slow reader leaves the bytes in quiche and QUIC
//!   flow control pushes back on the peer. Each read is copied into a chunk of its own exact
//!   size, and every chunk is charged [`CHUNK_COST`] bytes against the buffer's limit:
//!   memory follows bytes, not DATA frames, however small the peer makes them. Bytes read
//!   after the reader went away are discarded but still counted, so a body checked against
//!   its `content-length` is judged by what the peer sent, not by what the handler read.
//! - **Outgoing message.** The producer queues heads, body chunks and trailers in a bounded
//!   outbox; the connection task writes them as the stream's capacity allows
//!   ([`StreamShared::write_to`]).
//! - **Ending.** A stream ends normally (FIN both ways) or through [`StreamShared::cancel`],
//!   the single path for a peer reset, STOP_SENDING, a malformed message, a timeout and a
//!   closed connection: the reader gets an error (unless its body was complete), the
//!   producer stops, nothing queued is written.
//! - **Wake-ups.** Either side wakes the other: the producer and the reader through
//!   [`ConnNotify`] (the stream is queued once until the connection task looks at it), the
//!   connection task through the wakers kept here.

use crate::quic::QuicheConnection;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use quiche::h3::{self, Header, NameValue};

use super::codes;
use super::fields::{self, Malformed, OutFields};
use super::priority::Priority;
use super::queue::InlineQueue;
use crate::error::{Error, Kind};
pub(crate) use crate::quic::ConnNotify;
use crate::quic::Queued;

/// What each buffered chunk costs beyond its bytes (the `Bytes` handle, its shared header
/// and the allocator's rounding), charged against the receive and send buffers' limits so
/// that one-byte DATA frames (from a peer, or from a body) cannot make a buffer cost many
/// times its limit.
pub(crate) const CHUNK_COST: usize = 64;

/// The largest single read from quiche into one chunk. Reads go through a per-thread
/// scratch buffer of this size, so an idle stream holds no read buffer at all.
const READ_CHUNK: usize = 64 * 1024;

/// A read at least this large becomes the chunk itself, scratch allocation and all, instead
/// of being copied out: a bulk upload's body is copied once (quiche to scratch), not
/// twice. The allocation is the chunk's alone, and at most 4/3 of its length: the receive
/// buffer's limit counts the chunk's bytes, so a peer that makes every read just over
/// this size pins at most a third more than the limit says.
const HAND_OVER: usize = READ_CHUNK / 4 * 3;

/// The smallest body chunk quiche is handed as it is rather than copied. quiche keeps what
/// it is handed until the peer acknowledges it, and a `Bytes` keeps its whole allocation
/// alive: a small slice of a large buffer (a range of a cached file, say) would hold all of
/// it for a round trip, where copying it costs little. A chunk this large is most of what
/// it pins, in any body that is not cut from something far larger.
const ZERO_COPY_MIN: usize = 16 * 1024;

thread_local! {
    /// Where body bytes land before they become a chunk (see [`HAND_OVER`]) or are
    /// dropped. Reading never yields, so one buffer per worker thread serves every stream.
    static SCRATCH: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Reads what quiche holds of a body, up to `room` bytes, into the (empty) scratch buffer.
fn read_into(
    scratch: &mut BytesMut,
    h3: &mut h3::Connection,
    conn: &mut QuicheConnection,
    id: u64,
    room: usize,
) -> h3::Result<usize> {
    scratch.clear();
    scratch.reserve(READ_CHUNK);
    h3.recv_body_buf(conn, id, scratch.limit(room))
}

/// The scratch buffer's `n` bytes as a chunk: the buffer itself when the read was large,
/// else a copy of exactly its size (the buffer stays for the next read).
fn take_chunk(scratch: &mut BytesMut) -> Bytes {
    if scratch.len() >= HAND_OVER {
        std::mem::take(scratch).freeze()
    } else {
        Bytes::copy_from_slice(scratch)
    }
}

/// Why the incoming body failed, as its reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecvError {
    /// The peer reset its side of the stream with this code.
    Reset(u64),
    /// The body did not match its content-length, or its trailers were malformed.
    Malformed(&'static str),
    /// Nothing arrived for too long while the peer owed body bytes.
    #[cfg(feature = "server")]
    TimedOut,
    /// The connection (or this side of the stream) closed before the body was complete.
    Closed,
}

impl RecvError {
    fn to_error(self) -> Error {
        match self {
            RecvError::Reset(code) => Error::new(Kind::Reset)
                .with_stream_code(code)
                .with_message("the peer reset the stream"),
            RecvError::Malformed(why) => Error::new(Kind::Protocol)
                .with_stream_code(codes::H3_MESSAGE_ERROR)
                .with_message(why),
            #[cfg(feature = "server")]
            RecvError::TimedOut => Error::new(Kind::Timeout).with_message("the body stalled: no data arrived in time"),
            RecvError::Closed => Error::new(Kind::Closed).with_message("the stream closed before the body ended"),
        }
    }
}

/// Why a stream is cancelled: what its reader sees and the code its producer stops with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cancel {
    /// The peer reset the stream (RESET_STREAM).
    PeerReset(u64),
    /// The peer stopped reading what we send (STOP_SENDING).
    PeerStopped(u64),
    /// The message broke RFC 9114; the stream is reset with H3_MESSAGE_ERROR.
    Malformed(&'static str),
    /// No progress within the stall timeout; the stream is reset with this code.
    #[cfg(feature = "server")]
    Stalled(u64),
    /// An HTTP datagram came for a request whose method defines none (RFC 9297 §2): the
    /// request is aborted with H3_DATAGRAM_ERROR.
    StrayDatagram,
    /// The connection is gone.
    ConnectionClosed,
}

impl Cancel {
    fn recv_error(self) -> RecvError {
        match self {
            Cancel::PeerReset(code) => RecvError::Reset(code),
            Cancel::Malformed(why) => RecvError::Malformed(why),
            #[cfg(feature = "server")]
            Cancel::Stalled(_) => RecvError::TimedOut,
            Cancel::StrayDatagram => RecvError::Malformed("an HTTP datagram on a request that takes none"),
            Cancel::PeerStopped(_) | Cancel::ConnectionClosed => RecvError::Closed,
        }
    }

    /// The code we end the stream's open directions with when we give it up for this
    /// reason, or `None` when there is nothing to tell the peer.
    fn wire_code(self) -> Option<u64> {
        match self {
            // The peer ended its side; ours is cancelled.
            Cancel::PeerReset(_) => Some(codes::H3_REQUEST_CANCELLED),
            // quiche reset our side when the STOP_SENDING arrived; the peer's side goes on.
            Cancel::PeerStopped(_) => None,
            Cancel::Malformed(_) => Some(codes::H3_MESSAGE_ERROR),
            #[cfg(feature = "server")]
            Cancel::Stalled(code) => Some(code),
            Cancel::StrayDatagram => Some(codes::H3_DATAGRAM_ERROR),
            // quiche failed the stream while the connection lives on: the peer must learn
            // that nobody serves it (on a closed connection nothing is sent).
            Cancel::ConnectionClosed => Some(codes::H3_REQUEST_CANCELLED),
        }
    }

    fn send_code(self) -> u64 {
        match self {
            Cancel::PeerReset(code) | Cancel::PeerStopped(code) => code,
            #[cfg(feature = "server")]
            Cancel::Stalled(code) => code,
            Cancel::StrayDatagram => codes::H3_DATAGRAM_ERROR,
            Cancel::Malformed(_) => codes::H3_MESSAGE_ERROR,
            Cancel::ConnectionClosed => codes::H3_REQUEST_CANCELLED,
        }
    }
}

/// What went wrong while reading a stream's body from quiche; the owner decides the
/// consequence (a stream error, a connection error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFailure {
    /// The body broke its content-length: a malformed message (RFC 9114 §4.1.2).
    Malformed(&'static str),
    /// A frame out of sequence (quiche's h3 layer finds these, e.g. DATA or HEADERS after
    /// the trailers): a connection error of type H3_FRAME_UNEXPECTED (RFC 9114 §4.1).
    FrameUnexpected,
    /// The peer reset the stream.
    Reset(u64),
    /// quiche failed the stream otherwise (the connection is going away).
    Closed,
}

/// Limits of one stream's buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Bytes (plus [`CHUNK_COST`] per chunk) of incoming body held for the reader.
    pub(crate) recv_buffer: usize,
    /// Bytes of outgoing body queued (plus [`CHUNK_COST`] per chunk) before the producer
    /// waits.
    pub(crate) send_buffer: usize,
}

struct RecvHalf {
    chunks: VecDeque<Bytes>,
    /// What `chunks` costs against `limit`: bytes plus [`CHUNK_COST`] per chunk.
    held: usize,
    limit: usize,
    /// All of the body has been read from quiche.
    fin: bool,
    trailers: Option<HeaderMap>,
    error: Option<RecvError>,
    waker: Option<Waker>,
    /// The reader is gone: whatever arrives is discarded (and counted).
    reader_dropped: bool,
    /// [`RecvBody`](super::body::RecvBody) handles reading the body beside the first (made
    /// with the stream, uncounted): a tunnel taking a CONNECT's stream past the request's
    /// body (which middleware may have wrapped) while that body is not dropped yet. A
    /// reader gone while others remain leaves the body to them; the last drops it.
    other_readers: usize,
    /// quiche holds body bytes we have not read (we stopped at the buffer's limit).
    pending: bool,
    /// quiche holds more of the stream behind a frame it has not parsed yet (see
    /// [`StreamShared::read_from`]): read again after the next poll.
    behind_frame: bool,
    /// Body bytes received from the peer, read or discarded.
    received: u64,
    content_length: Option<u64>,
    /// A trailer section came: no body may follow it (RFC 9114 §4.1). quiche refuses DATA
    /// after trailers only when DATA came before them.
    trailers_seen: bool,
    /// The request asked for a 100 (Continue) before its body (`expect: 100-continue`,
    /// RFC 9110 §10.1.1): sent when the reader first waits for body bytes that have not
    /// come, as hyper does over HTTP/1.1, unless the final head is on its way by then.
    continue_owed: bool,
}

impl RecvHalf {
    fn open(&self) -> bool {
        !self.fin && self.error.is_none()
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn fail(&mut self, error: RecvError) {
        if self.error.is_none() {
            self.error = Some(error);
        }
        self.wake();
    }
}

/// How many 1xx heads may wait to be sent on one stream: [`Informational::send`] does not
/// wait, so without a bound a handler sending them in a loop to a client that grants no
/// credit would queue without end.
///
/// [`Informational::send`]: crate::server::Informational::send
#[cfg(feature = "server")]
const MAX_WAITING_INTERIM_HEADS: usize = 16;

/// What the producer queued and the connection task has not written yet.
struct SendHalf {
    /// 1xx heads, then the final head; each with "fin" (no body follows).
    heads: InlineQueue<(OutFields, bool)>,
    /// Whether a HEADERS frame went out already (later ones are "additional headers").
    head_sent: bool,
    /// The final (non-1xx) head is queued.
    final_queued: bool,
    /// The final head is queued and its status is 2xx (to a CONNECT: the tunnel is open).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    final_success: bool,
    data: InlineQueue<Bytes>,
    /// What `data` costs against `limit`: bytes plus [`CHUNK_COST`] per chunk, so that a
    /// producer of tiny frames (a chatty tunnel, an event stream) is held to its buffer in
    /// memory, not only in bytes.
    data_len: usize,
    limit: usize,
    trailers: Option<Vec<Header>>,
    /// The producer has nothing more: finish the stream after what is queued.
    fin: bool,
    /// The stream is fully written (FIN sent) or abandoned.
    done: bool,
    /// The producer asks to reset the stream with this code.
    reset: Option<u64>,
    /// The stream was cancelled: the producer stops with this code.
    cancelled: Option<u64>,
    /// It was the peer's STOP_SENDING that ended our sending: its message may still come
    /// whole (RFC 9114 §4.1), so later looks say Stopped, not Aborted.
    stopped_by_peer: bool,
    waker: Option<Waker>,
}

impl SendHalf {
    /// Queues a 1xx head, unless the final head is on its way already (or the stream is
    /// done); says whether it did.
    fn queue_interim(&mut self, fields: Vec<Header>) -> bool {
        if self.final_queued || self.done {
            return false;
        }
        self.heads.push_back((OutFields::List(fields), false));
        true
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Whether bytes wait for the peer's flow-control credit: a head, body bytes, trailers,
    /// or the FIN alone (after a body whose end came after its last bytes went out, the FIN
    /// goes in an empty DATA frame, whose 2 bytes need credit too).
    #[cfg(feature = "server")]
    fn owes_peer(&self) -> bool {
        !self.done
            && self.final_queued
            && (!self.heads.is_empty() || self.data_len > 0 || self.trailers.is_some() || self.fin)
    }

    fn abandon(&mut self, code: u64) {
        self.done = true;
        self.cancelled.get_or_insert(code);
        self.heads.clear();
        self.data.clear();
        self.data_len = 0;
        self.trailers = None;
        self.wake();
    }
}

struct StreamState {
    recv: RecvHalf,
    send: SendHalf,
    /// Counts every movement of the stream: bytes between quiche and the buffers either
    /// way, a chunk read, a part queued. The owner's stall timer compares it between checks,
    /// so no movement pays for a clock read.
    progress: u64,
    /// Already in the connection's ready list.
    queued: bool,
}

impl Queued for StreamState {
    fn queued(&mut self) -> &mut bool {
        &mut self.queued
    }
}

/// What writing a stream's outbox achieved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// More to write later (blocked, or the producer has not finished).
    Pending,
    /// Everything is written, FIN included.
    Complete,
    /// The stream was reset at the producer's request, or cancelled.
    Aborted,
    /// The peer stopped reading what we send (STOP_SENDING); what it sends still counts.
    Stopped,
}

/// One stream's shared state.
pub(crate) struct StreamShared {
    /// The stream ID; a client learns it only when the connection opens the stream.
    id: AtomicU64,
    /// Its priority (RFC 9218; [`Priority::to_bits`]): the connection writes streams in
    /// order of urgency (0 = most urgent), and a response head carries it to quiche.
    priority: AtomicU8,
    notify: Arc<ConnNotify>,
    state: Mutex<StreamState>,
}

impl StreamShared {
    fn with_state(
        id: u64,
        notify: Arc<ConnNotify>,
        limits: Limits,
        recv_fin: bool,
        content_length: Option<u64>,
    ) -> Self {
        StreamShared {
            id: AtomicU64::new(id),
            priority: AtomicU8::new(Priority::default().to_bits()),
            notify,
            state: Mutex::new(StreamState {
                recv: RecvHalf {
                    chunks: VecDeque::new(),
                    held: 0,
                    // Room for at least one byte beside a chunk's cost: a smaller limit would
                    // never read at all.
                    limit: limits.recv_buffer.max(CHUNK_COST + 1),
                    fin: recv_fin,
                    trailers: None,
                    error: None,
                    waker: None,
                    reader_dropped: false,
                    other_readers: 0,
                    pending: false,
                    behind_frame: false,
                    received: 0,
                    content_length,
                    trailers_seen: false,
                    continue_owed: false,
                },
                send: SendHalf {
                    heads: InlineQueue::default(),
                    head_sent: false,
                    final_queued: false,
                    final_success: false,
                    data: InlineQueue::default(),
                    data_len: 0,
                    limit: limits.send_buffer.max(1),
                    trailers: None,
                    fin: false,
                    done: false,
                    reset: None,
                    cancelled: None,
                    stopped_by_peer: false,
                    waker: None,
                },
                progress: 0,
                queued: false,
            }),
        }
    }

    /// A request the server received: its head came with the stream; `recv_fin` when no
    /// body follows.
    #[cfg(feature = "server")]
    pub(crate) fn new_incoming(
        id: u64,
        notify: Arc<ConnNotify>,
        limits: Limits,
        content_length: Option<u64>,
        recv_fin: bool,
    ) -> Arc<Self> {
        Arc::new(Self::with_state(id, notify, limits, recv_fin, content_length))
    }

    /// A request the client sends: the connection writes its head itself, so the outbox
    /// holds only the body and trailers. Its ID is set when the stream opens.
    #[cfg(feature = "client")]
    pub(crate) fn new_outgoing(notify: Arc<ConnNotify>, limits: Limits, body_follows: bool) -> Arc<Self> {
        let shared = Self::with_state(u64::MAX, notify, limits, false, None);
        {
            let s = &mut shared.lock().send;
            s.final_queued = true;
            s.head_sent = true;
            s.fin = !body_follows;
            // Without a body the head carried FIN: nothing is left to write.
            s.done = !body_follows;
        }
        Arc::new(shared)
    }

    pub(crate) fn id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }

    /// Sets the stream's priority, in quiche's send order and in the connection's order of
    /// writes.
    #[cfg(feature = "server")]
    pub(crate) fn set_priority(&self, conn: &mut QuicheConnection, priority: Priority) {
        self.priority.store(priority.to_bits(), Ordering::Relaxed);
        priority.apply(conn, self.id());
    }

    pub(crate) fn urgency(&self) -> u8 {
        self.priority().urgency
    }

    fn priority(&self) -> Priority {
        Priority::from_bits(self.priority.load(Ordering::Relaxed))
    }

    #[cfg(feature = "client")]
    pub(crate) fn set_id(&self, id: u64) {
        self.id.store(id, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state; wakes the connection task (once until it looks) if `f` says
    /// the stream needs it.
    fn update<R>(&self, f: impl FnOnce(&mut StreamState) -> (R, bool)) -> R {
        self.notify.update(&self.state, || self.id(), f)
    }

    // ---- the reader's side (RecvBody) ----

    /// The next frame of the incoming body: data, then trailers, then the end.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.update(|s| {
            let r = &mut s.recv;
            if let Some(chunk) = r.chunks.pop_front() {
                r.held -= chunk.len() + CHUNK_COST;
                // Room again: a stall is counted from now, not from the last bytes in.
                s.progress += 1;
                // The connection stopped reading at the buffer's limit: there is room now.
                return (Poll::Ready(Some(Ok(Frame::data(chunk)))), r.pending);
            }
            if let Some(error) = r.error {
                return (Poll::Ready(Some(Err(error.to_error()))), false);
            }
            if r.fin {
                return match r.trailers.take() {
                    Some(trailers) => (Poll::Ready(Some(Ok(Frame::trailers(trailers)))), false),
                    None => (Poll::Ready(None), false),
                };
            }
            r.waker = Some(cx.waker().clone());
            let continue_now = std::mem::take(&mut r.continue_owed) && r.received == 0 && !r.trailers_seen;
            let queued = continue_now && s.send.queue_interim(vec![Header::new(b":status", b"100")]);
            (Poll::Pending, queued)
        })
    }

    /// The request asked for a 100 (Continue) before sending its body: owe one to the
    /// reader's first wait (see `RecvHalf::continue_owed`).
    #[cfg(feature = "server")]
    pub(crate) fn owe_continue(&self) {
        self.lock().recv.continue_owed = true;
    }

    pub(crate) fn recv_is_end(&self) -> bool {
        let s = self.lock();
        s.recv.fin && s.recv.chunks.is_empty() && s.recv.trailers.is_none() && s.recv.error.is_none()
    }

    pub(crate) fn recv_size_hint(&self) -> SizeHint {
        let s = self.lock();
        let buffered = (s.recv.held - CHUNK_COST * s.recv.chunks.len()) as u64;
        match s.recv.content_length {
            Some(len) => SizeHint::with_exact(len.saturating_sub(s.recv.received) + buffered),
            None => SizeHint::default(),
        }
    }

    /// Another [`RecvBody`](super::body::RecvBody) reads the body, if it is still there
    /// (not once its last reader went and its bytes have been discarded since).
    #[cfg(feature = "server")]
    pub(crate) fn add_other_reader(&self) -> bool {
        let mut s = self.lock();
        if s.recv.reader_dropped {
            return false;
        }
        s.recv.other_readers += 1;
        true
    }

    /// A reader is gone; once the last is, the connection discards the rest of the body
    /// (still counting it against its content-length).
    pub(crate) fn drop_reader(&self) {
        let other = self.update(|s| {
            let r = &mut s.recv;
            if r.other_readers > 0 {
                r.other_readers -= 1;
                // The waiting reader may have been the one gone: the other polls again.
                return (r.waker.take(), false);
            }
            r.reader_dropped = true;
            r.chunks.clear();
            r.held = 0;
            r.waker = None;
            r.trailers = None;
            (None, r.open())
        });
        if let Some(waker) = other {
            waker.wake();
        }
    }

    // ---- the producer's side ----

    /// Ready when the outbox has room for another chunk; an error once the stream was
    /// cancelled or reset.
    pub(crate) fn poll_send_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut state = self.lock();
        let s = &mut state.send;
        if let Some(code) = s.cancelled {
            return Poll::Ready(Err(Error::new(Kind::Reset)
                .with_stream_code(code)
                .with_message("the stream was stopped or reset")));
        }
        if s.data_len < s.limit {
            return Poll::Ready(Ok(()));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once the stream was cancelled (stopped or reset); otherwise the producer's task
    /// is woken when it is. For a producer that waits on something else (its body's next
    /// frame), so that it stops at once rather than at its next frame.
    pub(crate) fn poll_cancelled(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.lock();
        let s = &mut state.send;
        if s.cancelled.is_some() {
            return Poll::Ready(());
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Queues a 1xx head; refused once the final head is queued, and while
    /// [`MAX_WAITING_INTERIM_HEADS`] wait to be sent (the peer's flow control holds them).
    #[cfg(feature = "server")]
    pub(crate) fn push_informational(&self, fields: Vec<Header>) -> Result<(), Error> {
        self.update(|s| {
            if s.send.heads.len() >= MAX_WAITING_INTERIM_HEADS && !s.send.final_queued {
                let error = Error::new(Kind::Closed).with_message(format!(
                    "{MAX_WAITING_INTERIM_HEADS} informational responses already wait to be sent"
                ));
                return (Err(error), false);
            }
            let hundred = fields.first().is_some_and(|status| status.value() == b"100");
            if !s.send.queue_interim(fields) {
                let error = Error::new(Kind::Closed).with_message("the final response head is already on its way");
                return (Err(error), false);
            }
            if hundred {
                // The handler sent its own 100: it is not owed again.
                s.recv.continue_owed = false;
            }
            (Ok(()), true)
        })
    }

    /// Queues the final head; `fin` when no body follows.
    #[cfg(feature = "server")]
    pub(crate) fn push_head(&self, fields: OutFields, fin: bool) {
        self.update(|s| {
            if s.send.done {
                return ((), false);
            }
            s.progress += 1;
            s.send.final_queued = true;
            s.send.final_success = fields.status_class() == Some(b'2');
            s.send.heads.push_back((fields, fin));
            s.send.fin |= fin;
            ((), true)
        })
    }

    /// Whether the final head is queued with a 2xx status: to a CONNECT request, the
    /// tunnel is open (RFC 9114 §4.4).
    #[cfg(feature = "server")]
    pub(crate) fn answered_with_success(&self) -> bool {
        self.lock().send.final_success
    }

    pub(crate) fn push_data(&self, data: Bytes) {
        self.update(|s| {
            if s.send.done {
                return ((), false);
            }
            // The stream waited on the producer until now: a stall is counted from here.
            s.progress += 1;
            s.send.data_len += data.len() + CHUNK_COST;
            s.send.data.push_back(data);
            ((), true)
        })
    }

    pub(crate) fn push_trailers(&self, fields: Vec<Header>) {
        self.update(|s| {
            if s.send.done {
                return ((), false);
            }
            s.progress += 1;
            // No field left to send (quiche cannot encode an empty section): the body just
            // ends.
            s.send.trailers = Some(fields).filter(|fields| !fields.is_empty());
            s.send.fin = true;
            ((), true)
        })
    }

    pub(crate) fn finish(&self) {
        self.update(|s| {
            s.send.fin = true;
            ((), !s.send.done)
        })
    }

    /// Asks the connection to abandon the stream with `code` (the producer failed, or the
    /// requester gave up): what is unsent is reset, and a body still arriving is stopped.
    pub(crate) fn reset(&self, code: u64) {
        self.update(|s| {
            if s.send.cancelled.is_some() || (s.send.done && !s.recv.open()) {
                return ((), false);
            }
            s.send.reset.get_or_insert(code);
            ((), true)
        })
    }

    /// Whether the producer asked for a reset the connection has not acted on yet.
    #[cfg(feature = "client")]
    pub(crate) fn reset_requested(&self) -> bool {
        self.lock().send.reset.is_some()
    }

    /// Whether the outgoing side is fully written or abandoned.
    #[cfg(feature = "client")]
    pub(crate) fn send_done(&self) -> bool {
        self.lock().send.done
    }

    // ---- the connection task's side ----

    /// The connection task looks at the stream now: later changes queue it again.
    pub(crate) fn take_queued(&self) {
        self.lock().queued = false;
    }

    /// Reads the body from quiche into the buffer while it has room, or discards it when the
    /// reader is gone; counts every byte against the content-length. Returns true when it
    /// stopped at a frame quiche has not parsed yet, with more of the stream in quiche: after
    /// an empty DATA frame (which RFC 9114 allows) quiche's recv_body returns Done at the
    /// frame's end and raises no new Data event for the frames behind it, so the owner must
    /// read again after its next poll (`RoundLists::read_again`), or the body stalls.
    pub(crate) fn read_from(
        &self,
        h3: &mut h3::Connection,
        conn: &mut QuicheConnection,
        id: u64,
    ) -> Result<bool, ReadFailure> {
        let mut state = self.lock();
        let s = &mut *state;
        let r = &mut s.recv;
        r.pending = true;
        r.behind_frame = false;
        if r.error.is_some() {
            // Failed already: quiche's bytes are of no use to anyone.
            discard(h3, conn, id);
            r.pending = false;
            return Ok(false);
        }
        let mut woke = false;
        let result = SCRATCH.with_borrow_mut(|scratch| {
            loop {
                let room = if r.reader_dropped {
                    READ_CHUNK
                } else {
                    r.limit.saturating_sub(r.held + CHUNK_COST).min(READ_CHUNK)
                };
                if room == 0 {
                    return Ok(false);
                }
                match read_into(scratch, h3, conn, id, room) {
                    Ok(n) => {
                        if r.trailers_seen && n > 0 {
                            return Err(ReadFailure::FrameUnexpected);
                        }
                        r.received += n as u64;
                        if r.content_length.is_some_and(|len| r.received > len) {
                            return Err(ReadFailure::Malformed("the body is longer than its content-length"));
                        }
                        if !r.reader_dropped {
                            r.chunks.push_back(take_chunk(scratch));
                            r.held += n + CHUNK_COST;
                            woke = true;
                        }
                        s.progress += 1;
                    }
                    Err(h3::Error::Done) => {
                        // Still readable: bytes wait behind a frame quiche has not parsed.
                        // (Not `pending`: if they never come, the stall timer must see a
                        // stream that waits on its peer.)
                        r.pending = false;
                        r.behind_frame = conn.stream_readable(id);
                        return Ok(r.behind_frame);
                    }
                    Err(h3::Error::TransportError(quiche::Error::StreamReset(code))) => {
                        return Err(ReadFailure::Reset(code));
                    }
                    Err(h3::Error::FrameUnexpected) => return Err(ReadFailure::FrameUnexpected),
                    Err(_) => return Err(ReadFailure::Closed),
                }
            }
        });
        if woke {
            r.wake();
        }
        result
    }

    /// Lets [`read_from`](Self::read_from) take all quiche holds, however much the reader has
    /// not read: for a connection that has closed, whose bytes go with it otherwise.
    #[cfg(feature = "client")]
    pub(crate) fn lift_recv_limit(&self) {
        self.lock().recv.limit = usize::MAX;
    }

    /// A HEADERS frame after the head: the message's trailers, held to `max_size` (RFC 9114
    /// §4.2.2 counting). Bad trailers are a malformed message; a second trailer section,
    /// or DATA after one (refused by `read_from`), is a frame out of sequence (quiche
    /// refuses them only after DATA, and only on a peer's streams).
    pub(crate) fn on_trailers(&self, list: &[Header], max_size: usize) -> Result<(), ReadFailure> {
        if std::mem::replace(&mut self.lock().recv.trailers_seen, true) {
            // A second trailer section: quiche lets it through when no DATA came before
            // the first, and on streams we opened (a client's) it tracks no frame order.
            return Err(ReadFailure::FrameUnexpected);
        }
        let trailers = if fields::section_size(list) > max_size {
            Err(Malformed("the trailer section is larger than the field-section limit"))
        } else {
            fields::trailers_from_fields(list)
        };
        let trailers = trailers.map_err(|why| ReadFailure::Malformed(why.0))?;
        let mut state = self.lock();
        let r = &mut state.recv;
        if !r.reader_dropped {
            r.trailers = Some(trailers);
        }
        Ok(())
    }

    /// The peer finished its side: the body is complete, and must match its
    /// content-length.
    pub(crate) fn on_finished(&self) -> Result<(), Malformed> {
        let mut state = self.lock();
        let r = &mut state.recv;
        if !r.open() {
            return Ok(());
        }
        r.pending = false;
        if r.content_length.is_some_and(|len| len != r.received) {
            // The reader sees an error, not an end: a clean end here would pass a truncated
            // body for the whole one.
            let why = Malformed("the body is shorter than its content-length");
            r.fail(RecvError::Malformed(why.0));
            return Err(why);
        }
        r.fin = true;
        r.wake();
        Ok(())
    }

    /// The length the incoming body must have (a client learns it from the response head).
    #[cfg(feature = "client")]
    pub(crate) fn expect_content_length(&self, length: Option<u64>) {
        self.lock().recv.content_length = length;
    }

    /// Writes what the outbox holds, as far as the stream's capacity allows; notices
    /// STOP_SENDING from the peer. Sets `sent` when anything went to quiche (a head, body
    /// bytes, trailers, the FIN): the server's stall timer learns from it whether the
    /// connection is sending at all.
    pub(crate) fn write_to(
        &self,
        h3: &mut h3::Connection,
        conn: &mut QuicheConnection,
        id: u64,
        sent: &mut bool,
    ) -> WriteOutcome {
        let mut state = self.lock();
        let s = &mut *state;
        if let Some(code) = s.send.reset.take() {
            return reset_both(conn, id, s, code);
        }
        if s.send.done {
            return if s.send.stopped_by_peer {
                WriteOutcome::Stopped
            } else if s.send.cancelled.is_some() {
                WriteOutcome::Aborted
            } else {
                WriteOutcome::Complete
            };
        }
        // A response's own `priority` field overrides the request's (RFC 9218 §5).
        // Once `final_queued`, a queued head at the back is the final one, not yet sent (a
        // 1xx ahead of it says nothing of the response's priority).
        if s.send.final_queued
            && let Some((fields, _)) = s.send.heads.back()
        {
            let priority = fields.lend(|fields| {
                let priorities = fields.iter().filter(|f| f.0 == b"priority").map(|f| f.1);
                priorities.clone().next().is_some().then(|| Priority::parse(priorities))
            });
            if let Some(priority) = priority {
                self.priority.store(priority.to_bits(), Ordering::Relaxed);
                priority.apply(conn, id);
            }
        }
        let before = s.send.data_len;
        let heads_before = s.send.heads.len();
        let outcome = write_queued(h3, conn, id, self.priority(), &mut s.send);
        if s.send.data_len < before || s.send.heads.len() < heads_before || matches!(outcome, Ok(true)) {
            s.progress += 1;
            *sent = true;
        }
        if s.send.data_len < before && s.send.data_len < s.send.limit {
            s.send.wake();
        }
        match outcome {
            Ok(true) => {
                s.send.done = true;
                WriteOutcome::Complete
            }
            Ok(false) => {
                let code = match conn.stream_capacity(id) {
                    // STOP_SENDING arrived while we had nothing to write: quiche reset our
                    // side already; the producer stops.
                    Err(quiche::Error::StreamStopped(code)) => code,
                    // quiche has forgotten the stream: the peer stopped it, quiche reset our
                    // side and the reset was acknowledged, all before we looked (quiche does
                    // not always list a stopped stream as writable). Nothing we queue can
                    // go out; waiting would hold the connection's close for ever.
                    Err(quiche::Error::InvalidStreamState(_)) => codes::H3_REQUEST_CANCELLED,
                    _ => return WriteOutcome::Pending,
                };
                drop(state);
                self.cancel(Cancel::PeerStopped(code));
                WriteOutcome::Stopped
            }
            Err(WriteError::Stopped(code)) => {
                drop(state);
                self.cancel(Cancel::PeerStopped(code));
                WriteOutcome::Stopped
            }
            Err(WriteError::HeadNeverFits(len)) => {
                tracing::warn!(
                    stream_id = id,
                    head_bytes = len,
                    "a head larger than the congestion window cannot be sent (quiche writes a \
                     HEADERS frame whole); resetting the stream: keep heads under about 12 KB"
                );
                reset_both(conn, id, s, codes::H3_INTERNAL_ERROR)
            }
        }
    }

    /// Ends the stream for both local parties: the reader sees `why` (unless its body was
    /// complete, or `why` is the peer's STOP_SENDING), the producer stops, and nothing more
    /// is written. Idempotent: the first reason wins.
    pub(crate) fn cancel(&self, why: Cancel) {
        cancel_state(&mut self.lock(), why);
    }

    /// Gives the stream up for `why` on a live connection: [`cancel`](Self::cancel), and the
    /// peer is told of each direction still open, with RESET_STREAM for a send side not
    /// finished and STOP_SENDING for a receive side still arriving, so that it does not wait
    /// on a stream nobody serves any more (RFC 9114 §4.1.1).
    pub(crate) fn abort(&self, conn: &mut QuicheConnection, id: u64, why: Cancel) {
        let mut state = self.lock();
        if let Some(code) = why.wire_code() {
            if !state.send.done {
                let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code);
            }
            if state.recv.open() {
                let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
            }
        }
        cancel_state(&mut state, why);
    }

    /// Stops receiving (STOP_SENDING with `code`) if the body is still arriving; the reader,
    /// if any, sees the body end with an error. Returns whether it stopped anything.
    pub(crate) fn stop_receiving(&self, conn: &mut QuicheConnection, id: u64, code: u64) -> bool {
        let mut state = self.lock();
        if !state.recv.open() {
            return false;
        }
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
        state.recv.fail(RecvError::Closed);
        state.recv.pending = false;
        true
    }

    /// Whether quiche's HTTP/3 layer saw the stream end both ways, and so forgets it by
    /// itself (see [`H3Leftovers`]): our message (a response, or a client's request) went
    /// out whole, its FIN written through it, and the peer's side ended as read through
    /// it (its FIN, or its reset), not discarded after we stopped reading.
    pub(crate) fn h3_saw_both_ends(&self) -> bool {
        let s = self.lock();
        let sent = s.send.done && s.send.cancelled.is_none() && s.send.reset.is_none();
        sent && (s.recv.fin || matches!(s.recv.error, Some(RecvError::Reset(_))))
    }

    /// Whether the connection needs nothing more from quiche for the incoming body: it is
    /// complete, failed, or nobody will read it.
    pub(crate) fn recv_settled(&self) -> bool {
        let s = self.lock();
        !s.recv.open() || s.recv.reader_dropped
    }

    /// Whether quiche holds unread body bytes, or the reader is gone while the body still
    /// arrives: the connection has reading to do.
    pub(crate) fn wants_read(&self) -> bool {
        let s = self.lock();
        s.recv.pending || s.recv.behind_frame || (s.recv.reader_dropped && s.recv.open())
    }

    /// Whether the reader went away before the body was complete.
    #[cfg(feature = "client")]
    pub(crate) fn reader_gone_early(&self) -> bool {
        let s = self.lock();
        s.recv.reader_dropped && s.recv.open()
    }

    /// Whether all that is left to send is the FIN (see [`SendHalf::owes_peer`]).
    #[cfg(all(test, feature = "server"))]
    pub(crate) fn waits_with_only_its_fin(&self) -> bool {
        let s = &self.lock().send;
        !s.done && s.final_queued && s.fin && s.heads.is_empty() && s.data_len == 0 && s.trailers.is_none()
    }

    /// What the stall timer needs to know of the stream (see [`StallLook`]).
    #[cfg(feature = "server")]
    pub(crate) fn stall_look(&self) -> StallLook {
        let s = self.lock();
        StallLook {
            progress: s.progress,
            owed_body: s.recv.open() && !s.recv.pending && (s.recv.reader_dropped || s.recv.held < s.recv.limit),
            owed_credit: s.send.owes_peer(),
        }
    }
}

/// A stream as the stall timer sees it. A stream waiting on the peer whose progress count
/// stays put is stalled. It does not wait on the peer while it waits on us (the handler is
/// working, the reader is slow).
#[cfg(feature = "server")]
pub(crate) struct StallLook {
    /// Counts every movement of the stream, either way.
    pub(crate) progress: u64,
    /// Body bytes are owed to a reader with room.
    pub(crate) owed_body: bool,
    /// Queued bytes (or the FIN) wait for flow-control credit, or for their turn: the
    /// connection's congestion window and more urgent streams come first, so this is the
    /// peer's doing only while no stream of the connection is sending either.
    pub(crate) owed_credit: bool,
}

fn cancel_state(state: &mut StreamState, why: Cancel) {
    // STOP_SENDING ends only our sending: the peer may still send its whole message (a
    // server may stop a request body it does not need and answer in full, RFC 9114 §4.1).
    if state.recv.open() && !matches!(why, Cancel::PeerStopped(_)) {
        state.recv.fail(why.recv_error());
    }
    if !state.send.done {
        state.send.abandon(why.send_code());
        state.send.stopped_by_peer = matches!(why, Cancel::PeerStopped(_));
    }
}

/// Why a stream's outbox cannot be written.
enum WriteError {
    /// The peer sent STOP_SENDING with this code.
    Stopped(u64),
    /// A field section (HEADERS frame of this many bytes) that cannot be sent.
    HeadNeverFits(usize),
}

/// Resets both directions of a stream with `code` and abandons what was queued.
fn reset_both(conn: &mut QuicheConnection, id: u64, s: &mut StreamState, code: u64) -> WriteOutcome {
    if !s.send.done {
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code);
    }
    if s.recv.open() {
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
        s.recv.fail(RecvError::Closed);
        s.recv.pending = false;
    }
    s.send.abandon(code);
    WriteOutcome::Aborted
}

/// The size of the HEADERS frame for `fields` when it can never be sent on stream `id`, as
/// quiche's HTTP/3 layer sends it: whole, into what the stream may buffer now, which the
/// congestion window bounds (about 12 KB on a new connection, quiche issue #1573).
///
/// Only judged when nothing is in flight (the stream may buffer a whole window): the window
/// does not grow then (quiche's congestion control does not grow an application-limited
/// window), so a larger frame would wait for ever. With bytes in flight the window may be
/// small for a moment (after a loss) and grow again: `None`, look again later. Encoding is
/// exact (quiche's own encoder) and happens only on this blocked path.
pub(crate) fn head_never_fits<T: NameValue>(conn: &mut QuicheConnection, id: u64, fields: &[T]) -> Option<usize> {
    let cwnd = conn.path_stats().find(|p| p.active)?.cwnd;
    if conn.stream_capacity(id).ok()? < cwnd {
        return None;
    }
    let mut block = vec![0; fields::section_size(fields)];
    let len = quiche::h3::qpack::Encoder::new().encode(fields, &mut block).ok()?;
    // Frame type and length varints: at most 1 + 8 bytes.
    let frame = len + 9;
    (frame > cwnd).then_some(frame)
}

fn write_queued(
    h3: &mut h3::Connection,
    conn: &mut QuicheConnection,
    id: u64,
    priority: Priority,
    out: &mut SendHalf,
) -> Result<bool, WriteError> {
    let stopped = |e: &h3::Error| match e {
        h3::Error::TransportError(quiche::Error::StreamStopped(code)) => Some(WriteError::Stopped(*code)),
        _ => None,
    };
    while let Some((fields, fin)) = out.heads.front() {
        let result = fields.lend(|fields| {
            if out.head_sent {
                h3.send_additional_headers(conn, id, fields, false, *fin)
            } else {
                h3.send_response_with_priority(conn, id, fields, &priority.to_quiche(), *fin)
            }
        });
        match result {
            Ok(()) => {
                out.head_sent = true;
                let (_, fin) = out.heads.pop_front().expect("front exists");
                if fin {
                    return Ok(true);
                }
            }
            Err(h3::Error::StreamBlocked) => match fields.lend(|fields| head_never_fits(conn, id, fields)) {
                // An interim head is a hint: the response goes on without it.
                Some(len) if fields.is_interim() => {
                    tracing::warn!(
                        stream_id = id,
                        head_bytes = len,
                        "dropping a 1xx head larger than the congestion window"
                    );
                    out.heads.pop_front();
                }
                Some(len) => return Err(WriteError::HeadNeverFits(len)),
                None => return Ok(false),
            },
            Err(e) => return stopped(&e).map_or(Ok(false), Err),
        }
    }
    if !out.final_queued {
        return Ok(false);
    }
    while !out.data.is_empty() {
        let last = out.data.len() == 1 && out.fin && out.trailers.is_none();
        let chunk = out.data.front_mut().expect("not empty");
        let len = chunk.len();
        // A large chunk is queued as it is (zero-copy; on a partial write quiche leaves the
        // part not taken in `chunk`), a small one copied (see `ZERO_COPY_MIN`).
        let zero_copy = len >= ZERO_COPY_MIN;
        let written = if zero_copy {
            h3.send_body_zc(conn, id, chunk, last)
        } else {
            h3.send_body(conn, id, chunk, last)
        };
        match written {
            Ok(n) => {
                out.data_len -= n;
                if n < len {
                    if !zero_copy {
                        chunk.advance(n);
                    }
                    return Ok(false);
                }
                out.data.pop_front();
                out.data_len -= CHUNK_COST;
                if last {
                    return Ok(true);
                }
            }
            Err(e) => return stopped(&e).map_or(Ok(false), Err),
        }
    }
    if let Some(fields) = &out.trailers {
        // A server sends them as a plain HEADERS frame with the FIN, the same bytes, not
        // as a "trailer section": quiche's HTTP/3 layer would then refuse the stream to
        // every later send call, and so could not be made to forget it (`H3Leftovers`)
        // after we stopped reading its body. (A client may send trailers only this way.)
        let trailer_section = !conn.is_server();
        return match h3.send_additional_headers(conn, id, fields, trailer_section, true) {
            Ok(()) => Ok(true),
            Err(h3::Error::StreamBlocked) => match head_never_fits(conn, id, fields) {
                Some(len) => Err(WriteError::HeadNeverFits(len)),
                None => Ok(false),
            },
            Err(e) => stopped(&e).map_or(Ok(false), Err),
        };
    }
    if out.fin {
        return match h3.send_body(conn, id, &[], true) {
            Ok(_) => Ok(true),
            Err(e) => stopped(&e).map_or(Ok(false), Err),
        };
    }
    Ok(false)
}

/// Reads and drops whatever body data quiche holds for a stream nobody tracks (refused, or
/// already answered).
pub(crate) fn discard(h3: &mut h3::Connection, conn: &mut QuicheConnection, id: u64) {
    SCRATCH.with_borrow_mut(
        |scratch| {
            while matches!(read_into(scratch, h3, conn, id, READ_CHUNK), Ok(n) if n > 0) {}
        },
    );
}

/// Request streams whose state quiche's HTTP/3 layer would keep for the connection's life,
/// until it is made to forget them once the transport has forgotten them.
///
/// That layer (quiche 0.30) forgets a request stream's state when it has seen the stream
/// end both ways: our FIN written through it once the peer's end had come, or the peer's
/// end read through it once our FIN was written. A stream that ends otherwise stays in
/// its table for the connection's life (cloudflare/quiche#2524), about 270 bytes per
/// request, without bound on a connection that lives long:
/// - our side reset rather than finished (a request the peer cancelled, one refused, a
///   client's request dropped while its body was going);
/// - the peer's end never read through it because we stopped reading first
///   (STOP_SENDING): quiche then discards what follows, the peer's reset or FIN included.
///
/// Its send calls forget a stream the transport no longer has (they fail, finding no
/// capacity, and drop it), and with no transport stream to write to they send nothing:
/// [`forget`](Self::forget) makes one such call. The one ending no such call reaches is a
/// stream whose trailers went out as a "trailer section" (its send calls refuse it before
/// they look at the transport): a server sends its trailers otherwise (`write_queued`); a
/// client's request sent with trailers whose response it stops reading stays.
///
/// A stream the transport still holds (our reset not yet acknowledged, the peer's end yet
/// to come) is kept here and looked at again when the list has grown past twice what
/// was kept at the last look (at least [`LEFTOVERS_PRUNE_MIN`]), and when the connection
/// has been idle a while ([`prune`](Self::prune): a server's when it releases its tables,
/// once per idle spell, so one still held then waits for the next; a client's at its
/// keep-alive PINGs): amortised a few lookups per such stream.
#[derive(Debug)]
pub(crate) struct H3Leftovers {
    ids: Vec<u64>,
    /// The list is looked at again when it grows past this.
    prune_at: usize,
}

/// [`H3Leftovers`] is not looked at again below this length.
const LEFTOVERS_PRUNE_MIN: usize = 64;

impl Default for H3Leftovers {
    fn default() -> Self {
        H3Leftovers {
            ids: Vec::new(),
            prune_at: LEFTOVERS_PRUNE_MIN,
        }
    }
}

impl H3Leftovers {
    /// Sees that quiche's HTTP/3 layer forgets stream `id` (see the type's docs): now if
    /// the transport has forgotten it, else later.
    pub(crate) fn forget_once_gone(&mut self, h3: &mut h3::Connection, conn: &mut QuicheConnection, id: u64) {
        if !stream_alive(conn, id) {
            Self::forget(h3, conn, id);
            return;
        }
        self.ids.push(id);
        if self.ids.len() > self.prune_at {
            self.prune(h3, conn);
        }
    }

    /// Forgets, in quiche's HTTP/3 layer too, the streams the transport has let go since.
    pub(crate) fn prune(&mut self, h3: &mut h3::Connection, conn: &mut QuicheConnection) {
        self.ids.retain(|&id| {
            let alive = stream_alive(conn, id);
            if !alive {
                Self::forget(h3, conn, id);
            }
            alive
        });
        self.prune_at = (self.ids.len() * 2).max(LEFTOVERS_PRUNE_MIN);
        if self.ids.is_empty() {
            self.ids = Vec::new();
        }
    }

    /// Makes quiche's HTTP/3 layer forget a stream the transport has forgotten: whether its
    /// head was sent (`send_body`) or not (`send_response`, with a head that encodes: an
    /// empty one fails to before the capacity check). A layer that never had the stream,
    /// or has forgotten it, answers either with `FrameUnexpected` at once.
    fn forget(h3: &mut h3::Connection, conn: &mut QuicheConnection, id: u64) {
        if let Err(h3::Error::FrameUnexpected) = h3.send_body(conn, id, &[], true) {
            let head = [h3::Header::new(b":status", b"500")];
            let _ = h3.send_response(conn, id, &head, true);
        }
    }
}

/// Whether quiche still holds a stream: data not yet sent or acknowledged, or a side not
/// finished. quiche forgets a stream once both directions are complete, and closing the
/// connection before then would discard what it still had to deliver.
pub(crate) fn stream_alive(conn: &mut QuicheConnection, id: u64) -> bool {
    !matches!(conn.stream_capacity(id), Err(quiche::Error::InvalidStreamState(_)))
}

/// The stream lists a connection's rounds reuse, kept to save an allocation per turn.
#[derive(Debug, Default)]
pub(crate) struct RoundLists {
    /// The streams to service in this round.
    pub(crate) ready: Vec<u64>,
    /// Streams whose body stopped at a frame quiche had not parsed yet (see
    /// [`StreamShared::read_from`]): read again once the next round's poll has parsed it.
    pub(crate) read_again: Vec<u64>,
    /// Rounds spent, over the connection's life, in calls that ran out of rounds with
    /// streams still to serve (see [`may_wake_for_more_rounds`]).
    extra_rounds: u64,
}

/// Rounds per turn.
const ROUNDS: u64 = 8;

/// Rounds a connection may spend in calls that ran out of rounds, and still ask for a turn
/// of their own: a free allowance, then one round per [`BYTES_PER_EXTRA_ROUND`] the peer
/// has sent.
const FREE_EXTRA_ROUNDS: u64 = 1024;

/// What the peer pays, in bytes received, for each round beyond the free allowance.
///
/// A round parses one frame behind an empty DATA frame (quiche parses the next frame only
/// on its next poll), and an empty DATA frame is 2 bytes: a run of them is read to its end
/// by turns the rounds ask for, where nothing else would wake the connection. A flood of
/// them, or of one-byte frames between empty ones, would otherwise cost a round every few
/// bytes for as long as it lasts (HTTP/2's "empty frames flood", CVE-2019-9518): past what
/// the peer paid for, the rest waits for its next datagram, as it did before the rounds
/// asked for turns.
const BYTES_PER_EXTRA_ROUND: u64 = 4;

/// Whether the rounds, out of rounds with streams still to serve, may ask for another turn
/// after `extra_rounds` such rounds on a connection that has received `received_bytes`.
fn may_wake_for_more_rounds(extra_rounds: u64, received_bytes: u64) -> bool {
    extra_rounds <= FREE_EXTRA_ROUNDS.saturating_add(received_bytes / BYTES_PER_EXTRA_ROUND)
}

/// The per-turn work of a connection's HTTP/3 side, shared by the server and the client:
/// take in events, run the tasks that live in the connection (request handlers, body
/// pumps), and move data for the streams they touched.
pub(crate) trait StreamOwner {
    fn poll_events(&mut self, conn: &mut QuicheConnection) -> Result<(), Error>;
    /// Polls the futures that run inside the connection's task.
    fn poll_tasks(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection);
    fn notify(&self) -> &ConnNotify;
    /// The stream lists the rounds reuse.
    fn round_lists(&mut self) -> &mut RoundLists;
    fn is_tracked(&self, id: u64) -> bool;
    /// A tracked stream's urgency (RFC 9218): lower is written first.
    fn urgency(&self, id: u64) -> u8;
    /// Moves data between quiche and the stream's shared state, both ways.
    fn service_stream(&mut self, conn: &mut QuicheConnection, id: u64);

    /// Rounds, bounded, each serving what the previous one made ready; the first also serves
    /// the streams that were blocked and have room again, or that the peer stopped. Within
    /// a round streams are served most urgent first (RFC 9218): what is written first takes
    /// the room the congestion and flow-control windows freed, so the order of writes is
    /// the order of sending. Events are polled every round because reading a stream's last
    /// bytes queues its `Finished` event in quiche, and no packet may come to trigger
    /// another round. (Room to send comes only with packets, before this runs: the first
    /// round's look at the writable streams is the only one needed.)
    fn run_rounds(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), Error> {
        for round in 0..ROUNDS {
            self.poll_events(conn)?;
            self.poll_tasks(cx, conn);
            let lists = self.round_lists();
            let mut ready = std::mem::take(&mut lists.ready);
            // The frames behind them are parsed now (`poll_events`): several empty DATA
            // frames in a row take a round each, at most this turn's rounds, then the next
            // turn's (a partial frame waits for its bytes).
            ready.append(&mut lists.read_again);
            self.notify().take_ready(cx, &mut ready);
            if round == 0 {
                ready.extend(conn.writable().filter(|&id| self.is_tracked(id)));
            }
            let done = ready.is_empty();
            if ready.len() > 1 {
                ready.sort_unstable_by_key(|&id| (self.urgency(id), id));
                ready.dedup();
            }
            for &id in &ready {
                self.service_stream(conn, id);
            }
            ready.clear();
            self.round_lists().ready = ready;
            if done {
                return Ok(());
            }
        }
        // Out of rounds with streams still to serve (a run of empty DATA frames, say): the
        // next turn serves them, and nothing but this wake would bring it, as far as the
        // peer has paid for such turns. Not once the connection is closing: quiche's
        // HTTP/3 layer parses nothing more then, and the same streams would be ready again
        // on every turn until the close has gone out.
        let lists = self.round_lists();
        lists.extra_rounds = lists.extra_rounds.saturating_add(ROUNDS);
        if conn.local_error().is_none() && may_wake_for_more_rounds(lists.extra_rounds, conn.stats().recv_bytes) {
            cx.waker().wake_by_ref();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's body counts its readers: the first gone leaves the body to the other (a
    /// tunnel taking a CONNECT's stream past the request's wrapped body), the last gone
    /// drops it, and a reader that comes after finds it dropped.
    #[cfg(feature = "server")]
    #[test]
    fn the_body_is_dropped_with_its_last_reader() {
        let limits = Limits {
            recv_buffer: 1024,
            send_buffer: 1024,
        };
        // The first reader is the body's own; a tunnel's is another.
        let shared = StreamShared::new_incoming(0, Arc::default(), limits, None, false);
        assert!(shared.add_other_reader());
        shared.drop_reader();
        assert!(!shared.lock().recv.reader_dropped, "one reader is left");
        shared.drop_reader();
        assert!(shared.lock().recv.reader_dropped);
        assert!(!shared.add_other_reader(), "too late: its bytes were discarded");
    }

    /// Turns the rounds ask for are free up to the allowance, then paid for by the bytes
    /// the peer sent: 4,000 bytes buy 1,000 rounds.
    #[test]
    fn rounds_beyond_the_allowance_are_paid_for_by_the_bytes_received() {
        assert!(may_wake_for_more_rounds(FREE_EXTRA_ROUNDS, 0));
        assert!(!may_wake_for_more_rounds(FREE_EXTRA_ROUNDS + ROUNDS, 0));
        assert!(may_wake_for_more_rounds(FREE_EXTRA_ROUNDS + 1000, 4000));
        assert!(!may_wake_for_more_rounds(FREE_EXTRA_ROUNDS + 1000 + ROUNDS, 4000));
        assert!(!may_wake_for_more_rounds(u64::MAX, u64::MAX), "no overflow");
    }
}
