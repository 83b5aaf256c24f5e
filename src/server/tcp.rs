//! HTTP/1.1 and HTTP/2 over TLS on TCP, beside HTTP/3: browsers and most clients reach a
//! site over TCP first and learn of HTTP/3 from the `Alt-Svc` header added here. TLS runs
//! through `tokio-boring` with the HTTP/3 listener's certificate; connections are served by
//! hyper-util's automatic HTTP/1.1 / HTTP/2 builder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use boring::ssl::{AlpnError, SslAcceptor, SslMethod};
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tower_layer::Layer;
use tower_service::Service;

use super::ConnectionInfo;
use crate::alt_svc::AltSvcLayer;
use crate::error::{BoxError, Error};
use crate::quic::Config;

/// A TLS handshake that takes longer than this is abandoned: it holds a socket and a task.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS acceptor for the TCP side: the QUIC listener's certificate and key, its client
/// CA when it requires client certificates (mutual TLS), ALPN `h2` then `http/1.1`.
pub(crate) fn acceptor(config: &Config) -> Result<SslAcceptor, Error> {
    let tls = &config.inner.tls;
    let err =
        |what: &str, e: boring::error::ErrorStack| Error::config(format!("TLS setup for TCP failed ({what}): {e}"));
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| err("new acceptor", e))?;
    let leaf = tls
        .chain
        .first()
        .ok_or_else(|| Error::config("serving TCP needs the listener's certificate"))?;
    b.set_certificate(leaf).map_err(|e| err("certificate", e))?;
    for extra in &tls.chain[1..] {
        b.add_extra_chain_cert(extra.clone()).map_err(|e| err("chain", e))?;
    }
    let key = tls
        .key
        .as_ref()
        .ok_or_else(|| Error::config("serving TCP needs the listener's private key"))?;
    b.set_private_key(key).map_err(|e| err("private key", e))?;
    // The same client verification as the QUIC side: mutual TLS is meaningless if a client
    // without a certificate can reach the service over TCP instead.
    tls.verify_clients(&mut b).map_err(|e| err("client CA", e))?;
    b.set_alpn_select_callback(|_, client| {
        boring::ssl::select_next_proto(b"\x02h2\x08http/1.1", client).ok_or(AlpnError::NOACK)
    });
    Ok(b.build())
}

/// Adds the request's [`ConnectionInfo`] (with its HTTP version) before the service sees it.
#[derive(Clone)]
struct WithInfo<S> {
    inner: S,
    info: ConnectionInfo,
}

impl<S, B> Service<Request<Incoming>> for WithInfo<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> S::Future {
        let mut info = self.info.clone();
        info.version = request.version();
        request.extensions_mut().insert(info);
        self.inner.call(request)
    }
}

/// Accepts TCP connections until `stop` carries a deadline, then lets the open ones finish
/// (hyper's graceful shutdown) until that deadline.
pub(crate) async fn run<S, B>(
    tcp: TcpListener,
    acceptor: Arc<SslAcceptor>,
    service: S,
    alt_svc: AltSvcLayer,
    mut stop: watch::Receiver<Option<Instant>>,
    alive: mpsc::Sender<()>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let local_addr = tcp.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let service = alt_svc.layer(service);
    loop {
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted,
            _ = stop.wait_for(Option::is_some) => break,
        };
        let (stream, remote_addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, usually: back off instead of spinning.
                tracing::warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = Arc::clone(&acceptor);
        let info = ConnectionInfo {
            remote_addr,
            local_addr,
            version: http::Version::HTTP_11,
            stream_id: None,
            early_data: false,
        };
        let service = TowerToHyperService::new(WithInfo {
            inner: service.clone(),
            info,
        });
        let watcher = graceful.watcher();
        let alive = alive.clone();
        let mut deadline = stop.clone();
        tokio::spawn(async move {
            let _alive = alive;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tokio_boring::accept(&acceptor, stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    // A refused client certificate leaves its reason here; taking it also
                    // keeps it from being reported for a later connection on this thread.
                    let reason = crate::tls::take_verify_error();
                    tracing::debug!(peer = %remote_addr, error = %e, reason, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            // Past the shutdown deadline the connection is dropped, whatever it was doing.
            let deadline_passed = async move {
                let at = deadline.wait_for(Option::is_some).await.ok().and_then(|d| *d);
                match at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = watcher.watch(connection.into_owned()) => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %remote_addr, error = %e, "TCP connection ended with an error");
                    }
                }
                () = deadline_passed => tracing::debug!(peer = %remote_addr, "TCP connection closed at the shutdown deadline"),
            }
        });
    }
    drop(tcp);
    let deadline = (*stop.borrow()).unwrap_or_else(Instant::now);
    if tokio::time::timeout_at(deadline.into(), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("TCP connections still open at the shutdown deadline");
    }
}
