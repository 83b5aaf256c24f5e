//! The [`Client`](super::Client)'s conveniences, reqwest's set, as tower and tower-http
//! layers around the pool: redirects (tower-http's `FollowRedirect`, with
//! [`redirect::Policy`](super::redirect::Policy)), decompression (tower-http's
//! `Decompression` for gzip and br, [`super::zstd`] for zstd), default headers (tower's
//! `MapRequest`), a read timeout (tower's `Timeout` for each response head, tower-http's `ResponseBodyTimeout` between body
//! frames), and a whole-request timeout (ours: tower's `Timeout` ends at the head, and the
//! body must be bounded too).
//!
//! Each layer is a stage only when it is on, so a client that asks for nothing pays for
//! nothing; stages are boxed, their response bodies turned back into a [`RecvBody`].
//! Outermost first:
//!
//! 1. the whole-request timeout: covers every redirect and the final body;
//! 2. default headers: added once, so a redirect off the origin strips them like others;
//!    outside decompression, so that a default `accept-encoding` is the one sent;
//! 3. decompression: `accept-encoding` is sent with every hop, only the final response is
//!    decoded (a size limit then counts decoded bytes); a `Range` request asks for
//!    `identity`;
//! 4. redirects: each hop goes through the pool's protocol selection afresh;
//! 5. the read timeout: per hop, the head and every stall between body frames;
//! 6. [`Transport`]: the pool (HTTP/3, or TCP in auto mode).

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_service::Service;

use super::conn::{AnyBody, box_body};
use super::redirect::{Policy, Redirects};
use super::{Origin, Pool};
use crate::error::{BoxError, Error, Kind};
use crate::h3::body::RecvBody;

/// One stage of the stack: every layer's service, boxed to one type.
pub(crate) type Stage = BoxCloneSyncService<Request<ReqBody>, Response<RecvBody>, Error>;

/// A request body inside the client: bytes it can send again (for a 307 or 308 redirect),
/// or a stream it cannot.
pub(crate) struct ReqBody(Inner);

enum Inner {
    /// Known bytes (none: an empty body). Cloning shares them.
    Bytes(Option<Bytes>),
    /// Any other body, consumed as it is sent.
    Stream(AnyBody),
}

impl ReqBody {
    pub(crate) fn bytes(bytes: Bytes) -> Self {
        ReqBody(Inner::Bytes((!bytes.is_empty()).then_some(bytes)))
    }

    /// `body` as the client carries it: bytes when it is an empty body, a
    /// `http_body_util::Full<Bytes>` or `Empty<Bytes>` (found by type: they are what
    /// callers build in-memory requests with), a stream otherwise.
    pub(crate) fn of<B>(body: B) -> Self
    where
        B: Body + Send + 'static,
        B::Data: Buf + Send,
        B::Error: Into<BoxError>,
    {
        if body.is_end_stream() {
            return ReqBody(Inner::Bytes(None));
        }
        let mut slot = Some(body);
        let any = &mut slot as &mut dyn Any;
        if let Some(full) = any.downcast_mut::<Option<Full<Bytes>>>().and_then(Option::take) {
            return ReqBody::bytes(ready_bytes(full));
        }
        if any.downcast_mut::<Option<Empty<Bytes>>>().is_some() {
            return ReqBody(Inner::Bytes(None));
        }
        match slot {
            Some(body) => ReqBody(Inner::Stream(box_body(body))),
            None => ReqBody(Inner::Bytes(None)),
        }
    }

    /// The body's bytes, when they are all in memory (shared, not copied): what a request
    /// refused unprocessed is sent again with.
    pub(crate) fn replay(&self) -> Option<Bytes> {
        match &self.0 {
            Inner::Bytes(bytes) => bytes.clone(),
            Inner::Stream(_) => None,
        }
    }

    /// A copy to send again, when this body can be sent again.
    pub(crate) fn try_clone(&self) -> Option<ReqBody> {
        match &self.0 {
            Inner::Bytes(bytes) => Some(ReqBody(Inner::Bytes(bytes.clone()))),
            Inner::Stream(_) => None,
        }
    }

    /// The body as the transports take it.
    pub(crate) fn into_any(self) -> AnyBody {
        match self.0 {
            Inner::Bytes(Some(bytes)) => box_body(Full::new(bytes)),
            Inner::Bytes(None) => box_body(Empty::<Bytes>::new()),
            Inner::Stream(body) => body,
        }
    }
}

