//! Per-stream state shared between a connection's task and the handles of one request
//! (its [`RecvBody`](crate::body::RecvBody) and the task producing the other direction).
//!
//! The connection task is the only one that touches quiche. It reads a stream's incoming
//! body into a bounded buffer here, only while the buffer has room, so a slow reader leaves
//! the bytes in quiche and QUIC flow control pushes back on the peer. The producer side
//! queues one bounded outbox of heads, body chunks and trailers, which the connection task
//! writes as the stream's capacity allows. Either side wakes the other through [`ConnNotify`]
//! and the wakers kept here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use std::future::poll_fn;
use std::pin::pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body;
use quiche::h3::{self, Header};

use crate::error::{BoxError, Error, Kind};
use crate::headers::trailer_fields;

/// HTTP/3 error codes (RFC 9114 §8.1) the crate sends.
pub(crate) mod code {
    pub(crate) const H3_NO_ERROR: u64 = 0x100;
    pub(crate) const H3_INTERNAL_ERROR: u64 = 0x102;
    pub(crate) const H3_EXCESSIVE_LOAD: u64 = 0x107;
    pub(crate) const H3_REQUEST_REJECTED: u64 = 0x10b;
    pub(crate) const H3_REQUEST_CANCELLED: u64 = 0x10c;
    pub(crate) const H3_MESSAGE_ERROR: u64 = 0x10e;
}

/// The wire code of a connection-level HTTP/3 error from quiche.
pub(crate) fn h3_wire_code(e: &h3::Error) -> u64 {
    use h3::Error as E;
    match e {
        E::Done => code::H3_NO_ERROR,
        E::ExcessiveLoad => code::H3_EXCESSIVE_LOAD,
        E::IdError => 0x108,
        E::StreamCreationError => 0x103,
        E::ClosedCriticalStream => 0x104,
        E::MissingSettings => 0x10a,
        E::FrameUnexpected => 0x105,
        E::FrameError => 0x106,
        E::QpackDecompressionFailed => 0x200,
        E::SettingsError => 0x109,
        E::RequestRejected => code::H3_REQUEST_REJECTED,
        E::RequestCancelled => code::H3_REQUEST_CANCELLED,
        E::RequestIncomplete => 0x10d,
        E::MessageError => code::H3_MESSAGE_ERROR,
        E::ConnectError => 0x10f,
        E::VersionFallback => 0x110,
        _ => code::H3_INTERNAL_ERROR,
    }
}

/// Streams whose state changed, for the connection task to look at, and the waker of that
/// task.
#[derive(Default)]
pub(crate) struct ConnNotify {
    inner: Mutex<NotifyInner>,
}

#[derive(Default)]
struct NotifyInner {
    ready: Vec<u64>,
    waker: Option<Waker>,
}

impl ConnNotify {
    fn lock(&self) -> MutexGuard<'_, NotifyInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, stream_id: u64) {
        let waker = {
            let mut inner = self.lock();
            inner.ready.push(stream_id);
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Moves the ready streams into `out` and registers the connection task's waker.
    pub(crate) fn take_ready(&self, cx: &Context<'_>, out: &mut Vec<u64>) {
        let mut inner = self.lock();
        std::mem::swap(&mut inner.ready, out);
        match &inner.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inner.waker = Some(cx.waker().clone()),
        }
    }
}

/// What the producer queued and the connection task has not written yet.
#[derive(Default)]
pub(crate) struct Outbox {
    /// 1xx heads, then the final head; each with "fin" (no body follows).
    heads: VecDeque<(Vec<Header>, bool)>,
    /// Whether a HEADERS frame went out already (later ones are "additional headers").
    head_sent: bool,
    /// The final (non-1xx) head is queued.
    final_queued: bool,
    data: VecDeque<Bytes>,
    data_len: usize,
    trailers: Option<Vec<Header>>,
    /// The producer has nothing more: finish the stream after what is queued.
    fin: bool,
    /// The stream is fully written (FIN sent) or abandoned.
    pub(crate) done: bool,
    /// The producer asks to reset the stream with this code.
    reset: Option<u64>,
}

