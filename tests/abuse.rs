//! Hostile traffic against a QUIC listener and an HTTP/3 server, over loopback. QUIC:
//! floods of Initials, Retry token replay, short connection IDs, version negotiation loops,
//! floods of packets for unknown connections, and connection and queue limits. HTTP/3 (from
//! the scripted client of `support::scripted`): partial request heads beside a stalled
//! body, a client that grants no response credit, a body trickled in one-byte DATA frames,
//! floods of trailer sections at and over the limit, QPACK encoder instructions for a
//! dynamic table the server never offered, and reserved frame and stream types. Every test
//! also checks that an honest client is served meanwhile, and the HTTP/3 ones that live
//! memory stays under a bound derived from the server's limits.
//!
//! This binary counts live heap bytes with its own global allocator, so that a flood can be
//! shown to leave memory bounded. The count is process-wide, so the tests run one at a time
//! ([`serial`]).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::echo;
use support::h3::*;
use support::scripted::{self, *};
use support::*;
use tokio::net::UdpSocket;
use tokio::time::{sleep, timeout};
use tower_quiche::client::ResponseExt;
use tower_quiche::quic::{
    AtomicMetrics, ClientConfigBuilder, Endpoint, Listener, MetricsSnapshot, ServerConfig, TransportConfig,
};
use tower_quiche::server;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (we forward every allocation).
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and the caller guarantees `new_size` is valid.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// Holds the binary's one test slot: memory is counted process-wide.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

const MIB: usize = 1024 * 1024;

/// An honest client that connects and echoes one payload over a fresh connection (a
/// `'static` future, to spawn beside a flood).
fn honest_echo(certs: &Certs, server: SocketAddr) -> impl Future<Output = ()> + Send + 'static {
    let config = client_builder(certs).build().unwrap();
    async move {
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let (app, client) = echo::EchoClient::new();
        let conn = endpoint
            .connect_addr(server, Some("localhost"), app)
            .await
            .expect("the honest client's handshake");
        let sent = pattern(10_000, 3);
        assert!(client.echo(sent.clone()).await.expect("echo") == sent);
        conn.close(0, "done");
        conn.closed().await;
    }
}

/// A raw UDP socket on loopback, to send what no well-behaved client would.
async fn raw_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// A quiche client connection from `local` to `server`, driven by hand.
fn quiche_client(config: &mut quiche::Config, local: SocketAddr, server: SocketAddr) -> quiche::Connection {
    let scid = quiche::ConnectionId::from_vec(random_id(16));
    quiche::connect(Some("localhost"), &scid, local, server, config).unwrap()
}

fn quiche_client_config() -> quiche::Config {
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    config.set_application_protos(&[echo::ALPN.as_bytes()]).unwrap();
    config.verify_peer(false);
    config
}

/// The next datagram `conn` sends.
fn next_datagram(conn: &mut quiche::Connection) -> Vec<u8> {
    let mut buf = [0u8; 1500];
    let (n, _) = conn.send(&mut buf).unwrap();
    buf[..n].to_vec()
}

/// Real client Initials, each the first datagram of its own quiche client connection (so
/// each has a fresh, random 16-byte DCID), as sent from `local` to `server`.
fn client_initials(count: usize, local: SocketAddr, server: SocketAddr) -> Vec<Vec<u8>> {
    let mut config = quiche_client_config();
    (0..count)
        .map(|_| next_datagram(&mut quiche_client(&mut config, local, server)))
        .collect()
}

/// A packet's header, as the server parses it (its connection IDs are 16 bytes).
fn header(packet: &[u8]) -> quiche::Header<'static> {
    quiche::Header::from_slice(&mut packet.to_vec(), 16).unwrap()
}

/// A long-header packet (RFC 9000 §17.2) padded with zeros to `len`: `version` 0 makes it a
/// version negotiation packet; otherwise it is an Initial with `token`, whose payload is
/// garbage (the router decides before anything is decrypted).
fn long_header(version: u32, dcid: &[u8], scid: &[u8], token: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0xc0];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(scid.len() as u8);
    p.extend_from_slice(scid);
    if version != 0 {
        // Token length and packet length as 2-byte varints (RFC 9000 §16).
        p.extend_from_slice(&(0x4000 | token.len() as u16).to_be_bytes());
        p.extend_from_slice(token);
        let rest = len.saturating_sub(p.len() + 2).min(0x3fff);
        p.extend_from_slice(&(0x4000 | rest as u16).to_be_bytes());
    }
    p.resize(len, 0);
    p
}

fn random_id(len: usize) -> Vec<u8> {
    let mut id = vec![0; len];
    boring::rand::rand_bytes(&mut id).unwrap();
    id
}

/// Waits until `done` holds for the server's metrics (bounded; the caller's timeout fails
/// the test if it never does).
async fn until(metrics: &AtomicMetrics, done: impl Fn(&MetricsSnapshot) -> bool) {
    while !done(&metrics.snapshot()) {
        sleep(Duration::from_millis(10)).await;
    }
}

/// Sends an Initial of an unknown version with a marked SCID and waits for its version
/// negotiation. The router answers in order, so once this reply is in, every datagram sent
/// before it has been handled; returns whatever else arrived first.
async fn barrier(raw: &UdpSocket, server: SocketAddr) -> Vec<Vec<u8>> {
    let mark = random_id(8);
    raw.send_to(&long_header(0x1a2a_3a4a, &random_id(8), &mark, &[], 1200), server)
        .await
        .unwrap();
    let mut before = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = raw.recv_from(&mut buf).await.unwrap();
        // A version negotiation packet's DCID is the SCID it answers (RFC 9000 §17.2.1).
        if n > 14 && buf[1..5] == [0; 4] && buf[5] == 8 && buf[6..14] == mark[..] {
            return before;
        }
        before.push(buf[..n].to_vec());
    }
}

