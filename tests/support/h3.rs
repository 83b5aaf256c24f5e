//! HTTP/3 test fixtures: a server running the shared route contract plus test routes, and
//! a client that trusts its certificate.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body::{Frame, SizeHint};
use tokio::sync::oneshot;
use tower_quiche::client::Client;
use tower_quiche::quic::{AtomicMetrics, ClientConfig, Listener, ServerConfig, ServerConfigBuilder};
use tower_quiche::server;

#[path = "../../examples/support/routes.rs"]
pub mod routes;

use super::Certs;

/// What the test routes let a test observe.
#[derive(Default)]
pub struct Probe {
    /// Bytes produced by `/count/{n}` and `/fresh/{n}` bodies.
    pub produced: AtomicU64,
    /// A `/watch-sink` handler was dropped before it finished (its request was cancelled).
    pub handler_cancelled: AtomicBool,
    /// Bytes `/slow-sink` has read.
    pub slow_read: AtomicU64,
}

/// A body of `remaining` bytes that counts what it produced.
pub struct Counting {
    pub remaining: u64,
    pub counter: Arc<Probe>,
    pub chunk: Bytes,
    /// Each chunk is a fresh allocation, not a view of `chunk`: a body polled too far
    /// ahead shows in memory.
    pub fresh: bool,
}