/// The data of a `Full` body, which is ready at once (it never waits).
fn ready_bytes(full: Full<Bytes>) -> Bytes {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut full = std::pin::pin!(full);
    match full.as_mut().poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

impl Default for ReqBody {
    /// Empty, as tower-http's redirects use it (a POST turned into a GET).
    fn default() -> Self {
        ReqBody(Inner::Bytes(None))
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Inner::Bytes(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Bytes(bytes) => bytes.is_none(),
            Inner::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Bytes(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream(body) => body.size_hint(),
        }
    }
}

/// The pool as a service: each request goes to its origin by the client's protocol
/// selection.
#[derive(Clone)]
pub(crate) struct Transport(pub(crate) Arc<Pool>);

impl Service<Request<ReqBody>> for Transport {
    type Response = Response<RecvBody>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RecvBody>, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let pool = Arc::clone(&self.0);
        let origin = Origin::of(request.uri());
        Box::pin(async move { pool.send_via(None, request, origin?).await })
    }
}

/// Which conveniences are on: what [`Builder`](super::Builder) collected.
#[derive(Debug, Clone)]
pub(crate) struct Conveniences {
    pub(crate) redirect: Policy,
    pub(crate) default_headers: HeaderMap,
    pub(crate) timeout: Option<Duration>,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) max_body: Option<u64>,
    #[cfg(feature = "gzip")]
    pub(crate) gzip: bool,
    #[cfg(feature = "brotli")]
    pub(crate) brotli: bool,
    #[cfg(feature = "zstd")]
    pub(crate) zstd: bool,
}

impl Default for Conveniences {
    fn default() -> Self {
        Conveniences {
            redirect: Policy::default(),
            default_headers: HeaderMap::new(),
            timeout: None,
            read_timeout: None,
            max_body: Some(DEFAULT_MAX_BODY),
            #[cfg(feature = "gzip")]
            gzip: true,
            #[cfg(feature = "brotli")]
            brotli: true,
            #[cfg(feature = "zstd")]
            zstd: true,
        }
    }
}

/// What `bytes()`, `text()` and `json()` read at most by default: 64 MiB, far above what
/// an API answers and small enough that a hostile server cannot exhaust memory through a
/// body read whole (a download of any size is read frame by frame instead).
pub(crate) const DEFAULT_MAX_BODY: u64 = 64 * 1024 * 1024;

/// The limit `ResponseExt` reads a body whole under: an extension of each response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub(crate) u64);

impl Conveniences {
    /// The client's stack over `transport`, as described in the module's documentation.
    pub(crate) fn stack(&self, transport: Transport) -> Stage {
        let mut stage = Stage::new(transport);
        if let Some(read_timeout) = self.read_timeout {
            stage = Stage::new(
                ServiceBuilder::new()
                    .map_err(move |e: BoxError| {
                        if e.is::<tower::timeout::error::Elapsed>() {
                            Error::new(Kind::Timeout)
                                .with_message(format!("no response head within the read timeout ({read_timeout:?})"))
                        } else {
                            into_error(e)
                        }
                    })
                    .timeout(read_timeout)
                    .map_response(|r: Response<tower_http::timeout::TimeoutBody<RecvBody>>| r.map(layered))
                    .layer(tower_http::timeout::ResponseBodyTimeoutLayer::new(read_timeout))
                    .service(stage),
            );
        }
        if self.redirect.follows() {
            stage = Stage::new(tower_http::follow_redirect::FollowRedirect::with_policy(
                stage,
                Redirects::new(self.redirect),
            ));
        }
        // Decompression inside the default headers: it fills in its own `accept-encoding`
        // when the request has none, which would hide a default one.
        stage = self.decompress(stage);
        if !self.default_headers.is_empty() {
            let defaults = Arc::new(self.default_headers.clone());
            stage = Stage::new(stage.map_request(move |mut request: Request<ReqBody>| {
                add_missing(request.headers_mut(), &defaults);
                request
            }));
        }
        if let Some(timeout) = self.timeout {
            stage = Stage::new(TotalTimeout { inner: stage, timeout });
        }
        match self.max_body {
            Some(limit) => Stage::new(stage.map_response(move |mut response: Response<RecvBody>| {
                response.extensions_mut().insert(BodyLimit(limit));
                response
            })),
            None => stage,
        }
    }

    /// `stage` under decompression for the codings that are on, if any is: tower-http's
    /// for gzip and br, ours for zstd (`super::zstd`, which bounds its window). Each
    /// request that has no `accept-encoding` offers them all.
    #[cfg(any(feature = "gzip", feature = "brotli", feature = "zstd"))]
    fn decompress(&self, stage: Stage) -> Stage {
        let mut offered: Vec<&str> = Vec::new();
        #[cfg(feature = "zstd")]
        if self.zstd {
            offered.push("zstd");
        }
        #[cfg(feature = "gzip")]
        if self.gzip {
            offered.push("gzip");
        }
        #[cfg(feature = "brotli")]
        if self.brotli {
            offered.push("br");
        }
        if offered.is_empty() {
            return stage;
        }
        let offer = http::HeaderValue::try_from(offered.join(",")).expect("coding names are valid field values");
        #[cfg(any(feature = "gzip", feature = "brotli"))]
        let stage = if offered.iter().any(|&c| c != "zstd") {
            use tower_http::decompression::{DecompressionBody, DecompressionLayer};
            let layer = DecompressionLayer::new().no_deflate().no_gzip().no_br().no_zstd();
            #[cfg(feature = "gzip")]
            let layer = layer.gzip(self.gzip);
            #[cfg(feature = "brotli")]
            let layer = layer.br(self.brotli);
            Stage::new(
                ServiceBuilder::new()
                    .map_response(|r: Response<DecompressionBody<RecvBody>>| r.map(layered))
                    .layer(layer)
                    .service(stage),
            )
        } else {
            stage
        };
        #[cfg(feature = "zstd")]
        let stage = if self.zstd {
            Stage::new(stage.map_response(super::zstd::decode))
        } else {
            stage
        };
        Stage::new(stage.map_request(move |mut request: Request<ReqBody>| {
            offer_codings(&mut request, &offer);
            request
        }))
    }

