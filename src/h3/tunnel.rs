//! A CONNECT stream as a byte stream: [`Tunnel`] (`AsyncRead + AsyncWrite`) over the
//! message bodies of an extended CONNECT (RFC 9220, e.g. WebSocket over HTTP/3) or a plain
//! CONNECT request.
//!
//! After a 2xx answer to CONNECT, what each side sends in its message body is the tunnel's
//! content. A tunnel reads the body that arrives and writes into a [`TunnelBody`], the body
//! that goes out: the response's on a server, the request's on a client.
//!
//! ```no_run
//! use http::{Request, Response};
//! use tower_quiche::RecvBody;
//! use tower_quiche::tunnel::{Tunnel, TunnelBody};
//!
//! // A handler of extended CONNECT requests that echoes the tunnel's bytes.
//! async fn echo(request: Request<RecvBody>) -> Response<TunnelBody> {
//!     let (mut tunnel, body) = Tunnel::from_request(request);
//!     tokio::spawn(async move {
//!         let (mut read, mut write) = tokio::io::split(&mut tunnel);
//!         let _ = tokio::io::copy(&mut read, &mut write).await;
//!         let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
//!     });
//!     Response::new(body)
//! }
//! ```
//!
//! What is written waits in a buffer of [`BUFFER`] bytes until the connection sends it, and
//! the writer waits while it is full; what arrives is read only as fast as the tunnel is
//! read, so QUIC flow control holds the peer back.
//!
//! A tunnel is HTTP/3's: over HTTP/2 (the TCP side of
//! [`serve_with_tcp`](crate::server::serve_with_tcp)) hyper gives a CONNECT an empty body,
//! drops a 2xx answer's, and hands the stream over as an upgrade (`hyper::upgrade::on`):
//! look at the request's version, or use [`ws::WebSocketUpgrade`](crate::ws::WebSocketUpgrade),
//! which takes either. Over HTTP/3 the tunnel's bytes are the request's body; a server's
//! `Tunnel::from_request` reads the request's stream past middleware that wraps request
//! bodies (a size limit, a timeout), where [`Tunnel::new`] reads the body as it was
//! wrapped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use super::body::ResetStream;
use super::datagram::Datagrams;
use crate::error::BoxError;

/// How many bytes a tunnel's writer may have written that its [`TunnelBody`] has not yet
/// handed to the connection.
pub const BUFFER: usize = 64 * 1024;

/// The most a [`TunnelBody`] hands the connection in one frame.
const FRAME: usize = 16 * 1024;

/// One side of a CONNECT tunnel: reads what the peer sends, writes what goes to it.
///
/// Shutting the writer down ([`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown),
/// or dropping the tunnel) ends the outgoing body, which finishes the stream; [`reset`]
/// ends it abruptly instead. A read error means the peer reset the stream (or the
/// connection went); the first one carries the peer's code ([`Error::from_io`]).
///
/// [`reset`]: Tunnel::reset
/// [`Error::from_io`]: crate::Error::from_io
pub struct Tunnel {
    incoming: UnsyncBoxBody<Bytes, BoxError>,
    /// What arrived and has not been read yet.
    chunk: Bytes,
    incoming_done: bool,
    /// The incoming body failed (the peer reset the stream): every later read fails too.
    incoming_failed: bool,
    outgoing: DuplexStream,
    /// Shared with the [`TunnelBody`]: the code [`Tunnel::reset`] asked for, plus one (0:
    /// none; codes are below 2^62).
    reset: Arc<AtomicU64>,
    /// The stream's HTTP datagrams, on a client, until taken.
    datagrams: Option<Datagrams>,
}

/// The outgoing half of a tunnel, as a message body: what the [`Tunnel`] writes.
pub struct TunnelBody {
    outgoing: DuplexStream,
    reset: Arc<AtomicU64>,
    done: bool,
}

/// A tunnel whose outgoing body exists before the incoming one (a client sends its request
/// before the response arrives); [`with_incoming`](Self::with_incoming) completes it.
pub struct PendingTunnel {
    outgoing: DuplexStream,
    reset: Arc<AtomicU64>,
}

