//! The `embed_server` example's router, served on 127.0.0.1 and driven by a
//! real HTTP client: each endpoint, the refusals, the rate limit, and the
//! server as the remote tier of another runtime. The runtimes here have no
//! local model (rule-based tier only), so no model files are needed.

#[path = "../examples/embed_server/app.rs"]
mod app;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A server on 127.0.0.1:<any port> in its own thread and tokio runtime;
/// dropping it shuts it down gracefully and waits (bounded) for the thread.
struct Server {
    addr: SocketAddr,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(router: axum::Router) -> Server {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("local addr");
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
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

    /// Stops the server; fails the test if it takes more than 10 s.
    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let start = Instant::now();
            while !t.is_finished() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "server did not shut down within 10 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            t.join().expect("server thread panicked");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.shutdown();
        }
    }
}

fn rule_based_runtime() -> runtime::Runtime {
    runtime::Runtime::builder()
        .without_local_model()
        .build()
        .expect("runtime without a local model")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into()
}

/// An answer: status, headers of interest, and the body as JSON.
struct Reply {
    status: u16,
    headers: axum::http::HeaderMap,
    json: Value,
}

fn reply(mut resp: ureq::http::Response<ureq::Body>) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .expect("read body");
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"));
    Reply {
        status,
        headers,
        json,
    }
}

fn post(server: &Server, path: &str, body: &str) -> Reply {
    reply(
        agent()
            .post(server.url(path))
            .header("content-type", "application/json")
            .send(body)
            .expect("POST"),
    )
}

fn post_empty(server: &Server, path: &str) -> Reply {
    reply(agent().post(server.url(path)).send_empty().expect("POST"))
}

fn get(server: &Server, path: &str) -> Reply {
    reply(agent().get(server.url(path)).call().expect("GET"))
}

/// Asserts an OpenAI-shaped error with this status and type.
fn assert_error(r: &Reply, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{}", r.json);
    assert_eq!(r.json["error"]["type"], kind, "{}", r.json);
    let message = r.json["error"]["message"]
        .as_str()
        .expect("error.message is a string");
    assert!(!message.is_empty());
}

fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("embedding is an array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn decode_base64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not base64: {e}"))
}

