//! One app on TCP (HTTP/1.1, HTTP/2) and UDP (HTTP/3) with Alt-Svc, and tower-http layers
//! behaving over HTTP/3 as they do over TCP.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Extension;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tower_quiche::client::{Client, ResponseExt};
use tower_quiche::quic::{ClientConfig, ServerConfig, ServerConfigBuilder};
use tower_quiche::server::{self, ConnectionInfo};
use tower_quiche::tls::DevCa;

struct Dual {
    addr: std::net::SocketAddr,
    ca_pem: String,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), tower_quiche::Error>>,
}

async fn dual(app: Router, builder: server::Builder) -> Dual {
    dual_with(app, builder, |config| config).await
}

/// A dual server whose listener configuration (`h3`, the test certificate) `configure` may
/// add to, e.g. a client CA.
async fn dual_with<S: server::HttpService<tower_quiche::RecvBody>>(
    app: S,
    builder: server::Builder,
    configure: impl FnOnce(ServerConfigBuilder) -> ServerConfigBuilder,
) -> Dual {
    init_tracing();
    let certs = certs();
    let config = ServerConfig::builder()
        .cert_chain_pem(&certs.leaf.cert_pem)
        .private_key_pem(&certs.leaf.key_pem);
    let (listener, tcp) = bind_udp_and_tcp(configure(config).build().unwrap()).await;
    let addr = listener.local_addr();
    serve_dual(builder, listener, tcp, app, addr, certs.ca_pem)
}

/// Serves `app` on `listener` and `tcp` as `builder` has it, reached at `addr` by clients
/// trusting `ca_pem`, until the `Dual`'s shutdown.
fn serve_dual<S: server::HttpService<tower_quiche::RecvBody>>(
    builder: server::Builder,
    listener: tower_quiche::quic::Listener,
    tcp: tokio::net::TcpListener,
    app: S,
    addr: std::net::SocketAddr,
    ca_pem: String,
) -> Dual {
    let (tx, rx) = oneshot::channel::<()>();
    let serve = builder
        .serve_with_tcp(listener, tcp, app)
        .with_graceful_shutdown(async move {
            let _ = rx.await;
        });
    Dual {
        addr,
        ca_pem,
        shutdown: Some(tx),
        done: tokio::spawn(serve.into_future()),
    }
}

/// An HTTP/3 client that trusts `ca_pem`, and hands bodies over as they came (not
/// decoded: the tests compare the bytes each protocol carried).
fn h3_client(ca_pem: &str) -> Client {
    let config = ClientConfig::builder().ca_pem(ca_pem).build().unwrap();
    Client::builder()
        .http3_prior_knowledge()
        .gzip(false)
        .quic_config(config)
        .build()
        .unwrap()
}

impl Dual {
    async fn h3(&self, request: Request<Full<Bytes>>) -> Response<Bytes> {
        let client = h3_client(&self.ca_pem);
        let response = client.send(request).await.expect("HTTP/3 request");
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }

