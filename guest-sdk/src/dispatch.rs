//! What the exported functions do, on plain bytes: describe the plugin,
//! give the initial state, apply events, handle a command.
//!
//! This module knows nothing of the WebAssembly bindings, so it runs — and
//! can be tested — natively. [`export_aggregate!`](crate::export_aggregate)
//! only converts between the WIT types and these.
//!
//! Use it to test a plugin end to end, through the same JSON the host sees:
//!
//! ```
//! # use rehydra_guest::{Aggregate, CommandSpec, Context, Decision, Rejection};
//! # use serde::{Deserialize, Serialize};
//! # struct Switch;
//! # #[derive(Deserialize)] #[serde(rename_all = "kebab-case")] enum Command { Toggle }
//! # #[derive(Serialize, Deserialize)] enum Event { Toggled }
//! # impl Aggregate for Switch {
//! #     const TYPE: &'static str = "switch";
//! #     const STREAM_PREFIX: &'static str = "switch";
//! #     const COMMANDS: &'static [CommandSpec] = &[CommandSpec::upsert("toggle")];
//! #     type State = bool;
//! #     type Command = Command;
//! #     type Event = Event;
//! #     fn handle(_: &bool, _: Command, _: &Context) -> Result<Decision<Event>, Rejection> {
//! #         Ok(Event::Toggled.into())
//! #     }
//! #     fn apply(on: &mut bool, _: Event) { *on = !*on }
//! # }
//! use rehydra_guest::dispatch;
//!
//! let state = dispatch::initial_state::<Switch>().unwrap();
//! let out = dispatch::handle::<Switch>(&state, "toggle", b"", &Context::new("s1", 0)).unwrap();
//! assert_eq!(out.events[0].event_type, "Toggled");
//! assert_eq!(out.state.bytes, b"true");
//! ```

use crate::codec::{self, DecodeError};
use crate::encode::encode_variant;
use crate::{Aggregate, CommandSpec, Context, FieldError, Rejection};

/// State bytes and the schema of their encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedState {
    /// The encoding's version ([`Aggregate::STATE_SCHEMA`]).
    pub schema: u32,
    /// The state as JSON.
    pub bytes: Vec<u8>,
}

/// An event as the host stores it: its type and JSON data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent {
    /// The event type: the variant's name, e.g. `Deposited`.
    pub event_type: String,
    /// The variant's fields as JSON (`{}` for a unit variant).
    pub data: Vec<u8>,
}

/// A stored event handed to [`apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// The event type.
    pub event_type: &'a str,
    /// The event's JSON data.
    pub data: &'a [u8],
    /// The aggregate's version once this event is applied (used in error
    /// messages).
    pub version: u64,
}

/// What [`handle`] produced for an accepted command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The events to store, in order.
    pub events: Vec<EncodedEvent>,
    /// The state after applying `events`.
    pub state: EncodedState,
    /// The reply for the client, as JSON.
    pub reply: Option<Vec<u8>>,
    /// Timers to schedule or cancel, in order.
    pub timers: Vec<crate::TimerChange>,
}

/// Why [`handle`] produced no [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleError {
    /// The command was refused; the host reports it to the client.
    Rejected(Rejection),
    /// The plugin is broken (an event or reply it produced cannot be
    /// encoded or read back, or its declarations disagree with its types).
    /// The exported `handle` turns this into a trap, which the host reports
    /// as `plugin_failed`.
    Failed(String),
}

impl From<Rejection> for HandleError {
    fn from(rejection: Rejection) -> Self {
        HandleError::Rejected(rejection)
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// [`Aggregate::TYPE`].
    pub aggregate_type: &'static str,
    /// [`Aggregate::STREAM_PREFIX`].
    pub stream_prefix: &'static str,
    /// [`Aggregate::STATE_SCHEMA`].
    pub state_schema: u32,
    /// [`Aggregate::COMMANDS`].
    pub commands: &'static [CommandSpec],
    /// [`Aggregate::event_types`].
    pub event_types: &'static [&'static str],
}

