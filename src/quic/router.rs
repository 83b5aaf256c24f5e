//! The router task: the only reader of one UDP socket, and the per-socket state ([`Shared`])
//! it shares with the endpoint's handles.
//!
//! It reads datagrams in batches, finds each one's connection by destination connection ID
//! and forwards it over that connection's bounded queue (dropping it when the queue is full,
//! as a congested network would). For IDs it does not know, a server router answers with
//! version negotiation, Retry or a stateless reset, or creates the connection for a valid
//! Initial and offers it to the listener's backlog.
//!
//! Everything here answers packets anyone can send from any address, so every answer is
//! bounded: stateless resets and version negotiation by the listener's reply budget, new
//! connections by its connection and handshake caps ([`super::limits`]), and Retry tokens
//! are single-connection ([`super::token`]).

use super::bufs::QuicheConnection;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio::sync::mpsc::OwnedPermit;
use tokio::sync::mpsc::error::TrySendError;

use super::cid::{self, ResetKey};
use super::config::{Config, RetryPolicy};
use super::limits::{Limits, Refusal};
use super::metrics::{DropReason, Metrics};
use super::routes::{Datagram, InboundQueue, Registration, RouteMap, RouteTable, reset_token_key};
use super::token::TokenKey;
use super::udp::{self, Socket};

/// Received datagrams are copied into this arena, and each queued datagram is a slice of it:
/// one allocation serves about 48 full-size datagrams, and is reused as soon as the
/// connections have consumed them all.
pub(crate) const ARENA_BYTES: usize = 64 * 1024;

/// The next arena's number, for every router of the process: the routers of one address
/// feed the same queues, which must tell their arenas apart.
static NEXT_ARENA: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_arena() -> u64 {
    NEXT_ARENA.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The router's receive arena ([`ARENA_BYTES`] at a time), numbered so that a connection's
/// queue can tell how many arenas its datagrams keep allocated (see [`super::routes`]).
struct Arena {
    bytes: BytesMut,
    /// Changes with each allocation (or reclaimed one), unique in the process; never 0,
    /// which marks a datagram with an allocation of its own.
    id: u64,
}

impl Arena {
    fn new() -> Self {
        Arena {
            bytes: BytesMut::with_capacity(ARENA_BYTES),
            id: next_arena(),
        }
    }

    /// A copy of `datagram` from `from`, cut from the arena.
    fn cut(&mut self, datagram: &[u8], from: SocketAddr) -> Datagram {
        if self.bytes.capacity() < datagram.len() {
            // Reclaims the arena's memory if every datagram cut from it is gone.
            self.bytes.reserve(ARENA_BYTES.max(datagram.len()));
            self.id = next_arena();
        }
        self.bytes.extend_from_slice(datagram);
        Datagram {
            data: self.bytes.split(),
            from,
            arena: self.id,
        }
    }
}

/// QUIC clients pad Initials to 1200 bytes (RFC 9000 §14.1); smaller ones are not answered,
/// which also keeps us from amplifying spoofed traffic.
const MIN_INITIAL_LEN: usize = 1200;

/// A client's first Initial must carry an unpredictable DCID of at least 8 bytes
/// (RFC 9000 §7.2); shorter ones come from broken or hostile clients.
const MIN_CLIENT_DCID_LEN: usize = 8;

/// A stateless reset must be shorter than the packet that caused it (so two endpoints cannot
/// loop) and at least 21 bytes long to look like a short-header packet (RFC 9000 §10.3).
const MIN_RESET_LEN: usize = 21;
const MAX_RESET_LEN: usize = 43;

/// One socket and what its router, its connections and the endpoint's handles share.
///
/// Sockets bound to one address (a listener's `SO_REUSEPORT` group) share one route table
/// and one reset key: the kernel picks a socket by a hash of the client's address, which a
/// NAT rebinding changes, so any of them may receive a connection's next packet, and must
/// find the connection, or answer for it with the token the connection advertised.
pub(crate) struct Shared {
    pub(crate) socket: Arc<Socket>,
    pub(crate) config: Config,
    pub(crate) routes: Arc<RouteTable>,
    pub(crate) reset_key: Arc<ResetKey>,
}

impl Shared {
    /// A socket with a route table of its own, and the configured reset key (or one of its
    /// own).
    pub(crate) fn new(socket: Socket, config: Config) -> Arc<Self> {
        let reset_key = Self::reset_key_of(&config);
        Self::in_group(socket, config, Arc::default(), reset_key)
    }

    /// The configured reset key, or a random one for a group of sockets of its own.
    pub(crate) fn reset_key_of(config: &Config) -> Arc<ResetKey> {
        let configured = config.inner.server.reset_key.clone();
        configured.unwrap_or_else(|| Arc::new(ResetKey::random()))
    }

    /// A socket that shares `routes` and `reset_key` with the other sockets of its address.
    pub(crate) fn in_group(
        socket: Socket,
        config: Config,
        routes: Arc<RouteTable>,
        reset_key: Arc<ResetKey>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            socket: Arc::new(socket),
            config,
            routes,
            reset_key,
        })
    }

    /// A new connection's registration on this socket, with the queue its datagrams will be
    /// routed to.
    pub(crate) fn register(&self) -> (Registration, InboundQueue) {
        Registration::with_queue(&self.routes, &self.config.inner.s)
    }
}

