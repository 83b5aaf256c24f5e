//! Which redirects the [`Client`](super::Client) follows: [`Policy`], in reqwest's terms.
//!
//! Following is tower-http's `FollowRedirect` layer; what this module owns is the policy it
//! asks at each hop (how many, to where) and what the request loses on the way (credentials
//! when the origin changes). Each hop goes through the client's protocol selection afresh,
//! so a redirect may cross protocols: an HTTP/2 answer may send the request to an origin
//! served over HTTP/3, and the other way round.

use http::header::{AUTHORIZATION, COOKIE, HOST, PROXY_AUTHORIZATION};
use http::{Request, Uri};
use tower_http::follow_redirect::policy::{Action, Attempt, Policy as TowerPolicy};

use super::layers::ReqBody;
use crate::error::{Error, Kind};

/// How many redirects the client follows: [`Policy::limited`] (the default follows up to
/// 10) or [`Policy::none`].
///
/// Whatever the limit, the client:
/// - fails with an error whose [`is_redirect`](crate::Error::is_redirect) is true when a
///   redirect goes past the limit (a loop ends there), or points to a URL that is not
///   `https` (this client speaks no cleartext HTTP, and a downgrade would expose the
///   request; reqwest follows one over plain TCP, curl `--proto-redir =https` refuses it);
/// - drops `authorization`, `cookie` and `proxy-authorization` once a redirect leaves the
///   request's origin (scheme, host, port), for every later hop, as reqwest does, and a
///   `host` the request carried (each hop's comes from its URL);
/// - changes a POST answered with 301 or 302, and any method but HEAD answered with 303,
///   into a body-less GET (RFC 9110 §15.4);
/// - follows 307 and 308 with the same method and body only when the body can be sent
///   again: a body given as bytes (`RequestBuilder::body`, `http_body_util::Full<Bytes>`,
///   `Empty`) can; a streaming body is consumed as it is sent, so the 307 or 308 response
///   itself is returned instead.
///
/// The [`Response`](http::Response) of a followed request is the last one; redirect
/// responses' bodies are discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How many redirects may be followed for one request; `None` follows none.
    max: Option<usize>,
}

impl Policy {
    /// Follows up to `max` redirects per request; one more is an error (with `0`, the
    /// first redirect is).
    pub fn limited(max: usize) -> Self {
        Policy { max: Some(max) }
    }

    /// Follows no redirect: a 3xx response is returned as it is (`curl` without `-L`).
    pub fn none() -> Self {
        Policy { max: None }
    }

    /// Whether redirects are looked at: followed up to the limit, and an error past it
    /// (`limited(0)` fails at the first, as reqwest's does), unlike [`none`](Self::none).
    pub(crate) fn follows(&self) -> bool {
        self.max.is_some()
    }
}

impl Default for Policy {
    /// `Policy::limited(10)`, as reqwest's.
    fn default() -> Self {
        Policy::limited(10)
    }
}

/// The policy with one request's state: tower-http clones it for each request.
#[derive(Debug, Clone)]
pub(crate) struct Redirects {
    max: usize,
    followed: usize,
    /// A redirect left the origin: credentials are no longer sent.
    left_origin: bool,
}

impl Redirects {
    pub(crate) fn new(policy: Policy) -> Self {
        Redirects {
            max: policy.max.unwrap_or(0),
            followed: 0,
            left_origin: false,
        }
    }
}

impl TowerPolicy<ReqBody, Error> for Redirects {
    fn redirect(&mut self, attempt: &Attempt<'_>) -> Result<Action, Error> {
        let location = attempt.location();
        if self.followed >= self.max {
            return Err(Error::new(Kind::Redirect).with_message(format!(
                "more than {} redirects; the next one was to {location}",
                self.max
            )));
        }
        if location.scheme_str() != Some("https") {
            return Err(Error::new(Kind::Redirect).with_message(format!(
                "refused to follow a redirect to {location}: this client follows https:// URLs only"
            )));
        }
        self.followed += 1;
        if !same_origin(attempt.previous(), location) {
            self.left_origin = true;
        }
        Ok(Action::Follow)
    }

    fn on_request(&mut self, request: &mut Request<ReqBody>) {
        if self.left_origin {
            // The original request's headers are carried to every hop: strip them on each.
            // A `host` the caller set names the first origin: over TCP it would go to the
            // new one as it is (hyper-util adds one from the URI only when there is none).
            for name in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, HOST] {
                request.headers_mut().remove(name);
            }
        }
    }

    fn clone_body(&self, body: &ReqBody) -> Option<ReqBody> {
        body.try_clone()
    }
}

/// Same scheme, host and port (the default port of the scheme when none is written).
fn same_origin(a: &Uri, b: &Uri) -> bool {
    let port = |u: &Uri| {
        u.port_u16().unwrap_or(match u.scheme_str() {
            Some("http") => 80,
            _ => 443,
        })
    };
    a.scheme() == b.scheme()
        && a.host().map(str::to_ascii_lowercase) == b.host().map(str::to_ascii_lowercase)
        && port(a) == port(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_scheme_host_and_effective_port() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert!(same_origin(
            &uri("https://a.example/x"),
            &uri("https://A.example:443/y")
        ));
        assert!(!same_origin(&uri("https://a.example/"), &uri("https://b.example/")));
        assert!(!same_origin(
            &uri("https://a.example/"),
            &uri("https://a.example:8443/")
        ));
        assert!(!same_origin(&uri("https://a.example/"), &uri("http://a.example:443/")));
    }
}
