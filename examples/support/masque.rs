//! A CONNECT-UDP proxy (RFC 9298) as a tower service: the `masque` example serves it, and
//! `tests/masque.rs` tunnels UDP through it.
//!
//! A client asks for `/.well-known/masque/udp/{target_host}/{target_port}/` with an
//! extended CONNECT (`:protocol = connect-udp`, `capsule-protocol: ?1`). The proxy checks
//! the target against its allow-list, opens a UDP socket connected to it, and answers 200
//! with `capsule-protocol: ?1`. Then every HTTP datagram with context ID 0 (RFC 9298 §4)
//! goes to the target as one UDP payload, and every UDP payload from the target comes back
//! as one, in a QUIC DATAGRAM frame when the client takes them, in a DATAGRAM capsule on
//! the response body otherwise. DATAGRAM capsules on the request body are forwarded too;
//! other capsule types are skipped, a malformed capsule stream resets the stream with
//! H3_MESSAGE_ERROR, and other context IDs are dropped.
//!
//! Bounded everywhere: at most `max_tunnels` tunnels at once (503 beyond), one UDP socket
//! each, closed after `idle_timeout` without a datagram either way; the response body's
//! capsule queue holds at most `CAPSULE_QUEUE` datagrams and `CAPSULE_QUEUE_BYTES` bytes
//! (more are dropped), and the
//! connection's datagram queues are the library's.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tower_quiche::RecvBody;
use tower_quiche::capsule::{CAPSULE_PROTOCOL, Capsule, CapsuleError, CapsuleReader, capsule_protocol_value};
use tower_quiche::datagram::{DatagramSender, Datagrams};
use tower_quiche::server::Protocol;

/// Where CONNECT-UDP requests go (RFC 9298 §3's default template).
pub const TEMPLATE_PREFIX: &str = "/.well-known/masque/udp/";

/// How many datagrams may wait in a response body's capsule queue (when the client takes
/// no QUIC datagrams): beyond it the target's datagrams are dropped, as UDP would.
pub const CAPSULE_QUEUE: usize = 64;

/// How many bytes of capsules may wait there: UDP payloads reach 64 KiB, and 64 of them
/// would keep 4 MiB per tunnel of a client that does not read.
pub const CAPSULE_QUEUE_BYTES: usize = 256 * 1024;

/// The largest UDP payload.
const MAX_UDP_PAYLOAD: usize = 65_527;

/// An address range targets may be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Net {
    type Err = String;

    /// `ADDR` or `ADDR/PREFIX` (`10.0.0.0/8`, `::1`, `0.0.0.0/0` for every IPv4 address).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|e| format!("'{s}': {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or(format!("'{s}': a bad prefix length"))?,
            None => max,
        };
        Ok(Net { addr, prefix })
    }
}

/// Whether `ip` is one of this host's own addresses: a UDP socket can bind to it.
fn own_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Targets must resolve into one of these. Defaults to loopback only.
    pub allowed: Vec<Net>,
    /// How many tunnels may be open at once.
    pub max_tunnels: usize,
    /// A tunnel with no datagram either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Settings {
    /// Whether the proxy sends to `ip`: it is in the allow-list, and it is one remote
    /// peer's. Never the unspecified address (0.0.0.0 and :: mean this host), a multicast
    /// or the broadcast address, whatever the list says; nor, outside loopback, one of this
    /// host's own addresses (`own`, asked last: it binds a socket): a proxy opened to
    /// 203.0.113.0/24 that sits at 203.0.113.5 would otherwise reach its own host's UDP
    /// services there, and itself. Loopback is reached only when the list names it, as the
    /// default does.
    fn permits(&self, ip: IpAddr, own: impl FnOnce(IpAddr) -> bool) -> bool {
        let ip = ip.to_canonical();
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast {
            return false;
        }
        self.allowed.iter().any(|net| net.contains(ip)) && (ip.is_loopback() || !own(ip))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            allowed: vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
            max_tunnels: 1024,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// The response body: capsules the tunnel sends on the stream, open while the tunnel is.
/// A [`CapsuleError`] ends it and resets the stream with the error's code.
pub struct TunnelBody {
    capsules: mpsc::Receiver<Result<Bytes, CapsuleError>>,
    /// Bytes of capsules in `capsules`, against [`CAPSULE_QUEUE_BYTES`].
    queued: Arc<AtomicUsize>,
}

impl TunnelBody {
    fn empty() -> Self {
        TunnelBody {
            capsules: mpsc::channel(1).1,
            queued: Arc::default(),
        }
    }
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = CapsuleError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, CapsuleError>>> {
        let next = std::task::ready!(self.capsules.poll_recv(cx));
        if let Some(Ok(capsule)) = &next {
            self.queued.fetch_sub(capsule.len(), Ordering::AcqRel);
        }
        Poll::Ready(next.map(|item| item.map(Frame::data)))
    }
}

/// The CONNECT-UDP proxy service.
pub fn service(
    settings: Settings,
) -> impl tower::Service<
    Request<RecvBody>,
    Response = Response<TunnelBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<TunnelBody>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    let settings = Arc::new(settings);
    let tunnels = Arc::new(Semaphore::new(settings.max_tunnels));
    tower::service_fn(move |request| {
        let (settings, tunnels) = (Arc::clone(&settings), Arc::clone(&tunnels));
        async move { Ok(handle(&settings, tunnels, request).await) }
    })
}

