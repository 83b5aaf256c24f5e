//! The capsule protocol (RFC 9297 §3): type-length-value capsules in the message body of a
//! request (CONNECT-UDP's, say) once it is answered 2xx, and the `capsule-protocol: ?1`
//! header that says a body speaks it.
//!
//! [`CapsuleDecoder`] parses capsules from body bytes as they arrive, however the body is
//! chunked: DATAGRAM capsules (type 0x00, HTTP datagrams sent reliably on the stream) come
//! out as [`Capsule::Datagram`], capsules of any other type are skipped without being
//! buffered (RFC 9297 §3.2: unknown capsule types are skipped), and a DATAGRAM capsule
//! longer than the decoder's limit is an error rather than an allocation.
//! [`CapsuleReader`] does the same over a message body.
//!
//! A capsule that breaks the protocol makes the message malformed (RFC 9297 §3.3; RFC 9114
//! §4.1.2: a stream error of type H3_MESSAGE_ERROR). [`CapsuleError::code`] gives the code,
//! and a response (or request) body that fails with a [`CapsuleError`] resets its stream
//! with that code, so a handler ends the stream right by failing its body with the error.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Body;

use super::codes;
use super::varint;
use crate::error::BoxError;

/// The `capsule-protocol` header (RFC 9297 §3.4).
pub const CAPSULE_PROTOCOL: HeaderName = HeaderName::from_static("capsule-protocol");

/// The DATAGRAM capsule type (RFC 9297 §3.5).
pub const DATAGRAM: u64 = 0x00;

/// The longest DATAGRAM capsule value a [`CapsuleDecoder`] accepts by default: the largest
/// UDP payload (65,527 bytes) with a context ID in front, rounded up.
pub const DEFAULT_MAX_CAPSULE_LEN: usize = 65_536;

/// `?1`, the value of [`CAPSULE_PROTOCOL`] that turns the capsule protocol on.
pub fn capsule_protocol_value() -> HeaderValue {
    HeaderValue::from_static("?1")
}

/// Whether `headers` say the message body speaks the capsule protocol: a `capsule-protocol`
/// field that is the structured-field Boolean true (`?1`, parameters allowed and ignored).
/// Absent, `?0`, or not a Boolean: no.
pub fn is_capsule_protocol(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&CAPSULE_PROTOCOL).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let value = value.as_bytes().trim_ascii();
    match value.strip_prefix(b"?1") {
        Some(rest) => rest.is_empty() || rest.starts_with(b";"),
        None => false,
    }
}

/// A capsule the decoder hands out. Unknown types are skipped, not handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Capsule {
    /// A DATAGRAM capsule: an HTTP datagram's payload (for CONNECT-UDP, a context ID and a
    /// UDP payload), as [`Datagrams`](crate::datagram::Datagrams) receive them.
    Datagram(Bytes),
}

impl Capsule {
    /// Appends the capsule, framed, to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Capsule::Datagram(payload) => {
                varint::encode(DATAGRAM, out);
                varint::encode(payload.len() as u64, out);
                out.extend_from_slice(payload);
            }
        }
    }

    /// The capsule, framed, as one buffer (a body frame).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }
}

/// Why a capsule stream failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CapsuleError {
    /// The stream ended inside a capsule (RFC 9297 §3.3: a malformed message).
    Truncated,
    /// A DATAGRAM capsule longer than the decoder accepts.
    TooLarge {
        /// The capsule's announced length.
        len: u64,
        /// The decoder's limit.
        max: usize,
    },
    /// The message body failed (the peer reset the stream, the connection closed).
    Body(BoxError),
}

impl CapsuleError {
    /// The HTTP/3 error code the stream should be reset with: H3_MESSAGE_ERROR for a
    /// malformed capsule stream, H3_EXCESSIVE_LOAD for one over the limit, and
    /// H3_REQUEST_CANCELLED when the body itself failed (there is nobody to tell).
    pub fn code(&self) -> u64 {
        match self {
            CapsuleError::Truncated => codes::H3_MESSAGE_ERROR,
            CapsuleError::TooLarge { .. } => codes::H3_EXCESSIVE_LOAD,
            CapsuleError::Body(_) => codes::H3_REQUEST_CANCELLED,
        }
    }
}

