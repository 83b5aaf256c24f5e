//! Raw HTTP/3 from the scripted client of `support::scripted` (it sends whatever fields
//! it is given): each malformed request must get H3_MESSAGE_ERROR on its own stream while
//! the connection goes on serving, and a client's GOAWAY must close the connection once its
//! requests are done.

mod support;

use std::time::Duration;

use support::h3::*;
use support::scripted::*;
use support::*;
use tokio::time::timeout;
use tower_quiche::server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_malformed_request_gets_a_message_error_and_the_connection_lives_on() {
    let certs = certs();
    let server = h3_server(&certs, server::Builder::new().max_header_list_size(4096)).await;
    let mut client = Client::connect(&server, &certs).await;
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
        let id = client.request(&pairs, body.is_none()).await;
        if let Some(body) = body {
            client.body(id, body, true).await;
        }
        assert_eq!(
            client.outcome(id).await,
            Seen::Reset(0x10e),
            "{name}: expected H3_MESSAGE_ERROR"
        );
    }
    // A header section over the limit gets 431, and the connection still serves.
    let big = "v".repeat(5000);
    let id = client.request(&[&base[..], &[("x-big", &big)]].concat(), true).await;
    assert_eq!(client.outcome(id).await, Seen::Status(431));
    let id = client.request(&base, true).await;
    assert_eq!(client.outcome(id).await, Seen::Status(200));
    assert_eq!(
        server.metrics.snapshot().handshakes_completed,
        1,
        "one connection throughout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_goaway_closes_the_connection_once_its_requests_are_done() {
    let certs = certs();
    // The idle timeout is long: only the GOAWAY can close the connection within the test.
    let server = h3_server(&certs, server::Builder::new()).await;
    let mut client = Client::connect(&server, &certs).await;
    let id = client.request(&head("GET", "/hello"), true).await;
    assert_eq!(client.outcome(id).await, Seen::Status(200));
    client.run(|h3, conn| h3.send_goaway(conn, 0).unwrap()).await;
    let closed = timeout(Duration::from_secs(5), client.conn.closed())
        .await
        .expect("closed promptly after GOAWAY");
    assert!(
        closed.error().is_none(),
        "closed with H3_NO_ERROR: {:?}",
        closed.error()
    );
}
