//! Generation through the runtime on the real SmolLM2-135M (fetched by
//! `scripts/fetch-model.sh smollm2-135m`): streamed events, exactly one
//! final event, batching that does not change greedy answers, cancel and
//! drop freeing KV, KV admission that waits instead of failing, deadlines,
//! the Future interface, the rule-based tier, the models file.

use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use runtime::router::Tier;
use runtime::{
    Error, FinishReason, GenerateRequest, GenerationEvent, GenerativeSpec, Runtime, RuntimeConfig,
};

const SMOL: &str = "smollm2-135m";

fn smol_spec() -> GenerativeSpec {
    GenerativeSpec::fetched(SMOL, Tier::Small).unwrap_or_else(|e| panic!("{e}"))
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        configure_global_pool: false,
        ..RuntimeConfig::default()
    }
}

fn runtime_with(spec: GenerativeSpec) -> Runtime {
    Runtime::builder()
        .config(config())
        .without_local_model()
        .generative(spec)
        .build()
        .unwrap()
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_chat_streams_deltas_then_one_final_event() {
    let rt = runtime_with(smol_spec());
    let req = GenerateRequest::chat("What is the capital of France? Answer with one word.")
        .max_tokens(12);
    let generation = rt.generate(SMOL, req).unwrap();
    assert_eq!(generation.served().tier, Tier::Small);
    assert_eq!(generation.served().model, SMOL);
    let mut text = String::new();
    let mut tokens = 0;
    let mut finals = Vec::new();
    for e in generation {
        match e {
            GenerationEvent::Delta {
                text: t,
                tokens: ids,
            } => {
                assert!(finals.is_empty(), "a delta after the final event");
                text.push_str(&t);
                tokens += ids.len();
            }
            GenerationEvent::Finished(f) => finals.push(f),
        }
    }
    assert_eq!(finals.len(), 1);
    let f = &finals[0];
    assert!(
        matches!(f.reason, FinishReason::Stop | FinishReason::Length),
        "{f:?}"
    );
    assert_eq!(f.usage.completion_tokens, tokens);
    assert!(tokens > 0 && tokens <= 12, "{tokens} tokens");
    assert!(f.usage.prompt_tokens > 5);
    assert!(f.timings.time_to_first_token_ms.is_some());
    assert!(text.contains("Paris"), "{text:?}");
    // Its KV is freed once it has finished.
    let s = &rt.status().generative[0];
    assert_eq!((s.running, s.queued, s.kv_bytes_admitted), (0, 0, 0));
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(s.tokens_generated as usize, tokens);
}

#[test]
fn batched_greedy_answers_equal_the_answers_alone() {
    let rt = runtime_with(smol_spec());
    let prompts = [
        "Name three colours.",
        "What is two plus two?",
        "Write a word that rhymes with cat.",
        "Say hello in French.",
    ];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            rt.generate(SMOL, GenerateRequest::chat(*p).max_tokens(10))
                .unwrap()
                .wait()
                .text
        })
        .collect();
    // All four at once share steps (and a prefill chunk beside decodes).
    let together: Vec<_> = prompts
        .iter()
        .map(|p| {
            rt.generate(SMOL, GenerateRequest::chat(*p).max_tokens(10))
                .unwrap()
        })
        .collect();
    let together: Vec<String> = together.into_iter().map(|g| g.wait().text).collect();
    assert_eq!(alone, together);
    let engine = rt.status().generative[0].engine.clone().unwrap();
    assert!(
        engine.steps < engine.decode_tokens,
        "sequences shared steps"
    );
}

