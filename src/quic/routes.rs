//! The route table of one socket (or of the sockets bound to one address): which connection each connection ID belongs to, the
//! [`Registration`] through which a connection holds its entries (its lease), and the
//! inbound queue that carries a connection's datagrams from the router to its task.
//!
//! Connections register every source ID they issue and remove it when they retire it or
//! close; dropping a [`Registration`] removes whatever is left, so a connection that ends in
//! any way leaves no route behind. A server connection's registration also holds its slot in
//! the listener's connection and handshake caps ([`super::limits`]).
//!
//! Each queue is bounded in datagrams and in bytes. A datagram count alone does not bound
//! memory when datagrams may be up to 64 KiB (`max_recv_udp_payload`): 256 of them are
//! 16 MiB per connection. The byte bound makes a queue's memory a setting
//! (`inbound_queue_bytes`) whatever the peer sends. A datagram that does not fit is refused,
//! and the router drops it as a congested network would.
//!
//! What a queued datagram keeps allocated is more than its length: it is a slice of the
//! router's 64 KiB receive arena, which stays allocated while any datagram cut from it is
//! queued. A connection whose task stands still while other traffic flows past could so
//! keep up to `inbound_queue` arenas (16 MiB at the defaults) for a few bytes each: small datagrams, sent a little apart, each land in
//! an arena of their own. A queue therefore counts the arenas its datagrams keep; past
//! [`MAX_QUEUE_ARENAS`], and while they hold less than a quarter of an arena each on
//! average, a datagram from yet another arena is copied into an allocation of its own
//! size. So a queue keeps at most 8 arenas or 4 times its bytes (2 MiB at the defaults),
//! and a dense flow (full-size datagrams, a GRO batch) is never copied; the copy (an
//! allocation per datagram) is paid by sparse datagrams to a queue that lags. Charging
//! each datagram its arena instead would refuse honest bursts spread over many
//! connections.
//!
//! A connection waiting in a listener's backlog has no task reading its queue, and a
//! backlog holds up to `accept_backlog` of them: until its task starts, its queue holds a
//! client's first flight ([`UNSTARTED_DATAGRAMS`], [`UNSTARTED_BYTES`]), each datagram in
//! an allocation of its own.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::sync::Notify;
use tokio::sync::mpsc::error::TrySendError;

use super::config::Settings;
use super::limits::Slot;

/// A received datagram on its way to its connection.
pub(crate) struct Datagram {
    pub(crate) data: BytesMut,
    pub(crate) from: SocketAddr,
    /// The router's arena `data` is cut from (its number), or 0 for an allocation of its
    /// own.
    pub(crate) arena: u64,
}

/// How many of the router's arenas one connection's queue may keep whatever its datagrams'
/// sizes; beyond, only while they fill a quarter of an arena each on average. See the
/// module's docs.
const MAX_QUEUE_ARENAS: usize = 8;

/// How many datagrams the queue of a connection not started yet (waiting in a listener's
/// backlog for the application to accept it) holds. Nobody reads it meanwhile, and a
/// backlog holds up to `accept_backlog` such queues (1,024 by default): at the full bounds
/// a peer could make that 512 MiB (and pin an arena per datagram). A client has sent its
/// first flight before it hears the server: an Initial or a few (a large ClientHello),
/// 0-RTT packets within its first congestion window (10 packets by RFC 9002, 32 in some
/// browsers), and a probe a second. Even an application that accepts at once does not
/// start a connection before the router's receive batch that made it has been handled,
/// which may hold the whole flight. What does not fit is dropped as a congested network
/// would, and sent again.
const UNSTARTED_DATAGRAMS: usize = 48;
/// The bytes a not yet started connection's queue holds at least: 48 datagrams of a first
/// flight at about 1,350 bytes (a client sends 1,200 to 1,500-byte ones before it has
/// heard the server). One datagram of the largest size accepted (`max_recv_udp_payload`)
/// always fits: at the defaults that is 64 KiB too, 64 MiB for a full backlog.
const UNSTARTED_BYTES: usize = 64 * 1024;

/// Where the router sends a connection's datagrams.
pub(crate) type Route = Sender;
/// Routes by connection ID.
pub(crate) type RouteMap = HashMap<Box<[u8]>, Route>;
/// Where a connection's task takes them from.
pub(crate) type InboundQueue = Receiver;

