//! An HTTP/3 client that is a [`tower::Service`](tower_service::Service), and with the
//! `tcp` feature an HTTP/1.1 and HTTP/2 one too, that finds an origin's HTTP/3 by itself.
//!
//! [`Client`] pools connections per origin (scheme, host, port), multiplexes requests on
//! them, and is `Service<http::Request<B>>` for any body type, so tower's layers (timeout,
//! retry, concurrency limit, buffer) compose with it. [`conn`] is the low-level API for one
//! HTTP/3 connection, in hyper's shape.
//!
//! ## Which protocol (`tcp` feature)
//!
//! By default the client selects the protocol as browsers do. The first request to an
//! origin goes over TLS on TCP (HTTP/2 or HTTP/1.1, by ALPN, through hyper-util's pool),
//! verified from the same [`ClientConfig`] as QUIC. An `Alt-Svc: h3=":port"` in its
//! response (RFC 7838: `ma`, 24 hours by default; `clear`; another port on the same host)
//! is remembered per origin, and later requests go over HTTP/3. QUIC gets a head start
//! (`Builder::http3_handicap`, 300 ms): when its handshake takes longer, the request goes
//! over TCP while the handshake carries on for the next ones. A resumed connection is
//! usable at once, for requests in 0-RTT data; while its handshake has not completed
//! within the handicap (UDP no longer gets through, say), its early requests go over TCP
//! too, and so do later ones. A QUIC attempt that fails
//! (handshake timeout, refused, TLS), or a connection lost before a response, marks HTTP/3
//! broken for the origin — 5 minutes, doubling with each failure after a retry, capped at 2
//! days; a new connection's completed handshake lifts it (a resumed one's, once its
//! handshake completes after its 0-RTT data), an HTTP/3 response resets the count, and a
//! failure of a connection older than one that has carried a response is not counted —
//! and requests go over TCP meanwhile, without an error.
//! A request already sent over HTTP/3 is resent over TCP only when that is safe: the
//! server refused it unprocessed, or its connection failed before any of its response and
//! it is idempotent without a body. [`http::Response::version`] tells which protocol
//! carried a response: `HTTP_11`, `HTTP_2` or `HTTP_3`.
//!
//! [`Builder::http3_prior_knowledge`] speaks HTTP/3 only (the only mode without `tcp`);
//! `Builder::tcp_only` speaks TCP only.
//!
//! ## reqwest's conveniences
//!
//! Around the pool, [`Client`] stacks tower and tower-http layers, each a [`Builder`]
//! option with reqwest's name: it follows up to 10 redirects ([`Builder::redirect`],
//! [`redirect::Policy`]; each hop picks its protocol afresh, so an HTTP/2 answer may lead
//! to HTTP/3), decodes gzip (the default `gzip` feature), br and zstd (features `brotli`,
//! `zstd`) responses, adds [`default_headers`](Builder::default_headers) and a
//! [`user_agent`](Builder::user_agent), and, when asked, bounds a whole request
//! ([`timeout`](Builder::timeout)) and each wait for a head or a body frame
//! ([`read_timeout`](Builder::read_timeout)). [`ResponseExt`] reads a body whole under
//! [`max_response_body_size`](Builder::max_response_body_size) (64 MiB by default, counted
//! after decoding). [`OriginClient`] is the bare transport, without them.
//!
//! ```no_run
//! use tower_quiche::client::{Client, ResponseExt};
//!
//! # async fn run() -> Result<(), tower_quiche::Error> {
//! let client = Client::builder().build()?;
//! let response = client.get("https://localhost:4433/hello").send().await?;
//! println!("{}: {}", response.status(), response.text().await?);
//! # Ok(()) }
//! ```

#[cfg(feature = "tcp")]
mod alt_svc;
#[cfg(feature = "tcp")]
mod auto;
pub mod conn;
mod connect;
mod layers;
pub mod redirect;
#[cfg(feature = "tcp")]
pub(crate) mod tcp;
#[cfg(feature = "zstd")]
mod zstd;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_service::Service;

use crate::error::{BoxError, Error, Kind};
use crate::h3::body::RecvBody;
use crate::quic::{ClientConfig, Endpoint};
use conn::{ConnSettings, Failure, PendingRequest, SendRequest};
use layers::{BodyLimit, Conveniences, ReqBody, Stage, Transport};

pub use crate::h3::fields::Protocol;

/// The 1xx responses that came before a final response, in order: an extension of the
/// final response, present when there were any. At most the first 16 are kept: a server
/// may send any number.
#[derive(Debug, Clone, Default)]
pub struct InformationalResponses(pub Vec<Response<()>>);

/// Where a pooled connection goes: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    fn of(uri: &Uri) -> Result<Origin, Error> {
        let scheme = uri.scheme_str().unwrap_or("https");
        if scheme != "https" {
            return Err(Error::invalid_request(format!(
                "HTTP/3 needs https URLs, not {scheme}://"
            )));
        }
        let host = uri.host().ok_or_else(|| {
            Error::invalid_request(format!("'{uri}' is not an absolute URL: use https://host[:port]/path"))
        })?;
        // Host names are case-insensitive (RFC 3986 §3.2.2): one origin, however spelled,
        // has one pool and one Alt-Svc entry, which an alternative naming the host in lower
        // case (as the parser keeps it) matches.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        Ok(Origin {
            scheme: scheme.to_string(),
            host,
            port: uri.port_u16().unwrap_or(443),
        })
    }

    /// Whether `uri` names this origin, as [`Origin::of`] would read it (without building
    /// one: this is asked of every request over TCP).
    #[cfg_attr(not(feature = "tcp"), allow(dead_code))]
    fn is_named_by(&self, uri: &Uri) -> bool {
        uri.scheme_str().unwrap_or("https") == self.scheme
            && uri.port_u16().unwrap_or(443) == self.port
            && uri.host().is_some_and(|h| {
                h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .eq_ignore_ascii_case(&self.host)
            })
    }

    /// `request` with an absolute URI, as both protocols need: a path alone is completed
    /// with this origin's scheme and the request's `Host` (as HTTP/3's `:authority` has
    /// always taken it), or this origin's authority when it has none.
    fn complete<B>(&self, mut request: Request<B>) -> Result<Request<B>, Error> {
        if request.uri().authority().is_none() {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            let authority = match request.headers().get(http::header::HOST).map(|h| h.to_str()) {
                Some(Ok(host)) => host.to_string(),
                _ => self.authority(),
            };
            *request.uri_mut() = format!("{}://{authority}{path}", self.scheme)
                .parse()
                .map_err(|e| Error::invalid_request(format!("cannot send this request: {e}")))?;
        }
        Ok(request)
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Which protocols the client speaks: see [`Builder::http3_prior_knowledge`] and
/// [`Builder::tcp_only`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// TCP first, HTTP/3 once `Alt-Svc` advertises it, TCP again while it is broken.
    #[cfg(feature = "tcp")]
    Auto,
    /// HTTP/3 only.
    Http3,
    /// HTTP/1.1 and HTTP/2 over TCP only.
    #[cfg(feature = "tcp")]
    Tcp,
}

/// How one request goes: on this HTTP/3 connection, or over TCP.
enum Route {
    H3(SendRequest),
    #[cfg(feature = "tcp")]
    Tcp,
}

