//! GDPR deletion requests: the record an executor in the project's region works through.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionStatus {
    Pending,
    Running,
    Done,
    Failed,
}

impl DeletionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionStatus::Pending => "pending",
            DeletionStatus::Running => "running",
            DeletionStatus::Done => "done",
            DeletionStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeletionStatus> {
        [
            DeletionStatus::Pending,
            DeletionStatus::Running,
            DeletionStatus::Done,
            DeletionStatus::Failed,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }
}

/// Where the executor is: `settle` (let messages already accepted reach the sinks, filtered),
/// `clickhouse`, `archive`, then `finished`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionStage {
    Settle,
    Clickhouse,
    Archive,
    Finished,
}

impl DeletionStage {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionStage::Settle => "settle",
            DeletionStage::Clickhouse => "clickhouse",
            DeletionStage::Archive => "archive",
            DeletionStage::Finished => "finished",
        }
    }

    pub fn parse(text: &str) -> Option<DeletionStage> {
        [
            DeletionStage::Settle,
            DeletionStage::Clickhouse,
            DeletionStage::Archive,
            DeletionStage::Finished,
        ]
        .into_iter()
        .find(|stage| stage.as_str() == text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deletion {
    pub deletion_id: String,
    pub org_id: String,
    pub project_id: String,
    pub region: String,
    pub user_ids: Vec<String>,
    pub status: DeletionStatus,
    pub stage: DeletionStage,
    pub clickhouse_rows_deleted: i64,
    pub archive_objects_scanned: i64,
    pub archive_objects_rewritten: i64,
    pub archive_messages_removed: i64,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// GDPR's one month: creation + 30 days.
    pub deadline_ms: i64,
}

/// Progress an executor records after each step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeletionProgress {
    pub clickhouse_rows_deleted: i64,
    pub archive_objects_scanned: i64,
    pub archive_objects_rewritten: i64,
    pub archive_messages_removed: i64,
}
