//! The [`Aggregate`] trait — the one thing a plugin author implements — and
//! the declaration of the commands it accepts.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Context, Decision, Rejection, codec};

/// How a command relates to the existence of its aggregate.
///
/// The host enforces the mode before it calls the plugin, so `handle` never
/// sees a `Create` command for an aggregate that exists, nor an `Update`
/// command for one that does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandMode {
    /// The aggregate must not exist yet (otherwise the host answers
    /// `already_exists`).
    Create,
    /// The aggregate must exist (otherwise the host answers
    /// `aggregate_not_found`).
    Update,
    /// The aggregate may or may not exist.
    Upsert,
}

/// A command the aggregate accepts: its name in the API and its
/// [`CommandMode`].
///
/// The name is the serialized name of a variant of
/// [`Aggregate::Command`], e.g. `"deposit"` for `Deposit` under
/// `#[serde(rename_all = "kebab-case")]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandSpec {
    /// The command's name, e.g. `"deposit"`.
    pub name: &'static str,
    /// Whether the command creates the aggregate, updates it, or either.
    pub mode: CommandMode,
}

impl CommandSpec {
    /// A command named `name` with the given mode.
    pub const fn new(name: &'static str, mode: CommandMode) -> Self {
        CommandSpec { name, mode }
    }

    /// A command that creates the aggregate ([`CommandMode::Create`]).
    pub const fn create(name: &'static str) -> Self {
        Self::new(name, CommandMode::Create)
    }

    /// A command for an existing aggregate ([`CommandMode::Update`]).
    pub const fn update(name: &'static str) -> Self {
        Self::new(name, CommandMode::Update)
    }

    /// A command for an aggregate that may or may not exist
    /// ([`CommandMode::Upsert`]).
    pub const fn upsert(name: &'static str) -> Self {
        Self::new(name, CommandMode::Upsert)
    }
}

/// The domain logic of one aggregate type.
///
/// Implement it on a unit struct and export it with
/// [`export_aggregate!`](crate::export_aggregate). Everything is an
/// associated item: the plugin keeps no state of its own between calls.
///
/// # The command enum
///
/// [`Command`](Aggregate::Command) is a plain enum deriving `Deserialize`,
/// one variant per command, usually with
/// `#[serde(rename_all = "kebab-case")]` so that `UpdateProfile` is the
/// command `update-profile`. The SDK picks the variant by the command's name
/// and deserializes the command's JSON data into it:
///
/// * a struct variant (`Deposit { amount: u64 }`) reads the data's fields;
/// * a newtype variant (`Deposit(DepositData)`) reads the data as that type;
/// * a unit variant (`Close`) accepts `{}`, an empty body, or any object
///   (fields are ignored, as serde ignores unknown fields of structs).
///
/// Data that does not fit becomes [`Rejection::Invalid`] with the failing
/// field's name (`"amount"`, or a path such as `"address.city"` or
/// `"lines[2].qty"`), or the empty field name `""` when the problem is the
/// data as a whole. To report every invalid field at once rather than the
/// first one serde meets, give the fields `#[serde(default)]` and validate
/// them in [`handle`](Aggregate::handle) with a
/// [`FieldErrors`](crate::FieldErrors).
///
/// # The event enum
///
/// [`Event`](Aggregate::Event) is a plain enum deriving `Serialize` and
/// `Deserialize`. A variant's (serialized) name is the event type stored in
/// the stream — `Deposited` — and its fields are the event's JSON data;
/// a unit variant is stored with the data `{}`. Do not rename the variants
/// to kebab-case: event types are conventionally PascalCase, and once events
/// are stored their names are forever.
///
/// # State
///
/// [`State`](Aggregate::State) is stored by the host as JSON bytes tagged
/// with [`STATE_SCHEMA`](Aggregate::STATE_SCHEMA). Its `Default` is the
/// state of an aggregate with no events. When you change the state's shape
/// in a way old JSON cannot be read as, bump `STATE_SCHEMA`: the host then
/// rebuilds every aggregate's state from its events with the new code.
pub trait Aggregate {
    /// The aggregate type, e.g. `"bank-account"`; it names the aggregate in
    /// the API's URLs and must be unique among the loaded plugins.
    const TYPE: &'static str;

    /// The prefix of the aggregate's streams, which are named
    /// `<STREAM_PREFIX>-<aggregate id>`, e.g. `"bank_account"`. It must not
    /// be empty nor contain `-`, so that the stream's category (the part
    /// before the first `-`) is exactly the prefix.
    const STREAM_PREFIX: &'static str;

    /// The version of the state's encoding. Bump it when old state JSON can
    /// no longer be read as [`State`](Aggregate::State).
    const STATE_SCHEMA: u32 = 1;

    /// Every command the aggregate accepts, with its mode. The names must
    /// be exactly the serialized variant names of
    /// [`Command`](Aggregate::Command); `describe` checks it, and a plugin
    /// whose declaration and enum disagree fails to load.
    const COMMANDS: &'static [CommandSpec];

    /// The aggregate's state, folded from its events by
    /// [`apply`](Aggregate::apply). `Default` is the state before the first
    /// event.
    type State: Serialize + DeserializeOwned + Default;

    /// The commands, one enum variant per command (see the trait's docs).
    type Command: DeserializeOwned;

    /// The events, one enum variant per event type (see the trait's docs).
    type Event: Serialize + DeserializeOwned;

    /// Every event type the aggregate emits.
    ///
    /// The default lists the variant names of [`Event`](Aggregate::Event),
    /// which it reads from the enum's derived `Deserialize`; override it only
    /// for an event type with a hand-written `Deserialize`.
    fn event_types() -> &'static [&'static str] {
        codec::variant_names::<Self::Event>().unwrap_or(&[])
    }

    /// Decide what `command` does to an aggregate in `state`.
    ///
    /// Return the events to store (possibly none), optionally with a reply
    /// for the client, or a [`Rejection`]. Do not change anything here:
    /// the SDK computes the new state by passing each returned event through
    /// [`apply`](Aggregate::apply), exactly as when the aggregate is later
    /// rebuilt from its stream.
    fn handle(
        state: &Self::State,
        command: Self::Command,
        ctx: &Context,
    ) -> Result<Decision<Self::Event>, Rejection>;

    /// Fold one event into the state. It must not fail: the event has
    /// happened. Keep it free of decisions and validation.
    ///
    /// It sees the event's data only. The metadata the host stored with the
    /// event (ids, timestamp, principal) reaches the plugin as one JSON
    /// string, which the SDK does not read: rehydration never pays to
    /// parse it.
    fn apply(state: &mut Self::State, event: Self::Event);
}
