//! HTTP datagrams (RFC 9297 §2): unreliable datagrams tied to one request stream, carried
//! in QUIC DATAGRAM frames whose payload starts with the stream's quarter stream ID.
//!
//! A request stream that may carry them (a CONNECT request, when both sides enabled
//! datagrams) gets a [`Datagrams`] handle: the server's handler takes it from the request
//! ([`Datagrams::from_request`]), the client from the response
//! ([`Datagrams::from_response`], or [`Tunnel::datagrams`](super::tunnel::Tunnel::datagrams)).
//! The handle sends and receives payloads; the framing is done here.
//!
//! The connection's task owns a `DatagramHub`: the table from stream ID to the stream's
//! flow, the one place where datagrams enter and leave quiche. Every queue is bounded, and
//! a datagram that finds its queue full is dropped and counted, as a congested network
//! would drop it:
//!
//! - **Incoming**: each flow buffers at most its byte budget (`datagram_buffer` of the
//!   server and client builders, 64 KiB by default, each datagram charged
//!   [`DATAGRAM_COST`] more); a slow reader loses datagrams, memory does not grow.
//!   Datagrams for a stream with no flow (not yet seen, already closed, a CONNECT whose
//!   datagrams are off) are dropped (RFC 9297 §2.1 allows dropping those not yet seen);
//!   the server and the client each abort a request of theirs that is no CONNECT when one
//!   names it (RFC 9297 §2).
//! - **Outgoing**: the handles of one connection share one queue of [`OUTGOING_QUEUE`]
//!   datagrams to the connection's task; past it, and past quiche's own send queue
//!   (`TransportConfig::datagrams`), datagrams are dropped and counted. Until the peer's
//!   SETTINGS say whether it takes datagrams, they wait in that queue.

use crate::quic::{QuicheConnection, StreamIdMap};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::codes;
use super::varint;

/// What each buffered incoming datagram costs beyond its bytes (its `Bytes` handle, the
/// queue slot, the allocator's rounding): a peer sending empty datagrams fills the budget
/// too.
pub const DATAGRAM_COST: usize = 64;

/// How many outgoing datagrams the handles of one connection may queue for its task: a few
/// congestion windows of full-sized datagrams. Past it a send fails with
/// [`SendDatagramError::QueueFull`].
pub const OUTGOING_QUEUE: usize = 256;

/// The default byte budget of one stream's incoming datagrams.
pub const DEFAULT_FLOW_BUFFER: usize = 64 * 1024;

/// The largest quarter stream ID (RFC 9297 §2.1): stream IDs end at 2^62 - 1.
const MAX_QUARTER_STREAM_ID: u64 = (1 << 60) - 1;

/// How many outgoing datagrams the connection's task hands quiche per turn before it lets
/// the rest of the connection run (it wakes itself for the others).
const SENDS_PER_TURN: usize = 256;

/// Set in `max_payload` while the peer's SETTINGS have not said whether it takes
/// datagrams; the other bits still bound a payload by what the transport could carry to
/// it, so that what waits in the queue for the SETTINGS is no larger than could be sent
/// (a peer that never sends them would otherwise have the queue hold its 256 datagrams
/// at any size).
const PEER_UNKNOWN: usize = 1 << (usize::BITS - 1);

/// The sending and receiving halves of one request stream's HTTP datagrams.
///
/// Payloads are the HTTP datagram payloads (what follows the quarter stream ID; for
/// CONNECT-UDP, RFC 9298, a context ID and then the UDP payload). The stream's life is the
/// flow's: once the stream ends (the response or request body finished both ways, a reset,
/// the connection closed) [`recv`](Self::recv) returns `None` and sends fail with
/// [`SendDatagramError::Closed`]. Keep the message bodies open for as long as the
/// datagrams should flow.
///
/// ```no_run
/// use http::{Request, Response};
/// use tower_quiche::RecvBody;
/// use tower_quiche::datagram::Datagrams;
/// use tower_quiche::tunnel::{Tunnel, TunnelBody};
///
/// // Echoes every datagram of an extended CONNECT request back to the client.
/// async fn echo(mut request: Request<RecvBody>) -> Response<TunnelBody> {
///     let datagrams = Datagrams::from_request(&mut request);
///     let (tunnel, body) = Tunnel::from_request(request);
///     tokio::spawn(async move {
///         let _tunnel = tunnel; // the stream (and so the flow) lives while it does
///         if let Some(mut datagrams) = datagrams {
///             while let Some(payload) = datagrams.recv().await {
///                 let _ = datagrams.send(payload);
///             }
///         }
///     });
///     Response::new(body)
/// }
/// ```
pub struct Datagrams {
    sender: DatagramSender,
    receiver: DatagramReceiver,
}

