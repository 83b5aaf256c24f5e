//! 0-RTT: a client that resumes a session sends safe requests in early data; the server
//! serves what its policy allows before the handshake completes and answers the rest
//! `425 Too Early`, which the client sends again after the handshake (RFC 8470).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::routing::any;
use support::h3::{H3Server, Probe, h3_server_on, trusting};
use support::{Certs, TEST_TIMEOUT, certs};
use tower_quiche::client::{Client, ResponseExt};
use tower_quiche::quic::{ClientConfig, ServerConfig, TransportConfig};
use tower_quiche::server::{self, RequestInfo};

/// `/early` answers "<RequestInfo::early_data> <early-data header or ->" and counts calls.
fn early_router(calls: &Arc<AtomicUsize>) -> Router {
    let calls = Arc::clone(calls);
    Router::new().route(
        "/early",
        any(move |request: Request| {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let early = request.extensions().get::<RequestInfo>().map(|info| info.early_data);
                let header = request
                    .headers()
                    .get("early-data")
                    .map_or("-".to_owned(), |v| v.to_str().unwrap_or("?").to_owned());
                format!("{} {header}", early.map_or("none".to_owned(), |e| e.to_string()))
            }
        }),
    )
}

/// A server that closes each connection after one request, so that each request of a
/// test's client opens a new connection, which resumes the session of the one before.
async fn one_request_per_connection(certs: &Certs, builder: server::Builder, calls: &Arc<AtomicUsize>) -> H3Server {
    h3_server_on(
        certs,
        ServerConfig::builder(),
        builder.max_requests_per_connection(1),
        early_router(calls),
        Arc::new(Probe::default()),
    )
    .await
}

fn client(config: ClientConfig) -> Client {
    Client::builder()
        .http3_prior_knowledge()
        .quic_config(config)
        .build()
        .unwrap()
}

/// Waits until the server has closed the client's connection (bounded by the test's
/// timeout), so that the next request needs a new one.
async fn until_unpooled(client: &Client) {
    while client.pooled_connections() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `request`, then waits for its connection to go.
async fn fetch(client: &Client, request: tower_quiche::client::RequestBuilder) -> (http::StatusCode, String) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    until_unpooled(client).await;
    (status, text)
}

/// A UDP relay to `server` whose answers to the client take 20 ms: a path with a round
/// trip, as every real one has. Early data is what a client sends in the round trip before
/// the server's handshake answer arrives; over bare loopback that is microseconds, shorter
/// than it takes a request to reach a new connection, so whether a GET went early would
/// be a race.
async fn slow_path_to(server: std::net::SocketAddr) -> std::net::SocketAddr {
    let outside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let inside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = outside.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None));
    let (to_client, from_client) = (Arc::clone(&outside), Arc::clone(&inside));
    let seen = Arc::clone(&client);
    tokio::spawn(async move {
        let mut buf = vec![0; 65_536];
        while let Ok((n, from)) = outside.recv_from(&mut buf).await {
            *seen.lock().unwrap() = Some(from);
            let _ = from_client.send_to(&buf[..n], server).await;
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0; 65_536];
        while let Ok(n) = inside.recv(&mut buf).await {
            let (datagram, to_client) = (buf[..n].to_vec(), Arc::clone(&to_client));
            let Some(client) = *client.lock().unwrap() else {
                continue;
            };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = to_client.send_to(&datagram, client).await;
            });
        }
    });
    addr
}

/// A test's setting: a server that closes each connection after one request, a client,
/// the URL of `/early`, and the calls counted there. The client has made one request (a
/// full handshake), so it holds the server's session and its next connection resumes.
struct Resumed {
    _server: H3Server,
    client: Client,
    url: String,
    calls: Arc<AtomicUsize>,
}

