//! The async stream API over loopback: echo on concurrent streams, bounded buffers both
//! ways, resets and stops with their codes, dropped halves, connection close, and stream
//! credit.

mod support;

use std::io;
use std::net::SocketAddr;
use std::task::Context;
use std::time::Duration;
use tower_quiche::quic::QuicheConnection;

use support::echo::EchoClient;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tower_quiche::quic::{Application, Endpoint, Listener, RecvStream, SendStream, StreamConnection, TransportConfig};
use tower_quiche::{Code, Error};

/// A server and a client connected with the stream API; the listener and the endpoint stay
/// alive with them.
struct Pair {
    server: StreamConnection,
    client: StreamConnection,
    _listener: Listener,
    _endpoint: Endpoint,
}

async fn listener(certs: &Certs, server: impl FnOnce(TransportConfig) -> TransportConfig) -> Listener {
    let config = server_builder(certs)
        .transport(server(TransportConfig::new()))
        .build()
        .unwrap();
    Listener::bind("127.0.0.1:0", config).await.unwrap()
}

fn endpoint(certs: &Certs, client: impl FnOnce(TransportConfig) -> TransportConfig) -> Endpoint {
    let config = client_builder(certs)
        .transport(client(TransportConfig::new()))
        .build()
        .unwrap();
    Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config).unwrap()
}

fn authority(addr: SocketAddr) -> String {
    format!("127.0.0.1:{}", addr.port())
}

async fn pair(
    server: impl FnOnce(TransportConfig) -> TransportConfig,
    client: impl FnOnce(TransportConfig) -> TransportConfig,
) -> Pair {
    let certs = certs();
    let mut listener = listener(&certs, server).await;
    let endpoint = endpoint(&certs, client);
    let addr = listener.local_addr();
    let (server, client) = tokio::join!(
        async { listener.accept().await.unwrap().accept_streams().await.unwrap() },
        async { endpoint.connect_streams(&authority(addr)).await.unwrap() },
    );
    Pair {
        server,
        client,
        _listener: listener,
        _endpoint: endpoint,
    }
}

/// The echo of `examples/echo_server.rs`: every bidirectional stream copied back, then
/// finished.
async fn echo(conn: StreamConnection) {
    while let Some((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            tokio::io::copy(&mut recv, &mut send).await?;
            send.shutdown().await
        });
    }
}

/// A listener whose every connection is echoed on the stream API.
async fn echo_listener(certs: &Certs, server: impl FnOnce(TransportConfig) -> TransportConfig) -> SocketAddr {
    let mut listener = listener(certs, server).await;
    let addr = listener.local_addr();
    tokio::spawn(async move {
        while let Some(incoming) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = incoming.accept_streams().await {
                    echo(conn).await;
                }
            });
        }
    });
    addr
}

/// Writes `data` and finishes, while reading the echo: returns what came back.
async fn echo_on(send: &mut SendStream, recv: &mut RecvStream, data: &[u8]) -> io::Result<Vec<u8>> {
    let write = async {
        send.write_all(data).await?;
        send.shutdown().await
    };
    let mut back = Vec::new();
    let read = recv.read_to_end(&mut back);
    let (written, read) = tokio::join!(write, read);
    written?;
    read?;
    Ok(back)
}

/// A bidirectional stream the client opened and the server accepted (once its first
/// bytes, `hello`, arrived): the client's halves, then the server's.
async fn stream_between(pair: &Pair) -> ((SendStream, RecvStream), (SendStream, RecvStream)) {
    let (mut send, recv) = pair.client.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    let server = pair.server.accept_bi().await.expect("a stream");
    ((send, recv), server)
}

/// Writes until a write fails (the peer stopped the stream), and returns the error.
async fn write_until_error(send: &mut SendStream) -> io::Error {
    loop {
        if let Err(e) = send.write(&[0; 1024]).await {
            return e;
        }
        tokio::task::yield_now().await;
    }
}

