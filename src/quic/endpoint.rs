//! Endpoints, the public faces of both roles: [`Listener`] (server: bind, accept) and
//! [`Endpoint`] (client: connect), and [`Incoming`], a connection not yet started.
//!
//! An endpoint binds its UDP sockets, spawns a router task per socket ([`super::router`])
//! and starts each connection's task ([`super::driver`]) with what the task needs from the
//! socket, handed over as one [`ConnContext`].

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::app::{Application, ConnectionHandle};
use super::cid::{self, ResetKey};
use super::config::{ClientConfig, ServerConfig};
use super::driver::{self, ConnContext};
use super::limits::Limits;
use super::router::{self, Accepted, Shared};
use super::routes::{InboundQueue, Registration, RouteTable};
use super::session::{SessionCache, SessionSlot};
use super::streams::{self, StreamConnection};
use super::udp::Socket;
use crate::error::Error;

/// What the task of a connection on `shared`'s socket gets.
fn context(
    shared: &Shared,
    registration: Registration,
    inbound: InboundQueue,
    started: Instant,
    server_ip: Option<IpAddr>,
    sessions: Option<SessionSlot>,
) -> ConnContext {
    ConnContext {
        server_ip,
        socket: Arc::clone(&shared.socket),
        config: shared.config.clone(),
        reset_key: Arc::clone(&shared.reset_key),
        registration,
        inbound,
        started,
        sessions,
    }
}

/// Closes its sockets' routers when the last clone of the owning handle is dropped.
struct CloseOnDrop(Vec<Arc<Shared>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        for shared in &self.0 {
            shared.routes.close();
        }
    }
}

/// How many sockets a listener binds per address: the configured number, or one per worker
/// thread of the runtime that binds.
fn sockets_per_address(config: &ServerConfig) -> usize {
    config.config.inner.server.sockets_per_address.unwrap_or_else(|| {
        tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_workers())
            .unwrap_or(1)
            .max(1)
    })
}

/// Whether the listener may join other sockets' `SO_REUSEPORT` group on its port.
fn share_port(config: &ServerConfig) -> bool {
    config.config.inner.server.share_port
}

/// A bind that failed, saying what to change when the port is taken.
fn bind_error(addr: SocketAddr, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        Error::io(
            format!(
                "cannot bind UDP {addr}: another socket holds the port (another server running?); pick another \
                 port or stop it (ServerConfigBuilder::share_port says when two servers may share one)"
            ),
            e,
        )
    } else {
        Error::io(format!("cannot bind UDP {addr}"), e)
    }
}

