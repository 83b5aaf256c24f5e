//! The HTTP/3 server side of one connection: an [`Application`] on the QUIC layer that turns
//! request streams into `http::Request`s, runs the service for each inside the connection's
//! task, and writes responses back.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Buf;
use futures_util::FutureExt;
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use http_body::Body;
use quiche::h3;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tower_service::Service;
use tracing::Instrument;

use super::{ConnectionInfo, Informational, Settings};
use crate::body::RecvBody;
use crate::conn::Application;
use crate::error::{BoxError, Error};
use crate::headers::{self, request_from_fields, trailers_from_fields};
use crate::stream::{self, ConnNotify, StreamShared, WriteOutcome, code};

type RequestFuture = Pin<Box<dyn Future<Output = (u64, bool)> + Send>>;

struct Entry {
    shared: Arc<StreamShared>,
    abort: AbortHandle,
    /// The request's future has ended (response queued, or aborted, or panicked).
    responded: bool,
    /// Everything queued is written (or the stream was abandoned).
    written: bool,
}

pub(crate) struct ServerApp<S> {
    service: S,
    settings: Arc<Settings>,
    info: ConnectionInfo,
    h3: Option<h3::Connection>,
    streams: HashMap<u64, Entry>,
    requests: FuturesUnordered<RequestFuture>,
    notify: Arc<ConnNotify>,
    ready: Vec<u64>,
    /// Resolves with the drain deadline when the server shuts down.
    shutdown: Pin<Box<dyn Future<Output = Option<Instant>> + Send>>,
    /// GOAWAY sent: the stream ID from which requests are refused, and the deadline.
    draining: Option<(u64, Option<Instant>)>,
    next_stream: u64,
    peer_goaway: bool,
    served: u64,
    idle_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    closing: bool,
    /// Answered streams quiche may still be delivering; a graceful close waits for them.
    lingering: Vec<u64>,
    _alive: mpsc::Sender<()>,
}