/// The error an io::Error from a stream carries.
fn inner(e: &io::Error) -> &Error {
    Error::from_io(e).unwrap_or_else(|| panic!("a tower-quiche error inside {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bidi_streams_echo_whole_including_a_large_one() {
    init_tracing();
    let certs = certs();
    let addr = echo_listener(&certs, |b| b).await;
    let endpoint = endpoint(&certs, |b| b);
    let run = async {
        let conn = endpoint.connect_streams(&authority(addr)).await.unwrap();
        let lengths = [4 << 20, 1, 0, 100_000, 300_000, 65_536, 7, 1 << 20];
        let tasks: Vec<_> = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let (mut send, mut recv) = conn.open_bi().await.expect("open");
                    let sent = pattern(len, i as u8);
                    let back = echo_on(&mut send, &mut recv, &sent).await.expect("echo");
                    assert_eq!(back.len(), sent.len(), "stream {i}: length");
                    assert!(back[..] == sent[..], "stream {i}: content");
                })
            })
            .collect();
        join_then_close(tasks, &conn).await;
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// The Application-based echo client of the examples (`echo_client`) against the stream
/// echo server of `echo_server`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_echo_client_passes_against_the_stream_echo_server() {
    init_tracing();
    let certs = certs();
    let addr = echo_listener(&certs, |b| b).await;
    let endpoint = endpoint(&certs, |b| b);
    let run = async {
        let (app, client) = EchoClient::new();
        let conn = endpoint.connect(&authority(addr), app).await.unwrap();
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move {
                    let sent = pattern(200_000 + i * 1000, i as u8);
                    let back = client.echo(sent.clone()).await.expect("echo");
                    assert!(back == sent, "stream {i}: content");
                })
            })
            .collect();
        let chunk = pattern(65_536, 9);
        let echoed = client.echo_repeated(chunk, 64).await.expect("4 MiB echo");
        assert_eq!(echoed.bytes, 4 << 20);
        join_then_close(tasks, &conn).await;
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unidirectional_stream_arrives_whole() {
    let Pair { server, client, .. } = pair(|b| b, |b| b).await;
    let run = async {
        let sent = pattern(500_000, 4);
        let mut send = client.open_uni().await.unwrap();
        let write = async {
            send.write_all(&sent).await.unwrap();
            send.shutdown().await.unwrap();
        };
        let read = async {
            let mut recv = server.accept_uni().await.expect("a stream");
            let mut back = Vec::new();
            recv.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(write, read);
        assert!(back[..] == sent[..]);
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// A reader that does not read holds no more than its receive buffer: the rest waits with
/// the peer, held back by flow control, and the writer stalls with no more than its send
/// buffer. Everything arrives once the reader reads.
/// How many looks in a row must find a writer waiting and nothing moving before a test
/// takes it as stalled.
const STILL_LOOKS: usize = 10;

/// One poll of a write: what it took, or `None` if it waits.
fn write_now(send: &mut SendStream, data: &[u8]) -> Option<io::Result<usize>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(send).poll_write(&mut cx, data) {
        std::task::Poll::Ready(result) => Some(result),
        std::task::Poll::Pending => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_does_not_read_holds_no_more_than_its_buffer() {
    const LIMIT: usize = 64 * 1024;
    let buffers = |b: TransportConfig| b.stream_buffers(LIMIT, LIMIT);
    let Pair { server, client, .. } = pair(buffers, buffers).await;
    let run = async {
        let data = pattern(8 << 20, 5);
        let (mut send, _client_recv) = client.open_bi().await.unwrap();
        send.write_all(&data[..1024]).await.unwrap();
        let (_server_send, mut recv) = server.accept_bi().await.expect("a stream");
        let mut written = 1024;
        // Write until the writer stalls: its write waits (a full send buffer), and nothing
        // moves (the buffered counts of both sides stay the same) over several looks in a
        // row. A slow connection task only makes this take longer.
        let mut still = 0;
        let mut counts = (usize::MAX, usize::MAX);
        while still < STILL_LOOKS {
            match write_now(&mut send, &data[written..]) {
                Some(n) => {
                    written += n.unwrap();
                    still = 0;
                }
                None => {
                    assert_eq!(send.buffered(), LIMIT, "a write waits only on a full send buffer");
                    let now = (recv.buffered(), send.buffered());
                    still = if now == counts { still + 1 } else { 0 };
                    counts = now;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            assert!(
                written < data.len(),
                "all 8 MiB went out while nobody read them: something buffered them"
            );
            assert!(recv.buffered() <= LIMIT, "receive buffer {} > {LIMIT}", recv.buffered());
        }
        assert!(recv.buffered() > 0, "bytes arrived");
        assert!(recv.buffered() <= LIMIT, "receive buffer {} > {LIMIT}", recv.buffered());
        assert!(send.buffered() <= LIMIT, "send buffer {} > {LIMIT}", send.buffered());
        // An empty write completes at once all the same, as on a socket.
        assert_eq!(write_now(&mut send, &[]).map(Result::unwrap), Some(0));
        // Now read: the rest flows, and arrives whole.
        let write = async {
            send.write_all(&data[written..]).await.unwrap();
            send.shutdown().await.unwrap();
        };
        let read = async {
            let mut back = Vec::new();
            recv.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(write, read);
        assert_eq!(back.len(), data.len());
        assert!(back[..] == data[..], "content");
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_surfaces_on_read_with_its_code() {
    let pair = pair(|b| b, |b| b).await;
    let run = async {
        let ((mut send, _), (_, mut recv)) = stream_between(&pair).await;
        send.reset(42);
        let e = recv.read_to_end(&mut Vec::new()).await.expect_err("the read fails");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        assert!(inner(&e).is_reset(), "{e}");
        assert_eq!(inner(&e).code(), Some(Code::Stream(42)));
        // Later writes on the reset stream fail locally.
        assert!(send.write(b"more").await.is_err());
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_surfaces_on_write_with_its_code() {
    let pair = pair(|b| b, |b| b).await;
    let run = async {
        let ((mut send, _), (_, mut recv)) = stream_between(&pair).await;
        recv.stop(7);
        let e = write_until_error(&mut send).await;
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        assert_eq!(inner(&e).code(), Some(Code::Stream(7)));
        // The stopping side's own reads fail locally.
        assert!(recv.read(&mut [0; 8]).await.is_err());
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// A stop that comes with (or before) the end of the peer's direction still fails the
/// writer with its code: reading that end makes quiche forget the stream, which counts a
/// stopped direction as complete, and a write after it would otherwise wait for ever. And
/// a peer that drops both halves (STOP_SENDING and RESET_STREAM at once) fails both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_the_peers_end_still_fails_the_writer() {
    let pair = pair(|b| b, |b| b).await;
    let run = async {
        let ((mut client_send, mut client_recv), (mut server_send, mut server_recv)) = stream_between(&pair).await;
        client_recv.stop(7);
        client_send.shutdown().await.unwrap();
        server_recv.read_to_end(&mut Vec::new()).await.unwrap();
        let e = write_until_error(&mut server_send).await;
        assert_eq!(inner(&e).code(), Some(Code::Stream(7)), "{e}");

        let ((client_send, client_recv), (mut server_send, mut server_recv)) = stream_between(&pair).await;
        drop(client_send);
        drop(client_recv);
        let e = server_recv
            .read_to_end(&mut Vec::new())
            .await
            .expect_err("the read fails");
        assert!(inner(&e).is_reset(), "{e}");
        let e = write_until_error(&mut server_send).await;
        assert_eq!(inner(&e).code(), Some(Code::Stream(0)), "{e}");
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// A writer dropped before it finished resets its stream with code 0; a reader dropped
/// before the end stops it with code 0; a writer that finished and was dropped still
/// delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_halves_tells_the_peer() {
    let pair = pair(|b| b, |b| b).await;
    let run = async {
        // The client's writer goes away unfinished.
        let ((send, _), (_, mut recv)) = stream_between(&pair).await;
        drop(send);
        let e = recv.read_to_end(&mut Vec::new()).await.expect_err("the read fails");
        assert!(inner(&e).is_reset(), "{e}");
        assert_eq!(inner(&e).code(), Some(Code::Stream(0)), "{e}");

        // The server's reader goes away before the end.
        let ((mut send, _), (_, recv)) = stream_between(&pair).await;
        drop(recv);
        let e = write_until_error(&mut send).await;
        assert_eq!(inner(&e).code(), Some(Code::Stream(0)), "{e}");

        // A writer that finished and went away: its bytes arrive whole.
        let sent = pattern(300_000, 6);
        let (mut send, _recv) = pair.client.open_bi().await.unwrap();
        let write = async move {
            send.write_all(&sent).await.unwrap();
            send.finish();
            drop(send);
            sent
        };
        let read = async {
            let (_server_send, mut recv) = pair.server.accept_bi().await.expect("a stream");
            let mut back = Vec::new();
            recv.read_to_end(&mut back).await.unwrap();
            back
        };
        let (sent, back) = tokio::join!(write, read);
        assert!(back[..] == sent[..], "content");
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// A raw peer: sends `data` and FIN on its first unidirectional stream, and closes the
/// connection (code 0) once quiche has forgotten the stream, i.e. the peer acknowledged
/// all of it.
struct SendThenClose {
    data: bytes::Bytes,
    written: usize,
}

impl Application for SendThenClose {
    fn process(&mut self, _: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), Error> {
        const STREAM: u64 = 2;
        if self.written < self.data.len() {
            if let Ok(n) = conn.stream_send(STREAM, &self.data[self.written..], true) {
                self.written += n;
            }
        } else if conn.stream_capacity(STREAM).is_err() {
            let _ = conn.close(true, 0, b"bye");
        }
        Ok(())
    }
}

/// When the connection closes: a pending accept returns `None`, reads and writes of
/// unfinished streams fail instead of waiting, and what fully arrived before the close
/// (more than the receive buffer holds) is read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_ends_accepts_reads_and_writes_and_keeps_what_arrived() {
    const LIMIT: usize = 32 * 1024;
    let certs = certs();
    let mut listener = listener(&certs, |b| b.stream_buffers(LIMIT, LIMIT)).await;
    let endpoint = endpoint(&certs, |b| b);
    let data = pattern(300_000, 8);
    let run = async {
        let addr = listener.local_addr();
        let app = SendThenClose {
            data: data.clone(),
            written: 0,
        };
        let (server, client) = tokio::join!(
            async { listener.accept().await.unwrap().accept_streams().await.unwrap() },
            async { endpoint.connect(&authority(addr), app).await.unwrap() },
        );
        let mut recv = server.accept_uni().await.expect("the peer's stream");
        // A stream of our own, unfinished, and an accept that waits.
        let (mut send, mut own_recv) = server.open_bi().await.unwrap();
        send.write_all(b"unanswered").await.unwrap();
        let accept = tokio::spawn({
            let server = server.clone();
            async move { server.accept_bi().await.is_none() }
        });
        // Nothing is read until the peer has closed.
        let closed = server.closed().await;
        assert!(closed.error().is_none(), "clean close: {:?}", closed.error());
        assert!(accept.await.unwrap(), "the waiting accept_bi returned None");
        let mut back = Vec::new();
        recv.read_to_end(&mut back).await.expect("what arrived is readable");
        assert_eq!(back.len(), data.len(), "all that arrived");
        assert!(back[..] == data[..], "content");
        let e = send.write_all(b"more").await.expect_err("a write fails");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert!(inner(&e).is_closed(), "{e}");
        let e = own_recv.read(&mut [0; 8]).await.expect_err("a read fails");
        assert!(inner(&e).is_closed(), "{e}");
        assert!(
            server.open_bi().await.is_err(),
            "no stream opens on a closed connection"
        );
        assert!(server.accept_uni().await.is_none());
        client.closed().await;
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// With a server that allows one bidirectional stream at a time, a second `open_bi` waits
/// until the first stream has finished both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_bi_waits_for_the_peers_stream_credit() {
    let certs = certs();
    let addr = echo_listener(&certs, |b| b.max_concurrent_bidi_streams(1)).await;
    let endpoint = endpoint(&certs, |b| b);
    let run = async {
        let conn = endpoint.connect_streams(&authority(addr)).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let second = conn.open_bi();
        tokio::pin!(second);
        // While the first stream is open, there is no credit for a second: it cannot
        // complete, however long it waits.
        assert!(
            timeout(Duration::from_millis(300), &mut second).await.is_err(),
            "a second stream opened beyond the server's limit"
        );
        let back = echo_on(&mut send, &mut recv, b"first").await.unwrap();
        assert_eq!(back, b"first");
        let (mut send, mut recv) = second.await.expect("opens once the first has finished");
        let back = echo_on(&mut send, &mut recv, b"second").await.unwrap();
        assert_eq!(back, b"second");
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// Dropping the connection and all its streams closes it (code 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_closes_the_connection() {
    let Pair { server, client, .. } = pair(|b| b, |b| b).await;
    let run = async {
        let (send, recv) = client.open_bi().await.unwrap();
        let handle = client.handle().clone();
        drop(client);
        assert!(!handle.is_closed(), "the streams keep it open");
        drop((send, recv));
        handle.closed().await;
        server.closed().await;
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// A stream written, finished (`shutdown` returns once QUIC has the FIN, not once the peer
/// acknowledged it) and then dropped with the connection still arrives whole: the
/// connection nobody holds delivers it before it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_after_shutdown_still_delivers_the_stream() {
    let Pair {
        server,
        client,
        _listener,
        _endpoint,
    } = pair(|b| b, |b| b).await;
    let run = finish_then_drop_everything(server, client, pattern(4 << 20, 11));
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// Writes `data` on a unidirectional stream of `client`'s, finishes it, drops every handle
/// of `client`'s connection, and checks that `server` reads the stream whole.
async fn finish_then_drop_everything(server: StreamConnection, client: StreamConnection, data: bytes::Bytes) {
    let reader = tokio::spawn(async move {
        let mut recv = server.accept_uni().await.expect("a stream");
        let mut back = Vec::new();
        let result = recv.read_to_end(&mut back).await;
        (result, back.len())
    });
    let mut send = client.open_uni().await.unwrap();
    send.write_all(&data).await.unwrap();
    send.shutdown().await.unwrap();
    // Everything written and finished: the application is done with the connection.
    drop(send);
    drop(client);
    let (result, len) = reader.await.unwrap();
    result.expect("the whole stream arrives: it was written and finished before the drop");
    assert_eq!(len, data.len());
}

/// The same on a slow path, where a finished stream takes longer than the idle timeout to
/// be delivered: the connection nobody holds waits as long as delivery moves on. (A
/// review feared it closed an idle timeout after the last byte went to quiche; quiche
/// takes bytes only as its congestion window has room, so that never comes early.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_delivers_a_finished_stream_slower_than_the_idle_timeout() {
    let certs = certs();
    let mut listener = listener(&certs, |b| b).await;
    let relay = slow_path(listener.local_addr(), Duration::from_millis(100)).await;
    let endpoint = endpoint(&certs, |b| b.idle_timeout(Duration::from_millis(1_000)));
    let (server, client) = tokio::join!(
        async { listener.accept().await.unwrap().accept_streams().await.unwrap() },
        async { endpoint.connect_streams(&authority(relay)).await.unwrap() },
    );
    // 1 MiB: on a 200 ms round trip, the congestion window needs several to send it.
    let run = finish_then_drop_everything(server, client, pattern(1 << 20, 12));
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}

/// A FIN without data needs no flow-control credit: it reaches a peer whose stream window
/// is smaller than a packet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_fin_reaches_a_peer_with_a_small_stream_window() {
    let Pair {
        server,
        client,
        _listener,
        _endpoint,
    } = pair(|b| b.initial_max_stream_data(1000), |b| b).await;
    let run = async {
        let (mut send, _recv) = client.open_bi().await.unwrap();
        send.write_all(b"hi").await.unwrap();
        // All written bytes handed to QUIC: the finish is a FIN without data.
        send.flush().await.unwrap();
        let (_server_send, mut recv) = server.accept_bi().await.expect("a stream");
        send.shutdown().await.expect("the FIN goes");
        let mut back = Vec::new();
        recv.read_to_end(&mut back).await.expect("the stream ends");
        assert_eq!(back, b"hi");
    };
    timeout(Duration::from_secs(20), run)
        .await
        .expect("shutdown and read_to_end complete (the bare FIN goes)");
}

/// The same on a bidirectional stream whose other direction the peer keeps open: the
/// connection nobody holds stops that direction, delivers what was finished, and closes:
/// as soon as the delivery is acknowledged, or at the latest one idle timeout later. (Under
/// load, CI once saw that close take longer than this test's 60 s when the idle timeout
/// was 120 s: the prompt close does not always happen. The idle timeout is 15 s here so
/// that the test checks the delivery, which must never fail, and the close, which must
/// come; why the prompt close is sometimes missed is still open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_delivers_a_finished_bidi_stream_then_closes() {
    let long = |b: TransportConfig| b.idle_timeout(Duration::from_secs(15));
    let Pair { server, client, .. } = pair(long, long).await;
    let run = async {
        let data = pattern(1 << 20, 13);
        let (mut send, recv) = client.open_bi().await.unwrap();
        send.write_all(&data).await.unwrap();
        send.shutdown().await.unwrap();
        let handle = client.handle().clone();
        drop((send, recv, client));
        // The server's direction stays open: its writer neither finishes nor goes away.
        let (_server_send, mut server_recv) = server.accept_bi().await.expect("a stream");
        let mut back = Vec::new();
        server_recv
            .read_to_end(&mut back)
            .await
            .expect("the whole stream arrives");
        assert!(back[..] == data[..], "content");
        handle.closed().await;
        let closed = server.closed().await;
        // Promptly and cleanly, or (the prompt close missed, see above) at the idle
        // timeout: both are the documented contract; nothing else is.
        assert!(
            closed.error().is_none_or(tower_quiche::Error::is_timeout),
            "a clean close or the idle timeout: {:?}",
            closed.error()
        );
    };
    timeout(TEST_TIMEOUT, run).await.expect("in time");
}
