//! The sink: schema preparation, batched inserts with failover among the region's replicas,
//! error classification, bisection of rejected batches, and the dead-letter file.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use clickhouse::{Client, RowOwned, RowWrite};
use meridian_core::ErasureFilter;
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms};
use meridian_queue::{BatchLimits, DeliveryBatch, Record, Sink, SinkError};
use serde_json::json;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{error, info, warn};

use crate::row::{EventFields, LegacyEventRow, ModernEventRow};
use crate::schema::{self, SchemaFlavor, SchemaOptions, ServerVersion};

mod admin;
mod identity;
pub mod insights;
mod replay;
pub use replay::ReplayOutcome;

/// Why asking the warehouse something failed (a deletion, a count, a scan), naming the replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WarehouseError {
    #[error("{url}: {message}")]
    Replica { url: String, message: String },
    #[error("the dead-letter file: {0}")]
    DeadLetters(String),
    #[error("{0}")]
    Other(String),
}

impl WarehouseError {
    pub(crate) fn on(url: &str, message: impl Into<String>) -> WarehouseError {
        WarehouseError::Replica {
            url: url.to_string(),
            message: message.into(),
        }
    }
}

/// One region's ClickHouse settings, built only from that region's config.
#[derive(Clone, Debug)]
pub struct ClickHouseConfig {
    /// This region's replicas; inserts fail over among these only.
    pub urls: Vec<String>,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<meridian_core::Secret>,
    pub batch_max_rows: usize,
    pub batch_max_bytes: usize,
    pub flush_interval: Duration,
    pub request_timeout: Duration,
    pub retention_days: Option<u32>,
    /// Where rows ClickHouse rejects are written, with the reason.
    pub dead_letter_dir: PathBuf,
    /// Bytes the dead-letter file may hold. A batch whose rejected rows do not fit fails and
    /// stays queued (its good rows were stored; the retry collapses them), so a flood of bad rows
    /// cannot fill the volume; `meridian_sink_dead_letter_bytes` shows the level.
    pub dead_letter_budget_bytes: u64,
}

/// What `meridian migrate` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationReport {
    pub url: String,
    pub server_version: String,
    pub flavor: SchemaFlavor,
    pub applied: Vec<u32>,
}

/// How an insert failed.
#[derive(Debug)]
enum InsertFailure {
    /// The replica could not be reached or did not answer in time: try another replica.
    Unreachable(String),
    /// The server is overloaded or failed in a way worth retrying later.
    Transient(String),
    /// The table or database is missing or has other columns: migrate, then retry.
    Schema(String),
    /// The server rejected the data itself: isolate the rows it rejects.
    Data(String),
}

/// ClickHouse exception codes whose cause is the inserted data.
const DATA_ERROR_CODES: &[u32] = &[6, 26, 38, 41, 53, 69, 70, 72, 117, 131, 395];
/// Codes that mean the schema is not what we insert into. 27 (CANNOT_PARSE_INPUT_ASSERTION_FAILED)
/// and 33 (CANNOT_READ_ALL_DATA) are here, not with the data errors: we write RowBinary from typed
/// rows, so they mean the table's columns differ from ours, or the body arrived cut short (a
/// transport failure). Both are retried after a re-migration; neither may dead-letter good rows.
const SCHEMA_ERROR_CODES: &[u32] = &[16, 27, 33, 47, 60, 81];

