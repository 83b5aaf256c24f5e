//! What unauthenticated traffic may make a server spend: the admission caps on connections
//! and on half-open handshakes, and the token bucket that rate-limits stateless replies
//! (stateless resets, version negotiation).
//!
//! One [`Limits`] is shared by the routers of every socket of a
//! [`Listener`](super::Listener), so a listener bound to several addresses has one set of
//! caps. Each admitted connection holds a [`Slot`] in its [`Registration`](super::Registration)
//! that gives its share back as the connection moves on, so the counts stay exact however
//! the connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::config::ServerSettings;
use super::metrics::DropReason;

/// The caps and the reply budget of one listener.
pub(crate) struct Limits {
    max_connections: usize,
    max_handshakes: usize,
    max_handshakes_per_address: usize,
    max_connections_per_address: usize,
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    /// Connections and handshakes in progress per client address ([`AddressKey`]), the
    /// handshakes counted apart for addresses unproven and proven by a Retry token
    /// ([`ByAddress`]); at most `max_connections` entries, as each counts at least one.
    by_address: Mutex<HashMap<AddressKey, ByAddress>>,
    replies: Mutex<TokenBucket>,
}

/// What counts as one client address for the per-address shares of connections and
/// handshakes: an IPv4 address (plain or mapped into IPv6), or an IPv6 /64, the prefix one
/// host usually gets whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddressKey {
    V4(u32),
    V6(u64),
}

impl AddressKey {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddressKey::V4(v4.to_bits()),
            IpAddr::V6(v6) => AddressKey::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

/// An address's connections, and its handshakes in progress in two classes: those whose
/// source address nothing proved, which anyone can claim by spoofing it, and those that
/// answered a Retry from it. Each class has the per-address share of its own: spoofed
/// Initials that fill an address's share (before the load threshold, when no Retry is
/// asked for) leave its real clients the other, through a Retry; nor do they count
/// against its share of the connections.
#[derive(Debug, Default, Clone, Copy)]
struct ByAddress {
    unproven: usize,
    proven: usize,
    /// Every connection of the address, handshaking or established.
    connections: usize,
}

impl ByAddress {
    fn handshakes_mut(&mut self, proven: bool) -> &mut usize {
        if proven { &mut self.proven } else { &mut self.unproven }
    }

    fn is_empty(&self) -> bool {
        self.unproven == 0 && self.proven == 0 && self.connections == 0
    }
}

/// Why a new connection is not admitted, as what the router does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A cap of the listener, or the address's share even once proven: dropped.
    Drop(DropReason),
    /// The client's address has its share, counting what nothing proved: a Retry proves
    /// it, and proven handshakes and connections are counted apart.
    Retry,
}

impl Refusal {
    /// What a refused Initial counts as when it is dropped (a Retry that cannot be sent,
    /// under `RetryPolicy::Never` or once past the Retry, counts as the handshake cap).
    pub(crate) fn dropped_as(self) -> DropReason {
        match self {
            Refusal::Drop(reason) => reason,
            Refusal::Retry => DropReason::HandshakeLimit,
        }
    }
}

/// Which of the listener's loads apply to a new connection, counting it.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// The half-open handshakes reach the load threshold: per-address handshake shares.
    handshakes: bool,
    /// At most a quarter of the connection slots are free: per-address connection shares.
    slots: bool,
}

impl Limits {
    pub(crate) fn new(s: &ServerSettings) -> Arc<Self> {
        Arc::new(Limits {
            max_connections: s.max_connections,
            max_handshakes: s.max_handshakes,
            max_handshakes_per_address: s.max_handshakes_per_address,
            max_connections_per_address: s.max_connections_per_address,
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            by_address: Mutex::new(HashMap::new()),
            replies: Mutex::new(TokenBucket::new(
                s.stateless_replies_per_second,
                s.stateless_reply_burst,
                Instant::now(),
            )),
        })
    }

    /// Whether a new connection from `from` (`proven` by a Retry token of ours) would be
    /// admitted now. The router asks before sending a Retry, so that a client it would
    /// refuse anyway costs no reply.
    pub(crate) fn check(&self, from: IpAddr, proven: bool) -> Result<(), Refusal> {
        if self.connections.load(Ordering::Acquire) >= self.max_connections {
            return Err(Refusal::Drop(DropReason::ConnectionLimit));
        }
        if self.handshakes.load(Ordering::Acquire) >= self.max_handshakes {
            return Err(Refusal::Drop(DropReason::HandshakeLimit));
        }
        // As if this one were admitted (`admit` counts it before it looks).
        let load = self.load_with(1);
        if !load.handshakes && !load.slots {
            // No per-address share applies: the map is not even looked at.
            return Ok(());
        }
        let Some(counts) = self.by_address().get(&AddressKey::of(from)).copied() else {
            return Ok(());
        };
        self.address_refusal(counts, proven, load).map_or(Ok(()), Err)
    }