/// Sends HTTP datagrams on one request stream. Cheap to clone.
#[derive(Clone)]
pub struct DatagramSender {
    flow: Arc<Flow>,
    outgoing: mpsc::Sender<Outgoing>,
}

/// Receives HTTP datagrams of one request stream.
pub struct DatagramReceiver {
    flow: Arc<Flow>,
}

/// What a stream's datagram flow has counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatagramStats {
    /// Datagrams that arrived and were queued for the receiver.
    pub received: u64,
    /// Datagrams that arrived while the receiver's buffer was full (or it was gone).
    pub dropped_incoming: u64,
    /// Datagrams handed to QUIC to be sent.
    pub sent: u64,
    /// Datagrams that were sent but never left: a full queue (ours or quiche's), a payload
    /// larger than the path allows, a peer that does not take them, a closed stream.
    pub dropped_outgoing: u64,
}

/// Why a datagram was not sent. Each is counted in
/// [`DatagramStats::dropped_outgoing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendDatagramError {
    /// The payload is larger than the connection can carry in one QUIC DATAGRAM frame.
    TooLarge {
        /// The largest payload the connection takes now (it follows the path MTU).
        max: usize,
    },
    /// The connection's outgoing queue is full: the datagram is dropped.
    QueueFull,
    /// The stream (or the connection) has ended.
    Closed,
    /// The peer did not enable HTTP datagrams (SETTINGS_H3_DATAGRAM and the QUIC
    /// max_datagram_frame_size transport parameter).
    NotSupported,
}

impl fmt::Display for SendDatagramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendDatagramError::TooLarge { max } => {
                write!(f, "the datagram is larger than the connection carries ({max} bytes)")
            }
            SendDatagramError::QueueFull => f.write_str("the connection's datagram queue is full"),
            SendDatagramError::Closed => f.write_str("the datagram's stream has ended"),
            SendDatagramError::NotSupported => f.write_str("the peer does not accept HTTP datagrams"),
        }
    }
}

impl std::error::Error for SendDatagramError {}

