//! Reverse-proxy services, both ways: an HTTP/3 front for an HTTP/1.1 backend, and an
//! HTTP/1.1 or HTTP/2 front for an HTTP/3 upstream. Bodies stream both ways; nothing is
//! buffered whole.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::Body;
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower_quiche::RecvBody;

/// Points `request` at `scheme://authority` with its own path and query.
fn retarget<B>(request: &mut Request<B>, scheme: Scheme, authority: &Authority) {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    *request.uri_mut() = Uri::builder()
        .scheme(scheme)
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .expect("valid URI");
    // The next hop names its own host.
    request.headers_mut().remove(http::header::HOST);
    *request.version_mut() = http::Version::HTTP_11;
}

fn bad_gateway(e: impl std::fmt::Display) -> Response<Body> {
    let mut response = Response::new(Body::from(format!("bad gateway: {e}\n")));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}

/// An HTTP/3 front: forwards each request (body streamed) to an HTTP/1.1 backend.
pub fn http3_to_http1(
    backend: Authority,
) -> impl tower::Service<Request<RecvBody>, Response = Response<Body>, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    let client: HttpClient<HttpConnector, RecvBody> = HttpClient::builder(TokioExecutor::new()).build_http();
    tower::service_fn(move |mut request: Request<RecvBody>| {
        let client = client.clone();
        let backend = backend.clone();
        async move {
            retarget(&mut request, Scheme::HTTP, &backend);
            Ok::<_, Infallible>(match client.request(request).await {
                Ok(response) => response.map(Body::new),
                Err(e) => bad_gateway(e),
            })
        }
    })
}

/// An HTTP/1.1 or HTTP/2 front: forwards each request (body streamed) to an HTTP/3
/// upstream through tower-quiche's `Client`.
pub fn http_to_http3(
    upstream: Authority,
    client: tower_quiche::client::Client,
) -> impl tower::Service<Request<hyper::body::Incoming>, Response = Response<Body>, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        let client = client.clone();
        let upstream = upstream.clone();
        async move {
            // The front answers in the version it was asked in, whatever the upstream spoke.
            let version = request.version();
            retarget(&mut request, Scheme::HTTPS, &upstream);
            let mut response = match client.send(request).await {
                Ok(response) => response.map(Body::new),
                Err(e) => bad_gateway(e),
            };
            *response.version_mut() = version;
            Ok::<_, Infallible>(response)
        }
    })
}

/// Serves `service` over plain-TCP HTTP/1.1 and HTTP/2 (prior knowledge) until the task is
/// dropped; returns the bound address.
pub async fn serve_plain_http<S, B>(addr: SocketAddr, service: S) -> SocketAddr
where
    S: tower::Service<Request<hyper::body::Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind TCP");
    let local = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    local
}
