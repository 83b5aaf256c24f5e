//! Certificates and TLS contexts: loading PEM (files or memory), checking that a key matches
//! its certificate, verifying peers (system roots, a custom CA, or explicitly nothing), and
//! generating development certificates (`DevCa`, `self_signed`: `dev-certs` feature).
//!
//! quiche drives the handshake; this module only prepares the BoringSSL context it runs with.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::path::PathBuf;

use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::ssl::{SslContextBuilder, SslMethod, SslVerifyMode};
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509, X509StoreContextRef, X509VerifyError};

use crate::error::Error;

/// Where PEM text comes from: a file, read when the configuration is built, or memory.
#[derive(Debug, Clone)]
pub(crate) enum PemSource {
    File(PathBuf),
    Memory(Vec<u8>),
}

impl PemSource {
    fn read(&self, what: &str) -> Result<Vec<u8>, Error> {
        match self {
            PemSource::Memory(bytes) => Ok(bytes.clone()),
            PemSource::File(path) => std::fs::read(path)
                .map_err(|e| Error::config(format!("cannot read the {what} from '{}': {e}", path.display()))),
        }
    }

    fn describe(&self) -> String {
        match self {
            PemSource::File(path) => format!("'{}'", path.display()),
            PemSource::Memory(_) => "the PEM given in memory".to_string(),
        }
    }

    pub(crate) fn certificates(&self, what: &str) -> Result<Vec<X509>, Error> {
        let pem = self.read(what)?;
        let certs = X509::stack_from_pem(&pem)
            .map_err(|e| Error::config(format!("the {what} in {} is not valid PEM: {e}", self.describe())))?;
        if certs.is_empty() {
            return Err(Error::config(format!(
                "no certificate found in {} (expected one or more '-----BEGIN CERTIFICATE-----' blocks for the {what})",
                self.describe()
            )));
        }
        Ok(certs)
    }

    #[cfg(feature = "rpk")]
    pub(crate) fn public_key(&self) -> Result<PKey<boring::pkey::Public>, Error> {
        let pem = self.read("public key")?;
        PKey::public_key_from_pem(&pem).map_err(|e| {
            Error::config(format!(
                "no usable public key in {} (expected a PEM 'PUBLIC KEY' block): {e}",
                self.describe()
            ))
        })
    }

    pub(crate) fn private_key(&self) -> Result<PKey<Private>, Error> {
        let pem = self.read("private key")?;
        PKey::private_key_from_pem(&pem).map_err(|e| {
            Error::config(format!(
                "no usable private key in {} (expected a PEM 'PRIVATE KEY' block): {e}",
                self.describe()
            ))
        })
    }
}

/// The ALPN list of HTTP over TLS on TCP, in wire format and order of preference: `h2`, then
/// `http/1.1`. The client's TCP side offers it; the server's selects from it and
/// `http/1.0`.
#[cfg(all(feature = "tcp", feature = "client"))]
pub(crate) const TCP_ALPN: &[u8] = b"\x02h2\x08http/1.1";

/// Parsed TLS material of a configuration, shared by every endpoint built from it.
pub(crate) struct TlsMaterial {
    pub(crate) chain: Vec<X509>,
    pub(crate) key: Option<PKey<Private>>,
    /// Roots a client trusts for servers (system roots and/or custom CAs).
    pub(crate) roots: Vec<X509>,
    /// When false, a client accepts any server certificate (explicit insecure mode).
    pub(crate) verify_server: bool,
    /// When the system's roots were wanted: what could not be read of them, named in the
    /// error a client gets when it has no root at all.
    system_problems: Option<Vec<String>>,
    /// When set, a server requires client certificates signed by one of these.
    pub(crate) client_ca: Option<Vec<X509>>,
    /// Raw public keys (RFC 7250): the key a server presents instead of a certificate, and
    /// the server keys a client accepts.
    pub(crate) rpk: RawPublicKeys,
}

/// Raw public key settings; empty unless the `rpk` feature is used.
#[derive(Default)]
#[cfg_attr(not(feature = "rpk"), allow(dead_code))]
pub(crate) struct RawPublicKeys {
    pub(crate) own: Option<PKey<Private>>,
    pub(crate) trusted: Vec<PKey<boring::pkey::Public>>,
}