/// One stream's flow, shared by its handles and the connection's task.
struct Flow {
    stream_id: u64,
    inbox: Mutex<Inbox>,
    /// The byte budget of `inbox`.
    buffer: usize,
    received: AtomicU64,
    dropped_incoming: AtomicU64,
    sent: AtomicU64,
    dropped_outgoing: AtomicU64,
    closed: AtomicBool,
    /// The connection's largest datagram payload (before the quarter stream ID), 0 when
    /// the peer takes none; with [`PEER_UNKNOWN`] set until the peer's SETTINGS arrive.
    max_payload: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Inbox {
    queue: VecDeque<Bytes>,
    /// Bytes charged for `queue`.
    charged: usize,
    waker: Option<Waker>,
    /// The receiver was dropped: nothing more is queued.
    reader_gone: bool,
}

/// A datagram on its way from a handle to the connection's task.
struct Outgoing {
    flow: Arc<Flow>,
    payload: Bytes,
}

impl Flow {
    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an arrived payload for the receiver, or drops it when the budget is spent.
    fn deliver(&self, payload: Bytes) -> bool {
        let cost = payload.len() + DATAGRAM_COST;
        let waker = {
            let mut inbox = self.inbox();
            if inbox.reader_gone || self.closed.load(Ordering::Relaxed) || inbox.charged + cost > self.buffer {
                drop(inbox);
                self.dropped_incoming.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            inbox.charged += cost;
            inbox.queue.push_back(payload);
            inbox.waker.take()
        };
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// The stream has ended: the receiver sees the end once it has read what is queued.
    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let waker = self.inbox().waker.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn drop_outgoing(&self) {
        self.dropped_outgoing.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> DatagramStats {
        DatagramStats {
            received: self.received.load(Ordering::Relaxed),
            dropped_incoming: self.dropped_incoming.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            dropped_outgoing: self.dropped_outgoing.load(Ordering::Relaxed),
        }
    }

    /// The largest payload this stream can send, when known (the quarter stream ID takes
    /// its share of the frame).
    fn max_payload(&self) -> Option<usize> {
        let max = self.max_payload.load(Ordering::Relaxed);
        (max & PEER_UNKNOWN == 0).then(|| self.within(max))
    }

    /// The largest payload the transport could carry for this stream, whatever the peer's
    /// SETTINGS say.
    fn transport_max_payload(&self) -> usize {
        self.within(self.max_payload.load(Ordering::Relaxed) & !PEER_UNKNOWN)
    }

    /// What of a datagram payload of `max` is left past this stream's quarter ID.
    fn within(&self, max: usize) -> usize {
        max.saturating_sub(varint::len(self.stream_id / 4))
    }
}

/// The largest datagram payload the transport could carry to the peer: 0 once the
/// handshake has shown it takes none, no bound before the transport knows (a client in
/// 0-RTT data has no 1-RTT keys to size the frame with yet).
fn transport_max(conn: &QuicheConnection) -> usize {
    match conn.dgram_max_writable_len() {
        Some(max) => max,
        None if conn.is_established() => 0,
        None => !PEER_UNKNOWN,
    }
}

/// How a request or response carries its stream's [`Datagrams`] until someone takes them
/// (`http::Extensions` wants `Clone`; the first taker wins).
#[derive(Clone)]
struct Slot(Arc<Mutex<Option<Datagrams>>>);

impl Datagrams {
    /// Takes the datagrams of the request's stream: on a server, a CONNECT request (plain
    /// or extended) carries them when the connection has HTTP datagrams enabled on both
    /// sides (or the client's SETTINGS have not arrived yet: sends wait for them to say).
    /// `None` otherwise, and after the first call.
    pub fn from_request<B>(request: &mut http::Request<B>) -> Option<Datagrams> {
        Self::from_extensions(request.extensions_mut())
    }

    /// Takes the datagrams of the response's stream: on a client, the response to a
    /// CONNECT request carries them when the server enabled HTTP datagrams too (or its
    /// SETTINGS have not arrived yet: sends wait for them to say). `None` otherwise, and
    /// after the first call.
    pub fn from_response<B>(response: &mut http::Response<B>) -> Option<Datagrams> {
        Self::from_extensions(response.extensions_mut())
    }

    /// Takes the datagrams a request's or response's extensions carry.
    pub fn from_extensions(extensions: &mut http::Extensions) -> Option<Datagrams> {
        let slot = extensions.remove::<Slot>()?;
        slot.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub(crate) fn into_extensions(self, extensions: &mut http::Extensions) {
        extensions.insert(Slot(Arc::new(Mutex::new(Some(self)))));
    }

    /// The request stream the datagrams belong to.
    pub fn stream_id(&self) -> u64 {
        self.receiver.flow.stream_id
    }

    /// Sends one datagram; see [`DatagramSender::send`].
    pub fn send(&self, payload: impl Into<Bytes>) -> Result<(), SendDatagramError> {
        self.sender.send(payload)
    }

    /// Receives the next datagram; see [`DatagramReceiver::recv`].
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.receiver.recv().await
    }

    /// Polls for the next datagram; see [`DatagramReceiver::poll_recv`].
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.receiver.poll_recv(cx)
    }

    /// The largest payload that can be sent now; see [`DatagramSender::max_payload_len`].
    pub fn max_payload_len(&self) -> Option<usize> {
        self.sender.max_payload_len()
    }

    /// What the flow has counted (received, sent, dropped each way).
    pub fn stats(&self) -> DatagramStats {
        self.receiver.flow.stats()
    }

    /// Splits the handle, to send and receive from different tasks.
    pub fn split(self) -> (DatagramSender, DatagramReceiver) {
        (self.sender, self.receiver)
    }
}

impl fmt::Debug for Datagrams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datagrams")
            .field("stream_id", &self.stream_id())
            .field("stats", &self.stats())
            .finish()
    }
}

impl DatagramSender {
    /// Queues one datagram for sending, without waiting: datagrams are unreliable, and one
    /// that finds the queue full is dropped (and counted) rather than held, as a congested
    /// network would drop it. An `Ok` means queued, not delivered: quiche may still drop it
    /// if its own send queue is full when the connection's task hands it over, and the
    /// network may lose it.
    pub fn send(&self, payload: impl Into<Bytes>) -> Result<(), SendDatagramError> {
        let payload = payload.into();
        let result = self.check(&payload);
        let result = result.and_then(|()| {
            self.outgoing
                .try_send(Outgoing {
                    flow: Arc::clone(&self.flow),
                    payload,
                })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => SendDatagramError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => SendDatagramError::Closed,
                })
        });
        if result.is_err() {
            self.flow.drop_outgoing();
        }
        result
    }

    fn check(&self, payload: &Bytes) -> Result<(), SendDatagramError> {
        if self.flow.closed.load(Ordering::Relaxed) {
            return Err(SendDatagramError::Closed);
        }
        let max = match self.flow.max_payload() {
            Some(0) => return Err(SendDatagramError::NotSupported),
            Some(max) => max,
            // It waits for the SETTINGS, no larger than the transport could carry; a peer
            // whose transport takes no datagrams will take none.
            None => match self.flow.transport_max_payload() {
                0 => return Err(SendDatagramError::NotSupported),
                max => max,
            },
        };
        if payload.len() > max {
            return Err(SendDatagramError::TooLarge { max });
        }
        Ok(())
    }

    /// The largest payload the connection can carry in one datagram now (it follows the
    /// path's MTU, about 1,200 bytes on most paths), or `None` while the peer's SETTINGS
    /// have not arrived yet.
    pub fn max_payload_len(&self) -> Option<usize> {
        self.flow.max_payload()
    }

    /// What the flow has counted (received, sent, dropped each way).
    pub fn stats(&self) -> DatagramStats {
        self.flow.stats()
    }

    /// Whether the stream has ended.
    pub fn is_closed(&self) -> bool {
        self.flow.closed.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for DatagramSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramSender")
            .field("stream_id", &self.flow.stream_id)
            .finish_non_exhaustive()
    }
}

