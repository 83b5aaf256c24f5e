//! HTTP datagrams (RFC 9297) through the server's handler API and the client's tunnels:
//! both ways on an extended CONNECT, drops counted when a reader falls behind, a stream's
//! flow ending with its stream, and nothing handed out when one side has them off.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use support::h3::{datagram_client, datagram_listener};
use support::*;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower_quiche::RecvBody;
use tower_quiche::datagram::{DatagramStats, Datagrams, SendDatagramError};
use tower_quiche::quic::Listener;
use tower_quiche::tunnel::Tunnel;

/// What the handler saw: its datagrams (None when it got none), to inspect from the test.
type Seen = mpsc::UnboundedSender<Option<Datagrams>>;

/// Serves every request with a tunnel that stays open while the client's side is, and hands
/// the request's datagrams to the test.
async fn serve(listener: Listener, builder: tower_quiche::server::Builder, seen: Seen) -> String {
    let url = format!("https://{}/tunnel", listener.local_addr());
    let service = tower::service_fn(move |mut request: Request<RecvBody>| {
        let seen = seen.clone();
        async move {
            let datagrams = Datagrams::from_request(&mut request);
            let _ = seen.send(datagrams);
            let (mut tunnel, body) = Tunnel::new(request.into_body());
            tokio::spawn(async move {
                // Until the client ends its side; then the response ends too.
                let _ = tokio::io::copy(&mut tunnel, &mut tokio::io::sink()).await;
            });
            Ok::<_, std::convert::Infallible>(Response::new(body))
        }
    });
    tokio::spawn(builder.serve(listener, service).into_future());
    url
}

