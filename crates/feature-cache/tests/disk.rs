//! The disk tier: atomic writes, stale sweep, corruption, disk faults, and
//! crash safety against a killed writer process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feature_cache::{DiskConfig, DiskStore, FeatureCache, JsonCodec};

fn config(dir: &Path, schema: &str) -> DiskConfig {
    DiskConfig {
        dir: dir.to_owned(),
        schema: schema.into(),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        ..DiskConfig::default()
    }
}

fn entry_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "entry"))
        .collect();
    v.sort();
    v
}

fn tiered(store: Arc<DiskStore>) -> FeatureCache<String, Vec<u32>> {
    FeatureCache::builder()
        .capacity(100)
        .disk(store, JsonCodec)
        .build()
        .unwrap()
}

#[test]
fn memory_then_disk_then_build() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(config(dir.path(), "v1")).unwrap());
    let builds = AtomicUsize::new(0);
    let build = || {
        builds.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(vec![1u32, 2, 3])
    };
    let cache = tiered(store.clone());
    assert_eq!(
        cache.get_or_insert_with("a".into(), build).unwrap(),
        vec![1, 2, 3]
    );
    assert_eq!(store.stats().writes, 1);
    // A fresh memory tier (a restart) finds it on disk: no rebuild.
    let store = Arc::new(DiskStore::open(config(dir.path(), "v1")).unwrap());
    let cache = tiered(store.clone());
    assert_eq!(
        cache.get_or_insert_with("a".into(), build).unwrap(),
        vec![1, 2, 3]
    );
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().disk_hits, 1);
    // Explicit removal reaches the disk too.
    cache.remove(&"a".to_string());
    assert_eq!(store.stats().entries, 0);
}

#[test]
fn stale_schema_and_temp_files_are_swept_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(config(dir.path(), "minilm@1")).unwrap();
    store.put("k1", b"old", Duration::ZERO).unwrap();
    store.put("k2", b"old", Duration::ZERO).unwrap();
    drop(store);
    std::fs::write(dir.path().join("0000.entry.1.2.tmp"), b"half").unwrap();
    let store = DiskStore::open(config(dir.path(), "minilm@2")).unwrap();
    let s = store.stats();
    assert_eq!((s.stale_removed, s.temp_removed, s.entries), (2, 1, 0));
    assert!(store.get("k1").is_none());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "directory emptied"
    );
}

#[test]
fn corrupt_and_truncated_entries_are_misses_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(config(dir.path(), "s")).unwrap());
    store
        .put(
            "flip",
            &serde_json::to_vec(&vec![7u32; 100]).unwrap(),
            Duration::ZERO,
        )
        .unwrap();
    store
        .put(
            "cut",
            &serde_json::to_vec(&vec![8u32; 100]).unwrap(),
            Duration::ZERO,
        )
        .unwrap();
    let files = entry_files(dir.path());
    assert_eq!(files.len(), 2);
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        let is_flip = bytes.windows(4).any(|w| w == b"flip");
        if is_flip {
            let n = bytes.len();
            bytes[n - 3] ^= 0x55; // a payload byte
        } else {
            bytes.truncate(bytes.len() / 2);
        }
        std::fs::write(f, bytes).unwrap();
    }
    let cache = tiered(store.clone());
    let v = cache
        .get_or_insert_with("flip".into(), || Ok::<_, std::io::Error>(vec![1]))
        .unwrap();
    assert_eq!(v, vec![1], "corrupt entry never returned");
    let v = cache
        .get_or_insert_with("cut".into(), || Ok::<_, std::io::Error>(vec![2]))
        .unwrap();
    assert_eq!(v, vec![2], "truncated entry never returned");
    assert_eq!(store.stats().corrupt_removed, 2);
    // Rebuilt entries were written back whole.
    let fresh = DiskStore::open(config(dir.path(), "s")).unwrap();
    assert_eq!(fresh.get("flip").unwrap().1, b"[1]");
    assert_eq!(fresh.get("cut").unwrap().1, b"[2]");

    // Truncated files found at open are removed too.
    let f = &entry_files(dir.path())[0];
    let len = std::fs::metadata(f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(f)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let reopened = DiskStore::open(config(dir.path(), "s")).unwrap();
    assert_eq!(reopened.stats().corrupt_removed, 1);
    assert_eq!(reopened.stats().entries, 1);
}

