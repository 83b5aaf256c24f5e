//! The crate's one public error type, [`Error`], and the conversions into it.
//!
//! `Error` is opaque on purpose: callers ask it questions (`is_timeout`, `is_tls`, …) and read
//! the protocol error code with [`Error::code`], which says which of QUIC's three code
//! spaces it is in, so the internal layers can change how they fail without breaking anyone.

use crate::quic::QuicheConnection;
use std::fmt;

/// A boxed error, as tower and http-body use them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error code and the space it belongs to: QUIC has three, and a number means different
/// things in each (0x100 is a TLS alert among transport codes, `H3_NO_ERROR` among HTTP/3's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// A QUIC transport error that closed the connection (RFC 9000 §20.1), such as
    /// PROTOCOL_VIOLATION (0xa); a TLS alert is CRYPTO_ERROR, 0x100 + the alert.
    Transport(u64),
    /// An application protocol's error that closed the connection; for HTTP/3 one of
    /// [`codes`](crate::codes).
    Application(u64),
    /// An application protocol's code that reset or stopped one stream (RESET_STREAM,
    /// STOP_SENDING); for HTTP/3 one of [`codes`](crate::codes), such as
    /// `H3_REQUEST_CANCELLED`.
    Stream(u64),
}

impl Code {
    /// The code a CONNECTION_CLOSE carried: an application's, or a transport error.
    pub(crate) fn of_close(err: &quiche::ConnectionError) -> Code {
        if err.is_app {
            Code::Application(err.error_code)
        } else {
            Code::Transport(err.error_code)
        }
    }

    /// The number on the wire.
    pub fn value(self) -> u64 {
        match self {
            Code::Transport(v) | Code::Application(v) | Code::Stream(v) => v,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Transport(v) => write!(f, "transport code {v:#x}"),
            Code::Application(v) => write!(f, "application code {v:#x}"),
            Code::Stream(v) => write!(f, "stream code {v:#x}"),
        }
    }
}

/// An error from tower-quiche.
///
/// Use the predicates to decide what to do with it, and [`Error::code`] for the error code
/// (with its space) when a connection or stream was closed with one.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: Kind,
    code: Option<Code>,
    message: Option<String>,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A setting is wrong; the message says which and what to change.
    Config,
    /// A call was given what it cannot use (a URL that is not https, a bad header): the
    /// message says what.
    InvalidRequest,
    /// A request body the caller gave failed while it was sent (its error is the source).
    Body,
    /// The operating system refused a socket operation.
    Io,
    /// The TLS handshake failed (certificate not trusted, wrong name, no common ALPN, …).
    Tls,
    /// The handshake or the connection timed out.
    Timeout,
    /// The connection was closed, by us or by the peer.
    Closed,
    /// The peer answered with a stateless reset (RFC 9000 §10.3): it no longer has the
    /// connection (it restarted, say). Unlike a silent loss, this says the path works.
    StatelessReset,
    /// The connection was closed because the peer broke the protocol.
    Protocol,
    /// A stream was reset by the peer.
    Reset,
    /// An application-level error (raised by an [`Application`](crate::quic::Application)).
    Application,
    /// The client did not follow a redirect: too many, or to a URL it must not follow.
    #[cfg(feature = "client")]
    Redirect,
    /// A response body could not be decoded (its `content-encoding` did not match it).
    #[cfg(feature = "client")]
    Decode,
    /// A response body was larger than the client's limit for reading it whole.
    #[cfg(feature = "client")]
    TooLarge,
}