/// Waits (bounded) until the flow's counters satisfy `done`.
async fn stats_until(read: impl Fn() -> DatagramStats, done: impl Fn(&DatagramStats) -> bool) -> DatagramStats {
    for _ in 0..500 {
        let stats = read();
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    read()
}

/// A client's tunnel to a handler that hands its datagrams to the test, and both ends'
/// datagrams.
struct Pair {
    client: tower_quiche::client::Client,
    url: String,
    tunnel: Tunnel,
    ours: Datagrams,
    theirs: Datagrams,
    seen: mpsc::UnboundedReceiver<Option<Datagrams>>,
}

async fn pair(certs: &Certs, builder: tower_quiche::server::Builder) -> Pair {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let url = serve(datagram_listener(certs, true).await, builder, seen_tx).await;
    let client = datagram_client(certs, true);
    let mut tunnel = client.tunnel(&url, "datagrams").await.unwrap();
    let ours = tunnel.datagrams().expect("the client's datagrams");
    let theirs = seen.recv().await.unwrap().expect("the handler's datagrams");
    Pair {
        client,
        url,
        tunnel,
        ours,
        theirs,
        seen,
    }
}

#[tokio::test]
async fn datagrams_flow_both_ways_on_an_extended_connect() {
    init_tracing();
    let certs = certs();
    timeout(TEST_TIMEOUT, async {
        // The tunnel is kept: the flows live as long as their stream.
        let Pair {
            tunnel: _tunnel,
            mut ours,
            mut theirs,
            ..
        } = pair(&certs, Default::default()).await;
        assert_eq!(ours.stream_id(), theirs.stream_id());
        assert!(ours.max_payload_len().is_some_and(|max| max > 1000));
        // Unreliable, even on loopback in principle: each is sent again until it arrives.
        for i in 0..20u8 {
            let payload = Bytes::from(vec![i; 100 + usize::from(i)]);
            let got = resend_until_received(&ours, &mut theirs, &payload).await;
            assert_eq!(got, payload, "client to server");
            let got = resend_until_received(&theirs, &mut ours, &payload).await;
            assert_eq!(got, payload, "server to client");
        }
        assert!(ours.stats().sent >= 20 && ours.stats().received >= 20);
        assert!(theirs.stats().sent >= 20 && theirs.stats().received >= 20);
        // A payload over the connection's limit is refused before it is queued.
        let max = ours.max_payload_len().unwrap();
        assert_eq!(ours.send(vec![0; max + 1]), Err(SendDatagramError::TooLarge { max }));
    })
    .await
    .expect("test timed out");
}

async fn resend_until_received(from: &Datagrams, to: &mut Datagrams, payload: &Bytes) -> Bytes {
    for _ in 0..10 {
        from.send(payload.clone()).unwrap();
        if let Ok(got) = timeout(Duration::from_millis(500), to.recv()).await {
            return got.expect("the flow is open");
        }
    }
    panic!("a datagram sent 10 times never arrived");
}

#[tokio::test]
async fn a_reader_that_falls_behind_loses_datagrams_and_they_are_counted() {
    init_tracing();
    let certs = certs();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    // Room for 4 datagrams of 100 bytes.
    let builder =
        tower_quiche::server::Builder::new().datagram_buffer(4 * (100 + tower_quiche::datagram::DATAGRAM_COST));
    let url = serve(datagram_listener(&certs, true).await, builder, seen_tx).await;
    timeout(TEST_TIMEOUT, async {
        let client = datagram_client(&certs, true);
        let mut tunnel = client.tunnel(&url, "datagrams").await.unwrap();
        let ours = tunnel.datagrams().unwrap();
        let mut theirs = seen.recv().await.unwrap().unwrap();
        // Wait for the client to know the server takes datagrams, then send 40 in a burst
        // that nobody reads.
        for _ in 0..40 {
            ours.send(vec![1; 100]).unwrap();
        }
        let stats = stats_until(|| theirs.stats(), |s| s.received + s.dropped_incoming >= 40).await;
        assert_eq!(stats.received, 4, "the buffer holds four: {stats:?}");
        assert_eq!(
            stats.dropped_incoming, 36,
            "the rest are dropped and counted: {stats:?}"
        );
        for _ in 0..4 {
            assert_eq!(theirs.recv().await.unwrap().len(), 100);
        }
        // Read: room again.
        ours.send(vec![2; 100]).unwrap();
        let stats = stats_until(|| theirs.stats(), |s| s.received >= 5).await;
        assert_eq!(stats.received, 5);
        assert_eq!(&theirs.recv().await.unwrap()[..], &[2; 100][..]);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_flow_ends_with_its_stream_and_later_datagrams_are_dropped() {
    init_tracing();
    let certs = certs();
    timeout(TEST_TIMEOUT, async {
        let Pair {
            client,
            url,
            mut tunnel,
            ours,
            mut theirs,
            mut seen,
        } = pair(&certs, Default::default()).await;
        let first = ours.stream_id();
        let (sender, _) = ours.split();
        // The client ends its side; the handler's tunnel ends the response: the stream is
        // done both ways, and its flow with it.
        tokio::io::AsyncWriteExt::shutdown(&mut tunnel).await.unwrap();
        drop(tunnel);
        assert_eq!(
            timeout(Duration::from_secs(10), theirs.recv()).await.unwrap(),
            None,
            "the server's flow ends"
        );
        let closed = stats_until(|| sender.stats(), |_| sender.is_closed()).await;
        assert!(sender.is_closed(), "the client's flow ends: {closed:?}");
        assert_eq!(sender.send(&b"late"[..]), Err(SendDatagramError::Closed));
        assert_eq!(sender.stats().dropped_outgoing, 1);
        // The connection carries on: a new stream gets a flow of its own.
        let mut tunnel = client.tunnel(&url, "datagrams").await.unwrap();
        let next = tunnel.datagrams().unwrap();
        let mut theirs = seen.recv().await.unwrap().unwrap();
        assert_ne!(next.stream_id(), first);
        assert_eq!(next.stream_id(), theirs.stream_id());
        let got = resend_until_received(&next, &mut theirs, &Bytes::from_static(b"again")).await;
        assert_eq!(&got[..], b"again");
    })
    .await
    .expect("test timed out");
}

/// Whether the client and the handler get datagrams, on a server whose transport has
/// them, for a CONNECT (`connect`) or a POST.
async fn who_gets_datagrams(
    certs: &Certs,
    server: tower_quiche::server::Builder,
    client_datagrams: bool,
    connect: bool,
) -> (bool, bool) {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let url = serve(datagram_listener(certs, true).await, server, seen_tx).await;
    let client = datagram_client(certs, client_datagrams);
    let client_has = if connect {
        client.tunnel(&url, "datagrams").await.unwrap().datagrams().is_some()
    } else {
        assert!(client.post(&url).body("x").send().await.unwrap().status().is_success());
        false
    };
    (client_has, seen.recv().await.unwrap().is_some())
}

#[tokio::test]
async fn no_datagrams_unless_both_sides_enable_them() {
    init_tracing();
    let certs = certs();
    timeout(TEST_TIMEOUT, async {
        let on = tower_quiche::server::Builder::new;
        assert_eq!(
            who_gets_datagrams(&certs, on(), true, true).await,
            (true, true),
            "both on"
        );
        assert_eq!(
            who_gets_datagrams(&certs, on(), false, true).await,
            (false, false),
            "the client's transport has none"
        );
        // quiche's HTTP/3 layer announces SETTINGS_H3_DATAGRAM whenever the transport has
        // QUIC datagrams, so the client gets a handle; the server's handlers get none, and
        // what the client sends is dropped.
        let off = on().http_datagrams(false);
        assert_eq!(
            who_gets_datagrams(&certs, off, true, true).await,
            (true, false),
            "the server's switch is off"
        );
        assert_eq!(
            who_gets_datagrams(&certs, on(), true, false).await,
            (false, false),
            "ordinary requests never carry them"
        );
    })
    .await
    .expect("test timed out");
}
