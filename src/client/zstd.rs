//! Decoding `content-encoding: zstd` responses (RFC 9659) with the window HTTP allows.
//!
//! tower-http's decompression (which decodes gzip and br here) builds its zstd decoder with
//! zstd's own limit on the window a frame may ask for: 128 MiB. A server could so make the
//! client hold that much for each response it decodes, whatever its size. RFC 9659 §3 has
//! encoders keep the window to 8 MiB, as browsers require; this decoder refuses more (a
//! decoding error, as any corrupt body). Otherwise it decodes as tower-http's did: every
//! frame of the body (RFC 8878 §3.1: one or more, skippable ones included), its trailers
//! passed on, and an empty body (the answer to a HEAD, a 304) left empty.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use async_compression::tokio::bufread::ZstdDecoder;
use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderMap, Response};
use http_body::{Body, Frame};
use tokio_util::io::StreamReader;

use crate::h3::body::RecvBody;

/// The largest window a zstd-coded response may use: 2^23 bytes, 8 MiB (RFC 9659 §3).
const WINDOW_LOG_MAX: u32 = 23;

/// The room made for decoded data before each read (a read may fill more, up to what the
/// buffer already had).
const CHUNK: usize = 16 * 1024;

/// Whether a response's only content coding is zstd (several codings in a row are left
/// alone, as tower-http leaves them).
pub(crate) fn is_zstd(headers: &HeaderMap) -> bool {
    let mut codings = headers.get_all(CONTENT_ENCODING).iter();
    matches!(
        (codings.next(), codings.next()),
        (Some(coding), None) if coding.as_bytes().trim_ascii().eq_ignore_ascii_case(b"zstd")
    )
}

/// `response` with its zstd-coded body decoded, and without the coding's
/// `content-encoding` and `content-length`; any other response as it is.
pub(crate) fn decode(response: Response<RecvBody>) -> Response<RecvBody> {
    if !is_zstd(response.headers()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(CONTENT_ENCODING);
    parts.headers.remove(CONTENT_LENGTH);
    let coded = Coded {
        body,
        trailers: None,
        any_data: false,
        failed: false,
    };
    let params = [async_compression::zstd::DParameter::window_log_max(WINDOW_LOG_MAX)];
    let mut decoder = ZstdDecoder::with_params(StreamReader::new(coded), &params);
    decoder.multiple_members(true);
    let decoded = Decoded {
        decoder,
        buf: BytesMut::new(),
        done: false,
    };
    Response::from_parts(parts, super::layers::layered(decoded))
}

/// The coded body's data, as the decoder reads it; its trailers are kept aside.
struct Coded {
    body: RecvBody,
    trailers: Option<HeaderMap>,
    /// Whether any data came: a body that ended cleanly with none is empty, not a
    /// truncated frame.
    any_data: bool,
    /// Whether the body failed (a reset, a timeout, a lost connection): that error is the
    /// body's, empty or not.
    failed: bool,
}

impl Stream for Coded {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => return Poll::Ready(None),
                // Ours, inside an `io::Error`, which `layers::into_error` finds again.
                Some(Err(e)) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(io::Error::other(e))));
                }
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    this.any_data = true;
                    return Poll::Ready(Some(Ok(data)));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        this.trailers = Some(trailers);
                    }
                }
            }
        }
    }
}

/// The decoded body: what the decoder reads, a chunk at a time, then the trailers.
struct Decoded {
    decoder: ZstdDecoder<StreamReader<Coded, Bytes>>,
    buf: BytesMut,
    done: bool,
}

impl Body for Decoded {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        this.buf.reserve(CHUNK);
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut this.decoder),
            cx,
            &mut this.buf
        ));
        if let Ok(1..) = read {
            return Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))));
        }
        this.done = true;
        let coded = this.decoder.get_mut().get_mut();
        match read {
            Ok(_) => Poll::Ready(coded.trailers.take().map(|t| Ok(Frame::trailers(t)))),
            // A body that ended cleanly with no data (the answer to a HEAD, a 304) has no
            // frame to decode: it is empty, not truncated.
            Err(_) if !coded.any_data && !coded.failed => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_alone_is_zstd() {
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(CONTENT_ENCODING, v.parse().unwrap());
            }
            h
        };
        assert!(is_zstd(&headers(&["zstd"])));
        assert!(is_zstd(&headers(&[" ZSTD "])));
        assert!(!is_zstd(&headers(&[])));
        assert!(!is_zstd(&headers(&["gzip"])));
        assert!(!is_zstd(&headers(&["zstd", "gzip"])));
        assert!(!is_zstd(&headers(&["gzip, zstd"])));
    }
}
