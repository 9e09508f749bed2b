//! What happens to one command inside an aggregate's actor: rehydrate if
//! needed, answer a repeated idempotency key from the store, check the
//! command's mode and expected version, call the plugin, append with
//! optimistic concurrency, and on a conflict with another writer catch up
//! and try again.

use std::time::Instant;

use serde::Serialize;
use tracing::Instrument as _;

use super::timers::TimersEventError;
use super::{Inner, Live, unknown_command};
use crate::command::{
    AggregateState, CommandIds, CommandOutcome, CommandRequest, OutcomeEvent, event_id,
};
use crate::error::{CommandError, FailureKind};
use crate::metrics::{self, Metrics};
use crate::plugin::{CommandInput, CommandMode, Decision, NewEvent, PluginRef, Rejection};
use crate::store::{EventData, ExpectedVersion, RecordedEvent, StoreError};

impl Inner {
    /// Runs one command. Returns the outcome and the state to keep cached
    /// (`None` when it is unknown, e.g. after a store failure).
    pub(super) async fn run_command(
        &self,
        req: &CommandRequest,
        live: Option<Live>,
    ) -> (Result<CommandOutcome, CommandError>, Option<Live>) {
        let Some(plugin) = self.plugins.get(&req.aggregate_type) else {
            // The plugin was removed while the command waited.
            return (
                Err(CommandError::UnknownAggregateType(
                    req.aggregate_type.clone(),
                )),
                live,
            );
        };
        let stream = plugin.info.stream_name(&req.aggregate_id);
        let span = tracing::info_span!(
            "command",
            plugin = %plugin.name,
            hash = %plugin.short_hash(),
            aggregate = %stream,
            command = %req.command,
            version = tracing::field::Empty,
            duration_us = tracing::field::Empty,
        );
        let started = Instant::now();
        let (result, live) = self
            .run_on(&plugin, &stream, req, live)
            .instrument(span.clone())
            .await;
        plugin.record_outcome(&stream, &result);
        span.record("duration_us", started.elapsed().as_micros() as u64);
        match &result {
            Ok(outcome) => {
                span.record("version", outcome.version);
                span.in_scope(|| tracing::debug!(events = outcome.events.len(), "command handled"));
            }
            Err(e) => {
                span.in_scope(|| tracing::debug!(code = e.code(), error = %e, "command refused"))
            }
        }
        (result, live)
    }

    async fn run_on(
        &self,
        plugin: &PluginRef,
        stream: &str,
        req: &CommandRequest,
        live: Option<Live>,
    ) -> (Result<CommandOutcome, CommandError>, Option<Live>) {
        // Cached state from a plugin with another state schema is rebuilt
        // from the events with the current code.
        let live = live.filter(|l| l.state.schema == plugin.info.state_schema);
        let mut live = match live {
            Some(l) => l,
            None => match self.rehydrate(plugin, stream).await {
                Ok(l) => l,
                Err(e) => return (Err(e), None),
            },
        };
        match self.decide_and_append(plugin, stream, req, &mut live).await {
            Ok(outcome) => (Ok(outcome), Some(live)),
            // After a store failure we no longer know what is stored.
            Err(e @ CommandError::StoreUnavailable(_)) => (Err(e), None),
            Err(e) => (Err(e), Some(live)),
        }
    }

