//! Helpers shared by the integration tests: certificates, configurations, an echo server.

#![allow(dead_code)]

/// The raw-QUIC echo protocol of the examples.
#[path = "../../examples/support/echo.rs"]
pub mod echo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tower_quiche::quic::{
    AtomicMetrics, ClientConfig, ClientConfigBuilder, ConnectionHandle, Listener, ServerConfig, ServerConfigBuilder,
};
use tower_quiche::tls::{DevCa, GeneratedCert};

/// Every test is bounded: a hang fails the test instead of stalling CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Certs {
    pub ca_pem: String,
    pub leaf: GeneratedCert,
}

pub fn certs() -> Certs {
    let ca = DevCa::new("tower-quiche test CA").unwrap();
    let leaf = ca.issue(&["localhost", "127.0.0.1", "::1"]).unwrap();
    Certs {
        ca_pem: ca.cert_pem(),
        leaf,
    }
}

pub fn server_builder(certs: &Certs) -> ServerConfigBuilder {
    ServerConfig::builder()
        .alpn([echo::ALPN])
        .cert_chain_pem(&certs.leaf.cert_pem)
        .private_key_pem(&certs.leaf.key_pem)
}

pub fn client_builder(certs: &Certs) -> ClientConfigBuilder {
    ClientConfig::builder().alpn([echo::ALPN]).ca_pem(&certs.ca_pem)
}

/// A running echo server: its address, its metrics, and the handles of the connections it
/// accepted, in order.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub metrics: Arc<AtomicMetrics>,
    pub connections: mpsc::UnboundedReceiver<ConnectionHandle>,
}

pub async fn echo_server(bind: &str, builder: ServerConfigBuilder) -> EchoServer {
    let metrics = Arc::new(AtomicMetrics::new());
    let config = builder.metrics(Arc::clone(&metrics)).build().unwrap();
    let mut listener = Listener::bind(bind, config).await.unwrap();
    let addr = listener.local_addr();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = listener.accept().await {
            let _ = tx.send(incoming.start(echo::EchoServer::new()));
        }
    });
    EchoServer {
        addr,
        metrics,
        connections: rx,
    }
}

/// Waits for every task (a panic in one fails the test), then closes `conn` and checks
/// that the close was clean.
pub async fn join_then_close(tasks: Vec<tokio::task::JoinHandle<()>>, conn: &ConnectionHandle) {
    for task in tasks {
        task.await.unwrap();
    }
    conn.close(0, "done");
    let closed = conn.closed().await;
    assert!(closed.error().is_none(), "clean close: {:?}", closed.error());
}

/// A payload whose every byte depends on its position, so reordering or loss shows.
pub fn pattern(len: usize, seed: u8) -> bytes::Bytes {
    (0..len)
        .map(|i| ((i * 131 + seed as usize * 7) % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
pub mod dual;
pub mod h3;
pub mod scripted;
pub mod tcp;

/// A QUIC listener on a port of 127.0.0.1 the OS picks, and a TCP listener on the same
/// port, as `serve_with_tcp` serves them. The OS picks the UDP port alone, and its TCP twin
/// may be taken (by another test's connection, say): then both are bound again elsewhere.
pub async fn bind_udp_and_tcp(config: ServerConfig) -> (Listener, tokio::net::TcpListener) {
    for _ in 0..20 {
        let listener = Listener::bind("127.0.0.1:0", config.clone()).await.unwrap();
        match tokio::net::TcpListener::bind(listener.local_addr()).await {
            Ok(tcp) => return (listener, tcp),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("binding TCP beside QUIC: {e}"),
        }
    }
    panic!("no port of 127.0.0.1 free on both UDP and TCP in 20 tries");
}

/// A UDP relay in front of `server` that holds every datagram, either way, for `delay`:
/// a path with a long round trip. Returns the address to reach the server through.
pub async fn slow_path(server: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let outside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let inside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    inside.connect(server).await.unwrap();
    let addr = outside.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None));
    let (out, ins, peer) = (Arc::clone(&outside), Arc::clone(&inside), Arc::clone(&client));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = out.recv_from(&mut buf).await {
            *peer.lock().unwrap() = Some(from);
            let (datagram, ins) = (buf[..n].to_vec(), Arc::clone(&ins));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = ins.send(&datagram).await;
            });
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = inside.recv(&mut buf).await {
            let Some(to) = *client.lock().unwrap() else { continue };
            let (datagram, outside) = (buf[..n].to_vec(), Arc::clone(&outside));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = outside.send_to(&datagram, to).await;
            });
        }
    });
    addr
}