fn exception_code(message: &str) -> Option<u32> {
    let start = message.find("Code: ")? + "Code: ".len();
    let digits: String = message[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn classify(failure: clickhouse::error::Error) -> InsertFailure {
    match failure {
        clickhouse::error::Error::Network(cause) => {
            InsertFailure::Unreachable(format!("network error: {cause}"))
        }
        clickhouse::error::Error::TimedOut => InsertFailure::Unreachable("timed out".to_string()),
        clickhouse::error::Error::BadResponse(message) => match exception_code(&message) {
            Some(code) if DATA_ERROR_CODES.contains(&code) => InsertFailure::Data(message),
            Some(code) if SCHEMA_ERROR_CODES.contains(&code) => InsertFailure::Schema(message),
            _ => InsertFailure::Transient(message),
        },
        // Serializing our own row failed: the row is the problem.
        clickhouse::error::Error::Custom(message) => InsertFailure::Data(message),
        other => InsertFailure::Transient(other.to_string()),
    }
}

struct Replica {
    url: String,
    /// Without a default database, for DDL on a server where the database may not exist yet.
    admin: Client,
    /// With the configured database, for inserts.
    writer: Client,
}

#[derive(Default)]
struct Counters {
    rows_inserted: AtomicU64,
    inserts: AtomicU64,
    failovers: AtomicU64,
    dead_lettered: AtomicU64,
    bisections: AtomicU64,
    erased: AtomicU64,
}

pub struct ClickHouseSink {
    erasures: Arc<dyn ErasureFilter>,
    region: String,
    config: ClickHouseConfig,
    replicas: Vec<Replica>,
    current_replica: AtomicUsize,
    flavor: AsyncMutex<Option<SchemaFlavor>>,
    counters: Counters,
    dead_letter_lock: Arc<Mutex<()>>,
}

/// Rows of one server flavor, each with its queue offset.
enum Rows {
    Legacy(Vec<(u64, LegacyEventRow)>),
    Modern(Vec<(u64, ModernEventRow)>),
}

impl Rows {
    fn is_empty(&self) -> bool {
        match self {
            Rows::Legacy(rows) => rows.is_empty(),
            Rows::Modern(rows) => rows.is_empty(),
        }
    }
}

impl ClickHouseSink {
    pub fn new(
        region: &str,
        config: ClickHouseConfig,
        erasures: Arc<dyn ErasureFilter>,
    ) -> ClickHouseSink {
        let replicas = config
            .urls
            .iter()
            .map(|url| {
                let mut admin = Client::default()
                    .with_url(url.clone())
                    .with_validation(false);
                if let Some(user) = &config.user {
                    admin = admin.with_user(user.clone());
                }
                if let Some(password) = &config.password {
                    admin = admin.with_password(password.expose().to_string());
                }
                let writer = admin.clone().with_database(config.database.clone());
                Replica {
                    url: url.clone(),
                    admin,
                    writer,
                }
            })
            .collect();
        ClickHouseSink {
            erasures,
            region: region.to_string(),
            config,
            replicas,
            current_replica: AtomicUsize::new(0),
            flavor: AsyncMutex::new(None),
            counters: Counters::default(),
            dead_letter_lock: Arc::new(Mutex::new(())),
        }
    }

    fn schema_options(&self) -> SchemaOptions {
        SchemaOptions {
            retention_days: self.config.retention_days,
            dedup_window: 10_000,
        }
    }

    async fn with_timeout<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, clickhouse::error::Error> {
        tokio::time::timeout(self.config.request_timeout, work)
            .await
            .unwrap_or(Err(clickhouse::error::Error::TimedOut))
    }

    /// Creates the database, the migrations table and every missing migration on one replica.
    async fn migrate_replica(
        &self,
        replica: &Replica,
    ) -> Result<MigrationReport, clickhouse::error::Error> {
        let version_text: String = self
            .with_timeout(
                replica
                    .admin
                    .query("SELECT version()")
                    .fetch_one::<String>(),
            )
            .await?;
        let flavor = ServerVersion::parse(&version_text)
            .map(ServerVersion::flavor)
            .unwrap_or(SchemaFlavor::Legacy);
        let database = &self.config.database;
        self.with_timeout(
            replica
                .admin
                .query(&schema::create_database(database))
                .execute(),
        )
        .await?;
        self.with_timeout(
            replica
                .admin
                .query(&schema::create_migrations_table(database))
                .execute(),
        )
        .await?;
        let applied_sql = format!(
            "SELECT DISTINCT version FROM {}.schema_migrations",
            schema::quote_identifier(database)
        );
        let already: Vec<u32> = self
            .with_timeout(replica.admin.query(&applied_sql).fetch_all::<u32>())
            .await?;
        let mut applied = Vec::new();
        for migration in schema::migrations(database, flavor, &self.schema_options()) {
            if already.contains(&migration.version) {
                continue;
            }
            for statement in &migration.statements {
                self.with_timeout(replica.admin.query(statement).execute())
                    .await?;
            }
            let record = format!(
                "INSERT INTO {}.schema_migrations (version, description, applied_at) VALUES ({}, '{}', now())",
                schema::quote_identifier(database),
                migration.version,
                migration.description.replace('\'', "")
            );
            self.with_timeout(replica.admin.query(&record).execute())
                .await?;
            info!(region = %self.region, url = %replica.url, version = migration.version, description = migration.description, "clickhouse migration applied");
            applied.push(migration.version);
        }
        // Tables of earlier versions are keyed by day: bring them to the current key.
        let copy_timeout = self.config.request_timeout.max(Duration::from_secs(3600));
        let rekeyed = crate::rekey::rekey_events(
            &replica.admin,
            database,
            flavor,
            &self.schema_options(),
            self.config.request_timeout,
            copy_timeout,
        )
        .await?;
        if rekeyed {
            info!(region = %self.region, url = %replica.url, "clickhouse events table re-keyed time first (project_id, toDate(timestamp), message_id)");
        }
        Ok(MigrationReport {
            url: replica.url.clone(),
            server_version: version_text,
            flavor,
            applied,
        })
    }

    /// The schema flavor, preparing the schema on first use (and after schema errors).
    async fn ensure_schema(&self) -> Result<SchemaFlavor, SinkError> {
        let mut flavor = self.flavor.lock().await;
        if let Some(known) = *flavor {
            return Ok(known);
        }
        let mut failures = Vec::new();
        for attempt in 0..self.replicas.len() {
            let index =
                (self.current_replica.load(Ordering::Relaxed) + attempt) % self.replicas.len();
            let replica = &self.replicas[index];
            match self.migrate_replica(replica).await {
                Ok(report) => {
                    info!(region = %self.region, url = %report.url, server_version = %report.server_version, flavor = ?report.flavor, "clickhouse schema ready");
                    *flavor = Some(report.flavor);
                    return Ok(report.flavor);
                }
                Err(error) => failures.push(format!("{}: {error}", replica.url)),
            }
        }
        Err(SinkError::Transient(format!(
            "no ClickHouse replica of region {} could be prepared: {}",
            self.region,
            failures.join("; ")
        )))
    }

    async fn insert_rows<R: RowOwned + RowWrite>(
        &self,
        client: &Client,
        rows: &[(u64, R)],
        dedup_token: Option<&str>,
    ) -> Result<(), clickhouse::error::Error> {
        let timeout = Some(self.config.request_timeout);
        let mut insert = client
            .insert::<R>("events")
            .await?
            .with_timeouts(timeout, timeout);
        if let Some(token) = dedup_token {
            // Only current servers take tokens; they also refuse a block spanning more than
            // `max_partitions_per_insert_block` months by default, and a batch of old offline
            // events may.
            insert = insert
                .with_setting("insert_deduplication_token", token)
                .with_setting("max_partitions_per_insert_block", "0");
        }
        for (_, row) in rows {
            insert.write(row).await?;
        }
        insert.end().await
    }

    /// Inserts rows on the current replica, failing over to the region's next replica when one
    /// cannot be reached. Never leaves the region's replica list.
    async fn insert_with_failover(
        &self,
        rows: &Rows,
        range: (usize, usize),
        dedup_token: Option<&str>,
    ) -> Result<(), InsertFailure> {
        let mut unreachable = Vec::new();
        for _ in 0..self.replicas.len() {
            let index = self.current_replica.load(Ordering::Relaxed) % self.replicas.len();
            let replica = &self.replicas[index];
            let outcome = match rows {
                Rows::Legacy(rows) => {
                    self.insert_rows(&replica.writer, &rows[range.0..range.1], dedup_token)
                        .await
                }
                Rows::Modern(rows) => {
                    self.insert_rows(&replica.writer, &rows[range.0..range.1], dedup_token)
                        .await
                }
            };
            match outcome.map_err(classify) {
                Ok(()) => return Ok(()),
                Err(InsertFailure::Unreachable(reason)) => {
                    self.fail_over_from(index, &reason);
                    unreachable.push(format!("{}: {reason}", replica.url));
                }
                Err(other) => return Err(other),
            }
        }
        Err(InsertFailure::Transient(format!(
            "every ClickHouse replica of region {} is unreachable: {}",
            self.region,
            unreachable.join("; ")
        )))
    }

    /// Moves on from the replica at `index`, which could not be reached, to the region's next.
    fn fail_over_from(&self, index: usize, reason: &str) {
        let next = (index + 1) % self.replicas.len();
        if self.replicas.len() > 1 {
            self.counters.failovers.fetch_add(1, Ordering::Relaxed);
            warn!(region = %self.region, from = %self.replicas[index].url, to = %self.replicas[next].url, %reason, "clickhouse replica unreachable; failing over within the region");
        }
        self.current_replica.store(next, Ordering::Relaxed);
    }

    fn offsets_of(rows: &Rows, range: (usize, usize)) -> (u64, u64) {
        let offset_at = |index: usize| match rows {
            Rows::Legacy(rows) => rows[index].0,
            Rows::Modern(rows) => rows[index].0,
        };
        (offset_at(range.0), offset_at(range.1 - 1) + 1)
    }

    /// Inserts all rows; a range ClickHouse rejects for its data is split in halves until the
    /// rejected rows are isolated, which go to `dead`. `source` names the queue the rows' offsets
    /// belong to (its incarnation).
    async fn store(
        &self,
        source: &str,
        rows: &Rows,
        flavor: SchemaFlavor,
        dead: &mut Vec<(u64, String)>,
    ) -> Result<(), SinkError> {
        let total = match rows {
            Rows::Legacy(rows) => rows.len(),
            Rows::Modern(rows) => rows.len(),
        };
        let mut pending = vec![(0usize, total)];
        while let Some((start, end)) = pending.pop() {
            if start >= end {
                continue;
            }
            let (first_offset, end_offset) = Self::offsets_of(rows, (start, end));
            let token = dedup_token(&self.region, source, first_offset, end_offset);
            let dedup_token = (flavor == SchemaFlavor::Modern).then_some(token.as_str());
            match self
                .insert_with_failover(rows, (start, end), dedup_token)
                .await
            {
                Ok(()) => {
                    self.counters.inserts.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .rows_inserted
                        .fetch_add((end - start) as u64, Ordering::Relaxed);
                }
                Err(InsertFailure::Data(reason)) if end - start == 1 => {
                    dead.push((first_offset, reason))
                }
                Err(InsertFailure::Data(reason)) => {
                    self.counters.bisections.fetch_add(1, Ordering::Relaxed);
                    warn!(region = %self.region, first_offset, end_offset, %reason, "clickhouse rejected a batch's data; isolating the rejected rows");
                    let middle = start + (end - start) / 2;
                    pending.push((middle, end));
                    pending.push((start, middle));
                }
                Err(InsertFailure::Schema(reason)) => {
                    // Prepare the schema again (it may have been dropped), then retry the batch.
                    *self.flavor.lock().await = None;
                    return Err(SinkError::Transient(format!(
                        "clickhouse schema problem in region {}: {reason}",
                        self.region
                    )));
                }
                Err(InsertFailure::Transient(reason)) | Err(InsertFailure::Unreachable(reason)) => {
                    return Err(SinkError::Transient(reason));
                }
            }
        }
        Ok(())
    }

    fn dead_letter_path(&self) -> PathBuf {
        self.config.dead_letter_dir.join("clickhouse.ndjson")
    }

    /// Removes the dead-lettered messages of `user_ids` of `project_id` from the region's
    /// dead-letter file (a GDPR deletion: the file holds whole messages). The file is rewritten
    /// beside itself and renamed into place, durably; running it twice removes nothing more.
    /// Returns how many messages were removed.
    pub async fn erase_dead_letters(
        &self,
        project_id: &str,
        user_ids: &[String],
    ) -> Result<u64, WarehouseError> {
        let path = self.dead_letter_path();
        let lock = Arc::clone(&self.dead_letter_lock);
        let project_id = project_id.to_string();
        let users: std::collections::HashSet<String> = user_ids.iter().cloned().collect();
        tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let text = match std::fs::read(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(error) => return Err(error),
            };
            let mut kept = Vec::with_capacity(text.len());
            let mut removed = 0u64;
            for line in text
                .split(|byte| *byte == b'\n')
                .filter(|line| !line.is_empty())
            {
                if dead_letter_names_user(line, &project_id, &users) {
                    removed += 1;
                    continue;
                }
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
            if removed == 0 {
                return Ok(0);
            }
            let temporary = path.with_extension("ndjson.tmp");
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&kept)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            if let Some(parent) = path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(removed)
        })
        .await
        .map_err(|error| WarehouseError::DeadLetters(format!("the eraser panicked: {error}")))?
        .map_err(|error| {
            WarehouseError::DeadLetters(format!(
                "cannot rewrite {}: {error}",
                self.dead_letter_path().display()
            ))
        })
    }

    /// Appends rejected messages, with their reasons, to the region's dead-letter file (fsynced).
    async fn write_dead_letters(
        &self,
        dead: Vec<(u64, String)>,
        records: Arc<Vec<Record>>,
    ) -> Result<(), SinkError> {
        if dead.is_empty() {
            return Ok(());
        }
        let path = self.dead_letter_path();
        let lock = Arc::clone(&self.dead_letter_lock);
        let region = self.region.clone();
        let count = dead.len() as u64;
        let budget_bytes = self.config.dead_letter_budget_bytes;
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(parent) = path.parent() {
                meridian_queue::create_dir_all_durably(parent)?;
            }
            let first_offset = records.first().map(|record| record.offset).unwrap_or(0);
            let mut lines = Vec::new();
            for (offset, reason) in &dead {
                let payload = records
                    .get((offset - first_offset) as usize)
                    .map(|record| String::from_utf8_lossy(&record.payload).into_owned())
                    .unwrap_or_default();
                let line = json!({
                    "region": region, "sink": "clickhouse", "offset": offset,
                    "dead_lettered_at": format_rfc3339_ms(now_unix_ms()), "reason": reason, "message": payload,
                });
                lines.extend_from_slice(line.to_string().as_bytes());
                lines.push(b'\n');
            }
            let used_bytes = std::fs::metadata(&path).map(|metadata| metadata.len()).unwrap_or(0);
            if used_bytes + lines.len() as u64 > budget_bytes {
                return Err(std::io::Error::other(format!(
                    "the dead-letter file is full ({used_bytes} of its {budget_bytes} bytes; {} more needed): the batch stays queued until it is emptied or the budget raised",
                    lines.len()
                )));
            }
            let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
            file.write_all(&lines)?;
            file.sync_all()
        })
        .await
        .map_err(|error| SinkError::Transient(format!("dead-letter writer panicked: {error}")))?;
        written.map_err(|error| {
            SinkError::Transient(format!(
                "cannot write the dead-letter file {}: {error}",
                self.dead_letter_path().display()
            ))
        })?;
        self.counters
            .dead_lettered
            .fetch_add(count, Ordering::Relaxed);
        error!(region = %self.region, rows = count, path = %self.dead_letter_path().display(), "clickhouse rejected rows; they are in the dead-letter file with the reason");
        Ok(())
    }
}