    async fn tcp(&self, version: Version, request: Request<Full<Bytes>>) -> Response<Bytes> {
        tcp::send(self.addr, &self.ca_pem, version, request).await
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    fn get(&self, path: &str) -> Request<Full<Bytes>> {
        Request::get(self.url(path)).body(Full::default()).unwrap()
    }

    /// The same request over HTTP/1.1, HTTP/2 and HTTP/3.
    async fn everywhere(&self, request: impl Fn() -> Request<Full<Bytes>>) -> [Response<Bytes>; 3] {
        [
            self.tcp(Version::HTTP_11, request()).await,
            self.tcp(Version::HTTP_2, request()).await,
            self.h3(request()).await,
        ]
    }
}

fn app() -> Router {
    app_counting(Arc::default())
}

/// [`app`], counting in `slow_started` the `/slow` requests that reached their handler.
fn app_counting(slow_started: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/version",
            get(
                |Extension(info): Extension<ConnectionInfo>, request: axum::extract::Request| async move {
                    format!("{:?} {:?} {}", info.version, request.version(), info.remote_addr.ip())
                },
            ),
        )
        .route(
            "/slow",
            get(move || {
                slow_started.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    "slow done"
                }
            }),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_handler_answers_over_http1_http2_and_http3() {
    let server = dual(app(), server::Builder::new()).await;
    let run = async {
        let [h1, h2, h3] = server.everywhere(|| server.get("/version")).await;
        assert_eq!(h1.body(), "HTTP/1.1 HTTP/1.1 127.0.0.1");
        assert_eq!(h2.body(), "HTTP/2.0 HTTP/2.0 127.0.0.1");
        assert_eq!(h3.body(), "HTTP/3.0 HTTP/3.0 127.0.0.1");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_svc_is_on_tcp_responses_only() {
    let server = dual(app(), server::Builder::new()).await;
    let run = async {
        let [h1, h2, h3] = server.everywhere(|| server.get("/version")).await;
        let expected = format!("h3=\":{}\"; ma=86400", server.addr.port());
        assert_eq!(h1.headers()["alt-svc"], expected.as_str());
        assert_eq!(h2.headers()["alt-svc"], expected.as_str());
        assert!(h3.headers().get("alt-svc").is_none(), "no Alt-Svc over HTTP/3");
        // Also on errors.
        let missing = server.tcp(Version::HTTP_11, server.get("/missing")).await;
        assert_eq!(missing.status(), 404);
        assert_eq!(missing.headers()["alt-svc"], expected.as_str());
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_graceful_shutdown_drains_both_transports() {
    let slow_started = Arc::new(AtomicUsize::new(0));
    let mut server = dual(app_counting(Arc::clone(&slow_started)), server::Builder::new()).await;
    let run = async {
        let h3_client = h3_client(&server.ca_pem);
        let h3 = tokio::spawn(h3_client.get(server.url("/slow")).send());
        let (addr, ca) = (server.addr, server.ca_pem.clone());
        let h1 = tokio::spawn(async move {
            tcp::send(
                addr,
                &ca,
                Version::HTTP_11,
                Request::get(format!("https://localhost:{}/slow", addr.port()))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
        });
        let (addr, ca) = (server.addr, server.ca_pem.clone());
        let h2 = tokio::spawn(async move {
            tcp::send(
                addr,
                &ca,
                Version::HTTP_2,
                Request::get(format!("https://localhost:{}/slow", addr.port()))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
        });
        // Shut down once all three requests are in flight: before that, the drain may
        // rightly close a connection whose request has not arrived yet.
        while slow_started.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server.shutdown.take().unwrap().send(()).unwrap();
        assert_eq!(h3.await.unwrap().unwrap().text().await.unwrap(), "slow done");
        assert_eq!(h1.await.unwrap().body(), "slow done");
        assert_eq!(h2.await.unwrap().body(), "slow done");
        timeout(Duration::from_secs(10), &mut server.done)
            .await
            .expect("serve returns")
            .unwrap()
            .unwrap();
        // Both transports stopped accepting.
        assert!(
            tokio::net::TcpStream::connect(server.addr).await.is_err(),
            "TCP no longer accepts"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Runs the same request over every protocol and checks they agree on status and the
/// named headers; returns the HTTP/3 response.
async fn agree(server: &Dual, request: impl Fn() -> Request<Full<Bytes>>, headers: &[&str]) -> Response<Bytes> {
    let [h1, h2, h3] = server.everywhere(request).await;
    for (name, other) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        assert_eq!(h3.status(), other.status(), "status over HTTP/3 and {name}");
        for header in headers {
            assert_eq!(
                h3.headers().get(*header),
                other.headers().get(*header),
                "{header} over HTTP/3 and {name}"
            );
        }
        assert_eq!(h3.body(), other.body(), "body over HTTP/3 and {name}");
    }
    h3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_http_layers_behave_over_http3_as_over_tcp() {
    use tower_http::compression::CompressionLayer;
    use tower_http::cors::CorsLayer;
    use tower_http::limit::RequestBodyLimitLayer;
    use tower_http::timeout::TimeoutLayer;
    use tower_http::trace::TraceLayer;

    let traced = Arc::new(AtomicU16::new(0));
    let seen = Arc::clone(&traced);
    let app = Router::new()
        .route("/text", get(|| async { "tower-quiche ".repeat(200) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "too late"
            }),
        )
        .route("/upload", post(|body: Bytes| async move { body.len().to_string() }))
        .layer(CompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(1024))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(200),
        ))
        .layer(CorsLayer::permissive())
        .layer(TraceLayer::new_for_http().on_response(
            move |response: &Response<_>, _: Duration, _: &tracing::Span| {
                seen.store(response.status().as_u16(), Ordering::SeqCst);
            },
        ));
    let server = dual(app, server::Builder::new()).await;
    let run = async {
        // Compression: gzip on request, the same compressed bytes over every protocol.
        let gz = agree(
            &server,
            || {
                Request::get(server.url("/text"))
                    .header("accept-encoding", "gzip")
                    .body(Full::default())
                    .unwrap()
            },
            &["content-encoding", "vary"],
        )
        .await;
        assert_eq!(gz.headers()["content-encoding"], "gzip");
        let mut plain = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz.body()[..]), &mut plain).unwrap();
        assert_eq!(plain, "tower-quiche ".repeat(200));

        // Timeout: 408 from the layer.
        let slow = agree(&server, || server.get("/slow"), &[]).await;
        assert_eq!(slow.status(), StatusCode::REQUEST_TIMEOUT);

        // Request body limit: 413 past 1 KiB, fine below.
        let big = agree(
            &server,
            || {
                Request::post(server.url("/upload"))
                    .body(Full::new(Bytes::from(vec![b'a'; 10_000])))
                    .unwrap()
            },
            &[],
        )
        .await;
        assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let small = agree(
            &server,
            || {
                Request::post(server.url("/upload"))
                    .body(Full::new(Bytes::from(vec![b'a'; 100])))
                    .unwrap()
            },
            &[],
        )
        .await;
        assert_eq!(small.body(), "100");

        // CORS: a preflight answered by the layer.
        let preflight = || {
            Request::builder()
                .method(Method::OPTIONS)
                .uri(server.url("/text"))
                .header("origin", "https://example.org")
                .header("access-control-request-method", "GET")
                .body(Full::default())
                .unwrap()
        };
        let cors = agree(
            &server,
            preflight,
            &["access-control-allow-origin", "access-control-allow-methods"],
        )
        .await;
        assert_eq!(cors.headers()["access-control-allow-origin"], "*");

        // Trace: the layer saw the HTTP/3 response.
        traced.store(0, Ordering::SeqCst);
        let _ = server.h3(server.get("/text")).await;
        assert_eq!(
            traced.load(Ordering::SeqCst),
            200,
            "TraceLayer's on_response ran for an HTTP/3 request"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_tcp_requires_a_certificate_from_the_client_ca() {
    let clients = DevCa::new("client CA").unwrap();
    let client_ca = clients.cert_pem();
    let server = dual_with(app(), server::Builder::new(), |config| config.client_ca_pem(&client_ca)).await;
    let trusted = clients.issue(&["trusted client"]).unwrap();
    let stranger = DevCa::new("another CA").unwrap().issue(&["untrusted client"]).unwrap();
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let send = |identity| tcp::try_send(server.addr, &server.ca_pem, version, identity, server.get("/version"));
            let served = send(Some(&trusted))
                .await
                .unwrap_or_else(|e| panic!("{version:?} with a certificate from the client CA: {e}"));
            assert_eq!(served.status(), StatusCode::OK, "{version:?}");
            // With TLS 1.3 the server's refusal reaches the client as an alert on its first
            // read; either way no response comes back.
            match send(None).await {
                Ok(response) => panic!("{version:?} without a client certificate was served: {response:?}"),
                Err(e) => tracing::debug!(?version, error = %e, "no certificate: refused"),
            }
            match send(Some(&stranger)).await {
                Ok(response) => panic!("{version:?} with a certificate from another CA was served: {response:?}"),
                Err(e) => tracing::debug!(?version, error = %e, "foreign certificate: refused"),
            }
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A client offering protocols, none of them ours, is refused with no_application_protocol
/// (RFC 7301 §3.2), not served as if it had offered HTTP; one that offers no ALPN at all is
/// served whichever HTTP its first bytes speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_offering_no_protocol_of_ours_are_refused() {
    let server = dual(app(), server::Builder::new()).await;
    let run = async {
        let offering = |alpn: Option<&'static [u8]>| {
            tcp::connect_offering(server.addr, &server.ca_pem, alpn, None, Duration::ZERO)
        };
        let refused = offering(Some(b"\x03foo\x0aacme-tls/1")).await;
        let error = refused.expect_err("a client offering only foo is refused").to_string();
        assert!(error.contains("TLS handshake"), "{error}");
        let http10 = offering(Some(b"\x08http/1.0")).await.expect("HTTP/1.0 is ours too");
        assert_eq!(http10.ssl().selected_alpn_protocol(), Some(&b"http/1.0"[..]));
        for spoken in [Version::HTTP_11, Version::HTTP_2] {
            let tls = offering(None).await.expect("TLS without ALPN");
            let response = tcp::request(tls, spoken, server.get("/version")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{spoken:?} without ALPN");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// One client address cannot take every TLS handshake slot of the TCP side: once a quarter
/// of `tcp_max_connections` are in a handshake, an address gets the listener's
/// `max_handshakes_in_progress_per_address`, and its connections past that are closed at
/// once, while other addresses are served; a handshake given up frees its place.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_handshakes_one_address_never_finishes_do_not_shut_others_out() {
    use tokio::io::AsyncReadExt;
    let server = dual_with(app(), server::Builder::new().tcp_max_connections(4), |config| {
        config.max_handshakes_in_progress_per_address(1)
    })
    .await;
    let run = async {
        // A connection whose handshake is done no longer counts (answered, so the server
        // has seen the handshake end, not only the client).
        let (mut established, _driver) = tcp::Connection::open(server.addr, &server.ca_pem, Version::HTTP_11)
            .await
            .unwrap();
        let answer = established.send(server.get("/version")).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        // No TLS at all: it holds 127.0.0.1's one handshake until the TLS handshake timeout
        // (10 s).
        let mut held = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut buf = [0u8; 1];
        let open = timeout(Duration::from_secs(1), held.read(&mut buf)).await;
        assert!(open.is_err(), "the address's one handshake is admitted: {open:?}");
        let mut refused = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let closed = timeout(Duration::from_secs(5), refused.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0) | Err(_))),
            "a second handshake from the same address is refused at once: {closed:?}"
        );
        let elsewhere = tcp::send_from(
            "127.0.0.2".parse().unwrap(),
            server.addr,
            &server.ca_pem,
            server.get("/version"),
        )
        .await
        .expect("another address is served");
        assert_eq!(elsewhere.status(), StatusCode::OK);
        drop(held);
        // The server learns of the close when it next reads: 127.0.0.1 is served again soon.
        let mut served = None;
        for _ in 0..50 {
            match tcp::try_send(
                server.addr,
                &server.ca_pem,
                Version::HTTP_11,
                None,
                server.get("/version"),
            )
            .await
            {
                Ok(response) => {
                    served = Some(response.status());
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert_eq!(served, Some(StatusCode::OK), "the address's place is free again");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Reads until the server closes the connection (EOF or a reset), returning what it sent;
/// panics if it stays open for `within`.
async fn closed_by_server(tls: &mut tokio_boring::SslStream<tokio::net::TcpStream>, within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    timeout(within, async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = tls.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the server closes a connection that stalls before a complete request head");
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_that_stall_before_a_complete_request_head_are_disconnected() {
    use tokio::io::AsyncWriteExt;
    let server = dual(
        app(),
        server::Builder::new().tcp_header_read_timeout(Duration::from_secs(1)),
    )
    .await;
    let run = async {
        // Part of an HTTP/1.1 head (hyper's own timer), nothing at all, and part of the
        // HTTP/2 preface (both before hyper has chosen a protocol).
        let stalls: [(Version, &[u8]); 3] = [
            (Version::HTTP_11, b"GET /version HTTP/1.1\r\nhost: localhost\r\n"),
            (Version::HTTP_11, b""),
            (Version::HTTP_2, b"PRI * HTTP/2.0\r\n"),
        ];
        let mut stalled = Vec::new();
        for (version, partial) in stalls {
            let mut tls = tcp::connect(server.addr, &server.ca_pem, version, None).await.unwrap();
            tls.write_all(partial).await.unwrap();
            tls.flush().await.unwrap();
            stalled.push((String::from_utf8_lossy(partial).into_owned(), tls));
        }
        // Honest clients are served meanwhile.
        for version in [Version::HTTP_11, Version::HTTP_2] {
            assert_eq!(
                server.tcp(version, server.get("/version")).await.status(),
                StatusCode::OK
            );
        }
        for (partial, mut tls) in stalled {
            let received = closed_by_server(&mut tls, Duration::from_secs(15)).await;
            assert!(
                !received.starts_with(b"HTTP/1.1 200"),
                "after {partial:?}: {}",
                String::from_utf8_lossy(&received)
            );
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// The head timeout counts from the end of the TLS handshake, as its docs say: a client
/// whose handshake was slow (here 1.5 s of a 2 s head timeout) still has the whole timeout
/// for its first request (sent 1 s after the handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_head_timeout_counts_from_the_end_of_the_tls_handshake() {
    let server = dual(
        app(),
        server::Builder::new().tcp_header_read_timeout(Duration::from_secs(2)),
    )
    .await;
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let tls = tcp::connect_after(server.addr, &server.ca_pem, version, None, Duration::from_millis(1500))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let response = tcp::request(tls, version, server.get("/version"))
                .await
                .unwrap_or_else(|e| panic!("{version:?}: {e}"));
            assert_eq!(response.status(), StatusCode::OK, "{version:?}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// An HTTP/2 client answers the server's PINGs by itself: past its first request, only
/// the idle timeout keeps one that sends nothing more from holding its connection (and
/// its slot among `tcp_max_connections`) for ever. A connection with a request in flight
/// is not idle, however long the request takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_without_a_request_in_flight_close_after_the_idle_timeout() {
    let app = app().route(
        "/three-idle-timeouts",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            "slow"
        }),
    );
    let server = dual(
        app,
        server::Builder::new()
            .connection_idle_timeout(Duration::from_millis(500))
            // Far longer than the test waits: the idle timer, not the first-request one,
            // must close the connection.
            .tcp_header_read_timeout(Duration::from_secs(60))
            .http2_keep_alive(Duration::from_millis(100), Duration::from_secs(5)),
    )
    .await;
    let run = async {
        let tls = tcp::connect(server.addr, &server.ca_pem, Version::HTTP_2, None)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        let mut conn = tokio::spawn(conn);
        // A request that takes three idle timeouts: the connection stays.
        let response = send.send_request(server.get("/three-idle-timeouts")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);
        assert!(!conn.is_finished(), "closed while a request was in flight");
        // Then nothing but PINGs: shut down (a GOAWAY, which ends the client's connection
        // without an error) after the idle timeout.
        timeout(Duration::from_secs(10), &mut conn)
            .await
            .expect("the server closes an idle connection")
            .unwrap()
            .expect("a graceful shutdown");
        assert!(send.is_closed());
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_tcp_connection_limit_clients_wait_until_a_connection_closes() {
    // A long head timeout, so the idle connections stay until the test closes them.
    let builder = server::Builder::new()
        .tcp_max_connections(2)
        .tcp_header_read_timeout(Duration::from_secs(120));
    let server = dual(app(), builder).await;
    let run = async {
        // Two idle connections, accepted: their TLS handshakes completed.
        let first = tcp::connect(server.addr, &server.ca_pem, Version::HTTP_11, None)
            .await
            .unwrap();
        let _second = tcp::connect(server.addr, &server.ca_pem, Version::HTTP_2, None)
            .await
            .unwrap();
        let (addr, ca) = (server.addr, server.ca_pem.clone());
        let url = server.url("/version");
        let mut third = tokio::spawn(async move {
            let request = Request::get(url).body(Full::default()).unwrap();
            tcp::try_send(addr, &ca, Version::HTTP_11, None, request)
                .await
                .map(|r| r.status())
        });
        // Not accepted while both are open (the window only bounds how long we look).
        assert!(
            timeout(Duration::from_millis(500), &mut third).await.is_err(),
            "a third connection was served past the limit of two"
        );
        // HTTP/3 is not limited by the TCP cap.
        assert_eq!(server.h3(server.get("/version")).await.status(), StatusCode::OK);
        drop(first);
        let status = third.await.unwrap().expect("served once a connection closed");
        assert_eq!(status, StatusCode::OK);
        assert!(!server.done.is_finished(), "the server keeps running");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A response body that yields chunks of `size` bytes, `count` of them or for ever, each
/// `every` apart or as fast as it is polled, and says on `dropped` when the server drops it.
struct Chunks {
    size: usize,
    count: Option<usize>,
    every: Option<tokio::time::Interval>,
    dropped: Option<tokio::sync::mpsc::UnboundedSender<()>>,
}

impl Chunks {
    fn new(size: usize, count: Option<usize>) -> Self {
        Chunks {
            size,
            count,
            every: None,
            dropped: None,
        }
    }

    fn every(mut self, period: Duration) -> Self {
        self.every = Some(tokio::time::interval(period));
        self
    }

    fn on_drop(mut self, dropped: tokio::sync::mpsc::UnboundedSender<()>) -> Self {
        self.dropped = Some(dropped);
        self
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(every) = &mut self.every {
            std::task::ready!(every.poll_tick(cx));
        }
        match &mut self.count {
            Some(0) => return std::task::Poll::Ready(None),
            Some(count) => *count -= 1,
            None => {}
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![b'x'; self.size])))))
    }

    // As `Full` says: hyper then ends the message with the last frame, and drops the body.
    fn is_end_stream(&self) -> bool {
        self.count == Some(0)
    }
}

impl Drop for Chunks {
    fn drop(&mut self) {
        if let Some(dropped) = &self.dropped {
            let _ = dropped.send(());
        }
    }
}

/// A dual server whose body stall and idle timeouts are two seconds, whose head timeout is
/// far longer than the tests wait, and whose HTTP/2 connections PING every 300 ms (the
/// client's acknowledgements, and the PINGs' own bytes, must not count as taking a
/// response).
async fn dual_stalling_after_two_seconds(app: Router) -> Dual {
    let builder = server::Builder::new()
        .body_stall_timeout(Duration::from_secs(2))
        .connection_idle_timeout(Duration::from_secs(2))
        .tcp_header_read_timeout(Duration::from_secs(60))
        .http2_keep_alive(Duration::from_millis(300), Duration::from_secs(10));
    dual(app, builder).await
}

/// nginx's `send_timeout`: a TCP client that takes none of a response (an HTTP/1.1 socket
/// it does not read, an HTTP/2 connection whose window it leaves closed) loses its
/// connection after the body stall timeout, and the response (with its handler's state) is
/// dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_responses_the_client_does_not_take_are_dropped_after_the_stall_timeout() {
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel();
    let app = app().route(
        "/endless",
        get(move || {
            let dropped = dropped_tx.clone();
            async move { axum::body::Body::new(Chunks::new(16 * 1024, None).on_drop(dropped)) }
        }),
    );
    let server = dual_stalling_after_two_seconds(app).await;
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let (mut connection, _driver) = tcp::Connection::open(server.addr, &server.ca_pem, version)
                .await
                .unwrap();
            let unread = connection.send(server.get("/endless")).await.unwrap();
            assert_eq!(unread.status(), StatusCode::OK);
            // Over HTTP/2 the client also asks for more meanwhile, reading none of it: new
            // responses are no sign that it takes the old one.
            let more = match &connection {
                tcp::Connection::Http2(send) => {
                    let (mut send, request) = (send.clone(), server.get("/version"));
                    Some(tokio::spawn(async move {
                        let mut unread = Vec::new();
                        loop {
                            let request = request.clone();
                            if let Ok(response) = send.send_request(request).await {
                                unread.push(response);
                            }
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                    }))
                }
                tcp::Connection::Http1(_) => None,
            };
            timeout(Duration::from_secs(15), dropped.recv())
                .await
                .unwrap_or_else(|_| panic!("{version:?}: the server still holds a response its client does not take"));
            more.inspect(tokio::task::JoinHandle::abort);
            drop(unread);
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// What the TCP stall and idle timers must not cut: a handler slower than the timeouts,
/// and a body slower than them that the client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_slow_handlers_and_slow_bodies_are_not_stalls() {
    let app = app()
        .route(
            "/late-head",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(5000)).await;
                "late but whole"
            }),
        )
        .route(
            "/slow-body",
            get(|| async { axum::body::Body::new(Chunks::new(16 * 1024, Some(6)).every(Duration::from_millis(600))) }),
        );
    let server = dual_stalling_after_two_seconds(app).await;
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let late = server.tcp(version, server.get("/late-head")).await;
            assert_eq!(late.body().as_ref(), b"late but whole", "{version:?}");
            let slow = server.tcp(version, server.get("/slow-body")).await;
            assert_eq!(slow.body().len(), 6 * 16 * 1024, "{version:?}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Frames far larger than the socket's buffers, read slowly (about 8 MB/s), are not
/// stalls either:
/// - over HTTP/1.1 hyper polls a body again only once its frame is out, but the socket
///   takes bytes all along; and it drops the body once it holds the last frame, so the
///   connection, idle then and asked to close, still has most of it to send;
/// - over HTTP/2 hyper polls it again only once h2 has sent all but a window of the frame
///   before, unless the body hands it smaller pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_large_frames_read_slowly_are_not_stalls() {
    const TOTAL: usize = 48 << 20;
    let app = app()
        .route(
            "/one-frame",
            get(|| async { axum::body::Body::new(Chunks::new(TOTAL, Some(1))) }),
        )
        .route(
            "/two-frames",
            get(|| async { axum::body::Body::new(Chunks::new(TOTAL / 2, Some(2))) }),
        );
    let server = dual_stalling_after_two_seconds(app).await;
    let run = async {
        for (version, path) in [(Version::HTTP_11, "/one-frame"), (Version::HTTP_2, "/two-frames")] {
            let (mut connection, _driver) = tcp::Connection::open(server.addr, &server.ca_pem, version)
                .await
                .unwrap();
            let mut body = connection.send(server.get(path)).await.unwrap().into_body();
            let (mut received, mut paced) = (0, 0);
            while let Some(frame) = body.frame().await {
                let frame = frame.unwrap_or_else(|e| panic!("{version:?}: cut after {received} bytes: {e}"));
                received += frame.data_ref().map_or(0, Bytes::len);
                if received - paced >= 1 << 20 {
                    paced = received;
                    tokio::time::sleep(Duration::from_millis(125)).await;
                }
            }
            assert_eq!(received, TOTAL, "{version:?}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A POST to `path` whose body is fed through the returned sender: it ends when the sender
/// is dropped, and waits (a client that stops sending) while it is kept.
fn streamed_post(
    server: &Dual,
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    Request<impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + 'static>,
) {
    let (send, chunks) = tokio::sync::mpsc::channel::<Bytes>(4);
    let body = http_body_util::StreamBody::new(Box::pin(futures_util::stream::unfold(
        chunks,
        |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)), chunks))
        },
    )));
    (send, Request::post(server.url(path)).body(body).unwrap())
}

/// Sends a [`streamed_post`] on a new TCP connection of `version`, and returns the response
/// once its head comes.
async fn post_streamed(
    server: &Dual,
    version: Version,
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Result<Response<hyper::body::Incoming>, hyper::Error>>,
) {
    let (send, request) = streamed_post(server, path);
    let io = hyper_util::rt::TokioIo::new(tcp::connect(server.addr, &server.ca_pem, version, None).await.unwrap());
    let response = if version == Version::HTTP_2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move { sender.send_request(request).await })
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move { sender.send_request(request).await })
    };
    (send, response)
}

/// The status of a response [`post_streamed`] awaits, within 15 s.
async fn status_of(
    response: tokio::task::JoinHandle<Result<Response<hyper::body::Incoming>, hyper::Error>>,
) -> StatusCode {
    timeout(Duration::from_secs(15), response)
        .await
        .expect("no response within 15 s")
        .unwrap()
        .unwrap()
        .status()
}

/// What a handler made of the request body it read: the bytes it got, and whether the read
/// ended in a timeout (`Some(true)`), another error (`Some(false)`) or the body's end.
type BodyOutcome = (usize, Option<bool>);

/// How a handler of [`uploads`] reads.
#[derive(Clone, Copy, Debug)]
enum Reader {
    /// Everything, as it comes.
    Steady,
    /// One frame, then a wait for the client (a read that finds nothing for 100 ms), then
    /// this long at work without reading, then the rest.
    BusyAfterWaiting(Duration),
    /// Nothing for this long (a handler at work before it reads), then everything.
    Late(Duration),
}

/// Reads `body` as `reader` says, to its end or first error; tells `waiting` when a busy
/// reader has started waiting for the client.
async fn read_body(
    body: axum::body::Body,
    reader: Reader,
    waiting: &tokio::sync::mpsc::UnboundedSender<()>,
) -> BodyOutcome {
    let mut body = body;
    let mut read = 0;
    if let Reader::Late(busy) = reader {
        tokio::time::sleep(busy).await;
    }
    if let Reader::BusyAfterWaiting(busy) = reader {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            other => return (read, Some(matches!(other, Some(Err(_))))),
        }
        if timeout(Duration::from_millis(100), body.frame()).await.is_ok() {
            // The client sends its next part only once told: nothing came, or the test is
            // broken. Reported as an error the test then sees.
            return (read, Some(false));
        }
        let _ = waiting.send(());
        tokio::time::sleep(busy).await;
    }
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => read += frame.data_ref().map_or(0, Bytes::len),
            Err(e) => {
                let timed_out = e
                    .into_inner()
                    .downcast_ref::<tower_quiche::Error>()
                    .is_some_and(tower_quiche::Error::is_timeout);
                return (read, Some(timed_out));
            }
        }
    }
    (read, None)
}

/// Where [`uploads`] handlers report.
struct UploadReports {
    outcomes: tokio::sync::mpsc::UnboundedReceiver<BodyOutcome>,
    waiting: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl UploadReports {
    async fn outcome(&mut self, what: &str) -> BodyOutcome {
        timeout(Duration::from_secs(15), self.outcomes.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: no outcome from the handler within 15 s"))
            .unwrap()
    }

    async fn waiting(&mut self, what: &str) {
        timeout(Duration::from_secs(15), self.waiting.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: the handler did not start waiting within 15 s"))
            .unwrap();
    }
}

/// How long a [`Reader::BusyAfterWaiting`] handler works: past the 2 s stall timeout.
const BUSY: Duration = Duration::from_secs(3);

/// How long a [`Reader::Late`] handler works before it reads: well past the 2 s stall
/// timeout, so that a reader it starves would time out first.
const LATE: Duration = Duration::from_secs(5);

/// An app whose routes read their request body and report what they got: `/upload`
/// ([`Reader::Steady`]), `/upload/busy` ([`Reader::BusyAfterWaiting`] for [`BUSY`]) and
/// `/upload/late` ([`Reader::Late`] for [`LATE`]) answer after it (408 when the read timed
/// out), as `/upload/elsewhere` does, which reads
/// steadily on a thread of its own, in a runtime without timers; `/duplex` reads
/// steadily while it answers at once, with 7 parts of 1,000 bytes 500 ms apart (as a gRPC
/// stream whose server sends while its client is quiet). `/stream` answers 20 such parts
/// (10 s) without reading.
fn uploads() -> (Router, UploadReports) {
    let (outcomes_tx, outcomes) = tokio::sync::mpsc::unbounded_channel();
    let (waiting_tx, waiting) = tokio::sync::mpsc::unbounded_channel();
    let upload = |reader: Reader| {
        let (outcomes, waiting) = (outcomes_tx.clone(), waiting_tx.clone());
        post(move |request: axum::extract::Request| {
            let (outcomes, waiting) = (outcomes.clone(), waiting.clone());
            async move {
                let outcome = read_body(request.into_body(), reader, &waiting).await;
                let _ = outcomes.send(outcome);
                if outcome.1 == Some(true) {
                    StatusCode::REQUEST_TIMEOUT
                } else {
                    StatusCode::OK
                }
            }
        })
    };
    let elsewhere = (outcomes_tx.clone(), waiting_tx.clone());
    let app = app()
        .route("/upload", upload(Reader::Steady))
        .route("/upload/busy", upload(Reader::BusyAfterWaiting(BUSY)))
        .route("/upload/late", upload(Reader::Late(LATE)))
        .route(
            "/upload/elsewhere",
            post(move |request: axum::extract::Request| {
                let (outcomes, waiting) = elsewhere.clone();
                async move {
                    let (read_tx, read) = oneshot::channel();
                    std::thread::spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                        let _ =
                            read_tx.send(runtime.block_on(read_body(request.into_body(), Reader::Steady, &waiting)));
                    });
                    let outcome = read.await.expect("the reading thread panicked");
                    let _ = outcomes.send(outcome);
                    if outcome.1 == Some(true) {
                        StatusCode::REQUEST_TIMEOUT
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        )
        .route(
            "/stream",
            post(|| async { axum::body::Body::new(Chunks::new(1000, Some(20)).every(Duration::from_millis(500))) }),
        )
        .route("/upload/after", {
            // Answers at once, and reads the upload after its (empty) response ended.
            let (outcomes, waiting) = (outcomes_tx.clone(), waiting_tx.clone());
            post(move |request: axum::extract::Request| {
                let (outcomes, waiting) = (outcomes.clone(), waiting.clone());
                async move {
                    tokio::spawn(async move {
                        let _ = outcomes.send(read_body(request.into_body(), Reader::Steady, &waiting).await);
                    });
                    StatusCode::ACCEPTED
                }
            })
        })
        .route(
            "/duplex",
            post(move |request: axum::extract::Request| {
                let (outcomes, waiting) = (outcomes_tx.clone(), waiting_tx.clone());
                async move {
                    tokio::spawn(async move {
                        let _ = outcomes.send(read_body(request.into_body(), Reader::Steady, &waiting).await);
                    });
                    axum::body::Body::new(Chunks::new(1000, Some(7)).every(Duration::from_millis(500)))
                }
            }),
        );
    (app, UploadReports { outcomes, waiting })
}

/// Slowloris with a body: a TCP client that sends a request head and part of its body,
/// then nothing, no longer holds the handler (and its connection) for as long as it keeps
/// the connection open: after the body stall timeout the handler's read fails with a
/// timeout, as over HTTP/3, and the handler's answer reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_request_bodies_the_client_stops_sending_time_out() {
    let (app, mut reports) = uploads();
    let server = dual_stalling_after_two_seconds(app).await;
    let run = async {
        // `/upload/elsewhere` reads on another thread, in a runtime without timers: the
        // body's timer is the connection's runtime's.
        for version in [Version::HTTP_11, Version::HTTP_2] {
            for path in ["/upload", "/upload/elsewhere"] {
                let what = format!("{version:?} {path}");
                let (send, response) = post_streamed(&server, version, path).await;
                send.send(Bytes::from_static(b"the first part")).await.unwrap();
                assert_eq!(reports.outcome(&what).await, (14, Some(true)), "{what}");
                assert_eq!(status_of(response).await, StatusCode::REQUEST_TIMEOUT, "{what}");
                drop(send);
            }
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Only the request's own response keeps its body's wait from counting: over HTTP/2, a
/// stalled upload beside a response that streams on the same connection (for 10 s) still
/// times out, while that response goes on (a client could otherwise draw responses at
/// will to keep any number of stalled bodies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_stalled_body_is_not_kept_by_other_requests_responses() {
    let (app, mut reports) = uploads();
    let server = dual_stalling_after_two_seconds(app).await;
    let run = async {
        let io = hyper_util::rt::TokioIo::new(
            tcp::connect(server.addr, &server.ca_pem, Version::HTTP_2, None)
                .await
                .unwrap(),
        );
        let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let (no_body, request) = streamed_post(&server, "/stream");
        drop(no_body);
        let stream = sender.send_request(request).await.unwrap();
        let streaming = tokio::spawn(async move { stream.into_body().collect().await.unwrap().to_bytes().len() });
        let (send, request) = streamed_post(&server, "/upload");
        let response = tokio::spawn(async move { sender.send_request(request).await });
        send.send(Bytes::from_static(b"the first part")).await.unwrap();
        assert_eq!(reports.outcome("the stalled upload").await, (14, Some(true)));
        assert!(
            !streaming.is_finished(),
            "the upload timed out only once the other response had ended"
        );
        assert_eq!(status_of(response).await, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(streaming.await.unwrap(), 20 * 1000);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// What the TCP request body timer must not cut (under a 2 s timeout):
/// - a client that sends its body slower than the timeout in all (6 parts 700 ms apart:
///   3.5 s);
/// - a handler that waited for the client, then worked for 3 s without reading while the
///   client sent the rest;
/// - a quiet client whose response moves: a duplex exchange whose handler reads while it
///   answers for 3 s, its client sending one part and the end only once it has the whole
///   response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_slow_request_bodies_busy_handlers_and_duplex_exchanges_are_not_stalls() {
    let (app, mut reports) = uploads();
    let server = dual_stalling_after_two_seconds(app).await;
    for (path, reader) in [
        ("/upload", Reader::Steady),
        ("/upload/busy", Reader::BusyAfterWaiting(BUSY)),
    ] {
        let run = async {
            for version in [Version::HTTP_11, Version::HTTP_2] {
                let what = format!("{version:?}, {reader:?}");
                let (send, response) = post_streamed(&server, version, path).await;
                send.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
                let parts = match reader {
                    Reader::Steady => {
                        for _ in 1..6 {
                            tokio::time::sleep(Duration::from_millis(700)).await;
                            send.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
                        }
                        6
                    }
                    Reader::BusyAfterWaiting(_) => {
                        reports.waiting(&what).await;
                        send.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
                        2
                    }
                    Reader::Late(_) => unreachable!("not among the readers above"),
                };
                drop(send);
                assert_eq!(reports.outcome(&what).await, (parts * 1000, None), "{what}");
                assert_eq!(status_of(response).await, StatusCode::OK, "{what}");
            }
        };
        timeout(TEST_TIMEOUT, run).await.unwrap();
    }
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let what = format!("{version:?}, duplex");
            let (send, response) = post_streamed(&server, version, "/duplex").await;
            send.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
            let response = timeout(Duration::from_secs(15), response)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let answer = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(answer.len(), 7 * 1000, "{what}");
            drop(send);
            assert_eq!(reports.outcome(&what).await, (1000, None), "{what}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A handler that answers at once and reads the upload afterwards: while the body brings
/// bytes the connection is not idle, though no response is in flight (it used to be closed
/// an idle timeout after the response, the upload cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_an_upload_read_after_its_response_keeps_the_connection() {
    let (app, mut reports) = uploads();
    let server = dual_stalling_after_two_seconds(app).await;
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let what = format!("{version:?}, read after the response");
            let (send, response) = post_streamed(&server, version, "/upload/after").await;
            send.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
            assert_eq!(status_of(response).await, StatusCode::ACCEPTED, "{what}");
            // 5.6 s: past the idle timeout (2 s) and the grace after it (2 s more).
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                send.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
            }
            drop(send);
            assert_eq!(reports.outcome(&what).await, (9 * 1000, None), "{what}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// HTTP/2 flow control and the request body timer: a request whose handler has not
/// started reading (for 3 s, past the 2 s stall timeout) while a stream window's worth of
/// its body came must leave the client window to send another request's body on the
/// connection. With hyper's windows (the connection's no larger than one stream's) the
/// other handler waited for bytes the client could not send, and timed out (0 bytes read,
/// 408). (h2's client sends requests as a browser does; the paused handler must read
/// nothing: 10 bytes read and released would let the other body trickle in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_http2_a_paused_reader_leaves_window_for_other_requests() {
    const PAUSED_BODY: usize = 10 + 3 * 512 * 1024;
    const OTHER_BODY: usize = 256 * 1024;
    let (app, mut reports) = uploads();
    let server = dual_stalling_after_two_seconds(app).await;
    let run = async {
        let tls = tcp::connect(server.addr, &server.ca_pem, Version::HTTP_2, None)
            .await
            .unwrap();
        let (client, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let post = |path: &str| Request::post(server.url(path)).body(()).unwrap();
        let (paused_response, mut paused) = client.send_request(post("/upload/late"), false).unwrap();
        paused.send_data(Bytes::from(vec![b'x'; 10]), false).unwrap();
        // 1.5 MiB more while its handler does not read: h2 sends what the windows allow
        // (the stream's 1 MiB) and keeps the rest.
        for _ in 0..3 {
            paused.send_data(Bytes::from(vec![b'x'; 512 * 1024]), false).unwrap();
        }
        paused.send_data(Bytes::new(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut client = client.ready().await.unwrap();
        let (other_response, mut other) = client.send_request(post("/upload"), false).unwrap();
        other.send_data(Bytes::from(vec![b'x'; OTHER_BODY]), true).unwrap();
        assert_eq!(reports.outcome("the other request").await, (OTHER_BODY, None));
        assert_eq!(reports.outcome("the paused request").await, (PAUSED_BODY, None));
        for response in [other_response, paused_response] {
            let response = timeout(Duration::from_secs(15), response).await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// `max_requests_per_connection` holds on TCP as on HTTP/3: past it the connection is shut
/// down (GOAWAY over HTTP/2, `connection: close` over HTTP/1.1) once its requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_shut_down_after_max_requests_per_connection() {
    let server = dual(
        app(),
        server::Builder::new()
            .max_requests_per_connection(2)
            .connection_idle_timeout(Duration::from_secs(60))
            .tcp_header_read_timeout(Duration::from_secs(60)),
    )
    .await;
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let (mut connection, driver) = tcp::Connection::open(server.addr, &server.ca_pem, version)
                .await
                .unwrap();
            for request in 1..=2 {
                let response = connection.send(server.get("/version")).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "{version:?}");
                // Over HTTP/1.1 the last response says so, or a request the client sends
                // meanwhile would meet a closed connection.
                let close = response.headers().get(http::header::CONNECTION);
                let last_on_http1 = request == 2 && version == Version::HTTP_11;
                assert_eq!(
                    close.is_some_and(|v| v == "close"),
                    last_on_http1,
                    "{version:?} #{request}"
                );
                response.into_body().collect().await.unwrap();
            }
            timeout(Duration::from_secs(15), driver)
                .await
                .unwrap_or_else(|_| panic!("{version:?}: the connection outlived its request limit"))
                .unwrap()
                .unwrap_or_else(|e| panic!("{version:?}: not a graceful shutdown: {e}"));
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A request over HTTP/1.1 that waits for a busy service (a concurrency limit around the
/// whole app, as `ServiceBuilder` stacks have) is a request in flight: the connection's
/// head timer does not cut it off as a connection that asked for nothing. (Found by
/// review: hyper-util's adapter counted a request only once the service was ready.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_request_waiting_for_a_busy_service_is_in_flight() {
    let (entered, release) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let app = {
        let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
        Router::new()
            .route(
                "/hold",
                get(move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "held"
                }),
            )
            .route("/hello", get(|| async { "hello" }))
    };
    let service = tower::ServiceBuilder::new().concurrency_limit(1).service(app);
    // Far shorter than the wait below: without the fix the waiting request's connection
    // is shut down a head timeout (and a second's grace) after its TLS handshake.
    let server = dual_with(
        service,
        server::Builder::new().tcp_header_read_timeout(Duration::from_millis(200)),
        |config| config,
    )
    .await;
    let run = async {
        let send = |request| {
            let (addr, ca_pem) = (server.addr, server.ca_pem.clone());
            tokio::spawn(async move { tcp::send(addr, &ca_pem, Version::HTTP_11, request).await })
        };
        let held = send(server.get("/hold"));
        entered.notified().await;
        let waiting = send(server.get("/hello"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        release.notify_one();
        let response = waiting.await.expect("the waiting request was answered");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body(), "hello");
        assert_eq!(held.await.unwrap().body(), "held");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A HEAD's response has no body (RFC 9110 §9.3.2) over HTTP/2 too, whatever body the
/// service made (hyper's HTTP/2 server sends it, its HTTP/1.1 server does not; axum strips
/// it itself, a plain service may not), and keeps the `content-length` a GET would have.
///
/// An empty body says no length (a service that knows none answers a HEAD with an empty
/// body, as axum does), and a 204 has none. The server's `response_body_buffer` is beyond
/// what hyper's HTTP/2 takes (which asserted it, in every connection's task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_heads_response_has_no_body_over_http2() {
    let service = tower::service_fn(|request: Request<tower_quiche::RecvBody>| async move {
        let mut response = Response::new(Full::new(match request.uri().path() {
            "/empty" | "/204" => Bytes::new(),
            _ => Bytes::from_static(b"hello"),
        }));
        if request.uri().path() == "/204" {
            *response.status_mut() = StatusCode::NO_CONTENT;
        }
        Ok::<_, std::convert::Infallible>(response)
    });
    let server = dual_with(
        service,
        server::Builder::new().response_body_buffer(usize::MAX),
        |config| config,
    )
    .await;
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            for (path, length) in [("/", Some(&b"5"[..])), ("/empty", None), ("/204", None)] {
                let head = Request::head(server.url(path)).body(Full::default()).unwrap();
                let response = server.tcp(version, head).await;
                assert!(response.status().is_success(), "{version:?} {path}");
                assert_eq!(response.body().len(), 0, "{version:?} {path}");
                let content_length = response.headers().get("content-length").map(|v| v.as_bytes());
                assert_eq!(content_length, length, "{version:?} {path}");
            }
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Over TCP as over QUIC, a request's `ConnectionInfo` names the address the client
/// connected to, not the wildcard the listener is bound to, and an IPv4 client of a
/// dual-stack socket by its IPv4 address: allow-lists and rate limiters keyed on it see one
/// client as one key whichever protocol it came by. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_info_names_the_address_connected_to_as_quic_does() {
    init_tracing();
    let certs = certs();
    let app =
        Router::new().route(
            "/addrs",
            get(|Extension(info): Extension<ConnectionInfo>| async move {
                format!("{} {}", info.remote_addr, info.local_addr)
            }),
        );
    let bound = async {
        for _ in 0..20 {
            let config = support::h3::server_config(&certs);
            let Ok(listener) = tower_quiche::quic::Listener::bind("[::]:0", config).await else {
                return None;
            };
            let port = listener.local_addr().port();
            match tokio::net::TcpListener::bind(("::", port)).await {
                Ok(tcp) => return Some((listener, tcp, port)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(_) => return None,
            }
        }
        None
    };
    let Some((listener, tcp, port)) = bound.await else {
        eprintln!("no dual-stack [::] socket here: nothing to check");
        return;
    };
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let server = serve_dual(server::Builder::new(), listener, tcp, app, to, certs.ca_pem.clone());
    let run = async {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let response = server.tcp(version, server.get("/addrs")).await;
            let body = String::from_utf8(response.body().to_vec()).unwrap();
            let (remote, local) = body.split_once(' ').unwrap();
            assert!(remote.starts_with("127.0.0.1:"), "{version:?}: {body}");
            assert_eq!(local, format!("127.0.0.1:{port}"), "{version:?}: {body}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A TLS handshake still under way when the server shuts down ends at the shutdown
/// deadline, however long the handshake timeout: one completed after `serve` had returned
/// would be served by a server that has stopped. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_handshake_under_way_at_shutdown_ends_at_the_deadline() {
    use tokio::io::AsyncReadExt;
    let mut server = dual(
        app(),
        server::Builder::new()
            .tcp_tls_handshake_timeout(Duration::from_secs(600))
            .graceful_shutdown_timeout(Duration::from_millis(200)),
    )
    .await;
    let run = async {
        // A client that begins and sends nothing (its ClientHello "on the way").
        let mut raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        // Time for the server to accept it: one still in the listen backlog at the
        // shutdown would be closed with the listener, whatever this test is about.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.shutdown.take().unwrap().send(()).unwrap();
        let mut buf = [0u8; 64];
        // A liveness bound far below the handshake timeout: the close comes at the
        // deadline (0.2 s).
        let read = timeout(Duration::from_secs(10), raw.read(&mut buf))
            .await
            .expect("the connection was closed at the shutdown deadline");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        timeout(Duration::from_secs(10), &mut server.done)
            .await
            .expect("serve returns")
            .unwrap()
            .unwrap();
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// The TCP side's `Alt-Svc` names the port clients reach HTTP/3 at: the one set with
/// `alt_svc_port` (a NAT or a container maps the UDP port to another number), and by
/// default the listener's port on the address the client connected to, where a listener
/// bound to two addresses with port 0 has one port for each. (Found by review: the first
/// address's port was named to every client.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_alt_svc_names_the_port_clients_reach_http3_at() {
    let server = dual(app(), server::Builder::new().alt_svc_port(4433)).await;
    let run = async {
        let response = server.tcp(Version::HTTP_11, server.get("/version")).await;
        assert_eq!(response.headers()["alt-svc"], "h3=\":4433\"; ma=86400");
        // Two addresses, a port for each; one dual-stack TCP socket for both families.
        let certs = certs();
        let config = support::h3::server_config(&certs);
        let addrs = ["[::1]:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()];
        let Ok(listener) = tower_quiche::quic::Listener::bind_all(&addrs, config).await else {
            eprintln!("no IPv6 loopback here: the second case is not checked");
            return;
        };
        let (v6, v4) = (listener.local_addrs()[0], listener.local_addrs()[1]);
        assert!(v6.is_ipv6() && v4.is_ipv4() && v4.port() != v6.port());
        let Ok(tcp) = tokio::net::TcpListener::bind(("::", v4.port())).await else {
            eprintln!("no dual-stack TCP socket on that port: the second case is not checked");
            return;
        };
        let mut second = serve_dual(server::Builder::new(), listener, tcp, app(), v4, certs.ca_pem.clone());
        for (client_to, h3_port) in [
            (v4, v4.port()),
            (std::net::SocketAddr::new(v6.ip(), v4.port()), v6.port()),
        ] {
            second.addr = client_to;
            let response = second.tcp(Version::HTTP_11, second.get("/version")).await;
            let expected = format!("h3=\":{h3_port}\"; ma=86400");
            assert_eq!(response.headers()["alt-svc"], expected.as_str(), "over {client_to}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}
