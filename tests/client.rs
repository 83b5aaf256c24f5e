//! The client's conveniences against our own server over HTTP/3 and HTTP/2: redirects
//! (within and across protocols, loops, refused targets, credentials), decompression, the
//! body size limit on decoded bytes, default headers, timeouts; the retry of a refused
//! request on another connection; an HTTP/3 response's own `Alt-Svc`; and
//! `examples/client` itself.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use bytes::Bytes;
use http::header::{ALT_SVC, AUTHORIZATION, CONTENT_ENCODING, COOKIE, HOST, LOCATION};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, Version};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use support::dual::{Dual, stop_h3};
use support::h3::{RawH3, h3_server_with, listener, trusting};
use support::*;
use tokio::time::timeout;
use tower::{Service, ServiceExt};
use tower_quiche::client::{Builder, Client, ResponseExt, redirect};
use tower_quiche::server;

/// Every route a test here asks for.
fn app(loops: Arc<AtomicUsize>) -> Router {
    let compressed = Router::new()
        .route(
            "/compressed/{n}",
            get(|UrlPath(n): UrlPath<usize>, headers: HeaderMap| async move {
                // Says which codings the client offered; tower-http compresses the body.
                let offered = headers.get("accept-encoding").cloned();
                let mut response = pattern(n, 7).into_response();
                if let Some(offered) = offered {
                    response.headers_mut().insert("x-offered", offered);
                }
                response
            }),
        )
        .layer(tower_http::compression::CompressionLayer::new());
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        // A redirect: `?l=` is the Location, `&code=` the status (302 by default).
        .route(
            "/to",
            any(|uri: Uri| async move {
                let q = query(&uri);
                let code = q.get("code").and_then(|c| c.parse().ok()).unwrap_or(302);
                let mut response = StatusCode::from_u16(code).unwrap().into_response();
                response.headers_mut().insert(LOCATION, q["l"].parse().unwrap());
                response
            }),
        )
        .route(
            "/loop",
            get(move || {
                loops.fetch_add(1, Ordering::SeqCst);
                async { (StatusCode::FOUND, [(LOCATION, "/loop")]) }
            }),
        )
        // The request's headers, a line each, sorted.
        .route(
            "/headers",
            any(|headers: HeaderMap| async move {
                let mut lines: Vec<String> = headers
                    .iter()
                    .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
                    .collect();
                lines.sort();
                lines.join("\n")
            }),
        )
        .route(
            "/echo-body",
            any(|method: http::Method, body: Bytes| async move { format!("{method} {}", body.len()) }),
        )
        // 4 MiB of zeros, gzip-compressed to a few KiB, sent as is.
        .route(
            "/bomb",
            get(|| async { ([(CONTENT_ENCODING, "gzip")], gzip(&vec![0u8; 4 << 20])) }),
        )
        .route("/stall-head", get(std::future::pending::<&'static str>))
        // 16 KiB chunks for as long as the client reads: more than it buffers, at once.
        .route(
            "/endless",
            get(|| async {
                let chunks = futures_util::stream::repeat_with(|| {
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![7u8; 16 * 1024])))
                });
                axum::body::Body::new(StreamBody::new(chunks))
            }),
        )
        .route("/stall-body", get(|| async { body_of(1, None) }))
        // "hello" zstd-coded: in one frame that asks for a window of 2^log bytes; in two
        // frames; after a skippable frame; with trailers.
        .route(
            "/zstd-window/{log}",
            get(|UrlPath(log): UrlPath<u8>| async move { ([(CONTENT_ENCODING, "zstd")], zstd_frame(log, b"hello")) }),
        )
        .route(
            "/zstd-frames",
            get(|| async {
                (
                    [(CONTENT_ENCODING, "zstd")],
                    [zstd_frame(20, b"hel"), zstd_frame(20, b"lo")].concat(),
                )
            }),
        )
        .route(
            "/zstd-skippable",
            get(|| async {
                // Magic 0x184D2A50, a 4-byte length, that many bytes of anything.
                let mut body = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
                body.extend(zstd_frame(20, b"hello"));
                ([(CONTENT_ENCODING, "zstd")], body)
            }),
        )
        .route(
            "/zstd-fails",
            get(|| async {
                // The head, then (once it has gone) an error before any byte of the body: the
                // stream is reset.
                let failing = futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err::<Frame<Bytes>, _>(std::io::Error::other("failed"))
                });
                (
                    [(CONTENT_ENCODING, "zstd")],
                    axum::body::Body::new(StreamBody::new(failing)),
                )
            }),
        )
        .route(
            "/zstd-trailers",
            get(|| async {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-check", HeaderValue::from_static("done"));
                let frames = [
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(zstd_frame(20, b"hello")))),
                    Ok(Frame::trailers(trailers)),
                ];
                (
                    [(CONTENT_ENCODING, "zstd")],
                    axum::body::Body::new(StreamBody::new(futures_util::stream::iter(frames))),
                )
            }),
        )
        // `n` chunks, one every 50 ms.
        .route(
            "/trickle/{n}",
            get(|UrlPath(n): UrlPath<usize>| async move { body_of(n, Some(Duration::from_millis(50))) }),
        )
        .merge(compressed)
}

/// The query's parameters, percent-decoded (enough for the tests' own URLs).
fn query(uri: &Uri) -> HashMap<String, String> {
    let decode = |s: &str| {
        let mut out = Vec::new();
        let mut bytes = s.bytes();
        while let Some(b) = bytes.next() {
            if b == b'%' {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap());
            } else {
                out.push(b);
            }
        }
        String::from_utf8(out).unwrap()
    };
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), decode(v)))
        .collect()
}

/// `n` chunks of `chunk`, each `every` after the last; without `every`, the body stalls
/// for good after them.
/// One zstd frame (RFC 8878 §3.1.1) holding `payload` in one raw block, its header asking
/// for a window of 2^`window_log` bytes.
fn zstd_frame(window_log: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (window_log - 10) << 3];
    // The block header: last block, raw, its size.
    let header = 1 | (payload.len() << 3);
    frame.extend_from_slice(&[header as u8, (header >> 8) as u8, (header >> 16) as u8]);
    frame.extend_from_slice(payload);
    frame
}

