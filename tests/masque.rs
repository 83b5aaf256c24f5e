//! The `masque` example's CONNECT-UDP proxy (RFC 9298): UDP through it to an echo socket
//! on loopback and back, over HTTP datagrams and over DATAGRAM capsules; a target outside
//! the allow-list answered 403; a malformed capsule stream reset with H3_MESSAGE_ERROR.

mod support;

#[path = "../examples/support/masque.rs"]
mod masque;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request};
use support::h3::{datagram_client, datagram_listener};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tower_quiche::capsule::{CAPSULE_PROTOCOL, Capsule, CapsuleDecoder, capsule_protocol_value};
use tower_quiche::client::{Client, Protocol};
use tower_quiche::codes;
use tower_quiche::tunnel::Tunnel;

/// A UDP socket on loopback that sends every datagram back, for `count` datagrams at most.
async fn udp_echo(count: usize) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0; 65_536];
        for _ in 0..count {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

async fn proxy(certs: &Certs) -> SocketAddr {
    proxy_with(certs, masque::Settings::default()).await
}

async fn proxy_with(certs: &Certs, settings: masque::Settings) -> SocketAddr {
    let listener = datagram_listener(certs, true).await;
    let addr = listener.local_addr();
    tokio::spawn(tower_quiche::server::serve(listener, masque::service(settings)).into_future());
    addr
}

async fn connect_udp(client: &Client, proxy: SocketAddr, target: &str) -> Result<Tunnel, tower_quiche::Error> {
    let (host, port) = target.rsplit_once(':').unwrap();
    let host = host.replace(':', "%3A").replace(['[', ']'], "");
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://{proxy}{}{host}/{port}/", masque::TEMPLATE_PREFIX))
        .header(CAPSULE_PROTOCOL, capsule_protocol_value())
        .body(())
        .unwrap();
    request.extensions_mut().insert(Protocol::new("connect-udp"));
    client.open_tunnel(request).await
}

/// Context ID 0, then the UDP payload (RFC 9298 §5).
fn with_context_zero(udp: &[u8]) -> Bytes {
    let mut out = vec![0];
    out.extend_from_slice(udp);
    Bytes::from(out)
}

#[tokio::test]
async fn udp_datagrams_are_echoed_through_the_proxy() {
    init_tracing();
    let certs = certs();
    let echo = udp_echo(1000).await;
    let proxy = proxy(&certs).await;
    timeout(TEST_TIMEOUT, async {
        let client = datagram_client(&certs, true);
        let mut tunnel = connect_udp(&client, proxy, &echo.to_string()).await.unwrap();
        let mut datagrams = tunnel.datagrams().expect("HTTP datagrams on both sides");
        for i in 0..50u16 {
            let udp = format!("datagram {i} {}", "x".repeat(usize::from(i) * 10));
            let mut back = None;
            // UDP: each is sent again (at most 10 times) until its echo arrives. A late
            // echo of an earlier, shorter datagram (sent again, then both echoed) is
            // passed over.
            for _ in 0..10 {
                datagrams.send(with_context_zero(udp.as_bytes())).unwrap();
                let echo = timeout(Duration::from_millis(500), async {
                    loop {
                        match datagrams.recv().await {
                            Some(got) if got.len() <= udp.len() => continue,
                            got => return got,
                        }
                    }
                });
                if let Ok(got) = echo.await {
                    back = got;
                    break;
                }
            }
            let back = back.expect("an echo");
            let (context, payload) = masque::split_context_id(&back).unwrap();
            assert_eq!(context, 0);
            assert_eq!(payload, udp.as_bytes());
        }
        // Another context ID is not UDP: the proxy drops it, nothing comes back. (Late
        // echoes of the rounds above, "datagram ..." all, are passed over.)
        datagrams.send(Bytes::from_static(b"\x02not udp")).unwrap();
        datagrams.send(with_context_zero(b"after")).unwrap();
        let back = timeout(Duration::from_secs(5), async {
            loop {
                let got = datagrams.recv().await.unwrap();
                if !got.starts_with(b"\0datagram ") {
                    return got;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(&back[..], b"\0after");
        assert_eq!(datagrams.stats().dropped_incoming, 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn without_quic_datagrams_capsules_carry_them() {
    init_tracing();
    let certs = certs();
    let echo = udp_echo(100).await;
    let proxy = proxy(&certs).await;
    timeout(TEST_TIMEOUT, async {
        let client = datagram_client(&certs, false);
        let mut tunnel = connect_udp(&client, proxy, &echo.to_string()).await.unwrap();
        assert!(tunnel.datagrams().is_none());
        let mut decoder = CapsuleDecoder::new();
        let mut pending = BytesMut::new();
        for i in 0..5u8 {
            let udp = vec![i; 300];
            // An unknown capsule type first: the proxy skips it.
            let mut out = BytesMut::new();
            out.extend_from_slice(&[0x17, 3, 1, 2, 3]);
            Capsule::Datagram(with_context_zero(&udp)).encode(&mut out);
            tunnel.write_all(&out).await.unwrap();
            tunnel.flush().await.unwrap();
            let capsule = loop {
                if let Some(capsule) = decoder.decode(&mut pending).unwrap() {
                    break capsule;
                }
                let mut buf = [0; 4096];
                let n = tunnel.read(&mut buf).await.unwrap();
                assert!(n > 0, "the proxy ended the tunnel");
                pending.extend_from_slice(&buf[..n]);
            };
            let Capsule::Datagram(back) = capsule else {
                unreachable!()
            };
            assert_eq!(&back[..], &with_context_zero(&udp)[..]);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_malformed_capsule_stream_resets_the_tunnel_with_h3_message_error() {
    init_tracing();
    let certs = certs();
    let echo = udp_echo(10).await;
    let proxy = proxy(&certs).await;
    timeout(TEST_TIMEOUT, async {
        let client = datagram_client(&certs, true);
        let mut tunnel = connect_udp(&client, proxy, &echo.to_string()).await.unwrap();
        // A DATAGRAM capsule announcing 10 bytes, 2 sent, then the end of the stream.
        tunnel.write_all(&[0x00, 10, 0, 1]).await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let error = tunnel.read_to_end(&mut rest).await.unwrap_err();
        let error = tower_quiche::Error::from_io(&error).expect("a stream error");
        assert_eq!(
            error.code(),
            Some(tower_quiche::Code::Stream(codes::H3_MESSAGE_ERROR)),
            "{error}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn targets_outside_the_allow_list_get_403_and_bad_paths_4xx() {
    init_tracing();
    let certs = certs();
    let proxy = proxy(&certs).await;
    timeout(TEST_TIMEOUT, async {
        let client = datagram_client(&certs, true);
        // TEST-NET-1: never contacted, the allow-list refuses it first.
        let error = connect_udp(&client, proxy, "192.0.2.1:53").await.unwrap_err();
        assert!(error.to_string().contains("403"), "{error}");
        let error = connect_udp(&client, proxy, "127.0.0.1:0").await.unwrap_err();
        assert!(error.to_string().contains("400"), "{error}");
        // Off the template.
        let error = client
            .tunnel(format!("https://{proxy}/elsewhere/127.0.0.1/53/"), "connect-udp")
            .await
            .unwrap_err();
        assert!(error.to_string().contains("404"), "{error}");
        // On the template, but not CONNECT-UDP (no capsule-protocol, another protocol).
        let error = client
            .tunnel(
                format!("https://{proxy}{}127.0.0.1/53/", masque::TEMPLATE_PREFIX),
                "websocket",
            )
            .await
            .unwrap_err();
        assert!(error.to_string().contains("400"), "{error}");
    })
    .await
    .expect("test timed out");
}

/// Found in review of the `dgram` merge (b11f086): the proxy resolved the client's target
/// name (a blocking `getaddrinfo` on tokio's blocking pool, a query to the DNS resolver)
/// before it looked for a free tunnel, so a client beyond `max_tunnels` still made the
/// proxy resolve whatever names it liked, as many at once as it had streams, and learnt
/// from 403/502 which names resolve inside the proxy's network. The name here can never
/// resolve (a NUL byte: the lookup fails at once, with no network traffic), so the answer
/// shows which check comes first: 503 when the limit is checked first, 502 before.
#[tokio::test]
async fn a_proxy_without_a_free_tunnel_answers_503_before_resolving_the_target() {
    init_tracing();
    let certs = certs();
    let echo = udp_echo(10).await;
    let settings = masque::Settings {
        max_tunnels: 1,
        ..masque::Settings::default()
    };
    let proxy = proxy_with(&certs, settings).await;
    timeout(TEST_TIMEOUT, async {
        let client = datagram_client(&certs, true);
        // The only tunnel, held open.
        let _held = connect_udp(&client, proxy, &echo.to_string()).await.unwrap();
        let error = connect_udp(&client, proxy, "no%00such.name:53").await.unwrap_err();
        assert!(error.to_string().contains("503"), "{error}");
    })
    .await
    .expect("test timed out");
}
