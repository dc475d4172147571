//! Insights: a project's events over time and its most frequent events, by event time
//! (`timestamp`, UTC), from the region's warehouse. Each question names its time range twice —
//! on `timestamp` (the partition's months, and the exact bounds) and on `toDate(timestamp)` (the
//! sorting key's day, which 18.16 cannot derive from a condition on `timestamp`) — so that it
//! reads the range, not the project's history. Every question is bounded: ClickHouse refuses
//! (before reading) one whose selected ranges hold more than `max_rows_to_read` rows, and stops
//! one that runs past `max_execution_time`. Messages are counted by distinct id, not with
//! `FINAL`: every copy of a message has the same id, time, event and user, and 18.16 does not
//! enforce `max_rows_to_read` on a `FINAL` read.

use clickhouse::Row;
use serde::Deserialize;

use super::{ClickHouseSink, exception_code};
use crate::schema;

/// The time buckets of a volume series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interval {
    Day,
    Hour,
}

impl Interval {
    pub fn parse(text: &str) -> Option<Interval> {
        match text {
            "day" => Some(Interval::Day),
            "hour" => Some(Interval::Hour),
            _ => None,
        }
    }

    pub fn millis(self) -> i64 {
        match self {
            Interval::Day => 86_400_000,
            Interval::Hour => 3_600_000,
        }
    }

    fn bucket(self) -> &'static str {
        match self {
            Interval::Day => "toStartOfDay(timestamp)",
            Interval::Hour => "toStartOfHour(timestamp)",
        }
    }
}

/// A question: one project, event times in `[from_ms, to_ms)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InsightsRange {
    pub project_id: String,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// One bucket of a volume series.
#[derive(Clone, Debug, PartialEq, Eq, Row, Deserialize)]
pub struct VolumePoint {
    /// The bucket's start, unix seconds (UTC).
    pub start_seconds: u32,
    pub events: u64,
    pub users: u64,
}

/// One event name of the top events.
#[derive(Clone, Debug, PartialEq, Eq, Row, Deserialize)]
pub struct EventTotal {
    pub event: String,
    pub events: u64,
    pub users: u64,
}

/// Why a question got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InsightsError {
    #[error(
        "the question would read more than {max_rows} rows of the warehouse: ask for a shorter range"
    )]
    TooMuchData { max_rows: u64 },
    #[error("the question ran past {seconds} s in the warehouse: ask for a shorter range")]
    TooSlow { seconds: u64 },
    #[error("the region has no warehouse")]
    NoWarehouse,
    #[error("the warehouse could not answer: {0}")]
    Unavailable(String),
}

/// How much one question may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InsightsLimits {
    pub max_rows_to_read: u64,
    pub max_execution_seconds: u64,
}

fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The condition that selects the range's rows of the project (see the module documentation).
fn range_condition(range: &InsightsRange) -> String {
    let from_seconds = range.from_ms.div_euclid(1000);
    // The last second that holds a time before `to_ms`.
    let last_seconds = (range.to_ms - 1).div_euclid(1000);
    format!(
        "project_id = {project} \
         AND toDate(timestamp) >= toDate(toDateTime({from_seconds}, 'UTC')) \
         AND toDate(timestamp) <= toDate(toDateTime({last_seconds}, 'UTC')) \
         AND timestamp >= toDateTime({from_seconds}, 'UTC') \
         AND timestamp <= toDateTime({last_seconds}, 'UTC') \
         AND timestamp_ms >= {from_ms} AND timestamp_ms < {to_ms}",
        project = string_literal(&range.project_id),
        from_ms = range.from_ms,
        to_ms = range.to_ms,
    )
}

/// Messages, each once however many copies are stored.
const MESSAGES: &str = "toUInt64(uniqExact(message_id))";

/// Who a row counts as: its user id, else its anonymous id.
const USER_KEY: &str =
    "toUInt64(uniqExact(if(user_id != '', concat('u:', user_id), concat('a:', anonymous_id))))";