impl Resumed {
    /// A bodiless GET of `/early` on a new connection: its status and body.
    async fn get(&self) -> (http::StatusCode, String) {
        fetch(&self.client, self.client.get(&self.url)).await
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A 200 answer with `body`.
fn ok(body: &str) -> (http::StatusCode, String) {
    (http::StatusCode::OK, body.into())
}

async fn resumed(builder: server::Builder, config: impl FnOnce(&Certs) -> ClientConfig) -> Resumed {
    let certs = certs();
    let calls = Arc::new(AtomicUsize::new(0));
    let server = one_request_per_connection(&certs, builder, &calls).await;
    let client = client(config(&certs));
    let url = format!("https://localhost:{}/early", slow_path_to(server.addr).await.port());
    assert_eq!(fetch(&client, client.get(&url)).await, ok("false -"));
    Resumed {
        _server: server,
        client,
        url,
        calls,
    }
}

/// A server builder whose early-data policy refuses every request, and the count of the
/// requests it refused.
fn refusing_early_data() -> (server::Builder, Arc<AtomicUsize>) {
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&refused);
    let builder = server::Builder::new().early_data_policy(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        false
    });
    (builder, refused)
}

#[tokio::test]
async fn a_resumed_connection_sends_a_get_in_0rtt_and_the_server_serves_it_there() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let resumed = resumed(server::Builder::new(), trusting).await;
        // The GET goes in the first flight and is served before the handshake completes,
        // marked as early data.
        assert_eq!(resumed.get().await, ok("true 1"));
        assert_eq!(resumed.calls(), 2);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_request_the_server_will_not_serve_early_is_answered_425_and_sent_again_after_the_handshake() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // The policy is asked about requests in early data only: it counts them, so the
        // test fails should the GET not go early at all (and then no 425 be tested).
        let (builder, refused) = refusing_early_data();
        let resumed = resumed(builder, trusting).await;
        // The GET goes in 0-RTT, the server answers 425 without calling the service, and
        // the client sends it again once the handshake has completed: the caller sees
        // only the final answer, and the service ran once for it.
        assert_eq!(resumed.get().await, ok("false -"));
        assert_eq!(resumed.calls(), 2);
        assert_eq!(
            refused.load(Ordering::SeqCst),
            1,
            "one request came early and was refused"
        );
    })
    .await
    .unwrap();
}

/// Two GETs go early on one resumed connection and are both answered 425. Sent again after
/// the handshake, the first is served and, the connection's one request done, the server
/// refuses the second (GOAWAY). The 425 did not use up the second's resend: it goes on a
/// new connection and is answered.
#[tokio::test]
async fn a_request_answered_425_can_still_be_resent_once_elsewhere() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (builder, refused) = refusing_early_data();
        let resumed = resumed(builder, trusting).await;
        let Resumed { client, url, .. } = &resumed;
        let (first, second) = tokio::join!(client.get(url).send(), client.get(url).send());
        for response in [first, second] {
            let response = response.expect("each GET is answered");
            assert_eq!(response.status(), 200);
            assert_eq!(response.text().await.unwrap(), "false -");
        }
        assert_eq!(refused.load(Ordering::SeqCst), 2, "both went early and were refused");
        assert_eq!(resumed.calls(), 3);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn requests_that_are_not_safe_to_replay_wait_for_the_handshake() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // The server would serve anything early: what it gets early is the client's choice.
        let builder = server::Builder::new().early_data_policy(|_| true);
        let resumed = resumed(builder, trusting).await;
        let Resumed { client, url, .. } = &resumed;
        let post = client.post(url).body("not safe to replay");
        assert_eq!(fetch(client, post).await, ok("false -"));
        // A safe method with a body stays out of early data too.
        let get_with_body = client.get(url).body("a body");
        assert_eq!(fetch(client, get_with_body).await, ok("false -"));
        // While a bodiless GET goes early.
        assert_eq!(resumed.get().await, ok("true 1"));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_client_with_early_data_off_resumes_without_sending_early() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = |certs: &Certs| {
            ClientConfig::builder()
                .ca_pem(&certs.ca_pem)
                .transport(TransportConfig::default().early_data(false))
                .build()
                .unwrap()
        };
        let resumed = resumed(server::Builder::new(), config).await;
        assert_eq!(resumed.get().await, ok("false -"));
    })
    .await
    .unwrap();
}