/// The route-table key of a stateless reset token (RFC 9000 §10.3). A reset's destination
/// ID is random, so the endpoint finds the connection by the last 16 bytes of the datagram
/// instead; its key is the token and a padding byte, longer than any connection ID (20
/// bytes at most), so never taken for one, and the table and a registration's lease serve
/// for both.
pub(crate) fn reset_token_key(token: &[u8; 16]) -> [u8; RESET_TOKEN_KEY_LEN] {
    let mut key = [0; RESET_TOKEN_KEY_LEN];
    key[..16].copy_from_slice(token);
    key
}

const RESET_TOKEN_KEY_LEN: usize = quiche::MAX_CONN_ID_LEN + 1;

/// One socket's routes, keyed by connection ID, and the signal that stops its router once
/// the endpoint is closed and the last connection has gone.
#[derive(Default)]
pub(crate) struct RouteTable {
    map: Mutex<RouteMap>,
    /// Connections with at least one route (each has several IDs in `map`).
    connections: AtomicUsize,
    /// Set when every handle to the endpoint is gone: the router stops once the last
    /// connection has left the table.
    closing: AtomicBool,
    wake: Notify,
}

impl RouteTable {
    /// The table, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, RouteMap> {
        // The map stays consistent even if a holder panicked: every operation on it is a
        // single insert or remove.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of routed connection IDs (zero once no connection uses the socket).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The number of connections routed here (each has one ID or more).
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Every handle to the endpoint is gone: wakes the routers to stop when they may.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Completes when [`close`](Self::close) is called, or the last route of a closing
    /// table is withdrawn, after the returned future was enabled: every router of the
    /// table's sockets is woken, none gets a permit stored for later.
    pub(crate) fn closed_or_emptied(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }
}

/// The connection IDs one connection has in its socket's route table, and (server side) its
/// slot in the listener's caps; dropping it removes the IDs and frees the slot, so a
/// connection that ends in any way leaves no route behind and is no longer counted.
pub(crate) struct Registration {
    table: Arc<RouteTable>,
    ids: Vec<Box<[u8]>>,
    /// Counted among the table's connections (from its first route until released).
    counted: bool,
    route: Route,
    slot: Option<Slot>,
}

impl Registration {
    /// A connection's registration in `table`, with the queue its datagrams will be routed
    /// to; it has no ID yet.
    pub(crate) fn with_queue(table: &Arc<RouteTable>, s: &Settings) -> (Registration, InboundQueue) {
        let (tx, rx) = channel(s);
        let registration = Registration {
            table: Arc::clone(table),
            ids: Vec::new(),
            counted: false,
            route: tx,
            slot: None,
        };
        (registration, rx)
    }

    /// Holds `slot` in the listener's caps for as long as the connection lives.
    pub(crate) fn hold(&mut self, slot: Slot) {
        self.slot = Some(slot);
    }

    /// The handshake has completed: the connection leaves the listener's handshake count.
    pub(crate) fn established(&mut self) {
        if let Some(slot) = &mut self.slot {
            slot.established();
        }
    }

    /// The connection's queue, for a datagram the router hands over directly.
    pub(crate) fn route(&self) -> &Route {
        &self.route
    }

    /// Routes the stateless resets that carry `token` to this connection (the token its
    /// peer gave for it): see [`reset_token_key`]. A token another connection holds stays
    /// that one's: a server that gives several connections one token (which RFC 9000
    /// §10.3 forbids) has its resets reach the first of them only.
    pub(crate) fn add_reset_token(&mut self, token: u128) {
        let key: Box<[u8]> = reset_token_key(&token.to_be_bytes()).into();
        let table = Arc::clone(&self.table);
        let mut map = table.lock();
        let Entry::Vacant(vacant) = map.entry(key) else {
            return;
        };
        self.push_id(vacant.key().clone());
        vacant.insert(self.route.clone());
    }

    /// Routes `id` to this connection.
    pub(crate) fn add(&mut self, id: &[u8]) {
        let key: Box<[u8]> = id.into();
        self.table.lock().insert(key.clone(), self.route.clone());
        self.push_id(key);
    }

    /// Routes `id` to this connection in a table its caller holds locked (the router, which
    /// registers a new connection while dispatching).
    pub(crate) fn add_locked(&mut self, table: &mut RouteMap, id: &[u8]) {
        let key: Box<[u8]> = id.into();
        table.insert(key.clone(), self.route.clone());
        self.push_id(key);
    }

