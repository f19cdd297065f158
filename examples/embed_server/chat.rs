//! OpenAI-compatible generation: `POST /v1/chat/completions` and
//! `POST /v1/completions`, answered whole or streamed as server-sent events
//! in OpenAI's chunk format (ending `data: [DONE]`), with usage. Every answer
//! says which tier and model served it: the `snug` field of the body (and of
//! the first and last chunk) and the `x-snug-tier` / `x-snug-model` headers.
//!
//! A client that disconnects drops the response stream (or the handler's
//! future), which drops the runtime's `Generation` and so cancels the
//! sequence before its next step.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use runtime::{FinishReason, Finished, GenerateRequest, Generation, GenerationEvent, Prompt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, parse_json, ApiError, AppState};

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    /// A string, or a list of `{type: "text", text}` parts.
    content: Option<Value>,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    stop: Option<Stop>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Extensions llama.cpp's server, vLLM and Ollama take too.
    top_k: Option<usize>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    /// snug's own: the caller's difficulty in [0, 1], for `model: "auto"`.
    difficulty: Option<f32>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

fn text_of(content: Option<Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    _ => return Err(ApiError::bad_request(
                        "only text content parts ({\"type\":\"text\",\"text\":…}) are supported",
                    )),
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::bad_request(
            "message content must be a string or a list of text parts",
        )),
    }
}

fn request(
    st: &AppState,
    prompt: Prompt,
    c: &Common,
    default_max: usize,
) -> Result<GenerateRequest, ApiError> {
    let mut sampling = runtime::models::SamplingConfig::greedy();
    if let Some(t) = c.temperature {
        sampling = if t > 0.0 {
            runtime::models::SamplingConfig {
                temperature: t,
                ..runtime::models::SamplingConfig::default()
            }
        } else {
            runtime::models::SamplingConfig::greedy()
        };
    }
    if let Some(p) = c.top_p {
        sampling.top_p = p;
    }
    sampling.seed = c.seed;
    if let Some(p) = c.presence_penalty {
        sampling.presence_penalty = p;
    }
    if let Some(p) = c.frequency_penalty {
        sampling.frequency_penalty = p;
    }
    if let Some(k) = c.top_k {
        sampling.top_k = k;
    }
    if let Some(p) = c.min_p {
        sampling.min_p = p;
    }
    if let Some(p) = c.repeat_penalty {
        sampling.repeat_penalty = p;
    }
    sampling
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("a stop string is empty"));
    }
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(default_max);
    if max_tokens > st.limits.max_generate_tokens {
        return Err(ApiError::bad_request(format!(
            "max_tokens = {max_tokens} is over this server's limit of {}",
            st.limits.max_generate_tokens
        )));
    }
    Ok(GenerateRequest {
        prompt,
        max_tokens,
        stop,
        sampling,
        deadline: Some(st.limits.generate_timeout),
        difficulty: c.difficulty,
        ..GenerateRequest::default()
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(kind: Kind) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!("{prefix}-snug-{:x}-{n}", now_secs())
}

/// OpenAI's `finish_reason` for ours: `stop` and `length` as they are;
/// a deadline ends the text like a length limit; the others keep snug's
/// word (the `snug` field always has the exact reason).
fn openai_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Deadline => "length",
        other => other.as_str(),
    }
}

fn usage(f: &Finished) -> Value {
    json!({
        "prompt_tokens": f.usage.prompt_tokens,
        "completion_tokens": f.usage.completion_tokens,
        "total_tokens": f.usage.prompt_tokens + f.usage.completion_tokens,
    })
}

fn snug_field(served: &runtime::Served, f: Option<&Finished>) -> Value {
    let mut v = json!({
        "tier": served.tier.to_string(),
        "model": served.model,
        "trail": served.trail,
    });
    if let Some(f) = f {
        v["finish_reason"] = json!(f.reason.as_str());
        v["error"] = json!(f.error);
        v["timings"] = json!(f.timings);
    }
    v
}

