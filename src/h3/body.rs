//! Message bodies on an HTTP/3 stream: [`RecvBody`], the incoming body that streams as it
//! arrives, and [`pump_body`], which feeds an outgoing `http_body::Body` into a stream one
//! frame at a time.

use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

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
/// Dropping the body tells the connection to discard the rest of it.
pub struct RecvBody {
    stream: Option<Arc<StreamShared>>,
    finished: bool,
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody")
            .field("stream_id", &self.stream.as_ref().map(|s| s.id()))
            .finish_non_exhaustive()
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
        RecvBody {
            stream: None,
            finished: true,
        }
    }

    pub(crate) fn new(stream: Arc<StreamShared>) -> Self {
        RecvBody {
            stream: Some(stream),
            finished: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let Some(stream) = &this.stream else {
            return Poll::Ready(None);
        };
        if this.finished {
            return Poll::Ready(None);
        }
        let poll = stream.poll_recv(cx);
        if matches!(poll, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.finished = true;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        match &self.stream {
            None => true,
            Some(stream) => self.finished || stream.recv_is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.stream {
            None => SizeHint::with_exact(0),
            Some(_) if self.finished => SizeHint::with_exact(0),
            Some(stream) => stream.recv_size_hint(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.drop_reader();
        }
    }
}

/// Pumps a message body into the stream's outbox: one frame at a time, and only while the
/// outbox has room, so a fast body waits for the stream instead of filling memory. Ends the
/// stream (FIN, or trailers) when the body ends, and resets it with H3_INTERNAL_ERROR when
/// the body fails, returning the body's error.
pub(crate) async fn pump_body<B>(body: B, stream: &StreamShared) -> Result<(), BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    loop {
        if poll_fn(|cx| stream.poll_send_room(cx)).await.is_err() {
            // The peer stopped reading, or the stream was cancelled: stop producing.
            return Ok(());
        }
        match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => {
                stream.finish();
                return Ok(());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let bytes = data.copy_to_bytes(data.remaining());
                    if !bytes.is_empty() {
                        stream.push_data(bytes);
                    }
                    if body.is_end_stream() {
                        stream.finish();
                        return Ok(());
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        stream.push_trailers(trailer_fields(&trailers));
                        return Ok(());
                    }
                }
            },
            Some(Err(e)) => {
                let e = e.into();
                tracing::debug!(error = %e, "body error; resetting the stream");
                stream.reset(codes::H3_INTERNAL_ERROR);
                return Err(e);
            }
        }
    }
}
