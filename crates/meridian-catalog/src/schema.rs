//! Versioned catalog migrations, in SQL that SQLite and PostgreSQL both accept. Each version runs
//! once, in a transaction, and is recorded in `schema_migrations`.

use sqlx::{AnyPool, Row};
use tracing::info;

use crate::error::CatalogError;
use crate::keyed_hash::{CatalogKey, is_user_hash};

pub(crate) const MIGRATIONS: &[(i64, &str, &[&str])] = &[
    (
        1,
        "orgs, projects, write keys, suppressions, audit log",
        &[
            "CREATE TABLE IF NOT EXISTS catalog_state (
            id BIGINT PRIMARY KEY,
            version BIGINT NOT NULL,
            audit_seq BIGINT NOT NULL,
            audit_head_hash TEXT NOT NULL
        )",
            "INSERT INTO catalog_state (id, version, audit_seq, audit_head_hash)
            VALUES (1, 0, 0, '') ON CONFLICT (id) DO NOTHING",
            "CREATE TABLE IF NOT EXISTS orgs (
            org_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            primary_region TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL
        )",
            "CREATE TABLE IF NOT EXISTS projects (
            project_id TEXT PRIMARY KEY,
            org_id TEXT NOT NULL,
            name TEXT NOT NULL,
            region TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            storage_json TEXT
        )",
            "CREATE INDEX IF NOT EXISTS projects_by_org ON projects (org_id, project_id)",
            "CREATE TABLE IF NOT EXISTS write_keys (
            key_hash TEXT PRIMARY KEY,
            project_id TEXT NOT NULL,
            prefix TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            expires_at_ms BIGINT
        )",
            "CREATE INDEX IF NOT EXISTS write_keys_by_project ON write_keys (project_id)",
            "CREATE TABLE IF NOT EXISTS suppressions (
            project_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            PRIMARY KEY (project_id, user_id)
        )",
            "CREATE TABLE IF NOT EXISTS audit_log (
            seq BIGINT PRIMARY KEY,
            org_id TEXT NOT NULL,
            at_ms BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            before_json TEXT,
            after_json TEXT,
            request_id TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )",
            "CREATE INDEX IF NOT EXISTS audit_log_by_org ON audit_log (org_id, seq)",
        ],
    ),
    (
        2,
        "region migrations",
        &[
            "CREATE TABLE IF NOT EXISTS region_migrations (
                migration_id TEXT PRIMARY KEY,
                org_id TEXT NOT NULL,
                source_project TEXT NOT NULL,
                target_project TEXT NOT NULL,
                source_region TEXT NOT NULL,
                target_region TEXT NOT NULL,
                status TEXT NOT NULL,
                error TEXT,
                created_at_ms BIGINT NOT NULL,
                updated_at_ms BIGINT NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS region_migrations_by_org ON region_migrations (org_id, status)",
        ],
    ),
    (
        3,
        "gdpr deletions",
        &[
            "CREATE TABLE IF NOT EXISTS deletions (
                deletion_id TEXT PRIMARY KEY,
                org_id TEXT NOT NULL,
                project_id TEXT NOT NULL,
                region TEXT NOT NULL,
                user_ids_json TEXT NOT NULL,
                status TEXT NOT NULL,
                stage TEXT NOT NULL,
                clickhouse_rows_deleted BIGINT NOT NULL,
                archive_objects_scanned BIGINT NOT NULL,
                archive_objects_rewritten BIGINT NOT NULL,
                archive_messages_removed BIGINT NOT NULL,
                error TEXT,
                created_at_ms BIGINT NOT NULL,
                updated_at_ms BIGINT NOT NULL,
                started_at_ms BIGINT,
                finished_at_ms BIGINT,
                deadline_ms BIGINT NOT NULL,
                lease_owner TEXT,
                lease_until_ms BIGINT
            )",
            "CREATE INDEX IF NOT EXISTS deletions_by_status ON deletions (status, region)",
        ],
    ),
    (
        5,
        "project changes for incremental key cache reloads",
        &[
            "CREATE TABLE IF NOT EXISTS project_changes (
                project_id TEXT PRIMARY KEY,
                version BIGINT NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS project_changes_by_version ON project_changes (version)",
        ],
    ),
    (
        6,
        "replays",
        &[
            "CREATE TABLE IF NOT EXISTS replays (
                replay_id TEXT PRIMARY KEY,
                org_id TEXT NOT NULL,
                project_id TEXT NOT NULL,
                region TEXT NOT NULL,
                from_day_ms BIGINT NOT NULL,
                to_day_ms BIGINT NOT NULL,
                status TEXT NOT NULL,
                cancel_requested BIGINT NOT NULL,
                objects_total BIGINT NOT NULL,
                objects_done BIGINT NOT NULL,
                last_object TEXT,
                messages_read BIGINT NOT NULL,
                messages_inserted BIGINT NOT NULL,
                messages_present BIGINT NOT NULL,
                messages_erased BIGINT NOT NULL,
                messages_refused BIGINT NOT NULL,
                error TEXT,
                created_at_ms BIGINT NOT NULL,
                updated_at_ms BIGINT NOT NULL,
                started_at_ms BIGINT,
                finished_at_ms BIGINT,
                lease_owner TEXT,
                lease_until_ms BIGINT
            )",
            "CREATE INDEX IF NOT EXISTS replays_by_status ON replays (status, region)",
            "CREATE INDEX IF NOT EXISTS replays_by_project ON replays (project_id, status)",
        ],
    ),
    (
        7,
        "retention settings and janitor schedule",
        &[
            "CREATE TABLE IF NOT EXISTS project_retention (
                project_id TEXT PRIMARY KEY,
                warehouse_days BIGINT,
                archive_days BIGINT,
                updated_at_ms BIGINT NOT NULL
            )",
            "CREATE TABLE IF NOT EXISTS retention_runs (
                region TEXT PRIMARY KEY,
                next_run_at_ms BIGINT NOT NULL,
                last_owner TEXT
            )",
        ],
    ),
    (
        8,
        "region migrations that copy data",
        &[
            "ALTER TABLE region_migrations ADD COLUMN objects_copied BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE region_migrations ADD COLUMN messages_copied BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE region_migrations ADD COLUMN messages_present BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE region_migrations ADD COLUMN lag_objects BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE region_migrations ADD COLUMN last_pass_at_ms BIGINT",
            "ALTER TABLE region_migrations ADD COLUMN cutover_at_ms BIGINT",
            "ALTER TABLE region_migrations ADD COLUMN lease_owner TEXT",
            "ALTER TABLE region_migrations ADD COLUMN lease_until_ms BIGINT",
            "ALTER TABLE projects ADD COLUMN migrated_to TEXT",
        ],
    ),
    (
        9,
        "revoked admin tokens",
        &["CREATE TABLE IF NOT EXISTS token_revocations (
                revocation_id TEXT PRIMARY KEY,
                org_id TEXT,
                subject TEXT,
                jti TEXT,
                issued_before_ms BIGINT,
                created_at_ms BIGINT NOT NULL,
                created_by TEXT NOT NULL
            )"],
    ),
    (
        11,
        "the delivery ledger",
        &[
            "CREATE TABLE IF NOT EXISTS ledger_ranges (
                source TEXT NOT NULL,
                start_offset BIGINT NOT NULL,
                end_offset BIGINT NOT NULL,
                project_id TEXT NOT NULL,
                day_ms BIGINT NOT NULL,
                region TEXT NOT NULL,
                messages BIGINT NOT NULL,
                PRIMARY KEY (source, start_offset, project_id, day_ms)
            )",
            "CREATE INDEX IF NOT EXISTS ledger_ranges_by_project_day
                ON ledger_ranges (project_id, day_ms)",
            "CREATE INDEX IF NOT EXISTS ledger_ranges_by_region_day
                ON ledger_ranges (region, day_ms)",
            "CREATE TABLE IF NOT EXISTS ledger_positions (
                source TEXT NOT NULL,
                sink TEXT NOT NULL,
                position BIGINT NOT NULL,
                updated_at_ms BIGINT NOT NULL,
                PRIMARY KEY (source, sink)
            )",
            "CREATE TABLE IF NOT EXISTS ledger_counts (
                project_id TEXT NOT NULL,
                day_ms BIGINT NOT NULL,
                kind TEXT NOT NULL,
                entry TEXT NOT NULL,
                messages BIGINT NOT NULL,
                PRIMARY KEY (project_id, day_ms, kind, entry)
            )",
        ],
    ),
];

