//! Generation requests and their handle: [`GenerateRequest`] in,
//! [`Generation`] out — a blocking iterator of [`GenerationEvent`]s that can
//! also be polled or awaited without an async runtime. Dropping the handle
//! or calling [`Generation::cancel`] stops the sequence; its KV is freed
//! before the next step.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// What to continue: raw text, or a conversation rendered through the
/// model's chat template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Text continued as it is (with the model's BOS when it wants one).
    Text(String),
    /// Messages rendered by the model's chat template (a plain fallback
    /// where the GGUF has none), ending with the assistant's turn.
    Chat(Vec<models::Message>),
}

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// Tokens to generate at most. Default 128.
    pub max_tokens: usize,
    /// Stop strings (added to `sampling.stop`). Default none.
    pub stop: Vec<String>,
    /// Sampling. Default greedy.
    pub sampling: models::SamplingConfig,
    /// The whole request (queue and run) must end within this; it ends with
    /// [`FinishReason::Deadline`] otherwise. Default none.
    #[serde(with = "serde_with::As::<Option<serde_with::DurationMilliSeconds<f64>>>")]
    pub deadline: Option<Duration>,
    /// Higher runs first. Default normal.
    pub priority: batcher::Priority,
    /// The caller's own judgement of how hard the task is, in `[0, 1]`; it
    /// weighs in the tier choice when the model is `auto`. Default none.
    pub difficulty: Option<f32>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: Prompt::Text(String::new()),
            max_tokens: 128,
            stop: Vec::new(),
            sampling: models::SamplingConfig::greedy(),
            deadline: None,
            priority: batcher::Priority::NORMAL,
            difficulty: None,
        }
    }
}

impl GenerateRequest {
    /// A request continuing `text`.
    pub fn text(text: impl Into<String>) -> Self {
        GenerateRequest {
            prompt: Prompt::Text(text.into()),
            ..GenerateRequest::default()
        }
    }

    /// A chat request: one user message.
    pub fn chat(user: impl Into<String>) -> Self {
        GenerateRequest {
            prompt: Prompt::Chat(vec![models::Message::new("user", user)]),
            ..GenerateRequest::default()
        }
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context, was reached.
    Length,
    /// The handle was cancelled or dropped.
    Cancelled,
    /// The deadline passed.
    Deadline,
    /// No room for its KV cache came free in time, or none to grow it
    /// while it ran alone (see [`Finished::error`]).
    Memory,
    /// The model failed; see [`Finished::error`].
    Error,
}

impl FinishReason {
    /// Its name, as OpenAI's `finish_reason` spells the ones it shares.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
            FinishReason::Memory => "memory",
            FinishReason::Error => "error",
        }
    }
}

/// Token counts of a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// Where the time of a generation went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From the request to its admission into the step loop.
    pub queued_ms: f64,
    /// From the request to its first generated token (none if none came).
    pub time_to_first_token_ms: Option<f64>,
    /// From the request to its end.
    pub total_ms: f64,
}

/// Which tier and model served a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// The tier.
    pub tier: tier_router::Tier,
    /// The model's name (`rule-based` for the degraded answer).
    pub model: String,
    /// Why this tier and not an earlier one, in words (empty when the first
    /// choice served).
    pub trail: Vec<String>,
}

/// The last event of every generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// The error, when `reason` is `error` (or `memory`, with the numbers).
    pub error: Option<String>,
    /// Token counts (the remote tier's are the server's `usage`, zero when
    /// it reports none).
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// Which tier and model served it.
    pub served: Served,
}

/// What a [`Generation`] yields: text as it comes, then exactly one
/// [`GenerationEvent::Finished`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum GenerationEvent {
    /// New text and the token ids it came from. The text may be empty (a
    /// token ending mid-character, or text held back while it could begin
    /// a stop string) and may carry text of earlier tokens.
    Delta {
        /// Text safe to show.
        text: String,
        /// The token ids generated since the previous delta (empty from
        /// the remote and rule-based tiers, which send text only).
        tokens: Vec<u32>,
    },
    /// The end.
    Finished(Finished),
}

/// The sending side of a generation's events (held by the step loop).
#[derive(Debug, Clone)]
pub(crate) struct EventSink {
    tx: mpsc::Sender<GenerationEvent>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl EventSink {
    /// Sends an event; false when the handle is gone.
    pub(crate) fn send(&self, event: GenerationEvent) -> bool {
        let ok = self.tx.send(event).is_ok();
        if let Some(w) = self.waker.lock().take() {
            w.wake();
        }
        ok
    }
}

/// The whole answer of a generation, from [`Generation::wait`] or `.await`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The text generated.
    pub text: String,
    /// The token ids generated (none from the remote tier, whose server
    /// sends text only).
    pub tokens: Vec<u32>,
    /// How it ended.
    pub finished: Finished,
}