/// A server restarted on the same address has new session-ticket keys: it cannot resume
/// the session, so it rejects the 0-RTT data. The GET sent there must still be answered,
/// sent again after the handshake.
#[tokio::test]
async fn early_data_a_restarted_server_rejects_is_sent_again_after_the_handshake() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = certs();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut first = one_request_per_connection(&certs, server::Builder::new(), &calls).await;
        let addr = first.addr;
        let client = client(trusting(&certs));
        let url = first.url("/early");
        fetch(&client, client.get(&url)).await;
        first.shutdown.take().unwrap().send(()).unwrap();
        first.done.await.unwrap().unwrap();

        let config = ServerConfig::builder()
            .cert_chain_pem(&certs.leaf.cert_pem)
            .private_key_pem(&certs.leaf.key_pem)
            .build()
            .unwrap();
        let listener = tower_quiche::quic::Listener::bind(addr, config).await.unwrap();
        let builder = server::Builder::new().max_requests_per_connection(1);
        tokio::spawn(builder.serve(listener, early_router(&calls)).into_future());
        assert_eq!(fetch(&client, client.get(&url)).await, ok("false -"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    })
    .await
    .unwrap();
}

/// A resumed connection is used as soon as it can send 0-RTT data, before its handshake
/// completes; `client::Builder::connect_timeout` must still bound that handshake: to a
/// server that is gone, the GET fails as timed out after the caller's 300 ms, not after
/// the QUIC handshake timeout (60 s here). (Found by review.)
#[tokio::test]
async fn connect_timeout_still_bounds_a_resumed_connection_to_a_server_that_is_gone() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = certs();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut server = one_request_per_connection(&certs, server::Builder::new(), &calls).await;
        let slow_to_give_up = TransportConfig::default()
            .handshake_timeout(Duration::from_secs(60))
            .idle_timeout(Duration::from_secs(60));
        let config = ClientConfig::builder()
            .ca_pem(&certs.ca_pem)
            .transport(slow_to_give_up)
            .build()
            .unwrap();
        let client = Client::builder()
            .http3_prior_knowledge()
            .quic_config(config)
            .connect_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let url = server.url("/early");
        assert_eq!(fetch(&client, client.get(&url)).await, ok("false -"));
        // The server goes; its address now swallows every packet.
        server.shutdown.take().unwrap().send(()).unwrap();
        server.done.await.unwrap().unwrap();
        let black_hole = tokio::net::UdpSocket::bind(server.addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0; 2048];
            while black_hole.recv(&mut buf).await.is_ok() {}
        });
        // Far more than the connect timeout, far less than the handshake timeout: which of
        // the two ends the request tells them apart without timing anything.
        let outcome = tokio::time::timeout(Duration::from_secs(20), client.get(&url).send()).await;
        let error = outcome
            .expect("the request must fail within the connect timeout, not wait for the handshake timeout")
            .expect_err("nobody answers");
        assert!(error.is_timeout(), "{error}");
    })
    .await
    .unwrap();
}

/// The low-level `client::conn` API sends nothing in 0-RTT data (only the pooled `Client`,
/// which sends a `425 Too Early` request again, does): a caller who never asked for early
/// data never sees a 425 or a refusal. (Found by review: a bodiless GET went early and a
/// 425 came back to the caller as an error.)
#[tokio::test]
async fn a_425_on_a_low_level_connection_is_sent_again_after_the_handshake() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let certs = certs();
        let calls = Arc::new(AtomicUsize::new(0));
        let builder = server::Builder::new().early_data_policy(|_| false);
        let server = one_request_per_connection(&certs, builder, &calls).await;
        let endpoint = support::h3::h3_client_endpoint(&certs);
        let authority = format!("localhost:{}", server.addr.port());
        let get = || {
            http::Request::get(server.url("/early"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        // A full handshake: the endpoint keeps the session the server issues.
        let (mut send, connection) = tower_quiche::client::conn::handshake(&endpoint, &authority)
            .await
            .unwrap();
        let response = send.send_request(get()).await.unwrap();
        assert_eq!(response.text().await.unwrap(), "false -");
        drop(send);
        let _ = connection.await;
        // The next connection resumes it, and the GET goes in 0-RTT.
        let (mut send, _connection) = tower_quiche::client::conn::handshake(&endpoint, &authority)
            .await
            .unwrap();
        let response = send
            .send_request(get())
            .await
            .expect("a 425 to a request the caller did not choose to send early is not the caller's failure");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "false -");
    })
    .await
    .unwrap();
}
