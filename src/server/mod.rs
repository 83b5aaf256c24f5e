//! Serving any [`tower::Service`](tower_service::Service) over HTTP/3.
//!
//! [`serve`] takes a [`Listener`] and a service — an axum `Router`, a `ServiceBuilder`
//! stack, anything that is `Service<Request<RecvBody>, Response = Response<B>> + Clone`
//! (an [`HttpService`]) — and runs it: each request stream becomes an `http::Request` whose body streams as it
//! arrives, and the response body is polled only while the stream can take more.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use tower_quiche::quic::{Listener, ServerConfig};
//!
//! # async fn run() -> Result<(), tower_quiche::Error> {
//! let app = Router::new().route("/", get(|| async { "hello over HTTP/3" }));
//! let config = ServerConfig::from_pem_files("cert.pem", "key.pem")?;
//! let listener = Listener::bind("127.0.0.1:4433", config).await?;
//! tower_quiche::server::serve(listener, app)
//!     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Every request carries a [`ConnectionInfo`] extension (addresses, the HTTP version), a
//! [`RequestInfo`] (the stream ID) and an [`Informational`] handle for 1xx responses.

mod conn;
#[cfg(feature = "__bench")]
pub(crate) use conn::bench::InMemory as InMemoryBench;
mod date;
mod dispatch;
mod service;
#[cfg(feature = "tcp")]
pub(crate) mod tcp;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Request, StatusCode, Version};
use tokio::sync::{mpsc, watch};
use tower_service::Service;

use crate::error::{BoxError, Error};
use crate::h3::body::RecvBody;
use crate::h3::stream::StreamShared;
use crate::quic::{ConnectionHandle, Incoming, Listener};

pub use crate::h3::fields::Protocol;
pub use service::HttpService;

/// Who is on the other end of a connection: an extension of every request on it (over
/// every protocol), and what a make-service receives for each connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The local address the connection arrived on.
    pub local_addr: SocketAddr,
    /// The HTTP version (`HTTP_3`, or over TCP the request's own).
    pub version: Version,
}

/// What is known of one HTTP/3 request beyond its head: an extension of every HTTP/3
/// request (requests over TCP have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestInfo {
    /// The QUIC stream the request arrived on.
    pub stream_id: u64,
    /// Whether the request arrived in 0-RTT data and is served before the handshake
    /// completed (its head then also carries `early-data: 1`, RFC 8470 §5.1). Such a
    /// request may be a replay; see [`Builder::early_data_policy`].
    pub early_data: bool,
}

impl ConnectionInfo {
    fn of(incoming: &Incoming) -> Self {
        ConnectionInfo {
            remote_addr: incoming.peer_addr(),
            local_addr: incoming.local_addr(),
            version: Version::HTTP_3,
        }
    }
}

/// Sends 1xx informational responses (such as 103 Early Hints) before the final response.
/// Found in every HTTP/3 request's extensions (not over TCP, where hyper sends no 1xx of a
/// service's: take it as `Option<Extension<Informational>>` in a handler for both).
#[derive(Clone)]
pub struct Informational {
    stream: Arc<StreamShared>,
}

impl fmt::Debug for Informational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Informational")
            .field("stream_id", &self.stream.id())
            .finish()
    }
}

impl Informational {
    /// Queues an informational response; it never waits. Fails for a status outside 1xx
    /// (and 101, which HTTP/3 forbids), once the final response has been queued, and while
    /// 16 informational responses of the request already wait to be sent (the client's
    /// flow control holds them back).
    pub fn send(&self, status: StatusCode, headers: &HeaderMap) -> Result<(), Error> {
        if !status.is_informational() || status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::config(format!(
                "{status} is not an informational status HTTP/3 allows"
            )));
        }
        let fields = crate::h3::fields::response_fields(status, headers, None, false);
        self.stream.push_informational(fields)
    }
}

/// Server settings, shared by its connections.
pub(crate) struct Settings {
    max_header_list_size: usize,
    request_head_timeout: Duration,
    connection_idle_timeout: Duration,
    body_stall_timeout: Duration,
    max_requests_per_connection: Option<u64>,
    request_body_buffer: usize,
    response_body_buffer: usize,
    graceful_shutdown_timeout: Duration,
    connect_protocol: bool,
    early_data_policy: EarlyDataPolicy,
    http_datagrams: bool,
    datagram_buffer: usize,
    h3_config: quiche::h3::Config,
}

/// Which requests that arrive in 0-RTT data are served before the handshake completes.
#[derive(Clone, Default)]
pub(crate) struct EarlyDataPolicy(Option<Arc<AllowsEarly>>);

/// A policy's test of a request head.
type AllowsEarly = dyn Fn(&Request<()>) -> bool + Send + Sync;

impl fmt::Debug for EarlyDataPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "EarlyDataPolicy(custom)"
        } else {
            "EarlyDataPolicy(safe methods)"
        })
    }
}