impl http_body::Body for Counting {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        self.counter.produced.fetch_add(n as u64, Ordering::Relaxed);
        let chunk = if self.fresh {
            Bytes::copy_from_slice(&self.chunk[..n])
        } else {
            self.chunk.slice(..n)
        };
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// `/count/{n}` (or, `fresh`, `/fresh/{n}`): `n` bytes in 16 KiB chunks, counted in
/// `probe.produced`.
fn count_route(probe: &Arc<Probe>, fresh: bool) -> axum::routing::MethodRouter {
    let probe = Arc::clone(probe);
    get(move |axum::extract::Path(n): axum::extract::Path<u64>| {
        let probe = Arc::clone(&probe);
        async move {
            axum::response::Response::new(Body::new(Counting {
                remaining: n,
                counter: probe,
                chunk: Bytes::from(vec![b'c'; 16 * 1024]),
                fresh,
            }))
        }
    })
}

pub fn test_router(probe: Arc<Probe>) -> Router {
    let sink = Arc::clone(&probe);
    let slow = Arc::clone(&probe);
    routes::router()
        .route("/count/{n}", count_route(&probe, false))
        .route("/fresh/{n}", count_route(&probe, true))
        .route(
            "/digest",
            // Collects the whole body (axum's `Bytes` extractor), answers its length and
            // SHA-256.
            post(|body: Bytes| async move { format!("{} {}", body.len(), hex(&boring::sha::sha256(&body))) }),
        )
        .route("/ignore", post(|| async { "ignored" }))
        .route(
            "/tunnel-echo",
            // An extended CONNECT whose tunnel echoes every byte, then ends when the
            // client's side does.
            axum::routing::on(
                axum::routing::MethodFilter::CONNECT,
                |request: axum::extract::Request| async move {
                    let (tunnel, body) = tower_quiche::tunnel::Tunnel::from_request(request);
                    tokio::spawn(async move {
                        let (mut read, mut write) = tokio::io::split(tunnel);
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
                    });
                    axum::response::Response::new(Body::new(body))
                },
            ),
        )
        .route(
            "/big-head/{n}",
            // A response head with an `x-filler` field of `n` bytes.
            get(|axum::extract::Path(n): axum::extract::Path<usize>| async move {
                ([("x-filler", "f".repeat(n))], "big head")
            }),
        )
        .route(
            "/dated",
            get(|| async { ([("date", "Sun, 06 Nov 1994 08:49:37 GMT")], "dated") }),
        )
        .route(
            "/late-head",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "late"
            }),
        )
        .route(
            "/early-hints",
            get(|request: axum::extract::Request| async move {
                let hints = request
                    .extensions()
                    .get::<server::Informational>()
                    .expect("Informational extension")
                    .clone();
                let mut headers = HeaderMap::new();
                headers.insert("link", "</style.css>; rel=preload; as=style".parse().unwrap());
                hints
                    .send(StatusCode::EARLY_HINTS, &headers)
                    .expect("103 before the final head");
                assert!(hints.send(StatusCode::OK, &HeaderMap::new()).is_err(), "only 1xx");
                "final"
            }),
        )
        .route(
            "/many-hints/{n}",
            get(
                |axum::extract::Path(n): axum::extract::Path<usize>, request: axum::extract::Request| async move {
                    let hints = request.extensions().get::<server::Informational>().unwrap().clone();
                    for _ in 0..n {
                        // At most 16 wait to be sent: past that, let them go out first.
                        while hints.send(StatusCode::EARLY_HINTS, &HeaderMap::new()).is_err() {
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        }
                    }
                    "final"
                },
            ),
        )
        .route(
            "/panic",
            get(|| async {
                if true {
                    panic!("handler panics on purpose")
                }
                "unreachable"
            }),
        )
        .route(
            "/watch-sink",
            post(move |body: Body| {
                let probe = Arc::clone(&sink);
                async move {
                    /// Records a cancellation: dropped before `finished` was set.
                    struct Guard(Arc<Probe>, bool);
                    impl Drop for Guard {
                        fn drop(&mut self) {
                            if !self.1 {
                                self.0.handler_cancelled.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    let mut guard = Guard(probe, false);
                    let mut stream = body.into_data_stream();
                    let mut total = 0u64;
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(c) => total += c.len() as u64,
                            Err(_) => {
                                guard.1 = true;
                                guard.0.handler_cancelled.store(true, Ordering::SeqCst);
                                return (StatusCode::BAD_REQUEST, String::new());
                            }
                        }
                    }
                    guard.1 = true;
                    (StatusCode::OK, total.to_string())
                }
            }),
        )
        .route(
            "/slow-sink",
            post(move |body: Body| {
                let probe = Arc::clone(&slow);
                async move {
                    let mut stream = body.into_data_stream();
                    while let Some(Ok(chunk)) = stream.next().await {
                        probe.slow_read.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    "done"
                }
            }),
        )
        .route(
            "/trailer-echo",
            post(|request: axum::extract::Request| async move {
                // Answers with the request's trailers as headers, and its body length.
                use http_body_util::BodyExt;
                let collected = request
                    .into_body()
                    .collect()
                    .await
                    .map_err(|_| StatusCode::BAD_REQUEST)?;
                let trailers = collected.trailers().cloned().unwrap_or_default();
                let len = collected.to_bytes().len();
                let mut headers = HeaderMap::new();
                for (k, v) in &trailers {
                    headers.insert(k.clone(), v.clone());
                }
                Ok::<_, StatusCode>((headers, len.to_string()))
            }),
        )
}

pub struct H3Server {
    pub addr: SocketAddr,
    pub url: String,
    pub metrics: Arc<AtomicMetrics>,
    pub probe: Arc<Probe>,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<Result<(), tower_quiche::Error>>,
}

impl H3Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }
}

pub async fn h3_server(certs: &Certs, builder: server::Builder) -> H3Server {
    h3_test_server_on(certs, ServerConfig::builder(), builder).await
}

/// The test router ([`test_router`]) served with QUIC settings that start from `quic`.
pub async fn h3_test_server_on(certs: &Certs, quic: ServerConfigBuilder, builder: server::Builder) -> H3Server {
    let probe = Arc::new(Probe::default());
    h3_server_on(certs, quic, builder, test_router(Arc::clone(&probe)), probe).await
}

pub async fn h3_server_with(certs: &Certs, builder: server::Builder, router: Router, probe: Arc<Probe>) -> H3Server {
    h3_server_on(certs, ServerConfig::builder(), builder, router, probe).await
}

/// A test server whose QUIC settings start from `quic` (the certificate and metrics are
/// added here).
pub async fn h3_server_on(
    certs: &Certs,
    quic: ServerConfigBuilder,
    builder: server::Builder,
    router: Router,
    probe: Arc<Probe>,
) -> H3Server {
    h3_server_at("127.0.0.1:0".parse().unwrap(), certs, quic, builder, router, probe).await
}