impl Error {
    pub(crate) fn new(kind: Kind) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                code: None,
                message: None,
                source: None,
            }),
        }
    }

    pub(crate) fn with_message(mut self, message: impl Into<String>) -> Self {
        self.inner.message = Some(message.into());
        self
    }

    pub(crate) fn with_code(mut self, code: Code) -> Self {
        self.inner.code = Some(code);
        self
    }

    /// The code a stream was reset or stopped with.
    #[cfg(any(feature = "server", feature = "client"))]
    pub(crate) fn with_stream_code(self, code: u64) -> Self {
        self.with_code(Code::Stream(code))
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// An error hyper reported for a message over TCP, classified (`what` says which
    /// message failed, e.g. "the request body over TCP failed").
    #[cfg(all(feature = "tcp", any(feature = "client", feature = "server")))]
    pub(crate) fn from_hyper(e: hyper::Error, what: &'static str) -> Self {
        Error::new(hyper_kind(&e)).with_message(what).with_source(e)
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(Kind::Config).with_message(message)
    }

    /// A call was given what it cannot use: the caller's mistake, not a setting's.
    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidRequest).with_message(message)
    }

    /// The caller's request body failed while it was sent.
    #[cfg(feature = "client")]
    pub(crate) fn body(source: BoxError) -> Self {
        Error::new(Kind::Body)
            .with_message(format!("the request body failed: {source}"))
            .with_source(source)
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::new(Kind::Io).with_message(context).with_source(source)
    }

    /// An error an [`Application`](crate::quic::Application) raises to close its connection
    /// with `code` (an application protocol error code, sent to the peer in CONNECTION_CLOSE).
    /// A code above 2^62 − 1, the largest QUIC carries, is sent (and reported) as that.
    pub fn application(code: u64, message: impl Into<String>) -> Self {
        Error::new(Kind::Application)
            .with_code(Code::Application(crate::quic::wire_code(code)))
            .with_message(message)
    }

    /// A copy for a second reader (the source is kept as text: boxed errors do not clone).
    pub(crate) fn duplicate(&self) -> Self {
        let mut message = self.inner.message.clone();
        if let Some(source) = &self.inner.source {
            message = Some(match message {
                Some(m) => format!("{m}: {source}"),
                None => source.to_string(),
            });
        }
        Error {
            inner: Box::new(Inner {
                kind: self.inner.kind,
                code: self.inner.code,
                message,
                source: None,
            }),
        }
    }

    /// A setting is wrong: the message says which one and what to change.
    pub fn is_config(&self) -> bool {
        self.inner.kind == Kind::Config
    }

    /// A call was given what it cannot use: a URL that is not an absolute `https` URL, an
    /// address that is not `host:port`, an invalid header, a body that could not be
    /// serialized. Nothing was sent; the message says what to change.
    pub fn is_invalid_request(&self) -> bool {
        self.inner.kind == Kind::InvalidRequest
    }

    /// The request body failed while it was sent: the body's own error, not the server's
    /// doing (the stream was reset with `H3_INTERNAL_ERROR`); it is the
    /// [`source`](std::error::Error::source). (When the response head arrived before the
    /// body failed, the response is returned, and its body ends in an error instead.)
    pub fn is_body(&self) -> bool {
        self.inner.kind == Kind::Body
    }

    /// A socket operation failed.
    pub fn is_io(&self) -> bool {
        self.inner.kind == Kind::Io
    }

    /// The TLS handshake failed: the peer's certificate did not verify, the name did not
    /// match, no application protocol (ALPN) was in common, or the peer refused ours.
    pub fn is_tls(&self) -> bool {
        self.inner.kind == Kind::Tls
    }

    /// The handshake, or an idle connection, timed out.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == Kind::Timeout
    }

    /// The connection is closed (by either side, for any reason, including a timeout or a
    /// TLS failure).
    pub fn is_closed(&self) -> bool {
        matches!(
            self.inner.kind,
            Kind::Closed | Kind::StatelessReset | Kind::Timeout | Kind::Tls | Kind::Protocol | Kind::Application
        )
    }

    /// The peer ended the connection with a stateless reset (RFC 9000 §10.3): it had lost
    /// the connection (restarted, say) but answered over the same path, so a new
    /// connection may well work. [`is_closed`](Self::is_closed) is true too.
    pub fn is_stateless_reset(&self) -> bool {
        self.inner.kind == Kind::StatelessReset
    }

    /// The connection closed, and nothing more telling (a timeout, TLS, a protocol error,
    /// an application's error) is known of why; it may carry the peer's close code.
    #[cfg(all(feature = "client", feature = "tcp"))]
    pub(crate) fn is_plainly_closed(&self) -> bool {
        self.inner.kind == Kind::Closed
    }

    /// The peer broke the QUIC or application protocol.
    pub fn is_protocol(&self) -> bool {
        self.inner.kind == Kind::Protocol
    }

    /// A stream was reset by the peer; [`code`](Self::code) holds the reset code.
    pub fn is_reset(&self) -> bool {
        self.inner.kind == Kind::Reset
    }

    /// The server refused the request without processing it (GOAWAY, or
    /// `H3_REQUEST_REJECTED`): it is safe to send again (RFC 9114 §4.1.1).
    pub fn is_request_rejected(&self) -> bool {
        self.inner.code == Some(Code::Stream(crate::codes::H3_REQUEST_REJECTED))
    }

    /// (`client` feature) A redirect was not followed: more of them than the client's
    /// [`redirect::Policy`](crate::client::redirect::Policy) allows (a loop, say), or one to
    /// a URL that is not `https`. The message names the URL.
    #[cfg(feature = "client")]
    pub fn is_redirect(&self) -> bool {
        self.inner.kind == Kind::Redirect
    }

    /// (`client` feature) A response body could not be decoded: its bytes were not what
    /// its `content-encoding` (gzip, br, zstd) said.
    #[cfg(feature = "client")]
    pub fn is_decode(&self) -> bool {
        self.inner.kind == Kind::Decode
    }

    /// (`client` feature) A response body read whole (`bytes`, `text`, `json`) was larger
    /// than [`max_response_body_size`](crate::client::Builder::max_response_body_size),
    /// counted after decoding.
    #[cfg(feature = "client")]
    pub fn is_too_large(&self) -> bool {
        self.inner.kind == Kind::TooLarge
    }

    /// The error carries an application error code (set by an application or sent by the
    /// peer's application in CONNECTION_CLOSE).
    pub fn is_application(&self) -> bool {
        self.inner.kind == Kind::Application
    }

    /// The error code, with the space it is in, where there is one.
    pub fn code(&self) -> Option<Code> {
        self.inner.code
    }

    /// The tower-quiche error an [`std::io::Error`] carries, as the reads and writes of
    /// [`RecvStream`](crate::quic::RecvStream) and [`SendStream`](crate::quic::SendStream)
    /// fail: for the code of a stream the peer reset or stopped, say.
    ///
    /// ```
    /// # fn check(e: std::io::Error) {
    /// use tower_quiche::{Code, Error};
    /// if let Some(Code::Stream(code)) = Error::from_io(&e).and_then(Error::code) {
    ///     println!("the peer reset the stream with code {code}");
    /// }
    /// # }
    /// ```
    pub fn from_io(error: &std::io::Error) -> Option<&Error> {
        error.get_ref()?.downcast_ref::<Error>()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("tower_quiche::Error");
        d.field("kind", &self.inner.kind);
        if let Some(code) = self.inner.code {
            d.field("code", &format_args!("{code}"));
        }
        if let Some(message) = &self.inner.message {
            d.field("message", message);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.inner.kind {
            Kind::Config => "invalid configuration",
            Kind::InvalidRequest => "invalid request",
            Kind::Body => "request body failed",
            Kind::Io => "socket error",
            Kind::Tls => "TLS handshake failed",
            Kind::Timeout => "timed out",
            Kind::Closed => "connection closed",
            Kind::StatelessReset => "stateless reset: the peer no longer has the connection",
            Kind::Protocol => "protocol error",
            Kind::Reset => "stream reset by peer",
            Kind::Application => "application error",
            #[cfg(feature = "client")]
            Kind::Redirect => "redirect not followed",
            #[cfg(feature = "client")]
            Kind::Decode => "response body could not be decoded",
            #[cfg(feature = "client")]
            Kind::TooLarge => "response body too large",
        };
        f.write_str(what)?;
        if let Some(message) = &self.inner.message {
            write!(f, ": {message}")?;
        }
        if let Some(code) = self.inner.code {
            write!(f, " ({code})")?;
        }
        if let Some(source) = &self.inner.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source.as_ref().map(|s| &**s as _)
    }
}