/// A QUIC server endpoint: one or more UDP sockets whose new connections arrive here.
///
/// By default it binds one socket per tokio worker thread to each address, with
/// `SO_REUSEPORT` on Linux
/// ([`ServerConfigBuilder::sockets_per_address`](crate::quic::ServerConfigBuilder::sockets_per_address)),
/// so receiving spreads over the runtime's threads. Each socket has a router task that answers unknown versions with version negotiation,
/// validates client addresses with Retry (unless turned off), and hands out [`Incoming`]
/// connections through a bounded backlog. `Listener` is a [`Stream`](futures_core::Stream)
/// of them; [`Listener::accept`] takes one.
///
/// Dropping the listener stops accepting; connections already started run on until they
/// close.
pub struct Listener {
    incoming: mpsc::Receiver<Accepted>,
    config: ServerConfig,
    local_addrs: Vec<SocketAddr>,
    _close: CloseOnDrop,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local_addrs", &self.local_addrs)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Binds a server endpoint on `addr` (e.g. `"127.0.0.1:4433"`, `"[::]:443"`, a
    /// `SocketAddr`, or a name to resolve), as tokio's `UdpSocket::bind` does: when `addr`
    /// resolves to several addresses, the first that binds is used.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_quiche::Error> {
    /// use tower_quiche::quic::{Listener, ServerConfig};
    ///
    /// let listener = Listener::bind("0.0.0.0:4433", ServerConfig::from_pem_files("cert.pem", "key.pem")?).await?;
    /// println!("listening on {}", listener.local_addr());
    /// # Ok(()) }
    /// ```
    pub async fn bind(addr: impl tokio::net::ToSocketAddrs, config: ServerConfig) -> Result<Listener, Error> {
        let addrs = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::io("cannot resolve the address to listen on", e))?;
        let per_address = sockets_per_address(&config);
        let mut last_error = None;
        for addr in addrs {
            match Socket::bind_group(addr, per_address, false, share_port(&config)) {
                Ok(sockets) => return Self::from_sockets(sockets, config),
                Err(e) => last_error = Some(bind_error(addr, e)),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::invalid_request("the address to listen on resolved to nothing")))
    }

    /// Binds a server endpoint on several addresses (say, an IPv4 and an IPv6 one); new
    /// connections from all of them arrive on this one listener. An IPv6 wildcard (`[::]`)
    /// listed beside an IPv4 address on the same port serves IPv6 only, so `0.0.0.0:443`
    /// and `[::]:443` bind together.
    pub async fn bind_all(addrs: &[SocketAddr], config: ServerConfig) -> Result<Listener, Error> {
        let per_address = sockets_per_address(&config);
        let mut sockets = Vec::new();
        for addr in addrs {
            let v6_only = addr.port() != 0 && addrs.iter().any(|a| a.is_ipv4() && a.port() == addr.port());
            let group = Socket::bind_group(*addr, per_address, v6_only, share_port(&config));
            sockets.extend(group.map_err(|e| bind_error(*addr, e))?);
        }
        Self::from_sockets(sockets, config)
    }

    /// Serves on sockets the caller already bound (e.g. inherited from a supervisor).
    /// Sockets bound to the same address (with `SO_REUSEPORT`) are served as one group, as
    /// [`ServerConfigBuilder::sockets_per_address`](crate::quic::ServerConfigBuilder::sockets_per_address)
    /// describes.
    pub fn from_std(sockets: Vec<std::net::UdpSocket>, config: ServerConfig) -> Result<Listener, Error> {
        let sockets = sockets
            .into_iter()
            .map(|s| Socket::from_std(s).map_err(|e| Error::io("cannot use the UDP socket", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_sockets(sockets, config)
    }

    fn from_sockets(sockets: Vec<Socket>, server_config: ServerConfig) -> Result<Listener, Error> {
        if sockets.is_empty() {
            return Err(Error::invalid_request("no address to listen on"));
        }
        let config = &server_config.config;
        let (tx, rx) = mpsc::channel(config.inner.server.accept_backlog);
        // The sockets of one address share its routes and reset key (see `Shared`).
        let mut local_addrs = Vec::new();
        let mut groups: Vec<(Arc<RouteTable>, Arc<ResetKey>)> = Vec::new();
        for socket in &sockets {
            if !local_addrs.contains(&socket.local_addr()) {
                local_addrs.push(socket.local_addr());
                groups.push((Arc::default(), Shared::reset_key_of(config)));
            }
        }
        let tables = match config.inner.server.reset_key {
            Some(_) => groups.iter().map(|(routes, _)| Arc::clone(routes)).collect(),
            None => Arc::from([]),
        };
        // One set of caps, keys and TLS context for the whole listener, whichever socket a
        // client arrives on.
        let limits = Limits::new(&config.inner.server);
        let accept = router::Accept::new(config.quiche_config(true)?, tx, limits, tables);
        let mut shareds: Vec<Arc<Shared>> = Vec::new();
        for socket in sockets {
            let group = local_addrs
                .iter()
                .position(|addr| *addr == socket.local_addr())
                .expect("every address has a group");
            let (routes, reset_key) = &groups[group];
            let shared = Shared::in_group(socket, config.clone(), Arc::clone(routes), Arc::clone(reset_key));
            router::spawn(Arc::clone(&shared), Some(accept.clone()));
            shareds.push(shared);
        }
        Ok(Listener {
            incoming: rx,
            config: server_config,
            local_addrs,
            _close: CloseOnDrop(shareds),
        })
    }

    /// The configuration the listener was bound with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The first bound address (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Every bound address (once, however many sockets are bound to it).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Waits for the next new connection. Returns `None` only if every router stopped.
    pub async fn accept(&mut self) -> Option<Incoming> {
        self.incoming.recv().await.map(Incoming)
    }

    /// Polls for the next new connection.
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        self.incoming.poll_recv(cx).map(|a| a.map(Incoming))
    }
}

impl Drop for Listener {
    /// Refuses the connections still waiting to be accepted ([`Incoming::refuse`]): their
    /// clients learn it at once instead of waiting out their handshake timeout (a server
    /// shutting down). The accept queue bounds what this costs.
    fn drop(&mut self) {
        self.incoming.close();
        if tokio::runtime::Handle::try_current().is_err() {
            // No runtime to refuse in (`refuse` needs one): they go silently.
            return;
        }
        // A router may hold a place it reserved in the queue and fill it at the end of its
        // batch, after this drop: the queue is drained until those places are filled too
        // (`recv` ends once the queue is closed, empty and no reservation is left), in a
        // task of its own, since a drop cannot wait.
        let (_, empty) = mpsc::channel(1);
        let mut incoming = std::mem::replace(&mut self.incoming, empty);
        tokio::spawn(async move {
            while let Some(accepted) = incoming.recv().await {
                Incoming(accepted).refuse();
            }
        });
    }
}

impl futures_core::Stream for Listener {
    type Item = Incoming;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        self.get_mut().poll_accept(cx)
    }
}

