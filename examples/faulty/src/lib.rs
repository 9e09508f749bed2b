//! `faulty`: a plugin that misbehaves on purpose, one command per
//! misbehaviour, so the host's sandbox can be tested against a real
//! component. It uses the raw WIT bindings rather than the SDK, because the
//! SDK would refuse to produce most of this output.
//!
//! Every command is `upsert`. `ok` behaves: one `Happened` event and a
//! counter in the state. The others, and what the host must answer:
//!
//! | command | does | host answers |
//! |---|---|---|
//! | `busy` | `{"n": N}`: N rounds of arithmetic, then one event; CPU work that ends | one event, the result as reply |
//! | `spin` | loops forever | `plugin_failed` / `deadline_exceeded` |
//! | `hog` | allocates without bound | `plugin_failed` / `memory_limit` |
//! | `panic` | panics | `plugin_failed` / `trap`, with the panic message |
//! | `read-file` | opens `/etc/passwd` | `rejected` with the error it got (no files) |
//! | `read-env` | reads the environment | `rejected` (it is empty) |
//! | `connect` | opens TCP to `127.0.0.1:{port}` | `rejected` with the error it got |
//! | `clock` | reads the wall clock | replies the seconds since 1970 (frozen: 0) |
//! | `huge-event` | one event of `{bytes}` bytes (default 2 MiB) | `plugin_failed` / `bad_output` |
//! | `many-events` | `{count}` events (default 100 000) | `plugin_failed` / `bad_output` |
//! | `bad-event-type` | an event type with a space | `plugin_failed` / `bad_output` |
//! | `undeclared-event` | an event type `describe()` did not list | `plugin_failed` / `bad_output` |
//! | `bad-json` | event data that is not JSON | `plugin_failed` / `bad_output` |
//! | `bad-timer` | `{"case": "key"\|"at"\|"command"}`: a timer with a bad key, due time or command name | `plugin_failed` / `bad_output` |
//! | `big-state` | state of `{bytes}` bytes (default 10 MiB) | `plugin_failed` / `bad_output` |
//! | `admin-only` | succeeds only for the principal `admin` | `forbidden` otherwise (shows the principal reaches the plugin) |
//! | `log-flood` | logs `{count}` lines (default 10 000) through `log`, and as many to stdout | `ok`; the host logs at most `--plugin-log-rate` lines a second of them and counts the rest as dropped |
//!
//! Feature `describe-traps` builds a variant whose `describe()` panics;
//! feature `other-world` builds a component of another world of another
//! WIT package version; feature `contract-0-1` builds this plugin against
//! the previous contract, `rehydra:aggregate@0.1.0` (a frozen copy in
//! `wit-0.1.0/`), as a plugin nobody rebuilt would be.

#[cfg(not(feature = "other-world"))]
// The generated export glue takes one argument per flattened WIT value.
#[allow(clippy::too_many_arguments)]
mod faulty {
    #[cfg(not(feature = "contract-0-1"))]
    wit_bindgen::generate!({ path: "../../wit", world: "aggregate" });
    // The code below compiles against either: it never reads an event's
    // metadata (what 0.2.0 changed), and it sets a decision's timers (what
    // 0.3.0 added) only when built against the current contract.
    #[cfg(feature = "contract-0-1")]
    wit_bindgen::generate!({ path: "wit-0.1.0", world: "aggregate" });

    use rehydra::aggregate::types::{CommandInfo, CommandMode, NewEvent};

    const COMMANDS: &[&str] = &[
        "ok",
        "busy",
        "spin",
        "hog",
        "panic",
        "read-file",
        "read-env",
        "connect",
        "clock",
        "huge-event",
        "many-events",
        "bad-event-type",
        "undeclared-event",
        "bad-timer",
        "bad-json",
        "big-state",
        "admin-only",
        "log-flood",
    ];

    struct Faulty;

