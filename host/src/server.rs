//! `rehydra run`: opens the store, loads the plugins, and serves the HTTP
//! and gRPC APIs until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use crate::actor::{ActorConfig, Aggregates};
use crate::api::connections::{self, LimitedListener};
use crate::api::http::{self, HttpConfig};
use crate::api::{ApiContext, grpc};
use crate::auth::TokenFile;
use crate::plugin::PluginRegistry;
use crate::plugin::engine::SandboxLimits;
use crate::subscription::{SubscriptionConfig, Subscriptions};

/// Everything `rehydra run` is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The plugin directory.
    pub plugins: PathBuf,
    /// The store URL (see [`crate::store::open`]).
    pub store: String,
    /// Where to serve HTTP.
    pub http: SocketAddr,
    /// Where to serve gRPC; `None`: not at all.
    pub grpc: Option<SocketAddr>,
    /// The token file (`--auth-tokens`); `None`: no authentication.
    pub auth_tokens: Option<PathBuf>,
    /// Subscription limits.
    pub subscriptions: SubscriptionConfig,
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
    /// How long the plugin directory must be quiet before a rescan.
    pub watch_debounce: std::time::Duration,
    /// Connections each API server (HTTP, gRPC) holds open at once.
    pub max_connections: usize,
    /// What a new plugin version that fails verification does.
    pub upgrade_check: crate::plugin::verify::UpgradeCheck,
    /// The same, for particular plugins (by name).
    pub plugin_upgrade_checks:
        std::collections::HashMap<String, crate::plugin::verify::UpgradeCheck>,
    /// How much verifying a new plugin version may replay.
    pub upgrade_budget: crate::plugin::verify::VerifyBudget,
    /// The timer index file (`--timer-index`); `None`: next to an embedded
    /// store, in the compile cache for another backend, in memory for
    /// `memory://` (see [`timer_index_path`]).
    pub timer_index: Option<PathBuf>,
}

impl ServerConfig {
    /// The compile cache directory when none is given (`--cache-dir`).
    pub const DEFAULT_CACHE_DIR: &str = "./.rehydra-cache";
}

/// The built-in defaults of `rehydra run`. The command line's defaults are
/// taken from here and from the `Default` impls of the nested configs, so
/// each is written once (a unit test in `cli` checks that `rehydra run`
/// without flags yields exactly this).
impl Default for ServerConfig {
    fn default() -> Self {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        ServerConfig {
            plugins: PathBuf::from("./plugins"),
            store: "embedded://./rehydra-data".to_string(),
            // Loopback: without --auth-tokens anyone who reaches the
            // address may call the API.
            http: loopback(8080),
            grpc: Some(loopback(50051)),
            auth_tokens: None,
            subscriptions: SubscriptionConfig::default(),
            cache_dir: Some(PathBuf::from(Self::DEFAULT_CACHE_DIR)),
            sandbox: SandboxLimits::default(),
            actors: ActorConfig::default(),
            http_config: HttpConfig::default(),
            watch: true,
            watch_debounce: std::time::Duration::from_millis(300),
            max_connections: 4096,
            upgrade_check: crate::plugin::verify::UpgradeCheck::default(),
            plugin_upgrade_checks: std::collections::HashMap::new(),
            upgrade_budget: crate::plugin::verify::VerifyBudget::default(),
            timer_index: None,
        }
    }
}

