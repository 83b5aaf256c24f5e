//! The proxy example's services: an HTTP/1.1 client -> HTTP/1.1 front -> HTTP/3 -> HTTP/3
//! front -> HTTP/1.1 backend chain streams 50 MiB each way intact.

mod support;

#[path = "../examples/support/proxy.rs"]
mod proxy;

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use support::h3::{PatternBody, routes};
use support::*;
use tokio::time::timeout;

const MIB: u64 = 1024 * 1024;

async fn hash_incoming(body: hyper::body::Incoming) -> (u64, [u8; 32]) {
    let mut body = body;
    let mut hasher = boring::sha::Sha256::new();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    (len, hasher.finish())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_each_way_through_both_proxies() {
    init_tracing();
    let certs = certs();
    let backend = proxy::serve_plain_http("127.0.0.1:0".parse().unwrap(), routes::router()).await;
    let listener = support::h3::listener(&certs).await;
    let front = listener.local_addr();
    tokio::spawn(
        tower_quiche::server::serve(listener, proxy::http3_to_http1(backend.to_string().parse().unwrap()))
            .into_future(),
    );
    let client = support::h3::client(&certs);
    let upstream = format!("localhost:{}", front.port()).parse().unwrap();
    let edge = proxy::serve_plain_http("127.0.0.1:0".parse().unwrap(), proxy::http_to_http3(upstream, client)).await;
    let http: HttpClient<_, PatternBody> = HttpClient::builder(TokioExecutor::new()).build_http();
    let run = async {
        // Up and back: a streamed 50 MiB upload echoed by the backend.
        let (body, sent) = PatternBody::new(50 * MIB);
        let response = http
            .request(http::Request::post(format!("http://{edge}/echo")).body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (len, digest) = hash_incoming(response.into_body()).await;
        assert_eq!(len, 50 * MIB);
        assert_eq!(Some(digest), *sent.lock().unwrap(), "echo through both proxies");

        // Down: 50 MiB from the backend, whose bytes are all 'x'.
        let (empty, _) = PatternBody::new(0);
        let request = http::Request::get(format!("http://{edge}/bytes/{}", 50 * MIB))
            .body(empty)
            .unwrap();
        let response = http.request(request).await.unwrap();
        assert_eq!(response.headers()["content-length"], (50 * MIB).to_string().as_str());
        let (len, digest) = hash_incoming(response.into_body()).await;
        let mut expected = boring::sha::Sha256::new();
        let chunk = vec![b'x'; MIB as usize];
        for _ in 0..50 {
            expected.update(&chunk);
        }
        assert_eq!(len, 50 * MIB);
        assert_eq!(digest, expected.finish(), "download through both proxies");
    };
    timeout(std::time::Duration::from_secs(240), run).await.unwrap();
}