impl EarlyDataPolicy {
    /// Whether `request` (its head) may be served in early data: what the builder's
    /// policy says, or by default whether its method is safe (RFC 9110 §9.2.1) and so
    /// harmless to repeat: GET, HEAD, OPTIONS.
    pub(crate) fn allows(&self, request: &Request<()>) -> bool {
        match &self.0 {
            Some(allows) => allows(request),
            None => matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS),
        }
    }
}

/// The smallest hard limit on a field section that quiche decodes at all (advertised as
/// SETTINGS_MAX_FIELD_SECTION_SIZE); beyond it quiche closes the whole connection with
/// H3_EXCESSIVE_LOAD (a client that keeps to the limit it was told never gets there).
/// Sections between
/// `max_header_list_size` and the hard limit (four times it, at least this) get a 431
/// response, which tells a client more than a reset would. It also bounds what a peer can
/// park in partial heads, for at most the request head timeout: quiche takes a HEADERS
/// frame of up to 1.5 times this limit and buffers about twice what has arrived, so about
/// three times the hard limit per concurrent request stream (tests/abuse.rs measures it).
const MIN_HARD_FIELD_SECTION_LIMIT: u64 = 64 * 1024;

/// Settings of an HTTP/3 server, each with a documented default.
///
/// Limits that live in QUIC are set on the listener's
/// [`TransportConfig`](crate::quic::TransportConfig): concurrent request streams
/// ([`max_concurrent_bidi_streams`](crate::quic::TransportConfig::max_concurrent_bidi_streams),
/// 128) and the idle timeout ([`idle_timeout`](crate::quic::TransportConfig::idle_timeout),
/// 30 s).
///
/// The `tcp_*` and `http2_*` settings apply to the TCP side of
/// [`serve_with_tcp`](Builder::serve_with_tcp) only.
#[derive(Debug, Clone)]
pub struct Builder {
    max_header_list_size: usize,
    request_head_timeout: Duration,
    connection_idle_timeout: Duration,
    body_stall_timeout: Duration,
    max_requests_per_connection: Option<u64>,
    request_body_buffer: usize,
    response_body_buffer: usize,
    graceful_shutdown_timeout: Duration,
    connect_protocol: bool,
    early_data_policy: EarlyDataPolicy,
    http_datagrams: bool,
    datagram_buffer: usize,
    /// Limits of the TCP side of [`Builder::serve_with_tcp`].
    #[cfg(feature = "tcp")]
    tcp: tcp::Limits,
    /// The HTTP/3 port the TCP side's `Alt-Svc` names, when not the listener's.
    #[cfg(feature = "tcp")]
    alt_svc_port: Option<u16>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            max_header_list_size: 16 * 1024,
            request_head_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(30),
            body_stall_timeout: Duration::from_secs(30),
            max_requests_per_connection: None,
            request_body_buffer: 64 * 1024,
            response_body_buffer: 64 * 1024,
            graceful_shutdown_timeout: Duration::from_secs(30),
            connect_protocol: true,
            early_data_policy: EarlyDataPolicy::default(),
            http_datagrams: true,
            datagram_buffer: crate::datagram::DEFAULT_FLOW_BUFFER,
            #[cfg(feature = "tcp")]
            tcp: tcp::Limits::default(),
            #[cfg(feature = "tcp")]
            alt_svc_port: None,
        }
    }
}

impl Builder {
    /// Default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest request header section, counted as RFC 9114 §4.2.2 does (the sum of
    /// name, value and 32 bytes per field). Larger requests get `431 Request Header Fields
    /// Too Large`, up to four times this (at least 64 KiB), the limit the server advertises
    /// in its SETTINGS, past which quiche closes the connection; the same limit holds for
    /// trailer sections (a larger one resets the
    /// stream with H3_MESSAGE_ERROR). On TCP it is HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE`
    /// and sizes the HTTP/1.1 read buffer (at least 8 KiB) a request head must fit in.
    /// Defaults to 16 KiB, as hyper's: real request heads are a few KiB, and a peer can
    /// park this much in each unfinished head.
    pub fn max_header_list_size(mut self, bytes: usize) -> Self {
        self.max_header_list_size = bytes;
        self
    }

    /// How long each request stream may take to deliver its complete head, counted from
    /// when the server first sees the stream; a late one is reset with
    /// `H3_REQUEST_REJECTED`. Bounds a client that trickles heads in (slowloris), whatever
    /// else is in flight on its connection. Defaults to 10 s: a head is one flight of
    /// packets, and an edge should not hold a half-sent one much longer.
    pub fn request_head_timeout(mut self, timeout: Duration) -> Self {
        self.request_head_timeout = crate::at_most_never(timeout).max(Duration::from_millis(1));
        self
    }

