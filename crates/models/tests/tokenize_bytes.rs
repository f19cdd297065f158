//! Calibration of the tokenizer's transient heap
//! ([`models::TOKENIZE_BYTES_PER_TOKEN`], [`models::TOKENIZE_BYTES_PER_TEXT_BYTE`]):
//! a counting allocator measures the peak of the bytes one
//! `MiniLmTokenizer::tokenize` holds, over seven kinds of text from 5 to
//! 1,000 words, and the bound must hold for every one; then for a batch of
//! mixed texts, tokenized in parallel.
//!
//! One test in this binary, so that no other test allocates while it
//! measures. Needs `scripts/fetch-model.sh minilm`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use models::{MiniLmTokenizer, TOKENIZE_BYTES_PER_TEXT_BYTE, TOKENIZE_BYTES_PER_TOKEN};

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn grew(by: u64) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are
// only observed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size() as u64);
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
                grew((new_size - layout.size()) as u64);
            } else {
                LIVE.fetch_sub((layout.size() - new_size) as u64, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Kinds of text, as word lists a text cycles through.
const KINDS: &[(&str, &[&str])] = &[
    (
        "plain",
        &[
            "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café",
            "résumé", "2024", "snug,", "memory.",
        ],
    ),
    (
        "cjk",
        &["東京", "は", "日本の", "首都", "です。", "北京", "上海"],
    ),
    ("emoji", &["🙂", "🚀🚀", "ok", "👍🏽", "x"]),
    ("digits", &["1234567", "3.14159", "42", "-7", "1e10"]),
    (
        "code",
        &[
            "fn", "main()", "{", "let", "x:", "Vec<u8>", "=", "vec![];", "}",
        ],
    ),
    (
        "accents",
        &["Ångström", "naïveté", "Éléonore", "Straße", "crème"],
    ),
    (
        "long words",
        &[
            "pneumonoultramicroscopicsilicovolcanoconiosis",
            "antidisestablishmentarianism",
        ],
    ),
];

fn text(words: &[&str], n: usize) -> String {
    (0..n)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// The peak growth of the bytes live while `f` runs.
fn peak_of<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    let out = f();
    (PEAK.load(Ordering::Relaxed).saturating_sub(live), out)
}

#[test]
fn the_transient_bound_holds_for_every_kind_of_text_and_for_a_batch() {
    let dir = models::model_dir().expect("models root");
    let tok = MiniLmTokenizer::load(&dir, None)
        .expect("MiniLM's tokenizer.json (run scripts/fetch-model.sh minilm)");
    // Rayon's threads start (and allocate) once, when its pool is first
    // used: before anything is measured.
    rayon::broadcast(|_| ());
    let mut worst_per_token = 0f64;
    let mut batch = Vec::new();
    for (kind, words) in KINDS {
        for n in [5usize, 20, 60, 200, 400, 1000] {
            let t = text(words, n);
            // A first call fills the tokenizer's lazily built state.
            let count = tok.count(&[t.as_str()]).unwrap()[0];
            let (peak, out) = peak_of(|| tok.tokenize(&[t.as_str()]).unwrap());
            assert_eq!(out[0].len(), count);
            drop(out);
            let bound = MiniLmTokenizer::transient_bytes(&[t.as_str()], &[count]);
            assert_eq!(
                bound,
                count as u64 * TOKENIZE_BYTES_PER_TOKEN
                    + t.len() as u64 * TOKENIZE_BYTES_PER_TEXT_BYTE
            );
            let per_token = (peak as f64 - (t.len() as u64 * TOKENIZE_BYTES_PER_TEXT_BYTE) as f64)
                / count as f64;
            worst_per_token = worst_per_token.max(per_token);
            eprintln!(
                "{kind:>10} {n:>4} words, {:>5} bytes, {count:>5} tokens: peak {peak:>7} B, bound {bound:>7} B ({per_token:.0} B a token beside {TOKENIZE_BYTES_PER_TEXT_BYTE} a byte)",
                t.len()
            );
            assert!(
                peak <= bound,
                "{kind}, {n} words ({} bytes, {count} tokens): tokenizing took {peak} bytes at its peak, above the bound {bound}",
                t.len()
            );
            if n <= 200 {
                batch.push(t);
            }
        }
    }
    eprintln!("costliest: {worst_per_token:.0} bytes a token (bound {TOKENIZE_BYTES_PER_TOKEN})");

    // A batch: texts tokenize in parallel, so up to one transient per
    // thread beside the encodings already finished.
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    let counts = tok.count(&refs).unwrap();
    let (peak, out) = peak_of(|| tok.tokenize(&refs).unwrap());
    drop(out);
    let all: u64 = counts.iter().map(|&n| n as u64).sum();
    let bound = MiniLmTokenizer::transient_bytes(&refs, &counts) + all * TOKENIZE_BYTES_PER_TOKEN;
    eprintln!(
        "batch of {} texts, {all} tokens: peak {peak} B, bound {bound} B",
        refs.len()
    );
    assert!(
        peak <= bound,
        "a batch of {} texts ({all} tokens) took {peak} bytes at its peak, above {bound}",
        refs.len()
    );
}
