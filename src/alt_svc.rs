//! `Alt-Svc`: telling HTTP/1.1 and HTTP/2 clients (browsers first) where the HTTP/3
//! endpoint is (RFC 7838, RFC 9114 §3.1.1).
//!
//! [`AltSvcLayer`] adds `alt-svc: h3=":PORT"; ma=86400` to every response that has none.
//! [`server::serve_with_tcp`](crate::server::serve_with_tcp) applies it to the TCP side by
//! itself; use the layer alone when TCP is served by something else.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{ALT_SVC, HeaderValue};
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

/// Adds an `Alt-Svc` header advertising HTTP/3 to responses.
#[derive(Debug, Clone)]
pub struct AltSvcLayer {
    value: HeaderValue,
}

impl AltSvcLayer {
    /// Advertises HTTP/3 on `port` of the same host, for a day:
    /// `h3=":PORT"; ma=86400`.
    pub fn new(port: u16) -> Self {
        let value = HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")).expect("ASCII");
        AltSvcLayer { value }
    }

    /// Advertises exactly this `Alt-Svc` value.
    pub fn with_value(value: HeaderValue) -> Self {
        AltSvcLayer { value }
    }
}

impl<S> Layer<S> for AltSvcLayer {
    type Service = AltSvc<S>;

    fn layer(&self, inner: S) -> AltSvc<S> {
        AltSvc {
            inner,
            value: self.value.clone(),
        }
    }
}

/// The service [`AltSvcLayer`] makes.
#[derive(Debug, Clone)]
pub struct AltSvc<S> {
    inner: S,
    value: HeaderValue,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AltSvc<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = AltSvcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        AltSvcFuture {
            inner: self.inner.call(request),
            value: Some(self.value.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`AltSvc`].
    #[derive(Debug)]
    pub struct AltSvcFuture<F> {
        #[pin]
        inner: F,
        value: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for AltSvcFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(value) = this.value.take() {
            response.headers_mut().entry(ALT_SVC).or_insert(value);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn adds_the_header_unless_the_service_set_one() {
        let inner = tower_service_fn(|_: Request<()>| Response::new(()));
        let mut svc = AltSvcLayer::new(4433).layer(inner);
        let response = svc.call(Request::new(())).await.unwrap();
        assert_eq!(response.headers()[ALT_SVC], "h3=\":4433\"; ma=86400");

        let inner = tower_service_fn(|_: Request<()>| {
            let mut r = Response::new(());
            r.headers_mut().insert(ALT_SVC, HeaderValue::from_static("clear"));
            r
        });
        let mut svc = AltSvcLayer::new(4433).layer(inner);
        assert_eq!(svc.call(Request::new(())).await.unwrap().headers()[ALT_SVC], "clear");
    }

    #[derive(Clone)]
    struct Fn_<F>(F);

    fn tower_service_fn<F>(f: F) -> Fn_<F> {
        Fn_(f)
    }

    impl<F: FnMut(Request<()>) -> Response<()>> Service<Request<()>> for Fn_<F> {
        type Response = Response<()>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Response<()>, std::convert::Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: Request<()>) -> Self::Future {
            std::future::ready(Ok((self.0)(r)))
        }
    }
}
