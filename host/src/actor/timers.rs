//! What the actor does with a decision's timers: the `$timers` event that
//! carries them in the command's append, the cap of pending timers per
//! aggregate, and the wait until the timer index holds them.

use super::Inner;
use crate::command::{CommandIds, CommandRequest, event_id};
use crate::error::CommandError;
use crate::plugin::{Decision, NewEvent, TimerChange};

/// Why a decision's timers cannot be stored.
pub(super) enum TimersEventError {
    /// The plugin's output is wrong (a due time out of range): its
    /// `bad_output`.
    Plugin(String),
    /// The host failed.
    Host(CommandError),
}

impl Inner {
    /// Refuses a decision that would leave its aggregate with more pending
    /// timers than `max_timers_per_aggregate` (one that only cancels, or
    /// leaves no more than were pending, always passes). Pending timers are
    /// those in the timer index, which follows the log within moments of
    /// each commit.
    pub(super) fn check_timer_cap(
        &self,
        req: &CommandRequest,
        decision: &Decision,
    ) -> Result<(), CommandError> {
        if !decision
            .timers
            .iter()
            .any(|c| matches!(c, TimerChange::Schedule(_)))
        {
            return Ok(());
        }
        let source = req.aggregate();
        let mut keys: std::collections::HashSet<String> = match self.timers.get() {
            Some(index) => index
                .pending_keys(&source)
                .map_err(|e| CommandError::Internal(e.to_string()))?
                .into_iter()
                .collect(),
            None => Default::default(),
        };
        let before = keys.len();
        for change in &decision.timers {
            match change {
                TimerChange::Schedule(t) => keys.insert(t.key.clone()),
                TimerChange::Cancel(key) => keys.remove(key),
            };
        }
        let limit = self.config.max_timers_per_aggregate;
        if keys.len() > limit && keys.len() > before {
            return Err(CommandError::TooManyTimers {
                aggregate_type: req.aggregate_type.clone(),
                id: req.aggregate_id.clone(),
                pending: keys.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Waits (briefly) until the timer index holds the timer changes just
    /// stored at `position`, so that a list of timers or the cap checked
    /// right after this command sees them. The runner reads each commit
    /// within milliseconds; if it is stuck (its own error is logged), the
    /// command is answered anyway: its changes are stored, and the index
    /// will read them.
    pub(super) async fn await_timer_index(&self, position: u64) {
        let Some(index) = self.timers.get() else {
            return;
        };
        if !index
            .wait_until_read(position, std::time::Duration::from_secs(2))
            .await
        {
            tracing::warn!(
                position,
                "the timer index has not read this command's timer changes within 2 s; \
                 answering without waiting for it"
            );
        }
    }

    /// The `$timers` event of `decision`'s timer changes, to be appended
    /// after its events in `stream`; `None` when it changes no timer.
    pub(super) fn timers_event(
        &self,
        stream: &str,
        req: &CommandRequest,
        ids: &CommandIds,
        decision: &Decision,
    ) -> Result<Option<NewEvent>, TimersEventError> {
        if decision.timers.is_empty() {
            return Ok(None);
        }
        let source = req.aggregate();
        let now = humantime::parse_rfc3339(&ids.now).map_err(|err| {
            TimersEventError::Host(CommandError::Internal(format!(
                "the command's time {:?} does not parse: {err}",
                ids.now
            )))
        })?;
        let id = event_id(stream, &ids.message_id, decision.events.len());
        let resolved = crate::timer::event::resolve(&decision.timers, &source, now, id)
            .map_err(TimersEventError::Plugin)?;
        let data = serde_json::to_vec(&resolved).map_err(|err| {
            TimersEventError::Host(CommandError::Internal(format!(
                "cannot encode the timer changes: {err}"
            )))
        })?;
        Ok(Some(NewEvent {
            event_type: crate::timer::TIMERS_EVENT.to_string(),
            data,
        }))
    }
}
