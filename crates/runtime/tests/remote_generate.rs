//! The remote generation tier against a real HTTP server on 127.0.0.1: an
//! axum fake of an OpenAI-compatible `/v1/chat/completions` that streams
//! server-sent events. Streaming, usage and finish reason; the server
//! killed (requests fall to the rule-based tier, the breaker opens and then
//! skips the tier without connecting); the server back on the same port
//! (a probe after the cool-down closes the breaker); a stream that breaks
//! after some text (finish reason `error`, the text kept).

use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::post;
use parking_lot::Mutex;
use runtime::router::{BreakerConfig, BreakerState, RemoteChatConfig, Tier};
use runtime::{
    FinishReason, GenerateRequest, GenerationEvent, ModelKind, RemoteGenerationConfig, Runtime,
    RuntimeConfig, AUTO, RULE_BASED,
};
use serde_json::{json, Value};

const MODEL: &str = "fake-chat";
const PIECES: [&str; 3] = ["Hel", "lo, ", "world!"];
const LIMIT: Duration = Duration::from_secs(30);
const OPEN_FOR: Duration = Duration::from_millis(600);

/// What the fake server streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A role chunk, the three pieces, `finish_reason: "length"`, a usage
    /// chunk (7 prompt, 3 completion tokens), `data: [DONE]`.
    Ok,
    /// As `Ok`, 200 ms between pieces.
    Slow,
    /// The three pieces, then the body fails: the connection is cut.
    BreakAfterPieces,
    /// HTTP 503 before any stream.
    Unavailable,
    /// HTTP 400 before any stream.
    BadRequest,
    /// The role chunk and the first piece, then nothing for a minute (the
    /// connection stays open).
    Silent,
}

#[derive(Debug)]
struct Shared {
    mode: Mutex<Mode>,
    requests: AtomicU64,
    bodies: Mutex<Vec<Value>>,
}