/// Why the incoming body failed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RecvError {
    /// The peer reset its side of the stream with this code.
    Reset(u64),
    /// The body did not match its content-length, or its trailers were malformed.
    Malformed(&'static str),
    /// The connection closed before the body was complete.
    Closed,
}

impl RecvError {
    pub(crate) fn to_error(self) -> Error {
        match self {
            RecvError::Reset(code) => Error::new(Kind::Reset)
                .with_code(code)
                .with_message("the peer reset the stream"),
            RecvError::Malformed(why) => Error::new(Kind::Protocol)
                .with_code(code::H3_MESSAGE_ERROR)
                .with_message(why),
            RecvError::Closed => Error::new(Kind::Closed).with_message("the connection closed before the body ended"),
        }
    }
}

pub(crate) struct StreamState {
    pub(crate) recv: BytesMut,
    pub(crate) recv_limit: usize,
    /// All of the body has been read from quiche.
    pub(crate) recv_fin: bool,
    pub(crate) recv_trailers: Option<HeaderMap>,
    pub(crate) recv_error: Option<RecvError>,
    pub(crate) recv_waker: Option<Waker>,
    /// The body handle is gone: whatever arrives is discarded.
    pub(crate) body_dropped: bool,
    /// quiche holds body bytes we have not read (we stopped at the buffer's limit).
    pub(crate) data_pending: bool,
    pub(crate) received: u64,
    pub(crate) content_length: Option<u64>,
    pub(crate) out: Outbox,
    pub(crate) out_limit: usize,
    pub(crate) send_waker: Option<Waker>,
    /// The peer stopped or reset the stream: the producer stops with this code.
    pub(crate) cancelled: Option<u64>,
    /// Already in the connection's ready list.
    pub(crate) queued: bool,
}

/// One stream's shared state.
pub(crate) struct StreamShared {
    /// The stream ID; a client learns it only when the connection opens the stream.
    id: AtomicU64,
    notify: Arc<ConnNotify>,
    state: Mutex<StreamState>,
}

impl StreamShared {
    pub(crate) fn new(
        id: u64,
        notify: Arc<ConnNotify>,
        recv_limit: usize,
        out_limit: usize,
        content_length: Option<u64>,
        recv_fin: bool,
    ) -> Arc<Self> {
        Arc::new(StreamShared {
            id: AtomicU64::new(id),
            notify,
            state: Mutex::new(StreamState {
                recv: BytesMut::new(),
                recv_limit,
                recv_fin,
                recv_trailers: None,
                recv_error: None,
                recv_waker: None,
                body_dropped: false,
                data_pending: false,
                received: 0,
                content_length,
                out: Outbox::default(),
                out_limit,
                send_waker: None,
                cancelled: None,
                queued: false,
            }),
        })
    }

    /// A stream whose head the connection sends itself (a client request): the outbox
    /// holds only the body and trailers. Its ID is set when the stream opens.
    pub(crate) fn new_request(
        notify: Arc<ConnNotify>,
        recv_limit: usize,
        out_limit: usize,
        body_follows: bool,
    ) -> Arc<Self> {
        let shared = Self::new(u64::MAX, notify, recv_limit, out_limit, None, false);
        {
            let mut s = shared.lock();
            s.out.final_queued = true;
            s.out.head_sent = true;
            s.out.fin = !body_follows;
            // Without a body the head carried FIN: nothing is left to write.
            s.out.done = !body_follows;
        }
        shared
    }