/// A connection the router accepted, on its way to the listener's backlog. Dropped there,
/// its registration withdraws its routes and frees its slot.
pub(crate) struct Accepted {
    pub(crate) conn: QuicheConnection,
    pub(crate) shared: Arc<Shared>,
    pub(crate) inbound: InboundQueue,
    pub(crate) registration: Registration,
    pub(crate) started: Instant,
}

/// What a server router needs to accept connections; the routers of every socket of a
/// listener share it.
#[derive(Clone)]
pub(crate) struct Accept {
    /// One quiche configuration (one TLS context) for the whole listener, so a session
    /// ticket issued through one socket resumes through any other. Locked for
    /// `quiche::accept` only, once per new connection.
    config: Arc<Mutex<quiche::Config>>,
    /// One Retry key: a client's second Initial may reach another socket than its first.
    token_key: Arc<TokenKey>,
    backlog: mpsc::Sender<Accepted>,
    limits: Arc<Limits>,
    /// With a configured reset key, the route tables of every address the listener is
    /// bound to: a packet for a connection of one address that reaches another is not
    /// answered with a reset, which would give out the live connection's token (RFC 9000
    /// §10.3.2). Empty otherwise: each address has a random key of its own, whose resets
    /// give out nothing of another's.
    tables: Arc<[Arc<RouteTable>]>,
}

impl Accept {
    pub(crate) fn new(
        config: quiche::Config,
        backlog: mpsc::Sender<Accepted>,
        limits: Arc<Limits>,
        tables: Arc<[Arc<RouteTable>]>,
    ) -> Self {
        Accept {
            config: Arc::new(Mutex::new(config)),
            token_key: Arc::new(TokenKey::random()),
            backlog,
            limits,
            tables,
        }
    }

    /// Whether a connection of another of the listener's addresses has the ID `dcid`.
    fn elsewhere_has(&self, routes: &Arc<RouteTable>, dcid: &[u8]) -> bool {
        self.tables.len() > 1
            && self
                .tables
                .iter()
                .any(|table| !Arc::ptr_eq(table, routes) && table.lock().contains_key(dcid))
    }

    /// Spends one stateless reply (reset or version negotiation) from the listener's budget;
    /// counts the drop when there is none left.
    fn may_reply(&self, shared: &Shared) -> bool {
        let allowed = self.limits.allow_reply();
        if !allowed {
            shared.config.inner.metrics.datagram_dropped(DropReason::RateLimited);
        }
        allowed
    }
}

pub(crate) fn spawn(shared: Arc<Shared>, accept: Option<Accept>) {
    tokio::spawn(run(shared, accept));
}