    /// The loads with `more` connections and handshakes than are counted now.
    fn load_with(&self, more: usize) -> Load {
        let handshakes = self.handshakes.load(Ordering::Acquire).saturating_add(more);
        let connections = self.connections.load(Ordering::Acquire).saturating_add(more);
        Load {
            handshakes: handshakes >= self.load_threshold(),
            slots: connections.saturating_add(self.max_connections.div_ceil(4)) >= self.max_connections,
        }
    }

    /// Why an address with `counts` may not start one more connection (`proven` by a Retry
    /// token or not), if it may not, under `load`.
    fn address_refusal(&self, counts: ByAddress, proven: bool, load: Load) -> Option<Refusal> {
        // One address holds many while there is room (a NAT's clients, a load test), and
        // cannot take the room that remains once there is not.
        if load.slots {
            // Its connections, but for the half-open ones nothing proved: anyone may claim
            // an address for those (spoofed Initials), and they must not lock it out.
            let settled = counts.connections.saturating_sub(counts.unproven);
            if settled >= self.max_connections_per_address {
                return Some(Refusal::Drop(DropReason::ConnectionLimit));
            }
            if !proven && counts.connections >= self.max_connections_per_address {
                return Some(Refusal::Retry);
            }
        }
        let share = self.max_handshakes_per_address;
        let own = if proven { counts.proven } else { counts.unproven };
        if load.handshakes && own >= share {
            // A proven client has had its chance, and an unproven one whose proven share
            // is full too would only come back from a Retry to be refused.
            if proven || counts.proven >= share {
                return Some(Refusal::Drop(DropReason::HandshakeLimit));
            }
            return Some(Refusal::Retry);
        }
        None
    }

    fn by_address(&self) -> std::sync::MutexGuard<'_, HashMap<AddressKey, ByAddress>> {
        // Held for a map operation; a panic cannot leave the counts half-changed.
        self.by_address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A quarter of the half-open handshake cap (below the cap itself, so a cap of 1 means
    /// always).
    fn load_threshold(&self) -> usize {
        self.max_handshakes
            .div_ceil(4)
            .min(self.max_handshakes.saturating_sub(1))
    }

    /// Whether the listener is loaded enough for
    /// [`RetryPolicy::UnderLoad`](super::RetryPolicy::UnderLoad) to validate addresses: a
    /// quarter of the half-open handshake cap in use (below the cap itself, so a cap of 1
    /// means always), or fewer free connection slots than that quarter (half-open
    /// handshakes hold connection slots too, so spoofed Initials could otherwise fill the
    /// last ones without ever drawing a Retry).
    pub(crate) fn under_load(&self) -> bool {
        let threshold = self.load_threshold();
        self.handshakes.load(Ordering::Acquire) >= threshold
            || self.connections.load(Ordering::Acquire).saturating_add(threshold) >= self.max_connections
    }

    /// Takes a connection slot and a handshake slot for a client at `from` (`proven` by a
    /// Retry token of ours), or says which cap is reached.
    pub(crate) fn admit(self: &Arc<Self>, from: IpAddr, proven: bool) -> Result<Slot, Refusal> {
        if !take(&self.connections, self.max_connections) {
            return Err(Refusal::Drop(DropReason::ConnectionLimit));
        }
        if !take(&self.handshakes, self.max_handshakes) {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Drop(DropReason::HandshakeLimit));
        }
        let address = AddressKey::of(from);
        {
            let mut by_address = self.by_address();
            let counts = by_address.entry(address).or_default();
            // This connection is counted already (taken above).
            let refusal = self.address_refusal(*counts, proven, self.load_with(0));
            if let Some(refusal) = refusal {
                if counts.is_empty() {
                    by_address.remove(&address);
                }
                drop(by_address);
                self.handshakes.fetch_sub(1, Ordering::AcqRel);
                self.connections.fetch_sub(1, Ordering::AcqRel);
                return Err(refusal);
            }
            *counts.handshakes_mut(proven) += 1;
            counts.connections += 1;
        }
        Ok(Slot {
            limits: Arc::clone(self),
            address,
            handshaking: Some(proven),
        })
    }

