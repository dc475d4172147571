//! The `events` schema and its migrations, chosen by server version.
//!
//! Current ClickHouse (22.2 and later) gets DateTime64(3), LowCardinality, ZSTD codecs, a dedup
//! window for `insert_deduplication_token`, and a TTL when a retention is set. Older servers (the
//! Debian package is 18.16) get the fallback: DateTime (seconds; `timestamp_ms` keeps the
//! milliseconds), plain String, no codecs, no TTL, no dedup tokens.
//!
//! Both lay `events` out time first — ReplacingMergeTree partitioned by the month of `timestamp`
//! and ordered by `(project_id, toDate(timestamp), message_id)` — so that a question about a time
//! range of one project reads that range, not the project's history. Copies of one message
//! collapse only when their sorting keys are equal, and a client's retry carries a new
//! skew-corrected timestamp (possibly on another day), so the sink gives every copy the timestamp
//! of the first one it stored: `message_ids` (ordered by `(project_id, message_id)`) remembers,
//! per message, the timestamp its row was stored with (see `crate::identity`). Then
//! `SELECT count() FROM events FINAL WHERE project_id = ...` counts each message once. Tables of
//! earlier layouts are re-keyed by [`crate::rekey`] (see [`EVENTS_SORTING_KEY`]).

use std::fmt::Write;

/// What the server supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaFlavor {
    /// 22.2 and later.
    Modern,
    /// Anything older, down to 18.16.
    Legacy,
}

/// A ClickHouse version such as `18.16.1` or `24.8.4.13`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(ServerVersion { major, minor })
    }

    pub fn flavor(self) -> SchemaFlavor {
        if self
            >= (ServerVersion {
                major: 22,
                minor: 2,
            })
        {
            SchemaFlavor::Modern
        } else {
            SchemaFlavor::Legacy
        }
    }
}

/// Table options that depend on configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaOptions {
    /// Rows older than this (by `timestamp`) are dropped by ClickHouse (modern servers only).
    pub retention_days: Option<u32>,
    /// How many recent insert blocks a table remembers for dedup tokens (modern servers only).
    pub dedup_window: u32,
}

pub fn quote_identifier(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The sorting (and collapsing) key of the events table: the project, the day of the message's
/// stored timestamp (the same for every copy: see the module documentation) and its id. As
/// `system.tables.sorting_key` spells it.
pub const EVENTS_SORTING_KEY: &str = "project_id, toDate(timestamp), message_id";
/// The partition key of the events table, as `system.tables.partition_key` spells it.
pub const EVENTS_PARTITION_KEY: &str = "toYYYYMM(timestamp)";
/// The table that remembers the timestamp each stored message was stored with.
pub const MESSAGE_IDS_TABLE: &str = "message_ids";
/// The table a re-key builds before it takes the place of `events`.
pub const REKEY_TARGET_TABLE: &str = "events_rekeyed";
/// Where the day-keyed table waits while its rows are copied into the re-keyed one.
pub const REKEY_SOURCE_TABLE: &str = "events_before_rekey";

/// The SQL that creates the events table.
pub fn create_events_table(
    database: &str,
    flavor: SchemaFlavor,
    options: &SchemaOptions,
) -> String {
    create_events_table_named(database, "events", flavor, options)
}

/// The SQL that creates an events table named `table`.
pub fn create_events_table_named(
    database: &str,
    table: &str,
    flavor: SchemaFlavor,
    options: &SchemaOptions,
) -> String {
    let db = quote_identifier(database);
    let table = quote_identifier(table);
    let (time, nullable_time, low_cardinality, json_codec, text_codec) = match flavor {
        SchemaFlavor::Modern => (
            "DateTime64(3, 'UTC')",
            "Nullable(DateTime64(3, 'UTC'))",
            "LowCardinality(String)",
            " CODEC(ZSTD(3))",
            " CODEC(ZSTD(1))",
        ),
        SchemaFlavor::Legacy => (
            "DateTime('UTC')",
            "Nullable(DateTime('UTC'))",
            "String",
            "",
            "",
        ),
    };
    let mut sql = String::new();
    let _ = write!(
        sql,
        "CREATE TABLE IF NOT EXISTS {db}.{table} (\n\
         \x20   project_id {low_cardinality},\n\
         \x20   message_id String,\n\
         \x20   type {low_cardinality},\n\
         \x20   event String{text_codec},\n\
         \x20   user_id String,\n\
         \x20   anonymous_id String,\n\
         \x20   group_id String,\n\
         \x20   previous_id String,\n\
         \x20   name String{text_codec},\n\
         \x20   timestamp {time},\n\
         \x20   timestamp_ms Int64,\n\
         \x20   original_timestamp {nullable_time},\n\
         \x20   sent_at {nullable_time},\n\
         \x20   received_at {time},\n\
         \x20   region {low_cardinality},\n\
         \x20   context String{json_codec},\n\
         \x20   properties String{json_codec},\n\
         \x20   traits String{json_codec},\n\
         \x20   library_name {low_cardinality},\n\
         \x20   library_version {low_cardinality},\n\
         \x20   raw String{json_codec},\n\
         \x20   queue_offset UInt64\n\
         ) ENGINE = ReplacingMergeTree\n\
         PARTITION BY {EVENTS_PARTITION_KEY}\n\
         ORDER BY ({EVENTS_SORTING_KEY})"
    );
    if flavor == SchemaFlavor::Modern {
        if let Some(days) = options.retention_days {
            let _ = write!(sql, "\nTTL toDateTime(timestamp) + INTERVAL {days} DAY");
        }
        let _ = write!(
            sql,
            "\nSETTINGS non_replicated_deduplication_window = {}",
            options.dedup_window.max(1)
        );
    }
    sql
}

/// One migration: a version, a description, and its idempotent statements.
pub struct Migration {
    pub version: u32,
    pub description: &'static str,
    pub statements: Vec<String>,
}

/// Every migration, in order. Statements are idempotent so a migration interrupted halfway can run
/// again; 18.16 lacks `ADD COLUMN IF NOT EXISTS`, so later column additions must check
/// `system.columns` first.
pub fn migrations(database: &str, flavor: SchemaFlavor, options: &SchemaOptions) -> Vec<Migration> {
    vec![
        Migration {
            version: 1,
            description: "events table",
            statements: vec![create_events_table(database, flavor, options)],
        },
        Migration {
            version: 2,
            description: "message ids: the stored timestamp of every message",
            statements: vec![create_message_ids_table(database)],
        },
    ]
}

/// The SQL that creates `message_ids`: one row per stored message (a message stored by two nodes
/// at once may get two; readers take the earliest received, `argMax(..., first_seen)`), ordered
/// by its identity so that the sink looks a batch's ids up by the primary key. `first_seen` is
/// `MAX - received_at_ms` so that the row of the copy received first wins a merge. Partitioned by
/// the month a message was received.
pub fn create_message_ids_table(database: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{} (\n\
         \x20   project_id String,\n\
         \x20   message_id String,\n\
         \x20   timestamp_ms Int64,\n\
         \x20   received_at_ms Int64,\n\
         \x20   first_seen UInt64\n\
         ) ENGINE = ReplacingMergeTree(first_seen)\n\
         PARTITION BY toYYYYMM(toDateTime(intDiv(received_at_ms, 1000), 'UTC'))\n\
         ORDER BY (project_id, message_id)",
        quote_identifier(database),
        quote_identifier(MESSAGE_IDS_TABLE)
    )
}

