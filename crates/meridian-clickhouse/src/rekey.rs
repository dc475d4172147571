//! Re-keying an events table of an earlier layout into the current one
//! ([`schema::EVENTS_SORTING_KEY`], partitioned by [`schema::EVENTS_PARTITION_KEY`]).
//!
//! The layout before was ordered by `(project_id, message_id)` in one partition, so that copies of
//! a message collapsed whatever their timestamps — and every time-range question read a
//! project's whole history. The current layout is time first, and gives copies one timestamp
//! through `message_ids` (see `crate::schema`). A re-key, on each replica:
//!
//! 1. records every stored message in `message_ids` (from `events FINAL`: one row per message,
//!    the one the old table keeps), so that a copy arriving from now on gets the timestamp of the
//!    row the copy below moves;
//! 2. creates `events_rekeyed` with the current schema;
//! 3. swaps the tables in one `RENAME` (`events` -> `events_before_rekey`, `events_rekeyed` ->
//!    `events`): the rename waits for inserts in progress, and every later insert goes to the
//!    re-keyed table, so no row is written where the copy cannot see it;
//! 4. copies `events_before_rekey FINAL` into `events` (one row per message);
//! 5. drops `events_before_rekey`.
//!
//! While it runs, ingest goes on and delivery into the warehouse goes on (into the old table
//! until the swap, into the new one after). A copy of an old message that reaches the sink while
//! step 1 has not yet recorded it is stored with its own timestamp: if that falls on another day
//! than the old row's, the message has two rows (a retry in those minutes, on a day boundary).
//!
//! Every step is decided by looking at the tables, so a re-key interrupted anywhere (or run by two
//! nodes at once) finishes when run again. GDPR deletions refuse to run while
//! `events_before_rekey` exists (see [`crate::ClickHouseSink::delete_users`]), so a copy can never
//! bring back a deleted user's rows.

use std::time::Duration;

use clickhouse::Client;
use tracing::info;

use crate::schema::{self, SchemaFlavor, SchemaOptions};

/// What the tables look like now.
#[derive(Debug, PartialEq, Eq)]
enum RekeyState {
    /// `events` is missing (migration 1 creates it with the current key).
    NoEvents,
    /// `events` has the current key and nothing is left over.
    Done,
    /// `events` has the current key and the old rows still wait in `events_before_rekey`.
    Copying,
    /// `events` has another key: it is to be swapped out.
    OldKey,
    /// `events` is missing while `events_before_rekey` exists (cannot come from the steps above,
    /// but an operator may have renamed tables): put it back and start over.
    OnlyOldTable,
}

async fn with_timeout<T>(
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
) -> Result<T, clickhouse::error::Error> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(clickhouse::error::Error::TimedOut))
}

/// True while a re-key of `database` has old rows still to copy.
pub(crate) async fn rekey_in_progress(
    admin: &Client,
    database: &str,
    timeout: Duration,
) -> Result<bool, clickhouse::error::Error> {
    let count: u64 = with_timeout(
        timeout,
        admin
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
            .bind(database)
            .bind(schema::REKEY_SOURCE_TABLE)
            .fetch_one::<u64>(),
    )
    .await?;
    Ok(count > 0)
}

async fn inspect(
    admin: &Client,
    database: &str,
    timeout: Duration,
) -> Result<RekeyState, clickhouse::error::Error> {
    let events_key: Vec<String> = with_timeout(
        timeout,
        admin
            .query("SELECT sorting_key FROM system.tables WHERE database = ? AND name = 'events'")
            .bind(database)
            .fetch_all::<String>(),
    )
    .await?;
    let old_rows_waiting = rekey_in_progress(admin, database, timeout).await?;
    Ok(match (events_key.first(), old_rows_waiting) {
        (None, false) => RekeyState::NoEvents,
        (None, true) => RekeyState::OnlyOldTable,
        (Some(key), false) if key == schema::EVENTS_SORTING_KEY => RekeyState::Done,
        (Some(key), true) if key == schema::EVENTS_SORTING_KEY => RekeyState::Copying,
        (Some(_), _) => RekeyState::OldKey,
    })
}

/// Brings `events` of `database` to the current key (see the module documentation). Returns
/// whether anything was re-keyed. `copy_timeout` bounds the copy of the old rows.
pub(crate) async fn rekey_events(
    admin: &Client,
    database: &str,
    flavor: SchemaFlavor,
    options: &SchemaOptions,
    timeout: Duration,
    copy_timeout: Duration,
) -> Result<bool, clickhouse::error::Error> {
    let db = schema::quote_identifier(database);
    let events = format!("{db}.events");
    let target = format!(
        "{db}.{}",
        schema::quote_identifier(schema::REKEY_TARGET_TABLE)
    );
    let source = format!(
        "{db}.{}",
        schema::quote_identifier(schema::REKEY_SOURCE_TABLE)
    );
    let mut rekeyed = false;
    // Each pass moves at least one step; a concurrent re-key may move the state under us, so the
    // state is looked at again after every step.
    for _ in 0..6 {
        let state = inspect(admin, database, timeout).await?;
        match state {
            RekeyState::NoEvents | RekeyState::Done => return Ok(rekeyed),
            RekeyState::OnlyOldTable => {
                with_timeout(
                    timeout,
                    admin
                        .query(&format!("RENAME TABLE {source} TO {events}"))
                        .execute(),
                )
                .await?;
            }
            RekeyState::OldKey => {
                info!(
                    database,
                    "re-keying the events table time first; recording every stored message's timestamp first"
                );
                let received_at_ms = match flavor {
                    SchemaFlavor::Modern => "toUnixTimestamp64Milli(received_at)",
                    SchemaFlavor::Legacy => "toInt64(received_at) * 1000",
                };
                let record = format!(
                    "INSERT INTO {db}.{message_ids} (project_id, message_id, timestamp_ms, received_at_ms, first_seen) \
                     SELECT project_id, message_id, timestamp_ms, {received_at_ms}, bitNot(toUInt64({received_at_ms})) \
                     FROM {events} FINAL",
                    message_ids = schema::quote_identifier(schema::MESSAGE_IDS_TABLE),
                );
                with_timeout(copy_timeout, admin.query(&record).execute()).await?;
                let create = schema::create_events_table_named(
                    database,
                    schema::REKEY_TARGET_TABLE,
                    flavor,
                    options,
                );
                with_timeout(timeout, admin.query(&create).execute()).await?;
                let swap = format!("RENAME TABLE {events} TO {source}, {target} TO {events}");
                if let Err(error) = with_timeout(timeout, admin.query(&swap).execute()).await {
                    // Another node may have swapped them first: look again before giving up.
                    if inspect(admin, database, timeout).await? == RekeyState::OldKey {
                        return Err(error);
                    }
                }
                rekeyed = true;
            }
            RekeyState::Copying => {
                let copy = format!("INSERT INTO {events} SELECT * FROM {source} FINAL");
                with_timeout(copy_timeout, admin.query(&copy).execute()).await?;
                with_timeout(
                    timeout,
                    admin
                        .query(&format!("DROP TABLE IF EXISTS {source}"))
                        .execute(),
                )
                .await?;
                info!(
                    database,
                    "events table re-keyed: every row copied, the day-keyed table dropped"
                );
                rekeyed = true;
            }
        }
    }
    Err(clickhouse::error::Error::Custom(
        "the events table did not settle after re-keying".into(),
    ))
}
