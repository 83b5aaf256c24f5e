//! QUIC settings by role: a [`ServerConfig`] for a [`Listener`](super::Listener), a
//! [`ClientConfig`] for an [`Endpoint`](super::Endpoint), each with its identity, trust and
//! role's limits, over one [`TransportConfig`] both share (timeouts, windows, streams,
//! congestion control, logging). Every setting has a documented default and is checked when
//! built; both roles offer the `h3` ALPN unless told otherwise.
//!
//! A built configuration is cheap to clone and shared by endpoints; each endpoint turns it
//! into the `quiche::Config` it owns.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cid::{ConnectionIdGenerator, RandomConnectionIdGenerator, ResetKey};
use super::metrics::{Metrics, NoopMetrics};
use super::tls::{PemSource, TlsMaterial};
use crate::error::Error;

/// The smallest buffer [`TransportConfig::stream_buffers`] accepts, in bytes.
const MIN_STREAM_BUFFER: usize = 1024;

/// Congestion control algorithms quiche offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CongestionControl {
    /// CUBIC (RFC 9438); the default, as in most TCP stacks.
    #[default]
    Cubic,
    /// NewReno (RFC 9002 §7).
    Reno,
    /// BBRv2, as quiche ports it from Google's QUIC (its "gcongestion" loss recovery). That
    /// recovery frees the handshake's packet records once their packet number spaces are
    /// discarded, where CUBIC's and NewReno's (quiche 0.30) keep their capacity: about
    /// 3 KiB less per idle connection (37.6 against 40.8 KiB of server RSS per connection,
    /// 1,000 idle connections to `bench_server`, three runs each). CUBIC stays the default
    /// for how it shares a path with TCP flows, which mostly run CUBIC too.
    Bbr2,
}

/// A built configuration of either role: what endpoints share.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) inner: Arc<ConfigInner>,
}

pub(crate) struct ConfigInner {
    pub(crate) s: Settings,
    pub(crate) server: ServerSettings,
    pub(crate) tls: TlsMaterial,
    pub(crate) alpn: Vec<Vec<u8>>,
    pub(crate) keylog: Option<Arc<Mutex<File>>>,
    #[cfg(feature = "qlog")]
    pub(crate) qlog_dir: Option<PathBuf>,
    pub(crate) metrics: Arc<dyn Metrics>,
    pub(crate) cid_generator: Arc<dyn ConnectionIdGenerator>,
}

/// The transport settings both roles share.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) idle_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) initial_max_data: u64,
    pub(crate) initial_max_stream_data_bidi_local: u64,
    pub(crate) initial_max_stream_data_bidi_remote: u64,
    pub(crate) initial_max_stream_data_uni: u64,
    pub(crate) max_streams_bidi: u64,
    pub(crate) max_streams_uni: u64,
    pub(crate) max_connection_window: u64,
    pub(crate) max_stream_window: u64,
    pub(crate) max_recv_udp_payload: usize,
    pub(crate) max_send_udp_payload: usize,
    pub(crate) congestion_control: CongestionControl,
    pub(crate) pacing: bool,
    pub(crate) grease: bool,
    pub(crate) datagrams: Option<usize>,
    pub(crate) early_data: bool,
    pub(crate) inbound_queue: usize,
    pub(crate) inbound_queue_bytes: usize,
    pub(crate) active_connection_id_limit: u64,
    pub(crate) stream_recv_buffer: usize,
    pub(crate) stream_send_buffer: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            initial_max_data: 16 * 1024 * 1024,
            initial_max_stream_data_bidi_local: 1024 * 1024,
            initial_max_stream_data_bidi_remote: 1024 * 1024,
            initial_max_stream_data_uni: 1024 * 1024,
            max_streams_bidi: 128,
            max_streams_uni: 16,
            max_connection_window: 24 * 1024 * 1024,
            max_stream_window: 16 * 1024 * 1024,
            max_recv_udp_payload: 65527,
            max_send_udp_payload: 1350,
            congestion_control: CongestionControl::Cubic,
            pacing: true,
            grease: true,
            datagrams: None,
            early_data: true,
            inbound_queue: 256,
            inbound_queue_bytes: 512 * 1024,
            active_connection_id_limit: 4,
            stream_recv_buffer: 256 * 1024,
            stream_send_buffer: 256 * 1024,
        }
    }
}

/// When a server validates a new client's address with a Retry (RFC 9000 §8.1.2) before it
/// keeps any state for the connection.
///
/// A Retry proves the client receives at its address, which defeats floods of Initials from
/// spoofed addresses; it costs the client a round trip. Without it the server still sends
/// at most three times what an unvalidated client sent (RFC 9000 §8.1), and the caps on
/// half-open handshakes and connections bound what a flood can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryPolicy {
    /// Every new connection: one more round trip for everyone, always.
    Always,
    /// While at least a quarter of the listener's
    /// [`max_handshakes_in_progress`](ServerConfigBuilder::max_handshakes_in_progress) are in
    /// use (256 of the default 1,024; always with a cap of 1), or fewer connection slots
    /// than that quarter are free: honest clients connect in one round trip (and their
    /// 0-RTT data is taken), and a flood is met with Retries before it fills either cap.
    /// The default.
    UnderLoad,
    /// Never: for a server whose clients are known, or behind something that validates.
    Never,
}

impl From<bool> for RetryPolicy {
    fn from(always: bool) -> Self {
        if always {
            RetryPolicy::Always
        } else {
            RetryPolicy::Never
        }
    }
}

/// A listener's own settings: admission and address validation.
#[derive(Debug, Clone)]
pub(crate) struct ServerSettings {
    pub(crate) retry: RetryPolicy,
    pub(crate) accept_backlog: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_handshakes: usize,
    pub(crate) max_handshakes_per_address: usize,
    pub(crate) max_connections_per_address: usize,
    pub(crate) stateless_replies_per_second: u32,
    pub(crate) stateless_reply_burst: u32,
    /// Sockets bound per address with SO_REUSEPORT; `None`: one per tokio worker thread.
    pub(crate) sockets_per_address: Option<usize>,
    /// May join other sockets' SO_REUSEPORT group on the port (a hand-over restart).
    pub(crate) share_port: bool,
    /// The key stateless reset tokens derive from; `None`: a random one per bound address.
    pub(crate) reset_key: Option<Arc<ResetKey>>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            retry: RetryPolicy::UnderLoad,
            accept_backlog: 1024,
            max_connections: 10_000,
            max_handshakes: 1024,
            max_handshakes_per_address: 64,
            max_connections_per_address: 1_000,
            stateless_replies_per_second: 1000,
            stateless_reply_burst: 1000,
            sockets_per_address: None,
            share_port: false,
            reset_key: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alpn: Vec<_> = self.inner.alpn.iter().map(|p| String::from_utf8_lossy(p)).collect();
        f.debug_struct("Config")
            .field("transport", &self.inner.s)
            .field("alpn", &alpn)
            .finish_non_exhaustive()
    }
}

impl Config {
    pub(crate) fn alpn(&self) -> impl Iterator<Item = &[u8]> {
        self.inner.alpn.iter().map(Vec::as_slice)
    }