/// The fake server; stops (its port closed) when dropped.
struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeServer {
    fn start(mode: Mode) -> FakeServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), mode)
    }

    /// On `addr` (a port used before: retried briefly while the old
    /// listener is being closed).
    fn start_on(addr: SocketAddr, mode: Mode) -> FakeServer {
        let t = Instant::now();
        let listener = loop {
            match TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if t.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            requests: AtomicU64::new(0),
            bodies: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(shared.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
        FakeServer {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock() = mode;
    }

    fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    fn last_body(&self) -> Value {
        self.shared
            .bodies
            .lock()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Waits for the tasks (the listener among them) to be dropped,
            // so that the port is closed when this returns.
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

fn chunk(delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {v}\n\n"))
}

async fn chat(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.bodies
        .lock()
        .push(serde_json::from_slice(&body).unwrap_or_default());
    let mode = *s.mode.lock();
    match mode {
        Mode::Unavailable => {
            return Response::builder()
                .status(503)
                .body(Body::from("{\"error\": \"loading\"}"))
                .unwrap()
        }
        Mode::BadRequest => {
            return Response::builder()
                .status(400)
                .body(Body::from("{\"error\": \"max_tokens too large\"}"))
                .unwrap()
        }
        _ => {}
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let pace = Duration::from_millis(if mode == Mode::Slow { 200 } else { 5 });
    tokio::spawn(async move {
        let _ = tx
            .send(Ok(chunk(json!({"role": "assistant", "content": ""}), None)))
            .await;
        if mode == Mode::Silent {
            let _ = tx
                .send(Ok(chunk(json!({ "content": PIECES[0] }), None)))
                .await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        for p in PIECES {
            tokio::time::sleep(pace).await;
            let _ = tx.send(Ok(chunk(json!({ "content": p }), None))).await;
        }
        tokio::time::sleep(pace).await;
        if mode == Mode::BreakAfterPieces {
            let _ = tx.send(Err(std::io::Error::other("told to break"))).await;
            return;
        }
        let _ = tx.send(Ok(chunk(json!({}), Some("length")))).await;
        let usage = json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        });
        let _ = tx.send(Ok(Bytes::from(format!("data: {usage}\n\n")))).await;
        let _ = tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(Chan(rx)))
        .unwrap()
}

/// The receiving end of a channel as a body stream.
struct Chan(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl futures_core::Stream for Chan {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

fn remote_config(base_url: String) -> RemoteGenerationConfig {
    RemoteGenerationConfig {
        server: RemoteChatConfig {
            base_url,
            model: MODEL.into(),
            api_key_env: None,
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_secs(2),
            ..RemoteChatConfig::default()
        },
        breaker: BreakerConfig {
            failures: 3,
            open_for: OPEN_FOR,
            ..BreakerConfig::default()
        },
    }
}

/// A runtime with no local model: the remote, then the rule-based tier.
fn runtime_for(base_url: String) -> Runtime {
    runtime_with_remote(remote_config(base_url))
}

/// A runtime with no local model and the remote tier `config`.
fn runtime_with_remote(config: RemoteGenerationConfig) -> Runtime {
    Runtime::builder()
        .config(RuntimeConfig {
            configure_global_pool: false,
            ..RuntimeConfig::default()
        })
        .without_local_model()
        .remote_generation(config)
        .build()
        .unwrap()
}

fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("test body did not finish within {LIMIT:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("test body panicked"),
    }
}

#[test]
fn the_remote_streams_its_text_finish_reason_and_usage() {
    within(|| {
        let server = FakeServer::start(Mode::Ok);
        let rt = runtime_for(server.base_url());
        let generation = rt
            .generate(AUTO, GenerateRequest::chat("Say hello.").max_tokens(5))
            .unwrap();
        assert_eq!(generation.served().tier, Tier::Remote);
        assert_eq!(generation.served().model, MODEL);
        assert!(generation.served().trail.is_empty());
        let mut deltas = Vec::new();
        let mut finals = Vec::new();
        for e in generation {
            match e {
                GenerationEvent::Delta { text, tokens } => {
                    assert!(finals.is_empty(), "a delta after the final event");
                    assert!(tokens.is_empty());
                    deltas.push(text);
                }
                GenerationEvent::Finished(f) => finals.push(f),
            }
        }
        assert_eq!(deltas, PIECES);
        assert_eq!(finals.len(), 1);
        let f = &finals[0];
        assert_eq!(f.reason, FinishReason::Length, "{f:?}");
        assert_eq!(f.error, None);
        assert_eq!((f.usage.prompt_tokens, f.usage.completion_tokens), (7, 3));
        assert_eq!(f.served.tier, Tier::Remote);
        let ttft = f.timings.time_to_first_token_ms.unwrap();
        assert!(
            ttft >= f.timings.queued_ms && f.timings.total_ms >= ttft,
            "{f:?}"
        );
        // What went over the wire.
        let body = server.last_body();
        assert_eq!(body["model"], MODEL);
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 5);
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": "Say hello."}])
        );

        // By the remote's name, and a text prompt as one user message.
        let c = rt
            .generate(MODEL, GenerateRequest::text("Once upon a time"))
            .unwrap()
            .wait();
        assert_eq!(c.text, PIECES.concat());
        assert_eq!(c.finished.served.model, MODEL);
        assert_eq!(
            server.last_body()["messages"],
            json!([{"role": "user", "content": "Once upon a time"}])
        );
        assert_eq!(server.requests(), 2);

        // Listed, named in unknown-model errors, its breaker in the status.
        assert!(rt.models().iter().any(|m| m.name == MODEL
            && m.kind == ModelKind::Generative
            && m.tier == Some(Tier::Remote)));
        let e = rt
            .generate("nope", GenerateRequest::chat("hi"))
            .unwrap_err();
        assert!(e.to_string().contains(MODEL), "{e}");
        let status = rt.status();
        let b = status
            .breakers
            .iter()
            .find(|b| b.tier == Tier::Remote && b.serves == ModelKind::Generative)
            .expect("the remote generation breaker in status");
        assert_eq!(b.name, MODEL);
        assert_eq!(b.breaker.state, BreakerState::Closed);
        assert_eq!(b.breaker.successes, 2);
    });
}

#[test]
fn a_killed_remote_falls_to_rule_based_opens_the_breaker_and_closes_after_a_probe() {
    within(|| {
        let server = FakeServer::start(Mode::Ok);
        let addr = server.addr;
        let rt = runtime_for(server.base_url());
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::Remote);

        // Killed: each request fails to connect and falls to the rule-based
        // tier with the reason, until the breaker opens.
        drop(server);
        let breaker = rt.remote_generation_breaker().unwrap();
        for k in 1..=3 {
            let c = rt
                .generate(AUTO, GenerateRequest::chat("hi"))
                .unwrap()
                .wait();
            let served = &c.finished.served;
            assert_eq!(served.tier, Tier::RuleBased, "request {k}");
            assert_eq!(served.model, RULE_BASED);
            assert_eq!(served.trail.len(), 1, "{:?}", served.trail);
            let why = &served.trail[0];
            assert!(why.starts_with(&format!("remote {MODEL}: ")), "{why}");
            assert!(why.contains(&addr.to_string()), "{why}");
            assert!(!why.contains("circuit"), "{why}");
            assert!(c.text.contains(why.as_str()), "{}", c.text);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        let admitted = breaker.stats().admitted;
        assert_eq!(breaker.stats().failures, 3);

        // Back on the same port, but the breaker is open: skipped without a
        // connection attempt.
        let server = FakeServer::start_on(addr, Mode::Ok);
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::RuleBased);
        let why = &c.finished.served.trail[0];
        assert!(why.contains("skipped, circuit open"), "{why}");
        assert_eq!(breaker.stats().admitted, admitted);
        assert_eq!(breaker.stats().rejected, 1);
        assert_eq!(server.requests(), 0);

        // After the cool-down a probe goes through and closes the breaker.
        std::thread::sleep(OPEN_FOR + Duration::from_millis(50));
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::Remote, "{:?}", c.finished);
        assert_eq!(c.text, PIECES.concat());
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(server.requests(), 1);
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::Remote);
    });
}

#[test]
fn a_stream_broken_after_some_text_ends_with_error_and_keeps_the_text() {
    within(|| {
        let server = FakeServer::start(Mode::BreakAfterPieces);
        let rt = runtime_for(server.base_url());
        let generation = rt.generate(AUTO, GenerateRequest::chat("hi")).unwrap();
        assert_eq!(generation.served().tier, Tier::Remote);
        let c = generation.wait();
        assert_eq!(c.text, PIECES.concat());
        let f = &c.finished;
        assert_eq!(f.reason, FinishReason::Error, "{f:?}");
        let e = f.error.as_deref().unwrap();
        assert!(e.contains("after 3 text piece(s)"), "{e}");
        assert!(e.contains(&server.addr.to_string()), "{e}");
        assert_eq!(f.served.tier, Tier::Remote);
        let stats = rt.remote_generation_breaker().unwrap().stats();
        assert_eq!((stats.failures, stats.successes), (1, 0));
    });
}

#[test]
fn http_errors_before_the_stream_fall_to_the_next_tier() {
    within(|| {
        let server = FakeServer::start(Mode::Unavailable);
        let rt = runtime_for(server.base_url());
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::RuleBased);
        let why = &c.finished.served.trail[0];
        assert!(why.contains("HTTP 503") && why.contains("loading"), "{why}");
        assert_eq!(server.requests(), 1);
        let stats = rt.remote_generation_breaker().unwrap().stats();
        assert_eq!((stats.failures, stats.successes), (1, 0));

        // A 4xx refusal falls to the next tier too, but the server is up:
        // the breaker does not count it as a failure.
        server.set_mode(Mode::BadRequest);
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::RuleBased);
        let why = &c.finished.served.trail[0];
        assert!(
            why.contains("HTTP 400") && why.contains("max_tokens too large"),
            "{why}"
        );
        let stats = rt.remote_generation_breaker().unwrap().stats();
        assert_eq!((stats.failures, stats.successes), (1, 1));
    });
}