/// A new server-side connection, not yet started: its first packets are queued. Call
/// [`Incoming::start`] with the [`Application`] that will drive it, or
/// [`Incoming::refuse`] to tell the client no; dropping it refuses the connection silently
/// (the client times out).
pub struct Incoming(Accepted);

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("peer_addr", &self.peer_addr())
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        Socket::canonical(
            self.0
                .conn
                .path_stats()
                .next()
                .map(|p| p.peer_addr)
                .unwrap_or_else(|| self.local_addr()),
        )
    }

    /// The configuration of the listener it arrived on.
    #[cfg(feature = "server")]
    pub(crate) fn config(&self) -> &super::config::Config {
        &self.0.shared.config
    }

    /// The local address the connection arrived on: on a socket bound to a wildcard
    /// address, the one the client sent to.
    pub fn local_addr(&self) -> SocketAddr {
        let local = self.0.conn.path_stats().next().map(|p| p.local_addr);
        Socket::canonical(local.unwrap_or(self.0.shared.socket.local_addr()))
    }

    /// Spawns the connection's task, which completes the handshake and then drives `app`.
    pub fn start<A: Application>(self, app: A) -> ConnectionHandle {
        Self::spawn(self.0, driver::AppSlot::Running(app))
    }

    /// Refuses the connection and tells the client: it gets CONNECTION_REFUSED (RFC 9000
    /// §20.1) in a CONNECTION_CLOSE, at once instead of at its handshake timeout. The close
    /// follows the server's first handshake flight, which the client needs to read it, so
    /// this costs what that flight does (a TLS signature); dropping the `Incoming` costs
    /// nothing, for clients not worth the answer. Needs a tokio runtime (the connection's
    /// task sends it); outside one it is dropped.
    pub fn refuse(self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = Self::spawn(self.0, driver::AppSlot::<driver::NoApplication>::Refused);
        }
    }

    fn spawn<A: Application>(accepted: Accepted, app: driver::AppSlot<A>) -> ConnectionHandle {
        let Accepted {
            conn,
            shared,
            inbound,
            registration,
            started,
        } = accepted;
        let ctx = context(&shared, registration, inbound, started, None, None);
        driver::spawn(conn, ctx, app)
    }

    /// Starts the connection with the async stream API, and waits until its handshake has
    /// completed; fails with the reason it did not.
    ///
    /// The connection's streams are then accepted and opened through the
    /// [`StreamConnection`]; use [`start`](Self::start) with an [`Application`] of your own
    /// for the raw `QuicheConnection` instead.
    pub async fn accept_streams(self) -> Result<StreamConnection, Error> {
        let (app, parts) = streams::new(&self.0.shared.config, true);
        let conn = parts.with_handle(self.start(app));
        conn.established().await?;
        Ok(conn)
    }
}