    /// Whether a client checks the server's certificate against the name it connects to
    /// (not when verification is off, nor when the server is known by its raw public key).
    pub(crate) fn verifies_server_name(&self) -> bool {
        self.inner.tls.verify_server && self.inner.tls.rpk.trusted.is_empty()
    }

    /// The quiche configuration one endpoint owns.
    pub(crate) fn quiche_config(&self, server: bool) -> Result<quiche::Config, Error> {
        let inner = &*self.inner;
        let s = &inner.s;
        let ctx = inner.tls.context_builder(server)?;
        let quiche_err = |what: &str, e: quiche::Error| Error::config(format!("quiche rejected {what}: {e}"));
        let mut c = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, ctx)
            .map_err(|e| quiche_err("the TLS context", e))?;
        let alpn: Vec<&[u8]> = inner.alpn.iter().map(Vec::as_slice).collect();
        c.set_application_protos(&alpn)
            .map_err(|e| quiche_err("the ALPN list", e))?;
        c.set_max_idle_timeout(s.idle_timeout.as_millis() as u64);
        c.set_initial_max_data(s.initial_max_data);
        c.set_initial_max_stream_data_bidi_local(s.initial_max_stream_data_bidi_local);
        c.set_initial_max_stream_data_bidi_remote(s.initial_max_stream_data_bidi_remote);
        c.set_initial_max_stream_data_uni(s.initial_max_stream_data_uni);
        c.set_initial_max_streams_bidi(s.max_streams_bidi);
        c.set_initial_max_streams_uni(s.max_streams_uni);
        c.set_max_connection_window(s.max_connection_window);
        c.set_max_stream_window(s.max_stream_window);
        // quiche 0.30 encodes a server's transport parameters into 128 bytes (tls/mod.rs),
        // and with a Retry's connection IDs the defaults leave about 4 of them: the 6 of
        // max_datagram_frame_size do not fit, and every connection would be refused
        // (BufferTooShort). Datagrams on, a server saves 5 bytes: max_udp_payload_size in
        // a 2-byte varint (16,383 bytes, above any real path's MTU) and the connection-ID
        // limit at 2, the default, which is not sent.
        let trim_for_datagrams = server && s.datagrams.is_some();
        let (udp_payload, active_cid_limit) = if trim_for_datagrams {
            (s.max_recv_udp_payload.min(MAX_2_BYTE_VARINT), 2)
        } else {
            (s.max_recv_udp_payload, s.active_connection_id_limit)
        };
        c.set_max_recv_udp_payload_size(udp_payload);
        c.set_max_send_udp_payload_size(s.max_send_udp_payload);
        c.set_cc_algorithm(match s.congestion_control {
            CongestionControl::Cubic => quiche::CongestionControlAlgorithm::CUBIC,
            CongestionControl::Reno => quiche::CongestionControlAlgorithm::Reno,
            CongestionControl::Bbr2 => quiche::CongestionControlAlgorithm::Bbr2Gcongestion,
        });
        c.enable_pacing(s.pacing);
        c.grease(s.grease);
        c.set_active_connection_id_limit(active_cid_limit);
        if let Some(queue) = s.datagrams {
            c.enable_dgram(true, queue, queue);
        }
        if server {
            let id_len = inner.cid_generator.id_len();
            let retry = inner.server.retry != RetryPolicy::Never;
            let len = server_transport_params_len(s, udp_payload as u64, active_cid_limit, id_len, retry);
            if len > QUICHE_TRANSPORT_PARAMS_ROOM {
                return Err(Error::config(format!(
                    "a server's transport parameters can reach {len} bytes with these settings \
                     ({id_len}-byte connection IDs{}{}), and quiche has room for {QUICHE_TRANSPORT_PARAMS_ROOM}: \
                     it would refuse clients whose first Initial carries a long connection ID. Use shorter \
                     connection IDs (the default generator's are 8 bytes){}",
                    if retry { ", Retry possible" } else { "" },
                    if s.datagrams.is_some() { ", datagrams on" } else { "" },
                    if retry { ", or RetryPolicy::Never" } else { "" },
                )));
            }
        }
        if s.early_data {
            c.enable_early_data();
        }
        if inner.keylog.is_some() {
            c.log_keys();
        }
        Ok(c)
    }

    pub(crate) fn keylog_writer(&self) -> Option<Box<dyn Write + Send + Sync>> {
        self.inner
            .keylog
            .as_ref()
            .map(|file| Box::new(SharedFile(Arc::clone(file))) as Box<dyn Write + Send + Sync>)
    }
}

/// The largest value a 2-byte QUIC varint holds.
const MAX_2_BYTE_VARINT: usize = 16_383;

/// The bytes quiche 0.30 encodes a connection's transport parameters into (tls/mod.rs): a
/// server whose parameters do not fit fails every handshake (BufferTooShort).
const QUICHE_TRANSPORT_PARAMS_ROOM: usize = 128;

/// The largest a server's transport parameters get as quiche 0.30 encodes them
/// (`TransportParams::encode`): each parameter is its ID and length as varints, then its
/// value. The original destination connection ID is the client's (up to 20 bytes, RFC 9000
/// §17.2); after a Retry the retry source connection ID is one of ours too.
fn server_transport_params_len(
    s: &Settings,
    udp_payload: u64,
    active_cid_limit: u64,
    id_len: usize,
    retry: bool,
) -> usize {
    fn varint(v: u64) -> usize {
        match v {
            0..=63 => 1,
            64..=16_383 => 2,
            16_384..=1_073_741_823 => 4,
            _ => 8,
        }
    }
    // A parameter with an integer value (omitted when 0, as quiche does).
    let int = |v: u64| if v == 0 { 0 } else { 2 + varint(v) };
    let bytes = |len: usize| 1 + varint(len as u64) + len;
    // quiche's defaults for what it does not let us set.
    const ACK_DELAY_EXPONENT: u64 = 3;
    const MAX_ACK_DELAY_MS: u64 = 25;
    const MAX_DGRAM_FRAME_SIZE: u64 = 65_536;
    const STATELESS_RESET_TOKEN: usize = 16;
    const MAX_CLIENT_CID: usize = 20;
    bytes(MAX_CLIENT_CID)
        + int(s.idle_timeout.as_millis() as u64)
        + bytes(STATELESS_RESET_TOKEN)
        + int(udp_payload)
        + int(s.initial_max_data)
        + int(s.initial_max_stream_data_bidi_local)
        + int(s.initial_max_stream_data_bidi_remote)
        + int(s.initial_max_stream_data_uni)
        + int(s.max_streams_bidi)
        + int(s.max_streams_uni)
        + int(ACK_DELAY_EXPONENT)
        + int(MAX_ACK_DELAY_MS)
        + if active_cid_limit == 2 {
            0
        } else {
            int(active_cid_limit)
        }
        + bytes(id_len)
        + if retry { bytes(id_len) } else { 0 }
        + if s.datagrams.is_some() {
            2 + varint(MAX_DGRAM_FRAME_SIZE)
        } else {
            0
        }
}