    /// How long a connection may go with no request in flight before the server sends
    /// GOAWAY and closes it gracefully. Defaults to 30 s, the QUIC idle timeout's default:
    /// long enough for a browser to reuse the connection for its next page. With
    /// [`serve_with_tcp`](Self::serve_with_tcp) it bounds TCP connections too, after their
    /// first request: an HTTP/2 client that only answers PINGs would otherwise hold its
    /// connection, and its slot among `tcp_max_connections`, for ever. Such a connection is
    /// shut down as hyper does gracefully (GOAWAY over HTTP/2), and dropped if it is still
    /// open one more idle timeout later. A TCP connection is not idle while it carries a
    /// tunnel (a CONNECT answered 2xx, such as a WebSocket over HTTP/2), however quiet: the
    /// idle timeout counts from when its last tunnel ended, that is when the server's side
    /// of it finished sending (a tunnel the server has shut for writing while the client
    /// still sends counts as ended). Nor while a request body still brings bytes after its
    /// response ended (a handler that answered at once and reads the upload afterwards).
    pub fn connection_idle_timeout(mut self, timeout: Duration) -> Self {
        self.connection_idle_timeout = crate::at_most_never(timeout);
        self
    }

    /// How long a request may make no progress while the client owes bytes: body bytes
    /// for a handler that waits for them, or flow-control credit for a response that is
    /// ready to go (its FIN included). A response that waits for its turn while others go
    /// out (more urgent ones first, RFC 9218, or a full congestion window) waits on the
    /// server, not the client, and the server cannot tell that from a client that
    /// withholds credit: so the wait for credit counts only while nothing on the
    /// connection is sent, and any response sent meanwhile (on credit the client gave
    /// earlier, read or not) starts it again. A client can so keep responses it takes
    /// nothing of, each holding its `response_body_buffer`, as many as
    /// [`max_concurrent_bidi_streams`](crate::quic::TransportConfig::max_concurrent_bidi_streams)
    /// allows, as it can by taking a byte now and then. Past it (checked a few times per
    /// timeout, so within 1.25 times it)
    /// the stream is reset with `H3_REQUEST_CANCELLED` and the handler's body read fails
    /// with an error whose `is_timeout()` is true. Time a handler spends working, or a slow
    /// reader, does not count, with one exception: once the response is complete, a stream
    /// is kept only for whoever still reads its request body, and then a reader that takes
    /// nothing for this long ends it too (one that holds the body unread would keep the
    /// connection open for ever). Defaults to 30 s (nginx allows 60 s between two reads
    /// of a body or two writes of a response).
    ///
    /// The server cannot tell a client that stalls from one with nothing to say yet: a
    /// streaming request that goes quiet for longer than this while its response does not
    /// move either (a gRPC client or bidirectional stream waiting for its user, say) ends
    /// in the timeout too, as behind nginx's `client_body_timeout`. Raise it for services
    /// with such streams.
    ///
    /// With [`serve_with_tcp`](Self::serve_with_tcp) it bounds responses on TCP too, as
    /// nginx's `send_timeout` does: when a response has waited this long for hyper to want
    /// more of it, the connection is closed. Over HTTP/1.1 the wait counts while the
    /// socket takes less than 16 KiB (so a client that reads a large response slowly is
    /// not cut); over HTTP/2 while no response on the connection gets window for its next
    /// piece of up to 16 KiB (a client that reads nothing, or leaves the connection window
    /// at zero; new requests' heads do not count). hyper gives no way to reset one HTTP/2
    /// stream from outside, so the whole connection goes; and as on HTTP/3 the server
    /// cannot tell a response the client withholds window from one it reads after others,
    /// so a client that starves some streams while it reads others (or a small response
    /// now and then) is bounded only by
    /// [`http2_max_concurrent_streams`](Self::http2_max_concurrent_streams). A TCP request
    /// body falls under it too: a handler that has waited this long for bytes the client
    /// does not send, while the request's own response did not move, gets an error whose
    /// `is_timeout()` is true (hyper then ends the request's stream, or over HTTP/1.1 the
    /// connection, after its response).
    pub fn body_stall_timeout(mut self, timeout: Duration) -> Self {
        self.body_stall_timeout = crate::at_most_never(timeout).max(Duration::from_millis(1));
        self
    }

    /// After this many requests a connection sends GOAWAY, finishes them, and closes; the
    /// client opens a new one. With [`serve_with_tcp`](Self::serve_with_tcp) the same holds
    /// for TCP connections (`connection: close` over HTTP/1.1). Defaults to unlimited.
    pub fn max_requests_per_connection(mut self, requests: u64) -> Self {
        self.max_requests_per_connection = Some(requests.max(1));
        self
    }

    /// How many bytes of a request body may wait for the handler to read them; beyond it
    /// the client is held back by QUIC flow control. Defaults to 64 KiB. HTTP/3 only: over
    /// TCP hyper's own buffering and HTTP/2 windows apply.
    pub fn request_body_buffer(mut self, bytes: usize) -> Self {
        self.request_body_buffer = bytes.max(1);
        self
    }

