//! WebSocket for axum handlers, over every protocol the server speaks (`axum` feature):
//! one route serves WebSocket over HTTP/3 and HTTP/2 (extended CONNECT, RFC 9220 and RFC
//! 8441) and over HTTP/1.1 (`Upgrade: websocket`, RFC 6455), so a route written once works
//! for every client of [`server::serve_with_tcp`](crate::server::serve_with_tcp).
//!
//! ```no_run
//! use axum::Router;
//! use axum::response::Response;
//! use axum::routing::any;
//! use futures_util::{SinkExt, StreamExt};
//! use tower_quiche::ws::{Message, WebSocket, WebSocketUpgrade};
//!
//! async fn echo(ws: WebSocketUpgrade) -> Response {
//!     ws.on_upgrade(|mut socket: WebSocket| async move {
//!         while let Some(Ok(message)) = socket.next().await {
//!             if message.is_text() || message.is_binary() {
//!                 if socket.send(message).await.is_err() {
//!                     break;
//!                 }
//!             }
//!         }
//!     })
//! }
//!
//! // `any`: HTTP/1.1 asks with GET, HTTP/2 and HTTP/3 with CONNECT.
//! let app: Router = Router::new().route("/ws", any(echo));
//! ```
//!
//! The extractor takes the request's body (an HTTP/3 WebSocket is carried in it), so it is
//! the handler's last argument. A request that is no WebSocket handshake is refused with
//! what the RFCs ask: `405` for another method, `426 Upgrade Required` (with
//! `sec-websocket-version: 13`) for another WebSocket version, `400` otherwise.
//!
//! Messages and frames are held to [`DEFAULT_MAX_MESSAGE`] unless
//! [`WebSocketUpgrade::max_message_size`] says otherwise: a peer's message is held whole
//! before the handler sees it. Each WebSocket also holds its read buffer,
//! [`DEFAULT_READ_BUFFER`] unless [`WebSocketUpgrade::read_buffer_size`] says otherwise; a
//! client may open many WebSockets, as many as the server's connection and stream limits
//! let it (`quic::ServerConfigBuilder::max_connections_per_address`,
//! `quic::TransportConfig::max_concurrent_bidi_streams`, `server::Builder::tcp_max_connections`).
//!
//! A WebSocket reads its stream past middleware that wraps request bodies (tower-http's
//! `RequestBodyLimitLayer`, a body timeout), on every protocol: over HTTP/3 through
//! [`Tunnel::from_request`](crate::tunnel::Tunnel::from_request), over HTTP/1.1 and HTTP/2
//! through hyper's upgrade.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum_core::body::Body;
use axum_core::extract::{FromRequest, Request};
use axum_core::response::{IntoResponse, Response};
use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub use tokio_tungstenite::tungstenite::Error;
pub use tokio_tungstenite::tungstenite::Message;

use crate::h3::tunnel::{Tunnel, TunnelBody};

/// The largest message (and frame) a WebSocket takes by default: 1 MiB. A message is held
/// whole before the handler reads it, so this bounds what one WebSocket makes the server
/// hold besides its buffers (tungstenite's own default is 64 MiB).
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// The read buffer a WebSocket allocates when it starts, by default: 16 KiB. tungstenite's
/// own default (and axum's) is 128 KiB, which an idle WebSocket holds as long as it is
/// open; a larger buffer saves read calls only under heavy inbound traffic.
pub const DEFAULT_READ_BUFFER: usize = 16 * 1024;

/// A WebSocket: a `Stream` of received [`Message`]s and a `Sink` of messages to send
/// (tokio-tungstenite's), over whichever protocol carried the handshake.
pub type WebSocket = WebSocketStream<Upgraded>;

/// The byte stream under a [`WebSocket`]: an HTTP/3 CONNECT stream, or (over TCP) the
/// connection or HTTP/2 stream hyper hands over after the handshake.
pub struct Upgraded(Io);

enum Io {
    Http3(Tunnel),
    #[cfg(feature = "tcp")]
    Hyper(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let over = match self.0 {
            Io::Http3(_) => "HTTP/3",
            #[cfg(feature = "tcp")]
            Io::Hyper(_) => "TCP",
        };
        f.debug_tuple("Upgraded").field(&over).finish()
    }
}