impl DatagramReceiver {
    /// Receives the next datagram's payload; `None` once the stream has ended and every
    /// datagram that arrived before has been read.
    pub async fn recv(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next datagram's payload, as [`recv`](Self::recv).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut inbox = self.flow.inbox();
        if let Some(payload) = inbox.queue.pop_front() {
            inbox.charged -= payload.len() + DATAGRAM_COST;
            return Poll::Ready(Some(payload));
        }
        if self.flow.closed.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        match &mut inbox.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// What the flow has counted (received, sent, dropped each way).
    pub fn stats(&self) -> DatagramStats {
        self.flow.stats()
    }
}

impl fmt::Debug for DatagramReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramReceiver")
            .field("stream_id", &self.flow.stream_id)
            .finish_non_exhaustive()
    }
}

impl Drop for DatagramReceiver {
    fn drop(&mut self) {
        // Nobody reads: what arrives from now on is dropped at once, not buffered.
        let mut inbox = self.flow.inbox();
        inbox.reader_gone = true;
        inbox.queue.clear();
        inbox.charged = 0;
    }
}

/// A datagram that breaks RFC 9297 §2.1: an HTTP/3 connection error, of type
/// H3_DATAGRAM_ERROR for a payload that is no datagram, or H3_ID_ERROR for a stream the
/// peer cannot have opened.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MalformedDatagram(pub(crate) &'static str, pub(crate) u64);

/// Splits an HTTP/3 datagram into its stream ID and payload (RFC 9297 §2.1).
pub(crate) fn parse(datagram: &[u8]) -> Result<(u64, usize), MalformedDatagram> {
    let (quarter, len) = varint::decode(datagram).ok_or(MalformedDatagram(
        "a datagram too short for its quarter stream ID",
        codes::H3_DATAGRAM_ERROR,
    ))?;
    if quarter > MAX_QUARTER_STREAM_ID {
        return Err(MalformedDatagram(
            "a quarter stream ID beyond 2^60 - 1",
            codes::H3_DATAGRAM_ERROR,
        ));
    }
    Ok((quarter * 4, len))
}

/// Whether the peer takes HTTP datagrams, as far as the connection knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerDatagrams {
    /// Its SETTINGS have not arrived.
    Unknown,
    Enabled,
    Disabled,
}

