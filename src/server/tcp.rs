//! HTTP/1.1 and HTTP/2 over TLS on TCP, beside HTTP/3: browsers and most clients reach a
//! site over TCP first and learn of HTTP/3 from the `Alt-Svc` header added here. TLS runs
//! through `tokio-boring` with the HTTP/3 listener's certificate (and client CA, for mutual
//! TLS); connections are served by hyper-util's automatic HTTP/1.1 / HTTP/2 builder.
//!
//! This module also owns the TCP side's defences against slow and idle clients ([`Limits`]):
//! a cap on open connections, deadlines for the TLS handshake and for request heads, an
//! idle timeout, a stall timeout for responses the client does not take and for request
//! bodies it stops sending ([`TcpRequestBody`]), and HTTP/2 keep-alive pings, stream,
//! window and header limits. An upgraded HTTP/1.1 connection (a
//! WebSocket) is no longer hyper's, and keeps them through [`UpgradeLease`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use boring::ssl::{AlpnError, SslAcceptor, SslMethod};
use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tower_layer::Layer;
use tower_service::Service;

use super::ConnectionInfo;
use super::HttpService;
use crate::alt_svc::AltSvcLayer;
use crate::error::Error;
use crate::h3::body::RecvBody;
use crate::quic::ServerConfig;
use crate::server::dispatch::CallWhenReady;

/// The TCP side's limits, set through [`Builder`](super::Builder) (whose setters document
/// each default and why).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) header_read_timeout: Duration,
    /// How long a connection may have no request in flight (after its first) before it is
    /// closed: the server's `connection_idle_timeout`.
    pub(crate) idle_timeout: Duration,
    /// How long a response may wait for the client to take what hyper has of it before the
    /// connection is closed, and a handler for request body bytes before its read fails:
    /// the server's `body_stall_timeout`.
    pub(crate) stall_timeout: Duration,
    /// After this many requests the connection shuts down gracefully: the server's
    /// `max_requests_per_connection`.
    pub(crate) max_requests: Option<u64>,
    pub(crate) max_connections: usize,
    pub(crate) http2_keep_alive_interval: Duration,
    pub(crate) http2_keep_alive_timeout: Duration,
    pub(crate) http2_max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            max_requests: None,
            max_connections: 10_000,
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(20),
            http2_max_concurrent_streams: 128,
        }
    }
}

/// How many streams' windows an HTTP/2 connection's window holds (see `Transport::new`).
const H2_STREAMS_PER_CONNECTION_WINDOW: u32 = 4;

/// An HTTP/2 flow-control window of `bytes`, within what HTTP/2 allows (RFC 9113 §6.9.1).
fn h2_window(bytes: u64) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX).clamp(65_535, (1 << 31) - 1)
}

/// hyper refuses an HTTP/1 read buffer smaller than this.
const MIN_HTTP1_BUFFER: usize = 8 * 1024;

/// Everything the TCP side needs besides the socket and the service, prepared (and its
/// configuration errors reported) before serving starts.
pub(crate) struct Transport {
    acceptor: SslAcceptor,
    http: HttpSettings,
    limits: Limits,
    handshakes: Arc<crate::quic::limits::Limits>,
}

/// What hyper's connection builder is made of. A builder is made per connection: its
/// executor counts the connection's own tasks ([`ConnExecutor`]).
#[derive(Clone, Copy)]
struct HttpSettings {
    max_header_list_size: usize,
    /// Response bytes an HTTP/2 stream may buffer for the client's window: the server's
    /// `response_body_buffer`, as an HTTP/3 stream's (hyper's default is 400 KiB).
    send_buffer: usize,
    stream_window: u32,
    connection_window: u32,
    connect_protocol: bool,
}

impl HttpSettings {
    fn builder(&self, limits: &Limits, executor: ConnExecutor) -> auto::Builder<ConnExecutor> {
        let mut http = auto::Builder::new(executor);
        // Without a timer hyper silently ignores its timeouts and keep-alive settings.
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // The head must fit in the read buffer (hyper answers 431 otherwise), so this
            // bounds an HTTP/1.1 head as `max_header_list_size` bounds the others, instead
            // of hyper's default of about 400 KiB per connection. (hyper also takes at most
            // 100 fields in an HTTP/1.1 head; raising that costs every request a heap
            // array of that many field slots.)
            .max_buf_size(self.max_header_list_size.max(MIN_HTTP1_BUFFER));
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.http2_keep_alive_interval)
            .keep_alive_timeout(limits.http2_keep_alive_timeout)
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            // HTTP/2 counts a header list as HTTP/3 does (RFC 9113 §6.5.2), so one limit
            // means the same on both.
            .max_header_list_size(u32::try_from(self.max_header_list_size).unwrap_or(u32::MAX))
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            // hyper takes at most u32::MAX (and asserts it).
            .max_send_buf_size(self.send_buffer.min(u32::MAX as usize));
        if self.connect_protocol {
            // RFC 8441, as SETTINGS_ENABLE_CONNECT_PROTOCOL does on HTTP/3.
            http.http2().enable_connect_protocol();
        }
        http
    }
}

/// hyper's executor for one connection: it spawns on tokio, as hyper-util's does, and
/// counts the connection's tasks that run ([`Activity::tasks`]): over HTTP/2 one per
/// stream until its response is sent, and one per tunnel (a CONNECT answered 2xx, a
/// WebSocket say) until the tunnel's sending side ends. So a connection whose tunnel is
/// open is not idle, and one whose tunnels have all ended is again.
#[derive(Clone)]
struct ConnExecutor(Arc<Activity>);

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let task = Task::new(&self.0);
        tokio::spawn(async move {
            let _task = task;
            future.await;
        });
    }
}

/// One of a connection's tasks, counted while it lives.
struct Task(Arc<Activity>);

