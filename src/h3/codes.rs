//! HTTP/3 error codes (RFC 9114 §8.1) and the mapping from quiche's connection errors.

use quiche::h3;

pub(crate) const H3_NO_ERROR: u64 = 0x100;
pub(crate) const H3_INTERNAL_ERROR: u64 = 0x102;
pub(crate) const H3_FRAME_UNEXPECTED: u64 = 0x105;
pub(crate) const H3_EXCESSIVE_LOAD: u64 = 0x107;
pub(crate) const H3_REQUEST_REJECTED: u64 = 0x10b;
pub(crate) const H3_REQUEST_CANCELLED: u64 = 0x10c;
pub(crate) const H3_REQUEST_INCOMPLETE: u64 = 0x10d;
pub(crate) const H3_MESSAGE_ERROR: u64 = 0x10e;

/// The wire code of a connection-level HTTP/3 error from quiche.
pub(crate) fn h3_wire_code(e: &h3::Error) -> u64 {
    use h3::Error as E;
    match e {
        E::Done => H3_NO_ERROR,
        E::ExcessiveLoad => H3_EXCESSIVE_LOAD,
        E::IdError => 0x108,
        E::StreamCreationError => 0x103,
        E::ClosedCriticalStream => 0x104,
        E::MissingSettings => 0x10a,
        E::FrameUnexpected => H3_FRAME_UNEXPECTED,
        E::FrameError => 0x106,
        E::QpackDecompressionFailed => 0x200,
        E::SettingsError => 0x109,
        E::RequestRejected => H3_REQUEST_REJECTED,
        E::RequestCancelled => H3_REQUEST_CANCELLED,
        E::RequestIncomplete => H3_REQUEST_INCOMPLETE,
        E::MessageError => H3_MESSAGE_ERROR,
        E::ConnectError => 0x10f,
        E::VersionFallback => 0x110,
        _ => H3_INTERNAL_ERROR,
    }
}
