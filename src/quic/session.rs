//! The client's TLS session cache: what lets a later connection to the same server resume
//! its session (a shorter handshake) and send 0-RTT data (RFC 9001 §4.6).
//!
//! One cache per client [`Endpoint`](super::Endpoint), keyed by the name the server was
//! reached by and its port (the name its certificate was checked against: a session is
//! offered only where the same identity is expected). Each key keeps its latest session, as
//! serialized by quiche (the TLS session and the server's transport parameters, which 0-RTT
//! data must respect), and hands it to one connection only. The cache is bounded; past its
//! size the oldest key goes.
//!
//! Each session remembers the address whose connection received it:
//! [`Endpoint::connect`](super::Endpoint::connect) tries that address first, and only a
//! resumed connection to it counts as up as soon as it can send 0-RTT data. A name with
//! several addresses (IPv6 and IPv4, say) would otherwise resume on whichever came first,
//! and one that does not answer (a broken IPv6 path) would win the race at once and hold
//! its requests for the connect timeout, at every resumption. Another address of the name
//! (DNS that rotates) still resumes the session, once its handshake completes.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Servers a client endpoint remembers a session for. A session is a few KiB (a ticket and
/// the server's certificate chain), so this bounds the cache to a few MiB.
const MAX_SERVERS: usize = 256;

/// Where a client connection stores the sessions its server issues: the cache, the
/// server's key, and the address connected to.
#[derive(Debug, Clone)]
pub(crate) struct SessionSlot {
    pub(crate) cache: Arc<SessionCache>,
    pub(crate) key: Arc<str>,
    pub(crate) addr: SocketAddr,
}

impl SessionSlot {
    pub(crate) fn store(&self, session: &[u8]) {
        self.cache.put(&self.key, session, self.addr);
    }
}

/// A bounded map from server to its latest session.
#[derive(Debug, Default)]
pub(crate) struct SessionCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each server's session, and the address of the connection that received it.
    sessions: HashMap<Arc<str>, (Arc<[u8]>, SocketAddr)>,
    /// Keys in the order they were first stored, for eviction.
    order: VecDeque<Arc<str>>,
}

impl SessionCache {
    /// The key of a server: its name (or address, as text) and port.
    pub(crate) fn key(server_name: &str, port: u16) -> Arc<str> {
        format!("{server_name}:{port}").into()
    }

    /// Takes the latest session stored for `key`: a session is offered on one connection
    /// only. A ticket used twice lets an observer link the connections (RFC 8446 §4.6.1,
    /// Appendix C.4), and a server that keeps tickets single-use against 0-RTT replay
    /// (RFC 8446 §8.1) refuses the second one's early data. The connection that resumes
    /// it stores the ticket the server issues on it for the next one.
    pub(crate) fn take(&self, key: &str) -> Option<Arc<[u8]>> {
        let mut inner = self.lock();
        let (session, _) = inner.sessions.remove(key)?;
        inner.order.retain(|k| &**k != key);
        Some(session)
    }

    /// The address the session stored for `key` was received from, if there is one.
    #[cfg(any(feature = "client", test))]
    pub(crate) fn address_of(&self, key: &str) -> Option<SocketAddr> {
        self.lock().sessions.get(key).map(|&(_, addr)| addr)
    }

    /// Stores `session`, received on a connection to `addr`, for `key`, replacing the one
    /// before; the oldest server is forgotten when the cache is full.
    pub(crate) fn put(&self, key: &Arc<str>, session: &[u8], addr: SocketAddr) {
        let mut inner = self.lock();
        if inner.sessions.insert(Arc::clone(key), (session.into(), addr)).is_none() {
            inner.order.push_back(Arc::clone(key));
            while inner.order.len() > MAX_SERVERS {
                if let Some(oldest) = inner.order.pop_front() {
                    inner.sessions.remove(&oldest);
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = "192.0.2.1:443";

    fn addr() -> SocketAddr {
        ADDR.parse().unwrap()
    }

    #[test]
    fn each_server_keeps_its_latest_session_and_the_oldest_server_goes_first() {
        let cache = SessionCache::default();
        let a = SessionCache::key("a.example", 443);
        cache.put(&a, b"one", addr());
        cache.put(&a, b"two", addr());
        assert_eq!(cache.lock().sessions.get(&a).map(|s| &s.0[..]), Some(&b"two"[..]));
        for i in 0..MAX_SERVERS {
            cache.put(&SessionCache::key("b.example", i as u16), b"x", addr());
        }
        // `a` was stored first: the cache is full by one, so it went.
        assert!(!cache.lock().sessions.contains_key(&a));
        assert!(cache.lock().sessions.contains_key(&SessionCache::key("b.example", 0)));
        assert_eq!(cache.lock().sessions.len(), MAX_SERVERS);
        assert_eq!(cache.lock().order.len(), MAX_SERVERS);
        assert!(cache.take(&SessionCache::key("b.example", 0)).is_some());
        assert!(!cache.lock().sessions.contains_key(&SessionCache::key("b.example", 0)));
        assert_eq!(cache.lock().order.len(), MAX_SERVERS - 1);
    }

    /// Found in review of 28392fd: a stored session was handed to every connection that
    /// asked, so concurrent or repeated connections to a server resumed with the same
    /// ticket. RFC 8446 §4.6.1 and Appendix C.4: clients SHOULD NOT reuse a ticket, which
    /// lets an observer link the connections; and a server that keeps tickets single-use
    /// against 0-RTT replay (RFC 8446 §8.1) refuses the reuse's early data.
    #[test]
    fn a_session_is_offered_to_one_connection_only() {
        let cache = SessionCache::default();
        let key = SessionCache::key("a.example", 443);
        cache.put(&key, b"ticket", addr());
        assert_eq!(cache.take(&key).as_deref(), Some(&b"ticket"[..]));
        assert_eq!(cache.take(&key), None, "the ticket was offered once already");
        assert!(cache.lock().order.is_empty());
    }

    /// A session remembers the address whose connection received it (Happy Eyeballs tries
    /// it first, and counts only a connection there as up once it can send 0-RTT data).
    #[test]
    fn a_session_remembers_the_address_that_received_it() {
        let cache = SessionCache::default();
        let key = SessionCache::key("a.example", 443);
        cache.put(&key, b"ticket", addr());
        assert_eq!(cache.address_of(&key), Some(addr()));
        let other: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        cache.put(&key, b"newer", other);
        assert_eq!(cache.address_of(&key), Some(other), "the latest session's");
        assert_eq!(cache.take(&key).as_deref(), Some(&b"newer"[..]));
        assert_eq!(cache.address_of(&key), None);
    }
}