    fn count(state: &State) -> u64 {
        std::str::from_utf8(&state.bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn state_of(count: u64) -> State {
        State {
            schema: 1,
            bytes: count.to_string().into_bytes(),
        }
    }

    /// A number from the command's JSON data, without a JSON parser: the
    /// plugin keeps its dependencies to wit-bindgen alone.
    fn field(data: &[u8], name: &str) -> Option<u64> {
        let text = std::str::from_utf8(data).ok()?;
        let at = text.find(&format!("\"{name}\""))? + name.len() + 2;
        let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    fn event(event_type: &str, data: Vec<u8>) -> NewEvent {
        NewEvent {
            event_type: event_type.to_string(),
            data,
        }
    }

    fn decided(
        events: Vec<NewEvent>,
        state: State,
        reply: Option<String>,
    ) -> Result<Decision, Rejection> {
        Ok(Decision {
            events,
            state,
            reply: reply.map(String::into_bytes),
            #[cfg(not(feature = "contract-0-1"))]
            timers: Vec::new(),
        })
    }

    /// One event and a timer the SDK would never build: `{"case": ...}`
    /// picks a key with a space, a due time that is not RFC 3339, or a
    /// command name with a space.
    #[cfg(not(feature = "contract-0-1"))]
    fn bad_timer(data: &[u8], next: State, happened: NewEvent) -> Result<Decision, Rejection> {
        use rehydra::aggregate::types::{Due, Timer, TimerChange};
        let text = String::from_utf8_lossy(data);
        let mut timer = Timer {
            key: "k".into(),
            target: None,
            command_type: "ok".into(),
            data: b"{}".to_vec(),
            due: Due::AfterMs(1000),
        };
        if text.contains("\"key\"") {
            timer.key = "has space".into();
        } else if text.contains("\"at\"") {
            timer.due = Due::At("tomorrow".into());
        } else {
            timer.command_type = "has space".into();
        }
        Ok(Decision {
            events: vec![happened],
            state: next,
            reply: None,
            timers: vec![TimerChange::Schedule(timer)],
        })
    }

    impl Guest for Faulty {
        fn describe() -> Info {
            if cfg!(feature = "describe-traps") {
                panic!("describe() traps on purpose");
            }
            Info {
                aggregate_type: "faulty".into(),
                stream_prefix: "faulty".into(),
                state_schema: 1,
                commands: COMMANDS
                    .iter()
                    .map(|c| CommandInfo {
                        name: c.to_string(),
                        mode: CommandMode::Upsert,
                    })
                    .collect(),
                event_types: vec!["Happened".into(), "Big".into()],
            }
        }

        fn initial_state() -> State {
            state_of(0)
        }

        fn apply(s: State, events: Vec<RecordedEvent>) -> Result<State, String> {
            Ok(state_of(count(&s) + events.len() as u64))
        }

        fn handle(s: State, version: u64, c: Command) -> Result<Decision, Rejection> {
            let n = count(&s);
            let next = state_of(n + 1);
            let happened = || {
                event(
                    "Happened",
                    format!("{{\"n\":{}}}", version + 1).into_bytes(),
                )
            };
            match c.command_type.as_str() {
                "ok" => decided(vec![happened()], next, None),
                // Only the caller authenticated as `admin` may: shows that
                // the host hands the token's principal to the plugin.
                "admin-only" => {
                    let principal = c
                        .metadata
                        .iter()
                        .find(|(k, _)| k == "principal")
                        .map(|(_, v)| v.as_str());
                    match principal {
                        Some("admin") => decided(vec![happened()], next, None),
                        Some(other) => Err(Rejection::Forbidden(format!(
                            "{other} may not do this; only admin may"
                        ))),
                        None => Err(Rejection::Forbidden(
                            "only an authenticated admin may do this".into(),
                        )),
                    }
                }
                // CPU work that ends: `{"n": N}` rounds of arithmetic the
                // optimiser cannot skip.
                "busy" => {
                    let rounds: u64 = c
                        .data
                        .iter()
                        .filter(|b| b.is_ascii_digit())
                        .fold(0u64, |n, b| {
                            n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
                        });
                    let mut x: u64 = 1;
                    for i in 0..rounds {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(i),
                        );
                    }
                    decided(vec![happened()], next, Some(x.to_string()))
                }
                "spin" => {
                    let mut i: u64 = 0;
                    loop {
                        i = std::hint::black_box(i.wrapping_add(1));
                    }
                }
                "hog" => {
                    // Reserve without touching: grows linear memory as fast
                    // as the allocator can ask for it.
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        let mut block = Vec::with_capacity(1 << 20);
                        block.push(1u8);
                        hoard.push(std::hint::black_box(block));
                    }
                }
                "panic" => panic!("faulty plugin panicked on purpose"),
                "read-file" => match std::fs::read_to_string("/etc/passwd") {
                    Ok(text) => decided(vec![happened()], next, Some(format!("{:?}", text))),
                    Err(e) => Err(Rejection::Rejected(format!("read-file failed: {e}"))),
                },
                "read-env" => {
                    let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                    let args = std::env::args().count();
                    if vars.is_empty() && args == 0 {
                        Err(Rejection::Rejected(
                            "read-env found no environment variables and no arguments".into(),
                        ))
                    } else {
                        decided(
                            vec![happened()],
                            next,
                            Some(format!("\"{} vars, {args} args\"", vars.len())),
                        )
                    }
                }
                "connect" => {
                    let port = field(&c.data, "port").unwrap_or(9);
                    match std::net::TcpStream::connect(("127.0.0.1", port as u16)) {
                        Ok(_) => decided(vec![happened()], next, Some("\"connected\"".into())),
                        Err(e) => Err(Rejection::Rejected(format!("connect failed: {e}"))),
                    }
                }
                "clock" => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(u64::MAX);
                    decided(vec![], s, Some(secs.to_string()))
                }
                "huge-event" => {
                    let bytes = field(&c.data, "bytes").unwrap_or(2 << 20) as usize;
                    let mut data = b"{\"x\":\"".to_vec();
                    data.resize(bytes.saturating_sub(2).max(6), b'x');
                    data.extend_from_slice(b"\"}");
                    decided(vec![event("Big", data)], next, None)
                }
                "many-events" => {
                    let count = field(&c.data, "count").unwrap_or(100_000);
                    decided(
                        (0..count).map(|_| happened()).collect(),
                        state_of(n + count),
                        None,
                    )
                }
                "log-flood" => {
                    let count = field(&c.data, "count").unwrap_or(10_000);
                    for i in 0..count {
                        log(LogLevel::Info, &format!("log-flood line {i} through log"));
                    }
                    // The host keeps only the first bytes of stdout per call.
                    for i in 0..count {
                        println!("log-flood line {i} on stdout");
                    }
                    decided(vec![happened()], next, None)
                }
                "bad-event-type" => decided(vec![event("has space", b"{}".to_vec())], next, None),
                "undeclared-event" => decided(vec![event("Ghost", b"{}".to_vec())], next, None),
                "bad-json" => decided(vec![event("Happened", b"not json".to_vec())], next, None),
                #[cfg(not(feature = "contract-0-1"))]
                "bad-timer" => bad_timer(&c.data, next, happened()),
                "big-state" => {
                    let bytes = field(&c.data, "bytes").unwrap_or(10 << 20) as usize;
                    decided(
                        vec![happened()],
                        State {
                            schema: 1,
                            bytes: vec![b'7'; bytes],
                        },
                        None,
                    )
                }
                other => Err(Rejection::Rejected(format!("unknown command {other}"))),
            }
        }
    }

    export!(Faulty);
}

#[cfg(feature = "other-world")]
mod other_world {
    // A component of a WIT package version this host does not speak.
    wit_bindgen::generate!({
        inline: "package rehydra:aggregate@9.0.0;
                 world aggregate { export describe: func() -> string; }",
        world: "aggregate",
    });

    struct Other;

    impl Guest for Other {
        fn describe() -> String {
            "from the future".into()
        }
    }

    export!(Other);
}
