//! Our server on TCP and UDP on one port, as `server::serve_with_tcp` runs it, for the
//! client's protocol selection and its conveniences.

#![allow(dead_code)]

use std::net::SocketAddr;

use axum::Router;
use tokio::sync::oneshot;
use tower_quiche::server;

use tower_quiche::quic::ServerConfig;

use super::h3::{H3Server, server_config};
use super::{Certs, bind_udp_and_tcp, init_tracing};

/// Our server on TCP and UDP on one port (`server::serve_with_tcp`).
pub struct Dual {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), tower_quiche::Error>>,
}

impl Dual {
    pub async fn start(certs: &Certs, app: Router) -> Dual {
        Dual::start_on(server_config(certs), app).await
    }

    /// With a client CA: mutual TLS on both transports.
    pub async fn start_requiring_client_certificates(certs: &Certs, client_ca: &str, app: Router) -> Dual {
        let config = tower_quiche::quic::ServerConfig::builder()
            .cert_chain_pem(&certs.leaf.cert_pem)
            .private_key_pem(&certs.leaf.key_pem)
            .client_ca_pem(client_ca)
            .build()
            .unwrap();
        Dual::start_on(config, app).await
    }

    pub async fn start_on(config: ServerConfig, app: Router) -> Dual {
        Dual::start_with(server::Builder::new(), config, app).await
    }

    /// As `builder` has it (timeouts, limits).
    pub async fn start_with(builder: server::Builder, config: ServerConfig, app: Router) -> Dual {
        init_tracing();
        let (listener, tcp) = bind_udp_and_tcp(config).await;
        let addr = listener.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let serve = builder
            .serve_with_tcp(listener, tcp, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            });
        Dual {
            addr,
            shutdown: Some(tx),
            done: tokio::spawn(serve.into_future()),
        }
    }

    pub fn url(&self) -> String {
        self.at("/hello")
    }

    /// The URL of `path` (with its query) on this server.
    pub fn at(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }
}

pub async fn stop_h3(mut server: H3Server) {
    let _ = server.shutdown.take().unwrap().send(());
    server.done.await.unwrap().unwrap();
}
