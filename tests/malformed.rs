//! Raw HTTP/3 from quiche's client on the `Application` seam (quiche sends whatever fields
//! it is given): each malformed request must get H3_MESSAGE_ERROR on its own stream while
//! the connection goes on serving, and a client's GOAWAY must close the connection once its
//! requests are done.

mod support;

use std::collections::HashMap;
use std::task::{Context, Poll};

use quiche::h3::{self, Header, NameValue};
use support::h3::*;
use support::*;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tower_quiche::quic::{Application, Config, Endpoint};
use tower_quiche::server;

/// What happened to one raw request.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    Reset(u64),
}

struct Raw {
    fields: Vec<Header>,
    body: Option<Vec<u8>>,
    reply: oneshot::Sender<Outcome>,
}

/// A minimal HTTP/3 client that sends field lists as they are.
struct RawClient {
    h3: Option<h3::Connection>,
    jobs: mpsc::Receiver<Raw>,
    waiting: HashMap<u64, oneshot::Sender<Outcome>>,
}

impl Application for RawClient {
    fn on_established(&mut self, conn: &mut quiche::Connection) -> Result<(), tower_quiche::Error> {
        self.h3 = Some(h3::Connection::with_transport(conn, &h3::Config::new().unwrap()).unwrap());
        Ok(())
    }

    fn process(&mut self, cx: &mut Context<'_>, conn: &mut quiche::Connection) -> Result<(), tower_quiche::Error> {
        let h3 = self.h3.as_mut().unwrap();
        while let Poll::Ready(Some(job)) = self.jobs.poll_recv(cx) {
            let id = h3.send_request(conn, &job.fields, job.body.is_none()).unwrap();
            if let Some(body) = &job.body {
                h3.send_body(conn, id, body, true).unwrap();
            }
            self.waiting.insert(id, job.reply);
        }
        loop {
            match h3.poll(conn) {
                Ok((id, h3::Event::Headers { list, .. })) => {
                    let status = list
                        .iter()
                        .find(|h| h.name() == b":status")
                        .map(|h| std::str::from_utf8(h.value()).unwrap().parse().unwrap());
                    if let (Some(reply), Some(status)) = (self.waiting.remove(&id), status) {
                        let _ = reply.send(Outcome::Status(status));
                    }
                }
                Ok((id, h3::Event::Reset(code))) => {
                    if let Some(reply) = self.waiting.remove(&id) {
                        let _ = reply.send(Outcome::Reset(code));
                    }
                }
                Ok((id, h3::Event::Data)) => {
                    let mut buf = [0; 4096];
                    while h3.recv_body(conn, id, &mut buf).is_ok() {}
                }
                Ok(_) => {}
                Err(h3::Error::Done) => break,
                Err(e) => panic!("connection error: {e:?}"),
            }
        }
        Ok(())
    }
}