    /// How many bytes of a response body may wait for the stream's capacity before the
    /// body is polled again. Defaults to 64 KiB. Over HTTP/2 (the TCP side) it bounds
    /// what hyper buffers per stream for the client's window likewise; HTTP/1.1 writes as
    /// the socket takes it.
    pub fn response_body_buffer(mut self, bytes: usize) -> Self {
        self.response_body_buffer = bytes.max(1);
        self
    }

    /// Whether clients may send extended CONNECT requests (RFC 9220: WebSocket over HTTP/3
    /// and other protocols tunnelled in a request stream), as SETTINGS_ENABLE_CONNECT_PROTOCOL
    /// tells them; on the TCP side of [`serve_with_tcp`](Self::serve_with_tcp) the same for
    /// HTTP/2 (RFC 8441), where hyper hands such a stream over as an upgrade. Such a request reaches the service like any other, with its
    /// [`Protocol`] as an extension (over HTTP/2, hyper's `hyper::ext::Protocol` too);
    /// over HTTP/3 [`Tunnel`](crate::tunnel::Tunnel) makes its bodies a byte stream (over
    /// HTTP/2 hyper's upgrade does: [`ws::WebSocketUpgrade`](crate::ws::WebSocketUpgrade)
    /// takes either). A tunnel may sit idle: the [body stall
    /// timeout](Self::body_stall_timeout) does not apply to CONNECT streams. Turned off, a
    /// request with `:protocol` is malformed (reset with `H3_MESSAGE_ERROR`). Defaults to
    /// on.
    pub fn enable_connect_protocol(mut self, enabled: bool) -> Self {
        self.connect_protocol = enabled;
        self
    }

    /// Which requests that arrive in 0-RTT data are served before the handshake completes.
    /// The others are answered `425 Too Early` (RFC 8470 §5.2), which tells the client to
    /// send them again after the handshake (browsers and this crate's client do).
    ///
    /// Early data saves a round trip on a resumed connection, but an attacker who captured
    /// it can replay it to the server, so only what is harmless to repeat belongs there. By
    /// default that is requests whose method is safe: GET, HEAD and OPTIONS (RFC 9110
    /// §9.2.1). A handler sees whether its request came in early data in
    /// [`RequestInfo::early_data`] and the `early-data: 1` header (RFC 8470 §5.1).
    ///
    /// Whether early data is accepted at all is the listener's
    /// [`TransportConfig::early_data`](crate::quic::TransportConfig::early_data) (on by
    /// default).
    ///
    /// ```
    /// # use tower_quiche::server::Builder;
    /// // Safe methods, and one idempotent endpoint whose handler tolerates replays.
    /// let builder = Builder::new().early_data_policy(|request| {
    ///     request.method().is_safe() || request.uri().path() == "/ping"
    /// });
    /// ```
    pub fn early_data_policy<F>(mut self, allows: F) -> Self
    where
        F: Fn(&Request<()>) -> bool + Send + Sync + 'static,
    {
        self.early_data_policy = EarlyDataPolicy(Some(Arc::new(allows)));
        self
    }

    /// Whether CONNECT requests (plain or extended) get HTTP datagrams (RFC 9297): a
    /// [`Datagrams`](crate::datagram::Datagrams) handle the handler takes with
    /// [`Datagrams::from_request`](crate::datagram::Datagrams::from_request). They need QUIC
    /// datagrams on the listener's transport too,
    /// [`TransportConfig::datagrams`](crate::quic::TransportConfig::datagrams), which is off
    /// by default: a server offers datagrams only when asked to. quiche's HTTP/3 layer
    /// sends SETTINGS_H3_DATAGRAM whenever the transport has QUIC datagrams on, so turning
    /// this off with them on drops every HTTP datagram that arrives on a CONNECT. Either
    /// way, one on a request that is no CONNECT aborts that request with H3_DATAGRAM_ERROR
    /// (RFC 9297 §2; every CONNECT, plain or extended, is let keep its datagrams or drop
    /// them, whether or not its protocol defines any). Defaults to on (HTTP datagrams
    /// follow the transport).
    pub fn http_datagrams(mut self, enabled: bool) -> Self {
        self.http_datagrams = enabled;
        self
    }

    /// How many bytes of HTTP datagrams may wait for a handler to read them, per stream
    /// (each datagram charged [`DATAGRAM_COST`](crate::datagram::DATAGRAM_COST) more);
    /// past it arriving datagrams are dropped and counted
    /// ([`DatagramStats::dropped_incoming`](crate::datagram::DatagramStats)), as a
    /// congested network would drop them. Defaults to 64 KiB, the request body buffer's
    /// default: about 50 full-sized datagrams.
    pub fn datagram_buffer(mut self, bytes: usize) -> Self {
        self.datagram_buffer = bytes;
        self
    }

