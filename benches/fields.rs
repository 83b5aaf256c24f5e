//! Field conversion: a request's field section into a checked request head (what the server
//! does with every request, RFC 9114 §4.3.1), and request and response heads into field
//! sections (what the client and the server send).
//!
//!     cargo bench --bench fields

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use quiche::h3::Header;
use tower_quiche::__bench;

/// A browser's GET: pseudo-headers and the usual dozen fields.
fn browser_get() -> Vec<Header> {
    [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "/assets/app.js?v=1234"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
        ),
        ("accept", "*/*"),
        ("accept-language", "en-US,en;q=0.9"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("referer", "https://example.com/"),
        ("sec-fetch-dest", "script"),
        ("sec-fetch-mode", "no-cors"),
        ("sec-fetch-site", "same-origin"),
        ("cookie", "session=0123456789abcdef; theme=dark"),
        ("priority", "u=1"),
    ]
    .iter()
    .map(|(n, v)| Header::new(n.as_bytes(), v.as_bytes()))
    .collect()
}

fn fields(c: &mut Criterion) {
    let list = browser_get();
    c.bench_function("fields/request_from_fields (browser GET, 14 fields)", |b| {
        b.iter(|| assert!(__bench::request_from_fields(black_box(&list))))
    });
    let request = http::Request::get("https://example.com/api/items?page=2")
        .header("accept", "application/json")
        .header("user-agent", "tower-quiche-bench")
        .header("authorization", "Bearer 0123456789abcdef0123456789abcdef")
        .body(())
        .unwrap();
    c.bench_function("fields/request_fields (client GET, 3 fields)", |b| {
        b.iter(|| black_box(__bench::request_fields(black_box(&request))))
    });
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "max-age=60")
        .header("vary", "accept-encoding")
        .header("etag", "\"33a64df551425fcc55e4d42a148795d9f25f89d4\"")
        .body(())
        .unwrap();
    c.bench_function("fields/response_fields (200, 4 fields)", |b| {
        b.iter(|| black_box(__bench::response_fields(black_box(&response))))
    });
}

criterion_group!(benches, fields);
criterion_main!(benches);