/// Runs the host until it is told to stop.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    // Bad tokens are a configuration error: fail before anything else.
    let tokens = match &config.auth_tokens {
        Some(path) => {
            let tokens = TokenFile::load(path)?;
            tracing::info!(principals = tokens.len(), file = %path.display(), "authentication on: every call needs a bearer token");
            Some(Arc::new(tokens))
        }
        None => None,
    };
    let store = crate::store::open(&config.store).await.with_context(|| {
        format!(
            "opening the event store {}",
            crate::store::redact_url(&config.store)
        )
    })?;
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
            config.watch_debounce,
        )?)
    } else {
        None
    };
    reload_on_sighup(registry.clone(), tokens.clone());
    let subscriptions = Subscriptions::new(store.clone(), config.subscriptions.clone());
    let aggregates = Aggregates::new(store.clone(), registry.clone(), config.actors.clone());
    let timer_index_file = timer_index_path(&config);
    let timer_index = Arc::new(
        crate::timer::TimerIndex::open(timer_index_file.as_deref())
            .context("opening the timer index")?,
    );
    match &timer_index_file {
        Some(path) => tracing::info!(file = %path.display(), "timer index open"),
        None => tracing::info!(
            "timer index in memory: it is read from the whole log at every start (pass \
             --timer-index PATH to keep it)"
        ),
    }
    aggregates.use_timer_index(timer_index.clone());
    // From here on a new version of a loaded plugin is checked against this
    // host's aggregates before it serves.
    registry.set_verifier(
        aggregates.upgrade_verifier(),
        config.upgrade_check,
        config.plugin_upgrade_checks.clone(),
        config.upgrade_budget,
    );
    let context = ApiContext {
        aggregates: aggregates.clone(),
        subscriptions: subscriptions.clone(),
        tokens,
        max_command_bytes: config.http_config.max_command_bytes,
    };

    let grpc_listener = match config.grpc {
        Some(addr) => Some(bind(addr, "gRPC", "--grpc ADDR (or --grpc off)").await?),
        None => None,
    };
    let listener = bind(config.http, "HTTP", "--http ADDR").await?;
    let addr = listener.local_addr()?;
    for (what, bound) in [
        ("HTTP", Some(addr)),
        (
            "gRPC",
            grpc_listener.as_ref().and_then(|l| l.local_addr().ok()),
        ),
    ] {
        if let Some(bound) = bound
            && !bound.ip().is_loopback()
            && context.tokens.is_none()
        {
            tracing::warn!(
                "serving {what} on {bound} without --auth-tokens: anyone who can reach this address \
                 can send commands and read every event; pass --auth-tokens FILE, or bind to 127.0.0.1"
            );
        }
    }
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
    // "grpc listening on" and "listening on" (HTTP, always the last of the
    // two) once the APIs serve, "plugins ready" once every plugin file has
    // been loaded (or refused), background compilations included.
    if let Some(l) = &grpc_listener {
        println!("grpc listening on http://{}", l.local_addr()?);
    }
    println!("listening on http://{addr}");
    {
        let registry = aggregates.plugins().clone();
        tokio::spawn(async move {
            registry.wait_loaded().await;
            println!("plugins ready");
        });
    }

    // One signal stops both servers; subscriptions end first, since their
    // streams would otherwise hold the graceful shutdown open forever.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    {
        let subscriptions = subscriptions.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            subscriptions.close();
            let _ = stop.send(true);
        });
    }
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let timers =
        crate::timer::runner::start(timer_index.clone(), aggregates.clone(), stopping.clone());
    let processes = crate::process::start(timer_index, aggregates.clone(), stopping.clone());

    let app = http::router(context.clone());
    let listener = LimitedListener::new(listener, config.max_connections);
    let http_server = async {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped(stopping.clone()))
            .await
            .context("serving HTTP")
    };
    let grpc_server = async {
        let Some(listener) = grpc_listener else {
            return Ok(());
        };
        let services = grpc::services(context.clone());
        tonic::transport::Server::builder()
            .add_service(services.commands)
            .add_service(services.aggregates)
            .add_service(services.streams)
            .add_service(services.plugins)
            .add_service(services.timers)
            .serve_with_incoming_shutdown(
                connections::incoming(LimitedListener::new(listener, config.max_connections)),
                stopped(stopping.clone()),
            )
            .await
            .context("serving gRPC")
    };
    // Every wait after the stop signal is bounded by the same grace: a
    // request in flight is answered within --command-timeout, so what still
    // holds the host past it and a margin is a client that keeps a
    // connection it no longer uses (one that never sent a request, or an
    // HTTP/2 connection left open after its stream ended). Graceful
    // shutdown would wait for it forever; it is cut off instead.
    let grace = config.actors.command_timeout + std::time::Duration::from_secs(5);
    let cut_off = {
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        }
    };
    tokio::select! {
        served = async { tokio::try_join!(http_server, grpc_server) } => {
            served?;
        }
        () = cut_off => tracing::warn!(
            "connections were still open {grace:?} after the stop signal; closing them"
        ),
    }
    // The timer runner stops sending at the same signal; its commands in
    // flight are answered before the store closes. Bounded like the
    // servers: should that ever not hold, the host still stops (what was
    // not sent is sent at the next start).
    for (what, task) in [("timer runner", timers), ("process managers", processes)] {
        match tokio::time::timeout(grace, task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("the {what} failed: {e}"),
            Err(_) => tracing::warn!(
                "the {what} did not stop within {grace:?}; stopping without them (the next start \
                 goes on from where they were)"
            ),
        }
    }
    // Every request is answered: the store finishes its work (the embedded
    // one indexes the rest of its log), so the next start recovers nothing.
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Where the timer index lives: `--timer-index`, else `timers.sqlite3` in
/// an embedded store's directory, else (PostgreSQL, KurrentDB) a file in
/// the compile cache named after the store's URL, else (`memory://`, or no
/// cache) in memory.
pub fn timer_index_path(config: &ServerConfig) -> Option<PathBuf> {
    if let Some(path) = &config.timer_index {
        return Some(path.clone());
    }
    if let Some(dir) = config.store.strip_prefix("embedded://") {
        return Some(PathBuf::from(dir).join("timers.sqlite3"));
    }
    if config.store.starts_with("memory:") {
        return None;
    }
    let cache = config.cache_dir.as_ref()?;
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(crate::store::redact_url(&config.store).as_bytes());
    Some(cache.join(format!("timers-{}.sqlite3", &hex::encode(digest)[..16])))
}

/// Binds a listener, with an error that says which flag changes the address.
async fn bind(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for {what} on {addr}: is another process using it? pass {flag}")
    })
}

/// SIGHUP rescans the plugin directory, as the watch and
/// `POST /v1/plugins/reload` do, and re-reads the token file (a file with
/// errors is refused; the tokens in force stay).
fn reload_on_sighup(registry: Arc<PluginRegistry>, tokens: Option<Arc<TokenFile>>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            if let Some(file) = &tokens {
                match file.reload() {
                    Ok(n) => {
                        tracing::info!(principals = n, file = %file.path().display(), "SIGHUP: token file reloaded")
                    }
                    Err(e) => tracing::error!(
                        "SIGHUP: token file refused; the tokens in force stay: {e:#}"
                    ),
                }
            }
            tracing::info!("SIGHUP: rescanning the plugin directory");
            if let Err(e) = registry.rescan().await {
                tracing::error!("rescanning the plugin directory failed: {e:#}");
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (registry, tokens);
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