fn status(code: StatusCode) -> Response<TunnelBody> {
    let mut response = Response::new(TunnelBody::empty());
    *response.status_mut() = code;
    response
}

async fn handle(settings: &Settings, tunnels: Arc<Semaphore>, mut request: Request<RecvBody>) -> Response<TunnelBody> {
    let Some((host, port)) = parse_target(request.uri().path()) else {
        return status(StatusCode::NOT_FOUND);
    };
    let connect_udp = request.method() == Method::CONNECT
        && request
            .extensions()
            .get::<Protocol>()
            .is_some_and(|p| p.as_bytes() == b"connect-udp")
        && tower_quiche::capsule::is_capsule_protocol(request.headers());
    if !connect_udp {
        // RFC 9298 §3.4: an extended CONNECT for connect-udp, with the capsule protocol.
        return status(StatusCode::BAD_REQUEST);
    }
    let Some(port) = port.parse::<u16>().ok().filter(|&p| p != 0) else {
        return status(StatusCode::BAD_REQUEST);
    };
    // The tunnel's slot first: a client past the limit costs no name lookup (a blocking
    // resolver call, a query to the DNS), nor learns which names resolve.
    let Ok(permit) = tunnels.try_acquire_owned() else {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    };
    let Ok(addrs) = tokio::net::lookup_host((host.as_str(), port)).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let addrs: Vec<SocketAddr> = addrs.collect();
    let Some(target) = addrs.iter().copied().find(|a| settings.permits(a.ip(), own_address)) else {
        tracing::info!(%host, port, "target not allowed: 403");
        return status(StatusCode::FORBIDDEN);
    };
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = match UdpSocket::bind(bind).await {
        Ok(socket) if socket.connect(target).await.is_ok() => socket,
        _ => return status(StatusCode::BAD_GATEWAY),
    };
    let datagrams = Datagrams::from_request(&mut request);
    let (capsules_tx, capsules_rx) = mpsc::channel(CAPSULE_QUEUE);
    let queued = Arc::new(AtomicUsize::new(0));
    let tunnel = Tunnel {
        socket,
        datagrams,
        capsules: CapsuleReader::new(request.into_body()),
        capsules_tx,
        queued: Arc::clone(&queued),
        idle_timeout: settings.idle_timeout,
        _permit: permit,
    };
    tokio::spawn(tunnel.run());
    let mut response = Response::new(TunnelBody {
        capsules: capsules_rx,
        queued,
    });
    response
        .headers_mut()
        .insert(CAPSULE_PROTOCOL, capsule_protocol_value());
    response
}

/// `{target_host}` and `{target_port}` from the default template, percent-decoded (an IPv6
/// address comes as `2001%3Adb8%3A%3A1`).
pub fn parse_target(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix(TEMPLATE_PREFIX)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.split_once('/')?;
    if host.is_empty() || port.is_empty() || port.contains('/') {
        return None;
    }
    Some((percent_decode(host)?, percent_decode(port)?))
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    let host = String::from_utf8(out).ok()?;
    // IPv6 literals may come bracketed; lookup_host wants them bare.
    Some(host.trim_start_matches('[').trim_end_matches(']').to_string())
}