impl fmt::Display for CapsuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapsuleError::Truncated => f.write_str("the message body ended inside a capsule"),
            CapsuleError::TooLarge { len, max } => {
                write!(f, "a DATAGRAM capsule of {len} bytes, more than the {max} accepted")
            }
            CapsuleError::Body(e) => write!(f, "the capsule stream failed: {e}"),
        }
    }
}

impl std::error::Error for CapsuleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CapsuleError::Body(e) => Some(&**e),
            _ => None,
        }
    }
}

/// Where the decoder is in the capsule stream.
#[derive(Debug)]
enum State {
    /// Reading a capsule's type and length; `header` holds their bytes so far.
    Header,
    /// Passing over the rest of an unknown capsule's value.
    Skip(u64),
    /// Gathering a DATAGRAM capsule's value, `remaining` bytes to go.
    Datagram { value: BytesMut, remaining: usize },
}

/// An incremental capsule parser (see the module docs). It holds at most one capsule
/// header (16 bytes) and one DATAGRAM value (the limit), whatever it is fed.
#[derive(Debug)]
pub struct CapsuleDecoder {
    max_len: usize,
    header: Vec<u8>,
    state: State,
}

impl Default for CapsuleDecoder {
    fn default() -> Self {
        CapsuleDecoder::new()
    }
}

impl CapsuleDecoder {
    /// A decoder with the default limit, [`DEFAULT_MAX_CAPSULE_LEN`].
    pub fn new() -> Self {
        CapsuleDecoder::with_max_len(DEFAULT_MAX_CAPSULE_LEN)
    }

    /// A decoder that refuses DATAGRAM capsules longer than `max_len` bytes (unknown
    /// capsules of any length are skipped: they are not kept).
    pub fn with_max_len(max_len: usize) -> Self {
        CapsuleDecoder {
            max_len,
            header: Vec::with_capacity(16),
            state: State::Header,
        }
    }

    /// Takes bytes from `input` until one capsule is complete (`Some`) or `input` is used up
    /// (`None`: feed more). Call again until `None` to drain `input`.
    pub fn decode(&mut self, input: &mut impl Buf) -> Result<Option<Capsule>, CapsuleError> {
        loop {
            match &mut self.state {
                State::Header => {
                    let Some((capsule_type, len)) = self.read_header(input) else {
                        return Ok(None);
                    };
                    self.state = if capsule_type == DATAGRAM {
                        if len > self.max_len as u64 {
                            return Err(CapsuleError::TooLarge { len, max: self.max_len });
                        }
                        State::Datagram {
                            value: BytesMut::new(),
                            remaining: len as usize,
                        }
                    } else {
                        State::Skip(len)
                    };
                }
                State::Skip(remaining) => {
                    let n = (*remaining).min(input.remaining() as u64);
                    input.advance(n as usize);
                    *remaining -= n;
                    if *remaining > 0 {
                        return Ok(None);
                    }
                    self.state = State::Header;
                }
                State::Datagram { value, remaining } => {
                    // A `Buf` may hold several chunks: take from each in turn.
                    while *remaining > 0 && input.has_remaining() {
                        let chunk = input.chunk();
                        let n = (*remaining).min(chunk.len());
                        value.extend_from_slice(&chunk[..n]);
                        input.advance(n);
                        *remaining -= n;
                    }
                    if *remaining > 0 {
                        return Ok(None);
                    }
                    let value = std::mem::take(value).freeze();
                    self.state = State::Header;
                    return Ok(Some(Capsule::Datagram(value)));
                }
            }
        }
    }

    /// Reads the capsule type and length, byte by byte into `header` (they may straddle
    /// chunks); `None` until both are complete.
    fn read_header(&mut self, input: &mut impl Buf) -> Option<(u64, u64)> {
        loop {
            if let Some((capsule_type, type_len)) = varint::decode(&self.header)
                && let Some((len, _)) = varint::decode(&self.header[type_len..])
            {
                self.header.clear();
                return Some((capsule_type, len));
            }
            if !input.has_remaining() {
                return None;
            }
            self.header.push(input.get_u8());
        }
    }

    /// The stream has ended: fine between capsules, malformed inside one.
    pub fn finish(&self) -> Result<(), CapsuleError> {
        match self.state {
            State::Header if self.header.is_empty() => Ok(()),
            _ => Err(CapsuleError::Truncated),
        }
    }
}