    /// How long a graceful shutdown waits for requests in flight before closing their
    /// connections anyway. Defaults to 30 s.
    pub fn graceful_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.graceful_shutdown_timeout = crate::at_most_never(timeout);
        self
    }

    fn settings(&self) -> Result<Arc<Settings>, Error> {
        let mut h3_config = quiche::h3::Config::new()
            .map_err(|e| Error::config(format!("cannot create the HTTP/3 configuration: {e}")))?;
        let hard_limit = (self.max_header_list_size as u64)
            .saturating_mul(4)
            .max(MIN_HARD_FIELD_SECTION_LIMIT);
        h3_config.set_max_field_section_size(hard_limit);
        h3_config.enable_extended_connect(self.connect_protocol);
        Ok(Arc::new(Settings {
            max_header_list_size: self.max_header_list_size,
            request_head_timeout: self.request_head_timeout,
            connection_idle_timeout: self.connection_idle_timeout,
            body_stall_timeout: self.body_stall_timeout,
            max_requests_per_connection: self.max_requests_per_connection,
            request_body_buffer: self.request_body_buffer,
            response_body_buffer: self.response_body_buffer,
            graceful_shutdown_timeout: self.graceful_shutdown_timeout,
            connect_protocol: self.connect_protocol,
            early_data_policy: self.early_data_policy.clone(),
            http_datagrams: self.http_datagrams,
            datagram_buffer: self.datagram_buffer,
            h3_config,
        }))
    }

    /// Serves one connection a listener accepted, with `service`, as hyper's
    /// `serve_connection` does: for an accept loop of your own (per-connection services,
    /// filtering, your own limits). [`serve`](Self::serve) is such a loop.
    ///
    /// The connection runs in a task of its own; the returned [`Connection`] resolves when
    /// it ends, and [`Connection::graceful_shutdown`] drains it.
    ///
    /// ```no_run
    /// # use tower_quiche::quic::Listener;
    /// # async fn run(mut listener: Listener, app: axum::Router) {
    /// let builder = tower_quiche::server::Builder::new();
    /// while let Some(incoming) = listener.accept().await {
    ///     let connection = builder.serve_connection(incoming, app.clone());
    ///     tokio::spawn(async move {
    ///         if let Err(e) = connection.await {
    ///             eprintln!("connection ended with an error: {e}");
    ///         }
    ///     });
    /// }
    /// # }
    /// ```
    pub fn serve_connection<S: HttpService<RecvBody>>(&self, incoming: Incoming, service: S) -> Connection {
        let (drain, drain_rx) = watch::channel(None);
        // Nobody waits for this connection among others.
        let (alive, _) = mpsc::channel(1);
        let drain_timeout = self.graceful_shutdown_timeout;
        let handle = self.settings().map(|settings| {
            let info = ConnectionInfo::of(&incoming);
            start_connection(incoming, info, service, settings, drain_rx, alive)
        });
        let closed: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> = match &handle {
            Ok(handle) => {
                let handle = handle.clone();
                Box::pin(async move {
                    let closed = handle.closed().await;
                    closed.error().map_or(Ok(()), |e| Err(e.duplicate()))
                })
            }
            Err(e) => Box::pin(std::future::ready(Err(e.duplicate()))),
        };
        Connection {
            handle: handle.ok(),
            drain,
            drain_timeout,
            closed,
        }
    }

    /// Serves `service` on `listener`: each connection gets a clone of it.
    pub fn serve<S: HttpService<RecvBody>>(self, listener: Listener, service: S) -> Serve {
        self.serve_make_service(listener, CloneService(service))
    }

    /// Serves with a make-service: `make_service` is called with each connection's
    /// [`ConnectionInfo`] and returns the service for that connection, as with
    /// `axum::serve`.
    pub fn serve_make_service<M, S>(self, listener: Listener, make_service: M) -> Serve
    where
        M: Service<ConnectionInfo, Response = S> + Send + 'static,
        M::Future: Send + 'static,
        M::Error: Into<BoxError>,
        S: HttpService<RecvBody>,
    {
        let settings = self.settings();
        let run: RunFn = Box::new(move |signal| Box::pin(run(listener, make_service, settings, signal, None)));
        Serve { run, signal: None }
    }

    /// Serves `service` over HTTP/3 on `listener` and over HTTP/1.1 and HTTP/2 (TLS, with
    /// the listener's certificate) on `tcp`, usually the same port. TCP responses carry
    /// `alt-svc: h3=":PORT"; ma=86400` so browsers move to HTTP/3; HTTP/3 responses do not.
    /// Requests have the same shape on every protocol: a [`ConnectionInfo`] extension
    /// carries the HTTP version. One graceful shutdown drains both transports.
    ///
    /// Request bodies are a [`RecvBody`] on every protocol, so one `service_fn` over
    /// `Request<RecvBody>` serves them all; over TCP they fall under the
    /// [`body_stall_timeout`](Self::body_stall_timeout) too, and their errors are hyper's,
    /// classified (a reset HTTP/2 stream `is_closed`, not `is_reset`). A CONNECT tunnel
    /// over TCP (HTTP/2's extended CONNECT, HTTP/1.1's `Upgrade`) is hyper's upgrade of
    /// the request, not its body, as `ws::WebSocketUpgrade` (feature `axum`) handles it.
    /// An HTTP/1.1 connection `ws::WebSocketUpgrade` takes over keeps its place among
    /// [`tcp_max_connections`](Self::tcp_max_connections) and ends at the graceful
    /// shutdown's deadline; one taken over another way (axum's own `extract::ws`,
    /// `hyper::upgrade::on`) leaves both behind, as it would with hyper's own server: hyper
    /// hands the stream over and its connection ends.
    #[cfg(feature = "tcp")]
    pub fn serve_with_tcp<S>(self, listener: Listener, tcp: tokio::net::TcpListener, service: S) -> Serve
    where
        S: HttpService<RecvBody>,
    {
        let settings = self.settings();
        let tcp_service = service.clone();
        let limits = tcp::Limits {
            idle_timeout: self.connection_idle_timeout,
            stall_timeout: self.body_stall_timeout,
            max_requests: self.max_requests_per_connection,
            ..self.tcp.clone()
        };
        let prepared = tcp::Transport::new(
            listener.config(),
            &limits,
            self.max_header_list_size,
            self.response_body_buffer,
            self.connect_protocol,
        )
        .map(|transport| {
            (
                transport,
                tcp::AltSvcPorts::new(listener.local_addrs(), self.alt_svc_port),
            )
        });
        let run: RunFn = Box::new(move |signal| {
            Box::pin(async move {
                let (transport, alt_svc) = prepared?;
                let start_tcp: TcpStarter =
                    Box::new(move |stop, alive| Box::pin(tcp::run(tcp, transport, tcp_service, alt_svc, stop, alive)));
                run(listener, CloneService(service), settings, signal, Some(start_tcp)).await
            })
        });
        Serve { run, signal: None }
    }

    /// TCP ([`serve_with_tcp`](Builder::serve_with_tcp)): the port the TCP responses'
    /// `Alt-Svc` names for HTTP/3 (on the same host name). By default the QUIC listener's:
    /// of its addresses, the one of the IP the client connected to, else of its family,
    /// else the first.
    /// Set it when clients reach the UDP port under another number (a NAT, a container's
    /// port mapping) than the one the listener is bound to.
    #[cfg(feature = "tcp")]
    pub fn alt_svc_port(mut self, port: u16) -> Self {
        self.alt_svc_port = Some(port);
        self
    }

    /// TCP ([`serve_with_tcp`](Builder::serve_with_tcp)): how many TCP connections may be
    /// open at once. At the limit the server stops accepting until one closes; new clients
    /// wait in the kernel's listen backlog meanwhile. Each connection holds a descriptor, a
    /// task and its buffers, so this bounds what a flood of connections can take. Defaults
    /// to 10,000, well above what one honest client uses (browsers open one HTTP/2
    /// connection per site, six at most over HTTP/1.1), and within memory a small server
    /// has; raise `ulimit -n` to match. Once a quarter of them are in their TLS handshake,
    /// one client address may have at most the QUIC listener's
    /// [`max_handshakes_in_progress_per_address`](crate::quic::ServerConfigBuilder::max_handshakes_in_progress_per_address)
    /// in it (its further connections are closed at once), so that one address cannot
    /// take every slot with handshakes it never finishes.
    #[cfg(feature = "tcp")]
    pub fn tcp_max_connections(mut self, connections: usize) -> Self {
        self.tcp.max_connections = connections.max(1);
        self
    }

    /// TCP: how long a client has to complete its TLS handshake before its connection is
    /// closed. Defaults to 10 s: a handshake is two round trips, and a client that takes
    /// longer is most likely holding the socket on purpose.
    #[cfg(feature = "tcp")]
    pub fn tcp_tls_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.tcp.tls_handshake_timeout = crate::at_most_never(timeout);
        self
    }

    /// TCP: how long a client has to send a complete request head, over HTTP/1.1 and
    /// HTTP/2: its first request after the TLS handshake, and on HTTP/1.1 each later one
    /// (which also closes an HTTP/1.1 connection idle that long between requests). A client
    /// that trickles a head in (slowloris) is disconnected. Defaults to 10 s: a head is a
    /// packet or two, so this is ample for any real link while keeping short the time a
    /// stalling client holds one of the [`tcp_max_connections`](Builder::tcp_max_connections).
    #[cfg(feature = "tcp")]
    pub fn tcp_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.tcp.header_read_timeout = crate::at_most_never(timeout);
        self
    }

    /// TCP: HTTP/2 connections send a PING after `interval` without hearing from the
    /// client, and close if no answer comes within `timeout`, so dead peers do not hold
    /// connections forever. Defaults to 20 s and 20 s, hyper's own timeout, well under the
    /// idle timeouts of common NATs and load balancers.
    #[cfg(feature = "tcp")]
    pub fn http2_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.tcp.http2_keep_alive_interval = crate::at_most_never(interval);
        self.tcp.http2_keep_alive_timeout = crate::at_most_never(timeout);
        self
    }

    /// TCP: how many requests an HTTP/2 connection may have in flight. Defaults to 128, the
    /// default number of concurrent request streams on HTTP/3
    /// ([`max_concurrent_bidi_streams`](crate::quic::TransportConfig::max_concurrent_bidi_streams)),
    /// so one client gets the same concurrency on both.
    #[cfg(feature = "tcp")]
    pub fn http2_max_concurrent_streams(mut self, streams: u32) -> Self {
        self.tcp.http2_max_concurrent_streams = streams.max(1);
        self
    }
}

