//! Message bodies on an HTTP/3 stream: [`RecvBody`], the incoming body that streams as it
//! arrives, and [`pump_body`], which feeds an outgoing `http_body::Body` into a stream one
//! frame at a time.

use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use super::capsule::CapsuleError;
use super::codes;
use super::fields::trailer_fields;
use super::stream::StreamShared;
use crate::error::{BoxError, Error};

/// The body of a request received by the server, or of a response received by the client.
///
/// It yields data as it arrives. The connection reads from the peer only while this body's
/// bounded buffer has room, so a handler that reads slowly (or not at all) stalls the peer
/// through QUIC flow control rather than growing memory. [`Body::size_hint`] is exact when
/// the message has a `content-length`, and a body longer or shorter than that length ends
/// in an error. Trailers arrive as a final trailers frame. If the peer resets the stream,
/// the body yields an error whose [`Error::is_reset`] is true; if it stalls past the
/// server's body timeout, one whose [`Error::is_timeout`] is true.
///
/// Dropping the body tells the connection to discard the rest of it (once no
/// [`Tunnel::from_request`](crate::tunnel::Tunnel::from_request) reads the same stream).
///
/// With the `tcp` feature, messages that came over HTTP/1.1 or HTTP/2 have a `RecvBody`
/// too (hyper reads them): the server's requests on the TCP side of `serve_with_tcp`, and
/// the client's responses. Their `version` says which protocol carried them. Over TCP the
/// errors are hyper's, classified (a reset HTTP/2 stream `is_closed`, not `is_reset`), and
/// the server's body stall timeout counts the wait of a handler that reads while neither
/// the client sends nor the request's own response moves.
pub struct RecvBody {
    source: Source,
}

enum Source {
    /// A body that has ended, or never had data.
    Done,
    /// The receiving half of an HTTP/3 stream.
    H3(Arc<StreamShared>),
    /// A response body hyper receives over TCP (HTTP/1.1 or HTTP/2).
    #[cfg(all(feature = "client", feature = "tcp"))]
    Tcp(hyper::body::Incoming),
    /// A request body the server receives over TCP, under the body stall timeout.
    #[cfg(all(feature = "server", feature = "tcp"))]
    TcpRequest(crate::server::tcp::TcpRequestBody),
    /// A response body as the client's layers hand it on (decoded, under a timeout).
    #[cfg(feature = "client")]
    Layered(http_body_util::combinators::BoxBody<Bytes, Error>),
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RecvBody");
        match &self.source {
            Source::Done => d.field("ended", &true),
            Source::H3(stream) => d.field("stream_id", &stream.id()),
            #[cfg(all(feature = "client", feature = "tcp"))]
            Source::Tcp(_) => d.field("tcp", &true),
            #[cfg(all(feature = "server", feature = "tcp"))]
            Source::TcpRequest(_) => d.field("tcp_request", &true),
            #[cfg(feature = "client")]
            Source::Layered(_) => d.field("layered", &true),
        };
        d.finish_non_exhaustive()
    }
}

impl Default for RecvBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl RecvBody {
    /// A body with no data (for messages that end with their head).
    pub fn empty() -> Self {
        RecvBody { source: Source::Done }
    }

    /// The body of `stream`: its first reader (uncounted, see `RecvHalf::other_readers`).
    pub(crate) fn new(stream: Arc<StreamShared>) -> Self {
        RecvBody {
            source: Source::H3(stream),
        }
    }

    /// Another reader of `stream`'s body, while the body is still there (not once its last
    /// reader went and its bytes have been discarded since).
    #[cfg(feature = "server")]
    pub(crate) fn another_reader(stream: Arc<StreamShared>) -> Option<Self> {
        stream.add_other_reader().then(|| RecvBody {
            source: Source::H3(stream),
        })
    }

    /// A response body received over TCP by hyper.
    #[cfg(all(feature = "client", feature = "tcp"))]
    pub(crate) fn tcp(body: hyper::body::Incoming) -> Self {
        RecvBody {
            source: Source::Tcp(body),
        }
    }

    /// A request body received over TCP by the server's hyper.
    #[cfg(all(feature = "server", feature = "tcp"))]
    pub(crate) fn tcp_request(body: crate::server::tcp::TcpRequestBody) -> Self {
        RecvBody {
            source: Source::TcpRequest(body),
        }
    }