/// Handshakes that started and have neither completed nor failed.
fn in_progress(m: &MetricsSnapshot) -> u64 {
    m.handshakes_started - m.handshakes_completed - m.handshakes_failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_flood_stays_under_the_handshake_cap_and_memory_bounded() {
    const CAP: usize = 64;
    const FLOOD: usize = 1000;
    let _serial = serial().await;
    let certs = certs();
    // Without Retry, as a flood from a real address would get past it anyway. The short
    // handshake timeout frees the flood's slots for the honest client within the test.
    let builder = server_builder(&certs)
        .retry(false)
        .max_handshakes_in_progress(CAP)
        .transport(TransportConfig::new().handshake_timeout(Duration::from_secs(2)));
    let server = echo_server("127.0.0.1:0", builder).await;
    let run = async {
        // Warm up what the first connection allocates once (runtime, thread-local buffers).
        honest_echo(&certs, server.addr).await;
        let raw = raw_socket().await;
        let initials = client_initials(FLOOD, raw.local_addr().unwrap(), server.addr);
        let before = live_bytes();
        let mut honest = None;
        let mut peak_growth = 0;
        let mut peak_in_progress = 0;
        for (i, chunk) in initials.chunks(50).enumerate() {
            if i == 2 {
                // An honest client arrives once the flood has taken every handshake slot; it
                // gets in when the flood's handshakes time out and free theirs.
                honest = Some(tokio::spawn(honest_echo(&certs, server.addr)));
            }
            for initial in chunk {
                raw.send_to(initial, server.addr).await.unwrap();
            }
            sleep(Duration::from_millis(2)).await;
            peak_growth = peak_growth.max(live_bytes().saturating_sub(before));
            peak_in_progress = peak_in_progress.max(in_progress(&server.metrics.snapshot()));
        }
        barrier(&raw, server.addr).await;
        peak_growth = peak_growth.max(live_bytes().saturating_sub(before));
        let m = server.metrics.snapshot();
        peak_in_progress = peak_in_progress.max(in_progress(&m));
        eprintln!("flood: {m:?}, peak growth {} KiB", peak_growth / 1024);
        assert!(
            peak_in_progress <= CAP as u64,
            "{peak_in_progress} handshakes at once: {m:?}"
        );
        assert!(m.dropped_handshake_limit >= 1, "{m:?}");
        assert!(peak_growth < 24 * MIB, "live memory grew by {} KiB", peak_growth / 1024);
        honest.expect("spawned").await.unwrap();
        // Every slot the flood took is free again once its handshakes have timed out.
        while in_progress(&server.metrics.snapshot()) > 0 {
            sleep(Duration::from_millis(50)).await;
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// By default a Retry is asked for only under load: an honest client connects in one round
/// trip, and while a quarter of the handshake cap is held by half-open connections, new
/// clients go through a Retry (and still connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_retry_is_asked_for_only_while_handshakes_pile_up() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs).max_handshakes_in_progress(4)).await;
    let run = async {
        honest_echo(&certs, server.addr).await;
        let m = server.metrics.snapshot();
        assert_eq!((m.retries_sent, m.handshakes_completed), (0, 1), "{m:?}");
        // A half-open handshake: one of the cap's 4.
        let raw = raw_socket().await;
        let initial = client_initials(1, raw.local_addr().unwrap(), server.addr);
        raw.send_to(&initial[0], server.addr).await.unwrap();
        until(&server.metrics, |m| in_progress(m) == 1).await;
        honest_echo(&certs, server.addr).await;
        let m = server.metrics.snapshot();
        assert!(m.retries_sent >= 1, "the second client went through a Retry: {m:?}");
        assert_eq!(m.handshakes_completed, 2, "{m:?}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_token_replayed_under_a_fresh_connection_id_is_refused() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs).retry(true)).await;
    let run = async {
        let raw = raw_socket().await;
        let local = raw.local_addr().unwrap();
        // A real client, driven by hand: its first Initial draws a Retry.
        let mut config = quiche_client_config();
        let mut client = quiche_client(&mut config, local, server.addr);
        raw.send_to(&next_datagram(&mut client), server.addr).await.unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = raw.recv_from(&mut buf).await.unwrap();
        let mut retry = buf[..n].to_vec();
        let retry_header = header(&retry);
        assert_eq!(retry_header.ty, quiche::Type::Retry);
        let token = retry_header.token.clone().expect("a Retry carries a token");
        // The client answers as it must: the token, and the Retry's ID as its DCID
        // (RFC 9000 §17.2.5.2). The server takes it.
        let info = quiche::RecvInfo {
            from: server.addr,
            to: local,
        };
        client.recv(&mut retry, info).unwrap();
        let answer = next_datagram(&mut client);
        assert_eq!(header(&answer).dcid, retry_header.scid);
        raw.send_to(&answer, server.addr).await.unwrap();
        until(&server.metrics, |m| m.handshakes_started == 1).await;
        // The same token with fresh connection IDs, as a replaying attacker would send it:
        // each would open a connection if the token were not bound to the Retry's ID.
        const REPLAYS: u64 = 10;
        for _ in 0..REPLAYS {
            let replay = long_header(1, &random_id(16), &random_id(8), &token, 1200);
            raw.send_to(&replay, server.addr).await.unwrap();
        }
        let replies = barrier(&raw, server.addr).await;
        let m = server.metrics.snapshot();
        assert_eq!(m.handshakes_started, 1, "one token, one connection: {m:?}");
        assert_eq!(m.dropped_invalid_token, REPLAYS, "{m:?}");
        assert!(
            replies.iter().all(|p| header(p).ty != quiche::Type::Retry),
            "a replayed token draws no new Retry"
        );
        honest_echo(&certs, server.addr).await;
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A token the server did not mint (a NEW_TOKEN token of another server under the same
/// name) is taken as no token (RFC 9000 §8.1.3): under a policy that asks for a Retry, the
/// client gets one, where it used to be dropped and left to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_with_a_token_from_elsewhere_draws_a_retry() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs).retry(true)).await;
    let run = async {
        let raw = raw_socket().await;
        let scid = random_id(8);
        let initial = long_header(1, &random_id(16), &scid, b"a NEW_TOKEN token of another server", 1200);
        raw.send_to(&initial, server.addr).await.unwrap();
        let replies = barrier(&raw, server.addr).await;
        let retries: Vec<_> = replies
            .iter()
            .map(|p| header(p))
            .filter(|h| h.ty == quiche::Type::Retry)
            .collect();
        assert_eq!(retries.len(), 1, "{replies:?}");
        assert_eq!(retries[0].dcid.as_ref(), &scid[..], "the Retry answers this client");
        let m = server.metrics.snapshot();
        assert_eq!(m.dropped_invalid_token, 0, "{m:?}");
        assert_eq!(m.retries_sent, 1, "{m:?}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initials_with_a_connection_id_shorter_than_8_bytes_are_dropped() {
    let _serial = serial().await;
    let certs = certs();
    // With Retry such an Initial would draw a Retry; without, it would open a connection.
    for retry in [true, false] {
        let server = echo_server("127.0.0.1:0", server_builder(&certs).retry(retry)).await;
        let run = async {
            let raw = raw_socket().await;
            for len in [0, 1, 4, 7] {
                let initial = long_header(1, &random_id(len), &random_id(8), &[], 1200);
                raw.send_to(&initial, server.addr).await.unwrap();
            }
            // Eight bytes are enough.
            let initial = long_header(1, &random_id(8), &random_id(8), &[], 1200);
            raw.send_to(&initial, server.addr).await.unwrap();
            let replies = barrier(&raw, server.addr).await;
            let m = server.metrics.snapshot();
            assert_eq!(m.dropped_short_connection_id, 4, "retry {retry}: {m:?}");
            if retry {
                assert_eq!(replies.len(), 1, "a Retry for the 8-byte ID only: {m:?}");
                assert_eq!(header(&replies[0]).ty, quiche::Type::Retry);
            } else {
                assert!(replies.is_empty());
                assert_eq!(m.handshakes_started, 1, "a connection for the 8-byte ID only: {m:?}");
            }
            honest_echo(&certs, server.addr).await;
        };
        timeout(TEST_TIMEOUT, run).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_negotiation_packet_gets_no_reply() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let run = async {
        let raw = raw_socket().await;
        // Big enough that an unknown version would be answered, and a whole number of
        // 4-byte versions after the 23-byte header, so that it parses.
        let vn = long_header(0, &random_id(8), &random_id(8), &[], 1203);
        for _ in 0..3 {
            raw.send_to(&vn, server.addr).await.unwrap();
        }
        let replies = barrier(&raw, server.addr).await;
        assert!(replies.is_empty(), "{} replies to version negotiation", replies.len());
        let m = server.metrics.snapshot();
        // The router counts a reply just after sending it: the barrier's may not be in yet.
        assert!(m.version_negotiations_sent <= 1, "the barrier's only: {m:?}");
        assert_eq!(m.dropped_unknown_connection, 3, "{m:?}");
        honest_echo(&certs, server.addr).await;
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_packets_draws_no_more_replies_than_the_budget() {
    const RATE: u32 = 50;
    const BURST: u32 = 20;
    const ROUNDS: u64 = 20;
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs).stateless_reply_rate(RATE, BURST)).await;
    let run = async {
        let raw = raw_socket().await;
        let honest = tokio::spawn(honest_echo(&certs, server.addr));
        let started = Instant::now();
        for _ in 0..ROUNDS {
            // Short-header packets for connections nobody has (each would draw a stateless
            // reset), and among them Initials of an unknown version (each would draw version
            // negotiation): one budget covers both.
            for i in 0..100 {
                let packet = if i % 4 == 3 {
                    long_header(0x1a2a_3a4a, &random_id(8), &random_id(8), &[], 1200)
                } else {
                    let mut short = random_id(100);
                    short[0] = 0x40 | (short[0] & 0x3f);
                    short
                };
                raw.send_to(&packet, server.addr).await.unwrap();
            }
            sleep(Duration::from_millis(5)).await;
        }
        // Every flood packet is either answered or refused for lack of budget; wait until the
        // server has handled them all (or a while, should the kernel have dropped some).
        let handled =
            |m: &MetricsSnapshot| m.stateless_resets_sent + m.version_negotiations_sent + m.dropped_rate_limited;
        let _ = timeout(
            Duration::from_secs(3),
            until(&server.metrics, |m| handled(m) >= ROUNDS * 100),
        )
        .await;
        let m = server.metrics.snapshot();
        // The bucket held at most BURST when the flood began and has refilled at RATE since.
        let budget = f64::from(BURST) + f64::from(RATE) * started.elapsed().as_secs_f64();
        let replies = m.stateless_resets_sent + m.version_negotiations_sent;
        eprintln!("{replies} replies, budget {budget:.0}: {m:?}");
        assert!(
            replies as f64 <= budget + 1.0,
            "{replies} replies, budget {budget:.0}: {m:?}"
        );
        assert!(replies >= u64::from(BURST), "the budget is spent on replies: {m:?}");
        assert!(m.stateless_resets_sent > 0 && m.version_negotiations_sent > 0, "{m:?}");
        assert!(m.dropped_rate_limited > 0, "{m:?}");
        honest.await.unwrap();
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A listener whose application does not accept makes no more connections than its
/// backlog holds, even from Initials that arrive together (one receive batch offers its new
/// connections to the backlog only at its end): the others are refused before any state is
/// made, rather than handshakes started and then thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_accept_backlog_starts_no_handshake_it_cannot_hold() {
    const BACKLOG: usize = 2;
    const INITIALS: u64 = 12;
    let _serial = serial().await;
    let certs = certs();
    let metrics = Arc::new(AtomicMetrics::new());
    let config = server_builder(&certs)
        .accept_backlog(BACKLOG)
        .metrics(Arc::clone(&metrics))
        .build()
        .unwrap();
    // Never accepted from.
    let listener = Listener::bind("127.0.0.1:0", config).await.unwrap();
    let run = async {
        let raw = raw_socket().await;
        for initial in client_initials(INITIALS as usize, raw.local_addr().unwrap(), listener.local_addr()) {
            raw.send_to(&initial, listener.local_addr()).await.unwrap();
        }
        until(&metrics, |m| m.handshakes_started + m.dropped_backlog_full >= INITIALS).await;
        let m = metrics.snapshot();
        assert_eq!(
            (m.handshakes_started, m.dropped_backlog_full),
            (BACKLOG as u64, INITIALS - BACKLOG as u64),
            "{m:?}"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A connection waiting in the backlog (the application has not accepted it, so nobody
/// reads its queue) holds a client's first flight, whatever a peer sends to its ID: a
/// backlog of 1,024 such connections is not 1,024 queues at their full bounds (256
/// datagrams, 512 KiB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_in_the_backlog_holds_only_a_first_flight() {
    const SENT: u64 = 80;
    // What such a queue holds (`routes::UNSTARTED_DATAGRAMS`; the Initials here are 1,200
    // bytes, 48 of them within its bytes).
    const FIRST_FLIGHT: u64 = 48;
    let _serial = serial().await;
    let certs = certs();
    let metrics = Arc::new(AtomicMetrics::new());
    let config = server_builder(&certs).metrics(Arc::clone(&metrics)).build().unwrap();
    // Never accepted from.
    let listener = Listener::bind("127.0.0.1:0", config).await.unwrap();
    let run = async {
        let raw = raw_socket().await;
        let initial = client_initials(1, raw.local_addr().unwrap(), listener.local_addr()).remove(0);
        for _ in 0..SENT {
            raw.send_to(&initial, listener.local_addr()).await.unwrap();
        }
        barrier(&raw, listener.local_addr()).await;
        let m = metrics.snapshot();
        assert_eq!(m.handshakes_started, 1, "{m:?}");
        assert_eq!(m.dropped_queue_full, SENT - FIRST_FLIGHT, "{m:?}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// With the backlog full, a new client is not even sent a Retry (which would only bring it
/// back to be refused, and costs the server a token's crypto and a send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_accept_backlog_sends_no_retry() {
    let _serial = serial().await;
    let certs = certs();
    let metrics = Arc::new(AtomicMetrics::new());
    let config = server_builder(&certs)
        .accept_backlog(1)
        .retry(true)
        .metrics(Arc::clone(&metrics))
        .build()
        .unwrap();
    // Never accepted from.
    let listener = Listener::bind("127.0.0.1:0", config).await.unwrap();
    let server = listener.local_addr();
    let run = async {
        // A client through its Retry into the backlog (its handshake then waits there).
        let config = client_builder(&certs).build().unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let waiting = tokio::spawn(async move {
            let (app, _) = echo::EchoClient::new();
            let _ = endpoint.connect_addr(server, Some("localhost"), app).await;
        });
        until(&metrics, |m| m.handshakes_started == 1).await;
        // (The client may have sent its first Initial twice, and drawn two Retries.)
        let retries = metrics.snapshot().retries_sent;
        let raw = raw_socket().await;
        let initial = client_initials(1, raw.local_addr().unwrap(), server);
        raw.send_to(&initial[0], server).await.unwrap();
        until(&metrics, |m| m.dropped_backlog_full + m.retries_sent > retries).await;
        let m = metrics.snapshot();
        assert_eq!((m.retries_sent, m.dropped_backlog_full), (retries, 1), "{m:?}");
        waiting.abort();
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// RFC 9308 §8.1: a server answers nothing that comes from the port of a UDP service that
/// reflects or answers anything (DNS, chargen, memcached, …): a stateless reset there would
/// feed a reflection attack, or a loop of replies with that service that spends the
/// listener's reply budget for good. The same packet from an ordinary port draws its reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_from_ports_of_reflecting_services_are_not_answered() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let run = async {
        // The ports above 1023 need no privilege; one of them is free here.
        let reflecting = [3702, 5355, 1900, 11211, 5353]
            .into_iter()
            .find_map(|port| std::net::UdpSocket::bind(("127.0.0.1", port)).ok())
            .expect("one of the reflecting service ports above 1023 is free");
        reflecting.set_nonblocking(true).unwrap();
        let reflecting = UdpSocket::from_std(reflecting).unwrap();
        // A short-header packet for a connection nobody has: its answer is a reset.
        let mut packet = random_id(100);
        packet[0] = 0x40 | (packet[0] & 0x3f);
        reflecting.send_to(&packet, server.addr).await.unwrap();
        timeout(
            Duration::from_secs(10),
            until(&server.metrics, |m| m.dropped_blocked_source >= 1),
        )
        .await
        .expect("the datagram from the reflecting port is dropped");
        let ordinary = raw_socket().await;
        ordinary.send_to(&packet, server.addr).await.unwrap();
        let mut reply = [0; 1500];
        let (len, _) = timeout(Duration::from_secs(10), ordinary.recv_from(&mut reply))
            .await
            .expect("the ordinary port's packet draws a stateless reset")
            .unwrap();
        assert!(len < packet.len());
        let m = server.metrics.snapshot();
        assert_eq!((m.stateless_resets_sent, m.dropped_blocked_source), (1, 1), "{m:?}");
        assert!(
            reflecting.try_recv_from(&mut reply).is_err(),
            "nothing went to the reflecting port"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_enforced_and_a_closed_connection_frees_its_slot() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs).max_connections(2)).await;
    let run = async {
        let config = client_builder(&certs).build().unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let mut open = Vec::new();
        for _ in 0..2 {
            let (app, client) = echo::EchoClient::new();
            let conn = endpoint
                .connect_addr(server.addr, Some("localhost"), app)
                .await
                .expect("handshake");
            open.push((conn, client));
        }
        // A third is refused while both live: its Initials are dropped and it times out.
        let config = client_builder(&certs)
            .transport(TransportConfig::new().handshake_timeout(Duration::from_millis(1500)))
            .build()
            .unwrap();
        let refused = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let err = refused
            .connect_addr(server.addr, Some("localhost"), echo::EchoClient::new().0)
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        let m = server.metrics.snapshot();
        assert!(m.dropped_connection_limit >= 1, "{m:?}");
        assert_eq!(m.handshakes_started, 2, "{m:?}");
        // The connections already open are unaffected.
        for (_, client) in &open {
            let sent = pattern(5000, 1);
            assert!(client.echo(sent.clone()).await.expect("echo") == sent);
        }
        // Closing one frees its slot for the next client.
        let (first, _) = open.remove(0);
        first.close(0, "done");
        first.closed().await;
        honest_echo(&certs, server.addr).await;
        let m = server.metrics.snapshot();
        assert_eq!(m.handshakes_started, 3, "{m:?}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_inbound_queue_is_bounded_in_bytes() {
    const JUMBO: usize = 60_000;
    const FLOOD: usize = 300;
    let _serial = serial().await;
    let certs = certs();
    let metrics = Arc::new(AtomicMetrics::new());
    let config = server_builder(&certs)
        .retry(false)
        .metrics(Arc::clone(&metrics))
        .build()
        .unwrap();
    let mut listener = Listener::bind("127.0.0.1:0", config).await.unwrap();
    let addr = listener.local_addr();
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // The first connection is accepted but never started: nothing drains its queue.
        let _stalled = listener.accept().await;
        let _ = stalled_tx.send(());
        while let Some(incoming) = listener.accept().await {
            incoming.start(echo::EchoServer::new());
        }
    });
    let run = async {
        let raw = raw_socket().await;
        let initial = client_initials(1, raw.local_addr().unwrap(), addr).remove(0);
        let dcid = header(&initial).dcid.to_vec();
        raw.send_to(&initial, addr).await.unwrap();
        stalled_rx.await.unwrap();
        let honest = tokio::spawn(honest_echo(&certs, addr));
        let before = live_bytes();
        // Jumbo datagrams for the stalled connection: before the byte bound, its queue took
        // 255 of them (15 MB). Paced, so that the kernel's socket buffer does not drop them.
        for _ in 0..FLOOD {
            let jumbo = long_header(1, &dcid, &random_id(8), &[], JUMBO);
            raw.send_to(&jumbo, addr).await.unwrap();
            sleep(Duration::from_millis(1)).await;
        }
        barrier(&raw, addr).await;
        let growth = live_bytes().saturating_sub(before);
        let m = metrics.snapshot();
        eprintln!("queue flood: grew {} KiB: {m:?}", growth / 1024);
        assert!(m.dropped_queue_full >= 100, "{m:?}");
        assert!(growth < 4 * MIB, "live memory grew by {} KiB", growth / 1024);
        honest.await.unwrap();
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

// ---- HTTP/3 ----

/// The per-stream flow-control window of the HTTP/3 servers below, pinned (quiche does not
/// grow it): quiche holds at most this much unread data of one stream, and the attacking
/// client at most this much unacknowledged, which the memory bounds count on.
const WINDOW: usize = 256 * 1024;

/// What a request stream costs beside the buffers a bound names: quiche's stream state on
/// both ends, the request with its handler's future, the crate's stream state. (A request
/// in flight with a small response measured about 4 KiB; this allows four times that.)
const STREAM_STATE: usize = 16 * 1024;

/// What every test costs beside its attack: the honest request in flight, and the
/// runtime's and the connections' bookkeeping.
const BASE: usize = MIB;

/// The server's hard limit on a field section with its default `max_header_list_size`
/// (16 KiB): four times that, at least 64 KiB.
const HARD_FIELD_SECTION: usize = 64 * 1024;

/// The server's default `response_body_buffer` and `request_body_buffer`.
const BODY_BUFFER: usize = 64 * 1024;

/// A server with pinned windows and the test routes, an honest client with a connection to
/// it already, and a scripted attacker connected to it.
struct H3Attack {
    server: H3Server,
    honest: tower_quiche::client::Client,
    attacker: scripted::Client,
    /// Live bytes once all of that was set up, and the highest count since.
    before: usize,
    peak: Peak,
}

impl H3Attack {
    /// An attacker that `listens` has had one answer (and so the server's SETTINGS) before
    /// this returns; one that does not never reads a byte.
    async fn start(certs: &Certs, builder: server::Builder, attacker: ClientConfigBuilder, listens: bool) -> H3Attack {
        let quic = ServerConfig::builder().transport(
            TransportConfig::new()
                .initial_max_stream_data(WINDOW as u64)
                .max_windows(24 * MIB as u64, WINDOW as u64),
        );
        let server = h3_test_server_on(certs, quic, builder).await;
        let honest = client(certs);
        let mut attacker = scripted::Client::connect_with(server.addr, attacker, listens).await;
        if listens {
            let id = attacker.request(&head("GET", "/hello"), true).await;
            assert_eq!(attacker.response(id).await.0, 200);
        }
        // Warms up what the first request allocates once (the honest connection, buffers).
        honest_get(honest.clone(), server.url("/hello")).await;
        H3Attack {
            server,
            honest,
            attacker,
            before: live_bytes(),
            peak: Peak::start(),
        }
    }

    /// How far live memory rose above what the setup left.
    fn growth(&self) -> usize {
        self.peak.growth(self.before)
    }

    /// An honest request on a connection of its own (a `'static` future, to spawn beside
    /// an attack).
    fn honest_get(&self) -> impl Future<Output = ()> + Send + 'static {
        honest_get(self.honest.clone(), self.server.url("/hello"))
    }

    /// The server's limit on a field section, as it advertises it (SETTINGS_MAX_FIELD_SECTION_SIZE),
    /// or 1 MiB if it advertises none (no limit): what an attacker would send.
    async fn field_section_limit(&self) -> usize {
        let limit = self.attacker.peer_setting(SETTINGS_MAX_FIELD_SECTION_SIZE).await;
        limit.map_or(MIB, |l| l as usize)
    }
}

async fn honest_get(client: tower_quiche::client::Client, url: String) {
    let response = client.get(url).send().await.expect("the honest request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "hello world");
}

/// The highest live heap count seen since it started, sampled every millisecond on a task
/// of its own: an attack's peak may fall between the test's steps.
struct Peak {
    peak: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Peak {
    fn start() -> Peak {
        let peak = Arc::new(AtomicUsize::new(live_bytes()));
        let sampled = Arc::clone(&peak);
        let task = tokio::spawn(async move {
            loop {
                sampled.fetch_max(live_bytes(), Ordering::Relaxed);
                sleep(Duration::from_millis(1)).await;
            }
        });
        Peak { peak, task }
    }

    /// How far above `before` the count went.
    fn growth(&self, before: usize) -> usize {
        let peak = self.peak.load(Ordering::Relaxed).max(live_bytes());
        peak.saturating_sub(before)
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn assert_bounded(what: &str, growth: usize, bound: usize) {
    eprintln!(
        "{what}: live memory grew by {} KiB (bound {} KiB)",
        growth / 1024,
        bound / 1024
    );
    assert!(
        growth < bound,
        "{what}: live memory grew by {} KiB, bound {} KiB",
        growth / 1024,
        bound / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_request_heads_beside_a_stalled_body_are_cut_off_and_memory_bounded() {
    // With the request whose body stalls, the server's 128 concurrent request streams.
    const PARTIAL: usize = 127;
    let _serial = serial().await;
    let certs = certs();
    // The stall timeout outlasts the test: the stalled request stays in flight throughout.
    let builder = server::Builder::new()
        .request_head_timeout(Duration::from_secs(2))
        .body_stall_timeout(TEST_TIMEOUT);
    let run = async {
        let mut a = H3Attack::start(&certs, builder, scripted::Client::config(&certs), true).await;
        let mut pairs = head("POST", "/sink");
        pairs.push(("content-length", "1000"));
        let stalled = a.attacker.request(&pairs, false).await;
        a.attacker.body(stalled, vec![b'x'; 10], false).await;
        // The worst the server allows: a HEADERS frame as large as quiche takes for the
        // advertised limit (half as large again: Huffman coding may inflate a section),
        // all of it sent but its last byte.
        let limit = a.field_section_limit().await;
        let promised = limit + limit / 2;
        let partial = Bytes::from([frame_header(HEADERS, promised), vec![0; promised - 1]].concat());
        let mut ids = Vec::new();
        for _ in 0..PARTIAL {
            let id = a.attacker.next_request_id();
            a.attacker
                .send_raw(id, partial.clone(), false)
                .await
                .expect("a partial head");
            ids.push(id);
        }
        a.honest_get().await;
        for &id in &ids {
            let reset = a.attacker.reset_code(id, TEST_TIMEOUT).await;
            assert_eq!(reset, Some(H3_REQUEST_REJECTED), "partial head on stream {id}");
        }
        // Each partial head is held in a buffer that grows by doubling (less than twice
        // what arrived) on the server, and in the client's send buffer until acknowledged:
        // three times the largest frame the documented limit lets through, per stream.
        let largest = HARD_FIELD_SECTION + HARD_FIELD_SECTION / 2;
        let bound = PARTIAL * (3 * largest + STREAM_STATE) + BASE;
        assert_bounded("partial heads", a.growth(), bound);
        // The stalled request was in flight throughout, untouched: it completes.
        assert_eq!(a.attacker.reset_code(stalled, Duration::ZERO).await, None);
        a.attacker.body(stalled, vec![b'y'; 990], true).await;
        assert_eq!(a.attacker.response_body(stalled).await, (200, b"1000".to_vec()));
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_a_client_gives_no_credit_for_are_not_produced_ahead() {
    const STREAMS: usize = 64;
    const RESPONSE: usize = MIB;
    const CREDIT: usize = 1024;
    /// The chunk the `/fresh` route's body yields at a time.
    const CHUNK: usize = 16 * 1024;
    let _serial = serial().await;
    let certs = certs();
    let builder = server::Builder::new().body_stall_timeout(Duration::from_secs(2));
    // A client that grants each stream 1 KiB and never reads a byte of it.
    let attacker = scripted::Client::config_with(&certs, |t| t.initial_max_stream_data(CREDIT as u64));
    let run = async {
        let mut a = H3Attack::start(&certs, builder, attacker, false).await;
        let path = format!("/fresh/{RESPONSE}");
        let mut ids = Vec::new();
        for _ in 0..STREAMS {
            ids.push(a.attacker.request(&head("GET", &path), true).await);
        }
        a.honest_get().await;
        // No progress for the stall timeout while the client owes credit: each stream is
        // reset with H3_REQUEST_CANCELLED.
        for &id in &ids {
            let reset = a.attacker.reset_code(id, TEST_TIMEOUT).await;
            assert_eq!(reset, Some(H3_REQUEST_CANCELLED), "stream {id}");
        }
        // A body is polled while the outbox holds less than the response buffer, one chunk
        // at a time, and quiche takes what the credit allows.
        let produced_per_stream = BODY_BUFFER + CREDIT + CHUNK;
        let produced = a.server.probe.produced.load(Ordering::Relaxed) as usize;
        assert!(
            produced <= STREAMS * produced_per_stream,
            "{produced} bytes produced, at most {} expected",
            STREAMS * produced_per_stream
        );
        // Per stream: what was produced, held in the outbox (its first chunk whole until all
        // of it is sent), the route's 16 KiB template chunk, and the credit's worth in each
        // end's quiche.
        let per_stream = produced_per_stream + CHUNK + CHUNK + 2 * CREDIT + STREAM_STATE;
        let bound = STREAMS * per_stream + BASE;
        assert_bounded("zero credit", a.growth(), bound);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_in_one_byte_frames_costs_bytes_not_frames() {
    const BODY: usize = 64 * 1024;
    /// One-byte DATA frames per write (192 bytes on the wire, one packet): a millisecond
    /// apart, each write leaves in a packet of its own, and the server reads the body in
    /// about as many pieces as there are writes.
    const PER_WRITE: usize = 64;
    const WRITES: usize = BODY / PER_WRITE;
    let _serial = serial().await;
    let certs = certs();
    let run = async {
        let mut a = H3Attack::start(&certs, server::Builder::new(), scripted::Client::config(&certs), true).await;
        let body = pattern(BODY, 5);
        let len = BODY.to_string();
        let mut pairs = head("POST", "/digest");
        pairs.push(("content-length", &len));
        let id = a.attacker.request(&pairs, false).await;
        let mut honest = None;
        for (i, part) in body.chunks(PER_WRITE).enumerate() {
            let frames: Vec<u8> = part.iter().flat_map(|b| frame(DATA, &[*b])).collect();
            let last = (i + 1) * PER_WRITE >= BODY;
            a.attacker.send_raw(id, frames, last).await.expect("the body");
            sleep(Duration::from_millis(1)).await;
            if i == WRITES / 2 {
                honest = Some(tokio::spawn(a.honest_get()));
            }
        }
        let (status, answer) = a.attacker.response_body(id).await;
        assert_eq!(status, 200);
        let expected = format!("{BODY} {}", hex(&boring::sha::sha256(&body)));
        assert_eq!(
            String::from_utf8_lossy(&answer),
            expected,
            "the handler got the body whole"
        );
        honest.expect("spawned").await.unwrap();
        // The server's buffer (its limit counts 64 bytes per chunk); the handler's collected
        // body: the bytes, and at most 64 bytes of list per chunk, where a chunk is what the
        // server found to read when it ran, a write's packet at least, but for a packet
        // split between two reads: two chunks per write; the copy the handler makes of the
        // bytes; and the frames' wire bytes (three per body byte) in the client's send and
        // the server's receive buffers.
        let chunks = 2 * WRITES;
        let bound = BODY_BUFFER + (BODY + 64 * chunks) + BODY + 2 * 3 * BODY + STREAM_STATE + BASE;
        assert_bounded("trickled body", a.growth(), bound);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_trailer_sections_at_and_over_the_limit_is_judged_and_memory_bounded() {
    const STREAMS: usize = 100;
    /// The server's default `max_header_list_size`.
    const LIMIT: usize = 16 * 1024;
    let _serial = serial().await;
    let certs = certs();
    let run = async {
        let mut a = H3Attack::start(&certs, server::Builder::new(), scripted::Client::config(&certs), true).await;
        // Half the streams send a trailer section of exactly the limit (RFC 9114 §4.2.2
        // counting: name, value and 32 bytes); the others one as large as the server
        // decodes at all, as it advertises it.
        let largest = a.field_section_limit().await;
        let section = |size: usize| "v".repeat(size - "x-big".len() - 32);
        let (at_limit, over) = (section(LIMIT), section(largest));
        let mut ids = Vec::new();
        for i in 0..STREAMS {
            // /sink answers the body's length and drops the trailers: a route that echoed
            // them in its head would test the response path (a head larger than quiche's
            // send capacity waits for it forever).
            let id = a.attacker.request(&head("POST", "/sink"), false).await;
            a.attacker.body(id, b"abc".to_vec(), false).await;
            let value = if i % 2 == 0 { &at_limit } else { &over };
            a.attacker.trailers(id, &[("x-big", value)], true).await;
            ids.push(id);
            if i == STREAMS / 2 {
                a.honest_get().await;
            }
        }
        for (i, &id) in ids.iter().enumerate() {
            let expected = if i % 2 == 0 {
                Seen::Status(200)
            } else {
                // A malformed message (RFC 9114 §4.1.2).
                Seen::Reset(H3_MESSAGE_ERROR)
            };
            assert_eq!(a.attacker.outcome(id).await, expected, "stream {id}");
        }
        // Per stream, a section of the largest size at most: encoded in the client's send
        // buffer and in quiche's frame buffer on the server (which grows by doubling: twice
        // it), decoded by quiche, and as the handler's trailers: five times it.
        let bound = STREAMS * (5 * HARD_FIELD_SECTION + STREAM_STATE) + BASE;
        assert_bounded("trailers flood", a.growth(), bound);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A QPACK prefixed integer (RFC 9204 §4.1.1): `first`'s high bits, `v` in the low
/// `prefix` bits and continuation bytes.
fn qpack_int(first: u8, prefix: u32, v: usize) -> Vec<u8> {
    let max = (1usize << prefix) - 1;
    if v < max {
        return vec![first | v as u8];
    }
    let mut out = vec![first | max as u8];
    let mut rest = v - max;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qpack_encoder_instructions_for_a_table_the_server_never_offered_are_discarded() {
    const FLOOD: usize = 8 * MIB;
    let _serial = serial().await;
    let certs = certs();
    let run = async {
        let mut a = H3Attack::start(&certs, server::Builder::new(), scripted::Client::config(&certs), true).await;
        // The server offers no dynamic table (no SETTINGS_QPACK_MAX_TABLE_CAPACITY, so 0);
        // the client sets a capacity of 4096 anyway and inserts entries, over and over:
        // Set Dynamic Table Capacity (001, 5-bit prefix), Insert With Literal Name (01, no
        // Huffman, 5-bit name length; no Huffman, 7-bit value length).
        let value = vec![b'v'; 1000];
        let insert = [
            qpack_int(0x40, 5, 6),
            b"x-name".to_vec(),
            qpack_int(0, 7, value.len()),
            value,
        ]
        .concat();
        let round: Vec<u8> = [qpack_int(0x20, 5, 4096), insert.repeat(64)].concat();
        let mut honest = None;
        for i in 0..FLOOD / round.len() {
            a.attacker
                .send_raw(CLIENT_QPACK_ENCODER_STREAM, round.clone(), false)
                .await
                .expect("the encoder stream takes it");
            if i == FLOOD / round.len() / 2 {
                honest = Some(tokio::spawn(a.honest_get()));
            }
        }
        honest.expect("spawned").await.unwrap();
        // RFC 9204 §4.3.1 makes a capacity above the advertised one a connection error of
        // type QPACK_ENCODER_STREAM_ERROR; quiche, which never uses a dynamic table, does
        // not parse the encoder stream: it reads and discards it (h3/mod.rs,
        // State::QpackInstruction). The connection goes on serving.
        let id = a.attacker.request(&head("GET", "/hello"), true).await;
        assert_eq!(a.attacker.response(id).await, (200, 11));
        assert!(!a.attacker.conn.is_closed(), "the connection is open");
        // What is in flight on the encoder stream: a window's worth unacknowledged in the
        // client, a window's worth unread in the server.
        let bound = 2 * WINDOW + STREAM_STATE + BASE;
        assert_bounded("QPACK encoder flood", a.growth(), bound);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_frame_and_stream_types_are_ignored_and_memory_bounded() {
    /// The payload of each reserved frame, and how many each flood sends.
    const PAYLOAD: usize = 256 * 1024;
    const FRAMES: usize = 32;
    /// The server's default limit of unidirectional streams (three of them the client's
    /// control and QPACK streams).
    const UNI_LIMIT: usize = 16;
    let _serial = serial().await;
    let certs = certs();
    let run = async {
        let mut a = H3Attack::start(&certs, server::Builder::new(), scripted::Client::config(&certs), true).await;
        let reserved = |n: usize| Bytes::from(frame(reserved_type(n as u64), &vec![n as u8; PAYLOAD]));
        // On a request stream: before the head, between DATA frames, after the last one
        // (RFC 9114 §7.2.8: ignored wherever they stand). /sink answers the DATA bytes.
        let id = a.attacker.next_request_id();
        a.attacker.send_raw(id, reserved(0), false).await.unwrap();
        a.attacker
            .send_raw(id, headers_frame(&head("POST", "/sink")), false)
            .await
            .unwrap();
        for n in 1..FRAMES {
            a.attacker.send_raw(id, reserved(n), false).await.unwrap();
            a.attacker.send_raw(id, frame(DATA, b"abc"), false).await.unwrap();
        }
        a.attacker.send_raw(id, reserved(FRAMES), true).await.unwrap();
        let data = 3 * (FRAMES - 1);
        assert_eq!(a.attacker.response_body(id).await, (200, data.to_string().into_bytes()));
        // On the control stream, after the client's SETTINGS: ignored too.
        let honest = tokio::spawn(a.honest_get());
        for n in 0..FRAMES {
            a.attacker
                .send_raw(CLIENT_CONTROL_STREAM, reserved(n), false)
                .await
                .unwrap();
        }
        honest.await.unwrap();
        // Unidirectional streams of reserved types (RFC 9114 §6.2.3), each with a payload,
        // as many as the server allows: quiche stops reading each (STOP_SENDING), which the
        // RFC allows. (It does not give the stream credit back once the client has reset
        // them in answer: the client cannot open more than the server's limit over the
        // connection's life.)
        let mut ids = Vec::new();
        loop {
            match a.attacker.open_uni(reserved_type(100 + ids.len() as u64)).await {
                Ok(id) => {
                    ids.push(id);
                    match a.attacker.send_raw(id, vec![1; PAYLOAD], false).await {
                        Ok(()) | Err(quiche::Error::StreamStopped(_)) => {}
                        Err(e) => panic!("uni stream {id}: {e:?}"),
                    }
                }
                Err(quiche::Error::StreamLimit) => break,
                Err(e) => panic!("opening a uni stream: {e:?}"),
            }
        }
        assert!(!ids.is_empty(), "the server allows unidirectional streams");
        for &id in &ids {
            let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
            loop {
                // Stopped, or already forgotten: without a FIN from us, only the reset that
                // answers STOP_SENDING completes the stream.
                let stopped = a
                    .attacker
                    .run(move |_, conn| {
                        matches!(
                            conn.stream_capacity(id),
                            Err(quiche::Error::StreamStopped(_) | quiche::Error::InvalidStreamState(_))
                        )
                    })
                    .await;
                if stopped {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "uni stream {id} stopped in time"
                );
                sleep(Duration::from_millis(10)).await;
            }
        }
        // The connection is still up and serving.
        let id = a.attacker.request(&head("GET", "/hello"), true).await;
        assert_eq!(a.attacker.response(id).await, (200, 11));
        a.honest_get().await;
        // quiche discards what it ignores: at most a window's worth unread per stream on the
        // server and unacknowledged in the client, for the request, control and as many uni
        // streams as the server allows.
        let bound = (2 + UNI_LIMIT) * (2 * WINDOW + STREAM_STATE) + BASE;
        assert_bounded("reserved types", a.growth(), bound);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A listener bound to two addresses that share a configured stateless reset key: a
/// packet for a live connection of one address, sent to the other, draws no reset (which
/// would carry the live connection's token: whoever sees its ID could then end it, RFC
/// 9000 §10.3.2), while a packet for an unknown connection still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_connections_id_sent_to_another_address_draws_no_reset() {
    let _serial = serial().await;
    let certs = certs();
    let metrics = Arc::new(AtomicMetrics::new());
    let config = server_builder(&certs)
        .stateless_reset_key([9; 32])
        .metrics(Arc::clone(&metrics))
        .build()
        .unwrap();
    let addrs = ["127.0.0.1:0".parse().unwrap(), "127.0.0.2:0".parse().unwrap()];
    let mut listener = Listener::bind_all(&addrs, config).await.unwrap();
    let (home, other) = (listener.local_addrs()[0], listener.local_addrs()[1]);
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = listener.accept().await {
            let _ = accepted_tx.send(incoming.start(echo::EchoServer::new()));
        }
    });
    let run = async {
        let endpoint =
            Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
        let client = endpoint
            .connect_addr(home, Some("localhost"), echo::EchoClient::new().0)
            .await
            .unwrap();
        let server_side = accepted.recv().await.unwrap();
        server_side.established().await.unwrap();
        // The server's ID of the connection: quiche's trace ID is its hex.
        let hex = server_side.trace_id();
        let id: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let short_packet = |dcid: &[u8]| {
            let mut packet = vec![0x40];
            packet.extend_from_slice(dcid);
            packet.extend_from_slice(&random_id(60));
            packet
        };
        let raw = raw_socket().await;
        raw.send_to(&short_packet(&id), other).await.unwrap();
        timeout(
            Duration::from_secs(10),
            until(&metrics, |m| m.dropped_unknown_connection >= 1),
        )
        .await
        .expect("the live connection's ID is dropped at the other address");
        raw.send_to(&short_packet(&random_id(id.len())), other).await.unwrap();
        timeout(
            Duration::from_secs(10),
            until(&metrics, |m| m.stateless_resets_sent >= 1),
        )
        .await
        .expect("an unknown ID draws a reset");
        assert_eq!(
            metrics.snapshot().stateless_resets_sent,
            1,
            "one reset: for the unknown ID only"
        );
        client.close(0, "done");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Spoofed Initials that claim a victim's address (here: never answered, from its IP) fill
/// its share of the half-open handshakes, and load the listener. The victim's real client
/// is then not dropped: a Retry proves its address, and proven handshakes have a share of
/// their own (dropped, it would wait until the spoofed handshakes timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_initials_do_not_lock_their_victims_address_out() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server(
        "127.0.0.1:0",
        server_builder(&certs)
            .max_handshakes_in_progress(8)
            .max_handshakes_in_progress_per_address(2)
            .transport(TransportConfig::default().handshake_timeout(Duration::from_secs(120))),
    )
    .await;
    let run = async {
        // Two half-open handshakes from the victim's IP (another port): its share, and the
        // listener's load threshold (a quarter of 8).
        let raw = raw_socket().await;
        for initial in client_initials(2, raw.local_addr().unwrap(), server.addr) {
            raw.send_to(&initial, server.addr).await.unwrap();
        }
        until(&server.metrics, |m| m.handshakes_started >= 2).await;
        assert_eq!(
            server.metrics.snapshot().retries_sent,
            0,
            "no Retry yet: not loaded then"
        );
        timeout(Duration::from_secs(20), honest_echo(&certs, server.addr))
            .await
            .expect("the victim's client connects, through a Retry");
        assert!(server.metrics.snapshot().retries_sent >= 1);
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// One client address cannot take every connection slot: once at most a quarter of them
/// are free, its new connections are refused, while another address still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection_slot() {
    let _serial = serial().await;
    let certs = certs();
    let server = echo_server(
        "127.0.0.1:0",
        server_builder(&certs).max_connections(8).max_connections_per_address(2),
    )
    .await;
    let run = async {
        let connect = |from: &str| {
            let config = client_builder(&certs)
                .transport(TransportConfig::default().handshake_timeout(Duration::from_secs(2)))
                .build()
                .unwrap();
            let endpoint = Endpoint::client_bound(from.parse().unwrap(), config).unwrap();
            let addr = server.addr;
            async move {
                let conn = endpoint
                    .connect_addr(addr, Some("localhost"), echo::EchoClient::new().0)
                    .await;
                (endpoint, conn)
            }
        };
        // Five of eight slots: the sixth would leave a quarter free.
        let mut held = Vec::new();
        for _ in 0..5 {
            let (endpoint, conn) = connect("127.0.0.1:0").await;
            held.push((
                endpoint,
                conn.expect("room for this address while the listener has room"),
            ));
        }
        let (_endpoint, refused) = connect("127.0.0.1:0").await;
        assert!(refused.is_err(), "past its share once slots run short");
        assert!(server.metrics.snapshot().dropped_connection_limit >= 1);
        let (_other_endpoint, other) = connect("127.0.0.2:0").await;
        other.expect("another address still connects");
        for (_, conn) in &held {
            conn.close(0, "done");
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}