/// What a hyper error says went wrong: a timeout, a message that broke HTTP/1.1 or HTTP/2,
/// or else a connection or stream that ended.
#[cfg(all(feature = "tcp", any(feature = "client", feature = "server")))]
pub(crate) fn hyper_kind(e: &hyper::Error) -> Kind {
    if e.is_timeout() {
        Kind::Timeout
    } else if e.is_parse() || e.is_parse_status() {
        Kind::Protocol
    } else {
        Kind::Closed
    }
}

/// What ended a QUIC connection that quiche does not record as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeenEnd {
    /// Nothing: quiche's view says it all.
    Unremarkable,
    /// The handshake outlived its deadline (the connection's task ended it).
    HandshakeDeadline,
    /// A packet closed it without an error, which only a stateless reset does.
    StatelessReset,
}

/// Builds the error that describes why a QUIC connection closed, from quiche's view of it
/// and what the connection's task saw (`seen`).
///
/// `verify_error` is what our certificate verifier recorded, if anything: BoringSSL only
/// sends an alert number, and "unable to get local issuer certificate" is what a user needs.
pub(crate) fn from_close(conn: &QuicheConnection, seen: SeenEnd, verify_error: Option<&str>) -> Option<Error> {
    match seen {
        SeenEnd::Unremarkable => {}
        SeenEnd::HandshakeDeadline => {
            return Some(Error::new(Kind::Timeout).with_message("the QUIC handshake did not complete in time"));
        }
        SeenEnd::StatelessReset => {
            return Some(
                Error::new(Kind::StatelessReset)
                    .with_message("it restarted, say, or lost it otherwise (RFC 9000 §10.3)"),
            );
        }
    }
    if conn.is_timed_out() {
        let message = if conn.is_established() {
            "the connection was idle for longer than its idle timeout"
        } else {
            "no answer from the peer during the handshake (idle timeout)"
        };
        return Some(Error::new(Kind::Timeout).with_message(message));
    }
    let (local, err) = match (conn.local_error(), conn.peer_error()) {
        (Some(e), _) => (true, e),
        (None, Some(e)) => (false, e),
        (None, None) => return None,
    };
    let who = if local { "closed by us" } else { "closed by the peer" };
    let reason = String::from_utf8_lossy(&err.reason);
    let detail = if reason.is_empty() {
        who.to_string()
    } else {
        format!("{who}: {reason}")
    };
    if err.is_app {
        if err.error_code == 0 || (err.error_code == 0x100 && conn.application_proto() == b"h3") {
            // "No error" (0, or H3_NO_ERROR for HTTP/3): a clean close.
            return None;
        }
        return Some(
            Error::new(Kind::Application)
                .with_code(Code::of_close(err))
                .with_message(detail),
        );
    }
    match err.error_code {
        0 => None,
        // CRYPTO_ERROR: 0x0100 + the TLS alert (RFC 9001 §4.8).
        code @ 0x100..=0x1ff => {
            let alert = (code - 0x100) as u8;
            let mut message = format!("{who} with TLS alert {alert} ({})", alert_name(alert));
            if let Some(verify) = verify_error {
                message = format!("{message}: {verify}");
            }
            Some(
                Error::new(Kind::Tls)
                    .with_code(Code::Transport(code))
                    .with_message(message),
            )
        }
        code => Some(
            Error::new(Kind::Protocol)
                .with_code(Code::Transport(code))
                .with_message(format!("{detail} ({})", transport_error_name(code))),
        ),
    }
}

