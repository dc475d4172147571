//! Regional stores: where the data about a region's end users lives — suppressions, GDPR
//! deletion requests and their progress, replays, and the audit entries of those changes. Each
//! region has its own store (a PostgreSQL database in the region, or on embedded defaults a
//! SQLite file per region); the global catalog keeps only what is about orgs, projects and keys.
//!
//! A store is a [`Catalog`] like the global one (same schema, same code), of which only the
//! end-user tables are used. A node opens the stores of the regions it serves and no other, so
//! a node of one region never connects to another region's store. A region with no store of
//! its own configured keeps its end-user data in the global catalog (`--check-config` warns).
//!
//! [`move_end_user_rows`] moves what an older, single-catalog deployment kept in the global
//! catalog into the regional stores, at start.

use std::collections::BTreeMap;
use std::sync::Arc;

use meridian_core::RegionId;
use sqlx::Row;
use sqlx::any::AnyRow;
use tracing::info;

use crate::catalog::{Catalog, Project};
use crate::deletion::Deletion;
use crate::error::CatalogError;
use crate::replay::Replay;

/// One store and the served regions whose end-user data it holds.
#[derive(Clone)]
pub struct RegionalStore {
    pub catalog: Catalog,
    pub regions: Vec<RegionId>,
    /// The global catalog itself: these regions have no store of their own.
    pub is_global: bool,
    /// Where it is, with any password hidden (for logs and reports).
    pub display_url: String,
}

impl RegionalStore {
    pub fn region_names(&self) -> Vec<String> {
        self.regions
            .iter()
            .map(|region| region.as_str().to_string())
            .collect()
    }
}

/// The regional stores of the regions a node serves.
#[derive(Clone)]
pub struct RegionalStores {
    inner: Arc<StoresInner>,
}

struct StoresInner {
    stores: Vec<RegionalStore>,
    /// Region → index into `stores`.
    by_region: BTreeMap<RegionId, usize>,
}

impl RegionalStores {
    /// `stores` holds each store once; a region may appear in one store only.
    pub fn new(stores: Vec<RegionalStore>) -> RegionalStores {
        let mut by_region = BTreeMap::new();
        for (index, store) in stores.iter().enumerate() {
            for region in &store.regions {
                let previous = by_region.insert(region.clone(), index);
                debug_assert!(previous.is_none(), "region {region} is in two stores");
            }
        }
        RegionalStores {
            inner: Arc::new(StoresInner { stores, by_region }),
        }
    }

    /// The store of `region`; `RegionNotServed` when this node does not serve it.
    pub fn of_region(&self, region: &str) -> Result<&Catalog, CatalogError> {
        let not_served = || CatalogError::RegionNotServed {
            region: region.to_string(),
        };
        let region_id = RegionId::parse(region).map_err(|_| not_served())?;
        let index = self
            .inner
            .by_region
            .get(&region_id)
            .ok_or_else(not_served)?;
        Ok(&self.inner.stores[*index].catalog)
    }

    /// The store of `region` with what it holds, when this node serves the region.
    pub fn store_of_region(&self, region: &RegionId) -> Option<&RegionalStore> {
        let index = self.inner.by_region.get(region)?;
        Some(&self.inner.stores[*index])
    }

    /// The store of the project's region.
    pub fn of_project(&self, project: &Project) -> Result<&Catalog, CatalogError> {
        self.of_region(&project.region)
    }

    /// Every store, once.
    pub fn stores(&self) -> &[RegionalStore] {
        &self.inner.stores
    }

    /// The deletion, from whichever served region's store holds it.
    pub async fn find_deletion(&self, deletion_id: &str) -> Result<Option<Deletion>, CatalogError> {
        for store in &self.inner.stores {
            if let Some(deletion) = store.catalog.get_deletion(deletion_id).await? {
                return Ok(Some(deletion));
            }
        }
        Ok(None)
    }

    /// The replay, from whichever served region's store holds it.
    pub async fn find_replay(&self, replay_id: &str) -> Result<Option<Replay>, CatalogError> {
        for store in &self.inner.stores {
            if let Some(replay) = store.catalog.get_replay(replay_id).await? {
                return Ok(Some(replay));
            }
        }
        Ok(None)
    }

