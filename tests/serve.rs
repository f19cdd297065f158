//! The `serve` example's router on 127.0.0.1 with the real local models
//! (all-MiniLM-L6-v2 and SmolLM2-135M, fetched by `scripts/fetch-model.sh`):
//! the official `openai` Python client (installed from PyPI by
//! `scripts/openai-client.sh`) lists models, streams a chat and embeds;
//! the SSE chunk format and `[DONE]`; a disconnect mid-stream cancels the
//! sequence; unknown models answer 404 `model_not_found`; a full queue
//! answers 429 with `Retry-After`; `/health` and `/metrics`; another
//! runtime streaming from this server as its remote generation tier.

#[path = "../examples/embed_server/app.rs"]
mod app;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

const SMOL: &str = "smollm2-135m";

struct Server {
    addr: SocketAddr,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(router: axum::Router) -> Server {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let shutdown = async move {
                    let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
                };
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
                    .expect("serve");
            });
        });
        Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let start = Instant::now();
            while !t.is_finished() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() && !std::thread::panicking() {
                t.join().expect("server thread panicked");
            }
        }
    }
}

fn smol() -> runtime::GenerativeSpec {
    runtime::GenerativeSpec::fetched(SMOL, runtime::router::Tier::Small)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn config() -> runtime::RuntimeConfig {
    runtime::RuntimeConfig {
        configure_global_pool: false,
        ..runtime::RuntimeConfig::default()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, axum::http::HeaderMap, String) {
    let mut resp = agent()
        .post(server.url(path))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("POST");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.body_mut().read_to_string().expect("body");
    (status, headers, text)
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_official_openai_client_lists_streams_and_embeds() {
    let minilm = models::model_dir().unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime::Runtime::builder()
        .config(config())
        .minilm(minilm)
        .generative(smol())
        .build()
        .unwrap();
    let server = Server::start(app::app(rt));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/openai-client.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(format!("http://{}", server.addr))
        .arg(SMOL)
        .arg(runtime::MINILM)
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/openai-client.sh failed ({}); a venv with the openai client from PyPI is \
         needed (exit 3: it could not be made)\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let checks: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let names: Vec<&str> = checks.iter().filter_map(|c| c["check"].as_str()).collect();
    assert_eq!(
        names,
        [
            "models",
            "chat_stream",
            "chat",
            "embeddings",
            "unknown_model"
        ]
    );
    assert_eq!(checks[2]["tier"], "small");
    assert_eq!(checks[3]["dim"], 384);
}

/// The data lines of an SSE body, parsed (`[DONE]` kept as a string).
fn sse_events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                Value::String(d.into())
            } else {
                serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"))
            }
        })
        .collect()
}

#[test]
fn streams_in_openai_chunks_and_a_disconnect_cancels() {
    let rt = runtime::Runtime::builder()
        .config(config())
        .without_local_model()
        .generative(smol())
        .build()
        .unwrap();
    let server = Server::start(app::app(rt.clone()));

    // A whole streamed chat: role first, content, a finish chunk with
    // usage and the tier, then [DONE].
    let body = serde_json::json!({
        "model": SMOL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "stream": true,
    });
    let (status, headers, text) = post(&server, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{text}");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(headers["x-snug-tier"], "small");
    assert_eq!(headers["x-snug-model"], SMOL);
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let finish = &events[events.len() - 2];
    let reason = finish["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{finish}");
    let streamed: String = events[1..events.len() - 2]
        .iter()
        .map(|e| e["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert!(!streamed.is_empty());
    let completion_tokens = finish["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion_tokens), "{finish}");
    assert_eq!(finish["snug"]["tier"], "small");
    assert!(events
        .iter()
        .all(|e| e == "[DONE]" || e["id"] == events[0]["id"]));

    // The same request whole: the text equals the streamed text (greedy).
    let mut whole = body.clone();
    whole["stream"] = Value::Bool(false);
    let (status, _, text) = post(&server, "/v1/chat/completions", &whole);
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], streamed.as_str());
    assert_eq!(v["usage"]["completion_tokens"], completion_tokens);

    // /v1/completions streams text_completion chunks.
    let body = serde_json::json!({
        "model": SMOL, "prompt": "The capital of France is", "max_tokens": 4, "stream": true,
    });
    let (status, _, text) = post(&server, "/v1/completions", &body);
    assert_eq!(status, 200, "{text}");
    let events = sse_events(&text);
    assert_eq!(events[0]["object"], "text_completion");
    assert_eq!(events.last().unwrap(), "[DONE]");

    // A client that reads one chunk and hangs up cancels its sequence.
    let body = serde_json::json!({
        "model": SMOL, "prompt": "Once upon a time", "max_tokens": 1000, "stream": true,
    });
    let stream = std::net::TcpStream::connect(server.addr).unwrap();
    let req = body.to_string();
    let http = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{req}",
        server.addr,
        req.len()
    );
    std::io::Write::write_all(&mut &stream, http.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            break;
        }
    }
    let status = |rt: &runtime::Runtime| rt.status().generative[0].clone();
    assert_eq!(status(&rt).running, 1);
    drop(reader);
    eventually("the sequence to be cancelled", || {
        let s = status(&rt);
        s.running == 0 && s.kv_blocks_used == 0
    });
    assert_eq!(status(&rt).engine.unwrap().cancelled, 1);
}