struct Pool {
    mode: Mode,
    /// The QUIC endpoint; none in TCP-only mode (no UDP socket at all).
    endpoint: Option<Endpoint>,
    #[cfg(feature = "tcp")]
    tcp: Option<tcp::TcpClient>,
    /// Where each origin's HTTP/3 is, and where it is broken (auto mode).
    #[cfg(feature = "tcp")]
    alt_svc: Mutex<alt_svc::Cache>,
    /// How long QUIC may take before a request goes over TCP instead (auto mode).
    #[cfg(feature = "tcp")]
    handicap: Duration,
    settings: Arc<ConnSettings>,
    connect_timeout: Duration,
    max_per_origin: usize,
    conns: Mutex<HashMap<Origin, Vec<SendRequest>>>,
    /// One connection attempt per origin at a time: every request waiting for a connection
    /// to that origin shares its outcome, success or failure. Removed when it has one.
    connecting: Attempts,
    /// The same for requests a connection refused unprocessed (RFC 9114 §4.1.1), which
    /// need another one: a GOAWAY or a loaded server refuses every request in flight at
    /// once, and one new connection serves them all, where an attempt each would open as
    /// many connections as there were requests.
    connecting_elsewhere: Attempts,
}

/// Connection attempts under way, by origin.
type Attempts = Mutex<HashMap<Origin, Arc<Attempt>>>;

/// A connection attempt, run in a task of its own, and its outcome once it has ended.
///
/// The task, not a request, drives it: a request that stops waiting (its timeout fired,
/// its caller gave up) abandons neither the handshake the others wait for nor one the next
/// request would have to start over (on a slow path with a short timeout, no request would
/// ever get a connection). The task takes the attempt out of the map when it ends: the
/// next request that finds no connection starts a fresh one (a failure is not remembered
/// beyond those who waited for it); a success is in the pool by then.
struct Attempt {
    /// Tells it from a later attempt to the same origin in the map.
    id: u64,
    /// When it began: in auto mode, one slower than the handicap sends later requests
    /// straight to TCP instead of making each wait the handicap again.
    #[cfg_attr(not(feature = "tcp"), allow(dead_code))]
    started: std::time::Instant,
    outcome: futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<SendRequest, Arc<Error>>>>,
}

/// Takes an [`Attempt`] out of its map when its task ends, however it ends (a panic, the
/// runtime shutting down): a settled attempt left there would answer every later request
/// to its origin with its outcome.
struct AttemptEnd {
    pool: Arc<Pool>,
    attempts: fn(&Pool) -> &Attempts,
    origin: Origin,
    id: u64,
}

impl Drop for AttemptEnd {
    fn drop(&mut self) {
        let mut map = (self.attempts)(&self.pool).lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.origin).is_some_and(|a| a.id == self.id) {
            map.remove(&self.origin);
        }
    }
}

