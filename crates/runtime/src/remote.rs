//! The remote generation tier: an OpenAI-compatible server's streamed
//! `/v1/chat/completions` (tier-router's [`RemoteChat`]) behind a
//! [`CircuitBreaker`], forwarded delta by delta into a [`Generation`] from a
//! thread of its own.
//!
//! [`RemoteTier::start`] returns once the first text has arrived (or the
//! stream ended with nothing to say): a request that fails before that —
//! refused connection, HTTP error, a stream that breaks before its first
//! text — is an `Err` with the reason, and [`Runtime::generate`] tries the
//! next tier. After the first delta the stream is the request's: a break
//! ends it with [`FinishReason::Error`] naming the cause, the deltas already
//! sent kept.
//!
//! [`Runtime::generate`]: crate::Runtime::generate

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tier_router::{
    BackendError, BreakerConfig, ChatEvent, ChatMessage, ChatRequest, CircuitBreaker, Deadline,
    Permit, RemoteChat, RemoteChatConfig, Tier,
};

use crate::error::Result;
use crate::generation::{
    FinishReason, Finished, GenerateRequest, Generation, GenerationEvent, Prompt, Served, Timings,
    Usage,
};

/// A remote OpenAI-compatible chat server as a generation tier (feature
/// `remote`): where it is, and the breaker that guards it.
///
/// ```
/// let json = r#"{"server": {"base_url": "http://127.0.0.1:8081", "model": "gemma3-270m"},
///                "breaker": {"failures": 2, "open_for": 5000}}"#;
/// let remote: runtime::RemoteGenerationConfig = serde_json::from_str(json).unwrap();
/// assert_eq!(remote.server.model, "gemma3-270m");
/// assert_eq!(remote.breaker.open_for, std::time::Duration::from_secs(5));
/// assert_eq!(remote.server.read_timeout, std::time::Duration::from_secs(30)); // the default
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteGenerationConfig {
    /// The server, its model, timeouts and stream limits (tier-router's
    /// defaults: `http://127.0.0.1:8080`, model `remote`, 2 s to connect,
    /// 30 s per read).
    pub server: RemoteChatConfig,
    /// When the tier is skipped: connection errors, HTTP 408, 429 and 5xx
    /// and broken streams count as failures; an HTTP 4xx answer (the server
    /// is up, the request was refused) does not. tier-router's defaults:
    /// open after 3 failures in a row, closed again by one probe after 30 s.
    /// An outcome is recorded when the stream ends, so `slow_call` (off by
    /// default) would time whole generations: leave it off here.
    pub breaker: BreakerConfig,
}

/// The remote tier of a runtime: the client and its breaker.
#[derive(Debug)]
pub(crate) struct RemoteTier {
    client: RemoteChat,
    breaker: CircuitBreaker,
}

/// What the stream thread says before the caller gets its handle.
type Start = std::result::Result<(), String>;

impl RemoteTier {
    pub(crate) fn new(config: &RemoteGenerationConfig) -> Result<Self> {
        let client = RemoteChat::new(config.server.clone())?;
        let breaker = CircuitBreaker::new(
            format!("remote {}", config.server.model),
            config.breaker.clone(),
        )?;
        Ok(Self { client, breaker })
    }

    /// The model name answers are served under.
    pub(crate) fn model(&self) -> &str {
        &self.client.config().model
    }

    pub(crate) fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Streams `req` from the server. `Ok` once the first text arrived (or
    /// the server ended the answer with none); `Err` with the reason when
    /// the tier is skipped (breaker open) or failed before any text.
    pub(crate) fn start(
        self: &Arc<Self>,
        req: &GenerateRequest,
        trail: Vec<String>,
        started: Instant,
    ) -> std::result::Result<Generation, String> {
        let served = Served {
            tier: Tier::Remote,
            model: self.model().to_string(),
            trail,
        };
        let (mut generation, sink) = Generation::channel(served.clone());
        let cancel = Arc::new(AtomicBool::new(false));
        generation.attach_cancel(Arc::clone(&cancel));
        let (tx, rx) = mpsc::sync_channel::<Start>(1);
        let run = Run {
            tier: Arc::clone(self),
            request: chat_request(req),
            deadline: req.deadline.and_then(|d| started.checked_add(d)),
            sink,
            served,
            cancel,
            started,
        };
        std::thread::Builder::new()
            .name("snug-remote-stream".into())
            .spawn(move || run.run(tx))
            .map_err(|e| format!("its stream thread could not start: {e}"))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(generation),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err("its stream thread ended without a word".into()),
        }
    }
}