async fn run(shared: Arc<Shared>, mut accept: Option<Accept>) {
    let max_datagram = shared.config.inner.s.max_recv_udp_payload;
    let mut bufs = shared.socket.recv_buffers(max_datagram);
    let mut arena = Arena::new();
    let mut out = vec![0u8; 1500];
    let span = tracing::debug_span!("quic_router", local = %shared.socket.local_addr());
    let _enter = span.enter();
    // New connections and their places in the listener's backlog, offered at the end of
    // the batch (outside the route lock: a refused one unregisters itself on drop).
    let mut accepted: Vec<(OwnedPermit<Accepted>, Accepted)> = Vec::new();
    loop {
        // Listening before looking, so a close in between is not missed (the other routers
        // of the address share the signal).
        let closed_or_emptied = shared.routes.closed_or_emptied();
        tokio::pin!(closed_or_emptied);
        closed_or_emptied.as_mut().enable();
        if shared.routes.is_closing() {
            // Every handle is gone: accept nothing new, and linger only while connections
            // still use the socket.
            accept = None;
            if shared.routes.len() == 0 {
                tracing::debug!("endpoint closed; router stops");
                return;
            }
        }
        let filled = tokio::select! {
            biased;
            () = closed_or_emptied => continue,
            r = std::future::poll_fn(|cx| shared.socket.poll_recv(cx, &mut bufs)) => r,
        };
        let filled = match filled {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors (port unreachable from a vanished peer) surface here; they
                // concern one peer, not the socket.
                tracing::debug!(error = %e, "UDP receive error");
                continue;
            }
        };
        {
            let mut routes = BatchRoutes {
                table: &shared.routes,
                held: None,
            };
            bufs.for_each(filled, |datagram, from, dst| {
                dispatch(
                    &shared,
                    &mut routes,
                    accept.as_mut(),
                    &mut arena,
                    &mut out,
                    datagram,
                    from,
                    dst,
                    &mut accepted,
                )
            });
        }
        for (backlog_place, incoming) in accepted.drain(..) {
            backlog_place.send(incoming);
        }
    }
}

/// UDP source ports of services seen in reflection attacks, or that answer any datagram
/// (and so would answer a stateless reset, and we their answer, for ever), which no QUIC
/// client uses: Google's QUIC server drops datagrams from these (RFC 9308 §8.1), as a
/// server router here drops those for no connection it knows. Sorted (checked when built).
const REFLECTING_PORTS: [u16; 15] = [
    17,    // Quote of the Day
    19,    // chargen
    53,    // DNS
    111,   // portmap
    123,   // NTP
    137,   // NetBIOS name service
    138,   // NetBIOS datagram service
    161,   // SNMP
    389,   // CLDAP
    500,   // IKE
    1900,  // SSDP
    3702,  // WS-Discovery
    5353,  // mDNS
    5355,  // LLMNR
    11211, // memcached
];

const _: () = {
    let mut i = 1;
    while i < REFLECTING_PORTS.len() {
        assert!(
            REFLECTING_PORTS[i - 1] < REFLECTING_PORTS[i],
            "REFLECTING_PORTS must be sorted"
        );
        i += 1;
    }
};

/// The route map of the socket's address as the router holds it through a batch: locked
/// while it forwards datagrams to known connections or only drops datagrams (once per run
/// of those), and let go before anything slow (a Retry's or a reset's crypto and
/// `sendmsg`, `quiche::accept`), so that the other routers of the address, and
/// connections adding or withdrawing IDs, are not held up behind a flood of Initials or
/// unknown packets.
struct BatchRoutes<'a> {
    table: &'a RouteTable,
    held: Option<std::sync::MutexGuard<'a, RouteMap>>,
}

impl BatchRoutes<'_> {
    fn map(&mut self) -> &mut RouteMap {
        self.held.get_or_insert_with(|| self.table.lock())
    }

    fn let_go(&mut self) {
        self.held = None;
    }
}

/// Whether a datagram from `from` may be handled at all: not from port 0, to which Linux
/// refuses to send with EINVAL (which quinn-udp takes for a socket without GSO, and turns
/// GSO off on the socket for good, for every connection on it), nor from an address that
/// is no single peer's (unspecified, a group, the broadcast address). Checked before a
/// datagram reaches even a known connection, whose quiche would answer a new address.
fn answerable(from: SocketAddr) -> bool {
    from.port() != 0 && udp::is_unicast(from.ip())
}

/// Whether `port` is one of [`REFLECTING_PORTS`].
fn reflecting(port: u16) -> bool {
    REFLECTING_PORTS.binary_search(&port).is_ok()
}

