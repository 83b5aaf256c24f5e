//! Whole HTTP/3 requests over two in-memory quiche connections: the server's connection
//! logic (stream state machine, service bridge, response pump) and quiche's, without
//! sockets or other tasks. `request/post_1MiB` is the request body's chunk path: DATA read
//! from quiche into chunks while the body has credit, polled by the handler.
//!
//!     cargo bench --bench request

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tower_quiche::__bench::InMemory;

fn request(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = runtime.enter();
    let mut pair = InMemory::new();
    c.bench_function("request/get", |b| {
        b.iter(|| assert_eq!(pair.request(black_box(b"")), 1))
    });
    const BODY: usize = 1024 * 1024;
    let body = vec![0x5a; BODY];
    let mut group = c.benchmark_group("request");
    group.throughput(Throughput::Bytes(BODY as u64));
    group.sample_size(20);
    group.bench_function("post_1MiB", |b| {
        b.iter(|| assert_eq!(pair.request(black_box(&body)), BODY.to_string().len()))
    });
    group.finish();
}

criterion_group!(benches, request);
criterion_main!(benches);