/// Numbers [`Attempt`]s.
static ATTEMPT_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Pool {
    /// A live connection to `origin` with room for a request, if there is one, other than
    /// `avoid`. Forgets closed and draining ones.
    fn pick(&self, origin: &Origin, busy_ok: bool, avoid: Option<&SendRequest>) -> Option<SendRequest> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(origin)?;
        list.retain(SendRequest::is_usable);
        if list.is_empty() {
            // An origin no longer in use leaves no trace (a proxy may reach any number).
            conns.remove(origin);
            return None;
        }
        let full = list.len() >= self.max_per_origin;
        let mut candidates = list
            .iter()
            .filter(|c| avoid.is_none_or(|avoid| !avoid.same_connection(c)))
            .peekable();
        if let Some(c) = candidates.clone().find(|c| c.status_spare() > 0) {
            return Some(c.clone());
        }
        if (busy_ok || full) && candidates.peek().is_some() {
            // Every connection is busy and no more are allowed: queue on the least loaded.
            return candidates.min_by_key(|c| c.status_load()).cloned();
        }
        None
    }

    /// A connection to `origin`, whose HTTP/3 is on `port` of its host; when `avoid` is
    /// given, another connection than that one (a new one if need be, even past
    /// `max_per_origin`: the server refused the request there).
    async fn connection(
        self: &Arc<Self>,
        origin: &Origin,
        port: u16,
        avoid: Option<&SendRequest>,
    ) -> Result<SendRequest, Error> {
        if let Some(c) = self.pick(origin, false, avoid) {
            return Ok(c);
        }
        let Some(avoid) = avoid else {
            return self.shared_attempt(|pool| &pool.connecting, origin, port, None).await;
        };
        // Not the attempt of `connecting`: its outcome may be the very connection to avoid.
        // Requests refused by different connections may share one all the same: the
        // outcome is a connection that was not there when the attempt began, or one whose
        // request `pick`ed it; one that is this request's own to avoid is not taken.
        let shared = self
            .shared_attempt(|pool| &pool.connecting_elsewhere, origin, port, Some(avoid.clone()))
            .await?;
        if shared.same_connection(avoid) {
            return self.connect(origin, port, Some(avoid)).await;
        }
        Ok(shared)
    }

    /// Waits for the attempt to reach `origin` in the map `attempts` picks, starting one
    /// (`connect` to `port`, avoiding `avoid`) when there is none: every request waiting
    /// shares its outcome.
    async fn shared_attempt(
        self: &Arc<Self>,
        attempts: fn(&Pool) -> &Attempts,
        origin: &Origin,
        port: u16,
        avoid: Option<SendRequest>,
    ) -> Result<SendRequest, Error> {
        let outcome = {
            let mut map = attempts(self).lock().unwrap_or_else(|p| p.into_inner());
            let attempt = map.entry(origin.clone()).or_insert_with(|| {
                let id = ATTEMPT_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let pool = Arc::clone(self);
                let target = origin.clone();
                let task = tokio::spawn(async move {
                    let end = AttemptEnd {
                        pool,
                        attempts,
                        origin: target,
                        id,
                    };
                    end.pool
                        .connect(&end.origin, port, avoid.as_ref())
                        .await
                        .map_err(Arc::new)
                });
                // A task dropped before it first ran (a runtime shutting down) never armed
                // its `AttemptEnd`: its first waiter takes the attempt out instead. Weak: the
                // map holds this future.
                let pool = Arc::downgrade(self);
                let origin = origin.clone();
                let outcome = async move {
                    task.await.unwrap_or_else(|e| {
                        if let Some(pool) = pool.upgrade() {
                            drop(AttemptEnd {
                                pool,
                                attempts,
                                origin,
                                id,
                            });
                        }
                        Err(Arc::new(
                            Error::new(Kind::Closed).with_message(format!("the connection attempt failed: {e}")),
                        ))
                    })
                };
                Arc::new(Attempt {
                    id,
                    started: std::time::Instant::now(),
                    outcome: futures_util::FutureExt::shared(
                        Box::pin(outcome) as futures_util::future::BoxFuture<'static, _>
                    ),
                })
            });
            attempt.outcome.clone()
        };
        match outcome.await {
            Ok(send) => Ok(send),
            Err(e) => Err(e.duplicate()),
        }
    }

    /// Connects to `origin` (its HTTP/3 on `port`) and pools the connection. In auto mode,
    /// a failure marks HTTP/3 broken for the origin and a completed handshake lifts its
    /// backoff (its failures are forgotten once a response comes; a resumed connection
    /// still in 0-RTT data lifts nothing before then).
    async fn connect(
        self: &Arc<Self>,
        origin: &Origin,
        port: u16,
        avoid: Option<&SendRequest>,
    ) -> Result<SendRequest, Error> {
        // A connection may have come up while this request waited for its turn.
        if let Some(c) = self.pick(origin, false, avoid) {
            return Ok(c);
        }
        #[cfg(feature = "tcp")]
        let opened = std::time::Instant::now();
        let result = self.handshake(origin, port).await;
        #[cfg(feature = "tcp")]
        if self.mode == Mode::Auto {
            let mut cache = self.alt_svc();
            match &result {
                // The mark is lifted; its failures count on until a response comes
                // (`heard_over_h3`).
                Ok(send) if send.status().early_since().is_none() => cache.handshake_worked(origin),
                // A resumed connection sending 0-RTT data has yet to complete its
                // handshake: what it does is learnt when it ends, requests or none (an
                // early request that went over TCP past the handicap left it behind).
                Ok(send) => {
                    let (status, origin) = (send.shared_status(), origin.clone());
                    let pool = Arc::downgrade(self);
                    tokio::spawn(async move {
                        let outcome = status.early_handshake_outcome().await;
                        let Some(pool) = pool.upgrade() else { return };
                        let mut cache = pool.alt_svc();
                        match outcome {
                            Some(true) => cache.handshake_worked(&origin),
                            // Its age as `heard_over_h3` knows it.
                            Some(false) => cache.mark_broken(&origin, status.opened(), std::time::Instant::now()),
                            None => {}
                        }
                    });
                }
                Err(e) if !e.is_invalid_request() => {
                    tracing::debug!(origin = %origin.authority(), error = %e, "HTTP/3 connection failed");
                    cache.mark_broken(origin, opened, std::time::Instant::now());
                }
                Err(_) => {}
            }
        }
        result
    }

    async fn handshake(&self, origin: &Origin, port: u16) -> Result<SendRequest, Error> {
        let endpoint = self
            .endpoint
            .as_ref()
            .ok_or_else(|| Error::config("this client speaks TCP only (Builder::tcp_only)"))?;
        let authority = Origin { port, ..origin.clone() }.authority();
        let started = std::time::Instant::now();
        let connect = conn::handshake_with(endpoint, &authority, Arc::clone(&self.settings));
        let (send, connection) = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                Error::new(Kind::Timeout).with_message(format!(
                    "connecting to {authority} took longer than {:?}",
                    self.connect_timeout
                ))
            })??;
        let deadline = started + self.connect_timeout;
        // A resumed connection is handed over before its handshake completes, to send 0-RTT
        // data: the connect timeout still bounds that handshake.
        connection.handle().limit_handshake(deadline);
        // Nobody needs to await the connection's end: the pool sees it through SendRequest.
        drop(connection);
        if send.status().spare() == 0 {
            // A server that granted no request stream (its initial_max_streams_bidi 0, no
            // MAX_STREAMS since): not pooled unless it grants one within the connect
            // timeout. Requests would wait on it for the QUIC idle timeout (for ever if the
            // server sends PINGs), and in auto mode every such handshake would confirm
            // HTTP/3 for an origin that serves nothing over it.
            let mut probe = send.clone();
            // A silent path ends the wait too.
            let granted = std::future::poll_fn(|cx| probe.poll_reserve(cx));
            match tokio::time::timeout_at(deadline.into(), granted).await {
                // The probe's reservation goes with it.
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::new(Kind::Timeout).with_message(format!(
                        "{authority} completed the QUIC handshake but granted no request stream \
                         (initial_max_streams_bidi 0, no MAX_STREAMS) within {:?}",
                        self.connect_timeout
                    )));
                }
            }
        }
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Closed connections leave with each new one, whatever their origin: `pick` forgets
        // those of origins asked for again, and a crawler or a proxy reaches any number of
        // origins it never asks for again.
        forget_closed(&mut conns);
        conns.entry(origin.clone()).or_default().push(send.clone());
        Ok(send)
    }

    /// How the next request to `origin` goes: on an HTTP/3 connection (waiting for one in
    /// HTTP/3-only mode), or over TCP.
    async fn route(self: &Arc<Self>, origin: &Origin) -> Result<Route, Error> {
        match self.mode {
            Mode::Http3 => Ok(Route::H3(self.connection(origin, origin.port, None).await?)),
            #[cfg(feature = "tcp")]
            Mode::Tcp => Ok(Route::Tcp),
            #[cfg(feature = "tcp")]
            Mode::Auto => Ok(self.auto_route(origin).await),
        }
    }

    /// Sends `request`, first on `reserved` (what `poll_ready` chose) when given, else as
    /// [`route`](Self::route) decides.
    async fn send_via(
        self: Arc<Self>,
        reserved: Option<Route>,
        request: Request<layers::ReqBody>,
        origin: Origin,
    ) -> Result<Response<RecvBody>, Error> {
        // A tunnel (CONNECT, plain or extended) is carried over HTTP/3 only: the TCP side
        // sends requests with bodies and has no tunnels.
        let tunnel = request.method() == Method::CONNECT;
        let route = match reserved {
            // An origin client's `poll_ready` may have reserved TCP (no `Alt-Svc` yet, or
            // HTTP/3 broken): a tunnel goes over HTTP/3 all the same, and waits here for
            // its connection (`poll_ready` cannot see the method).
            #[cfg(feature = "tcp")]
            Some(Route::Tcp) if tunnel && self.mode != Mode::Tcp => {
                Route::H3(self.connection(&origin, self.h3_port(&origin), None).await?)
            }
            Some(route) => route,
            #[cfg(feature = "tcp")]
            None if tunnel && self.mode == Mode::Tcp => Route::Tcp,
            None if tunnel => Route::H3(self.connection(&origin, self.h3_port(&origin), None).await?),
            None => self.route(&origin).await?,
        };
        match route {
            #[cfg(feature = "tcp")]
            Route::Tcp if tunnel => Err(Error::invalid_request(
                "a CONNECT tunnel needs HTTP/3, and this client reaches the origin over TCP only \
                 (Builder::tcp_only)",
            )),
            #[cfg(feature = "tcp")]
            Route::Tcp => self.send_tcp(request.map(layers::ReqBody::into_any), &origin).await,
            // Over HTTP/3 a body all in memory is kept, shared, to go again if the server
            // refuses the request unprocessed (hyper-util has its own rules over TCP).
            #[cfg(feature = "tcp")]
            Route::H3(send) if self.mode == Mode::Auto && !tunnel => {
                let replay = request.body().replay();
                self.send_h3_or_tcp(send, request.map(layers::ReqBody::into_any), origin, replay)
                    .await
            }
            Route::H3(send) => {
                let replay = request.body().replay();
                let pending = PendingRequest::from_boxed(request.map(layers::ReqBody::into_any))?.with_replay(replay);
                let port = self.h3_port(&origin);
                self.send_h3(send, pending, &origin, port, false)
                    .await
                    .map_err(H3Failure::into_error)
            }
        }
    }

    /// The port of the origin's HTTP/3: where its `Alt-Svc` points in the auto mode, else
    /// (or when it advertised none yet) the origin's own, as with prior knowledge.
    ///
    /// The advertised port holds while HTTP/3 is marked broken too: what goes over HTTP/3
    /// then all the same (a tunnel, which TCP does not carry) goes where the origin said.
    fn h3_port(&self, origin: &Origin) -> u16 {
        #[cfg(feature = "tcp")]
        if self.mode == Mode::Auto {
            return self
                .alt_svc()
                .advertised_port(origin, std::time::Instant::now())
                .unwrap_or(origin.port);
        }
        origin.port
    }

    /// The connection a request the server did not process goes to next ([`connection`]
    /// with `avoid`). A request that can go over TCP instead (`tcp_fallback`: auto mode,
    /// not a tunnel) waits no longer than the handicap for a new one whose handshake has
    /// completed (one still in 0-RTT data has not yet shown that UDP passes), as a
    /// request's first attempt does: past it, it goes over TCP (the attempt goes on for the
    /// next requests). A request moved off a connection whose path went silent would
    /// otherwise wait the whole connect timeout where UDP no longer passes. Others (a
    /// tunnel, HTTP/3 only) wait up to the connect timeout.
    ///
    /// [`connection`]: Self::connection
    async fn reconnect(
        self: &Arc<Self>,
        origin: &Origin,
        port: u16,
        avoid: Option<&SendRequest>,
        tcp_fallback: bool,
    ) -> Result<SendRequest, Error> {
        #[cfg(not(feature = "tcp"))]
        let _ = tcp_fallback;
        #[cfg(feature = "tcp")]
        if tcp_fallback {
            let up = async {
                let send = self.connection(origin, port, avoid).await?;
                if std::future::poll_fn(|cx| send.status().poll_handshake_done(cx)).await {
                    Ok(send)
                } else {
                    Err(Error::new(Kind::Closed)
                        .with_message("the new HTTP/3 connection closed, went away or went silent in its handshake"))
                }
            };
            return tokio::time::timeout(self.handicap, up).await.unwrap_or_else(|_| {
                Err(Error::new(Kind::Timeout).with_message("no new HTTP/3 connection within the handicap"))
            });
        }
        self.connection(origin, port, avoid).await
    }

    /// Sends `request` on `send`; a request the server did not process goes once more to
    /// another connection (RFC 9114 §4.1.1: the server may refuse it on that connection
    /// again, for the same reason), to HTTP/3 on `port` of the origin's host. A request
    /// answered `425 Too Early` goes again besides, once. `tcp_fallback`: whether it can
    /// go over TCP instead (see [`reconnect`](Self::reconnect)).
    async fn send_h3(
        self: &Arc<Self>,
        mut send: SendRequest,
        mut request: PendingRequest,
        origin: &Origin,
        port: u16,
        tcp_fallback: bool,
    ) -> Result<Response<RecvBody>, H3Failure> {
        // One resend for a request the server did not process, plus the one a 425 asks for
        // (a request goes in early data once, so there is one such at most).
        const RESENDS: usize = 1;
        let mut resends = 0;
        let mut too_early_resent = false;
        // When it goes again: whether it must avoid the connection that refused it. A
        // refused request goes to another connection, except one refused only for coming in
        // 0-RTT data (425 Too Early): its connection has completed its handshake since.
        let mut avoid_previous: Option<bool> = None;
        loop {
            if let Some(avoid) = avoid_previous.take() {
                let avoid = avoid.then_some(&send);
                send = match self.reconnect(origin, port, avoid, tcp_fallback).await {
                    Ok(send) => send,
                    Err(e) => return Err(H3Failure::Connect(request, e)),
                };
            }
            let mut response = send.send_pending(request);
            match std::future::poll_fn(|cx| response.poll_failure(cx)).await {
                Ok(response) => {
                    // In auto mode, what the response says of HTTP/3 (a tunnel's too).
                    #[cfg(feature = "tcp")]
                    if self.mode == Mode::Auto {
                        self.heard_over_h3(origin, &response, send.status().opened());
                    }
                    return Ok(response);
                }
                Err(Failure::Unsent(unsent, error)) => {
                    let too_early = unsent.refused_as_too_early() && !too_early_resent;
                    if too_early {
                        too_early_resent = true;
                    } else if resends == RESENDS {
                        return Err(H3Failure::Request(
                            Failure::Unsent(unsent, error),
                            send.status().opened(),
                        ));
                    } else {
                        resends += 1;
                    }
                    tracing::debug!(%error, "request not processed; sending it again");
                    avoid_previous = Some(!too_early);
                    request = unsent;
                }
                Err(failure) => return Err(H3Failure::Request(failure, send.status().opened())),
            }
        }
    }
}