/// Opens the key-log file for appending, creating it readable and writable by its owner
/// only: it holds the secrets of every session, which decrypt captured traffic.
fn open_keylog(path: &Path) -> Result<File, Error> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map_err(|e| Error::config(format!("cannot open the key-log file '{}': {e}", path.display())))
}

/// Appends to one key-log file from every connection.
struct SharedFile(Arc<Mutex<File>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// What both role builders hold: the transport, the ALPN list, the endpoint's metrics and
/// its own certificate (a server's, or a client's for mutual TLS).
struct SharedParts {
    transport: TransportConfig,
    alpn: Vec<Vec<u8>>,
    metrics: Arc<dyn Metrics>,
    cert_chain: Option<PemSource>,
    private_key: Option<PemSource>,
}

impl Default for SharedParts {
    fn default() -> Self {
        SharedParts {
            transport: TransportConfig::default(),
            alpn: vec![b"h3".to_vec()],
            metrics: Arc::new(NoopMetrics),
            cert_chain: None,
            private_key: None,
        }
    }
}

impl SharedParts {
    /// Checks what both roles share and assembles the configuration.
    fn assemble(self, server: ServerSettings, tls: TlsMaterial) -> Result<Config, Error> {
        let SharedParts {
            transport,
            alpn,
            metrics,
            ..
        } = self;
        if alpn.is_empty() {
            return Err(Error::config(
                "the ALPN list is empty: give at least one application protocol to alpn(), or leave it at \
                 its default, [\"h3\"]",
            ));
        }
        if let Some(p) = alpn.iter().find(|p| p.is_empty() || p.len() > 255) {
            return Err(Error::config(format!(
                "ALPN protocol names must be 1 to 255 bytes long; {:?} is {} bytes",
                String::from_utf8_lossy(p),
                p.len()
            )));
        }
        transport.check()?;
        let keylog = match &transport.keylog {
            Some(path) => Some(Arc::new(Mutex::new(open_keylog(path)?))),
            None => None,
        };
        #[cfg(feature = "qlog")]
        if let Some(dir) = &transport.qlog_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::config(format!("cannot create the qlog directory '{}': {e}", dir.display())))?;
        }
        Ok(Config {
            inner: Arc::new(ConfigInner {
                s: transport.s,
                server,
                tls,
                alpn,
                keylog,
                #[cfg(feature = "qlog")]
                qlog_dir: transport.qlog_dir,
                metrics,
                cid_generator: transport.cid_generator,
            }),
        })
    }
}

/// The setters both role builders have, spelled and documented once: the transport, the
/// ALPN list, the metrics, and the endpoint's own certificate chain and key (`$chain` and
/// `$required` say whose, and whether it is required).
macro_rules! shared_setters {
    ($builder:ident, $chain:literal, $required:literal) => {
        impl $builder {
            /// The transport settings (timeouts, windows, streams, logging). Defaults to
            /// [`TransportConfig::default`].
            pub fn transport(mut self, transport: TransportConfig) -> Self {
                self.shared.transport = transport;
                self
            }

            /// The application protocols (ALPN) offered, in order of preference. Defaults to
            /// `["h3"]`; a protocol of your own over QUIC names its own.
            pub fn alpn<I, P>(mut self, protocols: I) -> Self
            where
                I: IntoIterator<Item = P>,
                P: AsRef<[u8]>,
            {
                self.shared.alpn = protocols.into_iter().map(|p| p.as_ref().to_vec()).collect();
                self
            }

            /// Where the endpoint's events are counted. Defaults to [`NoopMetrics`].
            pub fn metrics(mut self, metrics: impl Metrics) -> Self {
                self.shared.metrics = Arc::new(metrics);
                self
            }

            #[doc = concat!($chain, " from a PEM file. ", $required)]
            pub fn cert_chain_pem_file(mut self, path: impl AsRef<Path>) -> Self {
                self.shared.cert_chain = Some(PemSource::File(path.as_ref().to_path_buf()));
                self
            }

            #[doc = concat!($chain, " as PEM in memory. ", $required)]
            pub fn cert_chain_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
                self.shared.cert_chain = Some(PemSource::Memory(pem.as_ref().to_vec()));
                self
            }

            /// The private key of the certificate, from a PEM file.
            pub fn private_key_pem_file(mut self, path: impl AsRef<Path>) -> Self {
                self.shared.private_key = Some(PemSource::File(path.as_ref().to_path_buf()));
                self
            }

            /// The private key of the certificate, as PEM in memory.
            pub fn private_key_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
                self.shared.private_key = Some(PemSource::Memory(pem.as_ref().to_vec()));
                self
            }
        }
    };
}

// ---- the transport both roles share ----

/// The transport settings a server and a client share: timeouts, flow-control windows,
/// stream limits, datagram sizes, congestion control, and logging. Every setting has a
/// default (given on its method); give one to [`ServerConfigBuilder::transport`] or
/// [`ClientConfigBuilder::transport`] to change any.
///
/// ```
/// use std::time::Duration;
/// use tower_quiche::quic::TransportConfig;
///
/// let transport = TransportConfig::new()
///     .idle_timeout(Duration::from_secs(60))
///     .max_concurrent_bidi_streams(256);
/// # let _ = transport;
/// ```
#[derive(Clone)]
pub struct TransportConfig {
    s: Settings,
    keylog: Option<PathBuf>,
    #[cfg(feature = "qlog")]
    qlog_dir: Option<PathBuf>,
    cid_generator: Arc<dyn ConnectionIdGenerator>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            s: Settings::default(),
            keylog: None,
            #[cfg(feature = "qlog")]
            qlog_dir: None,
            cid_generator: Arc::new(RandomConnectionIdGenerator),
        }
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("settings", &self.s)
            .field("keylog", &self.keylog)
            .finish_non_exhaustive()
    }
}