impl Task {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.tasks.fetch_add(1, Ordering::AcqRel);
        Task(Arc::clone(activity))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // The time first: whoever sees the count fall sees when (the idle clock starts
        // when the last tunnel ended, as when the last response did).
        self.0.stamp(&self.0.last_end_ms);
        self.0.tasks.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Transport {
    /// TLS from the QUIC listener's configuration; HTTP limits from the server's builder.
    pub(crate) fn new(
        config: &ServerConfig,
        limits: &Limits,
        max_header_list_size: usize,
        response_body_buffer: usize,
        connect_protocol: bool,
    ) -> Result<Self, Error> {
        let transport = &config.config.inner.s;
        // HTTP/2 windows: a stream's as the QUIC listener's (1 MiB by default), the
        // connection's four of them (at most the QUIC listener's), where hyper's gives the
        // connection no more than one stream: a request whose handler has not started
        // reading its body would then leave the client no window for the other requests'
        // bodies, and their handlers, waiting for bytes the client may not send, would time
        // out. Four streams must so stall together to starve the rest, and a connection
        // holds at most four stream windows of unread bodies (4 MiB by default; a QUIC one
        // 16 MiB by default), however far QUIC's connection window is raised for uploads.
        let stream_window = h2_window(transport.initial_max_stream_data_bidi_remote);
        let http = HttpSettings {
            max_header_list_size,
            send_buffer: response_body_buffer,
            stream_window,
            connection_window: h2_window(transport.initial_max_data)
                .min(stream_window.saturating_mul(H2_STREAMS_PER_CONNECTION_WINDOW)),
            connect_protocol,
        };
        // Once a quarter of `tcp_max_connections` are in their TLS handshake, one client
        // address may have at most the QUIC listener's
        // `max_handshakes_in_progress_per_address` of them, so that one host opening
        // connections it never finishes cannot take every slot. No cap of their own
        // besides: the connection slots (`tcp_max_connections`, whose clients wait in the
        // listen backlog at the limit) bound them, and a TCP client that is closed on,
        // unlike a QUIC one whose Initial is dropped, does not try again.
        let mut handshake_caps = config.config.inner.server.clone();
        handshake_caps.max_connections = usize::MAX;
        handshake_caps.max_handshakes = limits.max_connections.max(1);
        Ok(Transport {
            acceptor: acceptor(config)?,
            http,
            limits: limits.clone(),
            handshakes: crate::quic::limits::Limits::new(&handshake_caps),
        })
    }
}

/// The protocols the TCP side speaks, in ALPN's wire form and our order of preference:
/// what the client offers (`quic::tls::TCP_ALPN`), and HTTP/1.0, which hyper serves too
/// (`curl --http1.0` offers it alone).
const SERVED_ALPN: &[u8] = b"\x02h2\x08http/1.1\x08http/1.0";

/// The TLS acceptor for the TCP side: the QUIC listener's certificate and key, its client
/// CA when it requires client certificates (mutual TLS), ALPN `h2`, `http/1.1` or
/// `http/1.0` ([`SERVED_ALPN`]; a client offering none of them is refused).
fn acceptor(config: &ServerConfig) -> Result<SslAcceptor, Error> {
    let tls = &config.config.inner.tls;
    let err =
        |what: &str, e: boring::error::ErrorStack| Error::config(format!("TLS setup for TCP failed ({what}): {e}"));
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| err("new acceptor", e))?;
    let leaf = tls
        .chain
        .first()
        .ok_or_else(|| Error::config("serving TCP needs the listener's certificate"))?;
    b.set_certificate(leaf).map_err(|e| err("certificate", e))?;
    for extra in &tls.chain[1..] {
        b.add_extra_chain_cert(extra.clone()).map_err(|e| err("chain", e))?;
    }
    let key = tls
        .key
        .as_ref()
        .ok_or_else(|| Error::config("serving TCP needs the listener's private key"))?;
    b.set_private_key(key).map_err(|e| err("private key", e))?;
    // The same client verification as the QUIC side: mutual TLS is meaningless if a client
    // without a certificate can reach the service over TCP instead.
    tls.verify_clients(&mut b).map_err(|e| err("client CA", e))?;
    // A client that offers protocols, none of them ours, is refused with
    // no_application_protocol (RFC 7301 §3.2), not served as if it had offered HTTP.
    b.set_alpn_select_callback(|_, client| {
        boring::ssl::select_next_proto(SERVED_ALPN, client).ok_or(AlpnError::ALERT_FATAL)
    });
    Ok(b.build())
}

/// What a TCP connection holds of the server while it is open, for whoever takes its
/// stream over after an HTTP/1.1 upgrade (hyper's connection task then ends): its slot among
/// `tcp_max_connections`, the server's liveness (a shutdown waits for it) and the shutdown
/// deadline it must end by. Without it a WebSocket over HTTP/1.1 would escape the limit
/// and outlive the server. An extension of every request on the TCP side.
#[derive(Clone)]
pub(crate) struct UpgradeLease {
    _slot: Arc<OwnedSemaphorePermit>,
    _alive: mpsc::Sender<()>,
    // Read by `run`, which only `ws` (the `axum` feature) calls for now.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    stop: watch::Receiver<Option<Instant>>,
}

#[cfg_attr(not(feature = "axum"), allow(dead_code))]
impl UpgradeLease {
    /// Runs `work` (what serves the upgraded stream) while holding the connection's slot,
    /// until it ends or the server's shutdown deadline passes (then it is dropped, as a
    /// connection is at that deadline).
    pub(crate) async fn run(mut self, work: impl Future<Output = ()>) {
        tokio::select! {
            () = work => {}
            () = deadline_passed(&mut self.stop) => tracing::debug!("upgraded connection closed at the shutdown deadline"),
        }
    }
}