#[test]
fn unwritable_directory_degrades_to_memory_and_recovers() {
    // Tests may run as root, which ignores permission bits; replacing the
    // directory with a regular file makes every write fail for any user.
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let store = Arc::new(DiskStore::open(config(&dir, "s")).unwrap());
    let cache = tiered(store.clone());
    cache
        .get_or_insert_with("before".into(), || Ok::<_, std::io::Error>(vec![1]))
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();

    for i in 0..20u32 {
        let key = format!("k{i}");
        let v = cache
            .get_or_insert_with(key.clone(), || Ok::<_, std::io::Error>(vec![i]))
            .unwrap();
        assert_eq!(v, vec![i]);
        assert_eq!(cache.get(&key), Some(vec![i]), "memory tier keeps serving");
    }
    let s = store.stats();
    assert!(s.degraded, "{s:?}");
    assert!(s.errors >= 1);
    // Once the backoff (at most `retry_max`, 100 ms) has run out, a write is
    // the retry: the disk is still broken, so it fails, counts an error,
    // keeps the store degraded and stores nothing.
    std::thread::sleep(Duration::from_millis(150));
    let errors = s.errors;
    let err = store.put("direct", b"x", Duration::ZERO);
    assert!(err.is_err(), "a write to a broken disk reported success");
    let s = store.stats();
    assert!(s.degraded, "{s:?}");
    assert_eq!(s.errors, errors + 1, "{s:?}");
    assert!(store.get("direct").is_none());

    // The disk comes back: after the backoff a retry succeeds.
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = store.put("after", b"[9]", Duration::ZERO);
        if !store.is_degraded() {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(store.get("after").unwrap().1, b"[9]");
}

#[test]
fn byte_budget_evicts_least_recently_used_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "s");
    cfg.max_bytes = 3 * (52 + 2 + 100);
    let store = DiskStore::open(cfg).unwrap();
    for k in ["k0", "k1", "k2"] {
        store.put(k, &[0u8; 100], Duration::ZERO).unwrap();
    }
    assert!(store.get("k0").is_some()); // k1 is now least recently used
    store.put("k3", &[0u8; 100], Duration::ZERO).unwrap();
    assert!(store.get("k1").is_none());
    assert!(store.get("k0").is_some() && store.get("k2").is_some() && store.get("k3").is_some());
    assert!(store.stats().bytes <= 3 * 154);
    assert_eq!(entry_files(dir.path()).len(), 3);
}

const WRITER_ENV: &str = "FEATURE_CACHE_CRASH_WRITER_DIR";

fn payload(key: &str) -> Vec<u8> {
    // Large enough that a kill often lands mid-write.
    key.as_bytes()
        .iter()
        .cycle()
        .take(64 * 1024)
        .copied()
        .collect()
}

/// In writer mode (run as a child by `crash_safety`), writes entries for
/// ever and prints each key once its put returned.
#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var(WRITER_ENV) else {
        return; // Only meaningful as the child process.
    };
    let round: u32 = std::env::var("FEATURE_CACHE_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let store = DiskStore::open(config(Path::new(&dir), "crash")).unwrap();
    for i in 0.. {
        let key = format!("r{round}-k{i}");
        store.put(&key, &payload(&key), Duration::ZERO).unwrap();
        println!("DONE {key}");
    }
}

#[test]
fn crash_safety_killed_writer_loses_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut written: Vec<String> = Vec::new();
    let started = Instant::now();
    for round in 0..20u32 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, dir.path())
            .env("FEATURE_CACHE_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Let it complete a few writes (varying per round), then kill it mid-stream.
        let want = 3 + (round as usize * 7) % 11;
        let mut got = 0;
        while got < want {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(k) = line.strip_prefix("DONE ") {
                        written.push(k.to_owned());
                        got += 1;
                    }
                }
                _ => break,
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "writer too slow"
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines already printed before the kill also count as written.
        for line in lines.map_while(Result::ok) {
            if let Some(k) = line.strip_prefix("DONE ") {
                written.push(k.to_owned());
            }
        }
    }
    assert!(written.len() >= 20 * 3);
    let store = DiskStore::open(config(dir.path(), "crash")).unwrap();
    let s = store.stats();
    assert_eq!(
        s.corrupt_removed, 0,
        "no half entry ever became visible: {s:?}"
    );
    for key in &written {
        let (h, bytes) = store
            .get(key)
            .unwrap_or_else(|| panic!("{key} was written but is missing"));
        assert_eq!(&h.key, key);
        assert_eq!(bytes, payload(key), "{key} differs");
    }
    // Every file left is a whole entry of some key.
    for f in entry_files(dir.path()) {
        assert!(std::fs::metadata(&f).unwrap().len() > 64 * 1024);
    }
    assert_eq!(store.stats().corrupt_removed, 0);
}