/// Describes aggregate `A`, after checking that its declarations are
/// consistent: a non-empty type, a stream prefix without `-`, commands that
/// match the command enum's variants one to one, and at least one event
/// type, without duplicates.
///
/// An error here is a bug in the plugin; the exported `describe` traps with
/// it, so the host refuses to load the plugin and logs why.
pub fn describe<A: Aggregate>() -> Result<Description, String> {
    if A::TYPE.is_empty() {
        return Err("Aggregate::TYPE is empty".to_owned());
    }
    if A::STREAM_PREFIX.is_empty() || A::STREAM_PREFIX.contains('-') {
        return Err(format!(
            "Aggregate::STREAM_PREFIX {:?} must be non-empty and contain no '-'",
            A::STREAM_PREFIX
        ));
    }
    if A::COMMANDS.is_empty() {
        return Err("Aggregate::COMMANDS is empty".to_owned());
    }
    if let Some(name) = first_duplicate(A::COMMANDS.iter().map(|c| c.name)) {
        return Err(format!(
            "command `{name}` is declared twice in Aggregate::COMMANDS"
        ));
    }
    let Some(variants) = codec::variant_names::<A::Command>() else {
        return Err(
            "Aggregate::Command must be a plain enum deriving Deserialize (one variant per command)"
                .to_owned(),
        );
    };
    for spec in A::COMMANDS {
        if !variants.contains(&spec.name) {
            return Err(format!(
                "Aggregate::COMMANDS declares `{}` but the command enum has no such variant \
                 (its variants are named {variants:?})",
                spec.name
            ));
        }
    }
    for variant in variants {
        if !A::COMMANDS.iter().any(|c| c.name == *variant) {
            return Err(format!(
                "the command enum's variant `{variant}` is missing from Aggregate::COMMANDS"
            ));
        }
    }
    let event_types = A::event_types();
    if event_types.is_empty() {
        return Err(
            "no event types: Aggregate::Event must be a plain enum deriving Deserialize, \
             or Aggregate::event_types must list them"
                .to_owned(),
        );
    }
    if let Some(name) = first_duplicate(event_types.iter().copied()) {
        return Err(format!("event type `{name}` is listed twice"));
    }
    Ok(Description {
        aggregate_type: A::TYPE,
        stream_prefix: A::STREAM_PREFIX,
        state_schema: A::STATE_SCHEMA,
        commands: A::COMMANDS,
        event_types,
    })
}

/// The state of an aggregate with no events: `A::State::default()`, encoded.
pub fn initial_state<A: Aggregate>() -> Result<EncodedState, String> {
    encode_state::<A>(&A::State::default())
}

/// Encodes a state as JSON with schema [`Aggregate::STATE_SCHEMA`].
pub fn encode_state<A: Aggregate>(state: &A::State) -> Result<EncodedState, String> {
    match serde_json::to_vec(state) {
        Ok(bytes) => Ok(EncodedState {
            schema: A::STATE_SCHEMA,
            bytes,
        }),
        Err(err) => Err(format!("the state cannot be encoded as JSON: {err}")),
    }
}

/// Decodes state bytes. Empty bytes are the default state, whatever their
/// schema; otherwise the schema must be [`Aggregate::STATE_SCHEMA`] and the
/// bytes must read as [`Aggregate::State`]. Either failure is
/// [`Rejection::IncompatibleState`] with the schema that was passed in,
/// which makes the host rebuild the state from the events.
pub fn decode_state<A: Aggregate>(state: &EncodedState) -> Result<A::State, Rejection> {
    if state.bytes.is_empty() {
        return Ok(A::State::default());
    }
    if state.schema != A::STATE_SCHEMA {
        return Err(Rejection::IncompatibleState(state.schema));
    }
    serde_json::from_slice(&state.bytes).map_err(|err| {
        crate::log::warn(format_args!(
            "state of schema {} does not read as this plugin's state: {err}",
            state.schema
        ));
        Rejection::IncompatibleState(state.schema)
    })
}

/// Folds stored events, in order, into `state` with [`Aggregate::apply`].
///
/// An error names the first event that cannot be read (unknown type, or
/// data that does not fit its variant), or says why the state cannot.
pub fn apply<'a, A: Aggregate>(
    state: &EncodedState,
    events: impl IntoIterator<Item = EventRef<'a>>,
) -> Result<EncodedState, String> {
    let mut current = decode_state::<A>(state).map_err(|_| {
        format!(
            "cannot read state of schema {} (this plugin reads schema {})",
            state.schema,
            A::STATE_SCHEMA
        )
    })?;
    for event in events {
        let decoded = decode_event::<A>(event.event_type, event.data).map_err(|reason| {
            format!(
                "cannot read event {} (`{}`): {reason}",
                event.version, event.event_type
            )
        })?;
        A::apply(&mut current, decoded);
    }
    encode_state::<A>(&current)
}

