//! An HTTP embeddings server on the snug runtime: OpenAI-compatible
//! `POST /v1/embeddings`, plus `GET /status`, `GET /plan`,
//! `POST /estimate-memory`, `POST /optimize-for-hardware` and
//! `POST /emergency/cleanup`. It can serve as the remote tier of another
//! runtime (`tier_router::RemoteConfig { base_url: "http://127.0.0.1:8080", .. }`).
//!
//! ```text
//! cargo run --release --example embed_server -- [--addr 127.0.0.1] [--port 8080] [--no-model]
//! curl -s localhost:8080/v1/embeddings -H 'content-type: application/json' \
//!      -d '{"input": ["The cat sits outside", "A man is playing guitar"]}'
//! ```
//!
//! Binds 127.0.0.1 by default: there is no authentication, so expose it
//! further only behind something that adds it. Ctrl-C (or SIGTERM) stops
//! accepting connections and lets the requests in flight finish.

#[path = "embed_server/app.rs"]
mod app;

use std::net::{IpAddr, SocketAddr};

struct Args {
    addr: IpAddr,
    port: u16,
    model: bool,
}

const USAGE: &str =
    "usage: embed_server [--addr IP (default 127.0.0.1)] [--port N (default 8080)] [--no-model]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: IpAddr::from([127, 0, 0, 1]),
        port: 8080,
        model: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs a value, e.g. 127.0.0.1")?;
                args.addr = v.parse().map_err(|e| format!("--addr {v:?}: {e}"))?;
            }
            "--port" => {
                let v = it.next().ok_or("--port needs a value, e.g. 8080")?;
                args.port = v.parse().map_err(|e| format!("--port {v:?}: {e}"))?;
            }
            "--no-model" => args.model = false,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("shutting down: finishing requests in flight");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let mut builder = runtime::Runtime::builder();
    if !args.model {
        builder = builder.without_local_model();
    } else if models::model_dir().is_err() {
        eprintln!("all-MiniLM-L6-v2 not found: run scripts/fetch-model.sh (or pass --no-model to serve the rule-based tier only)");
        std::process::exit(1);
    }
    let rt = builder.build()?;
    eprintln!("plan:\n{}", rt.plan());

    // The runtime computes on its own (rayon) threads; tokio only moves
    // bytes, so two workers suffice. Blocking runtime calls are capped so
    // a flood of requests queues here instead of spawning a thread each.
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()?;
    tokio_rt.block_on(async move {
        let addr = SocketAddr::new(args.addr, args.port);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app::app(rt))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        eprintln!("stopped");
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
