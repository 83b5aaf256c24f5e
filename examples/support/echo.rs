//! A raw-QUIC echo protocol (ALPN `echo`), and a small example of the
//! [`Application`](tower_quiche::quic::Application) seam: a protocol of your own over
//! `tower_quiche::quic`, outside the crate.
//!
//! Every bidirectional stream a client opens is echoed back byte for byte, and finished when
//! the client finishes its side. [`EchoServer`] is the server side; [`EchoClient`] opens
//! streams on request from an [`EchoHandle`] and checks what comes back.
//!
//! Used by the `echo_server` and `echo_client` examples, and by the integration tests
//! (`tests/support/mod.rs` includes this file).
//!
//! ```ignore
//! let config = ClientConfig::builder().alpn([echo::ALPN]).ca_pem_file("ca.pem").build()?;
//! let endpoint = Endpoint::client(config)?;
//! let (app, client) = echo::EchoClient::new();
//! let connection = endpoint.connect("localhost:4433", app).await?;
//! let back = client.echo(bytes::Bytes::from_static(b"hello")).await?;
//! assert_eq!(&back[..], b"hello");
//! connection.close(0, "done");
//! ```

use std::collections::HashMap;
use std::task::{Context, Poll};
use tower_quiche::quic::QuicheConnection;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use tower_quiche::quic::Application;

/// Why an echo failed: what the handle's caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EchoError {
    /// The echo differed from what was sent, or the stream failed.
    Protocol(String),
    /// The server reset the echo stream with this code.
    Reset(u64),
    /// The connection closed before the echo was complete.
    Closed,
    /// The request made no sense (an empty payload to repeat).
    Invalid(&'static str),
}

impl std::fmt::Display for EchoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EchoError::Protocol(why) => f.write_str(why),
            EchoError::Reset(code) => write!(f, "the server reset the echo stream with code {code}"),
            EchoError::Closed => f.write_str("the echo connection closed"),
            EchoError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for EchoError {}

/// The echo protocol's ALPN name.
pub const ALPN: &str = "echo";

/// How much of a stream is moved per read: one buffer per connection, reused.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Streams waiting for the peer's stream credit, queued in the client.
const JOB_QUEUE: usize = 64;

fn is_client_bidi(stream_id: u64) -> bool {
    stream_id.is_multiple_of(4)
}

/// The server side: echoes every client-opened bidirectional stream.
///
/// It reads a stream only as far as that stream can take the echo (its send capacity), so
/// it never buffers: a client that does not read its echo stalls its own upload through
/// QUIC flow control.
pub struct EchoServer {
    scratch: Box<[u8]>,
}

impl Default for EchoServer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for EchoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoServer").finish_non_exhaustive()
    }
}

impl EchoServer {
    /// A new echo server application, for one connection.
    pub fn new() -> Self {
        EchoServer {
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
        }
    }
}

