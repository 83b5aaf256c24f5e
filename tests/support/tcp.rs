//! A TLS client for the TCP side (HTTP/1.1 or HTTP/2, chosen by ALPN), for comparing the
//! same server over every protocol.

#![allow(dead_code)]

use std::net::SocketAddr;

use boring::ssl::{SslConnector, SslMethod};
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Sends one request over a new TLS connection; `version` picks HTTP/1.1 or HTTP/2.
pub async fn send(addr: SocketAddr, ca_pem: &str, version: Version, request: Request<Full<Bytes>>) -> Response<Bytes> {
    let mut connector = SslConnector::builder(SslMethod::tls()).unwrap();
    let ca = boring::x509::X509::from_pem(ca_pem.as_bytes()).unwrap();
    connector.cert_store_mut().add_cert(ca).unwrap();
    let alpn: &[u8] = if version == Version::HTTP_2 {
        b"\x02h2"
    } else {
        b"\x08http/1.1"
    };
    connector.set_alpn_protos(alpn).unwrap();
    let config = connector.build().configure().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_boring::connect(config, "localhost", tcp)
        .await
        .expect("TLS over TCP");
    let negotiated = tls.ssl().selected_alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(tls);
    let response = if version == Version::HTTP_2 {
        assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]));
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(request).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(request).await.unwrap()
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}
