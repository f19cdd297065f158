//! Building the runtime from the command line's choices and serving it
//! until Ctrl-C or SIGTERM: shared by the `serve` and `embed_server`
//! examples.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

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

/// The runtime for the flags: the models file, or the fetched defaults
/// (MiniLM, and SmolLM2-135M / Gemma-3-270M where fetched), or none.
pub(crate) fn build_runtime(
    config: Option<PathBuf>,
    local: bool,
    remote: Option<runtime::RemoteGenerationConfig>,
) -> Result<runtime::Runtime, Box<dyn std::error::Error>> {
    let mut builder = runtime::Runtime::builder();
    if let Some(remote) = remote {
        builder = builder.remote_generation(remote);
    }
    if !local {
        builder = builder.without_local_model();
    } else if let Some(path) = config {
        builder = builder.models_file(path)?;
    } else {
        if models::model_dir().is_err() {
            return Err("all-MiniLM-L6-v2 not found: run scripts/fetch-model.sh (or pass --no-model to serve the rule-based tier only)".into());
        }
        for (name, tier) in [
            ("smollm2-135m", runtime::router::Tier::Small),
            ("gemma3-270m", runtime::router::Tier::Medium),
        ] {
            match runtime::GenerativeSpec::fetched(name, tier) {
                Ok(spec) => builder = builder.generative(spec),
                Err(e) => eprintln!("not serving {name}: {e}"),
            }
        }
    }
    Ok(builder.build()?)
}

/// Serves until Ctrl-C or SIGTERM; `remote` adds a remote chat server as
/// a generation tier.
pub(crate) fn run(
    addr: IpAddr,
    port: u16,
    config: Option<PathBuf>,
    local: bool,
    remote: Option<runtime::RemoteGenerationConfig>,
) -> Result<(), Box<dyn std::error::Error>> {
    let rt = build_runtime(config, local, remote)?;
    eprintln!("plan:\n{}", rt.plan());
    let names: Vec<String> = rt.models().into_iter().map(|m| m.name).collect();
    eprintln!("models: {}", names.join(", "));
    // The runtime computes on its own threads; tokio only moves bytes, so
    // two workers suffice. Blocking runtime calls are capped so a flood of
    // requests queues here instead of spawning a thread each.
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()?;
    tokio_rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(addr, port)).await?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, crate::app::app(rt))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        eprintln!("stopped");
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