impl PeerDatagrams {
    pub(crate) fn of(h3: &quiche::h3::Connection, conn: &QuicheConnection) -> Self {
        if h3.peer_settings_raw().is_none() {
            PeerDatagrams::Unknown
        } else if h3.dgram_enabled_by_peer(conn) {
            PeerDatagrams::Enabled
        } else {
            PeerDatagrams::Disabled
        }
    }
}

/// A connection's HTTP datagram flows, owned by its task (see the module docs).
pub(crate) struct DatagramHub {
    /// Whether streams get flows (the server's or client's switch); when not, every
    /// datagram that arrives is dropped.
    enabled: bool,
    flows: StreamIdMap<Arc<Flow>>,
    outgoing_tx: mpsc::Sender<Outgoing>,
    outgoing_rx: mpsc::Receiver<Outgoing>,
    max_payload: Arc<AtomicUsize>,
    flow_buffer: usize,
    /// Where an outgoing datagram is framed (quiche copies it).
    frame: Vec<u8>,
    /// Datagrams dropped because no flow took them.
    dropped_unrouted: u64,
    /// Request streams from this ID on are beyond what the peer may have opened yet (a
    /// server sets it; `u64::MAX` until then).
    peer_stream_limit: u64,
}

impl DatagramHub {
    pub(crate) fn new(enabled: bool, flow_buffer: usize) -> Self {
        let (outgoing_tx, outgoing_rx) = mpsc::channel(OUTGOING_QUEUE);
        DatagramHub {
            enabled,
            flows: StreamIdMap::default(),
            outgoing_tx,
            outgoing_rx,
            // Until HTTP/3 starts (`start`): no bound.
            max_payload: Arc::new(AtomicUsize::new(usize::MAX)),
            flow_buffer,
            frame: Vec::new(),
            dropped_unrouted: 0,
            peer_stream_limit: u64::MAX,
        }
    }

    /// Bounds what waits for the peer's SETTINGS by what the transport could carry, from
    /// the start of HTTP/3 on (before the first [`process`](Self::process), which a
    /// handler's sends in the connection's first turn come before).
    pub(crate) fn start(&self, conn: &QuicheConnection) {
        self.max_payload
            .store(PEER_UNKNOWN | transport_max(conn), Ordering::Relaxed);
    }

    /// Gives stream `id` a flow, unless the hub is off.
    pub(crate) fn open(&mut self, id: u64) -> Option<Datagrams> {
        if !self.enabled {
            return None;
        }
        let flow = Arc::new(Flow {
            stream_id: id,
            inbox: Mutex::new(Inbox::default()),
            buffer: self.flow_buffer,
            received: AtomicU64::new(0),
            dropped_incoming: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped_outgoing: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            max_payload: Arc::clone(&self.max_payload),
        });
        self.flows.insert(id, Arc::clone(&flow));
        Some(Datagrams {
            sender: DatagramSender {
                flow: Arc::clone(&flow),
                outgoing: self.outgoing_tx.clone(),
            },
            receiver: DatagramReceiver { flow },
        })
    }

    /// Stream `id` has ended: its flow closes, and later datagrams for it are dropped.
    pub(crate) fn close(&mut self, id: u64) {
        if let Some(flow) = self.flows.remove(&id) {
            flow.close();
        }
    }

    /// The connection has ended: every flow closes.
    pub(crate) fn close_all(&mut self) {
        for (_, flow) in self.flows.drain() {
            flow.close();
        }
        self.outgoing_rx.close();
    }

    /// How many datagrams arrived that no flow took.
    #[cfg(test)]
    pub(crate) fn dropped_unrouted(&self) -> u64 {
        self.dropped_unrouted
    }