/// [`h3_server_on`], on `addr` (a server restarted where another was).
pub async fn h3_server_at(
    addr: SocketAddr,
    certs: &Certs,
    quic: ServerConfigBuilder,
    builder: server::Builder,
    router: Router,
    probe: Arc<Probe>,
) -> H3Server {
    super::init_tracing();
    let metrics = Arc::new(AtomicMetrics::new());
    let config = quic
        .cert_chain_pem(&certs.leaf.cert_pem)
        .private_key_pem(&certs.leaf.key_pem)
        .metrics(Arc::clone(&metrics))
        .build()
        .unwrap();
    // A server stopped on `addr` lets its sockets go once its routers have seen their
    // last connection leave, a moment after `serve` returned: a few tries.
    let mut tries = 0;
    let listener = loop {
        match Listener::bind(addr, config.clone()).await {
            Ok(listener) => break listener,
            Err(e) if addr.port() != 0 && tries < 50 => {
                tries += 1;
                tracing::debug!(%e, "address still held; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    };
    let addr = listener.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(
        builder
            .serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .into_future(),
    );
    H3Server {
        addr,
        url: format!("https://localhost:{}", addr.port()),
        metrics,
        probe,
        shutdown: Some(tx),
        done,
    }
}

/// An HTTP/3 listener on 127.0.0.1 with the test certificate.
pub async fn listener(certs: &Certs) -> Listener {
    Listener::bind("127.0.0.1:0", server_config(certs)).await.unwrap()
}

/// The HTTP/3 server configuration of the test certificate.
pub fn server_config(certs: &Certs) -> ServerConfig {
    ServerConfig::builder()
        .cert_chain_pem(&certs.leaf.cert_pem)
        .private_key_pem(&certs.leaf.key_pem)
        .build()
        .unwrap()
}

/// A transport with QUIC datagrams (queues of 256 each way), which HTTP datagrams need, or
/// the default one without.
pub fn transport_with_datagrams(datagrams: bool) -> tower_quiche::quic::TransportConfig {
    let transport = tower_quiche::quic::TransportConfig::new();
    if datagrams { transport.datagrams(256) } else { transport }
}

/// An HTTP/3 listener on 127.0.0.1 with the test certificate, with QUIC datagrams or not.
pub async fn datagram_listener(certs: &Certs, datagrams: bool) -> Listener {
    let config = ServerConfig::builder()
        .cert_chain_pem(&certs.leaf.cert_pem)
        .private_key_pem(&certs.leaf.key_pem)
        .transport(transport_with_datagrams(datagrams))
        .build()
        .unwrap();
    Listener::bind("127.0.0.1:0", config).await.unwrap()
}

/// An HTTP/3 client trusting the test CA, with QUIC datagrams or not.
pub fn datagram_client(certs: &Certs, datagrams: bool) -> Client {
    let config = ClientConfig::builder()
        .ca_pem(&certs.ca_pem)
        .transport(transport_with_datagrams(datagrams))
        .build()
        .unwrap();
    Client::builder()
        .http3_prior_knowledge()
        .quic_config(config)
        .build()
        .unwrap()
}

/// A client configuration that trusts the test CA.
pub fn trusting(certs: &Certs) -> ClientConfig {
    ClientConfig::builder().ca_pem(&certs.ca_pem).build().unwrap()
}

pub fn client(certs: &Certs) -> Client {
    Client::builder()
        .http3_prior_knowledge()
        .quic_config(trusting(certs))
        .build()
        .unwrap()
}

/// A client endpoint offering `h3`, for `client::conn::handshake`.
pub fn h3_client_endpoint(certs: &Certs) -> tower_quiche::quic::Endpoint {
    tower_quiche::quic::Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), trusting(certs)).unwrap()
}

/// Hashes a body as it streams, without keeping it.
pub async fn hash_body(body: tower_quiche::RecvBody) -> (u64, [u8; 32], Option<HeaderMap>) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut hasher = boring::sha::Sha256::new();
    let mut len = 0u64;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        match frame.into_data() {
            Ok(data) => {
                len += data.len() as u64;
                hasher.update(&data);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (len, hasher.finish(), trailers)
}

/// A streamed request body: `len` bytes of a position-dependent pattern, hashed as sent.
pub struct PatternBody {
    pub sent: u64,
    pub len: u64,
    pub hasher: Option<boring::sha::Sha256>,
    pub digest: Arc<std::sync::Mutex<Option<[u8; 32]>>>,
    pub trailers: Option<HeaderMap>,
    pub produced: Option<Arc<AtomicU64>>,
}

impl PatternBody {
    pub fn new(len: u64) -> (Self, Arc<std::sync::Mutex<Option<[u8; 32]>>>) {
        let digest = Arc::new(std::sync::Mutex::new(None));
        (
            PatternBody {
                sent: 0,
                len,
                hasher: Some(boring::sha::Sha256::new()),
                digest: Arc::clone(&digest),
                trailers: None,
                produced: None,
            },
            digest,
        )
    }
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sent == self.len {
            if let Some(hasher) = self.hasher.take() {
                *self.digest.lock().unwrap() = Some(hasher.finish());
            }
            return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        let n = (self.len - self.sent).min(32 * 1024) as usize;
        let start = self.sent;
        let chunk: Vec<u8> = (0..n as u64).map(|i| ((start + i) * 7 % 251) as u8).collect();
        self.sent += n as u64;
        if let Some(p) = &self.produced {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&chunk);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw HTTP/3 server connection on quiche's h3 layer, run on the QUIC layer's
/// `Application` seam: for tests that need a server tower-quiche's own never is (one that
/// refuses requests unprocessed, or answers with a malformed message). `on_event` sees each
/// event of the connection's HTTP/3 side.
pub struct RawH3<F> {
    h3: Option<quiche::h3::Connection>,
    on_event: F,
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 9220), which a client's tunnel waits for.
    extended_connect: bool,
}

/// What a [`RawH3`] server does with one event on stream `id`.
pub trait OnH3Event:
    FnMut(&mut quiche::h3::Connection, &mut tower_quiche::quic::QuicheConnection, u64, quiche::h3::Event) + Send + 'static
{
}

impl<F> OnH3Event for F where
    F: FnMut(&mut quiche::h3::Connection, &mut tower_quiche::quic::QuicheConnection, u64, quiche::h3::Event)
        + Send
        + 'static
{
}

impl<F: OnH3Event> RawH3<F> {
    pub fn new(on_event: F) -> Self {
        RawH3 {
            h3: None,
            on_event,
            extended_connect: false,
        }
    }

    /// Allows extended CONNECT (the client's `tunnel` asks for it).
    pub fn extended_connect(mut self) -> Self {
        self.extended_connect = true;
        self
    }
}

/// A server of raw HTTP/3 connections on `listener`, each driven by the [`RawH3`] `make`
/// builds for it (told whether it is the listener's first connection): its address, the
/// count of connections it accepted, and its task.
pub fn raw_h3_server_on<F: OnH3Event>(
    mut listener: Listener,
    make: impl Fn(bool) -> RawH3<F> + Send + 'static,
) -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let addr = listener.local_addr();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let server = tokio::spawn(async move {
        let mut handles = Vec::new();
        while let Some(incoming) = listener.accept().await {
            let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
            handles.push(incoming.start(make(first)));
        }
    });
    (addr, accepted, server)
}

impl<F: OnH3Event> tower_quiche::quic::Application for RawH3<F> {
    fn on_established(&mut self, conn: &mut tower_quiche::quic::QuicheConnection) -> Result<(), tower_quiche::Error> {
        let mut config = quiche::h3::Config::new().unwrap();
        config.enable_extended_connect(self.extended_connect);
        self.h3 = Some(quiche::h3::Connection::with_transport(conn, &config).unwrap());
        Ok(())
    }

    fn process(
        &mut self,
        _cx: &mut Context<'_>,
        conn: &mut tower_quiche::quic::QuicheConnection,
    ) -> Result<(), tower_quiche::Error> {
        let Some(h3) = self.h3.as_mut() else { return Ok(()) };
        while let Ok((id, event)) = h3.poll(conn) {
            (self.on_event)(h3, conn, id, event);
        }
        Ok(())
    }
}