/// The request as the server takes it: a chat as it is, a text prompt as
/// one user message (chat servers render their own template; raw
/// continuation through `/v1/completions` is not offered by every one).
/// Each sampling setting that is not off goes with it: OpenAI's fields, and
/// `top_k`, `min_p` and `repeat_penalty` where the server's configuration
/// allows them (`sampling_extensions`). The penalties' window
/// (`penalty_last_n`) and stop token ids have no common field and stay
/// behind.
fn chat_request(req: &GenerateRequest) -> ChatRequest {
    let messages = match &req.prompt {
        Prompt::Chat(m) => m
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect(),
        Prompt::Text(t) => vec![ChatMessage {
            role: "user".into(),
            content: t.clone(),
        }],
    };
    let s = &req.sampling;
    let mut stop = s.stop.clone();
    stop.extend(req.stop.iter().cloned());
    ChatRequest {
        messages,
        max_tokens: Some(req.max_tokens),
        temperature: Some(s.temperature),
        top_p: (s.top_p < 1.0).then_some(s.top_p),
        seed: s.seed,
        stop,
        presence_penalty: (s.presence_penalty != 0.0).then_some(s.presence_penalty),
        frequency_penalty: (s.frequency_penalty != 0.0).then_some(s.frequency_penalty),
        top_k: (s.top_k > 0).then_some(s.top_k),
        min_p: (s.min_p > 0.0).then_some(s.min_p),
        repeat_penalty: (s.repeat_penalty != 1.0).then_some(s.repeat_penalty),
    }
}

/// How often a stream waiting for its server's next piece looks at its
/// cancel flag and deadline.
const POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// One read of the stream: an event, its end, or why it broke.
type Read = std::result::Result<Option<ChatEvent>, BackendError>;

/// Reads `stream` on a thread of its own into a channel, until its end, an
/// error, or the receiver is dropped (then after the read in progress).
fn read_ahead(mut stream: tier_router::ChatStream) -> mpsc::Receiver<Read> {
    let (tx, rx) = mpsc::sync_channel::<Read>(64);
    let spawned = std::thread::Builder::new()
        .name("snug-remote-read".into())
        .spawn(move || loop {
            let event = stream.next_event();
            let last = !matches!(event, Ok(Some(ref e)) if *e != ChatEvent::Done);
            if tx.send(event).is_err() || last {
                break;
            }
        });
    if let Err(e) = spawned {
        // The receiver reports it as the stream's break.
        tracing::warn!(error = %e, "the remote stream's reader thread could not start");
    }
    rx
}

/// One stream, on its thread.
struct Run {
    tier: Arc<RemoteTier>,
    request: ChatRequest,
    deadline: Option<Instant>,
    sink: crate::generation::EventSink,
    served: Served,
    cancel: Arc<AtomicBool>,
    started: Instant,
}

/// How the breaker counts an error before the body: a refused or failed
/// exchange is the server's failure; an HTTP 4xx refusal is not (the server
/// answered).
fn record_start_error(permit: Permit<'_>, e: &BackendError) {
    if e.is_transient() {
        permit.failure();
    } else {
        permit.success();
    }
}

impl Run {
    fn ms(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64() * 1e3
    }

