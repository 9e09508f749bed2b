//! The PostgreSQL store's schema: its tables, the function that appends a
//! group of commands in one round trip, and the versioned migration that
//! creates them.
//!
//! Everything lives in one PostgreSQL schema (`?schema=`, default
//! `rehydra`), so several stores can share a database and the host never
//! touches anything else. The version is a row of `meta`; a host refuses a
//! schema written by a newer one, and the creation runs under an advisory
//! lock, so hosts started together create it once.

use anyhow::{Context, bail};
use tokio_postgres::Client;

/// The schema version this build writes; a store with a higher one was
/// written by a newer Rehydra and is refused rather than misread.
///
/// - 1: the first schema.
/// - 2: a `snapshots` table (`EventStore::save_snapshot`).
pub const SCHEMA_VERSION: i64 = 2;

/// How many bits of an event's global position count the events of one
/// transaction; the transaction id fills the bits above (see the module docs
/// of `store::postgres`).
pub const ORDINAL_BITS: u32 = 20;
/// The most events one transaction (one group of appends) may hold.
pub const MAX_EVENTS_PER_TRANSACTION: usize = (1 << ORDINAL_BITS) - 1;

/// The SQLSTATE the append function raises when an event id it inserts is
/// already stored (only a reused message id can do that); the message is
/// the 0-based index of the command in the group.
pub const DUPLICATE_ID_SQLSTATE: &str = "RH001";

