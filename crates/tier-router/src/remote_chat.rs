//! The remote tier for generation: a streaming client for OpenAI-compatible
//! `POST /v1/chat/completions` servers (vLLM, llama.cpp's `llama-server`,
//! Ollama, another snug server), reading the server-sent events of
//! `"stream": true` one chunk at a time.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::Deadline;
use crate::error::{BackendError, Error};

/// Where the remote chat server is, how long to wait for it, and how much
/// of its stream to accept.
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteChatConfig {
    /// Server base URL, e.g. `http://127.0.0.1:8080` or `https://host/v1`;
    /// `/v1/chat/completions` (or `/chat/completions` after a trailing
    /// `/v1`) is appended. Default `http://127.0.0.1:8080`.
    pub base_url: String,
    /// The `model` field sent with each request, and the name the answers
    /// are served under. Default `remote`.
    pub model: String,
    /// Environment variable holding the API key, sent as
    /// `Authorization: Bearer <key>`; read once when the client is built.
    /// Unset variable: no header. Default `SNUG_REMOTE_API_KEY`.
    pub api_key_env: Option<String>,
    /// Time allowed to open the TCP connection, in milliseconds in serde.
    /// Default 2 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub connect_timeout: Duration,
    /// Time allowed for each read from the server: for the response headers
    /// to start arriving, and then between two pieces of the stream (a
    /// server that says nothing for this long has broken the stream). The
    /// request's deadline shortens it. In milliseconds in serde. Default 30 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub read_timeout: Duration,
    /// Bytes of one server-sent-event line at most. Default 1 MiB.
    pub max_line_bytes: usize,
    /// Bytes of the whole streamed response at most. Default 64 MiB.
    pub max_response_bytes: u64,
    /// Whether [`ChatRequest::top_k`], [`min_p`](ChatRequest::min_p) and
    /// [`repeat_penalty`](ChatRequest::repeat_penalty) go over the wire.
    /// They are not in OpenAI's API, but llama.cpp's `llama-server`, vLLM,
    /// Ollama and snug's own server take them under these names; turn this
    /// off for a server that refuses fields it does not know. Default true.
    pub sampling_extensions: bool,
}

impl Default for RemoteChatConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080".into(),
            model: "remote".into(),
            api_key_env: Some("SNUG_REMOTE_API_KEY".into()),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(30),
            max_line_bytes: 1 << 20,
            max_response_bytes: 64 << 20,
            sampling_extensions: true,
        }
    }
}

/// One message of a chat request (the crate's own type: it knows no model).
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

/// A streamed chat request, as sent to `/v1/chat/completions`.
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation, ending with the turn to answer.
    pub messages: Vec<ChatMessage>,
    /// Tokens to generate at most (`max_tokens`).
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0: greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Seed, where the server honours one.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Subtracted from the logit of each token already seen (OpenAI's
    /// `presence_penalty`).
    pub presence_penalty: Option<f32>,
    /// Subtracted per occurrence of each token already seen (OpenAI's
    /// `frequency_penalty`).
    pub frequency_penalty: Option<f32>,
    /// Keep the k most likely tokens (an extension; see
    /// [`RemoteChatConfig::sampling_extensions`]).
    pub top_k: Option<usize>,
    /// Drop tokens less likely than this times the most likely one (an
    /// extension).
    pub min_p: Option<f32>,
    /// llama.cpp's repetition penalty (an extension).
    pub repeat_penalty: Option<f32>,
}

