//! The PostgreSQL store's commit signal across hosts: `NOTIFY` after each
//! group this host commits, and a `LISTEN`ing connection that wakes this
//! host's subscriptions on every host's commits (see the parent module's
//! docs for the horizon follow-up and the polling fallback).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{OPERATION_TIMEOUT, POLL_WHILE_DEAF, Shared};

/// The first wait before the horizon is checked again after an announced
/// position was not yet visible; it doubles up to [`HORIZON_MAX_WAIT`].
const HORIZON_FIRST_WAIT: Duration = Duration::from_millis(10);
const HORIZON_MAX_WAIT: Duration = Duration::from_secs(1);
/// The shortest time between two notifications from this host.
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(5);
/// Back-off between attempts to re-establish the listening connection.
const RECONNECT_FIRST_WAIT: Duration = Duration::from_millis(200);
const RECONNECT_MAX_WAIT: Duration = Duration::from_secs(5);

/// Announces this host's commits: one `NOTIFY` per wake, carrying the
/// highest position committed since the last one, and at most one per
/// [`ANNOUNCE_EVERY`], so a stream of small groups costs a few
/// notifications a second rather than one each. (A notification is a
/// transaction of its own, with a transaction id: with one client the
/// bench measured two ids per append.) Subscribers on this host are woken
/// at once by the local signal; only other hosts' wait up to that long.
/// Runs until the store is dropped.
pub(crate) async fn announce(shared: Arc<Shared>, mut committed: watch::Receiver<u64>) {
    while committed.changed().await.is_ok() {
        let position = *committed.borrow_and_update();
        let sent = async {
            let client = shared.client().await.map_err(|e| e.to_string())?;
            client
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&shared.channel, &position.to_string()],
                )
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(OPERATION_TIMEOUT, sent).await {
            Ok(Ok(_)) => {}
            // Other hosts' subscribers then wake on the next notification,
            // or poll if their listener is down too; nothing is lost.
            Ok(Err(e)) => tracing::debug!(error = %e, "could not announce a commit"),
            Err(_) => tracing::debug!("announcing a commit timed out"),
        }
        // Commits meanwhile are announced together, by the next wake.
        tokio::time::sleep(ANNOUNCE_EVERY).await;
    }
}

/// Listens for every host's commits and bumps the commit signal; polls while
/// the listening connection is down. Runs until the store is dropped.
pub(crate) async fn listen(
    shared: Arc<Shared>,
    config: tokio_postgres::Config,
    connector: MakeRustlsConnect,
) {
    let mut wait = RECONNECT_FIRST_WAIT;
    let mut was_connected = true;
    loop {
        match connect(&shared, &config, connector.clone()).await {
            Ok((client, notifications)) => {
                if !was_connected {
                    tracing::info!(store = %shared.described, "notifications from PostgreSQL are back");
                }
                wait = RECONNECT_FIRST_WAIT;
                // Commits made while nobody listened were not announced here.
                bump(&shared);
                follow(&shared, notifications).await;
                drop(client);
                tracing::warn!(
                    store = %shared.described,
                    "lost the PostgreSQL notification connection; subscriptions poll every {} ms until it is back",
                    POLL_WHILE_DEAF.as_millis()
                );
                was_connected = false;
            }
            Err(e) => {
                if was_connected {
                    tracing::warn!(store = %shared.described, error = %e, "cannot listen for PostgreSQL notifications; subscriptions poll meanwhile");
                }
                was_connected = false;
            }
        }
        // Deaf: wake subscriptions at a polling pace until the next attempt.
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until {
            bump(&shared);
            tokio::time::sleep(POLL_WHILE_DEAF).await;
        }
        wait = (wait * 2).min(RECONNECT_MAX_WAIT);
    }
}

fn bump(shared: &Shared) {
    shared.commits.send_modify(|n| *n = n.wrapping_add(1));
}

/// Opens the listening connection: its notifications arrive on the receiver,
/// which closes when the connection does.
async fn connect(
    shared: &Shared,
    config: &tokio_postgres::Config,
    connector: MakeRustlsConnect,
) -> Result<(tokio_postgres::Client, mpsc::Receiver<u64>), String> {
    let (client, mut connection) =
        tokio::time::timeout(OPERATION_TIMEOUT * 2, config.connect(connector))
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|e| super::error_chain(&e))?;
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let position = n.payload().parse().unwrap_or(0);
                    // A full channel only means the follower is behind;
                    // the bump it will do covers this commit too.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(position) {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    tokio::time::timeout(
        OPERATION_TIMEOUT,
        client.batch_execute(&format!("LISTEN {}", shared.channel)),
    )
    .await
    .map_err(|_| "LISTEN timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok((client, rx))
}

/// Bumps the signal for each notification, and again once an announced
/// position has come below the horizon. Returns when the connection ends.
async fn follow(shared: &Shared, mut notifications: mpsc::Receiver<u64>) {
    // The highest announced position not yet seen below the horizon.
    let mut pending: Option<u64> = None;
    let mut wait = HORIZON_FIRST_WAIT;
    loop {
        tokio::select! {
            notified = notifications.recv() => {
                let Some(position) = notified else { return };
                bump(shared);
                pending = Some(pending.map_or(position, |p| p.max(position)));
                wait = HORIZON_FIRST_WAIT;
            }
            () = tokio::time::sleep(wait), if pending.is_some() => {
                match shared.horizon().await {
                    Ok(horizon) if pending.is_some_and(|p| p < horizon) => {
                        bump(shared);
                        pending = None;
                    }
                    _ => wait = (wait * 2).min(HORIZON_MAX_WAIT),
                }
            }
        }
    }
}
