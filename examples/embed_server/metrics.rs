//! `GET /metrics`: the server's counters and the runtime's status in
//! Prometheus' text exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::sync::Mutex;

use super::AppState;

/// Requests answered, by endpoint, tier and model.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(String, String, String), u64>>,
}

impl Metrics {
    pub(crate) fn request(&self, endpoint: &str, served: &runtime::Served) {
        let key = (
            endpoint.to_string(),
            served.tier.to_string(),
            served.model.clone(),
        );
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    pub(crate) fn embedding(&self, tier: Option<runtime::router::Tier>, backend: &str) {
        let tier = tier.map_or_else(|| "cache".to_string(), |t| t.to_string());
        let key = ("embeddings".to_string(), tier, backend.to_string());
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub(crate) async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    let rt = st.rt.clone();
    let status = tokio::task::spawn_blocking(move || rt.status()).await.ok();
    let mut out = String::new();
    family(
        &mut out,
        "snug_requests_total",
        "counter",
        "Requests answered, by endpoint, tier and model.",
    );
    for ((endpoint, tier, model), n) in st
        .metrics
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "snug_requests_total{{endpoint=\"{}\",tier=\"{}\",model=\"{}\"}} {n}",
            label(endpoint),
            label(tier),
            label(model)
        );
    }
    if let Some(s) = status {
        let gauges: [(&str, &str, &str); 12] = [
            (
                "snug_sequences_running",
                "gauge",
                "Sequences in a step loop now.",
            ),
            (
                "snug_sequences_queued",
                "gauge",
                "Sequences waiting to be admitted.",
            ),
            ("snug_kv_blocks_used", "gauge", "KV blocks leased now."),
            (
                "snug_kv_blocks_free",
                "gauge",
                "KV blocks the pool's budget holds beyond those.",
            ),
            (
                "snug_generated_tokens_total",
                "counter",
                "Tokens generated since the model loaded.",
            ),
            (
                "snug_prompt_tokens_total",
                "counter",
                "Prompt tokens read since the model loaded.",
            ),
            (
                "snug_preempted_total",
                "counter",
                "Times a running sequence was preempted under critical memory pressure.",
            ),
            (
                "snug_recomputed_tokens_total",
                "counter",
                "Tokens preempted sequences read again to rebuild their KV.",
            ),
            (
                "snug_prefix_hits_total",
                "counter",
                "Sequences that started after a cached prompt prefix.",
            ),
            (
                "snug_prefix_tokens_saved_total",
                "counter",
                "Prompt tokens not computed thanks to cached prefixes.",
            ),
            (
                "snug_prefix_bytes",
                "gauge",
                "Bytes of KV blocks the prefix cache holds.",
            ),
            (
                "snug_tokens_per_second",
                "gauge",
                "Tokens generated per second over the last ten seconds.",
            ),
        ];
        for (name, kind, help) in gauges {
            family(&mut out, name, kind, help);
            for g in &s.generative {
                let v = match name {
                    "snug_sequences_running" => g.running as f64,
                    "snug_sequences_queued" => g.queued as f64,
                    "snug_kv_blocks_used" => g.kv_blocks_used as f64,
                    "snug_kv_blocks_free" => g.kv_blocks_free as f64,
                    "snug_generated_tokens_total" => g.tokens_generated as f64,
                    "snug_prompt_tokens_total" => g.prompt_tokens as f64,
                    "snug_preempted_total" => g.preempted as f64,
                    "snug_recomputed_tokens_total" => g.recomputed_tokens as f64,
                    "snug_prefix_hits_total" => g.prefix_hits as f64,
                    "snug_prefix_tokens_saved_total" => g.prefix_tokens_saved as f64,
                    "snug_prefix_bytes" => g.prefix_bytes as f64,
                    _ => g.tokens_per_second,
                };
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\",tier=\"{}\"}} {v}",
                    label(&g.name),
                    g.tier
                );
            }
        }
        family(
            &mut out,
            "snug_ledger_reserved_bytes",
            "gauge",
            "Bytes reserved in the memory ledger, by category.",
        );
        for c in runtime::budget::Category::ALL {
            let _ = writeln!(
                out,
                "snug_ledger_reserved_bytes{{category=\"{}\"}} {}",
                c.name(),
                s.ledger.category(c).used
            );
        }
        family(
            &mut out,
            "snug_breaker_state",
            "gauge",
            "Circuit breaker of each tier: 0 closed, 1 half-open, 2 open.",
        );
        for b in &s.breakers {
            let v = match b.breaker.state {
                runtime::router::BreakerState::Closed => 0,
                runtime::router::BreakerState::HalfOpen => 1,
                runtime::router::BreakerState::Open => 2,
            };
            let serves = match b.serves {
                runtime::ModelKind::Embedding => "embedding",
                runtime::ModelKind::Generative => "generative",
            };
            let _ = writeln!(
                out,
                "snug_breaker_state{{serves=\"{serves}\",tier=\"{}\",name=\"{}\"}} {v}",
                b.tier,
                label(&b.name)
            );
        }
        family(
            &mut out,
            "snug_cache_hits_total",
            "counter",
            "Embedding cache hits.",
        );
        let _ = writeln!(out, "snug_cache_hits_total {}", s.cache.hits);
        family(
            &mut out,
            "snug_cache_misses_total",
            "counter",
            "Embedding cache misses.",
        );
        let _ = writeln!(out, "snug_cache_misses_total {}", s.cache.misses);
        family(
            &mut out,
            "snug_cache_bytes",
            "gauge",
            "Bytes the embedding cache holds.",
        );
        let _ = writeln!(out, "snug_cache_bytes {}", s.cache.weight);
        if let Some(rss) = s.process_rss {
            family(
                &mut out,
                "snug_process_resident_bytes",
                "gauge",
                "Resident memory of the server process.",
            );
            let _ = writeln!(out, "snug_process_resident_bytes {rss}");
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