/// A running generation: iterate it for events (blocking), poll it with
/// [`Generation::poll_event`], or await it for the [`Completion`]. Dropping
/// it cancels the sequence.
pub struct Generation {
    rx: mpsc::Receiver<GenerationEvent>,
    waker: Arc<Mutex<Option<Waker>>>,
    handle: Option<batcher::SequenceHandle>,
    cancel_flag: Option<Arc<AtomicBool>>,
    served: Served,
    done: bool,
    text: String,
    tokens: Vec<u32>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("served", &self.served)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Generation {
    /// A handle and the sink its events go to.
    pub(crate) fn channel(served: Served) -> (Generation, EventSink) {
        let (tx, rx) = mpsc::channel();
        let waker = Arc::new(Mutex::new(None));
        let sink = EventSink {
            tx,
            waker: Arc::clone(&waker),
        };
        (
            Generation {
                rx,
                waker,
                handle: None,
                cancel_flag: None,
                served,
                done: false,
                text: String::new(),
                tokens: Vec::new(),
            },
            sink,
        )
    }

    pub(crate) fn attach(&mut self, handle: batcher::SequenceHandle) {
        self.handle = Some(handle);
    }

    /// A flag the producer reads between events (the remote tier's stream
    /// thread), set by [`Generation::cancel`].
    #[cfg_attr(not(feature = "remote"), allow(dead_code))]
    pub(crate) fn attach_cancel(&mut self, flag: Arc<AtomicBool>) {
        self.cancel_flag = Some(flag);
    }

    /// Which tier and model serve it.
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// Stops the sequence: it ends with [`FinishReason::Cancelled`] (the
    /// final event still comes) and its KV is freed before the next step.
    /// A remote generation stops reading its stream when the next piece
    /// arrives (and closes the connection).
    pub fn cancel(&self) {
        if let Some(h) = &self.handle {
            h.cancel();
        }
        if let Some(f) = &self.cancel_flag {
            f.store(true, Ordering::Release);
        }
    }

    fn lost_finished(&self) -> Finished {
        Finished {
            reason: FinishReason::Error,
            error: Some("the step loop ended without a final event".into()),
            usage: Usage::default(),
            timings: Timings::default(),
            served: self.served.clone(),
        }
    }

    fn lost(&self) -> GenerationEvent {
        GenerationEvent::Finished(self.lost_finished())
    }

    fn record(&mut self, e: &GenerationEvent) {
        match e {
            GenerationEvent::Delta { text, tokens } => {
                self.text.push_str(text);
                self.tokens.extend_from_slice(tokens);
            }
            GenerationEvent::Finished(_) => self.done = true,
        }
    }

    /// The next event if one is ready, without blocking; `Ready(None)`
    /// after the final event. Registers `cx`'s waker otherwise.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<GenerationEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        *self.waker.lock() = Some(cx.waker().clone());
        match self.rx.try_recv() {
            Ok(e) => {
                self.record(&e);
                Poll::Ready(Some(e))
            }
            Err(mpsc::TryRecvError::Empty) => Poll::Pending,
            Err(mpsc::TryRecvError::Disconnected) => {
                let e = self.lost();
                self.record(&e);
                Poll::Ready(Some(e))
            }
        }
    }

    /// The next event, waiting at most `timeout`; `Ok(None)` after the final
    /// event, `Err(())` on timeout.
    #[allow(clippy::result_unit_err)]
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<GenerationEvent>, ()> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv_timeout(timeout) {
            Ok(e) => {
                self.record(&e);
                Ok(Some(e))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let e = self.lost();
                self.record(&e);
                Ok(Some(e))
            }
        }
    }

    /// Blocks until the end; the whole text and how it ended.
    pub fn wait(mut self) -> Completion {
        let mut finished = None;
        for e in self.by_ref() {
            if let GenerationEvent::Finished(f) = e {
                finished = Some(f);
            }
        }
        let finished = finished.unwrap_or_else(|| self.lost_finished());
        Completion {
            text: std::mem::take(&mut self.text),
            tokens: std::mem::take(&mut self.tokens),
            finished,
        }
    }
}

impl Iterator for Generation {
    type Item = GenerationEvent;

    fn next(&mut self) -> Option<GenerationEvent> {
        if self.done {
            return None;
        }
        let e = self.rx.recv().unwrap_or_else(|_| self.lost());
        self.record(&e);
        Some(e)
    }
}

impl Future for Generation {
    type Output = Completion;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        let this = self.get_mut();
        loop {
            match this.poll_event(cx) {
                Poll::Ready(Some(GenerationEvent::Finished(f))) => {
                    return Poll::Ready(Completion {
                        text: std::mem::take(&mut this.text),
                        tokens: std::mem::take(&mut this.tokens),
                        finished: f,
                    })
                }
                Poll::Ready(Some(GenerationEvent::Delta { .. })) => continue,
                Poll::Ready(None) => {
                    return Poll::Ready(Completion {
                        text: std::mem::take(&mut this.text),
                        tokens: std::mem::take(&mut this.tokens),
                        finished: this.lost_finished(),
                    })
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