/// Starts the TCP side of a server, given the drain signal and the liveness sender.
type TcpStarter = Box<
    dyn FnOnce(watch::Receiver<Option<Instant>>, mpsc::Sender<()>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send,
>;

/// Serves `service` over HTTP/3 on `listener` with default [`Builder`] settings.
///
/// The listener must offer the `h3` ALPN. The returned [`Serve`] runs when awaited, until
/// the listener stops or, with [`Serve::with_graceful_shutdown`], until the signal fires
/// and every connection has drained.
pub fn serve<S: HttpService<RecvBody>>(listener: Listener, service: S) -> Serve {
    Builder::new().serve(listener, service)
}

/// Serves `service` over HTTP/3 and, on `tcp`, over HTTP/1.1 and HTTP/2 with `Alt-Svc`;
/// see [`Builder::serve_with_tcp`].
#[cfg(feature = "tcp")]
pub fn serve_with_tcp<S>(listener: Listener, tcp: tokio::net::TcpListener, service: S) -> Serve
where
    S: HttpService<RecvBody>,
{
    Builder::new().serve_with_tcp(listener, tcp, service)
}

/// Serves with a make-service that builds one service per connection from its
/// [`ConnectionInfo`]; see [`Builder::serve_make_service`].
pub fn serve_make_service<M, S>(listener: Listener, make_service: M) -> Serve
where
    M: Service<ConnectionInfo, Response = S> + Send + 'static,
    M::Future: Send + 'static,
    M::Error: Into<BoxError>,
    S: HttpService<RecvBody>,
{
    Builder::new().serve_make_service(listener, make_service)
}

type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;
type RunFn = Box<dyn FnOnce(Option<Signal>) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> + Send>;

/// One connection served by [`Builder::serve_connection`]: a future that resolves when the
/// connection has ended (`Ok` for a clean close), with a graceful shutdown.
///
/// The connection runs in its own task: dropping this leaves it running, as dropping a
/// `JoinHandle` does.
pub struct Connection {
    handle: Option<ConnectionHandle>,
    drain: watch::Sender<Option<Instant>>,
    drain_timeout: Duration,
    closed: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>,
}

impl Connection {
    /// Sends GOAWAY, lets the requests in flight finish (for at most the builder's
    /// [`graceful_shutdown_timeout`](Builder::graceful_shutdown_timeout)), then closes with
    /// `H3_NO_ERROR`. The connection future resolves once it has closed.
    pub fn graceful_shutdown(&self) {
        self.drain.send_if_modified(|deadline| {
            let first = deadline.is_none();
            if first {
                *deadline = Some(Instant::now() + self.drain_timeout);
            }
            first
        });
    }

    /// The QUIC connection's handle (addresses, statistics, an immediate close), unless
    /// the connection could not start.
    pub fn handle(&self) -> Option<&ConnectionHandle> {
        self.handle.as_ref()
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl Future for Connection {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        self.closed.as_mut().poll(cx)
    }
}

/// A running server: await it (it is [`IntoFuture`]).
#[must_use = "a server does nothing until awaited"]
pub struct Serve {
    run: RunFn,
    signal: Option<Signal>,
}

impl fmt::Debug for Serve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("graceful", &self.signal.is_some())
            .finish_non_exhaustive()
    }
}

