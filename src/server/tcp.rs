//! HTTP/1.1 and HTTP/2 over TLS on TCP, beside HTTP/3: browsers and most clients reach a
//! site over TCP first and learn of HTTP/3 from the `Alt-Svc` header added here. TLS runs
//! through `tokio-boring` with the HTTP/3 listener's certificate (and client CA, for mutual
//! TLS); connections are served by hyper-util's automatic HTTP/1.1 / HTTP/2 builder.
//!
//! This module also owns the TCP side's defences against slow and idle clients ([`Limits`]):
//! a cap on open connections, deadlines for the TLS handshake and for request heads, and
//! HTTP/2 keep-alive pings, stream and header limits. An upgraded HTTP/1.1 connection (a
//! WebSocket) is no longer hyper's, and keeps them through [`UpgradeLease`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use boring::ssl::{AlpnError, SslAcceptor, SslMethod};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tower_layer::Layer;
use tower_service::Service;

use super::ConnectionInfo;
use super::HttpService;
use crate::alt_svc::AltSvcLayer;
use crate::error::Error;
use crate::quic::ServerConfig;

/// The TCP side's limits, set through [`Builder`](super::Builder) (whose setters document
/// each default and why).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) header_read_timeout: Duration,
    /// How long a connection may have no request in flight (after its first) before it is
    /// closed: the server's `connection_idle_timeout`.
    pub(crate) idle_timeout: Duration,
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
            max_connections: 10_000,
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(20),
            http2_max_concurrent_streams: 128,
        }
    }
}

/// hyper refuses an HTTP/1 read buffer smaller than this.
const MIN_HTTP1_BUFFER: usize = 8 * 1024;

/// Everything the TCP side needs besides the socket and the service, prepared (and its
/// configuration errors reported) before serving starts.
pub(crate) struct Transport {
    acceptor: SslAcceptor,
    http: auto::Builder<TokioExecutor>,
    limits: Limits,
}

impl Transport {
    /// TLS from the QUIC listener's configuration; HTTP limits from the server's builder.
    pub(crate) fn new(
        config: &ServerConfig,
        limits: &Limits,
        max_header_list_size: usize,
        connect_protocol: bool,
    ) -> Result<Self, Error> {
        let mut http = auto::Builder::new(TokioExecutor::new());
        // Without a timer hyper silently ignores its timeouts and keep-alive settings.
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // The head must fit in the read buffer (hyper answers 431 otherwise), so this
            // bounds an HTTP/1.1 head as `max_header_list_size` bounds the others, instead
            // of hyper's default of about 400 KiB per connection.
            .max_buf_size(max_header_list_size.max(MIN_HTTP1_BUFFER));
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.http2_keep_alive_interval)
            .keep_alive_timeout(limits.http2_keep_alive_timeout)
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            // HTTP/2 counts a header list as HTTP/3 does (RFC 9113 §6.5.2), so one limit
            // means the same on both.
            .max_header_list_size(u32::try_from(max_header_list_size).unwrap_or(u32::MAX));
        if connect_protocol {
            // RFC 8441, as SETTINGS_ENABLE_CONNECT_PROTOCOL does on HTTP/3.
            http.http2().enable_connect_protocol();
        }
        Ok(Transport {
            acceptor: acceptor(config)?,
            http,
            limits: limits.clone(),
        })
    }
}

