//! Pure conversions between HTTP/3 field lists and `http` heads, with the validation
//! RFC 9114 §4.2 and §4.3 require. Nothing here touches a connection.

#[cfg(feature = "server")]
use bytes::Bytes;
#[cfg(feature = "client")]
use http::Response;
#[cfg(feature = "server")]
use http::header::COOKIE;
use http::header::{CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
#[cfg(feature = "server")]
use http::{Uri, uri};
use quiche::h3::{Header, NameValue};

/// Why a message is malformed (RFC 9114 §4.1.2): the stream gets H3_MESSAGE_ERROR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Fields that make sense only on a connection of HTTP/1.1 (RFC 9114 §4.2).
fn is_connection_specific(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
    )
}

/// The size of a field section as RFC 9114 §4.2.2 counts it (name + value + 32 per field).
pub(crate) fn section_size<T: NameValue>(list: &[T]) -> usize {
    list.iter().map(|h| h.name().len() + h.value().len() + 32).sum()
}

/// Copies the regular (non-pseudo) fields into `headers`, checking each name and value.
fn regular_field(headers: &mut HeaderMap, name: &[u8], value: &[u8]) -> Result<(), Malformed> {
    if name.iter().any(u8::is_ascii_uppercase) {
        return Err(Malformed("uppercase character in a field name"));
    }
    if is_connection_specific(name) {
        return Err(Malformed("connection-specific field"));
    }
    if name == b"te" && value != b"trailers" {
        return Err(Malformed("TE field with a value other than \"trailers\""));
    }
    let name = HeaderName::from_bytes(name).map_err(|_| Malformed("invalid field name"))?;
    let value = HeaderValue::from_bytes(value).map_err(|_| Malformed("invalid field value"))?;
    // The peer decides how many fields there are: `append` would panic past the map's
    // limit (32,768 entries).
    headers
        .try_append(name, value)
        .map_err(|_| Malformed("too many fields"))?;
    Ok(())
}

/// Collects the regular fields of a section into a header map; the map grows with the
/// fields, never to a capacity the peer names.
fn regular_fields<'a>(fields: impl Iterator<Item = &'a Header>) -> Result<HeaderMap, Malformed> {
    let mut headers = HeaderMap::new();
    for field in fields {
        if field.name().starts_with(b":") {
            return Err(Malformed("pseudo-header field after a regular field, or in trailers"));
        }
        regular_field(&mut headers, field.name(), field.value())?;
    }
    Ok(headers)
}

/// Joins `cookie` crumbs into one field with "; " (RFC 9114 §4.2.1): HTTP/3 clients may
/// split a cookie header into one field per crumb, and services written for HTTP/1.1 read
/// one `cookie` value.
#[cfg(feature = "server")]
fn join_cookie_crumbs(headers: &mut HeaderMap) -> Result<(), Malformed> {
    let crumbs = headers.get_all(COOKIE);
    if crumbs.iter().nth(1).is_none() {
        return Ok(());
    }
    let mut joined = Vec::new();
    for (i, crumb) in crumbs.iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    let value = HeaderValue::from_bytes(&joined).map_err(|_| Malformed("invalid cookie field"))?;
    // Replacing an entry still reserves room for one more: a map the peer filled to its
    // limit refuses it (where `insert` would panic).
    headers
        .try_insert(COOKIE, value)
        .map_err(|_| Malformed("too many fields"))?;
    Ok(())
}

/// All `content-length` values must agree and be numbers (RFC 9110 §8.6).
pub(crate) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Malformed> {
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        // Digits only (RFC 9110 §8.6): `u64::from_str` would also take "+0", which another
        // hop may read differently (request smuggling).
        let digits = value.as_bytes();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(Malformed("invalid content-length"));
        }
        // Any u64 is a length we may send; beyond it, none can be true.
        let parsed = digits
            .iter()
            .try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .ok_or(Malformed("invalid content-length"))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(Malformed("conflicting content-length values"));
        }
        length = Some(parsed);
    }
    Ok(length)
}

/// A validated request head and what the server needs to know about it.
#[cfg(feature = "server")]
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) request: Request<()>,
    /// What the body must be long; none on a CONNECT, whose stream carries the tunnel's
    /// bytes however many (RFC 9110 §9.3.6: it has no content; a `content-length` there
    /// bounds nothing).
    pub(crate) content_length: Option<u64>,
}

/// An `:authority` parsed once into bytes that the URI and a `host` field can share.
#[cfg(feature = "server")]
fn shared_authority(authority: &[u8]) -> Result<(uri::Authority, Bytes), Malformed> {
    let bytes = Bytes::copy_from_slice(authority);
    let parsed = uri::Authority::from_maybe_shared(bytes.clone()).map_err(|_| Malformed("invalid :authority"))?;
    Ok((parsed, bytes))
}

/// Adds a `host` field with the authority's bytes (shared, not copied): handlers written
/// for HTTP/1.1 look for the host there. Fails on a map the peer filled to its limit
/// (`insert` would panic there, as `append` would).
#[cfg(feature = "server")]
fn add_host(headers: &mut HeaderMap, authority: Bytes) -> Result<(), Malformed> {
    if let Ok(value) = HeaderValue::from_maybe_shared(authority) {
        headers
            .try_insert(HOST, value)
            .map_err(|_| Malformed("too many fields"))?;
    }
    Ok(())
}