    fn push_id(&mut self, key: Box<[u8]>) {
        if !std::mem::replace(&mut self.counted, true) {
            self.table.connections.fetch_add(1, Ordering::AcqRel);
        }
        self.ids.push(key);
    }

    /// Withdraws the route of `id` (a retired connection ID).
    pub(crate) fn remove(&mut self, id: &[u8]) {
        if let Some(pos) = self.ids.iter().position(|k| &**k == id) {
            let key = self.ids.swap_remove(pos);
            self.withdraw(&mut self.table.lock(), &key);
        }
    }

    /// Removes `key`'s route if it is still this connection's: another connection may have
    /// taken the ID since (a client-chosen original ID, or a custom ID generator's
    /// predictable one), and its route must stay.
    fn withdraw(&self, table: &mut RouteMap, key: &[u8]) {
        if table.get(key).is_some_and(|route| route.same_queue(&self.route)) {
            table.remove(key);
        }
    }

    /// Withdraws every route of the connection now; a closed connection does this before it
    /// reports itself closed, so nobody who saw it closed finds its routes still there.
    pub(crate) fn release(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.table.connections.fetch_sub(1, Ordering::AcqRel);
        }
        if self.ids.is_empty() {
            // Nothing to withdraw, and no lock taken: a registration dropped while its
            // router holds the table (`router::BatchRoutes`) must not wait on it.
            return;
        }
        let now_empty = {
            let mut table = self.table.lock();
            for key in std::mem::take(&mut self.ids) {
                self.withdraw(&mut table, &key);
            }
            table.is_empty()
        };
        if now_empty && self.table.is_closing() {
            self.table.wake.notify_waiters();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.release();
    }
}

/// A new queue with the configured bounds.
pub(crate) fn channel(s: &Settings) -> (Sender, Receiver) {
    let queue = Arc::new(Queue {
        max_datagrams: s.inbound_queue,
        max_bytes: s.inbound_queue_bytes,
        max_datagram_len: s.max_recv_udp_payload,
        state: Mutex::default(),
    });
    (
        Sender {
            queue: Arc::clone(&queue),
        },
        Receiver { queue },
    )
}

/// One connection's inbound datagrams, shared by the router (every route of the
/// connection is a clone of one [`Sender`]) and the connection's task.
///
/// A deque under a mutex rather than a channel, for memory: a tokio channel allocates its
/// first block of 32 slots (2 KiB of datagram handles) and its shared state (512 bytes) when
/// it is made, and keeps the block for the connection's life. This queue holds no buffer
/// while it is empty, which is how an idle connection's queue always is: the buffer is
/// allocated by the datagram that finds it empty and freed by the receiver that empties it.
/// The lock is held for a push or a pop, never across a wake-up.
struct Queue {
    max_datagrams: usize,
    max_bytes: usize,
    /// The largest datagram the endpoint accepts (`max_recv_udp_payload`).
    max_datagram_len: usize,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    datagrams: VecDeque<Datagram>,
    /// Bytes of `datagrams`.
    bytes: usize,
    /// Runs of consecutive `datagrams` cut from one arena: how many arenas they keep (a
    /// router cuts from one arena after another, so one router's arenas come in order;
    /// with several routers feeding a queue, runs may interleave and count an arena more
    /// than once, which only makes copies come sooner).
    arenas: usize,
    /// The connection task, waiting for a datagram.
    waiting: Option<Waker>,
    /// The connection's task is gone.
    closed: bool,
    /// No task reads the queue yet ([`Receiver::until_started`]): it holds less, and no
    /// datagram keeps an arena.
    unstarted: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every change under the lock is a push or a pop that cannot panic half-way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The router's end (one per routed connection ID, all clones of one another).
#[derive(Clone)]
pub(crate) struct Sender {
    queue: Arc<Queue>,
}

impl Sender {
    /// Whether `other` feeds the same queue (routes the same connection).
    fn same_queue(&self, other: &Sender) -> bool {
        Arc::ptr_eq(&self.queue, &other.queue)
    }