fn body_of(n: usize, every: Option<Duration>) -> axum::body::Body {
    let chunks = futures_util::stream::unfold(0, move |i| async move {
        if i == n {
            if every.is_none() {
                std::future::pending::<()>().await;
            }
            return None;
        }
        if let (Some(every), true) = (every, i > 0) {
            tokio::time::sleep(every).await;
        }
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"chunk"))),
            i + 1,
        ))
    });
    axum::body::Body::new(StreamBody::new(chunks))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

struct Setup {
    certs: Certs,
    server: Dual,
    loops: Arc<AtomicUsize>,
}

async fn setup() -> Setup {
    init_tracing();
    let certs = certs();
    let loops = Arc::new(AtomicUsize::new(0));
    let server = Dual::start(&certs, app(Arc::clone(&loops))).await;
    Setup { certs, server, loops }
}

/// A change to a client's settings.
type Configure = fn(Builder) -> Builder;

/// Both protocols a client may speak to our dual server: HTTP/3 with prior knowledge, and
/// HTTP/2 over TCP.
const PROTOCOLS: [(Configure, Version); 2] = [
    (Builder::http3_prior_knowledge, Version::HTTP_3),
    (Builder::tcp_only, Version::HTTP_2),
];

fn client(certs: &Certs, configure: impl FnOnce(Builder) -> Builder) -> Client {
    configure(Client::builder().quic_config(trusting(certs)))
        .build()
        .unwrap()
}

async fn text(client: &Client, url: &str) -> (StatusCode, Version, String) {
    let response = client.get(url).send().await.unwrap();
    let (status, version) = (response.status(), response.version());
    (status, version, response.text().await.unwrap())
}

/// A stream that cannot be sent again (for 307/308).
fn streaming(
    data: &'static [u8],
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>>> {
    StreamBody::new(futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(data)))]))
}