    fn run(self, tx: mpsc::SyncSender<Start>) {
        let tier = Arc::clone(&self.tier);
        // Admission is asked here, where the permit can live as long as the
        // stream; an open breaker rejects (and counts the rejection) before
        // any connection.
        let permit = match tier.breaker.try_acquire() {
            Ok(p) => p,
            Err(r) => {
                let _ = tx.send(Err(format!("skipped, {r}")));
                return;
            }
        };
        let deadline = self.deadline.map_or(Deadline::none(), Deadline::at);
        let stream = match tier.client.stream(&self.request, deadline) {
            Ok(s) => s,
            Err(_) if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                // The request's own deadline cut the exchange short: it
                // ends so, and says nothing of the server's health.
                permit.success();
                let _ = tx.send(Ok(()));
                self.finish(FinishReason::Deadline, None, Usage::default(), None, None);
                return;
            }
            Err(e) => {
                record_start_error(permit, &e);
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        let answered = Instant::now();
        // The blocking reads run on a thread of their own, so that a cancel
        // or the deadline ends the generation within `POLL` even while a
        // silent server keeps a read waiting (up to `read_timeout`); that
        // thread closes the connection once its read returns.
        let events = read_ahead(stream);
        let mut tx = Some(tx);
        let mut first: Option<Instant> = None;
        let mut deltas = 0usize;
        let mut finish: Option<String> = None;
        let mut usage = None;
        let mut done = false;
        let mut broke: Option<BackendError> = None;
        let mut stopped: Option<FinishReason> = None;
        loop {
            if self.cancel.load(Ordering::Acquire) {
                stopped = Some(FinishReason::Cancelled);
                break;
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                stopped = Some(FinishReason::Deadline);
                break;
            }
            let event = match events.recv_timeout(POLL) {
                Ok(e) => e,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(BackendError::transient(
                    "the thread reading the stream ended without a word".to_string(),
                )),
            };
            if self.cancel.load(Ordering::Acquire) {
                // Cancelled while the read was waiting: what it brought is
                // not forwarded.
                stopped = Some(FinishReason::Cancelled);
                break;
            }
            match event {
                Ok(Some(ChatEvent::Delta(text))) => {
                    if let Some(tx) = tx.take() {
                        first = Some(Instant::now());
                        let _ = tx.send(Ok(()));
                    }
                    deltas += 1;
                    let sent = self.sink.send(GenerationEvent::Delta {
                        text,
                        tokens: Vec::new(),
                    });
                    if !sent {
                        // The handle is gone: stop reading (dropping the
                        // stream closes the connection).
                        permit.success();
                        return;
                    }
                }
                Ok(Some(ChatEvent::Finish(r))) => finish = Some(r),
                Ok(Some(ChatEvent::Usage(u))) => usage = Some(u),
                Ok(Some(ChatEvent::Done)) => {
                    done = true;
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    broke = Some(e);
                    break;
                }
            }
        }
        drop(events);
        if stopped.is_none() && self.deadline.is_some_and(|d| Instant::now() >= d) {
            // A read cut short by the deadline is the deadline's doing.
            stopped = Some(FinishReason::Deadline);
            broke = None;
        }
        // A stream is complete with `[DONE]`, or with a finish reason even
        // if what followed it (the usage chunk, `[DONE]`) was lost.
        let complete = done || finish.is_some();
        let failure = match (&broke, complete, stopped) {
            (_, _, Some(_)) => None,
            (Some(e), false, None) => Some(format!(
                "the stream from {} broke after {deltas} text piece(s): {e}",
                tier.client.url()
            )),
            (None, false, None) => Some(format!(
                "the stream from {} ended after {deltas} text piece(s) without a finish reason or [DONE]",
                tier.client.url()
            )),
            (_, true, None) => None,
        };
        if let Some(tx) = tx.take() {
            // Nothing was sent yet: a failure falls to the next tier.
            if let Some(msg) = failure {
                permit.failure();
                let _ = tx.send(Err(msg));
                return;
            }
            let _ = tx.send(Ok(()));
        }
        if failure.is_some() {
            permit.failure();
        } else {
            permit.success();
        }
        let reason = match (stopped, &failure) {
            (Some(r), _) => r,
            (None, Some(_)) => FinishReason::Error,
            (None, None) => match finish.as_deref() {
                Some("length") => FinishReason::Length,
                _ => FinishReason::Stop,
            },
        };
        let usage = usage.map_or(Usage::default(), |u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        });
        self.finish(reason, failure, usage, Some(answered), first);
    }

    /// Sends the final event.
    fn finish(
        &self,
        reason: FinishReason,
        error: Option<String>,
        usage: Usage,
        answered: Option<Instant>,
        first: Option<Instant>,
    ) {
        let now = Instant::now();
        self.sink.send(GenerationEvent::Finished(Finished {
            reason,
            error,
            usage,
            timings: Timings {
                queued_ms: self.ms(answered.unwrap_or(now)),
                time_to_first_token_ms: first.map(|t| self.ms(t)),
                total_ms: self.ms(now),
            },
            served: self.served.clone(),
        }));
    }
}