/// Forwards an `AsyncRead`/`AsyncWrite` method to whichever stream is under it.
macro_rules! forward {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.get_mut().0 {
            Io::Http3($io) => $call,
            #[cfg(feature = "tcp")]
            Io::Hyper($io) => $call,
        }
    };
}

impl AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        forward!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        forward!(self, io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        forward!(self, io => Pin::new(io).poll_shutdown(cx))
    }
}

/// A WebSocket handshake a handler can accept with [`on_upgrade`](Self::on_upgrade): an
/// axum extractor (see the [module docs](self)).
pub struct WebSocketUpgrade {
    how: How,
    config: WebSocketConfig,
    /// The subprotocols the client offered: every `sec-websocket-protocol` line (one list,
    /// RFC 6455 §11.3.4 and RFC 9110 §5.3).
    offered: Vec<HeaderValue>,
    /// The one chosen from them, sent back.
    chosen: Option<HeaderValue>,
}

enum How {
    /// HTTP/3 extended CONNECT: the tunnel is the request's body and the response's.
    Http3(Tunnel, TunnelBody),
    /// HTTP/2 extended CONNECT (`accept_key: None`, answered 200) or HTTP/1.1 Upgrade
    /// (answered 101 with the key's accept value): hyper hands the stream over after the
    /// response.
    #[cfg(feature = "tcp")]
    Hyper {
        on_upgrade: hyper::upgrade::OnUpgrade,
        accept_key: Option<String>,
        /// The TCP connection's slot and shutdown deadline, which the WebSocket keeps once
        /// hyper has handed the stream over.
        lease: Option<crate::server::tcp::UpgradeLease>,
    },
}

impl std::fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("offered", &self.offered)
            .field("chosen", &self.chosen)
            .finish_non_exhaustive()
    }
}

impl WebSocketUpgrade {
    /// The largest message and frame taken from the client. Defaults to
    /// [`DEFAULT_MAX_MESSAGE`]; [`max_frame_size`](Self::max_frame_size) after this sets
    /// frames apart.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config = self.config.max_message_size(Some(bytes)).max_frame_size(Some(bytes));
        self
    }

    /// The largest frame taken from the client (a message may span several). Defaults to
    /// the largest message.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config = self.config.max_frame_size(Some(bytes));
        self
    }

    /// The read buffer the WebSocket allocates when it starts and keeps while it is open.
    /// Defaults to [`DEFAULT_READ_BUFFER`].
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.config = self.config.read_buffer_size(bytes);
        self
    }

    /// How much the WebSocket buffers before it writes to the stream (tungstenite's
    /// `write_buffer_size`, 128 KiB by default; 0 writes each message at once). The buffer
    /// grows with what is written, not when the WebSocket starts.
    pub fn write_buffer_size(mut self, bytes: usize) -> Self {
        self.config = self.config.write_buffer_size(bytes);
        self
    }

    /// The most the write buffer may hold (tungstenite's `max_write_buffer_size`,
    /// unbounded by default: it grows past [`write_buffer_size`](Self::write_buffer_size)
    /// only while writes to the stream fail). It must exceed the write buffer size (by a
    /// message, better): a smaller one is raised to just above it.
    pub fn max_write_buffer_size(mut self, bytes: usize) -> Self {
        self.config = self.config.max_write_buffer_size(bytes);
        self
    }

    /// The subprotocols this handler speaks, in order of preference: the first the client
    /// also offered (`sec-websocket-protocol`) is chosen and sent back. When none matches,
    /// none is sent, and the client decides whether to go on (RFC 6455 §4.2.2).
    pub fn protocols<I>(mut self, protocols: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let offered: Vec<&str> = self
            .offered
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(str::trim))
            .collect();
        self.chosen = protocols
            .into_iter()
            .find(|p| offered.contains(&p.as_ref()))
            .and_then(|p| HeaderValue::from_str(p.as_ref()).ok());
        self
    }

    /// The subprotocol chosen by [`protocols`](Self::protocols), if any.
    pub fn selected_protocol(&self) -> Option<&HeaderValue> {
        self.chosen.as_ref()
    }

    /// Accepts the handshake: returns the response to answer with, and runs `callback` with
    /// the WebSocket in a task of its own once the connection hands the stream over (at
    /// once on HTTP/3; after the response has gone on TCP).
    pub fn on_upgrade<F, Fut>(self, callback: F) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let WebSocketUpgrade {
            how,
            mut config,
            chosen,
            ..
        } = self;
        // tungstenite asserts it (in the WebSocket's task, after the handshake's answer).
        config.max_write_buffer_size = config
            .max_write_buffer_size
            .max(config.write_buffer_size.saturating_add(1));
        let mut response = match how {
            How::Http3(tunnel, body) => {
                tokio::spawn(async move {
                    let socket =
                        WebSocketStream::from_raw_socket(Upgraded(Io::Http3(tunnel)), Role::Server, Some(config)).await;
                    callback(socket).await;
                });
                Response::new(Body::new(body))
            }
            #[cfg(feature = "tcp")]
            How::Hyper {
                on_upgrade,
                accept_key,
                lease,
            } => {
                let session = async move {
                    match on_upgrade.await {
                        Ok(upgraded) => {
                            let io = Upgraded(Io::Hyper(hyper_util::rt::TokioIo::new(upgraded)));
                            callback(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "WebSocket handshake not completed"),
                    }
                };
                tokio::spawn(async move {
                    match lease {
                        Some(lease) => lease.run(session).await,
                        None => session.await,
                    }
                });
                let mut response = Response::new(Body::empty());
                if let Some(key) = accept_key {
                    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    let headers = response.headers_mut();
                    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                    if let Ok(accept) = HeaderValue::from_str(&key) {
                        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
                    }
                }
                response
            }
        };
        if let Some(protocol) = chosen {
            response.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response
    }
}