#[test]
fn cancel_and_drop_free_the_kv_before_the_next_step() {
    let rt = runtime_with(smol_spec());
    let status = |rt: &Runtime| rt.status().generative[0].clone();
    let mut g = rt
        .generate(
            SMOL,
            GenerateRequest::text("Once upon a time").max_tokens(400),
        )
        .unwrap();
    // Wait for text to flow, then cancel: the final event still comes.
    let first = g.next().unwrap();
    assert!(matches!(first, GenerationEvent::Delta { .. }));
    assert!(status(&rt).kv_blocks_used > 0);
    g.cancel();
    let last = g.by_ref().last().unwrap();
    match last {
        GenerationEvent::Finished(f) => {
            assert_eq!(f.reason, FinishReason::Cancelled);
            assert!(f.usage.completion_tokens < 400);
        }
        other => panic!("{other:?}"),
    }
    let s = status(&rt);
    assert_eq!(
        (s.running, s.kv_blocks_used, s.kv_bytes_admitted),
        (0, 0, 0)
    );

    // Dropping the handle cancels as well.
    let mut g = rt
        .generate(
            SMOL,
            GenerateRequest::text("Once upon a time").max_tokens(400),
        )
        .unwrap();
    g.next().unwrap();
    drop(g);
    eventually("the dropped sequence to leave", || {
        let s = status(&rt);
        s.running == 0 && s.kv_blocks_used == 0
    });
    assert_eq!(status(&rt).engine.unwrap().cancelled, 2);
    assert_eq!(rt.ledger().used(runtime::budget::Category::Activations), 0);
}

#[test]
fn kv_admission_waits_for_room_and_refuses_what_never_fits() {
    // A KV pool that holds one sequence of prompt + 48 tokens (about 64
    // positions in whole blocks), not two.
    let mut spec = smol_spec();
    let probe =
        runtime::models::decoder::Decoder::estimate(&spec.gguf, &spec.decoder, 1, 1).unwrap();
    let per_token = probe.kv_bytes_per_token.ceil() as usize;
    spec.decoder.kv_budget_bytes = per_token * 100;
    let rt = runtime_with(spec);
    rt.load(SMOL).unwrap();
    let req = || GenerateRequest::text("The weather today is").max_tokens(48);
    let a = rt.generate(SMOL, req()).unwrap();
    let b = rt.generate(SMOL, req()).unwrap();
    let (a, b) = (a.wait(), b.wait());
    for c in [&a, &b] {
        assert!(
            matches!(c.finished.reason, FinishReason::Stop | FinishReason::Length),
            "{:?}",
            c.finished
        );
    }
    assert_eq!(a.text, b.text, "greedy, same prompt");
    // The second waited in the queue while the first ran.
    let a_ran = a.finished.timings.total_ms - a.finished.timings.queued_ms;
    let b_waited = b.finished.timings.queued_ms;
    assert!(
        b_waited >= 0.5 * a_ran,
        "b waited {b_waited} ms, a ran {a_ran} ms"
    );

    // More than the whole pool: refused up front with the numbers.
    let e = rt
        .generate(SMOL, GenerateRequest::text("Hello").max_tokens(4000))
        .unwrap_err();
    assert!(
        matches!(e, Error::KvTooLarge { .. }) || e.to_string().contains("KV"),
        "{e}"
    );
}

