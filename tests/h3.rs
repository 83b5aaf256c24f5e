//! The HTTP/3 server and client over loopback, with a real axum Router: streaming both
//! ways, concurrency, trailers, cancellation, backpressure, panics, malformed requests,
//! graceful shutdown, make-services, GOAWAY, timeouts and certificate errors.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use support::h3::*;
use support::*;
use tokio::time::timeout;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quiche::client::{Client, ResponseExt};
use tower_quiche::server;

const MIB: u64 = 1024 * 1024;

fn test_certs() -> Certs {
    certs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_and_not_found_over_axum() {
    init_tracing();
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let response = client.get(server.url("/hello")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), http::Version::HTTP_3);
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert_eq!(response.text().await.unwrap(), "hello world");
        let response = client.get(server.url("/no/such/path")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = client.head(server.url("/hello")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.bytes().await.unwrap().len(), 0, "HEAD has no body");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_download_and_upload_with_hashes() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        // Download: /bytes/{n} sends 'x' bytes.
        let response = client
            .get(server.url(&format!("/bytes/{}", 100 * MIB)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-length"], (100 * MIB).to_string().as_str());
        let (len, digest, _) = hash_body(response.into_body()).await;
        assert_eq!(len, 100 * MIB);
        let mut expected = boring::sha::Sha256::new();
        let chunk = vec![b'x'; MIB as usize];
        for _ in 0..100 {
            expected.update(&chunk);
        }
        assert_eq!(digest, expected.finish(), "download content");

        // Upload, streamed and echoed back as it arrives: hash both sides.
        let (body, sent_digest) = PatternBody::new(100 * MIB);
        let request = Request::post(server.url("/echo")).body(body).unwrap();
        let response = client.send(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (len, digest, _) = hash_body(response.into_body()).await;
        assert_eq!(len, 100 * MIB);
        assert_eq!(Some(digest), *sent_digest.lock().unwrap(), "echoed content");
    };
    timeout(Duration::from_secs(300), run).await.unwrap();
    assert_eq!(
        server.metrics.snapshot().handshakes_completed,
        1,
        "one connection for both"
    );
}

/// A burst larger than a connection's submission queue (1,024) plus its stream credit
/// waits for room, as it waits for streams: every request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_requests_on_one_connection() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = Client::builder()
        .http3_prior_knowledge()
        .quic_config(trusting(&certs))
        .max_connections_per_origin(1)
        .build()
        .unwrap();
    let run = async {
        let tasks: Vec<_> = (0..2000)
            .map(|i| {
                let client = client.clone();
                let url = server.url(&format!("/bytes/{}", 1000 + i));
                tokio::spawn(async move {
                    let response = client.get(url).send().await.expect("response");
                    assert_eq!(response.status(), StatusCode::OK);
                    assert_eq!(response.bytes().await.unwrap().len(), 1000 + i);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    let m = server.metrics.snapshot();
    assert_eq!(m.handshakes_completed, 1, "all on one connection: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_with_a_concurrency_limit_share_one_handshake() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let service = ServiceBuilder::new().concurrency_limit(32).service(client.clone());
    let run = async {
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let service = service.clone();
                let url = server.url("/hello");
                tokio::spawn(async move {
                    let request = Request::get(url).body(Empty::<bytes::Bytes>::new()).unwrap();
                    let response = service.oneshot(request).await.expect("response");
                    assert_eq!(response.text().await.unwrap(), "hello world");
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    assert_eq!(
        server.metrics.snapshot().handshakes_completed,
        1,
        "one handshake served them all"
    );
    assert_eq!(client.pooled_connections(), 1);
}

/// `Duration::MAX` is how a user says "never" for a timeout: every timeout of the client,
/// the server and the transport takes it, and requests go on as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_duration_max_mean_never() {
    let certs = test_certs();
    let never = Duration::MAX;
    let server = h3_server_on(
        &certs,
        tower_quiche::quic::ServerConfig::builder().transport(
            tower_quiche::quic::TransportConfig::new()
                .idle_timeout(never)
                .handshake_timeout(never),
        ),
        server::Builder::new()
            .request_head_timeout(never)
            .connection_idle_timeout(never)
            .body_stall_timeout(never)
            .graceful_shutdown_timeout(never),
        axum::Router::new().route("/hello", axum::routing::get(|| async { "hello world" })),
        Default::default(),
    )
    .await;
    let client = Client::builder()
        .http3_prior_knowledge()
        .quic_config(trusting(&certs))
        .connect_timeout(never)
        .pool_idle_timeout(never)
        .timeout(never)
        .read_timeout(never)
        .build()
        .unwrap();
    let run = async {
        for _ in 0..3 {
            let response = client.get(server.url("/hello")).send().await.unwrap();
            assert_eq!(response.text().await.unwrap(), "hello world");
            // The pooled connection idles between requests: its idle deadline is computed.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(client.pooled_connections(), 1);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    assert_eq!(server.metrics.snapshot().handshakes_completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_both_ways() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let response = client.get(server.url("/trailers")).send().await.unwrap();
        let (_, digest, trailers) = hash_body(response.into_body()).await;
        let trailers = trailers.expect("response trailers");
        assert_eq!(trailers["x-trailer"], "yes");
        assert_eq!(trailers["x-body-sha256"], hex(&digest).as_str());

        let (mut body, _) = PatternBody::new(100_000);
        let mut sent = HeaderMap::new();
        sent.insert("x-upload-check", HeaderValue::from_static("abc123"));
        body.trailers = Some(sent);
        let response = client
            .send(Request::post(server.url("/trailer-echo")).body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["x-upload-check"],
            "abc123",
            "the server saw the request trailers"
        );
        assert_eq!(response.text().await.unwrap(), "100000");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_never_reads_its_body_still_answers() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let (body, _) = PatternBody::new(20 * MIB);
        let response = client
            .send(Request::post(server.url("/ignore")).body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "ignored");
        // The connection is fine afterwards.
        assert_eq!(
            client
                .get(server.url("/hello"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "hello world"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A handler that answers without reading its body has the server stop the upload
/// (STOP_SENDING, RFC 9114 §4.1.2): the stream is done once the client's RESET_STREAM
/// comes, and its stream credit goes back to the client. Eight such requests, one after
/// another, on one connection with credit for two streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_upload_gives_its_stream_credit_back() {
    let certs = test_certs();
    let two_streams = tower_quiche::quic::ServerConfig::builder()
        .transport(tower_quiche::quic::TransportConfig::new().max_concurrent_bidi_streams(2));
    let server = h3_test_server_on(&certs, two_streams, server::Builder::new()).await;
    let client = Client::builder()
        .http3_prior_knowledge()
        .max_connections_per_origin(1)
        .quic_config(trusting(&certs))
        .build()
        .unwrap();
    let run = async {
        for i in 0..8 {
            let (body, _) = PatternBody::new(4 * MIB);
            let response = timeout(
                Duration::from_secs(10),
                client.send(Request::post(server.url("/ignore")).body(body).unwrap()),
            )
            .await
            .unwrap_or_else(|_| panic!("request {i} got no stream"))
            .unwrap();
            assert_eq!(response.text().await.unwrap(), "ignored");
        }
        assert_eq!(client.pooled_connections(), 1, "all on one connection");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_back_the_sender_on_both_sides() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        // A client that reads a 100 MiB response slowly: the server produces only what
        // the windows and buffers hold.
        let response = client
            .get(server.url(&format!("/count/{}", 100 * MIB)))
            .send()
            .await
            .unwrap();
        let mut body = response.into_body();
        let _ = body.frame().await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let produced = server.probe.produced.load(Ordering::Relaxed);
        assert!(
            produced < 8 * MIB,
            "the server produced {produced} bytes for a reader that read one chunk"
        );
        drop(body);

        // A handler that reads slowly: the client's upload is held back the same way.
        let (mut body, _) = PatternBody::new(100 * MIB);
        let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
        body.produced = Some(Arc::clone(&produced));
        let request = client.send(Request::post(server.url("/slow-sink")).body(body).unwrap());
        let pending = tokio::spawn(request);
        tokio::time::sleep(Duration::from_millis(800)).await;
        let sent = produced.load(Ordering::Relaxed);
        let read = server.probe.slow_read.load(Ordering::Relaxed);
        assert!(
            sent < 8 * MIB,
            "the client produced {sent} bytes for a handler that read {read}"
        );
        pending.abort();
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancellation_mid_upload_and_mid_download() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        // Mid-upload: the response future is dropped while the body streams.
        let (body, _) = PatternBody::new(1024 * MIB);
        let request = client.send(Request::post(server.url("/watch-sink")).body(body).unwrap());
        let _ = timeout(Duration::from_millis(500), request).await;
        for _ in 0..50 {
            if server.probe.handler_cancelled.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            server.probe.handler_cancelled.load(Ordering::SeqCst),
            "the reset cancelled the handler"
        );

        // Mid-download: the body is dropped after 1 MiB of 1 GiB: STOP_SENDING.
        let response = client
            .get(server.url(&format!("/count/{}", 1024 * MIB)))
            .send()
            .await
            .unwrap();
        let mut body = response.into_body();
        let mut got = 0;
        while got < MIB {
            got += body
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .map(|d| d.len() as u64)
                .unwrap_or(0);
        }
        drop(body);
        // STOP_SENDING reaches the server within a round trip; allow a busy machine time.
        let mut after_stop = server.probe.produced.load(Ordering::Relaxed);
        let mut stopped = false;
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = server.probe.produced.load(Ordering::Relaxed);
            if now == after_stop {
                stopped = true;
                break;
            }
            after_stop = now;
        }
        assert!(stopped, "the server stopped producing");
        assert!(after_stop < 64 * MIB, "produced {after_stop}");
        // Same connection, next request.
        assert_eq!(
            client
                .get(server.url("/hello"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "hello world"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    assert_eq!(server.metrics.snapshot().handshakes_completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_only_its_own_request() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let err = client.get(server.url("/panic")).send().await.unwrap_err();
        assert!(err.is_reset(), "{err}");
        assert_eq!(
            err.code(),
            Some(tower_quiche::Code::Stream(tower_quiche::codes::H3_INTERNAL_ERROR))
        );
        assert_eq!(
            client
                .get(server.url("/hello"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "hello world"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    assert_eq!(
        server.metrics.snapshot().handshakes_completed,
        1,
        "the connection survived"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let certs = test_certs();
    let mut server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let slow: Vec<_> = (0..5)
            .map(|_| {
                let client = client.clone();
                let url = server.url("/slow");
                tokio::spawn(async move { client.get(url).send().await?.bytes().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.shutdown.take().unwrap().send(()).unwrap();
        for task in slow {
            let body = task.await.unwrap().expect("an accepted request completes");
            assert_eq!(body.len(), 200);
        }
        timeout(Duration::from_secs(10), &mut server.done)
            .await
            .expect("serve returns")
            .unwrap()
            .unwrap();
        // No longer accepting.
        let fresh = Client::builder()
            .http3_prior_knowledge()
            .quic_config(trusting(&certs))
            .connect_timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        assert!(fresh.get(server.url("/hello")).send().await.is_err());
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_make_service_sees_the_peer_address() {
    let certs = test_certs();
    let listener = listener(&certs).await;
    let port = listener.local_addr().port();
    let make = tower::service_fn(|info: server::ConnectionInfo| async move {
        let peer = info.remote_addr.to_string();
        Ok::<_, std::convert::Infallible>(
            axum::Router::new().route("/peer", axum::routing::get(move || async move { peer })),
        )
    });
    tokio::spawn(server::serve_make_service(listener, make).into_future());
    let endpoint = h3_client_endpoint(&certs);
    let run = async {
        let (mut send, _conn) = tower_quiche::client::conn::handshake(&endpoint, &format!("localhost:{port}"))
            .await
            .unwrap();
        send.ready().await.unwrap();
        let request = Request::get(format!("https://localhost:{port}/peer"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!(response.text().await.unwrap(), endpoint.local_addr().to_string());
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A server may open a connection with no stream credit for requests, and grant it
/// later: the handshake completes all the same, as soon as the connection is established,
/// and readiness waits for the credit. (Found by review: the handshake waited for credit,
/// here until the idle timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_completes_without_stream_credit() {
    let certs = test_certs();
    let quic = tower_quiche::quic::ServerConfig::builder()
        .transport(tower_quiche::quic::TransportConfig::default().max_concurrent_bidi_streams(0));
    let server = h3_test_server_on(&certs, quic, server::Builder::new()).await;
    let endpoint = h3_client_endpoint(&certs);
    let authority = format!("localhost:{}", server.addr.port());
    // A task of its own: nothing but the connection wakes it (a timeout around it here
    // would, and hide a handshake that waits for a wake-up that never comes). Well within
    // what ended the wait before: the next thing the connection heard, or its idle timeout.
    let handshake = tokio::spawn(async move { tower_quiche::client::conn::handshake(&endpoint, &authority).await });
    let (mut send, _conn) = timeout(Duration::from_secs(5), handshake)
        .await
        .expect("the handshake waited for stream credit")
        .unwrap()
        .unwrap();
    let ready = std::future::poll_fn(|cx| std::task::Poll::Ready(send.poll_ready(cx).is_pending()));
    assert!(ready.await, "ready without credit");
}

/// A make-service that never answers holds up new connections, but not a graceful
/// shutdown: the server stops when told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_make_service_that_never_answers_does_not_hold_up_the_shutdown() {
    let certs = test_certs();
    let listener = listener(&certs).await;
    let port = listener.local_addr().port();
    let (made_tx, mut made) = tokio::sync::mpsc::unbounded_channel();
    let make = tower::service_fn(move |_info: server::ConnectionInfo| {
        let _ = made_tx.send(());
        std::future::pending::<Result<axum::Router, std::convert::Infallible>>()
    });
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(
        server::serve_make_service(listener, make)
            .with_graceful_shutdown(async move {
                let _ = stop.await;
            })
            .into_future(),
    );
    let endpoint = h3_client_endpoint(&certs);
    let run = async {
        // The handshake waits on the server's application, which waits on the make-service.
        let connecting = tokio::spawn(async move {
            let _ = tower_quiche::client::conn::handshake(&endpoint, &format!("localhost:{port}")).await;
        });
        made.recv().await.expect("the make-service was called");
        stop_tx.send(()).unwrap();
        serving.await.unwrap().unwrap();
        connecting.abort();
    };
    timeout(TEST_TIMEOUT, run).await.expect("the server stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_moves_new_requests_to_a_new_connection() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new().max_requests_per_connection(10)).await;
    let client = client(&certs);
    let run = async {
        for i in 0..35 {
            let response = client
                .get(server.url("/hello"))
                .send()
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(response.text().await.unwrap(), "hello world");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    let m = server.metrics.snapshot();
    assert!(m.handshakes_completed >= 4, "ten requests per connection: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_layer_bounds_a_slow_request() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let mut service = ServiceBuilder::new()
        .timeout(Duration::from_millis(300))
        .service(client(&certs));
    let run = async {
        // The head comes after 2 s: the layer gives up at 300 ms.
        let request = Request::get(server.url("/late-head"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let err = ServiceExt::<Request<Empty<bytes::Bytes>>>::ready(&mut service)
            .await
            .unwrap()
            .call(request)
            .await
            .unwrap_err();
        assert!(
            err.is::<tower::timeout::error::Elapsed>(),
            "the timeout layer fired: {err}"
        );
        let request = Request::get(server.url("/hello"))
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = ServiceExt::<Request<Full<bytes::Bytes>>>::ready(&mut service)
            .await
            .unwrap()
            .call(request)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_failures_say_what_went_wrong() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let untrusting = Client::builder().http3_prior_knowledge().build().unwrap();
    let err = timeout(TEST_TIMEOUT, untrusting.get(server.url("/hello")).send())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.is_tls(), "{err}");
    assert!(
        err.to_string().contains("unable to get local issuer certificate"),
        "{err}"
    );
    let insecure = tower_quiche::quic::ClientConfig::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let insecure = Client::builder()
        .http3_prior_knowledge()
        .quic_config(insecure)
        .build()
        .unwrap();
    let response = timeout(TEST_TIMEOUT, insecure.get(server.url("/hello")).send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_responses_come_before_the_final_one() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let response = client.get(server.url("/early-hints")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "1xx is skipped");
        let hints = response
            .extensions()
            .get::<tower_quiche::client::InformationalResponses>()
            .expect("the 103 is visible to those who ask")
            .clone();
        assert_eq!(hints.0.len(), 1);
        assert_eq!(hints.0[0].status(), StatusCode::EARLY_HINTS);
        assert_eq!(hints.0[0].headers()["link"], "</style.css>; rel=preload; as=style");
        assert_eq!(response.text().await.unwrap(), "final");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_client_is_ready_only_with_stream_credit() {
    use std::task::Poll;
    let certs = test_certs();
    let config = tower_quiche::quic::ServerConfig::builder()
        .cert_chain_pem(&certs.leaf.cert_pem)
        .private_key_pem(&certs.leaf.key_pem)
        .transport(tower_quiche::quic::TransportConfig::new().max_concurrent_bidi_streams(2))
        .build()
        .unwrap();
    let listener = tower_quiche::quic::Listener::bind("127.0.0.1:0", config).await.unwrap();
    let url = format!("https://localhost:{}", listener.local_addr().port());
    tokio::spawn(server::serve(listener, support::h3::routes::router()).into_future());
    let client = client(&certs);
    let mut origin = client.origin(&url).unwrap();
    let run = async {
        let empty = || {
            Request::get(format!("{url}/slow"))
                .body(Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        // Two slow requests take the server's two streams.
        let mut slow = Vec::new();
        for _ in 0..2 {
            ServiceExt::<Request<Empty<bytes::Bytes>>>::ready(&mut origin)
                .await
                .unwrap();
            slow.push(tokio::spawn(origin.call(empty())));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let poll = std::future::poll_fn(|cx| {
            Poll::Ready(Service::<Request<Empty<bytes::Bytes>>>::poll_ready(&mut origin, cx))
        })
        .await;
        assert!(poll.is_pending(), "no stream credit left: not ready");
        for task in slow {
            assert_eq!(task.await.unwrap().unwrap().bytes().await.unwrap().len(), 200);
        }
        // The server grants streams again as those end.
        timeout(
            Duration::from_secs(5),
            ServiceExt::<Request<Empty<bytes::Bytes>>>::ready(&mut origin),
        )
        .await
        .expect("ready again")
        .unwrap();
        let response = origin
            .call(
                Request::get(format!("{url}/hello"))
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "hello world");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// RFC 9110 §6.6.1: an origin server with a clock sends `Date`, as hyper does over TCP; a
/// service's own is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_a_date_unless_the_service_set_one() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        for path in ["/hello", "/no/such/path"] {
            let response = client.get(server.url(path)).send().await.unwrap();
            let date = response.headers().get("date").expect("a date").to_str().unwrap();
            assert!(httpdate::parse_http_date(date).is_ok(), "an IMF-fixdate: {date}");
            assert_eq!(response.headers().get_all("date").iter().count(), 1);
        }
        let response = client.get(server.url("/dated")).send().await.unwrap();
        let dates: Vec<_> = response.headers().get_all("date").iter().collect();
        assert_eq!(dates, ["Sun, 06 Nov 1994 08:49:37 GMT"]);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A request body the test feeds by hand: it stays open, unfinished, until `feed` is dropped.
fn hand_fed_body() -> (
    tokio::sync::mpsc::Sender<bytes::Bytes>,
    impl http_body::Body<Data = bytes::Bytes, Error = std::convert::Infallible> + Send + 'static,
) {
    let (feed, chunks) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let frames = futures_util::stream::unfold(chunks, |mut chunks| async move {
        let chunk = chunks.recv().await?;
        Some((Ok(http_body::Frame::data(chunk)), chunks))
    });
    (feed, http_body_util::StreamBody::new(frames))
}

/// A request dropped while its body waits for its next frame drops that body at once (its
/// producer learns that nobody listens), as hyper does, instead of holding it until the
/// body yields again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_drops_its_waiting_body_at_once() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let (feed, body) = hand_fed_body();
        feed.send(bytes::Bytes::from_static(b"start")).await.unwrap();
        let request = Request::post(server.url("/sink")).body(body).unwrap();
        let cancelled = timeout(Duration::from_millis(200), client.send(request)).await;
        assert!(cancelled.is_err(), "the server waits for the rest of the body");
        timeout(Duration::from_secs(5), feed.closed())
            .await
            .expect("the request body is dropped once the request is");
        let response = client.get(server.url("/hello")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "hello world");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A request that stops waiting while its connection's handshake is under way (its
/// caller's timeout, shorter than the handshake on a slow path) does not abandon that
/// handshake: the next request finds the connection it made, instead of starting a
/// handshake of its own that the same timeout would cut again. (Found by review: the
/// attempt ran inside the first request's future, and went with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_stops_waiting_leaves_the_handshake_to_the_next() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    // 100 ms each way: the handshake takes at least two round trips, 400 ms.
    let relay = slow_path(server.addr, Duration::from_millis(100)).await;
    let client = client(&certs);
    let url = format!("https://localhost:{}/hello", relay.port());
    let run = async {
        let gave_up = timeout(Duration::from_millis(150), client.get(&url).send()).await;
        assert!(gave_up.is_err(), "answered sooner than the handshake can complete");
        let hello = client.get(&url).send().await.unwrap();
        assert_eq!(hello.text().await.unwrap(), "hello world");
        assert_eq!(
            server.metrics.snapshot().handshakes_started,
            1,
            "the second request used the first one's handshake"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A connection that drains because it reached its request cap still ends at the server's
/// shutdown deadline: a tunnel open on it (which no stall timer ends) does not keep it open
/// after `serve` has returned. (Found by review: a drain that had begun ignored the
/// shutdown and its deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_draining_for_its_request_cap_ends_at_the_shutdown_deadline() {
    use tokio::io::AsyncReadExt;
    let certs = test_certs();
    let builder = server::Builder::new()
        .max_requests_per_connection(1)
        .graceful_shutdown_timeout(Duration::from_millis(200));
    let mut server = h3_server(&certs, builder).await;
    let client = client(&certs);
    let run = async {
        // The connection's one request: it drains, and its tunnel stays open.
        let mut tunnel = client.tunnel(server.url("/tunnel-echo"), "echo").await.unwrap();
        server.shutdown.take().unwrap().send(()).unwrap();
        (&mut server.done).await.unwrap().unwrap();
        let mut rest = Vec::new();
        // Far less than the 30 s QUIC idle timeout (which the client's keep-alive PINGs for
        // an open tunnel would put off anyway).
        let ended = timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the tunnel outlived the server's shutdown");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A response body that yields empty frames until `stop` is set, then ends; or, should
/// nothing set it, gives up at `give_up_at` and says so in `gave_up`.
struct EmptyFrames {
    stop: Arc<std::sync::atomic::AtomicBool>,
    give_up_at: std::time::Instant,
    gave_up: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for EmptyFrames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.stop.load(Ordering::Relaxed) {
            return std::task::Poll::Ready(None);
        }
        if std::time::Instant::now() >= self.give_up_at {
            self.gave_up.store(true, Ordering::Relaxed);
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::new()))))
    }
}

/// A response body that is always ready with an empty frame does not hold the connection's
/// task (which polls every response body) for good: another request on the same connection
/// is answered meanwhile. (Found by review: the pump never returned `Pending`, so the
/// connection froze and its worker thread spun.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_endless_empty_frames_does_not_freeze_its_connection() {
    let certs = test_certs();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gave_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (body_stop, body_gave_up) = (Arc::clone(&stop), Arc::clone(&gave_up));
    let router = axum::Router::new()
        .route(
            "/empty-frames",
            axum::routing::get(move || {
                let body = EmptyFrames {
                    stop: Arc::clone(&body_stop),
                    // Far beyond any wait for `/hello` on a connection that is not frozen.
                    give_up_at: std::time::Instant::now() + Duration::from_secs(20),
                    gave_up: Arc::clone(&body_gave_up),
                };
                async move { axum::response::Response::new(axum::body::Body::new(body)) }
            }),
        )
        .route("/hello", axum::routing::get(|| async { "hello" }));
    let server = h3_server_with(&certs, server::Builder::new(), router, Default::default()).await;
    let client = client(&certs);
    let endless = client.get(server.url("/empty-frames")).send().await.unwrap();
    // The same client, so the same connection. A frozen connection answers only once the
    // endless body gives up (not a timeout here: a frozen worker thread can hold up the
    // timer too).
    let hello = client.get(server.url("/hello")).send().await.unwrap();
    assert!(
        !gave_up.load(Ordering::Relaxed),
        "answered only after the endless body gave up"
    );
    stop.store(true, Ordering::Relaxed);
    assert_eq!(hello.text().await.unwrap(), "hello");
    assert!(endless.bytes().await.unwrap().is_empty());
}

/// A raw HTTP/3 server whose every connection `make` drives (`RawH3`), and the URL of
/// `path` on it.
async fn raw_server<F: OnH3Event>(
    certs: &Certs,
    path: &str,
    make: impl Fn() -> RawH3<F> + Send + 'static,
) -> (String, tokio::task::JoinHandle<()>) {
    let (addr, _, serving) = raw_h3_server_on(listener(certs).await, move |_| make());
    (format!("https://localhost:{}{path}", addr.port()), serving)
}

/// A raw server connection that answers every request `200` with a `content-length` of
/// `length` (true or not), then `body` and the stream's end.
fn answer_200(length: &'static [u8], body: &'static [u8]) -> RawH3<impl OnH3Event> {
    RawH3::new(move |h3, conn, id, event| {
        if let quiche::h3::Event::Headers { .. } = event {
            let head = [(&b":status"[..], &b"200"[..]), (b"content-length", length)];
            let _ = h3.send_response(conn, id, &head, false);
            let _ = h3.send_body(conn, id, body, true);
        }
    })
}

/// A request in flight when the server closes its connection fails with the server's
/// close code, even H3_NO_ERROR: the server was reached (the automatic mode does not take
/// such a failure for a network that drops UDP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_by_the_servers_close_carries_its_code() {
    let certs = test_certs();
    let (url, serving) = raw_server(&certs, "/", || {
        RawH3::new(|_h3, conn, _id, event| {
            if matches!(event, quiche::h3::Event::Headers { .. }) {
                let _ = conn.close(true, tower_quiche::codes::H3_NO_ERROR, b"going away");
            }
        })
    })
    .await;
    let client = client(&certs);
    let run = async {
        let error = client.get(url).send().await.unwrap_err();
        assert_eq!(
            error.code(),
            Some(tower_quiche::Code::Application(tower_quiche::codes::H3_NO_ERROR)),
            "{error}"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    serving.abort();
}

/// RFC 9114 §4.1.1: a client that gives up a stream because the response is malformed
/// resets the request body it has not finished sending, so the server learns why instead
/// of waiting for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_response_makes_the_client_reset_its_unfinished_request() {
    use quiche::h3::Event;
    let certs = test_certs();
    let (resets_tx, mut resets) = tokio::sync::mpsc::unbounded_channel();
    // Every request gets a malformed response (tower-quiche's own server refuses to send
    // one): a content-length of 3, then ten bytes and no end. Request bodies are read and
    // dropped; how each request stream was reset is reported.
    let (url, serving) = raw_server(&certs, "/lying-length", move || {
        let resets = resets_tx.clone();
        RawH3::new(move |h3, conn, id, event| match event {
            Event::Headers { .. } => {
                let head = [(&b":status"[..], &b"200"[..]), (b"content-length", b"3")];
                let _ = h3.send_response(conn, id, &head, false);
                let _ = h3.send_body(conn, id, b"0123456789", false);
            }
            Event::Data => while h3.recv_body(conn, id, &mut [0; 4096]).is_ok() {},
            Event::Reset(code) => {
                let _ = resets.send(code);
            }
            _ => {}
        })
    })
    .await;
    let client = client(&certs);
    let run = async {
        let (feed, body) = hand_fed_body();
        feed.send(bytes::Bytes::from_static(b"request")).await.unwrap();
        let request = Request::post(url).body(body).unwrap();
        let response = client.send(request).await.unwrap();
        assert_eq!(response.headers()["content-length"], "3");
        let err = response.into_body().collect().await.unwrap_err();
        assert!(err.is_protocol(), "{err}");
        let code = resets.recv().await.expect("the server saw the request reset");
        assert_eq!(code, tower_quiche::codes::H3_MESSAGE_ERROR);
        drop(feed);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    serving.abort();
}

/// A response body that ends (FIN) short of its content-length is malformed (RFC 9114
/// §4.1.2): its reader gets an error, not a clean end that would pass three bytes for the
/// ten the head promised. (Found by review: the end was recorded before the length was
/// compared, and the error then had no reader to reach.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_shorter_than_its_content_length_fails() {
    let certs = test_certs();
    let (url, serving) = raw_server(&certs, "/short", || answer_200(b"10", b"abc")).await;
    let client = client(&certs);
    let run = async {
        let response = client.get(&url).send().await.unwrap();
        let err = response.into_body().collect().await.unwrap_err();
        assert!(err.is_protocol(), "{err}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    serving.abort();
}

/// A client ignores the content-length of a 2xx to CONNECT (RFC 9110 §8.6): a server that
/// sends `content-length: 0` there (some do) still carries the tunnel's bytes, which would
/// otherwise be "too many" and end the tunnel. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_ignores_the_content_length_of_its_2xx() {
    use tokio::io::AsyncReadExt;
    let certs = test_certs();
    let (url, serving) = raw_server(&certs, "/tunnel", || answer_200(b"0", b"tunnelled").extended_connect()).await;
    let client = client(&certs);
    let run = async {
        let mut tunnel = client.tunnel(&url, "echo").await.unwrap();
        let mut received = Vec::new();
        tunnel.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"tunnelled");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    serving.abort();
}

/// RFC 9114 §4.1: a server may answer without reading the request and ask the client to
/// stop sending it (STOP_SENDING); the client stops its body but still delivers the whole
/// response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_keeps_the_full_response_after_the_servers_stop_sending() {
    const ANSWER: usize = 4 * MIB as usize;
    let certs = test_certs();
    let router = axum::Router::new().route("/answer-at-once", axum::routing::post(|| async { vec![b'a'; ANSWER] }));
    let server = h3_server_with(&certs, server::Builder::new(), router, Default::default()).await;
    let client = client(&certs);
    let run = async {
        let (feed, body) = hand_fed_body();
        // A large, slow request body: 16 KiB every 10 ms until the client stops taking it.
        let feeder = tokio::spawn(async move {
            let mut sent = 0;
            while feed.send(bytes::Bytes::from(vec![b'r'; 16 * 1024])).await.is_ok() {
                sent += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        });
        let request = Request::post(server.url("/answer-at-once")).body(body).unwrap();
        let response = client.send(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let answer = response.into_body().collect().await.expect("the whole response");
        assert_eq!(answer.to_bytes().len(), ANSWER);
        // The client dropped the request body: the feeder's sends fail and it ends.
        let sent = feeder.await.unwrap();
        assert!(sent > 0);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// quiche sends a HEADERS frame whole, into what the congestion window lets it buffer: a
/// request head larger than that used to wait for ever, and every request queued behind
/// it with it. It now fails at once with a clear error, and the client goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_can_never_be_sent_fails_and_the_client_goes_on() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let error = client
            .get(server.url("/hello"))
            .header("x-big", "c".repeat(40_000))
            .send()
            .await
            .unwrap_err();
        assert!(error.to_string().contains("congestion window"), "{error}");
        let response = client.get(server.url("/hello")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "hello world");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// hyper's shape for an accept loop of one's own: `serve_connection` serves one connection,
/// the returned future ends with it, and `graceful_shutdown` lets a request in flight finish
/// before the connection closes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_connection_serves_one_connection_and_drains_it() {
    let certs = test_certs();
    let mut listener = listener(&certs).await;
    let url = format!("https://localhost:{}", listener.local_addr().port());
    let probe = Arc::new(Probe::default());
    let router = test_router(Arc::clone(&probe));
    let client = client(&certs);
    let run = async {
        let server = tokio::spawn(async move {
            let incoming = listener.accept().await.unwrap();
            let connection = server::Builder::new().serve_connection(incoming, router);
            (connection, listener)
        });
        let hello = client.get(format!("{url}/hello")).send().await.unwrap();
        assert_eq!(hello.text().await.unwrap(), "hello world");
        let (connection, _listener) = server.await.unwrap();
        // A request in flight when the shutdown starts is answered whole: a large body, the
        // shutdown asked for once its first bytes are produced.
        const LEN: u64 = 4 << 20;
        let slow = tokio::spawn({
            let client = client.clone();
            let url = format!("{url}/count/{LEN}");
            async move { client.get(url).send().await.unwrap().bytes().await.unwrap().len() }
        });
        while probe.produced.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        connection.graceful_shutdown();
        connection.await.expect("a clean close");
        assert_eq!(slow.await.unwrap() as u64, LEN);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A server that closes gracefully waits only until its last bytes are acknowledged: the
/// client's QUIC stack may still hold them, unread by a caller slower than the close. What
/// arrived before the server's CONNECTION_CLOSE is the caller's to read, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_received_before_the_server_closes_is_read_whole_after_the_close() {
    let certs = test_certs();
    let mut listener = listener(&certs).await;
    let port = listener.local_addr().port();
    let router = test_router(Arc::new(Probe::default()));
    let endpoint = h3_client_endpoint(&certs);
    let run = async {
        let server = tokio::spawn(async move {
            let incoming = listener.accept().await.unwrap();
            (server::Builder::new().serve_connection(incoming, router), listener)
        });
        let (mut send, client_connection) =
            tower_quiche::client::conn::handshake(&endpoint, &format!("localhost:{port}"))
                .await
                .unwrap();
        let client_connection = tokio::spawn(client_connection);
        send.ready().await.unwrap();
        // Larger than the client's body buffer (64 KiB), within its stream window (1 MiB):
        // the client's QUIC stack takes it all in while nobody reads.
        const LEN: usize = 512 * 1024;
        let request = Request::get(format!("https://localhost:{port}/count/{LEN}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        let (server_connection, _listener) = server.await.unwrap();
        server_connection.graceful_shutdown();
        server_connection.await.expect("a clean close");
        // The client's side of the connection has ended too before the body is read.
        let _ = client_connection.await.unwrap();
        let body = response.into_body().collect().await.expect("the whole body").to_bytes();
        assert_eq!(body.len(), LEN);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A server may send any number of 1xx heads before its answer: the client keeps a bounded
/// number of them, and the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_keeps_a_bounded_number_of_informational_responses() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let response = client.get(server.url("/many-hints/200")).send().await.unwrap();
        let kept = response
            .extensions()
            .get::<tower_quiche::client::InformationalResponses>()
            .map_or(0, |hints| hints.0.len());
        assert_eq!(kept, 16);
        assert_eq!(response.text().await.unwrap(), "final");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Requests waiting for a connection to the same origin share one attempt: when it fails,
/// they all fail with it, instead of each trying in turn (the k-th after k connect
/// timeouts). Counted as distinct connections (Initial DCIDs) reaching a socket that
/// swallows every datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_connection_share_one_attempt() {
    let certs = test_certs();
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}/hello", sink.local_addr().unwrap().port());
    let client = Client::builder()
        .http3_prior_knowledge()
        .quic_config(trusting(&certs))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let run = async {
        let requests = (0..4).map(|_| client.get(&url).send());
        let outcomes = futures_util::future::join_all(requests).await;
        assert!(outcomes.iter().all(Result::is_err));
        // Every Initial the attempts sent; a long header names its DCID after the version.
        let mut dcids = std::collections::HashSet::new();
        let mut buf = [0u8; 2048];
        while let Ok(Ok(n)) = timeout(Duration::from_millis(50), sink.recv(&mut buf)).await {
            if n > 6 && buf[0] & 0x80 != 0 {
                let len = buf[5] as usize;
                dcids.insert(buf[6..(6 + len).min(n)].to_vec());
            }
        }
        assert_eq!(dcids.len(), 1, "one connection attempt for four waiting requests");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A failed connection attempt is the next call's error, not `poll_ready`'s: tower treats
/// an error from `poll_ready` as the end of the service (`Buffer` keeps returning it), and
/// an origin that is down for a moment is not that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_client_reports_a_failed_connect_from_the_call_and_stays_usable() {
    let certs = test_certs();
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = Client::builder()
        .http3_prior_knowledge()
        .quic_config(trusting(&certs))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut origin = client
        .origin(format!("https://127.0.0.1:{}", sink.local_addr().unwrap().port()))
        .unwrap();
    let run = async {
        for _ in 0..2 {
            let ready = ServiceExt::<Request<Empty<bytes::Bytes>>>::ready(&mut origin).await;
            let service = ready.expect("a failed connect does not end the service");
            let error = service
                .call(Request::get("/hello").body(Empty::<bytes::Bytes>::new()).unwrap())
                .await
                .unwrap_err();
            assert!(error.is_timeout(), "{error}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A server and an HTTP/3 client (`configure`d further) whose QUIC idle timeout is 600 ms,
/// so that a test can be quiet for several of them.
async fn short_quic_idle(
    configure: impl FnOnce(tower_quiche::client::Builder) -> tower_quiche::client::Builder,
) -> (H3Server, Client) {
    use tower_quiche::quic::{ClientConfig, ServerConfig, TransportConfig};
    let certs = test_certs();
    let short_idle = || TransportConfig::new().idle_timeout(Duration::from_millis(600));
    let quic = ServerConfig::builder().transport(short_idle());
    let server = h3_test_server_on(&certs, quic, server::Builder::new()).await;
    let config = ClientConfig::builder()
        .ca_pem(&certs.ca_pem)
        .transport(short_idle())
        .build()
        .unwrap();
    let client = configure(Client::builder().http3_prior_knowledge().quic_config(config))
        .build()
        .unwrap();
    (server, client)
}

/// A pooled connection outlives QUIC's idle timeout while the pool keeps it: keep-alive
/// PINGs restart both sides' idle timers, so a request after a quiet spell longer than
/// that timeout reuses the connection instead of finding it silently closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_is_kept_alive_past_the_quic_idle_timeout() {
    let (server, client) = short_quic_idle(|b| b.pool_idle_timeout(Duration::from_secs(30))).await;
    let run = async {
        for _ in 0..2 {
            let response = client.get(server.url("/hello")).send().await.unwrap();
            assert_eq!(response.text().await.unwrap(), "hello world");
            // Three idle timeouts of quiet.
            tokio::time::sleep(Duration::from_millis(1800)).await;
        }
        assert_eq!(
            server.metrics.snapshot().connections_opened,
            1,
            "one connection, kept alive"
        );
        assert_eq!(client.pooled_connections(), 1);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A request body that fails mid-way is the caller's error, said as such: not a reset by
/// the server (the client resets the stream itself, with H3_INTERNAL_ERROR).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_body_is_reported_as_the_bodys_error() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, std::io::Error>> = vec![
            Ok(http_body::Frame::data(bytes::Bytes::from(vec![b'x'; 64 * 1024]))),
            Err(std::io::Error::other("the disk went away")),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let request = Request::post(server.url("/sink")).body(body).unwrap();
        let error = client.clone().oneshot(request).await.unwrap_err();
        assert!(error.is_body(), "{error}");
        assert!(!error.is_reset(), "{error}");
        assert!(error.to_string().contains("the disk went away"), "{error}");
        // The connection serves on.
        let response = client.get(server.url("/hello")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "hello world");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A request body longer or shorter than the content-length its head declares fails as the
/// caller's error before it makes a malformed message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_breaks_its_content_length_fails_as_the_callers_error() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let client = client(&certs);
    let run = async {
        for (declared, chunks) in [("10", vec!["abc", "de"]), ("3", vec!["abc", "de"])] {
            let frames: Vec<Result<http_body::Frame<bytes::Bytes>, std::io::Error>> = chunks
                .iter()
                .map(|c| Ok(http_body::Frame::data(bytes::Bytes::from_static(c.as_bytes()))))
                .collect();
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let request = Request::post(server.url("/sink"))
                .header("content-length", declared)
                .body(body)
                .unwrap();
            let error = client.clone().oneshot(request).await.unwrap_err();
            assert!(error.is_body(), "content-length {declared}: {error}");
            assert!(error.to_string().contains("content-length"), "{error}");
        }
        let response = client.get(server.url("/hello")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "hello world");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Response heads are held to the client's limit: one within it is read; one beyond it
/// fails (the connection breaks, H3_EXCESSIVE_LOAD) and the client serves on over a new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_heads_are_held_to_the_clients_limit() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let run = async {
        let response = client(&certs).get(server.url("/big-head/9000")).send().await.unwrap();
        assert_eq!(response.headers()["x-filler"].len(), 9000, "within the default 64 KiB");
        let strict = Client::builder()
            .http3_prior_knowledge()
            .quic_config(trusting(&certs))
            .max_response_header_size(4096)
            .build()
            .unwrap();
        let error = strict.get(server.url("/big-head/9000")).send().await.unwrap_err();
        assert_eq!(
            error.code(),
            Some(tower_quiche::Code::Application(tower_quiche::codes::H3_EXCESSIVE_LOAD)),
            "{error}"
        );
        let response = strict.get(server.url("/big-head/1000")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "big head");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// An extended CONNECT (RFC 9220) makes a request stream a byte stream both ways, as
/// WebSocket over HTTP/3 uses it; such a tunnel may sit idle past the body stall timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_connect_tunnel_carries_bytes_both_ways_and_may_sit_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = test_certs();
    let stall = Duration::from_millis(300);
    let server = h3_server(&certs, server::Builder::new().body_stall_timeout(stall)).await;
    let client = client(&certs);
    let run = async {
        let tunnel = client.tunnel(server.url("/tunnel-echo"), "echo").await.unwrap();
        let (mut read, mut write) = tokio::io::split(tunnel);
        write.write_all(b"first").await.unwrap();
        let mut first = [0u8; 5];
        read.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"first");
        // Idle for several stall timeouts: a tunnel is not a stalled body.
        tokio::time::sleep(stall * 4).await;
        let payload: Vec<u8> = (0..(2 * MIB as usize)).map(|i| (i % 251) as u8).collect();
        let writing = async {
            write.write_all(&payload).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let (_, read_result) = tokio::join!(writing, read.read_to_end(&mut back));
        read_result.unwrap();
        assert!(back == payload, "{} bytes echoed of {}", back.len(), payload.len());
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A `content-length` the caller put on its CONNECT neither bounds the tunnel's bytes nor
/// goes to the server (RFC 9110 §9.3.6: a CONNECT has no content). (Found by review: the
/// first byte failed the request body as longer than its length.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_on_the_clients_connect_does_not_bound_its_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = test_certs();
    let router = test_router(Default::default()).route(
        "/connect-length",
        // Writes the `content-length` the CONNECT arrived with ("none" without), then
        // echoes the tunnel.
        axum::routing::on(
            axum::routing::MethodFilter::CONNECT,
            |request: axum::extract::Request| async move {
                let length = request
                    .headers()
                    .get("content-length")
                    .map_or("none".to_string(), |v| v.to_str().unwrap_or("?").to_string());
                let (tunnel, body) = tower_quiche::tunnel::Tunnel::new(request.into_body());
                tokio::spawn(async move {
                    let (mut read, mut write) = tokio::io::split(tunnel);
                    write.write_all(format!("{length};").as_bytes()).await.unwrap();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
                axum::response::Response::new(axum::body::Body::new(body))
            },
        ),
    );
    let server = h3_server_with(&certs, server::Builder::new(), router, Default::default()).await;
    let client = client(&certs);
    let run = async {
        let mut request = Request::builder()
            .method(http::Method::CONNECT)
            .uri(server.url("/connect-length"))
            .header("content-length", "0")
            .body(())
            .unwrap();
        request
            .extensions_mut()
            .insert(tower_quiche::client::Protocol::new("echo"));
        let mut tunnel = client.open_tunnel(request).await.unwrap();
        tunnel.write_all(b"tunnelled").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut back = Vec::new();
        tunnel.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"none;tunnelled");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A tunnel its handler resets (a CONNECT proxy whose target failed) ends for the client in
/// a read error that carries the code (RFC 9114 §4.4: H3_CONNECT_ERROR), not in a clean end
/// that would pass for the whole content. The handler's `ResetStream` reaches the stream
/// through axum's body, which wraps it in an `axum::Error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_its_handler_resets_ends_in_an_error_with_the_code() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower_quiche::{Code, Error, codes};
    let certs = test_certs();
    let router = axum::Router::new().route(
        "/reset-tunnel",
        axum::routing::on(
            axum::routing::MethodFilter::CONNECT,
            |request: axum::extract::Request| async move {
                let (mut tunnel, body) = tower_quiche::tunnel::Tunnel::new(request.into_body());
                tokio::spawn(async move {
                    // The target "fails" once the client has sent its first bytes.
                    let mut first = [0u8; 5];
                    tunnel.read_exact(&mut first).await.unwrap();
                    tunnel.write_all(b"partial").await.unwrap();
                    tunnel.reset(codes::H3_CONNECT_ERROR);
                });
                axum::response::Response::new(axum::body::Body::new(body))
            },
        ),
    );
    let server = h3_server_with(&certs, server::Builder::new(), router, Default::default()).await;
    let client = client(&certs);
    let run = async {
        let mut tunnel = client.tunnel(server.url("/reset-tunnel"), "echo").await.unwrap();
        tunnel.write_all(b"hello").await.unwrap();
        // What was written before the reset may or may not arrive; the end is an error.
        let mut received = Vec::new();
        let error = tunnel.read_to_end(&mut received).await.unwrap_err();
        assert_eq!(
            Error::from_io(&error).and_then(Error::code),
            Some(Code::Stream(codes::H3_CONNECT_ERROR)),
            "{error}"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// An extended CONNECT asked for on a fresh connection waits for the server's SETTINGS
/// (RFC 9220 §3) and goes in the turn that reads them: nothing else would wake the
/// connection for it until a timer did. Eight fresh clients, so that some ask before the
/// SETTINGS are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_waiting_for_the_servers_settings_opens_when_they_arrive() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    for round in 0..8 {
        let client = client(&certs);
        // A liveness bound, far below the 30 s idle timeout that ended such a wait.
        let opened = timeout(
            Duration::from_secs(10),
            client.tunnel(server.url("/tunnel-echo"), "echo"),
        )
        .await;
        assert!(matches!(opened, Ok(Ok(_))), "round {round}: the tunnel did not open");
    }
}

/// A tunnel is carried over HTTP/3 only (the TCP side has none): a client in the automatic
/// mode opens one over HTTP/3 at the origin's own port before any `Alt-Svc` told it where
/// HTTP/3 is, instead of sending the CONNECT over TCP; a TCP-only client refuses to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_goes_over_http3_in_the_automatic_mode_and_is_refused_over_tcp_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new()).await;
    let auto = Client::builder().quic_config(trusting(&certs)).build().unwrap();
    let tcp_only = Client::builder()
        .quic_config(trusting(&certs))
        .tcp_only()
        .build()
        .unwrap();
    let run = async {
        let mut tunnel = auto.tunnel(server.url("/tunnel-echo"), "echo").await.unwrap();
        tunnel.write_all(b"over http/3").await.unwrap();
        let mut back = [0u8; 11];
        tunnel.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"over http/3");
        assert_eq!(auto.pooled_connections(), 1);
        let error = tcp_only.tunnel(server.url("/tunnel-echo"), "echo").await.unwrap_err();
        assert!(error.is_invalid_request(), "{error}");
        assert!(error.to_string().contains("needs HTTP/3"), "{error}");
        // Through an origin client of a fresh automatic client, whose `poll_ready` reserves
        // TCP for an origin that advertised no HTTP/3 yet.
        let fresh = Client::builder().quic_config(trusting(&certs)).build().unwrap();
        let mut origin = fresh.origin(server.url("/")).unwrap();
        let mut connect = Request::builder()
            .method(http::Method::CONNECT)
            .uri(server.url("/tunnel-echo"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        connect
            .extensions_mut()
            .insert(tower_quiche::client::Protocol::new("echo"));
        let response = ServiceExt::<Request<Empty<bytes::Bytes>>>::ready(&mut origin)
            .await
            .unwrap()
            .call(connect)
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        assert_eq!(response.version(), http::Version::HTTP_3);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A server that does not allow extended CONNECT says so in its SETTINGS; the client does
/// not send one then, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_extended_connect_to_a_server_that_does_not_allow_it() {
    let certs = test_certs();
    let server = h3_server(&certs, server::Builder::new().enable_connect_protocol(false)).await;
    let client = client(&certs);
    let run = async {
        let error = client.tunnel(server.url("/tunnel-echo"), "echo").await.unwrap_err();
        assert!(
            error.to_string().contains("SETTINGS_ENABLE_CONNECT_PROTOCOL"),
            "{error}"
        );
        let response = client.get(server.url("/hello")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "hello world");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A tunnel may be quiet for longer than QUIC's idle timeout: the client keeps the
/// connection alive while streams are open, not only while it waits in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tunnel_outlives_the_quic_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, client) = short_quic_idle(|b| b).await;
    let run = async {
        let mut tunnel = client.tunnel(server.url("/tunnel-echo"), "echo").await.unwrap();
        let mut buf = [0u8; 4];
        for round in 0..2 {
            tunnel.write_all(b"ping").await.unwrap();
            tunnel
                .read_exact(&mut buf)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(&buf, b"ping");
            // Three idle timeouts of quiet.
            tokio::time::sleep(Duration::from_millis(1800)).await;
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A client whose runtime shuts down while its connection is open (its process exiting,
/// say) closes the connection as it goes: the server learns of it at once, not after its
/// 30 s idle timeout (a graceful shutdown of the server would wait that long for it).
#[test]
fn a_connection_whose_runtime_shuts_down_is_closed_at_once() {
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let certs = test_certs();
    let server = server_runtime.block_on(h3_server(&certs, server::Builder::new()));
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = server.url("/hello");
    // The client outlives its runtime: its connection task is dropped with the runtime,
    // not closed because the client went away.
    let kept = client_runtime.block_on(async {
        let client = client(&certs);
        let response = client.get(url).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "hello world");
        client
    });
    assert_eq!(server.metrics.snapshot().connections_closed, 0);
    drop(client_runtime);
    let closed = server_runtime.block_on(async {
        let closing = async {
            while server.metrics.snapshot().connections_closed == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(Duration::from_secs(10), closing).await
    });
    assert!(closed.is_ok(), "the server still holds the connection");
    drop(kept);
}