    /// Queues `datagram` unless either bound is reached or the connection is gone; copies
    /// it out of its arena if the queue keeps [`MAX_QUEUE_ARENAS`] sparsely filled ones
    /// already.
    pub(crate) fn try_send(&self, mut datagram: Datagram) -> Result<(), TrySendError<Datagram>> {
        let queue = &*self.queue;
        let waiting = {
            let mut state = queue.lock();
            if state.closed {
                return Err(TrySendError::Closed(datagram));
            }
            let len = datagram.data.len();
            let (max_datagrams, max_bytes) = if state.unstarted {
                (
                    queue.max_datagrams.min(UNSTARTED_DATAGRAMS),
                    queue.max_bytes.min(UNSTARTED_BYTES.max(queue.max_datagram_len)),
                )
            } else {
                (queue.max_datagrams, queue.max_bytes)
            };
            if state.datagrams.len() >= max_datagrams || state.bytes + len > max_bytes {
                return Err(TrySendError::Full(datagram));
            }
            let new_arena =
                datagram.arena != 0 && state.datagrams.back().is_none_or(|last| last.arena != datagram.arena);
            // Sparse: its datagrams fill less than a quarter of an arena each on average.
            let sparse = || state.bytes < state.arenas * (super::router::ARENA_BYTES / 4);
            if new_arena && (state.unstarted || state.arenas >= MAX_QUEUE_ARENAS && sparse()) {
                datagram.data = BytesMut::from(&datagram.data[..]);
                datagram.arena = 0;
            } else if new_arena {
                state.arenas += 1;
            }
            state.bytes += len;
            state.datagrams.push_back(datagram);
            state.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
        Ok(())
    }
}

/// The connection task's end.
pub(crate) struct Receiver {
    queue: Arc<Queue>,
}

impl Receiver {
    /// The queue of a connection waiting to be accepted: until [`started`](Self::started),
    /// it holds at most [`UNSTARTED_DATAGRAMS`] and [`UNSTARTED_BYTES`] (or one datagram of
    /// the largest size accepted), each in an allocation of its own.
    pub(crate) fn until_started(self) -> Self {
        self.queue.lock().unstarted = true;
        self
    }

    /// The connection's task reads the queue from now on: its full bounds apply.
    pub(crate) fn started(&self) {
        self.queue.lock().unstarted = false;
    }