    /// A response body transformed by the client's layers (decoding, timeouts).
    #[cfg(feature = "client")]
    pub(crate) fn layered<B>(body: B) -> Self
    where
        B: Body<Data = Bytes, Error = Error> + Send + Sync + 'static,
    {
        RecvBody {
            source: Source::Layered(http_body_util::combinators::BoxBody::new(body)),
        }
    }

    /// The body has ended (or failed): an HTTP/3 stream's reader is released at once.
    fn finish(&mut self) {
        if let Source::H3(stream) = std::mem::replace(&mut self.source, Source::Done) {
            stream.drop_reader();
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let poll = match &mut this.source {
            Source::Done => return Poll::Ready(None),
            Source::H3(stream) => stream.poll_recv(cx),
            #[cfg(all(feature = "client", feature = "tcp"))]
            Source::Tcp(body) => Pin::new(body).poll_frame(cx).map_err(crate::client::tcp::body_error),
            #[cfg(all(feature = "server", feature = "tcp"))]
            Source::TcpRequest(body) => body.poll_frame(cx),
            #[cfg(feature = "client")]
            Source::Layered(body) => Pin::new(body).poll_frame(cx),
        };
        if matches!(poll, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.finish();
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Done => true,
            Source::H3(stream) => stream.recv_is_end(),
            #[cfg(all(feature = "client", feature = "tcp"))]
            Source::Tcp(body) => body.is_end_stream(),
            #[cfg(all(feature = "server", feature = "tcp"))]
            Source::TcpRequest(body) => body.is_end_stream(),
            #[cfg(feature = "client")]
            Source::Layered(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Done => SizeHint::with_exact(0),
            Source::H3(stream) => stream.recv_size_hint(),
            #[cfg(all(feature = "client", feature = "tcp"))]
            Source::Tcp(body) => body.size_hint(),
            #[cfg(all(feature = "server", feature = "tcp"))]
            Source::TcpRequest(body) => body.size_hint(),
            #[cfg(feature = "client")]
            Source::Layered(body) => body.size_hint(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        self.finish();
    }
}

/// An error for an outgoing message body (a server's response body, a client's request
/// body) to fail with when its HTTP/3 stream must be reset with a code of its choosing: any
/// other error resets it with H3_INTERNAL_ERROR.
///
/// The stream is reset both ways (RESET_STREAM and STOP_SENDING carry the code). It is found
/// through wrappers that keep it as their [`source`](std::error::Error::source), such as
/// `axum::Error`. [`Tunnel::reset`](crate::tunnel::Tunnel::reset) fails a tunnel's body with
/// it. A code above 2^62 − 1, more than QUIC carries, resets with H3_INTERNAL_ERROR. Over HTTP/2 and HTTP/1.1 (the TCP side) hyper ends the stream or the connection its
/// own way, whatever the code.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, StreamBody};
/// use http_body::Frame;
/// use tower_quiche::{BoxError, ResetStream, codes};
///
/// // A body that sends a part, then fails its stream with H3_REQUEST_CANCELLED.
/// let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
///     Ok(Frame::data(Bytes::from_static(b"partial"))),
///     Err(ResetStream(codes::H3_REQUEST_CANCELLED).into()),
/// ];
/// let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
/// # let _ = body;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetStream(pub u64);

impl std::fmt::Display for ResetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the stream is reset with code {:#x}", self.0)
    }
}

impl std::error::Error for ResetStream {}

/// The code a stream is reset with when its outgoing body fails: a [`ResetStream`]'s, a
/// [`CapsuleError`]'s own (a malformed capsule stream is H3_MESSAGE_ERROR, RFC 9297 §3.3),
/// found through the error's sources; H3_INTERNAL_ERROR for any other error. (A reset the
/// body read from elsewhere, say a proxied response's, is not passed on: its code would
/// claim things of this stream, such as H3_REQUEST_REJECTED's "not processed".)
fn reset_code(error: &BoxError) -> u64 {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**error);
    while let Some(error) = next {
        if let Some(&ResetStream(code)) = error.downcast_ref::<ResetStream>() {
            // One QUIC cannot carry (above 2^62 - 1) is no code of ours to send.
            return if code <= crate::quic::MAX_CODE {
                code
            } else {
                codes::H3_INTERNAL_ERROR
            };
        }
        if let Some(capsule) = error.downcast_ref::<CapsuleError>() {
            return capsule.code();
        }
        next = error.source();
    }
    codes::H3_INTERNAL_ERROR
}

/// How many frames in a row that queue nothing a body may yield before its pump lets the
/// connection's task run the rest of its work.
const IDLE_FRAMES_BEFORE_YIELD: u32 = 32;

/// Pumps a message body into the stream's outbox: one frame at a time, and only while the
/// outbox has room, so a fast body waits for the stream instead of filling memory. Ends the
/// stream (FIN, or trailers) when the body ends, and resets it when the body fails (with
/// [`reset_code`]'s code), returning the body's error.
///
/// `content_length` is what the head declared: a body that turns out longer or shorter
/// would make the message malformed (RFC 9114 §4.1.2), so the stream is reset with
/// H3_INTERNAL_ERROR instead, before the byte past the length goes out (hyper's HTTP/1
/// fails such a body likewise).
pub(crate) async fn pump_body<B>(body: B, stream: &StreamShared, content_length: Option<u64>) -> Result<(), BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut sent: u64 = 0;
    // Frames in a row that queued nothing (empty data, a kind we do not send): room is
    // always there for those, so a body that yields them without end would never let the
    // connection's task (which polls every pump) go on to anything else.
    let mut idle_frames = 0u32;
    let result = loop {
        if idle_frames >= IDLE_FRAMES_BEFORE_YIELD {
            idle_frames = 0;
            tokio::task::yield_now().await;
        }
        if poll_fn(|cx| stream.poll_send_room(cx)).await.is_err() {
            // The peer stopped reading, or the stream was cancelled: stop producing.
            return Ok(());
        }
        // While the body has no frame ready, a cancelled stream (the request was dropped,
        // the peer reset it) ends the pump at once: the body is dropped now, not when it
        // next yields (a channel's sender learns that nobody listens).
        let frame = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Pending => stream.poll_cancelled(cx).map(|()| None),
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
        });
        let Some(frame) = frame.await else {
            return Ok(());
        };
        match frame {
            None => break Ok(None),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let bytes = data.copy_to_bytes(data.remaining());
                    sent = sent.saturating_add(bytes.len() as u64);
                    if content_length.is_some_and(|declared| sent > declared) {
                        break Err(LengthMismatch { content_length, sent }.into());
                    }
                    if bytes.is_empty() {
                        idle_frames += 1;
                    } else {
                        idle_frames = 0;
                        stream.push_data(bytes);
                    }
                    if body.is_end_stream() {
                        break Ok(None);
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        break Ok(Some(trailers));
                    }
                    idle_frames += 1;
                }
            },
            Some(Err(e)) => break Err(e.into()),
        }
    };
    let result = result.and_then(|trailers| match content_length {
        Some(declared) if sent != declared => Err(LengthMismatch { content_length, sent }.into()),
        _ => Ok(trailers),
    });
    match result {
        Ok(None) => stream.finish(),
        Ok(Some(trailers)) => stream.push_trailers(trailer_fields(&trailers)),
        Err(e) => {
            tracing::debug!(error = %e, "body error; resetting the stream");
            stream.reset(reset_code(&e));
            return Err(e);
        }
    }
    Ok(())
}

