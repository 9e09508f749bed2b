//! The command line: `rehydra run` starts the host; `send`, `state`,
//! `stream`, `plugins`, `versions`, `rollback` and `subscribe` are clients
//! of a running host's HTTP API. Client commands print JSON on stdout; on
//! failure they print the error body and exit non-zero (1: the server
//! refused, 3: the server is unreachable).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::actor::ActorConfig;
use crate::api::http::HttpConfig;
use crate::client::{Client, ClientError};
use crate::plugin::engine::SandboxLimits;
use crate::server::{self, ServerConfig};
use crate::subscription::SubscriptionConfig;

mod config_file;

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
    /// List the kept versions of a plugin: when each served, and the report
    /// of the check each passed before it served.
    Versions {
        /// The plugin's name (its file name without `.wasm`).
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Serve the previous version of a plugin again, at once, and write it
    /// back to the plugin's file.
    Rollback {
        /// The plugin's name (its file name without `.wasm`).
        name: String,
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
    /// List the pending timers, in the order they will be sent: all, or those an
    /// aggregate scheduled and those for it.
    Timers {
        /// Only this aggregate's timers: TYPE/ID, e.g. order/o-17.
        #[arg(long, value_name = "TYPE/ID")]
        aggregate: Option<String>,
        /// The most timers to list (at most 1000).
        #[arg(long, default_value_t = crate::api::DEFAULT_TIMERS)]
        limit: usize,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the process managers: what each follows, how far it has read
    /// the log, and the events it parked.
    Processes {
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

/// `rehydra run`'s flags. Each is also a key of the `--config` file (its
/// long name); see [`config_file`]. Defaults come from the `Default` impls
/// of the configs they end up in, so that each is written once: adding a
/// flag is adding a field here (with its default taken from there), its
/// place in [`server_config`], and a row in the README's table and a line
/// in `deploy/rehydra.toml` (tests check both against this).
#[derive(Debug, Args)]
struct RunArgs {
    /// A TOML file of settings: each key a long flag below, e.g.
    /// `max-in-flight = 4096`. Flags and environment variables override it.
    #[arg(long, env = "REHYDRA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The directory of plugin .wasm files.
    #[arg(long, env = "REHYDRA_PLUGINS", value_name = "DIR", default_value_os_t = ServerConfig::default().plugins)]
    plugins: PathBuf,
    /// The event store: embedded://PATH (SQLite, durable, one host),
    /// memory:// (tests; nothing survives), PostgreSQL shared by several
    /// hosts (postgres://USER@HOST:PORT/DB, libpq's URL form, ?schema=NAME),
    /// or a KurrentDB/EventStoreDB cluster: kurrentdb://, esdb://,
    /// kurrentdb+discover://, esdb+discover://.
    #[arg(long, env = "REHYDRA_STORE", value_name = "URL", default_value_t = ServerConfig::default().store)]
    store: String,
    /// The address to serve HTTP on. Loopback by default: without
    /// --auth-tokens anyone who reaches the address may call the API.
    #[arg(long, env = "REHYDRA_HTTP", value_name = "ADDR", default_value_t = ServerConfig::default().http)]
    http: SocketAddr,
    /// The address to serve gRPC on (its own port), or `off`.
    #[arg(long, env = "REHYDRA_GRPC", value_name = "ADDR", default_value_t = GrpcAddr(ServerConfig::default().grpc), value_parser = parse_grpc_addr)]
    grpc: GrpcAddr,
    /// A file of `TOKEN PRINCIPAL` lines: every HTTP and gRPC call (but
    /// /healthz) then needs `Authorization: Bearer TOKEN`, and the principal
    /// is passed to the plugin.
    #[arg(long, env = "REHYDRA_AUTH_TOKENS", value_name = "FILE")]
    auth_tokens: Option<PathBuf>,
    /// Events read ahead for each subscriber, at most.
    #[arg(long, value_name = "N", default_value_t = SubscriptionConfig::default().buffer)]
    subscription_buffer: usize,
    /// Disconnect a subscriber that leaves its buffer full this long
    /// (it gets `subscriber_too_slow` and where to resume).
    #[arg(long, value_name = "DURATION", default_value = human(SubscriptionConfig::default().slow_timeout), value_parser = humantime::parse_duration)]
    subscriber_timeout: Duration,
    /// The most subscriptions open at once.
    #[arg(long, value_name = "N", default_value_t = SubscriptionConfig::default().max_subscriptions)]
    max_subscriptions: usize,
    /// The compile cache directory, which also keeps the plugin versions that
    /// served, for rollback (private to this user: it holds native code).
    #[arg(long, env = "REHYDRA_CACHE_DIR", value_name = "DIR", default_value = ServerConfig::DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Compile every plugin at start, without the cache (and keep plugin
    /// versions for rollback in memory only).
    #[arg(long)]
    no_cache: bool,
    /// Do not reload plugins when the plugin directory changes (SIGHUP and
    /// POST /v1/plugins/reload still do).
    #[arg(long)]
    no_watch: bool,
    /// How long the plugin directory must be quiet after a change before
    /// it is rescanned (a copy writes a file in many steps; renaming a
    /// finished file into place is instant and safe with a short wait).
    #[arg(long, value_name = "DURATION", default_value = human(ServerConfig::default().watch_debounce), value_parser = humantime::parse_duration)]
    watch_debounce: Duration,
    /// Connections each API server (HTTP, gRPC) holds open at once; more
    /// wait in the kernel's accept queue until others close.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_connections)]
    max_connections: usize,
    /// What a new version of a loaded plugin must pass before it serves:
    /// `enforce` replays a sample of aggregates through it and refuses it
    /// (the current version keeps serving) if a state differs or a rebuild
    /// fails; `warn` activates it anyway, with the report; `off` skips it.
    #[arg(long, value_name = "POLICY", default_value_t = ServerConfig::default().upgrade_check)]
    upgrade_check: crate::plugin::verify::UpgradeCheck,
    /// The upgrade check's policy for one plugin, repeatable:
    /// NAME=enforce|warn|off, e.g. reports=warn.
    #[arg(long, value_name = "NAME=POLICY", value_parser = crate::plugin::verify::parse_plugin_upgrade_check)]
    plugin_upgrade_check: Vec<(String, crate::plugin::verify::UpgradeCheck)>,
    /// Aggregates the upgrade check replays, at most (resident ones first,
    /// then the oldest streams).
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().upgrade_budget.aggregates)]
    upgrade_check_aggregates: usize,
    /// Time the upgrade check may take; aggregates not reached by then are
    /// not checked (the report says so).
    #[arg(long, value_name = "DURATION", default_value = human(ServerConfig::default().upgrade_budget.time), value_parser = humantime::parse_duration)]
    upgrade_check_time: Duration,
    /// Passivate an aggregate after this long without a command.
    #[arg(long, value_name = "DURATION", default_value = human(ActorConfig::default().idle_timeout), value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// The most aggregates kept in memory.
    #[arg(long, value_name = "N", default_value_t = ActorConfig::default().max_resident)]
    max_resident: usize,
    /// The most state bytes kept in memory, all aggregates together (the
    /// least recently used are evicted past it).
    #[arg(long, env = "REHYDRA_MAX_RESIDENT_BYTES", value_name = "BYTES", default_value_t = ActorConfig::default().max_resident_bytes)]
    max_resident_bytes: u64,
    /// Store a snapshot of an aggregate's state every N events, and when it
    /// leaves memory, so that loading it replays only the events after the
    /// snapshot (0: no snapshots are stored or used).
    #[arg(long, env = "REHYDRA_SNAPSHOT_EVERY", value_name = "N", default_value_t = ActorConfig::default().snapshot_every)]
    snapshot_every: u64,
    /// The most pending timers one aggregate may have scheduled; a command
    /// that would leave more is refused with `too_many_timers`.
    #[arg(long, value_name = "N", default_value_t = ActorConfig::default().max_timers_per_aggregate)]
    max_timers_per_aggregate: usize,
    /// The timer index file (pending timers, derived from the log). By
    /// default: timers.sqlite3 in an embedded store's directory; for
    /// PostgreSQL and KurrentDB a file in the cache directory; in memory for
    /// memory:// or with --no-cache (read from the whole log at each start).
    #[arg(long, env = "REHYDRA_TIMER_INDEX", value_name = "FILE")]
    timer_index: Option<PathBuf>,
    /// Commands that may wait per aggregate before `overloaded`.
    #[arg(long, value_name = "N", default_value_t = ActorConfig::default().mailbox_capacity)]
    mailbox_capacity: usize,
    /// Commands and state reads in progress on the whole host at once;
    /// past it, callers get `overloaded` (503, Retry-After) at once.
    #[arg(long, env = "REHYDRA_MAX_IN_FLIGHT", value_name = "N", default_value_t = ActorConfig::default().max_in_flight)]
    max_in_flight: usize,
    /// How long a client waits for a command before `timeout`.
    #[arg(long, value_name = "DURATION", default_value = human(ActorConfig::default().command_timeout), value_parser = humantime::parse_duration)]
    command_timeout: Duration,
    /// Re-runs of a command after a conflict with another writer.
    #[arg(long, value_name = "N", default_value_t = ActorConfig::default().conflict_retries)]
    conflict_retries: u32,
    /// The largest command body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = HttpConfig::default().max_command_bytes)]
    max_command_bytes: usize,
    /// Guest calls that may wait for one plugin's threads; past it commands
    /// get `overloaded` (503, Retry-After) at once.
    #[arg(long, value_name = "N", default_value_t = SandboxLimits::default().max_queued_calls)]
    max_guest_queue: usize,
    /// Each plugin instance's memory cap, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = SandboxLimits::default().max_memory_bytes >> 20)]
    max_memory_mib: usize,
    /// CPU time allowed for one handle call.
    #[arg(long, value_name = "DURATION", default_value = human(SandboxLimits::default().handle_deadline), value_parser = humantime::parse_duration)]
    handle_deadline: Duration,
    /// Deadlines for one plugin, repeatable: NAME=HANDLE[,APPLY], e.g. reports=2s,30s.
    #[arg(long, value_name = "NAME=HANDLE[,APPLY]", value_parser = crate::plugin::engine::parse_plugin_deadline)]
    plugin_deadline: Vec<(String, crate::plugin::engine::PluginDeadlines)>,
    /// CPU time allowed for one rehydration apply batch.
    #[arg(long, value_name = "DURATION", default_value = human(SandboxLimits::default().apply_deadline), value_parser = humantime::parse_duration)]
    apply_deadline: Duration,
    /// The largest event a command may produce, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = SandboxLimits::default().max_event_bytes)]
    max_event_bytes: usize,
    /// The most events one command may produce.
    #[arg(long, value_name = "N", default_value_t = SandboxLimits::default().max_events_per_command)]
    max_events_per_command: usize,
    /// The largest state (or reply) a plugin may return, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = SandboxLimits::default().max_state_bytes)]
    max_state_bytes: usize,
    /// Rest one aggregate (`aggregate_poisoned`) after this many plugin
    /// failures on it in a row, without calling the plugin for it; other
    /// aggregates are served (0: never). The rest starts at
    /// --quarantine-backoff and doubles while failures go on.
    #[arg(long, value_name = "N", default_value_t = ActorConfig::default().poison_after)]
    poison_after: u32,
    /// Quarantine a plugin after this many failed calls in a row, spread
    /// over at least three aggregates (0: never).
    #[arg(long, value_name = "N", default_value_t = SandboxLimits::default().quarantine_after)]
    quarantine_after: u32,
    /// The first quarantine's length; it doubles while failures go on (up to 5m).
    #[arg(long, value_name = "DURATION", default_value = human(SandboxLimits::default().quarantine_backoff), value_parser = humantime::parse_duration)]
    quarantine_backoff: Duration,
    /// Lines per second each plugin may log (its log calls and stdout and
    /// stderr lines together), with a burst of as many; the rest are
    /// dropped and counted in rehydra_plugin_log_lines_dropped_total. 0: no
    /// limit.
    #[arg(long, value_name = "N", default_value_t = SandboxLimits::default().log_rate)]
    plugin_log_rate: u32,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// A default duration as the flags take it (`5m`, `300ms`).
fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `--grpc`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct GrpcAddr(Option<SocketAddr>);

impl std::fmt::Display for GrpcAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

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
    // Help, versions, other subcommands and malformed flags are clap's,
    // with the real environment shown in `--help`.
    let mut cli = Cli::parse();
    if let Command::Run(_) = cli.command {
        let argv: Vec<OsString> = std::env::args_os().collect();
        match parse_run_args(&argv, &|name| std::env::var_os(name)) {
            Ok(args) => cli.command = Command::Run(Box::new(args)),
            Err(RunArgsError::Clap(e)) => e.exit(),
            Err(RunArgsError::Config(e)) => {
                eprintln!("rehydra: {e}");
                return ExitCode::from(2);
            }
        }
    }
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
        Command::Timers {
            aggregate,
            limit,
            server,
        } => match server.client() {
            Ok(c) => print_result(c.timers(aggregate.as_deref(), limit).await),
            Err(e) => print_result(Err(e)),
        },
        Command::Processes { server } => match server.client() {
            Ok(c) => print_result(c.processes().await),
            Err(e) => print_result(Err(e)),
        },
        Command::Versions { name, server } => match server.client() {
            Ok(c) => print_result(c.versions(&name).await),
            Err(e) => print_result(Err(e)),
        },
        Command::Rollback { name, server } => match server.client() {
            Ok(c) => print_result(c.rollback(&name).await),
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

/// Why `rehydra run`'s settings could not be made out.
#[derive(Debug)]
enum RunArgsError {
    /// The command line (clap's own message).
    Clap(clap::Error),
    /// The configuration file or an environment variable.
    Config(config_file::ConfigError),
}

/// `rehydra run`'s settings from the command line `argv` (program name
/// first), the environment `env`, and the configuration file that
/// `--config` or `REHYDRA_CONFIG` names, in that order of precedence, over
/// the built-in defaults.
fn parse_run_args(argv: &[OsString], env: config_file::Env<'_>) -> Result<RunArgs, RunArgsError> {
    let parse = |file: Option<&config_file::ConfigFile>| -> Result<RunArgs, RunArgsError> {
        let mut layered = Ok(());
        let cli = Cli::command().mut_subcommand("run", |run| {
            match config_file::layer(run.clone(), env, file) {
                Ok(run) => run,
                Err(e) => {
                    layered = Err(e);
                    run
                }
            }
        });
        layered.map_err(RunArgsError::Config)?;
        let matches = cli.try_get_matches_from(argv).map_err(RunArgsError::Clap)?;
        let run_matches = match matches.subcommand() {
            Some(("run", m)) => m,
            _ => {
                return Err(RunArgsError::Clap(clap::Error::raw(
                    clap::error::ErrorKind::MissingSubcommand,
                    "expected `rehydra run`",
                )));
            }
        };
        RunArgs::from_arg_matches(run_matches).map_err(RunArgsError::Clap)
    };
    // The file is named on the command line or in the environment, which
    // the first pass reads; the second reads the file too.
    let args = parse(None)?;
    match &args.config {
        None => Ok(args),
        Some(path) => {
            let file = config_file::ConfigFile::read(path).map_err(RunArgsError::Config)?;
            parse(Some(&file))
        }
    }
}

async fn run(args: RunArgs) -> ExitCode {
    init_logging(&args.log_format);
    let config = server_config(args);
    match server::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("rehydra: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the host runs with, from its flags.
fn server_config(args: RunArgs) -> ServerConfig {
    ServerConfig {
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
            log_rate: args.plugin_log_rate,
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
            max_timers_per_aggregate: args.max_timers_per_aggregate,
            ..ActorConfig::default()
        },
        http_config: HttpConfig {
            max_command_bytes: args.max_command_bytes,
        },
        watch: !args.no_watch,
        watch_debounce: args.watch_debounce,
        max_connections: args.max_connections.max(1),
        upgrade_check: args.upgrade_check,
        plugin_upgrade_checks: args.plugin_upgrade_check.into_iter().collect(),
        upgrade_budget: crate::plugin::verify::VerifyBudget {
            aggregates: args.upgrade_check_aggregates,
            time: args.upgrade_check_time,
        },
        timer_index: args.timer_index,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    /// `rehydra run` parsed from `argv` (after `rehydra run`) with the
    /// environment `env`, never the process's.
    fn parse(argv: &[&str], env: &[(&str, &str)]) -> Result<RunArgs, RunArgsError> {
        let argv: Vec<OsString> = ["rehydra", "run"]
            .iter()
            .chain(argv)
            .map(OsString::from)
            .collect();
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        parse_run_args(&argv, &|name| env.get(name).cloned())
    }

    fn ok(argv: &[&str], env: &[(&str, &str)]) -> RunArgs {
        match parse(argv, env) {
            Ok(args) => args,
            Err(e) => panic!("rehydra run {argv:?} with {env:?}: {e:?}"),
        }
    }

    fn error(argv: &[&str], env: &[(&str, &str)]) -> String {
        match parse(argv, env) {
            Ok(args) => panic!("rehydra run {argv:?} was accepted: {args:?}"),
            Err(RunArgsError::Config(e)) => e.to_string(),
            Err(RunArgsError::Clap(e)) => e.to_string(),
        }
    }

    /// A configuration file with `text` in a fresh directory.
    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("rehydra.toml");
        std::fs::write(&path, text).expect("writing the file");
        (dir, path.display().to_string())
    }

    /// The settings as a comparable text: `RunArgs` and the configs have no
    /// `PartialEq`, and their `Debug` shows every field.
    fn settings(mut args: RunArgs) -> String {
        args.config = None;
        format!("{args:?}")
    }

    #[test]
    fn no_flags_yield_exactly_the_default_configs() {
        let args = ok(&[], &[]);
        assert_eq!(args.log_format, "text");
        assert_eq!(
            format!("{:?}", server_config(args)),
            format!("{:?}", ServerConfig::default())
        );
    }

    #[test]
    fn the_file_overrides_the_defaults_and_flags_and_the_environment_override_the_file() {
        let (_dir, path) =
            file("max-in-flight = 7\nidle-timeout = \"2m\"\nstore = \"memory://\"\n");
        let args = ok(&["--config", &path], &[]);
        assert_eq!(args.max_in_flight, 7);
        assert_eq!(args.idle_timeout, Duration::from_secs(120));
        assert_eq!(args.store, "memory://");
        // What the file leaves out keeps its default.
        assert_eq!(
            args.mailbox_capacity,
            ActorConfig::default().mailbox_capacity
        );

        let args = ok(&["--config", &path, "--max-in-flight", "9"], &[]);
        assert_eq!(args.max_in_flight, 9, "a flag beats the file");
        assert_eq!(args.idle_timeout, Duration::from_secs(120));

        let args = ok(&["--config", &path], &[("REHYDRA_MAX_IN_FLIGHT", "8")]);
        assert_eq!(args.max_in_flight, 8, "the environment beats the file");
        assert_eq!(args.store, "memory://");

        let args = ok(
            &["--config", &path, "--max-in-flight", "9"],
            &[("REHYDRA_MAX_IN_FLIGHT", "8")],
        );
        assert_eq!(args.max_in_flight, 9, "a flag beats the environment");

        // The file can be named in the environment too.
        let args = ok(&[], &[("REHYDRA_CONFIG", &path)]);
        assert_eq!(args.max_in_flight, 7);
    }

    #[test]
    fn every_flag_reads_the_same_from_the_file_as_from_the_command_line() {
        // Every setting away from its default, once as flags, once as keys.
        let settings_ = [
            ("plugins", "\"/srv/plugins\"", "/srv/plugins"),
            (
                "store",
                "\"postgres://app@db:5432/events\"",
                "postgres://app@db:5432/events",
            ),
            ("http", "\"0.0.0.0:80\"", "0.0.0.0:80"),
            ("grpc", "\"off\"", "off"),
            (
                "auth-tokens",
                "\"/etc/rehydra/tokens\"",
                "/etc/rehydra/tokens",
            ),
            ("subscription-buffer", "16", "16"),
            ("subscriber-timeout", "\"1m 30s\"", "1m 30s"),
            ("max-subscriptions", "3", "3"),
            ("cache-dir", "\"/var/cache/rehydra\"", "/var/cache/rehydra"),
            ("watch-debounce", "\"50ms\"", "50ms"),
            ("max-connections", "9", "9"),
            ("upgrade-check", "\"warn\"", "warn"),
            ("upgrade-check-aggregates", "5", "5"),
            ("upgrade-check-time", "\"2s\"", "2s"),
            ("idle-timeout", "\"1h\"", "1h"),
            ("max-resident", "10", "10"),
            ("max-resident-bytes", "4096", "4096"),
            ("snapshot-every", "0", "0"),
            ("max-timers-per-aggregate", "3", "3"),
            (
                "timer-index",
                "\"/var/lib/rehydra/timers.sqlite3\"",
                "/var/lib/rehydra/timers.sqlite3",
            ),
            ("mailbox-capacity", "2", "2"),
            ("max-in-flight", "4", "4"),
            ("command-timeout", "\"2s\"", "2s"),
            ("conflict-retries", "1", "1"),
            ("max-command-bytes", "1_000", "1000"),
            ("max-guest-queue", "8", "8"),
            ("max-memory-mib", "32", "32"),
            ("handle-deadline", "\"250ms\"", "250ms"),
            ("apply-deadline", "\"1s\"", "1s"),
            ("max-event-bytes", "100", "100"),
            ("max-events-per-command", "5", "5"),
            ("max-state-bytes", "1000", "1000"),
            ("poison-after", "7", "7"),
            ("quarantine-after", "0", "0"),
            ("quarantine-backoff", "\"3s\"", "3s"),
            ("plugin-log-rate", "0", "0"),
            ("log-format", "\"json\"", "json"),
        ];
        let mut text = String::new();
        let mut argv: Vec<String> = Vec::new();
        for (key, toml, flag) in settings_ {
            text.push_str(&format!("{key} = {toml}\n"));
            argv.extend([format!("--{key}"), flag.to_string()]);
        }
        text.push_str("plugin-deadline = [\"reports=2s,30s\", \"slow=1s\"]\n");
        argv.extend([
            "--plugin-deadline=reports=2s,30s".into(),
            "--plugin-deadline=slow=1s".into(),
        ]);
        text.push_str("plugin-upgrade-check = [\"reports=warn\"]\n");
        argv.push("--plugin-upgrade-check=reports=warn".into());
        text.push_str("no-cache = true\nno-watch = true\n");
        argv.extend(["--no-cache".into(), "--no-watch".into()]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let (_dir, path) = file(&text);

        let from_flags = ok(&argv, &[]);
        let from_file = ok(&["--config", &path], &[]);
        assert_eq!(settings(from_file), settings(from_flags));

        // The test names every key there is.
        let cmd = RunArgs::augment_args(clap::Command::new("run"));
        for key in config_file::file_keys(&cmd) {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{key} ="))),
                "{key} is missing from this test"
            );
        }

        // A switch set to false in the file stays off.
        let (_dir, path) = file("no-cache = false\n");
        assert!(!ok(&["--config", &path], &[]).no_cache);
    }

    #[test]
    fn an_unknown_key_names_itself_the_file_the_line_and_the_closest_key() {
        let (_dir, path) = file("# settings\nstore = \"memory://\"\nmax-inflight = 4\n");
        let e = error(&["--config", &path], &[]);
        assert!(e.contains(&format!("{path}, line 3")), "{e}");
        assert!(e.contains("unknown key `max-inflight`"), "{e}");
        assert!(e.contains("did you mean `max-in-flight`?"), "{e}");

        let (_dir, path) = file("max_in_flight = 4\n");
        let e = error(&["--config", &path], &[]);
        assert!(e.contains("did you mean `max-in-flight`?"), "{e}");

        let (_dir, path) = file("[run]\nstore = \"memory://\"\n");
        let e = error(&["--config", &path], &[]);
        assert!(e.contains("unknown key `run`"), "{e}");
        assert!(e.contains("write every key at the top level"), "{e}");

        let (_dir, path) = file("config = \"other.toml\"\n");
        let e = error(&["--config", &path], &[]);
        assert!(
            e.contains("`config` cannot be set in a configuration file"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_value_names_the_key_the_line_and_the_expected_form() {
        let (_dir, path) = file("\nidle-timeout = \"5 parsecs\"\n");
        let e = error(&["--config", &path], &[]);
        assert!(
            e.starts_with(&format!("{path}, line 2: idle-timeout = \"5 parsecs\": ")),
            "{e}"
        );
        assert!(
            e.contains("expected DURATION, e.g. idle-timeout = \"5m\""),
            "{e}"
        );

        let (_dir, path) = file("max-in-flight = \"lots\"\n");
        let e = error(&["--config", &path], &[]);
        assert!(e.contains("max-in-flight = \"lots\": invalid digit"), "{e}");
        assert!(e.contains("expected N, e.g. max-in-flight = 4096"), "{e}");

        let (_dir, path) = file("max-in-flight = true\n");
        let e = error(&["--config", &path], &[]);
        assert!(
            e.contains("max-in-flight = true: a boolean is not a value"),
            "{e}"
        );

        let (_dir, path) = file("grpc = \"nowhere\"\n");
        let e = error(&["--config", &path], &[]);
        assert!(
            e.contains("use HOST:PORT, e.g. 127.0.0.1:50051, or off"),
            "{e}"
        );

        let (_dir, path) = file("log-format = \"xml\"\n");
        let e = error(&["--config", &path], &[]);
        assert!(e.contains("log-format = \"xml\""), "{e}");
        assert!(e.contains("text, json"), "{e}");

        let (_dir, path) = file("no-cache = \"yes\"\n");
        let e = error(&["--config", &path], &[]);
        assert!(
            e.contains("no-cache = \"yes\": a string is not true or false"),
            "{e}"
        );

        let (_dir, path) = file("store = [\"memory://\"]\n");
        let e = error(&["--config", &path], &[]);
        assert!(e.contains("takes one value, not an array"), "{e}");

        let (_dir, path) = file("plugin-deadline = [\"reports\"]\n");
        let e = error(&["--config", &path], &[]);
        assert!(e.contains("expected NAME=HANDLE[,APPLY]"), "{e}");

        // A bad value is refused even where a flag or the environment
        // overrides it.
        let (_dir, path) = file("max-in-flight = \"lots\"\n");
        let e = error(
            &["--config", &path, "--max-in-flight", "3"],
            &[("REHYDRA_MAX_IN_FLIGHT", "2")],
        );
        assert!(e.contains("max-in-flight = \"lots\": invalid digit"), "{e}");

        // An environment variable is named as such.
        let e = error(&[], &[("REHYDRA_MAX_IN_FLIGHT", "many")]);
        assert!(
            e.starts_with("the environment variable REHYDRA_MAX_IN_FLIGHT=many: "),
            "{e}"
        );
    }

    #[test]
    fn a_missing_or_malformed_file_is_a_clear_error() {
        let e = error(&["--config", "/nonexistent/rehydra.toml"], &[]);
        assert!(
            e.starts_with("cannot read the configuration file /nonexistent/rehydra.toml"),
            "{e}"
        );
        assert!(e.contains("check the path"), "{e}");

        let (_dir, path) = file("store = \"memory://\nhttp = 1\n");
        let e = error(&["--config", &path], &[]);
        assert!(
            e.contains(&format!("the configuration file {path} is not valid TOML")),
            "{e}"
        );
        assert!(e.contains("line 1"), "{e}");
    }

    /// `(flags, defaults)` of each row of the README's `rehydra run` table.
    fn readme_rows() -> Vec<(Vec<String>, Vec<String>)> {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let section = readme
            .split("\n## ")
            .find(|s| s.starts_with("Running the host\n"))
            .expect("README.md has a section \"## Running the host\"");
        let cell = |text: &str| -> Vec<String> {
            text.split(" / ")
                .map(|s| s.trim().trim_matches('`').to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        section
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|row| {
                let cells: Vec<&str> = row.split('|').collect();
                let flags = cell(cells[1])
                    .into_iter()
                    .map(|f| f.trim_start_matches("--").to_string())
                    .collect();
                (flags, cell(cells[2]))
            })
            .collect()
    }

    #[test]
    fn the_readme_table_lists_every_flag_with_the_default_clap_reports() {
        let mut cmd = Cli::command();
        cmd.build();
        let run = cmd
            .find_subcommand("run")
            .expect("rehydra has a run subcommand");
        let args: HashMap<&str, &clap::Arg> = run
            .get_arguments()
            .filter_map(|a| Some((a.get_long()?, a)))
            .filter(|(long, _)| *long != "help")
            .collect();
        let rows = readme_rows();
        let mut listed = Vec::new();
        for (flags, defaults) in &rows {
            let mut taking_values = Vec::new();
            for flag in flags {
                let arg = args
                    .get(flag.as_str())
                    .unwrap_or_else(|| panic!("README.md lists --{flag}, which rehydra run lacks"));
                listed.push(flag.as_str());
                if arg.get_action().takes_values() {
                    taking_values.push((flag, arg));
                }
            }
            // A row gives no default, or one per flag that takes a value.
            if defaults.is_empty() {
                for (flag, arg) in &taking_values {
                    assert!(
                        arg.get_default_values().is_empty(),
                        "README.md gives --{flag} no default, but it has {:?}",
                        arg.get_default_values()
                    );
                }
            } else {
                assert_eq!(
                    defaults.len(),
                    taking_values.len(),
                    "README.md's row for {flags:?} has defaults {defaults:?}"
                );
                for ((flag, arg), readme) in taking_values.iter().zip(defaults) {
                    let code: Vec<String> = arg
                        .get_default_values()
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect();
                    assert_eq!(
                        code,
                        vec![readme.clone()],
                        "the default of --{flag}: README.md says {readme}, the code {code:?}"
                    );
                }
            }
        }
        for long in args.keys() {
            assert!(
                listed.contains(long),
                "--{long} is missing from README.md's rehydra run table"
            );
        }
    }

    #[test]
    fn the_example_file_names_every_key_and_yields_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rehydra.toml");
        let path = path.display().to_string();
        let from_file = ok(&["--config", &path], &[]);
        assert_eq!(settings(from_file), settings(ok(&[], &[])));

        // Keys without a default are there too, commented out.
        let text = std::fs::read_to_string(&path).expect("deploy/rehydra.toml");
        let cmd = RunArgs::augment_args(clap::Command::new("run"));
        for key in config_file::file_keys(&cmd) {
            assert!(
                text.lines().any(|l| {
                    let l = l.trim_start_matches('#').trim_start();
                    l.starts_with(&format!("{key} ="))
                }),
                "deploy/rehydra.toml lacks the key {key}"
            );
        }
    }
}