/// Whether a request asks for a 100 (Continue) before it sends its body (RFC 9110
/// §10.1.1; the expectation's name is case-insensitive).
#[cfg(feature = "server")]
pub(crate) fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::EXPECT)
        .iter()
        .any(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Adds `early-data: 1`, which an intermediary that forwards a request from early data
/// must add (RFC 8470 §5.1); false on a map the peer filled to its limit.
#[cfg(feature = "server")]
pub(crate) fn mark_early_data(headers: &mut HeaderMap) -> bool {
    headers
        .try_insert(
            http::HeaderName::from_static("early-data"),
            HeaderValue::from_static("1"),
        )
        .is_ok()
}

/// Builds a request head from the fields of a request's HEADERS frame (RFC 9114 §4.3.1).
#[cfg(feature = "server")]
pub(crate) fn request_from_fields(list: &[Header]) -> Result<RequestHead, Malformed> {
    let (mut method, mut scheme, mut authority, mut path, mut protocol) = (None, None, None, None, None);
    let pseudo_count = list.iter().take_while(|f| f.name().starts_with(b":")).count();
    let (pseudo_fields, regular) = list.split_at(pseudo_count);
    let mut headers = regular_fields(regular.iter())?;
    for field in pseudo_fields {
        let (name, value) = (field.name(), field.value());
        if let Some(pseudo) = name.strip_prefix(b":") {
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                b"protocol" => &mut protocol,
                _ => {
                    return Err(Malformed("unknown or response pseudo-header field in a request"));
                }
            };
            if slot.replace(value).is_some() {
                return Err(Malformed("repeated pseudo-header field"));
            }
        }
    }
    join_cookie_crumbs(&mut headers)?;
    if authority.is_some_and(|a| a.contains(&b'@')) {
        // RFC 9114 §4.3.1: the authority MUST NOT include the userinfo subcomponent.
        return Err(Malformed(":authority with userinfo"));
    }
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next().map(HeaderValue::as_bytes);
    if hosts.next().is_some() {
        // RFC 9110 §7.2: more than one host is invalid; two hops may pick different ones.
        return Err(Malformed("more than one host field"));
    }
    if host.is_some_and(|h| h.contains(&b'@')) {
        return Err(Malformed("host with userinfo"));
    }
    let method =
        Method::from_bytes(method.ok_or(Malformed("missing :method"))?).map_err(|_| Malformed("invalid :method"))?;
    let uri = if method == Method::CONNECT && protocol.is_none() {
        // Plain CONNECT (RFC 9114 §4.4): only :authority; no :scheme or :path.
        if scheme.is_some() || path.is_some() {
            return Err(Malformed("CONNECT with :scheme or :path"));
        }
        let authority = authority
            .filter(|a| !a.is_empty())
            .ok_or(Malformed("CONNECT without :authority"))?;
        if host.is_some_and(|h| h != authority) {
            // RFC 9114 §4.3.1: both present, they must agree (a proxy that checks one and
            // connects to the other is told two things).
            return Err(Malformed(":authority and host differ"));
        }
        let (authority, bytes) = shared_authority(authority)?;
        if authority.port().is_none() {
            // The authority-form of RFC 9110 §7.1: host and port (RFC 9114 §4.4).
            return Err(Malformed("CONNECT :authority without a port"));
        }
        if host.is_none() {
            add_host(&mut headers, bytes)?;
        }
        let mut parts = uri::Parts::default();
        parts.authority = Some(authority);
        Uri::from_parts(parts).map_err(|_| Malformed("invalid :authority"))?
    } else {
        if protocol.is_some() && method != Method::CONNECT {
            return Err(Malformed(":protocol outside extended CONNECT"));
        }
        let scheme = scheme.ok_or(Malformed("missing :scheme"))?;
        let path = path
            .filter(|p| !p.is_empty())
            .ok_or(Malformed("missing or empty :path"))?;
        if path != b"*" && path[0] != b'/' {
            return Err(Malformed(":path is neither absolute nor \"*\""));
        }
        if path.contains(&b'#') {
            // A path and a query, no fragment (RFC 9114 §4.3.1): `http` would cut the path
            // at the '#', and serve `/a` to a `/a#.css` that a cache in front took for a
            // stylesheet.
            return Err(Malformed(":path with a fragment"));
        }
        if path == b"*" && method != Method::OPTIONS {
            return Err(Malformed("\"*\" :path outside OPTIONS"));
        }
        let authority = match (authority, host) {
            (Some(a), Some(h)) if a != h => return Err(Malformed(":authority and host differ")),
            (Some([]), _) | (None, Some([])) => return Err(Malformed("empty :authority or host")),
            (Some(a), _) => Some(a),
            (None, h) => h,
        };
        if authority.is_none() && matches!(scheme, b"http" | b"https") {
            return Err(Malformed("neither :authority nor host"));
        }
        // Built from its parts, not through `Uri::builder()`, which moves the whole
        // `Parts` through a `Result` at each step (with the `host` below sharing the
        // authority's bytes, about 400 instructions a request less, callgrind).
        let mut parts = uri::Parts::default();
        parts.scheme = Some(uri::Scheme::try_from(scheme).map_err(|_| Malformed("invalid :scheme"))?);
        if let Some(authority) = authority {
            let (authority, bytes) = shared_authority(authority)?;
            parts.authority = Some(authority);
            if host.is_none() {
                add_host(&mut headers, bytes)?;
            }
        }
        parts.path_and_query = Some(if path == b"*" {
            uri::PathAndQuery::from_static("*")
        } else {
            uri::PathAndQuery::try_from(path).map_err(|_| Malformed("invalid :path"))?
        });
        Uri::from_parts(parts).map_err(|_| Malformed("invalid :scheme, :authority or :path"))?
    };
    let mut content_length = content_length(&headers)?;
    if method == Method::CONNECT && content_length.take().is_some() {
        // A CONNECT has no content (RFC 9110 §9.3.6): a length would bound nothing, and is
        // not handed on (a proxy forwarding the head would pass it to the target).
        headers.remove(CONTENT_LENGTH);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_3;
    *request.headers_mut() = headers;
    if let Some(protocol) = protocol {
        request.extensions_mut().insert(Protocol(Box::from(protocol)));
    }
    Ok(RequestHead {
        request,
        content_length,
    })
}

/// The `:protocol` of an extended CONNECT request (RFC 9220), as a request extension: a
/// server's handler finds it on the request; a client puts it on a CONNECT request to make
/// it an extended CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol(Box<[u8]>);

impl Protocol {
    /// A protocol by its name, e.g. `websocket`.
    pub fn new(name: &str) -> Self {
        Protocol(Box::from(name.as_bytes()))
    }

    /// The protocol's name, e.g. `websocket`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Copies regular fields of a header map, dropping connection-specific ones.
fn push_fields(out: &mut Vec<Header>, headers: &HeaderMap) {
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        if regular_field_allowed(name, value.as_bytes()) {
            out.push(Header::new(name, value.as_bytes()));
        }
    }
}

/// Whether HTTP/3 may carry a regular field the `http` types allow (RFC 9114 §4.2): not a
/// connection-specific one, and `te` only as "trailers".
fn regular_field_allowed(name: &[u8], value: &[u8]) -> bool {
    !is_connection_specific(name) && (name != b"te" || value == b"trailers")
}

/// Whether a response has no content whatever its head says (RFC 9110 §6.4.1): the answer
/// to a HEAD request, 204 and 304.
pub(crate) fn is_bodyless(head_request: bool, status: StatusCode) -> bool {
    head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

/// Whether a response must not carry `content-length` (RFC 9110 §8.6): a 1xx or 204
/// response, and a 2xx response to CONNECT (`connect`), whose content is the tunnel that
/// follows, not a body of some length (§9.3.6). A client ignores one there.
pub(crate) fn forbids_content_length(connect: bool, status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT || (connect && status.is_success())
}

/// The fields of a response head; `connect` when it answers a CONNECT request.
/// `content_length` is added when the head has none and the body's exact size is known. A
/// response that must not carry `content-length` gets none, not even the service's own.
#[cfg(feature = "server")]
pub(crate) fn response_fields(
    status: StatusCode,
    headers: &HeaderMap,
    content_length: Option<u64>,
    connect: bool,
) -> Vec<Header> {
    let head = ResponseHead::new(status, headers, content_length, connect);
    head.fields().map(|(name, value)| Header::new(name, value)).collect()
}

/// A response head on its way out: the service's status and header map as they are, with
/// what HTTP/3 changes about them noted beside. Its fields are lent to quiche's encoder when
/// the head is written ([`OutFields::lend`]), so no name or value is copied on the way; a
/// list of quiche's `Header`s would cost two allocations per field.
#[cfg(feature = "server")]
pub(crate) struct ResponseHead<H = HeaderMap> {
    status: StatusCode,
    headers: H,
    /// The `content-length` to add: the head had none and the body's exact size is known.
    added_length: Option<Digits>,
    /// The response must not carry `content-length` ([`forbids_content_length`]).
    drop_length: bool,
    /// The length the head declares, which the body must match: the service's own field
    /// (the body's size when that field is unreadable), or the added one.
    declared_length: Option<u64>,
}

#[cfg(feature = "server")]
impl<H: std::borrow::Borrow<HeaderMap>> ResponseHead<H> {
    /// `connect` when it answers a CONNECT request; `content_length` is the body's exact
    /// size when known (see [`response_fields`]).
    pub(crate) fn new(status: StatusCode, headers: H, content_length: Option<u64>, connect: bool) -> Self {
        let drop_length = forbids_content_length(connect, status);
        // One look at the service's own field: it wins when valid; without one, the body's
        // size is added.
        let (added_length, declared_length) = if drop_length {
            (None, None)
        } else {
            match self::content_length(headers.borrow()) {
                Ok(Some(field)) => (None, Some(field)),
                Ok(None) => (content_length.map(itoa_u64), content_length),
                Err(_) => (None, content_length),
            }
        };
        ResponseHead {
            status,
            headers,
            added_length,
            drop_length,
            declared_length,
        }
    }

    /// The length the head declares, which the body must match (`None`: any length).
    pub(crate) fn declared_length(&self) -> Option<u64> {
        self.declared_length
    }

    /// The fields in the order they are sent: `:status`, the regular fields HTTP/3 allows,
    /// then an added `content-length`.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let regular = self.headers.borrow().iter().filter_map(|(name, value)| {
            let name = name.as_str().as_bytes();
            let allowed = regular_field_allowed(name, value.as_bytes())
                && !(self.drop_length && name == CONTENT_LENGTH.as_str().as_bytes());
            allowed.then_some((name, value.as_bytes()))
        });
        std::iter::once((&b":status"[..], self.status.as_str().as_bytes()))
            .chain(regular)
            .chain(self.added_length.iter().map(|d| (&b"content-length"[..], d.as_bytes())))
    }

    /// Runs `f` on the fields as quiche's encoder takes them, borrowed, not copied.
    pub(crate) fn lend<R>(&self, f: impl FnOnce(&[(&[u8], &[u8])]) -> R) -> R {
        lend_from(self.fields(), f)
    }
}