    async fn decide_and_append(
        &self,
        plugin: &PluginRef,
        stream: &str,
        req: &CommandRequest,
        live: &mut Live,
    ) -> Result<CommandOutcome, CommandError> {
        let spec = plugin
            .info
            .command(&req.command)
            .ok_or_else(|| unknown_command(&plugin.info, &req.aggregate_type, &req.command))?;
        let ids = CommandIds::assign(req);

        if req.dry_run && self.store.shared_by_hosts() {
            // A dry run stores nothing, so no conflict would tell it that
            // another host moved the aggregate on: look first.
            self.catch_up(plugin, stream, live).await?;
        }
        let metadata = ids.guest_metadata(req.principal.as_deref(), req.timer.as_ref());
        let input = CommandInput {
            command_type: &req.command,
            aggregate_id: &req.aggregate_id,
            data: &req.data,
            metadata: &metadata,
        };
        let mut rebuilt_for_schema = false;
        let mut attempt = 0;
        loop {
            // A dry run neither replays nor records an idempotency key.
            // Looked up again after every catch-up: the events caught up
            // with may be this very command, stored by another host (both
            // send a timer's command); deciding it again would append it
            // again where the store does not recognise a retry by its ids
            // at another expected version (KurrentDB).
            if req.idempotency_key.is_some() && !req.dry_run {
                // The command's first event would have this id (the ids
                // are derived from the message id), whichever attempt
                // stored it.
                let earlier = self
                    .store
                    .find_command_events(stream, event_id(stream, &ids.message_id, 0))
                    .await?;
                if !earlier.is_empty() {
                    same_request(req, &ids, &earlier[0])?;
                    return replayed_outcome(req, &earlier);
                }
            }
            if let Some(expected) = req.expected_version
                && expected != live.version
            {
                // Our cache may be behind another writer: look first.
                self.catch_up(plugin, stream, live).await?;
                if expected != live.version {
                    return Err(CommandError::WrongExpectedVersion {
                        expected,
                        actual: live.version,
                    });
                }
            }
            let refusal = match spec.mode {
                CommandMode::Create if live.version > 0 => Some(CommandError::AlreadyExists {
                    aggregate_type: req.aggregate_type.clone(),
                    id: req.aggregate_id.clone(),
                    version: live.version,
                }),
                CommandMode::Update if live.version == 0 => Some(CommandError::AggregateNotFound {
                    aggregate_type: req.aggregate_type.clone(),
                    id: req.aggregate_id.clone(),
                }),
                _ => None,
            };
            let decision = match refusal {
                Some(e) => Err(e),
                None => match handle_timed(plugin, live, &input, req).await? {
                    Ok(d) => Ok(d),
                    Err(Rejection::Invalid(fields)) => Err(CommandError::InvalidCommand(fields)),
                    Err(Rejection::Rejected(m)) => Err(CommandError::Rejected(m)),
                    Err(Rejection::Forbidden(m)) => Err(CommandError::Forbidden(m)),
                    Err(Rejection::IncompatibleState(schema)) if !rebuilt_for_schema => {
                        tracing::info!(
                            schema,
                            "plugin cannot read the cached state; rebuilding from events"
                        );
                        rebuilt_for_schema = true;
                        // Not from a snapshot: its state may be what the
                        // plugin cannot read.
                        *live = self.rehydrate_from(plugin, stream, false).await?;
                        continue;
                    }
                    Err(Rejection::IncompatibleState(schema)) => {
                        return Err(CommandError::PluginFailed {
                            plugin: plugin.name.clone(),
                            kind: FailureKind::BadOutput,
                            message: format!(
                                "handle() reports state schema {schema} as incompatible even after a rebuild with its own apply()"
                            ),
                        });
                    }
                },
            };
            let decision = match decision {
                Ok(d) => d,
                Err(refused) => {
                    // A refusal may rest on a cache that another writer has
                    // overtaken; confirm it against the store before
                    // reporting it. This costs a read only on this path.
                    if attempt < self.config.conflict_retries
                        && self.store.stream_version(stream).await? > live.version
                    {
                        attempt += 1;
                        self.catch_up(plugin, stream, live).await?;
                        continue;
                    }
                    return Err(refused);
                }
            };
            let reply = parse_reply(plugin, decision.reply.as_deref())?;
            // Before a dry run's answer too: it answers as the command would.
            self.check_timer_cap(req, &decision)?;
            if req.dry_run {
                return self.dry_run_outcome(plugin, stream, req, &ids, decision, reply, live);
            }
            if decision.events.is_empty() && decision.timers.is_empty() {
                // Nothing to store, so no expected version will tell that
                // another host moved the aggregate on: on a shared store
                // the decision may rest on a stale cache (a timer's command
                // finding no reservation that another host just stored),
                // so it is confirmed like a refusal.
                if self.store.shared_by_hosts()
                    && attempt < self.config.conflict_retries
                    && self.store.stream_version(stream).await? > live.version
                {
                    attempt += 1;
                    self.catch_up(plugin, stream, live).await?;
                    continue;
                }
                live.state = decision.state;
                return Ok(CommandOutcome {
                    aggregate_type: req.aggregate_type.clone(),
                    id: req.aggregate_id.clone(),
                    version: live.version,
                    events: Vec::new(),
                    reply,
                    replayed: false,
                    dry_run: false,
                    state: None,
                });
            }
            let (events, outcome_events) = self.prepare_events(
                plugin,
                stream,
                req,
                &ids,
                &decision,
                reply.as_ref(),
                live.version,
            )?;
            let expected = ExpectedVersion::Exact(live.version);
            let head_event_id = events.last().map(|e| e.event_id);
            let appending = Instant::now();
            let appended = self.store.append(stream, expected, events).await;
            Metrics::observe(
                &metrics::global().store_append_seconds,
                &req.aggregate_type,
                appending.elapsed(),
            );
            match appended {
                Ok(appended)
                    if appended.version
                        != live.version.saturating_add(outcome_events.len() as u64) =>
                {
                    // The store took the append for one it had stored
                    // before: the same message id, sent by another host (a
                    // timer, a process manager's delivery) or an earlier try
                    // of this one. What it stored was decided on the state
                    // that host had, which this cache may be behind: load
                    // what is stored, and answer with that command's
                    // outcome, rather than keep this decision's state.
                    tracing::debug!(
                        version = appended.version,
                        "the append was one stored before; answering with its outcome"
                    );
                    self.catch_up(plugin, stream, live).await?;
                    let earlier = self
                        .store
                        .find_command_events(stream, event_id(stream, &ids.message_id, 0))
                        .await?;
                    if earlier.is_empty() {
                        return Err(CommandError::StoreUnavailable(format!(
                            "the store took the append to {stream} for an earlier one but does \
                             not hold it; retry the command"
                        )));
                    }
                    return replayed_outcome(req, &earlier);
                }
                Ok(appended) => {
                    // Kept for the re-run of an upgrade check.
                    self.recent
                        .record(&req.aggregate_type, &input, live.version);
                    if !decision.timers.is_empty() {
                        self.await_timer_index(appended.position).await;
                    }
                    live.version = appended.version;
                    live.head_event_id = head_event_id;
                    live.state = decision.state;
                    return Ok(CommandOutcome {
                        aggregate_type: req.aggregate_type.clone(),
                        id: req.aggregate_id.clone(),
                        version: appended.version,
                        events: outcome_events,
                        reply,
                        replayed: false,
                        dry_run: false,
                        state: None,
                    });
                }
                Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                    // Another writer got there first.
                    if let Some(expected) = req.expected_version {
                        self.catch_up(plugin, stream, live).await?;
                        return Err(CommandError::WrongExpectedVersion { expected, actual });
                    }
                    if attempt >= self.config.conflict_retries {
                        return Err(CommandError::WrongExpectedVersion {
                            expected: live.version,
                            actual,
                        });
                    }
                    attempt += 1;
                    tracing::debug!(
                        attempt,
                        actual,
                        "conflict with another writer; catching up and retrying"
                    );
                    self.catch_up(plugin, stream, live).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Validates the plugin's events and turns them into what the store
    /// keeps (with metadata) and what the client is told. `reply` is the
    /// decision's reply, parsed.
    #[allow(clippy::too_many_arguments)]
    fn prepare_events(
        &self,
        plugin: &PluginRef,
        stream: &str,
        req: &CommandRequest,
        ids: &CommandIds,
        decision: &Decision,
        reply: Option<&serde_json::Value>,
        version: u64,
    ) -> Result<(Vec<EventData>, Vec<OutcomeEvent>), CommandError> {
        let bad = |message: String| CommandError::PluginFailed {
            plugin: plugin.name.clone(),
            kind: FailureKind::BadOutput,
            message,
        };
        // The timer changes ride in one host event after the plugin's, in
        // the same append, so that both are stored or neither is.
        let timers_event = self
            .timers_event(stream, req, ids, decision)
            .map_err(|e| match e {
                TimersEventError::Plugin(message) => bad(message),
                TimersEventError::Host(e) => e,
            })?;
        let all: Vec<&NewEvent> = decision
            .events
            .iter()
            .chain(timers_event.as_ref())
            .collect();
        let mut stored = Vec::with_capacity(all.len());
        let mut told = Vec::with_capacity(all.len());
        let last = all.len() - 1;
        for (i, e) in all.into_iter().enumerate() {
            let data: serde_json::Value = serde_json::from_slice(&e.data).map_err(|err| {
                bad(format!(
                    "handle() emitted {} with data that is not JSON: {err}",
                    e.event_type
                ))
            })?;
            let metadata = EventMetadata {
                causation_id: &ids.causation_id,
                correlation_id: &ids.correlation_id,
                command_type: &req.command,
                message_id: &ids.message_id,
                plugin: &plugin.name,
                plugin_hash: &plugin.hash,
                principal: req.principal.as_deref(),
                // The reply rides on the last event so that a repeated
                // idempotency key can return the original outcome.
                reply: if i == last { reply } else { None },
                request_hash: ids.request_hash.as_deref(),
                timer: req.timer.as_ref(),
                timestamp: &ids.now,
            };
            let metadata = serde_json::to_vec(&metadata).map_err(|err| {
                CommandError::Internal(format!("cannot encode event metadata: {err}"))
            })?;
            stored.push(EventData {
                event_id: event_id(stream, &ids.message_id, i),
                event_type: e.event_type.clone(),
                data: e.data.clone(),
                metadata,
                message_id: ids.message_id.clone(),
            });
            told.push(OutcomeEvent {
                event_type: e.event_type.clone(),
                version: version + 1 + i as u64,
                data,
            });
        }
        Ok((stored, told))
    }

    /// What a dry run reports: the events and the state the decision would
    /// store, checked as they would be, with `live` left as it was.
    #[allow(clippy::too_many_arguments)]
    fn dry_run_outcome(
        &self,
        plugin: &PluginRef,
        stream: &str,
        req: &CommandRequest,
        ids: &CommandIds,
        decision: Decision,
        reply: Option<serde_json::Value>,
        live: &Live,
    ) -> Result<CommandOutcome, CommandError> {
        let told = if decision.events.is_empty() && decision.timers.is_empty() {
            Vec::new()
        } else {
            self.prepare_events(
                plugin,
                stream,
                req,
                ids,
                &decision,
                reply.as_ref(),
                live.version,
            )?
            .1
        };
        Ok(CommandOutcome {
            aggregate_type: req.aggregate_type.clone(),
            id: req.aggregate_id.clone(),
            version: live.version + told.len() as u64,
            events: told,
            reply,
            replayed: false,
            dry_run: true,
            state: Some(state_json(&decision.state.bytes)),
        })
    }

    /// Loads an aggregate: from its newest usable snapshot and the events
    /// after it, or else from all its events.
    async fn rehydrate(&self, plugin: &PluginRef, stream: &str) -> Result<Live, CommandError> {
        self.rehydrate_from(plugin, stream, self.snapshots.enabled())
            .await
    }

    /// Loads an aggregate, from a snapshot only if `use_snapshot`.
    async fn rehydrate_from(
        &self,
        plugin: &PluginRef,
        stream: &str,
        use_snapshot: bool,
    ) -> Result<Live, CommandError> {
        metrics::global()
            .rehydrations
            .get_or_create(&Metrics::of_type(&plugin.info.aggregate_type))
            .inc();
        if use_snapshot && let Some(live) = self.load_from_snapshot(plugin, stream).await? {
            return Ok(live);
        }
        let mut live = Live {
            state: plugin.initial_state().clone(),
            version: 0,
            head_event_id: None,
            snapshot_version: 0,
        };
        self.catch_up(plugin, stream, &mut live).await?;
        Ok(live)
    }

    /// The aggregate from its stored snapshot and the events after it.
    /// `None` (with a log line) when there is none it can use: none stored,
    /// one of another state schema, one whose event the stream no longer
    /// has at its version, or state the plugin's `apply` refuses.
    async fn load_from_snapshot(
        &self,
        plugin: &PluginRef,
        stream: &str,
    ) -> Result<Option<Live>, CommandError> {
        let aggregate_type = &plugin.info.aggregate_type;
        let count =
            |outcome| Metrics::snapshot(&metrics::global().snapshot_loads, aggregate_type, outcome);
        let snapshot = match self.store.load_snapshot(stream).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                count("none");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(stream, error = %e, "cannot read the aggregate's snapshot; loading it from its events");
                count("failed");
                return Ok(None);
            }
        };
        if snapshot.schema != plugin.info.state_schema {
            tracing::info!(
                stream,
                snapshot_schema = snapshot.schema,
                plugin_schema = plugin.info.state_schema,
                "snapshot of another state schema ignored; loading the aggregate from its events"
            );
            count("ignored");
            return Ok(None);
        }
        // The snapshot's own event, to check it, and a page after it.
        let page = self.config.rehydrate_page;
        let mut batch = self
            .store
            .read_stream_to_apply(stream, snapshot.version, page.saturating_add(1))
            .await?;
        if !batch
            .first()
            .is_some_and(|e| e.version == snapshot.version && e.event_id == snapshot.event_id)
        {
            tracing::info!(
                stream,
                version = snapshot.version,
                "snapshot ignored: the stream no longer holds the event it was taken at (was it \
                 deleted and written again?); loading the aggregate from its events"
            );
            count("ignored");
            return Ok(None);
        }
        let taken_at = batch.remove(0);
        let full_page = batch.len() >= page;
        let last = batch.last().map(|e| (e.version, e.event_id));
        let replaying = batch.len() as u64;
        let snapshot_state = crate::plugin::StateBytes {
            schema: snapshot.schema,
            bytes: snapshot.state,
        };
        // `apply` runs even when no event follows: it is what tells whether
        // the plugin can read the stored state.
        let state = match plugin.apply(&snapshot_state, batch).await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(
                    stream,
                    version = snapshot.version,
                    error = %e,
                    "snapshot ignored: the plugin's apply() failed on it; loading the aggregate \
                     from its events"
                );
                count("ignored");
                return Ok(None);
            }
        };
        metrics::global()
            .events_replayed
            .get_or_create(&Metrics::of_type(aggregate_type))
            .inc_by(replaying);
        let (version, head) = last.unwrap_or((snapshot.version, taken_at.event_id));
        let mut live = Live {
            state,
            version,
            head_event_id: Some(head),
            snapshot_version: snapshot.version,
        };
        if full_page {
            self.catch_up(plugin, stream, &mut live).await?;
        }
        count("used");
        Ok(Some(live))
    }

    /// Applies every stored event after `live.version`, a page per call.
    ///
    /// While the guest folds one page the store reads the next: the two
    /// run on different threads, so a long stream loads in about the time
    /// of the slower of the two rather than their sum.
    async fn catch_up(
        &self,
        plugin: &PluginRef,
        stream: &str,
        live: &mut Live,
    ) -> Result<(), CommandError> {
        let page = self.config.rehydrate_page;
        let mut batch = self
            .store
            .read_stream_to_apply(stream, live.version + 1, page)
            .await?;
        loop {
            let Some(last) = batch.last() else {
                return Ok(());
            };
            if batch[0].version != live.version + 1 {
                return Err(CommandError::StoreUnavailable(format!(
                    "stream {stream} skips from version {} to {}",
                    live.version, batch[0].version
                )));
            }
            let (last_version, last_id) = (last.version, last.event_id);
            let full_page = batch.len() >= page;
            metrics::global()
                .events_replayed
                .get_or_create(&Metrics::of_type(&plugin.info.aggregate_type))
                .inc_by(batch.len() as u64);
            let next = if full_page {
                let (state, next) = tokio::join!(
                    plugin.apply(&live.state, batch),
                    self.store
                        .read_stream_to_apply(stream, last_version + 1, page)
                );
                // The guest's failure first: it is the one the caller
                // must hear about, whatever the read ahead did.
                live.state = state?;
                Some(next?)
            } else {
                live.state = plugin.apply(&live.state, batch).await?;
                None
            };
            live.version = last_version;
            live.head_event_id = Some(last_id);
            match next {
                Some(next) => batch = next,
                None => return Ok(()),
            }
        }
    }

    /// Answers a state query from the actor's cache, loading it if needed.
    pub(super) async fn read_state(
        &self,
        aggregate_type: &str,
        id: &str,
        live: Option<Live>,
    ) -> (Result<AggregateState, CommandError>, Option<Live>) {
        let Some(plugin) = self.plugins.get(aggregate_type) else {
            return (
                Err(CommandError::UnknownAggregateType(
                    aggregate_type.to_string(),
                )),
                live,
            );
        };
        let stream = plugin.info.stream_name(id);
        let (result, live) = self
            .read_state_with(&plugin, &stream, aggregate_type, id, live)
            .await;
        plugin.record_outcome(&stream, &result);
        (result, live)
    }

    async fn read_state_with(
        &self,
        plugin: &PluginRef,
        stream: &str,
        aggregate_type: &str,
        id: &str,
        live: Option<Live>,
    ) -> (Result<AggregateState, CommandError>, Option<Live>) {
        let live = match live.filter(|l| l.state.schema == plugin.info.state_schema) {
            // Other hosts may have written since this one cached the state:
            // a read must still show every version acknowledged before it
            // began, so ask the store for what follows (one indexed read
            // that finds nothing when the cache is current).
            Some(mut l) if self.store.shared_by_hosts() => {
                match self.catch_up(plugin, stream, &mut l).await {
                    Ok(()) => l,
                    // Half-applied is not cached: the next read starts over.
                    Err(e) => return (Err(e), None),
                }
            }
            Some(l) => l,
            None => match self.rehydrate(plugin, stream).await {
                Ok(l) => l,
                Err(e) => return (Err(e), None),
            },
        };
        if live.version == 0 {
            let e = CommandError::AggregateNotFound {
                aggregate_type: aggregate_type.to_string(),
                id: id.to_string(),
            };
            return (Err(e), Some(live));
        }
        let state = state_json(&live.state.bytes);
        let result = AggregateState {
            aggregate_type: aggregate_type.to_string(),
            id: id.to_string(),
            version: live.version,
            state,
        };
        (Ok(result), Some(live))
    }
}

