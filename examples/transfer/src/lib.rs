//! A money transfer between two bank accounts: a process manager.
//!
//! A transfer is started with `start {"from", "to", "amount"}`. It sends
//! `withdraw` to the source account; once the account has stored
//! `Withdrawn`, it sends `deposit` to the target; once that is stored, the
//! transfer is complete. If the target refuses the deposit (a closed
//! account), the transfer sends the money back with a `deposit` to the
//! source: it is compensated. If the source refuses the withdrawal
//! (insufficient funds, closed), the transfer fails and nothing moved.
//!
//! | command     | receives                                    | events |
//! |-------------|---------------------------------------------|--------|
//! | `start`     | `{"from", "to", "amount"}` (a client)        | `Started`; sends `withdraw` |
//! | `debited`   | the source's `Withdrawn` (followed)         | `Debited`; sends `deposit` to the target |
//! | `deposited` | either account's `Deposited` (followed)     | `Completed` (the credit), or `Compensated` (the refund) |
//! | `refused`   | a refusal of a command it sent              | `Failed` (the debit), `CreditRefused` and sends the refund (the credit), `RefundFailed` (the refund) |
//!
//! Every command it sends is a timer due at once, stored with its events:
//! a crash between deciding and sending loses nothing, and the host sends
//! each once.

use rehydra_guest::{
    Aggregate, CommandSpec, Context, Decision, Follow, FollowedEvent, InstanceKey, ProcessManager,
    Refusal, Rejection, Timer,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The transfer process manager.
pub struct Transfer;

/// Where a transfer is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Not started.
    #[default]
    None,
    /// The withdrawal is sent.
    Started,
    /// The source is debited; the deposit is sent.
    Debited,
    /// The target refused the deposit; the refund is sent.
    Refunding,
    /// The money is in the target account.
    Completed,
    /// The money is back in the source account.
    Compensated,
    /// The source refused the withdrawal: nothing moved.
    Failed,
    /// The source refused the refund: the money is nowhere; a person must
    /// look.
    RefundFailed,
}

/// A transfer's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    status: Status,
    from: String,
    to: String,
    amount: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// What a client, a followed event or a refusal asks of a transfer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    Start {
        from: String,
        to: String,
        amount: u64,
    },
    Debited {
        event: FollowedEvent,
    },
    Deposited {
        event: FollowedEvent,
    },
    Refused {
        refusal: Refusal,
    },
}

/// What happened to a transfer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    Started {
        from: String,
        to: String,
        amount: u64,
    },
    Debited,
    Completed,
    CreditRefused {
        reason: String,
    },
    Compensated,
    Failed {
        reason: String,
    },
    RefundFailed {
        reason: String,
    },
}

/// The keys of the commands a transfer sends.
const DEBIT: &str = "debit";
const CREDIT: &str = "credit";
const REFUND: &str = "refund";

impl Aggregate for Transfer {
    const TYPE: &'static str = "transfer";
    const STREAM_PREFIX: &'static str = "transfer";
    const STATE_SCHEMA: u32 = 1;
    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec::create("start"),
        CommandSpec::update("debited"),
        CommandSpec::update("deposited"),
        CommandSpec::update("refused"),
    ];
    type State = State;
    type Command = Command;
    type Event = Event;

    fn handle(t: &State, command: Command, _ctx: &Context) -> Result<Decision<Event>, Rejection> {
        match command {
            Command::Start { from, to, amount } => {
                if amount == 0 {
                    return Err(Rejection::invalid("amount", "must be greater than 0"));
                }
                if from.trim().is_empty() {
                    return Err(Rejection::invalid("from", "must not be empty"));
                }
                if to.trim().is_empty() {
                    return Err(Rejection::invalid("to", "must not be empty"));
                }
                if from == to {
                    return Err(Rejection::invalid("to", "must differ from `from`"));
                }
                let withdraw = send(DEBIT, &from, "withdraw", amount);
                Ok(Decision::emit(Event::Started { from, to, amount }).schedule(withdraw))
            }
            Command::Debited { event } => {
                if t.status != Status::Started || event.timer_key() != Some(DEBIT) {
                    return Ok(Decision::none());
                }
                if cfg!(feature = "trap-on-13") && t.amount == 13 {
                    panic!("this test version traps on a debit of 13");
                }
                Ok(Decision::emit(Event::Debited)
                    .schedule(send(CREDIT, &t.to, "deposit", t.amount)))
            }
            Command::Deposited { event } => Ok(match (t.status, event.timer_key()) {
                (Status::Debited, Some(CREDIT)) => Event::Completed.into(),
                (Status::Refunding, Some(REFUND)) => Event::Compensated.into(),
                _ => Decision::none(),
            }),
            Command::Refused { refusal } => {
                let version = if cfg!(feature = "v2") { "v2: " } else { "" };
                let reason = format!(
                    "{version}{} refused {}: {}",
                    refusal.target.id, refusal.command, refusal.message
                );
                Ok(match (t.status, refusal.key.as_str()) {
                    (Status::Started, DEBIT) => Event::Failed { reason }.into(),
                    (Status::Debited, CREDIT) => Decision::emit(Event::CreditRefused { reason })
                        .schedule(send(REFUND, &t.from, "deposit", t.amount)),
                    (Status::Refunding, REFUND) => Event::RefundFailed { reason }.into(),
                    _ => Decision::none(),
                })
            }
        }
    }

    fn apply(t: &mut State, event: Event) {
        match event {
            Event::Started { from, to, amount } => {
                t.status = Status::Started;
                t.from = from;
                t.to = to;
                t.amount = amount;
            }
            Event::Debited => t.status = Status::Debited,
            Event::Completed => t.status = Status::Completed,
            Event::CreditRefused { reason } => {
                t.status = Status::Refunding;
                t.reason = Some(reason);
            }
            Event::Compensated => t.status = Status::Compensated,
            Event::Failed { reason } => {
                t.status = Status::Failed;
                t.reason = Some(reason);
            }
            Event::RefundFailed { reason } => {
                t.status = Status::RefundFailed;
                t.reason = Some(reason);
            }
        }
    }
}

impl ProcessManager for Transfer {
    const FOLLOWS: &'static [Follow] = &[
        Follow::new(
            "bank-account",
            "Withdrawn",
            InstanceKey::ScheduledBy,
            "debited",
        ),
        Follow::new(
            "bank-account",
            "Deposited",
            InstanceKey::ScheduledBy,
            "deposited",
        ),
    ];
    const ON_REFUSED: Option<&'static str> = Some("refused");
    const FINISHED_BY: &'static [&'static str] =
        &["Completed", "Compensated", "Failed", "RefundFailed"];
}

/// A command to a bank account, sent at once.
fn send(key: &str, account: &str, command: &str, amount: u64) -> Timer {
    Timer::send(
        key,
        "bank-account",
        account,
        command,
        json!({ "amount": amount }),
    )
}

rehydra_guest::export_process_manager!(Transfer);
