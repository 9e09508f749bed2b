//! The stock of one item (one aggregate per SKU), reserved by orders: the
//! other half of the `order` example, which sends it commands by timer.
//!
//! | command   | mode   | data                    | events       |
//! |-----------|--------|-------------------------|--------------|
//! | `restock` | upsert | `{"quantity"}`          | `Restocked`  |
//! | `reserve` | update | `{"order", "quantity"}` | `Reserved`, or none if the order holds a reservation already |
//! | `release` | update | `{"order"}`             | `Released`, or none if the order holds none |
//! | `commit`  | update | `{"order"}`             | `Sold`, or none if the order holds none |
//!
//! `reserve` is refused when fewer than `quantity` are available (on hand
//! and not reserved).

use std::collections::BTreeMap;

use rehydra_guest::{Aggregate, CommandSpec, Context, Decision, Rejection};
use serde::{Deserialize, Serialize};

/// The inventory aggregate.
pub struct Inventory;

/// An item's stock.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Stock {
    /// Units in the warehouse, reserved or not.
    on_hand: u64,
    /// Units held for each order.
    reserved: BTreeMap<String, u64>,
}

impl Stock {
    /// Units no order holds.
    fn available(&self) -> u64 {
        let held = self
            .reserved
            .values()
            .fold(0u64, |sum, q| sum.saturating_add(*q));
        self.on_hand.saturating_sub(held)
    }
}

/// What can be asked of an item's stock.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    Restock { quantity: u64 },
    Reserve { order: String, quantity: u64 },
    Release { order: String },
    Commit { order: String },
}

/// What happened to an item's stock.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    Restocked { quantity: u64 },
    Reserved { order: String, quantity: u64 },
    Released { order: String, quantity: u64 },
    Sold { order: String, quantity: u64 },
}

impl Aggregate for Inventory {
    const TYPE: &'static str = "inventory";
    const STREAM_PREFIX: &'static str = "inventory";
    const STATE_SCHEMA: u32 = 1;
    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec::upsert("restock"),
        CommandSpec::update("reserve"),
        CommandSpec::update("release"),
        CommandSpec::update("commit"),
    ];
    type State = Stock;
    type Command = Command;
    type Event = Event;

    fn handle(
        stock: &Stock,
        command: Command,
        _ctx: &Context,
    ) -> Result<Decision<Event>, Rejection> {
        match command {
            Command::Restock { quantity } => {
                if quantity == 0 {
                    return Err(Rejection::invalid("quantity", "must be greater than 0"));
                }
                if stock.on_hand.checked_add(quantity).is_none() {
                    return Err(Rejection::rejected("the stock would be too large"));
                }
                Ok(Event::Restocked { quantity }.into())
            }
            Command::Reserve { order, quantity } => {
                if quantity == 0 {
                    return Err(Rejection::invalid("quantity", "must be greater than 0"));
                }
                if stock.reserved.contains_key(&order) {
                    return Ok(Decision::none());
                }
                if quantity > stock.available() {
                    return Err(Rejection::rejected(format!(
                        "out of stock: {quantity} asked, {} available",
                        stock.available()
                    )));
                }
                Ok(Event::Reserved { order, quantity }.into())
            }
            Command::Release { order } => Ok(match stock.reserved.get(&order) {
                Some(&quantity) => Event::Released { order, quantity }.into(),
                None => Decision::none(),
            }),
            Command::Commit { order } => Ok(match stock.reserved.get(&order) {
                Some(&quantity) => Event::Sold { order, quantity }.into(),
                None => Decision::none(),
            }),
        }
    }

    fn apply(stock: &mut Stock, event: Event) {
        match event {
            Event::Restocked { quantity } => stock.on_hand = stock.on_hand.saturating_add(quantity),
            Event::Reserved { order, quantity } => {
                stock.reserved.insert(order, quantity);
            }
            Event::Released { order, .. } => {
                stock.reserved.remove(&order);
            }
            Event::Sold { order, quantity } => {
                stock.reserved.remove(&order);
                stock.on_hand = stock.on_hand.saturating_sub(quantity);
            }
        }
    }
}

rehydra_guest::export_aggregate!(Inventory);