/// Token counts the server reported (the chunk with `usage`).
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatUsage {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// What one piece of the stream carried.
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatEvent {
    /// New text (`choices[0].delta.content`), never empty.
    Delta(String),
    /// The server's `finish_reason` (`stop`, `length`, …).
    Finish(String),
    /// The token counts of the whole request.
    Usage(ChatUsage),
    /// `data: [DONE]`: the stream is complete.
    Done,
}

/// The blocking streaming client of the remote generation tier; keeps
/// connections alive between calls.
///
/// [`RemoteChat::stream`] sends the request with `"stream": true` (and
/// `stream_options.include_usage`, so that the server reports token
/// counts) and returns a [`ChatStream`] once the response headers have
/// arrived. Errors are mapped as the embeddings client maps them:
/// connection refused or reset, timeouts, a stream that breaks, HTTP 408,
/// 429 and 5xx are transient; other HTTP statuses and a malformed chunk are
/// permanent.
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
pub struct RemoteChat {
    config: RemoteChatConfig,
    url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for RemoteChat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteChat")
            .field("url", &self.url)
            .field("model", &self.config.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repeat_penalty: Option<f32>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<ChatUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
}

impl RemoteChat {
    /// A client for the server in `config`; reads the API key from its
    /// environment variable.
    pub fn new(config: RemoteChatConfig) -> Result<Self, Error> {
        let url = crate::remote::endpoint("remote_chat", &config.base_url, "chat/completions")?;
        crate::remote::check_timeouts("remote_chat", config.connect_timeout, config.read_timeout)?;
        if config.max_line_bytes < 64 {
            return Err(Error::invalid(
                "remote_chat.max_line_bytes",
                config.max_line_bytes,
                "at least 64 bytes (default 1 MiB)",
            ));
        }
        if config.max_response_bytes == 0 {
            return Err(Error::invalid(
                "remote_chat.max_response_bytes",
                0,
                "above zero (default 64 MiB)",
            ));
        }
        if config.model.is_empty() {
            return Err(Error::invalid(
                "remote_chat.model",
                "\"\"",
                "the model name the server serves (default `remote`)",
            ));
        }
        let api_key = crate::remote::api_key(config.api_key_env.as_deref());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(config.connect_timeout))
            .timeout_per_read(Some(config.read_timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            config,
            url,
            api_key,
            agent,
        })
    }

    /// The full endpoint URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The configuration.
    pub fn config(&self) -> &RemoteChatConfig {
        &self.config
    }

    /// Sends `request` and returns its stream once the response headers
    /// have arrived with status 200. The whole exchange ends by `deadline`
    /// (reads past it fail as timeouts).
    pub fn stream(
        &self,
        request: &ChatRequest,
        deadline: Deadline,
    ) -> Result<ChatStream, BackendError> {
        let mut read = self.config.read_timeout;
        let mut global = None;
        if let Some(left) = deadline.remaining() {
            if left.is_zero() {
                return Err(BackendError::transient(format!(
                    "deadline passed before the request to {} was sent",
                    self.url
                )));
            }
            read = read.min(left);
            global = Some(left);
        }
        let mut req = self.agent.post(&self.url);
        if let Some(key) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {key}"));
        }
        let req = req
            .header("Accept", "text/event-stream")
            .config()
            .timeout_per_read(Some(read))
            .timeout_global(global)
            .build();
        let body = WireRequest {
            model: &self.config.model,
            messages: &request.messages,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            max_tokens: request.max_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            stop: &request.stop,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            top_k: request.top_k.filter(|_| self.config.sampling_extensions),
            min_p: request.min_p.filter(|_| self.config.sampling_extensions),
            repeat_penalty: request
                .repeat_penalty
                .filter(|_| self.config.sampling_extensions),
        };
        let resp = req.send_json(&body).map_err(|e| map_error(&self.url, e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let mut resp = resp;
            let detail = resp
                .body_mut()
                .with_config()
                .limit(4096)
                .read_to_string()
                .unwrap_or_default();
            let detail = detail.trim();
            let msg = format!("{} answered HTTP {status}: {detail}", self.url);
            return Err(if status == 408 || status == 429 || status >= 500 {
                BackendError::transient(msg)
            } else {
                BackendError::permanent(msg)
            });
        }
        let reader = resp
            .into_body()
            .into_with_config()
            .limit(self.config.max_response_bytes)
            .reader();
        Ok(ChatStream {
            url: self.url.clone(),
            reader: BufReader::new(Box::new(reader)),
            max_line: self.config.max_line_bytes,
            line: Vec::new(),
            data: String::new(),
            pending: std::collections::VecDeque::new(),
            done: false,
        })
    }
}

/// The events of one streamed response, read as they arrive. Dropping it
/// closes the connection.
pub struct ChatStream {
    url: String,
    reader: BufReader<Box<dyn Read + Send>>,
    max_line: usize,
    line: Vec<u8>,
    data: String,
    pending: std::collections::VecDeque<ChatEvent>,
    done: bool,
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatStream")
            .field("url", &self.url)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ChatStream {
    /// The next event, blocking until it arrives; `Ok(None)` after
    /// [`ChatEvent::Done`] or when the server closed the stream (the caller
    /// decides whether a stream without a finish reason was complete). A
    /// read that fails or times out is a transient error; a chunk that is
    /// not JSON, too long a line, or an `error` object from the server, a
    /// permanent one.
    pub fn next_event(&mut self) -> Result<Option<ChatEvent>, BackendError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            if self.done {
                return Ok(None);
            }
            self.line.clear();
            let limit = self.max_line as u64 + 1;
            let n = (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.line)
                .map_err(|e| {
                    BackendError::transient(format!("reading the stream from {}: {e}", self.url))
                })?;
            if n == 0 {
                // End of the body: dispatch what is pending, then stop.
                self.done = true;
                self.dispatch()?;
                continue;
            }
            if self.line.last() != Some(&b'\n') && self.line.len() > self.max_line {
                return Err(BackendError::permanent(format!(
                    "{} sent a stream line longer than max_line_bytes = {}",
                    self.url, self.max_line
                )));
            }
            let text = String::from_utf8_lossy(&self.line);
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                self.dispatch()?;
            } else if let Some(value) = text.strip_prefix("data:") {
                let value = value.strip_prefix(' ').unwrap_or(value);
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                if self.data.len() > self.max_line {
                    return Err(BackendError::permanent(format!(
                        "{} sent a stream event longer than max_line_bytes = {}",
                        self.url, self.max_line
                    )));
                }
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing for us.
        }
    }

    /// Parses the event gathered from `data:` lines.
    fn dispatch(&mut self) -> Result<(), BackendError> {
        if self.data.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.data);
        if data.trim() == "[DONE]" {
            self.pending.push_back(ChatEvent::Done);
            self.done = true;
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_str(&data).map_err(|e| {
            BackendError::permanent(format!(
                "{} sent a stream chunk that is not a chat.completion.chunk: {e}",
                self.url
            ))
        })?;
        if let Some(err) = chunk.error {
            return Err(BackendError::permanent(format!(
                "{} reported an error in the stream: {err}",
                self.url
            )));
        }
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice.delta.and_then(|d| d.content) {
                if !text.is_empty() {
                    self.pending.push_back(ChatEvent::Delta(text));
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.pending.push_back(ChatEvent::Finish(reason));
            }
        }
        if let Some(usage) = chunk.usage {
            self.pending.push_back(ChatEvent::Usage(usage));
        }
        Ok(())
    }
}