/// A QUIC client endpoint: one UDP socket that many connections share.
///
/// [`connect_addr`](Self::connect_addr) connects to one address. [`connect`](Self::connect)
/// resolves a name and races its addresses; that belongs to the client side of the crate
/// and is defined there, so this transport module knows no DNS.
///
/// Cheap to clone. The socket closes when the last clone is dropped and its last connection
/// has closed.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
    quiche_config: Arc<Mutex<quiche::Config>>,
    /// Sessions servers issued, for resumption and 0-RTT on later connections.
    sessions: Arc<SessionCache>,
    _close: Arc<CloseOnDrop>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// A client endpoint on a wildcard address: a dual-stack IPv6 socket where the system
    /// allows one (reaching IPv4 and IPv6 servers), else an IPv4 socket.
    pub fn client(config: ClientConfig) -> Result<Endpoint, Error> {
        let socket = Socket::bind("[::]:0".parse().expect("literal address"))
            .or_else(|_| Socket::bind("0.0.0.0:0".parse().expect("literal address")))
            .map_err(|e| Error::io("cannot bind a UDP socket for the client", e))?;
        Self::with_socket(socket, config)
    }

    /// A client endpoint bound to `addr` (e.g. `127.0.0.1:0`).
    pub fn client_bound(addr: SocketAddr, config: ClientConfig) -> Result<Endpoint, Error> {
        let socket = Socket::bind(addr).map_err(|e| Error::io(format!("cannot bind UDP {addr}"), e))?;
        Self::with_socket(socket, config)
    }

    fn with_socket(socket: Socket, config: ClientConfig) -> Result<Endpoint, Error> {
        let config = config.config;
        let quiche_config = config.quiche_config(false)?;
        let shared = Shared::new(socket, config);
        router::spawn(Arc::clone(&shared), None);
        Ok(Endpoint {
            shared: Arc::clone(&shared),
            quiche_config: Arc::new(Mutex::new(quiche_config)),
            sessions: Arc::default(),
            _close: Arc::new(CloseOnDrop(vec![shared])),
        })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.socket.local_addr()
    }

    /// The configuration the endpoint was made with.
    #[cfg(feature = "client")]
    pub(crate) fn config(&self) -> &super::config::Config {
        &self.shared.config
    }

    /// How many connections currently use this endpoint's socket.
    pub fn open_connections(&self) -> usize {
        self.shared.routes.connections()
    }

    /// Connects to `addr`; `server_name` is sent as SNI and checked against the server's
    /// certificate (a literal IP address, such as `Some("192.0.2.1")`, is checked against
    /// the certificate's IP SANs). Returns once the handshake has completed (or, for an
    /// application that [accepts early data](Application::accepts_early_data), once a resumed
    /// session lets it send 0-RTT data).
    ///
    /// Without a name, a certificate valid for any name would be accepted: so `None` is
    /// refused with a configuration error while the configuration verifies certificates. It
    /// is accepted when verification is off
    /// ([`danger_accept_invalid_certs`](crate::quic::ClientConfigBuilder::danger_accept_invalid_certs))
    /// or the server is known by its raw public key.
    pub async fn connect_addr<A: Application>(
        &self,
        addr: SocketAddr,
        server_name: Option<&str>,
        app: A,
    ) -> Result<ConnectionHandle, Error> {
        if server_name.is_none() && self.shared.config.verifies_server_name() {
            return Err(Error::invalid_request(format!(
                "connect_addr to {addr} without a server name cannot check the server's identity: pass the name \
                 its certificate is for (or its IP address as text), or turn verification off explicitly with \
                 ClientConfigBuilder::danger_accept_invalid_certs(true)"
            )));
        }
        let early = app.accepts_early_data();
        Ok(self
            .start_connection(addr, server_name)?
            .usable(early)
            .await?
            .start(app))
    }

    /// The address a session stored for `server_name` on `port` was received from: Happy
    /// Eyeballs tries it first (see [`SessionCache`]).
    #[cfg(feature = "client")]
    pub(crate) fn resumes_at(&self, server_name: &str, port: u16) -> Option<SocketAddr> {
        self.sessions.address_of(&SessionCache::key(server_name, port))
    }

    /// Starts a connection to `addr` whose application is handed over once the handshake
    /// completes, so that an attempt that fails or loses a race does not consume it.
    pub(crate) fn start_connection<A: Application>(
        &self,
        addr: SocketAddr,
        server_name: Option<&str>,
    ) -> Result<Connecting<A>, Error> {
        if addr.port() == 0 {
            // Linux refuses to send there with EINVAL, which quinn-udp takes for a socket
            // without GSO, and turns GSO off on the socket for good: for every connection
            // on this endpoint (a redirect to `https://host:0/` could ask for it).
            return Err(Error::invalid_request(format!(
                "cannot connect to {addr}: port 0 is no server's port"
            )));
        }
        let shared = &self.shared;
        let peer = shared.socket.peer_address_for(addr);
        let scid = cid::new_id(&*shared.config.inner.cid_generator);
        // An address is checked against the certificate's IP SANs by the driver, and is
        // not sent as SNI (which names hosts only, RFC 6066 §3).
        let server_ip = server_name.and_then(|name| {
            name.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok()
        });
        let sni = server_name.filter(|_| server_ip.is_none());
        let mut conn = {
            let mut qc = self.quiche_config.lock().unwrap_or_else(|p| p.into_inner());
            quiche::connect_with_buffer_factory(sni, &scid, shared.socket.local_addr(), peer, &mut qc)
                .map_err(|e| Error::config(format!("cannot start a QUIC connection to {addr}: {e}")))?
        };
        // Sessions are kept per name the server's identity was checked against: with no
        // name (verification off), none is kept.
        let sessions = server_name.map(|name| SessionSlot {
            cache: Arc::clone(&self.sessions),
            key: SessionCache::key(name, addr.port()),
            addr,
        });
        if let Some(slot) = &sessions
            && let Some(session) = slot.cache.take(&slot.key)
            && let Err(e) = conn.set_session(&session)
        {
            tracing::debug!(error = %e, "stored session not usable; a full handshake follows");
        }
        let (mut registration, inbound) = shared.register();
        registration.add(&scid);
        let (hand_over, app) = oneshot::channel();
        let ctx = context(shared, registration, inbound, Instant::now(), server_ip, sessions);
        let handle = driver::spawn(conn, ctx, driver::AppSlot::Waiting(app));
        Ok(Connecting { handle, hand_over })
    }
}