/// Why a request failed over HTTP/3, with what is left of it.
enum H3Failure {
    /// No connection could be made for it: it is untouched (and goes over TCP in auto mode).
    Connect(
        #[cfg_attr(not(feature = "tcp"), allow(dead_code))] PendingRequest,
        Error,
    ),
    /// It failed on a connection (opened at the instant): unsent (the server did not
    /// process it) or not.
    Request(
        Failure,
        #[cfg_attr(not(feature = "tcp"), allow(dead_code))] std::time::Instant,
    ),
}

impl H3Failure {
    fn into_error(self) -> Error {
        match self {
            H3Failure::Connect(_, e) => e,
            H3Failure::Request(failure, _) => failure.into_error(),
        }
    }
}

impl SendRequest {
    fn status_spare(&self) -> u64 {
        self.status().spare()
    }
    fn status_load(&self) -> u64 {
        self.status().load()
    }
}

/// An HTTP/3 client with a connection pool. Cheap to clone; clones share the pool.
///
/// It is a `tower::Service<http::Request<B>>` for any body `B`; responses stream their
/// bodies ([`RecvBody`]) with trailers. Requests need absolute `https://` URIs.
/// Certificates are verified against the system roots unless configured otherwise.
#[derive(Clone)]
pub struct Client {
    pool: Arc<Pool>,
    /// The conveniences (redirects, decompression, timeouts, …) around the pool.
    service: Stage,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("mode", &self.pool.mode)
            .field("local_addr", &self.pool.endpoint.as_ref().map(Endpoint::local_addr))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder with default settings.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Sends a request and waits for the response head.
    pub fn send<B>(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<Response<RecvBody>, Error>> + Send + 'static
    where
        B: Body + Send + 'static,
        B::Data: Buf + Send,
        B::Error: Into<BoxError>,
    {
        self.service.clone().oneshot(request.map(ReqBody::of))
    }

    /// Starts a GET request.
    pub fn get(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    /// Starts a POST request.
    pub fn post(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::POST, url)
    }

    /// Starts a PUT request.
    pub fn put(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::PUT, url)
    }

