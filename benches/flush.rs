//! The connection task's flush: quiche's packets for a congestion window of stream data,
//! assembled into GSO batches and sent on a loopback socket (to a socket nobody reads). Each
//! iteration starts from a new connection with the data written (not timed), since a flush
//! empties the window.
//!
//!     cargo bench --bench flush

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tower_quiche::__bench::Flush;

fn flush(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = runtime.enter();
    let mut group = c.benchmark_group("flush");
    group.sample_size(20);
    group.bench_function("initial_window", |b| {
        b.iter_batched(
            || Flush::new(64 * 1024),
            |mut flush| {
                assert!(flush.flush() > 0);
                // Dropped after the timing, with the rest of the batch.
                flush
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, flush);
criterion_main!(benches);
