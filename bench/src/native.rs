//! The bank-account plugin's own code, linked natively and served through
//! the host's benchmark seam ([`rehydra::plugin::NativeAggregate`]): the
//! native twin of `target/plugins/bank-account.wasm`.
//!
//! Both run the very same source — `examples/bank-account/src/lib.rs`,
//! compiled into this binary as the module [`bank_account`], through the
//! guest SDK's [`dispatch`] functions, which the component's exports call
//! too — so the difference between them is what the component model and
//! the sandbox cost: the instance pool, the copies into and out of guest
//! memory, the deadline, and the guest-call hand-off off the async workers.
//!
//! (The source is included by path rather than by depending on the
//! `bank-account` package: a package that is also an `rlib` gets no LTO for
//! its `cdylib`, which would change the component itself.)

use std::sync::Arc;

/// The bank-account plugin's source, as the component is built from it
/// (without the cargo features of its test versions).
#[allow(unexpected_cfgs, dead_code)]
#[path = "../../examples/bank-account/src/lib.rs"]
mod bank_account;

use bank_account::BankAccount;
use rehydra::plugin::ReplayEvent;
use rehydra::plugin::engine::SandboxLimits;
use rehydra::plugin::{
    AggregateRef, CommandInput, CommandMode, CommandSpec, Decision, Due, NativeAggregate, NewEvent,
    Plugin, PluginInfo, PluginRegistry, Rejection, StateBytes, TimerChange, TimerRequest,
};
use rehydra_guest::dispatch::{self, EncodedState, EventRef, HandleError};

/// The bank account, natively.
pub struct NativeBankAccount;

impl NativeAggregate for NativeBankAccount {
    fn initial_state(&self) -> StateBytes {
        let s = dispatch::initial_state::<BankAccount>()
            .expect("the bank account's default state encodes");
        StateBytes {
            schema: s.schema,
            bytes: s.bytes,
        }
    }

    fn handle(
        &self,
        state: &StateBytes,
        version: u64,
        command: &CommandInput<'_>,
    ) -> Result<Result<Decision, Rejection>, String> {
        // The component receives its own copy of each argument too.
        let state = EncodedState {
            schema: state.schema,
            bytes: state.bytes.clone(),
        };
        let ctx = rehydra_guest::Context::from_parts(
            command.aggregate_id.to_string(),
            version,
            command.metadata.to_vec(),
        );
        match dispatch::handle::<BankAccount>(&state, command.command_type, command.data, &ctx) {
            Ok(outcome) => Ok(Ok(Decision {
                events: outcome
                    .events
                    .into_iter()
                    .map(|e| NewEvent {
                        event_type: e.event_type,
                        data: e.data,
                    })
                    .collect(),
                state: StateBytes {
                    schema: outcome.state.schema,
                    bytes: outcome.state.bytes,
                },
                reply: outcome.reply,
                timers: outcome.timers.into_iter().map(timer_change).collect(),
            })),
            Err(HandleError::Rejected(r)) => Ok(Err(rejection(r))),
            Err(HandleError::Failed(message)) => Err(message),
        }
    }

    fn apply(&self, state: &StateBytes, events: &[ReplayEvent]) -> Result<StateBytes, String> {
        let state = EncodedState {
            schema: state.schema,
            bytes: state.bytes.clone(),
        };
        let events = events.iter().map(|e| EventRef {
            event_type: &e.event_type,
            data: &e.data,
            version: e.version,
        });
        dispatch::apply::<BankAccount>(&state, events).map(|s| StateBytes {
            schema: s.schema,
            bytes: s.bytes,
        })
    }
}

fn rejection(r: rehydra_guest::Rejection) -> Rejection {
    match r {
        rehydra_guest::Rejection::Invalid(fields) => Rejection::Invalid(
            fields
                .into_iter()
                .map(|f| rehydra::error::FieldError {
                    field: f.field,
                    message: f.message,
                })
                .collect(),
        ),
        rehydra_guest::Rejection::Rejected(m) => Rejection::Rejected(m),
        rehydra_guest::Rejection::Forbidden(m) => Rejection::Forbidden(m),
        rehydra_guest::Rejection::IncompatibleState(s) => Rejection::IncompatibleState(s),
    }
}

/// What the bank account says about itself, as the component's `describe`
/// says it.
fn info() -> PluginInfo {
    let d = dispatch::describe::<BankAccount>().expect("the bank account is well declared");
    PluginInfo {
        aggregate_type: d.aggregate_type.to_string(),
        stream_prefix: d.stream_prefix.to_string(),
        state_schema: d.state_schema,
        commands: d
            .commands
            .iter()
            .map(|c| CommandSpec {
                name: c.name.to_string(),
                mode: match c.mode {
                    rehydra_guest::CommandMode::Create => CommandMode::Create,
                    rehydra_guest::CommandMode::Update => CommandMode::Update,
                    rehydra_guest::CommandMode::Upsert => CommandMode::Upsert,
                },
            })
            .collect(),
        event_types: d.event_types.iter().map(|t| t.to_string()).collect(),
        // The bank account is an aggregate, not a process manager.
        process: None,
    }
}

/// A registry serving the native bank account as `bank-account`, under the
/// same default limits as the component.
pub fn registry() -> Arc<PluginRegistry> {
    let limits = SandboxLimits::default();
    let registry =
        Arc::new(PluginRegistry::new(limits.clone(), None).expect("building the plugin engine"));
    registry.register(Plugin::native(
        "bank-account",
        info(),
        Arc::new(NativeBankAccount),
        &limits,
    ));
    registry
}

/// A timer change from the SDK's types to the host's, as the component's
/// export glue does it through WIT.
fn timer_change(change: rehydra_guest::TimerChange) -> TimerChange {
    match change {
        rehydra_guest::TimerChange::Schedule {
            key,
            target,
            command,
            data,
            due,
        } => TimerChange::Schedule(TimerRequest {
            key,
            target: target.map(|(aggregate_type, id)| AggregateRef { aggregate_type, id }),
            command,
            data,
            due: match due {
                rehydra_guest::Due::At(at) => Due::At(at),
                rehydra_guest::Due::AfterMs(ms) => Due::AfterMs(ms),
            },
        }),
        rehydra_guest::TimerChange::Cancel(key) => TimerChange::Cancel(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_native_twin_follows_the_rules() {
        let account = NativeBankAccount;
        let meta = vec![("now".to_string(), "2026-01-01T00:00:00Z".to_string())];
        let input = |command_type, data| CommandInput {
            command_type,
            aggregate_id: "a",
            data,
            metadata: &meta,
        };
        let opened = account
            .handle(
                &account.initial_state(),
                0,
                &input("open", br#"{"owner":"a"}"#),
            )
            .expect("no failure")
            .expect("opened");
        assert_eq!(opened.events[0].event_type, "Opened");
        let deposited = account
            .handle(&opened.state, 1, &input("deposit", br#"{"amount":5}"#))
            .expect("no failure")
            .expect("deposited");
        assert_eq!(
            deposited.state.bytes,
            br#"{"owner":"a","balance":5,"open":true}"#
        );
        let refused = account
            .handle(&deposited.state, 2, &input("withdraw", br#"{"amount":6}"#))
            .expect("no failure");
        assert!(matches!(refused, Err(Rejection::Rejected(_))));
    }
}