/// Why a request is not a WebSocket handshake this server can accept; answered with the
/// status RFC 6455 and RFC 8441 ask for.
#[derive(Debug)]
pub struct WebSocketUpgradeRejection {
    status: StatusCode,
    reason: &'static str,
    /// A 426 to an HTTP/1.x request names the protocol to upgrade to (RFC 9110 §15.5.22);
    /// HTTP/2 and HTTP/3 have no `Upgrade` field.
    names_upgrade: bool,
}

impl WebSocketUpgradeRejection {
    fn new(status: StatusCode, reason: &'static str) -> Self {
        WebSocketUpgradeRejection {
            status,
            reason,
            names_upgrade: false,
        }
    }

    /// A 426 over HTTP/1.x: with `Upgrade: websocket`.
    fn upgrade_required(reason: &'static str, version: Version) -> Self {
        WebSocketUpgradeRejection {
            names_upgrade: version <= Version::HTTP_11,
            ..Self::new(StatusCode::UPGRADE_REQUIRED, reason)
        }
    }

    /// The status the rejection answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl std::fmt::Display for WebSocketUpgradeRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason)
    }
}

impl std::error::Error for WebSocketUpgradeRejection {}

impl IntoResponse for WebSocketUpgradeRejection {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.reason).into_response();
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110 §15.5.6: the methods a handshake may use.
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, CONNECT"));
        }
        if self.status == StatusCode::UPGRADE_REQUIRED {
            // RFC 6455 §4.4: the versions the server speaks.
            let headers = response.headers_mut();
            headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            if self.names_upgrade {
                // RFC 9110 §15.5.22 (the protocol), §7.8 (`upgrade` in Connection beside it).
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
        }
        response
    }
}

impl<S: Send + Sync> FromRequest<S> for WebSocketUpgrade {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let connect = request.method() == Method::CONNECT;
        let http1_get = request.method() == Method::GET && request.version() <= Version::HTTP_11;
        if !(connect || http1_get) {
            return Err(WebSocketUpgradeRejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket handshake is a GET with Upgrade (HTTP/1.1) or an extended CONNECT (HTTP/2, HTTP/3)",
            ));
        }
        if connect && !asks_for_websocket(&request) {
            // Another protocol's tunnel (connect-udp, say): not ours to ask for a version.
            return Err(WebSocketUpgradeRejection::new(StatusCode::BAD_REQUEST, NOT_WEBSOCKET));
        }
        let headers = request.headers();
        let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
        // RFC 6455 §11.3.5: once in a request.
        if versions.next().is_none_or(|v| v != "13") || versions.next().is_some() {
            return Err(WebSocketUpgradeRejection::upgrade_required(
                "only WebSocket version 13 is spoken here",
                request.version(),
            ));
        }
        let offered = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .cloned()
            .collect();
        let how = if connect {
            extended_connect(request)
        } else {
            http1_upgrade(request)?
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(DEFAULT_READ_BUFFER)
            .max_message_size(Some(DEFAULT_MAX_MESSAGE))
            .max_frame_size(Some(DEFAULT_MAX_MESSAGE));
        Ok(WebSocketUpgrade {
            how,
            config,
            offered,
            chosen: None,
        })
    }
}