impl TransportConfig {
    /// Every setting at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a connection may stay silent before it is closed. Defaults to 30 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.s.idle_timeout = crate::at_most_never(timeout);
        self
    }

    /// How long a handshake may take before the connection is abandoned. Defaults to 10 s,
    /// long enough for lossy paths and short enough to free abandoned state.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.s.handshake_timeout = crate::at_most_never(timeout);
        self
    }

    /// Connection-level flow-control window announced to the peer, in bytes. Defaults to
    /// 16 MiB. quiche grows windows automatically up to
    /// [`max_windows`](Self::max_windows).
    pub fn initial_max_data(mut self, bytes: u64) -> Self {
        self.s.initial_max_data = bytes;
        self
    }

    /// Per-stream flow-control window for every stream kind, in bytes. Defaults to 1 MiB.
    /// This bounds how much a peer can send on one stream that nobody reads.
    pub fn initial_max_stream_data(mut self, bytes: u64) -> Self {
        self.s.initial_max_stream_data_bidi_local = bytes;
        self.s.initial_max_stream_data_bidi_remote = bytes;
        self.s.initial_max_stream_data_uni = bytes;
        self
    }

    /// The largest windows quiche's flow-control auto-tuning may reach (connection, stream).
    /// Defaults to 24 MiB and 16 MiB: enough for about 1 GB/s at 15 ms of RTT.
    pub fn max_windows(mut self, connection: u64, stream: u64) -> Self {
        self.s.max_connection_window = connection;
        self.s.max_stream_window = stream;
        self
    }

    /// How many bidirectional streams the peer may have open at once. Defaults to 128.
    pub fn max_concurrent_bidi_streams(mut self, streams: u64) -> Self {
        self.s.max_streams_bidi = streams;
        self
    }

    /// How many unidirectional streams the peer may have open at once. Defaults to 16
    /// (HTTP/3 needs 3: control and two QPACK streams).
    pub fn max_concurrent_uni_streams(mut self, streams: u64) -> Self {
        self.s.max_streams_uni = streams;
        self
    }

    /// The buffers of each stream of the async stream API
    /// ([`StreamConnection`](crate::quic::StreamConnection)), in bytes: what has arrived and
    /// waits for its [`RecvStream`](crate::quic::RecvStream) to read it, and what a
    /// [`SendStream`](crate::quic::SendStream) wrote and the connection has not yet handed
    /// to QUIC. Default to 256 KiB each; each must be at least 1 KiB (`build` refuses less).
    ///
    /// A full receive buffer leaves further bytes with the peer (QUIC flow control holds it
    /// back); a full send buffer makes `poll_write` wait. An [`Application`] manages its own
    /// buffers and ignores these.
    ///
    /// [`Application`]: crate::quic::Application
    pub fn stream_buffers(mut self, recv: usize, send: usize) -> Self {
        self.s.stream_recv_buffer = recv;
        self.s.stream_send_buffer = send;
        self
    }

    /// The largest UDP payload we accept. Defaults to 65527 (anything the peer sends).
    pub fn max_recv_udp_payload(mut self, bytes: usize) -> Self {
        self.s.max_recv_udp_payload = bytes;
        self
    }

    /// The largest UDP payload we send. Defaults to 1350, which fits the common 1500-byte
    /// Ethernet MTU with room for tunnels; 1200 is the minimum QUIC allows.
    ///
    /// Every packet may be this large: quiche's path MTU discovery is not used. It was tried
    /// (probing up to 1452 bytes cut a bulk download's server CPU by about 5 % on
    /// loopback), but in quiche 0.30 a path a connection migrates to gets no discovery and
    /// sends at the configured maximum at once (a black hole on a narrower path after a
    /// NAT rebinding), quiche does not bound its probes by the peer's
    /// `max_udp_payload_size`, and a probe larger than the local interface's MTU fails the
    /// whole GSO batch it leads.
    pub fn max_send_udp_payload(mut self, bytes: usize) -> Self {
        self.s.max_send_udp_payload = bytes;
        self
    }

    /// The congestion controller. Defaults to [`CongestionControl::Cubic`].
    pub fn congestion_control(mut self, algorithm: CongestionControl) -> Self {
        self.s.congestion_control = algorithm;
        self
    }

    /// Whether packets are paced. Defaults to on: bursts on a fast link cause loss.
    pub fn pacing(mut self, enabled: bool) -> Self {
        self.s.pacing = enabled;
        self
    }

    /// Whether HTTP/3 connections send values of the types reserved for GREASE ("generate
    /// random extensions and sustain extensibility"): a reserved setting, two reserved
    /// frames on the first request or response stream, and a unidirectional stream of a
    /// reserved type (RFC 9114 §6.2.3, §7.2.4.1, §7.2.8), on servers and clients alike
    /// (quiche 0.30 sends no reserved transport parameter either way). Peers must ignore
    /// them; sending them keeps peers that do not from passing for correct. Defaults to on.
    ///
    /// Off, an HTTP/3 server holds about 3 KiB less per idle connection (3.2 KiB of heap
    /// by `tests/idle_memory.rs`'s count, 2.4 KiB of RSS with the load harness's 1,000
    /// idle connections): with the reserved stream, eight streams are open at once while
    /// the client's first request is (the six control and QPACK streams beside it), one
    /// more than quiche's table of a connection's streams holds in 8 slots, and the table
    /// grows to 16, never to shrink.
    pub fn grease(mut self, enabled: bool) -> Self {
        self.s.grease = enabled;
        self
    }

    /// Enables unreliable datagrams (RFC 9221), queueing up to `queue_len` each way (past
    /// it quiche drops the oldest received one, and refuses a new one to send). HTTP/3
    /// then carries HTTP datagrams (RFC 9297) on CONNECT streams; see
    /// `server::Builder::http_datagrams` and `client::Builder::http_datagrams`. On a
    /// server, quiche 0.30's 128-byte room for transport parameters makes two settings
    /// give way to the max_datagram_frame_size parameter: `max_recv_udp_payload` is capped
    /// at 16,383 bytes and `active_connection_id_limit` at 2. Defaults to off.
    pub fn datagrams(mut self, queue_len: usize) -> Self {
        self.s.datagrams = Some(queue_len);
        self
    }

    /// Whether 0-RTT ("early") data is sent and accepted on resumed connections (RFC 9001
    /// §4.6). Defaults to on.
    ///
    /// Servers issue session tickets either way; with early data on they accept a resumed
    /// client's first flight. What reads it decides how much of it to trust, since early
    /// data can be replayed by an attacker: the HTTP/3 server serves only requests that are
    /// safe to repeat (GET, HEAD, OPTIONS, or what
    /// [`server::Builder::early_data_policy`](crate::server::Builder::early_data_policy)
    /// allows) before the handshake completes and answers the rest `425 Too Early` (RFC
    /// 8470); an [`Application`](crate::quic::Application) that does not
    /// [accept early data](crate::quic::Application::accepts_early_data), such as the stream
    /// API, sees it only once the handshake has completed, when the client has proven it
    /// holds the session's keys (a replayed first flight never gets there).
    ///
    /// Clients remember each server's latest session and resume it on the next connection;
    /// with early data on, the HTTP/3 client sends safe requests (GET, HEAD, OPTIONS without
    /// a body) in 0-RTT and the rest once the handshake has completed.
    pub fn early_data(mut self, enabled: bool) -> Self {
        self.s.early_data = enabled;
        self
    }

    /// How many received datagrams may queue for one connection. Defaults to 256 (about
    /// 350 KB): enough to absorb one full batched read of a busy socket; when a connection
    /// falls further behind, datagrams are dropped as a congested network would.
    pub fn inbound_queue(mut self, datagrams: usize) -> Self {
        self.s.inbound_queue = datagrams.max(1);
        self
    }

    /// How many bytes of received datagrams may queue for one connection. Defaults to
    /// 512 KiB: one full batched read of the socket (8 GRO slices of 64 KiB) fits, as do the
    /// default 256 datagrams at full Ethernet size, while a peer sending 64 KiB datagrams can
    /// no longer make one queue hold 16 MiB. Datagrams beyond it are dropped like those
    /// beyond [`inbound_queue`](Self::inbound_queue) (counted as
    /// [`DropReason::QueueFull`](crate::quic::DropReason::QueueFull)). Must be at least
    /// [`max_recv_udp_payload`](Self::max_recv_udp_payload), or the largest datagrams could
    /// never be queued.
    pub fn inbound_queue_bytes(mut self, bytes: usize) -> Self {
        self.s.inbound_queue_bytes = bytes;
        self
    }

    /// How many connection IDs we accept from the peer (active_connection_id_limit).
    /// Defaults to 4.
    pub fn active_connection_id_limit(mut self, limit: u64) -> Self {
        self.s.active_connection_id_limit = limit.max(2);
        self
    }

    /// Writes TLS secrets to this file in the NSS key-log format (for Wireshark). A new
    /// file is created readable and writable by its owner only (mode 0600 on Unix); an
    /// existing one keeps its permissions.
    pub fn keylog_file(mut self, path: impl AsRef<Path>) -> Self {
        self.keylog = Some(path.as_ref().to_path_buf());
        self
    }

    /// Writes TLS secrets to the file named by the `SSLKEYLOGFILE` environment variable, when
    /// it is set (created as by [`keylog_file`](Self::keylog_file)).
    pub fn keylog_from_env(mut self) -> Self {
        if let Some(path) = std::env::var_os("SSLKEYLOGFILE") {
            self.keylog = Some(PathBuf::from(path));
        }
        self
    }

    /// Writes a qlog trace per connection into this directory (`qlog` feature).
    #[cfg(feature = "qlog")]
    pub fn qlog_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.qlog_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// How source connection IDs are made. Defaults to [`RandomConnectionIdGenerator`].
    pub fn connection_id_generator(mut self, generator: impl ConnectionIdGenerator) -> Self {
        self.cid_generator = Arc::new(generator);
        self
    }

    fn check(&self) -> Result<(), Error> {
        let s = &self.s;
        if s.max_send_udp_payload < 1200 {
            return Err(Error::config(format!(
                "max_send_udp_payload is {} bytes, below QUIC's minimum of 1200: raise it",
                s.max_send_udp_payload
            )));
        }
        if s.max_recv_udp_payload < 1200 {
            return Err(Error::config(format!(
                "max_recv_udp_payload is {} bytes, below QUIC's minimum of 1200: raise it",
                s.max_recv_udp_payload
            )));
        }
        if s.stream_recv_buffer < MIN_STREAM_BUFFER || s.stream_send_buffer < MIN_STREAM_BUFFER {
            return Err(Error::config(format!(
                "stream_buffers({}, {}) is below the minimum of {MIN_STREAM_BUFFER} bytes per buffer \
                 (a stream would move a few bytes per turn): pass at least {MIN_STREAM_BUFFER} for each",
                s.stream_recv_buffer, s.stream_send_buffer
            )));
        }
        if s.idle_timeout.is_zero() || s.handshake_timeout.is_zero() {
            return Err(Error::config(
                "idle_timeout and handshake_timeout must be greater than zero",
            ));
        }
        if s.inbound_queue_bytes < s.max_recv_udp_payload {
            return Err(Error::config(format!(
                "inbound_queue_bytes is {} bytes, less than one datagram of max_recv_udp_payload ({} bytes): \
                 raise inbound_queue_bytes or lower max_recv_udp_payload",
                s.inbound_queue_bytes, s.max_recv_udp_payload
            )));
        }
        let id_len = self.cid_generator.id_len();
        if !(4..=quiche::MAX_CONN_ID_LEN).contains(&id_len) {
            return Err(Error::config(format!(
                "the connection ID generator makes {id_len}-byte IDs; QUIC allows 4 to 20 here"
            )));
        }
        Ok(())
    }
}

