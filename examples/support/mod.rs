//! Helpers the examples share: the flags of servers and clients, a development certificate,
//! and shutting down on a signal.

#![allow(dead_code)]

pub mod echo;

use std::net::SocketAddr;
use std::path::PathBuf;

/// Where a server listens, and its certificate.
#[derive(clap::Args)]
pub struct Server {
    /// Address to listen on
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub identity: Identity,
    /// Never validate client addresses with a Retry (by default one is asked for only while
    /// handshakes pile up)
    #[arg(long)]
    pub no_retry: bool,
}

/// A server's certificate: `--cert PEM --key PEM`, or neither for a development certificate.
#[derive(clap::Args, Default)]
pub struct Identity {
    /// Certificate chain, PEM [default: a development certificate, generated]
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert, PEM
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
}

/// How a client checks the server's certificate: `--ca PEM`, `--insecure`, or the system roots.
#[derive(clap::Args)]
pub struct Trust {
    /// Trust the CA certificates in PEM instead of the system roots
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (testing only)
    #[arg(long)]
    pub insecure: bool,
}

impl Server {
    /// The library's default (Retry under load), or never with `--no-retry`.
    pub fn retry_policy(&self) -> tower_quiche::quic::RetryPolicy {
        if self.no_retry {
            tower_quiche::quic::RetryPolicy::Never
        } else {
            tower_quiche::quic::RetryPolicy::UnderLoad
        }
    }

    /// The listener's configuration these flags ask for, offering `alpn`: the certificate
    /// (or a generated one), Retry under load unless `--no-retry`, TLS secrets logged to
    /// `SSLKEYLOGFILE` when it is set.
    pub fn config(&self, alpn: &str) -> tower_quiche::quic::ServerConfig {
        self.config_with(alpn, tower_quiche::quic::TransportConfig::new())
    }

    /// [`config`](Self::config) with transport settings of the example's own (key logging
    /// is added).
    pub fn config_with(
        &self,
        alpn: &str,
        transport: tower_quiche::quic::TransportConfig,
    ) -> tower_quiche::quic::ServerConfig {
        let (cert, key) = server_identity(&self.identity);
        tower_quiche::quic::ServerConfig::builder()
            .alpn([alpn])
            .cert_chain_pem_file(cert)
            .private_key_pem_file(key)
            .retry(self.retry_policy())
            .transport(transport.keylog_from_env())
            .build()
            .unwrap_or_else(|e| fail(&e.to_string()))
    }
}

impl Trust {
    /// Trust the CA certificates in the PEM file `ca`.
    pub fn ca(ca: PathBuf) -> Self {
        Trust {
            ca: Some(ca),
            insecure: false,
        }
    }

    /// An HTTP/3 client (h3 only: the examples' servers speak nothing else) trusting as these
    /// flags ask.
    pub fn h3_client(&self) -> Result<tower_quiche::client::Client, tower_quiche::Error> {
        tower_quiche::client::Client::builder()
            .http3_prior_knowledge()
            .quic_config(self.config("h3"))
            .build()
    }

    /// The client configuration these flags ask for, offering `alpn`.
    pub fn config(&self, alpn: &str) -> tower_quiche::quic::ClientConfig {
        let mut config = tower_quiche::quic::ClientConfig::builder()
            .alpn([alpn])
            .danger_accept_invalid_certs(self.insecure);
        if let Some(ca) = &self.ca {
            config = config.ca_pem_file(ca);
        }
        config.build().unwrap_or_else(|e| fail(&e.to_string()))
    }
}

pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

/// The certificate and key a server uses: `--cert`/`--key` when given, else a CA and a leaf
/// for localhost, 127.0.0.1 and ::1 generated into a temporary directory (the CA's path is
/// printed, so clients can trust it).
pub fn server_identity(identity: &Identity) -> (PathBuf, PathBuf) {
    if let (Some(cert), Some(key)) = (&identity.cert, &identity.key) {
        return (cert.clone(), key.clone());
    }
    let dir = std::env::temp_dir().join(format!("tower-quiche-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    let ca = tower_quiche::tls::DevCa::new("tower-quiche development CA").unwrap_or_else(|e| fail(&e.to_string()));
    let leaf = ca
        .issue(&["localhost", "127.0.0.1", "::1"])
        .unwrap_or_else(|e| fail(&e.to_string()));
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
        path
    };
    let ca_path = write("ca.pem", &ca.cert_pem());
    let cert = write("cert.pem", &leaf.cert_pem);
    let key = write("key.pem", &leaf.key_pem);
    eprintln!(
        "generated a development certificate; clients must trust {}",
        ca_path.display()
    );
    (cert, key)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("shutting down");
}