/// The TLS acceptor for the TCP side: the QUIC listener's certificate and key, its client
/// CA when it requires client certificates (mutual TLS), ALPN `h2` then `http/1.1`.
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
    b.set_alpn_select_callback(|_, client| {
        boring::ssl::select_next_proto(crate::quic::tls::TCP_ALPN, client).ok_or(AlpnError::NOACK)
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

/// What a TCP connection has in flight, for its idle timer: hyper bounds an HTTP/1.1
/// connection's wait for the next head, but nothing bounds an HTTP/2 connection without
/// streams, whose client need only answer PINGs to hold its slot for ever.
///
/// Requests only count themselves in and out (two atomic operations and a clock read):
/// the timer looks when it is due, so no request wakes the connection's task.
struct Activity {
    /// When the connection started: the base of `last_end_ms`.
    since: Instant,
    /// Requests whose response has not ended (its body dropped).
    in_flight: AtomicUsize,
    /// A request has come.
    requested: AtomicBool,
    /// When the last response ended, in milliseconds since `since`.
    last_end_ms: AtomicU64,
    /// A CONNECT was answered 2xx: over HTTP/2 a tunnel (a WebSocket, say) lives on the
    /// connection with no response body to count, so the connection is never idle again.
    tunnel_opened: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            since: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
            last_end_ms: AtomicU64::new(0),
            tunnel_opened: AtomicBool::new(false),
        }
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.requested.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    fn end(&self) {
        // The time first: whoever sees the count fall sees when.
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_end_ms.store(ms, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Ends when the connection has had no request in flight for `idle_timeout`, or has
    /// seen no request at all within `first_request_timeout` of its start.
    async fn idle(&self, first_request_timeout: Duration, idle_timeout: Duration) {
        loop {
            if self.tunnel_opened.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
            let now = Instant::now();
            let (quiet_since, limit) = if self.requested.load(Ordering::Acquire) {
                let ended = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
                (self.since + ended, idle_timeout)
            } else {
                (self.since, first_request_timeout)
            };
            let next = if self.in_flight.load(Ordering::Acquire) > 0 {
                // Busy: look again a whole timeout later (the earliest it could be idle).
                now + limit
            } else if quiet_since + limit <= now {
                return;
            } else {
                quiet_since + limit
            };
            // Never past one idle timeout from now: a request may come and go meanwhile
            // (while the first-request deadline, maybe the longer, is awaited).
            tokio::time::sleep_until(next.min(now + idle_timeout).into()).await;
        }
    }
}

/// One request in flight on a TCP connection, until its response body is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is dropped.
    pub(crate) struct Counted<B> {
        #[pin]
        body: B,
        _in_flight: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<S, B> Service<Request<Incoming>> for WithInfo<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Counted<B>>;
    type Error = S::Error;
    type Future = CountedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let mut info = self.info.clone();
        info.version = request.version();
        request.extensions_mut().insert(info);
        request.extensions_mut().insert(self.lease.clone());
        CountedResponse {
            in_flight: Some(self.activity.start()),
            connect: request.method() == http::Method::CONNECT,
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way, its request counted in flight; its body takes the count over.
    pub(crate) struct CountedResponse<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        connect: bool,
    }
}

impl<F, B, E> Future for CountedResponse<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Counted<B>>, E>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let in_flight = this.in_flight.take().expect("polled after completion");
        if *this.connect && result.as_ref().is_ok_and(|response| response.status().is_success()) {
            in_flight.0.tunnel_opened.store(true, Ordering::Release);
        }
        Poll::Ready(result.map(|response| {
            response.map(|body| Counted {
                body,
                _in_flight: in_flight,
            })
        }))
    }
}

/// Accepts TCP connections until `stop` carries a deadline, then lets the open ones finish
/// (hyper's graceful shutdown) until that deadline.
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
    alt_svc: AltSvcLayer,
    mut stop: watch::Receiver<Option<Instant>>,
    alive: mpsc::Sender<()>,
) where
    S: HttpService<Incoming>,
{
    let graceful = GracefulShutdown::new();
    let local_addr = tcp.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let service = alt_svc.layer(service);
    let Transport { acceptor, http, limits } = transport;
    let (acceptor, http) = (Arc::new(acceptor), Arc::new(http));
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
        let _ = stream.set_nodelay(true);
        let acceptor = Arc::clone(&acceptor);
        let http = Arc::clone(&http);
        let info = ConnectionInfo {
            remote_addr,
            local_addr,
            version: http::Version::HTTP_11,
        };
        let activity = Arc::new(Activity::new());
        let slot = Arc::new(slot);
        let lease = UpgradeLease {
            _slot: Arc::clone(&slot),
            _alive: alive.clone(),
            stop: stop.clone(),
        };
        let service = TowerToHyperService::new(WithInfo {
            inner: service.clone(),
            info,
            lease,
            activity: Arc::clone(&activity),
        });
        let watcher = graceful.watcher();
        let alive = alive.clone();
        let mut deadline = stop.clone();
        let (tls_handshake_timeout, header_read_timeout, idle_timeout) = (
            limits.tls_handshake_timeout,
            limits.header_read_timeout,
            limits.idle_timeout,
        );
        tokio::spawn(async move {
            let _alive = alive;
            let _slot = slot;
            let tls = match tokio::time::timeout(tls_handshake_timeout, tokio_boring::accept(&acceptor, stream)).await {
                Ok(Ok(tls)) => tls,
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
            let connection = http.serve_connection_with_upgrades(TokioIo::new(tls), service);
            // hyper times HTTP/1.1 heads only once it has chosen HTTP/1.1, and HTTP/2 not at
            // all: a client that sends nothing, or part of the HTTP/2 preface, would hold its
            // connection forever. Its first request must come within the head timeout, and
            // it may not go without a request in flight for longer than the idle timeout
            // after (an HTTP/2 client answering PINGs would hold its slot for ever).
            let idle = async move { activity.idle(header_read_timeout, idle_timeout).await };
            // Past the shutdown deadline the connection is dropped, whatever it was doing.
            let deadline_passed = async move { deadline_passed(&mut deadline).await };
            tokio::select! {
                result = watcher.watch(connection.into_owned()) => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %remote_addr, error = %e, "TCP connection ended with an error");
                    }
                }
                () = deadline_passed => tracing::debug!(peer = %remote_addr, "TCP connection closed at the shutdown deadline"),
                () = idle => tracing::debug!(peer = %remote_addr, "no request in flight within the head or idle timeout; TCP connection closed"),
            }
        });
    }
    drop(tcp);
    let deadline = (*stop.borrow()).unwrap_or_else(Instant::now);
    if tokio::time::timeout_at(deadline.into(), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("TCP connections still open at the shutdown deadline");
    }
}