/// The migration that replaces stored user ids by their keyed hashes (done in code, with the key).
const USER_HASHES_VERSION: i64 = 4;
/// The migration that seals the user ids of deletions not done yet (done in code, with the key).
const SEALED_DELETION_IDS_VERSION: i64 = 10;

/// Applies every migration not yet applied. On PostgreSQL an advisory lock keeps several nodes
/// starting at once from running the same migration concurrently.
pub(crate) async fn migrate(
    pool: &AnyPool,
    is_postgres: bool,
    key: &CatalogKey,
) -> Result<(), CatalogError> {
    let mut connection = pool.acquire().await?;
    if is_postgres {
        sqlx::query("SELECT pg_advisory_lock(7262746)")
            .execute(&mut *connection)
            .await?;
    }
    let mut outcome = apply_migrations(&mut connection).await;
    if outcome.is_ok() {
        outcome = hash_stored_user_ids(&mut connection, key).await;
    }
    if outcome.is_ok() {
        outcome = seal_pending_deletion_ids(&mut connection, key, is_postgres).await;
    }
    if is_postgres {
        sqlx::query("SELECT pg_advisory_unlock(7262746)")
            .execute(&mut *connection)
            .await?;
    }
    outcome
}

async fn apply_migrations(connection: &mut sqlx::AnyConnection) -> Result<(), CatalogError> {
    use sqlx::Connection;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            applied_at_ms BIGINT NOT NULL
        )",
    )
    .execute(&mut *connection)
    .await?;
    for (version, description, statements) in MIGRATIONS {
        let mut transaction = connection.begin().await?;
        let applied = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
            .bind(*version)
            .fetch_optional(&mut *transaction)
            .await?;
        if applied.is_some() {
            continue;
        }
        for statement in *statements {
            sqlx::query(statement).execute(&mut *transaction).await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO schema_migrations (version, description, applied_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(*version)
        .bind(*description)
        .bind(meridian_core::timestamp::now_unix_ms())
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        if inserted.rows_affected() == 1 {
            info!(version, description, "catalog migration applied");
        }
    }
    Ok(())
}

/// Migration 4: suppressions and finished deletions keep keyed hashes of user ids, not the ids
/// (see [`crate::keyed_hash`]). Deletions still under way keep their ids until they finish.
async fn hash_stored_user_ids(
    connection: &mut sqlx::AnyConnection,
    key: &CatalogKey,
) -> Result<(), CatalogError> {
    use sqlx::Connection;
    let mut transaction = connection.begin().await?;
    let applied = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
        .bind(USER_HASHES_VERSION)
        .fetch_optional(&mut *transaction)
        .await?;
    if applied.is_some() {
        return Ok(());
    }
    let suppressions = sqlx::query("SELECT project_id, user_id, created_at_ms FROM suppressions")
        .fetch_all(&mut *transaction)
        .await?;
    let mut hashed_suppressions = 0u64;
    for row in &suppressions {
        let project_id: String = row.try_get("project_id")?;
        let user_id: String = row.try_get("user_id")?;
        let created_at_ms: i64 = row.try_get("created_at_ms")?;
        if is_user_hash(&user_id) {
            continue;
        }
        sqlx::query(
            "INSERT INTO suppressions (project_id, user_id, created_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (project_id, user_id) DO NOTHING",
        )
        .bind(&project_id)
        .bind(key.user_hash(&project_id, &user_id))
        .bind(created_at_ms)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("DELETE FROM suppressions WHERE project_id = $1 AND user_id = $2")
            .bind(&project_id)
            .bind(&user_id)
            .execute(&mut *transaction)
            .await?;
        hashed_suppressions += 1;
    }
    let finished = sqlx::query(
        "SELECT deletion_id, project_id, user_ids_json FROM deletions WHERE status = 'done'",
    )
    .fetch_all(&mut *transaction)
    .await?;
    for row in &finished {
        let deletion_id: String = row.try_get("deletion_id")?;
        let project_id: String = row.try_get("project_id")?;
        let user_ids_json: String = row.try_get("user_ids_json")?;
        let user_ids: Vec<String> = serde_json::from_str(&user_ids_json)
            .map_err(|error| CatalogError::Corrupt(format!("deletion user ids: {error}")))?;
        let hashes: Vec<String> = user_ids
            .iter()
            .map(|user_id| {
                if is_user_hash(user_id) {
                    user_id.clone()
                } else {
                    key.user_hash(&project_id, user_id)
                }
            })
            .collect();
        let hashes_json = serde_json::to_string(&hashes)
            .map_err(|error| CatalogError::Invalid(error.to_string()))?;
        sqlx::query("UPDATE deletions SET user_ids_json = $1 WHERE deletion_id = $2")
            .bind(&hashes_json)
            .bind(&deletion_id)
            .execute(&mut *transaction)
            .await?;
    }
    sqlx::query(
        "INSERT INTO schema_migrations (version, description, applied_at_ms) VALUES ($1, $2, $3)
         ON CONFLICT (version) DO NOTHING",
    )
    .bind(USER_HASHES_VERSION)
    .bind("user ids kept as keyed hashes")
    .bind(meridian_core::timestamp::now_unix_ms())
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    info!(
        hashed_suppressions,
        hashed_deletions = finished.len(),
        "catalog migration applied: user ids kept as keyed hashes"
    );
    Ok(())
}

/// Migration 10: the user ids of deletions not done yet are sealed with the catalog key (earlier
/// versions kept them in plaintext until the deletion finished).
async fn seal_pending_deletion_ids(
    connection: &mut sqlx::AnyConnection,
    key: &CatalogKey,
    is_postgres: bool,
) -> Result<(), CatalogError> {
    use sqlx::Connection;
    let mut transaction = connection.begin().await?;
    let applied = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
        .bind(SEALED_DELETION_IDS_VERSION)
        .fetch_optional(&mut *transaction)
        .await?;
    if applied.is_some() {
        return Ok(());
    }
    let pending =
        sqlx::query("SELECT deletion_id, user_ids_json FROM deletions WHERE status <> 'done'")
            .fetch_all(&mut *transaction)
            .await?;
    let mut sealed = 0usize;
    for row in &pending {
        let deletion_id: String = row.try_get("deletion_id")?;
        let stored: String = row.try_get("user_ids_json")?;
        if crate::keyed_hash::is_sealed(&stored) {
            continue;
        }
        let user_ids = crate::deletion::stored_user_ids(key, &deletion_id, &stored)?;
        sqlx::query("UPDATE deletions SET user_ids_json = $1 WHERE deletion_id = $2")
            .bind(crate::deletion::seal_user_ids(
                key,
                &deletion_id,
                &user_ids,
            )?)
            .bind(&deletion_id)
            .execute(&mut *transaction)
            .await?;
        sealed += 1;
    }
    sqlx::query(
        "INSERT INTO schema_migrations (version, description, applied_at_ms) VALUES ($1, $2, $3)
         ON CONFLICT (version) DO NOTHING",
    )
    .bind(SEALED_DELETION_IDS_VERSION)
    .bind("user ids of pending deletions sealed")
    .bind(meridian_core::timestamp::now_unix_ms())
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    if sealed > 0 && !is_postgres {
        // The write-ahead log still holds the pages with the plaintext ids: fold it into the
        // database (where secure_delete zeroed them) and empty it.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut *connection)
            .await?;
    }
    info!(
        sealed,
        "catalog migration applied: user ids of pending deletions sealed"
    );
    Ok(())
}

pub(crate) async fn applied_versions(pool: &AnyPool) -> Result<Vec<i64>, CatalogError> {
    let rows = sqlx::query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|row| row.try_get::<i64, _>("version").map_err(CatalogError::from))
        .collect()
}
