//! A CONNECT-UDP proxy (RFC 9298, MASQUE) over HTTP/3 datagrams (RFC 9297).
//!
//!     cargo run --example masque
//!     cargo run --example masque -- --listen 127.0.0.1:4433 --cert cert.pem --key key.pem --allow 192.0.2.0/24
//!
//! Clients open `/.well-known/masque/udp/{target_host}/{target_port}/` with an extended
//! CONNECT (`:protocol = connect-udp`, `capsule-protocol: ?1`), then send UDP payloads as
//! HTTP datagrams with context ID 0; what the target answers comes back the same way.
//! Targets must resolve into the allow-list: loopback only, unless `--allow` names the
//! ranges to allow instead (loopback is then allowed only if named too). Never allowed,
//! whatever the list: the unspecified, multicast and broadcast addresses, and the proxy
//! host's own addresses outside loopback. A target outside it gets 403, a path off the template 404, a request that is not
//! CONNECT-UDP 400. Without `--cert`/`--key` it generates a development certificate. It
//! stops cleanly on SIGINT or SIGTERM.
//!
//! There is no authentication: whoever reaches the proxy reaches every allowed target, and
//! the default (loopback, for trying it on one machine) includes the UDP services of the
//! proxy's own host (a stub resolver on 127.0.0.53, say). Before exposing it, allow only
//! what clients should reach (RFC 9298 §7): wide ranges such as `0.0.0.0/0` also open
//! private networks and link-local addresses. One client may hold every tunnel slot
//! (`--max-tunnels`): there is no share per client.

mod support;

#[path = "support/masque.rs"]
mod masque;

use std::time::Duration;

use clap::Parser;
use tower_quiche::quic::{Listener, TransportConfig};

/// A CONNECT-UDP proxy (RFC 9298) over HTTP/3 datagrams.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    #[command(flatten)]
    server: support::Server,
    /// Allow targets in this address range (ADDR or ADDR/PREFIX; repeatable); replaces the default [default: loopback only]
    #[arg(long, value_name = "NET")]
    allow: Vec<masque::Net>,
    /// Most tunnels open at once (503 beyond)
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_tunnels: usize,
    /// Close a tunnel after this many seconds without a datagram either way
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    idle_timeout: u64,
}

/// Each connection's QUIC datagram queues, each way: a few congestion windows of
/// full-sized datagrams; past them datagrams are dropped, as UDP's are.
const DATAGRAM_QUEUE: usize = 256;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut settings = masque::Settings {
        max_tunnels: args.max_tunnels.max(1),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        ..masque::Settings::default()
    };
    if !args.allow.is_empty() {
        // Named ranges replace loopback: a proxy opened to 192.0.2.0/24 must not also
        // reach its own host's UDP services (nor, inside the ranges, its own addresses:
        // `masque::Settings::permits`).
        settings.allowed = args.allow;
    }
    let transport = TransportConfig::new().datagrams(DATAGRAM_QUEUE);
    let listener = Listener::bind(args.server.listen, args.server.config_with("h3", transport))
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    eprintln!(
        "masque listening on https://{}{}{{host}}/{{port}}/ (HTTP/3, CONNECT-UDP)",
        listener.local_addr(),
        masque::TEMPLATE_PREFIX
    );
    tower_quiche::server::serve(listener, masque::service(settings))
        .with_graceful_shutdown(support::shutdown_signal())
        .await
        .unwrap_or_else(|e| support::fail(&e.to_string()));
    eprintln!("masque stopped");
}