/// A body that does not match its head's `content-length`.
#[derive(Debug)]
struct LengthMismatch {
    content_length: Option<u64>,
    /// Bytes the body yielded, up to and including the frame that went past the length.
    sent: u64,
}

impl std::fmt::Display for LengthMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let declared = self.content_length.unwrap_or_default();
        if self.sent > declared {
            write!(f, "the body is longer than its content-length ({declared} bytes)")
        } else {
            write!(
                f,
                "the body ended after {} of its content-length's {declared} bytes",
                self.sent
            )
        }
    }
}

impl std::error::Error for LengthMismatch {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`ResetStream`] picks the code, found through wrappers; one QUIC cannot carry is
    /// H3_INTERNAL_ERROR (quiche would panic encoding it, taking the connection's task).
    #[test]
    fn a_reset_streams_code_is_found_and_kept_within_quic() {
        #[derive(Debug)]
        struct Wrapper(ResetStream);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let code = |e: BoxError| reset_code(&e);
        assert_eq!(code(ResetStream(0x10f).into()), 0x10f);
        assert_eq!(code(Wrapper(ResetStream(0x10f)).into()), 0x10f);
        assert_eq!(code(ResetStream(u64::MAX).into()), codes::H3_INTERNAL_ERROR);
        assert_eq!(code("any other".into()), codes::H3_INTERNAL_ERROR);
    }
}
