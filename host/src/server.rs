//! `rehydra run`: opens the store, loads the plugins, and serves the API
//! until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use crate::actor::{ActorConfig, Aggregates};
use crate::api::http::{self, HttpConfig};
use crate::plugin::PluginRegistry;
use crate::plugin::engine::SandboxLimits;

/// Everything `rehydra run` is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The plugin directory.
    pub plugins: PathBuf,
    /// The store URL (`embedded://PATH` or `memory://`).
    pub store: String,
    /// Where to serve HTTP.
    pub http: SocketAddr,
    /// The compile cache directory, if any.
    pub cache_dir: Option<PathBuf>,
    /// Sandbox limits.
    pub sandbox: SandboxLimits,
    /// Actor limits.
    pub actors: ActorConfig,
    /// HTTP limits.
    pub http_config: HttpConfig,
    /// Reload plugins when files in the plugin directory change.
    pub watch: bool,
}

/// Runs the host until it is told to stop.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let store = crate::store::open(&config.store)
        .await
        .with_context(|| format!("opening the event store {}", config.store))?;
    tracing::info!(store = %store.describe(), "event store open");

    let registry = Arc::new(PluginRegistry::new(
        config.sandbox.clone(),
        config.cache_dir.clone(),
    )?);
    // Large uncached plugins (JS, Python) compile in the background so the
    // others serve at once; see PluginRegistry::start.
    let report = registry.start(&config.plugins).await?;
    let loaded = registry.list();
    for path in &report.loading {
        tracing::info!(
            path = %path.display(),
            "compiling in the background; its aggregate type is served once it is ready \
             (commands for it are answered plugins_loading until then)"
        );
    }
    if loaded.is_empty() && report.loading.is_empty() {
        tracing::warn!(
            dir = %config.plugins.display(),
            "no plugin loaded: put plugin .wasm files in this directory (make plugins builds the examples into target/plugins)"
        );
    }
    let _watch = if config.watch {
        Some(crate::plugin::watch::watch(
            registry.clone(),
            &config.plugins,
        )?)
    } else {
        None
    };
    reload_on_sighup(registry.clone());
    let aggregates = Aggregates::new(store, registry, config.actors.clone());

    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}: is another process using it? pass --http ADDR",
                config.http
            )
        })?;
    let addr = listener.local_addr()?;
    let mut types: Vec<String> = loaded
        .iter()
        .map(|p| p.info.aggregate_type.clone())
        .collect();
    types.sort();
    tracing::info!(
        http = %addr,
        plugins = %types.join(", "),
        startup_ms = started.elapsed().as_millis() as u64,
        "rehydra is ready"
    );
    // Plain lines on stdout, for scripts and tests that wait for them:
    // "listening on" once the API serves, "plugins ready" once every plugin
    // file has been loaded (or refused), background compilations included.
    println!("listening on http://{addr}");
    {
        let registry = aggregates.plugins().clone();
        tokio::spawn(async move {
            registry.wait_loaded().await;
            println!("plugins ready");
        });
    }

    let app = http::router(aggregates, config.http_config.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP rescans the plugin directory, as the watch and
/// `POST /v1/plugins/reload` do.
fn reload_on_sighup(registry: Arc<PluginRegistry>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: rescanning the plugin directory");
            if let Err(e) = registry.rescan().await {
                tracing::error!("rescanning the plugin directory failed: {e:#}");
            }
        }
    });
    #[cfg(not(unix))]
    let _ = registry;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
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
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