/// The SQL of a volume series (one row per non-empty bucket, oldest first).
pub fn volume_sql(database: &str, range: &InsightsRange, interval: Interval) -> String {
    format!(
        "SELECT toUInt32(toUnixTimestamp({bucket})) AS start_seconds, {MESSAGES} AS events, {USER_KEY} AS users \
         FROM {database}.events WHERE {condition} \
         GROUP BY start_seconds ORDER BY start_seconds",
        bucket = interval.bucket(),
        database = schema::quote_identifier(database),
        condition = range_condition(range),
    )
}

/// The SQL of the top `limit` track events (most frequent first, then by name).
pub fn top_events_sql(database: &str, range: &InsightsRange, limit: u32) -> String {
    format!(
        "SELECT event, {MESSAGES} AS events, {USER_KEY} AS users \
         FROM {database}.events WHERE {condition} AND type = 'track' \
         GROUP BY event ORDER BY events DESC, event LIMIT {limit}",
        database = schema::quote_identifier(database),
        condition = range_condition(range),
    )
}

impl ClickHouseSink {
    /// Events and users per bucket of `interval` in the range.
    pub async fn volume(
        &self,
        range: &InsightsRange,
        interval: Interval,
        limits: InsightsLimits,
    ) -> Result<Vec<VolumePoint>, InsightsError> {
        self.ask(&volume_sql(&self.config.database, range, interval), limits)
            .await
    }

    /// The most frequent track events in the range, with their users.
    pub async fn top_events(
        &self,
        range: &InsightsRange,
        limit: u32,
        limits: InsightsLimits,
    ) -> Result<Vec<EventTotal>, InsightsError> {
        self.ask(&top_events_sql(&self.config.database, range, limit), limits)
            .await
    }

    /// Runs a question on the first replica that answers.
    async fn ask<T>(&self, sql: &str, limits: InsightsLimits) -> Result<Vec<T>, InsightsError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        if self.replicas.is_empty() {
            return Err(InsightsError::NoWarehouse);
        }
        let mut failures = Vec::new();
        for replica in &self.replicas {
            let query = replica
                .admin
                .query(sql)
                .with_setting("max_rows_to_read", limits.max_rows_to_read.to_string())
                .with_setting("read_overflow_mode", "throw")
                .with_setting(
                    "max_execution_time",
                    limits.max_execution_seconds.to_string(),
                )
                .with_setting("timeout_overflow_mode", "throw");
            let deadline = std::time::Duration::from_secs(limits.max_execution_seconds + 5);
            let answer = tokio::time::timeout(deadline, query.fetch_all::<T>())
                .await
                .unwrap_or(Err(clickhouse::error::Error::TimedOut));
            match answer {
                Ok(rows) => return Ok(rows),
                Err(clickhouse::error::Error::BadResponse(message)) => {
                    match exception_code(&message) {
                        // TOO_MANY_ROWS (158), TOO_MANY_ROWS_OR_BYTES (396)
                        Some(158) | Some(396) => {
                            return Err(InsightsError::TooMuchData {
                                max_rows: limits.max_rows_to_read,
                            });
                        }
                        // TIMEOUT_EXCEEDED
                        Some(159) => {
                            return Err(InsightsError::TooSlow {
                                seconds: limits.max_execution_seconds,
                            });
                        }
                        _ => failures.push(format!("{}: {message}", replica.url)),
                    }
                }
                Err(error) => failures.push(format!("{}: {error}", replica.url)),
            }
        }
        Err(InsightsError::Unavailable(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_names_its_range_on_the_partition_the_key_and_the_exact_times() {
        let range = InsightsRange {
            project_id: "prj_o'k".to_string(),
            from_ms: 1_767_225_600_000,
            to_ms: 1_767_312_000_000,
        };
        let sql = volume_sql("meridian", &range, Interval::Day);
        assert!(sql.contains("project_id = 'prj_o\\'k'"), "{sql}");
        assert!(sql.contains("toDate(timestamp) >= toDate(toDateTime(1767225600, 'UTC'))"));
        assert!(sql.contains("toDate(timestamp) <= toDate(toDateTime(1767311999, 'UTC'))"));
        assert!(sql.contains("timestamp_ms >= 1767225600000 AND timestamp_ms < 1767312000000"));
        assert!(sql.contains("toStartOfDay(timestamp)"));
        let top = top_events_sql("meridian", &range, 7);
        assert!(top.ends_with("LIMIT 7"));
        assert!(top.contains("type = 'track'"));
    }
}