    /// Moves datagrams between quiche and the flows, both ways. A datagram that breaks
    /// RFC 9297 §2.1 is a connection error: its code is returned (the caller closes).
    /// Returns the streams of the datagrams no flow took (each once, sorted; at most one per
    /// datagram read this turn: quiche's receive queue bounds them; no allocation while
    /// there is none), for the owner to tell requests that have no datagrams (RFC 9297 §2:
    /// such a request is aborted with H3_DATAGRAM_ERROR) from streams not seen yet or
    /// closed.
    pub(crate) fn process(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut QuicheConnection,
        peer: PeerDatagrams,
    ) -> Result<Vec<u64>, MalformedDatagram> {
        let max = match peer {
            PeerDatagrams::Unknown => PEER_UNKNOWN | transport_max(conn),
            PeerDatagrams::Enabled => conn.dgram_max_writable_len().unwrap_or(0),
            PeerDatagrams::Disabled => 0,
        };
        self.max_payload.store(max, Ordering::Relaxed);
        // quiche's receive queue is bounded (`TransportConfig::datagrams`; it drops the
        // oldest when full), so this loop is too.
        let mut unrouted = Vec::new();
        while let Ok(datagram) = conn.dgram_recv_buf() {
            if let Some(id) = self.route(Bytes::from(datagram))? {
                unrouted.push(id);
            }
        }
        // Several may name one stream: it ends once.
        unrouted.sort_unstable();
        unrouted.dedup();
        if peer == PeerDatagrams::Unknown {
            // None may be sent before the peer's SETTINGS_H3_DATAGRAM (RFC 9297 §2.1.1):
            // they wait in the queue (bounded: past it, sends fail with QueueFull), and the
            // turn that brings the SETTINGS sends them.
            return Ok(unrouted);
        }
        for _ in 0..SENDS_PER_TURN {
            let Poll::Ready(Some(Outgoing { flow, payload })) = self.outgoing_rx.poll_recv(cx) else {
                return Ok(unrouted);
            };
            self.send(conn, peer, &flow, &payload);
        }
        // More are queued: another turn takes them, after the rest of the connection ran.
        cx.waker().wake_by_ref();
        Ok(unrouted)
    }

    /// Hands one arrived datagram to its stream's flow, or drops it.
    /// Request streams from `id` on are beyond what the peer may have opened so far: a
    /// datagram for one is an H3_ID_ERROR (RFC 9297 §2.1).
    #[cfg(feature = "server")]
    pub(crate) fn set_peer_stream_limit(&mut self, id: u64) {
        self.peer_stream_limit = id;
    }

    /// Hands a datagram to its stream's flow; returns the stream when no flow took it.
    fn route(&mut self, datagram: Bytes) -> Result<Option<u64>, MalformedDatagram> {
        let (id, header) = parse(&datagram)?;
        if id >= self.peer_stream_limit {
            return Err(MalformedDatagram(
                "a datagram for a stream beyond the peer's stream limit",
                codes::H3_ID_ERROR,
            ));
        }
        match self.flows.get(&id) {
            Some(flow) => {
                flow.deliver(datagram.slice(header..));
                Ok(None)
            }
            None => {
                // Not yet seen, already closed, or no datagram stream: RFC 9297 §2.1 lets
                // the first be dropped and requires it for the second; the owner decides
                // on the third (a server aborts a request that is no CONNECT).
                self.dropped_unrouted += 1;
                tracing::trace!(stream_id = id, "a datagram for a stream without a flow; dropped");
                Ok(Some(id))
            }
        }
    }

