//! The runtime end to end, on the real all-MiniLM-L6-v2 (fetched by
//! `scripts/fetch-model.sh`, which `scripts/test.sh` runs first).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runtime::router::Tier;
use runtime::{Error, LoadEvent, Reoptimized, Runtime, RuntimeConfig};

fn model_dir() -> std::path::PathBuf {
    models::model_dir().unwrap_or_else(|e| panic!("{e}"))
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Memory readings a test sets by hand.
#[derive(Debug)]
struct ScriptedProbe(Mutex<hw_detect::MemoryInfo>);

impl ScriptedProbe {
    fn new(total: u64, available: u64) -> Arc<Self> {
        Arc::new(ScriptedProbe(Mutex::new(hw_detect::MemoryInfo::new(
            total, available, 0, 0, None,
        ))))
    }
    fn set_available(&self, available: u64) {
        let mut m = self.0.lock().unwrap();
        *m = hw_detect::MemoryInfo::new(m.total, available, 0, 0, None);
    }
}

impl hw_detect::MemoryProbe for ScriptedProbe {
    fn memory(&self) -> hw_detect::Result<hw_detect::MemoryInfo> {
        Ok(*self.0.lock().unwrap())
    }
}

/// A config asking for f32 weights under a model cap halfway between the
/// Q8_0 and f32 estimates, and that cap.
fn f32_asked_under_a_cap_that_only_q8_fits() -> (RuntimeConfig, u64) {
    let dir = model_dir();
    let estimate = |f| runtime::minilm_estimate(&dir, f, 4096).unwrap().total;
    let (f32_bytes, q8_bytes) = (estimate(quant::Format::F32), estimate(quant::Format::Q8_0));
    assert!(q8_bytes < f32_bytes, "q8 {q8_bytes} < f32 {f32_bytes}");
    let cap = (q8_bytes + f32_bytes) / 2;
    let mut c = config();
    c.format = Some(quant::Format::F32);
    c.budget.max_model = Some(cap);
    (c, cap)
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        configure_global_pool: false,
        ..RuntimeConfig::default()
    }
}

fn minilm_runtime(config: RuntimeConfig) -> Runtime {
    Runtime::builder()
        .config(config)
        .minilm(model_dir())
        .build()
        .unwrap()
}

#[test]
fn without_a_model_the_rule_based_tier_answers() {
    let rt = Runtime::builder()
        .config(config())
        .without_local_model()
        .build()
        .unwrap();
    let out = rt
        .embed(&[
            "a cat sits on the mat",
            "a cat sat on a mat",
            "stock prices fell",
        ])
        .unwrap();
    assert_eq!(out.tier, Some(Tier::RuleBased));
    assert_eq!(out.vectors.len(), 3);
    assert!(cos(&out.vectors[0], &out.vectors[1]) > cos(&out.vectors[0], &out.vectors[2]));
    // Rule-based answers are not cached as if they were the model's.
    assert_eq!(rt.embed(&["a cat sits on the mat"]).unwrap().cache_hits, 0);
}

#[test]
fn minilm_serves_and_the_cache_answers_repeats() {
    let rt = minilm_runtime(config());
    let texts = [
        "How is the weather today?",
        "What is the weather like today?",
        "The stock market fell sharply.",
    ];
    let out = rt.embed(&texts).unwrap();
    assert_eq!(out.tier, Some(Tier::Small));
    assert_eq!(out.backend.as_deref(), Some("minilm"));
    assert_eq!(out.cache_hits, 0);
    for v in &out.vectors {
        assert_eq!(v.len(), 384);
        assert!((cos(v, v) - 1.0).abs() < 1e-3, "unit vectors");
    }
    assert!(cos(&out.vectors[0], &out.vectors[1]) > 0.7);
    assert!(cos(&out.vectors[0], &out.vectors[2]) < 0.3);

    let again = rt.embed(&texts).unwrap();
    assert_eq!(again.cache_hits, 3);
    assert_eq!(again.vectors, out.vectors);
    let partly = rt
        .embed(&["How is the weather today?", "An entirely new sentence."])
        .unwrap();
    assert_eq!(partly.cache_hits, 1);
    assert_eq!(partly.vectors[0], out.vectors[0]);
    // Each of the 4 hits saved what its text cost the model to embed.
    let stats = rt.status().cache;
    assert_eq!(stats.hits, 4);
    assert!(
        stats.time_saved > Duration::ZERO,
        "4 hits of computed values saved {:?}",
        stats.time_saved
    );

    // The same texts through the model directly agree with the runtime.
    let direct =
        models::MiniLm::load(model_dir(), &models::LoadOptions::uniform(rt.plan().format)).unwrap();
    let d = direct.embed(&texts).unwrap();
    for (a, b) in d.iter().zip(&out.vectors) {
        assert!(cos(a, b) > 0.9999);
    }
}