impl TlsMaterial {
    pub(crate) fn load(
        chain: Option<&PemSource>,
        key: Option<&PemSource>,
        custom_roots: &[PemSource],
        system_roots: bool,
        verify_server: bool,
        client_ca: Option<&PemSource>,
    ) -> Result<Self, Error> {
        let chain = match chain {
            Some(src) => src.certificates("certificate chain")?,
            None => Vec::new(),
        };
        let key = key.map(PemSource::private_key).transpose()?;
        match (chain.first(), &key) {
            (Some(leaf), Some(key)) => {
                let public = leaf
                    .public_key()
                    .map_err(|e| Error::config(format!("the certificate's public key cannot be read: {e}")))?;
                if !public.public_eq(key) {
                    return Err(Error::config(
                        "the private key does not match the certificate (the first certificate of the chain): \
                         give the key that was used to create that certificate",
                    ));
                }
            }
            (Some(_), None) => {
                return Err(Error::config(
                    "a certificate chain was given without its private key: set the private key too",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "a private key was given without its certificate chain: set the certificate chain too",
                ));
            }
            (None, None) => {}
        }
        let mut roots = Vec::new();
        for src in custom_roots {
            roots.extend(src.certificates("CA certificate")?);
        }
        let system_problems = (system_roots && verify_server).then(|| {
            let (system, problems) = self::system_roots();
            roots.extend(system);
            problems
        });
        let client_ca = client_ca
            .map(|src| src.certificates("client CA certificate"))
            .transpose()?;
        Ok(TlsMaterial {
            chain,
            key,
            roots,
            verify_server,
            system_problems,
            client_ca,
            rpk: RawPublicKeys::default(),
        })
    }

    /// A BoringSSL context for one endpoint; quiche adds ALPN and QUIC specifics.
    pub(crate) fn context_builder(&self, server: bool) -> Result<SslContextBuilder, Error> {
        let tls_err =
            |what: &str, e: boring::error::ErrorStack| Error::config(format!("TLS setup failed ({what}): {e}"));
        let mut b = SslContextBuilder::new(SslMethod::tls()).map_err(|e| tls_err("new context", e))?;
        if let Some(leaf) = self.chain.first() {
            b.set_certificate(leaf).map_err(|e| tls_err("certificate", e))?;
            for extra in &self.chain[1..] {
                b.add_extra_chain_cert(extra.clone()).map_err(|e| tls_err("chain", e))?;
            }
        }
        if let Some(key) = &self.key {
            b.set_private_key(key).map_err(|e| tls_err("private key", e))?;
            b.check_private_key().map_err(|e| tls_err("key check", e))?;
        }
        if server {
            // Whatever the server presents (a certificate or a raw key), what its
            // configuration says of clients holds.
            self.verify_clients(&mut b).map_err(|e| tls_err("client CA", e))?;
            shed_handshake_config_when_done(&mut b);
        }
        #[cfg(feature = "rpk")]
        if self.rpk.own.is_some() || !self.rpk.trusted.is_empty() {
            return self.rpk_context(b, server);
        }
        if server {
            return Ok(b);
        }
        if self.verify_server {
            if self.roots.is_empty() {
                // Every server would fail verification: say so now, with what to do, rather
                // than as a handshake failure later.
                return Err(self.no_roots_error());
            }
            b.set_cert_store(store_of(&self.roots).map_err(|e| tls_err("roots", e))?);
            b.set_verify_callback(SslVerifyMode::PEER, verify_server_certificate);
        } else {
            b.set_verify(SslVerifyMode::NONE);
        }
        Ok(b)
    }
}

impl TlsMaterial {
    fn no_roots_error(&self) -> Error {
        let why = match &self.system_problems {
            Some(problems) => {
                let problems = if problems.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", problems.join("; "))
                };
                format!(
                    "the system's certificate store holds no root{problems}: install the system's CA \
                     certificates (the ca-certificates package), point SSL_CERT_FILE at a PEM bundle, or"
                )
            }
            None => "system roots are off (ClientConfigBuilder::system_roots(false)):".to_string(),
        };
        Error::config(format!(
            "a client has no trusted root certificate to verify servers with: {why} give the CA to trust \
             with ClientConfigBuilder::ca_pem or ca_pem_file"
        ))
    }

    /// Servers: with a client CA configured (mutual TLS), require a client certificate that
    /// chains to it; else ask for none. Every transport a server speaks (QUIC and TCP) calls
    /// this, so none of them serves a client the others would refuse.
    pub(crate) fn verify_clients(&self, b: &mut SslContextBuilder) -> Result<(), boring::error::ErrorStack> {
        match &self.client_ca {
            Some(cas) => {
                b.set_cert_store(store_of(cas)?);
                b.set_verify_callback(
                    SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
                    record_verify_error,
                );
            }
            None => b.set_verify(SslVerifyMode::NONE),
        }
        Ok(())
    }
}