/// 301/302/303 and 307/308 as RFC 9110 §15.4 has them, over both protocols: a POST
/// redirected with 302 becomes a body-less GET; with 307 it is sent again, body and all,
/// when the body is bytes; a streaming body cannot be, and the 307 is the answer. With
/// `Policy::none()` the 302 is the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_follow_the_method_rules_over_both_protocols() {
    let s = setup().await;
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let client = client(&s.certs, protocol);
            let (status, v, body) = text(&client, &s.server.at("/to?l=/hello")).await;
            assert_eq!((status, v, body.as_str()), (StatusCode::OK, version, "hello"));

            let post = |code: u16| s.server.at(&format!("/to?l=/echo-body&code={code}"));
            for (code, expected) in [(302, "GET 0"), (303, "GET 0"), (307, "POST 4"), (308, "POST 4")] {
                let response = client.post(post(code)).body("data").send().await.unwrap();
                assert_eq!(response.text().await.unwrap(), expected, "{code} over {version:?}");
            }
            let request = Request::post(post(307)).body(streaming(b"data")).unwrap();
            let response = client.send(request).await.unwrap();
            assert_eq!(response.status(), 307, "a stream is not sent twice");

            let not_following = self::client(&s.certs, |b| protocol(b).redirect(redirect::Policy::none()));
            let (status, ..) = text(&not_following, &s.server.at("/to?l=/hello")).await;
            assert_eq!(status, StatusCode::FOUND);
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// The automatic mode: the first request goes over HTTP/2 and is redirected; the
/// redirect's `Alt-Svc` sends the followed request over HTTP/3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_answered_over_http2_is_followed_over_http3() {
    let s = setup().await;
    let client = client(&s.certs, |b| b.http3_handicap(Duration::from_secs(20)));
    let run = async {
        let response = client.get(s.server.at("/to?l=/hello")).send().await.unwrap();
        assert_eq!(response.version(), Version::HTTP_3);
        let followed = response.extensions().get::<tower_http::follow_redirect::RequestUri>();
        assert_eq!(
            followed.map(|u| u.0.path()),
            Some("/hello"),
            "the redirect was followed"
        );
        assert_eq!(response.text().await.unwrap(), "hello");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// A redirect loop ends in an error once the limit is passed: 10 redirects followed by
/// default (11 requests), or as many as the policy says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_ends_in_an_error_after_the_limit() {
    let s = setup().await;
    let run = async {
        for (policy, requests) in [(redirect::Policy::default(), 11), (redirect::Policy::limited(2), 3)] {
            s.loops.store(0, Ordering::SeqCst);
            let client = client(&s.certs, |b| b.http3_prior_knowledge().redirect(policy));
            let error = client.get(s.server.at("/loop")).send().await.unwrap_err();
            assert!(error.is_redirect(), "{error}");
            assert_eq!(s.loops.load(Ordering::SeqCst), requests);
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// A redirect to a cleartext `http://` URL is refused, not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_http_is_refused() {
    let s = setup().await;
    let client = client(&s.certs, Builder::http3_prior_knowledge);
    let run = async {
        let target = format!("http://127.0.0.1:{}/hello", s.server.addr.port());
        let error = client
            .get(s.server.at(&format!("/to?l={target}")))
            .send()
            .await
            .unwrap_err();
        assert!(error.is_redirect(), "{error}");
        assert!(error.to_string().contains(&target), "{error}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// `authorization` and `cookie` go along a redirect within the origin, and are dropped
/// when it leads to another origin, over each protocol; so is a `host` the caller set,
/// which names the first origin; other headers go along both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_host_are_dropped_when_a_redirect_leaves_the_origin() {
    let s = setup().await;
    let other = Dual::start(&s.certs, app(Arc::default())).await;
    let first_authority = s.server.url().parse::<Uri>().unwrap().authority().unwrap().to_string();
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let client = client(&s.certs, protocol);
            let send = |location: String| {
                client
                    .get(s.server.at(&format!("/to?l={location}")))
                    .header(AUTHORIZATION, "Bearer secret")
                    .header(COOKIE, "session=1")
                    .header(HOST, first_authority.as_str())
                    .header("x-kept", "yes")
                    .send()
            };
            let same = send("/headers".to_string()).await.unwrap();
            assert_eq!(same.version(), version);
            let same = same.text().await.unwrap();
            assert!(same.contains("authorization: Bearer secret"), "{version:?}: {same}");
            assert!(same.contains("cookie: session=1"), "{version:?}: {same}");
            let elsewhere = send(other.at("/headers")).await.unwrap().text().await.unwrap();
            assert!(!elsewhere.contains("authorization"), "{version:?}: {elsewhere}");
            assert!(!elsewhere.contains("cookie"), "{version:?}: {elsewhere}");
            assert!(
                !elsewhere.contains(&format!("host: {first_authority}")),
                "{version:?}: {elsewhere}"
            );
            assert!(elsewhere.contains("x-kept: yes"), "{version:?}: {elsewhere}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
    other.stop().await;
}

/// A client bound to an origin sends every request there, over either protocol, whatever
/// authority the request names (a proxy forwards its clients' `host`): over HTTP/3 that
/// authority is the request's `:authority` on the origin's connection, over TCP the
/// request names the origin (HTTP/2 forbids a `host` that disagrees with `:authority`).
/// (Found by review: over TCP the request went to the host it named.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_client_sends_requests_naming_other_hosts_to_its_origin() {
    let s = setup().await;
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let client = client(&s.certs, protocol);
            let mut origin = client.origin(s.server.url()).unwrap();
            let requests = [
                Request::get("/headers").header(HOST, "elsewhere.invalid:1234"),
                Request::get("https://elsewhere.invalid:1234/headers"),
            ];
            for request in requests {
                let request = request.body(http_body_util::Empty::<Bytes>::new()).unwrap();
                let service = ServiceExt::<Request<http_body_util::Empty<Bytes>>>::ready(&mut origin)
                    .await
                    .unwrap();
                let response = service.call(request).await.expect("sent to the bound origin");
                assert_eq!(response.version(), version);
                let seen = response.text().await.unwrap();
                if version == Version::HTTP_3 {
                    assert!(seen.contains("host: elsewhere.invalid:1234"), "{version:?}: {seen}");
                } else {
                    // HTTP/2 names the authority in `:authority`; no `host` disagrees.
                    assert!(!seen.contains("elsewhere"), "{version:?}: {seen}");
                }
            }
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// A zstd-coded body may use a window of up to 8 MiB (RFC 9659 §3), and no more: a server
/// cannot make the client hold zstd's own limit (128 MiB) for each response it decodes.
/// (Found by review.) Otherwise every body decodes whole: several frames, a skippable one
/// first, trailers after it, and none at all for a HEAD; a body that fails before its
/// first byte fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bodies_decode_whole_within_an_8_mib_window() {
    let s = setup().await;
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let client = client(&s.certs, protocol);
            for path in ["/zstd-window/23", "/zstd-frames", "/zstd-skippable"] {
                let (status, seen, text) = text(&client, &s.server.at(path)).await;
                assert_eq!(
                    (status, seen, text.as_str()),
                    (StatusCode::OK, version, "hello"),
                    "{path}"
                );
            }
            let response = client.get(s.server.at("/zstd-trailers")).send().await.unwrap();
            let collected = response.into_body().collect().await.unwrap();
            assert_eq!(
                collected.trailers().map(|t| &t["x-check"]),
                Some(&HeaderValue::from_static("done"))
            );
            assert_eq!(collected.to_bytes(), "hello");
            let head = client.head(s.server.at("/zstd-window/23")).send().await.unwrap();
            assert_eq!(
                head.bytes().await.unwrap(),
                "",
                "{version:?}: a HEAD has no body to decode"
            );
            // A body that fails before its first byte is no empty body (should the reset
            // overtake the head, the request fails as a whole: no empty body either).
            let failed = match client.get(s.server.at("/zstd-fails")).send().await {
                Ok(response) => response.bytes().await,
                Err(e) => Err(e),
            };
            assert!(failed.is_err(), "{version:?}: {failed:?}");
            let response = client.get(s.server.at("/zstd-window/24")).send().await.unwrap();
            let error = response.bytes().await.expect_err("a 16 MiB window");
            assert!(error.is_decode(), "{version:?}: {error}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// A request body whose `poll_frame` panics.
struct PanickingBody;

impl http_body::Body for PanickingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        panic!("a request body that panics (on purpose: tests/client.rs)");
    }
}

/// A request body that panics (bodies are polled in the connection's task) fails its
/// own request only, as a handler that panics does on a server: the connection, and the
/// other requests on it, go on. (Found by review: it took the connection down, and a
/// response body being read on it waited for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_panics_fails_its_own_request_only() {
    let s = setup().await;
    let client = client(&s.certs, Builder::http3_prior_knowledge);
    let run = async {
        // A response being read on the connection: one byte, then the body stays open.
        let response = client.get(s.server.at("/stall-body")).send().await.unwrap();
        let mut reading = response.into_body();
        assert!(reading.frame().await.unwrap().unwrap().is_data());
        let request = Request::post(s.server.at("/echo-body")).body(PanickingBody).unwrap();
        let error = client.clone().oneshot(request).await.expect_err("the body panicked");
        assert!(error.is_body(), "{error}");
        assert!(error.to_string().contains("a request body that panics"), "{error}");
        // The connection serves on, and the reader still waits on it.
        let (_, version, text) = text(&client, &s.server.at("/hello")).await;
        assert_eq!((version, text.as_str()), (Version::HTTP_3, "hello"));
        assert_eq!(client.pooled_connections(), 1);
        let waits = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(http_body::Body::poll_frame(std::pin::Pin::new(&mut reading), cx).is_pending())
        });
        assert!(waits.await, "the response being read ended");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// A connection whose task is dropped without closing in order (its runtime shut down,
/// say) leaves nobody waiting on it: a response body being read on another runtime ends
/// in an error. (Found by review: its reader waited for ever.)
#[test]
fn a_response_body_whose_connection_is_dropped_ends_in_an_error() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let test_runtime = runtime();
    let s = test_runtime.block_on(setup());
    let client_runtime = runtime();
    let (client, mut reading) = client_runtime.block_on(async {
        let client = client(&s.certs, Builder::http3_prior_knowledge);
        // One byte, then the body stays open.
        let response = client.get(s.server.at("/stall-body")).send().await.unwrap();
        let mut reading = response.into_body();
        assert!(reading.frame().await.unwrap().unwrap().is_data());
        (client, reading)
    });
    drop(client_runtime);
    test_runtime.block_on(async {
        let next = timeout(TEST_TIMEOUT, reading.frame())
            .await
            .expect("the reader was left waiting");
        assert!(matches!(next, Some(Err(_))), "the body ended as {next:?}");
        s.server.stop().await;
    });
    drop(client);
}

/// gzip, br and zstd: the client offers each coding that is on, the server compresses,
/// and the body comes out decoded (without its `content-encoding`), over both protocols.
/// With every coding off, nothing is offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_decompressed_in_each_coding() {
    let s = setup().await;
    let url = s.server.at("/compressed/100000");
    let expected = pattern(100_000, 7);
    let run = async {
        for (protocol, version) in PROTOCOLS {
            for coding in ["gzip", "br", "zstd"] {
                let client = client(&s.certs, |b| {
                    protocol(b)
                        .gzip(coding == "gzip")
                        .brotli(coding == "br")
                        .zstd(coding == "zstd")
                });
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.version(), version);
                assert_eq!(response.headers()["x-offered"], coding);
                assert!(response.headers().get(CONTENT_ENCODING).is_none(), "decoded");
                assert_eq!(response.bytes().await.unwrap(), expected, "{coding} over {version:?}");
            }
            let plain = client(&s.certs, |b| protocol(b).gzip(false).brotli(false).zstd(false));
            let response = plain.get(&url).send().await.unwrap();
            assert!(response.headers().get("x-offered").is_none());
            assert_eq!(response.bytes().await.unwrap(), expected);
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// The size limit of `bytes()` counts decoded bytes: 4 MiB of zeros in a few KiB of gzip
/// is too large for a 1 MiB limit (a decompression bomb), and fine under 8 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_size_limit_counts_decoded_bytes() {
    let s = setup().await;
    let run = async {
        for (protocol, _) in PROTOCOLS {
            let small = client(&s.certs, |b| protocol(b).max_response_body_size(Some(1 << 20)));
            let response = small.get(s.server.at("/bomb")).send().await.unwrap();
            let error = response.bytes().await.unwrap_err();
            assert!(error.is_too_large(), "{error}");
            let large = client(&s.certs, |b| protocol(b).max_response_body_size(Some(8 << 20)));
            let body = large
                .get(s.server.at("/bomb"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(body.len(), 4 << 20);
            // Uncompressed bodies are held to it as well.
            let tiny = client(&s.certs, |b| protocol(b).max_response_body_size(Some(4)));
            let error = tiny.get(s.server.url()).send().await.unwrap().text().await.unwrap_err();
            assert!(error.is_too_large(), "{error}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// Default headers and the user agent go with every request that has no header of that
/// name; a request's own value wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_headers_and_user_agent_are_sent_unless_the_request_has_its_own() {
    let s = setup().await;
    let run = async {
        for (protocol, _) in PROTOCOLS {
            let mut defaults = HeaderMap::new();
            defaults.insert("x-default", HeaderValue::from_static("d"));
            defaults.insert("x-overridden", HeaderValue::from_static("default"));
            let client = client(&s.certs, |b| {
                protocol(b).default_headers(defaults).user_agent("test-agent/1")
            });
            let seen = client
                .get(s.server.at("/headers"))
                .header("x-overridden", "mine")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            for line in ["user-agent: test-agent/1", "x-default: d", "x-overridden: mine"] {
                assert!(seen.lines().any(|l| l == line), "{line} in {seen}");
            }
            assert!(!seen.contains("x-overridden: default"), "{seen}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// `timeout` bounds the whole request: a head that never comes, and a body that keeps
/// trickling past it. `read_timeout` bounds each wait: a head that never comes, a body
/// that stops; a body that trickles for longer than it in all, but never stalls that long,
/// is read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeouts_bound_the_request_and_each_wait() {
    let s = setup().await;
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let total = client(&s.certs, |b| protocol(b).timeout(Duration::from_secs(1)));
            let error = total.get(s.server.at("/stall-head")).send().await.unwrap_err();
            assert!(error.is_timeout(), "{error} over {version:?}");
            // 60 chunks 50 ms apart: 3 s in all.
            let response = total.get(s.server.at("/trickle/60")).send().await.unwrap();
            let error = response.bytes().await.unwrap_err();
            assert!(error.is_timeout(), "{error} over {version:?}");

            let read = client(&s.certs, |b| protocol(b).read_timeout(Duration::from_secs(1)));
            let error = read.get(s.server.at("/stall-head")).send().await.unwrap_err();
            assert!(error.is_timeout(), "{error} over {version:?}");
            let response = read.get(s.server.at("/stall-body")).send().await.unwrap();
            let error = response.bytes().await.unwrap_err();
            assert!(error.is_timeout(), "{error} over {version:?}");
            // 30 chunks 50 ms apart: 1.5 s in all, never a second's stall.
            let body = read.get(s.server.at("/trickle/30")).send().await.unwrap().bytes().await;
            assert_eq!(body.unwrap().len(), 30 * 5, "over {version:?}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// Shows a defect (review): past the whole-request `timeout`, the body's next frame must
/// fail (as `Builder::timeout` says), but the deadline is looked at only when the body has
/// nothing ready: a reader slower than the server, which finds a frame waiting each time it
/// asks, is never timed out. Here the reader pauses past the deadline, with the server's
/// data waiting in the buffers, and the next frame is data, not the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_whole_request_timeout_the_next_frame_fails_even_with_data_waiting() {
    let s = setup().await;
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let client = client(&s.certs, |b| protocol(b).timeout(Duration::from_secs(1)));
            // A connection up first, so that the request below gets its head at once.
            text(&client, &s.server.url()).await;
            let response = client.get(s.server.at("/endless")).send().await.unwrap();
            let mut body = response.into_body();
            body.frame().await.unwrap().unwrap();
            // Past the deadline (one second after the call): the server has filled the
            // client's buffers meanwhile.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let next = body.frame().await.expect("the body has not ended");
            let error = next.map(|_| ()).expect_err("the deadline has passed");
            assert!(error.is_timeout(), "{error} over {version:?}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// A request for a byte range asks for no coding (a range of gzip is no gzip stream), as
/// reqwest offers none for it; a response encoded all the same is still decoded. The same
/// request without `Range` offers the client's codings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_request_asks_for_identity() {
    let s = setup().await;
    let url = s.server.at("/compressed/100000");
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let client = client(&s.certs, |b| protocol(b).gzip(true));
            let response = client.get(&url).header("range", "bytes=0-99").send().await.unwrap();
            assert_eq!(response.version(), version);
            assert_eq!(response.headers()["x-offered"], "identity", "over {version:?}");
            assert!(response.headers().get(CONTENT_ENCODING).is_none());
            assert_eq!(response.bytes().await.unwrap(), pattern(100_000, 7));
            let response = client.get(&url).send().await.unwrap();
            let offered = response.headers()["x-offered"].to_str().unwrap();
            assert!(offered.contains("gzip"), "over {version:?}: {offered}");
            // `/bomb` is gzip whatever was asked: decoded all the same.
            let response = client
                .get(s.server.at("/bomb"))
                .header("range", "bytes=0-99")
                .send()
                .await
                .unwrap();
            assert!(response.headers().get(CONTENT_ENCODING).is_none(), "decoded");
            assert_eq!(response.bytes().await.unwrap().len(), 4 << 20);
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// Shows a defect (review): a default `accept-encoding` is not sent. The decompression
/// stage sits outside the default headers' stage, so it fills in its own `accept-encoding`
/// first and the default then finds the header taken; `default_headers` says a default goes
/// with every request that has no header of its name (and reqwest sends it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_accept_encoding_is_sent_as_other_default_headers() {
    let s = setup().await;
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let mut defaults = HeaderMap::new();
            defaults.insert("accept-encoding", HeaderValue::from_static("identity"));
            let client = client(&s.certs, |b| protocol(b).default_headers(defaults));
            let (_, _, seen) = text(&client, &s.server.at("/headers")).await;
            assert!(
                seen.lines().any(|l| l == "accept-encoding: identity"),
                "over {version:?}: {seen}"
            );
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// Shows a defect (review): `Policy::limited(0)` returns a redirect as the answer, where
/// `Policy::limited` says "one more is an error" (as reqwest's `limited(0)` and
/// `curl -L --max-redirs 0` fail): a caller that asked for a limit of none learns nothing
/// of the redirect it did not follow, and `examples/client -L --max-redirs 0` exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_limit_of_zero_fails_at_the_first_redirect() {
    let s = setup().await;
    let client = client(&s.certs, |b| {
        b.http3_prior_knowledge().redirect(redirect::Policy::limited(0))
    });
    let run = async {
        let result = client.get(s.server.at("/to?l=/hello")).send().await;
        let error = result.map(|r| r.status()).expect_err("past a limit of 0");
        assert!(error.is_redirect(), "{error}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    s.server.stop().await;
}

/// A server of raw HTTP/3 connections at the returned address, each driven by the
/// handler `make` builds for it (told whether it is the server's first connection), the
/// count of connections it accepted, and its task.
async fn raw_h3_server<F: support::h3::OnH3Event>(
    certs: &Certs,
    make: impl Fn(bool) -> F + Send + 'static,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    support::h3::raw_h3_server_on(listener(certs).await, move |first| RawH3::new(make(first)))
}

/// Refuses stream `id` unprocessed, both ways, with H3_REQUEST_REJECTED.
fn refuse_unprocessed(conn: &mut tower_quiche::quic::QuicheConnection, id: u64) {
    let code = tower_quiche::codes::H3_REQUEST_REJECTED;
    let _ = conn.stream_shutdown(id, quiche::Shutdown::Read, code);
    let _ = conn.stream_shutdown(id, quiche::Shutdown::Write, code);
}

/// A request refused unprocessed is sent again on another connection, not on the one
/// that refused it (which would refuse it again); requests refused together share one new
/// connection, rather than opening one each (a GOAWAY, or a loaded server, refuses every
/// request in flight at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_are_retried_together_on_one_other_connection() {
    init_tracing();
    let certs = certs();
    // On the first connection every request is refused unprocessed with
    // H3_REQUEST_REJECTED (as a server does that cannot take it there and then); on later
    // ones it is answered `hello`.
    let (addr, accepted, server) = raw_h3_server(&certs, |reject| {
        move |h3: &mut quiche::h3::Connection, conn: &mut tower_quiche::quic::QuicheConnection, id, event| {
            if !matches!(event, quiche::h3::Event::Headers { .. }) {
                return;
            }
            if reject {
                refuse_unprocessed(conn, id);
            } else {
                let head = [(&b":status"[..], &b"200"[..]), (b"content-length", b"5")];
                let _ = h3.send_response(conn, id, &head, false);
                let _ = h3.send_body(conn, id, b"hello", true);
            }
        }
    })
    .await;
    let client = client(&certs, Builder::http3_prior_knowledge);
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let run = async {
        let requests = (0..16).map(|_| async {
            let response = client.get(&url).send().await.expect("retried on a second connection");
            assert_eq!(response.text().await.unwrap(), "hello");
        });
        futures_util::future::join_all(requests).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one connection refused, one more served all"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    server.abort();
}

/// A request whose body was all in memory goes again, whole, after a server refused it
/// unprocessed once its body was on the way (RFC 9114 §4.1.1: H3_REQUEST_REJECTED means
/// not processed); one whose body was a stream (consumed as it was sent) fails with the
/// refusal instead of going again without its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_request_goes_again_with_its_body_when_the_body_was_in_memory() {
    init_tracing();
    let certs = certs();
    // The first connection refuses each request once some of its body has come; the others
    // answer with the length and sum of the body they received.
    let (addr, accepted, server) = raw_h3_server(&certs, |reject| {
        let mut bodies: HashMap<u64, (usize, u64)> = HashMap::new();
        move |h3: &mut quiche::h3::Connection, conn: &mut tower_quiche::quic::QuicheConnection, id, event| {
            let mut buf = [0u8; 16 * 1024];
            match event {
                quiche::h3::Event::Data if reject => {
                    while h3.recv_body(conn, id, &mut buf).is_ok() {}
                    refuse_unprocessed(conn, id);
                }
                quiche::h3::Event::Data => {
                    let (len, sum) = bodies.entry(id).or_default();
                    while let Ok(n) = h3.recv_body(conn, id, &mut buf) {
                        *len += n;
                        *sum += buf[..n].iter().map(|&b| u64::from(b)).sum::<u64>();
                    }
                }
                quiche::h3::Event::Finished if !reject => {
                    let (len, sum) = bodies.remove(&id).unwrap_or_default();
                    let answer = format!("{len}:{sum}");
                    let length = answer.len().to_string();
                    let head = [(&b":status"[..], &b"200"[..]), (b"content-length", length.as_bytes())];
                    let _ = h3.send_response(conn, id, &head, false);
                    let _ = h3.send_body(conn, id, answer.as_bytes(), true);
                }
                _ => {}
            }
        }
    })
    .await;
    let buffered = client(&certs, Builder::http3_prior_knowledge);
    let url = format!("https://127.0.0.1:{}/upload", addr.port());
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let expected = format!("{}:{}", body.len(), body.iter().map(|&b| u64::from(b)).sum::<u64>());
    let run = async {
        let response = buffered
            .post(&url)
            .body(body.clone())
            .send()
            .await
            .expect("sent again, with its body, on another connection");
        assert_eq!(response.text().await.unwrap(), expected);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "refused on one connection, served on another"
        );

        // A streaming body is not kept: the refusal is the caller's (on a fresh client, so
        // that its first connection is a refusing one again).
        accepted.store(0, Ordering::SeqCst);
        let streaming = client(&certs, Builder::http3_prior_knowledge);
        let chunks = body
            .chunks(16 * 1024)
            .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::copy_from_slice(c))))
            .collect::<Vec<_>>();
        let request = Request::post(&url)
            .body(StreamBody::new(futures_util::stream::iter(chunks)))
            .unwrap();
        let error = streaming.oneshot(request).await.unwrap_err();
        assert!(error.is_request_rejected(), "{error}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    server.abort();
}

/// A server that sent a 1xx has begun with the request: a refusal after it does not send a
/// body again (RFC 9114 §4.1.1 allows no such refusal; the body may have been acted on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_not_sent_again_after_an_informational_response() {
    init_tracing();
    let certs = certs();
    // A 103 when the head comes; the refusal once the whole body has (a round trip or more
    // later, so the 103 has reached the client: a reset discards what it overtakes).
    let (addr, accepted, server) = raw_h3_server(&certs, |_| {
        |h3: &mut quiche::h3::Connection, conn: &mut tower_quiche::quic::QuicheConnection, id, event| match event {
            quiche::h3::Event::Headers { .. } => {
                let _ = h3.send_response(conn, id, &[(&b":status"[..], &b"103"[..])], false);
            }
            quiche::h3::Event::Data => {
                let mut buf = [0u8; 16 * 1024];
                while h3.recv_body(conn, id, &mut buf).is_ok() {}
            }
            quiche::h3::Event::Finished => refuse_unprocessed(conn, id),
            _ => {}
        }
    })
    .await;
    let client = client(&certs, Builder::http3_prior_knowledge);
    let url = format!("https://127.0.0.1:{}/upload", addr.port());
    let run = async {
        let error = client.post(&url).body(vec![7u8; 50_000]).send().await.unwrap_err();
        assert!(error.is_request_rejected(), "{error}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "not sent again");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    server.abort();
}

/// A response that has no content (to HEAD, a 204, a 304) but comes with DATA is malformed
/// (RFC 9110 §6.4.1, RFC 9114 §4.1.2): its body fails, as h2 resets such a stream, instead
/// of handing the caller bytes that are no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_a_response_without_content_fails_its_body() {
    init_tracing();
    let certs = certs();
    let (addr, _, server) = raw_h3_server(&certs, |_| {
        |h3: &mut quiche::h3::Connection, conn: &mut tower_quiche::quic::QuicheConnection, id, event| {
            if let quiche::h3::Event::Headers { list, .. } = event {
                let head = quiche::h3::NameValue::value(&list[0]) == b"HEAD";
                let status: &[u8] = if head { b"200" } else { b"204" };
                let _ = h3.send_response(conn, id, &[(&b":status"[..], status)], false);
                let _ = h3.send_body(conn, id, b"xyz", true);
            }
        }
    })
    .await;
    let client = client(&certs, Builder::http3_prior_knowledge);
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let run = async {
        for request in [client.head(&url), client.get(&url)] {
            let response = request.send().await.expect("the head is fine");
            let status = response.status();
            let body = response.bytes().await;
            assert!(body.is_err(), "{status}: DATA on a response without content: {body:?}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    server.abort();
}

/// A bidirectional stream the server opens is a connection error (RFC 9114 §6.1,
/// H3_STREAM_CREATION_ERROR): the client closes, and the request on the connection fails at
/// once instead of waiting for an answer (this server sends none) until the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_opening_a_bidirectional_stream_is_a_connection_error() {
    init_tracing();
    let certs = certs();
    let (addr, _, server) = raw_h3_server(&certs, |_| {
        |_h3: &mut quiche::h3::Connection, conn: &mut tower_quiche::quic::QuicheConnection, _id, event| {
            if let quiche::h3::Event::Headers { .. } = event {
                // A HEADERS frame on stream 1, as quiche's h3 layer would not send one.
                let mut section = [0u8; 64];
                let len = quiche::h3::qpack::Encoder::new()
                    .encode(&[quiche::h3::Header::new(b":status", b"200")], &mut section)
                    .unwrap();
                let mut frame = vec![0x01, len as u8];
                frame.extend_from_slice(&section[..len]);
                let _ = conn.stream_send(1, &frame, true);
            }
        }
    })
    .await;
    let client = client(&certs, Builder::http3_prior_knowledge);
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let failed = timeout(Duration::from_secs(10), client.get(&url).send()).await;
    let error = failed.expect("the request ends before the idle timeout").unwrap_err();
    assert!(error.is_closed(), "{error}");
    server.abort();
}

/// HTTP/3 on its own server (`h3_app`), advertised by a dual front, and a client in the
/// automatic mode that has moved to it.
async fn front_and_h3(certs: &Certs, h3_app: Router) -> (Dual, support::h3::H3Server, Client) {
    let h3 = h3_server_with(certs, server::Builder::new(), h3_app, Arc::default()).await;
    let alt_svc = HeaderValue::from_str(&format!("h3=\":{}\"", h3.addr.port())).unwrap();
    let front_app = app(Arc::default()).layer(axum::middleware::map_response(
        move |mut r: axum::response::Response| {
            let alt_svc = alt_svc.clone();
            async move {
                r.headers_mut().insert(ALT_SVC, alt_svc);
                r
            }
        },
    ));
    let front = Dual::start(certs, front_app).await;
    let client = client(certs, |b| b.http3_handicap(Duration::from_secs(20)));
    let (_, version, _) = text(&client, &front.url()).await;
    assert_eq!(version, Version::HTTP_2);
    let (_, version, _) = text(&client, &front.url()).await;
    assert_eq!(version, Version::HTTP_3);
    (front, h3, client)
}

/// `/alt-svc?v=VALUE` answers with that `Alt-Svc` (over HTTP/3, on the HTTP/3 server).
fn advertising_app() -> Router {
    app(Arc::default()).route(
        "/alt-svc",
        get(|uri: Uri| async move { ([(ALT_SVC, query(&uri)["v"].clone())], "advertised") }),
    )
}

/// An `Alt-Svc: clear` that comes over HTTP/3 moves the origin's next requests to TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_responses_alt_svc_clear_moves_the_origin_to_tcp() {
    init_tracing();
    let certs = certs();
    let run = async {
        let (front, h3, client) = front_and_h3(&certs, advertising_app()).await;
        let (_, version, _) = text(&client, &front.at("/alt-svc?v=clear")).await;
        assert_eq!(version, Version::HTTP_3);
        let (_, version, _) = text(&client, &front.url()).await;
        assert_eq!(version, Version::HTTP_2, "cleared");
        front.stop().await;
        stop_h3(h3).await;
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// An `Alt-Svc` that comes over HTTP/3 with another port is where the next connection
/// goes: the first HTTP/3 server stops, the next request reaches the second over HTTP/3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_responses_alt_svc_moves_http3_to_a_new_port() {
    init_tracing();
    let certs = certs();
    let run = async {
        let second = h3_server_with(&certs, server::Builder::new(), app(Arc::default()), Arc::default()).await;
        let (front, first, client) = front_and_h3(&certs, advertising_app()).await;
        let moved = format!("/alt-svc?v=h3%3D%22%3A{}%22", second.addr.port());
        let (_, version, body) = text(&client, &front.at(&moved)).await;
        assert_eq!((version, body.as_str()), (Version::HTTP_3, "advertised"));
        stop_h3(first).await;
        let (_, version, _) = text(&client, &front.url()).await;
        assert_eq!(version, Version::HTTP_3, "on the new port");
        front.stop().await;
        stop_h3(second).await;
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// `examples/client`, built by cargo if need be (a no-op when `cargo test` built it).
fn example_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--example", "client"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build --example client");
            // target/debug/deps/client-… → target/debug/examples/client
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("examples").join("client")
        })
        .clone()
}

struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    /// The `-v` status lines, in order.
    fn status_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("< HTTP/")).collect()
    }
}

async fn run_client(ca: &Path, args: &[&str]) -> Run {
    let exe = example_client();
    let output = tokio::process::Command::new(exe)
        .arg("--ca")
        .arg(ca)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = timeout(TEST_TIMEOUT, output).await.expect("the client ends").unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn ca_file(certs: &Certs, dir: &Path) -> PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(&path, &certs.ca_pem).unwrap();
    path
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-quiche-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Several URLs on one client, in order: the first over HTTP/2, the client moves to
/// HTTP/3 by itself; the bodies come out byte for byte, the first into its `-o`, the
/// others on stdout one after another; `-v` prints each status line with its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_example_fetches_several_urls_and_moves_to_http3() {
    let s = setup().await;
    let dir = temp_dir("client-example");
    let ca = ca_file(&s.certs, &dir);
    let first = dir.join("first.out");
    let urls: Vec<String> = (0..6)
        .map(|i| s.server.at(&format!("/compressed/{}", 1000 + i)))
        .collect();
    let mut args = vec!["-v", "-o", first.to_str().unwrap()];
    args.extend(urls.iter().map(String::as_str));
    let run = run_client(&ca, &args).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&first).unwrap(), pattern(1000, 7));
    let rest: Vec<u8> = (1..6).flat_map(|i| pattern(1000 + i, 7).to_vec()).collect();
    assert_eq!(run.stdout, rest, "the bodies, in order, on stdout");
    let lines = run.status_lines();
    assert_eq!(lines.len(), 6, "{}", run.stderr);
    assert_eq!(lines[0], "< HTTP/2.0 200 OK");
    assert!(lines.iter().all(|l| l.ends_with(" 200 OK")), "{lines:?}");
    // The handshake has a head start of 300 ms on each request: by the last one (after
    // five) it is up, on any machine that runs these tests.
    assert_eq!(lines[5], "< HTTP/3.0 200 OK", "{lines:?}");
    // Not asked for compression: none was offered.
    assert!(!run.stderr.contains("x-offered"), "{}", run.stderr);
    s.server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `--http3-only` speaks HTTP/3 from the first request; `-L` follows redirects (without
/// it, the 302 is the answer); `--compressed` offers the codings and writes the body
/// decoded; a failed URL does not stop the next, and sets the exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_example_speaks_http3_only_follows_redirects_and_decompresses() {
    let s = setup().await;
    let dir = temp_dir("client-example-flags");
    let ca = ca_file(&s.certs, &dir);
    let redirecting = s.server.at("/to?l=/hello");
    let compressed = s.server.at("/compressed/50000");

    let run = run_client(&ca, &["--http3-only", "-v", &redirecting, &compressed]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.status_lines(), ["< HTTP/3.0 302 Found", "< HTTP/3.0 200 OK"]);
    assert_eq!(run.stdout, pattern(50000, 7), "the 302 has no body; the other is raw");

    let run = run_client(
        &ca,
        &["--http3-only", "-L", "--compressed", "-v", &redirecting, &compressed],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.status_lines(), ["< HTTP/3.0 200 OK", "< HTTP/3.0 200 OK"]);
    assert!(run.stderr.contains("< x-offered: "), "{}", run.stderr);
    let mut expected = b"hello".to_vec();
    expected.extend_from_slice(&pattern(50000, 7));
    assert_eq!(run.stdout, expected);

    let missing = s.server.at("/no-such-page");
    let unreachable = "https://127.0.0.1:1/";
    let run = run_client(&ca, &["--http3-only", "-m", "2", &missing, unreachable, &redirecting]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("error: https://127.0.0.1:1/"), "{}", run.stderr);
    s.server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends its name when dropped: a handler's future, or a response body's stream, that the
/// server gave up on because the client reset its stream (or closed its connection).
struct OnDrop(&'static str, tokio::sync::mpsc::UnboundedSender<&'static str>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

/// `/held-head`: a head that never comes; `/held-body`: one chunk, then a body that never
/// ends. Each reports when the server drops it.
fn held_app(dropped: tokio::sync::mpsc::UnboundedSender<&'static str>) -> Router {
    let for_body = dropped.clone();
    Router::new()
        .route(
            "/held-head",
            get(move || {
                let guard = OnDrop("head", dropped.clone());
                async move {
                    let _guard = guard;
                    std::future::pending::<&'static str>().await
                }
            }),
        )
        .route(
            "/held-body",
            get(move || {
                let guard = OnDrop("body", for_body.clone());
                async move {
                    use futures_util::StreamExt;
                    let first = Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"chunk")));
                    // Then the guard waits in the stream for good.
                    let never = futures_util::stream::once(async move {
                        let _guard = guard;
                        std::future::pending::<Result<Frame<Bytes>, std::io::Error>>().await
                    });
                    let chunks = futures_util::stream::iter([first]).chain(never);
                    axum::body::Body::new(StreamBody::new(chunks))
                }
            }),
        )
}

/// When `timeout` fires, the request does not linger on the server: waiting for the head,
/// the dropped call resets its stream (HTTP/3, HTTP/2) and the server drops the handler;
/// reading the body, the failed body stops the stream and the server drops the body.
/// (Checked in review: this holds today; it guards against a leak of streams on timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_times_out_is_cancelled_on_the_server() {
    init_tracing();
    let certs = certs();
    let (dropped, mut reported) = tokio::sync::mpsc::unbounded_channel();
    let server = Dual::start(&certs, app(Arc::default()).merge(held_app(dropped))).await;
    let run = async {
        for (protocol, version) in PROTOCOLS {
            let client = client(&certs, |b| protocol(b).timeout(Duration::from_millis(500)));
            let error = client.get(server.at("/held-head")).send().await.unwrap_err();
            assert!(error.is_timeout(), "{error} over {version:?}");
            assert_eq!(reported.recv().await, Some("head"), "over {version:?}");
            let response = client.get(server.at("/held-body")).send().await.unwrap();
            let error = response.bytes().await.unwrap_err();
            assert!(error.is_timeout(), "{error} over {version:?}");
            assert_eq!(reported.recv().await, Some("body"), "over {version:?}");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    server.stop().await;
}

/// After a 2xx answer to CONNECT only DATA may come on its stream (RFC 9114 §4.4): a
/// HEADERS frame there (trailers) is a connection error, H3_FRAME_UNEXPECTED, as the server
/// holds clients to; the tunnel's reader sees an error, not a clean end that would pass
/// for the whole content. (Found by review: the client skipped such trailers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_on_an_open_tunnel_are_a_connection_error() {
    use tokio::io::AsyncReadExt;
    init_tracing();
    let certs = certs();
    let (addr, _, server) = support::h3::raw_h3_server_on(listener(&certs).await, |_| {
        RawH3::new(
            |h3: &mut quiche::h3::Connection, conn: &mut tower_quiche::quic::QuicheConnection, id, event| {
                if !matches!(event, quiche::h3::Event::Headers { .. }) {
                    return;
                }
                let _ = h3.send_response(conn, id, &[(&b":status"[..], &b"200"[..])], false);
                let _ = h3.send_body(conn, id, b"tunnelled", false);
                let trailers = [(&b"x-trailer"[..], &b"no"[..])];
                let _ = h3.send_additional_headers(conn, id, &trailers, true, true);
            },
        )
        .extended_connect()
    });
    let client = client(&certs, |b| b.http3_prior_knowledge());
    let run = async {
        let url = format!("https://localhost:{}/tunnel", addr.port());
        let mut tunnel = client.tunnel(url, "echo").await.unwrap();
        let mut received = Vec::new();
        let read = tunnel.read_to_end(&mut received).await;
        // The client closes the connection (with H3_FRAME_UNEXPECTED): the tunnel's reader
        // learns that its connection closed.
        let error = read.expect_err("an error, not a clean end");
        let error = tower_quiche::Error::from_io(&error).expect("the crate's error");
        assert!(error.is_closed(), "{error}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    server.abort();
}