pub fn create_database(database: &str) -> String {
    format!(
        "CREATE DATABASE IF NOT EXISTS {}",
        quote_identifier(database)
    )
}

pub fn create_migrations_table(database: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version UInt32, description String, applied_at DateTime('UTC')) \
         ENGINE = ReplacingMergeTree ORDER BY version",
        quote_identifier(database)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_choose_the_flavor() {
        assert_eq!(
            ServerVersion::parse("18.16.1").unwrap().flavor(),
            SchemaFlavor::Legacy
        );
        assert_eq!(
            ServerVersion::parse("22.1.3.7").unwrap().flavor(),
            SchemaFlavor::Legacy
        );
        assert_eq!(
            ServerVersion::parse("22.2.2.1").unwrap().flavor(),
            SchemaFlavor::Modern
        );
        assert_eq!(
            ServerVersion::parse("24.8.4.13").unwrap().flavor(),
            SchemaFlavor::Modern
        );
        assert_eq!(ServerVersion::parse("nonsense"), None);
    }

    #[test]
    fn the_modern_schema_uses_what_current_clickhouse_offers() {
        let options = SchemaOptions {
            retention_days: Some(400),
            dedup_window: 1000,
        };
        let sql = create_events_table("meridian", SchemaFlavor::Modern, &options);
        assert!(sql.contains("timestamp DateTime64(3, 'UTC')"));
        assert!(sql.contains("sent_at Nullable(DateTime64(3, 'UTC'))"));
        assert!(sql.contains("project_id LowCardinality(String)"));
        assert!(sql.contains("raw String CODEC(ZSTD(3))"));
        assert!(sql.contains("TTL toDateTime(timestamp) + INTERVAL 400 DAY"));
        assert!(sql.contains("SETTINGS non_replicated_deduplication_window = 1000"));
        assert!(sql.contains("ENGINE = ReplacingMergeTree"));
        assert!(sql.contains("PARTITION BY toYYYYMM(timestamp)"));
        assert!(sql.contains("ORDER BY (project_id, toDate(timestamp), message_id)"));
        let without_retention = create_events_table(
            "meridian",
            SchemaFlavor::Modern,
            &SchemaOptions {
                retention_days: None,
                dedup_window: 100,
            },
        );
        assert!(!without_retention.contains("TTL"));
    }

    #[test]
    fn the_legacy_schema_avoids_what_18_16_lacks() {
        let options = SchemaOptions {
            retention_days: Some(30),
            dedup_window: 1000,
        };
        let sql = create_events_table("meridian", SchemaFlavor::Legacy, &options);
        for missing_on_18_16 in [
            "DateTime64",
            "LowCardinality",
            "CODEC",
            "TTL",
            "deduplication",
        ] {
            assert!(
                !sql.contains(missing_on_18_16),
                "{missing_on_18_16} must not appear: {sql}"
            );
        }
        assert!(sql.contains("project_id String,"));
        assert!(sql.contains("timestamp DateTime('UTC')"));
        assert!(sql.contains("timestamp_ms Int64"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("meridian"), "`meridian`");
        assert_eq!(quote_identifier("we`ird"), "`we\\`ird`");
    }
}
