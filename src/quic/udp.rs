//! UDP IO: batched receive (GRO where the OS has it, `recvmmsg` otherwise) and batched send
//! (GSO), through `quinn-udp`, with tokio readiness. No QUIC logic lives here.
//!
//! Offloads are detected at run time by `quinn-udp`; where the kernel lacks them the same
//! calls degrade to one datagram per syscall.
//!
//! The connections that share a socket share its send buffer: when it is full, every one of
//! them that found it so is woken once it has room.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker, ready};

use quinn_udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

/// Socket buffer size we ask the kernel for. Bursts of a fast connection overflow the usual
/// 208 KiB default; the kernel caps this at `net.core.{r,w}mem_max`.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Largest GRO super-datagram the kernel hands us (the IPv4/IPv6 payload limit).
const GRO_SLICE_BYTES: usize = 64 * 1024;

/// With GRO each slice holds up to 64 datagrams; a few slices per syscall suffice.
const GRO_SLICES: usize = 8;

/// Whether sockets bound with `SO_REUSEPORT` share the datagrams to their address (by a
/// hash of the 4-tuple). Elsewhere the option only lets several sockets bind, and one of
/// them gets everything.
const REUSE_PORT_SPREADS: bool = cfg!(any(target_os = "linux", target_os = "android"));

pub(crate) struct Socket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    local: SocketAddr,
    /// The tasks that found the send buffer full, woken together when it has room.
    send_waiters: Arc<SendWaiters>,
    /// `send_waiters` as the one waker tokio keeps for the socket's writability.
    wake_send_waiters: Waker,
    /// Test seam: one send in this many fails with `WouldBlock` (0: none). Tests cannot fill
    /// a real send buffer: the kernel frees a loopback datagram's buffer space as it sends
    /// it, so loopback never reports a full buffer, whatever `SO_SNDBUF` is.
    #[cfg(test)]
    refuse_one_in: std::sync::atomic::AtomicUsize,
    #[cfg(test)]
    sends: std::sync::atomic::AtomicUsize,
    /// Test seam: receive batches this socket has read.
    #[cfg(test)]
    received: std::sync::atomic::AtomicUsize,
}

/// Wakers of the tasks waiting for room in a socket's send buffer: at most one per
/// connection, and touched only when a send finds the buffer full. Keyed by the waker's
/// task (its data and vtable pointers, what `Waker::will_wake` compares), so listing a
/// task that is listed already costs a lookup, not a scan: thousands of connections may
/// find one full buffer at once.
#[derive(Default)]
struct SendWaiters(Mutex<HashMap<(usize, usize), Waker>>);

impl SendWaiters {
    fn list(&self) -> MutexGuard<'_, HashMap<(usize, usize), Waker>> {
        // A list of wakers is valid whatever a panicking holder left in it.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `waker` unless its task is listed already (a connection woken by a packet may
    /// find the buffer full again before it has room).
    fn add(&self, waker: &Waker) {
        let task = (waker.data() as usize, std::ptr::from_ref(waker.vtable()) as usize);
        self.list().entry(task).or_insert_with(|| waker.clone());
    }
}

impl Wake for SendWaiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Woken outside the lock, so a task that runs at once may list itself again.
        let mut waiting = std::mem::take(&mut *self.list());
        for (_, waker) in waiting.drain() {
            waker.wake();
        }
        // Keep the allocation for the next time the buffer fills.
        let mut list = self.list();
        if list.is_empty() {
            *list = waiting;
        }
    }
}

impl Socket {
    /// Binds `addr`. IPv6 wildcard sockets are dual-stack, so one client socket reaches both
    /// families.
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<Self> {
        Self::bind_with(addr, false, false)
    }