/// The statements that create schema version 1 in `schema` (the name is
/// checked by the URL parser: lower-case letters, digits, underscores).
fn version_1(schema: &str) -> String {
    format!(
        r#"
CREATE TABLE {schema}.streams (
    stream  text   PRIMARY KEY,
    version bigint NOT NULL CHECK (version >= 0)
);

CREATE TABLE {schema}.events (
    position   bigint PRIMARY KEY,
    stream     text   NOT NULL,
    version    bigint NOT NULL,
    event_id   uuid   NOT NULL,
    event_type text   NOT NULL,
    data       bytea  NOT NULL,
    metadata   bytea  NOT NULL,
    message_id text   NOT NULL,
    CONSTRAINT events_stream_version UNIQUE (stream, version),
    CONSTRAINT events_event_id UNIQUE (event_id)
);

CREATE FUNCTION {schema}.append_batch(
    p_streams  text[],
    p_kinds    int[],
    p_expected bigint[],
    p_counts   int[],
    p_ids      uuid[],
    p_types    text[],
    p_data     bytea[],
    p_meta     bytea[],
    p_messages text[])
RETURNS TABLE (r_index int, r_outcome int, r_version bigint, r_position bigint, r_other text)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
-- Appends a group of commands in the caller's transaction, in array order
-- (the caller sorts them by stream, so that every host locks streams rows in
-- one order and two groups never deadlock). Per command, r_outcome is
--   0 appended (r_version, r_position: the stream's version and the last
--     event's position after it),
--   1 wrong expected version (r_version: the stream's actual version),
--   2 a retry of an append already stored (its version and position),
--   3 the first event id is stored in another stream (r_other: that stream).
-- p_kinds: 0 any, 1 no stream, 2 stream exists, 3 exact (p_expected).
DECLARE
    base     bigint := (pg_current_xact_id()::text::bigint) << {bits};
    ord      bigint := 0;
    ev       int    := 1;  -- the command's first event in the p_ids… arrays
    i        int;
    n        int;
    cur      bigint;
    fits  boolean;
    inserted bigint;
    in_stream text;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
        n := p_counts[i];
        r_index := i - 1;
        r_other := NULL;
        r_position := NULL;
        IF n = 0 THEN
            SELECT s.version INTO cur FROM {schema}.streams s WHERE s.stream = p_streams[i];
        ELSE
            -- Lock the stream's row: appends to one stream from every host
            -- queue here, so the expected-version check below cannot race.
            SELECT s.version INTO cur FROM {schema}.streams s
                WHERE s.stream = p_streams[i] FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO {schema}.streams (stream, version) VALUES (p_streams[i], 0)
                    ON CONFLICT (stream) DO NOTHING;
                IF NOT FOUND THEN
                    -- Another transaction created it meanwhile and committed.
                    SELECT s.version INTO cur FROM {schema}.streams s
                        WHERE s.stream = p_streams[i] FOR UPDATE;
                ELSE
                    cur := 0;
                END IF;
            END IF;
        END IF;
        cur := coalesce(cur, 0);
        fits := CASE p_kinds[i]
            WHEN 0 THEN true
            WHEN 1 THEN cur = 0
            WHEN 2 THEN cur > 0
            ELSE cur = p_expected[i] END;
        -- A retry of a stored append fails an exact expectation (the stream
        -- has moved on) and passes a loose one: look its first id up then.
        IF n > 0 AND (NOT fits OR p_kinds[i] IN (0, 2)) THEN
            SELECT e.stream INTO in_stream FROM {schema}.events e
                WHERE e.event_id = p_ids[ev];
            IF FOUND THEN
                IF in_stream <> p_streams[i] THEN
                    r_outcome := 3;
                    r_version := NULL;
                    r_other := in_stream;
                ELSE
                    r_outcome := 2;
                    SELECT e.version, e.position INTO r_version, r_position
                        FROM {schema}.events e
                        WHERE e.event_id = ANY (p_ids[ev : ev + n - 1])
                          AND e.stream = p_streams[i]
                        ORDER BY e.version DESC LIMIT 1;
                END IF;
                RETURN NEXT;
                ev := ev + n;
                CONTINUE;
            END IF;
        END IF;
        IF NOT fits THEN
            r_outcome := 1;
            r_version := cur;
            RETURN NEXT;
            ev := ev + n;
            CONTINUE;
        END IF;
        IF n = 0 THEN
            r_outcome := 0;
            r_version := cur;
            SELECT e.position INTO r_position FROM {schema}.events e
                WHERE e.stream = p_streams[i] AND e.version = cur;
            r_position := coalesce(r_position, 0);
            RETURN NEXT;
            CONTINUE;
        END IF;
        INSERT INTO {schema}.events
            (position, stream, version, event_id, event_type, data, metadata, message_id)
        SELECT base + ord + k.o - 1, p_streams[i], cur + k.o, k.id, k.t, k.d, k.m, k.msg
        FROM unnest(p_ids[ev : ev + n - 1], p_types[ev : ev + n - 1],
                    p_data[ev : ev + n - 1], p_meta[ev : ev + n - 1],
                    p_messages[ev : ev + n - 1])
             WITH ORDINALITY AS k(id, t, d, m, msg, o)
        ON CONFLICT (event_id) DO NOTHING;
        GET DIAGNOSTICS inserted = ROW_COUNT;
        IF inserted <> n THEN
            -- An id stored before (in another stream, or later in this one):
            -- undo the whole group; the caller answers this command and
            -- sends the others again.
            RAISE EXCEPTION USING ERRCODE = '{dup}', MESSAGE = (i - 1)::text;
        END IF;
        UPDATE {schema}.streams s SET version = cur + n WHERE s.stream = p_streams[i];
        ord := ord + n;
        r_outcome := 0;
        r_version := cur + n;
        r_position := base + ord - 1;
        RETURN NEXT;
        ev := ev + n;
    END LOOP;
END
$fn$;
"#,
        bits = ORDINAL_BITS,
        dup = DUPLICATE_ID_SQLSTATE,
    )
}

/// The statements that take schema version 1 to version 2: the snapshots
/// table, one row per stream, apart from the events so that appends never
/// write it.
fn version_2(schema: &str) -> String {
    format!(
        "CREATE TABLE {schema}.snapshots (
             stream       text   PRIMARY KEY,
             state_schema bigint NOT NULL,
             version      bigint NOT NULL,
             event_id     uuid   NOT NULL,
             state        bytea  NOT NULL
         );"
    )
}

/// Creates the store's schema in `schema`, or checks the one that is there:
/// refuses a newer version, or a schema that holds tables but is not a
/// Rehydra store. Hosts started together serialise on an advisory lock.
pub async fn migrate(client: &mut Client, schema: &str) -> anyhow::Result<()> {
    let tx = client
        .transaction()
        .await
        .context("starting the schema migration")?;
    // One lock per schema name, held until the transaction ends.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("rehydra-migrate:{schema}")],
    )
    .await
    .context("waiting for another host's schema migration")?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.meta (key text PRIMARY KEY, value text NOT NULL);"
    ))
    .await
    .with_context(|| {
        format!(
            "cannot create the schema {schema}: the user needs CREATE on the database \
             (GRANT CREATE ON DATABASE … TO …), or create the schema for it"
        )
    })?;
    let stored: Option<String> = tx
        .query_opt(
            &format!("SELECT value FROM {schema}.meta WHERE key = 'schema_version'"),
            &[],
        )
        .await
        .context("reading the store's schema version")?
        .map(|row| row.get(0));
    match stored {
        None => {
            let foreign: i64 = tx
                .query_one(
                    "SELECT count(*) FROM information_schema.tables \
                     WHERE table_schema = $1 AND table_name <> 'meta'",
                    &[&schema],
                )
                .await
                .context("looking at the schema's tables")?
                .get(0);
            if foreign > 0 {
                bail!(
                    "the PostgreSQL schema {schema} holds {foreign} tables but no Rehydra schema \
                     version: it is not a Rehydra store; name another with ?schema=NAME in the \
                     --store URL"
                );
            }
            tx.batch_execute(&version_1(schema))
                .await
                .context("creating the store's tables")?;
            tx.batch_execute(&version_2(schema))
                .await
                .context("creating the snapshots table")?;
            tx.execute(
                &format!("INSERT INTO {schema}.meta (key, value) VALUES ('schema_version', $1)"),
                &[&SCHEMA_VERSION.to_string()],
            )
            .await
            .context("recording the schema version")?;
        }
        Some(version) => {
            let version: i64 = version.parse().with_context(|| {
                format!("the schema version {version:?} in {schema}.meta is not a number")
            })?;
            if version > SCHEMA_VERSION {
                bail!(
                    "the store in schema {schema} has schema version {version}, written by a newer \
                     Rehydra; this one reads up to version {SCHEMA_VERSION}: upgrade the host"
                );
            }
            if version < 2 {
                tx.batch_execute(&version_2(schema))
                    .await
                    .context("migrating the store to schema version 2 (the snapshots table)")?;
            }
            if version < SCHEMA_VERSION {
                tx.execute(
                    &format!("UPDATE {schema}.meta SET value = $1 WHERE key = 'schema_version'"),
                    &[&SCHEMA_VERSION.to_string()],
                )
                .await
                .context("recording the new schema version")?;
                tracing::info!(
                    schema,
                    from = version,
                    to = SCHEMA_VERSION,
                    "PostgreSQL store schema migrated"
                );
            }
        }
    }
    tx.commit()
        .await
        .context("committing the schema migration")?;
    Ok(())
}