/// Handles the command `command_type` with JSON `data` for an aggregate in
/// `state`, as one host call does.
///
/// 1. Decodes the state (a schema it cannot read is
///    [`Rejection::IncompatibleState`]).
/// 2. Picks the command's variant by name (an undeclared name is
///    [`Rejection::Rejected`]) and deserializes `data` into it (blank data
///    reads as `{}`; data that does not fit is [`Rejection::Invalid`]).
/// 3. Runs [`Aggregate::handle`].
/// 4. Encodes each event, reads it back from its JSON, and applies it with
///    [`Aggregate::apply`] — so the new state is exactly what rebuilding
///    the aggregate from the stored events gives.
/// 5. Encodes the new state and the reply.
pub fn handle<A: Aggregate>(
    state: &EncodedState,
    command_type: &str,
    data: &[u8],
    ctx: &Context,
) -> Result<Outcome, HandleError> {
    let mut current = decode_state::<A>(state)?;
    let command = decode_command::<A>(command_type, data)?;
    let decision = A::handle(&current, command, ctx)?;
    let (events, reply, timers) = decision.into_parts().map_err(HandleError::Failed)?;

    let mut encoded = Vec::with_capacity(events.len());
    for event in &events {
        let (event_type, data) = encode_variant(event)
            .map_err(|err| HandleError::Failed(format!("an event cannot be encoded: {err}")))?;
        encoded.push(EncodedEvent {
            event_type: event_type.to_owned(),
            data,
        });
    }
    drop(events);
    for event in &encoded {
        let stored = decode_event::<A>(&event.event_type, &event.data).map_err(|reason| {
            HandleError::Failed(format!(
                "the event `{}` this plugin just produced does not read back: {reason}",
                event.event_type
            ))
        })?;
        A::apply(&mut current, stored);
    }

    let state = encode_state::<A>(&current).map_err(HandleError::Failed)?;
    Ok(Outcome {
        events: encoded,
        state,
        reply,
        timers,
    })
}

/// Picks and deserializes the command variant.
fn decode_command<A: Aggregate>(name: &str, data: &[u8]) -> Result<A::Command, HandleError> {
    if !A::COMMANDS.iter().any(|c| c.name == name) {
        return Err(Rejection::rejected(format!("unknown command `{name}`")).into());
    }
    let payload = match codec::parse_payload(data) {
        Ok(value) if value.is_object() => value,
        Ok(_) => return Err(invalid_data("must be a JSON object")),
        Err(err) => return Err(invalid_data(format!("is not valid JSON: {err}"))),
    };
    codec::decode_variant::<A::Command>(name, payload).map_err(|err| match err {
        DecodeError::Invalid(field) => Rejection::Invalid(vec![field]).into(),
        DecodeError::UnknownVariant => HandleError::Failed(format!(
            "command `{name}` is declared in Aggregate::COMMANDS but the command enum has no such variant"
        )),
    })
}

/// A field error on the command's data as a whole.
fn invalid_data(message: impl Into<String>) -> HandleError {
    let message = format!("the command's data {}", message.into());
    Rejection::Invalid(vec![FieldError::new("", message)]).into()
}

/// Reads a stored event as the aggregate's event enum.
fn decode_event<A: Aggregate>(event_type: &str, data: &[u8]) -> Result<A::Event, String> {
    if let Some(event) = codec::decode_variant_from_slice::<A::Event>(event_type, data) {
        return Ok(event);
    }
    // It does not read: decode it again, the slow way that names the field.
    let payload =
        codec::parse_payload(data).map_err(|err| format!("data is not valid JSON: {err}"))?;
    codec::decode_variant::<A::Event>(event_type, payload).map_err(|err| match err {
        DecodeError::UnknownVariant => "unknown event type".to_owned(),
        DecodeError::Invalid(field) if field.field.is_empty() => field.message,
        DecodeError::Invalid(field) => format!("field `{}`: {}", field.field, field.message),
    })
}