    fn send(&mut self, conn: &mut QuicheConnection, peer: PeerDatagrams, flow: &Flow, payload: &[u8]) {
        if flow.closed.load(Ordering::Relaxed) || peer != PeerDatagrams::Enabled {
            // A stream that ended, or a peer whose SETTINGS said it takes no datagrams.
            flow.drop_outgoing();
            return;
        }
        self.frame.clear();
        varint::encode(flow.stream_id / 4, &mut self.frame);
        self.frame.extend_from_slice(payload);
        match conn.dgram_send(&self.frame) {
            Ok(()) => {
                flow.sent.fetch_add(1, Ordering::Relaxed);
            }
            // Done: quiche's send queue is full; BufferTooShort: larger than the path takes.
            Err(e) => {
                tracing::trace!(stream_id = flow.stream_id, error = %e, "datagram not sent; dropped");
                flow.drop_outgoing();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn datagram(id: u64, payload: &[u8]) -> Bytes {
        let mut out = Vec::new();
        varint::encode(id / 4, &mut out);
        out.extend_from_slice(payload);
        Bytes::from(out)
    }

    #[test]
    fn the_quarter_stream_id_names_the_stream() {
        assert_eq!(parse(&datagram(8, b"x")), Ok((8, 1)));
        assert_eq!(parse(&datagram(4 * 100, b"")), Ok((400, 2)));
        assert!(parse(&[]).is_err(), "too short for the quarter stream ID");
        assert!(parse(&[0x40]).is_err(), "a truncated varint");
        // 2^60 as an 8-byte varint: one beyond the last stream.
        let mut beyond = Vec::new();
        varint::encode(1 << 60, &mut beyond);
        assert!(parse(&beyond).is_err());
        let mut last = Vec::new();
        varint::encode((1 << 60) - 1, &mut last);
        assert_eq!(parse(&last), Ok((((1u64 << 60) - 1) * 4, 8)));
    }

    #[test]
    fn datagrams_reach_their_own_stream_and_unknown_streams_are_dropped() {
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        let mut zero = hub.open(0).unwrap();
        let mut four = hub.open(4).unwrap();
        hub.route(datagram(4, b"to four")).unwrap();
        hub.route(datagram(0, b"to zero")).unwrap();
        hub.route(datagram(8, b"to nobody")).unwrap();
        assert_eq!(zero.recv().now_or_never(), Some(Some(Bytes::from_static(b"to zero"))));
        assert_eq!(four.recv().now_or_never(), Some(Some(Bytes::from_static(b"to four"))));
        assert_eq!(hub.dropped_unrouted(), 1);
        assert!(zero.recv().now_or_never().is_none(), "nothing more");
    }

    #[test]
    fn a_closed_stream_drops_its_datagrams_and_ends_its_receiver() {
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        let mut flow = hub.open(0).unwrap();
        hub.route(datagram(0, b"before")).unwrap();
        hub.close(0);
        hub.route(datagram(0, b"after")).unwrap();
        assert_eq!(hub.dropped_unrouted(), 1);
        assert_eq!(flow.recv().now_or_never(), Some(Some(Bytes::from_static(b"before"))));
        assert_eq!(flow.recv().now_or_never(), Some(None), "the end, after what arrived");
        assert_eq!(flow.send(&b"late"[..]), Err(SendDatagramError::Closed));
        assert_eq!(flow.stats().dropped_outgoing, 1);
    }

    #[test]
    fn a_slow_reader_loses_datagrams_not_memory() {
        let budget = 4 * (100 + DATAGRAM_COST);
        let mut hub = DatagramHub::new(true, budget);
        let mut flow = hub.open(0).unwrap();
        for _ in 0..10 {
            hub.route(datagram(0, &[7; 100])).unwrap();
        }
        let stats = flow.stats();
        assert_eq!((stats.received, stats.dropped_incoming), (4, 6));
        for _ in 0..4 {
            assert!(matches!(flow.recv().now_or_never(), Some(Some(_))));
        }
        // Read: the budget is free again.
        hub.route(datagram(0, &[7; 100])).unwrap();
        assert_eq!(flow.stats().received, 5);
    }

    #[test]
    fn a_hub_switched_off_gives_no_flows() {
        let mut hub = DatagramHub::new(false, DEFAULT_FLOW_BUFFER);
        assert!(hub.open(0).is_none());
        hub.route(datagram(0, b"x")).unwrap();
        assert_eq!(hub.dropped_unrouted(), 1);
    }

    #[test]
    fn sends_past_the_queue_are_dropped_and_counted() {
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        let flow = hub.open(0).unwrap();
        for _ in 0..OUTGOING_QUEUE {
            flow.send(&b"x"[..]).unwrap();
        }
        assert_eq!(flow.send(&b"x"[..]), Err(SendDatagramError::QueueFull));
        assert_eq!(flow.stats().dropped_outgoing, 1);
    }

    #[test]
    fn sends_are_checked_against_what_the_peer_takes() {
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        let flow = hub.open(400).unwrap();
        assert_eq!(flow.max_payload_len(), None, "unknown before the peer's SETTINGS");
        hub.max_payload.store(1000, Ordering::Relaxed);
        // Stream 400's quarter ID (100) takes two bytes of the frame.
        assert_eq!(flow.max_payload_len(), Some(998));
        assert_eq!(flow.send(vec![0; 999]), Err(SendDatagramError::TooLarge { max: 998 }));
        assert!(flow.send(vec![0; 998]).is_ok());
        hub.max_payload.store(0, Ordering::Relaxed);
        assert_eq!(flow.send(&b"x"[..]), Err(SendDatagramError::NotSupported));
    }

    /// From the start of HTTP/3 (before the connection's first turn has looked at the
    /// datagrams), what the transport carries bounds what waits for the peer's SETTINGS
    /// (found by review: a CONNECT handler's sends in that first turn came before it).
    #[test]
    fn the_transports_bound_holds_from_the_start_of_http3() {
        let with_datagrams = |t: crate::quic::TransportConfig| t.datagrams(16);
        let server = crate::testing::server_config("h3", with_datagrams);
        let client = crate::testing::client_config("h3", with_datagrams);
        let pipe = crate::testing::Pipe::handshaken(&server, &client);
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        hub.start(&pipe.server);
        let flow = hub.open(0).unwrap();
        assert_eq!(flow.max_payload_len(), None, "the peer's SETTINGS are still unknown");
        let max = pipe.server.dgram_max_writable_len().unwrap() - 1;
        assert_eq!(flow.send(vec![0; max + 1]), Err(SendDatagramError::TooLarge { max }));
        assert!(flow.send(vec![0; max]).is_ok());
    }

    /// Found by review: before the peer's SETTINGS, sends of any size were queued to wait
    /// for them, so a peer that never sends SETTINGS had the connection hold its whole
    /// queue at 64 KiB a datagram (a CONNECT-UDP proxy forwarding large UDP datagrams to
    /// it). What the transport could carry bounds them meanwhile.
    #[test]
    fn sends_waiting_for_the_peers_settings_are_no_larger_than_the_transport_carries() {
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        let flow = hub.open(400).unwrap();
        hub.max_payload.store(PEER_UNKNOWN | 1000, Ordering::Relaxed);
        assert_eq!(flow.max_payload_len(), None, "still unknown");
        assert_eq!(flow.send(vec![0; 999]), Err(SendDatagramError::TooLarge { max: 998 }));
        assert!(flow.send(vec![0; 998]).is_ok(), "it waits for the SETTINGS");
        hub.max_payload.store(PEER_UNKNOWN, Ordering::Relaxed);
        assert_eq!(
            flow.send(&b"x"[..]),
            Err(SendDatagramError::NotSupported),
            "the peer's transport takes no datagrams"
        );
    }

    /// Found in review of the `dgram` merge (b11f086): a server's handler gets its
    /// datagrams before the client's SETTINGS have arrived (a request stream may overtake
    /// the control stream), and `Datagrams::from_request` says its sends then wait for them.
    /// The hub took them off the queue and dropped them while the peer was unknown: the
    /// first datagrams of such a tunnel were lost, however soon the SETTINGS followed.
    #[test]
    fn sends_before_the_peers_settings_wait_for_them() {
        use crate::testing::{Pipe, WakeCount, client_config, server_config};
        let mut pipe = Pipe::handshaken(
            &server_config("h3", |t| t.datagrams(16)),
            &client_config("h3", |t| t.datagrams(16)),
        );
        let waker = Arc::new(WakeCount::default()).waker();
        let mut cx = Context::from_waker(&waker);
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        let flow = hub.open(0).unwrap();
        flow.send(&b"early"[..]).unwrap();
        hub.process(&mut cx, &mut pipe.server, PeerDatagrams::Unknown).unwrap();
        // The client's SETTINGS arrive: it takes datagrams.
        hub.process(&mut cx, &mut pipe.server, PeerDatagrams::Enabled).unwrap();
        pipe.flush();
        let mut buf = [0; 64];
        let got = pipe.client.dgram_recv(&mut buf).map(|n| buf[..n].to_vec());
        assert_eq!(got, Ok(datagram(0, b"early").to_vec()), "{:?}", flow.stats());
        assert_eq!((flow.stats().sent, flow.stats().dropped_outgoing), (1, 0));
    }

    #[test]
    fn a_dropped_receiver_buffers_nothing_more() {
        let mut hub = DatagramHub::new(true, DEFAULT_FLOW_BUFFER);
        let (_sender, receiver) = hub.open(0).unwrap().split();
        drop(receiver);
        hub.route(datagram(0, b"x")).unwrap();
        assert_eq!(hub.flows[&0].stats().dropped_incoming, 1);
        assert!(hub.flows[&0].inbox().queue.is_empty());
    }
}