    /// Starts a DELETE request.
    pub fn delete(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::DELETE, url)
    }

    /// Starts a HEAD request.
    pub fn head(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::HEAD, url)
    }

    /// Starts a request with any method.
    pub fn request(&self, method: Method, url: impl AsRef<str>) -> RequestBuilder {
        let request = url
            .as_ref()
            .parse::<Uri>()
            .map_err(|e| Error::invalid_request(format!("'{}' is not a valid URL: {e}", url.as_ref())))
            .map(|uri| Request::builder().method(method).uri(uri));
        RequestBuilder {
            client: self.clone(),
            request,
            body: Bytes::new(),
        }
    }

    /// Opens a tunnel to `url` with an extended CONNECT request for `protocol` (RFC 9220;
    /// e.g. `websocket`, for WebSocket over HTTP/3): the request's and the response's
    /// bodies become one byte stream ([`Tunnel`](crate::tunnel::Tunnel), `AsyncRead +
    /// AsyncWrite`). The server must allow extended CONNECT (its SETTINGS say so) and
    /// answer 2xx; otherwise this fails, with the status in the error's message.
    ///
    /// Tunnels go over HTTP/3 only: in the automatic mode to where the origin's `Alt-Svc`
    /// points, or to the origin's own port before it advertised any; a
    /// [`tcp_only`](Builder::tcp_only) client refuses them. For `websocket` the request
    /// carries `sec-websocket-version: 13`, which RFC 9220 (by RFC 8441 §5) asks for; other
    /// headers go through [`open_tunnel`](Self::open_tunnel).
    ///
    /// ```no_run
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// # async fn run(client: tower_quiche::client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tunnel = client.tunnel("https://localhost:4433/echo", "echo").await?;
    /// tunnel.write_all(b"ping").await?;
    /// tunnel.shutdown().await?;
    /// let mut back = Vec::new();
    /// tunnel.read_to_end(&mut back).await?;
    /// # Ok(()) }
    /// ```
    pub async fn tunnel(&self, url: impl AsRef<str>, protocol: &str) -> Result<crate::tunnel::Tunnel, Error> {
        let uri: Uri = url
            .as_ref()
            .parse()
            .map_err(|e| Error::invalid_request(format!("'{}' is not a valid URL: {e}", url.as_ref())))?;
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = uri;
        if protocol.eq_ignore_ascii_case("websocket") {
            request.headers_mut().insert(
                http::header::SEC_WEBSOCKET_VERSION,
                http::HeaderValue::from_static("13"),
            );
        }
        request.extensions_mut().insert(Protocol::new(protocol));
        self.open_tunnel(request).await
    }

    /// Opens a tunnel with a CONNECT request head of your own: headers beside the
    /// [`Protocol`] extension, as CONNECT-UDP (RFC 9298) needs `capsule-protocol: ?1`. The
    /// tunnel's stream carries HTTP datagrams when both sides enable them
    /// ([`Tunnel::datagrams`](crate::tunnel::Tunnel::datagrams)). It goes over HTTP/3 as
    /// [`tunnel`](Self::tunnel) says.
    ///
    /// ```no_run
    /// use http::{Method, Request};
    /// use tower_quiche::capsule::{CAPSULE_PROTOCOL, capsule_protocol_value};
    /// use tower_quiche::client::Protocol;
    /// # async fn run(client: tower_quiche::client::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut request = Request::builder()
    ///     .method(Method::CONNECT)
    ///     .uri("https://proxy.example:4433/.well-known/masque/udp/192.0.2.6/443/")
    ///     .header(CAPSULE_PROTOCOL, capsule_protocol_value())
    ///     .body(())?;
    /// request.extensions_mut().insert(Protocol::new("connect-udp"));
    /// let mut tunnel = client.open_tunnel(request).await?;
    /// let datagrams = tunnel.datagrams().ok_or("the proxy does not take datagrams")?;
    /// datagrams.send(&b"\0hello"[..])?; // context ID 0, then the UDP payload
    /// # Ok(()) }
    /// ```
    pub async fn open_tunnel(&self, request: Request<()>) -> Result<crate::tunnel::Tunnel, Error> {
        if request.method() != Method::CONNECT {
            return Err(Error::invalid_request(format!(
                "a tunnel is opened with CONNECT, not {}",
                request.method()
            )));
        }
        let (pending, body) = crate::tunnel::Tunnel::outgoing();
        // Straight to the pool: a tunnel is no download to decode, redirect or time out.
        let origin = Origin::of(request.uri())?;
        let mut response = Arc::clone(&self.pool)
            .send_via(None, request.map(|()| layers::ReqBody::of(body)), origin)
            .await?;
        if !response.status().is_success() {
            return Err(Error::new(Kind::Protocol).with_message(format!(
                "the server answered the CONNECT request with {}",
                response.status()
            )));
        }
        let datagrams = crate::datagram::Datagrams::from_response(&mut response);
        let mut tunnel = pending.with_incoming(response.into_body());
        tunnel.set_datagrams(datagrams);
        Ok(tunnel)
    }

    /// A `tower::Service` bound to one origin (`https://host[:port]`), whose `poll_ready`
    /// reports real capacity: pending while its connection is being set up, and while the
    /// server's stream credit is used up. For tonic's generated clients and tower layers
    /// (concurrency limit, buffer, load balancing) that wait on readiness. A failed
    /// connection attempt makes it ready, and the next `call` returns the error: an error
    /// from `poll_ready` would tell tower the service is gone for good.
    ///
    /// Every request goes to that origin, over HTTP/3 and over TCP alike, whatever
    /// authority it names (in its URI, or in the `host` a proxy forwards); none other is
    /// ever connected to. Over HTTP/3 the authority it names is its `:authority` on the
    /// origin's connection (a path alone takes its `host`, or the origin's authority).
    /// Over TCP the request names the origin, `host` included: hyper-util names the
    /// authority it connects to, and HTTP/2 forbids a `host` that disagrees with it.
    ///
    /// It is the bare transport: the [`Builder`]'s conveniences (redirects, decompression,
    /// default headers, timeouts, the body size limit) are the [`Client`]'s, not its own, as
    /// gRPC and tower stacks bring their own.
    pub fn origin(&self, url: impl AsRef<str>) -> Result<OriginClient, Error> {
        let uri: Uri = url
            .as_ref()
            .parse()
            .map_err(|e| Error::invalid_request(format!("'{}' is not a valid URL: {e}", url.as_ref())))?;
        Ok(OriginClient {
            pool: Arc::clone(&self.pool),
            origin: Origin::of(&uri)?,
            ready: None,
            connecting: None,
            failed: None,
        })
    }

    /// How many HTTP/3 connections the pool holds open (for all origins). TCP connections,
    /// pooled by hyper-util, are not counted.
    pub fn pooled_connections(&self) -> usize {
        let mut conns = self.pool.conns.lock().unwrap_or_else(|p| p.into_inner());
        forget_closed(&mut conns);
        conns.values().map(Vec::len).sum()
    }
}

/// Drops the pool's closed and draining connections, and the origins left with none.
fn forget_closed(conns: &mut HashMap<Origin, Vec<SendRequest>>) {
    conns.retain(|_, list| {
        list.retain(SendRequest::is_usable);
        !list.is_empty()
    });
}

impl<B> Service<Request<B>> for Client
where
    B: Body + Send + 'static,
    B::Data: Buf + Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<RecvBody>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RecvBody>, Error>> + Send>>;

    /// Always ready: a request waits inside its future for a connection to its origin and
    /// for that connection's stream credit (or, over TCP, for hyper-util's pool).
    /// Per-connection capacity is what [`conn::SendRequest::poll_ready`] reports.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Box::pin(self.send(request))
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<Route, Error>> + Send>>;

/// A [`Client`] bound to one origin: see [`Client::origin`]. Cheap to clone (clones share
/// the pool, not the readiness reservation).
pub struct OriginClient {
    pool: Arc<Pool>,
    origin: Origin,
    /// How the next `call` goes: a connection with a stream reserved for it, or TCP.
    ready: Option<Route>,
    connecting: Option<Connecting>,
    /// Why the last connection attempt failed: the next `call` reports it. `poll_ready`
    /// stays `Ok`, because an error from it means the service is gone for good (tower's
    /// `Buffer` would keep returning it), and a failed attempt is not that.
    failed: Option<Error>,
}

impl Clone for OriginClient {
    fn clone(&self) -> Self {
        OriginClient {
            pool: Arc::clone(&self.pool),
            origin: self.origin.clone(),
            ready: None,
            connecting: None,
            failed: None,
        }
    }
}

impl std::fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginClient")
            .field("origin", &self.origin.authority())
            .finish_non_exhaustive()
    }
}