impl<S, B> ServerApp<S>
where
    S: Service<Request<RecvBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Buf + Send,
    B::Error: Into<BoxError>,
{
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
            streams: HashMap::new(),
            requests: FuturesUnordered::new(),
            notify: Arc::new(ConnNotify::default()),
            ready: Vec::new(),
            shutdown,
            draining: None,
            next_stream: 0,
            peer_goaway: false,
            served: 0,
            idle_since: Some(Instant::now()),
            timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            timer_at: None,
            closing: false,
            lingering: Vec::new(),
            _alive: alive,
        }
    }

    fn poll_events(&mut self, conn: &mut quiche::Connection) -> Result<(), Error> {
        loop {
            let h3 = self.h3.as_mut().expect("created when established");
            match h3.poll(conn) {
                Ok((id, h3::Event::Headers { list, more_frames })) => self.on_headers(conn, id, list, more_frames),
                Ok((id, h3::Event::Data)) => self.on_data(conn, id),
                Ok((id, h3::Event::Finished)) => self.on_finished(conn, id),
                Ok((id, h3::Event::Reset(code))) => self.on_reset(conn, id, code),
                Ok((_, h3::Event::PriorityUpdate)) => {}
                Ok((_, h3::Event::GoAway)) => {
                    tracing::debug!("the client sent GOAWAY");
                    self.peer_goaway = true;
                }
                Err(h3::Error::Done) => return Ok(()),
                Err(e) => {
                    // A connection error: quiche has usually closed the connection already.
                    tracing::debug!(error = %e, "HTTP/3 connection error");
                    if conn.local_error().is_none() {
                        let _ = conn.close(true, stream::h3_wire_code(&e), b"");
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Resets both directions of a stream with an HTTP/3 error code.
    fn refuse(conn: &mut quiche::Connection, id: u64, code: u64) {
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code);
    }

    fn on_headers(&mut self, conn: &mut quiche::Connection, id: u64, list: Vec<h3::Header>, more_frames: bool) {
        if let Some(entry) = self.streams.get(&id) {
            // A second HEADERS frame: the request's trailers.
            let trailers = trailers_from_fields(&list);
            entry.shared.update(|s| {
                match trailers {
                    Ok(t) => s.recv_trailers = Some(t),
                    Err(why) => s.recv_error = Some(stream::RecvError::Malformed(why.0)),
                }
                stream::wake_reader(s);
                ((), false)
            });
            self.reject_if_malformed(conn, id);
            return;
        }
        if !id.is_multiple_of(4) {
            return;
        }
        if self.draining.is_some_and(|(limit, _)| id >= limit) {
            // After our GOAWAY: not processed, safe for the client to retry (RFC 9114 §5.2).
            Self::refuse(conn, id, code::H3_REQUEST_REJECTED);
            return;
        }
        self.next_stream = self.next_stream.max(id + 4);
        if headers::section_size(&list) > self.settings.max_header_list_size {
            tracing::debug!(stream_id = id, "request header section too large: 431");
            let fields = [
                h3::Header::new(b":status", b"431"),
                h3::Header::new(b"content-length", b"0"),
            ];
            let h3 = self.h3.as_mut().expect("created when established");
            if h3.send_response(conn, id, &fields, true).is_err() {
                Self::refuse(conn, id, code::H3_EXCESSIVE_LOAD);
            } else if more_frames {
                let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code::H3_NO_ERROR);
            }
            return;
        }
        let head = match request_from_fields(&list) {
            Ok(head) => head,
            Err(why) => {
                tracing::debug!(stream_id = id, reason = %why, "malformed request");
                Self::refuse(conn, id, code::H3_MESSAGE_ERROR);
                return;
            }
        };
        if !more_frames && head.content_length.is_some_and(|len| len > 0) {
            tracing::debug!(stream_id = id, "request ended before its content-length");
            Self::refuse(conn, id, code::H3_MESSAGE_ERROR);
            return;
        }
        let shared = StreamShared::new(
            id,
            Arc::clone(&self.notify),
            self.settings.request_body_buffer,
            self.settings.response_body_buffer,
            head.content_length,
            !more_frames,
        );
        let mut request = head.request.map(|()| {
            if more_frames {
                RecvBody::new(Arc::clone(&shared))
            } else {
                RecvBody::empty()
            }
        });
        let mut info = self.info.clone();
        info.stream_id = Some(id);
        info.early_data = conn.is_in_early_data();
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            stream_id = id,
            peer = %info.remote_addr,
            status = tracing::field::Empty,
        );
        request.extensions_mut().insert(info);
        request.extensions_mut().insert(Informational {
            stream: Arc::clone(&shared),
        });
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

    fn on_data(&mut self, conn: &mut quiche::Connection, id: u64) {
        let h3 = self.h3.as_mut().expect("created when established");
        let Some(entry) = self.streams.get(&id) else {
            // A stream we no longer track (refused, or already answered): discard.
            stream::discard(h3, conn, id);
            return;
        };
        let wake = {
            let mut s = entry.shared.lock();
            s.data_pending = true;
            stream::read_in(h3, conn, id, &mut s)
        };
        if wake {
            entry.shared.update(|s| {
                stream::wake_reader(s);
                ((), false)
            });
        }
        self.reject_if_malformed(conn, id);
    }

    fn on_finished(&mut self, conn: &mut quiche::Connection, id: u64) {
        if let Some(entry) = self.streams.get(&id) {
            entry.shared.update(|s| {
                stream::finish_in(s);
                stream::wake_reader(s);
                ((), false)
            });
            self.reject_if_malformed(conn, id);
        } else if id.is_multiple_of(4) && id >= self.next_stream {
            // The client finished a request stream before a complete HEADERS frame
            // (RFC 9114 §4.1: H3_REQUEST_INCOMPLETE).
            tracing::debug!(stream_id = id, "request stream ended without a complete head");
            Self::refuse(conn, id, 0x10d);
            self.next_stream = id + 4;
        }
    }

    /// A body that broke its content-length (or sent bad trailers) is a malformed message:
    /// the stream gets H3_MESSAGE_ERROR and the handler is cancelled (RFC 9114 §4.1.2).
    fn reject_if_malformed(&mut self, conn: &mut quiche::Connection, id: u64) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        let malformed = matches!(entry.shared.lock().recv_error, Some(stream::RecvError::Malformed(_)));
        if !malformed || entry.written {
            return;
        }
        tracing::debug!(stream_id = id, "malformed request body");
        Self::refuse(conn, id, code::H3_MESSAGE_ERROR);
        entry.abort.abort();
        entry.written = true;
        entry.shared.update(|s| {
            s.cancelled = Some(code::H3_MESSAGE_ERROR);
            s.out.done = true;
            ((), false)
        });
        self.forget_if_done(conn, id);
    }

    fn on_reset(&mut self, conn: &mut quiche::Connection, id: u64, code: u64) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        tracing::debug!(stream_id = id, code, "the client reset the request");
        entry.abort.abort();
        entry.written = true;
        entry.shared.update(|s| {
            s.recv_error = Some(stream::RecvError::Reset(code));
            s.cancelled = Some(code);
            s.out.done = true;
            stream::wake_reader(s);
            ((), false)
        });
        let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code::H3_REQUEST_CANCELLED);
        self.forget_if_done(conn, id);
    }

    fn poll_requests(&mut self, cx: &mut Context<'_>, conn: &mut quiche::Connection) {
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
    fn service_stream(&mut self, conn: &mut quiche::Connection, id: u64) {
        let Some(entry) = self.streams.get_mut(&id) else {
            return;
        };
        let h3 = self.h3.as_mut().expect("created when established");
        let shared = Arc::clone(&entry.shared);
        let mut s = shared.lock();
        s.queued = false;
        if (s.data_pending || s.body_dropped) && stream::read_in(h3, conn, id, &mut s) {
            stream::wake_reader(&mut s);
        }
        if !entry.written {
            if let Err(quiche::Error::StreamStopped(code)) = conn.stream_capacity(id) {
                // STOP_SENDING: the client wants no more of this response. quiche resets
                // our side; the handler stops.
                tracing::debug!(stream_id = id, code, "the client stopped reading the response");
                s.cancelled = Some(code);
                s.out.done = true;
                if let Some(w) = s.send_waker.take() {
                    w.wake();
                }
                entry.abort.abort();
                entry.written = true;
            } else {
                match stream::write_out(h3, conn, id, &mut s) {
                    WriteOutcome::Pending => {}
                    WriteOutcome::Complete | WriteOutcome::Aborted => entry.written = true,
                }
            }
        }
        drop(s);
        self.reject_if_malformed(conn, id);
        self.forget_if_done(conn, id);
    }

    /// Drops a stream's state once its response is written and its handler has ended.
    fn forget_if_done(&mut self, conn: &mut quiche::Connection, id: u64) {
        let Some(entry) = self.streams.get(&id) else {
            return;
        };
        if !(entry.responded && entry.written) {
            return;
        }
        let entry = self.streams.remove(&id).expect("present");
        self.lingering.push(id);
        let mut s = entry.shared.lock();
        if !s.recv_fin && s.recv_error.is_none() {
            // The response is complete without the rest of the request: ask the client to
            // stop sending it (RFC 9114 §4.1).
            let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code::H3_NO_ERROR);
            s.recv_error = Some(stream::RecvError::Closed);
            stream::wake_reader(&mut s);
        }
        if self.streams.is_empty() {
            self.idle_since = Some(Instant::now());
        }
    }

    fn start_draining(&mut self, conn: &mut quiche::Connection, deadline: Option<Instant>) {
        if let Some((_, current)) = &mut self.draining {
            if deadline.is_some() {
                *current = deadline;
            }
            return;
        }
        let limit = self.next_stream;
        tracing::debug!(last_stream = limit, "sending GOAWAY");
        if let Some(h3) = self.h3.as_mut() {
            let _ = h3.send_goaway(conn, limit);
        }
        self.draining = Some((limit, deadline));
    }

    fn poll_timers(&mut self, cx: &mut Context<'_>, conn: &mut quiche::Connection) {
        let now = Instant::now();
        let head_deadline = self.idle_since.map(|t| t + self.settings.request_head_timeout);
        let drain_deadline = self.draining.and_then(|(_, d)| d);
        if head_deadline.is_some_and(|d| d <= now) {
            tracing::debug!("no request within the request head timeout; closing");
            self.close(conn);
            return;
        }
        if drain_deadline.is_some_and(|d| d <= now) {
            tracing::debug!(
                in_flight = self.streams.len(),
                "graceful shutdown deadline passed; closing"
            );
            self.close(conn);
            return;
        }
        let Some(at) = [head_deadline, drain_deadline].into_iter().flatten().min() else {
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

    fn close(&mut self, conn: &mut quiche::Connection) {
        if !self.closing {
            self.closing = true;
            let _ = conn.close(true, code::H3_NO_ERROR, b"");
        }
    }
}

impl<S, B> stream::StreamOwner for ServerApp<S>
where
    S: Service<Request<RecvBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Buf + Send,
    B::Error: Into<BoxError>,
{
    fn poll_events(&mut self, conn: &mut quiche::Connection) -> Result<(), Error> {
        ServerApp::poll_events(self, conn)
    }
    fn poll_tasks(&mut self, cx: &mut Context<'_>, conn: &mut quiche::Connection) {
        self.poll_requests(cx, conn);
    }
    fn notify(&self) -> &ConnNotify {
        &self.notify
    }
    fn ready_buf(&mut self) -> &mut Vec<u64> {
        &mut self.ready
    }
    fn is_tracked(&self, id: u64) -> bool {
        self.streams.contains_key(&id)
    }
    fn service_stream(&mut self, conn: &mut quiche::Connection, id: u64) {
        ServerApp::service_stream(self, conn, id);
    }
}

impl<S, B> Application for ServerApp<S>
where
    S: Service<Request<RecvBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Buf + Send,
    B::Error: Into<BoxError>,
{
    fn on_established(&mut self, conn: &mut quiche::Connection) -> Result<(), Error> {
        let h3 = h3::Connection::with_transport(conn, &self.settings.h3_config)
            .map_err(|e| Error::application(stream::h3_wire_code(&e), format!("cannot start HTTP/3: {e}")))?;
        self.h3 = Some(h3);
        Ok(())
    }

    fn process(&mut self, cx: &mut Context<'_>, conn: &mut quiche::Connection) -> Result<(), Error> {
        if self.h3.is_none() || self.closing {
            return Ok(());
        }
        if self.draining.is_none()
            && let Poll::Ready(deadline) = self.shutdown.as_mut().poll(cx)
        {
            self.shutdown = Box::pin(std::future::pending());
            self.start_draining(conn, deadline);
        }
        stream::StreamOwner::run_rounds(self, cx, conn)?;
        if (self.draining.is_some() || self.peer_goaway) && self.streams.is_empty() && self.requests.is_empty() {
            self.lingering.retain(|&id| stream::stream_alive(conn, id));
            if self.lingering.is_empty() {
                tracing::debug!("no request in flight after GOAWAY; closing");
                self.close(conn);
                return Ok(());
            }
        } else if self.lingering.len() > 64 {
            self.lingering.retain(|&id| stream::stream_alive(conn, id));
        }
        self.poll_timers(cx, conn);
        Ok(())
    }

    fn on_closed(&mut self, _conn: &quiche::Connection, error: Option<&Error>) {
        // Whatever is still in flight ends here: bodies see the connection gone.
        for (_, entry) in self.streams.drain() {
            entry.abort.abort();
            entry.shared.update(|s| {
                if !s.recv_fin && s.recv_error.is_none() {
                    s.recv_error = Some(stream::RecvError::Closed);
                }
                s.cancelled.get_or_insert(code::H3_REQUEST_CANCELLED);
                stream::wake_reader(s);
                if let Some(w) = s.send_waker.take() {
                    w.wake();
                }
                ((), false)
            });
        }
        if let Some(error) = error {
            tracing::debug!(%error, "HTTP/3 connection closed");
        }
    }
}