// ---- the server's role ----

/// What a [`Listener`](super::Listener) serves with: its certificate and key, whom it
/// trusts for mutual TLS, its admission limits, and the shared [`TransportConfig`]. Build
/// one with [`ServerConfig::builder`], or in one call with
/// [`ServerConfig::from_pem_files`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub(crate) config: Config,
}

impl ServerConfig {
    /// A builder with every setting at its default, offering the `h3` ALPN; a certificate
    /// chain and key must be given.
    pub fn builder() -> ServerConfigBuilder {
        ServerConfigBuilder {
            shared: SharedParts::default(),
            server: ServerSettings::default(),
            client_ca: None,
            #[cfg(feature = "rpk")]
            rpk_own: None,
        }
    }

    /// An HTTP/3 server's configuration from a certificate chain (leaf first) and its
    /// private key, both PEM files; every other setting at its default.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_quiche::Error> {
    /// use tower_quiche::quic::{Listener, ServerConfig};
    ///
    /// let listener = Listener::bind("[::]:443", ServerConfig::from_pem_files("cert.pem", "key.pem")?).await?;
    /// # let _ = listener; Ok(()) }
    /// ```
    pub fn from_pem_files(cert_chain: impl AsRef<Path>, private_key: impl AsRef<Path>) -> Result<ServerConfig, Error> {
        Self::builder()
            .cert_chain_pem_file(cert_chain)
            .private_key_pem_file(private_key)
            .build()
    }

    /// The application protocols (ALPN) offered, in order of preference.
    pub fn alpn(&self) -> impl Iterator<Item = &[u8]> {
        self.config.alpn()
    }
}

/// Builds a [`ServerConfig`]. Every setting has a default (given on its method) except the
/// certificate chain and key.
pub struct ServerConfigBuilder {
    shared: SharedParts,
    server: ServerSettings,
    client_ca: Option<PemSource>,
    #[cfg(feature = "rpk")]
    rpk_own: Option<PemSource>,
}

impl fmt::Debug for ServerConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfigBuilder")
            .field("transport", &self.shared.transport)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

shared_setters!(
    ServerConfigBuilder,
    "The certificate chain (leaf first)",
    "Required, with its key."
);

impl ServerConfigBuilder {
    /// Requires a client certificate signed by a CA in this PEM file (mutual TLS).
    pub fn client_ca_pem_file(mut self, path: impl AsRef<Path>) -> Self {
        self.client_ca = Some(PemSource::File(path.as_ref().to_path_buf()));
        self
    }

