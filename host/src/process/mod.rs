//! Process managers: plugins of the `process-manager` world, which follow
//! other aggregates' events and send commands.
//!
//! A process manager is an aggregate (its instances have streams, state,
//! snapshots, a sandbox, deadlines, hot reload and quarantine like any
//! other) that also declares the events it follows and where each goes
//! ([`route`]). For each process manager the host runs a [`runner`]: a
//! subscriber of the log with a durable checkpoint (in the timer index
//! file) that delivers each followed event to its instance as a command,
//! with the message id `event-<event id>`, so that delivering it again
//! after a crash replays the stored outcome. An instance sends commands as
//! timers due at once; a command it sent that is refused comes back to it
//! as a command too (see [`crate::timer::runner`]). An event whose command
//! keeps failing in the plugin is parked, visible in `GET /v1/processes`,
//! and the process manager goes on with the next.

pub mod route;
pub mod runner;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::actor::Aggregates;
use crate::timer::TimerIndex;

/// How often the supervisor looks for process managers that were loaded
/// or removed.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Starts a runner for every process manager the registry serves, now and
/// as plugins are loaded; each ends when its plugin is removed, and all end
/// once `stop` turns true (after their command in flight is answered).
pub fn start(
    index: Arc<TimerIndex>,
    aggregates: Aggregates,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        loop {
            running.retain(|_, task| !task.is_finished());
            for plugin in aggregates.plugins().list() {
                if plugin.info.process.is_none() {
                    continue;
                }
                let name = plugin.info.aggregate_type.clone();
                if running.contains_key(&name) {
                    continue;
                }
                tracing::info!(process = %name, "process manager: following the log");
                let task = tokio::spawn(runner::run(
                    name.clone(),
                    index.clone(),
                    aggregates.clone(),
                    stop.clone(),
                ));
                running.insert(name, task);
            }
            tokio::select! {
                _ = tokio::time::sleep(LOOK_EVERY) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        for (name, task) in running {
            if let Err(e) = task.await {
                tracing::error!(process = %name, "the process manager's runner failed: {e}");
            }
        }
    })
}