    #[cfg(not(any(feature = "gzip", feature = "brotli", feature = "zstd")))]
    fn decompress(&self, stage: Stage) -> Stage {
        stage
    }
}

/// Offers the codings the client decodes (`offer`) to a request that names none. A request
/// for a byte range asks for none (`accept-encoding: identity`), as reqwest does: a range
/// of a gzip body is no gzip stream. A response that is encoded all the same is still
/// decoded. (tower-http's layer offers only what it decodes itself, when the request has
/// nothing: this offer, made first, is the whole set.)
#[cfg(any(feature = "gzip", feature = "brotli", feature = "zstd"))]
fn offer_codings(request: &mut Request<ReqBody>, offer: &http::HeaderValue) {
    let headers = request.headers_mut();
    if !headers.contains_key(http::header::ACCEPT_ENCODING) {
        let value = if headers.contains_key(http::header::RANGE) {
            http::HeaderValue::from_static("identity")
        } else {
            offer.clone()
        };
        headers.insert(http::header::ACCEPT_ENCODING, value);
    }
}

/// Adds each default header the request does not have (by name: a request's own value
/// wins, as in reqwest).
fn add_missing(headers: &mut HeaderMap, defaults: &HeaderMap) {
    for name in defaults.keys() {
        if !headers.contains_key(name) {
            for value in defaults.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
    }
}

/// A layer's response body, back into the client's [`RecvBody`] with our error type.
pub(crate) fn layered<B>(body: B) -> RecvBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    RecvBody::layered(body.map_err(|e| into_error(e.into())))
}

/// A layer's error as ours: our own errors pass through (tower-http hands a body's error
/// back as it was), timeouts are timeouts, what else a decoder says is a decoding error.
pub(crate) fn into_error(error: BoxError) -> Error {
    let error = match error.downcast::<Error>() {
        Ok(ours) => return *ours,
        Err(other) => other,
    };
    if error.is::<tower::timeout::error::Elapsed>() || error.is::<tower_http::timeout::TimeoutError>() {
        return Error::new(Kind::Timeout)
            .with_message("the response body stalled past the read timeout")
            .with_source(error);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
    while let Some(e) = source {
        if let Some(ours) = e.downcast_ref::<Error>() {
            return ours.duplicate();
        }
        if let Some(ours) = e.downcast_ref::<std::io::Error>().and_then(Error::from_io) {
            return ours.duplicate();
        }
        source = e.source();
    }
    Error::new(Kind::Decode)
        .with_message("the response body could not be decoded")
        .with_source(error)
}

/// The whole-request timeout: the response head (redirects included) and then its body
/// must arrive by one deadline.
#[derive(Clone)]
struct TotalTimeout {
    inner: Stage,
    timeout: Duration,
}

impl Service<Request<ReqBody>> for TotalTimeout {
    type Response = Response<RecvBody>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RecvBody>, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let timeout = self.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let response = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, response).await {
                Ok(Ok(response)) => Ok(response.map(|body| {
                    RecvBody::layered(Deadline {
                        body,
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                        timeout,
                    })
                })),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(total_timeout(timeout)),
            }
        })
    }
}

fn total_timeout(timeout: Duration) -> Error {
    Error::new(Kind::Timeout).with_message(format!("the request took longer than its timeout ({timeout:?})"))
}

/// A body that fails once its deadline has passed.
struct Deadline {
    body: RecvBody,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        // The deadline first: a reader slower than the server finds a frame ready each time
        // it asks, and would never be timed out if the body were polled first.
        if this.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(total_timeout(this.timeout))));
        }
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_bodies_can_be_sent_again_streams_cannot() {
        let full = ReqBody::of(Full::new(Bytes::from_static(b"abc")));
        let copy = full.try_clone().expect("bytes are replayable");
        assert_eq!(copy.size_hint().exact(), Some(3));
        assert!(ReqBody::of(Empty::<Bytes>::new()).try_clone().is_some());
        let stream = http_body_util::StreamBody::new(futures_util::stream::iter([Ok::<_, std::io::Error>(
            Frame::data(Bytes::from_static(b"x")),
        )]));
        assert!(ReqBody::of(stream).try_clone().is_none());
    }

    #[test]
    fn defaults_fill_in_only_missing_headers() {
        let mut defaults = HeaderMap::new();
        defaults.insert("user-agent", "ua".parse().unwrap());
        defaults.append("x-many", "1".parse().unwrap());
        defaults.append("x-many", "2".parse().unwrap());
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", "mine".parse().unwrap());
        add_missing(&mut headers, &defaults);
        assert_eq!(headers["user-agent"], "mine");
        assert_eq!(headers.get_all("x-many").iter().count(), 2);
    }
}