fn alert_name(alert: u8) -> &'static str {
    match alert {
        40 => "handshake_failure",
        42 => "bad_certificate: the certificate did not verify",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        48 => "unknown_ca: the certificate is not signed by a trusted authority",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        80 => "internal_error",
        109 => "missing_extension",
        112 => "unrecognized_name",
        116 => "certificate_required",
        120 => "no_application_protocol: no ALPN protocol in common",
        _ => "TLS alert",
    }
}

fn transport_error_name(code: u64) -> &'static str {
    match code {
        0x1 => "INTERNAL_ERROR",
        0x2 => "CONNECTION_REFUSED",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "STREAM_LIMIT_ERROR",
        0x5 => "STREAM_STATE_ERROR",
        0x6 => "FINAL_SIZE_ERROR",
        0x7 => "FRAME_ENCODING_ERROR",
        0x8 => "TRANSPORT_PARAMETER_ERROR",
        0x9 => "CONNECTION_ID_LIMIT_ERROR",
        0xa => "PROTOCOL_VIOLATION",
        0xb => "INVALID_TOKEN",
        0xc => "APPLICATION_ERROR",
        0xd => "CRYPTO_BUFFER_EXCEEDED",
        0xe => "KEY_UPDATE_ERROR",
        0xf => "AEAD_LIMIT_REACHED",
        0x10 => "NO_VIABLE_PATH",
        _ => "transport error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_message_and_code() {
        let e = Error::application(0x42, "bye");
        assert!(e.is_application());
        assert!(e.is_closed());
        assert_eq!(e.code(), Some(Code::Application(0x42)));
        assert_eq!(e.to_string(), "application error: bye (application code 0x42)");
    }

    #[test]
    fn request_rejected_is_recognised_by_its_code() {
        let e = Error::new(Kind::Closed)
            .with_stream_code(0x10b)
            .with_message("H3_REQUEST_REJECTED");
        assert!(e.is_request_rejected());
        assert!(!Error::application(0x10c, "cancelled").is_request_rejected());
        // The same number closing the connection is not about one request.
        assert!(!Error::application(0x10b, "rejected").is_request_rejected());
    }

    #[test]
    fn config_errors_are_not_closed() {
        let e = Error::config("empty ALPN list");
        assert!(e.is_config());
        assert!(!e.is_closed());
    }
}
