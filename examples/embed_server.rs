//! The `serve` example under its older name: the same OpenAI-compatible
//! server (embeddings, generation, models, health, metrics and the
//! runtime's operations). It can serve as the remote tier of another
//! runtime (`tier_router::RemoteConfig { base_url: "http://127.0.0.1:8080", .. }`).
//!
//! ```text
//! cargo run --release --example embed_server -- [--addr 127.0.0.1] [--port 8080] [--config FILE] [--no-model]
//! curl -s localhost:8080/v1/embeddings -H 'content-type: application/json' \
//!      -d '{"input": ["The cat sits outside", "A man is playing guitar"]}'
//! ```
//!
//! Binds 127.0.0.1 by default: there is no authentication, so expose it
//! further only behind something that adds it.

#[path = "embed_server/app.rs"]
mod app;
#[path = "embed_server/run.rs"]
mod main_loop;

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

/// Serve snug's models over OpenAI's HTTP API (the `serve` example).
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    addr: IpAddr,
    /// Port to bind.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// A JSON models file to serve instead of the fetched defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve no local model (the rule-based tiers only).
    #[arg(long)]
    no_model: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = main_loop::run(args.addr, args.port, args.config, !args.no_model, None) {
        eprintln!("embed_server: error: {e}");
        std::process::exit(1);
    }
}