/// The context ID at the front of a CONNECT-UDP datagram (a QUIC varint) and the rest.
pub fn split_context_id(payload: &[u8]) -> Option<(u64, &[u8])> {
    let first = *payload.first()?;
    let len = 1usize << (first >> 6);
    let id = payload
        .get(1..len)?
        .iter()
        .fold(u64::from(first & 0x3f), |v, &b| (v << 8) | u64::from(b));
    Some((id, &payload[len..]))
}

/// One open tunnel: its UDP socket and both ways to the client.
struct Tunnel {
    socket: UdpSocket,
    datagrams: Option<Datagrams>,
    capsules: CapsuleReader<RecvBody>,
    capsules_tx: mpsc::Sender<Result<Bytes, CapsuleError>>,
    /// Bytes waiting in `capsules_tx`'s queue.
    queued: Arc<AtomicUsize>,
    idle_timeout: Duration,
    _permit: OwnedSemaphorePermit,
}

impl Tunnel {
    async fn run(self) {
        let Tunnel {
            socket,
            datagrams,
            mut capsules,
            capsules_tx,
            queued,
            idle_timeout,
            _permit,
        } = self;
        let (sender, mut receiver) = match datagrams.map(Datagrams::split) {
            Some((sender, receiver)) => (Some(sender), Some(receiver)),
            None => (None, None),
        };
        let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                Some(payload) = async {
                    match receiver.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    forward(&socket, &payload).await;
                }
                capsule = capsules.next() => match capsule {
                    Some(Ok(Capsule::Datagram(payload))) => forward(&socket, &payload).await,
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "capsule stream failed; closing the tunnel");
                        // The response body resets the stream with the error's code once its
                        // queue reaches it. A client that does not read its response holds
                        // the tunnel's slot no longer than an idle tunnel would.
                        let _ = tokio::time::timeout(idle_timeout, capsules_tx.send(Err(error))).await;
                        return;
                    }
                    // The client closed its side: the tunnel ends (RFC 9298 §3).
                    None => return,
                },
                received = socket.recv(&mut buf[1..]) => match received {
                    Ok(n) => {
                        // Context ID 0, then the UDP payload.
                        buf[0] = 0;
                        back_to_client(sender.as_ref(), &capsules_tx, &queued, &buf[..=n]);
                    }
                    // An ICMP error (port unreachable, say) on the connected socket: UDP
                    // goes on.
                    Err(_) => continue,
                },
                () = &mut idle => {
                    tracing::debug!("tunnel idle; closing");
                    return;
                }
            }
            idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
        }
    }
}

/// Sends one datagram from the client to the target, if it carries context ID 0.
async fn forward(socket: &UdpSocket, payload: &[u8]) {
    // Another context (RFC 9298 §4: unknown ones are dropped), or no context ID at all,
    // goes nowhere.
    if let Some((0, udp)) = split_context_id(payload) {
        // UDP: a send that fails is a datagram lost.
        let _ = socket.send(udp).await;
    }
}

