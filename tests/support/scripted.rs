//! A scripted HTTP/3 client on the crate's `Application` seam, for tests that send what a
//! well-behaved client never would. It writes every request stream itself as raw HTTP/3
//! frames (QPACK-encoded heads from quiche's static-table encoder, DATA frames split any
//! way, frames of any type, unidirectional streams of any type), so a head can be cut
//! short or a field list be malformed; quiche's h3 layer only reads what the server sends
//! back and reports it per stream.
//!
//! quiche's h3 layer never opens a request stream here: it numbers its own, and a stream
//! the script opened under the same ID would get a second head written into it.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use quiche::h3::{self, Header, NameValue};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tower_quiche::quic::QuicheConnection;
use tower_quiche::quic::{Application, ClientConfig, ClientConfigBuilder, ConnectionHandle, Endpoint, TransportConfig};

use super::{Certs, TEST_TIMEOUT};

#[allow(unused_imports)] // Not every test binary matches every code.
pub use tower_quiche::codes::{
    H3_EXCESSIVE_LOAD, H3_FRAME_UNEXPECTED, H3_MESSAGE_ERROR, H3_NO_ERROR, H3_REQUEST_CANCELLED, H3_REQUEST_REJECTED,
};

/// Frame types (RFC 9114 §7.2) and stream types (§6.2) the tests write by hand.
pub const DATA: u64 = 0x00;
pub const HEADERS: u64 = 0x01;
/// The client's control and QPACK encoder streams: quiche's h3 layer opens its control
/// stream, then its QPACK encoder and decoder streams, as the client's first three
/// unidirectional streams (`h3::Connection::with_transport`).
pub const CLIENT_CONTROL_STREAM: u64 = 2;
pub const CLIENT_QPACK_ENCODER_STREAM: u64 = 6;
/// SETTINGS_MAX_FIELD_SECTION_SIZE (RFC 9114 §7.2.4.1).
pub const SETTINGS_MAX_FIELD_SECTION_SIZE: u64 = 0x06;

/// The `n`th reserved frame or stream type, `0x1f * n + 0x21` (RFC 9114 §7.2.8, §6.2.3):
/// a receiver must ignore it.
pub fn reserved_type(n: u64) -> u64 {
    0x1f * n + 0x21
}

/// A QUIC variable-length integer (RFC 9000 §16).
pub fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=0x3f => vec![v as u8],
        0x40..=0x3fff => (0x4000 | v as u16).to_be_bytes().to_vec(),
        0x4000..=0x3fff_ffff => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
        _ => (0xc000_0000_0000_0000 | v).to_be_bytes().to_vec(),
    }
}

/// The header of a frame of type `ty` whose payload is `len` bytes long.
pub fn frame_header(ty: u64, len: usize) -> Vec<u8> {
    [varint(ty), varint(len as u64)].concat()
}

/// A whole frame.
pub fn frame(ty: u64, payload: &[u8]) -> Vec<u8> {
    [frame_header(ty, payload.len()), payload.to_vec()].concat()
}

pub fn fields(pairs: &[(&str, &str)]) -> Vec<Header> {
    pairs
        .iter()
        .map(|(n, v)| Header::new(n.as_bytes(), v.as_bytes()))
        .collect()
}

/// A field section as QPACK encodes it without a dynamic table (quiche's encoder, which
/// lowercases names).
pub fn field_block(pairs: &[(&str, &str)]) -> Vec<u8> {
    let list = fields(pairs);
    // Literals are at most their length plus a few bytes of prefix each.
    let room: usize = list.iter().map(|h| h.name().len() + h.value().len() + 16).sum();
    let mut out = vec![0; room + 16];
    let n = h3::qpack::Encoder::new().encode(&list, &mut out).unwrap();
    out.truncate(n);
    out
}

