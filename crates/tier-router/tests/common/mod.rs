//! What the integration tests share: a time limit for a test body, and (in [`server`]) a fake
//! OpenAI-compatible server for the remote tier.

#![allow(dead_code, unreachable_pub)]

pub mod server;

use std::time::Duration;

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
