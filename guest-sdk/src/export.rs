//! The glue behind [`export_aggregate!`](crate::export_aggregate) and
//! [`export_process_manager!`](crate::export_process_manager): the WIT
//! `Guest` implementations for any [`Aggregate`](crate::Aggregate) (and
//! [`ProcessManager`](crate::ProcessManager)), converting between the
//! generated WIT types and [`dispatch`](crate::dispatch)'s. The two worlds
//! have bindings of their own, so the glue is written once, as a macro,
//! and expanded for each.
//!
//! Failures that the WIT gives no way to report — a plugin whose
//! declarations are inconsistent (`describe`), a state that cannot be
//! encoded (`initial-state`), an event or reply that cannot be encoded
//! (`handle`) — are bugs in the plugin. They panic with a message naming
//! the plugin; the panic becomes a trap, which the host reports
//! (`plugin_failed`, or a plugin that fails to load) and logs, together
//! with the message the guest printed to stderr.

macro_rules! glue {
    ($bindings:ident, $plugin:ident, $bound:ident { $($extra:tt)* }) => {
use std::marker::PhantomData;

use crate::$bindings::Guest;
use crate::$bindings::rehydra::aggregate::types as wit;
use crate::dispatch::{self, EncodedState, EventRef, HandleError};

/// Implements the exported world for `A`.
pub struct $plugin<A>(PhantomData<fn() -> A>);

impl<A: crate::$bound> Guest for $plugin<A> {
    $($extra)*

    fn describe() -> wit::Info {
        let description = dispatch::describe::<A>()
            .unwrap_or_else(|err| panic!("plugin `{}` is misdeclared: {err}", A::TYPE));
        wit::Info {
            aggregate_type: description.aggregate_type.to_owned(),
            stream_prefix: description.stream_prefix.to_owned(),
            state_schema: description.state_schema,
            commands: description
                .commands
                .iter()
                .map(|spec| wit::CommandInfo {
                    name: spec.name.to_owned(),
                    mode: match spec.mode {
                        crate::CommandMode::Create => wit::CommandMode::Create,
                        crate::CommandMode::Update => wit::CommandMode::Update,
                        crate::CommandMode::Upsert => wit::CommandMode::Upsert,
                    },
                })
                .collect(),
            event_types: description
                .event_types
                .iter()
                .map(|&name| name.to_owned())
                .collect(),
        }
    }

    fn initial_state() -> wit::State {
        let state = dispatch::initial_state::<A>()
            .unwrap_or_else(|err| panic!("plugin `{}`: {err}", A::TYPE));
        to_wit_state(state)
    }

    fn apply(s: wit::State, events: Vec<wit::RecordedEvent>) -> Result<wit::State, String> {
        let state = EncodedState {
            schema: s.schema,
            bytes: s.bytes,
        };
        // Each event's metadata (JSON text) is left unread: `apply` has no
        // use for it, and parsing it would cost on every rehydration.
        let events = events.iter().map(|e| EventRef {
            event_type: &e.event_type,
            data: &e.data,
            version: e.version,
        });
        dispatch::apply::<A>(&state, events).map(to_wit_state)
    }

    fn handle(
        s: wit::State,
        version: u64,
        c: wit::Command,
    ) -> Result<wit::Decision, wit::Rejection> {
        let state = EncodedState {
            schema: s.schema,
            bytes: s.bytes,
        };
        let ctx = crate::Context::from_parts(c.aggregate_id, version, c.metadata);
        match dispatch::handle::<A>(&state, &c.command_type, &c.data, &ctx) {
            Ok(outcome) => Ok(wit::Decision {
                events: outcome
                    .events
                    .into_iter()
                    .map(|e| wit::NewEvent {
                        event_type: e.event_type,
                        data: e.data,
                    })
                    .collect(),
                state: to_wit_state(outcome.state),
                reply: outcome.reply,
                timers: outcome
                    .timers
                    .into_iter()
                    .map(to_wit_timer_change)
                    .collect(),
            }),
            Err(HandleError::Rejected(rejection)) => Err(to_wit_rejection(rejection)),
            Err(HandleError::Failed(err)) => {
                panic!(
                    "plugin `{}` failed on command `{}`: {err}",
                    A::TYPE,
                    c.command_type
                )
            }
        }
    }
}

fn to_wit_timer_change(change: crate::TimerChange) -> wit::TimerChange {
    match change {
        crate::TimerChange::Schedule {
            key,
            target,
            command,
            data,
            due,
        } => wit::TimerChange::Schedule(wit::Timer {
            key,
            target: target.map(|(aggregate_type, aggregate_id)| wit::AggregateRef {
                aggregate_type,
                aggregate_id,
            }),
            command_type: command,
            data,
            due: match due {
                crate::Due::At(at) => wit::Due::At(at),
                crate::Due::AfterMs(ms) => wit::Due::AfterMs(ms),
            },
        }),
        crate::TimerChange::Cancel(key) => wit::TimerChange::Cancel(key),
    }
}

fn to_wit_state(state: EncodedState) -> wit::State {
    wit::State {
        schema: state.schema,
        bytes: state.bytes,
    }
}

fn to_wit_rejection(rejection: crate::Rejection) -> wit::Rejection {
    match rejection {
        crate::Rejection::Invalid(errors) => wit::Rejection::Invalid(
            errors
                .into_iter()
                .map(|e| wit::FieldError {
                    field: e.field,
                    message: e.message,
                })
                .collect(),
        ),
        crate::Rejection::Rejected(message) => wit::Rejection::Rejected(message),
        crate::Rejection::Forbidden(message) => wit::Rejection::Forbidden(message),
        crate::Rejection::IncompatibleState(schema) => wit::Rejection::IncompatibleState(schema),
    }
}
    };
}

/// The `aggregate` world.
pub mod aggregate {
    glue!(bindings, Plugin, Aggregate {});
}

/// The `process-manager` world: the aggregate's exports and `process`.
pub mod process {
    glue!(process_bindings, ProcessPlugin, ProcessManager {
        fn process() -> wit::ProcessInfo {
            crate::process::process_info::<A>()
                .map(to_wit_process)
                .unwrap_or_else(|err| panic!("plugin `{}` is misdeclared: {err}", A::TYPE))
        }
    });

    fn to_wit_process(info: crate::process::ProcessDescription) -> wit::ProcessInfo {
        wit::ProcessInfo {
            follows: info
                .follows
                .iter()
                .map(|f| wit::Follow {
                    aggregate_type: f.aggregate_type.to_owned(),
                    event_type: f.event_type.to_owned(),
                    instance: match f.instance {
                        crate::InstanceKey::AggregateId => wit::InstanceKey::AggregateId,
                        crate::InstanceKey::CorrelationId => wit::InstanceKey::CorrelationId,
                        crate::InstanceKey::ScheduledBy => wit::InstanceKey::ScheduledBy,
                        crate::InstanceKey::DataField(field) => {
                            wit::InstanceKey::DataField(field.to_owned())
                        }
                    },
                    command: f.command.to_owned(),
                })
                .collect(),
            on_refused: info.on_refused.map(str::to_owned),
            finished_by: info.finished_by.iter().map(|&t| t.to_owned()).collect(),
        }
    }
}
