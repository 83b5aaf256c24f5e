//! Decoding `content-encoding: zstd` responses (RFC 9659) with the window HTTP allows.
//!
//! tower-http's decompression (which decodes gzip and br here) builds its zstd decoder with
//! zstd's own limit on the window a frame may ask for: 128 MiB. A server could so make the
//! client hold that much for each response it decodes, whatever its size. RFC 9659 §3 has
//! encoders keep the window to 8 MiB, as browsers require; this decoder refuses more (a
//! decoding error, as any corrupt body).

use std::io;

use futures_util::TryStreamExt;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderMap, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyDataStream, StreamBody};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::h3::body::RecvBody;

/// The largest window a zstd-coded response may use: 2^23 bytes, 8 MiB (RFC 9659 §3).
const WINDOW_LOG_MAX: u32 = 23;

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
/// `content-encoding` and `content-length`; any other response as it is. An empty body
/// (the answer to a HEAD, a 204) stays empty.
pub(crate) fn decode(response: Response<RecvBody>) -> Response<RecvBody> {
    if !is_zstd(response.headers()) || response.body().is_end_stream() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(CONTENT_ENCODING);
    parts.headers.remove(CONTENT_LENGTH);
    // The body's own errors travel through the reader as the I/O errors it needs, and come
    // out as they went in (`layers::into_error` finds ours inside an `io::Error`).
    let coded = StreamReader::new(BodyDataStream::new(body).map_err(io::Error::other));
    let params = [async_compression::zstd::DParameter::window_log_max(WINDOW_LOG_MAX)];
    let decoder = async_compression::tokio::bufread::ZstdDecoder::with_params(coded, &params);
    let frames = ReaderStream::new(decoder).map_ok(Frame::data);
    Response::from_parts(parts, super::layers::layered(StreamBody::new(frames)))
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