/// Reads capsules from a message body (the request body on a server, the response body on
/// a client): DATAGRAM capsules come out, unknown ones are skipped, and a malformed stream
/// ends in a [`CapsuleError`].
///
/// ```no_run
/// use tower_quiche::capsule::{Capsule, CapsuleReader};
/// # async fn run(body: tower_quiche::RecvBody) {
/// let mut capsules = CapsuleReader::new(body);
/// while let Some(capsule) = capsules.next().await {
///     match capsule {
///         Ok(Capsule::Datagram(payload)) => println!("{} bytes", payload.len()),
///         Ok(_) => {}
///         // Fail the response body with it: the stream is reset with `error.code()`.
///         Err(error) => break,
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct CapsuleReader<B> {
    body: B,
    decoder: CapsuleDecoder,
    chunk: Bytes,
    done: bool,
}

impl<B> CapsuleReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// A reader with the default capsule limit.
    pub fn new(body: B) -> Self {
        CapsuleReader::with_decoder(body, CapsuleDecoder::new())
    }

    /// A reader with a decoder of your own (another limit).
    pub fn with_decoder(body: B, decoder: CapsuleDecoder) -> Self {
        CapsuleReader {
            body,
            decoder,
            chunk: Bytes::new(),
            done: false,
        }
    }

    /// The next capsule; `None` once the body has ended cleanly (or after an error).
    pub async fn next(&mut self) -> Option<Result<Capsule, CapsuleError>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next capsule, as [`next`](Self::next).
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Capsule, CapsuleError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.decoder.decode(&mut self.chunk) {
                Ok(Some(capsule)) => return Poll::Ready(Some(Ok(capsule))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers carry no capsules.
                    if let Ok(data) = frame.into_data() {
                        self.chunk = data;
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(self.fail(CapsuleError::Body(e.into()))))),
                None => {
                    self.done = true;
                    if let Err(e) = self.decoder.finish() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
    }

    fn fail(&mut self, error: CapsuleError) -> CapsuleError {
        self.done = true;
        error
    }

    /// The body, back.
    pub fn into_inner(self) -> B {
        self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn capsule(capsule_type: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint::encode(capsule_type, &mut out);
        varint::encode(value.len() as u64, &mut out);
        out.extend_from_slice(value);
        out
    }

    fn decode_all(decoder: &mut CapsuleDecoder, mut input: &[u8]) -> Result<Vec<Capsule>, CapsuleError> {
        let mut out = Vec::new();
        while let Some(capsule) = decoder.decode(&mut input)? {
            out.push(capsule);
        }
        Ok(out)
    }

    #[test]
    fn datagram_capsules_come_out_and_unknown_ones_are_skipped() {
        let mut stream = capsule(DATAGRAM, b"one");
        stream.extend(capsule(0x1234, &[9; 300]));
        stream.extend(capsule(DATAGRAM, b""));
        stream.extend(capsule(0x3f_ffff, b"ignored"));
        stream.extend(capsule(DATAGRAM, b"two"));
        let mut decoder = CapsuleDecoder::new();
        let capsules = decode_all(&mut decoder, &stream).unwrap();
        assert_eq!(
            capsules,
            [
                Capsule::Datagram(Bytes::from_static(b"one")),
                Capsule::Datagram(Bytes::new()),
                Capsule::Datagram(Bytes::from_static(b"two")),
            ]
        );
        decoder.finish().unwrap();
    }

    #[test]
    fn an_unknown_capsule_is_skipped_without_being_kept() {
        // Announces 1 GiB: skipped as it arrives, never buffered, never refused.
        let mut decoder = CapsuleDecoder::with_max_len(16);
        let mut header = Vec::new();
        varint::encode(0x29, &mut header);
        varint::encode(1 << 30, &mut header);
        assert!(decode_all(&mut decoder, &header).unwrap().is_empty());
        assert!(decode_all(&mut decoder, &[0; 4096]).unwrap().is_empty());
        assert!(matches!(decoder.state, State::Skip(left) if left == (1 << 30) - 4096));
    }

    #[test]
    fn a_capsule_over_the_limit_is_an_error_before_its_bytes_arrive() {
        let mut decoder = CapsuleDecoder::with_max_len(100);
        let mut header = Vec::new();
        varint::encode(DATAGRAM, &mut header);
        varint::encode(101, &mut header);
        let error = decode_all(&mut decoder, &header).unwrap_err();
        assert!(matches!(error, CapsuleError::TooLarge { len: 101, max: 100 }));
        assert_eq!(error.code(), codes::H3_EXCESSIVE_LOAD);
        let mut decoder = CapsuleDecoder::with_max_len(100);
        assert_eq!(
            decode_all(&mut decoder, &capsule(DATAGRAM, &[1; 100])).unwrap().len(),
            1
        );
    }

    #[test]
    fn a_stream_ending_inside_a_capsule_is_malformed() {
        let whole = capsule(DATAGRAM, b"payload");
        for cut in 1..whole.len() {
            let mut decoder = CapsuleDecoder::new();
            assert!(decode_all(&mut decoder, &whole[..cut]).unwrap().is_empty());
            let error = decoder.finish().unwrap_err();
            assert_eq!(error.code(), codes::H3_MESSAGE_ERROR, "cut at {cut}");
        }
    }

    #[test]
    fn the_capsule_protocol_header_is_a_structured_boolean() {
        let check = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(CAPSULE_PROTOCOL, HeaderValue::from_str(v).unwrap());
            }
            is_capsule_protocol(&headers)
        };
        assert!(check(&["?1"]));
        assert!(check(&[" ?1;foo=bar"]));
        assert!(!check(&[]));
        assert!(!check(&["?0"]));
        assert!(!check(&["1"]));
        assert!(!check(&["?10"]));
        assert!(!check(&["?1", "?1"]), "a repeated field is not one Boolean");
    }

    #[tokio::test]
    async fn a_reader_over_a_body_yields_capsules_and_fails_on_truncation() {
        use http_body_util::StreamBody;
        let mut bytes = capsule(DATAGRAM, b"hello");
        bytes.extend(capsule(7, b"skip"));
        bytes.extend(&capsule(DATAGRAM, b"cut")[..3]);
        // Split every byte into its own frame: the parser holds state across them.
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = bytes
            .iter()
            .map(|&b| Ok(http_body::Frame::data(Bytes::copy_from_slice(&[b]))))
            .collect();
        let mut reader = CapsuleReader::new(StreamBody::new(futures_util::stream::iter(frames)));
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Capsule::Datagram(Bytes::from_static(b"hello"))
        );
        let error = reader.next().await.unwrap().unwrap_err();
        assert!(matches!(error, CapsuleError::Truncated));
        assert!(reader.next().await.is_none());
    }

    #[test]
    fn encoding_round_trips() {
        let capsule = Capsule::Datagram(Bytes::from(vec![5; 70]));
        let mut decoder = CapsuleDecoder::new();
        assert_eq!(decode_all(&mut decoder, &capsule.to_bytes()).unwrap(), [capsule]);
    }

    proptest! {
        /// Whatever the bytes and however they are cut, the decoder never panics and never
        /// holds more than one capsule's worth.
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), cuts in proptest::collection::vec(0usize..512, 0..8)) {
            let mut decoder = CapsuleDecoder::with_max_len(64);
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.push(0);
            points.push(bytes.len());
            points.sort_unstable();
            for pair in points.windows(2) {
                match decode_all(&mut decoder, &bytes[pair[0]..pair[1]]) {
                    Ok(capsules) => {
                        for Capsule::Datagram(value) in capsules {
                            prop_assert!(value.len() <= 64);
                        }
                    }
                    Err(_) => break,
                }
                if let State::Datagram { value, .. } = &decoder.state {
                    prop_assert!(value.len() <= 64);
                }
                prop_assert!(decoder.header.len() <= 16);
            }
            let _ = decoder.finish();
        }

        /// A stream of capsules cut anywhere decodes to the same DATAGRAM payloads.
        #[test]
        fn rechunking_does_not_change_what_comes_out(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..6), cut in 0usize..600) {
            let mut stream = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                stream.extend(capsule(DATAGRAM, p));
                stream.extend(capsule(0x40 + i as u64, p));
            }
            let cut = cut.min(stream.len());
            let mut decoder = CapsuleDecoder::new();
            let mut got = decode_all(&mut decoder, &stream[..cut]).unwrap();
            got.extend(decode_all(&mut decoder, &stream[cut..]).unwrap());
            decoder.finish().unwrap();
            let want: Vec<Capsule> = payloads.into_iter().map(|p| Capsule::Datagram(Bytes::from(p))).collect();
            prop_assert_eq!(got, want);
        }
    }
}