    /// Requires a client certificate signed by a CA in this PEM (mutual TLS).
    pub fn client_ca_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.client_ca = Some(PemSource::Memory(pem.as_ref().to_vec()));
        self
    }

    /// (`rpk` feature) Presents this key's raw public key (RFC 7250) instead of a
    /// certificate. The PEM holds the private key.
    #[cfg(feature = "rpk")]
    pub fn raw_public_key_pem(mut self, private_key_pem: impl AsRef<[u8]>) -> Self {
        self.rpk_own = Some(PemSource::Memory(private_key_pem.as_ref().to_vec()));
        self
    }

    /// When client addresses are validated with a Retry before any state is kept (RFC 9000
    /// §8.1.2): `true` ([`RetryPolicy::Always`]), `false` ([`RetryPolicy::Never`]), or a
    /// [`RetryPolicy`]. Defaults to [`RetryPolicy::UnderLoad`]: a Retry costs every new
    /// connection a round trip (and 0-RTT data for clients that do not send it again), so
    /// it is asked for only while handshakes pile up, as in a flood from spoofed addresses.
    pub fn retry(mut self, policy: impl Into<RetryPolicy>) -> Self {
        self.server.retry = policy.into();
        self
    }

    /// How many UDP sockets [`Listener::bind`](crate::quic::Listener::bind) and
    /// [`bind_all`](crate::quic::Listener::bind_all) bind to each address, with
    /// `SO_REUSEPORT`, each read by a receive loop of its own so that receiving spreads
    /// over the runtime's threads. Defaults to one per tokio worker thread of the runtime
    /// that binds. The kernel gives each socket the datagrams of some clients (by a hash of
    /// the addresses); the sockets share one route table, so a connection whose packets
    /// move to another socket (a NAT rebinding changes the hash) is still found, and they
    /// share the listener's caps, its Retry and stateless-reset keys and its TLS session
    /// tickets. Each socket has receive buffers of its own (512 KiB where the kernel offers
    /// GRO), so a runtime of many threads that serves little traffic may want fewer. Linux
    /// and Android only: elsewhere `SO_REUSEPORT` does not spread datagrams, and one socket
    /// is bound. `0` counts as 1. A port another socket already holds is refused, however
    /// many sockets are asked for (a probe without `SO_REUSEPORT` binds first), so a second
    /// server started on the same port fails instead of taking over some of the first
    /// one's clients; see [`share_port`](Self::share_port).
    pub fn sockets_per_address(mut self, sockets: usize) -> Self {
        self.server.sockets_per_address = Some(sockets.max(1));
        self
    }

    /// Whether the listener may bind a port that sockets of this user already hold with
    /// `SO_REUSEPORT` (Linux and Android; elsewhere it changes nothing), and share the
    /// port's datagrams with them. Defaults to off: a port in use is an error.
    ///
    /// It lets a new server start taking clients before an old one on the port has
    /// stopped, which is all it does: the kernel spreads datagrams over both servers'
    /// sockets by a hash of the addresses, re-spread as sockets come and go, and neither
    /// server knows the other's connections. The old server's connections whose datagrams
    /// now reach the new one are lost (their clients wait out their idle timeout: the new
    /// server's stateless resets carry another key; do not give both one
    /// [`stateless_reset_key`](Self::stateless_reset_key), see there), and clients that
    /// reach the old one once it has stopped accepting are not answered until it exits.
    /// A hand-over that loses nothing
    /// passes the sockets themselves to the new process ([`Listener::from_std`](crate::quic::Listener::from_std)).
    pub fn share_port(mut self, share: bool) -> Self {
        self.server.share_port = share;
        self
    }

    /// The secret the listener derives its stateless reset tokens from (RFC 9000 §10.3): 32
    /// random bytes, kept as secret as the TLS key. Defaults to a random key per bound
    /// address.
    ///
    /// A server that keeps its key across restarts answers the packets of connections it
    /// lost (it crashed, or was restarted without a graceful shutdown) with a stateless
    /// reset their clients recognise: they learn at once that the connection is gone
    /// instead of waiting out their idle timeout, and open a new one.
    ///
    /// A key must never be used by a server that can receive packets of a live connection
    /// it does not hold: it answers them with that connection's token, and whoever sees the
    /// connection's ID (an observer on the path) can so learn the token and end the
    /// connection (RFC 9000 §10.3.2). Within one listener this cannot happen: a packet sent
    /// to one of its addresses for a connection of another draws no reset. Between
    /// listeners it can (two built from one configuration hold one key: bind one listener
    /// to all the addresses, [`Listener::bind_all`](crate::quic::Listener::bind_all)), and
    /// between servers: servers behind a load balancer may share a key only when the balancer routes
    /// every packet by connection ID to the server that holds it, and two processes on one
    /// port with [`share_port`](Self::share_port) must not share one (the kernel hands a
    /// connection's packets to either, by a hash of a source port an attacker chooses).
    /// Whoever knows the key can end any of the server's connections whose ID it knows.
    ///
    /// A client built on this crate recognises the reset of the connection ID the server
    /// gave in its handshake (quiche checks no other), which is the one it uses unless it
    /// migrates.
    ///
    /// ```
    /// let key: [u8; 32] = std::array::from_fn(|i| i as u8); // read it from a secret store
    /// let builder = tower_quiche::quic::ServerConfig::builder().stateless_reset_key(key);
    /// # let _ = builder;
    /// ```
    pub fn stateless_reset_key(mut self, key: [u8; 32]) -> Self {
        self.server.reset_key = Some(Arc::new(ResetKey::new(key)));
        self
    }

    /// How many new connections may wait for the application to accept them. Defaults to
    /// 1024; beyond it new Initials are dropped, without a Retry (the client sends its
    /// Initial again after its probe timeout, about a second), so a slow acceptor cannot
    /// make the server hoard state. A connection waiting there holds at most 48 received
    /// datagrams (a client's first flight) in 64 KiB or
    /// [`max_recv_udp_payload`](TransportConfig::max_recv_udp_payload), whichever is
    /// larger (within the [`inbound_queue`](TransportConfig::inbound_queue) bounds, which
    /// apply in full once it is started).
    pub fn accept_backlog(mut self, connections: usize) -> Self {
        self.server.accept_backlog = connections.max(1);
        self
    }

    /// How many connections one listener keeps at once (across all its sockets,
    /// handshaking or established). Defaults to 10,000: far more than one process usually
    /// serves through one listener, and a ceiling on what unauthenticated clients can make
    /// it hold (each connection costs its quiche state, its task and up to
    /// [`TransportConfig::inbound_queue_bytes`] of queue). At the cap, new Initials are
    /// dropped (counted as
    /// [`DropReason::ConnectionLimit`](crate::quic::DropReason::ConnectionLimit)) and the
    /// clients retry; existing connections are unaffected, and each one that ends frees its
    /// slot. Must be at least 1.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.server.max_connections = connections;
        self
    }

    /// How many of a listener's connections one client address (an IPv4 address, or an
    /// IPv6 /64) may hold once connection slots run short: at most a quarter of
    /// [`max_connections`](Self::max_connections) free, counting the new one. Defaults to
    /// 1,000 (a tenth of the default cap; one process of a test or a NAT's clients on one
    /// server rarely hold more); a share of `max_connections` or more never applies. While slots are plenty, one address may hold more; once they run
    /// short, its new Initials are dropped (counted as
    /// [`DropReason::ConnectionLimit`](crate::quic::DropReason::ConnectionLimit)) while
    /// other addresses still find room: one host that completes handshakes and keeps its
    /// connections alive cannot take every slot. Half-open connections whose address
    /// nothing proved (spoofable) do not count against it: a client over the share with
    /// them gets a Retry, unless [`retry`](Self::retry) is `Never` (then dropped, counted
    /// as [`DropReason::HandshakeLimit`](crate::quic::DropReason::HandshakeLimit)). Must be
    /// at least 1.
    pub fn max_connections_per_address(mut self, connections: usize) -> Self {
        self.server.max_connections_per_address = connections;
        self
    }

    /// How many of a listener's connections may be in their handshake at once. Defaults
    /// to 1,024, as [`accept_backlog`](Self::accept_backlog): a reconnect storm of that many
    /// clients is served at once, while a flood of Initials that never complete (each
    /// holding TLS state until [`TransportConfig::handshake_timeout`]) can neither exhaust
    /// memory nor take every connection slot. At the cap, new Initials are dropped (counted
    /// as [`DropReason::HandshakeLimit`](crate::quic::DropReason::HandshakeLimit)); a
    /// connection stops counting once its handshake completes or it ends. Must be at least 1.
    pub fn max_handshakes_in_progress(mut self, handshakes: usize) -> Self {
        self.server.max_handshakes = handshakes;
        self
    }

    /// How many of those handshakes one client address (an IPv4 address, or an IPv6 /64,
    /// one host's usual share) may have in progress once the listener is loaded: a quarter
    /// of [`max_handshakes_in_progress`](Self::max_handshakes_in_progress) in use, as for
    /// [`RetryPolicy::UnderLoad`]. Defaults to 64, a sixteenth of the default cap: one host
    /// that passes address validation (a Retry) and then stalls its handshakes cannot take
    /// every slot, while below the load threshold one host's burst (a load test, a NAT's
    /// clients reconnecting) is served at once. Past it, that address's new Initials are
    /// answered with a Retry (unless [`retry`](Self::retry) is `Never`: dropped, counted as
    /// [`DropReason::HandshakeLimit`](crate::quic::DropReason::HandshakeLimit)): Initials
    /// whose source address nothing proved can be spoofed, so a victim's address could be
    /// filled by others. Handshakes proven by a Retry token have a share of their own, the
    /// same size; past it, that address's proven Initials are dropped. Must be at least 1.
    ///
    /// A server's TCP side (`server::Builder::serve_with_tcp`) gives each address the same
    /// share of its TLS handshakes, once a quarter of its `tcp_max_connections` are in one;
    /// an address's connections past it are closed at once.
    pub fn max_handshakes_in_progress_per_address(mut self, handshakes: usize) -> Self {
        self.server.max_handshakes_per_address = handshakes;
        self
    }

    /// How many stateless replies (stateless resets, RFC 9000 §10.3, and version
    /// negotiation packets, §6) one listener sends, as a token bucket: `burst` at once,
    /// refilled at `per_second`. Defaults to 1,000 per second with a burst of 1,000. Both
    /// replies answer packets anyone can forge with any source address, so without a limit
    /// the server reflects whatever it is sent at whoever the sender names; 1,000 replies of
    /// at most 43 bytes (resets) or about 60 bytes (version negotiation) is under 64 KB/s,
    /// yet enough for the clients of a thousand connections that a restart forgot to learn
    /// so at once, rather than after their idle timeout. Replies over budget are not sent
    /// (counted as [`DropReason::RateLimited`](crate::quic::DropReason::RateLimited)).
    /// `(0, 0)` turns both replies off; otherwise `burst` must be at least 1.
    pub fn stateless_reply_rate(mut self, per_second: u32, burst: u32) -> Self {
        self.server.stateless_replies_per_second = per_second;
        self.server.stateless_reply_burst = burst;
        self
    }

    /// Checks every setting, reads and parses the certificate and key, and builds the
    /// [`ServerConfig`].
    pub fn build(self) -> Result<ServerConfig, Error> {
        let s = &self.server;
        if s.max_connections == 0
            || s.max_handshakes == 0
            || s.max_handshakes_per_address == 0
            || s.max_connections_per_address == 0
        {
            return Err(Error::config(
                "max_connections, max_connections_per_address, max_handshakes_in_progress and \
                 max_handshakes_in_progress_per_address must be at least 1 (a listener that admits no \
                 connection serves nothing)",
            ));
        }
        if s.stateless_replies_per_second > 0 && s.stateless_reply_burst == 0 {
            return Err(Error::config(format!(
                "stateless_reply_rate({}, 0) could never send a reply: give a burst of at least 1, \
                 or use (0, 0) to turn stateless replies off",
                s.stateless_replies_per_second
            )));
        }
        #[allow(unused_mut)]
        let mut tls = TlsMaterial::load(
            self.shared.cert_chain.as_ref(),
            self.shared.private_key.as_ref(),
            &[],
            false,
            true,
            self.client_ca.as_ref(),
        )?;
        #[cfg(feature = "rpk")]
        if let Some(src) = &self.rpk_own {
            tls.rpk.own = Some(src.private_key()?);
        }
        if tls.chain.is_empty() && tls.rpk.own.is_none() {
            return Err(Error::config(
                "a server needs a certificate: set cert_chain_pem_file and private_key_pem_file (or their \
                 in-memory forms), or use ServerConfig::from_pem_files",
            ));
        }
        let config = self.shared.assemble(self.server, tls)?;
        Ok(ServerConfig { config })
    }
}