#[test]
fn cancelling_a_remote_generation_ends_it_with_cancelled() {
    within(|| {
        let server = FakeServer::start(Mode::Slow);
        let rt = runtime_for(server.base_url());
        let mut generation = rt.generate(AUTO, GenerateRequest::chat("hi")).unwrap();
        // The first piece is there when `generate` returns.
        match generation.next() {
            Some(GenerationEvent::Delta { text, .. }) => assert_eq!(text, PIECES[0]),
            other => panic!("{other:?}"),
        }
        generation.cancel();
        let c = generation.wait();
        assert_eq!(
            c.finished.reason,
            FinishReason::Cancelled,
            "{:?}",
            c.finished
        );
        // Cancelled while the second piece was on its way: the text is the
        // first piece's (read before the cancel).
        assert_eq!(c.text, PIECES[0]);
        assert_eq!(c.finished.served.tier, Tier::Remote);
    });
}

#[test]
fn a_cancel_ends_the_generation_at_once_while_a_silent_server_keeps_the_read_waiting() {
    within(|| {
        let server = FakeServer::start(Mode::Silent);
        let mut config = remote_config(server.base_url());
        config.server.read_timeout = Duration::from_secs(20);
        let rt = runtime_with_remote(config);
        let mut generation = rt.generate(AUTO, GenerateRequest::chat("hi")).unwrap();
        assert_eq!(generation.served().tier, Tier::Remote);
        match generation.next() {
            Some(GenerationEvent::Delta { text, .. }) => assert_eq!(text, PIECES[0]),
            other => panic!("{other:?}"),
        }
        // The server says nothing more: the stream's read waits.
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        generation.cancel();
        let c = generation.wait();
        let waited = t.elapsed();
        assert_eq!(
            c.finished.reason,
            FinishReason::Cancelled,
            "{:?}",
            c.finished
        );
        assert_eq!(c.text, PIECES[0]);
        assert!(
            waited < Duration::from_secs(2),
            "the cancel waited {waited:?} for a read of up to 20 s"
        );
        // A cancel is not the server's failure.
        let stats = rt.remote_generation_breaker().unwrap().stats();
        assert_eq!(stats.failures, 0, "{stats:?}");
    });
}