impl<B> Service<Request<B>> for OriginClient
where
    B: Body + Send + 'static,
    B::Data: Buf + Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<RecvBody>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RecvBody>, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        loop {
            match &mut self.ready {
                Some(Route::H3(send)) => match send.poll_reserve(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                    // Closed, going away or silent: find or open another connection (the
                    // reservation, if any, goes with the handle).
                    Poll::Ready(Err(_)) => self.ready = None,
                },
                // hyper-util's pool reports no capacity: TCP is always ready.
                #[cfg(feature = "tcp")]
                Some(Route::Tcp) => return Poll::Ready(Ok(())),
                None => {}
            }
            let connecting = self.connecting.get_or_insert_with(|| {
                let pool = Arc::clone(&self.pool);
                let origin = self.origin.clone();
                Box::pin(async move { pool.route(&origin).await })
            });
            match connecting.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => {
                    self.connecting = None;
                    match result {
                        Ok(route) => self.ready = Some(route),
                        Err(e) => {
                            self.failed = Some(e);
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            }
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Some(e) = self.failed.take() {
            return Box::pin(std::future::ready(Err(e)));
        }
        let pool = Arc::clone(&self.pool);
        let origin = self.origin.clone();
        // What `poll_ready` chose (a stream it reserved, or TCP), if anything; without it
        // the pool chooses.
        let reserved = self.ready.take();
        let request = origin.complete(request);
        Box::pin(async move { pool.send_via(reserved, request?.map(layers::ReqBody::of), origin).await })
    }
}

/// Builds a [`Client`].
#[derive(Debug)]
pub struct Builder {
    mode: Mode,
    #[cfg(feature = "tcp")]
    handicap: Duration,
    #[cfg(feature = "tcp")]
    alt_svc_capacity: usize,
    #[cfg(feature = "tcp")]
    broken_backoff: Duration,
    quic: Option<ClientConfig>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_per_origin: usize,
    settings: ConnSettings,
    conveniences: Conveniences,
    /// The `user-agent` header, once given: it goes into the default headers at `build`,
    /// so it does not depend on the order of calls.
    user_agent: Option<Result<HeaderValue, http::Error>>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            #[cfg(feature = "tcp")]
            mode: Mode::Auto,
            #[cfg(not(feature = "tcp"))]
            mode: Mode::Http3,
            #[cfg(feature = "tcp")]
            handicap: Duration::from_millis(300),
            #[cfg(feature = "tcp")]
            alt_svc_capacity: 1024,
            #[cfg(feature = "tcp")]
            broken_backoff: alt_svc::FIRST_BROKEN,
            quic: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_per_origin: 4,
            // The pool sends a request answered `425 Too Early` again, so its connections
            // may send safe requests in 0-RTT.
            settings: ConnSettings {
                early_data: true,
                ..ConnSettings::default()
            },
            conveniences: Conveniences::default(),
            user_agent: None,
        }
    }
}