#[allow(clippy::too_many_arguments)]
fn dispatch(
    shared: &Arc<Shared>,
    routes: &mut BatchRoutes<'_>,
    accept: Option<&mut Accept>,
    arena: &mut Arena,
    out: &mut [u8],
    datagram: &mut [u8],
    from: SocketAddr,
    dst: Option<IpAddr>,
    accepted: &mut Vec<(OwnedPermit<Accepted>, Accepted)>,
) {
    let metrics = &*shared.config.inner.metrics;
    if !answerable(from) {
        metrics.datagram_dropped(DropReason::BlockedSource);
        return;
    }
    if dst.is_some_and(|ip| !udp::is_unicast(ip)) {
        // Sent to a group or to the whole link (a wildcard socket receives those): no QUIC
        // peer addresses a server so, and no reply may leave from such an address.
        metrics.datagram_dropped(DropReason::UnknownConnection);
        return;
    }
    let id_len = shared.config.inner.cid_generator.id_len();
    // Most datagrams are short-header packets of known connections: their ID is read in
    // place, where quiche's parser would copy it into an allocation of its own (it reads
    // nothing else of a short header: one that misses is not parsed again either).
    if let Some(dcid) = short_header_dcid(datagram, id_len) {
        if forward(metrics, routes.map(), arena, datagram, from, dcid) {
            return;
        }
        // A client's: a stateless reset (RFC 9000 §10.3) looks like a short-header packet
        // with a random ID; its last 16 bytes are the token of a connection whose server
        // has lost it (only clients register tokens, see the driver). It goes to that
        // connection, whose quiche checks the token again and closes.
        if accept.is_none()
            && datagram.len() >= MIN_RESET_LEN
            && let Some(token) = datagram.last_chunk::<16>()
            && forward(metrics, routes.map(), arena, datagram, from, &reset_token_key(token))
        {
            return;
        }
        let Some(accept) = answering(metrics, accept, from) else {
            return;
        };
        let source = shared.socket.source_for(shared.socket.local_for(dst));
        send_stateless_reset(shared, routes, accept, out, datagram.len(), dcid, from, source);
        return;
    }
    let hdr = match quiche::Header::from_slice(datagram, id_len) {
        Ok(hdr) => hdr,
        Err(_) => {
            metrics.datagram_dropped(DropReason::ParseError);
            return;
        }
    };
    // (A connection ID is 20 bytes at most: a longer one, which quiche parses from an
    // unsupported version's header, could only match a reset token's key.)
    if hdr.dcid.len() <= quiche::MAX_CONN_ID_LEN && forward(metrics, routes.map(), arena, datagram, from, &hdr.dcid) {
        return;
    }
    // Not for a connection we know: whatever answers it leaves from the address it came
    // to. What is only dropped is dropped with the routes still held; they are let go
    // before anything slow (crypto, a send, a new connection).
    let Some(accept) = answering(metrics, accept, from) else {
        return;
    };
    let local = shared.socket.local_for(dst);
    let source = shared.socket.source_for(local);
    if hdr.ty == quiche::Type::VersionNegotiation {
        // Never answered (RFC 9000 §6.1): two endpoints would negotiate forever. Nor can it
        // concern us: only a server's reply to a client is a version negotiation packet.
        metrics.datagram_dropped(DropReason::UnknownConnection);
        return;
    }
    if !quiche::version_is_supported(hdr.version) {
        // Only a datagram the size of a client's first Initial is answered (RFC 9000 §6.1,
        // §14.1), so the reply is always smaller than what caused it.
        if datagram.len() < MIN_INITIAL_LEN {
            metrics.datagram_dropped(DropReason::ParseError);
        } else if accept.may_reply(shared)
            && let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, out)
        {
            routes.let_go();
            // Counted before it leaves, so whoever receives it sees it counted.
            metrics.version_negotiation_sent();
            let _ = shared.socket.try_send(from, source, &out[..n], None);
        }
        return;
    }
    if hdr.ty != quiche::Type::Initial || datagram.len() < MIN_INITIAL_LEN {
        metrics.datagram_dropped(DropReason::UnknownConnection);
        return;
    }
    if let Some(incoming) = accept_initial(shared, routes, accept, arena, out, datagram, from, local, &hdr) {
        accepted.push(incoming);
    }
}

/// What may answer a datagram for no connection we know: the listener's acceptor, unless
/// this is a client's socket (nothing answers there) or the sender's port is one that
/// reflects (`reflecting`); either way the datagram is counted as dropped.
fn answering<'a>(metrics: &dyn Metrics, accept: Option<&'a mut Accept>, from: SocketAddr) -> Option<&'a mut Accept> {
    let Some(accept) = accept else {
        metrics.datagram_dropped(DropReason::UnknownConnection);
        return None;
    };
    if reflecting(from.port()) {
        metrics.datagram_dropped(DropReason::BlockedSource);
        return None;
    }
    Some(accept)
}