// ---- the client's role ----

/// What a client [`Endpoint`](super::Endpoint) connects with: whom it trusts (the system's
/// roots and any CA given), its own certificate for mutual TLS, and the shared
/// [`TransportConfig`]. Build one with [`ClientConfig::builder`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub(crate) config: Config,
}

impl ClientConfig {
    /// A builder with every setting at its default: the system's trusted roots, servers
    /// verified, the `h3` ALPN.
    pub fn builder() -> ClientConfigBuilder {
        ClientConfigBuilder {
            shared: SharedParts::default(),
            ca: Vec::new(),
            system_roots: true,
            verify_server: true,
            #[cfg(feature = "rpk")]
            rpk_trusted: Vec::new(),
        }
    }

    /// The application protocols (ALPN) offered, in order of preference.
    pub fn alpn(&self) -> impl Iterator<Item = &[u8]> {
        self.config.alpn()
    }
}

/// Builds a [`ClientConfig`]. Every setting has a default (given on its method).
pub struct ClientConfigBuilder {
    shared: SharedParts,
    ca: Vec<PemSource>,
    system_roots: bool,
    verify_server: bool,
    #[cfg(feature = "rpk")]
    rpk_trusted: Vec<PemSource>,
}

impl fmt::Debug for ClientConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfigBuilder")
            .field("transport", &self.shared.transport)
            .field("system_roots", &self.system_roots)
            .field("verify_server", &self.verify_server)
            .finish_non_exhaustive()
    }
}

shared_setters!(
    ClientConfigBuilder,
    "The client's own certificate chain (leaf first), for servers that ask for one (mutual TLS),",
    "With its key."
);