#[test]
fn every_sampling_setting_that_is_not_off_goes_over_the_wire() {
    within(|| {
        let server = FakeServer::start(Mode::Ok);
        let rt = runtime_for(server.base_url());
        let mut req = GenerateRequest::chat("hi").max_tokens(3);
        req.sampling = runtime::models::SamplingConfig {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.9,
            min_p: 0.1,
            repeat_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            seed: Some(7),
            ..runtime::models::SamplingConfig::default()
        };
        rt.generate(AUTO, req).unwrap().wait();
        let body = server.last_body();
        let f = |k: &str| {
            body[k]
                .as_f64()
                .unwrap_or_else(|| panic!("{k} missing: {body}"))
        };
        assert!((f("temperature") - 0.7).abs() < 1e-6);
        assert!((f("top_p") - 0.9).abs() < 1e-6);
        assert!((f("min_p") - 0.1).abs() < 1e-6);
        assert!((f("repeat_penalty") - 1.1).abs() < 1e-6);
        assert!((f("presence_penalty") - 0.5).abs() < 1e-6);
        assert!((f("frequency_penalty") - 0.25).abs() < 1e-6);
        assert_eq!(body["top_k"], 20);
        assert_eq!(body["seed"], 7);

        // Greedy, with every other setting off: none of them is sent.
        let mut req = GenerateRequest::chat("hi").max_tokens(3);
        req.sampling = runtime::models::SamplingConfig {
            top_k: 0,
            min_p: 0.0,
            ..runtime::models::SamplingConfig::greedy()
        };
        rt.generate(AUTO, req).unwrap().wait();
        let body = server.last_body();
        for k in [
            "top_k",
            "min_p",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
        ] {
            assert!(body.get(k).is_none(), "{k} sent: {body}");
        }
        assert_eq!(body["temperature"], 0.0);

        // A server that refuses unknown fields gets OpenAI's only.
        let mut config = remote_config(server.base_url());
        config.server.sampling_extensions = false;
        let rt = runtime_with_remote(config);
        let mut req = GenerateRequest::chat("hi").max_tokens(3);
        req.sampling.top_k = 20;
        req.sampling.min_p = 0.1;
        req.sampling.repeat_penalty = 1.1;
        req.sampling.presence_penalty = 0.5;
        rt.generate(AUTO, req).unwrap().wait();
        let body = server.last_body();
        for k in ["top_k", "min_p", "repeat_penalty"] {
            assert!(body.get(k).is_none(), "{k} sent: {body}");
        }
        assert_eq!(body["presence_penalty"], 0.5);
    });
}

#[test]
fn a_deadline_passing_mid_stream_ends_it_with_deadline() {
    within(|| {
        let server = FakeServer::start(Mode::Slow);
        let rt = runtime_for(server.base_url());
        // The first piece comes at 200 ms, the second at 400 ms: the
        // deadline falls between them.
        let mut req = GenerateRequest::chat("hi");
        req.deadline = Some(Duration::from_millis(300));
        let generation = rt.generate(AUTO, req).unwrap();
        assert_eq!(generation.served().tier, Tier::Remote);
        let c = generation.wait();
        assert_eq!(
            c.finished.reason,
            FinishReason::Deadline,
            "{:?}",
            c.finished
        );
        assert_eq!(c.text, PIECES[0]);
        assert_eq!(c.finished.error, None);
        // The deadline is the request's, not the server's failure.
        let stats = rt.remote_generation_breaker().unwrap().stats();
        assert_eq!((stats.failures, stats.successes), (0, 1));
    });
}

