//! The HTTP face of a [`runtime::Runtime`]: an axum router with
//! OpenAI-compatible `POST /v1/chat/completions`, `POST /v1/completions`
//! (whole or streamed), `GET /v1/models` and `POST /v1/embeddings`, plus
//! `GET /health`, `GET /metrics` (Prometheus text) and the runtime's
//! operations.
//!
//! Every runtime call blocks, so each runs on tokio's blocking pool; a panic
//! there is caught by the join and answered 500, and the server goes on.
//! Every error is JSON in OpenAI's shape: `{"error":{"message":…,"type":…}}`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

#[path = "chat.rs"]
mod chat;
#[path = "metrics.rs"]
mod metrics;

/// The server's own limits on a request, checked before the runtime sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Limits {
    /// Largest request body, bytes. Default 4 MiB.
    pub(crate) max_body_bytes: usize,
    /// Texts per request at most. Default 2048 (OpenAI's limit).
    pub(crate) max_inputs: usize,
    /// Bytes per text at most. Default 64 KiB: the model reads 256 tokens
    /// of a text, about 1 KiB of English, so longer texts belong in the
    /// runtime's chunker, not in one embedding.
    pub(crate) max_input_bytes: usize,
    /// `max_tokens` of a chat completion that names none. Default 256.
    pub(crate) default_max_tokens: usize,
    /// `max_tokens` of one request at most. Default 2048.
    pub(crate) max_generate_tokens: usize,
    /// A generation (queue and run) ends after this. Default 120 s.
    #[serde(with = "secs")]
    pub(crate) generate_timeout: Duration,
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Duration::try_from_secs_f64(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_inputs: 2048,
            max_input_bytes: 64 << 10,
            default_max_tokens: 256,
            max_generate_tokens: 2048,
            generate_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    rt: runtime::Runtime,
    limits: Limits,
    metrics: std::sync::Arc<metrics::Metrics>,
}

/// The router with the default [`Limits`].
pub(crate) fn app(rt: runtime::Runtime) -> Router {
    app_with(rt, Limits::default())
}

/// The router: `POST /v1/embeddings`, `GET /status`, `GET /plan`,
/// `POST /estimate-memory`, `POST /optimize-for-hardware`,
/// `POST /emergency/cleanup`.
pub(crate) fn app_with(rt: runtime::Runtime, limits: Limits) -> Router {
    let body_limit = limits.max_body_bytes;
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/models", get(chat::list_models))
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route("/metrics", get(metrics::metrics))
        .route("/status", get(status))
        .route("/plan", get(plan))
        .route("/estimate-memory", post(estimate_memory))
        .route("/optimize-for-hardware", post(optimize))
        .route("/emergency/cleanup", post(cleanup))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(AppState {
            rt,
            limits,
            metrics: Default::default(),
        })
}

/// An error answered as `{"error":{"message":…,"type":…}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
}

impl From<runtime::Error> for ApiError {
    fn from(e: runtime::Error) -> Self {
        let message = e.to_string();
        match e {
            runtime::Error::InvalidInput(_) | runtime::Error::KvTooLarge { .. } => {
                Self::bad_request(message)
            }
            runtime::Error::UnknownModel { .. } => ApiError {
                code: Some("model_not_found"),
                ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
            },
            runtime::Error::Overloaded { .. } => ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            runtime::Error::RateLimited { retry_after } => ApiError {
                retry_after: Some(retry_after),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            runtime::Error::DoesNotFit { .. } | runtime::Error::Router(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            ),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            eprintln!("request failed: {} {}", self.status, self.message);
        }
        let body = serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "param": null, "code": self.code }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up, at least 1.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// Runs a blocking runtime call on tokio's blocking pool; a panic in it is
/// answered 500 instead of taking the connection (or the server) down.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> runtime::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(join) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            if join.is_panic() {
                "the request panicked inside the runtime; see the server log"
            } else {
                "the request was cancelled"
            },
        )),
    }
}

/// `input`: one text or a list of texts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    input: Option<serde_json::Value>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct EstimateRequest {
    input: Option<serde_json::Value>,
}

fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_request_error"
        };
        ApiError::new(status, kind, r.body_text())
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("request body is not the expected JSON: {e}")))
}

