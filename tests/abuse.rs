//! Hostile traffic against a QUIC listener, over loopback: floods of Initials, Retry token
//! replay, short connection IDs, version negotiation loops, floods of packets for unknown
//! connections, and connection and queue limits. Every test also checks that an honest
//! client is served meanwhile.
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

use support::*;
use tokio::net::UdpSocket;
use tokio::time::{sleep, timeout};
use tower_quiche::quic::{AtomicMetrics, Endpoint, Listener, MetricsSnapshot, echo};

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
        .handshake_timeout(Duration::from_secs(2));
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
            .handshake_timeout(Duration::from_millis(1500))
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
    let mut listener = Listener::bind("127.0.0.1:0".parse().unwrap(), config).await.unwrap();
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