    /// Every store's catalog, once (what a key cache reads end-user rows from).
    pub fn catalogs(&self) -> Vec<Catalog> {
        self.inner
            .stores
            .iter()
            .map(|store| store.catalog.clone())
            .collect()
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Integer,
}

/// A table whose rows belong to a regional store.
struct EndUserTable {
    name: &'static str,
    /// The columns that identify a row.
    key: &'static [&'static str],
    columns: &'static [(&'static str, Kind)],
}

use Kind::{Integer, Text};

const END_USER_TABLES: &[EndUserTable] = &[
    EndUserTable {
        name: "suppressions",
        key: &["project_id", "user_id"],
        columns: &[
            ("project_id", Text),
            ("user_id", Text),
            ("created_at_ms", Integer),
        ],
    },
    EndUserTable {
        name: "deletions",
        key: &["deletion_id"],
        columns: &[
            ("deletion_id", Text),
            ("org_id", Text),
            ("project_id", Text),
            ("region", Text),
            ("user_ids_json", Text),
            ("status", Text),
            ("stage", Text),
            ("clickhouse_rows_deleted", Integer),
            ("archive_objects_scanned", Integer),
            ("archive_objects_rewritten", Integer),
            ("archive_messages_removed", Integer),
            ("error", Text),
            ("created_at_ms", Integer),
            ("updated_at_ms", Integer),
            ("started_at_ms", Integer),
            ("finished_at_ms", Integer),
            ("deadline_ms", Integer),
            ("lease_owner", Text),
            ("lease_until_ms", Integer),
        ],
    },
    EndUserTable {
        name: "replays",
        key: &["replay_id"],
        columns: &[
            ("replay_id", Text),
            ("org_id", Text),
            ("project_id", Text),
            ("region", Text),
            ("from_day_ms", Integer),
            ("to_day_ms", Integer),
            ("status", Text),
            ("cancel_requested", Integer),
            ("objects_total", Integer),
            ("objects_done", Integer),
            ("last_object", Text),
            ("messages_read", Integer),
            ("messages_inserted", Integer),
            ("messages_present", Integer),
            ("messages_erased", Integer),
            ("messages_refused", Integer),
            ("error", Text),
            ("created_at_ms", Integer),
            ("updated_at_ms", Integer),
            ("started_at_ms", Integer),
            ("finished_at_ms", Integer),
            ("lease_owner", Text),
            ("lease_until_ms", Integer),
        ],
    },
];

impl Catalog {
    /// The distinct project ids of each end-user table (what a residency report checks).
    pub async fn end_user_project_ids(&self) -> Result<Vec<(&'static str, String)>, CatalogError> {
        let mut found = Vec::new();
        for table in END_USER_TABLES {
            let rows = sqlx::query(&format!(
                "SELECT DISTINCT project_id FROM {} ORDER BY project_id",
                table.name
            ))
            .fetch_all(&self.pool)
            .await?;
            for row in &rows {
                found.push((table.name, row.try_get::<String, _>("project_id")?));
            }
        }
        Ok(found)
    }
}

/// Rows moved per transaction.
const MOVE_BATCH: usize = 500;

/// A column's value, read from one store and written to another.
enum Cell {
    Text(Option<String>),
    Integer(Option<i64>),
}

fn read_cells(table: &EndUserTable, row: &AnyRow) -> Result<Vec<Cell>, CatalogError> {
    table
        .columns
        .iter()
        .map(|(column, kind)| {
            Ok(match kind {
                Text => Cell::Text(row.try_get(*column)?),
                Integer => Cell::Integer(row.try_get(*column)?),
            })
        })
        .collect()
}