/// A HEADERS frame carrying `pairs`.
pub fn headers_frame(pairs: &[(&str, &str)]) -> Vec<u8> {
    frame(HEADERS, &field_block(pairs))
}

pub fn head<'a>(method: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", method),
        (":scheme", "https"),
        (":authority", "localhost"),
        (":path", path),
    ]
}

/// One thing the scripted client does on its connection's task.
pub type Step = Box<dyn FnOnce(&mut h3::Connection, &mut QuicheConnection) + Send>;

/// What the scripted client saw on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Status(u16),
    Body(Bytes),
    Finished,
    Reset(u64),
    GoAway,
}

/// Every field of every HEADERS frame received, by stream.
type Heads = Arc<Mutex<HashMap<u64, Vec<Vec<(String, String)>>>>>;

struct Scripted {
    h3: Option<h3::Connection>,
    heads: Heads,
    /// Whether it reads what the server sends at all.
    listens: bool,
    steps: mpsc::UnboundedReceiver<Step>,
    seen: mpsc::UnboundedSender<(u64, Seen)>,
}

impl Application for Scripted {
    fn on_established(&mut self, conn: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
        self.h3 = Some(h3::Connection::with_transport(conn, &h3::Config::new().unwrap()).unwrap());
        Ok(())
    }

    fn process(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
        let h3 = self.h3.as_mut().unwrap();
        while let Poll::Ready(Some(step)) = self.steps.poll_recv(cx) {
            step(h3, conn);
        }
        if !self.listens {
            return Ok(());
        }
        loop {
            let seen = match h3.poll(conn) {
                Ok((id, h3::Event::Headers { list, .. })) => {
                    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                    let fields = list.iter().map(|h| (text(h.name()), text(h.value()))).collect();
                    self.heads.lock().unwrap().entry(id).or_default().push(fields);
                    let status = list.iter().find(|h| h.name() == b":status");
                    let status = status.map(|s| std::str::from_utf8(s.value()).unwrap().parse().unwrap());
                    (id, Seen::Status(status.unwrap_or(0)))
                }
                Ok((id, h3::Event::Data)) => {
                    let mut buf = [0; 16384];
                    let mut body = Vec::new();
                    while let Ok(n) = h3.recv_body(conn, id, &mut buf) {
                        body.extend_from_slice(&buf[..n]);
                    }
                    (id, Seen::Body(body.into()))
                }
                Ok((id, h3::Event::Finished)) => (id, Seen::Finished),
                Ok((id, h3::Event::Reset(code))) => (id, Seen::Reset(code)),
                Ok((id, h3::Event::GoAway)) => (id, Seen::GoAway),
                Ok(_) => continue,
                Err(_) => break,
            };
            let _ = self.seen.send(seen);
        }
        Ok(())
    }
}

/// The test's side of a scripted connection.
pub struct Client {
    steps: mpsc::UnboundedSender<Step>,
    pub seen: mpsc::UnboundedReceiver<(u64, Seen)>,
    /// Events of other streams, seen while waiting for one stream's.
    pub parked: VecDeque<(u64, Seen)>,
    pub conn: ConnectionHandle,
    heads: Heads,
    next_request: AtomicU64,
    next_uni: AtomicU64,
}

impl Client {
    /// A client of `server` that reads everything the server sends.
    pub async fn connect(server: &super::h3::H3Server, certs: &Certs) -> Client {
        Self::connect_with(server.addr, Self::config(certs), true).await
    }

    /// The client's default QUIC settings, with `transport`'s changes.
    pub fn config_with(
        certs: &Certs,
        transport: impl FnOnce(TransportConfig) -> TransportConfig,
    ) -> ClientConfigBuilder {
        // Long: within a test, only the server can close the connection.
        let long_idle = TransportConfig::new().idle_timeout(Duration::from_secs(120));
        ClientConfig::builder()
            .ca_pem(&certs.ca_pem)
            .transport(transport(long_idle))
    }