fn build_rows(
    records: &[Record],
    flavor: SchemaFlavor,
    erasures: &dyn ErasureFilter,
    dead: &mut Vec<(u64, String)>,
) -> (Rows, u64) {
    let mut legacy = Vec::new();
    let mut modern = Vec::new();
    let mut erased = 0;
    for record in records {
        match EventFields::from_stored(&record.payload, record.offset) {
            Ok(fields)
                if !fields.user_id.is_empty()
                    && erasures.is_erased(
                        &fields.project_id,
                        &fields.user_id,
                        fields.received_at_ms,
                    ) =>
            {
                erased += 1;
            }
            Ok(fields) => match flavor {
                SchemaFlavor::Legacy => {
                    legacy.push((record.offset, LegacyEventRow::from_fields(fields)))
                }
                SchemaFlavor::Modern => {
                    modern.push((record.offset, ModernEventRow::from_fields(fields)))
                }
            },
            Err(reason) => dead.push((record.offset, reason.to_string())),
        }
    }
    let rows = match flavor {
        SchemaFlavor::Legacy => Rows::Legacy(legacy),
        SchemaFlavor::Modern => Rows::Modern(modern),
    };
    (rows, erased)
}

/// True when a dead-letter line holds a message of one of `users` in `project_id`. A line that
/// cannot be read is kept (it names nobody we can tell).
fn dead_letter_names_user(
    line: &[u8],
    project_id: &str,
    users: &std::collections::HashSet<String>,
) -> bool {
    let Ok(entry) = serde_json::from_slice::<serde_json::Value>(line) else {
        return false;
    };
    let Some(message) = entry.get("message").and_then(|message| message.as_str()) else {
        return false;
    };
    let Ok(message) = serde_json::from_str::<serde_json::Value>(message) else {
        return false;
    };
    let user = match message.get("userId") {
        Some(serde_json::Value::String(user)) => user.clone(),
        Some(serde_json::Value::Number(user)) => user.to_string(),
        _ => return false,
    };
    message
        .get("projectId")
        .and_then(|project| project.as_str())
        == Some(project_id)
        && users.contains(&user)
}

