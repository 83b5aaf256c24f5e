//! The client's TCP side (`tcp` feature): HTTP/1.1 and HTTP/2 over TLS, for origins not
//! known to speak HTTP/3 and for when the QUIC path is broken.
//!
//! hyper-util's pooled client does the HTTP, over a connector of ours: hyper-util's
//! `HttpConnector` for TCP (Happy Eyeballs, no Nagle, keep-alive probes), then TLS through
//! tokio-boring with the BoringSSL context the QUIC side builds from the same
//! [`ClientConfig`] (the same roots, the same `danger_accept_invalid_certs`, the same client
//! certificate), offering ALPN `h2` then `http/1.1`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use boring::ssl::{Ssl, SslContext};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_boring::SslStream;
use tower_service::Service;

use super::conn::AnyBody;
use crate::error::{Error, Kind};
use crate::h3::body::RecvBody;
use crate::quic::ClientConfig;
use crate::quic::tls::TCP_ALPN;

/// HTTP/1.1 and HTTP/2 with TLS, pooled per origin by hyper-util.
pub(crate) struct TcpClient {
    inner: hyper_util::client::legacy::Client<Connector, AnyBody>,
}

impl TcpClient {
    pub(crate) fn new(config: &ClientConfig, connect_timeout: Duration, idle_timeout: Duration) -> Result<Self, Error> {
        let mut tls = config.config.inner.tls.context_builder(false)?;
        tls.set_alpn_protos(TCP_ALPN)
            .map_err(|e| Error::config(format!("TLS setup for TCP failed (ALPN): {e}")))?;
        let connector = Connector {
            http: tcp_connector(),
            tls: tls.build(),
            verify_name: config.config.verifies_server_name(),
            connect_timeout,
        };
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle_timeout)
            .build(connector);
        Ok(TcpClient { inner })
    }

    /// Sends `request` (an absolute `https` URI) on a pooled or new connection.
    pub(crate) async fn send(&self, request: Request<AnyBody>) -> Result<Response<RecvBody>, Error> {
        let response = self.inner.request(request).await.map_err(request_error)?;
        Ok(response.map(RecvBody::tcp))
    }
}

/// How long a TCP connection may be silent before the kernel probes its peer, how far
/// apart the probes are, and how many go unanswered before it is given up: a peer that
/// vanished (a host gone, a NAT that forgot the flow) fails a request waiting on it, and a
/// pooled connection, within a minute, as reqwest's defaults do; without probes a request
/// whose bytes were all acknowledged waits for an answer for ever.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
const TCP_KEEPALIVE_PROBES: u32 = 3;

// `TCP_USER_TIMEOUT` is not set. It would bound how long a request written to a peer that
// vanished waits (keep-alive probes go only while nothing is outstanding: the kernel
// retransmits for about 15 minutes, `tcp_retries2`), but Linux also applies it to a peer
// that keeps its receive window shut (a server that reads an upload slowly, which is
// alive) and lets it override the keep-alive count above: one value cannot serve all
// three, and reqwest and hyper leave it unset too.

/// hyper-util's TCP connector as the TLS on top needs it: any scheme (the TLS is ours), no
/// Nagle, keep-alive probes ([`TCP_KEEPALIVE`]).
fn tcp_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.set_keepalive_interval(Some(TCP_KEEPALIVE));
    http.set_keepalive_retries(Some(TCP_KEEPALIVE_PROBES));
    http
}

/// Opens TLS connections over TCP.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    tls: SslContext,
    verify_name: bool,
    connect_timeout: Duration,
}

impl Service<Uri> for Connector {
    type Response = TokioIo<TlsStream>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            let timeout = this.connect_timeout;
            tokio::time::timeout(timeout, this.connect(uri)).await.map_err(|_| {
                Error::new(Kind::Timeout).with_message(format!(
                    "connecting to {authority} over TCP took longer than {timeout:?}"
                ))
            })?
        })
    }
}

impl Connector {
    async fn connect(mut self, uri: Uri) -> Result<TokioIo<TlsStream>, Error> {
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .ok_or_else(|| Error::invalid_request(format!("'{uri}' has no host")))?;
        let tcp = self.http.call(uri).await.map_err(|e| {
            Error::new(Kind::Io)
                .with_message(format!("cannot connect to {host} over TCP"))
                .with_source(e)
        })?;
        let tls_err = |what: &str, e: boring::error::ErrorStack| {
            Error::new(Kind::Tls).with_message(format!("TLS setup for TCP failed ({what}): {e}"))
        };
        let mut ssl = Ssl::new(&self.tls).map_err(|e| tls_err("new session", e))?;
        // As for QUIC: a host name goes out as SNI and the certificate must carry it; an
        // address is no SNI (RFC 6066 §3), and BoringSSL matches it against the IP SANs.
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) if self.verify_name => ssl.param_mut().set_ip(ip).map_err(|e| tls_err("server address", e))?,
            Ok(_) => {}
            Err(_) => {
                ssl.set_hostname(&host).map_err(|e| tls_err("server name", e))?;
                if self.verify_name {
                    ssl.param_mut().set_host(&host).map_err(|e| tls_err("server name", e))?;
                }
            }
        }
        let stream = tokio_boring::SslStreamBuilder::new(ssl, tcp.into_inner())
            .connect()
            .await
            .map_err(|e| {
                let reason = crate::tls::take_verify_error();
                let message = match reason {
                    Some(reason) => format!("TLS handshake with {host} over TCP failed: {reason}"),
                    None => format!("TLS handshake with {host} over TCP failed: {e}"),
                };
                Error::new(Kind::Tls).with_message(message)
            })?;
        Ok(TokioIo::new(TlsStream(stream)))
    }
}

/// A TLS stream over TCP that tells hyper-util whether ALPN chose HTTP/2.
pub(crate) struct TlsStream(SslStream<TcpStream>);

impl Connection for TlsStream {
    fn connected(&self) -> Connected {
        let connected = self.0.get_ref().connected();
        if self.0.ssl().selected_alpn_protocol() == Some(b"h2") {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The error of a request over TCP: the connector's own error when connecting failed,
/// else hyper's, classified.
fn request_error(e: hyper_util::client::legacy::Error) -> Error {
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(ours) = s.downcast_ref::<Error>() {
            return ours.duplicate();
        }
        if let Some(hyper) = s.downcast_ref::<hyper::Error>() {
            // Not `Error::from_hyper`: the source kept is hyper-util's error, which says
            // more (the connect step) than the hyper error inside it.
            return Error::new(crate::error::hyper_kind(hyper))
                .with_message("the request over TCP failed")
                .with_source(e);
        }
        source = s.source();
    }
    Error::new(Kind::Closed)
        .with_message("the request over TCP failed")
        .with_source(e)
}

/// The error of a response body over TCP.
pub(crate) fn body_error(e: hyper::Error) -> Error {
    Error::from_hyper(e, "the response body over TCP failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's socket probes a silent peer (what finds a vanished one).
    #[tokio::test]
    async fn tcp_connections_probe_a_silent_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("https://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let tcp = tcp_connector().call(uri).await.unwrap().into_inner();
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().unwrap(), "SO_KEEPALIVE");
        #[cfg(target_os = "linux")]
        {
            assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE);
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), TCP_KEEPALIVE);
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), TCP_KEEPALIVE_PROBES);
        }
    }
}