/// What [`move_end_user_rows`] moved, per table.
pub type MovedRows = Vec<(&'static str, u64)>;

/// Moves the rows about end users of `store`'s regions' projects out of the global catalog into
/// `store`: each batch is written to the store (rows already there are kept) and committed there
/// before it is deleted from the global catalog, so a crash in between leaves copies that the
/// next start moves again, never a loss. The key caches of the store see the moved projects as
/// changed. The audit entries the global catalog recorded for those rows stay in its chain (an
/// entry cannot leave a hash chain without breaking it); they name users by keyed hashes only.
pub async fn move_end_user_rows(
    global: &Catalog,
    store: &RegionalStore,
) -> Result<MovedRows, CatalogError> {
    let mut moved = Vec::new();
    if store.is_global || store.regions.is_empty() {
        return Ok(moved);
    }
    for table in END_USER_TABLES {
        let count = move_table(global, store, table).await?;
        if count > 0 {
            info!(
                table = table.name,
                rows = count,
                regions = ?store.region_names(),
                store = %store.display_url,
                "moved end-user rows from the global catalog into the regional store"
            );
        }
        moved.push((table.name, count));
    }
    let any_moved = moved.iter().any(|(_, count)| *count > 0);
    if any_moved && global.backend() == crate::catalog::CatalogBackend::Sqlite {
        // Fold the write-ahead log (which still holds the moved pages) into the database, where
        // secure_delete zeroed them.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&global.pool)
            .await?;
    }
    Ok(moved)
}

async fn move_table(
    global: &Catalog,
    store: &RegionalStore,
    table: &EndUserTable,
) -> Result<u64, CatalogError> {
    let region_placeholders: Vec<String> =
        (1..=store.regions.len()).map(|n| format!("${n}")).collect();
    let selected_columns: Vec<String> = table
        .columns
        .iter()
        .map(|(column, _)| format!("moved.{column} AS {column}"))
        .collect();
    let select_sql = format!(
        "SELECT {} FROM {} moved JOIN projects ON projects.project_id = moved.project_id
         WHERE projects.region IN ({}) ORDER BY {} LIMIT {MOVE_BATCH}",
        selected_columns.join(", "),
        table.name,
        region_placeholders.join(", "),
        table
            .key
            .iter()
            .map(|column| format!("moved.{column}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let column_names: Vec<&str> = table.columns.iter().map(|(column, _)| *column).collect();
    let value_placeholders: Vec<String> =
        (1..=table.columns.len()).map(|n| format!("${n}")).collect();
    let insert_sql = format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING",
        table.name,
        column_names.join(", "),
        value_placeholders.join(", ")
    );
    let key_condition: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(index, column)| format!("{column} = ${}", index + 1))
        .collect();
    let delete_sql = format!(
        "DELETE FROM {} WHERE {}",
        table.name,
        key_condition.join(" AND ")
    );

    let mut total = 0u64;
    loop {
        let mut query = sqlx::query(&select_sql);
        for region in &store.regions {
            query = query.bind(region.as_str());
        }
        let rows = query.fetch_all(&global.pool).await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let batch: Vec<Vec<Cell>> = rows
            .iter()
            .map(|row| read_cells(table, row))
            .collect::<Result<_, _>>()?;
        let mut projects: Vec<String> = rows
            .iter()
            .map(|row| row.try_get::<String, _>("project_id"))
            .collect::<Result<_, _>>()?;
        projects.sort();
        projects.dedup();

        let mut transaction = store.catalog.pool.begin().await?;
        for cells in &batch {
            let mut insert = sqlx::query(&insert_sql);
            for cell in cells {
                insert = match cell {
                    Cell::Text(value) => insert.bind(value.clone()),
                    Cell::Integer(value) => insert.bind(*value),
                };
            }
            insert.execute(&mut *transaction).await?;
        }
        let version = crate::snapshot_source::bump_version(&mut transaction).await?;
        for project_id in &projects {
            crate::snapshot_source::touch_project(&mut transaction, version, project_id).await?;
        }
        transaction.commit().await?;

        let mut transaction = global.pool.begin().await?;
        for row in &rows {
            let mut delete = sqlx::query(&delete_sql);
            for column in table.key {
                delete = delete.bind(row.try_get::<String, _>(*column)?);
            }
            delete.execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        total += rows.len() as u64;
    }
}
