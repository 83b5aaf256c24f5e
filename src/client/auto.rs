//! Protocol selection (`tcp` feature, auto mode): TCP until the origin advertises HTTP/3 in
//! `Alt-Svc`, then HTTP/3.

use std::sync::Arc;
use std::time::Instant;

use http::header::ALT_SVC;
use http::{Request, Response, Version};

use super::conn::AnyBody;
use super::{Mode, Origin, Pool, Route};
use crate::error::Error;
use crate::h3::body::RecvBody;

impl Pool {
    /// HTTP/3 when the origin has a usable connection, or advertised HTTP/3 that is still
    /// fresh (waiting for its connection); TCP otherwise.
    pub(super) async fn auto_route(self: &Arc<Self>, origin: &Origin) -> Result<Route, Error> {
        if let Some(send) = self.pick(origin, false) {
            return Ok(Route::H3(send));
        }
        let port = self.alt_svc().h3_port(origin, Instant::now());
        match port {
            Some(port) => Ok(Route::H3(self.connection(origin, port).await?)),
            None => Ok(Route::Tcp),
        }
    }

    /// Sends `request` over TCP, and in auto mode learns from the response's `Alt-Svc`.
    pub(super) async fn send_tcp(
        &self,
        request: Request<AnyBody>,
        origin: &Origin,
    ) -> Result<Response<RecvBody>, Error> {
        let tcp = self
            .tcp
            .as_ref()
            .ok_or_else(|| Error::config("this client speaks HTTP/3 only (Builder::http3_prior_knowledge)"))?;
        let response = tcp.send(for_tcp(request)).await?;
        if self.mode == Mode::Auto {
            self.alt_svc()
                .update(origin, response.headers().get_all(ALT_SVC).iter(), Instant::now());
        }
        Ok(response)
    }

    fn alt_svc(&self) -> std::sync::MutexGuard<'_, super::alt_svc::Cache> {
        self.alt_svc.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `request` as hyper's client takes it: HTTP/1.1 as the version asked for (hyper uses
/// HTTP/2 when ALPN chose it).
fn for_tcp(mut request: Request<AnyBody>) -> Request<AnyBody> {
    if !matches!(request.version(), Version::HTTP_10 | Version::HTTP_11) {
        *request.version_mut() = Version::HTTP_11;
    }
    request
}
