//! A bank account, the "hello world" of event sourcing.
//!
//! An account is opened for an owner, takes deposits and withdrawals, and is
//! eventually closed. Its balance never goes below zero, and a closed
//! account takes no more money in or out.
//!
//! | command    | mode   | data          | events      |
//! |------------|--------|---------------|-------------|
//! | `open`     | create | `{"owner"}`   | `Opened`    |
//! | `deposit`  | update | `{"amount"}`  | `Deposited` |
//! | `withdraw` | update | `{"amount"}`  | `Withdrawn` |
//! | `close`    | update | none          | `Closed`    |
//!
//! Amounts are whole numbers of the smallest currency unit (cents).

use rehydra_guest::{Aggregate, CommandSpec, Context, Decision, Rejection};
use serde::{Deserialize, Serialize};

/// The bank-account aggregate.
pub struct BankAccount;

/// An account's state, stored as `{"owner": "...", "balance": 0, "open": false}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Account {
    owner: String,
    balance: u64,
    open: bool,
    /// Deposits and withdrawals so far (the `schema-2` test version only).
    #[cfg(feature = "schema-2")]
    transactions: u64,
}

/// The fee on a withdrawal (the `withdrawal-fee` test version only).
const FEE: u64 = if cfg!(feature = "withdrawal-fee") {
    1
} else {
    0
};

/// What a client can ask of an account.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    Open { owner: String },
    Deposit { amount: u64 },
    Withdraw { amount: u64 },
    Close,
}

/// What happened to an account.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    Opened {
        owner: String,
    },
    Deposited {
        amount: u64,
    },
    Withdrawn {
        amount: u64,
    },
    Closed,
    /// A fee taken from the balance (the `withdrawal-fee` test version only).
    #[cfg(feature = "withdrawal-fee")]
    FeeCharged {
        amount: u64,
    },
}

impl Aggregate for BankAccount {
    const TYPE: &'static str = "bank-account";
    const STREAM_PREFIX: &'static str = "bank_account";
    const STATE_SCHEMA: u32 = if cfg!(feature = "schema-2") { 2 } else { 1 };
    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec::create("open"),
        CommandSpec::update("deposit"),
        CommandSpec::update("withdraw"),
        CommandSpec::update("close"),
    ];
    type State = Account;
    type Command = Command;
    type Event = Event;

    fn handle(
        account: &Account,
        command: Command,
        _ctx: &Context,
    ) -> Result<Decision<Event>, Rejection> {
        match command {
            Command::Open { owner } => {
                let owner = owner.trim();
                if owner.is_empty() {
                    return Err(Rejection::invalid("owner", "must not be empty"));
                }
                Ok(Event::Opened {
                    owner: owner.to_owned(),
                }
                .into())
            }
            Command::Deposit { amount } => {
                positive(amount)?;
                ensure_open(account)?;
                if account.balance.checked_add(amount).is_none() {
                    return Err(Rejection::rejected("the balance would be too large"));
                }
                Ok(Event::Deposited { amount }.into())
            }
            Command::Withdraw { amount } => {
                positive(amount)?;
                ensure_open(account)?;
                if amount.saturating_add(FEE) > account.balance {
                    return Err(Rejection::rejected("insufficient funds"));
                }
                #[cfg(feature = "withdrawal-fee")]
                return Ok(vec![
                    Event::Withdrawn { amount },
                    Event::FeeCharged { amount: FEE },
                ]
                .into());
                #[cfg(not(feature = "withdrawal-fee"))]
                Ok(Event::Withdrawn { amount }.into())
            }
            Command::Close => {
                if !account.open {
                    return Err(Rejection::rejected("account is already closed"));
                }
                Ok(Event::Closed.into())
            }
        }
    }

    fn apply(account: &mut Account, event: Event) {
        #[cfg(feature = "schema-2")]
        if matches!(event, Event::Deposited { .. } | Event::Withdrawn { .. }) {
            account.transactions += 1;
        }
        match event {
            Event::Opened { owner } => {
                account.owner = owner;
                account.open = true;
            }
            #[cfg(not(feature = "fold-bug"))]
            Event::Deposited { amount } => account.balance += amount,
            #[cfg(feature = "fold-bug")]
            Event::Deposited { amount } => account.balance += 2 * amount,
            #[cfg(feature = "apply-traps")]
            Event::Withdrawn { .. } => panic!("this version cannot fold a withdrawal"),
            #[cfg(not(feature = "apply-traps"))]
            Event::Withdrawn { amount } => account.balance -= amount,
            Event::Closed => account.open = false,
            #[cfg(feature = "withdrawal-fee")]
            Event::FeeCharged { amount } => account.balance -= amount,
        }
    }
}

/// Amounts must be at least one cent.
fn positive(amount: u64) -> Result<(), Rejection> {
    if amount == 0 {
        return Err(Rejection::invalid("amount", "must be greater than 0"));
    }
    Ok(())
}

fn ensure_open(account: &Account) -> Result<(), Rejection> {
    if !account.open {
        return Err(Rejection::rejected("account is closed"));
    }
    Ok(())
}

rehydra_guest::export_aggregate!(BankAccount);