    pub(crate) fn id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }

    pub(crate) fn set_id(&self, id: u64) {
        self.id.store(id, Ordering::Release);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the connection task to look at this stream (once until it does).
    pub(crate) fn wake_conn(&self, state: &mut StreamState) -> bool {
        if state.queued {
            return false;
        }
        state.queued = true;
        true
    }

    pub(crate) fn notify_if(&self, queued: bool) {
        if queued {
            self.notify.notify(self.id());
        }
    }

    /// Runs `f` on the state, then wakes the connection task if `f` asked for it.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut StreamState) -> (R, bool)) -> R {
        let (result, wake) = {
            let mut state = self.lock();
            let (result, wake) = f(&mut state);
            (result, wake && self.wake_conn(&mut state))
        };
        self.notify_if(wake);
        result
    }

    // ---- producer side ----

    /// Ready when the outbox has room for another chunk; an error once the peer stopped the
    /// stream.
    pub(crate) fn poll_send_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut state = self.lock();
        if let Some(code) = state.cancelled {
            return Poll::Ready(Err(Error::new(Kind::Reset)
                .with_code(code)
                .with_message("the peer stopped the stream")));
        }
        if state.out.data_len < state.out_limit {
            return Poll::Ready(Ok(()));
        }
        state.send_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Queues a 1xx head; refused once the final head is queued.
    pub(crate) fn push_informational(&self, fields: Vec<Header>) -> Result<(), Error> {
        self.update(|s| {
            if s.out.final_queued || s.out.done {
                return (
                    Err(Error::config("the final response head is already on its way")),
                    false,
                );
            }
            s.out.heads.push_back((fields, false));
            (Ok(()), true)
        })
    }

    pub(crate) fn push_head(&self, fields: Vec<Header>, fin: bool) {
        self.update(|s| {
            s.out.final_queued = true;
            s.out.heads.push_back((fields, fin));
            if fin {
                s.out.fin = true;
            }
            ((), true)
        })
    }

    pub(crate) fn push_data(&self, data: Bytes) {
        self.update(|s| {
            s.out.data_len += data.len();
            s.out.data.push_back(data);
            ((), true)
        })
    }

    pub(crate) fn push_trailers(&self, fields: Vec<Header>) {
        self.update(|s| {
            s.out.trailers = Some(fields);
            s.out.fin = true;
            ((), true)
        })
    }

    pub(crate) fn finish(&self) {
        self.update(|s| {
            s.out.fin = true;
            ((), true)
        })
    }

    pub(crate) fn reset(&self, code: u64) {
        self.update(|s| {
            s.out.reset = Some(code);
            ((), true)
        })
    }
}

/// The per-turn work of a connection's HTTP/3 side, shared by the server and the client:
/// take in events, run the tasks that live in the connection (request handlers, body
/// pumps), and move data for the streams they touched.
pub(crate) trait StreamOwner {
    fn poll_events(&mut self, conn: &mut quiche::Connection) -> Result<(), Error>;
    /// Polls the futures that run inside the connection's task.
    fn poll_tasks(&mut self, cx: &mut Context<'_>, conn: &mut quiche::Connection);
    fn notify(&self) -> &ConnNotify;
    /// A reusable list for the ready stream IDs.
    fn ready_buf(&mut self) -> &mut Vec<u64>;
    fn is_tracked(&self, id: u64) -> bool;
    /// Moves data between quiche and the stream's shared state, both ways.
    fn service_stream(&mut self, conn: &mut quiche::Connection, id: u64);

    /// Bounded: each round serves what the previous one made ready. Events are polled every
    /// round because reading a stream's last bytes queues its `Finished` event in quiche, and
    /// no packet may come to trigger another round. Then the streams that were blocked and
    /// have room again, or that the peer stopped.
    fn run_rounds(&mut self, cx: &mut Context<'_>, conn: &mut quiche::Connection) -> Result<(), Error> {
        for _ in 0..8 {
            self.poll_events(conn)?;
            self.poll_tasks(cx, conn);
            let mut ready = std::mem::take(self.ready_buf());
            self.notify().take_ready(cx, &mut ready);
            let done = ready.is_empty();
            for &id in &ready {
                self.service_stream(conn, id);
            }
            ready.clear();
            *self.ready_buf() = ready;
            if done {
                break;
            }
        }
        for id in conn.writable() {
            if self.is_tracked(id) {
                self.service_stream(conn, id);
            }
        }
        Ok(())
    }
}

/// What writing a stream's outbox achieved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WriteOutcome {
    /// More to write later (blocked, or the producer has not finished).
    Pending,
    /// Everything is written, FIN included.
    Complete,
    /// The stream was reset (by the producer's request) or stopped by the peer.
    Aborted,
}