#[cfg(feature = "rpk")]
impl TlsMaterial {
    /// A context that presents (server) or accepts (client) raw public keys only.
    fn rpk_context(&self, mut b: SslContextBuilder, server: bool) -> Result<SslContextBuilder, Error> {
        use boring::ssl::{CertificateType, SslAlert, SslCredential, SslVerifyError};
        let tls_err = |what: &str, e: boring::error::ErrorStack| {
            Error::config(format!("raw public key setup failed ({what}): {e}"))
        };
        if server {
            let key = self.rpk.own.as_ref().ok_or_else(|| {
                Error::config(
                    "a raw-public-key server needs its private key: set ServerConfigBuilder::raw_public_key_pem",
                )
            })?;
            let spki = key.public_key_to_der().map_err(|e| tls_err("public key", e))?;
            let mut credential = SslCredential::new_raw_public_key().map_err(|e| tls_err("credential", e))?;
            credential.set_private_key(key).map_err(|e| tls_err("private key", e))?;
            credential
                .set_spki_bytes(Some(&spki))
                .map_err(|e| tls_err("public key", e))?;
            b.add_credential(&credential.build())
                .map_err(|e| tls_err("add credential", e))?;
        } else {
            b.set_server_certificate_types(&[CertificateType::RAW_PUBLIC_KEY])
                .map_err(|e| tls_err("certificate types", e))?;
            let trusted: Vec<Vec<u8>> = self
                .rpk
                .trusted
                .iter()
                .filter_map(|k| k.public_key_to_der().ok())
                .collect();
            b.set_custom_verify_callback(SslVerifyMode::PEER, move |ssl| {
                let presented = ssl.peer_pubkey().and_then(|k| k.public_key_to_der().ok());
                match presented {
                    Some(der) if trusted.contains(&der) => Ok(()),
                    _ => {
                        LAST_VERIFY_ERROR.with(|slot| {
                            *slot.borrow_mut() =
                                Some("the server's raw public key is not one this client trusts".to_string())
                        });
                        Err(SslVerifyError::Invalid(SslAlert::BAD_CERTIFICATE))
                    }
                }
            });
        }
        Ok(b)
    }
}

/// Servers: what only the handshake needs (the certificate and cipher settings each `SSL`
/// copies from the context) is freed once the handshake completes: BoringSSL holds 1.2 KiB
/// less per idle connection (`tests/idle_memory.rs`). Set from the certificate-selection
/// callback, which BoringSSL calls for every server handshake (resumptions included); a
/// context has one such callback, so one set later for another purpose must keep this.
fn shed_handshake_config_when_done(b: &mut SslContextBuilder) {
    b.set_select_certificate_callback(|mut hello| {
        shed_handshake_config(hello.ssl_mut());
        Ok(())
    });
}

/// Has BoringSSL free `ssl`'s handshake configuration once its handshake completes
/// (`SSL_set_shed_handshake_config`): nothing reads it afterwards (a QUIC connection has no
/// renegotiation, and the session, keys and peer certificate are kept apart).
fn shed_handshake_config(ssl: &mut boring::ssl::SslRef) {
    use foreign_types::ForeignTypeRef;
    // SAFETY: `as_ptr` is the live `SSL` this reference borrows (it is called during the
    // handshake, while the configuration still exists), and the call only sets a flag on
    // it (idempotent). The crate's one unsafe block (`.ci/run` checks there is one).
    #[allow(unsafe_code)]
    unsafe {
        boring_sys::SSL_set_shed_handshake_config(ssl.as_ptr(), 1);
    }
}