/// The plugin's `handle`, timed for the metrics (dry runs are not counted).
async fn handle_timed(
    plugin: &PluginRef,
    live: &Live,
    input: &CommandInput<'_>,
    req: &CommandRequest,
) -> Result<Result<Decision, Rejection>, CommandError> {
    let called = Instant::now();
    let decided = plugin.handle(&live.state, live.version, input).await;
    if !req.dry_run {
        Metrics::observe(
            &metrics::global().guest_seconds,
            &req.aggregate_type,
            called.elapsed(),
        );
    }
    decided
}

/// A plugin's state bytes as JSON, or as a string when they are not JSON.
fn state_json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The metadata stored with each event, as a JSON object with its keys in
/// sorted order — the bytes a `serde_json::Value` object printed, before it
/// was replaced by this struct: building a `Value` map per event cost a
/// fifth of a command's instructions on `memory://` (BENCHMARKS.md).
#[derive(Serialize)]
struct EventMetadata<'a> {
    #[serde(rename = "$causationId")]
    causation_id: &'a str,
    #[serde(rename = "$correlationId")]
    correlation_id: &'a str,
    #[serde(rename = "commandType")]
    command_type: &'a str,
    #[serde(rename = "messageId")]
    message_id: &'a str,
    plugin: &'a str,
    #[serde(rename = "pluginHash")]
    plugin_hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    principal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<&'a serde_json::Value>,
    #[serde(rename = "requestHash", skip_serializing_if = "Option::is_none")]
    request_hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timer: Option<&'a crate::command::TimerFiring>,
    timestamp: &'a str,
}