/// Writes what the outbox holds, as far as the stream's capacity allows. Runs on the
/// connection task.
pub(crate) fn write_out(
    h3: &mut h3::Connection,
    conn: &mut quiche::Connection,
    id: u64,
    s: &mut StreamState,
) -> WriteOutcome {
    if s.out.done {
        return WriteOutcome::Complete;
    }
    if let Some(code) = s.out.reset {
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code);
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
        s.out.done = true;
        // The producer must stop too: nothing it queues will be written.
        s.cancelled.get_or_insert(code);
        s.out.data.clear();
        s.out.data_len = 0;
        if let Some(waker) = s.send_waker.take() {
            waker.wake();
        }
        return WriteOutcome::Aborted;
    }
    let before = s.out.data_len;
    let outcome = write_queued(h3, conn, id, &mut s.out);
    if s.out.data_len < before
        && s.out.data_len < s.out_limit
        && let Some(waker) = s.send_waker.take()
    {
        waker.wake();
    }
    match outcome {
        Ok(true) => {
            s.out.done = true;
            WriteOutcome::Complete
        }
        Ok(false) => WriteOutcome::Pending,
        Err(code) => {
            // STOP_SENDING from the peer: quiche resets our side itself.
            s.cancelled = Some(code);
            s.out.done = true;
            if let Some(waker) = s.send_waker.take() {
                waker.wake();
            }
            WriteOutcome::Aborted
        }
    }
}