#[test]
fn bad_requests_get_clear_errors() {
    let rt = Runtime::builder()
        .config(config())
        .without_local_model()
        .build()
        .unwrap();
    let err = rt.embed(&[]).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let long = "word ".repeat(100_000);
    let err = rt.embed(&[long.as_str()]).unwrap_err().to_string();
    assert!(
        err.contains("500000 bytes") && err.contains("262144") && err.contains("Chunker"),
        "{err}"
    );
    let many = vec!["x"; 5000];
    let err = rt.embed(&many).unwrap_err().to_string();
    assert!(err.contains("5000 texts") && err.contains("4096"), "{err}");
}

#[test]
fn status_reports_cpu_as_a_number_from_the_first_call() {
    let rt = minilm_runtime(config());
    let first = rt.status();
    let cpu = first.cpu_percent.expect("/proc/stat is readable here");
    assert!((0.0..=100.0).contains(&cpu), "{cpu}");
    let json = serde_json::to_value(&first).unwrap();
    assert!(json["cpu_percent"].is_f64(), "{}", json["cpu_percent"]);
    assert!(rt.status().cpu_percent.is_some());
}

#[test]
fn a_budget_too_small_for_f32_loads_a_smaller_format() {
    let (c, cap) = f32_asked_under_a_cap_that_only_q8_fits();
    let rt = minilm_runtime(c);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    rt.on_load_event(move |e| sink.lock().unwrap().push(e.clone()));
    let out = rt.embed(&["memory is short on this machine"]).unwrap();
    assert_eq!(out.tier, Some(Tier::Small));
    let status = rt.status();
    let m = status.models.iter().find(|m| m.name == "minilm").unwrap();
    assert_ne!(m.variant.as_deref(), Some("f32"));
    assert!(m.reserved_bytes <= cap);
    let events = events.lock().unwrap();
    let stages: Vec<&str> = events
        .iter()
        .map(|e| match e {
            LoadEvent::Reading { .. } => "reading",
            LoadEvent::Quantizing { .. } => "quantizing",
            LoadEvent::Warming { .. } => "warming",
            LoadEvent::Ready { .. } => "ready",
            _ => "other",
        })
        .collect();
    assert_eq!(stages, ["reading", "quantizing", "warming", "ready"]);
}