/// A client connection whose handshake is under way and whose application is not yet
/// handed over. Dropping it abandons the attempt: its task closes the connection.
pub(crate) struct Connecting<A> {
    handle: ConnectionHandle,
    hand_over: oneshot::Sender<A>,
}

impl<A> Connecting<A> {
    /// Waits until the handshake has completed or, with `early`, until the connection can
    /// send 0-RTT data (a resumed session), whichever comes first.
    pub(crate) async fn usable(self, early: bool) -> Result<Self, Error> {
        self.handle.usable(early).await?;
        Ok(self)
    }

    /// Hands the connection to `app`.
    pub(crate) fn start(self, app: A) -> ConnectionHandle {
        // Refused only if the task has ended already; the handle says how it ended.
        let _ = self.hand_over.send(app);
        self.handle
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing;
    use crate::testing::echo::{EchoClient, EchoServer};

    /// Eight connections share a client socket that refuses one send in three, as a full
    /// send buffer would (loopback never fills one): their packets are held and sent later,
    /// and several connections wait for room at once. Every echo must come back whole; a
    /// connection left without any wake-up would be closed for idleness first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_on_a_socket_whose_buffer_keeps_filling_all_finish() {
        const CONNECTIONS: usize = 8;
        const LEN: usize = 256 * 1024;
        let idle = |b: crate::quic::TransportConfig| b.idle_timeout(Duration::from_secs(2));
        let mut listener = Listener::bind("127.0.0.1:0", testing::server_config("echo", idle))
            .await
            .unwrap();
        let server = listener.local_addr();
        tokio::spawn(async move {
            while let Some(incoming) = listener.accept().await {
                incoming.start(EchoServer::new());
            }
        });
        let socket = Socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let endpoint = Endpoint::with_socket(socket, testing::client_config("echo", idle)).unwrap();
        let run = async {
            let mut conns = Vec::new();
            for _ in 0..CONNECTIONS {
                let (app, client) = EchoClient::new();
                let conn = endpoint.connect_addr(server, Some("localhost"), app).await.unwrap();
                conns.push((conn, client));
            }
            endpoint.shared.socket.refuse_sends(3);
            let echoes: Vec<_> = conns
                .iter()
                .enumerate()
                .map(|(i, (_, client))| {
                    let client = client.clone();
                    let sent: bytes::Bytes = (0..LEN).map(|j| (j * 131 + i * 7) as u8).collect();
                    tokio::spawn(async move { client.echo(sent.clone()).await.map(|back| back == sent) })
                })
                .collect();
            for (i, echo) in echoes.into_iter().enumerate() {
                assert_eq!(echo.await.unwrap().ok(), Some(true), "connection {i} echoed its data");
            }
        };
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("every connection finished");
    }