    /// The client's default QUIC settings.
    pub fn config(certs: &Certs) -> ClientConfigBuilder {
        Self::config_with(certs, |t| t)
    }

    /// A client with `config`; one that does not `listen` never reads anything the server
    /// sends (so grants it no more flow-control credit than the initial windows).
    pub async fn connect_with(addr: SocketAddr, config: ClientConfigBuilder, listens: bool) -> Client {
        let endpoint = Endpoint::client_bound("127.0.0.1:0".parse().unwrap(), config.build().unwrap()).unwrap();
        let (steps, steps_rx) = mpsc::unbounded_channel();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let heads = Heads::default();
        let app = Scripted {
            h3: None,
            heads: Arc::clone(&heads),
            listens,
            steps: steps_rx,
            seen: seen_tx,
        };
        let conn = timeout(TEST_TIMEOUT, endpoint.connect_addr(addr, Some("localhost"), app))
            .await
            .unwrap()
            .unwrap();
        let client = Client {
            steps,
            seen,
            parked: VecDeque::new(),
            conn,
            heads,
            next_request: AtomicU64::new(0),
            next_uni: AtomicU64::new(0),
        };
        // quiche's h3 layer opened its control, QPACK and GREASE streams: ours come after.
        let first_free = client
            .run(|_, conn| (2..).step_by(4).find(|&id| conn.stream_capacity(id).is_err()).unwrap())
            .await;
        client.next_uni.store(first_free, Ordering::Relaxed);
        client
    }

    /// The values of field `name` in the heads stream `id` received so far.
    pub fn field(&self, id: u64, name: &str) -> Vec<String> {
        let heads = self.heads.lock().unwrap();
        let fields = heads.get(&id).into_iter().flatten().flatten();
        fields.filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect()
    }