#[test]
fn unknown_models_full_queues_health_and_metrics() {
    let mut spec = smol();
    spec.engine.max_running = 1;
    spec.engine.max_queued = 1;
    let rt = runtime::Runtime::builder()
        .config(config())
        .without_local_model()
        .generative(spec)
        .build()
        .unwrap();
    rt.load(SMOL).unwrap();
    let server = Server::start(app::app(rt.clone()));

    let (status, _, text) = post(
        &server,
        "/v1/chat/completions",
        &serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 404, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains(SMOL));
    // A sampling value out of range is refused, naming it and its range.
    let (status, _, text) = post(
        &server,
        "/v1/chat/completions",
        &serde_json::json!({"model": SMOL, "messages": [{"role": "user", "content": "hi"}],
                            "temperature": 0.5, "min_p": 1.5}),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("min_p") && text.contains("1.5"), "{text}");
    let (status, _, text) = post(
        &server,
        "/v1/embeddings",
        &serde_json::json!({"model": "text-embedding-3-small", "input": "hi"}),
    );
    assert_eq!(status, 404, "{text}");

    // One running, one queued: the third is refused 429 with Retry-After.
    let long = || {
        rt.generate(
            SMOL,
            runtime::GenerateRequest::text("Once upon a time").max_tokens(1000),
        )
        .unwrap()
    };
    let running = long();
    eventually("the first to run", || {
        rt.status().generative[0].running == 1
    });
    let queued = long();
    eventually("the second to queue", || {
        rt.status().generative[0].queued == 1
    });
    let (status, headers, text) = post(
        &server,
        "/v1/completions",
        &serde_json::json!({"model": SMOL, "prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(status, 429, "{text}");
    assert!(headers.contains_key("retry-after"));
    drop((running, queued));

    let mut resp = agent().get(server.url("/health")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        serde_json::from_str::<Value>(&resp.body_mut().read_to_string().unwrap()).unwrap()
            ["status"],
        "ok"
    );

    let mut resp = agent().get(server.url("/v1/models")).call().unwrap();
    let models: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [SMOL, "auto"]);

    let mut resp = agent().get(server.url("/metrics")).call().unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.body_mut().read_to_string().unwrap();
    assert!(
        text.contains("# TYPE snug_requests_total counter"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "snug_sequences_running{{model=\"{SMOL}\",tier=\"small\"}}"
        )),
        "{text}"
    );
    assert!(
        text.contains("snug_ledger_reserved_bytes{category=\"model\"}"),
        "{text}"
    );
    assert!(
        text.contains(
            "snug_breaker_state{serves=\"embedding\",tier=\"rule-based\",name=\"rule-based\"} 0"
        ),
        "{text}"
    );
    // Every sample line is `name{labels} number` or `name number`.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let v = l.rsplit(' ').next().unwrap();
        assert!(v.parse::<f64>().is_ok(), "{l}");
    }
}

#[test]
fn embeddings_by_name_with_the_real_minilm() {
    let minilm = models::model_dir().unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime::Runtime::builder()
        .config(config())
        .minilm(minilm)
        .build()
        .unwrap();
    let server = Server::start(app::app(rt));
    let (status, headers, text) = post(
        &server,
        "/v1/embeddings",
        &serde_json::json!({"model": runtime::MINILM, "input": ["How is the weather today?", "What is the weather like?", "A man plays the guitar."]}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-snug-tier"], "Small");
    let v: Value = serde_json::from_str(&text).unwrap();
    let vecs: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let cos = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert_eq!(vecs[0].len(), 384);
    // The real model: the two weather questions are close, the guitar far.
    assert!(cos(&vecs[0], &vecs[1]) > 0.7, "{}", cos(&vecs[0], &vecs[1]));
    assert!(cos(&vecs[0], &vecs[2]) < 0.3, "{}", cos(&vecs[0], &vecs[2]));
}

#[test]
fn another_runtime_streams_from_this_server_as_its_remote_tier() {
    // This server: SmolLM2 behind snug's OpenAI API.
    let rt = runtime::Runtime::builder()
        .config(config())
        .without_local_model()
        .generative(smol())
        .build()
        .unwrap();
    let server = Server::start(app::app(rt));
    // A second runtime with no local model, this server as its remote tier.
    let client = runtime::Runtime::builder()
        .config(config())
        .without_local_model()
        .remote_generation(runtime::RemoteGenerationConfig {
            server: runtime::router::RemoteChatConfig {
                base_url: server.url("/v1"),
                model: SMOL.into(),
                api_key_env: None,
                ..Default::default()
            },
            ..Default::default()
        })
        .build()
        .unwrap();
    let mut generation = client
        .generate(
            runtime::AUTO,
            runtime::GenerateRequest::chat("What is the capital of France? Answer with one word.")
                .max_tokens(12),
        )
        .unwrap();
    assert_eq!(generation.served().tier, runtime::router::Tier::Remote);
    assert_eq!(generation.served().model, SMOL);
    let mut deltas = 0;
    let mut text = String::new();
    let finished = loop {
        match generation.next().expect("a final event") {
            runtime::GenerationEvent::Delta { text: t, .. } => {
                deltas += 1;
                text.push_str(&t);
            }
            runtime::GenerationEvent::Finished(f) => break f,
        }
    };
    // SmolLM2's greedy answer, streamed piece by piece through the server's
    // SSE chunks, with its finish reason and token counts.
    assert!(text.contains("Paris"), "{text:?}");
    assert!(deltas > 1, "{deltas} deltas");
    assert!(
        matches!(
            finished.reason,
            runtime::FinishReason::Stop | runtime::FinishReason::Length
        ),
        "{finished:?}"
    );
    let usage = finished.usage;
    assert!(
        (1..=12).contains(&usage.completion_tokens) && usage.prompt_tokens > 5,
        "{finished:?}"
    );
    assert_eq!(finished.served.tier, runtime::router::Tier::Remote);
}
