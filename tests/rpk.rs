//! Raw public keys (RFC 7250) instead of certificates (`rpk` feature): a client that trusts
//! the server's key connects; one that trusts another key fails with a TLS error.
#![cfg(feature = "rpk")]

mod support;

use std::sync::Arc;

use boring::ec::{EcGroup, EcKey};
use boring::nid::Nid;
use boring::pkey::PKey;
use support::echo;
use support::*;
use tokio::time::timeout;
use tower_quiche::quic::{ClientConfig, Endpoint, Listener, ServerConfig};

fn key_pair() -> (String, String) {
    let key =
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()).unwrap();
    let private = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let public = String::from_utf8(key.public_key_to_pem().unwrap()).unwrap();
    (private, public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_raw_public_key_connects_and_another_does_not() {
    init_tracing();
    let (server_private, server_public) = key_pair();
    let (_, other_public) = key_pair();
    let metrics = Arc::new(tower_quiche::quic::AtomicMetrics::new());
    let config = ServerConfig::builder()
        .alpn([echo::ALPN])
        .raw_public_key_pem(&server_private)
        .metrics(Arc::clone(&metrics))
        .build()
        .unwrap();
    let mut listener = Listener::bind("127.0.0.1:0", config).await.unwrap();
    let addr = listener.local_addr();
    tokio::spawn(async move {
        while let Some(incoming) = listener.accept().await {
            incoming.start(echo::EchoServer::new());
        }
    });
    let run = async {
        let config = ClientConfig::builder()
            .alpn([echo::ALPN])
            .trust_raw_public_key_pem(&server_public)
            .build()
            .unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let (app, client) = echo::EchoClient::new();
        let conn = endpoint
            .connect_addr(addr, Some("localhost"), app)
            .await
            .expect("handshake with a raw public key");
        assert_eq!(
            &client.echo(bytes::Bytes::from_static(b"rpk")).await.unwrap()[..],
            b"rpk"
        );
        conn.close(0, "");

        let config = ClientConfig::builder()
            .alpn([echo::ALPN])
            .trust_raw_public_key_pem(&other_public)
            .build()
            .unwrap();
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let err = endpoint
            .connect_addr(addr, Some("localhost"), echo::EchoClient::new().0)
            .await
            .unwrap_err();
        assert!(err.is_tls(), "{err}");
        assert!(err.to_string().contains("raw public key"), "{err}");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}

/// A client CA beside a raw public key: the server still requires a client certificate
/// from that CA (it used to present its key and ask clients for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_public_key_server_with_a_client_ca_requires_a_client_certificate() {
    init_tracing();
    let (server_private, server_public) = key_pair();
    let clients = certs();
    let server = echo_server(
        "127.0.0.1:0",
        ServerConfig::builder()
            .alpn([echo::ALPN])
            .raw_public_key_pem(&server_private)
            .client_ca_pem(&clients.ca_pem),
    )
    .await;
    let client = |with_certificate: bool| {
        let mut config = ClientConfig::builder()
            .alpn([echo::ALPN])
            .trust_raw_public_key_pem(&server_public);
        if with_certificate {
            config = config
                .cert_chain_pem(&clients.leaf.cert_pem)
                .private_key_pem(&clients.leaf.key_pem);
        }
        Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config.build().unwrap()).unwrap()
    };
    let run = async {
        match client(false)
            .connect_addr(server.addr, Some("localhost"), echo::EchoClient::new().0)
            .await
        {
            // The refusal may come during the handshake or right after it.
            Ok(conn) => {
                let closed = conn.closed().await;
                assert!(closed.error().is_some_and(|e| e.is_tls()), "{closed:?}");
            }
            Err(err) => assert!(err.is_tls(), "{err}"),
        }
        let (app, echo) = echo::EchoClient::new();
        let conn = client(true)
            .connect_addr(server.addr, Some("localhost"), app)
            .await
            .expect("a client certificate from the CA is accepted");
        assert_eq!(
            &echo.echo(bytes::Bytes::from_static(b"both")).await.unwrap()[..],
            b"both"
        );
        conn.close(0, "");
    };
    timeout(TEST_TIMEOUT, run).await.unwrap();
}