/// Refuses a repeated idempotency key whose request is not the one that
/// stored `first` (another command, or another payload). Events stored
/// before fingerprints were (no `requestHash`) are compared by command name
/// only.
fn same_request(
    req: &CommandRequest,
    ids: &CommandIds,
    first: &RecordedEvent,
) -> Result<(), CommandError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        #[serde(rename = "commandType")]
        command_type: Option<String>,
        #[serde(rename = "requestHash")]
        request_hash: Option<String>,
    }
    // Metadata another tool wrote may be anything: then there is nothing
    // to compare, and the stored outcome is returned as before.
    let Ok(stored) = serde_json::from_slice::<Stored>(&first.metadata) else {
        return Ok(());
    };
    let reused = |earlier: String| CommandError::IdempotencyKeyReused {
        key: ids.message_id.clone(),
        earlier,
    };
    if let Some(command) = stored.command_type
        && command != req.command
    {
        return Err(reused(format!("the command {command:?}")));
    }
    if let (Some(stored), Some(now)) = (stored.request_hash, ids.request_hash.as_deref())
        && stored != now
    {
        return Err(reused(format!(
            "a {:?} command with another payload",
            req.command
        )));
    }
    Ok(())
}

fn parse_reply(
    plugin: &PluginRef,
    reply: Option<&[u8]>,
) -> Result<Option<serde_json::Value>, CommandError> {
    reply
        .map(|r| {
            serde_json::from_slice(r).map_err(|e| CommandError::PluginFailed {
                plugin: plugin.name.clone(),
                kind: FailureKind::BadOutput,
                message: format!("handle() returned a reply that is not JSON: {e}"),
            })
        })
        .transpose()
}

