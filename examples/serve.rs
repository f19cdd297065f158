//! An OpenAI-compatible server on the snug runtime: generation
//! (`POST /v1/chat/completions`, `POST /v1/completions`, whole or streamed
//! as server-sent events), `GET /v1/models`, `POST /v1/embeddings` by model
//! name, `GET /health`, `GET /metrics` (Prometheus), and the runtime's
//! operations (`GET /status`, `GET /plan`, `POST /estimate-memory`,
//! `POST /optimize-for-hardware`, `POST /emergency/cleanup`).
//!
//! ```text
//! bash scripts/fetch-model.sh && bash scripts/fetch-model.sh smollm2-135m
//! cargo run --release --example serve -- --port 8080
//! curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' \
//!      -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi!"}], "stream": true}'
//! ```
//!
//! Without `--config` it serves MiniLM (embeddings) and whichever of
//! SmolLM2-135M (small tier) and Gemma-3-270M (medium tier) are fetched;
//! `--config FILE` names the models instead (see `runtime::ModelsFile`).
//! `--remote URL [--remote-model NAME]` adds an OpenAI-compatible chat
//! server (llama.cpp's `llama-server`, vLLM, another snug server) as the
//! remote generation tier (docs/serve.md has a manual check against
//! `llama-server`).
//! Every answer says which tier and model served it (`snug` in the body,
//! `x-snug-tier` and `x-snug-model` headers).
//!
//! Binds 127.0.0.1 by default: there is no authentication, so expose it
//! further only behind something that adds it. Ctrl-C (or SIGTERM) stops
//! accepting connections and lets the requests in flight finish.

#[path = "embed_server/app.rs"]
mod app;
#[path = "embed_server/run.rs"]
mod main_loop;

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

/// Serve snug's models over OpenAI's HTTP API.
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    addr: IpAddr,
    /// Port to bind (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// A JSON models file (embedding and generative models) to serve
    /// instead of the fetched defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve no local model (the remote and rule-based tiers only).
    #[arg(long)]
    no_model: bool,
    /// An OpenAI-compatible chat server (e.g. llama.cpp's llama-server at
    /// http://127.0.0.1:8081) as a generation tier: after the local models
    /// (before them under memory pressure), behind a circuit breaker.
    #[arg(long, value_name = "URL")]
    remote: Option<String>,
    /// The model name sent to the --remote server, and listed for it.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "remote",
        requires = "remote"
    )]
    remote_model: String,
}

fn main() {
    let args = Args::parse();
    let remote = args.remote.map(|base_url| runtime::RemoteGenerationConfig {
        server: runtime::router::RemoteChatConfig {
            base_url,
            model: args.remote_model,
            ..Default::default()
        },
        ..Default::default()
    });
    if let Err(e) = main_loop::run(args.addr, args.port, args.config, !args.no_model, remote) {
        eprintln!("serve: error: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(1);
    }
}
