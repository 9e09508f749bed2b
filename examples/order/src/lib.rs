//! An order with a payment deadline: durable timers in an example.
//!
//! An order reserves stock of one item (an `inventory` aggregate per SKU)
//! and must be paid within a deadline. Placing it schedules two commands:
//! the reservation, sent to the item at once, and `expire`, sent to the
//! order itself at the deadline. Paying cancels the deadline's timer; an
//! order still unpaid when `expire` arrives is cancelled, and its
//! cancellation schedules the release of the stock.
//!
//! | command  | mode   | data                                  | events      | timers |
//! |----------|--------|---------------------------------------|-------------|--------|
//! | `place`  | create | `{"sku", "quantity", "pay_within_ms"}` | `Placed`    | `reserve` → inventory now; `expire` → itself at the deadline |
//! | `pay`    | update | none                                  | `Paid`      | cancels `expire`; `commit` → inventory now |
//! | `expire` | update | none (sent by the timer)              | `Cancelled` if unpaid, else none | `release` → inventory now |
//! | `cancel` | update | none                                  | `Cancelled` | cancels `expire`; `release` → inventory now |
//!
//! `pay_within_ms` defaults to 30 minutes. Every timer's command reaches
//! its aggregate once, whatever crashes and restarts happen between; one
//! that came due while no host ran arrives at the next start, marked late
//! (`Context::timer`), and the order records that in its `Cancelled` event.

use std::time::Duration;

use rehydra_guest::{Aggregate, CommandSpec, Context, Decision, Rejection, Timer};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The order aggregate.
pub struct Order;

/// Where an order is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not placed yet.
    #[default]
    None,
    /// Placed, waiting for payment.
    Placed,
    /// Paid.
    Paid,
    /// Cancelled: unpaid at its deadline, or by the customer.
    Cancelled,
}

/// An order's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    status: Status,
    sku: String,
    quantity: u64,
}

/// The payment deadline when `place` does not give one.
const DEFAULT_PAY_WITHIN_MS: u64 = 30 * 60 * 1000;
/// The key of the deadline's timer.
const DEADLINE: &str = "payment-deadline";

/// What a client (or a timer) can ask of an order.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    Place {
        sku: String,
        quantity: u64,
        pay_within_ms: Option<u64>,
    },
    Pay,
    Expire,
    Cancel,
}

/// What happened to an order.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    Placed {
        sku: String,
        quantity: u64,
        pay_within_ms: u64,
    },
    Paid,
    Cancelled {
        reason: String,
        /// True when the deadline's timer arrived late (no host ran when
        /// it came due).
        #[serde(default)]
        late: bool,
    },
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    const STREAM_PREFIX: &'static str = "order";
    const STATE_SCHEMA: u32 = 1;
    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec::create("place"),
        CommandSpec::update("pay"),
        CommandSpec::update("expire"),
        CommandSpec::update("cancel"),
    ];
    type State = State;
    type Command = Command;
    type Event = Event;

    fn handle(
        order: &State,
        command: Command,
        ctx: &Context,
    ) -> Result<Decision<Event>, Rejection> {
        match command {
            Command::Place {
                sku,
                quantity,
                pay_within_ms,
            } => {
                let sku = sku.trim().to_owned();
                if sku.is_empty() {
                    return Err(Rejection::invalid("sku", "must not be empty"));
                }
                if quantity == 0 {
                    return Err(Rejection::invalid("quantity", "must be greater than 0"));
                }
                let pay_within_ms = pay_within_ms.unwrap_or(DEFAULT_PAY_WITHIN_MS);
                let reserve = json!({ "order": ctx.aggregate_id(), "quantity": quantity });
                Ok(Decision::emit(Event::Placed {
                    sku: sku.clone(),
                    quantity,
                    pay_within_ms,
                })
                .schedule(
                    Timer::after("reserve", "reserve", reserve, Duration::ZERO)
                        .for_aggregate("inventory", sku),
                )
                .schedule(Timer::after(
                    DEADLINE,
                    "expire",
                    json!({}),
                    Duration::from_millis(pay_within_ms),
                )))
            }
            Command::Pay => match order.status {
                Status::Placed => Ok(Decision::emit(Event::Paid)
                    .cancel_timer(DEADLINE)
                    .schedule(inventory(order, ctx, "commit"))),
                Status::Paid => Err(Rejection::rejected("the order is already paid")),
                Status::Cancelled => Err(Rejection::rejected("the order is cancelled")),
                Status::None => Err(Rejection::rejected("the order is not placed")),
            },
            // Sent by the deadline's timer. Paid (or cancelled) orders
            // ignore it: a timer cancelled in the same moment as it came due
            // may still arrive.
            Command::Expire => {
                if order.status != Status::Placed {
                    return Ok(Decision::none());
                }
                let late = ctx.timer().is_some_and(|t| t.late);
                Ok(Decision::emit(Event::Cancelled {
                    reason: "not paid within its deadline".into(),
                    late,
                })
                .schedule(inventory(order, ctx, "release")))
            }
            Command::Cancel => match order.status {
                Status::Placed => Ok(Decision::emit(Event::Cancelled {
                    reason: "cancelled by the customer".into(),
                    late: false,
                })
                .cancel_timer(DEADLINE)
                .schedule(inventory(order, ctx, "release"))),
                Status::Paid => Err(Rejection::rejected("a paid order cannot be cancelled")),
                Status::Cancelled => Err(Rejection::rejected("the order is already cancelled")),
                Status::None => Err(Rejection::rejected("the order is not placed")),
            },
        }
    }

    fn apply(order: &mut State, event: Event) {
        match event {
            Event::Placed { sku, quantity, .. } => {
                order.status = Status::Placed;
                order.sku = sku;
                order.quantity = quantity;
            }
            Event::Paid => order.status = Status::Paid,
            Event::Cancelled { .. } => order.status = Status::Cancelled,
        }
    }
}

/// A command about this order's reservation, sent to its item at once.
fn inventory(order: &State, ctx: &Context, command: &str) -> Timer {
    Timer::after(
        command,
        command,
        json!({ "order": ctx.aggregate_id() }),
        Duration::ZERO,
    )
    .for_aggregate("inventory", order.sku.clone())
}

rehydra_guest::export_aggregate!(Order);
