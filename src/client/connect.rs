//! Connecting by name: resolution and Happy Eyeballs (RFC 8305) over the transport's
//! connect-to-an-address.
//!
//! The QUIC layer connects to one [`SocketAddr`] with a server name; which addresses a name
//! has, and in what order and at what pace to try them, is decided here, on the client side
//! of the crate. [`Endpoint::connect`] is defined in this module for that reason.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use crate::error::Error;
use crate::quic::{Application, ConnectionHandle, Endpoint, StreamConnection};

/// RFC 8305 §5's recommended "Connection Attempt Delay".
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

impl Endpoint {
    /// Connects to `authority` (`host:port`, `1.2.3.4:443` or `[::1]:443`) and drives the
    /// connection with `app` once the handshake completes (or, for an application that
    /// [accepts early data](Application::accepts_early_data), once a resumed session lets
    /// it send 0-RTT data).
    ///
    /// The name is resolved with the system resolver. When it has several addresses, they
    /// are tried Happy-Eyeballs style (RFC 8305): IPv6 and IPv4 alternate, a new attempt
    /// starts every 250 ms (or at once when one fails), and the first handshake to complete
    /// wins. With a stored session, the address whose connection received it is tried
    /// first, and only a resumed connection there wins as soon as it can send 0-RTT data;
    /// elsewhere its handshake must complete. The host name is sent as SNI and the server's certificate must be valid for it
    /// (unless verification is turned off). A TLS failure is final: it would fail the same
    /// way elsewhere.
    ///
    /// To connect to one address, use [`connect_addr`](Self::connect_addr).
    pub async fn connect<A: Application>(&self, authority: &str, app: A) -> Result<ConnectionHandle, Error> {
        let (host, port) = split_authority(authority)?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(authority)
            .await
            .map_err(|e| Error::io(format!("cannot resolve '{authority}'"), e))?
            .collect();
        let mut last_error = Error::io(
            format!("'{authority}' resolved to no address"),
            std::io::ErrorKind::NotFound.into(),
        );
        let stored = self.resumes_at(host, port);
        let mut addrs = resumption_first(interleave_families(addrs), stored).into_iter();
        let mut attempts = FuturesUnordered::new();
        // An application that sends 0-RTT data takes a resumed connection as soon as it
        // can send, at the address that issued the session (tried first): there it wins
        // unless it fails at once. A resumption elsewhere (the DNS answer changed) is not
        // known to answer: it wins once its handshake completes, as a fresh one does.
        let early = app.accepts_early_data();
        let attempt = |addr: SocketAddr| {
            let started = self.start_connection::<A>(addr, Some(host));
            async move { started?.usable(early && Some(addr) == stored).await }
        };
        let next_start = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(next_start);
        let mut more = true;
        loop {
            tokio::select! {
                () = &mut next_start, if more => match addrs.next() {
                    Some(addr) => {
                        attempts.push(attempt(addr));
                        next_start.as_mut().reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
                    }
                    None => more = false,
                },
                Some(result) = attempts.next() => match result {
                    // The losers are dropped unstarted: their tasks close them.
                    Ok(connecting) => return Ok(connecting.start(app)),
                    Err(e) if e.is_tls() => return Err(e),
                    Err(e) => {
                        last_error = e;
                        // Start the next address now instead of waiting out the delay.
                        next_start.as_mut().reset(tokio::time::Instant::now());
                    }
                },
                else => return Err(last_error),
            }
        }
    }

    /// Connects to `authority` as [`connect`](Self::connect) does, with the async stream
    /// API: the connection's streams are opened and accepted through the returned
    /// [`StreamConnection`].
    ///
    /// ```no_run
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// use tower_quiche::quic::{ClientConfig, Endpoint};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = ClientConfig::builder().alpn(["echo"]).build()?;
    /// let endpoint = Endpoint::client(config)?;
    /// let conn = endpoint.connect_streams("localhost:4433").await?;
    /// let (mut send, mut recv) = conn.open_bi().await?;
    /// send.write_all(b"hello").await?;
    /// send.shutdown().await?;
    /// let mut echo = Vec::new();
    /// recv.read_to_end(&mut echo).await?;
    /// conn.close(0, "done");
    /// # Ok(()) }
    /// ```
    pub async fn connect_streams(&self, authority: &str) -> Result<StreamConnection, Error> {
        let (app, parts) = crate::quic::new_streams(self.config(), false);
        Ok(parts.with_handle(self.connect(authority, app).await?))
    }
}

/// Orders addresses IPv6, IPv4, IPv6, … keeping the resolver's order within each family
/// (RFC 8305 §4), so a broken family costs one attempt, not all of them.
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let (v6, v4): (Vec<_>, Vec<_>) = addrs.into_iter().partition(SocketAddr::is_ipv6);
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    let (mut a, mut b) = (v6.into_iter(), v4.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

/// Moves `previous`, the address a stored session came from, to the front of `addrs` when
/// it is there: a resumed connection to it wins the race as soon as it can send 0-RTT data,
/// and it is where the server answered last time (not, say, an IPv6 address that never
/// answers).
fn resumption_first(mut addrs: Vec<SocketAddr>, previous: Option<SocketAddr>) -> Vec<SocketAddr> {
    if let Some(at) = previous.and_then(|previous| addrs.iter().position(|&a| a == previous)) {
        let previous = addrs.remove(at);
        addrs.insert(0, previous);
    }
    addrs
}

/// Splits `host:port` (or `[v6]:port`) into the host, without brackets, and the port.
fn split_authority(authority: &str) -> Result<(&str, u16), Error> {
    let bad = || {
        Error::invalid_request(format!(
            "'{authority}' is not host:port (use [addr]:port for IPv6 addresses)"
        ))
    };
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_a_session_came_from_is_tried_first() {
        let addrs: Vec<SocketAddr> = ["[2001:db8::1]:443", "192.0.2.1:443", "[2001:db8::2]:443"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let previous = Some(addrs[1]);
        assert_eq!(
            resumption_first(addrs.clone(), previous),
            [addrs[1], addrs[0], addrs[2]]
        );
        assert_eq!(resumption_first(addrs.clone(), None), addrs);
        let elsewhere = Some("198.51.100.1:443".parse().unwrap());
        assert_eq!(resumption_first(addrs.clone(), elsewhere), addrs, "not among them");
    }

    #[test]
    fn families_alternate_in_the_resolvers_order_starting_with_ipv6() {
        let addrs = ["1.0.0.1:1", "1.0.0.2:1", "[::1]:1", "1.0.0.3:1", "[::2]:1"]
            .map(|a| a.parse().unwrap())
            .to_vec();
        let ordered: Vec<String> = interleave_families(addrs).iter().map(ToString::to_string).collect();
        assert_eq!(ordered, ["[::1]:1", "1.0.0.1:1", "[::2]:1", "1.0.0.2:1", "1.0.0.3:1"]);
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("example.com:443").unwrap(), ("example.com", 443));
        assert_eq!(split_authority("[::1]:4433").unwrap(), ("::1", 4433));
        for bad in ["example.com", ":443", "[]:443", "example.com:http", "example.com:70000"] {
            assert!(split_authority(bad).is_err(), "{bad}");
        }
    }
}