impl Builder {
    /// Connects with this QUIC configuration: whom to trust (a CA of your own, or none
    /// verified for development), a client certificate for mutual TLS, transport settings.
    /// It must offer the `h3` ALPN, as it does by default. Defaults to
    /// `ClientConfig::builder().build()`: the system's trusted roots.
    ///
    /// ```no_run
    /// use tower_quiche::client::Client;
    /// use tower_quiche::quic::ClientConfig;
    ///
    /// # fn run() -> Result<(), tower_quiche::Error> {
    /// let client = Client::builder()
    ///     .quic_config(ClientConfig::builder().ca_pem_file("ca.pem").build()?)
    ///     .build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn quic_config(mut self, config: ClientConfig) -> Self {
        self.quic = Some(config);
        self
    }

    /// How long establishing a connection may take. Defaults to 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = crate::at_most_never(timeout);
        self
    }

    /// How long a pooled connection with no request in flight stays open. Defaults to 90 s.
    /// Until then it sends a PING every third of the QUIC idle timeout, which would
    /// otherwise close it sooner (30 s by default, or what the server asks for).
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = crate::at_most_never(timeout);
        self
    }

    /// How many connections the pool opens to one origin when every one of them is out of
    /// stream credit. Defaults to 4.
    pub fn max_connections_per_origin(mut self, max: usize) -> Self {
        self.max_per_origin = max.max(1);
        self
    }

    /// How many response-body bytes may wait to be read before the server is held back by
    /// flow control. Defaults to 64 KiB.
    pub fn response_body_buffer(mut self, bytes: usize) -> Self {
        self.settings.response_body_buffer = bytes.max(1);
        self
    }

    /// The largest response head (or trailer section) accepted, counted as HTTP/3 counts
    /// it (RFC 9114 §4.2.2: each field's name and value plus 32 bytes). Defaults to 64 KiB.
    /// The server is told (SETTINGS_MAX_FIELD_SECTION_SIZE); one that sends a larger head
    /// anyway breaks the connection (`H3_EXCESSIVE_LOAD`: quiche closes it), so the
    /// requests on it fail and the next ones go to a new connection.
    /// At least 1 KiB.
    pub fn max_response_header_size(mut self, bytes: u64) -> Self {
        self.settings.max_response_head = bytes.max(1024);
        self
    }

    /// Whether CONNECT requests get HTTP datagrams (RFC 9297) when the server enables them
    /// too: the response carries a [`Datagrams`](crate::datagram::Datagrams) handle
    /// ([`Datagrams::from_response`](crate::datagram::Datagrams::from_response),
    /// [`Tunnel::datagrams`](crate::tunnel::Tunnel::datagrams)). They need QUIC datagrams on
    /// the client's transport, [`TransportConfig::datagrams`](crate::quic::TransportConfig::datagrams)
    /// in [`quic_config`](Self::quic_config), off by default; quiche then sends
    /// SETTINGS_H3_DATAGRAM whatever this says, and with this off every HTTP datagram that
    /// arrives on a CONNECT is dropped. Either way, one on a request that is no CONNECT
    /// fails that request with H3_DATAGRAM_ERROR (RFC 9297 §2). Defaults to on (HTTP
    /// datagrams follow the transport).
    pub fn http_datagrams(mut self, enabled: bool) -> Self {
        self.settings.http_datagrams = enabled;
        self
    }

    /// How many bytes of HTTP datagrams may wait to be read, per stream; past it arriving
    /// datagrams are dropped and counted. Defaults to 64 KiB.
    pub fn datagram_buffer(mut self, bytes: usize) -> Self {
        self.settings.datagram_buffer = bytes;
        self
    }

    /// Speaks HTTP/3 only, to every origin, without asking over TCP first (RFC 9114 §3.1.1
    /// "prior knowledge"); no TCP connection is ever opened. Without the `tcp` feature this
    /// is the only mode, and the default.
    pub fn http3_prior_knowledge(mut self) -> Self {
        self.mode = Mode::Http3;
        self
    }

    /// (`tcp` feature) Speaks HTTP/1.1 and HTTP/2 over TLS on TCP only (ALPN `h2`, then
    /// `http/1.1`), ignoring `Alt-Svc`; no UDP socket is bound. Servers are verified as
    /// over QUIC, from the same [`quic_config`](Self::quic_config).
    #[cfg(feature = "tcp")]
    pub fn tcp_only(mut self) -> Self {
        self.mode = Mode::Tcp;
        self
    }

    /// (`tcp` feature) The head start QUIC gets over TCP, in the default automatic mode,
    /// for an origin known to speak HTTP/3 with no connection up yet: when the QUIC
    /// handshake has not completed by then, the request goes over TCP instead while the
    /// handshake carries on for later requests. Defaults to 300 ms.
    #[cfg(feature = "tcp")]
    pub fn http3_handicap(mut self, handicap: Duration) -> Self {
        self.handicap = crate::at_most_never(handicap);
        self
    }

    /// (`tcp` feature) How many origins' `Alt-Svc` (and broken-HTTP/3) state the client
    /// remembers; past it, the origin heard from longest ago is forgotten. Defaults to 1024.
    #[cfg(feature = "tcp")]
    pub fn alt_svc_cache_size(mut self, origins: usize) -> Self {
        self.alt_svc_capacity = origins.max(1);
        self
    }

    /// Which redirects are followed. Defaults to [`redirect::Policy::limited(10)`](redirect::Policy::limited)
    /// (reqwest's default); [`redirect::Policy::none()`](redirect::Policy::none) returns
    /// 3xx responses as they are. See [`redirect::Policy`] for what is never followed and
    /// what a request loses when it leaves its origin.
    ///
    /// ```no_run
    /// use tower_quiche::client::{Client, redirect};
    ///
    /// # fn run() -> Result<(), tower_quiche::Error> {
    /// let client = Client::builder().redirect(redirect::Policy::none()).build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn redirect(mut self, policy: redirect::Policy) -> Self {
        self.conveniences.redirect = policy;
        self
    }

    /// (`gzip` feature, on by default) Sends `accept-encoding: gzip` (with the other codings
    /// that are on) and decodes `content-encoding: gzip` responses, removing their
    /// `content-encoding` and `content-length`. Defaults to `true`. A request with its own
    /// `accept-encoding` keeps it; one with a `Range` header asks for `identity` (a range of
    /// a gzip body is no gzip stream). Only the final response of redirects is decoded.
    #[cfg(feature = "gzip")]
    pub fn gzip(mut self, enable: bool) -> Self {
        self.conveniences.gzip = enable;
        self
    }

    /// (`brotli` feature) As [`gzip`](Self::gzip), for `br`. Defaults to `true` when the
    /// feature is on.
    #[cfg(feature = "brotli")]
    pub fn brotli(mut self, enable: bool) -> Self {
        self.conveniences.brotli = enable;
        self
    }

    /// (`zstd` feature) As [`gzip`](Self::gzip), for `zstd`. Defaults to `true` when the
    /// feature is on.
    #[cfg(feature = "zstd")]
    pub fn zstd(mut self, enable: bool) -> Self {
        self.conveniences.zstd = enable;
        self
    }

    /// Headers sent with every request that does not have a header of the same name
    /// (a request's own value wins). Defaults to none. They are carried through redirects,
    /// except credentials and `host` once a redirect leaves the origin.
    ///
    /// ```no_run
    /// use tower_quiche::client::Client;
    /// use http::{HeaderMap, HeaderValue, header::ACCEPT};
    ///
    /// # fn run() -> Result<(), tower_quiche::Error> {
    /// let mut headers = HeaderMap::new();
    /// headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    /// let client = Client::builder().default_headers(headers).user_agent("my-app/1.0").build()?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn default_headers(mut self, headers: HeaderMap) -> Self {
        self.conveniences.default_headers = headers;
        self
    }

    /// The `user-agent` header sent with every request that has none. Defaults to none, as
    /// reqwest's and hyper's. An invalid value fails [`build`](Self::build).
    pub fn user_agent<V>(mut self, value: V) -> Self
    where
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.user_agent = Some(HeaderValue::try_from(value).map_err(Into::into));
        self
    }

    /// How long a whole request may take: from the call until the last byte of the
    /// response body, redirects included. Past it the call, or the body's next frame,
    /// fails with an error whose [`is_timeout`](Error::is_timeout) is true. Defaults to
    /// none (a download may take as long as it takes; see
    /// [`read_timeout`](Self::read_timeout) for a stalled one).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.conveniences.timeout = Some(crate::at_most_never(timeout));
        self
    }

    /// How long the client waits for each response head (connecting included) and then
    /// between two frames of its body: a server that stops sending fails the request or
    /// the body with an error whose [`is_timeout`](Error::is_timeout) is true, however
    /// long the transfer as a whole. Time the caller takes between reads does not count.
    /// Defaults to none (HTTP/3 still notices a dead connection by its idle timeout; a
    /// live server that trickles is what this bounds).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.conveniences.read_timeout = Some(crate::at_most_never(timeout));
        self
    }

    /// The largest response body `ResponseExt::bytes`, `text` and `json` read, counted after
    /// decoding (so a small compressed body that decodes to gigabytes fails too); past it
    /// they fail with an error whose [`is_too_large`](Error::is_too_large) is true. Reading
    /// the body frame by frame has no limit. Defaults to 64 MiB; `None` removes it.
    pub fn max_response_body_size(mut self, bytes: Option<u64>) -> Self {
        self.conveniences.max_body = bytes;
        self
    }

    /// (`tcp` feature) How long HTTP/3 stays off for an origin after it failed there (in
    /// the automatic mode), requests going over TCP meanwhile; each failure after a new try
    /// doubles it, up to 2 days, and a success resets it. Defaults to 5 minutes, as
    /// Chromium's.
    #[cfg(feature = "tcp")]
    pub fn http3_broken_backoff(mut self, backoff: Duration) -> Self {
        self.broken_backoff = crate::at_most_never(backoff);
        self
    }

    /// Builds the client, and binds its UDP socket (dual-stack where the system allows)
    /// unless it speaks TCP only.
    pub fn build(self) -> Result<Client, Error> {
        let config = match self.quic {
            Some(config) => config,
            None => ClientConfig::builder().build()?,
        };
        #[cfg(feature = "tcp")]
        let tcp = match self.mode {
            Mode::Http3 => None,
            _ => Some(tcp::TcpClient::new(&config, self.connect_timeout, self.idle_timeout)?),
        };
        #[cfg(feature = "tcp")]
        let speaks_h3 = self.mode != Mode::Tcp;
        #[cfg(not(feature = "tcp"))]
        let speaks_h3 = true;
        let endpoint = if speaks_h3 {
            if !config.alpn().any(|p| p == b"h3") {
                return Err(Error::config(
                    "the client's ClientConfig does not offer the \"h3\" ALPN: leave its alpn at the default, or \
                     include \"h3\" in the list",
                ));
            }
            Some(Endpoint::client(config)?)
        } else {
            None
        };
        let mut settings = self.settings;
        settings.idle_timeout = Some(self.idle_timeout);
        let mut conveniences = self.conveniences;
        if let Some(user_agent) = self.user_agent {
            let user_agent =
                user_agent.map_err(|e| Error::config(format!("the user agent is not a valid header value: {e}")))?;
            conveniences
                .default_headers
                .insert(http::header::USER_AGENT, user_agent);
        }
        let pool = Arc::new(Pool {
            mode: self.mode,
            endpoint,
            #[cfg(feature = "tcp")]
            tcp,
            #[cfg(feature = "tcp")]
            alt_svc: Mutex::new(alt_svc::Cache::new(self.alt_svc_capacity, self.broken_backoff)),
            #[cfg(feature = "tcp")]
            handicap: self.handicap,
            settings: Arc::new(settings),
            connect_timeout: self.connect_timeout,
            max_per_origin: self.max_per_origin,
            conns: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            connecting_elsewhere: Mutex::new(HashMap::new()),
        });
        let service = conveniences.stack(Transport(Arc::clone(&pool)));
        Ok(Client { pool, service })
    }
}