impl Serve {
    /// When `signal` completes: stop accepting connections, send GOAWAY on every
    /// connection, let requests in flight finish (up to the builder's
    /// `graceful_shutdown_timeout`), close each connection with H3_NO_ERROR, and return.
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.signal = Some(Box::pin(signal));
        self
    }
}

impl IntoFuture for Serve {
    type Output = Result<(), Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        (self.run)(self.signal)
    }
}

/// Hands out each connection's service: a clone of one service.
#[derive(Clone)]
struct CloneService<S>(S);

impl<S: Clone> Service<ConnectionInfo> for CloneService<S> {
    type Response = S;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<S, std::convert::Infallible>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _info: ConnectionInfo) -> Self::Future {
        std::future::ready(Ok(self.0.clone()))
    }
}

async fn run<M, S>(
    mut listener: Listener,
    mut make_service: M,
    settings: Result<Arc<Settings>, Error>,
    signal: Option<Signal>,
    tcp: Option<TcpStarter>,
) -> Result<(), Error>
where
    M: Service<ConnectionInfo, Response = S> + Send + 'static,
    M::Future: Send + 'static,
    M::Error: Into<BoxError>,
    S: HttpService<RecvBody>,
{
    let settings = settings?;
    if !listener.config().alpn().any(|p| p == b"h3") {
        return Err(Error::config(
            "the listener does not offer the \"h3\" ALPN: leave its ServerConfig's alpn at the default, or \
             include \"h3\" in the list",
        ));
    }
    // Every connection holds a sender; when all are gone, every connection has closed.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let (drain_tx, drain_rx) = watch::channel::<Option<Instant>>(None);
    let mut signal = signal.unwrap_or_else(|| Box::pin(std::future::pending()));
    if let Some(start_tcp) = tcp {
        tokio::spawn(start_tcp(drain_rx.clone(), alive.clone()));
    }
    loop {
        let incoming = tokio::select! {
            incoming = listener.accept() => incoming,
            () = &mut signal => break,
        };
        let Some(incoming) = incoming else { break };
        let info = ConnectionInfo::of(&incoming);
        // A make-service that waits (not ready, or slow to build) holds up accepting, as
        // tower's contract has it, but not the shutdown.
        let made = tokio::select! {
            made = make(&mut make_service, info.clone()) => made,
            () = &mut signal => {
                incoming.refuse();
                break;
            }
        };
        let service = match made {
            Ok(service) => service,
            Err(e) => {
                // Dropped, not `refuse`d: a make-service that fails under load (shedding it)
                // must not buy each refusal a TLS signature.
                tracing::warn!(error = %e, peer = %info.remote_addr, "make-service failed; refusing the connection");
                drop(incoming);
                continue;
            }
        };
        start_connection(
            incoming,
            info,
            service,
            Arc::clone(&settings),
            drain_rx.clone(),
            alive.clone(),
        );
    }
    // Stop accepting; connections already running keep their sockets.
    drop(listener);
    let deadline = Instant::now() + settings.graceful_shutdown_timeout;
    tracing::debug!("graceful shutdown: draining connections");
    drain_tx.send_replace(Some(deadline));
    drop(alive);
    // Connections close themselves at the deadline; a moment more lets their closes go out.
    let _ = tokio::time::timeout_at((deadline + Duration::from_secs(1)).into(), all_closed.recv()).await;
    Ok(())
}

