//! Region migrations of an org's data: a first-class record with a state machine. The data copy
//! itself is a later piece of work; the states, the transitions, the "in flight" rule that blocks
//! changing the org's primary region, and the audit trail are real.

use serde::Serialize;

/// `pending` -> `copying` -> `dual_write` -> `done`; `failed` from the two working states;
/// `cancelled` from any state not yet finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStatus {
    Pending,
    Copying,
    DualWrite,
    Done,
    Failed,
    Cancelled,
}

impl MigrationStatus {
    pub const ALL: [MigrationStatus; 6] = [
        MigrationStatus::Pending,
        MigrationStatus::Copying,
        MigrationStatus::DualWrite,
        MigrationStatus::Done,
        MigrationStatus::Failed,
        MigrationStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::Pending => "pending",
            MigrationStatus::Copying => "copying",
            MigrationStatus::DualWrite => "dual_write",
            MigrationStatus::Done => "done",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<MigrationStatus> {
        MigrationStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }

    /// A migration is in flight until it is done, failed or cancelled.
    pub fn is_in_flight(self) -> bool {
        matches!(
            self,
            MigrationStatus::Pending | MigrationStatus::Copying | MigrationStatus::DualWrite
        )
    }

    pub fn can_become(self, next: MigrationStatus) -> bool {
        use MigrationStatus::*;
        matches!(
            (self, next),
            (Pending, Copying)
                | (Copying, DualWrite)
                | (DualWrite, Done)
                | (Copying, Failed)
                | (DualWrite, Failed)
                | (Pending, Cancelled)
                | (Copying, Cancelled)
                | (DualWrite, Cancelled)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionMigration {
    pub migration_id: String,
    pub org_id: String,
    pub source_project: String,
    pub target_project: String,
    pub source_region: String,
    pub target_region: String,
    pub status: MigrationStatus,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_machine_allows_only_forward_moves() {
        use MigrationStatus::*;
        assert!(Pending.can_become(Copying));
        assert!(Copying.can_become(DualWrite));
        assert!(DualWrite.can_become(Done));
        assert!(!Pending.can_become(Done), "no skipping the copy");
        assert!(
            !Done.can_become(Cancelled),
            "finished migrations stay finished"
        );
        assert!(!Failed.can_become(Copying));
        assert!(!Cancelled.can_become(Pending));
        for status in MigrationStatus::ALL {
            assert_eq!(MigrationStatus::parse(status.as_str()), Some(status));
            assert!(!status.can_become(status), "{status:?} -> itself");
            assert_eq!(
                status.is_in_flight(),
                matches!(status, Pending | Copying | DualWrite)
            );
        }
    }
}