fn headers(resp: &mut Response, served: &runtime::Served) {
    let h = resp.headers_mut();
    for (name, value) in [
        ("x-snug-tier", served.tier.to_string()),
        ("x-snug-model", served.model.clone()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

pub(crate) async fn chat_completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_json(body)?;
    let messages = req
        .messages
        .ok_or_else(|| ApiError::bad_request("missing field `messages`"))?;
    if messages.is_empty() {
        return Err(ApiError::bad_request("`messages` is empty"));
    }
    let messages = messages
        .into_iter()
        .map(|m| Ok(runtime::models::Message::new(m.role, text_of(m.content)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let gen_req = request(
        &st,
        Prompt::Chat(messages),
        &req.common,
        st.limits.default_max_tokens,
    )?;
    serve(st, Kind::Chat, req.common, gen_req).await
}

pub(crate) async fn completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    let prompt = match req.prompt {
        Some(Value::String(s)) => s,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "`prompt` must be a string (token arrays and batches are not supported)",
            ))
        }
        None => return Err(ApiError::bad_request("missing field `prompt`")),
    };
    // OpenAI's default for completions is 16 tokens.
    let gen_req = request(&st, Prompt::Text(prompt), &req.common, 16)?;
    serve(st, Kind::Completion, req.common, gen_req).await
}

async fn serve(
    st: AppState,
    kind: Kind,
    common: Common,
    gen_req: GenerateRequest,
) -> Result<Response, ApiError> {
    let model = common
        .model
        .clone()
        .unwrap_or_else(|| runtime::AUTO.to_string());
    let rt = st.rt.clone();
    let name = model.clone();
    let generation = blocking(move || rt.generate(&name, gen_req)).await?;
    let served = generation.served().clone();
    st.metrics.request(
        match kind {
            Kind::Chat => "chat",
            Kind::Completion => "completions",
        },
        &served,
    );
    let id = new_id(kind);
    if common.stream {
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        let stream = Chunks {
            generation,
            kind,
            id,
            model,
            created: now_secs(),
            include_usage,
            started: false,
            done: false,
            queue: VecDeque::new(),
        };
        let mut resp = Sse::new(stream).into_response();
        headers(&mut resp, &served);
        return Ok(resp);
    }
    // Awaiting the generation needs no blocking thread; if the client goes,
    // axum drops this future and with it the generation (cancelled).
    let completion = generation.await;
    let f = &completion.finished;
    let choice = match kind {
        Kind::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": completion.text },
            "logprobs": null,
            "finish_reason": openai_reason(f.reason),
        }),
        Kind::Completion => json!({
            "index": 0,
            "text": completion.text,
            "logprobs": null,
            "finish_reason": openai_reason(f.reason),
        }),
    };
    let body = json!({
        "id": id,
        "object": match kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
        "created": now_secs(),
        "model": model,
        "system_fingerprint": null,
        "choices": [choice],
        "usage": usage(f),
        "snug": snug_field(&f.served, Some(f)),
    });
    let mut resp = Json(body).into_response();
    headers(&mut resp, &f.served);
    Ok(resp)
}

/// The SSE stream of one generation, in OpenAI's chunk format.
struct Chunks {
    generation: Generation,
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    started: bool,
    done: bool,
    queue: VecDeque<Event>,
}

impl Chunks {
    fn chunk(&self, choices: Value, extra: Vec<(&str, Value)>) -> Event {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        for (k, x) in extra {
            v[k] = x;
        }
        Event::default().data(v.to_string())
    }

    fn text_choice(&self, text: &str, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => json!([{
                "index": 0,
                "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({ "content": text }) },
                "logprobs": null,
                "finish_reason": finish,
            }]),
            Kind::Completion => json!([{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }]),
        }
    }

    fn push_event(&mut self, e: GenerationEvent) {
        if !self.started {
            self.started = true;
            if self.kind == Kind::Chat {
                let first = json!([{
                    "index": 0,
                    "delta": { "role": "assistant", "content": "" },
                    "logprobs": null,
                    "finish_reason": null,
                }]);
                let snug = snug_field(self.generation.served(), None);
                let c = self.chunk(first, vec![("snug", snug)]);
                self.queue.push_back(c);
            }
        }
        match e {
            GenerationEvent::Delta { text, .. } => {
                if !text.is_empty() {
                    let c = self.chunk(self.text_choice(&text, None), Vec::new());
                    self.queue.push_back(c);
                }
            }
            GenerationEvent::Finished(f) => {
                let last = self.text_choice("", Some(openai_reason(f.reason)));
                let mut extra = vec![("snug", snug_field(&f.served, Some(&f)))];
                if !self.include_usage {
                    // Usage on the last chunk, as llama-server sends it.
                    extra.push(("usage", usage(&f)));
                }
                let c = self.chunk(last, extra);
                self.queue.push_back(c);
                if self.include_usage {
                    let u = self.chunk(json!([]), vec![("usage", usage(&f))]);
                    self.queue.push_back(u);
                }
                self.queue.push_back(Event::default().data("[DONE]"));
                self.done = true;
            }
        }
    }
}

impl futures_core::Stream for Chunks {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(e) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.generation.poll_event(cx) {
                Poll::Ready(Some(e)) => this.push_event(e),
                Poll::Ready(None) => this.done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// `GET /v1/models`: every registered model (and `auto`).
pub(crate) async fn list_models(State(st): State<AppState>) -> Json<Value> {
    let created = now_secs();
    let mut data: Vec<Value> = st
        .rt
        .models()
        .into_iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "snug",
                "snug": { "kind": m.kind, "tier": m.tier.map(|t| t.to_string()) },
            })
        })
        .collect();
    if data.iter().any(|m| m["snug"]["kind"] == "generative") {
        data.push(json!({
            "id": runtime::AUTO, "object": "model", "created": created, "owned_by": "snug",
            "snug": { "kind": "generative", "tier": "chosen by complexity" },
        }));
    }
    Json(json!({ "object": "list", "data": data }))
}