/// A request being built, reqwest-style: `client.get(url).header(k, v).send().await`.
#[derive(Debug)]
pub struct RequestBuilder {
    client: Client,
    request: Result<http::request::Builder, Error>,
    body: Bytes,
}

impl RequestBuilder {
    /// Adds a header.
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.request = self.request.map(|r| r.header(name, value));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and `content-type: application/json`.
    #[cfg(feature = "json")]
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(bytes) => {
                self.body = bytes.into();
                self.header(http::header::CONTENT_TYPE, "application/json")
            }
            Err(e) => {
                self.request = Err(Error::invalid_request(format!("cannot serialize the JSON body: {e}")));
                self
            }
        }
    }

    /// Sends the request and waits for the response head.
    pub async fn send(self) -> Result<Response<RecvBody>, Error> {
        let request = self
            .request?
            .body(ReqBody::bytes(self.body))
            .map_err(|e| Error::invalid_request(e.to_string()))?;
        self.client.service.oneshot(request).await
    }
}

/// Reads a response body whole: `.bytes()`, `.text()`, `.json()`.
///
/// A response from a [`Client`] is read up to its
/// [`max_response_body_size`](Builder::max_response_body_size) (64 MiB by default), counted
/// after decoding: past it, the read fails with an error whose
/// [`is_too_large`](Error::is_too_large) is true.
pub trait ResponseExt: Sized + Send {
    /// The whole body (trailers are dropped).
    fn bytes(self) -> impl Future<Output = Result<Bytes, Error>> + Send;

    /// The whole body as UTF-8 text (invalid sequences replaced).
    fn text(self) -> impl Future<Output = Result<String, Error>> + Send {
        async move {
            let bytes = self.bytes().await?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    /// The whole body parsed as JSON.
    #[cfg(feature = "json")]
    fn json<T: serde::de::DeserializeOwned>(self) -> impl Future<Output = Result<T, Error>> + Send {
        async move {
            let bytes = self.bytes().await?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::new(Kind::Protocol).with_message(format!("invalid JSON body: {e}")))
        }
    }
}

impl ResponseExt for Response<RecvBody> {
    async fn bytes(self) -> Result<Bytes, Error> {
        let Some(BodyLimit(limit)) = self.extensions().get::<BodyLimit>().copied() else {
            return Ok(self.into_body().collect().await?.to_bytes());
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        match http_body_util::Limited::new(self.into_body(), limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::new(Kind::TooLarge).with_message(
                format!("the response body is larger than {limit} bytes (Builder::max_response_body_size)"),
            )),
            Err(e) => Err(layers::into_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `https://Example.COM` and `https://example.com` are one origin.
    #[test]
    fn an_origins_host_is_compared_in_lower_case() {
        let of = |url: &str| Origin::of(&url.parse().unwrap()).unwrap();
        assert_eq!(of("https://Example.COM/a"), of("https://example.com/b"));
        assert_eq!(of("https://EXAMPLE.com:8443/").authority(), "example.com:8443");
        assert_eq!(of("https://[::1]/").authority(), "[::1]:443");
        let named = |origin: &str, url: &str| of(origin).is_named_by(&url.parse().unwrap());
        assert!(named("https://example.com", "https://EXAMPLE.com:443/x"));
        assert!(named("https://[::1]:8443", "https://[::1]:8443/"));
        assert!(!named("https://example.com", "https://example.com:8443/"));
        assert!(!named("https://example.com", "https://example.org/"));
        assert!(!named("https://example.com", "/path"));
    }

    /// An HTTP/3-only client that trusts any certificate (none of these tests is about
    /// certificates, and none needs the system's roots read), with `configure` applied.
    fn http3_client(configure: impl FnOnce(Builder) -> Builder) -> Client {
        let config = ClientConfig::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        configure(Client::builder().http3_prior_knowledge().quic_config(config))
            .build()
            .unwrap()
    }

    /// A connection attempt goes on when the one request waiting for it is cancelled (the
    /// next request may use it), and leaves the pool's map when it ends: a settled attempt
    /// left there would answer later requests with its outcome, and one with no outcome
    /// would pass for an attempt under way (in auto mode, one slower than the handicap,
    /// which sends every later request of the origin to TCP).
    #[tokio::test]
    async fn an_attempt_outlives_its_cancelled_waiter_and_leaves_the_pool_when_it_ends() {
        // An address that swallows every datagram: the handshake never completes.
        let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = http3_client(|b| b.connect_timeout(Duration::from_secs(3)));
        let url = format!("https://127.0.0.1:{}/", sink.local_addr().unwrap().port());
        let request = tokio::spawn({
            let client = client.clone();
            async move { client.get(url).send().await }
        });
        let connecting = || client.pool.connecting.lock().unwrap().len();
        tokio::time::timeout(Duration::from_secs(10), async {
            while connecting() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the attempt starts");
        request.abort();
        let _ = request.await;
        assert_eq!(connecting(), 1, "the attempt goes on without its waiter");
        tokio::time::timeout(Duration::from_secs(10), async {
            while connecting() != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the attempt left the map when its connect timeout ended it");
    }

    /// A pooled connection that closed leaves the pool with its origin once another
    /// connection is made, even if its origin is never asked for again (a crawler's or a
    /// proxy's pool would grow with every origin it ever reached). (Found by review.)
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn origins_whose_connections_closed_leave_the_pool() {
        let listener = crate::quic::Listener::bind("127.0.0.1:0", crate::testing::server_config("h3", |t| t))
            .await
            .unwrap();
        let port = listener.local_addr().port();
        let hello = tower::service_fn(|_request: Request<crate::RecvBody>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from_static(
                b"hello",
            ))))
        });
        let server = tokio::spawn(crate::server::serve(listener, hello).into_future());
        let client = http3_client(|b| b.pool_idle_timeout(Duration::from_millis(50)));
        let origins = || client.pool.conns.lock().unwrap().len();
        tokio::time::timeout(Duration::from_secs(10), async {
            // Two origins on one server: by address, then by name.
            client.get(format!("https://127.0.0.1:{port}/")).send().await.unwrap();
            assert_eq!(origins(), 1);
            // The pooled connection closes itself once idle for 50 ms.
            let all_closed = || {
                client
                    .pool
                    .conns
                    .lock()
                    .unwrap()
                    .values()
                    .flatten()
                    .all(|c| !c.is_usable())
            };
            while !all_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            client.get(format!("https://localhost:{port}/")).send().await.unwrap();
        })
        .await
        .expect("both requests answered");
        assert_eq!(origins(), 1, "only the origin with a live connection is kept");
        server.abort();
    }

    /// The futures and handles a caller holds are `Send` and `Sync`, as hyper's are: a
    /// request body (not `Sync`) waiting inside one must not take that away.
    #[test]
    fn the_client_s_futures_are_send_and_sync() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<conn::ResponseFuture>();
        send_and_sync::<conn::SendRequest>();
        send_and_sync::<Client>();
    }

    /// A URL the client cannot use is the caller's mistake, said as such: not a setting.
    #[test]
    fn unusable_urls_are_invalid_requests_not_configuration_errors() {
        for url in ["http://example.com/", "/relative/path"] {
            let uri: Uri = url.parse().unwrap();
            let error = Origin::of(&uri).unwrap_err();
            assert!(error.is_invalid_request(), "{url}: {error}");
            assert!(!error.is_config(), "{url}: {error}");
        }
        assert!(Origin::of(&"https://example.com:8443/".parse().unwrap()).is_ok());
    }
}