#[test]
fn when_no_format_fits_the_rule_based_tier_answers_every_request() {
    let mut c = config();
    c.budget.max_model = Some(8 << 20);
    let rt = minilm_runtime(c);
    let err = rt.load("minilm").unwrap_err().to_string();
    assert!(
        err.contains("does not fit") && err.contains("MiB") && err.contains("model cap"),
        "{err}"
    );
    let texts: Vec<String> = (0..40).map(|i| format!("request number {i}")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let out = rt.embed(&refs).unwrap();
    assert_eq!(out.vectors.len(), 40);
    assert_eq!(out.tier, Some(Tier::RuleBased));
    assert!(
        out.trail.iter().any(|t| t.contains("minilm")),
        "{:?}",
        out.trail
    );
    assert_eq!(
        rt.ledger()
            .stats()
            .category(mem_budget::Category::Model)
            .used,
        0
    );
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_its_own_answer() {
    let rt = minilm_runtime(config());
    let texts: Vec<String> = snug_sentences(64);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let reference =
        models::MiniLm::load(model_dir(), &models::LoadOptions::uniform(rt.plan().format))
            .unwrap()
            .embed(&refs)
            .unwrap();
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let rt = rt.clone();
            let texts = texts.clone();
            std::thread::spawn(move || {
                (0..8)
                    .map(|i| {
                        let k = t * 8 + i;
                        let out = rt.embed(&[texts[k].as_str()]).unwrap();
                        (k, out.vectors.into_iter().next().unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = 0;
    for h in handles {
        for (k, v) in h.join().unwrap() {
            assert!(
                cos(&v, &reference[k]) > 0.999,
                "text {k} got another text's answer"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 64);
    let status = rt.status();
    let b = status.models[0].batcher.as_ref().unwrap();
    assert_eq!(
        b.items_batched, 64,
        "every request went through the batcher once"
    );
    assert!(b.batches <= 64);
}

fn snug_sentences(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "sentence {i} talks about topic {} with some words",
                i * 7 % 13
            )
        })
        .collect()
}

#[test]
fn emergency_cleanup_frees_idle_models_and_is_rate_limited() {
    let mut c = config();
    c.emergency_min_interval = Duration::from_secs(60);
    let rt = minilm_runtime(c);
    rt.embed(&["fill the cache", "and load the model"]).unwrap();
    assert!(rt.status().cache.entries >= 2);
    let report = rt.emergency_cleanup().unwrap();
    assert_eq!(report.models_unloaded, vec!["minilm".to_string()]);
    assert!(report.reserved_bytes_released > 0);
    assert!(report.cache_entries_cleared >= 2);
    assert_eq!(rt.status().cache.entries, 0);
    assert_eq!(
        rt.ledger()
            .stats()
            .category(mem_budget::Category::Model)
            .used,
        0
    );
    match rt.emergency_cleanup() {
        Err(Error::RateLimited { retry_after }) => assert!(retry_after > Duration::from_secs(50)),
        other => panic!("expected rate limiting, got {other:?}"),
    }
    // Requests keep working: the model loads again on demand.
    assert_eq!(
        rt.embed(&["after the emergency"]).unwrap().tier,
        Some(Tier::Small)
    );
}

#[test]
fn pinned_models_survive_cleanup_and_idle_ones_unload_after_keep_alive() {
    let mut c = config();
    c.keep_alive = Duration::from_millis(300);
    let rt = minilm_runtime(c);
    rt.load("minilm").unwrap();
    rt.pin("minilm").unwrap();
    let report = rt.emergency_cleanup().unwrap();
    assert!(report.models_unloaded.is_empty());
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        rt.status().models[0].state,
        "loaded",
        "pinned: kept past keep-alive"
    );
    rt.unpin("minilm").unwrap();
    // The keep-alive thread unloads it; the reservation goes with the
    // model's memory, a moment after the slot reads "unloaded".
    let start = Instant::now();
    let reserved = || {
        rt.ledger()
            .stats()
            .category(mem_budget::Category::Model)
            .used
    };
    while rt.status().models[0].state == "loaded" || reserved() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "idle model was never unloaded and released: state {}, {} bytes reserved",
            rt.status().models[0].state,
            reserved()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn warmup_loads_in_the_background() {
    let rt = minilm_runtime(config());
    assert_eq!(rt.status().models[0].state, "unloaded");
    let handle = rt.warmup(&["minilm"]).unwrap();
    // A user request meanwhile is answered by the local model: it waits
    // for the same load rather than falling to the rule-based tier.
    let during = rt.embed(&["during warm-up"]).unwrap();
    assert_eq!(during.vectors.len(), 1);
    assert_eq!(during.tier, Some(Tier::Small), "{:?}", during.trail);
    let results = handle.join().unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(rt.status().models[0].state, "loaded");
    assert!(matches!(
        rt.warmup(&["no-such-model"]),
        Err(Error::UnknownModel { .. })
    ));
}

#[test]
fn reoptimize_follows_free_memory() {
    let gib = 1u64 << 30;
    let probe = ScriptedProbe::new(16 * gib, 12 * gib);
    let profile = hw_detect::HardwareProfile::detect().unwrap();
    let rt = Runtime::builder()
        .config(config())
        .profile(profile)
        .memory_probe(probe.clone())
        .without_local_model()
        .build()
        .unwrap();
    assert_eq!(rt.reoptimize().unwrap(), Reoptimized::Optimal);
    let before = rt.plan();
    probe.set_available(2 * gib + gib / 2);
    match rt.reoptimize().unwrap() {
        Reoptimized::Adjusted { previous, new } => {
            assert_eq!(previous.batch_tokens, before.batch_tokens);
            assert!(
                new.batch_tokens < previous.batch_tokens,
                "{} < {}",
                new.batch_tokens,
                previous.batch_tokens
            );
            assert!(new.cache_bytes < previous.cache_bytes);
            assert_eq!(rt.cache().capacity(), new.cache_bytes);
        }
        Reoptimized::Optimal => panic!("less memory must change the plan"),
    }
    probe.set_available(12 * gib);
    assert!(matches!(
        rt.reoptimize().unwrap(),
        Reoptimized::Adjusted { .. }
    ));
    assert_eq!(rt.plan().batch_tokens, before.batch_tokens);
}

#[test]
fn estimate_answers_before_work_starts() {
    let rt = minilm_runtime(config());
    let e = rt
        .estimate(&[
            "a short sentence",
            "another one that is a little bit longer",
        ])
        .unwrap();
    assert_eq!(e.texts, 2);
    assert!(e.tokens >= 10 && e.longest <= e.tokens);
    assert!(e.estimate.fits);
    assert_eq!(e.estimate.recommendation, "OK");
    assert!(e.estimate.bytes > 0);
}

#[test]
fn plan_is_printable_and_serialisable() {
    let rt = Runtime::builder()
        .config(config())
        .without_local_model()
        .build()
        .unwrap();
    let plan = rt.plan();
    let text = plan.to_string();
    assert!(
        text.contains("hardware class") && text.contains("threads"),
        "{text}"
    );
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["threads"], plan.threads);
    assert!(json["budget"]["max_model"].as_u64().unwrap() > 0);
}

#[test]
fn under_a_tight_cap_the_smaller_format_serves_every_concurrent_request() {
    let (c, _) = f32_asked_under_a_cap_that_only_q8_fits();
    let rt = minilm_runtime(c);
    let texts = snug_sentences(48);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let rt = rt.clone();
            let texts = texts.clone();
            std::thread::spawn(move || {
                (0..6)
                    .map(|i| {
                        let out = rt.embed(&[texts[t * 6 + i].as_str()]).unwrap();
                        (out.backend.clone(), out.trail.clone())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for (backend, trail) in h.join().unwrap() {
            assert_eq!(backend.as_deref(), Some("minilm"), "{trail:?}");
        }
    }
}

/// A container of `limit` bytes on a large machine, `used` of it in use.
fn container(limit: u64, used: u64) -> (hw_detect::HardwareProfile, Arc<ScriptedProbe>) {
    let mut profile = hw_detect::HardwareProfile::detect().unwrap();
    let cg = hw_detect::CgroupMemory {
        version: hw_detect::CgroupVersion::V1,
        limit: Some(limit),
        usage: Some(used),
    };
    profile.memory = hw_detect::MemoryInfo::new(24 << 30, 20 << 30, 0, 0, Some(cg));
    profile.class = hw_detect::HardwareClass::Constrained;
    let probe = Arc::new(ScriptedProbe(Mutex::new(profile.memory)));
    (profile, probe)
}

#[test]
fn a_small_container_loads_the_model_by_need_not_by_class_ratio() {
    // 320 MiB: the class ratio would allow the model 80 MiB (no format fits
    // that); planned by need, the most precise format that fits loads.
    let (profile, probe) = container(320 << 20, 16 << 20);
    let rt = Runtime::builder()
        .config(config())
        .profile(profile)
        .memory_probe(probe)
        .minilm(model_dir())
        .build()
        .unwrap();
    assert_eq!(
        rt.plan().budget.reserved_os,
        0,
        "the OS lives outside the cgroup"
    );
    let out = rt
        .embed(&["a small container still runs the model"])
        .unwrap();
    assert_eq!(out.tier, Some(Tier::Small), "{:?}", out.trail);
    let status = rt.status();
    let m = status.models.iter().find(|m| m.name == "minilm").unwrap();
    let variant = m.variant.clone().unwrap();
    // The first format in the order whose estimate fits 320 MiB less the margin.
    let free = (320u64 << 20) - (16 << 20) - rt.plan().budget.safety_margin;
    let dir = model_dir();
    let expected = [quant::Format::F32, quant::Format::Q8_0, quant::Format::Q4_K]
        .into_iter()
        .find(|&f| {
            runtime::minilm_estimate(&dir, f, rt.plan().batch_tokens)
                .unwrap()
                .total
                <= free
        })
        .unwrap();
    assert_eq!(variant, runtime::variant_label(expected));
}

#[test]
fn the_estimate_needs_no_loaded_model_and_grows_with_the_batch() {
    let rt = minilm_runtime(config());
    let one = rt.estimate(&["a short text"]).unwrap();
    let texts = vec!["a somewhat longer text with more words in it than the first"; 64];
    let many = rt.estimate(&texts).unwrap();
    assert_eq!(
        rt.status().models[0].state,
        "unloaded",
        "estimate loads nothing"
    );
    assert!(many.estimate.bytes > one.estimate.bytes);
    assert_eq!(many.texts, 64);
    assert!(many.longest > one.longest);
}

#[test]
fn an_mmap_threshold_malloc_cannot_take_is_refused_with_its_limit() {
    for bad in [0, 64 << 20] {
        let r = Runtime::builder()
            .config(RuntimeConfig {
                mmap_threshold: bad,
                ..config()
            })
            .without_local_model()
            .build();
        match r {
            Err(runtime::Error::InvalidConfig {
                field,
                value,
                expected,
            }) => {
                assert_eq!(field, "mmap_threshold");
                assert_eq!(value, bad.to_string());
                assert!(expected.contains("33554432"), "{expected}");
            }
            other => panic!("mmap_threshold {bad}: expected InvalidConfig, got {other:?}"),
        }
    }
    // Turned off, the threshold is not used, so it is not checked.
    Runtime::builder()
        .config(RuntimeConfig {
            release_freed_memory: false,
            mmap_threshold: 0,
            ..config()
        })
        .without_local_model()
        .build()
        .unwrap();
}