/// Why a CONNECT is no WebSocket handshake.
const NOT_WEBSOCKET: &str = "a CONNECT for a WebSocket carries :protocol websocket";

/// Whether an extended CONNECT asks for `websocket` (over HTTP/2 or HTTP/3).
fn asks_for_websocket(request: &Request) -> bool {
    #[cfg(feature = "tcp")]
    if let Some(protocol) = request.extensions().get::<hyper::ext::Protocol>() {
        return protocol.as_str().eq_ignore_ascii_case("websocket");
    }
    request
        .extensions()
        .get::<crate::h3::fields::Protocol>()
        .is_some_and(|protocol| protocol.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// RFC 9220 (HTTP/3) and RFC 8441 (HTTP/2): a CONNECT with `:protocol websocket`
/// ([`asks_for_websocket`] has checked the protocol): hyper's upgrade over HTTP/2, the
/// request's stream over HTTP/3.
fn extended_connect(request: Request) -> How {
    #[cfg(feature = "tcp")]
    if request.extensions().get::<hyper::ext::Protocol>().is_some() {
        let mut request = request;
        let lease = request.extensions().get().cloned();
        let on_upgrade = hyper::upgrade::on(&mut request);
        return How::Hyper {
            on_upgrade,
            accept_key: None,
            lease,
        };
    }
    let (tunnel, body) = Tunnel::from_request(request);
    How::Http3(tunnel, body)
}

/// RFC 6455 §4.2.1 item 5: the base64 of 16 bytes, which is 22 base64 characters and `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let is_base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24 && key.ends_with(b"==") && key[..22].iter().all(is_base64)
}

/// RFC 6455 §4.2.1: GET with `Connection: upgrade`, `Upgrade: websocket` and a key.
fn http1_upgrade(request: Request) -> Result<How, WebSocketUpgradeRejection> {
    let headers = request.headers();
    let lists = |name, token| crate::server::lists_token(headers, name, token);
    if !lists(header::CONNECTION, "upgrade") || !lists(header::UPGRADE, "websocket") {
        return Err(WebSocketUpgradeRejection::upgrade_required(
            "a WebSocket handshake over HTTP/1.1 carries Connection: upgrade and Upgrade: websocket",
            request.version(),
        ));
    }
    // RFC 6455 §11.3.1: once in a request.
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let Some(key) = keys
        .next()
        .filter(|key| is_websocket_key(key.as_bytes()) && keys.next().is_none())
    else {
        return Err(WebSocketUpgradeRejection::new(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake over HTTP/1.1 carries a Sec-WebSocket-Key: the base64 of 16 bytes",
        ));
    };
    #[cfg(feature = "tcp")]
    {
        let accept_key = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut request = request;
        if request.extensions().get::<hyper::upgrade::OnUpgrade>().is_none() {
            return Err(WebSocketUpgradeRejection::upgrade_required(
                "this connection cannot be upgraded",
                request.version(),
            ));
        }
        let lease = request.extensions().get().cloned();
        let on_upgrade = hyper::upgrade::on(&mut request);
        Ok(How::Hyper {
            on_upgrade,
            accept_key: Some(accept_key),
            lease,
        })
    }
    #[cfg(not(feature = "tcp"))]
    {
        let _ = key;
        Err(WebSocketUpgradeRejection::new(
            StatusCode::UPGRADE_REQUIRED,
            "this server serves WebSocket over HTTP/3 only (tower-quiche built without `tcp`)",
        ))
    }
}