#[test]
fn unknown_models_are_named_with_the_known_ones() {
    let rt = runtime_with(smol_spec());
    let e = rt
        .generate("gpt-17", GenerateRequest::chat("hi"))
        .unwrap_err();
    match &e {
        Error::UnknownModel { name, known } => {
            assert_eq!(name, "gpt-17");
            assert!(known.contains(&SMOL.to_string()), "{known:?}");
            assert!(known.contains(&runtime::AUTO.to_string()), "{known:?}");
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(SMOL), "{e}");
}

#[test]
fn a_deadline_ends_a_running_sequence() {
    let rt = runtime_with(smol_spec());
    rt.load(SMOL).unwrap();
    let mut req = GenerateRequest::text("Count to one thousand: 1, 2, 3,").max_tokens(2000);
    req.deadline = Some(Duration::from_millis(300));
    let c = rt.generate(SMOL, req).unwrap().wait();
    assert_eq!(
        c.finished.reason,
        FinishReason::Deadline,
        "{:?}",
        c.finished
    );
    assert!(
        c.finished.usage.completion_tokens > 0,
        "it ran before the deadline"
    );
    assert_eq!(rt.status().generative[0].kv_blocks_used, 0);
}

struct Flag(std::sync::atomic::AtomicUsize);
impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_generation_is_a_future_without_tokio() {
    let rt = runtime_with(smol_spec());
    let mut g = rt
        .generate(SMOL, GenerateRequest::chat("Say yes.").max_tokens(6))
        .unwrap();
    let flag = Arc::new(Flag(std::sync::atomic::AtomicUsize::new(0)));
    let waker = Waker::from(Arc::clone(&flag));
    let mut cx = Context::from_waker(&waker);
    let t = Instant::now();
    let completion = loop {
        match std::pin::Pin::new(&mut g).poll(&mut cx) {
            Poll::Ready(c) => break c,
            Poll::Pending => {
                assert!(t.elapsed() < Duration::from_secs(30), "never ready");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    assert!(completion.finished.usage.completion_tokens > 0);
    assert!(!completion.text.is_empty());
    assert!(
        flag.0.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the waker was woken"
    );
}

use std::future::Future;

#[test]
fn the_rule_based_tier_answers_labelled_when_no_model_can() {
    let spec = GenerativeSpec::new("broken", "/nonexistent/model.gguf", Tier::Small);
    let rt = runtime_with(spec);
    let c = rt
        .generate(runtime::AUTO, GenerateRequest::chat("hello"))
        .unwrap()
        .wait();
    assert_eq!(c.finished.served.tier, Tier::RuleBased);
    assert_eq!(c.finished.served.model, runtime::RULE_BASED);
    assert!(c.text.starts_with("[degraded answer"), "{}", c.text);
    assert!(
        c.finished.served.trail[0].contains("broken"),
        "{:?}",
        c.finished.served.trail
    );
    assert_eq!(c.finished.usage.completion_tokens, 0, "no model tokens");
}

#[test]
fn auto_picks_the_tier_by_complexity() {
    let rt = runtime_with(smol_spec());
    let easy = GenerateRequest::chat("Say hi.").max_tokens(4);
    assert_eq!(rt.generation_complexity(&easy, 5).tier, Tier::Small);
    let mut hard = easy.clone();
    hard.difficulty = Some(1.0);
    assert_eq!(rt.generation_complexity(&hard, 5).tier, Tier::Medium);
    // Only a small model is registered: a medium task is still served by
    // it (the nearest tier), and says so.
    let c = rt.generate(runtime::AUTO, hard).unwrap().wait();
    assert_eq!(c.finished.served.tier, Tier::Small);
    assert_eq!(c.finished.served.model, SMOL);
}

#[test]
fn the_models_file_registers_both_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = smol_spec().gguf;
    let minilm = runtime::models::model_dir().unwrap_or_else(|e| panic!("{e}"));
    let json = serde_json::json!({
        "embedding": [{ "name": "mini", "dir": minilm }],
        "generative": [{ "name": "smol", "gguf": gguf, "tier": "Small" }],
    });
    let path = dir.path().join("snug.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let rt = Runtime::builder()
        .config(config())
        .models_file(&path)
        .unwrap()
        .build()
        .unwrap();
    let names: Vec<String> = rt.models().into_iter().map(|m| m.name).collect();
    assert_eq!(names, vec!["mini".to_string(), "smol".to_string()]);
    // A file with a typo is an error naming the file.
    std::fs::write(&path, r#"{"generativ": []}"#).unwrap();
    let e = Runtime::builder().models_file(&path).unwrap_err();
    assert!(e.to_string().contains("snug.json"), "{e}");
}

/// A machine of 16 GiB whose free memory the test sets.
#[derive(Debug)]
struct Adjustable(std::sync::atomic::AtomicU64);

impl runtime::hw::MemoryProbe for Adjustable {
    fn memory(&self) -> runtime::hw::Result<runtime::hw::MemoryInfo> {
        let available = self.0.load(std::sync::atomic::Ordering::Relaxed);
        Ok(runtime::hw::MemoryInfo::new(
            16 << 30,
            available,
            0,
            0,
            None,
        ))
    }
}

/// A runtime serving `spec` on the [`Adjustable`] machine, 12 GiB free
/// until the test says otherwise.
fn runtime_with_memory(config: RuntimeConfig, spec: GenerativeSpec) -> (Runtime, Arc<Adjustable>) {
    let probe = Arc::new(Adjustable(std::sync::atomic::AtomicU64::new(12 << 30)));
    let rt = Runtime::builder()
        .config(config)
        .memory_probe(Arc::clone(&probe) as Arc<dyn runtime::hw::MemoryProbe>)
        .without_local_model()
        .generative(spec)
        .build()
        .unwrap();
    (rt, probe)
}

#[test]
fn critical_pressure_preempts_all_but_one_and_they_finish_as_if_never_stopped() {
    // Prefill chunks under 64 tokens, so the recomputation's attention takes
    // the path the first computation took (see the prefix test below).
    let mut spec = smol_spec();
    spec.engine.max_prefill_chunk = 32;
    let config = RuntimeConfig {
        monitor_interval: Duration::from_millis(10),
        ..config()
    };
    let (rt, probe) = runtime_with_memory(config, spec);
    // Plain continuations, which run to max_tokens.
    let prompts = [
        "Once upon a time, in a small village by the sea,",
        "The history of the printing press begins",
        "Here is a list of fruits: apple, banana,",
        "The weather today is",
    ];
    let req = |p: &str| GenerateRequest::text(p).max_tokens(40);
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| rt.generate(SMOL, req(p)).unwrap().wait())
        .collect();
    assert!(
        alone
            .iter()
            .all(|c| c.finished.reason == FinishReason::Length),
        "every prompt runs to max_tokens alone"
    );
    let status = |rt: &Runtime| rt.status().generative[0].clone();
    let before = status(&rt).tokens_generated;
    let together: Vec<_> = prompts
        .iter()
        .map(|p| rt.generate(SMOL, req(p)).unwrap())
        .collect();
    eventually("all four running and decoding", || {
        let s = status(&rt);
        s.running == 4 && s.tokens_generated >= before + 8
    });
    // 97% of memory in use: critical.
    probe
        .0
        .store(512 << 20, std::sync::atomic::Ordering::Relaxed);
    eventually("three preempted", || {
        let s = status(&rt);
        s.preempted >= 3 && s.running <= 1
    });
    assert_eq!(rt.status().pressure, runtime::PressureLevel::Critical);
    // While critical, no more than one runs.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(150) {
        let s = status(&rt);
        assert!(s.running <= 1, "{s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    probe
        .0
        .store(12 << 30, std::sync::atomic::Ordering::Relaxed);
    let done: Vec<_> = together.into_iter().map(|g| g.wait()).collect();
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.finished.reason, FinishReason::Length, "{:?}", c.finished);
        assert_eq!(c.finished.usage, alone[i].finished.usage);
        assert_eq!(
            c.text, alone[i].text,
            "prompt {i}: the recomputed sequence went on where it stopped"
        );
    }
    let s = status(&rt);
    assert!(s.recomputed_tokens > 0, "{s:?}");
    assert_eq!(s.engine.as_ref().unwrap().preempted, s.preempted);
    assert_eq!(
        (s.running, s.queued, s.kv_bytes_admitted, s.kv_blocks_used),
        (0, 0, 0, 0)
    );
}

#[test]
fn idle_kv_blocks_are_reused_when_the_machine_reads_them_as_used() {
    let mut spec = smol_spec();
    spec.engine.max_queue_wait = Duration::from_secs(3);
    let (rt, probe) = runtime_with_memory(config(), spec);
    let req =
        || GenerateRequest::text("Once upon a time, in a small village by the sea,").max_tokens(40);
    let first = rt.generate(SMOL, req()).unwrap();
    let kv = std::cell::Cell::new(0);
    eventually("the first sequence admitted", || {
        kv.set(kv.get().max(rt.status().generative[0].kv_bytes_admitted));
        kv.get() > 0
    });
    let kv_bytes = kv.get();
    let first = first.wait();
    assert_eq!(
        first.finished.reason,
        FinishReason::Length,
        "{:?}",
        first.finished
    );
    // Its blocks stay in the KV pool, resident: the machine now reads as
    // having only a quarter of one sequence's KV free above the margin.
    let margin = rt.ledger().budget().safety_margin;
    probe
        .0
        .store(margin + kv_bytes / 4, std::sync::atomic::Ordering::Relaxed);
    assert!(
        rt.ledger()
            .try_reserve(runtime::budget::Category::Activations, kv_bytes)
            .is_err(),
        "the machine has no room for a fresh sequence's KV"
    );
    // The same request again leases the idle blocks: it is admitted and
    // runs to its end instead of waiting for room that never comes.
    let second = rt.generate(SMOL, req()).unwrap().wait();
    assert_eq!(
        second.finished.reason,
        FinishReason::Length,
        "{:?}",
        second.finished
    );
    assert_eq!(second.finished.served.tier, Tier::Small);
    assert_eq!(second.text, first.text);
}

fn with_system(system: &str, user: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: runtime::Prompt::Chat(vec![
            models::Message::new("system", system),
            models::Message::new("user", user),
        ]),
        ..GenerateRequest::default()
    }
    .max_tokens(12)
}

#[test]
fn a_shared_system_prompt_is_computed_once_and_answers_do_not_change() {
    let system = "You are a careful assistant for a small library. You answer in one short \
                  sentence, you never invent facts, and when you do not know something you \
                  say so plainly. Keep a friendly tone and avoid jargon. The library opens at \
                  nine in the morning and closes at six in the evening, every day but Sunday.";
    let users = [
        "When does the library open?",
        "Is it open on Sunday?",
        "When does it close?",
    ];
    // Prefill chunks under 64 tokens: attention then takes the same path
    // whatever the chunk (steps of 64 rows or more of one sequence take
    // llama.cpp's f32 tiles instead, whose last digits differ), so a reused
    // prefix must give exactly the answers computed without it.
    let chunked = || {
        let mut spec = smol_spec();
        spec.engine.max_prefill_chunk = 32;
        spec
    };
    let mut off = chunked();
    off.prefix_cache_bytes = 0;
    let plain = runtime_with(off);
    let want: Vec<String> = users
        .iter()
        .map(|u| {
            plain
                .generate(SMOL, with_system(system, u))
                .unwrap()
                .wait()
                .text
        })
        .collect();
    assert_eq!(
        plain.status().generative[0].prefix_lookups,
        0,
        "prefix reuse is off"
    );
    drop(plain);

    let rt = runtime_with(chunked());
    let done: Vec<_> = users
        .iter()
        .map(|u| rt.generate(SMOL, with_system(system, u)).unwrap().wait())
        .collect();
    let got: Vec<String> = done.iter().map(|c| c.text.clone()).collect();
    assert_eq!(
        got, want,
        "answers after a cached prefix are the answers without it"
    );
    let prompts: usize = done.iter().map(|c| c.finished.usage.prompt_tokens).sum();
    let s = rt.status().generative[0].clone();
    assert_eq!(s.prefix_lookups, 3);
    assert_eq!(
        s.prefix_hits, 2,
        "the second and third reuse the first's system prompt"
    );
    // The system prompt is about 80 tokens: most of it is reused each time.
    assert!(s.prefix_tokens_saved >= 2 * 50, "{s:?}");
    assert!(s.prefix_bytes > 0);
    // With nothing running, what the ledger holds for activations is the
    // cached prefixes' reservation.
    let held = |rt: &Runtime| {
        rt.ledger()
            .stats()
            .category(runtime::budget::Category::Activations)
            .used
    };
    assert_eq!(held(&rt), s.prefix_bytes);
    assert_eq!(
        s.prompt_tokens + s.prefix_tokens_saved,
        prompts as u64,
        "the prompt tokens computed are the prompts' less the saved ones"
    );
    // An emergency drops the cached prefixes.
    let report = rt.emergency_cleanup().unwrap();
    assert_eq!(report.prefix_bytes_cleared, s.prefix_bytes);
    assert_eq!(rt.status().generative[0].prefix_bytes, 0);
    assert_eq!(held(&rt), 0);
}

/// KV bytes of `tokens` positions for `spec`'s decoder, as the step loop
/// counts them, and the prompt's length in tokens.
fn kv_bytes_and_prompt(spec: &GenerativeSpec, prompt: &str, tokens: &[usize]) -> (Vec<u64>, usize) {
    let d = runtime::models::decoder::Decoder::load(&spec.gguf, spec.decoder.clone()).unwrap();
    let step = spec
        .engine
        .max_step_tokens
        .min(spec.decoder.max_step_tokens);
    let t = runtime::models::Tokenizer::from_gguf_file(&spec.gguf).unwrap();
    let p = t.encode(prompt, true, false).unwrap().len();
    let bytes = tokens
        .iter()
        .map(|&n| d.kv_layout().sequence_bytes(p + n, step) as u64)
        .collect();
    (bytes, p)
}

#[test]
fn kv_is_held_as_the_sequence_grows_not_for_max_tokens() {
    let mut spec = smol_spec();
    spec.prefix_cache_bytes = 0;
    let prompt = "Once upon a time, in a small village by the sea,";
    let (max, long) = (400, 100);
    let (bytes, p) = kv_bytes_and_prompt(&spec, prompt, &[max, long]);
    let (full, hundred) = (bytes[0], bytes[1]);
    let rt = runtime_with(spec);
    let high = |rt: &Runtime| {
        rt.ledger()
            .stats()
            .category(runtime::budget::Category::Activations)
            .high_water
    };
    // An answer that stops early (at its first full stop) never held KV for
    // the 400 tokens it was allowed: at most its length and KV_GROW_TOKENS
    // more, in whole blocks.
    let c = rt
        .generate(
            SMOL,
            GenerateRequest {
                stop: vec![".".into()],
                ..GenerateRequest::text(prompt).max_tokens(max)
            },
        )
        .unwrap()
        .wait();
    assert_eq!(c.finished.reason, FinishReason::Stop, "{:?}", c.finished);
    let n = c.finished.usage.completion_tokens;
    let (near, _) = kv_bytes_and_prompt(&smol_spec(), prompt, &[n + runtime::KV_GROW_TOKENS, n]);
    assert!(
        high(&rt) <= near[0] && high(&rt) >= near[1] && high(&rt) < full / 4,
        "{n} tokens: held at most {} bytes; {} cover them and {} more, {full} the 400",
        high(&rt),
        near[1],
        near[0]
    );
    // One that runs on grows its hold to cover what it writes.
    let c = rt
        .generate(SMOL, GenerateRequest::text(prompt).max_tokens(long))
        .unwrap()
        .wait();
    assert_eq!(c.finished.reason, FinishReason::Length, "{:?}", c.finished);
    assert_eq!(high(&rt), hundred, "prompt of {p} + {long} tokens");
    let s = rt.status().generative[0].clone();
    assert_eq!((s.kv_bytes_admitted, s.running), (0, 0));
    assert_eq!(rt.ledger().used(runtime::budget::Category::Activations), 0);
}

#[test]
fn a_sequence_short_of_room_to_grow_preempts_the_latest_and_answers_do_not_change() {
    // Room for one sequence's whole length beside another's start, not for
    // two whole lengths: both are admitted, and when they outgrow the pool
    // the later one is preempted and recomputes after the first is done.
    let mut spec = smol_spec();
    spec.prefix_cache_bytes = 0;
    spec.engine.max_prefill_chunk = 32;
    let prompt = "Once upon a time, in a small village by the sea,";
    let max = 100;
    let (bytes, _) = kv_bytes_and_prompt(&spec, prompt, &[runtime::KV_GROW_TOKENS, max]);
    spec.decoder.kv_budget_bytes = (bytes[0] + bytes[1]) as usize;
    assert!(bytes[0] + bytes[1] < 2 * bytes[1]);
    let rt = runtime_with(spec);
    let req = || GenerateRequest::text(prompt).max_tokens(max);
    let alone = rt.generate(SMOL, req()).unwrap().wait();
    assert_eq!(
        alone.finished.reason,
        FinishReason::Length,
        "{:?}",
        alone.finished
    );
    let a = rt.generate(SMOL, req()).unwrap();
    let b = rt.generate(SMOL, req()).unwrap();
    let status = |rt: &Runtime| rt.status().generative[0].clone();
    eventually("both running", || status(&rt).running == 2);
    let (a, b) = (a.wait(), b.wait());
    for c in [&a, &b] {
        assert_eq!(c.finished.reason, FinishReason::Length, "{:?}", c.finished);
        assert_eq!(c.text, alone.text);
        assert_eq!(c.finished.usage, alone.finished.usage);
    }
    let s = status(&rt);
    assert!(s.preempted >= 1, "{s:?}");
    assert!(s.recomputed_tokens > 0, "{s:?}");
    assert_eq!((s.running, s.kv_bytes_admitted), (0, 0));
}

#[test]
fn reoptimize_replans_the_step_and_kv_budgets_for_the_memory_free() {
    use std::sync::atomic::Ordering::Relaxed;
    let (rt, probe) = runtime_with_memory(config(), smol_spec());
    assert!(rt.plan().generation.is_empty(), "nothing is loaded yet");
    let req = || GenerateRequest::text("The three primary colours are").max_tokens(16);
    let first = rt.generate(SMOL, req()).unwrap().wait();
    assert_eq!(first.finished.reason, FinishReason::Length);
    let loaded = rt.plan().generation;
    assert_eq!(loaded.len(), 1);
    let full = loaded[0].clone();
    assert_eq!(full.model, SMOL);
    assert_eq!(full.step_tokens, full.step_tokens_configured);
    assert_eq!(full.kv_budget_bytes, full.kv_budget_configured);
    assert_eq!(rt.reoptimize().unwrap(), runtime::Reoptimized::Optimal);

    // 8 MiB free above the margin: steps of a quarter, a KV budget of
    // what the machine has, the scratch of the smaller step given back.
    let margin = rt.ledger().budget().safety_margin;
    probe.0.store(margin + (8 << 20), Relaxed);
    let runtime::Reoptimized::Adjusted { previous, new } = rt.reoptimize().unwrap() else {
        panic!("8 MiB free must change the plan");
    };
    assert_eq!(previous.generation, vec![full.clone()]);
    let short = new.generation[0].clone();
    assert_eq!(short.step_tokens, full.step_tokens_configured / 4);
    assert!(
        short.kv_budget_bytes <= 9 << 20 && short.kv_budget_bytes >= 8 << 20,
        "KV budget {} for 8 MiB free",
        short.kv_budget_bytes
    );
    assert!(short.reserved_bytes < full.reserved_bytes, "{short:?}");
    assert!(
        new.reasons.iter().any(|r| r.contains(SMOL)),
        "{:?}",
        new.reasons
    );
    assert_eq!(rt.plan().generation, vec![short.clone()]);
    let status = rt.status().generative[0].clone();
    assert_eq!(status.kv_bytes_budget, short.kv_budget_bytes);
    assert_eq!(status.reserved_bytes, short.reserved_bytes);
    assert_eq!(status.engine.unwrap().step_tokens, short.step_tokens);
    // What fits is answered as before; what never fits now is refused at
    // once with the numbers.
    assert_eq!(rt.generate(SMOL, req()).unwrap().wait().text, first.text);
    let long = || GenerateRequest::text("The three primary colours are").max_tokens(2000);
    match rt.generate(SMOL, long()) {
        Err(Error::KvTooLarge { needed, budget, .. }) => {
            assert_eq!(budget, short.kv_budget_bytes);
            assert!(needed > budget);
        }
        other => panic!(
            "expected KvTooLarge, got {:?}",
            other.map(|g| g.served().clone())
        ),
    }

    // Memory back: the configured budgets, the reservation grown again.
    probe.0.store(12 << 30, Relaxed);
    assert!(matches!(
        rt.reoptimize().unwrap(),
        runtime::Reoptimized::Adjusted { .. }
    ));
    assert_eq!(rt.plan().generation, vec![full]);
    drop(
        rt.generate(SMOL, long())
            .expect("fits the configured KV budget"),
    );
}

#[test]
fn a_sequence_alone_without_room_to_grow_waits_for_room_instead_of_ending() {
    use std::sync::atomic::Ordering::Relaxed;
    let (rt, probe) = runtime_with_memory(config(), smol_spec());
    let req = || {
        GenerateRequest::text("Once upon a time, in a small village by the sea,").max_tokens(120)
    };
    let alone = rt.generate(SMOL, req()).unwrap().wait();
    assert_eq!(
        alone.finished.reason,
        FinishReason::Length,
        "{:?}",
        alone.finished
    );
    let status = |rt: &Runtime| rt.status().generative[0].clone();
    let g = rt.generate(SMOL, req()).unwrap();
    eventually("the sequence decoding", || {
        let s = status(&rt);
        s.running == 1 && s.tokens_generated > alone.finished.usage.completion_tokens as u64
    });
    // Nothing left in the machine (less than one more block of KV), not
    // even in the safety margin: it cannot grow past what it holds.
    probe.0.store(64 << 10, Relaxed);
    let stalled = |rt: &Runtime| {
        let a = status(rt).tokens_generated;
        std::thread::sleep(Duration::from_millis(300));
        a == status(rt).tokens_generated
    };
    eventually("the sequence stalled at the end of its KV", || stalled(&rt));
    // It waits for room, still running, instead of ending with `memory`.
    std::thread::sleep(Duration::from_millis(500));
    let s = status(&rt);
    assert_eq!(s.running, 1, "{s:?}");
    probe.0.store(12 << 30, Relaxed);
    let done = g.wait();
    assert_eq!(
        done.finished.reason,
        FinishReason::Length,
        "{:?}",
        done.finished
    );
    assert_eq!(done.finished.usage, alone.finished.usage);
    assert_eq!(done.text, alone.text);
}

#[test]
fn a_sequence_alone_grows_into_the_safety_margin_while_new_work_waits() {
    use std::sync::atomic::Ordering::Relaxed;
    let (rt, probe) = runtime_with_memory(config(), smol_spec());
    let req = || {
        GenerateRequest::text("Once upon a time, in a small village by the sea,").max_tokens(120)
    };
    let alone = rt.generate(SMOL, req()).unwrap().wait();
    assert_eq!(
        alone.finished.reason,
        FinishReason::Length,
        "{:?}",
        alone.finished
    );
    let status = |rt: &Runtime| rt.status().generative[0].clone();
    let g = rt.generate(SMOL, req()).unwrap();
    eventually("the sequence decoding", || {
        let s = status(&rt);
        s.running == 1 && s.tokens_generated > alone.finished.usage.completion_tokens as u64
    });
    // Nothing above the safety margin, the margin's bytes still there: the
    // sequence admitted whole goes on into the margin...
    let margin = rt.ledger().budget().safety_margin;
    probe.0.store(margin, Relaxed);
    let second = rt.generate(SMOL, req()).unwrap();
    let done = g.wait();
    assert_eq!(
        done.finished.reason,
        FinishReason::Length,
        "{:?}",
        done.finished
    );
    assert_eq!(done.finished.usage, alone.finished.usage);
    assert_eq!(done.text, alone.text);
    // ...while new work is admitted only above the margin: it waits.
    std::thread::sleep(Duration::from_millis(300));
    let s = status(&rt);
    assert_eq!((s.running, s.queued), (0, 1), "{s:?}");
    probe.0.store(12 << 30, Relaxed);
    let later = second.wait();
    assert_eq!(
        later.finished.reason,
        FinishReason::Length,
        "{:?}",
        later.finished
    );
    assert_eq!(later.text, alone.text);
}
