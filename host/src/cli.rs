//! The command line: `rehydra run` starts the host; `send`, `state`,
//! `stream`, `plugins` and `subscribe` are clients of a running host's HTTP
//! API. Client commands print JSON on stdout; on failure they print the
//! error body and exit non-zero (1: the server refused, 3: the server is
//! unreachable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::actor::ActorConfig;
use crate::api::http::HttpConfig;
use crate::client::{Client, ClientError};
use crate::plugin::engine::SandboxLimits;
use crate::server::{self, ServerConfig};
use crate::subscription::SubscriptionConfig;

/// Rehydra: a host for event-sourced aggregates written as WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "rehydra", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host: load plugins, open the store, serve the API.
    Run(Box<RunArgs>),
    /// Send a command to an aggregate.
    Send {
        /// The aggregate type, e.g. bank-account.
        aggregate_type: String,
        /// The aggregate's id.
        id: String,
        /// The command's name, e.g. deposit.
        command: String,
        /// The command's fields as a JSON object.
        #[arg(long)]
        data: Option<String>,
        /// Fail unless the aggregate is at this version (HTTP If-Match).
        #[arg(long)]
        expect_version: Option<u64>,
        /// Makes retries safe: the same key returns the original outcome.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Only show what the command would do (its events, reply and the
        /// state it would produce); store nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show an aggregate's state and version.
    State {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate's id.
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Read a stream's events, e.g. bank_account-acc-1.
    Stream {
        /// The stream's name: <stream-prefix>-<aggregate id>.
        name: String,
        /// The first version to read.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// The most events to read (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the loaded plugins and any that failed to load.
    Plugins {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Follow the event log: print events as JSON lines as they arrive,
    /// first the stored ones, then live ones.
    Subscribe {
        /// Where to start: a global position (inclusive), `start` or `end`.
        #[arg(long, default_value = "start")]
        from: String,
        /// Only streams of this category (stream prefix, e.g. bank_account); repeatable.
        #[arg(long)]
        category: Vec<String>,
        /// Only events of this type; repeatable.
        #[arg(long)]
        event_type: Vec<String>,
        /// Exit once every stored event has been printed, instead of
        /// following live events.
        #[arg(long)]
        until_caught_up: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Create a plugin project: rehydra new --lang rust|js|python NAME.
    New(crate::scaffold::NewArgs),
}

#[derive(Debug, Args)]
struct ServerArg {
    /// The server's base URL.
    #[arg(long, env = "REHYDRA_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// The bearer token, when the server runs with --auth-tokens.
    #[arg(long, env = "REHYDRA_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ServerArg {
    fn client(&self) -> Result<Client, ClientError> {
        Client::with_token(&self.server, self.token.as_deref())
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The directory of plugin .wasm files.
    #[arg(long, env = "REHYDRA_PLUGINS", default_value = "./plugins")]
    plugins: PathBuf,
    /// The event store: embedded://PATH (SQLite, durable, one host),
    /// memory:// (tests; nothing survives), PostgreSQL shared by several
    /// hosts (postgres://USER@HOST:PORT/DB, libpq's URL form, ?schema=NAME),
    /// or a KurrentDB/EventStoreDB cluster: kurrentdb://, esdb://,
    /// kurrentdb+discover://, esdb+discover://.
    #[arg(
        long,
        env = "REHYDRA_STORE",
        default_value = "embedded://./rehydra-data"
    )]
    store: String,
    /// The address to serve HTTP on. Loopback by default: without
    /// --auth-tokens anyone who reaches the address may call the API.
    #[arg(long, env = "REHYDRA_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// The address to serve gRPC on (its own port), or `off`.
    #[arg(long, env = "REHYDRA_GRPC", default_value = "127.0.0.1:50051", value_parser = parse_grpc_addr)]
    grpc: GrpcAddr,
    /// A file of `TOKEN PRINCIPAL` lines: every HTTP and gRPC call (but
    /// /healthz) then needs `Authorization: Bearer TOKEN`, and the principal
    /// is passed to the plugin.
    #[arg(long, env = "REHYDRA_AUTH_TOKENS")]
    auth_tokens: Option<PathBuf>,
    /// Events read ahead for each subscriber, at most.
    #[arg(long, default_value_t = 1024)]
    subscription_buffer: usize,
    /// Disconnect a subscriber that leaves its buffer full this long
    /// (it gets `subscriber_too_slow` and where to resume).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    subscriber_timeout: Duration,
    /// The most subscriptions open at once.
    #[arg(long, default_value_t = 256)]
    max_subscriptions: usize,
    /// The compile cache directory (private to this user: it holds native code).
    #[arg(long, env = "REHYDRA_CACHE_DIR", default_value = "./.rehydra-cache")]
    cache_dir: PathBuf,
    /// Compile every plugin at start, without the cache.
    #[arg(long)]
    no_cache: bool,
    /// Do not reload plugins when the plugin directory changes (SIGHUP and
    /// POST /v1/plugins/reload still do).
    #[arg(long)]
    no_watch: bool,
    /// How long the plugin directory must be quiet after a change before
    /// it is rescanned (a copy writes a file in many steps; renaming a
    /// finished file into place is instant and safe with a short wait).
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    watch_debounce: Duration,
    /// Passivate an aggregate after this long without a command.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// The most aggregates kept in memory.
    #[arg(long, default_value_t = 100_000)]
    max_resident: usize,
    /// The most state bytes kept in memory, all aggregates together (the
    /// least recently used are evicted past it).
    #[arg(long, env = "REHYDRA_MAX_RESIDENT_BYTES", default_value_t = ActorConfig::default().max_resident_bytes)]
    max_resident_bytes: u64,
    /// Store a snapshot of an aggregate's state every N events, and when it
    /// leaves memory, so that loading it replays only the events after the
    /// snapshot (0: no snapshots are stored or used).
    #[arg(long, env = "REHYDRA_SNAPSHOT_EVERY", default_value_t = ActorConfig::default().snapshot_every)]
    snapshot_every: u64,
    /// Commands that may wait per aggregate before `overloaded`.
    #[arg(long, default_value_t = 512)]
    mailbox_capacity: usize,
    /// Commands and state reads in progress on the whole host at once;
    /// past it, callers get `overloaded` (503, Retry-After) at once.
    #[arg(long, env = "REHYDRA_MAX_IN_FLIGHT", default_value_t = ActorConfig::default().max_in_flight)]
    max_in_flight: usize,
    /// How long a client waits for a command before `timeout`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    command_timeout: Duration,
    /// Re-runs of a command after a conflict with another writer.
    #[arg(long, default_value_t = 5)]
    conflict_retries: u32,
    /// The largest command body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_command_bytes: usize,
    /// Guest calls that may wait for one plugin's threads; past it commands
    /// get `overloaded` (503, Retry-After) at once.
    #[arg(long, default_value_t = SandboxLimits::default().max_queued_calls)]
    max_guest_queue: usize,
    /// Each plugin instance's memory cap, in MiB.
    #[arg(long, default_value_t = 64)]
    max_memory_mib: usize,
    /// CPU time allowed for one handle call.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    handle_deadline: Duration,
    /// Deadlines for one plugin, repeatable: NAME=HANDLE[,APPLY], e.g. reports=2s,30s.
    #[arg(long, value_parser = crate::plugin::engine::parse_plugin_deadline)]
    plugin_deadline: Vec<(String, crate::plugin::engine::PluginDeadlines)>,
    /// CPU time allowed for one rehydration apply batch.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    apply_deadline: Duration,
    /// The largest event a command may produce, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_event_bytes: usize,
    /// The most events one command may produce.
    #[arg(long, default_value_t = 1000)]
    max_events_per_command: usize,
    /// The largest state (or reply) a plugin may return, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    max_state_bytes: usize,
    /// Rest one aggregate (`aggregate_poisoned`) after this many plugin
    /// failures on it in a row, without calling the plugin for it; other
    /// aggregates are served (0: never). The rest starts at
    /// --quarantine-backoff and doubles while failures go on.
    #[arg(long, default_value_t = ActorConfig::default().poison_after)]
    poison_after: u32,
    /// Quarantine a plugin after this many failed calls in a row, spread
    /// over at least three aggregates (0: never).
    #[arg(long, default_value_t = 10)]
    quarantine_after: u32,
    /// The first quarantine's length; it doubles while failures go on (up to 5m).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    quarantine_backoff: Duration,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// `--grpc`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct GrpcAddr(Option<SocketAddr>);

fn parse_grpc_addr(text: &str) -> Result<GrpcAddr, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(GrpcAddr(None));
    }
    text.parse()
        .map(|a| GrpcAddr(Some(a)))
        .map_err(|e| format!("{e}: use HOST:PORT, e.g. 127.0.0.1:50051, or off"))
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rehydra: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run(args) => run(*args).await,
        Command::Send {
            aggregate_type,
            id,
            command,
            data,
            expect_version,
            idempotency_key,
            dry_run,
            server,
        } => {
            let client = match server.client() {
                Ok(c) => c,
                Err(e) => return print_result(Err(e)),
            };
            print_result(
                client
                    .send(
                        &aggregate_type,
                        &id,
                        &command,
                        &crate::client::SendOptions {
                            data: data.as_deref(),
                            expect_version,
                            idempotency_key: idempotency_key.as_deref(),
                            dry_run,
                        },
                    )
                    .await,
            )
        }
        Command::State {
            aggregate_type,
            id,
            server,
        } => match server.client() {
            Ok(c) => print_result(c.state(&aggregate_type, &id).await),
            Err(e) => print_result(Err(e)),
        },
        Command::Stream {
            name,
            from,
            limit,
            server,
        } => match server.client() {
            Ok(c) => print_result(c.stream(&name, from, limit).await),
            Err(e) => print_result(Err(e)),
        },
        Command::Plugins { server } => match server.client() {
            Ok(c) => print_result(c.plugins().await),
            Err(e) => print_result(Err(e)),
        },
        Command::Subscribe {
            from,
            category,
            event_type,
            until_caught_up,
            server,
        } => subscribe(&server, &from, &category, &event_type, until_caught_up).await,
        Command::New(args) => crate::scaffold::run(args),
    }
}

/// `rehydra subscribe`: events on stdout, one JSON object per line (flushed
/// per line, so a pipe sees each at once); the switch to live and errors on
/// stderr.
async fn subscribe(
    server: &ServerArg,
    from: &str,
    categories: &[String],
    event_types: &[String],
    until_caught_up: bool,
) -> ExitCode {
    use std::io::Write as _;
    let client = match server.client() {
        Ok(c) => c,
        Err(e) => return print_result(Err(e)),
    };
    let mut failed: Option<serde_json::Value> = None;
    let result = client
        .subscribe(from, categories, event_types, |name, data| match name {
            "event" => {
                let mut out = std::io::stdout().lock();
                // A closed pipe (e.g. `| head`) ends the subscription.
                writeln!(out, "{data}").and_then(|_| out.flush()).is_ok()
            }
            "caught-up" => {
                eprintln!(
                    "rehydra: caught up at position {}; {}",
                    data["position"],
                    if until_caught_up {
                        "stopping"
                    } else {
                        "following live events"
                    }
                );
                !until_caught_up
            }
            _ => {
                failed = Some(data);
                false
            }
        })
        .await;
    match (result, failed) {
        (Err(e), _) => print_result(Err(e)),
        (Ok(()), Some(error)) => {
            eprintln!(
                "rehydra: the subscription ended: {}: {}",
                error["code"].as_str().unwrap_or("unknown"),
                error["message"].as_str().unwrap_or("")
            );
            ExitCode::from(1)
        }
        (Ok(()), None) => ExitCode::SUCCESS,
    }
}

fn print_result(result: Result<serde_json::Value, ClientError>) -> ExitCode {
    let pretty =
        |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    match result {
        Ok(body) => {
            println!("{}", pretty(&body));
            ExitCode::SUCCESS
        }
        Err(ClientError::Api {
            code,
            message,
            body,
            ..
        }) => {
            println!("{}", pretty(&body));
            eprintln!("rehydra: {code}: {message}");
            ExitCode::from(1)
        }
        Err(e @ ClientError::Unreachable { .. }) => {
            eprintln!("rehydra: {e}");
            ExitCode::from(3)
        }
    }
}

async fn run(args: RunArgs) -> ExitCode {
    init_logging(&args.log_format);
    let config = ServerConfig {
        plugins: args.plugins,
        store: args.store,
        http: args.http,
        grpc: args.grpc.0,
        auth_tokens: args.auth_tokens,
        subscriptions: SubscriptionConfig {
            buffer: args.subscription_buffer.max(1),
            slow_timeout: args.subscriber_timeout,
            max_subscriptions: args.max_subscriptions.max(1),
        },
        cache_dir: (!args.no_cache).then_some(args.cache_dir),
        sandbox: SandboxLimits {
            max_memory_bytes: args.max_memory_mib << 20,
            handle_deadline: args.handle_deadline,
            apply_deadline: args.apply_deadline,
            max_event_bytes: args.max_event_bytes,
            max_events_per_command: args.max_events_per_command,
            max_state_bytes: args.max_state_bytes,
            quarantine_after: args.quarantine_after,
            quarantine_backoff: args.quarantine_backoff,
            plugin_deadlines: args.plugin_deadline.into_iter().collect(),
            max_queued_calls: args.max_guest_queue.max(1),
            ..SandboxLimits::default()
        },
        actors: ActorConfig {
            mailbox_capacity: args.mailbox_capacity.max(1),
            max_in_flight: args.max_in_flight.max(1),
            idle_timeout: args.idle_timeout,
            max_resident: args.max_resident.max(1),
            max_resident_bytes: args.max_resident_bytes.max(1),
            conflict_retries: args.conflict_retries,
            command_timeout: args.command_timeout,
            snapshot_every: args.snapshot_every,
            poison_after: args.poison_after,
            poison_backoff: args.quarantine_backoff,
            ..ActorConfig::default()
        },
        http_config: HttpConfig {
            max_command_bytes: args.max_command_bytes,
        },
        watch: !args.no_watch,
        watch_debounce: args.watch_debounce,
    };
    match server::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("rehydra: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,wasmtime=warn,cranelift_codegen=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