/// A machine whose memory reads as `available` of 16 GiB.
#[derive(Debug)]
struct Machine(u64);

impl runtime::hw::MemoryProbe for Machine {
    fn memory(&self) -> runtime::hw::Result<runtime::hw::MemoryInfo> {
        Ok(runtime::hw::MemoryInfo::new(16 << 30, self.0, 0, 0, None))
    }
}

/// A runtime with SmolLM2-135M registered as the small tier beside the
/// remote, on a machine with `available` bytes free, its KV budget
/// `kv_budget_bytes`.
fn runtime_with_local(base_url: String, available: u64, kv_budget_bytes: usize) -> Runtime {
    let mut spec = runtime::GenerativeSpec::fetched("smollm2-135m", Tier::Small)
        .unwrap_or_else(|e| panic!("{e}"));
    spec.decoder.kv_budget_bytes = kv_budget_bytes;
    Runtime::builder()
        .config(RuntimeConfig {
            configure_global_pool: false,
            ..RuntimeConfig::default()
        })
        .memory_probe(Arc::new(Machine(available)))
        .without_local_model()
        .generative(spec)
        .remote_generation(remote_config(base_url))
        .build()
        .unwrap()
}

#[test]
fn local_tiers_come_first_under_normal_pressure_and_the_remote_first_under_pressure() {
    within(|| {
        let server = FakeServer::start(Mode::Ok);
        // Normal pressure (25% used): the local tier is tried first; the
        // request's KV cannot fit its 64 KiB KV budget, so the remote
        // serves, the local tier's reason in the trail.
        let rt = runtime_with_local(server.base_url(), 12 << 30, 64 << 10);
        assert_eq!(rt.status().pressure, runtime::PressureLevel::Normal);
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::Remote, "{:?}", c.finished);
        let trail = &c.finished.served.trail;
        assert_eq!(trail.len(), 1, "{trail:?}");
        assert!(trail[0].starts_with("small smollm2-135m: "), "{trail:?}");
        drop(rt);

        // High pressure (87.5% used): the remote first; the local tier is
        // not touched.
        let rt = runtime_with_local(server.base_url(), 2 << 30, 256 << 20);
        assert_eq!(rt.status().pressure, runtime::PressureLevel::High);
        let c = rt
            .generate(AUTO, GenerateRequest::chat("hi"))
            .unwrap()
            .wait();
        assert_eq!(c.finished.served.tier, Tier::Remote, "{:?}", c.finished);
        assert!(c.finished.served.trail.is_empty(), "{:?}", c.finished);
        assert_eq!(c.text, PIECES.concat());
        let generative = rt.status().generative;
        assert!(
            generative.iter().all(|g| g.state == "unloaded"),
            "{generative:?}"
        );
    });
}

/// `llama-server`, killed when dropped.
struct LlamaServer(std::process::Child);

