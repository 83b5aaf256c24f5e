//! A small curl: one or more URLs fetched in order on one `Client`, which finds HTTP/3 by
//! itself (TCP first, HTTP/3 once the origin's `Alt-Svc` advertises it, TCP again when UDP
//! is blocked).
//!
//!     cargo run --example client -- [-X METHOD] [-H 'name: value']... [--data-file FILE]
//!         [-o OUT]... [-L] [--compressed] [--http3-only] [-m SECS] [--ca PEM | --insecure] [-v] URL...
//!
//! Each body goes to stdout, byte for byte, or to the `-o` given in the same position as
//! its URL (as curl: the first `-o` for the first URL, and so on; URLs past the last `-o` go
//! to stdout). `-v` prints each response's status line with its protocol version
//! (`< HTTP/3.0 200 OK`), its headers and its trailers to stderr. A progress bar appears on
//! stderr for long transfers when stderr is a terminal. A URL that fails prints one line
//! and the next URL is still fetched; the exit code is 1 when any failed, else 22 when any
//! answered 400 or more (as `curl --fail`), else 0.

mod support;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncReadExt;
use tower_quiche::client::{Client, redirect};

/// A small curl over HTTP/3, HTTP/2 and HTTP/1.1: each response body goes to stdout (or the
/// matching -o).
///
/// Without --http3-only the client asks an origin over TCP first and moves to HTTP/3 when
/// the response's Alt-Svc advertises it; when HTTP/3 fails, requests go on over TCP. URLs
/// are fetched in order on one client, so connections are reused. Exit code: 1 when a URL
/// failed, else 22 when a response was 400 or more (as curl --fail), else 0.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Args {
    /// Request method
    #[arg(short = 'X', long = "request", value_name = "METHOD", default_value = "GET")]
    method: Method,
    /// A request header (repeatable)
    #[arg(short = 'H', long = "header", value_name = "name: value")]
    headers: Vec<String>,
    /// Send the file as the request body, streamed (read again for each URL)
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
    /// Write the body of the URL in the same position to OUT (repeatable; URLs past the last -o go to stdout)
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    outputs: Vec<PathBuf>,
    /// Follow redirects (up to --max-redirs); without it a 3xx response is the answer
    #[arg(short = 'L', long = "location")]
    follow: bool,
    /// How many redirects -L follows
    #[arg(long, value_name = "N", default_value_t = 10)]
    max_redirs: usize,
    /// Ask for a compressed response (gzip, br, zstd) and write it decoded
    #[arg(long)]
    compressed: bool,
    /// Speak HTTP/3 only, without asking over TCP first (for servers with no TCP side)
    #[arg(long)]
    http3_only: bool,
    /// The most time each transfer may take, in seconds
    #[arg(short = 'm', long = "max-time", value_name = "SECS")]
    max_time: Option<f64>,
    #[command(flatten)]
    trust: support::Trust,
    /// Print each response's status line (with its version), headers and trailers to stderr
    #[arg(short = 'v', long)]
    verbose: bool,
    /// The https:// URLs to request, in order
    #[arg(required = true, value_name = "URL")]
    urls: Vec<String>,
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = runtime.block_on(run());
    // Returned, not `process::exit`: shutting the runtime down drops each open
    // connection's task, which tells its server the connection is closed. Bounded, as
    // `process::exit` was: a name lookup stuck on a blocking thread does not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

async fn run() -> ExitCode {
    let args = Args::parse();
    let client = match build_client(&args) {
        Ok(client) => client,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let headers = match parse_headers(&args.headers) {
        Ok(headers) => headers,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let (mut failed, mut http_error) = (false, false);
    for (i, url) in args.urls.iter().enumerate() {
        match fetch(&client, &args, &headers, url, args.outputs.get(i)).await {
            Ok(status) => http_error |= status.as_u16() >= 400,
            Err(message) => {
                eprintln!("error: {url}: {message}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else if http_error {
        ExitCode::from(22)
    } else {
        ExitCode::SUCCESS
    }
}

fn build_client(args: &Args) -> Result<Client, String> {
    let mut builder = Client::builder()
        .quic_config(args.trust.config("h3"))
        .gzip(args.compressed)
        .brotli(args.compressed)
        .zstd(args.compressed)
        .redirect(if args.follow {
            redirect::Policy::limited(args.max_redirs)
        } else {
            redirect::Policy::none()
        })
        // Any size: the body is streamed to its output, never read whole.
        .max_response_body_size(None);
    if args.http3_only {
        builder = builder.http3_prior_knowledge();
    }
    if let Some(seconds) = args.max_time {
        let timeout = Duration::try_from_secs_f64(seconds).map_err(|e| format!("--max-time {seconds}: {e}"))?;
        builder = builder.timeout(timeout);
    }
    builder.build().map_err(|e| describe(&e))
}

fn parse_headers(lines: &[String]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for header in lines {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("-H '{header}' is not 'name: value'"))?;
        let name = HeaderName::try_from(name.trim()).map_err(|e| format!("-H '{header}': {e}"))?;
        let value = HeaderValue::try_from(value.trim()).map_err(|e| format!("-H '{header}': {e}"))?;
        headers.append(name, value);
    }
    Ok(headers)
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

/// Fetches one URL, writes its body out, and returns its status.
async fn fetch(
    client: &Client,
    args: &Args,
    headers: &HeaderMap,
    url: &str,
    output: Option<&PathBuf>,
) -> Result<http::StatusCode, String> {
    let mut request = Request::builder().method(args.method.clone()).uri(url);
    for (name, value) in headers {
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
    if args.verbose {
        // Where redirects (-L) led, when they did.
        if let Some(tower_http::follow_redirect::RequestUri(uri)) = response.extensions().get()
            && *uri != url
        {
            eprintln!("* redirected to {uri}");
        }
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
    let mut out: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let progress = progress_bar(total);
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the response body failed: {}", describe(&e)))?;
        match frame.into_data() {
            Ok(data) => {
                out.write_all(&data).map_err(|e| format!("writing the body: {e}"))?;
                if let Some(bar) = &progress {
                    bar.inc(data.len() as u64);
                }
            }
            Err(frame) => {
                if let (Ok(trailers), true) = (frame.into_trailers(), args.verbose) {
                    for (name, value) in &trailers {
                        eprintln!("< [trailer] {name}: {}", value.to_str().unwrap_or("<binary>"));
                    }
                }
            }
        }
    }
    out.flush().map_err(|e| format!("writing the body: {e}"))?;
    if let Some(bar) = progress {
        bar.finish();
    }
    if status.as_u16() >= 400 {
        eprintln!("HTTP status {status}");
    }
    Ok(status)
}

/// A progress bar on stderr, for a transfer that may be long (over 8 MiB, or of unknown
/// length), when stderr is a terminal: never in a pipe or a log.
fn progress_bar(total: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || total.is_some_and(|t| t <= 8 * 1024 * 1024) {
        return None;
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{bar:40.cyan/blue} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} {binary_bytes_per_sec}").expect("a valid template"),
        ),
    };
    Some(bar)
}
