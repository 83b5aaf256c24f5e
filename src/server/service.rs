//! The shape of service the server runs, named once here instead of in every signature.

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::error::BoxError;

mod sealed {
    pub trait Sealed<ReqBody> {}
}

/// A [`tower::Service`](tower_service::Service) the server can run for requests with bodies
/// of type `ReqBody` ([`RecvBody`](crate::RecvBody), over HTTP/3 and over TCP): it answers
/// `Response<B>` for a body the server can send, it and its futures can move between
/// threads, and its errors convert to [`BoxError`].
///
/// Every service of that shape implements it: an axum `Router`, a tonic server, a
/// `tower::ServiceBuilder` stack, a `service_fn`. It exists so signatures say
/// `S: HttpService<RecvBody>` instead of six bounds (as hyper's `HttpService` does); it is
/// sealed, so it can gain bounds' names without breaking anyone.
pub trait HttpService<ReqBody>:
    sealed::Sealed<ReqBody>
    + Service<Request<ReqBody>, Response = Response<Self::ResBody>, Future: Send + 'static, Error: Into<BoxError>>
    + Clone
    + Send
    + 'static
{
    /// The response body.
    type ResBody: Body<Data: Buf + Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, ReqBody, B> sealed::Sealed<ReqBody> for S where S: Service<Request<ReqBody>, Response = Response<B>> {}

impl<S, ReqBody, B> HttpService<ReqBody> for S
where
    S: Service<Request<ReqBody>, Response = Response<B>, Future: Send + 'static, Error: Into<BoxError>>
        + Clone
        + Send
        + 'static,
    B: Body<Data: Buf + Send, Error: Into<BoxError>> + Send + 'static,
{
    type ResBody = B;
}
