//! Test support (compiled for unit tests, and for the benches through the hidden `__bench`
//! feature): two quiche connections joined by an
//! in-memory pipe, so the connection and stream logic can be driven without sockets, timers
//! of the OS network stack, or other tasks. Every packet either side sends is handed to the
//! other at once, in order; nothing is lost or reordered, so a test's outcome depends only on
//! what the two sides do. Also a waker that counts its wake-ups, for tests that poll by hand,
//! and the echo protocol of the examples, an application to drive connections with.

// The benches use the pipe and the configurations, not the rest.
#![cfg_attr(not(test), allow(dead_code))]

use crate::quic::QuicheConnection;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Wake, Waker};
use std::time::Instant;

use crate::quic::{ClientConfig, ServerConfig, ServerConfigBuilder, TransportConfig};

/// The raw-QUIC echo protocol of the examples (it names this crate `tower_quiche`, which
/// `lib.rs` makes resolve here for unit tests).
#[cfg(test)]
#[allow(dead_code)]
#[path = "../examples/support/echo.rs"]
pub(crate) mod echo;

/// The addresses the two ends pretend to have.
pub(crate) const CLIENT_ADDR: &str = "127.0.0.1:5000";
pub(crate) const SERVER_ADDR: &str = "127.0.0.1:4433";

/// A certificate for `localhost`, generated once per test binary.
fn server_cert() -> &'static crate::tls::GeneratedCert {
    static CERT: OnceLock<crate::tls::GeneratedCert> = OnceLock::new();
    CERT.get_or_init(|| crate::tls::self_signed(&["localhost"]).expect("a self-signed certificate"))
}

/// A server configuration with `alpn`, and `adjust` applied to the default transport.
pub(crate) fn server_config(alpn: &str, adjust: impl FnOnce(TransportConfig) -> TransportConfig) -> ServerConfig {
    server_builder(alpn)
        .transport(adjust(TransportConfig::new()))
        .build()
        .expect("a server configuration")
}

/// A server configuration builder with `alpn` and [`server_config`]'s certificate.
pub(crate) fn server_builder(alpn: &str) -> ServerConfigBuilder {
    let cert = server_cert();
    ServerConfig::builder()
        .alpn([alpn])
        .cert_chain_pem(&cert.cert_pem)
        .private_key_pem(&cert.key_pem)
}

/// A client configuration with `alpn` that trusts [`server_config`]'s certificate, and
/// `adjust` applied to the default transport.
pub(crate) fn client_config(alpn: &str, adjust: impl FnOnce(TransportConfig) -> TransportConfig) -> ClientConfig {
    ClientConfig::builder()
        .alpn([alpn])
        .ca_pem(&server_cert().cert_pem)
        .transport(adjust(TransportConfig::new()))
        .build()
        .expect("a client configuration")
}

/// A client and a server connection whose packets travel through memory.
pub(crate) struct Pipe {
    pub(crate) client: QuicheConnection,
    pub(crate) server: QuicheConnection,
}

impl Pipe {
    /// Two connections, not yet handshaken.
    pub(crate) fn new(server: &ServerConfig, client: &ClientConfig) -> Pipe {
        Self::between(
            server,
            client,
            CLIENT_ADDR.parse().unwrap(),
            SERVER_ADDR.parse().unwrap(),
        )
    }

    /// Two connections that believe they are at `client_addr` and `server_addr`.
    pub(crate) fn between(
        server: &ServerConfig,
        client: &ClientConfig,
        client_addr: SocketAddr,
        server_addr: SocketAddr,
    ) -> Pipe {
        let mut server_config = server.config.quiche_config(true).expect("server quiche config");
        let mut client_config = client.config.quiche_config(false).expect("client quiche config");
        let client_scid = quiche::ConnectionId::from_ref(&[0xc1; 16]);
        let server_scid = quiche::ConnectionId::from_ref(&[0x5e; 16]);
        let client = quiche::connect_with_buffer_factory(
            Some("localhost"),
            &client_scid,
            client_addr,
            server_addr,
            &mut client_config,
        )
        .expect("client connection");
        let server = quiche::accept_with_buf_factory(&server_scid, None, server_addr, client_addr, &mut server_config)
            .expect("server connection");
        Pipe { client, server }
    }

    /// A pair that has completed its handshake.
    pub(crate) fn handshaken(server: &ServerConfig, client: &ClientConfig) -> Pipe {
        Pipe::new(server, client).handshake()
    }

    /// Completes the pair's handshake.
    pub(crate) fn handshake(self) -> Pipe {
        let mut pipe = self;
        for _ in 0..32 {
            pipe.flush();
            if pipe.client.is_established() && pipe.server.is_established() {
                // The client's last flight (its Finished, HANDSHAKE_DONE's ack) settles.
                pipe.flush();
                return pipe;
            }
        }
        panic!(
            "handshake did not complete: client {:?}, server {:?}",
            pipe.client.peer_error(),
            pipe.server.peer_error()
        );
    }

    /// Fires the timers that are due, then hands each side's pending packets to the other
    /// once (what one round trip of a network would do). Returns whether any moved.
    pub(crate) fn flush_once(&mut self) -> bool {
        let now = Instant::now();
        for conn in [&mut self.client, &mut self.server] {
            if conn.timeout_instant().is_some_and(|at| at <= now) {
                conn.on_timeout();
            }
        }
        let a = transfer(&mut self.client, &mut self.server);
        let b = transfer(&mut self.server, &mut self.client);
        a || b
    }

    /// Fires the connections' timers that are due, then moves packets both ways until
    /// neither side has anything to send. Returns whether any packet moved.
    pub(crate) fn flush(&mut self) -> bool {
        let moved = self.flush_once();
        if moved {
            while self.flush_once() {}
        }
        moved
    }
}

/// Hands every packet `from` has to send to `to`. Returns whether there was any.
fn transfer(from: &mut QuicheConnection, to: &mut QuicheConnection) -> bool {
    let mut buf = [0; 1500];
    let mut moved = false;
    // Bounded: quiche stops at its congestion window; this only guards against a bug.
    for _ in 0..10_000 {
        match from.send(&mut buf) {
            Ok((len, info)) => {
                moved = true;
                let recv = quiche::RecvInfo {
                    from: info.from,
                    to: info.to,
                };
                // A packet the receiver refuses is what a lossy network would drop.
                let _ = to.recv(&mut buf[..len], recv);
            }
            Err(_) => break,
        }
    }
    moved
}

/// A waker that counts how often it is woken.
#[derive(Default)]
pub(crate) struct WakeCount(AtomicUsize);

impl WakeCount {
    pub(crate) fn waker(self: &Arc<Self>) -> Waker {
        Waker::from(Arc::clone(self))
    }

    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