/// Resolves once a shutdown has begun and its deadline has passed.
async fn deadline_passed(stop: &mut watch::Receiver<Option<Instant>>) {
    let at = stop.wait_for(Option::is_some).await.ok().and_then(|d| *d);
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Adds the request's [`ConnectionInfo`] (with its HTTP version) and the connection's
/// [`UpgradeLease`] before the service sees it, and tells the connection that a request
/// arrived.
#[derive(Clone)]
struct WithInfo<S> {
    inner: S,
    info: ConnectionInfo,
    lease: UpgradeLease,
    activity: Arc<Activity>,
}

/// What a TCP connection has in flight, for its timers.
///
/// - Idle: hyper bounds an HTTP/1.1 connection's wait for the next head, but nothing bounds
///   an HTTP/2 connection without streams, whose client need only answer PINGs to hold its
///   slot for ever.
/// - Stall: nothing in hyper bounds a response the client does not take (an HTTP/2
///   window left at zero, an HTTP/1.1 socket nobody reads): the request stays in flight
///   and its handler's state stays held for ever. A stall is a response waiting for hyper
///   to want more of it while nothing moves, as nginx's `send_timeout` times the gap
///   between two writes (see [`Activity::quiet`] for what moving is on each protocol).
///
/// Requests, response bodies and socket writes only note themselves (atomic operations and
/// a clock read): the timer looks when it is due, so nothing wakes the connection's task.
struct Activity {
    /// When the connection started: the base of the `_ms` clocks below.
    since: Instant,
    /// Requests whose response has not ended (its body dropped).
    in_flight: AtomicUsize,
    /// Requests so far, for `max_requests`.
    requests: AtomicU64,
    max_requests: u64,
    /// Set when `requests` reaches `max_requests`.
    request_limit_reached: Notify,
    /// When the last response ended (or the last of the connection's tasks, a tunnel say:
    /// [`Task`]), in milliseconds since `since`.
    last_end_ms: AtomicU64,
    /// When a request body last brought bytes: a handler still reading an upload after its
    /// response ended keeps the connection from idling.
    last_body_ms: AtomicU64,
    /// hyper's tasks of this connection that run ([`ConnExecutor`]): over HTTP/2 each
    /// stream's until its response is sent, and each tunnel's (a WebSocket, say: a CONNECT
    /// answered 2xx, whose response has no body to count) until it ends.
    tasks: AtomicUsize,
    /// Response bodies that handed hyper their head or a frame and have not been polled
    /// since: hyper polls a body again once it has room for more, so these wait for the
    /// client to take what was sent.
    bodies_waiting: AtomicUsize,
    /// When `bodies_waiting` last rose from zero.
    waiting_since_ms: AtomicU64,
    /// When a waiting body was last polled again: the client made room.
    last_taken_ms: AtomicU64,
    /// When the socket last took [`PROGRESS_BYTES`] since the time before ([`Metered`]).
    last_write_ms: AtomicU64,
    /// A request came over HTTP/2: socket writes then say nothing of the responses (see
    /// [`Activity::quiet`]).
    http2: AtomicBool,
    /// The body stall timeout, for request bodies ([`TcpRequestBody`]).
    stall_timeout: Duration,
    /// The runtime the connection runs on: request bodies' timers are made on it, whichever
    /// executor a handler polls them from.
    runtime: tokio::runtime::Handle,
}

/// How many bytes the socket must take for a write to count as the client reading: an
/// HTTP/2 connection writes a few dozen bytes for each PING (hyper's keep-alive, or the
/// client's own) and each SETTINGS, which must not keep a connection that carries no data.
const PROGRESS_BYTES: usize = 16 * 1024;

/// Why a connection's timer says it should close.
#[derive(Debug, PartialEq, Eq)]
enum Quiet {
    /// No request in flight for the idle timeout (or none at all within the head timeout).
    Idle,
    /// A response has waited for the client for the stall timeout, while nothing moved.
    Stalled,
}

/// How long a connection that sent no request within the head timeout has to take its
/// GOAWAY (over HTTP/2 a round trip: the GOAWAY, a PING and its acknowledgement) before it
/// is dropped.
const NO_REQUEST_GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// The shortest the timer sleeps between looks, however short the timeouts: a zero idle
/// timeout would otherwise wake a busy connection's task every millisecond.
const MIN_LOOK_EVERY: Duration = Duration::from_millis(10);

impl Activity {
    /// Called on the connection's runtime (whose handle it keeps).
    fn new(limits: &Limits) -> Self {
        Activity {
            since: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            max_requests: limits.max_requests.unwrap_or(u64::MAX),
            request_limit_reached: Notify::new(),
            last_end_ms: AtomicU64::new(0),
            last_body_ms: AtomicU64::new(0),
            tasks: AtomicUsize::new(0),
            bodies_waiting: AtomicUsize::new(0),
            waiting_since_ms: AtomicU64::new(0),
            last_taken_ms: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            stall_timeout: limits.stall_timeout,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Sets `clock` to now, unless a later time is there already (two threads stamping at
    /// once must not move it back).
    fn stamp(&self, clock: &AtomicU64) {
        clock.fetch_max(self.now_ms(), Ordering::AcqRel);
    }

    /// When a response last moved, in milliseconds since `since`, given when it was last
    /// `taken` after a frame (hyper polled it again): over HTTP/1.x also when the socket
    /// last took [`PROGRESS_BYTES`] (see [`Activity::quiet`]). HTTP/1.x answers one request
    /// at a time, so those writes are its response's, but for the tail of the one before
    /// (hyper reads a pipelined request while it still flushes up to its write buffer of
    /// the last response), which may so count for the next one's body once.
    fn moved_ms(&self, taken: &AtomicU64) -> u64 {
        let taken = taken.load(Ordering::Acquire);
        if self.http2.load(Ordering::Acquire) {
            taken
        } else {
            taken.max(self.last_write_ms.load(Ordering::Acquire))
        }
    }

    fn at_ms(&self, ms: &AtomicU64) -> Instant {
        self.since + Duration::from_millis(ms.load(Ordering::Acquire))
    }

    /// A request arrived: counted in flight until its response body is dropped. The flag
    /// says whether it is the last one `max_requests` allows.
    fn start(self: &Arc<Self>, moved_ms: Option<Arc<AtomicU64>>) -> (InFlight, bool) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let last = self.requests.fetch_add(1, Ordering::AcqRel) + 1 == self.max_requests;
        if last {
            self.request_limit_reached.notify_one();
        }
        let in_flight = InFlight {
            activity: Arc::clone(self),
            moved_ms,
            waiting: false,
            after_head: false,
        };
        (in_flight, last)
    }

    fn end(&self) {
        // The time first: whoever sees the count fall sees when.
        self.stamp(&self.last_end_ms);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves when the connection should close, and says why. Looks a few times per stall
    /// timeout while waiting, so a stall is seen within 1.25 times it.
    ///
    /// - Stall: over HTTP/1.x a waiting body is taken as progress while the socket takes
    ///   bytes, [`PROGRESS_BYTES`] at a time (hyper polls it again only once its frame is
    ///   out, however large). Over HTTP/2 writes do not count (a client can draw PING
    ///   acknowledgements at will): there the progress is a body polled again after one of
    ///   its frames, which hyper does once h2 has sent all but what the stream's window
    ///   covers of the frame before ([`Counted`] cuts frames to [`PROGRESS_BYTES`], so that
    ///   is often). The poll that follows a head is no progress: h2 polls a new body at once,
    ///   so a client's cheap requests would otherwise keep its stalled ones.
    /// - Idle: no response in flight and none of the connection's tasks running (a tunnel),
    ///   since the last response or task ended and the last request body bytes came
    ///   (`last_body_ms`). Only reported for a quiet spell that began at or after
    ///   `idle_from`. Once an HTTP/1.x connection has been asked to shut down (`closing`),
    ///   socket writes count as activity too: hyper drops a body once it has buffered its
    ///   last frame, which a slow reader may take long to drain.
    async fn quiet(&self, limits: &Limits, idle_from: Instant, closing: bool) -> Quiet {
        let look_every = limits.idle_timeout.min(limits.stall_timeout / 4).max(MIN_LOOK_EVERY);
        loop {
            let now = Instant::now();
            let mut next = now + look_every;
            if self.bodies_waiting.load(Ordering::Acquire) > 0 {
                let moved_ms = self
                    .waiting_since_ms
                    .load(Ordering::Acquire)
                    .max(self.moved_ms(&self.last_taken_ms));
                let stalled_at = self.since + Duration::from_millis(moved_ms) + limits.stall_timeout;
                if stalled_at <= now {
                    return Quiet::Stalled;
                }
                next = next.min(stalled_at);
            }
            if self.tasks.load(Ordering::Acquire) == 0 && self.in_flight.load(Ordering::Acquire) == 0 {
                let (mut quiet_since, limit) = if self.requests.load(Ordering::Acquire) > 0 {
                    let last_moved = self.at_ms(&self.last_end_ms).max(self.at_ms(&self.last_body_ms));
                    (last_moved, limits.idle_timeout)
                } else {
                    (self.since, limits.header_read_timeout)
                };
                if closing && !self.http2.load(Ordering::Acquire) {
                    quiet_since = quiet_since.max(self.at_ms(&self.last_write_ms));
                }
                let idle_at = quiet_since.max(idle_from) + limit;
                if idle_at <= now {
                    return Quiet::Idle;
                }
                next = next.min(idle_at);
            }
            tokio::time::sleep_until(next.into()).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// A TCP connection's TLS stream, noting in its [`Activity`] each time the socket has
    /// taken [`PROGRESS_BYTES`] more: what the timers count as the client reading.
    struct Metered<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
        // Taken since the last note.
        unnoted: usize,
    }
}

impl<S> Metered<S> {
    fn new(inner: S, activity: Arc<Activity>) -> Self {
        Metered {
            inner,
            activity,
            unnoted: 0,
        }
    }

    fn wrote(activity: &Activity, unnoted: &mut usize, written: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written {
            *unnoted += *n;
            if *unnoted >= PROGRESS_BYTES {
                *unnoted = 0;
                activity.stamp(&activity.last_write_ms);
            }
        }
    }
}

impl<S: AsyncRead> AsyncRead for Metered<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Metered<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write(cx, buf);
        Self::wrote(this.activity, this.unnoted, &written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write_vectored(cx, bufs);
        Self::wrote(this.activity, this.unnoted, &written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// One request in flight on a TCP connection, until its response body is dropped.
struct InFlight {
    activity: Arc<Activity>,
    /// When this request's response was last taken after a frame (as `last_taken_ms`, in
    /// milliseconds since `activity.since`), shared with its request body
    /// ([`TcpRequestBody`]); `None` for a request that came without one.
    moved_ms: Option<Arc<AtomicU64>>,
    /// Counted in `bodies_waiting`.
    waiting: bool,
    /// What it waits after is its head (see `polled`).
    after_head: bool,
}

impl InFlight {
    /// The response handed hyper its head (`head`) or a frame: it now waits for hyper to
    /// want more.
    fn handed_over(&mut self, head: bool) {
        self.after_head = head;
        if !self.waiting {
            self.waiting = true;
            let activity = &self.activity;
            // The time first: whoever sees the count rise sees when. (Should another body
            // stop waiting in between, leaving an older time here, its `polled` stamped
            // `last_taken_ms` meanwhile.)
            if activity.bodies_waiting.load(Ordering::Acquire) == 0 {
                activity.stamp(&activity.waiting_since_ms);
            }
            activity.bodies_waiting.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// `data` goes to hyper as a frame, and the body waits for hyper to want more. An empty
    /// frame is nothing taken: hyper polls again at once, whatever the window.
    fn hand_over<D: Buf>(&mut self, data: D) -> http_body::Frame<D> {
        if data.has_remaining() {
            self.handed_over(false);
        }
        http_body::Frame::data(data)
    }

    /// hyper polls the body: what it was handed has been taken (or buffered) after all.
    /// After a frame that is progress; after the head it is not (h2 polls a new body at
    /// once, whatever the windows).
    fn polled(&mut self) {
        if self.waiting {
            self.waiting = false;
            let activity = &self.activity;
            if !self.after_head {
                let now_ms = activity.now_ms();
                activity.last_taken_ms.fetch_max(now_ms, Ordering::AcqRel);
                if let Some(moved_ms) = &self.moved_ms {
                    moved_ms.fetch_max(now_ms, Ordering::AcqRel);
                }
            }
            activity.bodies_waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.waiting {
            self.activity.bodies_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        self.activity.end();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is dropped, and
    /// tells the connection's stall timer when it waits for the client. Over HTTP/2 it
    /// hands hyper data frames of at most [`PROGRESS_BYTES`], so that each poll says that
    /// much went out (see [`Activity::quiet`]).
    pub(crate) struct Counted<B: http_body::Body> {
        #[pin]
        body: B,
        in_flight: InFlight,
        // What is left of a frame being cut to size (copied out 16 KiB at a time: no copy
        // at all for `Bytes`).
        rest: Option<B::Data>,
        // Sent without its body (a HEAD's response over HTTP/2): it ends at once, and its
        // size hint still gives the `content-length` a GET would have.
        bodiless: bool,
    }
}

/// A data frame of a [`Counted`] body: as the body made it, or a piece of a larger one.
pub(crate) enum Piece<D> {
    Whole(D),
    Cut(Bytes),
}

impl<D: Buf> Buf for Piece<D> {
    fn remaining(&self) -> usize {
        match self {
            Piece::Whole(data) => data.remaining(),
            Piece::Cut(bytes) => bytes.remaining(),
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            Piece::Whole(data) => data.chunk(),
            Piece::Cut(bytes) => bytes.chunk(),
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        match self {
            Piece::Whole(data) => data.chunks_vectored(dst),
            Piece::Cut(bytes) => bytes.chunks_vectored(dst),
        }
    }

    fn advance(&mut self, cnt: usize) {
        match self {
            Piece::Whole(data) => data.advance(cnt),
            Piece::Cut(bytes) => bytes.advance(cnt),
        }
    }
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data: Buf>,
{
    type Data = Piece<B::Data>;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, B::Error>>> {
        let this = self.project();
        if *this.bodiless {
            return Poll::Ready(None);
        }
        this.in_flight.polled();
        if this.rest.is_none() {
            match std::task::ready!(this.body.poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    // Cut below, with what is left of an earlier one.
                    Ok(data)
                        if data.remaining() > PROGRESS_BYTES
                            && this.in_flight.activity.http2.load(Ordering::Acquire) =>
                    {
                        *this.rest = Some(data);
                    }
                    Ok(data) => return Poll::Ready(Some(Ok(this.in_flight.hand_over(Piece::Whole(data))))),
                    Err(frame) => return Poll::Ready(Some(Ok(frame.map_data(Piece::Whole)))),
                },
                other => return Poll::Ready(other.map(|frame| frame.map(|frame| frame.map_data(Piece::Whole)))),
            }
        }
        let rest = this.rest.as_mut().expect("an empty `rest` was filled above");
        let piece = rest.copy_to_bytes(rest.remaining().min(PROGRESS_BYTES));
        if !rest.has_remaining() {
            *this.rest = None;
        }
        Poll::Ready(Some(Ok(this.in_flight.hand_over(Piece::Cut(piece)))))
    }

    fn is_end_stream(&self) -> bool {
        self.bodiless || (self.rest.is_none() && self.body.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.body.size_hint();
        if let Some(rest) = &self.rest {
            let rest = rest.remaining() as u64;
            hint.set_lower(hint.lower().saturating_add(rest));
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(rest));
            }
        }
        hint
    }
}

/// A request body received over TCP, under the body stall timeout as HTTP/3 request bodies
/// are (hyper times the head, not the body): a handler that waits for bytes the client
/// does not send gets, once the timeout has passed without any, an error whose
/// `is_timeout()` is true, instead of waiting (and holding the connection's slot) for as
/// long as the client keeps its connection. What does not count:
/// - a client that sends slowly, and a handler that reads slowly: the clock runs from a
///   read that found nothing, and stops at the next bytes. hyper reads ahead of the
///   handler (a chunk over HTTP/1.1, the stream's window over HTTP/2), so bytes the client
///   sent while the handler was busy are there when it asks;
/// - a wait while the request's own response moves ([`InFlight::moved_ms`]; over
///   HTTP/1.x, while the socket takes it): a duplex exchange (a gRPC stream whose server
///   sends while its client is quiet) is no stall, as on HTTP/3 a stream's response moving
///   keeps its request. Other requests' responses do not count: a client could draw those
///   at will to keep any number of stalled bodies.
pub(crate) struct TcpRequestBody {
    body: Incoming,
    activity: Arc<Activity>,
    /// When this request's response last moved ([`InFlight::moved_ms`]).
    response_moved_ms: Arc<AtomicU64>,
    /// When the current wait for bytes runs out; kept between waits (reset, not
    /// reallocated), and made only for a body that ever waits.
    stalls_at: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deadline `stalls_at` is set for, in milliseconds since `activity.since`.
    armed_ms: u64,
    /// When the last read found nothing (milliseconds since `activity.since`); `None`
    /// while the body is not waiting.
    waiting_since_ms: Option<u64>,
}

impl TcpRequestBody {
    fn new(body: Incoming, activity: Arc<Activity>, response_moved_ms: Arc<AtomicU64>) -> Self {
        TcpRequestBody {
            body,
            activity,
            response_moved_ms,
            stalls_at: None,
            armed_ms: 0,
            waiting_since_ms: None,
        }
    }

    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, Error>>> {
        use http_body::Body as _;
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            self.waiting_since_ms = None;
            if matches!(&frame, Some(Ok(frame)) if frame.is_data())
                && self.activity.in_flight.load(Ordering::Acquire) == 0
            {
                // Bytes moving: the connection is not idle, though no response is in flight.
                // (While one is, the idle clock is not looked at, and it starts again from
                // that response's end, later than these bytes.)
                self.activity.stamp(&self.activity.last_body_ms);
            }
            return Poll::Ready(
                frame.map(|frame| frame.map_err(|e| Error::from_hyper(e, "the request body over TCP failed"))),
            );
        }
        let activity = &self.activity;
        let stall_ms = u64::try_from(activity.stall_timeout.as_millis()).unwrap_or(u64::MAX);
        let waiting_since_ms = *self.waiting_since_ms.get_or_insert_with(|| activity.now_ms());
        let mut fired = false;
        loop {
            let moved_ms = activity.moved_ms(&self.response_moved_ms);
            let stalls_at_ms = waiting_since_ms.max(moved_ms).saturating_add(stall_ms);
            // The timer is trusted once it has fired for this deadline (a paused or
            // advanced tokio clock runs ahead of `now_ms`'s).
            if stalls_at_ms <= activity.now_ms() || (fired && stalls_at_ms <= self.armed_ms) {
                return Poll::Ready(Some(Err(Error::new(crate::error::Kind::Timeout).with_message(
                    format!(
                        "the request body stalled: the client sent nothing more of it for the body stall timeout ({:?})",
                        activity.stall_timeout
                    ),
                ))));
            }
            let deadline = tokio::time::Instant::from_std(activity.since + Duration::from_millis(stalls_at_ms));
            let stalls_at = match &mut self.stalls_at {
                Some(stalls_at) => {
                    if self.armed_ms != stalls_at_ms {
                        stalls_at.as_mut().reset(deadline);
                    }
                    stalls_at
                }
                None => {
                    // The connection's runtime, whichever executor polls the body.
                    let _runtime = activity.runtime.enter();
                    self.stalls_at.insert(Box::pin(tokio::time::sleep_until(deadline)))
                }
            };
            self.armed_ms = stalls_at_ms;
            if stalls_at.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The deadline passed: look again, with the response's progress since.
            fired = true;
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    pub(crate) fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

/// hyper's service (called as each request head arrives), not tower's through hyper-util's
/// adapter: the adapter calls `call` only once the inner service is ready, and a request
/// waiting for a busy service (a concurrency limit, a buffer) was not counted until then,
/// so an HTTP/1.1 connection's head and idle timers cut it off as a connection with nothing
/// in flight. The request is counted here at once, and waits for the service in
/// [`CallWhenReady`], as over HTTP/3.
impl<S, B> hyper::service::Service<Request<Incoming>> for WithInfo<S>
where
    S: Service<Request<RecvBody>, Response = Response<B>> + Clone,
    B: http_body::Body,
{
    type Response = Response<Counted<B>>;
    type Error = S::Error;
    type Future = CountedResponse<S>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        // A request that came without a body (most do) gets an empty one: nothing to time,
        // so no shared clock to allocate.
        let (mut request, moved_ms) = if http_body::Body::is_end_stream(request.body()) {
            (request.map(|_| RecvBody::empty()), None)
        } else {
            let moved_ms = Arc::new(AtomicU64::new(0));
            let body = |body| TcpRequestBody::new(body, Arc::clone(&self.activity), Arc::clone(&moved_ms));
            (
                request.map(|incoming| RecvBody::tcp_request(body(incoming))),
                Some(moved_ms),
            )
        };
        let mut info = self.info.clone();
        info.version = request.version();
        if info.version == http::Version::HTTP_2 {
            self.activity.http2.store(true, Ordering::Release);
        }
        request.extensions_mut().insert(info);
        request.extensions_mut().insert(self.lease.clone());
        let connect = request.method() == http::Method::CONNECT;
        // An extended CONNECT over HTTP/2 (RFC 8441) carries its `:protocol` as over
        // HTTP/3, so a service looks for one extension whichever way it came.
        if connect && let Some(protocol) = request.extensions().get::<hyper::ext::Protocol>() {
            let protocol = crate::h3::fields::Protocol::new(protocol.as_str());
            request.extensions_mut().insert(protocol);
        }
        let (in_flight, last) = self.activity.start(moved_ms);
        CountedResponse {
            in_flight: Some(in_flight),
            connect,
            // hyper's HTTP/2 server sends whatever body a HEAD's response has (its HTTP/1.1
            // server does not): RFC 9110 §9.3.2 allows none.
            bodiless: request.method() == http::Method::HEAD && request.version() == http::Version::HTTP_2,
            // The connection shuts down after this request: over HTTP/1.x hyper does so
            // by itself after a response that says `connection: close`, where a graceful
            // shutdown from outside may come after the head has gone without it. (HTTP/2
            // gets its GOAWAY from the connection's task.)
            close_after: last && request.version() <= http::Version::HTTP_11,
            inner: CallWhenReady::new(self.inner.clone(), request),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way, its request counted in flight; its body takes the count over.
    pub(crate) struct CountedResponse<S: Service<Request<RecvBody>>> {
        #[pin]
        inner: CallWhenReady<S>,
        in_flight: Option<InFlight>,
        connect: bool,
        // The response goes without its body (a HEAD's over HTTP/2).
        bodiless: bool,
        close_after: bool,
    }
}

impl<S, B> Future for CountedResponse<S>
where
    S: Service<Request<RecvBody>, Response = Response<B>>,
    B: http_body::Body,
{
    type Output = Result<Response<Counted<B>>, S::Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // hyper logs the error; which step failed (`poll_ready` or `call`) is not kept.
        let result = std::task::ready!(this.inner.poll(cx)).map_err(|(_, e)| e);
        let mut in_flight = this.in_flight.take().expect("polled after completion");
        let connect = *this.connect;
        let bodiless = *this.bodiless;
        let close_after = *this.close_after;
        Poll::Ready(result.map(|mut response| {
            let tunnel = connect && response.status().is_success();
            // An upgrade or a tunnel hands the connection over: hyper keeps nothing of it,
            // and its body is not the response's data.
            let hands_over = tunnel || response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
            if !hands_over {
                // The head goes to the client now; hyper polls the body once it can send
                // some (over HTTP/2, once the stream has window).
                in_flight.handed_over(true);
                if close_after && !super::lists_token(response.headers(), http::header::CONNECTION, "close") {
                    // Beside whatever the service put there (not on an upgrade: `hands_over`).
                    response
                        .headers_mut()
                        .append(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                }
            }
            let status = response.status();
            if bodiless
                && !(status.is_informational()
                    || status == http::StatusCode::NO_CONTENT
                    || status == http::StatusCode::NOT_MODIFIED)
                && !response.headers().contains_key(http::header::CONTENT_LENGTH)
                && let Some(length) = http_body::Body::size_hint(response.body()).exact().filter(|&n| n > 0)
            {
                // Not an empty body's 0: a service that knows no length answers a HEAD
                // with an empty body (axum does), and 0 would be a wrong length (RFC 9110
                // §8.6); nor on a status without content.
                // What a GET would have had (hyper's HTTP/2 server takes it from the body's
                // size only when it sends the body).
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(length));
            }
            response.map(|body| Counted {
                body,
                in_flight,
                rest: None,
                bodiless,
            })
        }))
    }
}

/// The `Alt-Svc` each TCP connection's responses carry: the QUIC listener's port for the
/// address the client connected to (the same host name reaches both). A listener bound to
/// several addresses may have a port for each (port 0 given): the one of the connection's
/// IP, else of its family, else the first. Or one port for all, as configured
/// (`server::Builder::alt_svc_port`: a NAT or a container maps the UDP port).
pub(crate) struct AltSvcPorts(Vec<(SocketAddr, AltSvcLayer)>);

impl AltSvcPorts {
    /// For the QUIC listener's addresses (at least one), or one `port` for all.
    pub(crate) fn new(listener: &[SocketAddr], port: Option<u16>) -> Self {
        let layer = |addr: SocketAddr| (addr, AltSvcLayer::new(port.unwrap_or(addr.port())));
        match port {
            Some(_) => AltSvcPorts(vec![layer(listener[0])]),
            None => AltSvcPorts(
                listener
                    .iter()
                    .map(|&a| layer(crate::quic::canonical_addr(a)))
                    .collect(),
            ),
        }
    }

    /// The layer for a connection to `local` (canonical).
    fn for_address(&self, local: SocketAddr) -> &AltSvcLayer {
        let ports = &self.0;
        let found = ports
            .iter()
            .find(|(a, _)| a.ip() == local.ip())
            .or_else(|| ports.iter().find(|(a, _)| a.is_ipv4() == local.is_ipv4()))
            .unwrap_or(&ports[0]);
        &found.1
    }
}

/// Accepts TCP connections until `stop` carries a deadline, then lets the open ones finish
/// (hyper's graceful shutdown) until that deadline. Each connection holds an `alive`
/// sender, so the server's shutdown waits for them.
///
/// With `max_connections` open, it stops accepting until one closes rather than accepting
/// and closing at once: waiting connections queue in the kernel's listen backlog (bounded by
/// it) and are served as soon as a slot frees, so a burst of honest clients is delayed, not
/// refused, and a flood costs no accept, descriptor or task per attempt, nor invites instant
/// retries. The deadlines below keep slots held by stalling clients short-lived.
pub(crate) async fn run<S>(
    tcp: TcpListener,
    transport: Transport,
    service: S,
    alt_svc: AltSvcPorts,
    mut stop: watch::Receiver<Option<Instant>>,
    alive: mpsc::Sender<()>,
) where
    S: HttpService<RecvBody>,
{
    let listener_addr = tcp.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let Transport {
        acceptor,
        http,
        limits,
        handshakes,
    } = transport;
    let (acceptor, limits) = (Arc::new(acceptor), Arc::new(limits));
    let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        if slots.available_permits() == 0 {
            tracing::debug!(
                max_connections,
                "TCP connection limit reached; accepting again when one closes"
            );
        }
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            _ = stop.wait_for(Option::is_some) => break,
        };
        // The semaphore is never closed.
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted,
            _ = stop.wait_for(Option::is_some) => break,
        };
        let (stream, remote_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, usually: back off instead of spinning.
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A TCP connection proves its address. Its slot lives with the connection (it
        // also counts the address's connections, a share that never applies here: these
        // caps have no connection limit, `tcp_max_connections` is enforced apart).
        let mut handshake = match handshakes.admit(remote_addr.ip(), true) {
            Ok(slot) => slot,
            Err(_) => {
                tracing::debug!(peer = %remote_addr, "too many TLS handshakes in progress (from this address); TCP connection closed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = Arc::clone(&acceptor);
        // As over QUIC: the address the client connected to (not a wildcard the listener
        // is bound to), and IPv4 clients of a dual-stack socket as IPv4 addresses.
        let info = ConnectionInfo {
            remote_addr: crate::quic::canonical_addr(remote_addr),
            // (`getsockname` only for a wildcard: a bound address is the one.)
            local_addr: crate::quic::canonical_addr(if listener_addr.ip().is_unspecified() {
                stream.local_addr().unwrap_or(listener_addr)
            } else {
                listener_addr
            }),
            version: http::Version::HTTP_11,
        };
        let service = alt_svc.for_address(info.local_addr).layer(service.clone());
        let slot = Arc::new(slot);
        let lease = UpgradeLease {
            _slot: Arc::clone(&slot),
            _alive: alive.clone(),
            stop: stop.clone(),
        };
        let alive = alive.clone();
        let mut deadline = stop.clone();
        let limits = Arc::clone(&limits);
        let tls_handshake_timeout = limits.tls_handshake_timeout;
        let mut shutdown_begun = stop.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let _slot = slot;
            // A handshake still under way at the shutdown deadline ends there too: it would
            // otherwise serve requests after `serve` has returned.
            let handshake_done = tokio::select! {
                biased;
                () = deadline_passed(&mut deadline) => {
                    tracing::debug!(peer = %remote_addr, "TLS handshake still under way at the shutdown deadline; TCP connection closed");
                    return;
                }
                done = tokio::time::timeout(tls_handshake_timeout, tokio_boring::accept(&acceptor, stream)) => done,
            };
            let tls = match handshake_done {
                Ok(Ok(tls)) => {
                    handshake.established();
                    tls
                }
                Ok(Err(e)) => {
                    // A refused client certificate leaves its reason here; taking it also
                    // keeps it from being reported for a later connection on this thread.
                    let reason = crate::tls::take_verify_error();
                    tracing::debug!(peer = %remote_addr, error = %e, reason, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %remote_addr, "TLS handshake timed out");
                    return;
                }
            };
            // The connection's clocks start now: the first request's deadline is counted
            // from the end of the TLS handshake, as `tcp_header_read_timeout` says.
            let activity = Arc::new(Activity::new(&limits));
            let service = WithInfo {
                inner: service,
                info,
                lease,
                activity: Arc::clone(&activity),
            };
            let tls = Metered::new(tls, Arc::clone(&activity));
            let http = http.builder(&limits, ConnExecutor(Arc::clone(&activity)));
            let connection = http.serve_connection_with_upgrades(TokioIo::new(tls), service);
            let mut connection = std::pin::pin!(connection);
            // Once asked to shut down (GOAWAY over HTTP/2, `connection: close` over HTTP/1.1)
            // the connection finishes what is in flight and ends by itself.
            let mut closing = false;
            // The idle timer counts from here (a connection asked to close for idling gets
            // one more idle timeout to do so).
            let mut idle_from = activity.since;
            // A connection that never sent a request gets this long to take its GOAWAY.
            let mut goaway_grace: Option<Instant> = None;
            loop {
                let grace_over = async {
                    match goaway_grace {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // The deadline first: past it nothing more of the connection runs.
                    biased;
                    // Past the shutdown deadline the connection is dropped, whatever it was doing.
                    () = deadline_passed(&mut deadline) => {
                        tracing::debug!(peer = %remote_addr, "TCP connection closed at the shutdown deadline");
                        break;
                    }
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(peer = %remote_addr, error = %e, "TCP connection ended with an error");
                        }
                        break;
                    }
                    _ = shutdown_begun.wait_for(Option::is_some), if !closing => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        idle_from = Instant::now();
                    }
                    () = grace_over => {
                        if activity.requests.load(Ordering::Acquire) > 0 {
                            // A first request raced the GOAWAY, and was taken: it is let
                            // finish as any other on a closing connection.
                            goaway_grace = None;
                            continue;
                        }
                        tracing::debug!(peer = %remote_addr, "no request within the head timeout; TCP connection closed");
                        break;
                    }
                    () = activity.request_limit_reached.notified(), if !closing => {
                        // Over HTTP/1.x the last response says `connection: close` (or hands
                        // the connection over), and hyper closes after it: shutting down from
                        // here could come before its head and add `close` to a 101's
                        // `upgrade`. (Decided here, not in the branch's condition: that is
                        // read only when the loop comes round, before the first request.)
                        if activity.http2.load(Ordering::Acquire) {
                            tracing::debug!(peer = %remote_addr, "request limit reached; shutting the TCP connection down");
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                            idle_from = Instant::now();
                        }
                    }
                    // hyper times HTTP/1.1 heads only once it has chosen HTTP/1.1, and HTTP/2
                    // not at all: a client that sends nothing, or part of the HTTP/2 preface,
                    // would hold its connection forever. Its first request must come within
                    // the head timeout, and it may not go without a request in flight for
                    // longer than the idle timeout after. A client that does not take its
                    // responses is cut off after the stall timeout.
                    quiet = activity.quiet(&limits, idle_from, closing) => match quiet {
                        Quiet::Stalled => {
                            // The client takes nothing: a GOAWAY or close would wait behind
                            // what it does not read.
                            tracing::debug!(peer = %remote_addr, "a response waited for the client past the stall timeout; TCP connection closed");
                            break;
                        }
                        Quiet::Idle if closing => {
                            tracing::debug!(peer = %remote_addr, "TCP connection still open an idle timeout after it was asked to close; closed");
                            break;
                        }
                        Quiet::Idle if activity.requests.load(Ordering::Acquire) == 0 => {
                            // A GOAWAY too (a first request may be racing it), but only a
                            // moment to take it: this client has held its slot for a head
                            // timeout without asking for anything.
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                            idle_from = Instant::now();
                            goaway_grace = Some(idle_from + NO_REQUEST_GOAWAY_GRACE);
                        }
                        Quiet::Idle => {
                            // A GOAWAY first, so that a request racing the close is either
                            // served or known by the client to be unprocessed.
                            tracing::debug!(peer = %remote_addr, "no request in flight within the head or idle timeout; shutting the TCP connection down");
                            connection.as_mut().graceful_shutdown();
                            closing = true;
                            idle_from = Instant::now();
                        }
                    },
                }
            }
        });
    }
    drop(tcp);
}