impl LlamaServer {
    /// Starts llama.cpp's server (found by `scripts/llama-cpp.sh --print`,
    /// which never builds) with Gemma-3-270M on `port`, and waits until its
    /// `/health` answers 200.
    fn start(port: u16) -> LlamaServer {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/llama-cpp.sh");
        let out = std::process::Command::new("bash")
            .args([script, "--print"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "llama.cpp is not built: bash scripts/llama-cpp.sh builds it (about 10 minutes)"
        );
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let gguf = runtime::models::gguf_path("gemma3-270m").unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = std::process::Command::new(format!("{bin}/llama-server"));
        cmd.arg("-m")
            .arg(&gguf)
            .args(["-c", "1024", "-np", "1", "-t", "2", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // As scripts/llama-bench.sh: hosts where repacking dies with SIGILL.
        if std::env::var("LLAMA_REPACK").as_deref() == Ok("0") {
            cmd.arg("--no-repack");
        }
        let server = LlamaServer(cmd.spawn().unwrap());
        let t = Instant::now();
        loop {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "llama-server did not come up"
            );
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = c.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut r = String::new();
                let _ = c.read_to_string(&mut r);
                if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") {
                    return server;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The manual check against a real engine (not run in CI, never builds
/// llama.cpp): llama.cpp's `llama-server` serving Gemma-3-270M streams
/// through the remote tier, takes every sampling setting (a seeded sampled
/// answer repeats), and a cancel mid-answer ends it at once; killed,
/// requests fall to the rule-based tier
/// and the breaker opens; started again on the same port, a probe after
/// the cool-down closes the breaker.
///
/// ```text
/// cargo test --workspace --release --test remote_generate -- --ignored --nocapture
/// ```
#[test]
#[ignore = "starts llama-server (built by scripts/llama-cpp.sh) with Gemma-3-270M; see docs/runtime.md"]
fn llama_server_streams_and_the_breaker_follows_it_down_and_up() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = LlamaServer::start(port);
    let mut config = remote_config(format!("http://127.0.0.1:{port}"));
    config.server.model = "gemma3-270m".into();
    config.server.read_timeout = Duration::from_secs(60);
    let rt = runtime_with_remote(config);
    let ask = || GenerateRequest::chat("The capital of France is").max_tokens(8);
    let mut generation = rt.generate(AUTO, ask()).unwrap();
    assert_eq!(generation.served().tier, Tier::Remote);
    let mut deltas = 0;
    let mut text = String::new();
    let finished = loop {
        match generation.next() {
            Some(GenerationEvent::Delta { text: t, .. }) => {
                deltas += 1;
                text.push_str(&t);
            }
            Some(GenerationEvent::Finished(f)) => break f,
            None => panic!("no final event"),
        }
    };
    eprintln!("{deltas} deltas: {text:?}; {finished:?}");
    // What the text says is the model's business (Gemma-3-270M is a base
    // model); that it came, in pieces, with the server's counts is ours.
    assert!(!text.trim().is_empty(), "{text:?}");
    assert!(deltas > 1, "streamed in pieces: {deltas}");
    assert!(
        matches!(finished.reason, FinishReason::Stop | FinishReason::Length),
        "{finished:?}"
    );
    assert!(finished.usage.completion_tokens > 0 && finished.usage.completion_tokens <= 8);
    assert!(finished.usage.prompt_tokens > 5, "{finished:?}");

    // Every sampling setting goes over the wire, llama.cpp's extensions
    // among them, and the server takes them: with a seed, the same
    // sampled answer twice.
    let sampled = || {
        let mut req = ask().max_tokens(16);
        req.sampling = runtime::models::SamplingConfig {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.1,
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            seed: Some(42),
            ..runtime::models::SamplingConfig::default()
        };
        rt.generate(AUTO, req).unwrap().wait()
    };
    let (a, b) = (sampled(), sampled());
    eprintln!("sampled: {:?} / {:?}", a.text, b.text);
    assert_eq!(a.finished.served.tier, Tier::Remote);
    assert!(
        matches!(a.finished.reason, FinishReason::Stop | FinishReason::Length),
        "{:?}",
        a.finished
    );
    assert_eq!(a.text, b.text, "the same seed and settings");

    // A cancel while the server is generating ends the generation at once.
    let mut long = rt.generate(AUTO, ask().max_tokens(400)).unwrap();
    assert!(matches!(long.next(), Some(GenerationEvent::Delta { .. })));
    let t = Instant::now();
    long.cancel();
    let c = long.wait();
    assert_eq!(
        c.finished.reason,
        FinishReason::Cancelled,
        "{:?}",
        c.finished
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // Killed: the requests fall to the rule-based tier, the breaker opens.
    drop(server);
    let breaker = rt.remote_generation_breaker().unwrap();
    for _ in 0..3 {
        let c = rt.generate(AUTO, ask()).unwrap().wait();
        assert_eq!(c.finished.served.tier, Tier::RuleBased);
        eprintln!("killed: {}", c.finished.served.trail[0]);
    }
    assert_eq!(breaker.state(), BreakerState::Open);
    let c = rt.generate(AUTO, ask()).unwrap().wait();
    assert!(c.finished.served.trail[0].contains("skipped, circuit open"));

    // Back: once the cool-down has passed, a probe closes the breaker.
    let _server = LlamaServer::start(port);
    std::thread::sleep(OPEN_FOR);
    let c = rt.generate(AUTO, ask()).unwrap().wait();
    eprintln!("back: {:?} {:?}", c.text, c.finished);
    assert_eq!(c.finished.served.tier, Tier::Remote);
    assert_eq!(breaker.state(), BreakerState::Closed);
}
