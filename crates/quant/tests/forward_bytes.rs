//! [`quant::forward_into_bytes`] against the bytes [`QLinear::forward_into`]
//! really allocates, counted by a counting global allocator, at the shapes
//! all-MiniLM-L6-v2 uses (inputs padded to 512, and the FFN's 1536 → 384).
//!
//! How many AMX blocks candle computes at once depends on its thread count,
//! fixed when candle first runs, so the test runs itself twice in child
//! processes: with one candle thread (a call's peak is then exactly what the
//! formula says on candle's tiled kernels) and with two (the peak is the
//! formula less the blocks that did not happen to overlap, never more).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Device, Tensor};
use mem_budget::RepackRules;
use quant::{
    candle_blocks_in_flight, forward_into_bytes, Format, LinearScratch, QLinear,
    CANDLE_TENSOR_BYTES,
};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counters are
// only observed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live =
                LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed) + layout.size() as u64;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = (new_size - layout.size()) as u64;
                let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub((layout.size() - new_size) as u64, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The peak growth of the bytes allocated while `f` runs.
fn peak_of(f: impl FnOnce()) -> u64 {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - live
}

const CHILD: &str = "QUANT_FORWARD_BYTES_CHILD";
const TEST: &str = "forward_into_allocates_what_forward_into_bytes_says";

#[test]
fn forward_into_allocates_what_forward_into_bytes_says() {
    if let Ok(threads) = std::env::var(CHILD) {
        let threads: usize = threads.parse().expect("a thread count");
        measure(threads);
        return;
    }
    for threads in [1, 2] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
            .env(CHILD, threads.to_string())
            .env("CANDLE_NUM_THREADS", threads.to_string())
            // Q8_0 on candle's path too (the int8 kernel has its own test).
            .env("SNUG_INT8_KERNEL", "0")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{threads} candle threads:\n{text}");
        // The child really ran the measurements (not filtered away).
        assert!(
            text.contains("measured"),
            "{threads} candle threads:\n{text}"
        );
    }
}

fn measure(threads: usize) {
    let rules = RepackRules::this_cpu();
    // The bookkeeping of one 2-D tensor beside its data.
    let x = vec![0.5f32; 70 * 512];
    let before = LIVE.load(Ordering::Relaxed);
    let t = Tensor::from_slice(&x, (70, 512), &Device::Cpu).unwrap();
    assert_eq!(
        LIVE.load(Ordering::Relaxed) - before,
        4 * 70 * 512 + CANDLE_TENSOR_BYTES
    );
    drop(t);
    assert_eq!(candle_blocks_in_flight(64), threads.min(2) as u64);
    assert!(!quant::int8_kernel_available());
    let mut cases = 0;
    for (out, inp) in [(1152, 512), (384, 512), (1536, 512), (384, 1536), (40, 512)] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, out, &Device::Cpu).unwrap();
        for format in [
            Format::Q4_K,
            Format::Q6_K,
            Format::Q8_0,
            Format::Q4_0,
            Format::F16,
        ] {
            let layer = QLinear::from_f32(w.clone(), Some(b.clone()), format).unwrap();
            assert!(!layer.int8_kernel());
            let f = forward_into_bytes(format, out, inp);
            for rows in [1, 3, 31, 32, 33, 64, 70, 223] {
                let x = vec![0.25f32; rows * inp];
                let mut y = vec![0f32; rows * out];
                let mut scratch = LinearScratch::new();
                // The first call builds candle's repacked copy of the
                // weight (kept: the resident weight, not the call's).
                layer.forward_into(&x, rows, &mut y, &mut scratch).unwrap();
                let want = f.transient_for(rows);
                // Candle's tiled kernels (x86: Q4_K, batched Q6_K, and Q8_0
                // with VNNI, for outputs a multiple of 16) allocate exactly
                // the formula's buffers; its other kernels quantize the
                // input into a buffer they keep per thread, less than that.
                let tiled = rules.x86_tiles
                    && out.is_multiple_of(16)
                    && match format {
                        Format::Q4_K => true,
                        Format::Q6_K => rows > 1,
                        Format::Q8_0 => rules.x86_vnni,
                        _ => false,
                    };
                let blocks = candle_blocks_in_flight(rows.min(64));
                for _ in 0..4 {
                    let got = peak_of(|| {
                        layer.forward_into(&x, rows, &mut y, &mut scratch).unwrap();
                    });
                    let what = format!("{format} {out}x{inp}, {rows} rows, {threads} threads");
                    assert!(
                        got <= want,
                        "{what}: {got} bytes allocated, {want} estimated"
                    );
                    if tiled {
                        // Every buffer is counted; with several threads
                        // the AMX blocks may or may not overlap.
                        let missing = want - got;
                        let exact = match f.per_block {
                            0 => missing == 0,
                            b => missing.is_multiple_of(b) && missing / b < blocks.max(1),
                        };
                        assert!(
                            exact,
                            "{what}: {got} bytes allocated, {want} estimated ({} per AMX block)",
                            f.per_block
                        );
                    }
                    cases += 1;
                }
            }
        }
    }
    // AMX where the CPU has it: 32 rows and more of the 384 × 1536 Q4_K
    // matrix take the repacked activations of each block.
    let ffn = forward_into_bytes(Format::Q4_K, 384, 1536);
    if rules.x86_amx {
        assert_eq!(ffn.per_block, 32 * (1536 + 16));
    } else {
        assert_eq!(ffn.per_block, 0);
    }
    println!("measured {cases} calls");
}