/// A trust store of `certs`, each an anchor of its own: a chain verifies once it reaches
/// any of them, an intermediate CA included (`X509_V_FLAG_PARTIAL_CHAIN`), as a CA named
/// to trust is meant; without the flag BoringSSL insists on a self-signed root at the end,
/// and a client CA given as an intermediate refuses every client.
fn store_of(certs: &[X509]) -> Result<boring::x509::store::X509Store, boring::error::ErrorStack> {
    let mut store = X509StoreBuilder::new()?;
    for cert in certs {
        // A bundle may hold the same certificate twice; that is not an error for us.
        let _ = store.add_cert(cert.clone());
    }
    store.set_flags(boring::x509::verify::X509VerifyFlags::PARTIAL_CHAIN);
    Ok(store.build())
}

/// The system's trusted roots, through `rustls-native-certs`: the PEM file `SSL_CERT_FILE`
/// names and the directories of `SSL_CERT_DIR` when set, else the platform's store (the
/// distribution's bundle on Linux, the keychain on macOS, the Windows store). Certificates
/// that do not parse are skipped; what could not be read is returned beside them, for the
/// error a client with no root at all gets.
fn system_roots() -> (Vec<X509>, Vec<String>) {
    let found = rustls_native_certs::load_native_certs();
    let roots = found.certs.iter().filter_map(|der| X509::from_der(der).ok()).collect();
    let problems = found.errors.iter().map(ToString::to_string).collect();
    (roots, problems)
}