/// Starts serving one connection: its task runs the service for each request until the
/// connection ends, and drains (GOAWAY, then close) once `drain` carries a deadline.
fn start_connection<S: HttpService<RecvBody>>(
    incoming: Incoming,
    info: ConnectionInfo,
    service: S,
    settings: Arc<Settings>,
    mut drain: watch::Receiver<Option<Instant>>,
    alive: mpsc::Sender<()>,
) -> ConnectionHandle {
    let shutdown = Box::pin(async move {
        let deadline = drain.wait_for(Option::is_some).await.map(|d| *d);
        match deadline {
            Ok(deadline) => deadline,
            // Nobody can ask for a graceful shutdown any more: keep serving.
            Err(_) => std::future::pending().await,
        }
    });
    let transport = &incoming.config().inner.s;
    let mut app =
        conn::ServerApp::new(service, settings, info, shutdown, alive).with_stream_limit(transport.max_streams_bidi);
    if transport.datagrams.is_some() {
        app = app.with_datagrams();
    }
    incoming.start(app)
}

async fn make<M, S>(make_service: &mut M, info: ConnectionInfo) -> Result<S, BoxError>
where
    M: Service<ConnectionInfo, Response = S>,
    M::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| make_service.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    make_service.call(info).await.map_err(Into::into)
}

/// Whether a comma-separated list field (`connection`, `upgrade`) names `token`, in any of
/// its lines, ignoring case (RFC 9110 §5.6.1).
#[cfg(any(feature = "tcp", feature = "axum"))]
pub(crate) fn lists_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|value| value.split(',').any(|listed| listed.trim().eq_ignore_ascii_case(token)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_only_safe_methods_are_served_in_early_data() {
        let policy = EarlyDataPolicy::default();
        let request = |method: Method| Request::builder().method(method).body(()).unwrap();
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(policy.allows(&request(method.clone())), "{method}");
        }
        for method in [
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::CONNECT,
        ] {
            assert!(!policy.allows(&request(method.clone())), "{method}");
        }
        let custom = EarlyDataPolicy(Some(Arc::new(|r: &Request<()>| r.uri().path() == "/ping")));
        assert!(custom.allows(&Request::post("/ping").body(()).unwrap()));
        assert!(!custom.allows(&Request::get("/other").body(()).unwrap()));
    }
}