/// The insert dedup token of the rows at offsets `[first_offset, end_offset)` of queue `source`:
/// unique across every node of the region and every life of its queues (offsets alone repeat),
/// and the same when the same rows are retried, so a current ClickHouse drops only true retries.
pub fn dedup_token(region: &str, source: &str, first_offset: u64, end_offset: u64) -> String {
    format!("meridian:{region}:{source}:{first_offset}-{end_offset}")
}

#[async_trait]
impl Sink for ClickHouseSink {
    fn name(&self) -> &str {
        "clickhouse"
    }

    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_records: self.config.batch_max_rows,
            max_bytes: self.config.batch_max_bytes,
            max_age: self.config.flush_interval,
        }
    }

    async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
        if self.replicas.is_empty() {
            return Err(SinkError::Blocked(format!(
                "region {} has no ClickHouse urls",
                self.region
            )));
        }
        let flavor = self.ensure_schema().await?;
        let records = Arc::clone(&batch.records);
        let erasures = Arc::clone(&self.erasures);
        let (mut rows, erased, mut dead) = tokio::task::spawn_blocking(move || {
            let mut dead = Vec::new();
            let (rows, erased) = build_rows(&records, flavor, erasures.as_ref(), &mut dead);
            (rows, erased, dead)
        })
        .await
        .map_err(|error| SinkError::Transient(format!("row builder panicked: {error}")))?;
        self.counters.erased.fetch_add(erased, Ordering::Relaxed);
        if rows.is_empty() {
            return self
                .write_dead_letters(dead, Arc::clone(&batch.records))
                .await;
        }
        let known = self.known_timestamps(&rows).await?;
        let records = rows.give_stored_timestamps(&known);
        self.store(&batch.source, &rows, flavor, &mut dead).await?;
        dead.sort_by_key(|(offset, _)| *offset);
        let stored_records: Vec<_> = records
            .into_iter()
            .filter(|(offset, _)| {
                dead.binary_search_by_key(offset, |(dead_offset, _)| *dead_offset)
                    .is_err()
            })
            .map(|(_, record)| record)
            .collect();
        self.record_message_ids(&stored_records).await?;
        self.write_dead_letters(dead, Arc::clone(&batch.records))
            .await
    }

    fn gauges(&self) -> Vec<(&'static str, u64)> {
        let used_bytes = std::fs::metadata(self.dead_letter_path())
            .map(|metadata| metadata.len())
            .unwrap_or(0);
        vec![
            ("dead_letter_bytes", used_bytes),
            (
                "dead_letter_budget_bytes",
                self.config.dead_letter_budget_bytes,
            ),
        ]
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            (
                "clickhouse_rows_inserted",
                self.counters.rows_inserted.load(Ordering::Relaxed),
            ),
            (
                "clickhouse_inserts",
                self.counters.inserts.load(Ordering::Relaxed),
            ),
            (
                "clickhouse_failovers",
                self.counters.failovers.load(Ordering::Relaxed),
            ),
            (
                "clickhouse_dead_lettered_rows",
                self.counters.dead_lettered.load(Ordering::Relaxed),
            ),
            (
                "clickhouse_bisections",
                self.counters.bisections.load(Ordering::Relaxed),
            ),
            (
                "erased_messages",
                self.counters.erased.load(Ordering::Relaxed),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::admin::chunk_user_ids;
    use super::*;

    #[test]
    fn dead_letter_lines_are_matched_by_project_and_user_only() {
        let users: std::collections::HashSet<String> =
            ["alice".to_string(), "42".to_string()].into();
        let line = |project: &str, user: serde_json::Value| {
            serde_json::json!({"reason": "x", "message": serde_json::json!({"projectId": project, "userId": user}).to_string()})
                .to_string()
        };
        assert!(dead_letter_names_user(
            line("p1", "alice".into()).as_bytes(),
            "p1",
            &users
        ));
        assert!(dead_letter_names_user(
            line("p1", 42.into()).as_bytes(),
            "p1",
            &users
        ));
        assert!(!dead_letter_names_user(
            line("p2", "alice".into()).as_bytes(),
            "p1",
            &users
        ));
        assert!(!dead_letter_names_user(
            line("p1", "bob".into()).as_bytes(),
            "p1",
            &users
        ));
        assert!(
            !dead_letter_names_user(b"not json", "p1", &users),
            "unreadable lines are kept"
        );
    }

    #[test]
    fn truncated_bodies_and_column_mismatches_are_retried_not_dead_lettered() {
        let answer = |code: u32, text: &str| {
            classify(clickhouse::error::Error::BadResponse(format!(
                "Code: {code}. DB::Exception: {text}"
            )))
        };
        assert!(matches!(
            answer(
                33,
                "Cannot read all data. Bytes read: 12. Bytes expected: 40."
            ),
            InsertFailure::Schema(_)
        ));
        assert!(matches!(
            answer(27, "Cannot parse input: expected '\\t' before: ..."),
            InsertFailure::Schema(_)
        ));
        assert!(matches!(
            answer(6, "Cannot parse string 'x' as UInt64"),
            InsertFailure::Data(_)
        ));
        assert!(matches!(
            answer(60, "Table meridian.events doesn't exist."),
            InsertFailure::Schema(_)
        ));
        assert!(matches!(
            answer(202, "Too many simultaneous queries."),
            InsertFailure::Transient(_)
        ));
    }

    #[test]
    fn dedup_tokens_name_the_queue_as_well_as_the_offsets() {
        let node_a = dedup_token("eu-west-1", "q0000000000000000000000000000000a", 0, 25);
        let node_b = dedup_token("eu-west-1", "q0000000000000000000000000000000b", 0, 25);
        assert_ne!(
            node_a, node_b,
            "two nodes' first batches are different rows"
        );
        assert_eq!(
            node_a,
            dedup_token("eu-west-1", "q0000000000000000000000000000000a", 0, 25),
            "a retry of the same range carries the same token"
        );
    }

    #[test]
    fn user_id_chunks_stay_small_and_cover_everyone() {
        let users: Vec<String> = (0..5000).map(|index| format!("{index:0>100}")).collect();
        let chunks = chunk_user_ids(&users);
        assert!(chunks.len() > 1);
        assert_eq!(chunks.iter().map(|chunk| chunk.len()).sum::<usize>(), 5000);
        assert!(
            chunks
                .iter()
                .all(|chunk| chunk.iter().map(|user| user.len() + 8).sum::<usize>() <= 64 * 1024)
        );
        assert_eq!(chunk_user_ids(&[]).len(), 0);
    }

    #[test]
    fn exception_codes_classify_failures() {
        let data = "Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero";
        assert_eq!(exception_code(data), Some(395));
        assert!(matches!(
            classify(clickhouse::error::Error::BadResponse(data.into())),
            InsertFailure::Data(_)
        ));
        let parts = "Code: 252, e.displayText() = DB::Exception: Too many parts (300)";
        assert!(matches!(
            classify(clickhouse::error::Error::BadResponse(parts.into())),
            InsertFailure::Transient(_)
        ));
        let missing =
            "Code: 60, e.displayText() = DB::Exception: Table meridian.events doesn't exist.";
        assert!(matches!(
            classify(clickhouse::error::Error::BadResponse(missing.into())),
            InsertFailure::Schema(_)
        ));
        assert!(matches!(
            classify(clickhouse::error::Error::TimedOut),
            InsertFailure::Unreachable(_)
        ));
        assert!(matches!(
            classify(clickhouse::error::Error::BadResponse(
                "502 Bad Gateway".into()
            )),
            InsertFailure::Transient(_)
        ));
    }
}