thread_local! {
    /// The reason the last certificate verification on this thread failed.
    ///
    /// BoringSSL verifies inside `quiche::Connection::recv`, on the connection task's thread,
    /// and only tells the peer an alert number; the connection task takes this right after
    /// `recv` returns, in the same poll, so the reason reaches the user's error.
    static LAST_VERIFY_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Takes the reason the last certificate verification on this thread failed, if any.
pub(crate) fn take_verify_error() -> Option<String> {
    LAST_VERIFY_ERROR.with(|slot| slot.borrow_mut().take())
}

fn remember(ctx: &X509StoreContextRef, error: X509VerifyError) {
    let subject = ctx
        .current_cert()
        .and_then(|cert| {
            cert.subject_name()
                .entries_by_nid(Nid::COMMONNAME)
                .next()
                .and_then(|e| e.data().as_utf8().ok().map(|s| s.to_string()))
        })
        .map(|cn| format!(" (certificate '{cn}', depth {})", ctx.error_depth()))
        .unwrap_or_default();
    let message = format!("certificate verify failed: {}{subject}", error.error_string());
    LAST_VERIFY_ERROR.with(|slot| *slot.borrow_mut() = Some(message));
}

fn record_verify_error(preverify_ok: bool, ctx: &mut X509StoreContextRef) -> bool {
    if !preverify_ok && let Err(error) = ctx.verify_result() {
        remember(ctx, error);
    }
    preverify_ok
}

thread_local! {
    /// The IP address the certificate being verified on this thread must carry: set by a
    /// client connection's task while quiche processes its packets (see [`verifying_ip`]).
    static EXPECTED_IP: Cell<Option<IpAddr>> = const { Cell::new(None) };
}

/// Runs `f` (a connection taking in packets) with `ip` as the address the server's
/// certificate must carry. A client connecting to an address sends no SNI, so quiche
/// cannot give BoringSSL the name to match; the verify callback, which runs inside `f` on
/// this thread, matches the address itself.
pub(crate) fn verifying_ip<R>(ip: Option<IpAddr>, f: impl FnOnce() -> R) -> R {
    /// Puts the previous address back however `f` ends (a panic included).
    struct Restore(Option<IpAddr>);
    impl Drop for Restore {
        fn drop(&mut self) {
            EXPECTED_IP.with(|slot| slot.set(self.0));
        }
    }
    let _restore = Restore(EXPECTED_IP.with(|slot| slot.replace(ip)));
    f()
}

/// Whether the certificate in `der` (a connection's peer certificate) carries `ip` among
/// its IP SANs. The driver checks it again once the handshake is complete, so that a
/// connection to an address fails closed even if the verify callback did not see it.
pub(crate) fn certificate_has_ip(der: Option<&[u8]>, ip: IpAddr) -> bool {
    der.and_then(|der| X509::from_der(der).ok())
        .is_some_and(|cert| has_ip_san(&cert, ip))
}

/// Client-side verification: the chain must lead to a trusted root, and the leaf must carry
/// the name we connected to. BoringSSL matches DNS names itself (quiche sets the expected
/// host); an IP address, which is not sent as a name, we match against the leaf's IP SANs
/// here.
fn verify_server_certificate(preverify_ok: bool, ctx: &mut X509StoreContextRef) -> bool {
    if !preverify_ok {
        if let Err(error) = ctx.verify_result() {
            remember(ctx, error);
        }
        return false;
    }
    if ctx.error_depth() == 0
        && let Some(ip) = EXPECTED_IP.with(Cell::get)
        && !leaf_matches_ip(ctx, ip)
    {
        ctx.set_error(Err(X509VerifyError::IP_ADDRESS_MISMATCH));
        remember(ctx, X509VerifyError::IP_ADDRESS_MISMATCH);
        return false;
    }
    true
}

fn leaf_matches_ip(ctx: &X509StoreContextRef, ip: IpAddr) -> bool {
    ctx.current_cert().is_some_and(|leaf| has_ip_san(leaf, ip))
}

fn has_ip_san(cert: &boring::x509::X509Ref, ip: IpAddr) -> bool {
    let want: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    cert.subject_alt_names()
        .is_some_and(|names| names.iter().any(|n| n.ipaddress() == Some(&want[..])))
}

#[cfg(any(test, feature = "dev-certs"))]
mod dev;
#[cfg(any(test, feature = "dev-certs"))]
pub use dev::{DevCa, GeneratedCert, self_signed};

#[cfg(test)]
mod tests {
    use super::*;

    fn load(custom_roots: &[PemSource], system_roots: bool) -> TlsMaterial {
        TlsMaterial::load(None, None, custom_roots, system_roots, true, None).expect("material")
    }

    #[test]
    fn a_certificate_has_an_address_only_among_its_ip_sans() {
        let ca = DevCa::new("test").unwrap();
        let der = |names: &[&str]| {
            X509::from_pem(ca.issue(names).unwrap().cert_pem.as_bytes())
                .unwrap()
                .to_der()
                .unwrap()
        };
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(certificate_has_ip(Some(&der(&["localhost", "127.0.0.1"])), loopback));
        assert!(
            !certificate_has_ip(Some(&der(&["localhost"])), loopback),
            "a name is not an address"
        );
        assert!(
            !certificate_has_ip(Some(&der(&["127.0.0.2"])), loopback),
            "another address"
        );
        assert!(!certificate_has_ip(None, loopback), "no certificate");
        assert!(!certificate_has_ip(Some(b"not DER"), loopback));
    }

    #[test]
    fn a_client_without_roots_is_refused_with_advice() {
        let err = load(&[], false).context_builder(false).err().expect("no roots");
        assert!(err.is_config());
        assert!(err.to_string().contains("ca_pem"), "{err}");
        // A server needs no roots; a client given a CA has one.
        assert!(load(&[], false).context_builder(true).is_ok());
        let ca = DevCa::new("test").unwrap();
        let custom = [PemSource::Memory(ca.cert_pem().into_bytes())];
        assert!(load(&custom, false).context_builder(false).is_ok());
    }

    /// The variable that tells the test binary it runs as the child of the test below.
    const NO_BUNDLE_CHILD: &str = "TOWER_QUICHE_TEST_NO_SYSTEM_BUNDLE";

    /// A machine without the system's CA bundle is simulated with `SSL_CERT_FILE` naming a
    /// file that does not exist, in a child process (the environment is process-wide).
    #[test]
    fn a_missing_system_ca_bundle_is_a_clear_error() {
        if std::env::var_os(NO_BUNDLE_CHILD).is_some() {
            let err = load(&[], true).context_builder(false).err().expect("no roots");
            let message = err.to_string();
            assert!(message.contains("ca-certificates"), "{message}");
            assert!(message.contains("ca_pem"), "{message}");
            assert!(message.contains("/nonexistent/ca-bundle.pem"), "{message}");
            return;
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                concat!(module_path!(), "::a_missing_system_ca_bundle_is_a_clear_error")
                    .split_once("::")
                    .expect("a path in the crate")
                    .1,
            ])
            .env(NO_BUNDLE_CHILD, "1")
            .env("SSL_CERT_FILE", "/nonexistent/ca-bundle.pem")
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("1 passed"), "the child ran the test: {stdout}");
    }
}
