//! Every route of the shared route contract, over HTTP/3, built to be load-tested.
//!
//!     cargo run --release --example bench_server -- --listen 127.0.0.1:4433 --cert cert.pem --key key.pem
//!
//! `--congestion-control bbr2` (or `reno`) picks another congestion controller than CUBIC;
//! `--no-grease` sends no GREASE (see `quic::TransportConfig::grease`).
//!
//! Without `--cert`/`--key` it generates a development certificate. It logs to stderr
//! (`RUST_LOG=debug` for more) and stops cleanly on SIGINT or SIGTERM.

mod support;

#[path = "support/routes.rs"]
mod routes;

use clap::Parser;
use tower_quiche::quic::{CongestionControl, Listener, TransportConfig};

/// Every route of the shared route contract over HTTP/3, built to be load-tested.
///
/// The routes: /hello, /bytes/N, /echo, /sink, /trailers and /slow (`ROUTES.md`).
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    #[command(flatten)]
    server: support::Server,
    /// Congestion controller: cubic (the default), reno or bbr2 (bbr2 holds about 3 KiB
    /// less per idle connection: see `quic::CongestionControl::Bbr2`)
    #[arg(long, value_name = "NAME", default_value = "cubic", value_parser = ["cubic", "reno", "bbr2"])]
    congestion_control: String,
    /// Send no GREASE values (about 2.4 KiB less per idle connection: see
    /// `quic::TransportConfig::grease`)
    #[arg(long)]
    no_grease: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // One worker thread per core the process may use: the load harness pins the server.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let congestion_control = match args.congestion_control.as_str() {
            "reno" => CongestionControl::Reno,
            "bbr2" => CongestionControl::Bbr2,
            _ => CongestionControl::Cubic,
        };
        let transport = TransportConfig::new()
            .congestion_control(congestion_control)
            .grease(!args.no_grease);
        let listener = Listener::bind(args.server.listen, args.server.config_with("h3", transport))
            .await
            .unwrap_or_else(|e| support::fail(&e.to_string()));
        eprintln!("bench_server listening on https://{} (HTTP/3)", listener.local_addr());
        tower_quiche::server::serve(listener, routes::router())
            .with_graceful_shutdown(support::shutdown_signal())
            .await
            .unwrap_or_else(|e| support::fail(&e.to_string()));
        eprintln!("bench_server stopped");
    });
}
