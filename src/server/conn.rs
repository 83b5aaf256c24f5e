//! The HTTP/3 server side of one connection: an [`Application`] on the QUIC layer that turns
//! request streams into `http::Request`s, runs the service for each inside the connection's
//! task, and writes responses back.

use crate::quic::{QuicheConnection, StreamIdMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{FuturesUnordered, StreamExt};
use quiche::h3;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tracing::Instrument;

use super::{ConnectionInfo, HttpService, Informational, RequestInfo, Settings};
use crate::error::Error;
use crate::h3::body::RecvBody;
use crate::h3::codes as code;
use crate::h3::datagram::{DatagramHub, MalformedDatagram, PeerDatagrams};
use crate::h3::fields::{self, request_from_fields};
use crate::h3::priority::{self, Priority};
use crate::h3::stream::{self, Cancel, ConnNotify, Limits, ReadFailure, StreamShared, WriteOutcome};
use crate::quic::Application;

type RequestFuture = Pin<Box<dyn Future<Output = (u64, bool)> + Send>>;

/// The connection's view of one request in flight.
struct Entry {
    shared: Arc<StreamShared>,
    abort: AbortHandle,
    /// The request's future has ended (response queued, or aborted, or panicked).
    responded: bool,
    /// Everything queued is written (or the stream was abandoned).
    written: bool,
    /// The stream's progress count at the last timer check, and since when it has stood
    /// still.
    still_since: (u64, Instant),
    /// A CONNECT request: once answered 2xx it is a tunnel (a WebSocket, say), which may
    /// sit idle as long as both ends like; the body stall timeout does not end it.
    tunnel: bool,
}

/// How long a stream whose request the peer has not finished sending may keep a graceful
/// close waiting for its response to be delivered. A conforming client answers our
/// STOP_SENDING with RESET_STREAM at once, after which quiche releases the stream; one that
/// never does must not hold the connection open until the idle timeout.
const LINGER_UNFINISHED: Duration = Duration::from_secs(1);

/// How long after sending GOAWAY a connection waits at least before it closes: two round
/// trips, within these bounds, give the GOAWAY time to leave and usually to arrive.
const GOAWAY_GRACE_MIN: Duration = Duration::from_millis(1);
const GOAWAY_GRACE_MAX: Duration = Duration::from_millis(200);

/// How long a connection with no request in flight keeps its stream tables before it
/// releases them. A HashMap keeps its capacity when emptied, which an idle connection
/// should not hold; but a connection whose requests come in bursts empties its tables
/// between bursts, and dropping them there made every burst grow them again from nothing
/// (rehashing at each doubling, and the allocator consolidating its heap: 2.5 % of the
/// server's samples with 64 streams at a time, 0.6 % once kept).
const RELEASE_TABLES_AFTER: Duration = Duration::from_secs(1);

/// How often the per-stream timers (request head, body stall) are checked while requests
/// are in flight, as a fraction of the shortest of them: a stream is cut off between one
/// and 1.25 times its timeout, and a busy connection does not scan its streams every turn.
const TIMER_CHECKS_PER_TIMEOUT: u32 = 4;

pub(crate) struct ServerApp<S> {
    service: S,
    settings: Arc<Settings>,
    info: ConnectionInfo,
    h3: Option<h3::Connection>,
    streams: StreamIdMap<Entry>,
    requests: FuturesUnordered<RequestFuture>,
    notify: Arc<ConnNotify>,
    lists: stream::RoundLists,
    /// Resolves with the drain deadline when the server shuts down.
    shutdown: Pin<Box<dyn Future<Output = Option<Instant>> + Send>>,
    /// Draining (a GOAWAY sent, or waiting for room, `goaway_unsent`): the stream ID from
    /// which requests are refused, and the deadline.
    draining: Option<(u64, Option<Instant>)>,
    /// A close comes no sooner than this after our GOAWAY, so the GOAWAY leaves in a packet
    /// of its own first (closing discards what quiche has not sent); while the GOAWAY
    /// waits for room, how long the close waits for it.
    close_not_before: Option<Instant>,
    /// The GOAWAY of `draining` found no room in quiche yet (`send_goaway`).
    goaway_unsent: bool,
    /// One past the highest request stream whose head arrived.
    next_stream: u64,
    /// Some stream handed quiche something to send since the stall timer last looked
    /// (streams answered and forgotten since included).
    sent_since_check: bool,
    /// PRIORITY_UPDATEs left with quiche for request streams whose head had not arrived
    /// (RFC 9218 §7: one may come first), to be taken with the head: while none is left,
    /// a request costs no look for one. It may count one whose stream never comes, which
    /// costs each later request a lookup, no more.
    early_priority_updates: usize,
    /// Request streams quiche holds whose head has not arrived yet, since when we know of
    /// them: each must complete its head within `request_head_timeout`.
    heads_pending: StreamIdMap<Instant>,
    /// Request stream IDs below `next_stream` that no head arrived on: the client opened
    /// them implicitly by using a higher one (RFC 9000 §3.2), and their bytes may come yet,
    /// possibly behind a gap that keeps them unreadable, or never. Looked for at each timer
    /// check. Bounded: a skipped ID holds one of the client's stream credits for good, and
    /// the list stops at `probed_streams`.
    /// With when each was skipped: one skipped recently below the GOAWAY limit holds the
    /// close (its packets may only be late, and the GOAWAY promised to process it, RFC 9114
    /// §5.2), for at most a head timeout from then.
    skipped: Vec<(u64, Instant)>,
    /// How many request stream IDs are looked for beyond the last head, and how many
    /// skipped ones are remembered: twice the client's limit of concurrent request streams
    /// (it cannot open IDs beyond its credit), at least `MIN_PROBED_STREAMS`.
    probed_streams: usize,
    /// How many request streams the client may have open at once (its QUIC limit).
    max_concurrent_streams: u64,
    peer_goaway: bool,
    served: u64,
    /// No request in flight since then.
    idle_since: Option<Instant>,
    /// How long the connection keeps its stream tables once idle: `RELEASE_TABLES_AFTER`
    /// (a field so that tests do not depend on how fast the machine runs them).
    release_tables_after: Duration,
    /// When the per-stream timers are checked next.
    next_stream_check: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    closing: bool,
    /// Answered streams quiche may still be delivering; a graceful close waits for them.
    /// Those whose request the peer had not finished carry the end of their wait.
    lingering: Vec<(u64, Option<Instant>)>,
    /// `lingering` is pruned of delivered streams when it grows past this.
    lingering_prune_at: usize,
    /// Streams whose state quiche's HTTP/3 layer would keep for the connection's life.
    h3_leftovers: stream::H3Leftovers,
    /// HTTP datagram flows of CONNECT streams (RFC 9297), when the listener's transport
    /// enables QUIC datagrams.
    datagrams: Option<DatagramHub>,
    _alive: mpsc::Sender<()>,
}

impl<S: HttpService<RecvBody>> ServerApp<S> {
    pub(crate) fn new(
        service: S,
        settings: Arc<Settings>,
        info: ConnectionInfo,
        shutdown: Pin<Box<dyn Future<Output = Option<Instant>> + Send>>,
        alive: mpsc::Sender<()>,
    ) -> Self {
        ServerApp {
            service,
            settings,
            info,
            h3: None,
            streams: StreamIdMap::default(),
            requests: FuturesUnordered::new(),
            notify: Arc::new(ConnNotify::default()),
            lists: stream::RoundLists::default(),
            shutdown,
            draining: None,
            close_not_before: None,
            goaway_unsent: false,
            next_stream: 0,
            early_priority_updates: 0,
            sent_since_check: false,
            heads_pending: StreamIdMap::default(),
            skipped: Vec::new(),
            probed_streams: MIN_PROBED_STREAMS,
            max_concurrent_streams: u64::MAX / 8,
            peer_goaway: false,
            served: 0,
            idle_since: Some(Instant::now()),
            release_tables_after: RELEASE_TABLES_AFTER,
            next_stream_check: None,
            timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            timer_at: None,
            closing: false,
            lingering: Vec::new(),
            lingering_prune_at: LINGERING_PRUNE_MIN,
            h3_leftovers: stream::H3Leftovers::default(),
            datagrams: None,
            _alive: alive,
        }
    }

    /// The listener's transport enables QUIC datagrams: datagrams are routed to CONNECT
    /// streams when the server's switch allows HTTP datagrams, and dropped otherwise.
    pub(crate) fn with_datagrams(mut self) -> Self {
        let settings = &self.settings;
        self.datagrams = Some(DatagramHub::new(settings.http_datagrams, settings.datagram_buffer));
        self
    }

    /// Sizes the look for request streams without a head to the listener's limit of
    /// concurrent request streams.
    pub(crate) fn with_stream_limit(mut self, max_concurrent_streams: u64) -> Self {
        self.max_concurrent_streams = max_concurrent_streams;
        let twice = usize::try_from(max_concurrent_streams)
            .unwrap_or(usize::MAX)
            .saturating_mul(2);
        self.probed_streams = twice.max(MIN_PROBED_STREAMS);
        self
    }

    fn h3(&mut self) -> &mut h3::Connection {
        self.h3.as_mut().expect("created when established")
    }

    fn poll_events(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        loop {
            match self.h3().poll(conn) {
                Ok((id, h3::Event::Headers { list, more_frames })) => self.on_headers(conn, id, list, more_frames),
                Ok((id, h3::Event::Data)) => self.on_data(conn, id),
                Ok((id, h3::Event::Finished)) => self.on_finished(conn, id),
                Ok((id, h3::Event::Reset(code))) => self.on_reset(conn, id, code),
                Ok((id, h3::Event::PriorityUpdate)) => self.on_priority_update(conn, id),
                // A client may send GOAWAY more than once: the first one says it all.
                Ok((_, h3::Event::GoAway)) if !self.peer_goaway => {
                    tracing::debug!("the client sent GOAWAY");
                    self.peer_goaway = true;
                    // The close waits for these: find the ones that can never finish now.
                    self.look_at_unwritten_streams(conn);
                }
                Ok((_, h3::Event::GoAway)) => {}
                Err(h3::Error::Done) => return Ok(()),
                Err(e) => {
                    // A connection error: quiche has usually closed the connection already.
                    tracing::debug!(error = %e, "HTTP/3 connection error");
                    self.fail_connection(conn, code::h3_wire_code(&e));
                    return Ok(());
                }
            }
        }
    }

    fn fail_connection(&mut self, conn: &mut QuicheConnection, code: u64) {
        if conn.local_error().is_none() {
            let _ = conn.close(true, code, b"");
        }
        self.closing = true;
    }

    /// Starts HTTP/3 on the connection: when the handshake completes, or before, when the
    /// client's first flight carries early data.
    fn start_h3(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        if conn.application_proto() != b"h3" {
            // A listener may offer other protocols too: this connection is not ours to serve.
            return Err(Error::config(format!(
                "the connection negotiated ALPN {:?}, not h3: serve it with the Application for that \
                 protocol, or offer only \"h3\" on this listener",
                String::from_utf8_lossy(conn.application_proto())
            )));
        }
        let h3 = h3::Connection::with_transport(conn, &self.settings.h3_config)
            .map_err(|e| Error::application(code::h3_wire_code(&e), format!("cannot start HTTP/3: {e}")))?;
        self.h3 = Some(h3);
        if let Some(hub) = &self.datagrams {
            hub.start(conn);
        }
        Ok(())
    }

    /// Answers a request with an empty response of `status` without calling the service,
    /// and stops reading a body it may have (the response is complete, RFC 9114 §4.1).
    /// When the answer cannot be sent now (the connection's send window is full), the
    /// stream is reset with `code_if_blocked` instead.
    fn answer_without_service(
        &mut self,
        conn: &mut QuicheConnection,
        id: u64,
        status: &[u8],
        more_frames: bool,
        code_if_blocked: u64,
    ) {
        let fields = [
            h3::Header::new(b":status", status),
            h3::Header::new(b"content-length", b"0"),
        ];
        if self.h3().send_response(conn, id, &fields, true).is_err() {
            self.refuse(conn, id, code_if_blocked);
            return;
        }
        if more_frames {
            let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code::H3_NO_ERROR);
            // The HTTP/3 layer does not see the rest of the request now.
            self.forget_in_h3_once_gone(conn, id);
        }
        // Delivered before a graceful close, as any answer is (`forget_if_done`).
        self.lingering
            .push((id, more_frames.then(|| Instant::now() + LINGER_UNFINISHED)));
    }

    /// Resets both directions of a stream we do not track with an HTTP/3 error code.
    fn refuse(&mut self, conn: &mut QuicheConnection, id: u64, code: u64) {
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code);
        self.forget_in_h3_once_gone(conn, id);
    }

    /// See [`stream::H3Leftovers`].
    fn forget_in_h3_once_gone(&mut self, conn: &mut QuicheConnection, id: u64) {
        if let Some(h3) = self.h3.as_mut() {
            self.h3_leftovers.forget_once_gone(h3, conn, id);
        }
    }

    fn on_headers(&mut self, conn: &mut QuicheConnection, id: u64, list: Vec<h3::Header>, more_frames: bool) {
        if let Some(entry) = self.streams.get(&id) {
            // A second HEADERS frame: the request's trailers. A CONNECT stream carries only
            // DATA after its head (RFC 9114 §4.4).
            let read = if entry.tunnel {
                Err(ReadFailure::FrameUnexpected)
            } else {
                entry.shared.on_trailers(&list, self.settings.max_header_list_size)
            };
            if let Err(failure) = read {
                self.on_read_failure(conn, id, failure);
            }
            return;
        }
        if !id.is_multiple_of(4) {
            return;
        }
        self.heads_pending.remove(&id);
        self.advance_next_stream(id);
        if self.draining.is_some_and(|(limit, _)| id >= limit) {
            // After our GOAWAY: not processed, safe for the client to retry (RFC 9114 §5.2).
            self.refuse(conn, id, code::H3_REQUEST_REJECTED);
            return;
        }
        // The client may have stopped the response already (STOP_SENDING behind the
        // request, in the same packet): quiche then has nothing of ours to send, forgets a
        // request whose body ended as soon as it is read, and gives the client its stream
        // credit back. A handler started now would run outside the limit on concurrent
        // streams, for a response no one can receive.
        if let Err(quiche::Error::StreamStopped(_) | quiche::Error::InvalidStreamState(_)) = conn.stream_capacity(id) {
            tracing::debug!(stream_id = id, "request stopped by the client before it was served");
            self.refuse(conn, id, code::H3_REQUEST_CANCELLED);
            return;
        }
        if fields::section_size(&list) > self.settings.max_header_list_size {
            tracing::debug!(stream_id = id, "request header section too large: 431");
            self.answer_without_service(conn, id, b"431", more_frames, code::H3_EXCESSIVE_LOAD);
            return;
        }
        let mut head = match request_from_fields(&list) {
            // RFC 9220 §3: :protocol from a client the server did not allow to send it.
            Ok(head)
                if !self.settings.connect_protocol && head.request.extensions().get::<fields::Protocol>().is_some() =>
            {
                tracing::debug!(
                    stream_id = id,
                    "extended CONNECT without SETTINGS_ENABLE_CONNECT_PROTOCOL"
                );
                self.refuse(conn, id, code::H3_MESSAGE_ERROR);
                return;
            }
            Ok(head) => head,
            Err(why) => {
                tracing::debug!(stream_id = id, reason = %why, "malformed request");
                self.refuse(conn, id, code::H3_MESSAGE_ERROR);
                return;
            }
        };
        let tunnel = head.request.method() == http::Method::CONNECT;
        if !more_frames && head.content_length.is_some_and(|len| len > 0) {
            tracing::debug!(stream_id = id, "request ended before its content-length");
            self.refuse(conn, id, code::H3_MESSAGE_ERROR);
            return;
        }
        // A request in 0-RTT data, which an attacker can replay (RFC 8470): served now only
        // if safe to repeat, else the client is told to send it again after the handshake.
        let early_data = !conn.is_established();
        // Served early, it carries what an intermediary that forwards early data must add
        // (RFC 8470 §5.1), so that the service, and servers behind it, know; a head that
        // filled its map to the limit has no room for it, and waits like a refused one.
        let refused_early = early_data
            && !(self.settings.early_data_policy.allows(&head.request)
                && fields::mark_early_data(head.request.headers_mut()));
        if refused_early {
            tracing::debug!(stream_id = id, method = %head.request.method(), "request in early data: 425");
            // Blocked, the request is rejected unprocessed, which tells the client to send it
            // again as a 425 would (RFC 9114 §4.1.1).
            self.answer_without_service(conn, id, b"425", more_frames, code::H3_REQUEST_REJECTED);
            return;
        }
        let limits = Limits {
            recv_buffer: self.settings.request_body_buffer,
            send_buffer: self.settings.response_body_buffer,
        };
        // The client's view of the request's urgency (RFC 9218 §4); a PRIORITY_UPDATE or
        // the response's own `priority` field may change it later.
        let shared =
            StreamShared::new_incoming(id, Arc::clone(&self.notify), limits, head.content_length, !more_frames);
        // Not for a CONNECT: its 2xx is the answer to go on, and it owes no body.
        if more_frames && !tunnel && fields::expects_continue(head.request.headers()) {
            shared.owe_continue();
        }
        let priorities = head.request.headers().get_all(priority::FIELD);
        if priorities.iter().next().is_some() {
            shared.set_priority(conn, Priority::parse(priorities.iter().map(|v| v.as_bytes())));
        }
        if self.early_priority_updates > 0
            && let Ok(value) = self.h3().take_last_priority_update(id)
        {
            self.early_priority_updates -= 1;
            shared.set_priority(conn, Priority::parse([value.as_slice()]));
        }
        let mut request = head.request.map(|()| {
            if more_frames {
                RecvBody::new(Arc::clone(&shared))
            } else {
                RecvBody::empty()
            }
        });
        let info = self.info.clone();
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            stream_id = id,
            peer = %info.remote_addr,
            status = tracing::field::Empty,
        );
        request.extensions_mut().insert(info);
        request.extensions_mut().insert(RequestInfo {
            stream_id: id,
            early_data,
        });
        request.extensions_mut().insert(Informational {
            stream: Arc::clone(&shared),
        });
        if tunnel && more_frames {
            // What `Tunnel::from_request` reads, past request-body middleware.
            request
                .extensions_mut()
                .insert(crate::h3::tunnel::ConnectStream(Arc::clone(&shared)));
        }
        if tunnel {
            self.open_datagrams(conn, id, request.extensions_mut());
        }
        let (abort, registration) = AbortHandle::new_pair();
        let respond = super::dispatch::respond(self.service.clone(), request, Arc::clone(&shared));
        let future = AssertUnwindSafe(Abortable::new(respond, registration).instrument(span))
            .catch_unwind()
            .map(move |result| (id, result.is_err()));
        self.requests.push(Box::pin(future));
        self.streams.insert(
            id,
            Entry {
                shared,
                abort,
                responded: false,
                written: false,
                still_since: (0, Instant::now()),
                tunnel,
            },
        );
        self.idle_since = None;
        self.served += 1;
        if self
            .settings
            .max_requests_per_connection
            .is_some_and(|max| self.served >= max)
        {
            self.start_draining(conn, None);
        }
    }

    /// Gives a CONNECT stream its HTTP datagrams, unless they are off on either side (the
    /// client's SETTINGS may not have arrived yet: then sends wait for them to say).
    fn open_datagrams(&mut self, conn: &QuicheConnection, id: u64, extensions: &mut http::Extensions) {
        let Some(hub) = self.datagrams.as_mut() else {
            return;
        };
        let h3 = self.h3.as_ref().expect("created when established");
        if PeerDatagrams::of(h3, conn) == PeerDatagrams::Disabled {
            return;
        }
        if let Some(datagrams) = hub.open(id) {
            datagrams.into_extensions(extensions);
        }
    }

    /// Request streams that received bytes but have no head yet: their head is on its way
    /// (or never coming), and must complete within the head timeout from now. Every stream
    /// whose bytes start where its reader is (offset 0 for a new one) is readable in quiche
    /// before the HTTP/3 layer reads them; streams opened without such bytes (an empty
    /// frame, data behind a gap) are found by [`probe_silent_streams`](Self::probe_silent_streams).
    /// A stream we answered or refused is never readable again, as we stopped its receiving
    /// side.
    fn note_pending_heads(&mut self, conn: &mut QuicheConnection, now: Instant) {
        // Past our GOAWAY's limit a head gets no processing: it must not hold the close.
        let limit = self.draining.map_or(u64::MAX, |(limit, _)| limit);
        for id in conn.readable() {
            if id.is_multiple_of(4) && id < limit && !self.streams.contains_key(&id) {
                self.heads_pending.entry(id).or_insert(now);
            }
        }
    }

    /// Request streams quiche holds with nothing to read: IDs the client skipped, and IDs
    /// above the last head (up to the most the client can have open). Their head timeout
    /// runs from now.
    fn probe_silent_streams(&mut self, conn: &mut QuicheConnection, now: Instant) {
        let (streams, heads_pending) = (&self.streams, &mut self.heads_pending);
        self.skipped.retain(|&(id, _)| {
            if streams.contains_key(&id) {
                return false;
            }
            if stream::stream_alive(conn, id) {
                heads_pending.entry(id).or_insert(now);
                return false;
            }
            true
        });
        let limit = self.draining.map_or(u64::MAX, |(limit, _)| limit);
        let above = (self.next_stream..limit).step_by(4).take(self.probed_streams);
        for id in above {
            if stream::stream_alive(conn, id) && !self.streams.contains_key(&id) {
                self.heads_pending.entry(id).or_insert(now);
            }
        }
    }

    /// A head arrived on (or was refused for) stream `id`: the IDs below it the client
    /// skipped are remembered, to be looked for, and `id` itself is no longer one of them
    /// (an answered stream must never be taken for one still without its head).
    fn advance_next_stream(&mut self, id: u64) {
        if id < self.next_stream {
            if let Some(at) = self.skipped.iter().position(|&(s, _)| s == id) {
                self.skipped.swap_remove(at);
            }
            return;
        }
        if id == self.next_stream {
            // The usual case, nothing skipped: no clock read per request.
            self.next_stream = id + 4;
            return;
        }
        let now = Instant::now();
        if self.skipped.len() >= self.probed_streams {
            // Full of IDs skipped long ago that never came: those a head timeout old make
            // room, or a fresh one (a packet merely late) would not be remembered, and
            // would not hold a graceful close.
            let head_timeout = self.settings.request_head_timeout;
            self.skipped
                .retain(|&(_, since)| since.checked_add(head_timeout).is_none_or(|until| until > now));
        }
        let room = self.probed_streams.saturating_sub(self.skipped.len());
        let skipped = (self.next_stream..id)
            .step_by(4)
            .filter(|s| !self.heads_pending.contains_key(s))
            .take(room);
        self.skipped.extend(skipped.map(|id| (id, now)));
        self.next_stream = id + 4;
    }

    /// A PRIORITY_UPDATE for a request stream (RFC 9218 §7.1): it reorders what is sent.
    /// One for a stream whose head has not arrived stays with quiche (which keeps the last
    /// for each stream, up to its stream limit) until the head does: it overrides the
    /// head's own `priority` then.
    fn on_priority_update(&mut self, conn: &mut QuicheConnection, id: u64) {
        let head_to_come = id >= self.next_stream
            || self.heads_pending.contains_key(&id)
            || self.skipped.iter().any(|&(s, _)| s == id);
        if !self.streams.contains_key(&id) && head_to_come {
            self.early_priority_updates += 1;
            return;
        }
        if let Ok(value) = self.h3().take_last_priority_update(id) {
            let priority = Priority::parse([value.as_slice()]);
            match self.streams.get(&id) {
                Some(entry) => entry.shared.set_priority(conn, priority),
                None => priority.apply(conn, id),
            }
        }
    }

    fn on_data(&mut self, conn: &mut QuicheConnection, id: u64) {
        if !self.streams.contains_key(&id) {
            // A stream we no longer track (refused, or already answered): discard.
            let h3 = self.h3();
            stream::discard(h3, conn, id);
            return;
        }
        self.read_body(conn, id);
    }

    /// Reads a request body from quiche; a body that breaks the rules ends its stream (or the
    /// connection, for a frame out of sequence).
    fn read_body(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        let shared = Arc::clone(&entry.shared);
        match shared.read_from(self.h3.as_mut().expect("created when established"), conn, id) {
            Ok(true) => self.lists.read_again.push(id),
            Ok(false) => {}
            Err(failure) => self.on_read_failure(conn, id, failure),
        }
    }

    /// What a request body (or its trailers) that broke the rules costs: its stream, or the
    /// whole connection for a frame out of sequence (RFC 9114 §4.1).
    fn on_read_failure(&mut self, conn: &mut QuicheConnection, id: u64, failure: ReadFailure) {
        match failure {
            ReadFailure::Malformed(why) => self.end_stream(conn, id, Cancel::Malformed(why)),
            ReadFailure::FrameUnexpected => {
                tracing::debug!(
                    stream_id = id,
                    "a frame out of sequence (after the trailers, or after a CONNECT's head): H3_FRAME_UNEXPECTED"
                );
                self.fail_connection(conn, code::H3_FRAME_UNEXPECTED);
            }
            ReadFailure::Reset(code) => self.on_reset(conn, id, code),
            ReadFailure::Closed => self.end_stream(conn, id, Cancel::ConnectionClosed),
        }
    }

    fn on_finished(&mut self, conn: &mut QuicheConnection, id: u64) {
        if let Some(entry) = self.streams.get(&id) {
            if let Err(why) = entry.shared.on_finished() {
                self.end_stream(conn, id, Cancel::Malformed(why.0));
            } else {
                self.forget_if_done(conn, id);
            }
        } else if id.is_multiple_of(4) && (id >= self.next_stream || self.heads_pending.remove(&id).is_some()) {
            // The client finished a request stream before a complete HEADERS frame
            // (RFC 9114 §4.1: H3_REQUEST_INCOMPLETE).
            tracing::debug!(stream_id = id, "request stream ended without a complete head");
            self.refuse(conn, id, code::H3_REQUEST_INCOMPLETE);
            self.advance_next_stream(id);
        }
    }

    fn on_reset(&mut self, conn: &mut QuicheConnection, id: u64, code: u64) {
        if self.heads_pending.remove(&id).is_some() {
            self.refuse(conn, id, code::H3_REQUEST_CANCELLED);
            self.advance_next_stream(id);
            return;
        }
        if !self.streams.contains_key(&id) {
            return;
        }
        tracing::debug!(stream_id = id, code, "the client reset the request");
        self.end_stream(conn, id, Cancel::PeerReset(code));
    }

    /// The one way a request in flight ends early: its handler is cancelled, its reader and
    /// producer see why, and both directions of the stream are closed with the code the RFC
    /// gives for that reason.
    fn end_stream(&mut self, conn: &mut QuicheConnection, id: u64, why: Cancel) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        if let Cancel::Malformed(why) = why {
            tracing::debug!(stream_id = id, reason = why, "malformed request body");
        }
        entry.abort.abort();
        entry.shared.abort(conn, id, why);
        entry.written = true;
        self.forget_if_done(conn, id);
    }

    fn poll_requests(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) {
        while let Poll::Ready(Some((id, panicked))) = self.requests.poll_next_unpin(cx) {
            let Some(entry) = self.streams.get_mut(&id) else {
                continue;
            };
            entry.responded = true;
            if panicked {
                tracing::warn!(stream_id = id, "request handler panicked; resetting its stream");
                entry.shared.reset(code::H3_INTERNAL_ERROR);
            }
            self.service_stream(conn, id);
        }
    }

    /// Moves data between quiche and the stream's shared state, both ways.
    fn service_stream(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        let shared = Arc::clone(&entry.shared);
        shared.take_queued();
        if shared.wants_read() {
            self.read_body(conn, id);
        }
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        if !entry.written {
            let h3 = self.h3.as_mut().expect("created when established");
            match shared.write_to(h3, conn, id, &mut self.sent_since_check) {
                WriteOutcome::Pending => {}
                WriteOutcome::Complete => entry.written = true,
                WriteOutcome::Aborted | WriteOutcome::Stopped => {
                    // STOP_SENDING, or the handler failed: it has nothing more to do.
                    entry.abort.abort();
                    entry.written = true;
                }
            }
        }
        self.forget_if_done(conn, id);
    }

    /// Drops a stream's state once its response is written and its handler has ended.
    fn forget_if_done(&mut self, conn: &mut QuicheConnection, id: u64) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        // A request body someone still reads (the handler answered at once and reads on
        // elsewhere; one direction of a tunnel closed before the other) is delivered to its
        // end; the stall timer bounds a client that stops sending it.
        if !(entry.responded && entry.written && entry.shared.recv_settled()) {
            return;
        }
        let entry = self.streams.remove(&id).expect("present");
        if let Some(hub) = self.datagrams.as_mut() {
            hub.close(id);
        }
        // The response is complete and nobody reads the rest of the request: ask the client
        // to stop sending it (RFC 9114 §4.1).
        let stopped = entry.shared.stop_receiving(conn, id, code::H3_NO_ERROR);
        if stream::stream_alive(conn, id) {
            self.lingering
                .push((id, stopped.then(|| Instant::now() + LINGER_UNFINISHED)));
        }
        if !entry.shared.h3_saw_both_ends() {
            self.forget_in_h3_once_gone(conn, id);
        }
        if self.streams.is_empty() {
            // Nothing in flight: the tables go once that lasts (`RELEASE_TABLES_AFTER`).
            self.idle_since = Some(Instant::now());
        }
    }

    /// When an idle connection releases its stream tables, if it holds any.
    fn tables_release(&self) -> Option<Instant> {
        let held = self.streams.capacity() > 0 || self.heads_pending.capacity() > 0;
        self.idle_since.filter(|_| held).map(|t| t + self.release_tables_after)
    }

    /// An idle connection keeps no tables (the next request allocates what it needs again),
    /// nor streams quiche's HTTP/3 layer keeps that the transport has let go.
    fn release_tables(&mut self, conn: &mut QuicheConnection) {
        if self.streams.is_empty() {
            self.streams = StreamIdMap::default();
        }
        if self.heads_pending.is_empty() {
            self.heads_pending = StreamIdMap::default();
        }
        if let Some(h3) = self.h3.as_mut() {
            self.h3_leftovers.prune(h3, conn);
        }
    }

    /// Whether an answered stream may still be delivering its response: quiche holds it, and
    /// the peer finished its side (or was asked to stop only moments ago).
    fn still_delivering(conn: &mut QuicheConnection, id: u64, wait_until: Option<Instant>, now: Instant) -> bool {
        stream::stream_alive(conn, id) && (wait_until.is_none_or(|at| now < at) || conn.stream_finished(id))
    }

    fn start_draining(&mut self, conn: &mut QuicheConnection, deadline: Option<Instant>) {
        if let Some((_, current)) = &mut self.draining {
            // Already draining (a request cap, the idle timeout): a server shutdown that
            // comes later still bounds it, whichever deadline is sooner.
            *current = match (*current, deadline) {
                (Some(current), Some(new)) => Some(current.min(new)),
                (current, new) => current.or(new),
            };
            return;
        }
        let limit = self.next_stream;
        self.draining = Some((limit, deadline));
        self.goaway_unsent = true;
        // A bound for a GOAWAY that finds no room (see `send_goaway`): the close goes
        // without it then, as a connection that idles out would.
        self.close_not_before = Some(Instant::now() + self.settings.connection_idle_timeout);
        self.send_goaway(conn);
    }

    /// Sends the GOAWAY of `draining`, if it has not gone yet. quiche writes it whole or
    /// not at all: with the congestion window full (a bulk response in flight) or the
    /// client's credit for our control stream spent, it has no room, and the next turns
    /// try again (the close waits for it, up to the bound `start_draining` set). Once it
    /// has gone, the close comes no sooner than two round trips later.
    fn send_goaway(&mut self, conn: &mut QuicheConnection) {
        let (Some((limit, _)), Some(h3)) = (self.draining, self.h3.as_mut()) else {
            return;
        };
        if !self.goaway_unsent {
            return;
        }
        match h3.send_goaway(conn, limit) {
            Err(quiche::h3::Error::StreamBlocked) => return,
            Ok(()) => tracing::debug!(last_stream = limit, "GOAWAY sent"),
            Err(e) => tracing::debug!(error = %e, "GOAWAY not sent"),
        }
        self.goaway_unsent = false;
        let rtt = conn.path_stats().next().map_or(Duration::ZERO, |p| p.rtt);
        self.close_not_before = Some(Instant::now() + (rtt * 2).clamp(GOAWAY_GRACE_MIN, GOAWAY_GRACE_MAX));
    }

    /// Tries again to write each answered stream with output still queued: quiche does not
    /// always say when such a stream can move (a head that did not fit may fit now; a
    /// stream the peer stopped may be gone), and the close waits for them.
    fn look_at_unwritten_streams(&mut self, conn: &mut QuicheConnection) {
        let unwritten: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, entry)| entry.responded && !entry.written)
            .map(|(&id, _)| id)
            .collect();
        for id in unwritten {
            self.service_stream(conn, id);
        }
    }

    /// Ends requests whose peer stalled: a head not complete within the head timeout, a body
    /// with no progress within the stall timeout while the peer owes bytes.
    fn check_stream_timers(&mut self, conn: &mut QuicheConnection, now: Instant) {
        self.probe_silent_streams(conn, now);
        let head_timeout = self.settings.request_head_timeout;
        let late_heads: Vec<u64> = self
            .heads_pending
            .iter()
            .filter(|&(_, since)| *since + head_timeout <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late_heads {
            tracing::debug!(stream_id = id, "request head not complete within the head timeout");
            self.heads_pending.remove(&id);
            self.refuse(conn, id, code::H3_REQUEST_REJECTED);
            self.advance_next_stream(id);
        }
        self.heads_pending.retain(|&id, _| stream::stream_alive(conn, id));
        self.look_at_unwritten_streams(conn);
        let stall = self.settings.body_stall_timeout;
        // Whether the connection sent anything since the last look. A response that waits
        // for its turn while others go out (the congestion window is full, or the
        // connection's credit goes to more urgent streams or lower IDs first, RFC 9218)
        // waits on us, not on the peer: a long download must not get a small request
        // behind it reset. Responses sent and forgotten between two looks count too (a
        // steady run of short, more urgent ones); requests reset unanswered sent nothing.
        let sending = std::mem::take(&mut self.sent_since_check);
        let mut stalled = Vec::new();
        for (&id, entry) in &mut self.streams {
            let look = entry.shared.stall_look();
            let progress = look.progress;
            let waiting_on_peer = look.owed_body || (look.owed_credit && !sending);
            // An open tunnel (a 2xx answer to CONNECT) may sit idle; a CONNECT not yet
            // answered is held to the stall timeout like any request.
            let open_tunnel = entry.tunnel && entry.shared.answered_with_success();
            // A stream kept after its response only for the reader of its request body
            // (`forget_if_done`) is held to the stall timeout whoever stands still, the
            // client or a reader that holds the body without reading it.
            let waiting = waiting_on_peer || (entry.responded && entry.written);
            if open_tunnel || progress != entry.still_since.0 || !waiting {
                entry.still_since = (progress, now);
            } else if entry.still_since.1 + stall <= now {
                stalled.push(id);
            }
        }
        for id in stalled {
            tracing::debug!(stream_id = id, "no body progress within the stall timeout");
            self.end_stream(conn, id, Cancel::Stalled(code::H3_REQUEST_CANCELLED));
        }
    }

    fn poll_timers(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut QuicheConnection,
        now: Instant,
        linger_deadline: Option<Instant>,
    ) {
        let idle_deadline = self
            .idle_since
            .filter(|_| self.draining.is_none())
            .map(|t| t + self.settings.connection_idle_timeout);
        if idle_deadline.is_some_and(|d| d <= now) {
            // Close as a graceful shutdown does: GOAWAY, then close once what was answered
            // is delivered.
            tracing::debug!("no request within the connection idle timeout; closing");
            self.start_draining(conn, Some(now + self.settings.graceful_shutdown_timeout));
            cx.waker().wake_by_ref();
            return;
        }
        let drain_deadline = self.draining.and_then(|(_, d)| d);
        if drain_deadline.is_some_and(|d| d <= now) {
            tracing::debug!(
                in_flight = self.streams.len(),
                "graceful shutdown deadline passed; closing"
            );
            self.close(conn);
            return;
        }
        let due = self.next_stream_check.is_some_and(|at| at <= now);
        if due {
            let before = (self.heads_pending.len(), self.streams.len());
            self.check_stream_timers(conn, now);
            if (self.draining.is_some() || self.peer_goaway) && (self.heads_pending.len(), self.streams.len()) != before
            {
                // What held the close may have gone: the close check, which `process` ran
                // before the timers, looks again on the turn this wake brings.
                cx.waker().wake_by_ref();
            }
        }
        if self.tables_release().is_some_and(|at| at <= now) {
            self.release_tables(conn);
        }
        let tables_release = self.tables_release().filter(|&at| at > now);
        // Streams and heads in flight are checked a few times per timeout. With none, a look
        // once per head timeout still finds request streams with nothing readable (bytes
        // behind a gap) that an idle connection would otherwise keep until it idles out.
        let settings = &self.settings;
        let every = if self.streams.is_empty() && self.heads_pending.is_empty() {
            settings.request_head_timeout
        } else {
            settings.request_head_timeout.min(settings.body_stall_timeout) / TIMER_CHECKS_PER_TIMEOUT
        };
        let next = now + every;
        self.next_stream_check = Some(match self.next_stream_check {
            Some(at) if !due => at.min(next),
            _ => next,
        });
        // Every deadline here lies in the future: one in the past would wake the task at
        // once, forever.
        let Some(at) = [
            idle_deadline,
            drain_deadline,
            self.next_stream_check,
            linger_deadline,
            tables_release,
        ]
        .into_iter()
        .flatten()
        .filter(|&at| at > now)
        .min() else {
            return;
        };
        if self.timer_at != Some(at) {
            self.timer.as_mut().reset(at.into());
            self.timer_at = Some(at);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }

    fn close(&mut self, conn: &mut QuicheConnection) {
        if !self.closing {
            self.closing = true;
            let _ = conn.close(true, code::H3_NO_ERROR, b"");
        }
    }
}

/// `lingering` is not pruned below this length.
const LINGERING_PRUNE_MIN: usize = 64;

/// The fewest request stream IDs looked for beyond the last head: twice the default limit
/// of concurrent request streams.
const MIN_PROBED_STREAMS: usize = 256;

impl<S: HttpService<RecvBody>> stream::StreamOwner for ServerApp<S> {
    fn poll_events(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        ServerApp::poll_events(self, conn)
    }
    fn poll_tasks(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) {
        self.poll_requests(cx, conn);
    }
    fn notify(&self) -> &ConnNotify {
        &self.notify
    }
    fn round_lists(&mut self) -> &mut stream::RoundLists {
        &mut self.lists
    }
    fn is_tracked(&self, id: u64) -> bool {
        self.streams.contains_key(&id)
    }
    fn urgency(&self, id: u64) -> u8 {
        self.streams.get(&id).map_or(3, |e| e.shared.urgency())
    }
    fn service_stream(&mut self, conn: &mut QuicheConnection, id: u64) {
        ServerApp::service_stream(self, conn, id);
    }
}

impl<S: HttpService<RecvBody>> Application for ServerApp<S> {
    fn accepts_early_data(&self) -> bool {
        true
    }

    fn on_early_data(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        self.start_h3(conn)
    }

    fn on_established(&mut self, conn: &mut QuicheConnection) -> Result<(), Error> {
        if self.h3.is_some() {
            // Started in early data.
            return Ok(());
        }
        self.start_h3(conn)
    }

    fn process(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), Error> {
        if self.h3.is_none() || self.closing {
            return Ok(());
        }
        if let Poll::Ready(deadline) = self.shutdown.as_mut().poll(cx) {
            self.shutdown = Box::pin(std::future::pending());
            self.start_draining(conn, deadline);
        }
        self.send_goaway(conn);
        let now = Instant::now();
        self.note_pending_heads(conn, now);
        stream::StreamOwner::run_rounds(self, cx, conn)?;
        if self.closing {
            return Ok(());
        }
        if let Some(hub) = self.datagrams.as_mut() {
            let peer = PeerDatagrams::of(self.h3.as_ref().expect("created when established"), conn);
            // The client may have opened at most the streams it finished (each below
            // `next_stream`) and as many again as it may have open at once: a datagram for a
            // stream beyond that names one it cannot have opened.
            hub.set_peer_stream_limit(
                self.next_stream
                    .saturating_add(self.max_concurrent_streams.saturating_add(1).saturating_mul(4)),
            );
            let unrouted = match hub.process(cx, conn, peer) {
                Ok(unrouted) => unrouted,
                Err(MalformedDatagram(why, code)) => {
                    tracing::debug!(reason = why, code, "malformed HTTP datagram: connection error");
                    self.fail_connection(conn, code);
                    return Ok(());
                }
            };
            for id in unrouted {
                // RFC 9297 §2: a datagram for a request whose method defines none (not a
                // CONNECT) ends that request; one for a stream not seen yet, or gone, is
                // dropped.
                if self.streams.get(&id).is_some_and(|entry| !entry.tunnel) {
                    tracing::debug!(stream_id = id, "an HTTP datagram on a request that takes none");
                    self.end_stream(conn, id, Cancel::StrayDatagram);
                }
            }
        }
        let mut linger_deadline = None;
        // Heads still arriving below the GOAWAY limit were promised processing: they hold
        // the close too (for at most the head timeout), as do IDs the client skipped below
        // it recently, whose packets may be late (`skipped`).
        if (self.draining.is_some() || self.peer_goaway) && self.streams.is_empty() && self.requests.is_empty() && {
            self.heads_pending.retain(|&id, _| stream::stream_alive(conn, id));
            self.heads_pending.is_empty()
        } {
            self.lingering
                .retain(|&(id, wait_until)| Self::still_delivering(conn, id, wait_until, now));
            let goaway_out = self.close_not_before.is_none_or(|at| at <= now);
            let head_timeout = self.settings.request_head_timeout;
            let skipped_hold = self
                .draining
                .and_then(|(limit, _)| {
                    let below = self.skipped.iter().filter(|&&(id, _)| id < limit);
                    below.filter_map(|&(_, since)| since.checked_add(head_timeout)).max()
                })
                .filter(|&at| at > now);
            if self.lingering.is_empty() && goaway_out && skipped_hold.is_none() {
                tracing::debug!("no request in flight after GOAWAY; closing");
                self.close(conn);
                return Ok(());
            }
            // Streams the peer has not finished stop counting then: look again.
            linger_deadline = self
                .lingering
                .iter()
                .filter_map(|&(_, wait_until)| wait_until)
                .chain(self.close_not_before)
                .chain(skipped_hold)
                .filter(|&at| at > now)
                .min();
        } else if self.lingering.len() > self.lingering_prune_at {
            // Pruned when it has doubled since the last time: amortised, a few lookups per
            // answered stream, however many the peer leaves unfinished.
            self.lingering.retain(|&(id, _)| stream::stream_alive(conn, id));
            self.lingering_prune_at = (self.lingering.len() * 2).max(LINGERING_PRUNE_MIN);
        }
        self.poll_timers(cx, conn, now, linger_deadline);
        Ok(())
    }

    /// `process` acts on what each turn brings in the same call: heads before the rounds,
    /// the closing checks and timers after them; the rounds and the datagram hub wake the
    /// task when they stop with work left.
    fn repeat_after_progress(&self) -> bool {
        false
    }

    fn on_closed(&mut self, _conn: &mut QuicheConnection, error: Option<&Error>) {
        // Whatever is still in flight ends here: bodies see the connection gone.
        for (_, entry) in self.streams.drain() {
            entry.abort.abort();
            entry.shared.cancel(Cancel::ConnectionClosed);
        }
        if let Some(hub) = self.datagrams.as_mut() {
            hub.close_all();
        }
        if let Some(error) = error {
            tracing::debug!(%error, "HTTP/3 connection closed");
        }
    }
}

#[cfg(feature = "__bench")]
pub(crate) mod bench;
#[cfg(test)]
mod tests;
