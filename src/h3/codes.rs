//! HTTP/3 error codes (RFC 9114 §8.1), public as [`tower_quiche::codes`](crate::codes) for
//! matching an [`Error::code`](crate::Error::code) and for resetting streams, and the
//! mapping from quiche's connection errors.

/// No error: a clean close, or a stream no longer needed (RFC 9114 §8.1).
pub const H3_NO_ERROR: u64 = 0x100;
/// The peer broke HTTP/3 in a way more specific codes do not cover.
pub const H3_GENERAL_PROTOCOL_ERROR: u64 = 0x101;
/// An internal error in the endpoint (a failed handler, a head that cannot be sent).
pub const H3_INTERNAL_ERROR: u64 = 0x102;
/// A stream was opened that the peer may not open.
pub const H3_STREAM_CREATION_ERROR: u64 = 0x103;
/// A stream HTTP/3 needs (control, QPACK) was closed.
pub const H3_CLOSED_CRITICAL_STREAM: u64 = 0x104;
/// A frame where it is not allowed (DATA before HEADERS, a second trailer section…).
pub const H3_FRAME_UNEXPECTED: u64 = 0x105;
/// A frame that breaks its own layout.
pub const H3_FRAME_ERROR: u64 = 0x106;
/// The peer is generating excessive load.
pub const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// A stream or push ID used wrongly.
pub const H3_ID_ERROR: u64 = 0x108;
/// A SETTINGS frame with a bad value.
pub const H3_SETTINGS_ERROR: u64 = 0x109;
/// No SETTINGS frame at the start of the control stream.
pub const H3_MISSING_SETTINGS: u64 = 0x10a;
/// The server did not process the request: safe to send again (RFC 9114 §4.1.1).
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
/// The request or its response is no longer needed.
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// The client's stream ended without a complete request.
pub const H3_REQUEST_INCOMPLETE: u64 = 0x10d;
/// A malformed message (RFC 9114 §4.1.2).
pub const H3_MESSAGE_ERROR: u64 = 0x10e;
/// The TCP connection of a CONNECT request was reset or closed abnormally.
pub const H3_CONNECT_ERROR: u64 = 0x10f;
/// The request should be retried over HTTP/1.1.
pub const H3_VERSION_FALLBACK: u64 = 0x110;
/// An HTTP datagram (or a capsule) that cannot be parsed (RFC 9297 §5.2): a QUIC DATAGRAM
/// too short for its quarter stream ID, or one naming a stream beyond any QUIC allows.
pub const H3_DATAGRAM_ERROR: u64 = 0x33;

/// The wire code of a connection-level HTTP/3 error from quiche.
#[cfg(any(feature = "server", feature = "client"))]
pub(crate) fn h3_wire_code(e: &quiche::h3::Error) -> u64 {
    use quiche::h3::Error as E;
    match e {
        E::Done => H3_NO_ERROR,
        E::ExcessiveLoad => H3_EXCESSIVE_LOAD,
        E::IdError => H3_ID_ERROR,
        E::StreamCreationError => H3_STREAM_CREATION_ERROR,
        E::ClosedCriticalStream => H3_CLOSED_CRITICAL_STREAM,
        E::MissingSettings => H3_MISSING_SETTINGS,
        E::FrameUnexpected => H3_FRAME_UNEXPECTED,
        E::FrameError => H3_FRAME_ERROR,
        // QPACK_DECOMPRESSION_FAILED (RFC 9204 §6).
        E::QpackDecompressionFailed => 0x200,
        E::SettingsError => H3_SETTINGS_ERROR,
        E::RequestRejected => H3_REQUEST_REJECTED,
        E::RequestCancelled => H3_REQUEST_CANCELLED,
        E::RequestIncomplete => H3_REQUEST_INCOMPLETE,
        E::MessageError => H3_MESSAGE_ERROR,
        E::ConnectError => H3_CONNECT_ERROR,
        E::VersionFallback => H3_VERSION_FALLBACK,
        _ => H3_INTERNAL_ERROR,
    }
}
