//! A TLS client for the TCP side (HTTP/1.1 or HTTP/2, chosen by ALPN), for comparing the
//! same server over every protocol, presenting a client certificate when asked (mutual TLS).

#![allow(dead_code)]

use std::net::SocketAddr;

use boring::ssl::{SslConnector, SslMethod};
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_boring::SslStream;
use tower_quiche::tls::GeneratedCert;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a TLS connection that trusts `ca_pem`, offers the ALPN of `version` (`h2` or
/// `http/1.1`) and presents `identity` as its client certificate when given.
///
/// With TLS 1.3 the client finishes its handshake before the server has checked the client
/// certificate: a refused certificate shows as an error on the first read, not here.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    version: Version,
    identity: Option<&GeneratedCert>,
) -> Result<SslStream<TcpStream>, BoxError> {
    connect_after(addr, ca_pem, version, identity, std::time::Duration::ZERO).await
}

/// [`connect`], with `pause` between the TCP connection and the TLS handshake (a slow
/// client, or a slow link).
pub async fn connect_after(
    addr: SocketAddr,
    ca_pem: &str,
    version: Version,
    identity: Option<&GeneratedCert>,
    pause: std::time::Duration,
) -> Result<SslStream<TcpStream>, BoxError> {
    let alpn: &[u8] = if version == Version::HTTP_2 {
        b"\x02h2"
    } else {
        b"\x08http/1.1"
    };
    let tls = connect_offering(addr, ca_pem, Some(alpn), identity, pause).await?;
    let negotiated = tls.ssl().selected_alpn_protocol().map(<[u8]>::to_vec);
    let expected: &[u8] = if version == Version::HTTP_2 { b"h2" } else { b"http/1.1" };
    assert_eq!(negotiated.as_deref(), Some(expected), "ALPN");
    Ok(tls)
}

/// Opens a TLS connection that offers `alpn` (in its wire form; `None`: no ALPN extension),
/// whatever the server then picks.
pub async fn connect_offering(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: Option<&[u8]>,
    identity: Option<&GeneratedCert>,
    pause: std::time::Duration,
) -> Result<SslStream<TcpStream>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    tokio::time::sleep(pause).await;
    tls_over(tcp, ca_pem, alpn, identity).await
}

/// Sends one request over HTTP/1.1 on a new TLS connection from the local address `from`
/// (another loopback address than the usual 127.0.0.1, say).
pub async fn send_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    ca_pem: &str,
    req: Request<Full<Bytes>>,
) -> Result<Response<Bytes>, BoxError> {
    let socket = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(addr).await?;
    let tls = tls_over(tcp, ca_pem, Some(b"\x08http/1.1"), None).await?;
    request(tls, Version::HTTP_11, req).await
}

/// The TLS handshake over `tcp`: trusting `ca_pem`, offering `alpn`, presenting `identity`.
async fn tls_over(
    tcp: TcpStream,
    ca_pem: &str,
    alpn: Option<&[u8]>,
    identity: Option<&GeneratedCert>,
) -> Result<SslStream<TcpStream>, BoxError> {
    let mut connector = SslConnector::builder(SslMethod::tls())?;
    connector
        .cert_store_mut()
        .add_cert(boring::x509::X509::from_pem(ca_pem.as_bytes())?)?;
    if let Some(alpn) = alpn {
        connector.set_alpn_protos(alpn)?;
    }
    if let Some(identity) = identity {
        let cert = boring::x509::X509::from_pem(identity.cert_pem.as_bytes())?;
        let key = boring::pkey::PKey::private_key_from_pem(identity.key_pem.as_bytes())?;
        connector.set_certificate(&cert)?;
        connector.set_private_key(&key)?;
    }
    let tls = tokio_boring::connect(connector.build().configure()?, "localhost", tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    Ok(tls)
}

/// Sends one request on an open TLS connection and collects the response.
pub async fn request(
    tls: SslStream<TcpStream>,
    version: Version,
    request: Request<Full<Bytes>>,
) -> Result<Response<Bytes>, BoxError> {
    let io = TokioIo::new(tls);
    let response = if version == Version::HTTP_2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(request).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(request).await?
    };
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(parts, body.collect().await?.to_bytes()))
}

/// Sends one request over a new TLS connection presenting `identity`, if any; any failure
/// (TLS, HTTP) is the error.
pub async fn try_send(
    addr: SocketAddr,
    ca_pem: &str,
    version: Version,
    identity: Option<&GeneratedCert>,
    req: Request<Full<Bytes>>,
) -> Result<Response<Bytes>, BoxError> {
    request(connect(addr, ca_pem, version, identity).await?, version, req).await
}

/// Sends one request over a new TLS connection; `version` picks HTTP/1.1 or HTTP/2.
pub async fn send(addr: SocketAddr, ca_pem: &str, version: Version, req: Request<Full<Bytes>>) -> Response<Bytes> {
    try_send(addr, ca_pem, version, None, req)
        .await
        .expect("request over TLS on TCP")
}

/// Requests on one open TLS connection, over HTTP/1.1 or HTTP/2, whose bodies are the
/// caller's to read (or not).
pub enum Connection {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// The task driving a [`Connection`]: it ends when the connection does.
pub type Driver = tokio::task::JoinHandle<Result<(), hyper::Error>>;

impl Connection {
    /// Opens a connection as [`connect`] does, its protocol picked by `version`.
    pub async fn open(addr: SocketAddr, ca_pem: &str, version: Version) -> Result<(Self, Driver), BoxError> {
        let io = TokioIo::new(connect(addr, ca_pem, version, None).await?);
        Ok(if version == Version::HTTP_2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            (Connection::Http2(send), tokio::spawn(conn))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            (Connection::Http1(send), tokio::spawn(conn))
        })
    }

    /// Sends `request` and returns its response once its head has come.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> hyper::Result<Response<hyper::body::Incoming>> {
        match self {
            Connection::Http1(send) => {
                send.ready().await?;
                send.send_request(request).await
            }
            Connection::Http2(send) => {
                send.ready().await?;
                send.send_request(request).await
            }
        }
    }
}
