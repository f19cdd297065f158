//! A small OpenAI-compatible `POST /v1/embeddings` server on 127.0.0.1 for the tests: axum on
//! a tokio runtime of its own, on a real socket, which can be told to fail, stall, hang up or
//! recover, and which records what it received.

use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Json;
use parking_lot::Mutex;
use serde_json::{json, Value};

/// What the server does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer with one embedding per input: `[chars, words, 1.0]`, listed in reverse order with
    /// their `index` so that the client must reorder them.
    Ok,
    /// Answer with this HTTP status and a short JSON error body.
    Status(u16),
    /// Wait this long before answering correctly.
    Stall(Duration),
    /// Answer 200 with a body that is not JSON.
    BadJson,
    /// Answer 200 with one embedding too few.
    WrongCount,
    /// Close the connection without answering.
    Hangup,
}

#[derive(Debug)]
struct Shared {
    mode: Mutex<Mode>,
    requests: AtomicU64,
    auth: Mutex<Vec<Option<String>>>,
}

/// The running server; stops when dropped (requests in flight are abandoned).
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(mode: Mode) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            requests: AtomicU64::new(0),
            auth: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .route("/v1/embeddings", post(embeddings))
            .with_state(shared.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            axum::serve(listener, app).await.expect("serve");
        });
        TestServer {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock() = mode;
    }

    /// Requests received so far (each counted once its body has arrived).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// `Authorization` headers seen, one per request.
    pub fn auth_headers(&self) -> Vec<Option<String>> {
        self.shared.auth.lock().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

async fn embeddings(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    s.auth.lock().push(auth);
    let mode = *s.mode.lock();
    match mode {
        // The body fails before its first byte: hyper drops the connection unanswered.
        Mode::Hangup => Response::new(Body::from_stream(HangUp)),
        Mode::Status(code) => (
            StatusCode::from_u16(code).expect("a valid status code"),
            Json(json!({ "error": format!("told to answer {code}") })),
        )
            .into_response(),
        Mode::BadJson => (
            [(header::CONTENT_TYPE, "application/json")],
            "this is not json",
        )
            .into_response(),
        Mode::Ok | Mode::WrongCount | Mode::Stall(_) => {
            if let Mode::Stall(d) = mode {
                tokio::time::sleep(d).await;
            }
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let inputs: Vec<&str> = v["input"]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_str().unwrap_or_default()).collect())
                .unwrap_or_default();
            let mut data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    json!({
                        "object": "embedding",
                        "index": i,
                        "embedding": [t.chars().count() as f32, t.split_whitespace().count() as f32, 1.0],
                    })
                })
                .collect();
            data.reverse();
            if mode == Mode::WrongCount {
                data.pop();
            }
            Json(json!({
                "object": "list",
                "model": v["model"],
                "data": data,
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }))
            .into_response()
        }
    }
}

/// A response body whose first read fails.
struct HangUp;

impl futures_core::Stream for HangUp {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(Some(Err(std::io::Error::other("told to hang up"))))
    }
}