impl Application for EchoServer {
    fn process(&mut self, _cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
        for stream in conn.readable() {
            if !is_client_bidi(stream) {
                // Not ours to echo: read and discard, so it cannot hold flow-control credit.
                while conn.stream_recv(stream, &mut self.scratch).is_ok() {}
                continue;
            }
            loop {
                let room = match conn.stream_capacity(stream) {
                    Ok(room) => room,
                    Err(_) => {
                        // The client stopped reading its echo (STOP_SENDING): stop ours.
                        let _ = conn.stream_shutdown(stream, quiche::Shutdown::Read, 0);
                        break;
                    }
                };
                if room == 0 {
                    break;
                }
                let want = room.min(self.scratch.len());
                match conn.stream_recv(stream, &mut self.scratch[..want]) {
                    Ok((n, fin)) => {
                        // `room` bytes fit, so all `n` are taken.
                        let _ = conn.stream_send(stream, &self.scratch[..n], fin);
                        if fin {
                            break;
                        }
                    }
                    Err(quiche::Error::StreamReset(code)) => {
                        let _ = conn.stream_shutdown(stream, quiche::Shutdown::Write, code);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        Ok(())
    }
}

/// What came back on one echo stream.
#[derive(Debug, Clone)]
pub struct Echoed {
    /// Bytes echoed back.
    pub bytes: u64,
    /// The echoed bytes, when collected ([`EchoHandle::echo`]).
    pub data: Option<Bytes>,
}

struct Job {
    data: Bytes,
    total: u64,
    collect: bool,
    reply: oneshot::Sender<Result<Echoed, EchoError>>,
}

struct Active {
    job: Job,
    written: u64,
    received: u64,
    collected: BytesMut,
    fin_sent: bool,
}

impl Active {
    /// Writes as much of the payload as the stream takes.
    fn write(&mut self, conn: &mut QuicheConnection, stream: u64) {
        let len = self.job.data.len() as u64;
        while !self.fin_sent {
            let chunk: &[u8] = if self.written < self.job.total {
                let offset = (self.written % len) as usize;
                let left = (self.job.total - self.written) as usize;
                &self.job.data[offset..(offset + left).min(len as usize)]
            } else {
                &[]
            };
            let fin = self.written + chunk.len() as u64 == self.job.total;
            match conn.stream_send(stream, chunk, fin) {
                Ok(n) => {
                    self.written += n as u64;
                    if n == chunk.len() && fin {
                        self.fin_sent = true;
                    }
                    if n < chunk.len() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Checks received bytes against the payload, cyclically; returns false on a mismatch.
    fn check(&mut self, bytes: &[u8]) -> bool {
        let data = &self.job.data;
        let len = data.len() as u64;
        let mut at = 0;
        while at < bytes.len() {
            let offset = ((self.received + at as u64) % len) as usize;
            let n = (data.len() - offset).min(bytes.len() - at);
            if bytes[at..at + n] != data[offset..offset + n] {
                return false;
            }
            at += n;
        }
        if self.job.collect {
            self.collected.extend_from_slice(bytes);
        }
        self.received += bytes.len() as u64;
        true
    }
}

/// The client side: opens one stream per [`EchoHandle`] request and checks the echo.
pub struct EchoClient {
    jobs: mpsc::Receiver<Job>,
    waiting: Option<Job>,
    active: HashMap<u64, Active>,
    next_stream: u64,
    scratch: Box<[u8]>,
}

impl std::fmt::Debug for EchoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoClient")
            .field("active", &self.active.len())
            .finish_non_exhaustive()
    }
}

/// Asks an [`EchoClient`] to echo data; cheap to clone.
#[derive(Clone, Debug)]
pub struct EchoHandle {
    jobs: mpsc::Sender<Job>,
}

impl EchoClient {
    /// The client application and the handle that sends it work.
    pub fn new() -> (EchoClient, EchoHandle) {
        let (tx, rx) = mpsc::channel(JOB_QUEUE);
        let client = EchoClient {
            jobs: rx,
            waiting: None,
            active: HashMap::new(),
            next_stream: 0,
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
        };
        (client, EchoHandle { jobs: tx })
    }
}

impl EchoHandle {
    /// Echoes `data` on a new stream and returns what came back.
    pub async fn echo(&self, data: Bytes) -> Result<Bytes, EchoError> {
        let total = data.len() as u64;
        let echoed = self.submit(data, total, true).await?;
        Ok(echoed.data.unwrap_or_default())
    }

    /// Sends `data` `times` times over on one new stream, and checks the echo byte by byte
    /// without keeping it: for large transfers.
    pub async fn echo_repeated(&self, data: Bytes, times: u64) -> Result<Echoed, EchoError> {
        if data.is_empty() {
            return Err(EchoError::Invalid("echo_repeated needs a non-empty payload"));
        }
        let total = data.len() as u64 * times;
        self.submit(data, total, false).await
    }

    async fn submit(&self, data: Bytes, total: u64, collect: bool) -> Result<Echoed, EchoError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                data,
                total,
                collect,
                reply,
            })
            .await
            .map_err(|_| EchoError::Closed)?;
        rx.await.map_err(|_| EchoError::Closed)?
    }
}

impl Application for EchoClient {
    fn process(&mut self, cx: &mut Context<'_>, conn: &mut QuicheConnection) -> Result<(), tower_quiche::Error> {
        loop {
            if self.waiting.is_none() {
                match self.jobs.poll_recv(cx) {
                    Poll::Ready(Some(job)) => self.waiting = Some(job),
                    _ => break,
                }
            }
            // Streams beyond the peer's credit wait here; its MAX_STREAMS wakes us.
            if conn.peer_streams_left_bidi() == 0 {
                break;
            }
            let Some(job) = self.waiting.take() else {
                break;
            };
            let stream = self.next_stream;
            self.next_stream += 4;
            self.active.insert(
                stream,
                Active {
                    job,
                    written: 0,
                    received: 0,
                    collected: BytesMut::new(),
                    fin_sent: false,
                },
            );
        }
        for (&stream, active) in self.active.iter_mut() {
            active.write(conn, stream);
        }
        for stream in conn.readable() {
            let Some(active) = self.active.get_mut(&stream) else {
                while conn.stream_recv(stream, &mut self.scratch).is_ok() {}
                continue;
            };
            let outcome = loop {
                match conn.stream_recv(stream, &mut self.scratch) {
                    Ok((n, fin)) => {
                        if !active.check(&self.scratch[..n]) {
                            break Some(Err(EchoError::Protocol(format!(
                                "the echo differs from what was sent, within bytes {}..{}",
                                active.received,
                                active.received + n as u64
                            ))));
                        }
                        if fin {
                            break Some(if active.received == active.job.total {
                                Ok(())
                            } else {
                                Err(EchoError::Protocol(format!(
                                    "the echo ended after {} of {} bytes",
                                    active.received, active.job.total
                                )))
                            });
                        }
                    }
                    Err(quiche::Error::Done) => break None,
                    Err(quiche::Error::StreamReset(code)) => {
                        break Some(Err(EchoError::Reset(code)));
                    }
                    Err(e) => {
                        break Some(Err(EchoError::Protocol(e.to_string())));
                    }
                }
            };
            if let Some(result) = outcome {
                let active = self.active.remove(&stream).expect("present above");
                let collected = active.job.collect.then(|| active.collected.freeze());
                let _ = active.job.reply.send(result.map(|()| Echoed {
                    bytes: active.received,
                    data: collected,
                }));
            }
        }
        Ok(())
    }
}