    /// Spends one stateless reply from the budget; false when the budget is exhausted.
    pub(crate) fn allow_reply(&self) -> bool {
        // Held for a few arithmetic operations; a panic cannot leave the bucket inconsistent.
        let mut bucket = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        bucket.take(Instant::now())
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        (
            self.connections.load(Ordering::Acquire),
            self.handshakes.load(Ordering::Acquire),
        )
    }
}

/// Increments `counter` unless it has reached `max`.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_ok()
}

/// One admitted connection's claim on its listener's caps. The handshake slot is given back
/// when the handshake completes ([`Slot::established`]) and everything else when the slot is
/// dropped with the connection's registration: whether the connection closes, times out,
/// fails its handshake, or is never accepted by the application.
pub(crate) struct Slot {
    limits: Arc<Limits>,
    /// The client's address, as counted.
    address: AddressKey,
    /// While the handshake is in progress: whether the address was proven.
    handshaking: Option<bool>,
}

impl Slot {
    /// The handshake has completed: the connection no longer counts as half-open.
    pub(crate) fn established(&mut self) {
        self.give_back(false);
    }

    /// Gives back the handshake, if still in progress, and with `connection` the
    /// connection too: the address's counts under one lock, its entry gone once empty.
    fn give_back(&mut self, connection: bool) {
        let handshake = self.handshaking.take();
        if handshake.is_none() && !connection {
            return;
        }
        if handshake.is_some() {
            self.limits.handshakes.fetch_sub(1, Ordering::AcqRel);
        }
        let mut by_address = self.limits.by_address();
        if let Some(counts) = by_address.get_mut(&self.address) {
            let take = |count: &mut usize| {
                debug_assert!(*count > 0, "counted once, given back once");
                *count = count.saturating_sub(1);
            };
            if let Some(proven) = handshake {
                take(counts.handshakes_mut(proven));
            }
            if connection {
                take(&mut counts.connections);
            }
            if counts.is_empty() {
                by_address.remove(&self.address);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.give_back(true);
        self.limits.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket: `burst` replies at once, refilled at `rate` per second.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(per_second),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Both `check` (asked before a Retry) and `admit` refuse a connection from `from`
    /// (`proven` or not) with `refusal`.
    #[track_caller]
    fn refused(limits: &Arc<Limits>, from: IpAddr, proven: bool, refusal: Refusal) {
        assert_eq!(limits.check(from, proven), Err(refusal), "check, from {from}");
        assert_eq!(limits.admit(from, proven).err(), Some(refusal), "admit, from {from}");
    }

    /// A listener's caps, with `connections` slots of which one address holds
    /// `per_address` once they run short, and `handshakes` of which it holds
    /// `handshakes_per_address` under load.
    fn shares(connections: usize, per_address: usize, handshakes: usize, handshakes_per_address: usize) -> Arc<Limits> {
        Limits::new(&ServerSettings {
            max_connections: connections,
            max_connections_per_address: per_address,
            max_handshakes: handshakes,
            max_handshakes_per_address: handshakes_per_address,
            ..ServerSettings::default()
        })
    }

    /// Caps with no per-address share of the connections (tested on its own).
    fn limits(connections: usize, handshakes: usize) -> Arc<Limits> {
        let s = ServerSettings {
            max_connections: connections,
            max_handshakes: handshakes,
            max_connections_per_address: usize::MAX,
            ..ServerSettings::default()
        };
        Limits::new(&s)
    }

    #[test]
    fn load_counts_half_open_handshakes_and_scarce_connection_slots() {
        // A quarter of the handshake cap.
        let l = limits(1000, 8);
        let held: Vec<Slot> = (0..2).map(|_| l.admit(HOST, false).unwrap()).collect();
        assert!(l.under_load());
        drop(held);
        assert!(!l.under_load());
        // A cap of 1: a Retry always, or one half-open handshake would lock everyone out.
        assert!(limits(1000, 1).under_load());
        // Few free connection slots, however few handshakes: established connections
        // fill all but the last quarter-cap's worth.
        let l = limits(10, 8);
        let mut held: Vec<Slot> = (0..8).map(|_| l.admit(HOST, false).unwrap()).collect();
        held.iter_mut().for_each(Slot::established);
        assert_eq!(l.counts(), (8, 0));
        assert!(l.under_load(), "2 free slots, threshold 2");
        held.pop();
        assert!(!l.under_load());
    }

    #[test]
    fn slots_count_exactly_however_the_connection_ends() {
        let limits = limits(3, 2);
        let mut a = limits.admit(HOST, false).unwrap();
        let b = limits.admit(HOST, false).unwrap();
        assert_eq!(limits.counts(), (2, 2));
        refused(&limits, HOST, false, Refusal::Drop(DropReason::HandshakeLimit));
        assert_eq!(limits.counts(), (2, 2), "a refused admission takes nothing");
        // Established: frees its handshake slot once, however often it is told.
        a.established();
        a.established();
        assert_eq!(limits.counts(), (2, 1));
        let c = limits.admit(HOST, false).unwrap();
        refused(&limits, HOST, false, Refusal::Drop(DropReason::ConnectionLimit));
        // Dies while handshaking: frees both slots.
        drop(b);
        assert_eq!(limits.counts(), (2, 1));
        // Dies established: frees its connection slot only.
        drop(a);
        assert_eq!(limits.counts(), (1, 1));
        drop(c);
        assert_eq!(limits.counts(), (0, 0));
        assert_eq!(limits.check(HOST, false), Ok(()));
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_the_handshakes() {
        let limits = shares(10_000, 1_000, 8, 2);
        let mut first = limits.admit(ip("192.0.2.1"), false).unwrap();
        let _second = limits.admit(ip("192.0.2.1"), false).unwrap();
        // The same IPv4 address mapped into IPv6 (a dual-stack socket's view) is the same.
        for same in ["192.0.2.1", "::ffff:192.0.2.1"] {
            refused(&limits, ip(same), false, Refusal::Retry);
        }
        assert_eq!(limits.counts(), (2, 2), "a refused admission takes nothing");
        let _other = limits.admit(ip("192.0.2.2"), false).unwrap();
        // IPv6: one /64 is one address.
        let _v6 = limits.admit(ip("2001:db8::1"), false).unwrap();
        let _v6_same_prefix = limits.admit(ip("2001:db8::2"), false).unwrap();
        assert_eq!(limits.admit(ip("2001:db8::ffff:3"), false).err(), Some(Refusal::Retry));
        let _v6_next_prefix = limits.admit(ip("2001:db8:0:1::1"), false).unwrap();
        // A completed handshake gives its address's share back.
        first.established();
        let _third = limits.admit(ip("192.0.2.1"), false).unwrap();
        assert_eq!(limits.by_address().len(), 4);
        drop((first, _second, _third, _other, _v6, _v6_same_prefix, _v6_next_prefix));
        assert!(limits.by_address().is_empty(), "no entry outlives its handshakes");
        assert_eq!(limits.counts(), (0, 0));
    }

    #[test]
    fn a_listener_with_room_lets_one_address_burst_past_its_share() {
        // A quarter of 1,024 handshakes is the load threshold: below it, one address may
        // have more than its 64.
        let limits = limits(10_000, 1024);
        let held: Vec<Slot> = (0..200).map(|_| limits.admit(HOST, false).unwrap()).collect();
        assert_eq!(limits.check(HOST, false), Ok(()));
        let more: Vec<Slot> = (0..55).map(|_| limits.admit(HOST, false).unwrap()).collect();
        // The next would be the 256th in progress, which loads the listener: this address
        // is over its share then, others are not; `check` (before a Retry) and `admit`
        // agree on it.
        refused(&limits, HOST, false, Refusal::Retry);
        let other = "192.0.2.9".parse::<IpAddr>().unwrap();
        assert!(limits.admit(other, false).is_ok());
        drop((held, more));
    }

    /// One address may hold many connections while there is room, and no more than its
    /// share once at most a quarter of the slots are free, while other addresses still
    /// get the rest; a connection that ends gives its address's share back.
    #[test]
    fn one_address_holds_at_most_its_share_of_the_connections_once_slots_run_short() {
        let limits = shares(8, 2, 1024, 64);
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        let mut held: Vec<Slot> = (0..3).map(|_| limits.admit(a, false).unwrap()).collect();
        held.iter_mut().for_each(Slot::established);
        assert_eq!(limits.check(a, false), Ok(()), "past its share while there is room");
        held.push(limits.admit(b, false).unwrap());
        held.push(limits.admit(b, false).unwrap());
        held.iter_mut().for_each(Slot::established);
        // 5 of 8 taken: 3 free, more than a quarter.
        held.push(limits.admit(c, false).unwrap());
        // 6 of 8: 2 free, a quarter: each address holds its share at most.
        for full in [a, b] {
            refused(&limits, full, false, Refusal::Drop(DropReason::ConnectionLimit));
        }
        held.push(limits.admit(c, false).unwrap());
        assert_eq!(limits.counts().0, 7, "a refused admission takes nothing");
        // One of a's ends: 6 of 8 taken, and a at its share still.
        held.remove(0);
        assert_eq!(limits.check(a, false), Err(Refusal::Drop(DropReason::ConnectionLimit)));
        // Another: under its share, it may open one again.
        held.remove(0);
        assert_eq!(limits.check(a, false), Ok(()));
        drop(held);
        assert!(limits.by_address().is_empty(), "no entry outlives its connections");
    }

    /// Half-open connections nothing proved (spoofed Initials may claim any address) do
    /// not count against an address's share of the connections: once slots run short, its
    /// unproven clients get a Retry, and proven ones are admitted up to the share.
    #[test]
    fn unproven_half_open_connections_do_not_lock_an_address_out_of_its_connections() {
        let limits = shares(12, 2, 1024, 64);
        let victim = ip("192.0.2.1");
        let mut held: Vec<Slot> = (0..2).map(|_| limits.admit(victim, false).unwrap()).collect();
        let mut others: Vec<Slot> = (2..8)
            .map(|i| limits.admit(ip(&format!("192.0.2.{i}")), true).unwrap())
            .collect();
        others.iter_mut().for_each(Slot::established);
        // 8 of 12 taken: slots are short for a ninth (and the listener far from full).
        assert_eq!(limits.check(victim, false), Err(Refusal::Retry), "a Retry, not a drop");
        assert_eq!(limits.check(victim, true), Ok(()));
        held.push(limits.admit(victim, true).unwrap());
        held.last_mut().unwrap().established();
        assert_eq!(limits.check(victim, true), Ok(()), "one settled of its two");
        held.push(limits.admit(victim, true).unwrap());
        assert_eq!(
            limits.check(victim, true),
            Err(Refusal::Drop(DropReason::ConnectionLimit)),
            "two settled: its share"
        );
        assert_eq!(
            limits.check(victim, false),
            Err(Refusal::Drop(DropReason::ConnectionLimit)),
            "and no Retry that would only bring it back to be refused"
        );
        drop((held, others));
        assert!(limits.by_address().is_empty());
    }

    /// Spoofed Initials can fill an address's share of unproven handshakes (before the
    /// load threshold, when no Retry is asked for): its real clients, proven by a Retry,
    /// have a share of their own, which only proven handshakes fill.
    #[test]
    fn handshakes_proven_by_a_retry_have_a_share_apart_from_unproven_ones() {
        let limits = shares(10_000, 1_000, 8, 2);
        let spoofed: Vec<Slot> = (0..2).map(|_| limits.admit(HOST, false).unwrap()).collect();
        assert_eq!(limits.check(HOST, false), Err(Refusal::Retry), "a Retry, not a drop");
        assert_eq!(limits.check(HOST, true), Ok(()));
        let mut proven: Vec<Slot> = (0..2).map(|_| limits.admit(HOST, true).unwrap()).collect();
        refused(&limits, HOST, true, Refusal::Drop(DropReason::HandshakeLimit));
        // Both shares full: no Retry, which would only bring the client back to be refused.
        assert_eq!(
            limits.check(HOST, false),
            Err(Refusal::Drop(DropReason::HandshakeLimit))
        );
        // Each class gives back its own.
        proven.pop();
        assert_eq!(limits.check(HOST, true), Ok(()));
        assert_eq!(limits.check(HOST, false), Err(Refusal::Retry));
        drop((spoofed, proven));
        assert!(limits.by_address().is_empty());
    }

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        assert_eq!((0..20).filter(|_| bucket.take(start)).count(), 5, "the burst");
        let later = start + Duration::from_millis(500);
        assert_eq!(
            (0..20).filter(|_| bucket.take(later)).count(),
            5,
            "half a second at 10/s"
        );
        let much_later = later + Duration::from_secs(60);
        assert_eq!(
            (0..20).filter(|_| bucket.take(much_later)).count(),
            5,
            "never above the burst"
        );
        let mut off = TokenBucket::new(0, 0, start);
        assert!(!off.take(start + Duration::from_secs(1)), "0/0 sends nothing");
    }
}
