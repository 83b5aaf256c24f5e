//! Our client against HTTP/3 servers nobody here wrote: the Python peers of the shared
//! interop folder (aioquic, and qh3's Rust QUIC core), serving the route contract.
//!
//! Needs the peers installed (`../shared/interop/setup.sh target/interop-venv`) and
//! `TOWER_QUICHE_INTEROP_PYTHON` naming that Python; `.ci/run` does both. Without it the
//! test says it was skipped; with `TOWER_QUICHE_INTEROP_REQUIRED=1` (CI) a missing peer
//! fails it instead.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use support::TEST_TIMEOUT;
use support::h3::hash_body;
use tokio::time::timeout;
use tower_quiche::client::{Client, ResponseExt};
use tower_quiche::quic::ClientConfig;

struct Peer {
    child: Child,
    port: u16,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/interop")
}

/// Starts the peer server with a fresh CA from mkcert.sh; returns it and the CA's path.
fn start_peer(python: &str, engine: &str, port: u16) -> (Peer, PathBuf) {
    let certs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("interop-certs-{engine}"));
    let status = Command::new("sh")
        .arg(interop_dir().join("mkcert.sh"))
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .expect("mkcert.sh");
    assert!(status.success(), "mkcert.sh failed");
    let mut child = Command::new(python)
        .arg(interop_dir().join("h3peer_server.py"))
        .args([
            "--port",
            &port.to_string(),
            "--engine",
            engine,
            "--max-seconds",
            "120",
            "-q",
        ])
        .arg("--cert")
        .arg(certs.join("cert.pem"))
        .arg("--key")
        .arg(certs.join("key.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start h3peer_server.py");
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("peer output");
    assert!(line.starts_with("READY"), "peer did not start: {line:?}");
    (Peer { child, port }, certs.join("ca.pem"))
}

fn python() -> Option<String> {
    match std::env::var("TOWER_QUICHE_INTEROP_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            if std::env::var("TOWER_QUICHE_INTEROP_REQUIRED").is_ok_and(|v| v == "1") {
                panic!("TOWER_QUICHE_INTEROP_PYTHON is not set but interop is required");
            }
            eprintln!("skipped: set TOWER_QUICHE_INTEROP_PYTHON (see ../shared/interop/README.md)");
            None
        }
    }
}

async fn route_battery(client: &Client, port: u16) {
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let response = client.get(url("/hello")).send().await.expect("GET /hello");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "hello world");

    // byte i == i % 256
    let n = 3 * 1024 * 1024 + 17;
    let response = client
        .get(url(&format!("/bytes/{n}")))
        .send()
        .await
        .expect("GET /bytes");
    assert_eq!(response.headers()["content-length"], n.to_string().as_str());
    let expected: Vec<u8> = (0..n).map(|i| (i % 256) as u8).collect();
    let (len, digest, _) = hash_body(response.into_body()).await;
    assert_eq!(len, n as u64);
    assert_eq!(digest, boring::sha::sha256(&expected), "content of /bytes");

    let upload: Vec<u8> = (0..2_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let request = Request::post(url("/echo"))
        .body(Full::new(bytes::Bytes::from(upload.clone())))
        .unwrap();
    let echoed = client.send(request).await.expect("POST /echo").bytes().await.unwrap();
    assert!(echoed[..] == upload[..], "echo of 2 MB");

    let response = client.get(url("/trailers")).send().await.expect("GET /trailers");
    let (_, digest, trailers) = hash_body(response.into_body()).await;
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["x-trailer"], "yes");
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(trailers["x-body-sha256"], hex.as_str());

    let response = client.get(url("/slow")).send().await.expect("GET /slow");
    assert_eq!(response.bytes().await.unwrap().len(), 200);
}

async fn against(engine: &str, port: u16) {
    let Some(python) = python() else { return };
    let (peer, ca) = start_peer(&python, engine, port);
    let client = Client::builder()
        .http3_prior_knowledge()
        .quic_config(ClientConfig::builder().ca_pem_file(ca).build().unwrap())
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    timeout(TEST_TIMEOUT, route_battery(&client, peer.port))
        .await
        .expect("interop battery in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_the_aioquic_server() {
    against("aioquic", 24461).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_against_the_qh3_server() {
    against("qh3", 24462).await;
}