impl ClientConfigBuilder {
    /// Also trusts the CA certificate(s) in this PEM file, besides the system roots.
    pub fn ca_pem_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca.push(PemSource::File(path.as_ref().to_path_buf()));
        self
    }

    /// Also trusts the CA certificate(s) in this PEM, besides the system roots.
    pub fn ca_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.ca.push(PemSource::Memory(pem.as_ref().to_vec()));
        self
    }

    /// Whether the system's trusted roots are used: the PEM bundle `SSL_CERT_FILE` names
    /// and the directories of `SSL_CERT_DIR` when they are set, else the platform's store
    /// (the distribution's bundle on Linux, the keychain on macOS, the Windows store;
    /// through `rustls-native-certs`). A client that verifies servers with no root
    /// at all (no bundle found, and no [`ca_pem`](Self::ca_pem)) fails when its endpoint is
    /// created, saying so. Defaults to true.
    pub fn system_roots(mut self, enabled: bool) -> Self {
        self.system_roots = enabled;
        self
    }

    /// Accepts any server certificate, unverified. **Insecure**: anyone on the path can
    /// impersonate the server. For tests and development only. Defaults to false.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.verify_server = !accept;
        self
    }

    /// (`rpk` feature) Accepts servers presenting this raw public key (PEM `PUBLIC KEY`),
    /// and only raw public keys. May be given several times.
    #[cfg(feature = "rpk")]
    pub fn trust_raw_public_key_pem(mut self, public_key_pem: impl AsRef<[u8]>) -> Self {
        self.rpk_trusted
            .push(PemSource::Memory(public_key_pem.as_ref().to_vec()));
        self
    }

    /// Checks every setting, reads and parses the certificates, and builds the
    /// [`ClientConfig`].
    pub fn build(self) -> Result<ClientConfig, Error> {
        #[allow(unused_mut)]
        let mut tls = TlsMaterial::load(
            self.shared.cert_chain.as_ref(),
            self.shared.private_key.as_ref(),
            &self.ca,
            self.system_roots,
            self.verify_server,
            None,
        )?;
        #[cfg(feature = "rpk")]
        for src in &self.rpk_trusted {
            tls.rpk.trusted.push(src.public_key()?);
        }
        let config = self.shared.assemble(ServerSettings::default(), tls)?;
        Ok(ClientConfig { config })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::tls::DevCa;

    /// With GREASE off, an HTTP/3 server opens its three unidirectional streams (control,
    /// QPACK encoder and decoder) and not the fourth of a reserved type.
    #[test]
    fn grease_off_opens_no_reserved_stream() {
        for (grease, streams) in [(true, 4), (false, 3)] {
            let server = crate::testing::server_config("h3", |t| t.grease(grease));
            let client = crate::testing::client_config("h3", |t| t);
            let mut pipe = crate::testing::Pipe::handshaken(&server, &client);
            let h3_config = quiche::h3::Config::new().unwrap();
            quiche::h3::Connection::with_transport(&mut pipe.server, &h3_config).unwrap();
            pipe.flush();
            let server_uni = pipe.client.readable().filter(|id| id % 4 == 3).count();
            assert_eq!(server_uni, streams, "grease {grease}");
        }
    }

    #[test]
    fn empty_alpn_is_refused_with_advice() {
        let err = ClientConfig::builder().alpn::<_, &[u8]>([]).build().unwrap_err();
        assert!(err.is_config());
        assert!(err.to_string().contains("ALPN"), "{err}");
    }

    #[test]
    fn a_stream_buffer_under_a_kilobyte_is_refused_with_advice() {
        for (recv, send) in [(0, 64 * 1024), (64 * 1024, 0), (1023, 1024)] {
            let err = ClientConfig::builder()
                .alpn(["x"])
                .transport(TransportConfig::new().stream_buffers(recv, send))
                .build()
                .unwrap_err();
            assert!(err.is_config());
            let text = err.to_string();
            assert!(text.contains(&format!("stream_buffers({recv}, {send})")), "{text}");
            assert!(text.contains("at least 1024"), "{text}");
        }
        ClientConfig::builder()
            .alpn(["x"])
            .transport(TransportConfig::new().stream_buffers(1024, 1024))
            .build()
            .expect("1 KiB buffers are accepted");
    }

    #[test]
    fn missing_certificate_file_names_the_file() {
        let err = ServerConfig::from_pem_files("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
        assert!(err.is_config());
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let ca = DevCa::new("test").unwrap();
        let a = ca.issue(&["localhost"]).unwrap();
        let b = ca.issue(&["localhost"]).unwrap();
        let err = ServerConfig::builder()
            .cert_chain_pem(&a.cert_pem)
            .private_key_pem(&b.key_pem)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        ServerConfig::builder()
            .cert_chain_pem(&a.cert_pem)
            .private_key_pem(&a.key_pem)
            .build()
            .expect("matching pair");
    }

    #[test]
    fn limits_that_cannot_work_are_refused_with_advice() {
        let ca = DevCa::new("test").unwrap();
        let leaf = ca.issue(&["localhost"]).unwrap();
        let server = || {
            ServerConfig::builder()
                .cert_chain_pem(&leaf.cert_pem)
                .private_key_pem(&leaf.key_pem)
        };
        let build = |b: ServerConfigBuilder| b.build().unwrap_err().to_string();
        let err = build(server().transport(TransportConfig::new().inbound_queue_bytes(1000)));
        assert!(err.contains("raise inbound_queue_bytes"), "{err}");
        let err = build(server().max_connections(0));
        assert!(err.contains("max_connections"), "{err}");
        let err = build(server().max_connections_per_address(0));
        assert!(err.contains("max_connections_per_address"), "{err}");
        let err = build(server().max_handshakes_in_progress(0));
        assert!(err.contains("max_handshakes_in_progress"), "{err}");
        let err = build(server().max_handshakes_in_progress_per_address(0));
        assert!(err.contains("max_handshakes_in_progress_per_address"), "{err}");
        let err = build(server().stateless_reply_rate(10, 0));
        assert!(err.contains("burst of at least 1"), "{err}");
        server()
            .stateless_reply_rate(0, 0)
            .transport(
                TransportConfig::new()
                    .max_recv_udp_payload(1500)
                    .inbound_queue_bytes(1500),
            )
            .build()
            .expect("off, and a one-datagram queue");
    }

    #[test]
    fn a_server_without_a_certificate_is_refused_with_advice() {
        let err = ServerConfig::builder().build().unwrap_err();
        assert!(err.is_config());
        assert!(err.to_string().contains("from_pem_files"), "{err}");
    }

    #[test]
    fn both_roles_offer_h3_unless_told_otherwise() {
        let ca = DevCa::new("test").unwrap();
        let leaf = ca.issue(&["localhost"]).unwrap();
        let server = ServerConfig::builder()
            .cert_chain_pem(&leaf.cert_pem)
            .private_key_pem(&leaf.key_pem)
            .build()
            .unwrap();
        assert_eq!(server.alpn().collect::<Vec<_>>(), [b"h3"]);
        let client = ClientConfig::builder().ca_pem(ca.cert_pem()).build().unwrap();
        assert_eq!(client.alpn().collect::<Vec<_>>(), [b"h3"]);
        let echo = ClientConfig::builder()
            .ca_pem(ca.cert_pem())
            .alpn(["echo"])
            .build()
            .unwrap();
        assert_eq!(echo.alpn().collect::<Vec<_>>(), [b"echo"]);
    }

    #[cfg(unix)]
    #[test]
    fn the_keylog_file_is_created_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("tower-quiche-keylog-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let built = ClientConfig::builder()
            .system_roots(false)
            .danger_accept_invalid_certs(true)
            .transport(TransportConfig::new().keylog_file(&path))
            .build();
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        let _ = std::fs::remove_file(&path);
        built.expect("config");
        assert_eq!(format!("{:o}", mode.expect("the file exists")), "600");
    }

    #[test]
    fn tiny_payload_sizes_are_refused() {
        let err = ClientConfig::builder()
            .transport(TransportConfig::new().max_send_udp_payload(1000))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("1200"), "{err}");
    }
}