/// A CONNECT request's HTTP/3 stream, as the server put it in the request's extensions:
/// what [`Tunnel::from_request`] reads, past whatever middleware made of the request's
/// body (a size limit, a timeout), as hyper's upgrade does over TCP.
#[cfg(feature = "server")]
#[derive(Clone)]
pub(crate) struct ConnectStream(pub(crate) Arc<crate::h3::stream::StreamShared>);

impl Tunnel {
    /// The tunnel of an HTTP/3 CONNECT request (on a server), and the body it writes into
    /// (to answer with, in a 2xx response). It reads the request's stream itself, as the
    /// server put it in the request's extensions, not the request's body: middleware that
    /// wraps request bodies (tower-http's `RequestBodyLimitLayer`, a body timeout) would
    /// otherwise end the tunnel after so many bytes or so long. The request's body must not
    /// have been read (what was is not read again), nor be kept and read beside the
    /// tunnel; if middleware dropped it, the tunnel fails at its first read (the stream's
    /// bytes were discarded since). A request without the stream (built by hand, or over
    /// HTTP/2, whose CONNECT body is empty: see the module's docs) is read through its
    /// body, as [`new`](Self::new) does.
    #[cfg(feature = "server")]
    pub fn from_request<B>(mut request: http::Request<B>) -> (Tunnel, TunnelBody)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let Some(ConnectStream(stream)) = request.extensions_mut().remove::<ConnectStream>() else {
            return Tunnel::new(request.into_body());
        };
        // Counted as a reader before the request's body (maybe wrapped) goes with `request`.
        match super::body::RecvBody::another_reader(stream) {
            Some(body) => Tunnel::new(body),
            // Middleware dropped the body before: its bytes were discarded since. The tunnel
            // fails rather than end as if the peer had sent nothing.
            None => {
                let gone: BoxError = "the request's body was dropped before the tunnel took its stream".into();
                Tunnel::new(http_body_util::StreamBody::new(futures_util::stream::once(
                    std::future::ready(Err::<Frame<Bytes>, BoxError>(gone)),
                )))
            }
        }
    }

    /// A tunnel reading `incoming` (the request body, on a server), and the body it writes
    /// into (to answer with, in a 2xx response). On a server `Tunnel::from_request` is
    /// better: request-body middleware does not reach it.
    pub fn new<B>(incoming: B) -> (Tunnel, TunnelBody)
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (pending, body) = Tunnel::outgoing();
        (pending.with_incoming(incoming), body)
    }

    /// The outgoing body first (to send as a request body, on a client); the tunnel once
    /// the response's body is there.
    pub fn outgoing() -> (PendingTunnel, TunnelBody) {
        let (writer, reader) = tokio::io::duplex(BUFFER);
        let reset = Arc::new(AtomicU64::new(0));
        (
            PendingTunnel {
                outgoing: writer,
                reset: Arc::clone(&reset),
            },
            TunnelBody {
                outgoing: reader,
                reset,
                done: false,
            },
        )
    }
}

impl PendingTunnel {
    /// The tunnel, reading `incoming` (the response body, on a client).
    pub fn with_incoming<B>(self, incoming: B) -> Tunnel
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Tunnel {
            incoming: incoming.map_err(Into::into).boxed_unsync(),
            chunk: Bytes::new(),
            incoming_done: false,
            incoming_failed: false,
            outgoing: self.outgoing,
            reset: self.reset,
            datagrams: None,
        }
    }
}

impl Tunnel {
    /// Ends the tunnel abruptly: over HTTP/3 its stream is reset both ways with `code`
    /// instead of finished, so the peer learns that the tunnel failed rather than ended.
    /// RFC 9114 §4.4: a CONNECT proxy whose TCP connection fails (a RST from the target,
    /// say) resets with [`H3_CONNECT_ERROR`](crate::codes::H3_CONNECT_ERROR). What was
    /// written and not sent yet is dropped. The reset leaves as the body's frames do, once
    /// the stream may send: a peer whose flow control holds the stream back (it reads
    /// nothing of the tunnel) gets it when it grants credit again. Over HTTP/2 and HTTP/1.1
    /// hyper ends the stream or the connection its own way
    /// ([`ResetStream`](crate::ResetStream)).
    pub fn reset(self, code: u64) {
        // Before the writer drops (with `self`): the body reads the code when it wakes to
        // the writer's end.
        self.reset.store(code.saturating_add(1), Ordering::Release);
    }

