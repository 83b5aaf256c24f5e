//! Helpers the examples share: flag parsing and development certificates.

#![allow(dead_code)]

use std::path::PathBuf;

/// Command-line flags: `--name value` pairs, bare `--switch`es and positional arguments.
pub struct Args {
    pairs: Vec<(String, String)>,
    switches: Vec<String>,
    pub positional: Vec<String>,
}

impl Args {
    /// Parses `std::env::args`; flags listed in `switches` take no value.
    pub fn parse(switches: &[&str]) -> Args {
        let mut args = Args {
            pairs: Vec::new(),
            switches: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            if switches.contains(&arg.as_str()) {
                args.switches.push(arg);
            } else if arg.starts_with('-') && arg.len() > 1 {
                match it.next() {
                    Some(value) => args.pairs.push((arg, value)),
                    None => fail(&format!("{arg} needs a value")),
                }
            } else {
                args.positional.push(arg);
            }
        }
        args
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn values(&self, name: &str) -> impl Iterator<Item = &str> {
        self.pairs
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, switch: &str) -> bool {
        self.switches.iter().any(|s| s == switch)
    }

    pub fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.value(name) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| fail(&format!("{name}: '{v}' is not valid"))),
        }
    }
}

pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

/// The certificate and key a server uses: `--cert`/`--key` when given, else a CA and a leaf
/// for localhost, 127.0.0.1 and ::1 generated into a temporary directory (the CA's path is
/// printed, so clients can trust it).
pub fn server_identity(args: &Args) -> (PathBuf, PathBuf) {
    match (args.value("--cert"), args.value("--key")) {
        (Some(cert), Some(key)) => (cert.into(), key.into()),
        (None, None) => {
            let dir = std::env::temp_dir().join(format!("tower-quiche-dev-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
            let ca =
                tower_quiche::tls::DevCa::new("tower-quiche development CA").unwrap_or_else(|e| fail(&e.to_string()));
            let leaf = ca
                .issue(&["localhost", "127.0.0.1", "::1"])
                .unwrap_or_else(|e| fail(&e.to_string()));
            let write = |name: &str, text: &str| {
                let path = dir.join(name);
                std::fs::write(&path, text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
                path
            };
            let ca_path = write("ca.pem", &ca.cert_pem());
            let cert = write("cert.pem", &leaf.cert_pem);
            let key = write("key.pem", &leaf.key_pem);
            eprintln!(
                "generated a development certificate; clients must trust {}",
                ca_path.display()
            );
            (cert, key)
        }
        _ => fail("give both --cert and --key, or neither"),
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("shutting down");
}
