//! Entry points for the criterion benches of `benches/`: not an API. Hidden from the docs
//! and compiled only with the `__bench` feature, which the crate's dev-dependency on itself
//! turns on, so `cargo bench` and `cargo clippy --all-targets` see it and users never do.
//!
//! Each item wraps one internal path the benches time, so that timing them costs the public
//! API nothing: field conversion (`h3::fields`), a whole request over two in-memory quiche
//! connections (the server's connection logic, the request body's chunk path and the
//! response, without sockets), and the connection task's flush (quiche's packets into GSO
//! batches on a loopback socket).

use quiche::h3::Header;

#[cfg(feature = "server")]
/// The request head of a field section, as the server checks and builds it (RFC 9114
/// §4.3.1); false when it is malformed.
pub fn request_from_fields(list: &[Header]) -> bool {
    crate::h3::fields::request_from_fields(list).is_ok()
}

#[cfg(feature = "client")]
/// A request's field section, as the client sends it.
pub fn request_fields(request: &http::Request<()>) -> Vec<Header> {
    crate::h3::fields::request_fields(request).expect("a valid request")
}

#[cfg(feature = "server")]
/// A response's field section, as the server sends it: the head's fields lent to quiche's
/// encoder (here counted), not copied.
pub fn response_fields(response: &http::Response<()>) -> usize {
    let head = crate::h3::fields::ResponseHead::new(response.status(), response.headers(), None, false);
    head.lend(|fields| fields.len())
}

/// One HTTP/3 request after another over two in-memory quiche connections. Must be made and
/// used inside a tokio runtime (the server's timers are tokio's).
#[cfg(feature = "server")]
pub struct InMemory(crate::server::InMemoryBench);

#[cfg(feature = "server")]
impl InMemory {
    /// A handshaken pair whose server answers every request with the length of its body.
    #[allow(clippy::new_without_default)]
    pub fn new() -> InMemory {
        InMemory(crate::server::InMemoryBench::new())
    }

    /// A GET (no body) or a POST of `body`, until its response has arrived whole; returns
    /// the response body's length.
    pub fn request(&mut self, body: &[u8]) -> usize {
        self.0.request(body)
    }
}

/// A client connection's task with stream data written and not yet sent. Must be made and
/// used inside a tokio runtime.
pub struct Flush(crate::quic::FlushBench);

impl Flush {
    /// `bytes` of stream data waiting (at most a congestion window's worth is sent by one
    /// flush: 13.5 KB on a new connection).
    pub fn new(bytes: usize) -> Flush {
        Flush(crate::quic::FlushBench::new(bytes))
    }

    /// One flush; returns the number of packets it produced.
    pub fn flush(&mut self) -> usize {
        self.0.flush()
    }
}