/// The first name that occurs twice.
fn first_duplicate<'n>(names: impl Iterator<Item = &'n str>) -> Option<&'n str> {
    let mut seen = Vec::new();
    for name in names {
        if seen.contains(&name) {
            return Some(name);
        }
        seen.push(name);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};
    use serde_json::{Value, json};

    use super::*;
    use crate::{CommandMode, Decision, FieldErrors};

    /// A bar tab: opened for a table, orders added, paid once.
    struct Tab;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    struct TabState {
        table: u32,
        items: Vec<String>,
        total: u64,
        paid: bool,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum TabCommand {
        Open { table: u32 },
        Order(Order),
        Pay,
        Debug,
    }

    #[derive(Deserialize)]
    struct Order {
        #[serde(default)]
        item: String,
        #[serde(default)]
        price: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum TabEvent {
        Opened { table: u32 },
        Ordered { item: String, price: u64 },
        Paid,
    }

    impl Aggregate for Tab {
        const TYPE: &'static str = "tab";
        const STREAM_PREFIX: &'static str = "tab";
        const STATE_SCHEMA: u32 = 3;
        const COMMANDS: &'static [CommandSpec] = &[
            CommandSpec::create("open"),
            CommandSpec::update("order"),
            CommandSpec::update("pay"),
            CommandSpec::upsert("debug"),
        ];
        type State = TabState;
        type Command = TabCommand;
        type Event = TabEvent;

        fn handle(
            state: &TabState,
            command: TabCommand,
            ctx: &Context,
        ) -> Result<Decision<TabEvent>, Rejection> {
            match command {
                TabCommand::Open { table } => Ok(TabEvent::Opened { table }.into()),
                TabCommand::Order(order) => {
                    let mut errors = FieldErrors::new();
                    errors.ensure(!order.item.is_empty(), "item", "is required");
                    errors.ensure(order.price > 0, "price", "must be greater than 0");
                    errors.into_result()?;
                    if state.paid {
                        return Err(Rejection::rejected("tab is paid"));
                    }
                    let total = state.total + order.price;
                    Ok(Decision::emit(TabEvent::Ordered {
                        item: order.item,
                        price: order.price,
                    })
                    .with_reply(json!({ "total": total, "version": ctx.version() })))
                }
                TabCommand::Pay if state.paid => Ok(Decision::none().with_reply(ctx.version())),
                TabCommand::Pay => match ctx.principal() {
                    Some(_) => Ok(TabEvent::Paid.into()),
                    None => Err(Rejection::forbidden("sign in to pay")),
                },
                // A reply that cannot be JSON: map keys must be strings.
                TabCommand::Debug => {
                    Ok(Decision::none().with_reply(BTreeMap::from([(vec![1u8], 1u8)])))
                }
            }
        }

        fn apply(state: &mut TabState, event: TabEvent) {
            match event {
                TabEvent::Opened { table } => state.table = table,
                TabEvent::Ordered { item, price } => {
                    state.items.push(item);
                    state.total += price;
                }
                TabEvent::Paid => state.paid = true,
            }
        }
    }

    fn ctx(version: u64) -> Context {
        Context::new("t1", version).with_metadata(Context::PRINCIPAL, "ann")
    }

    fn state(value: Value) -> EncodedState {
        EncodedState {
            schema: 3,
            bytes: serde_json::to_vec(&value).unwrap(),
        }
    }

    fn rejection(result: Result<Outcome, HandleError>) -> Rejection {
        match result {
            Err(HandleError::Rejected(rejection)) => rejection,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// Opens table 4 and orders two items, returning every outcome.
    fn session() -> Vec<Outcome> {
        let s0 = initial_state::<Tab>().unwrap();
        let open = handle::<Tab>(&s0, "open", br#"{"table":4}"#, &ctx(0)).unwrap();
        let tea = br#"{"item":"tea","price":3}"#;
        let first = handle::<Tab>(&open.state, "order", tea, &ctx(1)).unwrap();
        let cake = br#"{"item":"cake","price":5}"#;
        let second = handle::<Tab>(&first.state, "order", cake, &ctx(2)).unwrap();
        vec![open, first, second]
    }

    #[test]
    fn describes_the_aggregate() {
        let d = describe::<Tab>().unwrap();
        assert_eq!(d.aggregate_type, "tab");
        assert_eq!(d.stream_prefix, "tab");
        assert_eq!(d.state_schema, 3);
        assert_eq!(d.commands[0], CommandSpec::new("open", CommandMode::Create));
        assert_eq!(d.commands.len(), 4);
        assert_eq!(d.event_types, ["Opened", "Ordered", "Paid"]);
    }

    #[test]
    fn initial_state_is_the_default_state() {
        let s = initial_state::<Tab>().unwrap();
        assert_eq!(s.schema, 3);
        assert_eq!(decode_state::<Tab>(&s).unwrap(), TabState::default());
        let empty = EncodedState {
            schema: 0,
            bytes: Vec::new(),
        };
        assert_eq!(decode_state::<Tab>(&empty).unwrap(), TabState::default());
    }

    #[test]
    fn dispatches_by_command_name() {
        let outcomes = session();
        assert_eq!(
            outcomes[0].events,
            [EncodedEvent {
                event_type: "Opened".into(),
                data: br#"{"table":4}"#.to_vec(),
            }]
        );
        assert_eq!(outcomes[2].events[0].event_type, "Ordered");
        assert_eq!(
            json_of(&outcomes[2].events[0].data),
            json!({"item": "cake", "price": 5})
        );
        assert_eq!(
            json_of(&outcomes[2].state.bytes),
            json!({"table": 4, "items": ["tea", "cake"], "total": 8, "paid": false})
        );
    }

    #[test]
    fn unit_command_accepts_an_empty_body_and_an_empty_object() {
        let [.., last] = &session()[..] else { panic!() };
        for body in [&b""[..], b"{}", b" ", b"{\"extra\":1}"] {
            let paid = handle::<Tab>(&last.state, "pay", body, &ctx(3)).unwrap();
            assert_eq!(paid.events[0].event_type, "Paid");
            assert_eq!(paid.events[0].data, b"{}");
        }
    }

    #[test]
    fn unknown_command_is_rejected() {
        let s = initial_state::<Tab>().unwrap();
        let r = rejection(handle::<Tab>(&s, "tip", b"{}", &ctx(1)));
        assert_eq!(r, Rejection::rejected("unknown command `tip`"));
    }

    #[test]
    fn bad_data_is_invalid_with_the_field_named() {
        let s = state(json!({"table": 1, "items": [], "total": 0, "paid": false}));
        let r = rejection(handle::<Tab>(&s, "open", b"{}", &ctx(0)));
        assert_eq!(r, Rejection::invalid("table", "is required"));

        let r = rejection(handle::<Tab>(&s, "open", br#"{"table":"six"}"#, &ctx(0)));
        let Rejection::Invalid(fields) = r else {
            panic!("{r:?}")
        };
        assert_eq!(fields[0].field, "table");
        assert!(
            fields[0].message.contains("invalid type"),
            "{}",
            fields[0].message
        );

        let r = rejection(handle::<Tab>(&s, "open", br#"{"table":-1}"#, &ctx(0)));
        let Rejection::Invalid(fields) = r else {
            panic!("{r:?}")
        };
        assert_eq!(fields[0].field, "table");

        // Validation in `handle` reports every field at once.
        let r = rejection(handle::<Tab>(&s, "order", br#"{"price":0}"#, &ctx(1)));
        assert_eq!(
            r,
            Rejection::invalid("item", "is required")
                .and_invalid("price", "must be greater than 0")
        );

        for body in [&b"[1]"[..], b"null", b"{not json"] {
            let r = rejection(handle::<Tab>(&s, "open", body, &ctx(0)));
            let Rejection::Invalid(fields) = r else {
                panic!("{r:?}")
            };
            assert_eq!(fields.len(), 1);
            assert_eq!(fields[0].field, "");
            assert!(fields[0].message.starts_with("the command's data"));
        }
    }

    #[test]
    fn domain_rejections_pass_through() {
        let s = state(json!({"table": 1, "items": [], "total": 0, "paid": true}));
        let r = rejection(handle::<Tab>(
            &s,
            "order",
            br#"{"item":"x","price":1}"#,
            &ctx(2),
        ));
        assert_eq!(r, Rejection::rejected("tab is paid"));
        let s = state(json!({"table": 1, "items": [], "total": 0, "paid": false}));
        let r = rejection(handle::<Tab>(&s, "pay", b"{}", &Context::new("t1", 1)));
        assert_eq!(r, Rejection::forbidden("sign in to pay"));
    }

    #[test]
    fn state_of_another_schema_is_incompatible() {
        let mut s = state(json!({"table": 1, "items": [], "total": 0, "paid": false}));
        s.schema = 2;
        let r = rejection(handle::<Tab>(&s, "pay", b"{}", &ctx(1)));
        assert_eq!(r, Rejection::IncompatibleState(2));
        let err = apply::<Tab>(&s, []).unwrap_err();
        assert!(err.contains("schema 2"), "{err}");

        // The right schema, but bytes that do not read as the state.
        let s = state(json!({"tables": "many"}));
        assert_eq!(
            rejection(handle::<Tab>(&s, "pay", b"{}", &ctx(1))),
            Rejection::IncompatibleState(3)
        );
        assert!(apply::<Tab>(&s, []).is_err());
    }

    #[test]
    fn decision_state_equals_state_rebuilt_from_the_events() {
        let outcomes = session();
        let events: Vec<&EncodedEvent> = outcomes.iter().flat_map(|o| &o.events).collect();
        let refs = events.iter().zip(1..).map(|(e, version)| EventRef {
            event_type: &e.event_type,
            data: &e.data,
            version,
        });
        let rebuilt = apply::<Tab>(&initial_state::<Tab>().unwrap(), refs).unwrap();
        assert_eq!(rebuilt, outcomes[2].state);
    }

    #[test]
    fn apply_round_trips_and_continues_from_a_state() {
        let s = state(json!({"table": 2, "items": ["tea"], "total": 3, "paid": false}));
        let events = [
            EventRef {
                event_type: "Ordered",
                data: br#"{"item":"pie","price":4}"#,
                version: 2,
            },
            EventRef {
                event_type: "Paid",
                data: b"{}",
                version: 3,
            },
        ];
        let after = apply::<Tab>(&s, events).unwrap();
        assert_eq!(after.schema, 3);
        assert_eq!(
            decode_state::<Tab>(&after).unwrap(),
            TabState {
                table: 2,
                items: vec!["tea".into(), "pie".into()],
                total: 7,
                paid: true
            }
        );
        // Applying no events gives back the same state.
        assert_eq!(apply::<Tab>(&after, []).unwrap(), after);
    }

    #[test]
    fn apply_reports_unreadable_events() {
        let s = initial_state::<Tab>().unwrap();
        let unknown = EventRef {
            event_type: "Refunded",
            data: b"{}",
            version: 7,
        };
        let err = apply::<Tab>(&s, [unknown]).unwrap_err();
        assert_eq!(err, "cannot read event 7 (`Refunded`): unknown event type");
        let bad = EventRef {
            event_type: "Ordered",
            data: br#"{"item":"x"}"#,
            version: 2,
        };
        let err = apply::<Tab>(&s, [bad]).unwrap_err();
        assert_eq!(
            err,
            "cannot read event 2 (`Ordered`): field `price`: is required"
        );
    }

    #[test]
    fn replies_are_json() {
        let outcomes = session();
        assert_eq!(outcomes[0].reply, None);
        let reply = json_of(outcomes[2].reply.as_deref().unwrap());
        assert_eq!(reply, json!({"total": 8, "version": 2}));

        // No events, and the current version as the reply.
        let s = state(json!({"table": 1, "items": [], "total": 0, "paid": true}));
        let out = handle::<Tab>(&s, "pay", b"", &ctx(5)).unwrap();
        assert!(out.events.is_empty());
        assert_eq!(out.reply.as_deref(), Some(&b"5"[..]));
        assert_eq!(
            decode_state::<Tab>(&out.state).unwrap(),
            decode_state::<Tab>(&s).unwrap()
        );
    }

    #[test]
    fn a_reply_that_cannot_be_json_is_a_plugin_failure() {
        let s = initial_state::<Tab>().unwrap();
        match handle::<Tab>(&s, "debug", b"{}", &ctx(0)) {
            Err(HandleError::Failed(message)) => assert!(message.contains("reply"), "{message}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Declares a command the enum does not have.
    struct Misdeclared;

    impl Aggregate for Misdeclared {
        const TYPE: &'static str = "tab";
        const STREAM_PREFIX: &'static str = "tab";
        const COMMANDS: &'static [CommandSpec] = &[
            CommandSpec::create("open"),
            CommandSpec::update("order"),
            CommandSpec::update("pay"),
            CommandSpec::update("debug"),
            CommandSpec::update("refund"),
        ];
        type State = TabState;
        type Command = TabCommand;
        type Event = TabEvent;

        fn handle(
            state: &TabState,
            command: TabCommand,
            ctx: &Context,
        ) -> Result<Decision<TabEvent>, Rejection> {
            Tab::handle(state, command, ctx)
        }

        fn apply(state: &mut TabState, event: TabEvent) {
            Tab::apply(state, event)
        }
    }

    #[test]
    fn describe_checks_the_declarations() {
        let err = describe::<Misdeclared>().unwrap_err();
        assert!(err.contains("`refund`"), "{err}");
        let s = initial_state::<Misdeclared>().unwrap();
        let result = handle::<Misdeclared>(&s, "refund", b"{}", &ctx(1));
        assert!(matches!(result, Err(HandleError::Failed(_))), "{result:?}");
    }
}