    /// A UDP relay between a client and a server that plays a NAT: it forwards the
    /// client's datagrams from an upstream socket of its own, and [`rebind`](Self::rebind)
    /// moves to a new one, so the server sees the client's address change mid-connection.
    struct Nat {
        front: Arc<tokio::net::UdpSocket>,
        upstream: Arc<Mutex<Arc<tokio::net::UdpSocket>>>,
        client: Arc<Mutex<Option<SocketAddr>>>,
    }

    impl Nat {
        async fn new(server: SocketAddr) -> Nat {
            let nat = Nat {
                front: Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap()),
                upstream: Arc::new(Mutex::new(Arc::new(
                    tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
                ))),
                client: Arc::default(),
            };
            let (front, upstream, client) = (
                Arc::clone(&nat.front),
                Arc::clone(&nat.upstream),
                Arc::clone(&nat.client),
            );
            tokio::spawn(async move {
                let mut buf = vec![0; 65_536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    let out = Arc::clone(&upstream.lock().unwrap());
                    let _ = out.send_to(&buf[..n], server).await;
                }
            });
            nat.relay_back(Arc::clone(&nat.upstream.lock().unwrap()));
            nat
        }

        /// Forwards what the server sends to `upstream` back to the client.
        fn relay_back(&self, upstream: Arc<tokio::net::UdpSocket>) {
            let (front, client) = (Arc::clone(&self.front), Arc::clone(&self.client));
            tokio::spawn(async move {
                let mut buf = vec![0; 65_536];
                while let Ok((n, _)) = upstream.recv_from(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            });
        }

        /// The client's datagrams leave from `upstream` from now on.
        fn rebind(&self, upstream: tokio::net::UdpSocket) {
            let upstream = Arc::new(upstream);
            self.relay_back(Arc::clone(&upstream));
            *self.upstream.lock().unwrap() = upstream;
        }
    }