#[test]
fn embeddings_answer_in_openai_shape_with_the_runtimes_vectors() {
    let rt = rule_based_runtime();
    let server = Server::start(app::app(rt.clone()));
    let texts = [
        "a cat sits on the mat",
        "the stock market fell sharply today",
        "a cat is sitting on a mat",
    ];
    let direct = rt.embed(&texts).expect("direct embed");

    let r = post(
        &server,
        "/v1/embeddings",
        &serde_json::json!({ "input": texts, "model": "rule-based" }).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["object"], "list");
    assert_eq!(r.json["model"], "rule-based");
    let data = r.json["data"].as_array().expect("data");
    assert_eq!(data.len(), 3);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let v = vector(&item["embedding"]);
        assert_eq!(v.len(), 384);
        assert_eq!(v, direct.vectors[i], "text {i} differs from Runtime::embed");
    }
    let usage = &r.json["usage"];
    assert!(usage["prompt_tokens"].as_u64().expect("prompt_tokens") > 0);
    assert_eq!(usage["prompt_tokens"], usage["total_tokens"]);
    assert_eq!(
        r.headers.get("x-snug-tier").and_then(|v| v.to_str().ok()),
        Some("RuleBased")
    );
    assert_eq!(
        r.headers
            .get("x-snug-backend")
            .and_then(|v| v.to_str().ok()),
        Some("rule-based")
    );

    // A model the server does not have is refused, not answered by another.
    let r = post(
        &server,
        "/v1/embeddings",
        &serde_json::json!({ "input": texts, "model": "all-MiniLM-L6-v2" }).to_string(),
    );
    assert_error(&r, 404, "invalid_request_error");
    assert_eq!(r.json["error"]["code"], "model_not_found");

    // One string, no model: the backend's name stands in.
    let r = post(
        &server,
        "/v1/embeddings",
        r#"{"input": "a cat sits on the mat"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(r.json["model"], "rule-based");
    assert_eq!(vector(&r.json["data"][0]["embedding"]), direct.vectors[0]);

    // base64: little-endian f32, as OpenAI's clients ask for by default.
    let r = post(
        &server,
        "/v1/embeddings",
        r#"{"input": ["a cat sits on the mat"], "encoding_format": "base64"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.json);
    let bytes = decode_base64(
        r.json["data"][0]["embedding"]
            .as_str()
            .expect("base64 string"),
    );
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(v, direct.vectors[0]);
}

#[test]
fn bad_requests_get_a_json_4xx_and_the_server_goes_on() {
    let limits = app::Limits {
        max_body_bytes: 2048,
        max_inputs: 4,
        max_input_bytes: 100,
        ..app::Limits::default()
    };
    let server = Server::start(app::app_with(rule_based_runtime(), limits));
    let cases: &[(&str, u16, &str)] = &[
        (r#"{"input": ["#, 400, "invalid_request_error"),
        ("not json at all", 400, "invalid_request_error"),
        ("", 400, "invalid_request_error"),
        (r#"{"model": "x"}"#, 400, "invalid_request_error"),
        (r#"{"input": []}"#, 400, "invalid_request_error"),
        (r#"{"input": ""}"#, 400, "invalid_request_error"),
        (r#"{"input": ["ok", "   "]}"#, 400, "invalid_request_error"),
        (
            r#"{"input": [101, 2023, 102]}"#,
            400,
            "invalid_request_error",
        ),
        (r#"{"input": {"text": "a"}}"#, 400, "invalid_request_error"),
        (
            r#"{"input": ["a", "b", "c", "d", "e"]}"#,
            400,
            "invalid_request_error",
        ),
        (
            r#"{"input": "a", "encoding_format": "int8"}"#,
            400,
            "invalid_request_error",
        ),
        (
            r#"{"input": "a", "dimensions": 128}"#,
            400,
            "invalid_request_error",
        ),
    ];
    for (body, status, kind) in cases {
        let r = post(&server, "/v1/embeddings", body);
        assert_error(&r, *status, kind);
    }
    let too_long = serde_json::json!({ "input": ["x".repeat(101)] }).to_string();
    let r = post(&server, "/v1/embeddings", &too_long);
    assert_error(&r, 400, "invalid_request_error");
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("101 bytes"),
        "{}",
        r.json
    );
    let too_big = serde_json::json!({ "input": vec!["y".repeat(50); 60] }).to_string();
    assert!(too_big.len() > 2048);
    assert_error(
        &post(&server, "/v1/embeddings", &too_big),
        413,
        "request_too_large",
    );

    // The estimate endpoint checks its input the same way.
    assert_error(
        &post(&server, "/estimate-memory", r#"{"input": []}"#),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&server, "/estimate-memory", "{"),
        400,
        "invalid_request_error",
    );

    assert_error(&get(&server, "/no/such/endpoint"), 404, "not_found_error");
    assert_error(
        &get(&server, "/v1/embeddings"),
        405,
        "invalid_request_error",
    );

    // Still serving.
    let r = post(&server, "/v1/embeddings", r#"{"input": ["still here"]}"#);
    assert_eq!(r.status, 200, "{}", r.json);
}

#[test]
fn status_plan_estimate_and_optimize() {
    let server = Server::start(app::app(rule_based_runtime()));
    let r = get(&server, "/status");
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(r.json["available_bytes"].as_u64().expect("available_bytes") > 0);
    assert!(r.json["pressure"].is_string(), "{}", r.json);
    assert!(r.json["recommended_action"].is_string(), "{}", r.json);
    assert_eq!(r.json["models"], serde_json::json!([]));

    let r = get(&server, "/plan");
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(r.json["threads"].as_u64().expect("threads") >= 1);

    // No local model: nothing to estimate for, and the runtime says so.
    let r = post(&server, "/estimate-memory", r#"{"input": ["a", "b"]}"#);
    assert_error(&r, 400, "invalid_request_error");
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("no local model"),
        "{}",
        r.json
    );

    let r = post_empty(&server, "/optimize-for-hardware");
    assert_eq!(r.status, 200, "{}", r.json);
    let result = r.json["result"].as_str().expect("result");
    assert!(result == "optimal" || result == "adjusted", "{}", r.json);
    if result == "adjusted" {
        assert!(r.json["new"]["cache_bytes"].is_u64(), "{}", r.json);
    }
}

#[test]
fn emergency_cleanup_is_rate_limited_with_retry_after() {
    let rt = rule_based_runtime();
    let server = Server::start(app::app(rt.clone()));
    let first = post_empty(&server, "/emergency/cleanup");
    assert_eq!(first.status, 200, "{}", first.json);
    assert!(first.json["rss_after"].is_u64(), "{}", first.json);
    assert!(first.json["models_unloaded"].is_array(), "{}", first.json);

    let second = post_empty(&server, "/emergency/cleanup");
    assert_error(&second, 429, "rate_limit_error");
    let retry: u64 = second
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    let interval = rt.config().emergency_min_interval.as_secs();
    assert!(
        (1..=interval.max(1)).contains(&retry),
        "Retry-After {retry} outside 1..={interval}"
    );
}

#[test]
fn a_panic_in_a_blocking_call_is_answered_500() {
    use axum::response::IntoResponse;
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let (status, body) = tokio_rt.block_on(async {
        let err = app::blocking(|| -> runtime::Result<()> { panic!("boom inside the runtime") })
            .await
            .expect_err("a panic is an error, not a crash");
        let resp = err.into_response();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body");
        (status, body)
    });
    assert_eq!(status, 500);
    let json: Value = serde_json::from_slice(&body).expect("JSON error");
    assert_eq!(json["error"]["type"], "server_error");
}

#[test]
fn the_server_is_a_remote_tier_for_another_runtime() {
    let server_rt = rule_based_runtime();
    let mut server = Server::start(app::app(server_rt.clone()));
    let remote = runtime::router::RemoteConfig {
        base_url: format!("http://{}", server.addr),
        api_key_env: None,
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(10),
        // The serving runtime has no model: its rule-based tier by name.
        model: runtime::RULE_BASED.into(),
        ..Default::default()
    };
    let client = runtime::Runtime::builder()
        .without_local_model()
        .remote(remote)
        .build()
        .expect("client runtime");
    let texts = ["the remote tier answers this", "and this one too"];
    let out = client.embed(&texts).expect("embed through the remote tier");
    assert_eq!(
        out.tier,
        Some(runtime::router::Tier::Remote),
        "trail: {:?}",
        out.trail
    );
    assert_eq!(out.backend.as_deref(), Some("remote"));
    // The server's runtime served exactly that one request.
    let served: u64 = server_rt
        .router()
        .stats()
        .iter()
        .map(|(_, _, b)| b.successes)
        .sum();
    assert_eq!(served, 1, "{:?}", server_rt.router().stats());
    let direct = server_rt.embed(&texts).expect("server-side embed");
    assert_eq!(
        out.vectors, direct.vectors,
        "the client got the server's vectors"
    );

    // With the server gone, the same client falls back to its own rule-based
    // tier: the tier reported above really was the network.
    server.shutdown();
    let out = client
        .embed(&["asked after the server stopped"])
        .expect("fallback");
    assert_eq!(
        out.tier,
        Some(runtime::router::Tier::RuleBased),
        "trail: {:?}",
        out.trail
    );
    assert!(
        out.trail.iter().any(|t| t.contains("remote")),
        "trail: {:?}",
        out.trail
    );
}