fn map_error(url: &str, e: ureq::Error) -> BackendError {
    let msg = format!("{url}: {e}");
    match e {
        ureq::Error::Timeout(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Io(_)
        | ureq::Error::Protocol(_)
        | ureq::Error::BodyStalled => BackendError::transient(msg),
        ureq::Error::StatusCode(s) if s == 408 || s == 429 || s >= 500 => {
            BackendError::transient(msg)
        }
        _ => BackendError::permanent(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(body: &str) -> ChatStream {
        ChatStream {
            url: "http://test".into(),
            reader: BufReader::new(Box::new(std::io::Cursor::new(body.as_bytes().to_vec()))),
            max_line: 256,
            line: Vec::new(),
            data: String::new(),
            pending: Default::default(),
            done: false,
        }
    }

    fn all(mut s: ChatStream) -> Result<Vec<ChatEvent>, BackendError> {
        let mut v = Vec::new();
        while let Some(e) = s.next_event()? {
            v.push(e);
        }
        Ok(v)
    }

    #[test]
    fn sse_chunks_parse_into_deltas_finish_usage_and_done() {
        let body = ": keep-alive\n\n\
            data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n\
            data:{\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n\
            data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
            data: [DONE]\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"after done\"}}]}\n\n";
        assert_eq!(
            all(stream_of(body)).unwrap(),
            vec![
                ChatEvent::Delta("Hel".into()),
                ChatEvent::Delta("lo".into()),
                ChatEvent::Finish("length".into()),
                ChatEvent::Usage(ChatUsage {
                    prompt_tokens: 7,
                    completion_tokens: 2
                }),
                ChatEvent::Done,
            ]
        );
    }

    #[test]
    fn bad_chunks_long_lines_and_server_errors_are_permanent_errors() {
        let e = all(stream_of("data: {not json\n\n")).unwrap_err();
        assert!(
            !e.is_transient() && e.message.contains("not a chat.completion.chunk"),
            "{e}"
        );
        let long = format!("data: {}\n\n", "x".repeat(300));
        let e = all(stream_of(&long)).unwrap_err();
        assert!(e.message.contains("max_line_bytes = 256"), "{e}");
        let e = all(stream_of(
            "data: {\"error\":{\"message\":\"overloaded\"}}\n\n",
        ))
        .unwrap_err();
        assert!(e.message.contains("overloaded"), "{e}");
        // A body cut short ends the events without `Done`: the caller sees no finish.
        let v = all(stream_of(
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}",
        ))
        .unwrap();
        assert_eq!(v, vec![ChatEvent::Delta("a".into())]);
    }

    #[test]
    fn config_is_checked_and_urls_are_not_doubled() {
        let json = serde_json::to_value(RemoteChatConfig::default()).unwrap();
        assert_eq!(json["read_timeout"], 30_000.0);
        let c = RemoteChat::new(RemoteChatConfig {
            base_url: "http://h:1/v1/".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.url(), "http://h:1/v1/chat/completions");
        let e = RemoteChat::new(RemoteChatConfig {
            max_line_bytes: 10,
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("remote_chat.max_line_bytes = 10"),
            "{e}"
        );
        let e = RemoteChat::new(RemoteChatConfig {
            base_url: "h:1".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("remote_chat.base_url = h:1"), "{e}");
    }
}
