//! A small OpenAI-compatible `/v1/embeddings` server on 127.0.0.1 for the tests, which can be
//! told to fail, stall or recover.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

/// What the server does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer with one embedding per input: `[chars, words, 1.0]`, listed in reverse order with
    /// their `index` so that the client must reorder them.
    Ok,
    /// Answer with this HTTP status and a short error body.
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
    stop: AtomicBool,
}

/// The running server; stops when dropped.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(mode: Mode) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            requests: AtomicU64::new(0),
            auth: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || handle(stream, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        TestServer {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock() = mode;
    }

    /// Requests received so far.
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
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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

fn handle(stream: TcpStream, s: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut content_length = 0usize;
    let mut auth = None;
    let mut line = String::new();
    // Request line and headers.
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                content_length = v.trim().parse().unwrap_or(0);
            } else if k == "authorization" {
                auth = Some(v.trim().to_string());
            }
        }
    }
    let mut body = vec![0u8; content_length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.auth.lock().push(auth);
    let mode = *s.mode.lock();
    let mut stream = stream;
    let (status, payload) = match mode {
        Mode::Hangup => return,
        Mode::Status(code) => (code, format!("{{\"error\":\"told to answer {code}\"}}")),
        Mode::BadJson => (200, "this is not json".to_string()),
        Mode::Ok | Mode::WrongCount | Mode::Stall(_) => {
            if let Mode::Stall(d) = mode {
                std::thread::sleep(d);
            }
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let inputs: Vec<String> = v["input"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            let mut data: Vec<serde_json::Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    serde_json::json!({
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
            let resp = serde_json::json!({
                "object": "list",
                "model": v["model"],
                "data": data,
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            });
            (200, resp.to_string())
        }
    };
    let reason = match status {
        200 => "OK",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        400 => "Bad Request",
        401 => "Unauthorized",
        _ => "Status",
    };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    let _ = stream.write_all(msg.as_bytes());
    let _ = stream.flush();
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit`.
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("test body did not finish within {limit:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("test body panicked"),
    }
}