/// Checks `input` against the limits: present, a string or a list of
/// strings, not empty, not too many, none too long.
fn texts(input: Option<serde_json::Value>, limits: &Limits) -> Result<Vec<String>, ApiError> {
    let input = input.ok_or_else(|| {
        ApiError::bad_request("missing field `input`: give a string or a list of strings")
    })?;
    let texts = match serde_json::from_value::<Input>(input) {
        Ok(Input::One(t)) => vec![t],
        Ok(Input::Many(ts)) => ts,
        Err(_) => {
            return Err(ApiError::bad_request(
                "`input` must be a string or a list of strings (token arrays are not accepted)",
            ))
        }
    };
    if texts.is_empty() {
        return Err(ApiError::bad_request(
            "`input` is empty: give at least one text",
        ));
    }
    if texts.len() > limits.max_inputs {
        return Err(ApiError::bad_request(format!(
            "{} texts in one request, over the limit of {}; split the request",
            texts.len(),
            limits.max_inputs
        )));
    }
    if let Some((i, _)) = texts.iter().enumerate().find(|(_, t)| t.trim().is_empty()) {
        return Err(ApiError::bad_request(format!(
            "text {i} is empty: every input must contain some text"
        )));
    }
    if let Some((i, t)) = texts
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > limits.max_input_bytes)
    {
        return Err(ApiError::bad_request(format!(
            "text {i} is {} bytes, over the limit of {} per text; split long documents into passages",
            t.len(),
            limits.max_input_bytes
        )));
    }
    Ok(texts)
}

#[derive(Debug, Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: serde_json::Value,
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Debug, Serialize)]
struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: String,
    usage: Usage,
}

async fn embeddings(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: EmbeddingsRequest = parse_json(body)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format {other:?} is not supported: use \"float\" or \"base64\""
            )))
        }
    };
    let dim = st.rt.dim();
    if let Some(d) = req.dimensions.filter(|&d| d != dim) {
        return Err(ApiError::bad_request(format!(
            "dimensions {d} is not available: this server returns {dim}"
        )));
    }
    let texts = texts(req.input, &st.limits)?;
    let rt = st.rt.clone();
    let model_name = req.model.clone();
    let (out, tokens) = blocking(move || {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let out = match &model_name {
            Some(m) => rt.embed_model(m, &refs)?,
            None => rt.embed(&refs)?,
        };
        // Token counts from the model's tokenizer when a local model
        // served; otherwise the words-to-tokens rule of thumb (4 per 3).
        let counted = if out.tier.is_some_and(|t| t.is_local()) {
            rt.estimate(&refs).ok().map(|e| e.tokens)
        } else {
            None
        };
        let tokens = counted.unwrap_or_else(|| {
            refs.iter()
                .map(|t| (t.split_whitespace().count() as u64 * 4).div_ceil(3) + 2)
                .sum()
        });
        Ok((out, tokens))
    })
    .await?;
    let served_by = out.backend.clone().unwrap_or_else(|| "cache".to_string());
    st.metrics.embedding(out.tier, &served_by);
    let data = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingItem {
            object: "embedding",
            index,
            embedding: if base64 {
                serde_json::Value::String(encode_base64_f32(&v))
            } else {
                serde_json::json!(v)
            },
        })
        .collect();
    let body = EmbeddingsResponse {
        object: "list",
        data,
        model: req.model.unwrap_or_else(|| served_by.clone()),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    let mut resp = Json(body).into_response();
    let h = resp.headers_mut();
    let tier = out
        .tier
        .map_or_else(|| "cache".to_string(), |t| format!("{t:?}"));
    for (name, value) in [
        ("x-snug-tier", tier),
        ("x-snug-backend", served_by),
        ("x-snug-cache-hits", out.cache_hits.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    Ok(resp)
}

/// Little-endian f32 bytes in standard base64, as OpenAI's
/// `encoding_format: "base64"` answers.
pub(crate) fn encode_base64_f32(v: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn status(State(st): State<AppState>) -> Result<Json<runtime::Status>, ApiError> {
    let rt = st.rt.clone();
    Ok(Json(blocking(move || Ok(rt.status())).await?))
}

async fn plan(State(st): State<AppState>) -> Json<runtime::Plan> {
    Json(st.rt.plan())
}

async fn estimate_memory(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<runtime::RequestEstimate>, ApiError> {
    let req: EstimateRequest = parse_json(body)?;
    let texts = texts(req.input, &st.limits)?;
    let rt = st.rt.clone();
    Ok(Json(
        blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            rt.estimate(&refs)
        })
        .await?,
    ))
}

async fn optimize(State(st): State<AppState>) -> Result<Json<runtime::Reoptimized>, ApiError> {
    let rt = st.rt.clone();
    Ok(Json(blocking(move || rt.reoptimize()).await?))
}

async fn cleanup(State(st): State<AppState>) -> Result<Json<runtime::CleanupReport>, ApiError> {
    let rt = st.rt.clone();
    Ok(Json(blocking(move || rt.emergency_cleanup()).await?))
}
