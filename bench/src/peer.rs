//! The peer scenario: the bank account written for the `cqrs-es` crate
//! (0.4) on its in-memory store (`MemStore`), driven exactly like Rehydra's
//! `Aggregates::execute` on `memory://`, alternating run by run in the same
//! invocation so that the ratio is taken under the same machine load.
//!
//! `MemStore` keeps no state between commands: every command loads the
//! aggregate's whole event list and applies it again, so its cost grows
//! with the aggregate's history. Rehydra keeps the state resident.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs_es::mem_store::MemStore;
use cqrs_es::{Aggregate, CqrsFramework, DomainEvent};
use rehydra::plugin::PluginRegistry;
use serde::{Deserialize, Serialize};

use crate::inproc::{StoreKind, agg_id, client_accounts};
use crate::stats::RunResult;

/// The bank account, with the same rules as the Rust plugin.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BankAccount {
    owner: String,
    balance: u64,
    open: bool,
}

/// What a client can ask of an account.
#[derive(Debug, Deserialize)]
pub enum BankCommand {
    /// Opens the account for an owner.
    Open {
        /// The owner's name.
        owner: String,
    },
    /// Puts money in.
    Deposit {
        /// In cents; positive.
        amount: u64,
    },
    /// Takes money out.
    Withdraw {
        /// In cents; positive.
        amount: u64,
    },
}

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BankEvent {
    /// The account was opened.
    Opened {
        /// The owner's name.
        owner: String,
    },
    /// Money was put in.
    Deposited {
        /// In cents.
        amount: u64,
    },
    /// Money was taken out.
    Withdrawn {
        /// In cents.
        amount: u64,
    },
}

impl DomainEvent for BankEvent {
    fn event_type(&self) -> String {
        match self {
            BankEvent::Opened { .. } => "Opened",
            BankEvent::Deposited { .. } => "Deposited",
            BankEvent::Withdrawn { .. } => "Withdrawn",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

/// Why a command was refused.
#[derive(Debug)]
pub struct BankError(String);

impl std::fmt::Display for BankError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BankError {}

fn refuse(message: &str) -> BankError {
    BankError(message.to_string())
}

#[async_trait]
impl Aggregate for BankAccount {
    type Command = BankCommand;
    type Event = BankEvent;
    type Error = BankError;
    type Services = ();

    fn aggregate_type() -> String {
        "bank-account".to_string()
    }

    async fn handle(
        &self,
        command: BankCommand,
        _services: &(),
    ) -> Result<Vec<BankEvent>, BankError> {
        match command {
            BankCommand::Open { owner } => {
                let owner = owner.trim();
                if owner.is_empty() {
                    return Err(refuse("owner must not be empty"));
                }
                Ok(vec![BankEvent::Opened {
                    owner: owner.to_string(),
                }])
            }
            BankCommand::Deposit { amount } => {
                if amount == 0 {
                    return Err(refuse("amount must be positive"));
                }
                if !self.open {
                    return Err(refuse("the account is not open"));
                }
                if self.balance.checked_add(amount).is_none() {
                    return Err(refuse("the balance would be too large"));
                }
                Ok(vec![BankEvent::Deposited { amount }])
            }
            BankCommand::Withdraw { amount } => {
                if amount == 0 {
                    return Err(refuse("amount must be positive"));
                }
                if !self.open {
                    return Err(refuse("the account is not open"));
                }
                if amount > self.balance {
                    return Err(refuse("insufficient funds"));
                }
                Ok(vec![BankEvent::Withdrawn { amount }])
            }
        }
    }

    fn apply(&mut self, event: BankEvent) {
        match event {
            BankEvent::Opened { owner } => {
                self.owner = owner;
                self.open = true;
            }
            BankEvent::Deposited { amount } => self.balance += amount,
            BankEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

type Framework = CqrsFramework<BankAccount, MemStore<BankAccount>>;

/// One run of `clients` tasks depositing into `n` fresh `cqrs-es`
/// accounts for `secs`.
async fn cqrs_run(n: usize, clients: usize, secs: f64) -> RunResult {
    let cqrs: Arc<Framework> = Arc::new(CqrsFramework::new(MemStore::default(), vec![], ()));
    for i in 0..n {
        cqrs.execute(
            &agg_id(i),
            BankCommand::Open {
                owner: "bench".into(),
            },
        )
        .await
        .expect("opening a cqrs-es account");
    }
    let start = Instant::now();
    let cpu_start = crate::stats::process_cpu();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for t in 0..clients {
        let cqrs = cqrs.clone();
        tasks.push(tokio::spawn(async move {
            let mine = client_accounts(t, clients, n);
            let (mut lat, mut errors, mut k) = (Vec::with_capacity(4096), 0usize, 0usize);
            while Instant::now() < deadline {
                let id = agg_id(mine[k % mine.len()]);
                k += 1;
                let t0 = Instant::now();
                match cqrs.execute(&id, BankCommand::Deposit { amount: 1 }).await {
                    Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (all, errors) = crate::stats::join_clients(tasks).await;
    let elapsed = start.elapsed();
    RunResult::from_latencies(all, elapsed, errors)
        .with_cpu(crate::stats::process_cpu().saturating_sub(cpu_start))
}

/// Scenario: `cqrs-es` vs Rehydra on in-memory stores, `runs` alternating
/// pairs of runs per client count; median results `(clients, cqrs-es, rehydra)`.
pub async fn compare(
    registry: &Arc<PluginRegistry>,
    n: usize,
    clients: &[usize],
    runs: usize,
    secs: f64,
) -> Vec<(usize, RunResult, RunResult)> {
    let mut out = Vec::new();
    for &c in clients {
        let (mut peer, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let p = cqrs_run(n, c, secs).await;
            let r = crate::inproc::fresh_run(registry, StoreKind::Memory, n, c, secs).await;
            eprintln!(
                "  n={n} c={c}: cqrs-es {:.0}/s, rehydra {:.0}/s",
                p.per_sec, r.per_sec
            );
            peer.push(p);
            ours.push(r);
        }
        out.push((c, RunResult::median_of(&peer), RunResult::median_of(&ours)));
    }
    out
}