/// Sends one datagram (context ID and UDP payload) to the client: in a QUIC DATAGRAM frame
/// when it takes them, else (or when too large for one) in a DATAGRAM capsule. Both queues
/// are bounded (the capsules' in datagrams and in bytes, `queued`); a full one drops the
/// datagram.
fn back_to_client(
    sender: Option<&DatagramSender>,
    capsules: &mpsc::Sender<Result<Bytes, CapsuleError>>,
    queued: &AtomicUsize,
    payload: &[u8],
) {
    if let Some(sender) = sender {
        match sender.send(Bytes::copy_from_slice(payload)) {
            Ok(()) => return,
            Err(tower_quiche::datagram::SendDatagramError::TooLarge { .. })
            | Err(tower_quiche::datagram::SendDatagramError::NotSupported) => {}
            Err(_) => return,
        }
    }
    let mut capsule = BytesMut::with_capacity(payload.len() + 9);
    Capsule::Datagram(Bytes::copy_from_slice(payload)).encode(&mut capsule);
    let len = capsule.len();
    let within = queued
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
            (q + len <= CAPSULE_QUEUE_BYTES).then_some(q + len)
        })
        .is_ok();
    if within && capsules.try_send(Ok(capsule.freeze())).is_err() {
        queued.fetch_sub(len, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that reads nothing keeps at most `CAPSULE_QUEUE_BYTES` of the target's
    /// datagrams queued, however large they are; what it reads makes room again.
    #[tokio::test]
    async fn the_capsule_queue_is_bounded_in_bytes() {
        let (tx, rx) = mpsc::channel(CAPSULE_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        for _ in 0..CAPSULE_QUEUE {
            back_to_client(None, &tx, &queued, &[0; MAX_UDP_PAYLOAD]);
        }
        let held = queued.load(Ordering::Acquire);
        assert!(held <= CAPSULE_QUEUE_BYTES, "{held} bytes queued");
        let each = held / rx.len();
        assert!(each > MAX_UDP_PAYLOAD, "{each}");
        assert_eq!(rx.len(), CAPSULE_QUEUE_BYTES / each, "whole datagrams, as many as fit");
        let mut body = TunnelBody {
            capsules: rx,
            queued: Arc::clone(&queued),
        };
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(frame.is_some_and(|f| f.is_ok()));
        assert_eq!(queued.load(Ordering::Acquire), held - each, "room made by the read");
        back_to_client(None, &tx, &queued, &[0; MAX_UDP_PAYLOAD]);
        assert_eq!(queued.load(Ordering::Acquire), held, "and taken again");
    }

    #[test]
    fn targets_come_from_the_template() {
        let t = |p: &str| parse_target(p);
        assert_eq!(
            t("/.well-known/masque/udp/127.0.0.1/53/"),
            Some(("127.0.0.1".into(), "53".into()))
        );
        assert_eq!(
            t("/.well-known/masque/udp/2001%3Adb8%3A%3A1/443/"),
            Some(("2001:db8::1".into(), "443".into()))
        );
        assert_eq!(t("/.well-known/masque/udp/host/"), None);
        assert_eq!(t("/.well-known/masque/udp//53/"), None);
        assert_eq!(t("/other/127.0.0.1/53/"), None);
        assert_eq!(t("/.well-known/masque/udp/a/1/extra/"), None);
        assert_eq!(t("/.well-known/masque/udp/bad%zz/1/"), None);
    }

    #[test]
    fn the_allow_list_matches_nets() {
        let loopback: Net = "127.0.0.0/8".parse().unwrap();
        assert!(loopback.contains("127.1.2.3".parse().unwrap()));
        assert!(loopback.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!loopback.contains("10.0.0.1".parse().unwrap()));
        let all: Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Net>().is_err());
    }

    /// Found by review: the allow-list alone let a proxy whose own address is inside a
    /// named range reach its host's services there, and named no exception for addresses
    /// that are no single peer's.
    #[test]
    fn targets_are_single_remote_peers_inside_the_allow_list() {
        let settings = Settings {
            allowed: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            ..Settings::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(settings.permits(ip("192.0.2.1"), |_| false));
        assert!(settings.permits(ip("2001:db8::1"), |_| false));
        for never in [
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:0.0.0.0",
        ] {
            assert!(!settings.permits(ip(never), |_| false), "{never}");
        }
        assert!(
            !settings.permits(ip("203.0.113.5"), |_| true),
            "the proxy's own address"
        );
        assert!(
            !settings.permits(ip("::ffff:203.0.113.5"), |_| true),
            "the same, mapped"
        );
        assert!(
            settings.permits(ip("127.0.0.1"), |_| true),
            "loopback, when the list names it"
        );
        let narrow = Settings {
            allowed: vec!["192.0.2.0/24".parse().unwrap()],
            ..Settings::default()
        };
        assert!(!narrow.permits(ip("127.0.0.1"), |_| true), "loopback, when it does not");
        assert!(own_address(ip("127.0.0.1")));
        assert!(
            !own_address(ip("192.0.2.1")),
            "a documentation address is no one's here"
        );
    }

    #[test]
    fn context_ids_are_varints() {
        assert_eq!(split_context_id(&[0, 1, 2]), Some((0, &[1u8, 2][..])));
        assert_eq!(split_context_id(&[0x40, 0, 9]), Some((0, &[9u8][..])));
        assert_eq!(split_context_id(&[2, 9]), Some((2, &[9u8][..])));
        assert_eq!(split_context_id(&[]), None);
        assert_eq!(split_context_id(&[0x80, 0]), None);
    }
}