    /// The next datagram, or `Pending` (with `cx` to be woken) while there is none. The
    /// queue never ends: the connection's own registration keeps a sender for as long as
    /// the connection lives.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Datagram> {
        let mut state = self.queue.lock();
        match state.datagrams.pop_front() {
            Some(datagram) => {
                state.bytes -= datagram.data.len();
                if datagram.arena != 0 && state.datagrams.front().is_none_or(|next| next.arena != datagram.arena) {
                    // The last of its run.
                    state.arenas -= 1;
                }
                if state.datagrams.is_empty() {
                    // Drained: an idle connection keeps no buffer.
                    state.datagrams = VecDeque::new();
                }
                Poll::Ready(datagram)
            }
            None => {
                match &mut state.waiting {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    waiting => *waiting = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.closed = true;
        // What is queued can never be read; free it now rather than with the last route.
        state.datagrams = VecDeque::new();
        state.bytes = 0;
        state.arenas = 0;
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    fn datagram(len: usize) -> Datagram {
        Datagram {
            data: BytesMut::zeroed(len),
            from: "127.0.0.1:1".parse().unwrap(),
            arena: 0,
        }
    }

    /// A queue whose task does not read keeps at most [`MAX_QUEUE_ARENAS`] of the router's
    /// arenas, however the datagrams are spread over them; the rest are copied out, and
    /// reading frees the count again.
    #[test]
    fn a_queue_keeps_a_bounded_number_of_arenas() {
        let (tx, mut rx) = channel(&Settings::default());
        // Two small datagrams from each of 40 arenas (64 KiB each), as a connection that
        // reads nothing gets them while other traffic fills the arenas between.
        let mut arenas = Vec::new();
        for id in 1..=40u64 {
            let mut arena = BytesMut::with_capacity(64 * 1024);
            for _ in 0..2 {
                arena.extend_from_slice(&[7; 20]);
                let data = arena.split();
                tx.try_send(Datagram {
                    data,
                    from: "127.0.0.1:1".parse().unwrap(),
                    arena: id,
                })
                .unwrap();
            }
            arenas.push(arena);
        }
        let kept = |rx: &Receiver| {
            let state = rx.queue.lock();
            let cut = state.datagrams.iter().filter(|d| d.arena != 0).count();
            let own = state
                .datagrams
                .iter()
                .filter(|d| d.arena == 0 && d.data.capacity() == 20)
                .count();
            (state.arenas, cut, own)
        };
        assert_eq!(
            kept(&rx),
            (MAX_QUEUE_ARENAS, 2 * MAX_QUEUE_ARENAS, 80 - 2 * MAX_QUEUE_ARENAS)
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for read in 1..=80 {
            assert!(rx.poll_recv(&mut cx).is_ready());
            let expected = MAX_QUEUE_ARENAS.saturating_sub(read / 2);
            assert_eq!(kept(&rx).0, expected, "after {read} read");
        }
        // Reading freed the count: arenas are kept again.
        let mut arena = BytesMut::with_capacity(64 * 1024);
        arena.extend_from_slice(&[7; 20]);
        tx.try_send(Datagram {
            data: arena.split(),
            from: "127.0.0.1:1".parse().unwrap(),
            arena: 41,
        })
        .unwrap();
        assert_eq!(kept(&rx), (1, 1, 0));
        drop(arenas);
    }

    /// The queue of a connection waiting in the backlog (nobody reads it) holds a first
    /// flight, not the full bounds, and keeps no arena; once its task starts, the full
    /// bounds apply again.
    #[test]
    fn a_queue_not_yet_started_holds_a_first_flight_and_no_arena() {
        let s = Settings::default();
        let (tx, rx) = channel(&s);
        let rx = rx.until_started();
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cut = |id: u64, len: usize| {
            let mut arena = BytesMut::with_capacity(64 * 1024);
            arena.extend_from_slice(&vec![7; len]);
            Datagram {
                data: arena.split(),
                from,
                arena: id,
            }
        };
        let mut full = 0;
        for id in 1..=80 {
            if let Err(TrySendError::Full(_)) = tx.try_send(cut(id, 1200)) {
                full += 1;
            }
        }
        assert_eq!(full, 80 - UNSTARTED_DATAGRAMS, "a first flight is held");
        {
            let state = rx.queue.lock();
            assert_eq!(state.arenas, 0);
            assert!(
                state
                    .datagrams
                    .iter()
                    .all(|d| d.arena == 0 && d.data.capacity() == 1200)
            );
        }
        // Larger datagrams: the bytes bound the queue first.
        let (bytes_tx, bytes_rx) = channel(&s);
        let _bytes_rx = bytes_rx.until_started();
        let held = (1..=80).filter(|&id| bytes_tx.try_send(cut(id, 3000)).is_ok()).count();
        assert_eq!(held, UNSTARTED_BYTES.max(s.max_recv_udp_payload) / 3000);
        // One datagram of the largest size accepted fits, however large.
        let (big_tx, big_rx) = channel(&s);
        let _big_rx = big_rx.until_started();
        big_tx.try_send(cut(1, s.max_recv_udp_payload)).unwrap();
        let room = UNSTARTED_BYTES.max(s.max_recv_udp_payload) - s.max_recv_udp_payload;
        assert!(matches!(big_tx.try_send(cut(2, room + 1)), Err(TrySendError::Full(_))));
        // Started: the full bounds, and arenas kept.
        rx.started();
        for id in 81..=140 {
            tx.try_send(cut(id, 1200)).unwrap();
        }
        let state = rx.queue.lock();
        assert_eq!(state.datagrams.len(), UNSTARTED_DATAGRAMS + 60);
        assert!(state.arenas > 0, "arenas are kept once started");
    }

    /// Datagrams that fill their arenas (a quarter of one each, on average, or more) are
    /// never copied out, however many arenas the queue keeps: a dense flow that lags pays
    /// no allocation per datagram, and the queue's bytes bound what it keeps (4 times).
    #[test]
    fn a_queue_keeps_the_arenas_of_dense_datagrams() {
        let (tx, rx) = channel(&Settings::default());
        let mut arenas = Vec::new();
        for id in 1..=20u64 {
            let mut arena = BytesMut::with_capacity(64 * 1024);
            arena.extend_from_slice(&[7; 20 * 1024]);
            tx.try_send(Datagram {
                data: arena.split(),
                from: "127.0.0.1:1".parse().unwrap(),
                arena: id,
            })
            .unwrap();
            arenas.push(arena);
        }
        let state = rx.queue.lock();
        assert_eq!(state.arenas, 20);
        assert!(state.datagrams.iter().all(|d| d.arena != 0), "none copied");
    }

    /// A connection that ends withdraws only the routes that are still its own: one that
    /// another connection took over (the same ID registered since) stays.
    #[test]
    fn a_connection_withdraws_only_routes_that_are_still_its_own() {
        let table = Arc::new(RouteTable::default());
        let s = Settings::default();
        let (mut first, _first_rx) = Registration::with_queue(&table, &s);
        let (mut second, mut second_rx) = Registration::with_queue(&table, &s);
        first.add(b"shared-id");
        first.add(b"first-only");
        second.add(b"shared-id");
        first.remove(b"shared-id");
        drop(first);
        let route = table
            .lock()
            .get(&b"shared-id"[..])
            .cloned()
            .expect("the second's route stays");
        route.try_send(datagram(10)).unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            second_rx.poll_recv(&mut cx).is_ready(),
            "it reaches the second connection"
        );
        assert!(
            table.lock().get(&b"first-only"[..]).is_none(),
            "the first's own route went"
        );
        second.release();
        assert!(table.lock().is_empty());
    }

    /// A reset token two connections were given reaches the first that holds it, while it
    /// does; the second, ending, does not take it away.
    #[test]
    fn a_reset_token_stays_with_its_first_holder() {
        let table = Arc::new(RouteTable::default());
        let s = Settings::default();
        let (mut first, mut first_rx) = Registration::with_queue(&table, &s);
        let (mut second, _second_rx) = Registration::with_queue(&table, &s);
        first.add_reset_token(7);
        second.add_reset_token(7);
        second.release();
        let key = reset_token_key(&7u128.to_be_bytes());
        let route = table.lock().get(&key[..]).cloned().expect("the first's route stays");
        route.try_send(datagram(10)).unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            first_rx.poll_recv(&mut cx).is_ready(),
            "it reaches the first connection"
        );
        first.release();
        assert!(table.lock().is_empty(), "the token goes with its holder");
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_as_well_as_in_datagrams() {
        let s = Settings {
            inbound_queue: 4,
            inbound_queue_bytes: 10_000,
            ..Settings::default()
        };
        let (tx, mut rx) = channel(&s);
        tx.try_send(datagram(6_000)).unwrap();
        assert!(
            matches!(tx.try_send(datagram(6_000)), Err(TrySendError::Full(_))),
            "bytes"
        );
        tx.try_send(datagram(4_000)).unwrap();
        assert!(
            matches!(tx.try_send(datagram(1)), Err(TrySendError::Full(_))),
            "exactly full"
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(first) = rx.poll_recv(&mut cx) else {
            panic!("a queued datagram")
        };
        assert_eq!(first.data.len(), 6_000);
        // Taking one out frees its bytes.
        tx.try_send(datagram(5_000)).unwrap();
        // The datagram bound still holds for small datagrams.
        tx.try_send(datagram(1)).unwrap();
        tx.try_send(datagram(1)).unwrap();
        assert!(
            matches!(tx.try_send(datagram(1)), Err(TrySendError::Full(_))),
            "datagrams"
        );
        drop(rx);
        assert!(matches!(tx.try_send(datagram(1)), Err(TrySendError::Closed(_))));
    }

    /// An idle connection's queue is empty, and an empty queue holds no buffer: what it
    /// needed for a burst is freed once the burst is read.
    #[test]
    fn a_drained_queue_holds_no_buffer() {
        let (tx, mut rx) = channel(&Settings::default());
        let capacity = || tx.queue.lock().datagrams.capacity();
        assert_eq!(capacity(), 0, "a new queue");
        for _ in 0..10 {
            tx.try_send(datagram(100)).unwrap();
        }
        assert!(capacity() >= 10);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..10 {
            assert!(rx.poll_recv(&mut cx).is_ready());
        }
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert_eq!(capacity(), 0, "drained");
    }

    /// A datagram wakes the task that found the queue empty.
    #[test]
    fn a_datagram_wakes_the_waiting_task() {
        let (tx, mut rx) = channel(&Settings::default());
        let wakes = Arc::<crate::testing::WakeCount>::default();
        let waker = wakes.waker();
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.try_send(datagram(1)).unwrap();
        assert_eq!(wakes.count(), 1);
        assert!(rx.poll_recv(&mut cx).is_ready());
    }
}
