//! [`RecvBody`]: an HTTP/3 message body that streams as it arrives.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::error::Error;
use crate::stream::StreamShared;

/// The body of a request received by the server, or of a response received by the client.
///
/// It yields data as it arrives. The connection reads from the peer only while this body's
/// bounded buffer has room, so a handler that reads slowly (or not at all) stalls the peer
/// through QUIC flow control rather than growing memory. [`Body::size_hint`] is exact when
/// the message has a `content-length`, and a body longer or shorter than that length ends
/// in an error. Trailers arrive as a final trailers frame. If the peer resets the stream,
/// the body yields an error whose [`Error::is_reset`] is true.
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
        let (poll, wake_conn) = {
            let mut s = stream.lock();
            if !s.recv.is_empty() {
                let chunk = s.recv.split().freeze();
                // The connection stopped reading at the buffer's limit: there is room now.
                let wake = s.data_pending && stream.wake_conn(&mut s);
                (Poll::Ready(Some(Ok(Frame::data(chunk)))), wake)
            } else if let Some(error) = s.recv_error {
                this.finished = true;
                (Poll::Ready(Some(Err(error.to_error()))), false)
            } else if s.recv_fin {
                match s.recv_trailers.take() {
                    Some(trailers) => (Poll::Ready(Some(Ok(Frame::trailers(trailers)))), false),
                    None => {
                        this.finished = true;
                        (Poll::Ready(None), false)
                    }
                }
            } else {
                s.recv_waker = Some(cx.waker().clone());
                (Poll::Pending, false)
            }
        };
        stream.notify_if(wake_conn);
        poll
    }

    fn is_end_stream(&self) -> bool {
        match &self.stream {
            None => true,
            Some(stream) => {
                if self.finished {
                    return true;
                }
                let s = stream.lock();
                s.recv_fin && s.recv.is_empty() && s.recv_trailers.is_none() && s.recv_error.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let Some(stream) = &self.stream else {
            return SizeHint::with_exact(0);
        };
        let s = stream.lock();
        match s.content_length {
            Some(len) => SizeHint::with_exact(len.saturating_sub(s.received) + s.recv.len() as u64),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.update(|s| {
                s.body_dropped = true;
                s.recv.clear();
                s.recv_waker = None;
                // The connection discards what quiche still holds for us.
                ((), !s.recv_fin)
            });
        }
    }
}