/// A field section queued to send.
pub(crate) enum OutFields {
    /// Fields made one by one: 1xx heads, trailers.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    List(Vec<Header>),
    /// A final response head, lent to quiche when written.
    #[cfg(feature = "server")]
    Response(ResponseHead),
}

/// Fields lent to quiche on the stack when a head has at most this many; more (rare) go
/// through a vector.
const LENT_ON_STACK: usize = 24;

impl OutFields {
    /// Runs `f` on the fields as quiche's encoder takes them, borrowed, not copied.
    pub(crate) fn lend<R>(&self, f: impl FnOnce(&[(&[u8], &[u8])]) -> R) -> R {
        match self {
            OutFields::List(list) => lend_from(list.iter().map(|h| (h.name(), h.value())), f),
            #[cfg(feature = "server")]
            OutFields::Response(head) => head.lend(f),
        }
    }

    /// Whether the section is an interim (1xx) response head.
    pub(crate) fn is_interim(&self) -> bool {
        self.status_class() == Some(b'1')
    }

    /// The first digit of the `:status`, if the section is a response head.
    pub(crate) fn status_class(&self) -> Option<u8> {
        match self {
            OutFields::List(list) => list
                .first()
                .filter(|f| f.name() == b":status")
                .and_then(|f| f.value().first().copied()),
            #[cfg(feature = "server")]
            OutFields::Response(head) => head.status.as_str().as_bytes().first().copied(),
        }
    }
}