    /// Takes the HTTP datagrams (RFC 9297) of the tunnel's stream, when the client opened
    /// it with datagrams enabled on both sides (see
    /// [`client::Builder::http_datagrams`](crate::client::Builder::http_datagrams)); `None`
    /// otherwise, and after the first call. On a server, take them from the request with
    /// [`Datagrams::from_request`] before making the tunnel.
    pub fn datagrams(&mut self) -> Option<Datagrams> {
        self.datagrams.take()
    }

    #[cfg(feature = "client")]
    pub(crate) fn set_datagrams(&mut self, datagrams: Option<Datagrams>) {
        self.datagrams = datagrams;
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("unread", &self.chunk.len())
            .field("incoming_done", &self.incoming_done)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TunnelBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PendingTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingTunnel").finish_non_exhaustive()
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.chunk.is_empty() {
            if this.incoming_failed {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if this.incoming_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.incoming).poll_frame(cx)) {
                // Trailers carry no tunnel bytes.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.chunk = data;
                    }
                }
                Some(Err(e)) => {
                    this.incoming_failed = true;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, e)));
                }
                None => this.incoming_done = true,
            }
        }
        let n = this.chunk.len().min(buf.remaining());
        buf.put_slice(&this.chunk[..n]);
        this.chunk.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.outgoing).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.outgoing).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.outgoing).poll_shutdown(cx)
    }
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(code) = this.reset.load(Ordering::Acquire).checked_sub(1) {
            this.done = true;
            return Poll::Ready(Some(Err(ResetStream(code).into())));
        }
        // A read lands on the stack, then is copied into a frame of its own size: a frame
        // that kept a larger buffer would pin it while it waits for the peer's flow
        // control, and a buffer kept in the body would cost every tunnel (an idle
        // WebSocket among them) its 16 KiB. Uninitialised: the pipe writes what it fills.
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); FRAME];
        let mut buf = ReadBuf::uninit(&mut scratch);
        match ready!(Pin::new(&mut this.outgoing).poll_read(cx, &mut buf)) {
            Ok(()) if buf.filled().is_empty() => {
                // The tunnel's writer shut down (or was dropped): the body ends.
                this.done = true;
                Poll::Ready(None)
            }
            Ok(()) => Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(buf.filled()))))),
            Err(e) => {
                this.done = true;
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn what_arrives_is_read_and_what_is_written_leaves_in_the_body() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hel"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::data(Bytes::from_static(b"lo"))),
        ];
        let incoming = StreamBody::new(futures_util::stream::iter(frames));
        let (mut tunnel, body) = Tunnel::new(incoming);
        let mut read = String::new();
        tunnel.read_to_string(&mut read).await.unwrap();
        assert_eq!(read, "hello");
        tunnel.write_all(b"back").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"back");
    }

    /// A frame holds what was written, not a whole `FRAME`-sized buffer: the stream's
    /// outbox is bounded by the bytes it holds (64 KiB), so 1-byte frames that each pin 16
    /// KiB let an echoing peer that does not read make the server hold ~1 GiB per stream.
    #[tokio::test]
    async fn a_small_write_does_not_pin_a_whole_frame_buffer() {
        let (mut tunnel, mut body) = Tunnel::new(Full::new(Bytes::new()));
        tunnel.write_all(b"x").await.unwrap();
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&data[..], b"x");
        let retained = Vec::<u8>::from(data).capacity();
        assert!(retained <= 1024, "a 1-byte frame keeps {retained} bytes allocated");
    }

    #[tokio::test]
    async fn a_writer_waits_while_the_body_is_not_read() {
        let (mut tunnel, mut body) = Tunnel::new(Full::new(Bytes::new()));
        let big = vec![7u8; 4 * BUFFER];
        let write = tunnel.write_all(&big);
        tokio::pin!(write);
        // Nobody reads the body: the writer stops at the buffer.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut write)
                .await
                .is_err(),
            "the writer waits"
        );
        let mut got = 0;
        let reading = async {
            while let Some(frame) = body.frame().await {
                got += frame.unwrap().into_data().unwrap().len();
                if got == big.len() {
                    break;
                }
            }
        };
        let (written, ()) = tokio::join!(write, reading);
        written.unwrap();
        assert_eq!(got, big.len());
    }
}