/// Ok(true): all written with FIN; Ok(false): blocked or waiting for the producer;
/// Err(code): the peer stopped the stream.
fn write_queued(
    h3: &mut h3::Connection,
    conn: &mut quiche::Connection,
    id: u64,
    out: &mut Outbox,
) -> Result<bool, u64> {
    let stopped = |e: &h3::Error| match e {
        h3::Error::TransportError(quiche::Error::StreamStopped(code)) => Some(*code),
        _ => None,
    };
    while let Some((fields, fin)) = out.heads.front() {
        let result = if out.head_sent {
            h3.send_additional_headers(conn, id, fields, false, *fin)
        } else {
            h3.send_response(conn, id, fields, *fin)
        };
        match result {
            Ok(()) => {
                out.head_sent = true;
                let (_, fin) = out.heads.pop_front().expect("front exists");
                if fin {
                    return Ok(true);
                }
            }
            Err(e) => return stopped(&e).map_or(Ok(false), Err),
        }
    }
    if !out.final_queued {
        return Ok(false);
    }
    while !out.data.is_empty() {
        let last = out.data.len() == 1 && out.fin && out.trailers.is_none();
        let chunk = out.data.front_mut().expect("not empty");
        match h3.send_body(conn, id, chunk, last) {
            Ok(n) => {
                out.data_len -= n;
                if n < chunk.len() {
                    chunk.advance(n);
                    return Ok(false);
                }
                out.data.pop_front();
                if last {
                    return Ok(true);
                }
            }
            Err(e) => return stopped(&e).map_or(Ok(false), Err),
        }
    }
    if let Some(fields) = &out.trailers {
        return match h3.send_additional_headers(conn, id, fields, true, true) {
            Ok(()) => Ok(true),
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

thread_local! {
    /// Where discarded body bytes go. Discarding never yields, so one buffer per worker
    /// thread serves every connection: an idle connection holds none.
    static DISCARD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads and drops whatever body data quiche holds for a stream nobody will read.
pub(crate) fn discard(h3: &mut h3::Connection, conn: &mut quiche::Connection, id: u64) {
    DISCARD.with_borrow_mut(|buf| {
        if buf.is_empty() {
            buf.resize(16 * 1024, 0);
        }
        while h3.recv_body(conn, id, buf).is_ok() {}
    });
}

/// Reads a stream's body from quiche into its buffer while the buffer has room (or discards
/// it when nobody will read it). Runs on the connection task. Returns true when the reader
/// should be woken.
pub(crate) fn read_in(h3: &mut h3::Connection, conn: &mut quiche::Connection, id: u64, s: &mut StreamState) -> bool {
    if s.body_dropped || s.recv_error.is_some() {
        discard(h3, conn, id);
        s.data_pending = false;
        return false;
    }
    let mut woke = false;
    loop {
        let room = s.recv_limit.saturating_sub(s.recv.len());
        if room == 0 {
            return woke;
        }
        s.recv.reserve(room);
        match h3.recv_body_buf(conn, id, (&mut s.recv).limit(room)) {
            Ok(n) => {
                woke = true;
                s.received += n as u64;
                if s.content_length.is_some_and(|len| s.received > len) {
                    s.recv_error = Some(RecvError::Malformed("the body is longer than its content-length"));
                    return true;
                }
            }
            Err(h3::Error::Done) => {
                s.data_pending = false;
                return woke;
            }
            Err(h3::Error::TransportError(quiche::Error::StreamReset(code))) => {
                s.recv_error = Some(RecvError::Reset(code));
                return true;
            }
            Err(_) => {
                s.recv_error = Some(RecvError::Closed);
                return true;
            }
        }
    }
}

/// Marks the incoming body complete; checks it against its content-length.
pub(crate) fn finish_in(s: &mut StreamState) {
    s.recv_fin = true;
    if s.recv_error.is_none() && s.content_length.is_some_and(|len| len != s.received) {
        s.recv_error = Some(RecvError::Malformed("the body is shorter than its content-length"));
    }
}

pub(crate) fn wake_reader(s: &mut StreamState) {
    if let Some(waker) = s.recv_waker.take() {
        waker.wake();
    }
}

/// Pumps a message body into the stream's outbox: one frame at a time, and only while the
/// outbox has room, so a fast body waits for the stream instead of filling memory. Ends the
/// stream (FIN, or trailers) when the body ends, and resets it with H3_INTERNAL_ERROR when
/// the body fails.
pub(crate) async fn pump_body<B>(body: B, stream: &StreamShared)
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    loop {
        if poll_fn(|cx| stream.poll_send_room(cx)).await.is_err() {
            // The peer stopped reading: stop producing.
            return;
        }
        match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => {
                stream.finish();
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let bytes = data.copy_to_bytes(data.remaining());
                    if !bytes.is_empty() {
                        stream.push_data(bytes);
                    }
                    if body.is_end_stream() {
                        stream.finish();
                        return;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        stream.push_trailers(trailer_fields(&trailers));
                        return;
                    }
                }
            },
            Some(Err(e)) => {
                tracing::debug!(error = %e.into(), "body error; resetting the stream");
                stream.reset(code::H3_INTERNAL_ERROR);
                return;
            }
        }
    }
}

/// Whether quiche still holds a stream: data not yet sent or acknowledged, or a side not
/// finished. quiche forgets a stream once both directions are complete, and closing the
/// connection before then would discard what it still had to deliver.
pub(crate) fn stream_alive(conn: &mut quiche::Connection, id: u64) -> bool {
    !matches!(conn.stream_capacity(id), Err(quiche::Error::InvalidStreamState(_)))
}