fn lend_from<'a, R>(
    mut fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    f: impl FnOnce(&[(&'a [u8], &'a [u8])]) -> R,
) -> R {
    let mut on_stack: [(&[u8], &[u8]); LENT_ON_STACK] = [(&[], &[]); LENT_ON_STACK];
    let mut n = 0;
    for field in fields.by_ref() {
        if n == LENT_ON_STACK {
            let mut all = on_stack.to_vec();
            all.push(field);
            all.extend(fields);
            return f(&all);
        }
        on_stack[n] = field;
        n += 1;
    }
    f(&on_stack[..n])
}

/// Formats a length without going through `format!`.
#[cfg(feature = "server")]
struct Digits([u8; 20], usize);

#[cfg(feature = "server")]
impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.0[self.1..]
    }
}

#[cfg(feature = "server")]
fn itoa_u64(mut n: u64) -> Digits {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return Digits(buf, at);
        }
    }
}

/// The fields of a trailer section.
pub(crate) fn trailer_fields(trailers: &HeaderMap) -> Vec<Header> {
    let mut out = Vec::with_capacity(trailers.len());
    push_fields(&mut out, trailers);
    out
}

/// Builds trailers from a trailing HEADERS frame: pseudo-header fields are not allowed there
/// (RFC 9114 §4.3).
pub(crate) fn trailers_from_fields(list: &[Header]) -> Result<HeaderMap, Malformed> {
    regular_fields(list.iter())
}

/// The fields of a request head (client side). Fails when the URI lacks what HTTP/3 needs.
#[cfg(feature = "client")]
pub(crate) fn request_fields<B>(request: &Request<B>) -> Result<Vec<Header>, Malformed> {
    let uri = request.uri();
    let headers = request.headers();
    let mut out = Vec::with_capacity(headers.len() + 4);
    out.push(Header::new(b":method", request.method().as_str().as_bytes()));
    let authority = uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| headers.get(HOST).map(HeaderValue::as_bytes))
        .ok_or(Malformed("the request URI has no authority (host)"))?;
    // Credentials in the URL (`user:pw@host`) never go on the wire in :authority
    // (RFC 9114 §4.3.1 forbids userinfo there; a server must refuse such a request).
    let authority = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let protocol = request
        .extensions()
        .get::<Protocol>()
        .filter(|_| request.method() == Method::CONNECT);
    if request.method() == Method::CONNECT && protocol.is_none() {
        // Plain CONNECT (RFC 9114 §4.4): only :authority.
        out.push(Header::new(b":authority", authority));
    } else {
        // Extended CONNECT (RFC 9220 §3) adds :protocol to what other methods send.
        if let Some(protocol) = protocol {
            out.push(Header::new(b":protocol", protocol.as_bytes()));
        }
        out.push(Header::new(b":scheme", uri.scheme_str().unwrap_or("https").as_bytes()));
        out.push(Header::new(b":authority", authority));
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");
        out.push(Header::new(b":path", path.as_bytes()));
    }
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        if name == b"host" || is_connection_specific(name) || (name == b"te" && value.as_bytes() != b"trailers") {
            continue;
        }
        out.push(Header::new(name, value.as_bytes()));
    }
    Ok(out)
}