/// The destination connection ID of a short-header packet (RFC 9000 §17.3): the
/// `id_len` bytes after the first, as quiche's parser reads them. `None` for a long header
/// or a datagram too short to hold one.
fn short_header_dcid(datagram: &[u8], id_len: usize) -> Option<&[u8]> {
    let first = *datagram.first()?;
    if first & 0x80 != 0 {
        return None;
    }
    datagram.get(1..1 + id_len)
}

/// Queues a datagram, copied into the arena, for the connection `dcid` routes to, if any:
/// whether there was one.
fn forward(
    metrics: &dyn Metrics,
    routes: &mut RouteMap,
    arena: &mut Arena,
    datagram: &[u8],
    from: SocketAddr,
    dcid: &[u8],
) -> bool {
    let Some(route) = routes.get(dcid) else {
        return false;
    };
    match route.try_send(arena.cut(datagram, from)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => metrics.datagram_dropped(DropReason::QueueFull),
        Err(TrySendError::Closed(_)) => {
            // The connection is gone; its registration removes the rest of its IDs.
            routes.remove(dcid);
            metrics.datagram_dropped(DropReason::UnknownConnection);
        }
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn accept_initial(
    shared: &Arc<Shared>,
    routes: &mut BatchRoutes<'_>,
    accept: &mut Accept,
    arena: &mut Arena,
    out: &mut [u8],
    datagram: &[u8],
    from: SocketAddr,
    local: SocketAddr,
    hdr: &quiche::Header<'_>,
) -> Option<(OwnedPermit<Accepted>, Accepted)> {
    let inner = &*shared.config.inner;
    let metrics = &*inner.metrics;
    let token = hdr.token.as_deref().unwrap_or_default();
    let policy = inner.server.retry;
    // A token of ours answers a Retry of ours, sent under any policy but `Never` (the load
    // may have fallen since). Any other token (quiche sends no NEW_TOKEN tokens, but another
    // server under the same name may have) is taken as none at all (RFC 9000 §8.1.3): such
    // a client has had no Retry yet, and can take one. (One that answers a Retry of this
    // server's previous process ignores ours, and times out as it would have anyway.)
    let answers_our_retry = policy != RetryPolicy::Never && accept.token_key.is_ours(token);
    if !answers_our_retry && hdr.dcid.len() < MIN_CLIENT_DCID_LEN {
        // A first Initial (after a Retry the DCID is ours, and may be shorter).
        metrics.datagram_dropped(DropReason::ShortConnectionId);
        return None;
    }
    // An address with its share of unproven handshakes may be a victim whose address
    // spoofed Initials claimed: a Retry proves the client's, and proven handshakes have a
    // share of their own.
    let mut prove_address = false;
    match accept.limits.check(from.ip(), answers_our_retry) {
        Ok(()) => {}
        // (`admit` below may still find the address over its share, should another router
        // load the listener meanwhile: that Initial is dropped, and the client's next,
        // after its probe timeout, gets the Retry.)
        Err(Refusal::Retry) if policy != RetryPolicy::Never => prove_address = true,
        Err(refusal) => {
            // Full: not even a Retry, which would only bring the client back to be refused.
            metrics.datagram_dropped(refusal.dropped_as());
            return None;
        }
    }
    if accept.backlog.capacity() == 0 {
        // Likewise while the application takes no connection: the place is reserved below,
        // once the connection is made; this spares a Retry's crypto and send meanwhile.
        metrics.datagram_dropped(DropReason::BacklogFull);
        return None;
    }
    let retry_now = prove_address
        || match policy {
            RetryPolicy::Always => true,
            RetryPolicy::UnderLoad => accept.limits.under_load(),
            RetryPolicy::Never => false,
        };
    routes.let_go();
    let (scid, odcid) = if !answers_our_retry && retry_now {
        if let Err(Refusal::Drop(reason)) = accept.limits.check(from.ip(), true) {
            // Refused even once proven: a Retry would only bring the client back to be.
            metrics.datagram_dropped(reason);
            return None;
        }
        let new_scid = cid::new_id(&*inner.cid_generator);
        // Bound to new_scid, the DCID the client must use next (RFC 9000 §17.2.5.2).
        let token = accept.token_key.mint(&from, &hdr.dcid, &new_scid);
        if let Ok(n) = quiche::retry(&hdr.scid, &hdr.dcid, &new_scid, &token, hdr.version, out) {
            let _ = shared
                .socket
                .try_send(from, shared.socket.source_for(local), &out[..n], None);
            metrics.retry_sent();
        }
        return None;
    } else if answers_our_retry {
        match accept.token_key.validate(&from, &hdr.dcid, token) {
            // The client now addresses us by the ID our Retry chose (the token says so), and
            // that ID becomes ours; the original DCID, from the token, goes into the
            // original_destination_connection_id transport parameter and the Retry's ID into
            // retry_source_connection_id (RFC 9000 §7.3), which quiche::accept derives from
            // `odcid` and `scid`.
            Some(odcid) if hdr.dcid.len() == inner.cid_generator.id_len() => (
                quiche::ConnectionId::from_vec(hdr.dcid.to_vec()),
                Some(quiche::ConnectionId::from_vec(odcid)),
            ),
            // A token of ours that does not validate (expired, a NAT rebinding since the
            // Retry, a replay): while a Retry would not be asked for anyway, the client is
            // taken as if it had sent none (RFC 9000 §8.1.3), not left to resend it until
            // it times out. Otherwise it is dropped: the client has had its one Retry.
            _ if policy == RetryPolicy::UnderLoad && !retry_now && hdr.dcid.len() >= MIN_CLIENT_DCID_LEN => {
                (cid::new_id(&*inner.cid_generator), None)
            }
            _ => {
                metrics.datagram_dropped(DropReason::InvalidToken);
                return None;
            }
        }
    } else {
        (cid::new_id(&*inner.cid_generator), None)
    };
    // A place in the backlog, taken now (the connections a batch makes are offered at its
    // end, and every router of the listener offers to the one backlog): with none, the
    // application is not accepting fast enough; keep no state, the client retries.
    let Ok(backlog_place) = accept.backlog.clone().try_reserve_owned() else {
        metrics.datagram_dropped(DropReason::BacklogFull);
        return None;
    };
    let slot = match accept.limits.admit(from.ip(), odcid.is_some()) {
        Ok(slot) => slot,
        // A Retry `check` above would have sent already, but for a client whose token of
        // ours failed and is taken as none (it has had its one Retry, RFC 9000 §17.2.5.2
        // lets it take no other), or when another router loaded the listener meanwhile.
        Err(refusal) => {
            metrics.datagram_dropped(refusal.dropped_as());
            return None;
        }
    };
    // The connection's local address is the one the client sent to: its packets leave
    // from there (`driver`), whichever address of a wildcard socket that is.
    let accepted = {
        // Held for one accept; a panic inside it leaves nothing half-changed here.
        let mut config = accept.config.lock().unwrap_or_else(|p| p.into_inner());
        config.set_stateless_reset_token(Some(shared.reset_key.token(&scid)));
        quiche::accept_with_buf_factory(&scid, odcid.as_ref(), local, from, &mut config)
    };
    let conn = match accepted {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(error = %e, %from, "quiche refused a new connection");
            metrics.datagram_dropped(DropReason::ParseError);
            return None;
        }
    };
    let (mut registration, inbound) = shared.register();
    // Nobody reads its queue until the application accepts it.
    let inbound = inbound.until_started();
    {
        let map = routes.map();
        // The map was let go meanwhile: another router of the address may have made the
        // connection this Initial asks for (the client's address changed between two of
        // its Initials). The Initial goes to that one; this one, its slot and its place in
        // the backlog are dropped (after the map is let go).
        if forward(metrics, map, arena, datagram, from, &hdr.dcid) {
            routes.let_go();
            return None;
        }
        // The Registration records the IDs and removes them when the connection ends.
        for id in [Some(&*scid), odcid.is_none().then_some(&*hdr.dcid)]
            .into_iter()
            .flatten()
        {
            registration.add_locked(map, id);
        }
    }
    routes.let_go();
    registration.hold(slot);
    metrics.handshake_started();
    let _ = registration.route().try_send(arena.cut(datagram, from));
    tracing::debug!(%from, trace_id = conn.trace_id(), "new connection");
    let accepted = Accepted {
        conn,
        shared: Arc::clone(shared),
        inbound,
        registration,
        started: Instant::now(),
    };
    Some((backlog_place, accepted))
}

#[allow(clippy::too_many_arguments)]
fn send_stateless_reset(
    shared: &Shared,
    routes: &mut BatchRoutes<'_>,
    accept: &Accept,
    out: &mut [u8],
    received: usize,
    dcid: &[u8],
    to: SocketAddr,
    source: Option<IpAddr>,
) {
    let unanswered = || {
        shared
            .config
            .inner
            .metrics
            .datagram_dropped(DropReason::UnknownConnection);
    };
    if received <= MIN_RESET_LEN || dcid.is_empty() {
        return unanswered();
    }
    // The budget first: it bounds the work below too, whatever a flood of unknown IDs.
    if !accept.may_reply(shared) {
        return;
    }
    // The other tables are locked one at a time, this one let go first: two routers never
    // wait for each other's table.
    routes.let_go();
    if accept.elsewhere_has(&shared.routes, dcid) {
        // Sent to the wrong address of the listener (not by a client: it addresses one).
        return unanswered();
    }
    // Smaller than what caused it, so resets cannot loop between two endpoints.
    let len = (received - 1).min(MAX_RESET_LEN);
    let reset = &mut out[..len];
    cid::fill_random(reset);
    // A short header: fixed bit set, long-header bit clear.
    reset[0] = 0x40 | (reset[0] & 0x3f);
    reset[len - 16..].copy_from_slice(&shared.reset_key.token(dcid).to_be_bytes());
    // Counted before it leaves, so whoever receives it sees it counted.
    shared.config.inner.metrics.stateless_reset_sent();
    let _ = shared.socket.try_send(to, source, reset, None);
}

#[cfg(test)]
mod tests {
    use super::{ARENA_BYTES, Arena, REFLECTING_PORTS, answerable, reflecting, short_header_dcid};

    /// Arenas are numbered across every router (those of one address feed the same
    /// queues), and a new allocation takes a new number.
    #[test]
    fn arenas_are_numbered_across_routers() {
        let from = "127.0.0.1:4433".parse().unwrap();
        let (mut one, mut other) = (Arena::new(), Arena::new());
        let (a, b) = (one.cut(&[1; 100], from).arena, other.cut(&[1; 100], from).arena);
        assert!(a != 0 && b != 0 && a != b);
        assert_eq!(one.cut(&[1; 100], from).arena, a, "the same arena");
        let next = one.cut(&vec![1; ARENA_BYTES], from).arena;
        assert!(next != a && next != b, "a new allocation");
    }

    /// Senders no reply can reach are not handled; any other unicast sender is. A server
    /// also ignores, for connections it does not know, the ports of reflecting services.
    #[test]
    fn senders_that_cannot_be_quic_peers_are_not_handled() {
        for from in [
            "127.0.0.1:0",
            "[::1]:0",
            "0.0.0.0:4433",
            "[::]:4433",
            "224.0.0.1:4433",
            "255.255.255.255:4433",
            "[ff02::1]:4433",
            "[::ffff:224.0.0.1]:4433",
            "[::ffff:0.0.0.0]:4433",
            "[::ffff:255.255.255.255]:4433",
        ] {
            assert!(!answerable(from.parse().unwrap()), "{from}");
        }
        for from in [
            "127.0.0.1:4433",
            "[::1]:50000",
            "[::ffff:10.0.0.1]:1024",
            "10.0.0.1:65535",
            "[fe80::1%2]:4433",
            "192.0.2.1:53",
        ] {
            assert!(answerable(from.parse().unwrap()), "{from}");
        }
        for port in REFLECTING_PORTS {
            assert!(reflecting(port), "{port}");
        }
        for port in [0, 443, 1024, 4433, 11210, 11212, 65535] {
            assert!(!reflecting(port), "{port}");
        }
    }

    /// A short header's ID is read in place, as quiche's parser reads it; long headers and
    /// datagrams too short for an ID are left to that parser.
    #[test]
    fn a_short_headers_id_is_read_in_place() {
        let packet = [0x41, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(short_header_dcid(&packet, 8), Some(&packet[1..9]));
        let parsed = quiche::Header::from_slice(&mut packet.clone(), 8).unwrap();
        assert_eq!(&*parsed.dcid, &packet[1..9]);
        assert_eq!(short_header_dcid(&packet[..9], 8), Some(&packet[1..9]));
        assert_eq!(short_header_dcid(&packet[..8], 8), None, "one byte short");
        assert_eq!(short_header_dcid(&[], 8), None);
        let mut long = packet;
        long[0] = 0xc3;
        assert_eq!(short_header_dcid(&long, 8), None, "a long header");
    }
}