    /// Runs `f` on the connection's task and returns what it returns.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut h3::Connection, &mut QuicheConnection) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = oneshot::channel();
        let step: Step = Box::new(move |h3, conn| {
            let _ = tx.send(f(h3, conn));
        });
        self.steps.send(step).unwrap();
        timeout(TEST_TIMEOUT, rx).await.unwrap().unwrap()
    }

    /// The ID of a new request stream, for the caller to write (nothing is sent yet).
    pub fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(4, Ordering::Relaxed)
    }

    /// Writes all of `bytes` on stream `id` (then FIN if `fin`), waiting for flow-control
    /// credit between parts; fails with quiche's error if the stream cannot take them (the
    /// peer stopped it, or no stream credit is left to open it).
    pub async fn send_raw(&self, id: u64, bytes: impl Into<Bytes>, fin: bool) -> Result<(), quiche::Error> {
        let bytes = bytes.into();
        let mut at = 0;
        let deadline = Instant::now() + TEST_TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "stream {id}'s bytes went out in time");
            let part = bytes.slice(at..);
            let n = self
                .run(move |_, conn| match conn.stream_send(id, &part, fin) {
                    Ok(n) => Ok(n),
                    Err(quiche::Error::Done) => Ok(0),
                    Err(e) => Err(e),
                })
                .await?;
            at += n;
            if at == bytes.len() {
                return Ok(());
            }
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    /// Opens a request stream with `pairs` as its head; `fin` when no body follows.
    pub async fn request(&self, pairs: &[(&str, &str)], fin: bool) -> u64 {
        let id = self.next_request_id();
        self.send_raw(id, headers_frame(pairs), fin)
            .await
            .expect("request head");
        id
    }

    /// Sends a small body part on a request stream as one DATA frame, waiting for
    /// flow-control credit as needed (under load the server may not have returned it yet).
    pub async fn body(&self, id: u64, bytes: Vec<u8>, fin: bool) {
        self.send_raw(id, frame(DATA, &bytes), fin)
            .await
            .expect("a body part goes out");
    }

    /// Sends a whole body as one DATA frame and finishes the stream.
    pub async fn body_all(&self, id: u64, bytes: Vec<u8>) {
        let data = frame(DATA, &bytes);
        if let Err(e) = self.send_raw(id, data, true).await {
            panic!("the server stopped the body: {e:?}");
        }
    }

    /// Sends a trailer section (a HEADERS frame after the body).
    pub async fn trailers(&self, id: u64, pairs: &[(&str, &str)], fin: bool) {
        self.send_raw(id, headers_frame(pairs), fin).await.expect("trailers");
    }

    /// Opens a unidirectional stream of type `ty` (its type is written, nothing else).
    pub async fn open_uni(&self, ty: u64) -> Result<u64, quiche::Error> {
        let id = self.next_uni.load(Ordering::Relaxed);
        self.send_raw(id, varint(ty), false).await?;
        // Numbered once it exists: quiche refuses an ID beyond the peer's stream limit.
        self.next_uni.store(id + 4, Ordering::Relaxed);
        Ok(id)
    }

    /// The server's SETTINGS value for `id`, once its SETTINGS frame has arrived (a
    /// listening client reads it with the first response).
    pub async fn peer_setting(&self, id: u64) -> Option<u64> {
        self.run(move |h3, _| {
            let settings = h3.peer_settings_raw()?;
            settings.iter().find(|(k, _)| *k == id).map(|&(_, v)| v)
        })
        .await
    }

    /// What happens next on stream `id` (other streams' events are parked), or `None` when
    /// nothing does within `wait`.
    pub async fn next_on(&mut self, id: u64, wait: Duration) -> Option<Seen> {
        if let Some(at) = self.parked.iter().position(|(sid, _)| *sid == id) {
            return self.parked.remove(at).map(|(_, seen)| seen);
        }
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.seen.recv()).await {
                Ok(Some((sid, seen))) if sid == id => return Some(seen),
                Ok(Some(other)) => self.parked.push_back(other),
                _ => return None,
            }
        }
    }

    /// The status of stream `id`'s response, or how the stream was reset.
    pub async fn outcome(&mut self, id: u64) -> Seen {
        loop {
            match self.next_on(id, TEST_TIMEOUT).await.expect("an outcome in time") {
                Seen::Body(_) | Seen::Finished => continue,
                other => return other,
            }
        }
    }

    /// Reads stream `id` to its end: the status and the body.
    pub async fn response_body(&mut self, id: u64) -> (u16, Vec<u8>) {
        let mut status = None;
        let mut body = Vec::new();
        loop {
            match self.next_on(id, TEST_TIMEOUT).await.expect("a response in time") {
                Seen::Status(s) => status = Some(s),
                Seen::Body(b) => body.extend_from_slice(&b),
                Seen::Finished => return (status.expect("a head first"), body),
                Seen::Reset(code) => panic!("stream {id} reset with {code:#x}"),
                Seen::GoAway => {}
            }
        }
    }

    /// Reads stream `id` to its end: the status and the body length.
    pub async fn response(&mut self, id: u64) -> (u16, usize) {
        let (status, body) = self.response_body(id).await;
        (status, body.len())
    }

    /// The code the server reset stream `id` with, if it does so within `wait`. Asks quiche
    /// directly as well as waiting for the h3 layer's event, and without reading any data
    /// (a zero-length read): a client that does not listen grants no credit by asking.
    pub async fn reset_code(&mut self, id: u64, wait: Duration) -> Option<u64> {
        let deadline = Instant::now() + wait;
        loop {
            while let Some(seen) = self.next_on(id, Duration::ZERO).await {
                if let Seen::Reset(code) = seen {
                    return Some(code);
                }
            }
            let code = self
                .run(move |_, conn| match conn.stream_recv(id, &mut []) {
                    Err(quiche::Error::StreamReset(code)) => Some(code),
                    _ => None,
                })
                .await;
            if code.is_some() || Instant::now() >= deadline {
                return code;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
