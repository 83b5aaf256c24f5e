//! A small curl-like HTTP/3 client.
//!
//!     cargo run --example client -- [-X METHOD] [-H 'name: value']... [--data-file FILE] [-o OUT] [--ca PEM | --insecure] [-v] URL
//!
//! The body goes to stdout (or OUT). `-v` prints the response head and trailers to stderr.
//! A progress line appears on stderr for long transfers when stderr is a terminal. On
//! failure it prints one readable line and exits non-zero; a non-2xx status is printed too
//! (and exits 22, as `curl --fail` does).

mod support;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::io::AsyncReadExt;

/// A small curl-like HTTP/3 client: the response body goes to stdout (or OUT).
///
/// On failure it prints one readable line and exits non-zero; a non-2xx status is printed
/// too (and exits 22, as `curl --fail` does).
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    /// Request method
    #[arg(short = 'X', long = "request", value_name = "METHOD", default_value = "GET")]
    method: Method,
    /// A request header (repeatable)
    #[arg(short = 'H', long = "header", value_name = "name: value")]
    headers: Vec<String>,
    /// Send the file as the request body, streamed
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
    /// Write the body to OUT instead of stdout
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: Option<PathBuf>,
    #[command(flatten)]
    trust: support::Trust,
    /// Print the response head and trailers to stderr
    #[arg(short = 'v', long)]
    verbose: bool,
    /// The https:// URL to request
    url: String,
}

#[tokio::main]
async fn main() {
    if let Err(message) = run().await {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn describe(e: &tower_quiche::Error) -> String {
    if e.is_tls() {
        format!("certificate not trusted or TLS failed ({e}); use --ca PEM to trust a CA, or --insecure")
    } else if e.is_timeout() {
        format!("timed out ({e})")
    } else {
        e.to_string()
    }
}

async fn run() -> Result<(), String> {
    let args = Args::parse();
    let verbose = args.verbose;
    let client = args.trust.h3_client().map_err(|e| e.to_string())?;
    let mut request = Request::builder().method(args.method).uri(args.url.as_str());
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("-H '{header}' is not 'name: value'"))?;
        let name = HeaderName::try_from(name.trim()).map_err(|e| format!("-H '{header}': {e}"))?;
        let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("-H '{header}': {e}"))?;
        request = request.header(name, value);
    }
    let send = match &args.data_file {
        Some(path) => {
            let failed = |e: std::io::Error| format!("{}: {e}", path.display());
            let file = tokio::fs::File::open(path).await.map_err(failed)?;
            let length = file.metadata().await.map_err(failed)?.len();
            // Streamed from the file in 64 KiB chunks, never held whole.
            let chunks = futures_util::stream::unfold(file, |mut file| async move {
                let mut buf = vec![0; 64 * 1024];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(buf))), file))
                    }
                    Err(e) => Some((Err(e), file)),
                }
            });
            let request = request
                .header(http::header::CONTENT_LENGTH, length)
                .body(StreamBody::new(chunks));
            client.send(request.map_err(|e| e.to_string())?).await
        }
        None => {
            client
                .send(request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?)
                .await
        }
    };
    let response = send.map_err(|e| describe(&e))?;
    if verbose {
        eprintln!("< {:?} {}", response.version(), response.status());
        for (name, value) in response.headers() {
            eprintln!("< {name}: {}", value.to_str().unwrap_or("<binary>"));
        }
        eprintln!("<");
    }
    let status = response.status();
    let total = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let progress = std::io::stderr().is_terminal() && total.is_none_or(|t| t > 8 * 1024 * 1024);
    let started = Instant::now();
    let mut last_report = started;
    let mut received = 0u64;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the response body failed: {}", describe(&e)))?;
        match frame.into_data() {
            Ok(data) => {
                received += data.len() as u64;
                out.write_all(&data).map_err(|e| format!("writing the body: {e}"))?;
                if progress && last_report.elapsed() > Duration::from_millis(200) {
                    last_report = Instant::now();
                    report(received, total, started);
                }
            }
            Err(frame) => {
                if let (Ok(trailers), true) = (frame.into_trailers(), verbose) {
                    for (name, value) in &trailers {
                        eprintln!("< [trailer] {name}: {}", value.to_str().unwrap_or("<binary>"));
                    }
                }
            }
        }
    }
    out.flush().map_err(|e| format!("writing the body: {e}"))?;
    if progress {
        report(received, total, started);
        eprintln!();
    }
    if !status.is_success() {
        eprintln!("HTTP status {status}");
        std::process::exit(22);
    }
    Ok(())
}

fn report(received: u64, total: Option<u64>, started: Instant) {
    let mib = received as f64 / (1024.0 * 1024.0);
    let rate = mib / started.elapsed().as_secs_f64().max(1e-3);
    match total {
        Some(t) if t > 0 => eprint!(
            "\r{mib:.1} MiB of {:.1} MiB ({:.0}%), {rate:.1} MiB/s   ",
            t as f64 / 1048576.0,
            received as f64 * 100.0 / t as f64
        ),
        _ => eprint!("\r{mib:.1} MiB, {rate:.1} MiB/s   "),
    }
}