/// The outcome of an earlier command with the same idempotency key, rebuilt
/// from the events it stored.
fn replayed_outcome(
    req: &CommandRequest,
    earlier: &[RecordedEvent],
) -> Result<CommandOutcome, CommandError> {
    let mut events = Vec::with_capacity(earlier.len());
    let mut reply = None;
    for e in earlier {
        let data = serde_json::from_slice(&e.data).map_err(|err| {
            CommandError::StoreUnavailable(format!("stored event is not JSON: {err}"))
        })?;
        events.push(OutcomeEvent {
            event_type: e.event_type.clone(),
            version: e.version,
            data,
        });
        if let Ok(serde_json::Value::Object(mut m)) = serde_json::from_slice(&e.metadata)
            && let Some(r) = m.remove("reply")
        {
            reply = Some(r);
        }
    }
    Ok(CommandOutcome {
        aggregate_type: req.aggregate_type.clone(),
        id: req.aggregate_id.clone(),
        version: earlier.last().map(|e| e.version).unwrap_or_default(),
        events,
        reply,
        replayed: true,
        dry_run: false,
        state: None,
    })
}

#[cfg(test)]
mod tests {
    use super::EventMetadata;

    /// The struct prints the very bytes the `serde_json::Value` it replaced
    /// printed, so stored metadata is unchanged.
    #[test]
    fn event_metadata_prints_as_the_value_it_replaced() {
        let reply = serde_json::json!({"b": 1, "a": [true, null, "x\"y"], "c": 1.5});
        for (principal, reply) in [(None, None), (Some("alice \"a\"\n"), Some(&reply))] {
            let metadata = EventMetadata {
                causation_id: "cause",
                correlation_id: "corr",
                command_type: "deposit",
                message_id: "msg-1",
                plugin: "bank-account",
                plugin_hash: "abc123",
                principal,
                reply,
                request_hash: None,
                timer: None,
                timestamp: "2026-01-01T00:00:00.000Z",
            };
            let mut old = serde_json::json!({
                "$correlationId": "corr",
                "$causationId": "cause",
                "messageId": "msg-1",
                "commandType": "deposit",
                "plugin": "bank-account",
                "pluginHash": "abc123",
                "timestamp": "2026-01-01T00:00:00.000Z",
            });
            if let Some(p) = principal {
                old["principal"] = serde_json::Value::String(p.to_string());
            }
            if let Some(r) = reply {
                old["reply"] = r.clone();
            }
            let new = serde_json::to_string(&metadata).expect("metadata encodes");
            assert_eq!(new, old.to_string());
        }
    }
}
