//! The batcher's cost and its pay-off, each against the baseline a user
//! would otherwise write, in the same run.
//!
//! * `overhead`: 4,096 requests submitted from one thread as fast as
//!   possible (saturation) and then awaited, with a no-op handler;
//!   `batcher` against a hand-rolled `std::sync::mpsc` worker that answers
//!   each request on its own reply channel. Time per request is the
//!   batcher's bookkeeping: ticket, queue, batch cut, answer, wake.
//! * `a_plus_bn`: 128 requests to a handler that busy-spins
//!   `a + b·n` (a = 200 µs, b = 20 µs per item; the shape of real
//!   inference): the handler called once per request on the caller's
//!   thread (`direct_one_at_a_time`), through the batcher with
//!   `max_batch_size = 1`, and through the batcher with batches of up to 32.
//!
//! After criterion's report the bench prints the per-request overhead and
//! the throughput ratios from its own timing loop.
//!
//! Run: `cargo bench --bench batcher`

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use batcher::{Batcher, BatcherBuilder, BatcherConfig};
use criterion::{BenchmarkId, Criterion, Throughput};

const OVERHEAD_N: usize = 4096;
const WORK_N: usize = 128;
const A: Duration = Duration::from_micros(200);
const B: Duration = Duration::from_micros(20);

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// The model's cost shape: a fixed cost per call plus a cost per item.
fn costly(batch: Vec<u64>) -> Vec<Result<u64, Infallible>> {
    spin(A + B * batch.len() as u32);
    batch.into_iter().map(|x| Ok(x + 1)).collect()
}

fn noop(batch: Vec<u64>) -> Vec<Result<u64, Infallible>> {
    batch.into_iter().map(Ok).collect()
}

fn batcher_with(
    max_batch_size: usize,
    handler: fn(Vec<u64>) -> Vec<Result<u64, Infallible>>,
) -> Batcher<u64, u64> {
    BatcherBuilder::new(BatcherConfig {
        max_batch_size,
        max_delay: Duration::ZERO,
        max_queued: OVERHEAD_N * 2,
        ..BatcherConfig::default()
    })
    .build(|_| handler)
    .expect("valid config")
}

fn through_batcher(b: &Batcher<u64, u64>, n: usize) {
    let tickets: Vec<_> = (0..n as u64)
        .map(|i| b.submit(i).expect("queue has room"))
        .collect();
    for t in tickets {
        black_box(t.wait().expect("answered"));
    }
}

/// The baseline: one worker thread fed by a channel, one reply channel per
/// request.
struct MpscWorker {
    tx: Option<mpsc::Sender<(u64, mpsc::Sender<u64>)>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl MpscWorker {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<(u64, mpsc::Sender<u64>)>();
        let handle = thread::spawn(move || {
            for (x, reply) in rx {
                let _ = reply.send(x);
            }
        });
        Self {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    fn run(&self, n: usize) {
        let tx = self.tx.as_ref().expect("running");
        let replies: Vec<_> = (0..n as u64)
            .map(|i| {
                let (rtx, rrx) = mpsc::channel();
                tx.send((i, rtx)).expect("worker alive");
                rrx
            })
            .collect();
        for r in replies {
            black_box(r.recv().expect("answered"));
        }
    }
}

impl Drop for MpscWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn direct(n: usize) {
    for i in 0..n as u64 {
        black_box(costly(vec![i]));
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("overhead");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(OVERHEAD_N as u64));
    let b = batcher_with(64, noop);
    g.bench_function("batcher_noop", |bench| {
        bench.iter(|| through_batcher(&b, OVERHEAD_N))
    });
    drop(b);
    let w = MpscWorker::new();
    g.bench_function("mpsc_per_request_reply", |bench| {
        bench.iter(|| w.run(OVERHEAD_N))
    });
    drop(w);
    g.finish();

    let mut g = c.benchmark_group("a_plus_bn");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(WORK_N as u64));
    g.bench_function("direct_one_at_a_time", |bench| {
        bench.iter(|| direct(WORK_N))
    });
    for size in [1usize, 32] {
        let b = batcher_with(size, costly);
        g.bench_with_input(BenchmarkId::new("batcher", size), &size, |bench, _| {
            bench.iter(|| through_batcher(&b, WORK_N))
        });
    }
    g.finish();
}

fn median_of(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[runs / 2]
}

fn summary() {
    let per = |d: Duration, n: usize| d.as_nanos() as f64 / n as f64;
    let b = batcher_with(64, noop);
    through_batcher(&b, OVERHEAD_N);
    let noop_t = median_of(31, || through_batcher(&b, OVERHEAD_N));
    let stats = b.stats();
    drop(b);
    let w = MpscWorker::new();
    w.run(OVERHEAD_N);
    let mpsc_t = median_of(31, || w.run(OVERHEAD_N));
    drop(w);
    println!(
        "\nbatcher summary (median of 31 runs of {OVERHEAD_N} requests, one submitting thread)"
    );
    println!(
        "  no-op handler through the batcher: {:.0} ns per request (mean batch {:.1})",
        per(noop_t, OVERHEAD_N),
        stats.mean_batch_size
    );
    println!(
        "  mpsc worker, reply channel per request: {:.0} ns per request",
        per(mpsc_t, OVERHEAD_N)
    );

    let direct_t = median_of(5, || direct(WORK_N));
    let one = batcher_with(1, costly);
    let one_t = median_of(5, || through_batcher(&one, WORK_N));
    drop(one);
    let many = batcher_with(32, costly);
    let many_t = median_of(5, || through_batcher(&many, WORK_N));
    let s = many.stats();
    drop(many);
    println!("handler cost a + b·n (a = {A:?}, b = {B:?}), {WORK_N} requests (median of 5 runs):");
    for (name, t) in [
        ("direct, one at a time", direct_t),
        ("batcher, max_batch_size 1", one_t),
        ("batcher, max_batch_size 32", many_t),
    ] {
        println!(
            "  {name:<28} {:>8.2} ms  {:>7.0} requests/s  {:.2}× direct",
            t.as_secs_f64() * 1e3,
            WORK_N as f64 / t.as_secs_f64(),
            direct_t.as_secs_f64() / t.as_secs_f64()
        );
    }
    println!(
        "  batched run: mean batch {:.1}, queue time p50 {:?}, p99 {:?}",
        s.mean_batch_size, s.queue_time_p50, s.queue_time_p99
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}