fn fields(pairs: &[(&str, &str)]) -> Vec<Header> {
    pairs
        .iter()
        .map(|(n, v)| Header::new(n.as_bytes(), v.as_bytes()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_malformed_request_gets_a_message_error_and_the_connection_lives_on() {
    let certs = certs();
    let server = h3_server(&certs, server::Builder::new().max_header_list_size(4096)).await;
    let config = Config::builder().alpn(["h3"]).ca_pem(&certs.ca_pem).build().unwrap();
    let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let (tx, rx) = mpsc::channel(64);
    let app = RawClient {
        h3: None,
        jobs: rx,
        waiting: HashMap::new(),
    };
    let _conn = timeout(TEST_TIMEOUT, endpoint.connect_addr(server.addr, Some("localhost"), app))
        .await
        .unwrap()
        .unwrap();
    let base = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", "/hello"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| [&base[..], extra].concat();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<Vec<u8>>);
    let cases: Vec<Case> = vec![
        ("missing :method", base[1..].to_vec(), None),
        ("missing :scheme", vec![base[0], base[2], base[3]], None),
        ("missing :path", base[..3].to_vec(), None),
        ("empty :path", vec![base[0], base[1], base[2], (":path", "")], None),
        ("no authority or host", vec![base[0], base[1], base[3]], None),
        ("repeated :path", with(&[(":path", "/other")]), None),
        ("response pseudo-header", with(&[(":status", "200")]), None),
        ("unknown pseudo-header", with(&[(":nonsense", "1")]), None),
        (
            "pseudo-header after a regular one",
            vec![base[0], base[1], ("accept", "*/*"), base[2], base[3]],
            None,
        ),
        // Uppercase names: quiche's QPACK encoder lowercases them, so this client cannot
        // send one; the aioquic battery in CI does (abuse_uppercase_header).
        ("connection", with(&[("connection", "keep-alive")]), None),
        ("transfer-encoding", with(&[("transfer-encoding", "chunked")]), None),
        ("keep-alive", with(&[("keep-alive", "5")]), None),
        ("upgrade", with(&[("upgrade", "websocket")]), None),
        ("te other than trailers", with(&[("te", "gzip")]), None),
        (
            "relative :path",
            vec![base[0], base[1], base[2], (":path", "hello")],
            None,
        ),
        (
            "CONNECT with :scheme and :path",
            vec![
                (":method", "CONNECT"),
                (":scheme", "https"),
                (":authority", "localhost:1"),
                (":path", "/"),
            ],
            None,
        ),
        ("CONNECT without :authority", vec![(":method", "CONNECT")], None),
        (":authority and host differ", with(&[("host", "elsewhere")]), None),
        ("invalid content-length", with(&[("content-length", "ten")]), None),
        (
            "body longer than content-length",
            vec![
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", "/sink"),
                ("content-length", "10"),
            ],
            Some(vec![b'x'; 100]),
        ),
        (
            "body shorter than content-length",
            vec![
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", "/sink"),
                ("content-length", "1000"),
            ],
            Some(vec![b'x'; 10]),
        ),
        ("content-length with no body", with(&[("content-length", "5")]), None),
    ];
    for (name, pairs, body) in cases {
        let (reply, outcome) = oneshot::channel();
        tx.send(Raw {
            fields: fields(&pairs),
            body,
            reply,
        })
        .await
        .unwrap();
        let outcome = timeout(TEST_TIMEOUT, outcome).await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Reset(0x10e), "{name}: expected H3_MESSAGE_ERROR");
    }
    // A header section over the limit gets 431, and the connection still serves.
    let big = "v".repeat(5000);
    let (reply, outcome) = oneshot::channel();
    let mut list = fields(&base);
    list.push(Header::new(b"x-big", big.as_bytes()));
    tx.send(Raw {
        fields: list,
        body: None,
        reply,
    })
    .await
    .unwrap();
    assert_eq!(
        timeout(TEST_TIMEOUT, outcome).await.unwrap().unwrap(),
        Outcome::Status(431)
    );
    let (reply, outcome) = oneshot::channel();
    tx.send(Raw {
        fields: fields(&base),
        body: None,
        reply,
    })
    .await
    .unwrap();
    assert_eq!(
        timeout(TEST_TIMEOUT, outcome).await.unwrap().unwrap(),
        Outcome::Status(200)
    );
    assert_eq!(
        server.metrics.snapshot().handshakes_completed,
        1,
        "one connection throughout"
    );
}

/// Sends one request, then GOAWAY once the response has arrived.
struct GoAwayClient {
    h3: Option<h3::Connection>,
    sent: bool,
    answered: Option<oneshot::Sender<u16>>,
}

impl Application for GoAwayClient {
    fn on_established(&mut self, conn: &mut quiche::Connection) -> Result<(), tower_quiche::Error> {
        self.h3 = Some(h3::Connection::with_transport(conn, &h3::Config::new().unwrap()).unwrap());
        Ok(())
    }

    fn process(&mut self, _cx: &mut Context<'_>, conn: &mut quiche::Connection) -> Result<(), tower_quiche::Error> {
        let h3 = self.h3.as_mut().unwrap();
        if !self.sent {
            let base = [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "localhost"),
                (":path", "/hello"),
            ];
            h3.send_request(conn, &fields(&base), true).unwrap();
            self.sent = true;
        }
        loop {
            match h3.poll(conn) {
                Ok((_, h3::Event::Headers { list, .. })) => {
                    let status = list.iter().find(|h| h.name() == b":status").unwrap();
                    let status = std::str::from_utf8(status.value()).unwrap().parse().unwrap();
                    if let Some(answered) = self.answered.take() {
                        let _ = answered.send(status);
                        h3.send_goaway(conn, 0).unwrap();
                    }
                }
                Ok((id, h3::Event::Data)) => {
                    let mut buf = [0; 4096];
                    while h3.recv_body(conn, id, &mut buf).is_ok() {}
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_goaway_closes_the_connection_once_its_requests_are_done() {
    let certs = certs();
    // The idle timeout is long: only the GOAWAY can close the connection within the test.
    let server = h3_server(&certs, server::Builder::new()).await;
    let config = Config::builder()
        .alpn(["h3"])
        .ca_pem(&certs.ca_pem)
        .idle_timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let (answered, status) = oneshot::channel();
    let app = GoAwayClient {
        h3: None,
        sent: false,
        answered: Some(answered),
    };
    let conn = timeout(TEST_TIMEOUT, endpoint.connect_addr(server.addr, Some("localhost"), app))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(timeout(TEST_TIMEOUT, status).await.unwrap().unwrap(), 200);
    let closed = timeout(std::time::Duration::from_secs(5), conn.closed())
        .await
        .expect("closed promptly after GOAWAY");
    assert!(
        closed.error().is_none(),
        "closed with H3_NO_ERROR: {:?}",
        closed.error()
    );
}
