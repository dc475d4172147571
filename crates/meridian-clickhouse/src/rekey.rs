//! Re-keying an events table of an earlier version.
//!
//! Tables created before were ordered by `(project_id, toDate(timestamp), message_id)` and
//! partitioned by month: ReplacingMergeTree only collapses rows with the same key in the same
//! partition, so a retried message whose timestamp landed on another day counted twice. The
//! current key is [`schema::EVENTS_SORTING_KEY`] in one partition. A re-key, on each replica:
//!
//! 1. creates `events_rekeyed` with the current schema;
//! 2. swaps the tables in one `RENAME` (`events` -> `events_before_rekey`, `events_rekeyed` ->
//!    `events`): the rename waits for inserts in progress, and every later insert goes to the
//!    re-keyed table, so no row is written where the copy cannot see it;
//! 3. copies every row of `events_before_rekey` into `events` (copies of one message collapse);
//! 4. drops `events_before_rekey`.
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
                    "re-keying the events table by (project_id, message_id) so retried messages collapse across days and months"
                );
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
                let copy = format!("INSERT INTO {events} SELECT * FROM {source}");
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