    fn two_sockets_per_address() -> ServerConfig {
        testing::server_builder("echo").sockets_per_address(2).build().unwrap()
    }

    /// `SO_REUSEPORT` would let a second listener join the first one's port and take some of
    /// its clients; it is refused as a plain bind would be, with an error that says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_listener_on_a_port_in_use_is_refused() {
        let first = Listener::bind("127.0.0.1:0", two_sockets_per_address()).await.unwrap();
        let err = Listener::bind(first.local_addr(), two_sockets_per_address())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("another socket holds the port"), "{err}");
        // A port some other program holds without SO_REUSEPORT, likewise.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = Listener::bind(other.local_addr().unwrap(), two_sockets_per_address())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("another socket holds the port"), "{err}");
        // Unless both share the port, as for a hand-over restart (Linux's SO_REUSEPORT;
        // elsewhere `share_port` does nothing).
        if !cfg!(any(target_os = "linux", target_os = "android")) {
            return;
        }
        let sharing = || {
            testing::server_builder("echo")
                .sockets_per_address(2)
                .share_port(true)
                .build()
                .unwrap()
        };
        let old = Listener::bind("127.0.0.1:0", sharing()).await.unwrap();
        assert_eq!(old.local_addrs().len(), 1, "one port for the whole group");
        let new = Listener::bind(old.local_addr(), sharing()).await.unwrap();
        assert_eq!(new.local_addrs(), [old.local_addr()]);
    }

    /// `0.0.0.0:P` and `[::]:P` together: the IPv6 wildcard serves IPv6 only, where a
    /// dual-stack socket would clash with the IPv4 one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ipv4_and_an_ipv6_wildcard_bind_together_on_one_port() {
        for per_address in [1, 2] {
            // A port free on both families: a dual-stack socket held it.
            let port = std::net::UdpSocket::bind("[::]:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addrs = [
                SocketAddr::from(([0, 0, 0, 0], port)),
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
            ];
            let config = testing::server_builder("echo")
                .sockets_per_address(per_address)
                .build()
                .unwrap();
            let listener = Listener::bind_all(&addrs, config).await.unwrap();
            assert_eq!(listener.local_addrs(), addrs, "{per_address} per address");
        }
        // On different ports the IPv6 wildcard stays dual-stack: it holds its port for IPv4
        // too.
        let v6_port = std::net::UdpSocket::bind("[::]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addrs = [
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, v6_port)),
        ];
        let _listener = Listener::bind_all(&addrs, two_sockets_per_address()).await.unwrap();
        assert!(
            std::net::UdpSocket::bind(("0.0.0.0", v6_port)).is_err(),
            "the IPv6 wildcard serves IPv4 as well"
        );
    }

    /// A listener of two sockets on one address, serving echo connections; and its sockets.
    async fn two_socket_listener() -> (SocketAddr, Vec<Arc<Shared>>) {
        let idle = |b: crate::quic::TransportConfig| b.idle_timeout(Duration::from_secs(5));
        let config = testing::server_builder("echo")
            .transport(idle(crate::quic::TransportConfig::new()))
            .sockets_per_address(2)
            .build()
            .unwrap();
        let mut listener = Listener::bind("127.0.0.1:0", config).await.unwrap();
        let sockets = listener._close.0.clone();
        assert_eq!(sockets.len(), 2, "two sockets bound");
        assert_eq!(listener.local_addrs(), [listener.local_addr()], "on one address");
        let server = listener.local_addr();
        tokio::spawn(async move {
            while let Some(incoming) = listener.accept().await {
                incoming.start(EchoServer::new());
            }
        });
        (server, sockets)
    }

    fn received(sockets: &[Arc<Shared>]) -> Vec<usize> {
        sockets.iter().map(|s| s.socket.received()).collect()
    }

    /// Whether the kernel gives `candidate`'s datagrams to socket `other`: three stray
    /// datagrams in a row land there (one could be an earlier candidate's, late).
    async fn lands_on(
        sockets: &[Arc<Shared>],
        other: usize,
        candidate: &tokio::net::UdpSocket,
        server: SocketAddr,
    ) -> bool {
        for _ in 0..3 {
            let before = received(sockets)[other];
            candidate.send_to(b"stray", server).await.unwrap();
            let landed = tokio::time::timeout(Duration::from_millis(500), async {
                while received(sockets)[other] == before {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            if landed.await.is_err() {
                return false;
            }
        }
        true
    }

    /// The kernel picks one of the sockets of an address by a hash of the client's address;
    /// a NAT rebinding changes it, so a connection's packets may move to the other socket
    /// mid-connection: that socket's router must find the connection (one route table for
    /// the address) and the connection goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebound_client_whose_packets_reach_another_socket_is_still_served() {
        let (server, sockets) = two_socket_listener().await;
        let nat = Nat::new(server).await;
        let endpoint =
            Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), testing::client_config("echo", |b| b)).unwrap();
        let (app, client) = EchoClient::new();
        let run = async {
            let conn = endpoint
                .connect_addr(nat.front.local_addr().unwrap(), Some("localhost"), app)
                .await
                .unwrap();
            let data = bytes::Bytes::from_static(b"before the rebinding");
            assert_eq!(client.echo(data.clone()).await.unwrap(), data);
            // The socket that got the handshake, and a new port whose datagrams the kernel
            // gives to the other one: found by sending it a stray datagram (dropped by the
            // router, but counted by its socket).
            let first = received(&sockets);
            let other = usize::from(first[1] <= first[0]);
            let mut moved = None;
            for _ in 0..64 {
                let candidate = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                if lands_on(&sockets, other, &candidate, server).await {
                    moved = Some(candidate);
                    break;
                }
            }
            let upstream = moved.expect("a port the kernel routes to the other socket");
            nat.rebind(upstream);
            let before = received(&sockets);
            let data = bytes::Bytes::from_static(b"after the rebinding");
            assert_eq!(client.echo(data.clone()).await.unwrap(), data);
            assert!(
                received(&sockets)[other] > before[other],
                "the connection's packets now reach the other socket"
            );
            // And it goes on from there.
            let data = bytes::Bytes::from(vec![7u8; 100_000]);
            assert_eq!(client.echo(data.clone()).await.unwrap(), data);
            assert!(!conn.is_closed());
        };
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the rebound connection was served");
    }

    /// Clients on different ports spread over the sockets of an address, and each socket
    /// serves its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_spread_over_the_sockets_of_an_address_are_all_served() {
        let (server, sockets) = two_socket_listener().await;
        let run = async {
            let mut conns = Vec::new();
            for i in 0..64 {
                // A client socket each: a new source port, a new hash.
                let endpoint =
                    Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), testing::client_config("echo", |b| b))
                        .unwrap();
                let (app, client) = EchoClient::new();
                let conn = endpoint.connect_addr(server, Some("localhost"), app).await.unwrap();
                let data = bytes::Bytes::from(format!("connection {i}"));
                assert_eq!(client.echo(data.clone()).await.unwrap(), data);
                conns.push((endpoint, conn, client));
                if i >= 7 && received(&sockets).iter().all(|&n| n > 0) {
                    break;
                }
            }
            assert!(
                received(&sockets).iter().all(|&n| n > 0),
                "both sockets received: {:?}",
                received(&sockets)
            );
            // Every connection is still served, whichever socket it is on.
            for (i, (_, _, client)) in conns.iter().enumerate() {
                let data = bytes::Bytes::from(format!("again {i}"));
                assert_eq!(client.echo(data.clone()).await.unwrap(), data);
            }
        };
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("every connection was served");
    }
}
