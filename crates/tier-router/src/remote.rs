//! The remote tier: an HTTP backend for OpenAI-compatible embedding servers
//! (`POST /v1/embeddings`, as spoken by vLLM, text-embeddings-inference, llama.cpp's server
//! and Ollama).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Deadline};
use crate::error::{BackendError, Error};

/// Where the remote server is and how long to wait for it.
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteConfig {
    /// Server base URL, e.g. `http://127.0.0.1:8080` or `https://host/v1`; `/v1/embeddings`
    /// (or `/embeddings` after a trailing `/v1`) is appended. Default `http://127.0.0.1:8080`.
    pub base_url: String,
    /// The `model` field sent with each request. Default `all-MiniLM-L6-v2`.
    pub model: String,
    /// Environment variable holding the API key, sent as `Authorization: Bearer <key>`; read
    /// once when the backend is built. Unset variable: no header. Default `SNUG_REMOTE_API_KEY`.
    pub api_key_env: Option<String>,
    /// Time allowed to open the TCP connection, in milliseconds in serde. Default 2 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub connect_timeout: Duration,
    /// Time allowed for the response to arrive, and again for its body; the request's
    /// deadline shortens both. In milliseconds in serde. Default 30 s.
    #[serde(with = "serde_with::As::<serde_with::DurationMilliSeconds<f64>>")]
    pub read_timeout: Duration,
    /// Largest response body accepted. Default 64 MiB.
    pub max_response_bytes: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080".into(),
            model: "all-MiniLM-L6-v2".into(),
            api_key_env: Some("SNUG_REMOTE_API_KEY".into()),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(30),
            max_response_bytes: 64 << 20,
        }
    }
}

/// The blocking HTTP client of the remote tier. Implements
/// `Backend<[String], Vec<Vec<f32>>>`; keeps connections alive between calls.
///
/// Errors are mapped for the router: connection refused or reset, timeouts, HTTP 408, 429 and
/// 5xx are transient (retried, then the next tier); other HTTP statuses, a malformed body or a
/// response whose count or shape does not match the request are permanent.
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
pub struct RemoteEmbedder {
    config: RemoteConfig,
    url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for RemoteEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEmbedder")
            .field("url", &self.url)
            .field("model", &self.config.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct EmbeddingRequest<'a> {
    model: &'a str,
    input: &'a [String],
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    embedding: Vec<f32>,
    #[serde(default)]
    index: Option<usize>,
}

/// The endpoint `path` of the OpenAI-compatible server at `base_url`
/// (`/v1/<path>`, or `/<path>` after a trailing `/v1`); `field` names the
/// configuration (`remote`, `remote_chat`) in the error for a URL that is not
/// http(s).
pub(crate) fn endpoint(field: &str, base_url: &str, path: &str) -> Result<String, Error> {
    let base = base_url.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(Error::invalid(
            format!("{field}.base_url"),
            base_url,
            "a URL starting with http:// or https://, e.g. http://127.0.0.1:8080",
        ));
    }
    Ok(if base.ends_with("/v1") {
        format!("{base}/{path}")
    } else {
        format!("{base}/v1/{path}")
    })
}

/// Refuses a zero connect or read timeout of the configuration `field`.
pub(crate) fn check_timeouts(field: &str, connect: Duration, read: Duration) -> Result<(), Error> {
    if connect.is_zero() || read.is_zero() {
        return Err(Error::invalid(
            format!("{field}.connect_timeout / {field}.read_timeout"),
            format!("{connect:?} / {read:?}"),
            "both above zero (defaults 2 s and 30 s)",
        ));
    }
    Ok(())
}

/// The API key in the environment variable `env`, if set and not empty.
pub(crate) fn api_key(env: Option<&str>) -> Option<String> {
    env.and_then(|name| std::env::var(name).ok())
        .filter(|k| !k.is_empty())
}

impl RemoteEmbedder {
    /// A client for the server in `config`; reads the API key from its environment variable.
    pub fn new(config: RemoteConfig) -> Result<Self, Error> {
        let url = endpoint("remote", &config.base_url, "embeddings")?;
        check_timeouts("remote", config.connect_timeout, config.read_timeout)?;
        let api_key = api_key(config.api_key_env.as_deref());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(config.connect_timeout))
            .timeout_recv_response(Some(config.read_timeout))
            .timeout_recv_body(Some(config.read_timeout))
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

    /// Embeds `texts`, answering before `deadline` or failing with a transient timeout.
    pub fn embed(
        &self,
        texts: &[String],
        deadline: Deadline,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
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
            .config()
            .timeout_recv_response(Some(read))
            .timeout_recv_body(Some(read))
            .timeout_global(global)
            .build();
        let body = EmbeddingRequest {
            model: &self.config.model,
            input: texts,
        };
        let mut resp = req.send_json(&body).map_err(|e| self.map_error(e))?;
        let status = resp.status().as_u16();
        if status != 200 {
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
        let parsed: EmbeddingResponse = resp
            .body_mut()
            .with_config()
            .limit(self.config.max_response_bytes)
            .read_json()
            .map_err(|e| self.map_error(e))?;
        self.order(parsed, texts.len())
    }

    fn order(&self, parsed: EmbeddingResponse, n: usize) -> Result<Vec<Vec<f32>>, BackendError> {
        if parsed.data.len() != n {
            return Err(BackendError::permanent(format!(
                "{} returned {} embeddings for {n} inputs",
                self.url,
                parsed.data.len()
            )));
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
        for (pos, item) in parsed.data.into_iter().enumerate() {
            let idx = item.index.unwrap_or(pos);
            match out.get_mut(idx) {
                Some(slot @ None) => *slot = Some(item.embedding),
                _ => {
                    return Err(BackendError::permanent(format!(
                        "{} returned index {idx} out of range or twice for {n} inputs",
                        self.url
                    )))
                }
            }
        }
        let out: Vec<Vec<f32>> = out.into_iter().flatten().collect();
        let dims = out.first().map_or(0, Vec::len);
        if dims == 0 || out.iter().any(|v| v.len() != dims) {
            return Err(BackendError::permanent(format!(
                "{} returned empty or ragged embeddings",
                self.url
            )));
        }
        Ok(out)
    }

    fn map_error(&self, e: ureq::Error) -> BackendError {
        let msg = format!("{}: {e}", self.url);
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
}

impl Backend<[String], Vec<Vec<f32>>> for RemoteEmbedder {
    fn call(&self, texts: &[String], deadline: Deadline) -> Result<Vec<Vec<f32>>, BackendError> {
        self.embed(texts, deadline)
    }

    fn is_loaded(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_serialize_as_milliseconds_and_zero_is_refused() {
        let json = serde_json::to_value(RemoteConfig::default()).unwrap();
        assert_eq!(json["connect_timeout"], 2000.0);
        assert_eq!(json["read_timeout"], 30_000.0);
        let config: RemoteConfig =
            serde_json::from_str(r#"{"base_url": "http://h:1", "read_timeout": 0}"#).unwrap();
        assert_eq!(config.read_timeout, Duration::ZERO);
        let e = RemoteEmbedder::new(config).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidConfig { field, .. } if field.contains("read_timeout")),
            "{e}"
        );
        let e = RemoteEmbedder::new(RemoteConfig {
            base_url: "ftp://h".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("remote.base_url = ftp://h"), "{e}");
    }
}
