//! An axum app on one port over TCP (HTTP/1.1 and HTTP/2 with TLS) and UDP (HTTP/3). TCP
//! responses carry `Alt-Svc`, so a browser's first request goes over TCP and the next ones
//! over HTTP/3.
//!
//!     cargo run --example hello
//!     cargo run --example hello -- --listen 127.0.0.1:4433 --cert cert.pem --key key.pem
//!     cargo run --example hello -- --client-ca client-ca.pem
//!
//! With no arguments it generates a development certificate, listens on 127.0.0.1:4433 and
//! prints how to reach it. It serves `/` (an HTML page that shows the protocol each request
//! used), `/hello`, and `/ws`, a WebSocket echo over HTTP/3 (extended CONNECT, RFC 9220). With `--client-ca PEM` it requires mutual TLS on TCP and UDP alike:
//! only clients presenting a certificate issued by a CA in that file are served, e.g.
//! `curl --cacert ca.pem --cert client.pem --key client-key.pem https://localhost:4433/hello`.

#[path = "support/routes.rs"]
mod routes;
mod support;

use std::path::PathBuf;

use axum::Router;
use axum::extract::Extension;
use axum::response::Html;
use axum::routing::get;
use clap::Parser;
use tower_quiche::quic::{Listener, ServerConfig, TransportConfig};
use tower_quiche::server::ConnectionInfo;

/// An axum app on one port over HTTP/3 (UDP) and HTTP/1.1 + HTTP/2 (TCP), with Alt-Svc.
///
/// It serves `/` (a page that shows the protocol each request used) and `/hello`.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    #[command(flatten)]
    server: support::Server,
    /// Require mutual TLS: serve only clients with a certificate issued by a CA in PEM
    #[arg(long, value_name = "PEM")]
    client_ca: Option<PathBuf>,
}

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tower-quiche</title></head>
<body>
<h1>tower-quiche</h1>
<p id="page">this page: VERSION</p>
<p id="fetch">fetches of /hello: pending</p>
<script>
// Fetch /hello until a request goes over HTTP/3 (the browser learns of it from Alt-Svc).
(async () => {
  const seen = [];
  for (let i = 0; i < 20; i++) {
    const url = '/hello?n=' + i;
    const r = await fetch(url, {cache: 'no-store'});
    await r.text();
    const e = performance.getEntriesByType('resource').filter(x => x.name.endsWith(url))[0];
    const proto = e ? e.nextHopProtocol : '?';
    seen.push(proto);
    document.getElementById('fetch').textContent = 'fetches of /hello: ' + seen.join(' ');
    if (proto === 'h3') break;
    await new Promise(ok => setTimeout(ok, 250));
  }
  document.title = 'done';
})();
</script>
</body></html>
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (cert, key) = support::server_identity(&args.server.identity);
    let app = Router::new()
        .route(
            "/",
            get(|Extension(info): Extension<ConnectionInfo>| async move {
                Html(PAGE.replace("VERSION", &format!("{:?}", info.version)))
            }),
        )
        .route("/hello", get(|| async { "hello world" }))
        // WebSocket echo over HTTP/3 (RFC 9220).
        .route("/ws", routes::websocket_echo());
    let mut config = ServerConfig::builder()
        .cert_chain_pem_file(&cert)
        .private_key_pem_file(&key)
        .retry(args.server.retry_policy())
        .transport(TransportConfig::new().keylog_from_env());
    // The listener's configuration serves both transports, so this one setting requires
    // client certificates over HTTP/3 and over HTTP/1.1 and HTTP/2.
    if let Some(client_ca) = &args.client_ca {
        config = config.client_ca_pem_file(client_ca);
    }
    let config = config.build()?;

    let listener = Listener::bind(args.server.listen, config).await?;
    // TCP on the same port as UDP (the port the OS chose, when asked for port 0).
    let tcp = tokio::net::TcpListener::bind(listener.local_addr()).await?;
    let addr = listener.local_addr();
    eprintln!(
        "serving https://{addr}/ over HTTP/3 (UDP) and HTTP/1.1 + HTTP/2 (TCP), Alt-Svc h3=\":{}\"",
        addr.port()
    );
    if let Some(client_ca) = &args.client_ca {
        eprintln!(
            "clients must present a certificate issued by a CA in {} (mutual TLS)",
            client_ca.display()
        );
    } else if args.server.identity.cert.is_none() {
        let ca = cert.with_file_name("ca.pem");
        eprintln!(
            "try:  cargo run --example client -- --ca {} https://localhost:{}/hello",
            ca.display(),
            addr.port()
        );
    }
    tower_quiche::server::serve_with_tcp(listener, tcp, app)
        .with_graceful_shutdown(support::shutdown_signal())
        .await?;
    Ok(())
}