/// Builds a response head from a HEADERS frame (client side).
#[cfg(feature = "client")]
pub(crate) fn response_from_fields(list: &[Header]) -> Result<Response<()>, Malformed> {
    let mut status = None;
    let pseudo_count = list.iter().take_while(|f| f.name().starts_with(b":")).count();
    let (pseudo_fields, regular) = list.split_at(pseudo_count);
    let headers = regular_fields(regular.iter())?;
    for field in pseudo_fields {
        let (name, value) = (field.name(), field.value());
        {
            if name != b":status" {
                return Err(Malformed("request or unknown pseudo-header field in a response"));
            }
            if status.replace(value).is_some() {
                return Err(Malformed("repeated :status"));
            }
        }
    }
    let status = StatusCode::from_bytes(status.ok_or(Malformed("missing :status"))?)
        .map_err(|_| Malformed("invalid :status"))?;
    content_length(&headers)?;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = Version::HTTP_3;
    *response.headers_mut() = headers;
    Ok(response)
}

// Nearly every case parses a request as the server does; the round trips need both sides.
#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<Header> {
        pairs
            .iter()
            .map(|(n, v)| Header::new(n.as_bytes(), v.as_bytes()))
            .collect()
    }

    fn get(path: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "GET".into()),
            (":scheme", "https".into()),
            (":authority", "example.com".into()),
            (":path", path.into()),
        ]
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<RequestHead, Malformed> {
        request_from_fields(&fields(pairs))
    }

    #[test]
    fn a_plain_request_becomes_an_http3_request_with_host() {
        let mut list = get("/a/b?c=d");
        list.push(("accept", "x".into()));
        list.push(("accept", "y".into()));
        let pairs: Vec<(&str, &str)> = list.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let head = parse(&pairs).unwrap();
        let r = head.request;
        assert_eq!(r.method(), Method::GET);
        assert_eq!(r.uri(), "https://example.com/a/b?c=d");
        assert_eq!(r.version(), Version::HTTP_3);
        assert_eq!(r.headers()["host"], "example.com");
        let accepts: Vec<_> = r.headers().get_all("accept").iter().collect();
        assert_eq!(accepts, ["x", "y"], "repeats kept, in order");
    }

    #[test]
    fn malformed_requests_are_refused() {
        let base = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "a"),
            (":path", "/"),
        ];
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![(":scheme", "https"), (":authority", "a"), (":path", "/")],
                "missing :method",
            ),
            (
                vec![(":method", "GET"), (":authority", "a"), (":path", "/")],
                "missing :scheme",
            ),
            (
                vec![(":method", "GET"), (":scheme", "https"), (":authority", "a")],
                "missing :path",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "a"),
                    (":path", ""),
                ],
                "empty :path",
            ),
            (
                vec![(":method", "GET"), (":scheme", "https"), (":path", "/")],
                "no authority",
            ),
            ([&base[..], &[(":path", "/x")]].concat(), "repeated :path"),
            ([&base[..], &[(":status", "200")]].concat(), "response pseudo-header"),
            ([&base[..], &[(":foo", "1")]].concat(), "unknown pseudo-header"),
            (
                [&base[..2], &[("accept", "x")], &base[2..]].concat(),
                "pseudo after regular",
            ),
            ([&base[..], &[("Accept", "x")]].concat(), "uppercase name"),
            ([&base[..], &[("connection", "close")]].concat(), "connection"),
            (
                [&base[..], &[("transfer-encoding", "chunked")]].concat(),
                "transfer-encoding",
            ),
            ([&base[..], &[("keep-alive", "1")]].concat(), "keep-alive"),
            ([&base[..], &[("upgrade", "h2c")]].concat(), "upgrade"),
            ([&base[..], &[("te", "gzip")]].concat(), "te other than trailers"),
            (
                vec![
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "a"),
                    (":path", "noslash"),
                ],
                "relative path",
            ),
            (
                vec![
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "a"),
                    (":path", "*"),
                ],
                "* outside OPTIONS",
            ),
            (
                vec![
                    (":method", "CONNECT"),
                    (":scheme", "https"),
                    (":authority", "a:1"),
                    (":path", "/"),
                ],
                "CONNECT with scheme/path",
            ),
            (vec![(":method", "CONNECT")], "CONNECT without authority"),
            (
                vec![(":method", "CONNECT"), (":authority", "a:443"), ("host", "b:443")],
                "CONNECT whose :authority and host differ",
            ),
            (
                vec![(":method", "CONNECT"), (":authority", "a:443"), ("host", "")],
                "CONNECT with an empty host",
            ),
            (vec![(":method", "CONNECT"), (":authority", "a")], "CONNECT to no port"),
            (
                vec![
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":authority", "a"),
                    (":path", "/account#.css"),
                ],
                "a fragment in :path",
            ),
            ([&base[..], &[("host", "b")]].concat(), ":authority and host differ"),
            ([&base[..], &[("content-length", "x")]].concat(), "bad content-length"),
            (
                [&base[..], &[("content-length", "1"), ("content-length", "2")]].concat(),
                "conflicting content-length",
            ),
            ([&base[..], &[("x", "a\nb")]].concat(), "newline in value"),
            (
                vec![
                    (":method", "G E T"),
                    (":scheme", "https"),
                    (":authority", "a"),
                    (":path", "/"),
                ],
                "bad method",
            ),
        ];
        for (pairs, why) in cases {
            assert!(parse(&pairs).is_err(), "{why} must be refused");
        }
        assert!(parse(&base).is_ok());
        let connect = parse(&[(":method", "CONNECT"), (":authority", "a:443")])
            .unwrap()
            .request;
        assert_eq!(connect.uri().authority().unwrap(), "a:443");
        assert_eq!(
            connect.headers()["host"],
            "a:443",
            "a CONNECT's host is its authority too"
        );
        let with_length = parse(&[(":method", "CONNECT"), (":authority", "a:443"), ("content-length", "5")]).unwrap();
        assert_eq!(with_length.content_length, None, "a CONNECT's length bounds nothing");
        assert!(
            !with_length.request.headers().contains_key("content-length"),
            "nor is it handed on"
        );
        let with_host = parse(&[(":method", "CONNECT"), (":authority", "a:443"), ("host", "a:443")]);
        assert_eq!(with_host.unwrap().request.uri().authority().unwrap(), "a:443");
        let options = parse(&[
            (":method", "OPTIONS"),
            (":scheme", "https"),
            (":authority", "a"),
            (":path", "*"),
        ])
        .unwrap()
        .request;
        assert_eq!(options.uri(), "https://a*");
        assert_eq!(options.uri().path(), "*");
        assert!(parse(&[&base[..], &[("te", "trailers")]].concat()).is_ok());
        assert_eq!(
            parse(&[&base[..], &[("content-length", "5"), ("content-length", "5")]].concat())
                .unwrap()
                .content_length,
            Some(5)
        );
    }

    #[test]
    fn responses_drop_connection_specific_fields_and_get_a_length() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "close".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        headers.insert("x-a", "1".parse().unwrap());
        let list = response_fields(StatusCode::OK, &headers, Some(12345), false);
        let pairs: Vec<(&[u8], &[u8])> = list.iter().map(|h| (h.name(), h.value())).collect();
        assert_eq!(
            pairs,
            vec![
                (&b":status"[..], &b"200"[..]),
                (b"x-a", b"1"),
                (b"content-length", b"12345")
            ]
        );
        assert_eq!(itoa_u64(0).as_bytes(), b"0");
        assert_eq!(itoa_u64(u64::MAX).as_bytes(), u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn no_content_length_on_1xx_204_or_a_2xx_to_connect() {
        let has_length = |status: u16, connect: bool, service_set: bool| {
            let mut headers = HeaderMap::new();
            if service_set {
                headers.insert(CONTENT_LENGTH, "0".parse().unwrap());
            }
            let status = StatusCode::from_u16(status).unwrap();
            let list = response_fields(status, &headers, Some(5), connect);
            list.iter().any(|h| h.name() == b"content-length")
        };
        for service_set in [false, true] {
            assert!(!has_length(200, true, service_set), "2xx to CONNECT");
            assert!(!has_length(204, false, service_set), "204");
            assert!(!has_length(103, false, service_set), "1xx");
            assert!(has_length(407, true, service_set), "a CONNECT refused has a body");
            assert!(has_length(200, false, service_set), "a plain 200");
        }
    }

    #[test]
    fn a_queued_response_head_lends_its_fields_in_order_however_many() {
        let owned = |pairs: &[(&[u8], &[u8])]| -> Vec<(Vec<u8>, Vec<u8>)> {
            pairs.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
        };
        // Fewer fields than fit on the stack, exactly as many, and more.
        for extra in [3, LENT_ON_STACK - 2, LENT_ON_STACK - 1, LENT_ON_STACK + 9] {
            let mut headers = HeaderMap::new();
            headers.insert("connection", "close".parse().unwrap());
            headers.insert("te", "gzip".parse().unwrap());
            let mut expected = vec![(b":status".to_vec(), b"200".to_vec())];
            for i in 0..extra {
                headers.append("x-field", i.to_string().parse().unwrap());
                expected.push((b"x-field".to_vec(), i.to_string().into_bytes()));
            }
            expected.push((b"content-length".to_vec(), b"7".to_vec()));
            let queued = OutFields::Response(ResponseHead::new(StatusCode::OK, headers, Some(7), false));
            assert_eq!(queued.lend(owned), expected, "{extra} regular fields");
            assert_eq!(queued.status_class(), Some(b'2'));
            assert!(!queued.is_interim());
        }
        // The service's own content-length wins over the body's size; none at all on a 204
        // or a 2xx to CONNECT.
        let with_length = HeaderMap::from_iter([(CONTENT_LENGTH, "5".parse().unwrap())]);
        for (status, connect, expected) in [
            (
                StatusCode::OK,
                false,
                vec![(&b":status"[..], &b"200"[..]), (b"content-length", b"5")],
            ),
            (StatusCode::NO_CONTENT, false, vec![(b":status", b"204")]),
            (StatusCode::OK, true, vec![(b":status", b"200")]),
        ] {
            let head = ResponseHead::new(status, with_length.clone(), Some(9), connect);
            assert_eq!(head.lend(owned), owned(&expected), "{status}, CONNECT: {connect}");
        }
        let interim = OutFields::List(response_fields(StatusCode::EARLY_HINTS, &HeaderMap::new(), None, false));
        assert!(interim.is_interim());
        assert_eq!(interim.lend(|fields| fields.len()), 1);
    }

    #[test]
    fn trailers_refuse_pseudo_headers() {
        assert!(trailers_from_fields(&fields(&[(":status", "200")])).is_err());
        let t = trailers_from_fields(&fields(&[("x-trailer", "yes")])).unwrap();
        assert_eq!(t["x-trailer"], "yes");
    }

    #[cfg(feature = "client")]
    #[test]
    fn request_and_response_round_trip_on_the_client_side() {
        let req = Request::get("https://example.com:4433/p?q")
            .header("x", "1")
            .header("connection", "close")
            .body(())
            .unwrap();
        let list = request_fields(&req).unwrap();
        let head = request_from_fields(&list).unwrap().request;
        assert_eq!(head.uri(), "https://example.com:4433/p?q");
        assert_eq!(head.headers()["x"], "1");
        assert!(head.headers().get("connection").is_none());
        let resp = response_from_fields(&fields(&[(":status", "404"), ("a", "b")])).unwrap();
        assert_eq!(resp.status(), 404);
        assert!(response_from_fields(&fields(&[("a", "b")])).is_err());
    }

    #[test]
    fn smuggling_prone_heads_are_malformed() {
        let with = |extra: &[(&str, &str)]| {
            let mut pairs: Vec<(&str, String)> = get("/").into_iter().collect();
            pairs.extend(extra.iter().map(|(n, v)| (*n, v.to_string())));
            let list: Vec<Header> = pairs
                .iter()
                .map(|(n, v)| Header::new(n.as_bytes(), v.as_bytes()))
                .collect();
            request_from_fields(&list)
        };
        assert!(with(&[("host", "example.com"), ("host", "evil.example")]).is_err());
        assert!(with(&[("content-length", "+0")]).is_err());
        assert!(with(&[("content-length", " 1")]).is_err());
        assert!(with(&[("content-length", "99999999999999999999")]).is_err());
        assert_eq!(with(&[("content-length", "0010")]).unwrap().content_length, Some(10));
        let userinfo = fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "user:pw@example.com"),
            (":path", "/"),
        ]);
        assert!(request_from_fields(&userinfo).is_err());
    }

    #[test]
    #[cfg(feature = "client")]
    fn credentials_in_the_url_stay_out_of_the_authority() {
        let request = Request::get("https://user:secret@example.com:8443/p").body(()).unwrap();
        let fields = request_fields(&request).unwrap();
        let authority = fields.iter().find(|f| f.name() == b":authority").unwrap();
        assert_eq!(authority.value(), b"example.com:8443");
        assert!(fields.iter().all(|f| !f.value().windows(6).any(|w| w == b"secret")));
    }

    #[test]
    fn cookie_crumbs_are_joined_into_one_field() {
        let mut list = fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "example.com"),
            (":path", "/"),
        ]);
        list.extend(fields(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]));
        let head = request_from_fields(&list).unwrap();
        let cookies: Vec<_> = head.request.headers().get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
    }

    #[test]
    fn more_fields_than_a_header_map_holds_are_malformed_not_a_panic() {
        let list: Vec<Header> = (0..40_000)
            .map(|i| Header::new(format!("x-{i}").as_bytes(), b"v"))
            .collect();
        assert!(trailers_from_fields(&list).is_err());
        let mut request = fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "example.com"),
            (":path", "/"),
        ]);
        request.extend(list);
        assert!(request_from_fields(&request).is_err());
    }

    /// A head with exactly as many fields as a header map holds leaves no room for the
    /// `host` the server adds from `:authority`, nor for joining cookie crumbs: malformed,
    /// not a panic. (Found by review: `HeaderMap::insert` panicked there.)
    #[test]
    fn a_full_header_map_has_no_room_for_host_and_is_malformed_not_a_panic() {
        let mut map = HeaderMap::new();
        let holds = (0..)
            .take_while(|i| {
                let name = HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
                map.try_append(name, HeaderValue::from_static("v")).is_ok()
            })
            .count();
        let mut request = fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "example.com"),
            (":path", "/"),
        ]);
        request.extend((0..holds).map(|i| Header::new(format!("x-{i}").as_bytes(), b"v")));
        assert!(request_from_fields(&request).is_err());
        request.pop();
        assert_eq!(request_from_fields(&request).unwrap().request.headers().len(), holds);
        // Cookie crumbs (first, while the map has room) in a map then filled: joining them
        // replaces one entry, which still asks for room.
        let crumbs = [Header::new(b"cookie", b"a=1"), Header::new(b"cookie", b"b=2")];
        request.splice(4..4, crumbs);
        assert!(request_from_fields(&request).is_err());
    }

    #[cfg(feature = "client")]
    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Field names and values as a peer may send them: any bytes, biased towards the
        /// names and values the rules are about.
        fn name() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::sample::select(vec![
                    ":method",
                    ":scheme",
                    ":authority",
                    ":path",
                    ":protocol",
                    ":status",
                    "host",
                    "cookie",
                    "content-length",
                    "te",
                    "connection",
                    "x-a",
                    "Upper",
                ])
                .prop_map(|n| n.as_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 0..12),
            ]
        }

        fn value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::sample::select(vec![
                    "GET",
                    "CONNECT",
                    "OPTIONS",
                    "https",
                    "/",
                    "*",
                    "example.com",
                    "a@example.com",
                    "0",
                    "+1",
                    "7, 7",
                    "trailers",
                    "",
                ])
                .prop_map(|v| v.as_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 0..12),
            ]
        }

        fn field_list() -> impl Strategy<Value = Vec<Header>> {
            prop::collection::vec((name(), value()), 0..12)
                .prop_map(|list| list.iter().map(|(n, v)| Header::new(n, v)).collect())
        }

        /// Regular header names and values any `http` user may set.
        fn header_map() -> impl Strategy<Value = HeaderMap> {
            let names = prop::sample::select(vec!["accept", "x-trace", "cookie", "etag", "x-empty", "te"]);
            let values = "[ -~]{0,16}".prop_map(|v| v.trim().to_string());
            prop::collection::vec((names, values), 0..8).prop_map(|list| {
                let mut headers = HeaderMap::new();
                for (name, value) in list {
                    let value = if name == "te" { "trailers".to_string() } else { value };
                    headers.append(name, HeaderValue::from_str(&value).unwrap());
                }
                headers
            })
        }

        proptest! {
            /// No field list a peer sends panics a conversion; what is accepted holds the
            /// rules of RFC 9114 §4.2 and §4.3.1.
            #[test]
            fn any_field_list_is_a_head_or_malformed_never_a_panic(list in field_list()) {
                let _ = response_from_fields(&list);
                let _ = trailers_from_fields(&list);
                if let Ok(head) = request_from_fields(&list) {
                    let headers = head.request.headers();
                    prop_assert!(headers.keys().all(|n| !is_connection_specific(n.as_str().as_bytes())));
                    prop_assert!(headers.get_all(HOST).iter().count() <= 1);
                    prop_assert!(headers.get_all(COOKIE).iter().count() <= 1);
                    prop_assert!(head.request.uri().authority().is_none_or(|a| !a.as_str().contains('@')));
                    if head.request.method() == Method::CONNECT {
                        prop_assert!(head.content_length.is_none() && !headers.contains_key(CONTENT_LENGTH));
                    } else {
                        prop_assert_eq!(head.content_length, content_length(headers).unwrap());
                    }
                }
            }

            /// What the client sends is what the server reads: method, URI and headers
            /// survive the trip through fields (cookies joined, `host` from the authority).
            #[test]
            fn a_request_survives_the_trip_through_fields(
                method in prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
                path in "/[a-zA-Z0-9._~%!$&'()*+,;=:@/-]{0,24}(\\?[a-z0-9=&]{0,12})?",
                headers in header_map(),
            ) {
                let mut request = Request::builder()
                    .method(method)
                    .uri(format!("https://example.com{path}"))
                    .body(())
                    .unwrap();
                *request.headers_mut() = headers.clone();
                let fields = request_fields(&request).unwrap();
                let head = request_from_fields(&fields).unwrap();
                prop_assert_eq!(head.request.method(), request.method());
                prop_assert_eq!(head.request.uri(), request.uri());
                let got = head.request.headers();
                prop_assert_eq!(got.get(HOST).unwrap(), "example.com");
                for name in headers.keys().filter(|&n| n != COOKIE) {
                    let sent: Vec<_> = headers.get_all(name).iter().collect();
                    let read: Vec<_> = got.get_all(name).iter().collect();
                    prop_assert_eq!(sent, read, "{}", name);
                }
                let crumbs: Vec<&str> = headers.get_all(COOKIE).iter().map(|v| v.to_str().unwrap()).collect();
                if !crumbs.is_empty() {
                    prop_assert_eq!(got.get(COOKIE).unwrap().to_str().unwrap(), crumbs.join("; "));
                }
            }

            /// A response head survives the trip too, with the content-length it was given
            /// (unless its status forbids one).
            #[test]
            fn a_response_survives_the_trip_through_fields(
                status in prop_oneof![Just(204u16), 200u16..600],
                headers in header_map(),
                length in prop::option::of(any::<u64>()),
            ) {
                let status = StatusCode::from_u16(status).unwrap();
                let mut headers = headers;
                headers.remove(COOKIE);
                let response = response_from_fields(&response_fields(status, &headers, length, false)).unwrap();
                prop_assert_eq!(response.status(), status);
                let mut expected = headers.clone();
                if let Some(length) = length.filter(|_| !forbids_content_length(false, status)) {
                    expected.insert(CONTENT_LENGTH, HeaderValue::from(length));
                }
                prop_assert_eq!(response.headers(), &expected);
            }
        }
    }
}