    /// Binds `count` sockets to `addr` with `SO_REUSEPORT`, so the kernel spreads the
    /// datagrams of different clients over them (port 0: one free port, found by the probe
    /// below, for all).
    /// One socket, or a system whose `SO_REUSEPORT` does not spread, binds one plainly. An
    /// IPv6 wildcard is dual-stack unless `v6_only` (when an IPv4 address is bound beside
    /// it, which a dual-stack socket on the same port would clash with).
    ///
    /// A port another socket holds is refused, as a plain bind refuses it: the kernel lets
    /// an `SO_REUSEPORT` socket join others of the same user on their port, so a second
    /// server started by mistake would otherwise take over part of the first one's clients
    /// (whose connections it does not know). A probe bound without `SO_REUSEPORT` asks
    /// first; a server that binds between the probe and the group is not seen. With port 0
    /// another socket may take the probe's port in between: then a few more ports are
    /// tried. With `share` even one socket sets `SO_REUSEPORT`, and a given port is bound
    /// without a probe: the group may join others on it (a hand-over restart). Port 0 is
    /// still probed, so that the whole group has one port, a free one.
    pub(crate) fn bind_group(addr: SocketAddr, count: usize, v6_only: bool, share: bool) -> io::Result<Vec<Self>> {
        if !REUSE_PORT_SPREADS || (count <= 1 && !share) {
            return Ok(vec![Self::bind_with(addr, false, v6_only)?]);
        }
        if share && addr.port() != 0 {
            return (0..count).map(|_| Self::bind_with(addr, true, v6_only)).collect();
        }
        let attempts = if addr.port() == 0 { 4 } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let probed = {
                let probe = Self::bound(addr, false, v6_only)?;
                let bound = probe.local_addr()?.as_socket();
                bound.ok_or_else(|| io::Error::other("the probe socket has no IP address"))?
            };
            match (0..count).map(|_| Self::bind_with(probed, true, v6_only)).collect() {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempt < attempts => continue,
                group => return group,
            }
        }
    }

    fn bind_with(addr: SocketAddr, reuse_port: bool, v6_only: bool) -> io::Result<Self> {
        Self::from_std(Self::bound(addr, reuse_port, v6_only)?.into())
    }

    fn bound(addr: SocketAddr, reuse_port: bool, v6_only: bool) -> io::Result<socket2::Socket> {
        let domain = socket2::Domain::for_address(addr);
        let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            if v6_only {
                sock.set_only_v6(true)?;
            } else {
                // Best effort: some systems forbid dual-stack sockets.
                let _ = sock.set_only_v6(false);
            }
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if reuse_port {
            sock.set_reuse_port(true)?;
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let _ = reuse_port;
        sock.bind(&addr.into())?;
        Ok(sock)
    }

    pub(crate) fn from_std(sock: std::net::UdpSocket) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        // Best effort: the kernel may cap or refuse larger buffers; smaller ones only cost
        // drops under bursts, which QUIC recovers from.
        let _ = state.set_recv_buffer_size((&sock).into(), SOCKET_BUFFER_BYTES);
        let _ = state.set_send_buffer_size((&sock).into(), SOCKET_BUFFER_BYTES);
        let local = sock.local_addr()?;
        let io = tokio::net::UdpSocket::from_std(sock)?;
        let send_waiters = Arc::<SendWaiters>::default();
        Ok(Socket {
            io,
            state,
            local,
            wake_send_waiters: Waker::from(Arc::clone(&send_waiters)),
            send_waiters,
            #[cfg(test)]
            refuse_one_in: Default::default(),
            #[cfg(test)]
            sends: Default::default(),
            #[cfg(test)]
            received: Default::default(),
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// How many equal-size segments one send may carry (1 without GSO).
    pub(crate) fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// The local address a datagram that arrived at `dst` was sent to: `dst` on a socket
    /// bound to a wildcard address (which has as many as its host), the socket's own
    /// otherwise.
    pub(crate) fn local_for(&self, dst: Option<IpAddr>) -> SocketAddr {
        match dst {
            Some(ip) if self.local.ip().is_unspecified() && is_unicast(ip) => SocketAddr::new(ip, self.local.port()),
            _ => self.local,
        }
    }

    /// The source address to ask for when sending from `local` (see [`local_for`]): on a
    /// wildcard socket, the address the peer sent to, or the kernel would pick one by its
    /// routes (on a host with several addresses, maybe another, which a client on a
    /// connected socket, or behind a NAT, discards); `None` otherwise.
    ///
    /// [`local_for`]: Self::local_for
    pub(crate) fn source_for(&self, local: SocketAddr) -> Option<IpAddr> {
        (self.local.ip().is_unspecified() && is_unicast(local.ip())).then(|| local.ip())
    }

    /// Maps an address to the form this socket sends to (IPv4 peers of a dual-stack IPv6
    /// socket are addressed as `::ffff:a.b.c.d`).
    pub(crate) fn peer_address_for(&self, peer: SocketAddr) -> SocketAddr {
        match (self.local, peer) {
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            _ => peer,
        }
    }

    /// The form users expect to see: IPv4 peers of a dual-stack socket as plain IPv4.
    pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => addr,
            },
            v4 => v4,
        }
    }

    /// Sends one datagram, or a GSO batch of `segment_size`-byte datagrams (the last may be
    /// shorter), from local address `from` when given (else the one the kernel picks).
    /// `WouldBlock` means the socket buffer is full; other errors are logged by quinn-udp
    /// and dropped, as UDP loss.
    pub(crate) fn try_send(
        &self,
        to: SocketAddr,
        from: Option<IpAddr>,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: from,
        };
        // Send first and ask tokio only when the kernel says the buffer is full: a UDP
        // socket is almost always writable, and tokio does not know that until its reactor
        // has seen the socket once.
        match self.send(&transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Clear tokio's write readiness, so `wake_when_writable` waits for the buffer.
                let _ = self
                    .io
                    .try_io(Interest::WRITABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                Err(e)
            }
            other => other,
        }
    }

    fn send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::Relaxed;
            let one_in = self.refuse_one_in.load(Relaxed);
            if one_in > 0 && self.sends.fetch_add(1, Relaxed).is_multiple_of(one_in) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        self.state.send((&self.io).into(), transmit)
    }

    /// Test seam: from now on one send in `one_in` fails with `WouldBlock`, as if the send
    /// buffer were full (1: every send, 0: none).
    #[cfg(test)]
    pub(crate) fn refuse_sends(&self, one_in: usize) {
        self.refuse_one_in.store(one_in, std::sync::atomic::Ordering::Relaxed);
    }

    /// Test seam: how many receive batches this socket has read.
    #[cfg(test)]
    pub(crate) fn received(&self) -> usize {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// After `try_send` returned `WouldBlock`: wakes `waker` once the socket can take more
    /// (at once if it already can).
    ///
    /// Every connection of the socket may be waiting at once, but tokio's `poll_send_ready`
    /// keeps the waker of its latest caller only, so the others would sleep until a packet
    /// or a timer woke them. The callers' wakers wait in `send_waiters` instead, and tokio
    /// is handed the one waker that wakes them all.
    pub(crate) fn wake_when_writable(&self, waker: &Waker) {
        // Listed before asking tokio: readiness that arrives in between wakes this waker too.
        self.send_waiters.add(waker);
        let mut cx = Context::from_waker(&self.wake_send_waiters);
        if self.io.poll_send_ready(&mut cx).is_ready() {
            self.wake_send_waiters.wake_by_ref();
        }
    }

    /// Receives a batch into `bufs`; returns how many slices were filled.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut RecvBuffers) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            let mut chunks = bufs.storage.chunks_mut(bufs.slice_len);
            let mut iovs: [IoSliceMut<'_>; BATCH_SIZE] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            let slices = bufs.slices;
            let result = self.io.try_io(Interest::READABLE, || {
                self.state
                    .recv((&self.io).into(), &mut iovs[..slices], &mut bufs.meta[..slices])
            });
            match result {
                Ok(n) => {
                    #[cfg(test)]
                    self.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    pub(crate) fn recv_buffers(&self, max_datagram: usize) -> RecvBuffers {
        let (slices, slice_len) = if self.state.gro_segments() > 1 {
            (GRO_SLICES.min(BATCH_SIZE), GRO_SLICE_BYTES)
        } else {
            (BATCH_SIZE, max_datagram.min(GRO_SLICE_BYTES))
        };
        RecvBuffers {
            storage: vec![0; slices * slice_len],
            slice_len,
            slices,
            meta: vec![RecvMeta::default(); slices],
        }
    }
}

/// Whether `ip` can be a datagram's source: not unspecified, multicast or broadcast (the
/// kernel refuses those with EINVAL, which quinn-udp takes for a socket without GSO, for
/// good), also when mapped into IPv6.
pub(crate) fn is_unicast(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// Reused receive buffers of one socket: `slices` slices of `slice_len` bytes.
pub(crate) struct RecvBuffers {
    storage: Vec<u8>,
    slice_len: usize,
    slices: usize,
    meta: Vec<RecvMeta>,
}

impl RecvBuffers {
    /// Calls `f(datagram, from, to)` for every datagram of the first `filled` slices,
    /// splitting GRO slices into their segments; `to` is the local address it was sent to,
    /// when the system says (a socket bound to a wildcard address has several).
    pub(crate) fn for_each(&mut self, filled: usize, mut f: impl FnMut(&mut [u8], SocketAddr, Option<IpAddr>)) {
        let slice_len = self.slice_len;
        for (i, meta) in self.meta[..filled].iter().enumerate() {
            let slice = &mut self.storage[i * slice_len..i * slice_len + meta.len.min(slice_len)];
            let stride = if meta.stride == 0 {
                slice.len().max(1)
            } else {
                meta.stride
            };
            for datagram in slice.chunks_mut(stride) {
                f(datagram, meta.addr, meta.dst_ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::WakeCount;

    #[test]
    fn send_waiters_list_each_task_once_and_wake_every_one() {
        let waiters = Arc::<SendWaiters>::default();
        let (a, b) = (Arc::<WakeCount>::default(), Arc::<WakeCount>::default());
        waiters.add(&a.waker());
        waiters.add(&a.waker());
        waiters.add(&b.waker());
        assert_eq!(waiters.list().len(), 2, "one entry per task");
        waiters.wake_by_ref();
        assert_eq!((a.count(), b.count()), (1, 1));
        assert!(waiters.list().is_empty());
        // Listed again after a wake-up, and woken again.
        waiters.add(&b.waker());
        waiters.wake_by_ref();
        assert_eq!((a.count(), b.count()), (1, 2));
    }

    #[tokio::test]
    async fn batched_send_and_receive_round_trip() {
        let a = Socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = Socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let segments = a.max_gso_segments().min(4);
        let payload: Vec<u8> = (0..segments * 100).map(|i| (i / 100) as u8).collect();
        let seg = (segments > 1).then_some(100);
        a.try_send(b.local_addr(), None, &payload, seg).unwrap();
        let mut bufs = b.recv_buffers(1500);
        let mut got = Vec::new();
        while got.len() < segments {
            let n = std::future::poll_fn(|cx| b.poll_recv(cx, &mut bufs)).await.unwrap();
            bufs.for_each(n, |d, from, _| {
                assert_eq!(from, a.local_addr());
                got.push(d.to_vec());
            });
        }
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.len(), 100);
            assert!(d.iter().all(|&x| x == i as u8), "segment {i} intact and in order");
        }
    }

    #[tokio::test]
    async fn a_wildcard_socket_answers_from_unicast_addresses_only() {
        let wildcard = Socket::bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = wildcard.local_addr().port();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let local = wildcard.local_for(Some(ip("127.0.0.2")));
        assert_eq!(local, SocketAddr::new(ip("127.0.0.2"), port));
        assert_eq!(wildcard.source_for(local), Some(ip("127.0.0.2")));
        // A datagram sent to a group or to everyone on the link: no source of its own.
        for group in ["224.0.0.1", "255.255.255.255", "ff02::1", "::ffff:224.0.0.1"] {
            let local = wildcard.local_for(Some(ip(group)));
            assert_eq!(local, wildcard.local_addr(), "{group}");
            assert_eq!(wildcard.source_for(local), None, "{group}");
        }
        assert_eq!(wildcard.local_for(None), wildcard.local_addr());
        // A socket bound to one address sends from it without asking.
        let bound = Socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(bound.local_for(Some(ip("127.0.0.1"))), bound.local_addr());
        assert_eq!(bound.source_for(bound.local_addr()), None);
    }

    #[tokio::test]
    async fn every_connection_waiting_for_room_is_woken() {
        let a = Socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = Socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // Once tokio has seen the socket writable, a send that finds the buffer full clears
        // that readiness, as it would in use.
        std::future::poll_fn(|cx| a.io.poll_send_ready(cx)).await.unwrap();
        a.refuse_sends(1);
        let waiting: Vec<Arc<WakeCount>> = (0..4).map(|_| Arc::default()).collect();
        for w in &waiting {
            let refused = a.try_send(b.local_addr(), None, b"x", None).unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
            a.wake_when_writable(&w.waker());
        }
        assert!(
            waiting.iter().all(|w| w.count() == 0),
            "nobody is woken while the buffer is full"
        );
        // Room again: a datagram that leaves frees its buffer space, and the kernel reports
        // the socket writable to tokio's reactor.
        a.refuse_sends(0);
        a.try_send(b.local_addr(), None, b"y", None).unwrap();
        let woken = async {
            while waiting.iter().all(|w| w.count() == 0) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), woken)
            .await
            .expect("the socket became writable");
        let counts: Vec<usize> = waiting.iter().map(|w| w.count()).collect();
        assert_eq!(counts, [1; 4], "one wake-up for every waiting connection");
    }
}
